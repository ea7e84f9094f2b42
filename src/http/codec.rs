//! Sans-IO HTTP/1.1 request decoder: request-head parsing (via `httparse`) and body framing
//! (Content-Length and chunked, RFC 9112 §6-7), pipelining, `Expect: 100-continue` and the
//! size limits that keep a connection's buffering bounded.
//!
//! Owns: turning bytes in the connection's read buffer into [`Request`]s / [`Event`]s, and the
//! strict framing checks that prevent request smuggling (CL+TE, duplicate CL, bad chunk sizes).
//! Does not own: sockets, timeouts, response writing (see `super::response`), routing, or
//! percent-decoding of the target. After any [`HttpError`] the caller answers with
//! `err.status()` and closes the connection; the decoder does not resynchronise.
//!
//! Allocation per request: the head is frozen into one `Bytes` (shared with the read buffer,
//! no copy) and every string accessor is a `u32` range into it (the target is a `ByteString`
//! sharing it, validated as UTF-8 once); one `Vec` of header ranges is the only allocation for
//! a body-less request. The fields every request is asked for (credentials, `Host`, `Origin`,
//! `Content-Type`) are indexed while the head is parsed, so a lookup does not scan. Content-Length bodies are split off the read
//! buffer without copying; chunked bodies are zero-copy when they arrive as a single data chunk
//! and copied into one growing buffer otherwise.

use bytes::{Buf, Bytes, BytesMut};
use bytestring::ByteString;

/// Header slots parsed on the stack. `max_headers` above this falls back to one heap array per
/// head parse; 64 × 32-byte `httparse::Header` = 2 KiB of stack, comfortably below what a
/// glommio task stack tolerates, and above what real clients send (~10-20 headers).
const STACK_HEADER_SLOTS: usize = 64;

/// A chunk size wider than 16 hex digits cannot fit in a u64; rejecting by length (as httparse
/// does) instead of by overflow also stops an endless run of leading zeros.
const MAX_CHUNK_SIZE_DIGITS: usize = 16;

/// Per-connection limits; all checks are inclusive (`len == max` is accepted).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Bytes of a request head (request line + header fields + the empty line), also the bound
    /// for a chunk-size line, for the chunk trailer section and for the total bytes of chunk
    /// extensions of one body.
    pub max_header_bytes: usize,
    /// Header fields in one head (and in one trailer section).
    pub max_headers: usize,
    /// Decoded body bytes.
    pub max_body_bytes: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_header_bytes: 8 * 1024,
            max_headers: STACK_HEADER_SLOTS,
            max_body_bytes: 1024 * 1024,
        }
    }
}

/// Why a request was rejected. Every variant is fatal for the connection.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HttpError {
    #[error("malformed request head: {0}")]
    Malformed(httparse::Error),
    #[error("request head exceeds {limit} bytes")]
    HeadTooLarge { limit: usize },
    #[error("request has more than {limit} header fields")]
    TooManyHeaders { limit: usize },
    #[error("unsupported HTTP version (only HTTP/1.0 and HTTP/1.1 are served)")]
    UnsupportedVersion,
    #[error("request target must be an absolute path, or `*` for OPTIONS")]
    InvalidTarget,
    #[error("HTTP/1.1 request without a Host header")]
    MissingHost,
    #[error("more than one Host header")]
    DuplicateHost,
    #[error("invalid Content-Length value")]
    InvalidContentLength,
    #[error("more than one Content-Length header")]
    DuplicateContentLength,
    #[error("both Content-Length and Transfer-Encoding present")]
    ContentLengthWithTransferEncoding,
    #[error("Transfer-Encoding is not allowed in an HTTP/1.0 request")]
    TransferEncodingOnHttp10,
    #[error("unsupported transfer coding (only chunked is implemented)")]
    UnsupportedTransferCoding,
    #[error(
        "invalid Transfer-Encoding: chunked must be applied exactly once, as the final coding"
    )]
    InvalidTransferEncoding,
    #[error("invalid chunked body: {0}")]
    InvalidChunk(&'static str),
    #[error("request body exceeds {limit} bytes")]
    BodyTooLarge { limit: usize },
    #[error("chunked trailer section exceeds {limit} bytes")]
    TrailersTooLarge { limit: usize },
    #[error("trailer section has more than {limit} fields")]
    TooManyTrailers { limit: usize },
    #[error("unsupported expectation (only 100-continue is understood)")]
    UnsupportedExpectation,
}

impl HttpError {
    /// The response status to answer with before closing.
    pub fn status(&self) -> u16 {
        match self {
            HttpError::BodyTooLarge { .. } => 413,
            HttpError::UnsupportedExpectation => 417,
            HttpError::HeadTooLarge { .. }
            | HttpError::TooManyHeaders { .. }
            | HttpError::TrailersTooLarge { .. }
            | HttpError::TooManyTrailers { .. } => 431,
            HttpError::UnsupportedTransferCoding => 501,
            HttpError::UnsupportedVersion => 505,
            HttpError::Malformed(_)
            | HttpError::InvalidTarget
            | HttpError::MissingHost
            | HttpError::DuplicateHost
            | HttpError::InvalidContentLength
            | HttpError::DuplicateContentLength
            | HttpError::ContentLengthWithTransferEncoding
            | HttpError::TransferEncodingOnHttp10
            | HttpError::InvalidTransferEncoding
            | HttpError::InvalidChunk(_) => 400,
        }
    }

    /// The machine-readable `error` field of the JSON error body.
    pub fn code(&self) -> &'static str {
        match self.status() {
            413 => "PAYLOAD_TOO_LARGE",
            431 => "HEADERS_TOO_LARGE",
            501 => "NOT_IMPLEMENTED",
            _ => "INVALID_REQUEST",
        }
    }

    /// Human-readable text for the `message`/`detail` fields.
    pub fn message(&self) -> String {
        self.to_string()
    }
}

/// Request method; anything outside the common set is `Other` (see [`Request::method_str`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Method {
    Get,
    Head,
    Post,
    Put,
    Delete,
    Patch,
    Options,
    Other,
}

impl Method {
    /// Methods are case-sensitive (RFC 9110 §9.1): `get` is `Other`.
    fn from_token(token: &str) -> Self {
        match token {
            "GET" => Method::Get,
            "HEAD" => Method::Head,
            "POST" => Method::Post,
            "PUT" => Method::Put,
            "DELETE" => Method::Delete,
            "PATCH" => Method::Patch,
            "OPTIONS" => Method::Options,
            _ => Method::Other,
        }
    }
}

/// What the decoder hands to the connection loop.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// A complete request (head + whole body).
    Request(Request),
    /// The head of a request carrying `Expect: 100-continue` was parsed, the body is not yet
    /// here and the body size is within limits: the caller writes `HTTP/1.1 100 Continue\r\n\r\n`
    /// once (see `super::response::write_continue`), then keeps calling decode. Emitted at most
    /// once per request.
    ContinueExpected,
}

/// Byte range into [`Request::head`]. `u32` halves the per-header footprint versus `Range<usize>`;
/// heads are bounded by `max_header_bytes`, which [`RequestDecoder::new`] clamps to `u32::MAX`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Span {
    start: u32,
    end: u32,
}

impl Span {
    /// `part` must be a sub-slice of `whole` (true for everything httparse returns from it).
    fn of(whole: &[u8], part: &[u8]) -> Self {
        let start = (part.as_ptr() as usize).wrapping_sub(whole.as_ptr() as usize);
        debug_assert!(start + part.len() <= whole.len(), "span outside the head");
        Span {
            start: start as u32,
            end: (start + part.len()) as u32,
        }
    }

    fn range(self) -> std::ops::Range<usize> {
        self.start as usize..self.end as usize
    }
}

/// A fully received request. Strings are views into the frozen head bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    /// Request line + header fields exactly as received (leading empty lines excluded); every
    /// span below points into it, so the accessors allocate nothing.
    head: Bytes,
    method: Method,
    method_span: Span,
    /// The request target (path and query), validated as UTF-8 once: handlers read the path
    /// several times per request.
    target: ByteString,
    /// Where the path ends in `target` (at the first `?`, or its end).
    path_end: u32,
    /// (name, value) per header field, in arrival order.
    headers: Vec<(Span, Span)>,
    /// Where in `headers` the first field of each [`Field`] looked up on every request is.
    indexed: FieldIndex,
    version_minor: u8,
    /// Computed once at head time from the version and all Connection headers.
    keep_alive: bool,
    /// Connection carried the `upgrade` token; kept for [`Request::wants_upgrade`].
    connection_upgrade: bool,
    body: Bytes,
}

impl Request {
    pub fn method(&self) -> Method {
        self.method
    }

    pub fn method_str(&self) -> &str {
        self.head_str(self.method_span)
    }

    /// Target without the query, as sent (not percent-decoded); `*` for `OPTIONS *`.
    pub fn path(&self) -> &str {
        self.target.get(..self.path_end as usize).unwrap_or("")
    }

    /// The part after the first `?`, without it; `Some("")` for a target ending in `?`.
    pub fn query(&self) -> Option<&str> {
        self.target.get(self.path_end as usize..)?.strip_prefix('?')
    }

    /// First field named `name` (ASCII case-insensitive). The fields every request is asked
    /// for were indexed at decode; others are found by a scan.
    pub fn header(&self, name: &str) -> Option<&[u8]> {
        if let Some(position) = Field::named(name).and_then(|field| self.indexed.get(field)) {
            let (_, value) = self.headers.get(position?)?;
            return Some(&self.head[value.range()]);
        }
        self.headers
            .iter()
            .find(|(n, _)| self.head[n.range()].eq_ignore_ascii_case(name.as_bytes()))
            .map(|(_, v)| &self.head[v.range()])
    }

