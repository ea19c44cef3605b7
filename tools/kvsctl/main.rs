//! kvsctl: the command-line client for kvs. Talks to one node's client API (HTTP or
//! HTTPS) like curl would, so everything it does a client can do; `snapshot restore`
//! alone works offline, on a data dir.
//!
//! ```text
//! kvsctl [--addr URL] [--token T] [--cacert CA.pem] [--json] COMMAND ...
//! ```
//! Exit status: 0 success, 1 error, 2 usage, 3 key (or token) not found.

mod client;

use bytes::Bytes;
use clap::{Parser, Subcommand};
use client::{Answer, Client};
use hyper::{Method, StatusCode};
use serde_json::{Value, json};
use std::io::{BufRead, IsTerminal, Read, Write};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

const AFTER_HELP: &str = "\
Examples:
  kvsctl put users/john '{\"name\":\"John\"}'
  kvsctl put sessions/ab12 @session.json --ttl 3600
  kvsctl get users/john
  kvsctl ls users/ -r --values
  kvsctl rm sessions -r
  kvsctl watch users -- sh -c 'cat >> changes.log'
  kvsctl status
  kvsctl snapshot save backup.snap
  kvsctl snapshot restore backup.snap --data-dir /var/lib/kvs-new

Exit status: 0 success, 1 error, 2 usage, 3 not found.";

/// Command-line client for kvs: keys, the change feed, the cluster, tokens.
#[derive(Parser)]
#[command(name = "kvsctl", version, after_help = AFTER_HELP)]
struct Cli {
    /// The node to talk to: http://host:port, https://host:port or host:port.
    #[arg(long, env = "KVS_ADDR", default_value = "http://127.0.0.1:8080", global = true)]
    addr: String,
    /// Client token (with client_auth on), sent as `Authorization: Bearer`.
    #[arg(long, env = "KVS_TOKEN", global = true, hide_env_values = true)]
    token: Option<String>,
    /// CA certificate (PEM) to trust for an https:// address.
    #[arg(long, global = true)]
    cacert: Option<PathBuf>,
    /// Machine-readable JSON output instead of text.
    #[arg(long, global = true)]
    json: bool,
    /// Seconds to wait for each answer.
    #[arg(long, default_value_t = 10.0, global = true)]
    timeout: f64,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Print a key's value (exit 3 when absent).
    Get { key: String },
    /// Write a key: VALUE is JSON text, @FILE reads it from a file, - from stdin.
    Put {
        key: String,
        value: String,
        /// Expire after this many seconds (1 to 315360000).
        #[arg(long)]
        ttl: Option<u64>,
        /// Write only if the current version is this uuid (an ETag), or `*`: any value.
        #[arg(long, conflicts_with = "if_absent")]
        if_match: Option<String>,
        /// Write only if the key holds no value (create).
        #[arg(long)]
        if_absent: bool,
        /// Answer once this many nodes (or `all`) applied the write.
        #[arg(long)]
        ack: Option<String>,
    },
    /// Delete a key, or with -r every key equal to or under a prefix.
    Rm {
        key: String,
        /// Every key equal to KEY or under KEY/ (with KEY `/`: every key).
        #[arg(short, long)]
        recursive: bool,
        /// Delete only if the current version is this uuid, or `*`.
        #[arg(long, conflicts_with = "recursive")]
        if_match: Option<String>,
        /// Answer once this many nodes (or `all`) applied the delete.
        #[arg(long, conflicts_with = "recursive")]
        ack: Option<String>,
    },
    /// List keys: one level under PREFIX like a directory, or with -r all of them.
    Ls {
        prefix: Option<String>,
        /// Every key under PREFIX, not one level.
        #[arg(short, long)]
        recursive: bool,
        /// With the values (implies -r).
        #[arg(long)]
        values: bool,
    },
    /// Follow changes under PREFIX; with `-- CMD...`, run CMD for each change with the
    /// event (JSON, value included) on its stdin.
    Watch {
        prefix: Option<String>,
        /// Start after this cursor (a `last_seq`); default: from now.
        #[arg(long)]
        since: Option<u64>,
        /// Stop after this many events.
        #[arg(long)]
        count: Option<u64>,
        #[arg(last = true)]
        cmd: Vec<String>,
    },
    /// Apply a transaction: FILE (or - for stdin) holds `{"ops": [...]}`.
    Txn {
        file: String,
        /// Answer once this many nodes (or `all`) applied every write.
        #[arg(long)]
        ack: Option<String>,
    },
    /// The members this node knows.
    Members,
    /// This node's /health.
    Health,
    /// Every member's health in one table.
    Status,
    /// Client tokens (client_auth on; admin).
    #[command(subcommand)]
    Token(TokenCommand),
    /// Print a new cluster key (for cluster_key_file).
    Keygen,
    /// Write every key under PREFIX (all keys without one) as JSON lines on stdout.
    Export { prefix: Option<String> },
    /// Write the keys of an export (FILE, or - for stdin) through the API, each only
    /// where the cluster holds nothing newer (no newer value, no newer delete).
    Import { file: String },
    /// Backups: save a node's data to a file, restore one into an empty data dir.
    #[command(subcommand)]
    Snapshot(SnapshotCommand),
}

