//! The node-to-node protocol: its routes, headers and limits, and the client for
//! node-to-node calls: a timeout on every call (connect, request and reading the
//! answer together) and a cap on the size of an answer, so a hung or hostile peer
//! costs one timeout, never a stuck task. The client sends through a
//! [`PeerTransport`]: HTTP in a running node, an in-process network in scenario tests.

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use serde::Serialize;
use serde::de::DeserializeOwned;
use std::time::Duration;

/// Header carrying a node's `last_contact` (see [`crate::antientropy::stale_below`])
/// on every exchange of records, both ways.
pub const LAST_CONTACT_HEADER: &str = "x-kvs-last-contact";

/// Every node-to-node route. The protocol version is part of the path: a node of
/// another version does not route the request, so it can never act on a message it
/// would misread (kvs before the HLC merged any member entry it was sent, and took a
/// future `gc_horizon` for a reason to discard its data). Paths of protocol 1 are
/// answered 400 with one log line a minute ([`crate::api`]).
pub mod routes {
    /// What every route of this protocol version starts with.
    pub const PREFIX: &str = "/internal/v2/";
    /// `POST`: a node asks to join; the answer is the member list and a clock reading.
    pub const JOIN: &str = "/internal/v2/join";
    /// `POST`: a node announces it leaves.
    pub const LEAVE: &str = "/internal/v2/leave";
    /// `POST`: a gossip exchange.
    pub const GOSSIP: &str = "/internal/v2/gossip";
    /// `POST`: a record batch to apply.
    pub const PUSH: &str = "/internal/v2/push";
    /// `POST`: which versions are held at a collision's timestamp.
    pub const VOTE: &str = "/internal/v2/vote";
    /// `GET`: the 256 level-1 summary hashes.
    pub const LEVEL1: &str = "/internal/v2/sync/level1";
    /// `POST`: the leaf hashes under some level-1 indices.
    pub const LEAVES: &str = "/internal/v2/sync/leaves";
    /// `POST`: the versions held in some leaves.
    pub const VERSIONS: &str = "/internal/v2/sync/versions";
    /// `POST`: the records of some paths.
    pub const FETCH: &str = "/internal/v2/sync/fetch";
    /// `GET`: writes after a cursor, oldest first.
    pub const SINCE: &str = "/internal/v2/since";
    /// `GET`: versions newest first.
    pub const NEWEST: &str = "/internal/v2/newest";
    /// `POST`: whether the node holds an older version of tombstones a peer would purge.
    pub const PURGE_CHECK: &str = "/internal/v2/purge/check";
    /// `GET`: certificates of purged deletes, by path (bootstrap copies them).
    pub const CERTIFICATES: &str = "/internal/v2/certificates";
}

/// Header carrying the node-to-node protocol version, on every internal request and
/// on every answer.
pub const WIRE_HEADER: &str = "x-kvs-wire";
/// The node-to-node protocol version this kvs speaks. 1 (no header, paths without a
/// version): timestamps in Unix ms; 2: HLC timestamps ([`crate::hlc`]), paths under
/// [`routes::PREFIX`]. Versions are never mixed: a record's timestamp means something
/// else in each, so a peer of another version is refused both ways (README
/// "Upgrading").
pub const WIRE_VERSION: u32 = 2;

/// The wire version a request or answer declares (1 when it declares none).
pub fn wire_version(headers: &hyper::HeaderMap) -> Option<u32> {
    match headers.get(WIRE_HEADER) {
        None => Some(1),
        Some(v) => v.to_str().ok()?.trim().parse().ok(),
    }
}

/// Says "log it" at most once a minute per key: a misconfigured peer is reported with
/// one clear line, not one per request.
#[derive(Default)]
pub struct LogThrottle(std::sync::Mutex<std::collections::HashMap<String, std::time::Instant>>);

impl LogThrottle {
    /// True if nothing was logged for `key` in the last minute (and notes it now).
    pub fn allow(&self, key: &str) -> bool {
        let mut seen = self.0.lock().unwrap_or_else(|p| p.into_inner());
        let now = std::time::Instant::now();
        if seen.get(key).is_some_and(|t| now.duration_since(*t) < Duration::from_secs(60)) {
            return false;
        }
        // Bounded: a key is an address or a version, and old entries are dropped.
        seen.retain(|_, t| now.duration_since(*t) < Duration::from_secs(60));
        seen.insert(key.to_string(), now);
        true
    }
}

