//! Valkey for the black-box tests: a real `valkey-server` child process per test on a free
//! port with its own data directory, a `valkey-cli` wrapper to look at what the relay wrote,
//! throwaway TLS certificates, and a publish load that survives the relay or Valkey dying.
//!
//! Owns: the Valkey process lifecycle (start, SIGTERM, SIGKILL, restart on the same port and
//! directory so the AOF reloads), the environment that points a relay at it, and inspection
//! helpers (`XLEN`, `XRANGE`). Does not own: the relay process (that is [`super::Server`]) or
//! any knowledge of the relay's internals — tests compare what the HTTP API said with what
//! `valkey-cli` sees.
//!
//! The CLI rather than a RESP client: the tests cannot add dependencies, and speaking TLS
//! without a TLS crate is not an option; `valkey-cli --json` gives structured replies, and a
//! spawned process per call (a few ms) is cheap at the scale of these tests.

use std::collections::{HashMap, HashSet};
use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde_json::Value;

use super::{Conn, RelayOpts, Response, Server};

/// Valkey starts in milliseconds; reloading a small AOF too. 10 s absorbs a loaded CI machine.
const VALKEY_READY_DEADLINE: Duration = Duration::from_secs(10);

/// How often a start that lost its port to another process (bound between our check that it
/// was free and Valkey's bind) is retried on a new port. Each test binary runs beside others
/// that bind ports too, and a cluster takes two ports per node.
const PORT_ATTEMPTS: usize = 5;

/// No single `valkey-cli` call of these tests takes more than milliseconds; one stuck past this
/// (say, against a stopped server) is killed and reported instead of hanging the suite.
const CLI_DEADLINE: Duration = Duration::from_secs(10);

/// Environment variables `valkey-cli` reads a password from; cleared so a developer's shell
/// cannot authenticate the tests' CLI calls behind their back.
const CLI_AUTH_ENV: &[&str] = &["VALKEYCLI_AUTH", "REDISCLI_AUTH"];

/// How to start a Valkey server.
#[derive(Clone, Debug)]
pub struct ValkeyOpts {
    /// `--appendonly yes|no`.
    pub appendonly: bool,
    /// `--appendfsync always` instead of `everysec`: every acknowledged write is on disk, so a
    /// SIGKILL loses nothing Valkey has answered.
    pub fsync_always: bool,
    /// `--requirepass`.
    pub requirepass: Option<String>,
    /// Serve TLS only (a throwaway CA and server certificate are generated).
    pub tls: bool,
    /// Passed after everything else.
    pub extra_args: Vec<String>,
    /// Run as a Sentinel (`valkey-server <conf> --sentinel`) with this configuration, written
    /// to `sentinel.conf` in the server's directory on the first start. Sentinel rewrites that
    /// file as it learns the topology, so a restart resumes from what it knew.
    pub sentinel_conf: Option<String>,
}

impl Default for ValkeyOpts {
    /// AOF on with `everysec`: what a production deployment of the relay should run.
    fn default() -> ValkeyOpts {
        ValkeyOpts {
            appendonly: true,
            fsync_always: false,
            requirepass: None,
            tls: false,
            extra_args: Vec::new(),
            sentinel_conf: None,
        }
    }
}

/// A CA certificate and key in PEM files.
#[derive(Clone, Debug)]
pub struct CaFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// The files of a TLS-serving Valkey.
#[derive(Clone, Debug)]
pub struct TlsFiles {
    pub ca: CaFiles,
    pub server_cert: PathBuf,
    pub server_key: PathBuf,
}

/// A `valkey-server` child process; killed and its directory removed when dropped.
pub struct ValkeyServer {
    /// `None` while stopped (between [`ValkeyServer::stop`] and [`ValkeyServer::restart`]).
    child: Option<Child>,
    /// The (TLS or plain) port; kept across restarts so the relay finds it again.
    pub port: u16,
    /// Temp dir: `data/` (the `--dir`, AOF and a cluster node's `nodes.conf` included), `tls/`,
    /// `sentinel.conf`, `valkey.log`. Removed on drop.
    dir: PathBuf,
    opts: ValkeyOpts,
    /// `valkey-server`, or `redis-server` when only that is installed.
    server_bin: PathBuf,
    /// `valkey-cli` or `redis-cli`, matching `server_bin`.
    cli_bin: PathBuf,
    pub tls: Option<TlsFiles>,
}

impl ValkeyServer {
    /// Starts Valkey on a free port and waits until it answers PING.
    pub fn start(opts: ValkeyOpts) -> ValkeyServer {
        ValkeyServer::start_on_port_from(opts, free_port)
    }

