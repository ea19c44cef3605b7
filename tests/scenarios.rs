//! Partition scenarios as data: several kvs nodes run in this test process on the
//! in-process network ([`kvs::localnet`]), and each scenario is a list of steps that
//! write, delete, cut and heal single links, and wait for what must hold. Each node
//! still serves its client API on a real port of 127.0.0.1, so the steps read and
//! write as a client does.
//!
//! Process tests (real binaries, kill -9, iptables in kvs-nemesis) cover what needs a
//! process; these cover the link-level partitions a whole-process pause cannot make:
//! a link cut between two nodes that both still reach a third, and a cut in one
//! direction only.

mod common;
use common::*;
use kvs::localnet::LocalNet;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::oneshot;

/// Nodes of one scenario, all in this process. Dropping it stops every node (also
/// when the test fails) and waits for each to close its storage.
struct Net {
    rt: tokio::runtime::Runtime,
    net: Arc<LocalNet>,
    nodes: Vec<Member>,
    dir: tempfile::TempDir,
    /// When the scenario saw its first settled vote.
    first_vote: std::sync::OnceLock<std::time::Instant>,
}

struct Member {
    addr: String,
    stop: Option<oneshot::Sender<()>>,
    done: Option<tokio::task::JoinHandle<Result<(), kvs::node::NodeError>>>,
}

/// One step of a scenario. Nodes are named by index; `n0` is the oldest.
#[derive(Debug, Clone, Copy)]
enum Step<'a> {
    /// A client writes `value` at `key` on a node (must be acknowledged).
    Put(usize, &'a str, &'a str),
    /// A client deletes `key` on a node (must be acknowledged).
    Delete(usize, &'a str),
    /// Cut the link between two nodes, both ways.
    Cut(usize, usize),
    /// Cut the link from the first node to the second only.
    CutOneWay(usize, usize),
    /// Heal every link.
    HealAll,
    /// Wait until every node answers `key` with this value (`None`: 404).
    Everywhere(&'a str, Option<&'a str>),
    /// Wait until a node has completed this many more sync rounds.
    SyncRounds(usize, u64),
    /// Every node lists every member as alive at every look while a node runs this
    /// many more gossip rounds.
    AllAliveFor(usize, u64),
    /// Wait until one node answers `key` with this value (`None`: 404).
    On(usize, &'a str, Option<&'a str>),
    /// A node answers `key` with this value (`None`: 404), now.
    Still(usize, &'a str, Option<&'a str>),
    /// A node's pushes have failed at least once (the cut is in the way).
    PushFailed(usize),
    /// A version of `key` holding `value`, with the same timestamp as the version the
    /// second node holds but another uuid, arrives at the first node as a peer's push:
    /// a timestamp collision, as two nodes stamping the same time would make.
    Collide(usize, &'a str, &'a str, usize),
    /// Every node holds the same version of `key` (one ETag), with this value.
    OneVersion(&'a str, &'a str),
    /// The cluster has settled this many collision votes at most, in total.
    VotesAtMost(u64),
    /// Wait until the cluster has settled at least this many votes, in total.
    VotesAtLeast(u64),
    /// Like `OneVersion`, waiting past the vote cooldown (30 s) as well.
    SettlesAfterCooldown(&'a str, &'a str),
}

const KEYS: &str = "/kv/";

impl Net {
    /// Starts `n` nodes with sub-second timings (`extra` config lines replace the keys
    /// they name), each seeded with the first, and waits until all are alive and serving.
    fn start(n: usize, extra: &str) -> Net {
        let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
        // The nodes' logs go to the test's output: shown when a scenario fails.
        let _ = tracing_subscriber::fmt().with_test_writer().with_env_filter("kvs=info").try_init();
        let mut net = Net {
            rt,
            net: LocalNet::new(),
            nodes: Vec::new(),
            dir: tempfile::tempdir().unwrap(),
            first_vote: std::sync::OnceLock::new(),
        };
        for i in 0..n {
            net.add(i, extra);
        }
        let ids: Vec<String> = (0..n).map(|i| format!("n{i}")).collect();
        for i in 0..n {
            wait_for(DEADLINE, &format!("n{i} serving with every member alive"), || {
                let mode = health(&net.nodes[i].addr)["mode"] == "normal";
                (mode && alive_members(&net.nodes[i].addr) == ids).then_some(())
            });
        }
        net
    }

