//! Loading end to end: defaults, every layer and key, the rules between keys, and the error
//! each bad input gets. Unit tests of the parts sit beside them.

use std::collections::HashMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::Parser;

use super::error::invalid;
use super::lists;
use super::parse::parse_addrs;
use super::settings as s;
use super::settings::{self, Kind, GIB, MIB};
use super::yaml::{file_keys, read_file};
use super::*;

const MACHINE: Machine = Machine {
    cpus: 4,
    memory_bytes: Some(8 * GIB),
};

fn no_env(_: &str) -> Option<String> {
    None
}

fn env_of(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
    let map: HashMap<String, String> = pairs
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect();
    move |name| map.get(name).cloned()
}

fn from_yaml(yaml: &str) -> Result<Config, ConfigError> {
    load_from_parts(
        &Cli::default(),
        &no_env,
        Some((Path::new("test.yaml"), yaml)),
        &MACHINE,
    )
}

fn from_env(pairs: &[(&str, &str)]) -> Result<Config, ConfigError> {
    load_from_parts(&Cli::default(), &env_of(pairs), None, &MACHINE)
}

fn defaults() -> Config {
    load_from_parts(&Cli::default(), &no_env, None, &MACHINE).expect("defaults are valid")
}

fn error_text<T: fmt::Debug>(result: Result<T, ConfigError>) -> String {
    match result {
        Ok(value) => panic!("expected an error, got {value:?}"),
        Err(e) => e.to_string(),
    }
}

fn assert_mentions(message: &str, parts: &[&str]) {
    for part in parts {
        assert!(message.contains(part), "`{part}` missing from: {message}");
    }
}

fn net(text: &str) -> IpNet {
    IpNet::parse(text).expect("valid network")
}

fn template(text: &str) -> KeyTemplate {
    KeyTemplate::parse(text).expect("valid template")
}

fn parse_sentinel_addrs(text: &str) -> Result<Vec<(String, u16)>, String> {
    let Kind::AddrList { count, .. } = &s::VALKEY_SENTINELS.kind else {
        panic!("valkey.sentinels is an address list");
    };
    parse_addrs(text, count.clone())
}

#[test]
fn defaults_are_the_documented_values() {
    let expected = Config {
        listen: "127.0.0.1:8080".parse().expect("literal"),
        shards: 4,
        log_level: LogLevel::Info,
        log_format: LogFormat::Text,
        http: HttpConfig {
            max_header_bytes: 16 * 1024,
            max_headers: 64,
            max_body_bytes: 16 * 1024 * 1024,
            header_read_timeout: Duration::from_secs(10),
            keepalive_timeout: Duration::from_secs(60),
            max_connections_per_shard: 10_000,
        },
        api: ApiConfig {
            max_bulk_messages: 1000,
            default_page_limit: 10,
            max_page_limit: 1000,
            max_payload_bytes: 1024 * 1024,
            max_topic_name_len: 255,
        },
        ws: WsConfig {
            ping_interval: Duration::from_secs(30),
            idle_timeout: Duration::from_secs(90),
            max_message_bytes: 1024 * 1024,
            max_queued_bytes: 1024 * 1024,
            max_topics: 1000,
        },
        longpoll: LongPollConfig {
            max_topics: 100,
            max_parked_per_shard: 10_000,
            default_timeout: Duration::from_secs(30),
            max_timeout: Duration::from_secs(60),
            default_limit: 100,
            max_limit: 1000,
        },
        sse: SseConfig {
            heartbeat_interval: Duration::from_secs(15),
            max_queued_bytes: 1024 * 1024,
        },
        storage: StorageConfig {
            backend: StorageBackend::Memory,
            persistent_tier_retention: Duration::from_secs(86_400),
            max_messages_per_topic: 1_000_000,
        },
        memory: MemoryConfig {
            max_bytes: 2 * 1024 * 1024 * 1024,
        },
        hot_tier: HotTierConfig {
            max_messages: 10_000,
            retention: Duration::from_secs(3600),
        },
        valkey: ValkeyConfig {
            host: "localhost".to_owned(),
            port: 6379,
            username: None,
            password: None,
            db: 0,
            use_tls: false,
            tls_ca_file: None,
            connections_per_shard: 1,
            connect_timeout: Duration::from_secs(5),
            command_timeout: Duration::from_secs(5),
            max_pending: 10_000,
            stream_key: template("topic:{topic}:stream"),
            meta_key: template("topic:{topic}:meta"),
            idempotency_key: template("topic:{topic}:idem:"),
            sentinel: None,
            cluster_nodes: None,
        },
        durability: DurabilityConfig {
            ack: AckMode::Persisted,
            replicas: 1,
            replica_timeout: Duration::from_secs(1),
        },
        idempotency: IdempotencyConfig {
            window: Duration::from_secs(600),
            max_keys: 1_000_000,
        },
        shutdown: ShutdownConfig {
            timeout: Duration::from_secs(30),
        },
        metrics: MetricsConfig {
            listen: None,
            per_topic: false,
            max_topic_series: 1000,
        },
        auth: AuthConfig {
            mode: AuthMode::None,
            jwt_secret: None,
            access_token_ttl: Duration::from_secs(600),
            refresh_token_ttl: Duration::from_secs(90 * 24 * 3600),
            bootstrap_admin: None,
            allow_unauthenticated_network: false,
            external: None,
        },
        security: SecurityConfig {
            allowed_origins: Vec::new(),
            trusted_hosts: Vec::new(),
            trusted_proxies: Vec::new(),
        },
        rate_limit: RateLimitConfig {
            address: Some(BucketConfig {
                rate: Rate::per_second(1000),
                burst: 2000,
            }),
            principal: Some(BucketConfig {
                rate: Rate::per_second(1000),
                burst: 2000,
            }),
            login: Some(BucketConfig {
                rate: Rate::per_minute(10),
                burst: 10,
            }),
            exempt: vec![net("127.0.0.0/8"), net("::1")],
            max_tracked: 100_000,
        },
        source_file: None,
    };
    assert_eq!(defaults(), expected);
}

#[test]
fn memory_default_is_a_quarter_of_the_machine_or_one_gib() {
    let with = |memory_bytes| {
        let machine = Machine {
            cpus: 1,
            memory_bytes,
        };
        load_from_parts(&Cli::default(), &no_env, None, &machine)
            .expect("valid")
            .memory
            .max_bytes as u64
    };
    assert_eq!(with(Some(8 * GIB)), 2 * GIB);
    assert_eq!(with(None), GIB);
    // A 2 MiB cgroup would give 512 KiB, below the limit: clamped instead of failing.
    assert_eq!(with(Some(2 * MIB)), MIB);
}

#[test]
fn zero_shards_means_available_cpus_capped_at_the_limit() {
    let shards = |cpus| {
        let machine = Machine {
            cpus,
            memory_bytes: None,
        };
        load_from_parts(&Cli::default(), &no_env, None, &machine)
            .expect("valid")
            .shards
    };
    assert_eq!(shards(1), 1);
    assert_eq!(shards(12), 12);
    assert_eq!(shards(5000), 1024);
    assert_eq!(from_yaml("shards: 7").expect("valid").shards, 7);
    assert_eq!(from_yaml("shards: 0").expect("valid").shards, 4);
}

const EXAMPLE: &str = include_str!("../../config.yaml.example");

#[test]
fn example_file_equals_built_in_defaults() {
    let mut from_example = load_from_parts(
        &Cli::default(),
        &no_env,
        Some((Path::new("config.yaml.example"), EXAMPLE)),
        &MACHINE,
    )
    .expect("example loads");
    assert_eq!(
        from_example.source_file.take(),
        Some(PathBuf::from("config.yaml.example"))
    );
    assert_eq!(from_example, defaults());
}

fn flattened(yaml: &str) -> Vec<&'static str> {
    let entries = read_file(Path::new("x"), yaml).expect("reads");
    entries.iter().map(|e| e.setting.path).collect()
}

#[test]
fn example_file_shows_every_key() {
    let shown = flattened(EXAMPLE);
    for spec in settings::ALL {
        // Machine-dependent, shown commented out.
        if spec.path == s::MEMORY_MAX_BYTES.path {
            assert!(EXAMPLE.contains("# max_bytes:"));
            continue;
        }
        // `null` values are not entries; check the key is written.
        let leaf = spec.path.rsplit('.').next().unwrap_or(spec.path);
        assert!(
            shown.contains(&spec.path) || EXAMPLE.contains(&format!("  {leaf}: null")),
            "{} missing from config.yaml.example",
            spec.path
        );
    }
}

/// The line of `config.yaml.example` that sets `path` or shows it commented out, with its
/// index. Sections nest by indentation, as in YAML.
fn example_line(path: &str) -> Option<(usize, &'static str)> {
    // Open sections: (indentation, name).
    let mut open: Vec<(usize, &str)> = Vec::new();
    for (index, line) in EXAMPLE.lines().enumerate() {
        let text = line.trim_start();
        let indent = line.len() - text.len();
        let commented = text.starts_with('#');
        let Some((name, rest)) = text.trim_start_matches('#').trim_start().split_once(':') else {
            continue;
        };
        let is_key = !name.is_empty()
            && name
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_');
        if !is_key {
            continue; // prose in a comment
        }
        while open.last().is_some_and(|(at, _)| *at >= indent) {
            open.pop();
        }
        let mut full: String = open
            .iter()
            .map(|(_, section)| format!("{section}."))
            .collect();
        full.push_str(name);
        if full == path {
            return Some((index, line));
        }
        // `http:` (maybe followed by a comment) opens a section; `listen: ...` is a key.
        if !commented && rest.split('#').next().unwrap_or("").trim().is_empty() {
            open.push((indent, name));
        }
    }
    None
}

