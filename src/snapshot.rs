//! Snapshots: a point-in-time copy of a node's replicated state, streamed by
//! `GET /admin/snapshot` and written into an empty data dir by `kvsctl snapshot
//! restore`. ARCHITECTURE.md "Snapshots and restore" has the format and the rules that
//! make a restored node merge with a cluster that moved on; this module keeps them.
//!
//! - [`SnapshotWriter`] / [`SnapshotReader`]: the format, over any `Write` / `Read`,
//!   no storage and no network (unit-tested below).
//! - [`write_snapshot`]: a [`crate::storage::SnapshotView`] into a writer (blocking).
//! - [`verify_file`] and [`restore`]: check a whole file, then restore it.
//! - [`ChannelWriter`] and [`Snapshots`]: what the HTTP handler streams through.

use crate::record::Record;
use crate::storage::{Store, StoreError, Writer};
use bytes::Bytes;
use sha2::{Digest, Sha256};
use std::io::{self, Read, Seek, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use uuid::Uuid;

/// The first 8 bytes of every snapshot.
pub const MAGIC: &[u8; 8] = b"KVS-SNAP";
/// The first 8 bytes of the trailer.
const TRAILER_MAGIC: &[u8; 8] = b"KVS-END!";
/// The snapshot format this kvs writes and reads.
pub const FORMAT: u32 = 1;
/// Compression 1: the entries are one LZ4 frame.
const LZ4_FRAME: u32 = 1;
/// Magic, format, compression.
pub const HEADER_LEN: u64 = 16;
/// Trailer magic and the SHA-256 of every byte before it.
pub const TRAILER_LEN: u64 = 40;

const TAG_END: u8 = 0;
const TAG_FACT: u8 = 1;
const TAG_RECORD: u8 = 2;
const TAG_CERTIFICATE: u8 = 3;
/// The largest entry a reader takes: a record of the largest value kvs stores, with
/// its key and header. A length beyond it is corruption, not an allocation.
const MAX_ENTRY: u32 = (crate::config::MAX_VALUE_BYTES_LIMIT as u32) + 4096;
/// A restore hands the writer batches of at most this many bytes of records.
const RESTORE_BATCH_BYTES: usize = 4 << 20;
/// ... or this many entries.
const RESTORE_BATCH_ENTRIES: usize = 10_000;
/// Marks a data dir whose restore has not finished: the node refuses to start on it.
pub const RESTORE_MARKER: &str = "restore.incomplete";

/// What can go wrong with a snapshot.
#[derive(Debug)]
pub enum SnapshotError {
    /// Reading or writing a file or a stream failed.
    Io(String),
    /// The bytes are not a complete, intact snapshot this kvs reads.
    Corrupt(String),
    /// The data dir to restore into cannot be used (not empty, not a directory).
    Target(String),
    /// Storage failed.
    Store(StoreError),
}

impl std::fmt::Display for SnapshotError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            SnapshotError::Io(e) => write!(f, "{e}"),
            SnapshotError::Corrupt(e) => write!(f, "not a usable snapshot: {e}"),
            SnapshotError::Target(e) => write!(f, "{e}"),
            SnapshotError::Store(e) => write!(f, "{e}"),
        }
    }
}

impl From<StoreError> for SnapshotError {
    fn from(e: StoreError) -> Self {
        SnapshotError::Store(e)
    }
}

impl From<io::Error> for SnapshotError {
    fn from(e: io::Error) -> Self {
        SnapshotError::Io(e.to_string())
    }
}

fn corrupt(what: impl Into<String>) -> SnapshotError {
    SnapshotError::Corrupt(what.into())
}

/// The facts a snapshot carries beside its records (ARCHITECTURE.md).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Facts {
    /// The `node_id` of the node it was taken on.
    pub node_id: String,
    /// When it was taken (Unix ms, that node's clock).
    pub created_ms: u64,
    /// The data dir format of its records ([`crate::storage::FORMAT_VERSION`]).
    pub data_format: u64,
    /// The last timestamp the node handed out (an HLC).
    pub last_timestamp: u64,
    /// A format-1 purge horizon (0: none).
    pub gc_horizon: u64,
    /// When the node last had the cluster's data (an HLC; 0: never).
    pub last_contact: u64,
    /// The node's change feed `last_seq`.
    pub last_seq: u64,
}

