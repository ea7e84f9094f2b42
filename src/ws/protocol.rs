//! The JSON messages of the relay's WebSocket protocol: parsing what clients send and writing
//! what the server sends, as compact JSON text for [`super::codec`] to frame.
//!
//! Owns message *shape*: required fields, their JSON types, the `offset` forms, the topic count
//! limit, and the error codes for malformed messages. Does not own meaning: topic-name rules,
//! message-id syntax, whether an id still exists, and sessions belong to the relay. The
//! `message` frame's body is the relay's shared message JSON; this module only supplies the
//! prefix it is spliced after ([`MESSAGE_PREFIX`]).
//!
//! Client → server (unknown fields are ignored):
//! - `{"type":"subscribe","topics":[..],"client_id"?:str,"offset"?:"last"|"earliest"|"<id>"|{"<topic>":"<id>",..}}`
//! - `{"type":"unsubscribe","topics":[..]}`
//! - `{"type":"ack","message_id":str}`
//! - `{"type":"ping"}`
//! - `{"type":"auth","token":str}`: a fresh access token for the session (authentication on)

use std::fmt;

use serde::de::{self, IgnoredAny, MapAccess, Visitor};
use serde::{Deserialize, Deserializer};

/// A parsed client message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClientMessage {
    Subscribe {
        topics: Vec<String>,
        client_id: Option<String>,
        offset: Offset,
        /// Consume as a member of a consumer group (a work queue) instead of every message.
        group: Option<GroupSubscription>,
    },
    Unsubscribe {
        topics: Vec<String>,
        /// Stop the group consumers of these topics (not the plain subscriptions).
        group: Option<String>,
    },
    /// The legacy acknowledgement of a plain subscription: counted only.
    Ack {
        message_id: String,
    },
    /// `{"type":"ack"|"nack","topic","group","ids":[..]}`: settles (or releases) messages
    /// of a group.
    GroupAck {
        topic: String,
        group: String,
        ids: Vec<String>,
        nack: bool,
    },
    Ping,
    /// `{"type":"auth","token":"<access token>"}`: a fresh token for the session, before the
    /// one it opened with expires.
    Auth {
        token: String,
    },
}

/// The group part of a `subscribe`: `"group"`, `"consumer"`, `"max_in_flight"` (names are
/// checked by the session, which answers their errors as subscription errors).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GroupSubscription {
    pub group: String,
    pub consumer: String,
    pub max_in_flight: usize,
}

/// `max_in_flight` of a group subscription that does not say.
pub const DEFAULT_MAX_IN_FLIGHT: usize = 10;
/// The largest `max_in_flight`.
pub const MAX_MAX_IN_FLIGHT: usize = 10_000;
/// Most ids one group `ack`/`nack` may name.
pub const MAX_ACK_IDS: usize = 1000;

/// Where a subscription starts, as the client asked. Use [`Offset::for_topic`] to resolve it
/// for one topic.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum Offset {
    /// Only messages published from now on (also when `offset` is absent or `null`).
    #[default]
    Last,
    /// Everything still retained.
    Earliest,
    /// Messages after this id, for every topic of the request.
    After(String),
    /// `(topic, value)` pairs in the order sent; each value is an id, `"last"` or
    /// `"earliest"`. Topics not listed start at `Last`; pairs naming topics outside the
    /// request's `topics` are kept here but never looked up.
    PerTopic(Vec<(String, String)>),
}

/// An [`Offset`] resolved for one topic.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StartAt<'a> {
    Last,
    Earliest,
    After(&'a str),
}

impl Offset {
    /// Where `topic`'s subscription starts. With a per-topic object naming a topic twice, the
    /// last entry wins, as with most JSON object readers.
    pub fn for_topic(&self, topic: &str) -> StartAt<'_> {
        match self {
            Offset::Last => StartAt::Last,
            Offset::Earliest => StartAt::Earliest,
            Offset::After(id) => StartAt::After(id),
            Offset::PerTopic(pairs) => pairs
                .iter()
                .rev()
                .find(|(t, _)| t == topic)
                .map_or(StartAt::Last, |(_, value)| start_at(value)),
        }
    }
}

fn start_at(value: &str) -> StartAt<'_> {
    match value {
        "last" => StartAt::Last,
        "earliest" => StartAt::Earliest,
        id => StartAt::After(id),
    }
}

