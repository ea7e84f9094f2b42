//! `POST /api/v1/messages` and `POST /api/v1/messages/bulk`.
//!
//! Body parsing is sans-IO ([`parse_publish`], [`parse_bulk`]) so it can be fuzzed and
//! benchmarked alone. The payload is kept as the exact JSON text the producer sent
//! (`serde_json::value::RawValue`), never parsed into a tree and re-serialised.
//!
//! Idempotency keys ([`crate::store::idempotency`]) come from the `Idempotency-Key` header
//! (`pulsar-relay-client` sends one per logical publish and reuses it on every retry) or an
//! item's `idempotency_key` field. On a bulk request the header names the whole request, and
//! item `i` without a key of its own gets `<header>:<i>`, so every item is deduplicated on
//! its own (items of one bulk may go to different topics, shards and Valkey slots).

use std::borrow::Cow;
use std::collections::BTreeMap;

use bytes::Bytes;
use futures::future::join_all;
use serde::Deserialize;
use serde_json::value::RawValue;

pub use super::bulk_body::parse_bulk;
use super::{bad_json, Reply};
use crate::auth::{Permission, Principal};
use crate::config::ApiConfig;
use crate::http::codec::Request;
use crate::http::error::ApiError;
use crate::metrics::Ingress;
use crate::shard::Shard;
use crate::store::idempotency;
use crate::store::message::{write_rfc3339_millis, MessageId};
use crate::store::{PublishAck, PublishItem};
use crate::topic;

/// The longest ttl accepted: ten years. Beyond that a ttl is a mistake, and the product with
/// 1000 must stay far from u64 overflow.
const MAX_TTL_SECONDS: f64 = 10.0 * 365.0 * 24.0 * 3600.0;

/// The deepest nesting of arrays and objects a payload may have: serde_json's own limit for
/// every other body the relay parses. A payload is kept as raw text (`RawValue` skips that
/// limit), so without this check a topic could carry a message nested 100,000 deep that its
/// consumers' JSON parsers refuse or overflow their stacks on.
pub const MAX_PAYLOAD_DEPTH: usize = 128;

/// A message as sent: a single publish's body, or one item of a bulk body
/// ([`super::bulk_body`] fills it field by field).
#[derive(Deserialize, Default)]
pub(super) struct PublishBody<'a> {
    #[serde(borrow)]
    pub topic: Option<Cow<'a, str>>,
    #[serde(borrow)]
    pub payload: Option<&'a RawValue>,
    pub ttl: Option<f64>,
    #[serde(borrow)]
    pub metadata: Option<&'a RawValue>,
    #[serde(borrow)]
    pub idempotency_key: Option<Cow<'a, str>>,
}

/// Parses and validates a single-message body.
pub fn parse_publish(body: &[u8], limits: &ApiConfig) -> Result<PublishItem, ApiError> {
    let parsed: PublishBody = serde_json::from_slice(body).map_err(bad_json)?;
    validate(parsed, limits)
}

/// One bulk item's outcome of validation: the item, or the topic it named (if any) and why it
/// was rejected.
pub type BulkItem = Result<PublishItem, (Option<String>, ApiError)>;

/// Whether `json` (valid JSON) nests deeper than [`MAX_PAYLOAD_DEPTH`]. Valid JSON nested
/// `d` deep holds at least `d` opening and `d` closing brackets, so a payload shorter than
/// twice the limit cannot, and is not scanned: the common small message costs nothing here.
fn nests_too_deep(json: &[u8]) -> bool {
    json.len() > 2 * MAX_PAYLOAD_DEPTH && nesting_depth(json) > MAX_PAYLOAD_DEPTH
}

/// The deepest nesting of `[`/`{` in `json`, which is valid JSON (strings, and escaped quotes
/// inside them, are skipped). One pass, no allocation.
fn nesting_depth(json: &[u8]) -> usize {
    let (mut depth, mut deepest) = (0usize, 0usize);
    let (mut in_string, mut escaped) = (false, false);
    for &b in json {
        if in_string {
            match b {
                _ if escaped => escaped = false,
                b'\\' => escaped = true,
                b'"' => in_string = false,
                _ => {}
            }
            continue;
        }
        match b {
            b'"' => in_string = true,
            b'[' | b'{' => {
                depth += 1;
                deepest = deepest.max(depth);
            }
            b']' | b'}' => depth = depth.saturating_sub(1),
            _ => {}
        }
    }
    deepest
}

