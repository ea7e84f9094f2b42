//! Consumers of a history: one task per consumer, over WebSocket, SSE or long-poll, driven
//! by commands from the executor (connect from a position, disconnect, stop reading for a
//! while) and recording every delivery and gap into its [`ConsumerLog`].
//!
//! A consumer the relay closes (WebSocket 4008 "slow consumer" or any other close, an SSE
//! stream that ends, a WebSocket `error` frame such as `REPLAY_FAILED`) resumes by itself from
//! the last message it saw, as the documentation tells clients to: that opens a new session.
//!
//! Resume positions, per transport:
//! - WebSocket: `offset` `"earliest"`, `"last"`, or a map of topic to id;
//! - SSE: the `Last-Event-ID` header with the raw `id:` of the last event seen (what a
//!   browser's `EventSource` sends; several topics on one stream share one id), `0-0` for
//!   "everything", no header for "live";
//! - long-poll: `since` per topic; after each answer, `since` = the answer's `next_offset`
//!   (as the README says to), kept as it was when an answer has none.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::{SinkExt, Stream, StreamExt};
use http_body_util::BodyStream;
use hyper::header::HeaderValue;
use hyper::Method;
use serde::Deserialize;
use tokio::sync::{mpsc, oneshot};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::Message;

use eventsource_stream::Eventsource;

use super::oracle::{ConsumerLog, Delivery, GapSeen, Ledger, Pos, Session, TopicLog};
use crate::cli::Transport;
use crate::http::{connect_tcp, Endpoint, HttpConn};
use crate::payload::Incoming;
use crate::subscribe::WsStream;
use crate::verify::MessageId;

/// Opening a connection and subscribing may take this long.
const OPEN_TIMEOUT: Duration = Duration::from_secs(10);
/// A long poll waits at most this long on the relay (whole seconds on the wire).
const POLL_WAIT_S: u64 = 1;
/// Pause before resuming after the relay closed us.
const RESUME_PAUSE: Duration = Duration::from_millis(50);
/// Raw SSE ids remembered per consumer (for "k back" on a multi-topic stream).
const RAW_IDS_KEPT: usize = 5_000;

/// The topic name of topic number `t`.
pub fn topic_name(t: u16) -> String {
    format!("t{t}")
}

fn topic_number(name: &str) -> Option<u16> {
    name.strip_prefix('t')?.parse().ok()
}

/// What is sent for one topic's start.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Wire {
    Earliest,
    /// Only new messages (WebSocket `"last"`, SSE without `Last-Event-ID`).
    Live,
    After(MessageId),
}

fn id_string(id: MessageId) -> String {
    format!("{}-{}", id.ms, id.seq)
}

pub enum Cmd {
    /// Closes any current connection and opens a new one. `oracle`: per topic, where the
    /// session starts for the judgement; `wire`: what is sent; `sse_id`: the
    /// `Last-Event-ID` of a multi-topic SSE stream (single-topic streams use `wire`).
    Connect {
        oracle: Vec<Pos>,
        wire: Vec<Wire>,
        sse_id: Option<String>,
        why: &'static str,
        ready: oneshot::Sender<Result<(), String>>,
    },
    Disconnect(oneshot::Sender<()>),
    Pause(Duration),
}

/// What the executor and the consumer task share.
pub struct Shared {
    pub log: Mutex<ConsumerLog>,
    /// Raw SSE ids seen, with every topic's position at that event.
    pub raw_ids: Mutex<Vec<(String, Vec<Pos>)>>,
    pub ledger: Arc<Mutex<Ledger>>,
    pub epoch: Instant,
    pub resumes: std::sync::atomic::AtomicU64,
    /// Relay closes and error frames by kind.
    pub events: Mutex<HashMap<String, u64>>,
}

