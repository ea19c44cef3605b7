//! The binary encoding of record batches between nodes (push, sync, catch-up,
//! bootstrap). A batch is a sequence of frames:
//!
//! `path length (u16 BE) · path · timestamp (u64 BE) · uuid (16) · kind (1: value,
//! 2: tombstone) · data length (u32 BE) · data`
//!
//! Binary keeps a value's bytes exactly as the client sent them and costs no escaping.
//! [`decode`] checks every record like client input (key rules, size, JSON) and
//! refuses the whole batch on the first bad one, so a batch is never half-applied.

use crate::api::validate_json;
use crate::path::validate_key;
use crate::record::Record;
use bytes::{Buf, BufMut, Bytes, BytesMut};
use uuid::Uuid;

/// Content type of a record batch.
pub const CONTENT_TYPE: &str = "application/x-kvs-records";

/// Appends one record to a batch.
pub fn put(buf: &mut BytesMut, path: &str, r: &Record) {
    let data = r.data.as_deref().unwrap_or_default();
    buf.reserve(2 + path.len() + 8 + 16 + 1 + 4 + data.len());
    buf.put_u16(path.len() as u16);
    buf.put_slice(path.as_bytes());
    buf.put_u64(r.timestamp);
    buf.put_slice(r.uuid.as_bytes());
    buf.put_u8(if r.is_tombstone() { 2 } else { 1 });
    buf.put_u32(data.len() as u32);
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

/// Decodes and validates a batch; `max_value` bounds each value.
pub fn decode(mut bytes: Bytes, max_value: u64) -> Result<Vec<(String, Record)>, String> {
    let mut out = Vec::new();
    while bytes.has_remaining() {
        let n = out.len();
        let err = |m: &str| format!("record {n}: {m}");
        if bytes.remaining() < 2 {
            return Err(err("truncated"));
        }
        let plen = bytes.get_u16() as usize;
        if bytes.remaining() < plen + 8 + 16 + 1 + 4 {
            return Err(err("truncated"));
        }
        let path = String::from_utf8(bytes.split_to(plen).to_vec()).map_err(|_| err("path is not UTF-8"))?;
        validate_key(&path).map_err(|e| err(&format!("path {path:?}: {e}")))?;
        let timestamp = bytes.get_u64();
        let uuid = Uuid::from_slice(&bytes.split_to(16)).map_err(|_| err("bad uuid"))?;
        let kind = bytes.get_u8();
        let dlen = bytes.get_u32() as usize;
        if dlen as u64 > max_value {
            return Err(err("value larger than max_value_bytes"));
        }
        if bytes.remaining() < dlen {
            return Err(err("truncated"));
        }
        let data = bytes.split_to(dlen);
        let data = match kind {
            1 => {
                validate_json(&data).map_err(|e| err(&format!("value is not valid JSON: {e}")))?;
                Some(data)
            }
            2 if dlen == 0 => None,
            _ => return Err(err("bad kind")),
        };
        out.push((path, Record { timestamp, uuid, data }));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Vec<(String, Record)> {
        vec![
            ("a/b".into(), Record::value(5, Uuid::from_u128(1), Bytes::from(" {\"x\": [1, 2]} "))),
            ("c".into(), Record::tombstone(6, Uuid::from_u128(2))),
        ]
    }

    #[test]
    fn round_trip_keeps_bytes() {
        let s = sample();
        let enc = encode(s.iter().map(|(p, r)| (p.as_str(), r)));
        assert_eq!(decode(enc, 1024).unwrap(), s);
        assert!(decode(Bytes::new(), 10).unwrap().is_empty());
    }

    #[test]
    fn bad_batches_are_refused_whole() {
        let s = sample();
        let enc = encode(s.iter().map(|(p, r)| (p.as_str(), r)));
        let first_len = encode([(s[0].0.as_str(), &s[0].1)]).len();
        for cut in (1..enc.len()).filter(|&c| c != first_len) {
            assert!(decode(enc.slice(..cut), 1024).is_err(), "truncated at {cut}");
        }
        assert_eq!(decode(enc.slice(..first_len), 1024).unwrap().len(), 1, "a record boundary is a valid batch");
        assert!(decode(enc.clone(), 5).is_err(), "value over the limit");
        let bad_key = Record::value(1, Uuid::nil(), Bytes::from("1"));
        assert!(decode(encode([("a/../b", &bad_key)]), 10).is_err());
        let bad_json = Record::value(1, Uuid::nil(), Bytes::from("{"));
        assert!(decode(encode([("a", &bad_json)]), 10).is_err());
        let deep = Record::value(1, Uuid::nil(), Bytes::from("[".repeat(500) + &"]".repeat(500)));
        assert!(decode(encode([("a", &deep)]), 10_000).is_err());
    }
}