#[test]
fn example_file_names_each_key_with_its_environment_variable() {
    for setting in settings::ALL {
        let line = example_line(setting.path).map(|(_, line)| line);
        let line = line.unwrap_or_else(|| panic!("{} not in the example", setting.path));
        if let Some(var) = setting.env.first() {
            assert!(
                line.contains(var),
                "{var} missing from the example's `{line}`"
            );
        }
    }
}

#[test]
fn example_file_lists_keys_in_declaration_order() {
    let mut previous: Option<(usize, &str)> = None;
    for setting in settings::ALL {
        let Some((index, _)) = example_line(setting.path) else {
            panic!("{} not in the example", setting.path);
        };
        if let Some((before, path)) = previous {
            assert!(
                index > before,
                "{} comes before {path} in the example",
                setting.path
            );
        }
        previous = Some((index, setting.path));
    }
}

const EVERY_KEY_YAML: &str = r#"
listen: "0.0.0.0:9090"
shards: 3
log_level: DEBUG
log_format: json
http:
  max_header_bytes: 32KiB
  max_headers: 100
  max_body_bytes: 64MiB
  header_read_timeout: 500ms
  keepalive_timeout: 2m
  max_connections_per_shard: 500
api:
  max_bulk_messages: 50
  default_page_limit: 20
  max_page_limit: 200
  max_payload_bytes: 2MiB
  max_topic_name_len: 100
ws:
  ping_interval: 10s
  idle_timeout: 1m
  max_message_bytes: 64KiB
  max_queued_bytes: 4MiB
  max_topics: 50
longpoll:
  max_topics: 20
  max_parked_per_shard: 500
  default_timeout: 20s
  max_timeout: 2m
  default_limit: 25
  max_limit: 250
sse:
  heartbeat_interval: 5s
  max_queued_bytes: 256KiB
storage:
  backend: valkey
  persistent_tier_retention: 48h
  max_messages_per_topic: 5000
memory:
  max_bytes: 3GiB
hot_tier:
  max_messages: 100
  retention: 30m
valkey:
  host: valkey.internal
  port: 6380
  username: relay
  password: "s3cret"
  db: 2
  use_tls: yes
  tls_ca_file: /etc/ssl/ca.pem
  connections_per_shard: 4
  connect_timeout: 2s
  command_timeout: 250ms
  max_pending: 0
  stream_key: "s:{topic}"
  meta_key: "m:{topic}"
  idempotency_key: "i:{topic}/"
durability:
  ack: buffered
  replicas: 3
  replica_timeout: 200ms
idempotency:
  window: 90s
  max_keys: 5000
shutdown:
  timeout: 2m
metrics:
  listen: "0.0.0.0:9100"
  per_topic: true
  max_topic_series: 500
auth:
  mode: builtin
  jwt_secret: "0123456789abcdef0123456789abcdef"
  access_token_ttl: 15
  refresh_token_ttl: 30
  bootstrap_admin_username: root
  bootstrap_admin_password: "correct horse"
  bootstrap_admin_email: root@example.org
  allow_unauthenticated_network: true
  external:
    algorithm: ES256
    jwks_url: https://idp.example.com/.well-known/jwks.json
    jwks_refresh: 10m
    issuer: https://idp.example.com
    audience: pulsar-relay
    leeway: 10s
    permissions_claim: scope
    subject_claim: client_id
security:
  allowed_origins: ["https://App.example.com:443", "http://localhost:5173"]
  trusted_hosts:
    - relay.example.com
    - "*.relay.example.com"
    - "[::1]"
  trusted_proxies: 10.0.0.0/8, 192.168.1.7
rate_limit:
  address_rate: 50/s
  address_burst: 100
  principal_rate: 3000/min
  principal_burst: 60
  login_rate: off
  login_burst: 3
  exempt: []
  max_tracked: 1000
"#;

#[test]
fn yaml_overrides_every_key() {
    let config = from_yaml(EVERY_KEY_YAML).expect("valid");
    let expected = Config {
        listen: "0.0.0.0:9090".parse().expect("literal"),
        shards: 3,
        log_level: LogLevel::Debug,
        log_format: LogFormat::Json,
        http: HttpConfig {
            max_header_bytes: 32 * 1024,
            max_headers: 100,
            max_body_bytes: 64 * 1024 * 1024,
            header_read_timeout: Duration::from_millis(500),
            keepalive_timeout: Duration::from_secs(120),
            max_connections_per_shard: 500,
        },
        api: ApiConfig {
            max_bulk_messages: 50,
            default_page_limit: 20,
            max_page_limit: 200,
            max_payload_bytes: 2 * 1024 * 1024,
            max_topic_name_len: 100,
        },
        ws: WsConfig {
            ping_interval: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(60),
            max_message_bytes: 64 * 1024,
            max_queued_bytes: 4 * 1024 * 1024,
            max_topics: 50,
        },
        longpoll: LongPollConfig {
            max_topics: 20,
            max_parked_per_shard: 500,
            default_timeout: Duration::from_secs(20),
            max_timeout: Duration::from_secs(120),
            default_limit: 25,
            max_limit: 250,
        },
        sse: SseConfig {
            heartbeat_interval: Duration::from_secs(5),
            max_queued_bytes: 256 * 1024,
        },
        storage: StorageConfig {
            backend: StorageBackend::Valkey,
            persistent_tier_retention: Duration::from_secs(48 * 3600),
            max_messages_per_topic: 5000,
        },
        memory: MemoryConfig {
            max_bytes: 3 * 1024 * 1024 * 1024,
        },
        hot_tier: HotTierConfig {
            max_messages: 100,
            retention: Duration::from_secs(1800),
        },
        valkey: ValkeyConfig {
            host: "valkey.internal".to_owned(),
            port: 6380,
            username: Some("relay".to_owned()),
            password: Some(Secret::new("s3cret")),
            db: 2,
            use_tls: true,
            tls_ca_file: Some(PathBuf::from("/etc/ssl/ca.pem")),
            connections_per_shard: 4,
            connect_timeout: Duration::from_secs(2),
            command_timeout: Duration::from_millis(250),
            max_pending: 0,
            stream_key: template("s:{topic}"),
            meta_key: template("m:{topic}"),
            idempotency_key: template("i:{topic}/"),
            sentinel: None,
            cluster_nodes: None,
        },
        durability: DurabilityConfig {
            ack: AckMode::Buffered,
            replicas: 3,
            replica_timeout: Duration::from_millis(200),
        },
        idempotency: IdempotencyConfig {
            window: Duration::from_secs(90),
            max_keys: 5000,
        },
        shutdown: ShutdownConfig {
            timeout: Duration::from_secs(120),
        },
        metrics: MetricsConfig {
            listen: Some("0.0.0.0:9100".parse().expect("literal")),
            per_topic: true,
            max_topic_series: 500,
        },
        auth: AuthConfig {
            mode: AuthMode::Builtin,
            jwt_secret: Some(Secret::new("0123456789abcdef0123456789abcdef")),
            access_token_ttl: Duration::from_secs(15 * 60),
            refresh_token_ttl: Duration::from_secs(30 * 24 * 3600),
            bootstrap_admin: Some(BootstrapAdmin {
                username: "root".to_owned(),
                password: Secret::new("correct horse"),
                email: Some("root@example.org".to_owned()),
            }),
            allow_unauthenticated_network: true,
            external: Some(ExternalJwtConfig {
                algorithm: jsonwebtoken::Algorithm::ES256,
                key: ExternalKeySource::Jwks {
                    url: "https://idp.example.com/.well-known/jwks.json".to_owned(),
                    refresh: Duration::from_secs(600),
                },
                issuer: Some("https://idp.example.com".to_owned()),
                audience: Some("pulsar-relay".to_owned()),
                leeway: Duration::from_secs(10),
                permissions_claim: "scope".to_owned(),
                subject_claim: "client_id".to_owned(),
            }),
        },
        security: SecurityConfig {
            allowed_origins: vec![
                "https://app.example.com".to_owned(),
                "http://localhost:5173".to_owned(),
            ],
            trusted_hosts: vec![
                "relay.example.com".to_owned(),
                "*.relay.example.com".to_owned(),
                "::1".to_owned(),
            ],
            trusted_proxies: vec![net("10.0.0.0/8"), net("192.168.1.7")],
        },
        rate_limit: RateLimitConfig {
            address: Some(BucketConfig {
                rate: Rate::per_second(50),
                burst: 100,
            }),
            principal: Some(BucketConfig {
                rate: Rate::per_minute(3000),
                burst: 60,
            }),
            login: None,
            exempt: Vec::new(),
            max_tracked: 1000,
        },
        source_file: Some(PathBuf::from("test.yaml")),
    };
    assert_eq!(config, expected);
}

/// The Sentinel keys, which exclude `valkey.host`/`valkey.port` (so they cannot join
/// `EVERY_KEY_YAML`).
const SENTINEL_KEYS_YAML: &str = r#"
valkey:
  sentinels: ["10.0.0.1:26379", "sentinel-b:26380", "[fd00::3]:26379"]
  sentinel_master: pulsar
  sentinel_username: watcher
  sentinel_password: "s3nt"
  password: data-pw
durability:
  ack: replicated
  replicas: 2
  replica_timeout: 250ms
"#;

fn sentinel_settings() -> SentinelSettings {
    SentinelSettings {
        addrs: vec![
            ("10.0.0.1".to_owned(), 26379),
            ("sentinel-b".to_owned(), 26380),
            ("fd00::3".to_owned(), 26379),
        ],
        master_name: "pulsar".to_owned(),
        username: Some("watcher".to_owned()),
        password: Some(Secret::new("s3nt")),
    }
}

