//! The stored version of one key, and the rule that decides between two versions.
//!
//! A [`Record`] is `{uuid, timestamp, data, expires}`; a delete is a record without
//! data (a tombstone) so that the delete itself can replicate. Two records for one key
//! are compared by [`compare`]: the higher timestamp wins; the same timestamp and uuid
//! are one version; a version's expiry tombstone ([`crate::ttl`]) follows the version
//! at its timestamp; any other two versions with the same timestamp are a collision,
//! which the conflict module settles by a cluster-wide vote.

use bytes::Bytes;
use uuid::Uuid;

const KIND_VALUE: u8 = 1;
const KIND_TOMBSTONE: u8 = 2;
/// A value with an expiry: the expiry (8 bytes, Unix ms, BE) comes before the data.
const KIND_EXPIRING: u8 = 3;
/// An expiry tombstone ([`crate::ttl::expiry_tombstone`]): the expiry of the version
/// it replaced (8 bytes, Unix ms, BE), no data.
const KIND_EXPIRED: u8 = 4;
const HEADER_LEN: usize = 1 + 8 + 16;

/// One version of one key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    /// Unix milliseconds when the version was written; strictly increasing per node.
    pub timestamp: u64,
    /// Identity of the version: the same write keeps its uuid on every node.
    pub uuid: Uuid,
    /// The JSON bytes exactly as the client sent them; `None` for a tombstone.
    pub data: Option<Bytes>,
    /// Unix ms from which this value reads as absent (`PUT ?ttl`); `None`: never. On a
    /// tombstone: the expiry of the version it replaced (an expiry tombstone), which
    /// lets every receiver judge it by its own clock.
    pub expires: Option<u64>,
}

/// How an incoming version relates to the one held locally.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ordering {
    /// The incoming version is newer (or nothing is held): store it.
    Newer,
    /// The local version is newer: keep it.
    Older,
    /// Both are the same version: nothing to do.
    Same,
    /// Same timestamp, different uuids: only a vote can decide.
    Collision,
}

/// Compares an incoming version with the local one (if any).
pub fn compare(local: Option<&Record>, incoming: &Record) -> Ordering {
    let Some(local) = local else { return Ordering::Newer };
    match incoming.timestamp.cmp(&local.timestamp) {
        std::cmp::Ordering::Greater => Ordering::Newer,
        std::cmp::Ordering::Less => Ordering::Older,
        std::cmp::Ordering::Equal if incoming.uuid == local.uuid => Ordering::Same,
        // A version's expiry tombstone comes right after it (ARCHITECTURE.md, "Expiry").
        std::cmp::Ordering::Equal if incoming.is_expiry_of(local) => Ordering::Newer,
        std::cmp::Ordering::Equal if local.is_expiry_of(incoming) => Ordering::Older,
        std::cmp::Ordering::Equal => Ordering::Collision,
    }
}

/// A stored record could not be decoded: the database holds bytes kvs did not write.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CorruptRecord;

impl Record {
    /// A live value.
    pub fn value(timestamp: u64, uuid: Uuid, data: Bytes) -> Record {
        Record { timestamp, uuid, data: Some(data), expires: None }
    }

    /// A delete marker.
    pub fn tombstone(timestamp: u64, uuid: Uuid) -> Record {
        Record { timestamp, uuid, data: None, expires: None }
    }

    /// True for a delete marker.
    pub fn is_tombstone(&self) -> bool {
        self.data.is_none()
    }

    /// True for a value that has not expired at `wall_ms` (Unix ms): what reads show.
    pub fn is_live_at(&self, wall_ms: u64) -> bool {
        self.data.is_some() && self.expires.is_none_or(|e| wall_ms < e)
    }

    /// True for a value whose expiry has passed at `wall_ms`.
    pub fn is_expired_at(&self, wall_ms: u64) -> bool {
        self.data.is_some() && self.expires.is_some_and(|e| wall_ms >= e)
    }

