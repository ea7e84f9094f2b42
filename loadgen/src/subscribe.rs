//! Subscribers over WebSocket, long-poll and Server-Sent Events, and what they record.
//!
//! Every subscriber follows every topic of the run, records each message in its
//! [`Receipts`] (for the delivery check), counts measured deliveries and records their
//! latency (receive time minus the payload's intended send time).
//!
//! A subscriber that loses its connection after it was ready reconnects and resumes from the
//! last id it saw per topic (WebSocket `offset`, long-poll `since`, SSE `Last-Event-ID`), as
//! a real client would; whatever the relay fails to replay then shows up as lost. One that
//! never becomes ready (connect or subscribe failed) gives up and is left out of the check:
//! nothing was owed to it.
//!
//! Does not own publishing, draining or the verdict (`delivery`).

use std::borrow::Cow;
use std::collections::HashMap;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use bytes::Bytes;
use futures_util::stream::{self, SelectAll};
use futures_util::{SinkExt, Stream, StreamExt};
use http_body_util::BodyStream;
use hyper::body::Incoming as Body;
use hyper::header::HeaderValue;
use hyper::Method;
use tokio::net::TcpStream;
use tokio::sync::{mpsc, watch, Semaphore};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;

use eventsource_stream::Eventsource;

use crate::cli::Transport;
use crate::http::{connect_tcp, HttpConn};
use crate::payload::{Incoming, PollAnswer, Probe};
use crate::run::RunCtx;
use crate::stats::{LatencyHub, LatencyRecorder, Tally};
use crate::verify::{Ledger, Receipt, Receipts};

/// How long a long poll may wait on the relay: short enough that a stopped run is not held
/// up, long enough that an idle subscriber costs one request per 5 s.
const POLL_WAIT_S: u64 = 5;
/// Messages per poll answer; the relay's maximum, so a backlog drains in few round trips.
const POLL_LIMIT: usize = 1000;
/// WebSocket read buffer. The library zero-fills the free part of its buffer before every
/// read; at its 128 KiB default that memset was an eighth of loadgen's CPU in a 1000-way
/// fan-out (and 128 MiB of buffers). A few hundred frames of ~300 bytes fit in 16 KiB.
const WS_READ_BUFFER: usize = 16 * 1024;
/// Pause before a reconnect.
const RECONNECT_PAUSE: Duration = Duration::from_millis(100);
/// Deliveries a subscriber counts locally before adding them to the shared counters; the
/// progress line may lag by this much per subscriber.
const SHARED_FLUSH: u64 = 32;
/// Stripes of each per-publish-URL latency hub (a split of the main one: fewer writers).
const LATENCY_BY_URL_STRIPES: usize = 4;
/// How long a subscriber's closing handshake may take at the end of a run.
const CLOSE_GRACE: Duration = Duration::from_millis(200);
/// An SSE start point before any id the relay issues: on a fresh topic, "everything", which
/// makes the stream's registration race-free (the relay replays what came before it).
const SSE_FROM_START: &str = "0-0";

pub type WsStream = WebSocketStream<TcpStream>;

/// What all subscribers of a run share.
pub struct SubShared {
    pub ctx: Arc<RunCtx>,
    pub transport: Transport,
    /// Topic name -> index into the run's topics.
    pub topic_index: HashMap<String, usize>,
    pub latency: Arc<LatencyHub>,
    /// With several publish URLs: delivery latency per URL the message was published
    /// through (index as in `ctx.publish_endpoints`); empty otherwise.
    pub latency_by_publish_url: Vec<Arc<LatencyHub>>,
    /// Deliveries of messages intended at or after this (ns since the epoch) are measured;
    /// `u64::MAX` until publishing starts.
    pub measure_from_ns: AtomicU64,
    /// Subscriber-side events by kind: close codes, disconnects, gaps, errors.
    pub events: Tally,
    pub reconnects: AtomicU64,
    /// Latest measured delivery, ns since the epoch.
    pub last_delivery_ns: AtomicU64,
    /// Bounds concurrent connection set-ups: a thousand simultaneous handshakes would
    /// overflow the relay's accept backlog and show up as connect failures, not as load.
    pub setup_gate: Semaphore,
    /// Drop the connection after about this long (jittered ±50%) and resume from the last
    /// ids seen, as a flaky client would (the soak). `None`: stay connected.
    pub reconnect_every: Option<Duration>,
}

