//! Browser safety over real sockets: the `Host` allow-list (DNS rebinding), the `Origin` rules
//! on `/ws` and event streams, CORS preflights and the headers on actual responses, and the
//! JSON-only rule that keeps cross-site simple requests from changing state. Both sides of
//! every boundary: what a browser page may do and what it may not.
//!
//! Rate limits are in `rate_limits.rs`; the real browser in `browser.rs`.

mod common;

use std::process::{Command, Stdio};

use common::sse::SseClient;
use common::{assert_error_body, Conn, RelayOpts, Response, Server};

const APP: &str = "https://app.example";

fn config() -> String {
    format!("security:\n  allowed_origins: [\"{APP}\"]\n")
}

/// A request with `Host: <host>` and the given headers (a JSON body gets its type).
fn send(
    server: &Server,
    method: &str,
    path: &str,
    host: &str,
    headers: &[(&str, &str)],
    body: Option<&str>,
) -> Response {
    let mut head = format!("{method} {path} HTTP/1.1\r\nHost: {host}\r\n");
    for (name, value) in headers {
        head.push_str(&format!("{name}: {value}\r\n"));
    }
    if let Some(body) = body {
        head.push_str(&format!("Content-Length: {}\r\n", body.len()));
    }
    head.push_str("\r\n");
    head.push_str(body.unwrap_or(""));
    let mut conn = server.connect();
    conn.send(head.as_bytes());
    conn.read_response(method == "HEAD")
}

/// The status of an error answer, after checking it is the documented JSON error.
fn assert_refused(resp: &Response, status: u16, code: &str) {
    assert_eq!(resp.status, status, "expected {code}: {resp:?}");
    let v = resp.json();
    assert_eq!(v["error"], code, "{resp:?}");
    assert!(
        v["message"].is_string() && v.get("detail").is_some(),
        "{resp:?}"
    );
}

fn ws_upgrade(server: &Server, host: &str, origin: Option<&str>) -> Response {
    let mut head = format!(
        "GET /ws HTTP/1.1\r\nHost: {host}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n"
    );
    if let Some(origin) = origin {
        head.push_str(&format!("Origin: {origin}\r\n"));
    }
    head.push_str("\r\n");
    let mut conn = server.connect();
    conn.send(head.as_bytes());
    // A 101 has no body; an error has a JSON one.
    conn.read_response(false)
}

/// Opens an event stream and reads its head (the stream stays open until the connection is
/// dropped).
fn sse_head(server: &Server, path: &str, host: &str, origin: Option<&str>) -> (Response, Conn) {
    let mut conn = server.connect();
    conn.send(
        format!(
            "GET {path} HTTP/1.1\r\nHost: {host}\r\nAccept: text/event-stream\r\n{}\r\n",
            origin.map_or(String::new(), |o| format!("Origin: {o}\r\n"))
        )
        .as_bytes(),
    );
    let head = conn.read_head();
    (head, conn)
}

