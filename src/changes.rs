//! The change feed's rules, no I/O: the log entry stored per change, cursor checks,
//! SSE ids, and the map of watchers by prefix the writer wakes after each commit.
//!
//! ARCHITECTURE.md ("Change feed") has the protocol: what is a change, why `seq`
//! never goes back, why no wake-up is lost.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use tokio::sync::watch;
use uuid::Uuid;

/// One change as the log keeps it (the value is read from `records` when asked for).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Event {
    /// Node-local change number, from 1.
    pub seq: u64,
    /// When the node applied the change (Unix ms, its wall clock): retention goes by it.
    pub wall_ms: u64,
    /// The version's HLC timestamp.
    pub timestamp: u64,
    /// The version's uuid.
    pub uuid: Uuid,
    /// Whether the version is a delete.
    pub delete: bool,
    /// The key.
    pub key: String,
}

impl Event {
    /// The log entry's value: wall ms (8) · timestamp (8) · uuid (16) · kind (1) · key.
    pub fn encode_value(&self) -> Vec<u8> {
        let mut v = Vec::with_capacity(33 + self.key.len());
        v.extend_from_slice(&self.wall_ms.to_be_bytes());
        v.extend_from_slice(&self.timestamp.to_be_bytes());
        v.extend_from_slice(self.uuid.as_bytes());
        v.push(u8::from(self.delete));
        v.extend_from_slice(self.key.as_bytes());
        v
    }

    /// The entry back from its log key (seq, 8 bytes BE) and value; `None` when it
    /// does not decode.
    pub fn decode(key: &[u8], value: &[u8]) -> Option<Event> {
        let seq = u64::from_be_bytes(key.try_into().ok()?);
        let wall_ms = u64::from_be_bytes(value.get(..8)?.try_into().ok()?);
        let timestamp = u64::from_be_bytes(value.get(8..16)?.try_into().ok()?);
        let uuid = Uuid::from_slice(value.get(16..32)?).ok()?;
        let delete = match value.get(32)? {
            0 => false,
            1 => true,
            _ => return None,
        };
        let key = std::str::from_utf8(value.get(33..)?).ok()?.to_string();
        Some(Event { seq, wall_ms, timestamp, uuid, delete, key })
    }
}

/// Whether `key` is `prefix` or under `prefix/` (every key for the empty prefix).
pub fn under(key: &str, prefix: &str) -> bool {
    prefix.is_empty() || key.strip_prefix(prefix).is_some_and(|rest| rest.is_empty() || rest.starts_with('/'))
}

/// Why a cursor cannot be served (410 Gone).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Gone {
    /// The cursor names another node (another uid).
    OtherNode,
    /// The cursor is beyond this node's last seq: it came from another node or from a
    /// data dir that was replaced.
    Beyond {
        /// The cursor.
        since: u64,
        /// This node's last seq.
        last_seq: u64,
    },
    /// Changes after the cursor are no longer kept (retention, or a removal the log
    /// cannot show).
    TooOld {
        /// The cursor.
        since: u64,
        /// The oldest cursor this node can serve.
        floor: u64,
    },
}

impl std::fmt::Display for Gone {
    fn fmt(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        let again = "re-read the data and start again from this node's last_seq";
        match self {
            Gone::OtherNode => write!(f, "the cursor belongs to another node; cursors are per node: {again}"),
            Gone::Beyond { since, last_seq } => write!(
                f,
                "the cursor {since} is beyond this node's last_seq {last_seq} (it belongs to another node or \
                 to a data dir that was replaced): {again}"
            ),
            Gone::TooOld { since, floor } => write!(
                f,
                "changes after {since} are no longer kept (the oldest cursor this node can serve is {floor}): {again}"
            ),
        }
    }
}

