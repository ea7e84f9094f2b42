//! Black-box tests of configured HTTP limits: each limit yields its documented outcome on the
//! offending connection while the server keeps serving every other connection.
//!
//! Owns: `http.max_header_bytes`, `http.max_headers`, `http.max_body_bytes`,
//! `http.header_read_timeout`, `http.keepalive_timeout`, `http.max_connections_per_shard`.
//! Does not own: per-message API limits (`http_api.rs`) or retention (`retention.rs`).

mod common;

use std::time::{Duration, Instant};

use common::{assert_error_body, eventually, publish_body, Conn, Server};

/// A normal request on a fresh connection succeeds.
fn assert_serving(server: &Server) {
    let resp = server.get("/ready");
    assert_eq!(resp.status, 200, "server stopped serving others: {resp:?}");
}

#[test]
fn oversize_header_block_is_431() {
    let server = Server::start("http:\n  max_header_bytes: 1024\n");
    // Just under the limit works.
    let mut conn = server.connect();
    let resp = conn.request_with("GET", "/ready", &[("X-Pad", &"p".repeat(700))], None);
    assert_eq!(resp.status, 200, "{resp:?}");

    let mut conn = server.connect();
    conn.send(
        format!(
            "GET /ready HTTP/1.1\r\nHost: localhost\r\nX-Big: {}\r\n\r\n",
            "b".repeat(2000)
        )
        .as_bytes(),
    );
    let resp = conn.read_response(false);
    assert_error_body(&resp, "HEADERS_TOO_LARGE");
    assert!(conn.closed_within(Duration::from_secs(5)));
    assert_serving(&server);

    // A head that never ends also trips the byte limit rather than buffering forever.
    let mut conn = server.connect();
    let mut head = b"GET /ready HTTP/1.1\r\n".to_vec();
    for i in 0..200 {
        head.extend(format!("X-H{i}: value\r\n").as_bytes());
    }
    // Writes may fail once the server has answered and closed.
    let _ = conn.try_send(&head);
    let resp = conn.read_response(false);
    assert_error_body(&resp, "HEADERS_TOO_LARGE");
    assert_serving(&server);
}

#[test]
fn too_many_headers_is_431() {
    let server = Server::start("http:\n  max_headers: 8\n");
    let few: Vec<(String, String)> = (0..5)
        .map(|i| (format!("X-{i}"), "v".to_string()))
        .collect();
    let few_refs: Vec<(&str, &str)> = few.iter().map(|(n, v)| (n.as_str(), v.as_str())).collect();
    let resp = server
        .connect()
        .request_with("GET", "/ready", &few_refs, None);
    assert_eq!(resp.status, 200, "{resp:?}");

    let many: Vec<(String, String)> = (0..20)
        .map(|i| (format!("X-{i}"), "v".to_string()))
        .collect();
    let many_refs: Vec<(&str, &str)> = many.iter().map(|(n, v)| (n.as_str(), v.as_str())).collect();
    let mut conn = server.connect();
    let resp = conn.request_with("GET", "/ready", &many_refs, None);
    assert_error_body(&resp, "HEADERS_TOO_LARGE");
    assert!(conn.closed_within(Duration::from_secs(5)));
    assert_serving(&server);
}

#[test]
fn oversize_body_is_413_without_reading_it() {
    let server = Server::start(
        // The server requires the body limit to be at least the per-message payload limit.
        "http:\n  max_body_bytes: 1024\napi:\n  max_payload_bytes: 512\n",
    );
    // At the limit works: a 1024-byte body, padded with JSON whitespace so the payload stays
    // under its own 512-byte limit.
    let mut body = publish_body("body-limit", "1");
    body.push_str(&" ".repeat(1024 - body.len()));
    assert_eq!(body.len(), 1024);
    let resp = server.post_json("/api/v1/messages", &body);
    assert_eq!(resp.status, 201, "{resp:?}");

    // One byte over, sent in full.
    body.push(' ');
    let resp = server.post_json("/api/v1/messages", &body);
    assert_error_body(&resp, "PAYLOAD_TOO_LARGE");
    assert_serving(&server);

    // Declared too large: answered from the head alone, before any body byte is sent.
    let mut conn = server.connect();
    conn.send(b"POST /api/v1/messages HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\nContent-Length: 5000000\r\n\r\n");
    let resp = conn.read_response(false);
    assert_error_body(&resp, "PAYLOAD_TOO_LARGE");
    assert_serving(&server);

    // A chunked body that grows past the limit.
    let mut conn = server.connect();
    conn.send(
        b"POST /api/v1/messages HTTP/1.1\r\nHost: localhost\r\nTransfer-Encoding: chunked\r\n\r\n",
    );
    let chunk = format!("400\r\n{}\r\n", "c".repeat(0x400));
    // Writes may start failing once the server has answered and closed mid-stream.
    for _ in 0..4 {
        if conn.try_send(chunk.as_bytes()).is_err() {
            break;
        }
    }
    let _ = conn.try_send(b"0\r\n\r\n");
    let resp = conn.read_response(false);
    assert_error_body(&resp, "PAYLOAD_TOO_LARGE");
    assert_serving(&server);
    assert_eq!(server.read_topic("body-limit", "")["total"], 1);
}

