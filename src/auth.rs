//! Cluster keys: HMAC-SHA256 signatures on node-to-node requests (ARCHITECTURE.md
//! "Cluster authentication"). Plain functions: the clock is passed in; the client
//! half ([`crate::protocol::PeerClient`]) signs, the server half
//! ([`crate::internal`]) verifies.
//!
//! A signature covers, one per line: [`CONTEXT`], the method, the path with its query,
//! the sender's wall clock (Unix ms), the hex SHA-256 of the body, and the sender's
//! `X-Kvs-Last-Contact` ("" when absent: it decides how a receiver treats a stale
//! sender's records, so it must not be strippable). The first key
//! signs; every key verifies, so keys can be rotated one node at a time.

use base64::Engine;
use hmac::{Hmac, Mac};
use sha2::{Digest, Sha256};
use std::path::Path;

/// Bytes in a cluster key.
pub const KEY_BYTES: usize = 32;
/// Request header: the sender's wall clock, Unix ms.
pub const TIME_HEADER: &str = "x-kvs-time";
/// Request header: hex SHA-256 of the body.
pub const DIGEST_HEADER: &str = "x-kvs-body-sha256";
/// Request header: hex HMAC-SHA256 over the signed lines.
pub const SIGNATURE_HEADER: &str = "x-kvs-signature";
/// Furthest a signed request's time may be from the receiver's clock.
pub const MAX_SKEW_MS: u64 = 60_000;
/// First signed line: a signature made for anything else never verifies here.
pub const CONTEXT: &str = "kvs-cluster-v1";
/// Bodies longer than this are hashed on the blocking pool.
pub const INLINE_DIGEST_BYTES: usize = 64 * 1024;

type HmacSha256 = Hmac<Sha256>;

/// The keys of `cluster_key_file`, the signing key first. Its `Debug` shows only how
/// many there are: a config is logged at start.
#[derive(Clone, PartialEq, Eq)]
pub struct ClusterKeys(Vec<[u8; KEY_BYTES]>);

impl std::fmt::Debug for ClusterKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "ClusterKeys({} key(s), redacted)", self.0.len())
    }
}

/// What of a request a signature covers besides its time and body digest.
#[derive(Debug, Clone, Copy)]
pub struct Signed<'a> {
    /// `GET`, `POST`.
    pub method: &'a str,
    /// The path with its query, exactly as sent.
    pub path_and_query: &'a str,
    /// The `X-Kvs-Last-Contact` header's value, if sent.
    pub last_contact: Option<&'a str>,
}

/// Why a request's signature was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    /// No signature headers: a client, or a node without the cluster key.
    Missing,
    /// Headers present but not readable.
    Malformed(&'static str),
    /// The time is too far from the receiver's clock.
    Stale {
        /// How far, in ms.
        skew_ms: u64,
    },
    /// No key of the receiver makes this signature.
    Wrong,
}

impl Refusal {
    /// The kind, for logging once a minute per kind (never per value).
    pub fn kind(&self) -> &'static str {
        match self {
            Refusal::Missing => "missing",
            Refusal::Malformed(_) => "malformed",
            Refusal::Stale { .. } => "stale",
            Refusal::Wrong => "wrong",
        }
    }
}

impl std::fmt::Display for Refusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Refusal::Missing => f.write_str("node-to-node requests need a cluster key signature (cluster_key_file)"),
            Refusal::Malformed(what) => write!(f, "malformed cluster signature: {what}"),
            Refusal::Stale { skew_ms } => {
                write!(f, "signed {skew_ms} ms away from this node's clock (at most {MAX_SKEW_MS} ms)")
            }
            Refusal::Wrong => f.write_str("the cluster key signature does not match any key of this node"),
        }
    }
}

impl ClusterKeys {
    /// Keys from a file's text: one base64 key of [`KEY_BYTES`] bytes a line; blank
    /// lines and lines starting with `#` are skipped; at least one key.
    pub fn parse(text: &str) -> Result<ClusterKeys, String> {
        let mut keys = Vec::new();
        for (n, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let bytes = base64::engine::general_purpose::STANDARD
                .decode(line)
                .map_err(|_| format!("line {} is not base64 (make keys with `kvs keygen`)", n + 1))?;
            let key: [u8; KEY_BYTES] = bytes.try_into().map_err(|b: Vec<u8>| {
                format!("line {} holds {} bytes, a key is {KEY_BYTES} (make keys with `kvs keygen`)", n + 1, b.len())
            })?;
            keys.push(key);
        }
        if keys.is_empty() {
            return Err("holds no key (make one with `kvs keygen`)".into());
        }
        Ok(ClusterKeys(keys))
    }

