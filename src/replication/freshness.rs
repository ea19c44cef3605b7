//! Whether this node's data can be trusted and served: its freshness and its mode, as
//! one plain type with no I/O. The cluster tasks hold it behind a lock and only move
//! it through these transitions, so each rule is tested here directly.
//!
//! - `last_contact` (an HLC timestamp, 0: never): the start of the last completed
//!   sync, catch-up or bootstrap, less a margin. Talking is not enough: a node that just
//!   returned has news of its peers but not yet their deletes.
//! - `stale_below`: set when a peer's format-1 purge horizon (a purge made without
//!   certificates) is past `last_contact` ([`crate::antientropy::stale_below`]): the
//!   node must discard what it had synced up to there and fetch it again. While it is
//!   set, `last_contact` does not move.
//! - `verified`: false from the start of a node that was in a cluster before
//!   (`last_contact > 0`) until news from a peer shows it is not stale. Until then it
//!   hands out no records.
//! - `syncing`: bootstrapping (a new node, or one re-fetching after a discard): client
//!   writes are refused and peers do not bootstrap from it.
//!
//! A node *serves* (hands out records, starts syncs) only when it is not syncing and
//! verified.

/// The freshness and mode of one node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Freshness {
    last_contact: u64,
    stale_below: u64,
    verified: bool,
    syncing: bool,
}

impl Freshness {
    /// The state at start: `last_contact` as persisted (0: never in a cluster, so
    /// nothing to verify), and whether a bootstrap is pending.
    pub fn new(last_contact: u64, bootstrapping: bool) -> Freshness {
        Freshness { last_contact, stale_below: 0, verified: last_contact == 0, syncing: bootstrapping }
    }

    /// When this node last had the cluster's data (0: never).
    pub fn last_contact(&self) -> u64 {
        self.last_contact
    }

    /// A sync, catch-up or bootstrap that started at `started` completed. Ignored while
    /// stale: what it fetched may sit next to records that missed a purged delete.
    pub fn note_synced(&mut self, started: u64) {
        if self.stale_below == 0 {
            self.last_contact = self.last_contact.max(started);
        }
    }

    /// News from peers whose highest format-1 purge horizon is `peer_horizon`
    /// (already stripped of horizons from the future). Returns the horizon when this
    /// makes the node stale (it was not before); otherwise the node is verified.
    pub fn note_peer_horizon(&mut self, peer_horizon: u64) -> Option<u64> {
        if self.stale_below != 0 {
            return None;
        }
        match crate::antientropy::stale_below(self.last_contact, peer_horizon) {
            Some(h) => {
                self.stale_below = h;
                Some(h)
            }
            None => {
                self.verified = true;
                None
            }
        }
    }

    /// The horizon up to which records must be discarded, if a peer found this node
    /// stale.
    pub fn stale_below(&self) -> Option<u64> {
        (self.stale_below > 0).then_some(self.stale_below)
    }

    /// The records up to `horizon` were discarded: nothing held can have missed a
    /// delete purged up to there.
    pub fn clear_stale(&mut self, horizon: u64) {
        self.last_contact = self.last_contact.max(horizon);
        self.stale_below = 0;
        self.verified = true;
    }

    /// Known not to hold records that missed a purged delete.
    pub fn verified(&self) -> bool {
        self.verified && self.stale_below == 0
    }

    /// Bootstrapping: client writes are refused.
    pub fn syncing(&self) -> bool {
        self.syncing
    }

    /// A bootstrap (or re-bootstrap) starts.
    pub fn start_bootstrap(&mut self) {
        self.syncing = true;
    }

    /// A bootstrap that started at `started` completed: mode `normal`.
    pub fn finish_bootstrap(&mut self, started: u64) {
        self.note_synced(started);
        self.syncing = false;
    }

    /// May hand its records to peers and start syncs.
    pub fn serving(&self) -> bool {
        !self.syncing && self.verified()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_new_node_is_verified_and_serves_once_bootstrapped() {
        let mut f = Freshness::new(0, true);
        assert!(f.verified() && f.syncing() && !f.serving());
        f.finish_bootstrap(100);
        assert!(f.serving());
        assert_eq!(f.last_contact(), 100);
    }

    #[test]
    fn a_returning_node_serves_only_after_news_shows_it_current() {
        let mut f = Freshness::new(500, false);
        assert!(!f.serving(), "it may hold records that missed a purged delete");
        assert_eq!(f.note_peer_horizon(400), None, "the peer purged before our last contact");
        assert!(f.serving());
    }

    #[test]
    fn a_stale_node_discards_then_refetches_and_contact_waits() {
        let mut f = Freshness::new(500, false);
        assert_eq!(f.note_peer_horizon(900), Some(900));
        assert_eq!(f.note_peer_horizon(950), None, "already stale: one discard at a time");
        assert_eq!(f.stale_below(), Some(900));
        f.note_synced(1_000);
        assert_eq!(f.last_contact(), 500, "a sync while stale proves nothing");
        assert!(!f.serving());
        f.start_bootstrap();
        f.clear_stale(900);
        assert_eq!((f.stale_below(), f.last_contact()), (None, 900));
        assert!(f.verified() && !f.serving(), "re-bootstrapping");
        f.finish_bootstrap(1_200);
        assert!(f.serving());
        assert_eq!(f.last_contact(), 1_200);
    }

    #[test]
    fn contact_never_goes_back() {
        let mut f = Freshness::new(0, false);
        f.note_synced(300);
        f.note_synced(200);
        assert_eq!(f.last_contact(), 300);
        f.clear_stale(100);
        assert_eq!(f.last_contact(), 300);
    }
}
