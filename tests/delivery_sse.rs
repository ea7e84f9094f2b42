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

use common::sse::{per_topic_position, SseClient, SseItem, SseRead};
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

/// Waits until the wall clock is past the millisecond of `id`, so the next id of any topic is
/// greater than it (ids are per topic: two topics can share one).
fn clock_past(id: &str) {
    let ms = parse_id(id).0;
    assert!(
        eventually(Duration::from_secs(1), || {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_millis() as u64)
                > ms
        }),
        "the clock did not pass {id}"
    );
}

/// Bug: a multi-topic stream's event id was the last message's id, and a resume read every
/// topic after it. Replay follows the topics in order, so `t0`'s newer message came before
/// `t1`'s older one; the stream's last id was then `t1`'s, and resuming from it delivered
/// `t0`'s message again (with other interleavings, a message was skipped).
#[test]
fn multi_topic_resume_is_per_topic() {
    let server = Server::start_with_shards("", SHARDS as usize);
    let topics = topics_per_shard("sse-per-topic", SHARDS);
    let (t0, t1) = (topics[0].as_str(), topics[1].as_str());
    let mut conn = server.connect();
    let b1 = id_of(&conn.publish(t1, r#"{"b":1}"#));
    clock_past(&b1);
    let a1 = id_of(&conn.publish(t0, r#"{"a":1}"#));
    let path = format!("/api/v1/events?topics={t0},{t1}");
    let mut stream = open(&server, &format!("{path}&since=1-0"), &[]);
    let (first, m) = stream.next_message_with_id();
    assert_eq!(id_of(&m), a1);
    assert_eq!(first, format!("{t0}={a1},{t1}=1-0"));
    let (last, m) = stream.next_message_with_id();
    assert_eq!(id_of(&m), b1);
    assert_eq!(last, format!("{t0}={a1},{t1}={b1}"));
    drop(stream);

    // What EventSource does: reconnect with the last id. Nothing is repeated.
    let mut resumed = open(&server, &path, &[("Last-Event-ID", &last)]);
    let a2 = id_of(&conn.publish(t0, r#"{"a":2}"#));
    let b2 = id_of(&conn.publish(t1, r#"{"b":2}"#));
    let mut got: Vec<String> = (0..2).map(|_| id_of(&resumed.next_message())).collect();
    got.sort_by_key(|id| parse_id(id));
    let mut want = vec![a2, b2];
    want.sort_by_key(|id| parse_id(id));
    assert_eq!(got, want, "resumed from {last}");
    assert!(
        resumed.try_next_event(Duration::from_millis(300)).is_none(),
        "more than the two new messages"
    );

    // `?since=` takes the per-topic form too, and a topic it leaves out is read from its
    // oldest message.
    let mut since = open(&server, &format!("{path}&since={t0}={a1}"), &[]);
    let mut got: Vec<String> = (0..3).map(|_| id_of(&since.next_message())).collect();
    got.sort_by_key(|id| parse_id(id));
    let mut want = vec![want[0].clone(), want[1].clone(), b1];
    want.sort_by_key(|id| parse_id(id));
    assert_eq!(got, want);
    match SseClient::open(server.addr, &format!("{path}&since={t0}=nope"), &[]) {
        Ok(_) => panic!("a bad position was accepted"),
        Err(resp) => assert_error_body(&resp, "INVALID_CURSOR"),
    }
    // A plain id keeps its old meaning on several topics: after it on each.
    let mut plain = open(&server, &format!("{path}&since={a1}"), &[]);
    let (id, m) = plain.next_message_with_id();
    assert_eq!(
        per_topic_position(&id).map(|p| p.len()),
        Some(2),
        "ids name both topics: {id} for {m}"
    );
}

/// Bug: `?topics=a,b,a` followed `a` twice, and a resume replayed its history twice.
#[test]
fn duplicate_topics_are_delivered_once() {
    let server = Server::start_with_shards("", SHARDS as usize);
    let topics = topics_per_shard("sse-dup", SHARDS);
    let (t0, t1) = (topics[0].as_str(), topics[1].as_str());
    let mut conn = server.connect();
    let a = publish_n(&mut conn, t0, 2);
    let b = publish_n(&mut conn, t1, 1);
    let mut stream = open(
        &server,
        &format!("/api/v1/events?topics={t0},{t1},{t0}&since=1-0"),
        &[],
    );
    let mut got: Vec<String> = (0..3).map(|_| id_of(&stream.next_message())).collect();
    let live = id_of(&conn.publish(t0, r#"{"live":true}"#));
    got.push(id_of(&stream.next_message()));
    let mut want = [a, b].concat();
    want.sort_by_key(|id| parse_id(id));
    want.push(live);
    got[..3].sort_by_key(|id| parse_id(id));
    assert_eq!(got, want);
    assert!(
        stream.try_next_event(Duration::from_millis(300)).is_none(),
        "a message came twice"
    );
}

/// A topic followed from "now" is placed at its last id at once, so a resume neither reads
/// its history from the oldest message nor misses what was published to it meanwhile.
#[test]
fn a_topic_followed_from_now_resumes_from_where_it_was() {
    let server = Server::start_with_shards("", SHARDS as usize);
    let topics = topics_per_shard("sse-now", SHARDS);
    let (t0, t1) = (topics[0].as_str(), topics[1].as_str());
    let mut conn = server.connect();
    let old = publish_n(&mut conn, t1, 2);
    // `t1` first: it is followed and placed before `t0`, so a `t0` event names it.
    let path = format!("/api/v1/events?topics={t1},{t0}");
    let mut stream = open(&server, &path, &[]);
    // No acknowledgement says when the stream follows `t0`: publish until one arrives.
    let mut last = None;
    for _ in 0..100 {
        conn.publish(t0, r#"{"probe":true}"#);
        if let Some((id, _, _)) = stream.try_next_event(Duration::from_millis(100)) {
            last = id;
            break;
        }
    }
    while let Some((id, _, _)) = stream.try_next_event(Duration::from_millis(300)) {
        last = id;
    }
    let last = last.expect("no event from the live topic");
    let positions = per_topic_position(&last).unwrap_or_else(|| panic!("plain id {last}"));
    assert_eq!(positions.get(t1), Some(&old[1]), "{last}");
    drop(stream);
    let new = id_of(&conn.publish(t1, r#"{"new":true}"#));
    let mut resumed = open(&server, &path, &[("Last-Event-ID", &last)]);
    assert_eq!(id_of(&resumed.next_message()), new);
    assert!(resumed.try_next_event(Duration::from_millis(300)).is_none());
}

/// On several topics a gap event carries the stream's position too, and the messages after
/// it move it on: resuming from the last id neither repeats the gap nor a message.
#[test]
fn multi_topic_gap_event_carries_the_position() {
    let server =
        Server::start_with_shards("storage:\n  max_messages_per_topic: 5\n", SHARDS as usize);
    let topics = topics_per_shard("sse-gap-multi", SHARDS);
    let (t0, t1) = (topics[0].as_str(), topics[1].as_str());
    let mut conn = server.connect();
    let a = publish_n(&mut conn, t0, 20);
    let b = publish_n(&mut conn, t1, 2);
    let path = format!("/api/v1/events?topics={t0},{t1}");
    let start = format!("{t0}={},{t1}={}", a[0], b[0]);
    let mut stream = open(&server, &path, &[("Last-Event-ID", &start)]);
    let (id, event, gap) = stream.next_event();
    assert_eq!(event, "gap", "{gap}");
    assert_eq!(id.as_deref(), Some(start.as_str()), "{gap}");
    assert_eq!(gap["oldest_available"], a[15].as_str(), "{gap}");
    let mut last = String::new();
    let mut got = Vec::new();
    for _ in 0..6 {
        let (id, m) = stream.next_message_with_id();
        got.push(id_of(&m));
        last = id;
    }
    let mut want = [a[15..].to_vec(), b[1..].to_vec()].concat();
    want.sort_by_key(|id| parse_id(id));
    got.sort_by_key(|id| parse_id(id));
    assert_eq!(got, want);
    assert_eq!(last, format!("{t0}={},{t1}={}", a[19], b[1]));
    drop(stream);
    let mut resumed = open(&server, &path, &[("Last-Event-ID", &last)]);
    assert!(
        resumed.try_next_event(Duration::from_millis(500)).is_none(),
        "resuming from {last} sent something again"
    );
}

/// Seeded random publishes over three topics (both shards) with a consumer that reads a
/// random number of events, disconnects (dropping whatever was in flight) and resumes with
/// its last event id: every message arrives exactly once, in per-topic order. Set `SEED` to
/// reproduce a run.
#[test]
fn random_disconnects_resume_each_topic_exactly() {
    let seed = std::env::var("SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(6);
    let mut rng = fastrand::Rng::with_seed(seed);
    let server = Server::start_with_shards("", SHARDS as usize);
    let mut names = topics_per_shard("sse-rand", SHARDS);
    names.push(topic_on_shard("sse-rand-x", 1, SHARDS));
    let path = format!("/api/v1/events?topics={}", names.join(","));
    let mut conn = server.connect();
    let mut published: Vec<Vec<String>> = vec![Vec::new(); names.len()];
    let mut delivered: Vec<Vec<String>> = vec![Vec::new(); names.len()];
    let mut last = "1-0".to_string();
    for round in 0..25 {
        let mut stream = open(&server, &path, &[("Last-Event-ID", &last)]);
        for _ in 0..rng.usize(0..8) {
            let i = rng.usize(0..names.len());
            published[i].push(id_of(&conn.publish(&names[i], r#"{"r":1}"#)));
        }
        let pending: usize = published.iter().map(Vec::len).sum::<usize>()
            - delivered.iter().map(Vec::len).sum::<usize>();
        for _ in 0..rng.usize(0..=pending) {
            let (id, m) = stream.next_message_with_id();
            let i = names
                .iter()
                .position(|n| m["topic"] == n.as_str())
                .expect("a followed topic");
            delivered[i].push(id_of(&m));
            last = id;
            assert!(
                published[i].starts_with(&delivered[i]),
                "seed {seed} round {round} {}: delivered {:?}, published {:?}",
                names[i],
                delivered[i],
                published[i]
            );
        }
    }
    let mut stream = open(&server, &path, &[("Last-Event-ID", &last)]);
    while published.iter().map(Vec::len).sum::<usize>()
        > delivered.iter().map(Vec::len).sum::<usize>()
    {
        let m = stream.next_message();
        let i = names
            .iter()
            .position(|n| m["topic"] == n.as_str())
            .expect("a followed topic");
        delivered[i].push(id_of(&m));
    }
    assert!(stream.try_next_event(Duration::from_millis(300)).is_none());
    assert_eq!(delivered, published, "seed {seed}");
}
