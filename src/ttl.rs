//! Expiry (`PUT /kv/<path>?ttl=<s>`): the rules, with no I/O (ARCHITECTURE.md,
//! "Expiry (TTL)").
//!
//! A version written with a TTL carries `expires` (the physical part of its timestamp
//! plus the TTL, Unix ms). Reads treat it as absent from then on
//! ([`crate::record::Record::is_live_at`]); the expiry sweep later replaces it with its
//! [`expiry_tombstone`], which every node derives the same from the same version.

use crate::hlc;
use crate::record::Record;
use uuid::Uuid;

/// Shortest TTL, in seconds.
pub const MIN_TTL_S: u64 = 1;
/// Longest TTL, in seconds: ten years of 365 days.
pub const MAX_TTL_S: u64 = 10 * 365 * 86_400;

/// The namespace of expiry tombstone uuids (UUIDv5); fixed forever: changing it would
/// make nodes of two versions derive different tombstones.
const EXPIRY_NAMESPACE: Uuid = Uuid::from_u128(0x6b76_7300_e4b1_4c1e_9a7d_2f1b_6c0e_5a11);

/// Parses a `ttl` parameter: whole seconds from [`MIN_TTL_S`] to [`MAX_TTL_S`]; the
/// answer is in ms.
pub fn parse_ttl(raw: &str) -> Result<u64, String> {
    let secs: u64 = raw.parse().map_err(|_| format!("ttl must be a whole number of seconds, not {raw:?}"))?;
    if !(MIN_TTL_S..=MAX_TTL_S).contains(&secs) {
        return Err(format!("ttl must be from {MIN_TTL_S} to {MAX_TTL_S} seconds (10 years), not {secs}"));
    }
    Ok(secs * 1000)
}

/// The expiry of a version stamped `timestamp` with a TTL of `ttl_ms`.
pub fn expires_at(timestamp: u64, ttl_ms: u64) -> u64 {
    hlc::ms(timestamp).saturating_add(ttl_ms)
}

/// The uuid of the tombstone a version with uuid `version` becomes when it expires.
pub fn expiry_uuid(version: Uuid) -> Uuid {
    Uuid::new_v5(&EXPIRY_NAMESPACE, version.as_bytes())
}

/// The tombstone `version` becomes once expired: its timestamp, a uuid derived from its
/// uuid, and its expiry (so a receiver can tell one made early by a wrong clock). It
/// follows exactly that version in the merge order ([`crate::record::compare`]), so
/// any later write supersedes it.
pub fn expiry_tombstone(version: &Record) -> Record {
    Record { expires: version.expires, ..Record::tombstone(version.timestamp, expiry_uuid(version.uuid)) }
}

/// Whether the expiry sweep may replace `held` with its expiry tombstone at `wall_ms`:
/// a value with the expiry the sweep listed (`expires`: whichever version holds it
/// now), and only once expired.
pub fn may_expire(held: Option<&Record>, expires: u64, wall_ms: u64) -> bool {
    held.is_some_and(|r| r.indexed_expiry() == Some(expires) && r.is_expired_at(wall_ms))
}

/// Whether a replicated record's expiry is plausible for its timestamp (a TTL from
/// [`MIN_TTL_S`] to [`MAX_TTL_S`]); anything else is refused like bad input.
pub fn plausible_expiry(timestamp: u64, expires: u64) -> bool {
    let from = hlc::ms(timestamp);
    (from.saturating_add(MIN_TTL_S * 1000)..=from.saturating_add(MAX_TTL_S * 1000)).contains(&expires)
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;

    #[test]
    fn ttl_is_whole_seconds_within_range() {
        assert_eq!(parse_ttl("1"), Ok(1000));
        assert_eq!(parse_ttl("315360000"), Ok(315_360_000_000));
        for bad in ["0", "315360001", "-1", "1.5", "", "abc", "99999999999999999999999"] {
            assert!(parse_ttl(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn the_expiry_tombstone_is_the_same_wherever_it_is_derived() {
        let v = Record { expires: Some(5_000), ..Record::value(hlc::from_ms(1_000), Uuid::new_v4(), Bytes::from("1")) };
        let (a, b) = (expiry_tombstone(&v), expiry_tombstone(&v.clone()));
        assert_eq!(a, b);
        assert_eq!(a.timestamp, v.timestamp);
        assert_ne!(a.uuid, v.uuid);
        assert_ne!(expiry_uuid(Uuid::new_v4()), a.uuid, "another version, another tombstone");
        assert_eq!(expires_at(v.timestamp, 4_000), 5_000);
        assert_eq!(expires_at(u64::MAX, u64::MAX), u64::MAX, "no overflow");
    }

    #[test]
    fn the_sweep_expires_only_the_listed_version_once_expired() {
        let v = Record { expires: Some(5_000), ..Record::value(1, Uuid::from_u128(1), Bytes::from("1")) };
        assert!(!may_expire(Some(&v), 5_000, 4_999));
        assert!(may_expire(Some(&v), 5_000, 5_000));
        let other = Record { uuid: Uuid::from_u128(2), ..v.clone() };
        assert!(may_expire(Some(&other), 5_000, 5_000), "another version with the same expiry: swept too");
        assert!(!may_expire(Some(&Record { expires: Some(6_000), ..v.clone() }), 5_000, 9_000), "rewritten since");
        assert!(!may_expire(Some(&expiry_tombstone(&v)), 5_000, 5_000));
        assert!(!may_expire(None, 5_000, 5_000));
    }

    #[test]
    fn a_replicated_expiry_must_fit_a_ttl_from_its_timestamp() {
        let ts = hlc::from_ms(1_000_000);
        assert!(plausible_expiry(ts, 1_001_000));
        assert!(plausible_expiry(ts, 1_000_000 + MAX_TTL_S * 1000));
        assert!(!plausible_expiry(ts, 1_000_999));
        assert!(!plausible_expiry(ts, 0));
        assert!(!plausible_expiry(ts, u64::MAX));
    }
}
