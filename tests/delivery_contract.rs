//! The delivery contract at the boundaries of catch-up: resumes longer than one replay page,
//! messages too large for a page or for the consumer's queue bound, and subscriptions that end
//! while their catch-up is running, on both backends (memory, and a real `valkey-server`) and
//! with topics owned by either of 2 shards.
//!
//! Owns: catch-up (history → live hand-over) as every transport sees it. Does not own: the
//! framing of each transport (`delivery_ws.rs`, `delivery_sse.rs`, `delivery_longpoll.rs`) nor
//! storage's gap detection (`retention.rs`, `valkey_retention.rs`).
//!
//! Each test is named after the failure it once was (issue 11): the suite's earlier resume
//! tests replayed ~40 small messages, one page, and never reached these.

mod common;

use std::time::Duration;

use common::sse::SseClient;
use common::valkey::{ValkeyOpts, ValkeyServer};
use common::ws::WsClient;
use common::{id_of, topics_per_shard, Server};
use serde_json::{json, Value};

const SHARDS: u64 = 2;

/// A relay with its storage: the memory backend, or Valkey (kept alive with the relay).
struct Relay {
    server: Server,
    _valkey: Option<ValkeyServer>,
}

/// The same configuration on both backends.
fn both_backends(config_yaml: &str) -> Vec<(&'static str, Relay)> {
    let memory = Relay {
        server: Server::start_with_shards(config_yaml, SHARDS as usize),
        _valkey: None,
    };
    let valkey = ValkeyServer::start(ValkeyOpts::default());
    let server = valkey.start_relay(config_yaml, &[]);
    vec![
        ("memory", memory),
        (
            "valkey",
            Relay {
                server,
                _valkey: Some(valkey),
            },
        ),
    ]
}

/// Publishes `n` messages of about `payload_bytes` each to `topic` in bulk requests of at
/// most `per_request`; returns the acknowledged ids in order.
fn publish_sized(
    server: &Server,
    topic: &str,
    n: usize,
    payload_bytes: usize,
    per_request: usize,
) -> Vec<String> {
    let filler = "x".repeat(payload_bytes.saturating_sub(20));
    let mut ids = Vec::with_capacity(n);
    let mut conn = server.connect();
    let mut i = 0;
    while i < n {
        let batch: Vec<Value> = (i..(i + per_request).min(n))
            .map(|k| json!({"topic": topic, "payload": {"i": k, "f": filler}}))
            .collect();
        let body = json!({ "messages": batch }).to_string();
        let resp = conn.request("POST", "/api/v1/messages/bulk", Some(body.as_bytes()));
        assert_eq!(resp.status, 207, "{resp:?}");
        let results = resp.json()["results"].clone();
        for r in results.as_array().expect("results") {
            ids.push(
                r["message_id"]
                    .as_str()
                    .unwrap_or_else(|| panic!("rejected: {r}"))
                    .to_string(),
            );
        }
        i += per_request;
    }
    ids
}

/// Subscribes from `offset` and asserts exactly `want` arrive, in order, then nothing else.
fn assert_ws_resume(server: &Server, topic: &str, offset: Value, want: &[String], what: &str) {
    let mut client = WsClient::connect(server.addr);
    client.subscribe(&[topic], Some(offset));
    for (k, expected) in want.iter().enumerate() {
        if k % 50 == 0 {
            eprintln!("{what}: {k} of {}", want.len());
        }
        let got = client.recv();
        assert_eq!(got["type"], "message", "{what}: frame {k}: {got}");
        assert_eq!(
            &id_of(&got),
            expected,
            "{what}: message {k} of {}",
            want.len()
        );
    }
    client.send_json(&json!({"type": "ping"}));
    let next = client.recv();
    assert_eq!(
        next["type"], "pong",
        "{what}: nothing after the last: {next}"
    );
}

/// Bug 1: a WebSocket resume longer than one replay page (500 messages) stalled for good after
/// the first page: the catch-up waited for its queue to drain, and nothing woke it.
#[test]
fn ws_resume_longer_than_one_replay_page_completes() {
    for (backend, relay) in both_backends("") {
        for topic in topics_per_shard(&format!("long-resume-{backend}"), SHARDS) {
            let ids = publish_sized(&relay.server, &topic, 1_200, 1_200, 100);
            let what = format!("{backend} {topic} earliest");
            assert_ws_resume(&relay.server, &topic, json!("earliest"), &ids, &what);
            let what = format!("{backend} {topic} from an id");
            assert_ws_resume(&relay.server, &topic, json!(ids[99]), &ids[100..], &what);
        }
    }
}

