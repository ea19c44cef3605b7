//! The membership tasks: join through seeds, gossip with random peers, announce leave.
//!
//! They only move messages: every decision is made by [`Membership`] under a short
//! lock that is never held across an await.
//!
//! Node-to-node endpoints (documented in README "Internal endpoints"):
//! - `POST /internal/v2/join`: body: the joiner's [`MemberInfo`]; answer: the member list
//!   and the seed's wall clock (200, a [`GossipMessage`]) or 409 when another live node
//!   has the same `node_id`.
//! - `POST /internal/v2/leave`: body: the leaver's entry with `left: true`.
//! - `POST /internal/v2/gossip`: body and answer `{"members": [MemberInfo...], "wall_ms"}`.
//!
//! Each join and gossip answer is also a reading of the peer's wall clock
//! ([`crate::clock::ClockOffsets`]): a node whose clock is found more than
//! `max_clock_offset_ms` off the cluster's refuses client writes until it is right.

use crate::clock::{ClockOffsets, ClockSample, StepDetector, StepGuard, now_ms};
use crate::membership::{self, Changes, JoinOutcome, MemberInfo, MemberView, Membership, Timeouts};
use crate::protocol::{LogThrottle, PeerClient, PeerError};
use crate::replication::freshness::Freshness;
use crate::shutdown::Shutdown;
use rand::rngs::StdRng;
use rand::{RngExt, SeedableRng};
use serde::Serialize;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};
use tokio::task::JoinSet;

/// Timeout of one membership call to a peer.
pub const CALL_TIMEOUT: Duration = Duration::from_secs(2);
/// Longest pause between two join attempts.
const MAX_JOIN_BACKOFF: Duration = Duration::from_secs(10);

pub use crate::protocol::GossipMessage;

/// What `/health` says about this node's clock.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct ClockStatus {
    /// This node's clock minus the median of its alive peers' (null: not measured).
    pub offset_ms: Option<i64>,
    /// `max_clock_offset_ms`.
    pub max_offset_ms: u64,
    /// False while the offset is beyond the bound, or before the first comparison with
    /// a seed: client writes are refused.
    pub ok: bool,
    /// The clock has been judged (see [`ClockRefusal::Unchecked`]); true at once for a
    /// node without seeds.
    pub checked: bool,
}

/// Why this node refused a join.
#[derive(Debug)]
pub enum JoinError {
    /// Another live node uses the joiner's `node_id` (the joiner must not retry).
    Duplicate(String),
    /// This node keeps [`membership::MAX_MEMBERS`] members already (the joiner may
    /// retry later).
    Full,
}

/// Why this node's clock keeps it from taking client writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClockRefusal {
    /// No verdict yet: just started (or the wall clock stepped) and the readings so far
    /// are not decisive.
    Unchecked,
    /// Off the cluster's clock by this many ms (positive: ahead).
    Off(i64),
    /// The wall clock stepped by this many ms since the watch task last looked; it is
    /// judged again within a second (ARCHITECTURE.md, clock rule 6a).
    Stepped(i64),
}

/// Clock state read on every client write, kept in atomics so the write path takes no
/// lock; [`ClockOffsets`] behind a mutex is the source of truth.
struct ClockGate {
    offsets: Mutex<ClockOffsets>,
    max_offset_ms: u64,
    /// `i64::MIN`: not measured.
    offset: AtomicI64,
    ok: AtomicBool,
    /// The clock has been judged: a decisive estimate, or a round with every alive
    /// peer that gave no usable reading (nothing to judge by).
    checked: AtomicBool,
    /// When the last "clock off" line was logged (at most one a minute).
    logged: Mutex<Option<Instant>>,
    /// The step check, shared with the storage writer.
    steps: Arc<StepGuard>,
}

/// The node's cluster state and the means to talk to peers.
pub struct Cluster {
    membership: Mutex<Membership>,
    seeds: Vec<String>,
    client: PeerClient,
    /// Local monotonic clock origin: failure detection must not jump with wall time.
    epoch: Instant,
    gossip_min: Duration,
    gossip_max: Duration,
    rounds: AtomicU64,
    /// Freshness and mode ([`Freshness`]): every transition goes through it.
    freshness: Mutex<Freshness>,
    /// Member entries from peers that failed [`membership::check_info`] or exceeded
    /// [`membership::MAX_MEMBERS`].
    refused_members: AtomicU64,
    /// Node-to-node requests refused for their cluster key signature.
    auth_refused: AtomicU64,
    /// One warning a minute per kind of refused news.
    refusals: LogThrottle,
    /// Reads this node's newest write and purge horizon for gossip.
    data_facts: Box<dyn Fn() -> DataFacts + Send + Sync>,
    clock: ClockGate,
}

