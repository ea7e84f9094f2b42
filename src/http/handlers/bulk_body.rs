//! A bulk publish body (`{"messages": [...]}`) parsed in one pass.
//!
//! Each item is validated on its own: a bad item is rejected in its result and the others
//! are published. A derived `Deserialize` stops at an item's first wrong-typed field and
//! takes the whole body down with it, so the relay used to keep `messages` raw, split it into
//! raw items and parse each again (three scans of every payload). Here one
//! `serde_json::Deserializer` walks the body once: the visitors below take each item's fields
//! loosely (a wrong type is recorded, its value skipped, and parsing goes on), count the items
//! while they are read (so an over-long array is refused without collecting it, see
//! [`crate::http::json`]), and hand each item to the same validation a single publish gets.
//! Sans-IO, fuzzed through [`parse_bulk`].
//!
//! Where this differs from the three-pass parser it replaced (the oracle of its tests): an
//! item or an envelope written as an array (which a derived `Deserialize` read as the fields
//! in order) is refused, not read; and a value the one pass cannot even read — an item that
//! is a number out of `f64` range, or a string or a field name holding a lone UTF-16
//! surrogate escape — fails the whole body with 400 instead of that item alone (nothing is
//! published, and the client is told). Like a single publish, fields the relay ignores are
//! skipped without checking their strings' UTF-8.

use std::borrow::Cow;
use std::fmt;

use serde::de::{self, DeserializeSeed, Deserializer as _, IgnoredAny, MapAccess, SeqAccess};
use serde::de::{Unexpected, Visitor};

use serde_json::value::RawValue;

use super::bad_json;
use super::publish::{validate, BulkItem, PublishBody};
use crate::config::ApiConfig;
use crate::http::error::ApiError;

/// Parses a bulk body. The envelope must be valid JSON with `messages` an array of 1 to
/// `max_bulk_messages` items; each item is validated on its own.
pub fn parse_bulk(body: &[u8], limits: &ApiConfig) -> Result<Vec<BulkItem>, ApiError> {
    let mut de = serde_json::Deserializer::from_slice(body);
    let messages = de
        .deserialize_map(Envelope { limits })
        .and_then(|messages| de.end().map(|()| messages))
        .map_err(bad_json)?;
    let max = limits.max_bulk_messages;
    let count_error = |got: &str| {
        ApiError::invalid_request(format!(
            "`messages` must hold 1 to {max} messages, got {got}"
        ))
    };
    match messages {
        None => Err(ApiError::invalid_request(
            "`messages` is required: an array of messages",
        )),
        Some(Messages::NotArray) => Err(ApiError::invalid_request(
            "`messages` must be an array of messages",
        )),
        Some(Messages::TooMany) => Err(count_error(&format!("more than {max}"))),
        Some(Messages::Items(items)) if items.is_empty() => Err(count_error("0")),
        Some(Messages::Items(items)) => Ok(items),
    }
}

/// What the envelope's `messages` held.
enum Messages {
    Items(Vec<BulkItem>),
    /// More than `max_bulk_messages` items (the rest was skipped, not collected).
    TooMany,
    NotArray,
}

/// The top-level object: `messages` (once), anything else ignored.
struct Envelope<'l> {
    limits: &'l ApiConfig,
}

impl<'de> Visitor<'de> for Envelope<'_> {
    /// `None` when `messages` is absent or null.
    type Value = Option<Messages>;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("an object with `messages`")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        let mut messages = None;
        let mut seen = false;
        while let Some(key) = map.next_key::<Cow<'de, str>>()? {
            if key != "messages" {
                map.next_value::<IgnoredAny>()?;
                continue;
            }
            if std::mem::replace(&mut seen, true) {
                return Err(de::Error::duplicate_field("messages"));
            }
            messages = map.next_value_seed(MessagesSeed {
                limits: self.limits,
            })?;
        }
        Ok(messages)
    }
}

struct MessagesSeed<'l> {
    limits: &'l ApiConfig,
}

