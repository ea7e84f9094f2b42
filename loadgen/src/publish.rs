//! Publishers: N keep-alive connections sending single or bulk publishes, closed or open
//! loop, with exact accounting of every measured message.
//!
//! Closed loop: each connection sends its next request as soon as the previous one is
//! answered; the [`Plan`] decides per send whether it is warm-up, measured, or the end.
//!
//! Open loop: a pacing thread releases tickets on schedule through a semaphore; a connection
//! takes the next ticket when it is free and sends it at once. Ticket `n`'s latency counts
//! from its intended time, so time spent waiting for a free connection counts too (as it does
//! for a real client whose requests queue). The pacer is an OS thread sleeping with
//! `std::thread::sleep` (~60 µs precision on Linux) rather than a tokio timer, whose 1 ms
//! granularity would add up to 1 ms of fake latency to every request of a fast relay.
//!
//! Several publish URLs (`--publish-url`): each sender keeps a connection per URL it uses.
//! Closed loop, sender `i` publishes through URL `i mod n` only (connections spread over the
//! relays); open loop, ticket `k` goes through URL `k mod n` whichever sender takes it, so
//! consecutive messages alternate between the relays exactly ([`route`]).
//!
//! Accounting: a measured send adds its messages to `sent` before the request goes out and,
//! once its outcome is known, exactly that many to `acked` or `failed` (bulk: `accepted` to
//! acked, the rest as "rejected"). Every request has a deadline, so every measured send ends.
//!
//! Does not own subscribers or the report's layout.

use std::borrow::Cow;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use hyper::Method;
use tokio::sync::Semaphore;

use crate::http::{Endpoint, HttpConn};
use crate::payload::{write_bulk, BulkAnswer};
use crate::run::RunCtx;
use crate::schedule::{Pacer, PacerStep, Plan, Slot};
use crate::stats::{LatencyHub, LatencySummary};
use crate::verify::{Ledger, Outcome};

const BULK_PATH: &str = "/api/v1/messages/bulk";
/// How long after the end of the measured phase an open-loop sender still sends overdue
/// tickets. Beyond it they are reported as behind schedule, which keeps a run against a
/// stalled relay bounded.
const CATCH_UP_GRACE: Duration = Duration::from_secs(1);
/// Pause after a failed connect, so a relay that is down is not hammered by a spin loop.
const RECONNECT_PAUSE: Duration = Duration::from_millis(50);
/// Stripes of each latency hub: about twice the worker threads of a small machine.
pub const LATENCY_STRIPES: usize = 8;

/// What to publish.
#[derive(Debug, Clone)]
pub struct PublishSpec {
    pub plan: Plan,
    pub connections: usize,
    /// Messages per request; `None` for single publishes.
    pub batch: Option<usize>,
    /// Keep a ledger of every message's outcome (for delivery checks).
    pub ledger: bool,
}

pub struct PublishResult {
    pub latency: LatencySummary,
    pub service_time: Option<LatencySummary>,
    pub behind_schedule: Option<u64>,
    /// From the warm-up's end to the last measured answer.
    pub measured: Duration,
    pub ledger: Option<Ledger>,
}

struct Shared {
    ctx: Arc<RunCtx>,
    spec: PublishSpec,
    /// Plan time zero, as an offset from the run's epoch.
    start: Duration,
    /// Closed loop: measured sends taken.
    measured_taken: AtomicU64,
    /// Open loop: the next ticket number.
    next_ticket: AtomicU64,
    /// Open loop: tickets released by the pacer.
    permits: Option<Arc<Semaphore>>,
    /// Per-topic next `seq`.
    seqs: Vec<AtomicU64>,
    latency: Arc<LatencyHub>,
    service: Arc<LatencyHub>,
    /// Measured requests sent (bulk: requests, not messages), for behind-schedule.
    measured_requests: AtomicU64,
    /// Latest measured answer, ns since the epoch.
    last_answer_ns: AtomicU64,
}

type LedgerEntries = Vec<(usize, u64, Outcome)>;

