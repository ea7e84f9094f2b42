//! Shared harness for the black-box integration tests: starts the real `pulsar-relay` binary
//! on an ephemeral port with a per-test configuration, and talks to it over real sockets with
//! a deliberately small HTTP/1.1 client.
//!
//! Owns: process lifecycle (spawn with a config file and extra environment, wait for the ready
//! line, SIGKILL on drop, SIGTERM or SIGKILL on request, start again on the same port), a temp
//! directory per server, and a raw client that can send arbitrary bytes and read back any
//! number of (pipelined) responses — or report a dead connection instead of panicking. Does
//! not own: any knowledge of the server's internals — everything here goes through the
//! documented CLI, config file, environment and wire protocol. Valkey for the tests of the
//! Valkey backend is in [`valkey`]; a Valkey Cluster in [`cluster`], a Sentinel-watched master
//! and replica in [`sentinel`], several relays on one Valkey in [`fleet`], the real nginx with
//! the shipped load-balancer configuration in [`nginx`], the real Python relay in
//! [`python_relay`].
//!
//! Every socket read has a timeout, so a hung server fails the test with a message instead of
//! hanging the suite.

// Each integration-test binary compiles this module and uses a different subset of it.
#![allow(dead_code)]

pub mod cluster;
pub mod fault_proxy;
pub mod fleet;
pub mod hostile;
pub mod nginx;
pub mod python;
pub mod python_relay;
pub mod resuming_consumer;
pub mod sentinel;
pub mod sse;
pub mod valkey;
pub mod ws;

