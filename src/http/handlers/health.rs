//! `/health` (is the process serving, and what is its storage doing) and `/ready` (may a load
//! balancer send traffic here: every shard up, storage reachable, not draining).

use super::Reply;
use crate::clock::now_ms;
use crate::http::error::ApiError;
use crate::shard::Shard;
use crate::store::message::write_rfc3339_millis;
use crate::store::BackendKind;

pub async fn health(shard: &Shard) -> Result<Reply, ApiError> {
    let summary = shard.storage_summary().await?;
    let mut timestamp = Vec::with_capacity(24);
    write_rfc3339_millis(&mut timestamp, now_ms());
    let shards = shard.shard_count();
    let connected = summary.connected_shards == shards;
    let hot_tier = serde_json::json!({
        "topics": summary.topics,
        "messages": summary.messages,
        "bytes": summary.bytes,
        "max_bytes": shard.config.memory.max_bytes,
        "evictions": summary.evictions,
        "expirations": summary.expirations,
    });
    let storage = match shard.storage.backend() {
        // The memory backend is the hot tier: its counts stand at the top level.
        BackendKind::Memory => {
            let mut storage = hot_tier;
            storage["backend"] = "memory".into();
            storage["persistent"] = false.into();
            storage
        }
        BackendKind::Valkey => {
            let valkey = &shard.config.valkey;
            // INFO only when connected: a health check must answer at once, not wait out the
            // command timeout against a Valkey that is down.
            let info = if connected {
                match shard.storage.server_info().await {
                    Some(Ok(info)) => Some(info),
                    _ => None,
                }
            } else {
                None
            };
            let warnings = info
                .as_ref()
                .map(|i| i.data_loss_risks())
                .unwrap_or_default();
            serde_json::json!({
                "backend": "valkey",
                "persistent": true,
                "connected": connected,
                "connected_shards": summary.connected_shards,
                "host": valkey.host,
                "port": valkey.port,
                "tls": valkey.use_tls,
                "ack": shard.config.durability.ack.as_str(),
                "pending": summary.pending,
                "server_info": info,
                "warnings": warnings,
                "hot_tier": hot_tier,
            })
        }
    };
    let status = if shard.runtime.is_draining() {
        "draining"
    } else if !connected {
        "degraded"
    } else {
        "healthy"
    };
    let body = serde_json::json!({
        "status": status,
        "timestamp": String::from_utf8_lossy(&timestamp),
        "version": env!("CARGO_PKG_VERSION"),
        "shards": shards,
        "storage": storage,
    });
    let body = serde_json::to_vec(&body).map_err(|_| ApiError::internal())?;
    Ok(Reply::json(200, body))
}

pub async fn ready(shard: &Shard) -> Reply {
    let runtime = &shard.runtime;
    let shards_ok = runtime.started_shards() == runtime.shards;
    let storage_ok = match shard.storage_summary().await {
        Ok(summary) => summary.connected_shards == shard.shard_count(),
        Err(_) => false,
    };
    let ready = shards_ok && storage_ok && !runtime.is_draining();
    let body = serde_json::json!({
        "ready": ready,
        "checks": {
            "shards": { "ok": shards_ok, "started": runtime.started_shards(), "total": runtime.shards },
            "storage": { "ok": storage_ok, "backend": shard.storage.backend().name() },
            "draining": runtime.is_draining(),
        },
    });
    Reply::json(
        if ready { 200 } else { 503 },
        serde_json::to_vec(&body).unwrap_or_default(),
    )
}

/// `GET /api/v1/stats`: per shard, what it holds and serves right now.
pub async fn stats(shard: &Shard) -> Result<Reply, ApiError> {
    let snapshots = shard.gather_snapshots().await;
    let shards: Vec<serde_json::Value> = snapshots
        .iter()
        .map(|s| {
            serde_json::json!({
                "shard": s.shard,
                "connections": s.connections,
                "websocket_sessions": s.websockets,
                "event_streams": s.event_streams,
                "parked_polls": s.parked_polls,
                "subscribers": s.consumers,
                "topics_owned": s.storage.topics,
                "hot_tier": { "messages": s.storage.messages, "bytes": s.storage.bytes, "evictions": s.storage.evictions },
                "valkey_pipeline_depth": s.valkey.as_ref().map(|v| v.pending),
                "valkey_connected": s.valkey.as_ref().map(|v| v.connected),
                "busy_ratio": s.busy_ratio,
                "rate_limit_buckets": {
                    "address": s.rate_limit_buckets[0],
                    "principal": s.rate_limit_buckets[1],
                    "login": s.rate_limit_buckets[2],
                },
            })
        })
        .collect();
    let body = serde_json::json!({
        "shards": shards,
        "backend": shard.storage.backend().name(),
    });
    Ok(Reply::json(
        200,
        serde_json::to_vec(&body).map_err(|_| ApiError::internal())?,
    ))
}

/// `GET /messages/poll/stats`, as the Python relay had: parked long-polls and their limits.
pub async fn poll_stats(shard: &Shard) -> Result<Reply, ApiError> {
    let snapshots = shard.gather_snapshots().await;
    let parked: usize = snapshots.iter().map(|s| s.parked_polls).sum();
    let delivered: u64 = snapshots.iter().map(|s| s.delivered[1]).sum();
    let limits = &shard.config.longpoll;
    let body = serde_json::json!({
        "active_polls": parked,
        "parked_per_shard": snapshots.iter().map(|s| s.parked_polls).collect::<Vec<_>>(),
        "messages_delivered": delivered,
        "max_parked_per_shard": limits.max_parked_per_shard,
        "default_timeout_s": limits.default_timeout.as_secs_f64(),
        "max_timeout_s": limits.max_timeout.as_secs_f64(),
    });
    Ok(Reply::json(
        200,
        serde_json::to_vec(&body).map_err(|_| ApiError::internal())?,
    ))
}
