//! Idempotent publish, black-box: `Idempotency-Key` on `POST /api/v1/messages`, the
//! whole-request header and per-item `idempotency_key` of bulk publishes, with the memory
//! backend and the Valkey backend in both ack modes. A replay answers the first attempt's id
//! and timestamp and stores nothing (checked with `XLEN` on Valkey, a full read on memory),
//! also when many attempts race, when the retry lands on another relay of the same Valkey,
//! and until the window ends; invalid keys are 400 JSON; and the real Python client's retry
//! loop, losing responses the relay already gave, stores each message once.

mod common;

use std::collections::HashSet;
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use serde_json::Value;

use common::fleet::RelayFleet;
use common::valkey::{stream_key, ValkeyOpts, ValkeyServer};
use common::{assert_error_body, assert_strictly_increasing, eventually, Response, Server};

const BUFFERED: &str = "durability:\n  ack: buffered\n";

/// A relay on one backend, with Valkey when it needs it.
struct Setup {
    name: &'static str,
    relay: Server,
    valkey: Option<ValkeyServer>,
}

impl Setup {
    fn memory(yaml: &str) -> Setup {
        Setup {
            name: "memory",
            relay: Server::start_with_shards(yaml, 2),
            valkey: None,
        }
    }

    fn valkey(name: &'static str, yaml: &str) -> Setup {
        let valkey = ValkeyServer::start(ValkeyOpts::default());
        let relay = valkey.start_relay(yaml, &[]);
        Setup {
            name,
            relay,
            valkey: Some(valkey),
        }
    }

    /// Every backend and ack mode, each with `extra` YAML.
    fn all(extra: &str) -> Vec<Setup> {
        vec![
            Setup::memory(extra),
            Setup::valkey("valkey persisted", extra),
            Setup::valkey("valkey buffered", &format!("{BUFFERED}{extra}")),
        ]
    }

    /// How many messages the topic holds where they are kept: Valkey's `XLEN`, or a full
    /// read of the memory backend.
    fn stored(&self, topic: &str) -> usize {
        match &self.valkey {
            Some(valkey) => valkey.xlen(&stream_key(topic)) as usize,
            None => self.relay.all_payloads(topic).len(),
        }
    }

    fn buffered(&self) -> bool {
        self.name.ends_with("buffered")
    }
}

fn publish_with_key(relay: &Server, topic: &str, payload: &str, key: &str) -> Response {
    relay.connect().request_with(
        "POST",
        "/api/v1/messages",
        &[("Idempotency-Key", key)],
        Some(common::publish_body(topic, payload).as_bytes()),
    )
}

fn bulk(relay: &Server, body: &str, key: Option<&str>) -> Response {
    let headers: Vec<(&str, &str)> = key.map(|k| ("Idempotency-Key", k)).into_iter().collect();
    relay.connect().request_with(
        "POST",
        "/api/v1/messages/bulk",
        &headers,
        Some(body.as_bytes()),
    )
}

/// `(message_id, timestamp)` of a 201.
fn answer(resp: &Response) -> (String, String) {
    assert_eq!(resp.status, 201, "{resp:?}");
    let v = resp.json();
    (
        v["message_id"].as_str().expect("message_id").to_owned(),
        v["timestamp"].as_str().expect("timestamp").to_owned(),
    )
}

/// Per item of a 207: `Some((message_id, timestamp))` when accepted.
fn bulk_answers(resp: &Response) -> Vec<Option<(String, String)>> {
    assert_eq!(resp.status, 207, "{resp:?}");
    resp.json()["results"]
        .as_array()
        .expect("results")
        .iter()
        .map(|r| {
            (r["status"] == "accepted").then(|| {
                (
                    r["message_id"].as_str().expect("id").to_owned(),
                    r["timestamp"].as_str().expect("timestamp").to_owned(),
                )
            })
        })
        .collect()
}