use std::io::{BufRead, BufReader, ErrorKind, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use serde_json::Value;

/// How long the server may take to print its ready line. Startup is milliseconds normally; 20 s
/// leaves room for a loaded 2-core CI machine running several test binaries at once.
const READY_DEADLINE: Duration = Duration::from_secs(20);

/// Default per-read socket timeout: far above any legitimate response time, far below a CI
/// job's patience.
pub const READ_TIMEOUT: Duration = Duration::from_secs(10);

/// The line the server prints on stdout once every shard accepts connections.
const READY_PREFIX: &str = "pulsar-relay ready: http://";

static NEXT_DIR: AtomicU64 = AtomicU64::new(0);

/// The environment variables the relay reads (see `pulsar-relay --help`). They are removed from
/// every spawned relay's environment so a developer's shell (say, `STORAGE_BACKEND=valkey`
/// exported for manual runs) cannot change what a test exercises; a test sets what it needs
/// through [`RelayOpts::env`].
const RELAY_ENV_VARS: &[&str] = &[
    "STORAGE_BACKEND",
    "PERSISTENT_TIER_RETENTION",
    "MAX_MESSAGES_PER_TOPIC",
    "MEMORY_MAX_BYTES",
    "VALKEY_HOST",
    "VALKEY_PORT",
    "VALKEY_USERNAME",
    "VALKEY_PASSWORD",
    "VALKEY_DB",
    "VALKEY_USE_TLS",
    "VALKEY_TLS_CA_FILE",
    "VALKEY_SENTINELS",
    "VALKEY_SENTINEL_MASTER",
    "VALKEY_SENTINEL_USERNAME",
    "VALKEY_SENTINEL_PASSWORD",
    "VALKEY_CLUSTER_NODES",
    "LOG_FORMAT",
    "ALLOWED_ORIGINS",
    "TRUSTED_HOSTS",
    // Read only in their PULSAR_ form, which is removed too.
    "IDEMPOTENCY_WINDOW",
    "IDEMPOTENCY_MAX_KEYS",
    "TRUSTED_PROXIES",
    "RATE_LIMIT_ADDRESS_RATE",
    "RATE_LIMIT_PRINCIPAL_RATE",
    "RATE_LIMIT_LOGIN_RATE",
    "RATE_LIMIT_EXEMPT",
];

/// How to start a relay: configuration file, shard count, extra environment, listen address.
#[derive(Clone, Debug)]
pub struct RelayOpts {
    /// The YAML written to the config file passed with `--config` (may be empty).
    pub config_yaml: String,
    pub shards: usize,
    /// Extra environment variables (e.g. `STORAGE_BACKEND=valkey`), set after the relay's own
    /// variables were cleared from the inherited environment.
    pub env: Vec<(String, String)>,
    /// `--listen` address; `None` means `127.0.0.1:0` (an ephemeral port).
    pub listen: Option<SocketAddr>,
}

impl RelayOpts {
    /// 2 shards, the given YAML, no extra environment, an ephemeral port.
    pub fn new(config_yaml: &str) -> RelayOpts {
        RelayOpts {
            config_yaml: config_yaml.to_string(),
            shards: 2,
            env: Vec::new(),
            listen: None,
        }
    }

    pub fn env(mut self, name: &str, value: &str) -> RelayOpts {
        self.env.push((name.to_string(), value.to_string()));
        self
    }

    pub fn envs(mut self, vars: &[(String, String)]) -> RelayOpts {
        self.env.extend_from_slice(vars);
        self
    }
}

/// A running `pulsar-relay` process, killed when dropped.
pub struct Server {
    /// The child process; `None` once it has been reaped by [`Server::terminate`] or
    /// [`Server::kill9`].
    child: Option<Child>,
    /// Where the server listens, parsed from its ready line. A restart keeps it.
    pub addr: SocketAddr,
    /// Holds the config file and the stderr log; removed on drop.
    dir: PathBuf,
    /// The server's stderr (appended to across restarts), printed when startup fails so the
    /// cause is visible.
    stderr_path: PathBuf,
    /// What the server was started with, so [`Server::start_again`] can start the same relay.
    opts: RelayOpts,
}

impl Server {
    /// Starts a server with 2 shards and the given YAML configuration (may be empty).
    pub fn start(config_yaml: &str) -> Server {
        Server::start_with_shards(config_yaml, 2)
    }

    /// Starts a server with `shards` shards and the given YAML configuration.
    pub fn start_with_shards(config_yaml: &str, shards: usize) -> Server {
        Server::start_opts(RelayOpts {
            shards,
            ..RelayOpts::new(config_yaml)
        })
    }

    /// Starts a server as `opts` says.
    pub fn start_opts(opts: RelayOpts) -> Server {
        let dir = std::env::temp_dir().join(format!(
            "pulsar-relay-test-{}-{}",
            std::process::id(),
            NEXT_DIR.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&dir).expect("create temp dir");
        let stderr_path = dir.join("stderr.log");
        // A failed start panics inside; the temp dir must not outlive it.
        let spawned = std::panic::catch_unwind(|| spawn_relay(&opts, &dir, &stderr_path));
        let (child, addr) = spawned.unwrap_or_else(|panic| {
            let _ = std::fs::remove_dir_all(&dir);
            std::panic::resume_unwind(panic)
        });
        Server {
            child: Some(child),
            addr,
            dir,
            stderr_path,
            opts,
        }
    }

    /// Whether the process has not been stopped by the test (it may still have crashed).
    pub fn is_running(&self) -> bool {
        self.child.is_some()
    }

    /// SIGTERM (waiting up to 20 s for the exit), then [`Server::start_again`].
    pub fn restart(&mut self) {
        if self.child.is_some() {
            let status = self.terminate(Duration::from_secs(20));
            assert!(
                status.success(),
                "relay exited with {status} on SIGTERM\nstderr:\n{}",
                self.stderr()
            );
        }
        self.start_again();
    }

    /// Starts the stopped relay again with the same options on the same address.
    pub fn start_again(&mut self) {
        assert!(self.child.is_none(), "test bug: the relay is still running");
        // The old process's listening sockets belong to its io_uring rings, which the kernel
        // tears down asynchronously after the exit: for a moment the old socket may still
        // accept. With SO_REUSEPORT the new relay would share the port with it and lose some
        // connections to it, so wait (bounded) until the port refuses connections.
        let closed = eventually(Duration::from_secs(5), || {
            TcpStream::connect_timeout(&self.addr, Duration::from_millis(200)).is_err()
        });
        if !closed {
            eprintln!(
                "{} still accepts connections after the relay exited",
                self.addr
            );
        }
        let opts = RelayOpts {
            listen: Some(self.addr),
            ..self.opts.clone()
        };
        let (child, addr) = spawn_relay(&opts, &self.dir, &self.stderr_path);
        assert_eq!(addr, self.addr, "restarted relay listens elsewhere");
        self.child = Some(child);
    }

    /// SIGKILL and reap: the crash a relay cannot clean up after.
    pub fn kill9(&mut self) {
        let mut child = self.child.take().expect("server already stopped");
        // `Child::kill` sends SIGKILL on Unix.
        child.kill().expect("SIGKILL the relay");
        let _ = child.wait();
    }

    /// The relay's process id while it runs (to look at its open descriptors in `/proc`).
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// A new connection to the server.
    pub fn connect(&self) -> Conn {
        Conn::connect(self.addr)
    }

    /// The server's stderr so far, for failure messages.
    pub fn stderr(&self) -> String {
        std::fs::read_to_string(&self.stderr_path).unwrap_or_default()
    }

    /// Sends SIGTERM and waits up to `deadline` for the process to exit.
    pub fn terminate(&mut self, deadline: Duration) -> ExitStatus {
        let child = self.child.as_mut().expect("server already terminated");
        let status = Command::new("kill")
            .arg("-TERM")
            .arg(child.id().to_string())
            .status()
            .expect("run kill");
        assert!(status.success(), "kill -TERM failed: {status}");
        let until = Instant::now() + deadline;
        loop {
            if let Some(status) = child.try_wait().expect("try_wait") {
                self.child = None;
                return status;
            }
            assert!(
                Instant::now() < until,
                "server did not exit within {deadline:?} of SIGTERM\nstderr:\n{}",
                self.stderr()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    // --- convenience wrappers, each on a fresh connection ---

    pub fn get(&self, path: &str) -> Response {
        self.connect().request("GET", path, None)
    }

    pub fn post_json(&self, path: &str, body: &str) -> Response {
        self.connect().request("POST", path, Some(body.as_bytes()))
    }

    pub fn delete(&self, path: &str) -> Response {
        self.connect().request("DELETE", path, None)
    }

    /// Publishes a message whose payload is the given JSON text; asserts 201.
    pub fn publish(&self, topic: &str, payload_json: &str) -> Value {
        self.connect().publish(topic, payload_json)
    }

    /// Reads a topic page; asserts 200.
    pub fn read_topic(&self, topic: &str, query: &str) -> Value {
        let path = if query.is_empty() {
            format!("/api/v1/topics/{topic}/messages")
        } else {
            format!("/api/v1/topics/{topic}/messages?{query}")
        };
        let resp = self.get(&path);
        assert_eq!(resp.status, 200, "GET {path}: {resp:?}");
        resp.json()
    }

    /// The payload texts of every message of a topic, oldest first (paged, limit 1000).
    pub fn all_payloads(&self, topic: &str) -> Vec<Value> {
        let mut out = Vec::new();
        let mut cursor: Option<String> = None;
        loop {
            let query = match &cursor {
                Some(c) => format!("order=asc&limit=1000&cursor={c}"),
                None => "order=asc&limit=1000".to_string(),
            };
            let page = self.read_topic(topic, &query);
            for m in page["messages"].as_array().expect("messages array") {
                out.push(m["payload"].clone());
            }
            match page["next_cursor"].as_str() {
                Some(c) => cursor = Some(c.to_string()),
                None => return out,
            }
        }
    }

    /// `GET /health` as JSON; asserts 200.
    pub fn health(&self) -> Value {
        let resp = self.get("/health");
        assert_eq!(resp.status, 200, "GET /health: {resp:?}");
        resp.json()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Spawns the relay with `opts`, its config file and stderr log in `dir`, and waits for its
/// ready line; panics with the relay's stderr when it does not come.
fn spawn_relay(
    opts: &RelayOpts,
    dir: &std::path::Path,
    stderr_path: &std::path::Path,
) -> (Child, SocketAddr) {
    let config_path = dir.join("config.yaml");
    std::fs::write(&config_path, &opts.config_yaml).expect("write config");
    // Appending keeps the log of a previous run of a restarted relay.
    let mut stderr_file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(stderr_path)
        .expect("open stderr log");
    let _ = writeln!(stderr_file, "--- pulsar-relay starting ---");
    let listen = opts
        .listen
        .map_or_else(|| "127.0.0.1:0".to_string(), |a| a.to_string());

    let mut command = Command::new(env!("CARGO_BIN_EXE_pulsar-relay"));
    for name in RELAY_ENV_VARS {
        command
            .env_remove(name)
            .env_remove(format!("PULSAR_{name}"));
    }
    command
        .arg("--listen")
        .arg(&listen)
        .arg("--shards")
        .arg(opts.shards.to_string())
        .arg("--config")
        .arg(&config_path)
        .env("LOG_LEVEL", "warn")
        .envs(opts.env.iter().map(|(k, v)| (k, v)))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::from(stderr_file));
    let mut child = command.spawn().expect("spawn pulsar-relay");

    // A thread owns stdout for the process's whole life: it reports lines over a channel
    // (so the wait below can have a deadline) and keeps draining afterwards so the server
    // never blocks on a full pipe.
    let stdout = child.stdout.take().expect("stdout was piped");
    let (tx, rx) = mpsc::channel::<String>();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            // The receiver is gone after startup; keep draining regardless.
            let _ = tx.send(line);
        }
    });

    let deadline = Instant::now() + READY_DEADLINE;
    let mut seen = Vec::new();
    let addr = loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok(line) => {
                if let Some(rest) = line.strip_prefix(READY_PREFIX) {
                    let addr: SocketAddr = rest
                        .trim()
                        .trim_end_matches('/')
                        .parse()
                        .unwrap_or_else(|e| panic!("bad ready line {line:?}: {e}"));
                    break addr;
                }
                seen.push(line);
            }
            Err(_) => {
                let status = child.try_wait().ok().flatten();
                let _ = child.kill();
                let _ = child.wait();
                let stderr = std::fs::read_to_string(stderr_path).unwrap_or_default();
                panic!(
                    "pulsar-relay (--listen {listen}) did not print its ready line within \
                     {READY_DEADLINE:?} (exit status: {status:?})\nstdout so far: {seen:?}\n\
                     stderr:\n{stderr}"
                );
            }
        }
    };
    (child, addr)
}

/// One parsed HTTP response.
#[derive(Clone)]
pub struct Response {
    /// e.g. `HTTP/1.1`.
    pub version: String,
    pub status: u16,
    pub reason: String,
    /// In wire order, names as sent.
    pub headers: Vec<(String, String)>,
    /// Decoded body (de-chunked if chunked).
    pub body: Vec<u8>,
}

impl Response {
    /// The first header with this name (case-insensitive).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    /// How many headers have this name (case-insensitive).
    pub fn header_count(&self, name: &str) -> usize {
        self.headers
            .iter()
            .filter(|(n, _)| n.eq_ignore_ascii_case(name))
            .count()
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    /// The body parsed as JSON; panics with the raw body if it is not JSON.
    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("response body is not JSON ({e}): {self:?}"))
    }
}

