//! The relay's configuration: four raw layers merged into one validated, typed [`Config`].
//!
//! Layers, later ones winning key by key:
//! built-in defaults < YAML file < environment variables < command-line flags.
//! Every raw value is kept as text together with where it came from ([`Origin`]) until
//! `Layers::resolve` parses and checks it, so an error can always name the key, the
//! offending value and its source (file position, env var or flag) — the way ripgrep turns
//! `LowArgs` into `HiArgs`.
//!
//! Every setting is declared once, in module `settings` (path, environment variables, kind,
//! default, range, secrecy, help note); the environment layer, the defaults, the range checks
//! and their messages and `--help` are derived from those declarations.
//!
//! Owns: the CLI definition ([`Cli`]), the YAML schema, the validation rules (within one key
//! and between keys) and the machine probes that size the defaults (CPU count, memory
//! available to the process).
//!
//! Does not own: acting on the values (logging setup, sockets, Valkey connections) and the
//! search for `./config.yaml`, which only [`load_from_process`] does; [`load`] reads no file
//! but the one given with `--config` and no environment but the lookup it is handed.

use std::collections::HashMap;
use std::fmt;
use std::net::SocketAddr;
use std::num::NonZeroUsize;
use std::ops::RangeInclusive;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::time::Duration;

use clap::Parser;
use serde::Deserialize;
use serde_saphyr::Spanned;

mod settings;

use settings::{Kind, Setting, GIB, KIB, MIB, TIB};
// Short, because the loading code below names a declaration on nearly every line.
use settings as s;

/// The file [`load_from_process`] reads when no `--config` is given, if it exists.
pub const DEFAULT_CONFIG_PATH: &str = "config.yaml";

/// The placeholder a Valkey key template must contain exactly once.
pub const TOPIC_PLACEHOLDER: &str = "{topic}";

// ---------------------------------------------------------------------------------------------
// Command line.
// ---------------------------------------------------------------------------------------------

/// Pulsar Relay: a thread-per-core message relay (HTTP publish, in-memory hot tier, Valkey
/// Streams persistence).
#[derive(Debug, Clone, Default, PartialEq, Eq, Parser)]
#[command(name = "pulsar-relay", bin_name = "pulsar-relay", version, about, long_about = None, after_help = after_help())]
pub struct Cli {
    #[arg(
        long,
        value_name = "ADDR",
        help = flag_help("Address and port to listen on, e.g. 0.0.0.0:8080", &s::LISTEN)
    )]
    pub listen: Option<SocketAddr>,

    #[arg(
        long,
        value_name = "N",
        help = flag_help(
            "Number of shards (threads, one per core), 1..=1024; 0 = one per available CPU",
            &s::SHARDS
        )
    )]
    pub shards: Option<u64>,

    /// YAML config file to read (it must exist); without this flag ./config.yaml is read
    /// if present
    #[arg(long, value_name = "PATH")]
    pub config: Option<PathBuf>,
}

/// Lines of the generated help stay within this many columns: clap wraps its own part at 100
/// and leaves this text alone, and 96 is what the hand-written text used.
const HELP_WIDTH: usize = 96;

/// A flag's help: what it does, then its default, variable and key from the declaration.
fn flag_help(what: &str, setting: &Setting) -> String {
    let default = default_text(&setting.kind).unwrap_or_else(|| "none".to_owned());
    format!(
        "{what} (default {default}; env {}; config key `{}`)",
        setting.env.join(", "),
        setting.path
    )
}

/// `--help`'s text after the options: how the layers combine, every environment variable and
/// every file key, all from [`settings::ALL`].
fn after_help() -> String {
    let mut out = String::from(
        "Settings are layered, later layers winning key by key:\n  \
         built-in defaults < config file < environment variables < command-line flags\n\n\
         Environment variables (each also accepted as PULSAR_<NAME>, which wins when both are \
         set;\nan empty value counts as unset):\n",
    );
    // The Python relay's names first (which deployments of it already set), then this
    // relay's own PULSAR_-only ones.
    let (python, own): (Vec<&Setting>, Vec<&Setting>) = settings::ALL
        .iter()
        .copied()
        .filter(|setting| !setting.env.is_empty())
        .partition(|setting| setting.env.len() > 1);
    for setting in python.into_iter().chain(own) {
        let mut notes: Vec<&str> = Vec::new();
        if !setting.help.is_empty() {
            notes.push(setting.help);
        }
        if setting.env.len() == 1 {
            notes.push("PULSAR_ form only");
        }
        let mut text = setting.path.to_owned();
        if let Some(syntax) = env_syntax(&setting.kind) {
            text.push_str(": ");
            text.push_str(&syntax);
        }
        if !notes.is_empty() {
            text.push_str(&format!(" ({})", notes.join("; ")));
        }
        let lead = format!("  {:<25}  ", setting.env[0]);
        push_wrapped(&mut out, &lead, text.split(' ').map(str::to_owned), " ");
    }

    out.push_str(
        "\nConfig file keys (YAML, all optional, unknown keys are errors; defaults in \
         config.yaml.example):\n",
    );
    let mut sections: Vec<&str> = Vec::new();
    for setting in settings::ALL {
        if !sections.contains(&setting.section()) {
            sections.push(setting.section());
        }
    }
    let label_width = sections.iter().map(|s| s.len() + 2).max().unwrap_or(0);
    for section in sections {
        let items = settings::ALL
            .iter()
            .filter(|setting| setting.section() == section)
            .map(|setting| file_key_item(setting));
        let lead = if section.is_empty() {
            "  ".to_owned()
        } else {
            format!("  {:<label_width$}", format!("{section}:"))
        };
        push_wrapped(&mut out, &lead, items, "  ");
    }
    out.push_str(
        "\nSizes: 16KiB, 64MiB, 1GiB (KB/MB/GB are powers of 1000) or integer bytes.\n\
         Durations: 500ms, 30s, 24h, or integer seconds.",
    );
    out
}

/// A key as `--help` lists it under its section: the leaf name, its alias, and for a
/// setting no environment variable sets (whose line above carries them) its choices and
/// note.
fn file_key_item(setting: &Setting) -> String {
    let leaf = |path: &'static str| path.rsplit('.').next().unwrap_or(path);
    let mut item = leaf(setting.path).to_owned();
    if let Some(alias) = setting.alias {
        item.push_str(&format!(" (alias {})", leaf(alias)));
    }
    if setting.env.is_empty() {
        // Booleans and lists are YAML's own there; choices are not guessable.
        if let Kind::Choice { names, .. } = &setting.kind {
            item.push_str(&format!(": {}", names.join(" | ")));
        }
        if !setting.help.is_empty() {
            item.push_str(&format!(" ({})", setting.help));
        }
    }
    item
}

/// How a value is written where the kind alone does not tell (an environment variable).
/// Sizes and durations are explained once, at the end of the help.
fn env_syntax(kind: &Kind) -> Option<String> {
    match kind {
        Kind::Choice { names, .. } => Some(names.join(" | ")),
        Kind::Bool { .. } => Some("true|false|1|0|yes|no".to_owned()),
        Kind::AddrList { .. } => Some("host:port,host:port".to_owned()),
        _ => None,
    }
}

/// The declared default as the loader would print it; `None` for a setting that is unset
/// by default.
fn default_text(kind: &Kind) -> Option<String> {
    match kind {
        Kind::Addr { default } => Some(default.to_string()),
        Kind::Uint { default, .. } => Some(default.to_string()),
        Kind::Size { default, .. } => Some(format_size(*default)),
        Kind::Duration { default, .. } => Some(format_duration(*default)),
        Kind::Bool { default } => Some(default.to_string()),
        Kind::Choice { default, .. } => Some((*default).to_owned()),
        Kind::Name { default, .. } => default.map(str::to_owned),
        Kind::Template { default, .. } => Some((*default).to_owned()),
        Kind::OptionalAddr { .. } | Kind::Text | Kind::AddrList { .. } => None,
    }
}

/// Appends `lead` and `items` separated by `sep`, starting a new line (indented to `lead`'s
/// width) before an item that would pass [`HELP_WIDTH`]; an item is never split.
fn push_wrapped(out: &mut String, lead: &str, items: impl Iterator<Item = String>, sep: &str) {
    let indent = " ".repeat(lead.chars().count());
    let mut line = lead.to_owned();
    let mut line_is_empty = true;
    for item in items {
        let width = line.chars().count() + sep.len() + item.chars().count();
        if !line_is_empty && width > HELP_WIDTH {
            out.push_str(line.trim_end());
            out.push('\n');
            line.clone_from(&indent);
            line_is_empty = true;
        }
        if !line_is_empty {
            line.push_str(sep);
        }
        line.push_str(&item);
        line_is_empty = false;
    }
    out.push_str(line.trim_end());
    out.push('\n');
}

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

/// A Valkey key with `{topic}` in it, split once at load so rendering a key per publish is
/// two copies and no search.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KeyTemplate {
    /// Text before `{topic}`.
    prefix: String,
    /// Text after `{topic}`.
    suffix: String,
}

impl KeyTemplate {
    /// `None` unless `template` contains [`TOPIC_PLACEHOLDER`] exactly once.
    pub fn parse(template: &str) -> Option<Self> {
        let (prefix, suffix) = template.split_once(TOPIC_PLACEHOLDER)?;
        if suffix.contains(TOPIC_PLACEHOLDER) {
            return None;
        }
        Some(KeyTemplate {
            prefix: prefix.to_owned(),
            suffix: suffix.to_owned(),
        })
    }

    /// Appends the key for `topic` to `out` (a RESP command buffer, say).
    pub fn render_into(&self, topic: &str, out: &mut Vec<u8>) {
        out.reserve(self.rendered_len(topic));
        out.extend_from_slice(self.prefix.as_bytes());
        out.extend_from_slice(topic.as_bytes());
        out.extend_from_slice(self.suffix.as_bytes());
    }