impl<'de> DeserializeSeed<'de> for MessagesSeed<'_> {
    type Value = Option<Messages>;

    fn deserialize<D: de::Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for MessagesSeed<'_> {
    type Value = Option<Messages>;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("an array of messages")
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
        let max = self.limits.max_bulk_messages;
        let mut items = Vec::new();
        while items.len() < max {
            match seq.next_element_seed(ItemSeed {
                limits: self.limits,
            })? {
                Some(item) => items.push(item),
                None => return Ok(Some(Messages::Items(items))),
            }
        }
        if seq.next_element::<IgnoredAny>()?.is_none() {
            return Ok(Some(Messages::Items(items)));
        }
        // Refused: read the rest (its syntax still decides 400 vs this answer) but keep none.
        drop(items);
        while seq.next_element::<IgnoredAny>()?.is_some() {}
        Ok(Some(Messages::TooMany))
    }

    fn visit_unit<E: de::Error>(self) -> Result<Self::Value, E> {
        Ok(None)
    }

    fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<Self::Value, A::Error> {
        skip_map(map)?;
        Ok(Some(Messages::NotArray))
    }

    fn visit_bool<E: de::Error>(self, _: bool) -> Result<Self::Value, E> {
        Ok(Some(Messages::NotArray))
    }

    fn visit_i64<E: de::Error>(self, _: i64) -> Result<Self::Value, E> {
        Ok(Some(Messages::NotArray))
    }

    fn visit_u64<E: de::Error>(self, _: u64) -> Result<Self::Value, E> {
        Ok(Some(Messages::NotArray))
    }

    fn visit_f64<E: de::Error>(self, _: f64) -> Result<Self::Value, E> {
        Ok(Some(Messages::NotArray))
    }

    fn visit_str<E: de::Error>(self, _: &str) -> Result<Self::Value, E> {
        Ok(Some(Messages::NotArray))
    }
}

/// One item of `messages`: validated into a [`crate::store::PublishItem`], or rejected with
/// the topic it named (a string `topic` given once) and why.
struct ItemSeed<'l> {
    limits: &'l ApiConfig,
}

impl<'de> DeserializeSeed<'de> for ItemSeed<'_> {
    type Value = BulkItem;

    fn deserialize<D: de::Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        d.deserialize_any(self)
    }
}

/// An item that is not an object: rejected, with no topic to echo.
fn not_an_object(unexpected: Unexpected) -> BulkItem {
    Err((
        None,
        ApiError::invalid_request(format!(
            "invalid message: invalid type: {unexpected}, expected an object"
        )),
    ))
}

impl<'de> Visitor<'de> for ItemSeed<'_> {
    type Value = BulkItem;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a message object")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        let mut body = PublishBody::default();
        // The first field that does not fit, as serde would word it; the item is rejected
        // with it once its object has been read to the end.
        let mut unfit: Option<String> = None;
        // Whether each known field was seen: a repeated one does not fit either.
        let mut seen = [false; 5];
        let mut topics = 0usize;
        while let Some(field) = map.next_key::<Field>()? {
            if let Some(slot) = field.slot() {
                if std::mem::replace(&mut seen[slot], true) && unfit.is_none() {
                    unfit = Some(format!("duplicate field `{}`", field.name()));
                }
            }
            let mismatch = match field {
                Field::Topic => {
                    topics += 1;
                    scalar(&mut map, &mut body.topic)?
                }
                Field::Payload => {
                    body.payload = map.next_value::<Option<&'de RawValue>>()?;
                    None
                }
                Field::Ttl => scalar(&mut map, &mut body.ttl)?,
                Field::Metadata => {
                    body.metadata = map.next_value::<Option<&'de RawValue>>()?;
                    None
                }
                Field::IdempotencyKey => scalar(&mut map, &mut body.idempotency_key)?,
                Field::Other => {
                    map.next_value::<IgnoredAny>()?;
                    None
                }
            };
            if unfit.is_none() {
                unfit = mismatch;
            }
        }
        // The topic to echo in the item's result: a string given once.
        let topic = body
            .topic
            .as_deref()
            .filter(|_| topics == 1)
            .map(str::to_owned);
        if let Some(why) = unfit {
            return Ok(Err((
                topic,
                ApiError::invalid_request(format!("invalid message: {why}")),
            )));
        }
        Ok(validate(body, self.limits).map_err(|e| (topic, e)))
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
        while seq.next_element::<IgnoredAny>()?.is_some() {}
        Ok(not_an_object(Unexpected::Seq))
    }

    fn visit_unit<E: de::Error>(self) -> Result<Self::Value, E> {
        Ok(not_an_object(Unexpected::Unit))
    }

    fn visit_bool<E: de::Error>(self, v: bool) -> Result<Self::Value, E> {
        Ok(not_an_object(Unexpected::Bool(v)))
    }

    fn visit_i64<E: de::Error>(self, v: i64) -> Result<Self::Value, E> {
        Ok(not_an_object(Unexpected::Signed(v)))
    }

    fn visit_u64<E: de::Error>(self, v: u64) -> Result<Self::Value, E> {
        Ok(not_an_object(Unexpected::Unsigned(v)))
    }

    fn visit_f64<E: de::Error>(self, v: f64) -> Result<Self::Value, E> {
        Ok(not_an_object(Unexpected::Float(v)))
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<Self::Value, E> {
        Ok(not_an_object(Unexpected::Str(v)))
    }
}