impl std::fmt::Debug for Response {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} {} {}", self.version, self.status, self.reason)?;
        for (n, v) in &self.headers {
            write!(f, "\n  {n}: {v}")?;
        }
        let body = String::from_utf8_lossy(&self.body);
        if body.len() > 2000 {
            let head: String = body.chars().take(2000).collect();
            write!(f, "\n\n{head}...({} bytes)", body.len())
        } else {
            write!(f, "\n\n{body}")
        }
    }
}

/// Why a response could not be read: the connection closed, failed or timed out.
#[derive(Debug)]
pub struct ConnError {
    pub kind: ConnErrorKind,
    /// What the client was doing, for the message.
    pub what: &'static str,
    /// The bytes received so far (lossy text).
    pub got: String,
}

#[derive(Debug)]
pub enum ConnErrorKind {
    /// EOF before the response was complete.
    Closed,
    /// A read or write error, including the read timeout.
    Io(std::io::Error),
}

impl ConnError {
    /// Whether the server simply did not answer within the socket timeout (a hang), as
    /// opposed to closing or resetting the connection.
    pub fn is_timeout(&self) -> bool {
        matches!(&self.kind, ConnErrorKind::Io(e)
            if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut))
    }
}

impl std::fmt::Display for ConnError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.kind {
            ConnErrorKind::Closed => write!(
                f,
                "server closed the connection while {}; got so far: {:?}",
                self.what, self.got
            ),
            ConnErrorKind::Io(e) => write!(
                f,
                "read error while {}: {e}; got so far: {:?}",
                self.what, self.got
            ),
        }
    }
}

