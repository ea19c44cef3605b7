//! `GET /changes`: the change feed, as a long-poll (JSON) or a Server-Sent Events
//! stream (`Accept: text/event-stream`), and the task that trims the log.
//!
//! Both read the log the writer keeps ([`crate::storage::Store::changes_after`]) after
//! the client's cursor and wait on the prefix's [`crate::changes::Wakeups`] when
//! there is nothing new. ARCHITECTURE.md ("Change feed") has the rules.

use crate::acl::{Access, Caller};
use crate::api::{ApiError, ResponseBody, parse_query};
use crate::changes::{Event, Gone, check_cursor, parse_event_id, sse_id, under};
use crate::node::App;
use crate::shutdown::Shutdown;
use crate::storage::{Store, blocking};
use bytes::Bytes;
use hyper::body::{Body, Frame};
use hyper::header::{self, HeaderValue};
use hyper::{Method, Request, Response};
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::sync::{Semaphore, mpsc};

/// Default and largest number of events in one answer.
const DEFAULT_LIMIT: usize = 1000;
const MAX_LIMIT: usize = 10_000;
/// Longest long-poll wait, in seconds.
const MAX_WAIT_SECONDS: u64 = 300;
/// Most bytes of events (values included) in one long-poll answer; at least one event
/// is always sent.
const MAX_ANSWER_BYTES: usize = 4 * 1024 * 1024;
/// Most log entries one read looks at: a sparse prefix far behind answers with an
/// empty page and an advanced cursor instead of scanning the whole log at once.
const MAX_SCAN: usize = 100_000;
/// A stream sends events in frames of about this many bytes (one value may overshoot).
const FRAME_BYTES: usize = 64 * 1024;
/// Frames waiting between a stream's reader task and its connection: with
/// [`FRAME_BYTES`], the memory a watcher holds at most (plus one value).
const STREAM_FRAMES: usize = 4;
/// Bytes all of a node's streams may hold queued for their connections together: a
/// stream whose frame finds no room within `changes_stall_timeout` ends (`busy`).
pub const STREAM_BUFFER_BYTES: u32 = 64 * 1024 * 1024;
/// How often an idle stream sends a comment, so proxies and clients see it alive.
pub const HEARTBEAT: Duration = Duration::from_secs(15);

/// The change feed's shared state: the watcher limit, the stream buffer budget, the
/// counters, the stop signal.
pub struct Feed {
    permits: Arc<Semaphore>,
    max_watchers: usize,
    stall: Duration,
    shutdown: Shutdown,
    /// Bytes all streams may hold queued for their connections ([`STREAM_BUFFER_BYTES`]).
    buffered: Arc<Semaphore>,
    /// Events sent to clients (long-polls and streams).
    pub events_sent: AtomicU64,
    /// Streams ended because their client did not keep up.
    pub lagged: AtomicU64,
}

impl Feed {
    /// The feed of a node with data dir uid `uid`; `shutdown` ends every wait.
    pub fn new(max_watchers: usize, stall: Duration, shutdown: Shutdown) -> Feed {
        Feed {
            permits: Arc::new(Semaphore::new(max_watchers)),
            max_watchers,
            stall,
            shutdown,
            buffered: Arc::new(Semaphore::new(STREAM_BUFFER_BYTES as usize)),
            events_sent: AtomicU64::new(0),
            lagged: AtomicU64::new(0),
        }
    }

    /// Long-polls and streams open now.
    pub fn watchers(&self) -> usize {
        self.max_watchers - self.permits.available_permits()
    }
}

/// One `/changes` request, parsed.
struct Query {
    prefix: String,
    since: Option<u64>,
    node: Option<String>,
    wait: Duration,
    limit: usize,
    values: bool,
}

