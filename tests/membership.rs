//! Cluster membership with real processes: join, gossip, failure detection, leave.

mod common;
use common::*;
use std::time::Duration;

#[test]
fn three_nodes_form_a_cluster_and_learn_by_gossip() {
    let d = Dirs::new();
    let n1 = d.start("n1", &[], "");
    // n3 joins before n2 exists, so it can only hear of n2 by gossip.
    let n3 = d.start("n3", &[&n1.addr], "");
    wait_members_alive(&n3, &["n1", "n3"]);
    let n2 = d.start("n2", &[&n1.addr], "");
    for n in [&n1, &n2, &n3] {
        wait_members_alive(n, &["n1", "n2", "n3"]);
        assert_eq!(n.health()["member_count"], 3);
    }
    assert!(n3.log().contains("\"member joined\"") && n3.log().contains("\"member\":\"n2\",\"via\":\"gossip\""));
    let listed = n3.get("/members/").json();
    let n2_row = listed.as_array().unwrap().iter().find(|m| m["id"] == "n2").unwrap().clone();
    assert_eq!(n2_row["address"], n2.addr.as_str());
    assert!(n2_row["joined_timestamp"].as_u64().unwrap() > 0);
}

#[test]
fn crashed_node_goes_down_then_is_removed_then_comes_back() {
    let d = Dirs::new();
    let n1 = d.start("n1", &[], "");
    let n2 = d.start("n2", &[&n1.addr], "");
    let mut n3 = d.start("n3", &[&n1.addr], "");
    n3.pin_port();
    wait_members_alive(&n1, &["n1", "n2", "n3"]);
    let joined = |n: &Node| {
        n.get("/members/")
            .json()
            .as_array()
            .unwrap()
            .iter()
            .find(|m| m["id"] == "n3")
            .map(|m| m["joined_timestamp"].clone())
    };
    let joined_before = joined(&n1).unwrap();
    n3.kill9();
    // failure_timeout is 1 s: down within that plus a gossip interval (and slack).
    for n in [&n1, &n2] {
        wait_for(Duration::from_secs(5), "n3 down", || {
            members(n).contains(&("n3".to_string(), "down".to_string())).then_some(())
        });
        assert_eq!(n.health()["member_count"], 2);
    }
    // removal_timeout is 2 s.
    for n in [&n1, &n2] {
        wait_members_alive(n, &["n1", "n2"]);
    }
    n3.restart();
    for n in [&n1, &n2, &n3] {
        wait_members_alive(n, &["n1", "n2", "n3"]);
    }
    assert_eq!(joined(&n1).unwrap(), joined_before, "a restart keeps joined_timestamp");
}

#[test]
fn sigterm_leave_removes_the_node_at_once() {
    let d = Dirs::new();
    // Long timeouts: only the leave can remove n3 within the deadline below.
    let slow = "failure_timeout: 60\nremoval_timeout: 120";
    let n1 = d.start("n1", &[], slow);
    let n2 = d.start("n2", &[&n1.addr], slow);
    let mut n3 = d.start("n3", &[&n1.addr], slow);
    for n in [&n1, &n2, &n3] {
        wait_members_alive(n, &["n1", "n2", "n3"]);
    }
    assert!(n3.terminate().success());
    assert!(n3.log().contains("\"left the cluster\""));
    for n in [&n1, &n2] {
        wait_for(Duration::from_secs(5), "n3 gone after its leave", || (members(n).len() == 2).then_some(()));
    }
    // Stale gossip must not bring it back: let both run several more rounds.
    for n in [&n1, &n2] {
        wait_gossip_rounds(n, 5);
    }
    for n in [&n1, &n2] {
        wait_members_alive(n, &["n1", "n2"]);
    }
}