/// Checks a client's cursor: `node` is the uid it names, if any; `floor` and
/// `last_seq` are the node's. A cursor `since` means "every change up to since seen".
pub fn check_cursor(since: u64, node: Option<&str>, my_uid: &str, floor: u64, last_seq: u64) -> Result<(), Gone> {
    if node.is_some_and(|n| n != my_uid) {
        return Err(Gone::OtherNode);
    }
    if since > last_seq {
        return Err(Gone::Beyond { since, last_seq });
    }
    if since < floor {
        return Err(Gone::TooOld { since, floor });
    }
    Ok(())
}

/// The SSE id of an event: `<seq>@<node uid>`, so a browser that resumes against
/// another node (a proxy in front of several) is refused instead of misread.
pub fn sse_id(seq: u64, uid: &str) -> String {
    format!("{seq}@{uid}")
}

/// A cursor given as `Last-Event-ID` (`<seq>@<uid>` or a bare `<seq>`): the seq and
/// the uid it names. `None` when it is neither.
pub fn parse_event_id(id: &str) -> Option<(u64, Option<&str>)> {
    match id.split_once('@') {
        Some((seq, uid)) if !uid.is_empty() => Some((seq.parse().ok()?, Some(uid))),
        Some(_) => None,
        None => Some((id.parse().ok()?, None)),
    }
}

/// The watchers of each prefix. The writer calls [`Wakeups::notify`] after each
/// commit with the changed keys; a watcher holds a [`Subscription`] and awaits
/// [`Subscription::changed`]. Only watchers of a prefix of a changed key wake.
#[derive(Default)]
pub struct Wakeups {
    prefixes: Mutex<HashMap<String, watch::Sender<u64>>>,
    /// Prefixes with a watcher; 0 spares the writer the lock.
    watched: AtomicUsize,
}

/// A watcher's registration; dropping it unregisters.
pub struct Subscription {
    wakeups: Arc<Wakeups>,
    prefix: String,
    rx: Option<watch::Receiver<u64>>,
}

impl Wakeups {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, watch::Sender<u64>>> {
        self.prefixes.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Registers a watcher of `prefix` ("" for every key). Subscribe before reading
    /// `last_seq`: a change committed after the read then wakes it.
    pub fn subscribe(self: &Arc<Self>, prefix: &str) -> Subscription {
        let mut map = self.lock();
        let rx = match map.get(prefix) {
            Some(tx) => tx.subscribe(),
            None => {
                let (tx, rx) = watch::channel(0);
                map.insert(prefix.to_string(), tx);
                self.watched.store(map.len(), Ordering::SeqCst);
                rx
            }
        };
        Subscription { wakeups: self.clone(), prefix: prefix.to_string(), rx: Some(rx) }
    }

    /// Wakes the watchers of every prefix of each key (by `/` segments, and "").
    pub fn notify<'k>(&self, seq: u64, keys: impl Iterator<Item = &'k str>) {
        if self.watched.load(Ordering::SeqCst) == 0 {
            return;
        }
        let map = self.lock();
        let wake = |p: &str| {
            if let Some(tx) = map.get(p) {
                tx.send_replace(seq);
            }
        };
        for key in keys {
            wake("");
            for (i, _) in key.match_indices('/') {
                wake(&key[..i]);
            }
            wake(key);
        }
    }

    /// Wakes every watcher.
    pub fn notify_all(&self, seq: u64) {
        if self.watched.load(Ordering::SeqCst) == 0 {
            return;
        }
        for tx in self.lock().values() {
            tx.send_replace(seq);
        }
    }

    /// Prefixes being watched (tests and metrics).
    pub fn watched_prefixes(&self) -> usize {
        self.watched.load(Ordering::SeqCst)
    }
}

impl Subscription {
    /// Resolves once a change under the prefix was committed after the subscription
    /// (or after the last `changed`).
    pub async fn changed(&mut self) {
        let changed = match self.rx.as_mut() {
            Some(rx) => rx.changed().await.is_ok(),
            None => false,
        };
        if !changed {
            // The sender lives as long as a subscription does; never happens.
            std::future::pending::<()>().await;
        }
    }
}

