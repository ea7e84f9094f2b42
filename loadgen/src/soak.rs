//! The `soak` scenario: hours of moderate load with every kind of consumer reconnecting, and
//! exact delivery accounting at the end.
//!
//! Publishers run open loop at `--rate` over the run's topics for `--duration`. Alongside, WebSocket,
//! long-poll and SSE subscribers (each following every topic) drop their connection every
//! `--reconnect-every` (jittered) and resume from the last id they saw, as flaky clients do.
//! Every `--report-every` a line on stderr gives the elapsed time, messages published, distinct
//! messages delivered per transport, reconnects, and the relay's VmRSS (`--relay-pid`). At the
//! end the subscribers drain, and per transport the verdict says what was lost, duplicated or
//! reordered across all those reconnects.
//!
//! Does not own the transports (`subscribe`), publishing (`publish`) or the verdict (`verify`).

use std::io::Write as _;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::Serialize;
use tokio::sync::{mpsc, watch};

use crate::cli::Transport;
use crate::delivery::drain;
use crate::publish::{publish, PublishResult, PublishSpec};
use crate::run::{read_rss_kib, Phase, RunCtx};
use crate::stats::LatencyHub;
use crate::subscribe::{self, Progress, SubShared};
use crate::verify::{verify, Ledger, Receipts, Verdict};

/// Latency stripes per transport: soak subscribers are few.
const STRIPES: usize = 2;

pub struct SoakSpec {
    /// Subscribers per transport, in the order of [`Transport`]'s variants.
    pub subscribers: Vec<(Transport, usize)>,
    pub reconnect_every: Duration,
    pub report_every: Duration,
    pub relay_pid: Option<u32>,
    pub drain_timeout: Duration,
}

/// One transport's outcome.
#[derive(Debug, Clone, Serialize)]
pub struct TransportSoak {
    pub transport: &'static str,
    pub subscribers: usize,
    pub subscribers_ready: usize,
    /// Every ready subscriber received as many distinct messages as were acknowledged.
    pub drained: bool,
    pub check: Verdict,
    pub reconnects: u64,
    pub events: std::collections::BTreeMap<String, u64>,
}

/// The relay's VmRSS over the run, KiB.
#[derive(Debug, Clone, Default, Serialize)]
pub struct RssTrack {
    pub samples: u64,
    pub min_kib: Option<u64>,
    pub max_kib: Option<u64>,
    pub first_kib: Option<u64>,
    pub last_kib: Option<u64>,
}

