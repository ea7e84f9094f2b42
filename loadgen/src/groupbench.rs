//! `loadgen groups`: consumer-group (work queue) throughput and latency against plain
//! subscription, in one run on one relay (docs/work-queues.md).
//!
//! Two phases, each on a fresh topic, with the same publish load (`--connections`
//! closed-loop publishers for `--duration`, or an open loop at `--rate`):
//! - **plain**: `--consumers` WebSocket subscribers of the topic (fan-out: each gets every
//!   message);
//! - **group**: one group (created from `earliest`) and `--consumers` WebSocket group
//!   consumers with `max_in_flight` `--max-in-flight`, each acknowledging every message as
//!   it arrives (one `ack` frame per message); each message goes to one of them.
//!
//! Per phase: messages/s through the topic (acknowledged publishes ÷ the time from the first
//! publish until every consumer had every message (plain) or every message was acknowledged
//! (group)), publish → delivery latency, and for the group, delivery → `acked` answer
//! latency. Then the ratios group / plain.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use hdrhistogram::Histogram;
use hyper::header::HeaderValue;
use hyper::Method;
use serde::{Deserialize, Serialize};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::Message;

use crate::http::{connect_tcp, Endpoint, HttpConn};
use crate::payload::{BodyBuilder, Incoming};

/// What `loadgen groups` was asked to do.
#[derive(Debug, Clone)]
pub struct GroupBenchSpec {
    pub url: String,
    pub consumers: usize,
    pub max_in_flight: u32,
    pub connections: usize,
    pub duration: Duration,
    pub rate: Option<f64>,
    pub payload_bytes: usize,
    pub drain_timeout: Duration,
    pub token: Option<String>,
}

/// Latency percentiles, microseconds.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Lat {
    pub count: u64,
    pub p50_us: u64,
    pub p90_us: u64,
    pub p99_us: u64,
    pub max_us: u64,
}

