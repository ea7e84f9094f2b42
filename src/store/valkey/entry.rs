//! The stream entry format: the fields a message is written with (`payload`, `timestamp`,
//! optionally `metadata` and `ttl` in seconds; the entry id is the message id: the XADD
//! itself is in `publish.lua`, its arguments encoded by `function.rs`) and how an entry is
//! read back as a message, including the entries the Python relay wrote.
//!
//! Does not decide when a message is written (`publish.rs`, `behind.rs`) nor whether an entry
//! read back is still live (`retention.rs`).

use std::time::UNIX_EPOCH;

use bytes::Bytes;

use crate::store::message::{Message, MessageId};
use crate::valkey::Reply;

/// Appends the `ttl` field text: seconds, with millisecond precision only when needed.
pub(super) fn write_ttl_seconds(out: &mut Vec<u8>, ttl_ms: u64) {
    let mut digits = itoa::Buffer::new();
    out.extend_from_slice(digits.format(ttl_ms / 1000).as_bytes());
    let millis = ttl_ms % 1000;
    if millis != 0 {
        out.push(b'.');
        out.push(b'0' + (millis / 100) as u8);
        out.push(b'0' + (millis / 10 % 10) as u8);
        out.push(b'0' + (millis % 10) as u8);
    }
}

/// Entries of an XRANGE/XREVRANGE reply, skipping any that do not parse.
pub fn parse_entries(reply: &Reply) -> Vec<(MessageId, Message)> {
    match reply {
        Reply::Array(entries) => entries.iter().filter_map(parse_entry).collect(),
        _ => Vec::new(),
    }
}

/// One stream entry `[id, [field, value, ...]]` as a message. Entries written by the Python
/// relay (fields `message_id`, `payload`, `timestamp` without a zone, `metadata`) parse too.
pub fn parse_entry(entry: &Reply) -> Option<(MessageId, Message)> {
    let Reply::Array(parts) = entry else {
        return None;
    };
    let [id, fields] = parts.as_slice() else {
        return None;
    };
    let id: MessageId = id.as_str()?.parse().ok()?;
    let Reply::Array(fields) = fields else {
        return None;
    };
    let mut payload = None;
    let mut timestamp_ms = None;
    let mut metadata = None;
    let mut ttl_ms = None;
    for pair in fields.chunks(2) {
        let [name, value] = pair else { continue };
        let (Some(name), Some(value)) = (name.as_bytes(), value.as_bytes()) else {
            continue;
        };
        match name {
            // The reply's own buffer (the codec copied it out of the read buffer already):
            // no second copy of every payload.
            b"payload" => payload = Some(field_bytes(&pair[1], value)),
            b"timestamp" => {
                timestamp_ms = std::str::from_utf8(value).ok().and_then(parse_timestamp_ms)
            }
            b"metadata" => {
                metadata = Some(field_bytes(&pair[1], value)).filter(|m| m.as_ref() != b"null")
            }
            b"ttl" => {
                ttl_ms = std::str::from_utf8(value)
                    .ok()
                    .and_then(|s| s.parse::<f64>().ok())
                    .filter(|s| s.is_finite() && *s > 0.0)
                    .map(|s| (s * 1000.0).ceil() as u64)
            }
            _ => {}
        }
    }
    let timestamp_ms = timestamp_ms.unwrap_or(id.ms);
    Some((
        id,
        Message {
            id,
            timestamp_ms,
            expires_at_ms: ttl_ms.map(|t| timestamp_ms.saturating_add(t)),
            payload: payload?,
            metadata,
        },
    ))
}

/// A field value as `Bytes`, sharing the reply's buffer when it is a bulk string.
fn field_bytes(reply: &Reply, value: &[u8]) -> Bytes {
    match reply {
        Reply::Bulk(b) => b.clone(),
        _ => Bytes::copy_from_slice(value),
    }
}

/// RFC 3339 with or without a zone (the Python relay wrote naive UTC times).
pub(super) fn parse_timestamp_ms(text: &str) -> Option<u64> {
    let parsed = humantime::parse_rfc3339(text)
        .or_else(|_| humantime::parse_rfc3339_weak(text))
        .or_else(|_| humantime::parse_rfc3339_weak(&format!("{text}Z")))
        .ok()?;
    let ms = parsed.duration_since(UNIX_EPOCH).ok()?.as_millis();
    u64::try_from(ms).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bulk(s: &str) -> Reply {
        Reply::Bulk(Bytes::copy_from_slice(s.as_bytes()))
    }

    #[test]
    fn parses_entries_of_both_relays() {
        let ours = Reply::Array(vec![
            bulk("1700000000000-1"),
            Reply::Array(vec![
                bulk("payload"),
                bulk("{\"a\":1}"),
                bulk("timestamp"),
                bulk("2023-11-14T22:13:20.000Z"),
                bulk("ttl"),
                bulk("1.5"),
            ]),
        ]);
        let (id, m) = parse_entry(&ours).expect("entry");
        assert_eq!(id, MessageId::new(1_700_000_000_000, 1));
        assert_eq!(&m.payload[..], b"{\"a\":1}");
        assert_eq!(m.timestamp_ms, 1_700_000_000_000);
        assert_eq!(m.expires_at_ms, Some(1_700_000_001_500));
        let python = Reply::Array(vec![
            bulk("1700000000000-0"),
            Reply::Array(vec![
                bulk("message_id"),
                bulk("msg_abc"),
                bulk("payload"),
                bulk("{\"k\":\"v\"}"),
                bulk("timestamp"),
                bulk("2023-11-14T22:13:20"),
                bulk("metadata"),
                bulk("{\"source\":\"api\"}"),
            ]),
        ]);
        let (_, m) = parse_entry(&python).expect("python entry");
        assert_eq!(m.timestamp_ms, 1_700_000_000_000);
        assert_eq!(m.metadata.as_deref(), Some(&b"{\"source\":\"api\"}"[..]));
    }

    #[test]
    fn ttl_text_round_trips() {
        let text = |ms| {
            let mut out = Vec::new();
            write_ttl_seconds(&mut out, ms);
            String::from_utf8(out).expect("ascii")
        };
        assert_eq!(text(3_600_000), "3600");
        assert_eq!(text(1_500), "1.500");
        assert_eq!(text(1_005), "1.005");
        assert_eq!(text(999), "0.999");
    }
}
