//! The binary encoding of record batches between nodes (push, sync, catch-up,
//! bootstrap). A batch is a sequence of frames:
//!
//! `path length (u16 BE) · path · timestamp (u64 BE) · uuid (16) · kind (1: value,
//! 2: tombstone, 3: value with expiry) · data length (u32 BE) · data`
//!
//! For kind 3, `data` is the expiry (u64 BE, Unix ms) followed by the value; kind 4 (an
//! expiry tombstone) has the expiry of the version it replaced as its only data. An
//! expiry must fit a TTL of 1 s to 10 years from the record's timestamp.
//!
//! Binary keeps a value's bytes exactly as the client sent them and costs no escaping.
//! [`decode`] checks every record like client input (key rules, size, JSON). A record
//! that fails is skipped and reported, and the rest of the batch is still taken: one
//! value a peer cannot accept (a larger `max_value_bytes` there, a bug) must not stop
//! everything after it from replicating. Only a batch whose framing is broken
//! (truncated, a length past the end) is refused whole, since nothing after the break
//! can be trusted.

use crate::api::validate_json;
use crate::path::validate_stored_key;
use crate::record::Record;
use bytes::{Buf, BufMut, Bytes, BytesMut};
use uuid::Uuid;

/// Content type of a record batch.
pub const CONTENT_TYPE: &str = "application/x-kvs-records";

/// Bytes one record takes in a batch.
pub fn encoded_len(path: &str, r: &Record) -> usize {
    2 + path.len() + 8 + 16 + 1 + 4 + r.data.as_ref().map_or(0, |d| d.len()) + expiry(r).map_or(0, |_| 8)
}

/// The expiry a record's frame carries (a value with a TTL, an expiry tombstone).
fn expiry(r: &Record) -> Option<u64> {
    r.expires
}

/// Appends one record to a batch.
pub fn put(buf: &mut BytesMut, path: &str, r: &Record) {
    let data = r.data.as_deref().unwrap_or_default();
    buf.reserve(encoded_len(path, r));
    buf.put_u16(path.len() as u16);
    buf.put_slice(path.as_bytes());
    buf.put_u64(r.timestamp);
    buf.put_slice(r.uuid.as_bytes());
    match expiry(r) {
        Some(expires) => {
            buf.put_u8(if r.is_tombstone() { 4 } else { 3 });
            buf.put_u32((data.len() + 8) as u32);
            buf.put_u64(expires);
        }
        None => {
            buf.put_u8(if r.is_tombstone() { 2 } else { 1 });
            buf.put_u32(data.len() as u32);
        }
    }
    buf.put_slice(data);
}

/// Encodes a whole batch.
pub fn encode<'a>(records: impl IntoIterator<Item = (&'a str, &'a Record)>) -> Bytes {
    let mut buf = BytesMut::new();
    for (p, r) in records {
        put(&mut buf, p, r);
    }
    buf.freeze()
}

/// A decoded batch: the records that passed the checks, and those that did not.
#[derive(Debug, Default, PartialEq)]
pub struct Decoded {
    /// Records that passed every check, in batch order.
    pub records: Vec<(String, Record)>,
    /// Records skipped: the path (lossy UTF-8) and why.
    pub refused: Vec<(String, String)>,
    /// Records in the batch, taken or not.
    pub framed: usize,
    /// Timestamp and path (lossy UTF-8) of the batch's last record, taken or not: a
    /// paging cursor must move past refused records too.
    pub last: Option<(u64, String)>,
}

