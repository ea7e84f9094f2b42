//! A Server-Sent Events client for the delivery tests: sends the GET, reads the response head,
//! then parses the `text/event-stream` body block by block (`retry:`, comments, events). The
//! relay sends the body close-delimited; a proxy in between (nginx) may re-frame it with
//! `Transfer-Encoding: chunked`, which is decoded here.
//!
//! Owns: the event-stream wire format from the client side. Does not own: what events mean
//! (the tests assert that). Every read has a deadline.

use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use serde_json::Value;

use super::{build_request, Conn, Response, READ_TIMEOUT};

/// One block of the stream (the text between blank lines).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SseItem {
    /// `retry: <ms>`.
    Retry(u64),
    /// A comment line (`: text`), without the colon and the one space after it.
    Comment(String),
    /// An event: its `id:`, `event:` and the `data:` lines joined with `\n`.
    Event {
        id: Option<String>,
        event: Option<String>,
        data: String,
    },
}

/// What one read produced.
#[derive(Debug)]
pub enum SseRead {
    Item(SseItem),
    /// The server ended the stream.
    Eof,
    Timeout,
}

/// An open event stream.
pub struct SseClient {
    pub stream: TcpStream,
    /// Body bytes read but not yet parsed.
    buf: Vec<u8>,
    /// `Some` when the response came `Transfer-Encoding: chunked`: its decoder, which turns
    /// what is read into body bytes for `buf`.
    chunked: Option<Dechunker>,
}

/// Incremental `Transfer-Encoding: chunked` decoding of a body that arrives in pieces.
#[derive(Default)]
struct Dechunker {
    /// Bytes read but not yet decoded (an incomplete size line or chunk end).
    raw: Vec<u8>,
    /// Data bytes of the current chunk still to come; then its CRLF.
    left_in_chunk: usize,
    /// The current chunk's data is complete and its CRLF is still to be consumed.
    crlf_due: bool,
    /// The last (size 0) chunk was seen.
    done: bool,
}

impl Dechunker {
    /// Decodes what it can of `raw` (plus `input`) into `out`.
    fn feed(&mut self, input: &[u8], out: &mut Vec<u8>) {
        self.raw.extend_from_slice(input);
        loop {
            if self.done {
                return;
            }
            if self.left_in_chunk > 0 {
                let n = self.left_in_chunk.min(self.raw.len());
                if n == 0 {
                    return;
                }
                out.extend(self.raw.drain(..n));
                self.left_in_chunk -= n;
                if self.left_in_chunk == 0 {
                    self.crlf_due = true;
                }
                continue;
            }
            if self.crlf_due {
                if self.raw.len() < 2 {
                    return;
                }
                assert_eq!(&self.raw[..2], b"\r\n", "chunk not followed by CRLF");
                self.raw.drain(..2);
                self.crlf_due = false;
                continue;
            }
            let Some(end) = self.raw.windows(2).position(|w| w == b"\r\n") else {
                return;
            };
            let line = String::from_utf8_lossy(&self.raw[..end]).into_owned();
            self.raw.drain(..end + 2);
            let size_hex = line.split(';').next().unwrap_or_default().trim();
            let size = usize::from_str_radix(size_hex, 16)
                .unwrap_or_else(|_| panic!("bad chunk size line {line:?}"));
            if size == 0 {
                self.done = true;
            } else {
                self.left_in_chunk = size;
            }
        }
    }
}

