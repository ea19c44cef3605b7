//! The server half of the node-to-node protocol ([`crate::protocol`]): every route
//! under `/internal/v2/`, and the old paths of protocol 1, which are refused.
//!
//! Everything a peer sends is checked like client input before it is acted on: member
//! entries ([`crate::membership::check_info`]), record batches ([`crate::wire::decode`]), path lists and
//! their lengths, query numbers. Each body is bounded by [`protocol::MAX_BODY_BYTES`],
//! and all of them together by [`protocol::INBOUND_BODY_BUDGET`].

use crate::antientropy::FANOUT;
use crate::api::{
    ApiError, GET_METHOD, HttpResponse, POST_METHOD, ReadBody, json_bytes_response, json_response, parse_query,
    read_body_within,
};
use crate::cluster::JoinError;
use crate::membership::MemberInfo;
use crate::node::App;
use crate::path::validate_stored_key;
use crate::protocol::GossipMessage;
use crate::protocol::encode_hashes;
use crate::protocol::{self, LAST_CONTACT_HEADER, LogThrottle, WIRE_VERSION, routes, wire_version};
use crate::protocol::{VoteAnswer, VoteRequest};
use crate::record::Record;
use crate::resolve::held;
use crate::storage::{StoreError, blocking};
use crate::wire;
use bytes::Bytes;
use http_body_util::Full;
use hyper::header::{self, HeaderValue};
use hyper::{Method, Request, Response, StatusCode};
use serde_json::json;
use std::sync::Arc;
use tokio::sync::{Semaphore, SemaphorePermit};

/// Is this a node-to-node path (of this protocol version or an older one)?
pub fn is_internal(path: &str) -> bool {
    path.starts_with("/internal/") || path == "/members/join" || path == "/members/leave"
}

/// Serves one node-to-node request.
pub async fn route<B: ReadBody>(app: &Arc<App>, mut req: Request<B>) -> Result<HttpResponse, ApiError> {
    // Who is calling first, then what they speak.
    if app.tls.as_ref().is_some_and(|t| t.client_auth())
        && req.extensions().get::<crate::tls::VerifiedClient>().is_none()
    {
        app.cluster.note_auth_refused();
        return Err(ApiError::Unauthorized(
            "node-to-node requests need a client certificate from this node's tls_ca_file (tls_client_auth)".into(),
        ));
    }
    check_wire_version(&req)?;
    if let Some(keys) = &app.config.cluster_keys {
        let digest = check_signature(app, keys, &req)?;
        req.extensions_mut().insert(SignedDigest(digest));
    }
    let post = req.method() == Method::POST;
    match req.uri().path() {
        routes::JOIN if post => {
            let info: MemberInfo = read_json(req).await?;
            check_member(&info)?;
            match app.cluster.handle_join(info) {
                Ok(answer) => Ok(json_response(StatusCode::OK, &json!(answer))),
                Err(JoinError::Duplicate(reason)) => Err(ApiError::Conflict(reason)),
                Err(JoinError::Full) => Err(ApiError::Busy("this node keeps at most 1,024 members")),
            }
        }
        routes::LEAVE if post => {
            let info: MemberInfo = read_json(req).await?;
            check_member(&info)?;
            if !info.left {
                return Err(ApiError::BadRequest("a leave announcement has \"left\": true".into()));
            }
            app.cluster.handle_leave(info);
            Ok(json_response(StatusCode::OK, &json!({})))
        }
        routes::GOSSIP if post => {
            // Entries that fail the checks are skipped and counted, never the whole message.
            let msg: GossipMessage = read_json(req).await?;
            Ok(json_response(StatusCode::OK, &json!(app.cluster.handle_gossip(msg))))
        }
        routes::JOIN | routes::LEAVE | routes::GOSSIP => Err(ApiError::MethodNotAllowed(POST_METHOD)),
        _ => internal_data(app, req).await,
    }
}

