//! One running node: opens storage, binds the port, starts every task, and stops them
//! all in order on SIGINT/SIGTERM or a fatal error. [`run`] is what the `kvs` binary
//! runs; [`run_embedded`] runs a node with another transport for node-to-node calls
//! and another stop signal ([`Embedding`]), so scenario tests run several nodes in one
//! process ([`crate::localnet`]).
//!
//! Stop order: the HTTP server stops taking requests and finishes those in flight;
//! the pusher hands every queued write to the alive peers (at most
//! [`crate::push::DRAIN_TIMEOUT`]); the node announces its leave; the background tasks
//! stop; then the storage writer finishes its queue and fsyncs.

use crate::clock::now_ms;
use crate::cluster::{Cluster, DataFacts};
use crate::config::{Config, LogLevel, STALL_EXIT_FACTOR};
use crate::hlc;
use crate::membership::{MemberInfo, Timeouts};
use crate::metrics::{Metrics, NodeCollector};
use crate::notify::Notifier;
use crate::protocol::{BoxFuture, PeerClient, PeerTransport};
use crate::push::{self, Pusher};
use crate::replication::freshness::Freshness;
use crate::replication::{Replication, SyncConfig};
use crate::resolve::{self, Resolver, Voting};
use crate::server;
use crate::shutdown;
use crate::shutdown::Shutdown;
use crate::stats::Stats;
use crate::storage::{Store, StoreError, Writer, blocking};
use bytes::Bytes;
use serde_json::json;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};
use tokio::net::TcpListener;
use tokio::sync::mpsc;

/// When this node first started (Unix ms); its age in conflict tie-breaks.
const META_JOINED: &str = "joined_timestamp";
/// Random identity of this data dir (tells a restart from a duplicate `node_id`).
const META_UID: &str = "node_uid";
/// The incarnation of the last process start.
const META_INCARNATION: &str = "incarnation";

/// What every request handler and task shares.
pub struct App {
    /// The validated configuration.
    pub config: Config,
    /// Reads.
    pub store: Store,
    /// Writes.
    pub writer: Writer,
    /// Membership and the peer client.
    pub cluster: Arc<Cluster>,
    /// Sends client writes to peers.
    pub pusher: Pusher,
    /// Replication state and counters.
    pub replication: Arc<Replication>,
    /// Prometheus metrics.
    pub metrics: Metrics,
    /// When this process started.
    pub started: Instant,
    /// Client tokens; `None` while `client_auth` is off.
    pub acl: Option<Arc<crate::acl::Acl>>,
    /// TLS state (certificates, reloaded on SIGHUP); `None`: plain HTTP.
    pub tls: Option<Arc<crate::tls::Tls>>,
    /// The change feed's watchers, limits and counters.
    pub feed: Arc<crate::changes_api::Feed>,
    /// `GET /admin/snapshot`: one at a time.
    pub snapshots: Arc<crate::snapshot::Snapshots>,
}

impl App {
    /// The `/health` document.
    pub fn health(&self) -> serde_json::Value {
        let mode = if self.replication.is_syncing() {
            "syncing"
        } else if self.config.read_only {
            "read-only"
        } else {
            "normal"
        };
        let stalled = self.store.stalled(self.config.storage_stall_timeout);
        let mut health = json!({
            "status": if stalled.is_some() { "error" } else { "ok" },
            "mode": mode,
            "member_count": self.cluster.alive_count(),
            "gossip_rounds": self.cluster.gossip_rounds(),
            "refused_member_entries": self.cluster.refused_members(),
            "cluster_auth_refused": self.cluster.auth_refused(),
            "client_auth_refused": self.acl.as_ref().map_or(0, |a| a.refused.load(std::sync::atomic::Ordering::Relaxed)),
            "node_id": self.config.node_id,
            "version": env!("CARGO_PKG_VERSION"),
            "uptime_seconds": self.started.elapsed().as_secs(),
            "keys": self.store.live_keys(),
            "tombstones": self.store.tombstones(),
            "newest_write": hlc::ms(self.store.newest_timestamp()),
            "last_seq": self.store.last_seq(),
            "last_contact": hlc::ms(self.cluster.last_contact()),
            "gc_horizon": hlc::ms(self.store.gc_horizon()),
            "clock": self.cluster.clock_status(),
            "replication": self.replication.stats().to_json(),
        });
        if mode == "syncing" {
            health["bootstrap"] = self.replication.bootstrap_progress();
        }
        if let Some(s) = stalled {
            health["error"] = json!(stall_message(s));
        }
        health
    }
}

