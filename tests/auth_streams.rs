//! Open streams and their tokens: a WebSocket closes with 4001 when its token expires unless
//! refreshed in band (`{"type":"auth"}`, same user only), an event stream ends with a
//! `TOKEN_EXPIRED` event, and an admin's disconnect refuses the user's tokens at once and
//! closes its open streams (4003) at their next check.

mod common;

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde_json::{json, Value};

use common::sse::{SseClient, SseItem, SseRead};
use common::ws::{WsClient, WsEvent};
use common::Server;
use pulsar_relay::auth::token::Signer;

const SECRET: &str = "stream-test-secret-0123456789abcdef";
const TTL: Duration = Duration::from_secs(600);

fn start() -> Server {
    Server::start_with_shards(
        &format!(
            "auth:\n  jwt_secret: \"{SECRET}\"\n  bootstrap_admin_username: admin\n  \
             bootstrap_admin_password: admin-password\n"
        ),
        2,
    )
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock")
        .as_secs()
}

fn login(relay: &Server) -> (String, String) {
    let resp = relay.connect().request_with(
        "POST",
        "/auth/login",
        &[("Content-Type", "application/x-www-form-urlencoded")],
        Some(b"username=admin&password=admin-password"),
    );
    assert_eq!(resp.status, 200, "{resp:?}");
    let token = resp.json()["access_token"]
        .as_str()
        .expect("token")
        .to_owned();
    let me = call(relay, &token, "GET", "/auth/me", None).json();
    (token, me["user_id"].as_str().expect("id").to_owned())
}

fn call(
    relay: &Server,
    token: &str,
    method: &str,
    path: &str,
    body: Option<&str>,
) -> common::Response {
    relay.connect().request_with(
        method,
        path,
        &[("Authorization", &format!("Bearer {token}"))],
        body.map(str::as_bytes),
    )
}

/// A valid admin token that expires `secs` from now (and its expiry).
fn expiring_token(user_id: &str, secs: u64) -> (String, u64) {
    let signer = Signer::new(SECRET.as_bytes(), TTL).expect("key");
    let issued_at = now() + secs - TTL.as_secs();
    let token = signer.issue_at(user_id, "admin", vec![], issued_at).token;
    (token, issued_at + TTL.as_secs())
}

fn ws_with(relay: &Server, token: &str) -> WsClient {
    let pair = format!("bearer.{token}");
    WsClient::connect_with(relay.addr, &["bearer", &pair], None)
}

fn publish(relay: &Server, token: &str, n: u32) -> String {
    let body = json!({"topic": "t", "payload": {"n": n}}).to_string();
    let resp = call(relay, token, "POST", "/api/v1/messages", Some(&body));
    assert_eq!(resp.status, 201, "{resp:?}");
    resp.json()["message_id"].as_str().expect("id").to_owned()
}

/// Waits (polling the clock, not sleeping a guess) until Unix second `t` has passed.
fn until_past(t: u64) {
    while now() <= t {
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn a_websocket_closes_with_4001_when_its_token_expires() {
    let relay = start();
    let (token, user_id) = login(&relay);
    let (short, expires) = expiring_token(&user_id, 3);
    let mut ws = ws_with(&relay, &short);
    ws.subscribe(&["t"], None);
    let id = publish(&relay, &token, 1);
    assert_eq!(ws.recv_type("message")["message_id"], id.as_str());
    let (code, reason) = ws.expect_close(Duration::from_secs(10), 4);
    assert_eq!((code, reason.as_str()), (4001, "token expired"));
    assert!(now() >= expires, "closed before the token expired");
}

#[test]
fn an_in_band_refresh_keeps_a_websocket_past_its_first_token() {
    let relay = start();
    let (token, user_id) = login(&relay);
    let (short, expires) = expiring_token(&user_id, 3);
    let mut ws = ws_with(&relay, &short);
    ws.subscribe(&["t"], None);
    // Another user's token or garbage is refused, and the session keeps its own.
    ws.send_json(&json!({"type": "auth", "token": "garbage"}));
    let refused = ws.recv_type("error");
    assert_eq!(refused["code"], "AUTH_FAILED", "{refused}");
    ws.send_json(&json!({"type": "auth", "token": token}));
    let taken = ws.recv_type("auth");
    assert!(taken["expires_at"].as_str().is_some(), "{taken}");
    until_past(expires + 1);
    let id = publish(&relay, &token, 2);
    match ws.next_event(Duration::from_secs(5)) {
        WsEvent::Json(frame) => assert_eq!(frame["message_id"], id.as_str(), "{frame}"),
        other => panic!("the refreshed session ended or stalled: {other:?}"),
    }
}

#[test]
fn an_event_stream_ends_with_token_expired() {
    let relay = start();
    let (token, user_id) = login(&relay);
    let (short, _) = expiring_token(&user_id, 3);
    let cookie = format!("pulsar_token={short}");
    let mut sse = SseClient::open_ok(
        relay.addr,
        "/api/v1/topics/t/events",
        &[("Cookie", &cookie)],
    );
    let id = publish(&relay, &token, 1);
    assert_eq!(sse.next_message()["message_id"], id.as_str());
    let mut last: Option<Value> = None;
    loop {
        match sse.next_item(Duration::from_secs(10)) {
            SseRead::Item(SseItem::Event {
                event: Some(event),
                data,
                ..
            }) if event == "error" => {
                last = Some(serde_json::from_str(&data).expect("json"));
            }
            SseRead::Item(_) => {}
            SseRead::Eof => break,
            SseRead::Timeout => panic!("the stream outlived its token"),
        }
    }
    assert_eq!(
        last.expect("an error event before the end")["code"],
        "TOKEN_EXPIRED"
    );
}

#[test]
fn an_admin_disconnect_refuses_the_users_tokens_and_closes_its_streams() {
    let relay = start();
    let (admin, _) = login(&relay);
    let body =
        json!({"username": "dave", "password": "dave-password", "permissions": ["read", "write"]});
    let created = call(
        &relay,
        &admin,
        "POST",
        "/auth/register",
        Some(&body.to_string()),
    );
    let dave_id = created.json()["user_id"].as_str().expect("id").to_owned();
    let resp = relay.connect().request_with(
        "POST",
        "/auth/login",
        &[("Content-Type", "application/x-www-form-urlencoded")],
        Some(b"username=dave&password=dave-password"),
    );
    let dave = resp.json()["access_token"]
        .as_str()
        .expect("token")
        .to_owned();
    let mut ws = ws_with(&relay, &dave);
    ws.subscribe(&["t"], None);
    let off = call(
        &relay,
        &admin,
        "POST",
        &format!("/auth/users/{dave_id}/disconnect"),
        None,
    );
    assert_eq!(off.status, 204, "{off:?}");
    assert_eq!(call(&relay, &dave, "GET", "/auth/me", None).status, 401);
    let (code, _) = ws.expect_close(Duration::from_secs(20), 4);
    assert_eq!(code, 4003);
    let unknown = call(
        &relay,
        &admin,
        "POST",
        "/auth/users/nobody/disconnect",
        None,
    );
    assert_eq!(unknown.status, 404);
}
