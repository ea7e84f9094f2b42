//! One established connection to Valkey: TCP (optionally TLS), AUTH/SELECT/CLIENT SETNAME
//! done and the configured Function library loaded, then batches of pre-encoded commands
//! written with one write and answered in order.
//!
//! Owns: address resolution and connect, the TLS client configuration (roots from a CA file or
//! the system store, server certificate always verified against the host connected to), the
//! connection handshake (with Sentinel, also the check that the node is a master), the read
//! buffer, the command timeout of one round trip, and reading pushed frames (a Sentinel
//! subscription's messages).
//!
//! Does not own: queueing, matching replies to callers, reconnecting; see `client.rs`. A
//! connection that returned an error is finished: callers drop it and connect again.
//!
//! Reading: RESP frames are re-parsed from their start while incomplete (`redis-protocol` has
//! no resumable state), so the connection reads in chunks of at least 64 KiB, and at least as
//! large as the bytes already pending, and tries to decode only after new bytes arrived. A
//! 4 MiB reply thus costs a handful of re-parses instead of one per 64 KiB.
//!
//! Writing: glommio's `poll_flush` is a no-op and every write is a syscall, so a batch goes out
//! with one `write_all`. Under TLS, rustls splits it into 16 KiB records, one write each.

use std::fmt;
use std::io;
use std::net::{SocketAddr, ToSocketAddrs};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use futures_lite::{AsyncReadExt, AsyncWriteExt};
use futures_rustls::client::TlsStream;
use futures_rustls::TlsConnector;
use glommio::net::TcpStream;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};

use super::codec::{decode_reply_slice, encode_command, ProtocolError, Reply};
use super::{with_timeout, ValkeyError};

/// Reads ask the kernel for at least this much: large enough that a typical pipeline of
/// replies arrives in one read, small enough to keep per connection (shards x connections).
const READ_CHUNK: usize = 64 << 10;

/// A read buffer grown beyond this by one large reply is released once empty, so one big
/// XRANGE does not pin megabytes per connection for the life of the process.
const KEEP_READ_CAPACITY: usize = 1 << 20;

/// Where and how to connect. Shared by every connection of a client.
#[derive(Clone)]
pub struct ConnectConfig {
    /// Host name or IP address; also the TLS server name the certificate must match.
    pub host: String,
    pub port: u16,
    /// ACL user; `None` authenticates the `default` user (`AUTH <password>`).
    pub username: Option<String>,
    /// Without a password no AUTH is sent.
    pub password: Option<String>,
    /// `SELECT`ed after AUTH when not 0.
    pub db: u32,
    pub tls: bool,
    /// PEM file with the CA certificate(s) that sign the server's certificate; `None` uses
    /// the system's trust store.
    pub tls_ca_file: Option<PathBuf>,
    /// Bounds resolving, TCP connect, TLS handshake and AUTH/SELECT together.
    pub connect_timeout: Duration,
    /// Bounds one round trip: writing a batch and reading all of its replies.
    pub command_timeout: Duration,
    /// `CLIENT SETNAME` value, e.g. `pulsar-relay-shard3` (visible in `CLIENT LIST`); empty
    /// skips it. Valkey refuses names with spaces; that error is ignored.
    pub client_name: String,
    /// A Function library every connection makes sure is loaded (at its version or newer)
    /// before it carries commands; see [`super::library`].
    pub library: Option<super::FunctionLibrary>,
    /// Ends the handshake with `ROLE` and refuses a node that is not a master
    /// ([`ValkeyError::NotMaster`]): with Sentinel, the address a sentinel names can be stale.
    pub verify_master: bool,
}

impl Default for ConnectConfig {
    fn default() -> Self {
        ConnectConfig {
            host: "127.0.0.1".to_owned(),
            port: 6379,
            username: None,
            password: None,
            db: 0,
            tls: false,
            tls_ca_file: None,
            connect_timeout: Duration::from_secs(5),
            command_timeout: Duration::from_secs(5),
            client_name: String::new(),
            library: None,
            verify_master: false,
        }
    }
}

/// Hand-written so the password never reaches a log line.
impl fmt::Debug for ConnectConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ConnectConfig")
            .field("host", &self.host)
            .field("port", &self.port)
            .field("username", &self.username)
            .field("password", &self.password.as_ref().map(|_| "<redacted>"))
            .field("db", &self.db)
            .field("tls", &self.tls)
            .field("tls_ca_file", &self.tls_ca_file)
            .field("connect_timeout", &self.connect_timeout)
            .field("command_timeout", &self.command_timeout)
            .field("client_name", &self.client_name)
            .field(
                "library",
                &self.library.as_ref().map(|l| (l.name, l.version)),
            )
            .field("verify_master", &self.verify_master)
            .finish()
    }
}

