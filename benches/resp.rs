//! Cost of the RESP codec on the Valkey path: encoding one publish's `XADD` into a `Command`,
//! and `decode_reply` on an `XADD` reply (one stream id) and on an `XRANGE` reply of 100
//! entries (per entry via the items counter).
//!
//! Does not measure the client's queueing, batching or socket I/O. Each decode iteration gets
//! a fresh copy of the reply bytes (copying is outside the timing).

use bytes::BytesMut;
use divan::counter::ItemsCount;
use divan::{black_box, Bencher};
use pulsar_relay::valkey::{decode_reply, Command, Reply};

fn main() {
    divan::main();
}

/// A 100-byte JSON payload.
const PAYLOAD: &[u8] = br#"{"order_id":"A-1023456","status":"shipped","amount":12999.95,"currency":"EUR","warehouse":"FRA-002"}"#;

/// The stream key the default key template gives topic `orders.eu-west`.
const KEY: &[u8] = b"topic:orders.eu-west:stream";

/// The wire `timestamp` field: RFC 3339 with milliseconds (always 24 bytes).
const TIMESTAMP: &[u8] = b"2026-11-23T10:39:06.123Z";

const XADD_REPLY: &[u8] = b"$15\r\n1700000000000-0\r\n";

const XRANGE_ENTRIES: usize = 100;

fn bulk(out: &mut Vec<u8>, value: &[u8]) {
    out.extend_from_slice(format!("${}\r\n", value.len()).as_bytes());
    out.extend_from_slice(value);
    out.extend_from_slice(b"\r\n");
}

/// `XRANGE` reply: an array of `[id, [payload, <json>, timestamp, <rfc3339>]]` entries, the
/// fields the relay writes with every `XADD`.
fn xrange_reply() -> Vec<u8> {
    let mut out = format!("*{XRANGE_ENTRIES}\r\n").into_bytes();
    for i in 0..XRANGE_ENTRIES {
        out.extend_from_slice(b"*2\r\n");
        bulk(
            &mut out,
            format!("{}-{}", 1_700_000_000_000u64 + i as u64, i % 3).as_bytes(),
        );
        out.extend_from_slice(b"*4\r\n");
        bulk(&mut out, b"payload");
        bulk(&mut out, PAYLOAD);
        bulk(&mut out, b"timestamp");
        bulk(&mut out, TIMESTAMP);
    }
    out
}

#[divan::bench]
fn encode_xadd(bencher: Bencher) {
    bencher.bench_local(|| {
        Command::new(&[
            b"XADD",
            black_box(KEY),
            b"MAXLEN",
            b"~",
            b"1000000",
            b"*",
            b"payload",
            black_box(PAYLOAD),
            b"timestamp",
            black_box(TIMESTAMP),
        ])
    });
}

#[divan::bench]
fn decode_xadd_reply(bencher: Bencher) {
    let mut check = BytesMut::from(XADD_REPLY);
    assert_eq!(
        decode_reply(&mut check).expect("fixture must decode"),
        Some(Reply::Bulk(bytes::Bytes::from_static(b"1700000000000-0")))
    );
    bencher
        .with_inputs(|| BytesMut::from(XADD_REPLY))
        .bench_local_refs(decode_reply);
}

/// The time is for the whole reply; the items rate is per stream entry.
#[divan::bench]
fn decode_xrange_100(bencher: Bencher) {
    let reply = xrange_reply();
    let mut check = BytesMut::from(&reply[..]);
    let decoded = decode_reply(&mut check)
        .expect("fixture must decode")
        .and_then(Reply::into_array)
        .expect("fixture is one complete array");
    assert_eq!(decoded.len(), XRANGE_ENTRIES);
    assert!(check.is_empty(), "fixture is exactly one reply");
    bencher
        .counter(ItemsCount::new(XRANGE_ENTRIES))
        .with_inputs(|| BytesMut::from(&reply[..]))
        .bench_local_refs(decode_reply);
}
