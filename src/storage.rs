//! Local storage: path-keyed records in fjall, with a timestamp index beside them.
//!
//! Keyspaces:
//! - `records`: key path → encoded [`Record`] (value or tombstone).
//! - `by_time`: key `timestamp (8 bytes, big-endian) ++ path` → empty. Ordered by
//!   timestamp then path, it answers "the newest N writes" and "all writes since T"
//!   with range scans.
//! - `meta`: node-local facts that must survive a restart (last timestamp handed out,
//!   key counts, membership identity).
//!
//! Every change goes through one writer thread ([`Writer`]). It takes all requests
//! waiting in its queue, stages them in one atomic fjall batch (record, index and
//! counters together), commits once and answers every caller: under load, concurrent
//! writes share one fsync (group commit). Owning all writes in one thread also makes
//! "read the current version, decide, write" atomic without locks, and keeps fjall's
//! write throttling off the async workers. Reads are plain fjall reads; callers on the
//! async runtime run them with `spawn_blocking`.

use crate::clock::now_ms;
use crate::config::Durability;
use crate::record::{CorruptRecord, Record};
use bytes::Bytes;
use fjall::{Database, Keyspace, KeyspaceCreateOptions, PersistMode};
use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use tokio::sync::{mpsc, oneshot, watch};
use uuid::Uuid;

/// Most requests folded into one batch; bounds the latency one commit adds.
const MAX_GROUP: usize = 1024;
/// Bound of the writer's queue; senders wait (backpressure) when it is full.
const QUEUE_BOUND: usize = 4096;

const META_LAST_TIMESTAMP: &[u8] = b"last_timestamp";
const META_LIVE_KEYS: &[u8] = b"live_keys";
const META_TOMBSTONES: &[u8] = b"tombstones";

/// What can go wrong in storage.
#[derive(Debug, Clone)]
pub enum StoreError {
    /// Another process holds the data dir.
    Locked(String),
    /// fjall failed; the database may be unusable and the node stops.
    Io(String),
    /// Bytes in the database that kvs cannot decode.
    Corrupt(String),
    /// The writer has shut down.
    Closed,
}

impl std::fmt::Display for StoreError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            StoreError::Locked(dir) => write!(f, "data_dir {dir} is in use by another kvs process"),
            StoreError::Io(e) => write!(f, "storage I/O error: {e}"),
            StoreError::Corrupt(what) => write!(f, "corrupt data in storage: {what}"),
            StoreError::Closed => write!(f, "storage is shutting down"),
        }
    }
}

impl std::error::Error for StoreError {}

impl From<CorruptRecord> for StoreError {
    fn from(_: CorruptRecord) -> Self {
        StoreError::Corrupt("undecodable record".into())
    }
}

/// The outcome of a client write.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Written {
    /// The new version's uuid.
    pub uuid: Uuid,
    /// The new version's timestamp.
    pub timestamp: u64,
}

/// Counts kept in the same batch as the data they count.
#[derive(Debug, Default)]
pub struct Counts {
    live_keys: AtomicU64,
    tombstones: AtomicU64,
}

/// A page of keys from [`Store::list_keys`].
#[derive(Debug, PartialEq, Eq)]
pub struct KeyPage {
    /// Live keys in byte order.
    pub keys: Vec<String>,
    /// The key to pass as `after` for the next page; `None` at the end.
    pub next: Option<String>,
}

struct Inner {
    /// Held for the life of the store: one kvs process per data dir.
    _lock: std::fs::File,
    db: Database,
    records: Keyspace,
    by_time: Keyspace,
    meta: Keyspace,
    counts: Counts,
    failed: watch::Sender<Option<String>>,
    failed_flag: AtomicBool,
}

/// Read access to the node's data, cheap to clone.
#[derive(Clone)]
pub struct Store {
    inner: Arc<Inner>,
}

fn io(e: fjall::Error) -> StoreError {
    match e {
        fjall::Error::Locked => StoreError::Locked(String::new()),
        e => StoreError::Io(e.to_string()),
    }
}

fn time_key(timestamp: u64, path: &str) -> Vec<u8> {
    let mut k = Vec::with_capacity(8 + path.len());
    k.extend_from_slice(&timestamp.to_be_bytes());
    k.extend_from_slice(path.as_bytes());
    k
}