    /// The key for `topic` as its three parts (prefix, topic, suffix), to be written back to
    /// back without building the key first.
    pub fn parts<'a>(&'a self, topic: &'a str) -> [&'a [u8]; 3] {
        [
            self.prefix.as_bytes(),
            topic.as_bytes(),
            self.suffix.as_bytes(),
        ]
    }

    pub fn render(&self, topic: &str) -> String {
        let mut key = String::with_capacity(self.rendered_len(topic));
        key.push_str(&self.prefix);
        key.push_str(topic);
        key.push_str(&self.suffix);
        key
    }

    pub fn rendered_len(&self, topic: &str) -> usize {
        self.prefix.len() + topic.len() + self.suffix.len()
    }

    /// A `SCAN MATCH` glob matching every key this template renders, with glob
    /// metacharacters of the fixed parts escaped.
    pub fn scan_pattern(&self) -> String {
        fn escape(s: &str, out: &mut String) {
            for c in s.chars() {
                if matches!(c, '*' | '?' | '[' | ']' | '\\') {
                    out.push('\\');
                }
                out.push(c);
            }
        }
        let mut pattern = String::with_capacity(self.prefix.len() + self.suffix.len() + 4);
        escape(&self.prefix, &mut pattern);
        pattern.push('*');
        escape(&self.suffix, &mut pattern);
        pattern
    }

    /// Whether every key rendered from this template has the topic name as its Valkey
    /// Cluster hash tag: the key's first `{` ends the text before `{topic}` and the text
    /// after it starts with `}` (topic names have no braces), as `topic:{{topic}}:stream`.
    /// Then a topic's keys share the slot of its name, which the client routes by.
    pub fn hash_tag_is_topic(&self) -> bool {
        self.prefix.find('{') == Some(self.prefix.len().wrapping_sub(1))
            && self.suffix.starts_with('}')
    }

    /// The topic a rendered key names, or `None` if `key` does not fit the template.
    pub fn topic_of<'k>(&self, key: &'k str) -> Option<&'k str> {
        key.strip_prefix(self.prefix.as_str())?
            .strip_suffix(self.suffix.as_str())
            .filter(|t| !t.is_empty())
    }
}

/// One step of a key template seen as a pattern over bytes (see [`KeyTemplate::may_share_key`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum KeyToken {
    /// A byte of the fixed prefix or suffix.
    Byte(u8),
    /// The topic's first byte.
    TopicByte,
    /// The rest of the topic: zero or more topic bytes.
    TopicRest,
    /// The first byte of a tail appended after the rendered template (an idempotency key).
    TailByte,
    /// The rest of that tail: zero or more of its bytes.
    TailRest,
}

impl KeyToken {
    /// Whether this token can match `byte` (a literal only itself).
    fn matches(self, byte: u8) -> bool {
        match self {
            KeyToken::Byte(x) => x == byte,
            KeyToken::TopicByte | KeyToken::TopicRest => crate::topic::is_name_byte(byte),
            KeyToken::TailByte | KeyToken::TailRest => crate::store::idempotency::is_key_byte(byte),
        }
    }

    /// Matches zero or more bytes, staying in place.
    fn repeats(self) -> bool {
        matches!(self, KeyToken::TopicRest | KeyToken::TailRest)
    }
}

impl KeyTemplate {
    /// Whether a key rendered from `self` for some valid topic can equal a key rendered from
    /// `other` for some (possibly different) valid topic. `s:{topic}` and `s:{topic}.m` can
    /// (`s:a.m` is topic `a.m` under the first and topic `a` under the second), while
    /// `topic:{topic}:stream` and `topic:{topic}:meta` cannot, as `:` is not a topic byte.
    /// Topic length limits are ignored, which errs only towards reporting a clash.
    pub fn may_share_key(&self, other: &KeyTemplate) -> bool {
        keys_may_meet(&self.tokens(false), &other.tokens(false))
    }

    /// Whether a key rendered from `self` and followed by a non-empty idempotency key (any
    /// printable ASCII) can equal a key rendered from `other`: `topic:{topic}:idem:` and
    /// `topic:{topic}:stream` cannot (`idem:` is not `stream`), `i:{topic}:` and
    /// `i:{topic}:stream` can (the idempotency key `stream`).
    pub fn may_prefix_key(&self, other: &KeyTemplate) -> bool {
        keys_may_meet(&self.tokens(true), &other.tokens(false))
    }

    /// Whether the text after `{topic}` starts with a byte no topic name has, so that a key
    /// rendered from this template and followed by anything still names exactly one topic.
    pub fn topic_is_delimited(&self) -> bool {
        self.suffix
            .bytes()
            .next()
            .is_some_and(|b| !crate::topic::is_name_byte(b))
    }

    fn tokens(&self, tail: bool) -> Vec<KeyToken> {
        let mut tokens: Vec<KeyToken> = self.prefix.bytes().map(KeyToken::Byte).collect();
        tokens.extend([KeyToken::TopicByte, KeyToken::TopicRest]);
        tokens.extend(self.suffix.bytes().map(KeyToken::Byte));
        if tail {
            tokens.extend([KeyToken::TailByte, KeyToken::TailRest]);
        }
        tokens
    }
}

/// Whether one byte string can match both token sequences. Decided by walking both in step
/// over one candidate key (the product of two small automata): a state is a position in
/// each, and the key can end where both end. Linear in the templates' lengths: only a
/// literal byte, or any byte both classes share when neither side needs a literal, can
/// extend the key (every class holds `a`, so `a` stands for that case).
fn keys_may_meet(a: &[KeyToken], b: &[KeyToken]) -> bool {
    // Positions reachable without consuming a byte: a repeating token may match nothing.
    let closure = |tokens: &[KeyToken], i: usize| -> [Option<usize>; 2] {
        match tokens.get(i) {
            Some(t) if t.repeats() => [Some(i), Some(i + 1)],
            _ => [Some(i), None],
        }
    };
    let step = |tokens: &[KeyToken], i: usize, byte: u8| -> Option<usize> {
        let token = tokens.get(i)?;
        match token.matches(byte) {
            true if token.repeats() => Some(i),
            true => Some(i + 1),
            false => None,
        }
    };
    let mut seen = std::collections::HashSet::new();
    let mut todo = Vec::new();
    let mut visit = |i: usize, j: usize, todo: &mut Vec<(usize, usize)>| {
        for i in closure(a, i).into_iter().flatten() {
            for j in closure(b, j).into_iter().flatten() {
                if seen.insert((i, j)) {
                    todo.push((i, j));
                }
            }
        }
    };
    visit(0, 0, &mut todo);
    while let Some((i, j)) = todo.pop() {
        if i == a.len() && j == b.len() {
            return true;
        }
        let byte = match (a.get(i), b.get(j)) {
            (Some(KeyToken::Byte(x)), _) | (_, Some(KeyToken::Byte(x))) => *x,
            _ => b'a',
        };
        if let (Some(i), Some(j)) = (step(a, i, byte), step(b, j, byte)) {
            visit(i, j, &mut todo);
        }
    }
    false
}

impl fmt::Display for KeyTemplate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}{TOPIC_PLACEHOLDER}{}", self.prefix, self.suffix)
    }
}

// ---------------------------------------------------------------------------------------------
// Errors.
// ---------------------------------------------------------------------------------------------

/// Where a value came from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Origin {
    Default,
    File {
        path: PathBuf,
        /// The key as written when it was an alias (`valkey.pool_size`).
        alias: Option<&'static str>,
        /// 1-based; 0 when the parser could not tell.
        line: u64,
        column: u64,
    },
    Env(&'static str),
    Flag(&'static str),
}

impl Origin {
    /// Precedence, used to blame the more deliberate of two conflicting settings.
    fn rank(&self) -> u8 {
        match self {
            Origin::Default => 0,
            Origin::File { .. } => 1,
            Origin::Env(_) => 2,
            Origin::Flag(_) => 3,
        }
    }
}

impl fmt::Display for Origin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Origin::Default => f.write_str("built-in default"),
            Origin::File {
                path,
                alias,
                line,
                column,
            } => {
                f.write_str("from ")?;
                if let Some(alias) = alias {
                    write!(f, "`{alias}` in ")?;
                }
                write!(f, "{}", path.display())?;
                if *line > 0 {
                    write!(f, ":{line}:{column}")?;
                }
                Ok(())
            }
            Origin::Env(var) => write!(f, "from env {var}"),
            Origin::Flag(flag) => write!(f, "from flag {flag}"),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The config file could not be read (missing, unreadable, not UTF-8).
    #[error("cannot read config file `{}`: {io}", path.display())]
    ReadFile {
        path: PathBuf,
        /// In the message rather than `#[source]`: start-up prints the error with `{}`, and a
        /// missing file's reason must not need `{:#}` to show.
        io: std::io::Error,
    },

    /// Not YAML, not a mapping, an unknown or duplicate key, or a section that is not a
    /// mapping. `message` is the parser's and ends with its location.
    #[error("cannot parse config file `{}`: {message}", path.display())]
    Yaml {
        path: PathBuf,
        message: String,
        line: Option<u64>,
        column: Option<u64>,
    },

    /// A value that does not parse or is out of range. `value` is `<redacted>` for secrets.
    #[error("invalid value `{value}` for `{key}` ({origin}): expected {expected}")]
    Invalid {
        key: &'static str,
        value: String,
        origin: Origin,
        expected: String,
    },
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
    let mut layers = Layers::default();
    if let Some((path, text)) = yaml {
        layers.apply_yaml(path, text)?;
    }
    layers.apply_env(env);
    layers.apply_cli(cli);
    let mut config = layers.resolve(machine)?;
    config.source_file = yaml.map(|(path, _)| path.to_owned());
    Ok(config)
}

/// One raw value: text as written, and its source.
struct Sourced {
    text: String,
    origin: Origin,
}

/// The merged raw layers: the highest-precedence value of each key set anywhere. No `Debug`,
/// as it holds the password in clear.
#[derive(Default)]
struct Layers {
    values: HashMap<&'static str, Sourced>,
}

impl Layers {
    fn set(&mut self, key: &'static str, text: String, origin: Origin) {
        self.values.insert(key, Sourced { text, origin });
    }

    fn apply_yaml(&mut self, path: &Path, text: &str) -> Result<(), ConfigError> {
        for entry in read_file(path, text)? {
            let origin = Origin::File {
                path: path.to_owned(),
                alias: (entry.written != entry.setting.path).then_some(entry.written),
                line: entry.value.referenced.line(),
                column: entry.value.referenced.column(),
            };
            self.set(entry.setting.path, entry.value.value, origin);
        }
        Ok(())
    }

