//! Authentication state in Valkey, in the Python relay's key layout, so both relays share one
//! set of users, sessions and topics:
//!
//! | key | type | content |
//! |---|---|---|
//! | `user:<id>` | hash | `user_id, username, email, hashed_password, is_active` (`True`/`False`), `created_at`, `permissions`, `owned_topics`, `federated_identities` (JSON lists) |
//! | `user:username_index` | hash | username → id, claimed with `HSETNX` |
//! | `refresh:tok:<jti>` | hash | `jti, user_id, secret_hash, parent_jti, issued_at, expires_at, last_used_at, revoked` (`0`/`1`), `revoked_reason, client_hint`; expires an hour after the token |
//! | `refresh:user:<user id>` | set | the user's refresh-token ids |
//! | `denylist:jti:<jti>` | string | `logout`, until the access token expires |
//! | `topic:<owner>/<name>` | hash | `topic_id` (claimed with `HSETNX`), `topic_name, owner_id, description, created_at` |
//! | `user:<owner>:owned_topics` | set | topic names (also kept in the user hash's `owned_topics`, as there) |
//! | `pulsar:auth:generation` | string | ours: incremented on every change, for the shards' caches |
//! | `pulsar:auth:disconnect:<user id>` | string | ours: tokens issued before this Unix second are refused (an admin disconnect) |
//! | `pulsar:apikey:<key id>` | hash | ours: `key_id, user_id, name, secret_hash` (SHA-256 hex), `grants` (JSON list), `created_at, revoked` (`0`/`1`) |
//! | `pulsar:apikey:user:<user id>` | set | ours: the user's key ids |
//!
//! Each command is routed by its key (Cluster-safe: no command spans two keys). The two
//! read-modify-writes are short scripts: rotating a refresh token (a compare-and-set, as the
//! Python relay's) and changing a user's `owned_topics` list.

use std::rc::Rc;

use super::{iso8601, parse_iso8601, ApiKeyRecord, RefreshRow, RevokedReason, TopicRecord, User};
use crate::auth::{AuthError, Permissions};
use crate::clock::now_ms;
use crate::valkey::client::Client;
use crate::valkey::codec::Reply;

const GENERATION_KEY: &str = "pulsar:auth:generation";
const USERNAME_INDEX: &str = "user:username_index";

/// Marks a live refresh token rotated, atomically: 1 if it was live, else 0.
const ROTATE_SCRIPT: &str = "if redis.call('HGET', KEYS[1], 'revoked') == '0' then \
     redis.call('HSET', KEYS[1], 'revoked', '1', 'revoked_reason', 'rotated', \
     'last_used_at', ARGV[1]) return 1 else return 0 end";

/// Adds (`ARGV[2]` = `add`) or removes (`remove`) the topic name `ARGV[1]` in the JSON list
/// of the user hash `KEYS[1]`'s `owned_topics`, as the Python relay keeps it; 1 if changed.
/// A missing user (or field) is left alone: no partial user hash is ever created.
const OWNED_TOPICS_SCRIPT: &str = "local current = redis.call('HGET', KEYS[1], 'owned_topics') \
     if not current then return 0 end \
     local ok, names = pcall(cjson.decode, current) \
     if not ok or type(names) ~= 'table' then return 0 end \
     local out, found = {}, false \
     for _, name in ipairs(names) do \
       if name == ARGV[1] then found = true end \
       if name ~= ARGV[1] or ARGV[2] == 'add' then out[#out + 1] = name end \
     end \
     if ARGV[2] == 'add' then \
       if found then return 0 end \
       out[#out + 1] = ARGV[1] \
     elseif not found then return 0 end \
     local encoded = '[]' \
     if #out > 0 then encoded = cjson.encode(out) end \
     redis.call('HSET', KEYS[1], 'owned_topics', encoded) \
     return 1";

#[derive(Clone)]
pub struct ValkeyAuthStore {
    client: Rc<Client>,
}

fn unavailable(e: impl std::fmt::Display) -> AuthError {
    AuthError::Unavailable(e.to_string())
}

/// A `HGETALL` reply as field/value pairs.
fn fields(reply: Reply) -> Vec<(String, String)> {
    let items = reply.into_array().unwrap_or_default();
    let mut out = Vec::with_capacity(items.len() / 2);
    let mut it = items.into_iter();
    while let (Some(k), Some(v)) = (it.next(), it.next()) {
        if let (Some(k), Some(v)) = (k.as_str(), v.as_str()) {
            out.push((k.to_owned(), v.to_owned()));
        }
    }
    out
}

