//! kvs: a leaderless, gossip-replicated key-value daemon. Keys are paths
//! (`users/john/profile`), values are JSON documents, clients speak plain HTTP.
//!
//! # Layout
//! - [`config`]: the YAML config, every key's default and rule, the generated default file.
//! - [`path`]: key syntax: percent-decoding and validation.
//! - [`record`]: a stored version `{uuid, timestamp, data | tombstone, expires}` and
//!   the rule that orders two versions. [`ttl`]: expiry rules (the TTL's range, the
//!   expiry tombstone every node derives), no I/O.
//! - [`hlc`]: version timestamps, a hybrid logical clock bounded by
//!   `max_clock_offset_ms`, no I/O. [`merge`]: the writer's decisions (a client write's
//!   version, whether a replicated record applies, a vote winner replaces, a tombstone
//!   is purged), pure functions over the held version.
//! - [`storage`]: fjall keyspaces (records, timestamp index, meta, the change log),
//!   the data dir format and its upgrade, and the single writer thread that
//!   group-commits every change and numbers it for the change feed (with a thread
//!   of its own, `kvs-rotate`, that has fjall's memtables flushed).
//! - [`snapshot`]: the snapshot format (`GET /admin/snapshot`), writing one from a
//!   fjall snapshot, checking a file, and the offline restore into an empty data dir.
//! - [`changes`]: the change feed's rules (log entries, cursor checks, the prefix
//!   wake-up map), no I/O; [`changes_api`]: `GET /changes` as long-poll and
//!   Server-Sent Events, and the log's trim task.
//! - [`membership`]: the membership rules (merge, status, removal, peer choice), no I/O.
//! - [`cluster`]: the membership tasks around them: join, gossip, leave.
//! - [`protocol`]: the node-to-node protocol: its routes, headers, limits, and the
//!   client for node-to-node calls (a timeout on each) over a `PeerTransport`: pooled
//!   HTTP in a running node.
//! - [`acl`]: client tokens: rules (longest prefix), the token cache, tokens as
//!   replicated records under a reserved prefix.
//! - [`auth`]: cluster keys: signing and verifying node-to-node requests
//!   (HMAC-SHA256), no I/O beyond reading the key file.
//! - [`antientropy`]: the replication rules (hash summary, diff plan, stale rule), no I/O.
//! - [`wire`]: the binary record batches nodes exchange.
//! - [`purge`]: when a tombstone may be purged (every member confirmed), no I/O.
//! - [`push`]: push of fresh writes to every alive peer. [`replication`]: the pull
//!   side, one file per job: the inbound door, regular sync rounds, catch-up,
//!   bootstrap, maintenance (purge, stale rule), and [`replication::freshness`]
//!   (whether this node's data can be served: last contact, staleness, verified,
//!   bootstrapping; one plain type, no I/O). [`stats`]: their counters.
//! - [`conflict`]: the vote rules for timestamp collisions (majority, oldest node,
//!   fallback), no I/O; [`resolve`]: the task that runs the votes.
//! - [`api`]: the client HTTP API: routing, handlers, JSON errors, and (client auth
//!   on) the token check before routing; [`acl_api`]: the `/acl/...` token routes.
//! - [`tls`]: rustls configs from the TLS files, reloaded on SIGHUP.
//!   [`internal`]: the server half of the node-to-node protocol.
//! - [`server`]: the accept loop: connection cap, timeouts, graceful drain.
//! - [`node`]: wires one node together and runs it until a signal (or, embedded in a
//!   test, until told to stop).
//! - [`localnet`]: an in-process network for scenario tests (several nodes in one
//!   process, single links cut and healed); used by tests only.
//! - [`metrics`]: Prometheus metrics for `GET /metrics`; [`notify`]: systemd readiness
//!   and watchdog notifications.
//! - [`shutdown`]: the stop signal every task watches. [`clock`]: Unix-millisecond
//!   wall time and the estimate of this node's clock offset against its peers.
//!
//! # A client request
//! `server` accepts the connection and hands each request to [`api::handle`], which
//! routes by path and method. A `GET /kv/<path>` decodes and checks the key
//! ([`path::parse_key`]) and reads the record (a point read, inline). A `PUT` checks the
//! key, the size and the JSON, and that the node may take writes (not bootstrapping,
//! clock within bound of its peers'), then queues the write to the [`storage::Writer`]
//! thread, which stamps it ([`merge::client_version`]: a uuid and an HLC timestamp newer
//! than what the path holds), commits record, index entry and counters in one fjall batch
//! shared with every other write waiting, fsyncs once (in `sync` durability), and
//! answers every waiting request. The same batch holds the write's change log entry;
//! after the commit the writer moves `last_seq` and wakes the watchers of the key's
//! prefixes, whose long-polls and streams then read the log ([`changes_api`]).
//!
//! # A replicated write
//! After the commit, the handler gives the record to [`push::Pusher`], which batches it
//! to every alive peer's `POST /internal/v2/push` ([`internal`]). The peer decodes and
//! checks the batch on the blocking pool ([`wire::decode`]: a record that fails is
//! skipped and counted, the rest taken) and hands it through the inbound door ([`replication::Replication::take_batch`]) to
//! its writer as an `apply`: a
//! record from further ahead than any checked clock is held back, otherwise the newer
//! version wins
//! ([`merge::decide_apply`]), the node's clock follows it unless it is beyond the
//! bound ([`hlc::Hlc::observe`]); its summary leaf and its change log entry change in
//! the same batch, so the peer's watchers see it as they see a local write. Records a push
//! missed are found by the next regular sync ([`replication::Replication::sync_with`]), which
//! compares summaries and moves only what differs.
#![forbid(unsafe_code)]
// hyper's server future is deep: newer compilers need more than the default 128 to
// prove it Send (rust-lang/rust#159228).
#![recursion_limit = "256"]
#![deny(missing_docs)]

pub mod acl;
pub mod acl_api;
pub mod antientropy;
pub mod api;
pub mod auth;
pub mod changes;
pub mod changes_api;
pub mod clock;
pub mod cluster;
pub mod config;
pub mod conflict;
pub mod hlc;
pub mod internal;
pub mod localnet;
pub mod membership;
pub mod merge;
pub mod metrics;
pub mod node;
pub mod notify;
pub mod path;
pub mod protocol;
pub mod purge;
pub mod push;
pub mod record;
pub mod replication;
pub mod resolve;
pub mod server;
pub mod shutdown;
pub mod snapshot;
pub mod stats;
pub mod storage;
pub mod tls;
pub mod ttl;
pub mod txn;
pub mod wire;
