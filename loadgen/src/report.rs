//! The final report: one struct, printed as a table (default) or as one JSON object
//! (`--json`, field names as in the struct).
//!
//! Owns presentation only; the numbers come from the scenarios. Latencies are microseconds
//! in JSON and auto-scaled (µs, ms, s) in the table.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use serde::Serialize;

use crate::churn::ChurnReport;
use crate::soak::SoakReport;
use crate::stats::LatencySummary;
use crate::verify::Verdict;

#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub scenario: &'static str,
    pub target: &'static str,
    pub url: String,
    /// `--publish-url`s, when publishes went elsewhere than `url`.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub publish_urls: Vec<String>,
    /// `closed` (each connection sends when answered) or `open` (fixed rate).
    pub mode: &'static str,
    pub rate: Option<f64>,
    pub connections: usize,
    pub topics: usize,
    pub payload_bytes: usize,
    pub batch: Option<usize>,
    pub warmup_s: f64,
    /// From the end of the warm-up to the last measured answer.
    pub measured_s: f64,
    /// Messages whose publish was attempted in the measured phase (connections, for the
    /// connections scenario).
    pub sent: u64,
    /// Of `sent`, acknowledged (2xx; for bulk, items `accepted`).
    pub acknowledged: u64,
    /// Of `sent`, failed; `failures` breaks it down by HTTP status or error kind.
    pub failed: u64,
    pub failures: BTreeMap<String, u64>,
    /// HTTP requests in the measured phase.
    pub requests: u64,
    /// `acknowledged / measured_s`.
    pub throughput_msg_s: f64,
    /// Open loop: measured sends the schedule called for that were never sent because the
    /// generator or the relay fell too far behind before the end.
    pub behind_schedule: Option<u64>,
    /// Acknowledgement latency of measured requests (open loop: from the intended send time).
    pub latency: LatencySummary,
    /// Open loop only: from the actual send time (what the relay alone took).
    pub service_time: Option<LatencySummary>,
    pub delivery: Option<DeliveryReport>,
    pub held: Option<ConnectionsReport>,
    pub churn: Option<ChurnReport>,
    pub soak: Option<SoakReport>,
}

#[derive(Debug, Clone, Serialize)]
pub struct DeliveryReport {
    pub transport: &'static str,
    pub subscribers: usize,
    /// Subscribers that connected and subscribed before publishing began.
    pub subscribers_ready: usize,
    /// Messages received by subscribers whose intended send time was in the measured phase.
    pub deliveries: u64,
    pub deliveries_per_s: f64,
    /// Receive time minus intended send time.
    pub latency: LatencySummary,
    /// With several `--publish-url`s: the same, split by the URL each message was published
    /// through, in their order (subscribers are on `url`: the entry for the same relay is
    /// same-relay latency, the others cross-relay).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub latency_by_publish_url: Vec<UrlLatency>,
    /// Whether every subscriber had everything before `--drain-timeout`.
    pub drained: bool,
    /// Over the whole run (warm-up included): see `verify::Verdict`.
    pub check: Verdict,
    /// Whether any subscriber missed an acknowledged message.
    pub missed: bool,
    pub reconnects: u64,
    /// Subscriber-side events by kind (close codes, disconnects, gap signals, errors).
    pub events: BTreeMap<String, u64>,
}

#[derive(Debug, Clone, Serialize)]
pub struct UrlLatency {
    pub publish_url: String,
    pub latency: LatencySummary,
}

#[derive(Debug, Clone, Serialize)]
pub struct ConnectionsReport {
    pub requested: usize,
    pub established: u64,
    /// Established connections that closed during the hold.
    pub dropped: u64,
    pub hold_s: f64,
    /// Connect, upgrade and subscribe, until `subscribed`.
    pub setup_latency: LatencySummary,
    pub rss_before_kib: Option<u64>,
    pub rss_after_kib: Option<u64>,
    pub rss_per_connection_bytes: Option<f64>,
}

fn fmt_us(us: f64) -> String {
    if us < 1_000.0 {
        format!("{us:.0}µs")
    } else if us < 1_000_000.0 {
        format!("{:.2}ms", us / 1_000.0)
    } else {
        format!("{:.2}s", us / 1_000_000.0)
    }
}