impl SubShared {
    pub fn new(ctx: Arc<RunCtx>, transport: Transport, latency: Arc<LatencyHub>) -> Arc<Self> {
        Self::reconnecting(ctx, transport, latency, None)
    }

    /// Subscribers that drop their connection every `reconnect_every` (jittered) and resume.
    pub fn reconnecting(
        ctx: Arc<RunCtx>,
        transport: Transport,
        latency: Arc<LatencyHub>,
        reconnect_every: Option<Duration>,
    ) -> Arc<Self> {
        let by_url = if ctx.tags_publish_url() {
            ctx.publish_endpoints.len()
        } else {
            0
        };
        Arc::new(SubShared {
            reconnect_every,
            latency_by_publish_url: (0..by_url)
                .map(|_| LatencyHub::new(LATENCY_BY_URL_STRIPES))
                .collect(),
            topic_index: ctx
                .topics
                .iter()
                .enumerate()
                .map(|(i, t)| (t.clone(), i))
                .collect(),
            ctx,
            transport,
            latency,
            measure_from_ns: AtomicU64::new(u64::MAX),
            events: Tally::default(),
            reconnects: AtomicU64::new(0),
            last_delivery_ns: AtomicU64::new(0),
            setup_gate: Semaphore::new(64),
        })
    }
}

/// What a running subscriber shares with the drain: a cheap count of distinct messages, and
/// its receipts for the exact check (locked per delivery, uncontended but for the drain).
pub struct Progress {
    /// Distinct messages received, acknowledged or not.
    pub distinct: AtomicU64,
    receipts: Mutex<Receipts>,
}

impl Progress {
    pub fn new(topics: usize) -> Arc<Progress> {
        Arc::new(Progress {
            distinct: AtomicU64::new(0),
            receipts: Mutex::new(Receipts::new(topics)),
        })
    }

    fn receipts(&self) -> std::sync::MutexGuard<'_, Receipts> {
        self.receipts.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Whether every message `ledger` has as acknowledged (`owed` of them) was received.
    /// The count alone cannot say: a publish that failed (a timeout) but was stored also
    /// arrives, and would stand in for an acknowledged one still on its way.
    pub fn has_all(&self, ledger: &Ledger, owed: u64) -> bool {
        self.distinct.load(Ordering::Relaxed) >= owed && self.receipts().missing(ledger) == 0
    }
}

/// One subscriber's state.
struct Subscriber {
    sh: Arc<SubShared>,
    progress: Arc<Progress>,
    latency: LatencyRecorder,
    /// One per publish URL, when payloads name theirs.
    latency_by_publish_url: Vec<LatencyRecorder>,
    /// Per topic, the last id received: the resume point.
    last_ids: Vec<Option<String>>,
    ready: Option<mpsc::Sender<bool>>,
    /// Measured deliveries not yet added to the shared counter, and the latest of them:
    /// the shared atomics are touched once per [`SHARED_FLUSH`] deliveries, not per message
    /// (at a million deliveries/s, per-message updates of one cache line from every thread
    /// cost more than the parsing).
    unflushed: u64,
    unflushed_last_ns: u64,
}

