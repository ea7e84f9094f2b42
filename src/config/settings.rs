//! Every configuration setting, declared once: its dotted YAML path, the environment variables
//! that set it, its kind of value with the default and the accepted range, whether it is a
//! secret, a legacy name in the file, and the note `--help` shows beside it.
//!
//! Everything else is derived from [`ALL`]: the environment layer, the YAML schema (which keys
//! exist, unknown-key errors), the defaults, the range checks and their error messages, the
//! `--help` listings, and the tests that keep `config.yaml.example` in step. To find where a
//! setting is declared, search this file for its path.
//!
//! Owns: the declarations and the numbers in them (with why they are what they are).
//! Does not own: turning values into the typed [`Config`](super::Config) and the rules
//! between keys (`resolve`), reading text (`parse`), the file layer (`yaml`).

use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::ops::RangeInclusive;
use std::time::Duration;

use super::Rate;

pub(super) const KIB: u64 = 1024;
pub(super) const MIB: u64 = 1024 * KIB;
pub(super) const GIB: u64 = 1024 * MIB;
pub(super) const TIB: u64 = 1024 * GIB;

const MS: Duration = Duration::from_millis(1);
const SEC: Duration = Duration::from_secs(1);
const MINUTE: Duration = Duration::from_secs(60);
const HOUR: Duration = Duration::from_secs(3600);
const DAY: Duration = Duration::from_secs(24 * 3600);

/// One settable leaf of the configuration.
#[derive(Debug)]
pub struct Setting {
    /// Canonical dotted YAML path, used in every error message; what precedes the last `.`
    /// is its section in the file.
    pub path: &'static str,
    /// Environment variables that set it, lowest priority first: the unprefixed name the
    /// Python relay read, then the `PULSAR_` form its deployments used, which therefore wins.
    /// Either `[]`, `[PULSAR_X]` or `[X, PULSAR_X]` (tested: `--help` documents that shape).
    pub env: &'static [&'static str],
    pub kind: Kind,
    /// Never echoed: errors show `<redacted>` instead of the value, and an environment value
    /// is taken verbatim (whitespace may be part of a password).
    pub secret: bool,
    /// A second dotted path the file accepts for this setting, in the same section; errors
    /// name the key as written.
    pub alias: Option<&'static str>,
    /// A short note `--help` shows beside the setting ("" for none); the example file
    /// and `docs/` carry the long form.
    pub help: &'static str,
}

/// The kind of value a setting takes, with its default and the values accepted. The loader
/// derives the parser, the check and the error message ("expected …") from it.
#[derive(Debug)]
pub enum Kind {
    /// An IP address and port.
    Addr { default: SocketAddr },
    /// An IP address and port, or none (unset, null or empty); `example` shows in errors.
    OptionalAddr { example: SocketAddr },
    /// A decimal integer (`1_000` allowed).
    Uint {
        default: u64,
        range: RangeInclusive<u64>,
    },
    /// Bytes: an integer or a number with a unit (`16KiB`, `1MB`).
    Size {
        default: u64,
        range: RangeInclusive<u64>,
    },
    /// A bare integer in `unit`s (seconds for most) or a humantime duration (`500ms`,
    /// `24h`). Another unit serves the Python relay's names that carry one
    /// (`PULSAR_ACCESS_TOKEN_EXPIRE_MINUTES=10`).
    Duration {
        default: Duration,
        range: RangeInclusive<Duration>,
        unit: Duration,
    },
    /// `true`/`false`, `1`/`0`, `yes`/`no`.
    Bool { default: bool },
    /// One of `names`, case-insensitive; each alias is another spelling of a name. The names
    /// are those of the typed enum the setting resolves to (tested).
    Choice {
        default: &'static str,
        names: &'static [&'static str],
        aliases: &'static [(&'static str, &'static str)],
        /// The error's "expected …" when the derived "`a`, `b` or `c`" will not do.
        expected: Option<&'static str>,
    },
    /// A word without spaces or control characters (a host or user name); `None` as default
    /// means optional (unset, null or empty = none). `what` names it in errors: "`what`
    /// without spaces".
    Name {
        default: Option<&'static str>,
        what: &'static str,
    },
    /// Text taken as written (a password, a file path); unset, null or empty = none.
    Text,
    /// A Valkey key template with `{topic}` exactly once; `cluster_default` replaces
    /// `default` in Valkey Cluster mode.
    Template {
        default: &'static str,
        cluster_default: &'static str,
    },
    /// Comma-separated `host:port` addresses, in YAML also a list; optional. `what` and
    /// `example` go into the error message.
    AddrList {
        count: RangeInclusive<usize>,
        what: &'static str,
        example: &'static str,
    },
    /// A list: a JSON array of strings (the Python relay's form) or comma-separated, in YAML
    /// also a list; `item` says what each entry must be. Unset or null = `default`.
    List {
        default: &'static [&'static str],
        item: ListItem,
    },
    /// Events per interval, `1000/s`, `10/min`, `5/h`; `0` or `off` = no limit. At most
    /// [`MAX_RATE_COUNT`] per interval.
    Rate { default: Rate },
}

/// What the entries of a [`Kind::List`] are.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ListItem {
    /// `scheme://host[:port]` or `*`.
    Origin,
    /// A host name, `*.domain` or `*` (no port).
    HostPattern,
    /// An IP address or network in CIDR form.
    IpNet,
}

impl ListItem {
    /// What an entry is, for `--help` and error messages.
    pub fn what(self) -> &'static str {
        match self {
            ListItem::Origin => "origins such as `https://app.example.com`, or `*`",
            ListItem::HostPattern => {
                "host names such as `relay.example.com`, `*.example.com` or `*`"
            }
            ListItem::IpNet => "IP addresses or networks such as `10.0.0.0/8`",
        }
    }
}