#[test]
fn a_loopback_relay_answers_loopback_host_names_only() {
    let server = Server::start("");
    let port = server.addr.port();
    for host in [
        "localhost".to_owned(),
        format!("localhost:{port}"),
        format!("127.0.0.1:{port}"),
        format!("[::1]:{port}"),
    ] {
        let resp = send(&server, "GET", "/api/v1/topics", &host, &[], None);
        assert_eq!(resp.status, 200, "Host {host}: {resp:?}");
    }
    // A page that re-pointed its own name at 127.0.0.1 (DNS rebinding) still sends its name.
    for host in [
        "evil.example",
        &format!("evil.example:{port}"),
        "localhost.evil.example",
    ] {
        let resp = send(&server, "GET", "/api/v1/topics", host, &[], None);
        assert_refused(&resp, 400, "INVALID_HOST");
        let resp = send(
            &server,
            "POST",
            "/api/v1/messages",
            host,
            &[("Content-Type", "application/json")],
            Some(r#"{"topic":"rebound","payload":1}"#),
        );
        assert_refused(&resp, 400, "INVALID_HOST");
        assert_refused(&ws_upgrade(&server, host, None), 400, "INVALID_HOST");
        let (head, _conn) = sse_head(&server, "/api/v1/topics/rebound/events", host, None);
        assert_eq!(head.status, 400, "{head:?}");
    }
    assert_eq!(
        server.get("/api/v1/topics/rebound").status,
        404,
        "nothing was stored"
    );
    // Probes and scrapers address the relay by IP: never refused.
    for path in ["/health", "/ready", "/metrics"] {
        let resp = send(&server, "GET", path, "10.1.2.3:8080", &[], None);
        assert_eq!(resp.status, 200, "{path}: {resp:?}");
    }
    // HTTP/1.0 may leave Host out: no browser does.
    let mut conn = server.connect();
    conn.send(b"GET /api/v1/topics HTTP/1.0\r\n\r\n");
    assert_eq!(conn.read_response(false).status, 200);
}

#[test]
fn an_explicit_host_list_takes_names_and_wildcards() {
    let server =
        Server::start("security:\n  trusted_hosts: [relay.example.com, \"*.svc.example\"]\n");
    for host in [
        "relay.example.com",
        "RELAY.example.com:8080",
        "a.svc.example",
        "b.a.svc.example:443",
    ] {
        let resp = send(&server, "GET", "/api/v1/topics", host, &[], None);
        assert_eq!(resp.status, 200, "Host {host}: {resp:?}");
    }
    for host in [
        "svc.example",
        "localhost",
        "127.0.0.1",
        "relay.example.com.evil",
    ] {
        let resp = send(&server, "GET", "/api/v1/topics", host, &[], None);
        assert_refused(&resp, 400, "INVALID_HOST");
    }
    let any = Server::start("security:\n  trusted_hosts: ['*']\n");
    let resp = send(&any, "GET", "/api/v1/topics", "anything.example", &[], None);
    assert_eq!(resp.status, 200, "{resp:?}");
}

#[test]
fn a_relay_beyond_loopback_answers_any_host_and_warns() {
    let server = Server::start_opts(RelayOpts {
        listen: Some("0.0.0.0:0".parse().expect("literal")),
        ..RelayOpts::new("auth:\n  allow_unauthenticated_network: true\n")
    });
    let resp = send(
        &server,
        "GET",
        "/api/v1/topics",
        "relay.example.com",
        &[],
        None,
    );
    assert_eq!(resp.status, 200, "{resp:?}");
    assert!(
        server
            .stderr()
            .contains("security.trusted_hosts (TRUSTED_HOSTS) is not set"),
        "no start-up warning:\n{}",
        server.stderr()
    );
    let quiet = Server::start("");
    assert!(
        !quiet.stderr().contains("trusted_hosts"),
        "{}",
        quiet.stderr()
    );
}

#[test]
fn websocket_upgrades_check_the_origin() {
    let server = Server::start(&config());
    let port = server.addr.port();
    let host = format!("127.0.0.1:{port}");
    for (origin, why) in [
        (None, "no Origin: not a browser"),
        (Some(APP), "listed"),
        (Some(&*format!("http://127.0.0.1:{port}")), "same origin"),
    ] {
        let resp = ws_upgrade(&server, &host, origin);
        assert_eq!(resp.status, 101, "{why}: {resp:?}");
    }
    for foreign in [
        "https://evil.example",
        &format!("http://127.0.0.1:{}", port + 1),
        "http://localhost",
        "null",
    ] {
        let resp = ws_upgrade(&server, &host, Some(foreign));
        assert_refused(&resp, 403, "ORIGIN_NOT_ALLOWED");
        assert!(resp.header("upgrade").is_none(), "{resp:?}");
    }
}

#[test]
fn event_streams_check_the_origin_and_carry_cors_headers() {
    let server = Server::start(&config());
    for path in ["/api/v1/topics/es/events", "/api/v1/events?topics=es,other"] {
        let (_open, head) = SseClient::open(server.addr, path, &[]).expect("no Origin");
        assert!(
            head.header("access-control-allow-origin").is_none(),
            "{head:?}"
        );

        let (mut open, head) =
            SseClient::open(server.addr, path, &[("Origin", APP)]).expect("allowed origin");
        assert_eq!(head.header("content-type"), Some("text/event-stream"));
        assert_eq!(
            head.header("access-control-allow-origin"),
            Some(APP),
            "{head:?}"
        );
        assert_eq!(head.header("vary"), Some("Origin"), "{head:?}");
        // The stream works: a publish reaches it.
        server.publish("es", r#"{"n":1}"#);
        assert_eq!(open.next_message()["payload"]["n"], 1, "{path}");

        // The relay's own origin (Host: localhost, port 80 on both sides).
        let same = SseClient::open(server.addr, path, &[("Origin", "http://localhost")]);
        assert!(same.is_ok(), "{path}: same origin refused");

        for foreign in ["https://evil.example", "http://localhost:8080", "null"] {
            let refused = SseClient::open(server.addr, path, &[("Origin", foreign)])
                .map(|(_, head)| head)
                .expect_err("foreign origin");
            assert_refused(&refused, 403, "ORIGIN_NOT_ALLOWED");
        }
    }
    // A refused host gets no stream either.
    let (head, _conn) = sse_head(
        &server,
        "/api/v1/topics/es/events",
        "evil.example",
        Some(APP),
    );
    assert_eq!(head.status, 400, "{head:?}");
}

#[test]
fn preflights_are_answered_for_allowed_origins_methods_and_headers() {
    let server = Server::start(&config());
    let preflight = |origin: &str, method: &str, headers: Option<&str>| {
        let mut list = vec![
            ("Origin", origin),
            ("Access-Control-Request-Method", method),
        ];
        if let Some(h) = headers {
            list.push(("Access-Control-Request-Headers", h));
        }
        send(
            &server,
            "OPTIONS",
            "/api/v1/messages",
            "localhost",
            &list,
            None,
        )
    };
    let ok = preflight(
        APP,
        "POST",
        Some("content-type, idempotency-key, authorization"),
    );
    assert_eq!(ok.status, 204, "{ok:?}");
    assert_eq!(ok.header("access-control-allow-origin"), Some(APP));
    assert_eq!(
        ok.header("access-control-allow-methods"),
        Some("GET, POST, PUT, PATCH, DELETE, OPTIONS")
    );
    assert_eq!(
        ok.header("access-control-allow-headers"),
        Some("Authorization, Content-Type, Idempotency-Key, Last-Event-ID, X-API-Key")
    );
    assert_eq!(ok.header("access-control-max-age"), Some("600"));
    assert_eq!(ok.header("vary"), Some("Origin"));
    assert!(ok.body.is_empty());
    for path in [
        "/api/v1/topics/t/events",
        "/ws",
        "/auth/login",
        "/api/v1/topics/t",
    ] {
        let resp = send(
            &server,
            "OPTIONS",
            path,
            "localhost",
            &[
                ("Origin", APP),
                ("Access-Control-Request-Method", "GET"),
                ("Access-Control-Request-Headers", "last-event-id"),
            ],
            None,
        );
        assert_eq!(resp.status, 204, "{path}: {resp:?}");
    }
    assert_refused(
        &preflight("https://evil.example", "POST", None),
        403,
        "ORIGIN_NOT_ALLOWED",
    );
    assert_refused(&preflight(APP, "TRACE", None), 403, "CORS_NOT_ALLOWED");
    assert_refused(
        &preflight(APP, "POST", Some("content-type, x-evil")),
        403,
        "CORS_NOT_ALLOWED",
    );
    // An OPTIONS that is no preflight keeps its old answer.
    let resp = send(
        &server,
        "OPTIONS",
        "/api/v1/messages",
        "localhost",
        &[],
        None,
    );
    assert_refused(&resp, 405, "METHOD_NOT_ALLOWED");
}

#[test]
fn actual_responses_carry_cors_headers_for_allowed_origins_only() {
    let server = Server::start(&config());
    let json = [("Content-Type", "application/json")];
    let publish = |origin: Option<&str>| {
        let mut headers = json.to_vec();
        if let Some(o) = origin {
            headers.push(("Origin", o));
        }
        send(
            &server,
            "POST",
            "/api/v1/messages",
            "localhost",
            &headers,
            Some(r#"{"topic":"cors","payload":1}"#),
        )
    };
    let resp = publish(Some(APP));
    assert_eq!(resp.status, 201, "{resp:?}");
    assert_eq!(resp.header("access-control-allow-origin"), Some(APP));
    assert_eq!(resp.header("vary"), Some("Origin"));
    assert_eq!(
        resp.header("access-control-expose-headers"),
        Some("Retry-After")
    );
    let resp = publish(None);
    assert_eq!(resp.status, 201, "{resp:?}");
    assert!(resp.header("access-control-allow-origin").is_none() && resp.header("vary").is_none());
    // Errors carry them too, so the page can read why.
    let resp = send(
        &server,
        "GET",
        "/api/v1/topics/nope",
        "localhost",
        &[("Origin", APP)],
        None,
    );
    assert_eq!(resp.status, 404);
    assert_eq!(resp.header("access-control-allow-origin"), Some(APP));
    // A foreign page's GET is answered (the browser hides it) without them.
    let resp = send(
        &server,
        "GET",
        "/api/v1/topics/cors/messages",
        "localhost",
        &[("Origin", "https://evil.example")],
        None,
    );
    assert_eq!(resp.status, 200);
    assert!(
        resp.header("access-control-allow-origin").is_none(),
        "{resp:?}"
    );
    // `*` allows any page.
    let any = Server::start("security:\n  allowed_origins: ['*']\n");
    let resp = send(
        &any,
        "GET",
        "/api/v1/topics",
        "localhost",
        &[("Origin", "https://x.example")],
        None,
    );
    assert_eq!(
        resp.header("access-control-allow-origin"),
        Some("https://x.example")
    );
}

#[test]
fn state_changes_must_be_json() {
    let server = Server::start("");
    let body = r#"{"topic":"typed","payload":1}"#;
    for content_type in [
        None,
        Some("text/plain"),
        Some("application/x-www-form-urlencoded"),
        Some("multipart/form-data; boundary=x"),
    ] {
        let headers: Vec<(&str, &str)> = content_type
            .map(|c| ("Content-Type", c))
            .into_iter()
            .collect();
        let resp = send(
            &server,
            "POST",
            "/api/v1/messages",
            "localhost",
            &headers,
            Some(body),
        );
        assert_error_body(&resp, "UNSUPPORTED_MEDIA_TYPE");
        let resp = send(
            &server,
            "POST",
            "/api/v1/messages/bulk",
            "localhost",
            &headers,
            Some(r#"{"messages":[{"topic":"typed","payload":1}]}"#),
        );
        assert_error_body(&resp, "UNSUPPORTED_MEDIA_TYPE");
        let resp = send(
            &server,
            "POST",
            "/messages/poll",
            "localhost",
            &headers,
            Some(r#"{"topics":["typed"],"timeout":1}"#),
        );
        assert_error_body(&resp, "UNSUPPORTED_MEDIA_TYPE");
    }
    assert_eq!(
        server.get("/api/v1/topics/typed").status,
        404,
        "nothing stored"
    );
    server.publish("typed", "1");
    // A trim is a state change even without a body.
    let resp = send(
        &server,
        "POST",
        "/api/v1/topics/typed/trim",
        "localhost",
        &[],
        Some(""),
    );
    assert_error_body(&resp, "UNSUPPORTED_MEDIA_TYPE");
    let resp = send(
        &server,
        "POST",
        "/api/v1/topics/typed/trim",
        "localhost",
        &[("Content-Type", "text/plain")],
        Some(r#"{"keep_count":0}"#),
    );
    assert_error_body(&resp, "UNSUPPORTED_MEDIA_TYPE");
    assert_eq!(server.read_topic("typed", "")["total"], 1, "not trimmed");
    // A DELETE needs no type (a browser preflights it) but may not declare a non-JSON body.
    let resp = send(
        &server,
        "DELETE",
        "/api/v1/topics/typed",
        "localhost",
        &[("Content-Type", "text/plain")],
        Some("x"),
    );
    assert_error_body(&resp, "UNSUPPORTED_MEDIA_TYPE");
    assert_eq!(server.delete("/api/v1/topics/typed").status, 204);
    // The README's forms pass.
    let resp = send(
        &server,
        "POST",
        "/api/v1/messages",
        "localhost",
        &[("Content-Type", "application/json; charset=utf-8")],
        Some(body),
    );
    assert_eq!(resp.status, 201, "{resp:?}");
}

#[test]
fn cross_site_simple_requests_cannot_change_state() {
    let server = Server::start(&config());
    // What a cross-site form or `fetch(.., {mode: "no-cors"})` sends: a simple content type,
    // the page's Origin, no preflight.
    for (content_type, body) in [
        ("text/plain", r#"{"topic":"csrf","payload":1}"#),
        ("application/x-www-form-urlencoded", "topic=csrf&payload=1"),
        ("application/json", r#"{"topic":"csrf","payload":1}"#),
    ] {
        let resp = send(
            &server,
            "POST",
            "/api/v1/messages",
            "localhost",
            &[
                ("Content-Type", content_type),
                ("Origin", "https://evil.example"),
            ],
            Some(body),
        );
        assert_refused(&resp, 403, "ORIGIN_NOT_ALLOWED");
        assert!(resp.header("access-control-allow-origin").is_none());
    }
    let resp = send(
        &server,
        "DELETE",
        "/api/v1/topics/csrf",
        "localhost",
        &[("Origin", "https://evil.example")],
        None,
    );
    assert_refused(&resp, 403, "ORIGIN_NOT_ALLOWED");
    assert_eq!(
        server.get("/api/v1/topics/csrf").status,
        404,
        "nothing stored"
    );
    // The same from the allowed page and from the relay's own origin is a publish.
    for origin in [
        APP.to_owned(),
        format!("http://localhost:{}", server.addr.port()),
    ] {
        let resp = send(
            &server,
            "POST",
            "/api/v1/messages",
            &format!("localhost:{}", server.addr.port()),
            &[("Content-Type", "application/json"), ("Origin", &origin)],
            Some(r#"{"topic":"csrf","payload":1}"#),
        );
        assert_eq!(resp.status, 201, "{origin}: {resp:?}");
    }
}

#[test]
fn login_from_a_foreign_origin_is_refused_before_routing() {
    // No /auth/login route on this branch: the guard answers before the router would 404.
    let server = Server::start(&config());
    let form = [("Content-Type", "application/x-www-form-urlencoded")];
    let login = |origin: Option<&str>| {
        let mut headers = form.to_vec();
        if let Some(o) = origin {
            headers.push(("Origin", o));
        }
        send(
            &server,
            "POST",
            "/auth/login",
            "localhost",
            &headers,
            Some("username=a&password=b"),
        )
    };
    assert_refused(
        &login(Some("https://evil.example")),
        403,
        "ORIGIN_NOT_ALLOWED",
    );
    // From no page or the allowed one the form passes the guard (no 403, no 415).
    assert_eq!(login(None).status, 404);
    assert_eq!(login(Some(APP)).status, 404);
}

#[test]
fn list_settings_come_from_the_python_relays_variables() {
    let server = Server::start_opts(
        RelayOpts::new("")
            .env(
                "PULSAR_ALLOWED_ORIGINS",
                r#"["https://a.example","https://b.example"]"#,
            )
            .env("TRUSTED_HOSTS", "relay.example.com,localhost"),
    );
    let ws = ws_upgrade(&server, "relay.example.com", Some("https://b.example"));
    assert_eq!(ws.status, 101, "{ws:?}");
    let ws = ws_upgrade(&server, "localhost", Some("https://c.example"));
    assert_eq!(ws.status, 403, "{ws:?}");
    let resp = send(&server, "GET", "/api/v1/topics", "127.0.0.1", &[], None);
    assert_eq!(resp.status, 400, "{resp:?}");

    // A malformed JSON list stops the relay at start-up, naming the variable.
    let out = Command::new(env!("CARGO_BIN_EXE_pulsar-relay"))
        .args(["--listen", "127.0.0.1:0", "--shards", "1"])
        .env("PULSAR_ALLOWED_ORIGINS", r#"["https://a.example","#)
        .stdin(Stdio::null())
        .output()
        .expect("run pulsar-relay");
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("`security.allowed_origins` (from env PULSAR_ALLOWED_ORIGINS)")
            && stderr.contains("not a JSON array of strings"),
        "{stderr}"
    );
}
