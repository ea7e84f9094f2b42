//! Executes one history against fresh processes: starts Valkey (if used) and the relay (or,
//! with `--relays N`, N relays on the one Valkey), runs the steps in order (publishes, trims
//! and deletes are awaited before the next step; consumers run alongside as tasks), then lets
//! the consumers settle and asks the oracle.
//!
//! Several relays: every publish, trim and delete step goes to the next relay in turn, and
//! the parallel connections of one publish step each to a different relay (so publishes of
//! one topic through different relays interleave); a consumer opens each session (its
//! first, and every resume) on the next relay in its own turn, so it resumes on another
//! relay than it left. A WebSocket consumer "from now" starts after the newest acknowledged
//! id instead (as SSE and long-poll do): on another relay than the publisher's, "now" may
//! still be before it.
//!
//! Settling: the history is over when every consumer's open session has everything it is
//! owed. A consumer that makes no progress for [`STALL_AFTER`] while owed messages is a stall
//! (longer than the SSE heartbeat interval would hide, shorter than a CI budget tolerates).

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use hyper::header::HeaderValue;
use hyper::Method;
use serde::Deserialize;
use tokio::sync::{mpsc, oneshot};

use super::consumer::{lock, topic_name, Cmd, Consumer, Shared, Wire};
use super::group::{self, GroupShared};
use super::history::{Backend, From, History, Outage, Setup, Step, MAX_BULK_BODY};
use super::oracle::{self, Fate, Judgement, Ledger, Pos, Published, Retention, Violation};
use super::procs::{config_yaml, Relay, Scratch, Valkey};
use crate::cli::Transport;
use crate::http::{Endpoint, HttpConn};
use crate::payload::BodyBuilder;

/// No delivery for this long while messages are owed: a stall.
pub const STALL_AFTER: Duration = Duration::from_secs(10);
/// Settling ends after this long whatever happens.
const SETTLE_MAX: Duration = Duration::from_secs(60);
/// A publish without an answer for this long is ambiguous.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// A consumer's connect must be confirmed within this.
const READY_TIMEOUT: Duration = Duration::from_secs(15);
/// A group's drain after the steps takes at most this, plus twice the time its messages may
/// take to be dead-lettered.
const GROUP_DRAIN: Duration = Duration::from_secs(20);

/// The binaries a history needs, and how many relays to run.
#[derive(Debug, Clone)]
pub struct Bins {
    pub relay: PathBuf,
    pub valkey: Option<PathBuf>,
    /// Relay processes on the one Valkey (1 unless `--relays`; always 1 with the memory
    /// backend, whose relays share nothing).
    pub relays: usize,
    /// `--cluster`: the Valkey is a cluster of [`super::procs::CLUSTER_MASTERS`] masters; each Valkey
    /// outage takes one of them (in turn).
    pub cluster: bool,
}

/// What one history did and found.
#[derive(Debug, Default)]
pub struct Outcome {
    pub violations: Vec<Violation>,
    pub published: u64,
    pub acked: u64,
    pub ambiguous: u64,
    pub rejected: u64,
    pub deliveries: u64,
    pub gaps: u64,
    pub resumes: u64,
    pub restarts: u64,
    /// Relay closes, error frames and failed connects, by kind.
    pub events: BTreeMap<String, u64>,
    pub elapsed: Duration,
    pub group_owed: u64,
    pub group_deliveries: u64,
    pub group_redeliveries: u64,
    pub group_acks: u64,
    pub dead_letters: u64,
    pub group_crashes: u64,
}

