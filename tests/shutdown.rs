//! Graceful shutdown: SIGTERM finishes in-flight work, loses nothing acknowledged, tells
//! consumers, and exits 0.

mod common;

use std::collections::HashSet;
use std::io::ErrorKind;
use std::net::TcpStream;
use std::time::{Duration, Instant};

use common::valkey::{stream_key, PublishLoad, ValkeyOpts, ValkeyServer};
use common::{assert_spans_shards, eventually, topics, Server};
use tungstenite::protocol::frame::coding::CloseCode;
use tungstenite::Message;

#[test]
fn sigterm_during_publish_load_loses_no_acknowledged_message() {
    let valkey = ValkeyServer::start(ValkeyOpts::default());
    let mut relay = valkey.start_relay("", &[]);
    let names = topics("drain", 6);
    assert_spans_shards(&names, 2);
    let load = PublishLoad::start(relay.addr, &names, 50_000, Duration::from_secs(60));
    assert!(
        eventually(Duration::from_secs(20), || load.min_acked() >= 100),
        "load did not get going"
    );
    let status = relay.terminate(Duration::from_secs(35));
    assert!(status.success(), "exit status after SIGTERM: {status}");
    let outcomes = load.finish();
    for out in &outcomes {
        assert_eq!(out.hung, 0, "{}: requests hung during shutdown", out.topic);
        assert!(
            out.unexpected.is_empty(),
            "{}: {:?}",
            out.topic,
            out.unexpected
        );
        let stored: HashSet<String> = valkey
            .xrange(&stream_key(&out.topic))
            .into_iter()
            .map(|e| e.id)
            .collect();
        for (i, id) in &out.acked {
            assert!(
                stored.contains(id),
                "{}: message {i} was acknowledged as {id} but is not in Valkey",
                out.topic
            );
        }
        assert!(!out.acked.is_empty(), "{}: nothing acknowledged", out.topic);
    }
}

#[test]
fn sigterm_closes_websockets_with_1001_and_answers_parked_polls() {
    let mut relay = Server::start_with_shards("", 2);
    let addr = relay.addr;

    let stream = TcpStream::connect(addr).expect("connect ws");
    stream
        .set_read_timeout(Some(Duration::from_secs(20)))
        .expect("timeout");
    let (mut ws, _) =
        tungstenite::client::client(format!("ws://{addr}/ws"), stream).expect("ws handshake");
    ws.send(Message::text(r#"{"type":"subscribe","topics":["bye"]}"#))
        .expect("subscribe");
    let subscribed = ws.read().expect("subscribed frame");
    assert!(
        subscribed.to_string().contains("subscribed"),
        "{subscribed}"
    );

    let poll = std::thread::spawn(move || {
        let mut conn = common::Conn::connect(addr);
        conn.set_read_timeout(Duration::from_secs(25));
        let started = Instant::now();
        let response = conn.request(
            "POST",
            "/messages/poll",
            Some(br#"{"topics":["parked"],"timeout":30}"#),
        );
        (response, started.elapsed())
    });
    // Wait until the poll is parked.
    assert!(
        eventually(Duration::from_secs(10), || {
            relay.get("/messages/poll/stats").json()["active_polls"] == 1
        }),
        "the poll never parked"
    );

    let started = Instant::now();
    let status = relay.terminate(Duration::from_secs(35));
    assert!(status.success(), "exit status after SIGTERM: {status}");
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "shutdown took {:?}",
        started.elapsed()
    );

    let (response, waited) = poll.join().expect("poll thread");
    assert_eq!(response.status, 200, "{}", response.text());
    assert_eq!(response.json()["timeout"], true);
    assert!(
        waited < Duration::from_secs(20),
        "the parked poll waited {waited:?}"
    );

    let close = loop {
        match ws.read() {
            Ok(Message::Close(frame)) => break frame,
            Ok(_) => continue,
            Err(tungstenite::Error::Io(e)) if e.kind() == ErrorKind::WouldBlock => {
                panic!("no close frame before the read timeout")
            }
            Err(e) => panic!("connection ended without a close frame: {e}"),
        }
    };
    assert_eq!(close.map(|f| f.code), Some(CloseCode::Away));
}

/// Starts the relay with stdout and stderr piped and LOG_LEVEL=info (so the signal thread has
/// a line to log); returns it once it printed its ready line, with its stderr pipe's read end.
fn spawn_with_stderr_pipe() -> (std::process::Child, std::process::ChildStderr) {
    use std::io::{BufRead, BufReader};
    use std::process::{Command, Stdio};
    let mut child = Command::new(env!("CARGO_BIN_EXE_pulsar-relay"))
        .args(["--listen", "127.0.0.1:0", "--shards", "2"])
        .env("LOG_LEVEL", "info")
        .env_remove("STORAGE_BACKEND")
        .env_remove("LOG_FORMAT")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn pulsar-relay");
    let stderr = child.stderr.take().expect("stderr was piped");
    let stdout = child.stdout.take().expect("stdout was piped");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            let _ = tx.send(line);
        }
    });
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok(line) if line.starts_with("pulsar-relay ready:") => break,
            Ok(_) => {}
            Err(_) => {
                let _ = child.kill();
                panic!("the relay did not become ready");
            }
        }
    }
    (child, stderr)
}

