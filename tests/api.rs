//! The client API of one real node: CRUD, listing, and every bad input.

mod common;
use common::*;

fn node(extra: &str) -> (tempfile::TempDir, Node) {
    let dir = tempfile::tempdir().unwrap();
    let node = Node::start_in(dir.path(), extra);
    (dir, node)
}

#[test]
fn put_get_head_delete() {
    let (_d, n) = node("");
    let body = r#"{"name":"John Doe","age":30}"#;
    let put = n.put("/kv/users/john/profile", body);
    assert_eq!(put.status, 200, "{}", put.text());
    let v = put.json();
    let uuid = v["uuid"].as_str().unwrap().to_string();
    let ts = v["timestamp"].as_u64().unwrap();
    assert!(ts > 1_600_000_000_000);
    let version: u64 = v["version"].as_str().unwrap().parse().unwrap();
    assert_eq!(version >> 16, ts, "the version is the HLC: Unix ms in its top 48 bits");

    let get = n.get("/kv/users/john/profile");
    assert_eq!(get.status, 200);
    assert_eq!(get.text(), body, "stored bytes come back exactly");
    assert_eq!(get.header("content-type"), Some("application/json"));
    assert_eq!(get.header("etag"), Some(format!("\"{uuid}\"").as_str()));
    assert_eq!(get.header("x-kvs-timestamp"), Some(ts.to_string().as_str()));
    assert_eq!(get.header("x-kvs-version"), Some(version.to_string().as_str()));

    let head = http(&n.addr, "HEAD", "/kv/users/john/profile", None);
    assert_eq!(head.status, 200);
    assert!(head.body.is_empty());
    assert_eq!(head.header("content-length"), Some(body.len().to_string().as_str()));
    assert_eq!(head.header("etag"), get.header("etag"));

    // Whitespace and formatting are kept: values are stored as sent.
    let odd = "[ 1,\n 2 ]";
    assert_eq!(n.put("/kv/users/john/profile", odd).status, 200);
    assert_eq!(n.get("/kv/users/john/profile").text(), odd);

    assert_eq!(n.delete("/kv/users/john/profile").status, 204);
    n.get("/kv/users/john/profile").assert_error(404);
    assert_eq!(http(&n.addr, "HEAD", "/kv/users/john/profile", None).status, 404);
    // Deleting what is absent still answers 204 (and records a tombstone).
    assert_eq!(n.delete("/kv/never/was").status, 204);
    assert_eq!(n.health()["tombstones"], 2);
    n.get("/kv/never/was").assert_error(404);
}

#[test]
fn any_json_value_and_percent_encoded_keys() {
    let (_d, n) = node("");
    for (i, v) in ["1", "\"s\"", "null", "true", "[]", "{}", "-1.5e-3"].iter().enumerate() {
        let p = format!("/kv/values/{i}");
        assert_eq!(n.put(&p, v).status, 200, "{v}");
        assert_eq!(n.get(&p).text(), *v);
    }
    // 10,000-deep nesting is refused (serde_json's recursion limit), not a crash.
    let deep = "[".repeat(10_000) + &"]".repeat(10_000);
    n.put("/kv/deep", &deep).assert_error(400);
    let deep_obj = "{\"a\":".repeat(10_000) + "1" + &"}".repeat(10_000);
    n.put("/kv/deep", &deep_obj).assert_error(400);
    // %2F is a slash inside the key; the key is decoded exactly once.
    assert_eq!(n.put("/kv/a%20b/c%2Fd", "1").status, 200);
    assert_eq!(n.get("/kv/a%20b/c/d").text(), "1");
    assert_eq!(n.put("/kv/lit/%252e%252e", "2").status, 200);
    assert_eq!(n.get("/kv/lit/%252e%252e").text(), "2");
    n.get("/kv/lit/..").assert_error(400);
    assert_eq!(n.put("/kv/caf%C3%A9", "3").status, 200);
    assert_eq!(n.get("/kv/café").status, 200);
}

