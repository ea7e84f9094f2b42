//! Black-box tests of the JSON API: every endpoint's success shape and every documented error
//! code, against a real 2-shard server over real sockets.
//!
//! Owns: API semantics (publish, bulk, history reads and pagination, topic stats/list/trim/
//! delete, health, ready, HEAD, ttl, payload fidelity, cross-shard topic visibility). Does not
//! own: HTTP framing (`http_protocol.rs`), resource limits (`limits.rs`) or retention
//! (`retention.rs`).

mod common;

use std::time::Duration;

use common::{
    assert_error_body, assert_rfc3339_utc, assert_spans_shards, assert_strictly_increasing,
    eventually, parse_id, publish_body, topics, Server,
};
use serde_json::{json, Value};

fn ids_of(page: &Value) -> Vec<String> {
    page["messages"]
        .as_array()
        .expect("messages array")
        .iter()
        .map(|m| m["message_id"].as_str().expect("message_id").to_string())
        .collect()
}

fn payload_ints(page: &Value) -> Vec<i64> {
    page["messages"]
        .as_array()
        .expect("messages array")
        .iter()
        .map(|m| m["payload"]["i"].as_i64().expect("payload.i"))
        .collect()
}

#[test]
fn publish_then_read_back_with_metadata() {
    let server = Server::start("");
    let mut conn = server.connect();
    let body =
        r#"{"topic":"orders","payload":{"n":1},"metadata":{"zeta_key":"z","alpha_key":"a"}}"#;
    let resp = conn.request("POST", "/api/v1/messages", Some(body.as_bytes()));
    assert_eq!(resp.status, 201, "{resp:?}");
    assert!(resp
        .header("content-type")
        .is_some_and(|ct| ct.starts_with("application/json")));
    let ack = resp.json();
    assert_eq!(ack["topic"], "orders");
    let id = ack["message_id"].as_str().expect("message_id").to_string();
    parse_id(&id);
    assert_rfc3339_utc(&ack["timestamp"]);

    // A second message without metadata.
    let ack2 = conn.publish("orders", "[2]");
    assert!(parse_id(ack2["message_id"].as_str().expect("id")) > parse_id(&id));

    let resp = conn.request("GET", "/api/v1/topics/orders/messages?order=asc", None);
    assert_eq!(resp.status, 200, "{resp:?}");
    let raw = resp.text();
    let page = resp.json();
    let msgs = page["messages"].as_array().expect("messages");
    assert_eq!(msgs.len(), 2, "{page}");
    assert_eq!(msgs[0]["message_id"], id.as_str());
    assert_eq!(msgs[0]["topic"], "orders");
    assert_eq!(msgs[0]["payload"], json!({"n":1}));
    assert_eq!(msgs[0]["timestamp"], ack["timestamp"]);
    assert_eq!(msgs[0]["metadata"], json!({"alpha_key":"a","zeta_key":"z"}));
    // Keys are echoed sorted, whatever order they were sent in.
    let alpha = raw.find("alpha_key").expect("alpha_key in body");
    let zeta = raw.find("zeta_key").expect("zeta_key in body");
    assert!(alpha < zeta, "metadata keys not sorted: {raw}");
    assert_eq!(msgs[1]["payload"], json!([2]));
    assert!(msgs[1]["metadata"].is_null(), "{page}");
    assert_eq!(page["total"], 2);
}

