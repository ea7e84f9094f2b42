//! Cost of parsing and validating publish bodies: `parse_publish` on one 114-byte message and
//! `parse_bulk` on a 100-message bulk body (per message via the items counter).
//!
//! Does not measure HTTP framing (see `http_parse`) or the append itself (see `hot_tier`).
//! The limits are the relay's defaults, loaded the way `main` loads them (without a
//! config file or environment).

use divan::counter::ItemsCount;
use divan::{black_box, Bencher};
use pulsar_relay::config::{ApiConfig, Cli};
use pulsar_relay::http::handlers::publish::{parse_bulk, parse_publish};

fn main() {
    divan::main();
}

/// A 114-byte publish body: a short topic and a 77-byte JSON payload.
const BODY: &[u8] = br#"{"topic":"orders.eu-west","payload":{"order_id":"A-1023456","status":"shipped","amount":1299.95,"currency":"EUR"}}"#;

const BULK_MESSAGES: usize = 100;

fn api_limits() -> ApiConfig {
    pulsar_relay::config::load(&Cli::default(), &|_| None)
        .expect("default configuration must load")
        .api
}

/// `{"messages":[…]}` with 100 items like [`BODY`], spread over 10 topics, every other one
/// with a ttl and every fifth with metadata, so validation sees each optional field.
fn bulk_body() -> Vec<u8> {
    let items: Vec<String> = (0..BULK_MESSAGES)
        .map(|i| {
            let ttl = if i % 2 == 0 { r#","ttl":60"# } else { "" };
            let metadata = if i % 5 == 0 {
                r#","metadata":{"source":"checkout"}"#
            } else {
                ""
            };
            format!(
                r#"{{"topic":"orders.eu-west-{}","payload":{{"order_id":"A-{:07}","status":"shipped","amount":1299.95,"currency":"EUR"}}{ttl}{metadata}}}"#,
                i % 10,
                1_023_456 + i
            )
        })
        .collect();
    format!(r#"{{"messages":[{}]}}"#, items.join(",")).into_bytes()
}

#[divan::bench]
fn publish_single(bencher: Bencher) {
    let limits = api_limits();
    let item = parse_publish(BODY, &limits).expect("fixture must be valid");
    assert_eq!(item.topic, "orders.eu-west");
    bencher
        .counter(ItemsCount::new(1usize))
        .bench_local(|| parse_publish(black_box(BODY), &limits));
}

/// The time is for the whole body; the items rate is per message.
#[divan::bench]
fn bulk_100(bencher: Bencher) {
    let limits = api_limits();
    let body = bulk_body();
    let items = parse_bulk(&body, &limits).expect("fixture envelope must be valid");
    assert_eq!(items.len(), BULK_MESSAGES);
    assert!(
        items.iter().all(Result::is_ok),
        "every fixture item is valid"
    );
    bencher
        .counter(ItemsCount::new(BULK_MESSAGES))
        .bench_local(|| parse_bulk(black_box(&body), &limits));
}