    /// True if this is the expiry tombstone of `version` ([`crate::ttl::expiry_tombstone`]):
    /// derived from it, and carrying its expiry (or none: the tombstone brought back
    /// from a purge certificate, which keeps only timestamp and uuid).
    pub fn is_expiry_of(&self, version: &Record) -> bool {
        self.is_tombstone()
            && version.expires.is_some()
            && self.expires.is_none_or(|e| Some(e) == version.expires)
            && self.timestamp == version.timestamp
            && self.uuid == crate::ttl::expiry_uuid(version.uuid)
    }

    /// The expiry this record puts in the `expiry` index: a value's (tombstones have
    /// nothing left to expire).
    pub fn indexed_expiry(&self) -> Option<u64> {
        self.expires.filter(|_| !self.is_tombstone())
    }

    /// Storage encoding: kind (1 byte), timestamp (8, big-endian), uuid (16), for kinds
    /// 3 and 4 the expiry (8, big-endian), data.
    pub fn encode(&self) -> Vec<u8> {
        let data = self.data.as_deref().unwrap_or_default();
        let mut out = Vec::with_capacity(HEADER_LEN + 8 + data.len());
        out.push(match (&self.data, self.expires) {
            (None, None) => KIND_TOMBSTONE,
            (None, Some(_)) => KIND_EXPIRED,
            (Some(_), None) => KIND_VALUE,
            (Some(_), Some(_)) => KIND_EXPIRING,
        });
        out.extend_from_slice(&self.timestamp.to_be_bytes());
        out.extend_from_slice(self.uuid.as_bytes());
        if let Some(e) = self.expires {
            out.extend_from_slice(&e.to_be_bytes());
        }
        out.extend_from_slice(data);
        out
    }

    /// Decodes [`Record::encode`]'s output.
    pub fn decode(bytes: &[u8]) -> Result<Record, CorruptRecord> {
        if bytes.len() < HEADER_LEN {
            return Err(CorruptRecord);
        }
        let timestamp = u64::from_be_bytes(bytes[1..9].try_into().map_err(|_| CorruptRecord)?);
        let uuid = Uuid::from_slice(&bytes[9..HEADER_LEN]).map_err(|_| CorruptRecord)?;
        let (data, expires) = match bytes[0] {
            KIND_VALUE => (Some(Bytes::copy_from_slice(&bytes[HEADER_LEN..])), None),
            KIND_TOMBSTONE if bytes.len() == HEADER_LEN => (None, None),
            KIND_EXPIRING => {
                let expires = Self::encoded_expires(bytes).ok_or(CorruptRecord)?;
                (Some(Bytes::copy_from_slice(&bytes[HEADER_LEN + 8..])), Some(expires))
            }
            KIND_EXPIRED if bytes.len() == HEADER_LEN + 8 => (None, Self::encoded_expires(bytes)),
            _ => return Err(CorruptRecord),
        };
        Ok(Record { timestamp, uuid, data, expires })
    }

    /// True if an encoded record is a tombstone, without copying its data.
    pub fn encoded_is_tombstone(bytes: &[u8]) -> bool {
        matches!(bytes.first(), Some(&KIND_TOMBSTONE | &KIND_EXPIRED))
    }

    /// The expiry of an encoded record, without copying its data.
    pub fn encoded_expires(bytes: &[u8]) -> Option<u64> {
        if !matches!(bytes.first(), Some(&KIND_EXPIRING | &KIND_EXPIRED)) {
            return None;
        }
        bytes.get(HEADER_LEN..HEADER_LEN + 8).and_then(|b| b.try_into().ok()).map(u64::from_be_bytes)
    }

