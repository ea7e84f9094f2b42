//! Metrics: plain per-shard counters and histograms, summed across shards only when scraped.
//!
//! Every shard owns a [`ShardMetrics`] of `Cell`s (no atomics, no locks on the hot path, as
//! in Seastar's per-core stats). A scrape asks every shard for a [`Snapshot`] (a `Send` copy),
//! merges them and renders the Prometheus text exposition format 0.0.4 by hand: it is small,
//! and a client crate would bring registries and atomics the shard model does not want.
//! Histograms keep HDR histograms of microseconds (or batch sizes) and are rendered into
//! fixed Prometheus buckets at scrape time.

use std::cell::{Cell, RefCell};
use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;

use crate::http::guard::Scope;
use crate::store::StorageSummary;

/// Bucket bounds (seconds) for publish duration and delivery lag: 50 µs to 10 s, dense below
/// 5 ms where a healthy relay lives.
const LATENCY_BUCKETS: &[f64] = &[
    0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
    2.5, 5.0, 10.0,
];
/// Bucket bounds for commands per Valkey pipeline batch.
const BATCH_BUCKETS: &[u64] = &[1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096];

/// Publish transports (label `transport` of `relay_messages_received_total`).
#[derive(Debug, Clone, Copy)]
pub enum Ingress {
    HttpSingle,
    HttpBulk,
}

/// Delivery transports (label `transport` of `relay_messages_delivered_total`).
#[derive(Debug, Clone, Copy)]
pub enum Egress {
    WebSocket,
    LongPoll,
    Sse,
}

/// A latency histogram: HDR histogram of microseconds plus the exact sum.
#[derive(Clone)]
pub struct LatencyHistogram {
    micros: Histogram<u64>,
    sum_micros: u64,
}

impl LatencyHistogram {
    fn new() -> LatencyHistogram {
        LatencyHistogram {
            // 1 µs .. 1 h at 2 significant digits: ~20 KiB per histogram.
            micros: Histogram::new_with_bounds(1, 3_600_000_000, 2)
                .expect("constant histogram bounds are valid"),
            sum_micros: 0,
        }
    }
    fn record(&mut self, d: Duration) {
        let us = u64::try_from(d.as_micros()).unwrap_or(u64::MAX).max(1);
        self.micros.saturating_record(us);
        self.sum_micros = self.sum_micros.saturating_add(us);
    }
    fn merge(&mut self, other: &LatencyHistogram) {
        let _ = self.micros.add(&other.micros);
        self.sum_micros = self.sum_micros.saturating_add(other.sum_micros);
    }
    pub fn count(&self) -> u64 {
        self.micros.len()
    }
}

