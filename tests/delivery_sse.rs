//! Black-box tests of Server-Sent Events delivery (`GET /api/v1/topics/{topic}/events`,
//! `GET /api/v1/events?topics=`) against the real binary with 2 shards: the stream's framing,
//! live delivery, resume with `Last-Event-ID` or `?since=` while publishing, the gap event,
//! heartbeats, and request validation.
//!
//! Owns: everything observable on the event-stream endpoints. Does not own: WebSocket
//! (`delivery_ws.rs`) or long-poll (`delivery_longpoll.rs`) delivery.
//!
//! An event stream has no "subscribed" acknowledgement, so the live-delivery tests open the
//! stream with `since` = the topic's last id: a message published right after the open is
//! then delivered whether it arrives live or by replay, and the test never has to guess when
//! the registration is done.

mod common;

use std::time::{Duration, Instant};

use common::sse::{SseClient, SseItem, SseRead};
use common::{
    assert_error_body, eventually, id_of, parse_id, publish_n, topic_on_shard, topics_per_shard,
    BackgroundPublisher, Server,
};
use serde_json::{json, Value};

const SHARDS: u64 = 2;

/// Opens a stream and asserts it starts with `retry: 2000`.
fn open(server: &Server, path: &str, headers: &[(&str, &str)]) -> SseClient {
    let mut client = SseClient::open_ok(server.addr, path, headers);
    assert_eq!(client.next(), SseItem::Retry(2000), "{path}: first block");
    client
}

/// Reads `n` message events; returns their `(topic, id)`.
fn read_messages(client: &mut SseClient, n: usize) -> Vec<(String, String)> {
    (0..n)
        .map(|_| {
            let m = client.next_message();
            (m["topic"].as_str().expect("topic").to_string(), id_of(&m))
        })
        .collect()
}

fn join<T>(handle: std::thread::JoinHandle<T>) -> T {
    match handle.join() {
        Ok(v) => v,
        Err(panic) => std::panic::resume_unwind(panic),
    }
}

