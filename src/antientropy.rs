//! Anti-entropy rules: the hash summary, its diff, and the stale-node rule. No I/O.
//!
//! The key space is split into [`LEAVES`] buckets by the top 16 bits of
//! `xxh3(path)`. A leaf's hash is the XOR of the [`digest`]s of the records in it, so a
//! write updates it in O(1) (XOR out the old version, XOR in the new) in the same batch
//! as the record. 256 level-1 hashes each XOR 256 consecutive leaves. Two nodes compare
//! level 1 (2 KiB), then the leaves under the level-1 hashes that differ, then the
//! versions held in the leaves that differ, and move only the records that differ: the
//! bytes exchanged grow with the difference, not with the data set.

use crate::record::Record;
use serde::{Deserialize, Serialize};
use uuid::Uuid;
use xxhash_rust::xxh3::{xxh3_64, xxh3_64_with_seed};

/// Number of leaf buckets.
pub const LEAVES: usize = 1 << 16;
/// Number of level-1 hashes; each covers `LEAVES / FANOUT` leaves.
pub const FANOUT: usize = 256;

/// The leaf bucket of a path.
pub fn leaf_of(path: &str) -> u16 {
    (xxh3_64(path.as_bytes()) >> 48) as u16
}

/// The hash of one version of one path. Any difference in path, timestamp, uuid or
/// kind gives a different digest.
pub fn digest(path: &str, timestamp: u64, uuid: &Uuid, tombstone: bool) -> u64 {
    let mut buf = Vec::with_capacity(path.len() + 25);
    buf.extend_from_slice(&timestamp.to_be_bytes());
    buf.extend_from_slice(uuid.as_bytes());
    buf.push(u8::from(tombstone));
    buf.extend_from_slice(path.as_bytes());
    // Seeded so that the digest is unrelated to leaf_of's hash of the same path.
    xxh3_64_with_seed(&buf, 0x006b_7673)
}

/// The digest of a record at a path.
pub fn record_digest(path: &str, r: &Record) -> u64 {
    digest(path, r.timestamp, &r.uuid, r.is_tombstone())
}

/// Level-1 hashes from leaf hashes.
pub fn level1(leaves: &[u64]) -> Vec<u64> {
    leaves.chunks(LEAVES / FANOUT).map(|c| c.iter().fold(0, |a, h| a ^ h)).collect()
}

/// Indices where two hash lists differ.
pub fn differing(mine: &[u64], theirs: &[u64]) -> Vec<usize> {
    (0..mine.len().max(theirs.len())).filter(|&i| mine.get(i) != theirs.get(i)).collect()
}

/// The version of one path as a peer describes it in a diff.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Version {
    /// The path.
    pub path: String,
    /// Its timestamp.
    pub timestamp: u64,
    /// Its uuid.
    pub uuid: Uuid,
    /// Whether it is a tombstone.
    pub tombstone: bool,
}

impl Version {
    /// The version of a record.
    pub fn of(path: &str, r: &Record) -> Version {
        Version { path: path.to_string(), timestamp: r.timestamp, uuid: r.uuid, tombstone: r.is_tombstone() }
    }

    /// Whether this is the expiry tombstone of `version` ([`crate::ttl::expiry_tombstone`]).
    /// A summary does not say whether `version` has an expiry; the writer's
    /// [`crate::record::compare`] checks that when the record arrives.
    pub fn is_expiry_of(&self, version: &Version) -> bool {
        self.tombstone
            && !version.tombstone
            && self.timestamp == version.timestamp
            && self.uuid == crate::ttl::expiry_uuid(version.uuid)
    }
}

/// What one sync round must move, from the initiator's side.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Plan {
    /// Paths where the peer's version is newer (or only the peer has one): fetch.
    pub fetch: Vec<String>,
    /// Paths where our version is newer (or only we have one): send.
    pub send: Vec<String>,
    /// Paths with the same timestamp and different uuids: a vote decides.
    pub collisions: Vec<String>,
    /// Versions the peer holds from beyond the clock bound (above `ceiling`): not
    /// fetched, taken by a later round (ARCHITECTURE.md, clock rule 3a).
    pub held_back: usize,
}

