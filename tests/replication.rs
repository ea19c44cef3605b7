//! Replication with real processes: push, regular sync, catch-up, bootstrap, deletes.

mod common;
use common::*;

#[test]
fn writes_and_deletes_replicate_by_push() {
    let d = Dirs::new();
    // Slow regular sync: only push can deliver within the deadline.
    let (n1, n2, n3) = three(&d, "sync_interval: 60\ncatchup_interval: 60");
    assert_eq!(n1.put("/kv/users/john", r#"{"name":"John"}"#).status, 200);
    for n in [&n2, &n3] {
        wait_value(n, "/kv/users/john", Some(r#"{"name":"John"}"#));
    }
    let etag = n1.get("/kv/users/john").header("etag").map(str::to_string);
    assert_eq!(n3.get("/kv/users/john").header("etag").map(str::to_string), etag, "same version everywhere");
    assert_eq!(n2.delete("/kv/users/john").status, 204);
    for n in [&n1, &n3] {
        wait_value(n, "/kv/users/john", None);
    }
    assert!(stat(&n1, "pushed") >= 2 && stat(&n2, "pushed") >= 2);
}

#[test]
fn concurrent_writes_to_one_key_converge_to_the_newest() {
    let d = Dirs::new();
    let (n1, n2, n3) = three(&d, "");
    let mut written: Vec<(u64, String)> = Vec::new();
    for round in 0..5 {
        // Each node writes the same key at (nearly) the same time.
        let handles: Vec<_> = [&n1, &n2, &n3]
            .iter()
            .enumerate()
            .map(|(i, n)| {
                let addr = n.addr.clone();
                std::thread::spawn(move || {
                    let v = format!("{{\"round\":{round},\"node\":{i}}}");
                    let r = http(&addr, "PUT", "/kv/contended", Some(v.as_bytes()));
                    (r.json()["version"].as_str().unwrap().parse::<u64>().unwrap(), v)
                })
            })
            .collect();
        written.extend(handles.into_iter().map(|h| h.join().unwrap()));
    }
    // The newest version wins everywhere. Writes with the same HLC on two nodes
    // collide; the vote then picks one of them, the same on every node.
    let newest = written.iter().map(|(t, _)| *t).max().unwrap();
    let candidates: Vec<&String> = written.iter().filter(|(t, _)| *t == newest).map(|(_, v)| v).collect();
    wait_for(DEADLINE, "one newest version everywhere", || {
        let answers: Vec<Resp> = [&n1, &n2, &n3].iter().map(|n| n.get("/kv/contended")).collect();
        let same = answers.iter().all(|r| r.header("etag") == answers[0].header("etag"));
        (same && candidates.contains(&&answers[0].text())).then_some(())
    });
    assert_eq!(n1.get("/kv/contended").header("x-kvs-version"), Some(newest.to_string().as_str()));
}

#[test]
fn a_node_killed_during_writes_catches_up_after_restart() {
    let d = Dirs::new();
    // Regular sync is slow here: catch-up must do the work.
    let (n1, _n2, mut n3) = three(&d, "sync_interval: 60");
    n3.pin_port();
    let writer = {
        let addr = n1.addr.clone();
        std::thread::spawn(move || {
            for i in 0..1000 {
                let r = http(&addr, "PUT", &format!("/kv/load/{i:04}"), Some(format!("{i}").as_bytes()));
                assert_eq!(r.status, 200);
            }
        })
    };
    wait_for(DEADLINE, "some writes on n3", || (n3.health()["keys"].as_u64()? >= 200).then_some(()));
    n3.kill9();
    writer.join().unwrap();
    wait_keys(&n1, 1000);
    n3.restart();
    wait_keys(&n3, 1000);
    assert_eq!(n3.get("/kv/load/0999").text(), "999");
    assert!(stat(&n3, "catchup_records") > 0, "catch-up pulled the writes");
    assert!(n3.log().contains("catch-up: done"));
}

#[test]
fn divergence_older_than_the_newest_1000_writes_is_healed_by_regular_sync() {
    let d = Dirs::new();
    // No periodic catch-up: only regular sync can find old divergence.
    let extra = "catchup_interval: 600";
    let n1 = d.start("n1", &[], extra);
    let n2 = d.start("n2", &[&n1.addr], extra);
    wait_members_alive(&n1, &["n1", "n2"]);
    wait_members_alive(&n2, &["n1", "n2"]);
    wait_normal(&n2);
    // Let n2's start-up catch-up pass happen first; later passes only run when a peer
    // is ahead of n2's newest write, which the pushed new writes below keep current.
    wait_for(DEADLINE, "n2's first catch-up pass", || (stat(&n2, "catchup_ok") >= 1).then_some(()));
    let pulled_at_start = stat(&n2, "catchup_records");
    // Freeze n2 until n1 sees it down: writes made now are not pushed to it.
    signal(n2.pid(), "STOP");
    wait_for(DEADLINE, "n2 down on n1", || members(&n1).contains(&("n2".into(), "down".into())).then_some(()));
    for i in 0..50 {
        assert_eq!(n1.put(&format!("/kv/old/{i}"), "\"old\"").status, 200);
    }
    signal(n2.pid(), "CONT");
    wait_members_alive(&n1, &["n1", "n2"]);
    wait_members_alive(&n2, &["n1", "n2"]);
    // 1,000 newer writes, pushed as usual: the old divergence is behind all of them.
    for i in 0..1000 {
        assert_eq!(n1.put(&format!("/kv/new/{i}"), "1").status, 200);
    }
    wait_keys(&n2, 1050);
    assert_eq!(n2.get("/kv/old/0").text(), "\"old\"");
    assert!(stat(&n1, "sync_sent") + stat(&n2, "sync_fetched") >= 50, "regular sync moved the old records");
    assert_eq!(stat(&n2, "catchup_records"), pulled_at_start, "catch-up moved nothing");
}

#[test]
fn a_fresh_node_bootstraps_gradually() {
    let d = Dirs::new();
    let n1 = d.start("n1", &[], "durability: buffer");
    for i in 0..2500 {
        assert_eq!(n1.put(&format!("/kv/data/{i:05}"), &format!("{{\"i\":{i}}}")).status, 200);
    }
    n1.delete("/kv/data/00000");
    // Pages of 1,000 with 300 ms before each page request: at least a second of syncing.
    let n2 = d.start("n2", &[&n1.addr], "throttle_delay_ms: 300\nfetch_delay_ms: 10");
    let h = n2.health();
    assert_eq!(h["mode"], "syncing", "{h}");
    assert!(h["bootstrap"]["fetched"].is_u64());
    let r = n2.put("/kv/refused", "1");
    r.assert_error(503);
    assert_eq!(r.header("retry-after"), Some("1"));
    wait_for(DEADLINE, "mode normal", || (n2.health()["mode"] == "normal").then_some(()));
    assert_eq!(n2.health()["keys"], 2499);
    assert_eq!(n2.get("/kv/data/02499").text(), "{\"i\":2499}");
    n2.get("/kv/data/00000").assert_error(404);
    assert!(stat(&n2, "bootstrap_fetched") >= 2499);
    assert!(n2.log().contains("bootstrap: progress") && n2.log().contains("bootstrap: done"));
    assert_eq!(n2.put("/kv/accepted", "1").status, 200);
}

#[test]
fn a_node_away_past_the_grace_period_does_not_resurrect_deletes() {
    let d = Dirs::new();
    // Tombstones are kept 5 s (the shortest grace the config takes with these intervals).
    let extra = "tombstone_grace_hours: 0.0014";
    let (n1, n2, mut n3) = three(&d, extra);
    n3.pin_port();
    assert_eq!(n1.put("/kv/doomed", "\"value\"").status, 200);
    assert_eq!(n1.put("/kv/kept", "\"value\"").status, 200);
    wait_value(&n3, "/kv/doomed", Some("\"value\""));
    wait_value(&n3, "/kv/kept", Some("\"value\""));
    // Let n3 complete (and persist) a sync with the cluster, then it goes away.
    wait_sync_rounds(&n3, 1);
    assert!(n3.health()["last_contact"].as_u64().unwrap() > 0);
    n3.kill9();
    assert_eq!(n1.delete("/kv/doomed").status, 204);
    wait_value(&n2, "/kv/doomed", None);
    for n in [&n1, &n2] {
        wait_for(DEADLINE, "the tombstone purged", || {
            (n.health()["tombstones"] == 0 && stat(n, "tombstones_purged") >= 1).then_some(())
        });
    }
    n3.restart();
    // n3 was removed while the others purged: its copy of the deleted value meets
    // their certificate of the delete, which refuses it and brings the delete back.
    for n in [&n1, &n2, &n3] {
        wait_value(n, "/kv/doomed", None);
    }
    assert!(stat(&n1, "reawakened") + stat(&n2, "reawakened") >= 1);
    for n in [&n1, &n2, &n3] {
        wait_sync_rounds(n, 3);
    }
    for n in [&n1, &n2, &n3] {
        n.get("/kv/doomed").assert_error(404);
        assert_eq!(n.get("/kv/kept").text(), "\"value\"");
        assert_eq!(stat(n, "stale_discarded"), 0, "nothing discarded on a time comparison");
    }
}

/// Waits until `ms` milliseconds of wall-clock time have passed since `since`: the
/// scenario itself is "longer than the grace period".
#[test]
fn a_cold_restart_of_every_node_past_the_grace_period_keeps_every_key() {
    let d = Dirs::new();
    let extra = "tombstone_grace_hours: 0.0014";
    let (mut n1, mut n2, mut n3) = three(&d, extra);
    for i in 0..20 {
        assert_eq!(n1.put(&format!("/kv/c/{i}"), "1").status, 200);
    }
    for n in [&n1, &n2, &n3] {
        wait_keys(n, 20);
        wait_sync_rounds(n, 1);
    }
    // Deletes just before the outage: newer than every node's last completed sync.
    for i in 0..5 {
        assert_eq!(n2.delete(&format!("/kv/c/{i}")).status, 204);
    }
    for n in [&n1, &n2, &n3] {
        wait_keys(n, 15);
    }
    let stopped = std::time::Instant::now();
    for n in [&mut n1, &mut n2, &mut n3] {
        n.pin_port();
        assert!(n.terminate().success());
    }
    // The whole cluster is down for longer than the grace period.
    wait_past(stopped, 6_000);
    for n in [&mut n1, &mut n2, &mut n3] {
        n.restart();
    }
    for n in [&n1, &n2, &n3] {
        wait_members_alive(n, &["n1", "n2", "n3"]);
        wait_normal(n);
        wait_for(DEADLINE, "the deletes purged", || (n.health()["tombstones"] == 0).then_some(()));
    }
    for n in [&n1, &n2, &n3] {
        wait_sync_rounds(n, 2);
        assert_eq!(n.health()["keys"], 15, "{}", n.addr);
        assert_eq!(n.get("/kv/c/19").text(), "1");
        n.get("/kv/c/0").assert_error(404);
        assert_eq!(stat(n, "stale_discarded"), 0);
    }
}

#[test]
fn a_two_node_partition_past_the_grace_period_keeps_both_sides_writes_and_deletes() {
    let d = Dirs::new();
    let extra = "tombstone_grace_hours: 0.0014";
    let (n1, mut n2) = two(&d, extra);
    for k in ["a", "b", "c"] {
        assert_eq!(n1.put(&format!("/kv/{k}"), "\"both\"").status, 200);
    }
    wait_keys(&n2, 3);
    wait_sync_rounds(&n2, 1);
    // The partition: n2 carries on alone, on a port n1 does not know, without seeds.
    let home = n2.addr.clone();
    assert!(n2.terminate().success());
    let config = std::fs::read_to_string(&n2.config).unwrap();
    let alone = config.replace(&format!("\"{}\"", n1.addr), "");
    std::fs::write(&n2.config, &alone).unwrap();
    n2.restart();
    let split = std::time::Instant::now();
    assert_eq!(n1.delete("/kv/a").status, 204);
    assert_eq!(n1.put("/kv/n1only", "1").status, 200);
    assert_eq!(n2.delete("/kv/b").status, 204);
    assert_eq!(n2.put("/kv/n2only", "2").status, 200);
    // Both sides purge their own delete once the grace period is over.
    wait_past(split, 5_500);
    for n in [&n1, &n2] {
        wait_for(DEADLINE, "the side's delete purged", || (n.health()["tombstones"] == 0).then_some(()));
    }
    // The partition heals: n2 comes back home.
    assert!(n2.terminate().success());
    let port = home.rsplit_once(':').unwrap().1;
    let back = config.replace("port: 0\n", &format!("port: {port}\n"));
    std::fs::write(&n2.config, back).unwrap();
    n2.restart();
    wait_members_alive(&n1, &["n1", "n2"]);
    for n in [&n1, &n2] {
        wait_value(n, "/kv/a", None);
        wait_value(n, "/kv/b", None);
        wait_value(n, "/kv/n1only", Some("1"));
        wait_value(n, "/kv/n2only", Some("2"));
    }
    for n in [&n1, &n2] {
        wait_sync_rounds(n, 3);
    }
    for n in [&n1, &n2] {
        n.get("/kv/a").assert_error(404);
        n.get("/kv/b").assert_error(404);
        assert_eq!(n.get("/kv/c").text(), "\"both\"");
        assert_eq!(stat(n, "stale_discarded"), 0);
    }
}

#[test]
fn deletes_stay_deleted_through_sync_and_restarts() {
    let d = Dirs::new();
    let (n1, mut n2, n3) = three(&d, "");
    n2.pin_port();
    for i in 0..20 {
        n1.put(&format!("/kv/d/{i}"), "1");
    }
    wait_keys(&n3, 20);
    n2.kill9();
    for i in 0..10 {
        assert_eq!(n3.delete(&format!("/kv/d/{i}")).status, 204);
    }
    n2.restart();
    wait_keys(&n2, 10);
    for n in [&n1, &n2, &n3] {
        wait_sync_rounds(n, 3);
    }
    for n in [&n1, &n2, &n3] {
        assert_eq!(n.health()["keys"], 10);
        n.get("/kv/d/0").assert_error(404);
    }
}

#[test]
fn read_only_nodes_take_replicated_writes_and_bad_records_are_skipped_one_by_one() {
    let d = Dirs::new();
    let n1 = d.start("n1", &[], "");
    let n2 = d.start("n2", &[&n1.addr], "read_only: true");
    wait_members_alive(&n1, &["n1", "n2"]);
    wait_members_alive(&n2, &["n1", "n2"]);
    wait_for(DEADLINE, "n2 bootstrapped", || (n2.health()["mode"] == "read-only").then_some(()));
    assert_eq!(n1.put("/kv/replicated", "7").status, 200);
    wait_value(&n2, "/kv/replicated", Some("7"));
    n2.put("/kv/replicated", "8").assert_error(403);

    // A push with a bad path in the middle: the bad record is skipped and counted,
    // the others are stored.
    let good = kvs::record::Record::value(1, uuid::Uuid::new_v4(), bytes::Bytes::from("1"));
    let mut body = bytes::BytesMut::new();
    kvs::wire::put(&mut body, "fine/key", &good);
    kvs::wire::put(&mut body, "bad/../key", &good);
    kvs::wire::put(&mut body, "fine/too", &good);
    let r = peer_post(&n1.addr, kvs::protocol::routes::PUSH, &body);
    assert_eq!((r.status, r.json()["applied"].as_u64(), r.json()["refused"].as_u64()), (200, Some(2), Some(1)));
    assert_eq!(n1.get("/kv/fine/key").text(), "1");
    assert_eq!(n1.get("/kv/fine/too").text(), "1");
    assert_eq!(n1.health()["replication"]["refused_records"], 1);
    // A batch whose framing is broken is refused whole: nothing after the break can be
    // trusted.
    let mut cut = body.to_vec();
    cut.truncate(cut.len() - 1);
    let fresh = kvs::record::Record::value(2, uuid::Uuid::new_v4(), bytes::Bytes::from("2"));
    let mut broken = bytes::BytesMut::new();
    kvs::wire::put(&mut broken, "fine/key", &fresh);
    broken.extend_from_slice(&cut);
    peer_post(&n1.addr, kvs::protocol::routes::PUSH, &broken).assert_error(400);
    assert_eq!(n1.get("/kv/fine/key").text(), "1");
}

#[test]
fn a_new_cluster_whose_nodes_all_seed_each_other_forms_and_serves() {
    let d = Dirs::new();
    // Learn three ports, then start afresh: empty data dirs, every node seeded with
    // all three (the usual production config).
    let mut nodes: Vec<Node> = ["n1", "n2", "n3"].iter().map(|id| d.start(id, &[], "")).collect();
    for n in nodes.iter_mut() {
        n.pin_port();
        assert!(n.terminate().success());
    }
    let seeds: Vec<String> = nodes.iter().map(|n| format!("\"{}\"", n.addr)).collect();
    for n in nodes.iter_mut() {
        std::fs::remove_dir_all(n.dir.join("data")).unwrap();
        let text = std::fs::read_to_string(&n.config).unwrap();
        std::fs::write(&n.config, text.replace("seed_nodes: []", &format!("seed_nodes: [{}]", seeds.join(", "))))
            .unwrap();
        n.restart();
    }
    for n in &nodes {
        wait_members_alive(n, &["n1", "n2", "n3"]);
        wait_normal(n);
    }
    let founders = nodes.iter().filter(|n| n.log().contains("founds the cluster")).count();
    assert_eq!(founders, 1, "exactly one node founds");
    assert_eq!(nodes[2].put("/kv/formed", "true").status, 200);
    wait_value(&nodes[0], "/kv/formed", Some("true"));
}

/// A PUT that reports a refused connection instead of panicking: the node may stop.
fn try_put(addr: &str, path: &str) -> Option<u16> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).ok()?;
    s.set_read_timeout(Some(DEADLINE)).ok()?;
    let req = format!("PUT {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Length: 1\r\n\r\n1");
    s.write_all(req.as_bytes()).ok()?;
    let mut buf = Vec::new();
    s.read_to_end(&mut buf).ok()?;
    String::from_utf8_lossy(&buf).split(' ').nth(1)?.parse().ok()
}

#[test]
fn a_stop_during_a_write_loop_pushes_every_acknowledged_write_first() {
    let d = Dirs::new();
    // No sync or catch-up within the test: n2 has only what n1 pushed.
    let extra = "sync_interval: 60\ncatchup_interval: 60\ndurability: sync";
    let (mut n1, n2) = two(&d, extra);
    // 16 writers until n1 refuses; the stop lands mid-loop, with requests in flight.
    let writers: Vec<_> = (0..16)
        .map(|w| {
            let addr = n1.addr.clone();
            std::thread::spawn(move || {
                (0..)
                    .map(|i| format!("/kv/loop/{w}/{i}"))
                    .take_while(|path| try_put(&addr, path) == Some(200))
                    .collect::<Vec<_>>()
            })
        })
        .collect();
    wait_for(DEADLINE, "writes under way", || (n1.health()["keys"].as_u64()? > 300).then_some(()));
    assert!(n1.terminate().success());
    let acked: Vec<String> = writers.into_iter().flat_map(|w| w.join().unwrap()).collect();
    // n1 is gone: every write it acknowledged must already be on n2.
    let missing: Vec<&String> = acked.iter().filter(|p| n2.get(p).status != 200).collect();
    assert!(
        missing.is_empty(),
        "{} of {} acknowledged writes never reached n2: {:?}",
        missing.len(),
        acked.len(),
        &missing[..missing.len().min(5)]
    );
}

#[test]
fn a_bootstrap_whose_source_dies_finishes_from_another_peer() {
    let d = Dirs::new();
    let mut n1 = d.start("n1", &[], "");
    for i in 0..300 {
        assert_eq!(n1.put(&format!("/kv/b/{i:03}"), "1").status, 200);
    }
    // n2 holds everything, then stops for a while.
    let mut n2 = d.start("n2", &[&n1.addr], "");
    wait_normal(&n2);
    wait_keys(&n2, 300);
    n2.pin_port();
    assert!(n2.terminate().success());
    // n3 lists the paths it lacks from n1 (the only serving peer), then waits 3 s
    // before fetching them.
    let n3 = d.start("n3", &[&n1.addr, &n2.addr], "fetch_delay_ms: 3000");
    wait_for(DEADLINE, "n3 to list n1's versions", || {
        (n3.health()["bootstrap"]["reached_back_to"].as_u64()? > 0).then_some(())
    });
    n1.kill9();
    n2.restart();
    // The listed paths come from n2: n3 is not pinned to the peer that listed them.
    wait_normal(&n3);
    wait_keys(&n3, 300);
    assert_eq!(n3.put("/kv/b/after", "1").status, 200);
}

#[test]
fn a_node_with_a_clock_ahead_by_more_than_the_grace_period_purges_nothing() {
    let d = Dirs::new();
    let extra = "tombstone_grace_hours: 0.0014";
    let n1 = d.start("n1", &[], extra);
    let n2 = d.start("n2", &[&n1.addr], extra);
    wait_members_alive(&n1, &["n1", "n2"]);
    // n3's clock is 60 s ahead: every delete looks past the grace period to it.
    let dir = d.0.path().join("n3");
    let config = config_in(&dir, &cluster_config_with("n3", &[&n1.addr], extra));
    let n3 = Node::start_config_env(&dir, &config, &[("KVS_FAULT_CLOCK_OFFSET_MS", "60000")]);
    for n in [&n1, &n2, &n3] {
        wait_members_alive(n, &["n1", "n2", "n3"]);
        wait_normal(n);
    }
    for i in 0..10 {
        assert_eq!(n1.put(&format!("/kv/s/{i}"), "1").status, 200);
    }
    for i in 0..3 {
        assert_eq!(n1.delete(&format!("/kv/s/{i}")).status, 204);
    }
    for n in [&n1, &n2, &n3] {
        wait_keys(n, 7);
    }
    // The others purge once the (real) grace period is over and all three confirmed...
    for n in [&n1, &n2] {
        wait_for(DEADLINE, "the deletes purged", || (stat(n, "tombstones_purged") >= 3).then_some(()));
    }
    // ...while n3, whose clock is off, takes no writes and purged nothing, although
    // every delete looked past the grace period to it from the start.
    n3.put("/kv/s/x", "1").assert_error(503);
    assert_eq!(stat(&n3, "tombstones_purged"), 0);
    assert_eq!(n3.health()["tombstones"], 3);
    for n in [&n1, &n2, &n3] {
        assert_eq!(n.health()["keys"], 7);
        assert_eq!(n.health()["mode"], "normal");
    }
}

#[test]
fn a_gossiped_purge_horizon_from_the_future_makes_nobody_discard() {
    let d = Dirs::new();
    let (n1, n2) = two(&d, "");
    for i in 0..10 {
        assert_eq!(n1.put(&format!("/kv/h/{i}"), "1").status, 200);
    }
    for n in [&n1, &n2] {
        wait_keys(n, 10);
        wait_sync_rounds(n, 2);
        assert!(n.health()["last_contact"].as_u64().unwrap() > 0);
    }
    // One gossip message from a buggy peer: a member whose purge horizon is absurd.
    let evil = format!(
        r#"{{"members":[{{"id":"evil","uid":"e","address":"127.0.0.1:9","joined_timestamp":1,"incarnation":1,"heartbeat":1,"gc_horizon":{}}}]}}"#,
        u64::MAX
    );
    assert_eq!(peer_post(&n1.addr, kvs::protocol::routes::GOSSIP, evil.as_bytes()).status, 200);
    // It spreads to n2 by gossip; neither node takes it for a reason to discard.
    wait_for(DEADLINE, "the entry spread", || members(&n2).iter().any(|(id, _)| id == "evil").then_some(()));
    for n in [&n1, &n2] {
        wait_sync_rounds(n, 2);
        assert_eq!(stat(n, "stale_discarded"), 0, "{}", n.addr);
        assert_eq!(n.health()["keys"], 10);
        assert_eq!(n.health()["mode"], "normal");
    }
}

#[test]
fn nodes_with_different_max_value_bytes_skip_only_what_they_refuse() {
    let d = Dirs::new();
    let n1 = d.start("n1", &[], "max_value_bytes: 100000");
    let n2 = d.start("n2", &[&n1.addr], "max_value_bytes: 1000");
    wait_members_alive(&n1, &["n1", "n2"]);
    wait_normal(&n2);
    let big = format!("\"{}\"", "x".repeat(5_000));
    n1.put("/kv/mixed/big", &big);
    for i in 0..20 {
        n1.put(&format!("/kv/mixed/small{i}"), &i.to_string());
    }
    // Everything n2 accepts arrives; the value over its limit is skipped and counted.
    for i in 0..20 {
        wait_value(&n2, &format!("/kv/mixed/small{i}"), Some(&i.to_string()));
    }
    wait_for(DEADLINE, "n2 counts the refused record", || {
        (n2.health()["replication"]["refused_records"].as_u64()? >= 1).then_some(())
    });
    n2.get("/kv/mixed/big").assert_error(404);
    assert_eq!(n1.get("/kv/mixed/big").text(), big);
    // Sync rounds between them still complete both ways, so contact moves on: with the
    // big record refusing the whole batch they failed at that chunk forever.
    let written = n1.health()["newest_write"].as_u64().unwrap();
    for n in [&n1, &n2] {
        wait_for(DEADLINE, "a sync round after the writes", || {
            (n.health()["last_contact"].as_u64()? > written).then_some(())
        });
    }
    // A later write n2 can take still replicates over the key.
    n1.put("/kv/mixed/big", "\"small now\"");
    wait_value(&n2, "/kv/mixed/big", Some("\"small now\""));
}

#[test]
fn large_values_move_in_batches_bounded_by_bytes() {
    let d = Dirs::new();
    // No regular sync rounds: the records must come by bootstrap and then by catch-up,
    // which this test counts; a sync round racing catch-up took some of them.
    let config = "durability: buffer\nsync_interval: 3600";
    let n1 = d.start("n1", &[], config);
    // 200 values of 100 KB: 20 MB, more than two batches of MAX_BATCH_BYTES (8 MiB).
    let value = format!("\"{}\"", "v".repeat(100_000));
    let paths: Vec<String> = (0..200).map(|i| format!("big/{i:03}")).collect();
    for p in &paths {
        assert_eq!(n1.put(&format!("/kv/{p}"), &value).status, 200);
    }
    let bound = kvs::protocol::MAX_BATCH_BYTES;
    // A catch-up page and a fetch each stop at the byte bound and say so.
    let page = peer_get(&n1.addr, &format!("{}?after_ts=0&after_path=&limit=5000", kvs::protocol::routes::SINCE));
    assert_eq!(page.status, 200, "{}", page.text());
    assert!(page.body.len() <= bound && page.body.len() > bound / 2, "{} bytes", page.body.len());
    assert_eq!(page.header(kvs::protocol::MORE_HEADER), Some("1"));
    let fetch = peer_post(&n1.addr, kvs::protocol::routes::FETCH, serde_json::to_string(&paths).unwrap().as_bytes());
    assert!(fetch.body.len() <= bound, "{} bytes", fetch.body.len());
    let covered: usize = fetch.header(kvs::protocol::COVERED_HEADER).unwrap().parse().unwrap();
    assert!((1..200).contains(&covered), "{covered}");
    // Bootstrap (listing, then fetches) brings everything, batch by batch...
    let mut n2 = d.start("n2", &[&n1.addr], config);
    wait_normal(&n2);
    wait_for(DEADLINE, "n2 holds every value", || (n2.health()["keys"] == 200).then_some(()));
    assert_eq!(n2.get("/kv/big/199").text(), value);
    // ...and so does catch-up after a restart, page by page.
    assert!(n2.terminate().success());
    for i in 200..400 {
        assert_eq!(n1.put(&format!("/kv/big/{i:03}"), &value).status, 200);
    }
    n2.restart();
    wait_for(DEADLINE, "n2 caught up", || (n2.health()["keys"] == 400).then_some(()));
    assert!(n2.health()["replication"]["catchup_records"].as_u64().unwrap() >= 200);
}

#[test]
fn a_purge_check_for_a_tombstone_from_the_future_leaves_no_certificate() {
    let d = Dirs::new();
    let (n1, _n2) = two(&d, "");
    // A buggy or hostile peer asks about a delete at the end of time of a key n1 does
    // not hold: a certificate of it would refuse every later write (409 forever) and
    // bring the "delete" back over any replicated value.
    let ask =
        serde_json::json!([["frozen/key", u64::MAX, uuid::Uuid::new_v4()], ["other/key", 1u64, uuid::Uuid::new_v4()]]);
    let r = peer_post(&n1.addr, kvs::protocol::routes::PURGE_CHECK, ask.to_string().as_bytes());
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json(), serde_json::json!([false, true]), "not safe; an old one is answered as before");
    let w = n1.put("/kv/frozen/key", "1");
    assert_eq!(w.status, 200, "{}", w.text());
    assert_eq!(n1.get("/kv/frozen/key").text(), "1");
}

#[test]
fn a_node_bootstrapped_after_a_purge_refuses_the_deleted_value() {
    let d = Dirs::new();
    let extra = "tombstone_grace_hours: 0.0014";
    let (mut n1, mut n2, mut n3) = three(&d, extra);
    assert_eq!(n1.put("/kv/gone", "\"old\"").status, 200);
    assert_eq!(n1.put("/kv/kept", "\"kept\"").status, 200);
    wait_keys(&n3, 2);
    // n3 goes away holding the value; the others delete it and, once n3 is removed
    // and the grace period is over, purge the delete (keeping certificates).
    n3.kill9();
    let deleted = std::time::Instant::now();
    assert_eq!(n1.delete("/kv/gone").status, 204);
    wait_value(&n2, "/kv/gone", None);
    wait_past(deleted, 5_500);
    for n in [&n1, &n2] {
        wait_for(DEADLINE, "the delete purged", || (n.health()["tombstones"] == 0).then_some(()));
    }
    // A new node bootstraps now: it copies the certificates with the data.
    let n4 = d.start("n4", &[&n1.addr], extra);
    wait_normal(&n4);
    wait_keys(&n4, 1);
    // Only n4 is left when n3 returns with the deleted value.
    assert!(n1.terminate().success() && n2.terminate().success());
    let config = std::fs::read_to_string(&n3.config).unwrap();
    let seeds = config.lines().find(|l| l.starts_with("seed_nodes:")).unwrap().to_string();
    std::fs::write(&n3.config, config.replace(&seeds, &format!("seed_nodes: [\"{}\"]", n4.addr))).unwrap();
    n3.restart();
    wait_members_alive(&n4, &["n3", "n4"]);
    for n in [&n3, &n4] {
        wait_sync_rounds(n, 3);
    }
    // n4 refused the value (without the certificate it took it and served it) and
    // sent the delete back to n3.
    n4.get("/kv/gone").assert_error(404);
    wait_value(&n3, "/kv/gone", None);
    assert_eq!(n4.get("/kv/kept").text(), "\"kept\"");
    assert!(stat(&n4, "reawakened") >= 1);
}

#[test]
fn a_node_killed_during_a_re_bootstrap_resumes_it_and_never_serves_holes() {
    let d = Dirs::new();
    // Slow pages, so the resumed re-bootstrap can be watched.
    let (n1, mut n2) = two(&d, "throttle_delay_ms: 500");
    for i in 0..300 {
        assert_eq!(n1.put(&format!("/kv/r/{i:03}"), "1").status, 200);
    }
    wait_keys(&n2, 300);
    n2.pin_port();
    n2.kill9();
    // The state a kill leaves right after a stale discard began: the re-bootstrap mark
    // persisted, then records discarded (here all of them).
    {
        let (store, writer) =
            kvs::storage::Store::open(&n2.dir.join("data"), kvs::config::Durability::Sync, 500).unwrap();
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        rt.block_on(async {
            writer.set_meta(kvs::replication::META_BOOTSTRAPPED, bytes::Bytes::from_static(b"0")).await.unwrap();
            while writer.discard(u64::MAX, 10_000).await.unwrap() > 0 {}
        });
        writer.close(&store).unwrap();
    }
    n2.restart();
    // It resumes the re-bootstrap: never in mode normal with the records missing.
    let mut saw_syncing = false;
    wait_for(DEADLINE, "n2 back in mode normal", || {
        let h = n2.health();
        if h["mode"] == "normal" {
            assert_eq!(h["keys"], 300, "n2 serves in mode normal with records missing: {h}");
            return Some(());
        }
        saw_syncing = true;
        None
    });
    assert!(saw_syncing, "n2 came back in mode normal at once");
    for i in (0..300).step_by(37) {
        assert_eq!(n2.get(&format!("/kv/r/{i:03}")).status, 200);
    }
}

#[test]
fn a_bootstrap_under_steady_deletes_and_purges_finishes_and_brings_nothing_back() {
    let d = Dirs::new();
    // Tombstones are kept 5 s; the new node's bootstrap pages come 1 s apart.
    let extra = "tombstone_grace_hours: 0.0014\nthrottle_delay_ms: 1000\ndurability: buffer";
    let n1 = d.start("n1", &[], extra);
    const KEYS: usize = 20_000;
    let writers: Vec<_> = (0..4)
        .map(|w| {
            let addr = n1.addr.clone();
            std::thread::spawn(move || {
                for i in (w..KEYS).step_by(4) {
                    assert_eq!(http(&addr, "PUT", &format!("/kv/s/{i:05}"), Some(b"1")).status, 200);
                }
            })
        })
        .collect();
    writers.into_iter().for_each(|w| w.join().unwrap());
    // Deletes from before n2 starts to after its bootstrap (4 pages: 3 s and more),
    // longer than the grace period, so tombstones are purged while it lists and fetches.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let deleter = {
        let (addr, stop) = (n1.addr.clone(), stop.clone());
        std::thread::spawn(move || {
            let mut deleted = Vec::new();
            let mut i = 7;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) && deleted.len() < KEYS / 2 {
                let path = format!("/kv/s/{:05}", i % KEYS);
                if http(&addr, "DELETE", &path, None).status == 204 {
                    deleted.push(path);
                }
                i += 7919;
                std::thread::sleep(std::time::Duration::from_millis(5));
            }
            deleted
        })
    };
    // n2 starts once purges are under way, so they go on all through its bootstrap.
    wait_for(DEADLINE, "n1 to purge", || (stat(&n1, "tombstones_purged") > 0).then_some(()));
    let purged_at_start = stat(&n1, "tombstones_purged");
    let n2 = d.start("n2", &[&n1.addr], extra);
    wait_for(DEADLINE, "n2 to start its bootstrap", || (n2.health()["mode"] == "syncing").then_some(()));
    wait_normal(&n2);
    let purged_during = stat(&n1, "tombstones_purged") - purged_at_start;
    assert!(purged_during > 0, "no purge during n2's bootstrap: the test means nothing");
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let deleted = deleter.join().unwrap();
    assert!(!deleted.is_empty());
    let kept = (KEYS - deleted.len()) as u64;
    wait_keys(&n1, kept);
    wait_keys(&n2, kept);
    for path in deleted.iter().step_by(13) {
        n2.get(path).assert_error(404);
    }
    assert_eq!(stat(&n2, "stale_discarded"), 0, "n2 discarded nothing");
    eprintln!("{} deletes, {purged_during} tombstones purged on n1 during n2's bootstrap", deleted.len());
}

