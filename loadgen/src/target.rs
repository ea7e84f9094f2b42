//! Which relay is driven, and everything that differs between them. The only module that
//! knows about the Python relay (pulsar-relay 0.2.1 on PyPI), so its quirks stay here:
//!
//! - Authentication: every HTTP request carries `Authorization: Bearer <token>`; a WebSocket
//!   offers the subprotocols `bearer` and `bearer.<token>` (browsers cannot set headers on a
//!   WebSocket, so the token rides in the protocol list).
//! - Bulk: at most 100 messages per request (this relay: 1000).
//! - Long-poll (`POST /messages/poll`): `timeout` is whole seconds, there is no `limit` and
//!   no `next_offset`; an empty `since` object is taken as "no since" (Python's falsy `{}`),
//!   so the first poll waits for new messages only. The resume position is the last id seen
//!   per topic, kept by the client.
//! - WebSocket: no `offset` on subscribe, so a resumed subscription cannot ask for what it
//!   missed; the loss shows in `verify`.
//! - No Server-Sent Events endpoint.
//!
//! This relay takes `since: {}` as "every topic from its oldest message", which on the fresh
//! topics of a run closes the race between a subscriber's first poll and the first publish.
//!
//! Nchan (nginx's pub/sub module) is driven the same way, so a latency comparison is one
//! tool's measurement of both: a topic is a channel, published by POSTing the payload itself
//! to `<pub>?id=<topic>` (201 or 202 = accepted), and a WebSocket subscriber opens
//! `<sub>?id=<topic>`, sends nothing, and receives each payload as one text frame, without id
//! or topic (so one topic per subscriber, and no resume position).

use std::borrow::Cow;

use std::fmt::Write as _;

use hyper::header::HeaderValue;

use crate::cli::{NchanStore, TargetKind, Transport};
use crate::payload::BodyBuilder;

#[derive(Debug, Clone)]
pub enum Target {
    /// This repository's relay, with a token when its authentication is on.
    Pulsar { credential: Option<Credential> },
    /// The Python relay (always authenticated).
    Python { credential: Credential },
    /// nginx + Nchan; the locations of the chosen store.
    Nchan {
        publish: &'static str,
        subscribe: &'static str,
    },
}

/// An access token and its ready `Bearer <token>` header value.
#[derive(Debug, Clone)]
pub struct Credential {
    token: String,
    authorization: HeaderValue,
}

impl Credential {
    fn new(token: &str) -> Result<Credential, TargetError> {
        // A subprotocol is an RFC 7230 token: no spaces, commas or separators.
        let token_chars = |c: char| c.is_ascii_alphanumeric() || "-._~+/=".contains(c);
        if token.is_empty() || !token.chars().all(token_chars) {
            return Err(TargetError::BadToken);
        }
        let authorization =
            HeaderValue::from_str(&format!("Bearer {token}")).map_err(|_| TargetError::BadToken)?;
        Ok(Credential {
            token: token.to_owned(),
            authorization,
        })
    }
}

/// The relay's bulk cap (`api.max_bulk_messages` default).
const PULSAR_MAX_BULK: usize = 1000;
/// The Python relay's bulk cap.
const PYTHON_MAX_BULK: usize = 100;

#[derive(Debug, thiserror::Error)]
pub enum TargetError {
    #[error("--target python needs --token")]
    MissingToken,
    #[error(
        "the token contains characters not allowed in an HTTP header or WebSocket subprotocol"
    )]
    BadToken,
}

/// This relay's and the Python relay's single-publish path.
const SINGLE_PATH: &str = "/api/v1/messages";

