//! Cost of turning read-buffer bytes into requests: `RequestDecoder::decode` on a typical
//! single-message publish, on 16 pipelined publishes (per request via the items counter), and
//! on chunked bodies (one data chunk: zero-copy; three chunks: copied into one buffer).
//!
//! Does not measure routing, body parsing (see `publish_body`) or socket reads. The decoder
//! is created once per benchmark, like once per connection in the relay; each iteration gets
//! a fresh copy of the bytes (copying is outside the timing).

use bytes::BytesMut;
use divan::counter::ItemsCount;
use divan::Bencher;
use pulsar_relay::http::codec::{Event, Limits, RequestDecoder};

fn main() {
    divan::main();
}

/// A 114-byte publish body: a short topic and a 77-byte JSON payload.
const BODY: &[u8] = br#"{"topic":"orders.eu-west","payload":{"order_id":"A-1023456","status":"shipped","amount":1299.95,"currency":"EUR"}}"#;

/// What `curl -d @body.json -H 'Content-Type: application/json'` sends.
fn head(framing: &str) -> String {
    format!(
        "POST /api/v1/messages HTTP/1.1\r\n\
         Host: relay.internal:8080\r\n\
         User-Agent: curl/8.5.0\r\n\
         Accept: */*\r\n\
         Content-Type: application/json\r\n\
         {framing}\r\n\
         \r\n"
    )
}

fn publish_request() -> Vec<u8> {
    let mut request = head(&format!("Content-Length: {}", BODY.len())).into_bytes();
    request.extend_from_slice(BODY);
    request
}

/// The body as `chunks` data chunks of near-equal size, then the last chunk.
fn chunked_request(chunks: usize) -> Vec<u8> {
    let mut request = head("Transfer-Encoding: chunked").into_bytes();
    for piece in BODY.chunks(BODY.len().div_ceil(chunks)) {
        request.extend_from_slice(format!("{:x}\r\n", piece.len()).as_bytes());
        request.extend_from_slice(piece);
        request.extend_from_slice(b"\r\n");
    }
    request.extend_from_slice(b"0\r\n\r\n");
    request
}

/// Decodes every request in `bytes` once outside the timing, so a fixture the decoder rejects
/// or splits differently fails loudly instead of timing an error path.
fn check_fixture(bytes: &[u8], expected_requests: usize) {
    let mut decoder = RequestDecoder::new(Limits::default());
    let mut buf = BytesMut::from(bytes);
    let mut requests = 0;
    while let Some(event) = decoder.decode(&mut buf).expect("fixture must decode") {
        match event {
            Event::Request(request) => {
                assert_eq!(request.body().as_ref(), BODY, "fixture body");
                requests += 1;
            }
            Event::ContinueExpected => panic!("fixture sends no Expect header"),
        }
    }
    assert_eq!(requests, expected_requests, "requests in fixture");
    assert!(buf.is_empty(), "fixture has trailing bytes");
}

fn bench_decode_all(bencher: Bencher, bytes: Vec<u8>, requests: usize) {
    check_fixture(&bytes, requests);
    let mut decoder = RequestDecoder::new(Limits::default());
    bencher
        .counter(ItemsCount::new(requests))
        .with_inputs(|| BytesMut::from(&bytes[..]))
        .bench_local_refs(|buf| {
            let mut decoded = Vec::with_capacity(requests);
            while let Ok(Some(event)) = decoder.decode(buf) {
                decoded.push(event);
            }
            decoded
        });
}

/// One `POST /api/v1/messages` with a Content-Length body.
#[divan::bench]
fn single_publish(bencher: Bencher) {
    let bytes = publish_request();
    check_fixture(&bytes, 1);
    let mut decoder = RequestDecoder::new(Limits::default());
    bencher
        .counter(ItemsCount::new(1usize))
        .with_inputs(|| BytesMut::from(&bytes[..]))
        .bench_local_refs(|buf| decoder.decode(buf));
}

/// 16 publishes arriving in one read; the time is for all 16, the items rate is per request.
#[divan::bench]
fn pipelined_16(bencher: Bencher) {
    bench_decode_all(bencher, publish_request().repeat(16), 16);
}

/// `Transfer-Encoding: chunked` with the body in one data chunk (the zero-copy case).
#[divan::bench]
fn chunked_1_chunk(bencher: Bencher) {
    bench_decode_all(bencher, chunked_request(1), 1);
}

/// `Transfer-Encoding: chunked` with the body in three data chunks (copied into one buffer).
#[divan::bench]
fn chunked_3_chunks(bencher: Bencher) {
    bench_decode_all(bencher, chunked_request(3), 1);
}