impl Facts {
    fn entries(&self) -> Vec<(&'static str, Vec<u8>)> {
        vec![
            ("node_id", self.node_id.as_bytes().to_vec()),
            ("created_ms", self.created_ms.to_be_bytes().to_vec()),
            ("data_format", self.data_format.to_be_bytes().to_vec()),
            ("last_timestamp", self.last_timestamp.to_be_bytes().to_vec()),
            ("gc_horizon", self.gc_horizon.to_be_bytes().to_vec()),
            ("last_contact", self.last_contact.to_be_bytes().to_vec()),
            ("last_seq", self.last_seq.to_be_bytes().to_vec()),
        ]
    }

    /// Takes one fact; unknown names are skipped (a later format may add facts).
    fn take(&mut self, name: &str, value: &[u8]) -> Result<(), SnapshotError> {
        let u64_of = |v: &[u8]| {
            <[u8; 8]>::try_from(v).map(u64::from_be_bytes).map_err(|_| corrupt(format!("fact {name}: not 8 bytes")))
        };
        match name {
            "node_id" => {
                self.node_id = String::from_utf8(value.to_vec()).map_err(|_| corrupt("fact node_id: not UTF-8"))?
            }
            "created_ms" => self.created_ms = u64_of(value)?,
            "data_format" => self.data_format = u64_of(value)?,
            "last_timestamp" => self.last_timestamp = u64_of(value)?,
            "gc_horizon" => self.gc_horizon = u64_of(value)?,
            "last_contact" => self.last_contact = u64_of(value)?,
            "last_seq" => self.last_seq = u64_of(value)?,
            _ => {}
        }
        Ok(())
    }
}

/// A writer that hashes and counts what passes through it.
struct Hashing<W> {
    inner: W,
    hash: Sha256,
    bytes: u64,
}

impl<W: Write> Write for Hashing<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.hash.update(&buf[..n]);
        self.bytes += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

/// Writes a snapshot: the header, then entries (facts first, records in path order,
/// certificates in path order), then [`SnapshotWriter::finish`] for the end entry and
/// the trailer.
pub struct SnapshotWriter<W: Write> {
    enc: lz4_flex::frame::FrameEncoder<Hashing<W>>,
    records: u64,
    certificates: u64,
}

impl<W: Write> SnapshotWriter<W> {
    /// Writes the header and the facts.
    pub fn new(out: W, facts: &Facts) -> io::Result<SnapshotWriter<W>> {
        let mut h = Hashing { inner: out, hash: Sha256::new(), bytes: 0 };
        h.write_all(MAGIC)?;
        h.write_all(&FORMAT.to_be_bytes())?;
        h.write_all(&LZ4_FRAME.to_be_bytes())?;
        let mut w = SnapshotWriter { enc: lz4_flex::frame::FrameEncoder::new(h), records: 0, certificates: 0 };
        for (name, value) in facts.entries() {
            let mut payload = vec![name.len() as u8];
            payload.extend_from_slice(name.as_bytes());
            payload.extend_from_slice(&value);
            w.entry(TAG_FACT, &[&payload])?;
        }
        Ok(w)
    }

    fn entry(&mut self, tag: u8, parts: &[&[u8]]) -> io::Result<()> {
        let len: usize = parts.iter().map(|p| p.len()).sum();
        let len = u32::try_from(len).map_err(|_| io::Error::other("snapshot entry over 4 GiB"))?;
        self.enc.write_all(&[tag])?;
        self.enc.write_all(&len.to_be_bytes())?;
        for p in parts {
            self.enc.write_all(p)?;
        }
        Ok(())
    }

    /// One record, as stored.
    pub fn record(&mut self, path: &str, record: &Record) -> io::Result<()> {
        let path_len = u16::try_from(path.len()).map_err(|_| io::Error::other("key over 64 KiB"))?;
        self.entry(TAG_RECORD, &[&path_len.to_be_bytes(), path.as_bytes(), &record.encode()])?;
        self.records += 1;
        Ok(())
    }

