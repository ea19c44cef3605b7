//! TLS with real processes (README "Security"): nodes serving HTTPS to clients and to
//! each other, with a CA made in the test (rcgen), and client certificates on
//! node-to-node routes with `tls_client_auth`.

mod common;
use common::*;
use rcgen::{BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair};
use std::path::Path;
use std::sync::Arc;

/// A CA: its certificate (PEM) and what signs with it.
struct Ca {
    cert: rcgen::Certificate,
    key: KeyPair,
}

impl Ca {
    fn new(name: &str) -> Ca {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name.push(DnType::CommonName, name);
        Ca { cert: params.self_signed(&key).unwrap(), key }
    }

    /// Writes a node certificate for 127.0.0.1 (server and client use), its key and
    /// `trusted`'s CA certificate into `dir`; returns the config lines.
    fn node_files(&self, dir: &Path, trusted: &Ca, client_auth: bool) -> String {
        std::fs::create_dir_all(dir).unwrap();
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(vec!["127.0.0.1".to_string(), "localhost".to_string()]).unwrap();
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth, ExtendedKeyUsagePurpose::ClientAuth];
        let cert = params.signed_by(&key, &self.cert, &self.key).unwrap();
        std::fs::write(dir.join("node.crt"), cert.pem()).unwrap();
        std::fs::write(dir.join("node.key"), key.serialize_pem()).unwrap();
        std::fs::write(dir.join("ca.crt"), trusted.cert.pem()).unwrap();
        format!(
            "tls_cert_file: {}\ntls_key_file: {}\ntls_ca_file: {}\ntls_client_auth: {client_auth}",
            dir.join("node.crt").display(),
            dir.join("node.key").display(),
            dir.join("ca.crt").display()
        )
    }

    /// How the harness reaches nodes with certificates from this CA.
    fn client(&self) -> Arc<rustls::ClientConfig> {
        let mut roots = rustls::RootCertStore::empty();
        roots.add(self.cert.der().clone()).unwrap();
        Arc::new(
            rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
                .with_safe_default_protocol_versions()
                .unwrap()
                .with_root_certificates(roots)
                .with_no_client_auth(),
        )
    }
}

fn start(d: &Dirs, id: &str, seeds: &[&str], ca: &Ca, files: &str) -> Node {
    Node::start_in_tls(&d.0.path().join(id), &cluster_config_with(id, seeds, files), ca.client())
}

#[test]
fn nodes_serve_and_replicate_over_https_and_a_plain_http_client_is_told_to_use_https() {
    let d = Dirs::new();
    let ca = Ca::new("kvs test CA");
    let n1 = start(&d, "n1", &[], &ca, &ca.node_files(&d.0.path().join("n1"), &ca, false));
    let n2 = start(&d, "n2", &[&n1.addr], &ca, &ca.node_files(&d.0.path().join("n2"), &ca, false));
    wait_members_alive(&n2, &["n1", "n2"]);
    wait_normal(&n2);
    assert_eq!(n1.put("/kv/secure", "\"yes\"").status, 200);
    wait_value(&n2, "/kv/secure", Some("\"yes\""));
    // Plain HTTP to the TLS port: a JSON 400 that says what to do.
    let plain = http(&n1.addr, "GET", "/health", None);
    plain.assert_error(400);
    assert!(plain.text().contains("HTTPS"), "{}", plain.text());
    // The node still serves after it.
    assert_eq!(n1.health()["status"], "ok");
}