fn parse(query: Option<&str>) -> Result<Query, ApiError> {
    let mut q = Query {
        prefix: String::new(),
        since: None,
        node: None,
        wait: Duration::ZERO,
        limit: DEFAULT_LIMIT,
        values: false,
    };
    let bad = |m: String| ApiError::BadRequest(m);
    for (k, v) in parse_query(query)? {
        match k.as_str() {
            "prefix" if v.is_empty() => {}
            // Already percent-decoded as a query value: decoding it again would read
            // a key holding a literal `%41` as `A`.
            "prefix" => {
                crate::path::validate_key(&v).map_err(|e| bad(format!("prefix: {e}")))?;
                q.prefix = v;
            }
            "since" => {
                q.since = Some(v.parse().map_err(|_| bad(format!("since must be a seq (a whole number), got {v:?}")))?)
            }
            "node" => q.node = Some(v),
            "wait" => {
                let secs: u64 = v.parse().ok().filter(|s| *s <= MAX_WAIT_SECONDS).ok_or_else(|| {
                    bad(format!("wait must be a whole number of seconds from 0 to {MAX_WAIT_SECONDS}, got {v:?}"))
                })?;
                q.wait = Duration::from_secs(secs);
            }
            "limit" => {
                q.limit = v
                    .parse()
                    .ok()
                    .filter(|n| (1..=MAX_LIMIT).contains(n))
                    .ok_or_else(|| bad(format!("limit must be 1 to {MAX_LIMIT}, got {v:?}")))?;
            }
            "values" if v.is_empty() || v == "true" => q.values = true,
            "values" if v == "false" => q.values = false,
            "values" => return Err(bad(format!("values takes no value (or true/false), got {v:?}"))),
            other => return Err(bad(format!("unexpected query parameter {other:?}"))),
        }
    }
    Ok(q)
}

/// What a reader may see: keys under the prefix, never kvs's own (reserved) keys, and
/// with client auth only keys the token can read.
struct Filter {
    prefix: String,
    caller: Option<Caller>,
}

impl Filter {
    fn in_scope(&self, key: &str) -> bool {
        under(key, &self.prefix) && !crate::path::is_reserved(key)
    }

    fn readable(&self, key: &str) -> bool {
        self.caller.as_ref().is_none_or(|c| c.access(key) >= Access::Read)
    }
}

/// A page of events ready to send.
struct Page {
    /// Each event's JSON (with its value when asked for).
    events: Vec<(Event, String)>,
    /// The cursor after this page.
    cursor: u64,
    /// Events left out because the token cannot read their key.
    filtered: bool,
}

/// Reads the events after `cursor` (up to `head`), with values when asked, within
/// `limit` events and `max_bytes`. Blocking: a range scan and point reads.
fn read_page(
    store: &Store,
    filter: &Filter,
    cursor: u64,
    head: u64,
    limit: usize,
    max_bytes: usize,
    values: bool,
) -> Result<Page, crate::storage::StoreError> {
    let filtered = std::cell::Cell::new(false);
    let keep = |key: &str| {
        if !filter.in_scope(key) {
            return false;
        }
        let ok = filter.readable(key);
        filtered.set(filtered.get() || !ok);
        ok
    };
    let (found, mut next) = store.changes_after(cursor, head, (limit, max_bytes, MAX_SCAN), &keep)?;
    let mut events = Vec::with_capacity(found.len());
    let mut bytes = 0;
    let total = found.len();
    for event in found {
        if bytes >= max_bytes && !events.is_empty() {
            break;
        }
        let json = if values && !event.delete {
            match store.get(&event.key)? {
                // The version is still the current one, and not expired: its value.
                Some(r) if r.uuid == event.uuid && r.is_live_at(crate::clock::now_ms()) => {
                    event_json(&event, Shown::Value(r.data.as_deref().unwrap_or_default()))
                }
                // Replaced (or expired) since: a later event carries what replaced it
                // (an expiry: its tombstone, once swept).
                _ => event_json(&event, Shown::Superseded),
            }
        } else {
            event_json(&event, Shown::NoValue)
        };
        bytes += json.len();
        events.push((event, json));
    }
    if events.len() < total
        && let Some((last, _)) = events.last()
    {
        // Cut short by bytes: resume right after the last event sent.
        next = last.seq;
    }
    Ok(Page { events, cursor: next, filtered: filtered.get() })
}

