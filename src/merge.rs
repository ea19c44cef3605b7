//! The write decisions, as pure functions of the version a path holds.
//!
//! The writer thread ([`crate::storage`]) reads the held version, calls one of these,
//! and stages what it answers; it decides nothing itself. Keeping the decisions here,
//! with the clock passed in, lets them be tested directly and lets the anti-entropy
//! property tests run the real rules.
//!
//! - [`client_version`]: the version a client PUT or DELETE creates.
//! - [`decide_apply`]: whether a replicated record is stored.
//! - [`Condition::holds`]: whether a conditional client write (`If-Match`,
//!   `If-None-Match`) may go ahead over the held version.
//! - [`may_replace`]: whether a vote's winner replaces the held version.
//! - [`may_purge`], [`may_discard`]: whether maintenance may drop the held version.

use crate::hlc::{self, Hlc};
use crate::record::{Ordering, Record, compare};
use bytes::Bytes;
use uuid::Uuid;

/// The condition a client write carries (`If-Match` / `If-None-Match`), checked by
/// the writer against the version it holds, in the same step as the write.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Condition {
    /// Unconditional.
    Always,
    /// `If-Match: *`: some live value is held.
    Exists,
    /// `If-Match: "<uuid>"`: the live value held is this version.
    Matches(Uuid),
    /// `If-None-Match: *`: no live value is held (absent or deleted): create only.
    Absent,
    /// `X-Kvs-If-Older-Than: <version>`: the version held, whatever it is (a value, a
    /// delete, an expired value, a purged delete's certificate), is older than this
    /// timestamp, or nothing is held: an import never overwrites a newer version.
    OlderThan(u64),
}

impl Condition {
    /// Whether a write with this condition may go ahead over `held` (the held
    /// version, or the tombstone of a purged delete's certificate; a tombstone, like
    /// nothing or a value expired at `wall_ms`, is no live value).
    pub fn holds(self, held: Option<&Record>, wall_ms: u64) -> bool {
        let live = held.filter(|r| r.is_live_at(wall_ms));
        match self {
            Condition::Always => true,
            Condition::Exists => live.is_some(),
            Condition::Matches(uuid) => live.is_some_and(|r| r.uuid == uuid),
            Condition::Absent => live.is_none(),
            Condition::OlderThan(ts) => held.is_none_or(|r| r.timestamp < ts),
        }
    }
}

/// The version a client write creates over `held`: a fresh uuid and a timestamp from
/// [`Hlc::stamp_over`], so it supersedes whatever the node holds for the path (an
/// expired value included: its expiry orders nothing). A value written with a TTL
/// (`ttl_ms`) expires that long after its timestamp ([`crate::ttl::expires_at`]).
/// `None` when no timestamp can (the held one is the last there is): the write must
/// be refused, not acknowledged and lost.
pub fn client_version(
    clock: &mut Hlc,
    held: Option<&Record>,
    wall_ms: u64,
    uuid: Uuid,
    (data, ttl_ms): (Option<Bytes>, Option<u64>),
) -> Option<Record> {
    let timestamp = clock.stamp_over(held.map(|r| r.timestamp), wall_ms)?;
    let expires = ttl_ms.filter(|_| data.is_some()).map(|ttl| crate::ttl::expires_at(timestamp, ttl));
    Some(Record { timestamp, uuid, data, expires })
}

/// Limits on which replicated records are taken: for paths held nowhere here, and
/// from the future.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Floors {
    /// Tombstones older than this are past the grace period: storing one for an absent
    /// path would only purge it again.
    pub tombstone: u64,
    /// Records at or below this come from a sender that may have missed a delete this
    /// node has purged (0: no such limit).
    pub absent: u64,
    /// Records above this are further ahead than any node that passes the clock check
    /// can write ([`Hlc::ceiling`]): held back, whatever is held (`u64::MAX`: no such
    /// limit).
    pub future: u64,
}

impl Default for Floors {
    /// No limit at all.
    fn default() -> Floors {
        Floors { tombstone: 0, absent: 0, future: u64::MAX }
    }
}

