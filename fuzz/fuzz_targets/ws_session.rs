//! A WebSocket session's client side as the relay reads it: frames arrive in arbitrary reads
//! and go through `ws::codec::Decoder` (masking, fragmentation, interleaved control frames,
//! UTF-8, size limits); each text message goes through `ws::protocol::parse_client_message`
//! and, for a subscribe, the per-topic checks the session makes (topic rule, offset
//! resolution via `net::websocket::start_for`); the replies the session would send
//! (error, unsubscribed, pong, close echo) are encoded and their JSON checked.
//!
//! Input: see `pulsar_relay_fuzz` (`knob % 4` picks a row of `LIMITS`). The stream is decoded
//! in one read and in the input's pieces; both must give the same messages and the same close.

#![no_main]

use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;
use pulsar_relay::net::websocket::start_for;
use pulsar_relay::ws::codec::{
    encode_close, encode_close_echo, encode_pong, text_frame, CloseReason, CodecLimits, Decoder,
    Incoming,
};
use pulsar_relay::ws::protocol::{self, ClientMessage};
use pulsar_relay_fuzz::{relay_config, SplitInput};

/// The defaults, tiny limits, control-frame-sized frames, and a message limit below the
/// frame limit.
const LIMITS: [CodecLimits; 4] = [
    CodecLimits {
        max_frame_bytes: 1 << 20,
        max_message_bytes: 1 << 20,
    },
    CodecLimits {
        max_frame_bytes: 16,
        max_message_bytes: 32,
    },
    CodecLimits {
        max_frame_bytes: 125,
        max_message_bytes: 1000,
    },
    CodecLimits {
        max_frame_bytes: 1000,
        max_message_bytes: 100,
    },
];

/// Control frames carry at most 125 bytes (RFC 6455 §5.5).
const MAX_CONTROL_PAYLOAD: usize = 125;

fn decode_all<'a>(
    limits: CodecLimits,
    pieces: impl Iterator<Item = &'a [u8]>,
) -> (Vec<Incoming>, Option<CloseReason>) {
    let mut decoder = Decoder::new(limits);
    let mut buf = BytesMut::new();
    let mut messages = Vec::new();
    for piece in pieces {
        buf.extend_from_slice(piece);
        loop {
            let before = buf.len();
            match decoder.decode(&mut buf) {
                Ok(Some(incoming)) => {
                    assert!(buf.len() < before, "a message out of no bytes");
                    check_size(&incoming, limits);
                    messages.push(incoming);
                }
                Ok(None) => break,
                Err(reason) => {
                    // Sticky: every later call reports the same close.
                    assert_eq!(decoder.decode(&mut buf), Err(reason));
                    return (messages, Some(reason));
                }
            }
        }
    }
    (messages, None)
}

fn check_size(incoming: &Incoming, limits: CodecLimits) {
    match incoming {
        Incoming::Text(text) => assert!(text.len() <= limits.max_message_bytes),
        Incoming::Binary(data) => assert!(data.len() <= limits.max_message_bytes),
        Incoming::Ping(data) | Incoming::Pong(data) => assert!(data.len() <= MAX_CONTROL_PAYLOAD),
        Incoming::Close(Some((_, reason))) => assert!(reason.len() <= MAX_CONTROL_PAYLOAD - 2),
        Incoming::Close(None) => {}
    }
}

/// A JSON text the session would frame and send.
fn check_reply(json: &[u8]) {
    if let Err(e) = serde_json::from_slice::<serde_json::Value>(json) {
        panic!(
            "reply is not JSON ({e}): {:?}",
            String::from_utf8_lossy(json)
        );
    }
    let frame = text_frame(json);
    assert!(frame.len() >= json.len() + 2);
}

/// What the session does with one client message, short of touching shard state.
fn act_on(incoming: &Incoming) {
    let config = relay_config();
    let mut out = BytesMut::new();
    match incoming {
        Incoming::Text(text) => {
            let mut reply = Vec::new();
            match protocol::parse_client_message(text, config.ws.max_topics) {
                Err(e) => match e.reason() {
                    Some(reason) => {
                        protocol::write_subscription_error(&mut reply, reason, &e.message())
                    }
                    None => protocol::write_error(&mut reply, e.code(), &e.message()),
                },
                Ok(ClientMessage::Subscribe { topics, offset, .. }) => {
                    assert!(topics.len() <= config.ws.max_topics);
                    for topic in &topics {
                        if let Err(e) =
                            pulsar_relay::topic::validate(topic, config.api.max_topic_name_len)
                        {
                            let message = format!("`{}`: {e}", topic.escape_debug());
                            protocol::write_subscription_error(
                                &mut reply,
                                "INVALID_TOPIC",
                                &message,
                            );
                            break;
                        }
                        if let Err(message) = start_for(&offset, topic) {
                            protocol::write_subscription_error(
                                &mut reply,
                                "INVALID_OFFSET",
                                &message,
                            );
                            break;
                        }
                    }
                }
                Ok(ClientMessage::Unsubscribe { topics, .. }) => {
                    assert!(topics.len() <= config.ws.max_topics);
                    let names: Vec<&str> = topics.iter().map(String::as_str).collect();
                    protocol::write_unsubscribed(&mut reply, &names);
                }
                Ok(ClientMessage::Ack { .. }) => {}
                Ok(ClientMessage::GroupAck {
                    topic,
                    group,
                    ids,
                    nack,
                }) => {
                    assert!(ids.len() <= protocol::MAX_ACK_IDS);
                    let ids: Vec<&str> = ids.iter().map(String::as_str).collect();
                    protocol::write_group_settled(&mut reply, nack, &topic, &group, &ids, &[]);
                }
                // The token is checked by the shard's `Auth` (not reached here); the answers
                // are `auth` or an `AUTH_FAILED` error.
                Ok(ClientMessage::Auth { token }) => {
                    assert!(!token.is_empty());
                    protocol::write_auth_ok(&mut reply, "2023-11-14T22:13:20.000Z");
                }
                Ok(ClientMessage::Ping) => {
                    protocol::write_pong(&mut reply, "2023-11-14T22:13:20.000Z");
                }
            }
            if !reply.is_empty() {
                check_reply(&reply);
            }
        }
        Incoming::Ping(payload) => encode_pong(&mut out, payload),
        Incoming::Close(close) => {
            encode_close_echo(&mut out, close.as_ref().map(|(code, _)| *code))
        }
        Incoming::Binary(_) | Incoming::Pong(_) => {}
    }
}

fuzz_target!(|data: &[u8]| {
    let Some(input) = SplitInput::parse(data) else {
        return;
    };
    let limits = LIMITS[usize::from(input.knob) % LIMITS.len()];
    let (messages, close) = decode_all(limits, std::iter::once(input.stream));
    for incoming in &messages {
        act_on(incoming);
    }
    if let Some(reason) = close {
        let mut out = BytesMut::new();
        encode_close(&mut out, &reason);
        assert!(out.len() <= 2 + MAX_CONTROL_PAYLOAD);
    }
    if !input.lens.is_empty() {
        let split = decode_all(limits, input.pieces());
        assert_eq!(
            (messages, close),
            split,
            "read boundaries changed the session"
        );
    }
});
