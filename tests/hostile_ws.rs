//! Hostile WebSocket clients against a real 2-shard relay: frame-level violations (each with
//! its documented close code), hostile JSON commands (each with its `error` frame, the socket
//! staying open), hostile upgrade requests, and clients that go silent or never read.
//!
//! Every test runs [`under_attack`]: a well-behaved publisher and subscriber work alongside
//! and must see every message; the relay must be alive with no panic afterwards.
//!
//! Also covered elsewhere, not repeated here: `delivery_ws.rs` (unmasked frame, RSV1, a
//! fragmented ping, a 126-byte ping, reserved opcode 3, a continuation without a start,
//! invalid UTF-8 text whole and split across fragments → 1002/1007; a frame and a fragmented
//! message over `ws.max_message_bytes` → 1009; not-JSON, unknown type, bad topic and bad
//! offset commands → error frames; the idle close; the 4008 slow-consumer close of a
//! subscriber that reads too slowly) and `regression.rs` (a subscriber that never reads is
//! disconnected).

mod common;

use std::time::Duration;

use common::hostile::{stat_sum, under_attack, SHARDS};
use common::ws::{close_payload, encode_frame as frame, RawEvent, RawWs, WsClient};
use common::{build_request, eventually, Server};
use serde_json::{json, Value};

fn start(yaml: &str) -> Server {
    Server::start_with_shards(yaml, SHARDS)
}

/// Opens a raw session, sends `frames`, and returns the close code the relay answers with
/// (`Err` with what happened instead); the relay must then end the TCP connection.
fn close_code_after(server: &Server, frames: &[Vec<u8>]) -> Result<u16, String> {
    let mut raw = RawWs::connect(server.addr);
    for f in frames {
        // The relay may close before the last frame is written.
        let _ = std::io::Write::write_all(&mut raw.stream, f);
    }
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let code = loop {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        match raw.next_frame(left) {
            // Pongs and error frames for the frames before the violation are fine.
            RawEvent::Frame(f) if f.opcode != 0x8 => continue,
            RawEvent::Frame(f) => match f.close_code() {
                Some(code) => break code,
                None => return Err(format!("close frame without a code: {f:?}")),
            },
            other => return Err(format!("no close frame: {other:?}")),
        }
    };
    if !raw.eof_within(Duration::from_secs(10)) {
        return Err(format!("closed with {code} but the connection stayed open"));
    }
    Ok(code)
}