    fn apply_env(&mut self, env: &dyn Fn(&str) -> Option<String>) {
        for setting in settings::ALL {
            // Highest priority first; an empty value counts as unset (`VALKEY_PASSWORD=` in
            // the seeds means "no password"), so it falls through to the next name.
            let found = setting.env.iter().rev().find_map(|name| {
                let value = env(name)?;
                (!value.trim().is_empty()).then_some((*name, value))
            });
            if let Some((name, value)) = found {
                // Whitespace around a password may be part of it; anywhere else it is noise
                // from shell quoting.
                let value = if setting.secret {
                    value
                } else {
                    value.trim().to_owned()
                };
                self.set(setting.path, value, Origin::Env(name));
            }
        }
    }

    fn apply_cli(&mut self, cli: &Cli) {
        if let Some(listen) = cli.listen {
            self.set(s::LISTEN.path, listen.to_string(), Origin::Flag("--listen"));
        }
        if let Some(shards) = cli.shards {
            self.set(s::SHARDS.path, shards.to_string(), Origin::Flag("--shards"));
        }
    }

    /// Parses and checks every key; the first failure is returned.
    fn resolve(&self, machine: &Machine) -> Result<Config, ConfigError> {
        let listen = self.addr(&s::LISTEN)?;

        let shards = self.uint(&s::SHARDS)?;
        let shards = match shards.value {
            // More CPUs than the shard limit is possible only on exotic hosts; use the limit.
            0 => machine.cpus.clamp(1, s::MAX_SHARDS as usize),
            _ => shards.to_usize()?,
        };

        let log_level = self.choice(&s::LOG_LEVEL)?.value;
        let log_format = self.choice(&s::LOG_FORMAT)?.value;

        let (http, api) = self.resolve_http_and_api()?;
        let ws = self.resolve_ws()?;
        let longpoll = self.resolve_longpoll()?;
        let sse = self.resolve_sse()?;
        let storage = self.resolve_storage()?;
        let memory = self.resolve_memory(machine, &api)?;
        let hot_tier = HotTierConfig {
            max_messages: self.uint(&s::HOT_TIER_MAX_MESSAGES)?.to_usize()?,
            retention: self.duration(&s::HOT_TIER_RETENTION)?.value,
        };
        let valkey = self.resolve_valkey()?;
        let durability = self.resolve_durability()?;
        let shutdown = ShutdownConfig {
            timeout: self.duration(&s::SHUTDOWN_TIMEOUT)?.value,
        };
        let metrics = self.resolve_metrics(&listen)?;
        let idempotency = IdempotencyConfig {
            window: self.duration(&s::IDEMPOTENCY_WINDOW)?.value,
            max_keys: self.uint(&s::IDEMPOTENCY_MAX_KEYS)?.to_usize()?,
        };

        Ok(Config {
            listen: listen.value,
            shards,
            log_level,
            log_format,
            http,
            api,
            ws,
            longpoll,
            sse,
            storage,
            memory,
            hot_tier,
            valkey,
            durability,
            idempotency,
            shutdown,
            metrics,
            source_file: None,
        })
    }

    fn resolve_http_and_api(&self) -> Result<(HttpConfig, ApiConfig), ConfigError> {
        let max_body = self.size(&s::HTTP_MAX_BODY_BYTES)?;
        let max_payload = self.size(&s::API_MAX_PAYLOAD_BYTES)?;
        require_le(&max_payload, &max_body, format_size)?;
        let default_page = self.uint(&s::API_DEFAULT_PAGE_LIMIT)?;
        let max_page = self.uint(&s::API_MAX_PAGE_LIMIT)?;
        require_le(&default_page, &max_page, |v| v.to_string())?;

        let http = HttpConfig {
            max_header_bytes: self.size(&s::HTTP_MAX_HEADER_BYTES)?.to_usize()?,
            max_headers: self.uint(&s::HTTP_MAX_HEADERS)?.to_usize()?,
            max_body_bytes: max_body.to_usize()?,
            header_read_timeout: self.duration(&s::HTTP_HEADER_READ_TIMEOUT)?.value,
            keepalive_timeout: self.duration(&s::HTTP_KEEPALIVE_TIMEOUT)?.value,
            max_connections_per_shard: self.uint(&s::HTTP_MAX_CONNECTIONS_PER_SHARD)?.to_usize()?,
        };
        let api = ApiConfig {
            max_bulk_messages: self.uint(&s::API_MAX_BULK_MESSAGES)?.to_usize()?,
            default_page_limit: default_page.to_usize()?,
            max_page_limit: max_page.to_usize()?,
            max_payload_bytes: max_payload.to_usize()?,
            max_topic_name_len: self.uint(&s::API_MAX_TOPIC_NAME_LEN)?.to_usize()?,
        };
        Ok((http, api))
    }

    fn resolve_ws(&self) -> Result<WsConfig, ConfigError> {
        let ping_interval = self.duration(&s::WS_PING_INTERVAL)?;
        let idle_timeout = self.duration(&s::WS_IDLE_TIMEOUT)?;
        // At or below the ping interval, a quiet but healthy client is closed before its
        // pong to the first ping can arrive.
        require_lt(&ping_interval, &idle_timeout, format_duration)?;
        Ok(WsConfig {
            ping_interval: ping_interval.value,
            idle_timeout: idle_timeout.value,
            max_message_bytes: self.size(&s::WS_MAX_MESSAGE_BYTES)?.to_usize()?,
            max_queued_bytes: self.size(&s::WS_MAX_QUEUED_BYTES)?.to_usize()?,
            max_topics: self.uint(&s::WS_MAX_TOPICS)?.to_usize()?,
        })
    }

    fn resolve_longpoll(&self) -> Result<LongPollConfig, ConfigError> {
        let default_timeout = self.duration(&s::LONGPOLL_DEFAULT_TIMEOUT)?;
        let max_timeout = self.duration(&s::LONGPOLL_MAX_TIMEOUT)?;
        require_le(&default_timeout, &max_timeout, format_duration)?;
        let default_limit = self.uint(&s::LONGPOLL_DEFAULT_LIMIT)?;
        let max_limit = self.uint(&s::LONGPOLL_MAX_LIMIT)?;
        require_le(&default_limit, &max_limit, |v| v.to_string())?;
        Ok(LongPollConfig {
            max_topics: self.uint(&s::LONGPOLL_MAX_TOPICS)?.to_usize()?,
            max_parked_per_shard: self.uint(&s::LONGPOLL_MAX_PARKED_PER_SHARD)?.to_usize()?,
            default_timeout: default_timeout.value,
            max_timeout: max_timeout.value,
            default_limit: default_limit.to_usize()?,
            max_limit: max_limit.to_usize()?,
        })
    }

    fn resolve_sse(&self) -> Result<SseConfig, ConfigError> {
        Ok(SseConfig {
            heartbeat_interval: self.duration(&s::SSE_HEARTBEAT_INTERVAL)?.value,
            max_queued_bytes: self.size(&s::SSE_MAX_QUEUED_BYTES)?.to_usize()?,
        })
    }

    fn resolve_metrics(&self, api_listen: &Got<SocketAddr>) -> Result<MetricsConfig, ConfigError> {
        let listen = self.optional_addr(&s::METRICS_LISTEN)?;
        if let Some(listen) = &listen {
            if addresses_overlap(listen.value, api_listen.value) {
                let (blamed, other) = if listen.origin.rank() >= api_listen.origin.rank() {
                    (listen, api_listen)
                } else {
                    (api_listen, listen)
                };
                return Err(blamed.invalid(format!(
                    "an address not overlapping `{}` = {} ({}): the same port on the same or a \
                     wildcard address would take the other listener's connections",
                    other.setting.path, other.value, other.origin
                )));
            }
        }
        Ok(MetricsConfig {
            listen: listen.map(|l| l.value),
            per_topic: self.boolean(&s::METRICS_PER_TOPIC)?.value,
            max_topic_series: self.uint(&s::METRICS_MAX_TOPIC_SERIES)?.to_usize()?,
        })
    }

    fn resolve_storage(&self) -> Result<StorageConfig, ConfigError> {
        Ok(StorageConfig {
            backend: self.choice(&s::STORAGE_BACKEND)?.value,
            persistent_tier_retention: self.duration(&s::STORAGE_PERSISTENT_TIER_RETENTION)?.value,
            max_messages_per_topic: self.uint(&s::STORAGE_MAX_MESSAGES_PER_TOPIC)?.to_usize()?,
        })
    }

    fn resolve_memory(
        &self,
        machine: &Machine,
        api: &ApiConfig,
    ) -> Result<MemoryConfig, ConfigError> {
        let machine_default = machine
            .memory_bytes
            .map_or(s::MEMORY_FALLBACK_BYTES, |m| m / s::MEMORY_SHARE_DIVISOR)
            // A tiny cgroup must not make the *default* invalid; the store then simply evicts
            // early.
            .clamp(*s::MEMORY_BYTES.start(), *s::MEMORY_BYTES.end());
        let max_bytes = self.size_or(&s::MEMORY_MAX_BYTES, machine_default)?;
        if max_bytes.value < api.max_payload_bytes as u64 {
            return Err(max_bytes.invalid(format!(
                "at least `{}` = {}, so one message fits",
                s::API_MAX_PAYLOAD_BYTES.path,
                format_size(api.max_payload_bytes as u64)
            )));
        }
        Ok(MemoryConfig {
            max_bytes: max_bytes.to_usize()?,
        })
    }

    fn resolve_durability(&self) -> Result<DurabilityConfig, ConfigError> {
        let ack = self.choice(&s::DURABILITY_ACK)?.value;
        let replicas = self.uint(&s::DURABILITY_REPLICAS)?;
        let replica_timeout = self.duration(&s::DURABILITY_REPLICA_TIMEOUT)?;
        // The WAIT blocks the connection it ends: its batch must still be answered within
        // the command timeout, or every publish of it fails as a timeout instead of a 503
        // naming the replicas.
        let command_timeout = self.duration(&s::VALKEY_COMMAND_TIMEOUT)?;
        if ack == AckMode::Replicated {
            require_lt(&replica_timeout, &command_timeout, format_duration)?;
        }
        Ok(DurabilityConfig {
            ack,
            replicas: u32::try_from(replicas.value)
                .map_err(|_| replicas.invalid("a replica count"))?,
            replica_timeout: replica_timeout.value,
        })
    }

