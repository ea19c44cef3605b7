//! Timestamp collisions: two versions of one path with the same timestamp and different
//! uuids. Newest-wins cannot decide; the cluster votes. These are the rules, with no
//! I/O; [`crate::resolve`] runs the votes.
//!
//! 1. **Majority**: every alive member says which version it holds at that timestamp;
//!    the version held by the most members wins.
//! 2. **Oldest node**: if the top count is tied, the tied version held by the member
//!    with the earliest `joined_timestamp` (then the smallest id) wins.
//! 3. **Fallback**: if no voter holds any of the versions, the version with the
//!    smallest uuid wins. Every node computes the same.
//!
//! The outcome depends only on the set of votes, never on their order.
//!
//! **Once per collision.** A node that settled a collision (a path at one timestamp)
//! does not vote on it again for [`VOTE_COOLDOWN_MS`] ([`Settled`]). Under an asymmetric
//! partition the two sides see different voters and can decide differently; each
//! pushes its winner to the other, which found a collision again and voted again,
//! every round, flipping nodes between the versions and flooding the links. With the
//! cooldown each node votes on a collision, and adopts a result, at most once per
//! cooldown; after the heal, the next vote (within a cooldown and a sync interval)
//! sees every member and settles it for all.

use serde::Serialize;
use std::collections::BTreeMap;
use uuid::Uuid;

/// Which rule decided a collision.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Rule {
    /// One version was held by more members than any other.
    Majority,
    /// Tied counts; the oldest member holding a tied version decided.
    OldestNode,
    /// Nobody voted for a candidate; the smallest uuid won.
    Fallback,
}

impl Rule {
    /// The name used in logs.
    pub fn as_str(self) -> &'static str {
        match self {
            Rule::Majority => "majority",
            Rule::OldestNode => "oldest-node",
            Rule::Fallback => "fallback",
        }
    }
}

/// One member's answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Vote {
    /// The member's id.
    pub voter: String,
    /// When the member first joined.
    pub joined_timestamp: u64,
    /// The uuid it holds at the collision's timestamp (`None`: it holds something else).
    pub holds: Option<Uuid>,
}

/// The decision.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outcome {
    /// The winning version.
    pub winner: Uuid,
    /// The rule that decided.
    pub rule: Rule,
    /// Votes per candidate.
    pub counts: BTreeMap<Uuid, usize>,
}

/// Decides between `candidates` (at least one) given the votes.
pub fn tally(candidates: &[Uuid], votes: &[Vote]) -> Outcome {
    let mut counts: BTreeMap<Uuid, usize> = candidates.iter().map(|c| (*c, 0)).collect();
    for v in votes {
        if let Some(c) = v.holds.and_then(|u| counts.get_mut(&u)) {
            *c += 1;
        }
    }
    let top = counts.values().copied().max().unwrap_or(0);
    let leaders: Vec<Uuid> = counts.iter().filter(|(_, n)| **n == top).map(|(u, _)| *u).collect();
    let (winner, rule) = if top == 0 {
        (leaders.iter().min().copied().unwrap_or_default(), Rule::Fallback)
    } else if leaders.len() == 1 {
        (leaders[0], Rule::Majority)
    } else {
        let oldest = votes
            .iter()
            .filter(|v| v.holds.is_some_and(|u| leaders.contains(&u)))
            .min_by(|a, b| (a.joined_timestamp, &a.voter).cmp(&(b.joined_timestamp, &b.voter)));
        match oldest.and_then(|v| v.holds) {
            Some(u) => (u, Rule::OldestNode),
            None => (leaders.iter().min().copied().unwrap_or_default(), Rule::Fallback),
        }
    };
    Outcome { winner, rule, counts }
}

/// How long a node does not vote again on a collision it settled.
pub const VOTE_COOLDOWN_MS: u64 = 30_000;
/// Most settled collisions remembered (the oldest are forgotten first).
pub const SETTLED_CAP: usize = 10_000;

/// The collisions this node settled recently: `(path, timestamp)` → when (ms on the
/// caller's clock). No I/O; the clock is passed in.
#[derive(Debug, Default)]
pub struct Settled {
    at: std::collections::HashMap<(String, u64), u64>,
}

impl Settled {
    /// Whether a collision of `path` at `timestamp` may be voted on at `now`.
    pub fn may_vote(&self, path: &str, timestamp: u64, now: u64) -> bool {
        self.at.get(&(path.to_string(), timestamp)).is_none_or(|&when| now.saturating_sub(when) >= VOTE_COOLDOWN_MS)
    }

