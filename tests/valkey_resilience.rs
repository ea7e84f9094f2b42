//! Black-box tests of the Valkey backend when processes go away: a relay restart (history now
//! served from Valkey), a Valkey restart under a running relay (503 + Retry-After during the
//! outage, reconnection without help), and SIGKILL of Valkey or of the relay during a publish
//! load. The invariant throughout: a message acknowledged with 201 is in the stream.
//!
//! Owns: durability and availability across restarts and crashes. Does not own: the data
//! layout (`valkey_api.rs`).

mod common;

use std::collections::HashMap;
use std::time::{Duration, Instant};

use common::valkey::{
    assert_acked_in_valkey, assert_unavailable, await_ready, stream_key, PublishLoad, ValkeyOpts,
    ValkeyServer,
};
use common::{assert_spans_shards, eventually, parse_id, topics, Server};
use serde_json::Value;

/// Short Valkey timeouts so an outage turns into 503s within about a second.
const FAST_FAILING: &str = "valkey:\n  connect_timeout: 1s\n  command_timeout: 1s\n";

/// A 503 during an outage may wait out the connect and command timeouts (1 s each above);
/// anything much slower is a request left hanging.
const MAX_OUTAGE_LATENCY: Duration = Duration::from_secs(6);

fn ids_of(page: &Value) -> Vec<String> {
    page["messages"]
        .as_array()
        .expect("messages array")
        .iter()
        .map(|m| m["message_id"].as_str().expect("message_id").to_string())
        .collect()
}

/// Every message of a topic through the API, oldest first, in pages of `limit`.
fn read_all(relay: &Server, topic: &str, limit: usize) -> Vec<(String, Value)> {
    let mut out = Vec::new();
    let mut cursor: Option<String> = None;
    for _ in 0..10_000 {
        let query = match &cursor {
            Some(c) => format!("order=asc&limit={limit}&cursor={c}"),
            None => format!("order=asc&limit={limit}"),
        };
        let page = relay.read_topic(topic, &query);
        for m in page["messages"].as_array().expect("messages") {
            out.push((
                m["message_id"].as_str().expect("id").to_string(),
                m["payload"].clone(),
            ));
        }
        match page["next_cursor"].as_str() {
            Some(c) => cursor = Some(c.to_string()),
            None => return out,
        }
    }
    panic!("pagination of {topic} did not end");
}