    /// Every field named `name` (ASCII case-insensitive), in arrival order.
    pub fn header_values<'a>(&'a self, name: &'a str) -> impl Iterator<Item = &'a [u8]> + 'a {
        self.headers
            .iter()
            .filter(move |(n, _)| self.head[n.range()].eq_ignore_ascii_case(name.as_bytes()))
            .map(|(_, v)| &self.head[v.range()])
    }

    /// All fields in arrival order, names as sent.
    pub fn headers(&self) -> impl Iterator<Item = (&str, &[u8])> {
        self.headers
            .iter()
            .map(|(n, v)| (self.head_str(*n), &self.head[v.range()]))
    }

    /// HTTP/1.1: persistent unless `Connection: close`; HTTP/1.0: only with
    /// `Connection: keep-alive` (and no `close`).
    pub fn keep_alive(&self) -> bool {
        self.keep_alive
    }

    pub fn version_minor(&self) -> u8 {
        self.version_minor
    }

    pub fn content_type(&self) -> Option<&[u8]> {
        self.header("content-type")
    }

    pub fn body(&self) -> &Bytes {
        &self.body
    }

    pub fn into_body(self) -> Bytes {
        self.body
    }

    /// `Connection` lists `upgrade` and the first `Upgrade` field equals `protocol`
    /// (ASCII case-insensitive, surrounding whitespace ignored).
    pub fn wants_upgrade(&self, protocol: &str) -> bool {
        self.connection_upgrade
            && self
                .header("upgrade")
                .is_some_and(|v| trim_ows(v).eq_ignore_ascii_case(protocol.as_bytes()))
    }

    fn head_str(&self, span: Span) -> &str {
        // httparse hands out method/path as &str and header names are tokens (ASCII), so every
        // span is valid UTF-8; the empty fallback is unreachable and avoids a panic path.
        std::str::from_utf8(&self.head[span.range()]).unwrap_or("")
    }
}

/// Incremental request decoder for one connection.
#[derive(Debug)]
pub struct RequestDecoder {
    limits: Limits,
    /// Progress of the request currently being received; persists across partial reads so a
    /// parsed head is never re-parsed while its body trickles in.
    state: State,
}

/// Not boxed: one decoder lives per connection, while boxing the body variant would cost an
/// allocation per request with a body.
#[derive(Debug)]
#[allow(clippy::large_enum_variant)]
enum State {
    Head(HeadProgress),
    Body(BodyProgress),
}

#[derive(Debug, Default)]
struct HeadProgress {
    /// Bytes of the buffer already known to contain no end-of-head, so each partial read scans
    /// only new bytes (feeding a head byte by byte stays linear, not quadratic in httparse runs).
    scanned: usize,
    /// httparse has looked at this head once. The first look catches garbage (e.g. a TLS
    /// ClientHello) immediately; later looks wait until the end of the head is in the buffer.
    parsed_once: bool,
    /// Empty lines skipped before this request (RFC 9112 §2.2); counted against
    /// `max_header_bytes` so an endless CRLF stream is eventually rejected.
    skipped_empty_lines: usize,
}

#[derive(Debug)]
struct BodyProgress {
    /// The parsed head, body still empty.
    request: Request,
    framing: BodyFraming,
    /// `Expect: 100-continue` was sent and `ContinueExpected` not yet emitted.
    continue_pending: bool,
}

#[derive(Debug)]
enum BodyFraming {
    /// Remaining body bytes (the whole body; it is split off the buffer in one piece).
    Length(usize),
    Chunked(ChunkedBody),
}

/// Framing decided from the head.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum HeadFraming {
    Empty,
    Length(usize),
    Chunked,
}

struct ParsedHead {
    len: usize,
    method: Method,
    method_span: Span,
    target: Span,
    path_end: u32,
    headers: Vec<(Span, Span)>,
    indexed: FieldIndex,
    version_minor: u8,
    keep_alive: bool,
    connection_upgrade: bool,
    framing: HeadFraming,
    expects_continue: bool,
}

impl RequestDecoder {
    pub fn new(limits: Limits) -> Self {
        let limits = Limits {
            // Spans are u32 (see `Span`).
            max_header_bytes: limits.max_header_bytes.min(u32::MAX as usize),
            ..limits
        };
        Self {
            limits,
            state: State::Head(HeadProgress::default()),
        }
    }

    /// Consumes bytes of complete requests from `buf` (pipelining: call again until Ok(None)).
    /// Ok(None) = need more bytes (never an error for incomplete input). Bytes after the
    /// returned request stay in `buf`.
    pub fn decode(&mut self, buf: &mut BytesMut) -> Result<Option<Event>, HttpError> {
        if let State::Head(progress) = &mut self.state {
            let Some((request, framing, expects_continue)) =
                decode_head(progress, &self.limits, buf)?
            else {
                return Ok(None);
            };
            let framing = match framing {
                HeadFraming::Empty | HeadFraming::Length(0) => {
                    return Ok(Some(Event::Request(request)));
                }
                HeadFraming::Length(len) => BodyFraming::Length(len),
                HeadFraming::Chunked => BodyFraming::Chunked(ChunkedBody::default()),
            };
            self.state = State::Body(BodyProgress {
                request,
                framing,
                continue_pending: expects_continue,
            });
        }

        let State::Body(progress) = &mut self.state else {
            // Invariant: the Head branch above either returned or switched to Body.
            return Ok(None);
        };
        let body = match &mut progress.framing {
            BodyFraming::Length(len) => {
                if buf.len() >= *len {
                    Some(buf.split_to(*len).freeze())
                } else {
                    None
                }
            }
            BodyFraming::Chunked(chunked) => chunked.poll(buf, &self.limits)?,
        };
        let Some(body) = body else {
            if std::mem::take(&mut progress.continue_pending) {
                return Ok(Some(Event::ContinueExpected));
            }
            return Ok(None);
        };
        match std::mem::replace(&mut self.state, State::Head(HeadProgress::default())) {
            State::Body(finished) => {
                let mut request = finished.request;
                request.body = body;
                Ok(Some(Event::Request(request)))
            }
            // Invariant: we matched State::Body just above.
            State::Head(_) => Ok(None),
        }
    }

    /// True when no request is partially received (nothing but empty lines buffered for the
    /// next request and no head/body in progress): the connection is idle between requests.
    pub fn is_idle(&self, buf: &BytesMut) -> bool {
        matches!(self.state, State::Head(_)) && buf.iter().all(|&b| b == b'\r' || b == b'\n')
    }

    /// True while the head of the current request has been parsed and its body is being received.
    pub fn in_body(&self) -> bool {
        matches!(self.state, State::Body(_))
    }
}

/// Waits for a complete head, validates it and splits it off `buf`.
fn decode_head(
    progress: &mut HeadProgress,
    limits: &Limits,
    buf: &mut BytesMut,
) -> Result<Option<(Request, HeadFraming, bool)>, HttpError> {
    let too_large = HttpError::HeadTooLarge {
        limit: limits.max_header_bytes,
    };

    // Empty lines before a request are ignored (RFC 9112 §2.2), e.g. the stray CRLF some
    // clients send after a POST body. Stripping them here keeps them out of the head bytes.
    let mut stripped = false;
    loop {
        let skip = if buf.starts_with(b"\r\n") {
            2
        } else if buf.starts_with(b"\n") {
            1
        } else {
            break;
        };
        buf.advance(skip);
        stripped = true;
        progress.skipped_empty_lines += skip;
        if progress.skipped_empty_lines >= limits.max_header_bytes {
            return Err(too_large);
        }
    }
    if stripped {
        progress.scanned = 0;
        progress.parsed_once = false;
    }
    if buf.is_empty() || &buf[..] == b"\r" {
        return Ok(None);
    }

    let limit = limits.max_header_bytes - progress.skipped_empty_lines;
    let window_len = buf.len().min(limit);
    let parse_len = if !progress.parsed_once {
        window_len
    } else {
        match find_section_end(&buf[..window_len], progress.scanned) {
            Some(end) => end,
            None => {
                if buf.len() >= limit {
                    return Err(too_large);
                }
                progress.scanned = window_len;
                return Ok(None);
            }
        }
    };

    let parsed = with_header_slots(limits.max_headers, |slots| {
        parse_head(&buf[..parse_len], slots, limits)
    })?;
    let Some(parsed) = parsed else {
        // Partial: a head of `limit` bytes or more can no longer end within the limit.
        if buf.len() >= limit {
            return Err(too_large);
        }
        progress.parsed_once = true;
        // httparse found no end within these bytes; the scanner resumes after them (its
        // checks only look backwards, so resuming at the old end misses nothing).
        progress.scanned = parse_len;
        return Ok(None);
    };

    *progress = HeadProgress::default();
    let head = buf.split_to(parsed.len).freeze();
    // httparse handed the target out as `&str`: this validation cannot fail.
    let target = ByteString::try_from(head.slice(parsed.target.range()))
        .map_err(|_| HttpError::Malformed(httparse::Error::Token))?;
    let request = Request {
        head,
        method: parsed.method,
        method_span: parsed.method_span,
        target,
        path_end: parsed.path_end,
        headers: parsed.headers,
        indexed: parsed.indexed,
        version_minor: parsed.version_minor,
        keep_alive: parsed.keep_alive,
        connection_upgrade: parsed.connection_upgrade,
        body: Bytes::new(),
    };
    Ok(Some((request, parsed.framing, parsed.expects_continue)))
}

