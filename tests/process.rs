//! The kvs process: restarts, crashes, signals, config files and their errors.

mod common;
use common::*;
use std::process::Command;

#[test]
fn restart_keeps_data_and_versions_keep_increasing() {
    let dir = tempfile::tempdir().unwrap();
    let mut n = Node::start_in(dir.path(), "");
    let joined = n.get("/members/").json()[0]["joined_timestamp"].as_u64().unwrap();
    let mut last = 0;
    for i in 0..20 {
        let ts = version_of(&n.put(&format!("/kv/k/{i}"), &i.to_string()));
        assert!(ts > last, "versions strictly increase");
        last = ts;
    }
    n.delete("/kv/k/0");
    let status = n.terminate();
    assert!(status.success(), "SIGTERM exits 0, got {status}");
    n.restart();
    n.get("/kv/k/0").assert_error(404);
    for i in 1..20 {
        assert_eq!(n.get(&format!("/kv/k/{i}")).text(), i.to_string());
    }
    assert_eq!(n.health()["keys"], 19);
    assert_eq!(n.health()["tombstones"], 1);
    let ts = version_of(&n.put("/kv/k/after", "1"));
    assert!(ts > last, "versions keep increasing across a restart");
    let joined_after = n.get("/members/").json()[0]["joined_timestamp"].as_u64().unwrap();
    assert_eq!(joined, joined_after, "joined_timestamp survives a restart");
}

#[test]
fn acknowledged_sync_writes_survive_kill_9() {
    let dir = tempfile::tempdir().unwrap();
    let mut n = Node::start_in(dir.path(), "durability: sync\n");
    // Concurrent writers: their writes share fsyncs and each is acknowledged only
    // once durable.
    let addr = n.addr.clone();
    let writers: Vec<_> = (0..8)
        .map(|w| {
            let addr = addr.clone();
            std::thread::spawn(move || {
                (0..50)
                    .map(|i| {
                        let p = format!("/kv/w{w}/{i}");
                        let r = http(&addr, "PUT", &p, Some(format!("{{\"i\":{i}}}").as_bytes()));
                        assert_eq!(r.status, 200);
                        (p, version_of(&r))
                    })
                    .collect::<Vec<_>>()
            })
        })
        .collect();
    let acked: Vec<(String, u64)> = writers.into_iter().flat_map(|w| w.join().unwrap()).collect();
    n.kill9();
    n.restart();
    for (p, ts) in &acked {
        let r = n.get(p);
        assert_eq!(r.status, 200, "{p} lost after kill -9");
        assert_eq!(r.header("x-kvs-version"), Some(ts.to_string().as_str()));
    }
    let max = acked.iter().map(|(_, t)| *t).max().unwrap();
    assert!(version_of(&n.put("/kv/new", "1")) > max);
}

#[test]
fn missing_config_is_created_with_the_defaults() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("sub/config.yaml");
    let mut child = Command::new(BIN)
        .arg(&config)
        .current_dir(dir.path())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    // The default port (8080) may be taken on this machine: either way the file is
    // written first.
    wait_for(DEADLINE, "the default config file", || {
        std::fs::read_to_string(&config).ok().filter(|t| t.ends_with('\n'))
    });
    let _ = child.kill();
    let _ = child.wait();
    let written = std::fs::read_to_string(&config).unwrap();
    let repo = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/config.yaml")).unwrap();
    assert_eq!(written, repo, "the repository's config.yaml is the generated default");
    assert_eq!(written, kvs::config::default_file_text());
    // Then a node runs on that file (with a free port) and puts its data beside it.
    std::fs::write(&config, written.replace("port: 8080", "port: 0")).unwrap();
    let n = Node::start_config(dir.path(), &config);
    assert_eq!(n.put("/kv/a", "1").status, 200);
    assert!(dir.path().join("sub/data").is_dir(), "relative data_dir is resolved against the config's directory");
}

fn bad_config(text: &str) -> (i32, String) {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("bad.yaml");
    std::fs::write(&config, text).unwrap();
    run_with(&config)
}

fn run_with(config: &std::path::Path) -> (i32, String) {
    let out = Command::new(BIN).arg(config).output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    (out.status.code().unwrap_or(-1), stderr)
}

