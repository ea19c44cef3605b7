//! TLS with rustls (README "Security"): the node's certificate for its port (client
//! API and node-to-node alike), the CA it trusts when it calls peers over HTTPS, and,
//! with `tls_client_auth`, the client certificate peers must present on node-to-node
//! routes. Files are read at start (a bad one stops the start, exit 2) and again on
//! SIGHUP; after a reload, open connections finish their request and close, so every
//! client and peer is verified again against the new files.

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use rustls::{ClientConfig, RootCertStore, ServerConfig};
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

/// The TLS files of a config.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    /// The node's certificate chain (PEM), first the node's own.
    pub cert: PathBuf,
    /// Its private key (PEM).
    pub key: PathBuf,
    /// The CA certificates (PEM) trusted for peers: their server certificates, and
    /// their client certificates with `client_auth`.
    pub ca: PathBuf,
    /// Whether node-to-node routes need a client certificate from `ca`.
    pub client_auth: bool,
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, String> {
    let certs: Vec<_> = CertificateDer::pem_file_iter(path)
        .map_err(|e| format!("cannot read {}: {e}", path.display()))?
        .collect::<Result<_, _>>()
        .map_err(|e| format!("{}: not PEM certificates: {e}", path.display()))?;
    if certs.is_empty() {
        return Err(format!("{}: holds no certificate", path.display()));
    }
    Ok(certs)
}

fn key(path: &Path) -> Result<PrivateKeyDer<'static>, String> {
    PrivateKeyDer::from_pem_file(path).map_err(|e| format!("{}: no usable PEM private key: {e}", path.display()))
}

fn roots(path: &Path) -> Result<Arc<RootCertStore>, String> {
    let mut roots = RootCertStore::empty();
    for c in certs(path)? {
        roots.add(c).map_err(|e| format!("{}: not a usable CA certificate: {e}", path.display()))?;
    }
    Ok(Arc::new(roots))
}

impl TlsFiles {
    /// The server side: this node's certificate; with `client_auth`, client
    /// certificates from the CA are checked when presented (whether one is needed is
    /// decided per route: only node-to-node routes need one).
    pub fn server_config(&self) -> Result<ServerConfig, String> {
        let builder = ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .map_err(|e| e.to_string())?;
        let builder = if self.client_auth {
            let verifier = WebPkiClientVerifier::builder_with_provider(roots(&self.ca)?, provider())
                .allow_unauthenticated()
                .build()
                .map_err(|e| format!("{}: {e}", self.ca.display()))?;
            builder.with_client_cert_verifier(verifier)
        } else {
            builder.with_no_client_auth()
        };
        let mut config = builder.with_single_cert(certs(&self.cert)?, key(&self.key)?).map_err(|e| {
            format!("{} and {} do not make a usable pair: {e}", self.cert.display(), self.key.display())
        })?;
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        Ok(config)
    }

    /// The client side, for calls to peers: trusts the CA; with `client_auth`,
    /// presents this node's certificate.
    pub fn client_config(&self) -> Result<ClientConfig, String> {
        let builder = ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .map_err(|e| e.to_string())?
            .with_root_certificates(roots(&self.ca)?);
        // No ALPN here: the HTTPS connector sets it (and refuses a config that has it).
        if self.client_auth {
            builder.with_client_auth_cert(certs(&self.cert)?, key(&self.key)?).map_err(|e| e.to_string())
        } else {
            Ok(builder.with_no_client_auth())
        }
    }

    /// Checks every file at start: `(key, message)` naming the config key at fault.
    pub fn check(&self) -> Result<(), (&'static str, String)> {
        certs(&self.cert).map_err(|e| ("tls_cert_file", e))?;
        key(&self.key).map_err(|e| ("tls_key_file", e))?;
        roots(&self.ca).map_err(|e| ("tls_ca_file", e))?;
        let ca = self.ca.display().to_string();
        self.load().map(|_| ()).map_err(|e| (if e.starts_with(&ca) { "tls_ca_file" } else { "tls_key_file" }, e))
    }

    /// Both sides, as a start or a reload checks them.
    pub fn load(&self) -> Result<(Arc<ServerConfig>, Arc<ClientConfig>), String> {
        Ok((Arc::new(self.server_config()?), Arc::new(self.client_config()?)))
    }
}

/// The node's TLS state: what new connections use, replaced on SIGHUP.
pub struct Tls {
    files: TlsFiles,
    server: RwLock<Arc<ServerConfig>>,
    client: RwLock<Arc<ClientConfig>>,
    /// Counts reloads; open connections watch it and close after a reload, so every
    /// client is verified again against the new files.
    reloaded: tokio::sync::watch::Sender<u64>,
}

impl Tls {
    /// Reads the files.
    pub fn new(files: TlsFiles) -> Result<Tls, String> {
        let (server, client) = files.load()?;
        Ok(Tls {
            files,
            server: RwLock::new(server),
            client: RwLock::new(client),
            reloaded: tokio::sync::watch::Sender::new(0),
        })
    }

    /// Reads the files again; on error the old ones stay in use.
    pub fn reload(&self) -> Result<(), String> {
        let (server, client) = self.files.load()?;
        *self.server.write().unwrap_or_else(|p| p.into_inner()) = server;
        *self.client.write().unwrap_or_else(|p| p.into_inner()) = client;
        self.reloaded.send_modify(|n| *n += 1);
        Ok(())
    }

    /// A signal that changes at every reload (open connections close on it).
    pub fn reloads(&self) -> tokio::sync::watch::Receiver<u64> {
        self.reloaded.subscribe()
    }

    /// The acceptor for a new connection.
    pub fn acceptor(&self) -> tokio_rustls::TlsAcceptor {
        tokio_rustls::TlsAcceptor::from(self.server.read().unwrap_or_else(|p| p.into_inner()).clone())
    }

    /// The client config for new connections to peers.
    pub fn client(&self) -> Arc<ClientConfig> {
        self.client.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Whether node-to-node routes need a client certificate.
    pub fn client_auth(&self) -> bool {
        self.files.client_auth
    }
}

/// A request extension: the TLS connection it came on presented a client certificate
/// that the CA verified.
#[derive(Debug, Clone, Copy)]
pub struct VerifiedClient;

/// Whether the first bytes on a TLS port look like a plain-HTTP request (a method in
/// capitals), not a TLS handshake (which starts with 0x16).
pub fn looks_like_plain_http(first: &[u8]) -> bool {
    !first.is_empty() && first.iter().all(u8::is_ascii_uppercase)
}

/// The answer a plain-HTTP client gets on a TLS port before it is closed.
pub fn plain_http_answer() -> Vec<u8> {
    let body = r#"{"error":"this port speaks HTTPS (TLS): use https:// to reach it"}"#;
    format!(
        "HTTP/1.1 400 Bad Request\r\nContent-Type: application/json\r\nConnection: close\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_plain_http_request_is_told_apart_from_a_tls_handshake() {
        assert!(looks_like_plain_http(b"GET"));
        assert!(looks_like_plain_http(b"PUT"));
        assert!(!looks_like_plain_http(&[0x16, 0x03, 0x01]));
        assert!(!looks_like_plain_http(b""));
        let answer = plain_http_answer();
        let text = std::str::from_utf8(&answer).unwrap();
        let (head, body) = text.split_once("\r\n\r\n").unwrap();
        assert!(head.contains(&format!("Content-Length: {}", body.len())), "{body}");
        assert!(serde_json::from_str::<serde_json::Value>(body).unwrap()["error"].is_string());
    }
}
