//! Catch-up: right after start, pull every write since this node's newest from the
//! peer with the newest data; later, whenever a peer's gossiped newest write is more
//! than [`CATCHUP_LAG_MS`] ahead of ours, pull again. Pages of at most
//! [`super::PAGE`] records or [`crate::protocol::MAX_BATCH_BYTES`], oldest first.

use super::*;

/// A peer whose newest write is this far ahead of ours triggers a catch-up.
pub const CATCHUP_LAG_MS: u64 = 1_000;

impl Replication {
    /// Pulls every write with a timestamp after `since` from `peer`, page by page;
    /// returns the count.
    pub(super) async fn catch_up_from(&self, peer: &str, since: u64, shutdown: &Shutdown) -> Result<usize, SyncError> {
        // (since + 1, "") excludes nothing at since + 1: no path is empty.
        let mut cursor = (since.saturating_add(1), String::new());
        let mut total = 0;
        loop {
            let q = protocol::SinceQuery { after_ts: cursor.0, after_path: cursor.1.clone(), limit: PAGE };
            let lc = self.cluster.last_contact();
            let answer = self.cluster.client().since(peer, &q, DATA_TIMEOUT, lc).await?;
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
}