fn split_time_key(k: &[u8]) -> Result<(u64, String), StoreError> {
    let ts = k.get(..8).and_then(|b| b.try_into().ok()).map(u64::from_be_bytes);
    let path = k.get(8..).and_then(|p| std::str::from_utf8(p).ok());
    match (ts, path) {
        (Some(ts), Some(p)) => Ok((ts, p.to_string())),
        _ => Err(StoreError::Corrupt("undecodable timestamp index entry".into())),
    }
}

fn read_u64(ks: &Keyspace, key: &[u8]) -> Result<u64, StoreError> {
    match ks.get(key).map_err(io)? {
        None => Ok(0),
        Some(v) => v
            .as_ref()
            .try_into()
            .map(u64::from_be_bytes)
            .map_err(|_| StoreError::Corrupt(format!("meta {}", String::from_utf8_lossy(key)))),
    }
}

impl Store {
    /// Opens (or creates) the database in `dir` and starts its writer thread.
    ///
    /// `dir` holds `LOCK` (kvs's own lock, taken first), `db/` (fjall) and
    /// `db.created`, written once `db/` was created completely. fjall cannot reopen a
    /// database whose creation was interrupted (a crash between its first files and its
    /// version marker), so a `db/` without `db.created` is removed and created again:
    /// it never held an acknowledged write.
    pub fn open(dir: &Path, durability: Durability) -> Result<(Store, Writer), StoreError> {
        let fs_err =
            |what: &str, p: &Path, e: std::io::Error| StoreError::Io(format!("cannot {what} {}: {e}", p.display()));
        std::fs::create_dir_all(dir).map_err(|e| fs_err("create", dir, e))?;
        let lock_path = dir.join("LOCK");
        let lock = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)
            .map_err(|e| fs_err("open", &lock_path, e))?;
        match lock.try_lock() {
            Ok(()) => {}
            Err(std::fs::TryLockError::WouldBlock) => return Err(StoreError::Locked(dir.display().to_string())),
            Err(std::fs::TryLockError::Error(e)) => return Err(fs_err("lock", &lock_path, e)),
        }
        let db_dir = dir.join("db");
        let created = dir.join("db.created");
        if db_dir.exists() && !created.exists() {
            tracing::warn!(path = %db_dir.display(), "removing a database whose creation was interrupted");
            std::fs::remove_dir_all(&db_dir).map_err(|e| fs_err("remove", &db_dir, e))?;
        }
        let db = Database::builder(&db_dir).open().map_err(|e| match io(e) {
            StoreError::Locked(_) => StoreError::Locked(dir.display().to_string()),
            other => other,
        })?;
        if !created.exists() {
            std::fs::File::create(&created)
                .and_then(|f| f.sync_all())
                .and_then(|()| std::fs::File::open(dir)?.sync_all())
                .map_err(|e| fs_err("create", &created, e))?;
        }
        let records = db.keyspace("records", KeyspaceCreateOptions::default).map_err(io)?;
        let by_time = db.keyspace("by_time", KeyspaceCreateOptions::default).map_err(io)?;
        let meta = db.keyspace("meta", KeyspaceCreateOptions::default).map_err(io)?;
        let counts = Counts {
            live_keys: AtomicU64::new(read_u64(&meta, META_LIVE_KEYS)?),
            tombstones: AtomicU64::new(read_u64(&meta, META_TOMBSTONES)?),
        };
        let last_timestamp = read_u64(&meta, META_LAST_TIMESTAMP)?;
        let store = Store {
            inner: Arc::new(Inner {
                _lock: lock,
                db,
                records,
                by_time,
                meta,
                counts,
                failed: watch::channel(None).0,
                failed_flag: AtomicBool::new(false),
            }),
        };
        let writer = Writer::start(store.clone(), durability, last_timestamp)?;
        Ok((store, writer))
    }

    /// Records a storage failure: the node must stop rather than serve from a broken
    /// database. Returns the error for `?` chains.
    fn fail(&self, e: StoreError) -> StoreError {
        if matches!(e, StoreError::Io(_) | StoreError::Corrupt(_))
            && !self.inner.failed_flag.swap(true, Ordering::SeqCst)
        {
            tracing::error!(error = %e, "storage failed; stopping");
            self.inner.failed.send_replace(Some(e.to_string()));
        }
        e
    }

    /// Resolves once storage has failed, with the reason.
    pub async fn failed(&self) -> String {
        let mut rx = self.inner.failed.subscribe();
        loop {
            if let Some(reason) = rx.borrow_and_update().clone() {
                return reason;
            }
            if rx.changed().await.is_err() {
                std::future::pending::<()>().await;
            }
        }
    }

    /// The current version of `path`, tombstones included.
    pub fn get(&self, path: &str) -> Result<Option<Record>, StoreError> {
        self.get_inner(path).map_err(|e| self.fail(e))
    }

    fn get_inner(&self, path: &str) -> Result<Option<Record>, StoreError> {
        match self.inner.records.get(path).map_err(io)? {
            None => Ok(None),
            Some(bytes) => Ok(Some(Record::decode(&bytes)?)),
        }
    }

    /// Live keys equal to `prefix` or under `prefix/` (all keys for `None`), in byte
    /// order, strictly after `after`, at most `limit`.
    pub fn list_keys(&self, prefix: Option<&str>, after: Option<&str>, limit: usize) -> Result<KeyPage, StoreError> {
        self.list_keys_inner(prefix, after, limit).map_err(|e| self.fail(e))
    }

    fn list_keys_inner(&self, prefix: Option<&str>, after: Option<&str>, limit: usize) -> Result<KeyPage, StoreError> {
        let mut keys = Vec::new();
        let mut more = false;
        // The prefix itself sorts before everything under "prefix/".
        let under = prefix.map(|p| format!("{p}/"));
        if let Some(p) = prefix
            && after.is_none_or(|a| a < p)
            && let Some(bytes) = self.inner.records.get(p).map_err(io)?
            && !Record::encoded_is_tombstone(&bytes)
        {
            keys.push(p.to_string());
        }
        let start = match (&under, after) {
            (Some(u), Some(a)) if a >= u.as_str() => std::ops::Bound::Excluded(a.as_bytes().to_vec()),
            (Some(u), _) => std::ops::Bound::Included(u.as_bytes().to_vec()),
            (None, Some(a)) => std::ops::Bound::Excluded(a.as_bytes().to_vec()),
            (None, None) => std::ops::Bound::Unbounded,
        };
        for guard in self.inner.records.range::<Vec<u8>, _>((start, std::ops::Bound::Unbounded)) {
            let (k, v) = guard.into_inner().map_err(io)?;
            if let Some(u) = &under
                && !k.starts_with(u.as_bytes())
            {
                break;
            }
            if Record::encoded_is_tombstone(&v) {
                continue;
            }
            if keys.len() == limit {
                more = true;
                break;
            }
            let key = std::str::from_utf8(&k).map_err(|_| StoreError::Corrupt("non-UTF-8 key".into()))?;
            keys.push(key.to_string());
        }
        let next = if more { keys.last().cloned() } else { None };
        Ok(KeyPage { keys, next })
    }

    /// The newest `n` writes (tombstones included), newest first, as `(timestamp, path)`.
    pub fn newest(&self, n: usize) -> Result<Vec<(u64, String)>, StoreError> {
        let mut out = Vec::with_capacity(n.min(1024));
        for guard in self.inner.by_time.iter().rev().take(n) {
            let k = guard.key().map_err(|e| self.fail(io(e)))?;
            out.push(split_time_key(&k).map_err(|e| self.fail(e))?);
        }
        Ok(out)
    }

    /// Writes with a timestamp `>= since` (tombstones included), oldest first, at most
    /// `limit`, as `(timestamp, path)`.
    pub fn since(&self, since: u64, limit: usize) -> Result<Vec<(u64, String)>, StoreError> {
        let mut out = Vec::with_capacity(limit.min(1024));
        for guard in self.inner.by_time.range(since.to_be_bytes()..).take(limit) {
            let k = guard.key().map_err(|e| self.fail(io(e)))?;
            out.push(split_time_key(&k).map_err(|e| self.fail(e))?);
        }
        Ok(out)
    }

    /// Number of live keys.
    pub fn live_keys(&self) -> u64 {
        self.inner.counts.live_keys.load(Ordering::Relaxed)
    }

    /// Number of tombstones held.
    pub fn tombstones(&self) -> u64 {
        self.inner.counts.tombstones.load(Ordering::Relaxed)
    }

    /// Reads a node-local metadata value.
    pub fn meta(&self, key: &str) -> Result<Option<Bytes>, StoreError> {
        let v = self.inner.meta.get(key).map_err(|e| self.fail(io(e)))?;
        Ok(v.map(|v| Bytes::copy_from_slice(&v)))
    }

    /// Makes everything written so far durable (used at shutdown).
    pub fn flush(&self) -> Result<(), StoreError> {
        self.inner.db.persist(PersistMode::SyncAll).map_err(|e| self.fail(io(e)))
    }
}

