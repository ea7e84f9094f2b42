//! `/metrics`: values move with traffic, the exposition is well-formed Prometheus text 0.0.4,
//! the optional metrics-only listener, opt-in per-topic series, and every metric the shipped
//! Grafana dashboard queries exists.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::net::{TcpListener, TcpStream};

use common::valkey::{ValkeyOpts, ValkeyServer};
use common::{Conn, RelayOpts, Server};
use tungstenite::Message;

/// One parsed sample: metric name, labels, value.
#[derive(Debug, Clone, PartialEq)]
struct Sample {
    name: String,
    labels: BTreeMap<String, String>,
    value: f64,
}

/// A strict parser for the text format: every sample's metric family must have `# HELP` and
/// `# TYPE` lines before it, label values must be properly escaped, values must parse.
fn parse_exposition(text: &str) -> Vec<Sample> {
    let mut typed: BTreeMap<String, String> = BTreeMap::new();
    let mut helped: BTreeSet<String> = BTreeSet::new();
    let mut samples = Vec::new();
    for (n, line) in text.lines().enumerate() {
        let at = || format!("line {}: {line:?}", n + 1);
        if let Some(rest) = line.strip_prefix("# HELP ") {
            let (name, help) = rest.split_once(' ').unwrap_or_else(|| panic!("{}", at()));
            assert!(!help.is_empty(), "{}", at());
            helped.insert(name.to_string());
            continue;
        }
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, kind) = rest.split_once(' ').unwrap_or_else(|| panic!("{}", at()));
            assert!(
                ["counter", "gauge", "histogram", "summary", "untyped"].contains(&kind),
                "{}",
                at()
            );
            assert!(
                typed.insert(name.to_string(), kind.to_string()).is_none(),
                "TYPE twice: {}",
                at()
            );
            continue;
        }
        assert!(!line.starts_with('#') && !line.is_empty(), "{}", at());
        let name_end = line.find(['{', ' ']).unwrap_or_else(|| panic!("{}", at()));
        let name = &line[..name_end];
        assert!(
            name.chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':'),
            "{}",
            at()
        );
        let mut labels = BTreeMap::new();
        let mut rest = &line[name_end..];
        if let Some(after) = rest.strip_prefix('{') {
            let mut chars = after.char_indices().peekable();
            let end;
            loop {
                // label name
                let start = match chars.peek() {
                    Some((_, '}')) => {
                        end = chars.next().map(|(i, _)| i);
                        break;
                    }
                    Some((i, _)) => *i,
                    None => panic!("unterminated labels: {}", at()),
                };
                let eq = after[start..]
                    .find('=')
                    .unwrap_or_else(|| panic!("{}", at()))
                    + start;
                let key = &after[start..eq];
                assert!(after[eq + 1..].starts_with('"'), "{}", at());
                while chars.peek().is_some_and(|(i, _)| *i <= eq + 1) {
                    chars.next();
                }
                let mut value = String::new();
                loop {
                    match chars.next() {
                        Some((_, '\\')) => match chars.next() {
                            Some((_, 'n')) => value.push('\n'),
                            Some((_, '\\')) => value.push('\\'),
                            Some((_, '"')) => value.push('"'),
                            other => panic!("bad escape {other:?}: {}", at()),
                        },
                        Some((_, '"')) => break,
                        Some((_, c)) => value.push(c),
                        None => panic!("unterminated value: {}", at()),
                    }
                }
                labels.insert(key.to_string(), value);
                if chars.peek().is_some_and(|(_, c)| *c == ',') {
                    chars.next();
                }
            }
            let end = end.unwrap_or_else(|| panic!("{}", at()));
            rest = &after[end + 1..];
        }
        let value: f64 = rest
            .trim()
            .parse()
            .unwrap_or_else(|_| panic!("bad value: {}", at()));
        let family = ["_bucket", "_sum", "_count"]
            .iter()
            .find_map(|s| {
                name.strip_suffix(s)
                    .filter(|f| typed.get(*f).is_some_and(|k| k == "histogram"))
            })
            .unwrap_or(name);
        assert!(
            typed.contains_key(family),
            "sample before its TYPE: {}",
            at()
        );
        assert!(helped.contains(family), "sample without HELP: {}", at());
        samples.push(Sample {
            name: name.to_string(),
            labels,
            value,
        });
    }
    samples
}

fn metric(samples: &[Sample], name: &str, labels: &[(&str, &str)]) -> f64 {
    samples
        .iter()
        .filter(|s| {
            s.name == name
                && labels
                    .iter()
                    .all(|(k, v)| s.labels.get(*k).map(String::as_str) == Some(*v))
        })
        .map(|s| s.value)
        .sum()
}

fn scrape(server: &Server) -> Vec<Sample> {
    let response = server.get("/metrics");
    assert_eq!(response.status, 200);
    assert!(
        response
            .header("content-type")
            .is_some_and(|t| t.starts_with("text/plain; version=0.0.4")),
        "{:?}",
        response.header("content-type")
    );
    parse_exposition(&response.text())
}