impl Subscriber {
    fn deliver(&mut self, m: &Incoming<'_>, now_ns: u64) {
        let sh = &self.sh;
        let (Some(topic), Some(probe)) = (
            m.topic
                .as_deref()
                .and_then(|t| sh.topic_index.get(t).copied()),
            m.payload.as_ref(),
        ) else {
            sh.events.add("foreign_message", 1);
            return;
        };
        let id = m.message_id.as_deref().and_then(|s| s.parse().ok());
        let receipt = self.progress.receipts().record(topic, probe.seq, id);
        match receipt {
            Receipt::First => {
                self.progress.distinct.fetch_add(1, Ordering::Relaxed);
                if let Some(mid) = m.message_id.as_deref() {
                    let slot = self.last_ids[topic].get_or_insert_with(String::new);
                    slot.clear();
                    slot.push_str(mid);
                }
            }
            Receipt::Duplicate => {}
            Receipt::Foreign => {
                sh.events.add("foreign_message", 1);
                return;
            }
        }
        if probe.sent_ns >= sh.measure_from_ns.load(Ordering::Relaxed) {
            let took = now_ns.saturating_sub(probe.sent_ns);
            self.latency.record_ns(took);
            if let Some(by_url) = probe
                .via
                .and_then(|v| self.latency_by_publish_url.get_mut(v as usize))
            {
                by_url.record_ns(took);
            }
            self.unflushed += 1;
            self.unflushed_last_ns = now_ns;
            if self.unflushed >= SHARED_FLUSH {
                self.flush_counts();
            }
        }
    }

    fn flush_counts(&mut self) {
        if self.unflushed > 0 {
            let sh = &self.sh;
            sh.ctx
                .counters
                .deliveries
                .fetch_add(self.unflushed, Ordering::Relaxed);
            sh.last_delivery_ns
                .fetch_max(self.unflushed_last_ns, Ordering::Relaxed);
            self.unflushed = 0;
        }
    }

    /// Records a bare payload frame (Nchan: no id, no topic; a subscriber follows one topic).
    fn deliver_bare(&mut self, payload: &[u8]) {
        let now_ns = self.sh.ctx.now_ns();
        // A cheap clone, so the topic name can be borrowed while `deliver` takes `self`.
        let sh = self.sh.clone();
        match serde_json::from_slice::<Probe>(payload) {
            Ok(probe) => {
                let m = Incoming {
                    kind: None,
                    message_id: None,
                    topic: sh.ctx.topics.first().map(|t| Cow::Borrowed(t.as_str())),
                    payload: Some(probe),
                };
                self.deliver(&m, now_ns);
            }
            Err(_) => self.sh.events.add("unparseable", 1),
        }
    }

    /// Parses one message object (a frame's text, an SSE `data:`) and records it.
    fn deliver_json(&mut self, json: &[u8]) {
        let now_ns = self.sh.ctx.now_ns();
        match Incoming::parse(json) {
            Ok(m) => self.deliver(&m, now_ns),
            Err(_) => self.sh.events.add("unparseable", 1),
        }
    }

    fn signal_ready(&mut self, ok: bool) {
        if let Some(tx) = self.ready.take() {
            let _ = tx.try_send(ok);
        }
    }

    fn event(&self, kind: &str) {
        self.sh.events.add(kind, 1);
    }
}

/// Resolves when the run says stop.
pub async fn stopped(stop: &mut watch::Receiver<bool>) {
    // A dropped sender also means the run is over.
    let _ = stop.wait_for(|s| *s).await;
}

/// When this connection should be dropped on purpose, if the subscribers reconnect.
fn voluntary_deadline(sh: &SubShared) -> Option<tokio::time::Instant> {
    sh.reconnect_every.map(|every| {
        let jitter = 0.5 + fastrand::f64();
        tokio::time::Instant::now() + every.mul_f64(jitter)
    })
}

/// Resolves at `deadline`; never without one.
async fn reached(deadline: Option<tokio::time::Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d).await,
        None => std::future::pending().await,
    }
}

/// Sleeps, or returns `true` early if the run stops meanwhile.
async fn pause_or_stop(stop: &mut watch::Receiver<bool>, pause: Duration) -> bool {
    tokio::select! {
        _ = stopped(stop) => true,
        _ = tokio::time::sleep(pause) => *stop.borrow(),
    }
}

