//! kvs-nemesis: a seeded, Jepsen-style fault-injection run against real `kvs` processes.
//!
//! ```text
//! cargo build --release && sudo ./target/release/kvs-nemesis [--seed N] [--duration SECS]
//!     [--nodes N] [--clients N] [--gc] [--sync] [--keep]
//! ```
//!
//! `--gc` sets `tombstone_grace_hours` to 7 s, so tombstones are purged (and
//! certificates kept) throughout the run while deletes go on.
//! `--sync` runs the nodes with `durability: sync` (default `buffer`), so a kill -9
//! keeps each node's change feed and the feed check covers every node.
//!
//! It starts `--nodes` (5) release `kvs` processes on 127.0.0.1, each as its own system
//! user (`kvsnem0`...), runs a client workload against random nodes, and meanwhile a
//! nemesis cycles through faults, one at a time, in an order drawn from the seed:
//! - **partitions**: random halves, one node isolated, or a bridge (two halves that
//!   share one node), made with iptables `owner` rules on OUTPUT in a chain of its own
//!   (`KVS_NEMESIS`) that drop a node's packets to its peers' ports; loopback only;
//! - **kill -9** of a node and a restart on the same data dir;
//! - **pause**: SIGSTOP past `failure_timeout`, then SIGCONT;
//! - **clock skew**: a restart under libfaketime ±120 s, then a restart with the right
//!   clock;
//! - **write burst**: 48 connections of PUTs at one node for 3 s, then a check that its
//!   next write's timestamp is within `max_clock_offset_ms` of the wall clock.
//!
//! Workload: unique-key PUTs; DELETEs of keys acknowledged more than the pair gap ago;
//! single-writer registers, each write sent to another node than the one before, more
//! than the pair gap (2 × `max_clock_offset_ms` + 100 ms) after the previous write
//! finished, so real-time order must win; keys written with a TTL of 1 to 3 s, half
//! of them rewritten without a TTL to another node a pair gap after the TTL write was
//! acknowledged (the rewrite must survive the expiry; every other one must be gone).
//! Outcomes: ok (2xx), failed (a definite
//! refusal: 4xx or 503), unknown (a timeout or a broken connection:
//! it may or may not have applied; never counted as lost).
//!
//! The last fault is left in place until the workload stops; then everything is healed
//! and the checker waits for convergence
//! (the same keys and register values on every node; over 5 s is reported as slow, no
//! convergence within 60 s is an anomaly), then reports **lost** writes,
//! **resurrected** deletes, expired keys still present, lost rewrites of expiring
//! keys, register order violations, clock drift after bursts,
//! availability, panics and unexpected exits. It prints the seed, removes every rule,
//! process, user and directory it made (also on Ctrl-C or a panic), and exits 1 on any
//! anomaly, 2 when it cannot run (not root, no iptables or libfaketime).

use bytes::Bytes;
use hyper::{Method, StatusCode};
use kvs::protocol::{PeerClient, routes};
use rand::rngs::StdRng;
use rand::seq::{IndexedRandom, SliceRandom};
use rand::{RngExt, SeedableRng};
use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitCode, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

type Res<T> = Result<T, String>;

const CHAIN: &str = "KVS_NEMESIS";
const MAX_OFFSET_MS: u64 = 500;
/// Writes to one key that must keep their real-time order are this far apart: more
/// than the 2 × `max_clock_offset_ms` that ARCHITECTURE.md "Clock rules" guarantees.
const PAIR_GAP: Duration = Duration::from_millis(2 * MAX_OFFSET_MS + 100);
const OP_TIMEOUT: Duration = Duration::from_secs(2);
const SKEW: &str = "120s";
const BURST_CONNECTIONS: usize = 48;
/// Convergence after the heal should take at most this long (a target, reported).
const CONVERGENCE_TARGET: Duration = Duration::from_secs(5);
const FAKETIME_LIBS: [&str; 2] =
    ["/usr/lib/x86_64-linux-gnu/faketime/libfaketimeMT.so.1", "/usr/lib/aarch64-linux-gnu/faketime/libfaketimeMT.so.1"];
const USAGE: &str = "usage: kvs-nemesis [--seed N] [--duration SECS] [--nodes N] [--clients N] [--gc] [--sync] [--keep]   (run as root)";
/// `tombstone_grace_hours` with `--gc`: 7 s, just over the least the config takes with a 0.5 s
/// `sync_interval` and a 3 s `removal_timeout`.
const GC_GRACE_HOURS: f64 = 7.0 / 3600.0;

struct Opts {
    seed: u64,
    duration: Duration,
    nodes: usize,
    clients: usize,
    keep: bool,
    /// Tombstones purged after 7 s instead of 7 days, so purges, certificates and the
    /// stale rule run all through the run.
    gc: bool,
    /// Nodes with `durability: sync` instead of `buffer`: a kill -9 then keeps each
    /// node's change feed, so the feed check covers every node.
    sync: bool,
}

fn parse_opts() -> Res<Opts> {
    let mut o = Opts {
        seed: rand::rng().random(),
        duration: Duration::from_secs(60),
        nodes: 5,
        clients: 8,
        keep: false,
        gc: false,
        sync: false,
    };
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let mut value = |name: &str| args.next().ok_or(format!("{name} needs a value"));
        match a.as_str() {
            "--seed" => o.seed = value("--seed")?.parse().map_err(|_| "--seed must be a whole number")?,
            "--duration" => {
                let s: f64 = value("--duration")?.parse().map_err(|_| "--duration must be seconds")?;
                if !(1.0..=86_400.0).contains(&s) {
                    return Err("--duration must be 1 to 86400 seconds".into());
                }
                o.duration = Duration::from_secs_f64(s);
            }
            "--nodes" => {
                o.nodes = value("--nodes")?.parse().map_err(|_| "--nodes must be a number")?;
                if !(3..=9).contains(&o.nodes) {
                    return Err("--nodes must be 3 to 9".into());
                }
            }
            "--clients" => {
                o.clients = value("--clients")?.parse().map_err(|_| "--clients must be a number")?;
                if !(1..=64).contains(&o.clients) {
                    return Err("--clients must be 1 to 64".into());
                }
            }
            "--keep" => o.keep = true,
            "--gc" => o.gc = true,
            "--sync" => o.sync = true,
            "-h" | "--help" => {
                println!("{USAGE}");
                std::process::exit(0);
            }
            other => return Err(format!("unknown argument {other:?}\n{USAGE}")),
        }
    }
    Ok(o)
}