/// Runs `parse` with `max_headers` httparse slots: on the stack up to `STACK_HEADER_SLOTS`,
/// otherwise in one heap array (the price of configuring a larger limit).
fn with_header_slots<'b, R>(
    max_headers: usize,
    parse: impl FnOnce(&mut [httparse::Header<'b>]) -> R,
) -> R {
    if max_headers <= STACK_HEADER_SLOTS {
        let mut slots: [httparse::Header<'b>; STACK_HEADER_SLOTS] =
            [httparse::EMPTY_HEADER; STACK_HEADER_SLOTS];
        parse(&mut slots[..max_headers])
    } else {
        let mut slots = vec![httparse::EMPTY_HEADER; max_headers];
        parse(&mut slots)
    }
}

/// End (exclusive) of the first empty line in a section of CRLF- or LF-terminated lines that
/// starts at a line start, looking only at `\n` positions from `from` on. httparse accepts bare
/// LF line ends, so the empty line is `\r\n` or `\n` after a `\n` (or at offset 0).
fn find_section_end(section: &[u8], from: usize) -> Option<usize> {
    let mut at = from;
    while let Some(offset) = section.get(at..)?.iter().position(|&b| b == b'\n') {
        let lf = at + offset;
        let empty_line = lf == 0
            || section[lf - 1] == b'\n'
            || (section[lf - 1] == b'\r' && (lf == 1 || section[lf - 2] == b'\n'));
        if empty_line {
            return Some(lf + 1);
        }
        at = lf + 1;
    }
    None
}

fn map_head_error(err: httparse::Error, limits: &Limits) -> HttpError {
    match err {
        httparse::Error::TooManyHeaders => HttpError::TooManyHeaders {
            limit: limits.max_headers,
        },
        httparse::Error::Version => HttpError::UnsupportedVersion,
        other => HttpError::Malformed(other),
    }
}

/// Parses and validates one head; Ok(None) when it is not complete within `bytes`.
fn parse_head<'b>(
    bytes: &'b [u8],
    slots: &mut [httparse::Header<'b>],
    limits: &Limits,
) -> Result<Option<ParsedHead>, HttpError> {
    let mut req = httparse::Request::new(slots);
    let len = match req.parse(bytes) {
        Ok(httparse::Status::Complete(len)) => len,
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(err) => return Err(map_head_error(err, limits)),
    };
    // httparse fills all three on Complete; the error arm is unreachable.
    let (Some(method_str), Some(target), Some(version_minor)) = (req.method, req.path, req.version)
    else {
        return Err(HttpError::Malformed(httparse::Error::Token));
    };
    let method = Method::from_token(method_str);

    // Origin-form only (plus `OPTIONS *`): the relay is not a proxy, and accepting
    // absolute-form would mean reconciling its authority with Host.
    if !(target.starts_with('/') || (target == "*" && method == Method::Options)) {
        return Err(HttpError::InvalidTarget);
    }
    // Fits: the target lies inside a head of at most u32::MAX bytes.
    let path_end = target.find('?').unwrap_or(target.len()) as u32;

    let mut headers = Vec::with_capacity(req.headers.len());
    let mut host_count = 0u32;
    let mut content_length: Option<u64> = None;
    let mut te = TransferCodings::default();
    let mut expects_continue = false;
    let mut connection = ConnectionTokens::default();

    let mut indexed = FieldIndex::default();
    for (at, field) in req.headers.iter().enumerate() {
        let name = field.name;
        let value = field.value;
        headers.push((Span::of(bytes, name.as_bytes()), Span::of(bytes, value)));
        let Some(known) = Field::of(name) else {
            continue;
        };
        indexed.note(known, at);
        match known {
            Field::Host => host_count += 1,
            Field::ContentLength => {
                // Strict: even equal duplicates are refused (RFC 9112 §6.3 allows merging
                // them, but a relay behind other proxies gains nothing from tolerating
                // ambiguity).
                if content_length.is_some() {
                    return Err(HttpError::DuplicateContentLength);
                }
                content_length = Some(parse_content_length(value)?);
            }
            Field::TransferEncoding => te.add(value),
            Field::Connection => connection.add(value),
            Field::Expect => {
                if trim_ows(value).eq_ignore_ascii_case(b"100-continue") {
                    // RFC 9110 §10.1.1: a 100-continue expectation in HTTP/1.0 is ignored.
                    expects_continue = version_minor == 1;
                } else {
                    return Err(HttpError::UnsupportedExpectation);
                }
            }
            _ => {}
        }
    }

    if host_count > 1 {
        return Err(HttpError::DuplicateHost);
    }
    if host_count == 0 && version_minor == 1 {
        return Err(HttpError::MissingHost);
    }

    let framing = if te.present {
        if version_minor == 0 {
            return Err(HttpError::TransferEncodingOnHttp10);
        }
        if content_length.is_some() {
            return Err(HttpError::ContentLengthWithTransferEncoding);
        }
        // RFC 9112 §6.3: with chunked anywhere but last (or absent) the body's length cannot
        // be determined, so that is a 400 and a close whatever else is listed; only a list
        // that does end in chunked can be refused as merely not implemented (501, §6.1).
        if te.chunked_count != 1 || !te.chunked_last {
            return Err(HttpError::InvalidTransferEncoding);
        }
        if te.unsupported {
            return Err(HttpError::UnsupportedTransferCoding);
        }
        HeadFraming::Chunked
    } else if let Some(len) = content_length {
        if len > limits.max_body_bytes as u64 {
            return Err(HttpError::BodyTooLarge {
                limit: limits.max_body_bytes,
            });
        }
        // Fits: bounded by max_body_bytes, a usize.
        HeadFraming::Length(len as usize)
    } else {
        HeadFraming::Empty
    };

    let keep_alive = if version_minor == 1 {
        !connection.close
    } else {
        connection.keep_alive && !connection.close
    };

    Ok(Some(ParsedHead {
        len,
        method,
        method_span: Span::of(bytes, method_str.as_bytes()),
        target: Span::of(bytes, target.as_bytes()),
        path_end,
        headers,
        indexed,
        version_minor,
        keep_alive,
        connection_upgrade: connection.upgrade,
        framing,
        expects_continue,
    }))
}

/// Header fields the decoder itself reads, and those looked up on every request (who is
/// asking, from where, with what body): the latter are indexed at decode, so
/// [`Request::header`] finds them without scanning every field for each name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Field {
    // Indexed (the first `FieldIndex::LEN` variants).
    Host,
    ContentType,
    Authorization,
    XApiKey,
    Origin,
    Cookie,
    SecWebSocketProtocol,
    XForwardedFor,
    // Read by the decoder only.
    ContentLength,
    TransferEncoding,
    Connection,
    Expect,
}

impl Field {
    /// The field a lookup names, spelt in lowercase as the relay's code does (any other
    /// spelling is found by a scan instead).
    fn named(name: &str) -> Option<Field> {
        Some(match name {
            "host" => Field::Host,
            "content-type" => Field::ContentType,
            "authorization" => Field::Authorization,
            "x-api-key" => Field::XApiKey,
            "origin" => Field::Origin,
            "cookie" => Field::Cookie,
            "sec-websocket-protocol" => Field::SecWebSocketProtocol,
            "x-forwarded-for" => Field::XForwardedFor,
            _ => return None,
        })
    }

    /// The field named `name` (ASCII case-insensitive), told apart by length first.
    fn of(name: &str) -> Option<Field> {
        let candidates: &[(&str, Field)] = match name.len() {
            4 => &[("host", Field::Host)],
            6 => &[
                ("origin", Field::Origin),
                ("cookie", Field::Cookie),
                ("expect", Field::Expect),
            ],
            9 => &[("x-api-key", Field::XApiKey)],
            10 => &[("connection", Field::Connection)],
            12 => &[("content-type", Field::ContentType)],
            13 => &[("authorization", Field::Authorization)],
            14 => &[("content-length", Field::ContentLength)],
            15 => &[("x-forwarded-for", Field::XForwardedFor)],
            17 => &[("transfer-encoding", Field::TransferEncoding)],
            22 => &[("sec-websocket-protocol", Field::SecWebSocketProtocol)],
            _ => return None,
        };
        candidates
            .iter()
            .find(|(known, _)| token_eq_lowercase(name.as_bytes(), known.as_bytes()))
            .map(|&(_, field)| field)
    }
}

/// `token` (a header name: httparse admits only token characters) equals `lower` (lowercase
/// letters and `-`) ignoring ASCII case, eight bytes at a time. Setting bit 0x20 lowercases a
/// letter and keeps `-`; the only other byte it maps onto a letter or `-` is an uppercase
/// letter or CR, which is no token character.
fn token_eq_lowercase(token: &[u8], lower: &[u8]) -> bool {
    const CASE: u64 = 0x2020_2020_2020_2020;
    if token.len() != lower.len() {
        return false;
    }
    let mut token_words = token.chunks_exact(8);
    let mut lower_words = lower.chunks_exact(8);
    let words_equal = token_words
        .by_ref()
        .zip(lower_words.by_ref())
        .all(|(t, l)| {
            let word = |b: &[u8]| u64::from_le_bytes(b.try_into().unwrap_or([0; 8]));
            word(t) | CASE == word(l)
        });
    words_equal
        && token_words
            .remainder()
            .iter()
            .zip(lower_words.remainder())
            .all(|(t, l)| t | 0x20 == *l)
}

/// Position of the first field of each indexed [`Field`] in a request's header list.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct FieldIndex {
    first: [u16; FieldIndex::LEN],
    /// False once a field's position did not fit in a `u16`: lookups then scan.
    usable: bool,
}

impl FieldIndex {
    const LEN: usize = 8;
    const ABSENT: u16 = u16::MAX;

    /// `field` is at `at` (kept only if it is the first of its name).
    fn note(&mut self, field: Field, at: usize) {
        let Some(slot) = self.first.get_mut(field as usize) else {
            return;
        };
        if *slot != Self::ABSENT {
            return;
        }
        match u16::try_from(at) {
            Ok(at) if at != Self::ABSENT => *slot = at,
            _ => self.usable = false,
        }
    }

    /// `None`: `field` is not indexed here (scan instead); `Some(None)`: the request has no
    /// such field; `Some(Some(at))`: the first one is at `at`.
    fn get(&self, field: Field) -> Option<Option<usize>> {
        let slot = *self.first.get(field as usize).filter(|_| self.usable)?;
        Some((slot != Self::ABSENT).then_some(usize::from(slot)))
    }
}