/// Runs one subscriber until `stop`, recording into `progress`. Returns its receipts, or
/// `None` if it never became ready. `ready` gets `true` once it is subscribed (or `false` if
/// it gave up).
pub async fn run(
    sh: Arc<SubShared>,
    ready: mpsc::Sender<bool>,
    progress: Arc<Progress>,
    stop: watch::Receiver<bool>,
) -> Option<Receipts> {
    let topics = sh.ctx.topics.len();
    let mut sub = Subscriber {
        latency: sh.latency.recorder(),
        latency_by_publish_url: sh
            .latency_by_publish_url
            .iter()
            .map(|hub| hub.recorder())
            .collect(),
        sh: sh.clone(),
        progress,
        last_ids: vec![None; topics],
        ready: Some(ready),
        unflushed: 0,
        unflushed_last_ns: 0,
    };
    let became_ready = match sh.transport {
        Transport::Ws => ws_subscriber(&mut sub, stop).await,
        Transport::Longpoll => longpoll_subscriber(&mut sub, stop).await,
        Transport::Sse => sse_subscriber(&mut sub, stop).await,
    };
    sub.signal_ready(false);
    sub.flush_counts();
    let receipts = std::mem::replace(&mut *sub.progress.receipts(), Receipts::new(0));
    became_ready.then_some(receipts)
}

/// Connects, upgrades, sends `subscribe`, and waits for `subscribed`. Messages that come
/// before `subscribed` go to `on_message`. Returns the failure kind on error. Without a
/// subscribe command (Nchan: the path subscribes), open once the upgrade is answered.
pub async fn ws_open(
    ctx: &RunCtx,
    subscribe: Option<String>,
    on_message: &mut (dyn FnMut(&[u8]) + Send),
) -> Result<WsStream, &'static str> {
    let setup = async {
        let tcp = connect_tcp(&ctx.endpoint).await.map_err(|_| "connect")?;
        let mut request = ctx
            .endpoint
            .ws_url(&ctx.target.ws_path(&ctx.topics))
            .into_client_request()
            .map_err(|_| "ws_request")?;
        if let Some(protocols) = ctx.target.ws_protocols() {
            let value = HeaderValue::from_str(&protocols).map_err(|_| "ws_request")?;
            request
                .headers_mut()
                .insert("sec-websocket-protocol", value);
        }
        let config = WebSocketConfig::default().read_buffer_size(WS_READ_BUFFER);
        let (mut ws, _) = tokio_tungstenite::client_async_with_config(request, tcp, Some(config))
            .await
            .map_err(|_| "ws_handshake")?;
        let Some(subscribe) = subscribe else {
            return Ok(ws);
        };
        ws.send(Message::text(subscribe))
            .await
            .map_err(|_| "ws_disconnect")?;
        loop {
            match ws.next().await {
                Some(Ok(Message::Text(text))) => match frame_type(text.as_bytes()) {
                    FrameType::Subscribed => return Ok(ws),
                    FrameType::Error => return Err("ws_subscribe_error"),
                    FrameType::Message => on_message(text.as_bytes()),
                    FrameType::Gap | FrameType::Other => {}
                },
                Some(Ok(Message::Close(_))) | None | Some(Err(_)) => return Err("ws_disconnect"),
                Some(Ok(_)) => {}
            }
        }
    };
    match tokio::time::timeout(ctx.timeout, setup).await {
        Ok(r) => r,
        Err(_) => Err("timeout"),
    }
}

#[derive(Debug, PartialEq, Eq)]
enum FrameType {
    Subscribed,
    Error,
    Message,
    Gap,
    Other,
}

fn classify(kind: &[u8]) -> FrameType {
    match kind {
        b"subscribed" => FrameType::Subscribed,
        b"error" => FrameType::Error,
        b"message" => FrameType::Message,
        b"gap" => FrameType::Gap,
        _ => FrameType::Other,
    }
}

/// The `type` of a server frame, read cheaply from its start: this relay writes `type`
/// first (`{"type":"message",...`). Frames that do not start that way (the Python relay
/// writes `{"type": "message"`) are parsed in full.
fn frame_type(text: &[u8]) -> FrameType {
    const PREFIX: &[u8] = br#"{"type":""#;
    match text.strip_prefix(PREFIX) {
        Some(rest) => classify(rest.split(|b| *b == b'"').next().unwrap_or_default()),
        None => serde_json::from_slice::<Incoming>(text)
            .ok()
            .and_then(|m| m.kind.map(|k| classify(k.as_bytes())))
            .unwrap_or(FrameType::Other),
    }
}

