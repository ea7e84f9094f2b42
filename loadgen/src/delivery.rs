//! The delivery scenarios (`e2e`, `fanout`): subscribers first, then publishers, then a
//! drain, then the verdict.
//!
//! Order of a run: every subscriber connects and subscribes (publishing waits for all of
//! them, so nothing is owed to a subscriber before it could receive it); publishers run the
//! plan with a ledger of outcomes; the drain waits until every ready subscriber holds as many
//! distinct messages as were acknowledged, or `--drain-timeout` passes; then subscribers stop
//! and [`verify`] compares receipts with the ledger.
//!
//! Does not own the transports (`subscribe`) or publishing (`publish`).

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, watch};

use crate::cli::Transport;
use crate::publish::{publish, PublishResult, PublishSpec};
use crate::report::{DeliveryReport, UrlLatency};
use crate::run::{Phase, RunCtx};
use crate::stats::LatencyHub;
use crate::subscribe::{self, Progress, SubShared};
use crate::verify::{verify, Ledger};

/// How often the drain looks at the subscribers' progress.
const DRAIN_POLL: Duration = Duration::from_millis(20);

/// Waits until every subscriber of `progress` has received every acknowledged message of
/// `ledger`, or `timeout` passes; returns whether they all had.
pub async fn drain(ledger: &Ledger, progress: &[&Progress], timeout: Duration) -> bool {
    let owed = ledger.acked();
    let deadline = Instant::now() + timeout;
    loop {
        if progress.iter().all(|p| p.has_all(ledger, owed)) {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(DRAIN_POLL).await;
    }
}
/// Stripes of the delivery latency hub: subscribers flush far more often than publishers.
const DELIVERY_STRIPES: usize = 16;

pub struct DeliverySpec {
    pub transport: Transport,
    /// `--publish-url`s as given, for the per-URL latency rows.
    pub publish_urls: Vec<String>,
    pub subscribers: usize,
    pub drain_timeout: Duration,
}

#[derive(Debug, thiserror::Error)]
#[error("no subscriber could connect and subscribe (events: {0})")]
pub struct NoSubscribers(String);

pub async fn run(
    ctx: Arc<RunCtx>,
    spec: DeliverySpec,
    publish_spec: PublishSpec,
) -> Result<(PublishResult, DeliveryReport), NoSubscribers> {
    let latency = LatencyHub::new(DELIVERY_STRIPES);
    let publish_urls = spec.publish_urls.clone();
    let sh = SubShared::new(ctx.clone(), spec.transport, latency.clone());
    let (stop_tx, stop_rx) = watch::channel(false);
    let (ready_tx, mut ready_rx) = mpsc::channel::<(usize, bool)>(spec.subscribers.max(1));

    let mut progress = Vec::with_capacity(spec.subscribers);
    let mut tasks = Vec::with_capacity(spec.subscribers);
    for i in 0..spec.subscribers {
        let counter = Progress::new(ctx.topics.len());
        progress.push(counter.clone());
        let (one_tx, mut one_rx) = mpsc::channel::<bool>(1);
        let ready_tx = ready_tx.clone();
        // Tags the subscriber's readiness with its index.
        tokio::spawn(async move {
            let ok = one_rx.recv().await.unwrap_or(false);
            let _ = ready_tx.send((i, ok)).await;
        });
        tasks.push(tokio::spawn(subscribe::run(
            sh.clone(),
            one_tx,
            counter,
            stop_rx.clone(),
        )));
    }
    drop(ready_tx);
    let mut ready = vec![false; spec.subscribers];
    while let Some((i, ok)) = ready_rx.recv().await {
        ready[i] = ok;
    }
    let ready_count = ready.iter().filter(|r| **r).count();
    if ready_count == 0 {
        let _ = stop_tx.send(true);
        for t in tasks {
            let _ = t.await;
        }
        return Err(NoSubscribers(format!("{:?}", sh.events.snapshot())));
    }

    let start = ctx.elapsed();
    sh.measure_from_ns.store(
        (start + publish_spec.plan.warmup).as_nanos() as u64,
        Ordering::Relaxed,
    );
    ctx.set_phase(if publish_spec.plan.warmup.is_zero() {
        Phase::Measure
    } else {
        Phase::Warmup
    });
    let phase_ctx = ctx.clone();
    let warmup = publish_spec.plan.warmup;
    let phase_timer = tokio::spawn(async move {
        tokio::time::sleep(warmup).await;
        phase_ctx.set_phase(Phase::Measure);
    });
    let mut published = publish(ctx.clone(), publish_spec, start).await;
    phase_timer.abort();
    ctx.set_phase(Phase::Drain);

    let ledger = published.ledger.take().unwrap_or_else(|| Ledger::new(0));
    let ready_progress: Vec<&Progress> = progress
        .iter()
        .zip(&ready)
        .filter(|(_, r)| **r)
        .map(|(p, _)| &**p)
        .collect();
    let drained = drain(&ledger, &ready_progress, spec.drain_timeout).await;
    let _ = stop_tx.send(true);
    let mut receipts = Vec::with_capacity(ready_count);
    for t in tasks {
        match t.await {
            Ok(Some(r)) => receipts.push(r),
            Ok(None) => {}
            Err(e) => std::panic::resume_unwind(e.into_panic()),
        }
    }
    // Every task has ended, so every recorder has flushed into the hub.
    let check = verify(&ledger, &receipts);
    let deliveries = ctx.counters.get(&ctx.counters.deliveries);
    let measure_from = Duration::from_nanos(sh.measure_from_ns.load(Ordering::Relaxed));
    let last = Duration::from_nanos(sh.last_delivery_ns.load(Ordering::Relaxed));
    let window = last.saturating_sub(measure_from).as_secs_f64();
    let report = DeliveryReport {
        transport: spec.transport.name(),
        subscribers: spec.subscribers,
        subscribers_ready: ready_count,
        deliveries,
        deliveries_per_s: if window > 0.0 {
            deliveries as f64 / window
        } else {
            0.0
        },
        latency: latency.summary(),
        latency_by_publish_url: sh
            .latency_by_publish_url
            .iter()
            .zip(&publish_urls)
            .map(|(hub, url)| UrlLatency {
                publish_url: url.clone(),
                latency: hub.summary(),
            })
            .collect(),
        drained,
        missed: check.lost > 0,
        check,
        reconnects: sh.reconnects.load(Ordering::Relaxed),
        events: sh.events.snapshot(),
    };
    Ok((published, report))
}