pub(super) fn validate(body: PublishBody, limits: &ApiConfig) -> Result<PublishItem, ApiError> {
    let topic = body
        .topic
        .ok_or_else(|| ApiError::invalid_request("`topic` is required"))?;
    topic::validate(&topic, limits.max_topic_name_len)?;
    let payload = body
        .payload
        .ok_or_else(|| ApiError::invalid_request("`payload` is required and must not be null"))?;
    let payload = payload.get().as_bytes();
    if payload.len() > limits.max_payload_bytes {
        return Err(ApiError::payload_too_large(format!(
            "payload is {} bytes; the limit is {}",
            payload.len(),
            limits.max_payload_bytes
        )));
    }
    if nests_too_deep(payload) {
        return Err(ApiError::invalid_request(format!(
            "payload nests arrays and objects more than {MAX_PAYLOAD_DEPTH} levels deep"
        )));
    }
    let ttl_ms = match body.ttl {
        None => None,
        Some(s) if s.is_finite() && s > 0.0 && s <= MAX_TTL_SECONDS => {
            Some((s * 1000.0).ceil() as u64)
        }
        Some(_) => {
            return Err(ApiError::invalid_request(
                "`ttl` must be a number of seconds greater than 0 (at most ten years)",
            ))
        }
    };
    let metadata = match body.metadata {
        None => None,
        Some(raw) => {
            let map: BTreeMap<String, String> = serde_json::from_str(raw.get()).map_err(|_| {
                ApiError::invalid_request("`metadata` must be an object of string values")
            })?;
            let encoded = serde_json::to_vec(&map).map_err(|_| ApiError::internal())?;
            Some(Bytes::from(encoded))
        }
    };
    let idempotency_key = match body.idempotency_key {
        None => None,
        Some(key) => {
            idempotency::validate_key(&key)
                .map_err(|why| ApiError::invalid_request(format!("`idempotency_key`: {why}")))?;
            Some(key.into_owned())
        }
    };
    Ok(PublishItem {
        topic: topic.into_owned(),
        // Copied: a slice of the request would pin the whole request buffer in the hot tier.
        payload: Bytes::copy_from_slice(payload),
        metadata,
        ttl_ms,
        idempotency_key,
    })
}

/// The request's `Idempotency-Key`, validated: `None` without one, 400 for an invalid one
/// or for several (which one would name the publish?).
pub fn idempotency_header(request: &Request) -> Result<Option<String>, ApiError> {
    let mut values = request.header_values(IDEMPOTENCY_KEY_HEADER);
    let Some(value) = values.next() else {
        return Ok(None);
    };
    if values.next().is_some() {
        return Err(ApiError::invalid_request(
            "more than one `Idempotency-Key` header: send one key per publish",
        ));
    }
    let key = std::str::from_utf8(value)
        .map(|v| v.trim_matches([' ', '\t']))
        .map_err(|_| ApiError::invalid_request("`Idempotency-Key`: not printable ASCII"))?;
    idempotency::validate_key(key)
        .map_err(|why| ApiError::invalid_request(format!("`Idempotency-Key`: {why}")))?;
    Ok(Some(key.to_owned()))
}

/// The header producers name a publish with.
pub const IDEMPOTENCY_KEY_HEADER: &str = "Idempotency-Key";

pub async fn publish_one(
    shard: &Shard,
    request: &Request,
    principal: &Principal,
) -> Result<Reply, ApiError> {
    let started = std::time::Instant::now();
    shard.metrics.received(Ingress::HttpSingle, 1);
    let result = publish_one_inner(shard, request, principal).await;
    match &result {
        Ok(_) => shard.metrics.publish_duration(started.elapsed()),
        Err(e) => shard.metrics.rejected(e.code, 1),
    }
    result
}

