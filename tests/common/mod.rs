//! Test harness: real `kvs` processes on 127.0.0.1 and a raw HTTP/1.1 client.
//!
//! A node binds port 0 and the harness reads the bound address from its `listening`
//! log line, so tests never race for ports. Every process is killed when its [`Node`]
//! drops, also when a test fails; a failing test prints the node's log tail.
#![allow(dead_code)]

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

/// How long any wait in a test may take before the test fails.
pub const DEADLINE: Duration = Duration::from_secs(20);

pub const BIN: &str = env!("CARGO_BIN_EXE_kvs");

/// Polls `cond` every 20 ms until it returns `Some`, or panics after `timeout`.
pub fn wait_for<T>(timeout: Duration, what: &str, mut cond: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = cond() {
            return v;
        }
        if Instant::now() > deadline {
            panic!("timed out after {timeout:?} waiting for {what}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A running (or stopped) kvs process with its own directory.
pub struct Node {
    child: Option<Child>,
    /// Extra environment for the process.
    pub env: Vec<(String, String)>,
    /// `127.0.0.1:port` it listens on.
    pub addr: String,
    /// Directory holding its config, data dir and log.
    pub dir: PathBuf,
    /// Its config file.
    pub config: PathBuf,
    /// With TLS: how the harness reaches it over HTTPS.
    pub tls: Option<std::sync::Arc<rustls::ClientConfig>>,
    /// With client auth: the token the harness's requests carry.
    pub token: Option<String>,
}

impl Node {
    /// Writes `config.yaml` in `dir` (port 0, data dir `dir/data` unless `extra` says
    /// otherwise) and starts a node on it.
    pub fn start_in(dir: &Path, extra: &str) -> Node {
        let config = write_config(dir, extra);
        Node::start_config(dir, &config)
    }

    /// A node not yet started.
    fn new(dir: &Path, config: PathBuf) -> Node {
        Node {
            child: None,
            env: Vec::new(),
            addr: String::new(),
            dir: dir.to_path_buf(),
            config,
            tls: None,
            token: None,
        }
    }

    /// Starts a node without waiting for it to listen (for nodes expected to fail).
    pub fn spawn_in(dir: &Path, extra: &str) -> Node {
        let mut node = Node::new(dir, write_config(dir, extra));
        node.spawn();
        node
    }

    /// Starts a node on an existing config file; its log goes to `dir/node.log`.
    pub fn start_config(dir: &Path, config: &Path) -> Node {
        Node::start_config_env(dir, config, &[])
    }

    /// Starts a node with extra environment variables.
    pub fn start_config_env(dir: &Path, config: &Path, env: &[(&str, &str)]) -> Node {
        let mut node = Node::new(dir, config.to_path_buf());
        node.env = env.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        node.restart();
        node
    }

    /// [`Node::start_in`] for a node serving HTTPS, reached with `tls`.
    pub fn start_in_tls(dir: &Path, extra: &str, tls: std::sync::Arc<rustls::ClientConfig>) -> Node {
        let mut node = Node::new(dir, write_config(dir, extra));
        node.tls = Some(tls);
        node.restart();
        node
    }

    /// One request to this node, over HTTPS when it serves TLS, with its token when
    /// it has one.
    pub fn call(&self, method: &str, path: &str, body: Option<&[u8]>) -> Resp {
        let auth = self.token.as_ref().map(|t| format!("Bearer {t}"));
        let headers: Vec<(&str, &str)> = auth.iter().map(|a| ("Authorization", a.as_str())).collect();
        let bytes = request(method, path, &headers, body);
        match &self.tls {
            None => raw(&self.addr, &bytes, method == "HEAD"),
            Some(tls) => https_raw(tls, &self.addr, &bytes, method == "HEAD"),
        }
    }

    /// Starts the process again on the same config and data (a new log section).
    pub fn restart(&mut self) {
        let log_path = self.log_path();
        let offset = std::fs::metadata(&log_path).map_or(0, |m| m.len());
        self.spawn();
        self.addr = wait_for(DEADLINE, "the node to listen", || {
            if let Some(status) = self.child.as_mut().and_then(|c| c.try_wait().ok().flatten()) {
                panic!("kvs exited during start with {status}:\n{}", self.log());
            }
            let log = std::fs::read_to_string(&log_path).ok()?;
            log.get(offset as usize..)?.lines().find_map(listening_addr)
        });
        // A node with seeds takes client writes once it has compared its clock with
        // one (or found none answering): wait for that, so tests can write at once.
        wait_for(DEADLINE, "the node's first clock check", || {
            (self.health()["clock"]["checked"] == true).then_some(())
        });
    }

    /// Starts the process, its output appended to `node.log`.
    fn spawn(&mut self) {
        assert!(self.child.is_none(), "node is still running");
        let log = std::fs::OpenOptions::new().create(true).append(true).open(self.log_path()).unwrap();
        let child = Command::new(BIN)
            .arg(&self.config)
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .current_dir(&self.dir)
            .stdout(Stdio::from(log.try_clone().unwrap()))
            .stderr(Stdio::from(log))
            .spawn()
            .expect("start kvs");
        self.child = Some(child);
    }

    pub fn log_path(&self) -> PathBuf {
        self.dir.join("node.log")
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("node is running").id()
    }

    /// SIGKILL: no chance to flush or say goodbye.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGTERM and wait for the exit.
    pub fn terminate(&mut self) -> ExitStatus {
        self.stop_with("TERM")
    }

    /// Sends `sig` (e.g. "INT") and waits for the exit.
    pub fn stop_with(&mut self, sig: &str) -> ExitStatus {
        let mut c = self.child.take().expect("node is running");
        signal(c.id(), sig);
        wait_for(DEADLINE, "the node to exit", || c.try_wait().ok().flatten())
    }

    pub fn get(&self, path: &str) -> Resp {
        self.call("GET", path, None)
    }

    pub fn put(&self, path: &str, body: &str) -> Resp {
        self.call("PUT", path, Some(body.as_bytes()))
    }

    pub fn delete(&self, path: &str) -> Resp {
        self.call("DELETE", path, None)
    }

    pub fn health(&self) -> serde_json::Value {
        self.get("/health").json()
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        self.kill9();
        if std::thread::panicking() {
            let log = self.log();
            let tail: Vec<&str> = log.lines().rev().take(40).collect();
            eprintln!("--- log of node at {} (last lines) ---", self.addr);
            for l in tail.iter().rev() {
                eprintln!("{l}");
            }
        }
    }
}

pub fn signal(pid: u32, sig: &str) {
    let ok = Command::new("kill").arg(format!("-{sig}")).arg(pid.to_string()).status().map(|s| s.success());
    assert!(matches!(ok, Ok(true)), "kill -{sig} {pid} failed");
}

/// Writes `dir/config.yaml` (see [`Node::start_in`]) and returns its path.
pub fn config_in(dir: &Path, extra: &str) -> PathBuf {
    write_config(dir, extra)
}

/// Writes `dir/config.yaml`: port 0 and data dir `dir/data` unless `extra` sets them.
fn write_config(dir: &Path, extra: &str) -> PathBuf {
    std::fs::create_dir_all(dir).unwrap();
    let config = dir.join("config.yaml");
    let mut text = String::new();
    if !extra.contains("log_level:") {
        text.push_str("log_level: debug\n");
    }
    if !extra.contains("port:") {
        text.push_str("port: 0\n");
    }
    if !extra.contains("data_dir:") {
        text.push_str("data_dir: ./data\n");
    }
    text.push_str(extra);
    std::fs::write(&config, text).unwrap();
    config
}

/// Waits until `n` has run `rounds` more gossip rounds than it had when called.
pub fn wait_gossip_rounds(n: &Node, rounds: u64) {
    let start = n.health()["gossip_rounds"].as_u64().expect("gossip_rounds in /health");
    wait_for(DEADLINE, "gossip rounds", || (n.health()["gossip_rounds"].as_u64()? >= start + rounds).then_some(()));
}

fn listening_addr(line: &str) -> Option<String> {
    let v: serde_json::Value = serde_json::from_str(line).ok()?;
    (v["message"] == "listening").then(|| v["addr"].as_str().map(str::to_string)).flatten()
}

/// An HTTP response as the client saw it.
#[derive(Debug)]
pub struct Resp {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Resp {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(k, _)| k.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str())
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|e| panic!("not JSON ({e}): {:?}", self.text()))
    }

    /// Asserts a JSON error body with the given status.
    pub fn assert_error(&self, status: u16) {
        assert_eq!(self.status, status, "body: {}", self.text());
        assert_eq!(self.header("content-type"), Some("application/json"));
        assert!(self.json()["error"].is_string(), "no error field: {}", self.text());
    }
}

/// The bytes of one request (`Connection: close`) with extra `headers` and, when
/// there is a body, its `Content-Length`.
pub fn request(method: &str, path: &str, headers: &[(&str, &str)], body: Option<&[u8]>) -> Vec<u8> {
    let mut req = format!("{method} {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n");
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    if let Some(b) = body {
        req.push_str(&format!("Content-Length: {}\r\n", b.len()));
    }
    req.push_str("\r\n");
    let mut bytes = req.into_bytes();
    bytes.extend_from_slice(body.unwrap_or_default());
    bytes
}

/// One request over a fresh connection (`Connection: close`).
pub fn http(addr: &str, method: &str, path: &str, body: Option<&[u8]>) -> Resp {
    raw(addr, &request(method, path, &[], body), method == "HEAD")
}

/// The full version (HLC) a write answered.
pub fn version_of(r: &Resp) -> u64 {
    r.json()["version"].as_str().expect("version in the answer").parse().expect("version is a number")
}

/// POSTs `body` to a node-to-node route the way a peer of this protocol version does.
pub fn peer_post(addr: &str, route: &str, body: &[u8]) -> Resp {
    let mut req = format!(
        "POST {route} HTTP/1.1\r\nHost: x\r\nX-Kvs-Wire: {}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        kvs::protocol::WIRE_VERSION,
        body.len()
    )
    .into_bytes();
    req.extend_from_slice(body);
    raw(addr, &req, false)
}

/// GETs a node-to-node route the way a peer of this protocol version does.
pub fn peer_get(addr: &str, route: &str) -> Resp {
    let req = format!(
        "GET {route} HTTP/1.1\r\nHost: x\r\nX-Kvs-Wire: {}\r\nConnection: close\r\n\r\n",
        kvs::protocol::WIRE_VERSION
    );
    raw(addr, req.as_bytes(), false)
}

/// Sends raw request bytes and reads the response until the server closes.
pub fn raw(addr: &str, request: &[u8], head: bool) -> Resp {
    let mut s = TcpStream::connect(addr).unwrap_or_else(|e| panic!("connect {addr}: {e}"));
    s.set_read_timeout(Some(DEADLINE)).unwrap();
    // The server may answer (e.g. 413) and close before reading all of a large body.
    let _ = s.write_all(request);
    let mut buf = Vec::new();
    let _ = s.read_to_end(&mut buf);
    parse_response(&buf, head)
}

/// Raw request bytes over HTTPS, trusting what `tls` trusts.
pub fn https_raw(tls: &std::sync::Arc<rustls::ClientConfig>, addr: &str, bytes: &[u8], head: bool) -> Resp {
    let name = rustls::pki_types::ServerName::try_from("127.0.0.1").unwrap();
    let conn = rustls::ClientConnection::new(tls.clone(), name).unwrap();
    let sock = TcpStream::connect(addr).unwrap();
    sock.set_read_timeout(Some(DEADLINE)).unwrap();
    let mut s = rustls::StreamOwned::new(conn, sock);
    s.write_all(bytes).unwrap();
    let mut buf = Vec::new();
    let _ = s.read_to_end(&mut buf);
    parse_response(&buf, head)
}

fn parse_response(buf: &[u8], head: bool) -> Resp {
    let end = buf.windows(4).position(|w| w == b"\r\n\r\n").unwrap_or_else(|| {
        panic!("no complete response: {:?}", String::from_utf8_lossy(buf));
    });
    let head_text = std::str::from_utf8(&buf[..end]).unwrap();
    let mut lines = head_text.split("\r\n");
    let status = lines.next().unwrap().split(' ').nth(1).unwrap().parse().unwrap();
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    let mut body = buf[end + 4..].to_vec();
    if !head && let Some(len) = headers.iter().find(|(k, _)| k == "content-length").and_then(|(_, v)| v.parse().ok()) {
        body.truncate(len);
    }
    Resp { status, headers, body }
}

/// A temporary directory holding one sub-directory per node of a test cluster.
pub struct Dirs(pub tempfile::TempDir);

impl Dirs {
    pub fn new() -> Dirs {
        Dirs(tempfile::tempdir().unwrap())
    }

    /// Starts node `id` seeded with `seeds`; `extra` lines replace the keys they name.
    pub fn start(&self, id: &str, seeds: &[&str], extra: &str) -> Node {
        Node::start_in(&self.0.path().join(id), &cluster_config_with(id, seeds, extra))
    }
}

/// [`cluster_config`] with `extra` lines replacing the keys they name.
pub fn cluster_config_with(id: &str, seeds: &[&str], extra: &str) -> String {
    let mut lines: Vec<String> = cluster_config(id, seeds).lines().map(str::to_string).collect();
    for e in extra.lines() {
        let key = e.split(':').next().unwrap();
        lines.retain(|l| !l.starts_with(&format!("{key}:")));
        lines.push(e.to_string());
    }
    lines.join("\n") + "\n"
}

/// Two nodes, n2 seeded with n1; returns once both are alive and n2 is bootstrapped.
pub fn two(d: &Dirs, extra: &str) -> (Node, Node) {
    let n1 = d.start("n1", &[], extra);
    let n2 = d.start("n2", &[&n1.addr], extra);
    wait_members_alive(&n1, &["n1", "n2"]);
    wait_normal(&n2);
    (n1, n2)
}

/// Three nodes, n2 and n3 seeded with n1; returns once each lists all three alive and
/// is bootstrapped.
pub fn three(d: &Dirs, extra: &str) -> (Node, Node, Node) {
    let n1 = d.start("n1", &[], extra);
    let n2 = d.start("n2", &[&n1.addr], extra);
    let n3 = d.start("n3", &[&n1.addr], extra);
    for n in [&n1, &n2, &n3] {
        wait_members_alive(n, &["n1", "n2", "n3"]);
        wait_normal(n);
    }
    (n1, n2, n3)
}

/// Config lines for a cluster node with sub-second intervals.
pub fn cluster_config(id: &str, seeds: &[&str]) -> String {
    let seeds: Vec<String> = seeds.iter().map(|s| format!("\"{s}\"")).collect();
    format!(
        "node_id: {id}\nseed_nodes: [{}]\ngossip_interval_min: 0.1\ngossip_interval_max: 0.2\n\
         failure_timeout: 1\nremoval_timeout: 2\nsync_interval: 0.5\ncatchup_interval: 0.5\n\
         throttle_delay_ms: 0\nfetch_delay_ms: 0\n",
        seeds.join(", ")
    )
}

/// Waits until `n` answers `path` with `want` (`None`: 404).
pub fn wait_value(n: &Node, path: &str, want: Option<&str>) {
    wait_for(DEADLINE, &format!("{path} = {want:?} on {}", n.addr), || {
        let r = n.get(path);
        match want {
            Some(v) => (r.status == 200 && r.text() == v).then_some(()),
            None => (r.status == 404).then_some(()),
        }
    });
}

/// `(id, status)` of every member a node lists.
pub fn members(n: &Node) -> Vec<(String, String)> {
    let v = n.get("/members/").json();
    let mut out: Vec<(String, String)> = v
        .as_array()
        .expect("member list")
        .iter()
        .map(|m| (m["id"].as_str().unwrap().to_string(), m["status"].as_str().unwrap().to_string()))
        .collect();
    out.sort();
    out
}

/// Waits until `n` has finished bootstrapping (mode `normal`).
pub fn wait_normal(n: &Node) {
    wait_for(DEADLINE, &format!("{} in mode normal", n.addr), || (n.health()["mode"] == "normal").then_some(()));
}

/// Waits until `n` lists exactly these members, all alive.
pub fn wait_members_alive(n: &Node, ids: &[&str]) {
    let mut want: Vec<(String, String)> = ids.iter().map(|i| (i.to_string(), "alive".to_string())).collect();
    want.sort();
    wait_for(DEADLINE, &format!("{} to list {ids:?} alive", n.addr), || (members(n) == want).then_some(()));
}

impl Node {
    /// Rewrites the config so that a restart binds the same port again.
    pub fn pin_port(&self) {
        let port = self.addr.rsplit_once(':').unwrap().1;
        let text = std::fs::read_to_string(&self.config).unwrap().replace("port: 0\n", &format!("port: {port}\n"));
        std::fs::write(&self.config, text).unwrap();
    }

    /// Waits for the process to exit by itself.
    pub fn wait_exit(&mut self) -> ExitStatus {
        let c = self.child.as_mut().expect("node was started");
        let status = wait_for(DEADLINE, "the node to exit", || c.try_wait().ok().flatten());
        self.child = None;
        status
    }
}

/// A replication counter from `n`'s `/health`.
pub fn stat(n: &Node, name: &str) -> u64 {
    n.health()["replication"][name].as_u64().unwrap_or_else(|| panic!("no counter {name}"))
}

/// Waits until `n` holds `count` live keys.
pub fn wait_keys(n: &Node, count: u64) {
    wait_for(DEADLINE, &format!("{count} keys on {}", n.addr), || {
        (n.health()["keys"].as_u64()? == count).then_some(())
    });
}

/// Waits until `n` has completed `rounds` more regular sync rounds.
pub fn wait_sync_rounds(n: &Node, rounds: u64) {
    let start = stat(n, "sync_ok");
    wait_for(DEADLINE, "sync rounds", || (stat(n, "sync_ok") >= start + rounds).then_some(()));
}

/// Waits until `ms` have passed since `since` (a grace period, a TTL).
pub fn wait_past(since: std::time::Instant, ms: u64) {
    wait_for(DEADLINE, "the grace period to pass", || (since.elapsed().as_millis() as u64 > ms).then_some(()));
}

/// A metric's value from `n`'s `/metrics` (the series named exactly `name`); panics
/// when there is none, so a misspelt name cannot pass as 0.
pub fn metric(n: &Node, name: &str) -> u64 {
    let text = n.get("/metrics").text();
    text.lines()
        .find_map(|l| l.strip_prefix(name).and_then(|rest| rest.strip_prefix(' ')))
        .and_then(|v| v.trim().parse::<f64>().ok())
        .unwrap_or_else(|| panic!("no {name} in /metrics")) as u64
}
