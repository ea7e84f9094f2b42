//! HTTP/1.1 request decoding as a connection does it: bytes arrive in arbitrary reads and go
//! through `http::codec::RequestDecoder` (heads, Content-Length and chunked bodies, pipelining,
//! `Expect: 100-continue`), then each request through the sans-IO steps the server takes
//! before touching shard state: the guard (rate limits, `Host`, `Origin`, CORS preflights,
//! `X-Forwarded-For`, the JSON-only rule), routing, query/header parsing of history, long-poll
//! GET and SSE, the WebSocket handshake, and the JSON error response it would write.
//!
//! Input: see `pulsar_relay_fuzz` (`knob % 4` picks a row of `LIMITS`). The same stream is
//! decoded twice, in one read and in the input's pieces, and must give the same requests and
//! the same outcome: read boundaries must not matter (one documented exception, below).

#![no_main]

use std::net::{IpAddr, Ipv4Addr};
use std::sync::OnceLock;
use std::time::{Duration, Instant, UNIX_EPOCH};

use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;
use pulsar_relay::config::{Config, IpNet};
use pulsar_relay::http::codec::{Event, HttpError, Limits, Request, RequestDecoder};
use pulsar_relay::http::error::ApiError;
use pulsar_relay::http::guard::{self, Guard, Verdict};
use pulsar_relay::http::handlers::events as sse;
use pulsar_relay::http::handlers::poll as longpoll;
use pulsar_relay::http::handlers::topics::parse_history_query;
use pulsar_relay::http::handlers::websocket;
use pulsar_relay::http::response::{write_http_error, write_json_error, DateCache};
use pulsar_relay::http::router::{self, Route};
use pulsar_relay::ws::handshake;
use pulsar_relay_fuzz::{relay_config, SplitInput};

/// The defaults, tiny limits (every limit reachable by short inputs), more header slots than
/// the stack array (the heap path), and zero-byte bodies.
const LIMITS: [Limits; 4] = [
    Limits {
        max_header_bytes: 8 * 1024,
        max_headers: 64,
        max_body_bytes: 1024 * 1024,
    },
    Limits {
        max_header_bytes: 64,
        max_headers: 2,
        max_body_bytes: 16,
    },
    Limits {
        max_header_bytes: 512,
        max_headers: 100,
        max_body_bytes: 300,
    },
    Limits {
        max_header_bytes: 256,
        max_headers: 1,
        max_body_bytes: 0,
    },
];

/// What decoding a whole stream produced.
#[derive(Debug, PartialEq)]
struct Outcome {
    requests: Vec<Request>,
    /// Whether decoding stopped at an error. Only presence is compared: which check fires
    /// first may depend on how much of a bad head had arrived.
    failed: bool,
    in_body_at_end: bool,
}

fn decode_all<'a>(limits: Limits, pieces: impl Iterator<Item = &'a [u8]>) -> Outcome {
    let mut decoder = RequestDecoder::new(limits);
    let mut buf = BytesMut::new();
    let mut requests = Vec::new();
    // `ContinueExpected` events since the last request.
    let mut continues = 0;
    for piece in pieces {
        buf.extend_from_slice(piece);
        loop {
            let before = buf.len();
            match decoder.decode(&mut buf) {
                Ok(Some(Event::Request(request))) => {
                    assert!(buf.len() <= before);
                    assert!(
                        request.body().len() <= limits.max_body_bytes,
                        "body of {} bytes over the {} limit",
                        request.body().len(),
                        limits.max_body_bytes
                    );
                    continues = 0;
                    requests.push(request);
                }
                Ok(Some(Event::ContinueExpected)) => {
                    continues += 1;
                    assert_eq!(continues, 1, "100-continue emitted twice for one request");
                    assert!(decoder.in_body());
                }
                Ok(None) => break,
                Err(error) => {
                    check_http_error(&error);
                    return Outcome {
                        requests,
                        failed: true,
                        in_body_at_end: false,
                    };
                }
            }
        }
    }
    Outcome {
        requests,
        failed: false,
        in_body_at_end: decoder.in_body(),
    }
}

fn date() -> &'static DateCache {
    static DATE: OnceLock<DateCache> = OnceLock::new();
    DATE.get_or_init(|| DateCache::new(UNIX_EPOCH + Duration::from_secs(1_700_000_000)))
}

/// The error response must be a well-formed head plus a JSON body.
fn check_http_error(error: &HttpError) {
    let mut out = BytesMut::new();
    write_http_error(&mut out, date(), error);
    check_json_body(&out);
}