#[test]
fn replays_answer_the_first_publish_and_store_nothing() {
    for setup in Setup::all("") {
        let name = setup.name;
        let relay = &setup.relay;
        // Single: the replay (even with another body) is answered like the first attempt.
        let first = answer(&publish_with_key(relay, "orders", r#"{"n":1}"#, "k-1"));
        let replay = answer(&publish_with_key(
            relay,
            "orders",
            r#"{"n":"other"}"#,
            "k-1",
        ));
        assert_eq!(replay, first, "{name}: single replay");
        assert_eq!(
            setup.stored("orders"),
            1,
            "{name}: the replay stored something"
        );
        // A key names a publish to one topic: the same key elsewhere is another publish.
        let elsewhere = answer(&publish_with_key(relay, "billing", "1", "k-1"));
        assert_ne!(elsewhere.0, first.0, "{name}");
        assert_eq!(setup.stored("billing"), 1, "{name}");

        // Bulk with the client's whole-request header: each item gets `<key>:<index>`.
        let body = r#"{"messages":[
            {"topic":"orders","payload":1},
            {"topic":"billing","payload":2},
            {"topic":"bad topic!","payload":3},
            {"topic":"orders","payload":4}]}"#;
        let first_bulk = bulk_answers(&bulk(relay, body, Some("bulk-1")));
        assert!(
            first_bulk[2].is_none(),
            "{name}: the invalid item is rejected"
        );
        let replayed_bulk = bulk_answers(&bulk(relay, body, Some("bulk-1")));
        assert_eq!(replayed_bulk, first_bulk, "{name}: bulk replay");
        assert_eq!(setup.stored("orders"), 3, "{name}");
        assert_eq!(setup.stored("billing"), 2, "{name}");
        // The derived key is the documented `<key>:<index>`, good on the single endpoint too.
        let derived = answer(&publish_with_key(relay, "billing", "9", "bulk-1:1"));
        assert_eq!(Some(derived), first_bulk[1].clone(), "{name}");

        // Per-item keys (winning over the header's), shared with the single endpoint.
        let body = r#"{"messages":[
            {"topic":"orders","payload":5,"idempotency_key":"item-a"},
            {"topic":"orders","payload":6}]}"#;
        let items = bulk_answers(&bulk(relay, body, Some("bulk-2")));
        let again = bulk_answers(&bulk(relay, body, Some("bulk-2")));
        assert_eq!(again, items, "{name}: per-item replay");
        let single = answer(&publish_with_key(relay, "orders", "7", "item-a"));
        assert_eq!(Some(single), items[0].clone(), "{name}");
        // Without a header the item without a key is a new publish each time.
        let no_header = bulk_answers(&bulk(relay, body, None));
        assert_eq!(no_header[0], items[0], "{name}");
        assert_ne!(no_header[1], items[1], "{name}");
        let expected_orders = 3 + 2 + 1;
        if setup.buffered() {
            // The unkeyed item of the last bulk is acknowledged before it is written.
            let valkey = setup.valkey.as_ref().expect("valkey");
            assert!(
                eventually(Duration::from_secs(10), || valkey
                    .xlen(&stream_key("orders"))
                    == expected_orders),
                "{name}: orders never reached {expected_orders}"
            );
        }
        assert_eq!(setup.stored("orders"), expected_orders as usize, "{name}");
        // The relay's own reads agree: every message once, in id order.
        let ids: Vec<String> = all_ids(relay, "orders");
        assert_eq!(ids.len(), expected_orders as usize, "{name}: {ids:?}");
        assert_strictly_increasing(&ids);
    }
}

/// Every message id of a topic, oldest first, as the relay serves them.
fn all_ids(relay: &Server, topic: &str) -> Vec<String> {
    let mut ids = Vec::new();
    let mut cursor: Option<String> = None;
    loop {
        let query = match &cursor {
            Some(c) => format!("order=asc&limit=1000&cursor={c}"),
            None => "order=asc&limit=1000".to_owned(),
        };
        let page = relay.read_topic(topic, &query);
        for m in page["messages"].as_array().expect("messages") {
            ids.push(m["message_id"].as_str().expect("id").to_owned());
        }
        match page["next_cursor"].as_str() {
            Some(c) => cursor = Some(c.to_owned()),
            None => return ids,
        }
    }
}