/// A client message that could not be parsed. The relay answers with an `error` frame
/// ([`write_error`] with [`code`](Self::code) and [`message`](Self::message)) and keeps the
/// socket open.
#[derive(Debug, thiserror::Error)]
pub enum ProtocolError {
    #[error("invalid JSON: {0}")]
    InvalidJson(serde_json::Error),
    /// `type` missing, not a string, or not one we know. The offending value is not echoed:
    /// it is client-controlled and may be large.
    #[error("missing or unknown message type; expected subscribe, unsubscribe, ack or ping")]
    UnknownType,
    /// Valid JSON of the wrong shape; the text names the field.
    #[error("{0}")]
    InvalidRequest(String),
    #[error("{count} topics in one request; at most {max} are allowed")]
    TooManyTopics { count: usize, max: usize },
    /// Any failure of a `subscribe` command: code `SUBSCRIPTION_ERROR` (what clients of the
    /// Python relay look for), the specific code as its `reason`.
    #[error("{0}")]
    Subscription(Box<ProtocolError>),
}

impl ProtocolError {
    pub fn code(&self) -> &'static str {
        match self {
            ProtocolError::InvalidJson(_) => "INVALID_JSON",
            // The Python relay's code for it, which its clients match.
            ProtocolError::UnknownType => "UNKNOWN_MESSAGE_TYPE",
            ProtocolError::InvalidRequest(_) => "INVALID_REQUEST",
            ProtocolError::TooManyTopics { .. } => "TOO_MANY_TOPICS",
            ProtocolError::Subscription(_) => SUBSCRIPTION_ERROR,
        }
    }

    /// The specific code behind a [`ProtocolError::Subscription`].
    pub fn reason(&self) -> Option<&'static str> {
        match self {
            ProtocolError::Subscription(inner) => Some(inner.code()),
            _ => None,
        }
    }

    pub fn message(&self) -> String {
        self.to_string()
    }
}

/// Parses one client text message. `max_topics` bounds `topics` of subscribe and unsubscribe.
///
/// Two passes over the (small) text: the first reads only `type`, wherever it sits in the
/// object, so an unknown type is reported as `UNKNOWN_MESSAGE_TYPE` whatever its other fields hold;
/// the second reads the fields of that type. The alternative, a serde internally tagged enum,
/// buffers the whole object into an intermediate tree and reports an unknown type only as an
/// error string we would have to pattern-match.
pub fn parse_client_message(text: &str, max_topics: usize) -> Result<ClientMessage, ProtocolError> {
    // serde derives also accept a JSON array for a struct (fields by position); only an object
    // is a message.
    if !text
        .trim_start_matches([' ', '\t', '\n', '\r'])
        .starts_with('{')
    {
        return Err(match serde_json::from_str::<IgnoredAny>(text) {
            Ok(_) => ProtocolError::InvalidRequest("a message must be a JSON object".into()),
            Err(e) => ProtocolError::InvalidJson(e),
        });
    }
    let probe: TypeProbe = serde_json::from_str(text).map_err(shape_error)?;
    match probe.kind {
        Some(TypeField::Known(Kind::Subscribe)) => {
            let subscription = |e: ProtocolError| ProtocolError::Subscription(Box::new(e));
            let wire: SubscribeWire = serde_json::from_str(text)
                .map_err(shape_error)
                .map_err(subscription)?;
            let group = match (wire.group, wire.consumer, wire.max_in_flight) {
                (None, None, None) => None,
                (Some(group), Some(consumer), max_in_flight) => {
                    let max_in_flight = match max_in_flight {
                        None => DEFAULT_MAX_IN_FLIGHT,
                        Some(n) if (1..=MAX_MAX_IN_FLIGHT as u64).contains(&n) => n as usize,
                        Some(_) => {
                            return Err(subscription(ProtocolError::InvalidRequest(format!(
                                "\"max_in_flight\" is an integer from 1 to {MAX_MAX_IN_FLIGHT}"
                            ))))
                        }
                    };
                    Some(GroupSubscription {
                        group,
                        consumer,
                        max_in_flight,
                    })
                }
                (None, _, _) => {
                    return Err(subscription(ProtocolError::InvalidRequest(
                        "\"consumer\" and \"max_in_flight\" need \"group\"".into(),
                    )))
                }
                (Some(_), None, _) => {
                    return Err(subscription(ProtocolError::InvalidRequest(
                        "a group subscription needs \"consumer\", the consumer's name".into(),
                    )))
                }
            };
            Ok(ClientMessage::Subscribe {
                topics: check_topics(wire.topics, max_topics).map_err(subscription)?,
                client_id: wire.client_id,
                offset: wire.offset.unwrap_or_default(),
                group,
            })
        }
        Some(TypeField::Known(Kind::Unsubscribe)) => {
            let wire: UnsubscribeWire = serde_json::from_str(text).map_err(shape_error)?;
            Ok(ClientMessage::Unsubscribe {
                topics: check_topics(wire.topics, max_topics)?,
                group: wire.group,
            })
        }
        Some(TypeField::Known(kind @ (Kind::Ack | Kind::Nack))) => {
            let wire: AckWire = serde_json::from_str(text).map_err(shape_error)?;
            let nack = matches!(kind, Kind::Nack);
            match (wire.group, nack) {
                (None, false) => {
                    let message_id = wire.message_id.ok_or_else(|| {
                        ProtocolError::InvalidRequest("ack needs \"message_id\", a string".into())
                    })?;
                    Ok(ClientMessage::Ack { message_id })
                }
                (None, true) => Err(ProtocolError::InvalidRequest(
                    "nack needs \"topic\", \"group\" and \"ids\"".into(),
                )),
                (Some(group), nack) => {
                    let topic = wire.topic.ok_or_else(|| {
                        ProtocolError::InvalidRequest("a group ack needs \"topic\"".into())
                    })?;
                    let ids = wire.ids.ok_or_else(|| {
                        ProtocolError::InvalidRequest(
                            "a group ack needs \"ids\", an array of message ids".into(),
                        )
                    })?;
                    if ids.len() > MAX_ACK_IDS {
                        return Err(ProtocolError::InvalidRequest(format!(
                            "at most {MAX_ACK_IDS} ids at once"
                        )));
                    }
                    Ok(ClientMessage::GroupAck {
                        topic,
                        group,
                        ids,
                        nack,
                    })
                }
            }
        }
        Some(TypeField::Known(Kind::Ping)) => Ok(ClientMessage::Ping),
        Some(TypeField::Known(Kind::Auth)) => {
            let wire: AuthWire = serde_json::from_str(text).map_err(shape_error)?;
            let token = wire.token.filter(|t| !t.is_empty()).ok_or_else(|| {
                ProtocolError::InvalidRequest("auth needs \"token\", a string".into())
            })?;
            Ok(ClientMessage::Auth { token })
        }
        Some(TypeField::Known(Kind::Unknown) | TypeField::Other(_)) | None => {
            Err(ProtocolError::UnknownType)
        }
    }
}