struct ConsumerHandle {
    transport: Transport,
    topics: Vec<u16>,
    sh: Arc<Shared>,
    tx: mpsc::Sender<Cmd>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for ConsumerHandle {
    fn drop(&mut self) {
        self.task.abort();
    }
}

struct Exec {
    /// One per relay.
    endpoints: Vec<Endpoint>,
    ledger: Arc<Mutex<Ledger>>,
    consumers: BTreeMap<u8, ConsumerHandle>,
    epoch: Instant,
    /// Keep-alive connections for publishes and admin requests, per relay and lane.
    conns: Vec<Vec<Option<HttpConn>>>,
    /// Which relay the next request goes to (turns over the relays).
    turn: usize,
    restarts: u64,
    events: BTreeMap<String, u64>,
    /// `Bearer <token>` when the set-up has authentication on.
    authorization: Option<HeaderValue>,
}

/// Runs `history`; `Err` when the processes could not be set up (not a verdict).
pub async fn run(history: &History, bins: &Bins) -> Result<Outcome, String> {
    let started = Instant::now();
    let scratch = Scratch::new().map_err(|e| format!("scratch dir: {e}"))?;
    let mut valkey = match history.setup.backend {
        Backend::Valkey => {
            let bin = bins
                .valkey
                .as_ref()
                .ok_or("the history uses Valkey and no valkey-server was found")?;
            if bins.cluster {
                Valkey::start_cluster(bin, &scratch.0)?
            } else {
                vec![Valkey::start(bin, &scratch.0)?]
            }
        }
        Backend::Memory => Vec::new(),
    };
    let ports: Vec<u16> = valkey.iter().map(|v| v.port).collect();
    let yaml = config_yaml(&history.setup, &ports, bins.cluster);
    let count = match history.setup.backend {
        Backend::Valkey => bins.relays.max(1),
        Backend::Memory => 1,
    };
    let mut relays = Vec::with_capacity(count);
    for i in 0..count {
        // One relay keeps the scratch directory's layout of a single-relay run.
        let dir = if count == 1 {
            scratch.0.clone()
        } else {
            let dir = scratch.0.join(format!("relay{i}"));
            std::fs::create_dir_all(&dir).map_err(|e| format!("relay dir: {e}"))?;
            dir
        };
        relays.push(Relay::start(&bins.relay, &dir, &yaml)?);
    }
    let endpoints = relays
        .iter()
        .map(|r| Endpoint::parse(&r.url).map_err(|e| e.to_string()))
        .collect::<Result<Vec<_>, _>>()?;
    let mut exec = Exec {
        conns: endpoints
            .iter()
            .map(|_| (0..4).map(|_| None).collect())
            .collect(),
        endpoints,
        ledger: Arc::new(Mutex::new(Ledger::default())),
        consumers: BTreeMap::new(),
        epoch: Instant::now(),
        turn: 0,
        restarts: 0,
        events: BTreeMap::new(),
        authorization: None,
    };
    if history.setup.auth {
        exec.authorization = Some(login(&exec.endpoints[0]).await?);
    }
    // Consumer groups: created before the first publish, their workers run alongside.
    let mut groups = Vec::new();
    for plan in &history.groups {
        let g = GroupShared::new(
            plan.clone(),
            exec.ledger.clone(),
            exec.epoch,
            exec.endpoints.clone(),
            exec.authorization.clone(),
        );
        g.create().await?;
        let tasks = group::spawn_workers(&g);
        groups.push((g, tasks));
    }
    for step in &history.steps {
        exec.step(step, &history.setup, &mut valkey).await;
    }
    let mut outcome = exec.settle(&history.setup).await;
    for (g, _) in &groups {
        let p = &g.plan;
        let most = Duration::from_millis(u64::from(p.ack_timeout_ms) * u64::from(p.max_deliveries));
        g.drain(GROUP_DRAIN + most * 2).await;
    }
    for (g, _) in &groups {
        g.stop.store(true, std::sync::atomic::Ordering::Relaxed);
    }
    for (g, tasks) in groups {
        for t in tasks {
            let abort = t.abort_handle();
            if tokio::time::timeout(Duration::from_secs(3), t)
                .await
                .is_err()
            {
                abort.abort();
            }
        }
        let o = g.judge().await;
        outcome.violations.extend(o.violations);
        outcome.group_owed += o.owed;
        outcome.group_deliveries += o.deliveries;
        outcome.group_redeliveries += o.redeliveries;
        outcome.group_acks += o.acks;
        outcome.dead_letters += o.dead_letters;
        outcome.group_crashes += o.crashes;
        for (k, v) in o.events {
            *outcome.events.entry(k).or_default() += v;
        }
    }
    for (i, relay) in relays.iter_mut().enumerate() {
        if let Ok(Some(status)) = relay.try_wait() {
            outcome.violations.push(Violation {
                kind: oracle::Kind::Relay,
                consumer: 0,
                transport: "-",
                topic: 0,
                session: 0,
                detail: format!(
                    "relay {i} exited ({status}); log {}",
                    std::fs::read_to_string(&relay.log)
                        .unwrap_or_default()
                        .lines()
                        .rev()
                        .take(3)
                        .collect::<Vec<_>>()
                        .join(" | ")
                ),
            });
        }
    }
    exec.consumers.clear();
    drop(relays);
    drop(valkey);
    drop(scratch);
    outcome.elapsed = started.elapsed();
    Ok(outcome)
}

fn retention(setup: &Setup) -> Retention {
    Retention {
        max_messages: setup.max_messages,
        age: setup.retention_s.map(|s| Duration::from_secs(u64::from(s))),
        evicting: setup.backend == Backend::Memory && setup.memory_bytes.is_some(),
    }
}

#[derive(Deserialize)]
struct Accepted {
    message_id: Option<String>,
    status: Option<String>,
    error: Option<String>,
}

#[derive(Deserialize)]
struct BulkReply {
    results: Vec<Accepted>,
}

/// A message waiting to be published: its seq and body.
struct Pending {
    seq: u64,
    body: Vec<u8>,
}

impl Exec {
    fn now(&self) -> Duration {
        self.epoch.elapsed()
    }