    fn add(&mut self, i: usize, extra: &str) {
        let id = format!("n{i}");
        let seeds: Vec<&str> = self.nodes.first().map(|m| vec![m.addr.as_str()]).unwrap_or_default();
        let path = config_in(&self.dir.path().join(&id), &cluster_config_with(&id, &seeds, extra));
        let config = kvs::config::Config::load(&path).unwrap();
        let (stop_tx, stop_rx) = oneshot::channel::<()>();
        let (addr_tx, addr_rx) = std::sync::mpsc::channel();
        let embedding = self.net.embedding(
            Box::pin(async move {
                let _ = stop_rx.await;
            }),
            move |app| {
                let _ = addr_tx.send(app.cluster.me().address);
            },
        );
        let done = self.rt.spawn(kvs::node::run_embedded(config, embedding));
        let addr = addr_rx.recv_timeout(DEADLINE).unwrap_or_else(|_| panic!("{id} did not start"));
        self.nodes.push(Member { addr, stop: Some(stop_tx), done: Some(done) });
    }

    fn addr(&self, i: usize) -> &str {
        &self.nodes[i].addr
    }

    /// Runs the steps in order.
    fn run(&self, steps: &[Step]) {
        for (n, step) in steps.iter().enumerate() {
            let at = format!("step {n} {step:?}");
            match *step {
                Step::Put(i, key, value) => {
                    let r = http(self.addr(i), "PUT", &format!("{KEYS}{key}"), Some(value.as_bytes()));
                    assert!(r.status == 200 || r.status == 201, "{at}: {} {}", r.status, r.text());
                }
                Step::Delete(i, key) => {
                    let r = http(self.addr(i), "DELETE", &format!("{KEYS}{key}"), None);
                    assert!(r.status == 200 || r.status == 204, "{at}: {} {}", r.status, r.text());
                }
                Step::Cut(a, b) => self.net.cut(self.addr(a), self.addr(b)),
                Step::CutOneWay(a, b) => self.net.cut_one_way(self.addr(a), self.addr(b)),
                Step::HealAll => self.net.heal_all(),
                Step::Everywhere(key, want) => {
                    for i in 0..self.nodes.len() {
                        self.wait_value(i, key, want, &at);
                    }
                }
                Step::On(i, key, want) => self.wait_value(i, key, want, &at),
                Step::Still(i, key, want) => {
                    let r = http(self.addr(i), "GET", &format!("{KEYS}{key}"), None);
                    match want {
                        Some(v) => assert!(r.status == 200 && r.text() == v, "{at}: {} {}", r.status, r.text()),
                        None => assert_eq!(r.status, 404, "{at}: {}", r.text()),
                    }
                }
                Step::PushFailed(i) => wait_for(DEADLINE, &at, || {
                    (health(self.addr(i))["replication"]["push_failed"].as_u64()? > 0).then_some(())
                }),
                Step::Collide(i, key, value, like) => {
                    let held = http(self.addr(like), "GET", &format!("{KEYS}{key}"), None);
                    assert_eq!(held.status, 200, "{at}: {}", held.text());
                    let record = kvs::record::Record {
                        timestamp: version_of_header(&held),
                        uuid: uuid::Uuid::new_v4(),
                        data: Some(bytes::Bytes::from(value.to_string())),
                        expires: None,
                    };
                    let batch = kvs::wire::encode([(key, &record)]);
                    let r = peer_post(self.addr(i), kvs::protocol::routes::PUSH, &batch);
                    assert_eq!(r.status, 200, "{at}: {}", r.text());
                }
                Step::OneVersion(key, want) => self.wait_one_version(key, want, DEADLINE, &at),
                Step::SettlesAfterCooldown(key, want) => {
                    let cooldown = Duration::from_millis(kvs::conflict::VOTE_COOLDOWN_MS);
                    self.wait_one_version(key, want, cooldown + DEADLINE, &at)
                }
                Step::VotesAtMost(most) => {
                    // Each node may vote on a collision once per cooldown: on a machine so
                    // slow that the steps outlast one, another round of votes is allowed.
                    let cooldown = Duration::from_millis(kvs::conflict::VOTE_COOLDOWN_MS);
                    let windows =
                        self.first_vote.get().map_or(1, |t| 1 + t.elapsed().as_millis() / cooldown.as_millis());
                    let votes = self.votes();
                    assert!(votes <= most * windows as u64, "{at}: {votes} votes settled in {windows} cooldown(s)");
                }
                Step::VotesAtLeast(least) => {
                    wait_for(DEADLINE, &at, || (self.votes() >= least).then_some(()));
                    let _ = self.first_vote.set(std::time::Instant::now());
                }
                Step::SyncRounds(i, k) => self.wait_counter(i, &["replication", "sync_ok"], k, &at),
                Step::AllAliveFor(i, rounds) => {
                    let ids: Vec<String> = (0..self.nodes.len()).map(|j| format!("n{j}")).collect();
                    let rounds_now = || health(self.addr(i))["gossip_rounds"].as_u64();
                    let start = rounds_now().expect("gossip_rounds in /health");
                    wait_for(DEADLINE, &at, || {
                        for m in &self.nodes {
                            let members = http(&m.addr, "GET", "/members/", None).text();
                            assert_eq!(alive_members(&m.addr), ids, "{at}: {} lists {members}", m.addr);
                        }
                        (rounds_now()? >= start + rounds).then_some(())
                    });
                }
            }
        }
    }