    /// Starts Valkey on a port `pick_port` chooses (e.g. one whose cluster bus port, +10000, is
    /// free too) and waits until it answers PING. A start that fails because another process
    /// took the port first is retried on a new port.
    pub fn start_on_port_from(opts: ValkeyOpts, pick_port: fn() -> u16) -> ValkeyServer {
        let (server_bin, cli_bin) = find_binaries();
        let dir = unique_temp_dir("pulsar-valkey-test");
        std::fs::create_dir_all(dir.join("data")).expect("create valkey data dir");
        // From here on the directory belongs to `server`: a panic drops it and removes it.
        let mut server = ValkeyServer {
            child: None,
            port: 0,
            dir,
            opts,
            server_bin,
            cli_bin,
            tls: None,
        };
        server.tls = server
            .opts
            .tls
            .then(|| generate_server_tls(&server.dir.join("tls")));
        if let Some(conf) = &server.opts.sentinel_conf {
            std::fs::write(server.sentinel_conf_path(), conf).expect("write sentinel.conf");
        }
        for attempt in 1..=PORT_ATTEMPTS {
            server.port = pick_port();
            match server.try_spawn() {
                Ok(()) => return server,
                Err(StartFailure::PortTaken) if attempt < PORT_ATTEMPTS => continue,
                Err(failure) => panic!("{}", failure.describe(&server)),
            }
        }
        unreachable!("the last attempt returns or panics")
    }

