//! Client tokens (ARCHITECTURE.md "Client tokens"): the rules, pure functions with
//! the clock passed in, and the in-memory token cache the API asks on every request.
//!
//! A token is a record at [`TOKEN_PREFIX`]`<id>` whose value is a [`Token`]: it
//! replicates like any write, and a revocation is a delete. Only the SHA-256 of its
//! secret is stored; a request's secret is hashed and looked up by hash.

use crate::storage::{Store, StoreError};
use base64::Engine;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use subtle::ConstantTimeEq;

/// Where tokens are stored: a reserved key prefix no client key can have.
pub const TOKEN_PREFIX: &str = "./acl/tokens/";
/// Most rules in a token.
pub const MAX_RULES: usize = 100;
/// Longest token name, in bytes.
pub const MAX_NAME_BYTES: usize = 256;
/// Longest a token may live: 10 years.
pub const MAX_TTL_SECONDS: u64 = 10 * 366 * 24 * 3600;
/// Shortest management token, in bytes.
pub const MIN_MANAGEMENT_TOKEN_BYTES: usize = 32;
/// Longest `Authorization` header value read.
pub const MAX_AUTHORIZATION_BYTES: usize = 1024;

/// What a rule allows under its prefix; each level includes the ones before it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Access {
    /// Nothing.
    Deny,
    /// GET, HEAD and listings.
    Read,
    /// Read, PUT and DELETE.
    Write,
    /// Everything, including managing tokens.
    Admin,
}

/// One rule: keys starting with `prefix` get `access` (the longest matching prefix wins).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Rule {
    /// A plain string prefix of keys ("" matches every key).
    pub prefix: String,
    /// What keys under it allow.
    pub access: Access,
}

/// A stored token: the value of its record.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Token {
    /// Its id (the last segment of its key).
    pub id: String,
    /// A name for people.
    pub name: String,
    /// Its rules.
    pub rules: Vec<Rule>,
    /// When it stops working (Unix ms); `None`: never.
    pub expires: Option<u64>,
    /// When it was made (Unix ms).
    pub created: u64,
    /// Hex SHA-256 of its secret.
    pub secret_sha256: String,
}

/// Who a request is: the management token, or a stored token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Caller {
    /// `management_token_file`: everything.
    Management,
    /// A token made through the API.
    Token(Arc<Token>),
}

impl Caller {
    /// What this caller may do with `key` (longest matching prefix; none: deny).
    pub fn access(&self, key: &str) -> Access {
        match self {
            Caller::Management => Access::Admin,
            Caller::Token(t) => access_for(&t.rules, key),
        }
    }

    /// Whether it may manage tokens: admin for the empty key.
    pub fn is_admin(&self) -> bool {
        self.access("") == Access::Admin
    }

    /// Whether it can read anything equal to or under `prefix` (every key for ""):
    /// what watching the prefix's changes asks.
    pub fn may_read_under(&self, prefix: &str) -> bool {
        match self {
            Caller::Management => true,
            Caller::Token(t) => {
                access_for(&t.rules, prefix) >= Access::Read
                    || t.rules.iter().any(|r| r.access >= Access::Read && r.prefix.starts_with(prefix))
            }
        }
    }

    /// Whether any rule allows anything (what `/metrics` asks).
    pub fn has_any_rule(&self) -> bool {
        match self {
            Caller::Management => true,
            Caller::Token(t) => t.rules.iter().any(|r| r.access > Access::Deny),
        }
    }

    /// `GET /acl/whoami`'s answer.
    pub fn describe(&self) -> serde_json::Value {
        match self {
            Caller::Management => serde_json::json!({
                "id": "management", "name": "management token",
                "rules": [{"prefix": "", "access": "admin"}], "expires": null,
            }),
            Caller::Token(t) => public(t),
        }
    }
}

/// A token as the API shows it: everything but the secret's hash.
pub fn public(t: &Token) -> serde_json::Value {
    serde_json::json!({"id": t.id, "name": t.name, "rules": t.rules, "expires": t.expires, "created": t.created})
}

/// The access `rules` give `key`: the longest prefix `key` starts with decides; no
/// match denies.
pub fn access_for(rules: &[Rule], key: &str) -> Access {
    rules
        .iter()
        .filter(|r| key.starts_with(&r.prefix))
        .max_by_key(|r| r.prefix.len())
        .map_or(Access::Deny, |r| r.access)
}

