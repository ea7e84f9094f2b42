//! Consumer groups (work queues, docs/work-queues.md) in a history: the groups are created
//! from `earliest` before the first step; their workers (WebSocket `subscribe` with
//! `group`/`consumer`/`max_in_flight`, or HTTP `poll`/`ack`/`nack`) run alongside the steps,
//! each on the next relay at every (re)connect, and misbehave on purpose: they acknowledge at
//! once or after the group's `ack_timeout`, nack, ignore messages (left to time out), and
//! crash holding unacknowledged messages (the connection dropped, a new one opened, under
//! the same consumer name or a new one), within a budget per worker. Some messages
//! ("poison", about one in 64 by a hash of their seq) are never acknowledged (nacked or
//! ignored), so they end in the dead-letter topic.
//!
//! After the steps, the workers stop misbehaving (poison messages stay poison) until every
//! message owed to each group is settled or a deadline passes; then the dead-letter topic is
//! read and the group oracle judges, per group:
//!
//! 1. every acknowledged publish (201) to the topic is, exactly once, either acknowledged
//!    (its id in the `acked` list of exactly one ack answer) or dead-lettered (exactly one
//!    message of `<topic>.dead` with metadata `original_id` = its id and `group` = the
//!    group); never both. Exempt: messages with a ttl or that a trim may have removed (a group
//!    skips those), and messages whose only acknowledgement may be an ack request that got
//!    no answer (the relay may have applied it: an *ambiguous ack*, like an ambiguous
//!    publish). A publish answered 503 is neither owed nor forbidden;
//! 2. nothing is acknowledged, dead-lettered or delivered that was not published (with the
//!    id its 201 named) or ambiguous, and nothing of another topic or group;
//! 3. no worker connection ever holds more than its `max_in_flight` unacknowledged messages:
//!    at each delivery, its earlier deliveries not yet acknowledged or nacked by it whose
//!    `ack_deadline` had not passed when the new one was taken (its `ack_deadline` less the
//!    `ack_timeout`), plus the new ones, are at most `max_in_flight`;
//! 4. a message's `delivery_count` grows with each delivery (no value twice), never exceeds
//!    `max_deliveries`, and a dead letter's `delivery_count` is `max_deliveries`;
//! 5. a message is not redelivered while another delivery of it is still held: before the
//!    previous delivery's `ack_deadline` only a nack (sent after that delivery arrived)
//!    releases it.
//!
//! Rules 3 and 5 judge by the relay's clock: every delivery carries its `ack_deadline`,
//! which the relay counts from before it took the message (so it is never after the real
//! due time, and a take it began once an earlier deadline passed is stamped after it).
//! Judged by when frames arrived instead, one delayed frame on a loaded box (the relay,
//! Valkey and the checker share two cores) made three deliveries taken 300 ms apart arrive
//! within 14 ms, which looked like a `max_in_flight` 1 worker holding three (seed 6023).

use std::borrow::Cow;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt::Write as _;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use hyper::header::HeaderValue;
use hyper::Method;
use serde::Deserialize;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::Message;

use super::consumer::{lock, topic_name};
use super::exec::request;
use super::history::{GroupPlan, GroupTransport, WorkerPlan};
use super::oracle::{Fate, Kind, Ledger, Violation};
use crate::http::{connect_tcp, Endpoint, HttpConn};
use crate::payload::Probe;
use crate::verify::MessageId;

/// Rounding of the relay's stamps (whole milliseconds, wall clock against the monotonic
/// clock its holding uses) that rules 3 and 5 forgive.
const DEADLINE_SLACK_MS: u64 = 2;

/// An `ack_deadline` (RFC 3339, on the relay's clock) as Unix milliseconds.
fn deadline_ms(f: &Frame) -> Option<u64> {
    let t = humantime::parse_rfc3339(f.ack_deadline.as_deref()?).ok()?;
    u64::try_from(t.duration_since(std::time::UNIX_EPOCH).ok()?.as_millis()).ok()
}

/// About one message in 64 is never acknowledged (ends dead-lettered).
fn is_poison(seq: u64) -> bool {
    seq.wrapping_mul(0x9e37_79b9_7f4a_7c15) >> 58 == 0
}

/// Misbehaviours (late ack, nack, ignore, crash) a worker may spend in a history: each ties
/// up one of its `max_in_flight` places for up to an `ack_timeout`, so unbounded they would
/// make a history's work queue crawl; crashes are at most [`CRASHES`] of them.
const MISBEHAVIOURS: u32 = 40;
const CRASHES: u32 = 4;

fn id_str(id: MessageId) -> String {
    format!("{}-{}", id.ms, id.seq)
}

/// One observed delivery of a message to a group.
#[derive(Debug, Clone)]
struct Seen {
    count: u32,
    at: Duration,
    /// Its `ack_deadline` (Unix ms, the relay's clock).
    deadline_ms: u64,
    worker: usize,
    /// The worker's connection (WebSocket) or poll run (HTTP), counted from 0.
    conn: u32,
}

/// Everything observed of one group.
#[derive(Debug, Default)]
pub struct GroupLog {
    deliveries: HashMap<MessageId, Vec<Seen>>,
    /// Ids in `acked` lists of answers, with the worker that got the answer.
    acked: HashMap<MessageId, Vec<usize>>,
    /// Ids sent in an ack that got no answer (the relay may have applied it).
    maybe_acked: HashSet<MessageId>,
    /// When a nack of each id was sent.
    nacked_at: HashMap<MessageId, Vec<Duration>>,
    /// Ids some worker sent an ack or nack of (whoever held them then): the group may have
    /// settled or released them, which frees the place of whoever holds them now.
    settle_sent: HashSet<MessageId>,
    /// Delivered ids whose publish was ambiguous (503 or no answer).
    ambiguous: HashSet<MessageId>,
    violations: Vec<String>,
    pub deliveries_total: u64,
    pub redeliveries: u64,
    pub crashes: u64,
    pub late_acks: u64,
    pub nacks: u64,
    pub events: BTreeMap<String, u64>,
}