/// Which handshake command a reply answers, to classify its error.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum HandshakeStep {
    Auth,
    Select,
    SetName,
    Ping,
    Role,
}

/// Everything needed to open connections, prepared once per client: reading CA files and the
/// system trust store takes milliseconds of blocking file I/O, too slow for every reconnect.
pub struct Connector {
    config: ConnectConfig,
    /// Present when `config.tls`. The server name each certificate must match is the host of
    /// each connection (with Sentinel, the master's address changes at every failover).
    tls: Option<TlsConnector>,
    /// AUTH, SELECT, CLIENT SETNAME (and ROLE) encoded as one pipeline: one round trip at
    /// connect.
    handshake: Bytes,
    /// What each handshake command is, in order.
    handshake_steps: Vec<HandshakeStep>,
    /// A refused `ROLE` (an ACL user without `+role`) was logged once: the check is skipped
    /// then, and `READONLY` replies remain the way a replica is found out.
    role_refusal_logged: std::cell::Cell<bool>,
}

impl Connector {
    /// Validates `config` and loads the TLS roots.
    pub fn new(config: ConnectConfig) -> Result<Connector, ValkeyError> {
        // The upper bound keeps deadline arithmetic (`Instant + timeout`) far from overflow;
        // an hour is already far beyond any useful wait for Valkey.
        let sensible = Duration::from_millis(1)..=Duration::from_secs(3600);
        if !sensible.contains(&config.connect_timeout)
            || !sensible.contains(&config.command_timeout)
        {
            return Err(ValkeyError::Config(
                "timeouts must be between 1 ms and 1 hour".to_owned(),
            ));
        }
        let mut handshake = BytesMut::new();
        let mut steps = Vec::new();
        match (&config.username, &config.password) {
            (Some(user), Some(password)) => {
                encode_command(
                    &mut handshake,
                    &[b"AUTH", user.as_bytes(), password.as_bytes()],
                );
                steps.push(HandshakeStep::Auth);
            }
            (None, Some(password)) => {
                encode_command(&mut handshake, &[b"AUTH", password.as_bytes()]);
                steps.push(HandshakeStep::Auth);
            }
            (Some(_), None) => {
                return Err(ValkeyError::Config(
                    "a Valkey username needs a password".to_owned(),
                ))
            }
            (None, None) => {}
        }
        if config.db != 0 {
            let db = config.db.to_string();
            encode_command(&mut handshake, &[b"SELECT", db.as_bytes()]);
            steps.push(HandshakeStep::Select);
        }
        if !config.client_name.is_empty() {
            encode_command(
                &mut handshake,
                &[b"CLIENT", b"SETNAME", config.client_name.as_bytes()],
            );
            steps.push(HandshakeStep::SetName);
        }
        if config.verify_master {
            encode_command(&mut handshake, &[b"ROLE"]);
            steps.push(HandshakeStep::Role);
        }
        if steps.is_empty() {
            // Something must prove the server speaks RESP and needs no password.
            encode_command(&mut handshake, &[b"PING"]);
            steps.push(HandshakeStep::Ping);
        }
        let tls = if config.tls {
            // The configured host is checked now so a typo fails at start; with Sentinel it
            // is not used (empty) and each master's address is checked when connecting.
            if !config.host.is_empty() {
                server_name(&config.host)?;
            }
            Some(tls_connector(&config)?)
        } else {
            None
        };
        Ok(Connector {
            config,
            tls,
            handshake: handshake.freeze(),
            handshake_steps: steps,
            role_refusal_logged: std::cell::Cell::new(false),
        })
    }

    pub fn config(&self) -> &ConnectConfig {
        &self.config
    }

    /// Opens a connection to the configured host and port and runs the handshake, all within
    /// `connect_timeout`.
    ///
    /// Resolving a host name (not an IP address) blocks this thread for the DNS lookup; it
    /// happens only when (re)connecting.
    pub async fn connect(&self) -> Result<Connection, ValkeyError> {
        self.connect_to(&self.config.host, self.config.port).await
    }

    /// Like [`Connector::connect`], to `host:port` instead of the configured address (the
    /// master a sentinel named, or a sentinel), with everything else as configured.
    pub async fn connect_to(&self, host: &str, port: u16) -> Result<Connection, ValkeyError> {
        match with_timeout(
            self.config.connect_timeout,
            "connecting",
            self.connect_unbounded(host, port),
        )
        .await
        {
            Err(ValkeyError::Timeout(_)) => Err(ValkeyError::Connect(format!(
                "{host}:{port}: no connection within {:?}",
                self.config.connect_timeout
            ))),
            other => other,
        }
    }