async fn ws_subscriber(sub: &mut Subscriber, mut stop: watch::Receiver<bool>) -> bool {
    let sh = sub.sh.clone();
    let ctx = &sh.ctx;
    let bare = ctx.target.bare_frames();
    let mut was_ready = false;
    loop {
        let subscribe = ctx
            .target
            .ws_subscribe(&ctx.topics, was_ready.then_some(&sub.last_ids[..]));
        let opened = {
            let _permit = sh.setup_gate.acquire().await;
            let mut early: Vec<Vec<u8>> = Vec::new();
            let r = ws_open(ctx, subscribe, &mut |m| early.push(m.to_vec())).await;
            for m in early {
                sub.deliver_json(&m);
            }
            r
        };
        let mut ws = match opened {
            Ok(ws) => ws,
            Err(kind) => {
                sub.event(kind);
                if !was_ready || pause_or_stop(&mut stop, RECONNECT_PAUSE).await {
                    return was_ready;
                }
                continue;
            }
        };
        if was_ready {
            sh.reconnects.fetch_add(1, Ordering::Relaxed);
        } else {
            was_ready = true;
            sub.signal_ready(true);
        }
        let drop_at = voluntary_deadline(&sh);
        loop {
            let frame = tokio::select! {
                biased;
                frame = ws.next() => frame,
                _ = stopped(&mut stop) => {
                    let _ = tokio::time::timeout(CLOSE_GRACE, ws.close(None)).await;
                    return true;
                }
                // Frames after our close are not read: the resume asks for them again.
                _ = reached(drop_at) => {
                    let _ = tokio::time::timeout(CLOSE_GRACE, ws.close(None)).await;
                    sub.event("voluntary_disconnect");
                    break;
                }
            };
            match frame {
                Some(Ok(Message::Text(text))) if bare => sub.deliver_bare(text.as_bytes()),
                Some(Ok(Message::Text(text))) => match frame_type(text.as_bytes()) {
                    FrameType::Message => sub.deliver_json(text.as_bytes()),
                    FrameType::Error => sub.event("ws_error_frame"),
                    FrameType::Gap => sub.event("gap"),
                    FrameType::Subscribed | FrameType::Other => {}
                },
                Some(Ok(Message::Close(frame))) => {
                    let code = frame.map_or(1005, |f| u16::from(f.code));
                    sub.event(&format!("ws_close_{code}"));
                    break;
                }
                Some(Ok(_)) => {}
                Some(Err(_)) | None => {
                    sub.event("ws_disconnect");
                    break;
                }
            }
        }
        if pause_or_stop(&mut stop, RECONNECT_PAUSE).await {
            return true;
        }
    }
}

