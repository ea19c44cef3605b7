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
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use std::time::Duration;
use uuid::Uuid;

use crate::antientropy::Version;
use crate::membership::MemberInfo;

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

/// Node-to-node calls over HTTP, or HTTPS with TLS: one pooled hyper client with
/// keep-alive, TCP_NODELAY and a connect timeout.
pub struct HttpTransport {
    client: Client<HttpConnector, Full<Bytes>>,
    /// With TLS: the node's TLS state and the HTTPS pool built from its current client
    /// config (rebuilt when a SIGHUP reload replaced it).
    tls: Option<(std::sync::Arc<crate::tls::Tls>, std::sync::Mutex<HttpsPool>)>,
}

type HttpsClient = Client<hyper_rustls::HttpsConnector<HttpConnector>, Full<Bytes>>;

/// An HTTPS pool and the client config it was built with.
struct HttpsPool {
    config: std::sync::Arc<rustls::ClientConfig>,
    client: HttpsClient,
}

fn connector() -> HttpConnector {
    let mut connector = HttpConnector::new();
    connector.set_nodelay(true);
    connector.set_connect_timeout(Some(Duration::from_secs(2)));
    connector
}

fn pool<C: hyper_util::client::legacy::connect::Connect + Clone + Send + Sync + 'static>(
    c: C,
) -> Client<C, Full<Bytes>> {
    Client::builder(TokioExecutor::new()).pool_idle_timeout(Duration::from_secs(30)).pool_max_idle_per_host(8).build(c)
}

fn https_pool(config: std::sync::Arc<rustls::ClientConfig>) -> HttpsPool {
    let mut http = connector();
    http.enforce_http(false);
    let https = hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config((*config).clone())
        .https_only()
        .enable_http1()
        .wrap_connector(http);
    HttpsPool { config, client: pool(https) }
}

impl HttpTransport {
    /// A pooled client.
    pub fn new() -> HttpTransport {
        HttpTransport { client: pool(connector()), tls: None }
    }

    /// A pooled client calling peers over HTTPS with the node's TLS state.
    pub fn with_tls(tls: std::sync::Arc<crate::tls::Tls>) -> HttpTransport {
        let https = std::sync::Mutex::new(https_pool(tls.client()));
        HttpTransport { client: pool(connector()), tls: Some((tls, https)) }
    }

    /// The HTTPS client for the current client config.
    fn https(&self, tls: &crate::tls::Tls, pool: &std::sync::Mutex<HttpsPool>) -> HttpsClient {
        let current = tls.client();
        let mut p = pool.lock().unwrap_or_else(|e| e.into_inner());
        if !std::sync::Arc::ptr_eq(&p.config, &current) {
            *p = https_pool(current);
        }
        p.client.clone()
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
            let req = req.map(Full::new);
            let resp = match &self.tls {
                None => self.client.request(req).await,
                Some((tls, https)) => {
                    // The same address, over HTTPS.
                    let (mut parts, body) = req.into_parts();
                    let mut uri = parts.uri.into_parts();
                    uri.scheme = Some(hyper::http::uri::Scheme::HTTPS);
                    parts.uri = hyper::Uri::from_parts(uri).map_err(|e| PeerError::Protocol(e.to_string()))?;
                    self.https(tls, https).request(Request::from_parts(parts, body)).await
                }
            }
            .map_err(|e| PeerError::Transport(e.to_string()))?;
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
    /// Told the body bytes of each call, both ways (see [`PeerClient::metered`]).
    meter: Option<std::sync::Arc<dyn Fn(u64) + Send + Sync>>,
    /// Signs every request ([`crate::auth`]); `None`: unsigned.
    keys: Option<std::sync::Arc<crate::auth::ClusterKeys>>,
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
        PeerClient { transport, wire_refusals: Default::default(), meter: None, keys: None }
    }

    /// The same client, signing every request with the cluster keys.
    pub fn signed(self, keys: Option<crate::auth::ClusterKeys>) -> PeerClient {
        PeerClient { keys: keys.map(std::sync::Arc::new), ..self }
    }

