//! This relay and the real Python relay (`pulsar-relay` 0.2.1, from its own venv: see
//! tests/common/python_relay.rs) on one `valkey-server`, as during an in-place migration: this
//! relay with `valkey.stream_key: "stream:topic:{topic}"` (docs/auth.md), both with the same
//! `PULSAR_JWT_SECRET_KEY`. Whatever one relay does through its API, the other must see through
//! the shared keys:
//!
//! - each relay's bootstrap admin logs in on the other (one password-hash format);
//! - users registered on one log in on the other; an access token from one is accepted by the
//!   other; a refresh token from one rotates on the other, and replaying the spent one revokes
//!   the chain on both;
//! - a logout on ours is refused by the Python relay at once; an access token deny-listed as the
//!   Python relay writes it (`denylist:jti:<jti>`) is refused here within our one-second cache
//!   (the Python relay's own `/auth/logout` fails on Valkey: docs/compatibility.md);
//! - a deactivation on either refuses that user's token on the other, as does a deletion on
//!   the Python relay here (and what the Python relay's per-process user cache does to a
//!   deactivation made here, as docs/compatibility.md says);
//! - topics created on one exist on the other; messages published on either are read from the
//!   other's history (one page of each from the other's cursor) and long-poll, with the same
//!   ids and payloads, in order; a topic created by a publish here is one the Python relay
//!   knows; another user sees none of it on either; a publish retried with its
//!   `Idempotency-Key` on the other relay is stored again (docs/compatibility.md).
//!
//! The Python relay runs with Valkey authentication and without `PULSAR_ALLOW_INSECURE_DEFAULTS`,
//! and starts after this relay has written users, a stream, its meta key and an idempotency key:
//! its start-up check for foreign `topic:*` keys passes over ours. Every wait awaits a condition.

mod common;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use base64::Engine as _;
use serde_json::{json, Value};

use common::python_relay::{PythonRelay, PythonRelayOpts};
use common::valkey::{ValkeyOpts, ValkeyServer};
use common::{eventually, Conn, Response, Server};

const SECRET: &str = "coexist-secret-0123456789abcdef-0123456789";
const VALKEY_PASSWORD: &str = "coexist-valkey-password";
const OURS_ADMIN: &str = "rust-admin";
const OURS_ADMIN_PASSWORD: &str = "rust-admin-password";
const PY_ADMIN: &str = "python-admin";
const PY_ADMIN_PASSWORD: &str = "python-admin-password";

/// Our cache of users and deny-list answers is at most a second old (docs/auth.md); this leaves
/// a loaded CI machine room beyond it, and is far below an access token's ten minutes, which
/// is how long a cache that missed the change would keep accepting the token.
const OUR_CACHE_BOUND: Duration = Duration::from_secs(3);

/// The Python relay only notices another writer's entries when asked (catch-up reads); this
/// relay within its 5 s safety net at the latest (docs/scaling.md).
const LONG_POLL_TIMEOUT_SECS: u64 = 20;

/// One of the two relays, named for failure messages.
#[derive(Clone, Copy)]
struct Relay {
    name: &'static str,
    addr: SocketAddr,
}

/// Valkey with a password (the Python relay refuses one without), then this relay on it.
fn start_ours() -> (ValkeyServer, Server) {
    let valkey = ValkeyServer::start(ValkeyOpts {
        requirepass: Some(VALKEY_PASSWORD.to_owned()),
        appendonly: false,
        ..ValkeyOpts::default()
    });
    let yaml = format!(
        "auth:\n  jwt_secret: \"{SECRET}\"\n  bootstrap_admin_username: {OURS_ADMIN}\n  \
         bootstrap_admin_password: {OURS_ADMIN_PASSWORD}\n\
         valkey:\n  stream_key: \"stream:topic:{{topic}}\"\n"
    );
    let ours = valkey.start_relay(&yaml, &[]);
    (valkey, ours)
}

fn start_python(valkey: &ValkeyServer) -> PythonRelay {
    PythonRelay::start(
        valkey,
        &PythonRelayOpts {
            jwt_secret: SECRET,
            admin_username: PY_ADMIN,
            admin_password: PY_ADMIN_PASSWORD,
        },
    )
}