/// A raw client connection: writes arbitrary bytes, reads responses one at a time.
pub struct Conn {
    pub stream: TcpStream,
    /// Bytes read from the socket but not yet consumed by a response.
    buf: Vec<u8>,
}

impl Conn {
    pub fn connect(addr: SocketAddr) -> Conn {
        Conn::try_connect(addr).expect("connect to server")
    }

    /// A connection whose client end is bound to `source` (any of 127.0.0.0/8 reaches a
    /// loopback relay), for tests that need several client addresses.
    pub fn connect_from(addr: SocketAddr, source: std::net::IpAddr) -> Conn {
        use socket2::{Domain, Socket, Type};
        let socket = Socket::new(Domain::for_address(addr), Type::STREAM, None)
            .expect("create client socket");
        socket
            .bind(&SocketAddr::new(source, 0).into())
            .unwrap_or_else(|e| panic!("bind client socket to {source}: {e}"));
        socket
            .connect_timeout(&addr.into(), READ_TIMEOUT)
            .unwrap_or_else(|e| panic!("connect from {source} to {addr}: {e}"));
        let stream: TcpStream = socket.into();
        stream
            .set_read_timeout(Some(READ_TIMEOUT))
            .expect("timeout");
        stream
            .set_write_timeout(Some(READ_TIMEOUT))
            .expect("timeout");
        stream.set_nodelay(true).expect("nodelay");
        Conn {
            stream,
            buf: Vec::new(),
        }
    }

    /// Like [`Conn::connect`], reporting a refused connection (the server is down) instead of
    /// panicking.
    pub fn try_connect(addr: SocketAddr) -> std::io::Result<Conn> {
        let stream = TcpStream::connect_timeout(&addr, READ_TIMEOUT)?;
        stream.set_read_timeout(Some(READ_TIMEOUT))?;
        stream.set_write_timeout(Some(READ_TIMEOUT))?;
        stream.set_nodelay(true)?;
        Ok(Conn {
            stream,
            buf: Vec::new(),
        })
    }

