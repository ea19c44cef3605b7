//! Wall-clock time, and the estimate of how far this node's clock is off its peers'.
//!
//! Only the I/O edges read the clock; the cluster rules take `now` as an argument so
//! their tests can set it.
//!
//! **Skew detection.** Every gossip exchange (and the join) carries the answering
//! node's wall clock. The asking node notes when it sent and when it received, and
//! takes the peer's clock to have been read halfway through the round trip (as NTP
//! does): `peer offset = peer wall - (sent + received) / 2`, accurate to half the round
//! trip. [`ClockOffsets`] keeps the last sample of each peer and estimates this node's
//! offset against the median of itself and its alive peers, so one wrong clock, its
//! own or a peer's, is outvoted by the others. A node more than `max_clock_offset_ms`
//! off refuses client writes: its timestamps would be wrong by more than the bound the
//! HLC ([`crate::hlc`]) allows.

use std::collections::HashMap;
use std::sync::OnceLock;
use std::time::{SystemTime, UNIX_EPOCH};

/// Fault-injection hook: shifts this process's wall clock by this many milliseconds
/// (may be negative). For tests of clock skew on machines without libfaketime; never
/// set in production.
pub const FAULT_OFFSET_ENV: &str = "KVS_FAULT_CLOCK_OFFSET_MS";

fn fault_offset() -> Result<i64, String> {
    match std::env::var(FAULT_OFFSET_ENV) {
        Err(_) => Ok(0),
        Ok(v) => v.trim().parse().map_err(|_| format!("{FAULT_OFFSET_ENV} must be a whole number of ms, got {v:?}")),
    }
}

/// Checks the fault-injection variable once at start (a bad value is an error).
pub fn check_fault_offset() -> Result<(), String> {
    fault_offset().map(|_| ())
}

/// Milliseconds since the Unix epoch (0 if the clock is before 1970).
pub fn now_ms() -> u64 {
    static OFFSET: OnceLock<i64> = OnceLock::new();
    let offset = *OFFSET.get_or_init(|| fault_offset().unwrap_or(0));
    let real = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64);
    real.saturating_add_signed(offset)
}

/// One reading of a peer's wall clock, taken during a request to it (all Unix ms).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClockSample {
    /// Our wall clock when the request was sent.
    pub sent_ms: u64,
    /// Our wall clock when the answer arrived.
    pub received_ms: u64,
    /// The peer's wall clock as written in its answer.
    pub peer_wall_ms: u64,
}

impl ClockSample {
    /// The peer's clock minus ours, assuming it was read halfway through the round trip.
    pub fn peer_offset(&self) -> i64 {
        let mid = self.sent_ms / 2 + self.received_ms / 2 + (self.sent_ms % 2 + self.received_ms % 2) / 2;
        (i128::from(self.peer_wall_ms) - i128::from(mid)).clamp(i128::from(i64::MIN), i128::from(i64::MAX)) as i64
    }

    /// The round trip; the offset is accurate to half of it.
    pub fn round_trip(&self) -> u64 {
        self.received_ms.saturating_sub(self.sent_ms)
    }
}

/// The peers' clock samples and this node's estimated offset.
#[derive(Debug, Clone)]
pub struct ClockOffsets {
    max_offset_ms: u64,
    /// Last usable sample per peer id: the peer's clock minus ours.
    peers: HashMap<String, i64>,
    /// This node's clock minus the cluster's (the median), once known.
    estimate: Option<i64>,
}

impl ClockOffsets {
    /// No samples yet.
    pub fn new(max_offset_ms: u64) -> ClockOffsets {
        ClockOffsets { max_offset_ms, peers: HashMap::new(), estimate: None }
    }

    /// Takes a sample of `peer`'s clock. A sample whose round trip is longer than the
    /// offset bound is too imprecise to judge by (a paused or overloaded peer answers
    /// late and would look skewed) and is dropped: returns false.
    pub fn record(&mut self, peer: &str, sample: ClockSample) -> bool {
        if sample.round_trip() > self.max_offset_ms {
            return false;
        }
        self.peers.insert(peer.to_string(), sample.peer_offset());
        true
    }

