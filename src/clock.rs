//! Wall-clock time, and the estimate of how far this node's clock is off its peers'.
//!
//! Only the I/O edges read the clock; the cluster rules take `now` as an argument so
//! their tests can set it.
//!
//! **Skew detection.** Every gossip exchange (and the join) carries the answering
//! node's wall clock. The asking node notes when it sent and when it received, and
//! takes the peer's clock to have been read halfway through the round trip (as NTP
//! does): `peer offset = peer wall - (sent + received) / 2`, accurate to half the round
//! trip. [`ClockOffsets`] keeps the last sample of each peer (by address) and estimates
//! this node's offset against the median of itself and its alive peers, so one wrong
//! clock, its own or a peer's, is outvoted by the others. A node more than `max_clock_offset_ms`
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
    /// Last usable sample per peer address: the peer's clock minus ours.
    peers: HashMap<String, i64>,
    /// This node's clock minus the cluster's (the median), once known.
    estimate: Option<i64>,
    /// The estimate is a majority's: not a tie between two clocks further apart than
    /// the bound.
    decisive: bool,
}

impl ClockOffsets {
    /// No samples yet.
    pub fn new(max_offset_ms: u64) -> ClockOffsets {
        ClockOffsets { max_offset_ms, peers: HashMap::new(), estimate: None, decisive: false }
    }

    /// Takes a sample of `peer`'s clock. A sample whose round trip is longer than half
    /// the offset bound is too imprecise to judge by (its error is up to half the round
    /// trip; a paused or overloaded peer answers late and would look skewed) and is
    /// dropped: returns false.
    pub fn record(&mut self, peer: &str, sample: ClockSample) -> bool {
        if sample.round_trip() > self.max_offset_ms / 2 {
            return false;
        }
        self.peers.insert(peer.to_string(), sample.peer_offset());
        true
    }

    /// Forgets every sample and the estimate: this node's wall clock stepped, so every
    /// offset measured before is wrong.
    pub fn reset(&mut self) {
        self.peers.clear();
        self.estimate = None;
        self.decisive = false;
    }

    /// Re-estimates this node's offset from the samples of the `alive` peers and
    /// forgets the others' samples. The estimate is this node's clock minus the median
    /// of the clocks of itself and those peers. With an even count the two middle
    /// clocks may disagree: if they are within the bound of each other either will do
    /// (the nearer one is taken); if not, it is a tie nobody can settle (two nodes
    /// cannot tell which of them is wrong), the estimate is not [`decisive`], and it
    /// keeps the verdict it had: the nearer clock unless this node was already found
    /// off, then the further one, so a node found off is not cleared by losing peers
    /// until only a tie is left. With no alive peer sampled, the last estimate stands:
    /// a clock does not right itself by losing its peers.
    ///
    /// [`decisive`]: ClockOffsets::decisive
    pub fn update(&mut self, alive: &[&str]) -> Option<i64> {
        self.peers.retain(|addr, _| alive.contains(&addr.as_str()));
        if self.peers.is_empty() {
            return self.estimate;
        }
        let mut clocks: Vec<i64> = self.peers.values().copied().chain([0]).collect();
        clocks.sort_unstable();
        let n = clocks.len();
        let median = if n % 2 == 1 {
            self.decisive = true;
            clocks[n / 2]
        } else {
            let (a, b) = (clocks[n / 2 - 1], clocks[n / 2]);
            let (near, far) = if a.unsigned_abs() <= b.unsigned_abs() { (a, b) } else { (b, a) };
            self.decisive = a.abs_diff(b) <= self.max_offset_ms;
            if !self.decisive && !self.ok() { far } else { near }
        };
        self.estimate = Some(median.saturating_neg());
        self.estimate
    }

    /// This node's clock minus the cluster's, once known.
    pub fn estimate(&self) -> Option<i64> {
        self.estimate
    }

    /// The estimate is a majority's verdict, not an unsettled tie (see [`Self::update`]).
    pub fn decisive(&self) -> bool {
        self.decisive
    }

    /// False when this node's clock is known to be more than the bound off.
    pub fn ok(&self) -> bool {
        self.estimate.is_none_or(|o| o.unsigned_abs() <= self.max_offset_ms)
    }
}

/// How far the wall clock moved beyond the monotonic clock between two readings
/// `(monotonic ms, wall ms)`: positive when it stepped forward.
pub fn step(then: (u64, u64), now: (u64, u64)) -> i64 {
    let wall = i128::from(now.1) - i128::from(then.1);
    let mono = i128::from(now.0) - i128::from(then.0);
    (wall - mono).clamp(i128::from(i64::MIN), i128::from(i64::MAX)) as i64
}

/// The wall clock's lead over the monotonic clock at one reading: two leads differ by
/// the [`step`] between the readings. Lets the write path check for a step against the
/// watch task's last look with one atomic number.
pub fn lead(mono_ms: u64, wall_ms: u64) -> i64 {
    step((0, 0), (mono_ms, wall_ms))
}

/// The step check shared by the clock watch task, the write gate and the storage
/// writer: the wall clock's [`lead`] over the monotonic clock at the watch task's last
/// look, and whether a step it found is still being judged. The writer checks it
/// right before it stamps a client write, so no write is stamped across a step, however
/// long the request took to arrive (ARCHITECTURE.md, clock rule 6a).
#[derive(Debug)]
pub struct StepGuard {
    epoch: std::time::Instant,
    tolerance_ms: u64,
    /// `i64::MIN`: no look yet.
    lead: std::sync::atomic::AtomicI64,
    judging: std::sync::atomic::AtomicBool,
}