/// A record batch (push body, fetch answer, catch-up page) stops taking records once
/// it holds this many bytes, whatever its record count; a batch always holds at least
/// one record, so any single record fits. Bounds what one exchange costs in memory on
/// both sides, with values of any size.
pub const MAX_BATCH_BYTES: usize = 8 * 1024 * 1024;
/// Largest node-to-node body, request or answer. This build sends at most a full batch
/// plus one record of the largest value any node may allow (about 72 MiB); earlier
/// builds of this protocol sent batches bounded by count only, up to this size, and
/// a rolling upgrade must not fail their syncs.
pub const MAX_BODY_BYTES: u64 = 256 * 1024 * 1024;
/// Bytes of record batches pushed to a node that it holds at once, across all
/// connections; a push waits for its share (up to the body read timeout, then 503).
/// At least [`MAX_BODY_BYTES`], or the largest body could never get its share.
pub const INBOUND_BODY_BUDGET: usize = 256 * 1024 * 1024;
/// The same for the JSON bodies of the other internal routes (gossip, votes, purge
/// checks, path lists), kept apart so they never queue behind large pushes.
pub const CONTROL_BODY_BUDGET: usize = 64 * 1024 * 1024;
/// Largest JSON body of an internal route.
pub const MAX_CONTROL_BYTES: u64 = 32 * 1024 * 1024;
/// Most paths in one fetch, vote or purge check, and most records in one page.
pub const MAX_PATHS: usize = 10_000;
/// Largest answer read from a peer.
pub const MAX_RESPONSE_BYTES: usize = MAX_BODY_BYTES as usize;
/// Answer header of a fetch: how many of the requested paths it covers (the answer
/// stopped at [`MAX_BATCH_BYTES`]; ask again for the rest).
pub const COVERED_HEADER: &str = "x-kvs-covered";
/// Answer header of a catch-up page: `1` when there is more after it (the page is full
/// by count or by [`MAX_BATCH_BYTES`]), `0` when it is the last.
pub const MORE_HEADER: &str = "x-kvs-more";

/// Why a call to a peer failed.
#[derive(Debug)]
pub enum PeerError {
    /// No answer within the call's timeout.
    Timeout,
    /// Could not connect, or the connection broke.
    Transport(String),
    /// The peer answered with an error status.
    Status(StatusCode, String),
    /// The answer was not what the protocol says.
    Protocol(String),
}

impl std::fmt::Display for PeerError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            PeerError::Timeout => f.write_str("timed out"),
            PeerError::Transport(e) => write!(f, "transport error: {e}"),
            PeerError::Status(s, body) => write!(f, "answered {s}: {body}"),
            PeerError::Protocol(e) => write!(f, "bad answer: {e}"),
        }
    }
}

/// A record exchange's answer: the body and the headers that describe it.
#[derive(Debug, Clone, Default)]
pub struct Answer {
    /// The body (a record batch, for the data routes).
    pub body: Bytes,
    /// The peer's `last_contact` ([`LAST_CONTACT_HEADER`]).
    pub last_contact: Option<u64>,
    /// How many requested paths a fetch covered ([`COVERED_HEADER`]).
    pub covered: Option<usize>,
    /// Whether a catch-up page has more after it ([`MORE_HEADER`]).
    pub more: Option<bool>,
}

/// A 2xx answer's body, or the error status with the start of the body.
fn success(status: StatusCode, answer: Bytes) -> Result<Bytes, PeerError> {
    if status.is_success() {
        Ok(answer)
    } else {
        Err(PeerError::Status(status, String::from_utf8_lossy(&answer).chars().take(500).collect()))
    }
}

/// A future that can be held across tasks.
pub type BoxFuture<'a, T> = std::pin::Pin<Box<dyn std::future::Future<Output = T> + Send + 'a>>;

/// What carries a node-to-node request to the peer named in its URI's authority and
/// brings the whole answer back. The seam under [`PeerClient`]: [`HttpTransport`] in a
/// running node, [`crate::localnet`] (in-process, with single links that can be cut
/// and healed) in scenario tests. The timeout, the size cap on answers and the
/// protocol version check stay in [`PeerClient`], so every transport gets them (a
/// transport may stop reading earlier, as [`HttpTransport`] does at the cap).
pub trait PeerTransport: Send + Sync + 'static {
    /// Sends `req` and returns the answer with its body read (at most
    /// [`MAX_RESPONSE_BYTES`]).
    fn send(&self, req: Request<Bytes>) -> BoxFuture<'_, Result<Response<Bytes>, PeerError>>;
}

/// Node-to-node calls over HTTP: one pooled hyper client with keep-alive, TCP_NODELAY
/// and a connect timeout.
pub struct HttpTransport {
    client: Client<HttpConnector, Full<Bytes>>,
}

impl HttpTransport {
    /// A pooled client.
    pub fn new() -> HttpTransport {
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        connector.set_connect_timeout(Some(Duration::from_secs(2)));
        let client = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(Duration::from_secs(30))
            .pool_max_idle_per_host(8)
            .build(connector);
        HttpTransport { client }
    }
}

impl Default for HttpTransport {
    fn default() -> Self {
        Self::new()
    }
}

impl PeerTransport for HttpTransport {
    fn send(&self, req: Request<Bytes>) -> BoxFuture<'_, Result<Response<Bytes>, PeerError>> {
        Box::pin(async move {
            let resp =
                self.client.request(req.map(Full::new)).await.map_err(|e| PeerError::Transport(e.to_string()))?;
            let (parts, body) = resp.into_parts();
            let body = Limited::new(body, MAX_RESPONSE_BYTES)
                .collect()
                .await
                .map_err(|e| PeerError::Transport(e.to_string()))?
                .to_bytes();
            Ok(Response::from_parts(parts, body))
        })
    }
}

