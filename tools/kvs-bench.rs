//! kvs-bench: load and convergence bench. Starts everything it measures itself (the
//! release `kvs` binary next to this one, temporary data dirs, 127.0.0.1) and prints a
//! table, or JSON with `--json`.
//!
//! ```text
//! cargo build --release && ./target/release/kvs-bench [--quick] [--json] [--only a,b] [--keys N]
//! ```
//! Scenarios: `ceiling` (a minimal hyper server with a fixed 64-byte JSON body, run as
//! a separate process like kvs), `get`, `put` (sync and buffer durability, 100-byte
//! and 10 KB values), `lag` (3 nodes), `auth`, `tls`, `changes`, `ack`, `ttl`,
//! `antientropy`, `bootstrap`, `restart`, `snapshot`, `compare` (Redis and etcd, when
//! installed), `scale`. Sizes are
//! flags; `--quick` shrinks them so the whole run takes a few minutes.

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::{Method, Request, StatusCode};
use hyper_util::rt::TokioIo;
use kvs::config::{DEFAULT_MAX_CLOCK_OFFSET_MS, Durability};
use kvs::record::Record;
use kvs::storage::Store;
use rand::rngs::StdRng;
use rand::{RngExt, SeedableRng};
use serde_json::{Value, json};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};
use uuid::Uuid;

type Err = Box<dyn std::error::Error + Send + Sync>;
type Res<T> = Result<T, Err>;

#[derive(Clone)]
struct Opts {
    quick: bool,
    json: bool,
    only: Option<Vec<String>>,
    keys: usize,
    load_secs: f64,
    lag_writes: usize,
    /// `--dataset DIR`: the main dataset's data dir, kept and reused across runs.
    dataset: Option<PathBuf>,
}

fn parse_opts() -> Res<Opts> {
    let mut o = Opts {
        quick: false,
        json: false,
        only: None,
        keys: 1_000_000,
        load_secs: 5.0,
        lag_writes: 1_000,
        dataset: None,
    };
    let mut keys = None;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--quick" => o.quick = true,
            "--json" => o.json = true,
            "--only" => o.only = Some(args.next().ok_or("--only needs a list")?.split(',').map(String::from).collect()),
            "--keys" => keys = Some(args.next().ok_or("--keys needs a number")?.parse()?),
            "--dataset" => o.dataset = Some(args.next().ok_or("--dataset needs a directory")?.into()),
            "--serve-ceiling" => {
                serve_ceiling()?;
                std::process::exit(0);
            }
            "-h" | "--help" => {
                println!(
                    "usage: kvs-bench [--quick] [--json] [--only ceiling,get,put,lag,auth,tls,changes,ack,ttl,antientropy,bootstrap,restart,snapshot,compare,scale] [--keys N] [--dataset DIR]"
                );
                std::process::exit(0);
            }
            other => return Err(format!("unexpected argument {other:?}").into()),
        }
    }
    if o.quick {
        o.keys = 20_000;
        o.load_secs = 1.0;
        o.lag_writes = 200;
    }
    if let Some(k) = keys {
        o.keys = k;
    }
    Ok(o)
}

/// The minimal server the HTTP figures are compared with.
fn serve_ceiling() -> Res<()> {
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    rt.block_on(async {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        println!("{}", listener.local_addr()?);
        const BODY: &[u8; 64] = br#"{"name":"John Doe","age":30,"city":"Berlin","tags":["a","b"]}   "#;
        loop {
            let (stream, _) = listener.accept().await?;
            let _ = stream.set_nodelay(true);
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(|_req| async {
                    Ok::<_, std::convert::Infallible>(
                        hyper::Response::builder()
                            .header("content-type", "application/json")
                            .body(Full::new(Bytes::from_static(BODY)))
                            .unwrap_or_default(),
                    )
                });
                let _ = hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(stream), svc).await;
            });
        }
    })
}

/// A child process killed on drop.
struct Proc {
    child: Child,
    addr: String,
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Proc {
    fn rss_kib(&self, field: &str) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id())).unwrap_or_default();
        status
            .lines()
            .find(|l| l.starts_with(field))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|n| n.parse().ok())
            .unwrap_or(0)
    }
}

fn exe_dir() -> Res<PathBuf> {
    Ok(std::env::current_exe()?.parent().ok_or("no exe dir")?.to_path_buf())
}

fn start_ceiling() -> Res<Proc> {
    let mut child = Command::new(std::env::current_exe()?)
        .arg("--serve-ceiling")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()?;
    let mut line = String::new();
    std::io::BufRead::read_line(&mut std::io::BufReader::new(child.stdout.take().ok_or("no stdout")?), &mut line)?;
    Ok(Proc { child, addr: line.trim().to_string() })
}