fn relay_ours(server: &Server) -> Relay {
    Relay {
        name: "ours",
        addr: server.addr,
    }
}

fn relay_python(server: &PythonRelay) -> Relay {
    Relay {
        name: "python",
        addr: server.addr,
    }
}

fn call(
    relay: Relay,
    token: Option<&str>,
    method: &str,
    path: &str,
    body: Option<&str>,
) -> Response {
    let bearer = token.map(|t| format!("Bearer {t}"));
    let mut headers: Vec<(&str, &str)> = Vec::new();
    if let Some(bearer) = &bearer {
        headers.push(("Authorization", bearer));
    }
    Conn::connect(relay.addr).request_with(method, path, &headers, body.map(str::as_bytes))
}

fn try_login(relay: Relay, user: &str, password: &str) -> Response {
    let body = format!("username={user}&password={password}&grant_type=password");
    Conn::connect(relay.addr).request_with(
        "POST",
        "/auth/login",
        &[("Content-Type", "application/x-www-form-urlencoded")],
        Some(body.as_bytes()),
    )
}

/// Logs in; returns (access token, refresh token).
fn login(relay: Relay, user: &str, password: &str) -> (String, String) {
    let resp = try_login(relay, user, password);
    assert_eq!(resp.status, 200, "login {user} on {}: {resp:?}", relay.name);
    let v = resp.json();
    (
        v["access_token"].as_str().expect("access_token").to_owned(),
        v["refresh_token"]
            .as_str()
            .expect("refresh_token")
            .to_owned(),
    )
}

fn refresh(relay: Relay, refresh_token: &str) -> Response {
    let body = json!({ "refresh_token": refresh_token }).to_string();
    call(relay, None, "POST", "/auth/token/refresh", Some(&body))
}

/// Rotates `refresh_token` on `relay`; returns the new (access token, refresh token).
fn rotate(relay: Relay, refresh_token: &str) -> (String, String) {
    let resp = refresh(relay, refresh_token);
    assert_eq!(resp.status, 200, "refresh on {}: {resp:?}", relay.name);
    let v = resp.json();
    (
        v["access_token"].as_str().expect("access_token").to_owned(),
        v["refresh_token"]
            .as_str()
            .expect("refresh_token")
            .to_owned(),
    )
}

fn me(relay: Relay, token: &str) -> Response {
    call(relay, Some(token), "GET", "/auth/me", None)
}

/// `/auth/me` answers 200 for `user`; returns its user id.
fn assert_me(relay: Relay, token: &str, user: &str) -> String {
    let resp = me(relay, token);
    assert_eq!(resp.status, 200, "/auth/me on {}: {resp:?}", relay.name);
    let v = resp.json();
    assert_eq!(v["username"], user, "/auth/me on {}: {v}", relay.name);
    v["user_id"].as_str().expect("user_id").to_owned()
}

/// Registers `user` (read, write) through `relay`; returns its id.
fn register(relay: Relay, admin: &str, user: &str) -> String {
    let body = json!({
        "username": user,
        "password": password_of(user),
        "permissions": ["read", "write"],
    });
    let resp = call(
        relay,
        Some(admin),
        "POST",
        "/auth/register",
        Some(&body.to_string()),
    );
    assert_eq!(
        resp.status, 201,
        "register {user} on {}: {resp:?}",
        relay.name
    );
    resp.json()["user_id"].as_str().expect("user_id").to_owned()
}

fn password_of(user: &str) -> String {
    format!("{user}-password")
}

