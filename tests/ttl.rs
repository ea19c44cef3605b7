//! Expiry (`PUT /kv/<path>?ttl=<s>`) on real processes: reads, bad input, the expiry
//! tombstone every node derives, and the scenarios of ARCHITECTURE.md "Expiry (TTL)".

mod common;
use common::*;

fn node(extra: &str) -> (tempfile::TempDir, Node) {
    let dir = tempfile::tempdir().unwrap();
    let n = Node::start_in(dir.path(), extra);
    (dir, n)
}

/// Every change of `key` in `n`'s feed: (op, uuid, version).
fn feed_of(n: &Node, key: &str) -> Vec<(String, String, String)> {
    let r = n.get("/changes?since=0&limit=10000");
    assert_eq!(r.status, 200, "{}", r.text());
    r.json()["events"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["key"] == key)
        .map(|e| {
            let s = |f: &str| e[f].as_str().unwrap().to_string();
            (s("op"), s("uuid"), s("version"))
        })
        .collect()
}

#[test]
fn a_ttl_write_shows_its_expiry_and_bad_ttls_write_nothing() {
    let (_d, n) = node("");
    let put = n.put("/kv/session/a?ttl=60", "{\"user\": 1}");
    assert_eq!(put.status, 200, "{}", put.text());
    let expires = put.json()["expires"].as_u64().unwrap();
    let written = put.json()["timestamp"].as_u64().unwrap();
    assert_eq!(expires, written + 60_000, "the expiry is the version's time plus the TTL");
    let get = n.get("/kv/session/a");
    assert_eq!(get.header("x-kvs-expires"), Some(expires.to_string().as_str()));
    let head = raw(&n.addr, &request("HEAD", "/kv/session/a", &[], None), true);
    assert_eq!((head.status, head.header("x-kvs-expires")), (200, Some(expires.to_string().as_str())));
    let items = n.get("/kv/session?recurse").json();
    assert_eq!(items["items"][0]["expires"], expires);
    // A later write without a TTL clears the expiry.
    n.put("/kv/session/a", "2");
    assert_eq!(n.get("/kv/session/a").header("x-kvs-expires"), None);
    assert!(n.get("/kv/session?recurse").json()["items"][0].get("expires").is_none());
    // Bad TTLs: 400 naming ttl, nothing written.
    for bad in ["0", "-1", "1.5", "abc", "", "315360001", "99999999999999999999"] {
        let r = n.put(&format!("/kv/session/b?ttl={bad}"), "1");
        r.assert_error(400);
        assert!(r.json()["error"].as_str().unwrap().contains("ttl"), "{bad}: {}", r.text());
    }
    n.get("/kv/session/b").assert_error(404);
    // Ten years is the longest.
    assert_eq!(n.put("/kv/session/b?ttl=315360000", "1").status, 200);
    // Only a PUT takes a ttl.
    n.call("DELETE", "/kv/session/b?ttl=5", None).assert_error(400);
    assert_eq!(n.get("/kv/session/b").text(), "1");
    // A transaction's put takes one too.
    let txn = n.call("POST", "/txn", Some(br#"{"ops":[{"op":"put","key":"session/c","value":3,"ttl":60}]}"#));
    assert_eq!(txn.status, 200, "{}", txn.text());
    let txn_expires = txn.json()["results"][0]["expires"].as_u64().unwrap();
    assert_eq!(n.get("/kv/session/c").header("x-kvs-expires"), Some(txn_expires.to_string().as_str()));
    n.call("POST", "/txn", Some(br#"{"ops":[{"op":"put","key":"session/d","value":3,"ttl":0}]}"#)).assert_error(400);
    n.get("/kv/session/d").assert_error(404);
}

#[test]
fn an_expired_key_is_absent_at_once_and_conditions_see_it_absent() {
    let (_d, n) = node("");
    let put = n.put("/kv/lease/x?ttl=1", "1");
    let expires = put.json()["expires"].as_u64().unwrap();
    n.put("/kv/lease/y", "2");
    wait_for(DEADLINE, "the lease to expire", || (n.get("/kv/lease/x").status == 404).then_some(()));
    // At once: the clock, not a sweep, decides (the sweep may not have run yet).
    assert!(kvs::clock::now_ms() >= expires);
    assert_eq!(n.get("/kv/lease?keys").json()["keys"], serde_json::json!(["lease/y"]));
    assert_eq!(n.get("/kv/lease?recurse").json()["items"].as_array().unwrap().len(), 1);
    // Create-only succeeds over an expired value; If-Match: * does not.
    let create = raw(&n.addr, &request("PUT", "/kv/lease/x", &[("If-None-Match", "*")], Some(b"3")), false);
    assert_eq!(create.status, 200, "{}", create.text());
    assert_eq!(n.get("/kv/lease/x").text(), "3");
}

#[test]
fn an_expiry_is_the_same_tombstone_on_all_three_nodes_and_a_delete_in_their_feeds() {
    let d = Dirs::new();
    let (n1, n2, n3) = three(&d, "");
    let put = n1.put("/kv/tmp/k?ttl=1", "{\"v\": 1}");
    assert_eq!(put.status, 200, "{}", put.text());
    let (uuid, version) =
        (put.json()["uuid"].as_str().unwrap().to_string(), put.json()["version"].as_str().unwrap().to_string());
    for n in [&n1, &n2, &n3] {
        // Each node's feed: the put, then (once its sweep or a peer made it) the delete.
        let events = wait_for(DEADLINE, &format!("the expiry in {}'s feed", n.addr), || {
            let events = feed_of(n, "tmp/k");
            (events.len() == 2).then_some(events)
        });
        assert_eq!(events[0], ("put".to_string(), uuid.clone(), version.clone()));
        let (op, tomb_uuid, tomb_version) = &events[1];
        assert_eq!(op, "delete");
        assert_eq!(tomb_version, &version, "the tombstone keeps the version's timestamp");
        assert_eq!(
            tomb_uuid,
            &kvs::ttl::expiry_uuid(uuid.parse().unwrap()).to_string(),
            "every node derives the same uuid"
        );
        n.get("/kv/tmp/k").assert_error(404);
    }
    // No vote: the version and its tombstone are ordered, never a collision.
    for n in [&n1, &n2, &n3] {
        assert_eq!(metric(n, "kvs_collisions_total"), 0, "{}", n.addr);
    }
    assert!(
        metric(&n1, "kvs_expired_total") + metric(&n2, "kvs_expired_total") + metric(&n3, "kvs_expired_total") >= 1
    );
}

#[test]
fn a_write_just_before_expiry_on_another_node_is_kept() {
    let d = Dirs::new();
    let (n1, n2, n3) = three(&d, "");
    // n3 holds the expiring version and is paused before the rewrite reaches it, so it
    // derives the expiry tombstone itself when it wakes. With the tombstone at the
    // expiry time (the issue's first design) the rewrite, stamped before the expiry,
    // would then lose to it on every node.
    let put = n1.put("/kv/job/lock?ttl=2", "\"n1\"");
    let expires = put.json()["expires"].as_u64().unwrap();
    wait_value(&n3, "/kv/job/lock", Some("\"n1\""));
    signal(n3.pid(), "STOP");
    let rewrite = n2.put("/kv/job/lock", "\"n2\"");
    assert_eq!(rewrite.status, 200, "{}", rewrite.text());
    assert!(rewrite.json()["timestamp"].as_u64().unwrap() < expires, "the rewrite is stamped before the expiry");
    wait_for(DEADLINE, "the expiry to pass", || (kvs::clock::now_ms() > expires + 500).then_some(()));
    signal(n3.pid(), "CONT");
    for n in [&n1, &n2, &n3] {
        wait_value(n, "/kv/job/lock", Some("\"n2\""));
    }
    // Every node has swept since, and sync has compared them: still the rewrite.
    let rewrite_uuid = rewrite.json()["uuid"].as_str().unwrap().to_string();
    wait_for(DEADLINE, "n3 to take the rewrite", || {
        feed_of(&n3, "job/lock").iter().any(|(op, uuid, _)| op == "put" && *uuid == rewrite_uuid).then_some(())
    });
    for n in [&n1, &n2, &n3] {
        wait_sync_rounds(n, 3);
    }
    for n in [&n1, &n2, &n3] {
        assert_eq!(n.get("/kv/job/lock").text(), "\"n2\"", "{}", n.addr);
        assert_eq!(n.get("/kv/job/lock").header("x-kvs-expires"), None);
    }
}

#[test]
fn a_node_with_a_clock_far_ahead_expires_nothing_for_the_cluster() {
    let d = Dirs::new();
    let (n1, n2) = two(&d, "");
    let dir = d.0.path().join("n3");
    let config = config_in(&dir, &cluster_config("n3", &[&n1.addr]));
    let n3 = Node::start_config_env(&dir, &config, &[("KVS_FAULT_CLOCK_OFFSET_MS", "30000")]);
    wait_normal(&n3);
    wait_for(DEADLINE, "n3's clock to be judged off", || (n3.health()["clock"]["ok"] == false).then_some(()));
    let put = n1.put("/kv/cache/page?ttl=20", "\"html\"");
    assert_eq!(put.status, 200, "{}", put.text());
    let uuid = put.json()["uuid"].as_str().unwrap().to_string();
    // n3 holds it, and by its own clock (30 s ahead) it would have expired; a clock
    // that is off judges no expiry: its reads of the key are refused, not 404.
    wait_for(DEADLINE, "n3 to hold the value", || {
        feed_of(&n3, "cache/page").iter().any(|(op, u, _)| op == "put" && *u == uuid).then_some(())
    });
    let refused = n3.get("/kv/cache/page");
    refused.assert_error(503);
    assert!(refused.text().contains("cannot tell whether this key"), "{}", refused.text());
    // Its sweep (every second) turns nothing into a tombstone: a clock it cannot trust
    // would delete for the whole cluster.
    wait_gossip_rounds(&n3, 20);
    assert_eq!(metric(&n3, "kvs_expired_total"), 0);
    assert!(feed_of(&n3, "cache/page").iter().all(|(op, ..)| op == "put"));
    for n in [&n1, &n2] {
        assert_eq!(n.get("/kv/cache/page").text(), "\"html\"", "{}", n.addr);
    }
}

#[test]
fn an_expired_value_on_a_node_that_was_away_during_the_purge_stays_absent() {
    let d = Dirs::new();
    let extra = "tombstone_grace_hours: 0.0014";
    let (n1, n2, mut n3) = three(&d, extra);
    let put = n1.put("/kv/otp/123?ttl=1", "\"secret\"");
    let uuid = put.json()["uuid"].as_str().unwrap().to_string();
    wait_value(&n3, "/kv/otp/123", Some("\"secret\""));
    // n3 goes away holding the version; the others expire it and, once n3 is removed,
    // purge the expiry tombstone (its timestamp is the version's: past the grace soon).
    n3.kill9();
    for n in [&n1, &n2] {
        wait_for(DEADLINE, "the expiry swept and purged", || {
            let events = feed_of(n, "otp/123");
            (events.len() == 2 && n.health()["tombstones"] == 0).then_some(())
        });
    }
    // n3 returns with the expired version: absent there at once, and everywhere after.
    n3.restart();
    n3.get("/kv/otp/123").assert_error(404);
    wait_members_alive(&n1, &["n1", "n2", "n3"]);
    for n in [&n1, &n2, &n3] {
        wait_sync_rounds(n, 3);
    }
    for n in [&n1, &n2, &n3] {
        n.get("/kv/otp/123").assert_error(404);
        assert!(n.get("/kv/otp?keys").json()["keys"].as_array().unwrap().is_empty());
    }
    // n3 swept its copy too: the same tombstone as the others made.
    let tomb = kvs::ttl::expiry_uuid(uuid.parse().unwrap()).to_string();
    wait_for(DEADLINE, "n3's expiry tombstone", || {
        feed_of(&n3, "otp/123").iter().any(|(op, u, _)| op == "delete" && *u == tomb).then_some(())
    });
}

#[test]
fn an_expiry_tombstone_made_by_a_clock_far_ahead_is_held_back_by_its_receiver() {
    let (_d, n) = node("");
    let put = n.put("/kv/s/x?ttl=60", "1");
    let v = put.json();
    let version = kvs::record::Record {
        expires: v["expires"].as_u64(),
        ..kvs::record::Record::value(
            v["version"].as_str().unwrap().parse().unwrap(),
            v["uuid"].as_str().unwrap().parse().unwrap(),
            bytes::Bytes::from("1"),
        )
    };
    // What a peer whose clock is a minute ahead (and whose own checks let its sweep
    // run) would send: the expiry tombstone, a minute early.
    let tombstone = kvs::ttl::expiry_tombstone(&version);
    let mut body = bytes::BytesMut::new();
    kvs::wire::put(&mut body, "s/x", &tombstone);
    let r = peer_post(&n.addr, kvs::protocol::routes::PUSH, &body);
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["held_back"], 1, "{}", r.text());
    assert_eq!(n.get("/kv/s/x").text(), "1", "the value stays until this node's clock says it expired");
    // Its own version is taken as ever, and a tombstone without an expiry (an ordinary
    // delete) is not held back.
    let mut del = bytes::BytesMut::new();
    kvs::wire::put(&mut del, "s/y", &kvs::record::Record::tombstone(version.timestamp, uuid::Uuid::new_v4()));
    assert_eq!(peer_post(&n.addr, kvs::protocol::routes::PUSH, &del).json()["held_back"], 0);
}
