//! Starting the shards: one pinned glommio executor per shard, readiness, signals, shutdown.
//!
//! Start-up order matters for `--listen 127.0.0.1:0`: shard 0 binds first and reports the port
//! the kernel chose; the other shards then bind that same address (`SO_REUSEPORT`). When every
//! shard has bound its listener and warmed its timer, the process prints one line on stdout,
//! `pulsar-relay ready: http://<addr>`, which scripts and the test harness wait for.
//!
//! Shutdown: the first SIGTERM/SIGINT marks the runtime draining (`/ready` turns 503) and sends
//! every shard's inbox a `Shutdown` message; each shard stops accepting, lets in-flight requests
//! finish, then waits until every shard has drained (so none loses a peer its in-flight
//! requests still need) or `shutdown.timeout` passes. A second signal exits at once.

use std::net::SocketAddr;
use std::rc::Rc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{mpsc as std_mpsc, Arc};
use std::time::{Duration, Instant};

use anyhow::{anyhow, Context};
use futures::channel::mpsc;
use glommio::{LocalExecutorBuilder, Placement};

use super::{serve_inbox, InboxMessage, RuntimeState, Shard, ShardInbox, ShardSender};
use crate::auth::external::ExternalVerifier;
use crate::auth::store::memory::MemoryAuthDb;
use crate::auth::store::AuthStore;
use crate::auth::Auth;
use crate::config::Config;
use crate::net::listener;
use crate::net::Surface;
use crate::store::Storage;

/// glommio's default is 10 MiB of registered io_uring buffers per executor, meant for file
/// DMA, which the relay never does; 64 KiB keeps the locked-memory need of the whole process
/// far below a typical 8 MiB `ulimit -l`.
const IO_MEMORY_BYTES: usize = 64 << 10;