/// What this node tells peers about its data in gossip.
#[derive(Debug, Clone, Copy)]
pub struct DataFacts {
    /// Newest write held.
    pub newest_write: u64,
    /// Purge horizon.
    pub gc_horizon: u64,
}

/// The join was refused for good.
#[derive(Debug)]
pub struct JoinRefused(pub String);

impl Cluster {
    /// Cluster state for this node, seeded with `seeds`.
    pub fn new(
        me: MemberInfo,
        timeouts: Timeouts,
        seeds: Vec<String>,
        gossip: (Duration, Duration),
        freshness: Freshness,
        (max_clock_offset_ms, steps): (u64, Arc<StepGuard>),
        data_facts: Box<dyn Fn() -> DataFacts + Send + Sync>,
    ) -> Cluster {
        let seeds: Vec<String> = seeds.into_iter().filter(|s| *s != me.address).collect();
        let clock = ClockGate {
            offsets: Mutex::new(ClockOffsets::new(max_clock_offset_ms)),
            max_offset_ms: max_clock_offset_ms,
            offset: AtomicI64::new(i64::MIN),
            ok: AtomicBool::new(true),
            checked: AtomicBool::new(seeds.is_empty()),
            logged: Mutex::new(None),
            steps,
        };
        Cluster {
            membership: Mutex::new(Membership::new(me, timeouts)),
            seeds,
            client: PeerClient::new(),
            epoch: Instant::now(),
            gossip_min: gossip.0,
            gossip_max: gossip.1,
            rounds: AtomicU64::new(0),
            freshness: Mutex::new(freshness),
            refused_members: AtomicU64::new(0),
            auth_refused: AtomicU64::new(0),
            refusals: LogThrottle::default(),
            data_facts,
            clock,
        }
    }

    /// The same cluster state, calling its peers through `client` (an in-process
    /// network in scenario tests, [`crate::localnet`]).
    pub fn with_client(mut self, client: PeerClient) -> Cluster {
        self.client = client;
        self
    }

    /// Takes a reading of the clock of the peer at `address`.
    fn note_clock(&self, address: &str, sent_ms: u64, peer_wall_ms: u64) {
        if peer_wall_ms == 0 {
            return;
        }
        let sample = ClockSample { sent_ms, received_ms: now_ms(), peer_wall_ms };
        let taken = self.clock.offsets.lock().unwrap_or_else(|p| p.into_inner()).record(address, sample);
        if taken {
            self.refresh_clock();
        }
    }

    /// Re-estimates this node's clock offset from the alive peers' readings.
    fn refresh_clock(&self) {
        let alive = self.alive_peers();
        let alive: Vec<&str> = alive.iter().map(|p| p.address.as_str()).collect();
        let (estimate, ok, decisive) = {
            let mut offsets = self.clock.offsets.lock().unwrap_or_else(|p| p.into_inner());
            (offsets.update(&alive), offsets.ok(), offsets.decisive())
        };
        let Some(offset) = estimate else { return };
        if decisive {
            self.clock.checked.store(true, Ordering::Relaxed);
        }
        self.clock.offset.store(offset, Ordering::Relaxed);
        let was_ok = self.clock.ok.swap(ok, Ordering::Relaxed);
        let mut logged = self.clock.logged.lock().unwrap_or_else(|p| p.into_inner());
        if !ok && logged.is_none_or(|t| t.elapsed() >= Duration::from_secs(60)) {
            *logged = Some(Instant::now());
            tracing::error!(
                offset_ms = offset,
                max_clock_offset_ms = self.clock.max_offset_ms,
                "this node's clock is off the cluster's by more than max_clock_offset_ms: client writes are refused until it is right"
            );
        } else if ok && !was_ok {
            *logged = None;
            tracing::info!(offset_ms = offset, "this node's clock is within max_clock_offset_ms again: taking writes");
        }
    }