    async fn connect_unbounded(&self, host: &str, port: u16) -> Result<Connection, ValkeyError> {
        let target = format!("{host}:{port}");
        let addrs: Vec<SocketAddr> = (host, port)
            .to_socket_addrs()
            .map_err(|e| ValkeyError::Connect(format!("{target}: {e}")))?
            .collect();
        let mut last_error = format!("{target}: host name resolved to no address");
        let mut connected = None;
        // Every address in turn: `localhost` may resolve to ::1 first while Valkey binds only
        // 127.0.0.1.
        for addr in addrs {
            match TcpStream::connect_timeout(addr, self.config.connect_timeout).await {
                Ok(stream) => {
                    connected = Some((stream, addr));
                    break;
                }
                Err(e) => last_error = format!("{addr}: {e}"),
            }
        }
        let (stream, peer) = connected.ok_or(ValkeyError::Connect(last_error))?;
        // Pipelines are written in one piece; Nagle would only delay the next small batch.
        stream
            .set_nodelay(true)
            .map_err(|e| ValkeyError::Connect(format!("{peer}: setting TCP_NODELAY: {e}")))?;
        let transport = match &self.tls {
            None => Transport::Plain(stream),
            Some(tls) => {
                let stream = tls
                    .connect(server_name(host)?, stream)
                    .await
                    .map_err(|e| ValkeyError::Tls(format!("{peer}: {e}")))?;
                Transport::Tls(Box::new(stream))
            }
        };
        let mut connection = Connection {
            transport,
            read: ReadBuffer::new(),
            command_timeout: self.config.command_timeout,
            peer,
            broken: false,
        };
        let mut replies = Vec::with_capacity(self.handshake_steps.len());
        connection
            .round_trip_unbounded(&self.handshake, self.handshake_steps.len(), &mut replies)
            .await?;
        for (step, reply) in self.handshake_steps.iter().zip(&replies) {
            if *step == HandshakeStep::Role {
                self.check_role(&target, reply)?;
                continue;
            }
            let Some(message) = reply.as_error() else {
                continue;
            };
            if *step == HandshakeStep::Auth
                || message.starts_with("NOAUTH")
                || message.starts_with("WRONGPASS")
            {
                return Err(ValkeyError::Auth(message.to_owned()));
            }
            match step {
                HandshakeStep::Select => {
                    return Err(ValkeyError::Server(format!(
                        "SELECT {}: {message}",
                        self.config.db
                    )))
                }
                HandshakeStep::SetName => {
                    tracing::debug!(name = %self.config.client_name, error = %message, "CLIENT SETNAME refused; ignored");
                }
                HandshakeStep::Ping | HandshakeStep::Auth | HandshakeStep::Role => {
                    return Err(ValkeyError::Server(message.to_owned()))
                }
            }
        }
        // After the `ROLE` check: a replica named by a stale sentinel is refused before any
        // `FUNCTION LOAD` is tried on it (a replica would answer `READONLY`).
        if let Some(library) = &self.config.library {
            match super::library::ensure_loaded(&mut connection, library).await? {
                super::library::LibraryState::Loaded { replaced } => tracing::info!(
                    library = library.name,
                    version = library.version,
                    replaced = ?replaced,
                    %peer,
                    "loaded the Valkey function library"
                ),
                super::library::LibraryState::Present(version) => tracing::debug!(
                    library = library.name,
                    version,
                    %peer,
                    "Valkey function library present"
                ),
            }
        }
        Ok(connection)
    }

    /// The `ROLE` reply of the handshake: a master passes; a replica (a stale address from a
    /// sentinel, or an old master that rejoined) is [`ValkeyError::NotMaster`]. A refused
    /// `ROLE` (ACL) passes with a warning logged once: writes to a replica then fail with
    /// `READONLY`, which the client also follows.
    fn check_role(&self, target: &str, reply: &Reply) -> Result<(), ValkeyError> {
        if let Some(message) = reply.as_error() {
            if !self.role_refusal_logged.replace(true) {
                tracing::warn!(node = %target, error = %message, "ROLE refused: cannot check that the node is a master before writing (grant the ACL user +role); relying on READONLY replies");
            }
            return Ok(());
        }
        let role = reply
            .as_array()
            .and_then(|items| items.first())
            .and_then(Reply::as_str)
            .unwrap_or("");
        if role == "master" {
            Ok(())
        } else {
            Err(ValkeyError::NotMaster(format!(
                "{target} is not a master (ROLE says {role:?})"
            )))
        }
    }
}

/// The name a server certificate must match: the host connected to (a name or an IP address).
fn server_name(host: &str) -> Result<ServerName<'static>, ValkeyError> {
    ServerName::try_from(host.to_owned()).map_err(|e| {
        ValkeyError::Config(format!("host {host:?} is not a valid TLS server name: {e}"))
    })
}