/// Attempts with one key released at once over many connections (a retry arriving while the
/// first attempt is in flight, many times over): exactly one message, one answer for all.
#[test]
fn concurrent_attempts_with_one_key_store_exactly_once() {
    const ATTEMPTS: usize = 16;
    for setup in Setup::all("") {
        let name = setup.name;
        for round in 0..3 {
            let key = format!("race-{round}");
            let barrier = Arc::new(Barrier::new(ATTEMPTS));
            let addr = setup.relay.addr;
            let threads: Vec<_> = (0..ATTEMPTS)
                .map(|i| {
                    let barrier = barrier.clone();
                    let key = key.clone();
                    std::thread::spawn(move || {
                        let mut conn = common::Conn::connect(addr);
                        let body = common::publish_body("race", &i.to_string());
                        let request = common::build_request(
                            "POST",
                            "/api/v1/messages",
                            &[("Idempotency-Key", &key)],
                            Some(body.as_bytes()),
                        );
                        barrier.wait();
                        conn.send(&request);
                        conn.read_response(false)
                    })
                })
                .collect();
            let answers: HashSet<(String, String)> = threads
                .into_iter()
                .map(|t| answer(&t.join().expect("attempt thread")))
                .collect();
            assert_eq!(answers.len(), 1, "{name}: attempts got {answers:?}");
            assert_eq!(setup.stored("race"), round + 1, "{name}: round {round}");
        }
    }
}

/// Keyed publishes (each sent twice) racing unkeyed ones on one topic: the stream, the
/// answers, the relay's reads and a live consumer must agree: every message once, in id
/// order. The hard case is `ack: buffered`, where a keyed publish waits for Valkey's decision
/// and holds its topic while unkeyed ones are answered at once.
#[test]
fn keyed_and_plain_publishes_racing_on_one_topic_keep_it_in_order() {
    for setup in [
        Setup::valkey("valkey buffered", BUFFERED),
        Setup::valkey("valkey persisted", ""),
    ] {
        keyed_and_plain_race(setup);
    }
}

fn keyed_and_plain_race(setup: Setup) {
    let valkey = setup.valkey.as_ref().expect("valkey");
    let addr = setup.relay.addr;
    // A live consumer sees the topic as the hot tier's feed hands it out.
    let mut consumer = common::ws::WsClient::connect(addr);
    consumer.subscribe(&["mixed"], None);
    let plain: Vec<_> = (0..4)
        .map(|p| {
            std::thread::spawn(move || {
                let mut conn = common::Conn::connect(addr);
                (0..50)
                    .map(|i| common::id_of(&conn.publish("mixed", &format!("\"p{p}-{i}\""))))
                    .collect::<Vec<String>>()
            })
        })
        .collect();
    let keyed: Vec<_> = (0..4)
        .map(|k| {
            std::thread::spawn(move || {
                let mut conn = common::Conn::connect(addr);
                let mut ids = Vec::new();
                for i in 0..25 {
                    let key = format!("key-{k}-{i}");
                    let body = common::publish_body("mixed", &format!("\"k{k}-{i}\""));
                    let mut send = || {
                        answer(&conn.request_with(
                            "POST",
                            "/api/v1/messages",
                            &[("Idempotency-Key", &key)],
                            Some(body.as_bytes()),
                        ))
                    };
                    let first = send();
                    assert_eq!(send(), first, "replay of {key}");
                    ids.push(first.0);
                }
                ids
            })
        })
        .collect();
    let mut answered: Vec<String> = Vec::new();
    for t in plain.into_iter().chain(keyed) {
        answered.extend(t.join().expect("publisher thread"));
    }
    assert_eq!(answered.len(), 300);
    assert!(
        eventually(Duration::from_secs(20), || valkey
            .xlen(&stream_key("mixed"))
            == 300),
        "the stream never reached 300: {}",
        valkey.xlen(&stream_key("mixed"))
    );
    let in_valkey: Vec<String> = valkey
        .xrange(&stream_key("mixed"))
        .into_iter()
        .map(|e| e.id)
        .collect();
    assert_strictly_increasing(&in_valkey);
    let mut sorted = answered.clone();
    sorted.sort_by_key(|id| common::parse_id(id));
    assert_eq!(sorted, in_valkey, "answered ids = stored ids");
    assert_eq!(
        all_ids(&setup.relay, "mixed"),
        in_valkey,
        "the relay's reads"
    );
    let delivered: Vec<String> = (0..300)
        .map(|_| {
            let frame = consumer.recv();
            assert_eq!(frame["type"], "message", "{frame}");
            frame["message_id"].as_str().expect("id").to_owned()
        })
        .collect();
    assert_eq!(
        delivered, in_valkey,
        "live delivery: every message once, in order"
    );
}

