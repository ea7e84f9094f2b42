//! Message ids, the stored message, and the one JSON wire form every delivery path shares.
//!
//! Owns: [`MessageId`] (`<ms>-<seq>`, Valkey's stream-id format, so a cursor means the same on
//! every backend) with its id-assignment rule, strict parsing and serde form; [`Message`] and
//! what it costs the memory budget ([`Message::footprint`]); the message JSON object
//! ([`write_message_json`]) and its RFC 3339 timestamp ([`write_rfc3339_millis`]).
//!
//! Does not own: validating payloads or metadata (the HTTP layer does that before a message
//! exists; here both are spliced into output as the raw JSON they already are), retention or
//! ordering of messages (the hot tier), reading the clock (`now` is always passed in).

use std::fmt;
use std::str::FromStr;

use bytes::Bytes;
use serde::de::{self, Visitor};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// A message's position in its topic: `ms` is a wall-clock millisecond, `seq` orders messages
/// accepted within the same `ms` (or after the clock stepped back). Ordered by `(ms, seq)`,
/// exactly like Valkey stream ids, so ids handed out by the memory backend and by Valkey sort
/// and compare the same way and a client cursor survives a backend switch.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct MessageId {
    pub ms: u64,
    pub seq: u64,
}

impl MessageId {
    /// `0-0`: sorts before every id [`MessageId::next_after`] can produce (Valkey never issues
    /// it either), so it is a cursor meaning "from the very beginning".
    pub const MIN: MessageId = MessageId { ms: 0, seq: 0 };
    /// The largest id; a cursor meaning "after everything".
    pub const MAX: MessageId = MessageId {
        ms: u64::MAX,
        seq: u64::MAX,
    };

    pub const fn new(ms: u64, seq: u64) -> MessageId {
        MessageId { ms, seq }
    }

    /// The id to give a message accepted at wall-clock `now_ms` when the topic's newest id is
    /// `last` (`None` for a topic without one). Valkey's `XADD *` rule: `(now, 0)` when the
    /// clock has moved past `last.ms`, else `(last.ms, last.seq + 1)`, so ids strictly
    /// increase even when the clock steps back. A missing `last` counts as [`MessageId::MIN`],
    /// so the first id is never `0-0` (even at `now_ms == 0`) and [`MessageId::MIN`] stays a
    /// valid "before everything" cursor.
    ///
    /// `seq` overflow moves to `(last.ms + 1, 0)`. Only at [`MessageId::MAX`] itself (584
    /// million years of milliseconds, reachable only through an explicitly inserted id) is
    /// there no greater id; the result saturates at `MAX` there instead of panicking.
    pub fn next_after(last: Option<MessageId>, now_ms: u64) -> MessageId {
        let last = last.unwrap_or(MessageId::MIN);
        if now_ms > last.ms {
            MessageId { ms: now_ms, seq: 0 }
        } else if let Some(seq) = last.seq.checked_add(1) {
            MessageId { ms: last.ms, seq }
        } else if let Some(ms) = last.ms.checked_add(1) {
            MessageId { ms, seq: 0 }
        } else {
            MessageId::MAX
        }
    }

    /// Appends `ms-seq` to `out` without allocating beyond `out`'s own growth.
    pub fn write_to(&self, out: &mut Vec<u8>) {
        let mut digits = itoa::Buffer::new();
        out.extend_from_slice(digits.format(self.ms).as_bytes());
        out.push(b'-');
        out.extend_from_slice(digits.format(self.seq).as_bytes());
    }
}

impl fmt::Display for MessageId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut digits = itoa::Buffer::new();
        f.write_str(digits.format(self.ms))?;
        f.write_str("-")?;
        f.write_str(digits.format(self.seq))
    }
}

/// Why a string is not a message id. Messages are written for a client (400 body): they say
/// what is expected and never echo the input back.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum InvalidMessageId {
    #[error(
        "invalid message id: expected \"<ms>-<seq>\", two unsigned decimal integers joined by '-'"
    )]
    Malformed,
    #[error(
        "invalid message id: each part of \"<ms>-<seq>\" must be at most 18446744073709551615"
    )]
    OutOfRange,
}

impl FromStr for MessageId {
    type Err = InvalidMessageId;

    /// Strict: ASCII digits, one `-`, ASCII digits. No sign, whitespace, empty part or
    /// second `-` (`u64::from_str` alone would accept a leading `+`). Leading zeros are
    /// accepted (`007-1` is `7-1`), as Valkey does.
    fn from_str(s: &str) -> Result<MessageId, InvalidMessageId> {
        let (ms, seq) = s.split_once('-').ok_or(InvalidMessageId::Malformed)?;
        Ok(MessageId {
            ms: parse_decimal_u64(ms)?,
            seq: parse_decimal_u64(seq)?,
        })
    }
}

