//! Cluster keys with real processes (README "Security", ARCHITECTURE.md "Cluster
//! authentication"): only holders of a key take part in the cluster.

mod common;
use common::*;
use std::path::Path;
use std::process::Command;

/// A new key, from `kvs keygen`.
fn keygen() -> String {
    let out = Command::new(BIN).arg("keygen").output().unwrap();
    assert!(out.status.success());
    let key = String::from_utf8(out.stdout).unwrap().trim().to_string();
    assert_eq!(key.len(), 44, "32 bytes in base64: {key}");
    key
}

/// Writes a key file holding `keys`, one a line, in `dir`, and returns the config line.
fn key_file(dir: &Path, name: &str, keys: &[&str]) -> String {
    std::fs::create_dir_all(dir).unwrap();
    let path = dir.join(name);
    std::fs::write(&path, keys.join("\n") + "\n").unwrap();
    format!("cluster_key_file: {}", path.display())
}

/// POSTs `sent` to a node-to-node route with a signature made with `key` for
/// `signed` at `time` (Unix ms).
fn signed_post(addr: &str, key: &str, route: &str, signed: &[u8], sent: &[u8], time: u64) -> Resp {
    let keys = kvs::auth::ClusterKeys::parse(key).unwrap();
    let digest = kvs::auth::digest(signed);
    let signed = kvs::auth::Signed { method: "POST", path_and_query: route, last_contact: None };
    let signature = keys.sign(&signed, time, &digest);
    let (wire, time) = (kvs::protocol::WIRE_VERSION.to_string(), time.to_string());
    let headers = [
        ("X-Kvs-Wire", wire.as_str()),
        ("X-Kvs-Time", time.as_str()),
        ("X-Kvs-Body-Sha256", digest.as_str()),
        ("X-Kvs-Signature", signature.as_str()),
    ];
    raw(addr, &request("POST", route, &headers, Some(sent)), false)
}

fn refused(n: &Node) -> u64 {
    n.health()["cluster_auth_refused"].as_u64().expect("cluster_auth_refused in /health")
}

