//! Black-box tests of WebSocket delivery at `GET /ws` against the real binary with 2 shards:
//! live delivery, resume from an offset while publishing, gap signals, the slow-consumer
//! cut-off, the JSON command protocol, the framing rules at the byte level, idle timeouts, and
//! a thousand subscribers on one topic.
//!
//! Owns: everything observable on `/ws`. Does not own: long-poll (`delivery_longpoll.rs`),
//! SSE (`delivery_sse.rs`), or the publish API itself (`http_api.rs`).
//!
//! Topics are chosen per shard (`topic_on_shard`) so both owners are exercised; publisher and
//! subscriber connections land on shards the kernel picks (SO_REUSEPORT), so cross-shard
//! fan-out happens whichever shard owns the topic.

mod common;

use std::collections::HashSet;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use common::ws::{close_payload, RawEvent, RawWs, WsClient, WsEvent};
use common::{
    assert_rfc3339_utc, assert_strictly_increasing, eventually, id_of, open_fds, publish_n,
    topic_on_shard, topics_per_shard, BackgroundPublisher, Conn, Server,
};
use serde_json::{json, Value};
use tungstenite::protocol::WebSocketConfig;

const SHARDS: u64 = 2;

/// Publishes with metadata; returns the ack.
fn publish_with_metadata(conn: &mut Conn, topic: &str, payload: &Value, meta: &Value) -> Value {
    let body = json!({"topic": topic, "payload": payload, "metadata": meta}).to_string();
    let resp = conn.request("POST", "/api/v1/messages", Some(body.as_bytes()));
    assert_eq!(resp.status, 201, "{resp:?}");
    resp.json()
}

/// Reads message frames until `n` arrived (any other frame fails the test).
fn message_ids(client: &mut WsClient, n: usize) -> Vec<String> {
    client.recv_messages(n).iter().map(id_of).collect()
}

/// Sends an application ping and asserts the very next frame is its pong: nothing else was
/// queued for the client before it.
fn assert_nothing_pending(client: &mut WsClient) {
    client.send_json(&json!({"type": "ping"}));
    let v = client.recv();
    assert_eq!(
        v["type"], "pong",
        "expected nothing before the pong, got {v}"
    );
}

#[test]
fn subscribe_then_publish_delivers_to_every_subscriber() {
    let server = Server::start_with_shards("", SHARDS as usize);
    let topics = topics_per_shard("ws-live", SHARDS);
    let names: Vec<&str> = topics.iter().map(String::as_str).collect();
    let mut clients: Vec<WsClient> = (0..4).map(|_| WsClient::connect(server.addr)).collect();
    let mut sessions = HashSet::new();
    for c in &mut clients {
        let sub = c.subscribe(&names, None);
        let session = sub["session_id"].as_str().expect("session_id").to_string();
        assert!(!session.is_empty(), "{sub}");
        assert!(sessions.insert(session), "session ids repeat: {sub}");
        assert_rfc3339_utc(&sub["timestamp"]);
    }
    let meta = json!({"source": "delivery-test"});
    let acks: Vec<Value> = topics
        .iter()
        .enumerate()
        .map(|(i, t)| {
            // A fresh connection per publish: its shard is the kernel's pick.
            publish_with_metadata(&mut server.connect(), t, &json!({"n": i}), &meta)
        })
        .collect();
    for c in &mut clients {
        let mut got = c.recv_messages(topics.len());
        got.sort_by(|a, b| a["topic"].as_str().cmp(&b["topic"].as_str()));
        let mut want: Vec<(usize, &Value)> = acks.iter().enumerate().collect();
        want.sort_by(|a, b| a.1["topic"].as_str().cmp(&b.1["topic"].as_str()));
        for (m, (i, ack)) in got.iter().zip(want) {
            assert_eq!(m["message_id"], ack["message_id"], "{m}");
            assert_eq!(m["topic"], ack["topic"], "{m}");
            assert_eq!(m["payload"], json!({"n": i}), "{m}");
            assert_eq!(m["timestamp"], ack["timestamp"], "{m}");
            assert_eq!(m["metadata"], meta, "{m}");
        }
        assert_nothing_pending(c);
    }
}