fn parse_decimal_u64(part: &str) -> Result<u64, InvalidMessageId> {
    if part.is_empty() || !part.bytes().all(|b| b.is_ascii_digit()) {
        return Err(InvalidMessageId::Malformed);
    }
    // Only digits remain, so the sole possible failure is overflow.
    part.parse().map_err(|_| InvalidMessageId::OutOfRange)
}

impl Serialize for MessageId {
    /// As the `"ms-seq"` string; `collect_str` lets serde_json write it without a `String`.
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for MessageId {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<MessageId, D::Error> {
        struct IdVisitor;
        impl Visitor<'_> for IdVisitor {
            type Value = MessageId;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a message id string \"<ms>-<seq>\"")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<MessageId, E> {
                v.parse().map_err(E::custom)
            }
        }
        deserializer.deserialize_str(IdVisitor)
    }
}

/// Bytes charged to the memory budget per message on top of its payload and metadata.
///
/// What one retained message costs besides its bytes, on 64-bit targets:
/// - 104: the [`Message`] itself in its topic's ring buffer (id 16, timestamp 8,
///   `Option<u64>` 16, two `Bytes`-sized fields 32 + 32);
/// - 32: its entry in the shard-wide arrival FIFO the hot tier evicts from;
/// - 40: its entry in the hot tier's ttl heap (only messages with a ttl have one; charged to
///   all so a message's footprint never depends on hot-tier internals);
/// - ~48: the `Bytes` shared header and allocator rounding of the payload allocation;
/// - ~32: average spare capacity of the growable ring buffers above.
///
/// That sums to 256. Undercharging lets the process exceed its budget by up to the error
/// times the message count (a million 100-byte messages at 128 instead of 256 would hide
/// 128 MB), which is worse than evicting a little early.
pub const MESSAGE_OVERHEAD_BYTES: usize = 256;

/// One accepted message. `Send + Sync` (only `Bytes`, no `Rc`): it is cloned onto other
/// shards for delivery, and a clone costs two reference-count increments, not a copy.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Message {
    pub id: MessageId,
    /// Wall clock when the message was accepted. Equals `id.ms` except after the clock stepped
    /// back (the id then continues the old sequence); age retention and the wire `timestamp`
    /// use this, never `id.ms`.
    pub timestamp_ms: u64,
    /// From the producer's per-message ttl; `None` lives until retention removes it.
    pub expires_at_ms: Option<u64>,
    /// The payload JSON exactly as the producer sent it, spliced raw into every output.
    /// Should own its allocation (not be a slice of a request buffer): a slice would pin the
    /// whole buffer while only the payload length is charged to the budget.
    pub payload: Bytes,
    /// A compact JSON object of string → string, spliced raw.
    pub metadata: Option<Bytes>,
}

impl Message {
    /// Whether the per-message ttl has run out at `now_ms`. Expiry is inclusive: a ttl of 0
    /// is already expired at acceptance.
    pub fn is_expired(&self, now_ms: u64) -> bool {
        self.expires_at_ms.is_some_and(|at| now_ms >= at)
    }

    /// Bytes charged to the memory budget: payload + metadata + [`MESSAGE_OVERHEAD_BYTES`].
    pub fn footprint(&self) -> usize {
        self.payload.len() + self.metadata.as_ref().map_or(0, Bytes::len) + MESSAGE_OVERHEAD_BYTES
    }
}

/// Appends the message's wire form, shared by history reads, WebSocket, long-poll and SSE:
///
/// `{"message_id":"<id>","topic":<topic>,"payload":<raw>,"timestamp":"<rfc3339>","metadata":<raw>|null}`
///
/// The topic is written as its client knows it ([`crate::topic::public_name`]: no namespace)
/// and JSON-escaped by serde_json; payload and metadata are already JSON and are copied
/// verbatim.
pub fn write_message_json(out: &mut Vec<u8>, topic: &str, msg: &Message) {
    out.extend_from_slice(b"{\"message_id\":\"");
    msg.id.write_to(out);
    out.extend_from_slice(b"\",\"topic\":");
    // `Vec<u8>`'s `io::Write` never fails and a `str` always serializes, so this cannot
    // return an error; asserting in debug documents that rather than silently ignoring it.
    let written = serde_json::to_writer(&mut *out, crate::topic::public_name(topic));
    debug_assert!(written.is_ok(), "serializing a str into a Vec cannot fail");
    out.extend_from_slice(b",\"payload\":");
    out.extend_from_slice(&msg.payload);
    out.extend_from_slice(b",\"timestamp\":\"");
    write_rfc3339_millis(out, msg.timestamp_ms);
    out.extend_from_slice(b"\",\"metadata\":");
    match &msg.metadata {
        Some(metadata) => out.extend_from_slice(metadata),
        None => out.extend_from_slice(b"null"),
    }
    out.push(b'}');
}

