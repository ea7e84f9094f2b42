//! One client connection: read → decode → handle → write, with keep-alive and timeouts.
//!
//! Requests pipelined on a connection are handled in order and their responses collected in
//! one output buffer, written with a single syscall once no complete request is left in the
//! input (glommio's `poll_flush` is a no-op and every write is a syscall, so batching here is
//! what keeps pipelined throughput up).
//!
//! Timeouts, so a slow or silent client cannot pin a connection forever:
//! - between requests, `http.keepalive_timeout` of silence closes the connection quietly;
//! - once a request's first byte has arrived, its head must be complete within
//!   `http.header_read_timeout` (slowloris), else 408 and close;
//! - while a body arrives, each read must make progress within `http.keepalive_timeout`;
//! - while a response is written, each write must make progress within
//!   `http.keepalive_timeout`, else the connection is dropped (a client that never reads).
//!
//! The shard's sweeper keeps these times (`super::deadline`): a wait that ends at once arms
//! nothing, and a timeout fires at most `deadline::SWEEP_GAP` late, never early.
//!
//! Memory per connection is bounded too: once `OUTPUT_HIGH_WATER` (256 KiB) of responses are
//! waiting, no further pipelined request is handled until they are written, so a client that
//! pipelines requests for large responses and reads slowly holds at most one batch.

use std::net::{IpAddr, Ipv4Addr};
use std::time::{Duration, Instant};

use bytes::BytesMut;
use futures::future::{select, Either};
use futures_lite::AsyncWriteExt;
use glommio::net::TcpStream;

use super::deadline::Deadline;
use crate::http::codec::{Event, Limits, RequestDecoder};
use crate::http::handlers::{self, Outcome};
use crate::http::response::{write_continue, write_http_error, write_json_error};
use crate::shard::Shard;

/// A connection that has been idle keeps no buffer larger than this; 10,000 idle WebSocket or
/// keep-alive connections must not each pin a burst-sized buffer.
const IDLE_BUFFER_CAP: usize = 4 << 10;

/// Responses batched before they are written. Past it the connection writes before handling
/// the next pipelined request: without it, one 16 KiB read of pipelined history reads (each
/// up to `max_page_limit` messages) could make the relay build gigabytes of responses for a
/// client that never reads them.
const OUTPUT_HIGH_WATER: usize = 256 << 10;

enum ReadOutcome {
    Data,
    Closed,
    TimedOut,
    Failed,
}

pub async fn serve(shard: &Shard, mut stream: TcpStream, surface: super::Surface) {
    let _ = stream.set_nodelay(true);
    // Who is at the other end, for the per-address rate limits. A socket already reset has
    // no peer; its requests (if any were buffered) count under the unspecified address.
    let peer = stream
        .peer_addr()
        .map_or(IpAddr::V4(Ipv4Addr::UNSPECIFIED), |addr| addr.ip());
    let http = &shard.config.http;
    let mut decoder = RequestDecoder::new(Limits {
        max_header_bytes: http.max_header_bytes,
        max_headers: http.max_headers,
        max_body_bytes: http.max_body_bytes,
    });
    // Reads land in the shard's scratch buffer (`net::read`); this only ever holds bytes
    // received and not yet handled, so it starts empty.
    let mut input = BytesMut::new();
    let mut output = BytesMut::new();
    // When the request now being received sent its first byte (for the header timeout).
    let mut request_started: Option<Instant> = None;
    // How long a response write may make no progress: a client that stopped reading is
    // as gone as one that stopped sending.
    let stall = http.keepalive_timeout;
    // Bounds each wait below; the shard's sweeper keeps the time (`net::deadline`).
    let deadline = shard.deadlines.slot();

    loop {
        // Handle every complete request already buffered.
        let mut keep_open = true;
        while keep_open && output.len() < OUTPUT_HIGH_WATER {
            match decoder.decode(&mut input) {
                Ok(Some(Event::Request(request))) => {
                    // Pipelined requests already buffered never make this task wait: let the
                    // shard's other tasks run once its time slice is used.
                    glommio::yield_if_needed().await;
                    request_started = None;
                    let outcome = if surface == super::Surface::Api && parks(&request) {
                        match handle_watching_peer(
                            shard,
                            request,
                            peer,
                            &mut stream,
                            &mut input,
                            &mut output,
                            &deadline,
                        )
                        .await
                        {
                            Some(outcome) => outcome,
                            // The client went away while its poll was parked.
                            None => return,
                        }
                    } else {
                        handlers::handle(shard, request, &mut output, surface, peer).await
                    };
                    match outcome {
                        Outcome::Respond { keep_alive } => {
                            keep_open = keep_alive && !shard.is_shutting_down();
                        }
                        Outcome::EventStream(sse, cors) => {
                            if !output.is_empty()
                                && write_out(&mut stream, &mut output, &deadline, stall)
                                    .await
                                    .is_err()
                            {
                                return;
                            }
                            drop(deadline);
                            super::sse::run(shard, stream, sse, &cors).await;
                            return;
                        }
                        Outcome::WebSocket(upgrade) => {
                            if write_out(&mut stream, &mut output, &deadline, stall)
                                .await
                                .is_err()
                            {
                                return;
                            }
                            drop(deadline);
                            super::websocket::run(shard, stream, input, upgrade).await;
                            return;
                        }
                    }
                }
                Ok(Some(Event::ContinueExpected)) => {
                    // The client waits for this before sending the body: write it now.
                    write_continue(&mut output);
                    if write_out(&mut stream, &mut output, &deadline, stall)
                        .await
                        .is_err()
                    {
                        return;
                    }
                }
                Ok(None) => break,
                Err(e) => {
                    shard.with_date(|date| write_http_error(&mut output, date, &e));
                    keep_open = false;
                }
            }
        }
        // Handling stopped at the high-water mark: more complete requests may be buffered.
        let backed_up = output.len() >= OUTPUT_HIGH_WATER;
        if !output.is_empty()
            && write_out(&mut stream, &mut output, &deadline, stall)
                .await
                .is_err()
        {
            return;
        }
        if !keep_open || (shard.is_shutting_down() && decoder.is_idle(&input)) {
            let _ = stream.close().await;
            return;
        }
        if backed_up {
            continue;
        }

        // Choose how long the next read may take.
        let idle = decoder.is_idle(&input);
        let wait = if idle {
            if input.capacity() > IDLE_BUFFER_CAP {
                input = BytesMut::with_capacity(IDLE_BUFFER_CAP);
            }
            http.keepalive_timeout
        } else if decoder.in_body() {
            http.keepalive_timeout
        } else {
            let started = *request_started.get_or_insert_with(Instant::now);
            http.header_read_timeout.saturating_sub(started.elapsed())
        };

        // An idle connection also wakes for shutdown, so draining does not wait out its
        // keep-alive timeout.
        let read = read_some(&mut stream, &mut input, &deadline, wait);
        let outcome = if idle {
            // Pinned on the stack, not boxed: this runs for every request.
            let shutdown = shard.shutdown.wait();
            match select(std::pin::pin!(read), std::pin::pin!(shutdown)).await {
                Either::Left((outcome, _)) => outcome,
                Either::Right(_) => ReadOutcome::Closed,
            }
        } else {
            read.await
        };
        match outcome {
            ReadOutcome::Data => {
                if request_started.is_none() && !decoder.in_body() {
                    request_started = Some(Instant::now());
                }
            }
            ReadOutcome::Closed | ReadOutcome::Failed => return,
            ReadOutcome::TimedOut => {
                if !idle {
                    shard.with_date(|date| {
                        write_json_error(
                            &mut output,
                            date,
                            408,
                            "REQUEST_TIMEOUT",
                            "the request was not received in time",
                            false,
                            false,
                            &[],
                        )
                    });
                    let _ = write_out(&mut stream, &mut output, &deadline, stall).await;
                }
                let _ = stream.close().await;
                return;
            }
        }
    }
}

