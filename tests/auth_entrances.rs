//! Every entrance checks the principal, over real sockets: publish, bulk, history, topic
//! stats, listing, trim, delete, both long-polls, SSE, the WebSocket handshake, the admin
//! endpoints. Each refuses a missing, malformed, foreign-signed, expired or logged-out token
//! (401 with `WWW-Authenticate: Bearer`, before any upgrade) and a principal without the
//! permission (403); topics are private to their owner's namespace; the WebSocket subprotocol
//! pair and the `EventSource` cookie carry tokens; a deactivation or logout applies to the next
//! request on every shard, and one written into Valkey by another writer (the Python relay)
//! within a second; concurrent refreshes of one token never leave a live successor (memory
//! and Valkey).

mod common;

use std::sync::{Arc, Barrier};
use std::time::Duration;

use serde_json::{json, Value};

use common::sse::SseClient;
use common::valkey::{ValkeyOpts, ValkeyServer};
use common::ws::WsClient;
use common::{Conn, RelayOpts, Response, Server};
use pulsar_relay::auth::token::Signer;

const SECRET: &str = "entrance-test-secret-0123456789abcdef";
const ADMIN_PASSWORD: &str = "admin-password";

fn auth_yaml() -> String {
    format!(
        "auth:\n  jwt_secret: \"{SECRET}\"\n  bootstrap_admin_username: admin\n  \
         bootstrap_admin_password: {ADMIN_PASSWORD}\n"
    )
}

fn start() -> Server {
    Server::start_with_shards(&auth_yaml(), 2)
}

fn login(relay: &Server, user: &str, password: &str) -> Value {
    let body = format!("username={user}&password={password}");
    let resp = relay.connect().request_with(
        "POST",
        "/auth/login",
        &[("Content-Type", "application/x-www-form-urlencoded")],
        Some(body.as_bytes()),
    );
    assert_eq!(resp.status, 200, "login {user}: {resp:?}");
    resp.json()
}

fn token(relay: &Server, user: &str, password: &str) -> String {
    login(relay, user, password)["access_token"]
        .as_str()
        .expect("access_token")
        .to_owned()
}

fn call(
    relay: &Server,
    token: Option<&str>,
    method: &str,
    path: &str,
    body: Option<&str>,
) -> Response {
    let bearer = token.map(|t| format!("Bearer {t}"));
    let headers: Vec<(&str, &str)> = bearer
        .as_deref()
        .map(|b| vec![("Authorization", b)])
        .unwrap_or_default();
    relay
        .connect()
        .request_with(method, path, &headers, body.map(str::as_bytes))
}

/// Registers `user` with `permissions` (as admin); returns its user id.
fn register(relay: &Server, admin: &str, user: &str, permissions: &[&str]) -> String {
    let body = json!({"username": user, "password": format!("{user}-password"), "permissions": permissions});
    let resp = call(
        relay,
        Some(admin),
        "POST",
        "/auth/register",
        Some(&body.to_string()),
    );
    assert_eq!(resp.status, 201, "{resp:?}");
    resp.json()["user_id"].as_str().expect("user_id").to_owned()
}