/// A rate above a billion per interval is a typo, not a limit; it also keeps the bucket's
/// arithmetic in `f64` exact.
pub(super) const MAX_RATE_COUNT: u64 = 1_000_000_000;

impl Setting {
    const fn new(path: &'static str, kind: Kind) -> Self {
        Setting {
            path,
            env: &[],
            kind,
            secret: false,
            alias: None,
            help: "",
        }
    }

    const fn uint(path: &'static str, default: u64, range: RangeInclusive<u64>) -> Self {
        Setting::new(path, Kind::Uint { default, range })
    }

    const fn size(path: &'static str, default: u64, range: RangeInclusive<u64>) -> Self {
        Setting::new(path, Kind::Size { default, range })
    }

    const fn duration(
        path: &'static str,
        default: Duration,
        range: RangeInclusive<Duration>,
    ) -> Self {
        Setting::duration_in(path, SEC, default, range)
    }

    /// A duration whose bare integers count `unit`s rather than seconds.
    const fn duration_in(
        path: &'static str,
        unit: Duration,
        default: Duration,
        range: RangeInclusive<Duration>,
    ) -> Self {
        Setting::new(
            path,
            Kind::Duration {
                default,
                range,
                unit,
            },
        )
    }

    const fn boolean(path: &'static str, default: bool) -> Self {
        Setting::new(path, Kind::Bool { default })
    }

    const fn choice(
        path: &'static str,
        default: &'static str,
        names: &'static [&'static str],
    ) -> Self {
        Setting::new(
            path,
            Kind::Choice {
                default,
                names,
                aliases: &[],
                expected: None,
            },
        )
    }

    const fn optional_name(path: &'static str, what: &'static str) -> Self {
        Setting::new(
            path,
            Kind::Name {
                default: None,
                what,
            },
        )
    }

    const fn template(
        path: &'static str,
        default: &'static str,
        cluster_default: &'static str,
    ) -> Self {
        Setting::new(
            path,
            Kind::Template {
                default,
                cluster_default,
            },
        )
    }

    const fn env(mut self, names: &'static [&'static str]) -> Self {
        self.env = names;
        self
    }

    const fn secret(mut self) -> Self {
        self.secret = true;
        self
    }

    const fn alias(mut self, path: &'static str) -> Self {
        self.alias = Some(path);
        self
    }

    const fn help(mut self, note: &'static str) -> Self {
        self.help = note;
        self
    }

    /// The section part of the path (`""` for a top-level key).
    pub fn section(&self) -> &'static str {
        self.path
            .rsplit_once('.')
            .map_or("", |(section, _)| section)
    }
}

