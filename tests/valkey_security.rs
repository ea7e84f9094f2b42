//! Black-box tests of how the relay authenticates to Valkey and protects the connection:
//! `requirepass`, ACL users, a wrong password, TLS with a trusted CA and with an untrusted one.
//! A relay that cannot authenticate or verify Valkey must keep running, say it is not ready,
//! and answer publishes with 503 — never crash, never hang, never write.
//!
//! Owns: `VALKEY_PASSWORD`, `VALKEY_USERNAME`, `VALKEY_USE_TLS`, `VALKEY_TLS_CA_FILE`. Does not
//! own: the data layout (`valkey_api.rs`).

mod common;

use std::time::{Duration, Instant};

use common::valkey::{
    assert_stays_unready, assert_unavailable, generate_ca, stream_key, ValkeyOpts, ValkeyServer,
};
use common::{publish_body, Server};
use serde_json::json;

/// Valkey timeouts short enough that a relay that cannot connect answers quickly.
const FAST_FAILING: &str = "valkey:\n  connect_timeout: 1s\n  command_timeout: 1s\n";

/// Asserts a relay that cannot use Valkey stays alive and unready, answers publishes with a
/// prompt 503, and says `connected: false` in `/health`.
fn assert_refuses_service(relay: &Server) {
    assert_stays_unready(relay, Duration::from_secs(3));
    for i in 0..3 {
        let started = Instant::now();
        let resp = relay.post_json("/api/v1/messages", &publish_body("denied", &i.to_string()));
        assert_unavailable(&resp);
        // Normally one connect timeout (1 s); the bound only tells a 503 from a hang, with
        // room for a loaded machine (CI once measured 6.5 s).
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "publish took {:?}",
            started.elapsed()
        );
    }
    let health = relay.health();
    assert_eq!(health["storage"]["connected"], false, "{health}");
    assert!(relay.is_running());
}

#[test]
fn requirepass_with_valkey_password_works() {
    let valkey = ValkeyServer::start(ValkeyOpts {
        requirepass: Some("s3cret-pw".into()),
        ..ValkeyOpts::default()
    });
    let relay = valkey.start_relay("", &[]);
    let ack = relay.publish("authed", r#"{"ok":true}"#);
    let entries = valkey.xrange(&stream_key("authed"));
    assert_eq!(entries.len(), 1);
    assert_eq!(entries[0].id, ack["message_id"].as_str().expect("id"));
}

#[test]
fn wrong_password_is_503_not_a_crash() {
    let valkey = ValkeyServer::start(ValkeyOpts {
        requirepass: Some("right-pw".into()),
        ..ValkeyOpts::default()
    });
    let relay = valkey.start_relay_unready(FAST_FAILING, &[("VALKEY_PASSWORD", "wrong-pw")]);
    assert_refuses_service(&relay);
    assert_eq!(
        valkey.cli_json(&["DBSIZE"]),
        json!(0),
        "something was written"
    );
}

#[test]
fn acl_user_with_valkey_username_works() {
    let valkey = ValkeyServer::start(ValkeyOpts {
        requirepass: Some("admin-pw".into()),
        ..ValkeyOpts::default()
    });
    valkey.cli(&[
        "ACL", "SETUSER", "relay", "on", ">relaypw", "~*", "&*", "+@all",
    ]);
    // The ACL user's password differs from `requirepass`: a relay that ignored the username
    // (plain `AUTH relaypw` for user `default`) would be refused.
    let relay = valkey.start_relay(
        "",
        &[("VALKEY_USERNAME", "relay"), ("VALKEY_PASSWORD", "relaypw")],
    );
    let ack = relay.publish("acl-topic", r#"{"user":"relay"}"#);
    let entries = valkey.xrange(&stream_key("acl-topic"));
    assert_eq!(entries.len(), 1);
    assert_eq!(entries[0].id, ack["message_id"].as_str().expect("id"));
    let clients = valkey.cli(&["CLIENT", "LIST"]);
    assert!(
        clients.lines().any(|l| l.contains(" user=relay ")),
        "no connection authenticated as `relay`:\n{clients}"
    );
}

/// Every append goes through the `pulsar` Function library, which each connection loads: an
/// ACL user that may not load it leaves the relay unready (never writing around it), and the
/// log names the library and the refusal.
#[test]
fn an_acl_user_that_cannot_load_the_function_library_keeps_the_relay_unready() {
    let valkey = ValkeyServer::start(ValkeyOpts {
        requirepass: Some("admin-pw".into()),
        ..ValkeyOpts::default()
    });
    valkey.cli(&[
        "ACL",
        "SETUSER",
        "relay",
        "on",
        ">relaypw",
        "~*",
        "&*",
        "+@all",
        "-function",
    ]);
    let relay = valkey.start_relay_unready(
        FAST_FAILING,
        &[("VALKEY_USERNAME", "relay"), ("VALKEY_PASSWORD", "relaypw")],
    );
    assert_refuses_service(&relay);
    assert_eq!(valkey.xlen(&stream_key("denied")), 0);
    let log = relay.stderr();
    assert!(
        log.contains("function library `pulsar`") && log.contains("NOPERM"),
        "the log does not say why:\n{log}"
    );
}

#[test]
fn tls_with_the_right_ca_works() {
    let valkey = ValkeyServer::start(ValkeyOpts {
        tls: true,
        ..ValkeyOpts::default()
    });
    let relay = valkey.start_relay("", &[]);
    let ack = relay.publish("over-tls", r#"{"secure":true}"#);
    let entries = valkey.xrange(&stream_key("over-tls"));
    assert_eq!(entries.len(), 1);
    assert_eq!(entries[0].id, ack["message_id"].as_str().expect("id"));
    let page = relay.read_topic("over-tls", "");
    assert_eq!(page["messages"][0]["payload"], json!({"secure": true}));
}

#[test]
fn tls_with_an_untrusted_ca_does_not_connect() {
    let valkey = ValkeyServer::start(ValkeyOpts {
        tls: true,
        ..ValkeyOpts::default()
    });
    let other = generate_ca(&valkey.scratch_dir().join("other"), "untrusted");
    let ca = other.cert.display().to_string();
    let relay = valkey.start_relay_unready(FAST_FAILING, &[("VALKEY_TLS_CA_FILE", &ca)]);
    assert_refuses_service(&relay);
    assert_eq!(
        valkey.cli_json(&["DBSIZE"]),
        json!(0),
        "something was written"
    );
}