/// How often the disk size shown in `/metrics` is measured.
const DISK_MEASURE_EVERY: Duration = Duration::from_secs(5);

/// Longest a stopping node waits for its background tasks.
const TASKS_TIMEOUT: Duration = Duration::from_secs(10);

/// Longest a stopping node waits for storage to finish and close.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(30);

/// What `/health` and a refused write say about a storage stall.
pub fn stall_message(stalled: Duration) -> String {
    format!(
        "storage has not finished a write for {} s (disk full, failing or hung?); writes are refused",
        stalled.as_secs()
    )
}

/// Watches the storage writer: logs when a commit stalls past `storage_stall_timeout`
/// and fails the store (the node exits 1) once it stalls [`STALL_EXIT_FACTOR`] times
/// that long. Also measures the disk size for `/metrics`.
async fn stall_watch(store: Store, timeout: Duration, mut shutdown: Shutdown) {
    let mut reported = false;
    // The disk size for /metrics is measured here, on the blocking pool, one at a time:
    // it waits for fjall's journal lock, which a stuck commit holds.
    let measuring = Arc::new(AtomicBool::new(false));
    let mut measured = Instant::now() - DISK_MEASURE_EVERY;
    loop {
        if measured.elapsed() >= DISK_MEASURE_EVERY && !measuring.swap(true, Ordering::Relaxed) {
            measured = Instant::now();
            let (store, measuring) = (store.clone(), measuring.clone());
            tokio::task::spawn_blocking(move || {
                store.refresh_disk_bytes();
                measuring.store(false, Ordering::Relaxed);
            });
        }
        tokio::select! {
            _ = tokio::time::sleep(timeout.min(Duration::from_secs(1)) / 2) => {}
            _ = shutdown.wait() => return,
        }
        match store.stalled(timeout) {
            None if reported => {
                tracing::info!("storage writes complete again");
                reported = false;
            }
            None => {}
            Some(s) if s > timeout * STALL_EXIT_FACTOR => {
                store.fail_with(format!("storage has not finished a write for {} s; stopping", s.as_secs()));
                return;
            }
            Some(s) if !reported => {
                tracing::error!(stalled_s = s.as_secs(), "{}", stall_message(s));
                reported = true;
            }
            Some(_) => {}
        }
    }
}

/// Why a node could not run.
#[derive(Debug)]
pub enum NodeError {
    /// Storage could not be opened or failed while running.
    Storage(StoreError),
    /// The port could not be bound.
    Bind(String),
    /// The cluster refused this node (duplicate `node_id`).
    Refused(String),
}

impl std::fmt::Display for NodeError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            NodeError::Storage(e) => write!(f, "{e}"),
            NodeError::Bind(m) => f.write_str(m),
            NodeError::Refused(m) => write!(f, "the cluster refused this node: {m}"),
        }
    }
}

impl From<StoreError> for NodeError {
    fn from(e: StoreError) -> Self {
        NodeError::Storage(e)
    }
}

/// This node's identity, kept in its data dir.
struct Identity {
    uid: String,
    joined_timestamp: u64,
    incarnation: u64,
}

fn meta_u64(v: Option<Bytes>) -> Option<u64> {
    v.as_deref().and_then(|b| b.try_into().ok()).map(u64::from_be_bytes)
}

async fn identity(store: &Store, writer: &Writer) -> Result<Identity, StoreError> {
    let s = store.clone();
    let (joined, uid, incarnation) =
        blocking(move || Ok((s.meta(META_JOINED)?, s.meta(META_UID)?, s.meta(META_INCARNATION)?))).await?;
    let joined_timestamp = match meta_u64(joined) {
        Some(ts) => ts,
        None => {
            let ts = now_ms();
            writer.set_meta(META_JOINED, Bytes::copy_from_slice(&ts.to_be_bytes())).await?;
            ts
        }
    };
    let uid = match uid.and_then(|u| String::from_utf8(u.to_vec()).ok()) {
        Some(u) => u,
        None => {
            let u = uuid::Uuid::new_v4().to_string();
            writer.set_meta(META_UID, Bytes::from(u.clone())).await?;
            u
        }
    };
    // Each start is a new incarnation, above the last even if the clock went back.
    let incarnation = now_ms().max(meta_u64(incarnation).unwrap_or(0) + 1);
    writer.set_meta(META_INCARNATION, Bytes::copy_from_slice(&incarnation.to_be_bytes())).await?;
    Ok(Identity { uid, joined_timestamp, incarnation })
}

