//! Server-Sent Events, sans-IO: the event framing, event ids and resume positions.
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
//!
//! Nothing here touches a socket: the stream runs in [`crate::net::sse`], its request is
//! parsed in `crate::http::handlers::events`.

use crate::topic::TopicMap;
use std::sync::Arc;

use bytes::BytesMut;

use crate::delivery::{Gap, StartAt};
use crate::http::error::ApiError;
use crate::store::message::MessageId;

/// A validated event-stream request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SseRequest {
    /// Each topic (named once, in request order) with where the stream starts it.
    pub topics: Vec<(String, StartAt)>,
    /// Who opened the stream, when authentication is on: its token's expiry or revocation
    /// ends the stream.
    pub principal: Option<crate::auth::Principal>,
}

impl SseRequest {
    /// The same stream on the principal's stored topic names (its namespace).
    /// Refused when `read` is not granted on one of them.
    pub fn in_namespace_of(
        mut self,
        principal: &crate::auth::Principal,
    ) -> Result<SseRequest, crate::auth::AuthError> {
        for (topic, _) in &mut self.topics {
            *topic = principal.into_topic(crate::auth::Permission::Read, std::mem::take(topic))?;
        }
        self.principal = Some(principal.clone());
        Ok(self)
    }

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

pub(crate) fn invalid_position() -> ApiError {
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
        out.extend_from_slice(crate::topic::public_name(topic).as_bytes());
        out.push(b'=');
        id.write_to(out);
    }
}

/// A multi-topic stream's positions, in request order (what its event ids say). Each topic's
/// `topic=id` text is kept rendered and redone only when that topic moves: an event's id line
/// is then one copy per topic, not one id formatting per topic.
pub struct Positions {
    topics: Vec<(Arc<str>, Option<MessageId>)>,
    /// `topic=id` per topic (empty while it has no position), same order as `topics`.
    rendered: Vec<Vec<u8>>,
    index: TopicMap<Arc<str>, usize>,
}

impl Positions {
    pub fn new(request: &SseRequest) -> Positions {
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
    pub fn advance(&mut self, topic: &str, id: MessageId) {
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
    pub fn write_id_line(&self, out: &mut BytesMut) {
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

/// The shared event without its first line (`id: <message id>`), for a stream that writes
/// its own id line.
pub fn without_id_line(event: &[u8]) -> &[u8] {
    match event.iter().position(|&b| b == b'\n') {
        Some(end) if event.starts_with(b"id: ") => event.get(end + 1..).unwrap_or_default(),
        _ => event,
    }
}

pub fn write_gap(out: &mut BytesMut, gap: &Gap) {
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
            principal: None,
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
            principal: None,
            topics: vec![("a".into(), StartAt::Earliest)],
        };
        out.clear();
        Positions::new(&none).write_id_line(&mut out);
        assert!(out.is_empty());
    }
}
