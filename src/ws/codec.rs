//! Server-side WebSocket framing (RFC 6455 §5), sans-IO over byte buffers.
//!
//! Owns: decoding client frames from the connection's input buffer into complete messages
//! ([`Decoder`]), and encoding the server's frames ([`encode_text`], [`text_frame`], control
//! frames). Does not own: the handshake ([`super::handshake`]), what messages mean
//! ([`super::protocol`]), sockets, timers, or the close handshake's state (the connection loop
//! decides when to send and when to stop reading after a close).
//!
//! Built on tungstenite's frame layer: [`FrameHeader::parse`] / [`FrameHeader::format`] code
//! the headers and its opcode/close-code types classify them. Its `WebSocketContext` was
//! rejected: it copies input into its own buffer (128 KiB by default per socket), queues its own
//! pong and close replies into its own output buffer, and cannot hand out one encoded frame to
//! share across sockets. The message state machine (fragments, limits, UTF-8) is ours.
//!
//! Unmasking is the one piece hand-written here: tungstenite's `apply_mask` is private to it,
//! and its only public path (`Frame::format` with a mask) writes a header and allocates.

use std::io::Cursor;

use bytes::{Buf, BufMut, Bytes, BytesMut};
use tungstenite::protocol::frame::coding::{CloseCode, Control, Data, OpCode};
use tungstenite::protocol::frame::FrameHeader;

/// Size limits for client input, checked against the frame header's declared length before any
/// payload is buffered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CodecLimits {
    /// Largest payload of a single frame.
    pub max_frame_bytes: usize,
    /// Largest message, summed over its fragments.
    pub max_message_bytes: usize,
}

impl Default for CodecLimits {
    /// 1 MiB each: client messages are small JSON commands, and a frame this size already
    /// costs a connection as much memory as ~8 idle connections' buffers together.
    fn default() -> Self {
        CodecLimits {
            max_frame_bytes: 1 << 20,
            max_message_bytes: 1 << 20,
        }
    }
}

/// One complete thing the client sent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Incoming {
    /// A complete (possibly reassembled) text message, checked to be UTF-8.
    Text(String),
    Binary(Bytes),
    /// The connection loop answers with [`encode_pong`] carrying the same payload.
    Ping(Bytes),
    Pong(Bytes),
    /// The client's close: `(code, reason)` if it sent a code. The connection loop answers
    /// with [`encode_close_echo`] and stops reading; the decoder does not track that.
    Close(Option<(u16, String)>),
}

/// Why the server closes a connection: the code and reason of its close frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum CloseReason {
    /// 1002: the client broke the framing rules.
    #[error("protocol error (1002)")]
    Protocol,
    /// 1007: a text message or close reason is not UTF-8.
    #[error("invalid UTF-8 (1007)")]
    InvalidPayload,
    /// 1009: a frame or message exceeds [`CodecLimits`].
    #[error("message too big (1009)")]
    TooBig,
    /// 1000
    #[error("normal closure (1000)")]
    Normal,
    /// 1001: the server is shutting down.
    #[error("going away (1001)")]
    GoingAway,
    /// 4008: the client reads too slowly and its outbound queue overflowed.
    #[error("slow consumer (4008)")]
    SlowConsumer,
    /// Any other code, with its reason; the reason is cut to the 123 bytes a close frame holds.
    #[error("{1} ({0})")]
    Policy(u16, &'static str),
}

impl CloseReason {
    pub fn code(&self) -> u16 {
        match self {
            CloseReason::Protocol => 1002,
            CloseReason::InvalidPayload => 1007,
            CloseReason::TooBig => 1009,
            CloseReason::Normal => 1000,
            CloseReason::GoingAway => 1001,
            CloseReason::SlowConsumer => 4008,
            CloseReason::Policy(code, _) => *code,
        }
    }

    /// The reason text sent in the close frame.
    pub fn reason(&self) -> &'static str {
        match self {
            CloseReason::Protocol => "protocol error",
            CloseReason::InvalidPayload => "invalid utf-8",
            CloseReason::TooBig => "message too big",
            CloseReason::Normal => "",
            CloseReason::GoingAway => "going away",
            CloseReason::SlowConsumer => "slow consumer",
            CloseReason::Policy(_, reason) => reason,
        }
    }
}

/// Control frames carry at most 125 payload bytes (RFC 6455 §5.5).
const MAX_CONTROL_PAYLOAD: usize = 125;
/// A close payload is a 2-byte code followed by the reason.
const MAX_CLOSE_REASON: usize = MAX_CONTROL_PAYLOAD - 2;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum MessageKind {
    Text,
    Binary,
}

