//! Black-box tests of long-poll delivery (`POST /messages/poll`, `GET /api/v1/poll`) against
//! the real binary: immediate answers from the backlog, parking and wake-up, the timeout
//! reply, the per-shard cap on parked requests and its release when a client disconnects, and
//! the publish-between-read-and-park race.
//!
//! Owns: everything observable on the two poll endpoints. Does not own: WebSocket
//! (`delivery_ws.rs`) or SSE (`delivery_sse.rs`) delivery.
//!
//! "Parked" is observed through `GET /messages/poll/stats` (`active_polls`), so no test sleeps
//! to guess that a request is waiting.

mod common;

use std::time::{Duration, Instant};

use common::{
    assert_error_body, eventually, id_of, parse_id, publish_n, topic_on_shard, topics_per_shard,
    Conn, Response, Server,
};
use serde_json::{json, Value};

const SHARDS: u64 = 2;

/// `POST /messages/poll` on a fresh connection.
fn poll(server: &Server, body: &Value) -> Response {
    server.post_json("/messages/poll", &body.to_string())
}

/// A poll answer's message ids, in answer order.
fn ids(resp: &Value) -> Vec<String> {
    resp["messages"]
        .as_array()
        .unwrap_or_else(|| panic!("no messages array in {resp}"))
        .iter()
        .map(id_of)
        .collect()
}

/// A poll answer's messages as `(topic, id)`, in answer order. Ids are per topic (two topics
/// can hold the same id), so a message is named by both.
fn pairs(resp: &Value) -> Vec<(String, String)> {
    resp["messages"]
        .as_array()
        .unwrap_or_else(|| panic!("no messages array in {resp}"))
        .iter()
        .map(|m| (m["topic"].as_str().expect("topic").to_string(), id_of(m)))
        .collect()
}

/// Asserts `got` is `want` (already oldest first) up to the order of equal ids of different
/// topics, and is itself oldest first.
fn assert_oldest_first(got: &[(String, String)], want: &[(String, String)], context: &Value) {
    for w in got.windows(2) {
        assert!(
            parse_id(&w[0].1) <= parse_id(&w[1].1),
            "not oldest first: {:?} before {:?} in {context}",
            w[0],
            w[1]
        );
    }
    let mut g = got.to_vec();
    let mut w = want.to_vec();
    g.sort_by(|a, b| (parse_id(&a.1), &a.0).cmp(&(parse_id(&b.1), &b.0)));
    w.sort_by(|a, b| (parse_id(&a.1), &a.0).cmp(&(parse_id(&b.1), &b.0)));
    assert_eq!(g, w, "{context}");
}

/// `(topic, id)` for each id.
fn named(topic: &str, ids: &[String]) -> Vec<(String, String)> {
    ids.iter()
        .map(|id| (topic.to_string(), id.clone()))
        .collect()
}

/// Sorts `(topic, id)` pairs oldest first (ties by topic name).
fn oldest_first(mut v: Vec<(String, String)>) -> Vec<(String, String)> {
    v.sort_by(|a, b| (parse_id(&a.1), &a.0).cmp(&(parse_id(&b.1), &b.0)));
    v
}

/// Parked polls across shards, from the stats endpoint.
fn parked(server: &Server) -> u64 {
    let stats = server.get("/messages/poll/stats").json();
    stats["active_polls"]
        .as_u64()
        .unwrap_or_else(|| panic!("no active_polls in {stats}"))
}

/// Sends a poll on its own connection from a thread; the handle yields the response and how
/// long it took.
fn poll_in_background(
    server: &Server,
    body: Value,
) -> std::thread::JoinHandle<(Response, Duration)> {
    let addr = server.addr;
    std::thread::spawn(move || {
        let started = Instant::now();
        let mut conn = Conn::connect(addr);
        let resp = conn.request("POST", "/messages/poll", Some(body.to_string().as_bytes()));
        (resp, started.elapsed())
    })
}

fn join<T>(handle: std::thread::JoinHandle<T>) -> T {
    match handle.join() {
        Ok(v) => v,
        Err(panic) => std::panic::resume_unwind(panic),
    }
}