    /// This node's clock as `/health` shows it.
    pub fn clock_status(&self) -> ClockStatus {
        let offset = self.clock.offset.load(Ordering::Relaxed);
        ClockStatus {
            offset_ms: (offset != i64::MIN).then_some(offset),
            max_offset_ms: self.clock.max_offset_ms,
            ok: self.clock_refusal().is_none(),
            checked: self.clock.checked.load(Ordering::Relaxed),
        }
    }

    /// Why client writes must be refused because of this node's clock, if they must.
    pub fn clock_refusal(&self) -> Option<ClockRefusal> {
        if !self.clock.checked.load(Ordering::Relaxed) {
            return Some(ClockRefusal::Unchecked);
        }
        if !self.clock.ok.load(Ordering::Relaxed) {
            return Some(ClockRefusal::Off(self.clock.offset.load(Ordering::Relaxed)));
        }
        // A step since the watch task last looked: no write is stamped across it.
        self.clock.steps.stepped().map(ClockRefusal::Stepped)
    }

    /// Milliseconds on the local monotonic clock, the `now` of every membership rule.
    fn now(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64
    }

    fn lock(&self) -> MutexGuard<'_, Membership> {
        // A panic while holding the lock cannot leave Membership half-updated in a way
        // that matters more than losing the node, so recover the guard.
        self.membership.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The shared peer client.
    pub fn client(&self) -> &PeerClient {
        &self.client
    }

    /// `/members/` rows.
    pub fn view(&self) -> Vec<MemberView> {
        let now = self.now();
        self.lock().view(now, now_ms())
    }

    /// Gossip rounds this process has run.
    pub fn gossip_rounds(&self) -> u64 {
        self.rounds.load(Ordering::Relaxed)
    }

    /// Known members (this node included) as (alive, down).
    pub fn member_counts(&self) -> (usize, usize) {
        let now = self.now();
        let m = self.lock();
        let alive = m.alive_count(now);
        (alive, m.known_count() - alive)
    }

    /// Alive members, this node included.
    pub fn alive_count(&self) -> usize {
        let now = self.now();
        self.lock().alive_count(now)
    }

    /// Every member but this one that has not left or been removed, with its status.
    pub fn members(&self) -> Vec<(MemberInfo, crate::membership::Status)> {
        let now = self.now();
        self.lock().members(now)
    }

    /// Alive peers, for data exchange.
    pub fn alive_peers(&self) -> Vec<MemberInfo> {
        let now = self.now();
        self.lock().alive_peers(now)
    }

    /// This node's entry, with current data facts.
    pub fn me(&self) -> MemberInfo {
        let mut m = self.lock();
        self.refresh_facts(&mut m);
        m.me().clone()
    }

    fn fresh(&self) -> MutexGuard<'_, Freshness> {
        self.freshness.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The timestamp (HLC) at which this node last had the cluster's data (0: never).
    pub fn last_contact(&self) -> u64 {
        self.fresh().last_contact()
    }

    /// A sync, catch-up or bootstrap that started at `started` (an HLC) completed:
    /// this node had every delete its peer had then.
    pub fn note_synced(&self, started: u64) {
        self.fresh().note_synced(started);
    }

    /// The horizon up to which this node must discard its records (see
    /// [`crate::antientropy::stale_below`]), if a peer found it stale.
    pub fn stale_below(&self) -> Option<u64> {
        self.fresh().stale_below()
    }

    /// Called once the records up to `horizon` were discarded: nothing this node
    /// holds can have missed a delete purged up to there.
    pub fn clear_stale(&self, horizon: u64) {
        self.fresh().clear_stale(horizon);
    }

    /// True once this node is known not to hold records that missed a purged delete:
    /// only then may it hand its records to peers.
    pub fn verified(&self) -> bool {
        self.fresh().verified()
    }

    /// Bootstrapping (mode `syncing`): client writes are refused.
    pub fn is_syncing(&self) -> bool {
        self.fresh().syncing()
    }

    /// May hand out records and start syncs: not bootstrapping, and verified.
    pub fn serving(&self) -> bool {
        self.fresh().serving()
    }

    /// A bootstrap (or re-bootstrap) starts.
    pub fn start_bootstrap(&self) {
        self.fresh().start_bootstrap();
    }

    /// A bootstrap that started at `started` (an HLC) completed: mode `normal`.
    pub fn finish_bootstrap(&self, started: u64) {
        self.fresh().finish_bootstrap(started);
    }

