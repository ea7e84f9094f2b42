//! The delivery contract on the Valkey backend, observed through the API: a read never ends
//! a topic early (however many expired entries lie ahead), a consumer resuming from a
//! position whose successors left the stream is told of the gap and why (count trim, the trim
//! endpoint, ttl and age retention, topic delete, a foreign `XDEL`), and an `ack: buffered`
//! message survives write-behind failures while the relay lives.
//!
//! Owns: what the Valkey tier promises a resuming consumer. Does not own: the relay <-> Valkey
//! data layout (`valkey_api.rs`), what retention leaves in the stream (`valkey_retention.rs`).

mod common;

use std::time::Duration;

use common::valkey::{stream_key, ValkeyOpts, ValkeyServer};
use common::{eventually, Server};
use serde_json::{json, Value};

/// Publishes `n` messages `{"i": start + k}` to `topic` in bulks of at most 1,000, with an
/// optional ttl (seconds); returns their ids in order.
fn publish_bulk(
    relay: &Server,
    topic: &str,
    start: usize,
    n: usize,
    ttl: Option<u64>,
) -> Vec<String> {
    let mut ids = Vec::with_capacity(n);
    let mut next = start;
    while next < start + n {
        let end = (next + 1000).min(start + n);
        let items: Vec<Value> = (next..end)
            .map(|i| match ttl {
                Some(ttl) => json!({"topic": topic, "payload": {"i": i}, "ttl": ttl}),
                None => json!({"topic": topic, "payload": {"i": i}}),
            })
            .collect();
        let resp = relay.post_json(
            "/api/v1/messages/bulk",
            &json!({ "messages": items }).to_string(),
        );
        assert!(resp.status == 201 || resp.status == 207, "{resp:?}");
        let v = resp.json();
        for result in v["results"].as_array().expect("results") {
            ids.push(
                result["message_id"]
                    .as_str()
                    .unwrap_or_else(|| panic!("not accepted: {result}"))
                    .to_string(),
            );
        }
        next = end;
    }
    ids
}

fn ids_of(page: &Value) -> Vec<String> {
    page["messages"]
        .as_array()
        .unwrap_or_else(|| panic!("no messages in {page}"))
        .iter()
        .map(|m| m["message_id"].as_str().expect("message_id").to_string())
        .collect()
}

/// Every message of an ascending history walk from the start, following `next_cursor`
/// (at most `max_pages` pages).
fn walk_asc(relay: &Server, topic: &str, max_pages: usize) -> Vec<String> {
    let mut got = Vec::new();
    let mut cursor: Option<String> = None;
    for _ in 0..max_pages {
        let query = match &cursor {
            Some(c) => format!("order=asc&limit=100&cursor={c}"),
            None => "order=asc&limit=100".to_string(),
        };
        let page = relay.read_topic(topic, &query);
        got.extend(ids_of(&page));
        match page["next_cursor"].as_str() {
            Some(c) => cursor = Some(c.to_string()),
            None => return got,
        }
    }
    panic!("{topic}: history walk did not end within {max_pages} pages; got {got:?}");
}

fn poll(relay: &Server, body: &Value) -> Value {
    let resp = relay.post_json("/messages/poll", &body.to_string());
    assert_eq!(resp.status, 200, "{resp:?}");
    resp.json()
}

#[test]
fn a_long_expired_run_at_the_head_does_not_end_reads_early() {
    let valkey = ValkeyServer::start(ValkeyOpts::default());
    // Retention 1 h: the sweeper passes once a minute, so the expired entries stay in the
    // stream for the whole test and every read must step over them.
    let relay = valkey.start_relay("storage:\n  persistent_tier_retention: 1h\n", &[]);
    let topic = "ttl-head";
    publish_bulk(&relay, topic, 0, 3000, Some(1));
    let survivors = publish_bulk(&relay, topic, 3000, 3, None);
    assert_eq!(valkey.xlen(&stream_key(topic)), 3003);
    let mut last = Value::Null;
    assert!(
        eventually(Duration::from_secs(15), || {
            last = relay.read_topic(topic, "order=desc&limit=4");
            ids_of(&last).len() == 3
        }),
        "ttl messages did not expire: {last}"
    );
    assert_eq!(walk_asc(&relay, topic, 200), survivors, "asc history walk");
    // A long-poll from the oldest message (listed topic without an id in `since`) answers
    // with the survivors at once instead of waiting out its timeout.
    let body = poll(
        &relay,
        &json!({"topics": [topic], "since": {}, "limit": 100, "timeout": 5}),
    );
    assert!(body.get("timeout").is_none_or(|t| t == false), "{body}");
    assert_eq!(ids_of(&body), survivors, "{body}");
    // A resume from before the expired run gets the survivors too.
    let body = poll(
        &relay,
        &json!({"topics": [topic], "since": {topic: "1-0"}, "limit": 100, "timeout": 5}),
    );
    assert_eq!(ids_of(&body), survivors, "{body}");
}

