//! A fault-injecting TCP proxy for the tests of the relay's Valkey path: the relay connects to
//! the proxy, the proxy to Valkey, and the test decides at run time what happens to the bytes
//! in between.
//!
//! Owns: listening on `127.0.0.1:<free port>`, one upstream connection per accepted client, two
//! pump threads per connection (client → upstream requests, upstream → client replies), the
//! current [`Fault`], cutting connections, and counters a test awaits ("the relay connected
//! again", "requests flow again"). Does not own: what the bytes mean — it never parses RESP, so
//! a fault lands wherever the bytes happen to be, which is what a real network does.
//!
//! Faults apply to every connection, current and future, from the moment they are set:
//! - [`Fault::Pass`]: bytes flow both ways.
//! - [`Fault::Delay`]: every chunk (either direction) is forwarded `d` after it arrived.
//! - [`Fault::Stall`]: nothing is read or forwarded, nothing is closed (a black hole that
//!   heals: bytes held in the kernel's buffers flow again after [`Fault::Pass`]).
//! - [`Fault::DropReplies`]: requests reach Valkey; its replies are read and thrown away.
//!
//! and three one-off actions: [`FaultProxy::cut`] closes every current connection at once,
//! [`FaultProxy::cut_mid_reply`] forwards the first half of the next reply chunk and then
//! closes that connection (a cut in the middle of a pipeline's replies, deterministically),
//! [`FaultProxy::cut_mid_reply_after_next`] does the same on the connection that next carries a
//! given command (so the cut surely lands on a reply that command is waiting behind), and
//! [`FaultProxy::drop_replies_from_next`] turns [`Fault::DropReplies`] on just before the next
//! request holding a given command is forwarded (so that command's reply is surely dropped).
//!
//! Threads: one acceptor plus two per connection, all polling a stop flag every few
//! milliseconds; dropping the proxy stops and joins them all.

use std::collections::VecDeque;
use std::io::{ErrorKind, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// How often a blocked pump or the acceptor looks at the fault and the stop flag: small enough
/// that a fault change takes effect at once at the scale of a 500 ms command timeout.
const POLL: Duration = Duration::from_millis(5);

/// What the proxy does to the bytes of every connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fault {
    Pass,
    Delay(Duration),
    Stall,
    DropReplies,
}

/// Which way a pump moves bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Direction {
    /// Client → upstream (the relay's commands).
    Requests,
    /// Upstream → client (Valkey's replies).
    Replies,
}

/// One proxied connection: both sockets, kept to cut them.
struct Link {
    client: TcpStream,
    upstream: TcpStream,
    /// Set by the request pump when it forwards the command armed by
    /// [`FaultProxy::cut_mid_reply_after_next`]; this link's reply pump takes it.
    cut_next_reply: AtomicBool,
}

impl Link {
    fn cut(&self) {
        let _ = self.client.shutdown(Shutdown::Both);
        let _ = self.upstream.shutdown(Shutdown::Both);
    }
}

/// What the acceptor, the pumps and the test share.
struct Shared {
    upstream: SocketAddr,
    fault: Mutex<Fault>,
    stop: AtomicBool,
    /// Armed by [`FaultProxy::cut_mid_reply`]; the next reply pump to read a chunk takes it.
    cut_mid_reply: AtomicBool,
    /// Armed by [`FaultProxy::drop_replies_from_next`]: the command whose next request turns
    /// [`Fault::DropReplies`] on.
    drop_replies_from: Mutex<Option<&'static [u8]>>,
    /// Armed by [`FaultProxy::cut_mid_reply_after_next`]: the command whose next request arms
    /// a mid-reply cut on its own connection.
    cut_mid_reply_after: Mutex<Option<&'static [u8]>>,
    links: Mutex<Vec<Arc<Link>>>,
    pumps: Mutex<Vec<JoinHandle<()>>>,
    accepted: AtomicU64,
    /// Clients closed at once because the upstream refused the connection (Valkey down).
    upstream_refused: AtomicU64,
    cuts: AtomicU64,
    bytes_to_upstream: AtomicU64,
    bytes_to_client: AtomicU64,
    bytes_dropped: AtomicU64,
}

impl Shared {
    fn fault(&self) -> Fault {
        *self.fault.lock().expect("fault lock")
    }
}

/// A running proxy; every thread stops when it is dropped.
pub struct FaultProxy {
    pub addr: SocketAddr,
    shared: Arc<Shared>,
    acceptor: Option<JoinHandle<()>>,
}