/// Frame-level violations not covered in `delivery_ws.rs`: each closes with its code.
#[test]
fn frame_violations_close_with_their_codes() {
    let server = start("ws:\n  max_message_bytes: 64KiB\n");
    let ping = br#"{"type":"ping"}"#;
    // A header declaring a 64-bit length (no payload follows).
    let declared = |len: u64| {
        let mut f = vec![0x81, 0x80 | 127];
        f.extend_from_slice(&len.to_be_bytes());
        f.extend_from_slice(&[1, 2, 3, 4]);
        f
    };
    let cases: Vec<(&str, Vec<Vec<u8>>, u16)> = vec![
        ("RSV2 set", vec![frame(true, 0b010, 0x1, ping, true)], 1002),
        ("RSV3 set", vec![frame(true, 0b001, 0x1, ping, true)], 1002),
        (
            "RSV1 on a control frame",
            vec![frame(true, 0b100, 0x9, b"", true)],
            1002,
        ),
        (
            "reserved control opcode 0xB",
            vec![frame(true, 0, 0xb, b"", true)],
            1002,
        ),
        (
            "unmasked ping",
            vec![frame(true, 0, 0x9, b"x", false)],
            1002,
        ),
        (
            "unmasked continuation of a masked start",
            vec![
                frame(false, 0, 0x1, b"{\"type\":", true),
                frame(true, 0, 0x0, b"\"ping\"}", false),
            ],
            1002,
        ),
        (
            "a new text frame while a fragmented message is open",
            vec![
                frame(false, 0, 0x1, b"{\"type\":", true),
                frame(true, 0, 0x1, ping, true),
            ],
            1002,
        ),
        (
            "fragmented close",
            vec![frame(false, 0, 0x8, &close_payload(1000, ""), true)],
            1002,
        ),
        (
            "fragmented pong",
            vec![frame(false, 0, 0xa, b"", true)],
            1002,
        ),
        (
            "64-bit length 2^63 + 5",
            vec![declared((1 << 63) + 5)],
            1009,
        ),
        ("64-bit length u64::MAX", vec![declared(u64::MAX)], 1009),
        (
            "length just over max_message_bytes, no payload sent",
            vec![declared(64 * 1024 + 1)],
            1009,
        ),
        (
            "a thousand fragments summing past max_message_bytes",
            std::iter::once(frame(false, 0, 0x1, &[b' '; 100], true))
                .chain((0..1000).map(|_| frame(false, 0, 0x0, &[b' '; 100], true)))
                .collect(),
            1009,
        ),
        (
            "invalid UTF-8 text: overlong encoding of '/'",
            vec![frame(true, 0, 0x1, &[0xc0, 0xaf], true)],
            1007,
        ),
        (
            "invalid UTF-8 text: UTF-16 surrogate",
            vec![frame(true, 0, 0x1, &[0xed, 0xa0, 0x80], true)],
            1007,
        ),
        (
            "invalid UTF-8 text: truncated at the end",
            vec![frame(true, 0, 0x1, b"{\"a\":\"\xe2\x82", true)],
            1007,
        ),
        (
            "close reason with invalid UTF-8",
            vec![frame(true, 0, 0x8, b"\x03\xe8\xff", true)],
            1007,
        ),
        (
            "close payload of one byte",
            vec![frame(true, 0, 0x8, b"\x03", true)],
            1002,
        ),
        (
            "close code 1005 (never on the wire)",
            vec![frame(true, 0, 0x8, &close_payload(1005, ""), true)],
            1002,
        ),
        (
            "close code 999",
            vec![frame(true, 0, 0x8, &close_payload(999, ""), true)],
            1002,
        ),
        (
            "close code 5000",
            vec![frame(true, 0, 0x8, &close_payload(5000, ""), true)],
            1002,
        ),
        // Accepted: RFC 6455 leaves the client's own codes 3000-4999 open; echoed.
        (
            "close code 4999 from the client",
            vec![frame(true, 0, 0x8, &close_payload(4999, "bye"), true)],
            4999,
        ),
    ];
    under_attack(&server, "WebSocket frame violations", || {
        let failures: Vec<String> = cases
            .iter()
            .filter_map(
                |(what, frames, want)| match close_code_after(&server, frames) {
                    Ok(code) if code == *want => None,
                    Ok(code) => Some(format!("{what}: closed with {code}, expected {want}")),
                    Err(e) => Some(format!("{what}: {e}")),
                },
            )
            .collect();
        assert!(failures.is_empty(), "{}", failures.join("\n"));
    });
}

/// Frames the relay accepts although they look odd: each is answered and the session goes on.
#[test]
fn odd_but_legal_frames_are_served() {
    let server = start("");
    under_attack(&server, "odd but legal frames", || {
        let mut raw = RawWs::connect(server.addr);
        let ping = br#"{"type":"ping"}"#;
        // A ping with invalid UTF-8 (control payloads are bytes), a command split into
        // fifteen 1-byte fragments with a ping between them, a non-minimal 64-bit length,
        // and a binary frame (answered with an error frame).
        raw.send_bytes(&frame(true, 0, 0x9, b"\xff\xfe", true));
        let mut fragments = frame(false, 0, 0x1, &ping[..1], true);
        for (i, b) in ping[1..].iter().enumerate() {
            if i == 5 {
                fragments.extend(frame(true, 0, 0x9, b"mid", true));
            }
            let last = i == ping.len() - 2;
            fragments.extend(frame(last, 0, 0x0, &[*b], true));
        }
        raw.send_bytes(&fragments);
        let mut long_form = vec![0x81, 0x80 | 127];
        long_form.extend_from_slice(&(ping.len() as u64).to_be_bytes());
        long_form.extend_from_slice(&[0, 0, 0, 0]);
        long_form.extend_from_slice(ping);
        raw.send_bytes(&long_form);
        raw.send_bytes(&frame(true, 0, 0x2, b"\x00\x01", true));

        let mut pongs = Vec::new();
        let mut texts = Vec::new();
        while pongs.len() < 2 || texts.len() < 3 {
            match raw.next_frame(Duration::from_secs(10)) {
                RawEvent::Frame(f) if f.opcode == 0xa => pongs.push(f.payload),
                RawEvent::Frame(f) if f.opcode == 0x1 => {
                    let v: Value = serde_json::from_slice(&f.payload).expect("JSON");
                    texts.push(
                        v["type"].as_str().unwrap_or_default().to_string()
                            + ":"
                            + v["code"].as_str().unwrap_or_default(),
                    );
                }
                RawEvent::Frame(f) if f.opcode == 0x9 => {}
                other => panic!("expected answers, got {other:?} (pongs {pongs:?}, {texts:?})"),
            }
        }
        assert_eq!(pongs, vec![b"\xff\xfe".to_vec(), b"mid".to_vec()]);
        assert_eq!(texts, ["pong:", "pong:", "error:UNSUPPORTED_FRAME"]);
    });
}