/// One shard's counters. Touched only by its own executor.
pub struct ShardMetrics {
    received: [Cell<u64>; 2],
    delivered: [Cell<u64>; 3],
    rejected: RefCell<BTreeMap<&'static str, u64>>,
    /// Requests refused by authentication or authorization, by reason.
    auth_failures: RefCell<BTreeMap<&'static str, u64>>,
    slow_consumer_disconnects: Cell<u64>,
    /// Requests refused by a rate limit, by scope (address, principal, login).
    rate_limited: [Cell<u64>; 3],
    http_requests: RefCell<BTreeMap<(&'static str, u16), u64>>,
    publish_duration: RefCell<LatencyHistogram>,
    delivery_lag: RefCell<LatencyHistogram>,
    /// Open WebSocket sessions and SSE streams (parked polls are counted by the registry).
    websockets: Cell<i64>,
    event_streams: Cell<i64>,
    /// When the busy ratio was last sampled (glommio's executor stats reset on each read).
    busy_since: Cell<Instant>,
    /// `metrics.per_topic`: received/delivered per topic, at most `cap` topics (the rest
    /// count under `_other`), so a client inventing topic names cannot blow up the series.
    per_topic: Option<(usize, RefCell<TopicCounts>)>,
    /// Consumer groups by (topic, group): counters, and the gauges the topic's owner last
    /// read; at most `group_cap` series (the rest count under `_other`).
    groups: RefCell<BTreeMap<(String, String), GroupSeries>>,
    group_cap: usize,
}

/// One consumer group's series.
#[derive(Debug, Clone, Default)]
pub struct GroupSeries {
    /// Messages handed to consumers (first deliveries and redeliveries).
    pub delivered: u64,
    pub redelivered: u64,
    pub dead_lettered: u64,
    pub acked: u64,
    /// Unacknowledged and not-yet-delivered messages, with when they were read (exported
    /// while fresh: the owner refreshes them while the group has consumers here).
    pub pending: u64,
    pub lag: Option<u64>,
    pub gauged_at: Option<Instant>,
}

/// What a group event adds to its series.
#[derive(Debug, Clone, Copy)]
pub enum GroupEvent {
    Delivered(u64),
    Redelivered(u64),
    DeadLettered(u64),
    Acked(u64),
}

/// Gauges older than this are not exported (the group has no consumer here any more).
const GROUP_GAUGE_FRESH: Duration = Duration::from_secs(60);

impl Default for ShardMetrics {
    fn default() -> Self {
        ShardMetrics::new(None)
    }
}

/// Per topic `[received, delivered]`.
type TopicCounts = BTreeMap<String, [u64; 2]>;

/// Group series kept when per-topic metrics are off (with them: `metrics.max_topic_series`).
const DEFAULT_GROUP_SERIES: usize = 1000;

/// The label value that collects topics beyond `metrics.max_topic_series`.
const OTHER_TOPICS: &str = "_other";

impl ShardMetrics {
    /// `per_topic_cap`: `Some(max series)` when `metrics.per_topic` is on.
    pub fn new(per_topic_cap: Option<usize>) -> ShardMetrics {
        ShardMetrics {
            received: Default::default(),
            delivered: Default::default(),
            rejected: RefCell::new(BTreeMap::new()),
            auth_failures: RefCell::new(BTreeMap::new()),
            slow_consumer_disconnects: Cell::new(0),
            rate_limited: Default::default(),
            http_requests: RefCell::new(BTreeMap::new()),
            publish_duration: RefCell::new(LatencyHistogram::new()),
            delivery_lag: RefCell::new(LatencyHistogram::new()),
            websockets: Cell::new(0),
            event_streams: Cell::new(0),
            busy_since: Cell::new(Instant::now()),
            per_topic: per_topic_cap.map(|cap| (cap, RefCell::new(BTreeMap::new()))),
            groups: RefCell::new(BTreeMap::new()),
            group_cap: per_topic_cap.unwrap_or(DEFAULT_GROUP_SERIES),
        }
    }

    /// The series of `(topic, group)`, or `_other` beyond the cap.
    fn with_group(&self, topic: &str, group: &str, f: impl FnOnce(&mut GroupSeries)) {
        let mut groups = self.groups.borrow_mut();
        let key = (topic.to_owned(), group.to_owned());
        if let Some(series) = groups.get_mut(&key) {
            return f(series);
        }
        let key = if groups.len() + 1 < self.group_cap {
            key
        } else {
            (OTHER_TOPICS.to_owned(), OTHER_TOPICS.to_owned())
        };
        f(groups.entry(key).or_default())
    }

    pub fn group(&self, topic: &str, group: &str, event: GroupEvent) {
        self.with_group(topic, group, |s| match event {
            GroupEvent::Delivered(n) => s.delivered += n,
            GroupEvent::Redelivered(n) => s.redelivered += n,
            GroupEvent::DeadLettered(n) => s.dead_lettered += n,
            GroupEvent::Acked(n) => s.acked += n,
        });
    }

    /// The owner's latest reading of a group's pending count and lag.
    pub fn group_gauges(&self, topic: &str, group: &str, pending: u64, lag: Option<u64>) {
        self.with_group(topic, group, |s| {
            s.pending = pending;
            s.lag = lag;
            s.gauged_at = Some(Instant::now());
        });
    }