    /// `valkey.sentinels` and the keys that go with it; `None` when no sentinel is set. Refuses
    /// `valkey.host`/`valkey.port` beside it (which address would the data go to?) and the
    /// other sentinel keys without it.
    fn resolve_sentinel(&self) -> Result<Option<SentinelSettings>, ConfigError> {
        let sentinels = self.optional_text(&s::VALKEY_SENTINELS);
        let master = self.optional_text(&s::VALKEY_SENTINEL_MASTER);
        let username = self.optional_text(&s::VALKEY_SENTINEL_USERNAME);
        let password = self.optional_text(&s::VALKEY_SENTINEL_PASSWORD);
        let Some(sentinels) = sentinels else {
            if let Some(lone) = [&master, &username, &password].into_iter().flatten().next() {
                return Err(lone.invalid(format!(
                    "no value: it is only used with `{}` (the sentinels' addresses), which is \
                     not set",
                    s::VALKEY_SENTINELS.path
                )));
            }
            return Ok(None);
        };
        let addrs = addr_list(&sentinels)?;
        for (conflict, what) in [(&s::VALKEY_HOST, "host"), (&s::VALKEY_PORT, "port")] {
            if let Some(raw) = self.values.get(conflict.path) {
                return Err(invalid(
                    conflict,
                    &raw.text,
                    &raw.origin,
                    format!(
                        "no value while `{}` is set ({}): the sentinels name the master's {what}; \
                         remove one of the two",
                        s::VALKEY_SENTINELS.path,
                        sentinels.origin
                    ),
                ));
            }
        }
        let Some(master) = master else {
            return Err(sentinels.invalid(format!(
                "`{}` too: the name the sentinels monitor the master under",
                s::VALKEY_SENTINEL_MASTER.path
            )));
        };
        check_name(&master)?;
        if let Some(user) = &username {
            check_name(user)?;
            if password.is_none() {
                return Err(user.invalid(format!(
                    "`{}` too: a sentinel user needs a password",
                    s::VALKEY_SENTINEL_PASSWORD.path
                )));
            }
        }
        Ok(Some(SentinelSettings {
            addrs,
            master_name: master.value,
            username: username.map(|u| u.value),
            password: password.map(|p| Secret(p.value)),
        }))
    }

    fn resolve_valkey(&self) -> Result<ValkeyConfig, ConfigError> {
        let host = self.name(&s::VALKEY_HOST)?;
        let port = self.uint(&s::VALKEY_PORT)?;
        let port = u16::try_from(port.value).map_err(|_| port.invalid("a port from 1 to 65535"))?;

        let username = self.optional_text(&s::VALKEY_USERNAME);
        if let Some(user) = &username {
            check_name(user)?;
        }
        let password = self.optional_text(&s::VALKEY_PASSWORD);
        let db = self.uint(&s::VALKEY_DB)?;
        let db = u32::try_from(db.value).map_err(|_| db.invalid("a database index"))?;

        let sentinel = self.resolve_sentinel()?;
        let cluster_nodes = self.resolve_cluster_nodes(sentinel.is_some(), db)?;
        let cluster = cluster_nodes.is_some();
        let stream_key = self.template(&s::VALKEY_STREAM_KEY, cluster)?;
        let meta_key = self.template(&s::VALKEY_META_KEY, cluster)?;
        if stream_key.value.may_share_key(&meta_key.value) {
            // A key that is one topic's stream and another's (or the same topic's) hash: its
            // publishes or metadata writes would fail with WRONGTYPE.
            let blamed = if meta_key.origin.rank() >= stream_key.origin.rank() {
                &meta_key
            } else {
                &stream_key
            };
            return Err(blamed.invalid(format!(
                "`{}` and `{}` to differ so that no topic's stream key is any topic's meta \
                 key (a stream and a hash cannot share a key; e.g. `s:{{topic}}` and \
                 `s:{{topic}}.m` clash on `s:a.m`)",
                s::VALKEY_STREAM_KEY.path,
                s::VALKEY_META_KEY.path
            )));
        }

        let idempotency_key = self.template(&s::VALKEY_IDEMPOTENCY_KEY, cluster)?;
        if cluster {
            for template in [&stream_key, &meta_key, &idempotency_key] {
                if !template.value.hash_tag_is_topic() {
                    // A key without the topic as its hash tag lands in a slot of its own:
                    // the publish Function, which touches a topic's keys together, would be
                    // refused with CROSSSLOT.
                    return Err(template.invalid(format!(
                        "in Valkey Cluster mode (`{}` set), a template whose first `{{` opens \
                         the hash tag `{{{{topic}}}}` (the topic in braces), so that all of a \
                         topic's keys share one slot, e.g. `{}`",
                        s::VALKEY_CLUSTER_NODES.path,
                        template_default(&s::VALKEY_STREAM_KEY, true)
                    )));
                }
            }
        }
        if !idempotency_key.value.topic_is_delimited() {
            // `i:{topic}` would render topic `a` with key `bc` and topic `ab` with key `c`
            // as the same key: one topic's publish would pass for another's.
            return Err(idempotency_key.invalid(format!(
                "a template whose `{{topic}}` is followed by a character no topic name has \
                 (such as `:`), so that each key names one topic, e.g. `{}`",
                template_default(&s::VALKEY_IDEMPOTENCY_KEY, false)
            )));
        }
        for other in [&stream_key, &meta_key] {
            if idempotency_key.value.may_prefix_key(&other.value) {
                // SET on a stream or hash key would replace it: a topic's messages gone.
                let blamed = if idempotency_key.origin.rank() >= other.origin.rank() {
                    &idempotency_key
                } else {
                    other
                };
                return Err(blamed.invalid(format!(
                    "`{}` and `{}` to differ so that no topic's idempotency key (the template \
                     followed by the client's key) is any topic's {} key",
                    s::VALKEY_IDEMPOTENCY_KEY.path,
                    other.setting.path,
                    if other.setting.path == s::VALKEY_STREAM_KEY.path {
                        "stream"
                    } else {
                        "meta"
                    }
                )));
            }
        }

        Ok(ValkeyConfig {
            host: host.value,
            port,
            username: username.map(|u| u.value),
            password: password.map(|p| Secret(p.value)),
            db,
            use_tls: self.boolean(&s::VALKEY_USE_TLS)?.value,
            tls_ca_file: self
                .optional_text(&s::VALKEY_TLS_CA_FILE)
                .map(|f| PathBuf::from(f.value)),
            connections_per_shard: self.uint(&s::VALKEY_CONNECTIONS_PER_SHARD)?.to_usize()?,
            connect_timeout: self.duration(&s::VALKEY_CONNECT_TIMEOUT)?.value,
            command_timeout: self.duration(&s::VALKEY_COMMAND_TIMEOUT)?.value,
            max_pending: self.uint(&s::VALKEY_MAX_PENDING)?.to_usize()?,
            stream_key: stream_key.value,
            meta_key: meta_key.value,
            idempotency_key: idempotency_key.value,
            sentinel,
            cluster_nodes,
        })
    }

    /// `valkey.cluster_nodes`: the seeds of Valkey Cluster mode, refused beside sentinels
    /// (which master?) and a non-zero `valkey.db` (a cluster has only database 0).
    fn resolve_cluster_nodes(
        &self,
        sentinel: bool,
        db: u32,
    ) -> Result<Option<Vec<(String, u16)>>, ConfigError> {
        let Some(nodes) = self.optional_text(&s::VALKEY_CLUSTER_NODES) else {
            return Ok(None);
        };
        let addrs = addr_list(&nodes)?;
        if sentinel {
            return Err(nodes.invalid(format!(
                "no value while `{}` is set: Valkey Cluster and Sentinel exclude each other \
                 (a cluster fails over by itself); remove one of the two",
                s::VALKEY_SENTINELS.path
            )));
        }
        if db != 0 {
            return Err(nodes.invalid(format!(
                "no value while `{}` is not 0: Valkey Cluster has only database 0",
                s::VALKEY_DB.path
            )));
        }
        Ok(Some(addrs))
    }

    // --- typed getters: the setting's kind gives the default, parser, range and message ---

    /// The value of `setting` from the highest layer that set it, parsed; or `default`.
    /// `expected` goes into the error when `parse` fails.
    fn get<T>(
        &self,
        setting: &'static Setting,
        default: T,
        parse: impl FnOnce(&str) -> Option<T>,
        show_default: impl FnOnce(&T) -> String,
        expected: &str,
    ) -> Result<Got<T>, ConfigError> {
        match self.values.get(setting.path) {
            None => Ok(Got {
                setting,
                text: show_default(&default),
                origin: Origin::Default,
                value: default,
            }),
            Some(raw) => match parse(&raw.text) {
                Some(value) => Ok(Got {
                    setting,
                    text: raw.text.clone(),
                    origin: raw.origin.clone(),
                    value,
                }),
                None => Err(invalid(
                    setting,
                    &raw.text,
                    &raw.origin,
                    expected.to_owned(),
                )),
            },
        }
    }

    /// A [`Kind::Uint`] setting.
    fn uint(&self, setting: &'static Setting) -> Result<Got<u64>, ConfigError> {
        let Kind::Uint { default, range } = &setting.kind else {
            kind_mismatch(setting)
        };
        let expected = match (*range.start(), *range.end()) {
            (start, u64::MAX) => format!("an integer of at least {start}"),
            (start, end) => format!("an integer from {start} to {end}"),
        };
        let got = self.get(setting, *default, parse_uint, u64::to_string, &expected)?;
        if !range.contains(&got.value) {
            return Err(got.invalid(expected));
        }
        Ok(got)
    }

    /// A [`Kind::Size`] setting.
    fn size(&self, setting: &'static Setting) -> Result<Got<u64>, ConfigError> {
        let Kind::Size { default, .. } = &setting.kind else {
            kind_mismatch(setting)
        };
        self.size_or(setting, *default)
    }

