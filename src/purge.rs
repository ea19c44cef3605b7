//! Purging deletes: when a tombstone may go, and when its certificate may be forgotten.
//! No I/O: the maintenance task in [`crate::sync`] asks the peers and calls these.
//!
//! A tombstone older than `tombstone_grace_hours` is purged only once **every member**
//! (alive or down, until it is removed) has said it holds no older version of the path
//! (`POST /internal/v2/purge/check`). A member that says otherwise is sent the tombstone
//! and asked again next round; a member that is down holds every purge back. So when a
//! node drops a tombstone, no member can bring back what it deleted. Grace is the lower
//! bound, confirmation the rule (Garage's table GC works the same way).
//!
//! Each node that purges keeps a **certificate** (path, timestamp, uuid) out of the
//! data and the summary. Nodes that were not members during the purge (removed after a
//! long absence, then back) may still hold a deleted value; a certificate refuses it
//! and brings the delete back to life ([`crate::merge::Decision::Reawaken`]), so it
//! reaches that node too: Demers et al.'s dormant death certificates.
//!
//! A certificate is forgotten once it is older than the retention
//! ([`CERT_RETENTION_GRACES`] grace periods) **and** every member's `last_contact` is
//! past it: every current member had the delete. Only a node that was not a member
//! then can be behind it, so the stale rule that the forgotten horizon feeds (see
//! [`crate::antientropy::stale_below`]) never fires on every node at once.

use crate::membership::{MemberInfo, Status};

/// Certificates are kept at least this many grace periods.
pub const CERT_RETENTION_GRACES: u32 = 10;

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

/// Up to which timestamp certificates may be forgotten: at most `retention_floor` (now
/// less the retention, as a timestamp), and below every member's `last_contact`.
/// `None` while some member's contact is unknown (0).
pub fn forget_up_to(retention_floor: u64, my_contact: u64, members: &[(MemberInfo, Status)]) -> Option<u64> {
    let contacts = members.iter().map(|(m, _)| m.last_contact).chain([my_contact]);
    let oldest = contacts.min()?;
    (oldest > 0).then(|| retention_floor.min(oldest - 1))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn member(id: &str, contact: u64) -> MemberInfo {
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
            last_contact: contact,
        }
    }

    #[test]
    fn a_down_member_holds_every_purge_back() {
        let members = [(member("a", 5), Status::Alive), (member("b", 5), Status::Down)];
        assert_eq!(round(&members), Round::HeldBack { member: "b".into() });
        let members = [(member("a", 5), Status::Alive), (member("b", 5), Status::Alive)];
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

    #[test]
    fn certificates_are_forgotten_only_behind_every_members_contact() {
        let members = [(member("a", 500), Status::Alive), (member("b", 300), Status::Down)];
        assert_eq!(forget_up_to(1000, 800, &members), Some(299));
        assert_eq!(forget_up_to(100, 800, &members), Some(100));
        let unknown = [(member("a", 0), Status::Alive)];
        assert_eq!(forget_up_to(1000, 800, &unknown), None, "a member of unknown contact blocks it");
        assert_eq!(forget_up_to(1000, 0, &[]), None, "nor without a contact of its own");
    }
}