/// A header that passed every check that needs no payload.
#[derive(Debug, Clone, Copy)]
struct CheckedHeader {
    header_len: usize,
    payload_len: usize,
    mask: [u8; 4],
    opcode: OpCode,
    is_final: bool,
}

/// Decodes one connection's client frames. Long-lived (one per WebSocket connection), so it
/// holds no buffer while no fragmented message is open.
#[derive(Debug)]
pub struct Decoder {
    limits: CodecLimits,
    /// The kind of the fragmented message being reassembled, if one is open; continuation
    /// frames are only legal while it is `Some`, new data frames only while it is `None`.
    open: Option<MessageKind>,
    /// Unmasked payload of the open message's fragments so far. Taken (not cleared) when the
    /// message completes, so an idle connection keeps no capacity from an old large message.
    fragments: Vec<u8>,
    /// The first error, returned again by every later call: after a framing error the input
    /// position is meaningless, and the caller must close rather than keep decoding.
    failed: Option<CloseReason>,
}

impl Decoder {
    pub fn new(limits: CodecLimits) -> Self {
        Decoder {
            limits,
            open: None,
            fragments: Vec::new(),
            failed: None,
        }
    }

    /// Consumes complete frames from the front of `buf` until it has one complete message or
    /// control frame to return; `Ok(None)` means more bytes are needed (a partial frame is left
    /// in `buf` untouched, so the caller appends to it and calls again). Control frames
    /// interleaved between a message's fragments are returned as they arrive.
    ///
    /// Every violation detectable from a header (masking, reserved bits and opcodes, control
    /// frame rules, fragment sequencing, size limits) is reported as soon as the header is in
    /// `buf`, before its payload is waited for. The error is the close the server should send.
    pub fn decode(&mut self, buf: &mut BytesMut) -> Result<Option<Incoming>, CloseReason> {
        if let Some(reason) = self.failed {
            return Err(reason);
        }
        let decoded = self.decode_frames(buf);
        if let Err(reason) = decoded {
            self.failed = Some(reason);
        }
        decoded
    }

    fn decode_frames(&mut self, buf: &mut BytesMut) -> Result<Option<Incoming>, CloseReason> {
        loop {
            // A header whose payload is still incomplete is parsed again on the next call
            // rather than remembered: it is at most 14 bytes, and keeping no partial-frame
            // state means nothing can get out of step with `buf`.
            let Some(frame) = self.check_header(buf)? else {
                return Ok(None);
            };
            if buf.len() - frame.header_len < frame.payload_len {
                // Deliberately no `reserve(payload_len)` here: that would let a client make
                // the server allocate up to the frame limit by sending a 10-byte header.
                return Ok(None);
            }
            buf.advance(frame.header_len);
            let len = frame.payload_len;
            unmask(&mut buf[..len], frame.mask);

            match frame.opcode {
                OpCode::Control(Control::Ping) => {
                    return Ok(Some(Incoming::Ping(buf.split_to(len).freeze())))
                }
                OpCode::Control(Control::Pong) => {
                    return Ok(Some(Incoming::Pong(buf.split_to(len).freeze())))
                }
                OpCode::Control(Control::Close) => {
                    let close = parse_close(&buf[..len]);
                    buf.advance(len);
                    return close.map(Some);
                }
                OpCode::Data(Data::Text) if frame.is_final => {
                    let text = std::str::from_utf8(&buf[..len])
                        .map_err(|_| CloseReason::InvalidPayload)?
                        .to_owned();
                    buf.advance(len);
                    return Ok(Some(Incoming::Text(text)));
                }
                OpCode::Data(Data::Binary) if frame.is_final => {
                    return Ok(Some(Incoming::Binary(buf.split_to(len).freeze())))
                }
                OpCode::Data(Data::Text) | OpCode::Data(Data::Binary) => {
                    self.open = Some(if frame.opcode == OpCode::Data(Data::Text) {
                        MessageKind::Text
                    } else {
                        MessageKind::Binary
                    });
                    self.fragments.extend_from_slice(&buf[..len]);
                    buf.advance(len);
                }
                OpCode::Data(Data::Continue) => {
                    self.fragments.extend_from_slice(&buf[..len]);
                    buf.advance(len);
                    if frame.is_final {
                        return self.complete_fragmented().map(Some);
                    }
                }
                // `check_header` rejected these; answering with a protocol error keeps the
                // decoder total without a panic path.
                OpCode::Control(Control::Reserved(_)) | OpCode::Data(Data::Reserved(_)) => {
                    return Err(CloseReason::Protocol)
                }
            }
        }
    }

