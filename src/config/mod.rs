//! The relay's configuration: four raw layers merged into one validated, typed [`Config`].
//!
//! Layers, later ones winning key by key:
//! built-in defaults < YAML file < environment variables < command-line flags.
//! Every raw value is kept as text together with where it came from ([`Origin`]) until
//! `resolve` parses and checks it, so an error can always name the key, the offending value
//! and its source (file position, env var or flag) — the way ripgrep turns `LowArgs` into
//! `HiArgs`.
//!
//! # Layout
//! - `settings`: **every setting, declared once**: dotted path, environment variables, kind of
//!   value with its default and range, secret flag, YAML alias, `--help` note. Where is
//!   setting X declared? There, under its path. The rest of the module derives from it.
//! - `resolve`: the layers merged; each value parsed, range-checked and typed as its
//!   declaration says; the rules between keys; the result is a [`Config`].
//! - `yaml`: the file layer; its schema (sections, keys, aliases) is the settings table.
//! - `cli`: the flags ([`Cli`]) and the `--help` listings generated from the table.
//! - `parse`: value syntax (integers, sizes, durations, booleans, address lists) and the
//!   formatting of values in messages.
//! - `error`: [`ConfigError`] and [`Origin`]; secrets redacted, long values shortened.
//! - `key_template`: [`KeyTemplate`], Valkey keys rendered per topic, and their overlap checks.
//! - `lists`: list-valued settings (a JSON array or comma-separated, as the Python relay's
//!   deployments write them) and what their entries may be: origins, host patterns, IP
//!   networks ([`IpNet`]).
//! - `machine`: [`Machine`], the host probes that size the shard count and memory budget.
//! - this file: the public API: [`Config`] and its sections, the enums, the load functions.
//!
//! Adding a setting: declare it in `settings` (and show it in `config.yaml.example`, which a
//! test checks), add its typed field to the section struct here, and read it in `resolve`
//! with the getter of its kind (`self.duration(&s::AUTH_TOKEN_TTL)?.value`).
//!
//! Does not own: acting on the values (logging setup, sockets, Valkey connections) and the
//! search for `./config.yaml`, which only [`load_from_process`] does; [`load`] reads no file
//! but the one given with `--config` and no environment but the lookup it is handed.

use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

mod cli;
mod error;
mod key_template;
mod lists;
mod machine;
mod parse;
mod resolve;
mod settings;
mod yaml;

#[cfg(test)]
mod tests;

pub use cli::Cli;
pub use error::{ConfigError, Origin};
pub use key_template::{KeyTemplate, TOPIC_PLACEHOLDER};
pub use lists::{default_port, normalize_origin, split_host_port, IpNet};
pub use machine::Machine;

/// The file [`load_from_process`] reads when no `--config` is given, if it exists.
pub const DEFAULT_CONFIG_PATH: &str = "config.yaml";

// ---------------------------------------------------------------------------------------------
// The validated configuration.
// ---------------------------------------------------------------------------------------------

/// The validated configuration every other module reads. Built once at start-up, then
/// cloned into each shard (no shared state on the hot path).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Config {
    /// Where the HTTP listener (one `SO_REUSEPORT` socket per shard) binds.
    pub listen: SocketAddr,
    /// Number of shards, `shards: 0` already resolved to the CPU count.
    pub shards: usize,
    pub log_level: LogLevel,
    pub log_format: LogFormat,
    pub http: HttpConfig,
    pub api: ApiConfig,
    pub ws: WsConfig,
    pub longpoll: LongPollConfig,
    pub sse: SseConfig,
    pub storage: StorageConfig,
    pub memory: MemoryConfig,
    pub hot_tier: HotTierConfig,
    pub valkey: ValkeyConfig,
    pub durability: DurabilityConfig,
    pub idempotency: IdempotencyConfig,
    pub shutdown: ShutdownConfig,
    pub metrics: MetricsConfig,
    pub auth: AuthConfig,
    pub security: SecurityConfig,
    pub rate_limit: RateLimitConfig,
    /// The YAML file that was read, if any, so start-up can log which one was used.
    pub source_file: Option<PathBuf>,
}