/// The retry lands on another relay of the same Valkey: the record is in Valkey, so it
/// answers the first relay's id and stores nothing.
#[test]
fn a_retry_on_another_relay_answers_the_first_id() {
    for yaml in ["", BUFFERED] {
        let valkey = ValkeyServer::start(ValkeyOpts::default());
        let fleet = RelayFleet::start(&valkey, 2, yaml, &[]);
        let first = answer(&publish_with_key(fleet.relay(0), "t", "1", "cross"));
        let retry = answer(&publish_with_key(fleet.relay(1), "t", "1", "cross"));
        assert_eq!(retry, first, "ack {yaml:?}");
        let body = r#"{"messages":[{"topic":"t","payload":1},{"topic":"u","payload":2}]}"#;
        let first = bulk_answers(&bulk(fleet.relay(1), body, Some("cross-bulk")));
        let retry = bulk_answers(&bulk(fleet.relay(0), body, Some("cross-bulk")));
        assert_eq!(retry, first, "ack {yaml:?}");
        assert_eq!(valkey.xlen(&stream_key("t")), 2, "ack {yaml:?}");
        assert_eq!(valkey.xlen(&stream_key("u")), 1, "ack {yaml:?}");
    }
}

/// After the window a key is forgotten: the same key publishes again.
#[test]
fn a_key_is_forgotten_when_the_window_ends() {
    let yaml = "idempotency:\n  window: 1s\n";
    for setup in [
        Setup::memory(yaml),
        Setup::valkey("valkey persisted", yaml),
        Setup::valkey("valkey buffered", &format!("{BUFFERED}{yaml}")),
    ] {
        let name = setup.name;
        let started = Instant::now();
        let first = answer(&publish_with_key(&setup.relay, "w", "1", "short"));
        if let Some(valkey) = &setup.valkey {
            let pttl = valkey.cli_json(&["PTTL", "topic:w:idem:short"]);
            let pttl = pttl.as_i64().expect("PTTL");
            assert!((1..=1000).contains(&pttl), "{name}: PTTL {pttl}");
        }
        // Inside the window: the first answer. Then, once it ended: a new message.
        let mut later = answer(&publish_with_key(&setup.relay, "w", "1", "short"));
        let within = started.elapsed();
        if within < Duration::from_millis(900) {
            assert_eq!(later, first, "{name}");
        }
        assert!(
            eventually(Duration::from_secs(10), || {
                later = answer(&publish_with_key(&setup.relay, "w", "1", "short"));
                later != first
            }),
            "{name}: the key was never forgotten"
        );
        assert!(
            started.elapsed() >= Duration::from_millis(900),
            "{name}: forgotten after {:?}, inside the 1 s window",
            started.elapsed()
        );
        assert_eq!(
            setup.stored("w"),
            2,
            "{name}: replays inside the window stored"
        );
    }
}