pub fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Shared {
    fn event(&self, kind: &str) {
        *lock(&self.events).entry(kind.to_owned()).or_default() += 1;
    }

    fn deliver(&self, topic: Option<&str>, seq: Option<u64>, id: Option<&str>) {
        let at = self.epoch.elapsed();
        let mut log = lock(&self.log);
        log.received += 1;
        log.last_progress = at;
        let id = id.and_then(|s| s.parse().ok());
        let (Some(t), Some(seq)) = (topic.and_then(topic_number), seq) else {
            log.strays
                .push(format!("unreadable message {topic:?} {seq:?}"));
            return;
        };
        match log.current(t) {
            Some(tl) => tl.deliveries.push(Delivery { seq, id, at }),
            None => log.strays.push(format!("seq {seq} of unsubscribed t{t}")),
        }
    }

    fn gap(&self, json: &[u8]) {
        let Ok(g) = serde_json::from_slice::<GapWire>(json) else {
            lock(&self.log).strays.push("unparseable gap".into());
            return;
        };
        let Some(t) = topic_number(&g.topic) else {
            return;
        };
        let newest = lock(&self.ledger).newest_acked(t);
        let seen = GapSeen {
            requested: g.requested.as_deref().and_then(|s| s.parse().ok()),
            oldest_available: g.oldest_available.as_deref().and_then(|s| s.parse().ok()),
            reason: g.reason.unwrap_or_default(),
            newest_acked: newest,
        };
        let mut log = lock(&self.log);
        log.last_progress = self.epoch.elapsed();
        if let Some(tl) = log.current(t) {
            tl.gaps.push(seen);
        }
    }

    fn open_session(&self, topics: &[u16], starts: &[Pos], why: &'static str) {
        let mut log = lock(&self.log);
        if let Some(s) = log.sessions.last_mut() {
            s.closed = true;
        }
        log.sessions.push(Session {
            started: self.epoch.elapsed(),
            topics: topics
                .iter()
                .zip(starts)
                .map(|(&topic, &start)| TopicLog {
                    topic,
                    start,
                    deliveries: Vec::new(),
                    gaps: Vec::new(),
                })
                .collect(),
            closed: false,
            why: why.to_owned(),
        });
    }

    fn close_session(&self) {
        if let Some(s) = lock(&self.log).sessions.last_mut() {
            s.closed = true;
        }
    }
}

#[derive(Deserialize)]
struct GapWire {
    topic: String,
    requested: Option<String>,
    oldest_available: Option<String>,
    reason: Option<String>,
}

#[derive(Deserialize)]
struct PollReply<'a> {
    #[serde(borrow, default)]
    messages: Vec<Incoming<'a>>,
    #[serde(default)]
    gaps: Vec<serde_json::Value>,
    #[serde(default)]
    next_offset: Option<HashMap<String, String>>,
}

/// Events, a failure (its text), or `None` at the end of the body.
type SseStream =
    std::pin::Pin<Box<dyn Stream<Item = Option<Result<eventsource_stream::Event, String>>> + Send>>;

/// An open connection.
enum Conn {
    Ws(Box<WsStream>),
    /// The connection must outlive its body (hence held, never read).
    Sse(#[allow(dead_code)] HttpConn, SseStream),
    Poll {
        http: Option<HttpConn>,
        since: HashMap<u16, String>,
    },
}

/// What woke the consumer's loop.
enum Event {
    Cmd(Option<Cmd>),
    Unpause,
    Read(Read),
}

/// What one read from a connection gave.
enum Read {
    /// Keep reading.
    More,
    /// The relay closed or failed us: resume from the last seen.
    Closed(String),
}

pub struct Consumer {
    pub transport: Transport,
    pub topics: Vec<u16>,
    pub sh: Arc<Shared>,
    /// Every relay's; each session opens on the next one (see `exec`'s module doc).
    endpoints: Vec<Endpoint>,
    /// The relay of the current session.
    current: usize,
    /// Where the current SSE stream would resume: its last event's id, or until it has
    /// one, the id it was opened with.
    sse_start: Option<String>,
    /// `Bearer <token>` when the relay has authentication on.
    authorization: Option<HeaderValue>,
}

impl Consumer {
    pub fn new(
        transport: Transport,
        topics: Vec<u16>,
        sh: Arc<Shared>,
        endpoints: Vec<Endpoint>,
        authorization: Option<HeaderValue>,
    ) -> Consumer {
        Consumer {
            transport,
            topics,
            sh,
            authorization,
            // The first session opens on relay 0 (the turn moves before each open).
            current: endpoints.len().saturating_sub(1),
            endpoints,
            sse_start: None,
        }
    }

    /// The relay of the current session.
    fn endpoint(&self) -> &Endpoint {
        &self.endpoints[self.current]
    }