/// Reads at least one byte into `input`, or reports why not within `wait`.
///
/// Cancel-safe (see [`super::read::read_into`]): dropping this future (a parked poll answered
/// first, shutdown) leaves `input` exactly as it was.
async fn read_some(
    stream: &mut TcpStream,
    input: &mut BytesMut,
    deadline: &Deadline,
    wait: Duration,
) -> ReadOutcome {
    match deadline
        .within(wait, super::read::read_into(stream, input))
        .await
    {
        Some(Ok(0)) => ReadOutcome::Closed,
        Some(Ok(_)) => ReadOutcome::Data,
        Some(Err(_)) => ReadOutcome::Failed,
        None => ReadOutcome::TimedOut,
    }
}

/// Requests that may wait a long time for their answer (long-polls): while they wait, the
/// connection watches its socket so a client that goes away is noticed at once.
fn parks(request: &crate::http::codec::Request) -> bool {
    let path = request.path();
    // A consumer group's poll too: a worker that left must not be handed messages.
    matches!(path, "/messages/poll" | "/api/v1/poll")
        || (path.starts_with("/api/v1/topics/") && path.ends_with("/poll"))
}

/// Runs a parking request while reading the socket: bytes that arrive (a pipelined request)
/// are kept for later; end of stream drops the request (its guard detaches it) and returns
/// `None`.
async fn handle_watching_peer(
    shard: &Shard,
    request: crate::http::codec::Request,
    peer: IpAddr,
    stream: &mut TcpStream,
    input: &mut BytesMut,
    output: &mut BytesMut,
    deadline: &Deadline,
) -> Option<Outcome> {
    let mut handling = std::pin::pin!(handlers::handle(
        shard,
        request,
        output,
        super::Surface::Api,
        peer
    ));
    let mut peer_open = true;
    loop {
        if !peer_open {
            return Some(handling.await);
        }
        let read = Box::pin(read_some(
            stream,
            input,
            deadline,
            Duration::from_secs(3600),
        ));
        let read_outcome = match select(handling.as_mut(), read).await {
            Either::Left((outcome, _)) => return Some(outcome),
            Either::Right((read_outcome, _)) => read_outcome,
        };
        match read_outcome {
            ReadOutcome::Data => {
                // Cap what a client may pipeline behind a parked poll.
                let cap = shard.config.http.max_body_bytes + shard.config.http.max_header_bytes;
                if input.len() > cap {
                    peer_open = false;
                }
            }
            ReadOutcome::TimedOut => {}
            ReadOutcome::Closed | ReadOutcome::Failed => return None,
        }
    }
}

/// Writes all of `output` (and clears it), failing with `TimedOut` if the peer accepts no
/// byte for `stall`: the caller then drops the connection.
async fn write_out(
    stream: &mut TcpStream,
    output: &mut BytesMut,
    deadline: &Deadline,
    stall: Duration,
) -> std::io::Result<()> {
    let mut written = 0;
    let result = loop {
        if written == output.len() {
            break Ok(());
        }
        match deadline
            .within(stall, stream.write(&output[written..]))
            .await
        {
            Some(Ok(0)) => break Err(std::io::ErrorKind::WriteZero.into()),
            Some(Ok(n)) => written += n,
            Some(Err(e)) => break Err(e),
            None => break Err(std::io::ErrorKind::TimedOut.into()),
        }
    };
    output.clear();
    result
}
