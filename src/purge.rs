//! Purging deletes: when a tombstone may go.
//! No I/O: the maintenance task in [`crate::replication`] asks the peers and calls these.
//!
//! A tombstone older than `tombstone_grace_hours` is purged only once **every member**
//! (alive or down, until it is removed) has said it holds no older version of the path
//! (`POST /internal/v2/purge/check`). A member that says otherwise is sent the tombstone
//! and asked again next round; a member that is down holds every purge back. So when a
//! node drops a tombstone, no member can bring back what it deleted. Grace is the lower
//! bound, confirmation the rule (Garage's table GC works the same way).
//!
//! Each node keeps a **certificate** (path, timestamp, uuid) of a purged delete, out of
//! the data and the summary: the purger when it purges, and every member that holds
//! nothing of the path when it answers the check. A deleted value that arrives later
//! (from a node that was removed during the purge and came back, or from a fetch that
//! was under way during the check) meets a certificate, is refused, and the delete
//! comes back to life ([`crate::merge::Decision::Reawaken`]), so it reaches that node
//! too: Demers et al.'s dormant death certificates. Certificates are kept for good:
//! forgetting one safely needs to know that no node that missed the delete can ever
//! return, which kvs cannot know (a partition can last any time).

use crate::membership::{MemberInfo, Status};

/// What one purge round does.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Round {
    /// A member is down: no tombstone may go until it is back or removed.
    HeldBack {
        /// Its `node_id`.
        member: String,
    },
    /// Ask these members (addresses) about the candidates; none: purge at once.
    Ask(Vec<String>),
}

/// The round for the current members (everyone but this node).
pub fn round(members: &[(MemberInfo, Status)]) -> Round {
    match members.iter().find(|(_, s)| *s == Status::Down) {
        Some((m, _)) => Round::HeldBack { member: m.id.clone() },
        None => Round::Ask(members.iter().map(|(m, _)| m.address.clone()).collect()),
    }
}

/// What the answers allow: the candidates every member called safe (to purge), and
/// for each member the indices of the candidates it still needs (to send it).
pub fn decide(candidates: usize, answers: &[Vec<bool>]) -> (Vec<usize>, Vec<Vec<usize>>) {
    let safe = |i: usize| answers.iter().all(|a| a.get(i) == Some(&true));
    let purge = (0..candidates).filter(|&i| safe(i)).collect();
    let repair = answers.iter().map(|a| (0..candidates).filter(|&i| a.get(i) != Some(&true)).collect()).collect();
    (purge, repair)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn member(id: &str) -> MemberInfo {
        MemberInfo {
            id: id.into(),
            uid: id.into(),
            address: format!("{id}:1"),
            joined_timestamp: 1,
            incarnation: 1,
            heartbeat: 1,
            left: false,
            newest_write: 0,
            gc_horizon: 0,
            syncing: false,
        }
    }

    #[test]
    fn a_down_member_holds_every_purge_back() {
        let members = [(member("a"), Status::Alive), (member("b"), Status::Down)];
        assert_eq!(round(&members), Round::HeldBack { member: "b".into() });
        let members = [(member("a"), Status::Alive), (member("b"), Status::Alive)];
        assert_eq!(round(&members), Round::Ask(vec!["a:1".into(), "b:1".into()]));
        assert_eq!(round(&[]), Round::Ask(vec![]), "alone: nobody else can hold an older version");
    }

    #[test]
    fn only_what_every_member_called_safe_is_purged() {
        let (purge, repair) = decide(3, &[vec![true, true, false], vec![true, false, true]]);
        assert_eq!(purge, vec![0]);
        assert_eq!(repair, vec![vec![2], vec![1]]);
        let (purge, _) = decide(2, &[vec![true]]);
        assert_eq!(purge, vec![0], "a short answer is not a yes");
        let (purge, repair) = decide(2, &[]);
        assert_eq!((purge, repair), (vec![0, 1], vec![]));
    }
}