/// A syntax error means invalid JSON (only the first pass can meet one, both read the same
/// text); anything else is valid JSON of the wrong shape: a field of the wrong type or a
/// duplicate field.
fn shape_error(e: serde_json::Error) -> ProtocolError {
    if e.is_syntax() || e.is_eof() {
        ProtocolError::InvalidJson(e)
    } else {
        ProtocolError::InvalidRequest(e.to_string())
    }
}

fn check_topics(topics: Option<Vec<String>>, max: usize) -> Result<Vec<String>, ProtocolError> {
    let topics = topics.ok_or_else(|| {
        ProtocolError::InvalidRequest("\"topics\" is required: an array of topic names".into())
    })?;
    if topics.is_empty() {
        return Err(ProtocolError::InvalidRequest(
            "\"topics\" must name at least one topic".into(),
        ));
    }
    if topics.len() > max {
        return Err(ProtocolError::TooManyTopics {
            count: topics.len(),
            max,
        });
    }
    Ok(topics)
}

#[derive(Deserialize)]
struct TypeProbe {
    #[serde(rename = "type")]
    kind: Option<TypeField>,
}

/// Accepts any JSON value for `type`, so a non-string one is `UNKNOWN_MESSAGE_TYPE`, not a type error.
#[derive(Deserialize)]
#[serde(untagged)]
enum TypeField {
    Known(Kind),
    Other(#[allow(dead_code)] IgnoredAny),
}

#[derive(Deserialize)]
#[serde(rename_all = "lowercase")]
enum Kind {
    Subscribe,
    Unsubscribe,
    Ack,
    Nack,
    Ping,
    Auth,
    #[serde(other)]
    Unknown,
}

#[derive(Deserialize)]
struct AuthWire {
    token: Option<String>,
}

/// Fields are `Option` so a missing one gets our message instead of serde's.
#[derive(Deserialize)]
struct SubscribeWire {
    topics: Option<Vec<String>>,
    client_id: Option<String>,
    offset: Option<Offset>,
    group: Option<String>,
    consumer: Option<String>,
    max_in_flight: Option<u64>,
}

#[derive(Deserialize)]
struct UnsubscribeWire {
    topics: Option<Vec<String>>,
    group: Option<String>,
}

#[derive(Deserialize)]
struct AckWire {
    message_id: Option<String>,
    topic: Option<String>,
    group: Option<String>,
    ids: Option<Vec<String>>,
}

/// `"last"`, `"earliest"`, any other string (an id), or an object of topic → string; anything
/// else is an `INVALID_REQUEST`. `null` never reaches here (the field is an `Option`).
impl<'de> Deserialize<'de> for Offset {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct OffsetVisitor;