    /// After news from peers: a peer that has purged tombstones past our last contact
    /// makes us stale; otherwise we know we are not (verified).
    fn note_contact(&self, m: &Membership) {
        let ceiling = crate::hlc::from_ms(now_ms().saturating_add(self.clock.max_offset_ms));
        let horizon = m.max_peer_gc_horizon(ceiling);
        let mut f = self.fresh();
        let last = f.last_contact();
        if let Some(h) = f.note_peer_horizon(horizon) {
            tracing::warn!(
                last_contact = last,
                peer_gc_horizon = h,
                "a peer purged deletes (format 1, without certificates) past this node's last contact: \
                 discarding what it had synced and fetching everything again"
            );
        }
    }

    /// Puts this node's current newest write and purge horizon in its own entry.
    fn refresh_facts(&self, m: &mut Membership) {
        let f = (self.data_facts)();
        m.set_data_facts(f.newest_write, f.gc_horizon, self.is_syncing());
    }

    /// Merges what a peer told us, checks whether it makes us stale, logs the changes.
    /// The entries of `members` that pass [`membership::check_info`] (at most
    /// [`membership::MAX_MEMBERS`]); the others are counted and logged, never acted on.
    pub fn admit(&self, mut members: Vec<MemberInfo>, via: &str) -> Vec<MemberInfo> {
        let wall = now_ms();
        let mut refused = members.len().saturating_sub(membership::MAX_MEMBERS);
        members.truncate(membership::MAX_MEMBERS);
        let mut first_error = None;
        members.retain(|m| match membership::check_info(m, wall) {
            Ok(()) => true,
            Err(e) => {
                refused += 1;
                first_error.get_or_insert(e);
                false
            }
        });
        if refused > 0 {
            self.refused_members.fetch_add(refused as u64, Ordering::Relaxed);
            if self.refusals.allow(via) {
                tracing::warn!(
                    via,
                    refused,
                    first = first_error.as_deref().unwrap_or("too many entries"),
                    "refused member entries from a peer"
                );
            }
        }
        members
    }

    /// Member entries refused since start ([`Self::admit`], and news of new members
    /// beyond [`membership::MAX_MEMBERS`]).
    pub fn refused_members(&self) -> u64 {
        self.refused_members.load(Ordering::Relaxed)
    }

    /// Counts a node-to-node request refused for its cluster key signature.
    pub fn note_auth_refused(&self) {
        self.auth_refused.fetch_add(1, Ordering::Relaxed);
    }

    /// Node-to-node requests refused for their cluster key signature since start.
    pub fn auth_refused(&self) -> u64 {
        self.auth_refused.load(Ordering::Relaxed)
    }

    fn take_news(&self, members: Vec<MemberInfo>, via: &str) {
        let members = self.admit(members, via);
        let now = self.now();
        let changes = {
            let mut m = self.lock();
            let changes = m.merge(members, now);
            self.note_contact(&m);
            changes
        };
        self.log_changes(&changes, via);
    }

    fn log_changes(&self, changes: &Changes, via: &str) {
        if changes.refused > 0 {
            self.refused_members.fetch_add(changes.refused as u64, Ordering::Relaxed);
            if self.refusals.allow("full") {
                tracing::warn!(
                    via,
                    refused = changes.refused,
                    "news of new members refused: this node keeps at most {}",
                    membership::MAX_MEMBERS
                );
            }
        }
        for id in &changes.joined {
            tracing::info!(member = %id, via, "member joined");
        }
        for id in &changes.left {
            tracing::info!(member = %id, via, "member left");
        }
        for id in &changes.removed {
            tracing::info!(member = %id, "member removed after removal_timeout");
        }
    }

    /// Handles `POST /internal/v2/join`.
    pub fn handle_join(&self, info: MemberInfo) -> Result<GossipMessage, JoinError> {
        let now = self.now();
        let id = info.id.clone();
        let mut m = self.lock();
        match m.join(info, now) {
            JoinOutcome::Accepted => {
                self.note_contact(&m);
                self.refresh_facts(&mut m);
                tracing::info!(member = %id, "join accepted");
                Ok(GossipMessage::now(m.gossip_payload()))
            }
            JoinOutcome::DuplicateId { holder } => {
                tracing::warn!(member = %id, holder = %holder, "join refused: duplicate node_id");
                Err(JoinError::Duplicate(format!("node_id {id:?} is already used by the node at {holder}")))
            }
            JoinOutcome::Full => {
                self.refused_members.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(member = %id, "join refused: this node keeps at most {} members", membership::MAX_MEMBERS);
                Err(JoinError::Full)
            }
        }
    }

