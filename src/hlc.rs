//! Version timestamps: a hybrid logical clock (HLC) that tracks real time.
//!
//! A version's timestamp is one `u64`: the top 48 bits are Unix milliseconds (the
//! physical part), the low 16 bits a logical counter. Packed this way, comparing two
//! timestamps as integers compares (physical, counter) pairs, so the merge rule
//! ([`crate::record::compare`]) and every index keyed by timestamp stay as they were.
//!
//! The rules, and why each holds:
//! - **Write rate never moves the physical part.** [`Hlc::now`] takes the wall clock
//!   when it is ahead of the last timestamp handed out, and otherwise adds one to the
//!   last one: a burst of writes in one millisecond goes into the counter (65,536 per
//!   millisecond before it carries into the physical part).
//! - **A wrong clock elsewhere cannot drag this one.** [`Hlc::observe`] moves the clock
//!   forward to a peer's (or a held version's) timestamp only when that timestamp is at
//!   most `max_offset_ms` ahead of the local wall clock. Anything further ahead is "from
//!   the future": the record is still stored (it is a real write), but the clock does
//!   not follow it, so this node's writes to other keys stay on real time.
//! - **A client write always supersedes what its node holds for the key.**
//!   [`Hlc::stamp_over`] orders the new version just after the held one when the clock
//!   is not already past it, without moving the clock when the held one is from the
//!   future.
//!
//! The wall clock is passed in, so the rules are tested without time passing.

/// Bits of the logical counter.
pub const COUNTER_BITS: u32 = 16;
/// Largest physical part (Unix ms) a timestamp can carry: the year 10889.
pub const MAX_MS: u64 = (1 << (64 - COUNTER_BITS)) - 1;

/// The timestamp of wall time `ms` with counter 0: the first version at that millisecond.
pub fn from_ms(ms: u64) -> u64 {
    ms.min(MAX_MS) << COUNTER_BITS
}

/// The physical part of a timestamp, in Unix ms: what the API shows as `"timestamp"`.
pub fn ms(ts: u64) -> u64 {
    ts >> COUNTER_BITS
}

/// The logical counter of a timestamp.
pub fn counter(ts: u64) -> u64 {
    ts & ((1 << COUNTER_BITS) - 1)
}

/// How far ahead of a node's wall clock a peer's timestamp may be before it is held
/// back, in tenths of `max_clock_offset_ms`: 2.5 bounds (see [`Hlc::ceiling`]).
pub const HOLD_BACK_FACTOR_TENTHS: u64 = 25;

/// Whether a timestamp observed from elsewhere was taken by the clock.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Observed {
    /// Within the offset bound (or behind the clock): the clock is at or past it now.
    Taken,
    /// More than `max_offset_ms` ahead of the wall clock: the clock did not move.
    Future,
}

/// The clock of one node: the last timestamp it handed out, and the bound on how far
/// ahead of its own wall clock it lets others move it.
#[derive(Debug, Clone)]
pub struct Hlc {
    last: u64,
    max_offset_ms: u64,
}

impl Hlc {
    /// A clock that has handed out nothing yet.
    pub fn new(max_offset_ms: u64) -> Hlc {
        Hlc { last: 0, max_offset_ms }
    }

    /// The last timestamp handed out or taken (0: none).
    pub fn last(&self) -> u64 {
        self.last
    }

    /// Is `ts` more than `max_offset_ms` ahead of `wall_ms`?
    pub fn is_future(&self, ts: u64, wall_ms: u64) -> bool {
        ms(ts) > wall_ms.saturating_add(self.max_offset_ms)
    }

    /// The newest timestamp a node takes from a peer at `wall_ms`; later ones are held
    /// back (ARCHITECTURE.md, clock rule 3a). It is 2.5 times the ([`HOLD_BACK_FACTOR_TENTHS`])
    /// bound ahead, not the bound: the clock check keeps every node within the bound of
    /// the cluster's median, so two nodes that both pass it can be twice the bound
    /// apart, plus the quarter bound a reading may be off; their writes must never be
    /// held back by each other.
    pub fn ceiling(&self, wall_ms: u64) -> u64 {
        let ahead = self.max_offset_ms.saturating_mul(HOLD_BACK_FACTOR_TENTHS) / 10;
        let ms = wall_ms.saturating_add(ahead);
        if ms >= MAX_MS { u64::MAX } else { from_ms(ms) | ((1 << COUNTER_BITS) - 1) }
    }

    /// The next timestamp at wall time `wall_ms`: above everything handed out, and on
    /// the wall clock whenever the wall clock is ahead.
    pub fn now(&mut self, wall_ms: u64) -> u64 {
        // Further ahead than observing allows: the wall clock stepped back. The clock
        // goes back to it rather than stamp every write from the future (peers would
        // hold them all back); the order of each key's versions is kept by
        // `stamp_over`, which never depends on this.
        if self.is_future(self.last, wall_ms) {
            self.last = 0;
        }
        self.last = from_ms(wall_ms).max(self.last.saturating_add(1));
        self.last
    }