fn fmt_latency(l: &LatencySummary) -> String {
    if l.count == 0 {
        return "-".to_owned();
    }
    format!(
        "p50 {}  p90 {}  p99 {}  p99.9 {}  max {}  (n={})",
        fmt_us(l.p50_us),
        fmt_us(l.p90_us),
        fmt_us(l.p99_us),
        fmt_us(l.p999_us),
        fmt_us(l.max_us),
        l.count
    )
}

fn fmt_rate(r: f64) -> String {
    if r >= 10_000.0 {
        format!("{:.1}k", r / 1000.0)
    } else {
        format!("{r:.0}")
    }
}

fn fmt_kinds(kinds: &BTreeMap<String, u64>) -> String {
    kinds
        .iter()
        .map(|(k, v)| format!("{k}: {v}"))
        .collect::<Vec<_>>()
        .join(", ")
}

impl Report {
    pub fn to_json(&self) -> String {
        // Plain data (strings, numbers, maps with string keys): serialization cannot fail.
        serde_json::to_string_pretty(self).unwrap_or_default()
    }

    pub fn to_table(&self) -> String {
        let mut out = String::new();
        let mut row = |name: &str, value: String| {
            let _ = writeln!(out, "  {name:<20} {value}");
        };
        let mode = match self.rate {
            Some(r) => format!("open loop at {} msg/s", fmt_rate(r)),
            None => "closed loop".to_owned(),
        };
        let batch = self
            .batch
            .map(|b| format!(", batches of {b}"))
            .unwrap_or_default();
        let mut head = format!(
            "loadgen {} -> {} ({})\n  {mode}, {} connection(s), {} topic(s), {}-byte payloads{batch}\n  measured {:.2} s after {:.2} s warm-up\n",
            self.scenario,
            self.url,
            self.target,
            self.connections,
            self.topics,
            self.payload_bytes,
            self.measured_s,
            self.warmup_s
        );
        if !self.publish_urls.is_empty() {
            let _ = writeln!(
                head,
                "  publishing through {}",
                self.publish_urls.join(", ")
            );
        }
        if self.held.is_some() {
            head = format!(
                "loadgen {} -> {} ({})\n",
                self.scenario, self.url, self.target
            );
        }
        if let Some(h) = &self.held {
            row("requested", h.requested.to_string());
            row("established", h.established.to_string());
            row(
                "failed",
                format!("{}{}", self.failed, paren(&self.failures)),
            );
            row("dropped during hold", h.dropped.to_string());
            row("held for", format!("{:.1} s", h.hold_s));
            row("setup latency", fmt_latency(&h.setup_latency));
            match (h.rss_before_kib, h.rss_after_kib) {
                (Some(b), Some(a)) => {
                    row("relay RSS", format!("{b} KiB -> {a} KiB"));
                    if let Some(per) = h.rss_per_connection_bytes {
                        row("RSS per connection", format!("{per:.0} bytes"));
                    }
                }
                _ => row("relay RSS", "- (no --relay-pid)".to_owned()),
            }
            return head + &out;
        }
        row("sent", self.sent.to_string());
        row("acknowledged", self.acknowledged.to_string());
        row(
            "failed",
            format!("{}{}", self.failed, paren(&self.failures)),
        );
        if self.batch.is_some() {
            row("requests", self.requests.to_string());
        }
        row(
            "throughput",
            format!("{} msg/s", fmt_rate(self.throughput_msg_s)),
        );
        if let Some(b) = self.behind_schedule {
            row("behind schedule", format!("{b} never sent"));
        }
        row("ack latency", fmt_latency(&self.latency));
        if let Some(s) = &self.service_time {
            row("service time", fmt_latency(s));
        }
        if let Some(d) = &self.delivery {
            row(
                "subscribers",
                format!(
                    "{} over {} ({} ready)",
                    d.subscribers, d.transport, d.subscribers_ready
                ),
            );
            row("deliveries", d.deliveries.to_string());
            row("deliveries/s", fmt_rate(d.deliveries_per_s));
            row("delivery latency", fmt_latency(&d.latency));
            for by_url in &d.latency_by_publish_url {
                row(
                    &format!("  via {}", by_url.publish_url),
                    fmt_latency(&by_url.latency),
                );
            }
            let c = &d.check;
            row(
                "lost",
                format!("{} of {} owed deliveries", c.lost, c.expected),
            );
            row("duplicated", c.duplicated.to_string());
            row("reordered", c.reordered.to_string());
            row(
                "missed",
                if d.missed {
                    format!(
                        "yes: {} subscriber(s) lost messages",
                        c.subscribers_with_loss
                    )
                } else {
                    "no subscriber missed a message".to_owned()
                },
            );
            if c.unacked_delivered > 0 || c.foreign > 0 {
                row(
                    "also delivered",
                    format!(
                        "{} whose publish failed, {} foreign",
                        c.unacked_delivered, c.foreign
                    ),
                );
            }
            if !d.drained {
                row("drained", "no: --drain-timeout passed first".to_owned());
            }
            if d.reconnects > 0 || !d.events.is_empty() {
                row(
                    "subscriber events",
                    format!("{} reconnect(s){}", d.reconnects, paren(&d.events)),
                );
            }
        }
        if let Some(c) = &self.churn {
            row(
                "connections",
                format!(
                    "{} at once (peak {}), lives {:.1}-{:.1} s",
                    c.concurrent, c.peak_open, c.life_min_s, c.life_max_s
                ),
            );
            row(
                "connects",
                format!(
                    "{} ({}/s over {:.1} s)",
                    c.connects,
                    fmt_rate(c.connects_per_s),
                    c.churn_s
                ),
            );
            row(
                "disconnects",
                format!("{} by us, {} by the relay", c.disconnects, c.dropped),
            );
            row(
                "errors",
                format!("{}{}", c.errors.values().sum::<u64>(), paren(&c.errors)),
            );
            row("messages received", c.messages_received.to_string());
            let holds = |h: &Option<crate::churn::RelayHolds>| match h {
                Some(h) => format!(
                    "{} connections, {} websocket sessions, {} subscribers",
                    h.connections, h.websocket_sessions, h.subscribers
                ),
                None => "- (no /api/v1/stats)".to_owned(),
            };
            row("relay before", holds(&c.baseline));
            row("relay after", holds(&c.after));
            row(
                "settled",
                if c.settled {
                    format!("yes, {:.2} s after the last close", c.settle_s)
                } else {
                    format!("NO, still off after {:.1} s", c.settle_s)
                },
            );
            let kib = |k: Option<u64>| k.map_or("-".to_owned(), |k| format!("{k} KiB"));
            row(
                "relay RSS",
                format!(
                    "{} before, {} peak, {} after",
                    kib(c.rss_before_kib),
                    kib(c.rss_peak_kib),
                    kib(c.rss_after_kib)
                ),
            );
        }
        if let Some(s) = &self.soak {
            for t in &s.transports {
                let c = &t.check;
                row(
                    &format!("{} subscribers", t.transport),
                    format!(
                        "{} ({} ready), {} reconnect(s), drained: {}",
                        t.subscribers,
                        t.subscribers_ready,
                        t.reconnects,
                        if t.drained { "yes" } else { "NO" }
                    ),
                );
                row(
                    &format!("{} delivery", t.transport),
                    format!(
                        "lost {} / duplicated {} / reordered {} of {} owed",
                        c.lost, c.duplicated, c.reordered, c.expected
                    ),
                );
                if !t.events.is_empty() {
                    row(&format!("{} events", t.transport), fmt_kinds(&t.events));
                }
            }
            let r = &s.relay_rss;
            let mib =
                |k: Option<u64>| k.map_or("-".to_owned(), |k| format!("{:.1}", k as f64 / 1024.0));
            row(
                "relay RSS MiB",
                format!(
                    "first {} min {} max {} last {} ({} samples)",
                    mib(r.first_kib),
                    mib(r.min_kib),
                    mib(r.max_kib),
                    mib(r.last_kib),
                    r.samples
                ),
            );
        }
        head + &out
    }
}

/// ` (kind: n, ...)`, or nothing.
fn paren(kinds: &BTreeMap<String, u64>) -> String {
    if kinds.is_empty() {
        String::new()
    } else {
        format!(" ({})", fmt_kinds(kinds))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn latencies_scale_their_unit() {
        assert_eq!(fmt_us(12.4), "12µs");
        assert_eq!(fmt_us(1_500.0), "1.50ms");
        assert_eq!(fmt_us(2_500_000.0), "2.50s");
    }
}
