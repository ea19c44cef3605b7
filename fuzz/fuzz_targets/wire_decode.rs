//! A record batch from a peer: decoding never panics, a batch is refused only for
//! broken framing, and what it takes passes the checks a client write would.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(decoded) = kvs::wire::decode(bytes::Bytes::copy_from_slice(data), 4096) else { return };
    assert!(decoded.records.len() + decoded.refused.len() == decoded.framed);
    for (path, record) in &decoded.records {
        assert!(kvs::path::validate_key(path).is_ok());
        if let Some(d) = &record.data {
            assert!(d.len() <= 4096);
            assert!(kvs::api::validate_json(d).is_ok());
        }
    }
    // What was taken encodes back to frames that decode the same.
    let again = kvs::wire::encode(decoded.records.iter().map(|(p, r)| (p.as_str(), r)));
    assert_eq!(kvs::wire::decode(again, 4096).map(|d| d.records), Ok(decoded.records));
});
