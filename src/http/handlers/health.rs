//! `/health` (is the process serving, and what is its storage doing) and `/ready` (may a load
//! balancer send traffic here: every shard up and not draining).

use super::Reply;
use crate::clock::now_ms;
use crate::http::error::ApiError;
use crate::shard::Shard;
use crate::store::message::write_rfc3339_millis;

pub async fn health(shard: &Shard) -> Result<Reply, ApiError> {
    let summary = shard.storage_summary().await?;
    let mut timestamp = Vec::with_capacity(24);
    write_rfc3339_millis(&mut timestamp, now_ms());
    let status = if shard.runtime.is_draining() {
        "draining"
    } else {
        "healthy"
    };
    let body = serde_json::json!({
        "status": status,
        "timestamp": String::from_utf8_lossy(&timestamp),
        "version": env!("CARGO_PKG_VERSION"),
        "shards": shard.shard_count(),
        "storage": {
            "backend": shard.storage.backend().name(),
            "persistent": false,
            "topics": summary.topics,
            "messages": summary.messages,
            "bytes": summary.bytes,
            "max_bytes": shard.config.memory.max_bytes,
            "evictions": summary.evictions,
            "expirations": summary.expirations,
        },
    });
    let body = serde_json::to_vec(&body).map_err(|_| ApiError::internal())?;
    Ok(Reply::json(200, body))
}

pub fn ready(shard: &Shard) -> Reply {
    let runtime = &shard.runtime;
    let ready = runtime.is_ready();
    let body = serde_json::json!({
        "ready": ready,
        "checks": {
            "shards": { "ok": runtime.started_shards() == runtime.shards, "started": runtime.started_shards(), "total": runtime.shards },
            "draining": runtime.is_draining(),
        },
    });
    Reply::json(
        if ready { 200 } else { 503 },
        serde_json::to_vec(&body).unwrap_or_default(),
    )
}