/// The `gaps` of a long-poll resuming `topic` after `since` (empty when none).
fn gaps_after(relay: &Server, topic: &str, since: &str) -> Vec<Value> {
    let body = poll(
        relay,
        &json!({"topics": [topic], "since": {topic: since}, "limit": 1, "timeout": 1}),
    );
    body.get("gaps")
        .map(|g| g.as_array().expect("gaps array").clone())
        .unwrap_or_default()
}

/// Asserts exactly one gap for `topic` naming `requested`, `oldest_available` and `reason`.
fn assert_gap(gaps: &[Value], topic: &str, requested: &str, oldest: Option<&str>, reason: &str) {
    assert_eq!(
        gaps,
        &[
            json!({"type": "gap", "topic": topic, "requested": requested,
                 "oldest_available": oldest, "reason": reason})
        ],
        "resume of {topic} after {requested}"
    );
}

fn first_id_in_valkey(valkey: &ValkeyServer, topic: &str) -> String {
    valkey.xrange(&stream_key(topic))[0].id.clone()
}

#[test]
fn a_resume_from_a_count_trimmed_id_reports_a_trimmed_gap() {
    let valkey = ValkeyServer::start(ValkeyOpts::default());
    let relay = valkey.start_relay("storage:\n  max_messages_per_topic: 100\n", &[]);
    let topic = "count-trimmed";
    let ids = publish_bulk(&relay, topic, 0, 1000, None);
    let first = first_id_in_valkey(&valkey, topic);
    assert_ne!(first, ids[0], "MAXLEN did not trim");
    assert_gap(
        &gaps_after(&relay, topic, &ids[0]),
        topic,
        &ids[0],
        Some(&first),
        "trimmed",
    );
    assert_gap(
        &gaps_after(&relay, topic, "1-0"),
        topic,
        "1-0",
        Some(&first),
        "trimmed",
    );
    // From a retained message nothing was lost.
    let at = ids
        .iter()
        .position(|id| *id == first)
        .expect("first retained");
    for since in [&ids[at], &ids[at + 1], &ids[998], &ids[999]] {
        assert_eq!(
            gaps_after(&relay, topic, since),
            Vec::<Value>::new(),
            "{since}"
        );
    }
}

#[test]
fn a_resume_across_the_trim_endpoint_reports_a_trimmed_gap_and_only_then() {
    let valkey = ValkeyServer::start(ValkeyOpts::default());
    let relay = valkey.start_relay("", &[]);
    let topic = "endpoint-trimmed";
    let ids = publish_bulk(&relay, topic, 0, 250, None);
    let resp = relay.post_json(
        &format!("/api/v1/topics/{topic}/trim"),
        r#"{"keep_count":10}"#,
    );
    assert_eq!(resp.status, 200, "{resp:?}");
    assert_gap(
        &gaps_after(&relay, topic, &ids[0]),
        topic,
        &ids[0],
        Some(&ids[240]),
        "trimmed",
    );
    assert_gap(
        &gaps_after(&relay, topic, &ids[238]),
        topic,
        &ids[238],
        Some(&ids[240]),
        "trimmed",
    );
    // The last removed message was seen: nothing after it is missing (exact, not
    // conservative).
    for since in [&ids[239], &ids[240], &ids[249]] {
        assert_eq!(
            gaps_after(&relay, topic, since),
            Vec::<Value>::new(),
            "{since}"
        );
    }
}