impl Drop for Subscription {
    fn drop(&mut self) {
        let mut map = self.wakeups.lock();
        drop(self.rx.take());
        if map.get(&self.prefix).is_some_and(|tx| tx.receiver_count() == 0) {
            map.remove(&self.prefix);
            self.wakeups.watched.store(map.len(), Ordering::SeqCst);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_event_survives_its_encoding_and_bad_entries_do_not_decode() {
        let e = Event {
            seq: 42,
            wall_ms: 1_700_000_000_000,
            timestamp: 7 << 16,
            uuid: Uuid::new_v4(),
            delete: true,
            key: "users/john".into(),
        };
        assert_eq!(Event::decode(&42u64.to_be_bytes(), &e.encode_value()), Some(e.clone()));
        let mut bad_kind = e.encode_value();
        bad_kind[32] = 7;
        assert_eq!(Event::decode(&42u64.to_be_bytes(), &bad_kind), None);
        assert_eq!(Event::decode(&42u64.to_be_bytes(), &e.encode_value()[..20]), None);
        assert_eq!(Event::decode(b"short", &e.encode_value()), None);
    }

    #[test]
    fn under_follows_path_segments() {
        assert!(under("users", "users"));
        assert!(under("users/john", "users"));
        assert!(!under("usersx", "users"));
        assert!(!under("user", "users"));
        assert!(under("anything", ""));
    }

    #[test]
    fn cursors_are_checked_against_the_node_the_floor_and_the_head() {
        assert_eq!(check_cursor(5, None, "u1", 0, 10), Ok(()));
        assert_eq!(check_cursor(10, Some("u1"), "u1", 10, 10), Ok(()));
        assert_eq!(check_cursor(0, None, "u1", 0, 0), Ok(()));
        assert_eq!(check_cursor(5, Some("u2"), "u1", 0, 10), Err(Gone::OtherNode));
        assert_eq!(check_cursor(11, None, "u1", 0, 10), Err(Gone::Beyond { since: 11, last_seq: 10 }));
        assert_eq!(check_cursor(3, None, "u1", 4, 10), Err(Gone::TooOld { since: 3, floor: 4 }));
    }

    #[test]
    fn event_ids_name_their_node() {
        assert_eq!(parse_event_id(&sse_id(12, "abc")), Some((12, Some("abc"))));
        assert_eq!(parse_event_id("12"), Some((12, None)));
        assert_eq!(parse_event_id("12@"), None);
        assert_eq!(parse_event_id("x@abc"), None);
        assert_eq!(parse_event_id("-1"), None);
    }

    #[tokio::test]
    async fn only_watchers_of_a_prefix_of_the_key_wake_and_leaving_unregisters() {
        let w = Arc::new(Wakeups::default());
        let mut users = w.subscribe("users");
        let mut john = w.subscribe("users/john");
        let mut other = w.subscribe("orders");
        let mut all = w.subscribe("");
        assert_eq!(w.watched_prefixes(), 4);
        w.notify(1, ["users/john/profile"].into_iter());
        let now = |s: &mut Subscription| {
            let fut = s.changed();
            futures_now(fut)
        };
        assert!(now(&mut users));
        assert!(now(&mut john));
        assert!(now(&mut all));
        assert!(!now(&mut other), "a write under users/ must not wake a watcher of orders");
        assert!(!now(&mut users), "one wake-up per change");
        // "usersx" is not under "users".
        w.notify(2, ["usersx"].into_iter());
        assert!(!now(&mut users));
        drop((users, john, other, all));
        assert_eq!(w.watched_prefixes(), 0);
        assert!(w.lock().is_empty());
    }

    /// Whether `fut` is ready at its first poll.
    fn futures_now(fut: impl std::future::Future<Output = ()>) -> bool {
        let waker = std::task::Waker::noop();
        let mut cx = std::task::Context::from_waker(waker);
        let mut fut = std::pin::pin!(fut);
        fut.as_mut().poll(&mut cx).is_ready()
    }
}
