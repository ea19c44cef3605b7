//! kvs: a leaderless, gossip-replicated key-value daemon. Keys are paths
//! (`users/john/profile`), values are JSON documents, clients speak plain HTTP.
//!
//! # Layout
//! - [`config`]: the YAML config, every key's default and rule, the generated default file.
//! - [`path`]: key syntax: percent-decoding and validation.
//! - [`record`]: a stored version `{uuid, timestamp, data | tombstone}` and the rule
//!   that orders two versions.
//! - [`storage`]: fjall keyspaces (records, timestamp index, meta) and the single
//!   writer thread that group-commits every change.
//! - [`membership`]: the membership rules (merge, status, removal, peer choice), no I/O.
//! - [`cluster`]: the membership tasks around them: join, gossip, leave.
//! - [`peer`]: the pooled HTTP client for node-to-node calls, a timeout on each.
//! - [`api`]: the HTTP API (client routes and node-to-node routes): routing, handlers,
//!   JSON errors.
//! - [`server`]: the accept loop: connection cap, timeouts, graceful drain.
//! - [`node`]: wires one node together and runs it until a signal.
//! - [`shutdown`], [`clock`]: the stop signal every task watches; Unix-millisecond time.
//!
//! # A client request
//! `server` accepts the connection and hands each request to [`api::handle`], which
//! routes by path and method. A `GET /kv/<path>` decodes and checks the key
//! ([`path::parse_key`]) and reads the record on the blocking pool. A `PUT` checks the
//! key, the size and the JSON, then queues the write to the [`storage::Writer`]
//! thread, which stamps it (uuid, timestamp newer than anything the node handed out or
//! holds for the path), commits record, index entry and counters in one fjall batch
//! shared with every other write waiting, fsyncs once (in `sync` durability), and
//! answers every waiting request.
#![forbid(unsafe_code)]
#![deny(missing_docs)]

pub mod api;
pub mod clock;
pub mod cluster;
pub mod config;
pub mod membership;
pub mod node;
pub mod path;
pub mod peer;
pub mod record;
pub mod server;
pub mod shutdown;
pub mod storage;
