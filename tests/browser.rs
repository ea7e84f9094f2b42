//! A real browser against the relay: headless Chromium (Debian's `chromium`, driven by
//! playwright-core through `tests/browser/cross_origin.js`) loads a page from another origin
//! (`http://127.0.0.1:<another port>`), which opens the README's WebSocket and `EventSource`,
//! publishes with a cross-origin `fetch` (a preflight first) and tries a cross-site simple
//! POST (`no-cors`, `text/plain`). With the page's origin in `security.allowed_origins` the
//! socket, the stream and the publish work and the message reaches both; with a foreign origin
//! all three fail in the browser and the relay stores nothing. The simple POST never stores
//! anything.
//!
//! Needs node, chromium and playwright-core (`scripts/install-deps` installs them; CI runs
//! it): a missing one fails the test with what to install, never a skip.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

use common::valkey::free_port;
use common::Server;

const CHROMIUM: &str = "/usr/bin/chromium";

/// The `node_modules` holding playwright-core: `$PULSAR_BROWSER_DEPS` or the default prefix of
/// `scripts/install-deps`.
fn node_modules() -> PathBuf {
    let prefix = std::env::var_os("PULSAR_BROWSER_DEPS")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            let cache = std::env::var_os("XDG_CACHE_HOME")
                .map(PathBuf::from)
                .or_else(|| std::env::var_os("HOME").map(|h| Path::new(&h).join(".cache")))
                .expect("HOME or XDG_CACHE_HOME is set");
            cache.join("pulsar-relay/browser")
        });
    prefix.join("node_modules")
}

fn check_prerequisites() -> PathBuf {
    let fix = "run scripts/install-deps (as root): it installs Debian's chromium, node and \
               playwright-core";
    assert!(
        Path::new(CHROMIUM).is_file(),
        "{CHROMIUM} is missing: {fix}"
    );
    let node = Command::new("node").arg("--version").output();
    assert!(
        node.is_ok_and(|o| o.status.success()),
        "node is missing: {fix}"
    );
    let modules = node_modules();
    assert!(
        modules.join("playwright-core/package.json").is_file(),
        "playwright-core is missing from {}: {fix}",
        modules.display()
    );
    modules
}

/// Runs the page against `server` from `http://127.0.0.1:<page_port>`; what worked.
fn run_page(server: &Server, page_port: u16) -> Value {
    run_page_with(server, page_port, None)
}

/// [`run_page`] with an access token for the page to authenticate with.
fn run_page_with(server: &Server, page_port: u16, token: Option<&str>) -> Value {
    let modules = check_prerequisites();
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/browser/cross_origin.js");
    let relay = format!("http://{}", server.addr);
    let mut child = Command::new("node")
        .arg(&script)
        .arg(&relay)
        .arg(page_port.to_string())
        .arg(CHROMIUM)
        .args(token)
        .env("NODE_PATH", &modules)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run node");
    // The script gives up by itself after 60 s; this only guards against a hung node.
    let deadline = Instant::now() + Duration::from_secs(90);
    while child.try_wait().expect("wait for node").is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let out = child.wait_with_output().expect("node output");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "cross_origin.js failed ({}):\nstdout: {stdout}\nstderr: {}\nrelay stderr:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr),
        server.stderr()
    );
    serde_json::from_str(stdout.trim())
        .unwrap_or_else(|e| panic!("cross_origin.js printed no JSON ({e}): {stdout}"))
}

#[test]
fn a_page_on_an_allowed_origin_subscribes_streams_and_publishes() {
    let page_port = free_port();
    let page_origin = format!("http://127.0.0.1:{page_port}");
    let server = Server::start(&format!(
        "security:\n  allowed_origins: [\"{page_origin}\"]\n"
    ));
    let result = run_page(&server, page_port);
    assert_eq!(result["page_origin"], page_origin.as_str(), "{result}");
    assert_eq!(result["ws_subscribed"], true, "WebSocket: {result}");
    assert_eq!(result["es_open"], true, "EventSource: {result}");
    assert_eq!(result["publish_status"], 201, "fetch publish: {result}");
    assert_eq!(
        result["ws_payload"]["from"], "browser",
        "WebSocket delivery: {result}"
    );
    assert_eq!(
        result["es_payload"]["from"], "browser",
        "EventSource delivery: {result}"
    );
    assert_eq!(server.read_topic("browser", "")["total"], 1, "{result}");
    // The simple request was sent (the browser cannot see the answer) and refused: 415.
    assert_eq!(result["no_cors_sent"], true, "{result}");
    assert_eq!(
        server.get("/api/v1/topics/browser-no-cors").status,
        404,
        "{result}"
    );
}