    /// Takes a timestamp seen elsewhere (a peer's record, a held version, the value
    /// persisted by the last process) unless it is from the future.
    pub fn observe(&mut self, remote: u64, wall_ms: u64) -> Observed {
        if self.is_future(remote, wall_ms) {
            return Observed::Future;
        }
        self.last = self.last.max(remote);
        Observed::Taken
    }

    /// The timestamp of a client write over `held` (the key's current version's
    /// timestamp, if any): the clock's next timestamp, or just after `held` when that
    /// is not newer. A held timestamp from the future is superseded without moving the
    /// clock. `None` when nothing is newer than `held` (it is `u64::MAX`).
    pub fn stamp_over(&mut self, held: Option<u64>, wall_ms: u64) -> Option<u64> {
        if let Some(h) = held {
            self.observe(h, wall_ms);
        }
        let ts = self.now(wall_ms);
        match held {
            Some(h) if ts <= h => h.checked_add(1),
            _ => Some(ts),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const WALL: u64 = 1_700_000_000_000;

    #[test]
    fn packing_orders_by_physical_then_counter() {
        assert_eq!(ms(from_ms(WALL)), WALL);
        assert_eq!(counter(from_ms(WALL) + 7), 7);
        assert!(from_ms(WALL) + 65_535 < from_ms(WALL + 1));
        assert_eq!(ms(from_ms(u64::MAX)), MAX_MS, "no overflow on absurd input");
    }

    #[test]
    fn a_burst_goes_into_the_counter_not_ahead_of_the_wall_clock() {
        let mut c = Hlc::new(500);
        let mut last = 0;
        // 50,000 writes within one millisecond, then 44,000 writes a second for 5 s.
        for _ in 0..50_000 {
            let ts = c.now(WALL);
            assert!(ts > last);
            last = ts;
        }
        assert_eq!(ms(last), WALL);
        for i in 0..220_000u64 {
            let wall = WALL + 1 + i / 44;
            let ts = c.now(wall);
            assert!(ts > last);
            assert!(ms(ts) <= wall, "physical part never ahead of the wall clock");
            last = ts;
        }
    }

    #[test]
    fn a_timestamp_within_the_bound_is_taken_one_beyond_is_not() {
        let mut c = Hlc::new(500);
        assert_eq!(c.observe(from_ms(WALL + 500) + 3, WALL), Observed::Taken);
        assert!(c.now(WALL) > from_ms(WALL + 500) + 3, "causality: after what was seen");
        let before = c.last();
        assert_eq!(c.observe(from_ms(WALL + 120_000), WALL), Observed::Future);
        assert_eq!(c.last(), before, "a clock from the future does not drag this one");
        assert_eq!(c.observe(u64::MAX, WALL), Observed::Future);
        assert_eq!(ms(c.now(WALL + 1000)), WALL + 1000);
    }

    #[test]
    fn a_write_over_a_future_version_supersedes_it_without_moving_the_clock() {
        let mut c = Hlc::new(500);
        let held = from_ms(WALL + 120_000);
        let ts = c.stamp_over(Some(held), WALL).unwrap();
        assert_eq!(ts, held + 1, "ordered just after the held version");
        let other = c.stamp_over(None, WALL + 1).unwrap();
        assert_eq!(ms(other), WALL + 1, "writes to other keys stay on real time");
        assert_eq!(c.stamp_over(Some(u64::MAX), WALL), None, "nothing is newer: refused, never overflows");
        assert_eq!(c.ceiling(WALL), from_ms(WALL + 1_251) - 1, "2.5 bounds ahead");
        assert_eq!(c.ceiling(u64::MAX), u64::MAX);
    }

    #[test]
    fn a_wall_clock_stepped_back_far_takes_the_clock_back_with_it() {
        let mut c = Hlc::new(500);
        let ahead = c.now(WALL + 3_600_000);
        let back = c.now(WALL);
        assert_eq!(back, from_ms(WALL), "not an hour ahead: peers would hold every write back");
        assert!(ms(ahead) > ms(back));
        // Within the bound the clock stays monotonic.
        let near = c.now(WALL + 400);
        assert!(c.now(WALL + 100) > near);
        // And a key's next version still supersedes the one written an hour ahead.
        assert!(c.stamp_over(Some(ahead), WALL).unwrap() > ahead);
    }

    #[test]
    fn a_write_over_a_near_version_moves_the_clock_past_it() {
        let mut c = Hlc::new(500);
        let held = from_ms(WALL + 200) + 9;
        let ts = c.stamp_over(Some(held), WALL).unwrap();
        assert_eq!(ts, held + 1);
        assert!(c.stamp_over(None, WALL).unwrap() > ts);
        let older = from_ms(WALL - 1000);
        assert!(c.stamp_over(Some(older), WALL + 1).unwrap() > older);
    }
}
