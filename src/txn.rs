//! `POST /txn`: up to [`MAX_OPS`] puts, deletes and checks, applied all together or
//! not at all on this node ([`crate::storage::Writer::transact`]: one step of the
//! writer, one commit), then pushed to peers like ordinary writes.
//!
//! [`parse`] turns the body into checks and writes with every rule checked (no I/O);
//! [`handle`] runs it.

use crate::api::{ApiError, HttpResponse, allow, check_writable, json_response, read_body_within, validate_json};
use crate::merge::Condition;
use crate::node::App;
use crate::record::Record;
use crate::storage::StoreError;
use bytes::Bytes;
use hyper::body::Incoming;
use hyper::{Request, StatusCode};
use serde::Deserialize;
use serde_json::json;
use serde_json::value::RawValue;
use std::collections::HashSet;
use std::sync::Arc;

/// Most operations in one transaction.
pub const MAX_OPS: usize = 64;
/// Largest `/txn` body: a few values of the largest size, never less than one.
pub const MAX_BODY_BYTES: u64 = 16 * 1024 * 1024;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Body<'a> {
    #[serde(borrow)]
    ops: Vec<RawOp<'a>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawOp<'a> {
    op: String,
    key: String,
    #[serde(borrow, default)]
    value: Option<&'a RawValue>,
    #[serde(default)]
    if_match: Option<String>,
    #[serde(default)]
    absent: Option<bool>,
    #[serde(borrow, default)]
    ttl: Option<&'a RawValue>,
}

/// One operation, checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TxnOp {
    /// Store `value` (JSON, as sent) at the key, expiring after the TTL (ms) if given.
    Put(String, Bytes, Option<u64>),
    /// Delete the key.
    Delete(String),
    /// Go ahead only if the condition holds for the key.
    Check(String, Condition),
}

/// Parses and checks a `/txn` body: at most [`MAX_OPS`] operations, each a known op
/// with the fields it needs and no others, valid keys, a key written at most once and
/// checked at most once. The error names the op's index and the field.
pub fn parse(body: &[u8]) -> Result<Vec<TxnOp>, String> {
    let body: Body<'_> = serde_json::from_slice(body).map_err(|e| format!("body: {e}"))?;
    if body.ops.is_empty() || body.ops.len() > MAX_OPS {
        return Err(format!("ops: 1 to {MAX_OPS} operations, got {}", body.ops.len()));
    }
    let (mut written, mut checked) = (HashSet::new(), HashSet::new());
    let mut ops = Vec::with_capacity(body.ops.len());
    for (i, raw) in body.ops.into_iter().enumerate() {
        let key =
            crate::path::parse_key(&crate::path::percent_encode(&raw.key)).map_err(|e| format!("ops[{i}].key: {e}"))?;
        let unexpected = |field: &str| format!("ops[{i}]: {field} does not go with op {:?}", raw.op);
        let op = match raw.op.as_str() {
            "put" => {
                if raw.if_match.is_some() || raw.absent.is_some() {
                    return Err(unexpected("if_match/absent"));
                }
                let value = raw.value.ok_or_else(|| format!("ops[{i}].value: a put needs a value"))?;
                validate_json(value.get().as_bytes()).map_err(|e| format!("ops[{i}].value: {e}"))?;
                let ttl = match raw.ttl {
                    Some(t) => Some(crate::ttl::parse_ttl(t.get()).map_err(|e| format!("ops[{i}].{e}"))?),
                    None => None,
                };
                TxnOp::Put(key.clone(), Bytes::copy_from_slice(value.get().as_bytes()), ttl)
            }
            "delete" => {
                if raw.value.is_some() || raw.if_match.is_some() || raw.absent.is_some() || raw.ttl.is_some() {
                    return Err(unexpected("value/if_match/absent/ttl"));
                }
                TxnOp::Delete(key.clone())
            }
            "check" => {
                if raw.value.is_some() || raw.ttl.is_some() {
                    return Err(unexpected("value/ttl"));
                }
                let condition =
                    match (&raw.if_match, raw.absent) {
                        (Some(tag), None) => {
                            let bare = tag.trim_matches('"');
                            Condition::Matches(uuid::Uuid::parse_str(bare).map_err(|_| {
                                format!("ops[{i}].if_match: a uuid (the ETag a GET returned), got {tag:?}")
                            })?)
                        }
                        (None, Some(true)) => Condition::Absent,
                        _ => return Err(format!("ops[{i}]: a check needs if_match (a uuid) or absent: true")),
                    };
                TxnOp::Check(key.clone(), condition)
            }
            other => return Err(format!("ops[{i}].op: put, delete or check, got {other:?}")),
        };
        let fresh = match op {
            TxnOp::Check(..) => checked.insert(key.clone()),
            _ => written.insert(key.clone()),
        };
        if !fresh {
            return Err(format!(
                "ops[{i}].key: {key:?} appears twice (a key is written at most once and checked at most once)"
            ));
        }
        ops.push(op);
    }
    Ok(ops)
}