    /// The same client, telling `meter` the body bytes (request and answer) of every
    /// call it completes: how sync counts its traffic.
    pub fn metered(&self, meter: impl Fn(u64) + Send + Sync + 'static) -> PeerClient {
        PeerClient { meter: Some(std::sync::Arc::new(meter)), ..self.clone() }
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
    async fn exchange(
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
        let signature = match &self.keys {
            Some(keys) => {
                let digest = crate::auth::digest_off_thread(body.clone()).await;
                let time = crate::clock::now_ms();
                let lc = last_contact.map(|lc| lc.to_string());
                let signed =
                    crate::auth::Signed { method: method.as_str(), path_and_query, last_contact: lc.as_deref() };
                Some((time, keys.sign(&signed, time, &digest), digest))
            }
            None => None,
        };
        let mut req = Request::builder()
            .method(method)
            .uri(format!("http://{addr}{path_and_query}"))
            .header(hyper::header::CONTENT_TYPE, "application/json")
            .header(hyper::header::CONTENT_LENGTH, body.len())
            .header(WIRE_HEADER, WIRE_VERSION);
        if let Some(lc) = last_contact {
            req = req.header(LAST_CONTACT_HEADER, lc);
        }
        if let Some((time, signature, digest)) = signature {
            req = req
                .header(crate::auth::TIME_HEADER, time)
                .header(crate::auth::DIGEST_HEADER, digest)
                .header(crate::auth::SIGNATURE_HEADER, signature);
        }
        let sent = body.len() as u64;
        let req = req.body(body).map_err(|e| PeerError::Protocol(e.to_string()))?;
        let resp = tokio::time::timeout(timeout, self.transport.send(req)).await.map_err(|_| PeerError::Timeout)??;
        if resp.body().len() > MAX_RESPONSE_BYTES {
            return Err(PeerError::Protocol(format!("answer over {MAX_RESPONSE_BYTES} bytes")));
        }
        if let Some(meter) = &self.meter {
            meter(sent + resp.body().len() as u64);
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
    async fn fetch(
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

    /// POSTs `body` as JSON and decodes a 2xx JSON answer.
    async fn post_json<T: Serialize + ?Sized, R: DeserializeOwned>(
        &self,
        addr: &str,
        path: &str,
        body: &T,
        timeout: Duration,
    ) -> Result<R, PeerError> {
        let answer = self.fetch(Method::POST, addr, path, json_body(body)?, timeout).await?;
        serde_json::from_slice(&answer).map_err(bad_answer)
    }
}

// ---------------------------------------------------------------------------------
// Messages: the body and query of every route, shared by the client half (the typed
// calls below) and the server half (`crate::internal`), so the two cannot drift.
// ---------------------------------------------------------------------------------

/// Body of a gossip exchange, both ways, and of a join's answer.
#[derive(Debug, Serialize, Deserialize)]
pub struct GossipMessage {
    /// Everything the sender knows.
    pub members: Vec<MemberInfo>,
    /// The sender's wall clock (Unix ms) when it wrote the message (0: not given).
    #[serde(default)]
    pub wall_ms: u64,
}

impl GossipMessage {
    /// A message stamped with this node's wall clock.
    pub fn now(members: Vec<MemberInfo>) -> GossipMessage {
        GossipMessage { members, wall_ms: crate::clock::now_ms() }
    }
}

/// Body of `POST /internal/v2/vote`: the paths whose versions the voter asks about.
#[derive(Debug, Serialize, Deserialize)]
pub struct VoteRequest {
    /// The paths to vote on (at most [`MAX_PATHS`]).
    pub paths: Vec<String>,
}

/// What a member holds for one path.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Held {
    /// Timestamp of the version held.
    pub timestamp: u64,
    /// Its uuid.
    pub uuid: Uuid,
}

/// Answer of `POST /internal/v2/vote`: one entry per path, `null` when nothing is held.
#[derive(Debug, Serialize, Deserialize)]
pub struct VoteAnswer {
    /// In the order of the request's paths.
    pub held: Vec<Option<Held>>,
}

/// A tombstone a purge check asks about, and a certificate of a purged delete:
/// `(path, timestamp, uuid)`.
pub type Tombstone = (String, u64, Uuid);

/// Query of `GET /internal/v2/since`: writes after a cursor, oldest first.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SinceQuery {
    /// The cursor: writes after `(after_ts, after_path)`.
    pub after_ts: u64,
    /// See `after_ts`.
    pub after_path: String,
    /// Most records (1 to [`MAX_PATHS`]).
    pub limit: usize,
}

/// Query of `GET /internal/v2/newest`: versions newest first.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewestQuery {
    /// Oldest timestamp listed.
    pub min_ts: u64,
    /// The cursor: versions before `(timestamp, path)`; `None`: from the newest.
    pub before: Option<(u64, String)>,
    /// Most versions (1 to [`MAX_PATHS`]).
    pub limit: usize,
}

/// Query of `GET /internal/v2/certificates`: certificates by path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertificatesQuery {
    /// Paths after this one ("" from the first).
    pub after: String,
    /// Most certificates (1 to [`MAX_PATHS`]).
    pub limit: usize,
}

