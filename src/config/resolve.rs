//! The layers (file < environment < flags over the declared defaults) merged key by key, each
//! value parsed and range-checked as its declaration says, and typed into [`Config`]; plus
//! the rules between keys (a default page within the maximum, Sentinel or Cluster, key
//! templates that never meet, …).
//!
//! Every raw value stays text with its [`Origin`] until read here, so an error names the key,
//! the value and where it came from. Owns: the typed getters (one per [`Kind`]) and the
//! cross-key rules. Does not own: the declarations (`settings`) or the file syntax (`yaml`).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use jsonwebtoken::Algorithm;

use super::cli::Cli;
use super::error::{invalid, ConfigError, Origin};
use super::key_template::KeyTemplate;
use super::lists::{self, split_list, IpNet};
use super::machine::Machine;
use super::parse::{
    format_duration, format_rate, format_size, has_space_or_control, parse_addrs, parse_bool,
    parse_duration, parse_rate, parse_size, parse_uint,
};
// Short, because the code below names a declaration on nearly every line.
use super::settings::{self as s, Kind, Setting};
use super::yaml::read_file;
use super::{
    AckMode, ApiConfig, AuthConfig, AuthMode, AuthModeSetting, BootstrapAdmin, BucketConfig,
    Config, DurabilityConfig, ExternalJwtConfig, ExternalKeySource, HotTierConfig, HttpConfig,
    IdempotencyConfig, LogFormat, LogLevel, LongPollConfig, MemoryConfig, MetricsConfig, Rate,
    RateLimitConfig, Secret, SecurityConfig, SentinelSettings, ShutdownConfig, SseConfig,
    StorageBackend, StorageConfig, ValkeyConfig, WsConfig,
};

/// One raw value: text as written, and its source.
struct Sourced {
    text: String,
    origin: Origin,
}

/// The merged raw layers: the highest-precedence value of each key set anywhere. No `Debug`,
/// as it holds the password in clear.
#[derive(Default)]
pub(super) struct Layers {
    values: HashMap<&'static str, Sourced>,
}

impl Layers {
    fn set(&mut self, key: &'static str, text: String, origin: Origin) {
        self.values.insert(key, Sourced { text, origin });
    }