    /// A [`Kind::Size`] setting whose default is computed (from the machine) rather than
    /// the declared one.
    fn size_or(&self, setting: &'static Setting, default: u64) -> Result<Got<u64>, ConfigError> {
        let Kind::Size { range, .. } = &setting.kind else {
            kind_mismatch(setting)
        };
        let expected = format!(
            "a size such as `16KiB`, `64MiB` or integer bytes, from {} to {}",
            format_size(*range.start()),
            format_size(*range.end())
        );
        let got = self.get(setting, default, parse_size, |v| format_size(*v), &expected)?;
        if !range.contains(&got.value) {
            return Err(got.invalid(expected));
        }
        Ok(got)
    }

    /// A [`Kind::Duration`] setting.
    fn duration(&self, setting: &'static Setting) -> Result<Got<Duration>, ConfigError> {
        let Kind::Duration { default, range } = &setting.kind else {
            kind_mismatch(setting)
        };
        let expected = format!(
            "a duration such as `24h` or integer seconds, from {} to {}",
            format_duration(*range.start()),
            format_duration(*range.end())
        );
        let got = self.get(
            setting,
            *default,
            parse_duration,
            |d| format_duration(*d),
            &expected,
        )?;
        if !range.contains(&got.value) {
            return Err(got.invalid(expected));
        }
        Ok(got)
    }

    /// A [`Kind::Bool`] setting.
    fn boolean(&self, setting: &'static Setting) -> Result<Got<bool>, ConfigError> {
        let Kind::Bool { default } = &setting.kind else {
            kind_mismatch(setting)
        };
        self.get(
            setting,
            *default,
            parse_bool,
            bool::to_string,
            "`true` or `false` (also `1`/`0`, `yes`/`no`)",
        )
    }

    /// A [`Kind::Choice`] setting, as the enum whose names it declares.
    fn choice<T: Named>(&self, setting: &'static Setting) -> Result<Got<T>, ConfigError> {
        let Kind::Choice {
            default,
            names,
            aliases,
            expected,
        } = &setting.kind
        else {
            kind_mismatch(setting)
        };
        let variant = |name: &str| T::ALL.iter().copied().find(|v| v.name() == name);
        let parse = |text: &str| {
            let name = names
                .iter()
                .copied()
                .find(|name| name.eq_ignore_ascii_case(text))
                .or_else(|| {
                    aliases
                        .iter()
                        .find(|(alias, _)| alias.eq_ignore_ascii_case(text))
                        .map(|(_, name)| *name)
                })?;
            variant(name)
        };
        let default = variant(default).unwrap_or_else(|| kind_mismatch(setting));
        let expected = expected.map_or_else(|| choice_expected(names), str::to_owned);
        self.get(setting, default, parse, |v| v.name().to_owned(), &expected)
    }

    /// A [`Kind::Addr`] setting.
    fn addr(&self, setting: &'static Setting) -> Result<Got<SocketAddr>, ConfigError> {
        let Kind::Addr { default } = &setting.kind else {
            kind_mismatch(setting)
        };
        self.get(
            setting,
            *default,
            |text| text.parse().ok(),
            SocketAddr::to_string,
            &addr_expected(*default),
        )
    }

    /// A [`Kind::OptionalAddr`] setting; `None` when unset, null or empty.
    fn optional_addr(
        &self,
        setting: &'static Setting,
    ) -> Result<Option<Got<SocketAddr>>, ConfigError> {
        let Kind::OptionalAddr { example } = &setting.kind else {
            kind_mismatch(setting)
        };
        let Some(text) = self.optional_text(setting) else {
            return Ok(None);
        };
        let value = text
            .value
            .parse()
            .map_err(|_| text.invalid(format!("{}, or null", addr_expected(*example))))?;
        Ok(Some(Got {
            value,
            setting,
            text: text.text,
            origin: text.origin,
        }))
    }

    /// A [`Kind::Name`] setting with a default (an optional one is read with
    /// [`Layers::optional_text`] and checked with [`check_name`]).
    fn name(&self, setting: &'static Setting) -> Result<Got<String>, ConfigError> {
        let Kind::Name {
            default: Some(default),
            what,
        } = &setting.kind
        else {
            kind_mismatch(setting)
        };
        self.get(
            setting,
            (*default).to_owned(),
            |text| (!text.is_empty() && !has_space_or_control(text)).then(|| text.to_owned()),
            String::clone,
            &format!("{what} without spaces"),
        )
    }

    /// The raw text of an optional setting of any kind. Unset, null and empty are all
    /// `None`: an empty value means "none" in the seeds.
    fn optional_text(&self, setting: &'static Setting) -> Option<Got<String>> {
        let raw = self.values.get(setting.path)?;
        (!raw.text.trim().is_empty()).then(|| Got {
            setting,
            value: raw.text.clone(),
            text: raw.text.clone(),
            origin: raw.origin.clone(),
        })
    }

    /// A [`Kind::Template`] setting, with its Valkey Cluster default in cluster mode.
    fn template(
        &self,
        setting: &'static Setting,
        cluster: bool,
    ) -> Result<Got<KeyTemplate>, ConfigError> {
        let default = KeyTemplate::parse(template_default(setting, cluster))
            // The declared defaults contain `{topic}` once (tested).
            .expect("default key template contains {topic} exactly once");
        self.get(
            setting,
            default,
            KeyTemplate::parse,
            KeyTemplate::to_string,
            "a key template containing `{topic}` exactly once, e.g. `topic:{topic}:stream`",
        )
    }
}

/// An enum a [`Kind::Choice`] setting resolves to: the declaration lists the names of
/// `ALL`'s variants (tested).
trait Named: Copy + 'static {
    const ALL: &'static [Self];
    fn name(self) -> &'static str;
}

impl Named for LogLevel {
    const ALL: &'static [Self] = &[
        LogLevel::Trace,
        LogLevel::Debug,
        LogLevel::Info,
        LogLevel::Warn,
        LogLevel::Error,
    ];
    fn name(self) -> &'static str {
        self.as_filter_str()
    }
}

impl Named for LogFormat {
    const ALL: &'static [Self] = &[LogFormat::Text, LogFormat::Json];
    fn name(self) -> &'static str {
        self.as_str()
    }
}

impl Named for StorageBackend {
    const ALL: &'static [Self] = &[StorageBackend::Memory, StorageBackend::Valkey];
    fn name(self) -> &'static str {
        self.as_str()
    }
}

impl Named for AckMode {
    const ALL: &'static [Self] = &[AckMode::Persisted, AckMode::Buffered, AckMode::Replicated];
    fn name(self) -> &'static str {
        self.as_str()
    }
}

/// A getter was asked for a setting declared with another kind (or a choice whose names
/// are not its enum's): a mistake in this module, which every load hits, so the first unit
/// test that loads a configuration reports it.
fn kind_mismatch(setting: &Setting) -> ! {
    panic!(
        "setting `{}` is read as another kind than its declaration {:?}",
        setting.path, setting.kind
    )
}

/// "`a` or `b`", "`a`, `b` or `c`".
fn choice_expected(names: &[&str]) -> String {
    let quoted: Vec<String> = names.iter().map(|n| format!("`{n}`")).collect();
    match quoted.split_last() {
        Some((last, rest)) if !rest.is_empty() => format!("{} or {last}", rest.join(", ")),
        _ => quoted.concat(),
    }
}

fn addr_expected(example: SocketAddr) -> String {
    format!(
        "an IP address and port such as `{example}` or `[::]:{}`",
        example.port()
    )
}

/// The default of a [`Kind::Template`] setting, in Valkey Cluster mode or not.
fn template_default(setting: &Setting, cluster: bool) -> &'static str {
    match setting.kind {
        Kind::Template {
            cluster_default, ..
        } if cluster => cluster_default,
        Kind::Template { default, .. } => default,
        _ => kind_mismatch(setting),
    }
}

/// A [`Kind::AddrList`] setting's value as `(host, port)` pairs.
fn addr_list(got: &Got<String>) -> Result<Vec<(String, u16)>, ConfigError> {
    let Kind::AddrList {
        count,
        what,
        example,
    } = &got.setting.kind
    else {
        kind_mismatch(got.setting)
    };
    parse_addrs(&got.value, count.clone()).map_err(|why| {
        got.invalid(format!(
            "a comma-separated list of {} to {} {what} addresses `host:port` (IPv6 as \
             `[addr]:port`), e.g. `{example}`: {why}",
            count.start(),
            count.end()
        ))
    })
}

/// A [`Kind::Name`] setting's value has no spaces or control characters.
fn check_name(got: &Got<String>) -> Result<(), ConfigError> {
    let Kind::Name { what, .. } = &got.setting.kind else {
        kind_mismatch(got.setting)
    };
    if has_space_or_control(&got.value) {
        return Err(got.invalid(format!("{what} without spaces")));
    }
    Ok(())
}

/// A resolved value with what is needed to complain about it later (cross-key checks).
struct Got<T> {
    value: T,
    setting: &'static Setting,
    /// The value as written (or the default, formatted).
    text: String,
    origin: Origin,
}

impl<T> Got<T> {
    fn invalid(&self, expected: impl Into<String>) -> ConfigError {
        invalid(self.setting, &self.text, &self.origin, expected.into())
    }
}

impl Got<u64> {
    fn to_usize(&self) -> Result<usize, ConfigError> {
        usize::try_from(self.value)
            .map_err(|_| self.invalid(format!("at most {} on this platform", usize::MAX)))
    }
}

/// Whether two listeners would take each other's connections. Same port (not 0, which picks
/// a fresh one per bind) and the same IP, or a wildcard on either side: when both sockets set
/// `SO_REUSEPORT` (the API's do) both binds succeed and Linux splits or steals connections
/// silently; without it the second bind fails with a bare `EADDRINUSE`. Either way it is
/// better named here, with both keys.
fn addresses_overlap(a: SocketAddr, b: SocketAddr) -> bool {
    a.port() == b.port()
        && a.port() != 0
        && (a.ip() == b.ip() || a.ip().is_unspecified() || b.ip().is_unspecified())
}

fn has_space_or_control(text: &str) -> bool {
    text.chars().any(|c| c.is_whitespace() || c.is_control())
}

