//! The shutdown signal every long-running task watches.
//!
//! [`ShutdownTrigger::trigger`] flips it once; each task holds a [`Shutdown`] and
//! selects on [`Shutdown::wait`] beside its own work, then stops.

use tokio::sync::watch;

/// Fires the shutdown signal.
pub struct ShutdownTrigger(watch::Sender<bool>);

/// A task's view of the shutdown signal. Cheap to clone.
#[derive(Clone)]
pub struct Shutdown(watch::Receiver<bool>);

/// A new signal, not yet fired.
pub fn channel() -> (ShutdownTrigger, Shutdown) {
    let (tx, rx) = watch::channel(false);
    (ShutdownTrigger(tx), Shutdown(rx))
}

impl ShutdownTrigger {
    /// Tells every holder of a [`Shutdown`] to stop.
    pub fn trigger(&self) {
        self.0.send_replace(true);
    }
}

impl Shutdown {
    /// True once shutdown has been triggered.
    pub fn is_triggered(&self) -> bool {
        *self.0.borrow()
    }

    /// Resolves when shutdown is triggered (at once if it already was).
    pub async fn wait(&mut self) {
        // An error means the trigger is gone, which only happens when the node is
        // going away anyway.
        let _ = self.0.wait_for(|&stop| stop).await;
    }
}
