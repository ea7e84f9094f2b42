//! External tokens and API keys over real sockets.
//!
//! External tokens: RS256 from a JWKS served over HTTP by the test (rotated mid-test: a token
//! under the new key id is refused until the relay's background refresh picks the new set up,
//! then accepted; a key dropped from the set stops working), ES256 from a PEM file beside the
//! built-in tokens, and every claim check (`exp`, `nbf`, `iss`, `aud`, the pinned algorithm,
//! `alg: none`, an HS256 token keyed with the RSA public key). Claims grant topic patterns:
//! `read:jobs.*` reaches `jobs.1` and nothing else, on every entrance (publish, bulk items,
//! history, long-poll, SSE, WebSocket subscribe).
//!
//! API keys: created by a user for itself (never beyond its permissions), sent as
//! `X-API-Key` or `Bearer`, confined to their patterns in the owner's namespace, refused once
//! revoked or when the owner is demoted or deactivated, unable to mint keys; on Valkey they
//! survive a restart and an open WebSocket on a revoked key closes with 4003.

mod common;

use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpListener};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::{json, Value};

use common::valkey::{ValkeyOpts, ValkeyServer};
use common::ws::WsClient;
use common::{eventually, Response, Server};

const KEYS: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/keys");
const ISSUER: &str = "https://idp.test";
const AUDIENCE: &str = "pulsar-relay";

fn key_file(name: &str) -> String {
    format!("{KEYS}/{name}")
}

fn read_key(name: &str) -> Vec<u8> {
    std::fs::read(key_file(name)).unwrap_or_else(|e| panic!("{name}: {e}"))
}

fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock after 1970")
        .as_secs()
}

/// Claims an issuer would put in a token for this relay.
fn claims(sub: &str, permissions: Value) -> Value {
    json!({"sub": sub, "iss": ISSUER, "aud": AUDIENCE, "iat": now(), "exp": now() + 300,
           "permissions": permissions})
}

fn sign_rsa(private_pem: &str, kid: Option<&str>, claims: &Value) -> String {
    let key = EncodingKey::from_rsa_pem(&read_key(private_pem)).expect("RSA key");
    let mut header = Header::new(Algorithm::RS256);
    header.kid = kid.map(str::to_owned);
    jsonwebtoken::encode(&header, claims, &key).expect("sign")
}

fn sign_ec(claims: &Value) -> String {
    let key = EncodingKey::from_ec_pem(&read_key("ec-private.pem")).expect("EC key");
    jsonwebtoken::encode(&Header::new(Algorithm::ES256), claims, &key).expect("sign")
}

fn b64(bytes: &[u8]) -> String {
    base64::Engine::encode(&base64::engine::general_purpose::URL_SAFE_NO_PAD, bytes)
}

/// A JWKS endpoint: serves whatever document it currently holds, counting requests.
struct JwksServer {
    addr: SocketAddr,
    document: Arc<Mutex<String>>,
    requests: Arc<AtomicUsize>,
}

impl JwksServer {
    fn start(document: &str) -> JwksServer {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = listener.local_addr().expect("addr");
        let document = Arc::new(Mutex::new(document.to_owned()));
        let requests = Arc::new(AtomicUsize::new(0));
        let (doc, count) = (document.clone(), requests.clone());
        // Lives as long as the test process; each connection is one request.
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(mut stream) = stream else { continue };
                let mut reader = BufReader::new(stream.try_clone().expect("clone"));
                let mut line = String::new();
                // The head, to its blank line.
                while reader.read_line(&mut line).is_ok_and(|n| n > 2) {
                    line.clear();
                }
                count.fetch_add(1, Ordering::SeqCst);
                let body = doc.lock().expect("document").clone();
                let _ = write!(
                    stream,
                    "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\
                     Connection: close\r\n\r\n{body}",
                    body.len()
                );
            }
        });
        JwksServer {
            addr,
            document,
            requests,
        }
    }

    fn url(&self) -> String {
        format!("http://{}/jwks", self.addr)
    }

    fn serve(&self, document: &str) {
        *self.document.lock().expect("document") = document.to_owned();
    }

    fn requests(&self) -> usize {
        self.requests.load(Ordering::SeqCst)
    }
}

