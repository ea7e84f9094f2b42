//! RESP2 encoding of commands and decoding of replies, sans-IO.
//!
//! Owns: the byte format of one command (`*N` array of `$len` bulk strings), the [`Reply`]
//! value callers receive, and the decision "complete frame, incomplete, or garbage" for a
//! buffer of received bytes. Parsing is delegated to `redis-protocol` (its range decoder);
//! this file only copies the parsed ranges out into owned values.
//!
//! Does not own: sockets, buffering policy (when to read, how much), timeouts, or which
//! replies belong to which caller; see `connection.rs` and `client.rs`.
//!
//! Why copy instead of the crate's zero-copy `decode_bytes_mut`: a `Bytes` sliced out of the
//! read buffer keeps that whole allocation (64 KiB or more) alive for as long as a caller holds
//! one reply, and stops the connection from reusing its buffer in place. Replies the relay
//! keeps are small (stream ids, counts) or are copied into its own structures anyway, so one
//! `memcpy` per bulk string is cheaper than pinning read buffers.
//!
//! RESP2 only: the relay never sends `HELLO 3`, so RESP3 types (`%` maps, `_` null, ...) are
//! reported as a protocol error.

use bytes::{Buf, BufMut, Bytes, BytesMut};
use redis_protocol::resp2::decode::decode_range;
use redis_protocol::resp2::types::RangeFrame;

/// A reply frame that does not follow RESP2, or a command that cannot be sent.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProtocolError {
    /// The bytes received are not valid RESP2 (`redis-protocol`'s description).
    #[error("malformed RESP2 reply: {0}")]
    Malformed(String),
    /// Valkey silently ignores `*0\r\n`, so an empty command would never get a reply and every
    /// later reply on that connection would be attributed to the wrong caller.
    #[error("empty command: Valkey sends no reply to a command without arguments")]
    EmptyCommand,
    /// A pre-encoded command is not exactly one RESP array of bulk strings.
    #[error("not exactly one encoded command: {0}")]
    NotOneCommand(&'static str),
    /// Valkey sent bytes nobody asked for; replies can no longer be matched to commands.
    #[error("{0} unexpected bytes from Valkey: the pipeline is out of step")]
    UnexpectedData(usize),
}

/// One RESP2 reply, owning its bytes (see the module doc for why nothing borrows the read
/// buffer).
///
/// RESP2's null bulk string (`$-1`) and null array (`*-1`) both decode to [`Reply::Nil`]:
/// `redis-protocol`'s range decoder reports both as one `Null`, and no command the relay
/// sends gives the two different meanings (missing key, timed-out blocking read).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reply {
    /// `+OK`, `+PONG`, ...: a status line.
    Simple(Bytes),
    /// `-ERR ...`: the text after the `-`, lossily decoded as UTF-8.
    Error(String),
    /// `:123`
    Integer(i64),
    /// `$3\r\nabc`
    Bulk(Bytes),
    /// `*2\r\n...`
    Array(Vec<Reply>),
    /// `$-1` or `*-1`.
    Nil,
}

impl Reply {
    /// The payload of a bulk or simple string.
    pub fn as_bytes(&self) -> Option<&[u8]> {
        match self {
            Reply::Simple(b) | Reply::Bulk(b) => Some(b),
            _ => None,
        }
    }

    /// The payload of a bulk or simple string, without copying.
    pub fn into_bytes(self) -> Option<Bytes> {
        match self {
            Reply::Simple(b) | Reply::Bulk(b) => Some(b),
            _ => None,
        }
    }

    /// A bulk or simple string that is valid UTF-8.
    pub fn as_str(&self) -> Option<&str> {
        self.as_bytes().and_then(|b| std::str::from_utf8(b).ok())
    }

    /// An integer reply. Bulk strings holding digits are not converted: Valkey sends
    /// integers as `:` frames wherever the command documents an integer reply.
    pub fn as_int(&self) -> Option<i64> {
        match self {
            Reply::Integer(i) => Some(*i),
            _ => None,
        }
    }

    /// The elements of an array reply.
    pub fn into_array(self) -> Option<Vec<Reply>> {
        match self {
            Reply::Array(items) => Some(items),
            _ => None,
        }
    }

    /// The elements of an array reply, borrowed.
    pub fn as_array(&self) -> Option<&[Reply]> {
        match self {
            Reply::Array(items) => Some(items),
            _ => None,
        }
    }

    /// Whether this is an error reply.
    pub fn is_error(&self) -> bool {
        matches!(self, Reply::Error(_))
    }

    /// The message of an error reply.
    pub fn as_error(&self) -> Option<&str> {
        match self {
            Reply::Error(msg) => Some(msg),
            _ => None,
        }
    }

    /// Whether this is a null bulk string or null array.
    pub fn is_nil(&self) -> bool {
        matches!(self, Reply::Nil)
    }

