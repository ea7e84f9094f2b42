//! Server-Sent Events: `GET /api/v1/topics/{topic}/events` and `GET /api/v1/events?topics=a,b`.
//!
//! A `text/event-stream` response that stays open: each message is an event whose `data:` is
//! the message JSON and whose `id:` is where the stream stands after it, so a browser's
//! `EventSource` resumes by itself (it sends the last `id:` back as `Last-Event-ID` when it
//! reconnects). On one topic the id is the message id. On several it names every topic's
//! position, `id: a=1700000000000-0,b=1700000000001-3` ([`Position`]): topics on different
//! shards arrive interleaved in no fixed id order, so no single id says what was seen. A
//! topic with no position yet (nothing delivered, and it had no message when the stream
//! followed it) is left out, and a resume reads it from its oldest retained message. A topic
//! followed from "now" gets its position (its last id then) when it is followed, so a resume
//! misses nothing published to it meanwhile. `Last-Event-ID` and `?since=` take either form;
//! a plain id on several topics resumes every topic after it (the old meaning).
//!
//! Only the `id:` line is per stream: the `event:`/`data:` lines are encoded once per shard
//! and shared, as for every transport. A comment line every `sse.heartbeat_interval` keeps
//! proxies from timing the stream out and finds dead clients (the write fails). A consumer
//! that falls `sse.max_queued_bytes` behind is disconnected and resumes from its last id. The
//! response is close-delimited (no Content-Length, no chunked framing): the stream ends when
//! the connection does.

use std::cell::RefCell;
use std::collections::HashMap;
use std::rc::Rc;
use std::sync::Arc;

use bytes::BytesMut;
use futures::future::{join, select, Either};
use futures_lite::AsyncWriteExt;
use glommio::net::TcpStream;

use super::sink::{Delivered, SinkState};
use super::{follow, record_delivered, unfollow_all, Gap, OnDrop, StartAt};
use crate::http::codec::Request;
use crate::http::error::ApiError;
use crate::metrics::Egress;
use crate::shard::{Shard, ShardError};
use crate::store::hot_tier::{Order, PageQuery};
use crate::store::message::MessageId;
use crate::store::BackendKind;

/// A validated event-stream request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SseRequest {
    /// Each topic (named once, in request order) with where the stream starts it.
    pub topics: Vec<(String, StartAt)>,
}

impl SseRequest {
    /// Several topics: event ids carry every topic's position.
    pub fn per_topic_ids(&self) -> bool {
        self.topics.len() > 1
    }
}

/// Where a consumer of one or more topics stands, as it sends it back to resume.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Position {
    /// `1700000000000-0`: after this id on every topic (a single-topic stream's event id, and
    /// the only form before per-topic ids).
    All(MessageId),
    /// `a=1700000000000-0,b=1700000000001-3`: after each named topic's id; a topic not named
    /// had no position and is read from its oldest retained message.
    PerTopic(Vec<(String, MessageId)>),
}

impl Position {
    /// Parses either form. Topic names are `[A-Za-z0-9._-]`, so `=` and `,` cannot occur in
    /// them. A topic named twice: the later entry wins.
    pub fn parse(text: &str, max_topic_len: usize) -> Result<Position, ApiError> {
        // Strict, like every id the relay reads: no whitespace (a header's surrounding
        // whitespace is not part of its value and is gone before this).
        if !text.contains('=') {
            return text
                .parse()
                .map(Position::All)
                .map_err(|_| invalid_position());
        }
        let mut entries: Vec<(String, MessageId)> = Vec::new();
        for item in text.split(',') {
            let (topic, id) = item.split_once('=').ok_or_else(invalid_position)?;
            crate::topic::validate(topic, max_topic_len).map_err(|_| invalid_position())?;
            let id: MessageId = id.parse().map_err(|_| invalid_position())?;
            entries.retain(|(t, _)| t != topic);
            entries.push((topic.to_owned(), id));
        }
        Ok(Position::PerTopic(entries))
    }

    /// Where `topic` starts when resuming from this position.
    pub fn start_for(&self, topic: &str) -> StartAt {
        match self {
            Position::All(id) => StartAt::After(*id),
            Position::PerTopic(entries) => entries
                .iter()
                .find(|(t, _)| t == topic)
                .map_or(StartAt::Earliest, |(_, id)| StartAt::After(*id)),
        }
    }
}

fn invalid_position() -> ApiError {
    ApiError::invalid_cursor(
        "`since` / Last-Event-ID must be a message id such as 1700000000000-0, or one per \
         topic such as a=1700000000000-0,b=1700000000001-3",
    )
}