enum Op {
    Put { path: String, data: Bytes },
    Delete { path: String },
    SetMeta { key: String, value: Bytes },
    Close,
}

struct Request {
    op: Op,
    reply: oneshot::Sender<Result<Written, StoreError>>,
}

/// Handle to the writer thread. Cloning shares the one thread.
#[derive(Clone)]
pub struct Writer {
    queue: mpsc::Sender<Request>,
    thread: Arc<std::sync::Mutex<Option<std::thread::JoinHandle<()>>>>,
}

impl Writer {
    fn start(store: Store, durability: Durability, last_timestamp: u64) -> Result<Writer, StoreError> {
        let (queue, rx) = mpsc::channel(QUEUE_BOUND);
        let mode = match durability {
            Durability::Sync => PersistMode::SyncAll,
            Durability::Buffer => PersistMode::Buffer,
        };
        let mut state = WriterState { store, mode, last_timestamp };
        let thread = std::thread::Builder::new()
            .name("kvs-writer".into())
            .spawn(move || state.run(rx))
            .map_err(|e| StoreError::Io(format!("cannot start writer thread: {e}")))?;
        Ok(Writer { queue, thread: Arc::new(std::sync::Mutex::new(Some(thread))) })
    }

    async fn submit(&self, op: Op) -> Result<Written, StoreError> {
        let (reply, rx) = oneshot::channel();
        self.queue.send(Request { op, reply }).await.map_err(|_| StoreError::Closed)?;
        rx.await.map_err(|_| StoreError::Closed)?
    }

