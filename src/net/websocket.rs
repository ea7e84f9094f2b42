//! WebSocket sessions at `GET /ws`: the socket side of the transport.
//!
//! The HTTP layer validates the upgrade (`crate::http::handlers::websocket`) and writes the
//! 101 response; [`run`] then drives the session over the raw connection:
//! - a reader decodes client frames (sans-IO codec in `crate::ws`) and acts on the JSON
//!   commands: subscribe (with an offset), unsubscribe, ack, ping;
//! - the shared writer loop ([`crate::delivery::writer`]) sends, in one write per batch, the
//!   session's control frames (acknowledgements, errors, gap signals, pongs, protocol pings)
//!   and then its queued messages, each one the frame encoded once per shard and shared by
//!   every socket;
//! - followers catch subscriptions up (`crate::delivery::catch_up`) concurrently with both.
//!
//! Subscribing registers every topic with its owner first, then answers `subscribed`, then
//! replays: so `subscribed` means "from here on nothing is missed", and replayed messages
//! follow it. A client that falls `ws.max_queued_bytes` behind is closed with 4008 "slow
//! consumer"; it resumes with its last id. No frame from the client for `ws.idle_timeout`
//! (protocol pongs count) closes the session; shutdown closes it with 1001.

use std::cell::{Cell, RefCell};
use std::rc::Rc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use futures::channel::mpsc;
use futures::future::{abortable, select, AbortHandle, Either};
use futures::stream::{FuturesUnordered, StreamExt};
use futures::{AsyncReadExt, AsyncWriteExt};
use glommio::net::TcpStream;
use std::collections::HashMap;

use crate::auth::{Permission, Principal};
use crate::clock::now_ms;
use crate::delivery::group::{run_consumer, GroupConsumer, Holding, Registration};
use crate::delivery::sink::{Delivered, Sink};
use crate::delivery::writer::{self, Ending, Framing, Idle};
use crate::delivery::OnDrop;
use crate::delivery::{catch_up, register, unfollow, unfollow_all, Gap, StartAt};
use crate::http::handlers::websocket::WsUpgrade;
use crate::metrics::Egress;
use crate::shard::Shard;
use crate::store::message::{write_rfc3339_millis, MessageId};

/// The close code of a session whose topics lost messages before this relay could pass them
/// on (another relay's publishes trimmed away before this one read them): like 4008, the
/// client reconnects and resumes from its last ids, and the resume reports the gap.
pub const RESUME_CLOSE_CODE: u16 = 4009;
use crate::store::group::{validate_name, GroupError, GroupMessage};
use crate::ws::codec::{self, CloseReason, CodecLimits, Decoder, Incoming};
use crate::ws::protocol::{self, ClientMessage, GroupSubscription, Offset};

/// How long a closing session waits for the client's close frame.
const CLOSE_GRACE: Duration = Duration::from_secs(2);

/// A session's wire form for the shared writer loop: message frames, protocol pings, the
/// idle timeout, and the close frame.
struct WsFraming<'a> {
    /// Set by the reader when the session is ending: the close frame to send, if any.
    closing: &'a RefCell<Option<Option<CloseReason>>>,
    /// When the client last sent a frame (protocol pongs count).
    last_heard: &'a Cell<Instant>,
    next_ping: Instant,
    ping_interval: Duration,
    idle_timeout: Duration,
}

impl Framing for WsFraming<'_> {
    const EGRESS: Egress = Egress::WebSocket;

    fn message(&mut self, delivered: &Delivered, out: &mut BytesMut) {
        out.extend_from_slice(delivered.ws_frame());
    }

    fn idle(&mut self, now: Instant, out: &mut BytesMut) -> Idle {
        let last_heard = self.last_heard.get();
        if now.duration_since(last_heard) > self.idle_timeout {
            self.closing
                .borrow_mut()
                .get_or_insert(Some(CloseReason::Policy(1001, "idle timeout")));
            return Idle::End;
        }
        if now >= self.next_ping {
            codec::encode_ping(out, b"");
            self.next_ping = now + self.ping_interval;
        }
        Idle::Until(
            self.next_ping
                .min(last_heard + self.idle_timeout + Duration::from_millis(1)),
        )
    }

    fn end(&mut self, why: Ending, out: &mut BytesMut) {
        let reason = match (*self.closing.borrow(), why) {
            (Some(reason), _) => reason,
            (None, Ending::SlowConsumer) => Some(CloseReason::SlowConsumer),
            (None, Ending::Resync) => Some(CloseReason::Policy(RESUME_CLOSE_CODE, "resume")),
            (None, _) => Some(CloseReason::GoingAway),
        };
        if let Some(reason) = reason {
            codec::encode_close(out, &reason);
        }
    }
}

