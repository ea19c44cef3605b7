//! Bootstrap: a node with seeds and no completed bootstrap (new, or one that had to
//! discard stale records) is in mode `syncing` (client writes get 503). It lists a
//! serving peer's versions newest-first in pages back to `bootstrap_max_age_hours`
//! (all the way back after a stale discard), fetches those it lacks from any serving
//! peer (moving on when one fails), copies the certificates of purged deletes, and
//! only then marks itself bootstrapped and switches to `normal`. Older data arrives by
//! regular sync.

use super::*;

impl Replication {
    /// Fetches a peer's versions newest-first back to `bootstrap_max_age`, taking those
    /// this node lacks; then marks bootstrap done and switches to `normal`. Listing the
    /// next page, fetching the previous one and storing the fetch before that run side
    /// by side.
    pub async fn bootstrap(&self, shutdown: &mut Shutdown) -> Result<(), StoreError> {
        self.bootstrap_back_to(shutdown, u64::MAX).await
    }

    /// [`Self::bootstrap`], reaching back at least to `reach_back` (a timestamp): a
    /// re-bootstrap after a stale discard must fetch again everything it discarded,
    /// however old.
    pub(super) async fn bootstrap_back_to(&self, shutdown: &mut Shutdown, reach_back: u64) -> Result<(), StoreError> {
        self.cluster.start_bootstrap();
        let started = now_ms();
        let min_ts =
            hlc::from_ms(started.saturating_sub(self.config.bootstrap_max_age.as_millis() as u64)).min(reach_back);
        let mut cursor: Option<(u64, String)> = None;
        // Paths listed but not yet fetched. They are fetched from whichever serving peer
        // this round picked, not only from the one that listed them: a peer that fails
        // (or dies) mid-bootstrap must not pin the node in mode `syncing`.
        let mut pending: Option<Vec<String>> = None;
        // One fetch answer checked and not yet stored: it is stored while the next one
        // is fetched and the next page listed, so the writer, the peer and the network
        // work side by side. At most two answers are held (MAX_BATCH_BYTES each).
        let mut to_store: Option<inbound::Fetched> = None;
        let mut last_page = false;
        tracing::info!(min_ts, "bootstrap: started");
        while !(last_page && pending.is_none() && to_store.is_none()) {
            if !pause(self.config.throttle_delay, shutdown).await {
                return Ok(());
            }
            let alive = self.cluster.alive_peers();
            let serving: Vec<_> = alive.iter().filter(|p| !p.syncing).collect();
            let peer = serving.choose(&mut rand::rng()).map(|p| (*p).clone());
            if peer.is_none() && to_store.is_none() {
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
            }
            // Listing waits while more than this round's fetch is pending: an answer
            // covers at most 8 MiB (800 paths of 10 KB values), and a list running ahead
            // would hold every lacking path in memory. So at most three pages pend.
            let backlog = pending.as_ref().map_or(0, Vec::len);
            let list = async {
                match &peer {
                    Some(peer) if !last_page && backlog < PAGE + FETCH_CHUNK => {
                        self.list_page(&peer.address, cursor.as_ref(), min_ts).await.map(Some)
                    }
                    _ => Ok(None),
                }
            };
            let mut fetch_shutdown = shutdown.clone();
            let fetch = async {
                match (&peer, &pending) {
                    // Never an empty list: `pending` is None rather than empty, and a
                    // fetch of no paths would be refused as covering none.
                    (Some(peer), Some(paths)) => {
                        if !pause(self.config.fetch_delay, &mut fetch_shutdown).await {
                            return Ok(None);
                        }
                        let chunk = &paths[..paths.len().min(FETCH_CHUNK)];
                        self.fetch_checked(&peer.address, chunk).await.map(Some)
                    }
                    _ => Ok(None),
                }
            };
            let store = async {
                match to_store.take() {
                    Some(fetched) => self.store_fetched(fetched).await.map(Some),
                    None => Ok(None),
                }
            };
            let (listed, fetched, stored) = tokio::join!(list, fetch, store);
            if let Some(n) = stored? {
                self.stats.bootstrap_fetched.add(n as u64);
            }
            match fetched {
                Ok(Some((fetched, covered))) => {
                    if let Some(paths) = &mut pending {
                        paths.drain(..covered);
                        if paths.is_empty() {
                            pending = None;
                        }
                    }
                    to_store = Some(fetched);
                }
                Ok(None) => {}
                Err(SyncError::Store(e)) => return Err(e),
                Err(SyncError::Peer(e)) => {
                    let id = peer.as_ref().map(|p| p.id.as_str()).unwrap_or_default();
                    tracing::warn!(peer = %id, error = %e, "bootstrap fetch failed; retrying with any serving peer")
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
                        None if lacking.is_empty() => {}
                        None => pending = Some(lacking),
                    }
                }
                Ok(None) => {}
                Err(SyncError::Store(e)) => return Err(e),
                Err(SyncError::Peer(e)) => {
                    let id = peer.as_ref().map(|p| p.id.as_str()).unwrap_or_default();
                    tracing::warn!(peer = %id, error = %e, "bootstrap page failed; retrying")
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
    pub(super) async fn copy_certificates(&self, shutdown: &mut Shutdown) -> Result<bool, StoreError> {
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
            let q = protocol::CertificatesQuery { after: after.clone(), limit: PAGE };
            let page = match self.cluster.client().certificates(&peer.address, &q, DATA_TIMEOUT).await {
                Ok(page) => page,
                Err(PeerError::Status(hyper::StatusCode::NOT_FOUND, _)) => {
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
            let take: Vec<_> = page
                .into_iter()
                .filter(|(p, ts, _)| *ts <= limit && crate::path::validate_stored_key(p).is_ok())
                .collect();
            copied += take.len();
            let answers = self.writer.certify(take.clone()).await?;
            // Where this node holds a version the delete never reached (a data dir
            // restored from a snapshot taken before it), the certificate is applied as
            // the delete's tombstone, as the tombstone itself would have been: the
            // value must not be served once the bootstrap is done (ARCHITECTURE.md
            // "Snapshots and restore", rule 4). Newer versions win in the merge.
            let over: Vec<_> = take
                .into_iter()
                .zip(answers)
                .filter(|(_, safe)| !safe)
                .map(|((path, ts, uuid), _)| (path, Record::tombstone(ts, uuid)))
                .collect();
            if !over.is_empty() {
                self.apply(over, None).await?;
            }
            if last {
                tracing::info!(copied, "bootstrap: certificates of purged deletes copied");
                return Ok(true);
            }
        }
    }

    /// Lists one page of a peer's versions below `cursor`: the paths this node lacks,
    /// the next cursor, and whether it was the last page.
    pub(super) async fn list_page(
        &self,
        peer: &str,
        cursor: Option<&(u64, String)>,
        min_ts: u64,
    ) -> Result<(Vec<String>, Option<(u64, String)>, bool), SyncError> {
        let q = protocol::NewestQuery { min_ts, before: cursor.cloned(), limit: PAGE };
        let page = self.cluster.client().newest(peer, &q, DATA_TIMEOUT).await?;
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
}