#[test]
fn payload_is_returned_byte_for_byte() {
    let server = Server::start("");
    let payloads = [
        r#"{ "z" : 1,  "a":[1.50, 2e10, -0.0, 1E+2],   "s":"caf\u00e9 \ud83d\ude00 \n\"q\"" }"#,
        "{\n\t\"b\": 1.50,\n\t\"a\": {}\n}",
        r#""just a string with \/ and \u0041""#,
        "1.50",
        "-0",
        "true",
        "false",
        "[ ]",
        r#"{"nested":{"deep":[{"x":null},{"y":[[],[[]]]}]},"big":123456789012345678901234567890}"#,
        "\"héllo wörld ✓\"",
    ];
    for (i, p) in payloads.iter().enumerate() {
        let topic = format!("fidelity-{i}");
        let body = format!(r#"{{"topic":"{topic}","payload":{p}}}"#);
        let resp = server.post_json("/api/v1/messages", &body);
        assert_eq!(resp.status, 201, "payload {p:?}: {resp:?}");
        let resp = server.get(&format!("/api/v1/topics/{topic}/messages"));
        assert_eq!(resp.status, 200, "{resp:?}");
        let raw = resp.text();
        assert!(
            raw.contains(p),
            "payload not returned byte-for-byte.\nsent:     {p}\nresponse: {raw}"
        );
        // And it is a structurally valid document with the payload in place.
        let page = resp.json();
        let expected: Value = serde_json::from_str(p).expect("test payload is JSON");
        assert_eq!(page["messages"][0]["payload"], expected);
    }
}

#[test]
fn bulk_publish_mixed_valid_and_invalid() {
    let server = Server::start("api:\n  max_payload_bytes: 1024\n");
    let big = format!("\"{}\"", "x".repeat(2000));
    let body = format!(
        r#"{{"messages":[
            {{"topic":"bulk-a","payload":{{"k":1}}}},
            {{"topic":"bad topic","payload":1}},
            {{"topic":"bulk-b"}},
            {{"topic":"bulk-a","payload":{{"k":2}},"metadata":{{"m":"v"}}}},
            {{"topic":"bulk-c","payload":null}},
            {{"payload":3}},
            {{"topic":"bulk-d","payload":{big}}},
            {{"topic":"bulk-b","payload":"ok","ttl":60}},
            7
        ]}}"#
    );
    let resp = server.post_json("/api/v1/messages/bulk", &body);
    assert_eq!(resp.status, 207, "{resp:?}");
    let v = resp.json();
    let results = v["results"].as_array().expect("results");
    assert_eq!(results.len(), 9, "{v}");

    let accepted = |i: usize, topic: &str| {
        let r = &results[i];
        assert_eq!(r["status"], "accepted", "result {i}: {r}");
        assert_eq!(r["topic"], topic, "result {i}: {r}");
        parse_id(r["message_id"].as_str().expect("message_id"));
        assert_rfc3339_utc(&r["timestamp"]);
    };
    let rejected = |i: usize, topic: Value, code: &str| {
        let r = &results[i];
        assert_eq!(r["status"], "rejected", "result {i}: {r}");
        assert_eq!(r["topic"], topic, "result {i}: {r}");
        assert_eq!(r["error"], code, "result {i}: {r}");
        assert!(r["message"].is_string(), "result {i}: {r}");
    };
    accepted(0, "bulk-a");
    rejected(1, json!("bad topic"), "INVALID_TOPIC");
    rejected(2, json!("bulk-b"), "INVALID_REQUEST");
    accepted(3, "bulk-a");
    rejected(4, json!("bulk-c"), "INVALID_REQUEST");
    rejected(5, Value::Null, "INVALID_REQUEST");
    rejected(6, json!("bulk-d"), "PAYLOAD_TOO_LARGE");
    accepted(7, "bulk-b");
    rejected(8, Value::Null, "INVALID_REQUEST");
    assert_eq!(
        v["summary"],
        json!({"total": 9, "accepted": 3, "rejected": 6}),
        "{v}"
    );
    // Ids within a topic keep request order.
    let a0 = parse_id(results[0]["message_id"].as_str().expect("id"));
    let a3 = parse_id(results[3]["message_id"].as_str().expect("id"));
    assert!(a0 < a3);

    // Only the accepted ones were stored.
    let a = server.read_topic("bulk-a", "order=asc");
    assert_eq!(payload_ints_k(&a), vec![1, 2]);
    assert_eq!(a["messages"][1]["metadata"], json!({"m":"v"}));
    let b = server.read_topic("bulk-b", "");
    assert_eq!(b["total"], 1);
    assert_eq!(b["messages"][0]["payload"], "ok");
    for t in ["bulk-c", "bulk-d"] {
        assert_eq!(server.read_topic(t, "")["total"], 0, "{t}");
    }
}

fn payload_ints_k(page: &Value) -> Vec<i64> {
    page["messages"]
        .as_array()
        .expect("messages array")
        .iter()
        .map(|m| m["payload"]["k"].as_i64().expect("payload.k"))
        .collect()
}

#[test]
fn bulk_envelope_errors() {
    let server = Server::start("api:\n  max_bulk_messages: 3\n");
    let cases = [
        r#"{"messages":[]}"#,
        r#"{}"#,
        r#"{"messages":{"topic":"t","payload":1}}"#,
        r#"[{"topic":"t","payload":1}]"#,
        r#"{"messages":[{"topic":"t","payload":1},{"topic":"t","payload":1},{"topic":"t","payload":1},{"topic":"t","payload":1}]}"#,
        r#"{"messages":[{"topic":"t","payload":1}"#,
    ];
    for body in cases {
        let resp = server.post_json("/api/v1/messages/bulk", body);
        assert_eq!(resp.status, 400, "body {body}: {resp:?}");
        assert_error_body(&resp, "INVALID_REQUEST");
    }
    // None of them stored anything.
    assert_eq!(server.read_topic("t", "")["total"], 0);
    // Exactly the maximum is fine.
    let ok = r#"{"messages":[{"topic":"t","payload":1},{"topic":"t","payload":2},{"topic":"t","payload":3}]}"#;
    let resp = server.post_json("/api/v1/messages/bulk", ok);
    assert_eq!(resp.status, 207, "{resp:?}");
    assert_eq!(resp.json()["summary"]["accepted"], 3);
}

