//! Rate limits over real sockets: exactly `burst` requests pass, then 429 `RATE_LIMITED` with
//! `Retry-After`, and a request passes again once the advertised wait is over; client
//! addresses have their own buckets (clients bound to 127.0.0.1 and 127.0.0.2), loopback is
//! exempt by default, the login bucket, `X-Forwarded-For` from a trusted proxy, probes never
//! limited, the metric, and the bound on the buckets a shard keeps.
//!
//! Relays here run one shard: limits are per shard, and one shard makes "exactly `burst`"
//! exact whichever shard the kernel hands a connection to.

mod common;

use std::net::IpAddr;
use std::time::Duration;

use common::{Conn, RelayOpts, Response, Server};

fn relay(yaml: &str) -> Server {
    Server::start_with_shards(yaml, 1)
}

fn ip(text: &str) -> IpAddr {
    text.parse().expect("literal")
}

/// `n` pipelined `GET /api/v1/topics` on one connection from `source`, their statuses.
fn burst_from(server: &Server, source: IpAddr, n: usize) -> Vec<Response> {
    let mut conn = Conn::connect_from(server.addr, source);
    let mut requests = Vec::new();
    for _ in 0..n {
        requests.extend_from_slice(b"GET /api/v1/topics HTTP/1.1\r\nHost: localhost\r\n\r\n");
    }
    // One write: the relay handles them back to back, far within a token's refill time.
    conn.send(&requests);
    conn.read_responses(n)
}

fn statuses(responses: &[Response]) -> Vec<u16> {
    responses.iter().map(|r| r.status).collect()
}

fn assert_limited(resp: &Response) -> u64 {
    assert_eq!(resp.status, 429, "{resp:?}");
    let v = resp.json();
    assert_eq!(v["error"], "RATE_LIMITED", "{resp:?}");
    assert!(v["message"].is_string() && v.get("detail").is_some());
    let secs: u64 = resp
        .header("retry-after")
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no whole-second Retry-After: {resp:?}"));
    assert!(secs >= 1, "{resp:?}");
    secs
}

fn metric(server: &Server, line_start: &str) -> u64 {
    let text = server.get("/metrics").text();
    text.lines()
        .find_map(|l| l.strip_prefix(line_start))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no {line_start} in /metrics:\n{text}"))
}

#[test]
fn exactly_burst_passes_then_429_until_the_advertised_wait_is_over() {
    let server = relay("rate_limit:\n  exempt: []\n  address_rate: 1/s\n  address_burst: 5\n");
    let client = ip("127.0.0.1");
    let answers = burst_from(&server, client, 6);
    assert_eq!(statuses(&answers), [200, 200, 200, 200, 200, 429]);
    let wait = assert_limited(&answers[5]);
    assert_eq!(wait, 1, "one token a second");

    // Once the advertised wait is over, one token is back: one request passes, the next not.
    std::thread::sleep(Duration::from_secs(wait));
    let answers = burst_from(&server, client, 2);
    assert_eq!(statuses(&answers), [200, 429]);

    // Probes, readiness and scrapes are never limited, even now.
    for path in ["/health", "/ready", "/metrics"] {
        for _ in 0..20 {
            assert_eq!(server.get(path).status, 200, "{path}");
        }
    }
    assert_eq!(
        metric(&server, "relay_rate_limited_total{scope=\"address\"} "),
        2
    );
    assert_eq!(
        metric(&server, "relay_rate_limited_total{scope=\"login\"} "),
        0
    );
    assert_eq!(
        metric(&server, "relay_rate_limited_total{scope=\"principal\"} "),
        0
    );
}

#[test]
fn every_client_address_has_its_own_bucket() {
    let server = relay("rate_limit:\n  exempt: []\n  address_rate: 1/min\n  address_burst: 3\n");
    let first = burst_from(&server, ip("127.0.0.1"), 4);
    assert_eq!(statuses(&first), [200, 200, 200, 429]);
    assert_eq!(
        assert_limited(&first[3]),
        60,
        "1/min: a minute until the next token"
    );
    // Another address is untouched by the first one's exhaustion...
    let second = burst_from(&server, ip("127.0.0.2"), 4);
    assert_eq!(statuses(&second), [200, 200, 200, 429]);
    // ... and the first stays limited, on any new connection.
    assert_eq!(statuses(&burst_from(&server, ip("127.0.0.1"), 1)), [429]);
    // Asked from a third address (the first is limited): three buckets.
    let stats = Conn::connect_from(server.addr, ip("127.0.0.9"))
        .request("GET", "/api/v1/stats", None)
        .json();
    assert_eq!(
        stats["shards"][0]["rate_limit_buckets"]["address"], 3,
        "{stats}"
    );
}

#[test]
fn loopback_is_exempt_by_default() {
    let server = relay("rate_limit:\n  address_rate: 1/min\n  address_burst: 1\n");
    for source in ["127.0.0.1", "127.0.0.2"] {
        let answers = burst_from(&server, ip(source), 50);
        assert!(answers.iter().all(|r| r.status == 200), "{source}");
    }
    let stats = server.get("/api/v1/stats").json();
    assert_eq!(
        stats["shards"][0]["rate_limit_buckets"]["address"], 0,
        "{stats}"
    );
    // Exempting one address leaves the others limited.
    let server =
        relay("rate_limit:\n  exempt: [127.0.0.2]\n  address_rate: 1/min\n  address_burst: 1\n");
    assert_eq!(
        statuses(&burst_from(&server, ip("127.0.0.1"), 2)),
        [200, 429]
    );
    assert_eq!(
        statuses(&burst_from(&server, ip("127.0.0.2"), 3)),
        [200, 200, 200]
    );
}

