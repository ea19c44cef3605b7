//! Keys: hierarchical paths such as `users/john/profile`.
//!
//! A key arrives percent-encoded in the URL after `/kv/`; it is decoded exactly once
//! (so `%252e` is the literal `%2e`, never `.`) and must then be 1 to [`MAX_KEY_BYTES`]
//! bytes of UTF-8 made of non-empty segments separated by single slashes, with no `.`
//! or `..` segment and no control character. Replicated records are checked by the
//! same rules, so no node stores a key a client could not have written.

/// Longest key, in bytes after decoding.
pub const MAX_KEY_BYTES: usize = 1024;

/// Why a key was refused; the text goes to the client in a 400.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyError(pub String);

impl std::fmt::Display for KeyError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

fn bad<T>(msg: impl Into<String>) -> Result<T, KeyError> {
    Err(KeyError(msg.into()))
}

/// Decodes `%XX` escapes once. Any other byte is kept as is; `+` is not a space.
pub fn percent_decode(raw: &str) -> Result<String, KeyError> {
    let bytes = raw.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = bytes.get(i + 1..i + 3).and_then(|h| std::str::from_utf8(h).ok());
            match hex.and_then(|h| u8::from_str_radix(h, 16).ok()) {
                Some(b) => out.push(b),
                None => return bad("invalid percent-encoding in key"),
            }
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).or_else(|_| bad("key is not valid UTF-8"))
}

/// Percent-encodes everything but unreserved characters and `/` (the inverse of
/// [`percent_decode`]).
pub fn percent_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~' | b'/') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// Prefix of the keys kvs keeps for itself (tokens, [`crate::acl`]): a `.` segment,
/// which no client key can have, so `/kv` never reads or writes them.
pub const RESERVED_PREFIX: &str = "./";

/// Whether a stored key is one of kvs's own.
pub fn is_reserved(key: &str) -> bool {
    key.starts_with(RESERVED_PREFIX)
}

/// Checks a key held in storage or sent by a peer: a client key, or a reserved key
/// whose rest is one.
pub fn validate_stored_key(key: &str) -> Result<(), KeyError> {
    validate_key(key.strip_prefix(RESERVED_PREFIX).unwrap_or(key))
}

/// Checks a decoded key against the key rules.
pub fn validate_key(key: &str) -> Result<(), KeyError> {
    if key.is_empty() {
        return bad("key is empty");
    }
    if key.len() > MAX_KEY_BYTES {
        return bad(format!("key is longer than {MAX_KEY_BYTES} bytes"));
    }
    if key.chars().any(char::is_control) {
        return bad("key contains a control character");
    }
    for segment in key.split('/') {
        match segment {
            "" => return bad("key has an empty segment (leading, trailing or doubled '/')"),
            "." | ".." => return bad("key has a '.' or '..' segment"),
            _ => {}
        }
    }
    Ok(())
}

/// Decodes and validates the raw (still encoded) key from a URL.
pub fn parse_key(raw: &str) -> Result<String, KeyError> {
    let key = percent_decode(raw)?;
    validate_key(&key)?;
    Ok(key)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_ordinary_keys() {
        for k in ["a", "users/john/profile", "a b/c+d", "ünï/cødé", "x/.hidden", "x/..y", "%"] {
            let raw = if k == "%" { "%25" } else { k };
            assert_eq!(parse_key(raw).as_deref(), Ok(k), "{raw}");
        }
    }

    #[test]
    fn decodes_exactly_once() {
        assert_eq!(parse_key("a%2Fb").as_deref(), Ok("a/b"));
        assert_eq!(parse_key("a/%252e%252e").as_deref(), Ok("a/%2e%2e"));
        assert_eq!(parse_key("caf%C3%A9").as_deref(), Ok("café"));
    }

    #[test]
    fn encode_decode_round_trip() {
        for k in ["a b/c", "ünï/%2e", "x?y&z=1#f", ""] {
            assert_eq!(percent_decode(&percent_encode(k)).as_deref(), Ok(k));
        }
    }

    #[test]
    fn refuses_bad_keys() {
        for raw in [
            "",
            "/a",
            "a/",
            "a//b",
            ".",
            "..",
            "a/./b",
            "a/../b",
            "a/%2e%2e/b",
            "%2E",
            "a%00b",
            "a%0ab",
            "a%7f",
            "a%",
            "a%zz",
            "a%4",
            "%ff%fe",
            "a%2F",
            "%2Fa",
        ] {
            assert!(parse_key(raw).is_err(), "{raw:?} should be refused");
        }
        assert!(parse_key(&"a".repeat(MAX_KEY_BYTES)).is_ok());
        assert!(parse_key(&"a".repeat(MAX_KEY_BYTES + 1)).is_err());
    }
}