/// Skips the rest of an object.
fn skip_map<'de, A: MapAccess<'de>>(mut map: A) -> Result<(), A::Error> {
    while map.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {}
    Ok(())
}

/// A message field by name (as JSON spells it after unescaping).
#[derive(Clone, Copy)]
enum Field {
    Topic,
    Payload,
    Ttl,
    Metadata,
    IdempotencyKey,
    Other,
}

impl Field {
    const NAMES: [&'static str; 5] = ["topic", "payload", "ttl", "metadata", "idempotency_key"];

    /// Its index in [`Field::NAMES`]; `None` for a field the relay ignores.
    fn slot(self) -> Option<usize> {
        match self {
            Field::Topic => Some(0),
            Field::Payload => Some(1),
            Field::Ttl => Some(2),
            Field::Metadata => Some(3),
            Field::IdempotencyKey => Some(4),
            Field::Other => None,
        }
    }

    fn name(self) -> &'static str {
        self.slot().map_or("", |i| Self::NAMES[i])
    }
}

impl<'de> de::Deserialize<'de> for Field {
    fn deserialize<D: de::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_identifier(FieldVisitor)
    }
}

struct FieldVisitor;

impl Visitor<'_> for FieldVisitor {
    type Value = Field;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a field name")
    }

    fn visit_str<E: de::Error>(self, name: &str) -> Result<Field, E> {
        Ok(match name {
            "topic" => Field::Topic,
            "payload" => Field::Payload,
            "ttl" => Field::Ttl,
            "metadata" => Field::Metadata,
            "idempotency_key" => Field::IdempotencyKey,
            _ => Field::Other,
        })
    }
}

/// Reads the next value (kept raw: its syntax checked, nothing converted) into `slot` if it
/// has the slot's type; otherwise leaves `slot` alone and returns why not, in serde's words.
/// The value is taken raw first so that a wrong type (or a number out of range) fails this
/// field only, never the deserializer walking the whole body.
fn scalar<'de, A, T>(map: &mut A, slot: &mut Option<T>) -> Result<Option<String>, A::Error>
where
    A: MapAccess<'de>,
    T: de::Deserialize<'de>,
{
    let raw: &'de RawValue = map.next_value()?;
    Ok(match serde_json::from_str::<Option<T>>(raw.get()) {
        Ok(value) => {
            *slot = value;
            None
        }
        // Worded as within the item, where the field's own position means nothing.
        Err(e) => Some(
            e.to_string()
                .split(" at line ")
                .next()
                .unwrap_or("")
                .to_owned(),
        ),
    })
}

#[cfg(test)]
mod tests {
    use std::borrow::Cow;

    use serde::Deserialize;
    use serde_json::value::RawValue;

    use super::*;
    use crate::http::handlers::publish::parse_publish;
    use crate::http::json::{array_up_to, Bounded};

    fn limits(max_bulk_messages: usize) -> ApiConfig {
        let mut limits = crate::http::handlers::default_api_limits();
        limits.max_bulk_messages = max_bulk_messages;
        limits.max_payload_bytes = 64;
        limits.max_topic_name_len = 16;
        limits
    }

