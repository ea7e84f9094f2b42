//! The `churn` scenario: up to M WebSocket connections at once, each living a short random
//! life (connect, subscribe to one of the run's topics, receive, disconnect) and replaced at
//! once, while a publisher publishes to those topics; afterwards, a check that the relay gave
//! everything back.
//!
//! Half the connections end with a closing handshake, half by dropping the socket (a client
//! that vanishes), since both paths must release the session and its subscriptions. At the
//! end every connection is closed, then the relay's `/api/v1/stats` is polled until its
//! connection, WebSocket-session and subscriber counts are back to what they were before the
//! run (or `--settle-timeout` passes), and its VmRSS (`--relay-pid`) is compared with the
//! value before the run.
//!
//! Accounting counts connections: `connects` (subscribed), `disconnects` (ended by us),
//! `dropped` (ended by the relay or the network while we still wanted it), failures by kind,
//! and messages received. Does not own the WebSocket set-up (`subscribe::ws_open`) or the
//! publisher (`publish`).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use hyper::Method;
use serde::Serialize;
use tokio::sync::{watch, Semaphore};
use tokio_tungstenite::tungstenite::Message;

use crate::http::HttpConn;
use crate::publish::{publish, PublishResult, PublishSpec};
use crate::run::{read_rss_kib, Phase, RunCtx};
use crate::stats::Tally;
use crate::subscribe::{stopped, ws_open};

/// Concurrent handshakes: enough for thousands of connections per second without
/// overflowing the relay's accept backlog (which would show up as connect failures, not as
/// churn).
const SETUP_CONCURRENCY: usize = 128;
/// How long a closing handshake may take.
const CLOSE_GRACE: Duration = Duration::from_millis(500);
/// Pause after a failed connect before the slot tries again.
const RETRY_PAUSE: Duration = Duration::from_millis(100);
/// How often the settle check asks the relay for its counts.
const SETTLE_POLL: Duration = Duration::from_millis(100);

pub struct ChurnSpec {
    /// Connections held at once.
    pub concurrent: usize,
    /// A connection lives a uniformly random time in this range after subscribing.
    pub life_min: Duration,
    pub life_max: Duration,
    pub relay_pid: Option<u32>,
    /// How long to wait for the relay's counts to return to the baseline.
    pub settle_timeout: Duration,
}

/// What the relay reports holding (summed over shards from `/api/v1/stats`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct RelayHolds {
    pub connections: u64,
    pub websocket_sessions: u64,
    pub subscribers: u64,
}

#[derive(Debug, Clone, Serialize)]
pub struct ChurnReport {
    pub concurrent: usize,
    pub life_min_s: f64,
    pub life_max_s: f64,
    pub churn_s: f64,
    /// Connections that subscribed.
    pub connects: u64,
    pub connects_per_s: f64,
    /// Connections we ended (closing handshake or dropped socket).
    pub disconnects: u64,
    /// Connections the relay (or the network) ended while we still held them.
    pub dropped: u64,
    /// Connect/subscribe failures and drops by kind.
    pub errors: std::collections::BTreeMap<String, u64>,
    /// Messages received over all connections.
    pub messages_received: u64,
    /// The most connections held at once.
    pub peak_open: u64,
    pub baseline: Option<RelayHolds>,
    /// The relay's counts once settled (or when the settle timeout passed).
    pub after: Option<RelayHolds>,
    pub settled: bool,
    /// From the last close to the counts back at the baseline.
    pub settle_s: f64,
    pub rss_before_kib: Option<u64>,
    /// At the busiest point: sampled once a second during the churn.
    pub rss_peak_kib: Option<u64>,
    pub rss_after_kib: Option<u64>,
}

#[derive(Default)]
struct Live {
    connects: AtomicU64,
    disconnects: AtomicU64,
    dropped: AtomicU64,
    received: AtomicU64,
    open: AtomicU64,
    peak_open: AtomicU64,
    errors: Tally,
}

/// Reads the relay's counts from `/api/v1/stats`; `None` if it has no such endpoint.
async fn relay_holds(ctx: &RunCtx, conn: &mut Option<HttpConn>) -> Option<RelayHolds> {
    if conn.as_ref().is_none_or(|c| !c.is_open()) {
        *conn = Some(HttpConn::connect(&ctx.endpoint).await.ok()?);
    }
    let c = conn.as_mut()?;
    let (status, body) = tokio::time::timeout(
        ctx.timeout,
        c.request(&ctx.endpoint, Method::GET, "/api/v1/stats", None, None),
    )
    .await
    .ok()?
    .ok()?;
    if status != 200 {
        return None;
    }
    let stats: serde_json::Value = serde_json::from_slice(&body).ok()?;
    let mut holds = RelayHolds::default();
    for shard in stats["shards"].as_array()? {
        let n = |key: &str| shard[key].as_u64().unwrap_or(0);
        holds.connections += n("connections");
        holds.websocket_sessions += n("websocket_sessions");
        holds.subscribers += n("subscribers");
    }
    Some(holds)
}

