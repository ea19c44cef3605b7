//! Pull-side replication and the node's freshness, one file per job:
//!
//! - `inbound`: the one door every replicated record passes (checks, floors, ceiling).
//! - `round`: regular anti-entropy sync with one random peer every `sync_interval`.
//! - `catchup`: pull the writes since our newest from the peer that is ahead.
//! - `bootstrap`: fill a new (or re-bootstrapping) node from any serving peer.
//! - `maintenance`: tombstone purge by confirmation, last contact, the stale rule.
//! - [`freshness`]: whether this node's data can be served; a plain type, no I/O.
//!
//! Push of fresh writes is [`crate::push`]; the server half of every route is
//! [`crate::internal`]; the calls go through [`crate::protocol::PeerClient`].

mod bootstrap;
mod catchup;
pub mod freshness;
mod inbound;
mod maintenance;
mod round;

pub use catchup::CATCHUP_LAG_MS;

use crate::antientropy::{self, FANOUT, LEAVES};
use crate::clock::now_ms;
use crate::cluster::Cluster;
use crate::hlc;
use crate::protocol::{self, LogThrottle, PeerError};
use crate::purge;
use crate::record::Record;
use crate::resolve::Resolver;
use crate::shutdown::Shutdown;
use crate::stats::Stats;
use crate::storage::{ApplyReport, Store, StoreError, Writer, blocking};
use crate::wire;
use bytes::Bytes;
use rand::seq::IndexedRandom;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// Records per page of catch-up and bootstrap. 5,000 rather than 1,000 doubled
/// bootstrap speed (fewer round trips and fsyncs; BENCHMARKS.md).
pub const PAGE: usize = 5_000;
/// Records per fetch request.
const FETCH_CHUNK: usize = 5_000;
/// Timeout of one data call to a peer.
pub const DATA_TIMEOUT: Duration = Duration::from_secs(30);

/// Meta key set once a bootstrap completed (tools that build data dirs set it too).
pub const META_BOOTSTRAPPED: &str = "bootstrapped";
/// The `bootstrapped` mark of a data dir restored from a snapshot
/// ([`crate::snapshot`]): bootstrap (with seeds) before serving anything.
pub const RESTORED: &[u8] = b"restored";
/// When the snapshot a data dir was restored from was taken (Unix ms): its bootstrap
/// reaches back at least that far.
pub const META_SNAPSHOT_TAKEN: &str = "snapshot_taken";
/// When this node last had the cluster's data (see `freshness`).
pub const META_LAST_CONTACT: &str = "last_contact";

/// Timing and limits of replication, from the config.
#[derive(Debug, Clone)]
pub struct SyncConfig {
    /// Pause between regular syncs.
    pub sync_interval: Duration,
    /// Pause between catch-up checks.
    pub catchup_interval: Duration,
    /// How long tombstones are kept.
    pub tombstone_grace: Duration,
    /// How far back bootstrap fetches.
    pub bootstrap_max_age: Duration,
    /// Pause before each bootstrap page request.
    pub throttle_delay: Duration,
    /// Pause before each bootstrap fetch.
    pub fetch_delay: Duration,
    /// Largest value accepted from a peer.
    pub max_value_bytes: u64,
    /// How far ahead of this node's wall clock a peer's timestamp may be.
    pub max_clock_offset_ms: u64,
    /// Silence after which a member is removed: a node purges nothing until it has
    /// been up this long, so it knows every member that is not removed.
    pub removal_timeout: Duration,
}

/// Replication state shared by the sync tasks and the internal endpoints.
pub struct Replication {
    store: Store,
    writer: Writer,
    cluster: Arc<Cluster>,
    stats: Arc<Stats>,
    config: SyncConfig,
    /// Newest timestamp held when this process started: the first catch-up pulls
    /// everything after it.
    newest_at_start: u64,
    last_persisted_contact: AtomicU64,
    resolver: Arc<Resolver>,
    /// When this process started.
    started: std::time::Instant,
    /// Repeated warnings about peers' records, at most one a minute per kind.
    throttle: LogThrottle,
    /// The peer client that counts its bytes into `sync_bytes` (sync rounds, fetches,
    /// sends).
    sync_client: protocol::PeerClient,
    /// The data dir was restored from a snapshot and has not bootstrapped since.
    restored: bool,
}

/// Why a sync step failed.
#[derive(Debug)]
pub enum SyncError {
    /// The peer failed or answered nonsense.
    Peer(PeerError),
    /// Local storage failed.
    Store(StoreError),
}

impl std::fmt::Display for SyncError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            SyncError::Peer(e) => write!(f, "peer: {e}"),
            SyncError::Store(e) => write!(f, "{e}"),
        }
    }
}

impl From<PeerError> for SyncError {
    fn from(e: PeerError) -> Self {
        SyncError::Peer(e)
    }
}

impl From<StoreError> for SyncError {
    fn from(e: StoreError) -> Self {
        SyncError::Store(e)
    }
}

fn protocol(e: impl std::fmt::Display) -> SyncError {
    SyncError::Peer(PeerError::Protocol(e.to_string()))
}

pub use crate::protocol::{decode_hashes, encode_hashes};

