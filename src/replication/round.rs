//! Regular anti-entropy sync: every `sync_interval`, with one random alive peer,
//! compare the hash summaries level by level ([`crate::antientropy`]), fetch what the
//! peer has newer and send what this node has newer. Heals any divergence, however
//! old; a completed round moves this node's last contact ([`super::freshness`]).

use super::*;

/// Leaves per version-listing request of a sync round.
const LEAF_CHUNK: usize = 1_024;

impl Replication {
    /// One regular sync round with `peer`; returns (fetched, sent).
    pub async fn sync_with(&self, peer: &str) -> Result<(usize, usize), SyncError> {
        let client = &self.sync_client;
        let theirs = client.level1(peer, DATA_TIMEOUT).await?;
        let tops = antientropy::differing(&self.store.level1(), &theirs);
        if tops.is_empty() {
            return Ok((0, 0));
        }
        let theirs = client.leaves(peer, &tops, DATA_TIMEOUT).await?;
        let per = LEAVES / FANOUT;
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
            // The peer lists its versions while this node lists its own.
            let store = self.store.clone();
            let leaves = chunk.to_vec();
            let (theirs, mine) = tokio::join!(
                client.versions(peer, chunk, DATA_TIMEOUT),
                blocking(move || store.versions_in_leaves(&leaves))
            );
            let (theirs, mine) = (theirs?, mine?);
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

    /// Sends the records of `paths` to `peer` as pushes of at most
    /// [`protocol::MAX_BATCH_BYTES`] each, read from storage one batch at a time.
    pub(super) async fn send_records(&self, peer: &str, paths: Vec<String>) -> Result<usize, SyncError> {
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
            let lc = self.cluster.last_contact();
            self.sync_client.push(peer, body, DATA_TIMEOUT, lc).await?;
            sent += records.len();
        }
        Ok(sent)
    }
}