#[test]
fn with_client_auth_a_node_with_a_certificate_from_another_ca_is_kept_out() {
    let d = Dirs::new();
    let (ours, theirs) = (Ca::new("our CA"), Ca::new("another CA"));
    let n1 = start(&d, "n1", &[], &ours, &ours.node_files(&d.0.path().join("n1"), &ours, true));
    let n2 = start(&d, "n2", &[&n1.addr], &ours, &ours.node_files(&d.0.path().join("n2"), &ours, true));
    wait_members_alive(&n1, &["n1", "n2"]);
    wait_normal(&n2);
    assert_eq!(n2.put("/kv/k", "1").status, 200);
    wait_value(&n1, "/kv/k", Some("1"));
    // n3 trusts our CA but holds a certificate from another: every call it makes to
    // n1 fails the handshake, so it never gets in.
    let n3 = start(&d, "n3", &[&n1.addr], &theirs, &theirs.node_files(&d.0.path().join("n3"), &ours, true));
    wait_gossip_rounds(&n1, 10);
    assert_eq!(members(&n1), vec![("n1".to_string(), "alive".to_string()), ("n2".to_string(), "alive".to_string())]);
    assert_eq!(n3.health()["member_count"], 1);
    // Clients need no certificate for the client API, but node-to-node routes do.
    assert_eq!(n1.get("/kv/k").text(), "1");
    let internal = n1.call("POST", kvs::protocol::routes::GOSSIP, Some(br#"{"members":[]}"#));
    internal.assert_error(401);
}

#[test]
fn bad_tls_settings_stop_the_start_with_one_line_naming_the_key() {
    let d = Dirs::new();
    let ca = Ca::new("kvs test CA");
    let good = ca.node_files(&d.0.path().join("files"), &ca, false);
    let line = |key: &str| good.lines().find(|l| l.starts_with(key)).unwrap().to_string();
    let garbage = d.0.path().join("garbage.pem");
    std::fs::write(&garbage, "not a certificate").unwrap();
    for (name, extra, key) in [
        ("no-key", format!("{}\n{}", line("tls_cert_file"), line("tls_ca_file")), "tls_key_file"),
        ("no-ca", format!("{}\n{}", line("tls_cert_file"), line("tls_key_file")), "tls_ca_file"),
        (
            "garbage-cert",
            format!("tls_cert_file: {}\n{}\n{}", garbage.display(), line("tls_key_file"), line("tls_ca_file")),
            "tls_cert_file",
        ),
        ("client-auth-alone", "tls_client_auth: true".to_string(), "tls_client_auth"),
    ] {
        let mut n = Node::spawn_in(&d.0.path().join(name), &extra);
        assert_eq!(n.wait_exit().code(), Some(2), "{name}");
        let log = n.log();
        assert!(log.contains(key), "{name}: {log}");
        assert_eq!(log.trim().lines().count(), 1, "{name}: {log}");
    }
}

/// A TLS connection that served one request and is kept alive (reads time out after
/// 200 ms while it stays open).
fn keep_alive(
    tls: &Arc<rustls::ClientConfig>,
    addr: &str,
) -> rustls::StreamOwned<rustls::ClientConnection, std::net::TcpStream> {
    use std::io::{Read, Write};
    let name = rustls::pki_types::ServerName::try_from("127.0.0.1").unwrap();
    let conn = rustls::ClientConnection::new(tls.clone(), name).unwrap();
    let sock = std::net::TcpStream::connect(addr).unwrap();
    sock.set_read_timeout(Some(std::time::Duration::from_millis(200))).unwrap();
    let mut s = rustls::StreamOwned::new(conn, sock);
    s.write_all(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
    let mut got = Vec::new();
    let mut b = [0u8; 4096];
    // The whole answer: the head, then Content-Length bytes.
    loop {
        let n = s.read(&mut b).unwrap_or(0);
        got.extend_from_slice(&b[..n]);
        let text = String::from_utf8_lossy(&got).to_string();
        if let Some((head, body)) = text.split_once("\r\n\r\n") {
            let len: usize = head
                .lines()
                .find_map(|l| l.to_ascii_lowercase().strip_prefix("content-length:").map(|v| v.trim().parse().unwrap()))
                .unwrap();
            if body.len() >= len {
                break;
            }
        }
        assert!(n > 0, "the connection closed before the answer");
    }
    s
}

/// Whether a TLS handshake with `addr`, trusting only `tls`'s roots, succeeds.
fn handshake_ok(tls: &Arc<rustls::ClientConfig>, addr: &str) -> bool {
    use std::io::Write;
    let name = rustls::pki_types::ServerName::try_from("127.0.0.1").unwrap();
    let conn = rustls::ClientConnection::new(tls.clone(), name).unwrap();
    let Ok(sock) = std::net::TcpStream::connect(addr) else { return false };
    sock.set_read_timeout(Some(DEADLINE)).unwrap();
    let mut s = rustls::StreamOwned::new(conn, sock);
    s.write_all(b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").is_ok() && s.flush().is_ok()
}

#[test]
fn sighup_reloads_the_certificates_for_new_connections() {
    let d = Dirs::new();
    let (old, new) = (Ca::new("old CA"), Ca::new("new CA"));
    let dir = d.0.path().join("n1");
    let n1 = start(&d, "n1", &[], &old, &old.node_files(&dir, &old, false));
    assert!(handshake_ok(&old.client(), &n1.addr));
    assert!(!handshake_ok(&new.client(), &n1.addr));
    // A kept-alive connection verified under the old files.
    let mut kept = keep_alive(&old.client(), &n1.addr);
    // The same files, now holding a certificate from the new CA.
    new.node_files(&dir, &new, false);
    signal(n1.pid(), "HUP");
    wait_for(DEADLINE, "the new certificate in use", || handshake_ok(&new.client(), &n1.addr).then_some(()));
    assert!(!handshake_ok(&old.client(), &n1.addr));
    // Open connections close after a reload: every client is verified again. (An idle
    // one would also close at the 10 s header timeout: the wait is shorter than that.)
    wait_for(std::time::Duration::from_secs(5), "the old connection closed", || {
        use std::io::Read;
        let mut b = [0u8; 1];
        match kept.read(&mut b) {
            Ok(0) => Some(()),
            Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => None,
            _ => Some(()),
        }
    });
    // A reload that fails keeps the certificates in use.
    std::fs::write(dir.join("node.crt"), "garbage").unwrap();
    signal(n1.pid(), "HUP");
    // (The config check at reload reads the TLS files too and refuses first.)
    wait_for(DEADLINE, "the failed reload logged", || n1.log().contains("not reloaded").then_some(()));
    assert!(handshake_ok(&new.client(), &n1.addr));
}

#[test]
fn the_production_example_runs_with_tokens_a_cluster_key_and_tls() {
    const MANAGEMENT: &str = "production-management-token-0123456789abcdef";
    let d = Dirs::new();
    let ca = Ca::new("production CA");
    let key = d.0.path().join("cluster.key");
    std::fs::write(&key, "q83vEjRWeJq83vEjRWeJq83vEjRWeJq83vEjRWeJq80=\n").unwrap();
    let token_file = d.0.path().join("management.token");
    std::fs::write(&token_file, MANAGEMENT).unwrap();
    let mut nodes: Vec<Node> = Vec::new();
    for id in ["n1", "n2", "n3"] {
        let files = ca.node_files(&d.0.path().join(id), &ca, true);
        let extra = format!(
            "{files}\nclient_auth: true\nmanagement_token_file: {}\ncluster_key_file: {}",
            token_file.display(),
            key.display()
        );
        let seeds: Vec<&str> = nodes.first().map(|n| vec![n.addr.as_str()]).unwrap_or_default();
        let mut n = start(&d, id, &seeds, &ca, &extra);
        n.token = Some(MANAGEMENT.to_string());
        nodes.push(n);
    }
    for n in &nodes {
        wait_members_alive(n, &["n1", "n2", "n3"]);
        wait_normal(n);
    }
    // A token made on n1 writes through n3 and reads through n2, within its prefix.
    let made =
        nodes[0].call("POST", "/acl/tokens", Some(br#"{"name":"app","rules":[{"prefix":"app/","access":"write"}]}"#));
    assert_eq!(made.status, 201, "{}", made.text());
    let secret = made.json()["secret"].as_str().unwrap().to_string();
    let auth = format!("Bearer {secret}");
    let as_app = |n: &Node, method: &str, path: &str, body: Option<&[u8]>| {
        let bytes = request(method, path, &[("Authorization", auth.as_str())], body);
        https_raw(n.tls.as_ref().unwrap(), &n.addr, &bytes, false)
    };
    wait_for(DEADLINE, "the token to work on n3", || {
        (as_app(&nodes[2], "PUT", "/kv/app/config", Some(b"{\"v\":1}")).status == 200).then_some(())
    });
    wait_for(DEADLINE, "the value on n2", || {
        (as_app(&nodes[1], "GET", "/kv/app/config", None).text() == "{\"v\":1}").then_some(())
    });
    as_app(&nodes[1], "PUT", "/kv/other", Some(b"1")).assert_error(403);
    // Without a token, a client gets 401; without a client certificate, node-to-node
    // routes get 401 whatever token the request carries.
    let bare = https_raw(
        nodes[1].tls.as_ref().unwrap(),
        &nodes[1].addr,
        b"GET /kv/app/config HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
        false,
    );
    bare.assert_error(401);
    nodes[1].call("POST", kvs::protocol::routes::GOSSIP, Some(br#"{"members":[]}"#)).assert_error(401);
}