/// The last millisecond with a four-digit year, 9999-12-31T23:59:59.999Z.
const MAX_RFC3339_MS: u64 = 253_402_300_799_999;

/// Appends `unix_ms` as RFC 3339 UTC with milliseconds, e.g. `2026-11-23T10:39:06.123Z`
/// (always 24 bytes). Times after year 9999 are clamped to its last millisecond so the output
/// stays a valid four-digit-year timestamp.
///
/// Hand-written rather than `humantime::format_rfc3339_millis`: that goes through
/// `fmt::Display` and `SystemTime` arithmetic (which panics on overflow) and returns
/// `fmt::Error` after year 9999, once per delivered message on the hottest output path. The
/// tests compare this against humantime.
///
/// The first 20 bytes (`YYYY-MM-DDTHH:MM:SS.`) are kept per thread for the last second
/// formatted: a shard formats the same second over and over (every acknowledgement and
/// delivery of a busy second), and the calendar arithmetic was ~200 of its ~225 instructions.
pub fn write_rfc3339_millis(out: &mut Vec<u8>, unix_ms: u64) {
    thread_local! {
        /// (second, its formatted prefix); `u64::MAX` never matches a clamped second.
        static LAST_SECOND: std::cell::Cell<(u64, [u8; 20])> =
            const { std::cell::Cell::new((u64::MAX, [0; 20])) };
    }
    let unix_ms = unix_ms.min(MAX_RFC3339_MS);
    let secs = unix_ms / 1000;
    let prefix = LAST_SECOND.with(|last| {
        let (second, prefix) = last.get();
        if second == secs {
            return prefix;
        }
        let prefix = rfc3339_second_prefix(secs);
        last.set((secs, prefix));
        prefix
    });
    let mut millis = *b"000Z";
    put_digits(&mut millis[..3], unix_ms % 1000);
    out.extend_from_slice(&prefix);
    out.extend_from_slice(&millis);
}

/// `YYYY-MM-DDTHH:MM:SS.` for a second since the epoch (a four-digit year).
fn rfc3339_second_prefix(secs: u64) -> [u8; 20] {
    let (year, month, day) = civil_from_days(secs / 86_400);
    let second_of_day = secs % 86_400;
    let (hour, minute, second) = (
        second_of_day / 3600,
        second_of_day / 60 % 60,
        second_of_day % 60,
    );

    let mut buf = *b"0000-00-00T00:00:00.";
    put_digits(&mut buf[0..4], year);
    put_digits(&mut buf[5..7], month);
    put_digits(&mut buf[8..10], day);
    put_digits(&mut buf[11..13], hour);
    put_digits(&mut buf[14..16], minute);
    put_digits(&mut buf[17..19], second);
    buf
}

/// Writes `value` as zero-padded decimal filling `slot` (callers guarantee it fits).
fn put_digits(slot: &mut [u8], mut value: u64) {
    for digit in slot.iter_mut().rev() {
        *digit = b'0' + (value % 10) as u8;
        value /= 10;
    }
}