    /// The oracle: how bulk bodies were parsed before this module, in three passes (the
    /// envelope with `messages` raw, the raw array split into raw items, each item parsed
    /// with the derived `Deserialize` of a single publish and validated the same way).
    fn three_pass(body: &[u8], limits: &ApiConfig) -> Result<Vec<BulkItem>, ApiError> {
        #[derive(Deserialize)]
        struct BulkBody<'a> {
            #[serde(borrow)]
            messages: Option<&'a RawValue>,
        }
        #[derive(Deserialize)]
        struct TopicOnly<'a> {
            #[serde(borrow)]
            topic: Option<Cow<'a, str>>,
        }
        let parsed: BulkBody = serde_json::from_slice(body).map_err(bad_json)?;
        let messages = parsed
            .messages
            .ok_or_else(|| ApiError::invalid_request("`messages` is required"))?;
        let max = limits.max_bulk_messages;
        let items: Vec<&RawValue> = match array_up_to(messages, max) {
            Err(Bounded::TooMany) => {
                return Err(ApiError::invalid_request(format!("more than {max}")))
            }
            Err(Bounded::Invalid) => return Err(ApiError::invalid_request("must be an array")),
            Ok(items) if items.is_empty() => return Err(ApiError::invalid_request("got 0")),
            Ok(items) => items,
        };
        Ok(items
            .into_iter()
            .map(|raw| {
                let parsed: PublishBody = serde_json::from_str(raw.get()).map_err(|e| {
                    let topic = serde_json::from_str::<TopicOnly>(raw.get())
                        .ok()
                        .and_then(|t| t.topic)
                        .map(Cow::into_owned);
                    (
                        topic,
                        ApiError::invalid_request(format!("invalid message: {e}")),
                    )
                })?;
                let topic = parsed.topic.as_deref().map(str::to_owned);
                validate(parsed, limits).map_err(|e| (topic, e))
            })
            .collect())
    }

    /// What two parses must agree on: the envelope's status and code, then per item the
    /// stored message (every field), or the echoed topic and the error's status and code.
    fn outcome(parsed: Result<Vec<BulkItem>, ApiError>) -> Result<Vec<String>, (u16, String)> {
        parsed
            .map(|items| {
                items
                    .into_iter()
                    .map(|item| match item {
                        Ok(item) => format!("ok {item:?}"),
                        Err((topic, e)) => format!("rejected {topic:?} {} {}", e.status, e.code),
                    })
                    .collect()
            })
            .map_err(|e| (e.status, e.code.to_string()))
    }

    fn pick<'a>(rng: &mut fastrand::Rng, from: &[&'a str]) -> &'a str {
        from[rng.usize(..from.len())]
    }

    /// A random bulk item: mostly objects with some of the known fields (values of the right
    /// and of wrong types, valid and invalid, escaped), unknown fields and repeats; sometimes
    /// not an object at all.
    fn item(rng: &mut fastrand::Rng) -> String {
        if rng.u8(..10) == 0 {
            // Not an object. (A 5-element array is left out: the derived `Deserialize` read
            // it as the five fields in order, see `an_array_is_not_a_message`.)
            return pick(
                rng,
                &["7", "\"x\"", "null", "true", "[]", "[1,2]", "-3.5", "[{}]"],
            )
            .into();
        }
        let deep = format!("{}1{}", "[".repeat(130), "]".repeat(130));
        let long = format!("\"{}\"", "x".repeat(80));
        let topics = [
            "\"t-a\"",
            "\"t.b\"",
            "\"b c\"",
            "\"\"",
            "\"t\\u002da\"",
            "\"sixteen-chars-ok\"",
            "\"seventeen-chars-x\"",
            "5",
            "null",
            "true",
            "[1]",
            "{\"x\":1}",
            "\"\\ud800\"",
        ];
        let payloads = [
            "1",
            "\"s\"",
            "{\"k\":[1,2]}",
            "null",
            "[]",
            "\"\\u00e9\\\"\"",
            &long,
            &deep,
            "1e400",
        ];
        let ttls = [
            "60",
            "0",
            "-1",
            "1.5",
            "\"5\"",
            "null",
            "1e400",
            "315360001",
            "[60]",
        ];
        let metadata = ["{\"a\":\"b\"}", "{\"a\":1}", "[]", "null", "\"x\"", "{}"];
        let keys = ["\"k1\"", "\"\"", "\"bad key\"", "5", "null", "\"k\\u00e9\""];
        let others = ["0", "{\"topic\":5}", "[\"payload\"]", "\"ttl\""];
        let mut fields = Vec::new();
        for _ in 0..rng.usize(0..7) {
            let (name, value) = match rng.u8(..7) {
                0 | 1 => ("topic", pick(rng, &topics)),
                2 | 3 => ("payload", pick(rng, &payloads)),
                4 => ("ttl", pick(rng, &ttls)),
                5 => ("metadata", pick(rng, &metadata)),
                _ => match rng.bool() {
                    true => ("idempotency_key", pick(rng, &keys)),
                    false => (
                        pick(rng, &["extra", "Topic", "pay\\u006coad"]),
                        pick(rng, &others),
                    ),
                },
            };
            fields.push(format!("\"{name}\":{value}"));
        }
        // Most items are publishable: a good topic and payload unless already given.
        if rng.u8(..3) != 0 && !fields.iter().any(|f| f.starts_with("\"topic\"")) {
            fields.push("\"topic\":\"t-a\"".into());
        }
        if rng.u8(..3) != 0 && !fields.iter().any(|f| f.starts_with("\"payload\"")) {
            fields.push("\"payload\":{\"n\":1}".into());
        }
        rng.shuffle(&mut fields);
        format!("{{{}}}", fields.join(","))
    }

    /// A random body around the item-count limit `max`, sometimes with a broken envelope.
    fn body(rng: &mut fastrand::Rng, max: usize) -> String {
        let items: Vec<String> = (0..rng.usize(0..=max + 2)).map(|_| item(rng)).collect();
        let messages = format!("[{}]", items.join(","));
        match rng.u8(..12) {
            0 => "{}".into(),
            1 => "{\"messages\":null}".into(),
            2 => "{\"messages\":{\"a\":1}}".into(),
            3 => format!("{{\"messages\":{messages},\"messages\":[]}}"),
            4 => format!("{{\"messages\":{messages}"),
            5 => format!("{{\"other\":[1,{{}}],\"messages\":{messages},\"more\":\"x\"}}"),
            6 => format!("{{\"messages\":\"{}\"}}", items.len()),
            _ => format!("{{\"messages\":{messages}}}"),
        }
    }

    #[test]
    fn one_pass_agrees_with_the_three_pass_oracle_on_random_bodies() {
        for seed in 0..3000u64 {
            let mut rng = fastrand::Rng::with_seed(seed);
            let max = rng.usize(1..6);
            let body = body(&mut rng, max);
            let l = limits(max);
            assert_eq!(
                outcome(parse_bulk(body.as_bytes(), &l)),
                outcome(three_pass(body.as_bytes(), &l)),
                "seed {seed}: {body}"
            );
        }
    }

    #[test]
    fn an_item_is_validated_like_a_single_publish() {
        let l = limits(10);
        for single in [
            r#"{"topic":"t-a","payload":{"k":1},"ttl":2,"metadata":{"a":"b"},"idempotency_key":"k"}"#,
            r#"{"topic":"t-a","payload":1,"ttl":"2"}"#,
            r#"{"topic":"b c","payload":1}"#,
            r#"{"topic":"t-a","payload":null}"#,
        ] {
            let bulk = format!(r#"{{"messages":[{single}]}}"#);
            let item = parse_bulk(bulk.as_bytes(), &l).expect("envelope").remove(0);
            let alone = parse_publish(single.as_bytes(), &l);
            assert_eq!(
                format!("{:?}", item.map_err(|(_, e)| (e.status, e.code))),
                format!("{:?}", alone.map_err(|e| (e.status, e.code))),
                "{single}"
            );
        }
    }

    #[test]
    fn an_array_is_not_a_message() {
        // The derived `Deserialize` also accepted a message written as an array of its five
        // fields in order; nothing documents that, and a bulk item no longer may.
        let body = br#"{"messages":[["t-a",1,null,null,null]]}"#;
        let items = parse_bulk(body, &limits(10)).expect("envelope");
        let (topic, e) = items[0].as_ref().expect_err("an array is rejected");
        assert_eq!((topic.as_deref(), e.code), (None, "INVALID_REQUEST"));
        assert!(e.message.contains("expected an object"), "{}", e.message);
        // Nor is an envelope written as an array.
        let envelope = br#"[[{"topic":"t-a","payload":1}]]"#;
        let e = parse_bulk(envelope, &limits(10)).expect_err("an array envelope is refused");
        assert_eq!((e.status, e.code), (400, "INVALID_REQUEST"));
    }

    #[test]
    fn a_wrong_field_is_named_in_the_items_rejection() {
        let body = br#"{"messages":[{"ttl":true,"topic":"t-a","payload":1},{"topic":"t-a","payload":1,"topic":"t-b"}]}"#;
        let items = parse_bulk(body, &limits(10)).expect("envelope");
        let (topic, e) = items[0].as_ref().expect_err("bad ttl");
        assert_eq!(topic.as_deref(), Some("t-a"));
        assert_eq!(
            e.message,
            "invalid message: invalid type: boolean `true`, expected f64"
        );
        let (topic, e) = items[1].as_ref().expect_err("repeated topic");
        assert_eq!(topic.as_deref(), None);
        assert_eq!(e.message, "invalid message: duplicate field `topic`");
    }
}