/// Changes the log level of the running process (from SIGHUP).
pub type SetLogLevel = Box<dyn Fn(LogLevel) + Send + Sync>;

/// Runs the node until a signal or a fatal error. `Ok` means a clean stop.
/// `config_path` is re-read on SIGHUP for `log_level`.
pub async fn run(config: Config, config_path: PathBuf, set_log_level: SetLogLevel) -> Result<(), NodeError> {
    run_embedded(config, Embedding { reload: Some((config_path, set_log_level)), ..Embedding::default() }).await
}

/// Makes a node's transport from its advertised address.
pub type MakeTransport = Box<dyn FnOnce(&str) -> Arc<dyn PeerTransport> + Send>;

/// What a node runs with besides its config. The `kvs` binary takes the defaults
/// except `reload`: node-to-node calls over HTTP, stop on SIGINT/SIGTERM. Scenario
/// tests run several nodes in one process over an in-process network whose links
/// they cut and heal ([`crate::localnet`]).
#[derive(Default)]
pub struct Embedding {
    /// Re-read this config file and apply its `log_level` on SIGHUP.
    pub reload: Option<(PathBuf, SetLogLevel)>,
    /// Makes the transport for node-to-node calls from this node's advertised
    /// address; `None`: HTTP ([`crate::protocol::HttpTransport`]).
    pub transport: Option<MakeTransport>,
    /// Called with the node once it serves (an in-process network routes to it).
    pub on_serving: Option<Box<dyn FnOnce(Arc<App>) + Send>>,
    /// Resolves when the node should stop gracefully; `None`: SIGINT or SIGTERM.
    pub stop: Option<BoxFuture<'static, ()>>,
}

/// [`run`] with what [`Embedding`] says instead of the binary's defaults.
pub async fn run_embedded(config: Config, embedding: Embedding) -> Result<(), NodeError> {
    let dir = config.data_dir.clone();
    let (durability, max_offset) = (config.durability, config.max_clock_offset_ms);
    let (store, writer) = blocking(move || Store::open(&dir, durability, max_offset)).await?;
    let notifier = Arc::new(Notifier::from_env());
    let result = serve(config, store.clone(), writer.clone(), notifier.clone(), embedding).await;
    // Whatever happened, finish queued writes and fsync before exiting; but a writer
    // stuck on a hung disk must not keep a failed node from exiting.
    let closed = tokio::time::timeout(CLOSE_TIMEOUT, blocking(move || writer.close(&store))).await;
    result?;
    closed.map_err(|_| StoreError::Io("storage did not close in time".into()))??;
    tracing::info!("stopped");
    Ok(())
}

