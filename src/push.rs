//! Push: every client write goes to every alive peer right away.
//!
//! The API hands each committed write to [`Pusher::enqueue`], which never waits: a
//! full queue (by count or by [`QUEUE_BYTES`]) drops the record (counted), and sync
//! repairs it later. One dispatcher task drains the queue, encodes batches of at most
//! [`protocol::MAX_BATCH_BYTES`], and hands each (shared, not copied) to one queue per
//! alive peer; one task per peer sends what its queue holds, coalesced up to the same
//! size. A slow or dead peer fills only its own queue, bounded by [`PEER_QUEUE_BYTES`]
//! (its oldest batches are dropped), so it never holds back the others and never
//! costs more memory than that.

use crate::cluster::Cluster;
use crate::protocol;
use crate::record::Record;
use crate::shutdown::Shutdown;
use crate::stats::Stats;
use crate::wire;
use bytes::{Bytes, BytesMut};
use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::{Notify, mpsc};
use tokio::task::JoinSet;

/// Records waiting to be dispatched, across all peers...
const QUEUE_BOUND: usize = 16_384;
/// ...and their bytes (paths and values): beyond either, a new write is not queued
/// (counted as dropped; sync repairs it).
pub const QUEUE_BYTES: usize = 32 * 1024 * 1024;
/// Bytes of batches waiting for one peer: beyond it the oldest are dropped (counted;
/// sync repairs them), so a slow or paused peer costs at most this much.
pub const PEER_QUEUE_BYTES: usize = 32 * 1024 * 1024;
/// Most records in one dispatched batch (batches are cut by bytes too, see
/// [`protocol::MAX_BATCH_BYTES`]).
const MAX_BATCH: usize = 1_000;
/// Timeout of one push request.
pub const PUSH_TIMEOUT: Duration = Duration::from_secs(5);
/// Longest a stopping node spends handing its queued writes to its peers.
pub const DRAIN_TIMEOUT: Duration = Duration::from_secs(5);

/// How many peers have applied one write, for a client that asked for acknowledgement
/// (`?ack=`): a peer counts once its push answer for a batch holding the write says
/// it stored or already held every record (nothing held back, refused, reawakened or
/// in a timestamp collision: it then holds this version or a newer one, since the peer
/// answers after its commit). A dropped batch or a failed push never counts; only the
/// peers alive when the write was acknowledged here count, each once.
pub struct Ack {
    /// Addresses of the peers that may count, and whether each has.
    peers: Mutex<HashMap<String, bool>>,
    counted: AtomicUsize,
    changed: Notify,
}

impl Ack {
    /// A new count at 0, for the peers alive now.
    pub fn new(cluster: &Cluster) -> Arc<Ack> {
        let peers = cluster.alive_peers().into_iter().map(|p| (p.address, false)).collect();
        Arc::new(Ack { peers: Mutex::new(peers), counted: AtomicUsize::new(0), changed: Notify::new() })
    }

    fn add(&self, peer: &str) {
        let mut peers = self.peers.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(seen) = peers.get_mut(peer)
            && !*seen
        {
            *seen = true;
            self.counted.fetch_add(1, Ordering::SeqCst);
            self.changed.notify_waiters();
        }
    }

    /// Waits until `peers` peers have applied the write, or `timeout`; returns how many
    /// have.
    pub async fn wait(&self, peers: usize, timeout: Duration) -> usize {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let notified = self.changed.notified();
            let now = self.counted.load(Ordering::SeqCst);
            if now >= peers {
                return now;
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                return self.counted.load(Ordering::SeqCst);
            }
        }
    }
}

/// A queued write: path, record, and the acknowledgement count to move, if asked.
type Queued = (String, Record, Option<Arc<Ack>>);

/// The handle the API pushes writes through.
#[derive(Clone)]
pub struct Pusher {
    queue: mpsc::Sender<Queued>,
    stats: Arc<Stats>,
    /// Bytes in `queue`.
    queued: Arc<AtomicUsize>,
    /// Bytes in every peer's queue.
    peer_queued: Arc<AtomicUsize>,
}