/// Refuses a node-to-node request from a peer of another protocol version: a path of
/// protocol 1 (no version in it), or a header that does not say this version. 400, not
/// 409: kvs before the HLC took a 409 to its join for a duplicate `node_id` and exited.
fn check_wire_version<B>(req: &Request<B>) -> Result<(), ApiError> {
    static REFUSALS: std::sync::OnceLock<LogThrottle> = std::sync::OnceLock::new();
    let versioned = req.uri().path().starts_with(routes::PREFIX);
    let theirs = if versioned { wire_version(req.headers()) } else { Some(1) };
    if theirs == Some(WIRE_VERSION) {
        return Ok(());
    }
    let theirs = theirs.map_or_else(|| "an unreadable".to_string(), |v| v.to_string());
    let msg = format!(
        "node-to-node protocol version {theirs} refused: this node speaks {WIRE_VERSION}; \
         run the same kvs version on every node (README \"Upgrading\")"
    );
    if REFUSALS.get_or_init(LogThrottle::default).allow(if versioned { "other version" } else { "protocol 1" }) {
        tracing::error!(route = req.uri().path(), "{msg}");
    }
    Err(ApiError::BadRequest(msg))
}

/// The body digest a request's verified signature covers: its body must match.
#[derive(Clone)]
struct SignedDigest(String);

/// Refuses a node-to-node request without a valid cluster key signature (before its
/// body is read); returns the body digest the signature covers.
fn check_signature<B>(app: &App, keys: &crate::auth::ClusterKeys, req: &Request<B>) -> Result<String, ApiError> {
    static REFUSALS: std::sync::OnceLock<LogThrottle> = std::sync::OnceLock::new();
    let header = |name: &str| req.headers().get(name).and_then(|v| v.to_str().ok());
    let headers =
        (header(crate::auth::TIME_HEADER), header(crate::auth::DIGEST_HEADER), header(crate::auth::SIGNATURE_HEADER));
    let path = req.uri().path_and_query().map_or(req.uri().path(), |p| p.as_str());
    let signed = crate::auth::Signed {
        method: req.method().as_str(),
        path_and_query: path,
        last_contact: header(LAST_CONTACT_HEADER),
    };
    keys.verify(&signed, headers, crate::clock::now_ms()).map_err(|refusal| {
        app.cluster.note_auth_refused();
        // Keyed by kind: a value in the key (a skew, a version) would let anyone fill
        // the throttle and the log.
        if REFUSALS.get_or_init(LogThrottle::default).allow(refusal.kind()) {
            tracing::warn!(route = req.uri().path(), reason = %refusal, "refused a node-to-node request (cluster key)");
        }
        ApiError::Unauthorized(refusal.to_string())
    })
}

/// Checks a body against the digest its request's signature covers (when the cluster
/// key is on).
async fn check_digest(signed: Option<SignedDigest>, body: &Bytes) -> Result<(), ApiError> {
    match signed {
        Some(SignedDigest(d)) if crate::auth::digest_off_thread(body.clone()).await != d => {
            Err(ApiError::BadRequest("the body does not match the digest its signature covers".into()))
        }
        _ => Ok(()),
    }
}

