//! Hostile clients over HTTP, against a real 2-shard relay: request-smuggling shapes,
//! oversize and overflowing framing, negative and overflowing numbers, invalid UTF-8, deeply
//! nested JSON, huge arrays, control characters and `:`/`{`/`}` in topic names and ids,
//! malformed cursors, non-JSON content types, connections that send nothing or never read.
//!
//! Every case gets its documented status and error code (or the documented quiet close), and
//! each test runs its cases [`under_attack`]: a well-behaved publisher and WebSocket
//! subscriber work alongside the whole time and must see every message, and the relay must
//! be alive with no panic afterwards.
//!
//! Owns: the hostile shapes not already pinned down elsewhere. Shapes that other suites
//! already cover exactly are named in comments where their category is, not repeated:
//! `http_protocol.rs` (CL+TE both orders, duplicate equal and differing Content-Length, bad
//! chunk hex, Content-Length `abc`/`-1`, missing version, header without colon), `limits.rs`
//! (431 for a long header block and too many headers, 413 declared/sent/chunked, 408 for a
//! partial head), `http_api.rs` (415 for text/plain, form and XML bodies, bad limit/order/
//! cursor queries, bad publish bodies, invalid topic names), `delivery_longpoll.rs` and
//! `delivery_sse.rs` (their invalid requests). WebSocket shapes are in `hostile_ws.rs`.

mod common;

use std::time::Duration;

use common::hostile::{assert_relay_alive, stat_sum, under_attack, Bystander, SHARDS};
use common::ws::WsClient;
use common::{build_request, publish_body, Conn, ConnErrorKind, Server};
use serde_json::json;

/// What a hostile request must get.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Expect {
    /// This status with this JSON error code; `closes`: the relay then closes the connection
    /// (framing errors, after which the byte stream cannot be trusted).
    Error {
        status: u16,
        code: &'static str,
        closes: bool,
    },
    /// A success status (shapes the relay accepts by design, e.g. bare-LF line ends).
    Ok(u16),
}

const fn err(status: u16, code: &'static str) -> Expect {
    Expect::Error {
        status,
        code,
        closes: false,
    }
}

/// A framing error: answered, then the connection is closed.
const fn fatal(status: u16, code: &'static str) -> Expect {
    Expect::Error {
        status,
        code,
        closes: true,
    }
}

struct Case {
    name: String,
    bytes: Vec<u8>,
    expect: Expect,
}

fn case(name: impl Into<String>, bytes: impl Into<Vec<u8>>, expect: Expect) -> Case {
    Case {
        name: name.into(),
        bytes: bytes.into(),
        expect,
    }
}

/// `method path` with a JSON body (Content-Type and Content-Length added).
fn json_req(method: &str, path: &str, body: &[u8]) -> Vec<u8> {
    build_request(method, path, &[], Some(body))
}

fn get(path: &str) -> Vec<u8> {
    build_request("GET", path, &[], None)
}

/// Sends each case on its own connection and checks its outcome; returns every mismatch (the
/// whole table runs, so one failure shows all of them).
fn run_cases(server: &Server, cases: &[Case]) -> Vec<String> {
    let mut failures = Vec::new();
    for c in cases {
        if let Err(e) = run_case(server, c) {
            failures.push(format!("{}: {e}", c.name));
        }
    }
    failures
}

fn run_case(server: &Server, c: &Case) -> Result<(), String> {
    let mut conn = server.connect();
    // The relay may answer and close before the last bytes are written (413 from the head).
    let _ = conn.try_send(&c.bytes);
    let resp = conn
        .try_read_response(false)
        .map_err(|e| format!("no response: {e}"))?;
    match c.expect {
        Expect::Ok(status) => {
            if resp.status != status {
                return Err(format!("expected {status}, got {resp:?}"));
            }
        }
        Expect::Error {
            status,
            code,
            closes,
        } => {
            if resp.status != status {
                return Err(format!("expected {status} {code}, got {resp:?}"));
            }
            let body: serde_json::Value = serde_json::from_slice(&resp.body)
                .map_err(|e| format!("error body is not JSON ({e}): {resp:?}"))?;
            if body["error"] != code || !body["message"].is_string() {
                return Err(format!("expected error code {code}, got {body}"));
            }
            if closes && !conn.closed_within(Duration::from_secs(5)) {
                return Err("the connection stayed open after a framing error".into());
            }
        }
    }
    Ok(())
}

fn assert_no_failures(failures: Vec<String>) {
    assert!(
        failures.is_empty(),
        "{} case(s) failed:\n{}",
        failures.len(),
        failures.join("\n")
    );
}

fn start(yaml: &str) -> Server {
    Server::start_with_shards(yaml, SHARDS)
}