#[test]
fn nodes_with_the_cluster_key_replicate_and_unsigned_node_to_node_calls_get_401() {
    let d = Dirs::new();
    let key = keygen();
    let extra = key_file(d.0.path(), "cluster.key", &[&key]);
    let (n1, n2) = two(&d, &extra);
    assert_eq!(n1.put("/kv/signed", "\"yes\"").status, 200);
    wait_value(&n2, "/kv/signed", Some("\"yes\""));
    assert_eq!(refused(&n1) + refused(&n2), 0);
    // A client (or a node without the key) reaches no node-to-node route: not the
    // membership ones, not the data ones.
    let member =
        r#"{"id":"evil","uid":"u","address":"127.0.0.1:1","joined_timestamp":1,"incarnation":1,"heartbeat":1}"#;
    for (route, body) in [
        (kvs::protocol::routes::JOIN, member),
        (kvs::protocol::routes::GOSSIP, r#"{"members":[]}"#),
        (kvs::protocol::routes::PUSH, ""),
        (kvs::protocol::routes::FETCH, r#"["signed"]"#),
        (kvs::protocol::routes::PURGE_CHECK, "[]"),
    ] {
        peer_post(&n1.addr, route, body.as_bytes()).assert_error(401);
    }
    peer_get(&n1.addr, kvs::protocol::routes::LEVEL1).assert_error(401);
    assert_eq!(refused(&n1), 6);
    assert!(n1.get("/metrics").text().contains("kvs_cluster_auth_refused_total 6"));
    // Nothing of it was taken: still two members, still one key.
    wait_members_alive(&n1, &["n1", "n2"]);
    assert_eq!(n1.health()["keys"], 1);
    // A holder of the key gets through; a body swapped under a signed digest, or a
    // signature from two minutes ago, does not.
    let fetch = kvs::protocol::routes::FETCH;
    let now = kvs::clock::now_ms();
    assert_eq!(signed_post(&n1.addr, &key, fetch, br#"["signed"]"#, br#"["signed"]"#, now).status, 200);
    signed_post(&n1.addr, &key, fetch, br#"["signed"]"#, br#"["other!"]"#, now).assert_error(400);
    signed_post(&n1.addr, &key, fetch, br#"["signed"]"#, br#"["signed"]"#, now - 120_000).assert_error(401);
    assert_eq!(refused(&n1), 7);
}

#[test]
fn a_node_with_another_key_is_kept_out_and_says_so_once() {
    let d = Dirs::new();
    let ours = key_file(d.0.path(), "ours.key", &[&keygen()]);
    let theirs = key_file(d.0.path(), "theirs.key", &[&keygen()]);
    let n1 = d.start("n1", &[], &ours);
    let n3 = d.start("n3", &[&n1.addr], &theirs);
    // n3 keeps retrying; n1 counts the refusals and never lists n3.
    wait_for(DEADLINE, "n1 to refuse n3 twice", || (refused(&n1) >= 2).then_some(()));
    wait_gossip_rounds(&n1, 10);
    assert_eq!(members(&n1), vec![("n1".to_string(), "alive".to_string())]);
    let lines = n3.log().lines().filter(|l| l.contains("refused this node's cluster key")).count();
    assert_eq!(lines, 1, "one line a minute naming the seed:\n{}", n3.log());
    assert!(n3.log().contains(&n1.addr));
}

#[test]
fn a_key_rotation_one_node_at_a_time_refuses_no_request() {
    let d = Dirs::new();
    let (a, b) = (keygen(), keygen());
    let dir = d.0.path();
    let only_a = key_file(dir, "a.key", &[&a]);
    let a_then_b = key_file(dir, "ab.key", &[&a, &b]);
    let b_then_a = key_file(dir, "ba.key", &[&b, &a]);
    let only_b = key_file(dir, "b.key", &[&b]);
    let (mut n1, mut n2) = two(&d, &only_a);
    for n in [&mut n1, &mut n2] {
        n.pin_port();
    }
    let mut written = 0;
    // Each step restarts the nodes one at a time with the next key file, writing on
    // both all along: every write reaches the other node and no request is refused.
    for step in [&a_then_b, &b_then_a, &only_b] {
        for i in 0..2 {
            let node = if i == 0 { &mut n1 } else { &mut n2 };
            assert!(node.terminate().success());
            let text = std::fs::read_to_string(&node.config).unwrap();
            let kept: Vec<&str> = text.lines().filter(|l| !l.starts_with("cluster_key_file:")).collect();
            std::fs::write(&node.config, kept.join("\n") + "\n" + step + "\n").unwrap();
            node.restart();
            wait_members_alive(node, &["n1", "n2"]);
            for n in [&n1, &n2] {
                written += 1;
                assert_eq!(n.put(&format!("/kv/rotation/{written}"), "1").status, 200);
            }
            for n in [&n1, &n2] {
                wait_value(n, &format!("/kv/rotation/{written}"), Some("1"));
            }
            assert_eq!(refused(&n1) + refused(&n2), 0, "a request was refused during the rotation");
        }
    }
}

#[test]
fn a_bad_key_file_stops_the_start_with_one_line_naming_the_key() {
    let d = Dirs::new();
    for (name, text) in [("empty.key", ""), ("short.key", "AAAA"), ("junk.key", "not a key!")] {
        let line = key_file(d.0.path(), name, &[text]);
        let mut n = Node::spawn_in(&d.0.path().join(name.replace('.', "-")), &line);
        let status = n.wait_exit();
        assert_eq!(status.code(), Some(2), "{name}");
        let log = n.log();
        assert!(log.contains("cluster_key_file"), "{name}: {log}");
        assert_eq!(log.trim().lines().count(), 1, "{name}: {log}");
    }
    let missing = format!("cluster_key_file: {}", d.0.path().join("nowhere.key").display());
    let mut n = Node::spawn_in(&d.0.path().join("missing"), &missing);
    assert_eq!(n.wait_exit().code(), Some(2));
    assert!(n.log().contains("cluster_key_file") && n.log().contains("nowhere.key"), "{}", n.log());
}