/// A subscription's catch-up job for the followers.
#[derive(Clone)]
struct Job {
    topic: Arc<str>,
    start: StartAt,
    /// The follow it catches up (see [`Sink::follow`]).
    generation: u64,
}

/// The session's running catch-ups, by topic: at most one per topic; unsubscribing (or
/// subscribing the topic anew) aborts the running one at once, so a subscribe/unsubscribe
/// loop cannot pile up history reads.
type CatchUps = RefCell<HashMap<Arc<str>, (u64, AbortHandle)>>;

/// A group consumer to start: which group, on which topic, holding what.
struct GroupJob {
    who: GroupConsumer,
    holding: Rc<Holding>,
}

/// The session's running group consumers by (stored topic, group): what each holds, and the
/// handle that stops it (unsubscribe, or the same group subscribed anew).
type GroupSlots = RefCell<HashMap<(Arc<str>, String), (Rc<Holding>, AbortHandle, String)>>;

/// Drives one session until it closes. `input` holds bytes the client sent after the upgrade
/// request (its first frames, possibly).
pub async fn run(shard: &Shard, stream: TcpStream, input: BytesMut, upgrade: WsUpgrade) {
    let config = &shard.config.ws;
    shard.metrics.websocket_opened(1);
    let _open = OnDrop(|| shard.metrics.websocket_opened(-1));
    let (mut reader, mut writer) = stream.split();
    let sink = shard.delivery.new_sink(config.max_queued_bytes);
    let session_id = format!("{:x}-{}-{}", fastrand::u64(..), shard.id, sink.id);
    let last_heard = Cell::new(Instant::now());
    // Set when the session is ending: the close frame to send (once), if any.
    let closing: RefCell<Option<Option<CloseReason>>> = RefCell::new(None);
    let acks = Cell::new(0u64);
    let (jobs_tx, mut jobs_rx) = mpsc::unbounded::<Vec<Job>>();
    let catch_ups: CatchUps = RefCell::new(HashMap::new());
    let (group_jobs_tx, mut group_jobs_rx) = mpsc::unbounded::<GroupJob>();
    let group_slots: GroupSlots = RefCell::new(HashMap::new());
    // Replaced by an in-band refresh (`{"type":"auth"}`).
    let principal = RefCell::new(upgrade.principal);

    let close_with = |reason: Option<CloseReason>| {
        let mut c = closing.borrow_mut();
        if c.is_none() {
            *c = Some(reason);
        }
        drop(c);
        sink.close();
    };

    let reader_loop = async {
        let mut decoder = Decoder::new(CodecLimits {
            max_frame_bytes: config.max_message_bytes,
            max_message_bytes: config.max_message_bytes,
        });
        let mut buf = input;
        loop {
            loop {
                match decoder.decode(&mut buf) {
                    Ok(Some(frame)) => {
                        // A client flooding frames that are all already buffered would hold
                        // the shard (decoding never waits): give the other tasks of the shard
                        // their turn once this task used its time slice.
                        glommio::yield_if_needed().await;
                        last_heard.set(Instant::now());
                        match frame {
                            Incoming::Text(text) => {
                                let session = Session {
                                    principal: &principal,
                                    id: &session_id,
                                    jobs: &jobs_tx,
                                    catch_ups: &catch_ups,
                                    acks: &acks,
                                    group_jobs: &group_jobs_tx,
                                    group_slots: &group_slots,
                                };
                                handle_text(shard, &sink, &text, &session).await
                            }
                            Incoming::Binary(_) => sink.push_control(error_frame(
                                "UNSUPPORTED_FRAME",
                                "binary frames are not supported; send JSON text frames",
                            )),
                            Incoming::Ping(payload) => {
                                let mut out = BytesMut::new();
                                codec::encode_pong(&mut out, &payload);
                                sink.push_control(out.freeze());
                            }
                            Incoming::Pong(_) => {}
                            Incoming::Close(code) => {
                                let mut out = BytesMut::new();
                                codec::encode_close_echo(&mut out, code.map(|(c, _)| c));
                                sink.push_control(out.freeze());
                                close_with(None);
                                return;
                            }
                        }
                    }
                    Ok(None) => break,
                    Err(reason) => {
                        close_with(Some(reason));
                        return;
                    }
                }
            }
            if closing.borrow().is_some() {
                return;
            }
            if buf.is_empty() {
                // Idle sessions are the common case (10,000s of subscribers that only
                // receive): keep no input allocation while waiting for a client frame.
                buf = BytesMut::new();
            }
            match crate::net::read::read_into(&mut reader, &mut buf).await {
                Ok(0) | Err(_) => {
                    close_with(None);
                    return;
                }
                Ok(_) => {}
            }
        }
    };

    let followers = async {
        let mut running = FuturesUnordered::new();
        let start = |running: &mut FuturesUnordered<_>, jobs: Vec<Job>| {
            for job in jobs {
                let (task, handle) = abortable(follow_job(shard, &sink, &catch_ups, job.clone()));
                if let Some((_, old)) = catch_ups
                    .borrow_mut()
                    .insert(job.topic.clone(), (job.generation, handle))
                {
                    old.abort();
                }
                running.push(task);
            }
        };
        loop {
            let next_job = jobs_rx.next();
            if running.is_empty() {
                match next_job.await {
                    Some(jobs) => start(&mut running, jobs),
                    None => return,
                }
                continue;
            }
            match select(next_job, running.next()).await {
                Either::Left((Some(jobs), _)) => start(&mut running, jobs),
                Either::Left((None, _)) => {
                    while running.next().await.is_some() {}
                    return;
                }
                Either::Right(_) => {}
            }
        }
    };

    // Group consumers: one task per (topic, group), each taking what its room allows.
    let group_followers = async {
        let mut running = FuturesUnordered::new();
        loop {
            let next_job = group_jobs_rx.next();
            if running.is_empty() {
                match next_job.await {
                    Some(job) => running.push(start_group_job(shard, &sink, &group_slots, job)),
                    None => return,
                }
                continue;
            }
            match select(next_job, running.next()).await {
                Either::Left((Some(job), _)) => {
                    running.push(start_group_job(shard, &sink, &group_slots, job))
                }
                Either::Left((None, _)) => {
                    while running.next().await.is_some() {}
                    return;
                }
                Either::Right(_) => {}
            }
        }
    };

    // The session's token: its expiry (unless refreshed in band) or revocation ends it.
    let credential = async {
        let end = shard.auth.watch(&principal).await;
        close_with(Some(CloseReason::Policy(end.close_code(), end.reason())));
        // The writer sends the close frame and ends the session.
        futures::future::pending::<()>().await;
    };

    let writer_loop = async {
        let mut framing = WsFraming {
            closing: &closing,
            last_heard: &last_heard,
            next_ping: Instant::now() + config.ping_interval,
            ping_interval: config.ping_interval,
            idle_timeout: config.idle_timeout,
        };
        writer::run(shard, &sink, &mut writer, &mut framing).await;
    };

    // The writer decides when the session ends; the reader then gets a short grace period to
    // receive the client's close frame, and followers stop with the sink.
    let reader_loop = std::pin::pin!(reader_loop);
    // Followers never finish on their own (they wait for more subscriptions): the session is
    // over when the writer is, and unfinished catch-ups are dropped with it.
    let session = async {
        select(
            std::pin::pin!(writer_loop),
            select(
                select(std::pin::pin!(followers), std::pin::pin!(group_followers)),
                std::pin::pin!(credential),
            ),
        )
        .await;
    };
    match select(std::pin::pin!(session), reader_loop).await {
        Either::Left((_, reader)) => {
            let _ = select(reader, Box::pin(glommio::timer::sleep(CLOSE_GRACE))).await;
        }
        Either::Right((_, session)) => {
            // The reader ended (close frame, error, EOF): let the writer send what it must.
            let _ = select(session, Box::pin(glommio::timer::sleep(CLOSE_GRACE))).await;
        }
    }
    unfollow_all(shard, &sink);
    tracing::trace!(session = %session_id, acks = acks.get(), "WebSocket session ended");
    let _ = writer.close().await;
}