async fn publish_one_inner(
    shard: &Shard,
    request: &Request,
    principal: &Principal,
) -> Result<Reply, ApiError> {
    principal.require(Permission::Write)?;
    let header_key = idempotency_header(request)?;
    let mut item = parse_publish(request.body(), &shard.config.api)?;
    match (header_key, &item.idempotency_key) {
        (Some(header), Some(body)) if header != *body => {
            return Err(ApiError::invalid_request(
                "the `Idempotency-Key` header and the body's `idempotency_key` differ",
            ))
        }
        (Some(header), None) => item.idempotency_key = Some(header),
        _ => {}
    }
    // The response names the topic as the client did; it is stored in the client's namespace.
    let topic = std::mem::take(&mut item.topic);
    item.topic = principal.topic(Permission::Write, &topic)?;
    shard.metrics.per_topic(&item.topic, 0, 1);
    let owner = shard.owner_of(&item.topic);
    // A topic new to this shard gets its ownership record as on the Python relay, written
    // while the message is (both done before the answer).
    let record = shard
        .auth
        .needs_topic_record(principal, &item.topic)
        .then(|| item.topic.clone());
    let publish = shard.publish_on(owner, vec![item]);
    let mut results = match &record {
        Some(stored) => futures::join!(shard.auth.write_topic_record(principal, stored), publish).1,
        None => publish.await,
    }?;
    let ack = match results.pop() {
        Some(result) => result?,
        None => return Err(ApiError::internal()),
    };
    let mut body = Vec::with_capacity(96 + topic.len());
    body.extend_from_slice(b"{\"message_id\":\"");
    ack.id.write_to(&mut body);
    body.extend_from_slice(b"\",\"topic\":\"");
    // Validated topic names are plain ASCII with nothing to escape.
    body.extend_from_slice(topic.as_bytes());
    body.extend_from_slice(b"\",\"timestamp\":\"");
    write_rfc3339_millis(&mut body, ack.timestamp_ms);
    body.extend_from_slice(b"\"}");
    Ok(Reply::json(201, body))
}

/// The outcome of one bulk item, in request order.
enum Outcome {
    Accepted(String, PublishAck),
    Rejected(Option<String>, ApiError),
}

pub async fn publish_bulk(
    shard: &Shard,
    request: &Request,
    principal: &Principal,
) -> Result<Reply, ApiError> {
    let started = std::time::Instant::now();
    principal.require(Permission::Write)?;
    let header_key = idempotency_header(request)?;
    let mut items = parse_bulk(request.body(), &shard.config.api)?;
    if let Some(header) = &header_key {
        for (index, item) in items.iter_mut().enumerate() {
            if let Ok(item) = item {
                if item.idempotency_key.is_none() {
                    item.idempotency_key = Some(idempotency::bulk_item_key(header, index));
                }
            }
        }
    }
    let total = items.len();
    shard.metrics.received(Ingress::HttpBulk, total as u64);
    let mut outcomes: Vec<Option<Outcome>> = (0..total).map(|_| None).collect();

    // Group valid items by owning shard, keeping request order within each group, so each
    // shard gets one request and a topic's messages keep their order.
    let mut groups: Vec<(Vec<usize>, Vec<PublishItem>)> = (0..shard.shard_count())
        .map(|_| (Vec::new(), Vec::new()))
        .collect();
    // Topics new to this shard, whose ownership records are written while the messages are.
    let mut records: Vec<String> = Vec::new();
    for (index, item) in items.into_iter().enumerate() {
        match item {
            Ok(mut item) => {
                let topic = std::mem::take(&mut item.topic);
                // Refused items are answered one by one; the rest of the bulk goes on.
                if let Err(e) = principal.require_on(Permission::Write, &topic) {
                    outcomes[index] = Some(Outcome::Rejected(Some(topic), e.into()));
                    continue;
                }
                item.topic = principal.into_topic(Permission::Write, topic)?;
                if !records.contains(&item.topic)
                    && shard.auth.needs_topic_record(principal, &item.topic)
                {
                    records.push(item.topic.clone());
                }
                shard.metrics.per_topic(&item.topic, 0, 1);
                let group = &mut groups[shard.owner_of(&item.topic)];
                group.0.push(index);
                group.1.push(item);
            }
            Err((topic, error)) => outcomes[index] = Some(Outcome::Rejected(topic, error)),
        }
    }
    let calls = groups
        .into_iter()
        .enumerate()
        .filter(|(_, (indexes, _))| !indexes.is_empty())
        .map(|(owner, (indexes, items))| async move {
            let topics: Vec<String> = items.iter().map(|i| i.topic.clone()).collect();
            let results = shard.publish_on(owner, items).await;
            (indexes, topics, results)
        });
    let writes = records
        .iter()
        .map(|stored| shard.auth.write_topic_record(principal, stored));
    let (_, published) = futures::join!(join_all(writes), join_all(calls));
    for (indexes, topics, results) in published {
        match results {
            Ok(results) => {
                for ((index, topic), result) in indexes.into_iter().zip(topics).zip(results) {
                    outcomes[index] = Some(match result {
                        Ok(ack) => Outcome::Accepted(topic, ack),
                        Err(e) => Outcome::Rejected(Some(topic), e.into()),
                    });
                }
            }
            Err(e) => {
                let error: ApiError = e.into();
                for (index, topic) in indexes.into_iter().zip(topics) {
                    outcomes[index] = Some(Outcome::Rejected(Some(topic), error.clone()));
                }
            }
        }
    }

    let mut body = Vec::with_capacity(64 + total * 96);
    body.extend_from_slice(b"{\"results\":[");
    let mut accepted = 0usize;
    for (i, outcome) in outcomes.into_iter().enumerate() {
        if i > 0 {
            body.push(b',');
        }
        match outcome {
            Some(Outcome::Accepted(topic, ack)) => {
                accepted += 1;
                write_accepted(&mut body, &topic, ack.id, ack.timestamp_ms);
            }
            Some(Outcome::Rejected(topic, error)) => {
                shard.metrics.rejected(error.code, 1);
                write_rejected(&mut body, topic, &error)
            }
            // Every index is filled above: a valid item's shard answered or failed as a group.
            None => write_rejected(&mut body, None, &ApiError::internal()),
        }
    }
    body.extend_from_slice(b"],\"summary\":{\"total\":");
    body.extend_from_slice(itoa::Buffer::new().format(total).as_bytes());
    body.extend_from_slice(b",\"accepted\":");
    body.extend_from_slice(itoa::Buffer::new().format(accepted).as_bytes());
    body.extend_from_slice(b",\"rejected\":");
    body.extend_from_slice(itoa::Buffer::new().format(total - accepted).as_bytes());
    body.extend_from_slice(b"}}");
    if accepted > 0 {
        shard.metrics.publish_duration(started.elapsed());
    }
    Ok(Reply::json(207, body))
}