    /// Whether this is the status `+OK`.
    pub fn is_ok(&self) -> bool {
        matches!(self, Reply::Simple(b) if b.as_ref() == b"OK")
    }
}

/// Appends one command as a RESP array of bulk strings to `out`.
///
/// Reserves the exact size first, so `out` grows at most once and nothing else is allocated.
/// `args` must not be empty (see [`ProtocolError::EmptyCommand`]); this function encodes what
/// it is given and leaves that check to callers that send.
pub fn encode_command(out: &mut BytesMut, args: &[&[u8]]) {
    let mut digits = itoa::Buffer::new();
    let mut size = 1 + digits.format(args.len()).len() + 2;
    for arg in args {
        size += 1 + digits.format(arg.len()).len() + 2 + arg.len() + 2;
    }
    out.reserve(size);
    out.put_u8(b'*');
    out.put_slice(digits.format(args.len()).as_bytes());
    out.put_slice(b"\r\n");
    for arg in args {
        out.put_u8(b'$');
        out.put_slice(digits.format(arg.len()).as_bytes());
        out.put_slice(b"\r\n");
        out.put_slice(arg);
        out.put_slice(b"\r\n");
    }
}

/// Decodes the first reply in `buf` and removes exactly its bytes.
///
/// `Ok(None)` means the frame is not complete yet (never an error); `buf` is left untouched.
/// Each call re-parses an incomplete frame from its start, so callers should call this only
/// after new bytes arrived, and read in large chunks.
pub fn decode_reply(buf: &mut BytesMut) -> Result<Option<Reply>, ProtocolError> {
    match decode_reply_slice(buf)? {
        Some((reply, used)) => {
            buf.advance(used);
            Ok(Some(reply))
        }
        None => Ok(None),
    }
}

/// Decodes the first reply in `buf` without consuming anything: the reply and how many bytes
/// it took. For callers that manage their own read buffer (the connection does).
pub fn decode_reply_slice(buf: &[u8]) -> Result<Option<(Reply, usize)>, ProtocolError> {
    match decode_range(buf) {
        Ok(Some((frame, used))) => Ok(Some((reply_from_range(buf, frame)?, used))),
        Ok(None) => Ok(None),
        Err(e) => Err(ProtocolError::Malformed(e.to_string())),
    }
}

/// Checks that `encoded` is exactly one RESP array of bulk strings with at least one element,
/// i.e. something Valkey answers with exactly one reply.
pub fn validate_command(encoded: &[u8]) -> Result<(), ProtocolError> {
    let (frame, used) = match decode_range(encoded) {
        Ok(Some(parsed)) => parsed,
        Ok(None) => return Err(ProtocolError::NotOneCommand("incomplete frame")),
        Err(_) => return Err(ProtocolError::NotOneCommand("not RESP")),
    };
    if used != encoded.len() {
        return Err(ProtocolError::NotOneCommand(
            "trailing bytes after the first frame",
        ));
    }
    match frame {
        RangeFrame::Array(items) if items.is_empty() => Err(ProtocolError::EmptyCommand),
        RangeFrame::Array(items) => {
            if items
                .iter()
                .all(|item| matches!(item, RangeFrame::BulkString(_)))
            {
                Ok(())
            } else {
                Err(ProtocolError::NotOneCommand(
                    "array elements must be bulk strings",
                ))
            }
        }
        _ => Err(ProtocolError::NotOneCommand("not an array")),
    }
}