impl Default for FieldIndex {
    fn default() -> Self {
        FieldIndex {
            first: [Self::ABSENT; Self::LEN],
            usable: true,
        }
    }
}

/// `1*DIGIT` only: no sign, no inner whitespace, no list (`5,5`), no overflow.
/// (Leading/trailing OWS is field syntax, already stripped by httparse.)
fn parse_content_length(value: &[u8]) -> Result<u64, HttpError> {
    if value.is_empty() {
        return Err(HttpError::InvalidContentLength);
    }
    value.iter().try_fold(0u64, |acc, &b| {
        if !b.is_ascii_digit() {
            return Err(HttpError::InvalidContentLength);
        }
        acc.checked_mul(10)
            .and_then(|acc| acc.checked_add(u64::from(b - b'0')))
            .ok_or(HttpError::InvalidContentLength)
    })
}

/// Transfer-Encoding list accumulated over all TE fields (a field may be split across lines).
#[derive(Default)]
struct TransferCodings {
    present: bool,
    /// Codings named `chunked` (with or without parameters).
    chunked_count: u32,
    /// The last non-empty coding seen so far is named `chunked`.
    chunked_last: bool,
    /// A coding other than a bare `chunked` was listed (we decode no other coding, and
    /// chunked takes no parameters -> 501).
    unsupported: bool,
}

impl TransferCodings {
    fn add(&mut self, value: &[u8]) {
        self.present = true;
        for coding in list_items(value) {
            // `transfer-coding = token *( OWS ";" OWS transfer-parameter )`
            let name = coding.split(|&b| b == b';').next().map_or(coding, trim_ows);
            let chunked = name.eq_ignore_ascii_case(b"chunked");
            self.chunked_count += u32::from(chunked);
            self.unsupported |= !coding.eq_ignore_ascii_case(b"chunked");
            self.chunked_last = chunked;
        }
    }
}

#[derive(Default)]
struct ConnectionTokens {
    close: bool,
    keep_alive: bool,
    upgrade: bool,
}

impl ConnectionTokens {
    fn add(&mut self, value: &[u8]) {
        for token in list_items(value) {
            self.close |= token.eq_ignore_ascii_case(b"close");
            self.keep_alive |= token.eq_ignore_ascii_case(b"keep-alive");
            self.upgrade |= token.eq_ignore_ascii_case(b"upgrade");
        }
    }
}

/// Non-empty, OWS-trimmed elements of a comma-separated field value (RFC 9110 §5.6.1 says
/// empty elements are ignored).
fn list_items(value: &[u8]) -> impl Iterator<Item = &[u8]> {
    value
        .split(|&b| b == b',')
        .map(trim_ows)
        .filter(|item| !item.is_empty())
}

fn trim_ows(mut value: &[u8]) -> &[u8] {
    while let [b' ' | b'\t', rest @ ..] = value {
        value = rest;
    }
    while let [rest @ .., b' ' | b'\t'] = value {
        value = rest;
    }
    value
}

/// Incremental chunked-body decoder (RFC 9112 §7.1). Consumes framing bytes from the read
/// buffer as soon as they arrive, so the buffer never holds more than one chunk-size line or
/// trailer section (each bounded by `max_header_bytes`) beyond the data being copied.
#[derive(Debug, Default)]
struct ChunkedBody {
    phase: ChunkPhase,
    data: ChunkedData,
    /// Decoded body bytes so far, checked against `max_body_bytes` at every chunk-size line.
    body_len: usize,
    /// Total chunk-extension bytes of this body. Bounded by `max_header_bytes` because each
    /// chunk may carry an extension of up to a full line: without a total cap a 1 MiB body in
    /// 1-byte chunks could drag in ~8 GiB of ignored extensions (hyper added the same cap).
    extension_bytes: usize,
    /// Bytes of the current size line / trailer section already scanned for its end.
    scanned: usize,
}

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
enum ChunkPhase {
    #[default]
    SizeLine,
    Data {
        remaining: usize,
    },
    /// The CRLF that must follow chunk data.
    DataEnd,
    /// After the last chunk: trailer fields (discarded) up to the empty line.
    Trailers,
}

/// Body assembled so far. A body sent as a single data chunk (the common case for clients that
/// stream a buffer) is split off the read buffer without copying; further chunks copy.
#[derive(Debug, Default)]
enum ChunkedData {
    #[default]
    Empty,
    Single(Bytes),
    Assembled(BytesMut),
}

impl ChunkedData {
    fn append(&mut self, buf: &mut BytesMut, take: usize, whole_chunk: bool) {
        *self = match std::mem::take(self) {
            ChunkedData::Empty if whole_chunk => ChunkedData::Single(buf.split_to(take).freeze()),
            ChunkedData::Empty => {
                let assembled = BytesMut::from(&buf[..take]);
                buf.advance(take);
                ChunkedData::Assembled(assembled)
            }
            ChunkedData::Single(first) => {
                let mut assembled = BytesMut::with_capacity(first.len() + take);
                assembled.extend_from_slice(&first);
                assembled.extend_from_slice(&buf[..take]);
                buf.advance(take);
                ChunkedData::Assembled(assembled)
            }
            ChunkedData::Assembled(mut assembled) => {
                assembled.extend_from_slice(&buf[..take]);
                buf.advance(take);
                ChunkedData::Assembled(assembled)
            }
        };
    }

    fn into_bytes(self) -> Bytes {
        match self {
            ChunkedData::Empty => Bytes::new(),
            ChunkedData::Single(bytes) => bytes,
            ChunkedData::Assembled(bytes) => bytes.freeze(),
        }
    }
}

impl ChunkedBody {
    /// Consumes as much of the chunked body as `buf` holds; Some(body) once the trailer
    /// section is complete (bytes after it stay in `buf`).
    fn poll(&mut self, buf: &mut BytesMut, limits: &Limits) -> Result<Option<Bytes>, HttpError> {
        loop {
            match self.phase {
                ChunkPhase::SizeLine => {
                    let window = &buf[..buf.len().min(limits.max_header_bytes)];
                    let Some(lf) = window
                        .get(self.scanned..)
                        .and_then(|rest| rest.iter().position(|&b| b == b'\n'))
                        .map(|offset| self.scanned + offset)
                    else {
                        if buf.len() >= limits.max_header_bytes {
                            return Err(HttpError::InvalidChunk("chunk size line too long"));
                        }
                        self.scanned = window.len();
                        return Ok(None);
                    };
                    let Some(line) = window[..lf].strip_suffix(b"\r") else {
                        return Err(HttpError::InvalidChunk("chunk size line must end in CRLF"));
                    };
                    let (size, extension_len) = parse_chunk_size_line(line)?;
                    self.extension_bytes += extension_len;
                    if self.extension_bytes > limits.max_header_bytes {
                        return Err(HttpError::InvalidChunk("chunk extensions too long"));
                    }
                    buf.advance(lf + 1);
                    self.scanned = 0;
                    if size == 0 {
                        self.phase = ChunkPhase::Trailers;
                        continue;
                    }
                    let remaining_allowance = limits.max_body_bytes - self.body_len;
                    if size > remaining_allowance as u64 {
                        return Err(HttpError::BodyTooLarge {
                            limit: limits.max_body_bytes,
                        });
                    }
                    // Fits: bounded by max_body_bytes, a usize.
                    self.phase = ChunkPhase::Data {
                        remaining: size as usize,
                    };
                }
                ChunkPhase::Data { remaining } => {
                    if buf.is_empty() {
                        return Ok(None);
                    }
                    let take = remaining.min(buf.len());
                    let whole_chunk = self.body_len == 0 && take == remaining;
                    self.data.append(buf, take, whole_chunk);
                    self.body_len += take;
                    self.phase = if take == remaining {
                        ChunkPhase::DataEnd
                    } else {
                        ChunkPhase::Data {
                            remaining: remaining - take,
                        }
                    };
                }
                ChunkPhase::DataEnd => {
                    if buf.len() < 2 {
                        if buf.first().is_some_and(|&b| b != b'\r') {
                            return Err(HttpError::InvalidChunk("missing CRLF after chunk data"));
                        }
                        return Ok(None);
                    }
                    if &buf[..2] != b"\r\n" {
                        return Err(HttpError::InvalidChunk("missing CRLF after chunk data"));
                    }
                    buf.advance(2);
                    self.phase = ChunkPhase::SizeLine;
                }
                ChunkPhase::Trailers => {
                    let window = &buf[..buf.len().min(limits.max_header_bytes)];
                    let Some(end) = find_section_end(window, self.scanned) else {
                        if buf.len() >= limits.max_header_bytes {
                            return Err(HttpError::TrailersTooLarge {
                                limit: limits.max_header_bytes,
                            });
                        }
                        self.scanned = window.len();
                        return Ok(None);
                    };
                    // Trailers are discarded, but still validated so that a malformed section
                    // cannot be read differently by us and by a proxy in front of us.
                    with_header_slots(limits.max_headers, |slots| {
                        match httparse::parse_headers(&window[..end], slots) {
                            Ok(httparse::Status::Complete((len, _))) if len == end => Ok(()),
                            Ok(_) => Err(HttpError::InvalidChunk("malformed trailer section")),
                            Err(httparse::Error::TooManyHeaders) => {
                                Err(HttpError::TooManyTrailers {
                                    limit: limits.max_headers,
                                })
                            }
                            Err(_) => Err(HttpError::InvalidChunk("malformed trailer field")),
                        }
                    })?;
                    buf.advance(end);
                    return Ok(Some(std::mem::take(&mut self.data).into_bytes()));
                }
            }
        }
    }
}