    pub fn set_read_timeout(&self, timeout: Duration) {
        self.stream
            .set_read_timeout(Some(timeout))
            .expect("set read timeout");
    }

    /// Writes all bytes.
    pub fn send(&mut self, bytes: &[u8]) {
        self.stream.write_all(bytes).expect("write to server");
        self.stream.flush().expect("flush");
    }

    /// Writes all bytes, reporting failure instead of panicking (the server may have closed).
    pub fn try_send(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        self.stream.write_all(bytes)?;
        self.stream.flush()
    }

    /// Half-closes the write side.
    pub fn shutdown_write(&self) {
        let _ = self.stream.shutdown(Shutdown::Write);
    }

    /// Sends a request with `Host`, and for a body `Content-Type: application/json` and
    /// `Content-Length`, then reads the response.
    pub fn request(&mut self, method: &str, path: &str, body: Option<&[u8]>) -> Response {
        self.send(&build_request(method, path, &[], body));
        self.read_response(method == "HEAD")
    }

    /// Like [`Conn::request`] with extra headers (which may replace the defaults: a
    /// `Content-Type` given here suppresses the default one).
    pub fn request_with(
        &mut self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: Option<&[u8]>,
    ) -> Response {
        self.send(&build_request(method, path, headers, body));
        self.read_response(method == "HEAD")
    }

    /// Publishes a message whose payload is the given JSON text; asserts 201 and returns the
    /// response JSON.
    pub fn publish(&mut self, topic: &str, payload_json: &str) -> Value {
        let body = format!(r#"{{"topic":"{topic}","payload":{payload_json}}}"#);
        let resp = self.request("POST", "/api/v1/messages", Some(body.as_bytes()));
        assert_eq!(resp.status, 201, "publish to {topic}: {resp:?}");
        resp.json()
    }

    /// Reads more bytes into the buffer; `Ok(0)` at EOF.
    fn fill(&mut self) -> std::io::Result<usize> {
        let mut chunk = [0u8; 16 * 1024];
        let n = self.stream.read(&mut chunk)?;
        self.buf.extend_from_slice(&chunk[..n]);
        Ok(n)
    }

    /// Reads more bytes; EOF is an error too, since the caller needs more.
    fn fill_more(&mut self, what: &'static str) -> Result<(), ConnError> {
        match self.fill() {
            Ok(0) => Err(ConnError {
                kind: ConnErrorKind::Closed,
                what,
                got: String::from_utf8_lossy(&self.buf).into_owned(),
            }),
            Ok(_) => Ok(()),
            Err(e) => Err(ConnError {
                kind: ConnErrorKind::Io(e),
                what,
                got: String::from_utf8_lossy(&self.buf).into_owned(),
            }),
        }
    }

    /// Reads one CRLF-terminated line (without the CRLF).
    pub fn read_line(&mut self) -> String {
        self.try_read_line().unwrap_or_else(|e| panic!("{e}"))
    }

    fn try_read_line(&mut self) -> Result<String, ConnError> {
        loop {
            if let Some(pos) = find(&self.buf, b"\r\n") {
                let line = String::from_utf8_lossy(&self.buf[..pos]).into_owned();
                self.buf.drain(..pos + 2);
                return Ok(line);
            }
            self.fill_more("reading a line")?;
        }
    }

    /// Reads just a response head (status line + headers), leaving the body unread.
    pub fn read_head(&mut self) -> Response {
        self.try_read_head().unwrap_or_else(|e| panic!("{e}"))
    }

    /// Like [`Conn::read_head`], reporting a closed or failed connection instead of panicking
    /// (a malformed head still panics: that is a server bug, not a connection fault).
    pub fn try_read_head(&mut self) -> Result<Response, ConnError> {
        let end = loop {
            if let Some(pos) = find(&self.buf, b"\r\n\r\n") {
                break pos;
            }
            self.fill_more("reading a response head")?;
        };
        let head = String::from_utf8_lossy(&self.buf[..end]).into_owned();
        self.buf.drain(..end + 4);
        let mut lines = head.split("\r\n");
        let status_line = lines.next().unwrap_or_default();
        let mut parts = status_line.splitn(3, ' ');
        let version = parts.next().unwrap_or_default().to_string();
        let status: u16 = parts
            .next()
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| panic!("bad status line {status_line:?}"));
        let reason = parts.next().unwrap_or_default().to_string();
        let headers = lines
            .map(|l| {
                let (n, v) = l
                    .split_once(':')
                    .unwrap_or_else(|| panic!("bad header line {l:?}"));
                (n.trim().to_string(), v.trim().to_string())
            })
            .collect();
        Ok(Response {
            version,
            status,
            reason,
            headers,
            body: Vec::new(),
        })
    }

