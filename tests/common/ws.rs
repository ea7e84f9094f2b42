//! WebSocket clients for the delivery tests: a well-behaved one ([`WsClient`], tungstenite,
//! which answers protocol pings by itself whenever it reads) and a byte-level one ([`RawWs`])
//! that sends exactly the frames a test builds — unmasked, oversized, with reserved bits —
//! and reads the server's frames undecorated, pings included.
//!
//! Owns: the upgrade handshake from the client side, JSON text frames in and out, close codes.
//! Does not own: what the relay's JSON frames mean (the tests assert that) or any server
//! internals. Every read has a deadline, so a silent server fails a test instead of hanging it.

use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use serde_json::Value;
use tungstenite::client::ClientRequestBuilder;
use tungstenite::protocol::frame::coding::CloseCode;
use tungstenite::protocol::{CloseFrame, WebSocketConfig};
use tungstenite::{Message, WebSocket};

use super::READ_TIMEOUT;

/// What one read of a [`WsClient`] produced.
#[derive(Debug)]
pub enum WsEvent {
    /// A text frame, parsed as JSON (a text frame that is not JSON fails the test: the relay
    /// only sends JSON).
    Json(Value),
    /// A protocol ping (tungstenite queues the pong; the next read sends it).
    Ping,
    /// A close frame: code and reason, if the frame had them.
    Close(Option<(u16, String)>),
    /// Nothing arrived before the deadline.
    Timeout,
    /// The connection ended without a close frame, or failed; the error text.
    Gone(String),
}

/// A WebSocket client that behaves: masks its frames, answers pings, completes the close
/// handshake.
pub struct WsClient {
    pub socket: WebSocket<TcpStream>,
    /// The `Sec-WebSocket-Protocol` the server chose, if any.
    pub protocol: Option<String>,
}

impl WsClient {
    /// Connects to `/ws` with no subprotocol.
    pub fn connect(addr: SocketAddr) -> WsClient {
        WsClient::connect_with(addr, &[], None)
    }

    /// Connects to `/ws` offering `protocols`; `config` tunes tungstenite's buffers (the test
    /// with a thousand clients keeps them small).
    pub fn connect_with(
        addr: SocketAddr,
        protocols: &[&str],
        config: Option<WebSocketConfig>,
    ) -> WsClient {
        WsClient::try_connect_with(addr, protocols, config).unwrap_or_else(|e| panic!("{e}"))
    }

    /// Like [`WsClient::connect_with`], reporting a refused connection or a failed handshake
    /// instead of panicking: for consumers that reconnect to a relay that may be down.
    pub fn try_connect_with(
        addr: SocketAddr,
        protocols: &[&str],
        config: Option<WebSocketConfig>,
    ) -> Result<WsClient, String> {
        WsClient::try_connect_headers(addr, protocols, &[], config)
    }

    /// Like [`WsClient::try_connect_with`] with extra request headers (`Authorization`,
    /// `Origin`, `Cookie`).
    pub fn try_connect_headers(
        addr: SocketAddr,
        protocols: &[&str],
        headers: &[(&str, &str)],
        config: Option<WebSocketConfig>,
    ) -> Result<WsClient, String> {
        let stream = TcpStream::connect_timeout(&addr, READ_TIMEOUT)
            .map_err(|e| format!("connect to {addr}/ws: {e}"))?;
        stream
            .set_read_timeout(Some(READ_TIMEOUT))
            .expect("set read timeout");
        stream
            .set_write_timeout(Some(READ_TIMEOUT))
            .expect("set write timeout");
        stream.set_nodelay(true).expect("nodelay");
        let uri: tungstenite::http::Uri = format!("ws://{addr}/ws").parse().expect("ws uri");
        let mut request = ClientRequestBuilder::new(uri);
        for p in protocols {
            request = request.with_sub_protocol(*p);
        }
        for (name, value) in headers {
            request = request.with_header(*name, *value);
        }
        let (socket, response) =
            tungstenite::client::client_with_config(request, stream, config)
                .map_err(|e| format!("WebSocket handshake with {addr} failed: {e}"))?;
        let protocol = response
            .headers()
            .get("sec-websocket-protocol")
            .map(|v| v.to_str().expect("protocol header is text").to_string());
        Ok(WsClient { socket, protocol })
    }