#[test]
fn slow_header_gets_408_then_close() {
    let server = Server::start("http:\n  header_read_timeout: 1s\n");
    let mut slow = server.connect();
    let started = Instant::now();
    slow.send(b"GET /health HTTP/1.1\r\nHost: localhost\r\nX-Partial: ab");
    // Meanwhile, others are served (and a complete request on another connection is not
    // affected by the slow one's timer).
    assert_serving(&server);
    slow.set_read_timeout(Duration::from_secs(10));
    let resp = slow.read_response(false);
    let waited = started.elapsed();
    assert_error_body(&resp, "REQUEST_TIMEOUT");
    assert!(
        waited >= Duration::from_millis(800),
        "408 came before the 1 s timeout: {waited:?}"
    );
    assert!(
        waited < Duration::from_secs(5),
        "408 took {waited:?} for a 1 s timeout"
    );
    assert!(slow.closed_within(Duration::from_secs(5)));
    assert_serving(&server);
}

#[test]
fn header_timeout_counts_from_first_byte_not_per_byte() {
    let server = Server::start("http:\n  header_read_timeout: 1s\n");
    let mut slow = server.connect();
    let started = Instant::now();
    // A byte every 150 ms keeps the connection busy but never completes the head in time.
    for b in b"GET /health HTTP/1.1\r\nHost: localhost\r\nX-Drip: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaa" {
        // Fails once the server has answered and closed.
        if slow.try_send(&[*b]).is_err() || started.elapsed() > Duration::from_secs(3) {
            break;
        }
        // Traffic shaping: a slow-loris client, not synchronisation.
        std::thread::sleep(Duration::from_millis(150));
    }
    slow.set_read_timeout(Duration::from_secs(5));
    let resp = slow.read_response(false);
    assert_error_body(&resp, "REQUEST_TIMEOUT");
    assert!(started.elapsed() < Duration::from_secs(6));
    assert_serving(&server);
}

#[test]
fn idle_keepalive_connection_is_closed() {
    let server = Server::start("http:\n  keepalive_timeout: 1s\n");
    let mut conn = server.connect();
    let resp = conn.request("GET", "/ready", None);
    assert_eq!(resp.status, 200, "{resp:?}");
    let started = Instant::now();
    assert!(
        conn.closed_within(Duration::from_secs(6)),
        "idle connection still open 6 s after a 1 s keepalive_timeout"
    );
    let waited = started.elapsed();
    assert!(
        waited >= Duration::from_millis(800),
        "closed after only {waited:?} for a 1 s keepalive_timeout"
    );

    // A busy connection is not closed: requests spaced under the timeout keep it alive.
    let mut busy = server.connect();
    for _ in 0..4 {
        let resp = busy.request("GET", "/ready", None);
        assert_eq!(resp.status, 200, "{resp:?}");
        // Traffic shaping: stay well inside the idle window.
        std::thread::sleep(Duration::from_millis(400));
    }
    let resp = busy.request("GET", "/ready", None);
    assert_eq!(resp.status, 200, "{resp:?}");
    assert_serving(&server);
}

#[test]
fn connections_beyond_the_per_shard_cap_get_503() {
    let server = Server::start("http:\n  max_connections_per_shard: 2\n");
    // Capacity is 2 per shard x 2 shards = 4; open 10 and keep them all.
    let mut conns: Vec<Conn> = (0..10).map(|_| server.connect()).collect();
    let mut accepted = Vec::new();
    let mut rejected = 0;
    for (i, conn) in conns.iter_mut().enumerate() {
        // A rejected connection may already be closed; the write may then fail.
        let _ = conn.try_send(&common::build_request("GET", "/ready", &[], None));
        let resp = conn.read_response(false);
        match resp.status {
            200 => accepted.push(i),
            503 => {
                assert_error_body(&resp, "SERVICE_UNAVAILABLE");
                assert!(resp.header("retry-after").is_some(), "{resp:?}");
                assert!(
                    conn.closed_within(Duration::from_secs(5)),
                    "rejected connection {i} not closed"
                );
                rejected += 1;
            }
            _ => panic!("connection {i}: {resp:?}"),
        }
    }
    // Pigeonhole: 10 connections over 2 shards put at least 5 on one, so at least 2 are
    // accepted there; at most 4 fit in total.
    assert!(
        (2..=4).contains(&accepted.len()),
        "accepted {} connections with a capacity of 4 (rejected {rejected})",
        accepted.len()
    );
    assert_eq!(accepted.len() + rejected, 10);

    // The held connections still work.
    for &i in &accepted {
        let resp = conns[i].request("GET", "/api/v1/topics", None);
        assert_eq!(resp.status, 200, "held connection {i}: {resp:?}");
    }
    // Once the held ones go away, the full capacity is admitted again: two connections held
    // at once both succeed (2 fit on any single shard). Polled, because the server learns of
    // the closes asynchronously.
    drop(conns);
    let admitted = eventually(Duration::from_secs(5), || {
        let mut pair: Vec<Conn> = (0..2).map(|_| server.connect()).collect();
        pair.iter_mut().all(|c| {
            let _ = c.try_send(&common::build_request("GET", "/ready", &[], None));
            c.read_response(false).status == 200
        })
    });
    assert!(admitted, "slots not released after clients closed");
}