    pub fn host(&self) -> &'static str {
        "127.0.0.1"
    }

    /// A scratch directory that lives as long as this server (for extra files a test needs).
    pub fn scratch_dir(&self) -> &Path {
        &self.dir
    }

    /// The environment that points a relay at this server: backend, host, port, and the
    /// password and TLS CA when this server needs them.
    pub fn relay_env(&self) -> Vec<(String, String)> {
        let mut env = vec![
            ("STORAGE_BACKEND".to_string(), "valkey".to_string()),
            ("VALKEY_HOST".to_string(), self.host().to_string()),
            ("VALKEY_PORT".to_string(), self.port.to_string()),
        ];
        if let Some(pass) = &self.opts.requirepass {
            env.push(("VALKEY_PASSWORD".to_string(), pass.clone()));
        }
        if let Some(tls) = &self.tls {
            env.push(("VALKEY_USE_TLS".to_string(), "true".to_string()));
            env.push((
                "VALKEY_TLS_CA_FILE".to_string(),
                tls.ca.cert.display().to_string(),
            ));
        }
        env
    }

    /// Starts a 2-shard relay on this Valkey with the given YAML and extra environment, and
    /// waits until it reports ready (connected to Valkey).
    pub fn start_relay(&self, config_yaml: &str, extra_env: &[(&str, &str)]) -> Server {
        let server = self.start_relay_unready(config_yaml, extra_env);
        await_ready(&server, Duration::from_secs(20));
        server
    }

    /// Like [`ValkeyServer::start_relay`] without waiting for readiness (for relays that are
    /// expected not to connect).
    pub fn start_relay_unready(&self, config_yaml: &str, extra_env: &[(&str, &str)]) -> Server {
        let mut opts = RelayOpts::new(config_yaml).envs(&self.relay_env());
        for (k, v) in extra_env {
            // Later entries win (`Command::env` keeps the last value for a name).
            opts = opts.env(k, v);
        }
        Server::start_opts(opts)
    }

    /// `sentinel.conf` in the server's directory (only used in Sentinel mode).
    fn sentinel_conf_path(&self) -> PathBuf {
        self.dir.join("sentinel.conf")
    }

    /// Spawns the server on `self.port` and waits for PONG; panics when it does not come.
    fn spawn(&mut self) {
        if let Err(failure) = self.try_spawn() {
            panic!("{}", failure.describe(self));
        }
    }

    /// Spawns the server on `self.port` and waits for PONG; a server that exits at start-up
    /// is reported (and reaped), one that never answers panics.
    fn try_spawn(&mut self) -> Result<(), StartFailure> {
        assert!(self.child.is_none(), "test bug: valkey is already running");
        let data = self.dir.join("data");
        let log = self.dir.join("valkey.log");
        // The log is appended to across starts; only this start's part explains its failure.
        let log_start = self.log().len();
        let port = self.port.to_string();
        let mut cmd = Command::new(&self.server_bin);
        if self.opts.sentinel_conf.is_some() {
            // The config file must be the first argument.
            cmd.arg(self.sentinel_conf_path()).arg("--sentinel");
        }
        match &self.tls {
            Some(tls) => {
                cmd.args(["--port", "0", "--tls-port", &port])
                    .arg("--tls-cert-file")
                    .arg(&tls.server_cert)
                    .arg("--tls-key-file")
                    .arg(&tls.server_key)
                    .arg("--tls-ca-cert-file")
                    .arg(&tls.ca.cert)
                    .args(["--tls-auth-clients", "no"]);
            }
            None => {
                cmd.args(["--port", &port]);
            }
        }
        cmd.args(["--bind", "127.0.0.1", "--daemonize", "no"])
            .arg("--dir")
            .arg(&data)
            .arg("--logfile")
            .arg(&log)
            .args([
                "--appendonly",
                if self.opts.appendonly { "yes" } else { "no" },
            ])
            .args([
                "--appendfsync",
                if self.opts.fsync_always {
                    "always"
                } else {
                    "everysec"
                },
            ])
            .args(["--save", ""]);
        if let Some(pass) = &self.opts.requirepass {
            cmd.args(["--requirepass", pass]);
        }
        cmd.args(&self.opts.extra_args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        let child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {}: {e}", self.server_bin.display()));
        self.child = Some(child);
        self.await_pong(log_start)
    }

    /// Waits until PING answers PONG (not LOADING, not refused). `log_start`: where this
    /// start's lines begin in the log.
    fn await_pong(&mut self, log_start: usize) -> Result<(), StartFailure> {
        let deadline = Instant::now() + VALKEY_READY_DEADLINE;
        loop {
            if let Some(child) = self.child.as_mut() {
                if let Ok(Some(status)) = child.try_wait() {
                    self.child = None;
                    let log = self.log();
                    // Valkey logs this for the client port and the cluster bus port alike.
                    if log
                        .get(log_start..)
                        .is_some_and(|l| l.contains("Address already in use"))
                    {
                        return Err(StartFailure::PortTaken);
                    }
                    return Err(StartFailure::Exited(status.to_string()));
                }
            }
            let last = match self.try_cli(&["PING"]) {
                // Another process's server on a port we lost answers PONG too, until our
                // child notices the port is taken and exits: only our own PID counts.
                Ok(out) if out.trim() == "PONG" => match self.answering_pid() {
                    Some(pid) if Some(pid) == self.pid() => return Ok(()),
                    other => format!("PONG from process {other:?}, not ours"),
                },
                Ok(out) => out,
                Err(e) => e,
            };
            assert!(
                Instant::now() < deadline,
                "valkey on port {} did not answer PING within {VALKEY_READY_DEADLINE:?}; \
                 last answer: {last}\nlog:\n{}",
                self.port,
                self.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// `process_id` from `INFO server` of whatever answers on this server's port.
    fn answering_pid(&self) -> Option<u32> {
        let info = self.try_cli(&["INFO", "server"]).ok()?;
        info.lines()
            .find_map(|l| l.trim().strip_prefix("process_id:"))
            .and_then(|v| v.parse().ok())
    }

    /// Valkey's log so far, for failure messages.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("valkey.log")).unwrap_or_default()
    }

    /// The last `lines` lines of the log under a header naming `label`, the port and whether
    /// the process runs (for failure messages about a set of servers).
    pub fn log_tail(&self, label: &str, lines: usize) -> String {
        let log = self.log();
        let all: Vec<&str> = log.lines().collect();
        format!(
            "--- {label} (port {}, running: {}) ---\n{}\n",
            self.port,
            self.is_running(),
            all[all.len().saturating_sub(lines)..].join("\n")
        )
    }

    pub fn is_running(&self) -> bool {
        self.child.is_some()
    }

    /// The server's process id while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// `127.0.0.1:<port>`.
    pub fn addr(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.port))
    }

    /// SIGTERM and wait for the exit: Valkey flushes its AOF on the way out.
    pub fn stop(&mut self) {
        let mut child = self.child.take().expect("valkey is not running");
        let status = Command::new("kill")
            .arg("-TERM")
            .arg(child.id().to_string())
            .status()
            .expect("run kill");
        assert!(status.success(), "kill -TERM valkey failed: {status}");
        wait_exit(
            &mut child,
            Duration::from_secs(10),
            "valkey-server (SIGTERM)",
        );
    }

    /// SIGKILL and wait: a crash, nothing flushed beyond what `appendfsync` already did.
    pub fn kill9(&mut self) {
        let mut child = self.child.take().expect("valkey is not running");
        // `Child::kill` sends SIGKILL on Unix.
        child.kill().expect("SIGKILL valkey");
        wait_exit(
            &mut child,
            Duration::from_secs(10),
            "valkey-server (SIGKILL)",
        );
    }

    /// Starts the stopped server again on the same port and directory (the AOF reloads).
    pub fn restart(&mut self) {
        self.spawn();
    }

    /// Runs `valkey-cli` with the connection, auth and TLS arguments of this server followed by
    /// `args`; returns stdout. Panics when the CLI fails (e.g. cannot connect).
    pub fn cli(&self, args: &[&str]) -> String {
        self.try_cli(args)
            .unwrap_or_else(|e| panic!("valkey-cli {args:?}: {e}"))
    }

    /// Like [`ValkeyServer::cli`], returning the failure instead of panicking.
    pub fn try_cli(&self, args: &[&str]) -> Result<String, String> {
        self.try_cli_within(args, CLI_DEADLINE)
    }

    /// Like [`ValkeyServer::try_cli`] with another deadline (for `--cluster create`, which
    /// waits for the nodes to agree before it returns).
    pub fn try_cli_within(&self, args: &[&str], within: Duration) -> Result<String, String> {
        let mut cmd = Command::new(&self.cli_bin);
        for name in CLI_AUTH_ENV {
            cmd.env_remove(name);
        }
        cmd.args(["-h", self.host(), "-p", &self.port.to_string()])
            .arg("--no-auth-warning");
        if let Some(pass) = &self.opts.requirepass {
            cmd.args(["--pass", pass]);
        }
        if let Some(tls) = &self.tls {
            cmd.arg("--tls").arg("--cacert").arg(&tls.ca.cert);
        }
        cmd.args(args);
        let output = run_with_deadline(cmd, within)?;
        let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
        if !output.status.success() {
            return Err(format!(
                "exit {}: stdout {stdout:?} stderr {:?}",
                output.status,
                String::from_utf8_lossy(&output.stderr)
            ));
        }
        Ok(stdout)
    }

    /// Runs a command with `--json` output and parses it; an error reply panics.
    pub fn cli_json(&self, args: &[&str]) -> Value {
        self.try_cli_json(args)
            .unwrap_or_else(|e| panic!("valkey-cli {args:?}: {e}"))
    }

    /// Like [`ValkeyServer::cli_json`], returning a failed call or an error reply (which
    /// `valkey-cli` prints with exit status 0) instead of panicking.
    pub fn try_cli_json(&self, args: &[&str]) -> Result<Value, String> {
        let mut full = vec!["--json"];
        full.extend_from_slice(args);
        let out = self.try_cli(&full)?;
        let trimmed = out.trim();
        if trimmed.starts_with("error") {
            return Err(format!("error reply: {trimmed}"));
        }
        serde_json::from_str(trimmed).map_err(|e| format!("output is not JSON ({e}): {out:?}"))
    }

    /// `XLEN key` (0 when the key does not exist).
    pub fn xlen(&self, key: &str) -> u64 {
        let v = self.cli_json(&["XLEN", key]);
        v.as_u64()
            .unwrap_or_else(|| panic!("XLEN {key}: not an integer: {v}"))
    }

    /// Every entry of a stream, oldest first (`XRANGE key - +`).
    pub fn xrange(&self, key: &str) -> Vec<StreamEntry> {
        parse_entries(&self.cli_json(&["XRANGE", key, "-", "+"]))
    }

    /// Waits until at least `min_replicas` replicas are attached to this master, online, and
    /// have acknowledged its replication stream up to where it stood when called: what was
    /// written before is on them. (`WAIT` would not do: it waits for the writes of its own
    /// connection, and every CLI call is a new one.) Replicas acknowledge once a second.
    pub fn await_replicas_in_sync(&self, min_replicas: usize) {
        let offset_of = |line: &str, key: &str| -> Option<u64> {
            line.split(',')
                .find_map(|f| f.strip_prefix(key))
                .and_then(|v| v.parse().ok())
        };
        let target: u64 = self
            .info_field("replication", "master_repl_offset")
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("port {}: no master_repl_offset", self.port));
        let mut last = Vec::new();
        let synced = super::eventually(VALKEY_READY_DEADLINE, || {
            last = self
                .info("replication")
                .into_iter()
                .filter(|(k, _)| k.starts_with("slave") && k[5..].parse::<u32>().is_ok())
                .map(|(_, v)| v)
                .collect();
            let caught_up = last
                .iter()
                .filter(|l| l.contains("state=online"))
                .filter(|l| offset_of(l, "offset=").is_some_and(|o| o >= target))
                .count();
            caught_up >= min_replicas
        });
        assert!(
            synced,
            "port {}: fewer than {min_replicas} replicas reached offset {target} within \
             {VALKEY_READY_DEADLINE:?}: {last:?}",
            self.port
        );
    }

    /// `INFO <section>` as `name -> value` pairs.
    pub fn info(&self, section: &str) -> Vec<(String, String)> {
        self.cli(&["INFO", section])
            .lines()
            .filter_map(|l| l.trim().split_once(':'))
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    /// One `INFO` field (searched across the given section).
    pub fn info_field(&self, section: &str, name: &str) -> Option<String> {
        self.info(section)
            .into_iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v)
    }
}