    /// One certificate of a purged delete.
    pub fn certificate(&mut self, path: &str, timestamp: u64, uuid: Uuid) -> io::Result<()> {
        let path_len = u16::try_from(path.len()).map_err(|_| io::Error::other("key over 64 KiB"))?;
        self.entry(
            TAG_CERTIFICATE,
            &[&path_len.to_be_bytes(), path.as_bytes(), &timestamp.to_be_bytes(), uuid.as_bytes()],
        )?;
        self.certificates += 1;
        Ok(())
    }

    /// Bytes written so far (compressed, header included).
    pub fn bytes(&self) -> u64 {
        self.enc.get_ref().bytes
    }

    /// Writes the end entry and the trailer; returns the output and the snapshot's
    /// size in bytes.
    pub fn finish(mut self) -> io::Result<(W, u64)> {
        let (records, certificates) = (self.records, self.certificates);
        self.entry(TAG_END, &[&records.to_be_bytes(), &certificates.to_be_bytes()])?;
        let h = self.enc.finish().map_err(io::Error::from)?;
        let Hashing { mut inner, hash, bytes } = h;
        inner.write_all(TRAILER_MAGIC)?;
        inner.write_all(&hash.finalize())?;
        inner.flush()?;
        Ok((inner, bytes + TRAILER_LEN))
    }
}

/// One entry of a snapshot.
#[derive(Debug, Clone, PartialEq)]
pub enum Entry {
    /// A record: path and version.
    Record(String, Record),
    /// A certificate of a purged delete: path, timestamp, uuid.
    Certificate(String, u64, Uuid),
}

/// Reads a snapshot's entries. It checks the header, the framing, each entry, the
/// order of paths and the end entry's counts; the checksum is [`verify_file`]'s (a
/// reader over a stream cannot know where the trailer starts).
pub struct SnapshotReader<R: Read> {
    dec: lz4_flex::frame::FrameDecoder<R>,
    facts: Facts,
    pending: Option<(u8, Vec<u8>)>,
    records: u64,
    certificates: u64,
    last: Option<(u8, String)>,
    ended: bool,
}

fn read_exact_or(r: &mut impl Read, buf: &mut [u8], what: &str) -> Result<(), SnapshotError> {
    r.read_exact(buf).map_err(|e| match e.kind() {
        io::ErrorKind::UnexpectedEof => corrupt(format!("truncated in {what}")),
        _ => corrupt(format!("{what}: {e}")),
    })
}

/// Checks a snapshot header.
fn check_header(h: &[u8; HEADER_LEN as usize]) -> Result<(), SnapshotError> {
    if &h[..8] != MAGIC {
        return Err(corrupt("it does not start with KVS-SNAP: not a kvs snapshot"));
    }
    let format = u32::from_be_bytes([h[8], h[9], h[10], h[11]]);
    if format != FORMAT {
        return Err(corrupt(format!("snapshot format {format}; this kvs reads format {FORMAT}: use a newer kvsctl")));
    }
    let compression = u32::from_be_bytes([h[12], h[13], h[14], h[15]]);
    if compression != LZ4_FRAME {
        return Err(corrupt(format!("unknown compression {compression}")));
    }
    Ok(())
}

impl<R: Read> SnapshotReader<R> {
    /// Reads the header and the facts. `input` must end where the trailer starts.
    pub fn open(mut input: R) -> Result<SnapshotReader<R>, SnapshotError> {
        let mut header = [0u8; HEADER_LEN as usize];
        read_exact_or(&mut input, &mut header, "the header")?;
        check_header(&header)?;
        let mut r = SnapshotReader {
            dec: lz4_flex::frame::FrameDecoder::new(input),
            facts: Facts::default(),
            pending: None,
            records: 0,
            certificates: 0,
            last: None,
            ended: false,
        };
        loop {
            let (tag, payload) = r.raw_entry()?;
            if tag != TAG_FACT {
                r.pending = Some((tag, payload));
                break;
            }
            let name_len = *payload.first().ok_or_else(|| corrupt("empty fact"))? as usize;
            let name = payload.get(1..1 + name_len).ok_or_else(|| corrupt("fact name past its entry"))?;
            let name = std::str::from_utf8(name).map_err(|_| corrupt("fact name not UTF-8"))?.to_string();
            r.facts.take(&name, &payload[1 + name_len..])?;
        }
        Ok(r)
    }