    /// Parses the header at the front of `buf` (without consuming it) and applies every rule
    /// that needs only the header. `Ok(None)`: the header itself is incomplete.
    fn check_header(&self, buf: &[u8]) -> Result<Option<CheckedHeader>, CloseReason> {
        let mut cursor = Cursor::new(buf);
        // The only error `parse` can return from an in-memory cursor is a reserved opcode.
        let Some((header, declared_len)) =
            FrameHeader::parse(&mut cursor).map_err(|_| CloseReason::Protocol)?
        else {
            return Ok(None);
        };
        // Cannot truncate: the cursor position is within `buf`.
        let header_len = cursor.position() as usize;

        // No extension is ever negotiated, so any reserved bit is a violation (§5.2).
        if header.rsv1 || header.rsv2 || header.rsv3 {
            return Err(CloseReason::Protocol);
        }
        // "The server MUST close the connection upon receiving a frame that is not masked."
        let Some(mask) = header.mask else {
            return Err(CloseReason::Protocol);
        };
        match header.opcode {
            OpCode::Control(_) => {
                if !header.is_final || declared_len > MAX_CONTROL_PAYLOAD as u64 {
                    return Err(CloseReason::Protocol);
                }
            }
            OpCode::Data(Data::Continue) => {
                if self.open.is_none() {
                    return Err(CloseReason::Protocol);
                }
            }
            OpCode::Data(_) => {
                if self.open.is_some() {
                    return Err(CloseReason::Protocol);
                }
            }
        }
        // Compared in u64 so a declared length beyond usize cannot wrap past the check.
        if declared_len > self.limits.max_frame_bytes as u64 {
            return Err(CloseReason::TooBig);
        }
        let payload_len = declared_len as usize; // ≤ max_frame_bytes, a usize.
        if matches!(header.opcode, OpCode::Data(_))
            && self.fragments.len().saturating_add(payload_len) > self.limits.max_message_bytes
        {
            return Err(CloseReason::TooBig);
        }
        Ok(Some(CheckedHeader {
            header_len,
            payload_len,
            mask,
            opcode: header.opcode,
            is_final: header.is_final,
        }))
    }

    fn complete_fragmented(&mut self) -> Result<Incoming, CloseReason> {
        let payload = std::mem::take(&mut self.fragments);
        match self.open.take() {
            Some(MessageKind::Text) => String::from_utf8(payload)
                .map(Incoming::Text)
                .map_err(|_| CloseReason::InvalidPayload),
            Some(MessageKind::Binary) => Ok(Incoming::Binary(Bytes::from(payload))),
            // `check_header` only lets a continuation through while a message is open.
            None => Err(CloseReason::Protocol),
        }
    }
}

/// A close payload is empty, or a valid 2-byte code plus a UTF-8 reason (§5.5.1, §7.4).
fn parse_close(payload: &[u8]) -> Result<Incoming, CloseReason> {
    match payload {
        [] => Ok(Incoming::Close(None)),
        [_] => Err(CloseReason::Protocol),
        [hi, lo, reason @ ..] => {
            let code = u16::from_be_bytes([*hi, *lo]);
            // Rejects 0–999, 1004–1006, 1014–2999 and 5000+ (unassigned, reserved, or
            // never-on-the-wire codes such as 1005/1006/1015).
            if !CloseCode::from(code).is_allowed() {
                return Err(CloseReason::Protocol);
            }
            let reason = std::str::from_utf8(reason).map_err(|_| CloseReason::InvalidPayload)?;
            Ok(Incoming::Close(Some((code, reason.to_owned()))))
        }
    }
}

/// XORs the client's masking key over the payload (§5.3). Word-sized chunks let the compiler
/// vectorise the loop without `unsafe` alignment tricks.
fn unmask(payload: &mut [u8], mask: [u8; 4]) {
    let mut chunks = payload.chunks_exact_mut(4);
    for chunk in &mut chunks {
        for (byte, key) in chunk.iter_mut().zip(mask) {
            *byte ^= key;
        }
    }
    for (byte, key) in chunks.into_remainder().iter_mut().zip(mask) {
        *byte ^= key;
    }
}

/// Appends an unmasked, final frame header for `payload_len` bytes and reserves room for the
/// payload, so the frame is built with at most one reallocation of `out`.
fn put_header(out: &mut BytesMut, opcode: OpCode, payload_len: usize) {
    let header = FrameHeader {
        is_final: true,
        rsv1: false,
        rsv2: false,
        rsv3: false,
        opcode,
        mask: None,
    };
    out.reserve(header.len(payload_len as u64) + payload_len);
    // Writing into a growable `BytesMut` cannot fail; asserting in debug documents that
    // rather than silently ignoring it.
    let written = header.format(payload_len as u64, &mut (&mut *out).writer());
    debug_assert!(
        written.is_ok(),
        "formatting a header into a BytesMut cannot fail"
    );
}

