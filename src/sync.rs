//! Pull-side replication: regular anti-entropy sync, catch-up, bootstrap, and the
//! maintenance that keeps deletes from coming back.
//!
//! - **Regular sync** (every `sync_interval`, one random alive peer): compare the hash
//!   summaries level by level ([`crate::antientropy`]), then fetch what the peer has
//!   newer and send what we have newer. Heals any divergence, however old.
//! - **Catch-up**: right after start, pull every write since our newest from the peer
//!   with the newest data; later, whenever a peer's newest write (gossiped) is more
//!   than [`CATCHUP_LAG_MS`] ahead of ours, pull again.
//! - **Bootstrap**: a node with seeds and no completed bootstrap (new, or one that had
//!   to discard stale records) is in mode `syncing` (client writes get 503): it lists
//!   a serving peer's versions newest-first in pages back to `bootstrap_max_age_hours`
//!   (all the way back after a stale discard), fetches those it lacks from a serving
//!   peer, pausing `throttle_delay_ms` before each page and `fetch_delay_ms` before each
//!   fetch, then switches to `normal`. Older data arrives by regular sync.
//! - **Maintenance**: purges tombstones past `tombstone_grace_hours` that every member
//!   confirmed ([`crate::purge`]), persists the time of the last contact with the
//!   cluster, and, when a peer's format-1 purge horizon is past that time, discards
//!   the records it had synced and bootstraps again (the stale rule in
//!   [`crate::antientropy`]).
//!
//! Node-to-node endpoints (README "Internal endpoints"): `POST /internal/v2/push`,
//! `GET /internal/v2/sync/level1`, `POST /internal/v2/sync/leaves`, `POST
//! /internal/v2/sync/versions`, `POST /internal/v2/sync/fetch`, `GET /internal/v2/since`, `GET
//! /internal/v2/newest`, `POST /internal/v2/purge/check`.

use crate::antientropy::{self, FANOUT, LEAVES, Version};
use crate::clock::now_ms;
use crate::cluster::Cluster;
use crate::hlc;
use crate::protocol::{self, LogThrottle, PeerError, routes};
use crate::purge;
use crate::record::Record;
use crate::resolve::Resolver;
use crate::shutdown::Shutdown;
use crate::stats::Stats;
use crate::storage::{ApplyReport, Store, StoreError, Writer, blocking};
use crate::wire;
use bytes::Bytes;
use hyper::Method;
use rand::seq::IndexedRandom;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// A peer whose newest write is this far ahead of ours triggers a catch-up.
pub const CATCHUP_LAG_MS: u64 = 1_000;
/// Records per page of catch-up and bootstrap. 5,000 rather than 1,000 doubled
/// bootstrap speed (fewer round trips and fsyncs; BENCHMARKS.md).
pub const PAGE: usize = 5_000;
/// Records per fetch request.
const FETCH_CHUNK: usize = 5_000;
/// Leaves per version-listing request of a sync round.
const LEAF_CHUNK: usize = 1_024;
/// Timeout of one data call to a peer.
pub const DATA_TIMEOUT: Duration = Duration::from_secs(30);
/// Records removed per writer batch when discarding.
const REMOVE_CHUNK: usize = 10_000;
/// Tombstones asked about and purged per maintenance round (each member answers a
/// list this long).
const PURGE_BATCH: usize = 1_000;
/// Timeout of one purge check: a member that does not answer in time holds the
/// round back.
const PURGE_CHECK_TIMEOUT: Duration = Duration::from_secs(10);

/// Meta key set once a bootstrap completed (tools that build data dirs set it too).
pub const META_BOOTSTRAPPED: &str = "bootstrapped";
const META_LAST_CONTACT: &str = "last_contact";

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

/// Decodes a body of big-endian u64 hashes.
pub fn decode_hashes(b: &[u8]) -> Result<Vec<u64>, String> {
    if !b.len().is_multiple_of(8) {
        return Err("hash list length is not a multiple of 8".into());
    }
    Ok(b.chunks_exact(8).map(|c| u64::from_be_bytes(c.try_into().unwrap_or_default())).collect())
}