#[test]
fn bad_config_exits_2_naming_the_key() {
    for (text, key) in [
        ("bogus_key: 1\n", "bogus_key"),
        ("port: \"eighty\"\n", "port"),
        ("port: 70000\n", "port"),
        ("gossip_interval_min: 10\ngossip_interval_max: 5\n", "gossip_interval_min"),
        ("sync_interval: -1\n", "sync_interval"),
        ("durability: sometimes\n", "durability"),
        ("log_level: verbose\n", "log_level"),
        ("bind_address: 0.0.0.0\n", "advertise_address"),
        ("seed_nodes: [\"no-port\"]\n", "seed_nodes"),
        ("read_only: maybe\n", "read_only"),
        ("max_value_bytes: 0\n", "max_value_bytes"),
    ] {
        let (code, stderr) = bad_config(text);
        assert_eq!(code, 2, "{text:?}: {stderr}");
        assert_eq!(stderr.trim_end().lines().count(), 1, "one line for {text:?}: {stderr}");
        assert!(stderr.contains(key), "{text:?} should name {key}: {stderr}");
        assert!(!stderr.contains("panicked"), "{stderr}");
    }
    let (code, stderr) = bad_config("port: [unclosed\n");
    assert_eq!(code, 2, "{stderr}");
    assert_eq!(stderr.trim_end().lines().count(), 1, "{stderr}");

    // A directory where the file should be cannot be read.
    let dir = tempfile::tempdir().unwrap();
    let (code, stderr) = run_with(dir.path());
    assert_eq!(code, 2, "{stderr}");
    assert!(stderr.contains("cannot read"), "{stderr}");

    let out = Command::new(BIN).args(["a.yaml", "b.yaml"]).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
}

#[test]
fn data_dir_in_use_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let _first = Node::start_in(dir.path(), "");
    let other = tempfile::tempdir().unwrap();
    let config = other.path().join("c.yaml");
    let data = dir.path().join("data");
    std::fs::write(&config, format!("port: 0\ndata_dir: {}\n", data.display())).unwrap();
    let out = Command::new(BIN).arg(&config).output().unwrap();
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("in use by another kvs process"), "{stderr}");
}

#[test]
fn sigint_drains_and_exits_0() {
    let dir = tempfile::tempdir().unwrap();
    let mut n = Node::start_in(dir.path(), "");
    assert_eq!(n.put("/kv/a", "1").status, 200);
    let status = n.stop_with("INT");
    assert!(status.success(), "{status}");
    assert!(n.log().contains("\"stopped\""));
}

#[test]
fn an_interrupted_first_start_does_not_brick_the_data_dir() {
    // What a crash during the very first start leaves: fjall's first files, no marker.
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("data/db");
    std::fs::create_dir_all(db.join("keyspaces")).unwrap();
    std::fs::write(db.join("0.jnl"), b"").unwrap();
    std::fs::write(dir.path().join("data/db.creating"), b"").unwrap();
    let mut n = Node::start_in(dir.path(), "");
    assert_eq!(n.put("/kv/a", "1").status, 200);
    assert!(n.log().contains("creation was interrupted"));
    // A complete database is never removed.
    n.kill9();
    n.restart();
    assert_eq!(n.get("/kv/a").text(), "1");
}

#[test]
fn a_stop_with_the_data_dir_removed_exits_1_instead_of_hanging() {
    let dir = tempfile::tempdir().unwrap();
    let mut n = Node::start_in(dir.path(), "durability: buffer\n");
    for i in 0..50 {
        assert_eq!(n.put(&format!("/kv/k/{i}"), "1").status, 200);
    }
    std::fs::remove_dir_all(dir.path().join("data")).unwrap();
    // fjall's flush worker fails on the missing directory; waiting for it hung forever.
    let status = n.terminate();
    assert_eq!(status.code(), Some(1), "{}", n.log());
    assert!(n.log().contains("the data dir was removed"), "{}", n.log());
}

#[test]
fn a_database_without_its_marker_is_refused_and_kept() {
    // A restore that copied only db/ (or a lost marker): the data must survive.
    let dir = tempfile::tempdir().unwrap();
    let mut n = Node::start_in(dir.path(), "");
    assert_eq!(n.put("/kv/precious", "1").status, 200);
    assert!(n.terminate().success());
    std::fs::remove_file(dir.path().join("data/db.created")).unwrap();
    let mut refused = Node::spawn_in(dir.path(), "");
    let status = refused.wait_exit();
    assert_eq!(status.code(), Some(1), "{}", refused.log());
    assert!(refused.log().contains("kvs will not touch it"), "{}", refused.log());
    assert!(dir.path().join("data/db").exists(), "the database is kept");
    // With the marker back, everything is there.
    std::fs::write(dir.path().join("data/db.created"), b"").unwrap();
    n.restart();
    assert_eq!(n.get("/kv/precious").text(), "1");
}
