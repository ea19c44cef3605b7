//! A key from a client URL: parsing never panics, and an accepted key is valid and
//! parses to itself once percent-encoded again.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(raw) = std::str::from_utf8(data) else { return };
    if let Ok(key) = kvs::path::parse_key(raw) {
        assert!(kvs::path::validate_key(&key).is_ok());
        assert!(key.len() <= kvs::path::MAX_KEY_BYTES);
        assert_eq!(kvs::path::parse_key(&kvs::path::percent_encode(&key)).as_deref(), Ok(key.as_str()));
    }
});
