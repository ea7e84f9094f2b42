//! Black-box tests of the shipped load-balancer configuration (`deploy/cluster/nginx.conf`):
//! the real nginx in front of three real relays on a real Valkey Cluster, every client request
//! going through nginx.
//!
//! Owns: what a client of the load balancer sees on every transport (publish and history,
//! WebSocket, Server-Sent Events, long-poll), across a `kill -9` of a relay (requests keep
//! succeeding, a WebSocket consumer reconnects through nginx and resumes from its last id
//! without loss), and which publishes nginx resends to another relay (only keyed ones, once
//! sent). Does not own: the relays' multi-relay semantics (tests of their own), the
//! compose file (scripts/validate-deploy).
//!
//! The relays run on a Valkey Cluster of three masters, every node a seed
//! (`VALKEY_CLUSTER_NODES`), as in the compose stack; without its replicas, which this test
//! does not exercise (`tests/valkey_cluster.rs` owns failover) and which would only load a
//! two-core CI machine.
//!
//! Messages cross relays (issue 12 item 1): nginx spreads the publishes over all three relays,
//! and while the WebSocket and SSE consumers hold two of them, `least_conn` sends the live
//! publishes to the third, so what the consumers get live was accepted by another relay (the
//! access log shows which); a resume after a `kill -9` lands on a relay the consumer never
//! used.

mod common;

use std::collections::HashSet;
use std::io::Read;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::cluster::{ClusterOpts, ValkeyCluster};
use common::fleet::RelayFleet;
use common::nginx::Nginx;
use common::sse::SseClient;
use common::valkey::{ValkeyOpts, ValkeyServer};
use common::ws::{WsClient, WsEvent};
use common::{assert_strictly_increasing, build_request, eventually, id_of, Conn, Server};
use serde_json::{json, Value};

/// The relays' configuration: a 1 s SSE heartbeat, to show that nginx passes a quiet stream's
/// bytes on at once (no buffering).
const RELAY_CONFIG: &str = "sse:\n  heartbeat_interval: 1s\n";

/// Bounds every wait on something the relays or nginx must do; far above the normal
/// milliseconds, for a loaded 2-core CI machine.
const PATIENCE: Duration = Duration::from_secs(20);

/// A Valkey Cluster, three relays on it, nginx in front of them.
struct Stack {
    // Field order is drop order: nginx first, then the relays, then the cluster.
    lb: Nginx,
    fleet: RelayFleet,
    _cluster: ValkeyCluster,
}

/// Starts the stack.
fn start_stack() -> Stack {
    // No nginx fails here, before anything is started.
    common::nginx::nginx_binary();
    let cluster = ValkeyCluster::start(ClusterOpts {
        replicas_per_master: 0,
        ..ClusterOpts::default()
    });
    let fleet = RelayFleet::start_on_cluster(&cluster, 3, RELAY_CONFIG, &[]);
    let lb = Nginx::start(&fleet.addrs());
    Stack {
        lb,
        fleet,
        _cluster: cluster,
    }
}

impl Stack {
    /// Publishes through the load balancer on a fresh connection; asserts 201.
    fn publish(&self, topic: &str, payload: &str) -> String {
        id_of(&Conn::connect(self.lb.addr).publish(topic, payload))
    }

