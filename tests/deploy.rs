//! Running kvs as operators do: systemd readiness, SIGHUP, metrics, and a real nginx
//! in front terminating TLS.

mod common;
use common::*;
use std::os::unix::net::UnixDatagram;
use std::process::Command;

fn recv_until(sock: &UnixDatagram, want: &str) -> Vec<String> {
    let mut seen = Vec::new();
    let mut buf = [0u8; 4096];
    sock.set_read_timeout(Some(DEADLINE)).unwrap();
    loop {
        let n = sock.recv(&mut buf).unwrap_or_else(|e| panic!("no {want:?} from kvs (saw {seen:?}): {e}"));
        let msg = String::from_utf8_lossy(&buf[..n]).into_owned();
        let done = msg.lines().any(|l| l == want);
        seen.push(msg);
        if done {
            return seen;
        }
    }
}

#[test]
fn systemd_readiness_watchdog_and_stopping() {
    let dir = tempfile::tempdir().unwrap();
    let sock_path = dir.path().join("notify.sock");
    let sock = UnixDatagram::bind(&sock_path).unwrap();
    let config = config_in(&dir.path().join("node"), "");
    let sock_env = sock_path.to_str().unwrap().to_string();
    let mut n = Node::start_config_env(
        &dir.path().join("node"),
        &config,
        &[("NOTIFY_SOCKET", &sock_env), ("WATCHDOG_USEC", "200000")],
    );
    let before_ready = recv_until(&sock, "READY=1");
    assert_eq!(before_ready.len(), 1, "READY=1 is the first message: {before_ready:?}");
    // READY=1 means the port answers.
    assert_eq!(n.get("/health").status, 200);
    // Watchdog pings every WATCHDOG_USEC / 2.
    recv_until(&sock, "WATCHDOG=1");
    recv_until(&sock, "WATCHDOG=1");
    signal(n.pid(), "TERM");
    recv_until(&sock, "STOPPING=1");
    assert!(n.wait_exit().success());
}

#[test]
fn ready_comes_only_after_the_port_answers() {
    // The listening line (port bound) is logged before READY=1 is sent, and the
    // log has both, in that order.
    let dir = tempfile::tempdir().unwrap();
    let sock_path = dir.path().join("notify.sock");
    let sock = UnixDatagram::bind(&sock_path).unwrap();
    let config = config_in(&dir.path().join("node"), "");
    let n =
        Node::start_config_env(&dir.path().join("node"), &config, &[("NOTIFY_SOCKET", sock_path.to_str().unwrap())]);
    recv_until(&sock, "READY=1");
    let http = std::net::TcpStream::connect(&n.addr);
    assert!(http.is_ok(), "connect right after READY=1");
}