/// `host:port[,host:port...]` (spaces around entries allowed, IPv6 as `[addr]:port`) with
/// `count` addresses; what is wrong otherwise.
fn parse_addrs(text: &str, count: RangeInclusive<usize>) -> Result<Vec<(String, u16)>, String> {
    let mut addrs: Vec<(String, u16)> = Vec::new();
    for entry in text.split(',').map(str::trim) {
        if entry.is_empty() {
            return Err("an empty entry".to_owned());
        }
        let shown = shown_value(entry);
        let (host, port) = if let Some(rest) = entry.strip_prefix('[') {
            let (host, port) = rest
                .split_once("]:")
                .ok_or_else(|| format!("`{shown}` has no port after `]`"))?;
            (host, port)
        } else {
            let (host, port) = entry
                .rsplit_once(':')
                .ok_or_else(|| format!("`{shown}` has no `:port`"))?;
            if host.contains(':') {
                return Err(format!("`{shown}`: write an IPv6 address as `[addr]:port`"));
            }
            (host, port)
        };
        if host.is_empty() || has_space_or_control(host) {
            return Err(format!("`{shown}` has no valid host"));
        }
        let port = parse_uint(port)
            .filter(|p| s::PORTS.contains(p))
            .and_then(|p| u16::try_from(p).ok())
            .ok_or_else(|| format!("`{shown}` has no port from 1 to 65535"))?;
        let addr = (host.to_owned(), port);
        if addrs.contains(&addr) {
            return Err(format!("`{shown}` is listed twice"));
        }
        addrs.push(addr);
    }
    if !count.contains(&addrs.len()) {
        return Err(format!("{} addresses", addrs.len()));
    }
    Ok(addrs)
}

fn invalid(setting: &Setting, text: &str, origin: &Origin, expected: String) -> ConfigError {
    let value = if setting.secret {
        "<redacted>".to_owned()
    } else {
        shown_value(text)
    };
    ConfigError::Invalid {
        key: setting.path,
        value,
        origin: origin.clone(),
        expected,
    }
}

/// Escapes control characters and shortens long values so one bad line stays one line.
fn shown_value(text: &str) -> String {
    const MAX_CHARS: usize = 80;
    let mut shown: String = text
        .chars()
        .take(MAX_CHARS)
        .flat_map(char::escape_debug)
        .collect();
    if text.chars().nth(MAX_CHARS).is_some() {
        shown.push('…');
    }
    shown
}

/// `lower <= upper` or an error blaming whichever was set more deliberately (a flag over an
/// env var over the file over a default), so the message points at what the user changed.
fn require_le<T: PartialOrd + Copy>(
    lower: &Got<T>,
    upper: &Got<T>,
    render: impl Fn(T) -> String,
) -> Result<(), ConfigError> {
    require_ordered(lower, upper, false, render)
}

/// [`require_le`] without equality.
fn require_lt<T: PartialOrd + Copy>(
    lower: &Got<T>,
    upper: &Got<T>,
    render: impl Fn(T) -> String,
) -> Result<(), ConfigError> {
    require_ordered(lower, upper, true, render)
}

fn require_ordered<T: PartialOrd + Copy>(
    lower: &Got<T>,
    upper: &Got<T>,
    strict: bool,
    render: impl Fn(T) -> String,
) -> Result<(), ConfigError> {
    let (ordered, below, above) = if strict {
        (lower.value < upper.value, "less than", "more than")
    } else {
        (lower.value <= upper.value, "at most", "at least")
    };
    if ordered {
        return Ok(());
    }
    Err(if lower.origin.rank() >= upper.origin.rank() {
        lower.invalid(format!(
            "{below} `{}` = {} ({})",
            upper.setting.path,
            render(upper.value),
            upper.origin
        ))
    } else {
        upper.invalid(format!(
            "{above} `{}` = {} ({})",
            lower.setting.path,
            render(lower.value),
            lower.origin
        ))
    })
}

// ---------------------------------------------------------------------------------------------
// Value syntax.
// ---------------------------------------------------------------------------------------------

/// Decimal digits, optionally grouped with `_` as YAML allows (`1_000_000`).
fn parse_uint(text: &str) -> Option<u64> {
    let grouped_ok = !text.starts_with('_') && !text.ends_with('_') && !text.contains("__");
    if text.is_empty() || !grouped_ok || !text.bytes().all(|b| b.is_ascii_digit() || b == b'_') {
        return None;
    }
    text.bytes()
        .filter(u8::is_ascii_digit)
        .try_fold(0u64, |acc, digit| {
            acc.checked_mul(10)?.checked_add(u64::from(digit - b'0'))
        })
}

/// Integer bytes, or a number with a unit: `KiB`/`MiB`/`GiB` (1024-based), `KB`/`MB`/`GB`
/// (1000-based), as `bytesize` reads them.
fn parse_size(text: &str) -> Option<u64> {
    if let Some(bytes) = parse_uint(text) {
        return Some(bytes);
    }
    // bytesize reads "1e3" as 1 and unit "e3" (rejected), and "-1" as an error; it accepts
    // fractions ("1.5KiB") and a space before the unit.
    if !text.starts_with(|c: char| c.is_ascii_digit()) {
        return None;
    }
    text.parse::<bytesize::ByteSize>()
        .ok()
        .map(|size| size.as_u64())
}

/// Integer seconds (the seeds' `PERSISTENT_TIER_RETENTION=86400`) or a humantime duration.
fn parse_duration(text: &str) -> Option<Duration> {
    if let Some(secs) = parse_uint(text) {
        return Some(Duration::from_secs(secs));
    }
    humantime::parse_duration(text).ok()
}

fn parse_bool(text: &str) -> Option<bool> {
    const TRUE: [&str; 3] = ["true", "1", "yes"];
    const FALSE: [&str; 3] = ["false", "0", "no"];
    if TRUE.iter().any(|t| t.eq_ignore_ascii_case(text)) {
        Some(true)
    } else if FALSE.iter().any(|f| f.eq_ignore_ascii_case(text)) {
        Some(false)
    } else {
        None
    }
}

/// Exact and re-parseable: the largest binary unit that divides the value.
fn format_size(bytes: u64) -> String {
    const UNITS: [(u64, &str); 4] = [(TIB, "TiB"), (GIB, "GiB"), (MIB, "MiB"), (KIB, "KiB")];
    for (unit, name) in UNITS {
        if bytes >= unit && bytes.is_multiple_of(unit) {
            return format!("{}{name}", bytes / unit);
        }
    }
    format!("{bytes} bytes")
}

/// Exact and re-parseable, in the largest unit that divides the value (`24h`, not
/// humantime's `1day`).
fn format_duration(duration: Duration) -> String {
    if duration.subsec_nanos() != 0 {
        return format!("{}ms", duration.as_millis());
    }
    let secs = duration.as_secs();
    match secs {
        0 => "0s".to_owned(),
        // Days only from two on: `24h` reads better than `1d` for the default retention.
        s if s % 86400 == 0 && s >= 2 * 86400 => format!("{}d", s / 86400),
        s if s % 3600 == 0 => format!("{}h", s / 3600),
        s if s % 60 == 0 => format!("{}m", s / 60),
        s => format!("{s}s"),
    }
}

// ---------------------------------------------------------------------------------------------
// YAML file layer: the schema is the settings table.
// ---------------------------------------------------------------------------------------------

/// One value set in the file.
struct FileEntry {
    setting: &'static Setting,
    /// The path as written: the setting's, or its alias when that was used.
    written: &'static str,
    value: Spanned<String>,
}

/// Reads the config file into its values. Keys are checked against [`settings::ALL`]: a
/// section or key nobody declared is an error naming it and the keys its section has, as
/// serde's `deny_unknown_fields` words it. Every leaf is read as its text (serde-saphyr keeps
/// a plain scalar's spelling when asked for a string: `007` stays `007`, `yes` stays `yes`),
/// so the file goes through the same parsers as env vars and flags and a bad value gets our
/// message, not serde's. A section is a mapping or null, so a section whose keys are all
/// commented out (`memory:` followed by comments only, as in the example file) still loads.
fn read_file(path: &Path, text: &str) -> Result<Vec<FileEntry>, ConfigError> {
    // No source snippets in errors: a snippet around a syntax error near `password:` would
    // print the password.
    let options = serde_saphyr::options! { with_snippet: false };
    let FileEntries(entries) = serde_saphyr::from_str_with_options(text, options).map_err(|e| {
        let location = e.location();
        ConfigError::Yaml {
            path: path.to_owned(),
            message: e.to_string(),
            line: location.map(|l| l.line()),
            column: location.map(|l| l.column()),
        }
    })?;
    for setting in settings::ALL {
        let Some(alias) = setting.alias else {
            continue;
        };
        let written = |as_written: &str| {
            entries
                .iter()
                .find(|e| e.setting.path == setting.path && e.written == as_written)
        };
        if let (Some(_), Some(aliased)) = (written(setting.path), written(alias)) {
            let origin = Origin::File {
                path: path.to_owned(),
                alias: Some(alias),
                line: aliased.value.referenced.line(),
                column: aliased.value.referenced.column(),
            };
            return Err(invalid(
                setting,
                &aliased.value.value,
                &origin,
                format!("only one of `{}` and its alias `{alias}`", setting.path),
            ));
        }
    }
    Ok(entries)
}

/// The sections and keys the file may contain, derived once from [`settings::ALL`]: for each
/// section path (`""` for the top level) the names it holds, subsections and aliases
/// included, in declaration order (the order an unknown-key error lists them in).
fn file_schema() -> &'static [(&'static str, Vec<&'static str>)] {
    static SCHEMA: OnceLock<Vec<(&'static str, Vec<&'static str>)>> = OnceLock::new();
    SCHEMA.get_or_init(|| {
        let mut schema: Vec<(&'static str, Vec<&'static str>)> = Vec::new();
        let mut add = |section: &'static str, name: &'static str| {
            let at = match schema.iter().position(|(s, _)| *s == section) {
                Some(at) => at,
                None => {
                    schema.push((section, Vec::new()));
                    schema.len() - 1
                }
            };
            if !schema[at].1.contains(&name) {
                schema[at].1.push(name);
            }
        };
        for setting in settings::ALL {
            for path in std::iter::once(setting.path).chain(setting.alias) {
                // `a.b.c` adds `a` to "", `b` to `a` and `c` to `a.b`.
                let mut section = "";
                let mut rest = path;
                while let Some((name, tail)) = rest.split_once('.') {
                    add(section, name);
                    section = &path[..path.len() - tail.len() - 1];
                    rest = tail;
                }
                add(section, rest);
            }
        }
        schema
    })
}

