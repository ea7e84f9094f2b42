//! The memory backend's authentication state: one set of maps for the whole process behind a
//! mutex, taken by the `/auth/*` endpoints and by per-shard cache misses only (never per
//! message), plus the generation counter the shards read lock-free on every request.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use super::{ApiKeyRecord, RefreshRow, RevokedReason, TopicRecord, User};
use crate::clock::now_ms;

#[derive(Default)]
pub struct MemoryAuthDb {
    db: Mutex<Db>,
    generation: AtomicU64,
}

#[derive(Default)]
struct Db {
    users: HashMap<String, User>,
    /// username → id.
    names: HashMap<String, String>,
    refresh: HashMap<String, RefreshRow>,
    /// Deny-listed access-token ids → Unix second they expire (then the entry can go).
    denied: HashMap<String, u64>,
    /// `<owner>/<name>` → record.
    topics: HashMap<String, TopicRecord>,
    /// user id → tokens issued before this Unix second are refused.
    disconnects: HashMap<String, u64>,
    api_keys: HashMap<String, ApiKeyRecord>,
}

/// Refresh rows are kept an hour past their expiry (as the Python relay's TTL), so a replay
/// just after expiry is still recognised.
const REFRESH_KEEP_AFTER_EXPIRY: u64 = 3600;

impl MemoryAuthDb {
    pub fn new() -> MemoryAuthDb {
        MemoryAuthDb::default()
    }

    fn with<T>(&self, f: impl FnOnce(&mut Db) -> T) -> T {
        // A panic while holding the lock leaves maps that are still consistent (every change
        // is a single insert or remove), so a poisoned lock is taken over.
        let mut db = self.db.lock().unwrap_or_else(|p| p.into_inner());
        f(&mut db)
    }

    fn changed(&self) {
        self.generation.fetch_add(1, Ordering::AcqRel);
    }

    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    /// Stores `key`; `changed`: a change caches must see (a revocation).
    pub fn put_api_key(&self, key: &ApiKeyRecord, changed: bool) {
        self.with(|db| db.api_keys.insert(key.key_id.clone(), key.clone()));
        if changed {
            self.changed();
        }
    }

    pub fn api_key(&self, key_id: &str) -> Option<ApiKeyRecord> {
        self.with(|db| db.api_keys.get(key_id).cloned())
    }

    pub fn api_keys_of(&self, user_id: &str) -> Vec<ApiKeyRecord> {
        self.with(|db| {
            db.api_keys
                .values()
                .filter(|k| k.user_id == user_id)
                .cloned()
                .collect()
        })
    }

    pub fn user_by_id(&self, id: &str) -> Option<User> {
        self.with(|db| db.users.get(id).cloned())
    }

    pub fn user_by_name(&self, name: &str) -> Option<User> {
        self.with(|db| db.names.get(name).and_then(|id| db.users.get(id)).cloned())
    }

    pub fn create_user(&self, user: &User) -> bool {
        let created = self.with(|db| {
            if db.names.contains_key(&user.username) {
                return false;
            }
            db.names.insert(user.username.clone(), user.id.clone());
            db.users.insert(user.id.clone(), user.clone());
            true
        });
        self.changed();
        created
    }

    pub fn put_user(&self, user: &User) {
        self.with(|db| db.users.insert(user.id.clone(), user.clone()));
        self.changed();
    }

    pub fn delete_user(&self, user: &User) {
        self.with(|db| {
            db.users.remove(&user.id);
            if db.names.get(&user.username) == Some(&user.id) {
                db.names.remove(&user.username);
            }
        });
        self.changed();
    }

    pub fn users(&self) -> Vec<User> {
        let mut users: Vec<User> = self.with(|db| db.users.values().cloned().collect());
        users.sort_by(|a, b| a.created_at.cmp(&b.created_at).then(a.id.cmp(&b.id)));
        users
    }

    pub fn put_refresh(&self, row: &RefreshRow) {
        let now = now_ms() / 1000;
        self.with(|db| {
            db.refresh
                .retain(|_, r| r.expires_at + REFRESH_KEEP_AFTER_EXPIRY > now);
            db.refresh.insert(row.jti.clone(), row.clone());
        });
    }

    pub fn refresh(&self, jti: &str) -> Option<RefreshRow> {
        self.with(|db| db.refresh.get(jti).cloned())
    }

    pub fn rotate(&self, jti: &str) -> bool {
        let rotated = self.with(|db| match db.refresh.get_mut(jti) {
            Some(row) if row.revoked.is_none() => {
                row.revoked = Some(RevokedReason::Rotated);
                row.last_used_at = Some(now_ms() / 1000);
                true
            }
            _ => false,
        });
        self.changed();
        rotated
    }

    pub fn revoke(&self, jti: &str, reason: RevokedReason) {
        self.with(|db| {
            if let Some(row) = db.refresh.get_mut(jti) {
                row.revoked = Some(reason);
            }
        });
        self.changed();
    }

    pub fn refresh_of_user(&self, user_id: &str) -> Vec<RefreshRow> {
        self.with(|db| {
            db.refresh
                .values()
                .filter(|r| r.user_id == user_id)
                .cloned()
                .collect()
        })
    }

    pub fn deny(&self, jti: &str, until: u64) {
        let now = now_ms() / 1000;
        self.with(|db| {
            db.denied.retain(|_, until| *until >= now);
            db.denied.insert(jti.to_owned(), until);
        });
        self.changed();
    }

    pub fn is_denied(&self, jti: &str) -> bool {
        self.with(|db| db.denied.contains_key(jti))
    }

    pub fn disconnect(&self, user_id: &str, at: u64) {
        self.with(|db| db.disconnects.insert(user_id.to_owned(), at));
        self.changed();
    }

    pub fn disconnected_at(&self, user_id: &str) -> Option<u64> {
        self.with(|db| db.disconnects.get(user_id).copied())
    }

    pub fn create_topic(&self, topic: &TopicRecord) -> bool {
        let key = crate::auth::namespaced(&topic.owner_id, &topic.name);
        self.with(|db| {
            if db.topics.contains_key(&key) {
                return false;
            }
            db.topics.insert(key, topic.clone());
            if let Some(user) = db.users.get_mut(&topic.owner_id) {
                if !user.owned_topics.contains(&topic.name) {
                    user.owned_topics.push(topic.name.clone());
                }
            }
            true
        })
    }

    pub fn topic(&self, owner: &str, name: &str) -> Option<TopicRecord> {
        let key = crate::auth::namespaced(owner, name);
        self.with(|db| db.topics.get(&key).cloned())
    }

    pub fn delete_topic(&self, owner: &str, name: &str) {
        let key = crate::auth::namespaced(owner, name);
        self.with(|db| {
            db.topics.remove(&key);
            if let Some(user) = db.users.get_mut(owner) {
                user.owned_topics.retain(|t| t != name);
            }
        });
    }
}
