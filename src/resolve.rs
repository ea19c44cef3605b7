//! Runs the cluster-wide votes that settle timestamp collisions ([`crate::conflict`]).
//!
//! Whoever applies a record and finds a collision reports it here ([`Resolver::report`],
//! never waiting: a full queue drops it, and the next sync finds it again). One task
//! works through the queue in rounds of up to [`ROUND`] paths: it asks every alive
//! member which version it holds for each path (`POST /internal/v2/vote`, one request per
//! member per round, each with a timeout; a member that does not answer does not
//! vote), adds its own vote, tallies, stores the winner if it held a loser, and pushes
//! the winner so that the other holders of a loser find the collision and vote too.
//! One round per path at a time (a path already queued is not queued again), and a
//! pause between rounds bounds the rate, so a storm of collisions after a partition is
//! worked through without starving client traffic or sync.

use crate::cluster::Cluster;
use crate::conflict::{Settled, Vote, tally};
use crate::push::Pusher;
use crate::record::Record;
use crate::shutdown::Shutdown;
use crate::stats::Stats;
use crate::storage::{Store, Writer};
use std::collections::{BTreeSet, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::mpsc;
use tokio::task::JoinSet;
use uuid::Uuid;

/// Most paths voted on in one round.
pub const ROUND: usize = 100;
/// Collisions waiting for a vote.
const QUEUE_BOUND: usize = 10_000;
/// Pause between rounds: at most `ROUND` paths per pause.
const ROUND_PAUSE: Duration = Duration::from_millis(20);
/// Timeout of one member's answer.
const VOTE_TIMEOUT: Duration = Duration::from_secs(2);

/// A collision waiting for its vote.
#[derive(Debug)]
pub struct Collision {
    path: String,
    local: Record,
    incoming: Record,
}

pub use crate::protocol::{Held, VoteAnswer, VoteRequest};

/// The queue of collisions waiting for a vote.
pub struct Resolver {
    queue: mpsc::Sender<Collision>,
    queued: Mutex<HashSet<String>>,
    /// Collisions settled recently: not voted on again within the cooldown.
    settled: Mutex<Settled>,
    epoch: std::time::Instant,
}

impl Resolver {
    /// A resolver and the receiving end for [`run`].
    pub fn new() -> (Arc<Resolver>, mpsc::Receiver<Collision>) {
        let (queue, rx) = mpsc::channel(QUEUE_BOUND);
        let resolver = Resolver {
            queue,
            queued: Mutex::new(HashSet::new()),
            settled: Mutex::new(Settled::default()),
            epoch: std::time::Instant::now(),
        };
        (Arc::new(resolver), rx)
    }

    fn queued(&self) -> std::sync::MutexGuard<'_, HashSet<String>> {
        self.queued.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn now(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64
    }

    fn settled(&self) -> std::sync::MutexGuard<'_, Settled> {
        self.settled.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Queues collisions for a vote; a path already waiting is not queued twice, and a
    /// collision settled within [`crate::conflict::VOTE_COOLDOWN_MS`] not at all.
    pub fn report(&self, collisions: Vec<(String, Record, Record)>) {
        for (path, local, incoming) in collisions {
            if !self.settled().may_vote(&path, local.timestamp, self.now()) {
                continue;
            }
            if !self.queued().insert(path.clone()) {
                continue;
            }
            if let Err(e) = self.queue.try_send(Collision { path, local, incoming }) {
                let c = match e {
                    mpsc::error::TrySendError::Full(c) | mpsc::error::TrySendError::Closed(c) => c,
                };
                self.queued().remove(&c.path);
            }
        }
    }
}

/// What a node holds for each path, its vote.
pub fn held(store: &Store, paths: &[String]) -> Result<Vec<Option<Held>>, crate::storage::StoreError> {
    paths.iter().map(|p| Ok(store.get(p)?.map(|r| Held { timestamp: r.timestamp, uuid: r.uuid }))).collect()
}

/// Everything a vote round needs.
pub struct Voting {
    /// The queue.
    pub resolver: Arc<Resolver>,
    /// Reads (own vote).
    pub store: Store,
    /// Stores winners.
    pub writer: Writer,
    /// Voters and the peer client.
    pub cluster: Arc<Cluster>,
    /// Spreads winners.
    pub pusher: Pusher,
    /// Counts resolutions by rule.
    pub stats: Arc<Stats>,
}

/// Works through collisions until shutdown.
pub async fn run(mut rx: mpsc::Receiver<Collision>, v: Voting, mut shutdown: Shutdown) {
    let mut batch = Vec::with_capacity(ROUND);
    loop {
        tokio::select! {
            n = rx.recv_many(&mut batch, ROUND) => if n == 0 { return },
            _ = shutdown.wait() => return,
        }
        if let Err(e) = v.round(&batch).await {
            tracing::warn!(error = %e, paths = batch.len(), "vote round failed; sync will find the collisions again");
        }
        {
            let mut queued = v.resolver.queued();
            for c in batch.drain(..) {
                queued.remove(&c.path);
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(ROUND_PAUSE) => {}
            _ = shutdown.wait() => return,
        }
    }
}

impl Voting {
    async fn round(&self, batch: &[Collision]) -> Result<(), crate::storage::StoreError> {
        let paths: Vec<String> = batch.iter().map(|c| c.path.clone()).collect();
        let peers = self.cluster.alive_peers();
        let mut calls = JoinSet::new();
        let request = Arc::new(VoteRequest { paths: paths.clone() });
        for peer in peers {
            let client = self.cluster.client().clone();
            let request = request.clone();
            calls.spawn(async move {
                let answer = client.vote(&peer.address, &request, VOTE_TIMEOUT).await;
                (peer, answer)
            });
        }
        let me = self.cluster.me();
        let store = self.store.clone();
        let own_paths = paths.clone();
        let mine = crate::storage::blocking(move || held(&store, &own_paths)).await?;
        // Every voter: (id, joined_timestamp, answer per path).
        let mut voters: Vec<(String, u64, Vec<Option<Held>>)> =
            vec![(me.id.clone(), me.joined_timestamp, mine.clone())];
        while let Some(joined) = calls.join_next().await {
            match joined {
                Ok((peer, Ok(answer))) if answer.held.len() == paths.len() => {
                    voters.push((peer.id, peer.joined_timestamp, answer.held));
                }
                Ok((peer, Ok(_))) => tracing::warn!(peer = %peer.id, "vote answer of the wrong length ignored"),
                Ok((peer, Err(e))) => tracing::debug!(peer = %peer.id, error = %e, "member did not vote"),
                Err(_) => {}
            }
        }
        for (i, c) in batch.iter().enumerate() {
            self.settle(c, i, &voters, mine[i]).await?;
        }
        Ok(())
    }

    async fn settle(
        &self,
        c: &Collision,
        i: usize,
        voters: &[(String, u64, Vec<Option<Held>>)],
        mine: Option<Held>,
    ) -> Result<(), crate::storage::StoreError> {
        let ts = c.local.timestamp;
        if voters.iter().any(|(_, _, h)| h[i].is_some_and(|h| h.timestamp > ts)) {
            // A newer version exists: it replaces both, no vote needed.
            tracing::debug!(path = %c.path, "collision superseded by a newer version");
            return Ok(());
        }
        let votes: Vec<Vote> = voters
            .iter()
            .map(|(id, joined, h)| Vote {
                voter: id.clone(),
                joined_timestamp: *joined,
                holds: h[i].filter(|h| h.timestamp == ts).map(|h| h.uuid),
            })
            .collect();
        let mut candidates: BTreeSet<Uuid> = [c.local.uuid, c.incoming.uuid].into_iter().collect();
        candidates.extend(votes.iter().filter_map(|v| v.holds));
        let candidates: Vec<Uuid> = candidates.into_iter().collect();
        let outcome = tally(&candidates, &votes);
        let winner = if outcome.winner == c.local.uuid {
            Some(c.local.clone())
        } else if outcome.winner == c.incoming.uuid {
            Some(c.incoming.clone())
        } else {
            self.fetch_winner(&c.path, outcome.winner, voters, i).await
        };
        let Some(winner) = winner else {
            tracing::warn!(path = %c.path, winner = %outcome.winner, "winning version could not be fetched; will retry");
            return Ok(());
        };
        let changed = mine.is_some_and(|m| m.timestamp == ts && m.uuid != winner.uuid)
            && self.writer.replace(c.path.clone(), winner.clone(), Some(ts)).await?;
        self.resolver.settled().note(&c.path, ts, self.resolver.now());
        match outcome.rule {
            crate::conflict::Rule::Majority => self.stats.resolved_majority.add(1),
            crate::conflict::Rule::OldestNode => self.stats.resolved_oldest.add(1),
            crate::conflict::Rule::Fallback => self.stats.resolved_fallback.add(1),
        }
        let vote_map: serde_json::Map<String, serde_json::Value> = votes
            .iter()
            .map(|v| (v.voter.clone(), v.holds.map_or(serde_json::Value::Null, |u| u.to_string().into())))
            .collect();
        tracing::info!(
            path = %c.path,
            timestamp = crate::hlc::ms(ts),
            version = ts,
            versions = %serde_json::json!(candidates.iter().map(Uuid::to_string).collect::<Vec<_>>()),
            votes = %serde_json::Value::Object(vote_map),
            winner = %winner.uuid,
            rule = outcome.rule.as_str(),
            changed,
            "collision resolved"
        );
        self.pusher.enqueue(c.path.clone(), winner);
        Ok(())
    }

    /// Fetches a winning version that neither side of the collision had in hand.
    async fn fetch_winner(
        &self,
        path: &str,
        winner: Uuid,
        voters: &[(String, u64, Vec<Option<Held>>)],
        i: usize,
    ) -> Option<Record> {
        let holders: Vec<String> = voters
            .iter()
            .filter(|(_, _, h)| h[i].is_some_and(|h| h.uuid == winner))
            .map(|(id, _, _)| id.clone())
            .collect();
        for peer in self.cluster.alive_peers().into_iter().filter(|p| holders.contains(&p.id)) {
            let lc = self.cluster.last_contact();
            let Ok(answer) =
                self.cluster.client().fetch_records(&peer.address, &[path.to_string()], VOTE_TIMEOUT, lc).await
            else {
                continue;
            };
            let found = crate::wire::decode(answer.body, u64::MAX)
                .ok()?
                .records
                .into_iter()
                .find(|(p, r)| p == path && r.uuid == winner);
            if let Some((_, r)) = found {
                return Some(r);
            }
        }
        None
    }
}