#[test]
fn duplicate_node_id_is_refused() {
    let d = Dirs::new();
    let n1 = d.start("n1", &[], "");
    let _n2 = d.start("n2", &[&n1.addr], "");
    wait_members_alive(&n1, &["n1", "n2"]);
    let mut imposter = Node::spawn_in(&d.0.path().join("imposter"), &cluster_config("n2", &[&n1.addr]));
    let status = imposter.wait_exit();
    assert_eq!(status.code(), Some(1));
    let log = imposter.log();
    assert!(log.contains("already used by the node at"), "{log}");
    wait_members_alive(&n1, &["n1", "n2"]);
    let join = br#"{"id":"n1","uid":"x","address":"127.0.0.1:9","joined_timestamp":1,"incarnation":1,"heartbeat":0}"#;
    let r = peer_post(&n1.addr, kvs::protocol::routes::JOIN, join);
    r.assert_error(409);
    assert!(r.text().contains("already used"), "{}", r.text());
    // The same join from a node of protocol 1 (kvs before the HLC: its path, no
    // header) is refused for that reason, with 400 (a 409 made such a node exit), and
    // one log line; so is a versioned path without the header.
    let r = http(&n1.addr, "POST", "/members/join", Some(join));
    r.assert_error(400);
    assert!(r.text().contains("protocol version 1 refused"), "{}", r.text());
    assert_eq!(r.header("x-kvs-wire"), Some("2"));
    http(&n1.addr, "POST", "/internal/gossip", Some(br#"{"members":[]}"#)).assert_error(400);
    http(&n1.addr, "POST", "/internal/v2/gossip", Some(br#"{"members":[]}"#)).assert_error(400);
    wait_for(DEADLINE, "the refusal logged", || {
        n1.log().contains("node-to-node protocol version 1 refused").then_some(())
    });
}

#[test]
fn a_seed_that_is_down_does_not_stop_the_join() {
    let d = Dirs::new();
    // A port nothing listens on: bind, note, close.
    let dead = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().to_string();
    let n1 = d.start("n1", &[], "");
    let n2 = d.start("n2", &[&dead, &n1.addr], "");
    wait_members_alive(&n2, &["n1", "n2"]);

    // A node whose only seed is down at start joins once the seed comes up.
    let mut n3 = d.start("n3", &[], "");
    n3.pin_port();
    let seed = n3.addr.clone();
    assert!(n3.terminate().success());
    let n4 = d.start("n4", &[&seed], "");
    wait_for(DEADLINE, "a failed join attempt", || n4.log().contains("seed did not answer the join").then_some(()));
    n3.restart();
    wait_members_alive(&n4, &["n3", "n4"]);
}

#[test]
fn a_frozen_node_rejoins_after_being_removed() {
    let d = Dirs::new();
    let n1 = d.start("n1", &[], "");
    let n2 = d.start("n2", &[&n1.addr], "");
    let n3 = d.start("n3", &[&n1.addr], "");
    wait_members_alive(&n1, &["n1", "n2", "n3"]);
    // SIGSTOP cuts n3 off (a partition, from the others' side) past removal_timeout.
    signal(n3.pid(), "STOP");
    for n in [&n1, &n2] {
        wait_members_alive(n, &["n1", "n2"]);
    }
    signal(n3.pid(), "CONT");
    // n3 finds everyone silent and removes them, then its probes heal the split.
    for n in [&n1, &n2, &n3] {
        wait_members_alive(n, &["n1", "n2", "n3"]);
    }
}

#[test]
fn binding_all_interfaces_needs_advertise_address() {
    let d = tempfile::tempdir().unwrap();
    let config = d.path().join("c.yaml");
    std::fs::write(&config, "bind_address: 0.0.0.0\n").unwrap();
    let out = std::process::Command::new(BIN).arg(&config).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("advertise_address"));
}

#[test]
fn hostile_gossip_is_refused_entry_by_entry_and_bounded() {
    let d = Dirs::new();
    let (n1, n2) = two(&d, "");
    let entry = |id: &str, address: &str, incarnation: u64| {
        format!(
            r#"{{"id":"{id}","uid":"u-{id}","address":"{address}","joined_timestamp":1,"incarnation":{incarnation},"heartbeat":0}}"#
        )
    };
    // A forged version no later news could beat, an address that is not one, and more
    // members than a node keeps.
    let mut members = vec![entry("ghost", "127.0.0.1:9", u64::MAX), entry("bad", "no port here", 1)];
    members.extend((0..1_100).map(|i| entry(&format!("flood{i}"), "127.0.0.1:9", 1)));
    let msg = format!(r#"{{"members":[{}],"wall_ms":0}}"#, members.join(","));
    let r = peer_post(&n1.addr, kvs::protocol::routes::GOSSIP, msg.as_bytes());
    assert_eq!(r.status, 200, "the rest of the message is still taken: {}", r.text());
    let refused = n1.health()["refused_member_entries"].as_u64().unwrap();
    assert!(refused >= 2 + 78, "{refused}");
    let known = n1.get("/members/").json().as_array().unwrap().len();
    assert!(known <= 1 + kvs::membership::MAX_MEMBERS, "{known}");
    assert!(!n1.get("/members/").text().contains("ghost"));
    // The cluster still works.
    n1.put("/kv/still/works", "1");
    wait_value(&n2, "/kv/still/works", Some("1"));
}
