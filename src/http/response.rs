//! HTTP/1.1 response encoding into an output buffer, plus the cached `Date` header value.
//!
//! Owns: the byte layout of responses (status line, the fixed `Date`/`Server`/`Content-Type`/
//! `Content-Length`/`Connection` headers, caller-supplied extra headers, body), `100 Continue`,
//! and the JSON error body shape shared with clients of the old Python relay.
//! Does not own: deciding keep-alive or status codes, writing to sockets (the connection
//! appends several pipelined responses to one `BytesMut` and writes it once), or reading the
//! clock (`DateCache::update` takes `now`).

use std::io::Write as _;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::{BufMut, BytesMut};

use super::codec::HttpError;

const SERVER_HEADER: &[u8] = b"Server: pulsar-relay\r\n";

/// Length of an IMF-fixdate, e.g. `Sun, 06 Nov 1994 08:49:37 GMT`.
const IMF_FIXDATE_LEN: usize = 29;

/// Last second httpdate can format (9999-12-31T23:59:59Z); it panics past it.
const LAST_FORMATTABLE_SECOND: u64 = 253_402_300_799;

/// Defines `reason_phrase` and the pre-built status lines from one table, so a status line is
/// one `extend_from_slice` of a `&'static [u8]` (no formatting on the hot path).
macro_rules! status_table {
    ($($code:literal => $reason:literal,)*) => {
        /// Reason phrase for `status`; empty for codes we never send (a status line with an
        /// empty reason is valid, RFC 9112 §4).
        pub fn reason_phrase(status: u16) -> &'static str {
            match status {
                $($code => $reason,)*
                _ => "",
            }
        }

        fn static_status_line(status: u16) -> Option<&'static [u8]> {
            match status {
                $($code => Some(concat!("HTTP/1.1 ", $code, " ", $reason, "\r\n").as_bytes()),)*
                _ => None,
            }
        }
    };
}

status_table! {
    100 => "Continue",
    101 => "Switching Protocols",
    200 => "OK",
    201 => "Created",
    202 => "Accepted",
    204 => "No Content",
    207 => "Multi-Status",
    301 => "Moved Permanently",
    302 => "Found",
    304 => "Not Modified",
    400 => "Bad Request",
    401 => "Unauthorized",
    403 => "Forbidden",
    404 => "Not Found",
    405 => "Method Not Allowed",
    408 => "Request Timeout",
    409 => "Conflict",
    411 => "Length Required",
    413 => "Content Too Large",
    415 => "Unsupported Media Type",
    417 => "Expectation Failed",
    422 => "Unprocessable Content",
    426 => "Upgrade Required",
    429 => "Too Many Requests",
    431 => "Request Header Fields Too Large",
    500 => "Internal Server Error",
    501 => "Not Implemented",
    502 => "Bad Gateway",
    503 => "Service Unavailable",
    504 => "Gateway Timeout",
    505 => "HTTP Version Not Supported",
}

/// What to write besides the body.
#[derive(Debug, Clone, Copy)]
pub struct ResponseHead<'a> {
    pub status: u16,
    /// Written as `Content-Type` unless empty or the status has no content (1xx/204/304).
    pub content_type: &'a str,
    /// Written verbatim after the fixed headers; must not contain CR/LF (checked in debug).
    pub extra_headers: &'a [(&'a str, &'a str)],
    /// false: `Connection: close` is written.
    pub keep_alive: bool,
    /// HEAD request: headers with the real Content-Length, no body.
    pub head_only: bool,
}

/// The `Date:` value, re-formatted at most once per second.
#[derive(Debug, Clone)]
pub struct DateCache {
    /// Unix second `value` was formatted for; a response burst within one second reuses it
    /// instead of formatting (~100 ns) per response.
    second: u64,
    value: [u8; IMF_FIXDATE_LEN],
}

impl DateCache {
    pub fn new(now: SystemTime) -> Self {
        let mut cache = Self {
            second: u64::MAX,
            value: [b' '; IMF_FIXDATE_LEN],
        };
        cache.update(now);
        cache
    }