    /// The facts.
    pub fn facts(&self) -> &Facts {
        &self.facts
    }

    fn raw_entry(&mut self) -> Result<(u8, Vec<u8>), SnapshotError> {
        let mut head = [0u8; 5];
        read_exact_or(&mut self.dec, &mut head, "an entry")?;
        let len = u32::from_be_bytes([head[1], head[2], head[3], head[4]]);
        if len > MAX_ENTRY {
            return Err(corrupt(format!("an entry of {len} bytes (at most {MAX_ENTRY})")));
        }
        let mut payload = vec![0u8; len as usize];
        read_exact_or(&mut self.dec, &mut payload, "an entry")?;
        Ok((head[0], payload))
    }

    /// The next record or certificate; `None` after the end entry, once its counts
    /// matched and nothing follows it.
    pub fn next_entry(&mut self) -> Result<Option<Entry>, SnapshotError> {
        if self.ended {
            return Ok(None);
        }
        let (tag, payload) = match self.pending.take() {
            Some(e) => e,
            None => self.raw_entry()?,
        };
        if tag == TAG_END {
            let counts = <[u8; 16]>::try_from(payload.as_slice()).map_err(|_| corrupt("end entry not 16 bytes"))?;
            let records = u64::from_be_bytes(counts[..8].try_into().unwrap_or_default());
            let certificates = u64::from_be_bytes(counts[8..].try_into().unwrap_or_default());
            if (records, certificates) != (self.records, self.certificates) {
                return Err(corrupt(format!(
                    "the end entry counts {records} records and {certificates} certificates, the file holds {} and {}",
                    self.records, self.certificates
                )));
            }
            let mut rest = [0u8; 1];
            match self.dec.read(&mut rest) {
                Ok(0) => {}
                Ok(_) => return Err(corrupt("data after the end entry")),
                Err(e) => return Err(corrupt(format!("after the end entry: {e}"))),
            }
            self.ended = true;
            return Ok(None);
        }
        let path_len = payload.get(..2).map(|b| u16::from_be_bytes([b[0], b[1]]) as usize);
        let path_len = path_len.ok_or_else(|| corrupt("entry shorter than its key length"))?;
        let path = payload.get(2..2 + path_len).ok_or_else(|| corrupt("key past its entry"))?;
        let path = String::from_utf8(path.to_vec()).map_err(|_| corrupt("key not UTF-8"))?;
        crate::path::validate_stored_key(&path).map_err(|e| corrupt(format!("key {path:?}: {e}")))?;
        let body = &payload[2 + path_len..];
        // Paths come in strictly increasing order per kind: a duplicate or a shuffled
        // file is not one this kvs wrote.
        if let Some((last_tag, last)) = &self.last
            && *last_tag == tag
            && *last >= path
        {
            return Err(corrupt(format!("key {path:?} out of order")));
        }
        let entry = match tag {
            TAG_RECORD => {
                let record =
                    Record::decode(body).map_err(|e| corrupt(format!("record {path:?} undecodable ({e:?})")))?;
                self.records += 1;
                Entry::Record(path.clone(), record)
            }
            TAG_CERTIFICATE => {
                let (ts, uuid) = match (body.get(..8), body.get(8..).and_then(|u| Uuid::from_slice(u).ok())) {
                    (Some(ts), Some(uuid)) if body.len() == 24 => {
                        (u64::from_be_bytes(ts.try_into().unwrap_or_default()), uuid)
                    }
                    _ => return Err(corrupt(format!("certificate {path:?}: not 24 bytes"))),
                };
                self.certificates += 1;
                Entry::Certificate(path.clone(), ts, uuid)
            }
            other => return Err(corrupt(format!("unknown entry tag {other}"))),
        };
        self.last = Some((tag, path));
        Ok(Some(entry))
    }
}