/// HTTP connection and request limits.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HttpConfig {
    /// Request line plus headers; beyond it the request gets 431.
    pub max_header_bytes: usize,
    /// Number of header fields; beyond it 431 (also the size of httparse's header array).
    pub max_headers: usize,
    /// Request body; beyond it 413. Always `>= api.max_payload_bytes`.
    pub max_body_bytes: usize,
    /// From a request's first byte to its complete head (slowloris defence).
    pub header_read_timeout: Duration,
    /// Idle time allowed between requests on a keep-alive connection; also how long a body
    /// read or a response write may make no progress before the connection is dropped.
    pub keepalive_timeout: Duration,
    /// Accepted connections a shard holds at once; beyond it new ones are closed.
    pub max_connections_per_shard: usize,
}

/// Limits of the publish/read API.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ApiConfig {
    /// Messages in one bulk publish.
    pub max_bulk_messages: usize,
    /// Page size of a history read that gives no `limit`. Always `<= max_page_limit`.
    pub default_page_limit: usize,
    /// Largest `limit` a history read may ask for.
    pub max_page_limit: usize,
    /// One message's payload.
    pub max_payload_bytes: usize,
    /// Topic name length in bytes.
    pub max_topic_name_len: usize,
}

/// WebSocket delivery: keep-alive and per-connection limits.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WsConfig {
    /// How often a protocol ping goes to every client, so proxies on the path see traffic
    /// and a dead peer is noticed. Always `< idle_timeout`.
    pub ping_interval: Duration,
    /// A connection with no frame from the client (pongs count) for this long is closed.
    pub idle_timeout: Duration,
    /// Largest client frame or reassembled message; beyond it the connection is closed
    /// with 1009 (message too big).
    pub max_message_bytes: usize,
    /// Bytes queued for one connection; a consumer that falls this far behind is closed
    /// with 4008 rather than buffered without bound.
    pub max_queued_bytes: usize,
    /// Topics one session may subscribe to.
    pub max_topics: usize,
}

/// Long-poll delivery limits.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LongPollConfig {
    /// Topics one poll request may name.
    pub max_topics: usize,
    /// Poll requests a shard holds waiting at once; beyond it 503.
    pub max_parked_per_shard: usize,
    /// How long a poll waits when the request gives no `timeout`. Always `<= max_timeout`.
    pub default_timeout: Duration,
    /// Largest `timeout` a request may ask for.
    pub max_timeout: Duration,
    /// Messages per response when the request gives no `limit`. Always `<= max_limit`.
    pub default_limit: usize,
    /// Largest `limit` a request may ask for.
    pub max_limit: usize,
}

/// Server-sent events delivery.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SseConfig {
    /// A comment line goes out on a stream idle this long, so proxies do not close it
    /// (`EventSource` cannot answer pings).
    pub heartbeat_interval: Duration,
    /// Bytes queued for one stream; beyond it the stream is closed and the client resumes
    /// with `Last-Event-ID`.
    pub max_queued_bytes: usize,
}

/// Storage backend selection and retention.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StorageConfig {
    pub backend: StorageBackend,
    /// How long Valkey keeps messages (stream trimming by ID).
    pub persistent_tier_retention: Duration,
    /// Stream length cap per topic (memory backend: ring size per topic).
    pub max_messages_per_topic: usize,
}

/// Memory budget of the in-memory store.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MemoryConfig {
    /// Bytes all shards' stores may hold together; by default a quarter of the memory
    /// available to the process.
    pub max_bytes: usize,
}

/// The in-memory tier in front of Valkey (valkey backend).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HotTierConfig {
    /// Messages kept in memory per topic.
    pub max_messages: usize,
    /// How long a message stays in the hot tier.
    pub retention: Duration,
}