/// Why a request has no caller (401).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Unauthenticated {
    /// No `Authorization` header.
    Missing,
    /// Not `Bearer <secret>`, or too long.
    Malformed,
    /// No token has this secret (never made, or revoked).
    Unknown,
    /// The token expired.
    Expired,
}

impl std::fmt::Display for Unauthenticated {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Unauthenticated::Missing => "this node needs a token: send Authorization: Bearer <secret>",
            Unauthenticated::Malformed => "the Authorization header is not Bearer <secret>",
            Unauthenticated::Unknown => "unknown or revoked token",
            Unauthenticated::Expired => "the token expired",
        })
    }
}

/// The secret of an `Authorization` header value.
pub fn bearer(header: Option<&[u8]>) -> Result<&str, Unauthenticated> {
    let value = header.ok_or(Unauthenticated::Missing)?;
    if value.len() > MAX_AUTHORIZATION_BYTES {
        return Err(Unauthenticated::Malformed);
    }
    let value = std::str::from_utf8(value).map_err(|_| Unauthenticated::Malformed)?;
    let (scheme, secret) = value.trim().split_once(' ').ok_or(Unauthenticated::Malformed)?;
    let secret = secret.trim();
    if !scheme.eq_ignore_ascii_case("bearer") || secret.is_empty() || secret.contains(char::is_whitespace) {
        return Err(Unauthenticated::Malformed);
    }
    Ok(secret)
}

/// SHA-256 of a secret.
pub fn secret_hash(secret: &str) -> [u8; 32] {
    Sha256::digest(secret.as_bytes()).into()
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// What `POST /acl/tokens` takes.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NewToken {
    /// A name for people.
    pub name: String,
    /// Its rules.
    pub rules: Vec<Rule>,
    /// Lifetime in seconds (1 to [`MAX_TTL_SECONDS`]); absent: no expiry.
    pub ttl_seconds: Option<u64>,
}

/// A new token and its secret (shown once), from a request body, at `now_ms`.
pub fn make_token(body: &[u8], now_ms: u64) -> Result<(Token, String), String> {
    let req: NewToken = serde_json::from_slice(body).map_err(|e| format!("invalid token request: {e}"))?;
    let name = req.name.trim();
    if name.is_empty() || name.len() > MAX_NAME_BYTES || name.chars().any(char::is_control) {
        return Err(format!("name must be 1 to {MAX_NAME_BYTES} bytes without control characters"));
    }
    if req.rules.is_empty() || req.rules.len() > MAX_RULES {
        return Err(format!("rules must hold 1 to {MAX_RULES} rules"));
    }
    for r in &req.rules {
        if r.prefix.len() > crate::path::MAX_KEY_BYTES || r.prefix.chars().any(char::is_control) {
            return Err(format!("rule prefix {:?}: at most 1024 bytes, no control characters", r.prefix));
        }
        if r.prefix.starts_with('/') || r.prefix.contains("//") {
            return Err(format!("rule prefix {:?}: keys never start with '/' or hold '//'", r.prefix));
        }
    }
    let mut prefixes: Vec<&str> = req.rules.iter().map(|r| r.prefix.as_str()).collect();
    prefixes.sort_unstable();
    if let Some(w) = prefixes.windows(2).find(|w| w[0] == w[1]) {
        return Err(format!("rule prefix {:?} appears twice: each prefix gets one access", w[0]));
    }
    let expires = match req.ttl_seconds {
        None => None,
        Some(s) if (1..=MAX_TTL_SECONDS).contains(&s) => Some(now_ms.saturating_add(s.saturating_mul(1000))),
        Some(_) => return Err(format!("ttl_seconds must be 1 to {MAX_TTL_SECONDS}")),
    };
    let id = uuid::Uuid::new_v4().simple().to_string();
    let secret = format!("kvs_{}", base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(rand::random::<[u8; 32]>()));
    let token = Token {
        id,
        name: name.to_string(),
        rules: req.rules,
        expires,
        created: now_ms,
        secret_sha256: hex(&secret_hash(&secret)),
    };
    Ok((token, secret))
}

/// Checks a management token file's text: printable ASCII, at least
/// [`MIN_MANAGEMENT_TOKEN_BYTES`] bytes (surrounding whitespace ignored).
pub fn management_token(text: &str) -> Result<String, String> {
    let t = text.trim();
    if t.len() < MIN_MANAGEMENT_TOKEN_BYTES {
        return Err(format!("the token must be at least {MIN_MANAGEMENT_TOKEN_BYTES} bytes, got {}", t.len()));
    }
    if !t.bytes().all(|b| b.is_ascii_graphic()) {
        return Err("the token must be printable ASCII without spaces".into());
    }
    Ok(t.to_string())
}

