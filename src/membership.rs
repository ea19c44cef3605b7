//! Cluster membership rules: merge, status, removal, peer choice. No I/O: the clock
//! (`now`, Unix ms) and the RNG are passed in, so the rules are tested directly.
//!
//! Each member has a version `(incarnation, heartbeat)`. The incarnation is set when a
//! node process starts (higher than any before it); the heartbeat counts that
//! process's gossip rounds. Only the member itself raises its version, so a higher
//! version is always fresher news, wherever it comes from. Merging keeps the higher
//! version and notes, on the local clock, when we last heard fresher news (`heard`):
//! a member not heard of for `failure_timeout` is `down`; after `removal_timeout` it
//! is removed. Wall-clock `last_seen` is only reported, never compared across nodes.
//!
//! A member that leaves, or is removed, goes to the graveyard with the version it had:
//! gossip about it at that version or older is stale and ignored, so it cannot come
//! back; a higher version (it restarted, or a partition healed) brings it back alive.
//! Leaves are gossiped (as `left` entries) so members that missed the leave drop it
//! too; graves are forgotten after `removal_timeout`.

use crate::config::{check_host_port, check_node_id};
use rand::Rng;
use rand::seq::SliceRandom;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// What a node says about a member in gossip.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemberInfo {
    /// The member's `node_id`.
    pub id: String,
    /// Random identity of the member's data dir: tells a restart of the same node from
    /// another node claiming the same `node_id`.
    pub uid: String,
    /// `host:port` to reach it.
    pub address: String,
    /// When it first joined (Unix ms); decides the oldest node in conflict votes.
    pub joined_timestamp: u64,
    /// Raised at every process start.
    pub incarnation: u64,
    /// Raised at every gossip round of that process.
    pub heartbeat: u64,
    /// The member announced it is leaving.
    #[serde(default)]
    pub left: bool,
    /// Timestamp of the newest write the member holds (for catch-up decisions).
    #[serde(default)]
    pub newest_write: u64,
    /// The newest delete the member purged without keeping a certificate (a data dir
    /// upgraded from format 1; for the stale rule).
    #[serde(default)]
    pub gc_horizon: u64,
    /// The member is bootstrapping (mode `syncing`) and cannot serve data yet.
    #[serde(default)]
    pub syncing: bool,
}

impl MemberInfo {
    /// The freshness of this news about the member.
    pub fn version(&self) -> (u64, u64) {
        (self.incarnation, self.heartbeat)
    }
}

/// A member's status as this node sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    /// Heard of within `failure_timeout`.
    Alive,
    /// Not heard of for `failure_timeout`; not chosen for data exchange.
    Down,
}

#[derive(Debug, Clone)]
struct Entry {
    info: MemberInfo,
    /// Local time (ms) we last heard fresher news of it.
    heard: u64,
}

#[derive(Debug, Clone)]
struct Grave {
    info: MemberInfo,
    /// Local time (ms) it was buried; forgotten `removal_timeout` later.
    since: u64,
}

/// How a join request was received.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum JoinOutcome {
    /// Accepted (new member, or a restart of a known one).
    Accepted,
    /// Another live node already uses this `node_id`.
    DuplicateId {
        /// Address of the node that holds the id.
        holder: String,
    },
    /// This node already keeps [`MAX_MEMBERS`] members.
    Full,
}

/// Most members a node keeps (and most entries one message may carry): news of more
/// is refused, so one message cannot make a node track without bound.
pub const MAX_MEMBERS: usize = 1_024;
/// How far ahead of this node's wall clock a member's incarnation or join time may be
/// (both are wall-clock ms of the member's own process).
pub const MAX_AHEAD_MS: u64 = 24 * 3_600 * 1_000;
/// Largest heartbeat taken: one gossip round every 10 ms for 89,000 years.
pub const MAX_HEARTBEAT: u64 = 1 << 48;

