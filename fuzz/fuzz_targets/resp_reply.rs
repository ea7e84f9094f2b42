//! Valkey's replies as the relay reads them: RESP2 frames arriving in arbitrary reads go
//! through `valkey::codec::decode_reply` (nested arrays, nil, errors, huge declared lengths),
//! then through what the stream tier makes of them: `store::valkey::parse_entries` /
//! `parse_entry` (XRANGE/XREVRANGE entries, and the entries nested in XREAD and XINFO
//! replies) and `ServerInfo::parse` (INFO text). Every array of bulk strings is also encoded
//! as a command with `encode_command` and must validate and decode back to itself.
//!
//! Input: see `pulsar_relay_fuzz` (the knob is unused). The stream is decoded in one read and
//! in the input's pieces: both must give the same replies and the same outcome, and an
//! incomplete frame must leave the buffer untouched.

#![no_main]

use bytes::{Bytes, BytesMut};
use libfuzzer_sys::fuzz_target;
use pulsar_relay::store::valkey::{parse_entries, parse_entry, ServerInfo};
use pulsar_relay::valkey::codec::{
    decode_reply, decode_reply_slice, encode_command, validate_command, Reply,
};
use pulsar_relay_fuzz::SplitInput;

/// Replies decoded from a stream, and whether it ended in a protocol error.
fn decode_all<'a>(pieces: impl Iterator<Item = &'a [u8]>) -> (Vec<Reply>, bool) {
    let mut buf = BytesMut::new();
    let mut replies = Vec::new();
    for piece in pieces {
        buf.extend_from_slice(piece);
        loop {
            let snapshot = buf.clone();
            let sliced = decode_reply_slice(&buf);
            match decode_reply(&mut buf) {
                Ok(Some(reply)) => {
                    let Ok(Some((same, used))) = sliced else {
                        panic!("decode_reply_slice disagrees: {sliced:?}");
                    };
                    assert_eq!(same, reply);
                    assert!(used > 0 && used <= snapshot.len());
                    assert_eq!(buf[..], snapshot[used..], "consumed other than the frame");
                    replies.push(reply);
                }
                Ok(None) => {
                    assert!(matches!(sliced, Ok(None)));
                    assert_eq!(buf, snapshot, "an incomplete frame was consumed");
                    break;
                }
                Err(_) => {
                    assert!(sliced.is_err());
                    return (replies, true);
                }
            }
        }
    }
    (replies, false)
}

/// Walks a reply as the stream tier would meet its parts.
fn interpret(reply: &Reply, depth: usize) {
    let _ = (
        reply.as_int(),
        reply.as_error(),
        reply.is_nil(),
        reply.is_ok(),
    );
    if let Some(text) = reply.as_str() {
        let info = ServerInfo::parse(text);
        let _ = info.data_loss_risks();
    }
    let Some(items) = reply.as_array() else {
        return;
    };
    for (id, message) in parse_entries(reply) {
        assert_eq!(message.id, id);
        if let Some(expires) = message.expires_at_ms {
            assert!(expires >= message.timestamp_ms);
        }
    }
    if let Some((id, message)) = parse_entry(reply) {
        assert_eq!(message.id, id);
    }
    roundtrip_command(items);
    // Depth is bounded by the input size (each level costs at least 4 bytes), but keep the
    // walk's own stack small on deep inputs.
    if depth < 64 {
        for item in items {
            interpret(item, depth + 1);
        }
    }
}

/// An array of bulk strings is a command's shape: encoding it must give one valid command
/// that decodes to the same array.
fn roundtrip_command(items: &[Reply]) {
    let Some(args) = items
        .iter()
        .map(|item| match item {
            Reply::Bulk(bytes) => Some(&bytes[..]),
            _ => None,
        })
        .collect::<Option<Vec<&[u8]>>>()
    else {
        return;
    };
    let mut encoded = BytesMut::new();
    encode_command(&mut encoded, &args);
    if args.is_empty() {
        assert!(
            validate_command(&encoded).is_err(),
            "an empty command must be refused"
        );
        return;
    }
    assert_eq!(validate_command(&encoded), Ok(()));
    let decoded = decode_reply(&mut encoded).expect("our own encoding decodes");
    let expected = Reply::Array(
        args.iter()
            .map(|a| Reply::Bulk(Bytes::copy_from_slice(a)))
            .collect(),
    );
    assert_eq!(decoded, Some(expected));
    assert!(encoded.is_empty());
}

fuzz_target!(|data: &[u8]| {
    let Some(input) = SplitInput::parse(data) else {
        return;
    };
    let _ = validate_command(input.stream);
    let whole = decode_all(std::iter::once(input.stream));
    for reply in &whole.0 {
        interpret(reply, 0);
    }
    if !input.lens.is_empty() {
        assert_eq!(
            whole,
            decode_all(input.pieces()),
            "read boundaries changed the replies"
        );
    }
});