impl StepGuard {
    /// A guard that tolerates `tolerance_ms` of drift between looks.
    pub fn new(tolerance_ms: u64) -> StepGuard {
        StepGuard {
            epoch: std::time::Instant::now(),
            tolerance_ms,
            lead: std::sync::atomic::AtomicI64::new(i64::MIN),
            judging: std::sync::atomic::AtomicBool::new(false),
        }
    }

    fn read(&self) -> (u64, u64) {
        (self.epoch.elapsed().as_millis() as u64, now_ms())
    }

    /// The watch task's look: returns the clocks' readings (monotonic ms, wall ms) and
    /// makes them the new baseline.
    pub fn look(&self) -> (u64, u64) {
        let (mono, wall) = self.read();
        self.lead.store(lead(mono, wall), std::sync::atomic::Ordering::Relaxed);
        (mono, wall)
    }

    /// The wall clock stepped since the last look (by more than the tolerance), or a
    /// step found earlier is still being judged: writes must not be stamped now.
    pub fn stepped(&self) -> Option<i64> {
        let then = self.lead.load(std::sync::atomic::Ordering::Relaxed);
        let (mono, wall) = self.read();
        let step = lead(mono, wall).saturating_sub(then);
        if then != i64::MIN && step.unsigned_abs() > self.tolerance_ms {
            return Some(step);
        }
        self.judging.load(std::sync::atomic::Ordering::Relaxed).then_some(0)
    }

    /// Marks a step found (`true`) or judged (`false`).
    pub fn set_judging(&self, judging: bool) {
        self.judging.store(judging, std::sync::atomic::Ordering::Relaxed);
    }
}

/// Notices a step of the wall clock (an operator or NTP setting it, a VM resumed):
/// the wall clock moving more than `tolerance_ms` away from the monotonic clock
/// between two looks. Pure: both clocks are passed in.
#[derive(Debug, Clone)]
pub struct StepDetector {
    tolerance_ms: u64,
    last: Option<(u64, u64)>,
}

impl StepDetector {
    /// A detector that has not looked yet.
    pub fn new(tolerance_ms: u64) -> StepDetector {
        StepDetector { tolerance_ms, last: None }
    }

    /// Looks at the clocks (monotonic ms, wall ms); returns the step in ms (wall minus
    /// monotonic progress) when it exceeds the tolerance.
    pub fn look(&mut self, mono_ms: u64, wall_ms: u64) -> Option<i64> {
        let found = self.drift(mono_ms, wall_ms);
        self.last = Some((mono_ms, wall_ms));
        found
    }

    /// The step since the last look, if it exceeds the tolerance, without looking (the
    /// write path's check between two looks).
    pub fn drift(&self, mono_ms: u64, wall_ms: u64) -> Option<i64> {
        let s = step(self.last?, (mono_ms, wall_ms));
        (s.unsigned_abs() > self.tolerance_ms).then_some(s)
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
    fn two_nodes_that_disagree_blame_neither_but_are_not_decisive() {
        let mut c = ClockOffsets::new(500);
        c.record("b", sample(T, 2, 30_000));
        assert_eq!(c.update(&["b"]), Some(0));
        assert!(c.ok());
        assert!(!c.decisive(), "a tie between clocks 30 s apart settles nothing");
        let mut agree = ClockOffsets::new(500);
        agree.record("b", sample(T, 2, 120));
        agree.update(&["b"]);
        assert!(agree.ok() && agree.decisive());
    }

    #[test]
    fn a_node_found_off_is_not_cleared_by_a_tie() {
        let mut c = ClockOffsets::new(500);
        for p in ["b", "c", "d"] {
            c.record(p, sample(T, 2, -30_000));
        }
        assert_eq!(c.update(&["b", "c", "d"]), Some(30_000));
        // Two peers go down: a tie between itself and one peer 30 s apart.
        assert_eq!(c.update(&["b"]), Some(30_000));
        assert!(!c.ok());
    }

    #[test]
    fn a_wall_clock_step_is_noticed() {
        let mut d = StepDetector::new(250);
        assert_eq!(d.look(1_000, T), None, "the first look has nothing to compare");
        assert_eq!(d.look(2_000, T + 1_000), None);
        assert_eq!(d.look(3_000, T + 2_100), None, "100 ms of slew is within tolerance");
        assert_eq!(d.look(4_000, T + 33_100), Some(30_000), "stepped 30 s ahead");
        assert_eq!(d.look(5_000, T + 4_100), Some(-30_000), "and back");
        assert_eq!(d.drift(5_500, T + 9_600), Some(5_000), "between looks, without looking");
        assert_eq!(d.drift(5_500, T + 4_600), None);
        assert_eq!(lead(5_500, T + 9_600) - lead(5_000, T + 4_100), 5_000);
    }

    #[test]
    fn a_slow_round_trip_is_not_a_sample() {
        let mut c = ClockOffsets::new(500);
        assert!(!c.record("b", sample(T, 5_000, 2_500)), "a paused peer answered late");
        assert!(!c.record("b", sample(T, 251, 0)), "error up to 125 ms: too coarse for a 500 ms bound");
        assert!(c.record("b", sample(T, 250, 0)));
        c.reset();
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