    /// Notes that the collision was settled at `now`.
    pub fn note(&mut self, path: &str, timestamp: u64, now: u64) {
        if self.at.len() >= SETTLED_CAP {
            self.at.retain(|_, when| now.saturating_sub(*when) < VOTE_COOLDOWN_MS);
        }
        if self.at.len() >= SETTLED_CAP {
            // Still full of fresh entries: forget the oldest.
            if let Some(oldest) = self.at.iter().min_by_key(|(_, w)| **w).map(|(k, _)| k.clone()) {
                self.at.remove(&oldest);
            }
        }
        self.at.insert((path.to_string(), timestamp), now);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_settled_collision_is_not_voted_on_again_within_the_cooldown() {
        let mut s = Settled::default();
        assert!(s.may_vote("k", 5, 0));
        s.note("k", 5, 1_000);
        assert!(!s.may_vote("k", 5, 1_000 + VOTE_COOLDOWN_MS - 1));
        assert!(s.may_vote("k", 5, 1_000 + VOTE_COOLDOWN_MS), "after the cooldown: a heal is settled");
        assert!(s.may_vote("k", 6, 1_000), "another timestamp is another collision");
        assert!(s.may_vote("j", 5, 1_000));
        for i in 0..SETTLED_CAP as u64 + 5 {
            s.note(&format!("p{i}"), 1, 2_000 + i);
        }
        assert!(s.at.len() <= SETTLED_CAP, "bounded");
        assert!(!s.may_vote(&format!("p{}", SETTLED_CAP + 4), 1, 2_000 + SETTLED_CAP as u64 + 4));
    }

    const A: Uuid = Uuid::from_u128(0xA);
    const B: Uuid = Uuid::from_u128(0xB);
    const C: Uuid = Uuid::from_u128(0xC);

    fn vote(voter: &str, joined: u64, holds: Option<Uuid>) -> Vote {
        Vote { voter: voter.into(), joined_timestamp: joined, holds }
    }

    #[test]
    fn majority_beats_the_oldest_node() {
        let votes = [vote("n1", 1, Some(B)), vote("n2", 2, Some(A)), vote("n3", 3, Some(A))];
        let o = tally(&[A, B], &votes);
        assert_eq!((o.winner, o.rule), (A, Rule::Majority));
        assert_eq!(o.counts[&A], 2);
    }

    #[test]
    fn a_tie_goes_to_the_oldest_node() {
        let votes = [vote("n2", 20, Some(A)), vote("n1", 10, Some(B))];
        assert_eq!(tally(&[A, B], &votes).winner, B);
        let votes = [vote("n2", 20, Some(B)), vote("n1", 10, Some(A))];
        assert_eq!(tally(&[A, B], &votes).rule, Rule::OldestNode);
        assert_eq!(tally(&[A, B], &votes).winner, A);
        // 2:2 with four nodes.
        let votes = [vote("a", 4, Some(A)), vote("b", 1, Some(B)), vote("c", 2, Some(A)), vote("d", 3, Some(B))];
        assert_eq!(tally(&[A, B], &votes).winner, B);
        // Equal joined_timestamp: the smaller id is older.
        let votes = [vote("y", 5, Some(A)), vote("x", 5, Some(B))];
        assert_eq!(tally(&[A, B], &votes).winner, B);
    }

    #[test]
    fn the_oldest_node_counts_only_if_it_holds_a_tied_version() {
        // n1 (oldest) holds C, which trails the A:B tie: the tie goes to n2 (A).
        let votes = [
            vote("n1", 1, Some(C)),
            vote("n2", 2, Some(A)),
            vote("n3", 3, Some(B)),
            vote("n4", 4, Some(A)),
            vote("n5", 5, Some(B)),
        ];
        let o = tally(&[A, B, C], &votes);
        assert_eq!((o.winner, o.rule), (A, Rule::OldestNode));
        // With C tied too, n1 decides.
        let three_way = [vote("n1", 1, Some(C)), vote("n2", 2, Some(A)), vote("n3", 3, Some(B))];
        assert_eq!(tally(&[A, B, C], &three_way).winner, C);
    }

    #[test]
    fn missing_voters_and_no_votes() {
        // Only one member answered.
        let o = tally(&[A, B], &[vote("n3", 3, Some(B))]);
        assert_eq!((o.winner, o.rule), (B, Rule::Majority));
        // Nobody holds either version (all moved on, or no answers): smallest uuid.
        let o = tally(&[B, A], &[vote("n1", 1, None)]);
        assert_eq!((o.winner, o.rule), (A, Rule::Fallback));
        assert_eq!(tally(&[B, A], &[]).winner, A);
        // Votes for versions that are not candidates do not count.
        let o = tally(&[A, B], &[vote("n1", 1, Some(C))]);
        assert_eq!(o.rule, Rule::Fallback);
    }

    #[test]
    fn order_of_answers_does_not_matter() {
        let votes = vec![
            vote("n1", 1, Some(B)),
            vote("n2", 2, Some(A)),
            vote("n3", 3, Some(C)),
            vote("n4", 4, Some(A)),
            vote("n5", 5, Some(B)),
            vote("n6", 6, None),
        ];
        let expected = tally(&[A, B, C], &votes);
        let mut perm = votes.clone();
        for i in 0..720 {
            // Walk through permutations by rotating and swapping.
            perm.rotate_left(i % 5 + 1);
            perm.swap(i % 6, (i * 7) % 6);
            assert_eq!(tally(&[C, B, A], &perm), expected);
        }
        assert_eq!(expected.winner, B, "tie A:B 2:2, n1 (oldest) holds B");
    }
}