        impl<'de> Visitor<'de> for OffsetVisitor {
            type Value = Offset;

            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str(
                    "\"offset\" as \"last\", \"earliest\", a message id, or an object of topic to message id",
                )
            }

            fn visit_str<E: de::Error>(self, value: &str) -> Result<Offset, E> {
                Ok(match value {
                    "last" => Offset::Last,
                    "earliest" => Offset::Earliest,
                    id => Offset::After(id.to_owned()),
                })
            }

            fn visit_map<M: MapAccess<'de>>(self, mut map: M) -> Result<Offset, M::Error> {
                let mut pairs = Vec::with_capacity(map.size_hint().unwrap_or(0).min(64));
                while let Some(pair) = map.next_entry::<String, String>()? {
                    pairs.push(pair);
                }
                Ok(Offset::PerTopic(pairs))
            }
        }

        deserializer.deserialize_any(OffsetVisitor)
    }
}

// ---- server → client ----

/// The start of every `message` frame's text. The relay appends the shared message object's
/// fields after it, i.e. the stored message JSON (`{"message_id":..,"topic":..,..}`) without
/// its opening `{`, giving `{"type":"message","message_id":..,..}`. With the codec that is
/// `text_frame_from_parts(&[MESSAGE_PREFIX, &message_json[1..]])`, built once per message and
/// shared by every subscriber; [`write_message`] does the same splice into a buffer.
pub const MESSAGE_PREFIX: &[u8] = b"{\"type\":\"message\",";

/// Appends `{"type":"message",<fields of message_object>}`. `message_object` is a non-empty
/// JSON object (the relay's stored message JSON); `{}` gives `{"type":"message"}`.
pub fn write_message(out: &mut Vec<u8>, message_object: &[u8]) {
    debug_assert!(
        message_object.first() == Some(&b'{'),
        "the message JSON must be an object"
    );
    let fields = message_object.strip_prefix(b"{").unwrap_or(message_object);
    if fields.trim_ascii_start().starts_with(b"}") {
        out.extend_from_slice(b"{\"type\":\"message\"}");
    } else {
        out.extend_from_slice(MESSAGE_PREFIX);
        out.extend_from_slice(fields);
    }
}

/// `{"type":"subscribed","topics":[..],"session_id":"..","timestamp":".."}`
pub fn write_subscribed(
    out: &mut Vec<u8>,
    topics: &[&str],
    session_id: &str,
    timestamp_rfc3339: &str,
) {
    out.extend_from_slice(b"{\"type\":\"subscribed\",\"topics\":");
    write_str_array(out, topics);
    out.extend_from_slice(b",\"session_id\":");
    write_str(out, session_id);
    out.extend_from_slice(b",\"timestamp\":");
    write_str(out, timestamp_rfc3339);
    out.push(b'}');
}

/// `{"type":"acked"|"nacked","topic":..,"group":..,"acked"|"nacked":[ids],"unknown":[ids]}`:
/// the answer to a group `ack`/`nack`, id by id.
pub fn write_group_settled(
    out: &mut Vec<u8>,
    nack: bool,
    topic: &str,
    group: &str,
    done: &[&str],
    unknown: &[&str],
) {
    let what = if nack { "nacked" } else { "acked" };
    out.extend_from_slice(b"{\"type\":");
    write_str(out, what);
    out.extend_from_slice(b",\"topic\":");
    write_str(out, topic);
    out.extend_from_slice(b",\"group\":");
    write_str(out, group);
    out.push(b',');
    write_str(out, what);
    out.push(b':');
    write_str_array(out, done);
    out.extend_from_slice(b",\"unknown\":");
    write_str_array(out, unknown);
    out.push(b'}');
}

/// `{"type":"subscribed","topics":[..],"group":..,"consumer":..,"max_in_flight":n,"session_id":..,"timestamp":..}`
pub fn write_group_subscribed(
    out: &mut Vec<u8>,
    topics: &[&str],
    group: &GroupSubscription,
    session_id: &str,
    timestamp_rfc3339: &str,
) {
    out.extend_from_slice(b"{\"type\":\"subscribed\",\"topics\":");
    write_str_array(out, topics);
    out.extend_from_slice(b",\"group\":");
    write_str(out, &group.group);
    out.extend_from_slice(b",\"consumer\":");
    write_str(out, &group.consumer);
    out.extend_from_slice(b",\"max_in_flight\":");
    out.extend_from_slice(itoa::Buffer::new().format(group.max_in_flight).as_bytes());
    out.extend_from_slice(b",\"session_id\":");
    write_str(out, session_id);
    out.extend_from_slice(b",\"timestamp\":");
    write_str(out, timestamp_rfc3339);
    out.push(b'}');
}