/// The replication endpoints (see [`crate::replication`]).
async fn internal_data<B: ReadBody>(app: &Arc<App>, req: Request<B>) -> Result<HttpResponse, ApiError> {
    let path = req.uri().path().to_string();
    let (get, post) = (req.method() == Method::GET, req.method() == Method::POST);
    let store = app.store.clone();
    // Only data coming in (push) and votes are served while this node may hold stale
    // records.
    if path != routes::PUSH && path != routes::VOTE && path != routes::PURGE_CHECK && !app.replication.ready() {
        return Err(ApiError::Syncing);
    }
    match path.as_str() {
        routes::PUSH if post => {
            let sender = req.headers().get(LAST_CONTACT_HEADER).and_then(|v| v.to_str().ok()?.parse().ok());
            let (body, _permit) = read_peer_body(req).await?;
            let mut decoded =
                wire::decode_off_thread(body, app.config.max_value_bytes).await.map_err(ApiError::BadRequest)?;
            app.replication.note_refused("a pushing peer", &decoded.refused);
            let report = app.replication.apply(std::mem::take(&mut decoded.records), sender).await?;
            Ok(json_response(
                StatusCode::OK,
                &json!({
                    "applied": report.applied,
                    "skipped": report.skipped,
                    "held_back": report.future,
                    "refused": decoded.refused.len(),
                    "collisions": report.collisions.len(),
                    "reawakened": report.reawakened,
                }),
            ))
        }
        routes::VOTE if post => {
            let req: VoteRequest = read_json(req).await?;
            if req.paths.len() > protocol::MAX_PATHS {
                return Err(ApiError::BadRequest(format!("at most {} paths per vote", protocol::MAX_PATHS)));
            }
            for p in &req.paths {
                validate_stored_key(p).map_err(|e| ApiError::BadRequest(format!("path {p:?}: {e}")))?;
            }
            let held = blocking(move || held(&store, &req.paths)).await?;
            Ok(json_response(StatusCode::OK, &json!(VoteAnswer { held })))
        }
        routes::PURGE_CHECK if post => {
            let tombstones: Vec<protocol::Tombstone> = read_json(req).await?;
            if tombstones.len() > protocol::MAX_PATHS {
                return Err(ApiError::BadRequest(format!(
                    "at most {} tombstones per purge check",
                    protocol::MAX_PATHS
                )));
            }
            for (p, _, _) in &tombstones {
                validate_stored_key(p).map_err(|e| ApiError::BadRequest(format!("path {p:?}: {e}")))?;
            }
            // An honest purger asks only about tombstones past the grace period (by its
            // clock, at most 2.5 bounds ahead of ours). A later timestamp is answered
            // "not safe" and no certificate is kept: one at the end of time would
            // freeze the key (ARCHITECTURE.md "Peer input rules").
            let limit = app.replication.purge_check_limit();
            let (asked, beyond): (Vec<_>, Vec<_>) =
                tombstones.into_iter().enumerate().partition(|(_, (_, ts, _))| *ts <= limit);
            let order: Vec<usize> = asked.iter().map(|(n, _)| *n).collect();
            let certified = app.writer.certify(asked.into_iter().map(|(_, t)| t).collect()).await?;
            let mut safe = vec![false; order.len() + beyond.len()];
            for (n, ok) in order.into_iter().zip(certified) {
                safe[n] = ok;
            }
            Ok(json_response(StatusCode::OK, &json!(safe)))
        }
        routes::LEVEL1 if get => Ok(binary_response(encode_hashes(&store.level1()))),
        routes::LEAVES if post => {
            let tops: Vec<usize> = read_json(req).await?;
            if tops.len() > FANOUT || tops.iter().any(|&t| t >= FANOUT) {
                return Err(ApiError::BadRequest(format!("level-1 indices must be below {FANOUT}")));
            }
            Ok(binary_response(encode_hashes(&store.leaves_under(&tops))))
        }
        routes::VERSIONS if post => {
            let leaves: Vec<u16> = read_json(req).await?;
            let body = blocking(move || encode(&store.versions_in_leaves(&leaves)?)).await?;
            Ok(json_bytes_response(StatusCode::OK, body))
        }
        routes::FETCH if post => {
            let paths: Vec<String> = read_json(req).await?;
            if paths.len() > protocol::MAX_PATHS {
                return Err(ApiError::BadRequest(format!("at most {} paths per fetch", protocol::MAX_PATHS)));
            }
            for p in &paths {
                validate_stored_key(p).map_err(|e| ApiError::BadRequest(format!("path {p:?}: {e}")))?;
            }
            let (records, covered) = blocking(move || store.records_within(&paths, protocol::MAX_BATCH_BYTES)).await?;
            let mut resp = records_response(app, &records);
            resp.headers_mut().insert(protocol::COVERED_HEADER, HeaderValue::from(covered));
            Ok(resp)
        }
        routes::SINCE if get => {
            let protocol::SinceQuery { after_ts, after_path, limit } = params(&req, protocol::SinceQuery::from_params)?;
            let (records, more) = blocking(move || {
                let paths: Vec<String> =
                    store.versions_since(Some((after_ts, &after_path)), limit)?.into_iter().map(|v| v.path).collect();
                let (records, covered) = store.records_within(&paths, protocol::MAX_BATCH_BYTES)?;
                Ok((records, covered < paths.len() || paths.len() == limit))
            })
            .await?;
            let mut resp = records_response(app, &records);
            resp.headers_mut().insert(protocol::MORE_HEADER, HeaderValue::from(i32::from(more)));
            Ok(resp)
        }
        routes::NEWEST if get => {
            let protocol::NewestQuery { min_ts, before, limit } = params(&req, protocol::NewestQuery::from_params)?;
            let body = blocking(move || {
                encode(&store.newest_versions(before.as_ref().map(|(t, p)| (*t, p.as_str())), min_ts, limit)?)
            })
            .await?;
            Ok(json_bytes_response(StatusCode::OK, body))
        }
        routes::CERTIFICATES if get => {
            let protocol::CertificatesQuery { after, limit } = params(&req, protocol::CertificatesQuery::from_params)?;
            let body = blocking(move || encode(&store.certificates_after(&after, limit)?)).await?;
            Ok(json_bytes_response(StatusCode::OK, body))
        }
        routes::PUSH | routes::VOTE | routes::LEAVES | routes::VERSIONS | routes::FETCH | routes::PURGE_CHECK => {
            Err(ApiError::MethodNotAllowed(POST_METHOD))
        }
        routes::LEVEL1 | routes::SINCE | routes::NEWEST | routes::CERTIFICATES => {
            Err(ApiError::MethodNotAllowed(GET_METHOD))
        }
        _ => Err(ApiError::NotFound("route")),
    }
}