/// Request smuggling: every way to make two parsers disagree on where a request ends is
/// refused with 400 (or 501 for a coding we do not implement) and the connection closed.
/// Also in `http_protocol.rs`: CL+TE in both orders, duplicate Content-Length (equal and
/// differing), non-hex chunk size, Content-Length `abc` and `-1`.
#[test]
fn smuggling_shapes_are_refused_and_closed() {
    let server = start("");
    let body = publish_body("smuggled", "1");
    let n = body.len();
    let chunked = format!("{n:x}\r\n{body}\r\n0\r\n\r\n");
    let post = |headers: &str, rest: &str| {
        format!("POST /api/v1/messages HTTP/1.1\r\nHost: localhost\r\n{headers}\r\n{rest}")
            .into_bytes()
    };
    let bad = fatal(400, "INVALID_REQUEST");
    let cases = vec![
        case(
            "CL+TE, TE value with trailing whitespace",
            post(
                &format!("Content-Length: {n}\r\nTransfer-Encoding: chunked \r\n"),
                &chunked,
            ),
            bad,
        ),
        case(
            "CL+TE, TE spelled in mixed case",
            post(
                &format!("Transfer-Encoding: ChUnKeD\r\nContent-Length: {n}\r\n"),
                &chunked,
            ),
            bad,
        ),
        case(
            "Content-Length as a list `n, n`",
            post(&format!("Content-Length: {n}, {n}\r\n"), &body),
            bad,
        ),
        case(
            "Content-Length with a plus sign",
            post(&format!("Content-Length: +{n}\r\n"), &body),
            bad,
        ),
        case(
            "Content-Length with inner whitespace",
            post("Content-Length: 1 0\r\n", &body),
            bad,
        ),
        case(
            "Content-Length in hex",
            post("Content-Length: 0x10\r\n", &body),
            bad,
        ),
        case(
            "empty Content-Length",
            post("Content-Length: \r\n", &body),
            bad,
        ),
        case(
            "Transfer-Encoding: chunked twice in one field",
            post("Transfer-Encoding: chunked, chunked\r\n", &chunked),
            bad,
        ),
        case(
            "Transfer-Encoding: chunked in two fields",
            post(
                "Transfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n",
                &chunked,
            ),
            bad,
        ),
        case(
            "Transfer-Encoding: gzip, chunked",
            post("Transfer-Encoding: gzip, chunked\r\n", &chunked),
            fatal(501, "NOT_IMPLEMENTED"),
        ),
        case(
            "Transfer-Encoding: chunked, identity (chunked not last: RFC 9112 §6.3 says 400)",
            post("Transfer-Encoding: chunked, identity\r\n", &chunked),
            bad,
        ),
        case(
            "Transfer-Encoding: xchunked (no chunked at all)",
            post("Transfer-Encoding: xchunked\r\n", &chunked),
            bad,
        ),
        case(
            "Transfer-Encoding on HTTP/1.0",
            format!(
                "POST /api/v1/messages HTTP/1.0\r\nHost: localhost\r\nTransfer-Encoding: chunked\r\n\r\n{chunked}"
            ),
            bad,
        ),
        case(
            "obs-fold continuation line",
            post(&format!("Content-Length: {n}\r\nX-Folded: a\r\n b\r\n"), &body),
            bad,
        ),
        case(
            "obs-fold hiding Transfer-Encoding",
            post(
                &format!("Content-Length: {n}\r\nX-Folded: a\r\n Transfer-Encoding: chunked\r\n"),
                &chunked,
            ),
            bad,
        ),
        case(
            "whitespace between header name and colon",
            post("Transfer-Encoding : chunked\r\n", &chunked),
            bad,
        ),
        case(
            "bare LF ending a header before Transfer-Encoding (read as two fields: CL+TE)",
            format!(
                "POST /api/v1/messages HTTP/1.1\r\nHost: localhost\r\nX-A: a\nTransfer-Encoding: chunked\r\n\
                 Content-Length: {n}\r\n\r\n{chunked}"
            ),
            bad,
        ),
        case(
            "bare CR inside the head",
            "GET /health HTTP/1.1\rHost: localhost\r\n\r\n",
            bad,
        ),
        case(
            "bare CR inside a header value",
            "GET /health HTTP/1.1\r\nHost: localhost\r\nX-A: a\rb\r\n\r\n",
            bad,
        ),
        case(
            "NUL inside a header value",
            "GET /health HTTP/1.1\r\nHost: localhost\r\nX-A: a\0b\r\n\r\n",
            bad,
        ),
        case(
            "chunk size line ended by bare LF",
            post(
                "Transfer-Encoding: chunked\r\n",
                &format!("{n:x}\n{body}\r\n0\r\n\r\n"),
            ),
            bad,
        ),
        case(
            "chunk data not followed by CRLF",
            post(
                "Transfer-Encoding: chunked\r\n",
                &format!("{n:x}\r\n{body}XX0\r\n\r\n"),
            ),
            bad,
        ),
        case(
            "chunk size with 0x prefix",
            post(
                "Transfer-Encoding: chunked\r\n",
                &format!("0x{n:x}\r\n{body}\r\n0\r\n\r\n"),
            ),
            bad,
        ),
        case(
            "empty chunk size",
            post("Transfer-Encoding: chunked\r\n", "\r\n\r\n"),
            bad,
        ),
        case(
            "chunk size followed by junk instead of an extension",
            post(
                "Transfer-Encoding: chunked\r\n",
                &format!("{n:x} x\r\n{body}\r\n0\r\n\r\n"),
            ),
            bad,
        ),
        case(
            "control character in a chunk extension",
            post(
                "Transfer-Encoding: chunked\r\n",
                &format!("{n:x};a=\x01\r\n{body}\r\n0\r\n\r\n"),
            ),
            bad,
        ),
        case(
            "two Host headers",
            "GET /health HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n",
            bad,
        ),
        case("HTTP/1.1 without Host", "GET /health HTTP/1.1\r\n\r\n", bad),
        case(
            "absolute-form target",
            "GET http://evil.example/health HTTP/1.1\r\nHost: localhost\r\n\r\n",
            bad,
        ),
        case(
            "HTTP/2.0 in the request line",
            "GET /health HTTP/2.0\r\nHost: localhost\r\n\r\n",
            fatal(505, "INVALID_REQUEST"),
        ),
        case(
            "an expectation other than 100-continue",
            "GET /health HTTP/1.1\r\nHost: localhost\r\nExpect: 200-ok\r\n\r\n",
            fatal(417, "INVALID_REQUEST"),
        ),
        // Accepted by design (RFC 9112 §2.2 lets a server read a bare LF as a line end, as
        // nginx, hyper and Go do); the case above shows it cannot hide a second framing header.
        case(
            "bare LF line ends throughout",
            "GET /health HTTP/1.1\nHost: localhost\n\n",
            Expect::Ok(200),
        ),
    ];
    under_attack(&server, "smuggling shapes", || {
        assert_no_failures(run_cases(&server, &cases))
    });
    // None of the smuggled publishes was stored.
    assert_eq!(server.read_topic("smuggled", "")["total"], 0);
}