/// Appends one unmasked, final text frame. `text` must be valid UTF-8 (our own JSON); it is
/// not checked here because every caller produces it with serde_json.
pub fn encode_text(out: &mut BytesMut, text: &[u8]) {
    put_header(out, OpCode::Data(Data::Text), text.len());
    out.extend_from_slice(text);
}

/// One complete encoded text frame, to be written as-is to every subscriber's socket: server
/// frames are unmasked, so the same bytes are valid on every connection.
pub fn text_frame(text: &[u8]) -> Bytes {
    text_frame_from_parts(&[text])
}

/// Like [`text_frame`] for a text given as consecutive parts (e.g. `MESSAGE_PREFIX` and the
/// stored message JSON), so the relay need not first join them into a temporary buffer.
pub fn text_frame_from_parts(parts: &[&[u8]]) -> Bytes {
    let len = parts.iter().map(|p| p.len()).sum();
    let mut out = BytesMut::new();
    put_header(&mut out, OpCode::Data(Data::Text), len);
    for part in parts {
        out.extend_from_slice(part);
    }
    out.freeze()
}

/// Appends a ping; a payload over the 125-byte control limit is cut to 125 bytes.
pub fn encode_ping(out: &mut BytesMut, payload: &[u8]) {
    encode_control(out, Control::Ping, payload);
}

/// Appends a pong; a payload over the 125-byte control limit is cut to 125 bytes (a ping
/// the [`Decoder`] accepted never has one).
pub fn encode_pong(out: &mut BytesMut, payload: &[u8]) {
    encode_control(out, Control::Pong, payload);
}

fn encode_control(out: &mut BytesMut, control: Control, payload: &[u8]) {
    let payload = &payload[..payload.len().min(MAX_CONTROL_PAYLOAD)];
    put_header(out, OpCode::Control(control), payload.len());
    out.extend_from_slice(payload);
}

/// Appends the server's close frame: the reason's code and text (text cut at a character
/// boundary to fit the 123 bytes a close frame allows).
pub fn encode_close(out: &mut BytesMut, reason: &CloseReason) {
    let text = truncate_to_char_boundary(reason.reason(), MAX_CLOSE_REASON);
    put_header(out, OpCode::Control(Control::Close), 2 + text.len());
    out.put_u16(reason.code());
    out.extend_from_slice(text.as_bytes());
}

/// Appends the answer to a client's close: its code echoed with no reason (§5.5.1), or an
/// empty close if it sent none. A code that may not appear on the wire (1005, 1006, 1015, or
/// anything the decoder would reject) is answered with an empty close instead.
pub fn encode_close_echo(out: &mut BytesMut, code: Option<u16>) {
    match code.filter(|&c| CloseCode::from(c).is_allowed()) {
        Some(code) => {
            put_header(out, OpCode::Control(Control::Close), 2);
            out.put_u16(code);
        }
        None => put_header(out, OpCode::Control(Control::Close), 0),
    }
}

fn truncate_to_char_boundary(text: &str, max: usize) -> &str {
    let mut end = text.len().min(max);
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    &text[..end]
}

#[cfg(test)]
mod tests {
    use super::*;
    use tungstenite::protocol::frame::Frame;

    const MASK: [u8; 4] = [0x37, 0xfa, 0x21, 0x3d];

    /// A client frame, masked by tungstenite's own masking code (so the test does not share
    /// the implementation under test).
    fn client_frame(opcode: u8, fin: bool, payload: &[u8]) -> Vec<u8> {
        let header = FrameHeader {
            is_final: fin,
            rsv1: false,
            rsv2: false,
            rsv3: false,
            opcode: OpCode::from(opcode),
            mask: Some(MASK),
        };
        let mut out = Vec::new();
        Frame::from_payload(header, Bytes::copy_from_slice(payload))
            .format(&mut out)
            .expect("writing to a Vec");
        out
    }

    fn unmasked_frame(opcode: u8, payload: &[u8]) -> Vec<u8> {
        let header = FrameHeader {
            opcode: OpCode::from(opcode),
            ..FrameHeader::default()
        };
        let mut out = Vec::new();
        Frame::from_payload(header, Bytes::copy_from_slice(payload))
            .format(&mut out)
            .expect("writing to a Vec");
        out
    }