/// Decoded query parameters: `(name, value)`, each percent-decoded once.
pub type Params = [(String, String)];

fn param<'a>(q: &'a Params, k: &str) -> Option<&'a str> {
    q.iter().find(|(key, _)| key == k).map(|(_, v)| v.as_str())
}

fn number(q: &Params, k: &str) -> Result<u64, String> {
    param(q, k).map_or(Ok(0), |v| v.parse().map_err(|_| format!("{k} must be a whole number")))
}

fn limit(q: &Params) -> Result<usize, String> {
    let n = number(q, "limit")?;
    usize::try_from(n)
        .ok()
        .filter(|n| (1..=MAX_PATHS).contains(n))
        .ok_or_else(|| format!("limit must be 1 to {MAX_PATHS}"))
}

fn text(q: &Params, k: &str) -> String {
    param(q, k).unwrap_or_default().to_string()
}

impl SinceQuery {
    /// The query string, path encoded.
    pub fn to_query(&self) -> String {
        format!(
            "after_ts={}&after_path={}&limit={}",
            self.after_ts,
            crate::path::percent_encode(&self.after_path),
            self.limit
        )
    }

    /// Reads the query a peer sent.
    pub fn from_params(q: &Params) -> Result<SinceQuery, String> {
        Ok(SinceQuery { after_ts: number(q, "after_ts")?, after_path: text(q, "after_path"), limit: limit(q)? })
    }
}

impl NewestQuery {
    /// The query string, path encoded.
    pub fn to_query(&self) -> String {
        let mut q = format!("min_ts={}&limit={}", self.min_ts, self.limit);
        if let Some((ts, p)) = &self.before {
            q.push_str(&format!("&before_ts={ts}&before_path={}", crate::path::percent_encode(p)));
        }
        q
    }

    /// Reads the query a peer sent.
    pub fn from_params(q: &Params) -> Result<NewestQuery, String> {
        let before = match param(q, "before_ts") {
            Some(_) => Some((number(q, "before_ts")?, text(q, "before_path"))),
            None => None,
        };
        Ok(NewestQuery { min_ts: number(q, "min_ts")?, before, limit: limit(q)? })
    }
}

impl CertificatesQuery {
    /// The query string, path encoded.
    pub fn to_query(&self) -> String {
        format!("after={}&limit={}", crate::path::percent_encode(&self.after), self.limit)
    }

    /// Reads the query a peer sent.
    pub fn from_params(q: &Params) -> Result<CertificatesQuery, String> {
        Ok(CertificatesQuery { after: text(q, "after"), limit: limit(q)? })
    }
}