/// Builds the rustls client configuration: ring provider, safe default protocol versions,
/// server certificates verified against `tls_ca_file` or the system roots.
fn tls_connector(config: &ConnectConfig) -> Result<TlsConnector, ValkeyError> {
    let mut roots = rustls::RootCertStore::empty();
    match &config.tls_ca_file {
        Some(path) => {
            let shown = path.display();
            let certs = CertificateDer::pem_file_iter(path)
                .map_err(|e| ValkeyError::Tls(format!("reading CA file {shown}: {e}")))?;
            for cert in certs {
                let cert =
                    cert.map_err(|e| ValkeyError::Tls(format!("reading CA file {shown}: {e}")))?;
                roots
                    .add(cert)
                    .map_err(|e| ValkeyError::Tls(format!("CA file {shown}: {e}")))?;
            }
            if roots.is_empty() {
                return Err(ValkeyError::Tls(format!(
                    "CA file {shown} holds no certificate"
                )));
            }
        }
        None => {
            let native = rustls_native_certs::load_native_certs();
            let (added, _unparsable) = roots.add_parsable_certificates(native.certs);
            if added == 0 {
                return Err(ValkeyError::Tls(format!(
                    "no usable system root certificates ({} errors loading them); set a CA file",
                    native.errors.len()
                )));
            }
        }
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let client_config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| ValkeyError::Tls(e.to_string()))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(TlsConnector::from(Arc::new(client_config)))
}

/// The byte stream under a connection. An enum rather than a boxed trait object: the match is
/// per call, with no allocation or dynamic dispatch. The TLS stream is boxed once per
/// connection because it is ~1 KiB against a few words for the plain one.
enum Transport {
    Plain(TcpStream),
    Tls(Box<TlsStream<TcpStream>>),
}

impl Transport {
    async fn write_all(&mut self, bytes: &[u8]) -> io::Result<()> {
        match self {
            Transport::Plain(stream) => stream.write_all(bytes).await,
            Transport::Tls(stream) => {
                stream.write_all(bytes).await?;
                // rustls may hold the tail of the last record until flushed.
                stream.flush().await
            }
        }
    }

    /// Cancel-safe: dropping the future before it completes loses no bytes (glommio polls
    /// readiness and then reads synchronously; futures-rustls keeps its state in the stream).
    async fn read(&mut self, into: &mut [u8]) -> io::Result<usize> {
        match self {
            Transport::Plain(stream) => stream.read(into).await,
            Transport::Tls(stream) => stream.read(into).await,
        }
    }
}

/// Received bytes not decoded yet: `bytes[start..end]`. A `Vec` with indices instead of a
/// `BytesMut` so the spare tail stays initialised across reads (no zeroing of 64 KiB per
/// read) and nothing ever shares the allocation (replies copy out; see `codec.rs`).
struct ReadBuffer {
    bytes: Vec<u8>,
    start: usize,
    end: usize,
}

impl ReadBuffer {
    fn new() -> ReadBuffer {
        ReadBuffer {
            bytes: vec![0; READ_CHUNK],
            start: 0,
            end: 0,
        }
    }

    fn pending(&self) -> &[u8] {
        &self.bytes[self.start..self.end]
    }

    fn consume(&mut self, n: usize) {
        self.start += n;
        if self.start == self.end {
            self.start = 0;
            self.end = 0;
        }
    }

    /// Space for the next read: at least half a chunk, and at least as much as is pending, so
    /// a large reply is read in geometrically growing chunks (fewer re-parses). Compacts
    /// before growing; grows by doubling.
    fn spare(&mut self) -> &mut [u8] {
        let want = (READ_CHUNK / 2).max(self.end - self.start);
        if self.bytes.len() - self.end < want {
            self.bytes.copy_within(self.start..self.end, 0);
            self.end -= self.start;
            self.start = 0;
            if self.bytes.len() - self.end < want {
                let grown = (self.end + want).max(self.bytes.len() * 2);
                self.bytes.resize(grown, 0);
            }
        }
        &mut self.bytes[self.end..]
    }

    fn commit(&mut self, n: usize) {
        self.end += n;
    }

    fn release_if_large(&mut self) {
        if self.start == self.end && self.bytes.len() > KEEP_READ_CAPACITY {
            self.bytes = vec![0; READ_CHUNK];
            self.start = 0;
            self.end = 0;
        }
    }
}

/// One connection, handshake done, ready for round trips. Not shared: one round trip at a
/// time (`&mut self`).
pub struct Connection {
    transport: Transport,
    /// Replies read but not decoded yet.
    read: ReadBuffer,
    command_timeout: Duration,
    /// For log lines.
    peer: SocketAddr,
    /// Set by any failure: the reply stream may be out of step with the commands, so the
    /// connection must not carry another batch.
    broken: bool,
}