/// The names `section` may contain.
fn file_keys(section: &str) -> &'static [&'static str] {
    file_schema()
        .iter()
        .find(|(s, _)| *s == section)
        .map_or(&[], |(_, names)| names.as_slice())
}

/// What a key of the file is.
enum FileKey {
    Setting {
        setting: &'static Setting,
        written: &'static str,
    },
    Section(&'static str),
}

/// The file's values, in document order.
struct FileEntries(Vec<FileEntry>);

impl<'de> Deserialize<'de> for FileEntries {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let mut entries = Vec::new();
        deserializer.deserialize_struct(
            "config",
            file_keys(""),
            SectionVisitor {
                section: "",
                out: &mut entries,
            },
        )?;
        Ok(FileEntries(entries))
    }
}

/// Reads the mapping of `section` into `out`.
struct SectionVisitor<'a> {
    section: &'static str,
    out: &'a mut Vec<FileEntry>,
}

impl<'de> serde::de::Visitor<'de> for SectionVisitor<'_> {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.section {
            "" => f.write_str("a mapping of configuration keys"),
            section => write!(f, "a mapping of `{section}` keys, or null"),
        }
    }

    fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        let out = self.out;
        while let Some(key) = map.next_key_seed(KeySeed {
            section: self.section,
        })? {
            match key {
                FileKey::Setting { setting, written } => {
                    let value = if matches!(setting.kind, Kind::AddrList { .. }) {
                        map.next_value::<Option<Spanned<CommaList>>>()?
                            .map(|list| Spanned::new(list.value.0, list.referenced, list.defined))
                    } else {
                        map.next_value::<Option<Spanned<String>>>()?
                    };
                    if let Some(value) = value {
                        out.push(FileEntry {
                            setting,
                            written,
                            value,
                        });
                    }
                }
                FileKey::Section(section) => map.next_value_seed(SectionSeed {
                    section,
                    out: &mut *out,
                })?,
            }
        }
        Ok(())
    }
}

/// A nested section: a mapping, or null for one whose keys are all commented out.
struct SectionSeed<'a> {
    section: &'static str,
    out: &'a mut Vec<FileEntry>,
}

impl<'de> serde::de::DeserializeSeed<'de> for SectionSeed<'_> {
    type Value = ();

    fn deserialize<D: serde::Deserializer<'de>>(self, deserializer: D) -> Result<(), D::Error> {
        deserializer.deserialize_option(self)
    }
}

impl<'de> serde::de::Visitor<'de> for SectionSeed<'_> {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "a mapping of `{}` keys, or null", self.section)
    }

    fn visit_none<E: serde::de::Error>(self) -> Result<(), E> {
        Ok(())
    }

    fn visit_unit<E: serde::de::Error>(self) -> Result<(), E> {
        Ok(())
    }

    fn visit_some<D: serde::Deserializer<'de>>(self, deserializer: D) -> Result<(), D::Error> {
        deserializer.deserialize_struct(
            "section",
            file_keys(self.section),
            SectionVisitor {
                section: self.section,
                out: self.out,
            },
        )
    }
}

/// A key of `section`, rejected while it is read (as a derived struct's field name is) so the
/// error carries the key's position.
struct KeySeed {
    section: &'static str,
}

impl<'de> serde::de::DeserializeSeed<'de> for KeySeed {
    type Value = FileKey;

    fn deserialize<D: serde::Deserializer<'de>>(
        self,
        deserializer: D,
    ) -> Result<FileKey, D::Error> {
        deserializer.deserialize_identifier(self)
    }
}

impl<'de> serde::de::Visitor<'de> for KeySeed {
    type Value = FileKey;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a configuration key")
    }

    fn visit_str<E: serde::de::Error>(self, key: &str) -> Result<FileKey, E> {
        let path = match self.section {
            "" => key.to_owned(),
            section => format!("{section}.{key}"),
        };
        for setting in settings::ALL {
            if setting.path == path {
                let written = setting.path;
                return Ok(FileKey::Setting { setting, written });
            }
            if let Some(written) = setting.alias.filter(|alias| *alias == path) {
                return Ok(FileKey::Setting { setting, written });
            }
        }
        match file_schema().iter().find(|(section, _)| *section == path) {
            Some((section, _)) => Ok(FileKey::Section(section)),
            None => Err(E::unknown_field(key, file_keys(self.section))),
        }
    }
}

/// A leaf written either as a YAML list of scalars or as one comma-separated string (the
/// environment variable's form), read as that string so both take one parser
/// (`valkey.sentinels: ["10.0.0.1:26379", "10.0.0.2:26379"]`).
struct CommaList(String);

impl<'de> Deserialize<'de> for CommaList {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl<'de> serde::de::Visitor<'de> for Visitor {
            type Value = CommaList;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a list of `host:port` strings, or one comma-separated string")
            }

            fn visit_str<E: serde::de::Error>(self, text: &str) -> Result<CommaList, E> {
                Ok(CommaList(text.to_owned()))
            }

            fn visit_seq<A: serde::de::SeqAccess<'de>>(
                self,
                mut items: A,
            ) -> Result<CommaList, A::Error> {
                let mut all: Vec<String> = Vec::new();
                while let Some(item) = items.next_element::<String>()? {
                    all.push(item);
                }
                Ok(CommaList(all.join(",")))
            }
        }
        deserializer.deserialize_any(Visitor)
    }
}

// ---------------------------------------------------------------------------------------------
// Machine probes (the only I/O besides reading the config file).
// ---------------------------------------------------------------------------------------------

/// Facts about the host that size two defaults. Public so [`load_from_parts`] can be called
/// with a fixed machine (tests, fuzzing).
#[derive(Clone, Copy, Debug)]
pub struct Machine {
    /// CPUs this process may run on (affinity and cgroup CPU quota included).
    pub cpus: usize,
    /// `min(MemTotal, cgroup v2 memory.max)`, or `None` when neither could be read.
    pub memory_bytes: Option<u64>,
}

impl Machine {
    pub fn detect() -> Self {
        Machine {
            cpus: std::thread::available_parallelism().map_or(1, NonZeroUsize::get),
            memory_bytes: detect_memory_bytes(),
        }
    }
}

fn detect_memory_bytes() -> Option<u64> {
    let total = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|text| parse_meminfo_total(&text));
    let cgroup = std::fs::read_to_string("/proc/self/cgroup")
        .ok()
        .and_then(|text| cgroup_v2_path(&text).map(str::to_owned))
        .and_then(|path| cgroup_memory_max(&path));
    match (total, cgroup) {
        (Some(total), Some(limit)) => Some(total.min(limit)),
        (total, limit) => total.or(limit),
    }
}

/// The effective cgroup v2 limit is the smallest `memory.max` from the process's cgroup up
/// to the root: a parent's limit binds its children even when theirs says `max`.
fn cgroup_memory_max(cgroup_path: &str) -> Option<u64> {
    const ROOT: &str = "/sys/fs/cgroup";
    let mut dir = PathBuf::from(ROOT);
    dir.extend(
        cgroup_path
            .split('/')
            .filter(|part| !part.is_empty() && *part != "." && *part != ".."),
    );
    let mut limit: Option<u64> = None;
    loop {
        if let Some(found) = std::fs::read_to_string(dir.join("memory.max"))
            .ok()
            .and_then(|text| parse_memory_max(&text))
        {
            limit = Some(limit.map_or(found, |l| l.min(found)));
        }
        if dir == Path::new(ROOT) || !dir.pop() {
            return limit;
        }
    }
}

/// `MemTotal:       16314204 kB` → bytes.
fn parse_meminfo_total(meminfo: &str) -> Option<u64> {
    let line = meminfo.lines().find(|l| l.starts_with("MemTotal:"))?;
    let mut fields = line["MemTotal:".len()..].split_whitespace();
    let kib: u64 = fields.next()?.parse().ok()?;
    match fields.next() {
        Some("kB") => kib.checked_mul(1024),
        _ => None,
    }
}

/// The cgroup v2 entry of /proc/self/cgroup (`0::/system.slice/relay.service`).
fn cgroup_v2_path(proc_self_cgroup: &str) -> Option<&str> {
    proc_self_cgroup
        .lines()
        .find_map(|line| line.strip_prefix("0::"))
        .map(str::trim)
}