fn check_json_body(response: &[u8]) {
    let Some(end) = response.windows(4).position(|w| w == b"\r\n\r\n") else {
        panic!("response without an end of head");
    };
    let body = &response[end + 4..];
    if let Err(e) = serde_json::from_slice::<serde_json::Value>(body) {
        panic!(
            "error body is not JSON ({e}): {:?}",
            String::from_utf8_lossy(body)
        );
    }
}

/// The built-in configuration with every list of the guard set, so each of its paths can be
/// reached: allowed origins, trusted host names and wildcards, a trusted proxy range (the
/// peer below is in it, so `X-Forwarded-For` is parsed).
fn guarded_config() -> &'static Config {
    static CONFIG: OnceLock<Config> = OnceLock::new();
    CONFIG.get_or_init(|| {
        let mut config = relay_config().clone();
        config.security.allowed_origins = vec!["https://app.example".to_owned()];
        config.security.trusted_hosts = vec![
            "localhost".to_owned(),
            "*.svc.example".to_owned(),
            "::1".to_owned(),
        ];
        config.security.trusted_proxies =
            vec![IpNet::parse("127.0.0.0/8").expect("literal network")];
        config.rate_limit.exempt.clear();
        config
    })
}

/// The sans-IO part of what `http::handlers::handle` does with a request.
fn serve(request: &Request) {
    let config = relay_config();
    // A fresh guard per request: its buckets must not make the two decodings differ.
    let guard = Guard::new(guarded_config());
    let screened = guard.screen(
        request,
        IpAddr::V4(Ipv4Addr::LOCALHOST),
        None,
        Instant::now(),
    );
    if let Verdict::Refuse(error) = &screened.verdict {
        assert!(matches!(error.status, 400 | 403 | 429), "{error:?}");
        let mut out = BytesMut::new();
        write_json_error(
            &mut out,
            date(),
            error.status,
            error.code,
            &error.message,
            request.keep_alive(),
            false,
            &screened.cors.response_headers(),
        );
        check_json_body(&out);
    }
    let _ = guard::require_json_body(request);
    let _ = (
        request.method_str(),
        request.keep_alive(),
        request.content_type(),
    );
    for (name, value) in request.headers() {
        let _ = (name.len(), value.len());
    }
    let result: Result<(), ApiError> = match router::route(request.method(), request.path()) {
        Err(e) => Err(e),
        Ok(Route::History(topic)) => {
            pulsar_relay::topic::validate(&topic, config.api.max_topic_name_len)
                .map_err(ApiError::from)
                .and_then(|()| parse_history_query(request.query(), &config.api).map(drop))
        }
        Ok(Route::PollGet) => longpoll::parse_poll_query(
            request.query(),
            &config.longpoll,
            config.api.max_topic_name_len,
        )
        .map(drop),
        Ok(Route::Events(topic)) => sse::parse(
            request,
            topic,
            config.longpoll.max_topics,
            config.api.max_topic_name_len,
        )
        .map(drop),
        Ok(Route::WebSocket) => match handshake::accept(&websocket::upgrade_request(request)) {
            Ok(accepted) => {
                assert!(accepted.response.starts_with(b"HTTP/1.1 101 "));
                Ok(())
            }
            Err(e) => Err(ApiError::new(e.status(), e.code(), e.message())),
        },
        Ok(_) => Ok(()),
    };
    if let Err(error) = result {
        let mut out = BytesMut::new();
        let mut extra = vec![];
        if error.status == 405 {
            extra.push(("Allow", router::allow_header(request.path())));
        }
        write_json_error(
            &mut out,
            date(),
            error.status,
            error.code,
            &error.message,
            request.keep_alive(),
            false,
            &extra,
        );
        check_json_body(&out);
    }
}

fuzz_target!(|data: &[u8]| {
    let Some(input) = SplitInput::parse(data) else {
        return;
    };
    let limits = LIMITS[usize::from(input.knob) % LIMITS.len()];
    let whole = decode_all(limits, std::iter::once(input.stream));
    for request in &whole.requests {
        serve(request);
    }
    if !input.lens.is_empty() {
        let split = decode_all(limits, input.pieces());
        if whole.failed && !split.failed {
            // The one allowed difference: the decoder runs httparse on the first read of a head
            // (to refuse garbage such as a TLS hello at once) and then only once the end of the
            // head is buffered. A bad head that never ends is refused at once when it arrives
            // in one read, and waited on (up to the head limit or timeout) when its first read
            // was a clean prefix.
            assert_eq!(whole.requests, split.requests);
            assert!(
                !split.in_body_at_end,
                "split input stuck in a body the whole input refused"
            );
        } else {
            assert_eq!(whole, split, "read boundaries changed the decoded requests");
        }
    }
});