    /// Stores `data` as the new version of `path`.
    pub async fn put(&self, path: String, data: Bytes) -> Result<Written, StoreError> {
        self.submit(Op::Put { path, data }).await
    }

    /// Records a tombstone for `path`, whether or not it held a value.
    pub async fn delete(&self, path: String) -> Result<Written, StoreError> {
        self.submit(Op::Delete { path }).await
    }

    /// Durably sets a node-local metadata value.
    pub async fn set_meta(&self, key: &str, value: Bytes) -> Result<(), StoreError> {
        self.submit(Op::SetMeta { key: key.to_string(), value }).await.map(|_| ())
    }

    /// Stops the writer after it has finished what is queued, waits for it, and makes
    /// everything durable. Blocks: call from a blocking context.
    pub fn close(&self, store: &Store) -> Result<(), StoreError> {
        let handle = self.thread.lock().ok().and_then(|mut t| t.take());
        if let Some(handle) = handle {
            // Clones of this handle may outlive the tasks that held them, so the queue
            // is not closed by dropping senders: an explicit Close ends the thread.
            let (reply, _) = oneshot::channel();
            if self.queue.blocking_send(Request { op: Op::Close, reply }).is_ok() {
                let _ = handle.join();
            }
        }
        store.flush()
    }
}

/// What the writer thread owns.
struct WriterState {
    store: Store,
    mode: PersistMode,
    last_timestamp: u64,
}

/// The per-path effect of one group: the version on disk before, and the version after.
struct Change {
    before: Option<Record>,
    after: Record,
}

impl WriterState {
    fn run(&mut self, mut rx: mpsc::Receiver<Request>) {
        let mut group = Vec::with_capacity(64);
        while let Some(first) = rx.blocking_recv() {
            group.push(first);
            while group.len() < MAX_GROUP {
                match rx.try_recv() {
                    Ok(r) => group.push(r),
                    Err(_) => break,
                }
            }
            let closing = group.iter().any(|r| matches!(r.op, Op::Close));
            self.commit_group(&mut group);
            if closing {
                break;
            }
        }
    }

