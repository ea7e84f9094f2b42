//! The relay out of file descriptors: with its `RLIMIT_NOFILE` lowered (by `prlimit` from
//! util-linux, on the running process) just above what it holds, a flood of connections
//! exhausts the descriptors. New connections must then be answered `503` or closed, never left
//! waiting in the listen backlog; the relay must not spin or crash; connections it already
//! holds (a keep-alive publisher, a WebSocket subscriber) keep working; and once the flood
//! closes, new connections are served again.
//!
//! Owns: behaviour at the descriptor limit. Does not own: the configured connection cap
//! (`limits.rs`), which the relay enforces before descriptors run out.

mod common;

use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::Command;
use std::time::{Duration, Instant};

use common::ws::WsClient;
use common::{eventually, id_of, open_fds, Server};

/// A connection the relay cannot take must be answered (or closed) within this; the backlog
/// would hold it forever while descriptors stay exhausted.
const ANSWER_WITHIN: Duration = Duration::from_secs(3);

/// Descriptors left free above what the relay holds before the flood: the flood takes them.
const HEADROOM: usize = 12;

/// How a flood connection ended up.
#[derive(Debug, PartialEq, Eq)]
enum Fate {
    /// Served: the relay had a descriptor for it (it keeps one while open).
    Served,
    /// Answered 503 and closed, or closed without an answer: refused cleanly.
    Refused(String),
    /// Connected (in the backlog) but neither served nor closed in time.
    Hung,
}

/// Connects, sends `GET /health`, and classifies the answer. A served connection is returned
/// open so it keeps its descriptor on the relay's side.
fn try_health(addr: SocketAddr) -> (Fate, Option<TcpStream>) {
    let mut stream = match TcpStream::connect_timeout(&addr, ANSWER_WITHIN) {
        Ok(s) => s,
        // Refused, or the SYN dropped on a full backlog: either way not left hanging.
        Err(e) => return (Fate::Refused(format!("connect: {e}")), None),
    };
    stream
        .set_read_timeout(Some(ANSWER_WITHIN))
        .expect("read timeout");
    if stream
        .write_all(b"GET /health HTTP/1.1\r\nHost: localhost\r\n\r\n")
        .is_err()
    {
        return (Fate::Refused("write failed".into()), None);
    }
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match stream.read(&mut buf) {
            Ok(0) => {
                let text = String::from_utf8_lossy(&got).into_owned();
                return (Fate::Refused(format!("closed after {text:?}")), None);
            }
            Ok(n) => {
                got.extend_from_slice(&buf[..n]);
                let text = String::from_utf8_lossy(&got);
                if text.starts_with("HTTP/1.1 200") && text.contains("\"status\"") {
                    return (Fate::Served, Some(stream));
                }
                if text.starts_with("HTTP/1.1 503") && text.contains("SERVICE_UNAVAILABLE") {
                    assert!(
                        text.to_ascii_lowercase().contains("retry-after:"),
                        "503 without Retry-After: {text}"
                    );
                    return (
                        Fate::Refused(text.lines().next().unwrap_or("").into()),
                        None,
                    );
                }
            }
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                return (Fate::Hung, None)
            }
            Err(e) => return (Fate::Refused(format!("read: {e}")), None),
        }
    }
}

/// CPU time (user + system) the process has used, in clock ticks, from `/proc/<pid>/stat`.
fn cpu_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("read stat");
    // The command name (field 2) may hold spaces; the fields after its `)` are plain.
    let rest = &stat[stat.rfind(')').expect("stat format") + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // utime and stime are fields 14 and 15 of the whole line, 12 and 13 after the name.
    fields[11].parse::<u64>().expect("utime") + fields[12].parse::<u64>().expect("stime")
}

fn ticks_per_second() -> u64 {
    let out = Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .expect("getconf");
    String::from_utf8_lossy(&out.stdout)
        .trim()
        .parse()
        .expect("CLK_TCK")
}

/// Lowers the open-files limit of the running process `pid`.
fn set_nofile_limit(pid: u32, limit: usize) {
    let status = Command::new("prlimit")
        .arg("--pid")
        .arg(pid.to_string())
        .arg(format!("--nofile={limit}:{limit}"))
        .status()
        .expect("run prlimit (util-linux)");
    assert!(status.success(), "prlimit failed: {status}");
}

#[test]
fn out_of_descriptors_new_connections_get_503_not_a_hang_in_the_backlog() {
    let relay = Server::start("");
    let pid = relay.pid().expect("relay pid");
    let topic = "fd-exhaustion";
    let mut publisher = relay.connect();
    publisher.publish(topic, r#"{"before":true}"#);
    let mut subscriber = WsClient::connect(relay.addr);
    subscriber.subscribe(&[topic], None);

    let held = open_fds(pid);
    set_nofile_limit(pid, held + HEADROOM);

    // Flood until the relay has refused a few: every connection is served, refused or closed
    // within ANSWER_WITHIN, none waits in the backlog.
    let mut flood = Vec::new();
    let mut refused = Vec::new();
    let mut hung = 0;
    for _ in 0..HEADROOM * 4 {
        match try_health(relay.addr) {
            (Fate::Served, Some(stream)) => flood.push(stream),
            (Fate::Refused(how), _) => refused.push(how),
            (Fate::Hung, _) => hung += 1,
            (Fate::Served, None) => unreachable!("a served connection is returned"),
        }
        if refused.len() + hung >= 4 {
            break;
        }
    }
    assert_eq!(
        hung,
        0,
        "{hung} connections left hanging at the descriptor limit ({} served, refused: \
         {refused:?})\nstderr:\n{}",
        flood.len(),
        relay.stderr()
    );
    assert!(
        refused.len() >= 4,
        "the flood never hit the limit: {} served",
        flood.len()
    );
    assert!(
        refused.iter().any(|r| r.contains("503")),
        "no refused connection got a 503: {refused:?}"
    );
    eprintln!(
        "fd limit {}: {} flood connections served, then refused: {refused:?}",
        held + HEADROOM,
        flood.len()
    );

    // At the limit: no busy loop. Measured over a window while the flood holds.
    let window = Duration::from_secs(1);
    let (before, started) = (cpu_ticks(pid), Instant::now());
    std::thread::sleep(window);
    let used = cpu_ticks(pid) - before;
    let allowed = ticks_per_second() * started.elapsed().as_millis() as u64 / 1000 / 2;
    assert!(
        used <= allowed,
        "relay used {used} CPU ticks in {:?} at the descriptor limit (spinning?)",
        started.elapsed()
    );

    // Connections it holds keep working: publish, and the subscriber receives it.
    let ack = publisher.publish(topic, r#"{"at_limit":true}"#);
    let delivered = subscriber.recv_type("message");
    assert_eq!(delivered["message_id"], id_of(&ack).as_str(), "{delivered}");
    assert_eq!(delivered["payload"]["at_limit"], true);

    // Load drops: new connections are served again.
    drop(flood);
    let mut last = None;
    assert!(
        eventually(Duration::from_secs(10), || {
            let (fate, _) = try_health(relay.addr);
            let served = fate == Fate::Served;
            last = Some(fate);
            served
        }),
        "no new connection served after the flood closed; last: {last:?}"
    );
    assert!(relay.is_running());
    assert_eq!(relay.health()["status"], "healthy");
}