    const TEXT: u8 = 0x1;
    const BINARY: u8 = 0x2;
    const CONTINUE: u8 = 0x0;
    const CLOSE: u8 = 0x8;
    const PING: u8 = 0x9;
    const PONG: u8 = 0xA;

    fn small_limits() -> CodecLimits {
        CodecLimits {
            max_frame_bytes: 1000,
            max_message_bytes: 1500,
        }
    }

    /// Decodes everything in `input`, expecting no error and no leftover bytes.
    fn decode_all(limits: CodecLimits, input: &[u8]) -> Vec<Incoming> {
        let mut decoder = Decoder::new(limits);
        let mut buf = BytesMut::from(input);
        let mut out = Vec::new();
        while let Some(msg) = decoder.decode(&mut buf).expect("valid input") {
            out.push(msg);
        }
        assert!(buf.is_empty(), "left over: {buf:?}");
        out
    }

    fn decode_err(limits: CodecLimits, input: &[u8]) -> CloseReason {
        let mut decoder = Decoder::new(limits);
        let mut buf = BytesMut::from(input);
        loop {
            match decoder.decode(&mut buf) {
                Ok(Some(_)) => continue,
                Ok(None) => panic!("no error for {input:?}"),
                Err(reason) => return reason,
            }
        }
    }

    fn encoded(f: impl FnOnce(&mut BytesMut)) -> Vec<u8> {
        let mut out = BytesMut::new();
        f(&mut out);
        out.to_vec()
    }

    // ---- server frames ----

    #[test]
    fn small_text_frame_exact_bytes() {
        assert_eq!(encoded(|o| encode_text(o, b"hi")), b"\x81\x02hi");
        assert_eq!(encoded(|o| encode_text(o, b"")), b"\x81\x00");
        let text = [b'a'; 125];
        let bytes = encoded(|o| encode_text(o, &text));
        assert_eq!(&bytes[..2], &[0x81, 125]);
        assert_eq!(&bytes[2..], &text[..]);
    }

    #[test]
    fn text_frame_with_16_bit_length_exact_bytes() {
        for len in [126usize, 65535] {
            let text = vec![b'x'; len];
            let bytes = encoded(|o| encode_text(o, &text));
            let len16 = (len as u16).to_be_bytes();
            assert_eq!(&bytes[..4], &[0x81, 126, len16[0], len16[1]]);
            assert_eq!(&bytes[4..], &text[..]);
        }
    }

    #[test]
    fn text_frame_with_64_bit_length_exact_bytes() {
        let text = vec![b'y'; 65536];
        let bytes = text_frame(&text);
        assert_eq!(&bytes[..10], &[0x81, 127, 0, 0, 0, 0, 0, 1, 0, 0]);
        assert_eq!(&bytes[10..], &text[..]);
    }

    #[test]
    fn shared_text_frame_equals_the_appended_one_and_parts_join() {
        assert_eq!(
            text_frame(b"{\"a\":1}").as_ref(),
            encoded(|o| encode_text(o, b"{\"a\":1}"))
        );
        let whole = vec![b'z'; 300];
        assert_eq!(
            text_frame_from_parts(&[&whole[..100], &whole[100..], b""]),
            text_frame(&whole)
        );
    }

    #[test]
    fn control_frames_exact_bytes() {
        assert_eq!(encoded(|o| encode_ping(o, b"abc")), b"\x89\x03abc");
        assert_eq!(encoded(|o| encode_pong(o, b"")), b"\x8a\x00");
        let long = [7u8; 200];
        let pong = encoded(|o| encode_pong(o, &long));
        assert_eq!(&pong[..2], &[0x8a, 125]);
        assert_eq!(pong.len(), 127);
    }

    #[test]
    fn close_frames_exact_bytes() {
        assert_eq!(
            encoded(|o| encode_close(o, &CloseReason::SlowConsumer)),
            b"\x88\x0f\x0f\xa8slow consumer"
        );
        assert_eq!(
            encoded(|o| encode_close(o, &CloseReason::Normal)),
            b"\x88\x02\x03\xe8"
        );
        assert_eq!(
            encoded(|o| encode_close(o, &CloseReason::TooBig)),
            b"\x88\x11\x03\xf1message too big"
        );
        assert_eq!(encoded(|o| encode_close_echo(o, None)), b"\x88\x00");
        assert_eq!(
            encoded(|o| encode_close_echo(o, Some(1000))),
            b"\x88\x02\x03\xe8"
        );
        assert_eq!(
            encoded(|o| encode_close_echo(o, Some(4321))),
            b"\x88\x02\x10\xe1"
        );
        for never_on_wire in [1005, 1006, 1015, 999, 5000] {
            assert_eq!(
                encoded(|o| encode_close_echo(o, Some(never_on_wire))),
                b"\x88\x00"
            );
        }
    }