/// What [`run`] takes from the [`Pusher`].
pub struct Intake {
    rx: mpsc::Receiver<Queued>,
    queued: Arc<AtomicUsize>,
    peer_queued: Arc<AtomicUsize>,
}

fn size(path: &str, record: &Record) -> usize {
    wire::encoded_len(path, record)
}

impl Pusher {
    /// A pusher and the receiving end for [`run`].
    pub fn new(stats: Arc<Stats>) -> (Pusher, Intake) {
        let (queue, rx) = mpsc::channel(QUEUE_BOUND);
        let (queued, peer_queued) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
        let intake = Intake { rx, queued: queued.clone(), peer_queued: peer_queued.clone() };
        (Pusher { queue, stats, queued, peer_queued }, intake)
    }

    /// Writes waiting in the queue.
    pub fn queue_depth(&self) -> usize {
        self.queue.max_capacity() - self.queue.capacity()
    }

    /// Bytes waiting to be pushed: in the queue and in the peers' queues.
    pub fn queued_bytes(&self) -> usize {
        self.queued.load(Ordering::Relaxed) + self.peer_queued.load(Ordering::Relaxed)
    }

    /// Queues a committed write for every alive peer. Never waits.
    pub fn enqueue(&self, path: String, record: Record) {
        self.enqueue_acked(path, record, None);
    }

    /// [`Self::enqueue`], moving `ack` for each peer that applies the write. Returns
    /// the ack to wait on, or `None` when the write was not queued (no peer will
    /// count it: the caller answers at once).
    pub fn enqueue_acked(&self, path: String, record: Record, ack: Option<Arc<Ack>>) -> Option<Arc<Ack>> {
        let n = size(&path, &record);
        // An empty queue takes a record of any size (one value may exceed the budget).
        let before = self.queued.fetch_add(n, Ordering::Relaxed);
        if before > 0 && before + n > QUEUE_BYTES {
            self.queued.fetch_sub(n, Ordering::Relaxed);
            self.stats.push_dropped.add(1);
            return None;
        }
        if self.queue.try_send((path, record, ack.clone())).is_err() {
            self.queued.fetch_sub(n, Ordering::Relaxed);
            self.stats.push_dropped.add(1);
            return None;
        }
        ack
    }
}

/// An encoded batch for one peer: how many records, the bytes, the acks it moves.
type Batch = (usize, Bytes, Vec<Arc<Ack>>);

/// One peer's queue of encoded batches `(records, bytes, acks)`, bounded by
/// [`PEER_QUEUE_BYTES`]: a full queue drops its oldest batches.
struct PeerQueue {
    state: Mutex<PeerQueueState>,
    ready: Notify,
    total: Arc<AtomicUsize>,
}

#[derive(Default)]
struct PeerQueueState {
    batches: VecDeque<Batch>,
    bytes: usize,
    closed: bool,
}

