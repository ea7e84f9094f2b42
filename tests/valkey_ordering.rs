//! Black-box test of the per-topic sequencer with the Valkey backend: with any number of
//! Valkey connections per shard (`valkey.connections_per_shard`) and both ack modes, every
//! acknowledged message reaches a WebSocket subscriber exactly once and in per-topic id order.
//!
//! Owns: id ordering under concurrent publishers over several connections. Does not own: what
//! a publish writes to the stream (`valkey_api.rs`) or faults (`valkey_faults.rs`).

mod common;

use std::collections::{BTreeMap, HashSet};
use std::time::{Duration, Instant};

use common::valkey::stream_key;
use common::valkey::{ValkeyOpts, ValkeyServer};
use common::ws::WsClient;
use common::{eventually, parse_id};

const PUBLISHERS: usize = 8;
const ROUNDS: usize = 20;
const BULK: usize = 16;
const TOPICS: [&str; 2] = ["seq-a", "seq-b"];

/// Publishes from `PUBLISHERS` concurrent connections to two topics with one subscriber
/// watching, and checks the subscriber's sequence against the acknowledgements.
fn every_acked_message_arrives_once_in_order(connections: usize, ack: &str) {
    let valkey = ValkeyServer::start(ValkeyOpts::default());
    let relay = valkey.start_relay(
        &format!("valkey:\n  connections_per_shard: {connections}\ndurability:\n  ack: {ack}\n"),
        &[],
    );
    let mut subscriber = WsClient::connect(relay.addr);
    subscriber.subscribe(&TOPICS, None);

    // Read while the publishers run: a subscriber that falls behind is closed as slow.
    let reader = std::thread::spawn(move || {
        let expected = PUBLISHERS * ROUNDS * BULK;
        let mut received: BTreeMap<String, Vec<String>> = BTreeMap::new();
        let mut count = 0;
        let deadline = Instant::now() + Duration::from_secs(30);
        while count < expected && Instant::now() < deadline {
            let Some(frame) = subscriber.try_recv(Duration::from_millis(500)) else {
                continue;
            };
            if frame["type"] != "message" {
                continue;
            }
            let topic = frame["topic"].as_str().expect("topic").to_owned();
            let id = frame["message_id"].as_str().expect("message_id").to_owned();
            received.entry(topic).or_default().push(id);
            count += 1;
        }
        received
    });

    // Payloads of a few KB make pipelines of tens of KB, which Valkey reads in chunks and
    // interleaves between connections: where two XADDs of one topic used to swap.
    let payload = format!(r#"{{"fill":"{}"}}"#, "x".repeat(3000));
    let publishers: Vec<_> = (0..PUBLISHERS)
        .map(|p| {
            let payload = payload.clone();
            let addr = relay.addr;
            std::thread::spawn(move || {
                let mut conn = common::Conn::connect(addr);
                let mut acked = Vec::new();
                for i in 0..ROUNDS {
                    // Bulk publishes spanning both topics: one pipeline of tens of KB each.
                    let items: Vec<String> = (0..BULK)
                        .map(|j| {
                            let topic = TOPICS[(p + i + j) % TOPICS.len()];
                            format!(r#"{{"topic":"{topic}","payload":{payload}}}"#)
                        })
                        .collect();
                    let body = format!(r#"{{"messages":[{}]}}"#, items.join(","));
                    let resp = conn.request("POST", "/api/v1/messages/bulk", Some(body.as_bytes()));
                    assert!(
                        [200, 201, 207].contains(&resp.status),
                        "bulk publish: {resp:?}"
                    );
                    let v = resp.json();
                    for result in v["results"].as_array().expect("results") {
                        assert_eq!(result["status"], "accepted", "{result}");
                        let topic = result["topic"].as_str().expect("topic").to_owned();
                        let id = result["message_id"].as_str().expect("id").to_owned();
                        acked.push((topic, id));
                    }
                }
                acked
            })
        })
        .collect();
    let mut acked: BTreeMap<String, HashSet<String>> = BTreeMap::new();
    for publisher in publishers {
        for (topic, id) in publisher.join().expect("publisher") {
            assert!(
                acked.entry(topic).or_default().insert(id.clone()),
                "{id} acknowledged twice"
            );
        }
    }
    let expected: usize = acked.values().map(HashSet::len).sum();
    assert_eq!(expected, PUBLISHERS * ROUNDS * BULK);

    let received = reader.join().expect("subscriber");
    for (topic, ids) in &received {
        let parsed: Vec<(u64, u64)> = ids.iter().map(|id| parse_id(id)).collect();
        assert!(
            parsed.windows(2).all(|w| w[0] < w[1]),
            "{connections} connections, ack {ack}: {topic} delivered out of id order"
        );
    }
    for (topic, ids) in &acked {
        let got: HashSet<String> = received.get(topic).into_iter().flatten().cloned().collect();
        let missing = ids.difference(&got).count();
        assert_eq!(
            missing,
            0,
            "{connections} connections, ack {ack}: {missing} of {} acknowledged messages of {topic} never arrived",
            ids.len()
        );
        assert_eq!(got.len(), ids.len(), "nothing unacknowledged delivered");
        // Persisted too (with `ack: buffered`, behind the acknowledgement): a write-behind
        // XADD whose explicit id was overtaken on another connection used to be rejected.
        let key = stream_key(topic);
        let mut stored = HashSet::new();
        let all_stored = eventually(Duration::from_secs(10), || {
            stored = valkey.xrange(&key).into_iter().map(|e| e.id).collect();
            ids.is_subset(&stored)
        });
        assert!(
            all_stored,
            "{connections} connections, ack {ack}: {} of {} acknowledged messages of {topic} are not in Valkey",
            ids.difference(&stored).count(),
            ids.len()
        );
    }
}

#[test]
fn one_topic_stays_in_order_over_one_connection() {
    every_acked_message_arrives_once_in_order(1, "persisted");
    every_acked_message_arrives_once_in_order(1, "buffered");
}

#[test]
fn one_topic_stays_in_order_over_two_connections() {
    every_acked_message_arrives_once_in_order(2, "persisted");
    every_acked_message_arrives_once_in_order(2, "buffered");
}

#[test]
fn one_topic_stays_in_order_over_four_connections() {
    every_acked_message_arrives_once_in_order(4, "persisted");
    every_acked_message_arrives_once_in_order(4, "buffered");
}