/// What the executor and a group's workers share.
pub struct GroupShared {
    pub plan: GroupPlan,
    pub name: String,
    pub topic: String,
    ledger: Arc<Mutex<Ledger>>,
    epoch: Instant,
    /// After the steps: acknowledge everything but poison at once, no crashes.
    pub drain: AtomicBool,
    pub stop: AtomicBool,
    pub log: Mutex<GroupLog>,
    endpoints: Vec<Endpoint>,
    authorization: Option<HeaderValue>,
    /// Per worker: what it is doing, for reports.
    status: Mutex<Vec<WorkerStatus>>,
}

/// A worker's state as last reported by it.
#[derive(Debug, Clone, Default)]
struct WorkerStatus {
    consumer: String,
    relay: usize,
    connected: bool,
    /// When it last received anything (ms since the history began).
    last_frame_ms: u128,
    /// Deliveries it holds unacknowledged (on its current connection), acks and nacks it
    /// has scheduled, acks without an answer yet.
    held: usize,
    timers: usize,
    outstanding: usize,
}

/// What the group oracle found, plus counts for the summary.
#[derive(Debug, Default)]
pub struct GroupOutcome {
    pub violations: Vec<Violation>,
    pub deliveries: u64,
    pub redeliveries: u64,
    pub acks: u64,
    pub dead_letters: u64,
    pub owed: u64,
    pub unsettled: u64,
    pub crashes: u64,
    pub events: BTreeMap<String, u64>,
}

/// A message frame, a poll answer's message, a dead letter or an ack/nack answer.
#[derive(Debug, Deserialize)]
struct Frame<'a> {
    #[serde(rename = "type", borrow, default)]
    kind: Option<Cow<'a, str>>,
    #[serde(default)]
    message_id: Option<String>,
    #[serde(default)]
    topic: Option<String>,
    #[serde(default)]
    group: Option<String>,
    #[serde(default)]
    delivery_count: Option<u32>,
    #[serde(default)]
    ack_deadline: Option<String>,
    #[serde(default)]
    payload: Option<Probe>,
    #[serde(default)]
    acked: Option<serde_json::Value>,
    #[serde(default)]
    acked_ids: Option<Vec<String>>,
    #[serde(default)]
    unknown: Option<Vec<String>>,
    #[serde(default)]
    metadata: Option<HashMap<String, serde_json::Value>>,
}

#[derive(Debug, Deserialize)]
struct Page<'a> {
    #[serde(borrow, default)]
    messages: Vec<Frame<'a>>,
    #[serde(default)]
    next_cursor: Option<String>,
}

impl GroupShared {
    pub fn new(
        plan: GroupPlan,
        ledger: Arc<Mutex<Ledger>>,
        epoch: Instant,
        endpoints: Vec<Endpoint>,
        authorization: Option<HeaderValue>,
    ) -> Arc<GroupShared> {
        let plan_workers = plan.workers.len();
        Arc::new(GroupShared {
            name: format!("g{}", plan.index),
            topic: topic_name(plan.topic),
            plan,
            ledger,
            epoch,
            drain: AtomicBool::new(false),
            stop: AtomicBool::new(false),
            log: Mutex::default(),
            status: Mutex::new(vec![WorkerStatus::default(); plan_workers]),
            endpoints,
            authorization,
        })
    }

    fn report(&self, worker: usize, consumer: &str, relay: usize, connected: bool, s: &Session) {
        let now = self.now().as_millis();
        let mut st = lock(&self.status);
        if let Some(w) = st.get_mut(worker) {
            *w = WorkerStatus {
                consumer: consumer.to_owned(),
                relay,
                connected,
                last_frame_ms: if connected { now } else { w.last_frame_ms },
                held: s.held.iter().filter(|(_, _, r)| !r).count(),
                timers: s.timers.len(),
                outstanding: s.outstanding.len(),
            };
        }
    }

    fn statuses(&self) -> String {
        lock(&self.status)
            .iter()
            .enumerate()
            .map(|(i, w)| {
                format!(
                    "w{i} ({} on relay {}, {}, last frame {} ms, holds {}, {} acks/nacks scheduled, \
                     {} acks unanswered)",
                    w.consumer,
                    w.relay,
                    if w.connected { "connected" } else { "disconnected" },
                    w.last_frame_ms,
                    w.held,
                    w.timers,
                    w.outstanding
                )
            })
            .collect::<Vec<_>>()
            .join("; ")
    }

    fn now(&self) -> Duration {
        self.epoch.elapsed()
    }

    fn ack_timeout(&self) -> Duration {
        Duration::from_millis(u64::from(self.plan.ack_timeout_ms))
    }

    fn event(&self, kind: impl Into<String>) {
        *lock(&self.log).events.entry(kind.into()).or_default() += 1;
    }

    fn path(&self, tail: &str) -> String {
        format!("/api/v1/topics/{}/groups{tail}", self.topic)
    }