    fn wait_one_version(&self, key: &str, want: &str, deadline: Duration, at: &str) {
        wait_for(deadline, at, || {
            let answers: Vec<Resp> =
                self.nodes.iter().map(|m| http(&m.addr, "GET", &format!("{KEYS}{key}"), None)).collect();
            let etag = answers[0].header("etag").map(str::to_string);
            answers
                .iter()
                .all(|r| r.status == 200 && r.text() == want && r.header("etag").map(str::to_string) == etag)
                .then_some(())
        });
    }

    /// Collision votes settled so far, summed over the nodes.
    fn votes(&self) -> u64 {
        self.nodes
            .iter()
            .map(|m| {
                let h = health(&m.addr)["replication"]["conflicts_resolved"].clone();
                ["majority", "oldest_node", "fallback"].iter().filter_map(|r| h[*r].as_u64()).sum::<u64>()
            })
            .sum()
    }

    fn wait_value(&self, i: usize, key: &str, want: Option<&str>, at: &str) {
        wait_for(DEADLINE, &format!("{at} on n{i}"), || {
            let r = http(self.addr(i), "GET", &format!("{KEYS}{key}"), None);
            match want {
                Some(v) => (r.status == 200 && r.text() == v).then_some(()),
                None => (r.status == 404).then_some(()),
            }
        });
    }

    fn wait_counter(&self, i: usize, field: &[&str], more: u64, at: &str) {
        let read = || field.iter().fold(health(self.addr(i)), |v, f| v[*f].clone()).as_u64();
        let start = read().unwrap_or_else(|| panic!("{at}: no {field:?} in /health"));
        wait_for(DEADLINE, at, || (read()? >= start + more).then_some(()));
    }
}

impl Drop for Net {
    fn drop(&mut self) {
        for m in &mut self.nodes {
            if let Some(stop) = m.stop.take() {
                let _ = stop.send(());
            }
        }
        let done: Vec<_> = self.nodes.iter_mut().filter_map(|m| m.done.take()).collect();
        self.rt.block_on(async {
            for (i, d) in done.into_iter().enumerate() {
                match tokio::time::timeout(Duration::from_secs(30), d).await {
                    Ok(Ok(Ok(()))) => {}
                    Ok(Ok(Err(e))) => eprintln!("n{i} stopped with an error: {e}"),
                    Ok(Err(e)) => eprintln!("n{i} panicked: {e}"),
                    Err(_) => eprintln!("n{i} did not stop within 30 s"),
                }
            }
        });
    }
}

/// The full version (HLC timestamp) a GET answered.
fn version_of_header(r: &Resp) -> u64 {
    r.header("x-kvs-version").and_then(|v| v.parse().ok()).expect("X-Kvs-Version on a GET")
}

fn health(addr: &str) -> serde_json::Value {
    http(addr, "GET", "/health", None).json()
}

/// Ids of the members a node lists as alive, sorted.
fn alive_members(addr: &str) -> Vec<String> {
    let v = http(addr, "GET", "/members/", None).json();
    let mut ids: Vec<String> = v
        .as_array()
        .map(|a| {
            a.iter().filter(|m| m["status"] == "alive").filter_map(|m| Some(m["id"].as_str()?.to_string())).collect()
        })
        .unwrap_or_default();
    ids.sort();
    ids
}

use Step::*;

