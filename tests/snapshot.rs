//! Snapshots against real `kvs` processes: `kvsctl snapshot save` while writes run,
//! `kvsctl snapshot restore` into a new data dir, and a node started on it that
//! merges with a cluster that moved on (ARCHITECTURE.md "Snapshots and restore").

mod common;
use common::*;
use std::path::Path;
use std::process::Command;

const KVSCTL: &str = env!("CARGO_BIN_EXE_kvsctl");

/// Runs kvsctl with `args`; returns exit code, stdout, stderr.
fn ctl(args: &[&str]) -> (i32, String, String) {
    let out =
        Command::new(KVSCTL).args(args).env_remove("KVS_ADDR").env_remove("KVS_TOKEN").output().expect("kvsctl runs");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn save(n: &Node, file: &Path) -> serde_json::Value {
    let addr = format!("http://{}", n.addr);
    let (code, out, err) = ctl(&["--addr", &addr, "--json", "snapshot", "save", file.to_str().unwrap()]);
    assert_eq!(code, 0, "snapshot save: {err}");
    serde_json::from_str(out.trim()).unwrap()
}

fn restore(file: &Path, dir: &Path) -> (i32, String) {
    let (code, _, err) = ctl(&["snapshot", "restore", file.to_str().unwrap(), "--data-dir", dir.to_str().unwrap()]);
    (code, err)
}

fn feed(n: &Node) -> (String, u64) {
    let f = n.get("/changes").json();
    (f["node"].as_str().unwrap().to_string(), f["last_seq"].as_u64().unwrap())
}

#[test]
fn a_restored_node_merges_with_a_cluster_that_moved_on() {
    let d = Dirs::new();
    let extra = "tombstone_grace_hours: 0.0014";
    let (n1, n2, n3) = three(&d, extra);
    for k in ["keep", "del", "purged", "old"] {
        assert_eq!(n1.put(&format!("/kv/{k}"), "\"before\"").status, 200);
    }
    for i in 0..200 {
        assert_eq!(n1.put(&format!("/kv/bulk/{i:03}"), &i.to_string()).status, 200);
    }
    // A snapshot while writes run on the node: every write is answered, and every
    // write answered before the snapshot began is in it.
    let writing = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(true));
    let (addr, w) = (n1.addr.clone(), writing.clone());
    let writer = std::thread::spawn(move || {
        let mut i = 0;
        while w.load(std::sync::atomic::Ordering::Relaxed) {
            assert_eq!(http(&addr, "PUT", &format!("/kv/during/{i}"), Some(b"1")).status, 200);
            i += 1;
        }
        i
    });
    let file = d.0.path().join("n1.snap");
    let saved = save(&n1, &file);
    writing.store(false, std::sync::atomic::Ordering::Relaxed);
    let during = writer.join().unwrap();
    assert!(saved["records"].as_u64().unwrap() >= 204, "{saved}");
    assert_eq!(saved["node_id"], "n1");
    let (n1_feed, n1_seq) = feed(&n1);

    // The cluster moves on: a newer write, a delete, and a delete purged everywhere.
    assert_eq!(n2.put("/kv/keep", "\"after\"").status, 200);
    let deleted = std::time::Instant::now();
    assert_eq!(n2.delete("/kv/del").status, 204);
    assert_eq!(n2.delete("/kv/purged").status, 204);
    for n in [&n1, &n2, &n3] {
        wait_value(n, "/kv/purged", None);
    }
    wait_past(deleted, 5_500);
    for n in [&n1, &n2, &n3] {
        wait_for(DEADLINE, "the deletes purged", || (n.health()["tombstones"] == 0).then_some(()));
    }
    // `del` was purged too by now: delete another key whose tombstone stays live.
    assert_eq!(n2.delete("/kv/old").status, 204);
    wait_value(&n1, "/kv/old", None);

    // Restore into a new data dir and start a new member on it.
    let n4_dir = d.0.path().join("n4");
    let (code, err) = restore(&file, &n4_dir.join("data"));
    assert_eq!(code, 0, "{err}");
    // First with a seed nobody answers: it waits to merge and serves no data, since
    // what it holds is old (the deleted values among it).
    let dead = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let dead_addr = dead.local_addr().unwrap().to_string();
    drop(dead);
    let mut n4 = Node::start_in(&n4_dir, &cluster_config_with("n4", &[&dead_addr], extra));
    assert_eq!(n4.health()["mode"], "syncing");
    let r = n4.get("/kv/purged");
    r.assert_error(503);
    assert!(r.json()["error"].as_str().unwrap().contains("restored from a snapshot"), "{}", r.text());
    n4.put("/kv/x", "1").assert_error(503);
    n4.get("/changes").assert_error(503);
    assert!(n4.terminate().success());
    let config = std::fs::read_to_string(&n4.config).unwrap();
    std::fs::write(&n4.config, config.replace(&dead_addr, &n1.addr)).unwrap();
    n4.restart();
    wait_normal(&n4);
    // The moment it serves: the purged delete is not back (its certificate beat the
    // restored value), the newer write and the live delete won.
    n4.get("/kv/purged").assert_error(404);
    wait_value(&n4, "/kv/keep", Some("\"after\""));
    wait_value(&n4, "/kv/del", None);
    wait_value(&n4, "/kv/old", None);
    assert_eq!(n4.get("/kv/bulk/199").text(), "199");
    // Writes made during the snapshot reach it too, in it or not.
    wait_value(&n4, &format!("/kv/during/{}", during - 1), Some("1"));
    // Nothing came back anywhere after sync rounds with the restored node.
    for n in [&n1, &n2, &n3, &n4] {
        wait_sync_rounds(n, 3);
    }
    for n in [&n1, &n2, &n3, &n4] {
        for k in ["purged", "del", "old"] {
            n.get(&format!("/kv/{k}")).assert_error(404);
        }
        assert_eq!(n.get("/kv/keep").text(), "\"after\"");
    }
    // Its change feed is a new one, numbered past the source's.
    let (n4_feed, n4_seq) = feed(&n4);
    assert_ne!(n4_feed, n1_feed);
    assert!(n4_seq > n1_seq + (1 << 32) - 1, "{n4_seq} vs {n1_seq}");
    let stale = n4.get(&format!("/changes?since={n1_seq}"));
    stale.assert_error(410);
}

