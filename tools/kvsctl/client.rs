//! kvsctl's HTTP client: one node's client API over HTTP, or HTTPS trusting the CA
//! given with `--cacert`; the token, when given, as `Authorization: Bearer`; a
//! timeout on every call.

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::{HeaderMap, Method, Request, StatusCode, Uri};
use hyper_util::client::legacy::Client as Pool;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use std::path::Path;
use std::time::Duration;

/// Largest answer read (a listing page of values is at most 4 MiB, a change feed
/// page about as much).
const MAX_ANSWER_BYTES: usize = 64 * 1024 * 1024;

/// An answer: status, headers, the whole body.
pub struct Answer {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Bytes,
}

impl Answer {
    /// The body as JSON (`Null` when it is not JSON).
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).unwrap_or(serde_json::Value::Null)
    }

    /// The `error` of a JSON error body, or the status.
    pub fn error(&self) -> String {
        match self.json()["error"].as_str() {
            Some(e) => format!("{e} ({})", self.status.as_u16()),
            None => format!("the node answered {}", self.status),
        }
    }

    /// A header as text.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }
}

enum Transport {
    Http(Pool<HttpConnector, Full<Bytes>>),
    Https(Pool<hyper_rustls::HttpsConnector<HttpConnector>, Full<Bytes>>),
}

/// A client for one node (and, for `status`, its peers at their advertised addresses).
pub struct Client {
    scheme: &'static str,
    authority: String,
    token: Option<String>,
    timeout: Duration,
    transport: Transport,
}

fn connector() -> HttpConnector {
    let mut c = HttpConnector::new();
    c.set_nodelay(true);
    c.set_connect_timeout(Some(Duration::from_secs(5)));
    c
}

/// The TLS client config trusting the CA certificates in `cacert` (PEM).
fn tls_config(cacert: &Path) -> Result<rustls::ClientConfig, String> {
    use rustls_pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    let certs = rustls_pki_types::CertificateDer::pem_file_iter(cacert)
        .map_err(|e| format!("--cacert {}: {e}", cacert.display()))?;
    for cert in certs {
        let cert = cert.map_err(|e| format!("--cacert {}: {e}", cacert.display()))?;
        roots.add(cert).map_err(|e| format!("--cacert {}: {e}", cacert.display()))?;
    }
    if roots.is_empty() {
        return Err(format!("--cacert {}: no certificate in it", cacert.display()));
    }
    let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
    Ok(rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_root_certificates(roots)
        .with_no_client_auth())
}

impl Client {
    /// A client for `addr` (`http://host:port`, `https://host:port`, or `host:port`
    /// for HTTP).
    pub fn new(addr: &str, token: Option<String>, cacert: Option<&Path>, timeout: Duration) -> Result<Client, String> {
        let (scheme, rest) = match addr.split_once("://") {
            Some(("http", rest)) => ("http", rest),
            Some(("https", rest)) => ("https", rest),
            Some((other, _)) => return Err(format!("--addr: http:// or https://, not {other}://")),
            None => ("http", addr),
        };
        let authority = rest.trim_end_matches('/').to_string();
        if authority.is_empty() || authority.contains('/') {
            return Err(format!("--addr: host:port, optionally after http:// or https://, not {addr:?}"));
        }
        let transport = match (scheme, cacert) {
            ("https", Some(ca)) => {
                let mut http = connector();
                http.enforce_http(false);
                let https = hyper_rustls::HttpsConnectorBuilder::new()
                    .with_tls_config(tls_config(ca)?)
                    .https_only()
                    .enable_http1()
                    .wrap_connector(http);
                Transport::Https(Pool::builder(TokioExecutor::new()).build(https))
            }
            ("https", None) => return Err("an https:// address needs --cacert (the cluster's CA certificate)".into()),
            _ => Transport::Http(Pool::builder(TokioExecutor::new()).build(connector())),
        };
        Ok(Client { scheme, authority, token, timeout, transport })
    }

    /// The node's address as given (`host:port`).
    pub fn authority(&self) -> &str {
        &self.authority
    }

    /// One call to this node.
    pub async fn call(&self, method: Method, path: &str, body: Bytes) -> Result<Answer, String> {
        self.call_with(method, path, body, Vec::new()).await
    }