/// SIGTERM, then waits (with a deadline) for the process to exit; SIGKILLs it and fails if it
/// does not.
fn sigterm_and_await_exit(child: &mut std::process::Child, within: Duration) {
    let pid = child.id().to_string();
    let sent = std::process::Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .expect("run kill");
    assert!(sent.success(), "kill -TERM {pid} failed");
    let exited = eventually(within, || matches!(child.try_wait(), Ok(Some(_))));
    if !exited {
        let _ = child.kill();
        let _ = child.wait();
    }
    assert!(
        exited,
        "the relay ignored SIGTERM for {within:?} with its stderr pipe closed"
    );
}

/// Bug: with its stderr pipe closed (`pulsar-relay 2>&1 >/dev/null | head -3`), the first
/// log line written on SIGTERM failed; tracing-subscriber then reported that failure with
/// `eprintln!`, which panicked on the same closed pipe and killed the signal thread, so the
/// relay ignored SIGTERM and SIGINT for good.
#[test]
fn sigterm_with_stderr_pipe_closed_still_exits() {
    let (mut child, stderr) = spawn_with_stderr_pipe();
    // The reader goes away after startup, as `head -3` does.
    drop(stderr);
    sigterm_and_await_exit(&mut child, Duration::from_secs(15));
}

/// The other side of the boundary: stderr closed before the relay wrote anything still lets
/// it start, serve and stop.
#[test]
fn stderr_closed_from_the_start_still_serves_and_exits() {
    use std::process::{Command, Stdio};
    let mut child = Command::new(env!("CARGO_BIN_EXE_pulsar-relay"))
        .args(["--listen", "127.0.0.1:0", "--shards", "1"])
        .env("LOG_LEVEL", "info")
        .env_remove("STORAGE_BACKEND")
        .env_remove("LOG_FORMAT")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn pulsar-relay");
    drop(child.stderr.take());
    let stdout = child.stdout.take().expect("stdout was piped");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        use std::io::{BufRead, BufReader};
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            let _ = tx.send(line);
        }
    });
    let ready = rx.recv_timeout(Duration::from_secs(20)).unwrap_or_default();
    if !ready.starts_with("pulsar-relay ready:") {
        let _ = child.kill();
        let status = child.wait();
        panic!("no ready line with stderr closed (got {ready:?}, exit {status:?})");
    }
    let addr: std::net::SocketAddr = ready
        .trim_start_matches("pulsar-relay ready: http://")
        .trim()
        .trim_end_matches('/')
        .parse()
        .expect("the ready line names an address");
    let mut conn = common::Conn::connect(addr);
    // It serves with nowhere to log.
    assert_eq!(conn.request("GET", "/health", None).status, 200);
    let published = conn.request(
        "POST",
        "/api/v1/messages",
        Some(br#"{"topic":"closed-stderr","payload":{"n":1}}"#),
    );
    assert_eq!(published.status, 201, "{}", published.text());
    sigterm_and_await_exit(&mut child, Duration::from_secs(15));
}
