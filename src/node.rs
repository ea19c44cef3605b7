//! One running node: opens storage, binds the port, starts every task, and stops them
//! all in order on SIGINT/SIGTERM or a storage failure.

use crate::clock::now_ms;
use crate::config::Config;
use crate::server;
use crate::shutdown;
use crate::storage::{Store, StoreError, Writer};
use bytes::Bytes;
use serde_json::json;
use std::sync::Arc;
use std::time::Instant;
use tokio::net::TcpListener;

/// Metadata key under which this node remembers when it first started.
const META_JOINED: &str = "joined_timestamp";

/// What every request handler and task shares.
pub struct App {
    /// The validated configuration.
    pub config: Config,
    /// Reads.
    pub store: Store,
    /// Writes.
    pub writer: Writer,
    /// `host:port` peers reach this node at.
    pub advertise: String,
    /// When this node first started (Unix ms); survives restarts.
    pub joined_timestamp: u64,
    /// When this process started.
    pub started: Instant,
}

impl App {
    /// The `/health` document.
    pub fn health(&self) -> serde_json::Value {
        let mode = if self.config.read_only { "read-only" } else { "normal" };
        json!({
            "status": "ok",
            "mode": mode,
            "member_count": 1,
            "node_id": self.config.node_id,
            "version": env!("CARGO_PKG_VERSION"),
            "uptime_seconds": self.started.elapsed().as_secs(),
            "keys": self.store.live_keys(),
            "tombstones": self.store.tombstones(),
        })
    }

    /// The `/members/` document.
    pub fn members_json(&self) -> serde_json::Value {
        json!([{
            "id": self.config.node_id,
            "address": self.advertise,
            "last_seen": now_ms(),
            "joined_timestamp": self.joined_timestamp,
        }])
    }
}

/// Why a node could not run.
#[derive(Debug)]
pub enum NodeError {
    /// Storage could not be opened or failed while running.
    Storage(StoreError),
    /// The port could not be bound.
    Bind(String),
}

impl std::fmt::Display for NodeError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            NodeError::Storage(e) => write!(f, "{e}"),
            NodeError::Bind(m) => f.write_str(m),
        }
    }
}

impl From<StoreError> for NodeError {
    fn from(e: StoreError) -> Self {
        NodeError::Storage(e)
    }
}

async fn joined_timestamp(store: &Store, writer: &Writer) -> Result<u64, StoreError> {
    let s = store.clone();
    let held = tokio::task::spawn_blocking(move || s.meta(META_JOINED)).await.map_err(|_| StoreError::Closed)??;
    if let Some(ts) = held.as_deref().and_then(|b| b.try_into().ok()).map(u64::from_be_bytes) {
        return Ok(ts);
    }
    let ts = now_ms();
    writer.set_meta(META_JOINED, Bytes::copy_from_slice(&ts.to_be_bytes())).await?;
    Ok(ts)
}

/// Runs the node until a signal or a storage failure. `Ok` means a clean stop.
pub async fn run(config: Config) -> Result<(), NodeError> {
    let dir = config.data_dir.clone();
    let durability = config.durability;
    let (store, writer) =
        tokio::task::spawn_blocking(move || Store::open(&dir, durability)).await.map_err(|_| StoreError::Closed)??;
    let result = serve(config, store.clone(), writer.clone()).await;
    // Whatever happened, finish queued writes and fsync before exiting.
    let closed = tokio::task::spawn_blocking(move || writer.close(&store)).await.map_err(|_| StoreError::Closed);
    result?;
    closed??;
    tracing::info!("stopped");
    Ok(())
}

async fn serve(config: Config, store: Store, writer: Writer) -> Result<(), NodeError> {
    let joined_timestamp = joined_timestamp(&store, &writer).await?;
    let listener = TcpListener::bind((config.bind_address, config.port))
        .await
        .map_err(|e| NodeError::Bind(format!("cannot listen on {}:{}: {e}", config.bind_address, config.port)))?;
    let local = listener.local_addr().map_err(|e| NodeError::Bind(e.to_string()))?;
    let advertise = config.advertised(local.port());
    tracing::info!(
        node_id = %config.node_id,
        data_dir = %config.data_dir.display(),
        advertise = %advertise,
        config = ?config,
        "starting"
    );
    let app =
        Arc::new(App { config, store: store.clone(), writer, advertise, joined_timestamp, started: Instant::now() });
    let (trigger, shutdown) = shutdown::channel();
    let server = tokio::spawn(server::serve(listener, app, shutdown));
    tracing::info!(addr = %local, "listening");

    let failure = tokio::select! {
        _ = signal() => None,
        reason = store.failed() => Some(reason),
    };
    tracing::info!("shutting down");
    trigger.trigger();
    let _ = server.await;
    match failure {
        Some(reason) => Err(NodeError::Storage(StoreError::Io(reason))),
        None => Ok(()),
    }
}

/// Resolves on SIGINT or SIGTERM.
async fn signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut term), Ok(mut int)) = (signal(SignalKind::terminate()), signal(SignalKind::interrupt())) else {
        tracing::error!("cannot install signal handlers; stop with SIGKILL");
        return std::future::pending().await;
    };
    tokio::select! {
        _ = term.recv() => {},
        _ = int.recv() => {},
    }
}
