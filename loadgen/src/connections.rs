//! The `connections` scenario: open M WebSocket subscribers, hold them idle, and measure
//! what they cost the relay (its VmRSS before and after, per connection).
//!
//! Each connection subscribes to one topic, so the relay holds a registered consumer, not
//! just a socket. Accounting counts connections: `sent` attempts, `acked` subscribed, `failed`
//! by kind; a connection that closes during the hold is `dropped`. Does not own the WebSocket
//! set-up (`subscribe::ws_open`).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use tokio::sync::{mpsc, watch, Semaphore};
use tokio_tungstenite::tungstenite::Message;

use crate::report::ConnectionsReport;
use crate::run::{read_rss_kib, Phase, RunCtx};
use crate::stats::LatencyHub;
use crate::subscribe::{stopped, ws_open};

/// Concurrent handshakes: as in `subscribe`, enough to open thousands quickly without
/// overflowing the relay's accept backlog.
const SETUP_CONCURRENCY: usize = 64;
/// How long a connection's closing handshake may take at the end.
const CLOSE_GRACE: Duration = Duration::from_millis(500);
/// Lets the relay settle (free handshake buffers) before its memory is read.
const SETTLE: Duration = Duration::from_millis(500);

pub async fn run(
    ctx: Arc<RunCtx>,
    count: usize,
    hold: Duration,
    relay_pid: Option<u32>,
) -> ConnectionsReport {
    let rss_before = relay_pid.and_then(read_rss_kib);
    let setup_latency = LatencyHub::new(8);
    let gate = Arc::new(Semaphore::new(SETUP_CONCURRENCY));
    let dropped = Arc::new(AtomicU64::new(0));
    let (stop_tx, stop_rx) = watch::channel(false);
    let (done_tx, mut done_rx) = mpsc::channel::<()>(count.max(1));
    let subscribe = ctx.target.ws_subscribe(&ctx.topics[..1], None);
    ctx.set_phase(Phase::Setup);

    let mut tasks = Vec::with_capacity(count);
    for _ in 0..count {
        let ctx = ctx.clone();
        let gate = gate.clone();
        let mut recorder = setup_latency.recorder();
        let dropped = dropped.clone();
        let done_tx = done_tx.clone();
        let subscribe = subscribe.clone();
        let mut stop = stop_rx.clone();
        tasks.push(tokio::spawn(async move {
            let counters = &ctx.counters;
            let opened = {
                let _permit = gate.acquire().await;
                counters.add_sent(1);
                let began = Instant::now();
                let r = ws_open(&ctx, subscribe, &mut |_| {}).await;
                if r.is_ok() {
                    recorder.record_ns(began.elapsed().as_nanos() as u64);
                }
                r
            };
            drop(recorder);
            let mut ws = match opened {
                Ok(ws) => {
                    counters.add_acked(1);
                    ws
                }
                Err(kind) => {
                    counters.add_failed(kind, 1);
                    let _ = done_tx.send(()).await;
                    return;
                }
            };
            let _ = done_tx.send(()).await;
            loop {
                tokio::select! {
                    frame = ws.next() => match frame {
                        // Pings are answered by the library while reading.
                        Some(Ok(Message::Close(_))) | Some(Err(_)) | None => {
                            dropped.fetch_add(1, Ordering::Relaxed);
                            return;
                        }
                        Some(Ok(_)) => {}
                    },
                    _ = stopped(&mut stop) => {
                        let _ = tokio::time::timeout(CLOSE_GRACE, ws.close(None)).await;
                        return;
                    }
                }
            }
        }));
    }
    drop(done_tx);
    // Each task reports once, then holds its sender until the end: count, do not wait for
    // the channel to close.
    for _ in 0..count {
        if done_rx.recv().await.is_none() {
            break;
        }
    }
    ctx.set_phase(Phase::Hold);
    let held_from = Instant::now();
    tokio::time::sleep(hold.max(SETTLE)).await;
    let rss_after = relay_pid.and_then(read_rss_kib);
    let hold_s = held_from.elapsed().as_secs_f64();
    let _ = stop_tx.send(true);
    for t in tasks {
        if let Err(e) = t.await {
            std::panic::resume_unwind(e.into_panic());
        }
    }
    let established = ctx.counters.get(&ctx.counters.acked);
    let rss_per_connection_bytes = match (rss_before, rss_after) {
        (Some(b), Some(a)) if established > 0 => {
            Some((a as f64 - b as f64) * 1024.0 / established as f64)
        }
        _ => None,
    };
    ConnectionsReport {
        requested: count,
        established,
        dropped: dropped.load(Ordering::Relaxed),
        hold_s,
        setup_latency: setup_latency.summary(),
        rss_before_kib: rss_before,
        rss_after_kib: rss_after,
        rss_per_connection_bytes,
    }
}
