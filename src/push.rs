//! Push: every client write goes to every alive peer right away.
//!
//! The API hands each committed write to [`Pusher::enqueue`], which never waits: a
//! full queue drops the record (counted), and sync repairs it later. One dispatcher
//! task drains the queue in batches and copies each batch to one queue per alive peer;
//! one task per peer sends what its queue holds as one request. A slow or dead peer
//! fills only its own queue, so it never holds back the others.

use crate::cluster::Cluster;
use crate::protocol::routes;
use crate::record::Record;
use crate::shutdown::Shutdown;
use crate::stats::Stats;
use crate::wire;
use bytes::{Bytes, BytesMut};
use hyper::Method;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::mpsc;
use tokio::task::JoinSet;

/// Records waiting to be pushed, across all peers.
const QUEUE_BOUND: usize = 16_384;
/// Batches waiting for one peer.
const PEER_QUEUE_BOUND: usize = 64;
/// Most records in one dispatched batch.
const MAX_BATCH: usize = 1_000;
/// Timeout of one push request.
pub const PUSH_TIMEOUT: Duration = Duration::from_secs(5);
/// Longest a stopping node spends handing its queued writes to its peers.
pub const DRAIN_TIMEOUT: Duration = Duration::from_secs(5);

/// The handle the API pushes writes through.
#[derive(Clone)]
pub struct Pusher {
    queue: mpsc::Sender<(String, Record)>,
    stats: Arc<Stats>,
}

impl Pusher {
    /// A pusher and the receiving end for [`run`].
    pub fn new(stats: Arc<Stats>) -> (Pusher, mpsc::Receiver<(String, Record)>) {
        let (queue, rx) = mpsc::channel(QUEUE_BOUND);
        (Pusher { queue, stats }, rx)
    }

    /// Writes waiting in the queue.
    pub fn queue_depth(&self) -> usize {
        self.queue.max_capacity() - self.queue.capacity()
    }

    /// Queues a committed write for every alive peer. Never waits.
    pub fn enqueue(&self, path: String, record: Record) {
        if self.queue.try_send((path, record)).is_err() {
            self.stats.push_dropped.add(1);
        }
    }
}

struct PeerLink {
    address: String,
    queue: mpsc::Sender<(usize, Bytes)>,
}

/// Dispatches queued writes to per-peer senders until `shutdown`; then drains: every
/// write already queued is dispatched, and the senders get up to [`DRAIN_TIMEOUT`] to
/// deliver what they hold. The node triggers this shutdown only after its HTTP server
/// has finished every request, so every write it acknowledged is on its way to the
/// alive peers before it leaves.
pub async fn run(
    mut rx: mpsc::Receiver<(String, Record)>,
    cluster: Arc<Cluster>,
    stats: Arc<Stats>,
    mut shutdown: Shutdown,
) {
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
        let records = batch.len();
        let peers = cluster.alive_peers();
        links.retain(|id, link| peers.iter().any(|p| &p.id == id && p.address == link.address));
        if peers.is_empty() {
            // Nobody to push to: a node that joins later gets these by sync.
            batch.clear();
            continue;
        }
        let mut buf = BytesMut::new();
        for (path, record) in batch.drain(..) {
            wire::put(&mut buf, &path, &record);
        }
        let body = buf.freeze();
        for peer in peers {
            let link = links.entry(peer.id.clone()).or_insert_with(|| {
                let (tx, prx) = mpsc::channel(PEER_QUEUE_BOUND);
                senders.spawn(send_to_peer(peer.address.clone(), prx, cluster.clone(), stats.clone()));
                PeerLink { address: peer.address.clone(), queue: tx }
            });
            if link.queue.try_send((records, body.clone())).is_err() {
                stats.push_dropped.add(records as u64);
            }
        }
        while senders.try_join_next().is_some() {}
    }
    drop(links);
    let delivered = tokio::time::timeout(DRAIN_TIMEOUT, async { while senders.join_next().await.is_some() {} }).await;
    if delivered.is_err() {
        tracing::warn!("stopping: some queued pushes not delivered within the drain time; sync will repair");
        senders.abort_all();
    }
}

/// Sends everything queued for one peer, coalescing queued batches into one request.
async fn send_to_peer(
    address: String,
    mut rx: mpsc::Receiver<(usize, Bytes)>,
    cluster: Arc<Cluster>,
    stats: Arc<Stats>,
) {
    let mut pending = Vec::new();
    while rx.recv_many(&mut pending, PEER_QUEUE_BOUND).await > 0 {
        let records: usize = pending.iter().map(|(n, _)| n).sum();
        let mut body = BytesMut::with_capacity(pending.iter().map(|(_, b)| b.len()).sum());
        for (_, b) in pending.drain(..) {
            body.extend_from_slice(&b);
        }
        let lc = cluster.last_contact();
        match cluster.client().exchange(Method::POST, &address, routes::PUSH, body.freeze(), PUSH_TIMEOUT, lc).await {
            Ok(_) => stats.pushed.add(records as u64),
            Err(e) => {
                stats.push_failed.add(1);
                tracing::debug!(peer = %address, error = %e, records, "push failed; sync will repair");
            }
        }
    }
}