/// Sleeps for `d`, or returns false at once on shutdown.
async fn pause(d: Duration, shutdown: &mut Shutdown) -> bool {
    tokio::select! {
        _ = tokio::time::sleep(d) => true,
        _ = shutdown.wait() => false,
    }
}
impl Replication {
    /// Replication for a node; the cluster's freshness says whether it must bootstrap
    /// first.
    pub fn new(
        store: Store,
        writer: Writer,
        cluster: Arc<Cluster>,
        stats: Arc<Stats>,
        config: SyncConfig,
        resolver: Arc<Resolver>,
    ) -> Replication {
        let newest_at_start = store.newest_timestamp();
        let last = cluster.last_contact();
        let restored = store.meta(META_BOOTSTRAPPED).ok().flatten().as_deref() == Some(RESTORED);
        let sync_client = {
            let stats = stats.clone();
            cluster.client().metered(move |n| stats.sync_bytes.add(n))
        };
        Replication {
            store,
            writer,
            cluster,
            stats,
            config,
            newest_at_start,
            last_persisted_contact: AtomicU64::new(last),
            resolver,
            started: std::time::Instant::now(),
            throttle: LogThrottle::default(),
            sync_client,
            restored,
        }
    }

    /// Whether this node must bootstrap: it has seeds and never completed one, or it
    /// was re-bootstrapping (after a stale discard) when it stopped.
    pub fn bootstrap_pending(store: &Store, has_seeds: bool) -> Result<bool, StoreError> {
        Ok(match store.meta(META_BOOTSTRAPPED)?.as_deref() {
            Some(b"1") => false,
            // Restored from a snapshot: merge with the cluster first, if there is one.
            Some(RESTORED) => has_seeds,
            // A re-bootstrap that was under way: resume it, seeds or not.
            Some(_) => true,
            None => has_seeds,
        })
    }

    /// The persisted time of the last contact with the cluster (0: never).
    pub fn persisted_last_contact(store: &Store) -> Result<u64, StoreError> {
        Ok(store.meta(META_LAST_CONTACT)?.as_deref().and_then(|b| b.try_into().ok()).map_or(0, u64::from_be_bytes))
    }

    /// Bootstrapping a data dir restored from a snapshot: it holds data known to be
    /// old, so client reads are refused too (503) until the merge is done.
    pub fn restoring(&self) -> bool {
        self.restored && self.is_syncing()
    }

    /// True while bootstrapping: client writes are refused with 503.
    pub fn is_syncing(&self) -> bool {
        self.cluster.is_syncing()
    }

    /// The replication counters.
    pub fn stats(&self) -> &Stats {
        &self.stats
    }

    /// Bootstrap progress for `/health`.
    pub fn bootstrap_progress(&self) -> serde_json::Value {
        serde_json::json!({
            "fetched": self.stats.bootstrap_fetched.get(),
            "reached_back_to": self.stats.bootstrap_reached.load(Ordering::Relaxed),
        })
    }

    /// How far before a completed sync's start `last_contact` is set: a delete made
    /// just before may not have reached that peer yet. Two sync intervals (at least a
    /// second), never more than a quarter of the grace period.
    fn contact_margin(&self) -> u64 {
        let two_rounds = (self.config.sync_interval * 2).max(Duration::from_secs(1));
        two_rounds.min(self.config.tombstone_grace / 4).as_millis() as u64
    }

    /// The newest timestamp taken from a peer now: anything later is from beyond the
    /// clock bound and held back.
    fn future_ceiling(&self) -> u64 {
        hlc::Hlc::new(self.config.max_clock_offset_ms).ceiling(now_ms())
    }

    /// The newest tombstone a peer may ask about in a purge check: past the grace
    /// period by a clock up to 2.5 bounds ahead of ours.
    pub fn purge_check_limit(&self) -> u64 {
        let grace = self.config.tombstone_grace.as_millis() as u64;
        hlc::Hlc::new(self.config.max_clock_offset_ms).ceiling(now_ms().saturating_sub(grace))
    }

    /// Tombstones older than this (a timestamp) are purged (and not taken from peers).
    pub fn tombstone_floor(&self) -> u64 {
        hlc::from_ms(now_ms().saturating_sub(self.config.tombstone_grace.as_millis() as u64))
    }

    /// Can this node hand out its records (serve sync, start sync)? Not while
    /// bootstrapping, and not before it knows it is not stale.
    pub fn ready(&self) -> bool {
        self.cluster.serving()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_re_bootstrap_under_way_resumes_at_restart_with_or_without_seeds() {
        let dir = tempfile::tempdir().unwrap();
        let (store, writer) = Store::open(dir.path(), crate::config::Durability::Buffer, 500).unwrap();
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        assert!(Replication::bootstrap_pending(&store, true).unwrap(), "new, with seeds: bootstrap");
        assert!(!Replication::bootstrap_pending(&store, false).unwrap(), "new, alone: founds");
        rt.block_on(writer.set_meta(META_BOOTSTRAPPED, Bytes::from_static(b"1"))).unwrap();
        assert!(!Replication::bootstrap_pending(&store, true).unwrap());
        // What a stale discard records before it removes anything.
        rt.block_on(writer.set_meta(META_BOOTSTRAPPED, Bytes::from_static(b"0"))).unwrap();
        assert!(Replication::bootstrap_pending(&store, true).unwrap());
        assert!(Replication::bootstrap_pending(&store, false).unwrap(), "killed mid re-bootstrap: resume it");
        writer.close(&store).unwrap();
    }
}