impl Lat {
    fn of(h: &Histogram<u64>) -> Lat {
        Lat {
            count: h.len(),
            p50_us: h.value_at_quantile(0.5),
            p90_us: h.value_at_quantile(0.9),
            p99_us: h.value_at_quantile(0.99),
            max_us: h.max(),
        }
    }
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct Phase {
    pub published: u64,
    pub publish_errors: u64,
    /// Messages every consumer got (plain) / acknowledged (group).
    pub consumed: u64,
    pub seconds: f64,
    pub msg_s: f64,
    pub deliveries: u64,
    /// Group: deliveries of a message a second time or more.
    pub redeliveries: u64,
    pub publish_to_delivery: Lat,
    /// Group only: from receiving a message to receiving the `acked` answer naming it.
    pub delivery_to_acked: Option<Lat>,
    pub complete: bool,
}

#[derive(Debug, Clone, Serialize)]
pub struct GroupBenchReport {
    pub url: String,
    pub consumers: usize,
    pub max_in_flight: u32,
    pub connections: usize,
    pub rate: Option<f64>,
    pub plain: Phase,
    pub group: Phase,
    pub ratio_msg_s: f64,
    pub ratio_p50: f64,
    pub ratio_p99: f64,
}

impl GroupBenchReport {
    pub fn to_text(&self) -> String {
        let mut s = String::new();
        let load = match self.rate {
            Some(r) => format!("open loop at {r} msg/s"),
            None => format!("closed loop, {} connections", self.connections),
        };
        s += &format!(
            "groups: {} consumers (group max_in_flight {}), {load}, {}\n",
            self.consumers, self.max_in_flight, self.url
        );
        s += "phase  published  consumed   msg/s   deliveries  redeliv.  pub->deliv p50/p99 ms  deliv->acked p50/p99 ms\n";
        for (name, p) in [("plain", &self.plain), ("group", &self.group)] {
            let acked = p.delivery_to_acked.as_ref().map_or_else(
                || "-".to_owned(),
                |l| format!("{:.2} / {:.2}", ms(l.p50_us), ms(l.p99_us)),
            );
            s += &format!(
                "{name:<6} {:>9} {:>9} {:>8.0} {:>11} {:>9}  {:>8.2} / {:<8.2}     {acked}{}\n",
                p.published,
                p.consumed,
                p.msg_s,
                p.deliveries,
                p.redeliveries,
                ms(p.publish_to_delivery.p50_us),
                ms(p.publish_to_delivery.p99_us),
                if p.complete { "" } else { "  (INCOMPLETE)" }
            );
        }
        s += &format!(
            "group / plain: msg/s {:.2}, publish->delivery p50 {:.2}, p99 {:.2}\n",
            self.ratio_msg_s, self.ratio_p50, self.ratio_p99
        );
        s
    }
}

fn ms(us: u64) -> f64 {
    us as f64 / 1000.0
}

fn ratio(a: f64, b: f64) -> f64 {
    if b > 0.0 {
        a / b
    } else {
        0.0
    }
}

/// Runs both phases.
pub async fn run(spec: &GroupBenchSpec) -> Result<GroupBenchReport, String> {
    let endpoint = Endpoint::parse(&spec.url).map_err(|e| e.to_string())?;
    let auth = spec
        .token
        .as_ref()
        .map(|t| HeaderValue::from_str(&format!("Bearer {t}")).map_err(|e| e.to_string()))
        .transpose()?;
    let tag = fastrand::u32(..);
    let plain = phase(
        spec,
        &endpoint,
        auth.as_ref(),
        &format!("gb-{tag}-plain"),
        None,
    )
    .await?;
    let group = phase(
        spec,
        &endpoint,
        auth.as_ref(),
        &format!("gb-{tag}-group"),
        Some("bench"),
    )
    .await?;
    Ok(GroupBenchReport {
        url: spec.url.clone(),
        consumers: spec.consumers,
        max_in_flight: spec.max_in_flight,
        connections: spec.connections,
        rate: spec.rate,
        ratio_msg_s: ratio(group.msg_s, plain.msg_s),
        ratio_p50: ratio(
            group.publish_to_delivery.p50_us as f64,
            plain.publish_to_delivery.p50_us as f64,
        ),
        ratio_p99: ratio(
            group.publish_to_delivery.p99_us as f64,
            plain.publish_to_delivery.p99_us as f64,
        ),
        plain,
        group,
    })
}

/// What the consumers of a phase share.
struct Sink {
    epoch: Instant,
    /// Publish → delivery, µs.
    delivery: Mutex<Histogram<u64>>,
    acked: Mutex<Histogram<u64>>,
    deliveries: AtomicU64,
    /// Group: distinct ids acknowledged; plain: the smallest count any consumer received.
    per_consumer: Mutex<Vec<u64>>,
    acked_ids: Mutex<std::collections::HashSet<String>>,
    seen: Mutex<std::collections::HashSet<u64>>,
    redeliveries: AtomicU64,
    /// When the last message was consumed (ns since epoch).
    last_ns: AtomicU64,
    stop: AtomicBool,
}

fn histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 600_000_000, 3).expect("constant bounds are valid")
}

impl Sink {
    fn now_ns(&self) -> u64 {
        self.epoch.elapsed().as_nanos() as u64
    }
}

#[derive(Deserialize)]
struct AckedFrame {
    #[serde(default)]
    acked: Vec<String>,
}

async fn ws_connect(
    endpoint: &Endpoint,
    auth: Option<&HeaderValue>,
    subscribe: String,
) -> Result<crate::subscribe::WsStream, String> {
    let tcp = connect_tcp(endpoint).await.map_err(|e| e.to_string())?;
    let mut request = endpoint
        .ws_url("/ws")
        .into_client_request()
        .map_err(|e| e.to_string())?;
    if let Some(a) = auth {
        request
            .headers_mut()
            .insert(hyper::header::AUTHORIZATION, a.clone());
    }
    let (mut ws, _) = tokio_tungstenite::client_async_with_config(request, tcp, None)
        .await
        .map_err(|e| format!("handshake: {e}"))?;
    ws.send(Message::text(subscribe))
        .await
        .map_err(|e| e.to_string())?;
    loop {
        match tokio::time::timeout(Duration::from_secs(10), ws.next()).await {
            Ok(Some(Ok(Message::Text(t)))) => {
                if t.as_str().starts_with(r#"{"type":"subscribed""#) {
                    return Ok(ws);
                }
                if t.as_str().starts_with(r#"{"type":"error""#) {
                    return Err(t.as_str().chars().take(200).collect());
                }
            }
            Ok(Some(Ok(_))) => {}
            _ => return Err("no subscribed answer".into()),
        }
    }
}