    /// Re-estimates this node's offset from the samples of the `alive` peers and
    /// forgets the others' samples. The estimate is this node's clock minus the median
    /// of the clocks of itself and those peers; with an even count, of the two middle
    /// values the one nearer this node's clock (two nodes that disagree cannot tell
    /// which is wrong, so neither is blamed). With no alive peer sampled, the last
    /// estimate stands: a node whose clock was found wrong stays suspect while it is
    /// cut off, since a clock does not right itself by losing its peers.
    pub fn update(&mut self, alive: &[&str]) -> Option<i64> {
        self.peers.retain(|id, _| alive.contains(&id.as_str()));
        if self.peers.is_empty() {
            return self.estimate;
        }
        let mut clocks: Vec<i64> = self.peers.values().copied().chain([0]).collect();
        clocks.sort_unstable();
        let n = clocks.len();
        let median = if n % 2 == 1 {
            clocks[n / 2]
        } else {
            let (a, b) = (clocks[n / 2 - 1], clocks[n / 2]);
            if a.unsigned_abs() <= b.unsigned_abs() { a } else { b }
        };
        self.estimate = Some(median.saturating_neg());
        self.estimate
    }

    /// This node's clock minus the cluster's, once known.
    pub fn estimate(&self) -> Option<i64> {
        self.estimate
    }

    /// False when this node's clock is known to be more than the bound off.
    pub fn ok(&self) -> bool {
        self.estimate.is_none_or(|o| o.unsigned_abs() <= self.max_offset_ms)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const T: u64 = 1_700_000_000_000;

    fn sample(sent: u64, rtt: u64, peer_ahead: i64) -> ClockSample {
        ClockSample {
            sent_ms: sent,
            received_ms: sent + rtt,
            peer_wall_ms: (sent + rtt / 2).saturating_add_signed(peer_ahead),
        }
    }

    #[test]
    fn offset_is_read_at_the_middle_of_the_round_trip() {
        let s = sample(1_000_000, 40, 120_000);
        assert_eq!(s.peer_offset(), 120_000);
        assert_eq!(s.round_trip(), 40);
        assert_eq!(sample(1_000_000, 10, -30_000).peer_offset(), -30_000);
        let absurd = ClockSample { sent_ms: 0, received_ms: 0, peer_wall_ms: u64::MAX };
        assert_eq!(absurd.peer_offset(), i64::MAX, "no overflow on absurd input");
    }

    #[test]
    fn a_fast_node_sees_every_peer_behind_and_is_off() {
        let mut c = ClockOffsets::new(500);
        for p in ["b", "c", "d", "e"] {
            assert!(c.record(p, sample(T, 2, -30_000)));
        }
        assert_eq!(c.update(&["b", "c", "d", "e"]), Some(30_000));
        assert!(!c.ok());
    }

    #[test]
    fn one_fast_peer_is_outvoted() {
        let mut c = ClockOffsets::new(500);
        c.record("b", sample(T, 2, 30_000));
        c.record("c", sample(T, 2, 3));
        c.record("d", sample(T, 2, -2));
        // Clocks relative to ours: -2, 0 (ours), 3, 30000: the median is ours.
        assert_eq!(c.update(&["b", "c", "d"]), Some(0));
        assert!(c.ok());
    }

    #[test]
    fn two_nodes_that_disagree_blame_neither() {
        let mut c = ClockOffsets::new(500);
        c.record("b", sample(T, 2, 30_000));
        assert_eq!(c.update(&["b"]), Some(0));
        assert!(c.ok());
    }

    #[test]
    fn a_slow_round_trip_is_not_a_sample() {
        let mut c = ClockOffsets::new(500);
        assert!(!c.record("b", sample(T, 5_000, 2_500)), "a paused peer answered late");
        assert_eq!(c.update(&["b"]), None);
        assert!(c.ok(), "nothing known: writes are taken");
    }

    #[test]
    fn a_cut_off_node_keeps_its_last_estimate_and_rights_itself_with_peers() {
        let mut c = ClockOffsets::new(500);
        c.record("b", sample(T, 2, -30_000));
        c.record("c", sample(T, 2, -30_000));
        assert_eq!(c.update(&["b", "c"]), Some(30_000));
        assert_eq!(c.update(&[]), Some(30_000), "no peer alive: still suspect");
        assert!(!c.ok());
        c.record("b", sample(T + 4_000, 2, 0));
        c.record("c", sample(T + 4_000, 2, 1));
        assert!(c.update(&["b", "c"]).unwrap().abs() <= 1);
        assert!(c.ok());
    }
}
