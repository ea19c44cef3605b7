//! Prometheus metrics, served at `GET /metrics` in the OpenMetrics text format.
//!
//! Requests are counted as they happen (by route, method, status) with a latency
//! histogram per route. Everything else (keys, tombstones, members by status,
//! replication counters, queue depth, disk size) is read from the node's state at
//! scrape time by [`NodeCollector`], so there is one source of truth for each figure.

use crate::cluster::Cluster;
use crate::push::Pusher;
use crate::stats::Stats;
use crate::storage::Store;
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric};
use prometheus_client::metrics::counter::{ConstCounter, Counter};
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;
use std::sync::Arc;

/// Labels of a request count.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    /// Route name (`kv`, `kv_list`, `health`, `members`, `internal`, `metrics`, `unknown`).
    pub route: &'static str,
    /// HTTP method (`GET`, `PUT`, ..., `other`).
    pub method: &'static str,
    /// Response status code.
    pub status: u16,
}

/// Labels of a latency histogram.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RouteLabels {
    /// Route name.
    pub route: &'static str,
}

fn latency_histogram() -> Histogram {
    // 50 µs to about 6.5 s.
    Histogram::new(prometheus_client::metrics::histogram::exponential_buckets(0.00005, 2.0, 18))
}

/// The node's metrics registry.
pub struct Metrics {
    registry: Registry,
    requests: Family<RequestLabels, Counter>,
    latency: Family<RouteLabels, Histogram, fn() -> Histogram>,
}

impl Metrics {
    /// A registry with the request metrics and the node collector.
    pub fn new(collector: NodeCollector) -> Metrics {
        let mut registry = Registry::with_prefix("kvs");
        let requests = Family::<RequestLabels, Counter>::default();
        let latency = Family::<RouteLabels, Histogram, fn() -> Histogram>::new_with_constructor(latency_histogram);
        registry.register("http_requests", "HTTP requests by route, method and status", requests.clone());
        registry.register("http_request_duration_seconds", "HTTP request latency by route", latency.clone());
        registry.register_collector(Box::new(collector));
        Metrics { registry, requests, latency }
    }

    /// Counts one request.
    pub fn observe(&self, route: &'static str, method: &hyper::Method, status: u16, seconds: f64) {
        let method = match *method {
            hyper::Method::GET => "GET",
            hyper::Method::HEAD => "HEAD",
            hyper::Method::PUT => "PUT",
            hyper::Method::POST => "POST",
            hyper::Method::DELETE => "DELETE",
            _ => "other",
        };
        self.requests.get_or_create(&RequestLabels { route, method, status }).inc();
        self.latency.get_or_create(&RouteLabels { route }).observe(seconds);
    }

    /// The text exposition.
    pub fn render(&self) -> String {
        let mut out = String::new();
        // Writing to a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}

/// Reads the node's state at scrape time.
pub struct NodeCollector {
    /// Keys, tombstones, disk size.
    pub store: Store,
    /// Members by status.
    pub cluster: Arc<Cluster>,
    /// Replication counters.
    pub stats: Arc<Stats>,
    /// Push queue depth.
    pub pusher: Pusher,
    /// Client token refusals (client auth on).
    pub acl: Option<Arc<crate::acl::Acl>>,
    /// Change feed watchers and counters.
    pub feed: Arc<crate::changes_api::Feed>,
}

impl std::fmt::Debug for NodeCollector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("NodeCollector")
    }
}

fn gauge(e: &mut DescriptorEncoder, name: &str, help: &str, v: i64) -> Result<(), std::fmt::Error> {
    let g = ConstGauge::new(v);
    g.encode(e.encode_descriptor(name, help, None, g.metric_type())?)
}

fn counter(e: &mut DescriptorEncoder, name: &str, help: &str, v: u64) -> Result<(), std::fmt::Error> {
    let c = ConstCounter::new(v);
    c.encode(e.encode_descriptor(name, help, None, c.metric_type())?)
}