/// Compares the versions both sides hold in the differing leaves. Both lists are
/// sorted by path. A tombstone older than `tombstone_floor` is not moved to a side
/// that holds nothing of its path: there is nothing there for it to delete (and a
/// purge check leaves a certificate there). A peer's version above `ceiling` is from
/// beyond the clock bound and is held back ([`crate::merge::Decision::Future`]).
pub fn plan(mine: &[Version], theirs: &[Version], tombstone_floor: u64, ceiling: u64) -> Plan {
    let mut p = Plan::default();
    let (mut i, mut j) = (0, 0);
    let expired = |v: &Version| v.tombstone && v.timestamp < tombstone_floor;
    while i < mine.len() || j < theirs.len() {
        let ord = match (mine.get(i), theirs.get(j)) {
            (Some(a), Some(b)) => a.path.cmp(&b.path),
            (Some(_), None) => std::cmp::Ordering::Less,
            (None, _) => std::cmp::Ordering::Greater,
        };
        match ord {
            std::cmp::Ordering::Less => {
                if !expired(&mine[i]) {
                    p.send.push(mine[i].path.clone());
                }
                i += 1;
            }
            std::cmp::Ordering::Greater => {
                if theirs[j].timestamp > ceiling {
                    p.held_back += 1;
                } else if !expired(&theirs[j]) {
                    p.fetch.push(theirs[j].path.clone());
                }
                j += 1;
            }
            std::cmp::Ordering::Equal => {
                let (a, b) = (&mine[i], &theirs[j]);
                match a.timestamp.cmp(&b.timestamp) {
                    std::cmp::Ordering::Greater => p.send.push(a.path.clone()),
                    std::cmp::Ordering::Less if b.timestamp > ceiling => p.held_back += 1,
                    std::cmp::Ordering::Less => p.fetch.push(b.path.clone()),
                    // An expiry tombstone follows its version (ARCHITECTURE.md, "Expiry").
                    std::cmp::Ordering::Equal if b.is_expiry_of(a) => p.fetch.push(b.path.clone()),
                    std::cmp::Ordering::Equal if a.is_expiry_of(b) => p.send.push(a.path.clone()),
                    std::cmp::Ordering::Equal if a.uuid != b.uuid => p.collisions.push(a.path.clone()),
                    std::cmp::Ordering::Equal => {}
                }
                i += 1;
                j += 1;
            }
        }
    }
    p
}