impl Drop for ValkeyServer {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Why a `valkey-server` did not come up.
enum StartFailure {
    /// It exited because its port (or cluster bus port) was taken: retry on another.
    PortTaken,
    /// It exited for another reason (the exit status).
    Exited(String),
}

impl StartFailure {
    fn describe(&self, server: &ValkeyServer) -> String {
        let why = match self {
            StartFailure::PortTaken => "its port stayed taken".to_string(),
            StartFailure::Exited(status) => format!("it exited with {status}"),
        };
        format!(
            "valkey-server (port {}) did not start: {why}\nlog:\n{}",
            server.port,
            server.log()
        )
    }
}

/// One stream entry: its id and its field-value pairs in stored order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StreamEntry {
    pub id: String,
    pub fields: Vec<(String, String)>,
}

impl StreamEntry {
    /// The value of a field, if the entry has it.
    pub fn field(&self, name: &str) -> Option<&str> {
        self.fields
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }

    /// The names of the fields, in stored order.
    pub fn field_names(&self) -> Vec<&str> {
        self.fields.iter().map(|(k, _)| k.as_str()).collect()
    }
}

/// Parses `valkey-cli --json` output of XRANGE/XREVRANGE: `[[id, [f, v, ...]], ...]`.
fn parse_entries(v: &Value) -> Vec<StreamEntry> {
    let entries = v
        .as_array()
        .unwrap_or_else(|| panic!("XRANGE reply is not an array: {v}"));
    entries
        .iter()
        .map(|e| {
            let id = e[0]
                .as_str()
                .unwrap_or_else(|| panic!("entry without id: {e}"))
                .to_string();
            let flat = e[1]
                .as_array()
                .unwrap_or_else(|| panic!("entry without fields: {e}"));
            let fields = flat
                .chunks(2)
                .map(|pair| {
                    let text = |v: &Value| {
                        v.as_str()
                            .unwrap_or_else(|| panic!("field is not a string: {e}"))
                            .to_string()
                    };
                    (text(&pair[0]), text(&pair[1]))
                })
                .collect();
            StreamEntry { id, fields }
        })
        .collect()
}