    /// Handles `POST /internal/v2/leave`.
    pub fn handle_leave(&self, info: MemberInfo) {
        let now = self.now();
        let changes = self.lock().merge([info], now);
        self.log_changes(&changes, "leave");
    }

    /// Handles `POST /internal/v2/gossip`: merge, answer with what we know.
    pub fn handle_gossip(&self, msg: GossipMessage) -> GossipMessage {
        let members = self.admit(msg.members, "gossip");
        let now = self.now();
        let mut m = self.lock();
        let changes = m.merge(members, now);
        self.note_contact(&m);
        self.refresh_facts(&mut m);
        let members = m.gossip_payload();
        drop(m);
        self.log_changes(&changes, "gossip");
        GossipMessage::now(members)
    }

    /// Joins through the seeds, retrying with backoff until one answers. A seed that
    /// is down does not stop the join; a duplicate `node_id` does.
    pub async fn join(self: Arc<Self>, mut shutdown: Shutdown) -> Result<(), JoinRefused> {
        if self.seeds.is_empty() {
            return Ok(());
        }
        let mut backoff = Duration::from_millis(200);
        let mut rng = StdRng::seed_from_u64(rand::rng().random());
        loop {
            let mut seeds = self.seeds.clone();
            rand::seq::SliceRandom::shuffle(seeds.as_mut_slice(), &mut rng);
            for seed in &seeds {
                let me = {
                    let mut m = self.lock();
                    self.refresh_facts(&mut m);
                    m.me().clone()
                };
                let sent = now_ms();
                match self.client.join(seed, &me, CALL_TIMEOUT).await {
                    Ok(answer) => {
                        let members = answer.members.len();
                        self.take_news(answer.members, "join");
                        self.note_clock(seed, sent, answer.wall_ms);
                        self.clock_round().await;
                        tracing::info!(seed = %seed, members, "joined the cluster");
                        return Ok(());
                    }
                    Err(PeerError::Status(hyper::StatusCode::CONFLICT, body)) => {
                        let reason = serde_json::from_str::<serde_json::Value>(&body)
                            .ok()
                            .and_then(|v| v["error"].as_str().map(str::to_string))
                            .unwrap_or(body);
                        return Err(JoinRefused(reason));
                    }
                    Err(PeerError::Status(hyper::StatusCode::UNAUTHORIZED, body)) => {
                        // A wrong or missing cluster key: said once a minute per seed,
                        // retried with the usual backoff (a key fixed on either side).
                        if self.refusals.allow(&format!("join refused {seed}")) {
                            tracing::error!(
                                seed = %seed,
                                answer = %body,
                                "the seed refused this node's cluster key (cluster_key_file); retrying"
                            );
                        }
                    }
                    Err(e) => tracing::warn!(seed = %seed, error = %e, "seed did not answer the join"),
                }
            }
            // Every seed was tried once and none answered: this node has no peer to
            // compare its clock with, and takes writes (README "Clocks").
            self.clock.checked.store(true, Ordering::Relaxed);
            tokio::select! {
                _ = tokio::time::sleep(backoff) => {}
                _ = shutdown.wait() => return Ok(()),
            }
            backoff = (backoff * 2).min(MAX_JOIN_BACKOFF);
        }
    }

    /// One gossip exchange with every alive peer at once (each bounded by
    /// [`CALL_TIMEOUT`]), right after joining and after the wall clock stepped: the
    /// clock is judged against the whole cluster before the next client write, not
    /// against the one seed that answered. If the readings leave only an unsettled tie
    /// the node stays unchecked (no client writes) until gossip brings a majority; if
    /// no peer gave a usable reading there is nothing to judge by and it takes writes.
    async fn clock_round(self: &Arc<Self>) {
        let payload = {
            let mut m = self.lock();
            self.refresh_facts(&mut m);
            Arc::new(GossipMessage::now(m.gossip_payload()))
        };
        let mut exchanges = JoinSet::new();
        for peer in self.alive_peers() {
            let (cluster, payload) = (self.clone(), payload.clone());
            exchanges.spawn(async move { cluster.exchange(&peer.address, &payload).await });
        }
        while exchanges.join_next().await.is_some() {}
        let sampled = self.clock.offsets.lock().unwrap_or_else(|p| p.into_inner()).estimate().is_some();
        if !sampled {
            if !self.clock.checked.swap(true, Ordering::Relaxed) {
                tracing::warn!("no peer gave a usable clock reading: taking writes without a clock check");
            }
        } else if !self.clock.checked.load(Ordering::Relaxed) {
            tracing::warn!(
                "this node's clock and its peers' disagree with no majority either way: \
                 client writes wait until more peers are reachable"
            );
        }
    }