#[test]
fn a_link_cut_between_two_nodes_that_both_reach_a_third_loses_nothing() {
    let net = Net::start(3, "");
    net.run(&[
        Cut(0, 1),
        Put(0, "a", r#"{"v":1}"#),
        Put(1, "b", r#"{"v":2}"#),
        PushFailed(0),
        PushFailed(1),
        // Neither push crosses the cut: each reaches n1/n0 through n2's sync.
        Everywhere("a", Some(r#"{"v":1}"#)),
        Everywhere("b", Some(r#"{"v":2}"#)),
        Delete(1, "a"),
        Everywhere("a", None),
        Put(0, "b", r#"{"v":3}"#),
        Everywhere("b", Some(r#"{"v":3}"#)),
        // Past removal_timeout (2 s) with the link still cut: n0 and n1 hear of each
        // other through n2's gossip, so neither is ever declared down or removed.
        AllAliveFor(0, 25),
        HealAll,
        Put(1, "c", r#"{"v":4}"#),
        Everywhere("c", Some(r#"{"v":4}"#)),
        Everywhere("a", None),
    ]);
}

#[test]
fn a_link_cut_one_way_loses_nothing() {
    let net = Net::start(3, "");
    net.run(&[
        // n0's calls to n1 never arrive; n1's calls to n0 arrive, their answers are lost.
        CutOneWay(0, 1),
        Put(0, "x", r#"{"from":0}"#),
        Put(1, "y", r#"{"from":1}"#),
        // Both directions fail: n0's push never arrives, n1's arrives unanswered.
        PushFailed(0),
        PushFailed(1),
        Everywhere("x", Some(r#"{"from":0}"#)),
        Everywhere("y", Some(r#"{"from":1}"#)),
        Delete(0, "y"),
        Delete(1, "x"),
        Everywhere("x", None),
        Everywhere("y", None),
        SyncRounds(1, 4),
        Everywhere("x", None),
        Everywhere("y", None),
        HealAll,
        SyncRounds(0, 2),
        Everywhere("x", None),
        Everywhere("y", None),
    ]);
}

#[test]
fn a_node_cut_off_from_everyone_catches_up_after_the_heal() {
    let net = Net::start(3, "");
    net.run(&[
        Put(0, "keep", r#"{"v":"old"}"#),
        Put(0, "gone", r#"{"v":"old"}"#),
        Everywhere("keep", Some(r#"{"v":"old"}"#)),
        Everywhere("gone", Some(r#"{"v":"old"}"#)),
        Cut(2, 0),
        Cut(2, 1),
        // Both sides take writes and deletes while apart.
        Put(0, "keep", r#"{"v":"majority"}"#),
        Delete(1, "gone"),
        Put(2, "lonely", r#"{"v":"minority"}"#),
        SyncRounds(0, 2),
        SyncRounds(1, 2),
        Still(2, "keep", Some(r#"{"v":"old"}"#)),
        Still(2, "gone", Some(r#"{"v":"old"}"#)),
        Still(0, "lonely", None),
        HealAll,
        Everywhere("keep", Some(r#"{"v":"majority"}"#)),
        Everywhere("gone", None),
        Everywhere("lonely", Some(r#"{"v":"minority"}"#)),
    ]);
}

#[test]
fn a_collision_under_an_asymmetric_partition_settles_once_on_the_majority() {
    let net = Net::start(3, "");
    let (a, b) = (r#"{"v":"A"}"#, r#"{"v":"B"}"#);
    net.run(&[
        Cut(2, 0),
        Cut(2, 1),
        Put(0, "c", a),
        On(1, "c", Some(a)),
        // n2, cut off, holds another version stamped with the same time.
        Collide(2, "c", b, 0),
        Still(2, "c", Some(b)),
        Still(0, "c", Some(a)),
        // n0's calls to n2 never arrive; n2's calls to n0 arrive, their answers are
        // lost: n2 never hears n0's vote, n0 never reaches n2.
        HealAll,
        CutOneWay(0, 2),
        // n0 and n1 hold A: the majority. n2 hears only n1 and itself, a tie that the
        // older of the two (n1) decides: A too.
        OneVersion("c", a),
        SyncRounds(1, 4),
        SyncRounds(2, 4),
        OneVersion("c", a),
        // Each node votes on one collision at most once per cooldown (30 s).
        VotesAtMost(3),
        HealAll,
        SyncRounds(0, 2),
        OneVersion("c", a),
        VotesAtMost(3),
    ]);
}

#[test]
fn votes_do_not_loop_when_one_side_cannot_hear_a_voter() {
    let net = Net::start(3, "");
    let (a, b) = (r#"{"v":"A"}"#, r#"{"v":"B"}"#);
    net.run(&[
        Cut(0, 1),
        Cut(0, 2),
        Put(1, "d", a),
        On(2, "d", Some(a)),
        // n0, the oldest, cut off, holds another version stamped with the same time.
        Collide(0, "d", b, 1),
        Still(0, "d", Some(b)),
        // n0 never hears n2's vote: to n0 it is a tie between n1's A and its own B,
        // which n0, the oldest, decides for B; n1 and n2 hear all three: A. Without
        // the cooldown each side pushes its winner, the other finds the collision
        // again and votes again, every round.
        HealAll,
        CutOneWay(2, 0),
        VotesAtLeast(2),
        SyncRounds(0, 6),
        SyncRounds(1, 6),
        VotesAtMost(3),
        Still(0, "d", Some(b)),
        Still(1, "d", Some(a)),
        // After the heal, the next vote (after the cooldown) hears every member.
        HealAll,
        SettlesAfterCooldown("d", a),
    ]);
}