/// Hostile JSON commands: each gets its `error` frame and the socket stays open and usable.
/// Also in `delivery_ws.rs`: not JSON, unknown type, a topic with a space, bad offsets.
#[test]
fn hostile_commands_get_error_frames() {
    let server = start("ws:\n  max_topics: 100\n");
    let nested = |depth: usize| format!("{}{}", "[".repeat(depth), "]".repeat(depth));
    let many_topics = |n: usize| json!({"type": "subscribe", "topics": vec!["t"; n]}).to_string();
    let mut cases: Vec<(String, String, &str)> = vec![
        (
            "subscribe with 100,000 topics".into(),
            many_topics(100_000),
            "TOO_MANY_TOPICS",
        ),
        (
            "unsubscribe with 100,000 topics".into(),
            json!({"type": "unsubscribe", "topics": vec!["t"; 100_000]}).to_string(),
            "TOO_MANY_TOPICS",
        ),
        // Deep nesting is skipped without recursion, then refused for its shape.
        (
            "a command nested 100,000 deep".into(),
            nested(100_000),
            "INVALID_REQUEST",
        ),
        (
            "an unknown field nested 100,000 deep".into(),
            format!(r#"{{"type":"ping","x":{}}}"#, nested(100_000)),
            "PONG",
        ),
        (
            "topics nested 10,000 deep".into(),
            format!(r#"{{"type":"subscribe","topics":{}}}"#, nested(10_000)),
            "INVALID_REQUEST",
        ),
        (
            "offset nested 10,000 deep".into(),
            format!(
                r#"{{"type":"subscribe","topics":["t"],"offset":{}}}"#,
                nested(10_000)
            ),
            "INVALID_REQUEST",
        ),
        (
            "subscribe with topics as a string".into(),
            r#"{"type":"subscribe","topics":"t"}"#.into(),
            "INVALID_REQUEST",
        ),
        (
            "subscribe with a numeric topic".into(),
            r#"{"type":"subscribe","topics":[1]}"#.into(),
            "INVALID_REQUEST",
        ),
        (
            "subscribe with an empty topic list".into(),
            r#"{"type":"subscribe","topics":[]}"#.into(),
            "INVALID_REQUEST",
        ),
        (
            "a type of a million characters".into(),
            json!({"type": "x".repeat(1_000_000)}).to_string(),
            "UNKNOWN_MESSAGE_TYPE",
        ),
        (
            "ack without an id".into(),
            r#"{"type":"ack"}"#.into(),
            "INVALID_REQUEST",
        ),
        (
            "a JSON array".into(),
            r#"["subscribe",["t"]]"#.into(),
            "INVALID_REQUEST",
        ),
        (
            "a lone surrogate escape".into(),
            r#"{"type":"subscribe","topics":["\ud800"]}"#.into(),
            "INVALID_JSON",
        ),
    ];
    for (name, topic) in [
        ("NUL", "a\u{0}b"),
        ("CRLF", "a\r\nb"),
        ("ANSI escape", "a\u{1b}[31mb"),
        ("colon", "a:b"),
        ("braces", "{a}"),
        ("a Valkey key template", "x}:stream:{y"),
    ] {
        cases.push((
            format!("subscribe to a topic with {name}"),
            json!({"type": "subscribe", "topics": [topic]}).to_string(),
            "INVALID_TOPIC",
        ));
    }
    for (name, id) in [
        ("u64 overflow", "18446744073709551616-0"),
        ("CRLF", "1-0\r\n"),
        ("ANSI escape", "1-0\u{1b}[31m"),
        ("NUL", "1-0\u{0}"),
        ("braces", "{1}-0"),
        ("colon", "1:0"),
        ("empty", ""),
    ] {
        cases.push((
            format!("offset with {name}"),
            json!({"type": "subscribe", "topics": ["t"], "offset": id}).to_string(),
            "INVALID_OFFSET",
        ));
        cases.push((
            format!("per-topic offset with {name}"),
            json!({"type": "subscribe", "topics": ["t"], "offset": {"t": id}}).to_string(),
            "INVALID_OFFSET",
        ));
    }
    under_attack(&server, "hostile WebSocket commands", || {
        let mut client = WsClient::connect(server.addr);
        let mut failures = Vec::new();
        for (what, text, code) in &cases {
            client.send_text(text);
            let v = client.recv();
            // Every failed subscribe answers SUBSCRIPTION_ERROR (the Python relay's code), with
            // the specific code as `reason`.
            let subscribe = text.contains(r#""type":"subscribe""#);
            let ok = if *code == "PONG" {
                v["type"] == "pong"
            } else if subscribe {
                v["type"] == "error" && v["code"] == "SUBSCRIPTION_ERROR" && v["reason"] == *code
            } else {
                v["type"] == "error" && v["code"] == *code
            };
            if !ok {
                failures.push(format!("{what}: expected error {code}, got {v}"));
            }
        }
        assert!(failures.is_empty(), "{}", failures.join("\n"));
        // Still usable, and none of the failed commands subscribed anything.
        client.send_json(&json!({"type": "ping"}));
        client.recv_type("pong");
        let sub = client.subscribe(&["hostile-cmd"], None);
        assert_eq!(sub["topics"], json!(["hostile-cmd"]));
        let id = common::id_of(&server.publish("hostile-cmd", "1"));
        assert_eq!(common::id_of(&client.recv_type("message")), id);
        server.publish("t", "1");
        client.send_json(&json!({"type": "ping"}));
        client.recv_type("pong");
    });
}

/// Hostile upgrade requests: each gets its HTTP error, no session is opened.
#[test]
fn hostile_upgrades_are_refused() {
    let server = start("");
    let upgrade = |extra: &[(&str, &str)], version: &str| {
        let mut headers = vec![
            ("Upgrade", "websocket"),
            ("Connection", "Upgrade"),
            ("Sec-WebSocket-Key", "dGhlIHNhbXBsZSBub25jZQ=="),
            ("Sec-WebSocket-Version", version),
        ];
        for (n, v) in extra {
            headers.retain(|(h, _)| !h.eq_ignore_ascii_case(n));
            headers.push((n, v));
        }
        build_request("GET", "/ws", &headers, None)
    };
    let cases: Vec<(&str, Vec<u8>, u16, &str)> = vec![
        ("version 8", upgrade(&[], "8"), 426, "UPGRADE_REQUIRED"),
        (
            "version 13 followed by junk",
            upgrade(&[], "13, 8"),
            426,
            "UPGRADE_REQUIRED",
        ),
        (
            "key of 15 bytes",
            upgrade(&[("Sec-WebSocket-Key", "AAAAAAAAAAAAAAAAAAAA")], "13"),
            400,
            "INVALID_REQUEST",
        ),
        (
            "key with a control character",
            upgrade(
                &[("Sec-WebSocket-Key", "dGhlIHNhbXBsZSBub25j\u{1b}Q==")],
                "13",
            ),
            400,
            "INVALID_REQUEST",
        ),
        (
            "no Upgrade header",
            upgrade(&[("Upgrade", "h2c")], "13"),
            400,
            "INVALID_REQUEST",
        ),
        (
            "HTTP/1.0 upgrade",
            b"GET /ws HTTP/1.0\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
              Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
                .to_vec(),
            400,
            "INVALID_REQUEST",
        ),
        (
            "POST to /ws",
            build_request("POST", "/ws", &[], Some(b"{}")),
            405,
            "METHOD_NOT_ALLOWED",
        ),
    ];
    under_attack(&server, "hostile upgrades", || {
        for (what, bytes, status, code) in &cases {
            let mut conn = server.connect();
            conn.send(bytes);
            let resp = conn.read_response(false);
            assert_eq!(resp.status, *status, "{what}: {resp:?}");
            assert_eq!(resp.json()["error"], *code, "{what}: {resp:?}");
            if *status == 426 {
                assert_eq!(resp.header("sec-websocket-version"), Some("13"), "{resp:?}");
            }
        }
        // A hostile subprotocol offer is never echoed: control characters are refused by
        // the parser, and of printable offers only the plain `bearer` is ever chosen.
        let mut conn = server.connect();
        conn.send(&upgrade(
            &[("Sec-WebSocket-Protocol", "bearer.\u{1b}[31mtoken, x\u{7f}y")],
            "13",
        ));
        let resp = conn.read_response(false);
        assert_eq!(resp.status, 400, "{resp:?}");
        assert_eq!(resp.header("sec-websocket-protocol"), None, "{resp:?}");
        let mut conn = server.connect();
        conn.send(&upgrade(
            &[("Sec-WebSocket-Protocol", "bearer.secret-token, <script>")],
            "13",
        ));
        let resp = conn.read_head();
        assert_eq!(resp.status, 101, "{resp:?}");
        assert_eq!(resp.header("sec-websocket-protocol"), None, "{resp:?}");
    });
}

/// Sessions that go silent — after the upgrade, or halfway through a frame header or payload
/// — are closed with 1001 "idle timeout" after `ws.idle_timeout` (2 s here). Also in `delivery_ws.rs`:
/// a silent session is closed while one that answers pings is not.
#[test]
fn silent_sessions_are_closed() {
    let server = start("ws:\n  ping_interval: 1s\n  idle_timeout: 2s\n");
    under_attack(&server, "silent WebSocket sessions", || {
        let mut sessions: Vec<(&str, RawWs)> = Vec::new();
        for _ in 0..10 {
            sessions.push(("silent after the upgrade", RawWs::connect(server.addr)));
        }
        let mut half_header = RawWs::connect(server.addr);
        half_header.send_bytes(&[0x81]);
        sessions.push(("silent inside a frame header", half_header));
        let mut half_payload = RawWs::connect(server.addr);
        let partial = frame(true, 0, 0x1, br#"{"type":"ping"}"#, true);
        half_payload.send_bytes(&partial[..10]);
        sessions.push(("silent inside a frame payload", half_payload));
        for (what, mut raw) in sessions {
            assert_eq!(
                raw.expect_close_code(Duration::from_secs(10)),
                1001,
                "{what}"
            );
            assert!(raw.eof_within(Duration::from_secs(10)), "{what}: no EOF");
        }
    });
}

/// A client that floods `ping` commands and never reads the pongs: the pongs queue against
/// `ws.max_queued_bytes` like messages do, so the session is cut with 4008 "slow consumer"
/// instead of buffering replies without bound.
#[test]
fn a_command_flood_that_never_reads_is_cut() {
    let server = start("ws:\n  max_queued_bytes: 64KiB\n");
    under_attack(&server, "a command flood that never reads", || {
        let mut raw = RawWs::connect(server.addr);
        raw.stream
            .set_write_timeout(Some(Duration::from_secs(2)))
            .expect("write timeout");
        let before = stat_sum(&server, "websocket_sessions");
        // Each ~40-byte command asks for a ~60-byte pong. 40 MB of commands, or until the
        // relay stops reading them.
        let burst: Vec<u8> = (0..1000)
            .flat_map(|_| frame(true, 0, 0x1, br#"{"type":"ping"}"#, true))
            .collect();
        for _ in 0..1000 {
            // Fails once the relay stops reading and the socket buffers are full, or closed.
            if std::io::Write::write_all(&mut raw.stream, &burst).is_err() {
                break;
            }
        }
        assert!(
            eventually(Duration::from_secs(30), || stat_sum(
                &server,
                "websocket_sessions"
            ) < before),
            "the flooding session is still open"
        );
        let metrics = server.get("/metrics").text();
        assert!(
            metrics.contains("relay_slow_consumer_disconnects_total 1"),
            "the cut was not a slow-consumer close: {}",
            metrics
                .lines()
                .filter(|l| l.contains("slow_consumer"))
                .collect::<Vec<_>>()
                .join("\n")
        );
    });
}