fn get<'a>(fields: &'a [(String, String)], name: &str) -> &'a str {
    fields
        .iter()
        .find(|(k, _)| k == name)
        .map_or("", |(_, v)| v.as_str())
}

fn json_list(text: &str) -> Vec<String> {
    serde_json::from_str(text).unwrap_or_default()
}

fn to_json_list(items: &[impl AsRef<str>]) -> String {
    let items: Vec<&str> = items.iter().map(AsRef::as_ref).collect();
    serde_json::to_string(&items).unwrap_or_else(|_| "[]".to_owned())
}

impl ValkeyAuthStore {
    pub fn new(client: Rc<Client>) -> ValkeyAuthStore {
        ValkeyAuthStore { client }
    }

    async fn call(&self, key: &str, args: &[&[u8]]) -> Result<Reply, AuthError> {
        self.client
            .call_routed(key.as_bytes(), args)
            .await
            .map_err(unavailable)
    }

    async fn changed(&self) -> Result<(), AuthError> {
        self.call(GENERATION_KEY, &[b"INCR", GENERATION_KEY.as_bytes()])
            .await
            .map(drop)
    }

    pub async fn generation(&self) -> Result<u64, AuthError> {
        let reply = self
            .call(GENERATION_KEY, &[b"GET", GENERATION_KEY.as_bytes()])
            .await?;
        Ok(reply
            .as_str()
            .and_then(|s| s.parse().ok())
            .unwrap_or_default())
    }

    pub async fn user_by_id(&self, id: &str) -> Result<Option<User>, AuthError> {
        let key = format!("user:{id}");
        let reply = self.call(&key, &[b"HGETALL", key.as_bytes()]).await?;
        let f = fields(reply);
        if f.is_empty() {
            return Ok(None);
        }
        Ok(Some(User {
            id: get(&f, "user_id").to_owned(),
            username: get(&f, "username").to_owned(),
            email: get(&f, "email").to_owned(),
            password_hash: get(&f, "hashed_password").to_owned(),
            active: get(&f, "is_active") == "True",
            created_at: get(&f, "created_at").to_owned(),
            permissions: Permissions::from_names(
                json_list(get(&f, "permissions")).iter().map(String::as_str),
            )
            .unwrap_or_default(),
            owned_topics: json_list(get(&f, "owned_topics")),
        }))
    }

    pub async fn user_by_name(&self, name: &str) -> Result<Option<User>, AuthError> {
        let reply = self
            .call(
                USERNAME_INDEX,
                &[b"HGET", USERNAME_INDEX.as_bytes(), name.as_bytes()],
            )
            .await?;
        match reply.as_str() {
            Some(id) => self.user_by_id(id).await,
            None => Ok(None),
        }
    }

    async fn write_user(&self, user: &User) -> Result<(), AuthError> {
        let key = format!("user:{}", user.id);
        let permissions = to_json_list(&user.permissions.names());
        let owned = to_json_list(&user.owned_topics);
        let active = if user.active { "True" } else { "False" };
        self.call(
            &key,
            &[
                b"HSET",
                key.as_bytes(),
                b"user_id",
                user.id.as_bytes(),
                b"username",
                user.username.as_bytes(),
                b"email",
                user.email.as_bytes(),
                b"hashed_password",
                user.password_hash.as_bytes(),
                b"is_active",
                active.as_bytes(),
                b"created_at",
                user.created_at.as_bytes(),
                b"permissions",
                permissions.as_bytes(),
                b"owned_topics",
                owned.as_bytes(),
            ],
        )
        .await?;
        // Python reads this field on every load; keep it if present, else start it empty.
        self.call(
            &key,
            &[b"HSETNX", key.as_bytes(), b"federated_identities", b"[]"],
        )
        .await?;
        Ok(())
    }

    pub async fn create_user(&self, user: &User) -> Result<bool, AuthError> {
        let claimed = self
            .call(
                USERNAME_INDEX,
                &[
                    b"HSETNX",
                    USERNAME_INDEX.as_bytes(),
                    user.username.as_bytes(),
                    user.id.as_bytes(),
                ],
            )
            .await?;
        if claimed.as_int() != Some(1) {
            return Ok(false);
        }
        self.write_user(user).await?;
        self.changed().await?;
        Ok(true)
    }

