//! systemd's readiness protocol, spoken directly: datagrams to `$NOTIFY_SOCKET`.
//!
//! `READY=1` once storage is open and the port listens, `STOPPING=1` when shutdown
//! begins, `WATCHDOG=1` every half `$WATCHDOG_USEC` while the node runs. Without
//! `NOTIFY_SOCKET` (not started by systemd) every call is a no-op. A socket name
//! starting with `@` is in the abstract namespace.

use crate::shutdown::Shutdown;
use std::os::unix::net::UnixDatagram;
use std::time::Duration;

/// Where notifications go, if anywhere.
pub struct Notifier {
    target: Option<Target>,
    watchdog: Option<Duration>,
}

enum Target {
    Path(std::path::PathBuf),
    Abstract(Vec<u8>),
}

impl Notifier {
    /// Reads `NOTIFY_SOCKET`, `WATCHDOG_USEC` and `WATCHDOG_PID` from the environment.
    pub fn from_env() -> Notifier {
        let target = std::env::var_os("NOTIFY_SOCKET").filter(|s| !s.is_empty()).map(|s| {
            let bytes = s.as_encoded_bytes();
            match bytes.strip_prefix(b"@") {
                Some(name) => Target::Abstract(name.to_vec()),
                None => Target::Path(s.into()),
            }
        });
        let for_us = std::env::var("WATCHDOG_PID").ok().is_none_or(|p| p == std::process::id().to_string());
        let watchdog = std::env::var("WATCHDOG_USEC")
            .ok()
            .and_then(|u| u.parse::<u64>().ok())
            .filter(|&u| u > 0 && for_us)
            .map(|u| Duration::from_micros(u / 2));
        Notifier { target, watchdog }
    }

    /// Sends one notification; failures are logged, never fatal.
    pub fn send(&self, msg: &str) {
        let Some(target) = &self.target else { return };
        let result = UnixDatagram::unbound().and_then(|sock| match target {
            Target::Path(p) => sock.send_to(msg.as_bytes(), p).map(|_| ()),
            Target::Abstract(name) => {
                use std::os::linux::net::SocketAddrExt;
                let addr = std::os::unix::net::SocketAddr::from_abstract_name(name)?;
                sock.send_to_addr(msg.as_bytes(), &addr).map(|_| ())
            }
        });
        if let Err(e) = result {
            tracing::warn!(error = %e, message = msg, "cannot notify systemd");
        }
    }

    /// Pings the watchdog until shutdown, if systemd asked for it, while `healthy`
    /// says so: a node whose storage is stuck stops feeding it, so systemd restarts it.
    pub async fn watchdog_loop(self: std::sync::Arc<Self>, mut shutdown: Shutdown, healthy: impl Fn() -> bool) {
        let Some(every) = self.watchdog else { return };
        loop {
            if healthy() {
                self.send("WATCHDOG=1");
            }
            tokio::select! {
                _ = tokio::time::sleep(every) => {}
                _ = shutdown.wait() => return,
            }
        }
    }
}