    fn event(&mut self, kind: impl Into<String>) {
        *self.events.entry(kind.into()).or_default() += 1;
    }

    /// The relay the next step's request goes to.
    fn next_relay(&mut self) -> usize {
        self.turn = self.turn.wrapping_add(1);
        self.turn % self.endpoints.len()
    }

    async fn request(
        &mut self,
        conn: usize,
        method: Method,
        path: &str,
        body: Option<Vec<u8>>,
    ) -> Result<(u16, Bytes), String> {
        let relay = self.next_relay();
        self.request_to(relay, conn, method, path, body).await
    }

    async fn request_to(
        &mut self,
        relay: usize,
        conn: usize,
        method: Method,
        path: &str,
        body: Option<Vec<u8>>,
    ) -> Result<(u16, Bytes), String> {
        let endpoint = &self.endpoints[relay];
        let auth = self.authorization.as_ref();
        request(
            endpoint,
            &mut self.conns[relay][conn],
            method,
            path,
            body,
            auth,
        )
        .await
    }

    async fn step(&mut self, step: &Step, setup: &Setup, valkey: &mut [Valkey]) {
        match step {
            Step::Publish {
                topic,
                count,
                bytes,
                ttl_s,
                bulk,
                parallel,
            } => {
                self.publish(*topic, *count, *bytes, *ttl_s, *bulk, *parallel)
                    .await
            }
            Step::Trim { topic, keep } => {
                let body = format!(r#"{{"keep_count":{keep}}}"#).into_bytes();
                let path = format!("/api/v1/topics/{}/trim", topic_name(*topic));
                lock(&self.ledger).trimmed(*topic, *keep);
                match self.request(0, Method::POST, &path, Some(body)).await {
                    Ok((s, _)) if s < 300 || s == 404 => {}
                    Ok((s, _)) => self.event(format!("trim status {s}")),
                    Err(e) => self.event(format!("trim: {e}")),
                }
            }
            Step::Delete { topic } => {
                let path = format!("/api/v1/topics/{}", topic_name(*topic));
                lock(&self.ledger).deleted(*topic);
                match self.request(0, Method::DELETE, &path, None).await {
                    Ok((s, _)) if s < 300 || s == 404 => {}
                    Ok((s, _)) => self.event(format!("delete status {s}")),
                    Err(e) => self.event(format!("delete: {e}")),
                }
            }
            Step::Subscribe {
                consumer,
                transport,
                topics,
                from,
            } => {
                if self.consumers.contains_key(consumer) {
                    return;
                }
                let sh = Arc::new(Shared {
                    log: Mutex::new(oracle::ConsumerLog::new(transport.name())),
                    raw_ids: Mutex::default(),
                    ledger: self.ledger.clone(),
                    epoch: self.epoch,
                    resumes: Default::default(),
                    events: Mutex::default(),
                });
                let (tx, rx) = mpsc::channel(8);
                let task = tokio::spawn(
                    Consumer::new(
                        *transport,
                        topics.clone(),
                        sh.clone(),
                        self.endpoints.clone(),
                        self.authorization.clone(),
                    )
                    .run(rx),
                );
                self.consumers.insert(
                    *consumer,
                    ConsumerHandle {
                        transport: *transport,
                        topics: topics.clone(),
                        sh,
                        tx,
                        task,
                    },
                );
                self.connect(*consumer, *from, "subscribe").await;
            }
            Step::Disconnect { consumer } => {
                if let Some(c) = self.consumers.get(consumer) {
                    let (done, wait) = oneshot::channel();
                    if c.tx.send(Cmd::Disconnect(done)).await.is_ok() {
                        let _ = tokio::time::timeout(READY_TIMEOUT, wait).await;
                    }
                }
            }
            Step::Resume { consumer, from } => {
                if let Some(c) = self.consumers.get(consumer) {
                    c.sh.resumes
                        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    self.connect(*consumer, *from, "resume").await;
                }
            }
            Step::Pause { consumer, ms } => {
                if let Some(c) = self.consumers.get(consumer) {
                    let _ =
                        c.tx.send(Cmd::Pause(Duration::from_millis(u64::from(*ms))))
                            .await;
                }
            }
            Step::Sleep { ms } => tokio::time::sleep(Duration::from_millis(u64::from(*ms))).await,
            Step::Valkey { outage, down_ms } => {
                if valkey.is_empty() {
                    return;
                }
                // A cluster's nodes take the outages in turn.
                let node = (self.restarts % valkey.len() as u64) as usize;
                let v = &mut valkey[node];
                let down = Duration::from_millis(u64::from(*down_ms));
                self.restarts += 1;
                // Publishes while Valkey is away: answered 503 (ambiguous: maybe stored) or
                // delayed; either way the oracle must hold across the outage.
                let during = async |exec: &mut Exec| {
                    let began = Instant::now();
                    exec.publish(0, 4, 200, None, false, 2).await;
                    tokio::time::sleep(down.saturating_sub(began.elapsed())).await;
                };
                match outage {
                    Outage::Kill => {
                        v.kill();
                        during(self).await;
                        if let Err(e) = tokio::task::block_in_place(|| v.restart()) {
                            self.event(format!("valkey restart: {e}"));
                        }
                    }
                    Outage::Freeze => {
                        v.freeze(true);
                        during(self).await;
                        v.freeze(false);
                    }
                }
                self.await_ready().await;
                let _ = setup;
            }
        }
    }

    /// Waits (bounded) until every relay says it is ready again after an outage.
    async fn await_ready(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(20);
        for relay in 0..self.endpoints.len() {
            loop {
                if let Ok((200, _)) = self.request_to(relay, 1, Method::GET, "/ready", None).await {
                    break;
                }
                if Instant::now() >= deadline {
                    self.event("relay not ready 20 s after a valkey outage");
                    return;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }

    /// Resolves `from` for `consumer` and (re)connects it.
    async fn connect(&mut self, consumer: u8, from: From, why: &'static str) {
        let Some(c) = self.consumers.get(&consumer) else {
            return;
        };
        let (oracle_pos, wire, sse_id) = {
            let ledger = lock(&self.ledger);
            let log = lock(&c.sh.log);
            let multi_sse = c.transport == Transport::Sse && c.topics.len() > 1;
            let mut oracle_pos = Vec::new();
            let mut wire = Vec::new();
            let mut sse_id = None;
            if multi_sse {
                let raw = lock(&c.sh.raw_ids);
                let (id, positions) = match from {
                    // "Live" is "everything" here: the checker cannot write a multi-topic id,
                    // and a stream without `Last-Event-ID` has no "subscribed" moment (the
                    // relay writes the response head before it registers the stream).
                    From::Earliest | From::Live => (Some("0-0".to_owned()), None),
                    From::LastSeen => match raw.last() {
                        Some((r, p)) => (Some(r.clone()), Some(p.clone())),
                        None => (Some("0-0".to_owned()), None),
                    },
                    From::Back(k) => match raw.len().checked_sub(k as usize + 1) {
                        Some(i) => (Some(raw[i].0.clone()), Some(raw[i].1.clone())),
                        None => (Some("0-0".to_owned()), None),
                    },
                };
                sse_id = id;
                for i in 0..c.topics.len() {
                    let p = positions.as_ref().map_or(Pos::Earliest, |ps| ps[i]);
                    oracle_pos.push(p);
                    wire.push(Wire::Earliest);
                }
            } else {
                for &t in &c.topics {
                    let (p, w) = match from {
                        From::Earliest => (Pos::Earliest, Wire::Earliest),
                        From::Live => {
                            let p = ledger.newest_acked(t).map_or(Pos::Earliest, Pos::After);
                            // Only WebSocket has a confirmed "live" start (`subscribed`);
                            // the others start after the newest acknowledged id. With
                            // several relays so does WebSocket: a relay's "now" may be
                            // before what another relay acknowledged (see the module doc).
                            match (c.transport, p) {
                                (Transport::Ws, _) if self.endpoints.len() == 1 => (p, Wire::Live),
                                (_, Pos::After(id)) => (p, Wire::After(id)),
                                (_, Pos::Earliest) => (p, Wire::Earliest),
                            }
                        }
                        From::LastSeen => {
                            let p = log.last_seen(t);
                            (p, wire_of(p))
                        }
                        From::Back(k) => {
                            let reference = match log.last_seen(t) {
                                Pos::After(id) => Some(id),
                                Pos::Earliest => None,
                            };
                            let p = ledger.back(t, reference, k);
                            (p, wire_of(p))
                        }
                    };
                    oracle_pos.push(p);
                    wire.push(w);
                }
            }
            (oracle_pos, wire, sse_id)
        };
        let (ready, wait) = oneshot::channel();
        let cmd = Cmd::Connect {
            oracle: oracle_pos,
            wire,
            sse_id,
            why,
            ready,
        };
        if c.tx.send(cmd).await.is_err() {
            return;
        }
        match tokio::time::timeout(READY_TIMEOUT, wait).await {
            Ok(Ok(Ok(()))) => {}
            Ok(Ok(Err(e))) => self.event(format!("connect failed: {e}")),
            _ => self.event("connect: no answer"),
        }
    }

    async fn publish(
        &mut self,
        topic: u16,
        count: u32,
        bytes: u32,
        ttl_s: Option<u32>,
        bulk: bool,
        parallel: u8,
    ) {
        let builder = BodyBuilder::new(bytes as usize);
        let name = topic_name(topic);
        let ttl = ttl_s.map(|s| Duration::from_secs(u64::from(s)));
        let mut pending = Vec::with_capacity(count as usize);
        {
            let mut ledger = lock(&self.ledger);
            for _ in 0..count {
                let seq = ledger.publish(Published {
                    topic,
                    ttl,
                    sent: self.now(),
                    fate: Fate::Pending,
                    removed: false,
                });
                let mut body = Vec::with_capacity(bytes as usize + 64);
                body.extend_from_slice(br#"{"topic":""#);
                body.extend_from_slice(name.as_bytes());
                body.extend_from_slice(br#"","payload":"#);
                builder.write_payload(&mut body, seq, 0);
                if let Some(s) = ttl_s {
                    let _ = write!(VecWriter(&mut body), r#","ttl":{s}"#);
                }
                body.push(b'}');
                pending.push(Pending { seq, body });
            }
        }
        if bulk {
            let mut batch: Vec<Pending> = Vec::new();
            let mut size = 0;
            for p in pending {
                if !batch.is_empty() && (batch.len() == 1000 || size + p.body.len() > MAX_BULK_BODY)
                {
                    self.bulk(std::mem::take(&mut batch)).await;
                    size = 0;
                }
                size += p.body.len() + 1;
                batch.push(p);
            }
            if !batch.is_empty() {
                self.bulk(batch).await;
            }
            return;
        }
        // Single publishes over `parallel` connections, each sending its share in order (each
        // to another relay, with several).
        let lanes = usize::from(parallel.clamp(1, 4));
        let mut shares: Vec<Vec<Pending>> = (0..lanes).map(|_| Vec::new()).collect();
        for (i, p) in pending.into_iter().enumerate() {
            shares[i % lanes].push(p);
        }
        let first_relay = self.next_relay();
        let mut tasks = Vec::new();
        for (lane, share) in shares.into_iter().enumerate() {
            let relay = (first_relay + lane) % self.endpoints.len();
            let mut conn = self.conns[relay][lane].take();
            let endpoint = self.endpoints[relay].clone();
            let ledger = self.ledger.clone();
            let auth = self.authorization.clone();
            tasks.push(tokio::spawn(async move {
                for p in share {
                    let r = request(
                        &endpoint,
                        &mut conn,
                        Method::POST,
                        "/api/v1/messages",
                        Some(p.body),
                        auth.as_ref(),
                    )
                    .await;
                    let fate = match r {
                        Ok((201, body)) => serde_json::from_slice::<Accepted>(&body)
                            .ok()
                            .and_then(|a| a.message_id)
                            .and_then(|id| id.parse().ok())
                            .map_or(Fate::Ambiguous, Fate::Acked),
                        Ok((s, _)) if (400..500).contains(&s) => Fate::Rejected,
                        _ => Fate::Ambiguous,
                    };
                    lock(&ledger).settle(p.seq, fate);
                }
                (relay, lane, conn)
            }));
        }
        for t in tasks {
            if let Ok((relay, lane, conn)) = t.await {
                self.conns[relay][lane] = conn;
            }
        }
    }

    async fn bulk(&mut self, batch: Vec<Pending>) {
        let mut body =
            Vec::with_capacity(batch.iter().map(|p| p.body.len() + 1).sum::<usize>() + 16);
        body.extend_from_slice(br#"{"messages":["#);
        for (i, p) in batch.iter().enumerate() {
            if i > 0 {
                body.push(b',');
            }
            body.extend_from_slice(&p.body);
        }
        body.extend_from_slice(b"]}");
        let r = self
            .request(0, Method::POST, "/api/v1/messages/bulk", Some(body))
            .await;
        let mut ledger = lock(&self.ledger);
        match r {
            Ok((207, bytes)) => {
                let results = serde_json::from_slice::<BulkReply>(&bytes)
                    .map(|b| b.results)
                    .unwrap_or_default();
                for (i, p) in batch.iter().enumerate() {
                    let fate = match results.get(i) {
                        Some(a) if a.status.as_deref() == Some("accepted") => a
                            .message_id
                            .as_deref()
                            .and_then(|id| id.parse().ok())
                            .map_or(Fate::Ambiguous, Fate::Acked),
                        Some(a)
                            if matches!(
                                a.error.as_deref(),
                                Some("SERVICE_UNAVAILABLE" | "INTERNAL_ERROR")
                            ) =>
                        {
                            Fate::Ambiguous
                        }
                        Some(_) => Fate::Rejected,
                        None => Fate::Ambiguous,
                    };
                    ledger.settle(p.seq, fate);
                }
            }
            Ok((s, _)) if (400..500).contains(&s) => {
                for p in &batch {
                    ledger.settle(p.seq, Fate::Rejected);
                }
            }
            _ => {
                for p in &batch {
                    ledger.settle(p.seq, Fate::Ambiguous);
                }
            }
        }
    }

    /// Waits until every consumer has what it is owed, or stalls; then judges.
    async fn settle(&mut self, setup: &Setup) -> Outcome {
        let retention = retention(setup);
        let begun = Instant::now();
        let mut last_change = Instant::now();
        let mut last_received = u64::MAX;
        let stalled = loop {
            let (owed, received) = {
                let ledger = lock(&self.ledger);
                let logs: Vec<(u8, ConsumerSnapshot)> = self.snapshot();
                let refs: Vec<(u8, &oracle::ConsumerLog)> =
                    logs.iter().map(|(c, l)| (*c, &l.0)).collect();
                let j = oracle::judge(&ledger, retention, &refs, self.now());
                (j.owed, refs.iter().map(|(_, l)| l.received).sum::<u64>())
            };
            if owed == 0 {
                break false;
            }
            if received != last_received {
                last_received = received;
                last_change = Instant::now();
            }
            if last_change.elapsed() > STALL_AFTER || begun.elapsed() > SETTLE_MAX {
                break true;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        };
        let ledger = lock(&self.ledger);
        let logs = self.snapshot();
        let refs: Vec<(u8, &oracle::ConsumerLog)> = logs.iter().map(|(c, l)| (*c, &l.0)).collect();
        let now = self.now();
        let Judgement {
            mut violations,
            deliveries,
            gaps,
            ..
        } = oracle::judge(&ledger, retention, &refs, now);
        if stalled {
            violations.extend(oracle::stalls(&ledger, retention, &refs, now));
        }
        let mut events = self.events.clone();
        let mut resumes = 0;
        for c in self.consumers.values() {
            resumes += c.sh.resumes.load(std::sync::atomic::Ordering::Relaxed);
            for (k, v) in lock(&c.sh.events).iter() {
                *events.entry(k.clone()).or_default() += v;
            }
        }
        Outcome {
            violations,
            published: ledger.messages.len() as u64,
            acked: ledger.count(|f| matches!(f, Fate::Acked(_))),
            ambiguous: ledger.count(|f| matches!(f, Fate::Ambiguous | Fate::Pending)),
            rejected: ledger.count(|f| matches!(f, Fate::Rejected)),
            deliveries,
            gaps,
            resumes,
            restarts: self.restarts,
            events,
            elapsed: Duration::ZERO,
            ..Outcome::default()
        }
    }

    fn snapshot(&self) -> Vec<(u8, ConsumerSnapshot)> {
        self.consumers
            .iter()
            .map(|(c, h)| (*c, ConsumerSnapshot(lock(&h.sh.log).clone())))
            .collect()
    }
}

/// A copy of a consumer's log, judged without holding its lock.
struct ConsumerSnapshot(oracle::ConsumerLog);

fn wire_of(p: Pos) -> Wire {
    match p {
        Pos::Earliest => Wire::Earliest,
        Pos::After(id) => Wire::After(id),
    }
}

/// `write!` into a byte vector.
struct VecWriter<'a>(&'a mut Vec<u8>);

impl std::fmt::Write for VecWriter<'_> {
    fn write_str(&mut self, s: &str) -> std::fmt::Result {
        self.0.extend_from_slice(s.as_bytes());
        Ok(())
    }
}

/// One request on `conn` (connected first if needed; dropped after a failure).
pub(super) async fn request(
    endpoint: &Endpoint,
    conn: &mut Option<HttpConn>,
    method: Method,
    path: &str,
    body: Option<Vec<u8>>,
    authorization: Option<&HeaderValue>,
) -> Result<(u16, Bytes), String> {
    if conn.as_ref().is_none_or(|c| !c.is_open()) {
        *conn = Some(
            HttpConn::connect(endpoint)
                .await
                .map_err(|e| e.kind().to_owned())?,
        );
    }
    let Some(c) = conn.as_mut() else {
        return Err("no connection".into());
    };
    let r = tokio::time::timeout(
        REQUEST_TIMEOUT,
        c.request(endpoint, method, path, body.map(Bytes::from), authorization),
    )
    .await;
    match r {
        Ok(Ok(answer)) => Ok(answer),
        Ok(Err(e)) => {
            *conn = None;
            Err(e.kind().to_owned())
        }
        Err(_) => {
            *conn = None;
            Err("timeout".into())
        }
    }
}

/// Logs in as the checker's user (the bootstrap admin of an authenticated set-up); the
/// `Authorization` value every request and stream then carries.
async fn login(endpoint: &Endpoint) -> Result<HeaderValue, String> {
    let deadline = Instant::now() + Duration::from_secs(20);
    let body = format!(
        "username={}&password={}",
        super::procs::CHECK_USER,
        super::procs::CHECK_PASSWORD
    );
    loop {
        let attempt = async {
            let mut conn = HttpConn::connect(endpoint)
                .await
                .map_err(|e| e.kind().to_owned())?;
            let form = HeaderValue::from_static("application/x-www-form-urlencoded");
            let response = conn
                .send(
                    endpoint,
                    Method::POST,
                    "/auth/login",
                    Some(Bytes::from(body.clone())),
                    None,
                    &[("content-type", form)],
                )
                .await
                .map_err(|e| e.kind().to_owned())?;
            let status = response.status().as_u16();
            let bytes = http_body_util::BodyExt::collect(response.into_body())
                .await
                .map_err(|e| e.to_string())?
                .to_bytes();
            if status != 200 {
                return Err(format!(
                    "login: {status} {}",
                    String::from_utf8_lossy(&bytes)
                ));
            }
            let reply: serde_json::Value =
                serde_json::from_slice(&bytes).map_err(|e| format!("login reply: {e}"))?;
            let token = reply["access_token"]
                .as_str()
                .ok_or("login reply without access_token")?;
            HeaderValue::from_str(&format!("Bearer {token}")).map_err(|e| e.to_string())
        };
        match attempt.await {
            Ok(value) => return Ok(value),
            // The bootstrap admin is created as the relay starts: retry briefly.
            Err(_) if Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(e) => return Err(e),
        }
    }
}