    pub async fn put_user(&self, user: &User) -> Result<(), AuthError> {
        self.write_user(user).await?;
        self.changed().await
    }

    pub async fn delete_user(&self, user: &User) -> Result<(), AuthError> {
        let key = format!("user:{}", user.id);
        self.call(&key, &[b"DEL", key.as_bytes()]).await?;
        // Only if the index still names this user (the name may have been re-registered).
        let indexed = self
            .call(
                USERNAME_INDEX,
                &[b"HGET", USERNAME_INDEX.as_bytes(), user.username.as_bytes()],
            )
            .await?;
        if indexed.as_str() == Some(user.id.as_str()) {
            self.call(
                USERNAME_INDEX,
                &[b"HDEL", USERNAME_INDEX.as_bytes(), user.username.as_bytes()],
            )
            .await?;
        }
        self.changed().await
    }

    pub async fn users(&self) -> Result<Vec<User>, AuthError> {
        let reply = self
            .call(USERNAME_INDEX, &[b"HGETALL", USERNAME_INDEX.as_bytes()])
            .await?;
        let mut users = Vec::new();
        for (_, id) in fields(reply) {
            if let Some(user) = self.user_by_id(&id).await? {
                users.push(user);
            }
        }
        users.sort_by(|a, b| a.created_at.cmp(&b.created_at).then(a.id.cmp(&b.id)));
        Ok(users)
    }

    pub async fn put_refresh(&self, row: &RefreshRow) -> Result<(), AuthError> {
        let key = format!("refresh:tok:{}", row.jti);
        let now = now_ms() / 1000;
        let ttl = (row.expires_at.saturating_sub(now) + 3600).to_string();
        let issued = iso8601(row.issued_at);
        let expires = iso8601(row.expires_at);
        let used = row.last_used_at.map(iso8601).unwrap_or_default();
        let (revoked, reason) = match row.revoked {
            Some(r) => ("1", r.as_str()),
            None => ("0", ""),
        };
        let parent = row.parent_jti.as_deref().unwrap_or("");
        self.call(
            &key,
            &[
                b"HSET",
                key.as_bytes(),
                b"jti",
                row.jti.as_bytes(),
                b"user_id",
                row.user_id.as_bytes(),
                b"secret_hash",
                row.secret_hash.as_bytes(),
                b"parent_jti",
                parent.as_bytes(),
                b"issued_at",
                issued.as_bytes(),
                b"expires_at",
                expires.as_bytes(),
                b"last_used_at",
                used.as_bytes(),
                b"revoked",
                revoked.as_bytes(),
                b"revoked_reason",
                reason.as_bytes(),
                b"client_hint",
                row.client_hint.as_bytes(),
            ],
        )
        .await?;
        self.call(&key, &[b"EXPIRE", key.as_bytes(), ttl.as_bytes()])
            .await?;
        let set = format!("refresh:user:{}", row.user_id);
        self.call(&set, &[b"SADD", set.as_bytes(), row.jti.as_bytes()])
            .await?;
        let set_ttl = (row.expires_at.saturating_sub(now) + 7200).to_string();
        self.call(&set, &[b"EXPIRE", set.as_bytes(), set_ttl.as_bytes()])
            .await?;
        Ok(())
    }

    pub async fn refresh(&self, jti: &str) -> Result<Option<RefreshRow>, AuthError> {
        let key = format!("refresh:tok:{jti}");
        let f = fields(self.call(&key, &[b"HGETALL", key.as_bytes()]).await?);
        if f.is_empty() {
            return Ok(None);
        }
        let parent = get(&f, "parent_jti");
        Ok(Some(RefreshRow {
            jti: get(&f, "jti").to_owned(),
            user_id: get(&f, "user_id").to_owned(),
            secret_hash: get(&f, "secret_hash").to_owned(),
            parent_jti: (!parent.is_empty()).then(|| parent.to_owned()),
            issued_at: parse_iso8601(get(&f, "issued_at")).unwrap_or_default(),
            // An unreadable expiry is an expired token.
            expires_at: parse_iso8601(get(&f, "expires_at")).unwrap_or_default(),
            last_used_at: parse_iso8601(get(&f, "last_used_at")),
            revoked: match get(&f, "revoked") {
                "0" => None,
                _ => Some(
                    RevokedReason::parse(get(&f, "revoked_reason"))
                        .unwrap_or(RevokedReason::Logout),
                ),
            },
            client_hint: get(&f, "client_hint").to_owned(),
        }))
    }