impl Connection {
    /// Opens one connection (see [`Connector::connect`]). Loads TLS roots on every call; keep
    /// a [`Connector`] to connect repeatedly.
    pub async fn connect(config: &ConnectConfig) -> Result<Connection, ValkeyError> {
        Connector::new(config.clone())?.connect().await
    }

    pub fn peer_addr(&self) -> SocketAddr {
        self.peer
    }

    /// Whether an earlier failure made this connection unusable.
    pub fn is_broken(&self) -> bool {
        self.broken
    }

    /// Writes `batch` (exactly `n` encoded commands) with one write and appends their `n`
    /// replies to `replies`, in order, within `command_timeout`.
    ///
    /// On error, `replies` holds the replies that did arrive (for the first commands of the
    /// batch); the rest are unknown: applied or not. The connection is then broken.
    pub async fn round_trip(
        &mut self,
        batch: &[u8],
        n: usize,
        replies: &mut Vec<Reply>,
    ) -> Result<(), ValkeyError> {
        if self.broken {
            return Err(ValkeyError::ConnectionLost(
                "connection already failed".to_owned(),
            ));
        }
        let limit = self.command_timeout;
        let result = with_timeout(
            limit,
            "waiting for replies",
            self.round_trip_unbounded(batch, n, replies),
        )
        .await;
        if result.is_err() {
            self.broken = true;
        }
        result
    }

    /// One command, for handshakes and tests; the client pipelines through `round_trip`.
    pub async fn call(&mut self, args: &[&[u8]]) -> Result<Reply, ValkeyError> {
        if args.is_empty() {
            return Err(ProtocolError::EmptyCommand.into());
        }
        let mut encoded = BytesMut::new();
        encode_command(&mut encoded, args);
        let mut replies = Vec::with_capacity(1);
        self.round_trip(&encoded, 1, &mut replies).await?;
        match replies.pop() {
            Some(Reply::Error(message)) => Err(ValkeyError::Server(message)),
            Some(reply) => Ok(reply),
            // round_trip returns Ok only with all n replies.
            None => Err(ValkeyError::ConnectionLost("no reply".to_owned())),
        }
    }

    async fn round_trip_unbounded(
        &mut self,
        batch: &[u8],
        n: usize,
        replies: &mut Vec<Reply>,
    ) -> Result<(), ValkeyError> {
        let result = self.exchange(batch, n, replies).await;
        if result.is_err() {
            self.broken = true;
        }
        result
    }

    async fn exchange(
        &mut self,
        batch: &[u8],
        n: usize,
        replies: &mut Vec<Reply>,
    ) -> Result<(), ValkeyError> {
        let peer = self.peer;
        let lost = |doing: &str, e: io::Error| {
            ValkeyError::ConnectionLost(format!("{peer}: {doing}: {e}"))
        };
        self.transport
            .write_all(batch)
            .await
            .map_err(|e| lost("writing", e))?;
        let target = replies.len() + n;
        while replies.len() < target {
            // Decode everything complete first; only read when a frame is still missing.
            if let Some((reply, used)) = decode_reply_slice(self.read.pending())? {
                self.read.consume(used);
                replies.push(reply);
                continue;
            }
            let got = self
                .transport
                .read(self.read.spare())
                .await
                .map_err(|e| lost("reading", e))?;
            if got == 0 {
                return Err(ValkeyError::ConnectionLost(format!(
                    "{peer}: closed by Valkey with {} of {n} replies outstanding",
                    target - replies.len()
                )));
            }
            self.read.commit(got);
        }
        let extra = self.read.pending().len();
        if extra > 0 {
            return Err(ProtocolError::UnexpectedData(extra).into());
        }
        self.read.release_if_large();
        Ok(())
    }

    /// Writes `bytes` (encoded commands) without reading replies: for a subscribed connection,
    /// whose frames are read one at a time with [`Connection::next_frame`].
    pub async fn send(&mut self, bytes: &[u8]) -> Result<(), ValkeyError> {
        if self.broken {
            return Err(ValkeyError::ConnectionLost(
                "connection already failed".to_owned(),
            ));
        }
        let peer = self.peer;
        let limit = self.command_timeout;
        let result = with_timeout(limit, "writing", async {
            self.transport
                .write_all(bytes)
                .await
                .map_err(|e| ValkeyError::ConnectionLost(format!("{peer}: writing: {e}")))
        })
        .await;
        if result.is_err() {
            self.broken = true;
        }
        result
    }