/// (year, month 1..=12, day 1..=31) of the proleptic Gregorian calendar for a count of days
/// since 1970-01-01. Howard Hinnant's `civil_from_days`, restricted to non-negative days.
fn civil_from_days(days_since_epoch: u64) -> (u64, u64, u64) {
    // Shift the epoch to 0000-03-01 so leap days fall at the end of a 400-year era.
    let z = days_since_epoch + 719_468;
    let era = z / 146_097;
    let day_of_era = z % 146_097;
    let year_of_era =
        (day_of_era - day_of_era / 1460 + day_of_era / 36_524 - day_of_era / 146_096) / 365;
    let day_of_year = day_of_era - (365 * year_of_era + year_of_era / 4 - year_of_era / 100);
    let month_from_march = (5 * day_of_year + 2) / 153;
    let day = day_of_year - (153 * month_from_march + 2) / 5 + 1;
    let month = if month_from_march < 10 {
        month_from_march + 3
    } else {
        month_from_march - 9
    };
    let year = year_of_era + era * 400 + u64::from(month <= 2);
    (year, month, day)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, UNIX_EPOCH};

    fn id(ms: u64, seq: u64) -> MessageId {
        MessageId::new(ms, seq)
    }

    #[test]
    fn ids_order_by_ms_then_seq() {
        assert!(id(1, 5) < id(2, 0));
        assert!(id(2, 0) < id(2, 1));
        assert!(MessageId::MIN < id(0, 1));
        assert!(id(u64::MAX, u64::MAX - 1) < MessageId::MAX);
    }

    #[test]
    fn next_after_follows_valkey_rule() {
        assert_eq!(MessageId::next_after(None, 1000), id(1000, 0));
        // Never 0-0, so MIN stays strictly before every assigned id.
        assert_eq!(MessageId::next_after(None, 0), id(0, 1));
        assert_eq!(MessageId::next_after(Some(id(1000, 0)), 1001), id(1001, 0));
        assert_eq!(MessageId::next_after(Some(id(1000, 0)), 1000), id(1000, 1));
        // Clock stepped back: continue the old millisecond.
        assert_eq!(MessageId::next_after(Some(id(1000, 7)), 900), id(1000, 8));
    }

    #[test]
    fn next_after_seq_overflow_moves_to_next_ms() {
        assert_eq!(
            MessageId::next_after(Some(id(1000, u64::MAX)), 1000),
            id(1001, 0)
        );
        assert_eq!(
            MessageId::next_after(Some(id(1000, u64::MAX)), 5),
            id(1001, 0)
        );
        assert_eq!(
            MessageId::next_after(Some(MessageId::MAX), 5),
            MessageId::MAX
        );
    }

    #[test]
    fn next_after_is_strictly_increasing_under_a_jumping_clock() {
        let clock = [5u64, 5, 3, 9, 9, 0, 10, 10, 2];
        let mut last = None;
        for now in clock {
            let next = MessageId::next_after(last, now);
            assert!(last.is_none_or(|l| next > l), "{next} after {last:?}");
            last = Some(next);
        }
    }

    #[test]
    fn format_and_parse_round_trip() {
        for value in [
            id(0, 0),
            id(1_700_000_000_000, 3),
            id(u64::MAX, u64::MAX),
            id(1, 0),
        ] {
            let text = value.to_string();
            assert_eq!(text.parse::<MessageId>(), Ok(value));
            let mut buf = b"x".to_vec();
            value.write_to(&mut buf);
            assert_eq!(&buf[1..], text.as_bytes());
        }
        assert_eq!(id(1_700_000_000_000, 3).to_string(), "1700000000000-3");
        assert_eq!("007-01".parse::<MessageId>(), Ok(id(7, 1)));
    }

    #[test]
    fn parse_rejects_malformed() {
        for bad in [
            "", "1", "1-", "-1", "-", "a-b", "1-2-3", " 1-2", "1-2 ", "+1-2", "1-+2", "1--2",
            "1_2", "١-2",
        ] {
            assert_eq!(
                bad.parse::<MessageId>(),
                Err(InvalidMessageId::Malformed),
                "{bad:?}"
            );
        }
        for too_big in ["18446744073709551616-0", "0-18446744073709551616"] {
            assert_eq!(
                too_big.parse::<MessageId>(),
                Err(InvalidMessageId::OutOfRange)
            );
        }
    }

    #[test]
    fn serde_uses_the_string_form() {
        let value = id(1_700_000_000_000, 3);
        assert_eq!(
            serde_json::to_string(&value).ok().as_deref(),
            Some("\"1700000000000-3\"")
        );
        let back: Result<MessageId, _> = serde_json::from_str("\"1700000000000-3\"");
        assert_eq!(back.ok(), Some(value));
        // An escaped string is not borrowable; the visitor must still accept it.
        let escaped: Result<MessageId, _> = serde_json::from_str("\"1\\u002d2\"");
        assert_eq!(escaped.ok(), Some(id(1, 2)));
        assert!(serde_json::from_str::<MessageId>("\"1-x\"").is_err());
        assert!(serde_json::from_str::<MessageId>("12").is_err());
    }

    fn message(payload: &'static str, metadata: Option<&'static str>) -> Message {
        Message {
            id: id(1_795_430_346_123, 2),
            timestamp_ms: 1_795_430_346_123,
            expires_at_ms: None,
            payload: Bytes::from_static(payload.as_bytes()),
            metadata: metadata.map(|m| Bytes::from_static(m.as_bytes())),
        }
    }

    #[test]
    fn message_json_is_exact() {
        let mut out = Vec::new();
        write_message_json(
            &mut out,
            "orders",
            &message(r#"{"a":[1,2]}"#, Some(r#"{"k":"v"}"#)),
        );
        assert_eq!(
            String::from_utf8_lossy(&out),
            r#"{"message_id":"1795430346123-2","topic":"orders","payload":{"a":[1,2]},"timestamp":"2026-11-23T10:39:06.123Z","metadata":{"k":"v"}}"#
        );
    }

    #[test]
    fn message_json_escapes_topic_and_writes_null_metadata() {
        let mut out = b"prefix,".to_vec();
        write_message_json(&mut out, "a\"b\\c\n\u{1}é", &message("42", None));
        assert_eq!(
            String::from_utf8_lossy(&out),
            "prefix,{\"message_id\":\"1795430346123-2\",\"topic\":\"a\\\"b\\\\c\\n\\u0001é\",\"payload\":42,\"timestamp\":\"2026-11-23T10:39:06.123Z\",\"metadata\":null}"
        );
        let parsed: serde_json::Value =
            serde_json::from_slice(&out[7..]).unwrap_or(serde_json::Value::Null);
        assert_eq!(parsed["topic"], "a\"b\\c\n\u{1}é");
    }

    #[test]
    fn rfc3339_known_values() {
        let cases = [
            (0, "1970-01-01T00:00:00.000Z"),
            (1, "1970-01-01T00:00:00.001Z"),
            (951_782_400_000, "2000-02-29T00:00:00.000Z"),
            (4_107_542_399_999, "2100-02-28T23:59:59.999Z"),
            (4_107_542_400_000, "2100-03-01T00:00:00.000Z"),
            (1_795_430_346_123, "2026-11-23T10:39:06.123Z"),
            (MAX_RFC3339_MS, "9999-12-31T23:59:59.999Z"),
            (u64::MAX, "9999-12-31T23:59:59.999Z"),
        ];
        for (ms, expected) in cases {
            let mut out = Vec::new();
            write_rfc3339_millis(&mut out, ms);
            assert_eq!(String::from_utf8_lossy(&out), expected, "{ms}");
        }
    }

    #[test]
    fn rfc3339_matches_humantime() {
        // Strides that are not multiples of a day or a second, so every field and many
        // month/leap-year boundaries are exercised across the whole four-digit range.
        let mut checked = 0;
        let whole_range = (0u64, MAX_RFC3339_MS);
        // 1999-12-31 .. 2101-01-01 day by day (minus a millisecond, so times drift too).
        let around_now = (946_598_400_000u64, 4_133_980_800_000);
        for (stride, (from, to)) in [
            (86_399_999u64, around_now),
            (3_023_999_977, whole_range),
            (31_556_952_007, whole_range),
        ] {
            let mut ms = from;
            while ms <= to {
                let mut out = Vec::new();
                write_rfc3339_millis(&mut out, ms);
                let expected =
                    humantime::format_rfc3339_millis(UNIX_EPOCH + Duration::from_millis(ms))
                        .to_string();
                assert_eq!(String::from_utf8_lossy(&out), expected, "{ms}");
                ms += stride;
                checked += 1;
            }
        }
        assert!(checked > 100_000, "{checked}");
    }

    /// Runs of milliseconds within one second and across second, day and year boundaries,
    /// forwards, backwards and alternating: the remembered second is never used for another.
    #[test]
    fn rfc3339_remembered_second_matches_humantime() {
        let check = |ms: u64| {
            let mut out = Vec::new();
            write_rfc3339_millis(&mut out, ms);
            let expected = humantime::format_rfc3339_millis(UNIX_EPOCH + Duration::from_millis(ms))
                .to_string();
            assert_eq!(String::from_utf8_lossy(&out), expected, "{ms}");
        };
        // 2026-12-31T23:59:59.998Z: a second, a day and a year end together.
        let edge = 1_798_761_599_998u64;
        for ms in (edge - 1_003..edge + 1_003).chain((edge - 3..edge + 3).rev()) {
            check(ms);
        }
        for i in 0..2_000u64 {
            check(if i % 2 == 0 { edge + i } else { edge - i });
        }
        check(MAX_RFC3339_MS);
        check(0);
    }

    #[test]
    fn footprint_and_expiry() {
        let mut msg = message("12345", Some("{}"));
        assert_eq!(msg.footprint(), 5 + 2 + MESSAGE_OVERHEAD_BYTES);
        assert!(!msg.is_expired(u64::MAX));
        msg.expires_at_ms = Some(100);
        assert!(!msg.is_expired(99));
        assert!(msg.is_expired(100));
        assert!(std::mem::size_of::<Message>() <= 104);
    }

    #[test]
    fn message_is_send_and_sync() {
        fn assert_send_sync<T: Send + Sync>() {}
        assert_send_sync::<Message>();
        assert_send_sync::<MessageId>();
    }
}