#[test]
fn listing_and_pagination() {
    let (_d, n) = node("");
    for k in ["a", "a/b", "a/c/d", "a-x", "ab", "b", "a/zz"] {
        assert_eq!(n.put(&format!("/kv/{k}"), "1").status, 200);
    }
    n.delete("/kv/a/zz");
    let all = n.get("/kv/?keys").json();
    assert_eq!(all["keys"], serde_json::json!(["a", "a-x", "a/b", "a/c/d", "ab", "b"]));
    assert!(all["next"].is_null());

    let under = n.get("/kv/a?keys").json();
    assert_eq!(under["keys"], serde_json::json!(["a", "a/b", "a/c/d"]), "prefix itself and a/..., not a-x or ab");

    let p1 = n.get("/kv/a?keys&limit=2").json();
    assert_eq!(p1["keys"], serde_json::json!(["a", "a/b"]));
    assert_eq!(p1["next"], "a/b");
    let p2 = n.get("/kv/a?keys&limit=2&after=a%2Fb").json();
    assert_eq!(p2["keys"], serde_json::json!(["a/c/d"]));
    assert!(p2["next"].is_null());
    let p3 = n.get("/kv/?keys&after=ab").json();
    assert_eq!(p3["keys"], serde_json::json!(["b"]));
    assert_eq!(n.get("/kv/nothing?keys").json()["keys"], serde_json::json!([]));

    n.get("/kv/?keys&limit=0").assert_error(400);
    n.get("/kv/?keys&limit=10001").assert_error(400);
    n.get("/kv/?keys&limit=x").assert_error(400);
    n.get("/kv/?keys&bogus=1").assert_error(400);
    n.get("/kv/a/?keys").assert_error(400);
}

#[test]
fn many_pages_cover_every_key_once() {
    let (_d, n) = node("durability: buffer\n");
    let mut expected: Vec<String> = (0..250).map(|i| format!("k/{i:03}")).collect();
    for k in &expected {
        assert_eq!(n.put(&format!("/kv/{k}"), "{}").status, 200);
    }
    expected.sort();
    let mut seen = Vec::new();
    let mut after: Option<String> = None;
    loop {
        let q = match &after {
            Some(a) => format!("/kv/k?keys&limit=100&after={}", a.replace('/', "%2F")),
            None => "/kv/k?keys&limit=100".into(),
        };
        let page = n.get(&q).json();
        seen.extend(page["keys"].as_array().unwrap().iter().map(|k| k.as_str().unwrap().to_string()));
        match page["next"].as_str() {
            Some(next) => after = Some(next.to_string()),
            None => break,
        }
    }
    assert_eq!(seen, expected);
}

#[test]
fn bad_paths_are_400() {
    let (_d, n) = node("");
    let long = format!("/kv/{}", "a".repeat(1025));
    for p in [
        "/kv/",
        "/kv//a",
        "/kv/a/",
        "/kv/a//b",
        "/kv/.",
        "/kv/..",
        "/kv/a/./b",
        "/kv/a/../b",
        "/kv/a/%2e%2e/b",
        "/kv/%2E%2E",
        "/kv/a%00b",
        "/kv/a%0Ab",
        "/kv/a%7F",
        "/kv/a%zz",
        "/kv/a%",
        "/kv/%ff",
        "/kv/a%2F",
        long.as_str(),
    ] {
        n.put(p, "1").assert_error(400);
        n.get(p).assert_error(400);
        n.delete(p).assert_error(400);
    }
    assert_eq!(n.put(&format!("/kv/{}", "a".repeat(1024)), "1").status, 200);
    assert_eq!(n.health()["keys"], 1, "nothing else was stored");
}

#[test]
fn bad_bodies() {
    let (_d, n) = node("max_value_bytes: 1000\n");
    for body in ["", "nope", "{", "{\"a\":1} trailing", "[1,]", "{'a':1}"] {
        n.put("/kv/x", body).assert_error(400);
    }
    let ok = format!("\"{}\"", "a".repeat(998));
    assert_eq!(n.put("/kv/x", &ok).status, 200);
    n.put("/kv/x", &format!("\"{}\"", "a".repeat(999))).assert_error(413);
    // A large declared length is refused before the body is read.
    let req = "PUT /kv/x HTTP/1.1\r\nHost: x\r\nContent-Length: 100000000\r\nConnection: close\r\n\r\n";
    raw(&n.addr, req.as_bytes(), false).assert_error(413);
    // Chunked bodies have no declared length: counted while reading.
    let first = format!("\"{}", "a".repeat(599));
    let second = "a".repeat(600);
    let req = format!(
        "PUT /kv/x HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n258\r\n{first}\r\n258\r\n{second}\r\n0\r\n\r\n"
    );
    raw(&n.addr, req.as_bytes(), false).assert_error(413);
    assert_eq!(n.get("/kv/x").text(), ok, "refused writes lost nothing");
}

#[test]
fn routes_methods_and_headers() {
    let (_d, n) = node("");
    n.get("/nope").assert_error(404);
    n.get("/kv").assert_error(404);
    for (method, path, allow) in [
        ("POST", "/kv/a", "GET, HEAD, PUT, DELETE"),
        ("PATCH", "/kv/a", "GET, HEAD, PUT, DELETE"),
        ("PUT", "/health", "GET, HEAD"),
        ("DELETE", "/members/", "GET, HEAD"),
    ] {
        let r = http(&n.addr, method, path, Some(b"1"));
        r.assert_error(405);
        assert_eq!(r.header("allow"), Some(allow));
    }
    let big = format!("GET /health HTTP/1.1\r\nHost: x\r\nX-Big: {}\r\nConnection: close\r\n\r\n", "a".repeat(20_000));
    raw(&n.addr, big.as_bytes(), false).assert_error(431);
    n.get("/kv/a?unexpected").assert_error(400);
    n.put("/kv/a?x=1", "1").assert_error(400);
}