/// What an event's JSON says of the value.
enum Shown<'a> {
    /// No value asked for, or a delete.
    NoValue,
    /// The value (raw JSON, validated when it was written or received).
    Value(&'a [u8]),
    /// The version was replaced since (`"superseded": true`).
    Superseded,
}

/// An event's JSON.
fn event_json(e: &Event, shown: Shown<'_>) -> String {
    let mut s = serde_json::json!({
        "seq": e.seq,
        "key": e.key,
        "op": if e.delete { "delete" } else { "put" },
        "timestamp": crate::hlc::ms(e.timestamp),
        "version": e.timestamp.to_string(),
        "uuid": e.uuid.to_string(),
    })
    .to_string();
    s.pop();
    match shown {
        Shown::NoValue => {}
        Shown::Value(v) => {
            s.push_str(",\"value\":");
            // Stored values were validated as JSON (so UTF-8) when written or received.
            s.push_str(std::str::from_utf8(v).unwrap_or("null"));
        }
        Shown::Superseded => s.push_str(",\"superseded\":true"),
    }
    s.push('}');
    s
}

fn gone(g: Gone) -> ApiError {
    ApiError::Gone(g.to_string())
}

/// `GET /changes`.
pub async fn get(
    app: &Arc<App>,
    caller: Option<&Caller>,
    req: Request<hyper::body::Incoming>,
) -> Result<Response<ResponseBody>, ApiError> {
    if req.method() != Method::GET {
        return Err(ApiError::MethodNotAllowed(crate::api::GET_METHOD));
    }
    let mut q = parse(req.uri().query())?;
    if caller.is_some_and(|c| !c.may_read_under(&q.prefix)) {
        return Err(ApiError::Forbidden(format!("the token can read nothing under {:?}", q.prefix)));
    }
    let sse = req
        .headers()
        .get(header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|a| a.split(',').any(|t| t.trim().starts_with("text/event-stream")));
    if sse && let Some(id) = req.headers().get("last-event-id") {
        // The browser's resume: the id of the last event it received.
        let id =
            id.to_str().ok().and_then(parse_event_id).ok_or_else(|| {
                ApiError::BadRequest("Last-Event-ID must be an event id (<seq>@<node> or <seq>)".into())
            })?;
        q.since = Some(id.0);
        if let Some(uid) = id.1 {
            q.node = Some(uid.to_string());
        }
    }
    let feed = &app.feed;
    let permit = feed
        .permits
        .clone()
        .try_acquire_owned()
        .map_err(|_| ApiError::Busy("max_watchers change feed watchers are open"))?;
    let store = &app.store;
    let head = store.last_seq();
    if let Some(since) = q.since {
        check_cursor(since, q.node.as_deref(), store.feed_id(), store.change_floor(), head).map_err(gone)?;
    } else if q.node.as_deref().is_some_and(|n| n != store.feed_id()) {
        return Err(gone(Gone::OtherNode));
    }
    let reader = Reader {
        app: app.clone(),
        filter: Arc::new(Filter { prefix: q.prefix.clone(), caller: caller.cloned() }),
        authorization: req.headers().get(header::AUTHORIZATION).cloned(),
    };
    if sse {
        return Ok(stream(reader, q.since.unwrap_or(head), q.values, permit));
    }
    let Some(since) = q.since else {
        // The way to start: read the data, then watch from here.
        return Ok(answer(store.feed_id(), head, Vec::new(), false));
    };
    long_poll(reader, since, q).await
}