    /// When the gauges of `(topic, group)` were last read here.
    pub fn group_gauged_at(&self, topic: &str, group: &str) -> Option<Instant> {
        self.groups
            .borrow()
            .get(&(topic.to_owned(), group.to_owned()))
            .and_then(|s| s.gauged_at)
    }

    /// Counts a message of `topic` received (`which` 0) or delivered (1), when per-topic
    /// metrics are on.
    pub fn per_topic(&self, topic: &str, which: usize, n: u64) {
        let Some((cap, map)) = &self.per_topic else {
            return;
        };
        let mut map = map.borrow_mut();
        if let Some(counts) = map.get_mut(topic) {
            counts[which] += n;
            return;
        }
        // `_other` itself takes one of the `cap` places once it is needed.
        let key = if map.len() + 1 < *cap {
            topic
        } else {
            OTHER_TOPICS
        };
        map.entry(key.to_owned()).or_insert([0; 2])[which] += n;
    }

    pub fn per_topic_enabled(&self) -> bool {
        self.per_topic.is_some()
    }

    pub fn received(&self, ingress: Ingress, n: u64) {
        let c = &self.received[ingress as usize];
        c.set(c.get() + n);
    }

    pub fn delivered(&self, egress: Egress, n: u64) {
        let c = &self.delivered[egress as usize];
        c.set(c.get() + n);
    }

    /// A message not accepted, by error code (`INVALID_TOPIC`, `SERVICE_UNAVAILABLE`, ...).
    pub fn rejected(&self, reason: &'static str, n: u64) {
        *self.rejected.borrow_mut().entry(reason).or_insert(0) += n;
    }

    pub fn auth_failure(&self, reason: &'static str) {
        *self.auth_failures.borrow_mut().entry(reason).or_insert(0) += 1;
    }

    pub fn slow_consumer_disconnect(&self) {
        self.slow_consumer_disconnects
            .set(self.slow_consumer_disconnects.get() + 1);
    }

    /// A request refused with 429 by the limit of `scope`.
    pub fn rate_limited(&self, scope: Scope) {
        let c = &self.rate_limited[scope as usize];
        c.set(c.get() + 1);
    }

    pub fn http_request(&self, route: &'static str, status: u16) {
        *self
            .http_requests
            .borrow_mut()
            .entry((route, status))
            .or_insert(0) += 1;
    }

    pub fn publish_duration(&self, d: Duration) {
        self.publish_duration.borrow_mut().record(d);
    }

    pub fn delivery_lag(&self, d: Duration) {
        self.delivery_lag.borrow_mut().record(d);
    }

    pub fn websocket_opened(&self, delta: i64) {
        self.websockets.set(self.websockets.get() + delta);
    }

    pub fn event_stream_opened(&self, delta: i64) {
        self.event_streams.set(self.event_streams.get() + delta);
    }