/// `chunk-size [ BWS ";" chunk-ext ]` without the CRLF. Returns the size and the length of
/// everything after the digits (extension bytes, ignored but counted). Written here rather than
/// using `httparse::parse_chunk_size` because that one reads an empty size (`\r\n` or `;x`) as
/// 0 — a smuggling vector — and puts no bound on extension length.
fn parse_chunk_size_line(line: &[u8]) -> Result<(u64, usize), HttpError> {
    let digits = line.iter().take_while(|b| b.is_ascii_hexdigit()).count();
    if digits == 0 {
        return Err(HttpError::InvalidChunk("missing or non-hex chunk size"));
    }
    if digits > MAX_CHUNK_SIZE_DIGITS {
        return Err(HttpError::InvalidChunk("chunk size overflows"));
    }
    let size = line[..digits].iter().fold(0u64, |acc, &b| {
        // ≤ 16 hex digits cannot overflow u64; to_digit cannot fail after is_ascii_hexdigit.
        (acc << 4) | u64::from(char::from(b).to_digit(16).unwrap_or(0))
    });
    let rest = &line[digits..];
    let after_bws = trim_ows(rest);
    if !after_bws.is_empty() {
        // Leading BWS was trimmed; the extension must start with ';'. Trailing whitespace with
        // no extension is not in the grammar and is rejected.
        let starts_at = rest.len() - after_bws.len();
        let Some(extension) = rest[starts_at..].strip_prefix(b";") else {
            return Err(HttpError::InvalidChunk(
                "invalid character after chunk size",
            ));
        };
        if extension
            .iter()
            .any(|&b| (b < 0x20 && b != b'\t') || b == 0x7f)
        {
            return Err(HttpError::InvalidChunk(
                "control character in chunk extension",
            ));
        }
    } else if !rest.is_empty() {
        return Err(HttpError::InvalidChunk(
            "invalid character after chunk size",
        ));
    }
    Ok((size, rest.len()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits() -> Limits {
        Limits {
            max_header_bytes: 1024,
            max_headers: 16,
            max_body_bytes: 64,
        }
    }

    /// Feeds `input` in one piece; returns all events up to the first Ok(None) or error.
    fn decode_whole(input: &[u8], limits: Limits) -> (Vec<Event>, Option<HttpError>, BytesMut) {
        let mut decoder = RequestDecoder::new(limits);
        let mut buf = BytesMut::from(input);
        let mut events = Vec::new();
        loop {
            match decoder.decode(&mut buf) {
                Ok(Some(event)) => events.push(event),
                Ok(None) => return (events, None, buf),
                Err(err) => return (events, Some(err), buf),
            }
        }
    }

    /// Feeds `input` split at the given offsets (ascending), draining events after each piece.
    fn decode_split(
        input: &[u8],
        splits: &[usize],
        limits: Limits,
    ) -> Result<Vec<Event>, HttpError> {
        let mut decoder = RequestDecoder::new(limits);
        let mut buf = BytesMut::new();
        let mut events = Vec::new();
        let mut start = 0;
        for &end in splits.iter().chain(std::iter::once(&input.len())) {
            buf.extend_from_slice(&input[start..end]);
            start = end;
            while let Some(event) = decoder.decode(&mut buf)? {
                events.push(event);
            }
        }
        Ok(events)
    }

    fn requests(events: Vec<Event>) -> Vec<Request> {
        events
            .into_iter()
            .filter_map(|e| match e {
                Event::Request(r) => Some(r),
                Event::ContinueExpected => None,
            })
            .collect()
    }

    fn one(input: &[u8]) -> Request {
        let (events, err, _) = decode_whole(input, limits());
        assert_eq!(err, None);
        let mut reqs = requests(events);
        assert_eq!(reqs.len(), 1, "expected exactly one request");
        reqs.remove(0)
    }

    fn error(input: &[u8]) -> HttpError {
        error_with(input, limits())
    }

    fn error_with(input: &[u8], limits: Limits) -> HttpError {
        let (_, err, _) = decode_whole(input, limits);
        match err {
            Some(err) => err,
            None => panic!("expected an error for {:?}", String::from_utf8_lossy(input)),
        }
    }

    fn post_with(headers: &str, body: &str) -> Vec<u8> {
        format!("POST /t HTTP/1.1\r\nHost: h\r\n{headers}\r\n{body}").into_bytes()
    }

    // ---- head parsing and accessors ----

    /// The index of fields looked up on every request agrees with a scan of all fields, for
    /// random heads: indexed and other names in any case, repeated, absent, up to the limit
    /// of header fields; and path and query split like `split_once('?')`.
    #[test]
    fn indexed_lookups_and_the_target_agree_with_a_scan_on_random_heads() {
        const NAMES: [&str; 14] = [
            "host",
            "content-type",
            "authorization",
            "x-api-key",
            "origin",
            "cookie",
            "sec-websocket-protocol",
            "x-forwarded-for",
            "connection",
            "upgrade",
            "x-id",
            "accept",
            "cookies",
            "originx",
        ];
        const TARGETS: [&str; 7] = [
            "/",
            "/a?",
            "/a?b=1?c",
            "/t/%20x?q",
            "/api/v1/messages",
            "/?",
            "/é?ü",
        ];
        let limits = Limits {
            max_header_bytes: 8 * 1024,
            max_headers: 40,
            max_body_bytes: 64,
        };
        for seed in 0..2_000u64 {
            let mut rng = fastrand::Rng::with_seed(seed);
            let target = TARGETS[rng.usize(..TARGETS.len())];
            let mut head = format!("GET {target} HTTP/1.1\r\n");
            let mut host = false;
            for i in 0..rng.usize(0..=38) {
                let name = NAMES[rng.usize(..NAMES.len())];
                if name == "host" && host {
                    continue;
                }
                host |= name == "host";
                let name: String = name
                    .chars()
                    .map(|c| {
                        if rng.bool() {
                            c.to_ascii_uppercase()
                        } else {
                            c
                        }
                    })
                    .collect();
                head.push_str(&format!("{name}: v{i}\r\n"));
            }
            if !host {
                head.push_str("Host: h\r\n");
            }
            head.push_str("\r\n");
            let (events, err, _) = decode_whole(head.as_bytes(), limits);
            assert_eq!(err, None, "seed {seed}: {head}");
            let request = requests(events).remove(0);
            for name in NAMES.iter().chain(&["HOST", "Cookie", "missing"]) {
                let scanned = request
                    .headers()
                    .find(|(n, _)| n.eq_ignore_ascii_case(name))
                    .map(|(_, v)| v);
                assert_eq!(request.header(name), scanned, "seed {seed}, {name}: {head}");
            }
            let (path, query) = match target.split_once('?') {
                Some((path, query)) => (path, Some(query)),
                None => (target, None),
            };
            assert_eq!(
                (request.path(), request.query()),
                (path, query),
                "seed {seed}"
            );
        }
    }

    #[test]
    fn parses_get_with_query_and_headers() {
        let r = one(b"GET /topics/a%20b?from=3&x HTTP/1.1\r\nHost: relay\r\nX-Id: 7\r\n\r\n");
        assert_eq!(r.method(), Method::Get);
        assert_eq!(r.method_str(), "GET");
        assert_eq!(r.path(), "/topics/a%20b");
        assert_eq!(r.query(), Some("from=3&x"));
        assert_eq!(r.version_minor(), 1);
        assert_eq!(r.header("x-id"), Some(&b"7"[..]));
        assert_eq!(r.header("HOST"), Some(&b"relay"[..]));
        assert_eq!(r.header("missing"), None);
        let all: Vec<_> = r.headers().collect();
        assert_eq!(all, vec![("Host", &b"relay"[..]), ("X-Id", &b"7"[..])]);
        assert!(r.body().is_empty());
        assert!(r.keep_alive());
    }

    #[test]
    fn methods_map_case_sensitively() {
        for (m, want) in [
            ("GET", Method::Get),
            ("HEAD", Method::Head),
            ("POST", Method::Post),
            ("PUT", Method::Put),
            ("DELETE", Method::Delete),
            ("PATCH", Method::Patch),
            ("OPTIONS", Method::Options),
            ("PROPFIND", Method::Other),
            ("get", Method::Other),
        ] {
            let r = one(format!("{m} / HTTP/1.1\r\nHost: h\r\n\r\n").as_bytes());
            assert_eq!(r.method(), want, "{m}");
            assert_eq!(r.method_str(), m);
        }
    }

    #[test]
    fn header_lookup_returns_first_occurrence() {
        let r = one(b"GET / HTTP/1.1\r\nHost: h\r\nX-A: 1\r\nx-a: 2\r\n\r\n");
        assert_eq!(r.header("X-A"), Some(&b"1"[..]));
        assert_eq!(
            r.headers()
                .filter(|(n, _)| n.eq_ignore_ascii_case("x-a"))
                .count(),
            2
        );
    }

    #[test]
    fn empty_query_and_content_type() {
        let r = one(b"GET /a? HTTP/1.1\r\nHost: h\r\nContent-Type: application/json\r\n\r\n");
        assert_eq!(r.path(), "/a");
        assert_eq!(r.query(), Some(""));
        assert_eq!(r.content_type(), Some(&b"application/json"[..]));
    }

    #[test]
    fn options_asterisk_accepted_only_for_options() {
        let r = one(b"OPTIONS * HTTP/1.1\r\nHost: h\r\n\r\n");
        assert_eq!(r.path(), "*");
        assert_eq!(r.query(), None);
        assert_eq!(
            error(b"GET * HTTP/1.1\r\nHost: h\r\n\r\n"),
            HttpError::InvalidTarget
        );
    }

    #[test]
    fn absolute_and_authority_form_rejected() {
        let e = error(b"GET http://h/x HTTP/1.1\r\nHost: h\r\n\r\n");
        assert_eq!(e, HttpError::InvalidTarget);
        assert_eq!(e.status(), 400);
        assert_eq!(
            error(b"CONNECT h:443 HTTP/1.1\r\nHost: h\r\n\r\n"),
            HttpError::InvalidTarget
        );
    }

    #[test]
    fn keep_alive_rules() {
        let ka = |req: &str| one(req.as_bytes()).keep_alive();
        assert!(ka("GET / HTTP/1.1\r\nHost: h\r\n\r\n"));
        assert!(!ka(
            "GET / HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\n"
        ));
        assert!(!ka(
            "GET / HTTP/1.1\r\nHost: h\r\nConnection: Keep-Alive, CLOSE\r\n\r\n"
        ));
        assert!(!ka(
            "GET / HTTP/1.1\r\nHost: h\r\nConnection: te\r\nConnection: close\r\n\r\n"
        ));
        assert!(ka(
            "GET / HTTP/1.1\r\nHost: h\r\nConnection: closed\r\n\r\n"
        ));
        assert!(!ka("GET / HTTP/1.0\r\n\r\n"));
        assert!(ka("GET / HTTP/1.0\r\nConnection: keep-alive\r\n\r\n"));
        assert!(ka("GET / HTTP/1.0\r\nConnection: foo ,Keep-Alive\r\n\r\n"));
        assert!(!ka(
            "GET / HTTP/1.0\r\nConnection: keep-alive, close\r\n\r\n"
        ));
    }

    #[test]
    fn wants_upgrade_needs_connection_token_and_matching_upgrade() {
        let r = one(b"GET /ws HTTP/1.1\r\nHost: h\r\nConnection: keep-alive, Upgrade\r\nUpgrade: WebSocket\r\n\r\n");
        assert!(r.wants_upgrade("websocket"));
        assert!(!r.wants_upgrade("h2c"));
        let r = one(b"GET /ws HTTP/1.1\r\nHost: h\r\nUpgrade: websocket\r\n\r\n");
        assert!(!r.wants_upgrade("websocket"));
        let r = one(b"GET /ws HTTP/1.1\r\nHost: h\r\nConnection: upgrade\r\n\r\n");
        assert!(!r.wants_upgrade("websocket"));
    }

    #[test]
    fn http10_without_host_is_fine_http11_requires_exactly_one_host() {
        assert_eq!(one(b"GET / HTTP/1.0\r\n\r\n").version_minor(), 0);
        assert_eq!(error(b"GET / HTTP/1.1\r\n\r\n"), HttpError::MissingHost);
        assert_eq!(
            error(b"GET / HTTP/1.1\r\nHost: a\r\nHost: a\r\n\r\n"),
            HttpError::DuplicateHost
        );
        assert_eq!(
            error(b"GET / HTTP/1.0\r\nHost: a\r\nhost: b\r\n\r\n"),
            HttpError::DuplicateHost
        );
    }

    #[test]
    fn unsupported_versions_are_505() {
        for req in [
            &b"GET / HTTP/2.0\r\n\r\n"[..],
            b"GET / HTTP/1.2\r\nHost: h\r\n\r\n",
        ] {
            let e = error(req);
            assert_eq!(e, HttpError::UnsupportedVersion);
            assert_eq!(e.status(), 505);
            assert_eq!(e.code(), "INVALID_REQUEST");
        }
    }

    #[test]
    fn httparse_errors_are_400() {
        for bad in [
            &b"G(T / HTTP/1.1\r\nHost: h\r\n\r\n"[..],
            b"GET / HTTP/1.1\r\nHost: h\r\nBad Name: x\r\n\r\n",
            b"GET / HTTP/1.1\r\nHost: h\r\nX: a\0b\r\n\r\n",
            b"GET / HTTP/1.1\r\nHost: h\r\nX: a\rb\r\n\r\n",
            // obs-fold
            b"GET / HTTP/1.1\r\nHost: h\r\nX: a\r\n  continued\r\n\r\n",
            b"GET  / HTTP/1.1\r\nHost: h\r\n\r\n",
        ] {
            let e = error(bad);
            assert!(matches!(e, HttpError::Malformed(_)), "{e:?} for {bad:?}");
            assert_eq!(e.status(), 400);
            assert_eq!(e.code(), "INVALID_REQUEST");
        }
    }

    #[test]
    fn garbage_rejected_on_first_bytes_without_waiting_for_end_of_head() {
        // A TLS ClientHello to the plaintext port fails at once instead of at the timeout.
        let (events, err, _) = decode_whole(b"\x16\x03\x01\x02\x00\x01", limits());
        assert!(events.is_empty());
        assert!(matches!(err, Some(HttpError::Malformed(_))));
    }

    #[test]
    fn bare_lf_line_endings_follow_httparse() {
        let r = one(b"GET /lf HTTP/1.1\nHost: h\n\n");
        assert_eq!(r.path(), "/lf");
        assert_eq!(r.header("host"), Some(&b"h"[..]));
    }

    #[test]
    fn leading_empty_lines_ignored_and_not_part_of_head() {
        let a = one(b"\r\n\r\n\nGET /x HTTP/1.1\r\nHost: h\r\n\r\n");
        let b = one(b"GET /x HTTP/1.1\r\nHost: h\r\n\r\n");
        assert_eq!(a, b);
    }

    #[test]
    fn endless_empty_lines_eventually_rejected() {
        let input = b"\r\n".repeat(600);
        assert!(matches!(error(&input), HttpError::HeadTooLarge { .. }));
    }

    // ---- limits ----

    #[test]
    fn head_at_limit_accepted_one_over_rejected_431() {
        let base = b"GET / HTTP/1.1\r\nHost: h\r\nX: \r\n\r\n".len();
        let pad = |n: usize| format!("GET / HTTP/1.1\r\nHost: h\r\nX: {}\r\n\r\n", "a".repeat(n));
        let lim = Limits {
            max_header_bytes: base + 100,
            ..limits()
        };
        let (events, err, _) = decode_whole(pad(100).as_bytes(), lim);
        assert_eq!((events.len(), err), (1, None));
        let e = error_with(pad(101).as_bytes(), lim);
        assert_eq!(e, HttpError::HeadTooLarge { limit: base + 100 });
        assert_eq!((e.status(), e.code()), (431, "HEADERS_TOO_LARGE"));
    }

    #[test]
    fn incomplete_head_over_limit_rejected_without_terminator() {
        let lim = Limits {
            max_header_bytes: 64,
            ..limits()
        };
        let mut decoder = RequestDecoder::new(lim);
        let mut buf = BytesMut::from(&b"GET / HTTP/1.1\r\nHost: h\r\nX: "[..]);
        assert_eq!(decoder.decode(&mut buf), Ok(None));
        buf.extend_from_slice(&[b'a'; 35]);
        // 63 bytes: a terminator could still end the head at exactly 64.
        assert_eq!(decoder.decode(&mut buf), Ok(None));
        buf.extend_from_slice(b"a");
        assert_eq!(
            decoder.decode(&mut buf),
            Err(HttpError::HeadTooLarge { limit: 64 })
        );
    }

    #[test]
    fn too_many_headers_431() {
        let lim = Limits {
            max_headers: 3,
            ..limits()
        };
        let ok = b"GET / HTTP/1.1\r\nHost: h\r\nA: 1\r\nB: 2\r\n\r\n";
        assert_eq!(decode_whole(ok, lim).0.len(), 1);
        let e = error_with(
            b"GET / HTTP/1.1\r\nHost: h\r\nA: 1\r\nB: 2\r\nC: 3\r\n\r\n",
            lim,
        );
        assert_eq!(e, HttpError::TooManyHeaders { limit: 3 });
        assert_eq!(e.status(), 431);
    }

    #[test]
    fn max_headers_above_stack_slots_uses_heap_array() {
        let lim = Limits {
            max_headers: STACK_HEADER_SLOTS + 10,
            max_header_bytes: 8192,
            ..limits()
        };
        let mut req = String::from("GET / HTTP/1.1\r\nHost: h\r\n");
        for i in 0..STACK_HEADER_SLOTS + 5 {
            req.push_str(&format!("X-{i}: v\r\n"));
        }
        req.push_str("\r\n");
        let (events, err, _) = decode_whole(req.as_bytes(), lim);
        assert_eq!(err, None);
        assert_eq!(
            requests(events)[0].headers().count(),
            STACK_HEADER_SLOTS + 6
        );
    }

    // ---- Content-Length ----

    #[test]
    fn content_length_body_is_split_zero_copy_and_rest_stays() {
        let mut input = post_with("Content-Length: 5\r\n", "hello");
        input.extend_from_slice(b"GET /next");
        let (events, err, rest) = decode_whole(&input, limits());
        assert_eq!(err, None);
        let reqs = requests(events);
        assert_eq!(reqs[0].body(), &Bytes::from_static(b"hello"));
        assert_eq!(&rest[..], b"GET /next");
    }

    #[test]
    fn content_length_with_ows_is_field_syntax_and_accepted() {
        let r = one(&post_with("Content-Length: \t 3 \r\n", "abc"));
        assert_eq!(r.into_body(), Bytes::from_static(b"abc"));
    }

    #[test]
    fn invalid_content_length_values_400() {
        for v in [
            "+5",
            "-1",
            "5,5",
            "5 5",
            "0x5",
            "",
            "5a",
            "18446744073709551616",
        ] {
            let e = error(&post_with(&format!("Content-Length: {v}\r\n"), ""));
            assert_eq!(e, HttpError::InvalidContentLength, "{v:?}");
            assert_eq!(e.status(), 400);
        }
    }

    #[test]
    fn duplicate_content_length_400_even_if_equal() {
        let e = error(&post_with(
            "Content-Length: 1\r\nContent-Length: 1\r\n",
            "a",
        ));
        assert_eq!(e, HttpError::DuplicateContentLength);
    }

    #[test]
    fn content_length_over_limit_413_before_body_arrives() {
        let mut decoder = RequestDecoder::new(limits());
        let mut buf = BytesMut::from(&post_with("Content-Length: 65\r\n", "")[..]);
        let e = decoder.decode(&mut buf).expect_err("413");
        assert_eq!(e, HttpError::BodyTooLarge { limit: 64 });
        assert_eq!((e.status(), e.code()), (413, "PAYLOAD_TOO_LARGE"));
        // Exactly the limit is fine.
        let body = "x".repeat(64);
        assert_eq!(
            one(&post_with("Content-Length: 64\r\n", &body))
                .body()
                .len(),
            64
        );
    }

    #[test]
    fn huge_content_length_413_not_overflow() {
        let e = error(&post_with("Content-Length: 18446744073709551615\r\n", ""));
        assert_eq!(e.status(), 413);
    }

    #[test]
    fn content_length_zero_and_absent_give_empty_body() {
        assert!(one(&post_with("Content-Length: 0\r\n", ""))
            .body()
            .is_empty());
        let (events, err, rest) = decode_whole(&post_with("", "GET"), limits());
        assert_eq!(err, None);
        assert!(requests(events)[0].body().is_empty());
        assert_eq!(&rest[..], b"GET");
    }

    #[test]
    fn in_body_and_is_idle_track_progress() {
        let mut decoder = RequestDecoder::new(limits());
        let mut buf = BytesMut::new();
        assert!(decoder.is_idle(&buf));
        buf.extend_from_slice(b"POST / HTTP/1.1\r\nHo");
        assert_eq!(decoder.decode(&mut buf), Ok(None));
        assert!(!decoder.is_idle(&buf));
        assert!(!decoder.in_body());
        buf.extend_from_slice(b"st: h\r\nContent-Length: 4\r\n\r\nab");
        assert_eq!(decoder.decode(&mut buf), Ok(None));
        assert!(decoder.in_body());
        assert!(!decoder.is_idle(&buf));
        buf.extend_from_slice(b"cd\r\n");
        assert!(matches!(
            decoder.decode(&mut buf),
            Ok(Some(Event::Request(_)))
        ));
        assert!(!decoder.in_body());
        // A stray CRLF after a body does not count as a started request.
        assert_eq!(decoder.decode(&mut buf), Ok(None));
        assert!(decoder.is_idle(&buf));
    }

    // ---- Transfer-Encoding ----

    #[test]
    fn te_with_content_length_is_400() {
        for h in [
            "Content-Length: 3\r\nTransfer-Encoding: chunked\r\n",
            "Transfer-Encoding: chunked\r\nContent-Length: 3\r\n",
        ] {
            let e = error(&post_with(h, "3\r\nabc\r\n0\r\n\r\n"));
            assert_eq!(e, HttpError::ContentLengthWithTransferEncoding);
            assert_eq!(
                e.message(),
                "both Content-Length and Transfer-Encoding present"
            );
        }
    }

    #[test]
    fn te_on_http10_is_400() {
        let e = error(b"POST / HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n");
        assert_eq!(e, HttpError::TransferEncodingOnHttp10);
    }

    /// A list that ends in chunked but also names a coding we do not decode (or gives chunked
    /// a parameter, which it has none of) is not implemented.
    #[test]
    fn unsupported_codings_before_chunked_are_501() {
        for te in [
            "gzip, chunked",
            "identity, chunked",
            "chunked;q=1",
            "gzip\r\nTransfer-Encoding: chunked",
        ] {
            let e = error(&post_with(&format!("Transfer-Encoding: {te}\r\n"), ""));
            assert_eq!(e, HttpError::UnsupportedTransferCoding, "{te}");
            assert_eq!((e.status(), e.code()), (501, "NOT_IMPLEMENTED"));
        }
    }

    /// Bug: `chunked, identity` was 501 (an unknown coding); RFC 9112 §6.3 makes a request
    /// whose final coding is not chunked a 400 (its length cannot be determined), whatever
    /// the other codings are.
    #[test]
    fn chunked_not_final_is_400_not_501() {
        for te in [
            "chunked, identity",
            "chunked, gzip",
            "chunked;q=1, gzip",
            "identity",
            "gzip",
            "xchunked",
            "chunked\r\nTransfer-Encoding: identity",
        ] {
            let e = error(&post_with(&format!("Transfer-Encoding: {te}\r\n"), ""));
            assert_eq!(e, HttpError::InvalidTransferEncoding, "{te}");
            assert_eq!((e.status(), e.code()), (400, "INVALID_REQUEST"));
        }
    }

    #[test]
    fn chunked_twice_or_empty_te_is_400() {
        for h in [
            "Transfer-Encoding: chunked, chunked\r\n",
            "Transfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n",
            "Transfer-Encoding: ,\r\n",
        ] {
            assert_eq!(
                error(&post_with(h, "")),
                HttpError::InvalidTransferEncoding,
                "{h}"
            );
        }
    }

    #[test]
    fn te_chunked_case_insensitive_and_list_across_fields() {
        let r = one(&post_with(
            "Transfer-Encoding: ChUnKeD\r\n",
            "1\r\na\r\n0\r\n\r\n",
        ));
        assert_eq!(r.body(), &Bytes::from_static(b"a"));
        let r = one(&post_with(
            "Transfer-Encoding: ,\r\nTransfer-Encoding: chunked,\r\n",
            "0\r\n\r\n",
        ));
        assert!(r.body().is_empty());
    }

    // ---- chunked bodies ----

    #[test]
    fn chunked_multiple_chunks_assembled() {
        let r = one(&post_with(
            "Transfer-Encoding: chunked\r\n",
            "5\r\nhello\r\n1\r\n \r\nA\r\n0123456789\r\n0\r\n\r\n",
        ));
        assert_eq!(r.body(), &Bytes::from_static(b"hello 0123456789"));
    }

    #[test]
    fn chunked_extensions_ignored_and_trailers_discarded() {
        let mut input = post_with(
            "Transfer-Encoding: chunked\r\n",
            "3;name=value\r\nabc\r\n2 ; quoted=\"a;b\"\r\nde\r\n0;last\r\nX-Checksum: 1\r\nX-More: 2\r\n\r\n",
        );
        input.extend_from_slice(b"GET /next HTTP/1.1\r\nHost: h\r\n\r\n");
        let (events, err, rest) = decode_whole(&input, limits());
        assert_eq!(err, None);
        let reqs = requests(events);
        assert_eq!(reqs.len(), 2);
        assert_eq!(reqs[0].body(), &Bytes::from_static(b"abcde"));
        assert_eq!(reqs[1].path(), "/next");
        assert!(rest.is_empty());
    }

    #[test]
    fn chunked_uppercase_hex_and_leading_zeros() {
        let body = "x".repeat(0x1F);
        let r = one(&post_with(
            "Transfer-Encoding: chunked\r\n",
            &format!("001F\r\n{body}\r\n000\r\n\r\n"),
        ));
        assert_eq!(r.body().len(), 0x1F);
    }

    #[test]
    fn invalid_chunk_sizes_400() {
        for body in [
            "\r\nabc\r\n0\r\n\r\n",        // empty size
            ";ext\r\nabc\r\n0\r\n\r\n",    // empty size with extension
            "g\r\nabc\r\n0\r\n\r\n",       // non-hex
            "-1\r\nabc\r\n0\r\n\r\n",      // sign
            "0x3\r\nabc\r\n0\r\n\r\n",     // prefix
            "3 \r\nabc\r\n0\r\n\r\n",      // trailing space without extension
            "3\nabc\r\n0\r\n\r\n",         // bare LF after size
            "3;a\x01\r\nabc\r\n0\r\n\r\n", // control char in extension
            "10000000000000000\r\n",       // 17 digits: past u64
        ] {
            let e = error(&post_with("Transfer-Encoding: chunked\r\n", body));
            assert!(
                matches!(e, HttpError::InvalidChunk(_)),
                "{e:?} for {body:?}"
            );
            assert_eq!(e.status(), 400);
        }
    }

    #[test]
    fn chunk_size_past_body_limit_413_before_data() {
        let e = error(&post_with(
            "Transfer-Encoding: chunked\r\n",
            "FFFFFFFFFFFFFFFF\r\n",
        ));
        assert_eq!(e, HttpError::BodyTooLarge { limit: 64 });
        // Cumulative: 40 + 25 > 64.
        let body = format!("28\r\n{}\r\n19\r\n", "a".repeat(40));
        let e = error(&post_with("Transfer-Encoding: chunked\r\n", &body));
        assert_eq!(e.status(), 413);
        // 40 + 24 == 64 is fine.
        let body = format!(
            "28\r\n{}\r\n18\r\n{}\r\n0\r\n\r\n",
            "a".repeat(40),
            "b".repeat(24)
        );
        assert_eq!(
            one(&post_with("Transfer-Encoding: chunked\r\n", &body))
                .body()
                .len(),
            64
        );
    }

    #[test]
    fn chunk_data_must_be_followed_by_crlf() {
        for body in [
            "3\r\nabcd\r\n0\r\n\r\n",
            "3\r\nabc\n0\r\n\r\n",
            "3\r\nabc\r0\r\n\r\n",
        ] {
            let e = error(&post_with("Transfer-Encoding: chunked\r\n", body));
            assert_eq!(
                e,
                HttpError::InvalidChunk("missing CRLF after chunk data"),
                "{body:?}"
            );
        }
    }

    #[test]
    fn chunk_size_line_and_extensions_are_bounded() {
        let lim = Limits {
            max_header_bytes: 128,
            ..limits()
        };
        // One line longer than the limit, never terminated.
        let input = post_with(
            "Transfer-Encoding: chunked\r\n",
            &format!("1;{}", "e".repeat(200)),
        );
        assert_eq!(
            error_with(&input, lim),
            HttpError::InvalidChunk("chunk size line too long")
        );
        // Many short lines whose extensions add up past the limit.
        let chunk = format!("1;{}\r\na\r\n", "e".repeat(40));
        let input = post_with("Transfer-Encoding: chunked\r\n", &chunk.repeat(4));
        assert_eq!(
            error_with(&input, lim),
            HttpError::InvalidChunk("chunk extensions too long")
        );
    }

    #[test]
    fn trailers_bounded_and_validated() {
        let lim = Limits {
            max_header_bytes: 128,
            ..limits()
        };
        let input = post_with(
            "Transfer-Encoding: chunked\r\n",
            &format!("0\r\nX-Big: {}\r\n\r\n", "t".repeat(200)),
        );
        let e = error_with(&input, lim);
        assert_eq!(e, HttpError::TrailersTooLarge { limit: 128 });
        assert_eq!(e.status(), 431);
        let e = error(&post_with(
            "Transfer-Encoding: chunked\r\n",
            "0\r\nBad Trailer: x\r\n\r\n",
        ));
        assert_eq!(e, HttpError::InvalidChunk("malformed trailer field"));
    }

    #[test]
    fn too_many_trailer_fields_431() {
        let lim = Limits {
            max_headers: 2,
            ..limits()
        };
        let input = post_with(
            "Transfer-Encoding: chunked\r\n",
            "0\r\nA: 1\r\nB: 2\r\nC: 3\r\n\r\n",
        );
        let e = error_with(&input, lim);
        assert_eq!(e, HttpError::TooManyTrailers { limit: 2 });
        assert_eq!(e.status(), 431);
    }

    #[test]
    fn single_chunk_body_is_zero_copy() {
        let input = post_with("Transfer-Encoding: chunked\r\n", "5\r\nhello\r\n0\r\n\r\n");
        let mut buf = BytesMut::from(&input[..]);
        let data_ptr = buf.as_ptr() as usize + input.len() - b"hello\r\n0\r\n\r\n".len();
        let mut decoder = RequestDecoder::new(limits());
        let Ok(Some(Event::Request(r))) = decoder.decode(&mut buf) else {
            panic!("expected a request");
        };
        assert_eq!(r.body().as_ptr() as usize, data_ptr);
    }

    #[test]
    fn content_length_body_is_zero_copy() {
        let input = post_with("Content-Length: 5\r\n", "hello");
        let mut buf = BytesMut::from(&input[..]);
        let data_ptr = buf.as_ptr() as usize + input.len() - 5;
        let mut decoder = RequestDecoder::new(limits());
        let Ok(Some(Event::Request(r))) = decoder.decode(&mut buf) else {
            panic!("expected a request");
        };
        assert_eq!(r.body().as_ptr() as usize, data_ptr);
    }

    // ---- Expect ----

    #[test]
    fn expect_100_continue_emitted_once_when_body_missing() {
        let mut decoder = RequestDecoder::new(limits());
        let mut buf =
            BytesMut::from(&post_with("Expect: 100-Continue\r\nContent-Length: 4\r\n", "")[..]);
        assert_eq!(decoder.decode(&mut buf), Ok(Some(Event::ContinueExpected)));
        assert_eq!(decoder.decode(&mut buf), Ok(None));
        buf.extend_from_slice(b"ab");
        assert_eq!(decoder.decode(&mut buf), Ok(None));
        buf.extend_from_slice(b"cd");
        let Ok(Some(Event::Request(r))) = decoder.decode(&mut buf) else {
            panic!("expected the request");
        };
        assert_eq!(r.body(), &Bytes::from_static(b"abcd"));
    }

    #[test]
    fn expect_with_body_already_buffered_returns_request_directly() {
        let (events, err, _) = decode_whole(
            &post_with("Expect: 100-continue\r\nContent-Length: 2\r\n", "ok"),
            limits(),
        );
        assert_eq!(err, None);
        assert_eq!(events.len(), 1);
        assert!(matches!(events[0], Event::Request(_)));
        let (events, _, _) = decode_whole(
            &post_with(
                "Expect: 100-continue\r\nTransfer-Encoding: chunked\r\n",
                "2\r\nok\r\n0\r\n\r\n",
            ),
            limits(),
        );
        assert!(matches!(events[..], [Event::Request(_)]));
    }

    #[test]
    fn expect_on_chunked_partial_body_emits_continue() {
        let (events, err, _) = decode_whole(
            &post_with(
                "Expect: 100-continue\r\nTransfer-Encoding: chunked\r\n",
                "2\r\no",
            ),
            limits(),
        );
        assert_eq!(err, None);
        assert_eq!(events, vec![Event::ContinueExpected]);
    }

    #[test]
    fn expect_without_body_or_on_http10_emits_no_continue() {
        let (events, _, _) = decode_whole(&post_with("Expect: 100-continue\r\n", ""), limits());
        assert!(matches!(events[..], [Event::Request(_)]));
        let (events, _, _) = decode_whole(
            b"POST / HTTP/1.0\r\nExpect: 100-continue\r\nContent-Length: 3\r\n\r\n",
            limits(),
        );
        assert!(events.is_empty());
    }

    #[test]
    fn expect_over_limit_is_413_not_continue() {
        let e = error(&post_with(
            "Expect: 100-continue\r\nContent-Length: 1000\r\n",
            "",
        ));
        assert_eq!(e.status(), 413);
    }

    #[test]
    fn other_expectations_417() {
        let e = error(&post_with("Expect: 200-ok\r\nContent-Length: 0\r\n", ""));
        assert_eq!(e, HttpError::UnsupportedExpectation);
        assert_eq!((e.status(), e.code()), (417, "INVALID_REQUEST"));
    }

    // ---- pipelining and incremental feeding ----

    const PIPELINE: &[u8] = b"GET /a?x=1 HTTP/1.1\r\nHost: h\r\n\r\n\
POST /b HTTP/1.1\r\nHost: h\r\nContent-Length: 3\r\n\r\nabc\
\r\nPOST /c HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n2;e=1\r\nde\r\n1\r\nf\r\n0\r\nT: 1\r\n\r\n\
PUT /d HTTP/1.0\r\nConnection: keep-alive\r\nContent-Length: 1\r\n\r\nZ\
POST /e HTTP/1.1\r\nHost: h\r\nExpect: 100-continue\r\nContent-Length: 2\r\n\r\nok\
DELETE /f HTTP/1.1\nHost: h\n\n";

    #[test]
    fn pipelined_requests_decode_in_order() {
        let (events, err, rest) = decode_whole(PIPELINE, limits());
        assert_eq!(err, None);
        assert!(rest.is_empty());
        let reqs = requests(events);
        let summary: Vec<_> = reqs
            .iter()
            .map(|r| {
                (
                    r.method_str().to_owned(),
                    r.path().to_owned(),
                    r.body().clone(),
                )
            })
            .collect();
        assert_eq!(
            summary,
            vec![
                ("GET".into(), "/a".into(), Bytes::new()),
                ("POST".into(), "/b".into(), Bytes::from_static(b"abc")),
                ("POST".into(), "/c".into(), Bytes::from_static(b"def")),
                ("PUT".into(), "/d".into(), Bytes::from_static(b"Z")),
                ("POST".into(), "/e".into(), Bytes::from_static(b"ok")),
                ("DELETE".into(), "/f".into(), Bytes::new()),
            ]
        );
        assert!(reqs[3].keep_alive());
    }

    #[test]
    fn byte_at_a_time_equals_whole() {
        let whole = requests(decode_whole(PIPELINE, limits()).0);
        let splits: Vec<usize> = (1..PIPELINE.len()).collect();
        let events = decode_split(PIPELINE, &splits, limits()).expect("valid pipeline");
        // Fed byte by byte, the Expect request's body is not there yet when its head is parsed.
        assert_eq!(
            events
                .iter()
                .filter(|e| **e == Event::ContinueExpected)
                .count(),
            1
        );
        assert_eq!(requests(events), whole);
    }

    #[test]
    fn every_two_way_split_equals_whole() {
        let whole = requests(decode_whole(PIPELINE, limits()).0);
        for split in 1..PIPELINE.len() {
            let events = decode_split(PIPELINE, &[split], limits()).expect("valid pipeline");
            assert_eq!(requests(events), whole, "split at {split}");
        }
    }

    #[test]
    fn every_split_of_invalid_input_fails_the_same_way() {
        let input = post_with("Transfer-Encoding: chunked\r\n", "3\r\nabcX");
        let whole = error(&input);
        for split in 1..input.len() {
            assert_eq!(
                decode_split(&input, &[split], limits()),
                Err(whole.clone()),
                "split {split}"
            );
        }
    }

    #[test]
    fn decoder_is_reused_across_keep_alive_requests_with_fresh_state() {
        let mut decoder = RequestDecoder::new(limits());
        let mut buf = BytesMut::new();
        for i in 0..3 {
            buf.extend_from_slice(
                format!("POST /{i} HTTP/1.1\r\nHost: h\r\nContent-Length: 1\r\n\r\n{i}").as_bytes(),
            );
            let Ok(Some(Event::Request(r))) = decoder.decode(&mut buf) else {
                panic!("request {i}");
            };
            assert_eq!(r.path(), format!("/{i}"));
            assert_eq!(r.body(), &Bytes::from(i.to_string()));
            assert!(decoder.is_idle(&buf));
        }
    }

    #[test]
    fn find_section_end_handles_crlf_lf_and_resumption() {
        assert_eq!(find_section_end(b"a\r\n\r\nrest", 0), Some(5));
        assert_eq!(find_section_end(b"a\n\nrest", 0), Some(3));
        assert_eq!(find_section_end(b"a\r\n\nrest", 0), Some(4));
        assert_eq!(find_section_end(b"\r\nrest", 0), Some(2));
        assert_eq!(find_section_end(b"\nrest", 0), Some(1));
        assert_eq!(find_section_end(b"a\r\nb\r\n", 0), None);
        // Resuming at the old end still sees a terminator split across reads.
        assert_eq!(find_section_end(b"a\r\n\r\n", 4), Some(5));
        assert_eq!(find_section_end(b"a\r\n\r\n", 3), Some(5));
        assert_eq!(find_section_end(b"a\r\n", 9), None);
    }

    #[test]
    fn error_messages_are_human_readable() {
        assert_eq!(
            HttpError::BodyTooLarge { limit: 64 }.message(),
            "request body exceeds 64 bytes"
        );
        assert_eq!(
            HttpError::Malformed(httparse::Error::HeaderName).message(),
            "malformed request head: invalid header name"
        );
    }
}
