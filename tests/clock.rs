//! Version timestamps against real time (README "Clocks"): write bursts, peers with
//! wrong clocks, and a node whose own clock is wrong.

mod common;
use common::*;
use std::time::{SystemTime, UNIX_EPOCH};

fn wall_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_millis() as u64
}

/// Pushes one record to `addr` the way a peer does.
fn push(addr: &str, path: &str, record: &kvs::record::Record) -> Resp {
    let mut body = bytes::BytesMut::new();
    kvs::wire::put(&mut body, path, record);
    peer_post(addr, kvs::protocol::routes::PUSH, &body)
}

#[test]
fn a_write_burst_keeps_timestamps_on_the_wall_clock() {
    let dir = tempfile::tempdir().unwrap();
    let n = Node::start_in(dir.path(), "durability: buffer\nlog_level: info\n");
    // Thousands of writes a second for two seconds: with `max(now, last + 1)` the
    // node's timestamps ran ahead of the wall clock by one ms per write past 1,000/s.
    let until = std::time::Instant::now() + std::time::Duration::from_secs(2);
    let writers: Vec<_> = (0..8)
        .map(|w| {
            let addr = n.addr.clone();
            std::thread::spawn(move || {
                let mut i = 0u64;
                while std::time::Instant::now() < until {
                    assert_eq!(http(&addr, "PUT", &format!("/kv/burst/{w}/{}", i % 100), Some(b"1")).status, 200);
                    i += 1;
                }
                i
            })
        })
        .collect();
    let writes: u64 = writers.into_iter().map(|w| w.join().unwrap()).sum();
    assert!(writes > 2_000, "the burst must outrun one write per ms to mean anything ({writes} writes)");
    let last = n.put("/kv/burst/last", "1");
    let after = wall_ms();
    let ts = last.json()["timestamp"].as_u64().unwrap();
    assert!(ts <= after, "after {writes} writes in 2 s the node's timestamp is {} ms ahead", ts - after);
    assert!(version_of(&last) >> 16 == ts);
}

#[test]
fn a_record_from_beyond_the_clock_bound_is_held_back_and_freezes_no_key() {
    let d = Dirs::new();
    let (n1, n2) = two(&d, "");
    n1.put("/kv/shared/key", "\"before\"");
    wait_value(&n2, "/kv/shared/key", Some("\"before\""));
    // A record dated at the end of time (a buggy or hostile peer), and one written by
    // a node whose clock ran 120 s fast.
    let end = kvs::record::Record::value(u64::MAX, uuid::Uuid::new_v4(), bytes::Bytes::from("\"end\""));
    let future = kvs::hlc::from_ms(wall_ms() + 120_000);
    let skewed = kvs::record::Record::tombstone(future, uuid::Uuid::new_v4());
    for (path, record) in [("shared/key", &end), ("shared/key", &skewed), ("other/key", &end)] {
        let r = push(&n1.addr, path, record);
        assert_eq!(r.status, 200, "{}", r.text());
        assert_eq!(r.json()["held_back"], 1, "{}", r.text());
    }
    assert_eq!(n1.get("/kv/shared/key").text(), "\"before\"", "held back, not stored");
    n1.get("/kv/other/key").assert_error(404);
    // The key is not frozen: later writes win on every node, and stay on real time.
    for (i, n) in [&n1, &n2].into_iter().enumerate() {
        let value = format!("\"after {i}\"");
        let over = n.put("/kv/shared/key", &value);
        assert_eq!(over.status, 200, "{}", over.text());
        let ts = over.json()["timestamp"].as_u64().unwrap();
        assert!(ts <= wall_ms(), "{}: a peer's record dragged this node's clock ({ts})", n.addr);
        wait_value(&n1, "/kv/shared/key", Some(&value));
        wait_value(&n2, "/kv/shared/key", Some(&value));
    }
    assert!(n1.health()["replication"]["future_records"].as_u64().unwrap() >= 3);
    let metrics = n1.get("/metrics").text();
    assert!(metrics.lines().any(|l| l.starts_with("kvs_future_records_total ") && !l.ends_with(" 0")), "{metrics}");
    assert_eq!(n1.health()["status"], "ok");
}

#[test]
fn a_write_from_a_clock_ahead_is_late_not_lost() {
    let d = Dirs::new();
    let (n1, n2) = two(&d, "");
    let dir = d.0.path().join("n3");
    let config = config_in(&dir, &cluster_config("n3", &[&n1.addr]));
    let n3 = Node::start_config_env(&dir, &config, &[("KVS_FAULT_CLOCK_OFFSET_MS", "5000")]);
    wait_normal(&n3);
    // What n3 stamped before it noticed its clock: 5 s ahead of the others.
    let ahead = kvs::hlc::from_ms(wall_ms() + 5_000);
    let record = kvs::record::Record::value(ahead, uuid::Uuid::new_v4(), bytes::Bytes::from("\"ahead\""));
    assert_eq!(push(&n3.addr, "late/key", &record).json()["held_back"], 0, "n3's own time");
    assert_eq!(push(&n1.addr, "late/key", &record).json()["held_back"], 1, "3.75 s beyond what n1 takes");
    n1.get("/kv/late/key").assert_error(404);
    // Once their clocks are within the bound of it, sync brings it to both.
    wait_value(&n1, "/kv/late/key", Some("\"ahead\""));
    wait_value(&n2, "/kv/late/key", Some("\"ahead\""));
    assert!(wall_ms() + 1_250 >= kvs::hlc::ms(ahead), "taken only once within 2.5 bounds");
}

