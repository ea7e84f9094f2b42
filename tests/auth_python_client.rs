//! `pulsar-relay-client` 0.2.2, unchanged, against a relay with the built-in tokens: the
//! client's whole session (login, topic creation and verification, single and bulk publishes
//! retried with their `Idempotency-Key`, long-poll with cursors, history paging, a later
//! process logging in from the saved refresh token) on the memory and the Valkey backend, and
//! users kept apart by their namespaces. Driven by tests/python/client_auth_flow.py.

mod common;

use serde_json::Value;

use common::valkey::{ValkeyOpts, ValkeyServer};
use common::Server;

const SECRET: &str = "test-secret-0123456789abcdef-0123456789";

fn auth_yaml() -> String {
    format!(
        "auth:\n  jwt_secret: \"{SECRET}\"\n  bootstrap_admin_username: admin\n  \
         bootstrap_admin_password: admin-password\n"
    )
}

fn run_flow(relay: &Server) -> Value {
    let dir = tempfile::tempdir().expect("tempdir");
    common::python::run_script(
        "client_auth_flow.py",
        &[
            &format!("http://{}", relay.addr),
            "admin",
            "admin-password",
            dir.path().to_str().expect("utf-8 path"),
        ],
    )
}

fn ids(value: &Value) -> Vec<String> {
    value
        .as_array()
        .unwrap_or_else(|| panic!("not an array: {value}"))
        .iter()
        .map(|v| v.as_str().expect("an id").to_owned())
        .collect()
}

fn check(report: &Value) {
    assert_eq!(report["register"], 201, "{report}");
    assert_eq!(report["register_again"], 400, "{report}");
    assert_eq!(report["register_other"], 201, "{report}");
    assert_eq!(report["strategy"], "password");
    assert_eq!(report["credentials_saved"], true);
    assert_eq!(report["topic_verified_twice"], true);

    // One lost response each: two attempts with one key, one message stored.
    let keys = ids(&report["single_keys"]);
    assert_eq!(keys.len(), 2, "{report}");
    assert_eq!(keys[0], keys[1]);
    let bulk_keys = ids(&report["bulk_keys"]);
    assert_eq!(bulk_keys.len(), 2, "{report}");
    assert_eq!(bulk_keys[0], bulk_keys[1]);
    let single = report["single"]["message_id"]
        .as_str()
        .expect("id")
        .to_owned();
    assert_eq!(report["single"]["topic"], "jobs");
    let bulk: Vec<String> = report["bulk"]["results"]
        .as_array()
        .expect("results")
        .iter()
        .map(|r| {
            assert_eq!(r["status"], "accepted", "{r}");
            assert_eq!(r["topic"], "jobs", "{r}");
            r["message_id"].as_str().expect("id").to_owned()
        })
        .collect();
    let mut published = vec![single];
    published.extend(bulk);

    // The first poll has no cursor: everything so far, once, under the client's topic name.
    assert_eq!(ids(&report["poll1"]), published, "{report}");
    assert_eq!(report["poll1_topics"], serde_json::json!(["jobs"]));
    // The second resumes from the cursor: only what came after.
    let after = report["after"].as_str().expect("id").to_owned();
    assert_eq!(
        ids(&report["poll2"]),
        std::slice::from_ref(&after),
        "{report}"
    );
    published.push(after);

    let paged: Vec<String> = report["history_pages"]
        .as_array()
        .expect("pages")
        .iter()
        .flat_map(ids)
        .collect();
    assert_eq!(
        paged, published,
        "history pages in order, each message once"
    );

    assert_eq!(report["later_strategy"], "refresh_token");
    assert_eq!(report["later_me"], "producer");
    assert_eq!(
        report["rotated"], true,
        "the later process saved a rotated token"
    );
    // Replaying the spent token revokes the chain: the rotated one stops working too.
    assert_eq!(report["replay_status"], 401);
    assert_eq!(report["chain_after_replay_status"], 401);
    // The other user's `jobs` is its own: empty, and verified as its own.
    assert_eq!(report["other_history"], serde_json::json!([]));
    assert_eq!(report["other_verify"], "ok");
}

#[test]
fn the_python_client_runs_its_whole_session_on_the_memory_backend() {
    let relay = Server::start_with_shards(&auth_yaml(), 2);
    check(&run_flow(&relay));
}

#[test]
fn the_python_client_runs_its_whole_session_on_valkey() {
    let valkey = ValkeyServer::start(ValkeyOpts::default());
    let relay = valkey.start_relay(&auth_yaml(), &[]);
    check(&run_flow(&relay));
}