fn write_accepted(body: &mut Vec<u8>, topic: &str, id: MessageId, timestamp_ms: u64) {
    body.extend_from_slice(b"{\"message_id\":\"");
    id.write_to(body);
    body.extend_from_slice(b"\",\"topic\":\"");
    body.extend_from_slice(crate::topic::public_name(topic).as_bytes());
    body.extend_from_slice(b"\",\"timestamp\":\"");
    write_rfc3339_millis(body, timestamp_ms);
    body.extend_from_slice(b"\",\"status\":\"accepted\"}");
}

fn write_rejected(body: &mut Vec<u8>, topic: Option<String>, error: &ApiError) {
    // A rejected item's topic may be anything the client sent: escape it.
    let value = serde_json::json!({
        "topic": topic.as_deref().map(crate::topic::public_name),
        "status": "rejected",
        "error": error.code,
        "message": error.message,
    });
    // Writing a `serde_json::Value` into a Vec cannot fail.
    let _ = serde_json::to_writer(&mut *body, &value);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits() -> ApiConfig {
        crate::http::handlers::default_api_limits()
    }

    /// A 16 MiB bulk body of `[0,0,…]` used to be split into all its 8 million items (a
    /// 128 MiB `Vec`, peak relay RSS ~150 MiB per request) before the count was checked.
    #[test]
    fn bulk_item_count_is_checked_while_splitting() {
        let l = limits();
        let max = l.max_bulk_messages;
        let item = r#"{"topic":"t","payload":1}"#;
        let body = |n: usize| format!(r#"{{"messages":[{}]}}"#, vec![item; n].join(","));
        let at_limit = parse_bulk(body(max).as_bytes(), &l).expect("at the limit");
        assert_eq!(at_limit.len(), max);
        let over = parse_bulk(body(max + 1).as_bytes(), &l).expect_err("over the limit");
        assert_eq!((over.status, over.code), (400, "INVALID_REQUEST"));
        assert!(
            over.message.contains(&format!("more than {max}")),
            "{}",
            over.message
        );
        for (bad, why) in [
            (r#"{"messages":[]}"#, "got 0"),
            (r#"{"messages":{"a":1}}"#, "must be an array"),
            (r#"{"messages":"x"}"#, "must be an array"),
            (r#"{"messages":null}"#, "is required"),
        ] {
            let e = parse_bulk(bad.as_bytes(), &l).expect_err(bad);
            assert_eq!(e.status, 400, "{bad}");
            assert!(e.message.contains(why), "{bad}: {}", e.message);
        }
    }

    #[test]
    fn payload_is_kept_byte_for_byte() {
        let body = br#"{"topic":"t","payload": {"b":1,  "a":[1.50, "x\u0041"]} }"#;
        let item = parse_publish(body, &limits()).expect("valid");
        assert_eq!(&item.payload[..], br#"{"b":1,  "a":[1.50, "x\u0041"]}"#);
        assert_eq!(item.topic, "t");
        assert_eq!(item.ttl_ms, None);
    }

    #[test]
    fn rejects_null_or_missing_payload_and_bad_topic() {
        let l = limits();
        assert_eq!(
            parse_publish(br#"{"topic":"t"}"#, &l).err().map(|e| e.code),
            Some("INVALID_REQUEST")
        );
        assert_eq!(
            parse_publish(br#"{"topic":"t","payload":null}"#, &l)
                .err()
                .map(|e| e.code),
            Some("INVALID_REQUEST")
        );
        assert_eq!(
            parse_publish(br#"{"topic":"a b","payload":1}"#, &l)
                .err()
                .map(|e| e.code),
            Some("INVALID_TOPIC")
        );
        assert_eq!(parse_publish(b"{", &l).err().map(|e| e.status), Some(400));
        assert_eq!(
            parse_publish(br#"{"topic":5,"payload":1}"#, &l)
                .err()
                .map(|e| e.status),
            Some(400)
        );
    }

    #[test]
    fn ttl_and_metadata_are_validated() {
        let l = limits();
        let item = parse_publish(
            br#"{"topic":"t","payload":1,"ttl":1.5,"metadata":{"b":"2","a":"1"}}"#,
            &l,
        )
        .expect("valid");
        assert_eq!(item.ttl_ms, Some(1500));
        assert_eq!(item.metadata.as_deref(), Some(&br#"{"a":"1","b":"2"}"#[..]));
        for bad in [
            r#""ttl":0"#,
            r#""ttl":-1"#,
            r#""ttl":"5""#,
            r#""metadata":{"a":1}"#,
            r#""metadata":[]"#,
        ] {
            let body = format!(r#"{{"topic":"t","payload":1,{bad}}}"#);
            assert_eq!(
                parse_publish(body.as_bytes(), &l).err().map(|e| e.status),
                Some(400),
                "{bad}"
            );
        }
    }

    /// A payload nested 100,000 deep used to be accepted and stored (raw payloads skip
    /// serde_json's recursion limit), poisoning the topic for its consumers.
    #[test]
    fn payload_nesting_is_bounded() {
        let l = limits();
        let nested = |depth: usize| {
            let payload = format!("{}{}", "[".repeat(depth), "]".repeat(depth));
            format!(r#"{{"topic":"t","payload":{payload}}}"#)
        };
        assert!(parse_publish(nested(MAX_PAYLOAD_DEPTH).as_bytes(), &l).is_ok());
        for depth in [MAX_PAYLOAD_DEPTH + 1, 100_000] {
            assert_eq!(
                parse_publish(nested(depth).as_bytes(), &l)
                    .err()
                    .map(|e| e.code),
                Some("INVALID_REQUEST"),
                "depth {depth}"
            );
        }
        // Brackets and escaped quotes inside strings do not count.
        let in_strings = format!(r#"{{"a":"{}\"[[[","b":[1]}}"#, "[".repeat(500));
        assert_eq!(nesting_depth(in_strings.as_bytes()), 2);
    }

    #[test]
    fn bulk_validates_each_item_alone() {
        let l = limits();
        let body = br#"{"messages":[{"topic":"a","payload":1},{"topic":"b c","payload":2},{"payload":3},7]}"#;
        let items = parse_bulk(body, &l).expect("envelope valid");
        assert_eq!(items.len(), 4);
        assert!(items[0].is_ok());
        assert_eq!(
            items[1]
                .as_ref()
                .map_err(|(t, e)| (t.clone(), e.code))
                .err(),
            Some((Some("b c".into()), "INVALID_TOPIC"))
        );
        assert_eq!(
            items[2]
                .as_ref()
                .map_err(|(t, e)| (t.clone(), e.code))
                .err(),
            Some((None, "INVALID_REQUEST"))
        );
        assert!(items[3].is_err());
        assert_eq!(
            parse_bulk(br#"{"messages":[]}"#, &l)
                .map_err(|e| e.status)
                .err(),
            Some(400)
        );
        assert_eq!(
            parse_bulk(br#"{}"#, &l).map_err(|e| e.status).err(),
            Some(400)
        );
    }
}