/// Checks a member entry from a peer like client input: its id, address and uid, and
/// numbers that could otherwise freeze it (a version no later news can beat).
/// `wall_ms` is this node's wall clock.
pub fn check_info(m: &MemberInfo, wall_ms: u64) -> Result<(), String> {
    check_node_id(&m.id).map_err(|e| format!("member id: {e}"))?;
    check_host_port(&m.address).map_err(|e| format!("member {}: address: {e}", m.id))?;
    if m.uid.is_empty() || m.uid.len() > 64 {
        return Err(format!("member {}: uid must be 1 to 64 bytes", m.id));
    }
    let limit = wall_ms.saturating_add(MAX_AHEAD_MS);
    if m.incarnation > limit || m.joined_timestamp > limit {
        return Err(format!(
            "member {}: incarnation or joined_timestamp more than a day ahead of this node's clock",
            m.id
        ));
    }
    if m.heartbeat > MAX_HEARTBEAT {
        return Err(format!("member {}: heartbeat above {MAX_HEARTBEAT}", m.id));
    }
    Ok(())
}

/// One row of `/members/`.
#[derive(Debug, Clone, Serialize)]
pub struct MemberView {
    /// `node_id`.
    pub id: String,
    /// `host:port`.
    pub address: String,
    /// Wall-clock ms we last heard fresh news of it (now, for this node).
    pub last_seen: u64,
    /// When it first joined.
    pub joined_timestamp: u64,
    /// `alive` or `down`.
    pub status: Status,
}

/// Failure-detection timeouts, in ms.
#[derive(Debug, Clone, Copy)]
pub struct Timeouts {
    /// Silence after which a member is down.
    pub failure_ms: u64,
    /// Silence after which a member is removed (and a grave forgotten).
    pub removal_ms: u64,
}

/// This node's view of the cluster.
#[derive(Debug, Clone)]
pub struct Membership {
    me: MemberInfo,
    others: BTreeMap<String, Entry>,
    graves: BTreeMap<String, Grave>,
    timeouts: Timeouts,
}

/// What a merge or tick changed, for logging.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Changes {
    /// Members seen for the first time (or back from the graveyard).
    pub joined: Vec<String>,
    /// Members that left.
    pub left: Vec<String>,
    /// Members removed after `removal_timeout`.
    pub removed: Vec<String>,
    /// News of new members refused because [`MAX_MEMBERS`] are known.
    pub refused: usize,
}

impl Changes {
    /// True when nothing changed.
    pub fn is_empty(&self) -> bool {
        self.joined.is_empty() && self.left.is_empty() && self.removed.is_empty() && self.refused == 0
    }
}

impl Membership {
    /// A view holding only this node.
    pub fn new(me: MemberInfo, timeouts: Timeouts) -> Membership {
        Membership { me, others: BTreeMap::new(), graves: BTreeMap::new(), timeouts }
    }

    /// This node's own entry.
    pub fn me(&self) -> &MemberInfo {
        &self.me
    }

    /// Records this node's newest write, purge horizon and whether it is
    /// bootstrapping, told to peers with the next gossip.
    pub fn set_data_facts(&mut self, newest_write: u64, gc_horizon: u64, syncing: bool) {
        self.me.newest_write = newest_write;
        self.me.gc_horizon = gc_horizon;
        self.me.syncing = syncing;
    }

    /// Every member other than this node that has not left or been removed, alive or
    /// down: the members a purge must hear from.
    pub fn members(&self, now: u64) -> Vec<(MemberInfo, Status)> {
        self.others.values().map(|e| (e.info.clone(), self.status_of(e, now))).collect()
    }

    /// The highest purge horizon among the members we know (alive or not), ignoring
    /// any above `ceiling`: a delete cannot have been purged in the future, and one
    /// absurd horizon (a buggy or hostile peer's gossip, spread to every node) would
    /// otherwise make every node discard its data at once.
    pub fn max_peer_gc_horizon(&self, ceiling: u64) -> u64 {
        self.others.values().map(|e| e.info.gc_horizon).filter(|&h| h <= ceiling).max().unwrap_or(0)
    }