/// What to do with one replicated record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    /// Newer than what is held: store it.
    Store,
    /// Older, the same version, or refused for an absent path: keep what is held.
    Skip,
    /// Same timestamp, different uuid: keep what is held and let a vote decide.
    Collision,
    /// The path's delete was purged here after every member held it, and the incoming
    /// record is not newer than that delete: it comes from a node that missed the
    /// delete (it was away, and removed, while the cluster purged). Refuse it and bring
    /// the delete back as a live tombstone, so it reaches that node too.
    Reawaken,
    /// From more than the clock bound ahead of this node's wall clock: not stored. The
    /// nodes that hold it keep it and offer it again; it is taken once this node's
    /// clock is within the bound of it (ARCHITECTURE.md, clock rule 3a).
    Future,
}

/// Whether a replicated `incoming` record replaces `held`; `dormant` is the timestamp
/// of the certificate of a purged delete of the path, if this node keeps one.
pub fn decide_apply(held: Option<&Record>, dormant: Option<u64>, incoming: &Record, floors: Floors) -> Decision {
    if incoming.timestamp > floors.future {
        return Decision::Future;
    }
    // An expiry tombstone whose expiry is beyond the same bound was made by a node whose
    // clock runs ahead: held back until this node's clock is near the expiry, so one
    // wrong clock cannot expire values early everywhere (ARCHITECTURE.md, "Expiry").
    if incoming.is_tombstone() && incoming.expires.is_some_and(|e| hlc::from_ms(e) > floors.future) {
        return Decision::Future;
    }
    match compare(held, incoming) {
        Ordering::Newer if held.is_none() => {
            if dormant.is_some_and(|d| incoming.timestamp <= d) {
                // An older delete changes nothing; an older value is the delete's victim.
                return if incoming.is_tombstone() { Decision::Skip } else { Decision::Reawaken };
            }
            let expired = incoming.is_tombstone() && incoming.timestamp < floors.tombstone;
            if expired || incoming.timestamp <= floors.absent { Decision::Skip } else { Decision::Store }
        }
        Ordering::Newer => Decision::Store,
        Ordering::Older | Ordering::Same => Decision::Skip,
        Ordering::Collision => Decision::Collision,
    }
}

/// Whether a vote's `winner` replaces `held`: only a collision's loser is replaced
/// (the path still holds the collision's timestamp, with another uuid). Without
/// `if_timestamp` (tools writing chosen versions), anything different is replaced.
pub fn may_replace(held: Option<&Record>, winner: &Record, if_timestamp: Option<u64>) -> bool {
    match if_timestamp {
        Some(ts) => held.is_some_and(|h| h.timestamp == ts && h.uuid != winner.uuid),
        None => held != Some(winner),
    }
}

/// Whether maintenance may purge the tombstone it listed at `timestamp`: only if it is
/// still the path's current version (a newer write since then is kept).
pub fn may_purge(held: Option<&Record>, timestamp: u64) -> bool {
    held.is_some_and(|r| r.is_tombstone() && r.timestamp == timestamp)
}