/// One watcher's reading state: what it may see, and how to check its token again.
struct Reader {
    app: Arc<App>,
    filter: Arc<Filter>,
    /// The request's `Authorization` header, checked again before each read so a
    /// revoked or expired token (or one whose rules changed) stops seeing changes.
    authorization: Option<HeaderValue>,
}

impl Reader {
    /// Checks the token again (client auth on) and takes its current rules.
    async fn recheck(&mut self) -> Result<(), ApiError> {
        let Some(acl) = &self.app.acl else { return Ok(()) };
        let caller = crate::api::authenticate_header(acl, self.authorization.as_ref()).await?;
        if !caller.may_read_under(&self.filter.prefix) {
            return Err(ApiError::Forbidden(format!("the token can read nothing under {:?}", self.filter.prefix)));
        }
        self.filter = Arc::new(Filter { prefix: self.filter.prefix.clone(), caller: Some(caller) });
        Ok(())
    }

    /// The events after `cursor` up to `head`, checked against the floor after the
    /// scan: the floor rises before trimmed entries go, so a scan that may have missed
    /// one is refused (Gone), never answered with a gap.
    async fn read(
        &self,
        cursor: u64,
        head: u64,
        limit: usize,
        max_bytes: usize,
        values: bool,
    ) -> Result<Page, ApiError> {
        let (s, f) = (self.app.store.clone(), self.filter.clone());
        let page = blocking(move || read_page(&s, &f, cursor, head, limit, max_bytes, values)).await?;
        let floor = self.app.store.change_floor();
        if cursor < floor {
            return Err(gone(Gone::TooOld { since: cursor, floor }));
        }
        Ok(page)
    }
}

async fn long_poll(mut reader: Reader, since: u64, q: Query) -> Result<Response<ResponseBody>, ApiError> {
    let app = reader.app.clone();
    let feed = &app.feed;
    let store = &app.store;
    let deadline = tokio::time::Instant::now() + q.wait;
    // Subscribed before the first read of last_seq: no wake-up is lost.
    let wakeups = store.wakeups();
    let mut sub = wakeups.subscribe(&q.prefix);
    let mut shutdown = feed.shutdown.clone();
    let mut cursor = since;
    let mut filtered = false;
    let mut first = true;
    loop {
        if !first {
            reader.recheck().await?;
        }
        first = false;
        let head = store.last_seq();
        let page = reader.read(cursor, head, q.limit, MAX_ANSWER_BYTES, q.values).await?;
        // Over every read of this wait: events skipped for the token's rules.
        filtered |= page.filtered;
        let done = !page.events.is_empty()
            || page.cursor < head
            || tokio::time::Instant::now() >= deadline
            || shutdown.is_triggered();
        cursor = page.cursor;
        if done {
            feed.events_sent.fetch_add(page.events.len() as u64, Ordering::Relaxed);
            let events = page.events.into_iter().map(|(_, j)| j).collect();
            return Ok(answer(store.feed_id(), cursor, events, filtered));
        }
        tokio::select! {
            _ = sub.changed() => {}
            _ = tokio::time::sleep_until(deadline) => {}
            _ = shutdown.wait() => {}
        }
    }
}

fn answer(feed_id: &str, last_seq: u64, events: Vec<String>, filtered: bool) -> Response<ResponseBody> {
    let head = serde_json::json!({ "node": feed_id, "last_seq": last_seq }).to_string();
    let mut body = String::with_capacity(head.len() + 12 + events.iter().map(|e| e.len() + 1).sum::<usize>());
    body.push_str(&head[..head.len() - 1]);
    body.push_str(",\"events\":[");
    body.push_str(&events.join(","));
    body.push_str("]}");
    let mut resp = Response::new(ResponseBody::whole(Bytes::from(body)));
    resp.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
    if filtered {
        resp.headers_mut().insert(crate::api::FILTERED_HEADER, HeaderValue::from_static("true"));
    }
    resp
}