/// Valkey connection settings.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ValkeyConfig {
    pub host: String,
    pub port: u16,
    /// ACL user; `None` with a password means the `default` user.
    pub username: Option<String>,
    /// Hidden from `Debug`.
    pub password: Option<Secret>,
    pub db: u32,
    pub use_tls: bool,
    /// CA bundle to verify the server with; `None` = system roots. Existence is checked when
    /// connecting, not here, so loading stays free of filesystem checks.
    pub tls_ca_file: Option<PathBuf>,
    /// Pipelined connections each shard opens (YAML alias `pool_size`).
    pub connections_per_shard: usize,
    pub connect_timeout: Duration,
    pub command_timeout: Duration,
    /// Publishes queued while reconnecting; past it 503 at once. 0 = never queue.
    pub max_pending: usize,
    /// Key of a topic's stream.
    pub stream_key: KeyTemplate,
    /// Key of a topic's metadata hash. Always different from `stream_key`.
    pub meta_key: KeyTemplate,
    /// Prefix of a topic's idempotency keys: the rendered template followed by the client's
    /// key. Never a prefix of any stream or meta key, and the text after `{topic}` starts
    /// with a byte no topic name has, so a key names one topic only.
    pub idempotency_key: KeyTemplate,
    /// Find the master through Sentinel; `host` and `port` are then unused (and refused when
    /// set). The data-node settings above (auth, TLS, db, timeouts) apply to the master.
    pub sentinel: Option<SentinelSettings>,
    /// Valkey Cluster seed nodes `(host, port)` (`valkey.cluster_nodes`): set, the relay
    /// speaks Cluster (slot routing, redirections) and `host`/`port` are unused. Never with
    /// `sentinel` or a non-zero `db`; the key templates then put `{<topic>}` as the hash tag
    /// of every key (checked).
    pub cluster_nodes: Option<Vec<(String, u16)>>,
}

/// Valkey Sentinel: where the relay asks for the master (`valkey.sentinels` set).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SentinelSettings {
    /// Sentinel addresses `(host, port)`, asked in this order; no duplicates.
    pub addrs: Vec<(String, u16)>,
    /// The name the sentinels monitor the master under.
    pub master_name: String,
    /// ACL user on the sentinels; `None` with a password means `default`.
    pub username: Option<String>,
    /// The sentinels' password (hidden from `Debug`), not the data nodes'.
    pub password: Option<Secret>,
}

/// When a publish is acknowledged.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DurabilityConfig {
    pub ack: AckMode,
    /// With `ack: replicated`: replicas that must have acknowledged a publish's batch
    /// (`WAIT <replicas> ...`) before it is answered 201.
    pub replicas: u32,
    /// With `ack: replicated`: how long Valkey waits for them (`WAIT ... <timeout>`); after
    /// it, the publish is answered 503 although the master stored it. Always below
    /// `valkey.command_timeout`.
    pub replica_timeout: Duration,
}

/// Idempotent publish (`Idempotency-Key`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IdempotencyConfig {
    /// How long a key is remembered after the publish that first used it: a later publish
    /// with the same key to the same topic within it stores nothing and gets the first id.
    pub window: Duration,
    /// Memory backend: keys remembered at once, over all shards; beyond it a publish with a
    /// new key gets 503 until older keys expire (never a key forgotten inside its window).
    pub max_keys: usize,
}

/// Graceful shutdown on SIGTERM/SIGINT.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ShutdownConfig {
    /// How long in-flight work (requests, parked polls, the Valkey flush) may take after the
    /// signal before the relay exits anyway.
    pub timeout: Duration,
}

/// The Prometheus endpoint.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MetricsConfig {
    /// A second address serving only `GET /metrics`, so scraping can stay on an internal
    /// interface; `None` = `/metrics` on the API port only. Never overlaps `listen` (same
    /// non-zero port on the same or a wildcard IP), which `SO_REUSEPORT` would turn into API
    /// connections silently landing on the metrics socket.
    pub listen: Option<SocketAddr>,
    /// Message counters carry a `topic` label.
    pub per_topic: bool,
    /// With `per_topic`: distinct `topic` label values a shard emits; later topics are
    /// counted under `topic="_other"`, so cardinality stays bounded.
    pub max_topic_series: usize,
}

/// Who may do what: the built-in tokens or nobody checked.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AuthConfig {
    /// `auto` already resolved.
    pub mode: AuthMode,
    /// The HS256 key of access tokens; set (at least 32 bytes) whenever `mode` is `Builtin`.
    pub jwt_secret: Option<Secret>,
    pub access_token_ttl: Duration,
    pub refresh_token_ttl: Duration,
    /// Created (or its password reset) at start-up.
    pub bootstrap_admin: Option<BootstrapAdmin>,
    /// `mode: none` may listen beyond loopback.
    pub allow_unauthenticated_network: bool,
    /// Tokens issued elsewhere, accepted when a key for them is configured (in `builtin` and
    /// `external` mode).
    pub external: Option<ExternalJwtConfig>,
}

impl AuthConfig {
    /// Whether requests must authenticate at all.
    pub fn enabled(&self) -> bool {
        self.mode != AuthMode::None
    }