impl Target {
    pub fn new(
        kind: TargetKind,
        token: Option<&str>,
        nchan_store: NchanStore,
    ) -> Result<Target, TargetError> {
        match kind {
            TargetKind::Pulsar => Ok(Target::Pulsar {
                credential: token.map(Credential::new).transpose()?,
            }),
            TargetKind::Nchan => Ok(match nchan_store {
                NchanStore::Memory => Target::Nchan {
                    publish: "/pub",
                    subscribe: "/sub",
                },
                NchanStore::Redis => Target::Nchan {
                    publish: "/rpub",
                    subscribe: "/rsub",
                },
            }),
            TargetKind::Python => Ok(Target::Python {
                credential: Credential::new(token.ok_or(TargetError::MissingToken)?)?,
            }),
        }
    }

    pub fn name(&self) -> &'static str {
        match self {
            Target::Pulsar { .. } => "pulsar",
            Target::Python { .. } => "python",
            Target::Nchan { .. } => "nchan",
        }
    }

    /// Where one message to `topic` is POSTed.
    pub fn publish_path(&self, topic: &str) -> Cow<'static, str> {
        match self {
            Target::Nchan { publish, .. } => Cow::Owned(format!("{publish}?id={topic}")),
            _ => Cow::Borrowed(SINGLE_PATH),
        }
    }

    /// Appends the body of a single publish: the relays take `{"topic":..,"payload":..}`,
    /// Nchan the payload itself (the topic is in the path).
    pub fn write_publish_body(
        &self,
        body: &BodyBuilder,
        out: &mut Vec<u8>,
        topic: &str,
        seq: u64,
        sent_ns: u64,
        via: Option<usize>,
    ) {
        match self {
            Target::Nchan { .. } => body.write_payload_via(out, seq, sent_ns, via),
            _ => body.write_message(out, topic, seq, sent_ns, via),
        }
    }

    /// The WebSocket path for a subscriber of `topics`.
    pub fn ws_path(&self, topics: &[String]) -> Cow<'static, str> {
        match (self, topics) {
            (Target::Nchan { subscribe, .. }, [topic]) => {
                Cow::Owned(format!("{subscribe}?id={topic}"))
            }
            _ => Cow::Borrowed("/ws"),
        }
    }

    /// Whether WebSocket frames are bare payloads (Nchan) rather than message objects.
    pub fn bare_frames(&self) -> bool {
        matches!(self, Target::Nchan { .. })
    }

    /// Why a scenario part cannot run against this target, if it cannot.
    pub fn unsupported(&self, transport: Transport, topics: usize) -> Option<String> {
        match (self, transport) {
            (Target::Pulsar { .. }, _) => None,
            (Target::Python { .. }, Transport::Sse) => {
                Some("the python relay has no Server-Sent Events endpoint".to_owned())
            }
            (Target::Python { .. }, _) => None,
            (Target::Nchan { .. }, Transport::Ws) if topics == 1 => None,
            (Target::Nchan { .. }, Transport::Ws) => Some(
                "with --target nchan a subscriber follows one channel: use --topics 1".to_owned(),
            ),
            (Target::Nchan { .. }, _) => {
                Some("--target nchan is measured over WebSocket only".to_owned())
            }
        }
    }

    /// The `Authorization` header for every HTTP request, if any.
    fn credential(&self) -> Option<&Credential> {
        match self {
            Target::Pulsar { credential } => credential.as_ref(),
            Target::Python { credential } => Some(credential),
            Target::Nchan { .. } => None,
        }
    }

    pub fn authorization(&self) -> Option<&HeaderValue> {
        self.credential().map(|c| &c.authorization)
    }

    /// The `Sec-WebSocket-Protocol` offer, if any.
    pub fn ws_protocols(&self) -> Option<String> {
        self.credential()
            .map(|c| format!("bearer, bearer.{}", c.token))
    }

    pub fn max_bulk(&self) -> usize {
        match self {
            Target::Pulsar { .. } => PULSAR_MAX_BULK,
            Target::Python { .. } => PYTHON_MAX_BULK,
            Target::Nchan { .. } => 0,
        }
    }

    /// A subscribe command, sent once the WebSocket is open; `None`: the target subscribes by
    /// the path alone (Nchan). `resume[i]`: the last id seen on `topics[i]`, after a
    /// reconnect; `None` for a first subscription.
    pub fn ws_subscribe(
        &self,
        topics: &[String],
        resume: Option<&[Option<String>]>,
    ) -> Option<String> {
        if let Target::Nchan { .. } = self {
            return None;
        }
        let mut out = String::from(r#"{"type":"subscribe","topics":"#);
        push_str_array(&mut out, topics);
        if let (Target::Pulsar { .. }, Some(resume)) = (self, resume) {
            // Topics of a run are fresh, so "earliest" for a topic not yet seen replays
            // exactly what was missed.
            out.push_str(r#","offset":{"#);
            for (i, (topic, last)) in topics.iter().zip(resume).enumerate() {
                if i > 0 {
                    out.push(',');
                }
                let _ = write!(
                    out,
                    r#""{topic}":"{}""#,
                    last.as_deref().unwrap_or("earliest")
                );
            }
            out.push('}');
        }
        if matches!(self, Target::Python { .. }) {
            // The Python relay (0.2.1) rejects a subscribe without a client id.
            let _ = write!(out, r#","client_id":"loadgen-{:016x}""#, fastrand::u64(..));
        }
        out.push('}');
        Some(out)
    }

    /// A long-poll request body. `since[i]`: the last id seen on `topics[i]`.
    pub fn poll_body(
        &self,
        topics: &[String],
        since: &[Option<String>],
        timeout_s: u64,
        limit: usize,
    ) -> Vec<u8> {
        let mut out = String::from(r#"{"topics":"#);
        push_str_array(&mut out, topics);
        let any_known = since.iter().any(Option::is_some);
        let with_since = matches!(self, Target::Pulsar { .. }) || any_known;
        if with_since {
            out.push_str(r#","since":{"#);
            let mut first = true;
            for (topic, last) in topics.iter().zip(since) {
                if let Some(id) = last {
                    if !first {
                        out.push(',');
                    }
                    first = false;
                    let _ = write!(out, r#""{topic}":"{id}""#);
                }
            }
            out.push('}');
        }
        let _ = write!(out, r#","timeout":{timeout_s}"#);
        if matches!(self, Target::Pulsar { .. }) {
            let _ = write!(out, r#","limit":{limit}"#);
        }
        out.push('}');
        out.into_bytes()
    }
}

/// Topic names and ids are ours or the relay's (`[A-Za-z0-9._-]`): no escaping needed.
fn push_str_array(out: &mut String, items: &[String]) {
    out.push('[');
    for (i, item) in items.iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        out.push('"');
        out.push_str(item);
        out.push('"');
    }
    out.push(']');
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::Value;

    fn python() -> Target {
        Target::new(TargetKind::Python, Some("abc.DEF-1"), NchanStore::Memory).expect("valid token")
    }

    fn json(bytes: &[u8]) -> serde_json::Value {
        serde_json::from_slice(bytes).expect("valid JSON")
    }

    fn subscribe(target: &Target, topics: &[String], resume: Option<&[Option<String>]>) -> Value {
        json(
            target
                .ws_subscribe(topics, resume)
                .expect("the relays take a subscribe command")
                .as_bytes(),
        )
    }

    fn nchan(store: NchanStore) -> Target {
        Target::new(TargetKind::Nchan, None, store).expect("nchan needs nothing")
    }

    #[test]
    fn nchan_channels_are_topics_in_the_path_and_bodies_are_bare_payloads() {
        let t = nchan(NchanStore::Memory);
        assert_eq!(t.publish_path("orders"), "/pub?id=orders");
        assert_eq!(t.ws_path(&["orders".to_owned()]), "/sub?id=orders");
        assert_eq!(nchan(NchanStore::Redis).publish_path("a"), "/rpub?id=a");
        assert_eq!(
            nchan(NchanStore::Redis).ws_path(&["a".to_owned()]),
            "/rsub?id=a"
        );
        assert!(t.ws_subscribe(&["a".to_owned()], None).is_none());
        assert!(t.bare_frames() && !Target::Pulsar { credential: None }.bare_frames());

        let builder = BodyBuilder::new(100);
        let mut bare = Vec::new();
        t.write_publish_body(&builder, &mut bare, "orders", 7, 9, None);
        let bare = json(&bare);
        assert_eq!(
            (bare["seq"].as_u64(), bare["sent_ns"].as_u64()),
            (Some(7), Some(9))
        );
        let mut wrapped = Vec::new();
        Target::Pulsar { credential: None }.write_publish_body(
            &builder,
            &mut wrapped,
            "orders",
            7,
            9,
            None,
        );
        assert_eq!(json(&wrapped)["payload"], bare);
        assert_eq!(
            Target::Pulsar { credential: None }.publish_path("orders"),
            "/api/v1/messages"
        );

        assert!(t.unsupported(Transport::Ws, 1).is_none());
        assert!(t.unsupported(Transport::Ws, 2).is_some());
        assert!(t.unsupported(Transport::Longpoll, 1).is_some());
        assert!(python().unsupported(Transport::Sse, 1).is_some());
        assert!(Target::Pulsar { credential: None }
            .unsupported(Transport::Sse, 3)
            .is_none());
    }

    #[test]
    fn python_needs_a_header_safe_token() {
        assert!(matches!(
            Target::new(TargetKind::Python, None, NchanStore::Memory),
            Err(TargetError::MissingToken)
        ));
        assert!(matches!(
            Target::new(TargetKind::Python, Some("a b"), NchanStore::Memory),
            Err(TargetError::BadToken)
        ));
        let t = python();
        assert_eq!(
            t.authorization().map(|h| h.as_bytes()),
            Some(&b"Bearer abc.DEF-1"[..])
        );
        assert_eq!(
            t.ws_protocols().as_deref(),
            Some("bearer, bearer.abc.DEF-1")
        );
        assert_eq!(t.max_bulk(), 100);
        assert!(Target::Pulsar { credential: None }
            .authorization()
            .is_none());
        assert_eq!(Target::Pulsar { credential: None }.max_bulk(), 1000);
    }

    #[test]
    fn poll_bodies_follow_each_relay() {
        let topics = vec!["a".to_owned(), "b".to_owned()];
        let none = vec![None, None];
        let some = vec![Some("5-0".to_owned()), None];

        let first = json(&Target::Pulsar { credential: None }.poll_body(&topics, &none, 5, 1000));
        assert_eq!(
            first["since"],
            serde_json::json!({}),
            "earliest for fresh topics"
        );
        assert_eq!(first["limit"], 1000);
        let next = json(&Target::Pulsar { credential: None }.poll_body(&topics, &some, 5, 1000));
        assert_eq!(next["since"], serde_json::json!({"a": "5-0"}));

        let first = json(&python().poll_body(&topics, &none, 5, 1000));
        assert!(
            first.get("since").is_none(),
            "{{}} would mean the same to Python"
        );
        assert!(first.get("limit").is_none());
        assert_eq!(first["timeout"], 5);
        let next = json(&python().poll_body(&topics, &some, 5, 1000));
        assert_eq!(next["since"], serde_json::json!({"a": "5-0"}));
    }

    #[test]
    fn subscribe_resumes_per_topic_on_this_relay_only() {
        let topics = vec!["a".to_owned(), "b".to_owned()];
        let fresh = subscribe(&Target::Pulsar { credential: None }, &topics, None);
        assert!(fresh.get("offset").is_none());
        let resume = vec![Some("9-1".to_owned()), None];
        let again = subscribe(&Target::Pulsar { credential: None }, &topics, Some(&resume));
        assert_eq!(
            again["offset"],
            serde_json::json!({"a": "9-1", "b": "earliest"})
        );
        let py = subscribe(&python(), &topics, Some(&resume));
        assert!(py.get("offset").is_none());
        assert_eq!(py["topics"], serde_json::json!(["a", "b"]));
    }
}