#[test]
fn a_resume_across_swept_ttl_entries_reports_an_expired_gap() {
    let valkey = ValkeyServer::start(ValkeyOpts::default());
    // Retention 8 s: the sweeper passes every 2 s; only the ttl runs out during the test.
    let relay = valkey.start_relay("storage:\n  persistent_tier_retention: 8s\n", &[]);
    let topic = "ttl-swept";
    let expiring = publish_bulk(&relay, topic, 0, 5, Some(1));
    let kept = publish_bulk(&relay, topic, 5, 2, None);
    let key = stream_key(topic);
    assert!(
        eventually(Duration::from_secs(20), || valkey.xlen(&key) == 2),
        "expired entries not swept: {:?}",
        valkey.xrange(&key)
    );
    assert_gap(
        &gaps_after(&relay, topic, &expiring[0]),
        topic,
        &expiring[0],
        Some(&kept[0]),
        "expired",
    );
    for since in [&expiring[4], &kept[0]] {
        assert_eq!(
            gaps_after(&relay, topic, since),
            Vec::<Value>::new(),
            "{since}"
        );
    }
}

#[test]
fn a_resume_across_age_retention_reports_an_expired_gap() {
    let valkey = ValkeyServer::start(ValkeyOpts::default());
    let relay = valkey.start_relay(
        "storage:\n  persistent_tier_retention: 2s\nhot_tier:\n  retention: 1s\n",
        &[],
    );
    let topic = "age-swept";
    let ids = publish_bulk(&relay, topic, 0, 5, None);
    let key = stream_key(topic);
    assert!(
        eventually(Duration::from_secs(20), || valkey.xlen(&key) == 0),
        "aged entries not swept: {:?}",
        valkey.xrange(&key)
    );
    assert_gap(
        &gaps_after(&relay, topic, &ids[0]),
        topic,
        &ids[0],
        None,
        "expired",
    );
    assert_eq!(gaps_after(&relay, topic, &ids[4]), Vec::<Value>::new());
}

#[test]
fn a_resume_across_a_topic_delete_reports_a_deleted_gap() {
    let valkey = ValkeyServer::start(ValkeyOpts::default());
    let relay = valkey.start_relay("", &[]);
    let topic = "deleted";
    let old = publish_bulk(&relay, topic, 0, 5, None);
    let resp = relay.delete(&format!("/api/v1/topics/{topic}"));
    assert!(resp.status == 200 || resp.status == 204, "{resp:?}");
    // Deleted and not recreated yet: nothing is available.
    assert_gap(
        &gaps_after(&relay, topic, &old[2]),
        topic,
        &old[2],
        None,
        "deleted",
    );
    let new = publish_bulk(&relay, topic, 5, 2, None);
    assert_gap(
        &gaps_after(&relay, topic, &old[2]),
        topic,
        &old[2],
        Some(&new[0]),
        "deleted",
    );
    // The last message of the old stream was seen: nothing is missing.
    for since in [&old[4], &new[0]] {
        assert_eq!(
            gaps_after(&relay, topic, since),
            Vec::<Value>::new(),
            "{since}"
        );
    }
}

/// Bug (model checker seed 8063: retention 3 s): a delete's tombstone expired with the
/// retention, so a consumer a few seconds behind resumed into the recreated stream with no
/// gap. The tombstone now lives at least a week, however short the retention.
#[test]
fn a_delete_tombstone_outlives_a_short_retention() {
    let valkey = ValkeyServer::start(ValkeyOpts::default());
    let relay = valkey.start_relay("storage:\n  persistent_tier_retention: 1s\n", &[]);
    let topic = "deleted-short-retention";
    let old = publish_bulk(&relay, topic, 0, 5, None);
    let resp = relay.delete(&format!("/api/v1/topics/{topic}"));
    assert!(resp.status == 200 || resp.status == 204, "{resp:?}");
    let ttl: i64 = valkey
        .cli(&["TTL", &format!("topic:{topic}:meta")])
        .trim()
        .parse()
        .expect("TTL");
    assert!(ttl >= 6 * 24 * 3600, "tombstone expires in {ttl} s");
    let new = publish_bulk(&relay, topic, 5, 2, None);
    assert_gap(
        &gaps_after(&relay, topic, &old[2]),
        topic,
        &old[2],
        Some(&new[0]),
        "deleted",
    );
}