async fn serve(
    config: Config,
    store: Store,
    writer: Writer,
    notifier: Arc<Notifier>,
    embedding: Embedding,
) -> Result<(), NodeError> {
    let id = identity(&store, &writer).await?;
    raise_file_limit(crate::server::connection_cap(config.max_watchers) + crate::server::OTHER_FILES);
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
    let tls = match &config.tls {
        Some(files) => Some(Arc::new(crate::tls::Tls::new(files.clone()).map_err(NodeError::Bind)?)),
        None => None,
    };
    let client = match (embedding.transport, &tls) {
        (Some(make), _) => PeerClient::over(make(&advertise)),
        (None, Some(tls)) => PeerClient::over(Arc::new(crate::protocol::HttpTransport::with_tls(tls.clone()))),
        (None, None) => PeerClient::new(),
    }
    .signed(config.cluster_keys.clone());
    let me = MemberInfo {
        id: config.node_id.clone(),
        uid: id.uid,
        address: advertise,
        joined_timestamp: id.joined_timestamp,
        incarnation: id.incarnation,
        heartbeat: 0,
        left: false,
        newest_write: 0,
        gc_horizon: 0,
        syncing: false,
    };
    let timeouts = Timeouts {
        failure_ms: config.failure_timeout.as_millis() as u64,
        removal_ms: config.removal_timeout.as_millis() as u64,
    };
    let (last_contact, needs_bootstrap) = {
        let s = store.clone();
        let has_seeds = !config.seed_nodes.is_empty();
        blocking(move || Ok((Replication::persisted_last_contact(&s)?, Replication::bootstrap_pending(&s, has_seeds)?)))
            .await?
    };
    let facts_store = store.clone();
    let cluster = Arc::new(
        Cluster::new(
            me,
            timeouts,
            config.seed_nodes.clone(),
            (config.gossip_interval_min, config.gossip_interval_max),
            Freshness::new(last_contact, needs_bootstrap),
            (config.max_clock_offset_ms, store.step_guard()),
            Box::new(move || DataFacts {
                newest_write: facts_store.newest_timestamp(),
                gc_horizon: facts_store.gc_horizon(),
            }),
        )
        .with_client(client),
    );
    let stats = Arc::new(Stats::default());
    let (pusher, push_queue) = Pusher::new(stats.clone());
    let sync_config = SyncConfig {
        sync_interval: config.sync_interval,
        catchup_interval: config.catchup_interval,
        tombstone_grace: config.tombstone_grace,
        bootstrap_max_age: config.bootstrap_max_age,
        throttle_delay: config.throttle_delay,
        fetch_delay: config.fetch_delay,
        max_value_bytes: config.max_value_bytes,
        max_clock_offset_ms: config.max_clock_offset_ms,
        removal_timeout: config.removal_timeout,
    };
    let maintenance_interval = (config.tombstone_grace / 10).clamp(Duration::from_millis(100), Duration::from_secs(60));
    let (resolver, collisions) = Resolver::new();
    let replication = Arc::new(Replication::new(
        store.clone(),
        writer.clone(),
        cluster.clone(),
        stats.clone(),
        sync_config,
        resolver.clone(),
    ));
    let voting = Voting {
        resolver,
        store: store.clone(),
        writer: writer.clone(),
        cluster: cluster.clone(),
        pusher: pusher.clone(),
        stats: stats.clone(),
    };
    // Ends every change feed wait and stream first when the node stops.
    let (feed_trigger, feed_shutdown) = shutdown::channel();
    let feed_shutdown_snapshots = feed_shutdown.clone();
    let feed =
        Arc::new(crate::changes_api::Feed::new(config.max_watchers, config.changes_stall_timeout, feed_shutdown));
    let app_acl = config.management_token.as_ref().map(|t| Arc::new(crate::acl::Acl::new(store.clone(), &t.0)));
    let metrics = Metrics::new(NodeCollector {
        store: store.clone(),
        cluster: cluster.clone(),
        stats: stats.clone(),
        pusher: pusher.clone(),
        acl: app_acl.clone(),
        feed: feed.clone(),
    });
    let app = Arc::new(App {
        config,
        store: store.clone(),
        writer,
        cluster: cluster.clone(),
        pusher,
        replication: replication.clone(),
        metrics,
        started: Instant::now(),
        acl: app_acl,
        tls: tls.clone(),
        feed,
        snapshots: crate::snapshot::Snapshots::new(feed_shutdown_snapshots),
    });
    let (trigger, shutdown) = shutdown::channel();
    // The server and the pusher stop first, in that order (see the stop order below).
    let (server_trigger, server_shutdown) = shutdown::channel();
    let (push_trigger, push_shutdown) = shutdown::channel();
    let (fatal_tx, mut fatal) = mpsc::channel::<NodeError>(1);
    let server = tokio::spawn(server::serve(listener, app.clone(), server_shutdown));
    tracing::info!(addr = %local, "listening");

    let mut tasks = tokio::task::JoinSet::new();
    tasks.spawn(cluster.clone().gossip_loop(shutdown.clone()));
    tasks.spawn(cluster.clone().clock_watch_loop(shutdown.clone()));
    let pushes = tokio::spawn(push::run(push_queue, cluster.clone(), stats, push_shutdown));
    tasks.spawn(resolve::run(collisions, voting, shutdown.clone()));
    tasks.spawn(replication.clone().sync_loop(shutdown.clone()));
    tasks.spawn(replication.clone().catchup_loop(shutdown.clone()));
    tasks.spawn(replication.clone().expiry_loop(shutdown.clone()));
    tasks.spawn(replication.maintenance_loop(shutdown.clone(), maintenance_interval));
    tasks.spawn(crate::changes_api::trim_loop(app.writer.clone(), app.config.changes_retention, shutdown.clone()));
    if let Some(reload) = embedding.reload {
        tasks.spawn(reload_on_hangup(app.clone(), reload, shutdown.clone()));
    }
    if let Some(on_serving) = embedding.on_serving {
        on_serving(app.clone());
    }
    // Storage is open and the port answers: tell systemd.
    notifier.send("READY=1\nSTATUS=serving");
    // The watchdog pings from its first poll: started after READY=1, so READY=1 is
    // always the first message systemd sees (it was a race on a busy machine).
    let fed = store.clone();
    let stall = app.config.storage_stall_timeout;
    tasks.spawn(notifier.clone().watchdog_loop(shutdown.clone(), move || fed.stalled(stall).is_none()));
    tasks.spawn(stall_watch(store.clone(), stall, shutdown.clone()));
    let join_shutdown = shutdown.clone();
    let join_cluster = cluster.clone();
    tasks.spawn(async move {
        if let Err(refused) = join_cluster.join(join_shutdown).await {
            let _ = fatal_tx.send(NodeError::Refused(refused.0)).await;
        }
    });

    let stop = embedding.stop.unwrap_or_else(|| Box::pin(signal()));
    let failure = tokio::select! {
        _ = stop => None,
        reason = store.failed() => Some(NodeError::Storage(StoreError::Io(reason))),
        Some(e) = fatal.recv() => Some(e),
    };
    tracing::info!("shutting down");
    notifier.send("STOPPING=1\nSTATUS=shutting down");
    // Stop order: finish every client request (so every acknowledged write is queued
    // for push), hand the queued pushes to the alive peers (bounded by the drain
    // time), say goodbye, then stop the background tasks.
    // Change feed waits answer at once and streams end, so the server's drain does not
    // wait out a 300 s long-poll.
    feed_trigger.trigger();
    server_trigger.trigger();
    let _ = server.await;
    push_trigger.trigger();
    let _ = pushes.await;
    if failure.is_none() {
        cluster.announce_leave().await;
    }
    trigger.trigger();
    // Tasks waiting on a stuck writer never see the shutdown: after a while, they go.
    let joined = tokio::time::timeout(TASKS_TIMEOUT, async { while tasks.join_next().await.is_some() {} }).await;
    if joined.is_err() {
        tracing::warn!(left = tasks.len(), "background tasks did not stop in time; cancelling them");
        tasks.abort_all();
    }
    failure.map_or(Ok(()), Err)
}