    /// Keys from a file.
    pub fn load(path: &Path) -> Result<ClusterKeys, String> {
        let text = std::fs::read_to_string(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
        ClusterKeys::parse(&text).map_err(|e| format!("{}: {e}", path.display()))
    }

    /// A new random key, base64: a line for a key file.
    pub fn generate() -> String {
        let key: [u8; KEY_BYTES] = rand::random();
        base64::engine::general_purpose::STANDARD.encode(key)
    }

    fn mac(key: &[u8; KEY_BYTES], request: &Signed<'_>, time_ms: u64, digest: &str) -> HmacSha256 {
        // A key of any length is accepted by HMAC: this cannot fail.
        let mut mac = <HmacSha256 as Mac>::new_from_slice(key).unwrap_or_else(|_| unreachable!());
        let Signed { method, path_and_query, last_contact } = request;
        mac.update(
            format!("{CONTEXT}\n{method}\n{path_and_query}\n{time_ms}\n{digest}\n{}", last_contact.unwrap_or(""))
                .as_bytes(),
        );
        mac
    }

    /// The signature header of a request, made with the first key.
    pub fn sign(&self, request: &Signed<'_>, time_ms: u64, digest: &str) -> String {
        hex(&Self::mac(&self.0[0], request, time_ms, digest).finalize().into_bytes())
    }

    /// Checks a request's signature headers (`None`: absent) at `now_ms`; on success,
    /// the signed body digest, which the body must match.
    pub fn verify(
        &self,
        request: &Signed<'_>,
        headers: (Option<&str>, Option<&str>, Option<&str>),
        now_ms: u64,
    ) -> Result<String, Refusal> {
        let (time, digest, signature) = match headers {
            (None, None, None) => return Err(Refusal::Missing),
            (Some(t), Some(d), Some(s)) => (t, d, s),
            _ => return Err(Refusal::Malformed("X-Kvs-Time, X-Kvs-Body-Sha256 and X-Kvs-Signature go together")),
        };
        let time_ms: u64 = time.trim().parse().map_err(|_| Refusal::Malformed("X-Kvs-Time is not Unix ms"))?;
        let skew_ms = time_ms.abs_diff(now_ms);
        if skew_ms > MAX_SKEW_MS {
            return Err(Refusal::Stale { skew_ms });
        }
        if digest.len() != 64 || !digest.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(Refusal::Malformed("X-Kvs-Body-Sha256 is not a hex SHA-256"));
        }
        let signature = unhex(signature.trim()).ok_or(Refusal::Malformed("X-Kvs-Signature is not hex"))?;
        let matches = self.0.iter().any(|k| Self::mac(k, request, time_ms, digest).verify_slice(&signature).is_ok());
        if matches { Ok(digest.to_ascii_lowercase()) } else { Err(Refusal::Wrong) }
    }
}

/// Hex SHA-256 of a body.
pub fn digest(body: &[u8]) -> String {
    hex(&Sha256::digest(body))
}

