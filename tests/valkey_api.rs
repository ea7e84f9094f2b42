//! Black-box tests of the Valkey backend's data path against a real `valkey-server`: what a
//! publish writes to the stream (one entry per message, id = message id, the documented
//! fields), bulk publishing, history pages older than the hot tier, topic discovery of streams
//! the relay did not write, reading the Python relay's layout, `ack: buffered`, what
//! `/health` says about Valkey, the `pulsar` Function library every append goes through
//! (loaded on every connection) and the feed notification each append publishes.
//!
//! Owns: the relay <-> Valkey data mapping as observed with `valkey-cli`. Does not own:
//! retention (`valkey_retention.rs`), restarts and crashes (`valkey_resilience.rs`), AUTH and
//! TLS (`valkey_security.rs`).

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use common::valkey::{rfc3339_now, stream_key, ValkeyOpts, ValkeyServer};
use common::{assert_rfc3339_utc, assert_spans_shards, assert_strictly_increasing, eventually};
use serde_json::{json, Value};

/// `n` topic names with `prefix` that route to both of the relay's 2 shards.
fn two_shard_topics(prefix: &str, n: usize) -> Vec<String> {
    let names = common::topics(prefix, n);
    assert_spans_shards(&names, 2);
    names
}

fn ids_of(page: &Value) -> Vec<String> {
    page["messages"]
        .as_array()
        .expect("messages array")
        .iter()
        .map(|m| m["message_id"].as_str().expect("message_id").to_string())
        .collect()
}

fn field_set(entry: &common::valkey::StreamEntry) -> Vec<&str> {
    let mut names = entry.field_names();
    names.sort_unstable();
    names
}