#[test]
fn logins_have_a_stricter_bucket_per_address() {
    let server = relay(
        "rate_limit:\n  exempt: []\n  login_rate: 1/min\n  login_burst: 2\n\
         security:\n  allowed_origins: [\"https://app.example\"]\n",
    );
    // No /auth/login route on this branch: the limit is taken before routing, so the
    // attempts that pass get the router's 404.
    let mut conn = Conn::connect_from(server.addr, ip("127.0.0.3"));
    let login = |conn: &mut Conn| {
        conn.request_with(
            "POST",
            "/auth/login",
            &[
                ("Content-Type", "application/x-www-form-urlencoded"),
                ("Origin", "https://app.example"),
            ],
            Some(b"username=a&password=b"),
        )
    };
    assert_eq!(login(&mut conn).status, 404);
    assert_eq!(login(&mut conn).status, 404);
    let refused = login(&mut conn);
    assert_eq!(
        assert_limited(&refused),
        60,
        "1/min, burst 2: a minute to the next"
    );
    // The allowed page can read the 429 and its Retry-After.
    assert_eq!(
        refused.header("access-control-allow-origin"),
        Some("https://app.example")
    );
    assert_eq!(
        refused.header("access-control-expose-headers"),
        Some("Retry-After")
    );
    // Other requests from that address, and logins from another, still pass.
    assert_eq!(conn.request("GET", "/api/v1/topics", None).status, 200);
    let mut other = Conn::connect_from(server.addr, ip("127.0.0.4"));
    assert_eq!(login(&mut other).status, 404);
    assert_eq!(
        metric(&server, "relay_rate_limited_total{scope=\"login\"} "),
        1
    );
}

#[test]
fn clients_behind_a_trusted_proxy_are_counted_apart() {
    // 127.0.0.1 plays the load balancer; 127.0.0.2 is a client that claims to be others.
    let server = relay(
        "security:\n  trusted_proxies: [127.0.0.1]\n\
         rate_limit:\n  exempt: []\n  address_rate: 1/min\n  address_burst: 1\n",
    );
    let via_proxy = |client: &str| {
        Conn::connect_from(server.addr, ip("127.0.0.1")).request_with(
            "GET",
            "/api/v1/topics",
            &[("X-Forwarded-For", client)],
            None,
        )
    };
    assert_eq!(via_proxy("203.0.113.1").status, 200);
    assert_eq!(via_proxy("203.0.113.2").status, 200);
    assert_limited(&via_proxy("203.0.113.1"));
    // A client's own claim, left of what the proxy appended, changes nothing.
    assert_limited(&via_proxy("198.51.100.7, 203.0.113.2"));
    // An untrusted peer's header is ignored: it is counted as itself.
    let direct = |claim: &str| {
        Conn::connect_from(server.addr, ip("127.0.0.2")).request_with(
            "GET",
            "/api/v1/topics",
            &[("X-Forwarded-For", claim)],
            None,
        )
    };
    assert_eq!(direct("198.51.100.8").status, 200);
    assert_limited(&direct("198.51.100.9"));
}

#[test]
fn cycling_source_addresses_cannot_grow_the_buckets_past_the_cap() {
    let cap = 100;
    let server = relay(&format!(
        "rate_limit:\n  exempt: []\n  address_rate: 1/min\n  address_burst: 1\n  \
         max_tracked: {cap}\n"
    ));
    let steady = ip("127.0.0.2");
    assert_eq!(statuses(&burst_from(&server, steady, 2)), [200, 429]);
    // 600 addresses from 127.1.0.0 on, each with one request (all let through: fresh
    // buckets), the steady client in between, still limited: it stays tracked.
    for i in 0..600u32 {
        let source = IpAddr::V4((0x7F01_0000 + i).into());
        assert_eq!(statuses(&burst_from(&server, source, 1)), [200], "{source}");
        if i % 20 == 0 {
            assert_eq!(
                statuses(&burst_from(&server, steady, 1)),
                [429],
                "after {i}"
            );
        }
    }
    let stats = server.get("/api/v1/stats").json();
    let held = stats["shards"][0]["rate_limit_buckets"]["address"]
        .as_u64()
        .expect("bucket count");
    assert!(
        (cap as u64 / 2..=cap as u64).contains(&held),
        "{held} buckets: {stats}"
    );
}

#[test]
fn defaults_let_a_fast_producer_through() {
    // The defaults (1000/s, burst 2000 per address) with loopback not exempt, so they apply:
    // a producer publishing 2000 messages back to back, as a client flushing its backlog
    // does, is never refused.
    let server = Server::start_opts(RelayOpts {
        shards: 1,
        ..RelayOpts::new("rate_limit:\n  exempt: []\n")
    });
    let mut conn = Conn::connect_from(server.addr, ip("127.0.0.5"));
    // In batches of 100 pipelined requests, so neither side's socket buffer fills while the
    // other waits.
    for batch in 0..20 {
        let mut requests = Vec::new();
        for i in 0..100 {
            let body = common::publish_body("fast", &(batch * 100 + i).to_string());
            requests.extend(common::build_request(
                "POST",
                "/api/v1/messages",
                &[],
                Some(body.as_bytes()),
            ));
        }
        conn.send(&requests);
        let answers = conn.read_responses(100);
        assert!(
            answers.iter().all(|r| r.status == 201),
            "batch {batch}: a publish was refused"
        );
    }
    assert_eq!(
        metric(&server, "relay_rate_limited_total{scope=\"address\"} "),
        0
    );
}