#[derive(Subcommand)]
enum SnapshotCommand {
    /// Save a point-in-time copy of the node's data (GET /admin/snapshot; admin access
    /// with client auth on) to FILE. The file is checked whole before it is kept.
    Save { file: PathBuf },
    /// Restore FILE into DIR (absent or empty), offline. A node started on DIR with
    /// seed_nodes merges with the cluster before it serves; without, it serves the
    /// snapshot alone. Nothing is written unless the whole file checks out.
    Restore {
        file: PathBuf,
        /// The new node's data dir.
        #[arg(long)]
        data_dir: PathBuf,
    },
}

#[derive(Subcommand)]
enum TokenCommand {
    /// Make a token; its secret is printed this once.
    Create {
        /// A name to recognise it by.
        #[arg(long)]
        name: String,
        /// PREFIX=ACCESS (deny, read, write, admin); repeat; "" is every key.
        #[arg(long = "rule", required = true)]
        rules: Vec<String>,
        /// Expire after this many seconds.
        #[arg(long)]
        ttl: Option<u64>,
    },
    /// Every token, without secrets.
    List,
    /// One token (exit 3 when unknown).
    Show { id: String },
    /// Revoke a token on every node.
    Revoke { id: String },
}

/// Why kvsctl failed, and its exit status.
enum Fail {
    /// 1.
    Error(String),
    /// 3.
    NotFound(String),
}

type Res<T> = Result<T, Fail>;

impl From<String> for Fail {
    fn from(e: String) -> Fail {
        Fail::Error(e)
    }
}

impl From<&str> for Fail {
    fn from(e: &str) -> Fail {
        Fail::Error(e.to_string())
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("kvsctl: {e}");
            return ExitCode::from(1);
        }
    };
    match runtime.block_on(run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(Fail::Error(e)) => {
            eprintln!("kvsctl: {e}");
            ExitCode::from(1)
        }
        Err(Fail::NotFound(e)) => {
            eprintln!("kvsctl: {e}");
            ExitCode::from(3)
        }
    }
}

async fn run(cli: Cli) -> Res<()> {
    if !(cli.timeout > 0.0 && cli.timeout <= 86_400.0) {
        return Err(Fail::Error("--timeout: seconds, more than 0 and at most 86400".into()));
    }
    let timeout = Duration::from_secs_f64(cli.timeout);
    if let Command::Keygen = cli.command {
        println!("{}", kvs::auth::ClusterKeys::generate());
        return Ok(());
    }
    // Offline: no node to talk to.
    if let Command::Snapshot(SnapshotCommand::Restore { file, data_dir }) = &cli.command {
        return snapshot_restore(&Out { json: cli.json }, file, data_dir).await;
    }
    let c = Client::new(&cli.addr, cli.token.clone(), cli.cacert.as_deref(), timeout)?;
    let out = Out { json: cli.json };
    match cli.command {
        Command::Get { key } => get(&c, &out, &key).await,
        Command::Put { key, value, ttl, if_match, if_absent, ack } => {
            put(&c, &out, &key, &value, (ttl, if_match, if_absent, ack)).await
        }
        Command::Rm { key, recursive, if_match, ack } => rm(&c, &out, &key, recursive, if_match, ack).await,
        Command::Ls { prefix, recursive, values } => ls(&c, &out, prefix.as_deref(), recursive, values).await,
        Command::Watch { prefix, since, count, cmd } => watch(&c, &out, prefix.as_deref(), since, count, &cmd).await,
        Command::Txn { file, ack } => txn(&c, &out, &file, ack).await,
        Command::Members => members(&c, &out).await,
        Command::Health => health(&c, &out).await,
        Command::Status => status(&c, &out).await,
        Command::Token(t) => token(&c, &out, t).await,
        Command::Keygen => Ok(()),
        Command::Export { prefix } => export(&c, prefix.as_deref()).await,
        Command::Import { file } => import(&c, &out, &file).await,
        Command::Snapshot(SnapshotCommand::Save { file }) => snapshot_save(&c, &out, &file).await,
        Command::Snapshot(SnapshotCommand::Restore { .. }) => Ok(()),
    }
}

