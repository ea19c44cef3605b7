//! Maintenance, every `tombstone_grace / 10`: purge tombstones past the grace period
//! that every member confirmed ([`crate::purge`]), persist the time of the last
//! contact with the cluster, and, when a peer's format-1 purge horizon is past that
//! time, discard the records this node had synced and bootstrap again (the stale
//! rule in [`crate::antientropy`]).

use super::*;

/// Timeout of one purge check: a member that does not answer in time holds the
/// round back.
const PURGE_CHECK_TIMEOUT: Duration = Duration::from_secs(10);

/// Tombstones asked about and purged per maintenance round (each member answers a
/// list this long).
const PURGE_BATCH: usize = 1_000;

/// Records removed per writer batch when discarding.
const REMOVE_CHUNK: usize = 10_000;

/// How often the expiry sweep looks for values past their TTL.
const EXPIRY_SWEEP_INTERVAL: Duration = Duration::from_secs(1);
/// Values the expiry sweep turns into tombstones per writer request.
const EXPIRY_BATCH: usize = 1_000;

impl Replication {
    /// Bootstraps if needed, then runs maintenance every `interval` until shutdown:
    /// purge expired tombstones, persist the last contact, and discard stale records
    /// (then bootstrap again) when a peer found this node stale.
    pub async fn maintenance_loop(self: Arc<Self>, mut shutdown: Shutdown, interval: Duration) {
        if self.is_syncing() {
            // A re-bootstrap cut short (the "0" mark) fetches all the way back, as the
            // one that was cut short would have.
            let store = self.store.clone();
            let resumed = blocking(move || store.meta(META_BOOTSTRAPPED)).await.ok().flatten();
            let reach_back = match resumed.as_deref() {
                Some(b"0") => 0,
                // A restored snapshot: also back past the grace period, so every delete
                // not yet purged is fetched (purged ones come as certificates).
                Some(RESTORED) => {
                    // Also back to the snapshot's own time: every write made since.
                    let grace = self.config.tombstone_grace.as_millis() as u64;
                    let bound = self.config.max_clock_offset_ms.saturating_mul(5) / 2;
                    let store = self.store.clone();
                    let taken = blocking(move || store.meta(META_SNAPSHOT_TAKEN)).await.ok().flatten();
                    let taken = taken.as_deref().and_then(|b| <[u8; 8]>::try_from(b).ok()).map(u64::from_be_bytes);
                    let since = now_ms().saturating_sub(grace).min(taken.unwrap_or(0));
                    hlc::from_ms(since.saturating_sub(bound))
                }
                _ => u64::MAX,
            };
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

    pub(super) async fn maintain(&self, shutdown: &mut Shutdown) -> Result<(), StoreError> {
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
    pub(super) async fn purge_round(&self) -> Result<(), StoreError> {
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
        let asked = Arc::new(candidates.clone());
        // Every member at once, each bounded by PURGE_CHECK_TIMEOUT.
        let mut checks = tokio::task::JoinSet::new();
        for (i, address) in addresses.iter().enumerate() {
            let (client, address, asked) = (self.cluster.client().clone(), address.clone(), asked.clone());
            checks.spawn(async move {
                let answer = client.purge_check(&address, &asked, PURGE_CHECK_TIMEOUT).await;
                (i, answer.map_err(SyncError::Peer))
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

    /// The expiry sweep, every [`EXPIRY_SWEEP_INTERVAL`] until shutdown: values past
    /// their TTL become their expiry tombstones ([`crate::ttl`], ARCHITECTURE.md
    /// "Expiry"). Reads already treat them as absent; the sweep makes the delete a
    /// change (the change feed reports it) and lets the purge reclaim the space.
    pub async fn expiry_loop(self: Arc<Self>, mut shutdown: Shutdown) {
        while pause(EXPIRY_SWEEP_INTERVAL, &mut shutdown).await {
            if let Err(e) = self.sweep_expired(&mut shutdown).await {
                tracing::error!(error = %e, "expiry sweep failed");
            }
        }
    }

    pub(super) async fn sweep_expired(&self, shutdown: &mut Shutdown) -> Result<(), StoreError> {
        // A clock that is off (or unchecked, or just stepped) expires nothing: a year
        // ahead, it would turn a year of live values into tombstones for good.
        while self.cluster.clock_refusal().is_none() && !shutdown.is_triggered() {
            let store = self.store.clone();
            let due = blocking(move || store.due_expiries(now_ms(), EXPIRY_BATCH)).await?;
            if due.is_empty() {
                return Ok(());
            }
            let full = due.len() == EXPIRY_BATCH;
            let n = self.writer.expire(due).await?;
            self.stats.expired.add(n as u64);
            // Nothing expired from a full batch: the writer's clock is behind the one
            // that listed them (a step back); the next sweep tries again.
            if !full || n == 0 {
                return Ok(());
            }
        }
        Ok(())
    }

    /// Persists the last contact time, at most about once a second unless forced.
    pub(super) async fn persist_contact(&self, force: bool) -> Result<(), StoreError> {
        let now = self.cluster.last_contact();
        let last = self.last_persisted_contact.load(Ordering::Relaxed);
        if now > last && (force || hlc::ms(now) - hlc::ms(last) >= 1_000) {
            self.writer.set_meta(META_LAST_CONTACT, Bytes::copy_from_slice(&now.to_be_bytes())).await?;
            self.last_persisted_contact.store(now, Ordering::Relaxed);
        }
        Ok(())
    }
}