    /// Sends a text frame.
    pub fn send_text(&mut self, text: &str) {
        self.socket
            .send(Message::text(text))
            .unwrap_or_else(|e| panic!("send {text:?}: {e}"));
    }

    /// Sends a JSON value as a text frame.
    pub fn send_json(&mut self, value: &Value) {
        self.send_text(&value.to_string());
    }

    /// Reads the next frame the application sees, or reports the deadline passing.
    pub fn next_event(&mut self, within: Duration) -> WsEvent {
        let deadline = Instant::now() + within;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return WsEvent::Timeout;
            }
            // A zero timeout means "block forever" to std; `left` is not zero here.
            self.socket
                .get_mut()
                .set_read_timeout(Some(left))
                .expect("set read timeout");
            match self.socket.read() {
                Ok(Message::Text(text)) => {
                    let value: Value = serde_json::from_str(text.as_str())
                        .unwrap_or_else(|e| panic!("text frame is not JSON ({e}): {text}"));
                    return WsEvent::Json(value);
                }
                Ok(Message::Ping(_)) => return WsEvent::Ping,
                Ok(Message::Pong(_)) => continue,
                Ok(Message::Close(frame)) => {
                    return WsEvent::Close(
                        frame.map(|f| (u16::from(f.code), f.reason.as_str().to_string())),
                    )
                }
                Ok(other) => panic!("unexpected frame from the relay: {other:?}"),
                Err(tungstenite::Error::Io(e))
                    if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) =>
                {
                    continue
                }
                Err(e) => return WsEvent::Gone(e.to_string()),
            }
        }
    }

    /// The next JSON frame within `within` (pings skipped), or `None` when none came in time;
    /// panics on a close or a dead connection.
    pub fn try_recv(&mut self, within: Duration) -> Option<Value> {
        let deadline = Instant::now() + within;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.next_event(left) {
                WsEvent::Json(v) => return Some(v),
                WsEvent::Ping => continue,
                WsEvent::Timeout => return None,
                other => panic!("expected a JSON frame, got {other:?}"),
            }
        }
    }

    /// The next JSON frame; panics if none comes within [`READ_TIMEOUT`].
    pub fn recv(&mut self) -> Value {
        self.try_recv(READ_TIMEOUT)
            .unwrap_or_else(|| panic!("no frame from the relay within {READ_TIMEOUT:?}"))
    }

    /// The next JSON frame, asserting its `type`.
    pub fn recv_type(&mut self, kind: &str) -> Value {
        let v = self.recv();
        assert_eq!(v["type"], kind, "expected a `{kind}` frame, got {v}");
        v
    }

    /// Sends a subscribe (with `offset` when given) and returns the `subscribed` frame, which
    /// must be the next frame.
    pub fn subscribe(&mut self, topics: &[&str], offset: Option<Value>) -> Value {
        let mut cmd = serde_json::json!({"type": "subscribe", "topics": topics});
        if let Some(offset) = offset {
            cmd["offset"] = offset;
        }
        self.send_json(&cmd);
        let v = self.recv_type("subscribed");
        assert_eq!(v["topics"], serde_json::json!(topics), "{v}");
        v
    }

    /// Reads `n` message frames, asserting every frame in between is a message.
    pub fn recv_messages(&mut self, n: usize) -> Vec<Value> {
        (0..n).map(|_| self.recv_type("message")).collect()
    }

    /// Sends a close frame with `code`.
    pub fn close(&mut self, code: u16, reason: &str) {
        self.socket
            .close(Some(CloseFrame {
                code: CloseCode::from(code),
                reason: reason.into(),
            }))
            .unwrap_or_else(|e| panic!("send close: {e}"));
    }

    /// Reads until a close frame arrives (skipping at most `max_frames` other frames) within
    /// `within`; returns its code and reason. Panics on a deadline, EOF without a close frame,
    /// or more frames than allowed.
    pub fn expect_close(&mut self, within: Duration, max_frames: usize) -> (u16, String) {
        let deadline = Instant::now() + within;
        let mut skipped = 0usize;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.next_event(left) {
                WsEvent::Close(Some(cr)) => return cr,
                WsEvent::Close(None) => panic!("close frame without a code"),
                WsEvent::Json(_) | WsEvent::Ping => {
                    skipped += 1;
                    assert!(
                        skipped <= max_frames,
                        "more than {max_frames} frames and still no close frame"
                    );
                }
                WsEvent::Timeout => {
                    panic!("no close frame within {within:?} ({skipped} frames read)")
                }
                WsEvent::Gone(e) => {
                    panic!("connection ended without a close frame ({skipped} frames read): {e}")
                }
            }
        }
    }
}

