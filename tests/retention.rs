//! Black-box tests of the hot tier's retention: per-topic count cap, age retention, and the
//! process-wide memory budget evicting the oldest messages first.
//!
//! Owns: `storage.max_messages_per_topic`, `storage.persistent_tier_retention`,
//! `memory.max_bytes`. Does not own: per-message ttl (`http_api.rs`) or explicit trim.

mod common;

use std::time::Duration;

use common::{assert_strictly_increasing, eventually, parse_id, shard_of, topics, Server};
use serde_json::{json, Value};

fn ids_and_ints(page: &Value) -> (Vec<String>, Vec<i64>) {
    let msgs = page["messages"].as_array().expect("messages array");
    (
        msgs.iter()
            .map(|m| m["message_id"].as_str().expect("id").to_string())
            .collect(),
        msgs.iter()
            .map(|m| m["payload"]["i"].as_i64().expect("payload.i"))
            .collect(),
    )
}

#[test]
fn count_retention_keeps_the_newest() {
    let server = Server::start("storage:\n  max_messages_per_topic: 5\n");
    let mut conn = server.connect();
    let mut acked = Vec::new();
    for i in 0..8 {
        let ack = conn.publish("capped", &format!(r#"{{"i":{i}}}"#));
        acked.push(ack["message_id"].as_str().expect("id").to_string());
    }
    assert_strictly_increasing(&acked);
    let page = server.read_topic("capped", "order=asc&limit=100");
    let (ids, ints) = ids_and_ints(&page);
    assert_eq!(ints, vec![3, 4, 5, 6, 7], "{page}");
    assert_eq!(ids, acked[3..].to_vec());
    assert_eq!(page["total"], 5, "{page}");
    let stats = server.get("/api/v1/topics/capped").json();
    assert_eq!(stats["length"], 5, "{stats}");
    assert_eq!(stats["first_id"], acked[3].as_str(), "{stats}");
    assert_eq!(stats["last_id"], acked[7].as_str(), "{stats}");

    // Ids keep increasing past evictions.
    let ack = conn.publish("capped", r#"{"i":8}"#);
    let next = ack["message_id"].as_str().expect("id");
    assert!(parse_id(next) > parse_id(&acked[7]));
    let (_, ints) = ids_and_ints(&server.read_topic("capped", "order=asc"));
    assert_eq!(ints, vec![4, 5, 6, 7, 8]);

    // The cap is per topic: another topic is unaffected by this one.
    conn.publish("uncapped-neighbour", r#"{"i":0}"#);
    assert_eq!(server.read_topic("uncapped-neighbour", "")["total"], 1);
    // Bulk publishing obeys the cap too.
    let items: Vec<Value> = (100..112)
        .map(|i| json!({"topic": "capped-bulk", "payload": {"i": i}}))
        .collect();
    let resp = server.post_json(
        "/api/v1/messages/bulk",
        &json!({ "messages": items }).to_string(),
    );
    assert_eq!(resp.status, 207, "{resp:?}");
    let (_, ints) = ids_and_ints(&server.read_topic("capped-bulk", "order=asc"));
    assert_eq!(ints, vec![107, 108, 109, 110, 111]);
}

#[test]
fn age_retention_drops_old_messages() {
    let server = Server::start("storage:\n  persistent_tier_retention: 2s\n");
    let names = topics("aged", 4);
    let mut conn = server.connect();
    for t in &names {
        for i in 0..3 {
            conn.publish(t, &format!(r#"{{"i":{i}}}"#));
        }
    }
    for t in &names {
        assert_eq!(
            server.read_topic(t, "")["total"],
            3,
            "{t} not readable right after publishing"
        );
    }
    let expired = eventually(Duration::from_secs(10), || {
        names
            .iter()
            .all(|t| server.read_topic(t, "order=asc")["messages"] == json!([]))
    });
    assert!(
        expired,
        "messages older than the 2 s retention still readable after 10 s"
    );
    // New messages are served as usual after old ones aged out.
    conn.publish(&names[0], r#"{"i":99}"#);
    let (_, ints) = ids_and_ints(&server.read_topic(&names[0], ""));
    assert_eq!(ints, vec![99]);
}

#[test]
fn memory_budget_evicts_oldest_first() {
    // The smallest budget the server accepts is 1 MiB (512 KiB per shard).
    const BUDGET: u64 = 1024 * 1024;
    let server = Server::start(&format!("memory:\n  max_bytes: {BUDGET}\n"));
    // Four topics per shard under the documented routing, so both shards' budgets fill at the
    // same rate and "oldest first" has a predictable global shape.
    let candidates = topics("budget", 64);
    let mut names: Vec<String> = Vec::new();
    for shard in 0..2 {
        names.extend(
            candidates
                .iter()
                .filter(|t| shard_of(t, 2) == shard)
                .take(4)
                .cloned(),
        );
    }
    assert_eq!(names.len(), 8, "test precondition: 4 topics per shard");
    let pad = "m".repeat(16 * 1024);
    let mut conn = server.connect();
    // 240 messages of ~16 KiB round-robin over 8 topics: ~3.7x the budget.
    const TOTAL: i64 = 240;
    let mut by_topic: Vec<Vec<i64>> = vec![Vec::new(); names.len()];
    for i in 0..TOTAL {
        let k = (i as usize) % names.len();
        conn.publish(&names[k], &format!(r#"{{"i":{i},"pad":"{pad}"}}"#));
        by_topic[k].push(i);
    }

    let health = server.health();
    let storage = &health["storage"];
    assert_eq!(storage["max_bytes"], BUDGET, "{health}");
    let bytes = storage["bytes"].as_u64().expect("storage.bytes");
    assert!(
        bytes <= BUDGET,
        "storage.bytes {bytes} over the {BUDGET}-byte budget: {health}"
    );
    let held = storage["messages"].as_u64().expect("storage.messages");
    assert!(
        held > 0 && held < TOTAL as u64,
        "expected some but not all messages held: {health}"
    );

    let mut survivors = Vec::new();
    for (k, t) in names.iter().enumerate() {
        let page = server.read_topic(t, "order=asc&limit=1000");
        let (ids, ints) = ids_and_ints(&page);
        assert_strictly_increasing(&ids);
        // What survives of a topic is its newest messages: a suffix of what was published.
        let published = &by_topic[k];
        assert!(
            published.ends_with(&ints),
            "topic {t} kept {ints:?}, not a suffix of {published:?}"
        );
        survivors.extend(ints);
    }
    assert_eq!(survivors.len() as u64, held, "health and reads disagree");
    survivors.sort_unstable();
    // The earliest published are gone, the newest are readable.
    for i in 0..16 {
        assert!(
            !survivors.contains(&i),
            "message {i} (among the first published) survived: {survivors:?}"
        );
    }
    for i in TOTAL - 8..TOTAL {
        assert!(
            survivors.contains(&i),
            "message {i} (among the newest) was evicted: {survivors:?}"
        );
    }
    // Eviction is oldest-first within each shard, so overall the survivors are mostly a
    // suffix: nothing older than the oldest 5/8ths of the stream survives. (Per-shard
    // budgets make the exact global cut-off depend on how topics hash.)
    assert!(
        survivors.iter().all(|&i| i >= TOTAL * 3 / 8),
        "old messages survived while newer were evicted: {survivors:?}"
    );
    // The server still accepts and serves after sustained eviction.
    conn.publish(&names[0], r#"{"i":1000,"pad":""}"#);
    let page = server.read_topic(&names[0], "limit=1");
    assert_eq!(page["messages"][0]["payload"]["i"], 1000);
}