/// Oversize framing and numbers that overflow: 431, 413 or 400, never a huge allocation.
/// Also in `limits.rs`: a long header block, too many headers, a body over the limit
/// (declared, sent, and chunked); in `http_protocol.rs`: Content-Length `-1`.
#[test]
fn oversize_and_overflowing_framing() {
    let server = start("http:\n  max_header_bytes: 4KiB\n  max_body_bytes: 64KiB\napi:\n  max_payload_bytes: 16KiB\n");
    let long_path = format!("/api/v1/topics/{}/messages", "a".repeat(8 * 1024));
    let chunked_post = |sizes: &str| {
        format!(
            "POST /api/v1/messages HTTP/1.1\r\nHost: localhost\r\nTransfer-Encoding: chunked\r\n\r\n{sizes}"
        )
        .into_bytes()
    };
    let cases = vec![
        case(
            "start line longer than max_header_bytes",
            format!("GET {long_path} HTTP/1.1\r\nHost: localhost\r\n\r\n"),
            fatal(431, "HEADERS_TOO_LARGE"),
        ),
        case(
            "method token longer than max_header_bytes",
            format!("{} / HTTP/1.1\r\nHost: localhost\r\n\r\n", "G".repeat(8 * 1024)),
            fatal(431, "HEADERS_TOO_LARGE"),
        ),
        case(
            "endless empty lines before a request",
            "\r\n".repeat(4 * 1024),
            fatal(431, "HEADERS_TOO_LARGE"),
        ),
        case(
            "Content-Length overflowing u64",
            "POST /api/v1/messages HTTP/1.1\r\nHost: localhost\r\nContent-Length: 99999999999999999999999\r\n\r\n",
            fatal(400, "INVALID_REQUEST"),
        ),
        case(
            "Content-Length u64::MAX",
            "POST /api/v1/messages HTTP/1.1\r\nHost: localhost\r\nContent-Length: 18446744073709551615\r\n\r\n",
            fatal(413, "PAYLOAD_TOO_LARGE"),
        ),
        case(
            "Content-Length with 10,000 leading zeros",
            format!(
                "POST /api/v1/messages HTTP/1.1\r\nHost: localhost\r\nContent-Length: {}1\r\n\r\n",
                "0".repeat(10_000)
            ),
            fatal(431, "HEADERS_TOO_LARGE"),
        ),
        case(
            "chunk size of 16 hex digits (u64::MAX)",
            chunked_post("ffffffffffffffff\r\n"),
            fatal(413, "PAYLOAD_TOO_LARGE"),
        ),
        case(
            "chunk size of 17 hex digits (overflows u64)",
            chunked_post("10000000000000000\r\n"),
            fatal(400, "INVALID_REQUEST"),
        ),
        case(
            "chunk size with a long run of leading zeros",
            chunked_post(&format!("{}1\r\nx\r\n0\r\n\r\n", "0".repeat(100))),
            fatal(400, "INVALID_REQUEST"),
        ),
        case(
            "chunk size line longer than max_header_bytes",
            chunked_post(&format!("1;{}\r\n", "e".repeat(8 * 1024))),
            fatal(400, "INVALID_REQUEST"),
        ),
        case(
            "chunks summing past max_body_bytes",
            chunked_post(&format!("8000\r\n{}\r\n8001\r\n", "c".repeat(0x8000))),
            fatal(413, "PAYLOAD_TOO_LARGE"),
        ),
        case(
            "chunk extensions summing past max_header_bytes",
            chunked_post(&format!("1;{}\r\nx\r\n", "e".repeat(3000)).repeat(3)),
            fatal(400, "INVALID_REQUEST"),
        ),
        case(
            "trailer section longer than max_header_bytes",
            chunked_post(&format!("0\r\nX-T: {}\r\n\r\n", "t".repeat(8 * 1024))),
            fatal(431, "HEADERS_TOO_LARGE"),
        ),
    ];
    under_attack(&server, "oversize framing", || {
        assert_no_failures(run_cases(&server, &cases))
    });
}