/// The key every raw handshake sends; any 16-byte base64 value is valid.
const RAW_KEY: &str = "dGhlIHNhbXBsZSBub25jZQ==";

/// One frame as the server sent it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RawFrame {
    pub fin: bool,
    pub opcode: u8,
    pub payload: Vec<u8>,
}

impl RawFrame {
    /// The close code of a close frame (opcode 8), if it carries one.
    pub fn close_code(&self) -> Option<u16> {
        (self.opcode == 0x8 && self.payload.len() >= 2)
            .then(|| u16::from_be_bytes([self.payload[0], self.payload[1]]))
    }
}

/// What one read of a [`RawWs`] produced.
#[derive(Debug)]
pub enum RawEvent {
    Frame(RawFrame),
    /// The server closed (EOF) or reset the connection.
    Eof,
    Timeout,
}

/// A byte-level WebSocket client: it does the upgrade, then sends exactly the frames it is
/// given and never answers anything on its own.
pub struct RawWs {
    pub stream: TcpStream,
    /// Bytes read but not yet parsed into a frame.
    buf: Vec<u8>,
}

impl RawWs {
    /// Upgrades a new connection to `/ws`; asserts the 101 and its accept key.
    pub fn connect(addr: SocketAddr) -> RawWs {
        let mut stream = TcpStream::connect_timeout(&addr, READ_TIMEOUT).expect("connect");
        stream.set_nodelay(true).expect("nodelay");
        stream
            .set_read_timeout(Some(READ_TIMEOUT))
            .expect("set read timeout");
        let request = format!(
            "GET /ws HTTP/1.1\r\nHost: localhost\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
             Sec-WebSocket-Key: {RAW_KEY}\r\nSec-WebSocket-Version: 13\r\n\r\n"
        );
        stream.write_all(request.as_bytes()).expect("send upgrade");
        let mut buf = Vec::new();
        let end = loop {
            if let Some(pos) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break pos;
            }
            let mut chunk = [0u8; 1024];
            let n = stream.read(&mut chunk).expect("read the upgrade response");
            assert!(n > 0, "server closed during the upgrade: {buf:?}");
            buf.extend_from_slice(&chunk[..n]);
        };
        let head = String::from_utf8_lossy(&buf[..end]).into_owned();
        buf.drain(..end + 4);
        assert!(
            head.starts_with("HTTP/1.1 101"),
            "upgrade not accepted: {head}"
        );
        // The RFC 6455 example key's accept value.
        assert!(
            head.to_ascii_lowercase()
                .contains("sec-websocket-accept: s3pplmbitxaq9kygzzhzrbk+xoo="),
            "wrong or missing Sec-WebSocket-Accept: {head}"
        );
        RawWs { stream, buf }
    }

    /// Sends raw bytes.
    pub fn send_bytes(&mut self, bytes: &[u8]) {
        self.stream.write_all(bytes).expect("write to the relay");
    }

    /// Sends one frame built by [`encode_frame`].
    pub fn send_frame(&mut self, fin: bool, rsv: u8, opcode: u8, payload: &[u8], masked: bool) {
        let bytes = encode_frame(fin, rsv, opcode, payload, masked);
        self.send_bytes(&bytes);
    }

    /// Reads the next frame within `within`.
    pub fn next_frame(&mut self, within: Duration) -> RawEvent {
        let deadline = Instant::now() + within;
        loop {
            if let Some((frame, used)) = parse_frame(&self.buf) {
                self.buf.drain(..used);
                return RawEvent::Frame(frame);
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return RawEvent::Timeout;
            }
            self.stream
                .set_read_timeout(Some(left))
                .expect("set read timeout");
            let mut chunk = [0u8; 16 * 1024];
            match self.stream.read(&mut chunk) {
                Ok(0) => return RawEvent::Eof,
                Ok(n) => self.buf.extend_from_slice(&chunk[..n]),
                Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                    continue
                }
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(_) => return RawEvent::Eof,
            }
        }
    }

    /// Reads frames (skipping at most 16 pings) until a close frame; returns its code. Panics
    /// on anything else, EOF first, or the deadline.
    pub fn expect_close_code(&mut self, within: Duration) -> u16 {
        let deadline = Instant::now() + within;
        for _ in 0..16 {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.next_frame(left) {
                RawEvent::Frame(f) if f.opcode == 0x9 => continue,
                RawEvent::Frame(f) if f.opcode == 0x8 => {
                    return f
                        .close_code()
                        .unwrap_or_else(|| panic!("close frame without a code: {f:?}"))
                }
                other => panic!("expected a close frame, got {other:?}"),
            }
        }
        panic!("only pings and no close frame");
    }

    /// Whether the server ends the TCP connection within `within` (frames before the EOF are
    /// ignored, at most 64 of them).
    pub fn eof_within(&mut self, within: Duration) -> bool {
        let deadline = Instant::now() + within;
        for _ in 0..64 {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.next_frame(left) {
                RawEvent::Eof => return true,
                RawEvent::Timeout => return false,
                RawEvent::Frame(_) => continue,
            }
        }
        false
    }
}