/// Runs the publishers to the end of the plan. `start`: plan time zero as an offset from the
/// run's epoch (now, or just before: subscribers derive the measured phase from it).
pub async fn publish(ctx: Arc<RunCtx>, spec: PublishSpec, start: Duration) -> PublishResult {
    let permits = spec.plan.rate.map(|_| Arc::new(Semaphore::new(0)));
    let shared = Arc::new(Shared {
        seqs: ctx.topics.iter().map(|_| AtomicU64::new(0)).collect(),
        ctx: ctx.clone(),
        spec: spec.clone(),
        start,
        measured_taken: AtomicU64::new(0),
        next_ticket: AtomicU64::new(0),
        permits: permits.clone(),
        latency: LatencyHub::new(LATENCY_STRIPES),
        service: LatencyHub::new(LATENCY_STRIPES),
        measured_requests: AtomicU64::new(0),
        last_answer_ns: AtomicU64::new(0),
    });
    let pacer = match (spec.plan.rate, permits) {
        (Some(rate), Some(sem)) => Some(spawn_pacer(
            spec.plan,
            rate,
            sem,
            ctx.epoch + start,
            spec.connections,
        )),
        _ => None,
    };
    let workers: Vec<_> = (0..spec.connections)
        .map(|i| tokio::spawn(sender(shared.clone(), i)))
        .collect();
    let mut ledger = spec.ledger.then(|| Ledger::new(ctx.topics.len()));
    for w in workers {
        // A sender task only ends by returning; a panic there is a bug worth surfacing.
        let entries = match w.await {
            Ok(entries) => entries,
            Err(e) => std::panic::resume_unwind(e.into_panic()),
        };
        if let Some(l) = ledger.as_mut() {
            for (topic, seq, outcome) in entries {
                l.record(topic, seq, outcome);
            }
        }
    }
    if let Some(p) = pacer {
        // The pacer ends by itself at the plan's end; it only sleeps, so joining is brief.
        let _ = tokio::task::spawn_blocking(move || p.join()).await;
    }
    let warm_end = start + spec.plan.warmup;
    let last = Duration::from_nanos(shared.last_answer_ns.load(Ordering::Relaxed));
    let measured = match spec.plan.end() {
        // A timed run measured at least its duration even if answers stopped coming.
        Some(end) => last.max(start + end).saturating_sub(warm_end),
        None => last.saturating_sub(warm_end),
    };
    let behind_schedule = spec.plan.measured_tickets().map(|tickets| {
        let sent = shared.measured_requests.load(Ordering::Relaxed);
        tickets.saturating_sub(sent) * spec.batch.unwrap_or(1) as u64
    });
    PublishResult {
        latency: shared.latency.summary(),
        service_time: spec.plan.rate.map(|_| shared.service.summary()),
        behind_schedule,
        measured,
        ledger,
    }
}

fn spawn_pacer(
    plan: Plan,
    rate: f64,
    permits: Arc<Semaphore>,
    zero: Instant,
    senders: usize,
) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        let mut pacer = Pacer::new(&plan, rate);
        loop {
            match pacer.step(zero.elapsed()) {
                PacerStep::Continue { release, next } => {
                    permits.add_permits(release as usize);
                    if let Some(wait) = next.checked_sub(zero.elapsed()) {
                        std::thread::sleep(wait);
                    }
                }
                PacerStep::Finished { release } => {
                    // One extra permit per sender: each takes a ticket past the plan's end,
                    // sees `Done` and stops.
                    permits.add_permits(release as usize + senders);
                    return;
                }
            }
        }
    })
}

/// What one taken send is.
struct Send {
    measured: bool,
    /// Plan time, for latency and `sent_ns`.
    intended: Duration,
    /// The open loop's ticket number; `None` in a closed loop.
    ticket: Option<u64>,
}

/// Which of `urls` publish URLs a send goes through: an open loop's ticket `k` through
/// `k mod urls` (consecutive messages alternate, whichever sender is free), a closed loop's
/// sender `id` through `id mod urls` (connections spread evenly).
fn route(ticket: Option<u64>, sender: usize, urls: usize) -> usize {
    let urls = urls.max(1);
    match ticket {
        Some(k) => (k % urls as u64) as usize,
        None => sender % urls,
    }
}

