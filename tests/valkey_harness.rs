//! Tests of the Valkey test harness itself (no relay involved): that a server starts on its
//! own port, keeps acknowledged writes across SIGTERM and SIGKILL restarts on the same
//! directory, and serves TLS to a client trusting the generated CA. The relay tests rely on
//! each of these; when one breaks, this file says whether the harness or the relay is at fault.

mod common;

use std::net::TcpListener;
use std::sync::atomic::{AtomicU16, Ordering};

use common::valkey::{free_port, rfc3339_from_ms, ValkeyOpts, ValkeyServer};
use serde_json::json;

#[test]
fn aof_survives_stop_and_restart_on_the_same_port() {
    let mut valkey = ValkeyServer::start(ValkeyOpts::default());
    assert_ne!(valkey.port, 6379);
    let id = valkey.cli(&["XADD", "s", "*", "payload", "{\"a\": 1}"]);
    let port = valkey.port;
    valkey.stop();
    assert!(
        valkey.try_cli(&["PING"]).is_err(),
        "valkey still answers after stop()"
    );
    valkey.restart();
    assert_eq!(valkey.port, port);
    let entries = valkey.xrange("s");
    assert_eq!(entries.len(), 1, "{entries:?}");
    assert_eq!(entries[0].id, id.trim());
    assert_eq!(entries[0].field("payload"), Some("{\"a\": 1}"));
    assert_eq!(valkey.xlen("s"), 1);
    assert_eq!(valkey.xlen("missing"), 0);
}

#[test]
fn fsync_always_survives_kill9() {
    let mut valkey = ValkeyServer::start(ValkeyOpts {
        fsync_always: true,
        ..ValkeyOpts::default()
    });
    for i in 0..20 {
        valkey.cli(&["XADD", "s", "*", "i", &i.to_string()]);
    }
    valkey.kill9();
    valkey.restart();
    assert_eq!(valkey.xlen("s"), 20);
}

#[test]
fn tls_and_password_reach_the_cli() {
    let valkey = ValkeyServer::start(ValkeyOpts {
        tls: true,
        requirepass: Some("s3cret".into()),
        ..ValkeyOpts::default()
    });
    assert_eq!(valkey.cli(&["PING"]).trim(), "PONG");
    assert_eq!(valkey.cli_json(&["HSET", "h", "f", "v"]), json!(1));
    let env = valkey.relay_env();
    let get = |name: &str| env.iter().find(|(k, _)| k == name).map(|(_, v)| v.clone());
    assert_eq!(get("VALKEY_USE_TLS").as_deref(), Some("true"));
    assert_eq!(get("VALKEY_PASSWORD").as_deref(), Some("s3cret"));
    assert!(get("VALKEY_TLS_CA_FILE").is_some_and(|p| std::path::Path::new(&p).is_file()));
    assert_eq!(
        valkey.info_field("persistence", "aof_enabled").as_deref(),
        Some("1")
    );
}

#[test]
fn rfc3339_formatting_matches_known_instants() {
    assert_eq!(rfc3339_from_ms(0), "1970-01-01T00:00:00.000Z");
    assert_eq!(
        rfc3339_from_ms(1_735_732_800_000),
        "2025-01-01T12:00:00.000Z"
    );
    assert_eq!(rfc3339_from_ms(951_782_400_123), "2000-02-29T00:00:00.123Z");
    assert_eq!(
        rfc3339_from_ms(4_107_542_399_999),
        "2100-02-28T23:59:59.999Z"
    );
}

/// The port handed to the first start attempt of the test below (0 once used).
static TAKEN_PORT: AtomicU16 = AtomicU16::new(0);

#[test]
fn a_start_that_finds_its_port_taken_retries_on_another() {
    // Another process's socket on the port picked first; it accepts and closes at once, so
    // the harness's PING against it fails fast instead of waiting for a reply.
    let squatter = TcpListener::bind("127.0.0.1:0").expect("bind");
    let taken = squatter.local_addr().expect("addr").port();
    TAKEN_PORT.store(taken, Ordering::SeqCst);
    std::thread::spawn(move || {
        for conn in squatter.incoming() {
            drop(conn);
        }
    });
    fn pick() -> u16 {
        match TAKEN_PORT.swap(0, Ordering::SeqCst) {
            0 => free_port(),
            port => port,
        }
    }
    let valkey = ValkeyServer::start_on_port_from(ValkeyOpts::default(), pick);
    assert_ne!(valkey.port, taken);
    assert_eq!(
        TAKEN_PORT.load(Ordering::SeqCst),
        0,
        "the taken port was tried"
    );
    assert_eq!(valkey.cli(&["PING"]).trim(), "PONG");
    assert!(
        valkey.log().contains("Address already in use"),
        "{}",
        valkey.log()
    );
}