/// `{"type":"unsubscribed","topics":[..]}`
pub fn write_unsubscribed(out: &mut Vec<u8>, topics: &[&str]) {
    out.extend_from_slice(b"{\"type\":\"unsubscribed\",\"topics\":");
    write_str_array(out, topics);
    out.push(b'}');
}

/// `{"type":"pong","timestamp":".."}`
/// `{"type":"auth","expires_at":"<rfc3339>"}`: an in-band refresh was taken.
pub fn write_auth_ok(out: &mut Vec<u8>, expires_at_rfc3339: &str) {
    out.extend_from_slice(b"{\"type\":\"auth\",\"expires_at\":");
    write_str(out, expires_at_rfc3339);
    out.push(b'}');
}

pub fn write_pong(out: &mut Vec<u8>, timestamp_rfc3339: &str) {
    out.extend_from_slice(b"{\"type\":\"pong\",\"timestamp\":");
    write_str(out, timestamp_rfc3339);
    out.push(b'}');
}

/// `{"type":"error","code":"..","message":".."}`
pub fn write_error(out: &mut Vec<u8>, code: &str, message: &str) {
    out.extend_from_slice(b"{\"type\":\"error\",\"code\":");
    write_str(out, code);
    out.extend_from_slice(b",\"message\":");
    write_str(out, message);
    out.push(b'}');
}

/// The code of every failed `subscribe` (the Python relay's, which its clients match).
pub const SUBSCRIPTION_ERROR: &str = "SUBSCRIPTION_ERROR";

/// `{"type":"error","code":"SUBSCRIPTION_ERROR","reason":"<specific code>","message":…}`.
pub fn write_subscription_error(out: &mut Vec<u8>, reason: &str, message: &str) {
    out.extend_from_slice(b"{\"type\":\"error\",\"code\":\"SUBSCRIPTION_ERROR\",\"reason\":");
    write_str(out, reason);
    out.extend_from_slice(b",\"message\":");
    write_str(out, message);
    out.push(b'}');
}

fn write_str_array(out: &mut Vec<u8>, items: &[&str]) {
    out.push(b'[');
    for (i, item) in items.iter().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        write_str(out, item);
    }
    out.push(b']');
}

/// A JSON string literal, escaped by serde_json.
fn write_str(out: &mut Vec<u8>, s: &str) {
    // `Vec<u8>`'s `io::Write` never fails and a `str` always serializes, so this cannot
    // return an error; asserting in debug documents that rather than silently ignoring it.
    let written = serde_json::to_writer(&mut *out, s);
    debug_assert!(written.is_ok(), "serializing a str into a Vec cannot fail");
}

#[cfg(test)]
mod tests {
    use super::*;

    const MAX: usize = 3;

    fn parse(text: &str) -> ClientMessage {
        parse_client_message(text, MAX).unwrap_or_else(|e| panic!("{text}: {e}"))
    }