/// A frame on its way to a stream's connection, holding its share of the streams'
/// byte budget until the connection takes it.
type Queued = (Bytes, Option<tokio::sync::OwnedSemaphorePermit>);

/// A change stream's body: frames from its reader task, then (when the task ended it
/// early) one last `event: error`.
pub struct SseBody {
    rx: mpsc::Receiver<Queued>,
    ending: Arc<Mutex<Option<Bytes>>>,
}

impl Body for SseBody {
    type Data = Bytes;
    type Error = std::convert::Infallible;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        match self.rx.poll_recv(cx) {
            // The permit goes here: the frame is the connection's now.
            Poll::Ready(Some((b, _permit))) => Poll::Ready(Some(Ok(Frame::data(b)))),
            Poll::Ready(None) => {
                let last = self.ending.lock().unwrap_or_else(|p| p.into_inner()).take();
                Poll::Ready(last.map(|b| Ok(Frame::data(b))))
            }
            Poll::Pending => Poll::Pending,
        }
    }
}

/// Why a stream ended early, sent as its last event.
fn error_event(reason: &str, message: &str) -> Bytes {
    let data = serde_json::json!({ "error": message, "reason": reason });
    Bytes::from(format!("event: error\ndata: {data}\n\n"))
}

fn stream(
    reader: Reader,
    since: u64,
    values: bool,
    permit: tokio::sync::OwnedSemaphorePermit,
) -> Response<ResponseBody> {
    let (tx, rx) = mpsc::channel(STREAM_FRAMES);
    let ending = Arc::new(Mutex::new(None));
    let end = ending.clone();
    tokio::spawn(async move {
        let app = reader.app.clone();
        if let Some((reason, message)) = run_stream(reader, since, values, &tx).await {
            if reason == "lag" {
                app.feed.lagged.fetch_add(1, Ordering::Relaxed);
            }
            *end.lock().unwrap_or_else(|p| p.into_inner()) = Some(error_event(reason, &message));
        }
        drop(permit);
    });
    let mut resp = Response::new(ResponseBody::Stream(SseBody { rx, ending }));
    let h = resp.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static("text/event-stream"));
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    // nginx buffers proxied answers by default; a stream must pass at once.
    h.insert("x-accel-buffering", HeaderValue::from_static("no"));
    resp
}

/// How a stream ends early: the reason and message of its error event (`None`: the
/// client went away).
type End = Option<(&'static str, String)>;

fn ended(e: ApiError) -> End {
    let reason = match &e {
        ApiError::Gone(_) => "expired",
        ApiError::NoToken(_) | ApiError::Forbidden(_) => "unauthorized",
        _ => "error",
    };
    Some((reason, e.message()))
}

/// Queues one frame for the connection: first its bytes from the streams' shared
/// budget, then a place in the stream's channel, each within the stall timeout.
async fn send(feed: &Feed, tx: &mpsc::Sender<Queued>, frame: Bytes) -> Result<(), End> {
    let mut shutdown = feed.shutdown.clone();
    let stall = feed.stall;
    let lag = || {
        Some((
            "lag",
            format!(
                "the client took nothing for {} s (changes_stall_timeout); resume from the last event id",
                stall.as_secs_f64()
            ),
        ))
    };
    let queue = async {
        let bytes = u32::try_from(frame.len()).unwrap_or(u32::MAX).min(STREAM_BUFFER_BYTES);
        let permit = match tokio::time::timeout(stall, feed.buffered.clone().acquire_many_owned(bytes)).await {
            Ok(Ok(p)) => Some(p),
            Ok(Err(_)) => None,
            Err(_) => {
                return Err(Some((
                    "busy",
                    "the node's change streams hold as many unsent bytes as it allows; resume from the last event id"
                        .to_string(),
                )));
            }
        };
        match tokio::time::timeout(stall, tx.send((frame, permit))).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(_)) => Err(None),
            Err(_) => Err(lag()),
        }
    };
    tokio::select! {
        r = queue => r,
        _ = shutdown.wait() => Err(stopping()),
    }
}