/// The key of a topic's stream under the default `valkey.stream_key`.
pub fn stream_key(topic: &str) -> String {
    format!("topic:{topic}:stream")
}

/// Polls `/ready` until 200 or `within` passes; panics with the relay's stderr otherwise.
pub fn await_ready(server: &Server, within: Duration) {
    let mut last = None;
    let ok = super::eventually(within, || {
        let resp = server.get("/ready");
        let ready = resp.status == 200;
        last = Some(resp);
        ready
    });
    assert!(
        ok,
        "relay not ready within {within:?}; last /ready: {last:?}\nstderr:\n{}",
        server.stderr()
    );
}

/// Asserts `/ready` answers 503 on every poll for `window` (a relay that must not connect).
pub fn assert_stays_unready(server: &Server, window: Duration) {
    let until = Instant::now() + window;
    while Instant::now() < until {
        let resp = server.get("/ready");
        assert_eq!(resp.status, 503, "relay became ready: {resp:?}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Asserts `resp` is the documented 503: `SERVICE_UNAVAILABLE` body and a `Retry-After`.
pub fn assert_unavailable(resp: &Response) {
    super::assert_error_body(resp, "SERVICE_UNAVAILABLE");
    assert!(
        resp.header("retry-after").is_some(),
        "503 without Retry-After: {resp:?}"
    );
}

/// Current UTC time as RFC 3339 with milliseconds and `Z` (for entries written by the CLI).
pub fn rfc3339_now() -> String {
    let ms = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock after 1970")
        .as_millis();
    rfc3339_from_ms(u64::try_from(ms).expect("ms fits u64"))
}

/// `ms` since the epoch as `YYYY-MM-DDTHH:MM:SS.mmmZ` (proleptic Gregorian, UTC).
pub fn rfc3339_from_ms(ms: u64) -> String {
    let secs = ms / 1000;
    let days = i64::try_from(secs / 86_400).expect("days fit i64");
    let rem = secs % 86_400;
    // Howard Hinnant's civil_from_days.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:03}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60,
        ms % 1000
    )
}

// ---------------------------------------------------------------------------------------------
// Binaries, ports, processes

/// `valkey-server` and `valkey-cli` from `PATH`; `redis-server`/`redis-cli` as a fallback
/// (said on stderr, since a test run against Redis is not quite the advertised one).
fn find_binaries() -> (PathBuf, PathBuf) {
    if let (Some(server), Some(cli)) = (which("valkey-server"), which("valkey-cli")) {
        return (server, cli);
    }
    if let (Some(server), Some(cli)) = (which("redis-server"), which("redis-cli")) {
        eprintln!(
            "valkey-server not found; using {} and {}",
            server.display(),
            cli.display()
        );
        return (server, cli);
    }
    panic!("valkey-server not found: run scripts/install-deps");
}

fn which(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join(name))
        .find(|p| p.is_file())
}

/// A port nothing listens on right now: bind port 0, read it, release it. Another process
/// could take it before Valkey binds it; [`ValkeyServer::start_on_port_from`] then retries.
pub fn free_port() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind an ephemeral port");
    let port = listener.local_addr().expect("local addr").port();
    // Never the default port of a Valkey someone may be running on this machine.
    assert_ne!(port, 6379, "the OS handed out 6379; rerun");
    port
}