/// Writes `topic=id` for every topic with a position, comma-separated (the per-topic form of
/// [`Position`]).
pub fn write_positions<'a>(
    out: &mut Vec<u8>,
    positions: impl IntoIterator<Item = (&'a str, Option<MessageId>)>,
) {
    let mut first = true;
    for (topic, id) in positions {
        let Some(id) = id else { continue };
        if !first {
            out.push(b',');
        }
        first = false;
        out.extend_from_slice(topic.as_bytes());
        out.push(b'=');
        id.write_to(out);
    }
}

/// The position of `topic` "now", for a consumer that registered its interest just before:
/// every message after the returned id reaches it live. The owner's memory answers in the
/// registering step; a Valkey topic it does not know (not written since start) is asked of
/// Valkey (its newest retained entry). The consumer must then ignore live messages at or
/// before the answer ([`Sink::seen_up_to`](super::sink::Sink::seen_up_to)): those count as
/// published before it came. `None`: the topic holds nothing.
pub async fn position_now(shard: &Shard, topic: &str) -> Result<Option<MessageId>, ShardError> {
    let page = shard
        .subscribe_read(topic, crate::shard::ReplayQuery::register_only())
        .await?;
    position_from(shard, topic, page.last_id).await
}

/// [`position_now`] given the owner's answer to a registration (`ReplayPage::last_id`).
pub async fn position_from(
    shard: &Shard,
    topic: &str,
    owner_knows: Option<MessageId>,
) -> Result<Option<MessageId>, ShardError> {
    if owner_knows.is_some() || shard.storage.backend() == BackendKind::Memory {
        return Ok(owner_knows);
    }
    let newest = shard
        .read(topic.to_owned(), PageQuery::new(None, Order::Desc, 1))
        .await?;
    Ok(newest.and_then(|page| page.messages.first().map(|m| m.id)))
}

/// Builds the stream request from the path's topic (if any), `?topics=`, and the resume point:
/// the `Last-Event-ID` header (what `EventSource` sends on reconnect) or `?since=`, in either
/// [`Position`] form. A topic named twice is followed once.
pub fn parse(
    request: &Request,
    path_topic: Option<String>,
    max_topics: usize,
    max_topic_len: usize,
) -> Result<SseRequest, ApiError> {
    let mut topics: Vec<String> = path_topic.into_iter().collect();
    let mut since = None;
    for (key, value) in crate::http::router::query_pairs(request.query()) {
        match &*key {
            "topics" | "topic" => crate::http::router::split_topics(&value, &mut topics),
            "since" if !value.is_empty() => since = Some(value.into_owned()),
            _ => {}
        }
    }
    if let Some(header) = request.header("last-event-id") {
        let header = std::str::from_utf8(header).map_err(|_| invalid_position())?;
        if !header.trim().is_empty() {
            since = Some(header.trim().to_owned());
        }
    }
    let mut seen = std::collections::HashSet::new();
    topics.retain(|t| seen.insert(t.clone()));
    if topics.is_empty() || topics.len() > max_topics {
        return Err(ApiError::invalid_request(format!(
            "name 1 to {max_topics} topics"
        )));
    }
    for topic in &topics {
        crate::topic::validate(topic, max_topic_len)?;
    }
    let position = since
        .map(|text| Position::parse(&text, max_topic_len))
        .transpose()?;
    let topics = topics
        .into_iter()
        .map(|topic| {
            let start = position
                .as_ref()
                .map_or(StartAt::Last, |p| p.start_for(&topic));
            (topic, start)
        })
        .collect();
    Ok(SseRequest { topics })
}

/// A multi-topic stream's positions, in request order (what its event ids say). Each topic's
/// `topic=id` text is kept rendered and redone only when that topic moves: an event's id line
/// is then one copy per topic, not one id formatting per topic.
struct Positions {
    topics: Vec<(Arc<str>, Option<MessageId>)>,
    /// `topic=id` per topic (empty while it has no position), same order as `topics`.
    rendered: Vec<Vec<u8>>,
    index: HashMap<Arc<str>, usize>,
}

impl Positions {
    fn new(request: &SseRequest) -> Positions {
        let topics: Vec<(Arc<str>, Option<MessageId>)> = request
            .topics
            .iter()
            .map(|(topic, start)| {
                let at = match start {
                    StartAt::After(id) => Some(*id),
                    StartAt::Earliest | StartAt::Last => None,
                };
                (Arc::from(topic.as_str()), at)
            })
            .collect();
        let rendered = topics
            .iter()
            .map(|(topic, at)| {
                let mut text = Vec::new();
                write_positions(&mut text, [(&**topic, *at)]);
                text
            })
            .collect();
        let index = topics
            .iter()
            .enumerate()
            .map(|(i, (t, _))| (t.clone(), i))
            .collect();
        Positions {
            topics,
            rendered,
            index,
        }
    }