/// The keys of `files` (`rsa-1.jwks.json`, …) as one set.
fn jwks(files: &[&str]) -> String {
    let keys: Vec<Value> = files
        .iter()
        .flat_map(|f| {
            let doc: Value =
                serde_json::from_slice(&read_key(f)).unwrap_or_else(|e| panic!("{f}: {e}"));
            doc["keys"].as_array().expect("keys").clone()
        })
        .collect();
    json!({ "keys": keys }).to_string()
}

fn call(
    relay: &Server,
    header: Option<(&str, &str)>,
    method: &str,
    path: &str,
    body: Option<&str>,
) -> Response {
    relay.connect().request_with(
        method,
        path,
        &header.into_iter().collect::<Vec<_>>(),
        body.map(str::as_bytes),
    )
}

fn bearer(token: &str) -> String {
    format!("Bearer {token}")
}

fn publish(relay: &Server, auth: (&str, &str), topic: &str) -> Response {
    let body = json!({"topic": topic, "payload": {"n": 1}}).to_string();
    call(relay, Some(auth), "POST", "/api/v1/messages", Some(&body))
}

fn metric(relay: &Server, line_start: &str) -> Option<f64> {
    relay
        .get("/metrics")
        .text()
        .lines()
        .find(|l| l.starts_with(line_start))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

fn external_yaml(jwks_url: &str) -> String {
    format!(
        "auth:\n  mode: external\n  external:\n    algorithm: RS256\n    jwks_url: \"{jwks_url}\"\n    \
         jwks_refresh: 10s\n    issuer: \"{ISSUER}\"\n    audience: \"{AUDIENCE}\"\n"
    )
}

#[test]
fn jwks_tokens_are_confined_to_their_topic_patterns_on_every_entrance() {
    let idp = JwksServer::start(&jwks(&["rsa-1.jwks.json"]));
    let relay = Server::start_with_shards(&external_yaml(&idp.url()), 2);
    let token = sign_rsa(
        "rsa-private.pem",
        Some("rsa-1"),
        &claims("runner-1", json!(["read:jobs.*", "write:jobs.*"])),
    );
    let auth = bearer(&token);
    let auth = ("Authorization", auth.as_str());

    // Publish: on the pattern, yes; elsewhere 403, the bulk item by item.
    assert_eq!(publish(&relay, auth, "jobs.1").status, 201);
    let other = publish(&relay, auth, "billing");
    assert_eq!(other.status, 403, "{other:?}");
    let bulk = json!({"messages": [
        {"topic": "jobs.2", "payload": {}}, {"topic": "billing", "payload": {}}
    ]})
    .to_string();
    let bulk = call(
        &relay,
        Some(auth),
        "POST",
        "/api/v1/messages/bulk",
        Some(&bulk),
    );
    let results = bulk.json()["results"].clone();
    assert_eq!(results[0]["status"], "accepted", "{results}");
    assert_eq!(results[1]["status"], "rejected", "{results}");
    assert_eq!(results[1]["error"], "FORBIDDEN", "{results}");

    // No namespace: the shared topic space (an open-mode name), stored as written.
    let history = call(
        &relay,
        Some(auth),
        "GET",
        "/api/v1/topics/jobs.1/messages",
        None,
    );
    assert_eq!(history.status, 200, "{history:?}");
    assert_eq!(history.json()["messages"].as_array().map(Vec::len), Some(1));
    for path in [
        "/api/v1/topics/billing/messages",
        "/api/v1/topics/billing",
        "/api/v1/poll?topics=jobs.1,billing&timeout=1",
        "/api/v1/events?topics=billing",
    ] {
        assert_eq!(
            call(&relay, Some(auth), "GET", path, None).status,
            403,
            "{path}"
        );
    }
    // Listing shows only what the patterns let it read, though `billing` exists.
    let writer = sign_rsa(
        "rsa-private.pem",
        Some("rsa-1"),
        &claims("billing-service", json!(["write"])),
    );
    assert_eq!(
        publish(&relay, ("Authorization", &bearer(&writer)), "billing").status,
        201
    );
    let listed = call(&relay, Some(auth), "GET", "/api/v1/topics", None).json();
    let names: Vec<&str> = listed["topics"]
        .as_array()
        .expect("topics")
        .iter()
        .filter_map(|t| t["topic"].as_str())
        .collect();
    assert!(
        names.contains(&"jobs.1") && !names.contains(&"billing"),
        "{listed}"
    );

    // WebSocket: subscribing to a topic outside the patterns is a SUBSCRIPTION_ERROR.
    let mut ws = WsClient::try_connect_headers(relay.addr, &[], &[auth], None).expect("upgrade");
    ws.send_json(&json!({"type": "subscribe", "topics": ["billing"]}));
    let refused = ws.recv_type("error");
    assert_eq!(refused["code"], "SUBSCRIPTION_ERROR", "{refused}");
    ws.subscribe(&["jobs.1"], None);
    assert_eq!(publish(&relay, auth, "jobs.1").status, 201);
    assert_eq!(ws.recv_messages(1).len(), 1);

    // Who the relay thinks this is; the built-in endpoints are absent in external mode.
    let me = call(&relay, Some(auth), "GET", "/auth/me", None).json();
    assert_eq!(me["user_id"], "ext:runner-1", "{me}");
    assert_eq!(me["external"], true);
    let login = relay.connect().request_with(
        "POST",
        "/auth/login",
        &[("Content-Type", "application/x-www-form-urlencoded")],
        Some(b"username=a&password=b"),
    );
    assert_eq!(login.status, 404);
    // Without a token, nothing.
    assert_eq!(relay.get("/api/v1/topics/jobs.1/messages").status, 401);
    assert!(metric(&relay, "relay_jwks_keys").is_some_and(|n| n == 1.0));
}

#[test]
fn every_claim_check_refuses_over_http() {
    let idp = JwksServer::start(&jwks(&["rsa-1.jwks.json"]));
    let relay = Server::start(&external_yaml(&idp.url()));
    let base = claims("s", json!(["read"]));
    let with = |key: &str, value: Value| {
        let mut c = base.clone();
        c[key] = value;
        sign_rsa("rsa-private.pem", Some("rsa-1"), &c)
    };
    let without = |key: &str| {
        let mut c = base.clone();
        c.as_object_mut().expect("object").remove(key);
        sign_rsa("rsa-private.pem", Some("rsa-1"), &c)
    };
    let public_pem = read_key("rsa-public.pem");
    let confused = {
        // The classic confusion: HS256 keyed with the RSA public key's text.
        let mut header = Header::new(Algorithm::HS256);
        header.kid = Some("rsa-1".to_owned());
        let key = EncodingKey::from_secret(&public_pem).expect("key");
        jsonwebtoken::encode(&header, &base, &key).expect("sign")
    };
    let unsigned = format!(
        "{}.{}.",
        b64(br#"{"alg":"none","typ":"JWT","kid":"rsa-1"}"#),
        b64(base.to_string().as_bytes())
    );
    let cases = [
        (
            "valid",
            sign_rsa("rsa-private.pem", Some("rsa-1"), &base),
            200,
        ),
        ("expired", with("exp", json!(now() - 120)), 401),
        ("not yet valid", with("nbf", json!(now() + 600)), 401),
        ("wrong issuer", with("iss", json!("https://evil.test")), 401),
        ("wrong audience", with("aud", json!("another-app")), 401),
        ("no audience", without("aud"), 401),
        ("no subject", without("sub"), 401),
        (
            "signed by a key not in the set",
            sign_rsa("rsa2-private.pem", Some("rsa-1"), &base),
            401,
        ),
        ("HS256 with the public key", confused, 401),
        ("alg none", unsigned, 401),
        ("ES256 instead of RS256", sign_ec(&base), 401),
    ];
    for (what, token, status) in cases {
        let auth = bearer(&token);
        let resp = call(
            &relay,
            Some(("Authorization", &auth)),
            "GET",
            "/auth/me",
            None,
        );
        assert_eq!(resp.status, status, "{what}: {resp:?}");
        if status == 401 {
            assert_eq!(resp.header("www-authenticate"), Some("Bearer"), "{what}");
            assert_eq!(resp.json()["message"], "Invalid or expired token", "{what}");
        }
    }
    assert!(
        metric(&relay, "relay_auth_failures_total{reason=\"invalid\"}").is_some_and(|n| n >= 10.0)
    );
}

fn jwks_yaml(jwks_url: &str, refresh: &str) -> String {
    external_yaml(jwks_url).replace("jwks_refresh: 10s", &format!("jwks_refresh: {refresh}"))
}

fn me_status(relay: &Server, token: &str) -> u16 {
    let auth = bearer(token);
    call(
        relay,
        Some(("Authorization", &auth)),
        "GET",
        "/auth/me",
        None,
    )
    .status
}

/// The periodic refresh is a day away: only the early fetch a token with an unknown key id
/// asks for can pick the issuer's new key up.
#[test]
fn a_token_under_a_new_key_id_makes_the_relay_fetch_the_rotated_jwks() {
    let idp = JwksServer::start(&jwks(&["rsa-1.jwks.json"]));
    let relay = Server::start(&jwks_yaml(&idp.url(), "1d"));
    let old = sign_rsa(
        "rsa-private.pem",
        Some("rsa-1"),
        &claims("s", json!(["read"])),
    );
    let new = sign_rsa(
        "rsa2-private.pem",
        Some("rsa-2"),
        &claims("s", json!(["read"])),
    );
    assert_eq!(me_status(&relay, &old), 200);
    // The issuer starts signing with a key the relay has not fetched yet.
    idp.serve(&jwks(&["rsa-1.jwks.json", "rsa-2.jwks.json"]));
    let fetched_at_start = idp.requests();
    assert_eq!(me_status(&relay, &new), 401);
    assert!(
        eventually(Duration::from_secs(45), || me_status(&relay, &new) == 200),
        "the new key was never fetched ({} JWKS requests)",
        idp.requests()
    );
    assert!(idp.requests() > fetched_at_start);
    assert!(metric(&relay, "relay_jwks_refreshes_total{outcome=\"ok\"}").is_some_and(|n| n >= 2.0));
    // A flood of unknown key ids costs the issuer at most one fetch per 30 s gap.
    let before = idp.requests();
    for i in 0..50 {
        let kid = format!("made-up-{i}");
        let token = sign_rsa("rsa-private.pem", Some(&kid), &claims("u", json!(["read"])));
        assert_eq!(me_status(&relay, &token), 401);
    }
    let fetched = idp.requests() - before;
    assert!(fetched <= 1, "{fetched} fetches for 50 unknown key ids");
}

/// A key taken out of the set stops working, for a token already verified (and cached) too,
/// once the relay fetches the new set.
#[test]
fn a_key_dropped_from_the_jwks_stops_working_at_the_next_refresh() {
    let idp = JwksServer::start(&jwks(&["rsa-1.jwks.json", "rsa-2.jwks.json"]));
    let relay = Server::start(&jwks_yaml(&idp.url(), "10s"));
    let old = sign_rsa(
        "rsa-private.pem",
        Some("rsa-1"),
        &claims("s", json!(["read"])),
    );
    let new = sign_rsa(
        "rsa2-private.pem",
        Some("rsa-2"),
        &claims("s", json!(["read"])),
    );
    assert_eq!(me_status(&relay, &old), 200);
    assert_eq!(me_status(&relay, &new), 200);
    idp.serve(&jwks(&["rsa-2.jwks.json"]));
    assert!(
        eventually(Duration::from_secs(30), || me_status(&relay, &old) == 401),
        "the dropped key kept working"
    );
    assert_eq!(me_status(&relay, &new), 200);
}

#[test]
fn pem_keyed_external_tokens_work_beside_builtin_users_in_their_own_space() {
    let yaml = format!(
        "auth:\n  jwt_secret: \"builtin-secret-0123456789abcdef0123\"\n  \
         bootstrap_admin_username: admin\n  bootstrap_admin_password: admin-password\n  \
         external:\n    algorithm: ES256\n    public_key_file: \"{}\"\n    issuer: \"{ISSUER}\"\n    \
         audience: \"{AUDIENCE}\"\n",
        key_file("ec-public.pem")
    );
    let relay = Server::start_with_shards(&yaml, 2);
    let external = bearer(&sign_ec(&claims("scheduler", json!("read write"))));
    let external = ("Authorization", external.as_str());
    let login = relay.connect().request_with(
        "POST",
        "/auth/login",
        &[("Content-Type", "application/x-www-form-urlencoded")],
        Some(b"username=admin&password=admin-password"),
    );
    assert_eq!(login.status, 200, "{login:?}");
    let admin = bearer(login.json()["access_token"].as_str().expect("token"));
    let admin = ("Authorization", admin.as_str());
    // The same name, two topics: the admin's namespace and the shared space.
    assert_eq!(publish(&relay, external, "shared").status, 201);
    assert_eq!(publish(&relay, admin, "shared").status, 201);
    assert_eq!(publish(&relay, admin, "shared").status, 201);
    let count = |auth: (&str, &str)| {
        call(
            &relay,
            Some(auth),
            "GET",
            "/api/v1/topics/shared/messages",
            None,
        )
        .json()["messages"]
            .as_array()
            .map(Vec::len)
    };
    assert_eq!(count(external), Some(1));
    assert_eq!(count(admin), Some(2));
    // An external token has no sessions or keys here.
    assert_eq!(
        call(&relay, Some(external), "GET", "/auth/sessions", None).status,
        403
    );
    let key = json!({"name": "k", "permissions": ["write"]}).to_string();
    assert_eq!(
        call(&relay, Some(external), "POST", "/auth/api-keys", Some(&key)).status,
        403
    );
    // Without admin it cannot reach another namespace either.
    let admin_id = call(&relay, Some(admin), "GET", "/auth/me", None).json()["user_id"]
        .as_str()
        .expect("id")
        .to_owned();
    let foreign = format!("/api/v1/topics/shared/messages?owner={admin_id}");
    assert_eq!(
        call(&relay, Some(external), "GET", &foreign, None).status,
        403
    );
}

/// Logs in `user`; the `Authorization` header value.
fn login(relay: &Server, user: &str, password: &str) -> String {
    let body = format!("username={user}&password={password}");
    let resp = relay.connect().request_with(
        "POST",
        "/auth/login",
        &[("Content-Type", "application/x-www-form-urlencoded")],
        Some(body.as_bytes()),
    );
    assert_eq!(resp.status, 200, "login {user}: {resp:?}");
    bearer(resp.json()["access_token"].as_str().expect("token"))
}

const BUILTIN_YAML: &str = "auth:\n  jwt_secret: \"api-key-secret-0123456789abcdef0123\"\n  \
     bootstrap_admin_username: admin\n  bootstrap_admin_password: admin-password\n";

/// The API key checks, on a relay with the built-in users (memory or Valkey).
fn api_keys_work_and_stop(relay: &Server) -> (String, String) {
    let admin = login(relay, "admin", "admin-password");
    let admin = ("Authorization", admin.as_str());
    let register = json!({"username": "producer", "password": "producer-password",
                          "permissions": ["read", "write"]})
    .to_string();
    let created = call(
        relay,
        Some(admin),
        "POST",
        "/auth/register",
        Some(&register),
    );
    assert_eq!(created.status, 201, "{created:?}");
    let producer_id = created.json()["user_id"].as_str().expect("id").to_owned();
    let producer = login(relay, "producer", "producer-password");
    let producer = ("Authorization", producer.as_str());

    // Beyond the owner's permissions, an unknown entry, a missing name: refused.
    let body = |perms: Value| json!({"name": "galaxy", "permissions": perms}).to_string();
    let beyond = call(
        relay,
        Some(producer),
        "POST",
        "/auth/api-keys",
        Some(&body(json!(["admin"]))),
    );
    assert_eq!(beyond.status, 403, "{beyond:?}");
    let unknown = call(
        relay,
        Some(producer),
        "POST",
        "/auth/api-keys",
        Some(&body(json!(["root"]))),
    );
    assert_eq!(unknown.status, 422, "{unknown:?}");
    let key = call(
        relay,
        Some(producer),
        "POST",
        "/auth/api-keys",
        Some(&body(json!(["write:jobs.*"]))),
    );
    assert_eq!(key.status, 201, "{key:?}");
    let key = key.json();
    let api_key = key["api_key"].as_str().expect("api_key").to_owned();
    let key_id = key["key_id"].as_str().expect("key_id").to_owned();
    assert!(api_key.starts_with("prk_"), "{key}");
    assert_eq!(key["user_id"], producer_id.as_str());

    // Used as X-API-Key and as Bearer: writes jobs.* in the producer's namespace, nothing else.
    let as_header = ("X-API-Key", api_key.as_str());
    assert_eq!(publish(relay, as_header, "jobs.1").status, 201);
    let as_bearer = bearer(&api_key);
    assert_eq!(
        publish(relay, ("Authorization", &as_bearer), "jobs.1").status,
        201
    );
    assert_eq!(publish(relay, as_header, "billing").status, 403);
    assert_eq!(
        call(
            relay,
            Some(as_header),
            "GET",
            "/api/v1/topics/jobs.1/messages",
            None
        )
        .status,
        403
    );
    let seen = call(
        relay,
        Some(producer),
        "GET",
        "/api/v1/topics/jobs.1/messages",
        None,
    )
    .json();
    assert_eq!(seen["messages"].as_array().map(Vec::len), Some(2), "{seen}");
    // A key cannot mint keys; the listing never shows secrets.
    assert_eq!(
        call(
            relay,
            Some(as_header),
            "POST",
            "/auth/api-keys",
            Some(&body(json!(["write"])))
        )
        .status,
        403
    );
    let listed = call(relay, Some(producer), "GET", "/auth/api-keys", None).json();
    assert_eq!(listed.as_array().map(Vec::len), Some(1), "{listed}");
    assert!(listed[0].get("api_key").is_none() && !listed.to_string().contains(&api_key));
    let by_admin = call(
        relay,
        Some(admin),
        "GET",
        &format!("/auth/api-keys?user_id={producer_id}"),
        None,
    );
    assert_eq!(by_admin.json().as_array().map(Vec::len), Some(1));
    // A wrong secret under a real id, and a made-up id.
    let (id_part, _) = api_key.split_once('.').expect("prk_<id>.<secret>");
    let forged = format!("{id_part}.AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA");
    assert_eq!(publish(relay, ("X-API-Key", &forged), "jobs.1").status, 401);
    assert_eq!(
        publish(relay, ("X-API-Key", "prk_nope.nope"), "jobs.1").status,
        401
    );

    // Demoting the owner narrows the key at once; restoring it restores the key.
    let patch = |perms: Value| {
        let body = json!({"permissions": perms}).to_string();
        let resp = call(
            relay,
            Some(admin),
            "PATCH",
            &format!("/auth/users/{producer_id}"),
            Some(&body),
        );
        assert_eq!(resp.status, 200, "{resp:?}");
    };
    patch(json!(["read"]));
    assert_eq!(publish(relay, as_header, "jobs.1").status, 403);
    patch(json!(["read", "write"]));
    assert_eq!(publish(relay, as_header, "jobs.1").status, 201);
    (api_key, key_id)
}

fn revoke(relay: &Server, key_id: &str) {
    let producer = login(relay, "producer", "producer-password");
    let resp = call(
        relay,
        Some(("Authorization", &producer)),
        "DELETE",
        &format!("/auth/api-keys/{key_id}"),
        None,
    );
    assert_eq!(resp.status, 204, "{resp:?}");
}

#[test]
fn api_keys_on_the_memory_backend() {
    let relay = Server::start_with_shards(BUILTIN_YAML, 2);
    let (api_key, key_id) = api_keys_work_and_stop(&relay);
    // Another user cannot see or revoke it.
    let admin = login(&relay, "admin", "admin-password");
    let other =
        json!({"username": "other", "password": "other-password", "permissions": ["write"]})
            .to_string();
    assert_eq!(
        call(
            &relay,
            Some(("Authorization", &admin)),
            "POST",
            "/auth/register",
            Some(&other)
        )
        .status,
        201
    );
    let other = login(&relay, "other", "other-password");
    let resp = call(
        &relay,
        Some(("Authorization", &other)),
        "DELETE",
        &format!("/auth/api-keys/{key_id}"),
        None,
    );
    assert_eq!(resp.status, 404);
    revoke(&relay, &key_id);
    let resp = publish(&relay, ("X-API-Key", &api_key), "jobs.1");
    assert_eq!(resp.status, 401, "{resp:?}");
    assert_eq!(resp.json()["message"], "Token has been revoked");
}

#[test]
fn api_keys_on_valkey_survive_a_restart_and_revocation_closes_streams() {
    let valkey = ValkeyServer::start(ValkeyOpts::default());
    let mut relay = valkey.start_relay(BUILTIN_YAML, &[]);
    let (api_key, key_id) = api_keys_work_and_stop(&relay);
    relay.restart();
    assert_eq!(
        publish(&relay, ("X-API-Key", &api_key), "jobs.1").status,
        201
    );

    // A reading key with a WebSocket open: revoked, the stream closes at its next check.
    let producer = login(&relay, "producer", "producer-password");
    let reader = call(
        &relay,
        Some(("Authorization", &producer)),
        "POST",
        "/auth/api-keys",
        Some(&json!({"name": "dashboard", "permissions": ["read:jobs.*"]}).to_string()),
    )
    .json();
    let reader_key = reader["api_key"].as_str().expect("key").to_owned();
    let mut ws =
        WsClient::try_connect_headers(relay.addr, &[], &[("X-API-Key", &reader_key)], None)
            .expect("upgrade with a key");
    ws.subscribe(&["jobs.1"], None);
    revoke(&relay, reader["key_id"].as_str().expect("id"));
    let (code, _) = ws.expect_close(Duration::from_secs(25), 8);
    assert_eq!(code, 4003);
    revoke(&relay, &key_id);
    assert_eq!(
        publish(&relay, ("X-API-Key", &api_key), "jobs.1").status,
        401
    );
}

// Counterexamples found by review, kept as regression tests.

fn new_key(relay: &Server, auth: (&str, &str), perms: Value) -> (String, String) {
    let body = json!({"name": "k", "permissions": perms}).to_string();
    let resp = call(relay, Some(auth), "POST", "/auth/api-keys", Some(&body));
    assert_eq!(resp.status, 201, "{resp:?}");
    let v = resp.json();
    (
        v["api_key"].as_str().expect("key").to_owned(),
        v["key_id"].as_str().expect("id").to_owned(),
    )
}

fn register_user(relay: &Server, admin: (&str, &str), name: &str, perms: Value) -> String {
    let body = json!({"username": name, "password": format!("{name}-password"),
                      "permissions": perms})
    .to_string();
    let resp = call(relay, Some(admin), "POST", "/auth/register", Some(&body));
    assert_eq!(resp.status, 201, "{resp:?}");
    resp.json()["user_id"].as_str().expect("id").to_owned()
}

/// Bug (review of 6e65ab3): an admin's API key changed its owner's password and registered
/// admins, so a leaked key could mint a login outliving its revocation; a producer key listed
/// its owner's sessions. Only `/auth/me` answers an API key or an external token.
#[test]
fn api_keys_and_external_tokens_cannot_manage_users_sessions_or_keys() {
    let relay = Server::start(BUILTIN_YAML);
    let admin = login(&relay, "admin", "admin-password");
    let admin = ("Authorization", admin.as_str());
    let admin_id = call(&relay, Some(admin), "GET", "/auth/me", None).json()["user_id"]
        .as_str()
        .expect("id")
        .to_owned();
    let (key, _) = new_key(&relay, admin, json!(["admin", "read", "write"]));
    let key = ("X-API-Key", key.as_str());
    let register = json!({"username": "intruder", "password": "intruder-password",
                          "permissions": ["admin"]})
    .to_string();
    let password = json!({"password": "taken-over-password"}).to_string();
    let attempts = [
        ("POST", "/auth/register".to_owned(), Some(register)),
        ("PATCH", format!("/auth/users/{admin_id}"), Some(password)),
        ("GET", "/auth/users".to_owned(), None),
        ("GET", "/auth/sessions".to_owned(), None),
        ("POST", format!("/auth/users/{admin_id}/disconnect"), None),
        ("GET", "/auth/api-keys".to_owned(), None),
        ("POST", "/auth/logout".to_owned(), None),
    ];
    for (method, path, body) in &attempts {
        let resp = call(&relay, Some(key), method, path, body.as_deref());
        assert_eq!(
            resp.status, 403,
            "{method} {path} with an API key: {resp:?}"
        );
    }
    let me = call(&relay, Some(key), "GET", "/auth/me", None).json();
    assert_eq!(me["user_id"], admin_id.as_str(), "{me}");
    assert_eq!(
        me["api_key"]["permissions"],
        json!(["admin", "read", "write"])
    );
    // The admin's password is unchanged.
    login(&relay, "admin", "admin-password");
}

/// Bug (review of 6e65ab3): `?owner=` checked only `admin`, so a key with `admin` and
/// `read:jobs.*` read another user's `billing`, and one with `admin` alone deleted it.
#[test]
fn owner_query_honours_a_keys_patterns_and_the_routes_permission() {
    let relay = Server::start(BUILTIN_YAML);
    let admin = login(&relay, "admin", "admin-password");
    let admin = ("Authorization", admin.as_str());
    let victim_id = register_user(&relay, admin, "victim", json!(["read", "write"]));
    let victim = login(&relay, "victim", "victim-password");
    for topic in ["billing", "jobs.1"] {
        assert_eq!(
            publish(&relay, ("Authorization", &victim), topic).status,
            201
        );
    }
    let (scoped, _) = new_key(&relay, admin, json!(["admin", "read:jobs.*"]));
    let scoped = ("X-API-Key", scoped.as_str());
    let read = |topic: &str| {
        let path = format!("/api/v1/topics/{topic}/messages?owner={victim_id}");
        call(&relay, Some(scoped), "GET", &path, None).status
    };
    assert_eq!(read("jobs.1"), 200);
    assert_eq!(read("billing"), 403);
    let stats = format!("/api/v1/topics/billing?owner={victim_id}");
    assert_eq!(call(&relay, Some(scoped), "GET", &stats, None).status, 403);
    let (bare, _) = new_key(&relay, admin, json!(["admin", "write:nothing.*"]));
    let delete = format!("/api/v1/topics/billing?owner={victim_id}");
    let deleted = call(&relay, Some(("X-API-Key", &bare)), "DELETE", &delete, None);
    assert_eq!(deleted.status, 403, "{deleted:?}");
    // A logged-in admin still reaches it whole.
    let read_as_admin = call(&relay, Some(admin), "GET", &stats, None);
    assert_eq!(read_as_admin.status, 200, "{read_as_admin:?}");
}

/// Bug (review of 6e65ab3): an in-band `{"type":"auth"}` with the same subject but narrower
/// grants replaced the session's principal and left it following topics the new grants do
/// not allow. Now refused: the session keeps its own token.
#[test]
fn an_in_band_refresh_with_other_grants_is_refused() {
    const SECRET: &str = "an external issuer's secret of 32+ bytes";
    let yaml = format!(
        "auth:\n  mode: external\n  external:\n    algorithm: HS256\n    secret: \"{SECRET}\"\n"
    );
    let relay = Server::start(&yaml);
    let sign = |permissions: Value| {
        let key = EncodingKey::from_secret(SECRET.as_bytes()).expect("key");
        let claims = json!({"sub": "alice", "exp": now() + 300, "permissions": permissions});
        jsonwebtoken::encode(&Header::new(Algorithm::HS256), &claims, &key).expect("sign")
    };
    let wide = bearer(&sign(json!(["read", "write"])));
    let mut ws = WsClient::try_connect_headers(relay.addr, &[], &[("Authorization", &wide)], None)
        .expect("upgrade");
    ws.subscribe(&["billing"], None);
    ws.send_json(&json!({"type": "auth", "token": sign(json!(["read:jobs.*"]))}));
    let refused = ws.recv_type("error");
    assert_eq!(refused["code"], "AUTH_FAILED", "{refused}");
    // The same rights with a later expiry are taken.
    ws.send_json(&json!({"type": "auth", "token": sign(json!(["read", "write"]))}));
    let ok = ws.recv_type("auth");
    assert!(ok.get("expires_at").is_some(), "{ok}");
}

/// Bug (review of 6e65ab3): a presented key id went into a Valkey key unchecked; `user:<id>`
/// named the owner's key-id set and the request got a 503 instead of a 401.
#[test]
fn a_key_id_that_is_not_one_of_ours_is_a_401_without_touching_valkey() {
    let valkey = ValkeyServer::start(ValkeyOpts::default());
    let relay = valkey.start_relay(BUILTIN_YAML, &[]);
    let admin = login(&relay, "admin", "admin-password");
    let admin = ("Authorization", admin.as_str());
    let admin_id = call(&relay, Some(admin), "GET", "/auth/me", None).json()["user_id"]
        .as_str()
        .expect("id")
        .to_owned();
    new_key(&relay, admin, json!(["read"]));
    for forged in [format!("prk_user:{admin_id}.x"), "prk_../../x.y".to_owned()] {
        let resp = call(
            &relay,
            Some(("X-API-Key", &forged)),
            "GET",
            "/api/v1/topics",
            None,
        );
        assert_eq!(resp.status, 401, "{forged}: {resp:?}");
    }
}