    /// Reads one full response. `head_request` says the request was HEAD (so no body follows
    /// whatever Content-Length says).
    pub fn read_response(&mut self, head_request: bool) -> Response {
        self.try_read_response(head_request)
            .unwrap_or_else(|e| panic!("{e}"))
    }

    /// Like [`Conn::read_response`], reporting a closed, reset or timed-out connection instead
    /// of panicking.
    pub fn try_read_response(&mut self, head_request: bool) -> Result<Response, ConnError> {
        let mut resp = self.try_read_head()?;
        let bodiless =
            head_request || (100..200).contains(&resp.status) || matches!(resp.status, 204 | 304);
        if bodiless {
            return Ok(resp);
        }
        let chunked = resp
            .header("transfer-encoding")
            .is_some_and(|te| te.to_ascii_lowercase().contains("chunked"));
        if chunked {
            resp.body = self.try_read_chunked_body()?;
        } else if let Some(cl) = resp.header("content-length") {
            let len: usize = cl
                .parse()
                .unwrap_or_else(|_| panic!("bad content-length {cl:?}"));
            while self.buf.len() < len {
                self.fill_more("reading a response body")?;
            }
            resp.body = self.buf.drain(..len).collect();
        } else {
            // Close-delimited body.
            loop {
                match self.fill() {
                    Ok(0) => break,
                    Ok(_) => {}
                    Err(e) => {
                        return Err(ConnError {
                            kind: ConnErrorKind::Io(e),
                            what: "reading a close-delimited body",
                            got: String::from_utf8_lossy(&self.buf).into_owned(),
                        })
                    }
                }
            }
            resp.body = std::mem::take(&mut self.buf);
        }
        Ok(resp)
    }

    /// Sends a request like [`Conn::request`] and reads the response, reporting connection
    /// faults (the server went away, or did not answer within the read timeout) as errors: for
    /// tests that kill things under load.
    pub fn try_request(
        &mut self,
        method: &str,
        path: &str,
        body: Option<&[u8]>,
    ) -> Result<Response, ConnError> {
        self.try_send(&build_request(method, path, &[], body))
            .map_err(|e| ConnError {
                kind: ConnErrorKind::Io(e),
                what: "sending a request",
                got: String::new(),
            })?;
        self.try_read_response(method == "HEAD")
    }

    fn try_read_chunked_body(&mut self) -> Result<Vec<u8>, ConnError> {
        let mut body = Vec::new();
        loop {
            let size_line = self.try_read_line()?;
            let size_hex = size_line.split(';').next().unwrap_or_default().trim();
            let size = usize::from_str_radix(size_hex, 16)
                .unwrap_or_else(|_| panic!("bad chunk size line {size_line:?}"));
            if size == 0 {
                // Trailers until an empty line.
                while !self.try_read_line()?.is_empty() {}
                return Ok(body);
            }
            while self.buf.len() < size + 2 {
                self.fill_more("reading a chunk")?;
            }
            body.extend(self.buf.drain(..size));
            self.buf.drain(..2);
        }
    }

    /// Reads `n` responses (non-HEAD).
    pub fn read_responses(&mut self, n: usize) -> Vec<Response> {
        (0..n).map(|_| self.read_response(false)).collect()
    }

    /// True if the server closes the connection (EOF or reset) within `within`, with no
    /// further bytes; panics if bytes arrive instead.
    pub fn closed_within(&mut self, within: Duration) -> bool {
        assert!(
            self.buf.is_empty(),
            "unconsumed bytes before close check: {:?}",
            String::from_utf8_lossy(&self.buf)
        );
        let deadline = Instant::now() + within;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return false;
            }
            self.set_read_timeout(left);
            let mut chunk = [0u8; 1024];
            match self.stream.read(&mut chunk) {
                Ok(0) => return true,
                Ok(n) => panic!(
                    "expected the connection to close, got bytes: {:?}",
                    String::from_utf8_lossy(&chunk[..n])
                ),
                Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                    return false
                }
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                // A reset is a close too.
                Err(_) => return true,
            }
        }
    }

    /// Whether any unconsumed bytes are buffered.
    pub fn has_buffered(&self) -> bool {
        !self.buf.is_empty()
    }

    /// Takes the bytes read past what was consumed (e.g. the start of a streamed body after
    /// [`Conn::read_head`]).
    pub fn take_buffered(&mut self) -> Vec<u8> {
        std::mem::take(&mut self.buf)
    }
}

