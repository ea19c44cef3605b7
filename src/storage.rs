//! Local storage: path-keyed records in fjall, with a timestamp index beside them.
//!
//! Keyspaces:
//! - `records`: key path → encoded [`Record`] (value or tombstone).
//! - `by_time`: key `timestamp (8 bytes, big-endian) ++ path` → uuid (16) · kind (1).
//!   Ordered by timestamp then path, it answers "the newest N writes" and "all writes
//!   since T" with range scans, and lists versions without reading the records.
//! - `by_bucket`: key `leaf (2 bytes) ++ path` → timestamp · uuid · kind: the versions
//!   in one hash-summary leaf, for anti-entropy diffs.
//! - `summary`: key leaf (2 bytes) → leaf hash (8 bytes); see [`crate::antientropy`].
//!   Also held in memory.
//! - `meta`: node-local facts that must survive a restart (last timestamp handed out,
//!   key counts, tombstone purge horizon, membership identity, the change feed's seq).
//! - `changes`: key seq (8 bytes, big-endian) → [`crate::changes::Event`]: every
//!   version the writer stored, numbered, for `GET /changes`.
//! - `expiry`: key `expires (8 bytes, Unix ms, big-endian) ++ path`, no value: the
//!   values written with a TTL, by expiry, for the expiry sweep ([`crate::ttl`]).
//!
//! Every change goes through one writer thread ([`Writer`]). It takes all requests
//! waiting in its queue, stages them in one atomic fjall batch (record, index and
//! counters together), commits once and answers every caller: under load, concurrent
//! writes share one fsync (group commit). Every index and the hash summary change in
//! the same batch as the record they describe. Owning all writes in one thread also makes
//! "read the current version, decide, write" atomic without locks, and keeps fjall's
//! write throttling off the async workers. Reads are plain fjall reads; callers on the
//! async runtime run scans with [`blocking`]; point reads are bounded and run inline.

use crate::antientropy::{FANOUT, LEAVES, Version, leaf_of, record_digest};
use crate::clock::now_ms;
use crate::config::Durability;
use crate::hlc::{self, Hlc};
use crate::merge::{self, Decision, Floors};
use crate::record::{CorruptRecord, Record};
use bytes::Bytes;
use fjall::config::{FilterPolicy, PartitioningPolicy, PinningPolicy};
use fjall::{AbstractTree, Database, Keyspace, KeyspaceCreateOptions, PersistMode};
use std::collections::HashMap;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use tokio::sync::{mpsc, oneshot, watch};
use uuid::Uuid;

/// Most requests folded into one batch; bounds the latency one commit adds.
const MAX_GROUP: usize = 1024;
/// Yields the writer takes looking for more work before it parks.
const SPIN_BEFORE_PARK: usize = 50;
/// Longest wait for the final flush at shutdown before it is reported as failed.
const FLUSH_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);
/// Bound of the writer's queue; senders wait (backpressure) when it is full.
const QUEUE_BOUND: usize = 4096;

const META_LAST_TIMESTAMP: &[u8] = b"last_timestamp";
const META_LIVE_KEYS: &[u8] = b"live_keys";
const META_TOMBSTONES: &[u8] = b"tombstones";
const META_GC_HORIZON: &[u8] = b"gc_horizon";
/// Meta keys whose values are version timestamps (converted by the format upgrade).
/// `last_contact` belongs to replication but is a version timestamp too.
const META_TIMESTAMPS: [&[u8]; 3] = [META_LAST_TIMESTAMP, META_GC_HORIZON, b"last_contact"];
const META_FORMAT: &[u8] = b"format_version";
/// The change feed's last seq handed out ([`crate::changes`]).
const META_CHANGE_SEQ: &[u8] = b"change_seq";
/// The oldest change feed cursor that can still be served.
const META_CHANGE_FLOOR: &[u8] = b"change_floor";
/// The change feed's id (a uuid): a cursor is good only with the feed it came from.
const META_FEED_ID: &[u8] = b"change_feed_id";
/// 1 from a clean stop (everything fsynced) until the next start, which sets it to 0.
const META_CLEAN_STOP: &[u8] = b"clean_stop";
/// How far the change feed's numbering jumps when it starts a new feed (see
/// [`Store::open`]): more changes than any lost tail can hold, so no cursor from
/// before can match a seq after.
const FEED_EPOCH_JUMP: u64 = 1 << 32;
/// The newest data dir format this kvs writes. 1: timestamps were Unix ms (kvs 0.1
/// before the HLC); 2: timestamps are HLCs ([`crate::hlc`]); 3: records may carry an
/// expiry (kinds 3 and 4, [`Record::encode`]), indexed in the `expiry` keyspace.
/// Format 1 is upgraded in place at start, to 2; a dir becomes 3 in the batch that
/// stores its first record with an expiry, so until a TTL is used an older kvs can
/// still open it. Newer formats are refused.
pub const FORMAT_VERSION: u64 = 3;
/// The format of a data dir that holds no record with an expiry.
const FORMAT_WITHOUT_TTL: u64 = 2;
/// Records rewritten per batch by the format upgrade.
const UPGRADE_CHUNK: usize = 10_000;

/// What can go wrong in storage.
#[derive(Debug, Clone)]
pub enum StoreError {
    /// Another process holds the data dir.
    Locked(String),
    /// fjall failed; the database may be unusable and the node stops.
    Io(String),
    /// Bytes in the database that kvs cannot decode.
    Corrupt(String),
    /// The data dir was written by a newer kvs, in a format this one cannot read.
    Format(u64),
    /// The writer has shut down.
    Closed,
    /// The wall clock stepped (by this many ms; 0: a step is being judged) and no
    /// client write is stamped until the clock is judged again.
    ClockStepped(i64),
    /// A client write to this path cannot be ordered after the version it holds (that
    /// version's timestamp is the last there is); refused, never acknowledged and lost.
    NoNewerTimestamp(String),
    /// A conditional client write whose condition does not hold; nothing was written.
    /// Carries the uuid of the live value held, if any.
    ConditionFailed(Option<Uuid>),
    /// A transaction's check (by its index among the checks) did not hold; nothing of
    /// the transaction was written. Carries the uuid of the live value held, if any.
    CheckFailed(usize, Option<Uuid>),
}

impl std::fmt::Display for StoreError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            StoreError::Locked(dir) => write!(f, "data_dir {dir} is in use by another kvs process"),
            StoreError::Io(e) => write!(f, "storage I/O error: {e}"),
            StoreError::Corrupt(what) => write!(f, "corrupt data in storage: {what}"),
            StoreError::Format(v) => write!(
                f,
                "the data dir has format version {v}, newer than this kvs understands ({FORMAT_VERSION}): run a newer kvs"
            ),
            StoreError::Closed => write!(f, "storage is shutting down"),
            StoreError::ClockStepped(step) => write!(
                f,
                "this node's wall clock just stepped ({step} ms); it compares its clock with the cluster's \
                 again before it takes writes; retry shortly"
            ),
            StoreError::NoNewerTimestamp(path) => {
                write!(f, "key {path:?} holds a version at the end of the timestamp range; no write can supersede it")
            }
            StoreError::ConditionFailed(Some(uuid)) => {
                write!(f, "the key's current version is \"{uuid}\"; nothing was written")
            }
            StoreError::ConditionFailed(None) => write!(f, "the key holds no value; nothing was written"),
            StoreError::CheckFailed(i, _) => write!(f, "check {i} does not hold; nothing was written"),
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
    /// The new version's timestamp (an HLC, [`crate::hlc`]).
    pub timestamp: u64,
    /// When the new version expires (Unix ms), if written with a TTL.
    pub expires: Option<u64>,
}

/// The outcome of applying replicated records.
#[derive(Debug, Default)]
pub struct ApplyReport {
    /// Records stored (newer than what was held).
    pub applied: usize,
    /// Records not stored (older, the same version, or expired tombstones).
    pub skipped: usize,
    /// Same timestamp, different uuid: `(path, local, incoming)`; the local one is kept.
    pub collisions: Vec<(String, Record, Record)>,
    /// Records held back: their timestamp was more than `max_clock_offset_ms` ahead of
    /// this node's wall clock (ARCHITECTURE.md, clock rule 3a). Counted in `skipped` too.
    pub future: usize,
    /// The furthest-ahead of those timestamps (0: none).
    pub future_max: u64,
    /// Records refused because a certificate here says their path's delete was purged;
    /// the delete was brought back as a live tombstone (see [`merge::Decision`]).
    pub reawakened: usize,
}

/// What a writer request answers.
enum Reply {
    Written(Written),
    WrittenMany(Vec<Result<Written, StoreError>>),
    Applied(ApplyReport),
    Removed(usize),
    Certified(Vec<bool>),
    Done,
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
    /// Whether keys were left out by the filter ([`Store::list_keys_where`]).
    pub filtered: bool,
}

/// What [`Store::list_live`] found: keys (with their records when asked), the next
/// cursor, whether the filter left keys out.
type LivePage = (Vec<(String, Option<Record>)>, Option<String>, bool);

/// A page of live records from [`Store::list_records_where`].
#[derive(Debug, PartialEq, Eq)]
pub struct RecordPage {
    /// Keys and their records, in byte order.
    pub items: Vec<(String, Record)>,
    /// The key to pass as `after` for the next page; `None` at the end.
    pub next: Option<String>,
    /// Whether keys were left out by the filter.
    pub filtered: bool,
}

struct Inner {
    /// Held for the life of the store: one kvs process per data dir.
    _lock: std::fs::File,
    /// The data dir's completion marker (`db.created`): gone means the data dir is.
    marker: std::path::PathBuf,
    db: Database,
    /// [`WRITE_BUFFER_BYTES`], lowered by tests.
    write_buffer_limit: AtomicU64,
    /// Times the writer rotated every memtable to bound the write buffer.
    forced_rotations: AtomicU64,
    /// The highest [`Store::block_reads`] figures reported, so they never go back.
    block_reads_seen: [AtomicU64; 6],
    records: Keyspace,
    by_time: Keyspace,
    by_bucket: Keyspace,
    summary: Keyspace,
    meta: Keyspace,
    /// Certificates of purged deletes: path → timestamp (8) · uuid (16).
    dormant: Keyspace,
    /// The change feed's log: seq → [`crate::changes::Event`].
    changes: Keyspace,
    /// Values with an expiry: expires (8, BE) · path, no value.
    expiry: Keyspace,
    /// The last seq committed; moves after the commit, before the wake-ups.
    last_seq: AtomicU64,
    /// The oldest cursor the log can serve (ARCHITECTURE.md "Change feed").
    change_floor: AtomicU64,
    /// The change feed's id (see [`META_FEED_ID`]).
    feed_id: String,
    /// Watchers of the change feed, woken by the writer after each commit.
    wakeups: Arc<crate::changes::Wakeups>,
    counts: Counts,
    /// Leaf hashes, as committed.
    leaves: Mutex<Vec<u64>>,
    /// Newest timestamp held (0 when empty), leaving out versions that were more than
    /// `max_clock_offset_ms` ahead of the wall clock when stored: one record from a
    /// node with a clock far ahead must not make catch-up skip every later write.
    newest: AtomicU64,
    /// Moves with every commit that changes a reserved key.
    acl_generation: AtomicU64,
    /// The newest delete purged here without a certificate (by kvs before format 2,
    /// carried over by the upgrade; 0 on newer data dirs): a record at or below it may
    /// be a delete's victim that no certificate catches (the stale rule).
    gc_horizon: u64,
    /// The data dir's format ([`FORMAT_VERSION`]): 2 until a record with an expiry is
    /// stored, then 3.
    format: AtomicU64,
    failed: watch::Sender<Option<String>>,
    failed_flag: AtomicBool,
    /// When the writer started the commit it is in, in ms since `epoch` plus one (0:
    /// idle): a commit that does not finish (fjall stalled behind a flush that keeps
    /// failing, a disk that hangs) shows as [`Store::stalled`].
    busy_since: AtomicU64,
    epoch: std::time::Instant,
    /// Bytes on disk as last measured ([`Store::refresh_disk_bytes`]).
    disk_bytes: AtomicU64,
    /// Bytes of filters and indexes held in memory, as last measured (the same).
    pinned_bytes: AtomicU64,
    /// The wall-clock step check; the writer stamps no client write while it fails.
    steps: Arc<crate::clock::StepGuard>,
}

/// The most bytes fjall may hold in memtables (active and waiting to be flushed)
/// before the writer waits for flushes (`Inner::wait_for_flushes`). Memtables that
/// are flushed stay in memory until fjall's next memtable rotation (its version
/// history is trimmed only then), so fjall holds at most about twice this in
/// memtables (heaptrack: 265 MiB of memtable values at the peak of 1.6 GiB of 1 MiB
/// writes). Smaller memtables would lower that but cost a third of the PUT throughput
/// with 10 KB values (BENCHMARKS.md "Memory").
pub const WRITE_BUFFER_BYTES: u64 = 128 * 1024 * 1024;
/// fjall's block cache (its default, set explicitly so the memory bound is written
/// down in one place).
pub const CACHE_BYTES: u64 = 32 * 1024 * 1024;

/// Options of the keyspaces read by key (`records`, `dormant`, `meta`): every table
/// keeps its filter and index blocks in memory, whole, on every level. fjall's
/// default keeps them only on the first levels (filters on L0, indexes on L0 and L1)
/// and splits them into partitions read through the cache from L3 down. Below L1,
/// each point read loaded a table's whole filter block and index block (a few hundred
/// KiB each) through the block cache and checksummed them, and at 10M keys the 32 MiB
/// cache held too few of them: GET at 10M keys ran at 4.5k req/s against 37k at 100k
/// keys, two thirds of its CPU in `pread` and xxh3 (BENCHMARKS.md "Ten million keys,
/// again"). What this holds in memory grows with the data: 10 bits of filter a key,
/// and an index entry (the block's last key, about a path's length) per 4 KiB data
/// block, per keyspace ([`Store::pinned_bytes`]; 38 MiB at 10M keys of 100 bytes).
/// RocksDB holds them in memory by default too. fjall stores a keyspace's options
/// when it creates it, so these apply to data dirs created from this version on.
fn point_read_options() -> KeyspaceCreateOptions {
    KeyspaceCreateOptions::default()
        .filter_block_partitioning_policy(PartitioningPolicy::all(false))
        .index_block_partitioning_policy(PartitioningPolicy::all(false))
        .filter_block_pinning_policy(PinningPolicy::all(true))
        .index_block_pinning_policy(PinningPolicy::all(true))
}

/// Options of the keyspaces only ever scanned (`by_time`, `by_bucket`, `changes`,
/// `expiry`, `summary`): no filter (fjall consults filters only on point reads, so
/// building them was flush and compaction work for nothing) and indexes in memory on
/// every level, so each seek of a scan (a sync round lists a hundred summary leaves)
/// does not load a table's whole index block.
fn scan_options() -> KeyspaceCreateOptions {
    KeyspaceCreateOptions::default()
        .filter_policy(FilterPolicy::disabled())
        .index_block_partitioning_policy(PartitioningPolicy::all(false))
        .index_block_pinning_policy(PinningPolicy::all(true))
}