#[test]
fn publish_writes_one_entry_per_message_in_the_documented_layout() {
    let valkey = ValkeyServer::start(ValkeyOpts::default());
    let relay = valkey.start_relay("", &[]);
    let names = two_shard_topics("layout", 6);
    // Whitespace and number spellings that a re-serialisation would change: the stream must
    // hold the producer's exact text.
    let plain_payload = r#"{"k": "v",  "n": [1, 2.50, -0, 1e3], "s": "\u00e9"}"#;
    let rich_payload = r#"[1, "two", {"three": null}]"#;
    let mut conn = relay.connect();
    for topic in &names {
        let plain = format!(r#"{{"topic":"{topic}","payload":{plain_payload}}}"#);
        let resp = conn.request("POST", "/api/v1/messages", Some(plain.as_bytes()));
        assert_eq!(resp.status, 201, "{resp:?}");
        let plain_ack = resp.json();
        let rich = format!(
            r#"{{"topic":"{topic}","payload":{rich_payload},"metadata":{{"source":"api","trace":"t-1"}},"ttl":3600}}"#
        );
        let resp = conn.request("POST", "/api/v1/messages", Some(rich.as_bytes()));
        assert_eq!(resp.status, 201, "{resp:?}");
        let rich_ack = resp.json();

        let key = stream_key(topic);
        assert_eq!(valkey.xlen(&key), 2, "XLEN {key}");
        let entries = valkey.xrange(&key);
        assert_eq!(entries.len(), 2, "{entries:?}");

        let (e0, e1) = (&entries[0], &entries[1]);
        assert_eq!(e0.id, plain_ack["message_id"].as_str().expect("id"));
        assert_eq!(field_set(e0), vec!["payload", "timestamp"], "{e0:?}");
        assert_eq!(e0.field("payload"), Some(plain_payload), "{e0:?}");
        assert_eq!(
            e0.field("timestamp"),
            plain_ack["timestamp"].as_str(),
            "{e0:?}"
        );
        assert_rfc3339_utc(&json!(e0.field("timestamp")));

        assert_eq!(e1.id, rich_ack["message_id"].as_str().expect("id"));
        assert_eq!(
            field_set(e1),
            vec!["metadata", "payload", "timestamp", "ttl"],
            "{e1:?}"
        );
        assert_eq!(e1.field("payload"), Some(rich_payload), "{e1:?}");
        assert_eq!(
            e1.field("timestamp"),
            rich_ack["timestamp"].as_str(),
            "{e1:?}"
        );
        let metadata: Value = serde_json::from_str(e1.field("metadata").expect("metadata"))
            .unwrap_or_else(|e| panic!("metadata field is not JSON ({e}): {e1:?}"));
        assert_eq!(metadata, json!({"source": "api", "trace": "t-1"}));
        let ttl: f64 = e1
            .field("ttl")
            .and_then(|t| t.parse().ok())
            .unwrap_or_else(|| panic!("ttl field is not a number of seconds: {e1:?}"));
        assert_eq!(ttl, 3600.0, "{e1:?}");

        // The API returns the same ids and the payload text unchanged.
        let resp = conn.request(
            "GET",
            &format!("/api/v1/topics/{topic}/messages?order=asc"),
            None,
        );
        assert_eq!(resp.status, 200, "{resp:?}");
        assert!(
            resp.text().contains(plain_payload),
            "payload text changed: {resp:?}"
        );
        let page = resp.json();
        assert_eq!(ids_of(&page), vec![e0.id.clone(), e1.id.clone()], "{page}");
        assert_eq!(
            page["messages"][1]["metadata"],
            json!({"source": "api", "trace": "t-1"})
        );
    }
}

#[test]
fn bulk_publish_persists_every_accepted_item_in_request_order() {
    let valkey = ValkeyServer::start(ValkeyOpts::default());
    let relay = valkey.start_relay("", &[]);
    let names = two_shard_topics("bulk", 4);
    let mut items: Vec<Value> = (0..120)
        .map(|i| json!({"topic": names[i % names.len()], "payload": {"i": i}}))
        .collect();
    items.insert(30, json!({"topic": "bad topic!", "payload": 1}));
    items.insert(60, json!({"topic": names[0], "payload": null}));
    let resp = relay.post_json(
        "/api/v1/messages/bulk",
        &json!({ "messages": items }).to_string(),
    );
    assert_eq!(resp.status, 207, "{resp:?}");
    let v = resp.json();
    assert_eq!(
        v["summary"],
        json!({"total": 122, "accepted": 120, "rejected": 2}),
        "{v}"
    );
    let results = v["results"].as_array().expect("results");
    for topic in &names {
        let want: Vec<(String, i64)> = results
            .iter()
            .zip(&items)
            .filter(|(r, _)| r["status"] == "accepted" && r["topic"] == topic.as_str())
            .map(|(r, item)| {
                (
                    r["message_id"].as_str().expect("id").to_string(),
                    item["payload"]["i"].as_i64().expect("i"),
                )
            })
            .collect();
        assert_eq!(want.len(), 30, "{topic}: {v}");
        let got: Vec<(String, i64)> = valkey
            .xrange(&stream_key(topic))
            .iter()
            .map(|e| {
                let payload: Value =
                    serde_json::from_str(e.field("payload").expect("payload")).expect("json");
                (e.id.clone(), payload["i"].as_i64().expect("i"))
            })
            .collect();
        assert_eq!(
            got, want,
            "stream of {topic} differs from the accepted items"
        );
        assert_eq!(valkey.xlen(&stream_key(topic)), 30);
    }
    assert_eq!(
        valkey.cli_json(&["EXISTS", &stream_key("bad topic!")]),
        json!(0)
    );
}

#[test]
fn pages_older_than_the_hot_tier_come_from_valkey() {
    let valkey = ValkeyServer::start(ValkeyOpts::default());
    // 20 messages in memory per topic: most of the 250 below are only in Valkey.
    let relay = valkey.start_relay("hot_tier:\n  max_messages: 20\n", &[]);
    let mut conn = relay.connect();
    let mut published = Vec::new();
    for i in 0..250 {
        let ack = conn.publish("deep", &format!(r#"{{"i":{i}}}"#));
        published.push(ack["message_id"].as_str().expect("id").to_string());
        if i % 25 == 0 {
            conn.publish("deep-neighbour", &format!(r#"{{"i":{i}}}"#));
        }
    }
    assert_strictly_increasing(&published);
    assert_eq!(valkey.xlen(&stream_key("deep")), 250);

    for order in ["asc", "desc"] {
        let mut seen = Vec::new();
        let mut payloads = Vec::new();
        let mut cursor: Option<String> = None;
        for _page in 0..20 {
            let query = match &cursor {
                Some(c) => format!("order={order}&limit=37&cursor={c}"),
                None => format!("order={order}&limit=37"),
            };
            let page = relay.read_topic("deep", &query);
            assert_eq!(page["total"], 250, "{query}: {page}");
            for m in page["messages"].as_array().expect("messages") {
                payloads.push(m["payload"]["i"].as_i64().expect("i"));
            }
            seen.extend(ids_of(&page));
            match page["next_cursor"].as_str() {
                Some(c) => cursor = Some(c.to_string()),
                None => break,
            }
        }
        let mut want = published.clone();
        let mut want_payloads: Vec<i64> = (0..250).collect();
        if order == "desc" {
            want.reverse();
            want_payloads.reverse();
        }
        assert_eq!(seen, want, "order={order}: ids differ");
        assert_eq!(payloads, want_payloads, "order={order}: payloads differ");
    }

    // A cursor deep in the Valkey-only part resumes right after it.
    let page = relay.read_topic(
        "deep",
        &format!("order=asc&limit=5&cursor={}", published[99]),
    );
    assert_eq!(ids_of(&page), published[100..105].to_vec(), "{page}");
}

#[test]
fn streams_that_exist_only_in_valkey_are_discovered() {
    let valkey = ValkeyServer::start(ValkeyOpts::default());
    let names = two_shard_topics("found", 6);
    let mut written = Vec::new();
    for (n, topic) in names.iter().enumerate() {
        let mut ids = Vec::new();
        for j in 0..=n {
            let out = valkey.cli(&[
                "XADD",
                &stream_key(topic),
                "*",
                "payload",
                &format!(r#"{{"j":{j}}}"#),
                "timestamp",
                &rfc3339_now(),
            ]);
            ids.push(out.trim().to_string());
        }
        written.push(ids);
    }
    // Keys that match the pattern but are not streams, or do not match it, are not topics.
    valkey.cli(&["SET", &stream_key("not-a-stream"), "x"]);
    valkey.cli(&["XADD", "other:layout", "*", "payload", "1"]);

    let relay = valkey.start_relay("", &[]);
    let list = relay.get("/api/v1/topics");
    assert_eq!(list.status, 200, "{list:?}");
    let list = list.json();
    let got: Vec<&str> = list["topics"]
        .as_array()
        .expect("topics")
        .iter()
        .map(|t| t["topic"].as_str().expect("topic"))
        .collect();
    let want: Vec<&str> = names.iter().map(String::as_str).collect();
    assert_eq!(got, want, "discovered topics: {list}");
    assert_eq!(list["total"], names.len(), "{list}");
    for (n, topic) in names.iter().enumerate() {
        let entry = &list["topics"][n];
        assert_eq!(entry["length"], n + 1, "{entry}");
        assert_eq!(entry["first_id"], written[n][0].as_str(), "{entry}");
        assert_eq!(entry["last_id"], written[n][n].as_str(), "{entry}");

        let stats = relay.get(&format!("/api/v1/topics/{topic}"));
        assert_eq!(stats.status, 200, "{stats:?}");
        let stats = stats.json();
        assert_eq!(stats["length"], valkey.xlen(&stream_key(topic)), "{stats}");

        let page = relay.read_topic(topic, "order=asc&limit=100");
        assert_eq!(ids_of(&page), written[n], "{page}");
        assert_eq!(page["messages"][0]["payload"], json!({"j": 0}), "{page}");
    }
}

#[test]
fn python_relay_entries_are_readable_through_a_custom_stream_key() {
    let valkey = ValkeyServer::start(ValkeyOpts::default());
    let legacy_id = valkey
        .cli(&[
            "XADD",
            "stream:topic:legacy",
            "*",
            "message_id",
            "msg_1",
            "payload",
            r#"{"a":1}"#,
            "timestamp",
            "2025-01-01T12:00:00",
            "metadata",
            r#"{"source":"api"}"#,
        ])
        .trim()
        .to_string();

    let relay = valkey.start_relay("valkey:\n  stream_key: \"stream:topic:{topic}\"\n", &[]);
    let page = relay.read_topic("legacy", "order=asc");
    let messages = page["messages"].as_array().expect("messages");
    assert_eq!(
        messages.len(),
        1,
        "the Python relay's entry is not readable: {page}"
    );
    let m = &messages[0];
    assert_eq!(m["message_id"], legacy_id.as_str(), "{m}");
    assert_eq!(m["payload"], json!({"a": 1}), "{m}");
    assert_eq!(m["timestamp"], "2025-01-01T12:00:00.000Z", "{m}");
    assert_eq!(m["metadata"], json!({"source": "api"}), "{m}");

    let list = relay.get("/api/v1/topics").json();
    assert!(
        list["topics"]
            .as_array()
            .expect("topics")
            .iter()
            .any(|t| t["topic"] == "legacy"),
        "legacy topic not listed: {list}"
    );

    // New messages go to the same stream, after the old one.
    let ack = relay.publish("legacy", r#"{"a":2}"#);
    let entries = valkey.xrange("stream:topic:legacy");
    assert_eq!(entries.len(), 2, "{entries:?}");
    assert_eq!(entries[1].id, ack["message_id"].as_str().expect("id"));
    assert_eq!(valkey.xlen("topic:legacy:stream"), 0);
    let page = relay.read_topic("legacy", "order=asc");
    assert_eq!(
        ids_of(&page),
        vec![legacy_id, entries[1].id.clone()],
        "{page}"
    );
}

#[test]
fn buffered_ack_is_readable_at_once_and_persisted_shortly() {
    let valkey = ValkeyServer::start(ValkeyOpts::default());
    let relay = valkey.start_relay("durability:\n  ack: buffered\n", &[]);
    let names = two_shard_topics("buffered", 4);
    let mut conn = relay.connect();
    let mut acked: Vec<Vec<String>> = vec![Vec::new(); names.len()];
    for i in 0..40 {
        let t = i % names.len();
        let ack = conn.publish(&names[t], &format!(r#"{{"i":{i}}}"#));
        let id = ack["message_id"].as_str().expect("id").to_string();
        // Readable the moment it is acknowledged.
        let page = relay.read_topic(&names[t], "order=desc&limit=1");
        assert_eq!(ids_of(&page), vec![id.clone()], "{page}");
        acked[t].push(id);
    }
    for (t, topic) in names.iter().enumerate() {
        let key = stream_key(topic);
        assert!(
            eventually(Duration::from_secs(10), || valkey.xlen(&key) == 10),
            "{key} has {} entries, want 10",
            valkey.xlen(&key)
        );
        let ids: Vec<String> = valkey.xrange(&key).into_iter().map(|e| e.id).collect();
        assert_eq!(
            ids, acked[t],
            "stream ids of {topic} differ from the acknowledged ones"
        );
    }
}

#[test]
fn health_reports_the_valkey_server() {
    let valkey = ValkeyServer::start(ValkeyOpts::default());
    let relay = valkey.start_relay("", &[]);
    let health = relay.health();
    let storage = &health["storage"];
    assert_eq!(storage["backend"], "valkey", "{health}");
    assert_eq!(storage["connected"], true, "{health}");
    assert_eq!(storage["host"], "127.0.0.1", "{health}");
    assert_eq!(storage["port"], valkey.port, "{health}");
    let info = &storage["server_info"];
    let version = valkey
        .info_field("server", "valkey_version")
        .or_else(|| valkey.info_field("server", "redis_version"))
        .expect("INFO has a version");
    assert_eq!(info["version"], version.as_str(), "{health}");
    assert!(info["uptime_s"].is_u64(), "{health}");
    assert!(
        info["used_memory"].as_u64().is_some_and(|m| m > 0),
        "{health}"
    );
    assert_eq!(info["aof_enabled"], true, "{health}");
    assert_eq!(info["maxmemory_policy"], "noeviction", "{health}");
    assert_eq!(storage["warnings"], json!([]), "{health}");
    assert_eq!(health["status"], "healthy", "{health}");
}

#[test]
fn health_warns_when_valkey_does_not_persist() {
    let valkey = ValkeyServer::start(ValkeyOpts {
        appendonly: false,
        ..ValkeyOpts::default()
    });
    let relay = valkey.start_relay("", &[]);
    let health = relay.health();
    let storage = &health["storage"];
    assert_eq!(storage["server_info"]["aof_enabled"], false, "{health}");
    let warnings = storage["warnings"].as_array().expect("warnings array");
    assert!(!warnings.is_empty(), "no warning with AOF off: {health}");
    assert!(warnings.iter().all(Value::is_string), "{health}");
}

/// A `valkey-cli SSUBSCRIBE <channel>` child process: the sharded pub/sub messages of one
/// channel, as another relay would receive them. Killed by PID on drop.
struct FeedSubscriber {
    child: Child,
    lines: mpsc::Receiver<String>,
}

impl FeedSubscriber {
    /// Subscribes and waits until Valkey confirmed the subscription.
    fn start(valkey: &ValkeyServer, channel: &str) -> FeedSubscriber {
        let mut child = Command::new("valkey-cli")
            .args(["-h", valkey.host(), "-p", &valkey.port.to_string()])
            .args(["SSUBSCRIBE", channel])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn valkey-cli SSUBSCRIBE");
        let stdout = child.stdout.take().expect("piped stdout");
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let mut subscriber = FeedSubscriber { child, lines };
        // Non-TTY output: `ssubscribe`, the channel, the subscription count.
        let confirmation: Vec<String> = (0..3).map(|_| subscriber.line()).collect();
        assert_eq!(
            confirmation,
            ["ssubscribe", channel, "1"],
            "SSUBSCRIBE {channel}"
        );
        subscriber
    }

    fn line(&mut self) -> String {
        self.lines
            .recv_timeout(Duration::from_secs(10))
            .expect("a line from valkey-cli SSUBSCRIBE within 10 s")
    }

    /// The payload of the next message: `smessage`, the channel, the payload.
    fn next_payload(&mut self) -> String {
        assert_eq!(self.line(), "smessage");
        self.line();
        self.line()
    }
}

impl Drop for FeedSubscriber {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `(instance id, id)` of a feed notification `"<instance id> <last id>"`, checking the
/// instance id is 16 hex digits.
fn notification(payload: &str) -> (String, String) {
    let (instance, id) = payload
        .split_once(' ')
        .unwrap_or_else(|| panic!("notification {payload:?} is not `<instance> <id>`"));
    assert!(
        instance.len() == 16 && instance.bytes().all(|b| b.is_ascii_hexdigit()),
        "instance id {instance:?}"
    );
    common::parse_id(id);
    (instance.to_owned(), id.to_owned())
}

/// The cross-relay notification contract: every `pulsar_publish` call that stored something
/// publishes `"<relay instance id> <id of the call's last entry>"` on the sharded channel
/// `<stream key>:feed`; a call that stored nothing (a replay) publishes nothing.
#[test]
fn every_append_notifies_the_topic_feed_channel() {
    for yaml in ["", "durability:\n  ack: buffered\n"] {
        let valkey = ValkeyServer::start(ValkeyOpts::default());
        let fleet = common::fleet::RelayFleet::start(&valkey, 2, yaml, &[]);
        let channel = format!("{}:feed", stream_key("feed"));
        let mut feed = FeedSubscriber::start(&valkey, &channel);

        let first = fleet.relay(0).publish("feed", "1");
        let (instance, id) = notification(&feed.next_payload());
        assert_eq!(id, first["message_id"], "ack {yaml:?}");

        // A bulk to one topic is one call: one notification, naming its last entry.
        let body = r#"{"messages":[{"topic":"feed","payload":1},{"topic":"feed","payload":2}]}"#;
        let resp = fleet.relay(0).post_json("/api/v1/messages/bulk", body);
        let results = resp.json()["results"].clone();
        let (same_instance, id) = notification(&feed.next_payload());
        assert_eq!(same_instance, instance, "ack {yaml:?}");
        assert_eq!(id, results[1]["message_id"], "ack {yaml:?}: {results}");

        // A replay stores nothing and notifies nothing: the next notification is the next
        // append's, made through the other relay, which names itself.
        let keyed = |relay: &common::Server| {
            relay.connect().request_with(
                "POST",
                "/api/v1/messages",
                &[("Idempotency-Key", "once")],
                Some(common::publish_body("feed", "3").as_bytes()),
            )
        };
        let stored = keyed(fleet.relay(1)).json();
        let (other_instance, id) = notification(&feed.next_payload());
        assert_eq!(id, stored["message_id"], "ack {yaml:?}");
        assert_ne!(other_instance, instance, "two relays, two instance ids");
        assert_eq!(
            keyed(fleet.relay(0)).json()["message_id"],
            stored["message_id"]
        );
        let last = fleet.relay(1).publish("feed", "4");
        let (_, id) = notification(&feed.next_payload());
        assert_eq!(id, last["message_id"], "ack {yaml:?}: the replay notified");
    }
}

/// Every append goes through the `pulsar` library's function, loaded when a connection is
/// established: after `FUNCTION FLUSH` publishes fail (503) until the relay reconnects and
/// loads it again.
#[test]
fn the_function_library_is_loaded_again_when_the_relay_reconnects() {
    let valkey = ValkeyServer::start(ValkeyOpts::default());
    let relay = valkey.start_relay("", &[]);
    let listed = |valkey: &ValkeyServer| valkey.cli(&["FUNCTION", "LIST", "LIBRARYNAME", "pulsar"]);
    let before = listed(&valkey);
    assert!(
        before.contains("pulsar_publish") && before.contains("version "),
        "{before}"
    );
    relay.publish("lib", "1");
    valkey.cli(&["FUNCTION", "FLUSH"]);
    let resp = relay.post_json("/api/v1/messages", &common::publish_body("lib", "2"));
    common::valkey::assert_unavailable(&resp);
    valkey.cli(&["CLIENT", "KILL", "TYPE", "normal"]);
    assert!(
        eventually(Duration::from_secs(10), || relay
            .post_json("/api/v1/messages", &common::publish_body("lib", "3"))
            .status
            == 201),
        "publishes never recovered after the reconnect"
    );
    assert_eq!(listed(&valkey), before);
    assert_eq!(valkey.xlen(&stream_key("lib")), 2);
}