/// Bug 2: a resume over large messages never completed: one page of 500 × 20 KB was pushed
/// into a queue bounded at 1 MiB at once, and the session was closed with 4008 having
/// received nothing, on every retry. Also crosses the bound with a message larger than it.
#[test]
fn ws_resume_over_large_messages_completes() {
    let config = "ws:\n  max_queued_bytes: 256KiB\n";
    for (backend, relay) in both_backends(config) {
        for topic in topics_per_shard(&format!("large-resume-{backend}"), SHARDS) {
            let mut ids = publish_sized(&relay.server, &topic, 300, 20_000, 20);
            // Two messages larger than the whole bound, each delivered alone.
            ids.extend(publish_sized(&relay.server, &topic, 2, 400_000, 1));
            ids.extend(publish_sized(&relay.server, &topic, 50, 100, 50));
            let what = format!("{backend} {topic}");
            assert_ws_resume(&relay.server, &topic, json!("earliest"), &ids, &what);
        }
    }
}

/// Bug 1 on SSE: a `Last-Event-ID` resume longer than one page got one page per heartbeat
/// (15 s by default); with a one-minute heartbeat it must still arrive at once.
#[test]
fn sse_resume_longer_than_one_page_does_not_wait_for_heartbeats() {
    let config = "sse:\n  heartbeat_interval: 60s\n";
    for (backend, relay) in both_backends(config) {
        for topic in topics_per_shard(&format!("sse-long-{backend}"), SHARDS) {
            let ids = publish_sized(&relay.server, &topic, 1_300, 500, 100);
            let path = format!("/api/v1/topics/{topic}/events");
            let mut sse =
                SseClient::open_ok(relay.server.addr, &path, &[("Last-Event-ID", &ids[10])]);
            for (k, expected) in ids[11..].iter().enumerate() {
                let (_, event, data) = sse
                    .try_next_event(Duration::from_secs(10))
                    .unwrap_or_else(|| panic!("{backend} {topic}: stalled after {k} events"));
                assert_eq!(event, "message", "{backend}: {data}");
                assert_eq!(&id_of(&data), expected, "{backend} {topic}: event {k}");
            }
        }
    }
}

/// Bug 7: `unsubscribe` did not cancel a running catch-up. A subscribe/unsubscribe loop
/// started a full-history scan per round, and a stale catch-up could queue messages for, or
/// end the replay of, the subscription made after it. After the loop, one more subscribe
/// from the start must get every message exactly once, in order, and nothing of the topic
/// may arrive after an `unsubscribed` that had no subscribe after it.
#[test]
fn unsubscribe_cancels_a_running_catch_up() {
    for (backend, relay) in both_backends("") {
        for topic in topics_per_shard(&format!("unsub-{backend}"), SHARDS) {
            let ids = publish_sized(&relay.server, &topic, 2_000, 300, 200);
            let mut client = WsClient::connect(relay.server.addr);
            for _ in 0..50 {
                client.send_json(
                    &json!({"type": "subscribe", "topics": [topic], "offset": "earliest"}),
                );
                client.send_json(&json!({"type": "unsubscribe", "topics": [topic]}));
            }
            // Replies to the loop come back in order; messages of the topic may be
            // interleaved before the last `unsubscribed`, never after it.
            let mut unsubscribed = 0;
            while unsubscribed < 50 {
                let v = client.recv();
                match v["type"].as_str() {
                    Some("unsubscribed") => unsubscribed += 1,
                    Some("subscribed") | Some("message") => {}
                    _ => panic!("{backend}: unexpected {v}"),
                }
            }
            client.send_json(&json!({"type": "ping"}));
            let v = client.recv();
            assert_eq!(
                v["type"], "pong",
                "{backend}: after the last unsubscribe: {v}"
            );
            let what = format!("{backend} {topic} after the loop");
            let mut fresh = WsClient::connect(relay.server.addr);
            drop(client);
            fresh.subscribe(&[&topic], Some(json!("earliest")));
            for (k, expected) in ids.iter().enumerate() {
                let got = fresh.recv();
                assert_eq!(&id_of(&got), expected, "{what}: message {k}");
            }
        }
    }
}