    /// The next frame Valkey sends: a message pushed to a subscriber, or the reply to
    /// something [sent](Connection::send). Waits as long as it takes (the caller bounds it).
    /// Cancel-safe: bytes of a frame read only in part stay buffered for the next call.
    pub async fn next_frame(&mut self) -> Result<Reply, ValkeyError> {
        let peer = self.peer;
        loop {
            match decode_reply_slice(self.read.pending()) {
                Ok(Some((reply, used))) => {
                    self.read.consume(used);
                    self.read.release_if_large();
                    return Ok(reply);
                }
                Ok(None) => {}
                Err(e) => {
                    self.broken = true;
                    return Err(e.into());
                }
            }
            let got = match self.transport.read(self.read.spare()).await {
                Ok(0) => {
                    self.broken = true;
                    return Err(ValkeyError::ConnectionLost(format!(
                        "{peer}: closed by the server"
                    )));
                }
                Ok(n) => n,
                Err(e) => {
                    self.broken = true;
                    return Err(ValkeyError::ConnectionLost(format!("{peer}: reading: {e}")));
                }
            };
            self.read.commit(got);
        }
    }

    /// Resolves when the idle connection turns out to be dead: closed by Valkey, a socket
    /// error, or bytes nobody asked for. Never resolves while the connection is healthy.
    ///
    /// Cancel-safe, so a driver can race it against "work arrived" and find out about a
    /// restarted Valkey before it sends a batch into a dead socket.
    pub async fn closed(&mut self) -> ValkeyError {
        let peer = self.peer;
        let error = match self.transport.read(self.read.spare()).await {
            Ok(0) => ValkeyError::ConnectionLost(format!("{peer}: closed by Valkey while idle")),
            Ok(n) => {
                self.read.commit(n);
                ProtocolError::UnexpectedData(n).into()
            }
            Err(e) => ValkeyError::ConnectionLost(format!("{peer}: idle connection: {e}")),
        };
        self.broken = true;
        error
    }
}

#[cfg(test)]
mod tests {
    use super::super::testing::{run_local, ValkeyServer};
    use super::*;

    #[test]
    fn read_buffer_grows_with_pending_and_releases() {
        let mut buf = ReadBuffer::new();
        assert_eq!(buf.spare().len(), READ_CHUNK);
        // Simulate a 3 MiB reply arriving in full spare-sized reads.
        let (mut total, mut reads) = (0, 0);
        while total < 3 << 20 {
            let n = buf.spare().len();
            buf.commit(n);
            total += n;
            reads += 1;
        }
        // 64 KiB, 64 KiB, 128 KiB, 256 KiB, ...: geometric, not 48 reads of 64 KiB.
        assert!(reads <= 7, "{reads} reads");
        assert!(buf.pending().len() >= 3 << 20);
        buf.consume(buf.pending().len());
        buf.release_if_large();
        assert_eq!(buf.bytes.len(), READ_CHUNK);
    }

    #[test]
    fn read_buffer_compacts_partial_frame_to_front() {
        let mut buf = ReadBuffer::new();
        let n = buf.spare().len();
        buf.spare()[..4].copy_from_slice(b"abcd");
        buf.commit(n);
        buf.consume(n - 4);
        // Pending bytes are the last 4; after spare() they sit at the front.
        assert_eq!(buf.spare().len(), READ_CHUNK - 4);
        assert_eq!(buf.start, 0);
        assert_eq!(buf.pending().len(), 4);
        assert_eq!(buf.bytes.len(), READ_CHUNK, "compacting, not growing");
    }

    #[test]
    fn config_debug_redacts_password() {
        let config = ConnectConfig {
            password: Some("hunter2".to_owned()),
            ..ConnectConfig::default()
        };
        let shown = format!("{config:?}");
        assert!(!shown.contains("hunter2"));
        assert!(shown.contains("<redacted>"));
    }

    #[test]
    fn username_without_password_is_a_config_error() {
        let config = ConnectConfig {
            username: Some("relay".to_owned()),
            ..ConnectConfig::default()
        };
        assert!(matches!(
            Connector::new(config),
            Err(ValkeyError::Config(_))
        ));
    }