/// Checks that `file` is a whole snapshot: its header, and a trailer whose SHA-256
/// matches every byte before it. Returns the file's size.
pub fn verify_file(file: &mut std::fs::File) -> Result<u64, SnapshotError> {
    let len = file.metadata()?.len();
    if len < HEADER_LEN + TRAILER_LEN {
        return Err(corrupt(format!("truncated: {len} bytes")));
    }
    file.rewind()?;
    let mut header = [0u8; HEADER_LEN as usize];
    read_exact_or(file, &mut header, "the header")?;
    check_header(&header)?;
    file.rewind()?;
    let mut hasher = Hashing { inner: io::sink(), hash: Sha256::new(), bytes: 0 };
    io::copy(&mut (&mut *file).take(len - TRAILER_LEN), &mut hasher)?;
    let mut trailer = [0u8; TRAILER_LEN as usize];
    read_exact_or(file, &mut trailer, "the trailer")?;
    if &trailer[..8] != TRAILER_MAGIC {
        return Err(corrupt("no trailer at its end: the file is truncated (an interrupted download?)"));
    }
    if trailer[8..] != hasher.hash.finalize()[..] {
        return Err(corrupt("its checksum does not match: the file is corrupt"));
    }
    Ok(len)
}

/// Writes a snapshot of `store` (one fjall snapshot) to `out`, stopping with an error
/// when `stop` says so. Blocking: run it off the async workers.
pub fn write_snapshot<W: Write>(
    store: &Store,
    node_id: &str,
    out: W,
    stop: &dyn Fn() -> bool,
) -> Result<(W, u64), SnapshotError> {
    let view = store.snapshot_view();
    let (last_timestamp, gc_horizon, last_seq) = view.storage_facts()?;
    let facts = Facts {
        node_id: node_id.to_string(),
        created_ms: crate::clock::now_ms(),
        data_format: store.format(),
        last_timestamp,
        gc_horizon,
        last_contact: view.meta_u64(crate::replication::META_LAST_CONTACT)?,
        last_seq,
    };
    let mut w = SnapshotWriter::new(out, &facts)?;
    let stopped = || SnapshotError::Io("the node is stopping".into());
    for (i, r) in view.records().enumerate() {
        let (path, record) = r?;
        w.record(&path, &record)?;
        if i % 1024 == 0 && stop() {
            return Err(stopped());
        }
    }
    for (i, c) in view.certificates().enumerate() {
        let (path, ts, uuid) = c?;
        w.certificate(&path, ts, uuid)?;
        if i % 1024 == 0 && stop() {
            return Err(stopped());
        }
    }
    Ok(w.finish()?)
}

/// What a restore did.
#[derive(Debug, Clone)]
pub struct Restored {
    /// The snapshot's facts.
    pub facts: Facts,
    /// Records written.
    pub records: u64,
    /// Certificates of purged deletes written.
    pub certificates: u64,
}

enum Batch {
    Facts(Facts),
    Entries(Vec<(String, Record)>, Vec<(String, u64, Uuid)>, u64),
}

