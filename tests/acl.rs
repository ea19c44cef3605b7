//! Client tokens with real processes (README "Security", ARCHITECTURE.md "Client
//! tokens"): the 401/403 matrix per route, tokens replicated between nodes, revocation.

mod common;
use common::*;
use std::path::Path;

const MANAGEMENT: &str = "management-token-0123456789abcdef0123456789";

/// A cluster key every node of a test shares (client auth needs one).
const CLUSTER_KEY: &str = "q83vEjRWeJq83vEjRWeJq83vEjRWeJq83vEjRWeJq80=";

/// Config lines turning client auth on with the management token and the cluster
/// key in `dir`.
fn auth_on(dir: &Path) -> String {
    std::fs::create_dir_all(dir).unwrap();
    let file = dir.join("management.token");
    std::fs::write(&file, format!("{MANAGEMENT}\n")).unwrap();
    let key = dir.join("cluster.key");
    std::fs::write(&key, format!("{CLUSTER_KEY}\n")).unwrap();
    format!("client_auth: true\nmanagement_token_file: {}\ncluster_key_file: {}", file.display(), key.display())
}

/// One request with `Authorization: Bearer <token>` (no header for `None`).
fn call(addr: &str, token: Option<&str>, method: &str, path: &str, body: Option<&str>) -> Resp {
    let auth = token.map(|t| format!("Bearer {t}"));
    let headers: Vec<(&str, &str)> = auth.iter().map(|a| ("Authorization", a.as_str())).collect();
    raw(addr, &request(method, path, &headers, body.map(str::as_bytes)), method == "HEAD")
}

