//! The client HTTP API: `/kv/<path>`, `/health`, `/metrics`, `/members/`. Node-to-node
//! paths are handed to [`crate::internal`].
//!
//! [`handle`] routes one request and always produces a response: every error a client
//! can cause becomes an [`ApiError`], rendered as `{"error": "..."}` with its status.
//! Point reads run inline, scans on the blocking pool; writes go to the storage writer
//! thread.

use crate::cluster::ClockRefusal;
use crate::hlc;
use crate::node::App;
use crate::path::{parse_key, percent_decode};
use crate::protocol::{WIRE_HEADER, WIRE_VERSION, routes};
use crate::record::Record;
use crate::storage::{StoreError, blocking};
use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::{Body, Incoming};
use hyper::header::{self, HeaderValue};
use hyper::{Method, Request, Response, StatusCode};
use serde_json::json;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{Semaphore, SemaphorePermit};

/// Largest total size of the request line and headers we accept (431 beyond).
pub const MAX_HEADER_BYTES: usize = 16 * 1024;
/// How long a client may take to send a request body.
pub const BODY_READ_TIMEOUT: Duration = Duration::from_secs(30);
/// Default and largest page size of a key listing.
const DEFAULT_LIST_LIMIT: usize = 1000;
const MAX_LIST_LIMIT: usize = 10_000;
/// Header carrying a version's timestamp in Unix ms (the uuid goes in `ETag`).
pub const TIMESTAMP_HEADER: &str = "x-kvs-timestamp";
/// Answer header of a listing that left out keys the token cannot read.
pub const FILTERED_HEADER: &str = "x-kvs-filtered";
/// Header carrying a version's full HLC timestamp ([`crate::hlc`]), for comparing two
/// versions exactly.
pub const VERSION_HEADER: &str = "x-kvs-version";
/// Condition header: write only if the version held is older than this version
/// (`merge::Condition::OlderThan`): what `kvsctl import` sends.
pub const IF_OLDER_THAN_HEADER: &str = "x-kvs-if-older-than";
/// Header carrying when a version written with a TTL expires, in Unix ms.
pub const EXPIRES_HEADER: &str = "x-kvs-expires";

/// The response type of every handler but the change stream's.
pub type HttpResponse = Response<Full<Bytes>>;

/// The body of any client response: whole, or a change stream
/// ([`crate::changes_api::SseBody`]).
pub enum ResponseBody {
    /// A body known in full.
    Whole(Full<Bytes>),
    /// A Server-Sent Events stream.
    Stream(crate::changes_api::SseBody),
    /// Chunks from a producer off the async workers (a snapshot).
    Chunks(tokio::sync::mpsc::Receiver<Bytes>),
}

impl ResponseBody {
    /// A whole body of `bytes`.
    pub fn whole(bytes: Bytes) -> Self {
        ResponseBody::Whole(Full::new(bytes))
    }
}

impl Body for ResponseBody {
    type Data = Bytes;
    type Error = std::convert::Infallible;