/// Text or JSON output on stdout.
struct Out {
    json: bool,
}

impl Out {
    fn json(&self, v: &Value) {
        println!("{v}");
    }
}

/// `/kv/<key>` with the key percent-encoded (a slash stays a separator either way).
fn kv_path(key: &str) -> Res<String> {
    let key = key.trim_matches('/');
    if key.is_empty() {
        return Err(Fail::Error("a key is needed".into()));
    }
    Ok(format!("/kv/{}", kvs::path::percent_encode(key)))
}

/// The answer if it is a success, else its error.
fn ok(a: Answer) -> Res<Answer> {
    if a.status.is_success() {
        Ok(a)
    } else if a.status == StatusCode::NOT_FOUND {
        Err(Fail::NotFound(a.error()))
    } else {
        Err(Fail::Error(a.error()))
    }
}

/// A value argument: JSON text, `@FILE` or `-` (stdin).
fn read_value(arg: &str) -> Res<Bytes> {
    let bytes = if arg == "-" {
        let mut v = Vec::new();
        std::io::stdin().read_to_end(&mut v).map_err(|e| format!("stdin: {e}"))?;
        v
    } else if let Some(file) = arg.strip_prefix('@') {
        std::fs::read(file).map_err(|e| format!("{file}: {e}"))?
    } else {
        arg.as_bytes().to_vec()
    };
    Ok(Bytes::from(bytes))
}

fn query(pairs: &[(&str, Option<String>)]) -> String {
    let q: Vec<String> =
        pairs.iter().filter_map(|(k, v)| v.as_ref().map(|v| format!("{k}={}", kvs::path::percent_encode(v)))).collect();
    if q.is_empty() { String::new() } else { format!("?{}", q.join("&")) }
}

async fn get(c: &Client, out: &Out, key: &str) -> Res<()> {
    let a = c.call(Method::GET, &kv_path(key)?, Bytes::new()).await?;
    if a.status == StatusCode::NOT_FOUND {
        return Err(Fail::NotFound(format!("{key}: not found")));
    }
    let a = ok(a)?;
    let value: Value = serde_json::from_slice(&a.body).map_err(|e| format!("{key}: the value is not JSON: {e}"))?;
    if out.json {
        let mut v = json!({
            "key": key.trim_matches('/'),
            "value": value,
            "uuid": a.header("etag").map(|e| e.trim_matches('"')),
            "timestamp": a.header("x-kvs-timestamp").and_then(|t| t.parse::<u64>().ok()),
            "version": a.header("x-kvs-version"),
        });
        if let Some(e) = a.header("x-kvs-expires").and_then(|t| t.parse::<u64>().ok()) {
            v["expires"] = json!(e);
        }
        out.json(&v);
    } else {
        println!("{}", serde_json::to_string_pretty(&value).unwrap_or_default());
    }
    Ok(())
}

type PutOptions = (Option<u64>, Option<String>, bool, Option<String>);

async fn put(c: &Client, out: &Out, key: &str, value: &str, opts: PutOptions) -> Res<()> {
    let (ttl, if_match, if_absent, ack) = opts;
    let body = read_value(value)?;
    let path = format!("{}{}", kv_path(key)?, query(&[("ttl", ttl.map(|t| t.to_string())), ("ack", ack)]));
    let a = c.call_with(Method::PUT, &path, body, condition(if_match, if_absent)).await?;
    let accepted = a.status == StatusCode::ACCEPTED;
    let a = ok(a)?;
    let v = a.json();
    if out.json {
        out.json(&v);
    } else {
        let mut line = format!("{key}: written, version {}", v["uuid"].as_str().unwrap_or("?"));
        if let Some(e) = v["expires"].as_u64() {
            line.push_str(&format!(", expires {e}"));
        }
        if let Some(n) = v["acked"].as_u64() {
            line.push_str(&format!(", on {n} nodes"));
        }
        println!("{line}");
    }
    if accepted {
        return Err(Fail::Error(format!("{key}: written, but not on as many nodes as asked in time")));
    }
    Ok(())
}