    /// [`Record::is_live_at`] of an encoded record, without copying its data.
    pub fn encoded_is_live_at(bytes: &[u8], wall_ms: u64) -> bool {
        !Self::encoded_is_tombstone(bytes) && Self::encoded_expires(bytes).is_none_or(|e| wall_ms < e)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(ts: u64, id: u128, data: Option<&'static str>) -> Record {
        Record {
            timestamp: ts,
            uuid: Uuid::from_u128(id),
            data: data.map(|d| Bytes::from_static(d.as_bytes())),
            expires: None,
        }
    }

    #[test]
    fn encoding_round_trips() {
        let expiring = Record { expires: Some(1_700_000_060_000), ..rec(9, 3, Some("[1]")) };
        let expiring_empty = Record { expires: Some(0), ..rec(9, 3, Some("")) };
        for r in [
            rec(1, 7, Some("{\"a\":1}")),
            rec(u64::MAX, 0, None),
            rec(0, u128::MAX, Some("")),
            expiring.clone(),
            expiring_empty,
            crate::ttl::expiry_tombstone(&expiring),
        ] {
            let bytes = r.encode();
            assert_eq!(Record::decode(&bytes), Ok(r.clone()));
            assert_eq!(Record::encoded_is_tombstone(&bytes), r.is_tombstone());
            assert_eq!(Record::encoded_expires(&bytes), r.expires);
            for wall in [0, 1_700_000_059_999, 1_700_000_060_000, u64::MAX] {
                assert_eq!(Record::encoded_is_live_at(&bytes, wall), r.is_live_at(wall));
            }
        }
    }

    #[test]
    fn an_expiring_value_reads_as_absent_from_its_expiry_on() {
        let v = Record { expires: Some(1000), ..rec(9, 3, Some("1")) };
        assert!(v.is_live_at(999) && !v.is_expired_at(999));
        assert!(!v.is_live_at(1000) && v.is_expired_at(1000));
        assert!(rec(9, 3, Some("1")).is_live_at(u64::MAX), "no expiry: live forever");
        assert!(!rec(9, 3, None).is_live_at(0) && !rec(9, 3, None).is_expired_at(u64::MAX));
    }

    #[test]
    fn an_expiry_tombstone_follows_exactly_its_version() {
        let v = Record { expires: Some(1000), ..rec(9, 3, Some("1")) };
        let t = crate::ttl::expiry_tombstone(&v);
        assert_eq!((t.timestamp, t.is_tombstone()), (9, true));
        assert_eq!(compare(Some(&v), &t), Ordering::Newer);
        assert_eq!(compare(Some(&t), &v), Ordering::Older);
        assert_eq!(compare(Some(&t), &t.clone()), Ordering::Same);
        // Also as brought back from a purge certificate (timestamp and uuid only).
        let from_cert = Record::tombstone(t.timestamp, t.uuid);
        assert_eq!(compare(Some(&from_cert), &v), Ordering::Older);
        // Not for another version at the same timestamp, nor for a version without expiry,
        // nor with another expiry than its version's.
        assert_eq!(compare(Some(&rec(9, 4, Some("2"))), &t), Ordering::Collision);
        assert_eq!(compare(Some(&v), &Record { expires: Some(999), ..t.clone() }), Ordering::Collision);
        let plain = rec(9, 3, Some("1"));
        assert_eq!(compare(Some(&plain), &t), Ordering::Collision);
        // Any later write supersedes it, however close.
        assert_eq!(compare(Some(&t), &rec(10, 5, Some("2"))), Ordering::Newer);
    }

    #[test]
    fn corrupt_bytes_are_refused() {
        assert_eq!(Record::decode(&[]), Err(CorruptRecord));
        assert_eq!(Record::decode(&[KIND_VALUE; 10]), Err(CorruptRecord));
        let mut t = rec(5, 1, None).encode();
        t.push(b'x');
        assert_eq!(Record::decode(&t), Err(CorruptRecord));
        let mut v = rec(5, 1, Some("1")).encode();
        v[0] = 9;
        assert_eq!(Record::decode(&v), Err(CorruptRecord));
        // Kind 3 without its 8 expiry bytes.
        let mut short = rec(5, 1, None).encode();
        short[0] = KIND_EXPIRING;
        short.extend_from_slice(&[0; 7]);
        assert_eq!(Record::decode(&short), Err(CorruptRecord));
    }

    #[test]
    fn newest_timestamp_wins() {
        let old = rec(10, 1, Some("1"));
        let new = rec(11, 2, None);
        assert_eq!(compare(None, &old), Ordering::Newer);
        assert_eq!(compare(Some(&old), &new), Ordering::Newer);
        assert_eq!(compare(Some(&new), &old), Ordering::Older);
        assert_eq!(compare(Some(&old), &old.clone()), Ordering::Same);
        assert_eq!(compare(Some(&old), &rec(10, 3, Some("1"))), Ordering::Collision);
    }
}