    #[test]
    fn close_reason_is_cut_at_a_char_boundary_to_fit_a_control_frame() {
        // 61 two-byte characters = 122 bytes fit; the 62nd would make 124 > 123.
        let long: &'static str = "é".repeat(80).leak();
        let bytes = encoded(|o| encode_close(o, &CloseReason::Policy(4000, long)));
        assert_eq!(bytes[1] as usize, 2 + 122);
        assert_eq!(&bytes[2..4], &[0x0f, 0xa0]);
        assert!(std::str::from_utf8(&bytes[4..]).is_ok());
    }

    #[test]
    fn close_reason_codes() {
        let cases = [
            (CloseReason::Protocol, 1002),
            (CloseReason::InvalidPayload, 1007),
            (CloseReason::TooBig, 1009),
            (CloseReason::Normal, 1000),
            (CloseReason::GoingAway, 1001),
            (CloseReason::SlowConsumer, 4008),
            (CloseReason::Policy(4001, "auth"), 4001),
        ];
        for (reason, code) in cases {
            assert_eq!(reason.code(), code);
        }
        assert_eq!(CloseReason::SlowConsumer.reason(), "slow consumer");
    }

    // ---- decoding ----

    #[test]
    fn rfc_masked_hello_decodes() {
        // RFC 6455 §5.7: a single-frame masked text message containing "Hello".
        let frame = [
            0x81, 0x85, 0x37, 0xfa, 0x21, 0x3d, 0x7f, 0x9f, 0x4d, 0x51, 0x58,
        ];
        assert_eq!(client_frame(TEXT, true, b"Hello"), frame);
        assert_eq!(
            decode_all(CodecLimits::default(), &frame),
            [Incoming::Text("Hello".into())]
        );
    }

    #[test]
    fn masked_frames_of_every_length_format_decode() {
        for len in [0usize, 1, 3, 4, 5, 125, 126, 127, 65535, 65536, 70001] {
            let payload: Vec<u8> = (0..len).map(|i| (i % 251) as u8).collect();
            let text: String = (0..len)
                .map(|i| char::from(b'a' + (i % 26) as u8))
                .collect();
            let mut input = client_frame(BINARY, true, &payload);
            input.extend(client_frame(TEXT, true, text.as_bytes()));
            assert_eq!(
                decode_all(CodecLimits::default(), &input),
                [Incoming::Binary(payload.into()), Incoming::Text(text)],
                "len {len}"
            );
        }
    }

    #[test]
    fn control_frames_decode() {
        let mut input = client_frame(PING, true, b"p1");
        input.extend(client_frame(PONG, true, b""));
        input.extend(client_frame(CLOSE, true, b"\x03\xe8bye"));
        input.extend(client_frame(CLOSE, true, b""));
        input.extend(client_frame(PING, true, &[9; 125]));
        assert_eq!(
            decode_all(CodecLimits::default(), &input),
            [
                Incoming::Ping(Bytes::from_static(b"p1")),
                Incoming::Pong(Bytes::new()),
                Incoming::Close(Some((1000, "bye".into()))),
                Incoming::Close(None),
                Incoming::Ping(Bytes::from(vec![9; 125])),
            ]
        );
    }

    #[test]
    fn allowed_close_codes_decode() {
        for code in [
            1000u16, 1001, 1003, 1007, 1011, 1012, 1013, 3000, 4008, 4999,
        ] {
            let input = client_frame(CLOSE, true, &code.to_be_bytes());
            assert_eq!(
                decode_all(CodecLimits::default(), &input),
                [Incoming::Close(Some((code, String::new())))]
            );
        }
    }

    /// "Hel", ping, "lo w", "ö" split across two fragments, "rld": text reassembled across an
    /// interleaved ping, with a multi-byte character split between fragments.
    fn fragmented_text_with_ping() -> (Vec<u8>, Vec<Incoming>) {
        let o_umlaut = "ö".as_bytes();
        let mut input = client_frame(TEXT, false, b"Hel");
        input.extend(client_frame(PING, true, b"mid"));
        input.extend(client_frame(CONTINUE, false, b"lo w"));
        input.extend(client_frame(CONTINUE, false, &o_umlaut[..1]));
        input.extend(client_frame(CONTINUE, false, &o_umlaut[1..]));
        input.extend(client_frame(CONTINUE, false, b""));
        input.extend(client_frame(CONTINUE, true, b"rld"));
        input.extend(client_frame(BINARY, false, b"\x00\xff"));
        input.extend(client_frame(CONTINUE, true, b"\x01"));
        input.extend(client_frame(TEXT, true, b"after"));
        let expected = vec![
            Incoming::Ping(Bytes::from_static(b"mid")),
            Incoming::Text("Hello w\u{f6}rld".into()),
            Incoming::Binary(Bytes::from_static(b"\x00\xff\x01")),
            Incoming::Text("after".into()),
        ];
        (input, expected)
    }

