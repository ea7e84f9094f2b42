//! Regression tests, each named after what broke.

mod common;

use std::net::TcpStream;
use std::time::Duration;

use common::hostile::stat_sum;
use common::{eventually, Server};
use tungstenite::Message;

/// A subscriber that stopped reading entirely used to block its session's writer forever in
/// `write_all`: the slow-consumer cut-off never happened and the connection was held open.
#[test]
fn never_reading_websocket_consumer_is_disconnected() {
    let server = Server::start("ws:\n  max_queued_bytes: 64KiB\n");
    let stream = TcpStream::connect(server.addr).expect("connect");
    let (mut ws, _) =
        tungstenite::client::client(format!("ws://{}/ws", server.addr), stream).expect("ws");
    ws.send(Message::text(
        r#"{"type":"subscribe","topics":["stalled"]}"#,
    ))
    .expect("subscribe");
    assert!(ws
        .read()
        .expect("subscribed")
        .to_string()
        .contains("subscribed"));
    assert_eq!(stat_sum(&server, "websocket_sessions"), 1);
    // Never read again. Publish far more than the kernel's socket buffers hold.
    let payload = format!("\"{}\"", "x".repeat(60_000));
    for _ in 0..250 {
        server.publish("stalled", &payload);
    }
    assert!(
        eventually(Duration::from_secs(30), || stat_sum(
            &server,
            "websocket_sessions"
        ) == 0),
        "the stalled session was never dropped"
    );
    let metrics = server.get("/metrics").text();
    assert!(
        metrics.contains("relay_slow_consumer_disconnects_total 1"),
        "{metrics}"
    );
    drop(ws);
}

/// The text log used to carry ANSI colour codes whatever stderr was: log files and
/// collectors got escape sequences, and an escape sequence in the log looked legitimate.
#[test]
fn text_log_has_no_colour_codes_when_stderr_is_not_a_terminal() {
    let server = Server::start_opts(common::RelayOpts::new("").env("LOG_LEVEL", "info"));
    server.health();
    let log = server.stderr();
    assert!(log.contains("relay ready"), "{log}");
    assert!(!log.contains('\u{1b}'), "colour codes in the log: {log:?}");
}