    fn poll_frame(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<hyper::body::Frame<Bytes>, Self::Error>>> {
        match self.get_mut() {
            ResponseBody::Whole(b) => std::pin::Pin::new(b).poll_frame(cx),
            ResponseBody::Stream(s) => std::pin::Pin::new(s).poll_frame(cx),
            ResponseBody::Chunks(rx) => rx.poll_recv(cx).map(|c| c.map(|b| Ok(hyper::body::Frame::data(b)))),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            ResponseBody::Whole(b) => b.is_end_stream(),
            ResponseBody::Stream(_) | ResponseBody::Chunks(_) => false,
        }
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        match self {
            ResponseBody::Whole(b) => b.size_hint(),
            ResponseBody::Stream(_) | ResponseBody::Chunks(_) => hyper::body::SizeHint::default(),
        }
    }
}

/// An error a request ends with; each kind has its HTTP status.
#[derive(Debug)]
pub enum ApiError {
    /// Malformed path, query or body (400).
    BadRequest(String),
    /// The node refuses writes (403).
    ReadOnly,
    /// A node-to-node request without a valid cluster key signature (401).
    Unauthorized(String),
    /// A client request without a valid token (401, `WWW-Authenticate: Bearer`).
    NoToken(crate::acl::Unauthenticated),
    /// The token's rules do not allow this (403).
    Forbidden(String),
    /// The request conflicts with the cluster's state, e.g. a duplicate `node_id` (409).
    Conflict(String),
    /// No such key or route (404).
    NotFound(&'static str),
    /// The route exists but not with this method (405, with `Allow`).
    MethodNotAllowed(&'static str),
    /// The body did not arrive in time (408).
    BodyTimeout,
    /// Body over `max_value_bytes` (413).
    TooLarge(u64),
    /// Request line and headers over [`MAX_HEADER_BYTES`] (431).
    HeadersTooLarge,
    /// The node is bootstrapping and takes no client writes yet (503).
    Syncing,
    /// Restored from a snapshot and merging with the cluster: reads are refused too.
    Restoring,
    /// The node is busy (a memory budget is full); retry shortly (503).
    Busy(&'static str),
    /// A change feed cursor this node cannot serve (410).
    Gone(String),
    /// Storage has not finished a write for this long (503).
    Stalled(Duration),
    /// The node's clock is off the cluster's, or not yet compared (503).
    Clock(ClockRefusal, u64),
    /// A read of a value with an expiry while the node's clock cannot be trusted to
    /// judge it (503).
    ClockExpiry,
    /// Storage failed (500) or is shutting down (503); a failed condition (412).
    Storage(StoreError),
}

impl ApiError {
    fn status(&self) -> StatusCode {
        match self {
            ApiError::BadRequest(_) => StatusCode::BAD_REQUEST,
            ApiError::ReadOnly => StatusCode::FORBIDDEN,
            ApiError::Unauthorized(_) | ApiError::NoToken(_) => StatusCode::UNAUTHORIZED,
            ApiError::Forbidden(_) => StatusCode::FORBIDDEN,
            ApiError::Gone(_) => StatusCode::GONE,
            ApiError::NotFound(_) => StatusCode::NOT_FOUND,
            ApiError::Conflict(_) => StatusCode::CONFLICT,
            ApiError::MethodNotAllowed(_) => StatusCode::METHOD_NOT_ALLOWED,
            ApiError::BodyTimeout => StatusCode::REQUEST_TIMEOUT,
            ApiError::TooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            ApiError::HeadersTooLarge => StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            ApiError::Storage(StoreError::NoNewerTimestamp(_)) => StatusCode::CONFLICT,
            ApiError::Storage(StoreError::ConditionFailed(_)) => StatusCode::PRECONDITION_FAILED,
            ApiError::Storage(StoreError::CheckFailed(..)) => StatusCode::CONFLICT,
            ApiError::Storage(StoreError::Closed | StoreError::ClockStepped(_))
            | ApiError::Syncing
            | ApiError::Restoring
            | ApiError::Clock(..)
            | ApiError::ClockExpiry
            | ApiError::Busy(_)
            | ApiError::Stalled(_) => StatusCode::SERVICE_UNAVAILABLE,
            ApiError::Storage(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    /// The text of the JSON error.
    pub(crate) fn message(&self) -> String {
        match self {
            ApiError::BadRequest(m)
            | ApiError::Conflict(m)
            | ApiError::Unauthorized(m)
            | ApiError::Forbidden(m)
            | ApiError::Gone(m) => m.clone(),
            ApiError::NoToken(why) => why.to_string(),
            ApiError::ReadOnly => "this node is read-only".into(),
            ApiError::NotFound(what) => format!("{what} not found"),
            ApiError::MethodNotAllowed(allow) => format!("method not allowed; allowed: {allow}"),
            ApiError::BodyTimeout => "request body not received in time".into(),
            ApiError::TooLarge(max) => format!("value larger than max_value_bytes ({max})"),
            ApiError::HeadersTooLarge => format!("request headers larger than {MAX_HEADER_BYTES} bytes"),
            ApiError::Syncing => "this node is syncing its data; retry later or use another node".into(),
            ApiError::Restoring => "this node was restored from a snapshot and is merging with the cluster; \
                                    its data is old until then: retry later or use another node"
                .into(),
            ApiError::Busy(what) => format!("this node is busy ({what}); retry shortly"),
            ApiError::Stalled(s) => crate::node::stall_message(*s),
            ApiError::Clock(ClockRefusal::Unchecked, _) => {
                "this node has not yet compared its clock with the cluster's; retry shortly".into()
            }
            ApiError::Clock(ClockRefusal::Stepped(step), _) => format!(
                "this node's wall clock just stepped by {step} ms; it compares its clock with the cluster's \
                 again before it takes writes; retry shortly"
            ),
            ApiError::Clock(ClockRefusal::Off(offset), max) => format!(
                "this node's clock is {offset} ms off the cluster's (max_clock_offset_ms is {max}); \
                 it refuses writes until its clock is right; use another node"
            ),
            ApiError::ClockExpiry => "this node's clock is off the cluster's (or not yet compared with it), so it \
                cannot tell whether this key, written with a TTL, has expired; retry shortly or use another node"
                .into(),
            ApiError::Storage(e) => e.to_string(),
        }
    }

    /// The JSON error response.
    pub fn into_response(self) -> HttpResponse {
        let mut resp = json_response(self.status(), &json!({ "error": self.message() }));
        if let ApiError::Storage(StoreError::ConditionFailed(current)) = &self {
            // The current version to retry against, as its ETag, in the body and the header.
            let etag = current.map(|u| format!("\"{u}\""));
            resp = json_response(self.status(), &json!({ "error": self.message(), "current": etag }));
            if let Some(v) = etag.as_deref().and_then(|e| HeaderValue::from_str(e).ok()) {
                resp.headers_mut().insert(header::ETAG, v);
            }
        }
        if let ApiError::NoToken(_) = self {
            resp.headers_mut().insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        if let ApiError::MethodNotAllowed(allow) = self {
            resp.headers_mut().insert(header::ALLOW, HeaderValue::from_static(allow));
        }
        if matches!(
            self,
            ApiError::Storage(StoreError::Closed | StoreError::ClockStepped(_))
                | ApiError::Syncing
                | ApiError::Restoring
                | ApiError::Clock(..)
                | ApiError::ClockExpiry
                | ApiError::Busy(_)
                | ApiError::Stalled(_)
        ) {
            resp.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
        }
        resp
    }
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> Self {
        ApiError::Storage(e)
    }
}

/// A response with a JSON body.
pub fn json_response(status: StatusCode, body: &serde_json::Value) -> HttpResponse {
    json_bytes_response(status, Bytes::from(body.to_string()))
}

/// A response with a JSON body already encoded.
pub fn json_bytes_response(status: StatusCode, body: Bytes) -> HttpResponse {
    let mut resp = Response::new(Full::new(body));
    *resp.status_mut() = status;
    resp.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
    resp
}

const KV_METHODS: &str = "GET, HEAD, PUT, DELETE";
pub(crate) const POST_METHOD: &str = "POST";
pub(crate) const GET_METHOD: &str = "GET";
const READ_METHODS: &str = "GET, HEAD";

/// The route name used in metrics (a fixed set, so label cardinality stays bounded).
fn route_name(req: &Request<Incoming>) -> &'static str {
    let path = req.uri().path();
    if path.starts_with("/kv/") {
        let listing = req.uri().query().is_some_and(|q| {
            q.split('&').any(|p| ["keys", "recurse"].iter().any(|l| p == *l || p.starts_with(&format!("{l}="))))
        });
        return if listing { "kv_list" } else { "kv" };
    }
    match path {
        "/health" => "health",
        "/metrics" => "metrics",
        "/changes" => "changes",
        "/txn" => "txn",
        "/members" | "/members/" => "members",
        routes::JOIN | routes::LEAVE => "membership",
        p if p.starts_with("/internal/") => "internal",
        _ => "unknown",
    }
}

/// The client's address: the peer's, unless the peer is a trusted proxy, in which case
/// the right-most `X-Forwarded-For` entry that is not a trusted proxy (entries to its
/// left could have been written by the client itself).
pub fn client_address(
    trusted: &[std::net::IpAddr],
    peer: std::net::IpAddr,
    forwarded_for: Option<&str>,
) -> std::net::IpAddr {
    if !trusted.contains(&peer) {
        return peer;
    }
    let mut client = peer;
    for entry in forwarded_for.unwrap_or_default().rsplit(',') {
        match entry.trim().parse::<std::net::IpAddr>() {
            Ok(ip) => {
                client = ip;
                if !trusted.contains(&ip) {
                    break;
                }
            }
            Err(_) => break,
        }
    }
    client
}

/// Routes one request; records its metrics and (at debug) an access log line with the
/// real client address.
pub async fn handle(app: Arc<App>, req: Request<Incoming>, peer: std::net::SocketAddr) -> Response<ResponseBody> {
    let started = std::time::Instant::now();
    let method = req.method().clone();
    let route = route_name(&req);
    let log = tracing::enabled!(tracing::Level::DEBUG).then(|| {
        let h = req.headers();
        let header = |n: &str| h.get(n).and_then(|v| v.to_str().ok());
        let trusted = app.config.trusted_proxies.contains(&peer.ip());
        let client = client_address(&app.config.trusted_proxies, peer.ip(), header("x-forwarded-for"));
        let proto = if trusted { header("x-forwarded-proto").unwrap_or("http") } else { "http" }.to_string();
        (client, proto, req.uri().to_string())
    });
    let resp = respond(&app, req).await;
    let status = resp.status().as_u16();
    app.metrics.observe(route, &method, status, started.elapsed().as_secs_f64());
    if let Some((client, proto, uri)) = log {
        tracing::debug!(%client, proto, method = %method, uri, status, micros = started.elapsed().as_micros() as u64, "request");
    }
    resp
}

async fn respond(app: &Arc<App>, req: Request<Incoming>) -> Response<ResponseBody> {
    let head_only = req.method() == Method::HEAD;
    let result =
        if header_bytes(&req) > MAX_HEADER_BYTES { Err(ApiError::HeadersTooLarge) } else { route(app, req).await };
    let mut resp = result.unwrap_or_else(|e| e.into_response().map(ResponseBody::Whole));
    resp.headers_mut().insert(WIRE_HEADER, HeaderValue::from(WIRE_VERSION));
    if head_only {
        // HEAD answers like GET without the body; the length still says what GET sends.
        let len = resp.body().size_hint().exact().unwrap_or(0);
        resp.headers_mut().insert(header::CONTENT_LENGTH, HeaderValue::from(len));
        *resp.body_mut() = ResponseBody::whole(Bytes::new());
    }
    resp
}

fn header_bytes(req: &Request<Incoming>) -> usize {
    let uri = req.uri().path_and_query().map_or(0, |p| p.as_str().len());
    uri + req.headers().iter().map(|(k, v)| k.as_str().len() + v.len() + 4).sum::<usize>()
}

async fn route(app: &Arc<App>, req: Request<Incoming>) -> Result<Response<ResponseBody>, ApiError> {
    let path = req.uri().path();
    let read = matches!(*req.method(), Method::GET | Method::HEAD);
    // Node-to-node routes answer to the cluster key, never to client tokens.
    if crate::internal::is_internal(path) {
        return crate::internal::route(app, req).await.map(|r| r.map(ResponseBody::Whole));
    }
    // The status page itself is static: it asks for a token before it calls the API.
    let open = read
        && (path == "/health" || path == "/ui" || path == "/ui/" || (path == "/metrics" && app.config.metrics_public));
    let caller = match &app.acl {
        Some(acl) if !open => Some(authenticate(acl, &req).await?),
        _ => None,
    };
    if app.replication.restoring() && (path.starts_with("/kv/") || path == "/changes" || path == "/txn") {
        return Err(ApiError::Restoring);
    }
    if path == "/admin/snapshot" {
        return snapshot(app, caller.as_ref(), &req);
    }
    if path == "/changes" {
        return crate::changes_api::get(app, caller.as_ref(), req).await;
    }
    client_route(app, caller.as_ref(), req).await.map(|r| r.map(ResponseBody::Whole))
}

/// `GET /admin/snapshot`: streams a snapshot of this node's data
/// ([`crate::snapshot`]), written by a thread of the blocking pool into a bounded
/// channel the connection drains. A client that goes away stops it; so does the node
/// stopping (the stream then ends without its trailer, which every reader refuses).
fn snapshot(
    app: &Arc<App>,
    caller: Option<&crate::acl::Caller>,
    req: &Request<Incoming>,
) -> Result<Response<ResponseBody>, ApiError> {
    if !matches!(*req.method(), Method::GET) {
        return Err(ApiError::MethodNotAllowed("GET"));
    }
    if caller.is_some_and(|c| !c.is_admin()) {
        return Err(ApiError::Forbidden("a snapshot needs admin access for every key (prefix \"\")".into()));
    }
    let slot = app.snapshots.try_start().ok_or(ApiError::Busy("a snapshot is already running"))?;
    let (tx, rx) = tokio::sync::mpsc::channel(crate::snapshot::CHANNEL_CHUNKS);
    let store = app.store.clone();
    let node_id = app.config.node_id.clone();
    let name = format!("kvs-{node_id}-{}.snap", crate::clock::now_ms());
    let runtime = tokio::runtime::Handle::current();
    tokio::task::spawn_blocking(move || {
        let started = std::time::Instant::now();
        let out = crate::snapshot::ChannelWriter::new(tx, runtime);
        match crate::snapshot::write_snapshot(&store, &node_id, out, &|| slot.stopping()) {
            Ok((_, bytes)) => {
                tracing::info!(bytes, ms = started.elapsed().as_millis() as u64, "snapshot sent")
            }
            Err(e) => tracing::warn!(error = %e, "snapshot ended early"),
        }
    });
    let mut resp = Response::new(ResponseBody::Chunks(rx));
    let headers = resp.headers_mut();
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static("application/octet-stream"));
    if let Ok(v) = HeaderValue::from_str(&format!("attachment; filename=\"{name}\"")) {
        headers.insert(header::CONTENT_DISPOSITION, v);
    }
    Ok(resp)
}

/// How long `GET /members/?health` waits for each member's `/health`.
const MEMBER_HEALTH_TIMEOUT: Duration = Duration::from_secs(2);

/// `GET /members/?health`: every member with its `/health` (this node's own; each
/// alive peer's asked in parallel over the node-to-node client, so a browser on one
/// node sees the whole cluster without reaching the others), or `null` and
/// `health_error` when it could not be had.
async fn members_with_health(app: &Arc<App>) -> serde_json::Value {
    let me = app.config.node_id.clone();
    let asks: Vec<_> = app
        .cluster
        .view()
        .into_iter()
        .map(|m| {
            let app = app.clone();
            let me = me.clone();
            tokio::spawn(async move {
                let health = if m.id == me {
                    Ok(app.health())
                } else if m.status != crate::membership::Status::Alive {
                    Err("down".to_string())
                } else {
                    app.cluster.client().health(&m.address, MEMBER_HEALTH_TIMEOUT).await.map_err(|e| e.to_string())
                };
                let mut row = json!(m);
                match health {
                    Ok(h) => row["health"] = h,
                    Err(e) => {
                        row["health"] = serde_json::Value::Null;
                        row["health_error"] = json!(e);
                    }
                }
                row
            })
        })
        .collect();
    let mut rows = Vec::with_capacity(asks.len());
    for ask in asks {
        if let Ok(row) = ask.await {
            rows.push(row);
        }
    }
    serde_json::Value::Array(rows)
}

/// The status page, embedded in the binary (`src/ui/index.html`: HTML, CSS and JS,
/// nothing fetched from elsewhere); it reads the API of the node that served it.
fn ui_page() -> HttpResponse {
    let mut resp = Response::new(Full::new(Bytes::from_static(include_str!("ui/index.html").as_bytes())));
    let h = resp.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static("text/html; charset=utf-8"));
    // Its own inline script and style, same-origin requests, nothing else.
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(
            "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; connect-src 'self'; img-src 'self' data:",
        ),
    );
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    resp
}

/// The client routes with whole bodies, once the caller is known.
async fn client_route(
    app: &Arc<App>,
    caller: Option<&crate::acl::Caller>,
    req: Request<Incoming>,
) -> Result<HttpResponse, ApiError> {
    let path = req.uri().path();
    let read = matches!(*req.method(), Method::GET | Method::HEAD);
    if let Some(raw_key) = path.strip_prefix("/kv/") {
        let raw_key = raw_key.to_string();
        return match *req.method() {
            Method::GET | Method::HEAD => get_kv(app, caller, &raw_key, req.uri().query()).await,
            Method::PUT => put_kv(app, caller, &raw_key, req).await,
            Method::DELETE => delete_kv(app, caller, &raw_key, &req).await,
            _ => Err(ApiError::MethodNotAllowed(KV_METHODS)),
        };
    }
    if path == "/txn" {
        return crate::txn::handle(app, caller, req).await;
    }
    if path == "/acl" || path.starts_with("/acl/") {
        return crate::acl_api::route(app, caller, req).await;
    }
    match path {
        "/health" if read => Ok(json_response(StatusCode::OK, &app.health())),
        "/metrics" if read => {
            if caller.is_some_and(|c| !c.has_any_rule()) {
                return Err(ApiError::Forbidden("/metrics needs a token with at least one rule".into()));
            }
            let mut resp = Response::new(Full::new(Bytes::from(app.metrics.render())));
            resp.headers_mut().insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/openmetrics-text; version=1.0.0; charset=utf-8"),
            );
            Ok(resp)
        }
        "/members" | "/members/" if read => {
            let with_health = parse_query(req.uri().query())?.iter().any(|(k, _)| k == "health");
            let view = if with_health { members_with_health(app).await } else { json!(app.cluster.view()) };
            Ok(json_response(StatusCode::OK, &view))
        }
        "/ui" | "/ui/" if read => Ok(ui_page()),
        "/ui" | "/ui/" => Err(ApiError::MethodNotAllowed(READ_METHODS)),
        "/health" | "/metrics" | "/members" | "/members/" => Err(ApiError::MethodNotAllowed(READ_METHODS)),
        _ => Err(ApiError::NotFound("route")),
    }
}

/// A request body kvs reads: hyper's [`Incoming`] from a socket, or a whole body
/// handed over by the in-process network of scenario tests ([`crate::localnet`]).
pub trait ReadBody:
    Body<Data = Bytes, Error: Into<Box<dyn std::error::Error + Send + Sync>>> + Send + Unpin + 'static
{
}

impl<B> ReadBody for B where
    B: Body<Data = Bytes, Error: Into<Box<dyn std::error::Error + Send + Sync>>> + Send + Unpin + 'static
{
}

/// The caller a request's token names (client auth on), the token cache reloaded
/// first when storage says tokens changed.
async fn authenticate<B>(acl: &Arc<crate::acl::Acl>, req: &Request<B>) -> Result<crate::acl::Caller, ApiError> {
    authenticate_header(acl, req.headers().get(header::AUTHORIZATION)).await
}

/// [`authenticate`] from the `Authorization` header alone (a change stream checks
/// its token again before each read).
pub(crate) async fn authenticate_header(
    acl: &Arc<crate::acl::Acl>,
    authorization: Option<&HeaderValue>,
) -> Result<crate::acl::Caller, ApiError> {
    let refuse = |why| {
        acl.note_refused();
        ApiError::NoToken(why)
    };
    let secret = crate::acl::bearer(authorization.map(|v| v.as_bytes())).map_err(refuse)?;
    loop {
        if let Some(caller) = acl.caller(secret, crate::clock::now_ms()) {
            return caller.map_err(refuse);
        }
        // Tokens changed since the cache was loaded: reload (a prefix scan) off the
        // async workers, then look again.
        let acl = acl.clone();
        blocking(move || acl.reload()).await?;
    }
}

/// Refuses (403) a caller whose rules give `key` less than `need`; passes everyone
/// while client auth is off.
pub(crate) fn allow(
    app: &App,
    caller: Option<&crate::acl::Caller>,
    key: &str,
    need: crate::acl::Access,
) -> Result<(), ApiError> {
    match caller {
        Some(c) if c.access(key) < need => {
            if let Some(acl) = &app.acl {
                acl.note_refused();
            }
            Err(ApiError::Forbidden(format!("this token may not {} {key:?}", need_verb(need))))
        }
        _ => Ok(()),
    }
}

fn need_verb(need: crate::acl::Access) -> &'static str {
    match need {
        crate::acl::Access::Read | crate::acl::Access::Deny => "read",
        crate::acl::Access::Write => "write",
        crate::acl::Access::Admin => "administer",
    }
}

/// Reads a whole body of at most `max` bytes within [`BODY_READ_TIMEOUT`].
pub(crate) async fn read_body<B: ReadBody>(req: Request<B>, max: u64) -> Result<Bytes, ApiError> {
    let declared = req.headers().get(header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
    if declared.is_some_and(|n| n > max) {
        return Err(ApiError::TooLarge(max));
    }
    let limited = Limited::new(req.into_body(), max as usize);
    match tokio::time::timeout(BODY_READ_TIMEOUT, limited.collect()).await {
        Err(_) => Err(ApiError::BodyTimeout),
        Ok(Err(e)) if e.downcast_ref::<http_body_util::LengthLimitError>().is_some() => Err(ApiError::TooLarge(max)),
        Ok(Err(e)) => Err(ApiError::BadRequest(format!("cannot read body: {e}"))),
        Ok(Ok(b)) => Ok(b.to_bytes()),
    }
}

/// Bytes of client request bodies held at once, in KiB permits: with 1,024
/// connections each sending a value of the largest size, the bodies would otherwise
/// need tens of GiB.
pub const CLIENT_BODY_BUDGET: usize = 256 * 1024 * 1024;
pub(crate) static CLIENT_BUDGET: Semaphore = Semaphore::const_new(CLIENT_BODY_BUDGET / 1024);

/// Reads a body of at most `max` bytes while holding its share of `budget` (KiB
/// permits; the declared length, or `max` when none is declared) until the returned
/// permit is dropped, after the body has been acted on: however many requests arrive
/// at once, their bodies together stay within the budget. A request that cannot get
/// its share within [`BODY_READ_TIMEOUT`] gets 503.
pub(crate) async fn read_body_within<B: ReadBody>(
    req: Request<B>,
    max: u64,
    budget: &'static Semaphore,
) -> Result<(Bytes, SemaphorePermit<'static>), ApiError> {
    let declared = req.headers().get(header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
    if declared.is_some_and(|n| n > max) {
        return Err(ApiError::TooLarge(max));
    }
    let kib = declared.unwrap_or(max).div_ceil(1024).max(1);
    let kib = u32::try_from(kib).unwrap_or(u32::MAX);
    let permit = tokio::time::timeout(BODY_READ_TIMEOUT, budget.acquire_many(kib))
        .await
        .map_err(|_| ApiError::Busy("request bodies in flight fill their memory budget"))?
        .map_err(|_| ApiError::Busy("shutting down"))?;
    Ok((read_body(req, max).await?, permit))
}

/// Query parameters, each percent-decoded once. A parameter without `=` has value "".
pub(crate) fn parse_query(query: Option<&str>) -> Result<Vec<(String, String)>, ApiError> {
    let Some(q) = query.filter(|q| !q.is_empty()) else { return Ok(Vec::new()) };
    q.split('&')
        .filter(|p| !p.is_empty())
        .map(|pair| {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            let decode = |s: &str| percent_decode(s).map_err(|e| ApiError::BadRequest(format!("query: {e}")));
            Ok((decode(k)?, decode(v)?))
        })
        .collect()
}

/// Client writes need a writable node that is not bootstrapping.
pub(crate) fn check_writable(app: &App) -> Result<(), ApiError> {
    if app.config.read_only {
        return Err(ApiError::ReadOnly);
    }
    if app.replication.is_syncing() {
        return Err(ApiError::Syncing);
    }
    if let Some(refusal) = app.cluster.clock_refusal() {
        return Err(ApiError::Clock(refusal, app.config.max_clock_offset_ms));
    }
    if let Some(stalled) = app.store.stalled(app.config.storage_stall_timeout) {
        return Err(ApiError::Stalled(stalled));
    }
    Ok(())
}

/// The JSON answer to a client write: `timestamp` in Unix ms, `version` the full HLC
/// (a string: it does not fit a JSON number's 53 bits).
fn written_json(w: &crate::storage::Written) -> serde_json::Value {
    let mut answer =
        json!({ "uuid": w.uuid.to_string(), "timestamp": hlc::ms(w.timestamp), "version": w.timestamp.to_string() });
    if let Some(expires) = w.expires {
        answer["expires"] = json!(expires);
    }
    answer
}

/// Keys a prefix delete tombstones per writer request (one group commit each).
const PREFIX_DELETE_BATCH: usize = 500;
/// A prefix delete sends its next batch only once the writes waiting to be pushed are
/// under this many bytes, so a large delete reaches peers at the pace they take it
/// instead of overflowing the push queues (sync would deliver what overflowed, late).
const PREFIX_DELETE_PUSH_BYTES: usize = 4 * 1024 * 1024;
/// Longest a prefix delete waits for the push queues per batch (a slow or cut-off
/// peer must not stall it; sync delivers what its queue drops).
const PREFIX_DELETE_PUSH_WAIT: Duration = Duration::from_secs(2);

/// `DELETE /kv/<prefix>?recurse` (`/kv/?recurse&all=true` for every key): tombstones
/// every live key equal to the prefix or under `prefix/`, in batches paced by the
/// push queues; with client auth, only keys the token may write (`X-Kvs-Filtered`
/// when others were left alone).
async fn delete_prefix(
    app: &Arc<App>,
    caller: Option<&crate::acl::Caller>,
    raw_prefix: &str,
    req: &Request<Incoming>,
    params: Vec<(String, String)>,
) -> Result<HttpResponse, ApiError> {
    let mut all = false;
    for (k, v) in &params {
        match (k.as_str(), v.as_str()) {
            ("recurse", "") => {}
            ("all", "true") => all = true,
            ("recurse" | "all", _) => {
                return Err(ApiError::BadRequest(format!("{k} takes no value (all: true); got {v:?}")));
            }
            (other, _) => return Err(ApiError::BadRequest(format!("unexpected query parameter {other:?}"))),
        }
    }
    let prefix = if raw_prefix.is_empty() { None } else { Some(key(raw_prefix)?) };
    if prefix.is_none() && !all {
        return Err(ApiError::BadRequest("DELETE /kv/?recurse deletes every key: add &all=true to mean it".into()));
    }
    if prefix.is_some() && all {
        return Err(ApiError::BadRequest("all=true goes only with DELETE /kv/?recurse".into()));
    }
    if !matches!(condition(req.headers())?, crate::merge::Condition::Always) {
        return Err(ApiError::BadRequest("a prefix delete takes no If-Match / If-None-Match".into()));
    }
    check_writable(app)?;
    let caller = caller.cloned();
    let (mut deleted, mut filtered) = (0u64, false);
    let mut after: Option<String> = None;
    loop {
        let (store, p, a, c) = (app.store.clone(), prefix.clone(), after.clone(), caller.clone());
        let page = blocking(move || {
            let writable = |k: &str| c.as_ref().is_none_or(|c| c.access(k) >= crate::acl::Access::Write);
            store.list_keys_where(p.as_deref(), a.as_deref(), PREFIX_DELETE_BATCH, &writable)
        })
        .await?;
        filtered |= page.filtered;
        let Some(last) = page.keys.last().cloned() else { break };
        let mine = page.keys;
        let results = app.writer.delete_many(mine.clone()).await?;
        let mut failure = None;
        for (path, result) in mine.into_iter().zip(results) {
            match result {
                Ok(w) => {
                    deleted += 1;
                    app.pusher.enqueue(path, Record::tombstone(w.timestamp, w.uuid));
                }
                // Deleted meanwhile by someone else: nothing to do.
                Err(StoreError::ConditionFailed(_)) => {}
                Err(e) => failure = Some(e),
            }
        }
        if let Some(e) = failure {
            // What was deleted stays deleted and is pushed; the delete can be sent again.
            return Err(e.into());
        }
        if page.next.is_none() {
            break;
        }
        after = Some(last);
        let paced = tokio::time::Instant::now() + PREFIX_DELETE_PUSH_WAIT;
        while (app.pusher.queued_bytes() > PREFIX_DELETE_PUSH_BYTES
            || app.pusher.queue_depth() > 4 * PREFIX_DELETE_BATCH)
            && tokio::time::Instant::now() < paced
        {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        check_writable(app)?;
    }
    let mut resp = json_response(StatusCode::OK, &json!({ "deleted": deleted }));
    if filtered {
        resp.headers_mut().insert(FILTERED_HEADER, HeaderValue::from_static("true"));
    }
    Ok(resp)
}

/// The condition of a write from its `If-Match` (`"<uuid>"`, the ETag a GET gave, or
/// `*`) or `If-None-Match` (`*` only: create if absent) header.
fn condition(headers: &hyper::HeaderMap) -> Result<crate::merge::Condition, ApiError> {
    use crate::merge::Condition;
    let text =
        |header: header::HeaderName, name: &str| -> Result<Option<&str>, ApiError> {
            match headers.get_all(&header).iter().count() {
                0 => Ok(None),
                1 => headers.get(&header).map(|v| v.to_str().map(str::trim)).transpose().map_err(|_| {
                    ApiError::BadRequest(format!("{name} must be \"<uuid>\" (the ETag a GET returned) or *"))
                }),
                _ => Err(ApiError::BadRequest(format!("{name} given more than once"))),
            }
        };
    let older = header::HeaderName::from_static(IF_OLDER_THAN_HEADER);
    if let Some(v) = text(older, "X-Kvs-If-Older-Than")? {
        if headers.contains_key(header::IF_MATCH) || headers.contains_key(header::IF_NONE_MATCH) {
            return Err(ApiError::BadRequest(
                "use X-Kvs-If-Older-Than alone, without If-Match or If-None-Match".into(),
            ));
        }
        return v.parse().map(Condition::OlderThan).map_err(|_| {
            ApiError::BadRequest(format!("X-Kvs-If-Older-Than must be a version (X-Kvs-Version of a GET); got {v:?}"))
        });
    }
    match (text(header::IF_MATCH, "If-Match")?, text(header::IF_NONE_MATCH, "If-None-Match")?) {
        (None, None) => Ok(Condition::Always),
        (Some(_), Some(_)) => Err(ApiError::BadRequest("use If-Match or If-None-Match, not both".into())),
        (Some("*"), None) => Ok(Condition::Exists),
        (Some(tag), None) => tag
            .strip_prefix('"')
            .and_then(|t| t.strip_suffix('"'))
            .and_then(|t| uuid::Uuid::parse_str(t).ok())
            .map(Condition::Matches)
            .ok_or_else(|| {
                ApiError::BadRequest(format!(
                    "If-Match must be one quoted uuid, the ETag a GET returned (e.g. \"{}\"), or *; got {tag:?}",
                    uuid::Uuid::nil()
                ))
            }),
        (None, Some("*")) => Ok(Condition::Absent),
        (None, Some(other)) => {
            Err(ApiError::BadRequest(format!("If-None-Match takes only * (create if absent); got {other:?}")))
        }
    }
}

fn key(raw: &str) -> Result<String, ApiError> {
    parse_key(raw).map_err(|e| ApiError::BadRequest(e.to_string()))
}

async fn get_kv(
    app: &Arc<App>,
    caller: Option<&crate::acl::Caller>,
    raw_key: &str,
    query: Option<&str>,
) -> Result<HttpResponse, ApiError> {
    let params = parse_query(query)?;
    if params.iter().any(|(k, _)| k == "keys" || k == "recurse") {
        return list_keys(app, caller, raw_key, params).await;
    }
    if let Some((k, _)) = params.first() {
        return Err(ApiError::BadRequest(format!("unexpected query parameter {k:?}")));
    }
    let path = key(raw_key)?;
    allow(app, caller, &path, crate::acl::Access::Read)?;
    // A point read runs inline: fjall throttles writers, never readers, and a read is
    // one bounded lookup. The handoff to the blocking pool cost more than the read
    // itself (see BENCHMARKS.md). Scans (listing, sync) still run on the blocking pool.
    let record = app.store.get(&path)?;
    // Whether a value with an expiry has expired is the clock's to say: not a clock
    // that is off (ARCHITECTURE.md, "Expiry", rule 1).
    if record.as_ref().is_some_and(|r| r.indexed_expiry().is_some()) && app.cluster.clock_refusal().is_some() {
        return Err(ApiError::ClockExpiry);
    }
    // A value past its expiry is absent, like a tombstone (ARCHITECTURE.md, "Expiry").
    let Some(record) = record.filter(|r| r.is_live_at(crate::clock::now_ms())) else {
        return Err(ApiError::NotFound("key"));
    };
    let Some(data) = record.data else { return Err(ApiError::NotFound("key")) };
    let mut resp = Response::new(Full::new(data));
    let h = resp.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
    if let Ok(etag) = HeaderValue::from_str(&format!("\"{}\"", record.uuid)) {
        h.insert(header::ETAG, etag);
    }
    h.insert(TIMESTAMP_HEADER, HeaderValue::from(hlc::ms(record.timestamp)));
    h.insert(VERSION_HEADER, HeaderValue::from(record.timestamp));
    if let Some(expires) = record.expires {
        h.insert(EXPIRES_HEADER, HeaderValue::from(expires));
    }
    Ok(resp)
}

/// Most bytes of values in one `?recurse` page (at least one record is sent).
const MAX_RECURSE_BYTES: usize = 4 * 1024 * 1024;

/// `GET /kv/<prefix>?keys` (with `separator=/`: one level), and `?recurse` (records
/// with their values).
async fn list_keys(
    app: &Arc<App>,
    caller: Option<&crate::acl::Caller>,
    raw_prefix: &str,
    params: Vec<(String, String)>,
) -> Result<HttpResponse, ApiError> {
    let prefix = if raw_prefix.is_empty() { None } else { Some(key(raw_prefix)?) };
    let mut limit = DEFAULT_LIST_LIMIT;
    let (mut after, mut keys, mut recurse, mut level) = (None, false, false, false);
    for (k, v) in params {
        match k.as_str() {
            "keys" => keys = true,
            "recurse" => recurse = true,
            "limit" => {
                limit = v
                    .parse()
                    .ok()
                    .filter(|n| (1..=MAX_LIST_LIMIT).contains(n))
                    .ok_or_else(|| ApiError::BadRequest(format!("limit must be 1 to {MAX_LIST_LIMIT}")))?;
            }
            "after" => after = Some(v),
            "separator" if v == "/" => level = true,
            "separator" => return Err(ApiError::BadRequest(format!("separator must be / (got {v:?})"))),
            other => return Err(ApiError::BadRequest(format!("unexpected query parameter {other:?}"))),
        }
    }
    if keys && recurse {
        return Err(ApiError::BadRequest("use keys or recurse, not both".into()));
    }
    if level && !keys {
        return Err(ApiError::BadRequest("separator goes with keys".into()));
    }
    let store = app.store.clone();
    // Keys the token cannot read are left out (scanned past, never used as the
    // cursor), and the answer says so.
    let caller = caller.cloned();
    let readable = move |k: &str| caller.as_ref().is_none_or(|c| c.access(k) >= crate::acl::Access::Read);
    let (body, filtered) = if recurse {
        let page = blocking(move || {
            store.list_records_where(prefix.as_deref(), after.as_deref(), (limit, MAX_RECURSE_BYTES), &readable)
        })
        .await?;
        let items: Vec<String> = page
            .items
            .iter()
            .filter_map(|(k, r)| {
                let mut head = json!({ "key": k, "uuid": r.uuid.to_string(), "timestamp": hlc::ms(r.timestamp),
                    "version": r.timestamp.to_string() });
                if let Some(expires) = r.expires {
                    head["expires"] = json!(expires);
                }
                let head = head.to_string();
                // The stored value is validated JSON: it goes in as it is.
                let value = std::str::from_utf8(r.data.as_deref()?).ok()?;
                Some(format!("{},\"value\":{value}}}", &head[..head.len() - 1]))
            })
            .collect();
        let next = serde_json::to_string(&page.next).unwrap_or_else(|_| "null".into());
        (format!("{{\"items\":[{}],\"next\":{next}}}", items.join(",")), page.filtered)
    } else {
        let page = blocking(move || {
            if level {
                store.list_level_where(prefix.as_deref(), after.as_deref(), limit, &readable)
            } else {
                store.list_keys_where(prefix.as_deref(), after.as_deref(), limit, &readable)
            }
        })
        .await?;
        (json!({ "keys": page.keys, "next": page.next }).to_string(), page.filtered)
    };
    let mut resp = Response::new(Full::new(Bytes::from(body)));
    resp.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
    if filtered {
        resp.headers_mut().insert(FILTERED_HEADER, HeaderValue::from_static("true"));
    }
    Ok(resp)
}

async fn put_kv(
    app: &Arc<App>,
    caller: Option<&crate::acl::Caller>,
    raw_key: &str,
    req: Request<Incoming>,
) -> Result<HttpResponse, ApiError> {
    let (need, ttl_ms) = write_query(app, req.uri().query(), true)?;
    let path = key(raw_key)?;
    let condition = condition(req.headers())?;
    allow(app, caller, &path, crate::acl::Access::Write)?;
    check_writable(app)?;
    let (body, permit) = read_body_within(req, app.config.max_value_bytes, &CLIENT_BUDGET).await?;
    check_json(body.clone()).await?;
    let written = app.writer.put_if(path.clone(), body.clone(), ttl_ms, condition).await?;
    // The body is committed: its share of the budget is free during an ack wait.
    drop(permit);
    let ack = need.map(|_| crate::push::Ack::new(&app.cluster));
    let record = Record { expires: written.expires, ..Record::value(written.timestamp, written.uuid, body) };
    let ack = app.pusher.enqueue_acked(path, record, ack);
    let mut answer = written_json(&written);
    let status = acknowledged(app, need, ack, &mut answer).await;
    Ok(json_response(status, &answer))
}

/// `?ack=<n>|all` (the only query a delete and `/txn` take): how many nodes, this one
/// included, must have applied the write before it is answered 200; `all`: every
/// alive member now. `None` without it.
pub(crate) fn ack_level(app: &App, query: Option<&str>) -> Result<Option<usize>, ApiError> {
    Ok(write_query(app, query, false)?.0)
}

/// A single-key write's query: `ack` ([`ack_level`]) and, when `ttl_allowed` (PUT),
/// `ttl=<seconds>` ([`crate::ttl::parse_ttl`], answered in ms).
fn write_query(app: &App, query: Option<&str>, ttl_allowed: bool) -> Result<(Option<usize>, Option<u64>), ApiError> {
    let members = app.cluster.alive_count();
    let (mut need, mut ttl_ms) = (None, None);
    for (k, v) in parse_query(query)? {
        if k == "ttl" && ttl_allowed {
            ttl_ms = Some(crate::ttl::parse_ttl(&v).map_err(ApiError::BadRequest)?);
            continue;
        }
        if k != "ack" {
            return Err(ApiError::BadRequest(format!("unexpected query parameter {k:?}")));
        }
        let n = match v.as_str() {
            "all" => members,
            n => n.parse::<usize>().ok().filter(|n| (1..=members).contains(n)).ok_or_else(|| {
                ApiError::BadRequest(format!(
                    "ack must be all or a number of nodes from 1 to the {members} alive members, got {v:?}"
                ))
            })?,
        };
        need = Some(n);
    }
    Ok((need, ttl_ms))
}

/// Waits (up to `ack_timeout_ms`) until `need` nodes have applied a write, adds
/// `"acked"` to its answer, and says the status: 200 when they have, 202 when not
/// (the write stays either way).
pub(crate) async fn acknowledged(
    app: &App,
    need: Option<usize>,
    ack: Option<Arc<crate::push::Ack>>,
    answer: &mut serde_json::Value,
) -> StatusCode {
    let Some(need) = need else { return StatusCode::OK };
    // No ack: the write could not be queued for push, so only this node has it.
    let acked = match ack {
        Some(ack) => 1 + ack.wait(need.saturating_sub(1), app.config.ack_timeout).await,
        None => 1,
    };
    answer["acked"] = json!(acked);
    if acked >= need { StatusCode::OK } else { StatusCode::ACCEPTED }
}

async fn delete_kv(
    app: &Arc<App>,
    caller: Option<&crate::acl::Caller>,
    raw_key: &str,
    req: &Request<Incoming>,
) -> Result<HttpResponse, ApiError> {
    let params = parse_query(req.uri().query())?;
    if params.iter().any(|(k, _)| k == "recurse") {
        return delete_prefix(app, caller, raw_key, req, params).await;
    }
    let need = ack_level(app, req.uri().query())?;
    let path = key(raw_key)?;
    let condition = condition(req.headers())?;
    allow(app, caller, &path, crate::acl::Access::Write)?;
    check_writable(app)?;
    let written = app.writer.delete_if(path.clone(), condition).await?;
    let ack = need.map(|_| crate::push::Ack::new(&app.cluster));
    let ack = app.pusher.enqueue_acked(path, Record::tombstone(written.timestamp, written.uuid), ack);
    if need.is_some() {
        // Asked to wait: the answer says how many nodes have the delete.
        let mut answer = written_json(&written);
        let status = acknowledged(app, need, ack, &mut answer).await;
        return Ok(json_response(status, &answer));
    }
    let mut resp = Response::new(Full::new(Bytes::new()));
    *resp.status_mut() = StatusCode::NO_CONTENT;
    resp.headers_mut().insert(TIMESTAMP_HEADER, HeaderValue::from(hlc::ms(written.timestamp)));
    resp.headers_mut().insert(VERSION_HEADER, HeaderValue::from(written.timestamp));
    Ok(resp)
}

/// Bodies above this are validated on the blocking pool, off the async workers.
pub(crate) const INLINE_JSON_BYTES: usize = 64 * 1024;

/// [`validate_json`] for a client body, on the blocking pool when it is large.
async fn check_json(body: Bytes) -> Result<(), ApiError> {
    let bad = |e: serde_json::Error| ApiError::BadRequest(format!("body is not valid JSON: {e}"));
    if body.len() <= INLINE_JSON_BYTES {
        return validate_json(&body).map_err(bad);
    }
    match tokio::task::spawn_blocking(move || validate_json(&body)).await {
        Ok(r) => r.map_err(bad),
        Err(_) => Err(ApiError::Busy("shutting down")),
    }
}

/// Checks that `bytes` is one JSON value, without building it. Unlike
/// `serde::de::IgnoredAny` (which serde_json skips iteratively, at any depth), this
/// descends through `deserialize_any`, so serde_json's recursion limit (128) applies:
/// a value other nodes and clients could not parse is refused here.
pub fn validate_json(bytes: &[u8]) -> Result<(), serde_json::Error> {
    use serde::de::{Deserialize, Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};

    struct Valid;
    impl<'de> Deserialize<'de> for Valid {
        fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
            d.deserialize_any(Valid)
        }
    }
    impl<'de> Visitor<'de> for Valid {
        type Value = Valid;
        fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
            f.write_str("a JSON value")
        }
        fn visit_bool<E>(self, _: bool) -> Result<Valid, E> {
            Ok(Valid)
        }
        fn visit_i64<E>(self, _: i64) -> Result<Valid, E> {
            Ok(Valid)
        }
        fn visit_u64<E>(self, _: u64) -> Result<Valid, E> {
            Ok(Valid)
        }
        fn visit_f64<E>(self, _: f64) -> Result<Valid, E> {
            Ok(Valid)
        }
        fn visit_str<E>(self, _: &str) -> Result<Valid, E> {
            Ok(Valid)
        }
        fn visit_unit<E>(self) -> Result<Valid, E> {
            Ok(Valid)
        }
        fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Valid, A::Error> {
            while seq.next_element::<Valid>()?.is_some() {}
            Ok(Valid)
        }
        fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Valid, A::Error> {
            while map.next_key::<IgnoredAny>()?.is_some() {
                map.next_value::<Valid>()?;
            }
            Ok(Valid)
        }
    }
    let mut de = serde_json::Deserializer::from_slice(bytes);
    Valid::deserialize(&mut de)?;
    de.end()
}

#[cfg(test)]
mod tests {
    use super::{client_address, validate_json};

    #[test]
    fn forwarded_for_is_believed_only_from_trusted_proxies() {
        let ip = |s: &str| s.parse::<std::net::IpAddr>().unwrap();
        let trusted = [ip("10.0.0.1"), ip("10.0.0.2")];
        // Direct client: headers ignored.
        assert_eq!(client_address(&trusted, ip("192.0.2.7"), Some("6.6.6.6")), ip("192.0.2.7"));
        // Through one proxy.
        assert_eq!(client_address(&trusted, ip("10.0.0.1"), Some("192.0.2.7")), ip("192.0.2.7"));
        // A client-written entry to the left of the real one is not believed.
        assert_eq!(client_address(&trusted, ip("10.0.0.1"), Some("6.6.6.6, 192.0.2.7")), ip("192.0.2.7"));
        // Through two trusted proxies.
        assert_eq!(client_address(&trusted, ip("10.0.0.1"), Some("192.0.2.7, 10.0.0.2")), ip("192.0.2.7"));
        // No header, or garbage: the proxy itself.
        assert_eq!(client_address(&trusted, ip("10.0.0.1"), None), ip("10.0.0.1"));
        assert_eq!(client_address(&trusted, ip("10.0.0.1"), Some("nonsense")), ip("10.0.0.1"));
        assert_eq!(client_address(&[], ip("10.0.0.1"), Some("192.0.2.7")), ip("10.0.0.1"));
    }

    #[test]
    fn json_validation() {
        for ok in ["1", "\"s\"", "null", "[1,{\"a\":[true,false]}]", " {\"a\":{\"b\":null}} ", "1.5e3"] {
            assert!(validate_json(ok.as_bytes()).is_ok(), "{ok}");
        }
        for bad in ["", "nope", "{", "[1,]", "{\"a\":1} x", "{1:2}", "\"\\x\""] {
            assert!(validate_json(bad.as_bytes()).is_err(), "{bad}");
        }
        let deep = "[".repeat(10_000) + &"]".repeat(10_000);
        assert!(validate_json(deep.as_bytes()).is_err());
        let fine = "[".repeat(100) + &"]".repeat(100);
        assert!(validate_json(fine.as_bytes()).is_ok());
    }
}