#[test]
fn a_node_30_s_fast_refuses_writes_until_it_restarts_with_a_right_clock() {
    let d = Dirs::new();
    // Both in mode normal first: a bootstrapping n2 refuses writes for another reason.
    let (n1, n2) = two(&d, "");
    let dir = d.0.path().join("n3");
    let config = config_in(&dir, &cluster_config("n3", &[&n1.addr]));
    let mut n3 = Node::start_config_env(&dir, &config, &[("KVS_FAULT_CLOCK_OFFSET_MS", "30000")]);
    wait_normal(&n3);
    // Judged against the whole cluster right after joining, before any client write.
    let r = n3.put("/kv/from/fast", "1");
    r.assert_error(503);
    assert!(r.text().contains("clock is"), "{}", r.text());
    assert!(r.text().contains("max_clock_offset_ms is 500"), "{}", r.text());
    n3.delete("/kv/from/fast").assert_error(503);
    let clock = n3.health()["clock"].clone();
    assert_eq!(clock["ok"], false);
    let offset = clock["offset_ms"].as_i64().unwrap();
    assert!((29_000..31_000).contains(&offset), "{clock}");
    assert!(n3.get("/metrics").text().contains("kvs_clock_ok 0"));
    assert!(n3.log().contains("client writes are refused"));
    // Reads still work; the others are not blamed and take writes.
    n3.get("/kv/from/fast").assert_error(404);
    for n in [&n1, &n2] {
        let r = n.put("/kv/from/right", "1");
        assert_eq!(r.status, 200, "{}: {}", n.addr, r.text());
        assert_eq!(n.health()["clock"]["ok"], true);
    }
    // With its clock right again it takes writes by itself after the restart.
    assert!(n3.terminate().success());
    n3.env.clear();
    n3.restart();
    assert_eq!(n3.put("/kv/from/fast", "2").status, 200);
    assert!(n3.health()["clock"]["offset_ms"].as_i64().unwrap().abs() < 500);
}

#[test]
fn a_write_after_a_delete_from_a_node_ahead_wins_on_a_node_behind() {
    // Three clocks within the bound of their median: -450, 0, +450 ms. Both outer
    // nodes pass the clock check, and they are 900 ms apart.
    let d = Dirs::new();
    let start = |id: &str, seeds: &[&str], offset: &str| {
        let dir = d.0.path().join(id);
        let config = config_in(&dir, &cluster_config(id, seeds));
        Node::start_config_env(&dir, &config, &[("KVS_FAULT_CLOCK_OFFSET_MS", offset)])
    };
    let mid = start("mid", &[], "0");
    let ahead = start("ahead", &[&mid.addr], "450");
    let behind = start("behind", &[&mid.addr], "-450");
    for n in [&mid, &ahead, &behind] {
        wait_members_alive(n, &["mid", "ahead", "behind"]);
        wait_normal(n);
        wait_for(DEADLINE, "the clock judged ok", || (n.health()["clock"]["ok"] == true).then_some(()));
    }
    assert_eq!(mid.put("/kv/k", "\"first\"").status, 200);
    for n in [&ahead, &behind] {
        wait_value(n, "/kv/k", Some("\"first\""));
    }
    // The delete from the node ahead reaches the node behind (as a push)...
    let received = |n: &Node| n.health()["replication"]["received"].as_u64().unwrap();
    let before = received(&behind);
    assert_eq!(ahead.delete("/kv/k").status, 204);
    wait_for(DEADLINE, "the delete pushed to the node behind", || (received(&behind) > before).then_some(()));
    // ...and a client that then writes there must win: the node behind stored the
    // delete and orders the write after it. (With records held back at one bound
    // ahead, the delete waited on the side, the write was stamped below it, and the
    // delete won when it landed: an acknowledged write lost.)
    let w = behind.put("/kv/k", "\"after\"");
    assert_eq!(w.status, 200, "{}", w.text());
    assert_eq!(behind.health()["replication"]["future_records"], 0);
    for n in [&mid, &ahead, &behind] {
        wait_value(n, "/kv/k", Some("\"after\""));
    }
    // Stable: still there after a few sync rounds.
    let synced = |n: &Node| n.health()["replication"]["sync_ok"].as_u64().unwrap();
    let rounds = synced(&behind);
    wait_for(DEADLINE, "three more sync rounds", || (synced(&behind) >= rounds + 3).then_some(()));
    for n in [&mid, &ahead, &behind] {
        assert_eq!(n.get("/kv/k").text(), "\"after\"", "{}", n.addr);
    }
}