    #[test]
    fn fragmented_messages_reassemble_around_interleaved_control_frames() {
        let (input, expected) = fragmented_text_with_ping();
        assert_eq!(decode_all(CodecLimits::default(), &input), expected);
    }

    #[test]
    fn partial_input_at_every_split_point_decodes_the_same() {
        let (mut input, mut expected) = fragmented_text_with_ping();
        let big: Vec<u8> = (0..300u32).map(|i| i as u8).collect();
        input.extend(client_frame(BINARY, true, &big));
        expected.push(Incoming::Binary(big.into()));

        for split in 0..=input.len() {
            let mut decoder = Decoder::new(CodecLimits::default());
            let mut buf = BytesMut::from(&input[..split]);
            let mut got = Vec::new();
            while let Some(msg) = decoder.decode(&mut buf).expect("valid prefix") {
                got.push(msg);
            }
            buf.extend_from_slice(&input[split..]);
            while let Some(msg) = decoder.decode(&mut buf).expect("valid input") {
                got.push(msg);
            }
            assert_eq!(got, expected, "split at {split}");
            assert!(buf.is_empty());
        }

        // And one byte at a time.
        let mut decoder = Decoder::new(CodecLimits::default());
        let mut buf = BytesMut::new();
        let mut got = Vec::new();
        for &byte in &input {
            buf.put_u8(byte);
            while let Some(msg) = decoder.decode(&mut buf).expect("valid input") {
                got.push(msg);
            }
        }
        assert_eq!(got, expected);
    }

    #[test]
    fn incomplete_frame_is_left_untouched() {
        let frame = client_frame(TEXT, true, b"hello");
        let mut decoder = Decoder::new(CodecLimits::default());
        for cut in 0..frame.len() {
            let mut buf = BytesMut::from(&frame[..cut]);
            assert_eq!(decoder.decode(&mut buf), Ok(None));
            assert_eq!(&buf[..], &frame[..cut], "cut at {cut}");
        }
    }

    #[test]
    fn framing_violations_close_with_protocol_error() {
        let mut rsv1 = client_frame(TEXT, true, b"x");
        rsv1[0] |= 0x40;
        let mut rsv2 = client_frame(TEXT, true, b"x");
        rsv2[0] |= 0x20;
        let mut rsv3 = client_frame(PING, true, b"x");
        rsv3[0] |= 0x10;
        let mut text_then_text = client_frame(TEXT, false, b"a");
        text_then_text.extend(client_frame(TEXT, true, b"b"));
        let mut binary_then_text = client_frame(BINARY, false, b"a");
        binary_then_text.extend(client_frame(TEXT, false, b"b"));
        let mut finished_then_continue = client_frame(TEXT, true, b"a");
        finished_then_continue.extend(client_frame(CONTINUE, true, b"b"));

        let mut cases: Vec<(&str, Vec<u8>)> = vec![
            ("unmasked text", unmasked_frame(TEXT, b"hi")),
            ("unmasked close", unmasked_frame(CLOSE, b"")),
            ("rsv1", rsv1),
            ("rsv2", rsv2),
            ("rsv3", rsv3),
            ("fragmented ping", client_frame(PING, false, b"x")),
            ("fragmented close", client_frame(CLOSE, false, b"")),
            ("ping of 126 bytes", client_frame(PING, true, &[0; 126])),
            (
                "close of 126 bytes",
                client_frame(CLOSE, true, &[0x03; 126]),
            ),
            ("continue without start", client_frame(CONTINUE, true, b"x")),
            ("text while a text is open", text_then_text),
            ("text while a binary is open", binary_then_text),
            ("continue after a final frame", finished_then_continue),
            (
                "close with 1-byte payload",
                client_frame(CLOSE, true, b"\x03"),
            ),
        ];
        for opcode in [3u8, 4, 5, 6, 7, 0xB, 0xC, 0xD, 0xE, 0xF] {
            let mut frame = client_frame(TEXT, true, b"x");
            frame[0] = 0x80 | opcode;
            cases.push(("reserved opcode", frame));
        }
        for code in [
            0u16, 999, 1004, 1005, 1006, 1014, 1015, 1016, 2999, 5000, 65535,
        ] {
            let frame = client_frame(CLOSE, true, &code.to_be_bytes());
            cases.push(("close code not allowed on the wire", frame));
        }
        for (name, input) in cases {
            assert_eq!(
                decode_err(CodecLimits::default(), &input),
                CloseReason::Protocol,
                "{name}: {input:x?}"
            );
        }
    }