#[test]
fn health_and_members() {
    let (_d, n) = node("node_id: alpha\n");
    let h = n.health();
    assert_eq!(h["status"], "ok");
    assert_eq!(h["mode"], "normal");
    assert_eq!(h["member_count"], 1);
    assert_eq!(h["node_id"], "alpha");
    let m = n.get("/members/").json();
    let m = m.as_array().unwrap();
    assert_eq!(m.len(), 1);
    assert_eq!(m[0]["id"], "alpha");
    assert_eq!(m[0]["address"], n.addr.as_str());
    assert!(m[0]["joined_timestamp"].as_u64().unwrap() > 0);
    assert!(m[0]["last_seen"].as_u64().unwrap() > 0);
}

#[test]
fn read_only_refuses_writes() {
    let dir = tempfile::tempdir().unwrap();
    let mut n = Node::start_in(dir.path(), "");
    assert_eq!(n.put("/kv/kept", "1").status, 200);
    n.terminate();
    let config = std::fs::read_to_string(&n.config).unwrap() + "read_only: true\n";
    std::fs::write(&n.config, config).unwrap();
    n.restart();
    n.put("/kv/kept", "2").assert_error(403);
    n.delete("/kv/kept").assert_error(403);
    assert_eq!(n.get("/kv/kept").text(), "1");
    assert_eq!(n.health()["mode"], "read-only");
}

/// A request with extra headers.
fn with_headers(n: &Node, method: &str, path: &str, headers: &[(&str, &str)], body: Option<&str>) -> Resp {
    raw(&n.addr, &request(method, path, headers, body.map(str::as_bytes)), method == "HEAD")
}

#[test]
fn conditional_writes_compare_and_set_and_create_only() {
    let (_d, n) = node("");
    let first = n.put("/kv/cas", "1").json()["uuid"].as_str().unwrap().to_string();
    let etag = format!("\"{first}\"");
    assert_eq!(n.get("/kv/cas").header("etag"), Some(etag.as_str()));
    // If-Match with the current ETag: written.
    let second = with_headers(&n, "PUT", "/kv/cas", &[("If-Match", &etag)], Some("2"));
    assert_eq!(second.status, 200, "{}", second.text());
    let second_tag = format!("\"{}\"", second.json()["uuid"].as_str().unwrap());
    // The same stale ETag again: 412 naming the current version; nothing written.
    let stale = with_headers(&n, "PUT", "/kv/cas", &[("If-Match", &etag)], Some("3"));
    stale.assert_error(412);
    assert_eq!(stale.header("etag"), Some(second_tag.as_str()));
    assert_eq!(stale.json()["current"], second_tag.as_str());
    assert_eq!(n.get("/kv/cas").text(), "2");
    // DELETE takes the same conditions.
    with_headers(&n, "DELETE", "/kv/cas", &[("If-Match", &etag)], None).assert_error(412);
    assert_eq!(with_headers(&n, "DELETE", "/kv/cas", &[("If-Match", &second_tag)], None).status, 204);
    n.get("/kv/cas").assert_error(404);
    // If-Match on a deleted key: 412 with no current version.
    let gone = with_headers(&n, "PUT", "/kv/cas", &[("If-Match", "*")], Some("4"));
    gone.assert_error(412);
    assert_eq!(gone.json()["current"], serde_json::Value::Null);
    // Create-only: taken over a delete and over nothing, refused over a value.
    assert_eq!(with_headers(&n, "PUT", "/kv/cas", &[("If-None-Match", "*")], Some("5")).status, 200);
    assert_eq!(with_headers(&n, "PUT", "/kv/new", &[("If-None-Match", "*")], Some("6")).status, 200);
    with_headers(&n, "PUT", "/kv/new", &[("If-None-Match", "*")], Some("7")).assert_error(412);
    assert_eq!(n.get("/kv/new").text(), "6");
}