/// Builds a request: request line, `Host`, the given headers, and — for a body — default
/// `Content-Type: application/json` (unless given) and `Content-Length`.
pub fn build_request(
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: Option<&[u8]>,
) -> Vec<u8> {
    let mut out = format!("{method} {path} HTTP/1.1\r\nHost: localhost\r\n");
    for (n, v) in headers {
        out.push_str(&format!("{n}: {v}\r\n"));
    }
    if let Some(body) = body {
        let has = |name: &str| headers.iter().any(|(n, _)| n.eq_ignore_ascii_case(name));
        if !has("content-type") {
            out.push_str("Content-Type: application/json\r\n");
        }
        if !has("content-length") && !has("transfer-encoding") {
            out.push_str(&format!("Content-Length: {}\r\n", body.len()));
        }
    }
    out.push_str("\r\n");
    let mut bytes = out.into_bytes();
    if let Some(body) = body {
        bytes.extend_from_slice(body);
    }
    bytes
}

/// The documented HTTP status of each error code.
pub fn status_of(code: &str) -> u16 {
    match code {
        "INVALID_REQUEST" | "INVALID_TOPIC" | "INVALID_CURSOR" => 400,
        "NOT_FOUND" => 404,
        "METHOD_NOT_ALLOWED" => 405,
        "REQUEST_TIMEOUT" => 408,
        "PAYLOAD_TOO_LARGE" => 413,
        "UNSUPPORTED_MEDIA_TYPE" => 415,
        "HEADERS_TOO_LARGE" => 431,
        "SERVICE_UNAVAILABLE" => 503,
        other => panic!("test bug: unknown error code {other}"),
    }
}

/// Asserts `resp` is the documented error: the code's status, a JSON body of shape
/// `{error, message, detail}` with `error == code`, and a JSON content type.
pub fn assert_error_body(resp: &Response, code: &str) {
    assert_eq!(
        resp.status,
        status_of(code),
        "expected {code}, got: {resp:?}"
    );
    let v = resp.json();
    assert_eq!(v["error"], code, "error code: {resp:?}");
    assert!(v["message"].is_string(), "error message missing: {resp:?}");
    assert!(v.get("detail").is_some(), "error detail missing: {resp:?}");
    assert!(
        resp.header("content-type")
            .is_some_and(|ct| ct.starts_with("application/json")),
        "error content-type: {resp:?}"
    );
}

