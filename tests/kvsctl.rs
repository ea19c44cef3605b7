//! kvsctl against real `kvs` processes: every command, its exit status and `--json`.

mod common;
use common::*;
use std::io::Write;
use std::process::{Command, Stdio};

const KVSCTL: &str = env!("CARGO_BIN_EXE_kvsctl");

/// What one kvsctl run printed and how it exited.
struct Run {
    code: i32,
    stdout: String,
    stderr: String,
}

impl Run {
    fn json(&self) -> serde_json::Value {
        serde_json::from_str(self.stdout.trim()).unwrap_or_else(|e| panic!("not JSON ({e}): {}", self.stdout))
    }
}

/// Runs kvsctl against `addr` with `args` (and `stdin`, if any).
fn ctl(addr: &str, args: &[&str], stdin: Option<&str>) -> Run {
    let mut child = Command::new(KVSCTL)
        .arg("--addr")
        .arg(format!("http://{addr}"))
        .args(args)
        .env_remove("KVS_ADDR")
        .env_remove("KVS_TOKEN")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("kvsctl starts");
    let mut input = child.stdin.take().unwrap();
    if let Some(s) = stdin {
        input.write_all(s.as_bytes()).unwrap();
    }
    drop(input);
    let out = child.wait_with_output().unwrap();
    Run {
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

fn ok(r: Run) -> Run {
    assert_eq!(r.code, 0, "stdout: {}\nstderr: {}", r.stdout, r.stderr);
    r
}

#[test]
fn keys_put_get_ls_rm_with_exit_codes_and_json() {
    let dir = tempfile::tempdir().unwrap();
    let n = Node::start_in(dir.path(), "");
    let a = n.addr.as_str();
    // put: a value, @FILE, stdin; get prints it pretty, --json with its version.
    ok(ctl(a, &["put", "users/john", r#"{"name":"John"}"#], None));
    let file = dir.path().join("mary.json");
    std::fs::write(&file, r#"{"name":"Mary"}"#).unwrap();
    ok(ctl(a, &["put", "users/mary", &format!("@{}", file.display())], None));
    ok(ctl(a, &["put", "users/ann/profile", "-"], Some("[1, 2]")));
    assert_eq!(n.get("/kv/users/ann/profile").text(), "[1, 2]", "stored exactly as sent");
    assert_eq!(ok(ctl(a, &["get", "users/john"], None)).stdout, "{\n  \"name\": \"John\"\n}\n");
    let got = ok(ctl(a, &["--json", "get", "users/john"], None)).json();
    assert_eq!(got["value"]["name"], "John");
    assert_eq!(got["uuid"].as_str().unwrap().len(), 36);
    // Not found: exit 3; a bad value: exit 1 with the node's error; usage: exit 2.
    let missing = ctl(a, &["get", "users/nobody"], None);
    assert_eq!(missing.code, 3, "{}", missing.stderr);
    let bad = ctl(a, &["put", "users/x", "{not json"], None);
    assert_eq!(bad.code, 1);
    assert!(bad.stderr.contains("JSON"), "{}", bad.stderr);
    assert_eq!(ctl(a, &["put", "users/x"], None).code, 2);
    assert_eq!(ctl(a, &["frobnicate"], None).code, 2);
    // TTL and conditions.
    let put = ok(ctl(a, &["--json", "put", "sessions/s1", "1", "--ttl", "60"], None)).json();
    assert!(put["expires"].as_u64().is_some());
    assert!(ok(ctl(a, &["--json", "get", "sessions/s1"], None)).json()["expires"].as_u64().is_some());
    assert_eq!(ctl(a, &["put", "sessions/s1", "2", "--ttl", "0"], None).code, 1);
    let uuid = put["uuid"].as_str().unwrap();
    let refused = ctl(a, &["put", "sessions/s1", "3", "--if-match", "00000000-0000-0000-0000-000000000000"], None);
    assert_eq!(refused.code, 1);
    assert!(refused.stderr.contains("412"), "{}", refused.stderr);
    ok(ctl(a, &["put", "sessions/s1", "3", "--if-match", uuid], None));
    assert_eq!(ctl(a, &["put", "sessions/s1", "4", "--if-absent"], None).code, 1);
    ok(ctl(a, &["put", "sessions/s2", "4", "--if-absent"], None));
    // ls: one level, -r, --values, --json.
    assert_eq!(ok(ctl(a, &["ls", "users"], None)).stdout, "users/ann/\nusers/john\nusers/mary\n");
    assert_eq!(ok(ctl(a, &["ls", "users", "-r"], None)).stdout, "users/ann/profile\nusers/john\nusers/mary\n");
    assert_eq!(ok(ctl(a, &["ls"], None)).stdout, "sessions/\nusers/\n");
    let values = ok(ctl(a, &["ls", "users", "--values"], None)).stdout;
    assert!(values.contains("users/john\t{\"name\":\"John\"}"), "{values}");
    let listed = ok(ctl(a, &["--json", "ls", "users", "-r"], None)).json();
    assert_eq!(listed, serde_json::json!(["users/ann/profile", "users/john", "users/mary"]));
    // rm: one key, then a prefix.
    ok(ctl(a, &["rm", "users/john"], None));
    assert_eq!(ctl(a, &["get", "users/john"], None).code, 3);
    let deleted = ok(ctl(a, &["--json", "rm", "users", "-r"], None)).json();
    assert_eq!(deleted["deleted"], 2);
    assert_eq!(ok(ctl(a, &["ls", "users", "-r"], None)).stdout, "");
    // Nothing listening: exit 1 naming the address.
    let down = Command::new(KVSCTL).args(["--addr", "127.0.0.1:1", "get", "k"]).output().unwrap();
    assert_eq!(down.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&down.stderr).contains("127.0.0.1:1"));
}

#[test]
fn txn_members_health_and_status_on_a_cluster() {
    let d = Dirs::new();
    let (n1, n2, n3) = three(&d, "");
    let a = n1.addr.as_str();
    let body = r#"{"ops":[{"op":"check","key":"acct/c","absent":true},{"op":"put","key":"acct/a","value":70},{"op":"put","key":"acct/b","value":30}]}"#;
    let file = d.0.path().join("txn.json");
    std::fs::write(&file, body).unwrap();
    let r = ok(ctl(a, &["txn", file.to_str().unwrap(), "--ack", "all"], None));
    assert!(r.stdout.contains("put acct/a: version"), "{}", r.stdout);
    for n in [&n1, &n2, &n3] {
        assert_eq!(n.get("/kv/acct/b").text(), "30", "ack=all: on every node");
    }
    // A check that fails: exit 1, the node's reason.
    let conflict = ctl(a, &["txn", "-"], Some(r#"{"ops":[{"op":"check","key":"acct/a","absent":true}]}"#));
    assert_eq!(conflict.code, 1);
    assert!(conflict.stderr.contains("409"), "{}", conflict.stderr);
    // members, health, status.
    let members = ok(ctl(a, &["members"], None)).stdout;
    for id in ["n1", "n2", "n3"] {
        assert!(members.contains(id), "{members}");
    }
    assert_eq!(ok(ctl(a, &["--json", "members"], None)).json().as_array().unwrap().len(), 3);
    assert!(ok(ctl(a, &["health"], None)).stdout.contains("normal"));
    let status = ok(ctl(a, &["status"], None)).stdout;
    assert_eq!(status.lines().count(), 4, "{status}");
    assert!(
        status.lines().skip(1).all(|l| l.contains("alive") && l.contains("normal") && l.ends_with("ok")),
        "{status}"
    );
    let status = ok(ctl(a, &["--json", "status"], None)).json();
    assert!(status.as_array().unwrap().iter().all(|m| m["health"]["status"] == "ok"));
    // A member down: status says so and exits 1.
    drop(n3);
    let down = ctl(a, &["status"], None);
    assert_eq!(down.code, 1, "{}", down.stdout);
    assert!(down.stdout.contains("unreachable"), "{}", down.stdout);
}

#[test]
fn watch_prints_changes_and_runs_a_handler_per_change() {
    let dir = tempfile::tempdir().unwrap();
    let n = Node::start_in(dir.path(), "");
    let addr = n.addr.clone();
    // From now: only what comes after it starts.
    n.put("/kv/jobs/old", "0");
    let since = n.health()["last_seq"].as_u64().unwrap().to_string();
    let watcher = {
        let (addr, since) = (addr.clone(), since.clone());
        std::thread::spawn(move || ctl(&addr, &["--json", "watch", "jobs", "--since", &since, "--count", "2"], None))
    };
    n.put("/kv/other/x", "1");
    n.put("/kv/jobs/a", r#"{"n":1}"#);
    // Another key: a value is shown only while its version is current, and the watcher
    // may read after this delete.
    n.delete("/kv/jobs/b");
    let r = ok(watcher.join().unwrap());
    let events: Vec<serde_json::Value> = r.stdout.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(events.len(), 2, "{}", r.stdout);
    assert_eq!((events[0]["op"].as_str(), events[0]["key"].as_str()), (Some("put"), Some("jobs/a")));
    assert_eq!(events[0]["value"]["n"], 1);
    assert_eq!((events[1]["op"].as_str(), events[1]["key"].as_str()), (Some("delete"), Some("jobs/b")));
    // A handler gets each event on its stdin.
    let log = dir.path().join("handled.log");
    let handler = {
        let (addr, log) = (addr.clone(), log.display().to_string());
        std::thread::spawn(move || {
            ctl(
                &addr,
                &["watch", "jobs", "--since", &since, "--count", "2", "--", "sh", "-c", &format!("cat >> {log}")],
                None,
            )
        })
    };
    let r = ok(handler.join().unwrap());
    assert!(r.stdout.is_empty(), "{}", r.stdout);
    let handled = std::fs::read_to_string(&log).unwrap();
    assert_eq!(handled.lines().count(), 2, "{handled}");
    // A failing handler stops the watch with exit 1.
    n.put("/kv/jobs/b", "1");
    let failing = ctl(&addr, &["watch", "jobs", "--since", "0", "--", "false"], None);
    assert_eq!(failing.code, 1);
    // A cursor from the future: 410, exit 1 with the advice.
    let gone = ctl(&addr, &["watch", "jobs", "--since", "999999"], None);
    assert_eq!(gone.code, 1);
    assert!(gone.stderr.contains("410"), "{}", gone.stderr);
}

#[test]
fn tokens_and_keygen() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(dir.path()).unwrap();
    let management = "management-token-0123456789abcdef0123456789";
    let token_file = dir.path().join("management.token");
    std::fs::write(&token_file, format!("{management}\n")).unwrap();
    // keygen prints a key kvs takes as its cluster key.
    let key = ok(Command::new(KVSCTL)
        .arg("keygen")
        .output()
        .map(|o| Run {
            code: o.status.code().unwrap_or(-1),
            stdout: String::from_utf8_lossy(&o.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&o.stderr).into_owned(),
        })
        .unwrap())
    .stdout;
    let key_file = dir.path().join("cluster.key");
    std::fs::write(&key_file, &key).unwrap();
    let n = Node::start_in(
        dir.path(),
        &format!(
            "client_auth: true\nmanagement_token_file: {}\ncluster_key_file: {}",
            token_file.display(),
            key_file.display()
        ),
    );
    let a = n.addr.as_str();
    let admin = ["--token", management];
    // Without a token: refused, exit 1.
    assert_eq!(ctl(a, &["get", "k"], None).code, 1);
    let made = ok(ctl(
        a,
        &[&admin[..], &["--json", "token", "create", "--name", "app", "--rule", "app/=write", "--rule", "=read"]]
            .concat(),
        None,
    ))
    .json();
    let (id, secret) = (made["id"].as_str().unwrap().to_string(), made["secret"].as_str().unwrap().to_string());
    let list = ok(ctl(a, &[&admin[..], &["token", "list"]].concat(), None)).stdout;
    assert!(list.contains(&id) && list.contains("app/=write,=read"), "{list}");
    assert!(ok(ctl(a, &[&admin[..], &["token", "show", &id]].concat(), None)).stdout.contains("app"));
    // The new token writes under app/ and only reads elsewhere (KVS_TOKEN works too).
    let as_app = |args: &[&str]| {
        let out = Command::new(KVSCTL)
            .args(["--addr", &format!("http://{a}")])
            .args(args)
            .env("KVS_TOKEN", &secret)
            .output()
            .unwrap();
        out.status.code().unwrap_or(-1)
    };
    assert_eq!(as_app(&["put", "app/x", "1"]), 0);
    assert_eq!(as_app(&["put", "other/x", "1"]), 1);
    assert_eq!(as_app(&["get", "app/x"]), 0);
    ok(ctl(a, &[&admin[..], &["token", "revoke", &id]].concat(), None));
    assert_eq!(ctl(a, &[&admin[..], &["token", "show", &id]].concat(), None).code, 3);
    wait_for(DEADLINE, "the revoked token refused", || (as_app(&["get", "app/x"]) == 1).then_some(()));
    assert_eq!(ctl(a, &[&admin[..], &["token", "create", "--name", "x", "--rule", "nope"]].concat(), None).code, 1);
}

#[test]
fn export_then_import_merges_and_never_overwrites_newer_writes_or_deletes() {
    let d = Dirs::new();
    let (a, b) = (d.start("a", &[], ""), d.start("b", &[], ""));
    for (k, v) in [("app/1", "1"), ("app/2", "2"), ("app/3", "3"), ("other/x", "9")] {
        assert_eq!(a.put(&format!("/kv/{k}"), v).status, 200);
    }
    assert_eq!(a.put("/kv/app/t?ttl=3600", "\"t\"").status, 200);
    let exported = ok(ctl(&a.addr, &["export", "app"], None)).stdout;
    assert_eq!(exported.lines().count(), 4, "{exported}");
    let file = d.0.path().join("app.jsonl");
    // One more line: a version that expired since the export.
    let stale = r#"{"key":"app/gone","value":1,"version":"1","uuid":"x","timestamp":0,"expires":1}"#;
    std::fs::write(&file, format!("{exported}{stale}\n")).unwrap();
    // On b, after the export: a newer value of app/2, and app/3 written then deleted.
    assert_eq!(b.put("/kv/app/2", "\"newer on b\"").status, 200);
    assert_eq!(b.put("/kv/app/3", "\"b\"").status, 200);
    assert_eq!(b.delete("/kv/app/3").status, 204);
    let r = ok(ctl(&b.addr, &["--json", "import", file.to_str().unwrap()], None)).json();
    assert_eq!(r, serde_json::json!({"imported": 2, "skipped_newer": 2, "skipped_expired": 1}));
    assert_eq!(b.get("/kv/app/1").text(), "1");
    assert_eq!(b.get("/kv/app/2").text(), "\"newer on b\"", "a newer write is kept");
    b.get("/kv/app/3").assert_error(404);
    b.get("/kv/app/gone").assert_error(404);
    b.get("/kv/other/x").assert_error(404);
    let expires = b.get("/kv/app/t").header("x-kvs-expires").unwrap().parse::<u64>().unwrap();
    let original = a.get("/kv/app/t").header("x-kvs-expires").unwrap().parse::<u64>().unwrap();
    assert!(expires >= original && expires <= original + 2_000, "the TTL left is kept: {original} -> {expires}");
    // Again: everything there is now newer than the export.
    let again = ok(ctl(&b.addr, &["--json", "import", file.to_str().unwrap()], None)).json();
    assert_eq!(again["imported"], 0);
    // A broken line: exit 1 naming it; what came before stays.
    std::fs::write(&file, format!("{}\n{{nope\n", exported.lines().next().unwrap())).unwrap();
    let broken = ctl(&b.addr, &["import", file.to_str().unwrap()], None);
    assert_eq!(broken.code, 1);
    assert!(broken.stderr.contains("app.jsonl:2"), "{}", broken.stderr);
    // The condition header by itself: a bad version is a 400.
    let bad = raw(&b.addr, &request("PUT", "/kv/app/1", &[("X-Kvs-If-Older-Than", "soon")], Some(b"1")), false);
    bad.assert_error(400);
}
