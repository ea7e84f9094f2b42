//! Black-box tests of retention with the Valkey backend, observed in the streams themselves:
//! the per-topic length cap (`MAXLEN ~` on every XADD), the exact trim endpoint, age retention
//! (`storage.persistent_tier_retention`) and per-message `ttl`.
//!
//! Owns: what retention leaves in Valkey and what the API still returns. Does not own: the
//! hot tier's own retention without Valkey (`retention.rs`).

mod common;

use std::time::Duration;

use common::valkey::{stream_key, ValkeyOpts, ValkeyServer};
use common::{eventually, shard_of};
use serde_json::Value;

/// One topic name per shard of a 2-shard relay, with the given prefix.
fn one_topic_per_shard(prefix: &str) -> Vec<String> {
    let candidates = common::topics(prefix, 32);
    (0..2)
        .map(|shard| {
            candidates
                .iter()
                .find(|t| shard_of(t, 2) == shard)
                .unwrap_or_else(|| panic!("no {prefix} topic routes to shard {shard}"))
                .clone()
        })
        .collect()
}

fn payload_ints(page: &Value) -> Vec<i64> {
    page["messages"]
        .as_array()
        .expect("messages array")
        .iter()
        .map(|m| m["payload"]["i"].as_i64().expect("payload.i"))
        .collect()
}

#[test]
fn length_cap_bounds_every_stream_approximately() {
    let valkey = ValkeyServer::start(ValkeyOpts::default());
    let relay = valkey.start_relay("storage:\n  max_messages_per_topic: 100\n", &[]);
    let names = one_topic_per_shard("capped");
    let mut conn = relay.connect();
    for i in 0..1000 {
        for topic in &names {
            conn.publish(topic, &format!(r#"{{"i":{i}}}"#));
        }
    }
    for topic in &names {
        let len = valkey.xlen(&stream_key(topic));
        // `MAXLEN ~ 100` trims whole stream nodes (100 entries each by default), so the length
        // stays between the cap and the cap plus a few nodes.
        assert!(
            (100..=400).contains(&len),
            "XLEN of {topic} is {len}, want 100..=400 with max_messages_per_topic 100"
        );
        let newest = relay.read_topic(topic, "order=desc&limit=100");
        let want: Vec<i64> = (900..1000).rev().collect();
        assert_eq!(
            payload_ints(&newest),
            want,
            "{topic}: newest 100 not readable"
        );
    }
}

#[test]
fn trim_endpoint_is_exact_in_valkey() {
    let valkey = ValkeyServer::start(ValkeyOpts::default());
    let relay = valkey.start_relay("", &[]);
    for topic in one_topic_per_shard("trimmed") {
        let mut conn = relay.connect();
        let mut ids = Vec::new();
        for i in 0..250 {
            let ack = conn.publish(&topic, &format!(r#"{{"i":{i}}}"#));
            ids.push(ack["message_id"].as_str().expect("id").to_string());
        }
        let resp = relay.post_json(
            &format!("/api/v1/topics/{topic}/trim"),
            r#"{"keep_count":10}"#,
        );
        assert_eq!(resp.status, 200, "{resp:?}");
        assert_eq!(resp.json()["removed"], 240, "{resp:?}");
        let key = stream_key(&topic);
        assert_eq!(valkey.xlen(&key), 10, "trim is not exact in Valkey");
        let kept: Vec<String> = valkey.xrange(&key).into_iter().map(|e| e.id).collect();
        assert_eq!(kept, ids[240..].to_vec());
        let page = relay.read_topic(&topic, "order=asc&limit=100");
        assert_eq!(
            payload_ints(&page),
            (240..250).collect::<Vec<i64>>(),
            "{page}"
        );
        assert_eq!(page["total"], 10, "{page}");
    }
}

#[test]
fn age_retention_removes_old_entries_from_valkey() {
    let valkey = ValkeyServer::start(ValkeyOpts::default());
    let relay = valkey.start_relay(
        "storage:\n  persistent_tier_retention: 2s\nhot_tier:\n  retention: 1s\n",
        &[],
    );
    let names = one_topic_per_shard("aged");
    let mut conn = relay.connect();
    for topic in &names {
        for i in 0..5 {
            conn.publish(topic, &format!(r#"{{"i":{i}}}"#));
        }
    }
    for topic in &names {
        let key = stream_key(topic);
        assert!(
            eventually(Duration::from_secs(20), || valkey.xlen(&key) == 0),
            "{key} still has {} entries 20 s into a 2 s retention",
            valkey.xlen(&key)
        );
        let page = relay.read_topic(topic, "order=asc");
        assert_eq!(payload_ints(&page), Vec::<i64>::new(), "{page}");
    }
}

#[test]
fn expired_ttl_messages_are_hidden_then_swept_from_valkey() {
    let valkey = ValkeyServer::start(ValkeyOpts::default());
    // Retention 40 s: long enough that only the ttl expires during the test, short enough
    // that the sweeper (which runs more often the shorter the retention) passes well within
    // the deadline below.
    let relay = valkey.start_relay("storage:\n  persistent_tier_retention: 40s\n", &[]);
    let names = one_topic_per_shard("ttl");
    let mut survivors = Vec::new();
    for topic in &names {
        let body = format!(r#"{{"topic":"{topic}","payload":{{"i":0}},"ttl":1}}"#);
        let resp = relay.post_json("/api/v1/messages", &body);
        assert_eq!(resp.status, 201, "{resp:?}");
        let ack = relay.publish(topic, r#"{"i":1}"#);
        survivors.push(ack["message_id"].as_str().expect("id").to_string());
        assert_eq!(valkey.xlen(&stream_key(topic)), 2);
    }
    for (topic, survivor) in names.iter().zip(&survivors) {
        let mut last = Value::Null;
        assert!(
            eventually(Duration::from_secs(10), || {
                last = relay.read_topic(topic, "order=asc");
                payload_ints(&last) == vec![1]
            }),
            "expired message still returned: {last}"
        );
        let key = stream_key(topic);
        assert!(
            eventually(Duration::from_secs(20), || valkey.xlen(&key) == 1),
            "expired entry not swept from {key}: {:?}",
            valkey.xrange(&key)
        );
        assert_eq!(valkey.xrange(&key)[0].id, *survivor);
    }
}