/// Copies the parsed ranges out of the read buffer into an owned [`Reply`].
fn reply_from_range(buf: &[u8], frame: RangeFrame) -> Result<Reply, ProtocolError> {
    let slice = |(start, end): (usize, usize)| {
        buf.get(start..end)
            .ok_or_else(|| ProtocolError::Malformed("frame range outside the buffer".to_owned()))
    };
    Ok(match frame {
        RangeFrame::SimpleString(range) => {
            let bytes = slice(range)?;
            // `+OK` is the most common reply by far (SET, SELECT, ...): no allocation for it.
            if bytes == b"OK" {
                Reply::Simple(Bytes::from_static(b"OK"))
            } else {
                Reply::Simple(Bytes::copy_from_slice(bytes))
            }
        }
        RangeFrame::Error(range) => {
            Reply::Error(String::from_utf8_lossy(slice(range)?).into_owned())
        }
        RangeFrame::Integer(i) => Reply::Integer(i),
        RangeFrame::BulkString(range) => Reply::Bulk(Bytes::copy_from_slice(slice(range)?)),
        RangeFrame::Array(items) => Reply::Array(
            items
                .into_iter()
                .map(|item| reply_from_range(buf, item))
                .collect::<Result<_, _>>()?,
        ),
        RangeFrame::Null => Reply::Nil,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn encode(args: &[&[u8]]) -> Vec<u8> {
        let mut out = BytesMut::new();
        encode_command(&mut out, args);
        out.to_vec()
    }

    #[test]
    fn encodes_exact_bytes() {
        assert_eq!(
            encode(&[b"SET", b"key", b"value"]),
            b"*3\r\n$3\r\nSET\r\n$3\r\nkey\r\n$5\r\nvalue\r\n"
        );
        assert_eq!(encode(&[b"PING"]), b"*1\r\n$4\r\nPING\r\n");
        // Empty and binary arguments are length-prefixed, never escaped.
        assert_eq!(
            encode(&[b"GET", b"", b"\r\n\0"]),
            b"*3\r\n$3\r\nGET\r\n$0\r\n\r\n$3\r\n\r\n\0\r\n"
        );
    }

    #[test]
    fn encode_reserves_exactly_once_and_appends() {
        let long = vec![b'x'; 12_345];
        let mut out = BytesMut::new();
        encode_command(&mut out, &[b"PING"]);
        let first_len = out.len();
        encode_command(&mut out, &[b"SET", b"k", &long]);
        let expected_second =
            1 + 1 + 2 + (1 + 1 + 2 + 3 + 2) + (1 + 1 + 2 + 1 + 2) + (1 + 5 + 2 + 12_345 + 2);
        assert_eq!(out.len(), first_len + expected_second);
        assert!(out.ends_with(b"xx\r\n"));
        let ten_args: Vec<&[u8]> = vec![b"a"; 10];
        let encoded = encode(&ten_args);
        assert!(encoded.starts_with(b"*10\r\n$1\r\na\r\n"));
    }

    #[test]
    fn encoded_commands_validate() {
        assert_eq!(validate_command(&encode(&[b"SET", b"k", b"v"])), Ok(()));
        assert_eq!(
            validate_command(&encode(&[])),
            Err(ProtocolError::EmptyCommand)
        );
        let mut two = encode(&[b"PING"]);
        two.extend_from_slice(&encode(&[b"PING"]));
        assert!(matches!(
            validate_command(&two),
            Err(ProtocolError::NotOneCommand(_))
        ));
        assert!(matches!(
            validate_command(b"*1\r\n$4\r\nPI"),
            Err(ProtocolError::NotOneCommand(_))
        ));
        assert!(matches!(
            validate_command(b"+OK\r\n"),
            Err(ProtocolError::NotOneCommand(_))
        ));
        assert!(matches!(
            validate_command(b"*1\r\n:1\r\n"),
            Err(ProtocolError::NotOneCommand(_))
        ));
        assert!(matches!(
            validate_command(b"PING\r\n"),
            Err(ProtocolError::NotOneCommand(_))
        ));
    }

    fn decode_all(bytes: &[u8]) -> Vec<Reply> {
        let mut buf = BytesMut::from(bytes);
        let mut out = Vec::new();
        while let Some(reply) = decode_reply(&mut buf).expect("valid RESP") {
            out.push(reply);
        }
        assert!(buf.is_empty(), "left over: {buf:?}");
        out
    }

    #[test]
    fn decodes_every_frame_type() {
        let replies = decode_all(
            b"+OK\r\n+PONG\r\n-ERR unknown command 'FOO'\r\n:42\r\n:-7\r\n$5\r\nhello\r\n$0\r\n\r\n$-1\r\n*-1\r\n*0\r\n",
        );
        assert_eq!(
            replies,
            vec![
                Reply::Simple(Bytes::from_static(b"OK")),
                Reply::Simple(Bytes::from_static(b"PONG")),
                Reply::Error("ERR unknown command 'FOO'".to_owned()),
                Reply::Integer(42),
                Reply::Integer(-7),
                Reply::Bulk(Bytes::from_static(b"hello")),
                Reply::Bulk(Bytes::new()),
                Reply::Nil,
                Reply::Nil,
                Reply::Array(vec![]),
            ]
        );
        assert!(replies[0].is_ok());
        assert!(!replies[1].is_ok());
        assert!(replies[2].is_error());
        assert_eq!(replies[2].as_error(), Some("ERR unknown command 'FOO'"));
        assert_eq!(replies[3].as_int(), Some(42));
        assert_eq!(replies[5].as_str(), Some("hello"));
        assert_eq!(replies[5].as_int(), None);
        assert!(replies[7].is_nil());
    }

    #[test]
    fn bulk_strings_are_binary_safe() {
        let replies = decode_all(b"$4\r\n\r\n\0\xff\r\n");
        assert_eq!(replies[0].as_bytes(), Some(&b"\r\n\0\xff"[..]));
        assert_eq!(replies[0].as_str(), None);
    }

    #[test]
    fn decodes_nested_arrays_as_xrange_replies() {
        // XRANGE-shaped: [[id, [field, value]], [id, [field, value]]] plus a nil and an error.
        let wire = b"*3\r\n*2\r\n$3\r\n1-0\r\n*2\r\n$1\r\nd\r\n$2\r\n{}\r\n*2\r\n$3\r\n2-0\r\n*-1\r\n-WRONGTYPE x\r\n";
        let replies = decode_all(wire);
        assert_eq!(replies.len(), 1);
        let items = replies[0].clone().into_array().expect("array");
        assert_eq!(items.len(), 3);
        let first = items[0].as_array().expect("entry");
        assert_eq!(first[0].as_str(), Some("1-0"));
        assert_eq!(
            first[1],
            Reply::Array(vec![
                Reply::Bulk(Bytes::from_static(b"d")),
                Reply::Bulk(Bytes::from_static(b"{}"))
            ])
        );
        assert_eq!(items[1].as_array().map(|a| a[1].is_nil()), Some(true));
        assert!(items[2].is_error());
    }

    #[test]
    fn consumes_exactly_one_frame() {
        let mut buf = BytesMut::from(&b":1\r\n:2\r\n$3\r\nab"[..]);
        assert_eq!(decode_reply(&mut buf), Ok(Some(Reply::Integer(1))));
        assert_eq!(&buf[..], b":2\r\n$3\r\nab");
        assert_eq!(decode_reply(&mut buf), Ok(Some(Reply::Integer(2))));
        assert_eq!(decode_reply(&mut buf), Ok(None));
        assert_eq!(
            &buf[..],
            b"$3\r\nab",
            "an incomplete frame is left untouched"
        );
        buf.extend_from_slice(b"c\r\n");
        assert_eq!(
            decode_reply(&mut buf),
            Ok(Some(Reply::Bulk(Bytes::from_static(b"abc"))))
        );
        assert!(buf.is_empty());
        assert_eq!(
            decode_reply(&mut buf),
            Ok(None),
            "empty buffer is incomplete"
        );
    }

    #[test]
    fn every_split_point_is_incomplete_then_complete() {
        let frames: &[&[u8]] = &[
            b"+OK\r\n",
            b"-ERR no such key\r\n",
            b":-1234567890\r\n",
            b"$10\r\n0123456789\r\n",
            b"$0\r\n\r\n",
            b"$-1\r\n",
            b"*-1\r\n",
            b"*0\r\n",
            b"*3\r\n$3\r\n1-0\r\n*2\r\n$1\r\nd\r\n:5\r\n*-1\r\n",
            b"*2\r\n*2\r\n*1\r\n+x\r\n-E\r\n$2\r\n\r\n\r\n",
        ];
        for frame in frames {
            let whole = decode_reply_slice(frame).expect("valid").expect("complete");
            assert_eq!(whole.1, frame.len());
            for split in 0..frame.len() {
                assert_eq!(
                    decode_reply_slice(&frame[..split]),
                    Ok(None),
                    "prefix of {} bytes of {:?} must be incomplete",
                    split,
                    String::from_utf8_lossy(frame)
                );
                // Feeding the rest afterwards yields the same reply, exactly once.
                let mut buf = BytesMut::from(&frame[..split]);
                assert_eq!(decode_reply(&mut buf), Ok(None));
                buf.extend_from_slice(&frame[split..]);
                assert_eq!(decode_reply(&mut buf), Ok(Some(whole.0.clone())));
                assert!(buf.is_empty());
            }
        }
    }

    #[test]
    fn garbage_is_an_error_not_incomplete() {
        for garbage in [
            &b"hello\r\n"[..],
            b"%1\r\n+a\r\n+b\r\n",
            b":abc\r\n",
            b"$x\r\n",
        ] {
            let mut buf = BytesMut::from(garbage);
            assert!(
                matches!(decode_reply(&mut buf), Err(ProtocolError::Malformed(_))),
                "{:?}",
                String::from_utf8_lossy(garbage)
            );
        }
    }

    #[test]
    fn error_text_is_lossy_utf8() {
        let replies = decode_all(b"-ERR bad \xff byte\r\n");
        assert_eq!(replies[0].as_error(), Some("ERR bad \u{fffd} byte"));
    }

    #[test]
    fn roundtrip_command_decodes_as_array_of_bulks() {
        let encoded = encode(&[b"XADD", b"topic:a:stream", b"*", b"d", b"{\"x\":1}"]);
        let replies = decode_all(&encoded);
        let args: Vec<Bytes> = replies[0]
            .clone()
            .into_array()
            .expect("array")
            .into_iter()
            .filter_map(Reply::into_bytes)
            .collect();
        assert_eq!(args.len(), 5);
        assert_eq!(&args[4][..], b"{\"x\":1}");
    }
}