#[test]
fn a_corrupt_truncated_or_misplaced_restore_writes_nothing() {
    let d = Dirs::new();
    let n1 = Node::start_in(&d.0.path().join("n1"), "");
    for i in 0..100 {
        assert_eq!(n1.put(&format!("/kv/k/{i}"), "{\"v\":1}").status, 200);
    }
    assert_eq!(n1.delete("/kv/k/0").status, 204);
    let file = d.0.path().join("good.snap");
    save(&n1, &file);
    let bytes = std::fs::read(&file).unwrap();
    let bad = d.0.path().join("bad.snap");
    let target = d.0.path().join("target");
    for (what, content) in [
        ("truncated", bytes[..bytes.len() / 2].to_vec()),
        ("trailer cut", bytes[..bytes.len() - 1].to_vec()),
        ("flipped", {
            let mut b = bytes.clone();
            let mid = b.len() / 2;
            b[mid] ^= 1;
            b
        }),
        ("not a snapshot", b"{\"key\":\"k\"}\n".to_vec()),
    ] {
        std::fs::write(&bad, &content).unwrap();
        let (code, err) = restore(&bad, &target);
        assert_eq!(code, 1, "{what}: {err}");
        assert!(err.contains("nothing was restored"), "{what}: {err}");
        assert!(!target.exists(), "{what}: the data dir was created");
    }
    // Not into a data dir that holds anything.
    let (code, err) = restore(&file, &n1.dir.join("data"));
    assert_eq!(code, 1);
    assert!(err.contains("not empty"), "{err}");
    // An interrupted restore leaves a marker a node refuses to start on.
    let (code, err) = restore(&file, &target);
    assert_eq!(code, 0, "{err}");
    std::fs::write(target.join(kvs::snapshot::RESTORE_MARKER), b"").unwrap();
    let mut refused = Node::spawn_in(&d.0.path().join("n2"), &format!("data_dir: {}\n", target.display()));
    assert!(!refused.wait_exit().success());
    assert!(refused.log().contains("did not finish"), "{}", refused.log());
    std::fs::remove_file(target.join(kvs::snapshot::RESTORE_MARKER)).unwrap();
    // Without seeds it serves the snapshot alone: 99 keys, the delete kept, its writes
    // newer than every restored version.
    let n2 = Node::start_in(&d.0.path().join("n2"), &format!("data_dir: {}\n", target.display()));
    assert_eq!(n2.health()["keys"], 99);
    n2.get("/kv/k/0").assert_error(404);
    let old: u64 = n2.get("/kv/k/99").header("x-kvs-version").unwrap().parse().unwrap();
    let put = n2.put("/kv/k/99", "2");
    assert_eq!(put.status, 200);
    assert!(version_of(&put) > old);
}