async fn longpoll_subscriber(sub: &mut Subscriber, mut stop: watch::Receiver<bool>) -> bool {
    let sh = sub.sh.clone();
    let ctx = &sh.ctx;
    // This relay reads `since: {}` as "from the oldest", so the first poll misses nothing
    // published before it parks; the subscriber is ready as soon as it starts polling.
    sub.signal_ready(true);
    let mut conn: Option<HttpConn> = None;
    let wait = Duration::from_secs(POLL_WAIT_S) + ctx.timeout;
    let mut drop_at = voluntary_deadline(&sh);
    loop {
        if *stop.borrow() {
            return true;
        }
        if conn.as_ref().is_none_or(|c| !c.is_open()) {
            let connected = {
                let _permit = sh.setup_gate.acquire().await;
                tokio::time::timeout(ctx.timeout, HttpConn::connect(&ctx.endpoint)).await
            };
            match connected {
                Ok(Ok(c)) => conn = Some(c),
                Ok(Err(e)) => {
                    sub.event(e.kind());
                    if pause_or_stop(&mut stop, RECONNECT_PAUSE).await {
                        return true;
                    }
                    continue;
                }
                Err(_) => {
                    sub.event("timeout");
                    continue;
                }
            }
        }
        let Some(c) = conn.as_mut() else { continue };
        let body = ctx
            .target
            .poll_body(&ctx.topics, &sub.last_ids, POLL_WAIT_S, POLL_LIMIT);
        let poll = c.request(
            &ctx.endpoint,
            Method::POST,
            "/messages/poll",
            Some(Bytes::from(body)),
            ctx.target.authorization(),
        );
        let answer = tokio::select! {
            biased;
            r = tokio::time::timeout(wait, poll) => Some(r),
            _ = stopped(&mut stop) => return true,
            _ = reached(drop_at) => None,
        };
        let Some(answer) = answer else {
            // Walked away from a parked poll: the relay must forget it, and the next poll
            // (on a new connection) asks again for whatever this one would have returned.
            sub.event("voluntary_disconnect");
            sh.reconnects.fetch_add(1, Ordering::Relaxed);
            conn = None;
            drop_at = voluntary_deadline(&sh);
            continue;
        };
        match answer {
            Ok(Ok((200, body))) => match serde_json::from_slice::<PollAnswer>(&body) {
                Ok(answer) => {
                    let now_ns = ctx.now_ns();
                    for m in &answer.messages {
                        sub.deliver(m, now_ns);
                    }
                }
                Err(_) => sub.event("unparseable"),
            },
            Ok(Ok((status, _))) => {
                sub.event(&format!("poll_{status}"));
                if pause_or_stop(&mut stop, RECONNECT_PAUSE).await {
                    return true;
                }
            }
            Ok(Err(e)) => {
                sub.event(e.kind());
                conn = None;
            }
            Err(_) => {
                sub.event("poll_timeout");
                conn = None;
            }
        }
    }
}

/// What a tagged SSE stream yields.
enum SseItem {
    Event(eventsource_stream::Event),
    Error,
    End,
}

type Tagged = Pin<Box<dyn Stream<Item = (usize, SseItem)> + Send>>;

/// Opens one topic's event stream from `since` (the relay replays after it).
async fn sse_open(
    ctx: &RunCtx,
    topic: &str,
    since: &str,
) -> Result<(HttpConn, Body), &'static str> {
    let open = async {
        let mut conn = HttpConn::connect(&ctx.endpoint)
            .await
            .map_err(|e| e.kind())?;
        let last_event_id = HeaderValue::from_str(since).map_err(|_| "sse_request")?;
        let response = conn
            .send(
                &ctx.endpoint,
                Method::GET,
                &format!("/api/v1/topics/{topic}/events"),
                None,
                ctx.target.authorization(),
                &[
                    ("accept", HeaderValue::from_static("text/event-stream")),
                    ("last-event-id", last_event_id),
                ],
            )
            .await
            .map_err(|e| e.kind())?;
        if response.status() != 200 {
            return Err("sse_status");
        }
        Ok((conn, response.into_body()))
    };
    match tokio::time::timeout(ctx.timeout, open).await {
        Ok(r) => r,
        Err(_) => Err("timeout"),
    }
}

fn tag(topic: usize, body: Body) -> Tagged {
    let data = BodyStream::new(body).filter_map(|frame| {
        std::future::ready(match frame {
            Ok(frame) => frame.into_data().ok().map(Ok::<Bytes, hyper::Error>),
            Err(e) => Some(Err(e)),
        })
    });
    let events = data.eventsource().map(move |r| {
        (
            topic,
            match r {
                Ok(event) => SseItem::Event(event),
                Err(_) => SseItem::Error,
            },
        )
    });
    Box::pin(events.chain(stream::once(std::future::ready((topic, SseItem::End)))))
}