/// Starts a group consumer, replacing one of the same (topic, group) in the session.
fn start_group_job<'a>(
    shard: &'a Shard,
    sink: &'a Rc<Sink>,
    slots: &'a GroupSlots,
    job: GroupJob,
) -> futures::future::Abortable<impl std::future::Future<Output = ()> + 'a> {
    let key = (job.who.topic.clone(), job.who.group.clone());
    let holding = job.holding.clone();
    let consumer = job.who.consumer.clone();
    let (task, handle) = abortable(group_job(shard, sink, job));
    if let Some((_, old, _)) = slots.borrow_mut().insert(key, (holding, handle, consumer)) {
        old.abort();
    }
    task
}

/// Runs one group consumer of the session: its deliveries are the session's frames. Storage
/// failures are retried (the consumer stays); a deleted group ends it with an error frame.
async fn group_job(shard: &Shard, sink: &Rc<Sink>, job: GroupJob) {
    let GroupJob { who, holding } = job;
    let public = crate::topic::public_name(&who.topic).to_owned();
    let mut backoff = Duration::from_millis(100);
    loop {
        let registration = match Registration::new(shard, &who.topic, &holding.wake).await {
            Ok(registration) => registration,
            Err(e) => {
                tracing::debug!(error = %e, "group consumer registration failed");
                glommio::timer::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(5));
                continue;
            }
        };
        let mut deliver = |batch: Vec<GroupMessage>| {
            shard
                .metrics
                .delivered(Egress::WebSocket, batch.len() as u64);
            for m in batch {
                let mut json = Vec::with_capacity(192 + m.message.payload.len());
                m.write_json(&mut json, &who.topic, &who.group);
                let mut out = Vec::with_capacity(json.len() + 20);
                protocol::write_message(&mut out, &json);
                sink.push_control(codec::text_frame(&out));
            }
        };
        let result = run_consumer(shard, &who, &holding, &mut deliver).await;
        drop(registration);
        match result {
            Ok(()) => return,
            Err(GroupError::NotFound) => {
                sink.push_control(error_frame(
                    "GROUP_NOT_FOUND",
                    &format!(
                        "group `{}` of `{public}` no longer exists; not consuming it any more",
                        who.group
                    ),
                ));
                return;
            }
            Err(e) => {
                tracing::debug!(error = %e, "group consumer failed; retrying");
                glommio::timer::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(5));
            }
        }
    }
}