impl SseClient {
    /// Sends `GET path` with `headers` and reads the response head. A non-200 answer's body
    /// (Content-Length framed, as every error is) is read too and returned as `Err`.
    pub fn open(
        addr: SocketAddr,
        path: &str,
        headers: &[(&str, &str)],
    ) -> Result<(SseClient, Response), Response> {
        let mut conn = Conn::connect(addr);
        conn.send(&build_request("GET", path, headers, None));
        let head = conn.read_head();
        if head.status != 200 {
            let len: usize = head
                .header("content-length")
                .and_then(|v| v.parse().ok())
                .unwrap_or(0);
            let mut resp = head;
            // Part or all of the body may have come with the head.
            let mut body = conn.take_buffered();
            let deadline = Instant::now() + READ_TIMEOUT;
            while body.len() < len && Instant::now() < deadline {
                let mut chunk = [0u8; 4096];
                match conn.stream.read(&mut chunk) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => body.extend_from_slice(&chunk[..n]),
                }
            }
            resp.body = body;
            return Err(resp);
        }
        // `Conn` may have read body bytes past the head; they belong to the stream.
        let read = conn.take_buffered();
        let mut chunked = head
            .header("transfer-encoding")
            .is_some_and(|te| te.to_ascii_lowercase().contains("chunked"))
            .then(Dechunker::default);
        let buf = match chunked.as_mut() {
            Some(decoder) => {
                let mut buf = Vec::new();
                decoder.feed(&read, &mut buf);
                buf
            }
            None => read,
        };
        Ok((
            SseClient {
                stream: conn.stream,
                buf,
                chunked,
            },
            head,
        ))
    }

    /// Like [`SseClient::open`], panicking unless the answer is a 200 event stream.
    pub fn open_ok(addr: SocketAddr, path: &str, headers: &[(&str, &str)]) -> SseClient {
        let (client, head) = SseClient::open(addr, path, headers)
            .unwrap_or_else(|resp| panic!("GET {path}: expected 200, got {resp:?}"));
        assert!(
            head.header("content-type")
                .is_some_and(|ct| ct.starts_with("text/event-stream")),
            "GET {path}: not an event stream: {head:?}"
        );
        client
    }

    /// Reads the next block within `within`.
    pub fn next_item(&mut self, within: Duration) -> SseRead {
        let deadline = Instant::now() + within;
        loop {
            if let Some(pos) = self.buf.windows(2).position(|w| w == b"\n\n") {
                let block: Vec<u8> = self.buf.drain(..pos + 2).collect();
                let text = String::from_utf8(block[..pos].to_vec())
                    .unwrap_or_else(|e| panic!("event-stream block is not UTF-8: {e}"));
                return SseRead::Item(parse_block(&text));
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return SseRead::Timeout;
            }
            self.stream
                .set_read_timeout(Some(left))
                .expect("set read timeout");
            let mut chunk = [0u8; 16 * 1024];
            match self.stream.read(&mut chunk) {
                Ok(0) => return SseRead::Eof,
                Ok(n) => match self.chunked.as_mut() {
                    Some(decoder) => {
                        decoder.feed(&chunk[..n], &mut self.buf);
                        if decoder.done && !self.buf.windows(2).any(|w| w == b"\n\n") {
                            return SseRead::Eof;
                        }
                    }
                    None => self.buf.extend_from_slice(&chunk[..n]),
                },
                Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                    continue
                }
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(_) => return SseRead::Eof,
            }
        }
    }

    /// The next block; panics on EOF or when none comes within [`READ_TIMEOUT`].
    pub fn next(&mut self) -> SseItem {
        match self.next_item(READ_TIMEOUT) {
            SseRead::Item(item) => item,
            other => panic!("expected an event-stream block, got {other:?}"),
        }
    }

    /// The next event (comments and `retry:` skipped, at most 64 of them), as
    /// `(id, event, data as JSON)`; `None` if none came within `within`.
    pub fn try_next_event(&mut self, within: Duration) -> Option<(Option<String>, String, Value)> {
        let deadline = Instant::now() + within;
        for _ in 0..64 {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.next_item(left) {
                SseRead::Item(SseItem::Event { id, event, data }) => {
                    let value: Value = serde_json::from_str(&data)
                        .unwrap_or_else(|e| panic!("event data is not JSON ({e}): {data}"));
                    return Some((id, event.unwrap_or_else(|| "message".to_string()), value));
                }
                SseRead::Item(_) => continue,
                SseRead::Timeout => return None,
                SseRead::Eof => panic!("the event stream ended"),
            }
        }
        panic!("64 blocks without an event");
    }

    /// The next event; panics if none comes within [`READ_TIMEOUT`].
    pub fn next_event(&mut self) -> (Option<String>, String, Value) {
        self.try_next_event(READ_TIMEOUT)
            .unwrap_or_else(|| panic!("no event within {READ_TIMEOUT:?}"))
    }

    /// The next event, asserting it is a `message` event whose `id:` is its message id (one
    /// topic) or a per-topic position naming it for its topic (several); returns the message
    /// JSON.
    pub fn next_message(&mut self) -> Value {
        self.next_message_with_id().1
    }

    /// [`SseClient::next_message`], with the event's `id:`.
    pub fn next_message_with_id(&mut self) -> (String, Value) {
        let (id, event, data) = self.next_event();
        assert_eq!(event, "message", "expected a message event: {data}");
        let id = id.unwrap_or_else(|| panic!("message event without id: {data}"));
        let topic = data["topic"].as_str().unwrap_or_default();
        let at = match per_topic_position(&id) {
            Some(positions) => positions.get(topic).cloned().unwrap_or_default(),
            None => id.clone(),
        };
        assert_eq!(
            data["message_id"],
            at.as_str(),
            "event id {id} vs data: {data}"
        );
        (id, data)
    }

    /// Writes bytes to the stream's connection (nothing should ever be needed; for tests of
    /// what the server does with them).
    pub fn send(&mut self, bytes: &[u8]) {
        self.stream.write_all(bytes).expect("write");
    }
}

/// A multi-topic stream's event id, `a=<id>,b=<id>`, as topic -> id; `None` for a plain id.
pub fn per_topic_position(id: &str) -> Option<std::collections::BTreeMap<String, String>> {
    if !id.contains('=') {
        return None;
    }
    Some(
        id.split(',')
            .map(|item| {
                let (topic, at) = item
                    .split_once('=')
                    .unwrap_or_else(|| panic!("bad per-topic id {id:?}"));
                (topic.to_string(), at.to_string())
            })
            .collect(),
    )
}

/// Parses one block (without its terminating blank line).
fn parse_block(text: &str) -> SseItem {
    let mut id = None;
    let mut event = None;
    let mut data: Option<String> = None;
    let mut retry = None;
    let mut comment = None;
    for line in text.split('\n') {
        if let Some(rest) = line.strip_prefix(':') {
            comment = Some(rest.strip_prefix(' ').unwrap_or(rest).to_string());
            continue;
        }
        let (field, value) = line.split_once(':').unwrap_or((line, ""));
        let value = value.strip_prefix(' ').unwrap_or(value);
        match field {
            "id" => id = Some(value.to_string()),
            "event" => event = Some(value.to_string()),
            "data" => {
                data = Some(match data {
                    Some(d) => format!("{d}\n{value}"),
                    None => value.to_string(),
                })
            }
            "retry" => {
                retry = Some(
                    value
                        .parse()
                        .unwrap_or_else(|_| panic!("bad retry line {line:?}")),
                )
            }
            other => panic!("unknown event-stream field {other:?} in block {text:?}"),
        }
    }
    match (data, retry, comment) {
        (Some(data), _, _) => SseItem::Event { id, event, data },
        (None, Some(ms), _) if id.is_none() && event.is_none() => SseItem::Retry(ms),
        (None, None, Some(c)) if id.is_none() && event.is_none() => SseItem::Comment(c),
        _ => panic!("unexpected event-stream block {text:?}"),
    }
}
