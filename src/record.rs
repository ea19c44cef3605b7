//! The stored version of one key, and the rule that decides between two versions.
//!
//! A [`Record`] is `{uuid, timestamp, data}`; a delete is a record without data (a
//! tombstone) so that the delete itself can replicate. Two records for one key are
//! compared by [`compare`]: the higher timestamp wins; the same timestamp and uuid are
//! one version; the same timestamp with different uuids is a collision, which the
//! conflict module settles by a cluster-wide vote.

use bytes::Bytes;
use uuid::Uuid;

const KIND_VALUE: u8 = 1;
const KIND_TOMBSTONE: u8 = 2;
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
        std::cmp::Ordering::Equal => Ordering::Collision,
    }
}

/// A stored record could not be decoded: the database holds bytes kvs did not write.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CorruptRecord;

impl Record {
    /// A live value.
    pub fn value(timestamp: u64, uuid: Uuid, data: Bytes) -> Record {
        Record { timestamp, uuid, data: Some(data) }
    }

    /// A delete marker.
    pub fn tombstone(timestamp: u64, uuid: Uuid) -> Record {
        Record { timestamp, uuid, data: None }
    }

    /// True for a delete marker.
    pub fn is_tombstone(&self) -> bool {
        self.data.is_none()
    }

    /// Storage encoding: kind (1 byte), timestamp (8, big-endian), uuid (16), data.
    pub fn encode(&self) -> Vec<u8> {
        let data = self.data.as_deref().unwrap_or_default();
        let mut out = Vec::with_capacity(HEADER_LEN + data.len());
        out.push(if self.data.is_some() { KIND_VALUE } else { KIND_TOMBSTONE });
        out.extend_from_slice(&self.timestamp.to_be_bytes());
        out.extend_from_slice(self.uuid.as_bytes());
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
        let data = match bytes[0] {
            KIND_VALUE => Some(Bytes::copy_from_slice(&bytes[HEADER_LEN..])),
            KIND_TOMBSTONE if bytes.len() == HEADER_LEN => None,
            _ => return Err(CorruptRecord),
        };
        Ok(Record { timestamp, uuid, data })
    }

    /// True if an encoded record is a tombstone, without copying its data.
    pub fn encoded_is_tombstone(bytes: &[u8]) -> bool {
        bytes.first() == Some(&KIND_TOMBSTONE)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(ts: u64, id: u128, data: Option<&'static str>) -> Record {
        Record { timestamp: ts, uuid: Uuid::from_u128(id), data: data.map(|d| Bytes::from_static(d.as_bytes())) }
    }

    #[test]
    fn encoding_round_trips() {
        for r in [rec(1, 7, Some("{\"a\":1}")), rec(u64::MAX, 0, None), rec(0, u128::MAX, Some(""))] {
            let bytes = r.encode();
            assert_eq!(Record::decode(&bytes), Ok(r.clone()));
            assert_eq!(Record::encoded_is_tombstone(&bytes), r.is_tombstone());
        }
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
