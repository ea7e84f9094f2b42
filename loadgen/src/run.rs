//! What every part of one run shares: the target, the clock, the topics, the counters, the
//! phase, and the once-a-second progress line on stderr.
//!
//! The clock is one `Instant` (the epoch) read by publishers and subscribers of this process,
//! so `receive time - sent_ns` needs no clock synchronisation. Does not own scenario logic.

use std::io::Write as _;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::http::Endpoint;
use crate::payload::BodyBuilder;
use crate::stats::Counters;
use crate::target::Target;

/// Where the run is; shown in progress lines.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Phase {
    Setup = 0,
    Warmup = 1,
    Measure = 2,
    Drain = 3,
    Hold = 4,
}

impl Phase {
    fn name(v: u8) -> &'static str {
        match v {
            0 => "setup",
            1 => "warmup",
            2 => "measure",
            3 => "drain",
            _ => "hold",
        }
    }
}

pub struct RunCtx {
    /// Where subscribers (and, without `--publish-url`, publishers) go.
    pub endpoint: Endpoint,
    /// Where publishers go (`--publish-url`, else `endpoint` alone); never empty.
    pub publish_endpoints: Vec<Endpoint>,
    pub target: Target,
    /// Time zero of `sent_ns` and of every `now_ns`.
    pub epoch: Instant,
    /// `<prefix>-0 .. <prefix>-(n-1)`.
    pub topics: Vec<String>,
    pub body: BodyBuilder,
    /// Per-request deadline.
    pub timeout: Duration,
    pub counters: Arc<Counters>,
    phase: AtomicU8,
}

impl RunCtx {
    pub fn new(
        endpoint: Endpoint,
        publish_endpoints: Vec<Endpoint>,
        target: Target,
        topics: Vec<String>,
        payload_bytes: usize,
        timeout: Duration,
    ) -> Arc<RunCtx> {
        let publish_endpoints = if publish_endpoints.is_empty() {
            vec![endpoint.clone()]
        } else {
            publish_endpoints
        };
        Arc::new(RunCtx {
            endpoint,
            publish_endpoints,
            target,
            epoch: Instant::now(),
            topics,
            body: BodyBuilder::new(payload_bytes),
            timeout,
            counters: Counters::new(),
            phase: AtomicU8::new(Phase::Setup as u8),
        })
    }

    /// Whether payloads name their publish URL (more than one): what lets subscribers split
    /// delivery latency by the relay a message was published through.
    pub fn tags_publish_url(&self) -> bool {
        self.publish_endpoints.len() > 1
    }

    pub fn elapsed(&self) -> Duration {
        self.epoch.elapsed()
    }

    pub fn now_ns(&self) -> u64 {
        self.epoch.elapsed().as_nanos() as u64
    }

    pub fn set_phase(&self, phase: Phase) {
        self.phase.store(phase as u8, Ordering::Relaxed);
    }

    /// Prints one progress line per second to stderr until the returned task is aborted.
    pub fn spawn_progress(self: &Arc<Self>, quiet: bool) -> Option<tokio::task::JoinHandle<()>> {
        if quiet {
            return None;
        }
        let ctx = self.clone();
        Some(tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(1));
            tick.tick().await;
            let c = &ctx.counters;
            let (mut last_sent, mut last_del) = (0, 0);
            loop {
                tick.tick().await;
                let sent = c.get(&c.sent);
                let deliveries = c.get(&c.deliveries);
                let mut line = format!(
                    "[{:>6.1}s] {:<7} sent {} (+{}/s) acked {} failed {}",
                    ctx.elapsed().as_secs_f64(),
                    Phase::name(ctx.phase.load(Ordering::Relaxed)),
                    sent,
                    sent.saturating_sub(last_sent),
                    c.get(&c.acked),
                    c.get(&c.failed),
                );
                if deliveries > 0 {
                    line.push_str(&format!(
                        " deliveries {} (+{}/s)",
                        deliveries,
                        deliveries.saturating_sub(last_del)
                    ));
                }
                last_sent = sent;
                last_del = deliveries;
                let _ = writeln!(std::io::stderr(), "{line}");
            }
        }))
    }
}

/// Fresh topic names: a run never sees messages of an earlier one, which is what lets
/// subscribers start from "earliest" without replaying history.
pub fn topic_names(prefix: Option<&str>, count: usize) -> Vec<String> {
    let prefix = match prefix {
        Some(p) => p.to_owned(),
        None => format!("loadgen-{:08x}", fastrand::u32(..)),
    };
    (0..count).map(|i| format!("{prefix}-{i}")).collect()
}

/// Reads `VmRSS` (KiB) of a process.
pub fn read_rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    parse_vmrss(&status)
}

fn parse_vmrss(status: &str) -> Option<u64> {
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vmrss_is_read_in_kib() {
        let status = "Name:\tpulsar-relay\nVmPeak:\t  999 kB\nVmRSS:\t   12345 kB\nThreads:\t3\n";
        assert_eq!(parse_vmrss(status), Some(12345));
        assert_eq!(parse_vmrss("Name: x\n"), None);
        assert!(read_rss_kib(std::process::id()).is_some_and(|kib| kib > 0));
    }

    #[test]
    fn topic_names_are_fresh_per_run_unless_given() {
        let a = topic_names(None, 2);
        let b = topic_names(None, 2);
        assert_eq!(a.len(), 2);
        assert!(a[0].ends_with("-0") && a[1].ends_with("-1"));
        assert_ne!(a[0], b[0]);
        assert_eq!(topic_names(Some("t"), 1), vec!["t-0".to_owned()]);
    }
}