#[test]
fn bad_conditions_get_400_and_write_nothing() {
    let (_d, n) = node("");
    let uuid = n.put("/kv/k", "1").json()["uuid"].as_str().unwrap().to_string();
    for headers in [
        vec![("If-Match", uuid.clone())],
        vec![("If-Match", format!("W/\"{uuid}\""))],
        vec![("If-Match", "\"not-a-uuid\"".to_string())],
        vec![("If-Match", format!("\"{uuid}\", \"{uuid}\""))],
        vec![("If-None-Match", format!("\"{uuid}\""))],
        vec![("If-Match", format!("\"{uuid}\"")), ("If-None-Match", "*".to_string())],
        vec![("If-Match", format!("\"{uuid}\"")), ("If-Match", format!("\"{uuid}\""))],
    ] {
        let h: Vec<(&str, &str)> = headers.iter().map(|(k, v)| (*k, v.as_str())).collect();
        let r = with_headers(&n, "PUT", "/kv/k", &h, Some("2"));
        r.assert_error(400);
        assert!(r.json()["error"].as_str().unwrap().contains("Match"), "{headers:?}: {}", r.text());
        with_headers(&n, "DELETE", "/kv/k", &h, None).assert_error(400);
    }
    assert_eq!(n.get("/kv/k").text(), "1", "nothing was written");
}

#[test]
fn recurse_reads_values_with_paging() {
    let (_d, n) = node("");
    for (k, v) in
        [("users", "0"), ("users/ann", r#"{"a": 1}"#), ("users/bob", "[1,\n 2]"), ("usersx", "9"), ("users/cy", "3")]
    {
        assert_eq!(n.put(&format!("/kv/{k}"), v).status, 200);
    }
    assert_eq!(n.delete("/kv/users/cy").status, 204);
    let all = n.get("/kv/users?recurse");
    assert_eq!(all.status, 200, "{}", all.text());
    let v = all.json();
    let keys: Vec<&str> = v["items"].as_array().unwrap().iter().map(|i| i["key"].as_str().unwrap()).collect();
    assert_eq!(keys, ["users", "users/ann", "users/bob"], "the prefix and under it; not usersx, not deleted");
    assert_eq!(v["items"][1]["value"], serde_json::json!({"a": 1}));
    assert_eq!(v["items"][2]["value"], serde_json::json!([1, 2]));
    let get = n.get("/kv/users/ann");
    assert_eq!(format!("\"{}\"", v["items"][1]["uuid"].as_str().unwrap()), get.header("etag").unwrap());
    assert!(v["items"][1]["version"].is_string() && v["items"][1]["timestamp"].is_u64());
    assert_eq!(v["next"], serde_json::Value::Null);
    // Paged: limit, then after the returned next.
    let first = n.get("/kv/users?recurse&limit=2").json();
    assert_eq!(first["items"].as_array().unwrap().len(), 2);
    assert_eq!(first["next"], "users/ann");
    let rest = n.get("/kv/users?recurse&limit=2&after=users%2Fann").json();
    assert_eq!(rest["items"][0]["key"], "users/bob");
    assert_eq!(rest["next"], serde_json::Value::Null);
    // Over every key.
    assert_eq!(n.get("/kv/?recurse").json()["items"].as_array().unwrap().len(), 4);
    n.get("/kv/users?recurse&keys").assert_error(400);
    n.get("/kv/users?recurse&separator=/").assert_error(400);
}

#[test]
fn a_separator_lists_one_level_like_a_directory() {
    let (_d, n) = node("");
    for k in ["users/ann", "users/bob/profile", "users/bob/photos/1", "users/cy", "users/dan/x", "users2/z", "top"] {
        assert_eq!(n.put(&format!("/kv/{k}"), "1").status, 200);
    }
    let level = |q: &str| n.get(&format!("/kv/{q}")).json();
    assert_eq!(
        level("users?keys&separator=/")["keys"],
        serde_json::json!(["users/ann", "users/bob/", "users/cy", "users/dan/"])
    );
    assert_eq!(level("?keys&separator=/")["keys"], serde_json::json!(["top", "users/", "users2/"]));
    assert_eq!(
        level("users/bob?keys&separator=/")["keys"],
        serde_json::json!(["users/bob/photos/", "users/bob/profile"])
    );
    // Paging steps over a whole level at once.
    let page = level("users?keys&separator=/&limit=2");
    assert_eq!(page["keys"], serde_json::json!(["users/ann", "users/bob/"]));
    assert_eq!(page["next"], "users/bob/");
    let page = level("users?keys&separator=/&limit=2&after=users%2Fbob%2F");
    assert_eq!(page["keys"], serde_json::json!(["users/cy", "users/dan/"]));
    assert_eq!(page["next"], serde_json::Value::Null);
    // A level whose keys are all deleted is gone.
    assert_eq!(n.delete("/kv/users/dan/x").status, 204);
    assert_eq!(level("users?keys&separator=/")["keys"], serde_json::json!(["users/ann", "users/bob/", "users/cy"]));
    n.get("/kv/users?keys&separator=,").assert_error(400);
}