    #[test]
    fn bad_utf8_closes_with_invalid_payload() {
        let mut split_bad = client_frame(TEXT, false, b"ok \xc3");
        split_bad.extend(client_frame(CONTINUE, true, b"("));
        let cases: Vec<(&str, Vec<u8>)> = vec![
            ("single frame", client_frame(TEXT, true, b"\xff\xfe")),
            (
                "truncated sequence",
                client_frame(TEXT, true, b"abc\xe2\x82"),
            ),
            ("across fragments", split_bad),
            (
                "close reason",
                client_frame(CLOSE, true, b"\x03\xe8\xc0\x80"),
            ),
        ];
        for (name, input) in cases {
            assert_eq!(
                decode_err(CodecLimits::default(), &input),
                CloseReason::InvalidPayload,
                "{name}"
            );
        }
    }

    #[test]
    fn binary_may_carry_any_bytes() {
        let input = client_frame(BINARY, true, b"\xff\xfe");
        assert_eq!(
            decode_all(CodecLimits::default(), &input),
            [Incoming::Binary(Bytes::from_static(b"\xff\xfe"))]
        );
    }

    #[test]
    fn limits_are_inclusive() {
        let mut input = client_frame(TEXT, false, &[b'a'; 1000]);
        input.extend(client_frame(CONTINUE, true, &[b'b'; 500]));
        let got = decode_all(small_limits(), &input);
        assert!(matches!(&got[..], [Incoming::Text(t)] if t.len() == 1500));
    }

    #[test]
    fn over_limit_frame_is_rejected_from_its_header_alone() {
        // Only the header (2 + 8 length + 4 mask bytes) of a frame declaring 1001 and 2^40
        // bytes: no payload has arrived yet.
        for declared in [1001u64, 1 << 40, u64::MAX >> 1] {
            let header = FrameHeader {
                opcode: OpCode::Data(Data::Binary),
                mask: Some(MASK),
                ..FrameHeader::default()
            };
            let mut input = Vec::new();
            header
                .format(declared, &mut input)
                .expect("writing to a Vec");
            assert_eq!(
                decode_err(small_limits(), &input),
                CloseReason::TooBig,
                "{declared}"
            );
        }
    }

    #[test]
    fn over_limit_message_is_rejected_at_the_header_of_the_fragment_that_overflows() {
        let mut input = client_frame(TEXT, false, &[b'a'; 1000]);
        let mut header_only = client_frame(CONTINUE, true, &[b'b'; 501]);
        header_only.truncate(8); // 2 + 2 length + 4 mask: header only, no payload
        input.extend(header_only);
        assert_eq!(decode_err(small_limits(), &input), CloseReason::TooBig);
    }

    #[test]
    fn errors_are_sticky() {
        let mut decoder = Decoder::new(CodecLimits::default());
        let mut buf = BytesMut::from(&unmasked_frame(TEXT, b"x")[..]);
        assert_eq!(decoder.decode(&mut buf), Err(CloseReason::Protocol));
        let mut good = BytesMut::from(&client_frame(TEXT, true, b"x")[..]);
        assert_eq!(decoder.decode(&mut good), Err(CloseReason::Protocol));
    }

    #[test]
    fn completed_fragmented_message_releases_its_buffer() {
        let mut decoder = Decoder::new(CodecLimits::default());
        let mut input = client_frame(TEXT, false, &[b'a'; 500]);
        input.extend(client_frame(CONTINUE, true, b"b"));
        let mut buf = BytesMut::from(&input[..]);
        assert!(matches!(
            decoder.decode(&mut buf),
            Ok(Some(Incoming::Text(_)))
        ));
        assert_eq!(decoder.fragments.capacity(), 0);
        assert_eq!(decoder.open, None);
    }

    #[test]
    fn unmask_matches_tungstenite_for_every_alignment() {
        let payload: Vec<u8> = (0..67u8).collect();
        for start in 0..5 {
            let framed = client_frame(BINARY, true, &payload[start..]);
            let masked = &framed[framed.len() - (payload.len() - start)..];
            let mut unmasked = masked.to_vec();
            unmask(&mut unmasked, MASK);
            assert_eq!(unmasked, &payload[start..]);
        }
    }
}