#[test]
fn a_prefix_delete_of_ten_thousand_keys_reaches_every_node_without_push_drops() {
    let d = Dirs::new();
    let (n1, n2, n3) = three(&d, "durability: buffer\n");
    let writers: Vec<_> = (0..4)
        .map(|w| {
            let addr = n1.addr.clone();
            std::thread::spawn(move || {
                for i in (w..10_000).step_by(4) {
                    assert_eq!(http(&addr, "PUT", &format!("/kv/bulk/k{i}"), Some(b"1")).status, 200);
                }
            })
        })
        .collect();
    for w in writers {
        w.join().unwrap();
    }
    for k in ["bulk", "bulkx/stays", "other"] {
        assert_eq!(n1.put(&format!("/kv/{k}"), "1").status, 200);
    }
    for n in [&n1, &n2, &n3] {
        wait_for(DEADLINE, "every key everywhere", || (n.health()["keys"] == 10_003).then_some(()));
    }
    n1.call("DELETE", "/kv/?recurse", None).assert_error(400);
    let r = n1.call("DELETE", "/kv/bulk?recurse", None);
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["deleted"], 10_001, "bulk itself and everything under bulk/");
    for n in [&n1, &n2, &n3] {
        wait_for(DEADLINE, "the delete everywhere", || (n.health()["keys"] == 2).then_some(()));
        assert_eq!(n.get("/kv/?keys").json()["keys"], serde_json::json!(["bulkx/stays", "other"]));
    }
    let dropped = n1.get("/metrics").text();
    assert!(
        dropped.lines().any(|l| l == "kvs_push_dropped_records_total 0"),
        "the delete went at the pushes' pace: {}",
        dropped.lines().filter(|l| l.starts_with("kvs_push")).collect::<Vec<_>>().join("; ")
    );
    // Everything, when asked for explicitly.
    assert_eq!(n2.call("DELETE", "/kv/?recurse&all=true", None).json()["deleted"], 2);
    wait_for(DEADLINE, "nothing left on n1", || (n1.health()["keys"] == 0).then_some(()));
}