/// Whether a stale node may discard the held version: only if it is at or below the
/// horizon up to which a peer has purged deletes.
pub fn may_discard(held: Option<&Record>, up_to: u64) -> bool {
    held.is_some_and(|r| r.timestamp <= up_to)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hlc::{from_ms, ms};

    const WALL: u64 = 1_700_000_000_000;

    fn rec(ts: u64, id: u128, data: Option<&'static str>) -> Record {
        Record {
            timestamp: ts,
            uuid: Uuid::from_u128(id),
            data: data.map(|d| Bytes::from_static(d.as_bytes())),
            expires: None,
        }
    }

    #[test]
    fn conditions_judge_the_live_value_held() {
        let value = rec(5, 1, Some("1"));
        let tomb = rec(6, 2, None);
        let cases = [
            (Condition::Always, [true, true, true]),
            (Condition::Exists, [false, true, false]),
            (Condition::Matches(Uuid::from_u128(1)), [false, true, false]),
            (Condition::Matches(Uuid::from_u128(2)), [false, false, false]),
            (Condition::Absent, [true, false, true]),
        ];
        for (condition, want) in cases {
            let got =
                [condition.holds(None, WALL), condition.holds(Some(&value), WALL), condition.holds(Some(&tomb), WALL)];
            assert_eq!(got, want, "{condition:?} over nothing, a value, a tombstone");
            // A value past its expiry is judged as a tombstone is; before it, as a value.
            let expiring = Record { expires: Some(WALL), ..value.clone() };
            assert_eq!(condition.holds(Some(&expiring), WALL), want[2], "{condition:?} over an expired value");
            assert_eq!(condition.holds(Some(&expiring), WALL - 1), want[1], "{condition:?} before the expiry");
        }
        // Older-than judges any version held, deletes included.
        for (held, ts, want) in
            [(None, 1, true), (Some(&value), 6, true), (Some(&value), 5, false), (Some(&tomb), 6, false)]
        {
            assert_eq!(Condition::OlderThan(ts).holds(held, WALL), want, "{held:?} older than {ts}");
        }
    }

    #[test]
    fn a_client_write_supersedes_the_held_version_and_stays_on_real_time() {
        let mut clock = Hlc::new(500);
        let future = rec(from_ms(WALL + 120_000), 1, Some("1"));
        let v = client_version(&mut clock, Some(&future), WALL, Uuid::from_u128(2), (None, None)).unwrap();
        assert_eq!(compare(Some(&future), &v), Ordering::Newer);
        assert!(v.is_tombstone());
        let fresh =
            client_version(&mut clock, None, WALL, Uuid::from_u128(3), (Some(Bytes::from_static(b"1")), None)).unwrap();
        assert_eq!(ms(fresh.timestamp), WALL);
        assert_eq!(fresh.expires, None);
    }

    #[test]
    fn a_ttl_write_expires_after_its_own_timestamp_and_a_later_write_clears_it() {
        let mut clock = Hlc::new(500);
        let data = || Some(Bytes::from_static(b"1"));
        let v = client_version(&mut clock, None, WALL, Uuid::from_u128(1), (data(), Some(2_000))).unwrap();
        assert_eq!(v.expires, Some(WALL + 2_000));
        // Over the expired value: ordered after it, with no expiry of its own.
        let after = client_version(&mut clock, Some(&v), WALL + 5_000, Uuid::from_u128(2), (data(), None)).unwrap();
        assert_eq!((compare(Some(&v), &after), after.expires), (Ordering::Newer, None));
        // A delete never carries an expiry.
        let del = client_version(&mut clock, Some(&after), WALL + 5_000, Uuid::from_u128(3), (None, Some(1))).unwrap();
        assert_eq!(del.expires, None);
    }

    #[test]
    fn a_version_at_the_end_of_time_refuses_the_write_instead_of_losing_it() {
        let mut clock = Hlc::new(500);
        let end = rec(u64::MAX, 1, Some("1"));
        assert_eq!(client_version(&mut clock, Some(&end), WALL, Uuid::from_u128(2), (None, None)), None);
        let almost = rec(u64::MAX - 1, 1, Some("1"));
        let v = client_version(&mut clock, Some(&almost), WALL, Uuid::from_u128(2), (None, None)).unwrap();
        assert_eq!(v.timestamp, u64::MAX);
        assert!(ms(clock.now(WALL)) == WALL, "the clock did not follow either");
    }

    #[test]
    fn an_expiry_tombstone_is_held_back_until_its_expiry_is_within_the_clock_bound() {
        let v = Record { expires: Some(WALL + 60_000), ..rec(from_ms(WALL), 1, Some("1")) };
        let t = crate::ttl::expiry_tombstone(&v);
        let floors = |wall: u64| Floors { future: Hlc::new(500).ceiling(wall), ..Floors::default() };
        assert_eq!(decide_apply(Some(&v), None, &t, floors(WALL)), Decision::Future, "a minute early");
        assert_eq!(decide_apply(Some(&v), None, &t, floors(WALL + 59_000)), Decision::Store, "within 2.5 bounds");
        // An ordinary delete at the same timestamp is judged by its timestamp only.
        let delete = rec(from_ms(WALL) + 1, 2, None);
        assert_eq!(decide_apply(Some(&v), None, &delete, floors(WALL)), Decision::Store);
    }

    #[test]
    fn records_from_beyond_the_clock_bound_are_held_back_whatever_is_held() {
        let clock = Hlc::new(500);
        let floors = Floors { future: clock.ceiling(WALL), ..Floors::default() };
        // Two nodes that both pass the clock check can be 2.5 bounds apart.
        let at_bound = rec(from_ms(WALL + 1_250) + 7, 1, Some("1"));
        let beyond = rec(from_ms(WALL + 1_251), 1, Some("1"));
        assert_eq!(decide_apply(None, None, &at_bound, floors), Decision::Store);
        assert_eq!(decide_apply(None, None, &beyond, floors), Decision::Future);
        assert_eq!(decide_apply(Some(&rec(5, 2, None)), None, &beyond, floors), Decision::Future);
        let end = rec(u64::MAX, 1, None);
        assert_eq!(decide_apply(None, Some(10), &end, floors), Decision::Future);
        // Later, with the wall clock within the bound of it, it is taken.
        let later = Floors { future: clock.ceiling(WALL + 1), ..Floors::default() };
        assert_eq!(decide_apply(None, None, &beyond, later), Decision::Store);
    }

    #[test]
    fn apply_takes_newer_skips_older_and_reports_collisions() {
        let held = rec(10, 1, Some("1"));
        let none = Floors::default();
        assert_eq!(decide_apply(Some(&held), None, &rec(11, 2, None), none), Decision::Store);
        assert_eq!(decide_apply(Some(&held), None, &rec(9, 2, Some("2")), none), Decision::Skip);
        assert_eq!(decide_apply(Some(&held), None, &held.clone(), none), Decision::Skip);
        assert_eq!(decide_apply(Some(&held), None, &rec(10, 3, Some("3")), none), Decision::Collision);
        assert_eq!(decide_apply(None, None, &rec(5, 1, None), none), Decision::Store);
    }

    #[test]
    fn floors_only_refuse_records_for_absent_paths() {
        let floors = Floors { tombstone: 100, absent: 50, ..Floors::default() };
        assert_eq!(decide_apply(None, None, &rec(99, 1, None), floors), Decision::Skip, "expired tombstone");
        assert_eq!(decide_apply(None, None, &rec(100, 1, None), floors), Decision::Store);
        assert_eq!(decide_apply(None, None, &rec(50, 1, Some("1")), floors), Decision::Skip, "from a stale sender");
        assert_eq!(decide_apply(None, None, &rec(51, 1, Some("1")), floors), Decision::Store);
        let held = rec(10, 2, Some("1"));
        assert_eq!(decide_apply(Some(&held), None, &rec(40, 1, None), floors), Decision::Store, "held: newer wins");
    }

    #[test]
    fn a_purged_delete_catches_what_it_deleted() {
        let none = Floors::default();
        assert_eq!(decide_apply(None, Some(20), &rec(15, 1, Some("old")), none), Decision::Reawaken);
        assert_eq!(decide_apply(None, Some(20), &rec(20, 1, None), none), Decision::Skip, "the delete itself");
        assert_eq!(decide_apply(None, Some(20), &rec(19, 1, None), none), Decision::Skip, "an older delete");
        assert_eq!(decide_apply(None, Some(20), &rec(21, 1, Some("new")), none), Decision::Store, "a later write");
    }

    #[test]
    fn only_a_collision_loser_is_replaced() {
        let loser = rec(10, 1, Some("1"));
        let winner = rec(10, 2, Some("2"));
        assert!(may_replace(Some(&loser), &winner, Some(10)));
        assert!(!may_replace(Some(&winner), &winner, Some(10)), "already the winner");
        assert!(!may_replace(Some(&rec(11, 3, None)), &winner, Some(10)), "a newer write since");
        assert!(!may_replace(None, &winner, Some(10)));
        assert!(may_replace(None, &winner, None));
        assert!(!may_replace(Some(&winner), &winner, None));
    }

    #[test]
    fn purge_and_discard_keep_newer_versions() {
        assert!(may_purge(Some(&rec(10, 1, None)), 10));
        assert!(!may_purge(Some(&rec(11, 1, None)), 10), "deleted again since");
        assert!(!may_purge(Some(&rec(10, 1, Some("1"))), 10), "written since");
        assert!(!may_purge(None, 10));
        assert!(may_discard(Some(&rec(10, 1, Some("1"))), 10));
        assert!(!may_discard(Some(&rec(11, 1, Some("1"))), 10));
        assert!(!may_discard(None, 10));
    }
}