/// Asserts `resp` is a delivery (not a timeout) of exactly `want`, oldest first.
fn assert_delivered(resp: &Response, want: &[String]) -> Value {
    assert_eq!(resp.status, 200, "{resp:?}");
    let v = resp.json();
    assert!(
        v.get("timeout").is_none_or(|t| t == false),
        "timed out instead of delivering: {v}"
    );
    assert_eq!(ids(&v), want, "{v}");
    v
}

#[test]
fn a_parked_poll_is_woken_by_a_publish() {
    let server = Server::start_with_shards("", SHARDS as usize);
    let topics = topics_per_shard("lp-wake", SHARDS);
    for topic in &topics {
        // Backlog exists but a poll without `since` waits for new messages only.
        server.publish(topic, r#"{"old":true}"#);
        let waiting = poll_in_background(&server, json!({"topics": [topic], "timeout": 20}));
        assert!(
            eventually(Duration::from_secs(10), || parked(&server) == 1),
            "the poll never parked"
        );
        let meta = json!({"k": "v"});
        let body = json!({"topic": topic, "payload": {"new": true}, "metadata": meta});
        let resp = server.post_json("/api/v1/messages", &body.to_string());
        assert_eq!(resp.status, 201, "{resp:?}");
        let ack = resp.json();
        let (resp, took) = join(waiting);
        let v = assert_delivered(&resp, &[id_of(&ack)]);
        assert!(took < Duration::from_secs(15), "woken only after {took:?}");
        let m = &v["messages"][0];
        assert_eq!(m["topic"], topic.as_str(), "{m}");
        assert_eq!(m["payload"], json!({"new": true}), "{m}");
        assert_eq!(m["timestamp"], ack["timestamp"], "{m}");
        assert_eq!(m["metadata"], meta, "{m}");
        assert_eq!(v["has_more"], false, "{v}");
        assert_eq!(v["next_offset"], json!({topic: id_of(&ack)}), "{v}");
        assert!(
            eventually(Duration::from_secs(5), || parked(&server) == 0),
            "an answered poll still counts as parked"
        );
    }

    // One poll over topics of both shards is woken by either.
    let waiting = poll_in_background(&server, json!({"topics": topics, "timeout": 20}));
    assert!(
        eventually(Duration::from_secs(10), || parked(&server) == 1),
        "the poll never parked"
    );
    let id = id_of(&server.publish(&topics[1], r#"{"second":true}"#));
    let (resp, _) = join(waiting);
    assert_delivered(&resp, &[id]);
}

#[test]
fn backlog_is_returned_at_once_oldest_first() {
    let server = Server::start_with_shards("", SHARDS as usize);
    let topics = topics_per_shard("lp-backlog", SHARDS);
    let (t0, t1) = (topics[0].as_str(), topics[1].as_str());
    let mut conn = server.connect();
    // Interleaved, so "oldest first" across topics is a real merge.
    let mut a = Vec::new();
    let mut b = Vec::new();
    for _ in 0..3 {
        a.extend(publish_n(&mut conn, t0, 2));
        b.extend(publish_n(&mut conn, t1, 1));
    }
    let all = oldest_first([named(t0, &a), named(t1, &b)].concat());

    // t0 after its 2nd message, t1 (listed without an id) from its oldest.
    let started = Instant::now();
    let resp = poll(
        &server,
        &json!({"topics": [t0, t1], "since": {t0: a[1]}, "timeout": 30}),
    );
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "a backlog poll waited"
    );
    assert_eq!(resp.status, 200, "{resp:?}");
    let v = resp.json();
    let want = oldest_first([named(t0, &a[2..]), named(t1, &b)].concat());
    assert_oldest_first(&pairs(&v), &want, &v);
    assert_eq!(v["has_more"], false, "{v}");
    assert_eq!(v["next_offset"], json!({t0: a[5], t1: b[2]}), "{v}");
    for m in v["messages"].as_array().expect("messages") {
        assert!(
            m.get("type").is_none(),
            "a poll message has no type field: {m}"
        );
        for field in ["message_id", "topic", "payload", "timestamp", "metadata"] {
            assert!(m.get(field).is_some(), "{field} missing: {m}");
        }
    }

    // A limit cuts the oldest-first list and says there is more; following next_offset
    // continues exactly where it stopped.
    let resp = poll(
        &server,
        &json!({"topics": [t0, t1], "since": {}, "limit": 4, "timeout": 30}),
    );
    let first = resp.json();
    let got_first = pairs(&first);
    assert_eq!(got_first.len(), 4, "{first}");
    assert_eq!(first["has_more"], true, "{first}");
    // A topic the first page did not reach is absent from next_offset: read from its oldest.
    let since = first["next_offset"].clone();
    let resp = poll(
        &server,
        &json!({"topics": [t0, t1], "since": since, "limit": 100, "timeout": 30}),
    );
    let rest = resp.json();
    assert_eq!(rest["has_more"], false, "{rest}");
    let both: Vec<(String, String)> = [got_first, pairs(&rest)].concat();
    assert_oldest_first(&both, &all, &json!([first, rest]));

    // Caught up: nothing after the last ids, so the poll waits out its timeout.
    let resp = poll(
        &server,
        &json!({"topics": [t0, t1], "since": {t0: a[5], t1: b[2]}, "timeout": 1}),
    );
    assert_eq!(resp.json()["timeout"], true, "{resp:?}");
}

#[test]
fn get_poll_form_uses_one_since_for_every_topic() {
    let server = Server::start_with_shards("", SHARDS as usize);
    let topics = topics_per_shard("lp-get", SHARDS);
    let (t0, t1) = (topics[0].as_str(), topics[1].as_str());
    let mut conn = server.connect();
    let a = publish_n(&mut conn, t0, 3);
    let b = publish_n(&mut conn, t1, 3);
    let since = a[0].clone();
    let want = oldest_first(
        [named(t0, &a), named(t1, &b)]
            .concat()
            .into_iter()
            .filter(|(_, id)| parse_id(id) > parse_id(&since))
            .collect(),
    );
    let resp = server.get(&format!(
        "/api/v1/poll?topics={t0},{t1}&since={since}&timeout=5&limit=100"
    ));
    assert_eq!(resp.status, 200, "{resp:?}");
    let v = resp.json();
    assert_oldest_first(&pairs(&v), &want, &v);
    assert_eq!(v["has_more"], false, "{v}");

    let resp = server.get(&format!(
        "/api/v1/poll?topics={t0},{t1}&since={since}&limit=2"
    ));
    let v = resp.json();
    assert_eq!(pairs(&v).len(), 2, "{v}");
    assert_eq!(v["has_more"], true, "{v}");

    // Without since: parks until something new arrives.
    let addr = server.addr;
    let path = format!("/api/v1/poll?topics={t0},{t1}&timeout=20");
    let waiting = std::thread::spawn(move || Conn::connect(addr).request("GET", &path, None));
    assert!(
        eventually(Duration::from_secs(10), || parked(&server) == 1),
        "the GET poll never parked"
    );
    let id = id_of(&conn.publish(t0, r#"{"new":true}"#));
    assert_delivered(&join(waiting), &[id]);
}

#[test]
fn a_poll_with_nothing_new_times_out() {
    let server = Server::start_with_shards("", SHARDS as usize);
    let topic = topic_on_shard("lp-timeout", 1, SHARDS);
    server.publish(&topic, r#"{"old":true}"#);
    let started = Instant::now();
    let resp = poll(&server, &json!({"topics": [topic], "timeout": 1}));
    let took = started.elapsed();
    assert_eq!(resp.status, 200, "{resp:?}");
    let last = server.read_topic(&topic, "")["messages"][0]["message_id"].clone();
    assert_eq!(
        resp.json(),
        json!({"messages": [], "has_more": false, "timeout": true, "next_offset": {&topic: last}})
    );
    assert!(
        took >= Duration::from_millis(900),
        "answered the timeout after only {took:?}"
    );
    assert!(took < Duration::from_secs(6), "a 1 s poll took {took:?}");

    let started = Instant::now();
    let resp = server.get(&format!("/api/v1/poll?topics={topic}&timeout=1"));
    assert_eq!(resp.json()["timeout"], true, "{resp:?}");
    assert!(started.elapsed() >= Duration::from_millis(900));
}

#[test]
fn invalid_polls_are_rejected() {
    let server = Server::start_with_shards("", SHARDS as usize);
    for (body, code) in [
        (json!({"topics": []}), "INVALID_REQUEST"),
        (json!({"topics": ["a"], "timeout": 0}), "INVALID_REQUEST"),
        (json!({"topics": ["a"], "timeout": 61}), "INVALID_REQUEST"),
        (json!({"topics": ["a"], "limit": 0}), "INVALID_REQUEST"),
        (json!({"topics": ["bad topic"]}), "INVALID_TOPIC"),
        (
            json!({"topics": ["a"], "since": {"a": "nope"}}),
            "INVALID_CURSOR",
        ),
    ] {
        let resp = poll(&server, &body);
        assert_error_body(&resp, code);
    }
    assert_error_body(
        &server.get("/api/v1/poll?topics=a&since=nope"),
        "INVALID_CURSOR",
    );
    assert_error_body(&server.get("/api/v1/poll"), "INVALID_REQUEST");
}

#[test]
fn the_parked_cap_is_enforced_and_a_disconnect_frees_its_slot() {
    let server = Server::start_with_shards("longpoll:\n  max_parked_per_shard: 1\n", 1);
    let topic = "lp-cap";
    let body = json!({"topics": [topic], "timeout": 30}).to_string();

    let mut first = Conn::connect(server.addr);
    first.send(&common::build_request(
        "POST",
        "/messages/poll",
        &[],
        Some(body.as_bytes()),
    ));
    assert!(
        eventually(Duration::from_secs(10), || parked(&server) == 1),
        "the first poll never parked"
    );

    // The one slot is taken: a second poll is refused at once.
    let started = Instant::now();
    let resp = poll(&server, &json!({"topics": [topic], "timeout": 1}));
    assert_error_body(&resp, "SERVICE_UNAVAILABLE");
    assert!(
        resp.header("retry-after").is_some(),
        "503 without Retry-After: {resp:?}"
    );
    assert!(
        started.elapsed() < Duration::from_millis(900),
        "the refusal waited"
    );

    // The client goes away: its slot is released without waiting out its 30 s.
    first.shutdown_write();
    drop(first);
    assert!(
        eventually(Duration::from_secs(5), || parked(&server) == 0),
        "the disconnected poll still counts as parked"
    );
    let waiting = poll_in_background(&server, json!({"topics": [topic], "timeout": 20}));
    assert!(
        eventually(Duration::from_secs(10), || parked(&server) == 1),
        "a new poll does not park after the disconnect"
    );
    let id = id_of(&server.publish(topic, r#"{"after":"disconnect"}"#));
    let (resp, _) = join(waiting);
    assert_delivered(&resp, &[id]);
}

/// The race the Python relay lost: a message published between the poll's read and its
/// parking. Each round polls from the last id and publishes at once; every poll must return
/// that message, none may time out.
#[test]
fn a_publish_racing_a_poll_is_never_lost() {
    const ROUNDS: usize = 200;
    let server = Server::start_with_shards("", SHARDS as usize);
    let topics = topics_per_shard("lp-race", SHARDS);
    let mut publisher = server.connect();
    let mut last: Vec<String> = topics
        .iter()
        .map(|t| id_of(&publisher.publish(t, r#"{"seed":true}"#)))
        .collect();
    let mut failures = Vec::new();
    let started = Instant::now();
    for round in 0..ROUNDS {
        let k = round % topics.len();
        let topic = &topics[k];
        let body = json!({"topics": [topic], "since": {topic: last[k]}, "timeout": 5}).to_string();
        let mut poller = Conn::connect(server.addr);
        poller.send(&common::build_request(
            "POST",
            "/messages/poll",
            &[],
            Some(body.as_bytes()),
        ));
        let id = id_of(&publisher.publish(topic, &format!(r#"{{"round":{round}}}"#)));
        let resp = poller.read_response(false);
        let v = resp.json();
        if resp.status != 200 || ids(&v) != vec![id.clone()] {
            failures.push(format!(
                "round {round}: want [{id}], got {} {v}",
                resp.status
            ));
        }
        last[k] = id;
    }
    assert!(
        failures.is_empty(),
        "{} of {ROUNDS} polls lost the racing publish (in {:?}):\n{}",
        failures.len(),
        started.elapsed(),
        failures.join("\n")
    );
}

#[test]
fn a_resume_point_older_than_retention_is_reported_as_a_gap() {
    let server =
        Server::start_with_shards("storage:\n  max_messages_per_topic: 5\n", SHARDS as usize);
    for topic in topics_per_shard("lp-gap", SHARDS) {
        let ids = publish_n(&mut server.connect(), &topic, 20);
        let resp = poll(
            &server,
            &json!({"topics": [topic], "since": {&topic: ids[0]}, "timeout": 1}),
        );
        let body = assert_delivered(&resp, &ids[15..]);
        assert_eq!(
            body["gaps"],
            json!([{"type": "gap", "topic": topic, "requested": ids[0],
                    "oldest_available": ids[15], "reason": "trimmed"}]),
            "{body}"
        );

        // From the oldest retained message nothing was lost: no `gaps` key at all.
        let resp = poll(
            &server,
            &json!({"topics": [topic], "since": {&topic: ids[15]}, "timeout": 1}),
        );
        let body = assert_delivered(&resp, &ids[16..]);
        assert!(body.get("gaps").is_none(), "{body}");

        // Everything removed: the answer waits as usual, and its timeout still names the gap.
        let resp = server.post_json(
            &format!("/api/v1/topics/{topic}/trim"),
            r#"{"keep_count":0}"#,
        );
        assert_eq!(resp.status, 200, "{resp:?}");
        let resp = poll(
            &server,
            &json!({"topics": [topic], "since": {&topic: ids[16]}, "timeout": 1}),
        );
        let body = resp.json();
        assert_eq!(body["timeout"], true, "{body}");
        assert_eq!(body["gaps"][0]["oldest_available"], Value::Null, "{body}");
        assert_eq!(body["gaps"][0]["requested"], ids[16].as_str(), "{body}");
    }
}

/// `since` for a GET poll from a `next_offset` object: `a=<id>,b=<id>`.
fn since_query(next_offset: &Value) -> String {
    next_offset
        .as_object()
        .unwrap_or_else(|| panic!("next_offset is not an object: {next_offset}"))
        .iter()
        .map(|(t, id)| format!("{t}={}", id.as_str().expect("id string")))
        .collect::<Vec<_>>()
        .join(",")
}

/// Bug: `next_offset` named only the topics the answer delivered, so the README's "poll again
/// with since = next_offset" read every other topic from its oldest message again.
#[test]
fn polling_again_with_next_offset_never_rewinds_a_quiet_topic() {
    let server = Server::start_with_shards("", SHARDS as usize);
    let topics = topics_per_shard("lp-quiet", SHARDS);
    let (t0, t1) = (topics[0].as_str(), topics[1].as_str());
    let mut conn = server.connect();
    let a = publish_n(&mut conn, t0, 3);
    let b = publish_n(&mut conn, t1, 3);
    let fresh = id_of(&conn.publish(t0, r#"{"new":true}"#));
    let resp = poll(
        &server,
        &json!({"topics": [t0, t1], "since": {t0: a[2], t1: b[2]}, "timeout": 5}),
    );
    let v = assert_delivered(&resp, std::slice::from_ref(&fresh));
    assert_eq!(v["next_offset"], json!({t0: fresh, t1: b[2]}), "{v}");
    // Again from there: nothing new anywhere, and the timeout names both positions too.
    let resp = poll(
        &server,
        &json!({"topics": [t0, t1], "since": v["next_offset"], "timeout": 1}),
    );
    let again = resp.json();
    assert_eq!(again["timeout"], true, "{again}");
    assert_eq!(again["next_offset"], v["next_offset"], "{again}");
}

/// A poll from "now" that times out says where each topic stood when it started, so the next
/// poll from there gets exactly what was published in between: a topic with history from
/// its last id, a topic that never held a message from `0-0`.
#[test]
fn next_offset_names_every_topic_on_timeout_and_from_now() {
    let server = Server::start_with_shards("", SHARDS as usize);
    let topics = topics_per_shard("lp-now", SHARDS);
    let (t0, t1) = (topics[0].as_str(), topics[1].as_str());
    let mut conn = server.connect();
    let old = publish_n(&mut conn, t0, 2);
    for path_form in [false, true] {
        let resp = if path_form {
            server.get(&format!("/api/v1/poll?topics={t0},{t1}&timeout=1"))
        } else {
            poll(&server, &json!({"topics": [t0, t1], "timeout": 1}))
        };
        let v = resp.json();
        assert_eq!(v["timeout"], true, "{v}");
        assert_eq!(v["next_offset"], json!({t0: old[1], t1: "0-0"}), "{v}");
    }
    let x = id_of(&conn.publish(t0, r#"{"x":1}"#));
    let y = id_of(&conn.publish(t1, r#"{"y":1}"#));
    let since = json!({t0: old[1], t1: "0-0"});
    let v = poll(
        &server,
        &json!({"topics": [t0, t1], "since": since, "timeout": 5}),
    )
    .json();
    assert_oldest_first(
        &pairs(&v),
        &oldest_first(
            [
                named(t0, std::slice::from_ref(&x)),
                named(t1, std::slice::from_ref(&y)),
            ]
            .concat(),
        ),
        &v,
    );
    assert_eq!(v["next_offset"], json!({t0: x, t1: y}), "{v}");
    let v = server
        .get(&format!(
            "/api/v1/poll?topics={t0},{t1}&since={}&timeout=5",
            since_query(&since)
        ))
        .json();
    assert_eq!(pairs(&v).len(), 2, "{v}");
}

/// Bug: the GET form resumed every topic from one id, so which messages of the other topics
/// were skipped or repeated depended on how their ids interleaved. `since=a=<id>,b=<id>`
/// places each topic on its own.
#[test]
fn get_poll_resumes_each_topic_from_its_own_position() {
    let server = Server::start_with_shards("", SHARDS as usize);
    let topics = topics_per_shard("lp-vector", SHARDS);
    let (t0, t1) = (topics[0].as_str(), topics[1].as_str());
    let mut conn = server.connect();
    let a = publish_n(&mut conn, t0, 3);
    let b = publish_n(&mut conn, t1, 3);
    let resp = server.get(&format!(
        "/api/v1/poll?topics={t0},{t1}&since={t0}={},{t1}={}&timeout=5&limit=100",
        a[0], b[1]
    ));
    assert_eq!(resp.status, 200, "{resp:?}");
    let v = resp.json();
    let want = oldest_first([named(t0, &a[1..]), named(t1, &b[2..])].concat());
    assert_oldest_first(&pairs(&v), &want, &v);
    assert_eq!(v["next_offset"], json!({t0: a[2], t1: b[2]}), "{v}");
    // A topic the position leaves out is read from its oldest message.
    let v = server
        .get(&format!(
            "/api/v1/poll?topics={t0},{t1}&since={t1}={}&timeout=5&limit=100",
            b[2]
        ))
        .json();
    assert_oldest_first(&pairs(&v), &named(t0, &a), &v);
    for bad in ["a=nope", "a=1-0,", "=1-0", "bad%20topic=1-0", "a=1-0;b=2-0"] {
        assert_error_body(
            &server.get(&format!("/api/v1/poll?topics={t0}&since={bad}")),
            "INVALID_CURSOR",
        );
    }
}

/// `?topics=a,b,a` (and the same in a POST body) polls `a` once: each message once.
#[test]
fn duplicate_topics_are_polled_once() {
    let server = Server::start_with_shards("", SHARDS as usize);
    let topics = topics_per_shard("lp-dup", SHARDS);
    let (t0, t1) = (topics[0].as_str(), topics[1].as_str());
    let mut conn = server.connect();
    let a = publish_n(&mut conn, t0, 2);
    let b = publish_n(&mut conn, t1, 1);
    let want = oldest_first([named(t0, &a), named(t1, &b)].concat());
    let v = server
        .get(&format!(
            "/api/v1/poll?topics={t0},{t1},{t0}&since=0-0&timeout=5"
        ))
        .json();
    assert_oldest_first(&pairs(&v), &want, &v);
    let v = poll(
        &server,
        &json!({"topics": [t0, t1, t0], "since": {}, "timeout": 5}),
    )
    .json();
    assert_oldest_first(&pairs(&v), &want, &v);
}

/// Seeded random publishes and polls with random limits (crossing the number of pending
/// messages on both sides), each poll from the previous `next_offset`, in either form: every
/// message is delivered exactly once, in per-topic order. Set `SEED` to reproduce a run.
#[test]
fn random_polls_from_next_offset_deliver_each_message_once() {
    let seed = std::env::var("SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(11);
    let mut rng = fastrand::Rng::with_seed(seed);
    let server = Server::start_with_shards("", SHARDS as usize);
    let mut names = topics_per_shard("lp-rand", SHARDS);
    names.push(topic_on_shard("lp-rand-x", 0, SHARDS));
    let mut conn = server.connect();
    let mut published: Vec<Vec<String>> = vec![Vec::new(); names.len()];
    let mut delivered: Vec<Vec<String>> = vec![Vec::new(); names.len()];
    let mut next_offset: Option<Value> = None;
    for round in 0..40 {
        for _ in 0..rng.usize(0..5) {
            let i = rng.usize(0..names.len());
            published[i].push(id_of(&conn.publish(&names[i], r#"{"r":1}"#)));
        }
        let pending: usize = published.iter().map(Vec::len).sum::<usize>()
            - delivered.iter().map(Vec::len).sum::<usize>();
        if pending == 0 && next_offset.is_some() {
            continue;
        }
        let limit = rng.usize(1..=pending.max(1) + 1);
        let list = names.join(",");
        let resp = match (&next_offset, rng.bool()) {
            (None, _) => poll(
                &server,
                &json!({"topics": names, "since": {}, "limit": limit, "timeout": 1}),
            ),
            (Some(since), true) => poll(
                &server,
                &json!({"topics": names, "since": since, "limit": limit, "timeout": 1}),
            ),
            (Some(since), false) => server.get(&format!(
                "/api/v1/poll?topics={list}&since={}&limit={limit}&timeout=1",
                since_query(since)
            )),
        };
        assert_eq!(resp.status, 200, "seed {seed} round {round}: {resp:?}");
        let v = resp.json();
        for (topic, id) in pairs(&v) {
            let i = names
                .iter()
                .position(|n| *n == topic)
                .expect("a polled topic");
            delivered[i].push(id);
        }
        let offsets = v["next_offset"].clone();
        for name in &names {
            assert!(
                offsets[name].is_string(),
                "seed {seed} round {round}: next_offset lacks {name}: {v}"
            );
        }
        next_offset = Some(offsets);
        for (i, name) in names.iter().enumerate() {
            assert!(
                published[i].starts_with(&delivered[i]),
                "seed {seed} round {round} {name}: delivered {:?}, published {:?}",
                delivered[i],
                published[i]
            );
        }
    }
    // Drain what is left.
    while published.iter().map(Vec::len).sum::<usize>()
        > delivered.iter().map(Vec::len).sum::<usize>()
    {
        let since = next_offset.clone().expect("polled at least once");
        let v = poll(
            &server,
            &json!({"topics": names, "since": since, "limit": 3, "timeout": 1}),
        )
        .json();
        assert_ne!(
            v["timeout"], true,
            "seed {seed}: messages left but none delivered"
        );
        for (topic, id) in pairs(&v) {
            let i = names
                .iter()
                .position(|n| *n == topic)
                .expect("a polled topic");
            delivered[i].push(id);
        }
        next_offset = Some(v["next_offset"].clone());
    }
    assert_eq!(delivered, published, "seed {seed}");
}

/// Valkey backend, a relay that has not written the topic since it started (its memory knows
/// no last id): a poll from "now" still names the topic's newest id, read from Valkey, not
/// `0-0` (which would replay the whole stream on the next poll).
#[test]
fn a_poll_from_now_on_a_restarted_valkey_relay_names_the_newest_id() {
    let valkey = common::valkey::ValkeyServer::start(common::valkey::ValkeyOpts::default());
    let mut server = valkey.start_relay("", &[]);
    let topics = common::topics("lp-cold", 4);
    let mut conn = server.connect();
    let last: Vec<String> = topics
        .iter()
        .map(|t| publish_n(&mut conn, t, 2).pop().expect("two ids"))
        .collect();
    drop(conn);
    server.restart();
    let v = poll(&server, &json!({"topics": topics, "timeout": 1})).json();
    assert_eq!(v["timeout"], true, "{v}");
    for (topic, id) in topics.iter().zip(&last) {
        assert_eq!(v["next_offset"][topic], id.as_str(), "{topic}: {v}");
    }
    let fresh = id_of(&server.publish(&topics[0], r#"{"fresh":true}"#));
    let again = poll(
        &server,
        &json!({"topics": topics, "since": v["next_offset"], "timeout": 5}),
    );
    assert_delivered(&again, &[fresh]);
}