/// Declares each setting as a `static` and lists them all in [`ALL`], so a setting cannot be
/// declared and then forgotten by the environment, the file or `--help`. A macro rather than a
/// hand-kept list beside the statics for exactly that reason; the declarations themselves stay
/// plain Rust expressions.
macro_rules! settings {
    ($($(#[$attr:meta])* $name:ident = $setting:expr;)*) => {
        $($(#[$attr])* pub static $name: Setting = $setting;)*

        /// Every setting, in the order of `config.yaml.example` (sections in order of first
        /// appearance).
        pub static ALL: &[&Setting] = &[$(&$name),*];
    };
}

// ---------------------------------------------------------------------------------------------
// Ranges shared by several settings.
// ---------------------------------------------------------------------------------------------

/// 1024 shards is far beyond today's largest single hosts (384 cores); a larger value is a
/// typo, and each shard costs a thread, a listener and a channel to every other shard.
pub(super) const MAX_SHARDS: u64 = 1024;

/// Ping and heartbeat intervals. Below a second is a unit mistake (`30` meant as seconds
/// written `30ms`) and would make pings most of an idle connection's traffic; above an hour
/// every NAT and load balancer on the path (idle timeouts of 60–350 s) has long dropped the
/// connection the keep-alive was meant to protect.
const KEEPALIVE_INTERVAL: RangeInclusive<Duration> = SEC..=HOUR;

/// Outbound queue per WebSocket or SSE stream. Below 64 KiB (a socket send buffer) a consumer
/// would be closed on an ordinary burst it was about to drain; above 1 GiB per connection a
/// few slow consumers exhaust the store's budget.
const OUTBOUND_QUEUE_BYTES: RangeInclusive<u64> = 64 * KIB..=GIB;

const API_PAGE_LIMIT: RangeInclusive<u64> = 1..=1_000_000;

/// A long-poll response is built whole in memory; 100 000 messages of a few hundred bytes is
/// already tens of MiB for one poll.
const LONGPOLL_LIMIT: RangeInclusive<u64> = 1..=100_000;

/// Valkey trims by stream-ID milliseconds; below a second retention is a mistake, and above
/// ten years the `now - retention` arithmetic is still exact in milliseconds.
const RETENTION: RangeInclusive<Duration> = SEC..=Duration::from_secs(3650 * 24 * 3600);

const MAX_MESSAGES: RangeInclusive<u64> = 1..=u64::MAX;

/// Below 1 MiB not even one maximum-size default payload fits; 1 PiB catches a saturated size
/// parse. The machine-sized default is clamped into it too.
pub(super) const MEMORY_BYTES: RangeInclusive<u64> = MIB..=1024 * TIB;

/// `memory.max_bytes` when neither /proc/meminfo nor the cgroup limit can be read.
pub(super) const MEMORY_FALLBACK_BYTES: u64 = GIB;

/// `memory.max_bytes` is this fraction of the memory available to the process. A quarter
/// leaves room for connection buffers, the allocator's slack and, on a shared host, for Valkey
/// itself; half was rejected because a full hot tier plus in-flight 16 MiB bodies on every
/// shard could then reach the cgroup limit and get OOM-killed.
pub(super) const MEMORY_SHARE_DIVISOR: u64 = 4;

/// Valkey ports, also of each sentinel and cluster node address.
pub(super) const PORTS: RangeInclusive<u64> = 1..=65535;

const VALKEY_TIMEOUT: RangeInclusive<Duration> = MS..=HOUR;

settings! {
    // --- process -----------------------------------------------------------------------------

    /// Where the HTTP listener (one `SO_REUSEPORT` socket per shard) binds. Loopback:
    /// exposing the relay beyond the host must be an explicit choice.
    LISTEN = Setting::new(
        "listen",
        Kind::Addr {
            default: SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::LOCALHOST, 8080)),
        },
    )
    // Unprefixed LISTEN/SHARDS are too generic (other software sets them), hence PULSAR_ only.
    .env(&["PULSAR_LISTEN"]);

    /// 0 = one shard per CPU available to the process.
    SHARDS = Setting::uint("shards", 0, 0..=MAX_SHARDS).env(&["PULSAR_SHARDS"]);

    LOG_LEVEL = Setting::new(
        "log_level",
        Kind::Choice {
            default: "info",
            names: &["trace", "debug", "info", "warn", "error"],
            // The Python relay's spelling.
            aliases: &[("warning", "warn")],
            expected: Some("one of `trace`, `debug`, `info`, `warn`, `error` (case-insensitive)"),
        },
    )
    .env(&["LOG_LEVEL", "PULSAR_LOG_LEVEL"]);

    LOG_FORMAT = Setting::choice("log_format", "text", &["text", "json"])
        .env(&["LOG_FORMAT", "PULSAR_LOG_FORMAT"]);

    // --- http --------------------------------------------------------------------------------

    /// A request head is at least its request line plus `Host`; below 1 KiB ordinary clients
    /// (browsers send ~500 bytes of headers) fail. Above 1 MiB a slowloris client can pin that
    /// much per connection.
    HTTP_MAX_HEADER_BYTES = Setting::size("http.max_header_bytes", 16 * KIB, KIB..=MIB);

    /// Curl sends 3 headers, browsers ~15; 8 leaves room for Host, Content-Type,
    /// Content-Length and a proxy's additions.
    HTTP_MAX_HEADERS = Setting::uint("http.max_headers", 64, 8..=1024);

    /// Bodies are buffered whole before parsing, so one request may hold this much memory.
    HTTP_MAX_BODY_BYTES = Setting::size("http.max_body_bytes", 16 * MIB, KIB..=GIB);

    HTTP_HEADER_READ_TIMEOUT =
        Setting::duration("http.header_read_timeout", Duration::from_secs(10), MS..=HOUR);

    HTTP_KEEPALIVE_TIMEOUT =
        Setting::duration("http.keepalive_timeout", Duration::from_secs(60), MS..=DAY);

    HTTP_MAX_CONNECTIONS_PER_SHARD =
        Setting::uint("http.max_connections_per_shard", 10_000, 1..=1_000_000);

    // --- api ---------------------------------------------------------------------------------

    API_MAX_BULK_MESSAGES = Setting::uint("api.max_bulk_messages", 1000, 1..=1_000_000);

    API_DEFAULT_PAGE_LIMIT = Setting::uint("api.default_page_limit", 10, API_PAGE_LIMIT);

    API_MAX_PAGE_LIMIT = Setting::uint("api.max_page_limit", 1000, API_PAGE_LIMIT);

    /// 64 bytes: the smallest useful JSON message is tens of bytes, so a smaller cap is a
    /// unit mistake rather than a policy.
    API_MAX_PAYLOAD_BYTES = Setting::size("api.max_payload_bytes", MIB, 64..=GIB);

    /// Topic names travel in URL paths, which many proxies cap at 4–8 KiB.
    API_MAX_TOPIC_NAME_LEN = Setting::uint("api.max_topic_name_len", 255, 1..=4096);

    // --- ws ----------------------------------------------------------------------------------

    /// Well inside the 60 s idle timeouts of common load balancers (AWS ALB, nginx
    /// `proxy_read_timeout`), so an idle subscription is never cut by the path in between.
    WS_PING_INTERVAL =
        Setting::duration("ws.ping_interval", Duration::from_secs(30), KEEPALIVE_INTERVAL);

    /// Three ping intervals: two lost pongs are tolerated before a dead peer is dropped; one
    /// interval was rejected because a single delayed pong would close a healthy client. At
    /// most a day, like `http.keepalive_timeout`: a silent peer that long is gone.
    WS_IDLE_TIMEOUT = Setting::duration("ws.idle_timeout", Duration::from_secs(90), SEC..=DAY);

    /// Same as `api.max_payload_bytes`: a client frame is a subscribe/ack command, never larger
    /// than the biggest message it could publish. A subscribe frame naming a few topics is
    /// hundreds of bytes, so below 1 KiB is a unit mistake; fragments are reassembled in
    /// memory, so each connection may hold this much.
    WS_MAX_MESSAGE_BYTES = Setting::size("ws.max_message_bytes", MIB, KIB..=64 * MIB);

    /// One maximum-size message (1 MiB payload) fits, so the default never closes a consumer
    /// for a single large message.
    WS_MAX_QUEUED_BYTES = Setting::size("ws.max_queued_bytes", MIB, OUTBOUND_QUEUE_BYTES);

    /// Every subscription is an entry in an owning shard's subscriber map; 100 000 per
    /// session keeps one client from filling those maps.
    WS_MAX_TOPICS = Setting::uint("ws.max_topics", 1000, 1..=100_000);

    // --- longpoll ----------------------------------------------------------------------------

    /// The topics travel in one request; 10 000 names of 255 bytes already exceed any sane
    /// request head.
    LONGPOLL_MAX_TOPICS = Setting::uint("longpoll.max_topics", 100, 1..=10_000);

    /// Equal to `http.max_connections_per_shard`: every open connection may be a parked poll
    /// (and a parked poll holds a connection, hence the same bound).
    LONGPOLL_MAX_PARKED_PER_SHARD =
        Setting::uint("longpoll.max_parked_per_shard", 10_000, 1..=1_000_000);

    /// Half of the 60 s proxy idle timeouts, so an empty poll returns before a proxy gives up.
    /// Below a second long polling degenerates into busy polling; above 60 s a default nginx
    /// (`proxy_read_timeout 60s`) cuts the request before the relay answers it.
    LONGPOLL_DEFAULT_TIMEOUT = Setting::duration(
        "longpoll.default_timeout",
        Duration::from_secs(30),
        SEC..=Duration::from_secs(60),
    );

    /// A client may ask for longer than the default when it knows its path allows it.
    LONGPOLL_MAX_TIMEOUT =
        Setting::duration("longpoll.max_timeout", Duration::from_secs(60), SEC..=HOUR);

    /// Larger than a history page (10): a poll that returns after a burst should drain it in
    /// one round trip, not ten.
    LONGPOLL_DEFAULT_LIMIT = Setting::uint("longpoll.default_limit", 100, LONGPOLL_LIMIT);

    LONGPOLL_MAX_LIMIT = Setting::uint("longpoll.max_limit", 1000, LONGPOLL_LIMIT);

    // --- sse ---------------------------------------------------------------------------------

    /// Half the ping interval: browsers' `EventSource` cannot answer pings, so the heartbeat
    /// alone keeps proxies from closing the stream.
    SSE_HEARTBEAT_INTERVAL =
        Setting::duration("sse.heartbeat_interval", Duration::from_secs(15), KEEPALIVE_INTERVAL);

    /// As for WebSockets: one maximum-size message fits.
    SSE_MAX_QUEUED_BYTES = Setting::size("sse.max_queued_bytes", MIB, OUTBOUND_QUEUE_BYTES);

    // --- storage, memory, hot tier -----------------------------------------------------------

    STORAGE_BACKEND = Setting::choice("storage.backend", "memory", &["memory", "valkey"])
        .env(&["STORAGE_BACKEND", "PULSAR_STORAGE_BACKEND"]);

    STORAGE_PERSISTENT_TIER_RETENTION = Setting::duration(
        "storage.persistent_tier_retention",
        Duration::from_secs(24 * 3600),
        RETENTION,
    )
    .env(&["PERSISTENT_TIER_RETENTION", "PULSAR_PERSISTENT_TIER_RETENTION"])
    // The seeds set it as `86400`.
    .help("integer seconds or 24h");

    STORAGE_MAX_MESSAGES_PER_TOPIC =
        Setting::uint("storage.max_messages_per_topic", 1_000_000, MAX_MESSAGES)
            .env(&["MAX_MESSAGES_PER_TOPIC", "PULSAR_MAX_MESSAGES_PER_TOPIC"]);

    /// The default is a quarter ([`MEMORY_SHARE_DIVISOR`]) of the memory available to the
    /// process, clamped into the range; the one declared here ([`MEMORY_FALLBACK_BYTES`]) is
    /// used when the probes find nothing.
    MEMORY_MAX_BYTES = Setting::size("memory.max_bytes", MEMORY_FALLBACK_BYTES, MEMORY_BYTES)
        .env(&["MEMORY_MAX_BYTES", "PULSAR_MEMORY_MAX_BYTES"]);

    HOT_TIER_MAX_MESSAGES = Setting::uint("hot_tier.max_messages", 10_000, MAX_MESSAGES);

    HOT_TIER_RETENTION = Setting::duration("hot_tier.retention", HOUR, RETENTION);

    // --- valkey ------------------------------------------------------------------------------

    VALKEY_HOST = Setting::new(
        "valkey.host",
        Kind::Name {
            default: Some("localhost"),
            what: "a host name or IP address",
        },
    )
    .env(&["VALKEY_HOST", "PULSAR_VALKEY_HOST"]);

    VALKEY_PORT = Setting::uint("valkey.port", 6379, PORTS)
        .env(&["VALKEY_PORT", "PULSAR_VALKEY_PORT"]);

    VALKEY_USERNAME = Setting::optional_name("valkey.username", "an ACL user name")
        .env(&["VALKEY_USERNAME", "PULSAR_VALKEY_USERNAME"])
        .help("ACL user; a password alone means user `default`");

    VALKEY_PASSWORD = Setting::new("valkey.password", Kind::Text)
        .env(&["VALKEY_PASSWORD", "PULSAR_VALKEY_PASSWORD"])
        .secret();

    /// `SELECT` takes a C `int`.
    VALKEY_DB = Setting::uint("valkey.db", 0, 0..=(i32::MAX as u64))
        .env(&["VALKEY_DB", "PULSAR_VALKEY_DB"]);

    VALKEY_USE_TLS = Setting::boolean("valkey.use_tls", false)
        .env(&["VALKEY_USE_TLS", "PULSAR_VALKEY_USE_TLS"]);

    /// Existence is checked when connecting, not when loading, so loading stays free of
    /// filesystem checks.
    VALKEY_TLS_CA_FILE = Setting::new("valkey.tls_ca_file", Kind::Text)
        .env(&["VALKEY_TLS_CA_FILE", "PULSAR_VALKEY_TLS_CA_FILE"]);

    /// Up to 256 so that the seeds' `pool_size: 100` (their name, kept as an alias) still
    /// loads.
    VALKEY_CONNECTIONS_PER_SHARD = Setting::uint("valkey.connections_per_shard", 1, 1..=256)
        .alias("valkey.pool_size");

    VALKEY_CONNECT_TIMEOUT =
        Setting::duration("valkey.connect_timeout", Duration::from_secs(5), VALKEY_TIMEOUT);

    VALKEY_COMMAND_TIMEOUT =
        Setting::duration("valkey.command_timeout", Duration::from_secs(5), VALKEY_TIMEOUT);

    /// 0 = refuse publishes at once while Valkey is unreachable.
    VALKEY_MAX_PENDING = Setting::uint("valkey.max_pending", 10_000, 0..=10_000_000);

    /// In Valkey Cluster mode the defaults put the topic as every key's hash tag
    /// (`{{topic}}` renders `{<topic>}`), so all of a topic's keys share a slot.
    VALKEY_STREAM_KEY =
        Setting::template("valkey.stream_key", "topic:{topic}:stream", "topic:{{topic}}:stream");

    VALKEY_META_KEY =
        Setting::template("valkey.meta_key", "topic:{topic}:meta", "topic:{{topic}}:meta");

    /// Beside the topic's stream and meta keys (one template family, so a hash tag on the
    /// topic part puts all of a topic's keys in one Cluster slot); the client's key follows
    /// the last `:`.
    VALKEY_IDEMPOTENCY_KEY = Setting::template(
        "valkey.idempotency_key",
        "topic:{topic}:idem:",
        "topic:{{topic}}:idem:",
    );

    /// Sentinel deployments run 3 or 5; each address may be asked in turn within one connect
    /// timeout, so a long list of dead ones delays finding the master.
    VALKEY_SENTINELS = Setting::new(
        "valkey.sentinels",
        Kind::AddrList {
            count: 1..=16,
            what: "sentinel",
            example: "10.0.0.1:26379,10.0.0.2:26379",
        },
    )
    .env(&["VALKEY_SENTINELS", "PULSAR_VALKEY_SENTINELS"])
    .help("find the master through Sentinel; then VALKEY_HOST/VALKEY_PORT must not be set");

    VALKEY_SENTINEL_MASTER = Setting::optional_name("valkey.sentinel_master", "a master name")
        .env(&["VALKEY_SENTINEL_MASTER", "PULSAR_VALKEY_SENTINEL_MASTER"])
        .help("the name the sentinels monitor");

    VALKEY_SENTINEL_USERNAME =
        Setting::optional_name("valkey.sentinel_username", "an ACL user name")
            .env(&["VALKEY_SENTINEL_USERNAME", "PULSAR_VALKEY_SENTINEL_USERNAME"]);

    VALKEY_SENTINEL_PASSWORD = Setting::new("valkey.sentinel_password", Kind::Text)
        .env(&["VALKEY_SENTINEL_PASSWORD", "PULSAR_VALKEY_SENTINEL_PASSWORD"])
        .secret()
        .help("the sentinels' own, not the data nodes'");

    /// Seeds are asked in turn only until one answers; a handful is plenty, 64 catches a
    /// pasted node list gone wrong.
    VALKEY_CLUSTER_NODES = Setting::new(
        "valkey.cluster_nodes",
        Kind::AddrList {
            count: 1..=64,
            what: "Valkey Cluster node",
            example: "10.0.0.1:6379,10.0.0.2:6379",
        },
    )
    .env(&["VALKEY_CLUSTER_NODES", "PULSAR_VALKEY_CLUSTER_NODES"])
    .help("Valkey Cluster seed nodes: turns cluster mode on; not with sentinels or a db");

    // --- durability, idempotency -------------------------------------------------------------

    DURABILITY_ACK = Setting::choice(
        "durability.ack",
        "persisted",
        &["persisted", "buffered", "replicated"],
    );

    /// One replica, the usual Sentinel deployment (a master, one replica, three sentinels).
    /// With more replicas than this, a failover keeps what was acknowledged only if Sentinel
    /// promotes a replica that had it (it prefers the most up-to-date one); `docs/scaling.md`
    /// says when to raise it. `WAIT` takes an int; more than a few replicas per master is
    /// unusual, 1000 catches a typo.
    DURABILITY_REPLICAS = Setting::uint("durability.replicas", 1, 1..=1000);

    /// A replica on the same network acknowledges in well under a millisecond; a second
    /// covers a replica catching up after a short stall, and keeps producers from waiting
    /// long for their 503 while no replica is reachable (every batch then waits this long).
    /// `WAIT` takes milliseconds (0 would block forever); it must stay below
    /// `valkey.command_timeout` (5 s), which bounds the batch the `WAIT` ends (a cross-key
    /// rule).
    DURABILITY_REPLICA_TIMEOUT =
        Setting::duration("durability.replica_timeout", SEC, MS..=HOUR);

    /// The Python relay's window: far longer than `pulsar-relay-client`'s worst-case retry
    /// envelope (~127 s), so a retry at the end of its backoff still finds the key. A retry
    /// comes after at least a round trip and the client's backoff (1 s first), so a window
    /// below a second deduplicates nothing; a week of keys in Valkey or memory is already far
    /// beyond any retry loop.
    IDEMPOTENCY_WINDOW = Setting::duration(
        "idempotency.window",
        Duration::from_secs(600),
        SEC..=Duration::from_secs(7 * 24 * 3600),
    )
    // PULSAR_ only: the Python relay had a fixed window.
    .env(&["PULSAR_IDEMPOTENCY_WINDOW"]);

    /// Memory backend only: about 100 bytes plus the key and topic each, so ~150 MiB at the
    /// bound with the client's 32-character keys; that is 1,666 keyed publishes a second
    /// sustained over the 10-minute window before new keys get 503. 10^8 keys is ~15 GiB of
    /// memory: beyond that a typo.
    IDEMPOTENCY_MAX_KEYS = Setting::uint("idempotency.max_keys", 1_000_000, 1..=100_000_000)
        .env(&["PULSAR_IDEMPOTENCY_MAX_KEYS"])
        .help("memory backend");

    // --- shutdown, metrics -------------------------------------------------------------------

    /// Kubernetes' default `terminationGracePeriodSeconds`: the orchestrator SIGKILLs the
    /// process then anyway, so a longer default would only be cut short there; shorter was
    /// rejected because a long poll parked at `longpoll.default_timeout` (30 s) or a Valkey
    /// flush after a reconnect should get the chance to finish. Below a second is a unit
    /// mistake and leaves no time to flush queued publishes to Valkey; above an hour every
    /// supervisor (systemd's `TimeoutStopSec` 90 s, Kubernetes' 30 s grace period) has long
    /// SIGKILLed the process.
    SHUTDOWN_TIMEOUT = Setting::duration("shutdown.timeout", Duration::from_secs(30), SEC..=HOUR);

    /// `/metrics` stays on the API port unless asked: a second open port is one more thing to
    /// firewall, and most deployments scrape the port they already route to.
    METRICS_LISTEN = Setting::new(
        "metrics.listen",
        Kind::OptionalAddr {
            example: SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, 9100)),
        },
    )
    // PULSAR_ only, like PULSAR_LISTEN: the Python relay had no such setting.
    .env(&["PULSAR_METRICS_LISTEN"])
    .help("second address serving only /metrics");

    /// Off: one series per topic per counter makes a relay with 10^5 topics emit 10^5-line
    /// scrapes and fills Prometheus with series nobody asked for.
    METRICS_PER_TOPIC = Setting::boolean("metrics.per_topic", false);

    /// 1000 topics × a handful of counters × a few shards keeps a scrape at tens of thousands
    /// of lines (a few MiB), well inside Prometheus' default 10 s scrape timeout; the busiest
    /// topics show up first, the long tail is summed under `_other`. At 100 000 a scrape line
    /// of ~100 bytes makes each counter family ~10 MiB per shard, beyond which a scrape times
    /// out rather than informs.
    METRICS_MAX_TOPIC_SERIES = Setting::uint("metrics.max_topic_series", 1000, 1..=100_000);

    // --- auth --------------------------------------------------------------------------------

    /// `auto` turns the built-in tokens on exactly when a JWT secret is configured (and
    /// external tokens alone when only an external key is), so a Python relay's environment
    /// (which always sets `PULSAR_JWT_SECRET_KEY`) gets authentication without a setting of
    /// ours, and the two-command quick start (loopback, no secret) stays open. `builtin` also
    /// accepts external tokens when an external key is configured; `external` has no users.
    AUTH_MODE = Setting::choice("auth.mode", "auto", &["auto", "none", "builtin", "external"])
        .env(&["PULSAR_AUTH_MODE"])
        .help("auto = builtin when a JWT secret is set, else external when a key is");

    /// HS256 signs and verifies the access tokens; at least 32 bytes (256 bits, the hash's
    /// size, as RFC 7518 §3.2 requires and the Python relay checks).
    AUTH_JWT_SECRET = Setting::new("auth.jwt_secret", Kind::Text)
        .env(&["PULSAR_JWT_SECRET_KEY"])
        .secret()
        .help("HS256 key for access tokens, at least 32 characters");

    /// The Python relay's 10 minutes. At least 6: `pulsar-relay-client` renews a token with
    /// 5 minutes or less left, so a shorter lifetime makes it log in again on every request
    /// (the Python relay accepts 1–5 and has that failure). Two hours bounds how long a stolen
    /// token stays useful. Bare integers are minutes, as in the Python relay's variable.
    AUTH_ACCESS_TOKEN_TTL = Setting::duration_in(
        "auth.access_token_ttl",
        MINUTE,
        Duration::from_secs(600),
        Duration::from_secs(360)..=Duration::from_secs(2 * 3600),
    )
    .env(&["PULSAR_ACCESS_TOKEN_EXPIRE_MINUTES"])
    .help("integer minutes or 10m");

    /// The Python relay's 90 days and 1–365 range; each refresh starts a new lifetime (bare
    /// integers are days, as in its variable).
    AUTH_REFRESH_TOKEN_TTL = Setting::duration_in(
        "auth.refresh_token_ttl",
        DAY,
        Duration::from_secs(90 * 24 * 3600),
        DAY..=Duration::from_secs(365 * 24 * 3600),
    )
    .env(&["PULSAR_REFRESH_TOKEN_TTL_DAYS"])
    .help("integer days or 90d");

    /// Created at start-up (with `admin`, `read`, `write`) when missing; its password is reset
    /// to this one when it no longer verifies, so a lost admin password is recovered by
    /// restarting with a new one.
    AUTH_BOOTSTRAP_ADMIN_USERNAME =
        Setting::optional_name("auth.bootstrap_admin_username", "a user name")
            .env(&["PULSAR_BOOTSTRAP_ADMIN_USERNAME"]);

    AUTH_BOOTSTRAP_ADMIN_PASSWORD = Setting::new("auth.bootstrap_admin_password", Kind::Text)
        .env(&["PULSAR_BOOTSTRAP_ADMIN_PASSWORD"])
        .secret();

    AUTH_BOOTSTRAP_ADMIN_EMAIL = Setting::new("auth.bootstrap_admin_email", Kind::Text)
        .env(&["PULSAR_BOOTSTRAP_ADMIN_EMAIL"]);

    /// Without authentication anyone who reaches the port may publish, read and delete every
    /// topic, so listening beyond loopback without it must be said explicitly.
    AUTH_ALLOW_UNAUTHENTICATED_NETWORK =
        Setting::boolean("auth.allow_unauthenticated_network", false)
            .env(&["PULSAR_ALLOW_UNAUTHENTICATED_NETWORK"])
            .help("listen beyond loopback with auth.mode none");

    /// Pinned: a token naming any other algorithm is refused, so a token cannot choose how it
    /// is checked (`alg: none`, or HS256 keyed with an RSA public key). RS256 is what identity
    /// providers sign with by default.
    AUTH_EXTERNAL_ALGORITHM = Setting::choice(
        "auth.external.algorithm",
        "RS256",
        &[
            "HS256", "HS384", "HS512", "RS256", "RS384", "RS512", "PS256", "PS384", "PS512",
            "ES256", "ES384", "EdDSA",
        ],
    )
    .env(&["PULSAR_EXTERNAL_JWT_ALGORITHM"])
    .help("the one algorithm external tokens may use");

    /// The HMAC key shared with the issuer, for the HS algorithms; at least 32 bytes.
    AUTH_EXTERNAL_SECRET = Setting::new("auth.external.secret", Kind::Text)
        .env(&["PULSAR_EXTERNAL_JWT_SECRET"])
        .secret()
        .help("HS* key shared with the issuer");

    /// The issuer's public key (PEM, SPKI or PKCS#1), for the RS, PS, ES and EdDSA algorithms.
    AUTH_EXTERNAL_PUBLIC_KEY_FILE = Setting::new("auth.external.public_key_file", Kind::Text)
        .env(&["PULSAR_EXTERNAL_JWT_PUBLIC_KEY_FILE"])
        .help("PEM file of the issuer's public key");

    /// The issuer's JSON Web Key Set (`https://`; `http://` only to a loopback host). Read at
    /// start-up and every `jwks_refresh` on a thread of its own (never on a shard), and early
    /// (at most every 30 s) when a token names a key id the set lacks, which is how a key
    /// rotation shows first.
    AUTH_EXTERNAL_JWKS_URL = Setting::new("auth.external.jwks_url", Kind::Text)
        .env(&["PULSAR_EXTERNAL_JWKS_URL"])
        .help("the issuer's JWKS, refreshed in the background");

    /// Identity providers rotate keys over days and publish the new one well before using
    /// it; five minutes keeps a revoked key's tokens out soon after it leaves the set.
    AUTH_EXTERNAL_JWKS_REFRESH = Setting::duration(
        "auth.external.jwks_refresh",
        Duration::from_secs(300),
        Duration::from_secs(10)..=DAY,
    )
    .env(&["PULSAR_EXTERNAL_JWKS_REFRESH"]);

    /// Checked when set (`iss` must equal it). Without it any issuer trusted by the key is
    /// accepted.
    AUTH_EXTERNAL_ISSUER = Setting::new("auth.external.issuer", Kind::Text)
        .env(&["PULSAR_EXTERNAL_JWT_ISSUER"])
        .help("required `iss`");

    /// Checked when set (`aud` must contain it). Without it a token the issuer made for any
    /// other application is accepted here too, which start-up warns about.
    AUTH_EXTERNAL_AUDIENCE = Setting::new("auth.external.audience", Kind::Text)
        .env(&["PULSAR_EXTERNAL_JWT_AUDIENCE"])
        .help("required `aud`");

    /// Clock difference allowed with the issuer on `exp` and `nbf`: another machine's clock.
    AUTH_EXTERNAL_LEEWAY = Setting::duration(
        "auth.external.leeway",
        Duration::from_secs(30),
        Duration::ZERO..=Duration::from_secs(300),
    )
    .env(&["PULSAR_EXTERNAL_JWT_LEEWAY"]);

    /// The claim listing what the token may do: a JSON list or a space-separated string (an
    /// OAuth `scope`) of `read`, `write`, `admin`, `read:<pattern>`, `write:<pattern>`; other
    /// entries are ignored.
    AUTH_EXTERNAL_PERMISSIONS_CLAIM =
        Setting::new(
            "auth.external.permissions_claim",
            Kind::Name {
                default: Some("permissions"),
                what: "a claim name",
            },
        )
        .env(&["PULSAR_EXTERNAL_JWT_PERMISSIONS_CLAIM"]);

    /// The claim naming who the token is for (rate limits, logs, `/auth/me`).
    AUTH_EXTERNAL_SUBJECT_CLAIM =
        Setting::new(
            "auth.external.subject_claim",
            Kind::Name {
                default: Some("sub"),
                what: "a claim name",
            },
        )
        .env(&["PULSAR_EXTERNAL_JWT_SUBJECT_CLAIM"]);

    // --- security ----------------------------------------------------------------------------

    /// None by default: the relay cannot know which sites its users trust, and a page allowed
    /// here can publish and read with the rights of whoever runs it. Same-origin pages (served
    /// under the relay's own host and port) and non-browser clients (no `Origin` header) need
    /// no entry. The Python relay's variables and JSON form work as they are.
    SECURITY_ALLOWED_ORIGINS = Setting::new(
        "security.allowed_origins",
        Kind::List {
            default: &[],
            item: ListItem::Origin,
        },
    )
    .env(&["ALLOWED_ORIGINS", "PULSAR_ALLOWED_ORIGINS"])
    .help("pages that may use the relay cross-origin; `*` = any");

    /// Empty: on a loopback `listen` only `localhost` and loopback addresses, which is what
    /// stops a DNS-rebinding page from reaching the quick start's relay through a name of its
    /// own; on any other address every host (a warning at start-up says so), because the
    /// relay cannot guess the names it is reached by and refusing them all (the Python relay's
    /// empty-list behaviour) only breaks the deployment.
    SECURITY_TRUSTED_HOSTS = Setting::new(
        "security.trusted_hosts",
        Kind::List {
            default: &[],
            item: ListItem::HostPattern,
        },
    )
    .env(&["TRUSTED_HOSTS", "PULSAR_TRUSTED_HOSTS"])
    .help("Host names answered; empty = loopback names on a loopback listen, else any");

    /// None: `X-Forwarded-For` is a header anyone can write, so it is believed only from
    /// peers named here (the load balancer in front of the relay).
    SECURITY_TRUSTED_PROXIES = Setting::new(
        "security.trusted_proxies",
        Kind::List {
            default: &[],
            item: ListItem::IpNet,
        },
    )
    .env(&["PULSAR_TRUSTED_PROXIES"])
    .help("peers whose X-Forwarded-For names the client, e.g. a load balancer");

    // --- rate_limit --------------------------------------------------------------------------

    /// `pulsar-relay-client` sends one request per message and waits for each answer, and
    /// never retries a 429, so a limit it meets is a lost publish. Over a network (a round
    /// trip of half a millisecond or more) one connection makes at most ~2000 requests a
    /// second, a real producer (Pulsar's job updates) tens; 1000 a second per shard (a
    /// relay of N shards allows about N times that per address) leaves room for several
    /// producers behind one NAT while still stopping a flood. The Python relay's 120/min
    /// broke high-volume producers; a bulk publish (up to 1000 messages) counts once.
    RATE_LIMIT_ADDRESS_RATE = Setting::new(
        "rate_limit.address_rate",
        Kind::Rate {
            default: Rate::per_second(1000),
        },
    )
    .env(&["PULSAR_RATE_LIMIT_ADDRESS_RATE"]);

    /// Two seconds at the rate: a producer flushing what it queued during an outage (the
    /// client retries 5xx, then sends its backlog back to back) is not cut off. Below 1 no
    /// request could ever pass.
    RATE_LIMIT_ADDRESS_BURST =
        Setting::uint("rate_limit.address_burst", 2000, 1..=MAX_RATE_COUNT);

    /// As per address, for one authenticated user or key on any number of addresses: the
    /// same producer patterns, counted where they come from rather than where they connect.
    RATE_LIMIT_PRINCIPAL_RATE = Setting::new(
        "rate_limit.principal_rate",
        Kind::Rate {
            default: Rate::per_second(1000),
        },
    )
    .env(&["PULSAR_RATE_LIMIT_PRINCIPAL_RATE"]);

    RATE_LIMIT_PRINCIPAL_BURST =
        Setting::uint("rate_limit.principal_burst", 2000, 1..=MAX_RATE_COUNT);

    /// `POST /auth/login`, per address, on top of the address bucket. The client logs in once
    /// per process (later processes refresh instead) and again only after a 401; ten a
    /// minute lets a pool of workers behind one address start together, where the Python
    /// relay's 5/min failed the sixth, and still holds a password guesser to 14,400 tries a
    /// day per address.
    RATE_LIMIT_LOGIN_RATE = Setting::new(
        "rate_limit.login_rate",
        Kind::Rate {
            default: Rate::per_minute(10),
        },
    )
    .env(&["PULSAR_RATE_LIMIT_LOGIN_RATE"]);

    RATE_LIMIT_LOGIN_BURST = Setting::uint("rate_limit.login_burst", 10, 1..=MAX_RATE_COUNT);

    /// Loopback: a peer on the relay's own host is a local tool, a benchmark, or a reverse
    /// proxy on the same host, whose address says nothing about the clients behind it (one
    /// bucket for all of them would be a self-inflicted outage). A proxy's clients are
    /// counted once it is in `security.trusted_proxies`; `[]` limits loopback peers too.
    RATE_LIMIT_EXEMPT = Setting::new(
        "rate_limit.exempt",
        Kind::List {
            default: &["127.0.0.0/8", "::1"],
            item: ListItem::IpNet,
        },
    )
    .env(&["PULSAR_RATE_LIMIT_EXEMPT"])
    .help("client addresses no address or login bucket applies to");

    /// Per scope per shard. A bucket is ~100 bytes with its map entry, so 100,000 are ~10 MiB
    /// per scope per shard at worst, and cover 100,000 clients active at once per shard;
    /// beyond it the least recently seen are forgotten (an attacker cycling source addresses
    /// cannot grow memory). Below 100 ordinary traffic would keep evicting itself.
    RATE_LIMIT_MAX_TRACKED =
        Setting::uint("rate_limit.max_tracked", 100_000, 100..=10_000_000);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::key_template::KeyTemplate;
    use crate::config::resolve::Named;
    use crate::config::{AckMode, AuthModeSetting, LogFormat, LogLevel, StorageBackend};

    #[test]
    fn declarations_are_unique_and_env_names_have_the_documented_shape() {
        let mut paths: Vec<&str> = ALL.iter().map(|s| s.path).collect();
        paths.extend(ALL.iter().filter_map(|s| s.alias));
        let mut vars: Vec<&str> = ALL.iter().flat_map(|s| s.env).copied().collect();
        for list in [&mut paths, &mut vars] {
            let count = list.len();
            list.sort_unstable();
            list.dedup();
            assert_eq!(list.len(), count, "a path or variable is declared twice");
        }
        // `--help` promises: each name also as PULSAR_<NAME>, which wins; or PULSAR_ only.
        for setting in ALL {
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
            (&LOG_LEVEL, names::<LogLevel>()),
            (&LOG_FORMAT, names::<LogFormat>()),
            (&STORAGE_BACKEND, names::<StorageBackend>()),
            (&DURABILITY_ACK, names::<AckMode>()),
            (&AUTH_MODE, names::<AuthModeSetting>()),
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
        for setting in ALL {
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
}