#[test]
fn topic_stats_and_not_found() {
    let server = Server::start("");
    let mut conn = server.connect();
    let mut ids = Vec::new();
    let mut stamps = Vec::new();
    for i in 0..3 {
        let ack = conn.publish("stats-topic", &format!(r#"{{"i":{i},"pad":"0123456789"}}"#));
        ids.push(ack["message_id"].as_str().expect("id").to_string());
        stamps.push(ack["timestamp"].clone());
    }
    let resp = conn.request("GET", "/api/v1/topics/stats-topic", None);
    assert_eq!(resp.status, 200, "{resp:?}");
    let s = resp.json();
    assert_eq!(s["topic"], "stats-topic");
    assert_eq!(s["length"], 3);
    assert_eq!(s["first_id"], ids[0].as_str());
    assert_eq!(s["last_id"], ids[2].as_str());
    assert_eq!(s["oldest_timestamp"], stamps[0]);
    assert_eq!(s["newest_timestamp"], stamps[2]);
    assert_rfc3339_utc(&s["oldest_timestamp"]);
    assert!(
        s["bytes"].as_u64().is_some_and(|b| b >= 3 * 20),
        "bytes should count at least the payloads: {s}"
    );

    let resp = conn.request("GET", "/api/v1/topics/never-published", None);
    assert_error_body(&resp, "NOT_FOUND");
    assert_eq!(resp.status, 404);
}

#[test]
fn list_topics_spans_shards_and_is_sorted() {
    let server = Server::start("");
    let names = topics("list", 20);
    assert_spans_shards(&names, 2);
    // Publish in reverse order to make the sort observable; topic i gets i+1 messages.
    let mut writer = server.connect();
    let mut last_ids = std::collections::BTreeMap::new();
    let mut first_ids = std::collections::BTreeMap::new();
    for (i, t) in names.iter().enumerate().rev() {
        for j in 0..=i {
            let ack = writer.publish(t, &j.to_string());
            let id = ack["message_id"].as_str().expect("id").to_string();
            first_ids.entry(t.clone()).or_insert_with(|| id.clone());
            last_ids.insert(t.clone(), id);
        }
    }
    // Read the list from several fresh connections: whichever shard accepts the connection
    // must answer for all shards.
    for _ in 0..4 {
        let resp = server.get("/api/v1/topics");
        assert_eq!(resp.status, 200, "{resp:?}");
        let v = resp.json();
        assert_eq!(v["total"], 20, "{v}");
        let list = v["topics"].as_array().expect("topics");
        let got: Vec<&str> = list
            .iter()
            .map(|t| t["topic"].as_str().expect("topic"))
            .collect();
        let want: Vec<&str> = names.iter().map(String::as_str).collect();
        assert_eq!(got, want, "topics not all present or not sorted");
        for (i, t) in list.iter().enumerate() {
            let name = &names[i];
            assert_eq!(t["length"], i + 1, "{t}");
            assert_eq!(t["first_id"], first_ids[name].as_str(), "{t}");
            assert_eq!(t["last_id"], last_ids[name].as_str(), "{t}");
        }
    }
}

#[test]
fn empty_topic_list() {
    let server = Server::start("");
    let v = server.get("/api/v1/topics").json();
    assert_eq!(v, json!({"topics": [], "total": 0}));
}

#[test]
fn trim_keeps_newest() {
    let server = Server::start("");
    let mut conn = server.connect();
    for i in 0..10 {
        conn.publish("trim-me", &format!(r#"{{"i":{i}}}"#));
    }
    let resp = conn.request(
        "POST",
        "/api/v1/topics/trim-me/trim",
        Some(br#"{"keep_count":3}"#),
    );
    assert_eq!(resp.status, 200, "{resp:?}");
    assert_eq!(resp.json(), json!({"topic":"trim-me","removed":7}));
    let page = server.read_topic("trim-me", "order=asc");
    assert_eq!(payload_ints(&page), vec![7, 8, 9]);
    assert_eq!(page["total"], 3);
    assert_eq!(server.get("/api/v1/topics/trim-me").json()["length"], 3);

    // Trimming to more than there are removes nothing.
    let resp = conn.request(
        "POST",
        "/api/v1/topics/trim-me/trim",
        Some(br#"{"keep_count":100}"#),
    );
    assert_eq!(resp.json()["removed"], 0, "{resp:?}");

    // Unknown topic.
    let resp = conn.request(
        "POST",
        "/api/v1/topics/no-such-topic/trim",
        Some(br#"{"keep_count":1}"#),
    );
    assert_error_body(&resp, "NOT_FOUND");
    assert_eq!(resp.status, 404);

    // Bad bodies.
    for body in [
        r#"{}"#,
        r#"{"keep_count":"3"}"#,
        r#"{"keep_count":-1}"#,
        r#"{"keep_count":1.5}"#,
        "not json",
    ] {
        let resp = conn.request("POST", "/api/v1/topics/trim-me/trim", Some(body.as_bytes()));
        assert_eq!(resp.status, 400, "body {body}: {resp:?}");
        assert_error_body(&resp, "INVALID_REQUEST");
    }
    assert_eq!(server.read_topic("trim-me", "")["total"], 3);
}

#[test]
fn delete_topic() {
    let server = Server::start("");
    let mut conn = server.connect();
    let first = conn.publish("doomed", "1");
    conn.publish("doomed", "2");
    conn.publish("survivor", "3");

    let resp = conn.request("DELETE", "/api/v1/topics/doomed", None);
    assert_eq!(resp.status, 204, "{resp:?}");
    assert!(resp.body.is_empty());

    // The connection is still usable (no stray body bytes), and the topic is gone.
    let resp = conn.request("GET", "/api/v1/topics/doomed", None);
    assert_eq!(resp.status, 404, "{resp:?}");
    let page = server.read_topic("doomed", "");
    assert_eq!(page["total"], 0);
    assert_eq!(page["messages"], json!([]));
    let list = server.get("/api/v1/topics").json();
    assert_eq!(list["total"], 1, "{list}");
    assert_eq!(list["topics"][0]["topic"], "survivor");

    let resp = conn.request("DELETE", "/api/v1/topics/doomed", None);
    assert_error_body(&resp, "NOT_FOUND");
    assert_eq!(resp.status, 404);

    // Publishing again recreates it, and ids never go backwards.
    let again = conn.publish("doomed", "4");
    assert!(
        parse_id(again["message_id"].as_str().expect("id"))
            > parse_id(first["message_id"].as_str().expect("id"))
    );
    assert_eq!(server.read_topic("doomed", "")["total"], 1);
}

#[test]
fn health_reports_storage() {
    let server = Server::start("memory:\n  max_bytes: 10000000\n");
    let h = server.health();
    assert_eq!(h["status"], "healthy", "{h}");
    assert_rfc3339_utc(&h["timestamp"]);
    assert!(h["version"].as_str().is_some_and(|v| !v.is_empty()), "{h}");
    assert_eq!(h["shards"], 2, "{h}");
    let st = &h["storage"];
    assert_eq!(st["backend"], "memory", "{h}");
    assert_eq!(st["topics"], 0, "{h}");
    assert_eq!(st["messages"], 0, "{h}");
    assert_eq!(st["bytes"], 0, "{h}");
    assert_eq!(st["max_bytes"], 10000000, "{h}");

    let names = topics("health", 20);
    let mut conn = server.connect();
    for t in &names {
        conn.publish(t, r#""0123456789""#);
        conn.publish(t, r#""0123456789""#);
    }
    let h = server.health();
    let st = &h["storage"];
    assert_eq!(st["topics"], 20, "{h}");
    assert_eq!(st["messages"], 40, "{h}");
    assert!(st["bytes"].as_u64().is_some_and(|b| b >= 40 * 12), "{h}");
}

#[test]
fn ready_reports_ready() {
    let server = Server::start("");
    let resp = server.get("/ready");
    assert_eq!(resp.status, 200, "{resp:?}");
    let v = resp.json();
    assert_eq!(v["ready"], true, "{v}");
    assert!(v["checks"].is_object(), "{v}");
}

#[test]
fn unknown_routes_are_not_found() {
    let server = Server::start("");
    for path in [
        "/",
        "/nope",
        "/api/v1",
        "/api/v2/messages",
        "/api/v1/topics/x/messages/extra",
        "/api/v1/topics/x/y",
        "/healthz",
    ] {
        let resp = server.get(path);
        assert_eq!(resp.status, 404, "GET {path}: {resp:?}");
        assert_error_body(&resp, "NOT_FOUND");
    }
}

#[test]
fn wrong_method_is_405_with_allow() {
    let server = Server::start("");
    let cases = [
        ("GET", "/api/v1/messages", "POST"),
        ("DELETE", "/api/v1/messages", "POST"),
        ("GET", "/api/v1/messages/bulk", "POST"),
        ("PUT", "/health", "GET"),
        ("POST", "/ready", "GET"),
        ("DELETE", "/api/v1/topics", "POST"),
        ("POST", "/api/v1/topics/x/messages", "GET"),
        ("GET", "/api/v1/topics/x/trim", "POST"),
        ("PATCH", "/api/v1/topics/x", "DELETE"),
    ];
    for (method, path, allowed) in cases {
        let body: Option<&[u8]> = if method == "GET" { None } else { Some(b"{}") };
        let resp = server.connect().request(method, path, body);
        assert_eq!(resp.status, 405, "{method} {path}: {resp:?}");
        assert_error_body(&resp, "METHOD_NOT_ALLOWED");
        let allow = resp
            .header("allow")
            .unwrap_or_else(|| panic!("{method} {path}: no Allow header: {resp:?}"));
        assert!(
            allow.split(',').any(|m| m.trim() == allowed),
            "{method} {path}: Allow {allow:?} lacks {allowed}"
        );
    }
}

#[test]
fn content_type_rules() {
    let server = Server::start("");
    let body = publish_body("ctype", "1");
    for ct in [
        "text/plain",
        "application/x-www-form-urlencoded",
        "application/xml",
    ] {
        let resp = server.connect().request_with(
            "POST",
            "/api/v1/messages",
            &[("Content-Type", ct)],
            Some(body.as_bytes()),
        );
        assert_eq!(resp.status, 415, "Content-Type {ct}: {resp:?}");
        assert_error_body(&resp, "UNSUPPORTED_MEDIA_TYPE");
    }
    assert_eq!(server.read_topic("ctype", "")["total"], 0);

    for ct in [
        "application/json",
        "application/json; charset=utf-8",
        "Application/JSON",
        "application/vnd.pulsar+json",
    ] {
        let resp = server.connect().request_with(
            "POST",
            "/api/v1/messages",
            &[("Content-Type", ct)],
            Some(body.as_bytes()),
        );
        assert_eq!(resp.status, 201, "Content-Type {ct}: {resp:?}");
    }
    // No Content-Type at all: refused too, since a cross-site `fetch` in no-cors mode can
    // send a body without one and no preflight. Build by hand, the helper adds one.
    let mut conn = server.connect();
    conn.send(
        format!(
            "POST /api/v1/messages HTTP/1.1\r\nHost: localhost\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        )
        .as_bytes(),
    );
    let resp = conn.read_response(false);
    assert_error_body(&resp, "UNSUPPORTED_MEDIA_TYPE");
    assert_eq!(server.read_topic("ctype", "")["total"], 4);

    // Bulk obeys the same rule.
    let resp = server.connect().request_with(
        "POST",
        "/api/v1/messages/bulk",
        &[("Content-Type", "text/plain")],
        Some(br#"{"messages":[{"topic":"ctype","payload":1}]}"#),
    );
    assert_error_body(&resp, "UNSUPPORTED_MEDIA_TYPE");
}

#[test]
fn per_message_payload_limit() {
    let server = Server::start("api:\n  max_payload_bytes: 1024\n");
    // 1000-char string payload = 1002 bytes of JSON: fits.
    let ok = format!("\"{}\"", "y".repeat(1000));
    let resp = server.post_json("/api/v1/messages", &publish_body("sized", &ok));
    assert_eq!(resp.status, 201, "{resp:?}");
    let big = format!("\"{}\"", "y".repeat(2000));
    let resp = server.post_json("/api/v1/messages", &publish_body("sized", &big));
    assert_eq!(resp.status, 413, "{resp:?}");
    assert_error_body(&resp, "PAYLOAD_TOO_LARGE");
    assert_eq!(server.read_topic("sized", "")["total"], 1);
}

#[test]
fn invalid_publish_bodies() {
    let server = Server::start("");
    let cases = [
        "",
        "not json",
        "{",
        r#"[{"topic":"t","payload":1}]"#,
        r#""a string""#,
        r#"{"payload":1}"#,
        r#"{"topic":"t"}"#,
        r#"{"topic":"t","payload":null}"#,
        r#"{"topic":5,"payload":1}"#,
        r#"{"topic":null,"payload":1}"#,
        r#"{"topic":"t","payload":1,"ttl":0}"#,
        r#"{"topic":"t","payload":1,"ttl":-5}"#,
        r#"{"topic":"t","payload":1,"ttl":"10"}"#,
        r#"{"topic":"t","payload":1,"metadata":"m"}"#,
        r#"{"topic":"t","payload":1,"metadata":["a"]}"#,
        r#"{"topic":"t","payload":1,"metadata":{"k":1}}"#,
        r#"{"topic":"t","payload":1} trailing"#,
    ];
    let mut conn = server.connect();
    for body in cases {
        let resp = conn.request("POST", "/api/v1/messages", Some(body.as_bytes()));
        assert_eq!(resp.status, 400, "body {body:?}: {resp:?}");
        assert_error_body(&resp, "INVALID_REQUEST");
    }
    assert_eq!(server.read_topic("t", "")["total"], 0);
    // The connection survived all of those.
    conn.publish("t", "1");
}

#[test]
fn invalid_topics_in_body_and_path() {
    let server = Server::start("");
    let long = "a".repeat(256);
    for topic in ["", "a b", "a/b", "ü", "a:b", "a*", long.as_str()] {
        let body = json!({"topic": topic, "payload": 1}).to_string();
        let resp = server.post_json("/api/v1/messages", &body);
        assert_eq!(resp.status, 400, "topic {topic:?}: {resp:?}");
        assert_error_body(&resp, "INVALID_TOPIC");
    }
    // Boundary: 255 chars and the full alphabet are fine.
    let max = "b".repeat(255);
    server.publish(&max, "1");
    server.publish("Az09._-", "1");
    assert_eq!(server.read_topic(&max, "")["total"], 1);
    assert_eq!(server.get("/api/v1/topics/Az09._-").json()["length"], 1);

    let long_path = "c".repeat(256);
    for bad in ["a%20b", "a%2Fb", "%C3%BC", long_path.as_str()] {
        for (method, path, body) in [
            ("GET", format!("/api/v1/topics/{bad}/messages"), None),
            ("GET", format!("/api/v1/topics/{bad}"), None),
            ("DELETE", format!("/api/v1/topics/{bad}"), None),
            (
                "POST",
                format!("/api/v1/topics/{bad}/trim"),
                Some(&br#"{"keep_count":1}"#[..]),
            ),
        ] {
            let resp = server.connect().request(method, &path, body);
            assert_eq!(resp.status, 400, "{method} {path}: {resp:?}");
            assert_error_body(&resp, "INVALID_TOPIC");
        }
    }
    // A percent-encoded valid name is the same topic.
    assert_eq!(server.read_topic("Az09%2E_-", "")["total"], 1);
}

#[test]
fn bad_read_queries() {
    let server = Server::start("");
    server.publish("q", "1");
    for query in [
        "limit=abc",
        "limit=-1",
        "limit=",
        "limit=1.5",
        "order=sideways",
        "order=",
        "order=ASCENDING",
    ] {
        let resp = server.get(&format!("/api/v1/topics/q/messages?{query}"));
        assert_eq!(resp.status, 400, "?{query}: {resp:?}");
        assert_error_body(&resp, "INVALID_REQUEST");
    }
    for query in [
        "cursor=abc",
        "cursor=1-",
        "cursor=-1",
        "cursor=1-2-3",
        "cursor=x-1",
        "since=garbage",
        "cursor=99999999999999999999999-0",
    ] {
        let resp = server.get(&format!("/api/v1/topics/q/messages?{query}"));
        assert_eq!(resp.status, 400, "?{query}: {resp:?}");
        assert_error_body(&resp, "INVALID_CURSOR");
    }
    // Over the maximum: either rejected or clamped, never more than 1000.
    let resp = server.get("/api/v1/topics/q/messages?limit=5000");
    match resp.status {
        400 => assert_error_body(&resp, "INVALID_REQUEST"),
        200 => assert!(resp.json()["limit"].as_u64().is_some_and(|l| l <= 1000)),
        _ => panic!("limit=5000: {resp:?}"),
    }
    // Unknown parameters are ignored.
    let resp = server.get("/api/v1/topics/q/messages?foo=bar&limit=1");
    assert_eq!(resp.status, 200, "{resp:?}");
}

#[test]
fn unknown_topic_reads_empty() {
    let server = Server::start("");
    let page = server.read_topic("ghost", "");
    assert_eq!(page["messages"], json!([]), "{page}");
    assert_eq!(page["total"], 0);
    assert!(page["next_cursor"].is_null(), "{page}");
    assert!(page["cursor"].is_null(), "{page}");
    let page = server.read_topic("ghost", "order=asc&limit=5&cursor=1-0");
    assert_eq!(page["messages"], json!([]), "{page}");
    assert_eq!(page["cursor"], "1-0", "{page}");
    assert!(page["next_cursor"].is_null(), "{page}");
}

#[test]
fn read_defaults_are_desc_limit_10() {
    let server = Server::start("");
    let mut conn = server.connect();
    let mut ids = Vec::new();
    for i in 0..15 {
        let ack = conn.publish("defaults", &format!(r#"{{"i":{i}}}"#));
        ids.push(ack["message_id"].as_str().expect("id").to_string());
    }
    let page = server.read_topic("defaults", "");
    assert_eq!(page["limit"], 10, "{page}");
    assert_eq!(page["order"], "desc", "{page}");
    assert!(page["cursor"].is_null(), "{page}");
    assert_eq!(page["total"], 15, "{page}");
    assert_eq!(payload_ints(&page), (5..15).rev().collect::<Vec<i64>>());
    assert_eq!(page["next_cursor"], ids[5].as_str(), "{page}");
    for m in page["messages"].as_array().expect("messages") {
        assert_eq!(m["topic"], "defaults");
        assert_rfc3339_utc(&m["timestamp"]);
    }
}

/// Follows `next_cursor` from the start in `order`, returning each page's payload ints and
/// asserting the page invariants along the way.
fn walk(server: &Server, topic: &str, order: &str, limit: usize, key: &str) -> Vec<Vec<i64>> {
    let mut pages = Vec::new();
    let mut cursor: Option<String> = None;
    loop {
        let query = match &cursor {
            Some(c) => format!("order={order}&limit={limit}&{key}={c}"),
            None => format!("order={order}&limit={limit}"),
        };
        let page = server.read_topic(topic, &query);
        assert_eq!(page["order"], order, "{page}");
        assert_eq!(page["limit"], limit, "{page}");
        match &cursor {
            Some(c) => assert_eq!(page["cursor"], c.as_str(), "{page}"),
            None => assert!(page["cursor"].is_null(), "{page}"),
        }
        let ids = ids_of(&page);
        assert!(ids.len() <= limit);
        pages.push(payload_ints(&page));
        assert!(pages.len() <= 100, "pagination does not terminate");
        match page["next_cursor"].as_str() {
            Some(next) => {
                assert_eq!(ids.len(), limit, "short page with a next_cursor: {page}");
                assert_eq!(Some(next), ids.last().map(String::as_str), "{page}");
                cursor = Some(next.to_string());
            }
            None => return pages,
        }
    }
}

#[test]
fn pagination_both_orders_with_cursors() {
    let server = Server::start("");
    let mut conn = server.connect();
    let mut ids = Vec::new();
    for i in 0..25 {
        let ack = conn.publish("pages", &format!(r#"{{"i":{i}}}"#));
        assert_eq!(ack["topic"], "pages");
        ids.push(ack["message_id"].as_str().expect("id").to_string());
    }
    assert_strictly_increasing(&ids);

    let asc = walk(&server, "pages", "asc", 10, "cursor");
    assert_eq!(
        asc,
        vec![
            (0..10).collect::<Vec<i64>>(),
            (10..20).collect(),
            (20..25).collect()
        ]
    );
    let desc = walk(&server, "pages", "desc", 10, "cursor");
    assert_eq!(
        desc,
        vec![
            (15..25).rev().collect::<Vec<i64>>(),
            (5..15).rev().collect(),
            (0..5).rev().collect()
        ]
    );
    // `since` is an alias of `cursor`.
    assert_eq!(walk(&server, "pages", "asc", 10, "since"), asc);

    // An exact multiple of the limit: the last full page has no next_cursor.
    let fives = walk(&server, "pages", "asc", 5, "cursor");
    assert_eq!(fives.len(), 5, "{fives:?}");
    assert_eq!(fives.concat(), (0..25).collect::<Vec<i64>>());
    let fives = walk(&server, "pages", "desc", 5, "cursor");
    assert_eq!(fives.len(), 5, "{fives:?}");
    assert_eq!(fives.concat(), (0..25).rev().collect::<Vec<i64>>());

    // The cursor is exclusive in both directions, starting from the middle.
    let page = server.read_topic("pages", &format!("order=asc&limit=3&cursor={}", ids[12]));
    assert_eq!(payload_ints(&page), vec![13, 14, 15]);
    let page = server.read_topic("pages", &format!("order=desc&limit=3&cursor={}", ids[12]));
    assert_eq!(payload_ints(&page), vec![11, 10, 9]);
    // Past either end: empty, no next_cursor.
    let page = server.read_topic("pages", &format!("order=asc&cursor={}", ids[24]));
    assert_eq!(page["messages"], json!([]));
    assert!(page["next_cursor"].is_null());
    let page = server.read_topic("pages", &format!("order=desc&cursor={}", ids[0]));
    assert_eq!(page["messages"], json!([]));
    assert!(page["next_cursor"].is_null());
    // A well-formed cursor that is not an id of this topic still positions the read.
    let page = server.read_topic("pages", "order=asc&limit=1000&cursor=0-0");
    assert_eq!(payload_ints(&page).len(), 25);
    assert_eq!(ids_of(&page), ids);
    assert!(page["next_cursor"].is_null());
    let page = server.read_topic("pages", "order=asc&limit=25");
    assert!(page["next_cursor"].is_null(), "{page}");
}

#[test]
fn ids_strictly_increase_under_rapid_publishing() {
    let server = Server::start("");
    let mut conn = server.connect();
    // Pipeline 200 publishes in one write so many land within the same millisecond.
    let mut bytes = Vec::new();
    for i in 0..200 {
        bytes.extend(common::build_request(
            "POST",
            "/api/v1/messages",
            &[],
            Some(publish_body("rapid", &i.to_string()).as_bytes()),
        ));
    }
    conn.send(&bytes);
    let ids: Vec<String> = conn
        .read_responses(200)
        .into_iter()
        .map(|r| {
            assert_eq!(r.status, 201, "{r:?}");
            r.json()["message_id"].as_str().expect("id").to_string()
        })
        .collect();
    assert_strictly_increasing(&ids);
    let page = server.read_topic("rapid", "order=asc&limit=1000");
    assert_eq!(ids_of(&page), ids);
}

#[test]
fn ttl_expires_messages() {
    let server = Server::start("");
    let mut conn = server.connect();
    let resp = conn.request(
        "POST",
        "/api/v1/messages",
        Some(br#"{"topic":"ttl","payload":"short-lived","ttl":1}"#),
    );
    assert_eq!(resp.status, 201, "{resp:?}");
    conn.publish("ttl", r#""forever""#);
    let resp = conn.request(
        "POST",
        "/api/v1/messages",
        Some(br#"{"topic":"ttl","payload":"long-lived","ttl":3600}"#),
    );
    assert_eq!(resp.status, 201, "{resp:?}");

    let payloads = server.all_payloads("ttl");
    assert!(
        payloads.contains(&json!("short-lived")),
        "ttl message not readable right away: {payloads:?}"
    );
    let gone = eventually(Duration::from_secs(5), || {
        !server.all_payloads("ttl").contains(&json!("short-lived"))
    });
    assert!(gone, "ttl=1 message still readable after 5 s");
    // Also absent from the descending read path and a cursor read.
    let page = server.read_topic("ttl", "order=desc&limit=100");
    let left: Vec<&Value> = page["messages"]
        .as_array()
        .expect("messages")
        .iter()
        .map(|m| &m["payload"])
        .collect();
    assert_eq!(left, vec![&json!("long-lived"), &json!("forever")]);
}

#[test]
fn head_matches_get_without_body() {
    let server = Server::start("");
    server.publish("headed", r#"{"a":1}"#);
    let mut conn = server.connect();
    for path in [
        "/api/v1/topics/headed/messages",
        "/api/v1/topics/headed",
        "/api/v1/topics",
        "/ready",
        "/nope",
    ] {
        let get = conn.request("GET", path, None);
        let head = conn.request("HEAD", path, None);
        assert_eq!(head.status, get.status, "HEAD {path}: {head:?}");
        assert!(head.body.is_empty());
        assert_eq!(
            head.header("content-length"),
            Some(get.body.len().to_string().as_str()),
            "HEAD {path} Content-Length: {head:?}\nGET: {get:?}"
        );
        assert_eq!(head.header("content-type"), get.header("content-type"));
    }
    // HEAD /health too (its body varies, so only the status and a length are checked).
    let head = conn.request("HEAD", "/health", None);
    assert_eq!(head.status, 200, "{head:?}");
    assert!(head.header("content-length").is_some(), "{head:?}");
    // No body bytes leaked onto the connection: the next request parses cleanly.
    let resp = conn.request("GET", "/api/v1/topics/headed", None);
    assert_eq!(resp.status, 200, "{resp:?}");
    assert!(!conn.has_buffered());
}

#[test]
fn topics_published_on_one_connection_are_read_on_others() {
    let server = Server::start("");
    let names = topics("owned", 24);
    assert_spans_shards(&names, 2);
    let mut writer = server.connect();
    let mut acks = Vec::new();
    for t in &names {
        acks.push(writer.publish(t, &format!(r#"{{"t":"{t}"}}"#)));
    }
    // Several reader connections, so readers land on both shards whatever the accept policy.
    let mut readers: Vec<_> = (0..4).map(|_| server.connect()).collect();
    for (i, t) in names.iter().enumerate() {
        let reader = &mut readers[i % 4];
        let resp = reader.request("GET", &format!("/api/v1/topics/{t}/messages"), None);
        assert_eq!(resp.status, 200, "{resp:?}");
        let page = resp.json();
        assert_eq!(page["total"], 1, "topic {t}: {page}");
        assert_eq!(page["messages"][0]["payload"], json!({"t": t}));
        assert_eq!(page["messages"][0]["message_id"], acks[i]["message_id"]);
        let resp = reader.request("GET", &format!("/api/v1/topics/{t}"), None);
        assert_eq!(resp.status, 200, "{resp:?}");
    }
    assert_eq!(server.health()["storage"]["topics"], 24);
}

#[test]
fn concurrent_publishers_to_shared_topics() {
    let server = Server::start("");
    let names = topics("shared", 3);
    let addr = server.addr;
    let workers: Vec<_> = (0..4)
        .map(|w| {
            let names = names.clone();
            std::thread::spawn(move || {
                let mut conn = common::Conn::connect(addr);
                let mut acks: Vec<(usize, String)> = Vec::new();
                for i in 0..90 {
                    let k = i % names.len();
                    let ack = conn.publish(&names[k], &format!(r#"{{"w":{w},"i":{i}}}"#));
                    acks.push((k, ack["message_id"].as_str().expect("id").to_string()));
                }
                acks
            })
        })
        .collect();
    let mut acked: Vec<Vec<String>> = vec![Vec::new(); names.len()];
    for handle in workers {
        let acks = handle.join().expect("publisher thread panicked");
        // Each publisher sees its own ids per topic strictly increase.
        let mut mine: Vec<Vec<String>> = vec![Vec::new(); names.len()];
        for (k, id) in acks {
            mine[k].push(id);
        }
        for ids in &mine {
            assert_strictly_increasing(ids);
        }
        for (k, ids) in mine.into_iter().enumerate() {
            acked[k].extend(ids);
        }
    }
    for (k, t) in names.iter().enumerate() {
        let page = server.read_topic(t, "order=asc&limit=1000");
        let ids = ids_of(&page);
        assert_eq!(ids.len(), 120, "topic {t}");
        assert_strictly_increasing(&ids);
        let mut want = acked[k].clone();
        want.sort_by_key(|id| parse_id(id));
        assert_eq!(
            ids, want,
            "topic {t}: stored ids differ from acknowledged ids"
        );
    }
}

/// Publishes `live` plain messages then `expiring` ttl=1 messages (the newest), and waits
/// until only the plain ones are readable.
fn publish_then_expire_newest(server: &Server, topic: &str, live: i64, expiring: i64) {
    let mut conn = server.connect();
    for i in 0..live {
        conn.publish(topic, &format!(r#"{{"i":{i}}}"#));
    }
    for i in 0..expiring {
        let body = format!(
            r#"{{"topic":"{topic}","payload":{{"i":{}}},"ttl":1}}"#,
            1000 + i
        );
        let resp = conn.request("POST", "/api/v1/messages", Some(body.as_bytes()));
        assert_eq!(resp.status, 201, "{resp:?}");
    }
    let expired = eventually(Duration::from_secs(5), || {
        payload_ints(&server.read_topic(topic, "order=asc&limit=1000")).len() == live as usize
    });
    assert!(expired, "ttl=1 messages still readable after 5 s");
}

#[test]
fn pagination_skips_expired_messages() {
    let server = Server::start("");
    // Interleave live and expiring messages so expired ones sit inside and at both ends.
    let mut conn = server.connect();
    for i in 0..10 {
        let body = format!(
            r#"{{"topic":"holes","payload":{{"i":{}}},"ttl":1}}"#,
            100 + i
        );
        let resp = conn.request("POST", "/api/v1/messages", Some(body.as_bytes()));
        assert_eq!(resp.status, 201, "{resp:?}");
        conn.publish("holes", &format!(r#"{{"i":{i}}}"#));
    }
    let resp = conn.request(
        "POST",
        "/api/v1/messages",
        Some(br#"{"topic":"holes","payload":{"i":200},"ttl":1}"#),
    );
    assert_eq!(resp.status, 201, "{resp:?}");
    let expired = eventually(Duration::from_secs(5), || {
        payload_ints(&server.read_topic("holes", "order=asc&limit=1000")).len() == 10
    });
    assert!(expired, "ttl=1 messages still readable after 5 s");
    assert_eq!(
        walk(&server, "holes", "asc", 5, "cursor"),
        vec![(0..5).collect::<Vec<i64>>(), (5..10).collect()]
    );
    assert_eq!(
        walk(&server, "holes", "desc", 3, "cursor"),
        vec![vec![9, 8, 7], vec![6, 5, 4], vec![3, 2, 1], vec![0]]
    );
}

#[test]
fn trim_keeps_the_newest_live_messages() {
    let server = Server::start("");
    publish_then_expire_newest(&server, "trim-expired", 8, 4);
    let resp = server.post_json("/api/v1/topics/trim-expired/trim", r#"{"keep_count":3}"#);
    assert_eq!(resp.status, 200, "{resp:?}");
    // Expired messages are gone already; keeping 3 keeps the 3 newest readable ones.
    let page = server.read_topic("trim-expired", "order=asc&limit=1000");
    assert_eq!(
        payload_ints(&page),
        vec![5, 6, 7],
        "trim kept expired messages in place of live ones: {page}"
    );
}