/// Reads a route's query with its parser from [`protocol`] (the one the client half
/// writes it with).
fn params<B, Q>(req: &Request<B>, read: fn(&protocol::Params) -> Result<Q, String>) -> Result<Q, ApiError> {
    read(&parse_query(req.uri().query())?).map_err(ApiError::BadRequest)
}

/// A record batch, with this node's `last_contact` for the receiver's stale check.
fn records_response(app: &App, records: &[(String, Record)]) -> HttpResponse {
    let mut resp = binary_response(wire::encode(records.iter().map(|(p, r)| (p.as_str(), r))));
    resp.headers_mut().insert(LAST_CONTACT_HEADER, HeaderValue::from(app.cluster.last_contact()));
    resp
}

/// A peer's JSON answer, encoded straight from its types on the blocking pool with
/// the storage read that made it. Through `json!` (a `serde_json::Value` tree, built
/// and printed on an async worker) the 15k versions of a sync round at 10M keys took
/// 42 ms of the round's 90.
fn encode<T: serde::Serialize>(answer: &T) -> Result<Bytes, StoreError> {
    serde_json::to_vec(answer)
        .map(Bytes::from)
        .map_err(|e| StoreError::Corrupt(format!("cannot encode an answer: {e}")))
}

fn binary_response(body: Bytes) -> HttpResponse {
    let mut resp = Response::new(Full::new(body));
    resp.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static(wire::CONTENT_TYPE));
    resp
}

/// Checks what a peer says about itself (a join or leave) like client input.
fn check_member(m: &MemberInfo) -> Result<(), ApiError> {
    crate::membership::check_info(m, crate::clock::now_ms()).map_err(ApiError::BadRequest)
}

/// Bytes of node-to-node bodies held at once, in KiB permits
/// ([`protocol::INBOUND_BODY_BUDGET`]).
static BODY_BUDGET: Semaphore = Semaphore::const_new(protocol::INBOUND_BODY_BUDGET / 1024);

static CONTROL_BUDGET: Semaphore = Semaphore::const_new(protocol::CONTROL_BODY_BUDGET / 1024);

/// Reads a record batch of at most [`protocol::MAX_BODY_BYTES`] within
/// [`protocol::INBOUND_BODY_BUDGET`] (see [`read_body_within`]).
async fn read_peer_body<B: ReadBody>(req: Request<B>) -> Result<(Bytes, SemaphorePermit<'static>), ApiError> {
    let signed = req.extensions().get::<SignedDigest>().cloned();
    let (body, permit) = read_body_within(req, protocol::MAX_BODY_BYTES, &BODY_BUDGET).await?;
    check_digest(signed, &body).await?;
    Ok((body, permit))
}

/// Reads and decodes a node-to-node JSON body.
async fn read_json<T: serde::de::DeserializeOwned, B: ReadBody>(req: Request<B>) -> Result<T, ApiError> {
    let signed = req.extensions().get::<SignedDigest>().cloned();
    let (body, _permit) = read_body_within(req, protocol::MAX_CONTROL_BYTES, &CONTROL_BUDGET).await?;
    check_digest(signed, &body).await?;
    serde_json::from_slice(&body).map_err(|e| ApiError::BadRequest(format!("invalid body: {e}")))
}