#[test]
fn a_page_on_a_foreign_origin_gets_nothing_and_changes_nothing() {
    let page_port = free_port();
    let server = Server::start("security:\n  allowed_origins: [\"https://app.example\"]\n");
    let result = run_page(&server, page_port);
    assert_eq!(result["ws_subscribed"], false, "WebSocket: {result}");
    assert!(result["ws_error"].is_string(), "{result}");
    assert_eq!(result["es_open"], false, "EventSource: {result}");
    assert_eq!(result["es_error"], "closed", "EventSource: {result}");
    assert_eq!(
        result["publish_status"],
        Value::Null,
        "fetch publish: {result}"
    );
    assert!(
        result["publish_error"]
            .as_str()
            .is_some_and(|e| e.contains("Failed to fetch")),
        "{result}"
    );
    assert_eq!(result["no_cors_sent"], true, "{result}");
    // Nothing reached storage: neither the preflighted publish nor the simple one.
    let topics = server.get("/api/v1/topics").json();
    assert_eq!(topics["total"], 0, "{topics}");
    // The relay refused them itself, with 403s (the WebSocket upgrade before switching).
    let metrics = server.get("/metrics").text();
    for line in [
        "relay_http_requests_total{route=\"ws\",status=\"403\"} 1",
        "relay_http_requests_total{route=\"events\",status=\"403\"} 1",
        "relay_http_requests_total{route=\"cors_preflight\",status=\"403\"} 1",
        "relay_http_requests_total{route=\"publish\",status=\"403\"} 1",
    ] {
        assert!(metrics.contains(line), "{line} missing:\n{metrics}");
    }
}

/// Authentication on: the README's WebSocket and EventSource snippets as docs/auth.md writes
/// them for a token (the subprotocol pair; the `pulsar_token` cookie with `withCredentials`),
/// and a publish with `Authorization: Bearer`, from an allowed origin: all work. The same page
/// without a token gets nothing and stores nothing.
#[test]
fn a_page_with_a_token_subscribes_streams_and_publishes_and_without_one_gets_nothing() {
    let page_port = free_port();
    let page_origin = format!("http://127.0.0.1:{page_port}");
    let server = Server::start(&format!(
        "security:\n  allowed_origins: [\"{page_origin}\"]\nauth:\n  \
         jwt_secret: \"browser-test-secret-0123456789abcdef\"\n  \
         bootstrap_admin_username: admin\n  bootstrap_admin_password: admin-password\n"
    ));
    let login = server.connect().request_with(
        "POST",
        "/auth/login",
        &[("Content-Type", "application/x-www-form-urlencoded")],
        Some(b"username=admin&password=admin-password"),
    );
    assert_eq!(login.status, 200, "{login:?}");
    let token = login.json()["access_token"]
        .as_str()
        .expect("token")
        .to_owned();

    let result = run_page_with(&server, page_port, Some(&token));
    assert_eq!(result["ws_subscribed"], true, "WebSocket: {result}");
    assert_eq!(result["es_open"], true, "EventSource: {result}");
    assert_eq!(result["publish_status"], 201, "fetch publish: {result}");
    assert_eq!(result["ws_payload"]["from"], "browser", "{result}");
    assert_eq!(result["es_payload"]["from"], "browser", "{result}");

    let anonymous = run_page_with(&server, page_port, None);
    assert_eq!(anonymous["ws_subscribed"], false, "WebSocket: {anonymous}");
    assert_eq!(anonymous["es_open"], false, "EventSource: {anonymous}");
    assert_eq!(
        anonymous["publish_status"], 401,
        "fetch publish: {anonymous}"
    );
    // One message stored: the authenticated page's.
    let history = server.connect().request_with(
        "GET",
        "/api/v1/topics/browser/messages",
        &[("Authorization", &format!("Bearer {token}"))],
        None,
    );
    assert_eq!(history.json()["total"], 1, "{history:?}");
}