impl Collector for NodeCollector {
    fn encode(&self, mut e: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let s = &self.stats;
        gauge(&mut e, "keys", "Live keys stored", self.store.live_keys() as i64)?;
        gauge(&mut e, "tombstones", "Tombstones held (deletes not yet purged)", self.store.tombstones() as i64)?;
        gauge(&mut e, "storage_disk_bytes", "Bytes the database takes on disk", self.store.disk_bytes() as i64)?;
        gauge(
            &mut e,
            "storage_write_buffer_bytes",
            "Bytes in fjall's memtables (active and sealed)",
            self.store.write_buffer_bytes() as i64,
        )?;
        counter(
            &mut e,
            "storage_forced_rotations",
            "Times the writer had every memtable rotated (flushed) to bound the write buffer",
            self.store.forced_rotations(),
        )?;
        gauge(
            &mut e,
            "storage_pinned_bytes",
            "Bytes of the tables' bloom filters and indexes held in memory",
            self.store.pinned_bytes() as i64,
        )?;
        {
            let c = ConstCounter::new(0u64);
            let mut m = e.encode_descriptor(
                "storage_block_reads",
                "Table blocks read by point reads and scans, by kind and whether the block cache had them (index and filter blocks held in memory are not counted)",
                None,
                c.metric_type(),
            )?;
            for (block, disk, cache) in self.store.block_reads() {
                ConstCounter::new(disk).encode(m.encode_family(&[("block", block), ("from", "disk")])?)?;
                ConstCounter::new(cache).encode(m.encode_family(&[("block", block), ("from", "cache")])?)?;
            }
        }
        let feed = &self.feed;
        gauge(&mut e, "change_seq", "The change feed's last seq on this node", self.store.last_seq() as i64)?;
        gauge(&mut e, "change_watchers", "Change feed long-polls and streams open", feed.watchers() as i64)?;
        counter(
            &mut e,
            "change_events_sent",
            "Change feed events sent to clients",
            feed.events_sent.load(std::sync::atomic::Ordering::Relaxed),
        )?;
        counter(
            &mut e,
            "change_streams_lagged",
            "Change streams ended because their client did not keep up",
            feed.lagged.load(std::sync::atomic::Ordering::Relaxed),
        )?;
        gauge(&mut e, "push_queue_depth", "Writes waiting to be pushed", self.pusher.queue_depth() as i64)?;
        gauge(
            &mut e,
            "push_queue_bytes",
            "Bytes of writes waiting to be pushed, in the queue and every peer's queue",
            self.pusher.queued_bytes() as i64,
        )?;
        let (alive, down) = self.cluster.member_counts();
        {
            let g = ConstGauge::new(0i64);
            let mut m =
                e.encode_descriptor("members", "Known members by status, this node included", None, g.metric_type())?;
            ConstGauge::new(alive as i64).encode(m.encode_family(&[("status", "alive")])?)?;
            ConstGauge::new(down as i64).encode(m.encode_family(&[("status", "down")])?)?;
        }
        counter(&mut e, "push_records", "Records pushed to peers", s.pushed.get())?;
        counter(&mut e, "push_failures", "Push batches a peer did not take", s.push_failed.get())?;
        counter(&mut e, "push_dropped_records", "Records not pushed because a queue was full", s.push_dropped.get())?;
        counter(&mut e, "replication_received_records", "Records received from peers", s.received.get())?;
        counter(&mut e, "replication_applied_records", "Received records stored", s.applied.get())?;
        counter(
            &mut e,
            "replication_skipped_records",
            "Received records not stored (older or identical)",
            s.skipped.get(),
        )?;
        {
            let c = ConstCounter::new(0u64);
            let mut m = e.encode_descriptor("sync_rounds", "Sync rounds by kind and outcome", None, c.metric_type())?;
            for (kind, outcome, v) in [
                ("regular", "ok", s.sync_ok.get()),
                ("regular", "failed", s.sync_failed.get()),
                ("catchup", "ok", s.catchup_ok.get()),
            ] {
                ConstCounter::new(v).encode(m.encode_family(&[("kind", kind), ("outcome", outcome)])?)?;
            }
        }
        counter(&mut e, "sync_bytes", "Body bytes exchanged by regular sync", s.sync_bytes.get())?;
        counter(&mut e, "bootstrap_records", "Records fetched by bootstrap", s.bootstrap_fetched.get())?;
        counter(&mut e, "tombstones_purged", "Tombstones purged after the grace period", s.tombstones_purged.get())?;
        counter(&mut e, "expired", "Values past their TTL replaced by their expiry tombstones", s.expired.get())?;
        counter(&mut e, "collisions", "Timestamp collisions found", s.collisions.get())?;
        counter(
            &mut e,
            "future_records",
            "Records from peers held back: their timestamp was more than max_clock_offset_ms ahead of this node's clock",
            s.future_records.get(),
        )?;
        counter(
            &mut e,
            "refused_records",
            "Records from peers skipped because they fail this node's checks (key, max_value_bytes, JSON)",
            s.refused_records.get(),
        )?;
        counter(
            &mut e,
            "cluster_auth_refused",
            "Node-to-node requests refused for a missing or wrong cluster key signature",
            self.cluster.auth_refused(),
        )?;
        counter(
            &mut e,
            "client_auth_refused",
            "Client requests refused for a missing, unknown or expired token (401) or its rules (403)",
            self.acl.as_ref().map_or(0, |a| a.refused.load(std::sync::atomic::Ordering::Relaxed)),
        )?;
        let clock = self.cluster.clock_status();
        gauge(
            &mut e,
            "clock_offset_ms",
            "This node's clock minus the median of its alive peers' (0 until measured)",
            clock.offset_ms.unwrap_or(0),
        )?;
        gauge(&mut e, "clock_ok", "1 while this node's clock lets it take client writes", i64::from(clock.ok))?;
        {
            let c = ConstCounter::new(0u64);
            let mut m =
                e.encode_descriptor("conflicts_resolved", "Collisions resolved by rule", None, c.metric_type())?;
            for (rule, v) in [
                ("majority", s.resolved_majority.get()),
                ("oldest-node", s.resolved_oldest.get()),
                ("fallback", s.resolved_fallback.get()),
            ] {
                ConstCounter::new(v).encode(m.encode_family(&[("rule", rule)])?)?;
            }
        }
        Ok(())
    }
}