/// A group `subscribe`: checks the names and that the group exists on every topic, answers
/// `subscribed`, then starts one consumer per topic.
async fn subscribe_group(
    shard: &Shard,
    sink: &Rc<Sink>,
    session: &Session<'_>,
    topics: &[String],
    spec: GroupSubscription,
) {
    let config = &shard.config;
    if let Err(e) = validate_name("group", &spec.group) {
        return sink.push_control(subscription_error_frame("INVALID_GROUP", &e));
    }
    if let Err(e) = validate_name("consumer", &spec.consumer) {
        return sink.push_control(subscription_error_frame("INVALID_CONSUMER", &e));
    }
    let mut stored_topics = Vec::with_capacity(topics.len());
    for topic in topics {
        if let Err(e) = crate::topic::validate(topic, config.api.max_topic_name_len) {
            return sink.push_control(subscription_error_frame(
                "INVALID_TOPIC",
                &format!("`{}`: {e}", topic.escape_debug()),
            ));
        }
        let stored = match session.principal.borrow().topic(Permission::Read, topic) {
            Ok(stored) => stored,
            Err(e) => {
                return sink.push_control(subscription_error_frame("FORBIDDEN", &e.to_string()))
            }
        };
        match shard.group_info(stored.clone(), spec.group.clone()).await {
            Ok(_) => {}
            Err(GroupError::NotFound) => {
                return sink.push_control(subscription_error_frame(
                    "GROUP_NOT_FOUND",
                    &format!(
                    "topic `{}` has no group `{}`; create it with POST /api/v1/topics/{}/groups",
                    topic.escape_debug(),
                    spec.group,
                    topic.escape_debug()
                ),
                ))
            }
            Err(e) => {
                tracing::debug!(error = %e, "WebSocket group subscribe failed");
                return sink.push_control(subscription_error_frame(
                    "SERVICE_UNAVAILABLE",
                    "could not subscribe now; retry shortly",
                ));
            }
        }
        stored_topics.push(stored);
    }
    if session.group_slots.borrow().len() + stored_topics.len() > config.ws.max_topics {
        return sink.push_control(subscription_error_frame(
            "TOO_MANY_TOPICS",
            &format!(
                "a session may consume at most {} topics as a group member",
                config.ws.max_topics
            ),
        ));
    }
    let names: Vec<&str> = topics.iter().map(String::as_str).collect();
    let mut ts = Vec::with_capacity(24);
    write_rfc3339_millis(&mut ts, now_ms());
    let mut out = Vec::with_capacity(160);
    protocol::write_group_subscribed(
        &mut out,
        &names,
        &spec,
        session.id,
        &String::from_utf8_lossy(&ts),
    );
    sink.push_control(codec::text_frame(&out));
    for stored in stored_topics {
        let _ = session.group_jobs.unbounded_send(GroupJob {
            who: GroupConsumer {
                topic: Arc::from(stored.as_str()),
                group: spec.group.clone(),
                consumer: spec.consumer.clone(),
            },
            holding: Rc::new(Holding::new(spec.max_in_flight)),
        });
    }
}