    /// `topic` has been delivered up to `id` (positions only move forward).
    fn advance(&mut self, topic: &str, id: MessageId) {
        let Some(&i) = self.index.get(topic) else {
            return;
        };
        let (Some((name, at)), Some(text)) = (self.topics.get_mut(i), self.rendered.get_mut(i))
        else {
            return;
        };
        if at.is_none_or(|at| at < id) {
            *at = Some(id);
            text.clear();
            write_positions(text, [(&**name, Some(id))]);
        }
    }

    /// `id: a=..,b=..\n`, or nothing while no topic has a position.
    fn write_id_line(&self, out: &mut BytesMut) {
        let mut first = true;
        for text in self.rendered.iter().filter(|t| !t.is_empty()) {
            out.extend_from_slice(if first { b"id: " } else { b"," });
            out.extend_from_slice(text);
            first = false;
        }
        if !first {
            out.extend_from_slice(b"\n");
        }
    }
}

/// Messages written per batch: bounds one write's size while a backlog drains.
const WRITE_BATCH: usize = 256;

/// Streams events until the client goes away, falls too far behind, or the shard shuts down.
pub async fn run(shard: &Shard, mut stream: TcpStream, request: SseRequest) {
    let config = &shard.config.sse;
    let mut head = BytesMut::with_capacity(256);
    head.extend_from_slice(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nCache-Control: no-cache\r\nX-Accel-Buffering: no\r\nServer: pulsar-relay\r\nDate: ");
    shard.with_date(|date| head.extend_from_slice(date.header_value()));
    head.extend_from_slice(b"\r\nConnection: close\r\n\r\nretry: 2000\n\n");
    if stream.write_all(&head).await.is_err() {
        return;
    }
    shard.metrics.event_stream_opened(1);
    let _open = OnDrop(|| shard.metrics.event_stream_opened(-1));
    let sink = shard.delivery.new_sink(config.max_queued_bytes);
    // Shared by the followers (a gap event names the stream's position) and the writer
    // (which moves it as it writes); `None` on a single-topic stream, whose ids are plain.
    let positions = request
        .per_topic_ids()
        .then(|| RefCell::new(Positions::new(&request)));
    let followers = async {
        for (topic, start) in &request.topics {
            let name: Arc<str> = Arc::from(topic.as_str());
            let mut on_gap = |gap: Gap| {
                let mut event = BytesMut::new();
                if let Some(positions) = &positions {
                    // Gap events are the only control events of a stream, written before
                    // anything queued after them: the position now is the one they follow.
                    positions.borrow().write_id_line(&mut event);
                }
                write_gap(&mut event, &gap);
                sink.push_control(event.freeze());
            };
            if let Err(e) = follow(shard, &sink, name.clone(), *start, &mut on_gap).await {
                tracing::debug!(error = %e, "event stream could not follow its topics");
                sink.close();
                return;
            }
            if let (Some(positions), StartAt::Last) = (&positions, start) {
                // A topic followed from now gets a position at once: a resume must not read
                // it from its oldest message, nor miss what is published to it meanwhile.
                match position_now(shard, topic).await {
                    Ok(Some(now)) => {
                        sink.seen_up_to(topic, now);
                        positions.borrow_mut().advance(topic, now);
                    }
                    Ok(None) => {}
                    Err(e) => {
                        tracing::debug!(error = %e, "event stream could not place a topic");
                        sink.close();
                        return;
                    }
                }
            }
        }
    };
    let writer = async {
        let mut out = BytesMut::with_capacity(4096);
        let mut batch: Vec<Rc<Delivered>> = Vec::with_capacity(WRITE_BATCH);
        loop {
            sink.take_control(&mut out);
            batch.clear();
            sink.take(&mut batch, WRITE_BATCH);
            if !batch.is_empty() {
                record_delivered(shard, Egress::Sse, &batch);
            }
            match &positions {
                None => {
                    for d in &batch {
                        out.extend_from_slice(d.sse_event());
                    }
                }
                Some(positions) => {
                    let mut positions = positions.borrow_mut();
                    for d in &batch {
                        positions.advance(&d.topic, d.id());
                        positions.write_id_line(&mut out);
                        out.extend_from_slice(without_id_line(d.sse_event()));
                    }
                }
            }
            if !out.is_empty() {
                if super::write_or_give_up(&mut stream, &out, &sink)
                    .await
                    .is_err()
                {
                    // Cut off while its write was blocked: a slow consumer too.
                    if sink.state() == SinkState::Overflowed {
                        shard.metrics.slow_consumer_disconnect();
                    }
                    return;
                }
                out.clear();
                continue;
            }
            if sink.state() != SinkState::Open {
                if sink.state() == SinkState::Overflowed {
                    shard.metrics.slow_consumer_disconnect();
                }
                return;
            }
            let ready = Box::pin(sink.ready());
            let heartbeat = Box::pin(glommio::timer::sleep(config.heartbeat_interval));
            let idle = select(ready, heartbeat);
            match select(idle, Box::pin(shard.shutdown.wait())).await {
                Either::Left((Either::Left(_), _)) => {}
                Either::Left((Either::Right(_), _)) => out.extend_from_slice(b": ping\n\n"),
                Either::Right(_) => return,
            }
        }
    };
    join(followers, async {
        writer.await;
        // The client is gone or cut off: stop the followers' flow control from waiting.
        sink.close();
    })
    .await;
    unfollow_all(shard, &sink);
    let _ = stream.close().await;
}

/// The shared event without its first line (`id: <message id>`), for a stream that writes
/// its own id line.
fn without_id_line(event: &[u8]) -> &[u8] {
    match event.iter().position(|&b| b == b'\n') {
        Some(end) if event.starts_with(b"id: ") => event.get(end + 1..).unwrap_or_default(),
        _ => event,
    }
}

fn write_gap(out: &mut BytesMut, gap: &Gap) {
    let mut data = Vec::with_capacity(96);
    gap.write_json(&mut data);
    out.extend_from_slice(b"event: gap\ndata: ");
    out.extend_from_slice(&data);
    out.extend_from_slice(b"\n\n");
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(ms: u64, seq: u64) -> MessageId {
        MessageId::new(ms, seq)
    }

    #[test]
    fn positions_parse_in_both_forms() {
        assert_eq!(Position::parse("5-1", 255), Ok(Position::All(id(5, 1))));
        let p = Position::parse("a=5-1,b.c_d-e=7-0", 255).expect("per topic");
        assert_eq!(p.start_for("a"), StartAt::After(id(5, 1)));
        assert_eq!(p.start_for("b.c_d-e"), StartAt::After(id(7, 0)));
        assert_eq!(p.start_for("other"), StartAt::Earliest);
        assert_eq!(
            Position::All(id(3, 0)).start_for("x"),
            StartAt::After(id(3, 0))
        );
        // The later entry of a topic named twice wins.
        let p = Position::parse("a=1-0,a=2-0", 255).expect("per topic");
        assert_eq!(p, Position::PerTopic(vec![("a".into(), id(2, 0))]));
        for bad in [
            "",
            "x",
            "a=",
            "=1-0",
            "a=1-0,",
            "a=1-0,,b=2-0",
            "a b=1-0",
            "a=1-0=2",
            "a=1-0;b=2-0",
            "a=-1",
            "ab=1-0",
            " 5-1",
            "5-1 ",
            "a=5-1, b=6-0",
            "a =5-1",
            "a=5-1\r\n",
        ] {
            let limit = if bad == "ab=1-0" { 1 } else { 255 };
            let e = Position::parse(bad, limit).expect_err(bad);
            assert_eq!(e.status, 400, "{bad}");
        }
    }

    #[test]
    fn positions_print_as_they_parse() {
        let mut out = Vec::new();
        write_positions(
            &mut out,
            [("a", Some(id(5, 1))), ("b", None), ("c", Some(id(7, 0)))],
        );
        assert_eq!(out, b"a=5-1,c=7-0");
        let p = Position::parse(std::str::from_utf8(&out).unwrap_or_default(), 255);
        assert_eq!(
            p,
            Ok(Position::PerTopic(vec![
                ("a".into(), id(5, 1)),
                ("c".into(), id(7, 0))
            ]))
        );
        out.clear();
        write_positions(&mut out, [("a", None)]);
        assert!(out.is_empty());
    }

    #[test]
    fn a_multi_topic_stream_writes_its_own_id_line_and_shares_the_rest() {
        let request = SseRequest {
            topics: vec![
                ("a".into(), StartAt::After(id(1, 0))),
                ("b".into(), StartAt::Last),
            ],
        };
        let mut positions = Positions::new(&request);
        let mut out = BytesMut::new();
        positions.write_id_line(&mut out);
        assert_eq!(&out[..], b"id: a=1-0\n");
        positions.advance("b", id(4, 2));
        positions.advance("a", id(3, 0));
        positions.advance("a", id(2, 0)); // never backwards
        positions.advance("unknown", id(9, 9));
        out.clear();
        positions.write_id_line(&mut out);
        assert_eq!(&out[..], b"id: a=3-0,b=4-2\n");
        let shared = b"id: 4-2\nevent: message\ndata: {}\n\n";
        assert_eq!(without_id_line(shared), b"event: message\ndata: {}\n\n");
        assert_eq!(without_id_line(b"event: x\n\n"), b"event: x\n\n");
        let none = SseRequest {
            topics: vec![("a".into(), StartAt::Earliest)],
        };
        out.clear();
        Positions::new(&none).write_id_line(&mut out);
        assert!(out.is_empty());
    }
}