    #[test]
    fn ping_set_get_xadd_round_trip() {
        let server = ValkeyServer::start(&[]);
        let config = server.config();
        run_local(move || async move {
            let mut conn = Connection::connect(&config).await.expect("connect");
            assert_eq!(
                conn.call(&[b"PING"]).await,
                Ok(Reply::Simple(Bytes::from_static(b"PONG")))
            );
            assert!(conn
                .call(&[b"SET", b"k", b"v\r\n"])
                .await
                .expect("SET")
                .is_ok());
            assert_eq!(
                conn.call(&[b"GET", b"k"]).await.expect("GET").as_bytes(),
                Some(&b"v\r\n"[..])
            );
            assert_eq!(conn.call(&[b"GET", b"missing"]).await, Ok(Reply::Nil));
            let id = conn
                .call(&[b"XADD", b"s", b"*", b"d", b"{}"])
                .await
                .expect("XADD");
            assert!(id.as_str().is_some_and(|id| id.contains('-')), "{id:?}");
            let name = conn.call(&[b"CLIENT", b"GETNAME"]).await.expect("GETNAME");
            assert_eq!(name.as_str(), Some("pulsar-relay-test"));
            // A pipelined batch: three commands, one write, replies in order.
            let mut batch = BytesMut::new();
            encode_command(&mut batch, &[b"INCR", b"n"]);
            encode_command(&mut batch, &[b"INCR", b"k"]);
            encode_command(&mut batch, &[b"INCR", b"n"]);
            let mut replies = Vec::new();
            conn.round_trip(&batch, 3, &mut replies)
                .await
                .expect("batch");
            assert_eq!(replies[0], Reply::Integer(1));
            assert!(
                replies[1].is_error(),
                "INCR on a non-number is an error reply"
            );
            assert_eq!(replies[2], Reply::Integer(2));
        });
    }

    #[test]
    fn large_reply_spans_many_reads() {
        let server = ValkeyServer::start(&[]);
        let config = server.config();
        run_local(move || async move {
            let mut conn = Connection::connect(&config).await.expect("connect");
            let big = vec![b'x'; 3 << 20];
            assert!(conn
                .call(&[b"SET", b"big", &big])
                .await
                .expect("SET")
                .is_ok());
            let got = conn.call(&[b"GET", b"big"]).await.expect("GET");
            assert_eq!(got.as_bytes().map(<[u8]>::len), Some(3 << 20));
            assert_eq!(conn.read.bytes.len(), READ_CHUNK, "buffer released after");
        });
    }

    #[test]
    fn select_db_applies() {
        let server = ValkeyServer::start(&[]);
        let mut config = server.config();
        run_local(move || async move {
            config.db = 3;
            let mut conn = Connection::connect(&config).await.expect("connect");
            conn.call(&[b"SET", b"in3", b"1"]).await.expect("SET");
            config.db = 0;
            let mut conn0 = Connection::connect(&config).await.expect("connect");
            assert_eq!(
                conn0.call(&[b"EXISTS", b"in3"]).await,
                Ok(Reply::Integer(0))
            );
            config.db = 99;
            assert!(matches!(
                Connection::connect(&config).await.map(|_| ()),
                Err(ValkeyError::Server(_))
            ));
        });
    }

    #[test]
    fn auth_with_requirepass_and_acl_user() {
        let server = ValkeyServer::start(&["--requirepass", "s3cret"]);
        let config = server.config();
        run_local(move || async move {
            // No password configured against a server that needs one.
            assert!(matches!(
                Connection::connect(&config).await.map(|_| ()),
                Err(ValkeyError::Auth(_))
            ));
            let wrong = ConnectConfig {
                password: Some("nope".to_owned()),
                ..config.clone()
            };
            let err = Connection::connect(&wrong).await.map(|_| ());
            assert!(
                matches!(err, Err(ValkeyError::Auth(ref m)) if m.contains("WRONGPASS")),
                "{err:?}"
            );

            let admin_config = ConnectConfig {
                password: Some("s3cret".to_owned()),
                ..config.clone()
            };
            let mut admin = Connection::connect(&admin_config)
                .await
                .expect("default user");
            assert_eq!(
                admin
                    .call(&[b"ACL", b"WHOAMI"])
                    .await
                    .expect("whoami")
                    .as_str(),
                Some("default")
            );
            admin
                .call(&[b"ACL", b"SETUSER", b"relay", b"on", b">pw", b"~*", b"+@all"])
                .await
                .expect("create ACL user");
            let user_config = ConnectConfig {
                username: Some("relay".to_owned()),
                password: Some("pw".to_owned()),
                ..config.clone()
            };
            let mut user = Connection::connect(&user_config).await.expect("ACL user");
            assert_eq!(
                user.call(&[b"ACL", b"WHOAMI"])
                    .await
                    .expect("whoami")
                    .as_str(),
                Some("relay")
            );
            let bad_user = ConnectConfig {
                password: Some("wrong".to_owned()),
                ..user_config
            };
            assert!(matches!(
                Connection::connect(&bad_user).await.map(|_| ()),
                Err(ValkeyError::Auth(_))
            ));
        });
    }

    #[test]
    fn password_against_server_without_one_is_auth_error() {
        let server = ValkeyServer::start(&[]);
        let config = ConnectConfig {
            password: Some("x".to_owned()),
            ..server.config()
        };
        run_local(move || async move {
            assert!(matches!(
                Connection::connect(&config).await.map(|_| ()),
                Err(ValkeyError::Auth(_))
            ));
        });
    }