/// Decodes a body of big-endian u64 hashes (summary levels).
pub fn decode_hashes(b: &[u8]) -> Result<Vec<u64>, String> {
    if !b.len().is_multiple_of(8) {
        return Err("hash list length is not a multiple of 8".into());
    }
    Ok(b.chunks_exact(8).map(|c| u64::from_be_bytes(c.try_into().unwrap_or_default())).collect())
}

/// Encodes hashes as big-endian u64s.
pub fn encode_hashes(h: &[u64]) -> Bytes {
    Bytes::from(h.iter().flat_map(|x| x.to_be_bytes()).collect::<Vec<u8>>())
}

// ---------------------------------------------------------------------------------
// Typed calls: one per route. The rest of kvs calls peers only through these, so a
// route's method, body and answer are written in one place.
// ---------------------------------------------------------------------------------

fn bad_answer(e: impl std::fmt::Display) -> PeerError {
    PeerError::Protocol(e.to_string())
}

fn json_body<T: Serialize + ?Sized>(body: &T) -> Result<Bytes, PeerError> {
    serde_json::to_vec(body).map(Bytes::from).map_err(bad_answer)
}

impl PeerClient {
    /// `POST JOIN`: asks to join; the answer is the member list and a clock reading.
    pub async fn join(&self, addr: &str, me: &MemberInfo, timeout: Duration) -> Result<GossipMessage, PeerError> {
        self.post_json(addr, routes::JOIN, me, timeout).await
    }

    /// `POST LEAVE`: says goodbye.
    pub async fn leave(&self, addr: &str, me: &MemberInfo, timeout: Duration) -> Result<(), PeerError> {
        self.post_json::<_, serde_json::Value>(addr, routes::LEAVE, me, timeout).await.map(|_| ())
    }

    /// `POST GOSSIP`: one exchange of member lists.
    pub async fn gossip(&self, addr: &str, msg: &GossipMessage, timeout: Duration) -> Result<GossipMessage, PeerError> {
        self.post_json(addr, routes::GOSSIP, msg, timeout).await
    }

    /// `POST PUSH`: a record batch ([`crate::wire`]) to apply.
    pub async fn push(
        &self,
        addr: &str,
        batch: Bytes,
        timeout: Duration,
        last_contact: u64,
    ) -> Result<Answer, PeerError> {
        self.exchange(Method::POST, addr, routes::PUSH, batch, timeout, last_contact).await
    }

    /// `POST VOTE`: which versions the peer holds for some paths.
    pub async fn vote(&self, addr: &str, req: &VoteRequest, timeout: Duration) -> Result<VoteAnswer, PeerError> {
        self.post_json(addr, routes::VOTE, req, timeout).await
    }

    /// `GET LEVEL1`: the 256 level-1 summary hashes.
    pub async fn level1(&self, addr: &str, timeout: Duration) -> Result<Vec<u64>, PeerError> {
        let body = self.fetch(Method::GET, addr, routes::LEVEL1, Bytes::new(), timeout).await?;
        decode_hashes(&body).map_err(bad_answer)
    }

    /// `POST LEAVES`: the leaf hashes under some level-1 indices.
    pub async fn leaves(&self, addr: &str, tops: &[usize], timeout: Duration) -> Result<Vec<u64>, PeerError> {
        let body = self.fetch(Method::POST, addr, routes::LEAVES, json_body(tops)?, timeout).await?;
        decode_hashes(&body).map_err(bad_answer)
    }

    /// `POST VERSIONS`: the versions held in some leaves.
    pub async fn versions(&self, addr: &str, leaves: &[u16], timeout: Duration) -> Result<Vec<Version>, PeerError> {
        let body = self.fetch(Method::POST, addr, routes::VERSIONS, json_body(leaves)?, timeout).await?;
        serde_json::from_slice(&body).map_err(bad_answer)
    }

    /// `POST FETCH`: the records of some paths, as a batch covering the first
    /// [`Answer::covered`] of them.
    pub async fn fetch_records(
        &self,
        addr: &str,
        paths: &[String],
        timeout: Duration,
        last_contact: u64,
    ) -> Result<Answer, PeerError> {
        self.exchange(Method::POST, addr, routes::FETCH, json_body(paths)?, timeout, last_contact).await
    }