async fn consume(
    mut ws: crate::subscribe::WsStream,
    sink: Arc<Sink>,
    index: usize,
    group: Option<(String, String)>,
) {
    // id -> when it was received (group: for the delivery → acked latency).
    let mut received: HashMap<String, u64> = HashMap::new();
    loop {
        if sink.stop.load(Ordering::Relaxed) {
            return;
        }
        let frame = match tokio::time::timeout(Duration::from_millis(200), ws.next()).await {
            Err(_) => continue,
            Ok(Some(Ok(Message::Text(t)))) => t,
            Ok(Some(Ok(_))) => continue,
            Ok(_) => return,
        };
        let now = sink.now_ns();
        let bytes = frame.as_bytes();
        if bytes.starts_with(br#"{"type":"acked""#) {
            if let Ok(a) = serde_json::from_slice::<AckedFrame>(bytes) {
                let mut h = sink.acked.lock().unwrap_or_else(|e| e.into_inner());
                let mut ids = sink.acked_ids.lock().unwrap_or_else(|e| e.into_inner());
                for id in a.acked {
                    if let Some(at) = received.remove(&id) {
                        let _ = h.record((now.saturating_sub(at) / 1000).max(1));
                    }
                    ids.insert(id);
                }
                sink.last_ns.fetch_max(now, Ordering::Relaxed);
            }
            continue;
        }
        let Ok(m) = Incoming::parse(bytes) else {
            continue;
        };
        if m.kind.as_deref() != Some("message") {
            continue;
        }
        let (Some(p), Some(id)) = (m.payload.as_ref(), m.message_id.as_deref()) else {
            continue;
        };
        sink.deliveries.fetch_add(1, Ordering::Relaxed);
        let _ = sink
            .delivery
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .record((now.saturating_sub(p.sent_ns) / 1000).max(1));
        match &group {
            None => {
                sink.per_consumer.lock().unwrap_or_else(|e| e.into_inner())[index] += 1;
                sink.last_ns.fetch_max(now, Ordering::Relaxed);
            }
            Some((topic, g)) => {
                if !sink
                    .seen
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .insert(p.seq)
                {
                    sink.redeliveries.fetch_add(1, Ordering::Relaxed);
                }
                received.insert(id.to_owned(), now);
                let ack =
                    format!(r#"{{"type":"ack","topic":"{topic}","group":"{g}","ids":["{id}"]}}"#);
                if ws.send(Message::text(ack)).await.is_err() {
                    return;
                }
            }
        }
    }
}

async fn phase(
    spec: &GroupBenchSpec,
    endpoint: &Endpoint,
    auth: Option<&HeaderValue>,
    topic: &str,
    group: Option<&str>,
) -> Result<Phase, String> {
    let sink = Arc::new(Sink {
        epoch: Instant::now(),
        delivery: Mutex::new(histogram()),
        acked: Mutex::new(histogram()),
        deliveries: AtomicU64::new(0),
        per_consumer: Mutex::new(vec![0; spec.consumers]),
        acked_ids: Mutex::default(),
        seen: Mutex::default(),
        redeliveries: AtomicU64::new(0),
        last_ns: AtomicU64::new(0),
        stop: AtomicBool::new(false),
    });
    if let Some(g) = group {
        let mut conn = HttpConn::connect(endpoint)
            .await
            .map_err(|e| e.to_string())?;
        let body = format!(r#"{{"group":"{g}","start":"earliest"}}"#);
        let (status, answer) = conn
            .request(
                endpoint,
                Method::POST,
                &format!("/api/v1/topics/{topic}/groups"),
                Some(body.into()),
                auth,
            )
            .await
            .map_err(|e| e.to_string())?;
        if status != 201 {
            return Err(format!(
                "creating the group: {status} {}",
                String::from_utf8_lossy(&answer)
            ));
        }
    }
    let mut consumers = Vec::new();
    for i in 0..spec.consumers {
        let sub = match group {
            None => format!(r#"{{"type":"subscribe","topics":["{topic}"],"offset":"last"}}"#),
            Some(g) => format!(
                r#"{{"type":"subscribe","topics":["{topic}"],"group":"{g}","consumer":"c{i}","max_in_flight":{}}}"#,
                spec.max_in_flight
            ),
        };
        let ws = ws_connect(endpoint, auth, sub).await?;
        consumers.push(tokio::spawn(consume(
            ws,
            sink.clone(),
            i,
            group.map(|g| (topic.to_owned(), g.to_owned())),
        )));
    }
    // Publish.
    let published = Arc::new(AtomicU64::new(0));
    let errors = Arc::new(AtomicU64::new(0));
    let seq = Arc::new(AtomicU64::new(0));
    let start_ns = sink.now_ns();
    let end = Instant::now() + spec.duration;
    let lanes = spec.connections.max(1);
    let mut publishers = Vec::new();
    for lane in 0..lanes {
        let endpoint = endpoint.clone();
        let auth = auth.cloned();
        let topic = topic.to_owned();
        let sink = sink.clone();
        let published = published.clone();
        let errors = errors.clone();
        let seq = seq.clone();
        let builder = BodyBuilder::new(spec.payload_bytes);
        // Open loop: each lane sends every `lanes`-th message of the schedule.
        let interval = spec
            .rate
            .map(|r| Duration::from_secs_f64(lanes as f64 / r.max(0.001)));
        publishers.push(tokio::spawn(async move {
            let mut conn: Option<HttpConn> = None;
            let mut next = Instant::now()
                + interval.map_or(Duration::ZERO, |i| i.mul_f64(lane as f64 / lanes as f64));
            while Instant::now() < end {
                if let Some(i) = interval {
                    tokio::time::sleep_until(next.into()).await;
                    next += i;
                }
                if conn.as_ref().is_none_or(|c| !c.is_open()) {
                    conn = HttpConn::connect(&endpoint).await.ok();
                }
                let Some(c) = conn.as_mut() else {
                    errors.fetch_add(1, Ordering::Relaxed);
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                };
                let s = seq.fetch_add(1, Ordering::Relaxed);
                let mut body = Vec::with_capacity(256);
                builder.write_message(&mut body, &topic, s, sink.now_ns(), None);
                match c
                    .request(
                        &endpoint,
                        Method::POST,
                        "/api/v1/messages",
                        Some(body.into()),
                        auth.as_ref(),
                    )
                    .await
                {
                    Ok((201, _)) => {
                        published.fetch_add(1, Ordering::Relaxed);
                    }
                    _ => {
                        errors.fetch_add(1, Ordering::Relaxed);
                        conn = None;
                    }
                }
            }
        }));
    }
    for p in publishers {
        let _ = p.await;
    }
    let published = published.load(Ordering::Relaxed);
    // Wait until consumed.
    let deadline = Instant::now() + spec.drain_timeout;
    let consumed = |sink: &Sink| -> u64 {
        match group {
            None => sink
                .per_consumer
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .iter()
                .copied()
                .min()
                .unwrap_or(0),
            Some(_) => sink
                .acked_ids
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .len() as u64,
        }
    };
    let complete = loop {
        if consumed(&sink) >= published {
            break true;
        }
        if Instant::now() > deadline {
            break false;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    sink.stop.store(true, Ordering::Relaxed);
    for c in consumers {
        let _ = c.await;
    }
    let consumed = consumed(&sink);
    let seconds = (sink
        .last_ns
        .load(Ordering::Relaxed)
        .saturating_sub(start_ns)) as f64
        / 1e9;
    let delivery = Lat::of(&sink.delivery.lock().unwrap_or_else(|e| e.into_inner()));
    let acked = group.map(|_| Lat::of(&sink.acked.lock().unwrap_or_else(|e| e.into_inner())));
    Ok(Phase {
        published,
        publish_errors: errors.load(Ordering::Relaxed),
        consumed,
        seconds,
        msg_s: if seconds > 0.0 {
            consumed as f64 / seconds
        } else {
            0.0
        },
        deliveries: sink.deliveries.load(Ordering::Relaxed),
        redeliveries: sink.redeliveries.load(Ordering::Relaxed),
        publish_to_delivery: delivery,
        delivery_to_acked: acked,
        complete,
    })
}
