//! The bytes loadgen sends and the parts of what it receives that it reads.
//!
//! Every payload is `{"seq":N,"sent_ns":T,"pad":"xxx…"}`: `seq` numbers the message within its
//! topic (for `verify`), `sent_ns` is the *intended* send time in ns since the run's epoch (a
//! monotonic clock shared by publishers and subscribers of this one process), and `pad` fills
//! the payload up to `--payload-bytes`. Delivery latency is receive time minus `sent_ns`.
//! With several `--publish-url`s a payload also names the relay it was published through,
//! `{"seq":N,"sent_ns":T,"via":K,"pad":…}` (K: index into the publish URLs), so a subscriber
//! can tell a delivery from its own relay from one that crossed to it from another.
//!
//! Received messages (a WebSocket `message` frame, a long-poll `messages[]` item, an SSE
//! `data:` line) are all the relay's message object; [`Incoming`] borrows from the frame and
//! skips `pad` without allocating.
//!
//! Sans-IO. Does not own the transports or the accounting.

use std::borrow::Cow;
use std::io::Write;

use serde::Deserialize;

/// The payload's bytes besides the numbers and the pad.
const FIXED_BYTES: usize = r#"{"seq":,"sent_ns":,"pad":""}"#.len();
/// Digits of a typical `seq` (~6) and `sent_ns` (~11, seconds into a run): the pad is sized
/// for these, so a 100-byte payload is 100 bytes give or take a few.
const TYPICAL_DIGITS: usize = 17;

/// Builds request bodies; one per sender, reusing its buffers.
#[derive(Debug, Clone)]
pub struct BodyBuilder {
    /// The pad string, made once: `payload_bytes` minus the fixed part.
    pad: String,
}

impl BodyBuilder {
    /// `payload_bytes`: the payload's target size. A target below the fixed part's size
    /// gives an empty pad (the payload is then a little larger than asked).
    pub fn new(payload_bytes: usize) -> BodyBuilder {
        BodyBuilder {
            pad: "x".repeat(payload_bytes.saturating_sub(FIXED_BYTES + TYPICAL_DIGITS)),
        }
    }

    /// Appends the payload object.
    pub fn write_payload(&self, out: &mut Vec<u8>, seq: u64, sent_ns: u64) {
        self.write_payload_via(out, seq, sent_ns, None);
    }

    /// Appends the payload object; `via`: the index of the publish URL it goes through, when
    /// there are several.
    pub fn write_payload_via(&self, out: &mut Vec<u8>, seq: u64, sent_ns: u64, via: Option<usize>) {
        // Writing into a Vec cannot fail.
        let _ = match via {
            None => write!(
                out,
                r#"{{"seq":{seq},"sent_ns":{sent_ns},"pad":"{}"}}"#,
                self.pad
            ),
            Some(via) => write!(
                out,
                r#"{{"seq":{seq},"sent_ns":{sent_ns},"via":{via},"pad":"{}"}}"#,
                self.pad
            ),
        };
    }