    /// A copy for the scrape; `busy_ratio` is the share of wall time the executor spent
    /// running tasks or polling I/O since the previous snapshot.
    pub fn snapshot(&self, shard: usize) -> Snapshot {
        let stats = glommio::executor().executor_stats();
        let now = Instant::now();
        let wall = now
            .duration_since(self.busy_since.replace(now))
            .as_secs_f64();
        let busy_ratio = if wall > 0.0 {
            (stats.total_runtime().as_secs_f64() / wall).min(1.0)
        } else {
            0.0
        };
        Snapshot {
            shard,
            received: [self.received[0].get(), self.received[1].get()],
            delivered: [
                self.delivered[0].get(),
                self.delivered[1].get(),
                self.delivered[2].get(),
            ],
            rejected: self
                .rejected
                .borrow()
                .iter()
                .map(|(k, v)| ((*k).to_owned(), *v))
                .collect(),
            auth_failures: self
                .auth_failures
                .borrow()
                .iter()
                .map(|(k, v)| ((*k).to_owned(), *v))
                .collect(),
            slow_consumer_disconnects: self.slow_consumer_disconnects.get(),
            rate_limited: [
                self.rate_limited[0].get(),
                self.rate_limited[1].get(),
                self.rate_limited[2].get(),
            ],
            http_requests: self
                .http_requests
                .borrow()
                .iter()
                .map(|((r, s), v)| (((*r).to_owned(), *s), *v))
                .collect(),
            publish_duration: self.publish_duration.borrow().clone(),
            delivery_lag: self.delivery_lag.borrow().clone(),
            websockets: self.websockets.get(),
            event_streams: self.event_streams.get(),
            busy_ratio,
            per_topic: self
                .per_topic
                .as_ref()
                .map(|(_, map)| map.borrow().clone())
                .unwrap_or_default(),
            groups: self
                .groups
                .borrow()
                .iter()
                .map(|(k, v)| {
                    let mut v = v.clone();
                    if v.gauged_at
                        .is_none_or(|at| at.elapsed() > GROUP_GAUGE_FRESH)
                    {
                        v.gauged_at = None;
                    }
                    (k.clone(), v)
                })
                .collect(),
            ..Snapshot::empty(shard)
        }
    }
}

/// What one shard reports at a scrape (and to `/api/v1/stats`). `Send`.
#[derive(Clone)]
pub struct Snapshot {
    pub shard: usize,
    pub received: [u64; 2],
    pub delivered: [u64; 3],
    pub rejected: BTreeMap<String, u64>,
    pub auth_failures: BTreeMap<String, u64>,
    pub slow_consumer_disconnects: u64,
    /// Requests refused with 429, by [`Scope`] (address, principal, login).
    pub rate_limited: [u64; 3],
    pub http_requests: BTreeMap<(String, u16), u64>,
    pub publish_duration: LatencyHistogram,
    pub delivery_lag: LatencyHistogram,
    pub websockets: i64,
    pub event_streams: i64,
    pub busy_ratio: f64,
    /// Filled by the shard: parked long-polls, open connections, rate-limit buckets held
    /// (address, principal, login), consumers, storage counts.
    pub parked_polls: usize,
    pub connections: usize,
    pub rate_limit_buckets: [usize; 3],
    pub consumers: usize,
    pub storage: StorageSummary,
    pub valkey: Option<ValkeySnapshot>,
    /// The external-token issuer's key set (process-wide: every shard reports the same).
    pub jwks: Option<crate::auth::jwks::JwksStats>,
    /// Per-topic `[received, delivered]`, when `metrics.per_topic` is on.
    pub per_topic: BTreeMap<String, [u64; 2]>,
    /// Consumer groups' series by (topic, group); `gauged_at: None` = no fresh gauges.
    pub groups: BTreeMap<(String, String), GroupSeries>,
}

/// The Valkey side of a shard's snapshot.
#[derive(Clone, Default)]
pub struct ValkeySnapshot {
    pub operations: BTreeMap<String, u64>,
    pub errors: BTreeMap<String, u64>,
    pub batch_sizes: Option<Histogram<u64>>,
    pub pending: usize,
    pub connected: bool,
    /// Master changes this shard's client followed (Sentinel).
    pub failovers: u64,
}

impl Snapshot {
    pub fn empty(shard: usize) -> Snapshot {
        Snapshot {
            shard,
            received: [0; 2],
            delivered: [0; 3],
            rejected: BTreeMap::new(),
            auth_failures: BTreeMap::new(),
            slow_consumer_disconnects: 0,
            rate_limited: [0; 3],
            http_requests: BTreeMap::new(),
            publish_duration: LatencyHistogram::new(),
            delivery_lag: LatencyHistogram::new(),
            websockets: 0,
            event_streams: 0,
            busy_ratio: 0.0,
            parked_polls: 0,
            connections: 0,
            rate_limit_buckets: [0; 3],
            consumers: 0,
            storage: StorageSummary::default(),
            valkey: None,
            jwks: None,
            per_topic: BTreeMap::new(),
            groups: BTreeMap::new(),
        }
    }
}

/// Prometheus label value escaping: backslash, double quote and newline.
pub fn escape_label(value: &str) -> String {
    let mut out = String::with_capacity(value.len());
    for c in value.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
    out
}

fn header(out: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(out, "# HELP {name} {help}");
    let _ = writeln!(out, "# TYPE {name} {kind}");
}

fn latency_histogram(out: &mut String, name: &str, help: &str, h: &LatencyHistogram) {
    header(out, name, "histogram", help);
    for &le in LATENCY_BUCKETS {
        let bound_us = (le * 1_000_000.0) as u64;
        let n = if h.micros.is_empty() {
            0
        } else {
            h.micros.count_between(0, bound_us)
        };
        let _ = writeln!(out, "{name}_bucket{{le=\"{le}\"}} {n}");
    }
    let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {}", h.count());
    let _ = writeln!(out, "{name}_sum {}", h.sum_micros as f64 / 1_000_000.0);
    let _ = writeln!(out, "{name}_count {}", h.count());
}

/// Renders every shard's snapshot as one exposition.
pub fn render(shards: &[Snapshot], version: &str) -> String {
    let mut out = String::with_capacity(8 << 10);
    let mut total = Snapshot::empty(0);
    let mut batch: Option<Histogram<u64>> = None;
    let mut valkey_ops: BTreeMap<String, u64> = BTreeMap::new();
    let mut valkey_errors: BTreeMap<String, u64> = BTreeMap::new();
    let mut any_valkey = false;
    // Every shard follows each failover itself: the relay followed as many as the shard
    // that followed most (a sum would count each failover once per shard).
    let mut failovers: u64 = 0;
    for s in shards {
        for i in 0..2 {
            total.received[i] += s.received[i];
        }
        for i in 0..3 {
            total.delivered[i] += s.delivered[i];
        }
        for (k, v) in &s.rejected {
            *total.rejected.entry(k.clone()).or_insert(0) += v;
        }
        for (k, v) in &s.auth_failures {
            *total.auth_failures.entry(k.clone()).or_insert(0) += v;
        }
        for (k, v) in &s.http_requests {
            *total.http_requests.entry(k.clone()).or_insert(0) += v;
        }
        total.slow_consumer_disconnects += s.slow_consumer_disconnects;
        for i in 0..3 {
            total.rate_limited[i] += s.rate_limited[i];
        }
        total.publish_duration.merge(&s.publish_duration);
        total.delivery_lag.merge(&s.delivery_lag);
        total.websockets += s.websockets;
        total.event_streams += s.event_streams;
        total.parked_polls += s.parked_polls;
        total.connections += s.connections;
        total.storage = total.storage + s.storage;
        for (key, series) in &s.groups {
            let t = total.groups.entry(key.clone()).or_default();
            t.delivered += series.delivered;
            t.redelivered += series.redelivered;
            t.dead_lettered += series.dead_lettered;
            t.acked += series.acked;
            if series.gauged_at.is_some() {
                // Only the topic's owner reads them: no shard double counts.
                t.pending += series.pending;
                t.lag = match (t.lag, series.lag) {
                    (Some(a), Some(b)) => Some(a + b),
                    (a, b) => a.or(b),
                };
                t.gauged_at = series.gauged_at;
            }
        }
        for (topic, counts) in &s.per_topic {
            let t = total.per_topic.entry(topic.clone()).or_insert([0; 2]);
            t[0] += counts[0];
            t[1] += counts[1];
        }
        if let Some(v) = &s.valkey {
            any_valkey = true;
            failovers = failovers.max(v.failovers);
            for (k, n) in &v.operations {
                *valkey_ops.entry(k.clone()).or_insert(0) += n;
            }
            for (k, n) in &v.errors {
                *valkey_errors.entry(k.clone()).or_insert(0) += n;
            }
            if let Some(h) = &v.batch_sizes {
                match batch.as_mut() {
                    Some(b) => {
                        let _ = b.add(h);
                    }
                    None => batch = Some(h.clone()),
                }
            }
        }
    }

    header(
        &mut out,
        "relay_build_info",
        "gauge",
        "Build information; always 1.",
    );
    let _ = writeln!(
        out,
        "relay_build_info{{version=\"{}\"}} 1",
        escape_label(version)
    );

    header(
        &mut out,
        "relay_messages_received_total",
        "counter",
        "Messages received by publish transport (accepted or not).",
    );
    let _ = writeln!(
        out,
        "relay_messages_received_total{{transport=\"http_single\"}} {}",
        total.received[0]
    );
    let _ = writeln!(
        out,
        "relay_messages_received_total{{transport=\"http_bulk\"}} {}",
        total.received[1]
    );

    header(
        &mut out,
        "relay_messages_rejected_total",
        "counter",
        "Messages not accepted, by reason (error code).",
    );
    for (reason, n) in &total.rejected {
        let _ = writeln!(
            out,
            "relay_messages_rejected_total{{reason=\"{}\"}} {n}",
            escape_label(reason)
        );
    }

    header(
        &mut out,
        "relay_auth_failures_total",
        "counter",
        "Requests refused by authentication or authorization, by reason (missing, invalid, \
         revoked, unknown_user, inactive, forbidden, login_failed, unavailable).",
    );
    for (reason, n) in &total.auth_failures {
        let _ = writeln!(
            out,
            "relay_auth_failures_total{{reason=\"{}\"}} {n}",
            escape_label(reason)
        );
    }

    // One set of keys for the process: the first shard's report is everyone's.
    if let Some(jwks) = shards.iter().find_map(|s| s.jwks) {
        header(
            &mut out,
            "relay_jwks_refreshes_total",
            "counter",
            "Fetches of the external-token issuer's JWKS, by outcome (a failed one keeps the \
             keys held).",
        );
        let _ = writeln!(
            out,
            "relay_jwks_refreshes_total{{outcome=\"ok\"}} {}",
            jwks.refreshes_ok
        );
        let _ = writeln!(
            out,
            "relay_jwks_refreshes_total{{outcome=\"error\"}} {}",
            jwks.refreshes_failed
        );
        header(
            &mut out,
            "relay_jwks_keys",
            "gauge",
            "Keys held from the issuer's JWKS that the configured algorithm can use.",
        );
        let _ = writeln!(out, "relay_jwks_keys {}", jwks.keys);
    }

    header(
        &mut out,
        "relay_messages_delivered_total",
        "counter",
        "Messages written to consumers, by transport.",
    );
    for (i, name) in ["websocket", "longpoll", "sse"].iter().enumerate() {
        let _ = writeln!(
            out,
            "relay_messages_delivered_total{{transport=\"{name}\"}} {}",
            total.delivered[i]
        );
    }

    header(
        &mut out,
        "relay_slow_consumer_disconnects_total",
        "counter",
        "Consumers cut off for falling too far behind.",
    );
    let _ = writeln!(
        out,
        "relay_slow_consumer_disconnects_total {}",
        total.slow_consumer_disconnects
    );

    header(
        &mut out,
        "relay_rate_limited_total",
        "counter",
        "Requests refused with 429 by a rate limit, by scope (address, principal, login).",
    );
    for scope in Scope::ALL {
        let _ = writeln!(
            out,
            "relay_rate_limited_total{{scope=\"{}\"}} {}",
            scope.as_str(),
            total.rate_limited[scope as usize]
        );
    }

    latency_histogram(
        &mut out,
        "relay_publish_duration_seconds",
        "Publish request received to acknowledged.",
        &total.publish_duration,
    );
    latency_histogram(
        &mut out,
        "relay_delivery_lag_seconds",
        "Message acknowledged to written to a consumer socket.",
        &total.delivery_lag,
    );

    header(
        &mut out,
        "relay_connections",
        "gauge",
        "Open client connections by transport.",
    );
    let http = total.connections as i64 - total.websockets - total.event_streams;
    let _ = writeln!(
        out,
        "relay_connections{{transport=\"http\"}} {}",
        http.max(0)
    );
    let _ = writeln!(
        out,
        "relay_connections{{transport=\"websocket\"}} {}",
        total.websockets
    );
    let _ = writeln!(
        out,
        "relay_connections{{transport=\"sse\"}} {}",
        total.event_streams
    );
    let _ = writeln!(
        out,
        "relay_connections{{transport=\"longpoll\"}} {}",
        total.parked_polls
    );

    header(
        &mut out,
        "relay_hot_tier_messages",
        "gauge",
        "Messages held in the in-memory tier.",
    );
    let _ = writeln!(out, "relay_hot_tier_messages {}", total.storage.messages);
    header(
        &mut out,
        "relay_hot_tier_bytes",
        "gauge",
        "Bytes charged to the memory budget by the in-memory tier.",
    );
    let _ = writeln!(out, "relay_hot_tier_bytes {}", total.storage.bytes);
    header(
        &mut out,
        "relay_hot_tier_evictions_total",
        "counter",
        "Messages evicted from memory by the byte budget.",
    );
    let _ = writeln!(
        out,
        "relay_hot_tier_evictions_total {}",
        total.storage.evictions
    );
    header(
        &mut out,
        "relay_topics",
        "gauge",
        "Topics known to the relay.",
    );
    let _ = writeln!(out, "relay_topics {}", total.storage.topics);

    header(
        &mut out,
        "relay_http_requests_total",
        "counter",
        "HTTP requests by route and status.",
    );
    for ((route, status), n) in &total.http_requests {
        let _ = writeln!(
            out,
            "relay_http_requests_total{{route=\"{}\",status=\"{status}\"}} {n}",
            escape_label(route)
        );
    }

    header(
        &mut out,
        "relay_shard_busy_ratio",
        "gauge",
        "Share of wall time each shard's executor was busy since the previous scrape.",
    );
    for s in shards {
        let _ = writeln!(
            out,
            "relay_shard_busy_ratio{{shard=\"{}\"}} {:.4}",
            s.shard, s.busy_ratio
        );
    }

    header(
        &mut out,
        "relay_valkey_operations_total",
        "counter",
        "Valkey commands issued, by command.",
    );
    for (op, n) in &valkey_ops {
        let _ = writeln!(
            out,
            "relay_valkey_operations_total{{op=\"{}\"}} {n}",
            escape_label(op)
        );
    }
    header(
        &mut out,
        "relay_valkey_errors_total",
        "counter",
        "Valkey failures, by kind.",
    );
    for (kind, n) in &valkey_errors {
        let _ = writeln!(
            out,
            "relay_valkey_errors_total{{kind=\"{}\"}} {n}",
            escape_label(kind)
        );
    }
    header(
        &mut out,
        "relay_valkey_failovers_total",
        "counter",
        "Valkey master changes (Sentinel failovers) the relay followed.",
    );
    if any_valkey {
        let _ = writeln!(out, "relay_valkey_failovers_total {failovers}");
    }
    header(
        &mut out,
        "relay_valkey_pipeline_batch_size",
        "histogram",
        "Commands per Valkey pipeline batch (group commit).",
    );
    let (count, sum) = batch
        .as_ref()
        .map_or((0, 0.0), |h| (h.len(), h.mean() * h.len() as f64));
    for &le in BATCH_BUCKETS {
        let n = batch
            .as_ref()
            .filter(|h| !h.is_empty())
            .map_or(0, |h| h.count_between(0, le));
        let _ = writeln!(
            out,
            "relay_valkey_pipeline_batch_size_bucket{{le=\"{le}\"}} {n}"
        );
    }
    let _ = writeln!(
        out,
        "relay_valkey_pipeline_batch_size_bucket{{le=\"+Inf\"}} {count}"
    );
    let _ = writeln!(out, "relay_valkey_pipeline_batch_size_sum {}", sum.round());
    let _ = writeln!(out, "relay_valkey_pipeline_batch_size_count {count}");
    if !total.per_topic.is_empty() {
        header(&mut out, "relay_topic_messages_received_total", "counter", "Messages received per topic (metrics.per_topic; capped, the rest under topic=\"_other\").");
        for (topic, counts) in &total.per_topic {
            let _ = writeln!(
                out,
                "relay_topic_messages_received_total{{topic=\"{}\"}} {}",
                escape_label(topic),
                counts[0]
            );
        }
        header(
            &mut out,
            "relay_topic_messages_delivered_total",
            "counter",
            "Messages delivered per topic (metrics.per_topic; capped).",
        );
        for (topic, counts) in &total.per_topic {
            let _ = writeln!(
                out,
                "relay_topic_messages_delivered_total{{topic=\"{}\"}} {}",
                escape_label(topic),
                counts[1]
            );
        }
    }
    render_groups(&mut out, &total.groups);
    header(
        &mut out,
        "relay_valkey_connected",
        "gauge",
        "Shards whose Valkey connection is up (absent with the memory backend).",
    );
    if any_valkey {
        let _ = writeln!(
            out,
            "relay_valkey_connected {}",
            total.storage.connected_shards
        );
    }
    out
}

/// The consumer-group series (see docs/work-queues.md).
/// The families are declared even with no group, so dashboards and alerts find them.
fn render_groups(out: &mut String, groups: &BTreeMap<(String, String), GroupSeries>) {
    type Pick = fn(&GroupSeries) -> Option<u64>;
    let series: [(&str, &str, &str, Pick); 6] = [
        ("relay_group_deliveries_total", "counter", "Messages handed to consumer-group consumers (redeliveries included), by topic and group (capped).", |s| Some(s.delivered)),
        ("relay_group_redeliveries_total", "counter", "Messages handed out again after their ack timeout or a nack, by topic and group (capped).", |s| Some(s.redelivered)),
        ("relay_group_dead_letters_total", "counter", "Messages moved to the dead-letter topic after max_deliveries, by topic and group (capped).", |s| Some(s.dead_lettered)),
        ("relay_group_acks_total", "counter", "Acknowledgements that settled a message, by topic and group (capped).", |s| Some(s.acked)),
        ("relay_group_pending", "gauge", "Messages delivered and not yet acknowledged, by topic and group (while the group has consumers on this relay).", |s| s.gauged_at.map(|_| s.pending)),
        ("relay_group_lag_messages", "gauge", "Messages not yet delivered to any consumer of the group, by topic and group (while it has consumers on this relay).", |s| s.gauged_at.and(s.lag)),
    ];
    for (name, kind, help, pick) in series {
        header(out, name, kind, help);
        for ((topic, group), s) in groups {
            if let Some(v) = pick(s) {
                let _ = writeln!(
                    out,
                    "{name}{{topic=\"{}\",group=\"{}\"}} {v}",
                    escape_label(topic),
                    escape_label(group)
                );
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn per_topic_series_are_capped() {
        let m = ShardMetrics::new(Some(3));
        for t in ["a", "b", "c", "d", "a"] {
            m.per_topic(t, 0, 1);
        }
        let map = m
            .per_topic
            .as_ref()
            .map(|(_, m)| m.borrow().clone())
            .unwrap_or_default();
        assert_eq!(map.len(), 3, "{map:?}");
        assert_eq!(map.get("a"), Some(&[2, 0]));
        assert_eq!(map.get("_other"), Some(&[2, 0]));
        assert!(!ShardMetrics::new(None).per_topic_enabled());
    }

    #[test]
    fn labels_are_escaped() {
        assert_eq!(escape_label("a\"b\\c\nd"), "a\\\"b\\\\c\\nd");
    }

    #[test]
    fn histogram_buckets_are_cumulative() {
        let mut h = LatencyHistogram::new();
        h.record(Duration::from_micros(80));
        h.record(Duration::from_millis(3));
        let mut snap = Snapshot::empty(0);
        snap.publish_duration = h;
        let text = render(&[snap], "t");
        assert!(
            text.contains("relay_publish_duration_seconds_bucket{le=\"0.0001\"} 1\n"),
            "{text}"
        );
        assert!(
            text.contains("relay_publish_duration_seconds_bucket{le=\"0.005\"} 2\n"),
            "{text}"
        );
        assert!(
            text.contains("relay_publish_duration_seconds_count 2\n"),
            "{text}"
        );
        assert!(text.contains("# TYPE relay_publish_duration_seconds histogram\n"));
    }
}
