//! Cost of the guard every API request passes before routing (`Guard::screen`, `Instant::now`
//! included as `handlers::handle` pays it, then `require_json_body` for a publish): a client on
//! loopback (exempt from the address limit, the default for local tools and benchmarks), one
//! whose address bucket is looked up and charged, the same spread over 10,000 addresses (map
//! misses and generation turnover), and a browser request with an allowed `Origin` (origin
//! normalised, CORS headers built).
//!
//! Does not measure decoding (see `http_parse`) or writing the CORS headers into the response.

use std::net::{IpAddr, Ipv4Addr};
use std::time::Instant;

use bytes::BytesMut;
use divan::Bencher;
use pulsar_relay::config::{self, BucketConfig, Cli, Config, Rate};
use pulsar_relay::http::codec::{Event, Limits, Request, RequestDecoder};
use pulsar_relay::http::guard::{require_json_body, Guard, Verdict};

fn main() {
    divan::main();
}

fn config() -> Config {
    let mut config = config::load(&Cli::default(), &|_| None).expect("built-in defaults");
    config.security.allowed_origins = vec!["https://app.example".to_owned()];
    // Never refuse: the benchmark times the check, not the 429.
    config.rate_limit.address = Some(BucketConfig {
        rate: Rate::per_second(1_000_000_000),
        burst: 1_000_000_000,
    });
    config
}

fn request(extra: &str) -> Request {
    let body = r#"{"topic":"orders","payload":{"order_id":1}}"#;
    let text = format!(
        "POST /api/v1/messages HTTP/1.1\r\nHost: localhost:8080\r\nUser-Agent: curl/8.5.0\r\n\
         Accept: */*\r\nContent-Type: application/json\r\n{extra}Content-Length: {}\r\n\r\n{body}",
        body.len()
    );
    let mut buf = BytesMut::from(text.as_bytes());
    match RequestDecoder::new(Limits::default()).decode(&mut buf) {
        Ok(Some(Event::Request(r))) => r,
        other => panic!("fixture does not decode: {other:?}"),
    }
}

fn screen(guard: &Guard, request: &Request, peer: IpAddr) {
    let screened = guard.screen(request, peer, None, Instant::now());
    assert_eq!(screened.verdict, Verdict::Pass);
    assert!(require_json_body(request).is_ok());
    divan::black_box(screened);
}

#[divan::bench]
fn loopback_client(bencher: Bencher) {
    let guard = Guard::new(&config());
    let request = request("");
    bencher.bench_local(|| screen(&guard, &request, IpAddr::V4(Ipv4Addr::LOCALHOST)));
}

#[divan::bench]
fn counted_address(bencher: Bencher) {
    let guard = Guard::new(&config());
    let request = request("");
    let peer = IpAddr::V4(Ipv4Addr::new(10, 0, 0, 1));
    bencher.bench_local(|| screen(&guard, &request, peer));
}

#[divan::bench]
fn counted_address_10k_clients(bencher: Bencher) {
    let guard = Guard::new(&config());
    let request = request("");
    let mut next = 0u32;
    bencher.bench_local(|| {
        next = (next + 1) % 10_000;
        screen(&guard, &request, IpAddr::V4((0x0A00_0000 + next).into()));
    });
}

#[divan::bench]
fn browser_allowed_origin(bencher: Bencher) {
    let guard = Guard::new(&config());
    let request = request("Origin: https://app.example\r\n");
    bencher.bench_local(|| screen(&guard, &request, IpAddr::V4(Ipv4Addr::LOCALHOST)));
}
