//! The change feed (`GET /changes`) on real processes: long-poll and SSE, prefixes,
//! replication, restarts, cursors that cannot be served, limits, slow readers and
//! shutdown.

mod common;
use common::*;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

fn node(extra: &str) -> (tempfile::TempDir, Node) {
    let dir = tempfile::tempdir().unwrap();
    let node = Node::start_in(dir.path(), extra);
    (dir, node)
}

/// The feed's answer to `query` (a long-poll), asserting 200.
fn changes(n: &Node, query: &str) -> serde_json::Value {
    let r = n.get(&format!("/changes?{query}"));
    assert_eq!(r.status, 200, "{query}: {}", r.text());
    r.json()
}

fn last_seq(n: &Node) -> u64 {
    changes(n, "")["last_seq"].as_u64().unwrap()
}

/// `(key, op)` of each event.
fn ops(answer: &serde_json::Value) -> Vec<(String, String)> {
    answer["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| (e["key"].as_str().unwrap().to_string(), e["op"].as_str().unwrap().to_string()))
        .collect()
}

/// Starts a long-poll on its own thread once, and returns when the node counts it open.
fn long_poll(n: &Node, query: String) -> std::thread::JoinHandle<Resp> {
    let before = metric(n, "kvs_change_watchers");
    let addr = n.addr.clone();
    let handle = std::thread::spawn(move || http(&addr, "GET", &format!("/changes?{query}"), None));
    wait_for(DEADLINE, "the long-poll to be waiting", || (metric(n, "kvs_change_watchers") > before).then_some(()));
    handle
}

#[test]
fn a_long_poll_wakes_on_a_put_and_a_delete_under_its_prefix_only() {
    let (_d, n) = node("");
    let start = last_seq(&n);
    let poll = long_poll(&n, format!("since={start}&prefix=users&wait=60"));
    // Siblings and other keys do not answer it.
    assert_eq!(n.put("/kv/usersx/a", "1").status, 200);
    assert_eq!(n.put("/kv/other", "1").status, 200);
    assert_eq!(n.put("/kv/users/john", r#"{"a":1}"#).status, 200);
    let answer = poll.join().unwrap();
    assert_eq!(answer.status, 200, "{}", answer.text());
    let answer = answer.json();
    assert_eq!(ops(&answer), vec![("users/john".to_string(), "put".to_string())]);
    let event = &answer["events"][0];
    assert!(event.get("value").is_none(), "values only with &values");
    let cursor = answer["last_seq"].as_u64().unwrap();
    assert_eq!(cursor, start + 3, "the cursor moves past the siblings too");
    assert_eq!(event["seq"], cursor);

    let poll = long_poll(&n, format!("since={cursor}&prefix=users&wait=60&values"));
    assert_eq!(n.delete("/kv/users/john").status, 204);
    let answer = poll.join().unwrap().json();
    assert_eq!(ops(&answer), vec![("users/john".to_string(), "delete".to_string())]);

    // The key itself is under its prefix; with &values a put carries its JSON.
    let cursor = answer["last_seq"].as_u64().unwrap();
    assert_eq!(n.put("/kv/users", "[1, 2]").status, 200);
    let answer = changes(&n, &format!("since={cursor}&prefix=users&values"));
    assert_eq!(answer["events"][0]["value"], serde_json::json!([1, 2]));
    // A wait that sees nothing answers empty with the cursor it may resume from.
    let cursor = answer["last_seq"].as_u64().unwrap();
    let answer = changes(&n, &format!("since={cursor}&prefix=users&wait=1"));
    assert_eq!((answer["events"].as_array().unwrap().len(), answer["last_seq"].as_u64()), (0, Some(cursor)));
    assert_eq!(n.health()["last_seq"], cursor);
    // A prefix is decoded once, as a query value: the key `odd%41` (a literal `%41`,
    // sent as `%2541`) is watched as `prefix=odd%2541`, not as `oddA`.
    assert_eq!(n.put("/kv/odd%2541/k", "1").status, 200);
    assert_eq!(n.put("/kv/oddA/k", "1").status, 200);
    let answer = changes(&n, &format!("since={cursor}&prefix=odd%2541"));
    assert_eq!(ops(&answer), vec![("odd%41/k".to_string(), "put".to_string())]);
}

#[test]
fn a_replaced_version_is_marked_superseded_and_pages_follow_limit() {
    let (_d, n) = node("");
    let start = last_seq(&n);
    for i in 0..5 {
        assert_eq!(n.put("/kv/k", &i.to_string()).status, 200);
    }
    let answer = changes(&n, &format!("since={start}&values&limit=2"));
    let events = answer["events"].as_array().unwrap();
    assert_eq!(events.len(), 2);
    assert_eq!(events[0]["superseded"], true, "{answer}");
    assert!(events[0].get("value").is_none());
    assert_eq!(answer["last_seq"], start + 2, "a page cut by limit resumes after its last event");
    let rest = changes(&n, &format!("since={}&values", answer["last_seq"]));
    let events = rest["events"].as_array().unwrap();
    assert_eq!(events.len(), 3);
    assert_eq!(events[2]["value"], 4, "the current version carries its value");
}

#[test]
fn replicated_changes_appear_on_the_other_nodes_feeds() {
    let d = Dirs::new();
    let (n1, n2, n3) = three(&d, "");
    let cursors: Vec<u64> = [&n2, &n3].iter().map(|n| last_seq(n)).collect();
    let polls: Vec<_> =
        [&n2, &n3].iter().zip(&cursors).map(|(n, c)| long_poll(n, format!("since={c}&prefix=users&wait=60"))).collect();
    let put = n1.put("/kv/users/ann", "1").json();
    for poll in polls {
        let answer = poll.join().unwrap().json();
        assert_eq!(ops(&answer), vec![("users/ann".to_string(), "put".to_string())]);
        assert_eq!(answer["events"][0]["uuid"], put["uuid"], "the same version");
    }
    // A delete made on n1 shows on n2 and n3 as a delete.
    let cursors: Vec<u64> = [&n2, &n3].iter().map(|n| last_seq(n)).collect();
    assert_eq!(n1.delete("/kv/users/ann").status, 204);
    for (n, c) in [&n2, &n3].iter().zip(cursors) {
        let answer = changes(n, &format!("since={c}&prefix=users&wait=20"));
        assert_eq!(ops(&answer), vec![("users/ann".to_string(), "delete".to_string())]);
    }
    assert_ne!(changes(&n2, "")["node"], changes(&n3, "")["node"], "each node has its own cursor space");
}

#[test]
fn a_cursor_resumes_after_a_crash_and_nothing_acknowledged_is_missed() {
    let (_d, mut n) = node("");
    n.pin_port();
    let start = last_seq(&n);
    for i in 0..50 {
        assert_eq!(n.put(&format!("/kv/r/{i}"), "1").status, 200);
    }
    let first = changes(&n, &format!("since={start}&limit=20"));
    let cursor = first["last_seq"].as_u64().unwrap();
    n.kill9();
    n.restart();
    let rest = changes(&n, &format!("since={cursor}&node={}", first["node"].as_str().unwrap()));
    let keys: Vec<String> = ops(&first).into_iter().chain(ops(&rest)).map(|(k, _)| k).collect();
    let want: Vec<String> = (0..50).map(|i| format!("r/{i}")).collect();
    assert_eq!(keys, want, "every acknowledged write, in order, once");
    // Numbering goes on after the restart, never reusing a seq.
    let after = rest["last_seq"].as_u64().unwrap();
    assert_eq!(n.put("/kv/r/late", "1").status, 200);
    let late = changes(&n, &format!("since={after}"));
    assert_eq!(late["events"][0]["seq"], after + 1);
}

#[test]
fn cursors_this_node_cannot_serve_get_410() {
    let (_d, n) = node("changes_retention_hours: 0.0003\n");
    assert_eq!(n.put("/kv/a", "1").status, 200);
    let head = changes(&n, "");
    let seq = head["last_seq"].as_u64().unwrap();
    n.get(&format!("/changes?since={}", seq + 1)).assert_error(410);
    n.get(&format!("/changes?since={seq}&node=someone-else")).assert_error(410);
    n.get("/changes?node=someone-else").assert_error(410);
    assert_eq!(changes(&n, &format!("since={seq}&node={}", head["node"].as_str().unwrap()))["last_seq"], seq);
    // Retention about a second: the change is trimmed, and a cursor before it is gone.
    let r = wait_for(DEADLINE, "the change to be trimmed", || {
        let r = n.get("/changes?since=0");
        (r.status != 200).then_some(r)
    });
    r.assert_error(410);
    assert!(r.json()["error"].as_str().unwrap().contains("re-read"), "{}", r.text());
    // The current cursor still works.
    assert_eq!(changes(&n, &format!("since={seq}"))["last_seq"], seq);
}

#[test]
fn bad_change_feed_requests_get_400_and_other_methods_405() {
    let (_d, n) = node("");
    for q in [
        "since=abc",
        "since=-1",
        "wait=301",
        "wait=1.5",
        "limit=0",
        "limit=10001",
        "values=maybe",
        "prefix=a//b",
        "prefix=./acl",
        "bogus=1",
    ] {
        n.get(&format!("/changes?{q}")).assert_error(400);
    }
    http(&n.addr, "POST", "/changes", Some(b"{}")).assert_error(405);
    let r = raw(
        &n.addr,
        &request("GET", "/changes", &[("Accept", "text/event-stream"), ("Last-Event-ID", "nonsense")], None),
        false,
    );
    r.assert_error(400);
}

/// A Server-Sent Events connection read as it arrives.
struct Sse {
    stream: TcpStream,
    buf: String,
}

impl Sse {
    fn open(n: &Node, query: &str, headers: &[(&str, &str)]) -> Sse {
        let mut stream = TcpStream::connect(&n.addr).unwrap();
        stream.set_read_timeout(Some(Duration::from_millis(200))).unwrap();
        let mut all = vec![("Accept", "text/event-stream")];
        all.extend_from_slice(headers);
        stream.write_all(&request("GET", &format!("/changes?{query}"), &all, None)).unwrap();
        Sse { stream, buf: String::new() }
    }

    /// Reads until `cond` holds on what arrived, or the deadline.
    fn until(&mut self, what: &str, cond: impl Fn(&str) -> bool) {
        let deadline = Instant::now() + DEADLINE;
        let mut chunk = [0u8; 65536];
        while !cond(&self.buf) {
            assert!(Instant::now() < deadline, "timed out waiting for {what}; got {:?}", self.buf);
            match self.stream.read(&mut chunk) {
                Ok(0) => assert!(cond(&self.buf), "stream closed before {what}; got {:?}", self.buf),
                Ok(k) => self.buf.push_str(&String::from_utf8_lossy(&chunk[..k])),
                Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => {}
                Err(e) => panic!("read: {e}"),
            }
        }
    }

    /// The events received so far: (id, event, data).
    fn events(&self) -> Vec<(String, String, serde_json::Value)> {
        events_in(&self.buf)
    }
}

/// The events in a raw SSE answer: (id, event, data). Frames hold whole events, so
/// the chunk-size lines of the chunked encoding sit between events, never inside one.
fn events_in(buf: &str) -> Vec<(String, String, serde_json::Value)> {
    let body = buf.split_once("\r\n\r\n").map_or("", |(_, b)| b);
    body.split("\n\n")
        .filter_map(|block| {
            let field = |name: &str| {
                block.lines().filter_map(|l| l.strip_prefix(name)).map(str::trim).collect::<Vec<_>>().join("\n")
            };
            let event = field("event:");
            (!event.is_empty()).then(|| (field("id:"), event, serde_json::from_str(&field("data:")).unwrap()))
        })
        .collect()
}

/// The body of a chunked answer still carries chunk sizes; events never straddle
/// them in these tests' small frames, but the head must say it streams.
fn assert_streaming(s: &Sse) {
    let head = s.buf.split_once("\r\n\r\n").map_or("", |(h, _)| h).to_ascii_lowercase();
    assert!(head.starts_with("http/1.1 200"), "{head}");
    assert!(head.contains("content-type: text/event-stream"), "{head}");
}

#[test]
fn sse_streams_changes_and_resumes_from_last_event_id() {
    let (_d, n) = node("");
    let mut s = Sse::open(&n, "prefix=users&values", &[]);
    s.until("the stream to open", |b| b.contains("retry:"));
    assert_streaming(&s);
    assert_eq!(n.put("/kv/users/a", r#"{"v": 1}"#).status, 200);
    assert_eq!(n.put("/kv/orders/x", "1").status, 200);
    assert_eq!(n.put("/kv/users/b", "{\n  \"pretty\": true\n}").status, 200);
    assert_eq!(n.delete("/kv/users/a").status, 204);
    s.until("three events", |b| events_in(b).len() >= 3);
    let events = s.events();
    let got: Vec<(&str, &str)> = events.iter().map(|(_, e, d)| (e.as_str(), d["key"].as_str().unwrap())).collect();
    assert_eq!(got, vec![("put", "users/a"), ("put", "users/b"), ("delete", "users/a")]);
    assert_eq!(events[1].2["value"], serde_json::json!({"pretty": true}), "a multi-line value arrives whole");
    let uid = changes(&n, "")["node"].as_str().unwrap().to_string();
    assert_eq!(events[0].0, format!("{}@{uid}", events[0].2["seq"]), "ids name the node");
    drop(s);

    // A browser reconnects with the last id it saw: the stream goes on after it.
    assert_eq!(n.put("/kv/users/c", "1").status, 200);
    let mut again = Sse::open(&n, "prefix=users", &[("Last-Event-ID", &events[1].0)]);
    again.until("the rest", |b| events_in(b).len() >= 2);
    let keys: Vec<String> = again.events().iter().map(|e| e.2["key"].as_str().unwrap().to_string()).collect();
    assert_eq!(keys, vec!["users/a", "users/c"]);
    // An id from another node is refused, not misread.
    let r = raw(
        &n.addr,
        &request("GET", "/changes", &[("Accept", "text/event-stream"), ("Last-Event-ID", "1@another-node")], None),
        false,
    );
    r.assert_error(410);
}

#[test]
fn more_watchers_than_max_watchers_get_503() {
    let (_d, n) = node("max_watchers: 2\n");
    let start = last_seq(&n);
    let a = long_poll(&n, format!("since={start}&wait=60&prefix=a"));
    let b = long_poll(&n, format!("since={start}&wait=60&prefix=b"));
    let r = n.get(&format!("/changes?since={start}"));
    r.assert_error(503);
    assert!(r.json()["error"].as_str().unwrap().contains("max_watchers"), "{}", r.text());
    // Writes and reads are not watchers.
    assert_eq!(n.put("/kv/a", "1").status, 200);
    assert_eq!(a.join().unwrap().status, 200);
    assert_eq!(changes(&n, &format!("since={start}"))["events"].as_array().unwrap().len(), 1);
    assert_eq!(n.put("/kv/b", "1").status, 200);
    assert_eq!(b.join().unwrap().status, 200);
    wait_for(DEADLINE, "no watchers open", || (metric(&n, "kvs_change_watchers") == 0).then_some(()));
}

#[test]
fn a_stream_whose_reader_stops_reading_is_ended_with_an_error_event() {
    let (_d, n) = node("changes_stall_timeout: 0.5\ndurability: buffer\n");
    let mut s = Sse::open(&n, "values", &[]);
    s.until("the stream to open", |b| b.contains("retry:"));
    // The reader takes nothing more while 32 MiB of changes arrive: far beyond what
    // the sockets and the stream's frames can hold.
    let value = format!("\"{}\"", "x".repeat(64 * 1024));
    let mut written = 0;
    wait_for(Duration::from_secs(60), "the stream to be ended for lag", || {
        for _ in 0..16 {
            assert_eq!(n.put(&format!("/kv/big/{written}"), &value).status, 200);
            written += 1;
        }
        (metric(&n, "kvs_change_streams_lagged_total") == 1).then_some(())
    });
    // What was sent before the end is all there, then the error, then the end.
    s.stream.set_read_timeout(Some(DEADLINE)).unwrap();
    let mut rest = Vec::new();
    let _ = s.stream.read_to_end(&mut rest);
    s.buf.push_str(&String::from_utf8_lossy(&rest));
    let events = s.events();
    let (last, before) = events.split_last().expect("events");
    assert_eq!(last.1, "error", "the stream ends with an error event");
    assert_eq!(last.2["reason"], "lag", "{}", last.2);
    assert!(!before.is_empty());
    let seqs: Vec<u64> = before.iter().map(|e| e.2["seq"].as_u64().unwrap()).collect();
    assert!(seqs.windows(2).all(|w| w[1] == w[0] + 1), "nothing skipped before the end");
    // The reader resumes from its last id and gets the rest.
    let mut again = Sse::open(&n, "", &[("Last-Event-ID", &before.last().unwrap().0)]);
    let next = seqs.last().unwrap() + 1;
    again.until("the next event", |b| !events_in(b).is_empty());
    assert_eq!(again.events()[0].2["seq"], next);
}

#[test]
fn stopping_the_node_ends_waits_and_streams_at_once() {
    let (_d, mut n) = node("");
    let start = last_seq(&n);
    let poll = long_poll(&n, format!("since={start}&wait=300"));
    let mut s = Sse::open(&n, "", &[]);
    s.until("the stream to open", |b| b.contains("retry:"));
    wait_for(DEADLINE, "two watchers", || (metric(&n, "kvs_change_watchers") == 2).then_some(()));
    n.stop_with("TERM");
    // The node stopped well within the long-poll's 300 s (stop_with waits for it).
    let answer = poll.join().unwrap();
    assert_eq!(answer.status, 200, "{}", answer.text());
    assert_eq!(answer.json()["events"].as_array().unwrap().len(), 0);
    s.until("the shutdown event", |b| events_in(b).iter().any(|e| e.1 == "error"));
    let events = s.events();
    assert_eq!(events.last().unwrap().2["reason"], "shutdown");
}

#[test]
fn watchers_never_take_the_connections_other_clients_need() {
    // More watchers than the 1024 connections a node keeps for everything else.
    let (_d, n) = node("max_watchers: 1100\n");
    let start = last_seq(&n);
    let mut held = Vec::new();
    for i in 0..1100 {
        let mut s = TcpStream::connect(&n.addr).unwrap();
        s.write_all(&request("GET", &format!("/changes?since={start}&wait=120&prefix=idle/{i}"), &[], None)).unwrap();
        held.push(s);
    }
    wait_for(DEADLINE, "1100 watchers open", || (metric(&n, "kvs_change_watchers") == 1100).then_some(()));
    // The node still takes new connections for reads and writes.
    assert_eq!(n.put("/kv/still/here", "1").status, 200);
    assert_eq!(n.get("/kv/still/here").text(), "1");
    drop(held);
    wait_for(DEADLINE, "the watchers to go", || (metric(&n, "kvs_change_watchers") == 0).then_some(()));
}

#[test]
fn with_buffer_durability_a_crash_starts_a_new_feed_and_a_clean_stop_does_not() {
    let (_d, mut n) = node("durability: buffer\n");
    n.pin_port();
    assert_eq!(n.put("/kv/a", "1").status, 200);
    let before = changes(&n, "");
    let (feed, seq) = (before["node"].as_str().unwrap().to_string(), before["last_seq"].as_u64().unwrap());
    // A clean stop made everything durable: the feed goes on.
    assert_eq!(n.stop_with("TERM").code(), Some(0));
    n.restart();
    let after = changes(&n, &format!("since={seq}&node={feed}"));
    assert_eq!(after["node"], feed.as_str());
    // A crash may have lost the log's tail (an OS crash would): a new feed, and no
    // cursor from the old one is taken, with or without its node id.
    assert_eq!(n.put("/kv/b", "1").status, 200);
    n.kill9();
    n.restart();
    let new = changes(&n, "");
    assert_ne!(new["node"], feed.as_str());
    assert!(new["last_seq"].as_u64().unwrap() > seq + (1 << 31), "numbering jumped: {new}");
    for q in [format!("since={seq}"), format!("since={}", seq + 1), format!("since={seq}&node={feed}")] {
        n.get(&format!("/changes?{q}")).assert_error(410);
    }
    // The new feed works from its own cursor.
    let cursor = new["last_seq"].as_u64().unwrap();
    assert_eq!(n.put("/kv/c", "1").status, 200);
    assert_eq!(ops(&changes(&n, &format!("since={cursor}"))), vec![("c".to_string(), "put".to_string())]);
}

#[test]
fn a_stream_names_its_cursor_before_any_event() {
    let (_d, n) = node("");
    assert_eq!(n.put("/kv/other", "1").status, 200);
    let head = changes(&n, "");
    let id = format!("{}@{}", head["last_seq"], head["node"].as_str().unwrap());
    let mut s = Sse::open(&n, "prefix=users", &[]);
    // A browser that loses the connection now resumes from here, not from a later now.
    s.until("the first id", |b| b.contains(&format!("id: {id}\n")));
    // Changes outside the prefix move the id along with the cursor.
    assert_eq!(n.put("/kv/other", "2").status, 200);
    assert_eq!(n.put("/kv/users/x", "1").status, 200);
    s.until("the event", |b| !events_in(b).is_empty());
    let next = head["last_seq"].as_u64().unwrap() + 2;
    assert_eq!(s.events()[0].0, format!("{next}@{}", head["node"].as_str().unwrap()));
}
