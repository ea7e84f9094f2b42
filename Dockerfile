# Pulsar Relay container image.
#
#   docker build -t pulsar-relay .
#   docker run --rm -p 8080:8080 \
#     --security-opt seccomp=unconfined --ulimit memlock=-1:-1 pulsar-relay
#
# Running it: io_uring, seccomp and locked memory
# ------------------------------------------------
# The relay runs on glommio, i.e. on io_uring; every shard creates its rings at start-up and
# the process exits with "cannot start shard N: ... Likely causes: ..." when it cannot.
# Three things must hold inside the container:
#
# 1. seccomp must allow io_uring_setup, io_uring_enter and io_uring_register. Docker 25+ and
#    containerd's default seccomp profiles deny them (io_uring bypasses the syscall filter
#    for the I/O it performs, so the runtimes blocked it wholesale). Either run with
#    `--security-opt seccomp=unconfined` (what docker-compose.yml does), or, safer, with a
#    copy of your engine's default profile that additionally allows those three syscalls:
#    `--security-opt seccomp=deploy/seccomp-io-uring.json`. docs/operations.md
#    ("Containers: seccomp") explains how to derive that file.
# 2. The kernel must have io_uring enabled: Linux 5.8+, /proc/sys/kernel/io_uring_disabled = 0
#    on the *host* (containers share the host kernel).
# 3. Locked memory (`ulimit -l`): at least 512 KiB per shard. A container inherits the
#    engine's limit, which can be as low as 64 KiB (the kernel default before Linux 5.16):
#    use `--ulimit memlock=-1:-1` (compose: `ulimits: memlock`).
#
# Shards default to one per CPU the container may use (cpuset and CPU quota are honoured);
# set PULSAR_SHARDS to pin a number. memory.max_bytes defaults to a quarter of the container's
# memory limit (cgroup v2 memory.max) when one is set.

# --- build ---------------------------------------------------------------------------------
FROM rust:1.95-bookworm AS builder
WORKDIR /src

# The whole workspace (minus .dockerignore) rather than a stub-sources dependency layer: the
# manifest names bench targets (and may name more), which cargo requires to exist even to
# build one binary, so stubs would have to track every manifest change. The BuildKit cache
# mounts give the same saving: the registry and compiled dependencies persist across builds,
# and a change to src/ recompiles only the relay (~3 min on 2 cores, measured outside Docker). The
# binary is copied out of target/ because a cache mount is not part of the image. Cache
# mounts need BuildKit: the default builder since Docker 23 and in `docker compose`; the old
# Python docker-compose needs DOCKER_BUILDKIT=1 COMPOSE_DOCKER_CLI_BUILD=1.
COPY . .
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/usr/local/cargo/git \
    --mount=type=cache,target=/src/target,sharing=locked \
    cargo build --release --locked --bin pulsar-relay \
 && cp target/release/pulsar-relay /usr/local/bin/pulsar-relay \
 && /usr/local/bin/pulsar-relay --version

# --- runtime -------------------------------------------------------------------------------
FROM debian:bookworm-slim

# ca-certificates: VALKEY_USE_TLS verifies against the system roots.
# curl: the HEALTHCHECK below (the slim image has no HTTP client).
# Versions are not pinned: bookworm's point releases only carry security fixes for these.
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates curl \
 && rm -rf /var/lib/apt/lists/*

# A fixed, unprivileged uid so volume permissions and PodSecurity rules can name it.
RUN groupadd --system --gid 10001 relay \
 && useradd --system --uid 10001 --gid relay --home-dir /nonexistent --shell /usr/sbin/nologin relay

COPY --from=builder /usr/local/bin/pulsar-relay /usr/local/bin/pulsar-relay

# The relay reads ./config.yaml when present: mount one at /etc/pulsar-relay/config.yaml
# (or pass --config). Environment variables override it.
WORKDIR /etc/pulsar-relay
# Numeric, so Kubernetes' runAsNonRoot can verify it without reading /etc/passwd.
USER 10001:10001

EXPOSE 8080

# /health is 200 while the process serves HTTP (even with Valkey down, so a Valkey outage
# does not get the relay restarted); /ready is the one that turns 503. Shell form on purpose:
# `|| exit 1` maps curl's many exit codes to the 1 Docker documents (2 is reserved).
# hadolint ignore=DL3025
HEALTHCHECK --interval=10s --timeout=3s --start-period=10s --retries=3 \
  CMD curl -fsS http://127.0.0.1:8080/health || exit 1

# SIGTERM drains: /ready turns 503, in-flight requests finish (up to shutdown.timeout, 30 s
# by default), then the relay exits; docker-compose.yml gives it 35 s before SIGKILL.
STOPSIGNAL SIGTERM
ENTRYPOINT ["pulsar-relay"]
# The binary's default is 127.0.0.1:8080, unreachable from outside a container.
CMD ["--listen", "0.0.0.0:8080"]
