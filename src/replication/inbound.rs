//! The one door every replicated record passes, whatever brought it (push, sync,
//! catch-up, bootstrap, purge repair; a vote winner is the exception: the vote task
//! stores it only over a held version of the same timestamp, `Writer::replace`, so no
//! floor or ceiling applies): decode and check the batch off the async
//! workers ([`crate::wire::decode`]: a record that fails is skipped and counted, never
//! the batch), then hand the rest to the writer with the floors that keep a purged
//! delete from coming back and the ceiling that holds back records from beyond the
//! clock bound ([`crate::merge::decide_apply`]). Collisions go to the vote task.

use super::*;

impl Replication {
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
        let mut decoded = self.decode_batch(peer, batch).await?;
        let report = self.apply(std::mem::take(&mut decoded.records), sender_contact).await?;
        Ok((report, decoded))
    }

    /// The checking half of [`Self::take_batch`]: decodes a batch from `peer` off the
    /// async workers and counts and logs what it refuses.
    async fn decode_batch(&self, peer: &str, batch: Bytes) -> Result<wire::Decoded, SyncError> {
        let decoded = wire::decode_off_thread(batch, self.config.max_value_bytes).await.map_err(protocol)?;
        self.note_refused(peer, &decoded.refused);
        Ok(decoded)
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

    /// Fetches records and stores them; returns how many the peer sent.
    pub(super) async fn fetch_and_store(&self, peer: &str, mut paths: &[String]) -> Result<usize, SyncError> {
        let mut total = 0;
        while !paths.is_empty() {
            let (fetched, covered) = self.fetch_checked(peer, paths).await?;
            total += self.store_fetched(fetched).await?;
            paths = &paths[covered..];
        }
        Ok(total)
    }

    /// The first half of [`Self::fetch_and_store`]: one fetch of `paths` from `peer`,
    /// checked, nothing stored. The peer answers at most [`protocol::MAX_BATCH_BYTES`]
    /// and says how many of the paths (from the first) it covered; the rest are for
    /// the next call.
    pub(super) async fn fetch_checked(&self, peer: &str, paths: &[String]) -> Result<(Fetched, usize), SyncError> {
        let lc = self.cluster.last_contact();
        let answer = self.sync_client.fetch_records(peer, paths, DATA_TIMEOUT, lc).await?;
        // A peer that does not say (an earlier build) answered every path.
        let covered = answer.covered.unwrap_or(paths.len());
        if covered == 0 || covered > paths.len() {
            return Err(protocol(format!("fetch answer covers {covered} of {} paths", paths.len())));
        }
        let decoded = self.decode_batch(peer, answer.body).await?;
        Ok((Fetched { records: decoded.records, sender_contact: answer.last_contact, framed: decoded.framed }, covered))
    }

    /// The second half of [`Self::fetch_and_store`]: stores what
    /// [`Self::fetch_checked`] took; returns how many records the peer sent.
    pub(super) async fn store_fetched(&self, fetched: Fetched) -> Result<usize, StoreError> {
        self.apply(fetched.records, fetched.sender_contact).await?;
        Ok(fetched.framed)
    }
}

/// One fetch answer checked but not yet stored ([`Replication::fetch_checked`]): the
/// records that passed, the sender's `last_contact`, and how many records it sent.
/// At most [`protocol::MAX_BATCH_BYTES`] of values.
pub(super) struct Fetched {
    records: Vec<(String, Record)>,
    sender_contact: Option<u64>,
    framed: usize,
}