#[test]
fn invalid_keys_are_refused_with_a_json_400() {
    let setup = Setup::memory("");
    let relay = &setup.relay;
    let body = common::publish_body("k", "1");
    let post = |headers: &[(&str, &str)], body: &str| {
        relay
            .connect()
            .request_with("POST", "/api/v1/messages", headers, Some(body.as_bytes()))
    };
    let too_long = "k".repeat(256);
    for (headers, why) in [
        (vec![("Idempotency-Key", too_long.as_str())], "at most 255"),
        (vec![("Idempotency-Key", "caf\u{e9}")], "printable ASCII"),
        (vec![("Idempotency-Key", "")], "empty"),
        (
            vec![("Idempotency-Key", "a"), ("idempotency-key", "b")],
            "more than one",
        ),
    ] {
        let resp = post(&headers, &body);
        assert_error_body(&resp, "INVALID_REQUEST");
        let message = resp.json()["message"].as_str().unwrap_or("").to_owned();
        assert!(message.contains(why), "{headers:?}: {message}");
    }
    // The body's key follows the same rule, and must agree with the header.
    let resp = post(
        &[],
        r#"{"topic":"k","payload":1,"idempotency_key":"tab\there"}"#,
    );
    assert_error_body(&resp, "INVALID_REQUEST");
    let resp = post(
        &[("Idempotency-Key", "a")],
        r#"{"topic":"k","payload":1,"idempotency_key":"b"}"#,
    );
    assert_error_body(&resp, "INVALID_REQUEST");
    assert!(resp.json()["message"]
        .as_str()
        .unwrap_or("")
        .contains("differ"));
    // Bulk: a bad header refuses the request; a bad item key refuses that item only.
    let resp = bulk(
        relay,
        r#"{"messages":[{"topic":"k","payload":1}]}"#,
        Some(&too_long),
    );
    assert_error_body(&resp, "INVALID_REQUEST");
    let items = bulk(
        relay,
        r#"{"messages":[{"topic":"k","payload":1,"idempotency_key":""},{"topic":"k","payload":2}]}"#,
        None,
    );
    let results = items.json()["results"].clone();
    assert_eq!(results[0]["status"], "rejected", "{items:?}");
    assert_eq!(results[0]["error"], "INVALID_REQUEST", "{items:?}");
    assert_eq!(results[1]["status"], "accepted", "{items:?}");
    assert_eq!(setup.stored("k"), 1, "only the valid bulk item was stored");
    // A key at the limit is fine.
    answer(&publish_with_key(relay, "k", "1", &"k".repeat(255)));
}

/// Memory backend: at `idempotency.max_keys` a new key is refused with 503 (a remembered key
/// is never forgotten inside its window); known keys and unkeyed publishes still go through,
/// and keys are taken again once old ones expire.
#[test]
fn the_memory_record_refuses_new_keys_at_its_bound() {
    let relay = Server::start_with_shards("idempotency:\n  window: 1s\n  max_keys: 2\n", 1);
    let a = answer(&publish_with_key(&relay, "b", "1", "a"));
    answer(&publish_with_key(&relay, "b", "1", "b"));
    let refused = publish_with_key(&relay, "b", "1", "c");
    common::valkey::assert_unavailable(&refused);
    assert!(
        refused.json()["message"]
            .as_str()
            .unwrap_or("")
            .contains("idempotency.max_keys"),
        "{refused:?}"
    );
    assert_eq!(answer(&publish_with_key(&relay, "b", "1", "a")), a);
    relay.publish("b", "2");
    assert!(
        eventually(Duration::from_secs(10), || publish_with_key(
            &relay, "b", "1", "c"
        )
        .status
            == 201),
        "the bound never freed up"
    );
}

/// Runs tests/python/client_retry.py; returns its JSON report.
fn run_client(relay: &Server, topic: &str, mode: &str, lose: usize) -> Value {
    common::python::run_script(
        "client_retry.py",
        &[
            &format!("http://{}", relay.addr),
            topic,
            mode,
            &lose.to_string(),
        ],
    )
}

/// The real `pulsar-relay-client`: its retry loop resends a publish whose response it never
/// got (the relay had stored it) with the same `Idempotency-Key`; each message is stored once
/// and the client returns the stored id.
#[test]
fn the_python_client_retrying_a_lost_response_stores_once() {
    let valkey = ValkeyServer::start(ValkeyOpts::default());
    let relay = valkey.start_relay("", &[]);
    let report = run_client(&relay, "py", "single", 2);
    let keys = report["keys"].as_array().expect("keys");
    assert_eq!(
        keys.len(),
        3,
        "two lost responses, three attempts: {report}"
    );
    assert!(
        keys[0].is_string() && keys.iter().all(|k| *k == keys[0]),
        "{report}"
    );
    assert!(
        report["statuses"]
            .as_array()
            .expect("statuses")
            .iter()
            .all(|s| s == 201),
        "{report}"
    );
    let entries = valkey.xrange(&stream_key("py"));
    assert_eq!(entries.len(), 1, "stored once: {report}");
    assert_eq!(report["result"]["message_id"], entries[0].id.as_str());

    let report = run_client(&relay, "py-bulk", "bulk", 1);
    let keys = report["keys"].as_array().expect("keys");
    assert_eq!(keys.len(), 2, "{report}");
    assert_eq!(keys[0], keys[1], "{report}");
    let entries = valkey.xrange(&stream_key("py-bulk"));
    assert_eq!(entries.len(), 3, "each item stored once: {report}");
    let returned: Vec<&str> = report["result"]["results"]
        .as_array()
        .expect("results")
        .iter()
        .map(|r| r["message_id"].as_str().expect("id"))
        .collect();
    let stored: Vec<&str> = entries.iter().map(|e| e.id.as_str()).collect();
    assert_eq!(returned, stored, "{report}");
}