/// The condition headers of `--if-match` / `--if-absent`.
fn condition(if_match: Option<String>, if_absent: bool) -> Vec<(&'static str, String)> {
    match (if_match, if_absent) {
        (Some(m), _) if m == "*" => vec![("if-match", m)],
        (Some(m), _) => vec![("if-match", format!("\"{}\"", m.trim_matches('"')))],
        (None, true) => vec![("if-none-match", "*".into())],
        (None, false) => Vec::new(),
    }
}

async fn rm(
    c: &Client,
    out: &Out,
    key: &str,
    recursive: bool,
    if_match: Option<String>,
    ack: Option<String>,
) -> Res<()> {
    if recursive {
        let all = key.trim_matches('/').is_empty();
        let path = if all { "/kv/?recurse&all=true".to_string() } else { format!("{}?recurse", kv_path(key)?) };
        let a = ok(c.call(Method::DELETE, &path, Bytes::new()).await?)?;
        let v = a.json();
        if out.json {
            out.json(&v);
        } else {
            println!("deleted {} keys", v["deleted"].as_u64().unwrap_or(0));
        }
        return Ok(());
    }
    let path = format!("{}{}", kv_path(key)?, query(&[("ack", ack)]));
    let a = c.call_with(Method::DELETE, &path, Bytes::new(), condition(if_match, false)).await?;
    let accepted = a.status == StatusCode::ACCEPTED;
    let a = ok(a)?;
    if out.json {
        let v = if a.body.is_empty() { json!({ "deleted": key }) } else { a.json() };
        out.json(&v);
    } else {
        println!("{key}: deleted");
    }
    if accepted {
        return Err(Fail::Error(format!("{key}: deleted, but not on as many nodes as asked in time")));
    }
    Ok(())
}

/// `/kv/<prefix>` for a listing, `/kv/` for all keys.
fn list_base(prefix: Option<&str>) -> Res<String> {
    match prefix.map(|p| p.trim_matches('/')).filter(|p| !p.is_empty()) {
        Some(p) => kv_path(p),
        None => Ok("/kv/".to_string()),
    }
}

/// Reads a listing (`mode`: `keys`, `keys&separator=/` or `recurse`) page by page,
/// `limit` per page, and hands each page's items (keys or records) to `each`.
async fn pages(c: &Client, base: &str, mode: &str, limit: usize, mut each: impl FnMut(&Value) -> Res<()>) -> Res<()> {
    let items = if mode == "recurse" { "items" } else { "keys" };
    let mut after: Option<String> = None;
    loop {
        let page = match &after {
            Some(a) => format!("{base}?{mode}&limit={limit}&after={}", kvs::path::percent_encode(a)),
            None => format!("{base}?{mode}&limit={limit}"),
        };
        let v = ok(c.call(Method::GET, &page, Bytes::new()).await?)?.json();
        for item in v[items].as_array().into_iter().flatten() {
            each(item)?;
        }
        match v["next"].as_str() {
            Some(n) => after = Some(n.to_string()),
            None => return Ok(()),
        }
    }
}

async fn ls(c: &Client, out: &Out, prefix: Option<&str>, recursive: bool, values: bool) -> Res<()> {
    let base = list_base(prefix)?;
    let mode = if values {
        "recurse"
    } else if recursive {
        "keys"
    } else {
        "keys&separator=/"
    };
    let mut all = Vec::new();
    pages(c, &base, mode, 10_000, |item| {
        if out.json {
            all.push(item.clone());
        } else if values {
            println!("{}\t{}", item["key"].as_str().unwrap_or_default(), item["value"]);
        } else {
            println!("{}", item.as_str().unwrap_or_default());
        }
        Ok(())
    })
    .await?;
    if out.json {
        out.json(&Value::Array(all));
    }
    Ok(())
}

/// Longest long-poll `watch` asks for, in seconds.
const WATCH_WAIT: u64 = 60;