/// Every entrance that acts for someone, as (method, path, body).
fn entrances() -> Vec<(&'static str, String, Option<String>)> {
    let publish = r#"{"topic":"t","payload":{"a":1}}"#.to_owned();
    vec![
        ("POST", "/api/v1/messages".into(), Some(publish)),
        (
            "POST",
            "/api/v1/messages/bulk".into(),
            Some(r#"{"messages":[{"topic":"t","payload":{}}]}"#.into()),
        ),
        ("GET", "/api/v1/topics".into(), None),
        (
            "POST",
            "/api/v1/topics".into(),
            Some(r#"{"topic_name":"t"}"#.into()),
        ),
        ("GET", "/api/v1/topics/t".into(), None),
        ("GET", "/api/v1/topics/t/messages".into(), None),
        (
            "POST",
            "/api/v1/topics/t/trim".into(),
            Some(r#"{"keep_count":0}"#.into()),
        ),
        ("DELETE", "/api/v1/topics/t".into(), None),
        (
            "POST",
            "/messages/poll".into(),
            Some(r#"{"topics":["t"],"timeout":1}"#.into()),
        ),
        ("GET", "/api/v1/poll?topics=t&timeout=1".into(), None),
        ("GET", "/api/v1/events?topics=t".into(), None),
        ("GET", "/api/v1/topics/t/events".into(), None),
        ("GET", "/api/v1/topics/t/groups".into(), None),
        (
            "POST",
            "/api/v1/topics/t/groups".into(),
            Some(r#"{"group":"g"}"#.into()),
        ),
        ("GET", "/api/v1/topics/t/groups/g".into(), None),
        ("DELETE", "/api/v1/topics/t/groups/g".into(), None),
        (
            "POST",
            "/api/v1/topics/t/groups/g/reset".into(),
            Some(r#"{"to":"last"}"#.into()),
        ),
        (
            "POST",
            "/api/v1/topics/t/groups/g/poll".into(),
            Some(r#"{"consumer":"c"}"#.into()),
        ),
        (
            "POST",
            "/api/v1/topics/t/groups/g/ack".into(),
            Some(r#"{"ids":["1-0"]}"#.into()),
        ),
        (
            "POST",
            "/api/v1/topics/t/groups/g/nack".into(),
            Some(r#"{"ids":["1-0"]}"#.into()),
        ),
        ("GET", "/api/v1/stats".into(), None),
        ("GET", "/messages/poll/stats".into(), None),
        ("GET", "/auth/me".into(), None),
        ("GET", "/auth/sessions".into(), None),
        ("POST", "/auth/logout".into(), None),
        ("GET", "/auth/users".into(), None),
        (
            "POST",
            "/auth/register".into(),
            Some(r#"{"username":"x","password":"y"}"#.into()),
        ),
    ]
}

fn assert_unauthenticated(resp: &Response, what: &str) {
    assert_eq!(resp.status, 401, "{what}: {resp:?}");
    assert_eq!(resp.header("www-authenticate"), Some("Bearer"), "{what}");
    assert_eq!(resp.json()["error"], "UNAUTHORIZED", "{what}");
}

#[test]
fn every_entrance_refuses_a_missing_malformed_foreign_or_expired_token() {
    let relay = start();
    let admin = token(&relay, "admin", ADMIN_PASSWORD);
    let claims = Signer::new(SECRET.as_bytes(), Duration::from_secs(600)).expect("key");
    let me = call(&relay, Some(&admin), "GET", "/auth/me", None).json();
    let admin_id = me["user_id"].as_str().expect("id");
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_secs();
    // Expired one second ago; valid in every other respect.
    let expired = claims.issue_at(admin_id, "admin", vec![], now - 601).token;
    let foreign = Signer::new(
        b"another-secret-0123456789abcdef-0123",
        Duration::from_secs(600),
    )
    .expect("key")
    .issue(admin_id, "admin", vec![])
    .token;
    // An intact token whose signature is cut.
    let truncated = admin[..admin.len() - 4].to_owned();
    let bad_tokens: [(&str, Option<&str>); 5] = [
        ("none", None),
        ("garbage", Some("not-a-token")),
        ("expired", Some(&expired)),
        ("foreign", Some(&foreign)),
        ("truncated", Some(&truncated)),
    ];
    for (method, path, body) in entrances() {
        for (label, bad) in bad_tokens {
            let resp = call(&relay, bad, method, &path, body.as_deref());
            assert_unauthenticated(&resp, &format!("{method} {path} with {label} token"));
        }
    }
    // The WebSocket: refused before the upgrade, by header or subprotocol pair.
    for (label, bad) in bad_tokens {
        let pair = bad.map(|t| format!("bearer.{t}"));
        let protocols: Vec<&str> = match &pair {
            Some(p) => vec!["bearer", p],
            None => vec![],
        };
        let refused = WsClient::try_connect_headers(relay.addr, &protocols, &[], None);
        let error = refused
            .err()
            .unwrap_or_else(|| panic!("ws with {label} token upgraded"));
        assert!(error.contains("401"), "ws with {label} token: {error}");
    }
    // Nothing reached a topic.
    let list = call(&relay, Some(&admin), "GET", "/api/v1/topics", None);
    assert_eq!(list.json()["total"], 0, "{list:?}");
    // Health, readiness and metrics need no token.
    for path in ["/health", "/ready", "/metrics"] {
        assert_eq!(call(&relay, None, "GET", path, None).status, 200, "{path}");
    }
    // Every refusal is counted by reason.
    let metrics = call(&relay, None, "GET", "/metrics", None).text();
    let count = |reason: &str| -> u64 {
        let prefix = format!("relay_auth_failures_total{{reason=\"{reason}\"}} ");
        metrics
            .lines()
            .find_map(|l| l.strip_prefix(prefix.as_str()))
            .and_then(|n| n.parse().ok())
            .unwrap_or(0)
    };
    let entrances = entrances().len() as u64;
    assert!(count("missing") > entrances, "{metrics}");
    assert!(count("invalid") >= 4 * (entrances + 1), "{metrics}");
}

#[test]
fn each_entrance_needs_its_permission() {
    let relay = start();
    let admin = token(&relay, "admin", ADMIN_PASSWORD);
    register(&relay, &admin, "writer", &["write"]);
    register(&relay, &admin, "reader", &["read"]);
    let writer = token(&relay, "writer", "writer-password");
    let reader = token(&relay, "reader", "reader-password");
    let forbidden = |token: &str, method: &str, path: &str, body: Option<&str>| {
        let resp = call(&relay, Some(token), method, path, body);
        assert_eq!(resp.status, 403, "{method} {path}: {resp:?}");
        assert_eq!(resp.json()["error"], "FORBIDDEN");
    };
    // Publishing needs `write`.
    forbidden(
        &reader,
        "POST",
        "/api/v1/messages",
        Some(r#"{"topic":"t","payload":1}"#),
    );
    forbidden(
        &reader,
        "POST",
        "/api/v1/messages/bulk",
        Some(r#"{"messages":[]}"#),
    );
    forbidden(
        &reader,
        "POST",
        "/api/v1/topics",
        Some(r#"{"topic_name":"t"}"#),
    );
    forbidden(
        &reader,
        "POST",
        "/api/v1/topics/t/trim",
        Some(r#"{"keep_count":0}"#),
    );
    forbidden(&reader, "DELETE", "/api/v1/topics/t", None);
    // Managing consumer groups needs `write`; consuming them needs `read`.
    forbidden(
        &reader,
        "POST",
        "/api/v1/topics/t/groups",
        Some(r#"{"group":"g"}"#),
    );
    forbidden(&reader, "DELETE", "/api/v1/topics/t/groups/g", None);
    forbidden(
        &reader,
        "POST",
        "/api/v1/topics/t/groups/g/reset",
        Some(r#"{"to":"last"}"#),
    );
    for (method, path, body) in [
        ("GET", "/api/v1/topics/t/groups", None),
        ("GET", "/api/v1/topics/t/groups/g", None),
        (
            "POST",
            "/api/v1/topics/t/groups/g/poll",
            Some(r#"{"consumer":"c"}"#),
        ),
        (
            "POST",
            "/api/v1/topics/t/groups/g/ack",
            Some(r#"{"ids":[]}"#),
        ),
        (
            "POST",
            "/api/v1/topics/t/groups/g/nack",
            Some(r#"{"ids":[]}"#),
        ),
    ] {
        forbidden(&writer, method, path, body);
    }
    // Reading needs `read`.
    forbidden(&writer, "GET", "/api/v1/topics/t/messages", None);
    forbidden(
        &writer,
        "POST",
        "/messages/poll",
        Some(r#"{"topics":["t"],"timeout":1}"#),
    );
    forbidden(&writer, "GET", "/api/v1/poll?topics=t&timeout=1", None);
    forbidden(&writer, "GET", "/api/v1/topics/t/events", None);
    let ws = WsClient::try_connect_headers(
        relay.addr,
        &[],
        &[("Authorization", &format!("Bearer {writer}"))],
        None,
    );
    assert!(
        ws.err().is_some_and(|e| e.contains("403")),
        "ws without read"
    );
    // Operating the relay and its users needs `admin`.
    for (method, path) in [
        ("GET", "/api/v1/stats"),
        ("GET", "/messages/poll/stats"),
        ("GET", "/auth/users"),
        ("GET", "/auth/users/stats"),
    ] {
        forbidden(&writer, method, path, None);
    }
    forbidden(
        &writer,
        "POST",
        "/auth/register",
        Some(r#"{"username":"zed","password":"12345678"}"#),
    );
    // With the permission, the same calls pass.
    let published = call(
        &relay,
        Some(&writer),
        "POST",
        "/api/v1/messages",
        Some(r#"{"topic":"t","payload":1}"#),
    );
    assert_eq!(published.status, 201, "{published:?}");
    let created = call(
        &relay,
        Some(&writer),
        "POST",
        "/api/v1/topics/t/groups",
        Some(r#"{"group":"g","start":"earliest"}"#),
    );
    assert_eq!(created.status, 201, "{created:?}");
    let polled = call(
        &relay,
        Some(&reader),
        "POST",
        "/api/v1/topics/t/groups/g/poll",
        Some(r#"{"consumer":"c"}"#),
    );
    // The reader's own namespace holds no such group: the writer's `t` is another topic.
    assert_eq!(polled.status, 404, "{polled:?}");
    for path in [
        "/api/v1/stats",
        "/messages/poll/stats",
        "/auth/users",
        "/auth/users/stats",
    ] {
        assert_eq!(
            call(&relay, Some(&admin), "GET", path, None).status,
            200,
            "{path}"
        );
    }
}

#[test]
fn topics_live_in_their_owners_namespace() {
    let relay = start();
    let admin = token(&relay, "admin", ADMIN_PASSWORD);
    let alice_id = register(&relay, &admin, "alice", &["read", "write"]);
    register(&relay, &admin, "bob", &["read", "write"]);
    let alice = token(&relay, "alice", "alice-password");
    let bob = token(&relay, "bob", "bob-password");

    // Bob follows his `orders` by WebSocket (subprotocol pair) and SSE (cookie) before anyone
    // publishes.
    let pair = format!("bearer.{bob}");
    let mut bob_ws = WsClient::connect_with(relay.addr, &["bearer", &pair], None);
    assert_eq!(
        bob_ws.protocol.as_deref(),
        Some("bearer"),
        "the server selects `bearer`"
    );
    bob_ws.subscribe(&["orders"], None);
    let cookie = format!("pulsar_token={bob}");
    let mut bob_sse = SseClient::open_ok(
        relay.addr,
        "/api/v1/topics/orders/events",
        &[("Cookie", &cookie)],
    );

    let a = call(
        &relay,
        Some(&alice),
        "POST",
        "/api/v1/messages",
        Some(r#"{"topic":"orders","payload":{"by":"alice"}}"#),
    );
    assert_eq!(a.status, 201, "{a:?}");
    assert_eq!(a.json()["topic"], "orders");
    let b = call(
        &relay,
        Some(&bob),
        "POST",
        "/api/v1/messages",
        Some(r#"{"topic":"orders","payload":{"by":"bob"}}"#),
    );
    let b_id = b.json()["message_id"].as_str().expect("id").to_owned();

    // Bob's consumers get Bob's message only, named as he named the topic.
    let frame = bob_ws.recv_type("message");
    assert_eq!(
        (frame["message_id"].as_str(), frame["topic"].as_str()),
        (Some(b_id.as_str()), Some("orders"))
    );
    assert_eq!(frame["payload"]["by"], "bob");
    let event = bob_sse.next_message();
    assert_eq!(event["message_id"], b_id.as_str());
    assert_eq!(event["topic"], "orders");

    // Histories, stats and listings are per owner.
    let history = |token: &str, query: &str| {
        call(
            &relay,
            Some(token),
            "GET",
            &format!("/api/v1/topics/orders/messages?order=asc{query}"),
            None,
        )
    };
    let by = |resp: Response| -> Vec<String> {
        assert_eq!(resp.status, 200, "{resp:?}");
        resp.json()["messages"]
            .as_array()
            .expect("messages")
            .iter()
            .map(|m| m["payload"]["by"].as_str().expect("by").to_owned())
            .collect()
    };
    assert_eq!(by(history(&alice, "")), ["alice"]);
    assert_eq!(by(history(&bob, "")), ["bob"]);
    let stats = call(&relay, Some(&alice), "GET", "/api/v1/topics/orders", None).json();
    assert_eq!(stats["owner_id"], alice_id.as_str());
    assert_eq!(stats["topic"], "orders");
    let listed = call(&relay, Some(&bob), "GET", "/api/v1/topics", None).json();
    assert_eq!(listed["total"], 1, "{listed}");
    // Alice may not reach Bob's namespace; an admin may, with `?owner=`.
    let denied = history(&bob, &format!("&owner={alice_id}"));
    assert_eq!(denied.status, 403, "{denied:?}");
    assert_eq!(
        by(history(&admin, &format!("&owner={alice_id}"))),
        ["alice"]
    );
    // A topic another user has is no conflict: Bob creates his own `invoices`, Alice too.
    for who in [&alice, &bob] {
        let created = call(
            &relay,
            Some(who),
            "POST",
            "/api/v1/topics",
            Some(r#"{"topic_name":"invoices"}"#),
        );
        assert_eq!(created.status, 201, "{created:?}");
        let again = call(
            &relay,
            Some(who),
            "POST",
            "/api/v1/topics",
            Some(r#"{"topic_name":"invoices"}"#),
        );
        assert_eq!(again.status, 409, "{again:?}");
    }
    // An invalid name is 422, never 400 (the Python client takes 400 for "exists").
    let invalid = call(
        &relay,
        Some(&bob),
        "POST",
        "/api/v1/topics",
        Some(r#"{"topic_name":"a/b"}"#),
    );
    assert_eq!(invalid.status, 422, "{invalid:?}");
}

#[test]
fn logout_deactivation_and_deletion_apply_to_the_next_request_on_every_shard() {
    let relay = start();
    let admin = token(&relay, "admin", ADMIN_PASSWORD);
    let carol_id = register(&relay, &admin, "carol", &["read", "write"]);
    let carol = token(&relay, "carol", "carol-password");
    // Enough connections that both shards cache Carol's record.
    let me_on_many = |token: &str| -> Vec<u16> {
        (0..8)
            .map(|_| call(&relay, Some(token), "GET", "/auth/me", None).status)
            .collect()
    };
    assert!(me_on_many(&carol).iter().all(|s| *s == 200));
    let patch = call(
        &relay,
        Some(&admin),
        "PATCH",
        &format!("/auth/users/{carol_id}"),
        Some(r#"{"is_active":false}"#),
    );
    assert_eq!(patch.status, 200, "{patch:?}");
    assert!(
        me_on_many(&carol).iter().all(|s| *s == 403),
        "inactive on every shard"
    );
    let patch = call(
        &relay,
        Some(&admin),
        "PATCH",
        &format!("/auth/users/{carol_id}"),
        Some(r#"{"is_active":true}"#),
    );
    assert_eq!(patch.status, 200);
    assert!(me_on_many(&carol).iter().all(|s| *s == 200));
    // An explicit null is refused, not stored.
    let null = call(
        &relay,
        Some(&admin),
        "PATCH",
        &format!("/auth/users/{carol_id}"),
        Some(r#"{"permissions":null}"#),
    );
    assert_eq!(null.status, 422, "{null:?}");

    let logout = call(&relay, Some(&carol), "POST", "/auth/logout", None);
    assert_eq!(logout.status, 204);
    for _ in 0..8 {
        let resp = call(&relay, Some(&carol), "GET", "/auth/me", None);
        assert_unauthenticated(&resp, "after logout");
        assert_eq!(resp.json()["message"], "Token has been revoked");
    }
    let fresh = token(&relay, "carol", "carol-password");
    let deleted = call(
        &relay,
        Some(&admin),
        "DELETE",
        &format!("/auth/users/{carol_id}"),
        None,
    );
    assert_eq!(deleted.status, 204);
    for _ in 0..8 {
        assert_unauthenticated(
            &call(&relay, Some(&fresh), "GET", "/auth/me", None),
            "deleted",
        );
    }
    // An admin cannot lock themselves out.
    let me = call(&relay, Some(&admin), "GET", "/auth/me", None).json();
    let own = format!("/auth/users/{}", me["user_id"].as_str().expect("id"));
    assert_eq!(call(&relay, Some(&admin), "DELETE", &own, None).status, 400);
    assert_eq!(
        call(
            &relay,
            Some(&admin),
            "PATCH",
            &own,
            Some(r#"{"permissions":["read"]}"#)
        )
        .status,
        400
    );
}

#[test]
fn login_and_refresh_answer_as_the_python_relay() {
    let relay = start();
    let wrong = relay.connect().request_with(
        "POST",
        "/auth/login",
        &[("Content-Type", "application/x-www-form-urlencoded")],
        Some(b"username=admin&password=nope"),
    );
    assert_unauthenticated(&wrong, "wrong password");
    assert_eq!(wrong.json()["detail"], "Incorrect username or password");
    let unknown = relay.connect().request_with(
        "POST",
        "/auth/login",
        &[("Content-Type", "application/x-www-form-urlencoded")],
        Some(b"username=nobody&password=nope"),
    );
    assert_eq!(unknown.json()["detail"], "Incorrect username or password");
    let json_body = relay.connect().request(
        "POST",
        "/auth/login",
        Some(br#"{"username":"admin","password":"admin-password"}"#),
    );
    assert_eq!(
        json_body.status, 422,
        "a JSON login is not a form: {json_body:?}"
    );

    let tokens = login(&relay, "admin", ADMIN_PASSWORD);
    assert_eq!(tokens["token_type"], "bearer");
    assert_eq!(tokens["expires_in"], 600);
    assert!(tokens
        .get("refresh_token_secondary")
        .is_some_and(Value::is_null));
    // Revoking answers 204 whatever the token (no oracle), 400 only when malformed.
    let revoke = |body: &str| {
        relay
            .connect()
            .request("POST", "/auth/token/revoke", Some(body.as_bytes()))
            .status
    };
    assert_eq!(revoke(r#"{"refresh_token":"unknown.secret"}"#), 204);
    assert_eq!(revoke(r#"{"refresh_token":"nodot"}"#), 400);
}

/// Eight concurrent refreshes of one token, round after round: at most one wins (and a
/// loser, being a replay, revokes the winner's chain); never a live successor left behind.
/// Found a race in the first version: a replay that read the chain between the winner's
/// rotation and its storing of the child missed the child.
fn concurrent_refreshes_leave_no_live_successor(relay: &Server) {
    for round in 0..10 {
        let tokens = login(relay, "admin", ADMIN_PASSWORD);
        let refresh = tokens["refresh_token"]
            .as_str()
            .expect("refresh")
            .to_owned();
        let barrier = Arc::new(Barrier::new(8));
        let results: Vec<(u16, Option<String>)> = std::thread::scope(|s| {
            let handles: Vec<_> = (0..8)
                .map(|_| {
                    let barrier = barrier.clone();
                    let refresh = refresh.clone();
                    s.spawn(move || {
                        let mut conn: Conn = relay.connect();
                        let body = json!({ "refresh_token": refresh }).to_string();
                        barrier.wait();
                        let resp =
                            conn.request("POST", "/auth/token/refresh", Some(body.as_bytes()));
                        let next = (resp.status == 200)
                            .then(|| resp.json()["refresh_token"].as_str().map(str::to_owned))
                            .flatten();
                        (resp.status, next)
                    })
                })
                .collect();
            handles
                .into_iter()
                .map(|h| h.join().expect("thread"))
                .collect()
        });
        let winners: Vec<&String> = results
            .iter()
            .filter_map(|(_, next)| next.as_ref())
            .collect();
        assert!(
            winners.len() <= 1,
            "round {round}: two refreshes won: {results:?}"
        );
        assert!(
            results.iter().all(|(s, _)| *s == 200 || *s == 401),
            "{results:?}"
        );
        for next in winners {
            let body = json!({ "refresh_token": next }).to_string();
            let resp =
                relay
                    .connect()
                    .request("POST", "/auth/token/refresh", Some(body.as_bytes()));
            assert_unauthenticated(&resp, &format!("round {round}: the winner's token"));
        }
    }
}

#[test]
fn concurrent_refreshes_of_one_token_leave_no_live_successor_in_memory() {
    concurrent_refreshes_leave_no_live_successor(&start());
}

#[test]
fn concurrent_refreshes_of_one_token_leave_no_live_successor_in_valkey() {
    let valkey = ValkeyServer::start(ValkeyOpts::default());
    let relay = valkey.start_relay(&auth_yaml(), &[]);
    concurrent_refreshes_leave_no_live_successor(&relay);
}

/// The principal's bucket, checked once authentication names it: the burst passes, the next
/// request is 429 with `Retry-After`, from an address the address bucket exempts (loopback),
/// and another user's bucket is untouched.
#[test]
fn each_principal_has_its_own_rate_limit() {
    let relay = Server::start_with_shards(
        &format!(
            "{}rate_limit:\n  principal_rate: 1/min\n  principal_burst: 5\n",
            auth_yaml()
        ),
        1,
    );
    let admin = token(&relay, "admin", ADMIN_PASSWORD);
    register(&relay, &admin, "erin", &["read"]);
    let erin = token(&relay, "erin", "erin-password");
    // Erin has five; the admin, who registered her, has its own.
    let statuses: Vec<u16> = (0..6)
        .map(|_| call(&relay, Some(&erin), "GET", "/auth/me", None).status)
        .collect();
    assert_eq!(statuses, [200, 200, 200, 200, 200, 429], "{statuses:?}");
    let limited = call(&relay, Some(&erin), "GET", "/auth/me", None);
    assert_eq!(limited.status, 429);
    assert_eq!(limited.json()["error"], "RATE_LIMITED");
    let wait: u64 = limited
        .header("retry-after")
        .and_then(|s| s.parse().ok())
        .expect("Retry-After in seconds");
    assert!((1..=60).contains(&wait), "{wait}");
    assert_eq!(
        call(&relay, Some(&admin), "GET", "/auth/me", None).status,
        200
    );
}

/// Two relays on one Valkey share users and tokens: a token issued by one works on the other,
/// a refresh token issued by one rotates on the other, and a logout or a deactivation made
/// through one is refused by the other once its cache sees the change (it reads the
/// generation at most once a second).
#[test]
fn two_relays_on_one_valkey_share_users_tokens_and_revocations() {
    let valkey = ValkeyServer::start(ValkeyOpts::default());
    let a = valkey.start_relay(&auth_yaml(), &[]);
    let b = valkey.start_relay(&auth_yaml(), &[]);
    let admin = token(&a, "admin", ADMIN_PASSWORD);
    let frank_id = register(&a, &admin, "frank", &["read", "write"]);
    let tokens = login(&a, "frank", "frank-password");
    let frank = tokens["access_token"].as_str().expect("token").to_owned();
    // B has seen Frank's token and cached him as active before anything changes.
    assert_eq!(call(&b, Some(&frank), "GET", "/auth/me", None).status, 200);
    let body = json!({ "refresh_token": tokens["refresh_token"] }).to_string();
    let rotated = b
        .connect()
        .request("POST", "/auth/token/refresh", Some(body.as_bytes()));
    assert_eq!(rotated.status, 200, "A's refresh token on B: {rotated:?}");

    let patch = call(
        &a,
        Some(&admin),
        "PATCH",
        &format!("/auth/users/{frank_id}"),
        Some(r#"{"is_active":false}"#),
    );
    assert_eq!(patch.status, 200);
    assert!(
        common::eventually(Duration::from_secs(5), || {
            call(&b, Some(&frank), "GET", "/auth/me", None).status == 403
        }),
        "B still serves a user A deactivated"
    );
    let patch = call(
        &a,
        Some(&admin),
        "PATCH",
        &format!("/auth/users/{frank_id}"),
        Some(r#"{"is_active":true}"#),
    );
    assert_eq!(patch.status, 200);
    assert!(common::eventually(Duration::from_secs(5), || {
        call(&b, Some(&frank), "GET", "/auth/me", None).status == 200
    }));
    assert_eq!(
        call(&a, Some(&frank), "POST", "/auth/logout", None).status,
        204
    );
    assert!(
        common::eventually(Duration::from_secs(5), || {
            call(&b, Some(&frank), "GET", "/auth/me", None).status == 401
        }),
        "B still accepts a token logged out on A"
    );
}

/// A Valkey outage does not lock out clients whose token a shard already verified (for up to
/// 30 s since the state was last read); a token no shard has seen needs the state and gets
/// 503; once Valkey is back, everything works again.
#[test]
fn a_valkey_outage_keeps_verified_tokens_working_and_refuses_unseen_ones_with_503() {
    let mut valkey = ValkeyServer::start(ValkeyOpts::default());
    // Short Valkey timeouts: the unseen token's 503 comes after a command timeout, which must
    // stay well inside the test client's 10 s read timeout on a loaded machine (with the 5 s
    // default it once took longer: "Interrupted handshake (WouldBlock)").
    let yaml = format!(
        "{}valkey:\n  connect_timeout: 500ms\n  command_timeout: 2s\n",
        auth_yaml()
    );
    let relay = valkey.start_relay(&yaml, &[]);
    let seen = token(&relay, "admin", ADMIN_PASSWORD);
    let unseen = token(&relay, "admin", ADMIN_PASSWORD);
    let handshake = |token: &str| {
        let bearer = format!("Bearer {token}");
        WsClient::try_connect_headers(relay.addr, &[], &[("Authorization", &bearer)], None)
    };
    // Enough handshakes that every shard has verified (and cached) it.
    for _ in 0..12 {
        handshake(&seen).expect("upgrade before the outage");
    }
    valkey.kill9();
    // For longer than the once-a-second generation check, so every shard has found the state
    // unreadable meanwhile (and still honours what it verified).
    let outage = std::time::Instant::now();
    let mut handshakes = 0;
    while outage.elapsed() < Duration::from_millis(2500) {
        if let Err(e) = handshake(&seen) {
            panic!(
                "handshake {handshakes} during the outage ({:?} in): {e}",
                outage.elapsed()
            );
        }
        handshakes += 1;
    }
    match handshake(&unseen) {
        Ok(_) => panic!("an unseen token was accepted without the user state"),
        Err(refused) => assert!(refused.contains("503"), "{refused}"),
    }
    valkey.restart();
    assert!(
        common::eventually(Duration::from_secs(20), || handshake(&unseen).is_ok()),
        "the unseen token never worked after Valkey came back"
    );
}

/// Writers that move no counter of ours change the shared keys too: the Python relay on the
/// same Valkey during a migration (its deactivations, permission changes and deny-list entries
/// are plain writes in the same layout), or an operator's script. A relay that had the user
/// and the token cached on every shard refuses them within its one-second cache all the same.
#[test]
fn changes_another_writer_makes_in_the_shared_keys_apply_within_a_second() {
    let valkey = ValkeyServer::start(ValkeyOpts::default());
    let relay = valkey.start_relay(&auth_yaml(), &[]);
    let admin = token(&relay, "admin", ADMIN_PASSWORD);
    let grace_id = register(&relay, &admin, "grace", &["read", "write"]);
    let grace = token(&relay, "grace", "grace-password");
    let user_key = format!("user:{grace_id}");
    // Every shard has grace cached (8 new connections reach both of 2 shards but for 2^-7).
    let every_shard = |method: &str, path: &str, body: Option<&str>| -> Vec<u16> {
        (0..8)
            .map(|_| call(&relay, Some(&grace), method, path, body).status)
            .collect()
    };
    let publish = r#"{"topic":"t","payload":{"a":1}}"#;
    let settles = |method: &str, path: &str, body: Option<&str>, status: u16| {
        // Our cache is a second old at most; the bound leaves a loaded machine room and is far
        // below the token's ten minutes a cache that missed the change would keep it for.
        common::eventually(Duration::from_secs(3), || {
            every_shard(method, path, body).iter().all(|s| *s == status)
        })
    };
    assert_eq!(every_shard("GET", "/auth/me", None), [200; 8]);
    assert_eq!(
        every_shard("POST", "/api/v1/messages", Some(publish)),
        [201; 8]
    );

    valkey.cli(&["HSET", &user_key, "is_active", "False"]);
    assert!(
        settles("GET", "/auth/me", None, 403),
        "a deactivation written to user:<id> is not refused"
    );
    valkey.cli(&["HSET", &user_key, "is_active", "True"]);
    assert!(settles("GET", "/auth/me", None, 200));

    valkey.cli(&["HSET", &user_key, "permissions", r#"["read"]"#]);
    assert!(
        settles("POST", "/api/v1/messages", Some(publish), 403),
        "a permission withdrawn in user:<id> still publishes"
    );

    let claims = Signer::new(SECRET.as_bytes(), Duration::from_secs(600))
        .expect("signer")
        .verify(&grace)
        .expect("our own token");
    let jti = claims.jti.expect("our tokens carry a jti");
    valkey.cli(&["SET", &format!("denylist:jti:{jti}"), "logout", "EX", "600"]);
    assert!(
        settles("GET", "/auth/me", None, 401),
        "a token deny-listed as the Python relay writes it is still accepted"
    );
}

/// The same when the outage comes more than a second after the token was verified: every
/// shard has read the state again since (a new epoch, after which each principal is verified
/// again on its next use), and still honours what it knew while Valkey cannot be read.
#[test]
fn a_valkey_outage_keeps_tokens_verified_in_an_earlier_epoch_working() {
    let mut valkey = ValkeyServer::start(ValkeyOpts::default());
    let relay = valkey.start_relay(&auth_yaml(), &[]);
    let seen = token(&relay, "admin", ADMIN_PASSWORD);
    let busy = token(&relay, "admin", ADMIN_PASSWORD);
    let handshake = |token: &str| {
        let bearer = format!("Bearer {token}");
        WsClient::try_connect_headers(relay.addr, &[], &[("Authorization", &bearer)], None)
    };
    for _ in 0..12 {
        handshake(&seen).expect("upgrade before the outage");
    }
    // Another client's requests for longer than the once-a-second read of the state: every
    // shard starts a new epoch meanwhile, `seen` untouched.
    let verified = std::time::Instant::now();
    while verified.elapsed() < Duration::from_millis(1500) {
        handshake(&busy).expect("upgrade before the outage");
    }
    valkey.kill9();
    let outage = std::time::Instant::now();
    let mut handshakes = 0;
    while outage.elapsed() < Duration::from_millis(2500) {
        if let Err(e) = handshake(&seen) {
            panic!(
                "handshake {handshakes} during the outage ({:?} in): {e}",
                outage.elapsed()
            );
        }
        handshakes += 1;
    }
    valkey.restart();
}

/// A publish leaves its topic's ownership record as a publish on the Python relay does
/// (`topic:<owner>/<name>`, the name in `user:<owner>:owned_topics` and in the user hash's
/// `owned_topics`): the Python relay knows a topic by it, and answers 404 for the history of a
/// topic without one. Single and bulk publishes; a deleted topic's record goes with it, and
/// the next publish writes it again. (One shard, so the deletion and the publish after it go
/// through the shard that remembers the record.)
#[test]
fn a_publish_leaves_the_topic_record_the_python_relay_knows_topics_by() {
    let valkey = ValkeyServer::start(ValkeyOpts::default());
    let relay = Server::start_opts(RelayOpts {
        shards: 1,
        ..RelayOpts::new(&auth_yaml()).envs(&valkey.relay_env())
    });
    common::valkey::await_ready(&relay, Duration::from_secs(20));
    let admin = token(&relay, "admin", ADMIN_PASSWORD);
    let heidi_id = register(&relay, &admin, "heidi", &["read", "write"]);
    let heidi = token(&relay, "heidi", "heidi-password");
    let owned = || -> Vec<String> {
        let set = valkey.cli_json(&["SMEMBERS", &format!("user:{heidi_id}:owned_topics")]);
        let mut set: Vec<String> = serde_json::from_value(set).expect("names");
        set.sort_unstable();
        let list = valkey.cli(&["HGET", &format!("user:{heidi_id}"), "owned_topics"]);
        let mut list: Vec<String> = serde_json::from_str(list.trim()).expect("a JSON list");
        list.sort_unstable();
        assert_eq!(set, list, "the owned-topics set and the user hash's list");
        set
    };
    let record = |name: &str| -> Value {
        valkey.cli_json(&["HGETALL", &format!("topic:{heidi_id}/{name}")])
    };
    assert_eq!(owned(), Vec::<String>::new());

    let publish = |topic: &str| {
        let body = format!(r#"{{"topic":"{topic}","payload":{{"a":1}}}}"#);
        let resp = call(
            &relay,
            Some(&heidi),
            "POST",
            "/api/v1/messages",
            Some(&body),
        );
        assert_eq!(resp.status, 201, "{resp:?}");
    };
    publish("single");
    publish("single");
    let single = record("single");
    assert_eq!(single["topic_name"], "single", "{single}");
    assert_eq!(single["owner_id"], heidi_id.as_str(), "{single}");
    assert_eq!(
        single["description"], "Auto-created topic by heidi",
        "{single}"
    );
    assert_eq!(
        single["topic_id"].as_str().map(str::len),
        Some(36),
        "a UUID: {single}"
    );
    assert!(
        single["created_at"]
            .as_str()
            .is_some_and(|t| t.ends_with("+00:00")),
        "{single}"
    );
    let bulk = r#"{"messages":[{"topic":"b1","payload":{}},{"topic":"b2","payload":{}},{"topic":"b1","payload":{}},{"topic":"single","payload":{}}]}"#;
    let resp = call(
        &relay,
        Some(&heidi),
        "POST",
        "/api/v1/messages/bulk",
        Some(bulk),
    );
    assert_eq!(resp.status, 207, "{resp:?}");
    assert_eq!(resp.json()["summary"]["accepted"], 4, "{resp:?}");
    assert_eq!(record("b2")["topic_name"], "b2");
    assert_eq!(owned(), ["b1", "b2", "single"]);
    // The record made by the publish is the one `POST /api/v1/topics` finds.
    let again = call(
        &relay,
        Some(&heidi),
        "POST",
        "/api/v1/topics",
        Some(r#"{"topic_name":"b2"}"#),
    );
    assert_eq!(again.status, 409, "{again:?}");

    let deleted = call(
        &relay,
        Some(&heidi),
        "DELETE",
        "/api/v1/topics/single",
        None,
    );
    assert_eq!(deleted.status, 204, "{deleted:?}");
    assert_eq!(record("single"), json!({}));
    assert_eq!(owned(), ["b1", "b2"]);
    publish("single");
    assert_eq!(record("single")["topic_name"], "single");
    assert_eq!(owned(), ["b1", "b2", "single"]);
}
