//! Cost of encoding one delivered message for N WebSocket subscribers on a shard, the way the
//! relay does it (one `Delivered::ws_frame` shared by every subscriber, each taking a `Bytes`
//! clone) against a naive per-subscriber `text_frame`; plus the one-off cost of each wire
//! form (`json`, `ws_frame`, `sse_event`) of a fresh `Delivered`.
//!
//! Does not measure the registry walk, the sinks' queues or socket writes. Every iteration
//! starts from a fresh `Delivered` (its encodings are cached inside it) built outside the
//! timing; outputs are dropped outside the timing too.

use std::sync::Arc;

use bytes::Bytes;
use divan::counter::ItemsCount;
use divan::Bencher;
use pulsar_relay::delivery::sink::Delivered;
use pulsar_relay::store::message::{Message, MessageId};
use pulsar_relay::ws::codec::text_frame;
use pulsar_relay::ws::protocol::MESSAGE_PREFIX;

fn main() {
    divan::main();
}

/// A 100-byte JSON payload.
const PAYLOAD: &[u8] = br#"{"order_id":"A-1023456","status":"shipped","amount":12999.95,"currency":"EUR","warehouse":"FRA-002"}"#;

const SUBSCRIBERS: &[usize] = &[1, 100, 1000];

struct Fixture {
    topic: Arc<str>,
    message: Message,
}

impl Fixture {
    fn new() -> Fixture {
        Fixture {
            topic: Arc::from("orders.eu-west"),
            message: Message {
                id: MessageId::new(1_700_000_000_000, 0),
                timestamp_ms: 1_700_000_000_000,
                expires_at_ms: None,
                // Owned like a published payload (not static), so clones touch a refcount.
                payload: Bytes::copy_from_slice(PAYLOAD),
                metadata: Some(Bytes::from_static(br#"{"source":"checkout"}"#)),
            },
        }
    }

    fn delivered(&self) -> Delivered {
        Delivered::new(self.topic.clone(), self.message.clone())
    }
}

/// What the relay does: encode the frame once, every subscriber shares it.
#[divan::bench(args = SUBSCRIBERS)]
fn shared_frame(bencher: Bencher, subscribers: usize) {
    let fixture = Fixture::new();
    bencher
        .counter(ItemsCount::new(subscribers))
        .with_inputs(|| (fixture.delivered(), Vec::with_capacity(subscribers)))
        .bench_local_values(|(delivered, mut frames): (Delivered, Vec<Bytes>)| {
            let frame = delivered.ws_frame();
            for _ in 0..subscribers {
                frames.push(frame.clone());
            }
            (delivered, frames)
        });
}

/// The alternative: the message text is built once, but every subscriber frames it itself.
#[divan::bench(args = SUBSCRIBERS)]
fn naive_per_subscriber(bencher: Bencher, subscribers: usize) {
    let fixture = Fixture::new();
    let reference = fixture.delivered();
    assert_eq!(
        &text_frame(&ws_text(&reference)),
        reference.ws_frame(),
        "the naive frame must equal the shared one"
    );
    bencher
        .counter(ItemsCount::new(subscribers))
        .with_inputs(|| (fixture.delivered(), Vec::with_capacity(subscribers)))
        .bench_local_values(|(delivered, mut frames): (Delivered, Vec<Bytes>)| {
            let text = ws_text(&delivered);
            for _ in 0..subscribers {
                frames.push(text_frame(&text));
            }
            (delivered, frames)
        });
}

/// The `{"type":"message",…}` text `Delivered::ws_frame` frames.
fn ws_text(delivered: &Delivered) -> Vec<u8> {
    let json = delivered.json();
    let mut text = Vec::with_capacity(json.len() + MESSAGE_PREFIX.len());
    text.extend_from_slice(MESSAGE_PREFIX);
    text.extend_from_slice(&json[1..]);
    text
}

/// The message JSON (history reads, long-poll), first use on a fresh `Delivered`.
#[divan::bench]
fn json(bencher: Bencher) {
    let fixture = Fixture::new();
    bencher
        .with_inputs(|| fixture.delivered())
        .bench_local_values(|delivered| {
            delivered.json();
            delivered
        });
}

/// The WebSocket frame, first use on a fresh `Delivered` (includes building the JSON).
#[divan::bench]
fn ws_frame(bencher: Bencher) {
    let fixture = Fixture::new();
    bencher
        .with_inputs(|| fixture.delivered())
        .bench_local_values(|delivered| {
            delivered.ws_frame();
            delivered
        });
}

/// The SSE event, first use on a fresh `Delivered` (includes building the JSON).
#[divan::bench]
fn sse_event(bencher: Bencher) {
    let fixture = Fixture::new();
    bencher
        .with_inputs(|| fixture.delivered())
        .bench_local_values(|delivered| {
            delivered.sse_event();
            delivered
        });
}