#[test]
fn resume_from_an_offset_is_gap_free_while_publishing() {
    let server = Server::start_with_shards("", SHARDS as usize);
    for topic in topics_per_shard("ws-resume", SHARDS) {
        let pre = publish_n(&mut server.connect(), &topic, 40);
        let offset = pre[19].clone();
        let publisher = BackgroundPublisher::start(server.addr, &topic, 300);
        // Subscribe while the publisher is mid-stream, so replay and live overlap.
        assert!(
            eventually(Duration::from_secs(20), || publisher.count() >= 20),
            "the publisher made no progress"
        );
        let mut client = WsClient::connect(server.addr);
        client.subscribe(&[&topic], Some(json!(offset)));
        let mut got = Vec::new();
        let deadline = Instant::now() + Duration::from_secs(60);
        let want_len = pre.len() - 20 + 300;
        while Instant::now() < deadline {
            if publisher.is_finished() && got.len() >= want_len {
                break;
            }
            if let Some(v) = client.try_recv(Duration::from_millis(200)) {
                assert_eq!(v["type"], "message", "only messages expected: {v}");
                assert_eq!(v["topic"], topic.as_str(), "{v}");
                got.push(id_of(&v));
            }
        }
        let acked = publisher.join();
        let mut want: Vec<String> = pre[20..].to_vec();
        want.extend(acked);
        assert_eq!(
            got.len(),
            want.len(),
            "topic {topic}: received {} of {} (offset {offset})",
            got.len(),
            want.len()
        );
        assert_eq!(
            got, want,
            "topic {topic}: not exactly the acked ids after {offset}"
        );
        assert_nothing_pending(&mut client);
    }
}

