//! Talking to Valkey from a shard: RESP2 codec, one connection, the per-shard pipelined
//! client with group commit, and Sentinel.
//!
//! Layers, each usable alone:
//! - [`codec`]: sans-IO encoding of commands and decoding of replies (`redis-protocol`).
//! - [`connection`]: one established TCP or TLS connection with AUTH/SELECT done (and the
//!   Function library the caller needs loaded: [`library`]), which sends a pre-encoded batch
//!   with one write and reads exactly that many replies (or, subscribed, reads pushed frames
//!   one at a time).
//! - [`sentinel`]: where the connections go: the configured address, or the master the
//!   sentinels name, followed across failovers (`+switch-master`, `READONLY`, lost
//!   connections).
//! - [`client`]: the shard-local client the relay uses: one queue (lane) per connection,
//!   driver tasks that send everything queued as one pipeline per round trip, reconnection
//!   with backoff, the replication `WAIT` of `ack: replicated`. Commands routed by a key (a
//!   topic) always take that key's lane, so they run in submission order however many
//!   connections there are.
//! - [`subscriber`]: the shard's one pub/sub connection (`SSUBSCRIBE`), kept apart from the
//!   pipelined ones: the channels it wants, subscribed again after every reconnect, and the
//!   messages pushed on them.
//!
//! Not owned here: which commands the relay sends (stream keys, XADD/XRANGE shapes) and how
//! errors map to HTTP statuses; that is the storage layer's business.
//!
//! Everything is `!Send` and lives on one glommio executor: no locks, `Rc` and `RefCell`.

pub mod client;
pub mod codec;
pub mod connection;
pub mod library;
pub mod sentinel;
pub mod subscriber;

use std::time::Duration;

pub use client::{ArgWriter, Client, ClientConfig, ClientStats, Command, WaitFor};
pub use codec::{decode_reply, encode_command, ProtocolError, Reply};
pub use connection::{ConnectConfig, Connection, Connector};
pub use library::FunctionLibrary;
pub use sentinel::{NodeAddr, SentinelConfig};