    /// Appends one message object `{"topic":..,"payload":..}`.
    pub fn write_message(
        &self,
        out: &mut Vec<u8>,
        topic: &str,
        seq: u64,
        sent_ns: u64,
        via: Option<usize>,
    ) {
        out.extend_from_slice(br#"{"topic":""#);
        // Topic names are ours ([A-Za-z0-9._-]): no escaping needed.
        out.extend_from_slice(topic.as_bytes());
        out.extend_from_slice(br#"","payload":"#);
        self.write_payload_via(out, seq, sent_ns, via);
        out.push(b'}');
    }
}

/// `{"messages":[m1,m2,…]}` from message objects written by `each`.
pub fn write_bulk(out: &mut Vec<u8>, count: usize, mut each: impl FnMut(&mut Vec<u8>, usize)) {
    out.extend_from_slice(br#"{"messages":["#);
    for i in 0..count {
        if i > 0 {
            out.push(b',');
        }
        each(out, i);
    }
    out.extend_from_slice(b"]}");
}

/// The fields of a received message that loadgen reads.
#[derive(Debug, Deserialize)]
pub struct Incoming<'a> {
    #[serde(rename = "type", borrow, default)]
    pub kind: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    pub message_id: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    pub topic: Option<Cow<'a, str>>,
    #[serde(default)]
    pub payload: Option<Probe>,
}

impl<'a> Incoming<'a> {
    /// Parses a message object or a WebSocket frame. Fast path for this relay's layout
    /// (`{"type":"message",` then `"message_id":..,"topic":..,"payload":{"seq":..,"sent_ns":..`
    /// in that order, our payload stored byte for byte), which reads ~100 bytes instead of
    /// the whole frame: in a 1000-way fan-out, full parsing was the largest cost of the
    /// generator, which shares the machine with the relay it measures. Anything else goes
    /// through serde.
    pub fn parse(text: &'a [u8]) -> Result<Incoming<'a>, serde_json::Error> {
        match fast_path(text) {
            Some(m) => Ok(m),
            None => serde_json::from_slice(text),
        }
    }
}

fn fast_path(text: &[u8]) -> Option<Incoming<'_>> {
    let (kind, rest) = match text.strip_prefix(br#"{"type":"message","#) {
        Some(rest) => (Some(Cow::Borrowed("message")), rest),
        None => (None, text.strip_prefix(b"{")?),
    };
    let (message_id, rest) = quoted(rest.strip_prefix(br#""message_id":"#)?)?;
    let (topic, rest) = quoted(rest.strip_prefix(br#","topic":"#)?)?;
    let (seq, rest) = number(rest.strip_prefix(br#","payload":{"seq":"#)?)?;
    let (sent_ns, rest) = number(rest.strip_prefix(br#","sent_ns":"#)?)?;
    let via = match rest.strip_prefix(br#","via":"#) {
        Some(rest) => Some(u32::try_from(number(rest)?.0).ok()?),
        None => None,
    };
    Some(Incoming {
        kind,
        message_id: Some(Cow::Borrowed(message_id)),
        topic: Some(Cow::Borrowed(topic)),
        payload: Some(Probe { seq, sent_ns, via }),
    })
}

/// A JSON string without escapes at the start of `s`, and what follows it.
fn quoted(s: &[u8]) -> Option<(&str, &[u8])> {
    let body = s.strip_prefix(b"\"")?;
    let end = body.iter().position(|b| *b == b'"' || *b == b'\\')?;
    if body[end] != b'"' {
        return None;
    }
    Some((std::str::from_utf8(&body[..end]).ok()?, &body[end + 1..]))
}

/// A non-negative JSON integer at the start of `s`, and what follows it.
fn number(s: &[u8]) -> Option<(u64, &[u8])> {
    let end = s
        .iter()
        .position(|b| !b.is_ascii_digit())
        .unwrap_or(s.len());
    if end == 0 || end > 20 {
        return None;
    }
    let n = std::str::from_utf8(&s[..end]).ok()?.parse().ok()?;
    Some((n, &s[end..]))
}

/// The part of our payload that matters on receipt. Unknown fields (`pad`) are skipped.
#[derive(Debug, Deserialize, PartialEq, Eq)]
pub struct Probe {
    pub seq: u64,
    pub sent_ns: u64,
    /// Which publish URL the message went through (several `--publish-url`s only).
    #[serde(default)]
    pub via: Option<u32>,
}

/// A bulk publish's answer: only the summary is read.
#[derive(Debug, Deserialize)]
pub struct BulkAnswer {
    pub summary: BulkSummary,
}

#[derive(Debug, Deserialize)]
pub struct BulkSummary {
    pub total: u64,
    pub accepted: u64,
    pub rejected: u64,
}

/// A long-poll answer.
#[derive(Debug, Deserialize)]
pub struct PollAnswer<'a> {
    #[serde(borrow, default)]
    pub messages: Vec<Incoming<'a>>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn payload_is_near_the_asked_size_and_round_trips() {
        let b = BodyBuilder::new(100);
        let mut out = Vec::new();
        b.write_payload(&mut out, 123_456, 12_345_678_901);
        assert!((95..=105).contains(&out.len()), "{} bytes", out.len());
        let v: serde_json::Value = serde_json::from_slice(&out).expect("valid JSON");
        assert_eq!(v["seq"], 123_456);
        assert_eq!(v["sent_ns"], 12_345_678_901u64);

        let tiny = BodyBuilder::new(1);
        out.clear();
        tiny.write_payload(&mut out, u64::MAX, u64::MAX);
        let v: serde_json::Value = serde_json::from_slice(&out).expect("valid JSON");
        assert_eq!(v["pad"], "");
    }

    #[test]
    fn message_and_bulk_bodies_are_valid_json() {
        let b = BodyBuilder::new(50);
        let mut out = Vec::new();
        write_bulk(&mut out, 3, |o, i| {
            b.write_message(o, "t-1", i as u64, 7, None)
        });
        let v: serde_json::Value = serde_json::from_slice(&out).expect("valid JSON");
        assert_eq!(v["messages"].as_array().map(Vec::len), Some(3));
        assert_eq!(v["messages"][2]["payload"]["seq"], 2);
        assert_eq!(v["messages"][0]["topic"], "t-1");
    }

    #[test]
    fn incoming_reads_a_ws_frame_and_skips_the_rest() {
        let frame = br#"{"type":"message","message_id":"17-3","topic":"t","payload":{"seq":4,"sent_ns":99,"pad":"xx"},"timestamp":"2026-01-01T00:00:00.000Z","metadata":{"a":"b"}}"#;
        let m: Incoming = serde_json::from_slice(frame).expect("parses");
        assert_eq!(m.kind.as_deref(), Some("message"));
        assert_eq!(m.message_id.as_deref(), Some("17-3"));
        assert_eq!(
            m.payload,
            Some(Probe {
                seq: 4,
                sent_ns: 99,
                via: None
            })
        );

        let subscribed = br#"{"type":"subscribed","topics":["t"],"session_id":"s"}"#;
        let m: Incoming = serde_json::from_slice(subscribed).expect("parses");
        assert!(m.payload.is_none());

        // A payload that is not ours is an error, which the caller counts as foreign.
        let other = br#"{"type":"message","payload":{"order":1}}"#;
        assert!(serde_json::from_slice::<Incoming>(other).is_err());
    }

    #[test]
    fn the_fast_path_agrees_with_serde_and_falls_back_when_it_must() {
        let frames: [&[u8]; 6] = [
            br#"{"type":"message","message_id":"17-3","topic":"t-0","payload":{"seq":4,"sent_ns":99,"pad":"xx"},"timestamp":"x","metadata":{}}"#,
            br#"{"message_id":"17-3","topic":"t-0","payload":{"seq":4,"sent_ns":99,"pad":"xx"},"timestamp":"x"}"#,
            // Python's spacing, another field order, an escaped id: serde.
            br#"{"type": "message", "message_id": "17-3", "topic": "t-0", "payload": {"seq": 4, "sent_ns": 99}}"#,
            br#"{"topic":"t-0","message_id":"17-3","payload":{"sent_ns":99,"seq":4}}"#,
            br#"{"message_id":"17\u002d3","topic":"t-0","payload":{"seq":4,"sent_ns":99}}"#,
            br#"{"type":"message","message_id":"17-3","topic":"t-0","payload":{"seq":4,"sent_ns":99}}"#,
        ];
        for f in frames {
            assert!(fast_path(f).is_some() || serde_json::from_slice::<Incoming>(f).is_ok());
            let m = Incoming::parse(f).expect("parses");
            assert_eq!(
                m.message_id.as_deref(),
                Some("17-3"),
                "{}",
                String::from_utf8_lossy(f)
            );
            assert_eq!(m.topic.as_deref(), Some("t-0"));
            assert_eq!(
                m.payload,
                Some(Probe {
                    seq: 4,
                    sent_ns: 99,
                    via: None
                })
            );
        }
        assert!(fast_path(frames[0]).is_some());
        assert!(fast_path(frames[1]).is_some());
        assert!(fast_path(frames[2]).is_none());
        assert!(fast_path(frames[4]).is_none(), "escapes go to serde");
        // Overlong or missing numbers are not guessed at.
        assert!(
            fast_path(br#"{"message_id":"1-0","topic":"t","payload":{"seq":,"sent_ns":1}}"#)
                .is_none()
        );
        assert!(fast_path(br#"{"message_id":"1-0","topic":"t","payload":{"seq":123456789012345678901,"sent_ns":1}}"#).is_none());
    }

    #[test]
    fn the_publish_url_index_rides_in_the_payload_and_is_read_back() {
        let b = BodyBuilder::new(100);
        let mut payload = Vec::new();
        b.write_payload_via(&mut payload, 4, 99, Some(2));
        let mut frame =
            br#"{"type":"message","message_id":"17-3","topic":"t-0","payload":"#.to_vec();
        frame.extend_from_slice(&payload);
        frame.extend_from_slice(br#","timestamp":"x","metadata":{}}"#);
        let want = Some(Probe {
            seq: 4,
            sent_ns: 99,
            via: Some(2),
        });
        assert_eq!(fast_path(&frame).and_then(|m| m.payload), want);
        let m: Incoming = serde_json::from_slice(&frame).expect("parses");
        assert_eq!(m.payload, want);
        // Without it, nothing is guessed.
        payload.clear();
        b.write_payload(&mut payload, 4, 99);
        assert!(!String::from_utf8_lossy(&payload).contains("via"));
        let mut message = Vec::new();
        b.write_message(&mut message, "t-0", 4, 99, Some(1));
        let v: serde_json::Value = serde_json::from_slice(&message).expect("valid JSON");
        assert_eq!(v["payload"]["via"], 1);
    }

    #[test]
    fn poll_and_bulk_answers_parse() {
        let poll = br#"{"messages":[{"message_id":"1-0","topic":"t","payload":{"seq":0,"sent_ns":5}}],"has_more":false,"next_offset":{"t":"1-0"}}"#;
        let p: PollAnswer = serde_json::from_slice(poll).expect("parses");
        assert_eq!(p.messages.len(), 1);
        let timeout = br#"{"messages":[],"has_more":false,"timeout":true}"#;
        let p: PollAnswer = serde_json::from_slice(timeout).expect("parses");
        assert!(p.messages.is_empty());
        let bulk = br#"{"results":[{"status":"accepted"}],"summary":{"total":2,"accepted":1,"rejected":1}}"#;
        let b: BulkAnswer = serde_json::from_slice(bulk).expect("parses");
        assert_eq!(
            (b.summary.total, b.summary.accepted, b.summary.rejected),
            (2, 1, 1)
        );
    }
}