/// Starts kvs in `dir` with `extra` config lines; waits until it listens.
fn start_kvs(dir: &Path, extra: &str) -> Res<(Proc, Instant)> {
    std::fs::create_dir_all(dir)?;
    let config = dir.join("config.yaml");
    let log_path = dir.join("node.log");
    let log = std::fs::OpenOptions::new().create(true).append(true).open(&log_path)?;
    let offset = log.metadata()?.len() as usize;
    let started = Instant::now();
    std::fs::write(
        &config,
        format!(
            // A dataset kept with --dataset may be older than the change feed's default
            // 24 h: trimming its feed must not run during a measurement.
            "port: 0\ndata_dir: ./data\nlog_level: {}\nchanges_retention_hours: 87600\n{extra}",
            std::env::var("KVS_BENCH_LOG").unwrap_or("info".into())
        ),
    )?;
    let child = Command::new(exe_dir()?.join("kvs"))
        .arg(&config)
        .current_dir(dir)
        .stdout(Stdio::from(log.try_clone()?))
        .stderr(Stdio::from(log))
        .spawn()?;
    let mut p = Proc { child, addr: String::new() };
    let deadline = Instant::now() + Duration::from_secs(60);
    while Instant::now() < deadline {
        let text = std::fs::read_to_string(&log_path)?;
        if let Some(addr) = text.get(offset..).unwrap_or_default().lines().find_map(|l| {
            let v: Value = serde_json::from_str(l).ok()?;
            (v["message"] == "listening").then(|| v["addr"].as_str().map(String::from)).flatten()
        }) {
            p.addr = addr;
            return Ok((p, started));
        }
        if let Ok(Some(s)) = p.child.try_wait() {
            return Err(format!("kvs exited with {s}; see {}", log_path.display()).into());
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    Err("kvs did not start".into())
}

/// `N` distinct free ports on 127.0.0.1, for servers that cannot be told to pick their
/// own and report it (Redis, etcd). All are held until all are drawn, so no two are
/// the same. Another process may take one before its server binds it: that server
/// then fails to start and [`wait_ready`] says so.
fn free_ports<const N: usize>() -> Res<[u16; N]> {
    let held = (0..N).map(|_| std::net::TcpListener::bind("127.0.0.1:0")).collect::<Result<Vec<_>, _>>()?;
    let ports = held.iter().map(|l| l.local_addr().map(|a| a.port())).collect::<Result<Vec<_>, _>>()?;
    <[u16; N]>::try_from(ports).map_err(|_| "port count".into())
}

/// Starts `program` with `args` in `dir`, its output in `dir/server.log`, serving at
/// `addr`; `None` when it is not installed.
fn start_server(dir: &Path, program: &str, args: &[String], addr: String) -> Res<Option<Proc>> {
    std::fs::create_dir_all(dir)?;
    let log = std::fs::File::create(dir.join("server.log"))?;
    let spawned = Command::new(program)
        .args(args)
        .current_dir(dir)
        .stdin(Stdio::null())
        .stdout(Stdio::from(log.try_clone()?))
        .stderr(Stdio::from(log))
        .spawn();
    match spawned {
        Ok(child) => Ok(Some(Proc { child, addr })),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(format!("{program}: {e}").into()),
    }
}

/// Waits until `spec`'s server answers a read (found or not), or fails if `proc` exits.
async fn wait_ready(proc: &mut Proc, spec: &Spec, dir: &Path) -> Res<()> {
    let deadline = Instant::now() + Duration::from_secs(60);
    while Instant::now() < deadline {
        if let Ok(mut c) = Client::open(spec).await
            && let Ok(status) = c.call(Method::GET, "/kv/bench/ready", Bytes::new()).await
            && (status.is_success() || status == StatusCode::NOT_FOUND)
        {
            return Ok(());
        }
        if let Ok(Some(s)) = proc.child.try_wait() {
            return Err(format!("{} exited with {s}; see {}/server.log", spec.addr, dir.display()).into());
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Err(format!("{} did not answer; see {}/server.log", spec.addr, dir.display()).into())
}

/// One keep-alive HTTP/1 connection.
struct Conn {
    send: hyper::client::conn::http1::SendRequest<Full<Bytes>>,
    host: String,
    /// `Authorization` header value sent with every request, if any.
    auth: Option<String>,
}

impl Conn {
    async fn open(addr: &str) -> Res<Conn> {
        let stream = tokio::net::TcpStream::connect(addr).await?;
        stream.set_nodelay(true)?;
        let (send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
        tokio::spawn(conn);
        Ok(Conn { send, host: addr.to_string(), auth: None })
    }

    async fn open_as(addr: &str, token: Option<&str>) -> Res<Conn> {
        let mut c = Conn::open(addr).await?;
        c.auth = token.map(|t| format!("Bearer {t}"));
        Ok(c)
    }

    /// A connection over TLS, trusting `tls`'s roots.
    async fn open_tls(addr: &str, tls: Arc<rustls::ClientConfig>) -> Res<Conn> {
        let stream = tokio::net::TcpStream::connect(addr).await?;
        stream.set_nodelay(true)?;
        let name = rustls::pki_types::ServerName::try_from("127.0.0.1")?;
        let stream = tokio_rustls::TlsConnector::from(tls).connect(name, stream).await?;
        let (send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
        tokio::spawn(conn);
        Ok(Conn { send, host: addr.to_string(), auth: None })
    }

    async fn open_spec(spec: &Spec) -> Res<Conn> {
        match &spec.tls {
            Some(tls) => Conn::open_tls(&spec.addr, tls.clone()).await,
            None => Conn::open_as(&spec.addr, spec.token.as_deref()).await,
        }
    }

    async fn call(&mut self, method: Method, path: &str, body: Bytes) -> Res<(StatusCode, Bytes)> {
        let mut req = Request::builder().method(method).uri(path).header("host", &self.host);
        if let Some(a) = &self.auth {
            req = req.header("authorization", a);
        }
        let req = req.body(Full::new(body))?;
        // A request sent before the connection is ready again is rejected as canceled.
        self.send.ready().await?;
        let resp = self.send.send_request(req).await?;
        let status = resp.status();
        Ok((status, resp.into_body().collect().await?.to_bytes()))
    }
}

async fn health(addr: &str) -> Res<Value> {
    let mut c = Conn::open(addr).await?;
    let (_, b) = c.call(Method::GET, "/health", Bytes::new()).await?;
    Ok(serde_json::from_slice(&b)?)
}

async fn wait_health(addr: &str, what: &str, f: impl Fn(&Value) -> bool) -> Res<Value> {
    let deadline = Instant::now() + Duration::from_secs(120);
    while Instant::now() < deadline {
        if let Ok(h) = health(addr).await
            && f(&h)
        {
            return Ok(h);
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    Err(format!("timed out waiting for {what}").into())
}

struct Load {
    ops: u64,
    secs: f64,
    lat_us: Vec<u64>,
    errors: u64,
}

impl Load {
    fn pct(&self, p: f64) -> f64 {
        if self.lat_us.is_empty() {
            return 0.0;
        }
        self.lat_us[((self.lat_us.len() as f64 * p) as usize).min(self.lat_us.len() - 1)] as f64 / 1000.0
    }
    fn rps(&self) -> f64 {
        self.ops as f64 / self.secs
    }
    fn to_json(&self) -> Value {
        json!({"rps": self.rps().round(), "p50_ms": self.pct(0.5), "p99_ms": self.pct(0.99), "p999_ms": self.pct(0.999), "errors": self.errors})
    }
}

/// Runs `conns` connections for `secs`, each sending requests made by `make`.
async fn load(
    addr: &str,
    conns: usize,
    secs: f64,
    make: impl Fn(&mut StdRng) -> (Method, String, Bytes) + Send + Sync + Clone + 'static,
) -> Res<Load> {
    load_as(addr, None, conns, secs, make).await
}

/// Where a load goes: an address, with a token or over TLS, and what it speaks.
#[derive(Clone)]
struct Spec {
    addr: String,
    token: Option<String>,
    tls: Option<Arc<rustls::ClientConfig>>,
    proto: Proto,
}

impl Spec {
    fn kvs(addr: &str) -> Spec {
        Spec { addr: addr.to_string(), token: None, tls: None, proto: Proto::Kvs }
    }
}

/// What a server speaks: kvs's HTTP API, or, for the `compare` scenario, Redis's RESP
/// or etcd's v3 JSON gateway.
#[derive(Clone, Copy, PartialEq)]
enum Proto {
    Kvs,
    Redis,
    Etcd,
}

/// A connection a load runs on. Loads are written as kvs requests (`GET` or `PUT` of a
/// `/kv/<key>` path); Redis and etcd get the equivalent request for the same key and
/// value, one in flight per connection as for kvs.
enum Client {
    Http(Conn),
    Etcd(Conn),
    Redis(Resp),
}

impl Client {
    async fn open(spec: &Spec) -> Res<Client> {
        Ok(match spec.proto {
            Proto::Kvs => Client::Http(Conn::open_spec(spec).await?),
            Proto::Etcd => Client::Etcd(Conn::open(&spec.addr).await?),
            Proto::Redis => Client::Redis(Resp::open(&spec.addr).await?),
        })
    }

    /// Sends `method` on the `/kv/<key>` `path` (or its equivalent); the answer's status.
    async fn call(&mut self, method: Method, path: &str, body: Bytes) -> Res<StatusCode> {
        let key = || path.strip_prefix("/kv/").ok_or_else(|| Err::from(format!("not a key path: {path}")));
        match self {
            Client::Http(c) => Ok(c.call(method, path, body).await?.0),
            Client::Etcd(c) => {
                use base64::Engine;
                let b64 = |b: &[u8]| base64::engine::general_purpose::STANDARD.encode(b);
                let (url, req) = if method == Method::PUT {
                    ("/v3/kv/put", json!({"key": b64(key()?.as_bytes()), "value": b64(&body)}))
                } else {
                    ("/v3/kv/range", json!({"key": b64(key()?.as_bytes())}))
                };
                Ok(c.call(Method::POST, url, Bytes::from(serde_json::to_vec(&req)?)).await?.0)
            }
            Client::Redis(c) => {
                let key = key()?.as_bytes();
                let reply = if method == Method::PUT {
                    c.command(&[b"SET", key, &body]).await?
                } else {
                    c.command(&[b"GET", key]).await?
                };
                Ok(match reply {
                    RespReply::Ok => StatusCode::OK,
                    RespReply::Nil => StatusCode::NOT_FOUND,
                    RespReply::Error => StatusCode::INTERNAL_SERVER_ERROR,
                })
            }
        }
    }
}

/// A Redis connection speaking just enough RESP for `SET` and `GET`. Written
/// here rather than taken from the `redis` crate so that the client side of a Redis
/// load does what kvs's does (one request in flight per connection, no pipelining or
/// multiplexing), which the comparison depends on.
struct Resp {
    stream: tokio::io::BufStream<tokio::net::TcpStream>,
    line: Vec<u8>,
}

enum RespReply {
    /// `+OK`, a bulk string or an integer.
    Ok,
    /// A nil bulk string: no such key.
    Nil,
    Error,
}

impl Resp {
    async fn open(addr: &str) -> Res<Resp> {
        let stream = tokio::net::TcpStream::connect(addr).await?;
        stream.set_nodelay(true)?;
        Ok(Resp { stream: tokio::io::BufStream::new(stream), line: Vec::new() })
    }

    async fn command(&mut self, args: &[&[u8]]) -> Res<RespReply> {
        use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt};
        let mut out = format!("*{}\r\n", args.len()).into_bytes();
        for a in args {
            out.extend_from_slice(format!("${}\r\n", a.len()).as_bytes());
            out.extend_from_slice(a);
            out.extend_from_slice(b"\r\n");
        }
        self.stream.write_all(&out).await?;
        self.stream.flush().await?;
        self.line.clear();
        if self.stream.read_until(b'\n', &mut self.line).await? == 0 {
            return Err("redis closed the connection".into());
        }
        let line = std::str::from_utf8(&self.line)?.trim_end();
        let (kind, rest) = line.split_at_checked(1).ok_or("empty redis reply")?;
        match kind {
            "+" | ":" => Ok(RespReply::Ok),
            "-" => Ok(RespReply::Error),
            "$" => {
                let len: i64 = rest.parse()?;
                if len < 0 {
                    return Ok(RespReply::Nil);
                }
                // The value and its CRLF.
                let mut value = vec![0; usize::try_from(len)? + 2];
                self.stream.read_exact(&mut value).await?;
                Ok(RespReply::Ok)
            }
            _ => Err(format!("unexpected redis reply: {line}").into()),
        }
    }
}

/// [`load`] with a token on every request.
async fn load_as(
    addr: &str,
    token: Option<String>,
    conns: usize,
    secs: f64,
    make: impl Fn(&mut StdRng) -> (Method, String, Bytes) + Send + Sync + Clone + 'static,
) -> Res<Load> {
    load_spec(Spec { token, ..Spec::kvs(addr) }, conns, secs, make).await
}

/// [`load`] to a [`Spec`].
async fn load_spec(
    spec: Spec,
    conns: usize,
    secs: f64,
    make: impl Fn(&mut StdRng) -> (Method, String, Bytes) + Send + Sync + Clone + 'static,
) -> Res<Load> {
    let deadline = Instant::now() + Duration::from_secs_f64(secs);
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..conns {
        let spec = spec.clone();
        let make = make.clone();
        tasks.spawn(async move {
            let mut rng = StdRng::seed_from_u64(i as u64);
            let mut c = Client::open(&spec).await?;
            let (mut lat, mut errors) = (Vec::with_capacity(100_000), 0u64);
            while Instant::now() < deadline {
                let (m, p, b) = make(&mut rng);
                let t = Instant::now();
                let status = c.call(m, &p, b).await?;
                lat.push(t.elapsed().as_micros() as u64);
                if !status.is_success() {
                    errors += 1;
                }
            }
            Ok::<_, Err>((lat, errors))
        });
    }
    let started = Instant::now();
    let mut all = Load { ops: 0, secs: 0.0, lat_us: Vec::new(), errors: 0 };
    while let Some(r) = tasks.join_next().await {
        let (lat, errors) = r??;
        all.ops += lat.len() as u64;
        all.errors += errors;
        all.lat_us.extend(lat);
    }
    all.secs = started.elapsed().as_secs_f64();
    all.lat_us.sort_unstable();
    Ok(all)
}

/// The median run of a series, by throughput.
fn median(mut runs: Vec<Load>) -> Load {
    runs.sort_by(|a, b| a.rps().total_cmp(&b.rps()));
    runs.swap_remove(runs.len() / 2)
}

fn key_path(rng: &mut StdRng, space: usize) -> String {
    let i = rng.random_range(0..space);
    format!("/kv/users/u{}/items/i{}", i % 10_000, i)
}

fn value(size: usize) -> Bytes {
    let pad = "x".repeat(size.saturating_sub(30));
    Bytes::from(format!("{{\"name\":\"bench\",\"pad\":\"{pad}\"}}"))
}

/// About 100 bytes of JSON that compress like random data: 32 random bytes in hex.
fn random_value(seed: usize) -> Bytes {
    let mut rng = StdRng::seed_from_u64(seed as u64);
    let hex: String = (0..32).map(|_| format!("{:02x}", rng.random::<u8>())).collect();
    Bytes::from(format!("{{\"name\":\"bench\",\"pad\":\"{hex}\"}}"))
}

async fn preload(addr: &str, keys: usize, size: usize) -> Res<()> {
    preload_spec(&Spec::kvs(addr), keys, size).await
}

async fn preload_spec(spec: &Spec, keys: usize, size: usize) -> Res<()> {
    preload_with(spec, keys, size, ("", "")).await
}

/// [`preload_spec`] with the keys under `/kv/<prefix>users/...` and `query` after each.
async fn preload_with(spec: &Spec, keys: usize, size: usize, (prefix, query): (&'static str, &'static str)) -> Res<()> {
    let mut tasks = tokio::task::JoinSet::new();
    for w in 0..16 {
        let spec = spec.clone();
        tasks.spawn(async move {
            let mut c = Client::open(&spec).await?;
            for i in (w..keys).step_by(16) {
                let p = format!("/kv/{prefix}users/u{}/items/i{}{query}", i % 10_000, i);
                let status = c.call(Method::PUT, &p, value(size)).await?;
                if !status.is_success() {
                    return Err(format!("preload: PUT {p}: {status}").into());
                }
            }
            Ok::<_, Err>(())
        });
    }
    while let Some(r) = tasks.join_next().await {
        r??;
    }
    Ok(())
}

/// A metric's value from a node's `/metrics` (0 when absent).
async fn metric(addr: &str, name: &str) -> Res<u64> {
    let mut c = Conn::open(addr).await?;
    let (_, body) = c.call(Method::GET, "/metrics", Bytes::new()).await?;
    let text = String::from_utf8_lossy(&body);
    Ok(text
        .lines()
        .find_map(|l| l.strip_prefix(name).and_then(|r| r.strip_prefix(' ')))
        .and_then(|v| v.trim().parse::<f64>().ok())
        .map_or(0, |v| v as u64))
}

/// Opens a change stream (`GET /changes?<query>` as SSE) and returns the keys of its
/// events with when each arrived.
async fn sse_open(addr: &str, query: &str) -> Res<Sse> {
    let stream = tokio::net::TcpStream::connect(addr).await?;
    stream.set_nodelay(true)?;
    let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
    let conn = tokio::spawn(conn);
    let req = Request::builder()
        .uri(format!("/changes?{query}"))
        .header("host", addr)
        .header("accept", "text/event-stream")
        .body(Full::new(Bytes::new()))?;
    let resp = send.send_request(req).await?;
    if resp.status() != StatusCode::OK {
        return Err(format!("change stream: {}", resp.status()).into());
    }
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    let mut body = resp.into_body();
    let reader = tokio::spawn(async move {
        let _send = send;
        while let Some(Ok(frame)) = body.frame().await {
            let at = Instant::now();
            let Some(data) = frame.data_ref() else { continue };
            for line in String::from_utf8_lossy(data).lines() {
                if let Some(v) = line.strip_prefix("data: ").and_then(|d| serde_json::from_str::<Value>(d).ok())
                    && let Some(k) = v["key"].as_str()
                    && tx.send((k.to_string(), at)).is_err()
                {
                    return;
                }
            }
        }
    });
    Ok(Sse { rx, tasks: [conn.abort_handle(), reader.abort_handle()] })
}

/// An open change stream: its events, and its tasks, ended (closing the connection)
/// when it drops.
struct Sse {
    rx: tokio::sync::mpsc::UnboundedReceiver<(String, Instant)>,
    tasks: [tokio::task::AbortHandle; 2],
}

impl Drop for Sse {
    fn drop(&mut self) {
        self.tasks.iter().for_each(tokio::task::AbortHandle::abort);
    }
}

/// Waits for `key`'s event on a stream; its delay after `since`, in µs.
async fn wait_event(sse: &mut Sse, key: &str, since: Instant) -> Res<u64> {
    loop {
        let next = tokio::time::timeout(Duration::from_secs(30), sse.rx.recv()).await;
        match next {
            Ok(Some((k, at))) if k == key => return Ok(at.duration_since(since).as_micros() as u64),
            Ok(Some(_)) => {}
            _ => return Err(format!("no change event for {key} within 30 s").into()),
        }
    }
}

/// Writes `keys` records straight into a data dir (fast dataset creation). Timestamps
/// are `base + 2 i`, so a later version `base + 2 i + 1` is newer for that key but
/// older than the newest write.
async fn build_dataset(dir: &Path, keys: usize, base: u64, modified: &[usize], random: bool) -> Res<()> {
    let d = dir.to_path_buf();
    let (store, writer) =
        tokio::task::spawn_blocking(move || Store::open(&d, Durability::Buffer, DEFAULT_MAX_CLOCK_OFFSET_MS)).await??;
    let mut batch = Vec::with_capacity(10_000);
    for i in 0..keys {
        let path = format!("users/u{}/items/i{}", i % 10_000, i);
        let mut ts = base + 2 * i as u64;
        let mut data = if random { random_value(i) } else { value(100) };
        if modified.contains(&i) {
            ts += 1;
            data = Bytes::from_static(b"{\"modified\":true}");
        }
        batch.push((path, Record::value(ts, Uuid::from_u128(((ts as u128) << 64) | i as u128), data)));
        if batch.len() == 10_000 {
            writer.apply(std::mem::take(&mut batch), 0, 0).await?;
        }
    }
    writer.apply(batch, 0, 0).await?;
    // A member's data dir, not a new node's: no bootstrap on start.
    writer.set_meta(kvs::replication::META_BOOTSTRAPPED, Bytes::from_static(b"1")).await?;
    tokio::task::spawn_blocking(move || writer.close(&store)).await??;
    Ok(())
}

/// Disk use of a directory (du -sk).
fn du_kib(dir: &Path) -> Res<u64> {
    let out = Command::new("du").arg("-sk").arg(dir).output()?;
    let text = String::from_utf8_lossy(&out.stdout);
    Ok(text.split_whitespace().next().and_then(|k| k.parse().ok()).unwrap_or(0))
}

fn copy_dir(from: &Path, to: &Path) -> Res<()> {
    let status = Command::new("cp").arg("-r").arg(from).arg(to).status()?;
    if !status.success() {
        return Err("cp failed".into());
    }
    // Written back before anything is measured: a 10M-key copy leaves gigabytes of
    // dirty pages for the kernel to write while the nodes started on it are measured
    // (one anti-entropy round moved between 96 and 620 ms in five runs without this).
    if !Command::new("sync").status()?.success() {
        return Err("sync failed".into());
    }
    Ok(())
}

/// A scratch directory removed when the bench ends.
struct TempDir(PathBuf);

impl TempDir {
    fn new() -> Res<TempDir> {
        let dir = std::env::temp_dir().join(format!("kvs-bench-{}", std::process::id()));
        std::fs::create_dir_all(&dir)?;
        Ok(TempDir(dir))
    }
    fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        if std::env::var_os("KVS_BENCH_KEEP").is_some() {
            eprintln!("kvs-bench: kept {}", self.0.display());
        } else {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}

struct Bench {
    opts: Opts,
    tmp: TempDir,
    results: serde_json::Map<String, Value>,
}

impl Bench {
    fn wants(&self, name: &str) -> bool {
        self.opts.only.as_ref().is_none_or(|o| o.iter().any(|x| x == name))
    }

    fn record(&mut self, name: &str, v: Value) {
        if !self.opts.json {
            println!("{name:<28} {v}");
        }
        self.results.insert(name.to_string(), v);
    }

    /// Records a scenario as skipped for `why`; under CI (`CI` set; `.ci/run` installs
    /// what every scenario needs) that is an error instead.
    fn skip(&mut self, name: &str, why: &str) -> Res<()> {
        if std::env::var_os("CI").is_some() {
            return Err(format!("{name}: {why}").into());
        }
        self.record(name, json!({ "skipped": why }));
        Ok(())
    }

    async fn http(&mut self) -> Res<()> {
        let secs = self.opts.load_secs;
        let space = if self.opts.quick { 10_000 } else { 100_000 };
        let ceiling = start_ceiling()?;
        let mut ceiling_rps = [0.0; 2];
        if self.wants("ceiling") || self.wants("get") || self.wants("put") {
            for (i, c) in [1, 32].into_iter().enumerate() {
                let l = load(&ceiling.addr, c, secs, |_| (Method::GET, "/".into(), Bytes::new())).await?;
                ceiling_rps[i] = l.rps();
                self.record(&format!("ceiling c={c}"), l.to_json());
            }
        }
        if self.wants("get") {
            let (node, _) = start_kvs(&self.tmp.path().join("get"), "durability: buffer\n")?;
            preload(&node.addr, space, 100).await?;
            for (i, c) in [1, 32].into_iter().enumerate() {
                let l = load(&node.addr, c, secs, move |r| (Method::GET, key_path(r, space), Bytes::new())).await?;
                let mut j = l.to_json();
                j["x_ceiling"] = json!((l.rps() / ceiling_rps[i] * 100.0).round() / 100.0);
                self.record(&format!("get c={c}"), j);
            }
        }
        if self.wants("put") {
            let mut sync1 = 0.0;
            for durability in ["buffer", "sync"] {
                let (node, _) = start_kvs(
                    &self.tmp.path().join(format!("put-{durability}")),
                    &format!("durability: {durability}\n"),
                )?;
                for (i, c) in [1, 32].into_iter().enumerate() {
                    let l = load(&node.addr, c, secs, move |r| (Method::PUT, key_path(r, space), value(100))).await?;
                    let mut j = l.to_json();
                    j["x_ceiling"] = json!((l.rps() / ceiling_rps[i] * 100.0).round() / 100.0);
                    if durability == "sync" {
                        if c == 1 {
                            sync1 = l.rps();
                        } else {
                            j["x_c1"] = json!((l.rps() / sync1 * 10.0).round() / 10.0);
                        }
                    }
                    self.record(&format!("put {durability} c={c}"), j);
                }
                // Long enough for fjall to flush memtables and compact several times
                // meanwhile: the pauses those cause are what the tail is made of.
                let long = secs * 6.0;
                let l = load(&node.addr, 32, long, move |r| (Method::PUT, key_path(r, space), value(100))).await?;
                let mut j = l.to_json();
                j["secs"] = json!(long);
                j["max_ms"] = json!(l.pct(1.0));
                self.record(&format!("put {durability} c=32 sustained"), j);
                if durability == "buffer" {
                    let l =
                        load(&node.addr, 32, secs, move |r| (Method::PUT, key_path(r, space), value(10_240))).await?;
                    self.record("put buffer 10KB c=32", l.to_json());
                }
            }
        }
        Ok(())
    }

    /// GET, then PUT (buffer), at 32 connections against two nodes running at once,
    /// alternating (first, second, five times each) so that a machine that slows
    /// down mid-run slows both alike; records the medians and their ratio as `ratio`.
    async fn alternate(&mut self, specs: [Spec; 2], labels: [&str; 2], ratio: &str, space: usize) -> Res<()> {
        // Five rounds: PUT runs are bimodal (a run that meets a memtable flush is slower),
        // and the median of three still swung from 0.9x to 2.4x between two identical runs.
        const ROUNDS: usize = 5;
        for (op, name) in [(Method::GET, "get c=32"), (Method::PUT, "put buffer c=32")] {
            let runs = <[Vec<Load>; 2]>::try_from(self.series(&specs, op, space, ROUNDS).await?)
                .map_err(|_| "two series expected")?;
            self.record_medians(runs, [&format!("{name} {}", labels[0]), &format!("{name} {}", labels[1])], ratio);
        }
        Ok(())
    }

    /// `op` at 32 connections against each of `specs` in turn, `rounds` times over,
    /// on keys `0..space`: the runs against each.
    async fn series(&self, specs: &[Spec], op: Method, space: usize, rounds: usize) -> Res<Vec<Vec<Load>>> {
        let mut runs: Vec<Vec<Load>> = specs.iter().map(|_| Vec::new()).collect();
        for _ in 0..rounds {
            for (k, spec) in specs.iter().cloned().enumerate() {
                let op = op.clone();
                let make = move |r: &mut StdRng| {
                    let body = if op == Method::PUT { value(100) } else { Bytes::new() };
                    (op.clone(), key_path(r, space), body)
                };
                runs[k].push(load_spec(spec, 32, self.opts.load_secs, make).await?);
            }
        }
        Ok(runs)
    }

    /// Records the median run (by throughput) of each of two alternated series, the
    /// second with its throughput as a ratio of the first's under `ratio`.
    fn record_medians(&mut self, runs: [Vec<Load>; 2], names: [&str; 2], ratio: &str) {
        let [first, second] = runs.map(median);
        let mut j = second.to_json();
        j[ratio] = json!((second.rps() / first.rps() * 100.0).round() / 100.0);
        self.record(names[0], first.to_json());
        self.record(names[1], j);
    }

    /// kvs next to Redis and etcd on this machine, when they are installed (`apt-get
    /// install redis-server etcd-server`): GET at 32 connections (kvs, Redis, etcd),
    /// PUT at 32 connections acknowledged before fsync (kvs `buffer`, Redis AOF with
    /// `appendfsync everysec`) and after it (kvs `sync`, Redis `appendfsync always`,
    /// etcd, which fsyncs its log before it answers). Same keys, 100-byte values, every
    /// server preloaded with them, one request in flight per connection; etcd through
    /// its v3 JSON gateway (what a curl user gets). The servers of a row take turns,
    /// five rounds; medians, and on each other server's row `kvs_x`: kvs's throughput
    /// over its. Any failed request fails the scenario (a fast error is no throughput).
    async fn compare(&mut self) -> Res<()> {
        const ROUNDS: usize = 5;
        let space = if self.opts.quick { 10_000 } else { 100_000 };
        let dir = self.tmp.path().join("compare");
        let (kvs_buffer, _) = start_kvs(&dir.join("kvs-buffer"), "durability: buffer\n")?;
        let (kvs_sync, _) = start_kvs(&dir.join("kvs-sync"), "durability: sync\n")?;
        let [redis_ports @ .., client, peer] = free_ports::<4>()?;
        let mut servers = Vec::new();
        for ((name, fsync), port) in
            [("redis-everysec", "everysec"), ("redis-always", "always")].into_iter().zip(redis_ports)
        {
            let args = [
                "--port",
                &port.to_string(),
                "--bind",
                "127.0.0.1",
                "--dir",
                ".",
                "--save",
                "",
                "--appendonly",
                "yes",
                "--appendfsync",
                fsync,
            ]
            .map(String::from);
            let addr = format!("127.0.0.1:{port}");
            let Some(p) = start_server(&dir.join(name), "redis-server", &args, addr)? else {
                return self.skip("compare", "redis-server is not installed (apt-get install redis-server)");
            };
            servers.push((p, Proto::Redis, dir.join(name)));
        }
        let url = |port: u16| format!("http://127.0.0.1:{port}");
        let args = [
            "--name",
            "bench",
            "--data-dir",
            "data",
            "--listen-client-urls",
            &url(client),
            "--advertise-client-urls",
            &url(client),
            "--listen-peer-urls",
            &url(peer),
            "--initial-advertise-peer-urls",
            &url(peer),
            "--initial-cluster",
            &format!("bench={}", url(peer)),
        ]
        .map(String::from);
        let Some(p) = start_server(&dir.join("etcd"), "etcd", &args, format!("127.0.0.1:{client}"))? else {
            return self.skip("compare", "etcd is not installed (apt-get install etcd-server)");
        };
        servers.push((p, Proto::Etcd, dir.join("etcd")));
        let mut specs = Vec::new();
        for (p, proto, dir) in &mut servers {
            let spec = Spec { proto: *proto, ..Spec::kvs(&p.addr) };
            wait_ready(p, &spec, dir).await?;
            specs.push(spec);
        }
        let [redis_everysec, redis_always, etcd] = <[Spec; 3]>::try_from(specs).map_err(|_| "three servers")?;
        let (kvs_buffer, kvs_sync) = (Spec::kvs(&kvs_buffer.addr), Spec::kvs(&kvs_sync.addr));
        // Every key read exists (a miss costs less than a read), and every PUT
        // overwrites a key, on every server alike.
        for spec in [&kvs_buffer, &kvs_sync, &redis_everysec, &redis_always, &etcd] {
            preload_spec(spec, space, 100).await?;
        }
        let rows = [
            (
                "get c=32",
                Method::GET,
                vec![("kvs", kvs_buffer.clone()), ("redis", redis_everysec.clone()), ("etcd", etcd.clone())],
            ),
            (
                "put c=32 before fsync",
                Method::PUT,
                vec![("kvs buffer", kvs_buffer), ("redis everysec", redis_everysec)],
            ),
            (
                "put c=32 after fsync",
                Method::PUT,
                vec![("kvs sync", kvs_sync), ("redis always", redis_always), ("etcd", etcd)],
            ),
        ];
        for (name, op, row) in rows {
            let specs: Vec<Spec> = row.iter().map(|(_, s)| s.clone()).collect();
            let runs = self.series(&specs, op, space, ROUNDS).await?;
            for ((label, _), runs) in row.iter().zip(&runs) {
                let errors: u64 = runs.iter().map(|l| l.errors).sum();
                if errors > 0 {
                    return Err(format!("compare {name}: {label} failed {errors} requests").into());
                }
            }
            let medians: Vec<Load> = runs.into_iter().map(median).collect();
            let kvs_rps = medians[0].rps();
            for ((label, _), m) in row.iter().zip(&medians) {
                let mut j = m.to_json();
                if m.rps() > 0.0 && !label.starts_with("kvs") {
                    j["kvs_x"] = json!((kvs_rps / m.rps() * 100.0).round() / 100.0);
                }
                self.record(&format!("compare {name} {label}"), j);
            }
        }
        Ok(())
    }

    /// GET and PUT (buffer) at 32 connections on a node without client auth and on
    /// one with it (every request carries a token that is looked up and checked).
    /// Both nodes run at once and the loads alternate (off, on, five times each), so
    /// a machine that slows down mid-run slows both alike; medians are reported.
    async fn auth(&mut self) -> Res<()> {
        let space = if self.opts.quick { 10_000 } else { 100_000 };
        let management = "bench-management-token-0123456789abcdef";
        let file = self.tmp.path().join("management.token");
        std::fs::write(&file, management)?;
        let key = self.tmp.path().join("auth-cluster.key");
        std::fs::write(&key, kvs::auth::ClusterKeys::generate() + "\n")?;
        let (off, _) = start_kvs(&self.tmp.path().join("auth-off"), "durability: buffer\n")?;
        let (on, _) = start_kvs(
            &self.tmp.path().join("auth-on"),
            &format!(
                "durability: buffer\nclient_auth: true\nmanagement_token_file: {}\ncluster_key_file: {}\n",
                file.display(),
                key.display()
            ),
        )?;
        let mut c = Conn::open_as(&on.addr, Some(management)).await?;
        let body = r#"{"name":"bench","rules":[{"prefix":"","access":"write"}]}"#;
        let (status, answer) = c.call(Method::POST, "/acl/tokens", Bytes::from(body)).await?;
        if status != StatusCode::CREATED {
            return Err(format!("token not made: {status}").into());
        }
        let v: Value = serde_json::from_slice(&answer)?;
        let token = v["secret"].as_str().ok_or("no secret")?.to_string();
        let off = Spec::kvs(&off.addr);
        let on = Spec { token: Some(token), ..Spec::kvs(&on.addr) };
        preload_spec(&off, space, 100).await?;
        preload_spec(&on, space, 100).await?;
        self.alternate([off, on], ["no auth", "client_auth"], "x_no_auth", space).await
    }

    /// GET and PUT (buffer) at 32 kept-alive connections, plain and over TLS (a CA
    /// and node certificate made with the openssl CLI), alternating as in `auth`.
    async fn tls(&mut self) -> Res<()> {
        let dir = self.tmp.path().join("tls-files");
        std::fs::create_dir_all(&dir)?;
        let run = |args: &[&str]| -> Res<()> {
            let out = Command::new("openssl").args(args).current_dir(&dir).output();
            match out {
                Ok(o) if o.status.success() => Ok(()),
                Ok(o) => Err(format!("openssl {args:?}: {}", String::from_utf8_lossy(&o.stderr)).into()),
                Err(e) => Err(format!("the tls bench needs the openssl CLI: {e}").into()),
            }
        };
        let ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes"];
        run(&[
            &["req", "-x509"][..],
            &ec,
            &["-days", "2", "-subj", "/CN=bench-ca", "-keyout", "ca.key", "-out", "ca.crt"],
        ]
        .concat())?;
        run(&[&["req"][..], &ec, &["-subj", "/CN=node", "-keyout", "node.key", "-out", "node.csr"]].concat())?;
        std::fs::write(dir.join("ext.cnf"), "subjectAltName=IP:127.0.0.1\n")?;
        run(&[
            "x509",
            "-req",
            "-in",
            "node.csr",
            "-CA",
            "ca.crt",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-days",
            "2",
            "-out",
            "node.crt",
            "-extfile",
            "ext.cnf",
        ])?;
        let mut roots = rustls::RootCertStore::empty();
        use rustls::pki_types::pem::PemObject;
        for c in rustls::pki_types::CertificateDer::pem_file_iter(dir.join("ca.crt"))? {
            roots.add(c?)?;
        }
        let client = Arc::new(
            rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
                .with_safe_default_protocol_versions()?
                .with_root_certificates(roots)
                .with_no_client_auth(),
        );
        let space = if self.opts.quick { 10_000 } else { 100_000 };
        let (plain, _) = start_kvs(&self.tmp.path().join("tls-off"), "durability: buffer\n")?;
        let files = format!(
            "durability: buffer\ntls_cert_file: {0}/node.crt\ntls_key_file: {0}/node.key\ntls_ca_file: {0}/ca.crt\n",
            dir.display()
        );
        let (tls, _) = start_kvs(&self.tmp.path().join("tls-on"), &files)?;
        let on = Spec { tls: Some(client), ..Spec::kvs(&tls.addr) };
        let off = Spec::kvs(&plain.addr);
        preload_spec(&off, space, 100).await?;
        // The TLS node is preloaded through TLS connections.
        preload_spec(&on, space, 100).await?;
        self.alternate([off, on], ["plain", "tls"], "x_plain", space).await
    }

    /// The change feed: how long a write takes to reach a stream watching its prefix on
    /// the node written to and on its peer (with push lag measured alongside), then
    /// GET and PUT (buffer) on one node with and without 1,000 idle streams open.
    async fn changes(&mut self) -> Res<()> {
        let dir = self.tmp.path().join("changes");
        let cluster = "gossip_interval_min: 0.2\ngossip_interval_max: 0.4\nfailure_timeout: 3\nremoval_timeout: 6\n";
        let (a, _) = start_kvs(&dir.join("a"), &format!("node_id: a\n{cluster}"))?;
        let (b, _) = start_kvs(&dir.join("b"), &format!("node_id: b\nseed_nodes: [\"{}\"]\n{cluster}", a.addr))?;
        for n in [&a, &b] {
            wait_health(&n.addr, "2 members", |h| h["member_count"] == 2 && h["mode"] == "normal").await?;
        }
        let mut on_a = sse_open(&a.addr, "prefix=watch").await?;
        let mut on_b = sse_open(&b.addr, "prefix=watch").await?;
        let mut conn = Conn::open(&a.addr).await?;
        let mut gets = Conn::open(&b.addr).await?;
        let (mut same, mut other, mut lag) = (Vec::new(), Vec::new(), Vec::new());
        for i in 0..self.opts.lag_writes {
            let key = format!("watch/{i}");
            let t = Instant::now();
            conn.call(Method::PUT, &format!("/kv/{key}"), value(100)).await?;
            same.push(wait_event(&mut on_a, &key, t).await?);
            other.push(wait_event(&mut on_b, &key, t).await?);
            // Push lag of the next write, the way `lag` measures it (GET polling).
            let t = Instant::now();
            let key = format!("/kv/lag/{i}");
            conn.call(Method::PUT, &key, value(100)).await?;
            while gets.call(Method::GET, &key, Bytes::new()).await?.0 != StatusCode::OK {
                if t.elapsed() > Duration::from_secs(30) {
                    return Err("a write did not replicate within 30 s".into());
                }
            }
            lag.push(t.elapsed().as_micros() as u64);
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        for (name, mut v) in
            [("changes wake same node", same), ("changes wake other node", other), ("changes push lag", lag)]
        {
            v.sort_unstable();
            let l = Load { ops: v.len() as u64, secs: 1.0, lat_us: v, errors: 0 };
            self.record(
                name,
                json!({"writes": l.ops, "p50_ms": l.pct(0.5), "p99_ms": l.pct(0.99), "max_ms": l.pct(1.0)}),
            );
        }
        drop((a, b));

        // One node, loads alternating without and with 1,000 idle streams open (five
        // rounds each, medians): two nodes side by side share the disk, and one's
        // flushes and compactions stalled the other's PUTs for seconds at a time.
        let space = if self.opts.quick { 10_000 } else { 100_000 };
        let (node, _) = start_kvs(&dir.join("watched"), "durability: buffer\n")?;
        preload(&node.addr, space, 100).await?;
        let secs = self.opts.load_secs;
        for (op, name) in [(Method::GET, "get c=32"), (Method::PUT, "put buffer c=32")] {
            let mut runs: [Vec<Load>; 2] = [Vec::new(), Vec::new()];
            for _ in 0..5 {
                for (k, runs) in runs.iter_mut().enumerate() {
                    let mut idle = Vec::new();
                    for i in 0..1000 * k {
                        idle.push(sse_open(&node.addr, &format!("prefix=idle/{i}")).await?);
                    }
                    let want = idle.len() as u64;
                    let open = metric(&node.addr, "kvs_change_watchers").await?;
                    if open != want {
                        return Err(format!("{open} watchers open, expected {want}").into());
                    }
                    let op = op.clone();
                    let make = move |r: &mut StdRng| {
                        let body = if op == Method::PUT { value(100) } else { Bytes::new() };
                        (op.clone(), key_path(r, space), body)
                    };
                    runs.push(load(&node.addr, 32, secs, make).await?);
                    drop(idle);
                    let deadline = Instant::now() + Duration::from_secs(30);
                    while metric(&node.addr, "kvs_change_watchers").await? != 0 {
                        if Instant::now() > deadline {
                            return Err("the idle streams did not close".into());
                        }
                        tokio::time::sleep(Duration::from_millis(20)).await;
                    }
                }
            }
            self.record_medians(
                runs,
                [&format!("{name} no watchers"), &format!("{name} 1000 watchers")],
                "x_no_watchers",
            );
        }
        Ok(())
    }

    /// PUT (buffer) at 1 and 32 connections to one node of three, without `?ack` and
    /// with `?ack=all` (answered once both peers applied the write), alternating three
    /// times; medians.
    async fn ack(&mut self) -> Res<()> {
        let dir = self.tmp.path().join("ack");
        let cluster = "durability: buffer\ngossip_interval_min: 0.2\ngossip_interval_max: 0.4\nfailure_timeout: 3\nremoval_timeout: 6\n";
        let (a, _) = start_kvs(&dir.join("a"), &format!("node_id: a\n{cluster}"))?;
        let seed = format!("seed_nodes: [\"{}\"]\n{cluster}", a.addr);
        let (b, _) = start_kvs(&dir.join("b"), &format!("node_id: b\n{seed}"))?;
        let (c, _) = start_kvs(&dir.join("c"), &format!("node_id: c\n{seed}"))?;
        for n in [&a, &b, &c] {
            wait_health(&n.addr, "3 members", |h| h["member_count"] == 3 && h["mode"] == "normal").await?;
        }
        let space = if self.opts.quick { 10_000 } else { 100_000 };
        for conns in [1, 32] {
            let mut runs: [Vec<Load>; 2] = [Vec::new(), Vec::new()];
            for _ in 0..3 {
                for (k, runs) in runs.iter_mut().enumerate() {
                    let suffix = if k == 0 { "" } else { "?ack=all" };
                    let make =
                        move |r: &mut StdRng| (Method::PUT, format!("{}{suffix}", key_path(r, space)), value(100));
                    runs.push(load(&a.addr, conns, self.opts.load_secs, make).await?);
                }
            }
            let names = [format!("put buffer c={conns} 3 nodes"), format!("put buffer c={conns} 3 nodes ack=all")];
            self.record_medians(runs, [&names[0], &names[1]], "x_no_ack");
        }
        drop((a, b, c));
        Ok(())
    }

    /// The cost of TTL on the request path: PUT (buffer) at 32 connections without and
    /// with `?ttl=3600` (a version with an expiry also writes an `expiry` index entry),
    /// then GET of the keys written each way (a read checks the expiry), alternating
    /// five times on one node; medians.
    async fn ttl(&mut self) -> Res<()> {
        let (node, _) = start_kvs(&self.tmp.path().join("ttl"), "durability: buffer\n")?;
        let space = if self.opts.quick { 10_000 } else { 100_000 };
        // Every key read exists (a 404 costs less than a read).
        preload(&node.addr, space, 100).await?;
        preload_with(&Spec::kvs(&node.addr), space, 100, ("ttl/", "?ttl=3600")).await?;
        for (op, name) in [(Method::PUT, "put buffer c=32"), (Method::GET, "get c=32")] {
            let mut runs: [Vec<Load>; 2] = [Vec::new(), Vec::new()];
            for _ in 0..5 {
                for (k, runs) in runs.iter_mut().enumerate() {
                    let op = op.clone();
                    let make = move |r: &mut StdRng| {
                        let key = key_path(r, space);
                        match (k, op == Method::PUT) {
                            (0, true) => (Method::PUT, key, value(100)),
                            (_, true) => {
                                (Method::PUT, format!("{}?ttl=3600", key.replacen("/kv/", "/kv/ttl/", 1)), value(100))
                            }
                            (0, false) => (Method::GET, key, Bytes::new()),
                            (_, false) => (Method::GET, key.replacen("/kv/", "/kv/ttl/", 1), Bytes::new()),
                        }
                    };
                    runs.push(load(&node.addr, 32, self.opts.load_secs, make).await?);
                }
            }
            self.record_medians(runs, [name, &format!("{name} ttl")], "x_no_ttl");
        }
        Ok(())
    }

    /// Push lag, without and with a cluster key (every node-to-node request signed
    /// and verified).
    async fn lag(&mut self) -> Res<()> {
        self.lag_with("lag 3 nodes", "lag", "").await?;
        let key = self.tmp.path().join("cluster.key");
        std::fs::write(&key, kvs::auth::ClusterKeys::generate() + "\n")?;
        self.lag_with("lag 3 nodes, cluster key", "lag-key", &format!("cluster_key_file: {}\n", key.display())).await
    }

    async fn lag_with(&mut self, name: &str, sub: &str, extra: &str) -> Res<()> {
        let dir = self.tmp.path().join(sub);
        let cluster = format!(
            "gossip_interval_min: 0.2\ngossip_interval_max: 0.4\nfailure_timeout: 3\nremoval_timeout: 6\n{extra}"
        );
        let (a, _) = start_kvs(&dir.join("a"), &format!("node_id: a\n{cluster}"))?;
        let (b, _) = start_kvs(&dir.join("b"), &format!("node_id: b\nseed_nodes: [\"{}\"]\n{cluster}", a.addr))?;
        let (c, _) = start_kvs(&dir.join("c"), &format!("node_id: c\nseed_nodes: [\"{}\"]\n{cluster}", a.addr))?;
        for n in [&a, &b, &c] {
            wait_health(&n.addr, "3 members", |h| h["member_count"] == 3 && h["mode"] == "normal").await?;
        }
        let (mut ca, mut cb, mut cc) =
            (Conn::open(&a.addr).await?, Conn::open(&b.addr).await?, Conn::open(&c.addr).await?);
        let mut lags = Vec::with_capacity(self.opts.lag_writes);
        let interval = Duration::from_millis(5);
        for i in 0..self.opts.lag_writes {
            let tick = Instant::now();
            let p = format!("/kv/lag/{i}");
            ca.call(Method::PUT, &p, value(100)).await.map_err(|e| format!("lag PUT {i}: {e}"))?;
            let t = Instant::now();
            let mut pending = [true, true];
            while pending.iter().any(|x| *x) {
                for (j, conn) in [&mut cb, &mut cc].into_iter().enumerate() {
                    if pending[j]
                        && conn
                            .call(Method::GET, &p, Bytes::new())
                            .await
                            .map_err(|e| format!("lag GET {i} on {j}: {e}"))?
                            .0
                            == StatusCode::OK
                    {
                        pending[j] = false;
                    }
                }
                if t.elapsed() > Duration::from_secs(30) {
                    return Err("a write did not replicate within 30 s".into());
                }
            }
            lags.push(t.elapsed().as_micros() as u64);
            tokio::time::sleep(interval.saturating_sub(tick.elapsed())).await;
        }
        lags.sort_unstable();
        let l = Load { ops: lags.len() as u64, secs: 1.0, lat_us: lags, errors: 0 };
        self.record(name, json!({"writes": l.ops, "p50_ms": l.pct(0.5), "p99_ms": l.pct(0.99), "max_ms": l.pct(1.0)}));
        Ok(())
    }

    /// The main dataset (`--keys` keys) and the timestamp its versions start from. With
    /// `--dataset DIR` it is kept in DIR, with its key count and start in `DIR.json`
    /// (written once DIR is complete), and reused by the next run with as many keys.
    async fn dataset(&self) -> Res<(PathBuf, u64)> {
        let Some(dir) = self.opts.dataset.clone() else {
            let dir = self.tmp.path().join("dataset");
            let base = kvs::hlc::from_ms(kvs::clock::now_ms() - 3_600_000);
            if !dir.exists() {
                self.build_main(&dir, base).await?;
            }
            return Ok((dir, base));
        };
        let mut about = dir.clone().into_os_string();
        about.push(".json");
        let about = PathBuf::from(about);
        if about.exists() && dir.exists() {
            let v: Value = serde_json::from_slice(&std::fs::read(&about)?)?;
            if v["keys"].as_u64() != Some(self.opts.keys as u64) {
                return Err(format!("{} holds {} keys, not --keys {}", dir.display(), v["keys"], self.opts.keys).into());
            }
            let base = v["base"].as_u64().ok_or_else(|| format!("no base in {}", about.display()))?;
            return Ok((dir, base));
        }
        if dir.exists() {
            return Err(format!(
                "{} exists without {}: an unfinished build; remove it",
                dir.display(),
                about.display()
            )
            .into());
        }
        if about.exists() {
            std::fs::remove_file(&about)?;
        }
        let base = kvs::hlc::from_ms(kvs::clock::now_ms() - 3_600_000);
        self.build_main(&dir, base).await?;
        std::fs::write(&about, json!({"keys": self.opts.keys, "base": base}).to_string())?;
        Ok((dir, base))
    }

    async fn build_main(&self, dir: &Path, base: u64) -> Res<()> {
        let t = Instant::now();
        build_dataset(dir, self.opts.keys, base, &[], false).await?;
        if !self.opts.json {
            println!(
                "{:<28} {{\"keys\": {}, \"secs\": {:.1}}}",
                "(dataset built)",
                self.opts.keys,
                t.elapsed().as_secs_f64()
            );
        }
        Ok(())
    }

    async fn antientropy(&mut self) -> Res<()> {
        let (data, base) = self.dataset().await?;
        let dir = self.tmp.path().join("ae");
        std::fs::create_dir_all(dir.join("a"))?;
        std::fs::create_dir_all(dir.join("b"))?;
        copy_dir(&data, &dir.join("a/data"))?;
        copy_dir(&data, &dir.join("b/data"))?;
        // 100 keys differ: b holds a newer version, still older than the newest write.
        let mut rng = StdRng::seed_from_u64(3);
        let modified: Vec<usize> = (0..100).map(|_| rng.random_range(0..self.opts.keys - 1)).collect();
        {
            let d = dir.join("b/data");
            let (store, writer) =
                tokio::task::spawn_blocking(move || Store::open(&d, Durability::Buffer, DEFAULT_MAX_CLOCK_OFFSET_MS))
                    .await??;
            let records = modified
                .iter()
                .map(|&i| {
                    let ts = base + 2 * i as u64 + 1;
                    (
                        format!("users/u{}/items/i{}", i % 10_000, i),
                        Record::value(ts, Uuid::new_v4(), Bytes::from_static(b"{\"modified\":true}")),
                    )
                })
                .collect();
            writer.apply(records, 0, 0).await?;
            tokio::task::spawn_blocking(move || writer.close(&store)).await??;
        }
        // a syncs every 2 s, b never: one round of a's makes them identical. Its first
        // round comes once both nodes are past their start. (At 10M keys the round's
        // time still varies from run to run; BENCHMARKS.md has what is known.)
        let common = "gossip_interval_min: 0.1\ngossip_interval_max: 0.2\nfailure_timeout: 3\nremoval_timeout: 6\ncatchup_interval: 3600\n";
        let (b, _) = start_kvs(&dir.join("b"), &format!("node_id: b\nsync_interval: 3600\n{common}"))?;
        let (a, _) = start_kvs(
            &dir.join("a"),
            &format!("node_id: a\nsync_interval: 2\nseed_nodes: [\"{}\"]\n{common}", b.addr),
        )?;
        let h = wait_health(&a.addr, "a sync round that repairs", |h| {
            h["replication"]["sync_fetched"].as_u64() >= Some(100)
        })
        .await?;
        let (bytes, ms) = (
            h["replication"]["sync_bytes"].as_u64().unwrap_or(0),
            h["replication"]["last_repair_ms"].as_u64().unwrap_or(0),
        );
        let hb = health(&b.addr).await?;
        let identical = {
            let mut ca = Conn::open(&a.addr).await?;
            let mut all = true;
            for &i in &modified {
                let p = format!("/kv/users/u{}/items/i{}", i % 10_000, i);
                all &= ca.call(Method::GET, &p, Bytes::new()).await?.1.as_ref() == b"{\"modified\":true}";
            }
            all
        };
        self.record(
            "antientropy",
            json!({"keys": self.opts.keys, "differ": 100, "fetched": h["replication"]["sync_fetched"], "round_ms": ms,
                   "bytes": bytes, "identical": identical && hb["keys"] == h["keys"]}),
        );
        Ok(())
    }

    /// GET at 32 connections over the whole dataset (`--keys`, random keys) against
    /// the same on a 100,000-key dataset of the same layout, alternating three times
    /// (medians); and the large node's RSS at rest after the load.
    async fn scale(&mut self) -> Res<()> {
        let (data, _) = self.dataset().await?;
        let small_keys = 100_000.min(self.opts.keys);
        let small = self.tmp.path().join("dataset-small");
        if !small.exists() {
            build_dataset(&small, small_keys, kvs::hlc::from_ms(kvs::clock::now_ms() - 3_600_000), &[], false).await?;
        }
        let dir = self.tmp.path().join("scale");
        std::fs::create_dir_all(dir.join("big"))?;
        std::fs::create_dir_all(dir.join("small"))?;
        copy_dir(&data, &dir.join("big/data"))?;
        copy_dir(&small, &dir.join("small/data"))?;
        let (big, _) = start_kvs(&dir.join("big"), "node_id: big\n")?;
        let (little, _) = start_kvs(&dir.join("small"), "node_id: small\n")?;
        wait_health(&big.addr, "first request", |_| true).await?;
        wait_health(&little.addr, "first request", |_| true).await?;
        let (mut at_big, mut at_small) = (Vec::new(), Vec::new());
        let keys = self.opts.keys;
        for _ in 0..3 {
            let l = load(&little.addr, 32, self.opts.load_secs, move |r| {
                (Method::GET, key_path(r, small_keys), Bytes::new())
            })
            .await?;
            at_small.push((l.rps(), l.pct(0.99)));
            let l = load(&big.addr, 32, self.opts.load_secs, move |r| (Method::GET, key_path(r, keys), Bytes::new()))
                .await?;
            at_big.push((l.rps(), l.pct(0.99)));
        }
        let median = |v: &mut Vec<(f64, f64)>, i: usize| {
            let mut x: Vec<f64> = v.iter().map(|p| if i == 0 { p.0 } else { p.1 }).collect();
            x.sort_by(f64::total_cmp);
            x[x.len() / 2]
        };
        let (big_p99, small_p99) = (median(&mut at_big, 1), median(&mut at_small, 1));
        tokio::time::sleep(Duration::from_secs(2)).await;
        self.record(
            "scale get c=32",
            json!({"keys": keys, "rps": median(&mut at_big, 0).round(), "p99_ms": big_p99,
                   "small_keys": small_keys, "small_rps": median(&mut at_small, 0).round(), "small_p99_ms": small_p99,
                   "p99_ratio": ((big_p99 / small_p99) * 100.0).round() / 100.0,
                   "rss_at_rest_mb": big.rss_kib("VmRSS:") / 1024, "data_dir_mb": du_kib(&dir.join("big/data"))? / 1024}),
        );
        Ok(())
    }

    /// `kvsctl snapshot save` of a node holding the dataset, then `kvsctl snapshot
    /// restore` into a new data dir, and a node started on it (no seeds) serving
    /// every key.
    async fn snapshot(&mut self) -> Res<()> {
        // Values that compress like random data (the shared dataset's are all alike,
        // which would flatter the snapshot's size).
        let data = self.tmp.path().join("dataset-random");
        if !data.exists() {
            let base = kvs::hlc::from_ms(kvs::clock::now_ms() - 3_600_000);
            build_dataset(&data, self.opts.keys, base, &[], true).await?;
        }
        let dir = self.tmp.path().join("snap");
        std::fs::create_dir_all(dir.join("a"))?;
        copy_dir(&data, &dir.join("a/data"))?;
        let (a, _) = start_kvs(&dir.join("a"), "node_id: a\n")?;
        wait_health(&a.addr, "first request", |_| true).await?;
        let kvsctl = exe_dir()?.join("kvsctl");
        let file = dir.join("a.snap");
        let t = Instant::now();
        let saved = Command::new(&kvsctl)
            .args(["--addr", &a.addr, "--timeout", "60", "snapshot", "save"])
            .arg(&file)
            .output()?;
        if !saved.status.success() {
            return Err(format!("snapshot save: {}", String::from_utf8_lossy(&saved.stderr)).into());
        }
        let save_secs = t.elapsed().as_secs_f64();
        let bytes = std::fs::metadata(&file)?.len();
        let t = Instant::now();
        let restored = Command::new(&kvsctl)
            .args(["snapshot", "restore"])
            .arg(&file)
            .arg("--data-dir")
            .arg(dir.join("b/data"))
            .output()?;
        if !restored.status.success() {
            return Err(format!("snapshot restore: {}", String::from_utf8_lossy(&restored.stderr)).into());
        }
        let restore_secs = t.elapsed().as_secs_f64();
        let (b, _) = start_kvs(&dir.join("b"), "node_id: b\n")?;
        let h = wait_health(&b.addr, "the restored node", |_| true).await?;
        let data_dir_mb = du_kib(&dir.join("a/data"))? / 1024;
        self.record(
            "snapshot",
            json!({"keys": self.opts.keys, "save_secs": (save_secs * 100.0).round() / 100.0,
                   "restore_secs": (restore_secs * 100.0).round() / 100.0, "snapshot_mb": bytes / (1 << 20),
                   "data_dir_mb": data_dir_mb, "restored_keys": h["keys"]}),
        );
        drop(a);
        Ok(())
    }

    async fn bootstrap_and_restart(&mut self) -> Res<()> {
        let (data, _) = self.dataset().await?;
        let dir = self.tmp.path().join("bs");
        std::fs::create_dir_all(dir.join("a"))?;
        copy_dir(&data, &dir.join("a/data"))?;
        if self.wants("restart") {
            let (a, started) = start_kvs(&dir.join("a"), "node_id: a\n")?;
            wait_health(&a.addr, "first request", |_| true).await?;
            let first = started.elapsed();
            tokio::time::sleep(Duration::from_secs(2)).await;
            self.record(
                "restart",
                json!({"keys": self.opts.keys, "first_request_ms": first.as_millis(), "rss_at_rest_mb": a.rss_kib("VmRSS:") / 1024,
                       "pinned_mb": metric(&a.addr, "kvs_storage_pinned_bytes").await? / (1 << 20)}),
            );
        }
        if self.wants("bootstrap") {
            let common = "gossip_interval_min: 0.2\ngossip_interval_max: 0.4\nfailure_timeout: 3\nremoval_timeout: 6\nthrottle_delay_ms: 0\nfetch_delay_ms: 0\n";
            let (a, _) = start_kvs(&dir.join("a"), &format!("node_id: a\n{common}"))?;
            let (c, started) =
                start_kvs(&dir.join("c"), &format!("node_id: c\nseed_nodes: [\"{}\"]\n{common}", a.addr))?;
            let h = wait_health(&c.addr, "bootstrap done", |h| h["mode"] == "normal").await?;
            let secs = started.elapsed().as_secs_f64();
            self.record(
                "bootstrap",
                json!({"keys": h["keys"], "secs": (secs * 100.0).round() / 100.0, "keys_per_s": (h["keys"].as_f64().unwrap_or(0.0) / secs).round(),
                       "peak_rss_mb_source": a.rss_kib("VmHWM:") / 1024, "peak_rss_mb_new": c.rss_kib("VmHWM:") / 1024}),
            );
        }
        Ok(())
    }
}

fn main() -> std::process::ExitCode {
    let opts = match parse_opts() {
        Ok(o) => o,
        Err(e) => {
            eprintln!("kvs-bench: {e}");
            return std::process::ExitCode::from(2);
        }
    };
    let run = || -> Res<Value> {
        if !exe_dir()?.join("kvs").exists() {
            return Err("build kvs first: cargo build --release".into());
        }
        let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
        let mut bench = Bench { opts: opts.clone(), tmp: TempDir::new()?, results: serde_json::Map::new() };
        rt.block_on(async {
            if ["ceiling", "get", "put"].iter().any(|s| bench.wants(s)) {
                bench.http().await?;
            }
            if bench.wants("lag") {
                bench.lag().await?;
            }
            if bench.wants("auth") {
                bench.auth().await?;
            }
            if bench.wants("tls") {
                bench.tls().await?;
            }
            if bench.wants("changes") {
                bench.changes().await?;
            }
            if bench.wants("ack") {
                bench.ack().await?;
            }
            if bench.wants("ttl") {
                bench.ttl().await?;
            }
            if bench.wants("antientropy") {
                bench.antientropy().await?;
            }
            if bench.wants("bootstrap") || bench.wants("restart") {
                bench.bootstrap_and_restart().await?;
            }
            if bench.wants("snapshot") {
                bench.snapshot().await?;
            }
            if bench.wants("compare") {
                bench.compare().await?;
            }
            if bench.wants("scale") {
                bench.scale().await?;
            }
            Ok::<_, Err>(())
        })?;
        Ok(Value::Object(bench.results))
    };
    match run() {
        Ok(v) => {
            if opts.json {
                println!("{v:#}");
            }
            std::process::ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("kvs-bench: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}