impl FaultProxy {
    /// Listens on a free port of 127.0.0.1 and forwards to `upstream`, in [`Fault::Pass`].
    pub fn start(upstream: SocketAddr) -> FaultProxy {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind the fault proxy");
        listener
            .set_nonblocking(true)
            .expect("nonblocking proxy listener");
        let addr = listener.local_addr().expect("proxy address");
        let shared = Arc::new(Shared {
            upstream,
            fault: Mutex::new(Fault::Pass),
            stop: AtomicBool::new(false),
            cut_mid_reply: AtomicBool::new(false),
            drop_replies_from: Mutex::new(None),
            cut_mid_reply_after: Mutex::new(None),
            links: Mutex::new(Vec::new()),
            pumps: Mutex::new(Vec::new()),
            accepted: AtomicU64::new(0),
            upstream_refused: AtomicU64::new(0),
            cuts: AtomicU64::new(0),
            bytes_to_upstream: AtomicU64::new(0),
            bytes_to_client: AtomicU64::new(0),
            bytes_dropped: AtomicU64::new(0),
        });
        let acceptor = {
            let shared = shared.clone();
            std::thread::spawn(move || accept_loop(&listener, &shared))
        };
        FaultProxy {
            addr,
            shared,
            acceptor: Some(acceptor),
        }
    }

    pub fn port(&self) -> u16 {
        self.addr.port()
    }

    /// Applies `fault` to every connection from now on.
    pub fn set(&self, fault: Fault) {
        *self.shared.fault.lock().expect("fault lock") = fault;
    }

    /// Turns [`Fault::DropReplies`] on (every connection) just before the next request chunk
    /// that holds `command` (e.g. `b"pulsar_append"`) is forwarded: that command reaches Valkey, its
    /// reply does not.
    pub fn drop_replies_from_next(&self, command: &'static [u8]) {
        *self.shared.drop_replies_from.lock().expect("drop lock") = Some(command);
    }

    pub fn fault(&self) -> Fault {
        self.shared.fault()
    }

    /// Closes every current connection (both sides) at once; returns how many there were.
    /// New connections are accepted as before.
    pub fn cut(&self) -> usize {
        let links = std::mem::take(&mut *self.shared.links.lock().expect("links lock"));
        for link in &links {
            link.cut();
        }
        self.shared
            .cuts
            .fetch_add(links.len() as u64, Ordering::Relaxed);
        links.len()
    }

    /// Arms a one-off cut: the next chunk of replies any connection reads is forwarded only in
    /// part (its first half, at least one byte short of whole) and then that connection is
    /// closed. [`FaultProxy::cuts`] goes up when it happened.
    pub fn cut_mid_reply(&self) {
        self.shared.cut_mid_reply.store(true, Ordering::Relaxed);
    }

    /// Arms a one-off cut on the connection that next forwards a request chunk holding
    /// `command` (e.g. `b"pulsar_append"`): that connection's next chunk of replies, read after
    /// the request went up, is forwarded only in part and the connection is closed. The
    /// command's own reply is either in that chunk or behind it, so it never arrives whole —
    /// unlike [`FaultProxy::cut_mid_reply`], whose cut any connection's background reply (a
    /// probe, a feed read) may take first.
    pub fn cut_mid_reply_after_next(&self, command: &'static [u8]) {
        *self.shared.cut_mid_reply_after.lock().expect("cut lock") = Some(command);
    }

    /// Connections accepted so far.
    pub fn accepted(&self) -> u64 {
        self.shared.accepted.load(Ordering::Relaxed)
    }

    /// Connections open right now (not cut, not closed by either end).
    pub fn open_connections(&self) -> usize {
        self.shared.links.lock().expect("links lock").len()
    }

    /// Connections closed by [`FaultProxy::cut`] or [`FaultProxy::cut_mid_reply`].
    pub fn cuts(&self) -> u64 {
        self.shared.cuts.load(Ordering::Relaxed)
    }

    /// Clients closed at once because the upstream refused to connect.
    pub fn upstream_refused(&self) -> u64 {
        self.shared.upstream_refused.load(Ordering::Relaxed)
    }

    pub fn bytes_to_upstream(&self) -> u64 {
        self.shared.bytes_to_upstream.load(Ordering::Relaxed)
    }

    pub fn bytes_to_client(&self) -> u64 {
        self.shared.bytes_to_client.load(Ordering::Relaxed)
    }

    /// Reply bytes read from upstream and discarded under [`Fault::DropReplies`].
    pub fn bytes_dropped(&self) -> u64 {
        self.shared.bytes_dropped.load(Ordering::Relaxed)
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::Relaxed);
        if let Some(acceptor) = self.acceptor.take() {
            let _ = acceptor.join();
        }
        self.cut();
        let pumps = std::mem::take(&mut *self.shared.pumps.lock().expect("pumps lock"));
        for pump in pumps {
            let _ = pump.join();
        }
    }
}