async fn watch(
    c: &Client,
    out: &Out,
    prefix: Option<&str>,
    since: Option<u64>,
    count: Option<u64>,
    cmd: &[String],
) -> Res<()> {
    let prefix = prefix.map(|p| p.trim_matches('/')).unwrap_or_default();
    let base = format!("/changes?prefix={}", kvs::path::percent_encode(prefix));
    let mut since = match since {
        Some(s) => s,
        // From now: the cursor the feed is at.
        None => ok(c.call(Method::GET, &base, Bytes::new()).await?)?.json()["last_seq"]
            .as_u64()
            .ok_or("the change feed answered without last_seq")?,
    };
    let mut seen = 0u64;
    loop {
        let path = format!("{base}&since={since}&wait={WATCH_WAIT}&values=true");
        let a =
            c.call_at(c.authority(), Method::GET, &path, Bytes::new(), Duration::from_secs(WATCH_WAIT + 15)).await?;
        if a.status == StatusCode::GONE {
            return Err(Fail::Error(format!(
                "{}; read the data again and watch from its current cursor (kvsctl watch without --since)",
                a.error()
            )));
        }
        let v = ok(a)?.json();
        for event in v["events"].as_array().into_iter().flatten() {
            if cmd.is_empty() {
                if out.json {
                    out.json(event);
                } else {
                    let value = event.get("value").map(|v| v.to_string()).unwrap_or_default();
                    println!(
                        "{} {} {value}",
                        event["op"].as_str().unwrap_or("?"),
                        event["key"].as_str().unwrap_or("?")
                    );
                }
                let _ = std::io::stdout().flush();
            } else {
                run_handler(cmd, event)?;
            }
            seen += 1;
            if count.is_some_and(|n| seen >= n) {
                return Ok(());
            }
        }
        since = v["last_seq"].as_u64().ok_or("the change feed answered without last_seq")?;
    }
}

/// Runs `cmd` with `event` on its stdin, like `consul watch`'s handler; a handler that
/// fails stops the watch.
fn run_handler(cmd: &[String], event: &Value) -> Res<()> {
    let mut child = std::process::Command::new(&cmd[0])
        .args(&cmd[1..])
        .stdin(std::process::Stdio::piped())
        .spawn()
        .map_err(|e| format!("{}: {e}", cmd[0]))?;
    if let Some(mut stdin) = child.stdin.take() {
        let _ = writeln!(stdin, "{event}");
    }
    let status = child.wait().map_err(|e| format!("{}: {e}", cmd[0]))?;
    if !status.success() {
        return Err(Fail::Error(format!("{}: {status}", cmd[0])));
    }
    Ok(())
}

async fn txn(c: &Client, out: &Out, file: &str, ack: Option<String>) -> Res<()> {
    let body = if file == "-" { read_value("-")? } else { read_value(&format!("@{file}"))? };
    let a = c.call(Method::POST, &format!("/txn{}", query(&[("ack", ack)])), body).await?;
    if a.status == StatusCode::CONFLICT {
        return Err(Fail::Error(a.error()));
    }
    let accepted = a.status == StatusCode::ACCEPTED;
    let v = ok(a)?.json();
    if out.json {
        out.json(&v);
    } else {
        for r in v["results"].as_array().into_iter().flatten() {
            let what = r["uuid"].as_str().map_or_else(|| "ok".to_string(), |u| format!("version {u}"));
            println!("{} {}: {what}", r["op"].as_str().unwrap_or("?"), r["key"].as_str().unwrap_or("?"));
        }
    }
    if accepted {
        return Err(Fail::Error("committed, but not on as many nodes as asked in time".into()));
    }
    Ok(())
}

/// Prints rows as a table with aligned columns.
fn table(header: &[&str], rows: &[Vec<String>]) {
    let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for row in rows {
        for (i, cell) in row.iter().enumerate() {
            widths[i] = widths[i].max(cell.chars().count());
        }
    }
    let line = |cells: Vec<String>| {
        let padded: Vec<String> = cells.iter().enumerate().map(|(i, c)| format!("{c:<w$}", w = widths[i])).collect();
        println!("{}", padded.join("  ").trim_end());
    };
    line(header.iter().map(|h| h.to_uppercase()).collect());
    for row in rows {
        line(row.clone());
    }
}

fn text(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        Value::Null => "-".into(),
        other => other.to_string(),
    }
}

async fn members(c: &Client, out: &Out) -> Res<()> {
    let v = ok(c.call(Method::GET, "/members/", Bytes::new()).await?)?.json();
    if out.json {
        out.json(&v);
        return Ok(());
    }
    let rows: Vec<Vec<String>> = v
        .as_array()
        .into_iter()
        .flatten()
        .map(|m| vec![text(&m["id"]), text(&m["address"]), text(&m["status"]), text(&m["joined_timestamp"])])
        .collect();
    table(&["id", "address", "status", "joined"], &rows);
    Ok(())
}