async fn next_send(sh: &Shared) -> Option<Send> {
    let plan = &sh.spec.plan;
    let (slot, ticket) = match (&sh.permits, plan.rate) {
        (Some(permits), Some(rate)) => {
            permits.acquire().await.ok()?.forget();
            let now = sh.ctx.elapsed().saturating_sub(sh.start);
            if plan.end().is_some_and(|end| now >= end + CATCH_UP_GRACE) {
                return None;
            }
            let ticket = sh.next_ticket.fetch_add(1, Ordering::Relaxed);
            (plan.open_slot(rate, ticket), Some(ticket))
        }
        _ => {
            let now = sh.ctx.elapsed().saturating_sub(sh.start);
            (plan.closed_slot(now, &sh.measured_taken), None)
        }
    };
    match slot {
        Slot::Warmup { intended } => Some(Send {
            measured: false,
            intended,
            ticket,
        }),
        Slot::Measured { intended, .. } => Some(Send {
            measured: true,
            intended,
            ticket,
        }),
        Slot::Done => None,
    }
}

async fn sender(sh: Arc<Shared>, id: usize) -> LedgerEntries {
    let ctx = &sh.ctx;
    let counters = &ctx.counters;
    let per_request = sh.spec.batch.unwrap_or(1);
    let mut ledger: LedgerEntries = Vec::new();
    let mut latency = sh.latency.recorder();
    let mut service = sh.service.recorder();
    // One per publish URL, opened when first used.
    let mut conns: Vec<Option<HttpConn>> = ctx.publish_endpoints.iter().map(|_| None).collect();
    let mut round_robin = id;
    let mut numbered: Vec<(usize, u64)> = Vec::with_capacity(per_request);

    while let Some(send) = next_send(&sh).await {
        let sent_ns = (sh.start + send.intended).as_nanos() as u64;
        let via = route(send.ticket, id, conns.len());
        let tag = ctx.tags_publish_url().then_some(via);
        numbered.clear();
        for _ in 0..per_request {
            let topic = round_robin % ctx.topics.len();
            round_robin += 1;
            numbered.push((topic, sh.seqs[topic].fetch_add(1, Ordering::Relaxed)));
        }
        let mut body = Vec::with_capacity(per_request * 200 + 16);
        let path = match sh.spec.batch {
            None => {
                let (t, seq) = numbered[0];
                let topic = &ctx.topics[t];
                ctx.target
                    .write_publish_body(&ctx.body, &mut body, topic, seq, sent_ns, tag);
                ctx.target.publish_path(topic)
            }
            Some(n) => {
                write_bulk(&mut body, n, |out, i| {
                    let (t, seq) = numbered[i];
                    ctx.body
                        .write_message(out, &ctx.topics[t], seq, sent_ns, tag);
                });
                Cow::Borrowed(BULK_PATH)
            }
        };
        if send.measured {
            counters.add_sent(per_request as u64);
            counters.requests.fetch_add(1, Ordering::Relaxed);
            sh.measured_requests.fetch_add(1, Ordering::Relaxed);
        }

        let endpoint = &ctx.publish_endpoints[via];
        let conn = &mut conns[via];
        let (result, sent_at) = exchange(ctx, endpoint, conn, &path, Bytes::from(body)).await;
        let answered = Instant::now();
        let (acked, failure) = match result {
            Ok((status, answer)) if (200..300).contains(&status) => match sh.spec.batch {
                None => (1, None),
                Some(n) => match serde_json::from_slice::<BulkAnswer>(&answer) {
                    Ok(a)
                        if a.summary.total == n as u64
                            && a.summary.accepted + a.summary.rejected == a.summary.total =>
                    {
                        (a.summary.accepted.min(n as u64) as usize, Some("rejected"))
                    }
                    _ => (0, Some("bad_response")),
                },
            },
            Ok((status, _)) => (0, Some(status_kind(status))),
            Err(kind) => (0, Some(kind)),
        };
        let failed = per_request - acked;
        if send.measured {
            counters.add_acked(acked as u64);
            if let Some(kind) = failure {
                counters.add_failed(kind, failed as u64);
            }
            let now_ns = answered.duration_since(ctx.epoch).as_nanos() as u64;
            sh.last_answer_ns.fetch_max(now_ns, Ordering::Relaxed);
            if acked > 0 {
                latency.record_ns(now_ns.saturating_sub(sent_ns));
                if let (Some(_), Some(at)) = (sh.spec.plan.rate, sent_at) {
                    service.record_ns(answered.duration_since(at).as_nanos() as u64);
                }
            }
        }
        if sh.spec.ledger {
            // Bulk answers are not itemised: a partly rejected batch is recorded as failed
            // throughout, which delivery checks count as "delivered although failed", never
            // as lost.
            let outcome = if failed == 0 {
                Outcome::Acked
            } else {
                Outcome::Failed
            };
            ledger.extend(numbered.iter().map(|&(t, s)| (t, s, outcome)));
        }
        if conn.is_none() {
            tokio::time::sleep(RECONNECT_PAUSE).await;
        }
    }
    ledger
}