    #[test]
    fn connect_refused_is_connect_error() {
        let port = super::super::testing::free_port();
        let config = ConnectConfig {
            port,
            ..ConnectConfig::default()
        };
        run_local(move || async move {
            assert!(matches!(
                Connection::connect(&config).await.map(|_| ()),
                Err(ValkeyError::Connect(_))
            ));
        });
    }

    #[test]
    fn reply_timeout_breaks_connection() {
        let server = ValkeyServer::start(&[]);
        let config = ConnectConfig {
            command_timeout: Duration::from_millis(200),
            ..server.config()
        };
        run_local(move || async move {
            let mut conn = Connection::connect(&config).await.expect("connect");
            // BLPOP blocks this connection for 5 s: Valkey stalled, as far as we can tell.
            assert_eq!(
                conn.call(&[b"BLPOP", b"nothing", b"5"]).await,
                Err(ValkeyError::Timeout("waiting for replies"))
            );
            assert!(conn.is_broken());
            assert!(matches!(
                conn.call(&[b"PING"]).await,
                Err(ValkeyError::ConnectionLost(_))
            ));
        });
    }

    #[test]
    fn idle_connection_notices_server_death() {
        let mut server = ValkeyServer::start(&[]);
        let config = server.config();
        let (tx, rx) = std::sync::mpsc::channel::<()>();
        let killer = std::thread::spawn(move || {
            // Kill once the client is connected and idle-watching.
            let _ = rx.recv();
            server.kill();
        });
        run_local(move || async move {
            let mut conn = Connection::connect(&config).await.expect("connect");
            let _ = tx.send(());
            let error = with_timeout(Duration::from_secs(5), "test", async {
                Ok(conn.closed().await)
            })
            .await;
            assert!(
                matches!(error, Ok(ValkeyError::ConnectionLost(_))),
                "{error:?}"
            );
        });
        killer.join().expect("killer thread");
    }

    #[test]
    fn empty_command_is_refused_locally() {
        let server = ValkeyServer::start(&[]);
        let config = server.config();
        run_local(move || async move {
            let mut conn = Connection::connect(&config).await.expect("connect");
            assert_eq!(
                conn.call(&[]).await,
                Err(ValkeyError::Protocol(ProtocolError::EmptyCommand))
            );
            assert_eq!(conn.call(&[b"PING"]).await.map(|r| r.is_error()), Ok(false));
        });
    }

    #[test]
    fn tls_verifies_server_against_configured_ca() {
        let server = ValkeyServer::start_tls();
        let base = ConnectConfig {
            tls: true,
            ..server.config()
        };
        let ca = server.file("ca.crt");
        let other_ca = server.file("other-ca.crt");
        let _dir = server.dir().to_owned();
        run_local(move || async move {
            for host in ["127.0.0.1", "localhost"] {
                let config = ConnectConfig {
                    host: host.to_owned(),
                    tls_ca_file: Some(ca.clone()),
                    ..base.clone()
                };
                let mut conn = Connection::connect(&config).await.expect("TLS connect");
                assert!(conn.call(&[b"SET", b"t", b"1"]).await.expect("SET").is_ok());
                let big = vec![b'y'; 200_000];
                conn.call(&[b"SET", b"big", &big]).await.expect("SET big");
                let got = conn.call(&[b"GET", b"big"]).await.expect("GET big");
                assert_eq!(got.as_bytes().map(<[u8]>::len), Some(200_000));
            }
            // A different CA: the server's certificate is not trusted.
            let config = ConnectConfig {
                tls_ca_file: Some(other_ca),
                ..base.clone()
            };
            let err = Connection::connect(&config).await.map(|_| ());
            assert!(matches!(err, Err(ValkeyError::Tls(_))), "{err:?}");
            // No CA file: the system roots do not know the throwaway CA (or there are none).
            let config = ConnectConfig {
                tls_ca_file: None,
                ..base.clone()
            };
            let err = Connection::connect(&config).await.map(|_| ());
            assert!(matches!(err, Err(ValkeyError::Tls(_))), "{err:?}");
            // A CA file that does not exist fails before connecting.
            let config = ConnectConfig {
                tls_ca_file: Some("/nonexistent/ca.pem".into()),
                ..base.clone()
            };
            assert!(matches!(Connector::new(config), Err(ValkeyError::Tls(_))));
            // Plain RESP against the TLS port gets no valid reply.
            let config = ConnectConfig {
                tls: false,
                connect_timeout: Duration::from_millis(500),
                ..base.clone()
            };
            assert!(Connection::connect(&config).await.is_err());
        });
    }
}