pub fn unique_temp_dir(prefix: &str) -> PathBuf {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    std::env::temp_dir().join(format!(
        "{prefix}-{}-{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    ))
}

fn wait_exit(child: &mut Child, within: Duration, what: &str) {
    let until = Instant::now() + within;
    loop {
        if child.try_wait().expect("try_wait").is_some() {
            return;
        }
        if Instant::now() >= until {
            let _ = child.kill();
            let _ = child.wait();
            panic!("{what} did not exit within {within:?}");
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Runs a command to completion, killing it after `within`.
fn run_with_deadline(mut cmd: Command, within: Duration) -> Result<Output, String> {
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("spawn {cmd:?}: {e}"))?;
    // Readers on threads so a chatty command cannot block on a full pipe while we poll.
    let mut stdout = child.stdout.take().expect("stdout was piped");
    let mut stderr = child.stderr.take().expect("stderr was piped");
    let out_reader = std::thread::spawn(move || {
        let mut buf = Vec::new();
        let _ = std::io::Read::read_to_end(&mut stdout, &mut buf);
        buf
    });
    let err_reader = std::thread::spawn(move || {
        let mut buf = Vec::new();
        let _ = std::io::Read::read_to_end(&mut stderr, &mut buf);
        buf
    });
    let until = Instant::now() + within;
    let status = loop {
        if let Some(status) = child.try_wait().map_err(|e| e.to_string())? {
            break status;
        }
        if Instant::now() >= until {
            let _ = child.kill();
            let _ = child.wait();
            return Err(format!("{cmd:?} did not finish within {within:?}"));
        }
        std::thread::sleep(Duration::from_millis(2));
    };
    Ok(Output {
        status,
        stdout: out_reader.join().unwrap_or_default(),
        stderr: err_reader.join().unwrap_or_default(),
    })
}

// ---------------------------------------------------------------------------------------------
// TLS material

fn openssl(args: &[&str], dir: &Path) {
    let output = Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("run openssl (is it installed?): {e}"));
    assert!(
        output.status.success(),
        "openssl {args:?} failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
}

/// A self-signed CA (`<stem>-ca.pem`, `<stem>-ca.key`) in `dir`. EC P-256 keys: generated in
/// milliseconds, unlike RSA.
pub fn generate_ca(dir: &Path, stem: &str) -> CaFiles {
    std::fs::create_dir_all(dir).expect("create tls dir");
    let cert = format!("{stem}-ca.pem");
    let key = format!("{stem}-ca.key");
    let subject = format!("/CN=pulsar-relay test CA {stem}");
    openssl(
        &[
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-keyout",
            &key,
            "-out",
            &cert,
            "-days",
            "2",
            "-subj",
            &subject,
            "-addext",
            "basicConstraints=critical,CA:TRUE",
            "-addext",
            "keyUsage=critical,keyCertSign,cRLSign",
        ],
        dir,
    );
    CaFiles {
        cert: dir.join(cert),
        key: dir.join(key),
    }
}

/// A CA and a server certificate it signed for `127.0.0.1` and `localhost`.
fn generate_server_tls(dir: &Path) -> TlsFiles {
    let ca = generate_ca(dir, "valkey");
    let ext = dir.join("server.ext");
    std::fs::write(
        &ext,
        "basicConstraints=CA:FALSE\n\
         keyUsage=critical,digitalSignature,keyEncipherment\n\
         extendedKeyUsage=serverAuth\n\
         subjectAltName=IP:127.0.0.1,DNS:localhost\n",
    )
    .expect("write server.ext");
    openssl(
        &[
            "req",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-keyout",
            "server.key",
            "-out",
            "server.csr",
            "-subj",
            "/CN=127.0.0.1",
        ],
        dir,
    );
    let ca_cert = ca.cert.display().to_string();
    let ca_key = ca.key.display().to_string();
    openssl(
        &[
            "x509",
            "-req",
            "-in",
            "server.csr",
            "-CA",
            &ca_cert,
            "-CAkey",
            &ca_key,
            "-CAcreateserial",
            "-out",
            "server.pem",
            "-days",
            "2",
            "-extfile",
            "server.ext",
        ],
        dir,
    );
    TlsFiles {
        ca,
        server_cert: dir.join("server.pem"),
        server_key: dir.join("server.key"),
    }
}

/// The payload of each entry (as JSON; `null` when missing or not JSON), by entry id.
pub fn payloads_by_id(entries: &[StreamEntry]) -> HashMap<String, Value> {
    entries
        .iter()
        .map(|e| {
            let payload =
                serde_json::from_str(e.field("payload").unwrap_or("null")).unwrap_or(Value::Null);
            (e.id.clone(), payload)
        })
        .collect()
}

/// What a load's topics hold in Valkey beyond what was acknowledged, per topic.
#[derive(Debug, Default)]
pub struct StreamAudit {
    pub topic: String,
    /// Entries in the stream.
    pub entries: usize,
    /// Entries whose publish was not answered 201 (a 503 or a lost connection): applied
    /// although the producer was told otherwise. A producer that retries duplicates them
    /// (at-least-once); they are never missing acknowledged messages.
    pub applied_unacked: usize,
    /// Payloads stored more than once.
    pub duplicates: usize,
}

/// Asserts every message a load worker saw acknowledged is in its topic's stream with the
/// payload it published, and that no request hung or got an unexpected answer. Returns, per
/// worker, what else the stream holds.
pub fn assert_acked_in_valkey(
    valkey: &ValkeyServer,
    outcomes: &[WorkerOutcome],
) -> Vec<StreamAudit> {
    let mut audits = Vec::new();
    for (w, out) in outcomes.iter().enumerate() {
        assert_answered(out);
        let entries = valkey.xrange(&stream_key(&out.topic));
        let stored = payloads_by_id(&entries);
        let missing: Vec<&(u64, String)> = out
            .acked
            .iter()
            .filter(|(i, id)| stored.get(id) != Some(&serde_json::json!({"w": w, "i": i})))
            .collect();
        assert!(
            missing.is_empty(),
            "{}: {} of {} acknowledged messages missing from Valkey (or with another payload), \
             first: {:?}",
            out.topic,
            missing.len(),
            out.acked.len(),
            missing.first()
        );
        let acked_ids: HashSet<&str> = out.acked.iter().map(|(_, id)| id.as_str()).collect();
        let distinct: HashSet<String> = stored.values().map(Value::to_string).collect();
        audits.push(StreamAudit {
            topic: out.topic.clone(),
            entries: entries.len(),
            applied_unacked: entries
                .iter()
                .filter(|e| !acked_ids.contains(e.id.as_str()))
                .count(),
            duplicates: entries.len() - distinct.len(),
        });
    }
    audits
}

// ---------------------------------------------------------------------------------------------
// Publish load

/// Asserts a load worker got only 201s and well-formed 503s, and no request hung.
pub fn assert_answered(out: &WorkerOutcome) {
    assert!(
        out.unexpected.is_empty(),
        "{}: {:?}",
        out.topic,
        out.unexpected
    );
    assert_eq!(out.hung, 0, "{}: requests hung: {out:?}", out.topic);
}

/// What one load worker saw.
#[derive(Debug, Default)]
pub struct WorkerOutcome {
    pub topic: String,
    /// `(i, message_id)` of every publish answered 201; payload was `{"w":w,"i":i}`.
    pub acked: Vec<(u64, String)>,
    /// Publishes answered 503 (each checked for `Retry-After` and the error body).
    pub unavailable: u64,
    /// Requests that failed on the connection (refused, reset, closed mid-response).
    pub conn_errors: u64,
    /// Requests that got no answer within the socket read timeout.
    pub hung: u64,
    /// Anything else: unexpected statuses or malformed 503s, described.
    pub unexpected: Vec<String>,
    /// The slowest answered request (a 201 or a 503), to show no request waited unbounded.
    pub max_latency: Duration,
}

/// Worker threads publishing sequential payloads on keep-alive connections, each to its own
/// topic, recording what was acknowledged. Bounded by a request count and a time limit per
/// worker, so a stuck test cannot run forever.
pub struct PublishLoad {
    stop: Arc<AtomicBool>,
    acks: Vec<Arc<AtomicU64>>,
    failures: Arc<AtomicU64>,
    workers: Vec<JoinHandle<WorkerOutcome>>,
}

impl PublishLoad {
    /// One worker per topic publishing to `addr`, each at most `max_requests` requests and for
    /// at most `max_time`.
    pub fn start(
        addr: SocketAddr,
        topics: &[String],
        max_requests: u64,
        max_time: Duration,
    ) -> PublishLoad {
        let stop = Arc::new(AtomicBool::new(false));
        let failures = Arc::new(AtomicU64::new(0));
        let mut acks = Vec::new();
        let mut workers = Vec::new();
        for (w, topic) in topics.iter().enumerate() {
            let acked = Arc::new(AtomicU64::new(0));
            acks.push(acked.clone());
            let stop = stop.clone();
            let failures = failures.clone();
            let topic = topic.clone();
            workers.push(std::thread::spawn(move || {
                publish_worker(
                    addr,
                    w,
                    topic,
                    max_requests,
                    max_time,
                    &stop,
                    &acked,
                    &failures,
                )
            }));
        }
        PublishLoad {
            stop,
            acks,
            failures,
            workers,
        }
    }

    /// The fewest acknowledgements any worker has had so far.
    pub fn min_acked(&self) -> u64 {
        self.acks
            .iter()
            .map(|a| a.load(Ordering::Relaxed))
            .min()
            .unwrap_or(0)
    }

    /// Failed requests (503s, connection errors, timeouts) across workers so far.
    pub fn failures(&self) -> u64 {
        self.failures.load(Ordering::Relaxed)
    }

    /// Stops the workers and collects what they saw.
    pub fn finish(self) -> Vec<WorkerOutcome> {
        self.stop.store(true, Ordering::Relaxed);
        self.workers
            .into_iter()
            .map(|h| h.join().expect("load worker panicked"))
            .collect()
    }
}

#[allow(clippy::too_many_arguments)]
fn publish_worker(
    addr: SocketAddr,
    w: usize,
    topic: String,
    max_requests: u64,
    max_time: Duration,
    stop: &AtomicBool,
    acked: &AtomicU64,
    failures: &AtomicU64,
) -> WorkerOutcome {
    let mut out = WorkerOutcome {
        topic: topic.clone(),
        ..WorkerOutcome::default()
    };
    let started = Instant::now();
    let mut conn: Option<Conn> = None;
    let mut i = 0u64;
    while i < max_requests && !stop.load(Ordering::Relaxed) && started.elapsed() < max_time {
        let c = match conn.as_mut() {
            Some(c) => c,
            None => match Conn::try_connect(addr) {
                Ok(c) => conn.insert(c),
                Err(_) => {
                    // The relay is down: count it once per attempt, retry a little later.
                    out.conn_errors += 1;
                    failures.fetch_add(1, Ordering::Relaxed);
                    std::thread::sleep(Duration::from_millis(20));
                    continue;
                }
            },
        };
        let body = super::publish_body(&topic, &format!(r#"{{"w":{w},"i":{i}}}"#));
        let sent = Instant::now();
        let result = c.try_request("POST", "/api/v1/messages", Some(body.as_bytes()));
        let latency = sent.elapsed();
        match result {
            Ok(resp) => {
                out.max_latency = out.max_latency.max(latency);
                let closes = resp
                    .header("connection")
                    .is_some_and(|v| v.eq_ignore_ascii_case("close"));
                match resp.status {
                    201 => {
                        let id = resp.json()["message_id"]
                            .as_str()
                            .map(str::to_string)
                            .unwrap_or_else(|| panic!("201 without message_id: {resp:?}"));
                        out.acked.push((i, id));
                        acked.fetch_add(1, Ordering::Relaxed);
                    }
                    503 => {
                        out.unavailable += 1;
                        failures.fetch_add(1, Ordering::Relaxed);
                        let well_formed = resp.header("retry-after").is_some()
                            && serde_json::from_slice::<Value>(&resp.body)
                                .is_ok_and(|v| v["error"] == "SERVICE_UNAVAILABLE");
                        if !well_formed {
                            out.unexpected.push(format!("malformed 503: {resp:?}"));
                        }
                    }
                    _ => out.unexpected.push(format!("publish {i}: {resp:?}")),
                }
                if closes {
                    conn = None;
                }
            }
            Err(e) => {
                failures.fetch_add(1, Ordering::Relaxed);
                if e.is_timeout() {
                    out.hung += 1;
                } else {
                    out.conn_errors += 1;
                }
                conn = None;
            }
        }
        i += 1;
    }
    out
}