    fn code(text: &str) -> &'static str {
        match parse_client_message(text, MAX) {
            Ok(m) => panic!("{text} parsed as {m:?}"),
            Err(e) => {
                assert!(!e.message().is_empty());
                e.code()
            }
        }
    }

    fn subscribe(topics: &[&str], client_id: Option<&str>, offset: Offset) -> ClientMessage {
        ClientMessage::Subscribe {
            topics: topics.iter().map(|t| t.to_string()).collect(),
            client_id: client_id.map(str::to_owned),
            offset,
            group: None,
        }
    }

    #[test]
    fn subscribe_with_every_offset_form() {
        assert_eq!(
            parse(r#"{"type":"subscribe","topics":["a","b"]}"#),
            subscribe(&["a", "b"], None, Offset::Last)
        );
        assert_eq!(
            parse(r#"{"topics":["a"],"client_id":"c1","offset":null,"type":"subscribe"}"#),
            subscribe(&["a"], Some("c1"), Offset::Last)
        );
        assert_eq!(
            parse(r#"{"type":"subscribe","topics":["a"],"offset":"last"}"#),
            subscribe(&["a"], None, Offset::Last)
        );
        assert_eq!(
            parse(r#"{"type":"subscribe","topics":["a"],"offset":"earliest"}"#),
            subscribe(&["a"], None, Offset::Earliest)
        );
        assert_eq!(
            parse(r#"{"type":"subscribe","topics":["a"],"offset":"1700000000000-3"}"#),
            subscribe(&["a"], None, Offset::After("1700000000000-3".into()))
        );
        assert_eq!(
            parse(r#"{"type":"subscribe","topics":["a","b"],"offset":{"b":"5-0","a":"earliest"}}"#),
            subscribe(
                &["a", "b"],
                None,
                Offset::PerTopic(vec![
                    ("b".into(), "5-0".into()),
                    ("a".into(), "earliest".into())
                ])
            )
        );
    }

    #[test]
    fn offsets_resolve_per_topic() {
        let per_topic = Offset::PerTopic(vec![
            ("a".into(), "1-0".into()),
            ("b".into(), "earliest".into()),
            ("a".into(), "2-0".into()),
            ("c".into(), "last".into()),
        ]);
        assert_eq!(per_topic.for_topic("a"), StartAt::After("2-0"));
        assert_eq!(per_topic.for_topic("b"), StartAt::Earliest);
        assert_eq!(per_topic.for_topic("c"), StartAt::Last);
        assert_eq!(per_topic.for_topic("unlisted"), StartAt::Last);
        assert_eq!(
            Offset::After("9-9".into()).for_topic("x"),
            StartAt::After("9-9")
        );
        assert_eq!(Offset::Earliest.for_topic("x"), StartAt::Earliest);
        assert_eq!(Offset::Last.for_topic("x"), StartAt::Last);
    }

    #[test]
    fn other_messages_and_unknown_fields_ignored() {
        assert_eq!(
            parse(r#"{"type":"unsubscribe","topics":["a"],"extra":{"x":[1,2]}}"#),
            ClientMessage::Unsubscribe {
                topics: vec!["a".into()],
                group: None,
            }
        );
        assert_eq!(
            parse(r#" {"type":"ack","message_id":"1-2","n":1} "#),
            ClientMessage::Ack {
                message_id: "1-2".into()
            }
        );
        assert_eq!(parse(r#"{"type":"ping"}"#), ClientMessage::Ping);
        // Fields other types use are ignored on a ping, even if malformed.
        assert_eq!(parse(r#"{"type":"ping","topics":5}"#), ClientMessage::Ping);
        // Escaped strings are fine everywhere, including the type.
        assert_eq!(parse(r#"{"type":"p\u0069ng"}"#), ClientMessage::Ping);
        assert_eq!(
            parse(r#"{"type":"subscribe","topics":["a\"b","\u00e9"]}"#),
            subscribe(&["a\"b", "é"], None, Offset::Last)
        );
    }

    #[test]
    fn group_subscribe_ack_and_nack() {
        assert_eq!(
            parse(r#"{"type":"subscribe","topics":["a"],"group":"g","consumer":"c"}"#),
            ClientMessage::Subscribe {
                topics: vec!["a".into()],
                client_id: None,
                offset: Offset::Last,
                group: Some(GroupSubscription {
                    group: "g".into(),
                    consumer: "c".into(),
                    max_in_flight: DEFAULT_MAX_IN_FLIGHT,
                }),
            }
        );
        let limit = |n: u64| {
            parse_client_message(
                &format!(
                    r#"{{"type":"subscribe","topics":["a"],"group":"g","consumer":"c","max_in_flight":{n}}}"#
                ),
                10,
            )
        };
        assert!(limit(1).is_ok());
        assert!(limit(MAX_MAX_IN_FLIGHT as u64).is_ok());
        for n in [0, MAX_MAX_IN_FLIGHT as u64 + 1] {
            assert_eq!(
                limit(n).map_err(|e| e.reason()).err(),
                Some(Some("INVALID_REQUEST"))
            );
        }
        for text in [
            r#"{"type":"subscribe","topics":["a"],"group":"g"}"#,
            r#"{"type":"subscribe","topics":["a"],"consumer":"c"}"#,
            r#"{"type":"subscribe","topics":["a"],"group":"g","consumer":"c","max_in_flight":-1}"#,
            r#"{"type":"ack","group":"g","ids":["1-0"]}"#,
            r#"{"type":"ack","topic":"a","group":"g"}"#,
            r#"{"type":"nack","message_id":"1-0"}"#,
            r#"{"type":"nack","topic":"a","group":"g","ids":"1-0"}"#,
        ] {
            assert_eq!(specific_code(text), "INVALID_REQUEST", "{text}");
        }
        assert_eq!(
            parse(r#"{"type":"nack","topic":"a","group":"g","ids":["1-0","2-0"]}"#),
            ClientMessage::GroupAck {
                topic: "a".into(),
                group: "g".into(),
                ids: vec!["1-0".into(), "2-0".into()],
                nack: true,
            }
        );
        let many: Vec<String> = (0..=MAX_ACK_IDS).map(|i| format!("\"{i}-0\"")).collect();
        let text = format!(
            r#"{{"type":"ack","topic":"a","group":"g","ids":[{}]}}"#,
            many.join(",")
        );
        assert_eq!(specific_code(&text), "INVALID_REQUEST");
        assert_eq!(
            parse(r#"{"type":"unsubscribe","topics":["a"],"group":"g"}"#),
            ClientMessage::Unsubscribe {
                topics: vec!["a".into()],
                group: Some("g".into()),
            }
        );
        assert_eq!(
            written(|out| write_group_settled(out, false, "a", "g", &["1-0"], &["2-0"])),
            r#"{"type":"acked","topic":"a","group":"g","acked":["1-0"],"unknown":["2-0"]}"#
        );
    }

    #[test]
    fn topic_count_limit_is_inclusive() {
        assert!(parse_client_message(r#"{"type":"subscribe","topics":["a","b","c"]}"#, 3).is_ok());
        match parse_client_message(r#"{"type":"subscribe","topics":["a","b","c","d"]}"#, 3) {
            Err(e @ ProtocolError::Subscription(_)) => {
                assert!(matches!(
                    &e,
                    ProtocolError::Subscription(inner)
                        if matches!(**inner, ProtocolError::TooManyTopics { count: 4, max: 3 })
                ));
                assert_eq!(e.code(), "SUBSCRIPTION_ERROR");
                assert_eq!(e.reason(), Some("TOO_MANY_TOPICS"));
                assert_eq!(
                    e.message(),
                    "4 topics in one request; at most 3 are allowed"
                );
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(
            code(r#"{"type":"unsubscribe","topics":["a","b","c","d"]}"#),
            "TOO_MANY_TOPICS"
        );
    }

    #[test]
    fn invalid_json() {
        for text in [
            "",
            "   ",
            "{",
            r#"{"type":"ping""#,
            r#"{"type":"ping"} x"#,
            r#"{"type":'ping'}"#,
            r#"{"type":"subscribe","topics":["a",]}"#,
            "[1,",
            "nope",
        ] {
            assert_eq!(code(text), "INVALID_JSON", "{text:?}");
        }
    }

    #[test]
    fn unknown_type() {
        for text in [
            "{}",
            r#"{"topics":["a"]}"#,
            r#"{"type":"publish","topics":["a"]}"#,
            r#"{"type":"Subscribe","topics":["a"]}"#,
            r#"{"type":5}"#,
            r#"{"type":null}"#,
            r#"{"type":{"a":1}}"#,
            r#"{"type":["ping"]}"#,
            // An unknown type is reported as such even when other fields are malformed.
            r#"{"type":"nope","topics":7,"message_id":[]}"#,
        ] {
            assert_eq!(code(text), "UNKNOWN_MESSAGE_TYPE", "{text}");
        }
    }

    #[test]
    fn invalid_request_shapes() {
        for text in [
            // Valid JSON that is not an object (a derive would take an array positionally).
            r#"["ping"]"#,
            r#""ping""#,
            "null",
            "42",
            // Duplicate type.
            r#"{"type":"ping","type":"ack"}"#,
            // topics
            r#"{"type":"subscribe"}"#,
            r#"{"type":"subscribe","topics":null}"#,
            r#"{"type":"subscribe","topics":[]}"#,
            r#"{"type":"subscribe","topics":"a"}"#,
            r#"{"type":"subscribe","topics":["a",1]}"#,
            r#"{"type":"subscribe","topics":[null]}"#,
            r#"{"type":"unsubscribe"}"#,
            r#"{"type":"unsubscribe","topics":[]}"#,
            r#"{"type":"unsubscribe","topics":{"a":1}}"#,
            // client_id
            r#"{"type":"subscribe","topics":["a"],"client_id":7}"#,
            // offset
            r#"{"type":"subscribe","topics":["a"],"offset":5}"#,
            r#"{"type":"subscribe","topics":["a"],"offset":true}"#,
            r#"{"type":"subscribe","topics":["a"],"offset":["1-0"]}"#,
            r#"{"type":"subscribe","topics":["a"],"offset":{"a":5}}"#,
            r#"{"type":"subscribe","topics":["a"],"offset":{"a":null}}"#,
            // ack
            r#"{"type":"ack"}"#,
            r#"{"type":"ack","message_id":null}"#,
            r#"{"type":"ack","message_id":12}"#,
        ] {
            assert_eq!(specific_code(text), "INVALID_REQUEST", "{text}");
            if text.contains("subscribe\"") && !text.contains("unsubscribe") {
                assert_eq!(code(text), "SUBSCRIPTION_ERROR", "{text}");
            }
        }
    }

    /// The code, or for a failed subscribe its `reason`.
    fn specific_code(text: &str) -> &'static str {
        match parse_client_message(text, 10) {
            Err(e) => e.reason().unwrap_or(e.code()),
            Ok(m) => panic!("{text} parsed: {m:?}"),
        }
    }

    #[test]
    fn error_messages_name_the_problem() {
        let e = parse_client_message(r#"{"type":"subscribe","topics":[]}"#, MAX)
            .expect_err("must be rejected");
        assert_eq!(e.message(), "\"topics\" must name at least one topic");
        let e = parse_client_message(r#"{"type":"subscribe","topics":["a"],"offset":5}"#, MAX)
            .expect_err("must be rejected");
        assert!(e.message().contains("\"offset\" as"), "{}", e.message());
        let e = parse_client_message("[]", MAX).expect_err("must be rejected");
        assert_eq!(e.message(), "a message must be a JSON object");
        let e = parse_client_message("{", MAX).expect_err("must be rejected");
        assert!(e.message().starts_with("invalid JSON: "), "{}", e.message());
    }

    fn written(f: impl FnOnce(&mut Vec<u8>)) -> String {
        let mut out = Vec::new();
        f(&mut out);
        String::from_utf8(out).expect("writers emit UTF-8")
    }

    #[test]
    fn server_messages_exact_bytes() {
        assert_eq!(
            written(|o| write_subscribed(o, &["a", "b"], "s-1", "2026-01-02T03:04:05.678Z")),
            r#"{"type":"subscribed","topics":["a","b"],"session_id":"s-1","timestamp":"2026-01-02T03:04:05.678Z"}"#
        );
        assert_eq!(
            written(|o| write_subscribed(o, &[], "s", "t")),
            r#"{"type":"subscribed","topics":[],"session_id":"s","timestamp":"t"}"#
        );
        assert_eq!(
            written(|o| write_unsubscribed(o, &["x"])),
            r#"{"type":"unsubscribed","topics":["x"]}"#
        );
        assert_eq!(
            written(|o| write_pong(o, "2026-01-02T03:04:05.678Z")),
            r#"{"type":"pong","timestamp":"2026-01-02T03:04:05.678Z"}"#
        );
        assert_eq!(
            written(|o| write_error(o, "UNKNOWN_TYPE", "no")),
            r#"{"type":"error","code":"UNKNOWN_TYPE","message":"no"}"#
        );
    }

    #[test]
    fn strings_are_json_escaped() {
        let out = written(|o| write_error(o, "X", "quote \" backslash \\ newline \n nul \u{0} é"));
        assert_eq!(
            out,
            r#"{"type":"error","code":"X","message":"quote \" backslash \\ newline \n nul \u0000 é"}"#
        );
        let out = written(|o| write_unsubscribed(o, &["a\"", "b\\"]));
        assert_eq!(out, r#"{"type":"unsubscribed","topics":["a\"","b\\"]}"#);
        let value: serde_json::Value = serde_json::from_str(&out).expect("valid JSON");
        assert_eq!(value["topics"][0], "a\"");
    }

    #[test]
    fn message_prefix_splices_the_stored_message_object() {
        let stored = br#"{"message_id":"1-0","topic":"t","payload":{"k":1},"timestamp":"x","metadata":null}"#;
        let expected = r#"{"type":"message","message_id":"1-0","topic":"t","payload":{"k":1},"timestamp":"x","metadata":null}"#;
        assert_eq!(written(|o| write_message(o, stored)), expected);
        let mut spliced = MESSAGE_PREFIX.to_vec();
        spliced.extend_from_slice(&stored[1..]);
        assert_eq!(spliced, expected.as_bytes());
        assert_eq!(
            written(|o| write_message(o, b"{}")),
            r#"{"type":"message"}"#
        );
        assert_eq!(
            written(|o| write_message(o, b"{ }")),
            r#"{"type":"message"}"#
        );
    }

    #[test]
    fn error_frame_from_a_parse_error_round_trips() {
        let e = parse_client_message(r#"{"type":"x"}"#, MAX).expect_err("must be rejected");
        let out = written(|o| write_error(o, e.code(), &e.message()));
        let value: serde_json::Value = serde_json::from_str(&out).expect("valid JSON");
        assert_eq!(value["type"], "error");
        assert_eq!(value["code"], "UNKNOWN_MESSAGE_TYPE");
    }
}