    /// `GET SINCE`: a page of writes after a cursor, oldest first.
    pub async fn since(
        &self,
        addr: &str,
        q: &SinceQuery,
        timeout: Duration,
        last_contact: u64,
    ) -> Result<Answer, PeerError> {
        let path = format!("{}?{}", routes::SINCE, q.to_query());
        self.exchange(Method::GET, addr, &path, Bytes::new(), timeout, last_contact).await
    }

    /// `GET NEWEST`: a page of versions, newest first.
    pub async fn newest(&self, addr: &str, q: &NewestQuery, timeout: Duration) -> Result<Vec<Version>, PeerError> {
        let path = format!("{}?{}", routes::NEWEST, q.to_query());
        let body = self.fetch(Method::GET, addr, &path, Bytes::new(), timeout).await?;
        serde_json::from_slice(&body).map_err(bad_answer)
    }

    /// `POST PURGE_CHECK`: per tombstone, whether the peer holds nothing older (it
    /// keeps a certificate then).
    pub async fn purge_check(
        &self,
        addr: &str,
        tombstones: &[Tombstone],
        timeout: Duration,
    ) -> Result<Vec<bool>, PeerError> {
        self.post_json(addr, routes::PURGE_CHECK, tombstones, timeout).await
    }

    /// `GET CERTIFICATES`: a page of certificates of purged deletes, by path.
    pub async fn certificates(
        &self,
        addr: &str,
        q: &CertificatesQuery,
        timeout: Duration,
    ) -> Result<Vec<Tombstone>, PeerError> {
        let path = format!("{}?{}", routes::CERTIFICATES, q.to_query());
        let body = self.fetch(Method::GET, addr, &path, Bytes::new(), timeout).await?;
        serde_json::from_slice(&body).map_err(bad_answer)
    }

    /// `GET /health` of a member (the client route every node serves without a
    /// token): what `GET /members/?health` shows for it.
    pub async fn health(&self, addr: &str, timeout: Duration) -> Result<serde_json::Value, PeerError> {
        let body = self.fetch(Method::GET, addr, "/health", Bytes::new(), timeout).await?;
        serde_json::from_slice(&body).map_err(bad_answer)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(q: &str) -> Vec<(String, String)> {
        crate::api::parse_query(Some(q)).unwrap()
    }

    #[test]
    fn every_query_reads_back_what_the_client_wrote() {
        let since = SinceQuery { after_ts: 42, after_path: "a b/ü?&=%".into(), limit: 7 };
        assert_eq!(SinceQuery::from_params(&params(&since.to_query())).unwrap(), since);
        for before in [None, Some((9, "x/y z".to_string()))] {
            let newest = NewestQuery { min_ts: 3, before, limit: MAX_PATHS };
            assert_eq!(NewestQuery::from_params(&params(&newest.to_query())).unwrap(), newest);
        }
        let certs = CertificatesQuery { after: "k&l".into(), limit: 1 };
        assert_eq!(CertificatesQuery::from_params(&params(&certs.to_query())).unwrap(), certs);
    }

    #[test]
    fn a_peer_query_out_of_range_is_refused_with_the_reason() {
        assert!(SinceQuery::from_params(&params("after_ts=1&limit=0")).unwrap_err().contains("limit"));
        assert!(SinceQuery::from_params(&params("limit=10001")).unwrap_err().contains("limit"));
        assert!(NewestQuery::from_params(&params("min_ts=-1&limit=5")).unwrap_err().contains("min_ts"));
        assert!(CertificatesQuery::from_params(&params("after=a")).unwrap_err().contains("limit"));
        assert_eq!(decode_hashes(&encode_hashes(&[1, u64::MAX])).unwrap(), vec![1, u64::MAX]);
        assert!(decode_hashes(&[0; 9]).is_err());
    }
}