/// Why a command (or a connection attempt) did not produce a reply.
///
/// `Clone` because one failed pipeline fails every command in it with the same error. Messages
/// are `String`s rather than `io::Error`s for the same reason.
///
/// Upstream mapping: everything except [`ValkeyError::Server`] means "Valkey is not usable
/// right now" (503); `Server` is a reply to this very command (a bug or bad input, usually
/// 500). After `ConnectionLost`, `Timeout` in flight, or `Protocol`, the command may or may not
/// have been applied.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ValkeyError {
    /// No TCP connection could be established (DNS, refused, connect timeout).
    #[error("cannot connect to Valkey: {0}")]
    Connect(String),
    /// The connection failed while the command was written or its reply awaited: it may have
    /// been applied.
    #[error("connection to Valkey lost: {0}")]
    ConnectionLost(String),
    /// No reply in time; the text says what was being waited for (a reply in flight, or a free
    /// connection while queued). In flight, the command may have been applied.
    #[error("Valkey timed out {0}")]
    Timeout(&'static str),
    /// The client's queue holds `limit` commands already: refused without queueing.
    #[error("Valkey client queue is full ({limit} commands waiting)")]
    Backpressure { limit: usize },
    /// The client has been shut down.
    #[error("Valkey client unavailable: {0}")]
    Unavailable(&'static str),
    /// AUTH was refused, or the server requires a password and none is configured.
    #[error("Valkey authentication failed: {0}")]
    Auth(String),
    /// TLS setup or handshake failed (bad CA file, untrusted or mismatched certificate).
    #[error("TLS with Valkey failed: {0}")]
    Tls(String),
    /// Valkey sent something that is not RESP2 or not what was asked for.
    #[error(transparent)]
    Protocol(#[from] ProtocolError),
    /// An error reply (`-ERR ...`, `-WRONGTYPE ...`) to this command; other commands in the
    /// same pipeline are unaffected.
    #[error("Valkey replied with an error: {0}")]
    Server(String),
    /// The node is not (or no longer) a master: a `-READONLY` reply (the command was not
    /// applied), or a `ROLE` check at connect with Sentinel. Transient: the client drops the
    /// connection and reconnects (with Sentinel, to the master the sentinels name now).
    #[error("Valkey node is not the master: {0}")]
    NotMaster(String),
    /// The configuration cannot work (zero connections, username without password, ...).
    #[error("invalid Valkey client configuration: {0}")]
    Config(String),
}

impl ValkeyError {
    /// Whether a retry of the same command later could succeed without any change on the
    /// caller's side (everything but error replies and configuration errors).
    pub fn is_transient(&self) -> bool {
        !matches!(self, ValkeyError::Server(_) | ValkeyError::Config(_))
    }
}

/// Resolves after `limit`, giving `what` as the timeout's description, unless `work` finishes
/// first. If both are ready in the same poll, the work wins.
async fn with_timeout<T>(
    limit: Duration,
    what: &'static str,
    work: impl std::future::Future<Output = Result<T, ValkeyError>>,
) -> Result<T, ValkeyError> {
    futures_lite::future::or(work, async {
        glommio::timer::sleep(limit).await;
        Err(ValkeyError::Timeout(what))
    })
    .await
}

/// The client settings of shard `shard` from the relay's configuration.
pub fn client_config(config: &crate::config::Config, shard: usize) -> ClientConfig {
    let valkey = &config.valkey;
    let durability = &config.durability;
    let sentinel = valkey.sentinel.as_ref().map(|s| SentinelConfig {
        sentinels: s
            .addrs
            .iter()
            .map(|(host, port)| NodeAddr {
                host: host.clone(),
                port: *port,
            })
            .collect(),
        master_name: s.master_name.clone(),
        username: s.username.clone(),
        password: s.password.as_ref().map(|p| p.expose().to_owned()),
    });
    ClientConfig {
        connect: ConnectConfig {
            // With Sentinel the sentinels name the master; `valkey.host/port` are not used
            // (the configuration refuses them together).
            host: if sentinel.is_some() {
                String::new()
            } else {
                valkey.host.clone()
            },
            port: valkey.port,
            username: valkey.username.clone(),
            password: valkey.password.as_ref().map(|p| p.expose().to_owned()),
            db: valkey.db,
            tls: valkey.use_tls,
            tls_ca_file: valkey.tls_ca_file.clone(),
            connect_timeout: valkey.connect_timeout,
            command_timeout: valkey.command_timeout,
            client_name: format!("pulsar-relay-shard{shard}"),
            // The storage layer names the library it calls.
            library: None,
            verify_master: sentinel.is_some(),
        },
        connections: valkey.connections_per_shard,
        // 0 means "never wait for a connection": refused at once while Valkey is down.
        max_pending: valkey.max_pending,
        sentinel,
        wait_for: (durability.ack == crate::config::AckMode::Replicated).then_some(WaitFor {
            replicas: durability.replicas,
            timeout: durability.replica_timeout,
        }),
        ..ClientConfig::default()
    }
}

/// Test support shared by `connection` and `client` tests: a glommio executor and a real
/// `valkey-server` on a free port.
#[cfg(test)]
pub(crate) mod testing {
    use std::future::Future;
    use std::io::{Read, Write};
    use std::net::{TcpListener, TcpStream};
    use std::path::{Path, PathBuf};
    use std::process::{Child, Command, Stdio};
    use std::time::{Duration, Instant};

    use super::ConnectConfig;

    /// Runs `make()`'s future on a fresh glommio executor thread and waits for it.
    pub fn run_local<F, Fut>(make: F)
    where
        F: FnOnce() -> Fut + Send + 'static,
        Fut: Future<Output = ()> + 'static,
    {
        glommio::LocalExecutorBuilder::default()
            .io_memory(64 << 10)
            .spawn(make)
            .expect("spawn executor")
            .join()
            .expect("test executor panicked");
    }

    /// Polls `condition` until it holds or `within` passes; true if it held. Polling (not a
    /// fixed sleep) so a test waits only as long as the condition needs.
    pub async fn eventually(within: Duration, mut condition: impl FnMut() -> bool) -> bool {
        let deadline = Instant::now() + within;
        loop {
            if condition() {
                return true;
            }
            if Instant::now() >= deadline {
                return false;
            }
            glommio::timer::sleep(Duration::from_millis(2)).await;
        }
    }

    /// A port nobody listens on right now (bound and released).
    pub fn free_port() -> u16 {
        TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("bind an ephemeral port")
            .port()
    }

    /// A `valkey-server` child process, killed on drop.
    pub struct ValkeyServer {
        child: Option<Child>,
        pub port: u16,
        dir: tempfile::TempDir,
        extra: Vec<String>,
        tls: bool,
    }

    impl ValkeyServer {
        /// Plain TCP server with extra command-line arguments (`--requirepass x`, ...).
        pub fn start(extra: &[&str]) -> ValkeyServer {
            Self::start_on(
                free_port(),
                extra,
                false,
                tempfile::tempdir().expect("temp dir"),
            )
        }

        /// TLS-only server (`--port 0`) using a throwaway CA and server certificate generated
        /// with the `openssl` CLI into the server's temp dir.
        pub fn start_tls() -> ValkeyServer {
            let dir = tempfile::tempdir().expect("temp dir");
            make_certificates(dir.path(), "ca");
            make_certificates(dir.path(), "other-ca");
            let path = |name: &str| dir.path().join(name).display().to_string();
            let extra = [
                "--tls-cert-file".to_owned(),
                path("server.crt"),
                "--tls-key-file".to_owned(),
                path("server.key"),
                "--tls-ca-cert-file".to_owned(),
                path("ca.crt"),
                "--tls-auth-clients".to_owned(),
                "no".to_owned(),
            ];
            let extra: Vec<&str> = extra.iter().map(String::as_str).collect();
            Self::start_on(free_port(), &extra, true, dir)
        }

        fn start_on(port: u16, extra: &[&str], tls: bool, dir: tempfile::TempDir) -> ValkeyServer {
            let mut server = ValkeyServer {
                child: None,
                port,
                dir,
                extra: extra.iter().map(|s| (*s).to_owned()).collect(),
                tls,
            };
            server.spawn();
            server
        }

        fn spawn(&mut self) {
            let port = self.port.to_string();
            let mut cmd = Command::new("valkey-server");
            if self.tls {
                cmd.args(["--port", "0", "--tls-port", &port]);
            } else {
                cmd.args(["--port", &port]);
            }
            cmd.args(["--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
                .arg("--dir")
                .arg(self.dir.path())
                .args(&self.extra)
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null());
            self.child = Some(cmd.spawn().expect("start valkey-server"));
            self.wait_ready();
        }

        /// Waits until the server accepts connections (and answers PING when plain; any reply,
        /// `-NOAUTH` included, means it is up).
        fn wait_ready(&mut self) {
            let deadline = Instant::now() + Duration::from_secs(10);
            loop {
                if let Some(child) = self.child.as_mut() {
                    if let Ok(Some(status)) = child.try_wait() {
                        panic!("valkey-server exited during start-up: {status}");
                    }
                }
                if self.answers() {
                    return;
                }
                assert!(Instant::now() < deadline, "valkey-server did not start");
                std::thread::sleep(Duration::from_millis(5));
            }
        }

        fn answers(&self) -> bool {
            let Ok(mut stream) = TcpStream::connect(("127.0.0.1", self.port)) else {
                return false;
            };
            if self.tls {
                return true;
            }
            let _ = stream.set_read_timeout(Some(Duration::from_secs(2)));
            let mut first = [0u8; 1];
            stream.write_all(b"*1\r\n$4\r\nPING\r\n").is_ok()
                && stream.read_exact(&mut first).is_ok()
                && (first[0] == b'+' || first[0] == b'-')
        }

        /// SIGKILL: the kernel closes every client connection at once.
        pub fn kill(&mut self) {
            if let Some(mut child) = self.child.take() {
                let _ = child.kill();
                let _ = child.wait();
            }
        }

        /// Starts the server again on the same port with the same arguments.
        pub fn restart(&mut self) {
            self.kill();
            self.spawn();
        }

        pub fn dir(&self) -> &Path {
            self.dir.path()
        }

        pub fn file(&self, name: &str) -> PathBuf {
            self.dir.path().join(name)
        }

        /// A connect config for this server, with short test timeouts.
        pub fn config(&self) -> ConnectConfig {
            ConnectConfig {
                host: "127.0.0.1".to_owned(),
                port: self.port,
                connect_timeout: Duration::from_secs(2),
                command_timeout: Duration::from_secs(2),
                client_name: "pulsar-relay-test".to_owned(),
                ..ConnectConfig::default()
            }
        }
    }

    impl Drop for ValkeyServer {
        fn drop(&mut self) {
            self.kill();
        }
    }

    /// Writes `<prefix>.crt`/`.key` (a CA) and, for the prefix "ca", `server.crt`/`.key`
    /// signed by it for `localhost` and `127.0.0.1`.
    fn make_certificates(dir: &Path, prefix: &str) {
        let run = |args: &[&str]| {
            let out = Command::new("openssl")
                .args(args)
                .current_dir(dir)
                .stdin(Stdio::null())
                .output()
                .expect("run openssl");
            assert!(
                out.status.success(),
                "openssl {args:?}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        };
        let ca_key = format!("{prefix}.key");
        let ca_crt = format!("{prefix}.crt");
        run(&[
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-days",
            "2",
            "-subj",
            &format!("/CN=pulsar-relay test {prefix}"),
            "-keyout",
            &ca_key,
            "-out",
            &ca_crt,
        ]);
        if prefix != "ca" {
            return;
        }
        std::fs::write(
            dir.join("server.ext"),
            "subjectAltName=DNS:localhost,IP:127.0.0.1\nbasicConstraints=CA:FALSE\n",
        )
        .expect("write extension file");
        run(&[
            "req",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-subj",
            "/CN=localhost",
            "-keyout",
            "server.key",
            "-out",
            "server.csr",
        ]);
        run(&[
            "x509",
            "-req",
            "-in",
            "server.csr",
            "-CA",
            &ca_crt,
            "-CAkey",
            &ca_key,
            "-CAcreateserial",
            "-days",
            "2",
            "-extfile",
            "server.ext",
            "-out",
            "server.crt",
        ]);
    }
}