    /// Every second, looks for a step of the wall clock; after one, forgets every clock
    /// reading, takes no client write, and judges the clock again with every alive
    /// peer.
    pub async fn clock_watch_loop(self: Arc<Self>, mut shutdown: Shutdown) {
        let mut detector = StepDetector::new(self.clock.max_offset_ms / 2);
        loop {
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                _ = shutdown.wait() => return,
            }
            let (mono, wall) = self.clock.steps.look();
            let Some(step) = detector.look(mono, wall) else { continue };
            // The writer refuses client writes from now until the clock is judged.
            self.clock.steps.set_judging(true);
            tracing::warn!(step_ms = step, "the wall clock stepped: judging it against the peers again");
            self.clock.offsets.lock().unwrap_or_else(|p| p.into_inner()).reset();
            self.clock.checked.store(false, Ordering::Relaxed);
            self.clock.ok.store(true, Ordering::Relaxed);
            self.clock.offset.store(i64::MIN, Ordering::Relaxed);
            self.clock_round().await;
            self.clock.steps.set_judging(false);
        }
    }

    /// One gossip exchange with the node at `target`: send what we know, take its
    /// news and its clock reading.
    async fn exchange(&self, target: &str, msg: &GossipMessage) {
        let sent = now_ms();
        match self.client.gossip(target, msg, CALL_TIMEOUT).await {
            Ok(answer) => {
                self.take_news(answer.members, "gossip");
                self.note_clock(target, sent, answer.wall_ms);
            }
            Err(e) => tracing::debug!(peer = %target, error = %e, "gossip failed"),
        }
    }

    /// Gossips with random peers every `gossip_interval_min..max` until shutdown.
    pub async fn gossip_loop(self: Arc<Self>, mut shutdown: Shutdown) {
        let mut rng = StdRng::seed_from_u64(rand::rng().random());
        let mut exchanges = JoinSet::new();
        loop {
            let pause = if self.gossip_max > self.gossip_min {
                rng.random_range(self.gossip_min..=self.gossip_max)
            } else {
                self.gossip_min
            };
            tokio::select! {
                _ = tokio::time::sleep(pause) => {}
                _ = shutdown.wait() => break,
            }
            while exchanges.try_join_next().is_some() {}
            self.rounds.fetch_add(1, Ordering::Relaxed);
            let now = self.now();
            let (targets, payload) = {
                let mut m = self.lock();
                self.refresh_facts(&mut m);
                let changes = m.tick(now);
                self.log_changes(&changes, "tick");
                (m.gossip_targets(&self.seeds, now, &mut rng), m.gossip_payload())
            };
            // Members that went down no longer count towards the clock estimate.
            self.refresh_clock();
            let msg = Arc::new(GossipMessage::now(payload));
            for target in targets {
                // Exchanges run beside the loop, so a slow peer never delays the next
                // round; each ends within CALL_TIMEOUT, and at most 4 start per round.
                let cluster = self.clone();
                let msg = msg.clone();
                exchanges.spawn(async move { cluster.exchange(&target, &msg).await });
            }
        }
        exchanges.abort_all();
    }

    /// Tells every alive peer that this node is leaving, waiting at most
    /// [`CALL_TIMEOUT`] in all.
    pub async fn announce_leave(&self) {
        let (bye, peers) = {
            let now = self.now();
            let m = self.lock();
            (m.leave_announcement(), m.alive_peers(now))
        };
        let mut calls = JoinSet::new();
        for peer in peers {
            let client = self.client.clone();
            let bye = bye.clone();
            calls.spawn(async move {
                let r = client.leave(&peer.address, &bye, CALL_TIMEOUT).await;
                if let Err(e) = r {
                    tracing::debug!(peer = %peer.id, error = %e, "leave announcement failed");
                }
            });
        }
        let _ = tokio::time::timeout(CALL_TIMEOUT, async { while calls.join_next().await.is_some() {} }).await;
        tracing::info!("left the cluster");
    }
}