/// Raises the soft open-file limit to `wanted` (up to the hard limit); warns when the
/// node gets less, since connections past it are refused at accept.
fn raise_file_limit(wanted: usize) {
    match rlimit::increase_nofile_limit(wanted as u64) {
        Ok(got) if got < wanted as u64 => tracing::warn!(
            limit = got,
            wanted,
            "the open-file limit is below what the connection cap (1024 + max_watchers) needs; \
             raise it (systemd: LimitNOFILE) or lower max_watchers"
        ),
        Ok(_) => {}
        Err(e) => tracing::warn!(error = %e, "cannot read or raise the open-file limit"),
    }
}

/// On SIGHUP: re-reads the config, applies `log_level` (or `KVS_LOG_LEVEL`) and re-reads
/// the TLS files (their contents; the paths are the ones the node started with).
/// Other keys take effect at the next restart; a bad config (a TLS file that does not
/// load included) is logged and changes nothing.
async fn reload_on_hangup(app: Arc<App>, (path, set_level): (PathBuf, SetLogLevel), mut shutdown: Shutdown) {
    use tokio::signal::unix::{SignalKind, signal};
    let Ok(mut hup) = signal(SignalKind::hangup()) else {
        tracing::warn!("cannot install the SIGHUP handler; log_level reload disabled");
        return;
    };
    loop {
        tokio::select! {
            r = hup.recv() => if r.is_none() { return },
            _ = shutdown.wait() => return,
        }
        let reloaded = Config::load(&path).map_err(|e| e.to_string()).and_then(|c| {
            let level = crate::config::effective_log_level(c.log_level)?;
            Ok((c, level))
        });
        match reloaded {
            Ok((c, level)) => {
                set_level(level);
                tracing::info!(log_level = level.as_str(), "SIGHUP: log_level reloaded");
                if let Some(tls) = &app.tls {
                    match tls.reload() {
                        Ok(()) => tracing::info!("SIGHUP: TLS certificates reloaded; new connections use them"),
                        Err(e) => {
                            tracing::error!(error = %e, "SIGHUP: TLS certificates not reloaded; the old ones stay")
                        }
                    }
                }
                let mut now = c;
                now.log_level = app.config.log_level;
                if format!("{now:?}") != format!("{:?}", app.config) {
                    tracing::warn!("SIGHUP: the config has other changes; they take effect after a restart");
                }
            }
            Err(e) => tracing::error!(error = %e, "SIGHUP: config not reloaded"),
        }
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