fn deactivate(relay: Relay, admin: &str, user_id: &str) {
    let resp = call(
        relay,
        Some(admin),
        "PATCH",
        &format!("/auth/users/{user_id}"),
        Some(r#"{"is_active":false}"#),
    );
    assert_eq!(resp.status, 200, "deactivate on {}: {resp:?}", relay.name);
    assert_eq!(resp.json()["is_active"], false);
}

/// The `jti` claim of an access token.
fn jti_of(token: &str) -> String {
    let payload = token.split('.').nth(1).expect("a JWT has three parts");
    let claims: Value = serde_json::from_slice(
        &base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(payload)
            .expect("base64url claims"),
    )
    .expect("JSON claims");
    claims["jti"].as_str().expect("jti").to_owned()
}

/// How many requests, each on a new connection, make it near certain that every one of our two
/// shards answered at least once (all but 2^-7).
const EVERY_SHARD: usize = 8;

/// `/auth/me` for `token` answers 200 on every shard of `relay`: each has it cached.
fn warm(relay: Relay, token: &str) {
    for _ in 0..EVERY_SHARD {
        let resp = me(relay, token);
        assert_eq!(resp.status, 200, "{}: {resp:?}", relay.name);
    }
}

/// Waits until `relay` answers `/auth/me` for `token` with `status`, and then on every shard
/// (each request a new connection); panics after `within`.
fn await_me_status(relay: Relay, token: &str, status: u16, within: Duration, what: &str) {
    let started = Instant::now();
    let mut last = None;
    let reached = eventually(within, || {
        let answers: Vec<Response> = (0..EVERY_SHARD).map(|_| me(relay, token)).collect();
        let done = answers.iter().all(|r| r.status == status);
        last = answers.into_iter().find(|r| r.status != status);
        done
    });
    assert!(
        reached,
        "{what}: {} still answers {:?} after {:?} (expected {status})",
        relay.name,
        last,
        started.elapsed()
    );
}

/// Each relay's bootstrap admin, users, access and refresh tokens, logouts and deactivations
/// work across the two relays.
#[test]
fn users_sessions_and_revocations_are_shared_with_the_python_relay() {
    let (valkey, ours_server) = start_ours();
    let python_server = start_python(&valkey);
    let (ours, python) = (relay_ours(&ours_server), relay_python(&python_server));

    // 1. Each relay's bootstrap admin logs in on the other: one password-hash format. Ours is
    // created in the background right after start-up.
    assert!(
        eventually(Duration::from_secs(20), || try_login(
            ours,
            OURS_ADMIN,
            OURS_ADMIN_PASSWORD
        )
        .status
            == 200),
        "our bootstrap admin never logged in on ours"
    );
    let (ours_admin, _) = login(python, OURS_ADMIN, OURS_ADMIN_PASSWORD);
    let (py_admin, _) = login(ours, PY_ADMIN, PY_ADMIN_PASSWORD);
    assert_me(ours, &ours_admin, OURS_ADMIN);
    assert_me(python, &py_admin, PY_ADMIN);
    for admin in [OURS_ADMIN, PY_ADMIN] {
        let id = valkey.cli(&["HGET", "user:username_index", admin]);
        let hash = valkey.cli(&["HGET", &format!("user:{}", id.trim()), "hashed_password"]);
        assert!(
            hash.starts_with("$argon2id$v=19$m=65536,t=3,p=4$"),
            "{admin}'s stored hash: {hash}"
        );
    }

    // 2. Users registered on one log in on the other; access tokens are accepted across; one
    // username index (registering a name the other relay took is refused).
    let alice_id = register(python, &py_admin, "alice");
    let bob_id = register(ours, &ours_admin, "bob");
    let carol_id = register(python, &py_admin, "carol");
    for (relay, admin) in [(ours, &ours_admin), (python, &py_admin)] {
        let body = json!({"username": "alice", "password": "another-password"}).to_string();
        let resp = call(relay, Some(admin), "POST", "/auth/register", Some(&body));
        assert_eq!(resp.status, 400, "alice again on {}: {resp:?}", relay.name);
    }
    let (alice_py, _) = login(python, "alice", &password_of("alice"));
    let (alice_ours, _) = login(ours, "alice", &password_of("alice"));
    let (bob_py, _) = login(python, "bob", &password_of("bob"));
    let (bob_ours, _) = login(ours, "bob", &password_of("bob"));
    for (token, user, id) in [
        (&alice_py, "alice", &alice_id),
        (&alice_ours, "alice", &alice_id),
        (&bob_py, "bob", &bob_id),
        (&bob_ours, "bob", &bob_id),
    ] {
        for relay in [ours, python] {
            assert_eq!(
                &assert_me(relay, token, user),
                id,
                "{user} on {}",
                relay.name
            );
        }
    }

    // A refresh token issued by one rotates on the other (and on, back and forth); replaying
    // the spent one on the first revokes the chain: its live successor is refused by the other.
    for (first, second) in [(python, ours), (ours, python)] {
        let (_, r1) = login(first, "alice", &password_of("alice"));
        let (access2, r2) = rotate(second, &r1);
        assert_me(first, &access2, "alice");
        let (access3, r3) = rotate(first, &r2);
        assert_me(second, &access3, "alice");
        let replay = refresh(first, &r1);
        assert_eq!(
            replay.status, 401,
            "replaying a token issued by {} and spent on {} on {}: {replay:?}",
            first.name, second.name, first.name
        );
        let successor = refresh(second, &r3);
        assert_eq!(
            successor.status, 401,
            "the chain's live token on {} after a replay on {}: {successor:?}",
            second.name, first.name
        );
        let jti = r3.split('.').next().expect("jti.secret");
        assert_eq!(
            valkey
                .cli(&["HGET", &format!("refresh:tok:{jti}"), "revoked_reason"])
                .trim(),
            "replay",
            "revoked as a replay ({} then {})",
            first.name,
            second.name
        );
    }

    // 3. Logout on ours: the Python relay refuses that token at once (it reads the deny-list
    // on every request).
    assert_me(python, &alice_py, "alice");
    let resp = call(ours, Some(&alice_py), "POST", "/auth/logout", None);
    assert_eq!(resp.status, 204, "logout on ours: {resp:?}");
    let resp = me(python, &alice_py);
    assert_eq!(resp.status, 401, "python after a logout on ours: {resp:?}");
    assert_eq!(resp.json()["detail"], "Token has been revoked");
    await_me_status(
        ours,
        &alice_py,
        401,
        OUR_CACHE_BOUND,
        "a token logged out on ours",
    );

    // Logout on the Python relay: 0.2.1 cannot deny-list on Valkey (its `SET … EX` call passes
    // a dict where valkey-glide wants an `ExpirySet`: a 500, nothing written;
    // docs/compatibility.md). Ours has served bob's token and cached it.
    warm(ours, &bob_ours);
    let jti = jti_of(&bob_ours);
    let resp = call(python, Some(&bob_ours), "POST", "/auth/logout", None);
    assert_eq!(
        resp.status,
        500,
        "the Python relay's logout on Valkey (if it works now, docs/compatibility.md and this \
         test are out of date): {resp:?}\n{}",
        python_server.log()
    );
    let deny_key = format!("denylist:jti:{jti}");
    assert_eq!(valkey.cli(&["EXISTS", &deny_key]).trim(), "0");
    // The deny-list entry as its logout means to write it (`ValkeyJWTDenylist.add`: SET
    // `logout` EX the token's remaining lifetime), which nothing of ours announces: refused
    // on both, here within our cache's second.
    valkey.cli(&["SET", &deny_key, "logout", "EX", "600"]);
    assert_eq!(me(python, &bob_ours).status, 401);
    await_me_status(
        ours,
        &bob_ours,
        401,
        OUR_CACHE_BOUND,
        "a token deny-listed in the Python relay's layout",
    );

    // 5. A deactivation on the Python relay: ours, which has bob cached as active, refuses
    // his token within its cache's second.
    warm(ours, &bob_py);
    deactivate(python, &py_admin, &bob_id);
    assert_eq!(me(python, &bob_py).status, 403);
    await_me_status(
        ours,
        &bob_py,
        403,
        OUR_CACHE_BOUND,
        "a user the Python relay deactivated",
    );
    assert_eq!(try_login(ours, "bob", &password_of("bob")).status, 403);
    // Deleted there: "User not found" here too.
    let resp = call(
        python,
        Some(&py_admin),
        "DELETE",
        &format!("/auth/users/{bob_id}"),
        None,
    );
    assert_eq!(resp.status, 204, "{resp:?}");
    await_me_status(
        ours,
        &bob_py,
        401,
        OUR_CACHE_BOUND,
        "a user the Python relay deleted",
    );
    assert_eq!(try_login(ours, "bob", &password_of("bob")).status, 401);

    // A deactivation on ours: the Python relay refuses carol's token. (Carol has not used the
    // Python relay yet: it keeps a user it has served for up to 60 s in a per-process cache
    // that only its own admin endpoints invalidate; docs/compatibility.md.)
    let (carol_py, _) = login(python, "carol", &password_of("carol"));
    assert_me(ours, &carol_py, "carol");
    deactivate(ours, &ours_admin, &carol_id);
    // At once on the shard that made the change, within the cache's second on the other.
    await_me_status(
        ours,
        &carol_py,
        403,
        OUR_CACHE_BOUND,
        "a user ours deactivated",
    );
    let resp = me(python, &carol_py);
    assert_eq!(
        resp.status, 403,
        "python after a deactivation on ours: {resp:?}"
    );
    assert_eq!(resp.json()["detail"], "User is inactive");
    assert_eq!(
        try_login(python, "carol", &password_of("carol")).status,
        403
    );

    // What the Python relay's user cache does to a deactivation made here, as
    // docs/compatibility.md says: a user it served within the last minute stays active there,
    // and a topic it then creates for them writes their whole cached record back, so the user
    // is active again on both relays.
    let erin_id = register(ours, &ours_admin, "erin");
    let (erin, _) = login(python, "erin", &password_of("erin"));
    assert_me(python, &erin, "erin");
    deactivate(ours, &ours_admin, &erin_id);
    await_me_status(ours, &erin, 403, OUR_CACHE_BOUND, "a user ours deactivated");
    let stale = me(python, &erin);
    assert_eq!(
        stale.status, 200,
        "the Python relay's cached user (docs/compatibility.md): {stale:?}"
    );
    let resp = create_topic(python, &erin, "erins");
    assert_eq!(resp.status, 201, "{resp:?}");
    assert_eq!(
        valkey
            .cli(&["HGET", &format!("user:{erin_id}"), "is_active"])
            .trim(),
        "True",
        "the Python relay's write-back of its cached user (docs/compatibility.md)"
    );
    await_me_status(
        ours,
        &erin,
        200,
        OUR_CACHE_BOUND,
        "a user the Python relay wrote back as active",
    );

    drop(python_server);
    drop(ours_server);
}

// ---------------------------------------------------------------------------------------------
// Topics and messages

fn create_topic(relay: Relay, token: &str, name: &str) -> Response {
    let body = json!({ "topic_name": name }).to_string();
    call(relay, Some(token), "POST", "/api/v1/topics", Some(&body))
}

/// Publishes `payload` (with `metadata` if given) to `topic`; returns the message id.
fn publish(
    relay: Relay,
    token: &str,
    topic: &str,
    payload: &Value,
    metadata: Option<&Value>,
) -> String {
    let mut body = json!({ "topic": topic, "payload": payload });
    if let Some(metadata) = metadata {
        body["metadata"] = metadata.clone();
    }
    let resp = call(
        relay,
        Some(token),
        "POST",
        "/api/v1/messages",
        Some(&body.to_string()),
    );
    assert_eq!(
        resp.status, 201,
        "publish to {topic} on {}: {resp:?}",
        relay.name
    );
    let v = resp.json();
    assert_eq!(v["topic"], topic);
    v["message_id"].as_str().expect("message_id").to_owned()
}

/// One history page, oldest first.
fn history(relay: Relay, token: &str, topic: &str, query: &str) -> Response {
    call(
        relay,
        Some(token),
        "GET",
        &format!("/api/v1/topics/{topic}/messages?order=asc&{query}"),
        None,
    )
}

fn history_page(relay: Relay, token: &str, topic: &str, query: &str) -> Value {
    let resp = history(relay, token, topic, query);
    assert_eq!(
        resp.status, 200,
        "history of {topic} on {}: {resp:?}",
        relay.name
    );
    resp.json()
}

/// (id, payload, metadata) of each message of a page; no metadata is `{}` (the Python relay)
/// or `null` (ours), both read as none.
fn messages_of(page: &Value) -> Vec<(String, Value, Option<Value>)> {
    page["messages"]
        .as_array()
        .unwrap_or_else(|| panic!("no messages in {page}"))
        .iter()
        .map(|m| {
            let metadata = match &m["metadata"] {
                Value::Null => None,
                Value::Object(o) if o.is_empty() => None,
                other => Some(other.clone()),
            };
            (
                m["message_id"].as_str().expect("message_id").to_owned(),
                m["payload"].clone(),
                metadata,
            )
        })
        .collect()
}

/// `POST /messages/poll` for one topic after `since`.
fn long_poll(relay: Relay, token: &str, topic: &str, since: &str, timeout: u64) -> Value {
    let body = json!({ "topics": [topic], "since": { topic: since }, "timeout": timeout });
    let mut conn = Conn::connect(relay.addr);
    conn.set_read_timeout(Duration::from_secs(timeout + 10));
    let bearer = format!("Bearer {token}");
    let resp = conn.request_with(
        "POST",
        "/messages/poll",
        &[("Authorization", &bearer)],
        Some(body.to_string().as_bytes()),
    );
    assert_eq!(resp.status, 200, "long-poll on {}: {resp:?}", relay.name);
    resp.json()
}

/// Topics created on one relay exist on the other; messages published on either are read
/// from the other's history and long-poll with the same ids and payloads, in order; a topic
/// a publish created here is known to the Python relay; another user sees nothing of it.
#[test]
fn topics_and_messages_are_shared_with_the_python_relay() {
    let (valkey, ours_server) = start_ours();
    let ours = relay_ours(&ours_server);
    assert!(
        eventually(Duration::from_secs(20), || try_login(
            ours,
            OURS_ADMIN,
            OURS_ADMIN_PASSWORD
        )
        .status
            == 200),
        "our bootstrap admin never logged in"
    );
    let (admin, _) = login(ours, OURS_ADMIN, OURS_ADMIN_PASSWORD);
    let alice_id = register(ours, &admin, "alice");
    register(ours, &admin, "dave");
    let (alice_ours, _) = login(ours, "alice", &password_of("alice"));

    // Before the Python relay starts, ours writes a stream, its meta key and an idempotency
    // key: the Python relay's start-up check for un-namespaced `topic:*` keys passes over them.
    let resp = Conn::connect(ours.addr).request_with(
        "POST",
        "/api/v1/messages",
        &[
            ("Authorization", &format!("Bearer {alice_ours}")),
            ("Idempotency-Key", "early-1"),
        ],
        Some(br#"{"topic":"early","payload":{"early":true}}"#),
    );
    assert_eq!(resp.status, 201, "{resp:?}");
    let early_id = resp.json()["message_id"].as_str().expect("id").to_owned();
    let python_server = start_python(&valkey);
    let python = relay_python(&python_server);
    let (alice_py, _) = login(python, "alice", &password_of("alice"));
    let (dave, _) = login(python, "dave", &password_of("dave"));

    // A topic created on one exists on the other (Python says 400, ours 409), owned by alice.
    let resp = create_topic(python, &alice_py, "jobs");
    assert_eq!(resp.status, 201, "{resp:?}");
    let resp = create_topic(ours, &alice_ours, "jobs");
    assert_eq!(
        resp.status, 409,
        "ours on a topic created on python: {resp:?}"
    );
    let resp = create_topic(ours, &alice_ours, "made-here");
    assert_eq!(resp.status, 201, "{resp:?}");
    let resp = create_topic(python, &alice_py, "made-here");
    assert_eq!(
        resp.status, 400,
        "python on a topic created on ours: {resp:?}"
    );
    for (relay, token) in [(ours, &alice_ours), (python, &alice_py)] {
        for topic in ["jobs", "made-here", "early"] {
            let resp = call(
                relay,
                Some(token),
                "GET",
                &format!("/api/v1/topics/{topic}"),
                None,
            );
            assert_eq!(resp.status, 200, "{topic} on {}: {resp:?}", relay.name);
            assert_eq!(
                resp.json()["owner_id"],
                alice_id,
                "{topic} on {}",
                relay.name
            );
        }
    }

    // Published alternately on both; every id is a stream id of one stream, ascending.
    let mut published: Vec<(String, Value, Option<Value>)> = Vec::new();
    for i in 0..6 {
        let (relay, token) = if i % 2 == 0 {
            (python, &alice_py)
        } else {
            (ours, &alice_ours)
        };
        let payload = json!({ "seq": i, "via": relay.name, "nested": { "list": [1, 2, 3] } });
        let metadata = (i % 3 == 0).then(|| json!({ "job": format!("j{i}") }));
        let id = publish(relay, token, "jobs", &payload, metadata.as_ref());
        published.push((id, payload, metadata));
    }
    let ids: Vec<String> = published.iter().map(|(id, _, _)| id.clone()).collect();
    common::assert_strictly_increasing(&ids);

    // History on both: the same messages in order; a page of one continues from the other's
    // cursor.
    for (relay, token) in [(ours, &alice_ours), (python, &alice_py)] {
        let page = history_page(relay, token, "jobs", "limit=100");
        assert_eq!(messages_of(&page), published, "history on {}", relay.name);
    }
    let first = history_page(python, &alice_py, "jobs", "limit=3");
    assert_eq!(messages_of(&first), published[..3]);
    let cursor = first["next_cursor"].as_str().expect("python's next_cursor");
    let second = history_page(
        ours,
        &alice_ours,
        "jobs",
        &format!("limit=3&cursor={cursor}"),
    );
    assert_eq!(
        messages_of(&second),
        published[3..],
        "ours from python's cursor"
    );
    let first = history_page(ours, &alice_ours, "jobs", "limit=3");
    let cursor = first["next_cursor"].as_str().expect("our next_cursor");
    let second = history_page(
        python,
        &alice_py,
        "jobs",
        &format!("limit=3&cursor={cursor}"),
    );
    assert_eq!(
        messages_of(&second),
        published[3..],
        "python from our cursor"
    );

    // Long-poll on ours, parked after the last id: a message published on the Python relay
    // (which notifies no one) comes out with its id and payload.
    let last = ids.last().expect("published").clone();
    let poller = {
        let token = alice_ours.clone();
        let last = last.clone();
        std::thread::spawn(move || long_poll(ours, &token, "jobs", &last, LONG_POLL_TIMEOUT_SECS))
    };
    let payload = json!({ "seq": 6, "via": "python", "live": true });
    let live_id = publish(python, &alice_py, "jobs", &payload, None);
    let answer = poller.join().expect("long-poll thread");
    let got: Vec<(&str, &Value)> = answer["messages"]
        .as_array()
        .expect("messages")
        .iter()
        .map(|m| (m["message_id"].as_str().expect("id"), &m["payload"]))
        .collect();
    assert_eq!(
        got,
        [(live_id.as_str(), &payload)],
        "our long-poll: {answer}"
    );
    assert_eq!(answer["messages"][0]["topic"], "jobs");
    published.push((live_id.clone(), payload, None));

    // Long-poll on the Python relay after the same id: a message published on ours comes out
    // (its catch-up read; live delivery of ours' messages to Python consumers is not shared:
    // docs/compatibility.md).
    let payload = json!({ "seq": 7, "via": "ours" });
    let ours_id = publish(ours, &alice_ours, "jobs", &payload, None);
    let answer = long_poll(python, &alice_py, "jobs", &live_id, 5);
    assert_eq!(answer["messages"][0]["message_id"], ours_id, "{answer}");
    assert_eq!(answer["messages"][0]["payload"], payload, "{answer}");
    assert_eq!(
        answer["messages"].as_array().map(Vec::len),
        Some(1),
        "{answer}"
    );
    published.push((ours_id, payload, None));
    for (relay, token) in [(ours, &alice_ours), (python, &alice_py)] {
        let page = history_page(relay, token, "jobs", "limit=100");
        assert_eq!(messages_of(&page), published, "history on {}", relay.name);
    }

    // A topic created by a publish (no `POST /api/v1/topics`): the Python relay knows a topic
    // by its ownership record, so a publish here must leave one as a publish there does.
    let auto_id = publish(ours, &alice_ours, "auto", &json!({ "auto": 1 }), None);
    let resp = history(python, &alice_py, "auto", "limit=10");
    assert_eq!(
        resp.status, 200,
        "python's history of a topic a publish on ours created: {resp:?}"
    );
    assert_eq!(messages_of(&resp.json())[0].0, auto_id);
    let resp = create_topic(python, &alice_py, "auto");
    assert_eq!(
        resp.status, 400,
        "python on a topic a publish on ours created: {resp:?}"
    );
    let listed = call(python, Some(&alice_py), "GET", "/api/v1/topics", None).json();
    let mut names: Vec<&str> = listed
        .as_array()
        .expect("topics")
        .iter()
        .map(|t| t["topic_name"].as_str().expect("topic_name"))
        .collect();
    names.sort_unstable();
    assert_eq!(
        names,
        ["auto", "early", "jobs", "made-here"],
        "python's list: {listed}"
    );
    // The user hash's own list too (the Python relay serves it from a per-process cache for
    // up to a minute, so it is read from Valkey here).
    let owned = valkey.cli(&["HGET", &format!("user:{alice_id}"), "owned_topics"]);
    let mut owned: Vec<String> = serde_json::from_str(owned.trim()).expect("a JSON list");
    owned.sort_unstable();
    assert_eq!(owned, ["auto", "early", "jobs", "made-here"]);
    // And the other way round.
    let py_auto_id = publish(python, &alice_py, "py-auto", &json!({ "auto": 2 }), None);
    let resp = create_topic(ours, &alice_ours, "py-auto");
    assert_eq!(
        resp.status, 409,
        "ours on a topic a publish on python created: {resp:?}"
    );
    let page = history_page(ours, &alice_ours, "py-auto", "limit=10");
    assert_eq!(messages_of(&page)[0].0, py_auto_id);
    let page = history_page(python, &alice_py, "early", "limit=10");
    assert_eq!(messages_of(&page)[0].0, early_id);

    // Each relay deduplicates a retried publish by its own `Idempotency-Key` records, which
    // the other does not read: a retry that lands on the other relay is stored twice
    // (docs/compatibility.md).
    let keyed = |relay: Relay, token: &str| -> String {
        let resp = Conn::connect(relay.addr).request_with(
            "POST",
            "/api/v1/messages",
            &[
                ("Authorization", &format!("Bearer {token}")),
                ("Idempotency-Key", "retried-1"),
            ],
            Some(br#"{"topic":"retried","payload":{"once":true}}"#),
        );
        assert_eq!(resp.status, 201, "{} {resp:?}", relay.name);
        resp.json()["message_id"].as_str().expect("id").to_owned()
    };
    let first = keyed(python, &alice_py);
    assert_eq!(keyed(python, &alice_py), first, "python's own retry");
    let on_ours = keyed(ours, &alice_ours);
    assert_eq!(keyed(ours, &alice_ours), on_ours, "our own retry");
    assert_ne!(
        on_ours, first,
        "(documented: the retry on the other relay is stored again)"
    );

    // Another user sees none of alice's topics on either relay: their names are his own, and
    // he has no such topics (a history of one is 404 on the Python relay, an empty page here).
    for relay in [ours, python] {
        for topic in ["jobs", "auto", "made-here"] {
            let resp = history(relay, &dave, topic, "limit=10");
            match relay.name {
                "python" => assert_eq!(resp.status, 404, "dave reads alice's {topic}: {resp:?}"),
                _ => assert_eq!(messages_of(&resp.json()), [], "dave reads alice's {topic}"),
            }
            let resp = call(
                relay,
                Some(&dave),
                "GET",
                &format!("/api/v1/topics/{topic}"),
                None,
            );
            assert_eq!(
                resp.status, 404,
                "dave sees alice's {topic} on {}: {resp:?}",
                relay.name
            );
        }
    }
    let dave_id = publish(python, &dave, "jobs", &json!({ "dave": true }), None);
    let answer = long_poll(ours, &dave, "jobs", "0-0", 1);
    let got: Vec<&str> = answer["messages"]
        .as_array()
        .expect("messages")
        .iter()
        .map(|m| m["message_id"].as_str().expect("id"))
        .collect();
    assert_eq!(got, [dave_id.as_str()], "dave's own jobs on ours: {answer}");
    for (relay, token) in [(ours, &alice_ours), (python, &alice_py)] {
        let page = history_page(relay, token, "jobs", "limit=100");
        assert_eq!(
            messages_of(&page),
            published,
            "alice's jobs on {} after dave's",
            relay.name
        );
    }

    drop(python_server);
    drop(ours_server);
}