    /// One gossip round: raise our heartbeat and remove members silent for
    /// `removal_timeout`, and forget old graves.
    pub fn tick(&mut self, now: u64) -> Changes {
        self.me.heartbeat += 1;
        let mut changes = Changes::default();
        let removal = self.timeouts.removal_ms;
        let expired: Vec<String> = self
            .others
            .iter()
            .filter(|(_, e)| now.saturating_sub(e.heard) > removal)
            .map(|(id, _)| id.clone())
            .collect();
        for id in expired {
            if let Some(e) = self.others.remove(&id) {
                self.graves.insert(id.clone(), Grave { info: e.info, since: now });
                changes.removed.push(id);
            }
        }
        self.graves.retain(|_, g| now.saturating_sub(g.since) <= removal);
        changes
    }

    /// Merges what a peer says about the cluster.
    pub fn merge(&mut self, incoming: impl IntoIterator<Item = MemberInfo>, now: u64) -> Changes {
        let mut changes = Changes::default();
        for info in incoming {
            self.merge_one(info, now, &mut changes);
        }
        changes
    }

    fn merge_one(&mut self, info: MemberInfo, now: u64, changes: &mut Changes) {
        if info.id == self.me.id {
            // Only we speak for ourselves. News of an older incarnation of us (say, its
            // leave) is stale; a newer one with another uid is a duplicate id, which the
            // join refused, so it is ignored here too. News of us, with our uid, at a
            // version above ours (a past process with a higher incarnation, or a forged
            // entry) would shadow our heartbeats: refute it by outranking it, as SWIM
            // does.
            // Never our own leave echoed back: that is news we sent.
            if info.uid == self.me.uid && !info.left && info.version() > self.me.version() {
                self.me.incarnation = info.incarnation.saturating_add(1);
                self.me.heartbeat = 0;
            }
            return;
        }
        if let Some(grave) = self.graves.get(&info.id) {
            if info.version() <= grave.info.version() {
                return;
            }
            self.graves.remove(&info.id);
        }
        let full = self.others.len() >= MAX_MEMBERS;
        match self.others.get_mut(&info.id) {
            Some(e) if info.version() <= e.info.version() => {}
            Some(e) if info.uid != e.info.uid && !Self::is_silent(e, now, self.timeouts.failure_ms) => {
                // Two live nodes claim one id: keep the one we had.
            }
            _ if info.left => {
                self.others.remove(&info.id);
                changes.left.push(info.id.clone());
                self.graves.insert(info.id.clone(), Grave { info, since: now });
            }
            Some(e) => {
                e.info = info;
                e.heard = now;
            }
            None if full => changes.refused += 1,
            None => {
                changes.joined.push(info.id.clone());
                self.others.insert(info.id.clone(), Entry { info, heard: now });
            }
        }
    }

    fn is_silent(e: &Entry, now: u64, failure_ms: u64) -> bool {
        now.saturating_sub(e.heard) > failure_ms
    }

    /// A join request: the joiner's entry is merged unless another live node holds its id.
    pub fn join(&mut self, info: MemberInfo, now: u64) -> JoinOutcome {
        let holder = if info.id == self.me.id {
            (info.uid != self.me.uid).then(|| self.me.address.clone())
        } else {
            self.others
                .get(&info.id)
                .filter(|e| e.info.uid != info.uid && !Self::is_silent(e, now, self.timeouts.failure_ms))
                .map(|e| e.info.address.clone())
        };
        if let Some(holder) = holder {
            return JoinOutcome::DuplicateId { holder };
        }
        if info.id != self.me.id && !self.others.contains_key(&info.id) && self.others.len() >= MAX_MEMBERS {
            return JoinOutcome::Full;
        }
        // A replacement of a silent holder starts fresh.
        if self.others.get(&info.id).is_some_and(|e| e.info.uid != info.uid) {
            self.others.remove(&info.id);
        }
        self.graves.remove(&info.id);
        self.merge_one(info, now, &mut Changes::default());
        JoinOutcome::Accepted
    }