/// Numbers out of range in queries and bodies: 400 with INVALID_REQUEST (or INVALID_CURSOR
/// for ids), never a wrap-around, a panic or a clamp to something surprising. Also in
/// `http_api.rs`: `limit=-1`, `limit=1.5`, `ttl` 0/-5/"10", `keep_count` -1/1.5/"3"; in
/// `delivery_longpoll.rs`: poll `timeout` 0/61, `limit` 0.
#[test]
fn negative_and_overflowing_numbers() {
    let server = start("");
    server.publish("numbers", "1");
    let bad = err(400, "INVALID_REQUEST");
    let pub_ttl = |ttl: &str| {
        json_req(
            "POST",
            "/api/v1/messages",
            format!(r#"{{"topic":"numbers","payload":1,"ttl":{ttl}}}"#).as_bytes(),
        )
    };
    let trim = |keep: &str| {
        json_req(
            "POST",
            "/api/v1/topics/numbers/trim",
            format!(r#"{{"keep_count":{keep}}}"#).as_bytes(),
        )
    };
    let poll = |field: &str| {
        json_req(
            "POST",
            "/messages/poll",
            format!(r#"{{"topics":["numbers"],{field}}}"#).as_bytes(),
        )
    };
    let cases = vec![
        case(
            "limit overflowing u64",
            get("/api/v1/topics/numbers/messages?limit=99999999999999999999999"),
            bad,
        ),
        case(
            "limit 0",
            get("/api/v1/topics/numbers/messages?limit=0"),
            bad,
        ),
        case(
            "limit 1001",
            get("/api/v1/topics/numbers/messages?limit=1001"),
            bad,
        ),
        // Lenient by design: Rust's integer parsing takes a leading `+`; harmless.
        case(
            "limit with a leading plus",
            get("/api/v1/topics/numbers/messages?limit=%2B5"),
            Expect::Ok(200),
        ),
        case("ttl 1e400 (overflows f64)", pub_ttl("1e400"), bad),
        case("ttl -1e-300", pub_ttl("-1e-300"), bad),
        case("ttl -0", pub_ttl("-0"), bad),
        case("ttl 1e308 (beyond ten years)", pub_ttl("1e308"), bad),
        case(
            "ttl u64 overflow as an integer",
            pub_ttl("18446744073709551616"),
            bad,
        ),
        case("keep_count u64 overflow", trim("18446744073709551616"), bad),
        case("keep_count 1e400", trim("1e400"), bad),
        case("keep_count -0.0", trim("-0.0"), bad),
        case("poll timeout -1", poll(r#""timeout":-1"#), bad),
        case("poll timeout 1e400", poll(r#""timeout":1e400"#), bad),
        case(
            "poll limit u64 overflow",
            poll(r#""limit":18446744073709551616"#),
            bad,
        ),
        case("poll limit -1", poll(r#""limit":-1"#), bad),
        case(
            "GET poll timeout NaN",
            get("/api/v1/poll?topics=numbers&timeout=NaN"),
            bad,
        ),
        case(
            "GET poll timeout inf",
            get("/api/v1/poll?topics=numbers&timeout=inf"),
            bad,
        ),
        case(
            "GET poll limit u64 overflow",
            get("/api/v1/poll?topics=numbers&limit=18446744073709551616"),
            bad,
        ),
    ];
    under_attack(&server, "numbers", || {
        assert_no_failures(run_cases(&server, &cases))
    });
    // Nothing was published or trimmed by the bad requests.
    assert_eq!(server.read_topic("numbers", "")["total"], 1);
}

/// Invalid UTF-8, deeply nested JSON, huge arrays and non-JSON content types in bodies: 400
/// (or 415, 413) and the connection stays usable. Also in `http_api.rs`: 415 for text/plain,
/// form and XML publishes; bulk over `max_bulk_messages` (3 of 4).
#[test]
fn hostile_bodies() {
    let server = start("");
    let bad = err(400, "INVALID_REQUEST");
    let nested = |depth: usize| format!("{}{}", "[".repeat(depth), "]".repeat(depth));
    let deep_object = format!("{}1{}", r#"{"a":"#.repeat(10_000), "}".repeat(10_000));
    let publish = |payload: &str| {
        json_req(
            "POST",
            "/api/v1/messages",
            publish_body("bodies", payload).as_bytes(),
        )
    };
    let raw_publish = |body: &[u8]| json_req("POST", "/api/v1/messages", body);
    let huge_bulk = format!(r#"{{"messages":[{}1]}}"#, "1,".repeat(200_000));
    // Distinct names: repeats would be merged before the count is checked.
    let topic_list = |n: usize| {
        (0..n)
            .map(|i| format!("t{i}"))
            .collect::<Vec<_>>()
            .join(",")
    };
    let huge_topics = format!(r#"{{"topics":[{}"a"]}}"#, r#""a","#.repeat(100_000));
    let with_type = |ct: &str, path: &str, body: &str| {
        build_request("POST", path, &[("Content-Type", ct)], Some(body.as_bytes()))
    };
    let one = publish_body("bodies", "1");
    let cases = vec![
        case(
            "invalid UTF-8 in a payload string",
            raw_publish(b"{\"topic\":\"bodies\",\"payload\":\"\xff\xfe\"}"),
            bad,
        ),
        case(
            "invalid UTF-8 in the topic",
            raw_publish(b"{\"topic\":\"bod\xc3ies\",\"payload\":1}"),
            bad,
        ),
        case(
            "invalid UTF-8 in a metadata value",
            raw_publish(
                b"{\"topic\":\"bodies\",\"payload\":1,\"metadata\":{\"k\":\"\xed\xa0\x80\"}}",
            ),
            bad,
        ),
        case(
            "UTF-8 BOM before the body",
            raw_publish(format!("\u{feff}{one}").as_bytes()),
            bad,
        ),
        case(
            "payload nested 100,000 deep",
            publish(&nested(100_000)),
            bad,
        ),
        case(
            "payload object nested 10,000 deep",
            publish(&deep_object),
            bad,
        ),
        case(
            "metadata nested 10,000 deep",
            raw_publish(
                format!(
                    r#"{{"topic":"bodies","payload":1,"metadata":{}}}"#,
                    nested(10_000)
                )
                .as_bytes(),
            ),
            bad,
        ),
        case(
            "bulk envelope nested 10,000 deep",
            json_req(
                "POST",
                "/api/v1/messages/bulk",
                format!(r#"{{"messages":{{"a":{}}}}}"#, nested(10_000)).as_bytes(),
            ),
            bad,
        ),
        // An item is judged alone: 207, with that item rejected.
        case(
            "bulk item nested 10,000 deep",
            json_req(
                "POST",
                "/api/v1/messages/bulk",
                format!(
                    r#"{{"messages":[{}]}}"#,
                    publish_body("bodies", &nested(10_000))
                )
                .as_bytes(),
            ),
            Expect::Ok(207),
        ),
        case(
            "poll body nested 10,000 deep",
            json_req("POST", "/messages/poll", nested(10_000).as_bytes()),
            bad,
        ),
        case(
            "bulk of 200,001 items",
            json_req("POST", "/api/v1/messages/bulk", huge_bulk.as_bytes()),
            bad,
        ),
        case(
            "poll of 100,001 topics",
            json_req("POST", "/messages/poll", huge_topics.as_bytes()),
            bad,
        ),
        case(
            "SSE with 2,000 topics",
            get(&format!("/api/v1/events?topics={}", topic_list(2_000))),
            bad,
        ),
        case(
            "SSE with a query over max_header_bytes",
            get(&format!(
                "/api/v1/events?topics={}",
                vec!["t"; 10_000].join(",")
            )),
            fatal(431, "HEADERS_TOO_LARGE"),
        ),
        case(
            "publish as multipart/form-data",
            with_type("multipart/form-data; boundary=x", "/api/v1/messages", &one),
            err(415, "UNSUPPORTED_MEDIA_TYPE"),
        ),
        case(
            "publish as application/jsonx",
            with_type("application/jsonx", "/api/v1/messages", &one),
            err(415, "UNSUPPORTED_MEDIA_TYPE"),
        ),
        case(
            "publish with an empty Content-Type",
            with_type("", "/api/v1/messages", &one),
            err(415, "UNSUPPORTED_MEDIA_TYPE"),
        ),
        case(
            "poll as text/plain",
            with_type("text/plain", "/messages/poll", r#"{"topics":["bodies"]}"#),
            err(415, "UNSUPPORTED_MEDIA_TYPE"),
        ),
        case(
            "trim as text/plain",
            with_type(
                "text/plain",
                "/api/v1/topics/bodies/trim",
                r#"{"keep_count":1}"#,
            ),
            err(415, "UNSUPPORTED_MEDIA_TYPE"),
        ),
        case(
            "bulk as application/octet-stream",
            with_type(
                "application/octet-stream",
                "/api/v1/messages/bulk",
                r#"{"messages":[{"topic":"bodies","payload":1}]}"#,
            ),
            err(415, "UNSUPPORTED_MEDIA_TYPE"),
        ),
    ];
    under_attack(&server, "hostile bodies", || {
        assert_no_failures(run_cases(&server, &cases))
    });
    assert_eq!(server.read_topic("bodies", "")["total"], 0);
}

/// Control characters, `:`, `{` and `}` in topic names wherever a topic is named, and in ids
/// wherever an id is read: INVALID_TOPIC / INVALID_CURSOR, never a Valkey key built from them.
/// Also in `http_api.rs`: space, `/`, `ü`, `:`, `*` and 256 characters in body and path;
/// malformed cursors `abc`, `1-`, `-1`, `1-2-3`, `x-1`, a 23-digit ms.
#[test]
fn hostile_topic_names_and_ids() {
    let server = start("");
    server.publish("names", "1");
    let bad_topic = err(400, "INVALID_TOPIC");
    let bad_cursor = err(400, "INVALID_CURSOR");
    let mut cases = Vec::new();
    for (name, topic) in [
        ("NUL", "a\u{0}b"),
        ("CRLF", "a\r\nb"),
        ("ANSI escape", "a\u{1b}[31mb"),
        ("tab", "a\tb"),
        ("DEL", "a\u{7f}b"),
        ("colon", "a:b"),
        ("braces", "{a}"),
        ("a Valkey key template", "x}:stream:{y"),
        ("a hash tag", "{topic}:meta"),
    ] {
        let body = json!({"topic": topic, "payload": 1}).to_string();
        cases.push(Case {
            name: format!("publish to a topic with {name}"),
            bytes: json_req("POST", "/api/v1/messages", body.as_bytes()),
            expect: bad_topic,
        });
        let poll = json!({"topics": [topic]}).to_string();
        cases.push(Case {
            name: format!("poll a topic with {name}"),
            bytes: json_req("POST", "/messages/poll", poll.as_bytes()),
            expect: bad_topic,
        });
    }
    for (name, encoded) in [
        ("%00", "a%00b"),
        ("%0D%0A", "a%0D%0Ab"),
        ("%1B", "a%1B%5B31mb"),
        ("%3A", "a%3Ab"),
        ("%7B%7D", "%7Ba%7D"),
        ("%FF (invalid UTF-8)", "a%FFb"),
    ] {
        for (what, path) in [
            ("history", format!("/api/v1/topics/{encoded}/messages")),
            ("stats", format!("/api/v1/topics/{encoded}")),
            ("events", format!("/api/v1/topics/{encoded}/events")),
            (
                "events ?topics=",
                format!("/api/v1/events?topics={encoded}"),
            ),
            ("GET poll", format!("/api/v1/poll?topics={encoded}")),
        ] {
            cases.push(Case {
                name: format!("{what} of a topic with {name}"),
                bytes: get(&path),
                expect: bad_topic,
            });
        }
    }
    for (name, cursor) in [
        ("u64 overflow in ms", "18446744073709551616-0"),
        ("u64 overflow in seq", "0-18446744073709551616"),
        ("a leading plus", "%2B1-0"),
        ("a leading space", "%201-0"),
        ("a double dash", "1--0"),
        ("a lone dash", "-"),
        ("NUL", "1-0%00"),
        ("CRLF", "1-0%0D%0A"),
        ("an ANSI escape", "1-0%1B%5B31m"),
        ("a colon", "1:0"),
        ("braces", "%7B1%7D-0"),
        ("invalid UTF-8", "1-%FF"),
    ] {
        for (what, path) in [
            (
                "history cursor",
                format!("/api/v1/topics/names/messages?cursor={cursor}"),
            ),
            (
                "history since",
                format!("/api/v1/topics/names/messages?since={cursor}"),
            ),
            (
                "events since",
                format!("/api/v1/topics/names/events?since={cursor}"),
            ),
            (
                "GET poll since",
                format!("/api/v1/poll?topics=names&since={cursor}"),
            ),
        ] {
            cases.push(Case {
                name: format!("{what} with {name}"),
                bytes: get(&path),
                expect: bad_cursor,
            });
        }
    }
    for (name, id) in [
        ("CRLF", "1-0\r\n"),
        ("an ANSI escape", "1-0\u{1b}[31m"),
        ("NUL", "1-0\u{0}"),
        ("braces", "{1}-0"),
    ] {
        let poll = json!({"topics": ["names"], "since": {"names": id}}).to_string();
        cases.push(Case {
            name: format!("POST poll since with {name}"),
            bytes: json_req("POST", "/messages/poll", poll.as_bytes()),
            expect: bad_cursor,
        });
    }
    cases.push(case(
        "Last-Event-ID with invalid UTF-8",
        b"GET /api/v1/topics/names/events HTTP/1.1\r\nHost: localhost\r\nLast-Event-ID: 1-\xff\r\n\r\n"
            .to_vec(),
        bad_cursor,
    ));
    cases.push(case(
        "Last-Event-ID that is not an id",
        build_request(
            "GET",
            "/api/v1/topics/names/events",
            &[("Last-Event-ID", "{1}:0")],
            None,
        ),
        bad_cursor,
    ));
    under_attack(&server, "topic names and ids", || {
        assert_no_failures(run_cases(&server, &cases));
        // Bulk: each item is judged alone.
        let items: Vec<_> = ["a\u{0}b", "a\r\nb", "a:b", "{a}", "names"]
            .iter()
            .map(|t| json!({"topic": t, "payload": 1}))
            .collect();
        let resp = server.post_json(
            "/api/v1/messages/bulk",
            &json!({ "messages": items }).to_string(),
        );
        assert_eq!(resp.status, 207, "{resp:?}");
        let v = resp.json();
        let codes: Vec<_> = v["results"]
            .as_array()
            .expect("results")
            .iter()
            .map(|r| r["error"].as_str().unwrap_or("accepted").to_string())
            .collect();
        assert_eq!(
            codes,
            [
                "INVALID_TOPIC",
                "INVALID_TOPIC",
                "INVALID_TOPIC",
                "INVALID_TOPIC",
                "accepted"
            ],
            "{v}"
        );
    });
    // Only the bulk's one valid item was added; no topic with a hostile name exists.
    assert_eq!(server.read_topic("names", "")["total"], 2);
    let list = server.get("/api/v1/topics").json();
    for t in list["topics"].as_array().expect("topics") {
        let name = t["topic"].as_str().expect("topic");
        assert!(
            name.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b)),
            "a topic named {name:?} exists"
        );
    }
}

/// Connections that send nothing, or stop mid-request: closed quietly after
/// `http.keepalive_timeout` (nothing sent, nothing to answer) or answered 408 (a request was
/// started), while the bystander is served. Also in `limits.rs`: a partial head gets 408 after
/// `header_read_timeout`, dripping bytes does not extend it.
#[test]
fn slowloris_connections_are_cut() {
    let server = start("http:\n  header_read_timeout: 1s\n  keepalive_timeout: 1s\n");
    under_attack(&server, "slowloris", || {
        // Fifty connections that never send a byte, twenty that stop inside the head, ten that
        // stop inside a body.
        let silent: Vec<Conn> = (0..50).map(|_| server.connect()).collect();
        let mut in_head: Vec<Conn> = (0..20).map(|_| server.connect()).collect();
        for c in &mut in_head {
            c.send(b"POST /api/v1/messages HTTP/1.1\r\nHost: localhost\r\nContent-Le");
        }
        let mut in_body: Vec<Conn> = (0..10).map(|_| server.connect()).collect();
        for c in &mut in_body {
            c.send(
                b"POST /api/v1/messages HTTP/1.1\r\nHost: localhost\r\nContent-Length: 100\r\n\r\n{\"to",
            );
        }
        for (i, mut c) in silent.into_iter().enumerate() {
            assert!(
                c.closed_within(Duration::from_secs(10)),
                "silent connection {i} still open"
            );
        }
        for (what, conns) in [("head", in_head), ("body", in_body)] {
            for (i, mut c) in conns.into_iter().enumerate() {
                let resp = c
                    .try_read_response(false)
                    .unwrap_or_else(|e| panic!("connection {i} stopped in the {what}: {e}"));
                assert_eq!(resp.status, 408, "stopped in the {what}: {resp:?}");
                assert_eq!(resp.json()["error"], "REQUEST_TIMEOUT", "{resp:?}");
                assert!(c.closed_within(Duration::from_secs(5)), "{what} {i}");
            }
        }
    });
}

/// A client that pipelines requests for large responses and never reads them: the relay
/// stops reading its requests once responses back up (so memory is bounded by what one
/// connection may have in flight), and drops the connection once its writes have made no
/// progress for `http.keepalive_timeout`. The bystander is unaffected throughout.
///
/// "Dropped" is read from the relay's connection count, against the exact count without the
/// attacker (the bystander's connections and the stats request's own), not a sample taken
/// before the attack: a sample could miss a bystander connection not yet accepted (then the
/// relay seemed to keep the attacker) or count one still closing (then a relay that kept
/// the attacker could pass).
#[test]
fn a_pipelining_client_that_never_reads_is_dropped() {
    let server = start("http:\n  keepalive_timeout: 1s\n");
    // ~1 MB per history page.
    let pad = "p".repeat(1000);
    let mut conn = server.connect();
    for i in 0..1000 {
        conn.publish("never-read", &format!(r#"{{"i":{i},"pad":"{pad}"}}"#));
    }
    drop(conn);
    under_attack(&server, "a pipelining client that never reads", || {
        let connections = || stat_sum(&server, "connections");
        let without_hog = Bystander::CONNECTIONS + 1;
        // The publishing connection above may still be closing.
        assert!(
            common::eventually(Duration::from_secs(10), || connections() == without_hog),
            "the relay holds {} connections before the attack, {without_hog} expected",
            connections()
        );
        let mut hog = server.connect();
        // One answer first, so the relay has accepted (and counts) the hog before it stops
        // reading: the count at `without_hog` below then means dropped, not not yet accepted.
        let resp = hog.request("GET", "/health", None);
        assert_eq!(resp.status, 200, "{resp:?}");
        // 2,000 pipelined reads of 1 MB each: ~2 GB of responses asked for by ~150 KB of
        // requests. The write may block once the relay stops reading; that is the point.
        let request = get("/api/v1/topics/never-read/messages?limit=1000");
        let mut sent = 0;
        hog.stream
            .set_write_timeout(Some(Duration::from_secs(3)))
            .expect("write timeout");
        for _ in 0..2000 {
            if hog.try_send(&request).is_err() {
                break;
            }
            sent += 1;
        }
        assert!(sent > 0, "could not send a single request");
        let dropped = common::eventually(Duration::from_secs(20), || connections() == without_hog);
        assert!(
            dropped,
            "the relay still holds the never-reading connection ({} open, {without_hog} without \
             it)",
            connections()
        );
        // Reading now: whatever the relay wrote before giving up, then the end.
        hog.set_read_timeout(Duration::from_secs(5));
        let mut answered = 0;
        let ended = loop {
            match hog.try_read_response(false) {
                Ok(resp) => {
                    assert_eq!(resp.status, 200, "{resp:?}");
                    answered += 1;
                }
                Err(e) => break matches!(e.kind, ConnErrorKind::Closed) || !e.is_timeout(),
            }
        };
        assert!(ended, "the dropped connection did not end");
        assert!(
            answered < sent,
            "all {sent} pipelined requests were answered to a client that never read"
        );
    });
    assert_relay_alive(&server, "the never-reading client");
}

/// The hostile bytes of the echo audit: CR LF (a forged log line or header), an ANSI colour
/// escape (a terminal hijack) and NUL.
const INJECTIONS: [&str; 3] = ["\r\nX-Injected: 1", "\u{1b}[31m", "\u{0}"];

/// Asserts `text` carries none of the raw bytes of [`INJECTIONS`] (escaped forms are fine).
fn assert_no_raw_injection(text: &str, what: &str) {
    for bad in ["X-Injected: 1", "\u{1b}", "\u{0}"] {
        assert!(
            !text.contains(bad),
            "{what} carries {bad:?} unescaped:\n{text}"
        );
    }
}

/// Nothing a client sends reaches a response header or a log line unescaped. The relay runs
/// at `trace` in both log formats (every crate's events, so any that echoed request data would
/// show); requests put CR LF, an ANSI escape and NUL into paths, queries, header values, topic
/// names, ids, WebSocket commands and close reasons; then every response head and every log
/// line is checked for the raw bytes, and every text log line must be a whole event line (none
/// split by an injected newline).
#[test]
fn client_bytes_are_never_echoed_raw_into_headers_or_logs() {
    for format in ["text", "json"] {
        let server = Server::start_opts(
            common::RelayOpts::new("")
                .env("LOG_LEVEL", "trace")
                .env("LOG_FORMAT", format),
        );
        let mut heads = Vec::new();
        // Heads only: they are what is audited (bodies are JSON, escaped by construction),
        // and a request that opens an event stream has no end to wait for.
        let mut record = |conn: &mut Conn, bytes: &[u8]| {
            let _ = conn.try_send(bytes);
            if let Ok(head) = conn.try_read_head() {
                heads.push(format!("{head:?}"));
            }
        };
        for inj in INJECTIONS {
            let enc: String = inj.bytes().map(|b| format!("%{b:02X}")).collect();
            let topic_json = json!({"topic": format!("t{inj}"), "payload": 1}).to_string();
            let requests = [
                get(&format!("/nope{enc}")),
                get(&format!("/api/v1/topics/t{enc}/messages")),
                get(&format!("/api/v1/topics/t/messages?cursor={enc}&limit={enc}")),
                get(&format!("/api/v1/events?topics={enc}")),
                get(&format!("/api/v1/poll?topics=t&since={enc}")),
                json_req("POST", "/api/v1/messages", topic_json.as_bytes()),
                build_request(
                    "PUT",
                    &format!("/api/v1/topics/t{enc}/trim"),
                    &[],
                    Some(b"{}"),
                ),
                // Raw bytes in a header value (refused by the parser where they are illegal).
                format!("GET /health HTTP/1.1\r\nHost: localhost\r\nX-Evil: a{inj}b\r\n\r\n").into_bytes(),
                format!(
                    "GET /api/v1/topics/t/events HTTP/1.1\r\nHost: localhost\r\nLast-Event-ID: {inj}\r\n\r\n"
                )
                .into_bytes(),
                format!("GET /ws HTTP/1.1\r\nHost: localhost\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: {inj}\r\nSec-WebSocket-Version: 13\r\n\r\n")
                    .into_bytes(),
            ];
            for bytes in requests {
                record(&mut server.connect(), &bytes);
            }
            // WebSocket: hostile topics, offsets, ids and a close reason.
            let mut ws = WsClient::connect(server.addr);
            for cmd in [
                json!({"type": "subscribe", "topics": [format!("t{inj}")]}),
                json!({"type": "subscribe", "topics": ["t"], "offset": inj}),
                json!({"type": "unsubscribe", "topics": [inj]}),
                json!({"type": "ack", "message_id": inj}),
                json!({"type": inj}),
            ] {
                ws.send_json(&cmd);
            }
            ws.send_json(&json!({"type": "ping"}));
            while ws.recv()["type"] != "pong" {}
            ws.close(4000, "bye\u{1b}[31m\r\nX-Injected: 1");
            let _ = ws.expect_close(Duration::from_secs(10), 16);
        }
        // A publish and a delivery so the normal paths log too.
        server.publish("t", "1");
        assert_relay_alive(&server, "the echo audit");
        for head in &heads {
            assert_no_raw_injection(head, "a response head");
        }
        let log = server.stderr();
        assert_no_raw_injection(&log, &format!("the {format} log"));
        for line in log.lines().filter(|l| !l.starts_with("--- pulsar-relay")) {
            let whole = match format {
                "json" => serde_json::from_str::<serde_json::Value>(line).is_ok(),
                // tracing's text lines start with an RFC 3339 timestamp.
                _ => line.len() > 20 && line.as_bytes()[4] == b'-' && line.as_bytes()[10] == b'T',
            };
            assert!(
                whole,
                "a {format} log line that is not a whole event: {line:?}\n{log}"
            );
        }
    }
}

/// An event stream whose client never reads, on a busy topic: cut off once it is
/// `sse.max_queued_bytes` behind with its socket full, counted as a slow consumer; the
/// bystander is unaffected.
#[test]
fn an_event_stream_that_never_reads_is_cut() {
    let server = start("sse:\n  max_queued_bytes: 64KiB\n");
    under_attack(&server, "an event stream that never reads", || {
        let stalled =
            common::sse::SseClient::open_ok(server.addr, "/api/v1/topics/sse-stall/events", &[]);
        assert!(
            common::eventually(Duration::from_secs(10), || stat_sum(
                &server,
                "event_streams"
            ) == 1),
            "the stream did not open"
        );
        let payload = format!("\"{}\"", "x".repeat(60_000));
        let mut conn = server.connect();
        let mut published = 0;
        while stat_sum(&server, "event_streams") > 0 && published < 2000 {
            conn.publish("sse-stall", &payload);
            published += 1;
        }
        assert!(
            common::eventually(Duration::from_secs(20), || stat_sum(
                &server,
                "event_streams"
            ) == 0),
            "the stalled stream is still open after {published} publishes"
        );
        let metrics = server.get("/metrics").text();
        assert!(
            metrics.contains("relay_slow_consumer_disconnects_total 1"),
            "not counted as a slow consumer"
        );
        drop(stalled);
    });
}
