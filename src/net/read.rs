//! Reading a client socket into a connection's input buffer through one per-shard scratch
//! buffer.
//!
//! Why not read straight into the input buffer: safe Rust can only hand `read` initialised
//! memory, so each read had to zero the spare room it offered first (16 KiB of `memset` per
//! request — half of all instructions on the publish path), and every connection waiting for
//! its next request kept that room allocated (the bulk of an idle WebSocket's memory).
//!
//! Instead every read goes into one scratch buffer per shard (thread), zeroed once, and only
//! the bytes received are copied into the connection's input. The scratch buffer is borrowed
//! only inside one synchronous `poll_read` call — glommio's sockets try the `recv` right
//! there and otherwise only register interest — so it is never held across an `.await` and
//! any number of connections of the shard can wait for data at once. A connection with
//! nothing buffered holds no read buffer at all.

use std::cell::RefCell;
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::task::Poll;

use bytes::BytesMut;
use futures::AsyncRead;

/// Bytes offered to each `recv`: a typical pipelined burst of small publishes fits in one
/// syscall. It costs one buffer per shard, not per connection.
pub const SCRATCH_BYTES: usize = 64 << 10;

thread_local! {
    /// The shard's scratch buffer. Shards are threads, so thread-local is per shard.
    static SCRATCH: RefCell<Box<[u8]>> = RefCell::new(vec![0; SCRATCH_BYTES].into_boxed_slice());
}

/// Reads what the socket has (at least one byte, or 0 at end of stream) and appends it to
/// `input`. Cancel-safe: bytes reach `input` only in the poll that completes the read, so
/// dropping the future leaves `input` as it was.
pub fn read_into<'a, R: AsyncRead + Unpin + ?Sized>(
    reader: &'a mut R,
    input: &'a mut BytesMut,
) -> impl Future<Output = io::Result<usize>> + 'a {
    futures::future::poll_fn(move |cx| {
        SCRATCH.with(|scratch| {
            // Never contended: the borrow lasts for this synchronous call only, and the
            // socket's poll_read does not call back into the relay.
            let mut scratch = scratch.borrow_mut();
            match Pin::new(&mut *reader).poll_read(cx, &mut scratch[..]) {
                Poll::Ready(Ok(n)) => {
                    input.extend_from_slice(&scratch[..n]);
                    Poll::Ready(Ok(n))
                }
                other => other,
            }
        })
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn appends_what_was_read_and_reports_end_of_stream() {
        let mut source: &[u8] = b"hello";
        let mut input = BytesMut::from(&b"ab"[..]);
        let n = futures::executor::block_on(read_into(&mut source, &mut input)).expect("read");
        assert_eq!(n, 5);
        assert_eq!(&input[..], b"abhello");
        let n = futures::executor::block_on(read_into(&mut source, &mut input)).expect("read");
        assert_eq!(n, 0);
        assert_eq!(&input[..], b"abhello");
    }
}