/// A group `ack` or `nack`: settles the ids with the group (whoever holds them) and frees
/// the room they took in this session's consumer, then answers id by id.
async fn settle_group(
    shard: &Shard,
    sink: &Rc<Sink>,
    session: &Session<'_>,
    (topic, group, ids, nack): (String, String, Vec<String>, bool),
) {
    let code = if nack { "NACK_FAILED" } else { "ACK_FAILED" };
    if let Err(e) = validate_name("group", &group) {
        return sink.push_control(error_frame("INVALID_GROUP", &e));
    }
    let stored = match session.principal.borrow().topic(Permission::Read, &topic) {
        Ok(stored) => stored,
        Err(e) => return sink.push_control(error_frame("FORBIDDEN", &e.to_string())),
    };
    let mut parsed = Vec::with_capacity(ids.len());
    for id in &ids {
        match id.parse::<MessageId>() {
            Ok(id) => parsed.push(id),
            Err(_) => {
                return sink.push_control(error_frame(
                    "INVALID_REQUEST",
                    &format!("`{}` is not a message id", id.escape_debug()),
                ))
            }
        }
    }
    let slot = session
        .group_slots
        .borrow()
        .get(&(Arc::from(stored.as_str()), group.clone()))
        .map(|(holding, _, consumer)| (holding.clone(), consumer.clone()));
    let (holding, consumer) = slot.unzip();
    let result = if nack {
        // Only what this session's consumer holds: a message redelivered elsewhere since
        // is the other consumer's to release, and a session consuming no such group holds
        // nothing.
        match consumer {
            Some(consumer) => {
                shard
                    .group_release(
                        stored.clone(),
                        group.clone(),
                        parsed.clone(),
                        Some(consumer),
                    )
                    .await
            }
            None => Ok(crate::store::group::Settled {
                done: Vec::new(),
                unknown: parsed.clone(),
            }),
        }
    } else {
        shard
            .group_ack(stored.clone(), group.clone(), parsed.clone())
            .await
    };
    if let (Some(holding), Ok(_)) = (holding, &result) {
        // Settled now or before (elsewhere), the consumer no longer holds them. (After a
        // storage error they stay pending with it, and keep their places.)
        holding.settle(&parsed);
    }
    match result {
        Ok(settled) => {
            let done: Vec<String> = settled.done.iter().map(ToString::to_string).collect();
            let unknown: Vec<String> = settled.unknown.iter().map(ToString::to_string).collect();
            let done: Vec<&str> = done.iter().map(String::as_str).collect();
            let unknown: Vec<&str> = unknown.iter().map(String::as_str).collect();
            let mut out = Vec::with_capacity(96 + 24 * ids.len());
            protocol::write_group_settled(&mut out, nack, &topic, &group, &done, &unknown);
            sink.push_control(codec::text_frame(&out));
        }
        Err(GroupError::NotFound) => sink.push_control(error_frame(
            "GROUP_NOT_FOUND",
            &format!("topic `{}` has no group `{group}`", topic.escape_debug()),
        )),
        Err(e) => {
            tracing::debug!(error = %e, "WebSocket group ack failed");
            sink.push_control(error_frame(
                code,
                "storage is unavailable; the ids stay pending: send them again",
            ))
        }
    }
}