#[test]
fn relay_restart_serves_history_from_valkey() {
    let valkey = ValkeyServer::start(ValkeyOpts::default());
    let mut relay = valkey.start_relay("", &[]);
    let names = topics("restart", 6);
    assert_spans_shards(&names, 2);
    let mut published: HashMap<String, Vec<(String, Value)>> = HashMap::new();
    let mut conn = relay.connect();
    for i in 0..40 {
        for topic in &names {
            let payload = format!(r#"{{"topic":"{topic}","i":{i}}}"#);
            let ack = conn.publish(topic, &payload);
            published.entry(topic.clone()).or_default().push((
                ack["message_id"].as_str().expect("id").to_string(),
                serde_json::from_str(&payload).expect("json"),
            ));
        }
    }
    drop(conn);

    relay.restart();
    await_ready(&relay, Duration::from_secs(20));

    // Every message readable, across pages, although the hot tier started empty.
    for topic in &names {
        assert_eq!(read_all(&relay, topic, 7), published[topic], "{topic}");
    }
    let list = relay.get("/api/v1/topics").json();
    for topic in &names {
        let entry = list["topics"]
            .as_array()
            .expect("topics")
            .iter()
            .find(|t| t["topic"] == topic.as_str())
            .unwrap_or_else(|| panic!("{topic} not listed after restart: {list}"));
        assert_eq!(entry["length"], 40, "{entry}");
    }
    // New ids continue above the old ones.
    for topic in &names {
        let ack = relay.publish(topic, r#"{"after":"restart"}"#);
        let new_id = ack["message_id"].as_str().expect("id");
        let last_old = &published[topic].last().expect("published").0;
        assert!(
            parse_id(new_id) > parse_id(last_old),
            "{topic}: new id {new_id} not above {last_old}"
        );
        let page = relay.read_topic(topic, "order=desc&limit=2");
        assert_eq!(ids_of(&page), vec![new_id.to_string(), last_old.clone()]);
    }
}

#[test]
fn valkey_restart_gives_503_then_the_relay_reconnects() {
    let mut valkey = ValkeyServer::start(ValkeyOpts::default());
    let relay = valkey.start_relay(FAST_FAILING, &[]);
    let names = topics("outage", 6);
    assert_spans_shards(&names, 2);
    let mut acked: HashMap<String, Vec<String>> = HashMap::new();
    let mut conn = relay.connect();
    for i in 0..10 {
        for topic in &names {
            let ack = conn.publish(topic, &format!(r#"{{"i":{i}}}"#));
            acked
                .entry(topic.clone())
                .or_default()
                .push(ack["message_id"].as_str().expect("id").to_string());
        }
    }

    valkey.stop();
    // One publish per topic (so per shard): each may wait out the 1 s command timeout.
    for topic in &names {
        let body = common::publish_body(topic, r#"{"during":"outage"}"#);
        let started = Instant::now();
        let resp = relay.post_json("/api/v1/messages", &body);
        let took = started.elapsed();
        assert_unavailable(&resp);
        assert!(
            took < MAX_OUTAGE_LATENCY,
            "publish during the outage took {took:?}"
        );
    }
    let mut last = None;
    assert!(
        eventually(Duration::from_secs(10), || {
            let resp = relay.get("/ready");
            let unready = resp.status == 503;
            last = Some(resp);
            unready
        }),
        "/ready not 503 while Valkey is down: {last:?}"
    );
    let mut health = Value::Null;
    assert!(
        eventually(Duration::from_secs(10), || {
            health = relay.health();
            health["storage"]["connected"] == false
        }),
        "/health does not say disconnected: {health}"
    );

    valkey.restart();
    await_ready(&relay, Duration::from_secs(20));
    for i in 0..10 {
        for topic in &names {
            let ack = conn_publish_fresh(&relay, topic, &format!(r#"{{"after":{i}}}"#));
            acked.entry(topic.clone()).or_default().push(ack);
        }
    }
    for topic in &names {
        let stored: Vec<String> = valkey
            .xrange(&stream_key(topic))
            .into_iter()
            .map(|e| e.id)
            .collect();
        for id in &acked[topic] {
            assert!(
                stored.contains(id),
                "{topic}: acknowledged {id} missing after the Valkey restart; stream: {stored:?}"
            );
        }
    }
}

/// Publishes on a fresh connection (the relay may have closed idle ones during the outage);
/// asserts 201 and returns the id.
fn conn_publish_fresh(relay: &Server, topic: &str, payload: &str) -> String {
    relay.publish(topic, payload)["message_id"]
        .as_str()
        .expect("id")
        .to_string()
}

#[test]
fn valkey_kill9_under_load_loses_no_acknowledged_message() {
    let mut valkey = ValkeyServer::start(ValkeyOpts {
        fsync_always: true,
        ..ValkeyOpts::default()
    });
    let relay = valkey.start_relay(FAST_FAILING, &[]);
    let names = topics("vk-crash", 4);
    assert_spans_shards(&names, 2);
    let load = PublishLoad::start(relay.addr, &names, 50_000, Duration::from_secs(90));
    assert!(
        eventually(Duration::from_secs(20), || load.min_acked() >= 50),
        "load did not get going: min acked {}",
        load.min_acked()
    );

    valkey.kill9();
    let failures_before = load.failures();
    assert!(
        eventually(Duration::from_secs(15), || load.failures()
            >= failures_before + 8),
        "publishes kept succeeding with Valkey killed ({} failures)",
        load.failures()
    );

    valkey.restart();
    await_ready(&relay, Duration::from_secs(20));
    let acked_after_restart = load.min_acked();
    assert!(
        eventually(Duration::from_secs(20), || load.min_acked()
            >= acked_after_restart + 20),
        "publishes did not recover after the Valkey restart (min acked {})",
        load.min_acked()
    );
    let outcomes = load.finish();
    for out in &outcomes {
        assert!(
            out.max_latency < MAX_OUTAGE_LATENCY,
            "{}: a request took {:?}",
            out.topic,
            out.max_latency
        );
    }
    assert_acked_in_valkey(&valkey, &outcomes);
}

#[test]
fn relay_kill9_under_load_loses_no_acknowledged_message() {
    let valkey = ValkeyServer::start(ValkeyOpts::default());
    let mut relay = valkey.start_relay("", &[]);
    let names = topics("relay-crash", 4);
    assert_spans_shards(&names, 2);
    let load = PublishLoad::start(relay.addr, &names, 50_000, Duration::from_secs(90));
    assert!(
        eventually(Duration::from_secs(20), || load.min_acked() >= 100),
        "load did not get going: min acked {}",
        load.min_acked()
    );
    relay.kill9();
    // Each worker notices the crash (a failed request or connect) before we stop it.
    assert!(
        eventually(Duration::from_secs(10), || load.failures() >= 4 * 2),
        "the load did not notice the relay crash"
    );
    let outcomes = load.finish();
    assert_acked_in_valkey(&valkey, &outcomes);

    // And a relay started again serves them.
    relay.start_again();
    await_ready(&relay, Duration::from_secs(20));
    for (w, out) in outcomes.iter().enumerate() {
        let readable: HashMap<String, Value> =
            read_all(&relay, &out.topic, 1000).into_iter().collect();
        for (i, id) in &out.acked {
            assert_eq!(
                readable.get(id),
                Some(&serde_json::json!({"w": w, "i": i})),
                "{}: acknowledged {id} not readable after the crash",
                out.topic
            );
        }
    }
}