    pub async fn rotate(&self, jti: &str) -> Result<bool, AuthError> {
        let key = format!("refresh:tok:{jti}");
        let used = iso8601(now_ms() / 1000);
        let reply = self
            .call(
                &key,
                &[
                    b"EVAL",
                    ROTATE_SCRIPT.as_bytes(),
                    b"1",
                    key.as_bytes(),
                    used.as_bytes(),
                ],
            )
            .await?;
        self.changed().await?;
        Ok(reply.as_int() == Some(1))
    }

    pub async fn revoke(&self, jti: &str, reason: RevokedReason) -> Result<(), AuthError> {
        let key = format!("refresh:tok:{jti}");
        let exists = self.call(&key, &[b"EXISTS", key.as_bytes()]).await?;
        if exists.as_int() == Some(1) {
            self.call(
                &key,
                &[
                    b"HSET",
                    key.as_bytes(),
                    b"revoked",
                    b"1",
                    b"revoked_reason",
                    reason.as_str().as_bytes(),
                ],
            )
            .await?;
        }
        self.changed().await
    }

    pub async fn refresh_of_user(&self, user_id: &str) -> Result<Vec<RefreshRow>, AuthError> {
        let set = format!("refresh:user:{user_id}");
        let reply = self.call(&set, &[b"SMEMBERS", set.as_bytes()]).await?;
        let mut rows = Vec::new();
        for jti in reply.into_array().unwrap_or_default() {
            if let Some(jti) = jti.as_str() {
                if let Some(row) = self.refresh(jti).await? {
                    rows.push(row);
                }
            }
        }
        Ok(rows)
    }

    pub async fn deny(&self, jti: &str, until: u64) -> Result<(), AuthError> {
        let key = format!("denylist:jti:{jti}");
        let ttl = until.saturating_sub(now_ms() / 1000).max(1).to_string();
        self.call(
            &key,
            &[b"SET", key.as_bytes(), b"logout", b"EX", ttl.as_bytes()],
        )
        .await?;
        self.changed().await
    }

    pub async fn is_denied(&self, jti: &str) -> Result<bool, AuthError> {
        let key = format!("denylist:jti:{jti}");
        let reply = self.call(&key, &[b"EXISTS", key.as_bytes()]).await?;
        Ok(reply.as_int() == Some(1))
    }

    pub async fn disconnect(
        &self,
        user_id: &str,
        at: u64,
        keep: std::time::Duration,
    ) -> Result<(), AuthError> {
        let key = format!("pulsar:auth:disconnect:{user_id}");
        let at = at.to_string();
        let keep = keep.as_secs().max(1).to_string();
        self.call(
            &key,
            &[
                b"SET",
                key.as_bytes(),
                at.as_bytes(),
                b"EX",
                keep.as_bytes(),
            ],
        )
        .await?;
        self.changed().await
    }

    pub async fn disconnected_at(&self, user_id: &str) -> Result<Option<u64>, AuthError> {
        let key = format!("pulsar:auth:disconnect:{user_id}");
        let reply = self.call(&key, &[b"GET", key.as_bytes()]).await?;
        Ok(reply.as_str().and_then(|s| s.parse().ok()))
    }

    /// Stores `record`; `changed`: a change caches must see (a revocation).
    pub async fn put_api_key(&self, record: &ApiKeyRecord, changed: bool) -> Result<(), AuthError> {
        let key = format!("pulsar:apikey:{}", record.key_id);
        let grants = to_json_list(&record.grants);
        let revoked = if record.revoked { "1" } else { "0" };
        self.call(
            &key,
            &[
                b"HSET",
                key.as_bytes(),
                b"key_id",
                record.key_id.as_bytes(),
                b"user_id",
                record.user_id.as_bytes(),
                b"name",
                record.name.as_bytes(),
                b"secret_hash",
                record.secret_hash.as_bytes(),
                b"grants",
                grants.as_bytes(),
                b"created_at",
                record.created_at.as_bytes(),
                b"revoked",
                revoked.as_bytes(),
            ],
        )
        .await?;
        let set = format!("pulsar:apikey:user:{}", record.user_id);
        self.call(&set, &[b"SADD", set.as_bytes(), record.key_id.as_bytes()])
            .await?;
        if changed {
            self.changed().await?;
        }
        Ok(())
    }