/// Restores the snapshot in `file` into `dir`, which must be absent or empty: checks
/// the whole file first and writes nothing unless it is intact; on any later error
/// removes what it wrote. `progress` is told the bytes of the file read so far. See
/// ARCHITECTURE.md "Snapshots and restore" for what the restored dir holds.
pub async fn restore(
    file: PathBuf,
    dir: PathBuf,
    progress: impl Fn(u64) + Send + Sync + 'static,
) -> Result<Restored, SnapshotError> {
    let existed = match std::fs::read_dir(&dir) {
        Ok(mut entries) => {
            if entries.next().is_some() {
                return Err(SnapshotError::Target(format!(
                    "{} is not empty: restore only into an empty or new data dir",
                    dir.display()
                )));
            }
            true
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => false,
        Err(e) => return Err(SnapshotError::Target(format!("cannot use {} as a data dir: {e}", dir.display()))),
    };
    let f = file.clone();
    let opened = tokio::task::spawn_blocking(move || -> Result<(std::fs::File, u64), SnapshotError> {
        let mut file = std::fs::File::open(&f).map_err(|e| SnapshotError::Io(format!("{}: {e}", f.display())))?;
        let len = verify_file(&mut file)?;
        file.rewind()?;
        Ok((file, len))
    })
    .await
    .map_err(|e| SnapshotError::Io(e.to_string()))?;
    let (file, len) = opened?;
    let result = restore_into(file, len, &dir, progress).await;
    if result.is_err() {
        // Leave the directory as it was found: absent, or empty.
        if existed {
            if let Ok(entries) = std::fs::read_dir(&dir) {
                for e in entries.flatten() {
                    let p = e.path();
                    let _ = if p.is_dir() { std::fs::remove_dir_all(&p) } else { std::fs::remove_file(&p) };
                }
            }
        } else {
            let _ = std::fs::remove_dir_all(&dir);
        }
    }
    result
}

async fn restore_into(
    file: std::fs::File,
    len: u64,
    dir: &Path,
    progress: impl Fn(u64) + Send + Sync + 'static,
) -> Result<Restored, SnapshotError> {
    let d = dir.to_path_buf();
    let (store, writer) = tokio::task::spawn_blocking(move || {
        Store::open(&d, crate::config::Durability::Buffer, crate::config::DEFAULT_MAX_CLOCK_OFFSET_MS)
    })
    .await
    .map_err(|e| SnapshotError::Io(e.to_string()))??;
    let outcome = fill(file, len, dir, &writer, progress).await;
    let (s, w) = (store.clone(), writer.clone());
    let closed =
        tokio::task::spawn_blocking(move || w.close(&s)).await.map_err(|e| SnapshotError::Io(e.to_string()))?;
    drop(store);
    let restored = outcome?;
    closed?;
    // Only now is the data dir one a node may start on.
    std::fs::remove_file(dir.join(RESTORE_MARKER))?;
    std::fs::File::open(dir)?.sync_all()?;
    Ok(restored)
}

async fn fill(
    file: std::fs::File,
    len: u64,
    dir: &Path,
    writer: &Writer,
    progress: impl Fn(u64) + Send + Sync + 'static,
) -> Result<Restored, SnapshotError> {
    let marker = dir.join(RESTORE_MARKER);
    std::fs::File::create(&marker)?.sync_all()?;
    std::fs::File::open(dir)?.sync_all()?;
    let (tx, mut rx) = tokio::sync::mpsc::channel::<Batch>(2);
    let reader = tokio::task::spawn_blocking(move || -> Result<(), SnapshotError> {
        let counted = CountingReader { inner: io::BufReader::new(file).take(len - TRAILER_LEN), read: 0 };
        let mut r = SnapshotReader::open(counted)?;
        if tx.blocking_send(Batch::Facts(r.facts().clone())).is_err() {
            return Ok(());
        }
        loop {
            let (mut records, mut certs, mut bytes) = (Vec::new(), Vec::new(), 0usize);
            let mut done = false;
            while bytes < RESTORE_BATCH_BYTES && records.len() + certs.len() < RESTORE_BATCH_ENTRIES {
                match r.next_entry()? {
                    Some(Entry::Record(p, rec)) => {
                        bytes += p.len() + rec.data.as_ref().map_or(0, |d| d.len());
                        records.push((p, rec));
                    }
                    Some(Entry::Certificate(p, ts, uuid)) => certs.push((p, ts, uuid)),
                    None => {
                        done = true;
                        break;
                    }
                }
            }
            let read = r.dec.get_ref().read;
            if tx.blocking_send(Batch::Entries(records, certs, read)).is_err() || done {
                return Ok(());
            }
        }
    });
    let mut facts = None;
    let (mut records, mut certificates) = (0u64, 0u64);
    while let Some(batch) = rx.recv().await {
        match batch {
            Batch::Facts(f) => {
                if f.data_format > crate::storage::FORMAT_VERSION {
                    return Err(corrupt(format!(
                        "its records are data format {}, newer than this kvs writes ({}): use a newer kvsctl",
                        f.data_format,
                        crate::storage::FORMAT_VERSION
                    )));
                }
                facts = Some(f);
            }
            Batch::Entries(r, c, read) => {
                records += r.len() as u64;
                certificates += c.len() as u64;
                writer.restore(r, c).await?;
                progress(read);
            }
        }
    }
    reader.await.map_err(|e| SnapshotError::Io(e.to_string()))??;
    let facts = facts.ok_or_else(|| corrupt("no facts"))?;
    writer.restore_facts(facts.last_timestamp, facts.gc_horizon, facts.last_seq).await?;
    writer
        .set_meta(crate::replication::META_LAST_CONTACT, Bytes::copy_from_slice(&facts.last_contact.to_be_bytes()))
        .await?;
    writer
        .set_meta(crate::replication::META_SNAPSHOT_TAKEN, Bytes::copy_from_slice(&facts.created_ms.to_be_bytes()))
        .await?;
    writer.set_meta(crate::replication::META_BOOTSTRAPPED, Bytes::from_static(crate::replication::RESTORED)).await?;
    progress(len);
    Ok(Restored { facts, records, certificates })
}

struct CountingReader<R> {
    inner: R,
    read: u64,
}

impl<R: Read> Read for CountingReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.read += n as u64;
        Ok(n)
    }
}

