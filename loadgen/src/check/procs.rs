//! The processes one history runs against: a `valkey-server` (when the history uses the
//! Valkey backend; with `--cluster`, three joined into a Valkey Cluster) on a free port with
//! its own temporary directory, and a `pulsar-relay` configured by a YAML file written for the
//! history, listening on a free loopback port.
//!
//! Both are killed (by their own PID, through [`std::process::Child`]) when their guard is
//! dropped, which happens on every exit path of a history, panics included; the temporary
//! directory goes with the Valkey guard.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use super::history::{Ack, Backend, Setup};

/// How long a relay or Valkey may take to start.
const START_DEADLINE: Duration = Duration::from_secs(20);

/// A private scratch directory, removed when dropped.
pub struct Scratch(pub PathBuf);

impl Scratch {
    pub fn new() -> std::io::Result<Scratch> {
        static N: AtomicU64 = AtomicU64::new(0);
        let dir = std::env::temp_dir().join(format!(
            "loadgen-check-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&dir)?;
        Ok(Scratch(dir))
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        // For post-mortems: the relay's log and Valkey's files stay where they were.
        if std::env::var_os("LOADGEN_CHECK_KEEP").is_some() {
            eprintln!("check: kept {}", self.0.display());
            return;
        }
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A port nobody listens on right now (the OS picks it; a race with another process taking
/// it before Valkey binds is possible and shows up as a start failure).
fn free_port() -> std::io::Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// A `valkey-server` of this history; killed when dropped.
pub struct Valkey {
    bin: PathBuf,
    pub port: u16,
    dir: PathBuf,
    child: Option<Child>,
    /// Frozen with SIGSTOP: must be continued before it can be killed cleanly.
    frozen: bool,
    /// A node of a Valkey Cluster (its `nodes.conf` in `dir` survives restarts).
    cluster: bool,
}

/// Masters of the cluster `--cluster` runs against (no replicas: a node's outage is then the
/// same fault as a single Valkey's, and `appendfsync always` keeps the oracle exact).
pub const CLUSTER_MASTERS: usize = 3;

impl Valkey {
    pub fn start(bin: &Path, dir: &Path) -> Result<Valkey, String> {
        Valkey::start_node(bin, &dir.join("valkey"), false)
    }

    fn start_node(bin: &Path, dir: &Path, cluster: bool) -> Result<Valkey, String> {
        let mut v = Valkey {
            bin: bin.to_owned(),
            port: free_port().map_err(|e| format!("no free port: {e}"))?,
            dir: dir.to_owned(),
            child: None,
            frozen: false,
            cluster,
        };
        std::fs::create_dir_all(&v.dir).map_err(|e| format!("valkey dir: {e}"))?;
        v.spawn()?;
        Ok(v)
    }

    /// [`CLUSTER_MASTERS`] nodes joined with `valkey-cli --cluster create` (the `valkey-cli`
    /// beside `bin`, else on `$PATH`); returns once every node reports `cluster_state:ok`.
    pub fn start_cluster(bin: &Path, dir: &Path) -> Result<Vec<Valkey>, String> {
        let nodes = (0..CLUSTER_MASTERS)
            .map(|i| Valkey::start_node(bin, &dir.join(format!("valkey-{i}")), true))
            .collect::<Result<Vec<_>, _>>()?;
        let cli = bin
            .parent()
            .map(|d| d.join("valkey-cli"))
            .filter(|p| p.is_file())
            .or_else(|| on_path("valkey-cli"))
            .ok_or("--cluster needs valkey-cli beside valkey-server or on $PATH")?;
        let addrs: Vec<String> = nodes
            .iter()
            .map(|n| format!("127.0.0.1:{}", n.port))
            .collect();
        let out = Command::new(&cli)
            .args(["--cluster", "create"])
            .args(&addrs)
            .args(["--cluster-replicas", "0", "--cluster-yes"])
            .stdin(Stdio::null())
            .output()
            .map_err(|e| format!("cannot run {}: {e}", cli.display()))?;
        if !out.status.success() {
            return Err(format!(
                "valkey-cli --cluster create failed: {}",
                String::from_utf8_lossy(&out.stdout)
            ));
        }
        let deadline = Instant::now() + START_DEADLINE;
        for node in &nodes {
            loop {
                let info = Command::new(&cli)
                    .args(["-p", &node.port.to_string(), "CLUSTER", "INFO"])
                    .output()
                    .map_err(|e| format!("valkey-cli: {e}"))?;
                if String::from_utf8_lossy(&info.stdout).contains("cluster_state:ok") {
                    break;
                }
                if Instant::now() >= deadline {
                    return Err(format!(
                        "cluster node {} never reached cluster_state:ok",
                        node.port
                    ));
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        Ok(nodes)
    }

    /// Starts the server on this guard's port and directory; waits until it answers PING.
    fn spawn(&mut self) -> Result<(), String> {
        let child = Command::new(&self.bin)
            .args([
                "--port",
                &self.port.to_string(),
                "--bind",
                "127.0.0.1",
                "--dir",
                &self.dir.display().to_string(),
                // Every write on disk before it is answered: a `kill -9` then loses nothing
                // the relay was told was stored, so the oracle can stay exact.
                "--appendonly",
                "yes",
                "--appendfsync",
                "always",
                "--save",
                "",
                "--maxmemory-policy",
                "noeviction",
                "--loglevel",
                "warning",
            ])
            .args(if self.cluster {
                // A node away longer than this is marked failed by the others (and the
                // cluster refuses writes until it is back: no replica to promote).
                &[
                    "--cluster-enabled",
                    "yes",
                    "--cluster-config-file",
                    "nodes.conf",
                    "--cluster-node-timeout",
                    "3000",
                ][..]
            } else {
                &[][..]
            })
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| format!("cannot start {}: {e}", self.bin.display()))?;
        self.child = Some(child);
        self.frozen = false;
        let deadline = Instant::now() + START_DEADLINE;
        while Instant::now() < deadline {
            if ping(self.port) {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Err("valkey-server did not answer PING".into())
    }

    /// `kill -9` now; [`Valkey::restart`] brings it back on the same port and directory.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        self.frozen = false;
    }

    pub fn restart(&mut self) -> Result<(), String> {
        self.kill();
        self.spawn()
    }

    /// SIGSTOP (`true`) or SIGCONT (`false`), by PID through the `kill` utility: the crate
    /// forbids `unsafe`, and a signal is all this needs.
    pub fn freeze(&mut self, stop: bool) {
        if let Some(c) = &self.child {
            let signal = if stop { "-STOP" } else { "-CONT" };
            let ok = Command::new("kill")
                .args([signal, &c.id().to_string()])
                .status()
                .is_ok_and(|s| s.success());
            if ok {
                self.frozen = stop;
            }
        }
    }
}

impl Drop for Valkey {
    fn drop(&mut self) {
        if self.frozen {
            self.freeze(false);
        }
        self.kill();
    }
}

/// One `PING` over a fresh connection.
fn ping(port: u16) -> bool {
    let Ok(mut s) = TcpStream::connect(("127.0.0.1", port)) else {
        return false;
    };
    let _ = s.set_read_timeout(Some(Duration::from_millis(500)));
    if s.write_all(b"PING\r\n").is_err() {
        return false;
    }
    let mut buf = [0u8; 7];
    s.read_exact(&mut buf).is_ok() && &buf == b"+PONG\r\n"
}

/// The relay of this history; killed when dropped.
pub struct Relay {
    child: Child,
    /// `http://127.0.0.1:PORT`, as the relay printed it.
    pub url: String,
    pub log: PathBuf,
}

impl Relay {
    /// Whether the relay has exited (it must not, during a history).
    pub fn try_wait(&mut self) -> std::io::Result<Option<std::process::ExitStatus>> {
        self.child.try_wait()
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The YAML configuration of `setup` (Valkey on `valkey_ports` when the backend is Valkey: one
/// port, or with `cluster` the cluster's nodes).
pub fn config_yaml(setup: &Setup, valkey_ports: &[u16], cluster: bool) -> String {
    let mut y = String::new();
    // `LOADGEN_CHECK_RELAY_LOG=debug` (with `LOADGEN_CHECK_KEEP`) for post-mortems.
    let log_level = std::env::var("LOADGEN_CHECK_RELAY_LOG").unwrap_or_else(|_| "warn".into());
    y.push_str(&format!(
        "listen: \"127.0.0.1:0\"\nshards: {}\nlog_level: {log_level}\n",
        setup.shards
    ));
    // Bulk bodies up to the checker's own cap, with room to spare.
    y.push_str("http:\n  max_body_bytes: 16MiB\n");
    y.push_str(&format!(
        "ws:\n  max_queued_bytes: {q}\nsse:\n  max_queued_bytes: {q}\n",
        q = setup.queue_bytes
    ));
    y.push_str("storage:\n");
    y.push_str(match setup.backend {
        Backend::Memory => "  backend: memory\n",
        Backend::Valkey => "  backend: valkey\n",
    });
    if let Some(n) = setup.max_messages {
        y.push_str(&format!("  max_messages_per_topic: {n}\n"));
    }
    if let Some(s) = setup.retention_s {
        y.push_str(&format!("  persistent_tier_retention: {s}s\n"));
    }
    if let Some(b) = setup.memory_bytes {
        y.push_str(&format!("memory:\n  max_bytes: {b}\n"));
    }
    if let (Backend::Valkey, Some(port)) = (setup.backend, valkey_ports.first()) {
        if cluster {
            let nodes: Vec<String> = valkey_ports
                .iter()
                .map(|p| format!("\"127.0.0.1:{p}\""))
                .collect();
            y.push_str(&format!(
                "valkey:\n  cluster_nodes: [{}]\n",
                nodes.join(", ")
            ));
        } else {
            y.push_str(&format!("valkey:\n  host: 127.0.0.1\n  port: {port}\n"));
        }
        y.push_str(&format!(
            "  connections_per_shard: {}\n  command_timeout: 2s\n  connect_timeout: 1s\n",
            setup.connections
        ));
        y.push_str(match setup.ack {
            Ack::Persisted => "durability:\n  ack: persisted\n",
            Ack::Buffered => "durability:\n  ack: buffered\n",
        });
    }
    if setup.auth {
        y.push_str(&format!(
            "auth:\n  mode: builtin\n  jwt_secret: \"{CHECK_JWT_SECRET}\"\n  \
             bootstrap_admin_username: {CHECK_USER}\n  bootstrap_admin_password: \"{CHECK_PASSWORD}\"\n\
             rate_limit:\n  principal_rate: \"off\"\n"
        ));
    }
    y
}

/// The checker's user when authentication is on (the bootstrap admin: every permission).
pub const CHECK_USER: &str = "checker";
pub const CHECK_PASSWORD: &str = "checker-password";
const CHECK_JWT_SECRET: &str = "loadgen-check-secret-0123456789abcdef0123";

impl Relay {
    /// Starts `bin` with `yaml` (written into `dir`); returns once it printed its address.
    pub fn start(bin: &Path, dir: &Path, yaml: &str) -> Result<Relay, String> {
        let config = dir.join("relay.yaml");
        std::fs::write(&config, yaml).map_err(|e| format!("relay config: {e}"))?;
        let log = dir.join("relay.log");
        let stderr = std::fs::File::create(&log).map_err(|e| format!("relay log: {e}"))?;
        let mut child = Command::new(bin)
            .arg("--config")
            .arg(&config)
            // The environment must not configure it behind the file's back.
            .env_remove("STORAGE_BACKEND")
            .env_remove("VALKEY_HOST")
            .env_remove("VALKEY_PORT")
            .env_remove("VALKEY_CLUSTER_NODES")
            .env_remove("MAX_MESSAGES_PER_TOPIC")
            .env_remove("PERSISTENT_TIER_RETENTION")
            .env_remove("MEMORY_MAX_BYTES")
            .env_remove("PULSAR_LISTEN")
            .env_remove("PULSAR_SHARDS")
            .stdout(Stdio::piped())
            .stderr(Stdio::from(stderr))
            .spawn()
            .map_err(|e| format!("cannot start {}: {e}", bin.display()))?;
        let stdout = child.stdout.take().ok_or("no relay stdout")?;
        let (tx, rx) = std::sync::mpsc::channel();
        // Reads stdout to its end, so the relay never blocks on a full pipe.
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if let Some(url) = line.strip_prefix("pulsar-relay ready: ") {
                    let _ = tx.send(url.trim().to_owned());
                }
            }
        });
        let mut relay = Relay {
            child,
            url: String::new(),
            log,
        };
        match rx.recv_timeout(START_DEADLINE) {
            Ok(url) => {
                relay.url = url;
                Ok(relay)
            }
            Err(_) => {
                let tail = std::fs::read_to_string(&relay.log).unwrap_or_default();
                Err(format!(
                    "the relay did not report ready: {}",
                    tail.lines().rev().take(5).collect::<Vec<_>>().join(" | ")
                ))
            }
        }
    }
}

/// `name` from `$PATH`, if there.
pub fn on_path(name: &str) -> Option<PathBuf> {
    std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|p| p.join(name))
            .find(|p| p.is_file())
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::check::history::{generate, Pins};

    #[test]
    fn configs_name_every_setting_the_history_chose() {
        let mut setup = generate(3, 5, Pins::default()).setup;
        setup.backend = Backend::Valkey;
        setup.connections = 4;
        setup.ack = Ack::Buffered;
        setup.max_messages = Some(50);
        let y = config_yaml(&setup, &[7000], false);
        for want in [
            "backend: valkey",
            "port: 7000",
            "connections_per_shard: 4",
            "ack: buffered",
            "max_messages_per_topic: 50",
            "listen: \"127.0.0.1:0\"",
        ] {
            assert!(y.contains(want), "{want} missing in\n{y}");
        }
        let y = config_yaml(&setup, &[7000, 7001, 7002], true);
        assert!(
            y.contains(
                "cluster_nodes: [\"127.0.0.1:7000\", \"127.0.0.1:7001\", \"127.0.0.1:7002\"]"
            ),
            "{y}"
        );
        assert!(!y.contains("port: 7000"), "{y}");
    }
}