async fn health(c: &Client, out: &Out) -> Res<()> {
    let a = c.call(Method::GET, "/health", Bytes::new()).await?;
    let v = a.json();
    if out.json {
        out.json(&v);
    } else {
        for k in ["status", "node_id", "mode", "member_count", "keys", "tombstones", "last_seq", "version"] {
            println!("{k:<14}{}", text(&v[k]));
        }
        println!("{:<14}{} ms (ok: {})", "clock_offset", text(&v["clock"]["offset_ms"]), text(&v["clock"]["ok"]));
    }
    if !a.status.is_success() || v["status"] != "ok" {
        return Err(Fail::Error(format!("the node is not healthy: {}", text(&v["error"]))));
    }
    Ok(())
}

async fn status(c: &Client, out: &Out) -> Res<()> {
    let members = ok(c.call(Method::GET, "/members/", Bytes::new()).await?)?.json();
    let mut rows = Vec::new();
    let mut all = Vec::new();
    let mut unhealthy = 0;
    for m in members.as_array().into_iter().flatten() {
        let address = text(&m["address"]);
        // Each member at the address it advertises, with the same scheme and token.
        let h = match c.call_at(&address, Method::GET, "/health", Bytes::new(), Duration::from_secs(5)).await {
            Ok(a) => a.json(),
            Err(e) => json!({ "status": "unreachable", "error": e }),
        };
        if h["status"] != "ok" {
            unhealthy += 1;
        }
        rows.push(vec![
            text(&m["id"]),
            address.clone(),
            text(&m["status"]),
            text(&h["mode"]),
            h["clock"]["offset_ms"].as_i64().map_or("-".into(), |o| format!("{o} ms")),
            text(&h["keys"]),
            text(&h["last_contact"]).parse::<u64>().map_or("-".into(), |t| format!("{} ms ago", ago(kvs::hlc::ms(t)))),
            text(&h["status"]),
        ]);
        all.push(json!({ "member": m, "health": h }));
    }
    if out.json {
        out.json(&Value::Array(all));
    } else {
        table(&["id", "address", "member", "mode", "clock offset", "keys", "last sync", "health"], &rows);
    }
    if unhealthy > 0 {
        return Err(Fail::Error(format!("{unhealthy} member(s) not healthy")));
    }
    Ok(())
}

/// Milliseconds from `unix_ms` to now (0 if in the future).
fn ago(unix_ms: u64) -> u64 {
    kvs::clock::now_ms().saturating_sub(unix_ms)
}