/// Encodes hashes as big-endian u64s.
pub fn encode_hashes(h: &[u64]) -> Bytes {
    Bytes::from(h.iter().flat_map(|x| x.to_be_bytes()).collect::<Vec<u8>>())
}

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
        }
    }

    /// Whether this node must bootstrap: it has seeds and never completed one, or it
    /// was re-bootstrapping (after a stale discard) when it stopped.
    pub fn bootstrap_pending(store: &Store, has_seeds: bool) -> Result<bool, StoreError> {
        Ok(match store.meta(META_BOOTSTRAPPED)?.as_deref() {
            Some(b"1") => false,
            // A re-bootstrap that was under way: resume it, seeds or not.
            Some(_) => true,
            None => has_seeds,
        })
    }

    /// The persisted time of the last contact with the cluster (0: never).
    pub fn persisted_last_contact(store: &Store) -> Result<u64, StoreError> {
        Ok(store.meta(META_LAST_CONTACT)?.as_deref().and_then(|b| b.try_into().ok()).map_or(0, u64::from_be_bytes))
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

    /// Applies records received from a peer whose `last_contact` is `sender_contact`
    /// (`None`: unknown), and counts them. A sender that is stale relative to our purge
    /// horizon may hold records whose deletes we purged: its records at or below the
    /// horizon are not taken for paths we do not hold.
    pub async fn apply(
        &self,
        records: Vec<(String, Record)>,
        sender_contact: Option<u64>,
    ) -> Result<ApplyReport, StoreError> {
        let n = records.len() as u64;
        let absent_floor =
            sender_contact.and_then(|lc| antientropy::stale_below(lc, self.store.gc_horizon())).unwrap_or(0);
        if absent_floor > 0 {
            tracing::debug!(
                sender_contact,
                absent_floor,
                "records from a stale node: old records for unknown paths refused"
            );
        }
        let mut report = self.writer.apply(records, self.tombstone_floor(), absent_floor).await?;
        self.stats.received.add(n);
        self.stats.applied.add(report.applied as u64);
        self.stats.skipped.add(report.skipped as u64);
        if report.reawakened > 0 {
            self.stats.reawakened.add(report.reawakened as u64);
            tracing::info!(
                records = report.reawakened,
                "refused records whose deletes were purged here; the deletes are live again"
            );
        }
        if report.future > 0 {
            self.stats.future_records.add(report.future as u64);
        }
        if report.future > 0 && self.throttle.allow("future") {
            tracing::warn!(
                records = report.future,
                furthest_ahead_ms = hlc::ms(report.future_max).saturating_sub(now_ms()),
                "held back records from more than max_clock_offset_ms in the future: not stored until this node's clock reaches them"
            );
        }
        if !report.collisions.is_empty() {
            self.stats.collisions.add(report.collisions.len() as u64);
            self.resolver.report(std::mem::take(&mut report.collisions));
        }
        Ok(report)
    }

    /// Decodes a record batch from `peer` (off the async workers) and applies what
    /// passes the checks; records that fail are skipped, counted and logged (one line
    /// a minute per peer), and never stop the rest. `Err` only for a batch whose
    /// framing is broken, or for storage trouble.
    pub async fn take_batch(
        &self,
        peer: &str,
        batch: Bytes,
        sender_contact: Option<u64>,
    ) -> Result<(ApplyReport, wire::Decoded), SyncError> {
        let mut decoded = wire::decode_off_thread(batch, self.config.max_value_bytes).await.map_err(protocol)?;
        self.note_refused(peer, &decoded.refused);
        let report = self.apply(std::mem::take(&mut decoded.records), sender_contact).await?;
        Ok((report, decoded))
    }

    /// Counts and logs records refused from `peer`.
    pub fn note_refused(&self, peer: &str, refused: &[(String, String)]) {
        if refused.is_empty() {
            return;
        }
        self.stats.refused_records.add(refused.len() as u64);
        if self.throttle.allow(&format!("refused {peer}")) {
            let (path, reason) = &refused[0];
            tracing::warn!(
                peer,
                refused = refused.len(),
                first_path = %path,
                first_reason = %reason,
                "skipped records from a peer that fail this node's checks (the rest of the batch is taken)"
            );
        }
    }

    /// Fetches records and stores them; returns how many the peer sent. The peer
    /// answers at most [`protocol::MAX_BATCH_BYTES`] at a time and says how many of
    /// the paths it covered; the rest are asked for again.
    async fn fetch_and_store(&self, peer: &str, mut paths: &[String]) -> Result<usize, SyncError> {
        let mut total = 0;
        while !paths.is_empty() {
            let body = Bytes::from(serde_json::to_vec(paths).map_err(protocol)?);
            self.stats.sync_bytes.add(body.len() as u64);
            let lc = self.cluster.last_contact();
            let answer =
                self.cluster.client().exchange(Method::POST, peer, routes::FETCH, body, DATA_TIMEOUT, lc).await?;
            self.stats.sync_bytes.add(answer.body.len() as u64);
            // A peer that does not say (an earlier build) answered every path.
            let covered = answer.covered.unwrap_or(paths.len());
            if covered == 0 || covered > paths.len() {
                return Err(protocol(format!("fetch answer covers {covered} of {} paths", paths.len())));
            }
            let (_, decoded) = self.take_batch(peer, answer.body, answer.last_contact).await?;
            total += decoded.framed;
            paths = &paths[covered..];
        }
        Ok(total)
    }

    /// Sends the records of `paths` to `peer` as pushes of at most
    /// [`protocol::MAX_BATCH_BYTES`] each, read from storage one batch at a time.
    async fn send_records(&self, peer: &str, paths: Vec<String>) -> Result<usize, SyncError> {
        let (mut sent, mut from) = (0, 0);
        let paths = Arc::new(paths);
        while from < paths.len() {
            let (store, all) = (self.store.clone(), paths.clone());
            let (records, covered) =
                blocking(move || store.records_within(&all[from..], protocol::MAX_BATCH_BYTES)).await?;
            from += covered.max(1);
            if records.is_empty() {
                continue;
            }
            let body = wire::encode(records.iter().map(|(p, r)| (p.as_str(), r)));
            self.stats.sync_bytes.add(body.len() as u64);
            let lc = self.cluster.last_contact();
            self.cluster.client().exchange(Method::POST, peer, routes::PUSH, body, DATA_TIMEOUT, lc).await?;
            sent += records.len();
        }
        Ok(sent)
    }

    /// One regular sync round with `peer`; returns (fetched, sent).
    pub async fn sync_with(&self, peer: &str) -> Result<(usize, usize), SyncError> {
        let client = self.cluster.client();
        let theirs = client.fetch(Method::GET, peer, routes::LEVEL1, Bytes::new(), DATA_TIMEOUT).await?;
        self.stats.sync_bytes.add(theirs.len() as u64);
        let tops = antientropy::differing(&self.store.level1(), &decode_hashes(&theirs).map_err(protocol)?);
        if tops.is_empty() {
            return Ok((0, 0));
        }
        let body = Bytes::from(serde_json::to_vec(&tops).map_err(protocol)?);
        self.stats.sync_bytes.add(body.len() as u64);
        let theirs = client.post_bytes(peer, routes::LEAVES, body, DATA_TIMEOUT).await?;
        self.stats.sync_bytes.add(theirs.len() as u64);
        let per = LEAVES / FANOUT;
        let theirs = decode_hashes(&theirs).map_err(protocol)?;
        if theirs.len() != tops.len() * per {
            return Err(protocol("wrong number of leaf hashes"));
        }
        let mine = self.store.leaves_under(&tops);
        let leaves: Vec<u16> = antientropy::differing(&mine, &theirs)
            .into_iter()
            .map(|i| (tops[i / per] * per + i % per) as u16)
            .collect();
        let (mut fetched, mut sent) = (0, 0);
        for chunk in leaves.chunks(LEAF_CHUNK) {
            let body = Bytes::from(serde_json::to_vec(chunk).map_err(protocol)?);
            self.stats.sync_bytes.add(body.len() as u64);
            let answer = client.post_bytes(peer, routes::VERSIONS, body, DATA_TIMEOUT).await?;
            self.stats.sync_bytes.add(answer.len() as u64);
            let theirs: Vec<Version> = serde_json::from_slice(&answer).map_err(protocol)?;
            let store = self.store.clone();
            let chunk = chunk.to_vec();
            let mine = blocking(move || store.versions_in_leaves(&chunk)).await?;
            let plan = antientropy::plan(&mine, &theirs, self.tombstone_floor(), self.future_ceiling());
            if plan.held_back > 0 {
                self.stats.future_records.add(plan.held_back as u64);
                tracing::debug!(
                    peer,
                    versions = plan.held_back,
                    "sync: held back versions from beyond the clock bound"
                );
            }
            // Collisions are fetched too: applying them reports them to conflict handling.
            let wanted: Vec<String> = plan.fetch.into_iter().chain(plan.collisions).collect();
            for paths in wanted.chunks(FETCH_CHUNK) {
                fetched += self.fetch_and_store(peer, paths).await?;
            }
            for paths in plan.send.chunks(FETCH_CHUNK) {
                sent += self.send_records(peer, paths.to_vec()).await?;
            }
        }
        Ok((fetched, sent))
    }

    /// Can this node hand out its records (serve sync, start sync)? Not while
    /// bootstrapping, and not before it knows it is not stale.
    pub fn ready(&self) -> bool {
        self.cluster.serving()
    }

    /// Regular anti-entropy sync with one random alive peer every `sync_interval`.
    pub async fn sync_loop(self: Arc<Self>, mut shutdown: Shutdown) {
        while pause(self.config.sync_interval, &mut shutdown).await {
            if !self.ready() {
                continue;
            }
            let peer = self.cluster.alive_peers().choose(&mut rand::rng()).cloned();
            let Some(peer) = peer else { continue };
            let started = std::time::Instant::now();
            let started_wall = now_ms();
            match self.sync_with(&peer.address).await {
                Ok((fetched, sent)) => {
                    self.cluster.note_synced(hlc::from_ms(started_wall.saturating_sub(self.contact_margin())));
                    // Persisted before the round is counted: a node killed after a
                    // counted round remembers it.
                    if let Err(e) = self.persist_contact(false).await {
                        tracing::error!(error = %e, "cannot persist last_contact");
                    }
                    if fetched + sent > 0 {
                        self.stats.last_repair_ms.store(started.elapsed().as_millis() as u64, Ordering::Relaxed);
                    }
                    self.stats.sync_ok.add(1);
                    self.stats.sync_fetched.add(fetched as u64);
                    self.stats.sync_sent.add(sent as u64);
                    if fetched + sent > 0 {
                        tracing::info!(peer = %peer.id, fetched, sent, "sync repaired divergence");
                    } else {
                        tracing::debug!(peer = %peer.id, "sync: in sync");
                    }
                }
                Err(e) => {
                    self.stats.sync_failed.add(1);
                    tracing::warn!(peer = %peer.id, error = %e, "sync failed");
                }
            }
        }
    }

    /// Pulls every write with a timestamp after `since` from `peer`, page by page;
    /// returns the count.
    async fn catch_up_from(&self, peer: &str, since: u64, shutdown: &Shutdown) -> Result<usize, SyncError> {
        // (since + 1, "") excludes nothing at since + 1: no path is empty.
        let mut cursor = (since.saturating_add(1), String::new());
        let mut total = 0;
        loop {
            let q = format!(
                "{}?after_ts={}&after_path={}&limit={PAGE}",
                routes::SINCE,
                cursor.0,
                crate::path::percent_encode(&cursor.1)
            );
            let lc = self.cluster.last_contact();
            let answer = self.cluster.client().exchange(Method::GET, peer, &q, Bytes::new(), DATA_TIMEOUT, lc).await?;
            let more = answer.more;
            let (_, decoded) = self.take_batch(peer, answer.body, answer.last_contact).await?;
            let n = decoded.framed;
            if let Some(last) = decoded.last {
                cursor = last;
            }
            total += n;
            self.stats.catchup_records.add(n as u64);
            // A page cut short by bytes says so; a peer that does not say (an earlier
            // build) has more only after a full page.
            if n == 0 || !more.unwrap_or(n >= PAGE) || shutdown.is_triggered() {
                return Ok(total);
            }
        }
    }

    /// Catch-up: once after start (everything since our newest at start), then
    /// whenever a peer is more than [`CATCHUP_LAG_MS`] ahead.
    pub async fn catchup_loop(self: Arc<Self>, mut shutdown: Shutdown) {
        let mut first = true;
        loop {
            let wait = if first { Duration::from_millis(100) } else { self.config.catchup_interval };
            if !pause(wait, &mut shutdown).await {
                return;
            }
            if !self.ready() {
                continue;
            }
            let peers = self.cluster.alive_peers();
            // A newest write from beyond the clock bound would be held back anyway, and a
            // forged one would start a catch-up every interval.
            let ceiling = self.future_ceiling();
            let Some(best) = peers.iter().filter(|p| p.newest_write <= ceiling).max_by_key(|p| p.newest_write) else {
                continue;
            };
            let mine = self.store.newest_timestamp();
            let since = if first {
                self.newest_at_start
            } else if hlc::ms(best.newest_write) > hlc::ms(mine).saturating_add(CATCHUP_LAG_MS) {
                mine
            } else {
                continue;
            };
            tracing::info!(peer = %best.id, since, peer_newest = best.newest_write, first, "catch-up: pulling writes");
            match self.catch_up_from(&best.address, since, &shutdown).await {
                Ok(n) => {
                    first = false;
                    self.stats.catchup_ok.add(1);
                    tracing::info!(peer = %best.id, records = n, "catch-up: done");
                }
                Err(e) => tracing::warn!(peer = %best.id, error = %e, "catch-up failed; will retry"),
            }
        }
    }

    /// Fetches a peer's versions newest-first back to `bootstrap_max_age`, taking those
    /// this node lacks; then marks bootstrap done and switches to `normal`. Listing the
    /// next page overlaps with fetching and storing the previous one.
    pub async fn bootstrap(&self, shutdown: &mut Shutdown) -> Result<(), StoreError> {
        self.bootstrap_back_to(shutdown, u64::MAX).await
    }

    /// [`Self::bootstrap`], reaching back at least to `reach_back` (a timestamp): a
    /// re-bootstrap after a stale discard must fetch again everything it discarded,
    /// however old.
    async fn bootstrap_back_to(&self, shutdown: &mut Shutdown, reach_back: u64) -> Result<(), StoreError> {
        self.cluster.start_bootstrap();
        let started = now_ms();
        let min_ts =
            hlc::from_ms(started.saturating_sub(self.config.bootstrap_max_age.as_millis() as u64)).min(reach_back);
        let mut cursor: Option<(u64, String)> = None;
        // Paths listed but not yet fetched. They are fetched from whichever serving peer
        // this round picked, not only from the one that listed them: a peer that fails
        // (or dies) mid-bootstrap must not pin the node in mode `syncing`.
        let mut pending: Option<Vec<String>> = None;
        let mut last_page = false;
        tracing::info!(min_ts, "bootstrap: started");
        while !(last_page && pending.is_none()) {
            if !pause(self.config.throttle_delay, shutdown).await {
                return Ok(());
            }
            let alive = self.cluster.alive_peers();
            let serving: Vec<_> = alive.iter().filter(|p| !p.syncing).collect();
            let Some(peer) = serving.choose(&mut rand::rng()).map(|p| (*p).clone()) else {
                if cursor.is_none() && pending.is_none() && crate::membership::should_found(&self.cluster.me(), &alive)
                {
                    tracing::info!(
                        peers = alive.len(),
                        "bootstrap: every peer is new too; this node, the oldest, founds the cluster"
                    );
                    break;
                }
                // Not joined yet, every peer is down, or all are bootstrapping: wait.
                if !pause(Duration::from_millis(200), shutdown).await {
                    return Ok(());
                }
                continue;
            };
            let list = async {
                if last_page {
                    Ok(None)
                } else {
                    self.list_page(&peer.address, cursor.as_ref(), min_ts).await.map(Some)
                }
            };
            let mut fetch_shutdown = shutdown.clone();
            let fetch = async {
                match &pending {
                    Some(paths) => self.fetch_and_apply(&peer.address, paths, &mut fetch_shutdown).await,
                    None => Ok(()),
                }
            };
            let (listed, fetched) = tokio::join!(list, fetch);
            match fetched {
                Ok(()) => pending = None,
                Err(SyncError::Store(e)) => return Err(e),
                Err(SyncError::Peer(e)) => {
                    tracing::warn!(peer = %peer.id, error = %e, "bootstrap fetch failed; retrying with any serving peer")
                }
            }
            match listed {
                Ok(Some((lacking, next, short))) => {
                    if let Some(next) = next {
                        cursor = Some(next);
                    }
                    last_page = short;
                    match &mut pending {
                        Some(paths) => paths.extend(lacking),
                        None => pending = Some(lacking),
                    }
                }
                Ok(None) => {}
                Err(SyncError::Store(e)) => return Err(e),
                Err(SyncError::Peer(e)) => {
                    tracing::warn!(peer = %peer.id, error = %e, "bootstrap page failed; retrying")
                }
            }
            if shutdown.is_triggered() {
                return Ok(());
            }
        }
        if !self.copy_certificates(shutdown).await? {
            return Ok(());
        }
        self.writer.set_meta(META_BOOTSTRAPPED, Bytes::from_static(b"1")).await?;
        self.cluster.finish_bootstrap(hlc::from_ms(started.saturating_sub(self.contact_margin())));
        tracing::info!(
            fetched = self.stats.bootstrap_fetched.get(),
            reached_back_to = self.stats.bootstrap_reached.load(Ordering::Relaxed),
            "bootstrap: done; mode normal"
        );
        Ok(())
    }

    /// Copies a serving peer's certificates of purged deletes, page by page, moving on
    /// to another serving peer when one fails: a node that bootstraps after a purge
    /// must refuse the deleted value, as every member that certified it does, or a node
    /// returning with that value could bring the delete back through it. Returns false
    /// on shutdown.
    async fn copy_certificates(&self, shutdown: &mut Shutdown) -> Result<bool, StoreError> {
        let mut after = String::new();
        let mut copied = 0usize;
        loop {
            let alive = self.cluster.alive_peers();
            let serving: Vec<_> = alive.iter().filter(|p| !p.syncing).collect();
            let Some(peer) = serving.choose(&mut rand::rng()).map(|p| (*p).clone()) else {
                // This node founds the cluster: nobody purged anything yet.
                if crate::membership::should_found(&self.cluster.me(), &alive) {
                    return Ok(true);
                }
                // Every serving peer is gone for now: wait for one, as the fetches do.
                if !pause(Duration::from_millis(200), shutdown).await {
                    return Ok(false);
                }
                continue;
            };
            let q = format!("{}?after={}&limit={PAGE}", routes::CERTIFICATES, crate::path::percent_encode(&after));
            let page =
                match self.cluster.client().fetch(Method::GET, &peer.address, &q, Bytes::new(), DATA_TIMEOUT).await {
                    Ok(body) => serde_json::from_slice::<Vec<(String, u64, uuid::Uuid)>>(&body).map_err(protocol),
                    Err(e) => Err(SyncError::Peer(e)),
                };
            let page = match page {
                Ok(page) => page,
                Err(SyncError::Peer(PeerError::Status(hyper::StatusCode::NOT_FOUND, _))) => {
                    // An earlier build, without the route: it keeps no certificates to copy.
                    tracing::warn!(peer = %peer.id, "bootstrap: the peer cannot list certificates (an earlier kvs)");
                    return Ok(true);
                }
                Err(e) => {
                    tracing::warn!(peer = %peer.id, error = %e, "bootstrap: copying certificates failed; retrying with any serving peer");
                    if !pause(Duration::from_millis(200), shutdown).await {
                        return Ok(false);
                    }
                    continue;
                }
            };
            let last = page.len() < PAGE;
            if let Some((p, _, _)) = page.last() {
                after = p.clone();
            }
            // Only deletes past the grace period are purged; anything later is not a
            // certificate an honest peer keeps (one at the end of time would freeze the key).
            let limit = self.purge_check_limit();
            let take: Vec<_> =
                page.into_iter().filter(|(p, ts, _)| *ts <= limit && crate::path::validate_key(p).is_ok()).collect();
            copied += take.len();
            self.writer.certify(take).await?;
            if last {
                tracing::info!(copied, "bootstrap: certificates of purged deletes copied");
                return Ok(true);
            }
        }
    }

    /// Lists one page of a peer's versions below `cursor`: the paths this node lacks,
    /// the next cursor, and whether it was the last page.
    async fn list_page(
        &self,
        peer: &str,
        cursor: Option<&(u64, String)>,
        min_ts: u64,
    ) -> Result<(Vec<String>, Option<(u64, String)>, bool), SyncError> {
        let mut q = format!("{}?min_ts={min_ts}&limit={PAGE}", routes::NEWEST);
        if let Some((ts, p)) = cursor {
            q.push_str(&format!("&before_ts={ts}&before_path={}", crate::path::percent_encode(p)));
        }
        let answer = self.cluster.client().fetch(Method::GET, peer, &q, Bytes::new(), DATA_TIMEOUT).await?;
        let page: Vec<Version> = serde_json::from_slice(&answer).map_err(protocol)?;
        let next = page.last().map(|v| (v.timestamp, v.path.clone()));
        if let Some((ts, _)) = &next {
            self.stats.bootstrap_reached.store(*ts, Ordering::Relaxed);
            tracing::info!(fetched = self.stats.bootstrap_fetched.get(), reached_back_to = ts, "bootstrap: progress");
        }
        let short = page.len() < PAGE;
        let store = self.store.clone();
        let lacking = blocking(move || {
            let mut out = Vec::new();
            for v in page {
                if store.get(&v.path)?.is_none_or(|r| r.timestamp < v.timestamp) {
                    out.push(v.path);
                }
            }
            Ok(out)
        })
        .await?;
        Ok((lacking, next, short))
    }

    /// Fetches and stores records, pausing `fetch_delay` before each request.
    async fn fetch_and_apply(&self, peer: &str, paths: &[String], shutdown: &mut Shutdown) -> Result<(), SyncError> {
        for chunk in paths.chunks(FETCH_CHUNK) {
            if !pause(self.config.fetch_delay, shutdown).await {
                return Ok(());
            }
            let n = self.fetch_and_store(peer, chunk).await?;
            self.stats.bootstrap_fetched.add(n as u64);
        }
        Ok(())
    }

    /// Bootstraps if needed, then runs maintenance every `interval` until shutdown:
    /// purge expired tombstones, persist the last contact, and discard stale records
    /// (then bootstrap again) when a peer found this node stale.
    pub async fn maintenance_loop(self: Arc<Self>, mut shutdown: Shutdown, interval: Duration) {
        if self.is_syncing() {
            // A re-bootstrap cut short (the "0" mark) fetches all the way back, as the
            // one that was cut short would have.
            let store = self.store.clone();
            let resumed = blocking(move || store.meta(META_BOOTSTRAPPED)).await.ok().flatten();
            let reach_back = if resumed.as_deref() == Some(b"0") { 0 } else { u64::MAX };
            if let Err(e) = self.bootstrap_back_to(&mut shutdown, reach_back).await {
                tracing::error!(error = %e, "bootstrap failed");
                return;
            }
        }
        while pause(interval, &mut shutdown).await {
            if let Err(e) = self.maintain(&mut shutdown).await {
                tracing::error!(error = %e, "maintenance failed");
            }
        }
    }

    async fn maintain(&self, shutdown: &mut Shutdown) -> Result<(), StoreError> {
        if let Some(horizon) = self.cluster.stale_below() {
            self.cluster.start_bootstrap();
            // Persisted first: a node killed while discarding or re-bootstrapping
            // starts again in mode `syncing`, never `normal` with holes.
            self.writer.set_meta(META_BOOTSTRAPPED, Bytes::from_static(b"0")).await?;
            // Only what this node had synced (at or below its last contact, which the
            // stale rule put below the horizon) goes: the cluster holds it or something
            // newer. Its own writes since then stay and are sent.
            let up_to = self.cluster.last_contact();
            let mut discarded = 0;
            loop {
                let n = self.writer.discard(up_to, REMOVE_CHUNK).await?;
                discarded += n;
                if n == 0 {
                    break;
                }
            }
            self.stats.stale_discarded.add(discarded as u64);
            tracing::info!(horizon, up_to, discarded, "discarded records that may have missed a purged delete");
            self.cluster.clear_stale(horizon);
            self.persist_contact(true).await?;
            // Everything discarded is fetched again, not only bootstrap_max_age of it.
            return self.bootstrap_back_to(shutdown, 0).await;
        }
        // A node whose clock is off (or not yet judged) purges nothing: with a clock far
        // ahead every delete looks past the grace period to it.
        if self.cluster.clock_refusal().is_some() {
            return self.persist_contact(false).await;
        }
        self.purge_round().await?;
        self.persist_contact(false).await
    }

    /// One round of the purge protocol ([`crate::purge`]): tombstones past the grace
    /// period go once every member said it holds no older version; members that do are
    /// sent the tombstone.
    async fn purge_round(&self) -> Result<(), StoreError> {
        // Membership lives in memory: right after a start this node may not know every
        // member yet, and a purge must hear from all of them.
        if self.started.elapsed() < self.config.removal_timeout {
            return Ok(());
        }
        let floor = self.tombstone_floor();
        let store = self.store.clone();
        let candidates = blocking(move || store.expired_tombstones(floor, PURGE_BATCH)).await?;
        if candidates.is_empty() {
            return Ok(());
        }
        let addresses = match purge::round(&self.cluster.members()) {
            purge::Round::HeldBack { member } => {
                self.stats.purges_held_back.add(1);
                tracing::debug!(member = %member, tombstones = candidates.len(), "purge held back: a member is down");
                return Ok(());
            }
            purge::Round::Ask(addresses) => addresses,
        };
        let body = Bytes::from(serde_json::to_vec(&candidates).unwrap_or_default());
        // Every member at once, each bounded by PURGE_CHECK_TIMEOUT.
        let mut checks = tokio::task::JoinSet::new();
        for (i, address) in addresses.iter().enumerate() {
            let (client, address, body) = (self.cluster.client().clone(), address.clone(), body.clone());
            checks.spawn(async move {
                let answer = client.post_bytes(&address, routes::PURGE_CHECK, body, PURGE_CHECK_TIMEOUT).await;
                (
                    i,
                    answer
                        .map_err(SyncError::Peer)
                        .and_then(|b| serde_json::from_slice::<Vec<bool>>(&b).map_err(protocol)),
                )
            });
        }
        let mut answers = vec![Vec::new(); addresses.len()];
        let mut failed = false;
        while let Some(Ok((i, answer))) = checks.join_next().await {
            match answer {
                Ok(a) => answers[i] = a,
                Err(e) => {
                    // No answer is no confirmation: nothing goes this round (an empty
                    // answer confirms nothing), but the members that answered still get
                    // what they lack.
                    failed = true;
                    tracing::debug!(peer = %addresses[i], error = %e, "purge check failed; purging nothing this round");
                }
            }
        }
        if failed {
            self.stats.purges_held_back.add(1);
        }
        let (purge, repair) = purge::decide(candidates.len(), &answers);
        for ((address, missing), answer) in addresses.iter().zip(repair).zip(&answers) {
            if !missing.is_empty() && !answer.is_empty() {
                let paths: Vec<String> = missing.iter().map(|&i| candidates[i].0.clone()).collect();
                if let Err(e) = self.send_records(address, paths).await {
                    tracing::debug!(peer = %address, error = %e, "could not send tombstones a peer lacks");
                }
            }
        }
        let chosen: Vec<(String, u64)> =
            purge.into_iter().map(|i| (candidates[i].0.clone(), candidates[i].1)).collect();
        let n = self.writer.purge(chosen).await?;
        self.stats.tombstones_purged.add(n as u64);
        if n > 0 {
            tracing::debug!(purged = n, "purged tombstones every member has");
        }
        Ok(())
    }

    /// Persists the last contact time, at most about once a second unless forced.
    async fn persist_contact(&self, force: bool) -> Result<(), StoreError> {
        let now = self.cluster.last_contact();
        let last = self.last_persisted_contact.load(Ordering::Relaxed);
        if now > last && (force || hlc::ms(now) - hlc::ms(last) >= 1_000) {
            self.writer.set_meta(META_LAST_CONTACT, Bytes::copy_from_slice(&now.to_be_bytes())).await?;
            self.last_persisted_contact.store(now, Ordering::Relaxed);
        }
        Ok(())
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