#[test]
fn sentinel_and_replicated_keys_from_yaml() {
    let config = from_yaml(SENTINEL_KEYS_YAML).expect("valid");
    assert_eq!(config.valkey.sentinel, Some(sentinel_settings()));
    assert_eq!(
        config.valkey.password.as_ref().map(Secret::expose),
        Some("data-pw"),
        "the data nodes keep their own password"
    );
    assert_eq!(
        config.durability,
        DurabilityConfig {
            ack: AckMode::Replicated,
            replicas: 2,
            replica_timeout: Duration::from_millis(250),
        }
    );
    // One comma-separated string is the same list.
    let text = SENTINEL_KEYS_YAML.replace(
        r#"["10.0.0.1:26379", "sentinel-b:26380", "[fd00::3]:26379"]"#,
        r#""10.0.0.1:26379, sentinel-b:26380,[fd00::3]:26379""#,
    );
    let config = from_yaml(&text).expect("valid");
    assert_eq!(config.valkey.sentinel, Some(sentinel_settings()));
}

#[test]
fn sentinel_keys_from_the_environment() {
    let config = from_env(&[
        (
            "VALKEY_SENTINELS",
            "10.0.0.1:26379,sentinel-b:26380,[fd00::3]:26379",
        ),
        ("VALKEY_SENTINEL_MASTER", "pulsar"),
        ("VALKEY_SENTINEL_USERNAME", "watcher"),
        ("PULSAR_VALKEY_SENTINEL_PASSWORD", "s3nt"),
    ])
    .expect("valid");
    assert_eq!(config.valkey.sentinel, Some(sentinel_settings()));
    // The file's list, replaced by the environment's.
    let yaml = "valkey:\n  sentinels: [a:1]\n  sentinel_master: m\n";
    let config = load_from_parts(
        &Cli::default(),
        &env_of(&[("VALKEY_SENTINELS", "b:2")]),
        Some((Path::new("test.yaml"), yaml)),
        &MACHINE,
    )
    .expect("valid");
    let addrs = config.valkey.sentinel.map(|s| s.addrs);
    assert_eq!(addrs, Some(vec![("b".to_owned(), 2)]));
}

#[test]
fn sentinels_refuse_a_data_address_and_lone_sentinel_keys() {
    let base = "valkey:\n  sentinels: a:26379\n  sentinel_master: m\n";
    let message = error_text(from_yaml(&format!("{base}  host: 10.0.0.9\n")));
    assert_mentions(
        &message,
        &["`valkey.host`", "`valkey.sentinels` is set", "remove one"],
    );
    let message = error_text(load_from_parts(
        &Cli::default(),
        &env_of(&[("VALKEY_PORT", "6380")]),
        Some((Path::new("test.yaml"), base)),
        &MACHINE,
    ));
    assert_mentions(&message, &["`valkey.port`", "from env VALKEY_PORT"]);
    let message = error_text(from_yaml("valkey:\n  sentinels: a:26379\n"));
    assert_mentions(
        &message,
        &["`valkey.sentinels`", "`valkey.sentinel_master` too"],
    );
    let message = error_text(from_yaml("valkey:\n  sentinel_master: m\n"));
    assert_mentions(&message, &["`valkey.sentinel_master`", "only used with"]);
    let message = error_text(from_env(&[("VALKEY_SENTINEL_PASSWORD", "hunter2")]));
    assert_mentions(&message, &["`valkey.sentinel_password`", "<redacted>"]);
    assert!(!message.contains("hunter2"), "{message}");
    let message = error_text(from_yaml(&format!("{base}  sentinel_username: u\n")));
    assert_mentions(
        &message,
        &["`valkey.sentinel_username`", "needs a password"],
    );
    // Without host/port set, the defaults are simply unused.
    let config = from_yaml(base).expect("valid");
    assert!(config.valkey.sentinel.is_some());
}

/// The Valkey Cluster key, which excludes the Sentinel keys and a non-zero `db` (so it
/// cannot join `EVERY_KEY_YAML` or `SENTINEL_KEYS_YAML`).
const CLUSTER_KEYS_YAML: &str = r#"
valkey:
  cluster_nodes: ["10.0.0.1:6379", "10.0.0.2:6379"]
"#;

#[test]
fn cluster_nodes_turn_on_cluster_mode_with_hash_tagged_default_keys() {
    let config = from_yaml(CLUSTER_KEYS_YAML).expect("valid");
    assert_eq!(
        config.valkey.cluster_nodes,
        Some(vec![
            ("10.0.0.1".to_owned(), 6379),
            ("10.0.0.2".to_owned(), 6379)
        ])
    );
    // Without cluster mode the quick start's layout stays exactly as it was.
    let single = from_yaml("").expect("valid");
    assert_eq!(single.valkey.cluster_nodes, None);
    assert_eq!(
        single.valkey.stream_key.render("orders"),
        "topic:orders:stream"
    );
    let config =
        from_env(&[("VALKEY_CLUSTER_NODES", "10.0.0.1:6379, [fd00::2]:7000")]).expect("valid");
    assert_eq!(
        config.valkey.cluster_nodes,
        Some(vec![
            ("10.0.0.1".to_owned(), 6379),
            ("fd00::2".to_owned(), 7000)
        ])
    );
    let v = &config.valkey;
    assert_eq!(v.stream_key.render("orders"), "topic:{orders}:stream");
    assert_eq!(v.meta_key.render("orders"), "topic:{orders}:meta");
    assert_eq!(v.idempotency_key.render("orders"), "topic:{orders}:idem:");
    assert_eq!(v.stream_key.to_string(), "topic:{{topic}}:stream");
    // The YAML list form, and an explicit hash-tagged template.
    let yaml = "valkey:\n  cluster_nodes: [a:1, b:2]\n  stream_key: \"s:{{topic}}\"\n";
    let config = from_yaml(yaml).expect("valid");
    assert_eq!(config.valkey.stream_key.render("t"), "s:{t}");
    assert_eq!(config.valkey.cluster_nodes.map(|n| n.len()), Some(2));
}

#[test]
fn cluster_mode_refuses_sentinels_a_db_and_keys_outside_the_topic_slot() {
    let message = error_text(from_yaml(
        "valkey:\n  cluster_nodes: a:1\n  sentinels: s:1\n  sentinel_master: m\n",
    ));
    assert_mentions(&message, &["`valkey.cluster_nodes`", "Sentinel exclude"]);
    let message = error_text(from_yaml("valkey:\n  cluster_nodes: a:1\n  db: 3\n"));
    assert_mentions(&message, &["`valkey.cluster_nodes`", "only database 0"]);
    for bad in ["s:{topic}", "{s}:{{topic}}", "s:{{topic}x}", "s:{{topic}"] {
        let yaml = format!("valkey:\n  cluster_nodes: a:1\n  stream_key: \"{bad}\"\n");
        let message = error_text(from_yaml(&yaml));
        assert_mentions(&message, &["`valkey.stream_key`", "hash tag"]);
    }
    let yaml = "valkey:\n  cluster_nodes: a:1\n  meta_key: \"m:{topic}\"\n";
    assert_mentions(&error_text(from_yaml(yaml)), &["`valkey.meta_key`"]);
    let message = error_text(from_env(&[("VALKEY_CLUSTER_NODES", "a")]));
    assert_mentions(&message, &["`valkey.cluster_nodes`", "no `:port`"]);
}

#[test]
fn sentinel_addresses_are_checked_one_by_one() {
    assert_eq!(
        parse_sentinel_addrs(" a:1 , [::1]:2,b.example:65535"),
        Ok(vec![
            ("a".to_owned(), 1),
            ("::1".to_owned(), 2),
            ("b.example".to_owned(), 65535)
        ])
    );
    for (bad, why) in [
        ("a", "no `:port`"),
        ("a:0", "from 1 to 65535"),
        ("a:70000", "from 1 to 65535"),
        ("a:x", "from 1 to 65535"),
        (":1", "no valid host"),
        ("::1:26379", "[addr]:port"),
        ("[::1]", "no port"),
        ("a:1,,b:2", "empty entry"),
        ("a:1,a:1", "listed twice"),
    ] {
        let error = parse_sentinel_addrs(bad).expect_err(bad);
        assert!(error.contains(why), "{bad}: {error}");
    }
    let many: Vec<String> = (1..=17).map(|p| format!("s:{p}")).collect();
    assert!(parse_sentinel_addrs(&many.join(",")).is_err());
    let message = error_text(from_yaml(
        "valkey:\n  sentinels: [a:1, b]\n  sentinel_master: m\n",
    ));
    assert_mentions(&message, &["`valkey.sentinels`", "`b` has no `:port`"]);
}

#[test]
fn replica_timeout_must_stay_below_the_command_timeout() {
    let message = error_text(from_yaml(
        "durability:\n  ack: replicated\n  replica_timeout: 5s\n",
    ));
    assert_mentions(
        &message,
        &[
            "`durability.replica_timeout`",
            "less than `valkey.command_timeout` = 5s",
        ],
    );
    // Only `ack: replicated` sends WAITs: a short command timeout alone stays valid.
    assert!(from_yaml("valkey:\n  command_timeout: 500ms\n").is_ok());
    assert!(from_yaml(
        "valkey:\n  command_timeout: 500ms\ndurability:\n  ack: replicated\n  \
         replica_timeout: 100ms\n"
    )
    .is_ok());
}

#[test]
fn the_yaml_schema_covers_exactly_the_key_table() {
    let mut from_yaml = flattened(EVERY_KEY_YAML);
    for key in flattened(SENTINEL_KEYS_YAML)
        .into_iter()
        .chain(flattened(CLUSTER_KEYS_YAML))
        .chain(flattened(&external_secret_yaml()))
        .chain(flattened(&external_pem_yaml()))
    {
        if !from_yaml.contains(&key) {
            from_yaml.push(key);
        }
    }
    let mut table: Vec<&str> = settings::ALL.iter().map(|k| k.path).collect();
    from_yaml.sort_unstable();
    table.sort_unstable();
    assert_eq!(from_yaml, table);
}