/// Runs the relay until it is told to stop. Returns once every shard has exited.
pub fn run(config: Config) -> anyhow::Result<()> {
    let config = Arc::new(config);
    let shards = config.shards;
    let runtime = Arc::new(RuntimeState::new(shards));
    let drained = Arc::new(AtomicUsize::new(0));
    // Users and tokens of the memory backend: one set for every shard.
    let memory_auth = Arc::new(MemoryAuthDb::new());
    // External tokens' keys: one verifier (and one JWKS refresh thread) for every shard.
    let external = match &config.auth.external {
        Some(external) => Some(Arc::new(
            ExternalVerifier::new(external).map_err(|e| anyhow!("{e}"))?,
        )),
        None => None,
    };

    let (senders, inboxes): (Vec<ShardSender>, Vec<ShardInbox>) = (0..shards)
        .map(|_| {
            let (tx, rx) = mpsc::unbounded();
            (tx, rx)
        })
        .unzip();

    let cpus = allowed_cpus();
    let mut handles = Vec::with_capacity(shards);
    let mut addr = config.listen;
    let mut metrics_addr = config.metrics.listen;
    for (id, inbox) in inboxes.into_iter().enumerate() {
        // One channel per shard: if the executor dies before binding (no io_uring, too little
        // locked memory), its sender drops with it and `recv` below returns instead of hanging.
        let (bound_tx, bound_rx) = std_mpsc::channel::<anyhow::Result<Bound>>();
        let boot = ShardBoot {
            id,
            addr,
            metrics_addr,
            config: config.clone(),
            runtime: runtime.clone(),
            peers: senders.clone(),
            inbox,
            bound: bound_tx,
            drained: drained.clone(),
            memory_auth: memory_auth.clone(),
            external: external.clone(),
        };
        let placement = match cpus.get(id % cpus.len().max(1)) {
            Some(&cpu) => Placement::Fixed(cpu),
            None => Placement::Unbound,
        };
        let handle = LocalExecutorBuilder::new(placement)
            .name(&format!("shard-{id}"))
            .io_memory(IO_MEMORY_BYTES)
            .spawn(move || run_shard(boot))
            .map_err(|e| explain_executor_failure(id, &e.to_string()))?;
        // Wait for this shard's bind before starting the next, so port 0 resolves once.
        match bound_rx.recv() {
            Ok(bound) => {
                let bound = bound?;
                addr = bound.api;
                metrics_addr = bound.metrics;
            }
            Err(_) => {
                // The executor thread ended without reporting: glommio could not start it.
                let cause = match handle.join() {
                    Ok(Err(e)) => e.to_string(),
                    Ok(Ok(())) => "exited before binding".to_string(),
                    Err(e) => e.to_string(),
                };
                return Err(explain_executor_failure(id, &cause));
            }
        }
        handles.push(handle);
    }

    spawn_signal_thread(runtime.clone(), senders.clone())?;
    drop(senders);

    // Readiness: every shard bound and warmed. `run_shard` marks itself started.
    let deadline = Instant::now() + Duration::from_secs(30);
    while runtime.started_shards() < shards {
        if Instant::now() > deadline {
            return Err(anyhow!("shards did not become ready within 30 s"));
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    tracing::info!(
        %addr,
        shards,
        backend = ?config.storage.backend,
        instance = crate::instance::id(),
        "relay ready"
    );
    if let Some(metrics) = metrics_addr {
        println!("pulsar-relay metrics: http://{metrics}/metrics");
    }
    println!("pulsar-relay ready: http://{addr}");

    let mut first_error = None;
    for (id, handle) in handles.into_iter().enumerate() {
        match handle.join() {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                tracing::error!(shard = id, error = %e, "shard failed");
                first_error.get_or_insert(e);
            }
            Err(e) => {
                first_error.get_or_insert(anyhow!("shard {id} panicked: {e}"));
            }
        }
    }
    match first_error {
        Some(e) => Err(e),
        None => Ok(()),
    }
}

/// What a shard's executor needs to start.
struct ShardBoot {
    id: usize,
    /// The memory backend's user and token state, shared by every shard.
    memory_auth: Arc<MemoryAuthDb>,
    /// The external tokens' verifier, shared by every shard.
    external: Option<Arc<ExternalVerifier>>,
    addr: SocketAddr,
    /// The separate metrics address, if configured (resolved by shard 0 like `addr`).
    metrics_addr: Option<SocketAddr>,
    config: Arc<Config>,
    runtime: Arc<RuntimeState>,
    peers: Vec<ShardSender>,
    inbox: ShardInbox,
    /// Where the shard reports its bound address (or why it could not bind).
    bound: std_mpsc::Sender<anyhow::Result<Bound>>,
    /// Shards that finished draining; each waits for all before exiting.
    drained: Arc<AtomicUsize>,
}

/// The addresses a shard bound.
struct Bound {
    api: SocketAddr,
    metrics: Option<SocketAddr>,
}

async fn run_shard(boot: ShardBoot) -> anyhow::Result<()> {
    let ShardBoot {
        id,
        addr,
        metrics_addr,
        config,
        runtime,
        peers,
        inbox,
        bound,
        drained,
        memory_auth,
        external,
    } = boot;
    let storage = match Storage::new(&config, id, peers.len()) {
        Ok(s) => s,
        Err(e) => {
            let _ = bound.send(Err(anyhow!("shard {id}: {e}")));
            return Err(anyhow!("{e}"));
        }
    };
    let auth_store = match storage.valkey() {
        Some(valkey) => AuthStore::valkey(valkey.client.clone()),
        None => AuthStore::Memory(memory_auth),
    };
    let auth = match Auth::new(config.auth.clone(), auth_store, external) {
        Ok(a) => a,
        Err(e) => {
            let _ = bound.send(Err(anyhow!("shard {id}: {e}")));
            return Err(anyhow!("{e}"));
        }
    };
    let listener = match glommio::net::TcpListener::bind(addr) {
        Ok(l) => l,
        Err(e) => {
            let err = anyhow!("cannot listen on {addr}: {e}");
            let _ = bound.send(Err(anyhow!("{err}")));
            return Err(err);
        }
    };
    let local = listener
        .local_addr()
        .map_err(|e| anyhow!("shard {id}: local address: {e}"))?;
    let metrics_listener = match metrics_addr.map(glommio::net::TcpListener::bind) {
        None => None,
        Some(Ok(l)) => Some(l),
        Some(Err(e)) => {
            let err = anyhow!("cannot listen for metrics on {metrics_addr:?}: {e}");
            let _ = bound.send(Err(anyhow!("{err}")));
            return Err(err);
        }
    };
    let _ = bound.send(Ok(Bound {
        api: local,
        metrics: metrics_listener.as_ref().and_then(|l| l.local_addr().ok()),
    }));

    let shard = Rc::new(Shard::new(
        id,
        config.clone(),
        runtime.clone(),
        storage,
        auth,
        peers,
    ));
    shard.wire_delivery();

    // The first timer of an executor can take 30-80 ms to arm (glommio 0.9, fixed only on
    // master); pay that now rather than on the first slow-client timeout.
    glommio::timer::sleep(Duration::from_millis(1)).await;

    glommio::spawn_local(sweeper(shard.clone())).detach();
    if shard.storage.valkey().is_some() {
        glommio::spawn_local(valkey_maintenance(shard.clone())).detach();
        glommio::spawn_local(crate::replicate::run(shard.clone())).detach();
    }
    let inbox_task = glommio::spawn_local(serve_inbox(shard.clone(), inbox));
    if id == 0 && shard.auth.enabled() && config.auth.bootstrap_admin.is_some() {
        // Ready once the bootstrap admin can log in (it waits for Valkey if it must); the
        // listener serves meanwhile.
        let (shard, runtime) = (shard.clone(), runtime.clone());
        glommio::spawn_local(async move {
            crate::auth::bootstrap::ensure_admin(shard).await;
            runtime.mark_started();
        })
        .detach();
    } else {
        runtime.mark_started();
    }
    tracing::debug!(shard = id, %local, "shard serving");

    let metrics_task = metrics_listener.map(|l| {
        glommio::spawn_local(listener::accept_loop(
            shard.clone(),
            l,
            Surface::MetricsOnly,
        ))
    });
    listener::accept_loop(shard.clone(), listener, Surface::Api).await;
    if let Some(task) = metrics_task {
        task.await;
    }
    inbox_task.await;
    let shutdown_timeout = config.shutdown.timeout;

    // Drain: connections finish their current request and close (they watch
    // `is_shutting_down`); the gate closes when the last one has left.
    let gate_closed = glommio::timer::timeout(shutdown_timeout, async {
        shard.gate.close().await.ok();
        Ok(())
    })
    .await;
    if gate_closed.is_err() {
        tracing::warn!(
            shard = id,
            "shutdown timeout: closing remaining connections"
        );
    }
    drained.fetch_add(1, Ordering::AcqRel);
    // Keep serving peers' requests until every shard has drained.
    let deadline = Instant::now() + shutdown_timeout;
    while drained.load(Ordering::Acquire) < shard.shard_count() && Instant::now() < deadline {
        glommio::timer::sleep(Duration::from_millis(5)).await;
    }
    // Every shard's connections are closed, so no publish can reach this shard's Valkey
    // client any more: flush what is still queued (write-behind of `ack = buffered`, the
    // sweeper's last commands) before the shard goes.
    if let Some(tier) = shard.storage.valkey() {
        tier.flush_behind(shutdown_timeout).await;
        shard.storage.stop_sync().await;
        tier.client.shutdown().await;
    }
    // What is still queued for peers leaves now, and so does anything posted later by the
    // tasks dropped with this executor (interest withdrawals from their destructors).
    shard.outbox.send_directly();
    tracing::debug!(shard = id, "shard stopped");
    Ok(())
}

/// Applies age retention and ttls on this shard's topics once a second. A read never returns
/// an expired message whether or not the sweeper has run; the sweeper frees the memory.
async fn sweeper(shard: Rc<Shard>) {
    let period = Duration::from_secs(1);
    while !shard.is_shutting_down() {
        glommio::timer::sleep(period).await;
        let removed = shard.storage.expire(crate::clock::now_ms());
        if removed > 0 {
            tracing::debug!(shard = shard.id, removed, "expired messages");
        }
    }
}

/// With the Valkey backend: discover this shard's topics with SCAN (at start and every
/// minute), enforce age retention and ttls on the streams, and (shard 0) report Valkey
/// settings that could lose acknowledged messages.
async fn valkey_maintenance(shard: Rc<Shard>) {
    let Some(tier) = shard.storage.valkey().cloned() else {
        return;
    };
    let period = crate::store::valkey::sweep_period(shard.config.storage.persistent_tier_retention);
    let rescan_every =
        (Duration::from_secs(60).as_millis() / period.as_millis().max(1)).max(1) as u64;
    let mut warned = false;
    let mut round: u64 = 0;
    while !shard.is_shutting_down() {
        if round.is_multiple_of(rescan_every) || !warned {
            match tier.discover_topics().await {
                Ok(found) if found > 0 => {
                    tracing::info!(shard = shard.id, found, "discovered topics in Valkey")
                }
                Ok(_) => {}
                Err(e) => tracing::debug!(shard = shard.id, error = %e, "topic discovery failed"),
            }
        }
        if !warned && shard.id == 0 {
            if let Ok(info) = tier.server_info().await {
                warned = true;
                for risk in info.data_loss_risks() {
                    tracing::warn!(valkey_version = %info.version, "{risk}");
                }
            }
        } else {
            warned = true;
        }
        match tier.sweep(crate::clock::now_ms()).await {
            Ok(removed) if removed > 0 => {
                tracing::debug!(shard = shard.id, removed, "retention sweep")
            }
            Ok(_) => {}
            Err(e) => tracing::debug!(shard = shard.id, error = %e, "retention sweep failed"),
        }
        round += 1;
        glommio::timer::sleep(period).await;
    }
}

fn spawn_signal_thread(runtime: Arc<RuntimeState>, shards: Vec<ShardSender>) -> anyhow::Result<()> {
    use signal_hook::consts::{SIGINT, SIGTERM};
    let mut signals = signal_hook::iterator::Signals::new([SIGTERM, SIGINT])
        .context("installing signal handlers")?;
    std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || {
            let mut seen = 0;
            for signal in signals.forever() {
                seen += 1;
                // Act first, log second, and never let logging end this thread: it is the
                // only one that hears SIGTERM/SIGINT (a panic here, say from a write to a
                // closed stderr, would make the relay ignore every later signal).
                if seen > 1 {
                    log_quietly(|| tracing::warn!(signal, "second signal: exiting now"));
                    std::process::exit(130);
                }
                runtime.begin_draining();
                for tx in &shards {
                    let _ = tx.unbounded_send(InboxMessage::Shutdown);
                }
                log_quietly(|| tracing::info!(signal, "shutting down: draining connections"));
            }
        })
        .context("starting the signal thread")?;
    Ok(())
}

