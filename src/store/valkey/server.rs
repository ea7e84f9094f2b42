//! The Valkey server itself: `INFO` as `/health` reports it, and the server settings that
//! could lose acknowledged messages (AOF off, an evicting `maxmemory-policy`), which the
//! shard's maintenance task warns about at start.
//!
//! Does not own connection health (the client's) nor any topic's data.

use super::{store_error, ValkeyTier};
use crate::store::StoreError;

/// The parts of `INFO` operators need to judge whether Valkey keeps what the relay gives it.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct ServerInfo {
    pub version: String,
    pub uptime_s: u64,
    pub used_memory: u64,
    pub aof_enabled: bool,
    pub maxmemory_policy: String,
}

impl ServerInfo {
    pub fn parse(info: &str) -> ServerInfo {
        let mut out = ServerInfo::default();
        let mut redis_version = String::new();
        for line in info.lines() {
            let Some((k, v)) = line.trim().split_once(':') else {
                continue;
            };
            match k {
                "valkey_version" => out.version = v.to_owned(),
                "redis_version" => redis_version = v.to_owned(),
                "uptime_in_seconds" => out.uptime_s = v.parse().unwrap_or(0),
                "used_memory" => out.used_memory = v.parse().unwrap_or(0),
                "aof_enabled" => out.aof_enabled = v == "1",
                "maxmemory_policy" => out.maxmemory_policy = v.to_owned(),
                _ => {}
            }
        }
        if out.version.is_empty() {
            out.version = redis_version;
        }
        out
    }

    /// Why this Valkey could lose acknowledged messages, if it could.
    pub fn data_loss_risks(&self) -> Vec<String> {
        let mut risks = Vec::new();
        if !self.aof_enabled {
            risks.push("AOF is off (appendonly no): a Valkey restart loses messages written since the last RDB snapshot".to_owned());
        }
        if self.maxmemory_policy.starts_with("allkeys-")
            || self.maxmemory_policy.starts_with("volatile-")
        {
            risks.push(format!(
                "maxmemory-policy is {}: under memory pressure Valkey evicts whole keys, i.e. entire topic streams; use noeviction",
                self.maxmemory_policy
            ));
        }
        risks
    }
}

impl ValkeyTier {
    /// `INFO` parsed into what `/health` reports. In Valkey Cluster mode every master is
    /// asked and the answers merged so that a risk on any master shows (see
    /// [`ServerInfo::merge`]).
    pub async fn server_info(&self) -> Result<ServerInfo, StoreError> {
        let mut merged: Option<ServerInfo> = None;
        for node in self.masters().await? {
            self.count("info", 1);
            let reply = self
                .client
                .call_on(node.as_ref(), &[b"INFO"])
                .await
                .map_err(store_error)?;
            let text = reply
                .as_bytes()
                .map(|b| String::from_utf8_lossy(b).into_owned())
                .unwrap_or_default();
            let info = ServerInfo::parse(&text);
            merged = Some(match merged {
                None => info,
                Some(so_far) => so_far.merge(info),
            });
        }
        merged.ok_or_else(|| StoreError::Unavailable("no Valkey master known".into()))
    }
}

impl ServerInfo {
    /// Two masters' `INFO` as one: the first version, the shortest uptime, memory summed,
    /// AOF on only if on everywhere, the first risky eviction policy.
    pub fn merge(self, other: ServerInfo) -> ServerInfo {
        let risky = |p: &str| p.starts_with("allkeys-") || p.starts_with("volatile-");
        ServerInfo {
            version: self.version,
            uptime_s: self.uptime_s.min(other.uptime_s),
            used_memory: self.used_memory.saturating_add(other.used_memory),
            aof_enabled: self.aof_enabled && other.aof_enabled,
            maxmemory_policy: if !risky(&self.maxmemory_policy) && risky(&other.maxmemory_policy) {
                other.maxmemory_policy
            } else {
                self.maxmemory_policy
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn info_flags_data_loss_risks() {
        let info = ServerInfo::parse("# Server\r\nredis_version:7.2.4\r\nvalkey_version:8.0.1\r\nuptime_in_seconds:5\r\n# Memory\r\nused_memory:1024\r\nmaxmemory_policy:allkeys-lru\r\n# Persistence\r\naof_enabled:0\r\n");
        assert_eq!(info.version, "8.0.1");
        assert_eq!(info.uptime_s, 5);
        assert_eq!(info.used_memory, 1024);
        assert_eq!(info.data_loss_risks().len(), 2);
        let safe = ServerInfo::parse(
            "redis_version:7.2.4\r\naof_enabled:1\r\nmaxmemory_policy:noeviction\r\n",
        );
        assert_eq!(safe.version, "7.2.4");
        assert!(safe.data_loss_risks().is_empty());
    }
}