    /// Our own leave announcement: our entry marked `left`, at a version above any we
    /// gossiped.
    pub fn leave_announcement(&self) -> MemberInfo {
        MemberInfo { heartbeat: self.me.heartbeat + 1, left: true, ..self.me.clone() }
    }

    /// Everything we know, for gossip: ourselves, the others, and recent leaves.
    pub fn gossip_payload(&self) -> Vec<MemberInfo> {
        let mut out = Vec::with_capacity(1 + self.others.len());
        out.push(self.me.clone());
        out.extend(self.others.values().map(|e| e.info.clone()));
        out.extend(self.graves.values().filter(|g| g.info.left).map(|g| g.info.clone()));
        out
    }

    /// Status of a known member (ourselves included).
    pub fn status(&self, id: &str, now: u64) -> Option<Status> {
        if id == self.me.id {
            return Some(Status::Alive);
        }
        self.others.get(id).map(|e| self.status_of(e, now))
    }

    fn status_of(&self, e: &Entry, now: u64) -> Status {
        if Self::is_silent(e, now, self.timeouts.failure_ms) { Status::Down } else { Status::Alive }
    }

    /// The `/members/` list, this node first, then by id. `wall_now` is this node's
    /// wall clock for `last_seen`; `now` the clock `heard` was recorded with.
    pub fn view(&self, now: u64, wall_now: u64) -> Vec<MemberView> {
        let mine = MemberView {
            id: self.me.id.clone(),
            address: self.me.address.clone(),
            last_seen: wall_now,
            joined_timestamp: self.me.joined_timestamp,
            status: Status::Alive,
        };
        let others = self.others.values().map(|e| MemberView {
            id: e.info.id.clone(),
            address: e.info.address.clone(),
            last_seen: wall_now.saturating_sub(now.saturating_sub(e.heard)),
            joined_timestamp: e.info.joined_timestamp,
            status: self.status_of(e, now),
        });
        std::iter::once(mine).chain(others).collect()
    }

    /// Known members, this node included (alive or down).
    pub fn known_count(&self) -> usize {
        1 + self.others.len()
    }

    /// Alive members, this node included.
    pub fn alive_count(&self, now: u64) -> usize {
        1 + self.others.values().filter(|e| self.status_of(e, now) == Status::Alive).count()
    }

    /// Alive peers (not this node).
    pub fn alive_peers(&self, now: u64) -> Vec<MemberInfo> {
        self.others.values().filter(|e| self.status_of(e, now) == Status::Alive).map(|e| e.info.clone()).collect()
    }

    /// Gossip targets for one round: 1 to 3 random alive peers, plus one probe of a
    /// member we cannot reach (down, recently removed, or a seed that is not a live
    /// member), so that a node cut off from everyone, or a cluster split by a
    /// partition, finds its way back.
    pub fn gossip_targets(&self, seeds: &[String], now: u64, rng: &mut impl Rng) -> Vec<String> {
        let mut alive: Vec<String> = self.alive_peers(now).into_iter().map(|m| m.address).collect();
        alive.shuffle(rng);
        let mut targets: Vec<String> = alive.into_iter().take(3).collect();
        let live: Vec<&str> = self.others.values().map(|e| e.info.address.as_str()).collect();
        let mut unreachable: Vec<String> = self
            .others
            .values()
            .filter(|e| self.status_of(e, now) == Status::Down)
            .map(|e| e.info.address.clone())
            .chain(self.graves.values().filter(|g| !g.info.left).map(|g| g.info.address.clone()))
            .chain(seeds.iter().filter(|s| !live.contains(&s.as_str()) && **s != self.me.address).cloned())
            .collect();
        unreachable.sort();
        unreachable.dedup();
        unreachable.retain(|a| !targets.contains(a));
        unreachable.shuffle(rng);
        targets.extend(unreachable.into_iter().next());
        targets
    }
}