    fn commit_group(&mut self, group: &mut Vec<Request>) {
        let mut changes: HashMap<String, Change> = HashMap::new();
        let mut meta: Vec<(String, Bytes)> = Vec::new();
        let mut results: Vec<Result<Written, StoreError>> = Vec::with_capacity(group.len());
        let last_before = self.last_timestamp;
        for req in group.iter_mut() {
            let r = match &mut req.op {
                Op::Put { path, data } => self.stage_client_write(&mut changes, path, Some(std::mem::take(data))),
                Op::Delete { path } => self.stage_client_write(&mut changes, path, None),
                Op::SetMeta { key, value } => {
                    meta.push((std::mem::take(key), value.clone()));
                    Ok(Written { uuid: Uuid::nil(), timestamp: 0 })
                }
                Op::Close => Ok(Written { uuid: Uuid::nil(), timestamp: 0 }),
            };
            results.push(r);
        }
        let committed = self.commit(&changes, &meta);
        if let Err(e) = &committed {
            self.last_timestamp = last_before;
            let e = self.store.fail(e.clone());
            results.iter_mut().for_each(|r| *r = Err(e.clone()));
        }
        for (req, result) in group.drain(..).zip(results) {
            let _ = req.reply.send(result);
        }
    }

    /// Stages a client write or delete: a fresh uuid and a timestamp newer than both
    /// this node's last one and the version the path holds, so a client's write always
    /// supersedes what its node holds.
    fn stage_client_write(
        &mut self,
        changes: &mut HashMap<String, Change>,
        path: &str,
        data: Option<Bytes>,
    ) -> Result<Written, StoreError> {
        let current = match changes.get(path) {
            Some(c) => Some(c.after.clone()),
            None => self.store.get_inner(path)?,
        };
        let floor = current.as_ref().map_or(0, |r| r.timestamp);
        let timestamp = now_ms().max(self.last_timestamp + 1).max(floor + 1);
        self.last_timestamp = timestamp;
        let record = Record { timestamp, uuid: Uuid::new_v4(), data };
        let written = Written { uuid: record.uuid, timestamp };
        match changes.get_mut(path) {
            Some(c) => c.after = record,
            None => {
                changes.insert(path.to_string(), Change { before: current, after: record });
            }
        }
        Ok(written)
    }

    fn commit(&self, changes: &HashMap<String, Change>, meta: &[(String, Bytes)]) -> Result<(), StoreError> {
        let inner = &self.store.inner;
        let mut batch = inner.db.batch().durability(Some(self.mode));
        let (mut live, mut tombs) =
            (inner.counts.live_keys.load(Ordering::Relaxed), inner.counts.tombstones.load(Ordering::Relaxed));
        for (path, c) in changes {
            if let Some(before) = &c.before {
                // One entry per path in the index: the old one goes in the same batch.
                batch.remove(&inner.by_time, time_key(before.timestamp, path));
                if before.is_tombstone() { tombs -= 1 } else { live -= 1 }
            }
            if c.after.is_tombstone() {
                tombs += 1
            } else {
                live += 1
            }
            batch.insert(&inner.records, path.as_str(), c.after.encode());
            batch.insert(&inner.by_time, time_key(c.after.timestamp, path), b"".as_slice());
        }
        if !changes.is_empty() {
            batch.insert(&inner.meta, META_LAST_TIMESTAMP, self.last_timestamp.to_be_bytes().as_slice());
            batch.insert(&inner.meta, META_LIVE_KEYS, live.to_be_bytes().as_slice());
            batch.insert(&inner.meta, META_TOMBSTONES, tombs.to_be_bytes().as_slice());
        }
        for (k, v) in meta {
            batch.insert(&inner.meta, k.as_str(), v.as_ref());
        }
        batch.commit().map_err(io)?;
        inner.counts.live_keys.store(live, Ordering::Relaxed);
        inner.counts.tombstones.store(tombs, Ordering::Relaxed);
        Ok(())
    }
}