    /// Publishes `n` messages `{"i": from..from+n}` through the load balancer.
    fn publish_n(&self, topic: &str, from: usize, n: usize) -> Vec<String> {
        (from..from + n)
            .map(|i| self.publish(topic, &format!(r#"{{"i":{i}}}"#)))
            .collect()
    }

    /// GET through the load balancer, as JSON; asserts 200.
    fn get_json(&self, path: &str) -> Value {
        let resp = Conn::connect(self.lb.addr).request("GET", path, None);
        assert_eq!(resp.status, 200, "GET {path} through nginx: {resp:?}");
        resp.json()
    }

    /// Every id of a topic's history through the load balancer, oldest first.
    fn history_ids(&self, topic: &str) -> Vec<String> {
        let page = self.get_json(&format!(
            "/api/v1/topics/{topic}/messages?order=asc&limit=1000"
        ));
        assert!(page["next_cursor"].is_null(), "more than one page: {page}");
        page["messages"]
            .as_array()
            .unwrap_or_else(|| panic!("no messages in {page}"))
            .iter()
            .map(id_of)
            .collect()
    }

    /// The relay (by fleet index) holding the one open consumer connection of `transport`
    /// (`websocket`, `sse`).
    fn relay_holding(&self, transport: &str) -> usize {
        let series = format!("relay_connections{{transport=\"{transport}\"}}");
        let mut holders = Vec::new();
        let found = eventually(PATIENCE, || {
            holders = (0..self.fleet.len())
                .filter(|&i| self.fleet.relay(i).is_running())
                .filter(|&i| metric(self.fleet.relay(i), &series).unwrap_or(0.0) >= 1.0)
                .collect();
            holders.len() == 1
        });
        assert!(
            found,
            "want one relay with a {transport} consumer, got {holders:?}"
        );
        holders[0]
    }

    /// For each of the `n` publishes logged after the first `skip` access-log lines (awaited:
    /// nginx logs a request after answering it), the relays nginx tried, in order: the last
    /// one answered.
    fn publishes_tried(&self, skip: usize, n: usize) -> Vec<Vec<SocketAddr>> {
        let publishes = |log: &str| -> Vec<Vec<SocketAddr>> {
            log.lines()
                .skip(skip)
                .filter(|l| l.contains("\"POST /api/v1/messages "))
                .map(|l| {
                    l.split(" upstream=")
                        .nth(1)
                        .and_then(|rest| rest.split(" upstream_status=").next())
                        .unwrap_or_default()
                        .split(", ")
                        .filter_map(|a| a.parse().ok())
                        .collect()
                })
                .collect()
        };
        assert!(
            eventually(PATIENCE, || publishes(&self.lb.access_log()).len() == n),
            "want {n} publishes logged after line {skip}; access log:\n{}",
            self.lb.access_log()
        );
        let tried = publishes(&self.lb.access_log());
        assert!(
            tried.iter().all(|t| !t.is_empty()),
            "a publish without upstream: {tried:?}"
        );
        tried
    }

    /// The relay that answered each of the `n` publishes logged after the first `skip`
    /// access-log lines.
    fn publishes_answered_by(&self, skip: usize, n: usize) -> Vec<SocketAddr> {
        self.publishes_tried(skip, n)
            .into_iter()
            .filter_map(|t| t.last().copied())
            .collect()
    }

    /// The relays' addresses that served requests of the access log whose request line
    /// contains `request`.
    fn upstreams_of(&self, request: &str) -> HashSet<SocketAddr> {
        self.lb
            .access_log()
            .lines()
            .filter(|l| l.contains(request))
            .filter_map(|l| l.split(" upstream=").nth(1))
            .filter_map(|rest| rest.split(" upstream_status=").next())
            .flat_map(|addrs| addrs.split(", ").map(str::to_owned).collect::<Vec<_>>())
            .filter_map(|a| a.parse().ok())
            .collect()
    }
}

/// The value of a series (name with its labels, as exposed) from a relay's `/metrics`.
fn metric(relay: &Server, series: &str) -> Option<f64> {
    let text = relay.get("/metrics").text();
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
        .and_then(|v| v.trim().parse().ok())
}

/// WebSocket frames until `n` messages came, asserting every frame is a message (pings are
/// skipped by `recv`); returns their ids.
fn ws_ids(ws: &mut WsClient, n: usize) -> Vec<String> {
    ws.recv_messages(n).iter().map(id_of).collect()
}

/// Connects a WebSocket through the load balancer and subscribes to `topic` at `offset`.
fn ws_subscribe(lb: SocketAddr, topic: &str, offset: Value) -> WsClient {
    let mut ws = WsClient::connect(lb);
    ws.subscribe(&[topic], Some(offset));
    ws
}

#[test]
fn publish_history_websocket_sse_and_long_poll_through_nginx() {
    let stack = start_stack();
    let topic = "lb-transports";

    // Publish and history. nginx spreads the publishes over the relays (least_conn: with no
    // request in flight it goes round), Valkey numbers them in one order.
    let first = stack.publish_n(topic, 0, 30);
    assert_strictly_increasing(&first);
    // (nginx logs a request after answering it: awaited.)
    let relays: HashSet<SocketAddr> = stack.fleet.addrs().into_iter().collect();
    assert!(
        eventually(PATIENCE, || stack.upstreams_of("POST /api/v1/messages ")
            == relays),
        "nginx did not spread the publishes over all three relays\naccess log:\n{}",
        stack.lb.access_log()
    );
    // An ascending page from the start always reads Valkey.
    assert_eq!(stack.history_ids(topic), first);

    // WebSocket through nginx: the upgrade, the subscription, a catch-up of every message
    // (whichever relay accepted it), and the client's frames (ping → pong) on the same
    // proxied connection.
    let mut ws = ws_subscribe(stack.lb.addr, topic, json!("earliest"));
    assert_eq!(ws_ids(&mut ws, first.len()), first);
    ws.send_json(&json!({"type": "ping"}));
    ws.recv_type("pong");

    // SSE through nginx, resuming after the first message.
    let mut sse = SseClient::open_ok(
        stack.lb.addr,
        &format!("/api/v1/topics/{topic}/events?since={}", first[0]),
        &[],
    );
    let sse_ids: Vec<String> = (1..first.len())
        .map(|_| id_of(&sse.next_message()))
        .collect();
    assert_eq!(sse_ids, first[1..]);
    // The relay's 1 s heartbeat comes through while the stream is quiet: nginx passes a
    // streamed response on as it arrives (`proxy_buffering off`; the relay's
    // `X-Accel-Buffering: no` asks nginx the same, so this holds with either alone).
    assert!(
        matches!(
            sse.next_item(Duration::from_secs(5)),
            common::sse::SseRead::Item(common::sse::SseItem::Comment(_))
        ),
        "no SSE heartbeat through nginx within 5 s"
    );

    // Long-poll through nginx: a poll with history answers at once with it...
    let mut conn = Conn::connect(stack.lb.addr);
    let body = json!({"topics": [topic], "since": {topic: first[9]}, "timeout": 10});
    let resp = conn.request("POST", "/messages/poll", Some(body.to_string().as_bytes()));
    assert_eq!(resp.status, 200, "{resp:?}");
    let got: Vec<String> = resp.json()["messages"]
        .as_array()
        .expect("messages")
        .iter()
        .map(id_of)
        .collect();
    assert_eq!(got, first[10..]);
    // ...and one with nothing new is held by the relay until its own timeout (2 s), nginx
    // waiting for the answer rather than cutting it.
    let started = std::time::Instant::now();
    let resp = Conn::connect(stack.lb.addr).request(
        "GET",
        &format!("/api/v1/poll?topics={topic}&since={}&timeout=2", first[29]),
        None,
    );
    assert_eq!(resp.status, 200, "{resp:?}");
    assert!(
        started.elapsed() >= Duration::from_secs(2),
        "an empty poll answered after {:?}: {resp:?}",
        started.elapsed()
    );
    assert_eq!(resp.json()["messages"], json!([]), "{resp:?}");

    // Live delivery of what another relay accepted: the WebSocket and SSE consumers, and a
    // parked long-poll, each on its relay; the publishes go to whichever relay nginx picks.
    let relay_addrs = stack.fleet.addrs();
    let ws_relay = relay_addrs[stack.relay_holding("websocket")];
    let sse_relay = relay_addrs[stack.relay_holding("sse")];
    let parked = std::thread::spawn({
        let lb = stack.lb.addr;
        let body = json!({"topics": [topic], "since": {topic: first[29]}, "timeout": 30});
        move || {
            Conn::connect(lb).request("POST", "/messages/poll", Some(body.to_string().as_bytes()))
        }
    });
    let parked_on = |i: usize| {
        let stats = stack.fleet.relay(i).get("/messages/poll/stats").json();
        stats["active_polls"].as_u64().unwrap_or(0)
    };
    assert!(
        eventually(PATIENCE, || (0..3).map(parked_on).sum::<u64>() == 1),
        "the long-poll through nginx never parked"
    );
    let log_lines_before_live = stack.lb.access_log().lines().count();
    let live = stack.publish_n(topic, 30, 10);
    assert_eq!(ws_ids(&mut ws, live.len()), live);
    let sse_live: Vec<String> = (0..live.len())
        .map(|_| id_of(&sse.next_message()))
        .collect();
    assert_eq!(sse_live, live);
    let resp = parked.join().expect("poll thread");
    assert_eq!(resp.status, 200, "{resp:?}");
    assert_eq!(
        id_of(&resp.json()["messages"][0]),
        live[0],
        "parked poll: {resp:?}"
    );
    // Those deliveries crossed relays: some live publishes were accepted elsewhere.
    let accepted_by = stack.publishes_answered_by(log_lines_before_live, live.len());
    for (consumer, relay) in [("WebSocket", ws_relay), ("SSE", sse_relay)] {
        assert!(
            accepted_by.iter().any(|a| *a != relay),
            "every live publish went to the {consumer} consumer's relay {relay}: {accepted_by:?}"
        );
    }
}

#[test]
fn a_relay_killed_behind_nginx_fails_no_request_and_its_websocket_consumer_resumes_without_loss() {
    let mut stack = start_stack();
    let topic = "lb-kill";

    let before = stack.publish_n(topic, 0, 20);
    let mut ws = ws_subscribe(stack.lb.addr, topic, json!("earliest"));
    let mut seen = ws_ids(&mut ws, before.len());
    assert_eq!(seen, before);

    // kill -9 the relay this consumer is on, as a crash would.
    let victim = stack.relay_holding("websocket");
    let victim_addr = stack.fleet.relay(victim).addr;
    let log_lines_at_kill = stack.lb.access_log().lines().count();
    stack.fleet.kill9(victim);
    assert!(
        eventually(PATIENCE, || TcpStream::connect_timeout(
            &victim_addr,
            Duration::from_millis(200)
        )
        .is_err()),
        "the killed relay's port still accepts connections"
    );
    // nginx closes the client's side when the relay's side dies.
    let ended = eventually(PATIENCE, || {
        matches!(
            ws.next_event(Duration::from_millis(200)),
            WsEvent::Close(_) | WsEvent::Gone(_)
        )
    });
    assert!(ended, "the WebSocket through nginx outlived its relay");

    // New requests through nginx keep succeeding: publishes (un-keyed and keyed), reads.
    // nginx may try the dead relay first: connection refused, nothing sent, so even a POST
    // moves on to another relay.
    let mut after = stack.publish_n(topic, 20, 20);
    for i in 40..45 {
        let body = format!(r#"{{"topic":"{topic}","payload":{{"i":{i}}}}}"#);
        let key = format!("lb-kill-{i}");
        let mut conn = Conn::connect(stack.lb.addr);
        conn.send(&build_request(
            "POST",
            "/api/v1/messages",
            &[("Idempotency-Key", key.as_str())],
            Some(body.as_bytes()),
        ));
        let resp = conn.read_response(false);
        assert_eq!(
            resp.status, 201,
            "keyed publish {i} through nginx: {resp:?}"
        );
        after.push(id_of(&resp.json()));
    }
    assert_strictly_increasing(&after);
    let mut all = before.clone();
    all.extend(after.iter().cloned());
    assert_eq!(stack.history_ids(topic), all);
    // Every publish after the kill was answered by a surviving relay (the last address of
    // `upstream=`; an earlier one is a relay nginx tried first).
    let survivors: HashSet<SocketAddr> = stack.fleet.running_addrs().into_iter().collect();
    let tried = stack.publishes_tried(log_lines_at_kill, after.len());
    let mut moved_on = 0;
    for upstreams in &tried {
        let answered_by = upstreams.last().expect("an upstream per publish");
        assert!(
            survivors.contains(answered_by),
            "answered by {answered_by}: {tried:?}"
        );
        moved_on += usize::from(upstreams.len() > 1);
    }
    // How often nginx tried the dead relay first (max_fails=2 takes it out after two).
    eprintln!(
        "LB publishes after kill -9: {} answered, {moved_on} moved on from the dead relay",
        tried.len()
    );

    // The consumer reconnects through nginx (which may try the dead relay first: refused,
    // the GET moves on) and resumes from its last id: everything after it, once, in order.
    let last = seen.last().cloned().expect("saw messages");
    let mut ws = ws_subscribe(stack.lb.addr, topic, json!({ topic: last }));
    seen.extend(ws_ids(&mut ws, after.len()));
    assert_eq!(seen, all);
    assert!(
        ws.try_recv(Duration::from_millis(500)).is_none(),
        "a frame beyond the resumed messages"
    );

    // Live after the resume, whichever surviving relay accepts the publishes.
    let live = stack.publish_n(topic, 45, 10);
    assert_eq!(ws_ids(&mut ws, live.len()), live);
}

/// A relay that dies with a request in flight: accepts a connection, reads one request head,
/// counts it, and closes without answering. Runs until the test process ends.
fn start_relay_that_dies_mid_request() -> (SocketAddr, Arc<AtomicUsize>) {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind the dying relay");
    let addr = listener.local_addr().expect("local addr");
    let received = Arc::new(AtomicUsize::new(0));
    let counter = received.clone();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { continue };
            let _ = stream.set_read_timeout(Some(Duration::from_secs(5)));
            let mut head = Vec::new();
            let mut byte = [0u8; 1];
            while !head.ends_with(b"\r\n\r\n") {
                match stream.read(&mut byte) {
                    Ok(1) => head.push(byte[0]),
                    _ => break,
                }
            }
            if head.ends_with(b"\r\n\r\n") {
                counter.fetch_add(1, Ordering::SeqCst);
            }
            // Dropped: closed with the request unanswered.
        }
    });
    (addr, received)
}

#[test]
fn nginx_resends_a_publish_to_another_relay_only_when_it_carries_an_idempotency_key() {
    common::nginx::nginx_binary();
    let valkey = ValkeyServer::start(ValkeyOpts::default());
    let fleet = RelayFleet::start(&valkey, 2, RELAY_CONFIG, &[]);
    let (dying, received) = start_relay_that_dies_mid_request();
    let mut upstreams = vec![dying];
    upstreams.extend(fleet.addrs());
    let lb = Nginx::start(&upstreams);
    let topic = "lb-retry";
    let publish = |payload: &str, key: Option<&str>| {
        let body = format!(r#"{{"topic":"{topic}","payload":{payload}}}"#);
        let headers: Vec<(&str, &str)> = key.map(|k| ("Idempotency-Key", k)).into_iter().collect();
        let mut conn = Conn::connect(lb.addr);
        conn.send(&build_request(
            "POST",
            "/api/v1/messages",
            &headers,
            Some(body.as_bytes()),
        ));
        conn.read_response(false)
    };

    // Un-keyed publishes until one reaches the dying relay (nginx takes turns among relays
    // with nothing in flight; passive health may have taken the dying one out for
    // fail_timeout, 10 s, after two failures, so this waits up to 30 s). That one is answered
    // 502: nginx sent it, so a resend could store it twice, and it does not resend. The
    // others are stored.
    let mut stored = Vec::new();
    let mut lost = None;
    let mut i = 0;
    let reached = eventually(Duration::from_secs(30), || {
        i += 1;
        let seen = received.load(Ordering::SeqCst);
        let payload = format!(r#"{{"unkeyed":{i}}}"#);
        let resp = publish(&payload, None);
        if received.load(Ordering::SeqCst) > seen {
            assert_eq!(
                resp.status, 502,
                "un-keyed publish sent to a dying relay: {resp:?}"
            );
            lost = Some(payload);
            return true;
        }
        assert_eq!(resp.status, 201, "{resp:?}");
        stored.push(id_of(&resp.json()));
        false
    });
    assert!(
        reached,
        "no un-keyed publish went to the dying relay in 30 s"
    );
    let lost = lost.expect("set when reached");

    // Keyed publishes until one reaches the dying relay: that one moves on to a live relay
    // and is stored once, with the key.
    let mut keyed_retried = None;
    let mut i = 0;
    let reached = eventually(Duration::from_secs(30), || {
        i += 1;
        let seen = received.load(Ordering::SeqCst);
        let key = format!("lb-retry-{i}");
        let resp = publish(&format!(r#"{{"keyed":{i}}}"#), Some(&key));
        assert_eq!(resp.status, 201, "keyed publish {i}: {resp:?}");
        stored.push(id_of(&resp.json()));
        if received.load(Ordering::SeqCst) > seen {
            keyed_retried = Some((key, id_of(&resp.json())));
            return true;
        }
        false
    });
    assert!(reached, "no keyed publish went to the dying relay in 30 s");
    let (key, id) = keyed_retried.expect("set when reached");
    // The relay that took the resend stored it once: the same key again is a replay.
    let again = publish(r#"{"keyed":"again"}"#, Some(&key));
    assert_eq!(again.status, 201, "{again:?}");
    assert_eq!(
        id_of(&again.json()),
        id,
        "a replay of {key} is the first id"
    );

    let history = fleet.relay(0).read_topic(topic, "order=asc&limit=1000");
    let history: Vec<&Value> = history["messages"]
        .as_array()
        .expect("messages")
        .iter()
        .collect();
    let ids: Vec<String> = history.iter().map(|m| id_of(m)).collect();
    assert_eq!(ids, stored, "stored exactly the 201s, once each");
    let lost: Value = serde_json::from_str(&lost).expect("payload JSON");
    assert!(
        history.iter().all(|m| m["payload"] != lost),
        "the un-keyed publish answered 502 was stored"
    );
}