async fn token(c: &Client, out: &Out, t: TokenCommand) -> Res<()> {
    match t {
        TokenCommand::Create { name, rules, ttl } => {
            let mut parsed = Vec::new();
            for r in rules {
                let (prefix, access) =
                    r.rsplit_once('=').ok_or_else(|| format!("--rule {r:?}: PREFIX=ACCESS, e.g. users/=read"))?;
                parsed.push(json!({ "prefix": prefix, "access": access }));
            }
            let mut body = json!({ "name": name, "rules": parsed });
            if let Some(ttl) = ttl {
                body["ttl_seconds"] = json!(ttl);
            }
            let v = ok(c.call(Method::POST, "/acl/tokens", Bytes::from(body.to_string())).await?)?.json();
            if out.json {
                out.json(&v);
            } else {
                println!("id      {}\nsecret  {}\n(the secret is shown this once)", text(&v["id"]), text(&v["secret"]));
            }
        }
        TokenCommand::List => {
            let v = ok(c.call(Method::GET, "/acl/tokens", Bytes::new()).await?)?.json();
            if out.json {
                out.json(&v);
            } else {
                let rows: Vec<Vec<String>> = v["tokens"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .map(|t| vec![text(&t["id"]), text(&t["name"]), rules_text(&t["rules"]), text(&t["expires"])])
                    .collect();
                table(&["id", "name", "rules", "expires"], &rows);
            }
        }
        TokenCommand::Show { id } => {
            let a =
                c.call(Method::GET, &format!("/acl/tokens/{}", kvs::path::percent_encode(&id)), Bytes::new()).await?;
            let v = ok(a)?.json();
            if out.json {
                out.json(&v);
            } else {
                for k in ["id", "name", "created", "expires"] {
                    println!("{k:<9}{}", text(&v[k]));
                }
                println!("{:<9}{}", "rules", rules_text(&v["rules"]));
            }
        }
        TokenCommand::Revoke { id } => {
            let path = format!("/acl/tokens/{}", kvs::path::percent_encode(&id));
            ok(c.call(Method::DELETE, &path, Bytes::new()).await?)?;
            if out.json {
                out.json(&json!({ "revoked": id }));
            } else {
                println!("{id}: revoked");
            }
        }
    }
    Ok(())
}

fn rules_text(rules: &Value) -> String {
    let parts: Vec<String> = rules
        .as_array()
        .into_iter()
        .flatten()
        .map(|r| format!("{}={}", r["prefix"].as_str().unwrap_or_default(), r["access"].as_str().unwrap_or_default()))
        .collect();
    parts.join(",")
}

/// A byte counter on stderr (of `len` bytes when known), when stderr is a terminal.
fn byte_progress(what: &'static str, len: Option<u64>) -> indicatif::ProgressBar {
    if !std::io::stderr().is_terminal() {
        return indicatif::ProgressBar::hidden();
    }
    let (bar, template) = match len {
        Some(len) => (indicatif::ProgressBar::new(len), "{bar:30} {msg}: {bytes}/{total_bytes} ({bytes_per_sec})"),
        None => (indicatif::ProgressBar::new_spinner(), "{spinner} {msg}: {bytes} ({bytes_per_sec})"),
    };
    let bar = bar.with_message(what);
    if let Ok(style) = indicatif::ProgressStyle::with_template(template) {
        bar.set_style(style);
    }
    bar.enable_steady_tick(Duration::from_millis(200));
    bar
}

/// Reads a whole snapshot file: checksum, then every entry. Returns its facts and
/// counts. Blocking.
fn inspect_snapshot(path: &std::path::Path) -> Result<(kvs::snapshot::Facts, u64, u64), String> {
    use kvs::snapshot::{Entry, SnapshotReader, TRAILER_LEN, verify_file};
    use std::io::Seek;
    let mut f = std::fs::File::open(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let len = verify_file(&mut f).map_err(|e| e.to_string())?;
    f.rewind().map_err(|e| e.to_string())?;
    let mut r = SnapshotReader::open(std::io::BufReader::new(f).take(len - TRAILER_LEN)).map_err(|e| e.to_string())?;
    let (mut records, mut certificates) = (0, 0);
    while let Some(e) = r.next_entry().map_err(|e| e.to_string())? {
        match e {
            Entry::Record(..) => records += 1,
            Entry::Certificate(..) => certificates += 1,
        }
    }
    Ok((r.facts().clone(), records, certificates))
}

async fn snapshot_save(c: &Client, out: &Out, file: &std::path::Path) -> Res<()> {
    let partial = {
        let mut name = file.as_os_str().to_owned();
        name.push(".partial");
        PathBuf::from(name)
    };
    let mut w =
        std::io::BufWriter::new(std::fs::File::create(&partial).map_err(|e| format!("{}: {e}", partial.display()))?);
    let bar = byte_progress("snapshot", None);
    let started = std::time::Instant::now();
    let got = c
        .download("/admin/snapshot", |chunk| {
            bar.inc(chunk.len() as u64);
            w.write_all(chunk).map_err(|e| format!("{}: {e}", partial.display()))
        })
        .await;
    bar.finish_and_clear();
    let checked = match got {
        Ok(None) => w
            .into_inner()
            .map_err(|e| e.to_string())
            .and_then(|f| f.sync_all().map_err(|e| e.to_string()))
            .and_then(|()| inspect_snapshot(&partial))
            .map_err(|e| Fail::Error(format!("the snapshot did not arrive whole ({e}); nothing kept"))),
        Ok(Some(answer)) => Err(Fail::Error(answer.error())),
        Err(e) => Err(Fail::Error(e)),
    };
    let (facts, records, certificates) = match checked {
        Ok(v) => v,
        Err(e) => {
            let _ = std::fs::remove_file(&partial);
            return Err(e);
        }
    };
    std::fs::rename(&partial, file).map_err(|e| format!("{}: {e}", file.display()))?;
    let bytes = std::fs::metadata(file).map(|m| m.len()).unwrap_or(0);
    let seconds = started.elapsed().as_secs_f64();
    if out.json {
        out.json(&json!({ "file": file.display().to_string(), "bytes": bytes, "records": records,
            "certificates": certificates, "node_id": facts.node_id, "created_ms": facts.created_ms, "seconds": seconds }));
    } else {
        println!(
            "saved {}: {records} records, {certificates} certificates of purged deletes, {bytes} bytes, from node {} in {seconds:.1} s",
            file.display(),
            facts.node_id
        );
    }
    Ok(())
}

async fn snapshot_restore(out: &Out, file: &std::path::Path, dir: &std::path::Path) -> Res<()> {
    let len = std::fs::metadata(file).map_err(|e| format!("{}: {e}", file.display()))?.len();
    let bar = byte_progress("restore", Some(len));
    let b = bar.clone();
    let restored = kvs::snapshot::restore(file.to_path_buf(), dir.to_path_buf(), move |n| b.set_position(n)).await;
    bar.finish_and_clear();
    let r = restored.map_err(|e| Fail::Error(format!("{}: {e}; nothing was restored", file.display())))?;
    if out.json {
        out.json(&json!({ "data_dir": dir.display().to_string(), "records": r.records,
            "certificates": r.certificates, "node_id": r.facts.node_id, "created_ms": r.facts.created_ms }));
    } else {
        println!(
            "restored {} records and {} certificates of purged deletes from node {} (snapshot taken {} ms ago) into {}.\n\
             Start kvs with data_dir {}: with seed_nodes it merges with the cluster before it serves (mode syncing); \
             without, it serves the snapshot alone.",
            r.records,
            r.certificates,
            r.facts.node_id,
            ago(r.facts.created_ms),
            dir.display(),
            dir.display()
        );
    }
    Ok(())
}

/// A counter on stderr while long work runs, when stderr is a terminal.
fn progress(what: &'static str) -> indicatif::ProgressBar {
    if !std::io::stderr().is_terminal() {
        return indicatif::ProgressBar::hidden();
    }
    let bar = indicatif::ProgressBar::new_spinner().with_message(what);
    if let Ok(style) = indicatif::ProgressStyle::with_template("{spinner} {msg}: {pos} keys ({per_sec})") {
        bar.set_style(style);
    }
    bar.enable_steady_tick(Duration::from_millis(200));
    bar
}

async fn export(c: &Client, prefix: Option<&str>) -> Res<()> {
    let base = list_base(prefix)?;
    let bar = progress("exported");
    let mut stdout = std::io::BufWriter::new(std::io::stdout().lock());
    pages(c, &base, "recurse", 1000, |item| {
        writeln!(stdout, "{item}").map_err(|e| format!("stdout: {e}"))?;
        bar.inc(1);
        Ok(())
    })
    .await?;
    stdout.flush().map_err(|e| format!("stdout: {e}"))?;
    bar.finish_and_clear();
    Ok(())
}

async fn import(c: &Client, out: &Out, file: &str) -> Res<()> {
    let reader: Box<dyn BufRead> = if file == "-" {
        Box::new(std::io::BufReader::new(std::io::stdin()))
    } else {
        Box::new(std::io::BufReader::new(std::fs::File::open(file).map_err(|e| format!("{file}: {e}"))?))
    };
    let bar = progress("imported");
    let (mut imported, mut newer, mut expired) = (0u64, 0u64, 0u64);
    for (i, line) in reader.lines().enumerate() {
        let at = format!("{file}:{}", i + 1);
        let line = line.map_err(|e| format!("{at}: {e}"))?;
        if line.trim().is_empty() {
            continue;
        }
        let item: Value = serde_json::from_str(&line).map_err(|e| format!("{at}: not JSON: {e}"))?;
        let key = item["key"].as_str().ok_or_else(|| format!("{at}: no \"key\""))?;
        let version = item["version"].as_str().ok_or_else(|| format!("{at}: no \"version\""))?;
        version.parse::<u64>().map_err(|_| format!("{at}: \"version\" is not a version: {version:?}"))?;
        let value = item.get("value").ok_or_else(|| format!("{at}: no \"value\""))?;
        // What is left of a TTL; an expired one is not written at all.
        let ttl = match item["expires"].as_u64() {
            Some(e) if e <= kvs::clock::now_ms() => {
                expired += 1;
                continue;
            }
            Some(e) => Some(e.saturating_sub(kvs::clock::now_ms()).div_ceil(1000).max(1)),
            None => None,
        };
        let path = format!("{}{}", kv_path(key)?, query(&[("ttl", ttl.map(|t| t.to_string()))]));
        let condition = vec![("x-kvs-if-older-than", version.to_string())];
        let a = c.call_with(Method::PUT, &path, Bytes::from(value.to_string()), condition).await?;
        match a.status {
            StatusCode::PRECONDITION_FAILED => newer += 1,
            s if s.is_success() => imported += 1,
            _ => return Err(Fail::Error(format!("{at}: {key}: {}", a.error()))),
        }
        bar.inc(1);
    }
    bar.finish_and_clear();
    if out.json {
        out.json(&json!({ "imported": imported, "skipped_newer": newer, "skipped_expired": expired }));
    } else {
        println!("imported {imported}; skipped {newer} held newer there, {expired} expired");
    }
    Ok(())
}