#[test]
fn stream_framing_and_live_delivery() {
    let server = Server::start_with_shards("", SHARDS as usize);
    let topics = topics_per_shard("sse-live", SHARDS);
    let (t0, t1) = (topics[0].as_str(), topics[1].as_str());
    let mut conn = server.connect();

    // Single-topic form.
    let seed = id_of(&conn.publish(t0, r#"{"seed":true}"#));
    let (mut single, head) = SseClient::open(
        server.addr,
        &format!("/api/v1/topics/{t0}/events?since={seed}"),
        &[],
    )
    .unwrap_or_else(|resp| panic!("{resp:?}"));
    assert_eq!(head.status, 200, "{head:?}");
    assert!(
        head.header("content-type")
            .is_some_and(|ct| ct.starts_with("text/event-stream")),
        "{head:?}"
    );
    assert!(
        head.header("content-length").is_none(),
        "close-delimited: {head:?}"
    );
    assert!(
        head.header("transfer-encoding").is_none(),
        "close-delimited: {head:?}"
    );
    assert_eq!(single.next(), SseItem::Retry(2000));
    let meta = json!({"src": "sse"});
    let body = json!({"topic": t0, "payload": {"n": 1}, "metadata": meta}).to_string();
    let resp = conn.request("POST", "/api/v1/messages", Some(body.as_bytes()));
    assert_eq!(resp.status, 201, "{resp:?}");
    let ack = resp.json();
    match single.next() {
        SseItem::Event { id, event, data } => {
            assert_eq!(id.as_deref(), ack["message_id"].as_str());
            assert_eq!(event.as_deref(), Some("message"));
            let m: Value = serde_json::from_str(&data).expect("data is JSON");
            assert_eq!(m["message_id"], ack["message_id"], "{m}");
            assert_eq!(m["topic"], t0, "{m}");
            assert_eq!(m["payload"], json!({"n": 1}), "{m}");
            assert_eq!(m["timestamp"], ack["timestamp"], "{m}");
            assert_eq!(m["metadata"], meta, "{m}");
        }
        other => panic!("expected the message event, got {other:?}"),
    }

    // Multi-topic form over both shards' topics; one `since` for both.
    let s0 = id_of(&conn.publish(t0, r#"{"seed":0}"#));
    let s1 = id_of(&conn.publish(t1, r#"{"seed":1}"#));
    let since = std::cmp::max_by_key(s0, s1, |id| parse_id(id));
    // Ids are per topic: a message of the other topic in the same millisecond as `since` can
    // get an id at or below it and is (correctly) not after it. Publish from the next
    // millisecond on, so every message below is after `since` in both topics.
    let since_ms = parse_id(&since).0;
    assert!(
        eventually(Duration::from_secs(1), || {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_millis() as u64)
                > since_ms
        }),
        "the clock did not pass {since}"
    );
    let mut multi = open(
        &server,
        &format!("/api/v1/events?topics={t0},{t1}&since={since}"),
        &[],
    );
    let mut want = Vec::new();
    for i in 0..3 {
        for t in [t0, t1] {
            let id = id_of(&conn.publish(t, &format!(r#"{{"i":{i}}}"#)));
            want.push((t.to_string(), id));
        }
    }
    let got = read_messages(&mut multi, want.len());
    for t in [t0, t1] {
        let of = |v: &[(String, String)]| -> Vec<String> {
            v.iter()
                .filter(|(topic, _)| topic == t)
                .map(|(_, id)| id.clone())
                .collect()
        };
        assert_eq!(of(&got), of(&want), "topic {t}: {got:?}");
    }
}

#[test]
fn resume_with_last_event_id_is_gap_free_while_publishing() {
    let server = Server::start_with_shards("", SHARDS as usize);
    for (k, topic) in topics_per_shard("sse-resume", SHARDS).iter().enumerate() {
        let pre = publish_n(&mut server.connect(), topic, 40);
        let offset = pre[19].clone();
        let publisher = BackgroundPublisher::start(server.addr, topic, 300);
        assert!(
            eventually(Duration::from_secs(20), || publisher.count() >= 20),
            "the publisher made no progress"
        );
        // One topic resumes with the header (what EventSource sends), the other with ?since=.
        let mut stream = if k == 0 {
            open(
                &server,
                &format!("/api/v1/topics/{topic}/events"),
                &[("Last-Event-ID", &offset)],
            )
        } else {
            open(
                &server,
                &format!("/api/v1/topics/{topic}/events?since={offset}"),
                &[],
            )
        };
        let want_len = pre.len() - 20 + 300;
        let mut got = Vec::new();
        let deadline = Instant::now() + Duration::from_secs(60);
        while Instant::now() < deadline {
            if publisher.is_finished() && got.len() >= want_len {
                break;
            }
            if let Some((id, event, data)) = stream.try_next_event(Duration::from_millis(200)) {
                assert_eq!(event, "message", "only messages expected: {data}");
                assert_eq!(id.as_deref(), data["message_id"].as_str(), "{data}");
                got.push(id_of(&data));
            }
        }
        let mut want: Vec<String> = pre[20..].to_vec();
        want.extend(publisher.join());
        assert_eq!(
            got.len(),
            want.len(),
            "topic {topic}: received {} of {} after {offset}",
            got.len(),
            want.len()
        );
        assert_eq!(
            got, want,
            "topic {topic}: not exactly the acked ids after {offset}"
        );
    }
}

#[test]
fn gap_event_then_retained_messages_then_live() {
    let server =
        Server::start_with_shards("storage:\n  max_messages_per_topic: 5\n", SHARDS as usize);
    for topic in topics_per_shard("sse-gap", SHARDS) {
        let ids = publish_n(&mut server.connect(), &topic, 20);
        let mut stream = open(
            &server,
            &format!("/api/v1/topics/{topic}/events"),
            &[("Last-Event-ID", &ids[0])],
        );
        let (_, event, gap) = stream.next_event();
        assert_eq!(event, "gap", "the gap event comes first: {gap}");
        assert_eq!(gap["type"], "gap", "{gap}");
        assert_eq!(gap["topic"], topic.as_str(), "{gap}");
        assert_eq!(gap["requested"], ids[0].as_str(), "{gap}");
        assert_eq!(gap["oldest_available"], ids[15].as_str(), "{gap}");
        let got: Vec<String> = read_messages(&mut stream, 5)
            .into_iter()
            .map(|(_, id)| id)
            .collect();
        assert_eq!(got, ids[15..].to_vec());

        // Resuming at the oldest retained message loses nothing: no gap.
        let mut current = open(
            &server,
            &format!("/api/v1/topics/{topic}/events?since={}", ids[15]),
            &[],
        );
        let got: Vec<String> = read_messages(&mut current, 4)
            .into_iter()
            .map(|(_, id)| id)
            .collect();
        assert_eq!(got, ids[16..].to_vec());

        let live = id_of(&server.publish(&topic, r#"{"live":true}"#));
        for s in [&mut stream, &mut current] {
            assert_eq!(id_of(&s.next_message()), live);
        }
    }
}

#[test]
fn an_idle_stream_gets_heartbeats() {
    let server = Server::start_with_shards("sse:\n  heartbeat_interval: 1s\n", SHARDS as usize);
    let topic = topic_on_shard("sse-idle", 1, SHARDS);
    let mut stream = open(&server, &format!("/api/v1/topics/{topic}/events"), &[]);
    let started = Instant::now();
    let mut pings = 0;
    while pings < 2 {
        match stream.next_item(Duration::from_secs(10)) {
            SseRead::Item(SseItem::Comment(c)) => {
                assert_eq!(c, "ping");
                pings += 1;
            }
            other => panic!("an idle stream sent {other:?} after {pings} heartbeats"),
        }
    }
    let took = started.elapsed();
    assert!(
        took >= Duration::from_millis(1500),
        "two heartbeats at a 1 s interval came within {took:?}"
    );
    // Still a working stream after the heartbeats.
    let id = id_of(&server.publish(&topic, r#"{"after":"pings"}"#));
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match stream.next_item(left) {
            SseRead::Item(SseItem::Comment(_)) => continue,
            SseRead::Item(SseItem::Event { id: got, .. }) => {
                assert_eq!(got.as_deref(), Some(id.as_str()));
                break;
            }
            other => panic!("expected the message event, got {other:?}"),
        }
    }
}

#[test]
fn invalid_stream_requests_are_rejected() {
    let server = Server::start_with_shards("", SHARDS as usize);
    let err =
        |path: &str, headers: &[(&str, &str)]| match SseClient::open(server.addr, path, headers) {
            Ok(_) => panic!("{path}: an event stream was opened"),
            Err(resp) => resp,
        };
    assert_error_body(
        &err("/api/v1/topics/t/events?since=nope", &[]),
        "INVALID_CURSOR",
    );
    assert_error_body(
        &err("/api/v1/topics/t/events", &[("Last-Event-ID", "nope")]),
        "INVALID_CURSOR",
    );
    assert_error_body(
        &err("/api/v1/events?topics=bad%20topic", &[]),
        "INVALID_TOPIC",
    );
    assert_error_body(&err("/api/v1/events", &[]), "INVALID_REQUEST");
}

/// Like the WebSocket burst test: a stream whose client reads is not cut because one bulk
/// publish carried more than `sse.max_queued_bytes` (1 MiB by default).
#[test]
fn a_bulk_burst_does_not_cut_a_reading_stream() {
    let server = Server::start_with_shards("", SHARDS as usize);
    let topic = topic_on_shard("sse-burst", 0, SHARDS);
    let seed = id_of(&server.publish(&topic, r#"{"seed":true}"#));
    let mut stream = open(
        &server,
        &format!("/api/v1/topics/{topic}/events?since={seed}"),
        &[],
    );
    let reader = std::thread::spawn(move || {
        let mut ids = Vec::with_capacity(1000);
        let deadline = Instant::now() + Duration::from_secs(60);
        while ids.len() < 1000 {
            let left = deadline.saturating_duration_since(Instant::now());
            match stream.next_item(left) {
                SseRead::Item(SseItem::Event { id: Some(id), .. }) => ids.push(id),
                SseRead::Item(SseItem::Comment(_)) => continue,
                other => return (ids, Some(format!("{other:?}"))),
            }
        }
        (ids, None)
    });
    let pad = "x".repeat(1000);
    let items: Vec<Value> = (0..1000)
        .map(|i| json!({"topic": topic, "payload": {"i": i, "pad": pad}}))
        .collect();
    let resp = server.post_json(
        "/api/v1/messages/bulk",
        &json!({ "messages": items }).to_string(),
    );
    assert_eq!(resp.status, 207, "{resp:?}");
    let acked: Vec<String> = resp.json()["results"]
        .as_array()
        .expect("results")
        .iter()
        .map(id_of)
        .collect();
    let (ids, ended) = join(reader);
    assert!(
        ended.is_none(),
        "a reading stream was cut after {} of 1000 messages by one bulk publish: {ended:?}",
        ids.len()
    );
    assert_eq!(ids, acked);
}