    pub(super) fn apply_yaml(&mut self, path: &Path, text: &str) -> Result<(), ConfigError> {
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

    pub(super) fn apply_env(&mut self, env: &dyn Fn(&str) -> Option<String>) {
        for setting in s::ALL {
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

    pub(super) fn apply_cli(&mut self, cli: &Cli) {
        if let Some(listen) = cli.listen {
            self.set(s::LISTEN.path, listen.to_string(), Origin::Flag("--listen"));
        }
        if let Some(shards) = cli.shards {
            self.set(s::SHARDS.path, shards.to_string(), Origin::Flag("--shards"));
        }
    }

    /// Parses and checks every key; the first failure is returned.
    pub(super) fn resolve(&self, machine: &Machine) -> Result<Config, ConfigError> {
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
        let auth = self.resolve_auth(&listen)?;
        let idempotency = IdempotencyConfig {
            window: self.duration(&s::IDEMPOTENCY_WINDOW)?.value,
            max_keys: self.uint(&s::IDEMPOTENCY_MAX_KEYS)?.to_usize()?,
        };
        let security = SecurityConfig {
            allowed_origins: self.list(&s::SECURITY_ALLOWED_ORIGINS, lists::normalize_origin)?,
            trusted_hosts: self.list(&s::SECURITY_TRUSTED_HOSTS, lists::host_pattern)?,
            trusted_proxies: self.list(&s::SECURITY_TRUSTED_PROXIES, IpNet::parse)?,
        };
        let rate_limit = self.resolve_rate_limit()?;

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
            auth,
            security,
            rate_limit,
            source_file: None,
        })
    }

    fn resolve_rate_limit(&self) -> Result<RateLimitConfig, ConfigError> {
        let bucket = |rate: &'static Setting, burst: &'static Setting| {
            let rate = self.rate(rate)?;
            let burst = self.uint(burst)?;
            let burst =
                u32::try_from(burst.value).map_err(|_| burst.invalid("a count of requests"))?;
            Ok::<_, ConfigError>((rate.count > 0).then_some(BucketConfig { rate, burst }))
        };
        Ok(RateLimitConfig {
            address: bucket(&s::RATE_LIMIT_ADDRESS_RATE, &s::RATE_LIMIT_ADDRESS_BURST)?,
            principal: bucket(
                &s::RATE_LIMIT_PRINCIPAL_RATE,
                &s::RATE_LIMIT_PRINCIPAL_BURST,
            )?,
            login: bucket(&s::RATE_LIMIT_LOGIN_RATE, &s::RATE_LIMIT_LOGIN_BURST)?,
            exempt: self.list(&s::RATE_LIMIT_EXEMPT, IpNet::parse)?,
            max_tracked: self.uint(&s::RATE_LIMIT_MAX_TRACKED)?.to_usize()?,
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

    fn resolve_auth(&self, listen: &Got<SocketAddr>) -> Result<AuthConfig, ConfigError> {
        let mode = self.choice::<AuthModeSetting>(&s::AUTH_MODE)?;
        let secret = self.optional_text(&s::AUTH_JWT_SECRET);
        let external = self.resolve_external_jwt(secret.as_ref().map(|s| s.value.as_str()))?;
        let mode_value = match mode.value {
            AuthModeSetting::Auto if secret.is_some() => AuthMode::Builtin,
            AuthModeSetting::Auto if external.is_some() => AuthMode::External,
            AuthModeSetting::Auto | AuthModeSetting::None => AuthMode::None,
            AuthModeSetting::Builtin => AuthMode::Builtin,
            AuthModeSetting::External => AuthMode::External,
        };
        if mode_value == AuthMode::External && external.is_none() {
            return Err(mode.invalid(format!(
                "`external` only with a key for external tokens: `{}`, `{}` or `{}`",
                s::AUTH_EXTERNAL_SECRET.path,
                s::AUTH_EXTERNAL_PUBLIC_KEY_FILE.path,
                s::AUTH_EXTERNAL_JWKS_URL.path
            )));
        }
        if mode_value == AuthMode::Builtin {
            match &secret {
                None => {
                    return Err(mode.invalid(format!(
                        "`auto` or `none` unless `{}` (env PULSAR_JWT_SECRET_KEY) is set: the \
                         built-in tokens are signed with it",
                        s::AUTH_JWT_SECRET.path
                    )))
                }
                Some(secret) if secret.value.len() < 32 => {
                    return Err(secret.invalid(
                        "at least 32 bytes (HS256 needs a key as long as its hash; e.g. the \
                         output of `openssl rand -base64 48`)",
                    ))
                }
                Some(_) => {}
            }
        }
        let allow_network = self.boolean(&s::AUTH_ALLOW_UNAUTHENTICATED_NETWORK)?.value;
        if mode_value == AuthMode::None && !listen.value.ip().is_loopback() && !allow_network {
            return Err(listen.invalid(format!(
                "a loopback address while authentication is off: anyone reaching this port \
                 could publish, read and delete every topic. Set `{}` (env \
                 PULSAR_JWT_SECRET_KEY) to turn the built-in tokens on, or \
                 `{}: true` (env PULSAR_ALLOW_UNAUTHENTICATED_NETWORK) if a proxy in front \
                 authenticates",
                s::AUTH_JWT_SECRET.path,
                s::AUTH_ALLOW_UNAUTHENTICATED_NETWORK.path
            )));
        }
        let username = self.optional_text(&s::AUTH_BOOTSTRAP_ADMIN_USERNAME);
        let password = self.optional_text(&s::AUTH_BOOTSTRAP_ADMIN_PASSWORD);
        let email = self.optional_text(&s::AUTH_BOOTSTRAP_ADMIN_EMAIL);
        let bootstrap_admin = match (username, password) {
            (None, None) => None,
            (Some(user), None) => {
                return Err(user.invalid(format!(
                    "no bootstrap admin, or `{}` set as well",
                    s::AUTH_BOOTSTRAP_ADMIN_PASSWORD.path
                )))
            }
            (None, Some(pass)) => {
                return Err(pass.invalid(format!(
                    "no bootstrap admin password, or `{}` set as well",
                    s::AUTH_BOOTSTRAP_ADMIN_USERNAME.path
                )))
            }
            (Some(user), Some(pass)) => {
                check_name(&user)?;
                if !(3..=50).contains(&user.value.chars().count()) {
                    return Err(user.invalid("3 to 50 characters, as every user name"));
                }
                if pass.value.chars().count() < 8 {
                    return Err(pass.invalid("at least 8 characters, as every password"));
                }
                Some(BootstrapAdmin {
                    username: user.value,
                    password: Secret(pass.value),
                    email: email.map(|e| e.value),
                })
            }
        };
        Ok(AuthConfig {
            mode: mode_value,
            jwt_secret: secret.map(|s| Secret(s.value)),
            access_token_ttl: self.duration(&s::AUTH_ACCESS_TOKEN_TTL)?.value,
            refresh_token_ttl: self.duration(&s::AUTH_REFRESH_TOKEN_TTL)?.value,
            bootstrap_admin,
            allow_unauthenticated_network: allow_network,
            // `none` ignores the external key as it ignores the secret.
            external: external.filter(|_| mode_value != AuthMode::None),
        })
    }

    /// `auth.external.*`: `None` when no key is configured.
    fn resolve_external_jwt(
        &self,
        builtin_secret: Option<&str>,
    ) -> Result<Option<ExternalJwtConfig>, ConfigError> {
        let algorithm = self.choice::<JwtAlgorithm>(&s::AUTH_EXTERNAL_ALGORITHM)?;
        let secret = self.optional_text(&s::AUTH_EXTERNAL_SECRET);
        let key_file = self.optional_text(&s::AUTH_EXTERNAL_PUBLIC_KEY_FILE);
        let jwks_url = self.optional_text(&s::AUTH_EXTERNAL_JWKS_URL);
        let hmac = matches!(
            algorithm.value.0,
            Algorithm::HS256 | Algorithm::HS384 | Algorithm::HS512
        );
        let key = match (secret, key_file, jwks_url) {
            (None, None, None) => return Ok(None),
            (Some(secret), None, None) => {
                if !hmac {
                    return Err(secret.invalid(format!(
                        "no secret with `{}: {}`: a secret is for the HS algorithms; this one \
                         takes `{}` or `{}`",
                        s::AUTH_EXTERNAL_ALGORITHM.path,
                        algorithm.value.name(),
                        s::AUTH_EXTERNAL_PUBLIC_KEY_FILE.path,
                        s::AUTH_EXTERNAL_JWKS_URL.path
                    )));
                }
                // RFC 7518 §3.2: a key at least as long as the hash.
                let min = match algorithm.value.0 {
                    Algorithm::HS384 => 48,
                    Algorithm::HS512 => 64,
                    _ => 32,
                };
                if secret.value.len() < min {
                    return Err(secret.invalid(format!(
                        "at least {min} bytes for {}",
                        algorithm.value.name()
                    )));
                }
                // The built-in tokens' key would make every built-in token (an expired one
                // included, within the leeway) an external one carrying its own claims.
                if builtin_secret.is_some_and(|b| b == secret.value) {
                    return Err(secret.invalid(format!(
                        "a key of its own, not `{}`: external tokens must not be signed like \
                         the relay's own",
                        s::AUTH_JWT_SECRET.path
                    )));
                }
                ExternalKeySource::Secret(Secret(secret.value))
            }
            (None, Some(file), None) => {
                if hmac {
                    return Err(file.invalid(format!(
                        "no public key with `{}: {}`: HS algorithms take `{}`",
                        s::AUTH_EXTERNAL_ALGORITHM.path,
                        algorithm.value.name(),
                        s::AUTH_EXTERNAL_SECRET.path
                    )));
                }
                let pem = std::fs::read(&file.value)
                    .map_err(|e| file.invalid(format!("a readable PEM file ({e})")))?;
                ExternalKeySource::PublicKeyPem(pem)
            }
            (None, None, Some(url)) => {
                if hmac {
                    return Err(url.invalid(format!(
                        "no public key with `{}: {}`: HS algorithms take `{}`",
                        s::AUTH_EXTERNAL_ALGORITHM.path,
                        algorithm.value.name(),
                        s::AUTH_EXTERNAL_SECRET.path
                    )));
                }
                check_jwks_url(&url)?;
                ExternalKeySource::Jwks {
                    url: url.value,
                    refresh: self.duration(&s::AUTH_EXTERNAL_JWKS_REFRESH)?.value,
                }
            }
            (secret, file, url) => {
                let second = [url, file, secret].into_iter().flatten().next();
                return Err(second
                    .map(|got| {
                        got.invalid(format!(
                            "one key source only: `{}`, `{}` or `{}`",
                            s::AUTH_EXTERNAL_SECRET.path,
                            s::AUTH_EXTERNAL_PUBLIC_KEY_FILE.path,
                            s::AUTH_EXTERNAL_JWKS_URL.path
                        ))
                    })
                    .unwrap_or_else(|| algorithm.invalid("one key source")));
            }
        };
        Ok(Some(ExternalJwtConfig {
            algorithm: algorithm.value.0,
            key,
            issuer: self
                .optional_text(&s::AUTH_EXTERNAL_ISSUER)
                .map(|g| g.value),
            audience: self
                .optional_text(&s::AUTH_EXTERNAL_AUDIENCE)
                .map(|g| g.value),
            leeway: self.duration(&s::AUTH_EXTERNAL_LEEWAY)?.value,
            permissions_claim: self.name(&s::AUTH_EXTERNAL_PERMISSIONS_CLAIM)?.value,
            subject_claim: self.name(&s::AUTH_EXTERNAL_SUBJECT_CLAIM)?.value,
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
        let Kind::Duration {
            default,
            range,
            unit,
        } = &setting.kind
        else {
            kind_mismatch(setting)
        };
        let expected = format!(
            "a duration such as `24h` or integer {}, from {} to {}",
            unit_name(*unit),
            format_duration(*range.start()),
            format_duration(*range.end())
        );
        let got = self.get(
            setting,
            *default,
            |text| parse_duration(text, *unit),
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

    /// A [`Kind::Rate`] setting.
    fn rate(&self, setting: &'static Setting) -> Result<Rate, ConfigError> {
        let Kind::Rate { default } = &setting.kind else {
            kind_mismatch(setting)
        };
        let expected = format!(
            "a rate such as `1000/s`, `10/min` or `5/h` (at most {} per interval), or `off`",
            s::MAX_RATE_COUNT
        );
        Ok(self
            .get(
                setting,
                *default,
                parse_rate,
                |r| format_rate(*r),
                &expected,
            )?
            .value)
    }

    /// A [`Kind::List`] setting, each entry read by `item` (which also gives its normal
    /// form). Unset (or null in the file) is the declared default.
    fn list<T>(
        &self,
        setting: &'static Setting,
        item: impl Fn(&str) -> Result<T, String>,
    ) -> Result<Vec<T>, ConfigError> {
        let Kind::List {
            default,
            item: what,
        } = &setting.kind
        else {
            kind_mismatch(setting)
        };
        let Some(raw) = self.values.get(setting.path) else {
            // The declared defaults are entries of their kind (tested).
            return Ok(default
                .iter()
                .filter_map(|entry| item(entry).ok())
                .collect());
        };
        let entries = split_list(&raw.text).and_then(|entries| {
            entries
                .iter()
                .map(|entry| item(entry))
                .collect::<Result<Vec<T>, String>>()
        });
        entries.map_err(|why| {
            invalid(
                setting,
                &raw.text,
                &raw.origin,
                format!(
                    "a JSON array (`[\"a\",\"b\"]`) or a comma-separated list of {}: {why}",
                    what.what()
                ),
            )
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

/// What a bare integer counts in a [`Kind::Duration`] setting, for its error message.
fn unit_name(unit: Duration) -> &'static str {
    match unit.as_secs() {
        60 => "minutes",
        3600 => "hours",
        86_400 => "days",
        _ => "seconds",
    }
}

/// An enum a [`Kind::Choice`] setting resolves to: the declaration lists the names of
/// `ALL`'s variants (tested).
pub(super) trait Named: Copy + 'static {
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

impl Named for AuthModeSetting {
    const ALL: &'static [Self] = &[
        AuthModeSetting::Auto,
        AuthModeSetting::None,
        AuthModeSetting::Builtin,
        AuthModeSetting::External,
    ];
    fn name(self) -> &'static str {
        self.as_str()
    }
}

/// `auth.external.algorithm`: jsonwebtoken's algorithms by their JOSE names.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct JwtAlgorithm(Algorithm);

impl Named for JwtAlgorithm {
    const ALL: &'static [Self] = &[
        JwtAlgorithm(Algorithm::HS256),
        JwtAlgorithm(Algorithm::HS384),
        JwtAlgorithm(Algorithm::HS512),
        JwtAlgorithm(Algorithm::RS256),
        JwtAlgorithm(Algorithm::RS384),
        JwtAlgorithm(Algorithm::RS512),
        JwtAlgorithm(Algorithm::PS256),
        JwtAlgorithm(Algorithm::PS384),
        JwtAlgorithm(Algorithm::PS512),
        JwtAlgorithm(Algorithm::ES256),
        JwtAlgorithm(Algorithm::ES384),
        JwtAlgorithm(Algorithm::EdDSA),
    ];
    fn name(self) -> &'static str {
        match self.0 {
            Algorithm::HS256 => "HS256",
            Algorithm::HS384 => "HS384",
            Algorithm::HS512 => "HS512",
            Algorithm::RS256 => "RS256",
            Algorithm::RS384 => "RS384",
            Algorithm::RS512 => "RS512",
            Algorithm::PS256 => "PS256",
            Algorithm::PS384 => "PS384",
            Algorithm::PS512 => "PS512",
            Algorithm::ES256 => "ES256",
            Algorithm::ES384 => "ES384",
            Algorithm::EdDSA => "EdDSA",
            // Not offered (a newer jsonwebtoken's addition), so never chosen.
            _ => "",
        }
    }
}

/// A JWKS address: `https://`, or `http://` to a loopback host (a sidecar, a test); never
/// with user information (`http://127.0.0.1:80@elsewhere/` names `elsewhere`).
fn check_jwks_url(url: &Got<String>) -> Result<(), ConfigError> {
    let lower = url.value.to_ascii_lowercase();
    let authority = lower.split_once("://").map_or("", |(_, rest)| {
        rest.split(['/', '?', '#']).next().unwrap_or("")
    });
    if authority.contains('@') {
        return Err(url.invalid("a URL without user information (`user@`)"));
    }
    if let Some(rest) = lower.strip_prefix("https://") {
        if !rest.is_empty() {
            return Ok(());
        }
    }
    if let Some(rest) = lower.strip_prefix("http://") {
        let authority = rest.split(['/', '?', '#']).next().unwrap_or("");
        let host = match authority.strip_prefix('[') {
            Some(v6) => v6.split(']').next().unwrap_or(""),
            None => authority.rsplit_once(':').map_or(authority, |(h, _)| h),
        };
        let loopback = host == "localhost"
            || host
                .parse::<std::net::IpAddr>()
                .is_ok_and(|ip| ip.is_loopback());
        if loopback {
            return Ok(());
        }
    }
    Err(url.invalid(
        "an `https://` URL (`http://` only to localhost or a loopback address): keys fetched \
         in clear could be replaced on the way",
    ))
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