    fn multi_sse(&self) -> bool {
        self.transport == Transport::Sse && self.topics.len() > 1
    }

    /// Runs until the command channel closes.
    pub async fn run(mut self, mut rx: mpsc::Receiver<Cmd>) {
        let mut conn: Option<Conn> = None;
        let mut paused_until: Option<tokio::time::Instant> = None;
        loop {
            let Some(c) = conn.as_mut() else {
                match rx.recv().await {
                    None => return,
                    Some(cmd) => conn = self.command(cmd, None, &mut paused_until).await,
                }
                continue;
            };
            let paused = paused_until.is_some_and(|u| u > tokio::time::Instant::now());
            let wake = paused_until.unwrap_or_else(tokio::time::Instant::now);
            let event = tokio::select! {
                cmd = rx.recv() => Event::Cmd(cmd),
                _ = tokio::time::sleep_until(wake), if paused => Event::Unpause,
                r = self.read(c), if !paused => Event::Read(r),
            };
            match event {
                Event::Cmd(None) => return,
                Event::Cmd(Some(cmd)) => {
                    let old = conn.take();
                    conn = self.command(cmd, old, &mut paused_until).await;
                }
                Event::Unpause => paused_until = None,
                Event::Read(Read::More) => {}
                Event::Read(Read::Closed(why)) => {
                    self.sh.event(&why);
                    self.sh.close_session();
                    drop(conn.take());
                    tokio::time::sleep(RESUME_PAUSE).await;
                    conn = self.resume_last_seen("relay-closed").await;
                }
            }
        }
    }

    async fn command(
        &mut self,
        cmd: Cmd,
        old: Option<Conn>,
        paused_until: &mut Option<tokio::time::Instant>,
    ) -> Option<Conn> {
        match cmd {
            Cmd::Pause(d) => {
                *paused_until = Some(tokio::time::Instant::now() + d);
                match old {
                    // A poll cut short by the command: its answer is lost; poll again.
                    Some(Conn::Poll { since, .. }) => Some(Conn::Poll { http: None, since }),
                    other => other,
                }
            }
            Cmd::Disconnect(done) => {
                drop(old);
                self.sh.close_session();
                let _ = done.send(());
                None
            }
            Cmd::Connect {
                oracle,
                wire,
                sse_id,
                why,
                ready,
            } => {
                drop(old);
                *paused_until = None;
                self.sse_start = sse_id.clone();
                self.sh.open_session(&self.topics, &oracle, why);
                let opened = self.open(&wire, sse_id.as_deref()).await;
                match opened {
                    Ok(c) => {
                        let _ = ready.send(Ok(()));
                        Some(c)
                    }
                    Err(e) => {
                        self.sh.close_session();
                        let _ = ready.send(Err(e));
                        None
                    }
                }
            }
        }
    }

    /// Reconnects from the last message seen on every topic (retrying while the relay is
    /// unreachable, e.g. while Valkey is down and a replay fails).
    async fn resume_last_seen(&mut self, why: &'static str) -> Option<Conn> {
        for attempt in 0..50u32 {
            let (oracle, wire, sse_id) = {
                let log = lock(&self.sh.log);
                let oracle: Vec<Pos> = self.topics.iter().map(|&t| log.last_seen(t)).collect();
                let wire = oracle
                    .iter()
                    .map(|p| match p {
                        Pos::Earliest => Wire::Earliest,
                        Pos::After(id) => Wire::After(*id),
                    })
                    .collect::<Vec<_>>();
                // The current session's last event id, else the id it started from: the
                // pair that matches `oracle` (its last deliveries, else its start).
                let sse_id = if self.multi_sse() {
                    self.sse_start.clone()
                } else {
                    None
                };
                (oracle, wire, sse_id)
            };
            // A multi-topic stream without any id to resume from starts over.
            let oracle = if self.multi_sse() && sse_id.is_none() {
                vec![Pos::Earliest; self.topics.len()]
            } else {
                oracle
            };
            self.sh
                .resumes
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            self.sh.open_session(&self.topics, &oracle, why);
            match self.open(&wire, sse_id.as_deref()).await {
                Ok(c) => return Some(c),
                Err(e) => {
                    self.sh.event(&format!("resume_failed: {e}"));
                    self.sh.close_session();
                    tokio::time::sleep(Duration::from_millis(100 * u64::from(attempt.min(10) + 1)))
                        .await;
                }
            }
        }
        None
    }