#[test]
fn a_resume_across_a_foreign_xdel_reports_an_unknown_gap() {
    let valkey = ValkeyServer::start(ValkeyOpts::default());
    let relay = valkey.start_relay("", &[]);
    let topic = "foreign-xdel";
    let ids = publish_bulk(&relay, topic, 0, 5, None);
    valkey.cli(&["XDEL", &stream_key(topic), &ids[3]]);
    let gaps = gaps_after(&relay, topic, &ids[1]);
    assert_eq!(gaps.len(), 1, "{gaps:?}");
    assert_eq!(gaps[0]["reason"], "unknown", "{gaps:?}");
    assert_eq!(gaps_after(&relay, topic, &ids[3]), Vec::<Value>::new());
}

/// Publishes `n` buffered messages `{"i": k}` one by one; returns the ids acknowledged (201)
/// in order. 503s (backlog full) are allowed: those were never acknowledged.
fn publish_counting_acks(relay: &Server, topic: &str, n: usize, payload_pad: usize) -> Vec<String> {
    let pad = "x".repeat(payload_pad);
    let mut conn = relay.connect();
    let mut acked = Vec::new();
    for i in 0..n {
        let body = common::publish_body(topic, &format!(r#"{{"i":{i},"pad":"{pad}"}}"#));
        let resp = conn.request("POST", "/api/v1/messages", Some(body.as_bytes()));
        match resp.status {
            201 => acked.push(
                resp.json()["message_id"]
                    .as_str()
                    .expect("message_id")
                    .to_string(),
            ),
            503 => {}
            other => panic!("publish answered {other}: {resp:?}"),
        }
    }
    acked
}

/// A Valkey that refuses writes with `-OOM` (4 MB `maxmemory`, `noeviction`) while reads still
/// work, and a relay on it configured by `config_yaml` (which sets `ack: buffered`).
fn oom_valkey_and_buffered_relay(config_yaml: &str) -> (ValkeyServer, Server) {
    let valkey = ValkeyServer::start(ValkeyOpts {
        extra_args: vec![
            "--maxmemory".into(),
            "4mb".into(),
            "--maxmemory-policy".into(),
            "noeviction".into(),
        ],
        ..ValkeyOpts::default()
    });
    let relay = valkey.start_relay(config_yaml, &[]);
    (valkey, relay)
}

/// Publishes `n` messages of ~60 KB (acknowledged into the write-behind backlog) and awaits
/// Valkey's first `-OOM` refusal; returns the acknowledged ids.
fn publish_until_oom(relay: &Server, topic: &str, n: usize) -> Vec<String> {
    let acked = publish_counting_acks(relay, topic, n, 60_000);
    assert!(
        eventually(Duration::from_secs(10), || valkey_errors(
            relay,
            "error_reply"
        ) > 0),
        "Valkey never refused a write: the test did not reach -OOM"
    );
    acked
}

/// The value of the `relay_valkey_errors_total` series of `kind` (0 when absent).
fn valkey_errors(relay: &Server, kind: &str) -> u64 {
    let text = relay.get("/metrics").text();
    let series = format!("relay_valkey_errors_total{{kind=\"{kind}\"}} ");
    text.lines()
        .filter_map(|l| l.strip_prefix(series.as_str()))
        .filter_map(|v| v.trim().parse::<u64>().ok())
        .sum()
}

/// Asserts every acknowledged id ends up in the stream, in order (others may be there too:
/// none here, as every publish was either acknowledged or refused before queueing).
fn assert_all_stored(valkey: &ValkeyServer, topic: &str, acked: &[String], within: Duration) {
    let key = stream_key(topic);
    let mut stored: Vec<String> = Vec::new();
    let ok = eventually(within, || {
        stored = match valkey.try_cli(&["XLEN", &key]) {
            Ok(_) => valkey.xrange(&key).into_iter().map(|e| e.id).collect(),
            Err(_) => return false,
        };
        stored == acked
    });
    let missing: Vec<&String> = acked.iter().filter(|id| !stored.contains(id)).collect();
    assert!(
        ok,
        "{} acknowledged messages not stored (of {}), e.g. {:?}; stored {}",
        missing.len(),
        acked.len(),
        missing.iter().take(3).collect::<Vec<_>>(),
        stored.len()
    );
}

#[test]
fn buffered_acks_published_while_valkey_is_down_are_stored_after_it_returns() {
    let mut valkey = ValkeyServer::start(ValkeyOpts {
        fsync_always: true,
        ..ValkeyOpts::default()
    });
    let relay = valkey.start_relay(
        "durability:\n  ack: buffered\nvalkey:\n  command_timeout: 300ms\n",
        &[],
    );
    let topic = "buffered-outage";
    let mut acked = publish_counting_acks(&relay, topic, 10, 0);
    assert_all_stored(&valkey, topic, &acked, Duration::from_secs(10));
    valkey.stop();
    acked.extend(publish_counting_acks(&relay, topic, 40, 0));
    assert!(acked.len() > 10, "nothing acknowledged during the outage");
    // The write-behind has failed at least once (queued commands timed out).
    assert!(
        eventually(Duration::from_secs(10), || valkey_errors(&relay, "timeout")
            > 0
            || valkey_errors(&relay, "connection_lost") > 0),
        "no write-behind failure observed"
    );
    valkey.restart();
    assert_all_stored(&valkey, topic, &acked, Duration::from_secs(20));
    assert_eq!(valkey_errors(&relay, "buffered_lost"), 0);
    // Ids go on increasing after the outage.
    let later = publish_counting_acks(&relay, topic, 5, 0);
    acked.extend(later);
    assert_all_stored(&valkey, topic, &acked, Duration::from_secs(10));
}

#[test]
fn buffered_acks_refused_with_oom_are_stored_once_memory_frees() {
    let (valkey, relay) = oom_valkey_and_buffered_relay("durability:\n  ack: buffered\n");
    let topic = "buffered-oom";
    let acked = publish_until_oom(&relay, topic, 200);
    valkey.cli(&["CONFIG", "SET", "maxmemory", "0"]);
    assert_all_stored(&valkey, topic, &acked, Duration::from_secs(20));
    assert!(valkey_errors(&relay, "buffered_retry") > 0);
    assert_eq!(valkey_errors(&relay, "buffered_lost"), 0);
}

#[test]
fn buffered_acks_survive_stalled_and_cut_connections() {
    use common::fault_proxy::{Fault, FaultProxy};
    let valkey = ValkeyServer::start(ValkeyOpts::default());
    let upstream: std::net::SocketAddr = format!("{}:{}", valkey.host(), valkey.port)
        .parse()
        .expect("valkey address");
    let proxy = FaultProxy::start(upstream);
    let port = proxy.port().to_string();
    let relay = valkey.start_relay(
        "durability:\n  ack: buffered\nvalkey:\n  command_timeout: 300ms\n",
        &[("VALKEY_PORT", port.as_str())],
    );
    let topic = "buffered-cuts";
    let addr = relay.addr;
    let publisher = std::thread::spawn(move || {
        let relay_addr = addr;
        let mut conn = common::Conn::connect(relay_addr);
        let mut acked = Vec::new();
        for i in 0..600 {
            let body = common::publish_body(topic, &format!(r#"{{"i":{i}}}"#));
            let resp = conn.request("POST", "/api/v1/messages", Some(body.as_bytes()));
            match resp.status {
                201 => acked.push(resp.json()["message_id"].as_str().expect("id").to_string()),
                503 => {}
                other => panic!("publish answered {other}: {resp:?}"),
            }
        }
        acked
    });
    // A few times while it publishes: requests stop reaching Valkey until the write-behind
    // has timed out, then the connections are cut and traffic flows again.
    for round in 0..3 {
        let timeouts = valkey_errors(&relay, "timeout");
        proxy.set(Fault::Stall);
        assert!(
            eventually(Duration::from_secs(10), || valkey_errors(&relay, "timeout")
                > timeouts
                || publisher.is_finished()),
            "no write-behind timeout in stall {round}"
        );
        proxy.cut();
        proxy.set(Fault::Pass);
        let accepted = proxy.accepted();
        assert!(
            eventually(Duration::from_secs(10), || proxy.accepted() > accepted),
            "the relay did not reconnect after stall {round}"
        );
    }
    let acked = publisher.join().expect("publisher");
    assert!(!acked.is_empty());
    assert_all_stored(&valkey, topic, &acked, Duration::from_secs(20));
    assert_eq!(valkey_errors(&relay, "buffered_lost"), 0);
}

/// Bug (model checker, CI seed 18): with `ack: buffered`, a resume read from Valkey ended at
/// the stream's last written entry, so acknowledged messages still in the write-behind backlog
/// were skipped by a long-poll or WebSocket resume from the start. Valkey refuses the writes
/// here (-OOM under `noeviction`) while reads still work: every acknowledged message must be
/// read, in order, before any of them is written.
#[test]
fn buffered_acks_not_yet_in_valkey_are_read_by_a_resume() {
    let (valkey, relay) = oom_valkey_and_buffered_relay("durability:\n  ack: buffered\n");
    let topic = "buffered-unwritten";
    let acked = publish_until_oom(&relay, topic, 120);
    let stored = valkey.xlen(&stream_key(topic)) as usize;
    assert!(stored < acked.len(), "everything was written: {stored}");
    let mut ws = common::ws::WsClient::connect(relay.addr);
    ws.subscribe(&[topic], Some(json!("earliest")));
    let got: Vec<String> = ws
        .recv_messages(acked.len())
        .iter()
        .map(common::id_of)
        .collect();
    assert_eq!(got, acked, "{stored} of {} were in Valkey", acked.len());
    let body = json!({"topics": [topic], "since": {topic: "0-0"}, "limit": 1000, "timeout": 1})
        .to_string();
    let answer = relay.post_json("/messages/poll", &body).json();
    let polled: Vec<String> = answer["messages"]
        .as_array()
        .expect("messages")
        .iter()
        .map(common::id_of)
        .collect();
    assert_eq!(polled, acked, "long-poll from the start");
    valkey.cli(&["CONFIG", "SET", "maxmemory", "0"]);
}

/// Bug (model checker seed 5044: buffered, count retention): acknowledged messages that
/// were neither written to Valkey yet nor held in memory any more (the hot tier keeps only
/// the newest) were skipped by a resume with no gap. Valkey refuses the writes (-OOM) while
/// the hot tier holds 20 messages: a resume from a written id gets what Valkey has, then a
/// gap, then the newest 20, in order.
#[test]
fn buffered_acks_lost_from_memory_before_valkey_got_them_are_a_gap() {
    let (valkey, relay) = oom_valkey_and_buffered_relay(
        "durability:\n  ack: buffered\nhot_tier:\n  max_messages: 20\n",
    );
    let topic = "buffered-hole";
    let acked = publish_until_oom(&relay, topic, 150);
    let stored = valkey.xlen(&stream_key(topic)) as usize;
    assert!(
        stored + 20 < acked.len(),
        "no hole to test: {stored} stored of {}",
        acked.len()
    );
    let mut ws = common::ws::WsClient::connect(relay.addr);
    ws.subscribe(&[topic], Some(json!(acked[0])));
    let mut got = Vec::new();
    let mut gap = None;
    while got.last() != acked.last() {
        let v = ws.recv();
        match v["type"].as_str() {
            Some("message") => got.push(common::id_of(&v)),
            Some("gap") if gap.is_none() => gap = Some((got.len(), v)),
            _ => panic!("unexpected {v} after {} messages", got.len()),
        }
    }
    let (at, gap) = gap.expect("a gap before the newest messages");
    let (before, after) = got.split_at(at);
    assert_eq!(
        before,
        &acked[1..=before.len()],
        "what Valkey had, in order"
    );
    assert_eq!(
        after,
        &acked[acked.len() - after.len()..],
        "then the newest"
    );
    assert_eq!(gap["oldest_available"], after[0].as_str(), "{gap}");
    valkey.cli(&["CONFIG", "SET", "maxmemory", "0"]);
}

/// Bug (model checker seed 7004: buffered, age retention): when memory no longer held any of
/// the unwritten acknowledged messages (all aged out of the hot tier), a resume read what
/// Valkey had and then nothing, with no gap. Valkey refuses the writes (-OOM) and the hot tier
/// keeps messages for 1 s.
#[test]
fn buffered_acks_aged_out_of_memory_before_valkey_got_them_are_a_gap() {
    let (valkey, relay) =
        oom_valkey_and_buffered_relay("durability:\n  ack: buffered\nhot_tier:\n  retention: 1s\n");
    let topic = "buffered-aged";
    let acked = publish_until_oom(&relay, topic, 150);
    let stored = valkey.xlen(&stream_key(topic)) as usize;
    assert!(stored < acked.len(), "no hole to test: all {stored} stored");
    // Await the hot tier's age-out as a reader sees it: a resume from the last stored id
    // finds nothing in memory any more.
    let last_stored = acked[stored - 1].clone();
    assert!(
        eventually(Duration::from_secs(10), || {
            let page = relay.read_topic(topic, &format!("order=asc&limit=10&cursor={last_stored}"));
            page["messages"].as_array().is_some_and(Vec::is_empty)
        }),
        "the unwritten messages never aged out of memory"
    );
    let mut ws = common::ws::WsClient::connect(relay.addr);
    ws.subscribe(&[topic], Some(json!(acked[0])));
    let got: Vec<String> = ws
        .recv_messages(stored - 1)
        .iter()
        .map(common::id_of)
        .collect();
    assert_eq!(got, &acked[1..stored], "what Valkey had, in order");
    let gap = ws.recv();
    assert_eq!(gap["type"], "gap", "{gap}");
    assert_eq!(gap["requested"], last_stored.as_str(), "{gap}");
    valkey.cli(&["CONFIG", "SET", "maxmemory", "0"]);
}

/// Bug (model checker seeds 7006, 7015: buffered, count retention): a resume checked for a
/// gap before it read; a `MAXLEN` trim landing between the two removed the messages right
/// after the resume point, and the read skipped them with no gap (44 in seed 7006). Here the
/// relay reaches Valkey through a proxy that delays every chunk by 400 ms: the resume's first
/// request is on its way when a bulk of 300 is acknowledged, whose write-behind (the stream
/// keeps 50) trims past the resume point before the resume's next request runs.
#[test]
fn a_trim_between_a_resume_s_requests_is_reported_as_a_gap() {
    use common::fault_proxy::{Fault, FaultProxy};
    let valkey = ValkeyServer::start(ValkeyOpts::default());
    let upstream: std::net::SocketAddr = format!("{}:{}", valkey.host(), valkey.port)
        .parse()
        .expect("valkey address");
    let proxy = FaultProxy::start(upstream);
    let port = proxy.port().to_string();
    let relay = valkey.start_relay(
        "durability:\n  ack: buffered\nstorage:\n  max_messages_per_topic: 50\n\
         hot_tier:\n  max_messages: 20\nvalkey:\n  command_timeout: 5s\n",
        &[("VALKEY_PORT", port.as_str())],
    );
    let topic = "trim-race";
    let first = publish_bulk(&relay, topic, 0, 40, None);
    assert!(
        eventually(Duration::from_secs(10), || valkey.xlen(&stream_key(topic))
            == 40),
        "the first 40 were not written"
    );
    proxy.set(Fault::Delay(Duration::from_millis(400)));
    let sent = proxy.bytes_to_upstream();
    let (addr, since) = (relay.addr, first[5].clone());
    // Memory holds only the newest 20: the resume from the 6th reads Valkey.
    let resume = std::thread::spawn(move || {
        let mut conn = common::Conn::connect(addr);
        let body = json!({"topics": [topic], "since": {topic: since}, "limit": 5, "timeout": 5});
        let resp = conn.request("POST", "/messages/poll", Some(body.to_string().as_bytes()));
        assert_eq!(resp.status, 200, "{resp:?}");
        resp.json()
    });
    assert!(
        eventually(Duration::from_secs(5), || proxy.bytes_to_upstream() > sent),
        "the resume sent nothing to Valkey"
    );
    publish_bulk(&relay, topic, 40, 300, None);
    let body = resume.join().expect("resume");
    let got = ids_of(&body);
    if got.first() != Some(&first[6]) {
        let gaps = body["gaps"].as_array().map_or(0, Vec::len);
        assert_eq!(gaps, 1, "skipped {} without a gap: {body}", first[6]);
    }
    proxy.set(Fault::Pass);
}

/// Publishes `n` messages `{"i": start + k, "pad": "x" × pad}` to `topic` in one bulk request;
/// returns their ids in order.
fn publish_padded(relay: &Server, topic: &str, start: usize, n: usize, pad: usize) -> Vec<String> {
    let filler = "x".repeat(pad);
    let items: Vec<Value> = (start..start + n)
        .map(|i| json!({"topic": topic, "payload": {"i": i, "pad": filler}}))
        .collect();
    let resp = relay.post_json(
        "/api/v1/messages/bulk",
        &json!({ "messages": items }).to_string(),
    );
    let body = resp.json();
    let refused: Vec<&Value> = body["results"]
        .as_array()
        .expect("results")
        .iter()
        .filter(|r| r["status"] != "accepted")
        .collect();
    assert!(
        refused.is_empty(),
        "{} refused: {:?}",
        refused.len(),
        refused.first()
    );
    body["results"]
        .as_array()
        .expect("results")
        .iter()
        .map(|r| r["message_id"].as_str().expect("message_id").to_string())
        .collect()
}

/// Bug (model checker seed 7061: buffered, count retention, large messages): one page read
/// from Valkey in several round trips; a `MAXLEN` trim landing between two of them removed
/// entries after the first round's last, and the page went on after the hole with no gap
/// (37 to 76 messages). Entries of 100 KB make a page take several rounds; the proxy delays
/// every chunk by 400 ms, and a bulk acknowledged during the first round trims the stream
/// (it keeps 50) before the second. Every message of the answer follows the one before it,
/// or a gap that names it.
#[test]
fn a_trim_between_the_round_trips_of_one_page_is_reported_as_a_gap() {
    use common::fault_proxy::{Fault, FaultProxy};
    let valkey = ValkeyServer::start(ValkeyOpts::default());
    let upstream: std::net::SocketAddr = format!("{}:{}", valkey.host(), valkey.port)
        .parse()
        .expect("valkey address");
    let proxy = FaultProxy::start(upstream);
    let port = proxy.port().to_string();
    let relay = valkey.start_relay(
        "durability:\n  ack: buffered\nstorage:\n  max_messages_per_topic: 50\n\
         hot_tier:\n  max_messages: 5\nhttp:\n  max_body_bytes: 16MiB\n\
         valkey:\n  command_timeout: 5s\n",
        &[("VALKEY_PORT", port.as_str())],
    );
    let topic = "round-trim-race";
    let mut acked = publish_padded(&relay, topic, 0, 40, 100_000);
    assert!(
        eventually(Duration::from_secs(10), || valkey.xlen(&stream_key(topic))
            == 40),
        "the first 40 were not written"
    );
    proxy.set(Fault::Delay(Duration::from_millis(400)));
    let sent = proxy.bytes_to_upstream();
    let (addr, since) = (relay.addr, acked[0].clone());
    // Memory holds only the newest 5: the resume reads Valkey, about 10 entries a round.
    let resume = std::thread::spawn(move || {
        let mut conn = common::Conn::connect(addr);
        let body = json!({"topics": [topic], "since": {topic: since}, "limit": 30, "timeout": 5});
        let resp = conn.request("POST", "/messages/poll", Some(body.to_string().as_bytes()));
        assert_eq!(resp.status, 200, "{resp:?}");
        resp.json()
    });
    assert!(
        eventually(Duration::from_secs(5), || proxy.bytes_to_upstream() > sent),
        "the resume sent nothing to Valkey"
    );
    acked.extend(publish_padded(&relay, topic, 40, 40, 100_000));
    let body = resume.join().expect("resume");
    proxy.set(Fault::Pass);
    let got = ids_of(&body);
    assert!(!got.is_empty(), "{body}");
    let gaps: Vec<&str> = body["gaps"]
        .as_array()
        .map(|g| g.iter().filter_map(|g| g["requested"].as_str()).collect())
        .unwrap_or_default();
    let mut previous = acked[0].as_str();
    for id in &got {
        let at = acked
            .iter()
            .position(|a| a == id)
            .expect("an acknowledged id");
        let follows = acked[at - 1] == previous;
        assert!(
            follows || gaps.contains(&previous),
            "{id} came after {previous} with no gap naming it; gaps after {gaps:?}"
        );
        previous = id.as_str();
    }
}