/// The stale-node rule. A node that has not been in contact with the cluster since
/// `my_last_contact` may hold records whose deletes it never received; a peer that has
/// purged tombstones up to `peer_gc_horizon` can no longer send it those deletes. If
/// the peer purged past our last contact, records at or below the horizon may be
/// resurrections: the answer is the horizon up to which this node must discard its
/// records and fetch them again. `0` means "never in contact": such a node was never
/// part of this cluster's history and has nothing stale.
pub fn stale_below(my_last_contact: u64, peer_gc_horizon: u64) -> Option<u64> {
    (my_last_contact > 0 && peer_gc_horizon > my_last_contact).then_some(peer_gc_horizon)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::merge::{Decision, Floors, decide_apply};
    use bytes::Bytes;
    use rand::rngs::StdRng;
    use rand::{RngExt, SeedableRng};
    use std::collections::BTreeMap;

    fn v(path: &str, ts: u64, id: u128, tomb: bool) -> Version {
        Version { path: path.into(), timestamp: ts, uuid: Uuid::from_u128(id), tombstone: tomb }
    }

    /// A store as the rules see it: path -> record, and its leaf hashes.
    #[derive(Clone, Default)]
    struct Model {
        records: BTreeMap<String, Record>,
    }

    impl Model {
        /// The writer's own decision ([`decide_apply`]); collisions keep the local version.
        fn apply(&mut self, path: &str, r: &Record) {
            if decide_apply(self.records.get(path), None, r, Floors::default()) == Decision::Store {
                self.records.insert(path.to_string(), r.clone());
            }
        }
        fn leaves(&self) -> Vec<u64> {
            let mut l = vec![0u64; LEAVES];
            for (p, r) in &self.records {
                l[leaf_of(p) as usize] ^= record_digest(p, r);
            }
            l
        }
        fn versions_in(&self, leaves: &[usize]) -> Vec<Version> {
            self.records
                .iter()
                .filter(|(p, _)| leaves.contains(&(leaf_of(p) as usize)))
                .map(|(p, r)| Version::of(p, r))
                .collect()
        }
    }

    fn random_record(rng: &mut StdRng) -> (String, Record) {
        let path = format!("k/{}", rng.random_range(0..50u32));
        let ts = rng.random_range(1..20u64);
        let uuid = Uuid::from_u128(rng.random_range(0..3u128) + u128::from(ts) * 10);
        let data = if rng.random_range(0..4u8) == 0 { None } else { Some(Bytes::from(format!("{ts}"))) };
        (path, Record { timestamp: ts, uuid, data, expires: None })
    }

    #[test]
    fn a_version_and_its_expiry_tombstone_merge_the_same_in_any_order() {
        let mut rng = StdRng::seed_from_u64(11);
        let expiring = Record { expires: Some(100), ..Record::value(5, Uuid::from_u128(1), Bytes::from("1")) };
        let versions = [
            expiring.clone(),
            crate::ttl::expiry_tombstone(&expiring),
            Record::value(4, Uuid::from_u128(2), Bytes::from("2")),
            Record::value(6, Uuid::from_u128(3), Bytes::from("3")),
        ];
        for _ in 0..100 {
            let n = rng.random_range(1..=versions.len());
            let mut picked: Vec<Record> = versions.iter().take(n).cloned().collect();
            let mut a = Model::default();
            for r in &picked {
                a.apply("k", r);
            }
            rand::seq::SliceRandom::shuffle(picked.as_mut_slice(), &mut rng);
            let mut b = Model::default();
            for r in &picked {
                b.apply("k", r);
            }
            assert_eq!(a.records, b.records, "{picked:?}");
            // Never a collision between the version and its tombstone: the plan moves one.
            if n >= 2 {
                let (v, t) = (Version::of("k", &versions[0]), Version::of("k", &versions[1]));
                let p = plan(std::slice::from_ref(&v), std::slice::from_ref(&t), 0, u64::MAX);
                assert_eq!((p.fetch, p.collisions.len()), (vec!["k".to_string()], 0));
                assert_eq!(plan(&[t], &[v], 0, u64::MAX).send, vec!["k".to_string()]);
            }
        }
    }

    #[test]
    fn merge_is_order_and_duplicate_independent() {
        let mut rng = StdRng::seed_from_u64(42);
        for _ in 0..200 {
            // Distinct versions only: uuids are unique per (path, timestamp) here, so
            // there are no collisions and the outcome must not depend on order.
            let mut batch: BTreeMap<(String, u64), Record> = BTreeMap::new();
            for _ in 0..40 {
                let (p, r) = random_record(&mut rng);
                batch.entry((p, r.timestamp)).or_insert(r);
            }
            let records: Vec<(String, Record)> = batch.into_iter().map(|((p, _), r)| (p, r)).collect();
            let mut a = Model::default();
            for (p, r) in &records {
                a.apply(p, r);
            }
            let mut shuffled = records.clone();
            shuffled.extend(records.iter().take(10).cloned());
            rand::seq::SliceRandom::shuffle(shuffled.as_mut_slice(), &mut rng);
            let mut b = Model::default();
            for (p, r) in shuffled.iter().chain(records.iter()) {
                b.apply(p, r);
            }
            assert_eq!(a.records, b.records);
            assert_eq!(a.leaves(), b.leaves());
        }
    }

    #[test]
    fn equal_data_equal_summaries_and_every_single_difference_is_found() {
        let mut rng = StdRng::seed_from_u64(7);
        let mut base = Model::default();
        for i in 0..2_000 {
            base.apply(&format!("p/{i}"), &Record::value(i + 1, Uuid::from_u128(i as u128), Bytes::from("1")));
        }
        let copy = base.clone();
        assert_eq!(base.leaves(), copy.leaves());
        assert!(differing(&level1(&base.leaves()), &level1(&copy.leaves())).is_empty());
        for case in 0..300 {
            let mut other = base.clone();
            let i = rng.random_range(0..2_000u64);
            let path = format!("p/{i}");
            let (expect_fetch, expect_collision) = match case % 4 {
                0 => {
                    other.records.remove(&path);
                    (false, false)
                }
                1 => {
                    other.apply(&path, &Record::tombstone(10_000, Uuid::from_u128(9)));
                    (true, false)
                }
                2 => {
                    let new = format!("new/{case}");
                    other.apply(&new, &Record::value(5, Uuid::from_u128(1), Bytes::from("1")));
                    let d = walk(&base, &other);
                    assert_eq!(d.fetch, vec![new]);
                    continue;
                }
                _ => {
                    let r = other.records.get_mut(&path).unwrap();
                    r.uuid = Uuid::from_u128(u128::MAX);
                    (false, true)
                }
            };
            let d = walk(&base, &other);
            match (expect_fetch, expect_collision) {
                (true, _) => assert_eq!(d.fetch, vec![path.clone()]),
                (_, true) => assert_eq!(d.collisions, vec![path.clone()]),
                _ => assert_eq!(d.send, vec![path.clone()]),
            }
        }
    }

    /// The three-step diff the sync protocol runs, between two models.
    fn walk(mine: &Model, theirs: &Model) -> Plan {
        let (lm, lt) = (mine.leaves(), theirs.leaves());
        let per = LEAVES / FANOUT;
        let mut leaves = Vec::new();
        for top in differing(&level1(&lm), &level1(&lt)) {
            let range = top * per..(top + 1) * per;
            leaves.extend(differing(&lm[range.clone()], &lt[range]).into_iter().map(|i| top * per + i));
        }
        plan(&mine.versions_in(&leaves), &theirs.versions_in(&leaves), 0, u64::MAX)
    }

    #[test]
    fn plan_moves_newer_both_ways_and_skips_expired_tombstones() {
        let mine = [v("a", 5, 1, false), v("b", 5, 1, false), v("c", 5, 1, false), v("e", 1, 1, true)];
        let theirs = [v("b", 6, 2, false), v("c", 5, 3, false), v("d", 2, 1, false), v("f", 1, 2, true)];
        let p = plan(&mine, &theirs, 2, u64::MAX);
        assert_eq!(p.send, vec!["a"]);
        assert_eq!(p.fetch, vec!["b", "d"]);
        assert_eq!(p.collisions, vec!["c"]);
        assert_eq!(plan(&mine, &mine, 0, u64::MAX), Plan::default());
    }

    #[test]
    fn plan_holds_back_versions_from_beyond_the_clock_bound() {
        let mine = [v("a", 5, 1, false)];
        let theirs = [v("a", 9, 2, false), v("b", 10, 1, false), v("c", 7, 1, true)];
        let p = plan(&mine, &theirs, 0, 8);
        assert_eq!(p.fetch, vec!["c"]);
        assert_eq!(p.held_back, 2);
        assert!(p.send.is_empty(), "their newer version still wins over ours");
    }

    #[test]
    fn stale_rule() {
        assert_eq!(stale_below(0, 1_000), None, "never in contact: nothing stale");
        assert_eq!(stale_below(2_000, 1_000), None, "in contact after the peer's purges");
        assert_eq!(stale_below(500, 1_000), Some(1_000));
        assert_eq!(stale_below(500, 0), None);
    }

    #[test]
    fn leaves_spread_and_level1_folds() {
        let l: Vec<u64> = (0..LEAVES as u64).collect();
        let top = level1(&l);
        assert_eq!(top.len(), FANOUT);
        assert_eq!(top[0], (0..256u64).fold(0, |a, b| a ^ b));
        let hits: std::collections::HashSet<u16> = (0..1000).map(|i| leaf_of(&format!("k/{i}"))).collect();
        assert!(hits.len() > 980, "paths spread over leaves");
    }
}