/// A JSON publish body for `topic` with the given payload JSON text.
pub fn publish_body(topic: &str, payload_json: &str) -> String {
    format!(r#"{{"topic":"{topic}","payload":{payload_json}}}"#)
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

/// Parses a message id `<ms>-<seq>` for ordering comparisons.
pub fn parse_id(id: &str) -> (u64, u64) {
    let (ms, seq) = id
        .split_once('-')
        .unwrap_or_else(|| panic!("message id {id:?} is not <ms>-<seq>"));
    (
        ms.parse()
            .unwrap_or_else(|_| panic!("message id {id:?}: bad ms")),
        seq.parse()
            .unwrap_or_else(|_| panic!("message id {id:?}: bad seq")),
    )
}

/// Asserts `ids` are strictly increasing as `(ms, seq)`.
pub fn assert_strictly_increasing(ids: &[String]) {
    for pair in ids.windows(2) {
        assert!(
            parse_id(&pair[0]) < parse_id(&pair[1]),
            "ids not strictly increasing: {} then {} (all: {ids:?})",
            pair[0],
            pair[1]
        );
    }
}

/// Asserts `ts` looks like an RFC 3339 UTC timestamp ending in `Z`, e.g.
/// `2026-11-23T10:39:06.123Z`.
pub fn assert_rfc3339_utc(ts: &Value) {
    let s = ts
        .as_str()
        .unwrap_or_else(|| panic!("timestamp {ts} is not a string"));
    let b = s.as_bytes();
    let ok = s.len() >= 20
        && s.ends_with('Z')
        && b[4] == b'-'
        && b[7] == b'-'
        && b[10] == b'T'
        && b[13] == b':'
        && b[16] == b':'
        && [0, 1, 2, 3, 5, 6, 8, 9, 11, 12, 14, 15, 17, 18]
            .iter()
            .all(|&i| b[i].is_ascii_digit());
    assert!(ok, "timestamp {s:?} is not RFC 3339 UTC with Z");
}

/// Polls `cond` until it returns true or `within` passes; returns whether it held. Polling a
/// condition with a deadline (not sleeping a fixed time) keeps timing tests both fast and
/// robust on slow machines.
pub fn eventually(within: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + within;
    loop {
        if cond() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// `n` distinct valid topic names with the given prefix. 20 names land on both of 2 shards
/// with probability 1 - 2^-19 for any hash; tests that need certainty assert it via stats.
pub fn topics(prefix: &str, n: usize) -> Vec<String> {
    (0..n).map(|i| format!("{prefix}-{i:02}")).collect()
}

/// The shard the documented routing (`xxh3_64(topic) % shards`) assigns a topic to; used only
/// to check that a test's topic set really spans every shard.
pub fn shard_of(topic: &str, shards: u64) -> u64 {
    xxhash_rust::xxh3::xxh3_64(topic.as_bytes()) % shards
}

/// The first name `<prefix>-<n>` (n = 0, 1, ...) that the documented routing assigns to
/// `shard` of `shards`.
pub fn topic_on_shard(prefix: &str, shard: u64, shards: u64) -> String {
    (0..10_000)
        .map(|i| format!("{prefix}-{i}"))
        .find(|t| shard_of(t, shards) == shard)
        .unwrap_or_else(|| panic!("no topic {prefix}-<n> routes to shard {shard} of {shards}"))
}

/// Asserts the topic set covers every one of `shards` shards under the documented routing.
pub fn assert_spans_shards(topics: &[String], shards: u64) {
    for shard in 0..shards {
        assert!(
            topics.iter().any(|t| shard_of(t, shards) == shard),
            "test precondition: no topic of {topics:?} routes to shard {shard}"
        );
    }
}

/// Publishes `n` messages (`{"bg": i}`) to one topic from a thread, one at a time on one
/// connection, recording each acknowledged id in order: the "continuous publisher" of the
/// resume tests, whose acked ids are exactly what a gap-free consumer must see.
pub struct BackgroundPublisher {
    /// Ids acknowledged so far, in publish (and so id) order.
    acked: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
    /// The publishing thread; `None` once joined.
    handle: Option<std::thread::JoinHandle<()>>,
}

impl BackgroundPublisher {
    pub fn start(addr: SocketAddr, topic: &str, n: usize) -> BackgroundPublisher {
        let acked = std::sync::Arc::new(std::sync::Mutex::new(Vec::with_capacity(n)));
        let sink = acked.clone();
        let topic = topic.to_string();
        let handle = std::thread::spawn(move || {
            let mut conn = Conn::connect(addr);
            for i in 0..n {
                let ack = conn.publish(&topic, &format!(r#"{{"bg":{i}}}"#));
                let id = ack["message_id"].as_str().expect("message_id").to_string();
                sink.lock().expect("publisher lock").push(id);
            }
        });
        BackgroundPublisher {
            acked,
            handle: Some(handle),
        }
    }

    /// How many publishes were acknowledged so far.
    pub fn count(&self) -> usize {
        self.acked.lock().expect("publisher lock").len()
    }

    /// Whether the thread is done (all published, or it panicked: [`Self::join`] tells).
    pub fn is_finished(&self) -> bool {
        self.handle.as_ref().is_none_or(|h| h.is_finished())
    }

    /// Waits for the thread (re-raising its panic) and returns every acked id, in order.
    pub fn join(mut self) -> Vec<String> {
        if let Some(handle) = self.handle.take() {
            if let Err(panic) = handle.join() {
                std::panic::resume_unwind(panic);
            }
        }
        std::mem::take(&mut *self.acked.lock().expect("publisher lock"))
    }
}

/// The number of open file descriptors of process `pid` (Linux `/proc`).
pub fn open_fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| d.count())
        .unwrap_or_else(|e| panic!("read /proc/{pid}/fd: {e}"))
}

/// A process's resident memory now and its peak so far, KiB (`VmRSS`, `VmHWM` of Linux
/// `/proc/<pid>/status`).
pub fn rss_kib(pid: u32) -> (u64, u64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_else(|e| panic!("read /proc/{pid}/status: {e}"));
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap_or_else(|| panic!("no {name} in /proc/{pid}/status"))
    };
    (field("VmRSS:"), field("VmHWM:"))
}

/// One topic owned by each of `shards` shards, named after `prefix`.
pub fn topics_per_shard(prefix: &str, shards: u64) -> Vec<String> {
    (0..shards)
        .map(|s| topic_on_shard(prefix, s, shards))
        .collect()
}

/// The `message_id` of a publish acknowledgement or a delivered message.
pub fn id_of(v: &Value) -> String {
    v["message_id"]
        .as_str()
        .unwrap_or_else(|| panic!("no message_id in {v}"))
        .to_string()
}

/// Publishes `n` messages `{"i": 0..n}` to `topic`; returns their acknowledged ids.
pub fn publish_n(conn: &mut Conn, topic: &str, n: usize) -> Vec<String> {
    (0..n)
        .map(|i| id_of(&conn.publish(topic, &format!(r#"{{"i":{i}}}"#))))
        .collect()
}