/// [`digest`], on the blocking pool for a large body.
pub async fn digest_off_thread(body: bytes::Bytes) -> String {
    if body.len() <= INLINE_DIGEST_BYTES {
        return digest(&body);
    }
    tokio::task::spawn_blocking(move || digest(&body)).await.unwrap_or_default()
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn unhex(s: &str) -> Option<Vec<u8>> {
    if !s.len().is_multiple_of(2) || s.len() > 256 {
        return None;
    }
    (0..s.len()).step_by(2).map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok()).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn keys(n: usize) -> Vec<String> {
        (0..n).map(|_| ClusterKeys::generate()).collect()
    }

    fn req<'a>(method: &'a str, path: &'a str) -> Signed<'a> {
        Signed { method, path_and_query: path, last_contact: None }
    }

    fn signed(k: &ClusterKeys, method: &str, path: &str, time: u64, body: &[u8]) -> (String, String, String) {
        let d = digest(body);
        (time.to_string(), d.clone(), k.sign(&req(method, path), time, &d))
    }

    fn check(
        k: &ClusterKeys,
        method: &str,
        path: &str,
        h: &(String, String, String),
        now: u64,
    ) -> Result<String, Refusal> {
        k.verify(&req(method, path), (Some(&h.0), Some(&h.1), Some(&h.2)), now)
    }

    #[test]
    fn a_signed_request_verifies_and_any_change_to_it_does_not() {
        let k = ClusterKeys::parse(&keys(1)[0]).unwrap();
        let h = signed(&k, "POST", "/internal/v2/push", 1_000_000, b"batch");
        assert_eq!(check(&k, "POST", "/internal/v2/push", &h, 1_000_000).unwrap(), digest(b"batch"));
        assert_eq!(check(&k, "GET", "/internal/v2/push", &h, 1_000_000), Err(Refusal::Wrong));
        assert_eq!(check(&k, "POST", "/internal/v2/push?x=1", &h, 1_000_000), Err(Refusal::Wrong));
        let mut other_body = h.clone();
        other_body.1 = digest(b"other");
        assert_eq!(check(&k, "POST", "/internal/v2/push", &other_body, 1_000_000), Err(Refusal::Wrong));
        let mut other_time = h.clone();
        other_time.0 = "1000001".into();
        assert_eq!(check(&k, "POST", "/internal/v2/push", &other_time, 1_000_000), Err(Refusal::Wrong));
        let stripped = Signed { last_contact: Some("123"), ..req("POST", "/internal/v2/push") };
        assert_eq!(k.verify(&stripped, (Some(&h.0), Some(&h.1), Some(&h.2)), 1_000_000), Err(Refusal::Wrong));
        let stranger = ClusterKeys::parse(&keys(1)[0]).unwrap();
        assert_eq!(check(&stranger, "POST", "/internal/v2/push", &h, 1_000_000), Err(Refusal::Wrong));
    }

    #[test]
    fn a_request_signed_too_far_from_the_receivers_clock_is_refused() {
        let k = ClusterKeys::parse(&keys(1)[0]).unwrap();
        let h = signed(&k, "GET", "/p", 1_000_000, b"");
        assert!(check(&k, "GET", "/p", &h, 1_000_000 + MAX_SKEW_MS).is_ok());
        assert_eq!(check(&k, "GET", "/p", &h, 1_000_000 + MAX_SKEW_MS + 1), Err(Refusal::Stale { skew_ms: 60_001 }));
        assert_eq!(check(&k, "GET", "/p", &h, 1_000_000 - MAX_SKEW_MS - 1), Err(Refusal::Stale { skew_ms: 60_001 }));
    }

    #[test]
    fn every_listed_key_verifies_and_the_first_signs() {
        let [a, b] = <[String; 2]>::try_from(keys(2)).unwrap();
        let old = ClusterKeys::parse(&a).unwrap();
        let both = ClusterKeys::parse(&format!("{a}\n{b}\n")).unwrap();
        let flipped = ClusterKeys::parse(&format!("# rotated\n\n{b}\n{a}\n")).unwrap();
        let new = ClusterKeys::parse(&b).unwrap();
        for (signer, verifier, ok) in [
            (&old, &both, true),
            (&both, &old, true),
            (&flipped, &both, true),
            (&both, &flipped, true),
            (&flipped, &new, true),
            (&new, &flipped, true),
            (&old, &new, false),
            (&new, &old, false),
        ] {
            let h = signed(signer, "POST", "/q", 5, b"x");
            assert_eq!(check(verifier, "POST", "/q", &h, 5).is_ok(), ok);
        }
    }

    #[test]
    fn bad_key_files_and_bad_headers_get_a_reason() {
        assert!(ClusterKeys::parse("").unwrap_err().contains("no key"));
        assert!(ClusterKeys::parse("# only a comment\n").unwrap_err().contains("no key"));
        assert!(ClusterKeys::parse("not base64!").unwrap_err().contains("line 1"));
        assert!(ClusterKeys::parse("AAAA").unwrap_err().contains("3 bytes"));
        let k = ClusterKeys::parse(&keys(1)[0]).unwrap();
        assert_eq!(format!("{k:?}"), "ClusterKeys(1 key(s), redacted)");
        assert_eq!(k.verify(&req("GET", "/"), (None, None, None), 0), Err(Refusal::Missing));
        assert!(matches!(k.verify(&req("GET", "/"), (Some("1"), None, None), 0), Err(Refusal::Malformed(_))));
        assert!(matches!(k.verify(&req("GET", "/"), (Some("x"), Some("y"), Some("z")), 0), Err(Refusal::Malformed(_))));
        let d = digest(b"");
        assert!(matches!(k.verify(&req("GET", "/"), (Some("0"), Some(&d), Some("zz")), 0), Err(Refusal::Malformed(_))));
        assert!(matches!(
            k.verify(&req("GET", "/"), (Some("0"), Some("ab"), Some("00")), 0),
            Err(Refusal::Malformed(_))
        ));
        assert_eq!(k.verify(&req("GET", "/"), (Some("0"), Some(&d), Some("00")), 0), Err(Refusal::Wrong));
    }
}