/// The history → live hand-over under a publisher that keeps going during a long catch-up
/// with a small queue bound: live messages held back during the replay overflow their bound
/// and are read from storage instead. Every acknowledged message arrives exactly once, in
/// order, whichever shard owns the topic.
#[test]
fn ws_resume_under_a_live_publisher_hands_over_without_gap_or_repeat() {
    let config = "ws:\n  max_queued_bytes: 64KiB\n";
    for (backend, relay) in both_backends(config) {
        for topic in topics_per_shard(&format!("handover-{backend}"), SHARDS) {
            let mut ids = publish_sized(&relay.server, &topic, 2_000, 1_000, 100);
            let live = common::BackgroundPublisher::start(relay.server.addr, &topic, 1_500);
            let mut client = WsClient::connect(relay.server.addr);
            client.subscribe(&[&topic], Some(json!("earliest")));
            let mut got = Vec::new();
            while got.len() < ids.len() + 1_500 {
                let v = client.recv();
                assert_eq!(v["type"], "message", "{backend}: {v}");
                got.push(id_of(&v));
            }
            ids.extend(live.join());
            assert_eq!(got.len(), ids.len());
            for (k, (a, b)) in got.iter().zip(&ids).enumerate() {
                assert_eq!(a, b, "{backend} {topic}: message {k}");
            }
            client.send_json(&json!({"type": "ping"}));
            assert_eq!(client.recv()["type"], "pong", "{backend}: nothing repeated");
        }
    }
}

/// Bug (model checker seeds 5023, 5028, 5030): a resume read skipped messages that had
/// expired (ttl or age) but were not swept yet, and told the consumer nothing; and a gap's
/// `oldest_available` could name such a message, which then never came. Whether or not the
/// sweeper got there first, the consumer must get a gap naming the first message it then
/// receives.
#[test]
fn a_resume_over_expired_messages_reports_an_expired_gap() {
    for (backend, relay) in both_backends("") {
        for topic in topics_per_shard(&format!("expired-{backend}"), SHARDS) {
            let mut conn = relay.server.connect();
            let marker = id_of(&conn.publish(&topic, r#"{"marker":true}"#));
            for i in 0..10 {
                let body = json!({"topic": topic, "payload": {"i": i}, "ttl": 1}).to_string();
                let resp = conn.request("POST", "/api/v1/messages", Some(body.as_bytes()));
                assert_eq!(resp.status, 201, "{resp:?}");
            }
            let lasting = publish_sized(&relay.server, &topic, 10, 100, 10);
            // Await the expiry as readers see it (swept or not).
            assert!(
                common::eventually(Duration::from_secs(10), || {
                    let page = relay
                        .server
                        .read_topic(&topic, &format!("order=asc&limit=100&cursor={marker}"));
                    page["messages"].as_array().map_or(0, Vec::len) == lasting.len()
                }),
                "{backend}: the ttl messages never expired"
            );
            let mut client = WsClient::connect(relay.server.addr);
            client.subscribe(&[&topic], Some(json!(marker)));
            let gap = client.recv();
            assert_eq!(gap["type"], "gap", "{backend}: {gap}");
            assert_eq!(gap["reason"], "expired", "{backend}: {gap}");
            assert_eq!(gap["requested"], marker.as_str(), "{backend}: {gap}");
            assert_eq!(
                gap["oldest_available"],
                lasting[0].as_str(),
                "{backend}: {gap}"
            );
            let got: Vec<String> = client
                .recv_messages(lasting.len())
                .iter()
                .map(id_of)
                .collect();
            assert_eq!(got, lasting, "{backend}");
        }
    }
}

/// Issue 11, item 10: a history page of `limit` large messages held `limit` times the
/// largest payload per request. Pages are now bounded by bytes (8 MiB): fewer messages and a
/// `next_cursor`, and following it still reaches every message once, in both orders.
#[test]
fn history_pages_are_bounded_by_bytes_and_still_reach_every_message() {
    for (backend, relay) in both_backends("") {
        let topic = format!("big-history-{backend}");
        let ids = publish_sized(&relay.server, &topic, 30, 900_000, 10);
        for order in ["asc", "desc"] {
            let mut seen = Vec::new();
            let mut cursor: Option<String> = None;
            loop {
                let query = match &cursor {
                    Some(c) => format!("order={order}&limit=1000&cursor={c}"),
                    None => format!("order={order}&limit=1000"),
                };
                let page = relay.server.read_topic(&topic, &query);
                let messages = page["messages"].as_array().expect("messages");
                assert!(
                    messages.len() <= 10,
                    "{backend} {order}: {} messages of 900 KB in one page",
                    messages.len()
                );
                seen.extend(messages.iter().map(id_of));
                match page["next_cursor"].as_str() {
                    Some(c) => cursor = Some(c.to_string()),
                    None => break,
                }
            }
            let mut want = ids.clone();
            if order == "desc" {
                want.reverse();
            }
            assert_eq!(seen, want, "{backend} {order}");
        }
    }
}