#[test]
fn a_transaction_commits_whole_or_not_at_all_and_replicates() {
    let d = Dirs::new();
    let (n1, n2) = two(&d, "");
    let a = n1.put("/kv/acct/a", "100").json()["uuid"].as_str().unwrap().to_string();
    assert_eq!(n1.put("/kv/acct/b", "0").status, 200);
    // Move 30 from a to b only if a is still the version read, and open c only if new.
    let body = format!(
        r#"{{"ops":[{{"op":"check","key":"acct/a","if_match":"{a}"}},{{"op":"check","key":"acct/c","absent":true}},
            {{"op":"put","key":"acct/a","value":70}},{{"op":"put","key":"acct/b","value":30}},
            {{"op":"put","key":"acct/c","value":{{"open": true}}}},{{"op":"delete","key":"acct/old"}}]}}"#
    );
    let r = n1.call("POST", "/txn", Some(body.as_bytes()));
    assert_eq!(r.status, 200, "{}", r.text());
    let results = r.json()["results"].as_array().unwrap().clone();
    assert_eq!(results.len(), 6);
    assert_eq!(results[2]["op"], "put");
    assert_eq!(results[5]["op"], "delete");
    for (k, v) in [("acct/a", "70"), ("acct/b", "30"), ("acct/c", r#"{"open": true}"#)] {
        assert_eq!(n1.get(&format!("/kv/{k}")).text(), v);
        wait_value(&n2, &format!("/kv/{k}"), Some(v));
    }
    assert_eq!(format!("\"{}\"", results[2]["uuid"].as_str().unwrap()), n2.get("/kv/acct/a").header("etag").unwrap());
    // The same transaction again: its first check no longer holds; nothing is written.
    let r = n1.call("POST", "/txn", Some(body.as_bytes()));
    r.assert_error(409);
    assert_eq!(r.json()["failed"], 0);
    assert_eq!(r.json()["current"], format!("\"{}\"", results[2]["uuid"].as_str().unwrap()));
    assert_eq!(n1.get("/kv/acct/a").text(), "70");
    assert_eq!(n1.get("/kv/acct/b").text(), "30");
    // A failing second check: nothing of the puts before or after it in the list lands.
    let body = r#"{"ops":[{"op":"put","key":"acct/d","value":1},{"op":"check","key":"acct/c","absent":true}]}"#;
    let r = n1.call("POST", "/txn", Some(body.as_bytes()));
    r.assert_error(409);
    assert_eq!(r.json()["failed"], 1);
    n1.get("/kv/acct/d").assert_error(404);
    // Bad bodies: 400 naming the field, nothing written.
    for bad in [
        r#"{"ops":[{"op":"put","key":"acct/e","value":1},{"op":"put","key":"acct/e","value":2}]}"#,
        r#"{"ops":[{"op":"put","key":"acct/e","value":1},{"op":"frobnicate","key":"x"}]}"#,
        r#"{"ops":[{"op":"put","key":"acct/e"}]}"#,
        r#"{"ops": "#,
    ] {
        let r = n1.call("POST", "/txn", Some(bad.as_bytes()));
        r.assert_error(400);
    }
    n1.get("/kv/acct/e").assert_error(404);
    // A value over max_value_bytes (peers would refuse it): 413, nothing written.
    let big = format!(r#"{{"ops":[{{"op":"put","key":"acct/e","value":"{}"}}]}}"#, "x".repeat(1_100_000));
    n1.call("POST", "/txn", Some(big.as_bytes())).assert_error(413);
    n1.get("/kv/acct/e").assert_error(404);
    n1.call("GET", "/txn", None).assert_error(405);
}

#[test]
fn ack_all_answers_once_every_node_has_the_write_and_202_when_one_cannot() {
    let d = Dirs::new();
    let (n1, n2, n3) = three(&d, "ack_timeout_ms: 700\n");
    for i in 0..20 {
        let r = n1.call("PUT", &format!("/kv/acked/{i}?ack=all"), Some(b"1"));
        assert_eq!(r.status, 200, "{}", r.text());
        assert_eq!(r.json()["acked"], 3);
        // Read-your-write on any node, right away.
        for n in [&n2, &n3] {
            assert_eq!(n.get(&format!("/kv/acked/{i}")).text(), "1", "write {i} on {}", n.addr);
        }
    }
    // Answered once 2 have it; the count is of the nodes that had it by then, so the
    // third may be in it too (both peers answer the same push batch).
    let r = n1.call("DELETE", "/kv/acked/0?ack=2", None);
    assert_eq!(r.status, 200, "{}", r.text());
    assert!(matches!(r.json()["acked"].as_u64(), Some(2 | 3)), "{}", r.text());
    let txn = br#"{"ops":[{"op":"put","key":"acked/t","value":1},{"op":"delete","key":"acked/1"}]}"#;
    let r = n1.call("POST", "/txn?ack=all", Some(txn));
    assert_eq!((r.status, r.json()["acked"].as_u64()), (200, Some(3)), "{}", r.text());
    assert_eq!(n3.get("/kv/acked/t").text(), "1");
    n3.get("/kv/acked/1").assert_error(404);
    // Checks only: nothing to wait for.
    let checks = br#"{"ops":[{"op":"check","key":"acked/none","absent":true}]}"#;
    let r = n1.call("POST", "/txn?ack=all", Some(checks));
    assert_eq!((r.status, r.json()["acked"].as_u64()), (200, Some(3)), "{}", r.text());
    for bad in ["ack=0", "ack=4", "ack=most", "ack=1&bogus=1"] {
        n1.call("PUT", &format!("/kv/acked/bad?{bad}"), Some(b"1")).assert_error(400);
    }
    n1.get("/kv/acked/bad").assert_error(404);
    // n3 paused: still a member for now, but it cannot apply: 202 with the count; the
    // write stays, and reaches n3 once it runs again.
    signal(n3.pid(), "STOP");
    let r = n1.call("PUT", "/kv/acked/late?ack=all", Some(b"2"));
    signal(n3.pid(), "CONT");
    assert_eq!(r.status, 202, "{}", r.text());
    assert_eq!(r.json()["acked"], 2);
    assert_eq!(n1.get("/kv/acked/late").text(), "2");
    wait_value(&n3, "/kv/acked/late", Some("2"));
}
