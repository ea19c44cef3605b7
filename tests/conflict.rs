//! Timestamp collisions settled by cluster-wide vote, with real processes and data
//! dirs prepared by the kvs-conflict tool.

mod common;
use common::*;
use std::process::Command;

const TOOL: &str = env!("CARGO_BIN_EXE_kvs-conflict");
const TS: &str = "1700000000000";
const A: &str = r#"{"v":"A"}"#;
const B: &str = r#"{"v":"B"}"#;

/// Nodes n1..nN that formed a cluster in that order (n1 is the oldest) and were then
/// stopped, ports pinned, so they can be prepared with the tool and started again.
fn stopped_cluster(n: usize) -> (tempfile::TempDir, Vec<Node>) {
    let d = tempfile::tempdir().unwrap();
    let mut nodes: Vec<Node> = Vec::new();
    for i in 1..=n {
        let id = format!("n{i}");
        let seeds: Vec<&str> = nodes.first().map(|f| vec![f.addr.as_str()]).unwrap_or_default();
        // Slow regular sync: every member is back before the collision is found.
        let config = cluster_config_with(&id, &seeds, "sync_interval: 2");
        nodes.push(Node::start_in(&d.path().join(&id), &config));
    }
    let ids: Vec<String> = (1..=n).map(|i| format!("n{i}")).collect();
    let ids: Vec<&str> = ids.iter().map(String::as_str).collect();
    for node in &nodes {
        wait_members_alive(node, &ids);
        wait_normal(node);
    }
    for node in nodes.iter_mut() {
        node.pin_port();
        assert!(node.terminate().success());
    }
    (d, nodes)
}

fn make_conflict(extra: &[&str], writes: &[(&Node, &str)]) {
    let mut cmd = Command::new(TOOL);
    cmd.args(["--key", "test/conflict", "--timestamp", TS]).args(extra);
    for (node, json) in writes {
        cmd.arg(format!("{}={json}", node.dir.join("data").display()));
    }
    let out = cmd.output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
}

/// Waits until every node holds `want` at `path`, as one version (same ETag).
fn wait_converged(nodes: &[&Node], path: &str, want: &str) {
    wait_for(DEADLINE, &format!("{path} = {want} everywhere"), || {
        let answers: Vec<Resp> = nodes.iter().map(|n| n.get(path)).collect();
        let same = answers
            .iter()
            .all(|r| r.status == 200 && r.text() == want && r.header("etag") == answers[0].header("etag"));
        same.then_some(())
    });
}

fn resolved_by(nodes: &[&Node], rule: &str) -> bool {
    nodes.iter().any(|n| n.log().contains(&format!("\"rule\":\"{rule}\"")))
}

#[test]
fn the_majority_beats_the_oldest_node() {
    let (_d, mut n) = stopped_cluster(3);
    make_conflict(&[], &[(&n[0], B), (&n[1], A), (&n[2], A)]);
    for node in n.iter_mut() {
        node.restart();
    }
    let all: Vec<&Node> = n.iter().collect();
    wait_converged(&all, "/kv/test/conflict", A);
    assert!(resolved_by(&all, "majority"));
    assert!(
        all.iter().map(|x| x.health()["replication"]["conflicts_resolved"]["majority"].as_u64().unwrap()).sum::<u64>()
            >= 1
    );
}

#[test]
fn two_nodes_tie_and_the_first_to_join_wins_both_ways_round() {
    for (first, second) in [(A, B), (B, A)] {
        let (_d, mut n) = stopped_cluster(2);
        make_conflict(&[], &[(&n[0], first), (&n[1], second)]);
        for node in n.iter_mut() {
            node.restart();
        }
        let all: Vec<&Node> = n.iter().collect();
        wait_converged(&all, "/kv/test/conflict", first);
        assert!(resolved_by(&all, "oldest-node"));
    }
}

#[test]
fn four_nodes_split_two_to_two_go_to_the_oldest() {
    let (_d, mut n) = stopped_cluster(4);
    make_conflict(&[], &[(&n[0], B), (&n[1], A), (&n[2], A), (&n[3], B)]);
    for node in n.iter_mut() {
        node.restart();
    }
    let all: Vec<&Node> = n.iter().collect();
    wait_converged(&all, "/kv/test/conflict", B);
}

#[test]
fn a_collision_on_500_paths_resolves_on_all_of_them() {
    let (_d, mut n) = stopped_cluster(3);
    make_conflict(&["--count", "500"], &[(&n[0], B), (&n[1], A), (&n[2], A)]);
    for node in n.iter_mut() {
        node.restart();
    }
    let all: Vec<&Node> = n.iter().collect();
    for i in [0, 1, 250, 498, 499] {
        wait_converged(&all, &format!("/kv/test/conflict/{i}"), A);
    }
    // Every path, on every node.
    wait_for(DEADLINE, "all 500 paths resolved", || {
        all.iter().all(|node| (0..500).all(|i| node.get(&format!("/kv/test/conflict/{i}")).text() == A)).then_some(())
    });
}

#[test]
fn a_node_down_during_the_vote_gets_the_winner_when_it_returns() {
    let (_d, mut n) = stopped_cluster(3);
    make_conflict(&[], &[(&n[0], A), (&n[1], B), (&n[2], B)]);
    // n3 stays down: n1 and n2 tie, and n1 (older) wins.
    n[0].restart();
    n[1].restart();
    wait_converged(&[&n[0], &n[1]], "/kv/test/conflict", A);
    n[2].restart();
    let all: Vec<&Node> = n.iter().collect();
    wait_converged(&all, "/kv/test/conflict", A);
}

#[test]
fn the_tool_refuses_bad_arguments_and_running_nodes() {
    for args in [
        vec!["--key", "a", "x=1"],
        vec!["--timestamp", "1", "x=1"],
        vec!["--key", "a/../b", "--timestamp", "1", "x=1"],
        vec!["--key", "a", "--timestamp", "1", "x={"],
        vec!["--key", "a", "--timestamp", "1"],
    ] {
        let out = Command::new(TOOL).args(&args).output().unwrap();
        assert_eq!(out.status.code(), Some(2), "{args:?}");
    }
    let d = tempfile::tempdir().unwrap();
    let running = Node::start_in(d.path(), "");
    let out = Command::new(TOOL)
        .args(["--key", "a", "--timestamp", TS])
        .arg(format!("{}={A}", running.dir.join("data").display()))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("stop its node first"));
}
