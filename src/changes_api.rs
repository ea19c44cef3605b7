//! `GET /changes`: the change feed, as a long-poll (JSON) or a Server-Sent Events
//! stream (`Accept: text/event-stream`), and the task that trims the log.
//!
//! Both read the log the writer keeps ([`crate::storage::Store::changes_after`]) after
//! the client's cursor and wait on the prefix's [`crate::changes::Wakeups`] when
//! there is nothing new. ARCHITECTURE.md ("Change feed") has the rules.

use crate::acl::{Access, Caller};
use crate::api::{ApiError, ResponseBody, json_response, parse_query};
use crate::changes::{Event, Gone, check_cursor, parse_event_id, sse_id, under};
use crate::node::App;
use crate::shutdown::Shutdown;
use crate::storage::{Store, blocking};
use bytes::Bytes;
use hyper::body::{Body, Frame};
use hyper::header::{self, HeaderValue};
use hyper::{Method, Request, Response, StatusCode};
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
const MAX_ANSWER_BYTES: usize = 16 * 1024 * 1024;
/// Most log entries one read looks at: a sparse prefix far behind answers with an
/// empty page and an advanced cursor instead of scanning the whole log at once.
const MAX_SCAN: usize = 100_000;
/// A stream sends events in frames of about this many bytes (one value may overshoot).
const FRAME_BYTES: usize = 256 * 1024;
/// Frames waiting between a stream's reader task and its connection: with
/// [`FRAME_BYTES`], the memory a watcher holds at most (plus one value).
const STREAM_FRAMES: usize = 4;
/// How often an idle stream sends a comment, so proxies and clients see it alive.
pub const HEARTBEAT: Duration = Duration::from_secs(15);

/// The change feed's shared state: the watcher limit, the counters, the stop signal.
pub struct Feed {
    permits: Arc<Semaphore>,
    max_watchers: usize,
    stall: Duration,
    shutdown: Shutdown,
    /// This data dir's uid: cursors are per node.
    uid: String,
    /// Events sent to clients (long-polls and streams).
    pub events_sent: AtomicU64,
    /// Streams ended because their client did not keep up.
    pub lagged: AtomicU64,
}