impl RssTrack {
    fn sample(&mut self, pid: Option<u32>) -> Option<u64> {
        let kib = read_rss_kib(pid?)?;
        self.samples += 1;
        self.min_kib = Some(self.min_kib.map_or(kib, |m| m.min(kib)));
        self.max_kib = Some(self.max_kib.map_or(kib, |m| m.max(kib)));
        self.first_kib.get_or_insert(kib);
        self.last_kib = Some(kib);
        Some(kib)
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct SoakReport {
    pub reconnect_every_s: f64,
    pub transports: Vec<TransportSoak>,
    pub relay_rss: RssTrack,
}

impl SoakReport {
    /// Nothing lost, duplicated or reordered, and every subscriber caught up.
    pub fn clean(&self) -> bool {
        self.transports
            .iter()
            .all(|t| t.drained && t.check.clean() && t.subscribers_ready == t.subscribers)
    }
}

#[derive(Debug, thiserror::Error)]
#[error("{0} subscriber(s) could not connect and subscribe (events: {1})")]
pub struct SubscribersNotReady(usize, String);

/// One transport's subscribers while the run goes on.
struct Group {
    transport: Transport,
    sh: Arc<SubShared>,
    progress: Vec<Arc<Progress>>,
    tasks: Vec<tokio::task::JoinHandle<Option<Receipts>>>,
}

impl Group {
    fn delivered(&self) -> u64 {
        self.progress
            .iter()
            .map(|p| p.distinct.load(Ordering::Relaxed))
            .sum()
    }
}

pub async fn run(
    ctx: Arc<RunCtx>,
    spec: SoakSpec,
    publish_spec: PublishSpec,
) -> Result<(PublishResult, SoakReport), SubscribersNotReady> {
    let (stop_tx, stop_rx) = watch::channel(false);
    let total: usize = spec.subscribers.iter().map(|(_, n)| n).sum();
    let (ready_tx, mut ready_rx) = mpsc::channel::<bool>(total.max(1));
    let mut groups = Vec::new();
    for &(transport, count) in &spec.subscribers {
        if count == 0 {
            continue;
        }
        let sh = SubShared::reconnecting(
            ctx.clone(),
            transport,
            LatencyHub::new(STRIPES),
            Some(spec.reconnect_every),
        );
        let mut group = Group {
            transport,
            sh: sh.clone(),
            progress: Vec::new(),
            tasks: Vec::new(),
        };
        for _ in 0..count {
            let counter = Progress::new(ctx.topics.len());
            group.progress.push(counter.clone());
            let (one_tx, mut one_rx) = mpsc::channel::<bool>(1);
            let ready_tx = ready_tx.clone();
            tokio::spawn(async move {
                let ok = one_rx.recv().await.unwrap_or(false);
                let _ = ready_tx.send(ok).await;
            });
            group.tasks.push(tokio::spawn(subscribe::run(
                sh.clone(),
                one_tx,
                counter,
                stop_rx.clone(),
            )));
        }
        groups.push(group);
    }
    drop(ready_tx);
    let mut not_ready = 0;
    while let Some(ok) = ready_rx.recv().await {
        not_ready += usize::from(!ok);
    }
    if not_ready > 0 {
        // A soak owes every subscriber everything: one that never subscribed is a failed
        // set-up, not a smaller run.
        let _ = stop_tx.send(true);
        let mut events = Vec::new();
        for g in groups {
            for t in g.tasks {
                let _ = t.await;
            }
            events.push(format!(
                "{}: {:?}",
                g.transport.name(),
                g.sh.events.snapshot()
            ));
        }
        return Err(SubscribersNotReady(not_ready, events.join("; ")));
    }

    let groups = Arc::new(groups);
    let rss = Arc::new(Mutex::new(RssTrack::default()));
    let reporter = spawn_reporter(
        ctx.clone(),
        groups.clone(),
        rss.clone(),
        spec.report_every,
        spec.relay_pid,
    );
    ctx.set_phase(Phase::Measure);
    let start = ctx.elapsed();
    let mut published = publish(ctx.clone(), publish_spec, start).await;
    ctx.set_phase(Phase::Drain);

    let ledger = published.ledger.take().unwrap_or_else(|| Ledger::new(0));
    let everyone: Vec<&Progress> = groups
        .iter()
        .flat_map(|g| g.progress.iter().map(|p| &**p))
        .collect();
    drain(&ledger, &everyone, spec.drain_timeout).await;
    // Per transport, before the subscribers stop (and hand their receipts over).
    let owed = ledger.acked();
    let drained: Vec<bool> = groups
        .iter()
        .map(|g| g.progress.iter().all(|p| p.has_all(&ledger, owed)))
        .collect();
    reporter.stop().await;
    let _ = stop_tx.send(true);
    let Ok(groups) = Arc::try_unwrap(groups) else {
        unreachable!("the reporter, the only other holder, has ended")
    };
    let mut transports = Vec::new();
    for (g, drained) in groups.into_iter().zip(drained) {
        let count = g.tasks.len();
        let mut receipts = Vec::with_capacity(count);
        for t in g.tasks {
            match t.await {
                Ok(Some(r)) => receipts.push(r),
                Ok(None) => {}
                Err(e) => std::panic::resume_unwind(e.into_panic()),
            }
        }
        transports.push(TransportSoak {
            transport: g.transport.name(),
            subscribers: count,
            subscribers_ready: receipts.len(),
            drained,
            check: verify(&ledger, &receipts),
            reconnects: g.sh.reconnects.load(Ordering::Relaxed),
            events: g.sh.events.snapshot(),
        });
    }
    let mut relay_rss = rss.lock().map(|r| r.clone()).unwrap_or_default();
    relay_rss.sample(spec.relay_pid);
    Ok((
        published,
        SoakReport {
            reconnect_every_s: spec.reconnect_every.as_secs_f64(),
            transports,
            relay_rss,
        },
    ))
}

/// Prints one status line every `every` until aborted, sampling the relay's RSS each time.
fn spawn_reporter(
    ctx: Arc<RunCtx>,
    groups: Arc<Vec<Group>>,
    rss: Arc<Mutex<RssTrack>>,
    every: Duration,
    relay_pid: Option<u32>,
) -> Reporter {
    let task = tokio::spawn(async move {
        let mut tick = tokio::time::interval(every);
        loop {
            tick.tick().await;
            let kib = rss.lock().ok().and_then(|mut r| r.sample(relay_pid));
            let c = &ctx.counters;
            let mut line = format!(
                "[soak {:>7.0}s] published {} failed {}",
                ctx.elapsed().as_secs_f64(),
                c.get(&c.acked),
                c.get(&c.failed),
            );
            for g in groups.iter() {
                line.push_str(&format!(
                    " | {} delivered {} reconnects {}",
                    g.transport.name(),
                    g.delivered(),
                    g.sh.reconnects.load(Ordering::Relaxed)
                ));
            }
            match kib {
                Some(kib) => line.push_str(&format!(" | relay RSS {} MiB", kib / 1024)),
                None => line.push_str(" | relay RSS -"),
            }
            let _ = writeln!(std::io::stderr(), "{line}");
        }
    });
    Reporter(task)
}

/// The reporter task.
struct Reporter(tokio::task::JoinHandle<()>);

impl Reporter {
    /// Aborts the task and waits until it has dropped its hold on the groups.
    async fn stop(self) {
        self.0.abort();
        let _ = self.0.await;
    }
}