type TokensByHash = HashMap<[u8; 32], Arc<Token>>;

/// The tokens this node holds, by secret hash, reloaded when storage says a reserved
/// record changed.
pub struct Acl {
    management: [u8; 32],
    /// The storage generation it was loaded at, and the tokens by secret hash.
    cache: RwLock<(u64, TokensByHash)>,
    store: Store,
    /// One reload at a time: requests that find the cache behind wait for it.
    reloading: std::sync::Mutex<()>,
    /// Refused requests (401 and 403).
    pub refused: AtomicU64,
}

impl Acl {
    /// The cache for `store`, with the management token's secret.
    pub fn new(store: Store, management_secret: &str) -> Acl {
        Acl {
            management: secret_hash(management_secret),
            // u64::MAX: never loaded, so the first lookup loads.
            cache: RwLock::new((u64::MAX, HashMap::new())),
            store,
            reloading: std::sync::Mutex::new(()),
            refused: AtomicU64::new(0),
        }
    }

    /// Who presents `secret` at `now_ms`; `None` when the cache is behind storage
    /// (reload, on the blocking pool, and ask again). One read lock, one hash.
    pub fn caller(&self, secret: &str, now_ms: u64) -> Option<Result<Caller, Unauthenticated>> {
        let hash = secret_hash(secret);
        if bool::from(hash.ct_eq(&self.management)) {
            return Some(Ok(Caller::Management));
        }
        let cache = self.cache.read().unwrap_or_else(|p| p.into_inner());
        if cache.0 != self.store.acl_generation() {
            return None;
        }
        Some(Self::check(cache.1.get(&hash).cloned(), now_ms))
    }

    fn check(token: Option<Arc<Token>>, now_ms: u64) -> Result<Caller, Unauthenticated> {
        let token = token.ok_or(Unauthenticated::Unknown)?;
        if token.expires.is_some_and(|e| e <= now_ms) {
            return Err(Unauthenticated::Expired);
        }
        Ok(Caller::Token(token))
    }

    /// Whether the cache is behind storage.
    pub fn stale(&self) -> bool {
        self.cache.read().unwrap_or_else(|p| p.into_inner()).0 != self.store.acl_generation()
    }

    /// Reloads the tokens from storage. Blocking (a prefix scan).
    pub fn reload(&self) -> Result<(), StoreError> {
        let _one = self.reloading.lock().unwrap_or_else(|p| p.into_inner());
        if !self.stale() {
            // Another request reloaded while this one waited.
            return Ok(());
        }
        let generation = self.store.acl_generation();
        let mut tokens = HashMap::new();
        for (path, record) in self.store.reserved_records(TOKEN_PREFIX)? {
            let Some(data) = record.data else { continue };
            match serde_json::from_slice::<Token>(&data) {
                Ok(t) if path.strip_prefix(TOKEN_PREFIX) == Some(t.id.as_str()) => {
                    // A hash from a peer is input: 64 ASCII hex digits, or the record is skipped.
                    let h = t.secret_sha256.as_bytes();
                    let mut hash = [0u8; 32];
                    let hex_digit = |b: u8| (b as char).to_digit(16);
                    let ok = h.len() == 64
                        && h.chunks(2).zip(hash.iter_mut()).all(|(pair, out)| {
                            match (hex_digit(pair[0]), hex_digit(pair[1])) {
                                (Some(hi), Some(lo)) => {
                                    *out = (hi * 16 + lo) as u8;
                                    true
                                }
                                _ => false,
                            }
                        });
                    if ok {
                        tokens.insert(hash, Arc::new(t));
                    } else {
                        tracing::warn!(path, "a token record with a malformed hash; ignored");
                    }
                }
                _ => tracing::warn!(path, "a token record that is not a token; ignored"),
            }
        }
        *self.cache.write().unwrap_or_else(|p| p.into_inner()) = (generation, tokens);
        Ok(())
    }

    /// Every token (for `GET /acl/tokens`), by id.
    pub fn tokens(&self) -> Vec<Arc<Token>> {
        let mut all: Vec<_> = self.cache.read().unwrap_or_else(|p| p.into_inner()).1.values().cloned().collect();
        all.sort_by(|a, b| a.id.cmp(&b.id));
        all
    }