#[test]
fn counters_move_with_traffic_and_histograms_are_consistent() {
    let server = Server::start("");
    let before = scrape(&server);
    assert_eq!(metric(&before, "relay_build_info", &[]), 1.0);
    for i in 0..5 {
        server.publish(&format!("m-{i}"), "{\"i\":1}");
    }
    let bad = server.post_json("/api/v1/messages", r#"{"topic":"bad topic","payload":1}"#);
    assert_eq!(bad.status, 400);
    let bulk = server.post_json(
        "/api/v1/messages/bulk",
        r#"{"messages":[{"topic":"b","payload":1},{"topic":"b c","payload":2}]}"#,
    );
    assert_eq!(bulk.status, 207);

    // One delivery over each transport.
    let stream = TcpStream::connect(server.addr).expect("connect");
    let (mut ws, _) =
        tungstenite::client::client(format!("ws://{}/ws", server.addr), stream).expect("ws");
    ws.send(Message::text(r#"{"type":"subscribe","topics":["live"]}"#))
        .expect("send");
    assert!(ws
        .read()
        .expect("subscribed")
        .to_string()
        .contains("subscribed"));
    server.publish("live", "1");
    assert!(ws
        .read()
        .expect("message")
        .to_string()
        .contains("\"message\""));
    let poll = server.post_json(
        "/messages/poll",
        r#"{"topics":["live"],"since":{},"timeout":1}"#,
    );
    assert_eq!(poll.json()["messages"].as_array().map(Vec::len), Some(1));

    let after = scrape(&server);
    let received =
        |s: &[Sample], t| metric(s, "relay_messages_received_total", &[("transport", t)]);
    assert_eq!(
        received(&after, "http_single") - received(&before, "http_single"),
        7.0
    );
    assert_eq!(
        received(&after, "http_bulk") - received(&before, "http_bulk"),
        2.0
    );
    assert_eq!(
        metric(
            &after,
            "relay_messages_rejected_total",
            &[("reason", "INVALID_TOPIC")]
        ),
        2.0
    );
    assert_eq!(
        metric(
            &after,
            "relay_messages_delivered_total",
            &[("transport", "websocket")]
        ),
        1.0
    );
    assert_eq!(
        metric(
            &after,
            "relay_messages_delivered_total",
            &[("transport", "longpoll")]
        ),
        1.0
    );
    assert_eq!(
        metric(&after, "relay_connections", &[("transport", "websocket")]),
        1.0
    );
    assert_eq!(
        metric(
            &after,
            "relay_http_requests_total",
            &[("route", "publish"), ("status", "201")]
        ),
        6.0
    );
    assert!(metric(&after, "relay_hot_tier_messages", &[]) >= 7.0);
    assert_eq!(metric(&after, "relay_topics", &[]), 7.0);
    // 6 accepted single publishes + 1 bulk with an accepted item.
    assert_eq!(
        metric(&after, "relay_publish_duration_seconds_count", &[]),
        7.0
    );
    assert_eq!(metric(&after, "relay_delivery_lag_seconds_count", &[]), 1.0);
    for family in [
        "relay_publish_duration_seconds",
        "relay_delivery_lag_seconds",
        "relay_valkey_pipeline_batch_size",
    ] {
        let buckets: Vec<&Sample> = after
            .iter()
            .filter(|s| s.name == format!("{family}_bucket"))
            .collect();
        assert!(
            buckets.windows(2).all(|w| w[0].value <= w[1].value),
            "{family} buckets not cumulative"
        );
        let inf = buckets
            .iter()
            .find(|s| s.labels.get("le").map(String::as_str) == Some("+Inf"));
        assert_eq!(
            inf.map(|s| s.value),
            Some(metric(&after, &format!("{family}_count"), &[])),
            "{family}"
        );
    }
    assert_eq!(
        after
            .iter()
            .filter(|s| s.name == "relay_shard_busy_ratio")
            .count(),
        2
    );
}

#[test]
fn valkey_failures_are_counted() {
    let mut valkey = ValkeyServer::start(ValkeyOpts::default());
    let server = valkey.start_relay(
        "valkey:\n  command_timeout: 1s\n  connect_timeout: 1s\n",
        &[],
    );
    server.publish("vk", "1");
    let before = scrape(&server);
    assert!(metric(&before, "relay_valkey_operations_total", &[("op", "xadd")]) >= 1.0);
    assert!(metric(&before, "relay_valkey_pipeline_batch_size_count", &[]) >= 1.0);
    assert_eq!(metric(&before, "relay_valkey_connected", &[]), 2.0);
    valkey.stop();
    let failed = server.post_json("/api/v1/messages", r#"{"topic":"vk","payload":2}"#);
    assert_eq!(failed.status, 503);
    let after = scrape(&server);
    let errors = |s: &[Sample]| metric(s, "relay_valkey_errors_total", &[]);
    assert!(
        errors(&after) > errors(&before),
        "errors did not move: {}",
        errors(&after)
    );
    assert_eq!(
        metric(
            &after,
            "relay_messages_rejected_total",
            &[("reason", "SERVICE_UNAVAILABLE")]
        ),
        1.0
    );
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port")
}

#[test]
fn separate_metrics_listener_serves_only_metrics() {
    let port = free_port();
    let server = Server::start_opts(RelayOpts::new(&format!(
        "metrics:\n  listen: \"127.0.0.1:{port}\"\n"
    )));
    let addr = format!("127.0.0.1:{port}").parse().expect("addr");
    let mut conn = Conn::connect(addr);
    let response = conn.request("GET", "/metrics", None);
    assert_eq!(response.status, 200);
    parse_exposition(&response.text());
    let refused = conn.request("GET", "/health", None);
    assert_eq!(refused.status, 404, "{}", refused.text());
    // The API port still serves metrics too.
    assert_eq!(server.get("/metrics").status, 200);
}

#[test]
fn per_topic_series_are_opt_in_and_capped() {
    let plain = Server::start("");
    plain.publish("solo", "1");
    assert!(!plain
        .get("/metrics")
        .text()
        .contains("relay_topic_messages_received_total"));

    let server = Server::start("metrics:\n  per_topic: true\n  max_topic_series: 3\n");
    for topic in ["a", "b", "c", "d", "e"] {
        server.publish(topic, "1");
    }
    let samples = scrape(&server);
    let series: Vec<&Sample> = samples
        .iter()
        .filter(|s| s.name == "relay_topic_messages_received_total")
        .collect();
    let total: f64 = series.iter().map(|s| s.value).sum();
    assert_eq!(total, 5.0);
    // At most 3 series per shard, 2 shards.
    assert!(series.len() <= 6, "{series:?}");
    assert!(
        series
            .iter()
            .any(|s| s.labels.get("topic").map(String::as_str) == Some("_other"))
            || series.len() == 5
    );
}

#[test]
fn every_dashboard_metric_exists() {
    let dashboard = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/deploy/grafana/dashboards/pulsar-relay.json"
    ))
    .expect("the shipped Grafana dashboard");
    let json: serde_json::Value = serde_json::from_str(&dashboard).expect("dashboard JSON parses");
    let mut exprs = Vec::new();
    collect_exprs(&json, &mut exprs);
    assert!(!exprs.is_empty(), "no panel queries found");
    let mut used = BTreeSet::new();
    for expr in &exprs {
        let bytes = expr.as_bytes();
        let mut i = 0;
        while let Some(pos) = expr[i..].find("relay_") {
            let start = i + pos;
            let mut end = start;
            while end < bytes.len() && (bytes[end].is_ascii_alphanumeric() || bytes[end] == b'_') {
                end += 1;
            }
            used.insert(expr[start..end].to_string());
            i = end;
        }
    }
    // Traffic on every path so labelled families have samples.
    let server = Server::start("");
    server.publish("dash", "1");
    let text = server.get("/metrics").text();
    let samples = parse_exposition(&text);
    let families: BTreeSet<String> = text
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.split(' ').next())
        .map(str::to_string)
        .collect();
    for name in &used {
        let family = ["_bucket", "_sum", "_count"]
            .iter()
            .find_map(|s| name.strip_suffix(s))
            .filter(|f| families.contains(*f))
            .unwrap_or(name);
        assert!(
            families.contains(family),
            "dashboard uses {name}, which /metrics does not expose"
        );
    }
    assert!(!samples.is_empty());
    assert!(used.len() >= 10, "the dashboard queries only {used:?}");
}

fn collect_exprs(value: &serde_json::Value, out: &mut Vec<String>) {
    match value {
        serde_json::Value::Object(map) => {
            for (k, v) in map {
                if k == "expr" {
                    if let Some(s) = v.as_str() {
                        out.push(s.to_string());
                    }
                } else {
                    collect_exprs(v, out);
                }
            }
        }
        serde_json::Value::Array(items) => items.iter().for_each(|v| collect_exprs(v, out)),
        _ => {}
    }
}

#[test]
fn exposition_parser_rejects_malformed_text() {
    // The parser must be able to fail, or the tests above prove nothing.
    for bad in [
        "relay_x 1\n",                                                  // no TYPE/HELP
        "# HELP relay_x h\n# TYPE relay_x counter\nrelay_x{a=\"b} 1\n", // unterminated label
        "# HELP relay_x h\n# TYPE relay_x counter\nrelay_x nope\n",     // bad value
    ] {
        let result = std::panic::catch_unwind(|| parse_exposition(bad));
        assert!(result.is_err(), "accepted: {bad:?}");
    }
}