impl Feed {
    /// The feed of a node with data dir uid `uid`; `shutdown` ends every wait.
    pub fn new(max_watchers: usize, stall: Duration, uid: String, shutdown: Shutdown) -> Feed {
        Feed {
            permits: Arc::new(Semaphore::new(max_watchers)),
            max_watchers,
            stall,
            shutdown,
            uid,
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
            "prefix" => q.prefix = crate::path::parse_key(&v).map_err(|e| bad(format!("prefix: {e}")))?,
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
                // The version is still the current one: its value.
                Some(r) if r.uuid == event.uuid && r.data.is_some() => {
                    event_json(&event, Shown::Value(r.data.as_deref().unwrap_or_default()))
                }
                // Replaced since: a later event carries what replaced it.
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
    if caller.is_some_and(|c| !c.has_any_rule()) {
        return Err(ApiError::Forbidden("/changes needs a token with at least one rule that allows something".into()));
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
        check_cursor(since, q.node.as_deref(), &feed.uid, store.change_floor(), head).map_err(gone)?;
    } else if q.node.as_deref().is_some_and(|n| n != feed.uid) {
        return Err(gone(Gone::OtherNode));
    }
    let filter = Filter { prefix: q.prefix.clone(), caller: caller.cloned() };
    if sse {
        return Ok(stream(app.clone(), filter, q.since.unwrap_or(head), q.values, permit));
    }
    let Some(since) = q.since else {
        // The way to start: read the data, then watch from here.
        return Ok(answer(&feed.uid, head, Vec::new(), false));
    };
    long_poll(app, Arc::new(filter), since, q).await
}

async fn long_poll(
    app: &Arc<App>,
    filter: Arc<Filter>,
    since: u64,
    q: Query,
) -> Result<Response<ResponseBody>, ApiError> {
    let feed = &app.feed;
    let store = app.store.clone();
    let deadline = tokio::time::Instant::now() + q.wait;
    // Subscribed before the first read of last_seq: no wake-up is lost.
    let wakeups = store.wakeups();
    let mut sub = wakeups.subscribe(&q.prefix);
    let mut shutdown = feed.shutdown.clone();
    let mut cursor = since;
    loop {
        if cursor < store.change_floor() {
            return Err(gone(Gone::TooOld { since: cursor, floor: store.change_floor() }));
        }
        let head = store.last_seq();
        let (s, f) = (store.clone(), filter.clone());
        let (limit, values) = (q.limit, q.values);
        let page = blocking(move || read_page(&s, &f, cursor, head, limit, MAX_ANSWER_BYTES, values)).await?;
        let done = !page.events.is_empty()
            || page.cursor < head
            || tokio::time::Instant::now() >= deadline
            || shutdown.is_triggered();
        cursor = page.cursor;
        if done {
            feed.events_sent.fetch_add(page.events.len() as u64, Ordering::Relaxed);
            return Ok(answer(&feed.uid, cursor, page.events.into_iter().map(|(_, j)| j).collect(), page.filtered));
        }
        tokio::select! {
            _ = sub.changed() => {}
            _ = tokio::time::sleep_until(deadline) => {}
            _ = shutdown.wait() => {}
        }
    }
}

fn answer(uid: &str, last_seq: u64, events: Vec<String>, filtered: bool) -> Response<ResponseBody> {
    let head = serde_json::json!({ "node": uid, "last_seq": last_seq }).to_string();
    let mut body = String::with_capacity(head.len() + 12 + events.iter().map(|e| e.len() + 1).sum::<usize>());
    body.push_str(&head[..head.len() - 1]);
    body.push_str(",\"events\":[");
    body.push_str(&events.join(","));
    body.push_str("]}");
    let mut resp =
        json_response(StatusCode::OK, &serde_json::Value::Null).map(|_| ResponseBody::whole(Bytes::from(body)));
    if filtered {
        resp.headers_mut().insert(crate::api::FILTERED_HEADER, HeaderValue::from_static("true"));
    }
    resp
}

/// A change stream's body: frames from its reader task, then (when the task ended it
/// early) one last `event: error`.
pub struct SseBody {
    rx: mpsc::Receiver<Bytes>,
    ending: Arc<Mutex<Option<Bytes>>>,
}

impl Body for SseBody {
    type Data = Bytes;
    type Error = std::convert::Infallible;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        match self.rx.poll_recv(cx) {
            Poll::Ready(Some(b)) => Poll::Ready(Some(Ok(Frame::data(b)))),
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
    app: Arc<App>,
    filter: Filter,
    since: u64,
    values: bool,
    permit: tokio::sync::OwnedSemaphorePermit,
) -> Response<ResponseBody> {
    let (tx, rx) = mpsc::channel(STREAM_FRAMES);
    let ending = Arc::new(Mutex::new(None));
    let end = ending.clone();
    tokio::spawn(async move {
        let reason = run_stream(&app, filter, since, values, &tx).await;
        if let Some((reason, message)) = reason {
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

/// Feeds one stream until its client goes away (`None`) or it must end early (the
/// reason and message of the error event).
async fn run_stream(
    app: &Arc<App>,
    filter: Filter,
    since: u64,
    values: bool,
    tx: &mpsc::Sender<Bytes>,
) -> Option<(&'static str, String)> {
    let feed = &app.feed;
    let store = app.store.clone();
    let filter = Arc::new(filter);
    let wakeups = store.wakeups();
    let mut sub = wakeups.subscribe(&filter.prefix);
    let mut shutdown = feed.shutdown.clone();
    let mut heartbeat = tokio::time::interval_at(tokio::time::Instant::now() + HEARTBEAT, HEARTBEAT);
    let mut cursor = since;
    // Sends one frame, waiting at most the stall timeout for the client to take one.
    let send = |frame: Bytes| {
        let mut shutdown = feed.shutdown.clone();
        async move {
            tokio::select! {
                r = tokio::time::timeout(feed.stall, tx.send(frame)) => match r {
                    Ok(Ok(())) => Ok(()),
                    Ok(Err(_)) => Err(None),
                    Err(_) => Err(Some(("lag", format!(
                        "the client took nothing for {} s (changes_stall_timeout) while changes were waiting; \
                         resume from the last event id", feed.stall.as_secs_f64()
                    )))),
                },
                _ = shutdown.wait() => Err(Some(("shutdown", "the node is stopping; resume from the last event id on another node or later".to_string()))),
            }
        }
    };
    let hello = format!(": kvs change feed of node {} from seq {since}\nretry: 1000\n\n", feed.uid);
    if let Err(end) = send(Bytes::from(hello)).await {
        return end;
    }
    loop {
        let floor = store.change_floor();
        if cursor < floor {
            return Some(("expired", Gone::TooOld { since: cursor, floor }.to_string()));
        }
        let head = store.last_seq();
        if cursor < head {
            let (s, f) = (store.clone(), filter.clone());
            let page = match blocking(move || read_page(&s, &f, cursor, head, MAX_LIMIT, FRAME_BYTES, values)).await {
                Ok(p) => p,
                Err(e) => return Some(("error", e.to_string())),
            };
            cursor = page.cursor;
            if page.events.is_empty() {
                continue;
            }
            let mut frame = String::new();
            for (e, json) in &page.events {
                let op = if e.delete { "delete" } else { "put" };
                frame.push_str(&format!("id: {}\nevent: {op}\n", sse_id(e.seq, &feed.uid)));
                // A value stored pretty-printed has line breaks (only ever between
                // tokens): each line goes in a data line of its own, as SSE requires.
                for line in json.split(['\n', '\r']) {
                    frame.push_str("data: ");
                    frame.push_str(line);
                    frame.push('\n');
                }
                frame.push('\n');
            }
            let n = page.events.len() as u64;
            if let Err(end) = send(Bytes::from(frame)).await {
                return end;
            }
            feed.events_sent.fetch_add(n, Ordering::Relaxed);
            continue;
        }
        tokio::select! {
            _ = sub.changed() => {}
            _ = heartbeat.tick() => {
                if let Err(end) = send(Bytes::from_static(b": keepalive\n\n")).await {
                    return end;
                }
            }
            _ = shutdown.wait() => {
                return Some(("shutdown", "the node is stopping; resume from the last event id on another node or later".to_string()));
            }
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