    async fn open(&mut self, wire: &[Wire], sse_id: Option<&str>) -> Result<Conn, String> {
        self.current = (self.current + 1) % self.endpoints.len().max(1);
        match tokio::time::timeout(OPEN_TIMEOUT, self.open_inner(wire, sse_id)).await {
            Ok(r) => r,
            Err(_) => Err("open timed out".into()),
        }
    }

    async fn open_inner(&mut self, wire: &[Wire], sse_id: Option<&str>) -> Result<Conn, String> {
        match self.transport {
            Transport::Ws => self.open_ws(wire).await,
            Transport::Sse => self.open_sse(wire, sse_id).await,
            Transport::Longpoll => {
                let since = self
                    .topics
                    .iter()
                    .zip(wire)
                    .filter_map(|(&t, w)| match w {
                        Wire::After(id) => Some((t, id_string(*id))),
                        // Long-poll has no "live": the executor resolves it to an id.
                        Wire::Earliest | Wire::Live => None,
                    })
                    .collect();
                Ok(Conn::Poll { http: None, since })
            }
        }
    }

    async fn open_ws(&mut self, wire: &[Wire]) -> Result<Conn, String> {
        let tcp = connect_tcp(self.endpoint())
            .await
            .map_err(|e| format!("connect: {e}"))?;
        let mut request = self
            .endpoint()
            .ws_url("/ws")
            .into_client_request()
            .map_err(|e| e.to_string())?;
        if let Some(auth) = &self.authorization {
            request
                .headers_mut()
                .insert(hyper::header::AUTHORIZATION, auth.clone());
        }
        // Frames of hundreds of KB: the library's limits are well above the relay's.
        let config = WebSocketConfig::default();
        let (mut ws, _) = tokio_tungstenite::client_async_with_config(request, tcp, Some(config))
            .await
            .map_err(|e| format!("handshake: {e}"))?;
        let mut cmd = String::from(r#"{"type":"subscribe","topics":["#);
        for (i, t) in self.topics.iter().enumerate() {
            if i > 0 {
                cmd.push(',');
            }
            let _ = write!(cmd, "\"{}\"", topic_name(*t));
        }
        cmd.push(']');
        if wire.iter().all(|w| *w == Wire::Live) {
            cmd.push_str(r#","offset":"last""#);
        } else if wire.iter().all(|w| *w == Wire::Earliest) {
            cmd.push_str(r#","offset":"earliest""#);
        } else {
            cmd.push_str(r#","offset":{"#);
            for (i, (t, w)) in self.topics.iter().zip(wire).enumerate() {
                if i > 0 {
                    cmd.push(',');
                }
                let v = match w {
                    Wire::Earliest => "earliest".to_owned(),
                    Wire::Live => "last".to_owned(),
                    Wire::After(id) => id_string(*id),
                };
                let _ = write!(cmd, "\"{}\":\"{v}\"", topic_name(*t));
            }
            cmd.push('}');
        }
        cmd.push('}');
        ws.send(Message::text(cmd))
            .await
            .map_err(|e| format!("send subscribe: {e}"))?;
        loop {
            match ws.next().await {
                Some(Ok(Message::Text(text))) => {
                    let text = text.as_bytes();
                    if text.starts_with(br#"{"type":"subscribed""#) {
                        return Ok(Conn::Ws(Box::new(ws)));
                    }
                    if text.starts_with(br#"{"type":"error""#) {
                        return Err(format!(
                            "subscribe error {}",
                            String::from_utf8_lossy(&text[..text.len().min(200)])
                        ));
                    }
                    self.ws_frame(text);
                }
                Some(Ok(Message::Close(f))) => {
                    return Err(format!("closed while subscribing: {f:?}"));
                }
                Some(Ok(_)) => {}
                Some(Err(e)) => return Err(format!("ws: {e}")),
                None => return Err("ws ended while subscribing".into()),
            }
        }
    }

    /// Records one WebSocket text frame; `Some(reason)` if it was an error frame.
    fn ws_frame(&self, text: &[u8]) -> Option<String> {
        if text.starts_with(br#"{"type":"gap""#) {
            self.sh.gap(text);
            return None;
        }
        if text.starts_with(br#"{"type":"error""#) {
            let code = serde_json::from_slice::<serde_json::Value>(text)
                .ok()
                .and_then(|v| v["code"].as_str().map(str::to_owned))
                .unwrap_or_default();
            return Some(format!("ws error frame {code}"));
        }
        if text.starts_with(br#"{"type":"message""#) {
            match Incoming::parse(text) {
                Ok(m) => self.sh.deliver(
                    m.topic.as_deref(),
                    m.payload.as_ref().map(|p| p.seq),
                    m.message_id.as_deref(),
                ),
                Err(_) => self.sh.deliver(None, None, None),
            }
        }
        None
    }

    async fn open_sse(&mut self, wire: &[Wire], sse_id: Option<&str>) -> Result<Conn, String> {
        let mut conn = HttpConn::connect(self.endpoint())
            .await
            .map_err(|e| e.to_string())?;
        let (path, last_id) = if self.topics.len() == 1 {
            let id = match wire.first() {
                Some(Wire::After(id)) => Some(id_string(*id)),
                Some(Wire::Earliest) => Some("0-0".to_owned()),
                _ => None,
            };
            (
                format!("/api/v1/topics/{}/events", topic_name(self.topics[0])),
                id,
            )
        } else {
            let names: Vec<String> = self.topics.iter().map(|t| topic_name(*t)).collect();
            (
                format!("/api/v1/events?topics={}", names.join(",")),
                sse_id.map(str::to_owned),
            )
        };
        let mut headers = vec![("accept", HeaderValue::from_static("text/event-stream"))];
        if let Some(id) = last_id {
            headers.push((
                "last-event-id",
                HeaderValue::from_str(&id).map_err(|e| e.to_string())?,
            ));
        }
        let response = conn
            .send(
                self.endpoint(),
                Method::GET,
                &path,
                None,
                self.authorization.as_ref(),
                &headers,
            )
            .await
            .map_err(|e| e.to_string())?;
        if response.status() != 200 {
            return Err(format!("sse status {}", response.status()));
        }
        let data = BodyStream::new(response.into_body()).filter_map(|frame| {
            std::future::ready(match frame {
                Ok(frame) => frame.into_data().ok().map(Ok::<Bytes, hyper::Error>),
                Err(e) => Some(Err(e)),
            })
        });
        // Whole lines only: the SSE parser rescans its buffer from the start on every chunk,
        // so a 200 KB `data:` line arriving in 16 KB frames cost it quadratic time (a debug
        // build fell to ~1 message a second and the checker saw "stalls").
        let lines = data
            .scan(bytes::BytesMut::new(), |carry, frame| {
                std::future::ready(Some(match frame {
                    Ok(frame) => {
                        // Only the new bytes are searched: the carry has no line end.
                        let before = carry.len();
                        carry.extend_from_slice(&frame);
                        frame
                            .iter()
                            .rposition(|&b| b == b'\n')
                            .map(|end| Ok(carry.split_to(before + end + 1).freeze()))
                    }
                    Err(e) => Some(Err(e)),
                }))
            })
            .filter_map(std::future::ready);
        let events = lines
            .eventsource()
            .map(|r| match r {
                Ok(ev) => Ok(ev),
                Err(e) => Err(e.to_string()),
            })
            .map(Some)
            .chain(futures_util::stream::once(std::future::ready(None)));
        Ok(Conn::Sse(conn, Box::pin(events)))
    }

    async fn read(&mut self, conn: &mut Conn) -> Read {
        match conn {
            Conn::Ws(ws) => match ws.next().await {
                Some(Ok(Message::Text(text))) => match self.ws_frame(text.as_bytes()) {
                    Some(err) => Read::Closed(err),
                    None => Read::More,
                },
                Some(Ok(Message::Close(f))) => Read::Closed(format!(
                    "ws close {}",
                    f.map_or(1005, |f| u16::from(f.code))
                )),
                Some(Ok(_)) => Read::More,
                Some(Err(e)) => Read::Closed(format!("ws error: {e}")),
                None => Read::Closed("ws ended".into()),
            },
            Conn::Sse(_, events) => match events.next().await {
                Some(Some(Ok(ev))) => {
                    match ev.event.as_str() {
                        "gap" => self.sh.gap(ev.data.as_bytes()),
                        "message" | "" => {
                            match Incoming::parse(ev.data.as_bytes()) {
                                Ok(m) => self.sh.deliver(
                                    m.topic.as_deref(),
                                    m.payload.as_ref().map(|p| p.seq),
                                    m.message_id.as_deref(),
                                ),
                                Err(_) => self.sh.deliver(None, None, None),
                            }
                            if !ev.id.is_empty() {
                                self.sse_start = Some(ev.id.clone());
                                self.remember_raw(ev.id);
                            }
                        }
                        _ => {}
                    }
                    Read::More
                }
                Some(Some(Err(e))) => Read::Closed(format!("sse stream error: {e}")),
                Some(None) | None => Read::Closed("sse stream ended".into()),
            },
            Conn::Poll { http, since } => self.poll(http, since).await,
        }
    }

    fn remember_raw(&self, raw: String) {
        let positions: Vec<Pos> = {
            let log = lock(&self.sh.log);
            self.topics.iter().map(|&t| log.last_seen(t)).collect()
        };
        let mut ids = lock(&self.sh.raw_ids);
        if ids.len() >= RAW_IDS_KEPT {
            ids.drain(..RAW_IDS_KEPT / 2);
        }
        ids.push((raw, positions));
    }

    async fn poll(
        &mut self,
        http: &mut Option<HttpConn>,
        since: &mut HashMap<u16, String>,
    ) -> Read {
        if http.as_ref().is_none_or(|c| !c.is_open()) {
            match HttpConn::connect(self.endpoint()).await {
                Ok(c) => *http = Some(c),
                Err(e) => {
                    tokio::time::sleep(RESUME_PAUSE).await;
                    self.sh.event(&format!("poll connect: {}", e.kind()));
                    return Read::More;
                }
            }
        }
        let Some(c) = http.as_mut() else {
            return Read::More;
        };
        let mut body = String::from(r#"{"topics":["#);
        for (i, t) in self.topics.iter().enumerate() {
            if i > 0 {
                body.push(',');
            }
            let _ = write!(body, "\"{}\"", topic_name(*t));
        }
        body.push_str(r#"],"since":{"#);
        let mut first = true;
        for t in &self.topics {
            if let Some(id) = since.get(t) {
                if !first {
                    body.push(',');
                }
                first = false;
                let _ = write!(body, "\"{}\":\"{id}\"", topic_name(*t));
            }
        }
        let limit = [10, 100, 1000][fastrand::usize(..3)];
        let _ = write!(body, r#"}},"timeout":{POLL_WAIT_S},"limit":{limit}}}"#);
        let answer = tokio::time::timeout(
            Duration::from_secs(POLL_WAIT_S + 10),
            c.request(
                self.endpoint(),
                Method::POST,
                "/messages/poll",
                Some(Bytes::from(body)),
                self.authorization.as_ref(),
            ),
        )
        .await;
        match answer {
            Ok(Ok((200, bytes))) => {
                let Ok(reply) = serde_json::from_slice::<PollReply>(&bytes) else {
                    self.sh.event("poll: unparseable answer");
                    return Read::More;
                };
                for g in &reply.gaps {
                    self.sh.gap(g.to_string().as_bytes());
                }
                for m in &reply.messages {
                    self.sh.deliver(
                        m.topic.as_deref(),
                        m.payload.as_ref().map(|p| p.seq),
                        m.message_id.as_deref(),
                    );
                }
                if let Some(next) = reply.next_offset {
                    *since = next
                        .iter()
                        .filter_map(|(k, v)| Some((topic_number(k)?, v.clone())))
                        .collect();
                }
                Read::More
            }
            Ok(Ok((status, _))) => {
                self.sh.event(&format!("poll status {status}"));
                tokio::time::sleep(RESUME_PAUSE).await;
                Read::More
            }
            Ok(Err(e)) => {
                self.sh.event(&format!("poll: {}", e.kind()));
                *http = None;
                Read::More
            }
            Err(_) => {
                self.sh.event("poll: timeout");
                *http = None;
                Read::More
            }
        }
    }
}