/// HTTP statuses as failure kinds, without allocating for the common ones.
fn status_kind(status: u16) -> &'static str {
    match status {
        400 => "400",
        404 => "404",
        408 => "408",
        413 => "413",
        429 => "429",
        500 => "500",
        502 => "502",
        503 => "503",
        504 => "504",
        s if s < 400 => "other_3xx",
        s if s < 500 => "other_4xx",
        _ => "other_5xx",
    }
}

/// One request on the sender's connection, (re)connecting first if needed. Returns the
/// status and body or the failure kind, and when the request went out (`None` if it never
/// did). Drops the connection on any failure: after a timeout or an I/O error its state is
/// unknown.
async fn exchange(
    ctx: &RunCtx,
    endpoint: &Endpoint,
    conn: &mut Option<HttpConn>,
    path: &str,
    body: Bytes,
) -> (Result<(u16, Bytes), &'static str>, Option<Instant>) {
    let deadline = Instant::now() + ctx.timeout;
    if !conn.as_ref().is_some_and(HttpConn::is_open) {
        *conn = None;
        match tokio::time::timeout_at(deadline.into(), HttpConn::connect(endpoint)).await {
            Ok(Ok(c)) => *conn = Some(c),
            Ok(Err(e)) => return (Err(e.kind()), None),
            Err(_) => return (Err("timeout"), None),
        }
    }
    let Some(c) = conn.as_mut() else {
        // Set just above.
        return (Err("connect"), None);
    };
    let sent_at = Instant::now();
    let request = c.request(
        endpoint,
        Method::POST,
        path,
        Some(body),
        ctx.target.authorization(),
    );
    let result = match tokio::time::timeout_at(deadline.into(), request).await {
        Ok(Ok(answer)) => Ok(answer),
        Ok(Err(e)) => Err(e.kind()),
        Err(_) => Err("timeout"),
    };
    if result.is_err() {
        *conn = None;
    }
    (result, Some(sent_at))
}

#[cfg(test)]
mod tests {
    use super::route;

    #[test]
    fn open_loop_messages_alternate_and_closed_loop_connections_spread() {
        // Open loop: consecutive tickets alternate whichever sender takes them.
        let open: Vec<usize> = (0..6).map(|k| route(Some(k), 5, 2)).collect();
        assert_eq!(open, [0, 1, 0, 1, 0, 1]);
        // Closed loop: 6 connections over 3 relays, two each.
        let closed: Vec<usize> = (0..6).map(|id| route(None, id, 3)).collect();
        assert_eq!(closed, [0, 1, 2, 0, 1, 2]);
        // One URL (the default): everything through it.
        assert!((0..4).all(|k| route(Some(k), k as usize, 1) == 0));
        assert_eq!(route(Some(3), 3, 0), 0, "no URL list is taken as one");
    }
}