#[test]
fn empty_file_null_sections_and_comments_only_give_defaults() {
    for yaml in [
        "",
        "# nothing\n",
        "memory:\n  # max_bytes: 1GiB\nvalkey:\n",
        "listen: ~\n",
    ] {
        let mut config = from_yaml(yaml).expect("valid");
        config.source_file = None;
        assert_eq!(config, defaults(), "for {yaml:?}");
    }
}

#[test]
fn env_overrides_yaml() {
    let yaml = "valkey:\n  host: from-file\n  port: 7000\nlog_level: debug\n";
    let env = env_of(&[("VALKEY_HOST", "from-env"), ("LOG_LEVEL", "error")]);
    let config = load_from_parts(
        &Cli::default(),
        &env,
        Some((Path::new("c.yaml"), yaml)),
        &MACHINE,
    )
    .expect("valid");
    assert_eq!(config.valkey.host, "from-env");
    assert_eq!(
        config.valkey.port, 7000,
        "file value kept where env is silent"
    );
    assert_eq!(config.log_level, LogLevel::Error);
}

#[test]
fn pulsar_prefix_wins_over_unprefixed() {
    let config = from_env(&[
        ("VALKEY_PORT", "1111"),
        ("PULSAR_VALKEY_PORT", "2222"),
        ("PULSAR_STORAGE_BACKEND", "valkey"),
        ("STORAGE_BACKEND", "memory"),
    ])
    .expect("valid");
    assert_eq!(config.valkey.port, 2222);
    assert_eq!(config.storage.backend, StorageBackend::Valkey);
    // An empty prefixed value counts as unset and falls through.
    let config = from_env(&[("VALKEY_PORT", "1111"), ("PULSAR_VALKEY_PORT", "")]).expect("valid");
    assert_eq!(config.valkey.port, 1111);
}

#[test]
fn every_environment_variable_is_applied() {
    let config = from_env(&[
        ("STORAGE_BACKEND", "VALKEY"),
        ("VALKEY_HOST", "10.0.0.5"),
        ("VALKEY_PORT", " 6390 "),
        ("VALKEY_USERNAME", "relay"),
        ("VALKEY_PASSWORD", " pw with spaces "),
        ("VALKEY_DB", "3"),
        ("VALKEY_USE_TLS", "1"),
        ("VALKEY_TLS_CA_FILE", "/ca.pem"),
        ("PERSISTENT_TIER_RETENTION", "3600"),
        ("MAX_MESSAGES_PER_TOPIC", "42"),
        ("MEMORY_MAX_BYTES", "64MiB"),
        ("LOG_LEVEL", "WARNING"),
        ("LOG_FORMAT", "JSON"),
        ("PULSAR_LISTEN", "[::1]:9000"),
        ("PULSAR_SHARDS", "2"),
        ("PULSAR_METRICS_LISTEN", " [::1]:9100 "),
    ])
    .expect("valid");
    assert_eq!(config.storage.backend, StorageBackend::Valkey);
    assert_eq!(config.valkey.host, "10.0.0.5");
    assert_eq!(config.valkey.port, 6390, "surrounding spaces trimmed");
    assert_eq!(config.valkey.username.as_deref(), Some("relay"));
    assert_eq!(
        config.valkey.password.as_ref().map(Secret::expose),
        Some(" pw with spaces "),
        "a password is taken verbatim"
    );
    assert_eq!(config.valkey.db, 3);
    assert!(config.valkey.use_tls);
    assert_eq!(config.valkey.tls_ca_file, Some(PathBuf::from("/ca.pem")));
    assert_eq!(
        config.storage.persistent_tier_retention,
        Duration::from_secs(3600)
    );
    assert_eq!(config.storage.max_messages_per_topic, 42);
    assert_eq!(config.memory.max_bytes, 64 * 1024 * 1024);
    assert_eq!(config.log_level, LogLevel::Warn);
    assert_eq!(config.log_format, LogFormat::Json);
    assert_eq!(config.listen, "[::1]:9000".parse().expect("literal"));
    assert_eq!(config.shards, 2);
    assert_eq!(
        config.metrics.listen,
        Some("[::1]:9100".parse().expect("literal"))
    );
}