fn accept_loop(listener: &TcpListener, shared: &Arc<Shared>) {
    while !shared.stop.load(Ordering::Relaxed) {
        let client = match listener.accept() {
            Ok((client, _)) => client,
            Err(e) if e.kind() == ErrorKind::WouldBlock => {
                std::thread::sleep(POLL);
                continue;
            }
            Err(_) => {
                std::thread::sleep(POLL);
                continue;
            }
        };
        shared.accepted.fetch_add(1, Ordering::Relaxed);
        let Ok(upstream) = TcpStream::connect_timeout(&shared.upstream, Duration::from_secs(1))
        else {
            // Valkey is down: the client sees its connection closed, as it would see a refusal.
            shared.upstream_refused.fetch_add(1, Ordering::Relaxed);
            let _ = client.shutdown(Shutdown::Both);
            continue;
        };
        let _ = client.set_nodelay(true);
        let _ = upstream.set_nodelay(true);
        let (Ok(client_r), Ok(upstream_r)) = (client.try_clone(), upstream.try_clone()) else {
            continue;
        };
        let link = Arc::new(Link {
            client,
            upstream,
            cut_next_reply: AtomicBool::new(false),
        });
        shared.links.lock().expect("links lock").push(link.clone());
        let mut pumps = shared.pumps.lock().expect("pumps lock");
        // Finished pumps of earlier connections are reaped here so the list stays short.
        pumps.retain(|p| !p.is_finished());
        for (direction, from) in [
            (Direction::Requests, client_r),
            (Direction::Replies, upstream_r),
        ] {
            let shared = shared.clone();
            let link = link.clone();
            pumps.push(std::thread::spawn(move || {
                pump(&shared, &link, from, direction);
                // Either side finishing ends the connection for both pumps.
                link.cut();
                shared
                    .links
                    .lock()
                    .expect("links lock")
                    .retain(|l| !Arc::ptr_eq(l, &link));
            }));
        }
    }
}

/// Moves bytes from `from` to the other side of `link` under the current fault, until either
/// side closes, the link is cut, or the proxy stops.
fn pump(shared: &Shared, link: &Link, mut from: TcpStream, direction: Direction) {
    let mut to = match direction {
        Direction::Requests => &link.upstream,
        Direction::Replies => &link.client,
    };
    let forwarded = match direction {
        Direction::Requests => &shared.bytes_to_upstream,
        Direction::Replies => &shared.bytes_to_client,
    };
    if from.set_read_timeout(Some(POLL)).is_err() {
        return;
    }
    // Chunks read but not yet due (Delay), with the instant each is due.
    let mut held: VecDeque<(Instant, Vec<u8>)> = VecDeque::new();
    let mut buf = vec![0u8; 64 << 10];
    while !shared.stop.load(Ordering::Relaxed) {
        let fault = shared.fault();
        if fault == Fault::Stall {
            std::thread::sleep(POLL);
            continue;
        }
        // Forward what is due (everything, once the delay is lifted).
        while let Some((due, _)) = held.front() {
            if matches!(fault, Fault::Delay(_)) && *due > Instant::now() {
                break;
            }
            let Some((_, chunk)) = held.pop_front() else {
                break;
            };
            if to.write_all(&chunk).is_err() {
                return;
            }
            forwarded.fetch_add(chunk.len() as u64, Ordering::Relaxed);
        }
        let n = match from.read(&mut buf) {
            Ok(0) => {
                // The sender closed: pass what is held on when due, then end the connection
                // (as a network delivers data sent before a close, late).
                for (due, chunk) in held.drain(..) {
                    std::thread::sleep(due.saturating_duration_since(Instant::now()));
                    let _ = to.write_all(&chunk);
                }
                return;
            }
            Ok(n) => n,
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => continue,
            Err(e) if e.kind() == ErrorKind::Interrupted => continue,
            Err(_) => return,
        };
        let chunk = &buf[..n];
        if direction == Direction::Requests {
            let mut armed = shared.drop_replies_from.lock().expect("drop lock");
            if armed.is_some_and(|command| chunk.windows(command.len()).any(|w| w == command)) {
                *armed = None;
                *shared.fault.lock().expect("fault lock") = Fault::DropReplies;
            }
            drop(armed);
            let mut armed = shared.cut_mid_reply_after.lock().expect("cut lock");
            if armed.is_some_and(|command| chunk.windows(command.len()).any(|w| w == command)) {
                *armed = None;
                // Before the request goes up, so no reply to it can be read ahead of the flag.
                link.cut_next_reply.store(true, Ordering::Relaxed);
            }
        }
        // The fault as it is now: it may have changed while the read waited.
        let fault = shared.fault();
        if direction == Direction::Replies {
            if shared.cut_mid_reply.swap(false, Ordering::Relaxed)
                || link.cut_next_reply.swap(false, Ordering::Relaxed)
            {
                let part = (n / 2).min(n - 1);
                if to.write_all(&chunk[..part]).is_ok() {
                    forwarded.fetch_add(part as u64, Ordering::Relaxed);
                }
                shared.cuts.fetch_add(1, Ordering::Relaxed);
                return;
            }
            if fault == Fault::DropReplies {
                shared.bytes_dropped.fetch_add(n as u64, Ordering::Relaxed);
                continue;
            }
        }
        // Held in order behind earlier chunks; forwarded at the top of the loop once due
        // (at once unless delayed or stalled).
        let due = match fault {
            Fault::Delay(d) => Instant::now() + d,
            _ => Instant::now(),
        };
        held.push_back((due, chunk.to_vec()));
    }
}