#[test]
fn metrics_scrape_changes_with_traffic() {
    let dir = tempfile::tempdir().unwrap();
    let n = Node::start_in(dir.path(), "");
    let scrape = || {
        let r = n.get("/metrics");
        assert_eq!(r.status, 200);
        assert!(r.header("content-type").unwrap().starts_with("application/openmetrics-text"));
        r.text()
    };
    let value = |text: &str, series: &str| -> f64 {
        text.lines()
            .find(|l| l.starts_with(series) && l[series.len()..].starts_with(' '))
            .and_then(|l| l.rsplit(' ').next()?.parse().ok())
            .unwrap_or(0.0)
    };
    let before = scrape();
    for i in 0..5 {
        assert_eq!(n.put(&format!("/kv/m/{i}"), "1").status, 200);
    }
    n.delete("/kv/m/0");
    n.get("/kv/m/404");
    let after = scrape();
    let puts = r#"kvs_http_requests_total{route="kv",method="PUT",status="200"}"#;
    assert_eq!(value(&after, puts) - value(&before, puts), 5.0, "{after}");
    assert_eq!(value(&after, r#"kvs_http_requests_total{route="kv",method="GET",status="404"}"#), 1.0);
    assert_eq!(value(&after, "kvs_keys"), 4.0);
    assert_eq!(value(&after, "kvs_tombstones"), 1.0);
    assert_eq!(value(&after, r#"kvs_members{status="alive"}"#), 1.0);
    assert!(value(&after, "kvs_storage_disk_bytes") > 0.0);
    assert!(value(&after, r#"kvs_http_request_duration_seconds_count{route="kv"}"#) >= 7.0);
    for series in [
        "kvs_push_records_total",
        "kvs_sync_rounds_total{kind=\"regular\",outcome=\"ok\"}",
        "kvs_conflicts_resolved_total{rule=\"majority\"}",
        "kvs_push_queue_depth",
        "kvs_storage_block_reads_total{block=\"index\",from=\"disk\"}",
        "kvs_storage_pinned_bytes",
    ] {
        assert!(after.lines().any(|l| l.starts_with(series)), "{series} missing:\n{after}");
    }
}

#[test]
fn sighup_reloads_log_level_and_the_environment_overrides_it() {
    let dir = tempfile::tempdir().unwrap();
    let n = Node::start_in(dir.path(), "log_level: info\n");
    n.get("/health");
    let request_lines = |n: &Node| n.log().lines().filter(|l| l.contains("\"message\":\"request\"")).count();
    assert_eq!(request_lines(&n), 0, "no access lines at info");
    let text = std::fs::read_to_string(&n.config).unwrap().replace("log_level: info", "log_level: debug");
    std::fs::write(&n.config, text).unwrap();
    signal(n.pid(), "HUP");
    wait_for(DEADLINE, "the reload", || n.log().contains("SIGHUP: log_level reloaded").then_some(()));
    n.get("/health");
    wait_for(DEADLINE, "an access line", || (request_lines(&n) >= 1).then_some(()));
    // A broken config on SIGHUP is refused and the node keeps running.
    std::fs::write(&n.config, "port: [\n").unwrap();
    signal(n.pid(), "HUP");
    wait_for(DEADLINE, "the refusal", || n.log().contains("SIGHUP: config not reloaded").then_some(()));
    assert_eq!(n.get("/health").status, 200);

    let d2 = tempfile::tempdir().unwrap();
    let config = config_in(d2.path(), "log_level: warn\n");
    let n2 = Node::start_config_env(d2.path(), &config, &[("KVS_LOG_LEVEL", "debug")]);
    n2.get("/health");
    wait_for(DEADLINE, "an access line", || (request_lines(&n2) >= 1).then_some(()));
    let out = Command::new(BIN).arg(&config).env("KVS_LOG_LEVEL", "loud").output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("KVS_LOG_LEVEL"));
}

/// The client address in the access line of the request to `path`.
fn logged_client(n: &Node, path: &str) -> String {
    wait_for(DEADLINE, "the access line", || {
        n.log().lines().rev().find_map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).ok()?;
            (v["message"] == "request" && v["uri"] == path).then(|| v["client"].as_str().unwrap().to_string())
        })
    })
}

#[test]
fn forwarded_headers_are_believed_only_from_trusted_proxies() {
    let dir = tempfile::tempdir().unwrap();
    let n = Node::start_in(dir.path(), "trusted_proxies: [\"127.0.0.1\"]\n");
    let via = |path: &str, source: &str, xff: &str| {
        let out = Command::new("curl")
            .args(["-s", "-o", "/dev/null", "--interface", source, "-H"])
            .arg(format!("X-Forwarded-For: {xff}"))
            .arg(format!("http://{}{path}", n.addr))
            .status()
            .unwrap();
        assert!(out.success());
    };
    via("/kv/from-proxy", "127.0.0.1", "203.0.113.9");
    assert_eq!(logged_client(&n, "/kv/from-proxy"), "203.0.113.9");
    via("/kv/spoofed", "127.0.0.2", "203.0.113.9");
    assert_eq!(logged_client(&n, "/kv/spoofed"), "127.0.0.2");
}

#[test]
fn systemd_units_verify() {
    if Command::new("systemd-analyze").arg("--version").output().is_err() {
        assert!(std::env::var_os("CI").is_none(), "systemd-analyze is required in CI");
        eprintln!("skipped: systemd-analyze not installed");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    for unit in ["kvs.service", "kvs@.service"] {
        let text = std::fs::read_to_string(format!("{}/deploy/{unit}", env!("CARGO_MANIFEST_DIR"))).unwrap();
        // verify checks that ExecStart exists: point it at the binary under test.
        std::fs::write(dir.path().join(unit), text.replace("/usr/local/bin/kvs", BIN)).unwrap();
    }
    let inst = dir.path().join("kvs@node1.service");
    std::os::unix::fs::symlink(dir.path().join("kvs@.service"), &inst).unwrap();
    let out =
        Command::new("systemd-analyze").arg("verify").arg(dir.path().join("kvs.service")).arg(&inst).output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "systemd-analyze verify failed:\n{stderr}");
}

struct Nginx {
    child: std::process::Child,
    port: u16,
}

impl Drop for Nginx {
    fn drop(&mut self) {
        // SIGTERM: the master stops its workers too (SIGKILL would orphan them).
        // No wait_for here: a panic in drop while unwinding would abort.
        let _ = Command::new("kill").arg("-TERM").arg(self.child.id().to_string()).status();
        for _ in 0..250 {
            if matches!(self.child.try_wait(), Ok(Some(_))) {
                return;
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Starts nginx with the repository's deploy/nginx.conf in front of `upstream`.
fn nginx(dir: &std::path::Path, upstream: &str) -> Option<Nginx> {
    let Ok(out) = Command::new("nginx").arg("-v").output() else {
        assert!(std::env::var_os("CI").is_none(), "nginx is required in CI (.ci/run installs it)");
        eprintln!("skipped: nginx not installed");
        return None;
    };
    assert!(out.status.success());
    use std::os::unix::fs::PermissionsExt;
    std::fs::create_dir_all(dir).unwrap();
    // nginx's workers run as nobody when started by root: they must reach these files.
    std::fs::set_permissions(dir.parent().unwrap(), std::fs::Permissions::from_mode(0o755)).unwrap();
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755)).unwrap();
    let (cert, key) = (dir.join("cert.pem"), dir.join("key.pem"));
    let ok = Command::new("openssl")
        .args(["req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=localhost", "-keyout"])
        .arg(&key)
        .arg("-out")
        .arg(&cert)
        .output()
        .unwrap();
    assert!(ok.status.success(), "{}", String::from_utf8_lossy(&ok.stderr));
    // A port for nginx: bind, note, close (nginx cannot report an ephemeral port).
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let site = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/deploy/nginx.conf"))
        .unwrap()
        .replace("listen 443 ssl;", &format!("listen 127.0.0.1:{port} ssl;"))
        .replace("/etc/ssl/kvs/fullchain.pem", cert.to_str().unwrap())
        .replace("/etc/ssl/kvs/privkey.pem", key.to_str().unwrap())
        .replace("server 127.0.0.1:8080", &format!("server {upstream}"));
    std::fs::write(dir.join("kvs.conf"), site).unwrap();
    for sub in ["tmp", "logs"] {
        std::fs::create_dir_all(dir.join(sub)).unwrap();
        std::fs::set_permissions(dir.join(sub), std::fs::Permissions::from_mode(0o777)).unwrap();
    }
    let d = dir.display();
    let main = format!(
        "worker_processes 1;\ndaemon off;\npid {d}/nginx.pid;\nerror_log {d}/logs/error.log;\nevents {{}}\nhttp {{\n  \
         access_log {d}/logs/access.log;\n  client_body_temp_path {d}/tmp/body;\n  proxy_temp_path {d}/tmp/proxy;\n  \
         fastcgi_temp_path {d}/tmp/fcgi;\n  uwsgi_temp_path {d}/tmp/uwsgi;\n  scgi_temp_path {d}/tmp/scgi;\n  \
         include {d}/kvs.conf;\n}}\n"
    );
    std::fs::write(dir.join("nginx.conf"), main).unwrap();
    let child = Command::new("nginx")
        .arg("-p")
        .arg(dir)
        .arg("-c")
        .arg(dir.join("nginx.conf"))
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let n = Nginx { child, port };
    wait_for(DEADLINE, "nginx to listen", || std::net::TcpStream::connect(("127.0.0.1", port)).ok().map(|_| ()));
    Some(n)
}

/// One HTTPS request through nginx with curl; returns (status, body).
fn curl(port: u16, method: &str, path: &str, extra: &[&str]) -> (u16, String) {
    let out = Command::new("curl")
        .args(["-sk", "--path-as-is", "-o", "-", "-w", "\n%{http_code}", "-X", method])
        .args(extra)
        .arg(format!("https://127.0.0.1:{port}{path}"))
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (body, code) = text.rsplit_once('\n').unwrap();
    (code.parse().unwrap(), body.to_string())
}

#[test]
fn behind_nginx_with_tls() {
    let dir = tempfile::tempdir().unwrap();
    let n = Node::start_in(&dir.path().join("node"), "trusted_proxies: [\"127.0.0.1\"]\n");
    let Some(proxy) = nginx(&dir.path().join("nginx"), &n.addr) else { return };
    let p = proxy.port;
    assert_eq!(curl(p, "PUT", "/kv/users/john", &["-d", r#"{"a":1}"#]).0, 200);
    assert_eq!(curl(p, "GET", "/kv/users/john", &[]), (200, r#"{"a":1}"#.to_string()));
    assert_eq!(curl(p, "GET", "/health", &[]).0, 200);
    // Percent-encoded and tricky paths arrive intact (nginx does not re-normalise).
    assert_eq!(curl(p, "PUT", "/kv/a%20b/c%2Fd", &["-d", "1"]).0, 200);
    assert_eq!(n.get("/kv/a%20b/c/d").text(), "1", "the key kvs stored is exactly the client's");
    assert_eq!(curl(p, "PUT", "/kv/lit/%252e%252e", &["-d", "2"]).0, 200);
    assert_eq!(n.get("/kv/lit/%252e%252e").text(), "2");
    assert_eq!(curl(p, "PUT", "/kv/a/%2e%2e/b", &["-d", "3"]).0, 400, "kvs still judges the key");
    // Internal endpoints are refused at the proxy, however the path is spelled.
    for path in [
        "/internal/v2/gossip",
        "/members/join",
        "/members/",
        "/kv/../internal/v2/gossip",
        "/kv/%2e%2e/internal/v2/push",
    ] {
        let (status, body) = curl(p, "POST", path, &["-d", "{}"]);
        assert!(status == 404 || status == 400, "{path}: {status} {body}");
        assert!(!body.contains("members"), "{path} reached kvs: {body}");
    }
    // Oversize bodies get 413 from nginx, as JSON.
    let big = dir.path().join("big.json");
    std::fs::write(&big, format!("\"{}\"", "a".repeat(2 * 1024 * 1024))).unwrap();
    let (status, body) = curl(p, "PUT", "/kv/big", &["--data-binary", &format!("@{}", big.display())]);
    assert_eq!(status, 413);
    assert!(body.contains("\"error\""), "{body}");
    // The change feed streams through the proxy as it happens (nothing buffered): a
    // delete made after the stream opened arrives while the stream is still open.
    let mut sse = Command::new("curl")
        .args(["-skN", "-H", "Accept: text/event-stream"])
        .arg(format!("https://127.0.0.1:{p}/changes?prefix=users"))
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    let mut out = sse.stdout.take().unwrap();
    std::thread::spawn(move || {
        let mut buf = [0u8; 4096];
        while let Ok(k) = std::io::Read::read(&mut out, &mut buf) {
            if k == 0 || tx.send(String::from_utf8_lossy(&buf[..k]).into_owned()).is_err() {
                break;
            }
        }
    });
    let mut seen = String::new();
    let mut until = |want: &str| {
        let deadline = std::time::Instant::now() + DEADLINE;
        while !seen.contains(want) {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            match rx.recv_timeout(left) {
                Ok(chunk) => seen.push_str(&chunk),
                Err(_) => panic!("no {want:?} through nginx: {seen:?}"),
            }
        }
    };
    until("retry:");
    assert_eq!(curl(p, "DELETE", "/kv/users/john", &[]).0, 204);
    until("event: delete");
    let _ = sse.kill();
    let _ = sse.wait();
    assert_eq!(curl(p, "GET", "/kv/users/john", &[]).0, 404);
    let (status, body) = curl(p, "GET", "/changes?since=0&wait=1&prefix=users", &[]);
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("\"op\":\"delete\""), "{body}");
    // kvs logs the real client (curl binds 127.0.0.2), not the proxy, and ignores a
    // forwarded-for the client wrote itself.
    curl(p, "GET", "/kv/who", &["--interface", "127.0.0.2", "-H", "X-Forwarded-For: 6.6.6.6"]);
    assert_eq!(logged_client(&n, "/kv/who"), "127.0.0.2");
}
