//! Cost of the hot tier's two hot operations: `HotTier::append` in steady state (the tier is
//! full, so every append also removes one message) on one topic and on 1000 topics
//! round-robin, and `read` of a 100-message page (per message via the items counter) in
//! either order from a 100k-message topic, the cursor in the middle.
//!
//! Does not measure expiry sweeps, trims or topic stats. Every appended payload is its own
//! allocation made outside the timing, as the HTTP layer copies each payload out of the
//! request; freeing the evicted message's payload is inside the timing, as in the relay.

use bytes::Bytes;
use divan::counter::ItemsCount;
use divan::{black_box, Bencher};
use pulsar_relay::store::hot_tier::{HotTier, HotTierLimits, Order, PageQuery};
use pulsar_relay::store::message::MessageId;

fn main() {
    divan::main();
}

/// A 100-byte JSON payload.
const PAYLOAD: &[u8] = br#"{"order_id":"A-1023456","status":"shipped","amount":12999.95,"currency":"EUR","warehouse":"FRA-002"}"#;

/// A fixed clock: ids then differ only in `seq`, which costs the same as a moving clock and
/// keeps age retention out of the measurement.
const NOW_MS: u64 = 1_700_000_000_000;

const TOPIC_MESSAGES: usize = 100_000;

const PAGE: usize = 100;

fn payload() -> Bytes {
    Bytes::copy_from_slice(PAYLOAD)
}

/// One topic at its count limit: each append drops the topic's oldest message.
///
/// 100 samples of 2000 appends span about two compactions of the arrival FIFO (one per
/// ~101k appends here, since every count-retention removal leaves a stale entry), so the
/// mean includes their amortised cost; divan's auto-tuned sample size would cover a few
/// hundred appends and miss them.
#[divan::bench(sample_size = 2000)]
fn append_1_topic(bencher: Bencher) {
    let mut tier = HotTier::new(HotTierLimits {
        max_messages_per_topic: TOPIC_MESSAGES,
        retention_ms: u64::MAX,
        max_bytes: usize::MAX,
    });
    for _ in 0..TOPIC_MESSAGES {
        tier.append("orders.eu-west", payload(), None, None, NOW_MS);
    }
    assert_eq!(tier.message_count(), TOPIC_MESSAGES);
    bencher
        .with_inputs(payload)
        .bench_local_values(|payload| tier.append("orders.eu-west", payload, None, None, NOW_MS));
}

/// 1000 topics written in turn, the shard at its byte budget (64 MiB of footprint, ~188k
/// messages): each append evicts the shard's oldest message, from another topic.
#[divan::bench(sample_size = 2000)]
fn append_1000_topics(bencher: Bencher) {
    let topics: Vec<String> = (0..1000).map(|i| format!("orders.region-{i:04}")).collect();
    let mut tier = HotTier::new(HotTierLimits {
        max_messages_per_topic: TOPIC_MESSAGES,
        retention_ms: u64::MAX,
        max_bytes: 64 * 1024 * 1024,
    });
    let mut next = 0;
    while tier.evictions() == 0 {
        tier.append(&topics[next], payload(), None, None, NOW_MS);
        next = (next + 1) % topics.len();
    }
    assert_eq!(tier.topic_count(), topics.len());
    bencher.with_inputs(payload).bench_local_values(|payload| {
        let message = tier.append(&topics[next], payload, None, None, NOW_MS);
        next = (next + 1) % topics.len();
        message
    });
}

/// A tier holding one 100k-message topic, and the id of its middle message.
fn full_topic() -> (HotTier, MessageId) {
    let mut tier = HotTier::new(HotTierLimits {
        max_messages_per_topic: TOPIC_MESSAGES,
        retention_ms: u64::MAX,
        max_bytes: usize::MAX,
    });
    let mut middle = MessageId::MIN;
    for i in 0..TOPIC_MESSAGES {
        let message = tier.append("orders.eu-west", payload(), None, None, NOW_MS);
        if i == TOPIC_MESSAGES / 2 {
            middle = message.id;
        }
    }
    (tier, middle)
}

fn bench_read(bencher: Bencher, order: Order) {
    let (tier, middle) = full_topic();
    let query = PageQuery::new(Some(middle), order, PAGE);
    let page = tier
        .read("orders.eu-west", &query, NOW_MS)
        .expect("the topic exists");
    assert_eq!(page.messages.len(), PAGE);
    assert!(page.next_cursor.is_some(), "the page is mid-topic");
    bencher
        .counter(ItemsCount::new(PAGE))
        .bench_local(|| tier.read(black_box("orders.eu-west"), black_box(&query), NOW_MS));
}

#[divan::bench]
fn read_page_asc(bencher: Bencher) {
    bench_read(bencher, Order::Asc);
}

#[divan::bench]
fn read_page_desc(bencher: Bencher) {
    bench_read(bencher, Order::Desc);
}
