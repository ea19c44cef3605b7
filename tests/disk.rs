//! Storage trouble (README "Storage trouble"): a disk that hangs or fills up is visible
//! at once and never costs an acknowledged write.
//!
//! These tests mount a small ext4 image through a loop device and freeze it or fill
//! it, so they need root. They are `#[ignore]`d for `cargo test` and run by `.ci/run`
//! (as root) with `cargo test --test disk -- --ignored`.

mod common;
use common::*;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

fn run(cmd: &str, args: &[&str]) {
    let out = Command::new(cmd).args(args).output().unwrap_or_else(|e| panic!("{cmd}: {e} (needs root)"));
    assert!(out.status.success(), "{cmd} {args:?}: {}", String::from_utf8_lossy(&out.stderr));
}

/// An ext4 filesystem of `mb` MiB on a loop device, mounted under a temporary
/// directory; thawed, unmounted and removed when dropped, even if the test fails.
struct Disk {
    dir: tempfile::TempDir,
    mount: PathBuf,
}

impl Disk {
    fn new(mb: u64) -> Disk {
        let dir = tempfile::tempdir().unwrap();
        let image = dir.path().join("disk.img");
        let mount = dir.path().join("mnt");
        std::fs::create_dir(&mount).unwrap();
        run("truncate", &["-s", &format!("{mb}M"), image.to_str().unwrap()]);
        run("mkfs.ext4", &["-q", image.to_str().unwrap()]);
        run("mount", &["-o", "loop", image.to_str().unwrap(), mount.to_str().unwrap()]);
        Disk { dir, mount }
    }

    fn path(&self) -> &Path {
        &self.mount
    }

    fn freeze(&self) {
        run("fsfreeze", &["-f", self.mount.to_str().unwrap()]);
    }

    fn thaw(&self) {
        run("fsfreeze", &["-u", self.mount.to_str().unwrap()]);
    }
}

impl Drop for Disk {
    fn drop(&mut self) {
        let m = self.mount.to_str().unwrap();
        let _ = Command::new("fsfreeze").args(["-u", m]).output();
        let _ = Command::new("umount").args(["-l", m]).output();
        let _ = &self.dir;
    }
}

/// A node whose data dir is on `disk`; its config and log stay off it (a log on the
/// frozen disk would stall the node's logging, not only its storage).
fn node_on(disk: &Disk) -> Node {
    let data = disk.path().join("data");
    let extra = format!("durability: sync\nstorage_stall_timeout: 0.5\ndata_dir: \"{}\"", data.display());
    Node::start_in(&disk.dir.path().join("node"), &extra)
}

#[test]
#[ignore = "needs root: mounts a loop device (run by .ci/run)"]
fn a_hung_disk_is_reported_refuses_writes_at_once_and_recovers() {
    let disk = Disk::new(64);
    let mut n = node_on(&disk);
    assert_eq!(n.put("/kv/before", "1").status, 200);
    disk.freeze();
    // A write now waits on the frozen disk...
    let addr = n.addr.clone();
    let stuck = std::thread::spawn(move || http(&addr, "PUT", "/kv/during", Some(b"2")));
    // ...and within the stall timeout the node says so, and refuses further writes at
    // once instead of letting them pile up.
    wait_for(DEADLINE, "/health to report the stall", || (n.health()["status"] == "error").then_some(()));
    let health = n.health();
    assert!(health["error"].as_str().unwrap().contains("storage has not finished a write"), "{health}");
    let refused = n.put("/kv/refused", "3");
    refused.assert_error(503);
    assert!(refused.text().contains("storage has not finished a write"), "{}", refused.text());
    assert_eq!(n.get("/kv/before").text(), "1", "reads still work");
    assert_eq!(n.get("/metrics").status, 200, "/metrics does not wait for the disk");
    // Thawed before the stall turns fatal: the waiting write completes and the node
    // is healthy again.
    disk.thaw();
    let done = stuck.join().unwrap();
    assert_eq!(done.status, 200, "{}", done.text());
    wait_for(DEADLINE, "/health ok again", || (n.health()["status"] == "ok").then_some(()));
    assert_eq!(n.put("/kv/after", "4").status, 200);
    assert_eq!(n.get("/kv/during").text(), "2");

    // A stall that lasts stops the node with status 1 (storage_stall_timeout x 6).
    disk.freeze();
    let addr = n.addr.clone();
    let stuck = std::thread::spawn(move || http(&addr, "PUT", "/kv/late", Some(b"5")));
    wait_for(Duration::from_secs(60), "the node to stop serving", || {
        std::net::TcpStream::connect(&n.addr).is_err().then_some(())
    });
    disk.thaw();
    let status = n.wait_exit();
    assert_eq!(status.code(), Some(1), "{}", n.log());
    let _ = stuck.join();
    // Every write it acknowledged is there after a restart.
    n.restart();
    for (k, v) in [("before", "1"), ("during", "2"), ("after", "4")] {
        assert_eq!(n.get(&format!("/kv/{k}")).text(), v);
    }
}

#[test]
#[ignore = "needs root: mounts a loop device (run by .ci/run)"]
fn a_full_disk_refuses_writes_and_loses_none_it_acknowledged() {
    let disk = Disk::new(32);
    let mut n = node_on(&disk);
    // Incompressible values (fjall compresses its journal) until the disk is full.
    let mut acknowledged = Vec::new();
    let mut seed = 0x2545_f491_4f6c_dd1du64;
    for i in 0..2_000 {
        let value: String = (0..50_000)
            .map(|_| {
                seed ^= seed << 13;
                seed ^= seed >> 7;
                seed ^= seed << 17;
                char::from(b'a' + (seed % 26) as u8)
            })
            .collect();
        let r = http(&n.addr, "PUT", &format!("/kv/full/{i}"), Some(format!("\"{value}\"").as_bytes()));
        if r.status == 200 {
            acknowledged.push((i, value));
            continue;
        }
        assert!(r.status >= 500, "{} {}", r.status, r.text());
        assert!(r.json()["error"].is_string(), "a JSON error: {}", r.text());
        break;
    }
    assert!(acknowledged.len() > 10 && acknowledged.len() < 2_000, "{} writes", acknowledged.len());
    // The node stops (storage failed) rather than serve on from a disk it cannot write.
    let status = n.wait_exit();
    assert_eq!(status.code(), Some(1), "{}", n.log());
    // With room again, every acknowledged write is there.
    let image = disk.dir.path().join("disk.img");
    run("umount", &[disk.path().to_str().unwrap()]);
    run("truncate", &["-s", "128M", image.to_str().unwrap()]);
    run("e2fsck", &["-fy", image.to_str().unwrap()]);
    run("resize2fs", &[image.to_str().unwrap()]);
    run("mount", &["-o", "loop", image.to_str().unwrap(), disk.path().to_str().unwrap()]);
    n.restart();
    for (i, value) in &acknowledged {
        assert_eq!(n.get(&format!("/kv/full/{i}")).text(), format!("\"{value}\""), "write {i}");
    }
    assert_eq!(n.put("/kv/room/again", "1").status, 200);
}
