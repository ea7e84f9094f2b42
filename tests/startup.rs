//! Start-up failures: the relay must exit with a message naming the cause, never hang.

mod common;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// Regression: with too little locked memory the executor thread died before binding and the
/// main thread waited forever for its address.
#[test]
fn locked_memory_too_small_exits_with_the_cause() {
    let binary = env!("CARGO_BIN_EXE_pulsar-relay");
    let mut child = Command::new("bash")
        .arg("-c")
        .arg(format!(
            "ulimit -l 0 && exec {binary} --listen 127.0.0.1:0 --shards 1"
        ))
        .env("LOG_LEVEL", "error")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn bash");
    let deadline = Instant::now() + Duration::from_secs(20);
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait") {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("the relay hung at start-up with `ulimit -l 0`");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let mut stderr = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().expect("stderr"), &mut stderr)
        .expect("read stderr");
    assert!(!status.success(), "exit status {status}");
    assert!(
        stderr.contains("ulimit -l"),
        "stderr did not name the cause: {stderr}"
    );
}

#[test]
fn invalid_config_value_names_key_and_value() {
    let output = Command::new(env!("CARGO_BIN_EXE_pulsar-relay"))
        .env("PULSAR_MAX_MESSAGES_PER_TOPIC", "lots")
        .output()
        .expect("run relay");
    assert_eq!(output.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("lots") && stderr.contains("max_messages_per_topic"),
        "{stderr}"
    );
}

/// Without authentication the relay refuses to listen beyond loopback (anyone reaching the
/// port could publish, read and delete every topic) unless told a proxy authenticates; with
/// the built-in tokens on it starts there.
#[test]
fn no_authentication_beyond_loopback_unless_said() {
    let refused = Command::new(env!("CARGO_BIN_EXE_pulsar-relay"))
        .args(["--listen", "0.0.0.0:0"])
        .output()
        .expect("run relay");
    assert_eq!(refused.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(
        stderr.contains("PULSAR_JWT_SECRET_KEY")
            && stderr.contains("PULSAR_ALLOW_UNAUTHENTICATED_NETWORK"),
        "{stderr}"
    );
    for env in [
        ("PULSAR_ALLOW_UNAUTHENTICATED_NETWORK", "true"),
        (
            "PULSAR_JWT_SECRET_KEY",
            "startup-test-secret-0123456789abcdef",
        ),
    ] {
        let server = common::Server::start_opts(common::RelayOpts {
            listen: Some("0.0.0.0:0".parse().expect("literal")),
            ..common::RelayOpts::new("").env(env.0, env.1)
        });
        assert_eq!(server.connect().request("GET", "/health", None).status, 200);
    }
}