    pub async fn api_key(&self, key_id: &str) -> Result<Option<ApiKeyRecord>, AuthError> {
        let key = format!("pulsar:apikey:{key_id}");
        let f = fields(self.call(&key, &[b"HGETALL", key.as_bytes()]).await?);
        if f.is_empty() {
            return Ok(None);
        }
        Ok(Some(ApiKeyRecord {
            key_id: get(&f, "key_id").to_owned(),
            user_id: get(&f, "user_id").to_owned(),
            name: get(&f, "name").to_owned(),
            secret_hash: get(&f, "secret_hash").to_owned(),
            grants: json_list(get(&f, "grants")),
            created_at: get(&f, "created_at").to_owned(),
            // Anything but an explicit `0` is revoked: an unreadable record grants nothing.
            revoked: get(&f, "revoked") != "0",
        }))
    }

    pub async fn api_keys_of(&self, user_id: &str) -> Result<Vec<ApiKeyRecord>, AuthError> {
        let set = format!("pulsar:apikey:user:{user_id}");
        let reply = self.call(&set, &[b"SMEMBERS", set.as_bytes()]).await?;
        let mut keys = Vec::new();
        for id in reply.into_array().unwrap_or_default() {
            if let Some(id) = id.as_str() {
                if let Some(record) = self.api_key(id).await? {
                    keys.push(record);
                }
            }
        }
        Ok(keys)
    }

    pub async fn create_topic(&self, topic: &TopicRecord) -> Result<bool, AuthError> {
        let key = format!("topic:{}/{}", topic.owner_id, topic.name);
        let claimed = self
            .call(
                &key,
                &[
                    b"HSETNX",
                    key.as_bytes(),
                    b"topic_id",
                    topic.topic_id.as_bytes(),
                ],
            )
            .await?;
        if claimed.as_int() != Some(1) {
            return Ok(false);
        }
        self.call(
            &key,
            &[
                b"HSET",
                key.as_bytes(),
                b"topic_name",
                topic.name.as_bytes(),
                b"owner_id",
                topic.owner_id.as_bytes(),
                b"description",
                topic.description.as_bytes(),
                b"created_at",
                topic.created_at.as_bytes(),
            ],
        )
        .await?;
        let set = format!("user:{}:owned_topics", topic.owner_id);
        self.call(&set, &[b"SADD", set.as_bytes(), topic.name.as_bytes()])
            .await?;
        self.owned_topic(&topic.owner_id, &topic.name, "add")
            .await?;
        Ok(true)
    }

    /// [`OWNED_TOPICS_SCRIPT`] on `owner`'s user hash.
    async fn owned_topic(&self, owner: &str, name: &str, change: &str) -> Result<(), AuthError> {
        let key = format!("user:{owner}");
        self.call(
            &key,
            &[
                b"EVAL",
                OWNED_TOPICS_SCRIPT.as_bytes(),
                b"1",
                key.as_bytes(),
                name.as_bytes(),
                change.as_bytes(),
            ],
        )
        .await
        .map(drop)
    }

    pub async fn topic(&self, owner: &str, name: &str) -> Result<Option<TopicRecord>, AuthError> {
        let key = format!("topic:{owner}/{name}");
        let f = fields(self.call(&key, &[b"HGETALL", key.as_bytes()]).await?);
        if f.is_empty() {
            return Ok(None);
        }
        Ok(Some(TopicRecord {
            topic_id: get(&f, "topic_id").to_owned(),
            name: name.to_owned(),
            owner_id: owner.to_owned(),
            description: get(&f, "description").to_owned(),
            created_at: get(&f, "created_at").to_owned(),
        }))
    }

    pub async fn delete_topic(&self, owner: &str, name: &str) -> Result<(), AuthError> {
        let key = format!("topic:{owner}/{name}");
        self.call(&key, &[b"DEL", key.as_bytes()]).await?;
        let set = format!("user:{owner}:owned_topics");
        self.call(&set, &[b"SREM", set.as_bytes(), name.as_bytes()])
            .await?;
        self.owned_topic(owner, name, "remove").await
    }
}