fn stopping() -> End {
    Some(("shutdown", "the node is stopping; resume from the last event id on another node or later".to_string()))
}

/// Feeds one stream until its client goes away or it must end early.
async fn run_stream(mut reader: Reader, since: u64, values: bool, tx: &mpsc::Sender<Queued>) -> End {
    let app = reader.app.clone();
    let feed = &app.feed;
    let store = &app.store;
    let id = |seq: u64| sse_id(seq, store.feed_id());
    let wakeups = store.wakeups();
    let mut sub = wakeups.subscribe(&reader.filter.prefix);
    let mut shutdown = feed.shutdown.clone();
    let mut heartbeat = tokio::time::interval_at(tokio::time::Instant::now() + HEARTBEAT, HEARTBEAT);
    heartbeat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut cursor = since;
    // The first frame carries the starting cursor as an id, so a client that
    // reconnects before any event arrives resumes from here, not from a later now.
    let hello = format!("id: {}\n: kvs change feed {} from seq {since}\nretry: 1000\n\n", id(since), store.feed_id());
    if let Err(end) = send(feed, tx, Bytes::from(hello)).await {
        return end;
    }
    let mut first = true;
    loop {
        if !first && let Err(e) = reader.recheck().await {
            return ended(e);
        }
        first = false;
        let head = store.last_seq();
        if cursor < head {
            let page = match reader.read(cursor, head, MAX_LIMIT, FRAME_BYTES, values).await {
                Ok(p) => p,
                Err(e) => return ended(e),
            };
            let mut frame = String::new();
            let mut last = cursor;
            for (e, json) in &page.events {
                let op = if e.delete { "delete" } else { "put" };
                frame.push_str(&format!("id: {}\nevent: {op}\n", id(e.seq)));
                // A value stored pretty-printed has line breaks (only ever between
                // tokens): each line goes in a data line of its own, as SSE requires.
                for line in json.split(['\n', '\r']) {
                    frame.push_str("data: ");
                    frame.push_str(line);
                    frame.push('\n');
                }
                frame.push('\n');
                last = e.seq;
            }
            if page.cursor > last {
                // The cursor moved past changes outside the prefix: an id-only block
                // moves the client's Last-Event-ID along with it.
                frame.push_str(&format!("id: {}\n\n", id(page.cursor)));
            }
            cursor = page.cursor;
            let n = page.events.len() as u64;
            if !frame.is_empty()
                && let Err(end) = send(feed, tx, Bytes::from(frame)).await
            {
                return end;
            }
            feed.events_sent.fetch_add(n, Ordering::Relaxed);
            continue;
        }
        tokio::select! {
            _ = sub.changed() => {}
            _ = heartbeat.tick() => {
                if let Err(end) = send(feed, tx, Bytes::from_static(b": keepalive\n\n")).await {
                    return end;
                }
            }
            _ = shutdown.wait() => return stopping(),
            _ = tx.closed() => return None,
        }
    }
}

/// Trims the change log to its retention, every `interval`, until shutdown.
pub async fn trim_loop(writer: crate::storage::Writer, retention: Duration, mut shutdown: Shutdown) {
    let interval = (retention / 10).clamp(Duration::from_millis(100), Duration::from_secs(60));
    loop {
        tokio::select! {
            _ = tokio::time::sleep(interval) => {}
            _ = shutdown.wait() => return,
        }
        let before = crate::clock::now_ms().saturating_sub(retention.as_millis() as u64);
        // In batches, so a long backlog never holds the writer for long.
        loop {
            match writer.trim_changes(before, 10_000).await {
                Ok(0) => break,
                Ok(_) if shutdown.is_triggered() => return,
                Ok(_) => tokio::task::yield_now().await,
                Err(e) => {
                    tracing::warn!(error = %e, "cannot trim the change log");
                    break;
                }
            }
        }
    }
}