    /// `POST …/groups`: from earliest, with the plan's settings. Retries while the relay
    /// cannot (a Valkey outage cannot happen before the first step, but a slow start can).
    pub async fn create(&self) -> Result<(), String> {
        let body = format!(
            r#"{{"group":"{}","start":"earliest","ack_timeout":{},"max_deliveries":{}}}"#,
            self.name,
            f64::from(self.plan.ack_timeout_ms) / 1000.0,
            self.plan.max_deliveries
        );
        let mut conn = None;
        let mut last = String::new();
        for _ in 0..50 {
            match request(
                &self.endpoints[0],
                &mut conn,
                Method::POST,
                &self.path(""),
                Some(body.clone().into_bytes()),
                self.authorization.as_ref(),
            )
            .await
            {
                Ok((201, _)) => return Ok(()),
                Ok((s, b)) => {
                    last = format!("{s} {}", String::from_utf8_lossy(&b[..b.len().min(200)]));
                    if s < 500 {
                        break;
                    }
                }
                Err(e) => last = e,
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        Err(format!(
            "creating group {} on {}: {last}",
            self.name, self.topic
        ))
    }

    /// Records one delivery to `worker` (checks rules 2, 4, 5); its id and `ack_deadline`
    /// if readable.
    fn delivered(&self, worker: usize, conn: u32, f: &Frame) -> Option<(MessageId, u64)> {
        let at = self.now();
        let mut log = lock(&self.log);
        log.deliveries_total += 1;
        let id: Option<MessageId> = f.message_id.as_deref().and_then(|s| s.parse().ok());
        let Some(id) = id else {
            log.violations.push(format!(
                "w{worker}: a delivery without a readable message_id"
            ));
            return None;
        };
        let Some(deadline) = deadline_ms(f) else {
            log.violations.push(format!(
                "w{worker}: {} delivered without a readable ack_deadline ({:?})",
                id_str(id),
                f.ack_deadline
            ));
            return None;
        };
        let timeout = u64::from(self.plan.ack_timeout_ms);
        let taken_ms = deadline.saturating_sub(timeout);
        if f.topic.as_deref() != Some(self.topic.as_str()) {
            log.violations.push(format!(
                "w{worker}: {} delivered with topic {:?}",
                id_str(id),
                f.topic
            ));
        }
        if f.group.as_deref() != Some(self.name.as_str()) {
            log.violations.push(format!(
                "w{worker}: {} delivered with group {:?}",
                id_str(id),
                f.group
            ));
        }
        match f.payload.as_ref().map(|p| p.seq) {
            None => log
                .violations
                .push(format!("w{worker}: {} has no payload seq", id_str(id))),
            Some(seq) => {
                let fate = {
                    let ledger = lock(&self.ledger);
                    ledger.messages.get(seq as usize).map(|m| (m.topic, m.fate))
                };
                match fate {
                    Some((t, _)) if t != self.plan.topic => log.violations.push(format!(
                        "w{worker}: {} (seq {seq}) was published to t{t}",
                        id_str(id)
                    )),
                    Some((_, Fate::Acked(a))) if a != id => log.violations.push(format!(
                        "w{worker}: seq {seq} delivered as {}, acknowledged as {}",
                        id_str(id),
                        id_str(a)
                    )),
                    Some((_, Fate::Acked(_))) => {}
                    Some((_, Fate::Ambiguous | Fate::Pending)) => {
                        log.ambiguous.insert(id);
                    }
                    Some((_, Fate::Rejected)) | None => log.violations.push(format!(
                        "w{worker}: {} (seq {seq}) delivered but never published",
                        id_str(id)
                    )),
                }
            }
        }
        let count = f.delivery_count.unwrap_or(0);
        let max = self.plan.max_deliveries;
        if count == 0 || count > max {
            log.violations.push(format!(
                "w{worker}: {} delivered with delivery_count {count} (max_deliveries {max})",
                id_str(id)
            ));
        }
        let nacks: Vec<Duration> = log.nacked_at.get(&id).cloned().unwrap_or_default();
        let mut problems = Vec::new();
        let previous = log.deliveries.entry(id).or_default();
        if let Some(p) = previous.iter().find(|p| p.count == count) {
            problems.push(format!(
                "{} delivered twice with delivery_count {count} (w{} at {} ms, w{worker} at {} ms)",
                id_str(id),
                p.worker,
                p.at.as_millis(),
                at.as_millis()
            ));
        }
        if let Some(p) = previous.last() {
            let nacked = nacks.iter().any(|n| *n >= p.at);
            if !nacked && taken_ms + DEADLINE_SLACK_MS < p.deadline_ms {
                let trail: Vec<String> = previous
                    .iter()
                    .map(|s| {
                        format!(
                            "#{} to w{} (connection {}) received at {} ms, deadline {}",
                            s.count,
                            s.worker,
                            s.conn,
                            s.at.as_millis(),
                            s.deadline_ms
                        )
                    })
                    .collect();
                problems.push(format!(
                    "{} redelivered to w{worker} (connection {conn}, count {count}, received at \
                     {} ms) taken at {taken_ms}, {} ms before the ack_deadline of its delivery \
                     to w{} (count {}), without a nack (deliveries before: {}; nacks sent at \
                     {:?} ms)",
                    id_str(id),
                    at.as_millis(),
                    p.deadline_ms - taken_ms,
                    p.worker,
                    p.count,
                    trail.join(", "),
                    nacks.iter().map(Duration::as_millis).collect::<Vec<_>>()
                ));
            }
        }
        let redelivery = !previous.is_empty();
        previous.push(Seen {
            count,
            at,
            deadline_ms: deadline,
            worker,
            conn,
        });
        if redelivery {
            log.redeliveries += 1;
        }
        log.violations.extend(problems);
        Some((id, deadline))
    }

    fn acked(&self, worker: usize, ids: &[String]) {
        let mut log = lock(&self.log);
        for s in ids {
            match s.parse::<MessageId>() {
                Ok(id) => log.acked.entry(id).or_default().push(worker),
                Err(()) => log
                    .violations
                    .push(format!("w{worker}: unreadable id {s:?} in an ack answer")),
            }
        }
    }

    fn maybe_acked(&self, ids: impl IntoIterator<Item = MessageId>) {
        lock(&self.log).maybe_acked.extend(ids);
    }

    fn nack_sent(&self, ids: &[MessageId]) {
        let at = self.now();
        let mut log = lock(&self.log);
        log.nacks += ids.len() as u64;
        for id in ids {
            log.nacked_at.entry(*id).or_default().push(at);
        }
        log.settle_sent.extend(ids);
    }

    fn ack_sent(&self, ids: &[MessageId]) {
        lock(&self.log).settle_sent.extend(ids);
    }

    /// Which of `ids` some worker sent an ack or nack of so far.
    fn settles_sent(&self, ids: impl Iterator<Item = MessageId>) -> HashSet<MessageId> {
        let log = lock(&self.log);
        ids.filter(|id| log.settle_sent.contains(id)).collect()
    }

    fn in_flight_violation(&self, worker: usize, detail: String) {
        lock(&self.log)
            .violations
            .push(format!("w{worker}: max_in_flight exceeded: {detail}"));
    }

    /// Reads `<topic>.dead` whole: per original id of this group, its dead letters'
    /// `delivery_count`s (and the problems seen).
    async fn dead_letters(&self) -> Result<(HashMap<MessageId, Vec<u32>>, Vec<String>), String> {
        let mut out: HashMap<MessageId, Vec<u32>> = HashMap::new();
        let mut problems = Vec::new();
        let mut conn: Option<HttpConn> = None;
        let mut cursor: Option<String> = None;
        let dead = format!("{}.dead", self.topic);
        loop {
            let mut path = format!("/api/v1/topics/{dead}/messages?order=asc&limit=1000");
            if let Some(c) = &cursor {
                let _ = write!(path, "&cursor={c}");
            }
            let (status, body) = request(
                &self.endpoints[0],
                &mut conn,
                Method::GET,
                &path,
                None,
                self.authorization.as_ref(),
            )
            .await?;
            if status == 404 {
                return Ok((out, problems));
            }
            if status != 200 {
                return Err(format!("reading {dead}: {status}"));
            }
            let page: Page =
                serde_json::from_slice(&body).map_err(|e| format!("reading {dead}: {e}"))?;
            for m in &page.messages {
                let meta = m.metadata.as_ref();
                let field = |k: &str| -> Option<String> {
                    meta.and_then(|m| m.get(k)).map(|v| match v {
                        serde_json::Value::String(s) => s.clone(),
                        other => other.to_string(),
                    })
                };
                if field("group").as_deref() != Some(self.name.as_str()) {
                    problems.push(format!(
                        "dead letter {:?} with group {:?}",
                        m.message_id,
                        field("group")
                    ));
                    continue;
                }
                let Some(original) = field("original_id").and_then(|s| s.parse().ok()) else {
                    problems.push(format!(
                        "dead letter {:?} without original_id",
                        m.message_id
                    ));
                    continue;
                };
                if field("original_topic").is_some_and(|t| !t.ends_with(self.topic.as_str())) {
                    problems.push(format!(
                        "dead letter of {} with original_topic {:?}",
                        id_str(original),
                        field("original_topic")
                    ));
                }
                let count = field("delivery_count")
                    .and_then(|s| s.parse().ok())
                    .unwrap_or(0);
                // Payload unchanged: the same seq as the original's publish.
                if let Some(seq) = m.payload.as_ref().map(|p| p.seq) {
                    let ledger = lock(&self.ledger);
                    if let Some(Fate::Acked(a)) = ledger.messages.get(seq as usize).map(|m| m.fate)
                    {
                        if a != original {
                            problems.push(format!(
                                "dead letter of {} carries the payload of seq {seq} ({})",
                                id_str(original),
                                id_str(a)
                            ));
                        }
                    }
                }
                out.entry(original).or_default().push(count);
            }
            match page.next_cursor {
                Some(c) if !page.messages.is_empty() => cursor = Some(c),
                _ => return Ok((out, problems)),
            }
        }
    }

    /// The owed messages (rule 1) not settled yet, given the dead letters.
    fn unsettled(&self, dead: &HashMap<MessageId, Vec<u32>>) -> Vec<MessageId> {
        let ledger = lock(&self.ledger);
        let log = lock(&self.log);
        ledger
            .messages
            .iter()
            .filter(|m| m.topic == self.plan.topic && !m.removed && m.ttl.is_none())
            .filter_map(|m| match m.fate {
                Fate::Acked(id) => Some(id),
                _ => None,
            })
            .filter(|id| {
                !log.acked.contains_key(id)
                    && !dead.contains_key(id)
                    && !log.maybe_acked.contains(id)
            })
            .collect()
    }

    /// After the steps: lets the workers settle everything owed, for as long as they make
    /// progress: it ends when nothing is left, or when `max` passes without one more message
    /// settled (a stall, which judging then reports). A lone `max_in_flight: 1` worker
    /// draining thousands of messages takes longer than any fixed budget, and is not stuck.
    pub async fn drain(&self, max: Duration) {
        self.drain.store(true, Ordering::Relaxed);
        let mut progress = Instant::now();
        let mut left = usize::MAX;
        loop {
            if let Ok((dead, _)) = self.dead_letters().await {
                let unsettled = self.unsettled(&dead).len();
                if unsettled == 0 {
                    return;
                }
                if unsettled < left {
                    left = unsettled;
                    progress = Instant::now();
                }
            }
            if progress.elapsed() > max {
                return;
            }
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
    }

    /// Judges the group (after its workers stopped).
    pub async fn judge(&self) -> GroupOutcome {
        let mut out = GroupOutcome::default();
        let violation = |detail: String| Violation {
            kind: Kind::Group,
            consumer: 0,
            transport: "group",
            topic: self.plan.topic,
            session: 0,
            detail: format!("group {}: {detail}", self.name),
        };
        let dead = match self.dead_letters().await {
            Ok((dead, problems)) => {
                out.violations.extend(problems.into_iter().map(&violation));
                dead
            }
            Err(e) => {
                out.violations
                    .push(violation(format!("could not read the dead letters: {e}")));
                HashMap::new()
            }
        };
        let unsettled = self.unsettled(&dead);
        if !unsettled.is_empty() {
            // What the relay says of the group, for the report.
            let mut conn = None;
            let info = match request(
                &self.endpoints[0],
                &mut conn,
                Method::GET,
                &self.path(&format!("/{}", self.name)),
                None,
                self.authorization.as_ref(),
            )
            .await
            {
                Ok((st, b)) => format!("{st} {}", String::from_utf8_lossy(&b[..b.len().min(600)])),
                Err(e) => e,
            };
            out.violations.push(violation(format!(
                "{} owed messages unsettled at the end; the group as the relay shows it: {info}; \
                 the workers: {}",
                unsettled.len(),
                self.statuses()
            )));
        }
        let ledger = lock(&self.ledger);
        let log = lock(&self.log);
        let published: HashSet<MessageId> = ledger
            .messages
            .iter()
            .filter(|m| m.topic == self.plan.topic)
            .filter_map(|m| match m.fate {
                Fate::Acked(id) => Some(id),
                _ => None,
            })
            .collect();
        let known = |id: &MessageId| published.contains(id) || log.ambiguous.contains(id);
        out.owed = ledger
            .messages
            .iter()
            .filter(|m| {
                m.topic == self.plan.topic
                    && !m.removed
                    && m.ttl.is_none()
                    && matches!(m.fate, Fate::Acked(_))
            })
            .count() as u64;
        let mut v: Vec<String> = log.violations.clone();
        for (id, workers) in &log.acked {
            if workers.len() > 1 {
                v.push(format!(
                    "{} acknowledged {} times (by {})",
                    id_str(*id),
                    workers.len(),
                    workers
                        .iter()
                        .map(|w| format!("w{w}"))
                        .collect::<Vec<_>>()
                        .join(", ")
                ));
            }
            if dead.contains_key(id) {
                v.push(format!(
                    "{} both acknowledged (by w{}) and dead-lettered",
                    id_str(*id),
                    workers[0]
                ));
            }
            if !known(id) {
                v.push(format!("{} acknowledged but never published", id_str(*id)));
            }
        }
        for (id, counts) in &dead {
            if counts.len() > 1 {
                v.push(format!(
                    "{} dead-lettered {} times",
                    id_str(*id),
                    counts.len()
                ));
            }
            if !known(id) {
                v.push(format!("{} dead-lettered but never published", id_str(*id)));
            }
            for c in counts {
                if *c != self.plan.max_deliveries {
                    v.push(format!(
                        "{} dead-lettered with delivery_count {c} (max_deliveries {})",
                        id_str(*id),
                        self.plan.max_deliveries
                    ));
                }
            }
        }
        for id in unsettled.iter().take(20) {
            let seen = log.deliveries.get(id).map(Vec::as_slice).unwrap_or(&[]);
            let trail: Vec<String> = seen
                .iter()
                .map(|s| {
                    format!(
                        "#{} to w{} (connection {}) at {} ms",
                        s.count,
                        s.worker,
                        s.conn,
                        s.at.as_millis()
                    )
                })
                .collect();
            v.push(format!(
                "{} neither acknowledged nor dead-lettered (deliveries: {})",
                id_str(*id),
                if trail.is_empty() {
                    "none".to_owned()
                } else {
                    trail.join(", ")
                }
            ));
        }
        if unsettled.len() > 20 {
            v.push(format!(
                "... {} more neither acknowledged nor dead-lettered",
                unsettled.len() - 20
            ));
        }
        out.violations.extend(v.into_iter().map(&violation));
        out.deliveries = log.deliveries_total;
        out.redeliveries = log.redeliveries;
        out.acks = log.acked.values().map(|w| w.len() as u64).sum();
        out.dead_letters = dead.values().map(|c| c.len() as u64).sum();
        out.unsettled = unsettled.len() as u64;
        out.crashes = log.crashes;
        out.events = log.events.clone();
        *out.events.entry("group late acks".into()).or_default() += log.late_acks;
        *out.events.entry("group nacks".into()).or_default() += log.nacks;
        out
    }
}

/// What a worker does with one delivery.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Action {
    Ack,
    Nack,
}

/// One connection's worth of a worker's state.
#[derive(Default)]
struct Session {
    /// Deliveries on this connection: id, `ack_deadline` (Unix ms), released (acked or
    /// nacked by it).
    held: Vec<(MessageId, u64, bool)>,
    /// Acks and nacks due: when, what, which id.
    timers: Vec<(Instant, Action, MessageId)>,
    /// Ids sent in acks not answered yet.
    outstanding: HashSet<MessageId>,
}

impl Session {
    /// Rule 3 for `new` deliveries (id, `ack_deadline`) of one take, arriving at `now`.
    fn check_in_flight(
        &mut self,
        g: &GroupShared,
        worker: usize,
        new: &[(MessageId, u64)],
        now: Duration,
        max: u16,
    ) {
        let Some(first_deadline) = new.iter().map(|(_, d)| *d).min() else {
            return;
        };
        // When the relay began the take: a held delivery whose deadline had passed by then
        // no longer took a place.
        let taken_ms = first_deadline.saturating_sub(u64::from(g.plan.ack_timeout_ms));
        // A delivery this connection still holds that another worker acknowledged or
        // nacked (its earlier holder, late) is settled or released in the group: the relay
        // may count the place free (an HTTP consumer's places are what the group has pending
        // for it).
        let settled = g.settles_sent(self.held.iter().filter(|h| !h.2).map(|h| h.0));
        let mut held = Vec::new();
        for (id, deadline, released) in &self.held {
            if !*released && taken_ms + DEADLINE_SLACK_MS < *deadline && !settled.contains(id) {
                held.push(format!("{} (deadline {deadline})", id_str(*id)));
            }
        }
        if held.len() + new.len() > usize::from(max) {
            g.in_flight_violation(
                worker,
                format!(
                    "{} received at {} ms, taken at {taken_ms} ({}) while it held {} (max_in_flight {max}): {}",
                    new.len(),
                    now.as_millis(),
                    new.iter()
                        .map(|(i, _)| id_str(*i))
                        .collect::<Vec<_>>()
                        .join(", "),
                    held.len(),
                    held.join(", ")
                ),
            );
        }
        self.held
            .extend(new.iter().map(|(id, deadline)| (*id, *deadline, false)));
        // Keep the list short: released and long-past entries are done with.
        if self.held.len() > 4096 {
            self.held
                .retain(|(_, deadline, r)| !r && *deadline + DEADLINE_SLACK_MS > taken_ms);
        }
    }

    fn release(&mut self, ids: &[MessageId]) {
        for (id, _, released) in &mut self.held {
            if ids.contains(id) {
                *released = true;
            }
        }
    }

    /// The timers due now, grouped by action.
    fn due(&mut self, now: Instant) -> (Vec<MessageId>, Vec<MessageId>) {
        let mut acks = Vec::new();
        let mut nacks = Vec::new();
        self.timers.retain(|(at, a, id)| {
            if *at > now {
                return true;
            }
            match a {
                Action::Ack => acks.push(*id),
                Action::Nack => nacks.push(*id),
            }
            false
        });
        (acks, nacks)
    }

    fn next_timer(&self) -> Option<Instant> {
        self.timers.iter().map(|(at, _, _)| *at).min()
    }
}

/// What a worker decided for a delivery: an action at a time, none (ignore), or a crash.
enum Decision {
    Later(Duration, Action),
    Ignore,
    Crash,
}

struct Worker {
    g: Arc<GroupShared>,
    index: usize,
    plan: WorkerPlan,
    rng: fastrand::Rng,
    relay: usize,
    consumer: String,
    renames: u32,
    misbehaviours: u32,
    crashes: u32,
    /// Connections (poll runs) opened so far.
    conns: u32,
}

/// Starts a group's workers; they run until `stop` is set (or the task is aborted).
pub fn spawn_workers(g: &Arc<GroupShared>) -> Vec<tokio::task::JoinHandle<()>> {
    g.plan
        .workers
        .iter()
        .enumerate()
        .map(|(i, w)| {
            let worker = Worker {
                g: g.clone(),
                index: i,
                plan: w.clone(),
                rng: fastrand::Rng::with_seed(w.seed),
                relay: i,
                consumer: format!("w{i}"),
                renames: 0,
                misbehaviours: 0,
                crashes: 0,
                conns: 0,
            };
            tokio::spawn(worker.run())
        })
        .collect()
}

impl Worker {
    fn endpoint(&self) -> &Endpoint {
        &self.g.endpoints[self.relay % self.g.endpoints.len()]
    }

    fn decide(&mut self, seq: Option<u64>) -> Decision {
        let drain = self.g.drain.load(Ordering::Relaxed);
        let soon = Duration::from_millis(self.rng.u64(0..30));
        if seq.is_some_and(is_poison) {
            return if self.rng.bool() {
                Decision::Later(soon, Action::Nack)
            } else {
                Decision::Ignore
            };
        }
        if drain || self.misbehaviours >= MISBEHAVIOURS {
            return Decision::Later(Duration::ZERO, Action::Ack);
        }
        let roll = self.rng.u16(..1000);
        if roll >= 750 {
            self.misbehaviours += 1;
        }
        match roll {
            0..=749 => Decision::Later(soon, Action::Ack),
            750..=829 => {
                lock(&self.g.log).late_acks += 1;
                Decision::Later(
                    self.g.ack_timeout() + Duration::from_millis(self.rng.u64(30..400)),
                    Action::Ack,
                )
            }
            830..=899 => Decision::Later(soon, Action::Nack),
            900..=979 => Decision::Ignore,
            _ if self.crashes >= CRASHES => Decision::Later(soon, Action::Ack),
            _ => {
                self.crashes += 1;
                Decision::Crash
            }
        }
    }

    /// After a crash or a lost connection: what was sent and not answered may have been
    /// applied; the next connection goes to the next relay, sometimes under a new name.
    fn lost(&mut self, s: Session, crash: bool) {
        self.conns += 1;
        self.g.maybe_acked(s.outstanding);
        self.relay += 1;
        if crash {
            lock(&self.g.log).crashes += 1;
            if self.rng.u8(..3) == 0 {
                self.renames += 1;
                self.consumer = format!("w{}r{}", self.index, self.renames);
            }
        }
    }

    async fn run(mut self) {
        while !self.g.stop.load(Ordering::Relaxed) {
            let crash = match self.plan.transport {
                GroupTransport::Ws => self.ws_session().await,
                GroupTransport::Http => self.http_session().await,
            };
            let pause = if crash {
                self.rng.u64(0..400)
            } else {
                100 + self.rng.u64(0..200)
            };
            tokio::time::sleep(Duration::from_millis(pause)).await;
        }
    }

    /// One WebSocket connection; `true` if it ended by a crash on purpose.
    async fn ws_session(&mut self) -> bool {
        let mut s = Session::default();
        let crash = match self.ws_inner(&mut s).await {
            Ok(crash) => crash,
            Err(e) => {
                self.g.event(format!("group ws: {e}"));
                false
            }
        };
        let relay = self.relay % self.g.endpoints.len();
        self.g.report(self.index, &self.consumer, relay, false, &s);
        self.lost(s, crash);
        crash
    }

    async fn ws_inner(&mut self, s: &mut Session) -> Result<bool, String> {
        let g = self.g.clone();
        let tcp = connect_tcp(self.endpoint())
            .await
            .map_err(|e| format!("connect {}", e.kind()))?;
        let mut request = self
            .endpoint()
            .ws_url("/ws")
            .into_client_request()
            .map_err(|e| e.to_string())?;
        if let Some(auth) = &g.authorization {
            request
                .headers_mut()
                .insert(hyper::header::AUTHORIZATION, auth.clone());
        }
        let (mut ws, _) = tokio::time::timeout(
            Duration::from_secs(10),
            tokio_tungstenite::client_async_with_config(
                request,
                tcp,
                Some(WebSocketConfig::default()),
            ),
        )
        .await
        .map_err(|_| "handshake timed out".to_owned())?
        .map_err(|_| "handshake failed".to_owned())?;
        let sub = format!(
            r#"{{"type":"subscribe","topics":["{}"],"group":"{}","consumer":"{}","max_in_flight":{}}}"#,
            g.topic, g.name, self.consumer, self.plan.max_in_flight
        );
        ws.send(Message::text(sub))
            .await
            .map_err(|_| "send subscribe failed".to_owned())?;
        let mut subscribed = false;
        let mut tick = tokio::time::interval(Duration::from_millis(50));
        loop {
            let wake = s
                .next_timer()
                .unwrap_or_else(|| Instant::now() + Duration::from_secs(3600));
            tokio::select! {
                frame = ws.next() => {
                    g.report(self.index, &self.consumer, self.relay % g.endpoints.len(), true, s);
                    let text = match frame {
                        Some(Ok(Message::Text(t))) => t,
                        Some(Ok(Message::Close(c))) => {
                            return Err(format!("closed {}", c.map_or(0, |c| u16::from(c.code))));
                        }
                        Some(Ok(_)) => continue,
                        Some(Err(_)) | None => return Err("connection lost".into()),
                    };
                    let Ok(f) = serde_json::from_slice::<Frame>(text.as_bytes()) else {
                        g.event("group ws: unparseable frame");
                        continue;
                    };
                    match f.kind.as_deref() {
                        Some("subscribed") => subscribed = true,
                        Some("message") => {
                            if !subscribed {
                                g.event("group ws: message before subscribed");
                            }
                            let Some((id, deadline)) = g.delivered(self.index, self.conns, &f) else { continue };
                            s.check_in_flight(&g, self.index, &[(id, deadline)], g.now(), self.plan.max_in_flight);
                            match self.decide(f.payload.as_ref().map(|p| p.seq)) {
                                Decision::Later(d, a) => s.timers.push((Instant::now() + d, a, id)),
                                Decision::Ignore => {}
                                Decision::Crash => return Ok(true),
                            }
                        }
                        Some("acked") => {
                            let acked: Vec<String> = match &f.acked {
                                Some(serde_json::Value::Array(a)) => a
                                    .iter()
                                    .filter_map(|v| v.as_str().map(str::to_owned))
                                    .collect(),
                                _ => Vec::new(),
                            };
                            g.acked(self.index, &acked);
                            for i in acked.iter().chain(f.unknown.iter().flatten()) {
                                if let Ok(id) = i.parse() {
                                    s.outstanding.remove(&id);
                                }
                            }
                        }
                        Some("nacked") => {}
                        Some("error") => {
                            let t = text.as_str();
                            g.event(format!("group ws error: {}", &t[..t.len().min(160)]));
                            if !subscribed {
                                return Err("subscribe refused".into());
                            }
                        }
                        _ => {}
                    }
                }
                _ = tokio::time::sleep_until(wake.into()) => {
                    let (acks, nacks) = s.due(Instant::now());
                    for (ids, action) in [(acks, Action::Ack), (nacks, Action::Nack)] {
                        if ids.is_empty() {
                            continue;
                        }
                        let kind = if action == Action::Ack { "ack" } else { "nack" };
                        let list: Vec<String> = ids.iter().map(|i| format!("\"{}\"", id_str(*i))).collect();
                        let frame = format!(
                            r#"{{"type":"{kind}","topic":"{}","group":"{}","ids":[{}]}}"#,
                            g.topic, g.name, list.join(",")
                        );
                        s.release(&ids);
                        if action == Action::Ack {
                            s.outstanding.extend(ids.iter().copied());
                            g.ack_sent(&ids);
                        } else {
                            g.nack_sent(&ids);
                        }
                        if ws.send(Message::text(frame)).await.is_err() {
                            return Err("send failed".into());
                        }
                    }
                }
                _ = tick.tick() => {
                    if g.stop.load(Ordering::Relaxed) {
                        // Give the answers to what was sent a moment.
                        let deadline = Instant::now() + Duration::from_millis(500);
                        while !s.outstanding.is_empty() && Instant::now() < deadline {
                            match tokio::time::timeout_at(deadline.into(), ws.next()).await {
                                Ok(Some(Ok(Message::Text(t)))) => {
                                    if let Ok(f) = serde_json::from_slice::<Frame>(t.as_bytes()) {
                                        if f.kind.as_deref() == Some("acked") {
                                            let acked: Vec<String> = match &f.acked {
                                                Some(serde_json::Value::Array(a)) => a.iter().filter_map(|v| v.as_str().map(str::to_owned)).collect(),
                                                _ => Vec::new(),
                                            };
                                            g.acked(self.index, &acked);
                                            for i in acked.iter().chain(f.unknown.iter().flatten()) {
                                                if let Ok(id) = i.parse() {
                                                    s.outstanding.remove(&id);
                                                }
                                            }
                                        } else if f.kind.as_deref() == Some("message") {
                                            g.delivered(self.index, self.conns, &f);
                                        }
                                    }
                                }
                                Ok(Some(Ok(_))) => {}
                                _ => break,
                            }
                        }
                        return Ok(false);
                    }
                }
            }
        }
    }

    /// A run of HTTP polls under one consumer name; `true` if it ended by a crash.
    async fn http_session(&mut self) -> bool {
        let g = self.g.clone();
        let mut s = Session::default();
        let mut conn: Option<HttpConn> = None;
        let endpoint = self.endpoint().clone();
        let mut failures = 0;
        let crash = loop {
            if g.stop.load(Ordering::Relaxed) {
                break false;
            }
            // Due acks and nacks first.
            let (acks, nacks) = s.due(Instant::now());
            for (ids, action) in [(acks, Action::Ack), (nacks, Action::Nack)] {
                if ids.is_empty() {
                    continue;
                }
                s.release(&ids);
                let list: Vec<String> = ids.iter().map(|i| format!("\"{}\"", id_str(*i))).collect();
                let body = format!(r#"{{"ids":[{}]}}"#, list.join(","));
                let what = if action == Action::Ack { "ack" } else { "nack" };
                if action == Action::Nack {
                    g.nack_sent(&ids);
                } else {
                    g.ack_sent(&ids);
                }
                let r = request(
                    &endpoint,
                    &mut conn,
                    Method::POST,
                    &g.path(&format!("/{}/{what}", g.name)),
                    Some(body.into_bytes()),
                    g.authorization.as_ref(),
                )
                .await;
                match (action, r) {
                    (Action::Ack, Ok((200, b))) => match serde_json::from_slice::<Frame>(&b) {
                        Ok(f) => g.acked(self.index, f.acked_ids.as_deref().unwrap_or(&[])),
                        Err(_) => {
                            g.event("group http: unparseable ack answer");
                            g.maybe_acked(ids);
                        }
                    },
                    (Action::Ack, Ok((st, _))) => {
                        g.event(format!("group http ack: {st}"));
                        g.maybe_acked(ids);
                    }
                    (Action::Ack, Err(e)) => {
                        g.event(format!("group http ack: {e}"));
                        g.maybe_acked(ids);
                    }
                    (Action::Nack, Ok((200, _))) => {}
                    (Action::Nack, Ok((st, _))) => g.event(format!("group http nack: {st}")),
                    (Action::Nack, Err(e)) => g.event(format!("group http nack: {e}")),
                }
            }
            let wait_s = match s.next_timer() {
                Some(t) if t <= Instant::now() + Duration::from_secs(1) => 0,
                _ => 1,
            };
            let body = format!(
                r#"{{"consumer":"{}","max":{},"timeout":{wait_s},"max_in_flight":{}}}"#,
                self.consumer,
                self.rng.u16(1..=20),
                self.plan.max_in_flight
            );
            let r = request(
                &endpoint,
                &mut conn,
                Method::POST,
                &g.path(&format!("/{}/poll", g.name)),
                Some(body.into_bytes()),
                g.authorization.as_ref(),
            )
            .await;
            let answer = match r {
                Ok((200, b)) => b,
                Ok((st, b)) => {
                    g.event(format!(
                        "group http poll: {st} {}",
                        String::from_utf8_lossy(&b[..b.len().min(80)])
                    ));
                    failures += 1;
                    if failures > 3 {
                        break false;
                    }
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    continue;
                }
                Err(e) => {
                    g.event(format!("group http poll: {e}"));
                    failures += 1;
                    if failures > 3 {
                        break false;
                    }
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    continue;
                }
            };
            failures = 0;
            g.report(
                self.index,
                &self.consumer,
                self.relay % g.endpoints.len(),
                true,
                &s,
            );
            let Ok(page) = serde_json::from_slice::<Page>(&answer) else {
                g.event("group http: unparseable poll answer");
                continue;
            };
            let now = g.now();
            let mut ids = Vec::new();
            let mut seqs = Vec::new();
            for m in &page.messages {
                if let Some(id) = g.delivered(self.index, self.conns, m) {
                    ids.push(id);
                    seqs.push(m.payload.as_ref().map(|p| p.seq));
                }
            }
            s.check_in_flight(&g, self.index, &ids, now, self.plan.max_in_flight);
            let mut crashed = false;
            for ((id, _), seq) in ids.into_iter().zip(seqs) {
                match self.decide(seq) {
                    Decision::Later(d, a) => s.timers.push((Instant::now() + d, a, id)),
                    Decision::Ignore => {}
                    Decision::Crash => crashed = true,
                }
            }
            if crashed {
                break true;
            }
            if page.messages.is_empty() && wait_s == 0 {
                tokio::time::sleep(Duration::from_millis(30)).await;
            }
        };
        self.lost(s, crash);
        crash
    }
}