/// Runs a logging statement; a panic inside it (a writer that fails loudly) is swallowed.
fn log_quietly(log: impl FnOnce()) {
    let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(log));
}

/// The CPUs this process may run on, from `Cpus_allowed_list` in /proc/self/status (it honours
/// taskset and cgroup cpusets, unlike counting online CPUs). Empty when unreadable: shards
/// then run unpinned.
fn allowed_cpus() -> Vec<usize> {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let list = status
        .lines()
        .find_map(|l| l.strip_prefix("Cpus_allowed_list:"))
        .unwrap_or("")
        .trim();
    let mut cpus = Vec::new();
    for part in list.split(',').filter(|p| !p.is_empty()) {
        let mut bounds = part.splitn(2, '-').map(|n| n.trim().parse::<usize>());
        match (bounds.next(), bounds.next()) {
            (Some(Ok(a)), None) => cpus.push(a),
            (Some(Ok(a)), Some(Ok(b))) if a <= b => cpus.extend(a..=b),
            _ => return Vec::new(),
        }
    }
    cpus
}

/// Turns glommio's start-up failure into a message that names the likely cause.
fn explain_executor_failure(id: usize, error: &str) -> anyhow::Error {
    let memlock = std::fs::read_to_string("/proc/self/limits")
        .ok()
        .and_then(|l| {
            l.lines()
                .find(|line| line.starts_with("Max locked memory"))
                .map(|line| {
                    line.split_whitespace()
                        .skip(3)
                        .take(2)
                        .collect::<Vec<_>>()
                        .join(" ")
                })
        })
        .unwrap_or_else(|| "unknown".into());
    let io_uring_disabled = std::fs::read_to_string("/proc/sys/kernel/io_uring_disabled")
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| "absent".into());
    anyhow!(
        "cannot start shard {id}: {error}\n\
         The relay runs on io_uring (glommio). Likely causes:\n\
         - the kernel lacks io_uring (needs Linux 5.8+) or disables it \
           (/proc/sys/kernel/io_uring_disabled = {io_uring_disabled}; must be 0);\n\
         - locked memory is too small: `ulimit -l` must allow at least 512 KiB per shard \
           (soft/hard now: {memlock});\n\
         - a container's seccomp profile blocks the io_uring syscalls (Docker 25+ and \
           containerd do by default): allow io_uring_setup, io_uring_enter and \
           io_uring_register in the profile."
    )
}