/// Whether a bootstrapping node should found a new cluster instead of waiting for a
/// peer to bootstrap from: there are alive peers, every one of them is bootstrapping
/// too (a brand-new cluster whose nodes list each other as seeds), and this node is
/// the oldest of them (earliest `joined_timestamp`, then smallest id). Every node
/// computes the same, so exactly one founds; the others then bootstrap from it.
pub fn should_found(me: &MemberInfo, alive_peers: &[MemberInfo]) -> bool {
    !alive_peers.is_empty()
        && alive_peers.iter().all(|p| p.syncing)
        && alive_peers.iter().all(|p| (me.joined_timestamp, &me.id) < (p.joined_timestamp, &p.id))
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;
    use rand::rngs::StdRng;

    const T: Timeouts = Timeouts { failure_ms: 1_000, removal_ms: 2_000 };

    fn info(id: &str, inc: u64, hb: u64) -> MemberInfo {
        MemberInfo {
            id: id.into(),
            uid: format!("uid-{id}"),
            address: format!("{id}:1"),
            joined_timestamp: 100,
            incarnation: inc,
            heartbeat: hb,
            left: false,
            newest_write: 0,
            gc_horizon: 0,
            syncing: false,
        }
    }

    #[test]
    fn member_entries_from_peers_are_checked_like_client_input() {
        let wall = 1_700_000_000_000;
        let ok = MemberInfo { address: "127.0.0.1:7001".into(), ..info("b", wall, 5) };
        assert_eq!(check_info(&ok, wall), Ok(()));
        let bad = [
            MemberInfo { id: String::new(), ..ok.clone() },
            MemberInfo { address: "nowhere".into(), ..ok.clone() },
            MemberInfo { uid: "x".repeat(65), ..ok.clone() },
            MemberInfo { incarnation: u64::MAX, ..ok.clone() },
            MemberInfo { joined_timestamp: wall + MAX_AHEAD_MS + 1, ..ok.clone() },
            MemberInfo { heartbeat: u64::MAX, ..ok.clone() },
        ];
        for b in bad {
            assert!(check_info(&b, wall).is_err(), "{b:?}");
        }
    }

    #[test]
    fn forged_news_of_this_node_is_outranked_not_obeyed() {
        let mut m = Membership::new(info("a", 10, 3), T);
        m.merge([info("a", 10, 3)], 0);
        assert_eq!(m.me().version(), (10, 3), "our own version echoed back changes nothing");
        m.merge([info("a", 50, 7)], 0);
        assert!(m.me().version() > (50, 7), "a higher version of us is refuted");
        let leave = MemberInfo { left: true, ..info("a", 80, 0) };
        let before = m.me().version();
        m.merge([leave], 0);
        assert_eq!(m.me().version(), before, "our own leave echoed back is not refuted");
        let other_uid = MemberInfo { uid: "someone-else".into(), ..info("a", 90, 0) };
        let before = m.me().version();
        m.merge([other_uid], 0);
        assert_eq!(m.me().version(), before, "a duplicate id is not us");
    }

    #[test]
    fn a_node_keeps_at_most_max_members() {
        let mut m = Membership::new(info("a", 1, 0), T);
        let flood: Vec<MemberInfo> = (0..MAX_MEMBERS + 10).map(|i| info(&format!("m{i}"), 1, 0)).collect();
        let changes = m.merge(flood, 0);
        assert_eq!((changes.joined.len(), changes.refused), (MAX_MEMBERS, 10));
        assert_eq!(m.join(info("late", 1, 0), 0), JoinOutcome::Full);
        assert_eq!(m.join(info("m3", 2, 0), 0), JoinOutcome::Accepted, "a known member restarting");
    }

    #[test]
    fn the_oldest_of_an_all_new_cluster_founds_it() {
        let syncing = |id: &str, joined: u64| MemberInfo { syncing: true, joined_timestamp: joined, ..info(id, 1, 0) };
        let me = syncing("a", 10);
        assert!(should_found(&me, &[syncing("b", 20), syncing("c", 30)]));
        assert!(!should_found(&syncing("b", 20), &[me.clone(), syncing("c", 30)]), "b is younger");
        // A peer that is not bootstrapping has data to give: no founding.
        assert!(!should_found(&me, &[syncing("b", 20), info("c", 1, 0)]));
        // Alone: the seeds may hold data; wait for them.
        assert!(!should_found(&me, &[]));
        // Same joined_timestamp: the smaller id founds.
        assert!(should_found(&syncing("a", 5), &[syncing("b", 5)]));
        assert!(!should_found(&syncing("b", 5), &[syncing("a", 5)]));
    }

    fn view_ids(m: &Membership, now: u64) -> Vec<(String, Status)> {
        m.view(now, now).into_iter().map(|v| (v.id, v.status)).collect()
    }

    #[test]
    fn learns_members_through_gossip() {
        let mut a = Membership::new(info("a", 1, 0), T);
        let changes = a.merge([info("b", 1, 0), info("c", 1, 0)], 0);
        assert_eq!(changes.joined, vec!["b", "c"]);
        assert_eq!(a.alive_count(0), 3);
        // The same news again changes nothing.
        assert!(a.merge([info("b", 1, 0)], 10).is_empty());
    }

    #[test]
    fn down_after_silence_alive_again_on_fresher_news_removed_later() {
        let mut a = Membership::new(info("a", 1, 0), T);
        a.merge([info("b", 1, 5)], 0);
        assert_eq!(a.status("b", 1_000), Some(Status::Alive));
        assert_eq!(a.status("b", 1_001), Some(Status::Down));
        // Old news does not revive it.
        a.merge([info("b", 1, 5)], 1_500);
        assert_eq!(a.status("b", 1_500), Some(Status::Down));
        // Fresher news does.
        a.merge([info("b", 1, 6)], 1_500);
        assert_eq!(a.status("b", 1_500), Some(Status::Alive));
        assert!(a.tick(3_500).removed.is_empty());
        assert_eq!(a.tick(3_501).removed, vec!["b"]);
        assert_eq!(a.status("b", 3_501), None);
    }

    #[test]
    fn stale_gossip_cannot_bring_back_a_removed_member() {
        let mut a = Membership::new(info("a", 1, 0), T);
        a.merge([info("b", 1, 5)], 0);
        a.tick(2_001);
        assert!(a.merge([info("b", 1, 5)], 2_100).is_empty(), "same version is stale");
        assert_eq!(a.status("b", 2_100), None);
        // The member's own fresher heartbeat (a partition healed) brings it back.
        assert_eq!(a.merge([info("b", 1, 6)], 2_200).joined, vec!["b"]);
        assert_eq!(a.status("b", 2_200), Some(Status::Alive));
    }

    #[test]
    fn leave_is_final_for_that_incarnation_and_spreads() {
        let mut a = Membership::new(info("a", 1, 0), T);
        let mut c = Membership::new(info("c", 1, 0), T);
        let mut b = Membership::new(info("b", 1, 7), T);
        a.merge([b.me().clone(), c.me().clone()], 0);
        c.merge([b.me().clone()], 0);
        let bye = b.leave_announcement();
        assert_eq!(a.merge([bye], 10).left, vec!["b"]);
        assert_eq!(a.status("b", 10), None);
        // Stale gossip from c, which still has b at heartbeat 7, does not bring it back.
        assert!(a.merge(c.gossip_payload(), 20).is_empty());
        assert_eq!(a.alive_count(20), 2, "a and c");
        // a's gossip carries the leave to c.
        assert_eq!(c.merge(a.gossip_payload(), 30).left, vec!["b"]);
        // A restart of b (higher incarnation) is welcome again.
        b = Membership::new(info("b", 2, 0), T);
        assert_eq!(a.merge([b.me().clone()], 40).joined, vec!["b"]);
    }

    #[test]
    fn a_restarted_node_overrides_its_old_incarnation() {
        let mut a = Membership::new(info("a", 1, 0), T);
        a.merge([info("b", 1, 50)], 0);
        let mut restarted = info("b", 2, 0);
        restarted.address = "b:2".into();
        a.merge([restarted], 10);
        // Older incarnation news, even with a higher heartbeat, is stale.
        a.merge([info("b", 1, 99)], 20);
        assert_eq!(a.view(20, 20)[1].address, "b:2");
    }

    #[test]
    fn gossip_about_ourselves_is_ignored() {
        let mut a = Membership::new(info("a", 2, 0), T);
        let mut stale = info("a", 1, 9);
        stale.left = true;
        assert!(a.merge([stale], 0).is_empty());
        assert_eq!(a.alive_count(0), 1);
    }

    #[test]
    fn duplicate_ids_are_refused() {
        let mut a = Membership::new(info("a", 1, 0), T);
        a.merge([info("b", 1, 0)], 0);
        let mut imposter = info("b", 5, 0);
        imposter.uid = "other".into();
        assert_eq!(a.join(imposter.clone(), 10), JoinOutcome::DuplicateId { holder: "b:1".into() });
        let mut me_again = info("a", 9, 0);
        me_again.uid = "other".into();
        assert!(matches!(a.join(me_again, 10), JoinOutcome::DuplicateId { .. }));
        // Gossip cannot sneak it in either.
        a.merge([imposter.clone()], 20);
        assert_eq!(a.view(20, 20)[1].address, "b:1");
        // A restart of the real b is accepted.
        assert_eq!(a.join(info("b", 2, 0), 30), JoinOutcome::Accepted);
        // Once the holder is silent (down), a replacement may take the id.
        assert_eq!(a.join(imposter, 2_000), JoinOutcome::Accepted);
    }

    #[test]
    fn gossip_targets_are_alive_peers_plus_one_probe() {
        let mut a = Membership::new(info("a", 1, 0), T);
        a.merge((b'b'..=b'f').map(|c| info(&(c as char).to_string(), 1, 0)), 0);
        a.merge([info("g", 1, 0)], 0);
        // Everyone but g speaks again later; g goes down.
        a.merge((b'b'..=b'f').map(|c| info(&(c as char).to_string(), 1, 1)), 900);
        let mut rng = StdRng::seed_from_u64(7);
        for _ in 0..50 {
            let t = a.gossip_targets(&["seed:1".into()], 1_500, &mut rng);
            assert_eq!(t.len(), 4, "{t:?}");
            assert!(t[..3].iter().all(|x| x != "g:1" && x != "seed:1"));
            assert!(t[3] == "g:1" || t[3] == "seed:1", "{t:?}");
        }
    }

    #[test]
    fn alone_node_probes_its_seeds() {
        let a = Membership::new(info("a", 1, 0), T);
        let mut rng = StdRng::seed_from_u64(1);
        let t = a.gossip_targets(&["s1:1".into(), "a:1".into()], 0, &mut rng);
        assert_eq!(t, vec!["s1:1"], "never itself");
        assert_eq!(view_ids(&a, 0), vec![("a".into(), Status::Alive)]);
    }

    #[test]
    fn a_purge_horizon_from_the_future_is_ignored() {
        let mut m = Membership::new(info("me", 1, 0), Timeouts { failure_ms: 1_000, removal_ms: 2_000 });
        let honest = MemberInfo { gc_horizon: 50, ..info("a", 1, 1) };
        let absurd = MemberInfo { gc_horizon: u64::MAX, ..info("b", 1, 1) };
        m.merge([honest, absurd], 0);
        assert_eq!(m.max_peer_gc_horizon(100), 50);
        assert_eq!(m.max_peer_gc_horizon(u64::MAX), u64::MAX);
    }
}
