//! The shard's accept loop, the per-shard connection cap, and running out of descriptors.
//!
//! Out of descriptors (`EMFILE`/`ENFILE`), `accept` fails and the connection stays in the
//! kernel's listen backlog, where its client would wait for as long as the shortage lasts. So
//! each shard keeps one spare descriptor (`/dev/null`, opened at start): when accept fails for
//! want of descriptors, the shard closes the spare and accepts the next connection with the
//! freed descriptor; if the spare cannot be opened again right after (still short), that
//! connection is answered 503 with `Retry-After` and closed, and the spare reopened. The
//! client gets a clear answer at once; connections already open are untouched.
//! (Shards are threads of one process sharing one descriptor table: another shard may take
//! the freed descriptor first.) A shard left with neither a spare nor a descriptor closes its
//! listener: the connections in its backlog are reset (a clear failure their clients can
//! retry, not a wait of unknown length) and new ones go to the other shards' listeners
//! (`SO_REUSEPORT`), or are refused if every shard is in that state. It binds again as soon
//! as a descriptor is free.

use std::fs::File;
use std::net::SocketAddr;
use std::rc::Rc;
use std::time::Duration;

use futures::future::{select, Either};
use futures_lite::AsyncWriteExt;
use glommio::net::{TcpListener, TcpStream};

use super::connection;
use crate::http::response::write_json_error;
use crate::shard::Shard;

/// Linux `errno` values of `accept(2)` when the process (`EMFILE`) or the system (`ENFILE`)
/// has no descriptor left.
const EMFILE: i32 = 24;
const ENFILE: i32 = 23;

/// Pause after an accept failure the spare descriptor cannot help with, so a persistent error
/// does not spin the core.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(10);

/// The spare descriptor's file: always there, costs nothing, never read.
const SPARE_PATH: &str = "/dev/null";

/// Accepts connections until the shard starts shutting down.
pub async fn accept_loop(shard: Rc<Shard>, mut listener: TcpListener, surface: super::Surface) {
    // Where to listen again after closing the listener for want of descriptors.
    let addr = listener.local_addr().ok();
    let mut spare = File::open(SPARE_PATH).ok();
    // The spare was closed to accept a connection that is to be refused for want of
    // descriptors.
    let mut shedding = false;
    // Accept failures since the last success: the first is logged as a warning, the rest (one
    // every ACCEPT_BACKOFF while the shortage lasts) only at debug level.
    let mut failures: u64 = 0;
    loop {
        let accepted = {
            let accept = Box::pin(listener.accept());
            let stop = Box::pin(shard.shutdown.wait());
            match select(accept, stop).await {
                Either::Left((accepted, _)) => accepted,
                Either::Right(_) => return,
            }
        };
        let stream = match accepted {
            Ok(s) => s,
            Err(e) => {
                if failures == 0 {
                    tracing::warn!(shard = shard.id, error = %e, "accept failed");
                } else {
                    tracing::debug!(shard = shard.id, error = %e, failures, "accept failed again");
                }
                failures += 1;
                let out_of_descriptors = matches!(e.raw_os_error(), Some(EMFILE | ENFILE));
                if out_of_descriptors && spare.is_some() {
                    // Free one descriptor for the waiting connection, refused below.
                    spare = None;
                    shedding = true;
                } else {
                    // No spare (another shard took the freed descriptor, or the shortage
                    // began before start): try to get it back.
                    spare = spare.or_else(|| File::open(SPARE_PATH).ok());
                    shedding = false;
                    if out_of_descriptors && spare.is_none() {
                        if let Some(addr) = addr {
                            match listen_again(&shard, listener, addr).await {
                                Some(bound) => listener = bound,
                                None => return,
                            }
                            spare = File::open(SPARE_PATH).ok();
                            continue;
                        }
                    }
                    glommio::timer::sleep(ACCEPT_BACKOFF).await;
                }
                continue;
            }
        };
        if shedding {
            shedding = false;
            // `accept` fails for want of a descriptor before it looks for a connection, so
            // this one may have come much later, when descriptors were free again: refuse it
            // only if the spare cannot be had back now.
            spare = File::open(SPARE_PATH).ok();
            if spare.is_none() {
                // Awaited here, not spawned: the spare can be reopened only once this
                // connection's descriptor is closed. A ~200-byte write into a new socket's
                // empty send buffer does not wait.
                refuse(
                    &shard,
                    stream,
                    "the relay is out of file descriptors; retry shortly",
                )
                .await;
                spare = File::open(SPARE_PATH).ok();
                continue;
            }
        }
        if failures > 0 {
            tracing::info!(shard = shard.id, failures, "accepting connections again");
            failures = 0;
        }
        if !shard.try_open_connection() {
            glommio::spawn_local(refuse_over_cap(shard.clone(), stream)).detach();
            continue;
        }
        let Ok(pass) = shard.gate.enter() else {
            shard.close_connection();
            return;
        };
        let conn_shard = shard.clone();
        glommio::spawn_local(async move {
            connection::serve(&conn_shard, stream, surface).await;
            conn_shard.close_connection();
            drop(pass);
        })
        .detach();
    }
}

/// Closes `listener` (resetting the connections in its backlog, which this shard cannot
/// accept) and binds `addr` again once a descriptor is free. `None` if the shard began
/// shutting down meanwhile.
async fn listen_again(
    shard: &Shard,
    listener: TcpListener,
    addr: SocketAddr,
) -> Option<TcpListener> {
    drop(listener);
    tracing::warn!(
        shard = shard.id,
        "out of file descriptors with no spare: listener closed until one is free"
    );
    loop {
        let pause = Box::pin(glommio::timer::sleep(ACCEPT_BACKOFF));
        let stop = Box::pin(shard.shutdown.wait());
        if let Either::Right(_) = select(pause, stop).await {
            return None;
        }
        if let Ok(bound) = TcpListener::bind(addr) {
            tracing::info!(shard = shard.id, "listening again");
            return Some(bound);
        }
    }
}

/// Answers a connection over the shard's limit with 503 and closes it, so the client gets a
/// clear error instead of a connection that hangs in the backlog.
async fn refuse_over_cap(shard: Rc<Shard>, stream: TcpStream) {
    refuse(
        &shard,
        stream,
        "too many connections to this relay shard; retry shortly",
    )
    .await;
}

/// Writes a 503 `SERVICE_UNAVAILABLE` with `Retry-After` and closes the connection.
async fn refuse(shard: &Shard, mut stream: TcpStream, message: &str) {
    let mut out = bytes::BytesMut::with_capacity(256);
    shard.with_date(|date| {
        write_json_error(
            &mut out,
            date,
            503,
            "SERVICE_UNAVAILABLE",
            message,
            false,
            false,
            &[("Retry-After", "1")],
        )
    });
    let _ = stream.write_all(&out).await;
    let _ = stream.close().await;
}