async fn sse_subscriber(sub: &mut Subscriber, mut stop: watch::Receiver<bool>) -> bool {
    let sh = sub.sh.clone();
    let ctx = &sh.ctx;
    let mut streams: SelectAll<Tagged> = SelectAll::new();
    // The connections must outlive their bodies: dropping one aborts its driver.
    let mut conns: Vec<Option<HttpConn>> = (0..ctx.topics.len()).map(|_| None).collect();
    for (i, topic) in ctx.topics.iter().enumerate() {
        let opened = {
            let _permit = sh.setup_gate.acquire().await;
            sse_open(ctx, topic, SSE_FROM_START).await
        };
        match opened {
            Ok((conn, body)) => {
                conns[i] = Some(conn);
                streams.push(tag(i, body));
            }
            Err(kind) => {
                sub.event(kind);
                return false;
            }
        }
    }
    sub.signal_ready(true);
    let mut drop_at = voluntary_deadline(&sh);
    loop {
        let item = tokio::select! {
            biased;
            item = streams.next() => Some(item),
            _ = stopped(&mut stop) => return true,
            _ = reached(drop_at) => None,
        };
        let Some(item) = item else {
            // Drops every stream and resumes each from its topic's last id.
            sub.event("voluntary_disconnect");
            streams.clear();
            conns.iter_mut().for_each(|c| *c = None);
            for topic in 0..ctx.topics.len() {
                if sse_reopen(sub, &mut stop, topic, &mut streams, &mut conns).await {
                    return true;
                }
            }
            drop_at = voluntary_deadline(&sh);
            continue;
        };
        match item {
            Some((_, SseItem::Event(event))) => match event.event.as_str() {
                "message" | "" => sub.deliver_json(event.data.as_bytes()),
                "gap" => sub.event("gap"),
                _ => {}
            },
            Some((_, SseItem::Error)) => sub.event("sse_error"),
            Some((topic, SseItem::End)) => {
                sub.event("sse_end");
                conns[topic] = None;
                if sse_reopen(sub, &mut stop, topic, &mut streams, &mut conns).await {
                    return true;
                }
            }
            // Every stream ends with `End`, which reopens it; an empty set cannot happen
            // while topics exist.
            None => return true,
        }
    }
}

/// Reopens one topic's stream from the last id seen on it, retrying until it opens; returns
/// `true` if the run stopped first.
async fn sse_reopen(
    sub: &mut Subscriber,
    stop: &mut watch::Receiver<bool>,
    topic: usize,
    streams: &mut SelectAll<Tagged>,
    conns: &mut [Option<HttpConn>],
) -> bool {
    let sh = sub.sh.clone();
    let ctx = &sh.ctx;
    loop {
        if pause_or_stop(stop, RECONNECT_PAUSE).await {
            return true;
        }
        let since = sub.last_ids[topic]
            .clone()
            .unwrap_or_else(|| SSE_FROM_START.to_owned());
        match sse_open(ctx, &ctx.topics[topic], &since).await {
            Ok((conn, body)) => {
                conns[topic] = Some(conn);
                streams.push(tag(topic, body));
                sh.reconnects.fetch_add(1, Ordering::Relaxed);
                return false;
            }
            Err(kind) => sub.event(kind),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frame_types_are_read_from_the_prefix_or_the_whole_frame() {
        assert_eq!(
            frame_type(br#"{"type":"message","message_id":"1-0"}"#),
            FrameType::Message
        );
        assert_eq!(
            frame_type(br#"{"type":"subscribed","topics":[]}"#),
            FrameType::Subscribed
        );
        assert_eq!(
            frame_type(br#"{"type":"error","code":"X"}"#),
            FrameType::Error
        );
        // Another server may order fields differently.
        assert_eq!(
            frame_type(br#"{"topics":["a"], "type":"subscribed"}"#),
            FrameType::Subscribed
        );
        assert_eq!(
            frame_type(br#"{"type": "message", "payload": {"seq": 1, "sent_ns": 2}}"#),
            FrameType::Message
        );
        assert_eq!(frame_type(br#"{"type":"gap","topic":"t"}"#), FrameType::Gap);
        assert_eq!(frame_type(b"not json"), FrameType::Other);
    }
}