fn wall_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

/// Runs a command; its failure is an error naming it.
fn run(cmd: &str, args: &[&str]) -> Res<String> {
    let out = Command::new(cmd).args(args).output().map_err(|e| format!("{cmd}: {e}"))?;
    if !out.status.success() {
        return Err(format!("{cmd} {}: {}", args.join(" "), String::from_utf8_lossy(&out.stderr).trim()));
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
}

// ---------------------------------------------------------------- processes

struct Proc {
    idx: usize,
    port: u16,
    uid: u32,
    gid: u32,
    dir: PathBuf,
    child: Option<Child>,
    /// `Some("+120s")` while it runs under libfaketime.
    skew: Option<String>,
    paused: bool,
}

impl Proc {
    fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    fn start(&mut self, bin: &Path, faketime: &str, skew: Option<String>) -> Res<()> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join("node.log"))
            .map_err(|e| e.to_string())?;
        let mut cmd = Command::new(bin);
        cmd.arg(self.dir.join("config.yaml"))
            .current_dir(&self.dir)
            .uid(self.uid)
            .gid(self.gid)
            .stdin(Stdio::null())
            .stdout(Stdio::from(log.try_clone().map_err(|e| e.to_string())?))
            .stderr(Stdio::from(log));
        if let Some(s) = &skew {
            cmd.env("LD_PRELOAD", faketime).env("FAKETIME", s).env("FAKETIME_DONT_FAKE_MONOTONIC", "1");
        }
        self.child = Some(cmd.spawn().map_err(|e| format!("start node {}: {e}", self.idx))?);
        self.skew = skew;
        self.paused = false;
        Ok(())
    }

    fn signal(&self, sig: &str) {
        if let Some(c) = &self.child {
            let _ = run("kill", &[&format!("-{sig}"), &c.id().to_string()]);
        }
    }

    fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        self.paused = false;
    }

    /// SIGTERM and wait (SIGKILL after 30 s).
    fn stop(&mut self) {
        if self.paused {
            self.signal("CONT");
        }
        self.signal("TERM");
        if let Some(mut c) = self.child.take() {
            let deadline = Instant::now() + Duration::from_secs(30);
            while c.try_wait().ok().flatten().is_none() {
                if Instant::now() > deadline {
                    let _ = c.kill();
                    let _ = c.wait();
                    break;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        self.paused = false;
    }

    /// Exited without being asked to.
    fn died(&mut self) -> Option<String> {
        let status = self.child.as_mut()?.try_wait().ok()??;
        self.child = None;
        Some(status.to_string())
    }
}

/// Everything the run made outside its own memory; removed on drop, whatever happened.
struct Lab {
    dir: PathBuf,
    keep: bool,
    bin: PathBuf,
    faketime: String,
    procs: Vec<Proc>,
    chain_made: bool,
    users_made: Vec<String>,
}

impl Lab {
    fn iptables(args: &[&str]) -> Res<String> {
        run("iptables", &["-w", "5"].iter().chain(args).copied().collect::<Vec<_>>())
    }

    fn setup_firewall(&mut self) -> Res<()> {
        // A chain left by an interrupted run is emptied and reused.
        if Lab::iptables(&["-N", CHAIN]).is_err() {
            Lab::iptables(&["-F", CHAIN])?;
        }
        self.chain_made = true;
        if Lab::iptables(&["-C", "OUTPUT", "-j", CHAIN]).is_err() {
            Lab::iptables(&["-I", "OUTPUT", "-j", CHAIN])?;
        }
        Ok(())
    }

    /// Drops every packet between nodes `a` and `b`, both ways.
    fn cut(&self, a: usize, b: usize) -> Res<()> {
        for (from, to) in [(a, b), (b, a)] {
            let (uid, port) = (self.procs[from].uid.to_string(), self.procs[to].port.to_string());
            Lab::iptables(&[
                "-A",
                CHAIN,
                "-o",
                "lo",
                "-p",
                "tcp",
                "-m",
                "owner",
                "--uid-owner",
                &uid,
                "--dport",
                &port,
                "-j",
                "DROP",
            ])?;
        }
        Ok(())
    }

    fn heal_network(&self) -> Res<()> {
        Lab::iptables(&["-F", CHAIN]).map(|_| ())
    }

    fn start(&mut self, i: usize, skew: Option<String>) -> Res<()> {
        let (bin, faketime) = (self.bin.clone(), self.faketime.clone());
        self.procs[i].start(&bin, &faketime, skew)
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        for p in &mut self.procs {
            if p.paused {
                p.signal("CONT");
            }
            p.kill9();
        }
        if self.chain_made {
            while Lab::iptables(&["-D", "OUTPUT", "-j", CHAIN]).is_ok() {}
            let _ = Lab::iptables(&["-F", CHAIN]);
            let _ = Lab::iptables(&["-X", CHAIN]);
        }
        for u in &self.users_made {
            let _ = run("userdel", &[u]);
        }
        if self.keep {
            println!("kept {}", self.dir.display());
        } else {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

fn free_port() -> Res<u16> {
    let l = std::net::TcpListener::bind("127.0.0.1:0").map_err(|e| e.to_string())?;
    l.local_addr().map(|a| a.port()).map_err(|e| e.to_string())
}

fn build_lab(o: &Opts) -> Res<Lab> {
    if run("id", &["-u"])? != "0" {
        return Err("kvs-nemesis must run as root (iptables rules and one system user per node)".into());
    }
    run("iptables", &["-w", "5", "-L", "OUTPUT", "-n"]).map_err(|e| format!("iptables is needed: {e}"))?;
    let faketime = FAKETIME_LIBS
        .iter()
        .find(|p| Path::new(p).exists())
        .ok_or("libfaketime is needed for clock skew: apt-get install faketime")?
        .to_string();
    let kvs = std::env::current_exe().map_err(|e| e.to_string())?.parent().ok_or("no directory for kvs")?.join("kvs");
    if !kvs.exists() {
        return Err(format!("{} not found: cargo build --release", kvs.display()));
    }
    let dir = std::env::temp_dir().join(format!("kvs-nemesis-{}-{}", o.seed, std::process::id()));
    std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
    run("chmod", &["755", &dir.to_string_lossy()])?;
    // The nodes' users may not be able to reach the build directory.
    let bin = dir.join("kvs");
    std::fs::copy(&kvs, &bin).map_err(|e| format!("copy kvs: {e}"))?;
    run("chmod", &["755", &bin.to_string_lossy()])?;
    let mut lab =
        Lab { dir: dir.clone(), keep: o.keep, bin, faketime, procs: Vec::new(), chain_made: false, users_made: vec![] };
    let ports: Vec<u16> = (0..o.nodes).map(|_| free_port()).collect::<Res<_>>()?;
    for (i, port) in ports.iter().enumerate() {
        let user = format!("kvsnem{i}");
        if run("id", &["-u", &user]).is_err() {
            run("useradd", &["--system", "--no-create-home", "--shell", "/usr/sbin/nologin", &user])?;
            lab.users_made.push(user.clone());
        }
        let uid: u32 = run("id", &["-u", &user])?.parse().map_err(|_| "bad uid")?;
        let gid: u32 = run("id", &["-g", &user])?.parse().map_err(|_| "bad gid")?;
        let ndir = dir.join(format!("n{i}"));
        std::fs::create_dir_all(&ndir).map_err(|e| e.to_string())?;
        let seeds: Vec<String> =
            ports.iter().enumerate().filter(|(j, _)| *j != i).map(|(_, p)| format!("\"127.0.0.1:{p}\"")).collect();
        let config = format!(
            "node_id: n{i}\nport: {port}\ndata_dir: ./data\nseed_nodes: [{}]\nlog_level: info\n\
             gossip_interval_min: 0.1\ngossip_interval_max: 0.2\nfailure_timeout: 1\nremoval_timeout: 3\n\
             sync_interval: 0.5\ncatchup_interval: 0.5\nthrottle_delay_ms: 0\nfetch_delay_ms: 0\n\
             durability: {}\nmax_clock_offset_ms: {MAX_OFFSET_MS}\n{}",
            seeds.join(", "),
            if o.sync { "sync" } else { "buffer" },
            if o.gc { format!("tombstone_grace_hours: {GC_GRACE_HOURS}\n") } else { String::new() }
        );
        std::fs::write(ndir.join("config.yaml"), config).map_err(|e| e.to_string())?;
        run("chown", &["-R", &format!("{uid}:{gid}"), &ndir.to_string_lossy()])?;
        lab.procs.push(Proc { idx: i, port: *port, uid, gid, dir: ndir, child: None, skew: None, paused: false });
    }
    lab.setup_firewall()?;
    Ok(lab)
}

// ---------------------------------------------------------------- history

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Outcome {
    Ok,
    Failed,
    Unknown,
}

#[derive(Default)]
struct UniqueKey {
    put: Option<Outcome>,
    acked_at: Option<Instant>,
    delete: Option<Outcome>,
}

/// A key written with a short TTL (1 to 3 s), and maybe rewritten without one (to
/// another node, a pair gap after the TTL write was acknowledged).
#[derive(Default)]
struct ExpiringKey {
    put: Option<Outcome>,
    /// When the TTL write's expiry passes at the latest (by this process's clock).
    expires_by: Option<Instant>,
    rewrite: Option<Outcome>,
}

#[derive(Default)]
struct Register {
    /// (value, outcome) in the order written.
    writes: Vec<(u64, Outcome)>,
}

#[derive(Default)]
struct Tally {
    ok: u64,
    failed: u64,
    unknown: u64,
}

#[derive(Default)]
struct History {
    keys: BTreeMap<String, UniqueKey>,
    expiring: BTreeMap<String, ExpiringKey>,
    registers: BTreeMap<String, Register>,
    /// Per fault kind ("none" between faults): op outcomes.
    availability: BTreeMap<&'static str, Tally>,
    burst_drift_ms: Vec<i64>,
    burst_rates: Vec<f64>,
}

struct Shared {
    history: Mutex<History>,
    /// The fault in force, for availability figures.
    fault: Mutex<&'static str>,
    stop: AtomicBool,
    addrs: Vec<String>,
    client: PeerClient,
    ops: AtomicU64,
}

impl Shared {
    fn tally(&self, outcome: Outcome) {
        let fault = *self.fault.lock().unwrap_or_else(|p| p.into_inner());
        let mut h = self.history.lock().unwrap_or_else(|p| p.into_inner());
        let t = h.availability.entry(fault).or_default();
        match outcome {
            Outcome::Ok => t.ok += 1,
            Outcome::Failed => t.failed += 1,
            Outcome::Unknown => t.unknown += 1,
        }
        self.ops.fetch_add(1, Ordering::Relaxed);
    }
}

/// One client request and what its answer says about whether it applied.
async fn request(client: &PeerClient, method: Method, addr: &str, path: &str, body: &str) -> (Outcome, Bytes) {
    let r = client.call(method, addr, path, Bytes::from(body.to_string()), OP_TIMEOUT).await;
    match r {
        Ok((s, b)) if s.is_success() => (Outcome::Ok, b),
        Ok((s, b)) if s.is_client_error() || s == StatusCode::SERVICE_UNAVAILABLE => (Outcome::Failed, b),
        Ok((_, b)) => (Outcome::Unknown, b),
        // A broken connection may have carried the request: unknown, never "failed".
        Err(_) => (Outcome::Unknown, Bytes::new()),
    }
}

async fn client_loop(shared: Arc<Shared>, id: usize, seed: u64) {
    let mut rng = StdRng::seed_from_u64(seed ^ (id as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15));
    let register = format!("r/{id}");
    let (mut next_key, mut next_value) = (0u64, 0u64);
    let mut mine: Vec<String> = Vec::new();
    let mut register_ready = Instant::now();
    let mut register_node = 0usize;
    // Expiring keys acknowledged, to rewrite without a TTL: (key, acknowledged, node).
    let mut to_rewrite: Vec<(String, Instant, usize)> = Vec::new();
    while !shared.stop.load(Ordering::Relaxed) {
        let node = rng.random_range(0..shared.addrs.len());
        let roll = rng.random_range(0..100u32);
        if roll < 15 && Instant::now() >= register_ready {
            // The next value, to another node than the last one, a pair gap after it.
            next_value += 1;
            let others: Vec<usize> = (0..shared.addrs.len()).filter(|&n| n != register_node).collect();
            register_node = *others.choose(&mut rng).unwrap_or(&0);
            let body = format!("{{\"v\":{next_value}}}");
            let (outcome, _) =
                request(&shared.client, Method::PUT, &shared.addrs[register_node], &format!("/kv/{register}"), &body)
                    .await;
            shared
                .history
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .registers
                .entry(register.clone())
                .or_default()
                .writes
                .push((next_value, outcome));
            shared.tally(outcome);
            register_ready = Instant::now() + PAIR_GAP;
        } else if roll < 10 {
            // A key with a short TTL, or the rewrite (no TTL, another node) of one
            // acknowledged a pair gap ago: the rewrite must survive the expiry.
            if let Some(pos) = to_rewrite.iter().position(|(_, t, _)| t.elapsed() >= PAIR_GAP) {
                let (key, _, ttl_node) = to_rewrite.swap_remove(pos);
                let n = shared.addrs.len();
                let other = if n > 1 { (ttl_node + 1 + rng.random_range(0..n - 1)) % n } else { ttl_node };
                let (outcome, _) =
                    request(&shared.client, Method::PUT, &shared.addrs[other], &format!("/kv/{key}"), "\"kept\"").await;
                if let Some(e) = shared.history.lock().unwrap_or_else(|p| p.into_inner()).expiring.get_mut(&key) {
                    e.rewrite = Some(outcome);
                }
                shared.tally(outcome);
            } else {
                let key = format!("t/{id}/{next_key}");
                next_key += 1;
                let ttl = rng.random_range(1..=3u64);
                let (outcome, _) =
                    request(&shared.client, Method::PUT, &shared.addrs[node], &format!("/kv/{key}?ttl={ttl}"), "1")
                        .await;
                // The version's timestamp is at most the answer's arrival plus the clock
                // bound: its expiry passes by then plus the TTL.
                let expires_by = Instant::now() + Duration::from_secs(ttl) + Duration::from_millis(MAX_OFFSET_MS);
                shared.history.lock().unwrap_or_else(|p| p.into_inner()).expiring.insert(
                    key.clone(),
                    ExpiringKey { put: Some(outcome), expires_by: Some(expires_by), rewrite: None },
                );
                if outcome == Outcome::Ok && rng.random_range(0..2u32) == 0 {
                    to_rewrite.push((key, Instant::now(), node));
                }
                shared.tally(outcome);
            }
        } else if roll < 40 {
            // Delete one of this client's keys acknowledged at least a pair gap ago.
            let ready = {
                let h = shared.history.lock().unwrap_or_else(|p| p.into_inner());
                mine.iter()
                    .position(|k| h.keys.get(k).and_then(|u| u.acked_at).is_some_and(|t| t.elapsed() >= PAIR_GAP))
            };
            let Some(pos) = ready else { continue };
            let key = mine.swap_remove(pos);
            let (outcome, _) =
                request(&shared.client, Method::DELETE, &shared.addrs[node], &format!("/kv/{key}"), "").await;
            if let Some(u) = shared.history.lock().unwrap_or_else(|p| p.into_inner()).keys.get_mut(&key) {
                u.delete = Some(outcome);
            }
            shared.tally(outcome);
        } else {
            let key = format!("u/{id}/{next_key}");
            next_key += 1;
            let (outcome, _) =
                request(&shared.client, Method::PUT, &shared.addrs[node], &format!("/kv/{key}"), &next_key.to_string())
                    .await;
            {
                let mut h = shared.history.lock().unwrap_or_else(|p| p.into_inner());
                let u = h.keys.entry(key.clone()).or_default();
                u.put = Some(outcome);
                if outcome == Outcome::Ok {
                    u.acked_at = Some(Instant::now());
                }
            }
            if outcome == Outcome::Ok && rng.random_range(0..3u32) == 0 {
                mine.push(key);
            }
            shared.tally(outcome);
        }
        tokio::time::sleep(Duration::from_millis(rng.random_range(2..8))).await;
    }
}

/// [`BURST_CONNECTIONS`] connections of PUTs at `addr` for 3 s; then the node's next write's timestamp
/// against the wall clock.
async fn burst(shared: &Arc<Shared>, node: usize, tag: usize) {
    let addr = shared.addrs[node].clone();
    let until = Instant::now() + Duration::from_secs(3);
    let started = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for c in 0..BURST_CONNECTIONS {
        let (shared, addr) = (shared.clone(), addr.clone());
        tasks.spawn(async move {
            let mut acked = Vec::new();
            let mut i = 0u64;
            while Instant::now() < until {
                let key = format!("b/{tag}/{c}/{i}");
                i += 1;
                let (outcome, _) = request(&shared.client, Method::PUT, &addr, &format!("/kv/{key}"), "1").await;
                acked.push((key, outcome));
            }
            acked
        });
    }
    let mut n_ok = 0u64;
    while let Some(Ok(acked)) = tasks.join_next().await {
        let mut h = shared.history.lock().unwrap_or_else(|p| p.into_inner());
        for (key, outcome) in acked {
            n_ok += u64::from(outcome == Outcome::Ok);
            let u = h.keys.entry(key).or_default();
            u.put = Some(outcome);
        }
    }
    let rate = n_ok as f64 / started.elapsed().as_secs_f64();
    let (outcome, body) = request(&shared.client, Method::PUT, &addr, "/kv/b/probe", "1").await;
    let after = wall_ms() as i64;
    let mut h = shared.history.lock().unwrap_or_else(|p| p.into_inner());
    h.burst_rates.push(rate);
    if outcome == Outcome::Ok
        && let Some(ts) = serde_json::from_slice::<serde_json::Value>(&body).ok().and_then(|v| v["timestamp"].as_i64())
    {
        h.burst_drift_ms.push(ts - after);
    }
    println!("  burst on n{node}: {n_ok} writes acknowledged, {rate:.0}/s");
}

// ---------------------------------------------------------------- nemesis

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Fault {
    Halves,
    Isolate,
    Bridge,
    Kill,
    Pause,
    Skew,
    Burst,
}

impl Fault {
    const ALL: [Fault; 7] =
        [Fault::Halves, Fault::Isolate, Fault::Bridge, Fault::Kill, Fault::Pause, Fault::Skew, Fault::Burst];
    fn name(self) -> &'static str {
        match self {
            Fault::Halves => "partition-halves",
            Fault::Isolate => "partition-isolate",
            Fault::Bridge => "partition-bridge",
            Fault::Kill => "kill-9",
            Fault::Pause => "pause",
            Fault::Skew => "clock-skew",
            Fault::Burst => "write-burst",
        }
    }
}

/// Waits until every node's clock has been checked and found within the bound (its
/// `/health` `clock.ok` and `clock.checked`).
async fn wait_clocks_checked(shared: &Shared, nodes: usize, deadline: Duration) -> Res<()> {
    let until = Instant::now() + deadline;
    'wait: loop {
        for node in 0..nodes {
            let ok =
                match shared.client.call(Method::GET, &shared.addrs[node], "/health", Bytes::new(), OP_TIMEOUT).await {
                    Ok((s, b)) if s.is_success() => serde_json::from_slice::<serde_json::Value>(&b)
                        .is_ok_and(|h| h["clock"]["ok"] == true && h["clock"]["checked"] == true),
                    _ => false,
                };
            if !ok {
                if Instant::now() > until {
                    return Err(format!("n{node}'s clock was not checked within {deadline:?}"));
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
                continue 'wait;
            }
        }
        return Ok(());
    }
}

async fn wait_healthy(shared: &Shared, nodes: &[usize], deadline: Duration) -> Res<()> {
    let until = Instant::now() + deadline;
    for &i in nodes {
        loop {
            let r = shared.client.call(Method::GET, &shared.addrs[i], "/health", Bytes::new(), OP_TIMEOUT).await;
            if let Ok((s, b)) = r
                && s.is_success()
                && serde_json::from_slice::<serde_json::Value>(&b).is_ok_and(|v| v["mode"] == "normal")
            {
                break;
            }
            if Instant::now() > until {
                return Err(format!("n{i} not healthy within {deadline:?}"));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    Ok(())
}

/// Runs the faults; anomalies seen on the way go to `anomalies`, an `Err` is a fault
/// that could not be made.
async fn nemesis(
    lab: &Arc<Mutex<Lab>>,
    shared: &Arc<Shared>,
    o: &Opts,
    log: &mut Vec<String>,
    anomalies: &mut Vec<String>,
) -> Res<()> {
    let mut rng = StdRng::seed_from_u64(o.seed);
    let n = o.nodes;
    let started = Instant::now();
    let mut round: Vec<Fault> = Vec::new();
    let mut bursts = 0;
    while started.elapsed() < o.duration {
        if round.is_empty() {
            // Every kind once per round, in a seeded order: even a short run has all.
            round = Fault::ALL.to_vec();
            round.shuffle(&mut rng);
        }
        let fault = round.pop().unwrap_or(Fault::Kill);
        // Process and iptables work blocks (up to a 30 s stop): off the async workers.
        tokio::task::block_in_place(|| -> Res<()> {
            // A node that exited by itself is an anomaly now, not only at the end: a
            // later kill and restart would hide it.
            let mut lab = lab.lock().unwrap_or_else(|p| p.into_inner());
            for i in 0..n {
                if let Some(status) = lab.procs[i].died() {
                    let log = std::fs::read_to_string(lab.procs[i].dir.join("node.log")).unwrap_or_default();
                    let tail: Vec<&str> = log.lines().rev().take(5).collect();
                    anomalies.push(format!("n{i} exited by itself ({status}); last log lines: {tail:?}"));
                    lab.start(i, None)?;
                }
            }
            Ok(())
        })?;
        let hold = Duration::from_millis(rng.random_range(2_000..5_000));
        let mut ids: Vec<usize> = (0..n).collect();
        ids.shuffle(&mut rng);
        let victim = ids[0];
        let t = started.elapsed().as_secs_f64();
        let desc = tokio::task::block_in_place(|| -> Res<String> {
            let mut lab = lab.lock().unwrap_or_else(|p| p.into_inner());
            Ok(match fault {
                Fault::Halves => {
                    let (a, b) = ids.split_at(n / 2);
                    for &x in a {
                        for &y in b {
                            lab.cut(x, y)?;
                        }
                    }
                    format!("{a:?} | {b:?}")
                }
                Fault::Isolate => {
                    for &y in &ids[1..] {
                        lab.cut(victim, y)?;
                    }
                    format!("n{victim} alone")
                }
                Fault::Bridge => {
                    // ids[0] is the bridge; the rest split in two that only it joins.
                    let (a, b) = ids[1..].split_at((n - 1) / 2);
                    for &x in a {
                        for &y in b {
                            lab.cut(x, y)?;
                        }
                    }
                    format!("{a:?} | {b:?} bridged by n{victim}")
                }
                Fault::Kill => {
                    lab.procs[victim].kill9();
                    format!("n{victim}")
                }
                Fault::Pause => {
                    lab.procs[victim].signal("STOP");
                    lab.procs[victim].paused = true;
                    format!("n{victim}")
                }
                Fault::Skew => {
                    let sign = if rng.random_range(0..2u32) == 0 { "+" } else { "-" };
                    lab.procs[victim].stop();
                    lab.start(victim, Some(format!("{sign}{SKEW}")))?;
                    format!("n{victim} {sign}{SKEW}")
                }
                Fault::Burst => format!("n{victim}"),
            })
        })?;
        println!("{t:7.1}s  {} {desc}", fault.name());
        log.push(format!("{t:.1}s {} {desc}", fault.name()));
        *shared.fault.lock().unwrap_or_else(|p| p.into_inner()) = fault.name();
        if fault == Fault::Burst {
            bursts += 1;
            burst(shared, victim, bursts).await;
        } else {
            tokio::time::sleep(hold).await;
        }
        if fault == Fault::Skew {
            // While skewed the node must refuse client writes.
            let (outcome, body) =
                request(&shared.client, Method::PUT, &shared.addrs[victim], "/kv/skew/probe", "1").await;
            if outcome == Outcome::Ok {
                anomalies
                    .push(format!("n{victim} with a {SKEW} skew took a write: {}", String::from_utf8_lossy(&body)));
            }
        }
        if started.elapsed() >= o.duration {
            // The last fault stays until the final heal, so the convergence time the
            // checker measures is from a real heal, not from a cluster long healed.
            break;
        }
        tokio::task::block_in_place(|| -> Res<()> {
            let mut lab = lab.lock().unwrap_or_else(|p| p.into_inner());
            match fault {
                Fault::Halves | Fault::Isolate | Fault::Bridge => lab.heal_network()?,
                Fault::Kill => lab.start(victim, None)?,
                Fault::Pause => {
                    lab.procs[victim].signal("CONT");
                    lab.procs[victim].paused = false;
                }
                Fault::Skew => {
                    lab.procs[victim].stop();
                    lab.start(victim, None)?;
                }
                Fault::Burst => {}
            }
            Ok(())
        })?;
        if matches!(fault, Fault::Kill | Fault::Skew) {
            // A restart after kill -9 replays fjall's journal first: the next fault
            // starts once the node answers again, so a burst never meets a node that
            // is still opening its data.
            wait_healthy(shared, &[victim], Duration::from_secs(60)).await?;
        }
        *shared.fault.lock().unwrap_or_else(|p| p.into_inner()) = "none";
        let pause = Duration::from_millis(rng.random_range(1_000..2_000));
        tokio::time::sleep(pause).await;
    }
    Ok(())
}

// ---------------------------------------------------------------- checker

/// Every key and each register's value on one node.
async fn snapshot(shared: &Shared, node: usize) -> Res<(BTreeSet<String>, BTreeMap<String, String>)> {
    let mut keys = BTreeSet::new();
    let mut after: Option<String> = None;
    loop {
        let mut q = "/kv/?keys&limit=10000".to_string();
        if let Some(a) = &after {
            q.push_str(&format!("&after={}", kvs::path::percent_encode(a)));
        }
        let (s, b) = shared
            .client
            .call(Method::GET, &shared.addrs[node], &q, Bytes::new(), Duration::from_secs(10))
            .await
            .map_err(|e| format!("n{node}: {e}"))?;
        if !s.is_success() {
            return Err(format!("n{node} listing: {s}"));
        }
        let v: serde_json::Value = serde_json::from_slice(&b).map_err(|e| e.to_string())?;
        for k in v["keys"].as_array().into_iter().flatten() {
            keys.insert(k.as_str().unwrap_or_default().to_string());
        }
        match v["next"].as_str() {
            Some(n) => after = Some(n.to_string()),
            None => break,
        }
    }
    let mut registers = BTreeMap::new();
    for k in keys.iter().filter(|k| k.starts_with("r/")) {
        let (s, b) = shared
            .client
            .call(Method::GET, &shared.addrs[node], &format!("/kv/{k}"), Bytes::new(), OP_TIMEOUT)
            .await
            .map_err(|e| format!("n{node}: {e}"))?;
        if s.is_success() {
            registers.insert(k.clone(), String::from_utf8_lossy(&b).to_string());
        }
    }
    Ok((keys, registers))
}

/// Replays node `node`'s change feed from its start: the keys whose last event is a put.
/// `None` when the feed does not reach back to its start (410: after a kill -9 with
/// `durability: buffer` a node starts a new feed, README "Watching changes").
async fn replay_feed(shared: &Shared, node: usize) -> Res<Option<(BTreeSet<String>, u64)>> {
    let mut last: BTreeMap<String, bool> = BTreeMap::new();
    let (mut since, mut events) = (0u64, 0u64);
    loop {
        let (s, b) = shared
            .client
            .call(
                Method::GET,
                &shared.addrs[node],
                &format!("/changes?since={since}&limit=10000"),
                Bytes::new(),
                Duration::from_secs(10),
            )
            .await
            .map_err(|e| format!("n{node} feed: {e}"))?;
        if s == hyper::StatusCode::GONE {
            return Ok(None);
        }
        if !s.is_success() {
            return Err(format!("n{node} feed: {s}"));
        }
        let v: serde_json::Value = serde_json::from_slice(&b).map_err(|e| e.to_string())?;
        let page = v["events"].as_array().cloned().unwrap_or_default();
        for e in &page {
            let key = e["key"].as_str().unwrap_or_default().to_string();
            last.insert(key, e["op"] == "put");
        }
        events += page.len() as u64;
        let next = v["last_seq"].as_u64().ok_or("feed answer without last_seq")?;
        if page.is_empty() && next == since {
            break;
        }
        since = next;
    }
    Ok(Some((last.into_iter().filter(|(_, put)| *put).map(|(k, _)| k).collect(), events)))
}

struct Verdict {
    anomalies: Vec<String>,
    report: String,
}

fn check(history: &History, keys: &BTreeSet<String>, registers: &BTreeMap<String, String>) -> (Vec<String>, String) {
    let mut anomalies = Vec::new();
    let (mut acked, mut lost, mut deleted, mut resurrected, mut unknown) = (0, 0, 0, 0, 0);
    for (k, u) in &history.keys {
        let present = keys.contains(k);
        match (u.put, u.delete) {
            (Some(Outcome::Ok), Some(Outcome::Ok)) => {
                deleted += 1;
                if present {
                    resurrected += 1;
                    if resurrected <= 10 {
                        anomalies.push(format!("resurrected: {k} (delete acknowledged)"));
                    }
                }
            }
            (Some(Outcome::Ok), None | Some(Outcome::Failed)) => {
                acked += 1;
                if !present {
                    lost += 1;
                    if lost <= 10 {
                        anomalies.push(format!("lost: {k} (write acknowledged)"));
                    }
                }
            }
            _ => unknown += 1,
        }
    }
    if lost > 10 || resurrected > 10 {
        anomalies.push(format!("... {lost} lost and {resurrected} resurrected in all"));
    }
    // Expiring keys: an acknowledged rewrite (no TTL) is kept; a TTL write that may have
    // applied and was not rewritten (or whose rewrite was refused) has expired.
    let (mut expired, mut revived, mut rewritten, mut rewrites_lost) = (0, 0, 0, 0);
    for (k, e) in &history.expiring {
        let present = keys.contains(k);
        match (e.put, e.rewrite) {
            (_, Some(Outcome::Ok)) => {
                rewritten += 1;
                if !present {
                    rewrites_lost += 1;
                    if rewrites_lost <= 10 {
                        anomalies.push(format!("lost: {k} (rewrite without TTL acknowledged)"));
                    }
                }
            }
            (Some(Outcome::Ok | Outcome::Unknown), None | Some(Outcome::Failed)) => {
                expired += 1;
                if present {
                    revived += 1;
                    if revived <= 10 {
                        anomalies.push(format!("expired key present: {k}"));
                    }
                }
            }
            _ => {}
        }
    }
    let mut register_writes = 0;
    for (name, r) in &history.registers {
        register_writes += r.writes.len();
        let last_ok = r.writes.iter().rev().find(|(_, o)| *o == Outcome::Ok).map(|(v, _)| *v);
        let final_value = registers
            .get(name)
            .and_then(|b| serde_json::from_str::<serde_json::Value>(b).ok())
            .and_then(|v| v["v"].as_u64());
        // An unknown write may take effect at any time after it was sent, so it may
        // end up last; an acknowledged write older than the last acknowledged one may
        // not (they were a pair gap apart), nor a refused one.
        let allowed = |v: Option<u64>| {
            v == last_ok || v.is_some_and(|v| r.writes.iter().any(|(w, o)| *w == v && *o == Outcome::Unknown))
        };
        if !allowed(final_value) {
            anomalies.push(format!(
                "register {name}: final value {final_value:?}, last acknowledged {last_ok:?} (real-time order lost)"
            ));
        }
    }
    let mut report = String::new();
    let _ = writeln!(
        report,
        "unique keys: {acked} acknowledged and kept, {lost} lost; {deleted} acknowledged deletes, {resurrected} resurrected; {unknown} with an unknown or failed outcome"
    );
    let _ = writeln!(
        report,
        "registers: {} with {register_writes} writes, order violations counted above",
        history.registers.len()
    );
    let _ = writeln!(
        report,
        "expiring keys: {expired} expired, {revived} present after their expiry; {rewritten} rewritten without TTL, {rewrites_lost} lost"
    );
    (anomalies, report)
}

/// Waits until every node holds the same keys and register values. The fast test is
/// the anti-entropy summary (the 256 level-1 hashes change with any record); when the
/// summaries differ only by tombstones (some nodes purged a delete, others not yet:
/// `--gc`), the full key listings and register values decide. Returns the time from
/// `healed` to agreement, and what every node holds.
async fn converge(
    shared: &Shared,
    n: usize,
    gc: bool,
    healed: Instant,
    deadline: Duration,
) -> Res<(Duration, BTreeSet<String>, BTreeMap<String, String>)> {
    loop {
        let mut sums = Vec::new();
        for i in 0..n {
            let r = shared.client.call(Method::GET, &shared.addrs[i], routes::LEVEL1, Bytes::new(), OP_TIMEOUT).await;
            sums.push(match r {
                Ok((s, b)) if s.is_success() => Some(b),
                _ => None,
            });
        }
        let same_summary = sums[0].is_some() && sums.iter().all(|s| *s == sums[0]);
        if same_summary || (gc && sums.iter().all(Option::is_some)) {
            let took = healed.elapsed();
            let first = snapshot(shared, 0).await?;
            let mut agree = true;
            for i in 1..n {
                agree &= snapshot(shared, i).await? == first;
            }
            if agree {
                // Equal summaries are agreement at that moment; equal listings only
                // once the last listing is read.
                let took = if same_summary { took } else { healed.elapsed() };
                return Ok((took, first.0, first.1));
            }
            if same_summary {
                return Err("nodes with equal summaries hold different keys".into());
            }
        }
        if healed.elapsed() > deadline {
            return Err(format!("no convergence within {deadline:?} of the heal"));
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn run_all(o: Opts, lab: Arc<Mutex<Lab>>) -> Res<Verdict> {
    let addrs: Vec<String> = lab.lock().unwrap_or_else(|p| p.into_inner()).procs.iter().map(Proc::addr).collect();
    let shared = Arc::new(Shared {
        history: Mutex::new(History::default()),
        fault: Mutex::new("none"),
        stop: AtomicBool::new(false),
        addrs,
        client: PeerClient::new(),
        ops: AtomicU64::new(0),
    });
    {
        let mut lab = lab.lock().unwrap_or_else(|p| p.into_inner());
        for i in 0..o.nodes {
            lab.start(i, None)?;
        }
    }
    wait_healthy(&shared, &(0..o.nodes).collect::<Vec<_>>(), Duration::from_secs(30)).await?;
    println!("{} nodes up; workload of {} clients; faults for {:?}", o.nodes, o.clients, o.duration);
    let clients: Vec<_> = (0..o.clients).map(|c| tokio::spawn(client_loop(shared.clone(), c, o.seed))).collect();
    let (mut log, mut anomalies) = (Vec::new(), Vec::new());
    let nemesis_result = nemesis(&lab, &shared, &o, &mut log, &mut anomalies).await;
    shared.stop.store(true, Ordering::Relaxed);
    for c in clients {
        let _ = c.await;
    }
    if let Err(e) = nemesis_result {
        anomalies.push(format!("the nemesis stopped: {e}"));
    }
    // Heal everything, then every node must come back and agree.
    let healed = Instant::now();
    {
        let mut lab = lab.lock().unwrap_or_else(|p| p.into_inner());
        lab.heal_network()?;
        for i in 0..o.nodes {
            if let Some(status) = lab.procs[i].died() {
                anomalies.push(format!("n{i} exited by itself: {status}"));
            }
            if lab.procs[i].paused {
                lab.procs[i].signal("CONT");
                lab.procs[i].paused = false;
            }
            if lab.procs[i].child.is_none() || lab.procs[i].skew.is_some() {
                lab.procs[i].stop();
                lab.start(i, None)?;
            }
        }
    }
    wait_healthy(&shared, &(0..o.nodes).collect::<Vec<_>>(), Duration::from_secs(30)).await?;
    let history = std::mem::take(&mut *shared.history.lock().unwrap_or_else(|p| p.into_inner()));
    // Every TTL has passed and every node's expiry sweep (once a second, on a checked
    // clock) has run since: the change feeds then show each expiry as a delete.
    // That wait is left out of the convergence time, which is replication's.
    let waited = Instant::now();
    let expires_by = history.expiring.values().filter_map(|e| e.expires_by).max();
    wait_clocks_checked(&shared, o.nodes, Duration::from_secs(30)).await?;
    let swept = Instant::now().max(expires_by.unwrap_or_else(Instant::now)) + Duration::from_millis(2_500);
    tokio::time::sleep_until(swept.into()).await;
    let healed = healed + waited.elapsed();
    let mut report = String::new();
    match converge(&shared, o.nodes, o.gc, healed, Duration::from_secs(60)).await {
        Ok((took, keys, registers)) => {
            let _ = writeln!(
                report,
                "converged {:.2} s after the heal, restarts included, the wait for expiry sweeps not ({} keys on every node)",
                took.as_secs_f64(),
                keys.len()
            );
            if took > CONVERGENCE_TARGET {
                // A missed target, not a correctness anomaly: not converging at all
                // within the deadline is one.
                let _ = writeln!(
                    report,
                    "SLOW: convergence took {:.1} s, over the {} s target",
                    took.as_secs_f64(),
                    CONVERGENCE_TARGET.as_secs()
                );
            }
            let (a, r) = check(&history, &keys, &registers);
            anomalies.extend(a);
            report.push_str(&r);
            // Each node's change feed, replayed from its start, must explain its data
            // exactly: every key it holds has a put as its last event, every other key
            // that ever had an event ends with a delete.
            let mut checked = Vec::new();
            for node in 0..o.nodes {
                match replay_feed(&shared, node).await {
                    Ok(Some((live, events))) => {
                        let missing = keys.difference(&live).count();
                        let extra = live.difference(&keys).count();
                        if missing + extra > 0 {
                            anomalies.push(format!(
                                "n{node}'s change feed does not explain its data: {missing} keys held without a put \
                                 as their last event, {extra} keys whose last event is a put but absent"
                            ));
                        }
                        checked.push(format!("n{node} {events} events"));
                    }
                    Ok(None) => checked.push(format!("n{node} new feed after a crash")),
                    Err(e) => anomalies.push(e),
                }
            }
            let _ = writeln!(report, "change feeds replayed from their start: {}", checked.join(", "));
        }
        Err(e) => anomalies.push(e),
    }
    for d in &history.burst_drift_ms {
        if *d > MAX_OFFSET_MS as i64 {
            anomalies.push(format!("after a burst a write's timestamp was {d} ms ahead of the wall clock"));
        }
    }
    let _ = writeln!(
        report,
        "bursts: {} at {} writes/s; next write's timestamp minus wall clock: {:?} ms",
        history.burst_rates.len(),
        history.burst_rates.iter().map(|r| format!("{r:.0}")).collect::<Vec<_>>().join(", "),
        history.burst_drift_ms
    );
    let _ = writeln!(report, "availability (ok / failed / unknown client operations):");
    for (fault, t) in &history.availability {
        let all = (t.ok + t.failed + t.unknown).max(1);
        let _ = writeln!(
            report,
            "  {fault:18} {:6} / {:6} / {:6}  ({:.1}% ok)",
            t.ok,
            t.failed,
            t.unknown,
            100.0 * t.ok as f64 / all as f64
        );
    }
    {
        let lab = lab.lock().unwrap_or_else(|p| p.into_inner());
        for p in &lab.procs {
            let log = std::fs::read_to_string(p.dir.join("node.log")).unwrap_or_default();
            if log.contains("panicked") {
                anomalies.push(format!("n{} panicked (see its node.log)", p.idx));
            }
        }
    }
    let _ = writeln!(report, "faults: {}", log.join("; "));
    let _ = writeln!(report, "operations: {}", shared.ops.load(Ordering::Relaxed));
    Ok(Verdict { anomalies, report })
}

fn main() -> ExitCode {
    let o = match parse_opts() {
        Ok(o) => o,
        Err(e) => {
            eprintln!("kvs-nemesis: {e}");
            return ExitCode::from(2);
        }
    };
    let seed = o.seed;
    println!("kvs-nemesis: seed {seed} (replay with --seed {seed})");
    let lab = match build_lab(&o) {
        Ok(l) => Arc::new(Mutex::new(l)),
        Err(e) => {
            eprintln!("kvs-nemesis: {e}");
            return ExitCode::from(2);
        }
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("kvs-nemesis: {e}");
            return ExitCode::from(2);
        }
    };
    let outcome = runtime.block_on(async {
        tokio::select! {
            v = run_all(o, lab.clone()) => v,
            _ = tokio::signal::ctrl_c() => Err("interrupted".to_string()),
        }
    });
    drop(runtime);
    // Removes rules, processes, users and directories.
    drop(lab);
    match outcome {
        Ok(v) => {
            print!("{}", v.report);
            if v.anomalies.is_empty() {
                println!("kvs-nemesis: seed {seed}: no anomalies");
                ExitCode::SUCCESS
            } else {
                for a in &v.anomalies {
                    println!("ANOMALY: {a}");
                }
                println!("kvs-nemesis: seed {seed}: {} anomalies", v.anomalies.len());
                ExitCode::from(1)
            }
        }
        Err(e) => {
            eprintln!("kvs-nemesis: seed {seed}: {e}");
            ExitCode::from(1)
        }
    }
}