/// A `Write` that hands its bytes, in chunks of `CHUNK`, to an async receiver (the
/// HTTP body of `GET /admin/snapshot`): the channel's bound is the stream's buffer,
/// a dropped receiver (the client went away) fails the next write, and so does a
/// client that takes nothing for `SEND_STALL` (the snapshot, its thread and its
/// fjall snapshot are not held for a reader that stopped reading).
pub struct ChannelWriter {
    tx: tokio::sync::mpsc::Sender<Bytes>,
    buf: Vec<u8>,
    runtime: tokio::runtime::Handle,
}

/// Longest wait for the connection to take a chunk.
const SEND_STALL: std::time::Duration = std::time::Duration::from_secs(30);

/// Bytes per chunk sent to the HTTP body.
const CHUNK: usize = 256 << 10;
/// Chunks queued between the snapshot thread and the connection: 2 MiB per snapshot.
pub const CHANNEL_CHUNKS: usize = 8;

impl ChannelWriter {
    /// A writer into `tx`, used from a blocking thread of `runtime`.
    pub fn new(tx: tokio::sync::mpsc::Sender<Bytes>, runtime: tokio::runtime::Handle) -> ChannelWriter {
        ChannelWriter { tx, buf: Vec::with_capacity(CHUNK), runtime }
    }

    fn send(&mut self) -> io::Result<()> {
        if self.buf.is_empty() {
            return Ok(());
        }
        let chunk = Bytes::from(std::mem::replace(&mut self.buf, Vec::with_capacity(CHUNK)));
        match self.runtime.block_on(tokio::time::timeout(SEND_STALL, self.tx.send(chunk))) {
            Ok(Ok(())) => Ok(()),
            Ok(Err(_)) => Err(io::Error::new(io::ErrorKind::BrokenPipe, "the client went away")),
            Err(_) => Err(io::Error::new(io::ErrorKind::TimedOut, "the client took nothing for 30 s")),
        }
    }
}

impl Write for ChannelWriter {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        let room = CHUNK - self.buf.len();
        let n = data.len().min(room);
        self.buf.extend_from_slice(&data[..n]);
        if self.buf.len() >= CHUNK {
            self.send()?;
        }
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.send()
    }
}

/// One snapshot at a time per node: each holds a fjall snapshot (old versions stay on
/// disk while it runs) and a thread of the blocking pool. Stops with the node.
pub struct Snapshots {
    busy: AtomicBool,
    shutdown: crate::shutdown::Shutdown,
}

/// Held while a snapshot runs; frees the slot when dropped.
pub struct SnapshotSlot(Arc<Snapshots>);

impl Snapshots {
    /// Snapshots that stop when `shutdown` triggers.
    pub fn new(shutdown: crate::shutdown::Shutdown) -> Arc<Snapshots> {
        Arc::new(Snapshots { busy: AtomicBool::new(false), shutdown })
    }

    /// The slot, unless a snapshot is already running.
    pub fn try_start(self: &Arc<Self>) -> Option<SnapshotSlot> {
        (!self.busy.swap(true, Ordering::AcqRel)).then(|| SnapshotSlot(self.clone()))
    }
}

impl SnapshotSlot {
    /// The node is stopping: a running snapshot ends (without its trailer).
    pub fn stopping(&self) -> bool {
        self.0.shutdown.is_triggered()
    }
}