    /// One token by id.
    pub fn token(&self, id: &str) -> Option<Arc<Token>> {
        self.cache.read().unwrap_or_else(|p| p.into_inner()).1.values().find(|t| t.id == id).cloned()
    }

    /// Counts a refused request.
    pub fn note_refused(&self) {
        self.refused.fetch_add(1, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rule(prefix: &str, access: Access) -> Rule {
        Rule { prefix: prefix.into(), access }
    }

    #[test]
    fn the_longest_matching_prefix_decides_and_no_match_denies() {
        let rules = vec![rule("", Access::Read), rule("team/", Access::Write), rule("team/secret", Access::Deny)];
        assert_eq!(access_for(&rules, "other"), Access::Read);
        assert_eq!(access_for(&rules, "team/a"), Access::Write);
        assert_eq!(access_for(&rules, "team/secret/x"), Access::Deny);
        assert_eq!(access_for(&rules, "team/secrets"), Access::Deny, "a plain string prefix, as Consul's");
        assert_eq!(access_for(&[rule("a/", Access::Admin)], "b"), Access::Deny);
        assert_eq!(access_for(&[], "a"), Access::Deny);
        let t = |rules| Caller::Token(Arc::new(Token { rules, ..sample() }));
        assert!(t(vec![rule("", Access::Admin)]).is_admin());
        assert!(!t(vec![rule("a", Access::Admin)]).is_admin(), "admin of a prefix is not admin of tokens");
        assert!(!t(vec![rule("", Access::Deny)]).has_any_rule());
        assert!(t(vec![rule("x", Access::Read)]).has_any_rule());
        assert!(Caller::Management.is_admin());
    }

    fn sample() -> Token {
        Token {
            id: "i".into(),
            name: "n".into(),
            rules: vec![],
            expires: None,
            created: 0,
            secret_sha256: String::new(),
        }
    }

    #[test]
    fn authorization_headers_are_read_strictly() {
        assert_eq!(bearer(Some(b"Bearer abc")), Ok("abc"));
        assert_eq!(bearer(Some(b"bearer  abc ")), Ok("abc"));
        assert_eq!(bearer(None), Err(Unauthenticated::Missing));
        for bad in [&b"Basic abc"[..], b"Bearer", b"Bearer ", b"Bearer a b", b"abc", b"Bearer \xff"] {
            assert_eq!(bearer(Some(bad)), Err(Unauthenticated::Malformed), "{bad:?}");
        }
        let long = format!("Bearer {}", "a".repeat(MAX_AUTHORIZATION_BYTES));
        assert_eq!(bearer(Some(long.as_bytes())), Err(Unauthenticated::Malformed));
    }

    #[test]
    fn a_new_token_keeps_only_the_hash_of_its_secret_and_bad_requests_say_why() {
        let (t, secret) =
            make_token(br#"{"name":"ci","rules":[{"prefix":"ci/","access":"write"}],"ttl_seconds":60}"#, 1_000)
                .unwrap();
        assert!(secret.starts_with("kvs_") && secret.len() > 40);
        assert_eq!(t.secret_sha256, hex(&secret_hash(&secret)));
        assert!(!serde_json::to_string(&t).unwrap().contains(&secret));
        assert_eq!(t.expires, Some(61_000));
        for (body, why) in [
            (r#"{"name":"","rules":[{"prefix":"","access":"read"}]}"#, "name"),
            (r#"{"name":"x","rules":[]}"#, "rules"),
            (r#"{"name":"x","rules":[{"prefix":"","access":"root"}]}"#, "invalid"),
            (r#"{"name":"x","rules":[{"prefix":"/a","access":"read"}]}"#, "prefix"),
            (r#"{"name":"x","rules":[{"prefix":"","access":"read"}],"ttl_seconds":0}"#, "ttl_seconds"),
            (r#"{"name":"x","rules":[{"prefix":"","access":"read"}],"extra":1}"#, "invalid"),
            (r#"{"name":"x","rules":[{"prefix":"a","access":"read"},{"prefix":"a","access":"deny"}]}"#, "twice"),
            ("not json", "invalid"),
        ] {
            assert!(make_token(body.as_bytes(), 0).unwrap_err().contains(why), "{body}");
        }
        assert!(management_token("short").is_err());
        assert!(management_token(&format!("{}\n", "x".repeat(32))).is_ok());
        assert!(management_token(&format!("{} y", "x".repeat(32))).is_err());
    }
}