    /// Re-formats if `now` is in a different second than the cached value. Clocks before 1970
    /// or past year 9999 are clamped (httpdate would panic on them).
    pub fn update(&mut self, now: SystemTime) {
        let second = now
            .duration_since(UNIX_EPOCH)
            .map_or(0, |elapsed| elapsed.as_secs())
            .min(LAST_FORMATTABLE_SECOND);
        if second == self.second {
            return;
        }
        let date = httpdate::HttpDate::from(UNIX_EPOCH + Duration::from_secs(second));
        let mut out = &mut self.value[..];
        // An IMF-fixdate is always exactly 29 bytes, so this write fits.
        let written = write!(out, "{date}");
        debug_assert!(written.is_ok() && out.is_empty(), "IMF-fixdate is 29 bytes");
        self.second = second;
    }

    /// e.g. `Sun, 06 Nov 1994 08:49:37 GMT`.
    pub fn header_value(&self) -> &[u8] {
        &self.value
    }
}

/// Statuses whose responses carry neither content nor Content-Length (RFC 9110 §8.6, 15.3.5,
/// 15.4.5: 1xx, 204, 304).
fn has_no_content(status: u16) -> bool {
    status < 200 || status == 204 || status == 304
}

/// Appends a complete response to `out`.
pub fn write_response(out: &mut BytesMut, date: &DateCache, head: &ResponseHead, body: &[u8]) {
    let no_content = has_no_content(head.status);
    debug_assert!(
        !no_content || body.is_empty(),
        "status {} must not carry a body",
        head.status
    );
    write_head(
        out,
        date,
        head,
        if no_content { None } else { Some(body.len()) },
    );
    if !no_content && !head.head_only {
        out.extend_from_slice(body);
    }
}