async fn follow_job(shard: &Shard, sink: &Rc<Sink>, catch_ups: &CatchUps, job: Job) {
    let mut on_gap = |gap: Gap| sink.push_control(gap_frame(&gap));
    let result = catch_up(
        shard,
        sink,
        job.topic.clone(),
        job.start,
        job.generation,
        &mut on_gap,
    )
    .await;
    {
        let mut running = catch_ups.borrow_mut();
        if running
            .get(&job.topic)
            .is_some_and(|(generation, _)| *generation == job.generation)
        {
            running.remove(&job.topic);
        }
    }
    if let Err(e) = result {
        if !sink.is_current(&job.topic, job.generation) {
            // Unsubscribed (or subscribed anew) meanwhile: not this catch-up's topic any more.
            return;
        }
        tracing::debug!(error = %e, "WebSocket replay failed");
        // The topic is dropped from the session: its live messages would otherwise wait for a
        // replay that will not finish, and the subscribe that retries it would be a no-op for
        // a topic still followed.
        unfollow(shard, sink, &job.topic);
        sink.push_control(error_frame(
            "REPLAY_FAILED",
            &format!(
                "could not replay `{}`; no longer subscribed to it: subscribe again from the \
                 last id seen to retry",
                crate::topic::public_name(&job.topic)
            ),
        ));
    }
}

/// What a session's commands act on besides the shard and the sink.
struct Session<'a> {
    /// Who opened the session (or refreshed its token since): its topics are in its
    /// namespace.
    principal: &'a RefCell<Principal>,
    id: &'a str,
    /// Catch-ups to start.
    jobs: &'a mpsc::UnboundedSender<Vec<Job>>,
    catch_ups: &'a CatchUps,
    acks: &'a Cell<u64>,
    /// Group consumers to start, and those running.
    group_jobs: &'a mpsc::UnboundedSender<GroupJob>,
    group_slots: &'a GroupSlots,
}