pub async fn run(
    ctx: Arc<RunCtx>,
    spec: ChurnSpec,
    publish_spec: PublishSpec,
) -> (PublishResult, ChurnReport) {
    // One connection for the stats polls, held throughout: it is part of the baseline.
    let mut stats_conn = None;
    let baseline = relay_holds(&ctx, &mut stats_conn).await;
    let rss_before = spec.relay_pid.and_then(read_rss_kib);
    let live = Arc::new(Live::default());
    let gate = Arc::new(Semaphore::new(SETUP_CONCURRENCY));
    let (stop_tx, stop_rx) = watch::channel(false);
    ctx.set_phase(Phase::Measure);
    let began = Instant::now();

    let slots: Vec<_> = (0..spec.concurrent)
        .map(|_| {
            tokio::spawn(slot(
                ctx.clone(),
                live.clone(),
                gate.clone(),
                spec.life_min,
                spec.life_max,
                stop_rx.clone(),
            ))
        })
        .collect();
    let rss_peak = Arc::new(AtomicU64::new(rss_before.unwrap_or(0)));
    let sampler = spec.relay_pid.map(|pid| {
        let peak = rss_peak.clone();
        let live = live.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(1));
            loop {
                tick.tick().await;
                if let Some(kib) = read_rss_kib(pid) {
                    peak.fetch_max(kib, Ordering::Relaxed);
                }
                eprintln!(
                    "[churn] open {} connects {} received {}",
                    live.open.load(Ordering::Relaxed),
                    live.connects.load(Ordering::Relaxed),
                    live.received.load(Ordering::Relaxed)
                );
            }
        })
    });

    let published = publish(ctx.clone(), publish_spec, ctx.elapsed()).await;
    let churn_s = began.elapsed().as_secs_f64();
    ctx.set_phase(Phase::Drain);
    let _ = stop_tx.send(true);
    for s in slots {
        if let Err(e) = s.await {
            std::panic::resume_unwind(e.into_panic());
        }
    }
    if let Some(s) = sampler {
        s.abort();
    }

    let closed_at = Instant::now();
    let deadline = closed_at + spec.settle_timeout;
    let mut after = relay_holds(&ctx, &mut stats_conn).await;
    let mut settled = baseline.is_some() && after == baseline;
    while baseline.is_some() && !settled && Instant::now() < deadline {
        tokio::time::sleep(SETTLE_POLL).await;
        after = relay_holds(&ctx, &mut stats_conn).await;
        settled = after == baseline;
    }
    let settle_s = closed_at.elapsed().as_secs_f64();
    let rss_after = spec.relay_pid.and_then(read_rss_kib);

    let connects = live.connects.load(Ordering::Relaxed);
    let report = ChurnReport {
        concurrent: spec.concurrent,
        life_min_s: spec.life_min.as_secs_f64(),
        life_max_s: spec.life_max.as_secs_f64(),
        churn_s,
        connects,
        connects_per_s: if churn_s > 0.0 {
            connects as f64 / churn_s
        } else {
            0.0
        },
        disconnects: live.disconnects.load(Ordering::Relaxed),
        dropped: live.dropped.load(Ordering::Relaxed),
        errors: live.errors.snapshot(),
        messages_received: live.received.load(Ordering::Relaxed),
        peak_open: live.peak_open.load(Ordering::Relaxed),
        baseline,
        after,
        settled,
        settle_s,
        rss_before_kib: rss_before,
        rss_peak_kib: spec
            .relay_pid
            .map(|_| rss_peak.load(Ordering::Relaxed))
            .filter(|k| *k > 0),
        rss_after_kib: rss_after,
    };
    (published, report)
}

/// One slot: connection after connection until the run stops.
async fn slot(
    ctx: Arc<RunCtx>,
    live: Arc<Live>,
    gate: Arc<Semaphore>,
    life_min: Duration,
    life_max: Duration,
    mut stop: watch::Receiver<bool>,
) {
    while !*stop.borrow() {
        let topic = fastrand::usize(..ctx.topics.len());
        let subscribe = ctx
            .target
            .ws_subscribe(std::slice::from_ref(&ctx.topics[topic]), None);
        let opened = {
            let _permit = gate.acquire().await;
            ws_open(&ctx, subscribe, &mut |_| {
                live.received.fetch_add(1, Ordering::Relaxed);
            })
            .await
        };
        let mut ws = match opened {
            Ok(ws) => ws,
            Err(kind) => {
                live.errors.add(kind, 1);
                tokio::select! {
                    _ = stopped(&mut stop) => break,
                    _ = tokio::time::sleep(RETRY_PAUSE) => continue,
                }
            }
        };
        live.connects.fetch_add(1, Ordering::Relaxed);
        let open = live.open.fetch_add(1, Ordering::Relaxed) + 1;
        live.peak_open.fetch_max(open, Ordering::Relaxed);
        let span = life_max.saturating_sub(life_min);
        let life = life_min + span.mul_f64(fastrand::f64());
        let end = tokio::time::sleep(life);
        tokio::pin!(end);
        let mut ours = true;
        loop {
            tokio::select! {
                frame = ws.next() => match frame {
                    Some(Ok(Message::Text(_))) => {
                        live.received.fetch_add(1, Ordering::Relaxed);
                    }
                    Some(Ok(Message::Close(frame))) => {
                        let code = frame.map_or(1005, |f| u16::from(f.code));
                        live.errors.add(&format!("ws_close_{code}"), 1);
                        ours = false;
                        break;
                    }
                    Some(Ok(_)) => {}
                    Some(Err(_)) | None => {
                        live.errors.add("ws_disconnect", 1);
                        ours = false;
                        break;
                    }
                },
                _ = &mut end => break,
                _ = stopped(&mut stop) => break,
            }
        }
        live.open.fetch_sub(1, Ordering::Relaxed);
        if ours {
            // Half say goodbye, half vanish: the relay must clean up after both.
            if fastrand::bool() || *stop.borrow() {
                let _ = tokio::time::timeout(CLOSE_GRACE, ws.close(None)).await;
            }
            live.disconnects.fetch_add(1, Ordering::Relaxed);
        } else {
            live.dropped.fetch_add(1, Ordering::Relaxed);
        }
    }
}