/// Decodes and validates a batch; `max_value` bounds each value. `Err` only for broken
/// framing; a bad record is skipped into [`Decoded::refused`].
pub fn decode(mut bytes: Bytes, max_value: u64) -> Result<Decoded, String> {
    let mut out = Decoded::default();
    let mut n = 0usize;
    while bytes.has_remaining() {
        let truncated = || format!("record {n}: truncated");
        if bytes.remaining() < 2 {
            return Err(truncated());
        }
        let plen = bytes.get_u16() as usize;
        if bytes.remaining() < plen + 8 + 16 + 1 + 4 {
            return Err(truncated());
        }
        let raw_path = bytes.split_to(plen);
        let timestamp = bytes.get_u64();
        let uuid = Uuid::from_slice(&bytes.split_to(16)).map_err(|_| format!("record {n}: bad uuid"))?;
        let kind = bytes.get_u8();
        let dlen = bytes.get_u32() as usize;
        if bytes.remaining() < dlen {
            return Err(truncated());
        }
        let data = bytes.split_to(dlen);
        n += 1;
        out.framed = n;
        out.last = Some((timestamp, String::from_utf8_lossy(&raw_path).into_owned()));
        match check(&raw_path, kind, data, max_value) {
            Ok((path, data, expires)) if expires.is_none_or(|e| crate::ttl::plausible_expiry(timestamp, e)) => {
                out.records.push((path, Record { timestamp, uuid, data, expires }))
            }
            Ok((path, ..)) => out.refused.push((path, "expiry out of range for its timestamp".into())),
            Err(reason) => out.refused.push((String::from_utf8_lossy(&raw_path).into_owned(), reason)),
        }
    }
    Ok(out)
}

/// One record's checked path, value (`None`: a tombstone) and expiry.
type Checked = (String, Option<Bytes>, Option<u64>);

/// Checks one framed record like client input.
fn check(raw_path: &[u8], kind: u8, mut data: Bytes, max_value: u64) -> Result<Checked, String> {
    let path = std::str::from_utf8(raw_path).map_err(|_| "path is not UTF-8".to_string())?;
    validate_stored_key(path).map_err(|e| format!("path: {e}"))?;
    let expires = match kind {
        3 if data.len() < 8 => return Err("value with expiry: shorter than its expiry".into()),
        4 if data.len() != 8 => return Err("expiry tombstone: not 8 bytes of expiry".into()),
        3 | 4 => Some(data.get_u64()),
        _ => None,
    };
    let data = match kind {
        1 | 3 if data.len() as u64 > max_value => {
            return Err(format!("value of {} bytes is larger than max_value_bytes ({max_value})", data.len()));
        }
        1 | 3 => {
            validate_json(&data).map_err(|e| format!("value is not valid JSON: {e}"))?;
            Some(data)
        }
        2 | 4 if data.is_empty() => None,
        _ => return Err("bad kind".into()),
    };
    Ok((path.to_string(), data, expires))
}