/// `memory.max` holds bytes or `max` (no limit).
fn parse_memory_max(text: &str) -> Option<u64> {
    text.trim().parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

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

    const EXAMPLE: &str = include_str!("../config.yaml.example");

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

    /// The line of `config.yaml.example` that sets `path` or shows it commented out.
    fn example_line(path: &str) -> Option<&'static str> {
        let (section, leaf) = path.rsplit_once('.').unwrap_or(("", path));
        let mut current = "";
        for line in EXAMPLE.lines() {
            if !line.starts_with([' ', '#']) {
                let Some((name, rest)) = line.split_once(':') else {
                    continue;
                };
                // `http:` (maybe with a comment) opens a section; `listen: ...` is a key.
                let value = rest.split('#').next().unwrap_or("").trim();
                current = if value.is_empty() { name } else { "" };
                if section.is_empty() && name == leaf {
                    return Some(line);
                }
            } else if !section.is_empty() && current == section {
                let key = line.trim_start().trim_start_matches('#').trim_start();
                if key.strip_prefix(leaf).is_some_and(|r| r.starts_with(':')) {
                    return Some(line);
                }
            }
        }
        None
    }

    #[test]
    fn example_file_names_each_key_with_its_environment_variable() {
        for setting in settings::ALL {
            let line = example_line(setting.path);
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
    fn declarations_are_unique_and_env_names_have_the_documented_shape() {
        let mut paths: Vec<&str> = settings::ALL.iter().map(|s| s.path).collect();
        paths.extend(settings::ALL.iter().filter_map(|s| s.alias));
        let mut vars: Vec<&str> = settings::ALL.iter().flat_map(|s| s.env).copied().collect();
        for list in [&mut paths, &mut vars] {
            let count = list.len();
            list.sort_unstable();
            list.dedup();
            assert_eq!(list.len(), count, "a path or variable is declared twice");
        }
        // `--help` promises: each name also as PULSAR_<NAME>, which wins; or PULSAR_ only.
        for setting in settings::ALL {
            match setting.env {
                [] => {}
                [only] => assert!(only.starts_with("PULSAR_"), "{only}"),
                [plain, prefixed] => assert_eq!(*prefixed, format!("PULSAR_{plain}")),
                more => panic!("{}: {more:?}", setting.path),
            }
            if let Some(alias) = setting.alias {
                let (section, _) = alias.rsplit_once('.').unwrap_or(("", alias));
                assert_eq!(section, setting.section(), "{alias} outside its section");
            }
        }
    }

    #[test]
    fn choice_declarations_name_their_enums_variants() {
        fn names<T: Named>() -> Vec<&'static str> {
            T::ALL.iter().map(|v| v.name()).collect()
        }
        for (setting, variants) in [
            (&s::LOG_LEVEL, names::<LogLevel>()),
            (&s::LOG_FORMAT, names::<LogFormat>()),
            (&s::STORAGE_BACKEND, names::<StorageBackend>()),
            (&s::DURABILITY_ACK, names::<AckMode>()),
        ] {
            let Kind::Choice {
                default,
                names,
                aliases,
                expected,
            } = &setting.kind
            else {
                panic!("{} is a choice", setting.path);
            };
            assert_eq!(*names, variants.as_slice(), "{}", setting.path);
            assert!(names.contains(default), "{}", setting.path);
            for (_, name) in *aliases {
                assert!(names.contains(name), "{}: alias of {name}", setting.path);
            }
            for name in names.iter().filter(|_| expected.is_some()) {
                assert!(expected.is_some_and(|e| e.contains(&format!("`{name}`"))));
            }
        }
        for setting in settings::ALL {
            if let Kind::Template {
                default,
                cluster_default,
            } = setting.kind
            {
                assert!(KeyTemplate::parse(default).is_some(), "{default}");
                let cluster = KeyTemplate::parse(cluster_default);
                assert!(
                    cluster.is_some_and(|t| t.hash_tag_is_topic()),
                    "{cluster_default}"
                );
            }
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
    fn hash_tag_is_topic_only_for_braces_right_around_the_placeholder() {
        let tagged = |t: &str| template(t).hash_tag_is_topic();
        assert!(tagged("topic:{{topic}}:stream"));
        assert!(tagged("{{topic}}"));
        assert!(!tagged("topic:{topic}:stream"));
        assert!(!tagged("{x}{{topic}}"));
        assert!(!tagged("x{{topic}.}"));
        assert!(!tagged("x{{topic}"));
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
        let config =
            from_env(&[("VALKEY_PORT", "1111"), ("PULSAR_VALKEY_PORT", "")]).expect("valid");
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
    fn generic_listen_and_shards_variables_are_ignored() {
        let config = from_env(&[("LISTEN", "0.0.0.0:1"), ("SHARDS", "9")]).expect("valid");
        assert_eq!(config.listen, defaults().listen);
        assert_eq!(config.shards, MACHINE.cpus);
    }

    #[test]
    fn cli_overrides_env_and_file() {
        let cli =
            Cli::try_parse_from(["pulsar-relay", "--listen", "0.0.0.0:7777", "--shards", "6"])
                .expect("valid flags");
        let env = env_of(&[("PULSAR_LISTEN", "127.0.0.1:1"), ("PULSAR_SHARDS", "2")]);
        let yaml = "listen: 127.0.0.1:2\nshards: 3\n";
        let config = load_from_parts(&cli, &env, Some((Path::new("c.yaml"), yaml)), &MACHINE)
            .expect("valid");
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
    fn value_parsers_at_their_edges() {
        assert_eq!(parse_uint("0"), Some(0));
        assert_eq!(parse_uint("18446744073709551615"), Some(u64::MAX));
        assert_eq!(parse_uint("18446744073709551616"), None, "overflow");
        assert_eq!(parse_uint("+5"), None);
        assert_eq!(parse_uint("1_0"), Some(10));
        assert_eq!(parse_uint("1_"), None);
        assert_eq!(parse_duration("500ms"), Some(Duration::from_millis(500)));
        assert_eq!(parse_duration("1h 30m"), Some(Duration::from_secs(5400)));
        assert_eq!(parse_duration("86400"), Some(Duration::from_secs(86_400)));
        assert_eq!(parse_duration("-5s"), None);
        assert_eq!(parse_duration("5 parsecs"), None);
        for (text, value) in [
            ("true", true),
            ("YES", true),
            ("1", true),
            ("no", false),
            ("False", false),
            ("0", false),
        ] {
            assert_eq!(parse_bool(text), Some(value), "{text}");
        }
        assert_eq!(parse_bool("on"), None);
        assert_eq!(parse_bool("maybe"), None);
    }

    #[test]
    fn formatted_defaults_parse_back_to_themselves() {
        for bytes in [1, 1000, KIB, 16 * KIB, 3 * MIB, GIB, 1024 * TIB, 1536] {
            assert_eq!(
                parse_size(&format_size(bytes).replace(" bytes", "")),
                Some(bytes)
            );
        }
        for d in [
            Duration::from_millis(1),
            Duration::from_millis(1500),
            Duration::from_secs(90),
            Duration::from_secs(86_400),
            Duration::from_secs(3650 * 86_400),
        ] {
            assert_eq!(parse_duration(&format_duration(d)), Some(d), "{d:?}");
        }
        assert_eq!(format_duration(Duration::from_secs(86_400)), "24h");
        assert_eq!(format_size(16 * MIB), "16MiB");
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

    #[test]
    fn help_documents_every_option_variable_and_key() {
        Cli::command().debug_assert();
        let help = Cli::command().render_long_help().to_string();
        for option in [
            "--listen <ADDR>",
            "--shards <N>",
            "--config <PATH>",
            "--version",
            "--help",
        ] {
            assert!(help.contains(option), "{option} missing from --help");
        }
        for spec in settings::ALL {
            for var in spec.env {
                // The prefixed forms are documented once, as PULSAR_<NAME>.
                let unprefixed = var.strip_prefix("PULSAR_").unwrap_or(var);
                assert!(
                    help.contains(var) || spec.env.contains(&unprefixed),
                    "{var} missing from --help"
                );
            }
            let (section, leaf) = spec.path.split_once('.').unwrap_or(("", spec.path));
            // The section's line and its continuation lines (indented past the section
            // names; `valkey` needs four since Sentinel and idempotency keys joined it).
            let mut section_lines = help
                .lines()
                .skip_while(|l| !l.trim_start().starts_with(&format!("{section}:")));
            let section_line = section_lines
                .next()
                .into_iter()
                .chain(section_lines.take_while(|l| l.starts_with("               ")))
                // Joined with a space: the last listed key must not run into the next line.
                .collect::<Vec<_>>()
                .join(" ");
            let listed = if section.is_empty() {
                help.lines()
                    .any(|l| l.starts_with("  listen") && l.split_whitespace().any(|w| w == leaf))
            } else {
                section_line
                    .split_whitespace()
                    .any(|w| w.trim_end_matches(':') == leaf)
            };
            assert!(listed, "{} missing from --help", spec.path);
        }
    }

    #[test]
    fn flags_parse_and_version_is_offered() {
        let cli = Cli::try_parse_from([
            "pulsar-relay",
            "--listen",
            "[::]:80",
            "--shards",
            "8",
            "--config",
            "/etc/relay.yaml",
        ])
        .expect("valid flags");
        assert_eq!(cli.listen, Some("[::]:80".parse().expect("literal")));
        assert_eq!(cli.shards, Some(8));
        assert_eq!(cli.config, Some(PathBuf::from("/etc/relay.yaml")));
        let version = Cli::try_parse_from(["pulsar-relay", "--version"]).map(|_| ());
        assert!(matches!(
            version.map_err(|e| e.kind()),
            Err(clap::error::ErrorKind::DisplayVersion)
        ));
        assert!(Cli::try_parse_from(["pulsar-relay", "--listen", "localhost:80"]).is_err());
    }

    #[test]
    fn key_templates_render_around_the_placeholder() {
        let t = template("topic:{topic}:stream");
        assert_eq!(t.render("orders"), "topic:orders:stream");
        let mut out = b"*2\r\n".to_vec();
        t.render_into("a", &mut out);
        assert_eq!(out, b"*2\r\ntopic:a:stream");
        assert_eq!(t.rendered_len("abc"), "topic:abc:stream".len());
        assert_eq!(t.to_string(), "topic:{topic}:stream");
        assert_eq!(template("{topic}").render("x"), "x");
        assert_eq!(KeyTemplate::parse("topic:stream"), None);
        assert_eq!(KeyTemplate::parse("{topic}{topic}"), None);
        assert_eq!(KeyTemplate::parse("{Topic}"), None);
    }

    #[test]
    fn machine_probe_parsers() {
        let meminfo = "MemTotal:       16314204 kB\nMemFree:         1000 kB\n";
        assert_eq!(parse_meminfo_total(meminfo), Some(16_314_204 * 1024));
        assert_eq!(parse_meminfo_total("MemFree: 1 kB\n"), None);
        assert_eq!(parse_meminfo_total("MemTotal: 12\n"), None, "unit required");
        assert_eq!(
            cgroup_v2_path("12:cpu:/x\n0::/system.slice/relay.service\n"),
            Some("/system.slice/relay.service")
        );
        assert_eq!(cgroup_v2_path("0::/\n"), Some("/"));
        assert_eq!(
            cgroup_v2_path("4:memory:/docker/abc\n"),
            None,
            "cgroup v1 only"
        );
        assert_eq!(parse_memory_max("536870912\n"), Some(536_870_912));
        assert_eq!(parse_memory_max("max\n"), None);
    }

    #[test]
    fn machine_detection_yields_usable_values() {
        let machine = Machine::detect();
        assert!(machine.cpus >= 1);
        if let Some(bytes) = machine.memory_bytes {
            assert!(bytes >= MIB, "{bytes}");
        }
    }
}