/// Encodes a client frame: FIN bit, the three RSV bits (`rsv` in 0..8), opcode, payload, and a
/// fixed mask key when `masked` (a fixed key keeps failures reproducible byte for byte).
pub fn encode_frame(fin: bool, rsv: u8, opcode: u8, payload: &[u8], masked: bool) -> Vec<u8> {
    let mut out = Vec::with_capacity(payload.len() + 14);
    out.push(if fin { 0x80 } else { 0 } | ((rsv & 0x7) << 4) | (opcode & 0x0f));
    let mask_bit = if masked { 0x80 } else { 0 };
    let len = payload.len();
    if len < 126 {
        out.push(mask_bit | len as u8);
    } else if len <= usize::from(u16::MAX) {
        out.push(mask_bit | 126);
        out.extend_from_slice(&(len as u16).to_be_bytes());
    } else {
        out.push(mask_bit | 127);
        out.extend_from_slice(&(len as u64).to_be_bytes());
    }
    if masked {
        let key = [0x37u8, 0xfa, 0x21, 0x3d];
        out.extend_from_slice(&key);
        out.extend(payload.iter().enumerate().map(|(i, b)| b ^ key[i % 4]));
    } else {
        out.extend_from_slice(payload);
    }
    out
}

/// A close frame payload: the code then the reason.
pub fn close_payload(code: u16, reason: &str) -> Vec<u8> {
    let mut p = code.to_be_bytes().to_vec();
    p.extend_from_slice(reason.as_bytes());
    p
}

/// Parses one server frame (unmasked, as RFC 6455 requires of servers) from the front of
/// `buf`; `None` if incomplete. Returns the frame and the bytes it used.
fn parse_frame(buf: &[u8]) -> Option<(RawFrame, usize)> {
    if buf.len() < 2 {
        return None;
    }
    let fin = buf[0] & 0x80 != 0;
    let opcode = buf[0] & 0x0f;
    assert!(
        buf[1] & 0x80 == 0,
        "server frame is masked: {:?}",
        &buf[..2]
    );
    let (len, mut at) = match buf[1] & 0x7f {
        126 => {
            if buf.len() < 4 {
                return None;
            }
            (usize::from(u16::from_be_bytes([buf[2], buf[3]])), 4)
        }
        127 => {
            if buf.len() < 10 {
                return None;
            }
            let mut b = [0u8; 8];
            b.copy_from_slice(&buf[2..10]);
            (
                usize::try_from(u64::from_be_bytes(b)).expect("frame length fits usize"),
                10,
            )
        }
        n => (usize::from(n), 2),
    };
    if buf.len() < at + len {
        return None;
    }
    let payload = buf[at..at + len].to_vec();
    at += len;
    Some((
        RawFrame {
            fin,
            opcode,
            payload,
        },
        at,
    ))
}