impl Drop for SnapshotSlot {
    fn drop(&mut self) {
        self.0.busy.store(false, Ordering::Release);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn facts() -> Facts {
        Facts {
            node_id: "n1".into(),
            created_ms: 1_700_000_000_000,
            data_format: 3,
            last_timestamp: 7 << 16,
            gc_horizon: 0,
            last_contact: 5 << 16,
            last_seq: 42,
        }
    }

    fn sample() -> Vec<u8> {
        let mut w = SnapshotWriter::new(Vec::new(), &facts()).unwrap();
        w.record("a", &Record::value(1 << 16, Uuid::from_u128(1), Bytes::from_static(b"{\"x\":1}"))).unwrap();
        w.record("b/c", &Record::tombstone(2 << 16, Uuid::from_u128(2))).unwrap();
        w.certificate("gone", 3 << 16, Uuid::from_u128(3)).unwrap();
        let (out, len) = w.finish().unwrap();
        assert_eq!(out.len() as u64, len);
        out
    }

    fn read_all(bytes: &[u8]) -> Result<(Facts, Vec<Entry>), SnapshotError> {
        let body = &bytes[..bytes.len().saturating_sub(TRAILER_LEN as usize)];
        let mut r = SnapshotReader::open(body)?;
        let mut out = Vec::new();
        while let Some(e) = r.next_entry()? {
            out.push(e);
        }
        Ok((r.facts().clone(), out))
    }

    fn verify_bytes(bytes: &[u8]) -> Result<u64, SnapshotError> {
        let mut f = tempfile::tempfile().unwrap();
        f.write_all(bytes).unwrap();
        verify_file(&mut f)
    }

    #[test]
    fn a_snapshot_reads_back_what_was_written() {
        let bytes = sample();
        assert_eq!(&bytes[..8], MAGIC);
        assert_eq!(verify_bytes(&bytes).unwrap(), bytes.len() as u64);
        let (f, entries) = read_all(&bytes).unwrap();
        assert_eq!(f, facts());
        assert_eq!(entries.len(), 3);
        assert!(matches!(&entries[0], Entry::Record(p, r) if p == "a" && r.data.as_deref() == Some(&b"{\"x\":1}"[..])));
        assert!(matches!(&entries[1], Entry::Record(p, r) if p == "b/c" && r.is_tombstone()));
        assert_eq!(entries[2], Entry::Certificate("gone".into(), 3 << 16, Uuid::from_u128(3)));
    }

    #[test]
    fn every_truncation_and_every_flipped_byte_is_refused() {
        let bytes = sample();
        for cut in 0..bytes.len() {
            assert!(verify_bytes(&bytes[..cut]).is_err(), "truncated at {cut} passed");
        }
        for i in 0..bytes.len() {
            let mut b = bytes.clone();
            b[i] ^= 0x40;
            assert!(verify_bytes(&b).is_err(), "a flipped byte at {i} passed");
        }
    }

    #[test]
    fn the_reader_refuses_what_the_writer_never_makes() {
        let mut b = sample();
        b[11] = 2;
        assert!(matches!(read_all(&b), Err(SnapshotError::Corrupt(m)) if m.contains("format 2")));
        let mut b = sample();
        b[0] = b'X';
        assert!(read_all(&b).is_err());
        // Out of order and duplicate keys.
        let mut w = SnapshotWriter::new(Vec::new(), &facts()).unwrap();
        w.record("b", &Record::tombstone(1, Uuid::from_u128(1))).unwrap();
        w.record("a", &Record::tombstone(1, Uuid::from_u128(1))).unwrap();
        let (out, _) = w.finish().unwrap();
        assert!(matches!(read_all(&out), Err(SnapshotError::Corrupt(m)) if m.contains("out of order")));
        // A bad key.
        let mut w = SnapshotWriter::new(Vec::new(), &facts()).unwrap();
        w.record("a//b", &Record::tombstone(1, Uuid::from_u128(1))).unwrap();
        let (out, _) = w.finish().unwrap();
        assert!(read_all(&out).is_err());
        // A stream cut before its end entry (the node stopped mid-snapshot).
        let bytes = sample();
        assert!(read_all(&bytes[..bytes.len() - 60]).is_err());
    }
}
