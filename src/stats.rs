//! Replication counters, shown under `replication` in `/health`.

use serde_json::json;
use std::sync::atomic::{AtomicU64, Ordering};

/// A monotonically increasing count.
#[derive(Debug, Default)]
pub struct Counter(AtomicU64);

impl Counter {
    /// Adds `n`.
    pub fn add(&self, n: u64) {
        self.0.fetch_add(n, Ordering::Relaxed);
    }
    /// The current count.
    pub fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

/// Every replication counter of a node.
#[derive(Debug, Default)]
pub struct Stats {
    /// Records sent to peers by push.
    pub pushed: Counter,
    /// Push batches a peer did not take (left to sync).
    pub push_failed: Counter,
    /// Records not pushed because a queue was full (left to sync).
    pub push_dropped: Counter,
    /// Records received from peers (push, sync, catch-up, bootstrap).
    pub received: Counter,
    /// Received records stored.
    pub applied: Counter,
    /// Received records not stored (older or identical).
    pub skipped: Counter,
    /// Timestamp collisions found.
    pub collisions: Counter,
    /// Received (or offered) records held back: their timestamp was beyond the clock
    /// bound (ARCHITECTURE.md, clock rule 3a).
    pub future_records: Counter,
    /// Received records skipped because they fail this node's checks (a key it refuses,
    /// a value over its `max_value_bytes`, invalid JSON).
    pub refused_records: Counter,
    /// Regular sync rounds that completed.
    pub sync_ok: Counter,
    /// Regular sync rounds that failed.
    pub sync_failed: Counter,
    /// Records fetched by regular sync.
    pub sync_fetched: Counter,
    /// Records sent by regular sync.
    pub sync_sent: Counter,
    /// Body bytes exchanged by regular sync (both ways).
    pub sync_bytes: Counter,
    /// Duration of the last regular sync round that moved records, in ms.
    pub last_repair_ms: AtomicU64,
    /// Catch-up passes that completed.
    pub catchup_ok: Counter,
    /// Records pulled by catch-up.
    pub catchup_records: Counter,
    /// Records fetched by bootstrap.
    pub bootstrap_fetched: Counter,
    /// Oldest timestamp bootstrap has reached (0: not started).
    pub bootstrap_reached: AtomicU64,
    /// Tombstones purged after the grace period, every member having confirmed.
    pub tombstones_purged: Counter,
    /// Values replaced by their expiry tombstones ([`crate::ttl`]).
    pub expired: Counter,
    /// Purge rounds skipped because a member was down.
    pub purges_held_back: Counter,
    /// Records refused because a certificate said their delete was purged (the delete
    /// was brought back).
    pub reawakened: Counter,

    /// Records discarded because this node was away past the grace period.
    pub stale_discarded: Counter,
    /// Conflicts resolved, by rule.
    pub resolved_majority: Counter,
    /// Conflicts resolved by the oldest-node tie-break.
    pub resolved_oldest: Counter,
    /// Conflicts resolved by the fallback rule.
    pub resolved_fallback: Counter,
}

impl Stats {
    /// The counters as JSON.
    pub fn to_json(&self) -> serde_json::Value {
        json!({
            "pushed": self.pushed.get(),
            "push_failed": self.push_failed.get(),
            "push_dropped": self.push_dropped.get(),
            "received": self.received.get(),
            "applied": self.applied.get(),
            "skipped": self.skipped.get(),
            "collisions": self.collisions.get(),
            "future_records": self.future_records.get(),
            "refused_records": self.refused_records.get(),
            "sync_ok": self.sync_ok.get(),
            "sync_failed": self.sync_failed.get(),
            "sync_fetched": self.sync_fetched.get(),
            "sync_sent": self.sync_sent.get(),
            "sync_bytes": self.sync_bytes.get(),
            "last_repair_ms": self.last_repair_ms.load(Ordering::Relaxed),
            "catchup_ok": self.catchup_ok.get(),
            "catchup_records": self.catchup_records.get(),
            "bootstrap_fetched": self.bootstrap_fetched.get(),
            "tombstones_purged": self.tombstones_purged.get(),
            "expired": self.expired.get(),
            "purges_held_back": self.purges_held_back.get(),
            "reawakened": self.reawakened.get(),
            "stale_discarded": self.stale_discarded.get(),
            "conflicts_resolved": {
                "majority": self.resolved_majority.get(),
                "oldest_node": self.resolved_oldest.get(),
                "fallback": self.resolved_fallback.get(),
            },
        })
    }
}