/// `POST /txn`.
pub async fn handle(
    app: &Arc<App>,
    caller: Option<&crate::acl::Caller>,
    req: Request<Incoming>,
) -> Result<HttpResponse, ApiError> {
    if req.method() != hyper::Method::POST {
        return Err(ApiError::MethodNotAllowed(crate::api::POST_METHOD));
    }
    let need = crate::api::ack_level(app, req.uri().query())?;
    check_writable(app)?;
    let max = MAX_BODY_BYTES.max(app.config.max_value_bytes);
    let (body, permit) = read_body_within(req, max, &crate::api::CLIENT_BUDGET).await?;
    // Parsing a large body is CPU work: off the async workers, as a PUT's JSON check.
    let ops = if body.len() <= crate::api::INLINE_JSON_BYTES {
        parse(&body)
    } else {
        tokio::task::spawn_blocking(move || parse(&body)).await.map_err(|_| ApiError::Busy("shutting down"))?
    }
    .map_err(ApiError::BadRequest)?;
    // Each value within max_value_bytes, as a PUT's: peers refuse larger records, so
    // a larger one would live on this node only.
    let limit = app.config.max_value_bytes;
    if ops.iter().any(|o| matches!(o, TxnOp::Put(_, v, _) if v.len() as u64 > limit)) {
        return Err(ApiError::TooLarge(limit));
    }
    let (mut checks, mut writes) = (Vec::new(), Vec::new());
    for op in &ops {
        match op {
            TxnOp::Check(k, c) => {
                allow(app, caller, k, crate::acl::Access::Read)?;
                checks.push((k.clone(), *c));
            }
            TxnOp::Put(k, v, ttl) => {
                allow(app, caller, k, crate::acl::Access::Write)?;
                writes.push((k.clone(), Some(v.clone()), *ttl));
            }
            TxnOp::Delete(k) => {
                allow(app, caller, k, crate::acl::Access::Write)?;
                writes.push((k.clone(), None, None));
            }
        }
    }
    let committed = app.writer.transact(checks, writes.clone()).await;
    // Committed or refused: the body's share of the budget is free for any ack wait.
    drop(permit);
    let written = match committed {
        Ok(w) => w,
        Err(StoreError::CheckFailed(i, current)) => {
            // The check's index among all the ops, as the client numbered them.
            let index = ops.iter().enumerate().filter(|(_, o)| matches!(o, TxnOp::Check(..))).nth(i).map(|(n, _)| n);
            let current = current.map(|u| format!("\"{u}\""));
            return Ok(json_response(
                StatusCode::CONFLICT,
                &json!({
                    "error": format!("ops[{}] (check) does not hold; nothing was written", index.unwrap_or(i)),
                    "failed": index,
                    "current": current,
                }),
            ));
        }
        Err(e) => return Err(e.into()),
    };
    let mut results = Vec::with_capacity(ops.len());
    // One count per write; the transaction is acknowledged by as many nodes as its
    // least acknowledged write.
    let acks: Vec<_> = (0..written.len()).map(|_| need.map(|_| crate::push::Ack::new(&app.cluster))).collect();
    let mut versions = writes.into_iter().zip(written).zip(acks.iter().cloned());
    // A write that could not be queued for push is acknowledged by this node only.
    let mut unqueued = false;
    for op in &ops {
        match op {
            TxnOp::Check(k, _) => results.push(json!({ "op": "check", "key": k, "ok": true })),
            TxnOp::Put(..) | TxnOp::Delete(_) => {
                let Some((((key, data, _), w), ack)) = versions.next() else { break };
                let record = match data {
                    Some(d) => Record { expires: w.expires, ..Record::value(w.timestamp, w.uuid, d) },
                    None => Record::tombstone(w.timestamp, w.uuid),
                };
                let op = if record.is_tombstone() { "delete" } else { "put" };
                let mut result = json!({
                    "op": op, "key": key, "uuid": w.uuid.to_string(),
                    "timestamp": crate::hlc::ms(w.timestamp), "version": w.timestamp.to_string(),
                });
                if let Some(expires) = w.expires {
                    result["expires"] = json!(expires);
                }
                results.push(result);
                if app.pusher.enqueue_acked(key, record, ack).is_none() && need.is_some() {
                    unqueued = true;
                }
            }
        }
    }
    let mut answer = json!({ "results": results });
    // Acknowledged when every write is: the least of the writes' counts.
    let mut status = StatusCode::OK;
    if let Some(need) = need {
        // One deadline for all the writes: their pushes go out together.
        let deadline = tokio::time::Instant::now() + app.config.ack_timeout;
        let mut least = usize::MAX;
        for ack in acks.into_iter().flatten() {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            let left = if unqueued { std::time::Duration::ZERO } else { left };
            least = least.min(1 + ack.wait(need - 1, left).await);
        }
        // A transaction of checks only writes nothing: nothing to wait for.
        let acked = if least == usize::MAX { need } else { least };
        if acked < need {
            status = StatusCode::ACCEPTED;
        }
        answer["acked"] = json!(acked);
    }
    Ok(json_response(status, &answer))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_body_parses_into_checked_ops() {
        let ops = parse(
            br#"{"ops":[{"op":"check","key":"a","if_match":"\"00000000-0000-0000-0000-000000000001\""},
                {"op":"check","key":"b","absent":true},{"op":"put","key":"a","value":{"x": [1, 2]}},
                {"op":"delete","key":"c"},{"op":"put","key":"d","value":1,"ttl":60}]}"#,
        )
        .unwrap();
        assert_eq!(
            ops,
            vec![
                TxnOp::Check("a".into(), Condition::Matches(uuid::Uuid::from_u128(1))),
                TxnOp::Check("b".into(), Condition::Absent),
                TxnOp::Put("a".into(), Bytes::from_static(br#"{"x": [1, 2]}"#), None),
                TxnOp::Delete("c".into()),
                TxnOp::Put("d".into(), Bytes::from_static(b"1"), Some(60_000)),
            ]
        );
    }

    #[test]
    fn bad_bodies_name_what_is_wrong() {
        let many = format!(r#"{{"ops":[{}]}}"#, vec![r#"{"op":"delete","key":"k"}"#; 65].join(","));
        for (body, says) in [
            (r#"{"ops":[]}"#.to_string(), "ops: 1 to 64"),
            (many, "ops: 1 to 64"),
            (r#"{"ops":[{"op":"put","key":"a"}]}"#.into(), "ops[0].value"),
            (r#"{"ops":[{"op":"upsert","key":"a"}]}"#.into(), "ops[0].op"),
            (r#"{"ops":[{"op":"put","key":"a","value":1},{"op":"delete","key":"a"}]}"#.into(), "ops[1].key"),
            (r#"{"ops":[{"op":"check","key":"a"}]}"#.into(), "ops[0]: a check needs"),
            (r#"{"ops":[{"op":"check","key":"a","if_match":"nope"}]}"#.into(), "ops[0].if_match"),
            (r#"{"ops":[{"op":"delete","key":"a//b"}]}"#.into(), "ops[0].key"),
            (r#"{"ops":[{"op":"delete","key":"./acl/tokens/x"}]}"#.into(), "ops[0].key"),
            (r#"{"ops":[{"op":"delete","key":"a","value":1}]}"#.into(), "ops[0]: value"),
            (r#"{"ops":[{"op":"put","key":"a","value":1,"ttl":0}]}"#.into(), "ops[0].ttl"),
            (r#"{"ops":[{"op":"put","key":"a","value":1,"ttl":"5"}]}"#.into(), "ops[0].ttl"),
            (r#"{"ops":[{"op":"put","key":"a","value":1,"ttl":1.5}]}"#.into(), "ops[0].ttl"),
            (r#"{"ops":[{"op":"delete","key":"a","ttl":5}]}"#.into(), "ops[0]: value/if_match/absent/ttl"),
            (r#"{"ops":[{"op":"put","key":"a","value":1,"expires":5}]}"#.into(), "body"),
            (r#"[1]"#.into(), "body"),
        ] {
            let err = parse(body.as_bytes()).unwrap_err();
            assert!(err.starts_with(says), "{body}: {err}");
        }
    }
}