/// Runs a storage call on the blocking pool, off the async workers (fjall may block).
pub async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, StoreError> + Send + 'static,
) -> Result<T, StoreError> {
    tokio::task::spawn_blocking(f).await.map_err(|_| StoreError::Closed)?
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

fn bucket_key(path: &str) -> Vec<u8> {
    let mut k = Vec::with_capacity(2 + path.len());
    k.extend_from_slice(&leaf_of(path).to_be_bytes());
    k.extend_from_slice(path.as_bytes());
    k
}

/// `uuid · kind`, the value of a `by_time` entry.
fn uuid_kind(r: &Record) -> Vec<u8> {
    let mut v = Vec::with_capacity(17);
    v.extend_from_slice(r.uuid.as_bytes());
    v.push(u8::from(r.is_tombstone()));
    v
}

/// `timestamp · uuid · kind`, the value of a `by_bucket` entry.
fn bucket_version(r: &Record) -> Vec<u8> {
    let mut v = r.timestamp.to_be_bytes().to_vec();
    v.extend_from_slice(&uuid_kind(r));
    v
}

/// Upgrades a format-1 database (timestamps in Unix ms) to format 2 (HLC timestamps,
/// [`crate::hlc::from_ms`]: the same millisecond, counter 0) in place. Order between
/// versions is unchanged, so no merge decision changes.
///
/// Records are rewritten in batches, each record with both its index entries. A
/// format-2 timestamp is always above [`hlc::MAX_MS`] (any wall clock after 1970-02-19
/// shifted by 16 bits) and a format-1 one never is, so a record already rewritten is
/// recognised and skipped: an upgrade cut short by a crash runs again at the next
/// start and finishes. The summary, the meta timestamps and the format version change
/// last, in one batch.
fn upgrade_from_ms(
    db: &Database,
    [records, by_time, by_bucket, summary, meta]: [&Keyspace; 5],
) -> Result<(), StoreError> {
    use std::ops::Bound::{Excluded, Unbounded};
    let started = std::time::Instant::now();
    let path_of = |k: &[u8]| -> Result<String, StoreError> {
        String::from_utf8(k.to_vec()).map_err(|_| StoreError::Corrupt("non-UTF-8 key".into()))
    };
    let (mut after, mut converted) = (None::<Vec<u8>>, 0usize);
    loop {
        let start = after.clone().map_or(Unbounded, Excluded);
        let mut batch = db.batch().durability(Some(PersistMode::SyncAll));
        let mut last = None;
        for guard in records.range::<Vec<u8>, _>((start, Unbounded)).take(UPGRADE_CHUNK) {
            let (k, v) = guard.into_inner().map_err(io)?;
            last = Some(k.to_vec());
            let mut r = Record::decode(&v)?;
            if r.timestamp > hlc::MAX_MS {
                continue;
            }
            let path = path_of(&k)?;
            batch.remove(by_time, time_key(r.timestamp, &path));
            r.timestamp = hlc::from_ms(r.timestamp);
            batch.insert(by_time, time_key(r.timestamp, &path), uuid_kind(&r));
            batch.insert(by_bucket, bucket_key(&path), bucket_version(&r));
            batch.insert(records, path.as_str(), r.encode());
            converted += 1;
        }
        let Some(last) = last else { break };
        batch.commit().map_err(io)?;
        after = Some(last);
    }
    let mut leaves = vec![0u64; LEAVES];
    for guard in records.iter() {
        let (k, v) = guard.into_inner().map_err(io)?;
        let path = path_of(&k)?;
        leaves[leaf_of(&path) as usize] ^= record_digest(&path, &Record::decode(&v)?);
    }
    let mut batch = db.batch().durability(Some(PersistMode::SyncAll));
    for guard in summary.iter() {
        batch.remove(summary, guard.key().map_err(io)?);
    }
    for (leaf, hash) in leaves.iter().enumerate().filter(|(_, h)| **h != 0) {
        batch.insert(summary, (leaf as u16).to_be_bytes().as_slice(), hash.to_be_bytes().as_slice());
    }
    for key in META_TIMESTAMPS {
        let ts = read_u64(meta, key)?;
        if ts > 0 && ts <= hlc::MAX_MS {
            batch.insert(meta, key, hlc::from_ms(ts).to_be_bytes().as_slice());
        }
    }
    batch.insert(meta, META_FORMAT, FORMAT_WITHOUT_TTL.to_be_bytes().as_slice());
    batch.commit().map_err(io)?;
    tracing::info!(
        records = converted,
        millis = started.elapsed().as_millis() as u64,
        "upgraded the data dir from format 1 (millisecond timestamps) to format {FORMAT_WITHOUT_TTL} (HLC timestamps)"
    );
    Ok(())
}

fn decode_uuid_kind(v: &[u8]) -> Result<(Uuid, bool), StoreError> {
    match (v.get(..16).and_then(|u| Uuid::from_slice(u).ok()), v.get(16)) {
        (Some(u), Some(k)) if v.len() == 17 => Ok((u, *k == 1)),
        _ => Err(StoreError::Corrupt("undecodable index entry".into())),
    }
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
    /// `db.created`, written once `db/` was created completely; `db.creating` is
    /// written before `db/` is created and removed after `db.created`. fjall cannot
    /// reopen a database whose creation was interrupted (a crash between its first
    /// files and its version marker), so a `db/` with `db.creating` and without
    /// `db.created` is removed and created again: it never held an acknowledged write.
    /// A `db/` with neither marker was not created here (a restore that copied only
    /// `db/`, a lost marker) and is refused, never removed.
    ///
    /// A database written by an older kvs is upgraded in place first (see
    /// [`FORMAT_VERSION`]); one written by a newer kvs is refused. `max_clock_offset_ms`
    /// bounds how far ahead of the wall clock the writer's clock may be moved
    /// ([`crate::hlc`]).
    pub fn open(dir: &Path, durability: Durability, max_clock_offset_ms: u64) -> Result<(Store, Writer), StoreError> {
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
        let restoring = dir.join(crate::snapshot::RESTORE_MARKER);
        if restoring.exists() {
            return Err(StoreError::Io(format!(
                "{} exists: a restore into this data dir did not finish, so it holds part of a snapshot. \
                 Remove the data dir and restore again",
                restoring.display()
            )));
        }
        let db_dir = dir.join("db");
        let created = dir.join("db.created");
        let creating = dir.join("db.creating");
        let durable_marker = |p: &Path| {
            std::fs::File::create(p)
                .and_then(|f| f.sync_all())
                .and_then(|()| std::fs::File::open(dir)?.sync_all())
                .map_err(|e| fs_err("create", p, e))
        };
        let fresh = !created.exists();
        if fresh && db_dir.exists() {
            if !creating.exists() {
                // Not a creation kvs began: a restore that copied only db/, or a lost
                // marker. It may hold the only copy of acknowledged writes: never wipe it.
                return Err(StoreError::Io(format!(
                    "{} exists but {} does not: it was not created by this data dir's kvs, or its marker \
                     was lost (a restore that copied only db/). kvs will not touch it. If it is a complete \
                     database, create the marker (touch {}) and start again; if not, remove {}",
                    db_dir.display(),
                    created.display(),
                    created.display(),
                    db_dir.display()
                )));
            }
            tracing::warn!(path = %db_dir.display(), "removing a database whose creation was interrupted");
            std::fs::remove_dir_all(&db_dir).map_err(|e| fs_err("remove", &db_dir, e))?;
        }
        if fresh {
            // Marks "creation under way" before fjall writes anything, so a db/ without
            // either marker is known not to be an interrupted creation.
            durable_marker(&creating)?;
        }
        let db = Database::builder(&db_dir).cache_size(CACHE_BYTES).open().map_err(|e| match io(e) {
            StoreError::Locked(_) => StoreError::Locked(dir.display().to_string()),
            other => other,
        })?;
        if fresh {
            durable_marker(&created)?;
            std::fs::remove_file(&creating).map_err(|e| fs_err("remove", &creating, e))?;
        }
        let records = db.keyspace("records", point_read_options).map_err(io)?;
        let by_time = db.keyspace("by_time", scan_options).map_err(io)?;
        let by_bucket = db.keyspace("by_bucket", scan_options).map_err(io)?;
        let summary = db.keyspace("summary", scan_options).map_err(io)?;
        let meta = db.keyspace("meta", point_read_options).map_err(io)?;
        let dormant = db.keyspace("dormant", point_read_options).map_err(io)?;
        let changes = db.keyspace("changes", scan_options).map_err(io)?;
        let expiry = db.keyspace("expiry", scan_options).map_err(io)?;
        match read_u64(&meta, META_FORMAT)? {
            0 if fresh => meta.insert(META_FORMAT, FORMAT_WITHOUT_TTL.to_be_bytes()).map_err(io)?,
            0 | 1 => upgrade_from_ms(&db, [&records, &by_time, &by_bucket, &summary, &meta])?,
            FORMAT_WITHOUT_TTL | FORMAT_VERSION => {}
            newer => return Err(StoreError::Format(newer)),
        }
        let format = read_u64(&meta, META_FORMAT)?;
        let mut leaves = vec![0u64; LEAVES];
        for guard in summary.iter() {
            let (k, v) = guard.into_inner().map_err(io)?;
            match (<[u8; 2]>::try_from(k.as_ref()), <[u8; 8]>::try_from(v.as_ref())) {
                (Ok(k), Ok(v)) => leaves[u16::from_be_bytes(k) as usize] = u64::from_be_bytes(v),
                _ => return Err(StoreError::Corrupt("undecodable summary entry".into())),
            }
        }
        // The newest version not from the future (see `Inner::newest`).
        let present = hlc::from_ms(now_ms().saturating_add(max_clock_offset_ms).saturating_add(1));
        let newest = match by_time.range(..present.to_be_bytes()).next_back() {
            Some(g) => split_time_key(&g.key().map_err(io)?)?.0,
            None => 0,
        };
        let gc_horizon = read_u64(&meta, META_GC_HORIZON)?;
        let counts = Counts {
            live_keys: AtomicU64::new(read_u64(&meta, META_LIVE_KEYS)?),
            tombstones: AtomicU64::new(read_u64(&meta, META_TOMBSTONES)?),
        };
        let last_timestamp = read_u64(&meta, META_LAST_TIMESTAMP)?;
        let mut last_seq = read_u64(&meta, META_CHANGE_SEQ)?;
        let mut change_floor = read_u64(&meta, META_CHANGE_FLOOR)?;
        // The feed goes on from the persisted seq when nothing acknowledged can have
        // been lost since it was written: with `sync` durability, or after a clean stop.
        // After an unclean stop with `buffer`, an OS crash may have lost the tail of the
        // log while clients hold cursors into it, and the seqs it held would be handed
        // out again for other changes: a new feed starts instead, under a new id and
        // FEED_EPOCH_JUMP higher, and every older cursor gets 410.
        let clean = read_u64(&meta, META_CLEAN_STOP)? == 1;
        let held_id = meta.get(META_FEED_ID).map_err(io)?.and_then(|v| Uuid::from_slice(&v).ok());
        let feed_id = match held_id {
            Some(id) if clean || durability == Durability::Sync => id,
            held => {
                let id = Uuid::new_v4();
                let mut batch = db.batch().durability(Some(PersistMode::SyncAll));
                if held.is_some() {
                    last_seq = last_seq.saturating_add(FEED_EPOCH_JUMP);
                    change_floor = last_seq;
                    tracing::warn!(
                        last_seq,
                        "started a new change feed: the last stop was not clean and durability is buffer"
                    );
                    batch.insert(&meta, META_CHANGE_SEQ, last_seq.to_be_bytes().as_slice());
                    batch.insert(&meta, META_CHANGE_FLOOR, change_floor.to_be_bytes().as_slice());
                }
                batch.insert(&meta, META_FEED_ID, id.as_bytes().as_slice());
                batch.commit().map_err(io)?;
                id
            }
        };
        if clean {
            // Durably unclean from here until the next clean stop.
            meta.insert(META_CLEAN_STOP, 0u64.to_be_bytes()).map_err(io)?;
            db.persist(PersistMode::SyncAll).map_err(io)?;
        }
        let store = Store {
            inner: Arc::new(Inner {
                _lock: lock,
                marker: created,
                db,
                write_buffer_limit: AtomicU64::new(WRITE_BUFFER_BYTES),
                forced_rotations: AtomicU64::new(0),
                block_reads_seen: Default::default(),
                records,
                by_time,
                by_bucket,
                summary,
                meta,
                dormant,
                changes,
                expiry,
                last_seq: AtomicU64::new(last_seq),
                change_floor: AtomicU64::new(change_floor),
                feed_id: feed_id.to_string(),
                wakeups: Arc::new(crate::changes::Wakeups::default()),
                counts,
                leaves: Mutex::new(leaves),
                newest: AtomicU64::new(newest),
                acl_generation: AtomicU64::new(0),
                gc_horizon,
                format: AtomicU64::new(format),
                failed: watch::channel(None).0,
                failed_flag: AtomicBool::new(false),
                busy_since: AtomicU64::new(0),
                disk_bytes: AtomicU64::new(0),
                pinned_bytes: AtomicU64::new(0),
                steps: Arc::new(crate::clock::StepGuard::new(max_clock_offset_ms / 2)),
                epoch: std::time::Instant::now(),
            }),
        };
        // The last process's clock is taken like any other observed timestamp: a data
        // dir written while the clock was far ahead does not carry the jump forward.
        let mut clock = Hlc::new(max_clock_offset_ms);
        clock.observe(last_timestamp, now_ms());
        let writer = Writer::start(store.clone(), durability, clock, last_seq)?;
        store.refresh_disk_bytes();
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

    /// How long the writer has been in a commit that has not finished, once that is
    /// longer than `after` (`storage_stall_timeout`: a group commit takes milliseconds;
    /// seconds mean the disk or fjall is stuck).
    pub fn stalled(&self, after: std::time::Duration) -> Option<std::time::Duration> {
        let since = self.inner.busy_since.load(Ordering::Relaxed);
        let now = self.inner.epoch.elapsed().as_millis() as u64 + 1;
        let busy = std::time::Duration::from_millis(now.saturating_sub(since));
        (since != 0 && busy > after).then_some(busy)
    }

    /// Marks storage failed with `reason` (the node stops), as an I/O error does.
    pub fn fail_with(&self, reason: String) {
        self.fail(StoreError::Io(reason));
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

    /// Every record (tombstones too) whose key starts with `prefix`, a reserved prefix
    /// ([`crate::path::RESERVED_PREFIX`]). Blocking: a prefix scan.
    pub fn reserved_records(&self, prefix: &str) -> Result<Vec<(String, Record)>, StoreError> {
        let mut out = Vec::new();
        for guard in self.inner.records.prefix(prefix) {
            let (k, v) = guard.into_inner().map_err(|e| self.fail(io(e)))?;
            let key = String::from_utf8(k.to_vec()).map_err(|_| StoreError::Corrupt("non-UTF-8 key".into()))?;
            let record = Record::decode(&v).map_err(|_| StoreError::Corrupt(format!("record at {key}")))?;
            out.push((key, record));
        }
        Ok(out)
    }

    /// fjall's write buffer (memtables), in bytes.
    pub fn write_buffer_bytes(&self) -> u64 {
        self.inner.db.write_buffer_size()
    }

    /// Table blocks read since the node started, over every keyspace: data, index and
    /// filter blocks, each as (read from the files, found in the block cache). Index
    /// and filter blocks held in memory ([`point_read_options`]) are not read at all.
    pub fn block_reads(&self) -> [(&'static str, u64, u64); 3] {
        let mut out = [("data", 0, 0), ("index", 0, 0), ("filter", 0, 0)];
        for ks in self.inner.keyspaces() {
            let m = ks.metrics();
            // fjall's `*_load_count` counts both; its `*_load_cached_count` the cache hits.
            for (row, (all, cached)) in out.iter_mut().zip([
                (m.data_block_load_count(), m.data_block_load_cached_count()),
                (m.index_block_load_count(), m.index_block_load_cached_count()),
                (m.filter_block_load_count(), m.filter_block_load_cached_count()),
            ]) {
                row.1 += all.saturating_sub(cached) as u64;
                row.2 += cached as u64;
            }
        }
        // fjall reads its counters one by one while reads go on, so a cache hit between
        // two of them can make the first figure a little low; a counter never goes back.
        let seen = &self.inner.block_reads_seen;
        for (i, row) in out.iter_mut().enumerate() {
            row.1 = seen[2 * i].fetch_max(row.1, Ordering::Relaxed).max(row.1);
            row.2 = seen[2 * i + 1].fetch_max(row.2, Ordering::Relaxed).max(row.2);
        }
        out
    }

    /// Bytes of bloom filters and index blocks that the tables hold in memory
    /// ([`point_read_options`]), as last measured with [`Self::refresh_disk_bytes`]:
    /// the tables of the current version, so not those a snapshot or a compaction
    /// still reads.
    pub fn pinned_bytes(&self) -> u64 {
        self.inner.pinned_bytes.load(Ordering::Relaxed)
    }

    /// Times the writer rotated every memtable because the write buffer was over its
    /// limit with no flush coming (`Inner::wait_for_flushes`).
    pub fn forced_rotations(&self) -> u64 {
        self.inner.forced_rotations.load(Ordering::Relaxed)
    }

    /// Lowers the write buffer limit (tests: reaching 128 MiB takes too long there).
    #[doc(hidden)]
    pub fn set_write_buffer_limit(&self, bytes: u64) {
        self.inner.write_buffer_limit.store(bytes, Ordering::Relaxed);
    }

    /// The change feed's last committed seq (0: none yet).
    pub fn last_seq(&self) -> u64 {
        self.inner.last_seq.load(Ordering::SeqCst)
    }

    /// The change feed's id: cursors are good only with it.
    pub fn feed_id(&self) -> &str {
        &self.inner.feed_id
    }

    /// The oldest change feed cursor this node can serve.
    pub fn change_floor(&self) -> u64 {
        self.inner.change_floor.load(Ordering::SeqCst)
    }

    /// The change feed's watchers, woken by the writer.
    pub fn wakeups(&self) -> Arc<crate::changes::Wakeups> {
        self.inner.wakeups.clone()
    }

    /// Reads the change log after `after` up to `up_to` (inclusive), oldest first,
    /// keeping the events `keep` takes, until `limit` events, `max_bytes` of keys or
    /// `max_scan` entries looked at. Returns the events and the seq of the last entry
    /// looked at (the next cursor: the scan never has to look at it again), `after`
    /// when none. Blocking: a range scan.
    pub fn changes_after(
        &self,
        after: u64,
        up_to: u64,
        limits: (usize, usize, usize),
        keep: &dyn Fn(&str) -> bool,
    ) -> Result<(Vec<crate::changes::Event>, u64), StoreError> {
        let (limit, max_bytes, max_scan) = limits;
        let mut events = Vec::new();
        let mut cursor = after;
        let mut bytes = 0usize;
        if after >= up_to {
            return Ok((events, cursor));
        }
        let range = (after + 1).to_be_bytes()..=up_to.to_be_bytes();
        let (mut scanned, mut cut) = (0, false);
        for guard in self.inner.changes.range(range) {
            if scanned == max_scan {
                cut = true;
                break;
            }
            scanned += 1;
            let (k, v) = guard.into_inner().map_err(|e| self.fail(io(e)))?;
            let event = crate::changes::Event::decode(&k, &v)
                .ok_or_else(|| self.fail(StoreError::Corrupt("undecodable change log entry".into())))?;
            let seq = event.seq;
            if keep(&event.key) {
                if events.len() == limit || (bytes >= max_bytes && !events.is_empty()) {
                    cut = true;
                    break;
                }
                bytes += event.key.len() + 100;
                events.push(event);
            }
            cursor = seq;
        }
        // Read to the end: the cursor is `up_to` even where the last seqs have no entry
        // (a seq taken by the stale discard), so no reader scans them again.
        Ok((events, if cut { cursor } else { up_to }))
    }

    /// Moves whenever a commit changes a reserved key ([`crate::acl`] reloads then).
    pub fn acl_generation(&self) -> u64 {
        self.inner.acl_generation.load(Ordering::Acquire)
    }

    /// Live keys equal to `prefix` or under `prefix/` (all client keys for `None`:
    /// reserved keys are left out), in byte order, strictly after `after`, at most
    /// `limit`.
    pub fn list_keys(&self, prefix: Option<&str>, after: Option<&str>, limit: usize) -> Result<KeyPage, StoreError> {
        self.list_keys_where(prefix, after, limit, &|_| true)
    }

    /// [`Self::list_keys`] of the keys `keep` takes: the page fills with kept keys
    /// only (scanning past the others), and `next` is always a kept key, so a caller
    /// never learns a key it may not see, not even as a cursor.
    pub fn list_keys_where(
        &self,
        prefix: Option<&str>,
        after: Option<&str>,
        limit: usize,
        keep: &dyn Fn(&str) -> bool,
    ) -> Result<KeyPage, StoreError> {
        self.list_keys_inner(prefix, after, limit, keep).map_err(|e| self.fail(e))
    }

    fn list_keys_inner(
        &self,
        prefix: Option<&str>,
        after: Option<&str>,
        limit: usize,
        keep: &dyn Fn(&str) -> bool,
    ) -> Result<KeyPage, StoreError> {
        let (items, next, filtered) = self.list_live(prefix, after, (limit, usize::MAX), keep, false)?;
        Ok(KeyPage { keys: items.into_iter().map(|(k, _)| k).collect(), next, filtered })
    }

    /// Live records equal to `prefix` or under `prefix/` (all client keys for `None`),
    /// in byte order, strictly after `after`, that `keep` takes: at most `limit`, and
    /// no more once their values reach `max_bytes` (at least one). Blocking: a scan.
    pub fn list_records_where(
        &self,
        prefix: Option<&str>,
        after: Option<&str>,
        (limit, max_bytes): (usize, usize),
        keep: &dyn Fn(&str) -> bool,
    ) -> Result<RecordPage, StoreError> {
        let (items, next, filtered) =
            self.list_live(prefix, after, (limit, max_bytes), keep, true).map_err(|e| self.fail(e))?;
        let items = items.into_iter().filter_map(|(k, r)| Some((k, r?))).collect();
        Ok(RecordPage { items, next, filtered })
    }

    /// The scan behind both listings; records are decoded only `with_records`.
    fn list_live(
        &self,
        prefix: Option<&str>,
        after: Option<&str>,
        (limit, max_bytes): (usize, usize),
        keep: &dyn Fn(&str) -> bool,
        with_records: bool,
    ) -> Result<LivePage, StoreError> {
        let mut items: Vec<(String, Option<Record>)> = Vec::new();
        let (mut more, mut filtered, mut bytes) = (false, false, 0usize);
        // Values expired by now are absent, like tombstones (ARCHITECTURE.md, "Expiry").
        let wall = now_ms();
        let mut take = |key: &str, v: &[u8], items: &mut Vec<(String, Option<Record>)>| -> Result<bool, StoreError> {
            if items.len() == limit || (bytes >= max_bytes && !items.is_empty()) {
                return Ok(false);
            }
            if !keep(key) {
                filtered = true;
                return Ok(true);
            }
            let record = if with_records { Some(Record::decode(v)?) } else { None };
            bytes += v.len();
            items.push((key.to_string(), record));
            Ok(true)
        };
        // The prefix itself sorts before everything under "prefix/".
        let under = prefix.map(|p| format!("{p}/"));
        if let Some(p) = prefix
            && after.is_none_or(|a| a < p)
            && let Some(bytes) = self.inner.records.get(p).map_err(io)?
            && Record::encoded_is_live_at(&bytes, wall)
        {
            take(p, &bytes, &mut items)?;
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
            if !Record::encoded_is_live_at(&v, wall) || (prefix.is_none() && k.starts_with(b"./")) {
                continue;
            }
            let key = std::str::from_utf8(&k).map_err(|_| StoreError::Corrupt("non-UTF-8 key".into()))?;
            if !take(key, &v, &mut items)? {
                more = true;
                break;
            }
        }
        let next = if more { items.last().map(|(k, _)| k.clone()) } else { None };
        Ok((items, next, filtered))
    }

    /// One level of the keys under `prefix/` (all client keys for `None`), like a
    /// directory: a key with no further `/` as itself, deeper keys as their next
    /// level's prefix ending in `/` (`users/john/`), once. In byte order, strictly
    /// after `after`, at most `limit`; `keep` as in [`Self::list_keys_where`] (a
    /// level is listed when it holds a key `keep` takes). Blocking: a scan.
    pub fn list_level_where(
        &self,
        prefix: Option<&str>,
        after: Option<&str>,
        limit: usize,
        keep: &dyn Fn(&str) -> bool,
    ) -> Result<KeyPage, StoreError> {
        self.list_level_inner(prefix, after, limit, keep).map_err(|e| self.fail(e))
    }

    fn list_level_inner(
        &self,
        prefix: Option<&str>,
        after: Option<&str>,
        limit: usize,
        keep: &dyn Fn(&str) -> bool,
    ) -> Result<KeyPage, StoreError> {
        let under = prefix.map_or(String::new(), |p| format!("{p}/"));
        let (mut keys, mut more, mut filtered) = (Vec::<String>::new(), false, false);
        let wall = now_ms();
        // Where the scan starts: after `after`, and past everything under it when it
        // is a level (UTF-8 never holds the byte 0xFF, so `level ++ 0xFF` sorts after
        // every key under the level).
        let mut from: Vec<u8> = match after {
            Some(a) if a.as_bytes() >= under.as_bytes() => {
                let mut b = a.as_bytes().to_vec();
                if a.ends_with('/') {
                    b.push(0xFF);
                }
                b
            }
            _ => under.as_bytes().to_vec(),
        };
        let mut exclusive = after.is_some_and(|a| a.as_bytes() >= under.as_bytes());
        'scan: loop {
            let lo = if exclusive {
                std::ops::Bound::Excluded(from.clone())
            } else {
                std::ops::Bound::Included(from.clone())
            };
            for guard in self.inner.records.range::<Vec<u8>, _>((lo, std::ops::Bound::Unbounded)) {
                let (k, v) = guard.into_inner().map_err(io)?;
                if !k.starts_with(under.as_bytes()) {
                    break 'scan;
                }
                if !Record::encoded_is_live_at(&v, wall) || (prefix.is_none() && k.starts_with(b"./")) {
                    continue;
                }
                let key = std::str::from_utf8(&k).map_err(|_| StoreError::Corrupt("non-UTF-8 key".into()))?;
                if !keep(key) {
                    filtered = true;
                    continue;
                }
                let rest = &key[under.len()..];
                let entry = match rest.find('/') {
                    Some(i) => &key[..under.len() + i + 1],
                    None => key,
                };
                if keys.len() == limit {
                    more = true;
                    break 'scan;
                }
                keys.push(entry.to_string());
                if entry.ends_with('/') {
                    // Skip the rest of this level in one seek.
                    from = entry.as_bytes().to_vec();
                    from.push(0xFF);
                    exclusive = true;
                    continue 'scan;
                }
            }
            break;
        }
        let next = if more { keys.last().cloned() } else { None };
        Ok(KeyPage { keys, next, filtered })
    }

    /// Versions from the timestamp index, newest first: entries below `before`
    /// (`(timestamp, path)`, exclusive; `None`: from the newest) and at or above
    /// `min_ts`, at most `limit`.
    pub fn newest_versions(
        &self,
        before: Option<(u64, &str)>,
        min_ts: u64,
        limit: usize,
    ) -> Result<Vec<Version>, StoreError> {
        let lo = std::ops::Bound::Included(min_ts.to_be_bytes().to_vec());
        let hi = match before {
            Some((ts, p)) => std::ops::Bound::Excluded(time_key(ts, p)),
            None => std::ops::Bound::Unbounded,
        };
        self.index_versions(self.inner.by_time.range::<Vec<u8>, _>((lo, hi)).rev(), limit)
    }

    /// Versions from the timestamp index, oldest first, after `after` (`(timestamp,
    /// path)`, exclusive; `None`: from timestamp 0), at most `limit`.
    pub fn versions_since(&self, after: Option<(u64, &str)>, limit: usize) -> Result<Vec<Version>, StoreError> {
        let lo = match after {
            Some((ts, p)) => std::ops::Bound::Excluded(time_key(ts, p)),
            None => std::ops::Bound::Unbounded,
        };
        self.index_versions(self.inner.by_time.range::<Vec<u8>, _>((lo, std::ops::Bound::Unbounded)), limit)
    }

    fn index_versions(
        &self,
        iter: impl Iterator<Item = fjall::Guard>,
        limit: usize,
    ) -> Result<Vec<Version>, StoreError> {
        let mut out = Vec::with_capacity(limit.min(4096));
        for guard in iter.take(limit) {
            let (k, v) = guard.into_inner().map_err(|e| self.fail(io(e)))?;
            let (timestamp, path) = split_time_key(&k).map_err(|e| self.fail(e))?;
            let (uuid, tombstone) = decode_uuid_kind(&v).map_err(|e| self.fail(e))?;
            out.push(Version { path, timestamp, uuid, tombstone });
        }
        Ok(out)
    }

    /// Tombstones with a timestamp below `floor`, oldest first, at most `limit`, as
    /// `(path, timestamp, uuid)`.
    pub fn expired_tombstones(&self, floor: u64, limit: usize) -> Result<Vec<(String, u64, Uuid)>, StoreError> {
        let mut out = Vec::new();
        for guard in self.inner.by_time.range(..floor.to_be_bytes()) {
            let (k, v) = guard.into_inner().map_err(|e| self.fail(io(e)))?;
            let (uuid, tombstone) = decode_uuid_kind(&v).map_err(|e| self.fail(e))?;
            if tombstone {
                let (ts, path) = split_time_key(&k).map_err(|e| self.fail(e))?;
                out.push((path, ts, uuid));
                if out.len() == limit {
                    break;
                }
            }
        }
        Ok(out)
    }

    /// Values whose expiry is at or before `wall_ms`, soonest first, at most `limit`, as
    /// `(path, expires)`: what the expiry sweep replaces with their expiry tombstones.
    pub fn due_expiries(&self, wall_ms: u64, limit: usize) -> Result<Vec<(String, u64)>, StoreError> {
        let mut out = Vec::new();
        for guard in self.inner.expiry.range(..wall_ms.saturating_add(1).to_be_bytes()).take(limit) {
            let k = guard.key().map_err(|e| self.fail(io(e)))?;
            let (expires, path) = split_time_key(&k).map_err(|e| self.fail(e))?;
            out.push((path, expires));
        }
        Ok(out)
    }

    /// Certificates of purged deletes kept here, by path after `after`, at most
    /// `limit`, as `(path, timestamp, uuid)`: what a bootstrapping node copies, so it
    /// refuses the deleted values as the others do.
    pub fn certificates_after(&self, after: &str, limit: usize) -> Result<Vec<(String, u64, Uuid)>, StoreError> {
        let lo = std::ops::Bound::Excluded(after.as_bytes().to_vec());
        let mut out = Vec::new();
        for guard in self.inner.dormant.range::<Vec<u8>, _>((lo, std::ops::Bound::Unbounded)).take(limit) {
            let (k, v) = guard.into_inner().map_err(|e| self.fail(io(e)))?;
            let path = String::from_utf8(k.to_vec())
                .map_err(|_| self.fail(StoreError::Corrupt("certificate path is not UTF-8".into())))?;
            let c = Cert::decode(&v).map_err(|e| self.fail(e))?;
            out.push((path, c.timestamp, c.uuid));
        }
        Ok(out)
    }

    /// The timestamp of the certificate of a purged delete of `path`, if one is kept.
    pub fn certificate(&self, path: &str) -> Result<Option<u64>, StoreError> {
        match self.inner.dormant.get(path).map_err(|e| self.fail(io(e)))? {
            Some(v) => Ok(Some(Cert::decode(&v).map_err(|e| self.fail(e))?.timestamp)),
            None => Ok(None),
        }
    }

    /// The records of a prefix of `paths` that fit in `max_bytes` (as a [`crate::wire`]
    /// batch), or the first record alone if it is larger; at least one path is always
    /// covered. Returns the records and how many paths were covered.
    pub fn records_within(
        &self,
        paths: &[String],
        max_bytes: usize,
    ) -> Result<(Vec<(String, Record)>, usize), StoreError> {
        let (mut out, mut bytes) = (Vec::new(), 0usize);
        for (i, p) in paths.iter().enumerate() {
            if let Some(r) = self.get(p)? {
                let len = crate::wire::encoded_len(p, &r);
                if !out.is_empty() && bytes.saturating_add(len) > max_bytes {
                    return Ok((out, i));
                }
                bytes = bytes.saturating_add(len);
                out.push((p.clone(), r));
            }
        }
        Ok((out, paths.len()))
    }

    /// The 256 level-1 hashes of the summary.
    pub fn level1(&self) -> Vec<u64> {
        crate::antientropy::level1(&self.inner.leaves.lock().unwrap_or_else(|p| p.into_inner()))
    }

    /// The leaf hashes under each of the given level-1 indices, 256 per index.
    pub fn leaves_under(&self, tops: &[usize]) -> Vec<u64> {
        let leaves = self.inner.leaves.lock().unwrap_or_else(|p| p.into_inner());
        let per = LEAVES / FANOUT;
        tops.iter().filter(|&&t| t < FANOUT).flat_map(|&t| leaves[t * per..(t + 1) * per].to_vec()).collect()
    }

    /// The versions held in the given leaves, sorted by path.
    pub fn versions_in_leaves(&self, leaves: &[u16]) -> Result<Vec<Version>, StoreError> {
        let mut out = Vec::new();
        for leaf in leaves {
            for guard in self.inner.by_bucket.prefix(leaf.to_be_bytes()) {
                let (k, v) = guard.into_inner().map_err(|e| self.fail(io(e)))?;
                let path = k.get(2..).and_then(|p| std::str::from_utf8(p).ok());
                let ts = v.get(..8).and_then(|b| b.try_into().ok()).map(u64::from_be_bytes);
                let (Some(path), Some(timestamp)) = (path, ts) else {
                    return Err(self.fail(StoreError::Corrupt("undecodable bucket entry".into())));
                };
                let (uuid, tombstone) = decode_uuid_kind(&v[8..]).map_err(|e| self.fail(e))?;
                out.push(Version { path: path.to_string(), timestamp, uuid, tombstone });
            }
        }
        out.sort_by(|a, b| a.path.cmp(&b.path));
        Ok(out)
    }

    /// Newest timestamp held (0 when empty), not counting versions from the future.
    pub fn newest_timestamp(&self) -> u64 {
        self.inner.newest.load(Ordering::Relaxed)
    }

    /// The newest delete purged here without a certificate (data dirs from format 1).
    pub fn gc_horizon(&self) -> u64 {
        self.inner.gc_horizon
    }

    /// Number of live keys.
    pub fn live_keys(&self) -> u64 {
        self.inner.counts.live_keys.load(Ordering::Relaxed)
    }

    /// Number of tombstones held.
    pub fn tombstones(&self) -> u64 {
        self.inner.counts.tombstones.load(Ordering::Relaxed)
    }

    /// The data dir's format ([`FORMAT_VERSION`] once a record with an expiry is stored).
    pub fn format(&self) -> u64 {
        self.inner.format.load(Ordering::Relaxed)
    }

    /// A point-in-time view of the replicated state for a snapshot
    /// ([`crate::snapshot`]): one fjall snapshot, so every keyspace is read at the same
    /// instant and a record never disagrees with its certificate or the meta facts.
    /// Blocking: iterate it off the async workers.
    pub fn snapshot_view(&self) -> SnapshotView {
        SnapshotView { store: self.clone(), snap: self.inner.db.snapshot() }
    }

    /// Reads a node-local metadata value.
    pub fn meta(&self, key: &str) -> Result<Option<Bytes>, StoreError> {
        let v = self.inner.meta.get(key).map_err(|e| self.fail(io(e)))?;
        Ok(v.map(|v| Bytes::copy_from_slice(&v)))
    }

    /// Makes everything written so far durable, and writes the in-memory tables out
    /// so that the next start does not replay the journal (used at shutdown).
    ///
    /// Storage that fails under fjall's flush (the data dir removed, the disk gone)
    /// makes fjall's flush worker stop, and waiting for it would never end: the flush
    /// runs on a thread of its own and is given up after 30 s, an error.
    pub fn flush(&self) -> Result<(), StoreError> {
        if !self.inner.marker.exists() {
            return Err(self.fail(StoreError::Io(format!(
                "{} is gone: the data dir was removed or its disk failed",
                self.inner.marker.display()
            ))));
        }
        let (tx, rx) = std::sync::mpsc::channel();
        let store = self.clone();
        std::thread::Builder::new()
            .name("kvs-flush".into())
            .spawn(move || {
                let flushed = store.flush_now();
                // Released before the answer: the caller may reopen the data dir at
                // once, and this clone would still hold its lock.
                drop(store);
                let _ = tx.send(flushed);
            })
            .map_err(|e| StoreError::Io(format!("cannot start the flush thread: {e}")))?;
        rx.recv_timeout(FLUSH_TIMEOUT).unwrap_or_else(|_| {
            Err(self.fail(StoreError::Io(format!(
                "the final flush did not finish within {} s: storage is failing",
                FLUSH_TIMEOUT.as_secs()
            ))))
        })
    }

    fn flush_now(&self) -> Result<(), StoreError> {
        let inner = &self.inner;
        inner.db.persist(PersistMode::SyncAll).map_err(|e| self.fail(io(e)))?;
        // rotate_memtable_and_wait is public but undocumented in fjall 3.1 (the
        // version is pinned by Cargo.lock). Without it, a clean restart of a node
        // holding 1M keys replayed the whole journal: 6.6 s to the first request.
        for ks in inner.keyspaces() {
            ks.rotate_memtable_and_wait().map_err(|e| self.fail(io(e)))?;
        }
        // Everything is durable: the next start may go on with this change feed.
        inner.meta.insert(META_CLEAN_STOP, 1u64.to_be_bytes()).map_err(|e| self.fail(io(e)))?;
        inner.db.persist(PersistMode::SyncAll).map_err(|e| self.fail(io(e)))?;
        Ok(())
    }

    /// Bytes the database takes on disk.
    pub fn disk_bytes(&self) -> u64 {
        self.inner.disk_bytes.load(Ordering::Relaxed)
    }

    /// The wall-clock step check the writer obeys; the clock watch task drives it.
    pub fn step_guard(&self) -> Arc<crate::clock::StepGuard> {
        self.inner.steps.clone()
    }

    /// Measures [`Self::disk_bytes`] and [`Self::pinned_bytes`] again. Blocking (fjall
    /// takes its journal lock, which a commit holds across fsync, and each keyspace's
    /// version lock): call it off the async workers, never from a request.
    pub fn refresh_disk_bytes(&self) {
        if let Ok(n) = self.inner.db.disk_space() {
            self.inner.disk_bytes.store(n, Ordering::Relaxed);
        }
        let pinned = self
            .inner
            .keyspaces()
            .iter()
            .map(|ks| (ks.tree.pinned_filter_size() + ks.tree.pinned_block_index_size()) as u64)
            .sum();
        self.inner.pinned_bytes.store(pinned, Ordering::Relaxed);
    }
}

enum Op {
    Put { path: String, data: Bytes, ttl_ms: Option<u64>, condition: merge::Condition },
    Delete { path: String, condition: merge::Condition },
    DeleteMany { paths: Vec<String> },
    Txn { checks: Vec<(String, merge::Condition)>, writes: Vec<TxnWrite> },
    Expire { versions: Vec<(String, u64)> },
    Apply { records: Vec<(String, Record)>, tombstone_floor: u64, absent_floor: u64 },
    Purge { tombstones: Vec<(String, u64)> },
    Certify { tombstones: Vec<(String, u64, Uuid)> },
    Discard { up_to: u64, limit: usize },
    Replace { path: String, record: Record, if_timestamp: Option<u64> },
    Restore { records: Vec<(String, Record)>, certificates: Vec<(String, u64, Uuid)> },
    SetMeta { key: String, value: Bytes },
    TrimChanges { before_wall: u64, limit: usize },
    Close,
}

/// One write of a transaction: path, value (`None`: a delete), TTL in ms.
pub type TxnWrite = (String, Option<Bytes>, Option<u64>);

struct Request {
    op: Op,
    reply: oneshot::Sender<Result<Reply, StoreError>>,
}

/// Handle to the writer thread. Cloning shares the one thread.
#[derive(Clone)]
pub struct Writer {
    queue: mpsc::Sender<Request>,
    thread: Arc<std::sync::Mutex<Option<std::thread::JoinHandle<()>>>>,
}

impl Writer {
    fn start(store: Store, durability: Durability, clock: Hlc, seq: u64) -> Result<Writer, StoreError> {
        let (queue, rx) = mpsc::channel(QUEUE_BOUND);
        let mode = match durability {
            Durability::Sync => PersistMode::SyncAll,
            Durability::Buffer => PersistMode::Buffer,
        };
        let rotator = Rotator::start(&store.inner)?;
        let mut state = WriterState {
            store,
            mode,
            clock,
            certs: HashMap::new(),
            seq,
            staged_events: Vec::new(),
            reset_feed: false,
            trimmed: Vec::new(),
            stale_expiries: Vec::new(),
            rotator,
        };
        let thread = std::thread::Builder::new()
            .name("kvs-writer".into())
            .spawn(move || state.run(rx))
            .map_err(|e| StoreError::Io(format!("cannot start writer thread: {e}")))?;
        Ok(Writer { queue, thread: Arc::new(std::sync::Mutex::new(Some(thread))) })
    }

    async fn submit(&self, op: Op) -> Result<Reply, StoreError> {
        let (reply, rx) = oneshot::channel();
        self.queue.send(Request { op, reply }).await.map_err(|_| StoreError::Closed)?;
        rx.await.map_err(|_| StoreError::Closed)?
    }

    async fn written(&self, op: Op) -> Result<Written, StoreError> {
        match self.submit(op).await? {
            Reply::Written(w) => Ok(w),
            _ => Err(StoreError::Closed),
        }
    }

    /// Stores `data` as the new version of `path`.
    pub async fn put(&self, path: String, data: Bytes) -> Result<Written, StoreError> {
        self.put_if(path, data, None, merge::Condition::Always).await
    }

    /// [`Self::put`], expiring `ttl_ms` after its timestamp when given, and only if
    /// `condition` holds for the version held when the writer takes it
    /// ([`StoreError::ConditionFailed`] otherwise, nothing written): the check and the
    /// write are one step of the writer.
    pub async fn put_if(
        &self,
        path: String,
        data: Bytes,
        ttl_ms: Option<u64>,
        condition: merge::Condition,
    ) -> Result<Written, StoreError> {
        self.written(Op::Put { path, data, ttl_ms, condition }).await
    }

    /// The expiry sweep: replaces the value of each listed path (path, expires, from
    /// [`Store::due_expiries`]) that still has that expiry and has expired with its
    /// expiry tombstone ([`crate::ttl::expiry_tombstone`]); how many were replaced.
    /// None while the wall clock has just stepped (as for client writes).
    pub async fn expire(&self, versions: Vec<(String, u64)>) -> Result<usize, StoreError> {
        match self.submit(Op::Expire { versions }).await? {
            Reply::Removed(n) => Ok(n),
            _ => Err(StoreError::Closed),
        }
    }

    /// Records a tombstone for `path`, whether or not it held a value.
    pub async fn delete(&self, path: String) -> Result<Written, StoreError> {
        self.delete_if(path, merge::Condition::Always).await
    }

    /// Deletes each of `paths` that holds a live value when the writer takes it, all in
    /// one group commit: per path, its tombstone, or [`StoreError::ConditionFailed`]
    /// when it held none (nothing written for it).
    pub async fn delete_many(&self, paths: Vec<String>) -> Result<Vec<Result<Written, StoreError>>, StoreError> {
        match self.submit(Op::DeleteMany { paths }).await? {
            Reply::WrittenMany(w) => Ok(w),
            _ => Err(StoreError::Closed),
        }
    }

    /// A transaction: when every check holds for the versions held, every write (a value,
    /// or `None` for a delete, with its TTL), in order, in one atomic commit; otherwise
    /// [`StoreError::CheckFailed`] and nothing written. Each write's version, in order.
    pub async fn transact(
        &self,
        checks: Vec<(String, merge::Condition)>,
        writes: Vec<TxnWrite>,
    ) -> Result<Vec<Written>, StoreError> {
        match self.submit(Op::Txn { checks, writes }).await? {
            Reply::WrittenMany(w) => w.into_iter().collect(),
            _ => Err(StoreError::Closed),
        }
    }

    /// [`Self::delete`] only if `condition` holds, as [`Self::put_if`].
    pub async fn delete_if(&self, path: String, condition: merge::Condition) -> Result<Written, StoreError> {
        self.written(Op::Delete { path, condition }).await
    }

    /// Applies replicated records by the merge rule: newer versions are stored, older
    /// and identical ones skipped, collisions reported (the local version is kept).
    /// Tombstones older than `tombstone_floor` are not stored for paths held nowhere
    /// here: they would only be purged again. Records at or below `absent_floor` are
    /// not stored for paths held nowhere here either: they come from a node that may
    /// have missed a delete this node has purged (0: no such limit).
    pub async fn apply(
        &self,
        records: Vec<(String, Record)>,
        tombstone_floor: u64,
        absent_floor: u64,
    ) -> Result<ApplyReport, StoreError> {
        match self.submit(Op::Apply { records, tombstone_floor, absent_floor }).await? {
            Reply::Applied(r) => Ok(r),
            _ => Err(StoreError::Closed),
        }
    }

    /// Purges tombstones that are still the current version at the given timestamp,
    /// keeping a certificate of each (path, timestamp, uuid). Returns how many.
    pub async fn purge(&self, tombstones: Vec<(String, u64)>) -> Result<usize, StoreError> {
        match self.submit(Op::Purge { tombstones }).await? {
            Reply::Removed(n) => Ok(n),
            _ => Err(StoreError::Closed),
        }
    }

    /// Answers a peer's purge check: for each tombstone `(path, timestamp, uuid)` it
    /// wants to purge, true when this node holds no version the delete must still reach
    /// (nothing older, and no other version at the same timestamp: a collision waits
    /// for its vote). Where this node holds nothing of the path, it keeps a certificate
    /// of the delete, so that it too refuses the deleted value should it arrive later
    /// (from a node that was away, or from a fetch already under way).
    pub async fn certify(&self, tombstones: Vec<(String, u64, Uuid)>) -> Result<Vec<bool>, StoreError> {
        match self.submit(Op::Certify { tombstones }).await? {
            Reply::Certified(v) => Ok(v),
            _ => Err(StoreError::Closed),
        }
    }

    /// Removes up to `limit` records (values and tombstones) with a timestamp at or
    /// below `up_to`, oldest first. Returns how many were removed (0: none left).
    pub async fn discard(&self, up_to: u64, limit: usize) -> Result<usize, StoreError> {
        match self.submit(Op::Discard { up_to, limit }).await? {
            Reply::Removed(n) => Ok(n),
            _ => Err(StoreError::Closed),
        }
    }

    /// Stores records and certificates of purged deletes as they are, into paths that
    /// hold nothing, with their indexes and counters but no change-feed events: what
    /// a restore from a snapshot does ([`crate::snapshot`]). Returns how many were
    /// stored.
    pub async fn restore(
        &self,
        records: Vec<(String, Record)>,
        certificates: Vec<(String, u64, Uuid)>,
    ) -> Result<usize, StoreError> {
        match self.submit(Op::Restore { records, certificates }).await? {
            Reply::Removed(n) => Ok(n),
            _ => Err(StoreError::Closed),
        }
    }

    /// Stores `record` as the version of `path`, replacing what is held: only if the
    /// held version has timestamp `if_timestamp` (a collision's loser) when given,
    /// unconditionally otherwise (tools). Returns whether it replaced anything.
    pub async fn replace(&self, path: String, record: Record, if_timestamp: Option<u64>) -> Result<bool, StoreError> {
        match self.submit(Op::Replace { path, record, if_timestamp }).await? {
            Reply::Removed(n) => Ok(n > 0),
            _ => Err(StoreError::Closed),
        }
    }

    /// Trims the change log: up to `limit` of its oldest entries applied before
    /// `before_wall` (Unix ms), raising the floor. Returns how many (0: none left).
    pub async fn trim_changes(&self, before_wall: u64, limit: usize) -> Result<usize, StoreError> {
        match self.submit(Op::TrimChanges { before_wall, limit }).await? {
            Reply::Removed(n) => Ok(n),
            _ => Err(StoreError::Closed),
        }
    }

    /// The facts of a restored snapshot ([`crate::snapshot`]): the clock goes on from
    /// the source's `last_timestamp`, the format-1 horizon is kept, and the change feed
    /// is a new one whose numbering starts `FEED_EPOCH_JUMP` past the source's, so no
    /// cursor from the source matches a seq here (ARCHITECTURE.md, rule 5).
    pub async fn restore_facts(
        &self,
        last_timestamp: u64,
        gc_horizon: u64,
        source_last_seq: u64,
    ) -> Result<(), StoreError> {
        let seq = source_last_seq.saturating_add(FEED_EPOCH_JUMP);
        let be = |v: u64| Bytes::copy_from_slice(&v.to_be_bytes());
        for (key, value) in [
            (META_LAST_TIMESTAMP, be(last_timestamp)),
            (META_GC_HORIZON, be(gc_horizon)),
            (META_CHANGE_SEQ, be(seq)),
            (META_CHANGE_FLOOR, be(seq)),
        ] {
            let key = std::str::from_utf8(key).map_err(|_| StoreError::Corrupt("meta key".into()))?;
            self.set_meta(key, value).await?;
        }
        Ok(())
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
    /// The node's version clock; persisted as `last_timestamp` with every batch.
    clock: Hlc,
    /// Certificate changes of the group being staged: `Some` writes one, `None`
    /// removes it.
    certs: HashMap<String, Option<Cert>>,
    /// The change feed's last seq committed; persisted as `change_seq` with every
    /// batch that numbers changes.
    seq: u64,
    /// The versions the group being staged stores, in order: each becomes a change.
    staged_events: Vec<(String, u64, Uuid, bool)>,
    /// The group removes versions the feed cannot show (the stale discard).
    reset_feed: bool,
    /// Change log entries the group trims (retention).
    trimmed: Vec<u64>,
    /// `expiry` index entries of versions no longer held, removed by the group.
    stale_expiries: Vec<Vec<u8>>,
    /// Rotates memtables off this thread; stops with it.
    rotator: Rotator,
}

/// What [`Store::snapshot_view`] returns: the records, certificates and meta facts
/// as of one instant.
pub struct SnapshotView {
    store: Store,
    snap: fjall::Snapshot,
}

impl SnapshotView {
    /// Every record, `(path, record)`, in path order.
    pub fn records(&self) -> impl Iterator<Item = Result<(String, Record), StoreError>> + '_ {
        use fjall::Readable;
        self.snap.iter(&self.store.inner.records).map(|guard| {
            let (k, v) = guard.into_inner().map_err(|e| self.store.fail(io(e)))?;
            let path = String::from_utf8(k.to_vec())
                .map_err(|_| self.store.fail(StoreError::Corrupt("record path is not UTF-8".into())))?;
            let record = Record::decode(&v)
                .map_err(|e| self.store.fail(StoreError::Corrupt(format!("record {path:?}: {e:?}"))))?;
            Ok((path, record))
        })
    }

    /// Every certificate of a purged delete, `(path, timestamp, uuid)`, in path order.
    pub fn certificates(&self) -> impl Iterator<Item = Result<(String, u64, Uuid), StoreError>> + '_ {
        use fjall::Readable;
        self.snap.iter(&self.store.inner.dormant).map(|guard| {
            let (k, v) = guard.into_inner().map_err(|e| self.store.fail(io(e)))?;
            let path = String::from_utf8(k.to_vec())
                .map_err(|_| self.store.fail(StoreError::Corrupt("certificate path is not UTF-8".into())))?;
            let c = Cert::decode(&v).map_err(|e| self.store.fail(e))?;
            Ok((path, c.timestamp, c.uuid))
        })
    }

    /// A u64 meta value as of the view (0 when absent).
    pub fn meta_u64(&self, key: &str) -> Result<u64, StoreError> {
        self.meta_bytes_u64(key.as_bytes())
    }

    fn meta_bytes_u64(&self, key: &[u8]) -> Result<u64, StoreError> {
        use fjall::Readable;
        let v = self.snap.get(&self.store.inner.meta, key).map_err(|e| self.store.fail(io(e)))?;
        Ok(v.as_deref().and_then(|b| <[u8; 8]>::try_from(b).ok()).map_or(0, u64::from_be_bytes))
    }

    /// The storage facts a snapshot carries, as of the view: `last_timestamp`,
    /// `gc_horizon` and the change feed's `last_seq`.
    pub fn storage_facts(&self) -> Result<(u64, u64, u64), StoreError> {
        Ok((
            self.meta_bytes_u64(META_LAST_TIMESTAMP)?,
            self.meta_bytes_u64(META_GC_HORIZON)?,
            self.meta_bytes_u64(META_CHANGE_SEQ)?,
        ))
    }
}

/// The certificate of a purged delete: the tombstone's timestamp and uuid.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Cert {
    timestamp: u64,
    uuid: Uuid,
}

impl Cert {
    fn encode(&self) -> Vec<u8> {
        let mut v = self.timestamp.to_be_bytes().to_vec();
        v.extend_from_slice(self.uuid.as_bytes());
        v
    }

    fn decode(v: &[u8]) -> Result<Cert, StoreError> {
        match (v.get(..8).and_then(|b| b.try_into().ok()), v.get(8..).and_then(|u| Uuid::from_slice(u).ok())) {
            (Some(ts), Some(uuid)) if v.len() == 24 => Ok(Cert { timestamp: u64::from_be_bytes(ts), uuid }),
            _ => Err(StoreError::Corrupt("undecodable purge certificate".into())),
        }
    }

    fn tombstone(&self) -> Record {
        Record::tombstone(self.timestamp, self.uuid)
    }
}

/// The per-path effect of one group: the version on disk before, and the version after
/// (`None`: the path is removed entirely).
#[derive(Clone)]
struct Change {
    before: Option<Record>,
    after: Option<Record>,
}

impl Inner {
    /// The keyspaces whose memtables make up fjall's write buffer.
    fn keyspaces(&self) -> [&Keyspace; 8] {
        [
            &self.records,
            &self.by_time,
            &self.by_bucket,
            &self.summary,
            &self.meta,
            &self.dormant,
            &self.changes,
            &self.expiry,
        ]
    }

    /// Backpressure: fjall flushes memtables in the background and, by default, lets
    /// them pile up in memory while writes outrun the disk (several hundred MiB under
    /// large-value writes). The writer waits here, before a commit, until fjall's
    /// write buffer is back under [`WRITE_BUFFER_BYTES`], for at most a second per
    /// commit.
    ///
    /// fjall 3.1 flushes a memtable only once it is full (64 MiB) and does not enforce
    /// a total itself (its `max_write_buffer_size` is not implemented): with eight
    /// keyspaces, memtables that are all less than full can hold more than the limit
    /// with no flush coming, and waiting then only stalled every commit by a second
    /// (PUTs at 15 req/s after 100k small writes). So once the buffer passes half the
    /// limit and no flush is queued, the writer has the [`Rotator`] rotate every
    /// memtable, which queues their flushes, and goes on: the flushes run beside the
    /// writes and the buffer is written out before it reaches the limit, where writes
    /// wait.
    ///
    /// Not on the writer thread itself: a rotation also collects fjall's old versions,
    /// which deletes obsolete table files and frees the flushed memtables; on a file
    /// system mounted with `discard` an unlink of a table waits for the device
    /// (measured: 140 to 330 ms per rotation), and every write waited with it: the
    /// slowest PUT of `kvs-bench`'s 30 s at 32 connections took 902 ms, 472 ms since.
    fn wait_for_flushes(&self, rotator: &Rotator) {
        let limit = self.write_buffer_limit.load(Ordering::Relaxed);
        let size = self.db.write_buffer_size();
        if size <= limit / 2 {
            return;
        }
        // Both are hidden APIs of fjall 3.1 (Cargo.lock pins it). Only when nothing is
        // sealed or queued: a flush under way is waited for, not joined by more small
        // tables.
        if self.db.outstanding_flushes() == 0
            && self.keyspaces().iter().all(|ks| ks.sealed_memtable_count() == 0)
            && rotator.request()
        {
            self.forced_rotations.fetch_add(1, Ordering::Relaxed);
        }
        if size <= limit {
            return;
        }
        // At most a second per commit: a flush that cannot finish (disk trouble) is the
        // stall watch's business, not a reason to stop every write for longer.
        for _ in 0..500 {
            if self.db.write_buffer_size() <= limit || self.failed_flag.load(Ordering::Relaxed) {
                return;
            }
            std::thread::sleep(std::time::Duration::from_millis(2));
        }
    }
}

/// A thread that rotates every memtable when the writer asks ([`Inner::wait_for_flushes`]),
/// so that what a rotation does besides (collecting old versions: unlinking tables,
/// freeing memtables) is not done by the writer thread. A commit can still wait for a
/// part of it: fjall holds a keyspace's version lock while it collects that
/// keyspace's old versions. Stops when dropped, with the writer.
struct Rotator {
    wake: Option<std::sync::mpsc::SyncSender<()>>,
    /// A rotation is asked for or under way.
    busy: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Rotator {
    fn start(inner: &Inner) -> Result<Rotator, StoreError> {
        let keyspaces: Vec<Keyspace> = inner.keyspaces().into_iter().cloned().collect();
        let busy = Arc::new(AtomicBool::new(false));
        let (wake, woken) = std::sync::mpsc::sync_channel::<()>(1);
        let done = busy.clone();
        let thread = std::thread::Builder::new()
            .name("kvs-rotate".into())
            .spawn(move || {
                // Clears `busy` however a rotation ends, a panic in fjall included.
                struct Done(Arc<AtomicBool>);
                impl Drop for Done {
                    fn drop(&mut self) {
                        self.0.store(false, Ordering::Release);
                    }
                }
                while woken.recv().is_ok() {
                    let _done = Done(done.clone());
                    for ks in &keyspaces {
                        // rotate_memtable is what clean shutdown uses to write memtables out.
                        if let Err(e) = ks.rotate_memtable() {
                            tracing::warn!(error = %e, "cannot rotate a memtable to bound the write buffer");
                        }
                    }
                }
            })
            .map_err(|e| StoreError::Io(format!("cannot start memtable rotation thread: {e}")))?;
        Ok(Rotator { wake: Some(wake), busy, thread: Some(thread) })
    }

    /// Asks for every memtable to be rotated; false when a rotation is already asked
    /// for or under way. Never blocks.
    fn request(&self) -> bool {
        if self.busy.swap(true, Ordering::AcqRel) {
            return false;
        }
        match self.wake.as_ref().map(|w| w.try_send(())) {
            Some(Ok(())) => true,
            Some(Err(std::sync::mpsc::TrySendError::Full(()))) => {
                self.busy.store(false, Ordering::Release);
                false
            }
            // Logged once: `busy` stays set, so no request gets here again.
            Some(Err(std::sync::mpsc::TrySendError::Disconnected(()))) | None => {
                tracing::error!(
                    "the memtable rotation thread is gone: writes past the write buffer limit will wait for fjall"
                );
                false
            }
        }
    }
}

impl Drop for Rotator {
    fn drop(&mut self) {
        self.wake.take();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl WriterState {
    fn run(&mut self, mut rx: mpsc::Receiver<Request>) {
        let mut group = Vec::with_capacity(64);
        loop {
            // After a commit more requests usually follow within microseconds (the
            // answered clients send their next write): look for them briefly before
            // parking, which costs a futex wake-up per group.
            let mut first = None;
            for _ in 0..SPIN_BEFORE_PARK {
                match rx.try_recv() {
                    Ok(r) => {
                        first = Some(r);
                        break;
                    }
                    Err(mpsc::error::TryRecvError::Empty) => std::thread::yield_now(),
                    Err(mpsc::error::TryRecvError::Disconnected) => return,
                }
            }
            let Some(first) = first.or_else(|| rx.blocking_recv()) else { return };
            group.push(first);
            while group.len() < MAX_GROUP {
                match rx.try_recv() {
                    Ok(r) => group.push(r),
                    Err(_) => break,
                }
            }
            let closing = group.iter().any(|r| matches!(r.op, Op::Close));
            let inner = self.store.inner.clone();
            inner.busy_since.store(inner.epoch.elapsed().as_millis() as u64 + 1, Ordering::Relaxed);
            inner.wait_for_flushes(&self.rotator);
            self.commit_group(&mut group);
            inner.busy_since.store(0, Ordering::Relaxed);
            if closing {
                break;
            }
        }
    }

    fn commit_group(&mut self, group: &mut Vec<Request>) {
        if self.store.inner.failed_flag.load(Ordering::SeqCst) {
            // A commit failed (or storage stalled): what fjall holds is unknown, and the
            // node is stopping. Nothing more is written: a later batch could reuse the
            // seqs or timestamps of one that reached the disk after all.
            for req in group.drain(..) {
                let _ = req.reply.send(Err(StoreError::Io("storage failed; the node is stopping".into())));
            }
            return;
        }
        let mut changes: HashMap<String, Change> = HashMap::new();
        let mut meta: Vec<(String, Bytes)> = Vec::new();
        let mut results: Vec<Result<Reply, StoreError>> = Vec::with_capacity(group.len());
        let clock_before = self.clock.clone();
        let seq_before = self.seq;
        self.certs.clear();
        self.staged_events.clear();
        self.reset_feed = false;
        self.trimmed.clear();
        self.stale_expiries.clear();
        for req in group.iter_mut() {
            let r = match &mut req.op {
                Op::Put { path, data, ttl_ms, condition } => self
                    .stage_client_write(&mut changes, path, (Some(std::mem::take(data)), *ttl_ms), *condition)
                    .map(Reply::Written),
                Op::Delete { path, condition } => {
                    self.stage_client_write(&mut changes, path, (None, None), *condition).map(Reply::Written)
                }
                Op::Expire { versions } => self.stage_expire(&mut changes, versions).map(Reply::Removed),
                Op::Txn { checks, writes } => self
                    .stage_txn(&mut changes, checks, writes)
                    .map(|w| Reply::WrittenMany(w.into_iter().map(Ok).collect())),
                Op::DeleteMany { paths } => Ok(Reply::WrittenMany(
                    paths
                        .iter()
                        .map(|p| self.stage_client_write(&mut changes, p, (None, None), merge::Condition::Exists))
                        .collect(),
                )),
                Op::Apply { records, tombstone_floor, absent_floor } => self
                    .stage_apply(&mut changes, std::mem::take(records), *tombstone_floor, *absent_floor)
                    .map(Reply::Applied),
                Op::Purge { tombstones } => self.stage_purge(&mut changes, tombstones).map(Reply::Removed),
                Op::Certify { tombstones } => self.stage_certify(&changes, tombstones).map(Reply::Certified),
                Op::Discard { up_to, limit } => self.stage_discard(&mut changes, *up_to, *limit).map(Reply::Removed),
                Op::Replace { path, record, if_timestamp } => {
                    let current = self.current(&changes, path);
                    current.map(|current| {
                        let replace = merge::may_replace(current.as_ref(), record, *if_timestamp);
                        if replace {
                            // A chosen version replaces a purged delete's certificate too.
                            self.certs.insert(path.clone(), None);
                            self.stage(&mut changes, path, current, Some(record.clone()));
                        }
                        Reply::Removed(usize::from(replace))
                    })
                }
                Op::Restore { records, certificates } => self.stage_restore(&mut changes, records, certificates),
                Op::SetMeta { key, value } => {
                    meta.push((std::mem::take(key), value.clone()));
                    Ok(Reply::Done)
                }
                Op::TrimChanges { before_wall, limit } => self.stage_trim(*before_wall, *limit).map(Reply::Removed),
                Op::Close => Ok(Reply::Done),
            };
            results.push(r);
        }
        let committed = self.commit(&changes, &meta, now_ms());
        if let Err(e) = &committed {
            self.clock = clock_before;
            self.seq = seq_before;
            let e = self.store.fail(e.clone());
            results.iter_mut().for_each(|r| *r = Err(e.clone()));
        }
        for (req, result) in group.drain(..).zip(results) {
            let _ = req.reply.send(result);
        }
    }

    /// The certificate of a purged delete of `path`, as of this group so far.
    fn current_cert(&self, path: &str) -> Result<Option<Cert>, StoreError> {
        match self.certs.get(path) {
            Some(c) => Ok(*c),
            None => match self.store.inner.dormant.get(path).map_err(io)? {
                Some(v) => Cert::decode(&v).map(Some),
                None => Ok(None),
            },
        }
    }

    /// The version of `path` as of this group so far.
    fn current(&self, changes: &HashMap<String, Change>, path: &str) -> Result<Option<Record>, StoreError> {
        match changes.get(path) {
            Some(c) => Ok(c.after.clone()),
            None => self.store.get_inner(path),
        }
    }

    /// Stages `after` as the version of `path`; a stored version is a change for the
    /// feed, a removal (`None`) is not.
    fn stage(
        &mut self,
        changes: &mut HashMap<String, Change>,
        path: &str,
        before: Option<Record>,
        after: Option<Record>,
    ) {
        if let Some(r) = &after {
            self.staged_events.push((path.to_string(), r.timestamp, r.uuid, r.is_tombstone()));
        }
        Self::stage_quiet(changes, path, before, after);
    }

    /// [`Self::stage`] without a change for the feed (a purged delete brought back
    /// from its certificate: the same delete, already numbered).
    fn stage_quiet(changes: &mut HashMap<String, Change>, path: &str, before: Option<Record>, after: Option<Record>) {
        match changes.get_mut(path) {
            Some(c) => c.after = after,
            None => {
                changes.insert(path.to_string(), Change { before, after });
            }
        }
    }

    /// Stages a client write or delete ([`merge::client_version`]).
    fn stage_client_write(
        &mut self,
        changes: &mut HashMap<String, Change>,
        path: &str,
        value: (Option<Bytes>, Option<u64>),
        condition: merge::Condition,
    ) -> Result<Written, StoreError> {
        let current = self.current(changes, path)?;
        let wall = now_ms();
        // Over a purged delete, the write is ordered after it, as over the tombstone.
        let cert = if current.is_none() { self.current_cert(path)? } else { None };
        let held = current.clone().or_else(|| cert.map(|c| c.tombstone()));
        // Against the version as of this group so far: an earlier write in the group
        // to the same key counts, so two conditional writes never both pass.
        if !condition.holds(held.as_ref(), wall) {
            let live = current.as_ref().filter(|r| r.is_live_at(wall)).map(|r| r.uuid);
            return Err(StoreError::ConditionFailed(live));
        }
        // Checked here, at stamping time, not only when the request arrived: the body
        // and the queue may have taken long enough for the clock to step meanwhile.
        if let Some(step) = self.store.inner.steps.stepped() {
            return Err(StoreError::ClockStepped(step));
        }
        let record = merge::client_version(&mut self.clock, held.as_ref(), wall, Uuid::new_v4(), value)
            .ok_or_else(|| StoreError::NoNewerTimestamp(path.to_string()))?;
        if cert.is_some() {
            self.certs.insert(path.to_string(), None);
        }
        let written = Written { uuid: record.uuid, timestamp: record.timestamp, expires: record.expires };
        self.stage(changes, path, current, Some(record));
        Ok(written)
    }

    /// Stages a transaction: every check against the versions as of this group so far,
    /// then every write; a write that fails undoes the ones staged before it, so the
    /// transaction is in the group's commit whole or not at all.
    fn stage_txn(
        &mut self,
        changes: &mut HashMap<String, Change>,
        checks: &[(String, merge::Condition)],
        writes: &mut [TxnWrite],
    ) -> Result<Vec<Written>, StoreError> {
        let wall = now_ms();
        for (i, (path, condition)) in checks.iter().enumerate() {
            let current = self.current(changes, path)?;
            if !condition.holds(current.as_ref(), wall) {
                let live = current.as_ref().filter(|r| r.is_live_at(wall)).map(|r| r.uuid);
                return Err(StoreError::CheckFailed(i, live));
            }
        }
        let saved: Vec<(String, Option<Change>, Option<Option<Cert>>)> =
            writes.iter().map(|(p, ..)| (p.clone(), changes.get(p).cloned(), self.certs.get(p).copied())).collect();
        let events = self.staged_events.len();
        let clock = self.clock.clone();
        let mut written = Vec::with_capacity(writes.len());
        for (path, data, ttl_ms) in writes.iter_mut() {
            match self.stage_client_write(changes, path, (data.take(), *ttl_ms), merge::Condition::Always) {
                Ok(w) => written.push(w),
                Err(e) => {
                    for (p, change, cert) in saved {
                        match change {
                            Some(c) => changes.insert(p.clone(), c),
                            None => changes.remove(&p),
                        };
                        match cert {
                            Some(c) => self.certs.insert(p, c),
                            None => self.certs.remove(&p),
                        };
                    }
                    self.staged_events.truncate(events);
                    self.clock = clock;
                    return Err(e);
                }
            }
        }
        Ok(written)
    }

    fn stage_apply(
        &mut self,
        changes: &mut HashMap<String, Change>,
        records: Vec<(String, Record)>,
        tombstone_floor: u64,
        absent_floor: u64,
    ) -> Result<ApplyReport, StoreError> {
        let mut report = ApplyReport::default();
        let wall = now_ms();
        let floors = Floors { tombstone: tombstone_floor, absent: absent_floor, future: self.clock.ceiling(wall) };
        for (path, incoming) in records {
            let current = self.current(changes, &path)?;
            let cert = if current.is_none() { self.current_cert(&path)? } else { None };
            match merge::decide_apply(current.as_ref(), cert.map(|c| c.timestamp), &incoming, floors) {
                Decision::Reawaken => {
                    report.skipped += 1;
                    report.reawakened += 1;
                    if let Some(c) = cert {
                        self.certs.insert(path.clone(), None);
                        Self::stage_quiet(changes, &path, current, Some(c.tombstone()));
                    }
                }
                Decision::Store => {
                    report.applied += 1;
                    if cert.is_some() {
                        self.certs.insert(path.clone(), None);
                    }
                    // Not from the future (decided above), so the clock takes it.
                    self.clock.observe(incoming.timestamp, wall);
                    self.stage(changes, &path, current, Some(incoming));
                }
                Decision::Future => {
                    report.skipped += 1;
                    report.future += 1;
                    // An expiry tombstone is held back for its expiry, not its timestamp.
                    let ahead =
                        incoming.expires.filter(|_| incoming.is_tombstone()).map_or(incoming.timestamp, hlc::from_ms);
                    report.future_max = report.future_max.max(ahead);
                }
                Decision::Skip => report.skipped += 1,
                Decision::Collision => {
                    report.skipped += 1;
                    if let Some(local) = current {
                        report.collisions.push((path, local, incoming));
                    }
                }
            }
        }
        Ok(report)
    }

    /// Stages the expiry tombstone of each listed version that is still held and has
    /// expired ([`crate::ttl::may_expire`]); a version rewritten since it was listed
    /// is left alone.
    fn stage_expire(
        &mut self,
        changes: &mut HashMap<String, Change>,
        versions: &[(String, u64)],
    ) -> Result<usize, StoreError> {
        let wall = now_ms();
        // Read after the wall clock, as a client write is stamped: a step since the
        // sweep's clock check is caught here (ARCHITECTURE.md, "Expiry", rule 5).
        if self.store.inner.steps.stepped().is_some() {
            return Ok(0);
        }
        let mut expired = 0;
        for (path, expires) in versions {
            let current = self.current(changes, path)?;
            if crate::ttl::may_expire(current.as_ref(), *expires, wall)
                && let Some(version) = &current
            {
                let tombstone = crate::ttl::expiry_tombstone(version);
                self.stage(changes, path, current, Some(tombstone));
                expired += 1;
            } else if current.as_ref().is_none_or(|r| r.indexed_expiry() != Some(*expires)) {
                // An entry for a version no longer held (never left by a commit, which
                // moves the index with the record): removed, so it cannot block the sweep.
                self.stale_expiries.push(time_key(*expires, path));
            }
        }
        Ok(expired)
    }

    fn stage_purge(
        &mut self,
        changes: &mut HashMap<String, Change>,
        tombstones: &[(String, u64)],
    ) -> Result<usize, StoreError> {
        let mut removed = 0;
        for (path, ts) in tombstones {
            let current = self.current(changes, path)?;
            if merge::may_purge(current.as_ref(), *ts)
                && let Some(t) = &current
            {
                self.certs.insert(path.clone(), Some(Cert { timestamp: t.timestamp, uuid: t.uuid }));
                self.stage(changes, path, current, None);
                removed += 1;
            }
        }
        Ok(removed)
    }

    fn stage_certify(
        &mut self,
        changes: &HashMap<String, Change>,
        tombstones: &[(String, u64, Uuid)],
    ) -> Result<Vec<bool>, StoreError> {
        let mut answers = Vec::with_capacity(tombstones.len());
        for (path, ts, uuid) in tombstones {
            let safe = match self.current(changes, path)? {
                Some(r) => r.timestamp > *ts || (r.timestamp == *ts && r.uuid == *uuid),
                None => {
                    if self.current_cert(path)?.is_none_or(|c| c.timestamp < *ts) {
                        self.certs.insert(path.clone(), Some(Cert { timestamp: *ts, uuid: *uuid }));
                    }
                    true
                }
            };
            answers.push(safe);
        }
        Ok(answers)
    }

    /// Stages a restore's records and certificates as they are ([`Writer::restore`]):
    /// into paths that hold nothing, with no feed events (the feed starts after it).
    fn stage_restore(
        &mut self,
        changes: &mut HashMap<String, Change>,
        records: &mut Vec<(String, Record)>,
        certificates: &mut Vec<(String, u64, Uuid)>,
    ) -> Result<Reply, StoreError> {
        let mut stored = 0;
        for (path, record) in std::mem::take(records) {
            if self.current(changes, &path)?.is_none() {
                Self::stage_quiet(changes, &path, None, Some(record));
                stored += 1;
            }
        }
        for (path, timestamp, uuid) in std::mem::take(certificates) {
            if self.current(changes, &path)?.is_none() {
                self.certs.insert(path, Some(Cert { timestamp, uuid }));
                stored += 1;
            }
        }
        Ok(Reply::Removed(stored))
    }

    fn stage_discard(
        &mut self,
        changes: &mut HashMap<String, Change>,
        up_to: u64,
        limit: usize,
    ) -> Result<usize, StoreError> {
        let old = self.store.inner.by_time.range(..=up_to.to_be_bytes()).take(limit);
        let mut paths = Vec::new();
        for guard in old {
            let k = guard.key().map_err(io)?;
            paths.push(split_time_key(&k)?.1);
        }
        let mut removed = 0;
        for path in paths {
            let current = self.current(changes, &path)?;
            if merge::may_discard(current.as_ref(), up_to) {
                self.stage(changes, &path, current, None);
                removed += 1;
            }
        }
        // The feed cannot show a version removed this way: every older cursor must
        // re-read (ARCHITECTURE.md "Change feed").
        self.reset_feed |= removed > 0;
        Ok(removed)
    }

    /// Trims the change log: up to `limit` of its oldest entries applied before
    /// `before_wall` (Unix ms). Stops at the first newer entry, so a wall clock that
    /// stepped back keeps more, never less.
    fn stage_trim(&mut self, before_wall: u64, limit: usize) -> Result<usize, StoreError> {
        for guard in self.store.inner.changes.iter().take(limit) {
            let (k, v) = guard.into_inner().map_err(io)?;
            let event = crate::changes::Event::decode(&k, &v)
                .ok_or_else(|| StoreError::Corrupt("undecodable change log entry".into()))?;
            if event.wall_ms >= before_wall {
                break;
            }
            self.trimmed.push(event.seq);
        }
        Ok(self.trimmed.len())
    }

    fn commit(
        &mut self,
        changes: &HashMap<String, Change>,
        meta: &[(String, Bytes)],
        wall: u64,
    ) -> Result<(), StoreError> {
        let inner = &self.store.inner;
        let mut batch = inner.db.batch().durability(Some(self.mode));
        let (mut live, mut tombs) =
            (inner.counts.live_keys.load(Ordering::Relaxed), inner.counts.tombstones.load(Ordering::Relaxed));
        let mut leaf_updates: HashMap<u16, u64> = HashMap::new();
        let mut newest = inner.newest.load(Ordering::Relaxed);
        // First: a version the group stores may have the same entry.
        for stale in &self.stale_expiries {
            batch.remove(&inner.expiry, stale.as_slice());
        }
        {
            let leaves = inner.leaves.lock().unwrap_or_else(|p| p.into_inner());
            let mut xor_leaf = |path: &str, r: &Record| {
                let leaf = leaf_of(path);
                *leaf_updates.entry(leaf).or_insert(leaves[leaf as usize]) ^= record_digest(path, r);
            };
            for (path, c) in changes {
                if c.before == c.after {
                    continue;
                }
                // The counts are of client keys: kvs's own records (tokens) are not.
                let counted = u64::from(!crate::path::is_reserved(path));
                if let Some(before) = &c.before {
                    // One entry per path in each index: the old ones go in the same batch
                    // (not when the new one has the same key: a vote's winner or an
                    // expiry tombstone keeps the timestamp, and its insert replaces it).
                    if c.after.as_ref().is_none_or(|a| a.timestamp != before.timestamp) {
                        batch.remove(&inner.by_time, time_key(before.timestamp, path));
                    }
                    if let Some(expires) = before.indexed_expiry()
                        && c.after.as_ref().and_then(Record::indexed_expiry) != Some(expires)
                    {
                        batch.remove(&inner.expiry, time_key(expires, path));
                    }
                    xor_leaf(path, before);
                    if before.is_tombstone() { tombs -= counted } else { live -= counted }
                }
                match &c.after {
                    Some(after) => {
                        if after.is_tombstone() {
                            tombs += counted
                        } else {
                            live += counted
                        }
                        xor_leaf(path, after);
                        if !self.clock.is_future(after.timestamp, wall) {
                            newest = newest.max(after.timestamp);
                        }
                        batch.insert(&inner.records, path.as_str(), after.encode());
                        batch.insert(&inner.by_time, time_key(after.timestamp, path), uuid_kind(after));
                        batch.insert(&inner.by_bucket, bucket_key(path), bucket_version(after));
                        if let Some(expires) = after.indexed_expiry() {
                            batch.insert(&inner.expiry, time_key(expires, path), b"".as_slice());
                        }
                    }
                    None => {
                        batch.remove(&inner.records, path.as_str());
                        batch.remove(&inner.by_bucket, bucket_key(path));
                    }
                }
            }
        }
        for (leaf, hash) in &leaf_updates {
            batch.insert(&inner.summary, leaf.to_be_bytes().as_slice(), hash.to_be_bytes().as_slice());
        }
        for (path, cert) in &self.certs {
            match cert {
                Some(c) => batch.insert(&inner.dormant, path.as_str(), c.encode()),
                None => batch.remove(&inner.dormant, path.as_str()),
            }
        }
        if !changes.is_empty() || !self.certs.is_empty() {
            batch.insert(&inner.meta, META_LAST_TIMESTAMP, self.clock.last().to_be_bytes().as_slice());
            batch.insert(&inner.meta, META_LIVE_KEYS, live.to_be_bytes().as_slice());
            batch.insert(&inner.meta, META_TOMBSTONES, tombs.to_be_bytes().as_slice());
        }
        for (k, v) in meta {
            batch.insert(&inner.meta, k.as_str(), v.as_ref());
        }
        // The first record with an expiry makes the dir format 3, in the same batch:
        // from then on an older kvs refuses to open it instead of misreading it.
        let marks_format = inner.format.load(Ordering::Relaxed) < FORMAT_VERSION
            && changes.values().any(|c| c.after.as_ref().is_some_and(|r| r.expires.is_some()));
        if marks_format {
            batch.insert(&inner.meta, META_FORMAT, FORMAT_VERSION.to_be_bytes().as_slice());
        }
        let seq_before = self.seq;
        let mut seq = self.seq;
        for (key, timestamp, uuid, delete) in &self.staged_events {
            seq += 1;
            let event = crate::changes::Event {
                seq,
                wall_ms: wall,
                timestamp: *timestamp,
                uuid: *uuid,
                delete: *delete,
                key: key.clone(),
            };
            batch.insert(&inner.changes, seq.to_be_bytes().as_slice(), event.encode_value());
        }
        let floor_before = inner.change_floor.load(Ordering::SeqCst);
        let mut floor = floor_before;
        if self.reset_feed {
            // The removal takes a seq of its own: cursors before it are refused.
            seq += 1;
            floor = seq;
        }
        for trimmed in &self.trimmed {
            batch.remove(&inner.changes, trimmed.to_be_bytes().as_slice());
            floor = floor.max(*trimmed);
        }
        if seq != seq_before {
            batch.insert(&inner.meta, META_CHANGE_SEQ, seq.to_be_bytes().as_slice());
        }
        if floor != floor_before {
            batch.insert(&inner.meta, META_CHANGE_FLOOR, floor.to_be_bytes().as_slice());
            // Raised before the entries go: a reader that checks the floor after its
            // scan sees it whenever the scan may have missed a trimmed entry
            // (ARCHITECTURE.md). A failed commit stops the node.
            inner.change_floor.store(floor, Ordering::SeqCst);
        }
        if let Err(e) = batch.commit() {
            // Not raised after all (the node stops; nothing more is committed).
            inner.change_floor.store(floor_before, Ordering::SeqCst);
            return Err(io(e));
        }
        self.seq = seq;
        if seq != seq_before {
            // Moves after the commit and before the wake-ups (ARCHITECTURE.md).
            inner.last_seq.store(seq, Ordering::SeqCst);
            if self.reset_feed {
                // Every stream must learn that its cursor is gone.
                inner.wakeups.notify_all(seq);
            } else {
                inner.wakeups.notify(seq, self.staged_events.iter().map(|(k, ..)| k.as_str()));
            }
        }
        {
            let mut leaves = inner.leaves.lock().unwrap_or_else(|p| p.into_inner());
            for (leaf, hash) in leaf_updates {
                leaves[leaf as usize] = hash;
            }
        }
        if marks_format {
            inner.format.store(FORMAT_VERSION, Ordering::Relaxed);
            tracing::info!("the data dir is now format {FORMAT_VERSION} (records with an expiry): older kvs refuse it");
        }
        inner.counts.live_keys.store(live, Ordering::Relaxed);
        inner.counts.tombstones.store(tombs, Ordering::Relaxed);
        inner.newest.store(newest, Ordering::Relaxed);
        if changes.keys().any(|p| crate::path::is_reserved(p)) {
            inner.acl_generation.fetch_add(1, Ordering::Release);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::antientropy::level1;

    const OFFSET: u64 = 500;

    fn runtime() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime")
    }

    fn open(dir: &Path) -> (Store, Writer) {
        Store::open(dir, Durability::Buffer, OFFSET).expect("open")
    }

    #[test]
    fn a_write_buffer_over_its_limit_with_no_memtable_full_is_flushed() {
        let dir = tempfile::tempdir().unwrap();
        let (store, writer) = open(dir.path());
        // 2 MiB: far below one full memtable (64 MiB), so fjall alone never flushes.
        store.set_write_buffer_limit(2 * 1024 * 1024);
        let rt = runtime();
        rt.block_on(async {
            for chunk in 0..40 {
                let mut pending = Vec::new();
                for i in 0..500 {
                    let w = writer.clone();
                    pending.push(tokio::spawn(async move {
                        w.put(format!("k/{chunk}/{i}"), Bytes::from(vec![b'1'; 200])).await
                    }));
                }
                for p in pending {
                    p.await.unwrap().unwrap();
                }
            }
        });
        // Before, the writer only waited for flushes that never came (a second per
        // commit) and the buffer stayed over the limit for good.
        assert!(store.forced_rotations() > 0, "the writer rotated the memtables");
        // The check runs before each commit: the last writes may have left the buffer
        // over the limit, and the next write brings it back under.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
        let mut n = 0;
        while store.write_buffer_bytes() > 2 * 1024 * 1024 {
            assert!(std::time::Instant::now() < deadline, "write buffer {} bytes", store.write_buffer_bytes());
            rt.block_on(writer.put(format!("after/{n}"), Bytes::from_static(b"1"))).unwrap();
            n += 1;
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        assert_eq!(store.live_keys(), 20_000 + n);
        writer.close(&store).unwrap();
    }

    #[test]
    fn a_write_buffer_past_half_its_limit_is_flushed_with_no_write_waiting() {
        let dir = tempfile::tempdir().unwrap();
        let (store, writer) = open(dir.path());
        let limit = 4 * 1024 * 1024;
        store.set_write_buffer_limit(limit);
        let rt = runtime();
        let mut n = 0;
        while store.write_buffer_bytes() <= limit / 2 {
            rt.block_on(writer.put(format!("k/{n}"), Bytes::from(vec![b'1'; 200]))).unwrap();
            n += 1;
        }
        assert!(store.write_buffer_bytes() <= limit, "stopped past half, below the limit");
        // The check runs before each commit: this one finds the buffer past half.
        rt.block_on(writer.put("one/more".into(), Bytes::from_static(b"1"))).unwrap();
        assert_eq!(store.forced_rotations(), 1, "rotation asked for below the limit");
        // Before, nothing happened below the limit: the buffer stayed where it was until
        // it reached the limit, and then every write waited for the flushes.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
        while store.write_buffer_bytes() > limit / 2 {
            assert!(std::time::Instant::now() < deadline, "write buffer {} bytes", store.write_buffer_bytes());
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        assert_eq!(store.live_keys(), n + 1);
        writer.close(&store).unwrap();
    }

    #[test]
    fn point_reads_load_no_index_or_filter_block_on_any_level() {
        let dir = tempfile::tempdir().unwrap();
        let rt = runtime();
        {
            let (store, writer) = open(dir.path());
            rt.block_on(async {
                for i in 0..3_000 {
                    writer.put(format!("k/{i}"), Bytes::from(vec![b'1'; 100])).await.unwrap();
                }
            });
            writer.close(&store).unwrap();
        }
        let (store, writer) = open(dir.path());
        // Down to the last level, where fjall's defaults keep neither block in memory.
        for ks in store.inner.keyspaces() {
            ks.major_compact().unwrap();
        }
        writer.close(&store).unwrap();
        drop(store);
        let (store, writer) = open(dir.path());
        let before = store.block_reads();
        for i in (0..3_000).step_by(7) {
            assert!(store.get(&format!("k/{i}")).unwrap().is_some());
            assert!(store.get(&format!("missing/{i}")).unwrap().is_none());
        }
        // Scans seek by index too: the leaves of a sync round, the change feed.
        let leaves: Vec<u16> = (0..3_000).step_by(97).map(|i| crate::antientropy::leaf_of(&format!("k/{i}"))).collect();
        assert!(!store.versions_in_leaves(&leaves).unwrap().is_empty());
        assert!(!store.versions_since(Some((0, "k/1")), 10).unwrap().is_empty());
        let after = store.block_reads();
        assert!(after[0].1 + after[0].2 > before[0].1 + before[0].2, "the reads went to the tables");
        store.refresh_disk_bytes();
        assert!(store.pinned_bytes() > 0, "filters and indexes held in memory");
        // Before, each read loaded the table's index block and filter block (from the
        // block cache at best): at 10M keys that was most of a GET's time.
        assert_eq!((after[1], after[2]), (before[1], before[2]), "index and filter blocks read");
        writer.close(&store).unwrap();
    }

    #[test]
    fn a_burst_of_writes_stays_on_the_wall_clock() {
        let dir = tempfile::tempdir().unwrap();
        let (store, writer) = open(dir.path());
        let rt = runtime();
        let mut last = 0;
        rt.block_on(async {
            // 20,000 writes as fast as one writer takes them: far more than one per ms.
            for chunk in 0..20 {
                let mut pending = Vec::new();
                for i in 0..1000 {
                    let w = writer.clone();
                    pending.push(tokio::spawn(async move {
                        w.put(format!("k/{chunk}/{i}"), Bytes::from_static(b"1")).await
                    }));
                }
                for p in pending {
                    let ts = p.await.unwrap().unwrap().timestamp;
                    assert!(ts != last);
                    last = last.max(ts);
                }
            }
        });
        assert!(hlc::ms(last) <= now_ms(), "the physical part never runs ahead of the wall clock");
        assert_eq!(store.live_keys(), 20_000);
        writer.close(&store).unwrap();
    }

    #[test]
    fn a_record_from_the_future_is_held_back_and_does_not_drag_the_clock() {
        let dir = tempfile::tempdir().unwrap();
        let (store, writer) = open(dir.path());
        let rt = runtime();
        let future = hlc::from_ms(now_ms() + 120_000);
        rt.block_on(async {
            let r = Record::value(future, Uuid::from_u128(7), Bytes::from_static(b"\"skewed\""));
            let report = writer.apply(vec![("a".into(), r.clone())], 0, 0).await.unwrap();
            assert_eq!((report.applied, report.skipped, report.future, report.future_max), (0, 1, 1, future));
            assert_eq!(store.get("a").unwrap(), None, "held back: its sender keeps it");
            let end = Record::value(u64::MAX, Uuid::from_u128(8), Bytes::from_static(b"1"));
            let held = Record::value(5, Uuid::from_u128(9), Bytes::from_static(b"2"));
            writer.apply(vec![("b".into(), held.clone())], 0, 0).await.unwrap();
            assert_eq!(writer.apply(vec![("b".into(), end)], 0, 0).await.unwrap().future, 1);
            assert_eq!(store.get("b").unwrap(), Some(held), "the key is not frozen at the end of time");
            let other = writer.put("b".into(), Bytes::from_static(b"1")).await.unwrap();
            assert!(hlc::ms(other.timestamp) <= now_ms(), "writes stay on real time");
            let near = hlc::from_ms(now_ms() + 200);
            let report = writer.apply(vec![("c".into(), Record::tombstone(near, Uuid::from_u128(8)))], 0, 0).await;
            assert_eq!(report.unwrap().future, 0, "within the bound: taken");
            let next = writer.put("d".into(), Bytes::from_static(b"1")).await.unwrap();
            assert!(next.timestamp > near, "the clock followed a timestamp within the bound");
        });
        writer.close(&store).unwrap();
        drop((store, writer));
        // The persisted clock is taken back within the bound only.
        let (store, writer) = open(dir.path());
        let ts = runtime().block_on(writer.put("e".into(), Bytes::from_static(b"1"))).unwrap().timestamp;
        assert!(hlc::ms(ts) <= now_ms() + OFFSET);
        writer.close(&store).unwrap();
    }

    #[test]
    fn a_purged_delete_leaves_certificates_that_refuse_its_victim() {
        let dir = tempfile::tempdir().unwrap();
        let (store, writer) = open(dir.path());
        let rt = runtime();
        rt.block_on(async {
            let v = Record::value(hlc::from_ms(1_000), Uuid::from_u128(1), Bytes::from_static(b"1"));
            let t = Record::tombstone(hlc::from_ms(2_000), Uuid::from_u128(2));
            writer.apply(vec![("k".into(), t.clone())], 0, 0).await.unwrap();
            assert_eq!(writer.purge(vec![("k".into(), t.timestamp)]).await.unwrap(), 1);
            assert_eq!(store.get("k").unwrap(), None);
            assert_eq!(store.tombstones(), 0);
            assert_eq!(store.certificate("k").unwrap(), Some(t.timestamp));
            // The deleted value comes back from a node that missed the delete: refused,
            // and the delete is live again.
            let r = writer.apply(vec![("k".into(), v.clone())], 0, 0).await.unwrap();
            assert_eq!((r.applied, r.reawakened), (0, 1));
            assert_eq!(store.get("k").unwrap(), Some(t.clone()));
            assert_eq!(store.certificate("k").unwrap(), None, "the certificate became the tombstone again");
            // Purged again; a later write takes the path and drops the certificate.
            writer.purge(vec![("k".into(), t.timestamp)]).await.unwrap();
            let w = writer.put("k".into(), Bytes::from_static(b"2")).await.unwrap();
            assert!(w.timestamp > t.timestamp);
            assert_eq!(store.certificate("k").unwrap(), None);
        });
        writer.close(&store).unwrap();
    }

    #[test]
    fn a_purge_check_says_what_the_delete_must_still_reach_and_certifies_the_rest() {
        let dir = tempfile::tempdir().unwrap();
        let (store, writer) = open(dir.path());
        runtime().block_on(async {
            let ts = hlc::from_ms(2_000);
            writer
                .apply(
                    vec![("older".into(), Record::value(ts - 5, Uuid::from_u128(1), Bytes::from_static(b"1")))],
                    0,
                    0,
                )
                .await
                .unwrap();
            writer.apply(vec![("same".into(), Record::tombstone(ts, Uuid::from_u128(9)))], 0, 0).await.unwrap();
            writer
                .apply(vec![("clash".into(), Record::value(ts, Uuid::from_u128(3), Bytes::from_static(b"1")))], 0, 0)
                .await
                .unwrap();
            let ask = |p: &str| (p.to_string(), ts, Uuid::from_u128(9));
            let answers = writer.certify(vec![ask("older"), ask("same"), ask("clash"), ask("absent")]).await.unwrap();
            assert_eq!(answers, vec![false, true, false, true], "older and a collision still need the delete");
            // Holding nothing of "absent", this node now refuses its deleted value too.
            let late = Record::value(ts - 1, Uuid::from_u128(4), Bytes::from_static(b"1"));
            let r = writer.apply(vec![("absent".into(), late)], 0, 0).await.unwrap();
            assert_eq!((r.applied, r.reawakened), (0, 1));
            assert_eq!(store.get("absent").unwrap().map(|r| r.is_tombstone()), Some(true));
        });
        writer.close(&store).unwrap();
    }

    /// Writes `records` into `dir` the way kvs 0.1 (format 1, millisecond timestamps)
    /// laid them out, with its meta values.
    fn write_format_1(dir: &Path, records: &[(&str, Record)], meta: &[(&[u8], u64)]) {
        let (store, writer) = open(dir);
        writer.close(&store).unwrap();
        let inner = &store.inner;
        let mut batch = inner.db.batch().durability(Some(PersistMode::SyncAll));
        let mut leaves = vec![0u64; LEAVES];
        for (path, r) in records {
            batch.insert(&inner.records, *path, r.encode());
            batch.insert(&inner.by_time, time_key(r.timestamp, path), uuid_kind(r));
            batch.insert(&inner.by_bucket, bucket_key(path), bucket_version(r));
            leaves[leaf_of(path) as usize] ^= record_digest(path, r);
        }
        for (leaf, h) in leaves.iter().enumerate().filter(|(_, h)| **h != 0) {
            batch.insert(&inner.summary, (leaf as u16).to_be_bytes().as_slice(), h.to_be_bytes().as_slice());
        }
        for (k, v) in meta {
            batch.insert(&inner.meta, *k, v.to_be_bytes().as_slice());
        }
        batch.remove(&inner.meta, META_FORMAT);
        batch.commit().unwrap();
        drop(writer);
        drop(store);
    }

    #[test]
    fn a_format_1_data_dir_is_upgraded_in_place_and_an_upgrade_can_run_twice() {
        let dir = tempfile::tempdir().unwrap();
        let ms = 1_763_000_000_000u64;
        let old = [
            ("a", Record::value(ms, Uuid::from_u128(1), Bytes::from_static(b"1"))),
            ("b/c", Record::tombstone(ms + 5, Uuid::from_u128(2))),
            ("d", Record::value(ms + 9, Uuid::from_u128(3), Bytes::from_static(b"{}"))),
        ];
        write_format_1(dir.path(), &old, &[(META_LAST_TIMESTAMP, ms + 9), (META_GC_HORIZON, ms - 100)]);
        for round in 0..2 {
            let (store, writer) = open(dir.path());
            let mut expected = vec![0u64; LEAVES];
            for (path, r) in &old {
                let want = Record { timestamp: hlc::from_ms(r.timestamp), ..r.clone() };
                assert_eq!(store.get(path).unwrap().as_ref(), Some(&want), "round {round}: {path}");
                expected[leaf_of(path) as usize] ^= record_digest(path, &want);
            }
            assert_eq!(store.level1(), level1(&expected), "summary rebuilt");
            assert_eq!(store.newest_timestamp(), hlc::from_ms(ms + 9));
            assert_eq!(store.gc_horizon(), hlc::from_ms(ms - 100));
            let since = store.versions_since(None, 10).unwrap();
            assert_eq!(
                since.iter().map(|v| v.timestamp).collect::<Vec<_>>(),
                old.iter().map(|(_, r)| hlc::from_ms(r.timestamp)).collect::<Vec<_>>()
            );
            assert_eq!(read_u64(&store.inner.meta, META_FORMAT).unwrap(), FORMAT_WITHOUT_TTL);
            // A second start of an interrupted upgrade finds converted records and skips them.
            store.inner.meta.remove(META_FORMAT).unwrap();
            writer.close(&store).unwrap();
        }
    }

    #[test]
    fn a_data_dir_from_a_newer_kvs_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let (store, writer) = open(dir.path());
        store.inner.meta.insert(META_FORMAT, 99u64.to_be_bytes()).unwrap();
        writer.close(&store).unwrap();
        drop((store, writer));
        match Store::open(dir.path(), Durability::Buffer, OFFSET) {
            Err(StoreError::Format(99)) => {}
            other => panic!("expected a format error, got {:?}", other.map(|_| ())),
        }
    }

    /// The change log after `after`, as (seq, key, delete) triples.
    fn feed(store: &Store, after: u64) -> Vec<(u64, String, bool)> {
        let (events, _) =
            store.changes_after(after, store.last_seq(), (10_000, usize::MAX, 100_000), &|_| true).unwrap();
        events.into_iter().map(|e| (e.seq, e.key, e.delete)).collect()
    }

    #[test]
    fn every_stored_version_is_a_numbered_change_and_purges_are_not() {
        let dir = tempfile::tempdir().unwrap();
        let (store, writer) = open(dir.path());
        let rt = runtime();
        let t = Record::tombstone(hlc::from_ms(2_000), Uuid::from_u128(2));
        rt.block_on(async {
            writer.put("a".into(), Bytes::from_static(b"1")).await.unwrap();
            writer.delete("a".into()).await.unwrap();
            // Replicated: a version stored, and one skipped (older) that is no change.
            writer.apply(vec![("k".into(), t.clone())], 0, 0).await.unwrap();
            let old = Record::value(hlc::from_ms(1_000), Uuid::from_u128(1), Bytes::from_static(b"1"));
            writer.apply(vec![("k".into(), old.clone())], 0, 0).await.unwrap();
            assert_eq!(writer.purge(vec![("k".into(), t.timestamp)]).await.unwrap(), 1);
            // The purged delete's victim arrives: refused, the delete comes back from its
            // certificate: the same delete, not a new change.
            assert_eq!(writer.apply(vec![("k".into(), old)], 0, 0).await.unwrap().reawakened, 1);
        });
        let expected = vec![(1, "a".to_string(), false), (2, "a".to_string(), true), (3, "k".to_string(), true)];
        assert_eq!(feed(&store, 0), expected);
        assert_eq!(store.last_seq(), 3);
        writer.close(&store).unwrap();
        drop(store);
        // The seq survives a restart and goes on from there.
        let (store, writer) = open(dir.path());
        assert_eq!((store.last_seq(), feed(&store, 0)), (3, expected));
        rt.block_on(async { writer.put("b".into(), Bytes::from_static(b"2")).await.unwrap() });
        assert_eq!(feed(&store, 3), vec![(4, "b".to_string(), false)]);
        writer.close(&store).unwrap();
    }

    #[test]
    fn two_versions_of_one_key_in_one_group_are_two_changes() {
        let dir = tempfile::tempdir().unwrap();
        let (store, writer) = open(dir.path());
        runtime().block_on(async {
            let mut pending = Vec::new();
            for i in 0..200 {
                let w = writer.clone();
                pending.push(tokio::spawn(async move { w.put("same".into(), Bytes::from(i.to_string())).await }));
            }
            for p in pending {
                p.await.unwrap().unwrap();
            }
        });
        let events = feed(&store, 0);
        assert_eq!(events.len(), 200, "one change per acknowledged write, grouped or not");
        assert!(events.iter().enumerate().all(|(i, e)| e.0 == i as u64 + 1));
        writer.close(&store).unwrap();
    }

    #[test]
    fn trimming_and_the_stale_discard_raise_the_floor() {
        let dir = tempfile::tempdir().unwrap();
        let (store, writer) = open(dir.path());
        runtime().block_on(async {
            for i in 0..5 {
                writer.put(format!("k{i}"), Bytes::from_static(b"1")).await.unwrap();
            }
            assert_eq!(store.change_floor(), 0);
            // Nothing was applied before this wall time: nothing trimmed.
            assert_eq!(writer.trim_changes(now_ms() - 60_000, 100).await.unwrap(), 0);
            // Everything was: trimmed in batches, oldest first.
            assert_eq!(writer.trim_changes(now_ms() + 1, 3).await.unwrap(), 3);
            assert_eq!((store.change_floor(), feed(&store, 3).len()), (3, 2));
            assert_eq!(writer.trim_changes(now_ms() + 1, 100).await.unwrap(), 2);
            assert_eq!((store.change_floor(), store.last_seq()), (5, 5));
            // The discard removes versions the feed cannot show: it takes a seq and
            // every older cursor is refused.
            writer.put("x".into(), Bytes::from_static(b"1")).await.unwrap();
            assert!(writer.discard(u64::MAX, 100).await.unwrap() > 0);
            assert_eq!((store.last_seq(), store.change_floor()), (7, 7));
            // Seq 7 has no entry; a read to the end still moves the cursor past it.
            let (events, cursor) = store.changes_after(5, 7, (10, usize::MAX, 10), &|_| true).unwrap();
            assert_eq!((events.len(), cursor), (1, 7));
            // A read cut short by its scan budget resumes where it stopped.
            let (events, cursor) = store.changes_after(0, 7, (10, usize::MAX, 0), &|_| true).unwrap();
            assert_eq!((events.len(), cursor), (0, 0));
        });
        writer.close(&store).unwrap();
        drop(store);
        let (store, writer) = open(dir.path());
        assert_eq!((store.last_seq(), store.change_floor()), (7, 7), "both survive a restart");
        writer.close(&store).unwrap();
    }

    #[test]
    fn of_many_conditional_writes_on_one_version_exactly_one_passes() {
        let dir = tempfile::tempdir().unwrap();
        let (store, writer) = open(dir.path());
        runtime().block_on(async {
            let first = writer.put("k".into(), Bytes::from_static(b"0")).await.unwrap();
            // All queued at once, so most share one group: each is checked against the
            // version as the group left it, not as the disk had it.
            let mut pending = Vec::new();
            for i in 0..100 {
                let w = writer.clone();
                let c = merge::Condition::Matches(first.uuid);
                pending
                    .push(tokio::spawn(async move { w.put_if("k".into(), Bytes::from(i.to_string()), None, c).await }));
            }
            let mut passed = Vec::new();
            for p in pending {
                match p.await.unwrap() {
                    Ok(w) => passed.push(w),
                    Err(StoreError::ConditionFailed(Some(_))) => {}
                    Err(e) => panic!("{e}"),
                }
            }
            assert_eq!(passed.len(), 1, "one compare-and-set wins");
            assert_eq!(store.get("k").unwrap().map(|r| r.uuid), Some(passed[0].uuid));
            // Create-only: refused over a value, taken over a delete.
            let absent = merge::Condition::Absent;
            assert!(matches!(
                writer.put_if("k".into(), Bytes::from_static(b"1"), None, absent).await,
                Err(StoreError::ConditionFailed(Some(u))) if u == passed[0].uuid
            ));
            writer.delete("k".into()).await.unwrap();
            writer.put_if("k".into(), Bytes::from_static(b"2"), None, absent).await.unwrap();
            assert!(matches!(
                writer.delete_if("gone".into(), merge::Condition::Exists).await,
                Err(StoreError::ConditionFailed(None))
            ));
            assert_eq!(store.get("gone").unwrap(), None, "a failed condition writes nothing");
        });
        writer.close(&store).unwrap();
    }

    #[test]
    fn a_transaction_whose_later_write_fails_leaves_nothing_of_the_earlier_ones() {
        let dir = tempfile::tempdir().unwrap();
        let (store, writer) = open(dir.path());
        runtime().block_on(async {
            // A version at the end of the timestamp range: no write can supersede it.
            let last = Record::value(u64::MAX, Uuid::from_u128(9), Bytes::from_static(b"1"));
            writer.replace("end".into(), last, None).await.unwrap();
            let seq = store.last_seq();
            let writes = vec![("a".to_string(), Some(Bytes::from_static(b"1")), None), ("end".to_string(), None, None)];
            let r = writer.transact(vec![], writes).await;
            assert!(matches!(r, Err(StoreError::NoNewerTimestamp(_))), "{r:?}");
            assert_eq!(store.get("a").unwrap(), None, "the first write was undone");
            assert_eq!(store.last_seq(), seq, "and is no change");
            // The writer goes on: the same transaction without the impossible write.
            let w =
                writer.transact(vec![], vec![("a".to_string(), Some(Bytes::from_static(b"2")), None)]).await.unwrap();
            assert_eq!(store.get("a").unwrap().map(|r| r.uuid), Some(w[0].uuid));
        });
        writer.close(&store).unwrap();
    }

    #[test]
    fn an_expired_value_is_absent_to_reads_and_the_sweep_turns_it_into_its_expiry_tombstone() {
        let dir = tempfile::tempdir().unwrap();
        let (store, writer) = open(dir.path());
        let v = |s: &'static str| Bytes::from_static(s.as_bytes());
        runtime().block_on(async {
            let expiring = writer.put_if("a/x".into(), v("1"), Some(1), merge::Condition::Always).await.unwrap();
            let long = writer.put_if("a/y".into(), v("2"), Some(3_600_000), merge::Condition::Always).await.unwrap();
            let rewritten = writer.put_if("a/z".into(), v("3"), Some(1), merge::Condition::Always).await.unwrap();
            // A write without a TTL over an expiring value clears the expiry.
            writer.put("a/z".into(), v("4")).await.unwrap();
            assert_eq!(expiring.expires, Some(hlc::ms(expiring.timestamp) + 1));
            assert!(long.expires.is_some());
            assert_eq!(store.get("a/z").unwrap().unwrap().expires, None);
            // Wait for the 1 ms TTL to pass (a deadline, not a bare sleep).
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
            while now_ms() <= hlc::ms(rewritten.timestamp) + 1 {
                assert!(std::time::Instant::now() < deadline, "the wall clock did not move");
                tokio::time::sleep(std::time::Duration::from_millis(1)).await;
            }
            // Absent to listings and to conditions before any sweep.
            assert_eq!(store.list_keys(Some("a"), None, 10).unwrap().keys, ["a/y", "a/z"]);
            let refused = writer.put_if("a/x".into(), v("5"), None, merge::Condition::Exists).await;
            assert!(matches!(refused, Err(StoreError::ConditionFailed(None))), "{refused:?}");
            // The index lists only a/x (a/z's entry went with its rewrite).
            let due = store.due_expiries(now_ms(), 10).unwrap();
            assert_eq!(due, vec![("a/x".to_string(), expiring.expires.unwrap())]);
            let seq_before = store.last_seq();
            assert_eq!(writer.expire(due.clone()).await.unwrap(), 1);
            let tomb = store.get("a/x").unwrap().unwrap();
            assert_eq!(
                tomb,
                crate::ttl::expiry_tombstone(&Record {
                    expires: expiring.expires,
                    ..Record::value(expiring.timestamp, expiring.uuid, v("1"))
                })
            );
            assert!(store.due_expiries(now_ms(), 10).unwrap().is_empty(), "the index entry went with it");
            assert_eq!(writer.expire(due).await.unwrap(), 0, "a second sweep changes nothing");
            // The change feed reports it as a delete with the tombstone's version.
            let events = feed(&store, seq_before);
            assert_eq!(events, vec![(seq_before + 1, "a/x".to_string(), true)]);
            // A stale index entry (no such version held) is removed, not retried forever.
            assert_eq!(writer.expire(vec![("a/q".into(), 1)]).await.unwrap(), 0);
        });
        writer.close(&store).unwrap();
        drop((store, writer));
        // The expiry survives a restart, in the record and in the index.
        let (store, writer) = open(dir.path());
        assert!(store.get("a/y").unwrap().unwrap().expires.is_some());
        assert_eq!(store.due_expiries(u64::MAX, 10).unwrap().len(), 1);
        writer.close(&store).unwrap();
    }

    #[test]
    fn a_data_dir_becomes_format_3_with_its_first_record_with_an_expiry() {
        let dir = tempfile::tempdir().unwrap();
        let format = |store: &Store| read_u64(&store.inner.meta, META_FORMAT).unwrap();
        let (store, writer) = open(dir.path());
        runtime().block_on(async {
            writer.put("plain".into(), Bytes::from_static(b"1")).await.unwrap();
            writer.delete("plain".into()).await.unwrap();
            // No expiry anywhere yet: an older kvs can still open it.
            assert_eq!(format(&store), FORMAT_WITHOUT_TTL);
            writer
                .put_if("ttl".into(), Bytes::from_static(b"1"), Some(60_000), merge::Condition::Always)
                .await
                .unwrap();
            assert_eq!(format(&store), FORMAT_VERSION);
        });
        writer.close(&store).unwrap();
        drop((store, writer));
        let (store, writer) = open(dir.path());
        assert_eq!(format(&store), FORMAT_VERSION, "kept across a restart");
        writer.close(&store).unwrap();
    }
}