    /// Whether the relay has users of its own (login, refresh, API keys, user admin).
    pub fn builtin(&self) -> bool {
        self.mode == AuthMode::Builtin
    }
}

/// How to verify JWTs issued elsewhere (an identity provider, a job scheduler).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ExternalJwtConfig {
    /// The only algorithm accepted.
    pub algorithm: jsonwebtoken::Algorithm,
    pub key: ExternalKeySource,
    pub issuer: Option<String>,
    pub audience: Option<String>,
    /// Allowed clock difference on `exp` and `nbf`.
    pub leeway: Duration,
    pub permissions_claim: String,
    pub subject_claim: String,
}

/// Where the keys of external tokens come from; exactly one is configured.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ExternalKeySource {
    /// HS algorithms: the shared secret.
    Secret(Secret),
    /// A PEM public key, read at start-up.
    PublicKeyPem(Vec<u8>),
    /// A JWKS document, fetched at start-up and refreshed every `refresh`.
    Jwks { url: String, refresh: Duration },
}

/// The user the relay makes sure exists, with every permission.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BootstrapAdmin {
    pub username: String,
    pub password: Secret,
    pub email: Option<String>,
}

/// `auth.mode` as written (`auto` included).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AuthModeSetting {
    Auto,
    None,
    Builtin,
    External,
}

impl AuthModeSetting {
    pub fn as_str(self) -> &'static str {
        match self {
            AuthModeSetting::Auto => "auto",
            AuthModeSetting::None => "none",
            AuthModeSetting::Builtin => "builtin",
            AuthModeSetting::External => "external",
        }
    }
}

/// `auth.mode` resolved.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AuthMode {
    /// Every request is allowed everything (loopback unless told otherwise).
    None,
    /// Users, passwords and tokens of the relay's own, as the Python relay's (and external
    /// tokens too when a key for them is configured).
    Builtin,
    /// Only tokens issued elsewhere: no users, no login.
    External,
}

/// Browser safety: which pages may use the relay cross-origin, which `Host` names it answers
/// to, and which peers may name the client address (`X-Forwarded-For`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SecurityConfig {
    /// Origins (`scheme://host[:port]`, lower-case, default ports left out) whose pages may
    /// call the API cross-origin, open `/ws` and event streams; `*` = any. Empty: none
    /// (same-origin pages and non-browser clients only).
    pub allowed_origins: Vec<String>,
    /// `Host` names answered (lower-case, IPv6 without brackets): exact names, `*.suffix`
    /// wildcards or `*`. Empty: on a loopback `listen`, loopback names only; else any.
    pub trusted_hosts: Vec<String>,
    /// Peers whose `X-Forwarded-For` names the client (a load balancer): the client address
    /// is then the last entry that is not itself one of these.
    pub trusted_proxies: Vec<IpNet>,
}

/// Token-bucket rate limits, per shard.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RateLimitConfig {
    /// Per client address (IPv4 address, IPv6 /64); `None` = off.
    pub address: Option<BucketConfig>,
    /// Per authenticated principal; `None` = off.
    pub principal: Option<BucketConfig>,
    /// `POST /auth/login` per client address, on top of the address bucket; `None` = off.
    pub login: Option<BucketConfig>,
    /// Client addresses no address or login bucket applies to.
    pub exempt: Vec<IpNet>,
    /// Buckets a shard keeps per scope; idle ones beyond it are forgotten.
    pub max_tracked: usize,
}

/// One bucket's shape: refilled at `rate`, holding at most `burst` requests.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BucketConfig {
    pub rate: Rate,
    pub burst: u32,
}

/// `count` events per `per` (`1000/s`, `10/min`); a count of 0 means no limit.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Rate {
    pub count: u64,
    pub per: Duration,
}

impl Rate {
    pub const fn per_second(count: u64) -> Rate {
        Rate {
            count,
            per: Duration::from_secs(1),
        }
    }

    pub const fn per_minute(count: u64) -> Rate {
        Rate {
            count,
            per: Duration::from_secs(60),
        }
    }