/// Acts on one JSON command.
async fn handle_text(shard: &Shard, sink: &Rc<Sink>, text: &str, session: &Session<'_>) {
    let Session {
        principal,
        id: session_id,
        jobs,
        catch_ups,
        acks,
        ..
    } = *session;
    let config = &shard.config;
    match protocol::parse_client_message(text, config.ws.max_topics) {
        Err(e) => sink.push_control(match e.reason() {
            Some(reason) => subscription_error_frame(reason, &e.message()),
            None => error_frame(e.code(), &e.message()),
        }),
        Ok(ClientMessage::Ping) => {
            let mut out = Vec::with_capacity(64);
            let mut ts = Vec::with_capacity(24);
            write_rfc3339_millis(&mut ts, now_ms());
            protocol::write_pong(&mut out, &String::from_utf8_lossy(&ts));
            sink.push_control(codec::text_frame(&out));
        }
        Ok(ClientMessage::Ack { .. }) => acks.set(acks.get() + 1),
        Ok(ClientMessage::GroupAck {
            topic,
            group,
            ids,
            nack,
        }) => settle_group(shard, sink, session, (topic, group, ids, nack)).await,
        Ok(ClientMessage::Subscribe {
            topics,
            group: Some(spec),
            ..
        }) => subscribe_group(shard, sink, session, &topics, spec).await,
        Ok(ClientMessage::Unsubscribe {
            topics,
            group: Some(group),
        }) => {
            for topic in &topics {
                let stored = principal.borrow().stored_name(topic);
                if let Some((_, running, _)) = session
                    .group_slots
                    .borrow_mut()
                    .remove(&(Arc::from(stored.as_str()), group.clone()))
                {
                    running.abort();
                }
            }
            let names: Vec<&str> = topics.iter().map(String::as_str).collect();
            let mut out = Vec::with_capacity(64);
            protocol::write_unsubscribed(&mut out, &names);
            sink.push_control(codec::text_frame(&out));
        }
        Ok(ClientMessage::Auth { token }) => {
            let current = principal.borrow().user_id().map(str::to_owned);
            match shard.auth.authenticate(Some(&token)).await {
                // The same caller with the same rights: a fresh lifetime and nothing else. A
                // credential of another kind or with other grants (an identity provider
                // narrowing a subject's scope, an owner's API key) would leave the session's
                // subscriptions checked against rights it no longer has: reconnect with it.
                Ok(fresh) if current.is_some() && !principal.borrow().same_rights(&fresh) => sink
                    .push_control(error_frame(
                        "AUTH_FAILED",
                        "the token grants other rights than the session's; reconnect with it",
                    )),
                Ok(fresh) if current.is_some() && fresh.user_id() == current.as_deref() => {
                    let expires = fresh.user.as_ref().map_or(0, |u| u.expires_at);
                    *principal.borrow_mut() = fresh;
                    let mut ts = Vec::with_capacity(24);
                    write_rfc3339_millis(&mut ts, expires.saturating_mul(1000));
                    let mut out = Vec::with_capacity(64);
                    protocol::write_auth_ok(&mut out, &String::from_utf8_lossy(&ts));
                    sink.push_control(codec::text_frame(&out));
                }
                Ok(_) if current.is_none() => sink.push_control(error_frame(
                    "AUTH_FAILED",
                    "authentication is off on this relay",
                )),
                Ok(_) => sink.push_control(error_frame(
                    "AUTH_FAILED",
                    "the token is another user's; the session keeps its own",
                )),
                Err(e) => sink.push_control(error_frame(
                    "AUTH_FAILED",
                    &format!("{e}; the session keeps its current token until it expires"),
                )),
            }
        }
        Ok(ClientMessage::Unsubscribe {
            topics,
            group: None,
        }) => {
            for topic in &topics {
                let stored = principal.borrow().stored_name(topic);
                unfollow(shard, sink, &stored);
                if let Some((_, running)) = catch_ups.borrow_mut().remove(stored.as_str()) {
                    running.abort();
                }
            }
            let names: Vec<&str> = topics.iter().map(String::as_str).collect();
            let mut out = Vec::with_capacity(64);
            protocol::write_unsubscribed(&mut out, &names);
            sink.push_control(codec::text_frame(&out));
        }
        Ok(ClientMessage::Subscribe {
            topics,
            offset,
            group: None,
            ..
        }) => {
            let mut plan: Vec<(Arc<str>, StartAt)> = Vec::with_capacity(topics.len());
            for topic in &topics {
                if let Err(e) = crate::topic::validate(topic, config.api.max_topic_name_len) {
                    sink.push_control(subscription_error_frame(
                        "INVALID_TOPIC",
                        &format!("`{}`: {e}", topic.escape_debug()),
                    ));
                    return;
                }
                let start = match start_for(&offset, topic) {
                    Ok(start) => start,
                    Err(message) => {
                        sink.push_control(subscription_error_frame("INVALID_OFFSET", &message));
                        return;
                    }
                };
                // Followed by its stored name: the caller's namespace.
                let stored = match principal.borrow().topic(Permission::Read, topic) {
                    Ok(stored) => stored,
                    Err(e) => {
                        sink.push_control(subscription_error_frame("FORBIDDEN", &e.to_string()));
                        return;
                    }
                };
                if !sink.follows(&stored) {
                    plan.push((Arc::from(stored.as_str()), start));
                }
            }
            if sink.topics().len() + plan.len() > config.ws.max_topics {
                sink.push_control(subscription_error_frame(
                    "TOO_MANY_TOPICS",
                    &format!(
                        "a session may follow at most {} topics",
                        config.ws.max_topics
                    ),
                ));
                return;
            }
            // Register everything first, so `subscribed` means nothing from now on is missed.
            let mut generations = Vec::with_capacity(plan.len());
            for (topic, start) in &plan {
                match register(shard, sink, topic, *start).await {
                    Ok(generation) => generations.push(generation),
                    Err(e) => {
                        tracing::debug!(error = %e, "WebSocket subscribe failed");
                        for (t, _) in &plan {
                            unfollow(shard, sink, t);
                        }
                        sink.push_control(subscription_error_frame(
                            "SERVICE_UNAVAILABLE",
                            "could not subscribe now; retry shortly",
                        ));
                        return;
                    }
                }
            }
            let names: Vec<&str> = topics.iter().map(String::as_str).collect();
            let mut ts = Vec::with_capacity(24);
            write_rfc3339_millis(&mut ts, now_ms());
            let mut out = Vec::with_capacity(128);
            protocol::write_subscribed(&mut out, &names, session_id, &String::from_utf8_lossy(&ts));
            sink.push_control(codec::text_frame(&out));
            let replays: Vec<Job> = plan
                .into_iter()
                .zip(generations)
                .filter(|((_, start), _)| *start != StartAt::Last)
                .map(|((topic, start), generation)| Job {
                    topic,
                    start,
                    generation,
                })
                .collect();
            if !replays.is_empty() {
                let _ = jobs.unbounded_send(replays);
            }
        }
    }
}

