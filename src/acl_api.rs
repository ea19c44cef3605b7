//! The token management routes (`/acl/...`, README "Security"): make, list, show and
//! revoke tokens, and `whoami`. Tokens are written as records under
//! [`acl::TOKEN_PREFIX`] through the writer and pushed like any write, so every node
//! takes them.

use crate::acl::{self, Caller};
use crate::api::{ApiError, CLIENT_BUDGET, HttpResponse, check_writable, json_response, read_body_within};
use crate::node::App;
use crate::record::Record;
use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::{Method, Request, Response, StatusCode};
use std::sync::Arc;

/// Largest token request body.
const MAX_TOKEN_REQUEST_BYTES: u64 = 64 * 1024;

/// Serves `/acl/...`. Every route but `whoami` needs an admin caller.
pub async fn route(app: &Arc<App>, caller: Option<&Caller>, req: Request<Incoming>) -> Result<HttpResponse, ApiError> {
    let (Some(acl), Some(caller)) = (&app.acl, caller) else {
        return Err(ApiError::NotFound("route (client_auth is off: tokens are not in use)"));
    };
    let path = req.uri().path().to_string();
    let method = req.method().clone();
    if path == "/acl/whoami" {
        return match method {
            Method::GET | Method::HEAD => Ok(json_response(StatusCode::OK, &caller.describe())),
            _ => Err(ApiError::MethodNotAllowed("GET, HEAD")),
        };
    }
    if !caller.is_admin() {
        acl.note_refused();
        return Err(ApiError::Forbidden("managing tokens needs admin access for every key (prefix \"\")".into()));
    }
    if acl.stale() {
        let acl = acl.clone();
        crate::storage::blocking(move || acl.reload()).await?;
    }
    match (path.as_str(), method) {
        ("/acl/tokens", Method::POST) => {
            check_writable(app)?;
            let (body, _permit) = read_body_within(req, MAX_TOKEN_REQUEST_BYTES, &CLIENT_BUDGET).await?;
            let (token, secret) = acl::make_token(&body, crate::clock::now_ms()).map_err(ApiError::BadRequest)?;
            let key = format!("{}{}", acl::TOKEN_PREFIX, token.id);
            let value = Bytes::from(serde_json::to_vec(&token).map_err(|e| ApiError::BadRequest(e.to_string()))?);
            let written = app.writer.put(key.clone(), value.clone()).await?;
            app.pusher.enqueue(key, Record::value(written.timestamp, written.uuid, value));
            let mut shown = acl::public(&token);
            shown["secret"] = secret.into();
            Ok(json_response(StatusCode::CREATED, &shown))
        }
        ("/acl/tokens", Method::GET | Method::HEAD) => {
            let all: Vec<_> = acl.tokens().iter().map(|t| acl::public(t)).collect();
            Ok(json_response(StatusCode::OK, &serde_json::json!({ "tokens": all })))
        }
        ("/acl/tokens", _) => Err(ApiError::MethodNotAllowed("GET, HEAD, POST")),
        (p, m) => {
            let Some(id) = p.strip_prefix("/acl/tokens/").filter(|id| !id.is_empty() && !id.contains('/')) else {
                return Err(ApiError::NotFound("route"));
            };
            let Some(token) = acl.token(id) else { return Err(ApiError::NotFound("token")) };
            match m {
                Method::GET | Method::HEAD => Ok(json_response(StatusCode::OK, &acl::public(&token))),
                Method::DELETE => {
                    check_writable(app)?;
                    let key = format!("{}{}", acl::TOKEN_PREFIX, token.id);
                    let written = app.writer.delete(key.clone()).await?;
                    app.pusher.enqueue(key, Record::tombstone(written.timestamp, written.uuid));
                    let mut resp = Response::new(Full::new(Bytes::new()));
                    *resp.status_mut() = StatusCode::NO_CONTENT;
                    Ok(resp)
                }
                _ => Err(ApiError::MethodNotAllowed("GET, HEAD, DELETE")),
            }
        }
    }
}