#[test]
fn offset_forms_earliest_last_and_per_topic() {
    let server = Server::start_with_shards("", SHARDS as usize);
    let topics = topics_per_shard("ws-offsets", SHARDS);
    let (t0, t1) = (topics[0].as_str(), topics[1].as_str());
    let mut conn = server.connect();
    let pre0 = publish_n(&mut conn, t0, 3);
    let pre1 = publish_n(&mut conn, t1, 3);

    let mut earliest = WsClient::connect(server.addr);
    earliest.subscribe(&[t0], Some(json!("earliest")));
    assert_eq!(message_ids(&mut earliest, 3), pre0);

    // No offset and "last" both mean: only what is published from now on.
    let mut default = WsClient::connect(server.addr);
    default.subscribe(&[t0], None);
    let mut last = WsClient::connect(server.addr);
    last.subscribe(&[t0], Some(json!("last")));

    let mut per_topic = WsClient::connect(server.addr);
    per_topic.subscribe(&[t0, t1], Some(json!({t0: pre0[1], t1: "earliest"})));
    let replayed = per_topic.recv_messages(4);
    let of = |topic: &str| -> Vec<String> {
        replayed
            .iter()
            .filter(|m| m["topic"] == topic)
            .map(id_of)
            .collect()
    };
    assert_eq!(of(t0), pre0[2..].to_vec(), "{replayed:?}");
    assert_eq!(of(t1), pre1, "{replayed:?}");

    let new0 = id_of(&conn.publish(t0, r#"{"new":0}"#));
    let new1 = id_of(&conn.publish(t1, r#"{"new":1}"#));
    for c in [&mut earliest, &mut default, &mut last] {
        assert_eq!(message_ids(c, 1), vec![new0.clone()]);
        assert_nothing_pending(c);
    }
    // Ids are per topic (both may be equal): name each message by topic and id.
    let mut live: Vec<(String, String)> = per_topic
        .recv_messages(2)
        .iter()
        .map(|m| (m["topic"].as_str().expect("topic").to_string(), id_of(m)))
        .collect();
    let mut want = vec![(t0.to_string(), new0), (t1.to_string(), new1)];
    live.sort();
    want.sort();
    assert_eq!(live, want);
    assert_nothing_pending(&mut per_topic);
}

#[test]
fn gap_signal_then_retained_messages_then_live() {
    let server =
        Server::start_with_shards("storage:\n  max_messages_per_topic: 5\n", SHARDS as usize);
    for topic in topics_per_shard("ws-gap", SHARDS) {
        let ids = publish_n(&mut server.connect(), &topic, 20);
        let mut behind = WsClient::connect(server.addr);
        behind.subscribe(&[&topic], Some(json!(ids[0])));
        let gap = behind.recv();
        assert_eq!(gap["type"], "gap", "the gap signal comes first: {gap}");
        assert_eq!(gap["topic"], topic.as_str(), "{gap}");
        assert_eq!(gap["requested"], ids[0].as_str(), "{gap}");
        assert_eq!(gap["oldest_available"], ids[15].as_str(), "{gap}");
        assert_eq!(message_ids(&mut behind, 5), ids[15..].to_vec());

        // An offset at the oldest retained message loses nothing: no gap.
        let mut current = WsClient::connect(server.addr);
        current.subscribe(&[&topic], Some(json!(ids[15])));
        assert_eq!(message_ids(&mut current, 4), ids[16..].to_vec());

        let live = id_of(&server.publish(&topic, r#"{"live":true}"#));
        for c in [&mut behind, &mut current] {
            assert_eq!(message_ids(c, 1), vec![live.clone()]);
            assert_nothing_pending(c);
        }
    }
}

/// Reads `n` message frames on a thread, as fast as frames come; returns their ids and, if
/// the stream ended early, what ended it (rather than panicking, so the test can say which
/// subscriber was cut and when).
/// `received` counts them as they come, for a publisher that paces itself on the reader.
fn spawn_reader(
    mut client: WsClient,
    n: usize,
    within: Duration,
    received: Arc<AtomicUsize>,
) -> std::thread::JoinHandle<(Vec<String>, Option<String>)> {
    std::thread::spawn(move || {
        let mut ids = Vec::with_capacity(n);
        let deadline = Instant::now() + within;
        while ids.len() < n {
            let left = deadline.saturating_duration_since(Instant::now());
            match client.next_event(left) {
                WsEvent::Json(v) if v["type"] == "message" => {
                    ids.push(id_of(&v));
                    received.store(ids.len(), Ordering::Release);
                }
                WsEvent::Ping => continue,
                other => return (ids, Some(format!("{other:?}"))),
            }
        }
        (ids, None)
    })
}

fn join<T>(handle: std::thread::JoinHandle<T>) -> T {
    match handle.join() {
        Ok(v) => v,
        Err(panic) => std::panic::resume_unwind(panic),
    }
}

#[test]
fn slow_consumer_is_closed_with_4008_and_others_get_everything() {
    const MESSAGES: usize = 3000;
    /// When the stalled subscriber resumes reading: 8 MiB in, past what its socket buffers can
    /// hold (at most tcp_wmem's 4 MiB sending and the receiver's untuned 128 KiB, since it
    /// never read) plus its 64 KiB queue, and soon enough after the cut-off that the relay is
    /// still willing to hand it the rest of a blocked write and the close frame.
    const RESUME_AT: usize = 2000;
    const FAST: usize = 2;
    /// How far the publisher may run ahead of the slower fast reader: 8 × 4 KiB stays well
    /// under the 64 KiB queue, so a fast reader is never cut however the scheduler treats its
    /// thread on a loaded machine (it is "fast" by construction, not by timing).
    const WINDOW: usize = 8;
    let server = Server::start_with_shards("ws:\n  max_queued_bytes: 64KiB\n", SHARDS as usize);
    let topic = topic_on_shard("ws-slow", 1, SHARDS);
    let mut slow = WsClient::connect(server.addr);
    slow.subscribe(&[&topic], None);
    let fast_received: Vec<Arc<AtomicUsize>> =
        (0..FAST).map(|_| Arc::new(AtomicUsize::new(0))).collect();
    let fast_readers: Vec<_> = fast_received
        .iter()
        .map(|received| {
            let mut fast = WsClient::connect(server.addr);
            fast.subscribe(&[&topic], None);
            spawn_reader(fast, MESSAGES, Duration::from_secs(120), received.clone())
        })
        .collect();

    // ~4 KiB per message.
    let pad = "x".repeat(4000);
    let addr = server.addr;
    let publish_topic = topic.clone();
    let published = Arc::new(AtomicUsize::new(0));
    let progress = published.clone();
    let publisher = std::thread::spawn(move || {
        let mut conn = Conn::connect(addr);
        (0..MESSAGES)
            .map(|i| {
                let pace_deadline = Instant::now() + Duration::from_secs(30);
                while fast_received
                    .iter()
                    .any(|r| r.load(Ordering::Acquire) + WINDOW < i)
                    && Instant::now() < pace_deadline
                {
                    std::thread::sleep(Duration::from_millis(1));
                }
                let ack = conn.publish(&publish_topic, &format!(r#"{{"i":{i},"pad":"{pad}"}}"#));
                progress.store(i + 1, Ordering::Relaxed);
                id_of(&ack)
            })
            .collect::<Vec<String>>()
    });

    // The relay keeps answering while one of its consumers is stuck.
    let mut slow = Some(slow);
    let mut slow_reader = None;
    let mut checks = 0;
    let mut slowest = Duration::ZERO;
    while checks < 2000 {
        if published.load(Ordering::Relaxed) >= RESUME_AT {
            if let Some(client) = slow.take() {
                slow_reader = Some(std::thread::spawn(move || {
                    read_until_close(client, MESSAGES)
                }));
            }
        }
        if publisher.is_finished() {
            break;
        }
        let started = Instant::now();
        server.health();
        slowest = slowest.max(started.elapsed());
        checks += 1;
        std::thread::sleep(Duration::from_millis(20));
    }
    let acked = join(publisher);
    assert!(
        slowest < Duration::from_secs(2),
        "/health took {slowest:?} while a consumer was stuck"
    );
    for (i, reader) in fast_readers.into_iter().enumerate() {
        let (ids, ended) = join(reader);
        assert!(
            ended.is_none(),
            "fast subscriber {i}, reading continuously, was cut after {} of {MESSAGES} \
             messages: {ended:?}",
            ids.len()
        );
        assert_eq!(
            ids, acked,
            "fast subscriber {i}: not the acked ids in order"
        );
    }

    // The stalled one: some messages, a contiguous prefix of what was published (so it can
    // resume from its last id), then the close frame.
    let (slow_ids, close) = join(slow_reader.expect("the publisher reached RESUME_AT"));
    assert_eq!(
        close,
        Some((4008, "slow consumer".to_string())),
        "the stalled subscriber, after {} messages",
        slow_ids.len()
    );
    assert!(
        slow_ids.len() < MESSAGES,
        "closed although it got everything"
    );
    assert_eq!(
        slow_ids,
        acked[..slow_ids.len()].to_vec(),
        "the slow consumer's messages are not a prefix of the acked ids"
    );
}

/// Reads message frames until a close frame (at most `max` messages, 60 s); returns the
/// message ids and the close code and reason (`None` if the stream ended otherwise).
fn read_until_close(mut client: WsClient, max: usize) -> (Vec<String>, Option<(u16, String)>) {
    let mut ids = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match client.next_event(left) {
            WsEvent::Json(v) => {
                assert_eq!(v["type"], "message", "{v}");
                ids.push(id_of(&v));
                assert!(ids.len() <= max, "more messages than published");
            }
            WsEvent::Ping => continue,
            WsEvent::Close(frame) => return (ids, frame),
            other => {
                eprintln!("no close frame after {} messages: {other:?}", ids.len());
                return (ids, None);
            }
        }
    }
}

/// A subscriber that reads is not a slow consumer just because one publish carried more than
/// its queue bound: the relay can write to its (empty) socket. At the defaults (1 MiB queue,
/// bulk of up to 1000 messages) one bulk of 1000 ~1 KiB messages is such a burst.
#[test]
fn a_bulk_burst_does_not_cut_a_reading_subscriber() {
    let server = Server::start_with_shards("", SHARDS as usize);
    for topic in topics_per_shard("ws-burst", SHARDS) {
        let mut reader = WsClient::connect(server.addr);
        reader.subscribe(&[&topic], None);
        let reader = spawn_reader(reader, 1000, Duration::from_secs(60), Arc::default());
        let pad = "x".repeat(1000);
        let items: Vec<Value> = (0..1000)
            .map(|i| json!({"topic": topic, "payload": {"i": i, "pad": pad}}))
            .collect();
        let resp = server.post_json(
            "/api/v1/messages/bulk",
            &json!({ "messages": items }).to_string(),
        );
        assert_eq!(resp.status, 207, "{resp:?}");
        let results = resp.json();
        let acked: Vec<String> = results["results"]
            .as_array()
            .expect("results")
            .iter()
            .map(id_of)
            .collect();
        let (ids, ended) = join(reader);
        assert!(
            ended.is_none(),
            "topic {topic}: a reading subscriber was cut after {} of 1000 messages by one bulk \
             publish: {ended:?}",
            ids.len()
        );
        assert_eq!(ids, acked, "topic {topic}");
    }
}

#[test]
fn json_commands_ping_errors_and_recovery() {
    let server = Server::start_with_shards("", SHARDS as usize);
    let mut c = WsClient::connect(server.addr);

    c.send_json(&json!({"type": "ping"}));
    let pong = c.recv_type("pong");
    assert_rfc3339_utc(&pong["timestamp"]);

    // `code`, or `SUBSCRIPTION_ERROR/<reason>` for a failed subscribe (the Python relay's
    // code, with ours as `reason`).
    let expect_error = |c: &mut WsClient, sent: &str, code: &str| {
        c.send_text(sent);
        let e = c.recv_type("error");
        let got = match e["reason"].as_str() {
            Some(reason) => format!("{}/{reason}", e["code"].as_str().unwrap_or_default()),
            None => e["code"].as_str().unwrap_or_default().to_owned(),
        };
        assert_eq!(got, code, "after {sent:?}: {e}");
        assert!(e["message"].as_str().is_some_and(|m| !m.is_empty()), "{e}");
    };
    expect_error(&mut c, "this is not json", "INVALID_JSON");
    expect_error(
        &mut c,
        r#"{"type":"subscribe","topics":["a""#,
        "INVALID_JSON",
    );
    expect_error(&mut c, r#"{"type":"dance"}"#, "UNKNOWN_MESSAGE_TYPE");
    expect_error(
        &mut c,
        r#"{"type":"subscribe","topics":["bad topic!"]}"#,
        "SUBSCRIPTION_ERROR/INVALID_TOPIC",
    );
    expect_error(
        &mut c,
        r#"{"type":"subscribe","topics":["fine"],"offset":"not-an-id"}"#,
        "SUBSCRIPTION_ERROR/INVALID_OFFSET",
    );
    expect_error(
        &mut c,
        r#"{"type":"subscribe","topics":["fine"],"offset":{"fine":"nope"}}"#,
        "SUBSCRIPTION_ERROR/INVALID_OFFSET",
    );

    // The socket is still fully usable: nothing was subscribed by the failed commands, and a
    // valid subscribe delivers.
    c.send_json(&json!({"type": "ping"}));
    c.recv_type("pong");
    let topic = topic_on_shard("ws-cmd", 0, SHARDS);
    c.subscribe(&[&topic], None);
    server.publish("fine", r#"{"not":"subscribed"}"#);
    let id = id_of(&server.publish(&topic, r#"{"after":"errors"}"#));
    assert_eq!(message_ids(&mut c, 1), vec![id]);
    c.send_json(&json!({"type": "ack", "message_id": "1-0"}));
    assert_nothing_pending(&mut c);
}

#[test]
fn unsubscribe_stops_delivery() {
    let server = Server::start_with_shards("", SHARDS as usize);
    let topics = topics_per_shard("ws-unsub", SHARDS);
    let (t0, t1) = (topics[0].as_str(), topics[1].as_str());
    let mut c = WsClient::connect(server.addr);
    c.subscribe(&[t0, t1], None);
    let mut conn = server.connect();
    let first = id_of(&conn.publish(t0, r#"{"before":true}"#));
    assert_eq!(message_ids(&mut c, 1), vec![first]);

    c.send_json(&json!({"type": "unsubscribe", "topics": [t0]}));
    let unsub = c.recv_type("unsubscribed");
    assert_eq!(unsub["topics"], json!([t0]), "{unsub}");
    for i in 0..3 {
        conn.publish(t0, &format!(r#"{{"after_unsubscribe":{i}}}"#));
    }
    // Published after the t0 messages: if any t0 message were still delivered it would come
    // first (one session, one queue).
    let marker = id_of(&conn.publish(t1, r#"{"marker":true}"#));
    let next = c.recv();
    assert_eq!(next["type"], "message", "{next}");
    assert_eq!(
        next["topic"], t1,
        "a message of the unsubscribed topic arrived: {next}"
    );
    assert_eq!(id_of(&next), marker);
    assert_nothing_pending(&mut c);

    // Subscribing again works.
    c.subscribe(&[t0], None);
    let again = id_of(&conn.publish(t0, r#"{"again":true}"#));
    assert_eq!(message_ids(&mut c, 1), vec![again]);
}

#[test]
fn bearer_subprotocol_is_chosen_when_offered() {
    let server = Server::start_with_shards("", SHARDS as usize);
    let mut with = WsClient::connect_with(server.addr, &["bearer", "bearer.sometoken"], None);
    assert_eq!(with.protocol.as_deref(), Some("bearer"));
    let without = WsClient::connect(server.addr);
    assert_eq!(without.protocol, None);
    // The session works under the subprotocol.
    let topic = topic_on_shard("ws-bearer", 1, SHARDS);
    with.subscribe(&[&topic], None);
    let id = id_of(&server.publish(&topic, "1"));
    assert_eq!(message_ids(&mut with, 1), vec![id]);
}

/// Opens a raw session, sends `frames` (already encoded), and returns the close code the
/// relay answers with; asserts the relay then ends the TCP connection.
fn close_code_after(server: &Server, frames: &[Vec<u8>]) -> u16 {
    let mut raw = RawWs::connect(server.addr);
    for f in frames {
        raw.send_bytes(f);
    }
    let code = raw.expect_close_code(Duration::from_secs(10));
    assert!(
        raw.eof_within(Duration::from_secs(10)),
        "the relay did not end the connection after its close frame"
    );
    code
}

#[test]
fn framing_violations_close_with_the_right_code() {
    use common::ws::encode_frame as frame;
    let server = Server::start_with_shards("", SHARDS as usize);
    let ping_cmd = br#"{"type":"ping"}"#;
    let cases: Vec<(&str, Vec<Vec<u8>>, u16)> = vec![
        (
            "unmasked client frame",
            vec![frame(true, 0, 0x1, ping_cmd, false)],
            1002,
        ),
        (
            "reserved bit set",
            vec![frame(true, 0b100, 0x1, ping_cmd, true)],
            1002,
        ),
        (
            "fragmented control frame",
            vec![frame(false, 0, 0x9, b"hi", true)],
            1002,
        ),
        (
            "control frame over 125 bytes",
            vec![frame(true, 0, 0x9, &[b'p'; 126], true)],
            1002,
        ),
        (
            "reserved opcode",
            vec![frame(true, 0, 0x3, b"x", true)],
            1002,
        ),
        (
            "continuation without a start",
            vec![frame(true, 0, 0x0, b"x", true)],
            1002,
        ),
        (
            "invalid UTF-8 text",
            vec![frame(true, 0, 0x1, &[b'"', 0xff, 0xfe, b'"'], true)],
            1007,
        ),
        (
            "invalid UTF-8 split across fragments",
            vec![
                frame(false, 0, 0x1, &[b'"', 0xe2, 0x82], true),
                frame(true, 0, 0x0, b"\"", true),
            ],
            1007,
        ),
    ];
    for (what, frames, want) in cases {
        let code = close_code_after(&server, &frames);
        assert_eq!(code, want, "{what}");
    }
    // The relay still serves after all that.
    server.health();
}

#[test]
fn oversized_messages_close_with_1009() {
    use common::ws::encode_frame as frame;
    let server = Server::start_with_shards("ws:\n  max_message_bytes: 1KiB\n", SHARDS as usize);

    // Just under the limit is fine: a ping command padded to 1000 bytes gets its pong.
    let mut raw = RawWs::connect(server.addr);
    let mut cmd = br#"{"type":"ping","pad":""#.to_vec();
    cmd.resize(999 - 2, b'x');
    cmd.extend_from_slice(b"\"}");
    raw.send_frame(true, 0, 0x1, &cmd, true);
    match raw.next_frame(Duration::from_secs(10)) {
        RawEvent::Frame(f) if f.opcode == 0x1 => {
            let v: Value = serde_json::from_slice(&f.payload).expect("JSON");
            assert_eq!(v["type"], "pong", "{v}");
        }
        other => panic!("expected a pong under the limit, got {other:?}"),
    }

    let one_frame = frame(true, 0, 0x1, &[b' '; 2000], true);
    assert_eq!(
        close_code_after(&server, &[one_frame]),
        1009,
        "one big frame"
    );
    let fragments = vec![
        frame(false, 0, 0x1, &[b' '; 700], true),
        frame(true, 0, 0x0, &[b' '; 700], true),
    ];
    assert_eq!(
        close_code_after(&server, &fragments),
        1009,
        "fragments summing past the limit"
    );
    server.health();
}

#[test]
fn close_handshake_is_echoed() {
    use common::ws::encode_frame as frame;
    let server = Server::start_with_shards("", SHARDS as usize);
    let mut raw = RawWs::connect(server.addr);
    raw.send_bytes(&frame(true, 0, 0x8, &close_payload(1000, "bye"), true));
    assert_eq!(raw.expect_close_code(Duration::from_secs(10)), 1000);
    assert!(
        raw.eof_within(Duration::from_secs(10)),
        "no EOF after the close handshake"
    );

    let mut client = WsClient::connect(server.addr);
    client.close(1000, "done");
    assert_eq!(client.expect_close(Duration::from_secs(10), 0).0, 1000);
}

#[test]
fn idle_timeout_closes_a_silent_client_but_not_one_that_answers_pings() {
    let server = Server::start_with_shards(
        "ws:\n  ping_interval: 1s\n  idle_timeout: 2s\n",
        SHARDS as usize,
    );
    let idle = Duration::from_secs(2);

    // A tungstenite client that only reads: it answers protocol pings by itself.
    let mut alive = WsClient::connect(server.addr);
    let reader = std::thread::spawn(move || {
        let until = Instant::now() + idle * 2 + Duration::from_secs(1);
        let mut pings = 0;
        loop {
            let left = until.saturating_duration_since(Instant::now());
            match alive.next_event(left) {
                WsEvent::Ping => pings += 1,
                WsEvent::Timeout => break,
                other => panic!("a client answering pings got {other:?} after {pings} pings"),
            }
        }
        (alive, pings)
    });

    let started = Instant::now();
    let mut silent = RawWs::connect(server.addr);
    let mut pings = 0;
    let mut closed_with = None;
    for _ in 0..32 {
        match silent.next_frame(Duration::from_secs(15)) {
            RawEvent::Frame(f) if f.opcode == 0x9 => pings += 1,
            RawEvent::Frame(f) if f.opcode == 0x8 => {
                closed_with = Some(f.close_code());
                break;
            }
            other => panic!("silent client: unexpected {other:?}"),
        }
    }
    let elapsed = started.elapsed();
    assert!(closed_with.is_some(), "the silent client was never closed");
    assert!(pings >= 1, "no protocol ping before the idle close");
    assert!(
        elapsed >= idle - Duration::from_millis(300),
        "closed after {elapsed:?}, before the idle timeout"
    );
    assert!(
        silent.eof_within(Duration::from_secs(10)),
        "no EOF after the idle close"
    );

    let (mut alive, alive_pings) = match reader.join() {
        Ok(r) => r,
        Err(panic) => std::panic::resume_unwind(panic),
    };
    assert!(
        alive_pings >= 3,
        "only {alive_pings} pings in 5 s at a 1 s interval"
    );
    // Still open and served.
    alive.send_json(&json!({"type": "ping"}));
    alive.recv_type("pong");
}

#[test]
fn a_thousand_subscribers_on_one_topic_get_every_message() {
    const CLIENTS: usize = 1000;
    const THREADS: usize = 4;
    const MESSAGES: usize = 20;
    let test_deadline = Instant::now() + Duration::from_secs(60);
    let server = Server::start_with_shards("", SHARDS as usize);
    let pid = server.pid().expect("running");
    let baseline_fds = open_fds(pid);
    let topic = topic_on_shard("ws-crowd", 0, SHARDS);
    let addr = server.addr;
    // Subscribed clients + the main thread; the main thread publishes once all subscribed.
    let barrier = Arc::new(Barrier::new(THREADS + 1));
    let workers: Vec<_> = (0..THREADS)
        .map(|_| {
            let barrier = barrier.clone();
            let topic = topic.clone();
            std::thread::spawn(move || {
                // Small buffers: tungstenite's 128 KiB defaults would be 256 MiB for 1000.
                let config = WebSocketConfig::default()
                    .read_buffer_size(4096)
                    .write_buffer_size(0);
                let mut clients: Vec<WsClient> = (0..CLIENTS / THREADS)
                    .map(|_| {
                        let mut c = WsClient::connect_with(addr, &[], Some(config));
                        c.subscribe(&[&topic], None);
                        c
                    })
                    .collect();
                barrier.wait();
                // The messages are small: each socket's kernel buffer holds all of them, so
                // reading the sockets one after another loses nothing.
                let ids: Vec<Vec<String>> = clients
                    .iter_mut()
                    .map(|c| message_ids(c, MESSAGES))
                    .collect();
                // Every client gets exactly these: nothing else is queued.
                for c in &mut clients {
                    assert_nothing_pending(c);
                }
                (clients, ids)
            })
        })
        .collect();
    barrier.wait();
    let fds_with_clients = open_fds(pid);
    assert!(
        fds_with_clients >= baseline_fds + CLIENTS,
        "the relay holds {fds_with_clients} fds with {CLIENTS} clients (baseline {baseline_fds})"
    );
    let mut conn = server.connect();
    let acked = publish_n(&mut conn, &topic, MESSAGES);
    let started = Instant::now();
    server.health();
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "/health slow under fan-out"
    );
    let mut all_clients = Vec::with_capacity(CLIENTS);
    for w in workers {
        let (clients, ids) = match w.join() {
            Ok(r) => r,
            Err(panic) => std::panic::resume_unwind(panic),
        };
        for (i, got) in ids.iter().enumerate() {
            assert_eq!(got, &acked, "client {i} of a worker");
        }
        all_clients.extend(clients);
    }
    assert_eq!(all_clients.len(), CLIENTS);
    assert_strictly_increasing(&acked);
    assert!(
        Instant::now() < test_deadline,
        "a thousand subscribers took over 60 s"
    );
    drop(all_clients);
    // The relay gives the descriptors back once the clients are gone.
    assert!(
        eventually(Duration::from_secs(15), || open_fds(pid)
            <= baseline_fds + 20),
        "descriptors not released: {} open, baseline {baseline_fds}",
        open_fds(pid)
    );
}