/// Status line and headers up to and including the empty line. `content_length` None: the
/// status has no content, so neither Content-Type nor Content-Length is written.
fn write_head(
    out: &mut BytesMut,
    date: &DateCache,
    head: &ResponseHead,
    content_length: Option<usize>,
) {
    debug_assert!((100..=999).contains(&head.status), "status {}", head.status);
    let extra_len: usize = head
        .extra_headers
        .iter()
        .map(|(name, value)| name.len() + value.len() + 4)
        .sum();
    // One reservation for the whole head (+ body, which usually follows): ~150 bytes of fixed
    // headers; avoids repeated growth when many responses are batched into one buffer.
    out.reserve(160 + head.content_type.len() + extra_len + content_length.unwrap_or(0));

    match static_status_line(head.status) {
        Some(line) => out.extend_from_slice(line),
        None => {
            out.extend_from_slice(b"HTTP/1.1 ");
            out.extend_from_slice(itoa::Buffer::new().format(head.status).as_bytes());
            out.extend_from_slice(b" \r\n");
        }
    }
    out.extend_from_slice(b"Date: ");
    out.extend_from_slice(date.header_value());
    out.extend_from_slice(b"\r\n");
    out.extend_from_slice(SERVER_HEADER);
    if let Some(len) = content_length {
        if !head.content_type.is_empty() {
            debug_assert!(is_header_safe(head.content_type), "CR/LF in content type");
            out.extend_from_slice(b"Content-Type: ");
            out.extend_from_slice(head.content_type.as_bytes());
            out.extend_from_slice(b"\r\n");
        }
        out.extend_from_slice(b"Content-Length: ");
        out.extend_from_slice(itoa::Buffer::new().format(len).as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    if !head.keep_alive {
        out.extend_from_slice(b"Connection: close\r\n");
    }
    for (name, value) in head.extra_headers {
        debug_assert!(
            !name.is_empty()
                && !name.contains(':')
                && is_header_safe(name)
                && is_header_safe(value),
            "invalid extra header {name:?}: {value:?}"
        );
        out.extend_from_slice(name.as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(value.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(b"\r\n");
}

/// No CR, LF or NUL: a header that contained them would split the response (header injection).
fn is_header_safe(text: &str) -> bool {
    !text.bytes().any(|b| matches!(b, b'\r' | b'\n' | 0))
}

/// `HTTP/1.1 100 Continue` interim response.
pub fn write_continue(out: &mut BytesMut) {
    out.extend_from_slice(b"HTTP/1.1 100 Continue\r\n\r\n");
}

/// Counts bytes instead of storing them: sizes the JSON error body for Content-Length without
/// building it in a temporary buffer first.
struct ByteCounter(usize);

impl std::io::Write for ByteCounter {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        self.0 += bytes.len();
        Ok(bytes.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// `{"error":code,"message":msg,"detail":msg}`; `detail` duplicates `message` for clients
/// of the old Python relay.
fn write_error_body(
    sink: &mut impl std::io::Write,
    code: &str,
    message: &str,
) -> std::io::Result<()> {
    sink.write_all(b"{\"error\":")?;
    serde_json::to_writer(&mut *sink, code)?;
    sink.write_all(b",\"message\":")?;
    serde_json::to_writer(&mut *sink, message)?;
    sink.write_all(b",\"detail\":")?;
    serde_json::to_writer(&mut *sink, message)?;
    sink.write_all(b"}")
}

/// Appends a JSON error response (`application/json`).
#[allow(clippy::too_many_arguments)] // the signature mirrors the fields of the response head
pub fn write_json_error(
    out: &mut BytesMut,
    date: &DateCache,
    status: u16,
    code: &str,
    message: &str,
    keep_alive: bool,
    head_only: bool,
    extra_headers: &[(&str, &str)],
) {
    let head = ResponseHead {
        status,
        content_type: "application/json",
        extra_headers,
        keep_alive,
        head_only,
    };
    let mut counter = ByteCounter(0);
    // Neither sink can fail (counting and BytesMut writers never return errors) and
    // serializing a &str cannot fail, so both passes produce the same bytes.
    let counted = write_error_body(&mut counter, code, message);
    debug_assert!(counted.is_ok());
    write_head(out, date, &head, Some(counter.0));
    if !head_only {
        let before = out.len();
        let written = write_error_body(&mut out.writer(), code, message);
        debug_assert!(written.is_ok() && out.len() - before == counter.0);
    }
}

/// Appends the response for a decode error: its status/code/message, `Connection: close`
/// (the decoder cannot resynchronise after an error).
pub fn write_http_error(out: &mut BytesMut, date: &DateCache, err: &HttpError) {
    write_json_error(
        out,
        date,
        err.status(),
        err.code(),
        &err.message(),
        false,
        false,
        &[],
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    /// 1994-11-06T08:49:37Z, the RFC example date.
    fn rfc_date() -> DateCache {
        DateCache::new(UNIX_EPOCH + Duration::from_secs(784_111_777))
    }

    fn text(out: &BytesMut) -> &str {
        std::str::from_utf8(out).expect("responses are ASCII/UTF-8")
    }

    #[test]
    fn date_cache_formats_imf_fixdate() {
        assert_eq!(rfc_date().header_value(), b"Sun, 06 Nov 1994 08:49:37 GMT");
    }

    #[test]
    fn date_cache_reformats_only_on_second_change() {
        let base = UNIX_EPOCH + Duration::from_secs(784_111_777);
        let mut cache = DateCache::new(base);
        cache.update(base + Duration::from_millis(999));
        assert_eq!(cache.header_value(), b"Sun, 06 Nov 1994 08:49:37 GMT");
        cache.update(base + Duration::from_millis(1000));
        assert_eq!(cache.header_value(), b"Sun, 06 Nov 1994 08:49:38 GMT");
        // Going backwards (clock step) is a different second too.
        cache.update(base);
        assert_eq!(cache.header_value(), b"Sun, 06 Nov 1994 08:49:37 GMT");
    }

    #[test]
    fn date_cache_clamps_unformattable_times() {
        let cache = DateCache::new(UNIX_EPOCH - Duration::from_secs(10));
        assert_eq!(cache.header_value(), b"Thu, 01 Jan 1970 00:00:00 GMT");
        let cache = DateCache::new(UNIX_EPOCH + Duration::from_secs(LAST_FORMATTABLE_SECOND + 100));
        assert_eq!(cache.header_value(), b"Fri, 31 Dec 9999 23:59:59 GMT");
    }

    #[test]
    fn ok_json_response_exact_bytes() {
        let mut out = BytesMut::new();
        let head = ResponseHead {
            status: 200,
            content_type: "application/json",
            extra_headers: &[],
            keep_alive: true,
            head_only: false,
        };
        write_response(&mut out, &rfc_date(), &head, b"{\"ok\":true}");
        assert_eq!(
            text(&out),
            "HTTP/1.1 200 OK\r\nDate: Sun, 06 Nov 1994 08:49:37 GMT\r\nServer: pulsar-relay\r\n\
Content-Type: application/json\r\nContent-Length: 11\r\n\r\n{\"ok\":true}"
        );
    }

    #[test]
    fn close_and_extra_headers_exact_bytes() {
        let mut out = BytesMut::new();
        let head = ResponseHead {
            status: 201,
            content_type: "text/plain",
            extra_headers: &[("Location", "/topics/a"), ("X-Request-Id", "42")],
            keep_alive: false,
            head_only: false,
        };
        write_response(&mut out, &rfc_date(), &head, b"");
        assert_eq!(
            text(&out),
            "HTTP/1.1 201 Created\r\nDate: Sun, 06 Nov 1994 08:49:37 GMT\r\nServer: pulsar-relay\r\n\
Content-Type: text/plain\r\nContent-Length: 0\r\nConnection: close\r\nLocation: /topics/a\r\n\
X-Request-Id: 42\r\n\r\n"
        );
    }

    #[test]
    fn head_only_keeps_real_content_length_and_omits_body() {
        let mut out = BytesMut::new();
        let head = ResponseHead {
            status: 200,
            content_type: "application/json",
            extra_headers: &[],
            keep_alive: true,
            head_only: true,
        };
        write_response(&mut out, &rfc_date(), &head, b"12345");
        let s = text(&out);
        assert!(s.contains("Content-Length: 5\r\n"));
        assert!(s.ends_with("\r\n\r\n"));
    }

    #[test]
    fn no_content_statuses_have_no_length_type_or_body() {
        for status in [204, 304, 101] {
            let mut out = BytesMut::new();
            let head = ResponseHead {
                status,
                content_type: "application/json",
                extra_headers: &[],
                keep_alive: true,
                head_only: false,
            };
            write_response(&mut out, &rfc_date(), &head, b"");
            let expected = format!(
                "HTTP/1.1 {status} {}\r\nDate: Sun, 06 Nov 1994 08:49:37 GMT\r\nServer: pulsar-relay\r\n\r\n",
                reason_phrase(status)
            );
            assert_eq!(text(&out), expected);
        }
    }

    #[test]
    fn empty_content_type_is_omitted() {
        let mut out = BytesMut::new();
        let head = ResponseHead {
            status: 404,
            content_type: "",
            extra_headers: &[],
            keep_alive: true,
            head_only: false,
        };
        write_response(&mut out, &rfc_date(), &head, b"");
        assert!(!text(&out).contains("Content-Type"));
        assert!(text(&out).starts_with("HTTP/1.1 404 Not Found\r\n"));
    }

    #[test]
    fn unknown_status_gets_empty_reason() {
        let mut out = BytesMut::new();
        let head = ResponseHead {
            status: 599,
            content_type: "",
            extra_headers: &[],
            keep_alive: true,
            head_only: false,
        };
        write_response(&mut out, &rfc_date(), &head, b"x");
        assert!(text(&out).starts_with("HTTP/1.1 599 \r\nDate: "));
        assert_eq!(reason_phrase(599), "");
    }

    #[test]
    fn reason_phrases_and_status_lines_agree() {
        for status in [
            100, 101, 200, 201, 204, 207, 400, 404, 405, 408, 413, 415, 417, 429, 431, 500, 501,
            503, 505,
        ] {
            let reason = reason_phrase(status);
            assert!(!reason.is_empty(), "{status}");
            let line = static_status_line(status).expect("known status");
            assert_eq!(line, format!("HTTP/1.1 {status} {reason}\r\n").as_bytes());
        }
        assert_eq!(reason_phrase(413), "Content Too Large");
        assert_eq!(reason_phrase(431), "Request Header Fields Too Large");
    }

    #[test]
    fn continue_exact_bytes() {
        let mut out = BytesMut::from(&b"prev"[..]);
        write_continue(&mut out);
        assert_eq!(&out[..], b"prevHTTP/1.1 100 Continue\r\n\r\n");
    }

    #[test]
    fn json_error_exact_bytes_with_escaping() {
        let mut out = BytesMut::new();
        write_json_error(
            &mut out,
            &rfc_date(),
            400,
            "INVALID_REQUEST",
            "bad \"topic\"\n\u{1}é",
            true,
            false,
            &[("Retry-After", "1")],
        );
        let body = "{\"error\":\"INVALID_REQUEST\",\"message\":\"bad \\\"topic\\\"\\n\\u0001é\",\
\"detail\":\"bad \\\"topic\\\"\\n\\u0001é\"}";
        let expected = format!(
            "HTTP/1.1 400 Bad Request\r\nDate: Sun, 06 Nov 1994 08:49:37 GMT\r\nServer: pulsar-relay\r\n\
Content-Type: application/json\r\nContent-Length: {}\r\nRetry-After: 1\r\n\r\n{body}",
            body.len()
        );
        assert_eq!(text(&out), expected);
        // The body is valid JSON carrying the original message.
        let value: serde_json::Value = serde_json::from_str(body).expect("valid JSON");
        assert_eq!(value["message"], "bad \"topic\"\n\u{1}é");
        assert_eq!(value["detail"], value["message"]);
    }

    #[test]
    fn json_error_head_only_has_length_but_no_body() {
        let mut full = BytesMut::new();
        write_json_error(
            &mut full,
            &rfc_date(),
            404,
            "NOT_FOUND",
            "no such topic",
            false,
            false,
            &[],
        );
        let mut head = BytesMut::new();
        write_json_error(
            &mut head,
            &rfc_date(),
            404,
            "NOT_FOUND",
            "no such topic",
            false,
            true,
            &[],
        );
        assert!(full.starts_with(&head));
        let body_len = full.len() - head.len();
        assert!(text(&head).contains(&format!("Content-Length: {body_len}\r\n")));
        assert!(text(&head).contains("Connection: close\r\n"));
    }

    #[test]
    fn decode_error_response_uses_error_status_and_closes() {
        let mut out = BytesMut::new();
        write_http_error(
            &mut out,
            &rfc_date(),
            &HttpError::BodyTooLarge { limit: 10 },
        );
        let s = text(&out);
        assert!(s.starts_with("HTTP/1.1 413 Content Too Large\r\n"));
        assert!(s.contains("Connection: close\r\n"));
        assert!(s.ends_with(
            "{\"error\":\"PAYLOAD_TOO_LARGE\",\"message\":\"request body exceeds 10 bytes\",\
\"detail\":\"request body exceeds 10 bytes\"}"
        ));
    }

    #[test]
    fn pipelined_responses_append_to_one_buffer() {
        let mut out = BytesMut::new();
        let head = ResponseHead {
            status: 200,
            content_type: "text/plain",
            extra_headers: &[],
            keep_alive: true,
            head_only: false,
        };
        write_response(&mut out, &rfc_date(), &head, b"a");
        let first_len = out.len();
        write_response(&mut out, &rfc_date(), &head, b"b");
        assert_eq!(out.len(), first_len * 2);
        assert_eq!(&out[first_len - 1..first_len], b"a");
        assert!(out.ends_with(b"\r\n\r\nb"));
    }

    #[test]
    #[cfg(debug_assertions)]
    #[should_panic(expected = "invalid extra header")]
    fn crlf_in_extra_header_is_caught_in_debug() {
        let mut out = BytesMut::new();
        let head = ResponseHead {
            status: 200,
            content_type: "",
            extra_headers: &[("X-Evil", "a\r\nSet-Cookie: x")],
            keep_alive: true,
            head_only: false,
        };
        write_response(&mut out, &rfc_date(), &head, b"");
    }
}
