//! Graceful shutdown: SIGTERM finishes in-flight work, loses nothing acknowledged, tells
//! consumers, and exits 0.

mod common;

use std::collections::HashSet;
use std::io::ErrorKind;
use std::net::TcpStream;
use std::time::{Duration, Instant};

use common::valkey::{stream_key, PublishLoad, ValkeyOpts, ValkeyServer};
use common::{assert_spans_shards, eventually, topics, Server};
use tungstenite::protocol::frame::coding::CloseCode;
use tungstenite::Message;

#[test]
fn sigterm_during_publish_load_loses_no_acknowledged_message() {
    let valkey = ValkeyServer::start(ValkeyOpts::default());
    let mut relay = valkey.start_relay("", &[]);
    let names = topics("drain", 6);
    assert_spans_shards(&names, 2);
    let load = PublishLoad::start(relay.addr, &names, 50_000, Duration::from_secs(60));
    assert!(
        eventually(Duration::from_secs(20), || load.min_acked() >= 100),
        "load did not get going"
    );
    let status = relay.terminate(Duration::from_secs(35));
    assert!(status.success(), "exit status after SIGTERM: {status}");
    let outcomes = load.finish();
    for out in &outcomes {
        assert_eq!(out.hung, 0, "{}: requests hung during shutdown", out.topic);
        assert!(
            out.unexpected.is_empty(),
            "{}: {:?}",
            out.topic,
            out.unexpected
        );
        let stored: HashSet<String> = valkey
            .xrange(&stream_key(&out.topic))
            .into_iter()
            .map(|e| e.id)
            .collect();
        for (i, id) in &out.acked {
            assert!(
                stored.contains(id),
                "{}: message {i} was acknowledged as {id} but is not in Valkey",
                out.topic
            );
        }
        assert!(!out.acked.is_empty(), "{}: nothing acknowledged", out.topic);
    }
}

#[test]
fn sigterm_closes_websockets_with_1001_and_answers_parked_polls() {
    let mut relay = Server::start_with_shards("", 2);
    let addr = relay.addr;

    let stream = TcpStream::connect(addr).expect("connect ws");
    stream
        .set_read_timeout(Some(Duration::from_secs(20)))
        .expect("timeout");
    let (mut ws, _) =
        tungstenite::client::client(format!("ws://{addr}/ws"), stream).expect("ws handshake");
    ws.send(Message::text(r#"{"type":"subscribe","topics":["bye"]}"#))
        .expect("subscribe");
    let subscribed = ws.read().expect("subscribed frame");
    assert!(
        subscribed.to_string().contains("subscribed"),
        "{subscribed}"
    );

    let poll = std::thread::spawn(move || {
        let mut conn = common::Conn::connect(addr);
        conn.set_read_timeout(Duration::from_secs(25));
        let started = Instant::now();
        let response = conn.request(
            "POST",
            "/messages/poll",
            Some(br#"{"topics":["parked"],"timeout":30}"#),
        );
        (response, started.elapsed())
    });
    // Wait until the poll is parked.
    assert!(
        eventually(Duration::from_secs(10), || {
            relay.get("/messages/poll/stats").json()["active_polls"] == 1
        }),
        "the poll never parked"
    );

    let started = Instant::now();
    let status = relay.terminate(Duration::from_secs(35));
    assert!(status.success(), "exit status after SIGTERM: {status}");
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "shutdown took {:?}",
        started.elapsed()
    );

    let (response, waited) = poll.join().expect("poll thread");
    assert_eq!(response.status, 200, "{}", response.text());
    assert_eq!(response.json()["timeout"], true);
    assert!(
        waited < Duration::from_secs(20),
        "the parked poll waited {waited:?}"
    );

    let close = loop {
        match ws.read() {
            Ok(Message::Close(frame)) => break frame,
            Ok(_) => continue,
            Err(tungstenite::Error::Io(e)) if e.kind() == ErrorKind::WouldBlock => {
                panic!("no close frame before the read timeout")
            }
            Err(e) => panic!("connection ended without a close frame: {e}"),
        }
    };
    assert_eq!(close.map(|f| f.code), Some(CloseCode::Away));
}