impl PeerQueue {
    fn new(total: Arc<AtomicUsize>) -> PeerQueue {
        PeerQueue { state: Mutex::new(PeerQueueState::default()), ready: Notify::new(), total }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, PeerQueueState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Adds a batch; returns how many records were dropped to make room.
    fn push(&self, records: usize, batch: Bytes, acks: Vec<Arc<Ack>>) -> usize {
        let mut dropped = 0;
        {
            let mut q = self.lock();
            q.bytes += batch.len();
            self.total.fetch_add(batch.len(), Ordering::Relaxed);
            q.batches.push_back((records, batch, acks));
            while q.bytes > PEER_QUEUE_BYTES && q.batches.len() > 1 {
                if let Some((n, old, _)) = q.batches.pop_front() {
                    q.bytes -= old.len();
                    self.total.fetch_sub(old.len(), Ordering::Relaxed);
                    dropped += n;
                }
            }
        }
        self.ready.notify_one();
        dropped
    }

    /// Takes the oldest batches, up to [`protocol::MAX_BATCH_BYTES`] (at least one),
    /// waiting for one; `None` once closed and empty.
    async fn take(&self) -> Option<(usize, Vec<Bytes>, Vec<Arc<Ack>>)> {
        loop {
            {
                let mut q = self.lock();
                let (mut records, mut taken, mut bytes, mut acks) = (0, Vec::new(), 0usize, Vec::new());
                while let Some((_, b, _)) = q.batches.front() {
                    if !taken.is_empty() && bytes + b.len() > protocol::MAX_BATCH_BYTES {
                        break;
                    }
                    let Some((n, b, a)) = q.batches.pop_front() else { break };
                    bytes += b.len();
                    records += n;
                    taken.push(b);
                    acks.extend(a);
                }
                if !taken.is_empty() {
                    q.bytes -= bytes;
                    self.total.fetch_sub(bytes, Ordering::Relaxed);
                    return Some((records, taken, acks));
                }
                if q.closed {
                    return None;
                }
            }
            self.ready.notified().await;
        }
    }

    /// No more batches will come: the sender delivers what is queued, then ends.
    fn close(&self) {
        self.lock().closed = true;
        self.ready.notify_one();
    }
}

struct PeerLink {
    address: String,
    queue: Arc<PeerQueue>,
}

/// Dispatches queued writes to per-peer senders until `shutdown`; then drains: every
/// write already queued is dispatched, and the senders get up to [`DRAIN_TIMEOUT`] to
/// deliver what they hold. The node triggers this shutdown only after its HTTP server
/// has finished every request, so every write it acknowledged is on its way to the
/// alive peers before it leaves.
pub async fn run(intake: Intake, cluster: Arc<Cluster>, stats: Arc<Stats>, mut shutdown: Shutdown) {
    let Intake { mut rx, queued, peer_queued } = intake;
    let mut links: HashMap<String, PeerLink> = HashMap::new();
    let mut senders = JoinSet::new();
    let mut batch = Vec::with_capacity(MAX_BATCH);
    let mut draining = false;
    loop {
        if draining {
            if rx.recv_many(&mut batch, MAX_BATCH).await == 0 {
                break;
            }
        } else {
            tokio::select! {
                n = rx.recv_many(&mut batch, MAX_BATCH) => if n == 0 { break },
                _ = shutdown.wait() => {
                    // No new writes can come (the server is done): take what is queued.
                    rx.close();
                    draining = true;
                    continue;
                }
            }
        }
        let taken: usize = batch.iter().map(|(p, r, _)| size(p, r)).sum();
        let peers = cluster.alive_peers();
        links.retain(|id, link| {
            let keep = peers.iter().any(|p| &p.id == id && p.address == link.address);
            if !keep {
                link.queue.close();
            }
            keep
        });
        // Encoded in batches of at most MAX_BATCH_BYTES (one record may be larger).
        let mut chunks: Vec<Batch> = Vec::new();
        let mut buf = BytesMut::new();
        let (mut in_buf, mut acks) = (0, Vec::new());
        for (path, record, ack) in batch.drain(..) {
            if in_buf > 0 && buf.len() + size(&path, &record) > protocol::MAX_BATCH_BYTES {
                chunks.push((in_buf, buf.split().freeze(), std::mem::take(&mut acks)));
                in_buf = 0;
            }
            wire::put(&mut buf, &path, &record);
            acks.extend(ack);
            in_buf += 1;
        }
        if in_buf > 0 {
            chunks.push((in_buf, buf.freeze(), acks));
        }
        // Out of the intake queue's budget now; the peers' queues hold them.
        queued.fetch_sub(taken, Ordering::Relaxed);
        // With nobody to push to, a node that joins later gets these by sync.
        for peer in peers {
            let link = links.entry(peer.id.clone()).or_insert_with(|| {
                let queue = Arc::new(PeerQueue::new(peer_queued.clone()));
                senders.spawn(send_to_peer(peer.address.clone(), queue.clone(), cluster.clone(), stats.clone()));
                PeerLink { address: peer.address.clone(), queue }
            });
            for (records, body, acks) in &chunks {
                let dropped = link.queue.push(*records, body.clone(), acks.clone());
                stats.push_dropped.add(dropped as u64);
            }
        }
        while senders.try_join_next().is_some() {}
    }
    for link in links.values() {
        link.queue.close();
    }
    let delivered = tokio::time::timeout(DRAIN_TIMEOUT, async { while senders.join_next().await.is_some() {} }).await;
    if delivered.is_err() {
        tracing::warn!("stopping: some queued pushes not delivered within the drain time; sync will repair");
        senders.abort_all();
    }
}

/// Sends everything queued for one peer, coalescing queued batches into requests of
/// at most [`protocol::MAX_BATCH_BYTES`], until its queue is closed and empty.
async fn send_to_peer(address: String, queue: Arc<PeerQueue>, cluster: Arc<Cluster>, stats: Arc<Stats>) {
    while let Some((records, batches, acks)) = queue.take().await {
        let body = if batches.len() == 1 {
            batches.into_iter().next().unwrap_or_default()
        } else {
            let mut body = BytesMut::with_capacity(batches.iter().map(Bytes::len).sum());
            batches.iter().for_each(|b| body.extend_from_slice(b));
            body.freeze()
        };
        let lc = cluster.last_contact();
        match cluster.client().push(&address, body, PUSH_TIMEOUT, lc).await {
            Ok(answer) => {
                stats.pushed.add(records as u64);
                // Only a batch the peer took whole acknowledges its writes (a record
                // held back as from the future is not applied there).
                let whole = || {
                    serde_json::from_slice::<serde_json::Value>(&answer.body)
                        .is_ok_and(|v| ["held_back", "refused", "collisions", "reawakened"].iter().all(|k| v[*k] == 0))
                };
                if !acks.is_empty() && whole() {
                    acks.iter().for_each(|a| a.add(&address));
                }
            }
            Err(e) => {
                stats.push_failed.add(1);
                tracing::debug!(peer = %address, error = %e, records, "push failed; sync will repair");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_intake_takes_one_record_of_any_size_when_empty() {
        let stats = Arc::new(Stats::default());
        let (pusher, _intake) = Pusher::new(stats.clone());
        let big = Record::value(1, uuid::Uuid::nil(), Bytes::from(vec![b'1'; QUEUE_BYTES + 1]));
        pusher.enqueue("big".into(), big.clone());
        assert_eq!((pusher.queue_depth(), stats.push_dropped.get()), (1, 0), "a 64 MiB value still gets pushed");
        pusher.enqueue("big2".into(), big);
        assert_eq!((pusher.queue_depth(), stats.push_dropped.get()), (1, 1), "but only alone");
        assert!(pusher.queued_bytes() > QUEUE_BYTES);
    }

    #[test]
    fn a_full_peer_queue_drops_its_oldest_batches_and_keeps_its_bytes_bound() {
        let total = Arc::new(AtomicUsize::new(0));
        let q = PeerQueue::new(total.clone());
        let mb = Bytes::from(vec![0u8; 1024 * 1024]);
        let mut dropped = 0;
        for _ in 0..40 {
            dropped += q.push(10, mb.clone(), Vec::new());
        }
        assert_eq!(dropped, 8 * 10, "40 MiB into a 32 MiB queue: the 8 oldest go");
        assert_eq!(total.load(Ordering::Relaxed), PEER_QUEUE_BYTES);
        let huge = Bytes::from(vec![0u8; PEER_QUEUE_BYTES + 1]);
        assert_eq!(q.push(1, huge, Vec::new()), 32 * 10, "one batch larger than the budget still goes out, alone");
        let rt = tokio::runtime::Builder::new_current_thread().build().unwrap();
        let (records, batches, _) = rt.block_on(q.take()).unwrap();
        assert_eq!((records, batches.len()), (1, 1));
        q.push(3, mb.clone(), Vec::new());
        q.push(4, mb, Vec::new());
        q.close();
        let (records, batches, _) = rt.block_on(q.take()).unwrap();
        assert_eq!((records, batches.len()), (7, 2), "coalesced up to MAX_BATCH_BYTES");
        assert!(rt.block_on(q.take()).is_none(), "closed and empty");
        assert_eq!(total.load(Ordering::Relaxed), 0);
    }
}