#[test]
fn list_settings_take_json_arrays_and_comma_lists_from_the_environment() {
    // The Python relay's form, its unprefixed and PULSAR_ names.
    let config = from_env(&[
        (
            "PULSAR_ALLOWED_ORIGINS",
            r#"["https://a.example","https://b.example:8443"]"#,
        ),
        ("TRUSTED_HOSTS", r#"["relay.example.com", "*.example.org"]"#),
    ])
    .expect("valid");
    assert_eq!(
        config.security.allowed_origins,
        ["https://a.example", "https://b.example:8443"]
    );
    assert_eq!(
        config.security.trusted_hosts,
        ["relay.example.com", "*.example.org"]
    );
    // Comma-separated, which the Python relay could not read.
    let config = from_env(&[
        (
            "ALLOWED_ORIGINS",
            "https://a.example, http://localhost:5173",
        ),
        ("PULSAR_TRUSTED_HOSTS", "relay.example.com,127.0.0.1"),
        ("PULSAR_TRUSTED_PROXIES", "10.0.0.0/8,fd00::/8"),
        ("PULSAR_RATE_LIMIT_EXEMPT", "[]"),
        ("PULSAR_RATE_LIMIT_ADDRESS_RATE", "5/s"),
        ("PULSAR_RATE_LIMIT_PRINCIPAL_RATE", "off"),
        ("PULSAR_RATE_LIMIT_LOGIN_RATE", "2/h"),
    ])
    .expect("valid");
    assert_eq!(
        config.security.allowed_origins,
        ["https://a.example", "http://localhost:5173"]
    );
    assert_eq!(
        config.security.trusted_hosts,
        ["relay.example.com", "127.0.0.1"]
    );
    assert_eq!(
        config.security.trusted_proxies,
        [net("10.0.0.0/8"), net("fd00::/8")]
    );
    assert!(
        config.rate_limit.exempt.is_empty(),
        "`[]` clears the default"
    );
    assert_eq!(
        config.rate_limit.address.map(|b| b.rate),
        Some(Rate::per_second(5))
    );
    assert_eq!(config.rate_limit.principal, None, "off");
    assert_eq!(
        config.rate_limit.login.map(|b| b.rate),
        Some(Rate {
            count: 2,
            per: Duration::from_secs(3600)
        })
    );
}

#[test]
fn list_settings_in_yaml_are_lists_or_strings() {
    let origins = |yaml: &str| {
        from_yaml(yaml)
            .map(|c| c.security.allowed_origins)
            .expect("valid")
    };
    let both = ["https://a.example", "https://b.example"];
    assert_eq!(
        origins(
            "security:\n  allowed_origins:\n    - https://a.example\n    - https://b.example\n"
        ),
        both
    );
    assert_eq!(
        origins("security:\n  allowed_origins: [https://a.example, https://b.example]\n"),
        both
    );
    assert_eq!(
        origins("security:\n  allowed_origins: 'https://a.example,https://b.example'\n"),
        both
    );
    assert_eq!(
        origins("security:\n  allowed_origins: '[\"https://a.example\",\"https://b.example\"]'\n"),
        both
    );
    assert_eq!(origins("security:\n  allowed_origins: ['*']\n"), ["*"]);
    assert!(origins("security:\n  allowed_origins: []\n").is_empty());
    // null is unset: the default.
    let config = from_yaml("rate_limit:\n  exempt: null\n").expect("valid");
    assert_eq!(config.rate_limit.exempt, defaults().rate_limit.exempt);
}

#[test]
fn bad_lists_name_the_key_the_source_and_what_is_wrong() {
    let message = error_text(from_env(&[(
        "PULSAR_ALLOWED_ORIGINS",
        r#"["https://a.example","#,
    )]));
    assert_mentions(
        &message,
        &[
            "`security.allowed_origins`",
            "(from env PULSAR_ALLOWED_ORIGINS)",
            "a JSON array",
            "or a comma-separated list of origins",
            "not a JSON array of strings (",
        ],
    );
    let message = error_text(from_env(&[("ALLOWED_ORIGINS", "https://a.example/")]));
    assert_mentions(
        &message,
        &["`https://a.example/` is not an origin", "a path"],
    );
    let message = error_text(from_yaml(
        "security:\n  trusted_hosts: [relay.example.com:8080]\n",
    ));
    assert_mentions(
        &message,
        &[
            "`security.trusted_hosts` (from test.yaml:2:",
            "`relay.example.com:8080` is not a host name",
        ],
    );
    let message = error_text(from_yaml("rate_limit:\n  exempt: 10.0.0.0/40\n"));
    assert_mentions(
        &message,
        &["`rate_limit.exempt`", "prefix length must be 0 to 32"],
    );
    let message = error_text(from_yaml("security:\n  trusted_proxies: a,,b\n"));
    assert_mentions(&message, &["an empty entry"]);
    let message = error_text(from_yaml("security:\n  allowed_origins: {a: 1}\n"));
    assert_mentions(&message, &["a list of strings, or one string"]);
}

#[test]
fn declared_list_defaults_are_valid_entries() {
    for setting in settings::ALL {
        let Kind::List { default, item } = setting.kind else {
            continue;
        };
        for entry in default {
            let valid = match item {
                settings::ListItem::Origin => lists::normalize_origin(entry).is_ok(),
                settings::ListItem::HostPattern => lists::host_pattern(entry).is_ok(),
                settings::ListItem::IpNet => IpNet::parse(entry).is_ok(),
            };
            assert!(valid, "{}: default entry {entry}", setting.path);
        }
    }
}

#[test]
fn generic_listen_and_shards_variables_are_ignored() {
    let config = from_env(&[("LISTEN", "0.0.0.0:1"), ("SHARDS", "9")]).expect("valid");
    assert_eq!(config.listen, defaults().listen);
    assert_eq!(config.shards, MACHINE.cpus);
}

#[test]
fn cli_overrides_env_and_file() {
    let cli = Cli::try_parse_from(["pulsar-relay", "--listen", "0.0.0.0:7777", "--shards", "6"])
        .expect("valid flags");
    let env = env_of(&[
        ("PULSAR_LISTEN", "127.0.0.1:1"),
        ("PULSAR_SHARDS", "2"),
        ("PULSAR_ALLOW_UNAUTHENTICATED_NETWORK", "true"),
    ]);
    let yaml = "listen: 127.0.0.1:2\nshards: 3\n";
    let config =
        load_from_parts(&cli, &env, Some((Path::new("c.yaml"), yaml)), &MACHINE).expect("valid");
    assert_eq!(config.listen, "0.0.0.0:7777".parse().expect("literal"));
    assert_eq!(config.shards, 6);
}

#[test]
fn seed_documents_forms_load() {
    // 003 quick start, `config.yaml` retention section and tuning section.
    let config = from_yaml(
        "storage:\n  persistent_tier_retention: 24h  # How long to keep in Valkey\n  \
         max_messages_per_topic: 1000000 # Max messages per topic stream\n\
         valkey:\n  pool_size: 100  # Increase for high concurrency\n",
    )
    .expect("seed YAML loads");
    assert_eq!(
        config.storage.persistent_tier_retention,
        Duration::from_secs(86_400)
    );
    assert_eq!(config.storage.max_messages_per_topic, 1_000_000);
    assert_eq!(config.valkey.connections_per_shard, 100);
    // 000 storage backend, environment section.
    let config = from_env(&[
        ("STORAGE_BACKEND", "valkey"),
        ("VALKEY_HOST", "localhost"),
        ("VALKEY_PORT", "6379"),
        ("VALKEY_PASSWORD", ""),
        ("VALKEY_USE_TLS", "false"),
        ("PERSISTENT_TIER_RETENTION", "86400"),
        ("MAX_MESSAGES_PER_TOPIC", "1000000"),
    ])
    .expect("seed env loads");
    assert_eq!(config.storage.backend, StorageBackend::Valkey);
    assert_eq!(config.valkey.password, None, "empty password = none");
    assert!(!config.valkey.use_tls);
    assert_eq!(
        config.storage.persistent_tier_retention,
        Duration::from_secs(86_400)
    );
}

#[test]
fn pool_size_and_connections_per_shard_together_are_rejected() {
    let message = error_text(from_yaml(
        "valkey:\n  connections_per_shard: 2\n  pool_size: 100\n",
    ));
    assert_mentions(
        &message,
        &[
            "`valkey.connections_per_shard`",
            "`100`",
            "`valkey.pool_size`",
            "only one",
        ],
    );
    // An out-of-range alias names the key as written.
    let message = error_text(from_yaml("valkey:\n  pool_size: 1000\n"));
    assert_mentions(
        &message,
        &["`1000`", "from `valkey.pool_size` in test.yaml:2:14"],
    );
}

#[test]
fn sizes_accept_units_and_plain_integers() {
    let body = |text: &str| {
        from_yaml(&format!(
            "http:\n  max_body_bytes: {text}\napi:\n  max_payload_bytes: 64\n"
        ))
        .map(|c| c.http.max_body_bytes)
    };
    assert_eq!(body("64MiB").expect("valid"), 64 * 1024 * 1024);
    assert_eq!(body("16KiB").expect("valid"), 16 * 1024);
    assert_eq!(body("16 KiB").expect("valid"), 16 * 1024);
    assert_eq!(body("1048576").expect("valid"), 1_048_576);
    assert_eq!(body("1_048_576").expect("valid"), 1_048_576);
    assert_eq!(body("16MB").expect("valid"), 16_000_000);
    assert_eq!(body("1.5MiB").expect("valid"), 1_572_864);
    for bad in ["abc", "-1", "16XB", "1e6", "''", "_1", "1__0", "MiB"] {
        let message = error_text(body(bad));
        assert_mentions(&message, &["`http.max_body_bytes`", "expected a size"]);
    }
}

#[test]
fn log_level_is_case_insensitive_and_accepts_warning() {
    for (text, level) in [
        ("TRACE", LogLevel::Trace),
        ("Debug", LogLevel::Debug),
        ("info", LogLevel::Info),
        ("WARNING", LogLevel::Warn),
        ("warn", LogLevel::Warn),
        ("Error", LogLevel::Error),
    ] {
        let config = from_env(&[("LOG_LEVEL", text)]).expect("valid");
        assert_eq!(config.log_level, level, "{text}");
    }
    assert_eq!(LogLevel::Warn.as_filter_str(), "warn");
}

/// (YAML, key, shown value, part of the expectation) for every rule.
#[rustfmt::skip]
const INVALID: &[(&str, &str, &str, &str)] = &[
    ("listen: localhost:80", "listen", "localhost:80",
        "an IP address and port"),
    ("listen: 1.2.3.4", "listen", "1.2.3.4",
        "an IP address and port"),
    ("shards: 1025", "shards", "1025",
        "from 0 to 1024"),
    ("shards: many", "shards", "many",
        "an integer"),
    ("log_level: verbose", "log_level", "verbose",
        "`trace`, `debug`"),
    ("log_format: xml", "log_format", "xml",
        "`text` or `json`"),
    ("http:\n  max_header_bytes: 512", "http.max_header_bytes", "512",
        "from 1KiB to 1MiB"),
    ("http:\n  max_headers: 4", "http.max_headers", "4",
        "from 8 to 1024"),
    ("http:\n  max_body_bytes: 2GiB", "http.max_body_bytes", "2GiB",
        "from 1KiB to 1GiB"),
    ("http:\n  header_read_timeout: 0", "http.header_read_timeout", "0",
        "from 1ms to 1h"),
    ("http:\n  keepalive_timeout: soon", "http.keepalive_timeout", "soon",
        "a duration"),
    ("http:\n  keepalive_timeout: 2d", "http.keepalive_timeout", "2d",
        "from 1ms to 24h"),
    ("http:\n  max_connections_per_shard: 0", "http.max_connections_per_shard", "0",
        "from 1 to 1000000"),
    ("api:\n  max_bulk_messages: 0", "api.max_bulk_messages", "0",
        "from 1 to 1000000"),
    ("api:\n  default_page_limit: 0", "api.default_page_limit", "0",
        "from 1 to 1000000"),
    ("api:\n  default_page_limit: 2000", "api.default_page_limit", "2000",
        "at most `api.max_page_limit` = 1000 (built-in default)"),
    ("api:\n  max_page_limit: 5", "api.max_page_limit", "5",
        "at least `api.default_page_limit` = 10 (built-in default)"),
    ("api:\n  max_payload_bytes: 10", "api.max_payload_bytes", "10",
        "from 64 bytes to 1GiB"),
    ("api:\n  max_payload_bytes: 32MiB", "api.max_payload_bytes", "32MiB",
        "at most `http.max_body_bytes` = 16MiB (built-in default)"),
    ("http:\n  max_body_bytes: 512KiB", "http.max_body_bytes", "512KiB",
        "at least `api.max_payload_bytes` = 1MiB (built-in default)"),
    ("api:\n  max_topic_name_len: 0", "api.max_topic_name_len", "0",
        "from 1 to 4096"),
    ("ws:\n  ping_interval: 500ms", "ws.ping_interval", "500ms",
        "from 1s to 1h"),
    ("ws:\n  ping_interval: 2h", "ws.ping_interval", "2h",
        "from 1s to 1h"),
    ("ws:\n  idle_timeout: 2d", "ws.idle_timeout", "2d",
        "from 1s to 24h"),
    ("ws:\n  idle_timeout: 30s", "ws.idle_timeout", "30s",
        "more than `ws.ping_interval` = 30s (built-in default)"),
    ("ws:\n  ping_interval: 2m", "ws.ping_interval", "2m",
        "less than `ws.idle_timeout` = 90s (built-in default)"),
    ("ws:\n  max_message_bytes: 512", "ws.max_message_bytes", "512",
        "from 1KiB to 64MiB"),
    ("ws:\n  max_message_bytes: 65MiB", "ws.max_message_bytes", "65MiB",
        "from 1KiB to 64MiB"),
    ("ws:\n  max_queued_bytes: 32KiB", "ws.max_queued_bytes", "32KiB",
        "from 64KiB to 1GiB"),
    ("ws:\n  max_topics: 0", "ws.max_topics", "0",
        "from 1 to 100000"),
    ("ws:\n  max_topics: 100001", "ws.max_topics", "100001",
        "from 1 to 100000"),
    ("longpoll:\n  max_topics: 10001", "longpoll.max_topics", "10001",
        "from 1 to 10000"),
    ("longpoll:\n  max_parked_per_shard: 0", "longpoll.max_parked_per_shard", "0",
        "from 1 to 1000000"),
    ("longpoll:\n  default_timeout: 61s", "longpoll.default_timeout", "61s",
        "from 1s to 1m"),
    ("longpoll:\n  max_timeout: 0s", "longpoll.max_timeout", "0s",
        "from 1s to 1h"),
    ("longpoll:\n  max_timeout: 10s", "longpoll.max_timeout", "10s",
        "at least `longpoll.default_timeout` = 30s (built-in default)"),
    ("longpoll:\n  default_limit: 0", "longpoll.default_limit", "0",
        "from 1 to 100000"),
    ("longpoll:\n  default_limit: 5000", "longpoll.default_limit", "5000",
        "at most `longpoll.max_limit` = 1000 (built-in default)"),
    ("longpoll:\n  max_limit: 100001", "longpoll.max_limit", "100001",
        "from 1 to 100000"),
    ("sse:\n  heartbeat_interval: 0", "sse.heartbeat_interval", "0",
        "from 1s to 1h"),
    ("sse:\n  max_queued_bytes: 2GiB", "sse.max_queued_bytes", "2GiB",
        "from 64KiB to 1GiB"),
    ("storage:\n  backend: redis", "storage.backend", "redis",
        "`memory` or `valkey`"),
    ("storage:\n  persistent_tier_retention: abc", "storage.persistent_tier_retention", "abc",
        "a duration such as `24h` or integer seconds"),
    ("storage:\n  persistent_tier_retention: 500ms", "storage.persistent_tier_retention", "500ms",
        "from 1s to 3650d"),
    ("storage:\n  max_messages_per_topic: 0", "storage.max_messages_per_topic", "0",
        "an integer of at least 1"),
    ("memory:\n  max_bytes: 1KiB", "memory.max_bytes", "1KiB",
        "from 1MiB to 1024TiB"),
    ("memory:\n  max_bytes: 1MiB\napi:\n  max_payload_bytes: 2MiB", "memory.max_bytes", "1MiB",
        "at least `api.max_payload_bytes` = 2MiB"),
    ("hot_tier:\n  max_messages: 0", "hot_tier.max_messages", "0",
        "an integer of at least 1"),
    ("hot_tier:\n  retention: 0s", "hot_tier.retention", "0s",
        "from 1s"),
    ("valkey:\n  host: bad host", "valkey.host", "bad host",
        "without spaces"),
    ("valkey:\n  host: ''", "valkey.host", "",
        "a host name"),
    ("valkey:\n  port: 0", "valkey.port", "0",
        "from 1 to 65535"),
    ("valkey:\n  port: 70000", "valkey.port", "70000",
        "from 1 to 65535"),
    ("valkey:\n  username: a b", "valkey.username", "a b",
        "without spaces"),
    ("valkey:\n  db: -1", "valkey.db", "-1",
        "an integer from 0 to 2147483647"),
    ("valkey:\n  use_tls: maybe", "valkey.use_tls", "maybe",
        "`true` or `false`"),
    ("valkey:\n  connections_per_shard: 0", "valkey.connections_per_shard", "0",
        "from 1 to 256"),
    ("valkey:\n  connect_timeout: 0", "valkey.connect_timeout", "0",
        "from 1ms to 1h"),
    ("valkey:\n  command_timeout: 2h", "valkey.command_timeout", "2h",
        "from 1ms to 1h"),
    ("valkey:\n  max_pending: 20000000", "valkey.max_pending", "20000000",
        "from 0 to 10000000"),
    ("valkey:\n  stream_key: topic-stream", "valkey.stream_key", "topic-stream",
        "`{topic}` exactly once"),
    ("valkey:\n  meta_key: '{topic}:{topic}'", "valkey.meta_key", "{topic}:{topic}",
        "`{topic}` exactly once"),
    ("valkey:\n  meta_key: 'topic:{topic}:stream'", "valkey.meta_key", "topic:{topic}:stream",
        "to differ"),
    ("durability:\n  ack: sometimes", "durability.ack", "sometimes",
        "`persisted`, `buffered` or `replicated`"),
    ("durability:\n  replicas: 0", "durability.replicas", "0",
        "from 1 to 1000"),
    ("durability:\n  replica_timeout: 0", "durability.replica_timeout", "0",
        "from 1ms to 1h"),
    ("valkey:\n  sentinels: 'a:1'\n  sentinel_master: 'm n'", "valkey.sentinel_master", "m n",
        "without spaces"),
    ("shutdown:\n  timeout: 500ms", "shutdown.timeout", "500ms",
        "from 1s to 1h"),
    ("shutdown:\n  timeout: 2h", "shutdown.timeout", "2h",
        "from 1s to 1h"),
    ("shutdown:\n  timeout: soon", "shutdown.timeout", "soon",
        "a duration"),
    ("metrics:\n  listen: localhost:9100", "metrics.listen", "localhost:9100",
        "an IP address and port"),
    ("metrics:\n  listen: 9100", "metrics.listen", "9100",
        "an IP address and port"),
    ("metrics:\n  listen: 127.0.0.1:8080", "metrics.listen", "127.0.0.1:8080",
        "not overlapping `listen` = 127.0.0.1:8080 (built-in default)"),
    ("metrics:\n  listen: '[::]:8080'", "metrics.listen", "[::]:8080",
        "not overlapping `listen` = 127.0.0.1:8080 (built-in default)"),
    ("metrics:\n  per_topic: sometimes", "metrics.per_topic", "sometimes",
        "`true` or `false`"),
    ("metrics:\n  max_topic_series: 0", "metrics.max_topic_series", "0",
        "from 1 to 100000"),
    ("metrics:\n  max_topic_series: 100001", "metrics.max_topic_series", "100001",
        "from 1 to 100000"),
    ("security:\n  allowed_origins: app.example.com", "security.allowed_origins",
        "app.example.com", "a comma-separated list of origins"),
    ("security:\n  trusted_hosts: 'a b'", "security.trusted_hosts", "a b",
        "a comma-separated list of host names"),
    ("security:\n  trusted_proxies: proxy.internal", "security.trusted_proxies",
        "proxy.internal", "a comma-separated list of IP addresses or networks"),
    ("rate_limit:\n  address_rate: 1000", "rate_limit.address_rate", "1000",
        "a rate such as `1000/s`"),
    ("rate_limit:\n  principal_rate: 10/day", "rate_limit.principal_rate", "10/day",
        "a rate such as `1000/s`"),
    ("rate_limit:\n  login_rate: 0/min", "rate_limit.login_rate", "0/min",
        "or `off`"),
    ("rate_limit:\n  address_burst: 0", "rate_limit.address_burst", "0",
        "from 1 to 1000000000"),
    ("rate_limit:\n  principal_burst: 1000000001", "rate_limit.principal_burst",
        "1000000001", "from 1 to 1000000000"),
    ("rate_limit:\n  login_burst: -1", "rate_limit.login_burst", "-1",
        "an integer"),
    ("rate_limit:\n  exempt: '[10.0.0.1'", "rate_limit.exempt", "[10.0.0.1",
        "not a JSON array of strings"),
    ("rate_limit:\n  max_tracked: 99", "rate_limit.max_tracked", "99",
        "from 100 to 10000000"),
];

#[test]
fn every_invalid_value_names_key_value_source_and_rule() {
    for (yaml, key, value, expected) in INVALID {
        let message = error_text(from_yaml(yaml));
        assert_mentions(
            &message,
            &[
                &format!("invalid value `{value}` for `{key}` (from test.yaml:"),
                "): expected ",
                expected,
            ],
        );
    }
}

#[test]
fn invalid_values_name_the_env_var_or_flag_they_came_from() {
    let message = error_text(from_env(&[("PERSISTENT_TIER_RETENTION", "abc")]));
    assert_eq!(
        message,
        "invalid value `abc` for `storage.persistent_tier_retention` (from env \
         PERSISTENT_TIER_RETENTION): expected a duration such as `24h` or integer seconds, \
         from 1s to 3650d"
    );
    let message = error_text(from_env(&[
        ("PULSAR_VALKEY_PORT", "abc"),
        ("VALKEY_PORT", "1"),
    ]));
    assert_mentions(
        &message,
        &["`valkey.port`", "(from env PULSAR_VALKEY_PORT)"],
    );
    let cli = Cli {
        shards: Some(2000),
        ..Cli::default()
    };
    let message = error_text(load_from_parts(&cli, &no_env, None, &MACHINE));
    assert_mentions(&message, &["`2000` for `shards` (from flag --shards)"]);
    // The position in the file is the value's.
    let message = error_text(from_yaml("\nhttp:\n  max_headers: 4\n"));
    assert_mentions(&message, &["(from test.yaml:3:16)"]);
}

/// Bug (found by the `config` fuzz target): only equal stream and meta templates were
/// refused, so `s:{topic}` / `s:{topic}.m` loaded, and topic `a.m`'s stream shared the key
/// `s:a.m` with topic `a`'s metadata hash (WRONGTYPE on one of them).
#[test]
fn overlapping_key_templates_are_refused() {
    let clash = |stream: &str, meta: &str| template(stream).may_share_key(&template(meta));
    assert!(clash("s:{topic}", "s:{topic}.m"));
    assert!(clash("s:{topic}.m", "s:{topic}"));
    assert!(clash("{topic}", "x{topic}"));
    assert!(clash("a-{topic}", "{topic}-b"));
    assert!(clash("k:{topic}", "k:{topic}"));
    assert!(!clash("topic:{topic}:stream", "topic:{topic}:meta"));
    assert!(!clash("s:{topic}", "m:{topic}"));
    assert!(!clash("{topic}:s", "{topic}:m"));
    assert!(!clash("k:{topic}", "k:{topic}:m"));
    let message = error_text(from_yaml(
        "valkey:\n  stream_key: 's:{topic}'\n  meta_key: 's:{topic}.m'\n",
    ));
    assert_mentions(&message, &["`valkey.meta_key`", "to differ", "s:a.m"]);
}

/// An idempotency key is `SET`: one equal to a stream or meta key would replace the
/// topic's stream; one whose topic part is ambiguous would let a publish to one topic
/// pass for another's.
#[test]
fn idempotency_key_templates_never_meet_stream_or_meta_keys() {
    let prefixes = |idem: &str, other: &str| template(idem).may_prefix_key(&template(other));
    assert!(!prefixes("topic:{topic}:idem:", "topic:{topic}:stream"));
    assert!(!prefixes("topic:{topic}:idem:", "topic:{topic}:meta"));
    assert!(!prefixes(
        "stream:topic:{topic}:idem:",
        "stream:topic:{topic}"
    ));
    assert!(prefixes("i:{topic}:", "i:{topic}:stream"));
    assert!(!prefixes("{topic}:", "x{topic}"));
    assert!(prefixes("{topic}:", "x{topic}:s"));
    assert!(prefixes("s:{topic}", "s:{topic}"));
    assert!(template("topic:{topic}:idem:").topic_is_delimited());
    assert!(!template("i:{topic}").topic_is_delimited());
    assert!(!template("i:{topic}x").topic_is_delimited());
    let message = error_text(from_yaml(
        "valkey:\n  stream_key: 'i:{topic}:stream'\n  idempotency_key: 'i:{topic}:'\n",
    ));
    assert_mentions(
        &message,
        &["`valkey.idempotency_key`", "to differ", "stream key"],
    );
    let message = error_text(from_yaml("valkey:\n  idempotency_key: 'i:{topic}'\n"));
    assert_mentions(&message, &["`valkey.idempotency_key`", "names one topic"]);
    // The Python relay's migration layout keeps the default idempotency keys.
    assert!(from_yaml("valkey:\n  stream_key: 'stream:topic:{topic}'\n").is_ok());
}

#[test]
fn a_conflict_blames_the_more_deliberate_setting() {
    // Payload from env beats body from the file: the env var is blamed.
    let env = env_of(&[("MEMORY_MAX_BYTES", "1MiB")]);
    let yaml = "api:\n  max_payload_bytes: 2MiB\n";
    let message = error_text(load_from_parts(
        &Cli::default(),
        &env,
        Some((Path::new("c.yaml"), yaml)),
        &MACHINE,
    ));
    assert_mentions(
        &message,
        &["`memory.max_bytes` (from env MEMORY_MAX_BYTES)"],
    );
    let message = error_text(from_yaml(
        "valkey:\n  stream_key: 'k:{topic}'\n  meta_key: 'k:{topic}'\n",
    ));
    assert_mentions(&message, &["`valkey.meta_key`", "to differ"]);
}

#[test]
fn delivery_cross_key_rules_name_both_keys() {
    // Equal is not enough for the WebSocket idle timeout: it must exceed the ping interval.
    let message = error_text(from_yaml("ws:\n  ping_interval: 1m\n  idle_timeout: 60s\n"));
    assert_mentions(
        &message,
        &["`ws.ping_interval`", "`ws.idle_timeout` = 1m", "less than"],
    );
    let config = from_yaml("ws:\n  ping_interval: 59s\n  idle_timeout: 60s\n").expect("valid");
    assert_eq!(config.ws.idle_timeout, Duration::from_secs(60));

    // Equal is fine for the long-poll pairs; one more is not.
    let message = error_text(from_yaml(
        "longpoll:\n  default_timeout: 45s\n  max_timeout: 44s\n",
    ));
    assert_mentions(
        &message,
        &["`longpoll.default_timeout`", "`longpoll.max_timeout` = 44s"],
    );
    let config =
        from_yaml("longpoll:\n  default_timeout: 45s\n  max_timeout: 45s\n").expect("valid");
    assert_eq!(config.longpoll.max_timeout, Duration::from_secs(45));

    let message = error_text(from_yaml(
        "longpoll:\n  default_limit: 11\n  max_limit: 10\n",
    ));
    assert_mentions(
        &message,
        &["`longpoll.default_limit`", "`longpoll.max_limit` = 10"],
    );
    let config = from_yaml("longpoll:\n  default_limit: 10\n  max_limit: 10\n").expect("valid");
    assert_eq!(config.longpoll.default_limit, 10);
}

#[test]
fn metrics_listen_must_not_overlap_the_api_listener() {
    // Both keys are named; the more deliberate setting (the flag) is blamed.
    let cli = Cli {
        listen: Some("0.0.0.0:9100".parse().expect("literal")),
        ..Cli::default()
    };
    let yaml = "metrics:\n  listen: 127.0.0.1:9100\n";
    let message = error_text(load_from_parts(
        &cli,
        &no_env,
        Some((Path::new("c.yaml"), yaml)),
        &MACHINE,
    ));
    assert_eq!(
        message,
        "invalid value `0.0.0.0:9100` for `listen` (from flag --listen): expected an address \
         not overlapping `metrics.listen` = 127.0.0.1:9100 (from c.yaml:2:11): the same port \
         on the same or a wildcard address would take the other listener's connections"
    );
    let message = error_text(from_env(&[
        ("PULSAR_LISTEN", "10.0.0.1:9000"),
        ("PULSAR_METRICS_LISTEN", "10.0.0.1:9000"),
    ]));
    assert_mentions(
        &message,
        &[
            "for `metrics.listen` (from env PULSAR_METRICS_LISTEN)",
            "`listen` = 10.0.0.1:9000 (from env PULSAR_LISTEN)",
        ],
    );

    let metrics_listen = |listen: &str, metrics: &str| {
        from_env(&[
            ("PULSAR_LISTEN", listen),
            ("PULSAR_METRICS_LISTEN", metrics),
            ("PULSAR_ALLOW_UNAUTHENTICATED_NETWORK", "true"),
        ])
        .map(|c| c.metrics.listen)
    };
    // Another port, or the same port on two distinct specific addresses, is fine.
    for (listen, metrics) in [
        ("0.0.0.0:8080", "0.0.0.0:9100"),
        ("10.0.0.1:8080", "127.0.0.1:8080"),
        ("127.0.0.1:8080", "[::1]:8080"),
        // Port 0 picks a fresh port per bind (the test harness' `--listen 127.0.0.1:0`).
        ("127.0.0.1:0", "127.0.0.1:0"),
    ] {
        assert_eq!(
            metrics_listen(listen, metrics).expect("valid"),
            Some(metrics.parse().expect("literal")),
            "{listen} vs {metrics}"
        );
    }
    assert!(metrics_listen("[::]:8080", "127.0.0.1:8080").is_err());
    // An empty variable is unset, like every other one.
    assert_eq!(metrics_listen("127.0.0.1:8080", "").expect("valid"), None);
}

#[test]
fn shown_values_are_escaped_and_shortened() {
    let message = error_text(from_env(&[("LOG_FORMAT", "te\nxt")]));
    assert_mentions(&message, &["`te\\nxt`"]);
    let long = "x".repeat(500);
    let message = error_text(from_env(&[("LOG_FORMAT", &long)]));
    assert!(message.len() < 300, "{message}");
    assert_mentions(&message, &["xxx…`"]);
}

#[test]
fn unknown_keys_are_rejected_by_name_and_position() {
    let message = error_text(from_yaml("http:\n  max_bdy_bytes: 1\n"));
    assert_mentions(&message, &["test.yaml", "max_bdy_bytes", "line 2"]);
    let message = error_text(from_yaml("listen: 127.0.0.1:1\nlisten_addr: x\n"));
    assert_mentions(&message, &["listen_addr", "line 2"]);
    match from_yaml("\n\nbogus: 1\n") {
        Err(ConfigError::Yaml { line, .. }) => assert_eq!(line, Some(3)),
        other => panic!("expected a YAML error, got {other:?}"),
    }
}

/// The schema comes from the settings table; the message keeps serde's
/// `deny_unknown_fields` wording, with the section's keys (aliases included) in
/// declaration order.
#[test]
fn unknown_keys_list_the_keys_their_section_declares() {
    let message = error_text(from_yaml("valkey:\n  pool: 1\n"));
    assert_mentions(
        &message,
        &[
            "unknown field `pool`, expected one of host, port,",
            "tls_ca_file, connections_per_shard, pool_size, connect_timeout,",
            "sentinel_password, cluster_nodes at line 2, column 3",
        ],
    );
    let message = error_text(from_yaml("cluster: 1\n"));
    assert_mentions(
        &message,
        &["expected one of listen, shards, log_level, log_format, http, api, ws,"],
    );
    assert_eq!(file_keys("memory"), ["max_bytes"]);
    assert!(file_keys("nothing").is_empty());
}

#[test]
fn malformed_yaml_reports_path_and_location() {
    for yaml in [
        "listen: 'open\n",
        "- a\n- b\n",
        "http: 5\n",
        "valkey:\n  port: [1]\n",
        "shards: 1\nshards: 2\n",
    ] {
        match from_yaml(yaml) {
            Err(e @ ConfigError::Yaml { .. }) => {
                let message = e.to_string();
                assert_mentions(&message, &["`test.yaml`", "line "]);
            }
            other => panic!("{yaml:?}: expected a YAML error, got {other:?}"),
        }
    }
}

#[test]
fn password_is_hidden_from_debug_and_errors() {
    let config = from_yaml("valkey:\n  password: hunter2\n").expect("valid");
    assert_eq!(
        config.valkey.password.as_ref().map(Secret::expose),
        Some("hunter2")
    );
    let debug = format!("{config:?} {:#?}", config.valkey);
    assert!(!debug.contains("hunter2"), "{debug}");
    assert!(debug.contains("<redacted>"));
    // No source snippet around a syntax error next to the password.
    let message = error_text(from_yaml("valkey:\n  password: hunter2\n  port: [\n"));
    assert!(!message.contains("hunter2"), "{message}");
    // Should a rule ever reject a password, the value is not echoed.
    let error = invalid(
        &s::VALKEY_PASSWORD,
        "hunter2",
        &Origin::Env("VALKEY_PASSWORD"),
        "anything".to_owned(),
    );
    assert!(!format!("{error} {error:?}").contains("hunter2"));
}

fn temp_file(name: &str, contents: &str) -> PathBuf {
    let path =
        std::env::temp_dir().join(format!("pulsar-relay-config-{}-{name}", std::process::id()));
    std::fs::write(&path, contents).expect("temp dir writable");
    path
}

#[test]
fn explicit_file_is_read_and_must_exist() {
    let path = temp_file("explicit.yaml", "valkey:\n  port: 7001\n");
    let cli = Cli {
        config: Some(path.clone()),
        ..Cli::default()
    };
    let config = load(&cli, &no_env).expect("valid");
    assert_eq!(config.valkey.port, 7001);
    assert_eq!(config.source_file.as_deref(), Some(path.as_path()));
    std::fs::remove_file(&path).expect("remove temp file");

    let missing = PathBuf::from("/nonexistent-pulsar-relay-dir/config.yaml");
    let cli = Cli {
        config: Some(missing.clone()),
        ..Cli::default()
    };
    match load(&cli, &no_env) {
        Err(e @ ConfigError::ReadFile { .. }) => assert_mentions(
            &e.to_string(),
            &["/nonexistent-pulsar-relay-dir/config.yaml"],
        ),
        other => panic!("expected ReadFile, got {other:?}"),
    }
}

#[test]
fn implicit_file_is_used_only_without_explicit_config() {
    let implicit = temp_file("implicit.yaml", "valkey:\n  port: 7002\n");
    let explicit = temp_file("explicit2.yaml", "valkey:\n  port: 7003\n");
    let port = |cli: &Cli| {
        load_with(cli, &no_env, Some(&implicit), &MACHINE)
            .expect("valid")
            .valkey
            .port
    };
    assert_eq!(port(&Cli::default()), 7002);
    let cli = Cli {
        config: Some(explicit.clone()),
        ..Cli::default()
    };
    assert_eq!(port(&cli), 7003);
    for path in [implicit, explicit] {
        std::fs::remove_file(path).expect("remove temp file");
    }
}

/// `auth.mode`: `auto` follows the secret; the built-in tokens need a long enough one; no
/// authentication beyond loopback only when said; the bootstrap admin comes whole.
#[test]
fn auth_mode_secret_listen_and_bootstrap_rules() {
    const SECRET: &str = "0123456789abcdef0123456789abcdef";
    let auth = |pairs: &[(&str, &str)]| from_env(pairs).map(|c| c.auth);
    assert_eq!(auth(&[]).expect("valid").mode, AuthMode::None);
    let on = auth(&[("PULSAR_JWT_SECRET_KEY", SECRET)]).expect("valid");
    assert_eq!(on.mode, AuthMode::Builtin);
    assert_eq!(on.jwt_secret, Some(Secret::new(SECRET)));
    let off = auth(&[
        ("PULSAR_JWT_SECRET_KEY", SECRET),
        ("PULSAR_AUTH_MODE", "none"),
    ]);
    assert_eq!(off.expect("valid").mode, AuthMode::None);

    let message = error_text(auth(&[("PULSAR_AUTH_MODE", "builtin")]));
    assert_mentions(&message, &["auth.mode", "PULSAR_JWT_SECRET_KEY"]);
    let short = &SECRET[..31];
    let message = error_text(auth(&[("PULSAR_JWT_SECRET_KEY", short)]));
    assert_mentions(
        &message,
        &["auth.jwt_secret", "<redacted>", "at least 32 bytes"],
    );
    assert!(!message.contains(short), "{message}");

    // Beyond loopback: refused without authentication, unless said; fine with it.
    let wide = [("PULSAR_LISTEN", "0.0.0.0:8080")];
    let message = error_text(auth(&wide));
    assert_mentions(
        &message,
        &["listen", "PULSAR_ALLOW_UNAUTHENTICATED_NETWORK"],
    );
    assert!(auth(&[wide[0], ("PULSAR_ALLOW_UNAUTHENTICATED_NETWORK", "1")]).is_ok());
    assert!(auth(&[wide[0], ("PULSAR_JWT_SECRET_KEY", SECRET)]).is_ok());
    assert!(auth(&[("PULSAR_LISTEN", "[::1]:8080")]).is_ok());

    // Token lifetimes: bare integers in the Python relay's units, and the client's floor.
    let ttl = auth(&[
        ("PULSAR_ACCESS_TOKEN_EXPIRE_MINUTES", "30"),
        ("PULSAR_REFRESH_TOKEN_TTL_DAYS", "7"),
    ])
    .expect("valid");
    assert_eq!(ttl.access_token_ttl, Duration::from_secs(1800));
    assert_eq!(ttl.refresh_token_ttl, Duration::from_secs(7 * 86_400));
    let message = error_text(auth(&[("PULSAR_ACCESS_TOKEN_EXPIRE_MINUTES", "5")]));
    assert_mentions(&message, &["integer minutes", "6m"]);

    let admin = auth(&[
        ("PULSAR_BOOTSTRAP_ADMIN_USERNAME", "root"),
        ("PULSAR_BOOTSTRAP_ADMIN_PASSWORD", "long enough"),
    ])
    .expect("valid");
    assert_eq!(
        admin.bootstrap_admin.map(|a| (a.username, a.password)),
        Some(("root".to_owned(), Secret::new("long enough")))
    );
    for (pairs, mentions) in [
        (
            &[("PULSAR_BOOTSTRAP_ADMIN_USERNAME", "root")][..],
            "bootstrap_admin_password",
        ),
        (
            &[("PULSAR_BOOTSTRAP_ADMIN_PASSWORD", "long enough")][..],
            "bootstrap_admin_username",
        ),
        (
            &[
                ("PULSAR_BOOTSTRAP_ADMIN_USERNAME", "ro"),
                ("PULSAR_BOOTSTRAP_ADMIN_PASSWORD", "long enough"),
            ][..],
            "3 to 50",
        ),
        (
            &[
                ("PULSAR_BOOTSTRAP_ADMIN_USERNAME", "root"),
                ("PULSAR_BOOTSTRAP_ADMIN_PASSWORD", "short"),
            ][..],
            "at least 8",
        ),
    ] {
        assert_mentions(&error_text(auth(pairs)), &[mentions]);
    }
}

/// The external-token key sources `EVERY_KEY_YAML` cannot hold beside its JWKS URL (one
/// source only).
fn external_secret_yaml() -> String {
    "auth:\n  external:\n    algorithm: HS384\n    secret: \"an issuer's shared secret, forty-eight bytes or more!!\"\n"
        .to_owned()
}

fn external_pem_yaml() -> String {
    format!(
        "auth:\n  external:\n    public_key_file: {}/tests/keys/rsa-public.pem\n",
        env!("CARGO_MANIFEST_DIR")
    )
}

#[test]
fn external_token_keys_one_source_matching_the_algorithm() {
    let config = from_yaml(&external_secret_yaml()).expect("valid");
    // `auto` with an external key and no built-in secret: external tokens only.
    assert_eq!(config.auth.mode, AuthMode::External);
    let external = config.auth.external.expect("configured");
    assert_eq!(external.algorithm, jsonwebtoken::Algorithm::HS384);
    assert!(matches!(external.key, ExternalKeySource::Secret(_)));
    assert_eq!(external.permissions_claim, "permissions");
    assert_eq!(external.subject_claim, "sub");
    assert_eq!(external.leeway, Duration::from_secs(30));

    let config = from_yaml(&external_pem_yaml()).expect("valid");
    let external = config.auth.external.expect("configured");
    assert_eq!(external.algorithm, jsonwebtoken::Algorithm::RS256);
    assert!(
        matches!(&external.key, ExternalKeySource::PublicKeyPem(pem) if pem.starts_with(b"-----BEGIN PUBLIC KEY"))
    );

    let refused = [
        (
            "auth:\n  external:\n    secret: \"an issuer's shared secret, 32+ bytes\"\n",
            "a secret is for the HS algorithms",
        ),
        (
            "auth:\n  external:\n    algorithm: HS512\n    secret: \"an issuer's shared secret, 32+ bytes\"\n",
            "at least 64 bytes for HS512",
        ),
        (
            "auth:\n  jwt_secret: \"the one secret of 32 bytes or more!\"\n  external:\n    \
             algorithm: HS256\n    secret: \"the one secret of 32 bytes or more!\"\n",
            "a key of its own",
        ),
        (
            "auth:\n  external:\n    algorithm: HS256\n    secret: short\n",
            "at least 32 bytes",
        ),
        (
            "auth:\n  external:\n    algorithm: HS256\n    jwks_url: https://idp/jwks\n",
            "HS algorithms take",
        ),
        (
            "auth:\n  external:\n    jwks_url: http://idp.example.com/jwks\n",
            "an `https://` URL",
        ),
        (
            "auth:\n  external:\n    public_key_file: /nonexistent/key.pem\n",
            "a readable PEM file",
        ),
        (
            "auth:\n  external:\n    jwks_url: https://idp/jwks\n    public_key_file: /k.pem\n",
            "one key source only",
        ),
        (
            "auth:\n  mode: external\n",
            "only with a key for external tokens",
        ),
        (
            "auth:\n  external:\n    jwks_url: \"http://127.0.0.1:80@evil.example/jwks\"\n",
            "without user information",
        ),
        (
            "auth:\n  external:\n    algorithm: none\n    jwks_url: https://idp/jwks\n",
            "`EdDSA`",
        ),
    ];
    for (yaml, expected) in refused {
        let error = from_yaml(yaml).expect_err(yaml).to_string();
        assert!(error.contains(expected), "{yaml}: {error}");
    }
    for url in [
        "http://127.0.0.1:8080/jwks",
        "http://localhost/jwks",
        "http://[::1]:9/k",
    ] {
        let yaml = format!("auth:\n  external:\n    jwks_url: \"{url}\"\n");
        assert!(from_yaml(&yaml).is_ok(), "{url}");
    }
    // `none` ignores an external key as it ignores the built-in secret.
    let off = from_yaml(&format!(
        "auth:\n  mode: none\n{}",
        &external_secret_yaml()[6..]
    ))
    .expect("valid");
    assert_eq!(off.auth.external, None);
}