/// Makes a token with `rules` (JSON) through `addr`; returns (id, secret).
fn make(addr: &str, rules: &str, extra: &str) -> (String, String) {
    let r =
        call(addr, Some(MANAGEMENT), "POST", "/acl/tokens", Some(&format!(r#"{{"name":"t","rules":{rules}{extra}}}"#)));
    assert_eq!(r.status, 201, "{}", r.text());
    let v = r.json();
    (v["id"].as_str().unwrap().to_string(), v["secret"].as_str().unwrap().to_string())
}

fn assert_401(r: &Resp) {
    r.assert_error(401);
    assert_eq!(r.header("www-authenticate"), Some("Bearer"));
}

#[test]
fn every_route_answers_by_the_tokens_rules() {
    let d = Dirs::new();
    let n = d.start("n1", &[], &auth_on(&d.0.path().join("n1")));
    let a = n.addr.as_str();
    // Without a valid token: 401 everywhere but /health.
    assert_eq!(call(a, None, "GET", "/health", None).status, 200);
    for (m, p) in [("GET", "/kv/app/x"), ("PUT", "/kv/app/x"), ("DELETE", "/kv/app/x"), ("GET", "/kv/?keys")] {
        assert_401(&call(a, None, m, p, Some("1")));
    }
    for p in ["/metrics", "/members/", "/acl/whoami", "/acl/tokens"] {
        assert_401(&call(a, None, "GET", p, None));
        assert_401(&call(a, Some("kvs_unknown"), "GET", p, None));
    }
    let malformed =
        raw(a, b"GET /members/ HTTP/1.1\r\nHost: x\r\nAuthorization: Basic eDp5\r\nConnection: close\r\n\r\n", false);
    assert_401(&malformed);
    // The management token can do everything.
    assert_eq!(call(a, Some(MANAGEMENT), "PUT", "/kv/other/k", Some("1")).status, 200);
    assert_eq!(call(a, Some(MANAGEMENT), "PUT", "/kv/app/ro/k", Some("2")).status, 200);
    let (id, t) = make(a, r#"[{"prefix":"app/","access":"write"},{"prefix":"app/ro/","access":"read"}]"#, "");
    let t = Some(t.as_str());
    assert_eq!(call(a, t, "PUT", "/kv/app/x", Some("3")).status, 200);
    assert_eq!(call(a, t, "GET", "/kv/app/x", None).text(), "3");
    assert_eq!(call(a, t, "GET", "/kv/app/ro/k", None).text(), "2");
    call(a, t, "PUT", "/kv/app/ro/k", Some("4")).assert_error(403);
    call(a, t, "DELETE", "/kv/app/ro/k", None).assert_error(403);
    call(a, t, "GET", "/kv/other/k", None).assert_error(403);
    assert_eq!(call(a, t, "HEAD", "/kv/other/k", None).status, 403);
    assert_eq!(call(a, t, "HEAD", "/kv/app/x", None).status, 200);
    call(a, t, "PUT", "/kv/other/k", Some("5")).assert_error(403);
    // Listings leave out what the token cannot read, and say so.
    let all = call(a, t, "GET", "/kv/?keys", None);
    assert_eq!(all.json()["keys"], serde_json::json!(["app/ro/k", "app/x"]));
    assert_eq!(all.header("x-kvs-filtered"), Some("true"));
    let mine = call(a, t, "GET", "/kv/app?keys", None);
    assert_eq!(mine.header("x-kvs-filtered"), None);
    // So do reads with values and one-level listings.
    let values = call(a, t, "GET", "/kv/?recurse", None);
    let body = values.json();
    let keys: Vec<&str> = body["items"].as_array().unwrap().iter().map(|i| i["key"].as_str().unwrap()).collect();
    assert_eq!(keys, ["app/ro/k", "app/x"]);
    assert_eq!(values.header("x-kvs-filtered"), Some("true"));
    let level = call(a, t, "GET", "/kv/?keys&separator=/", None);
    assert_eq!(level.json()["keys"], serde_json::json!(["app/"]), "other/ holds nothing the token reads");
    assert_eq!(level.header("x-kvs-filtered"), Some("true"));
    let everything = call(a, Some(MANAGEMENT), "GET", "/kv/?keys&separator=/", None).json();
    assert_eq!(everything["keys"], serde_json::json!(["app/", "other/"]), "no ./ level for tokens");
    // Tokens never show in listings, and /kv cannot reach them.
    let everything = call(a, Some(MANAGEMENT), "GET", "/kv/?keys", None).json();
    assert_eq!(everything["keys"], serde_json::json!(["app/ro/k", "app/x", "other/k"]));
    call(a, Some(MANAGEMENT), "GET", &format!("/kv/./acl/tokens/{id}"), None).assert_error(400);
    call(a, Some(MANAGEMENT), "PUT", "/kv/./acl/tokens/forged", Some("{}")).assert_error(400);
    // Metrics need any rule; members and whoami any valid token; tokens admin.
    assert_eq!(call(a, t, "GET", "/metrics", None).status, 200);
    assert_eq!(call(a, t, "GET", "/members/", None).status, 200);
    let me = call(a, t, "GET", "/acl/whoami", None).json();
    assert_eq!(me["id"], id.as_str());
    assert!(me.get("secret").is_none() && me.get("secret_sha256").is_none());
    call(a, t, "GET", "/acl/tokens", None).assert_error(403);
    call(a, t, "GET", &format!("/acl/tokens/{id}"), None).assert_error(403);
    call(a, t, "DELETE", &format!("/acl/tokens/{id}"), None).assert_error(403);
    assert_401(&call(a, None, "DELETE", &format!("/acl/tokens/{id}"), None));
    call(a, t, "POST", "/acl/tokens", Some(r#"{"name":"x","rules":[{"prefix":"","access":"admin"}]}"#))
        .assert_error(403);
    let (_, denied) = make(a, r#"[{"prefix":"","access":"deny"}]"#, "");
    call(a, Some(&denied), "GET", "/metrics", None).assert_error(403);
    // Paging shows nothing a token cannot read, not even as the cursor.
    let nothing = call(a, Some(&denied), "GET", "/kv/?keys&limit=1", None);
    assert_eq!(nothing.json(), serde_json::json!({"keys": [], "next": null}));
    assert_eq!(nothing.header("x-kvs-filtered"), Some("true"));
    let (mut after, mut pages) = (String::new(), Vec::new());
    loop {
        let q = if after.is_empty() { String::new() } else { format!("&after={after}") };
        let page = call(a, t, "GET", &format!("/kv/?keys&limit=1{q}"), None).json();
        pages.push(page["keys"].clone());
        match page["next"].as_str() {
            Some(n) => {
                assert!(n.starts_with("app/"), "cursor {n} is a key the token cannot read");
                after = n.replace('/', "%2F");
            }
            None => break,
        }
    }
    assert_eq!(pages, vec![serde_json::json!(["app/ro/k"]), serde_json::json!(["app/x"]), serde_json::json!([])]);
    call(a, Some(&denied), "GET", "/kv/app/x", None).assert_error(403);
    // A snapshot holds every key and the token hashes: admin only.
    call(a, t, "GET", "/admin/snapshot", None).assert_error(403);
    assert_401(&call(a, None, "GET", "/admin/snapshot", None));
    let snap = call(a, Some(MANAGEMENT), "GET", "/admin/snapshot", None);
    assert_eq!(snap.status, 200);
    assert_eq!(snap.header("content-type"), Some("application/octet-stream"));
    assert!(snap.body.windows(8).any(|w| w == kvs::snapshot::MAGIC), "not a snapshot");
    // Management: list (no secrets), show, bad requests, revoke.
    let list = call(a, Some(MANAGEMENT), "GET", "/acl/tokens", None);
    assert_eq!(list.json()["tokens"].as_array().unwrap().len(), 2);
    assert!(!list.text().contains("secret"), "{}", list.text());
    assert_eq!(call(a, Some(MANAGEMENT), "GET", &format!("/acl/tokens/{id}"), None).json()["id"], id.as_str());
    call(a, Some(MANAGEMENT), "GET", "/acl/tokens/nope", None).assert_error(404);
    call(a, Some(MANAGEMENT), "POST", "/acl/tokens", Some(r#"{"name":"x","rules":[{"prefix":"","access":"root"}]}"#))
        .assert_error(400);
    call(a, Some(MANAGEMENT), "POST", "/acl/tokens", Some("not json")).assert_error(400);
    assert_eq!(call(a, Some(MANAGEMENT), "DELETE", &format!("/acl/tokens/{id}"), None).status, 204);
    assert_401(&call(a, t, "GET", "/kv/app/x", None));
    call(a, Some(MANAGEMENT), "DELETE", &format!("/acl/tokens/{id}"), None).assert_error(404);
    // An expired token stops working by itself.
    let (_, short) = make(a, r#"[{"prefix":"","access":"read"}]"#, r#","ttl_seconds":1"#);
    assert_eq!(call(a, Some(&short), "GET", "/kv/app/ro/k", None).status, 200);
    wait_for(DEADLINE, "the token to expire", || {
        (call(a, Some(&short), "GET", "/kv/app/ro/k", None).status == 401).then_some(())
    });
    assert!(n.health()["client_auth_refused"].as_u64().unwrap() >= 10);
    // /health counts client keys only: tokens (two live, one revoked) are not keys.
    assert_eq!(n.health()["keys"], 3);
    assert_eq!(n.health()["tombstones"], 0);
}

#[test]
fn a_token_made_on_one_node_works_on_another_and_a_revocation_reaches_both() {
    let d = Dirs::new();
    let n1 = d.start("n1", &[], &auth_on(&d.0.path().join("n1")));
    let n2 = d.start("n2", &[&n1.addr], &auth_on(&d.0.path().join("n2")));
    wait_for(DEADLINE, "n2 in mode normal", || {
        (call(&n2.addr, None, "GET", "/health", None).json()["mode"] == "normal").then_some(())
    });
    let (id, t) = make(&n1.addr, r#"[{"prefix":"","access":"write"}]"#, "");
    wait_for(DEADLINE, "the token to work on n2", || {
        (call(&n2.addr, Some(&t), "PUT", "/kv/shared", Some("1")).status == 200).then_some(())
    });
    assert_eq!(call(&n2.addr, Some(MANAGEMENT), "DELETE", &format!("/acl/tokens/{id}"), None).status, 204);
    wait_for(DEADLINE, "the revocation to reach n1", || {
        (call(&n1.addr, Some(&t), "GET", "/kv/shared", None).status == 401).then_some(())
    });
    assert_401(&call(&n2.addr, Some(&t), "GET", "/kv/shared", None));
}

#[test]
fn acl_routes_are_off_with_client_auth_and_a_node_without_a_management_token_does_not_start() {
    let d = Dirs::new();
    let open = d.start("open", &[], "");
    call(&open.addr, None, "POST", "/acl/tokens", Some(r#"{"name":"x","rules":[{"prefix":"","access":"admin"}]}"#))
        .assert_error(404);
    assert_eq!(call(&open.addr, None, "PUT", "/kv/k", Some("1")).status, 200);
    let short = d.0.path().join("short.token");
    std::fs::write(&short, "too short").unwrap();
    let key = d.0.path().join("cluster.key");
    std::fs::write(&key, CLUSTER_KEY).unwrap();
    let keyed = format!("client_auth: true\ncluster_key_file: {}", key.display());
    let token = d.0.path().join("good.token");
    std::fs::write(&token, MANAGEMENT).unwrap();
    for (name, extra, names) in [
        ("none", keyed.clone(), "management_token_file"),
        ("short", format!("{keyed}\nmanagement_token_file: {}", short.display()), "management_token_file"),
        ("missing", format!("{keyed}\nmanagement_token_file: /nonexistent/token"), "management_token_file"),
        // Without a cluster key the node-to-node routes would bypass the tokens.
        ("keyless", format!("client_auth: true\nmanagement_token_file: {}", token.display()), "cluster_key_file"),
    ] {
        let mut n = Node::spawn_in(&d.0.path().join(name), &extra);
        assert_eq!(n.wait_exit().code(), Some(2), "{name}");
        let log = n.log();
        assert!(log.contains(names), "{name}: {log}");
        assert_eq!(log.trim().lines().count(), 1, "{name}: {log}");
    }
}

#[test]
fn the_change_feed_shows_only_what_the_token_can_read_and_never_tokens() {
    let d = Dirs::new();
    let n = d.start("n1", &[], &auth_on(&d.0.path().join("n1")));
    let a = n.addr.as_str();
    assert_401(&call(a, None, "GET", "/changes", None));
    let (_, none) = make(a, r#"[{"prefix":"app/","access":"deny"}]"#, "");
    call(a, Some(&none), "GET", "/changes", None).assert_error(403);
    let (_, t) = make(a, r#"[{"prefix":"app/","access":"read"}]"#, "");
    let t = Some(t.as_str());
    let start = call(a, t, "GET", "/changes", None).json()["last_seq"].as_u64().unwrap();
    assert_eq!(call(a, Some(MANAGEMENT), "PUT", "/kv/app/x", Some("1")).status, 200);
    assert_eq!(call(a, Some(MANAGEMENT), "PUT", "/kv/secret/y", Some("2")).status, 200);
    make(a, r#"[{"prefix":"app/","access":"write"}]"#, "");
    let feed = call(a, t, "GET", &format!("/changes?since={start}&values"), None);
    assert_eq!(feed.status, 200, "{}", feed.text());
    let body = feed.json();
    let keys: Vec<String> =
        body["events"].as_array().unwrap().iter().map(|e| e["key"].as_str().unwrap().to_string()).collect();
    assert_eq!(keys, vec!["app/x"], "no secret/y, and no token record");
    assert_eq!(feed.header("x-kvs-filtered"), Some("true"));
    // The management token sees every client key, still no token records.
    let all = call(a, Some(MANAGEMENT), "GET", &format!("/changes?since={start}"), None).json();
    let keys: Vec<&str> = all["events"].as_array().unwrap().iter().map(|e| e["key"].as_str().unwrap()).collect();
    assert_eq!(keys, vec!["app/x", "secret/y"]);
}

#[test]
fn a_revoked_token_stops_seeing_changes_on_an_open_stream() {
    use std::io::{Read, Write};
    let d = Dirs::new();
    let n = d.start("n1", &[], &auth_on(&d.0.path().join("n1")));
    let a = n.addr.as_str();
    let (id, t) = make(a, r#"[{"prefix":"app/","access":"read"}]"#, "");
    let mut s = std::net::TcpStream::connect(a).unwrap();
    s.set_read_timeout(Some(DEADLINE)).unwrap();
    let auth = format!("Bearer {t}");
    let head = [("Accept", "text/event-stream"), ("Authorization", auth.as_str())];
    s.write_all(&request("GET", "/changes?prefix=app", &head, None)).unwrap();
    let mut got = String::new();
    let deadline = std::time::Instant::now() + DEADLINE;
    let mut read_until = |s: &mut std::net::TcpStream, want: &str| {
        let mut buf = [0u8; 4096];
        while !got.contains(want) {
            assert!(std::time::Instant::now() < deadline, "no {want:?} in time: {got}");
            let k = s.read(&mut buf).expect("stream open");
            assert!(k > 0, "stream closed before {want:?}: {got}");
            got.push_str(&String::from_utf8_lossy(&buf[..k]));
        }
    };
    // The stream starts from the moment it is served: wait for its first frame.
    read_until(&mut s, "retry:");
    assert_eq!(call(a, Some(MANAGEMENT), "PUT", "/kv/app/x", Some("1")).status, 200);
    read_until(&mut s, "event: put");
    assert_eq!(call(a, Some(MANAGEMENT), "DELETE", &format!("/acl/tokens/{id}"), None).status, 204);
    assert_eq!(call(a, Some(MANAGEMENT), "PUT", "/kv/app/y", Some("2")).status, 200);
    read_until(&mut s, "event: error");
    assert!(got.contains("\"reason\":\"unauthorized\""), "{got}");
    assert!(!got.contains("app/y"), "nothing after the revocation: {got}");
}