/// [`decode`] on the blocking pool: JSON validation of a large batch takes
/// milliseconds that the async workers must not spend.
pub async fn decode_off_thread(bytes: Bytes, max_value: u64) -> Result<Decoded, String> {
    tokio::task::spawn_blocking(move || decode(bytes, max_value))
        .await
        .unwrap_or_else(|e| Err(format!("decoding stopped: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Vec<(String, Record)> {
        vec![
            ("a/b".into(), Record::value(5, Uuid::from_u128(1), Bytes::from(" {\"x\": [1, 2]} "))),
            ("c".into(), Record::tombstone(6, Uuid::from_u128(2))),
            (
                "d".into(),
                Record { expires: Some(1_700_000_060_000), ..Record::value(TS, Uuid::from_u128(3), Bytes::from("[]")) },
            ),
        ]
    }

    /// A timestamp at 1_700_000_000_000 ms.
    const TS: u64 = 1_700_000_000_000 << 16;

    #[test]
    fn round_trip_keeps_bytes() {
        let s = sample();
        let enc = encode(s.iter().map(|(p, r)| (p.as_str(), r)));
        assert_eq!(decode(enc, 1024).unwrap().records, s);
        assert_eq!(decode(Bytes::new(), 10).unwrap(), Decoded::default());
        let d = decode(encode(s.iter().map(|(p, r)| (p.as_str(), r))), 1).unwrap();
        assert_eq!((d.records.len(), d.refused.len(), d.framed), (1, 2, 3));
        assert_eq!(d.last, Some((TS, "d".to_string())), "the cursor passes refused records");
        // The expiry is not counted in the value's size.
        assert_eq!(decode(encode([(s[2].0.as_str(), &s[2].1)]), 2).unwrap().records.len(), 1);
        assert_eq!(
            encode(s.iter().map(|(p, r)| (p.as_str(), r))).len(),
            s.iter().map(|(p, r)| encoded_len(p, r)).sum::<usize>()
        );
    }

    #[test]
    fn broken_framing_refuses_the_batch() {
        let s = sample();
        let enc = encode(s.iter().map(|(p, r)| (p.as_str(), r)));
        let first_len = encode([(s[0].0.as_str(), &s[0].1)]).len();
        let second_end = first_len + encode([(s[1].0.as_str(), &s[1].1)]).len();
        for cut in (1..enc.len()).filter(|&c| c != first_len && c != second_end) {
            assert!(decode(enc.slice(..cut), 1024).is_err(), "truncated at {cut}");
        }
        assert_eq!(
            decode(enc.slice(..first_len), 1024).unwrap().records.len(),
            1,
            "a record boundary is a valid batch"
        );
    }

    #[test]
    fn a_bad_record_is_skipped_and_the_rest_is_taken() {
        let good = Record::value(1, Uuid::nil(), Bytes::from("1"));
        let big = Record::value(2, Uuid::nil(), Bytes::from("\"0123456789\""));
        let bad_json = Record::value(1, Uuid::nil(), Bytes::from("{"));
        let deep = Record::value(1, Uuid::nil(), Bytes::from("[".repeat(500) + &"]".repeat(500)));
        let batch = encode([("a/../b", &good), ("big", &big), ("json", &bad_json), ("deep", &deep), ("ok", &good)]);
        let d = decode(batch, 10).unwrap();
        assert_eq!(d.records, vec![("ok".to_string(), good)]);
        let refused: Vec<&str> = d.refused.iter().map(|(p, _)| p.as_str()).collect();
        assert_eq!(refused, ["a/../b", "big", "json", "deep"]);
        assert!(d.refused[1].1.contains("max_value_bytes"), "{:?}", d.refused[1]);
        let mut bad_kind = BytesMut::new();
        put(&mut bad_kind, "k", &Record::tombstone(1, Uuid::nil()));
        let kind_at = bad_kind.len() - 5;
        bad_kind[kind_at] = 9;
        put(&mut bad_kind, "after", &Record::tombstone(1, Uuid::nil()));
        let d = decode(bad_kind.freeze(), 10).unwrap();
        assert_eq!((d.records.len(), d.refused.len()), (1, 1));
        // An expiry tombstone carries its expiry; an expiry that fits no TTL from the
        // record's timestamp is refused, the rest taken.
        let v = Record { expires: Some(1_700_000_060_000), ..Record::value(TS, Uuid::nil(), Bytes::from("1")) };
        let t = crate::ttl::expiry_tombstone(&v);
        let early = Record { expires: Some(1_700_000_000_999), ..v.clone() };
        let far = Record { expires: Some(u64::MAX), ..t.clone() };
        let d = decode(encode([("t", &t), ("early", &early), ("far", &far), ("v", &v)]), 10).unwrap();
        assert_eq!(d.records, vec![("t".to_string(), t), ("v".to_string(), v)]);
        assert_eq!(d.refused.iter().map(|(p, _)| p.as_str()).collect::<Vec<_>>(), ["early", "far"]);
        // Kind 3 whose data is shorter than an expiry: that record is refused.
        let mut short = BytesMut::new();
        put(&mut short, "k", &Record::value(1, Uuid::nil(), Bytes::from("1")));
        let kind_at = short.len() - 6;
        short[kind_at] = 3;
        let d = decode(short.freeze(), 10).unwrap();
        assert!(d.refused[0].1.contains("expiry"), "{:?}", d.refused);
    }
}