    /// One call to this node with extra headers.
    pub async fn call_with(
        &self,
        method: Method,
        path: &str,
        body: Bytes,
        headers: Vec<(&'static str, String)>,
    ) -> Result<Answer, String> {
        self.request(&self.authority, method, path, (body, headers), self.timeout).await
    }

    /// One call to `authority` (another member), with its own timeout.
    pub async fn call_at(
        &self,
        authority: &str,
        method: Method,
        path: &str,
        body: Bytes,
        timeout: Duration,
    ) -> Result<Answer, String> {
        self.request(authority, method, path, (body, Vec::new()), timeout).await
    }

    /// A GET whose answer is streamed into `sink` chunk by chunk (a snapshot): the
    /// timeout applies to each chunk, not to the whole transfer. A status other than
    /// 200 comes back as that answer, whole.
    pub async fn download(
        &self,
        path: &str,
        mut sink: impl FnMut(&[u8]) -> Result<(), String>,
    ) -> Result<Option<Answer>, String> {
        let authority = &self.authority;
        let uri: Uri = format!("{}://{authority}{path}", self.scheme).parse().map_err(|e| format!("{path}: {e}"))?;
        let mut req = Request::builder().method(Method::GET).uri(uri);
        if let Some(t) = &self.token {
            req = req.header(hyper::header::AUTHORIZATION, format!("Bearer {t}"));
        }
        let req = req.body(Full::new(Bytes::new())).map_err(|e| e.to_string())?;
        let call = async {
            match &self.transport {
                Transport::Http(p) => p.request(req).await,
                Transport::Https(p) => p.request(req).await,
            }
            .map_err(|e| format!("{authority}: {}", source_chain(&e)))
        };
        let timeout = self.timeout;
        let late = || format!("{authority}: no answer within {timeout:?}");
        let resp = tokio::time::timeout(timeout, call).await.map_err(|_| late())??;
        let (parts, mut body) = resp.into_parts();
        if parts.status != hyper::StatusCode::OK {
            let body = tokio::time::timeout(timeout, Limited::new(body, MAX_ANSWER_BYTES).collect())
                .await
                .map_err(|_| late())?
                .map_err(|e| format!("{authority}: reading the answer: {e}"))?
                .to_bytes();
            return Ok(Some(Answer { status: parts.status, headers: parts.headers, body }));
        }
        loop {
            let frame = tokio::time::timeout(timeout, body.frame()).await.map_err(|_| late())?;
            match frame {
                None => return Ok(None),
                Some(Err(e)) => return Err(format!("{authority}: the transfer broke off: {e}")),
                Some(Ok(f)) => {
                    if let Some(data) = f.data_ref() {
                        sink(data)?;
                    }
                }
            }
        }
    }

    async fn request(
        &self,
        authority: &str,
        method: Method,
        path: &str,
        (body, headers): (Bytes, Vec<(&'static str, String)>),
        timeout: Duration,
    ) -> Result<Answer, String> {
        let uri: Uri = format!("{}://{authority}{path}", self.scheme).parse().map_err(|e| format!("{path}: {e}"))?;
        let mut req = Request::builder().method(method).uri(uri);
        if let Some(t) = &self.token {
            req = req.header(hyper::header::AUTHORIZATION, format!("Bearer {t}"));
        }
        for (name, value) in headers {
            req = req.header(name, value);
        }
        let req = req.body(Full::new(body)).map_err(|e| e.to_string())?;
        let call = async {
            let resp = match &self.transport {
                Transport::Http(p) => p.request(req).await,
                Transport::Https(p) => p.request(req).await,
            }
            .map_err(|e| format!("{authority}: {}", source_chain(&e)))?;
            let (parts, body) = resp.into_parts();
            let body = Limited::new(body, MAX_ANSWER_BYTES)
                .collect()
                .await
                .map_err(|e| format!("{authority}: reading the answer: {e}"))?
                .to_bytes();
            Ok(Answer { status: parts.status, headers: parts.headers, body })
        };
        tokio::time::timeout(timeout, call).await.map_err(|_| format!("{authority}: no answer within {timeout:?}"))?
    }
}

/// An error with its causes ("client error (Connect): Connection refused").
fn source_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cause = c.source();
    }
    s
}