/// `ack: buffered` with Valkey down: a keyed publish is not acknowledged (it waits for
/// Valkey's decision, which does not come), it gets 503 and is not written behind later; the
/// producer's retry with the same key, once Valkey is back, stores it once.
#[test]
fn a_keyed_buffered_publish_while_valkey_is_down_is_refused_then_stored_once_on_retry() {
    let yaml = format!("{BUFFERED}valkey:\n  connect_timeout: 1s\n  command_timeout: 1s\n");
    let mut valkey = ValkeyServer::start(ValkeyOpts::default());
    let relay = valkey.start_relay(&yaml, &[]);
    let before = answer(&publish_with_key(&relay, "down", "0", "before"));
    valkey.stop();
    let started = Instant::now();
    let refused = publish_with_key(&relay, "down", "1", "during");
    common::valkey::assert_unavailable(&refused);
    assert!(
        started.elapsed() < Duration::from_secs(8),
        "the keyed publish waited {:?}",
        started.elapsed()
    );
    valkey.restart();
    let mut stored = None;
    assert!(
        eventually(Duration::from_secs(20), || {
            let resp = publish_with_key(&relay, "down", "1", "during");
            if resp.status == 201 {
                stored = Some(answer(&resp));
            }
            stored.is_some()
        }),
        "the retry never succeeded"
    );
    let stored = stored.expect("stored");
    let ids: Vec<String> = valkey
        .xrange(&stream_key("down"))
        .into_iter()
        .map(|e| e.id)
        .collect();
    assert_eq!(ids, vec![before.0, stored.0.clone()], "once each, in order");
    assert_eq!(
        answer(&publish_with_key(&relay, "down", "1", "during")),
        stored
    );
}

/// `ack: replicated` on a Valkey with no replica: every `WAIT` counts 0, so a keyed publish
/// is stored but answered 503. Its retry with the same key is a replay: Valkey answers the
/// stored entry's id, which the relay returns as 201 without a `WAIT` verdict (the replay
/// wrote nothing; see `store/valkey/publish.rs`), and nothing is stored twice. A new key is
/// still held to the `WAIT`.
#[test]
fn a_replicated_replay_answers_the_stored_id_without_a_wait_verdict() {
    let yaml = "durability:\n  ack: replicated\n  replicas: 1\n  replica_timeout: 100ms\n";
    let valkey = ValkeyServer::start(ValkeyOpts::default());
    let relay = valkey.start_relay(yaml, &[]);
    let first = publish_with_key(&relay, "repl", "1", "k-repl");
    common::valkey::assert_unavailable(&first);
    let stored: Vec<String> = valkey
        .xrange(&stream_key("repl"))
        .into_iter()
        .map(|e| e.id)
        .collect();
    assert_eq!(stored.len(), 1, "the master stored the first attempt once");
    let replay = answer(&publish_with_key(&relay, "repl", "1", "k-repl"));
    assert_eq!(replay.0, stored[0], "the replay answers the stored id");
    assert_eq!(
        valkey.xlen(&stream_key("repl")),
        1,
        "the replay stored nothing"
    );
    common::valkey::assert_unavailable(&publish_with_key(&relay, "repl", "2", "k-other"));
    assert_eq!(valkey.xlen(&stream_key("repl")), 2);
}