/// The client for node-to-node calls: a timeout on every call (sending, and reading
/// the whole answer), the protocol version checked on every answer. Cheap to clone.
#[derive(Clone)]
pub struct PeerClient {
    transport: std::sync::Arc<dyn PeerTransport>,
    wire_refusals: std::sync::Arc<LogThrottle>,
}

impl Default for PeerClient {
    fn default() -> Self {
        Self::new()
    }
}

impl PeerClient {
    /// A client over HTTP ([`HttpTransport`]).
    pub fn new() -> PeerClient {
        Self::over(std::sync::Arc::new(HttpTransport::new()))
    }

    /// A client over any transport.
    pub fn over(transport: std::sync::Arc<dyn PeerTransport>) -> PeerClient {
        PeerClient { transport, wire_refusals: Default::default() }
    }

    /// Sends one request and reads the whole answer, all within `timeout`.
    pub async fn call(
        &self,
        method: Method,
        addr: &str,
        path_and_query: &str,
        body: Bytes,
        timeout: Duration,
    ) -> Result<(StatusCode, Bytes), PeerError> {
        self.call_inner(method, addr, path_and_query, body, timeout, None).await.map(|(s, _, b)| (s, b))
    }

    /// Exchanges records: sends our `last_contact` and returns a 2xx answer's body with
    /// the headers that describe it.
    pub async fn exchange(
        &self,
        method: Method,
        addr: &str,
        path_and_query: &str,
        body: Bytes,
        timeout: Duration,
        last_contact: u64,
    ) -> Result<Answer, PeerError> {
        let (status, answer, body) =
            self.call_inner(method, addr, path_and_query, body, timeout, Some(last_contact)).await?;
        Ok(Answer { body: success(status, body)?, ..answer })
    }

    async fn call_inner(
        &self,
        method: Method,
        addr: &str,
        path_and_query: &str,
        body: Bytes,
        timeout: Duration,
        last_contact: Option<u64>,
    ) -> Result<(StatusCode, Answer, Bytes), PeerError> {
        let mut req = Request::builder()
            .method(method)
            .uri(format!("http://{addr}{path_and_query}"))
            .header(hyper::header::CONTENT_TYPE, "application/json")
            .header(hyper::header::CONTENT_LENGTH, body.len())
            .header(WIRE_HEADER, WIRE_VERSION);
        if let Some(lc) = last_contact {
            req = req.header(LAST_CONTACT_HEADER, lc);
        }
        let req = req.body(body).map_err(|e| PeerError::Protocol(e.to_string()))?;
        let resp = tokio::time::timeout(timeout, self.transport.send(req)).await.map_err(|_| PeerError::Timeout)??;
        if resp.body().len() > MAX_RESPONSE_BYTES {
            return Err(PeerError::Protocol(format!("answer over {MAX_RESPONSE_BYTES} bytes")));
        }
        let status = resp.status();
        let wire = wire_version(resp.headers());
        if wire != Some(WIRE_VERSION) {
            let theirs = wire.map_or_else(|| "an unreadable".to_string(), |v| v.to_string());
            let msg = format!(
                "the peer at {addr} speaks node-to-node protocol version {theirs}, this node {WIRE_VERSION}: \
                 refused until both run the same kvs version (README \"Upgrading\")"
            );
            if self.wire_refusals.allow(addr) {
                tracing::error!("{msg}");
            }
            return Err(PeerError::Protocol(msg));
        }
        let header = |name: &str| resp.headers().get(name).and_then(|v| v.to_str().ok()?.trim().parse::<u64>().ok());
        let answer = Answer {
            body: Bytes::new(),
            last_contact: header(LAST_CONTACT_HEADER),
            covered: header(COVERED_HEADER).map(|n| usize::try_from(n).unwrap_or(usize::MAX)),
            more: header(MORE_HEADER).map(|m| m != 0),
        };
        Ok((status, answer, resp.into_body()))
    }

    /// Sends a request and returns a 2xx answer's body.
    pub async fn fetch(
        &self,
        method: Method,
        addr: &str,
        path_and_query: &str,
        body: Bytes,
        timeout: Duration,
    ) -> Result<Bytes, PeerError> {
        let (status, answer) = self.call(method, addr, path_and_query, body, timeout).await?;
        success(status, answer)
    }

    /// POSTs raw bytes and returns a 2xx answer's body.
    pub async fn post_bytes(&self, addr: &str, path: &str, body: Bytes, timeout: Duration) -> Result<Bytes, PeerError> {
        self.fetch(Method::POST, addr, path, body, timeout).await
    }

    /// POSTs `body` as JSON and decodes a 2xx JSON answer.
    pub async fn post_json<T: Serialize, R: DeserializeOwned>(
        &self,
        addr: &str,
        path: &str,
        body: &T,
        timeout: Duration,
    ) -> Result<R, PeerError> {
        let bytes = serde_json::to_vec(body).map_err(|e| PeerError::Protocol(e.to_string()))?;
        let answer = self.post_bytes(addr, path, Bytes::from(bytes), timeout).await?;
        serde_json::from_slice(&answer).map_err(|e| PeerError::Protocol(e.to_string()))
    }
}