/// Where one topic of a `subscribe` starts, with the offset's id parsed; the error is the
/// `INVALID_OFFSET` message. Resolved by [`Offset::for_topic`], so a per-topic object naming a
/// topic twice means what the protocol documents (the last entry wins). Public for the fuzz
/// targets: it is the sans-IO part of acting on a `subscribe`.
pub fn start_for(offset: &Offset, topic: &str) -> Result<StartAt, String> {
    match offset.for_topic(topic) {
        protocol::StartAt::Last => Ok(StartAt::Last),
        protocol::StartAt::Earliest => Ok(StartAt::Earliest),
        protocol::StartAt::After(id) => id.parse::<MessageId>().map(StartAt::After).map_err(|_| {
            format!(
                "offset `{}` is not a message id such as 1700000000000-0",
                id.escape_debug()
            )
        }),
    }
}

/// A failed `subscribe`: `SUBSCRIPTION_ERROR` with the specific code as `reason`.
fn subscription_error_frame(reason: &str, message: &str) -> Bytes {
    let mut out = Vec::with_capacity(96 + message.len());
    protocol::write_subscription_error(&mut out, reason, message);
    codec::text_frame(&out)
}

fn error_frame(code: &str, message: &str) -> Bytes {
    let mut out = Vec::with_capacity(64 + message.len());
    protocol::write_error(&mut out, code, message);
    codec::text_frame(&out)
}

fn gap_frame(gap: &Gap) -> Bytes {
    let mut out = Vec::with_capacity(128);
    gap.write_json(&mut out);
    codec::text_frame(&out)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Bug: the session resolved a per-topic offset naming a topic twice with the FIRST entry,
    /// while the protocol (and `Offset::for_topic`) says the last entry wins, as with most JSON
    /// object readers; a client re-sending a topic with a newer id replayed from the old one.
    #[test]
    fn duplicate_offset_keys_last_entry_wins() {
        let text = r#"{"type":"subscribe","topics":["a"],"offset":{"a":"1-0","a":"2-0"}}"#;
        let Ok(ClientMessage::Subscribe { offset, .. }) = protocol::parse_client_message(text, 10)
        else {
            panic!("a valid subscribe");
        };
        assert_eq!(
            start_for(&offset, "a"),
            Ok(StartAt::After(MessageId::new(2, 0)))
        );
        let text = r#"{"type":"subscribe","topics":["a"],"offset":{"a":"bad","a":"earliest"}}"#;
        let Ok(ClientMessage::Subscribe { offset, .. }) = protocol::parse_client_message(text, 10)
        else {
            panic!("a valid subscribe");
        };
        assert_eq!(start_for(&offset, "a"), Ok(StartAt::Earliest));
        assert_eq!(start_for(&offset, "unlisted"), Ok(StartAt::Last));
    }
}