    /// Events a second, as the bucket refills.
    pub fn as_per_second(self) -> f64 {
        self.count as f64 / self.per.as_secs_f64()
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum StorageBackend {
    Memory,
    Valkey,
}

impl StorageBackend {
    pub fn as_str(self) -> &'static str {
        match self {
            StorageBackend::Memory => "memory",
            StorageBackend::Valkey => "valkey",
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum LogFormat {
    Text,
    Json,
}

impl LogFormat {
    pub fn as_str(self) -> &'static str {
        match self {
            LogFormat::Text => "text",
            LogFormat::Json => "json",
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum AckMode {
    /// Acknowledge after Valkey confirmed the write.
    Persisted,
    /// Acknowledge once the write is queued in the shard.
    Buffered,
    /// Acknowledge after Valkey confirmed the write and `durability.replicas` replicas
    /// acknowledged it (one `WAIT` per pipeline batch); otherwise 503, the message possibly
    /// stored on the master.
    Replicated,
}

impl AckMode {
    pub fn as_str(self) -> &'static str {
        match self {
            AckMode::Persisted => "persisted",
            AckMode::Buffered => "buffered",
            AckMode::Replicated => "replicated",
        }
    }
}

/// Log verbosity; our own enum so this module does not depend on `tracing`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum LogLevel {
    Trace,
    Debug,
    Info,
    Warn,
    Error,
}

impl LogLevel {
    /// The directive `tracing_subscriber::EnvFilter` understands.
    pub fn as_filter_str(self) -> &'static str {
        match self {
            LogLevel::Trace => "trace",
            LogLevel::Debug => "debug",
            LogLevel::Info => "info",
            LogLevel::Warn => "warn",
            LogLevel::Error => "error",
        }
    }
}

/// A string that `Debug` never prints.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: impl Into<String>) -> Self {
        Secret(value.into())
    }

    /// The value, for the one place that must send it (Valkey `AUTH`/`HELLO`).
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(<redacted>)")
    }
}

// ---------------------------------------------------------------------------------------------
// Loading.
// ---------------------------------------------------------------------------------------------

/// Builds the configuration from defaults, the file given with `--config` (if any), the
/// environment as seen through `env`, and `cli`. Reads no other file: see
/// [`load_from_process`] for the `./config.yaml` fallback.
pub fn load(cli: &Cli, env: &dyn Fn(&str) -> Option<String>) -> Result<Config, ConfigError> {
    load_with(cli, env, None, &Machine::detect())
}

/// Every default, nothing from a file, the environment or flags: for unit tests elsewhere in
/// the crate that parse against the built-in limits.
#[cfg(test)]
pub(crate) fn built_in() -> Config {
    load(&Cli::default(), &|_| None).expect("built-in defaults are valid")
}

/// [`load`] with the process environment and, when no `--config` is given, `./config.yaml`
/// if it exists. Non-UTF-8 environment values are converted lossily (and then usually fail
/// validation by name) rather than silently ignored.
pub fn load_from_process(cli: &Cli) -> Result<Config, ConfigError> {
    let env = |name: &str| std::env::var_os(name).map(|v| v.to_string_lossy().into_owned());
    let implicit = Path::new(DEFAULT_CONFIG_PATH);
    let implicit = implicit.is_file().then_some(implicit);
    load_with(cli, &env, implicit, &Machine::detect())
}

fn load_with(
    cli: &Cli,
    env: &dyn Fn(&str) -> Option<String>,
    implicit_file: Option<&Path>,
    machine: &Machine,
) -> Result<Config, ConfigError> {
    let file = cli.config.as_deref().or(implicit_file);
    let text = match file {
        Some(path) => Some(
            std::fs::read_to_string(path).map_err(|io| ConfigError::ReadFile {
                path: path.to_owned(),
                io,
            })?,
        ),
        None => None,
    };
    let yaml = file.zip(text.as_deref());
    load_from_parts(cli, env, yaml, machine)
}

/// Everything after file I/O; tests and the `config` fuzz target enter here with in-memory
/// YAML and a fixed machine. `cli.config` is not read: `yaml` is the file's path and text.
pub fn load_from_parts(
    cli: &Cli,
    env: &dyn Fn(&str) -> Option<String>,
    yaml: Option<(&Path, &str)>,
    machine: &Machine,
) -> Result<Config, ConfigError> {
    let mut layers = resolve::Layers::default();
    if let Some((path, text)) = yaml {
        layers.apply_yaml(path, text)?;
    }
    layers.apply_env(env);
    layers.apply_cli(cli);
    let mut config = layers.resolve(machine)?;
    config.source_file = yaml.map(|(path, _)| path.to_owned());
    Ok(config)
}
