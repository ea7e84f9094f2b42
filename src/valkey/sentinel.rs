//! Where a client's connections go: a fixed address, or the master Valkey Sentinel names,
//! followed across failovers.
//!
//! Owns: the [`Target`] every driver of a client asks before connecting (one per client, so all
//! of a shard's connections follow the same master); asking the sentinels
//! (`SENTINEL GET-MASTER-ADDR-BY-NAME`, in the configured order, skipping those that do not
//! answer within the connect and command timeouts, the one that answered moved to the front);
//! the subscription to `+switch-master` on one sentinel (on its own connection, kept alive with
//! `PING`, moved to another sentinel when it dies); and the *generation*, a number that changes
//! whenever the master's address does, which tells a driver that its connection leads to a
//! node that is no longer the master.
//!
//! Does not own: the connections to the master (the drivers in `client.rs`: they report a
//! failed connect, a lost connection or a `READONLY` reply with [`Target::suspect`], which
//! asks the sentinels again, and drop their connection when [`Target::moved`] resolves) nor
//! the check that a node is a master (the `ROLE` step of the handshake in `connection.rs`).
//!
//! Why per client (per shard) and not one per process: shards share nothing on the hot path
//! and the shard module owns their start-up; a follower per shard costs one sentinel
//! subscription per shard, and each shard asks the same sentinels and checks `ROLE`, so they
//! converge on the same master within a failover. The long form is in `docs/scaling.md`
//! ("Sentinel").

use std::cell::{Cell, RefCell};
use std::fmt;
use std::rc::Rc;
use std::task::{Poll, Waker};
use std::time::{Duration, Instant};

use bytes::BytesMut;
use futures_lite::future::poll_fn;

use super::client::{backoff_delay, register};
use super::codec::{encode_command, Reply};
use super::connection::{ConnectConfig, Connection, Connector};
use super::{with_timeout, ValkeyError};

/// The channel on which sentinels announce a completed failover:
/// `<master-name> <old-ip> <old-port> <new-ip> <new-port>`.
const SWITCH_MASTER: &[u8] = b"+switch-master";

/// How long the resolver pauses after asking the sentinels, first and at most. Never two
/// questions back to back: a stale sentinel (still naming the dead master) or a master that
/// refuses connections while the failover runs is asked about again after a short pause that
/// doubles while the answers do not help, capped so that a failover is noticed within about a
/// second even without the subscription.
const RESOLVE_PAUSE: (Duration, Duration) = (Duration::from_millis(100), Duration::from_secs(1));

/// Backoff between attempts to subscribe when no sentinel takes the subscription.
const SUBSCRIBE_BACKOFF: (Duration, Duration) =
    (Duration::from_millis(100), Duration::from_secs(5));

/// A subscription that lived this long was healthy: after losing it, subscribe again at once
/// (on another sentinel) instead of backing off.
const STABLE_SUBSCRIPTION: Duration = Duration::from_secs(5);

/// The subscription sends `PING` this often (allowed in subscribed mode; the reply is a
/// `pong` frame). A sentinel from which nothing (not even that reply) arrived for this plus
/// the command timeout is taken for dead: a host that vanished without closing the socket
/// would otherwise hide the next `+switch-master` forever.
const SUBSCRIPTION_PING: Duration = Duration::from_secs(2);

/// A node's address as a sentinel names it (an IP address, or a host name with Sentinel's
/// `resolve-hostnames`).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct NodeAddr {
    pub host: String,
    pub port: u16,
}

impl fmt::Display for NodeAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.host.contains(':') {
            write!(f, "[{}]:{}", self.host, self.port)
        } else {
            write!(f, "{}:{}", self.host, self.port)
        }
    }
}

/// Sentinel settings of a client.
#[derive(Clone, PartialEq, Eq)]
pub struct SentinelConfig {
    /// Asked in this order (the one that last answered goes first); at least one.
    pub sentinels: Vec<NodeAddr>,
    /// The name the sentinels monitor the master under (`sentinel monitor <name> ...`).
    pub master_name: String,
    /// ACL user on the sentinels; `None` with a password authenticates `default`.
    pub username: Option<String>,
    /// The sentinels' password (`requirepass` in `sentinel.conf`), not the data nodes'.
    pub password: Option<String>,
}

/// Hand-written so the password never reaches a log line.
impl fmt::Debug for SentinelConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SentinelConfig")
            .field("sentinels", &self.sentinels)
            .field("master_name", &self.master_name)
            .field("username", &self.username)
            .field("password", &self.password.as_ref().map(|_| "<redacted>"))
            .finish()
    }
}

/// What the follower has counted, for [`super::ClientStats`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TargetStats {
    /// Times the master's address changed after the first was found: failovers followed.
    pub failovers: u64,
    /// Questions to the sentinels that got no usable answer from any of them, and
    /// subscriptions that failed or were lost.
    pub sentinel_errors: u64,
    /// The address connections go to now.
    pub master: Option<String>,
}

/// The connection to the sentinels: how to reach them and in what order to ask.
struct SentinelLink {
    connector: Connector,
    master_name: String,
    /// The sentinels, the one that last answered first.
    order: RefCell<Vec<NodeAddr>>,
}

struct TargetState {
    /// Where connections go; `None` until the sentinels first named a master.
    master: Option<NodeAddr>,
    /// Changes exactly when `master` does (see the module doc).
    generation: u64,
    /// Whether the sentinels were asked since a connection to `master` last failed; new
    /// connections wait for that answer instead of trying the failed address again at once.
    confirmed: bool,
    /// The resolver should ask the sentinels.
    wanted: bool,
    /// The sentinel whose answer `master` is: asked last from now on if that answer turns
    /// out to be a replica (a stale sentinel must not keep the relay from the master).
    named_by: Option<NodeAddr>,
    /// The resolver task, while it waits for `wanted`.
    resolver: Option<Waker>,
    /// Drivers waiting for a confirmed master or a new generation.
    waiters: Vec<Waker>,
    stats: TargetStats,
}

/// Where the connections of one client go (see the module doc).
pub struct Target {
    /// `None`: a fixed address that never changes.
    sentinel: Option<SentinelLink>,
    state: RefCell<TargetState>,
    /// The client's name, for log lines.
    client_name: String,
    /// Whether the first "cannot subscribe" of a streak was logged.
    subscribe_failure_logged: Cell<bool>,
}

impl Target {
    /// Connections always go to `addr`.
    pub fn fixed(addr: NodeAddr, client_name: &str) -> Target {
        Target {
            sentinel: None,
            state: RefCell::new(TargetState {
                stats: TargetStats {
                    master: Some(addr.to_string()),
                    ..TargetStats::default()
                },
                master: Some(addr),
                generation: 0,
                confirmed: true,
                wanted: false,
                named_by: None,
                resolver: None,
                waiters: Vec::new(),
            }),
            client_name: client_name.to_owned(),
            subscribe_failure_logged: Cell::new(false),
        }
    }

    /// Connections go to the master `config`'s sentinels name; `data` gives the TLS settings
    /// and timeouts the sentinels are reached with (the data nodes' own).
    pub fn sentinel(config: &SentinelConfig, data: &ConnectConfig) -> Result<Target, ValkeyError> {
        if config.sentinels.is_empty() {
            return Err(ValkeyError::Config("no sentinel address".to_owned()));
        }
        if config.master_name.is_empty() {
            return Err(ValkeyError::Config("empty sentinel master name".to_owned()));
        }
        let connector = Connector::new(ConnectConfig {
            host: String::new(),
            port: 0,
            username: config.username.clone(),
            password: config.password.clone(),
            // Sentinels have no databases, no ROLE worth checking and no Functions (the
            // data nodes' library is loaded on the master's connections only).
            db: 0,
            verify_master: false,
            library: None,
            client_name: if data.client_name.is_empty() {
                String::new()
            } else {
                format!("{}-sentinel", data.client_name)
            },
            ..data.clone()
        })?;
        Ok(Target {
            sentinel: Some(SentinelLink {
                connector,
                master_name: config.master_name.clone(),
                order: RefCell::new(config.sentinels.clone()),
            }),
            state: RefCell::new(TargetState {
                master: None,
                generation: 0,
                confirmed: false,
                wanted: true,
                named_by: None,
                resolver: None,
                waiters: Vec::new(),
                stats: TargetStats::default(),
            }),
            client_name: data.client_name.clone(),
            subscribe_failure_logged: Cell::new(false),
        })
    }

    /// Starts the resolver and the subscription (Sentinel only) on the current executor.
    pub fn spawn_tasks(self: &Rc<Self>) -> Vec<glommio::Task<()>> {
        if self.sentinel.is_none() {
            return Vec::new();
        }
        vec![
            glommio::spawn_local(run_resolver(self.clone())),
            glommio::spawn_local(run_subscription(self.clone())),
        ]
    }

    pub fn stats(&self) -> TargetStats {
        self.state.borrow().stats.clone()
    }

    /// The master to connect to and its generation; with Sentinel, waits until the sentinels
    /// named one (again, after [`Target::suspect`]).
    pub fn master(&self) -> impl std::future::Future<Output = (NodeAddr, u64)> + '_ {
        poll_fn(move |cx| {
            let mut state = self.state.borrow_mut();
            if state.confirmed {
                if let Some(master) = &state.master {
                    return Poll::Ready((master.clone(), state.generation));
                }
            }
            register(&mut state.waiters, cx);
            Poll::Pending
        })
    }

    /// Resolves once the master is no longer the one of `generation`. Never, for a fixed
    /// address.
    pub fn moved(&self, generation: u64) -> impl std::future::Future<Output = ()> + '_ {
        poll_fn(move |cx| {
            if self.sentinel.is_none() {
                return Poll::Pending;
            }
            let mut state = self.state.borrow_mut();
            if state.generation != generation {
                return Poll::Ready(());
            }
            register(&mut state.waiters, cx);
            Poll::Pending
        })
    }

    /// A connection to the master of `generation` failed (connect refused, a replica by
    /// `ROLE` or `READONLY`, lost, timed out): with Sentinel, new connections wait until the
    /// sentinels have been asked again. A report about an older generation is stale: ignored.
    /// A node that is not a master makes the sentinel that named it the last one asked.
    pub fn suspect(&self, generation: u64, why: &ValkeyError) {
        let Some(link) = &self.sentinel else {
            return;
        };
        let mut state = self.state.borrow_mut();
        if state.generation != generation || !state.confirmed {
            return;
        }
        if let (ValkeyError::NotMaster(_), Some(stale)) = (why, &state.named_by) {
            let mut order = link.order.borrow_mut();
            if let Some(at) = order.iter().position(|s| s == stale) {
                let last = order.remove(at);
                tracing::warn!(client = %self.client_name, sentinel = %last, master = ?state.stats.master, "the sentinel named a node that is not a master; asking it last");
                order.push(last);
            }
        }
        tracing::debug!(client = %self.client_name, master = ?state.stats.master, error = %why, "asking the sentinels for the master again");
        state.confirmed = false;
        state.wanted = true;
        if let Some(waker) = state.resolver.take() {
            waker.wake();
        }
    }

    /// Asks the resolver to check with the sentinels without doubting the current master
    /// (after subscribing: a switch may have been announced while nobody listened).
    fn want_check(&self) {
        let mut state = self.state.borrow_mut();
        state.wanted = true;
        if let Some(waker) = state.resolver.take() {
            waker.wake();
        }
    }

    /// Resolves (and clears the request) once the sentinels should be asked.
    fn wanted(&self) -> impl std::future::Future<Output = ()> + '_ {
        poll_fn(move |cx| {
            let mut state = self.state.borrow_mut();
            if state.wanted {
                state.wanted = false;
                return Poll::Ready(());
            }
            state.resolver = Some(cx.waker().clone());
            Poll::Pending
        })
    }

    /// The sentinels named `addr` (`source` says how, for the log; `named_by` which sentinel
    /// answered, when asked): connections go there from now on, and those to another address
    /// are dropped. Returns whether the address changed.
    fn settle(&self, addr: NodeAddr, source: &str, named_by: Option<NodeAddr>) -> bool {
        let mut state = self.state.borrow_mut();
        let state = &mut *state;
        state.named_by = named_by;
        let changed = state.master.as_ref() != Some(&addr);
        if changed {
            match &state.master {
                Some(old) => {
                    state.stats.failovers += 1;
                    tracing::warn!(client = %self.client_name, old = %old, new = %addr, source, "Valkey master changed: moving every connection to the new master");
                }
                None => {
                    tracing::info!(client = %self.client_name, master = %addr, source, "Valkey master found through Sentinel");
                }
            }
            state.stats.master = Some(addr.to_string());
            state.master = Some(addr);
            state.generation += 1;
        }
        state.confirmed = true;
        for waker in state.waiters.drain(..) {
            waker.wake();
        }
        changed
    }

    /// No sentinel gave a usable answer: ask again after the pause.
    fn ask_failed(&self, error: &ValkeyError, streak: u32) {
        let mut state = self.state.borrow_mut();
        state.stats.sentinel_errors += 1;
        state.wanted = true;
        if streak == 0 {
            tracing::warn!(client = %self.client_name, %error, "no sentinel named the Valkey master; asking again");
        } else {
            tracing::debug!(client = %self.client_name, %error, "still no master from the sentinels");
        }
    }

    fn subscription_failed(&self, error: &ValkeyError) {
        self.state.borrow_mut().stats.sentinel_errors += 1;
        if !self.subscribe_failure_logged.replace(true) {
            tracing::warn!(client = %self.client_name, %error, "cannot subscribe to +switch-master on any sentinel; retrying (failovers are still noticed by failed connections)");
        }
    }

    /// A message pushed on the subscription: a `+switch-master` for our master moves us.
    fn on_push(&self, link: &SentinelLink, frame: Reply) {
        let Some(items) = frame.into_array() else {
            return;
        };
        let [kind, channel, payload] = items.as_slice() else {
            return;
        };
        if kind.as_bytes() != Some(b"message") || channel.as_bytes() != Some(SWITCH_MASTER) {
            return;
        }
        let Some(text) = payload.as_str() else {
            return;
        };
        if let Some(new) = parse_switch_master(text, &link.master_name) {
            self.settle(new, "+switch-master", None);
        }
    }
}

/// The new master of a `+switch-master` message, if it is about `master_name`:
/// `<master-name> <old-ip> <old-port> <new-ip> <new-port>`.
fn parse_switch_master(text: &str, master_name: &str) -> Option<NodeAddr> {
    let fields: Vec<&str> = text.split_whitespace().collect();
    let [name, _, _, host, port] = fields.as_slice() else {
        return None;
    };
    if *name != master_name {
        return None;
    }
    Some(NodeAddr {
        host: (*host).to_owned(),
        port: port.parse().ok()?,
    })
}

/// The master address in a `GET-MASTER-ADDR-BY-NAME` reply: `[host, port]`, or nil when the
/// sentinel monitors no master of that name.
fn parse_master_addr(reply: &Reply, master_name: &str) -> Result<NodeAddr, ValkeyError> {
    if reply.is_nil() {
        return Err(ValkeyError::Server(format!(
            "the sentinel monitors no master named {master_name:?}"
        )));
    }
    let addr = reply.as_array().and_then(|items| match items {
        [host, port] => Some(NodeAddr {
            host: host.as_str()?.to_owned(),
            port: port.as_str()?.parse().ok()?,
        }),
        _ => None,
    });
    addr.ok_or_else(|| {
        ValkeyError::Server(format!(
            "unexpected GET-MASTER-ADDR-BY-NAME reply {reply:?}"
        ))
    })
}

impl SentinelLink {
    /// Asks each sentinel in turn for the master; the first answer wins and its sentinel goes
    /// first next time. Returns the master and who named it.
    async fn ask_master(&self) -> Result<(NodeAddr, NodeAddr), ValkeyError> {
        let candidates = self.order.borrow().clone();
        let mut errors = Vec::new();
        for (i, sentinel) in candidates.iter().enumerate() {
            match self.ask_one(sentinel).await {
                Ok(master) => {
                    if i > 0 {
                        let mut order = self.order.borrow_mut();
                        if let Some(at) = order.iter().position(|s| s == sentinel) {
                            let first = order.remove(at);
                            order.insert(0, first);
                        }
                    }
                    return Ok((master, sentinel.clone()));
                }
                Err(e) => errors.push(format!("{sentinel}: {e}")),
            }
        }
        Err(ValkeyError::Connect(format!(
            "no sentinel named master {:?}: {}",
            self.master_name,
            errors.join("; ")
        )))
    }

    async fn ask_one(&self, sentinel: &NodeAddr) -> Result<NodeAddr, ValkeyError> {
        let mut connection = self
            .connector
            .connect_to(&sentinel.host, sentinel.port)
            .await?;
        let reply = connection
            .call(&[
                b"SENTINEL",
                b"GET-MASTER-ADDR-BY-NAME",
                self.master_name.as_bytes(),
            ])
            .await?;
        parse_master_addr(&reply, &self.master_name)
    }

    /// A connection subscribed to `+switch-master` on the first sentinel (in order, `avoid`
    /// last) that takes it.
    async fn subscribe(
        &self,
        avoid: Option<&NodeAddr>,
    ) -> Result<(Connection, NodeAddr), ValkeyError> {
        let mut candidates = self.order.borrow().clone();
        if let Some(at) = avoid.and_then(|a| candidates.iter().position(|s| s == a)) {
            let last = candidates.remove(at);
            candidates.push(last);
        }
        let mut subscribe = BytesMut::new();
        encode_command(&mut subscribe, &[b"SUBSCRIBE", SWITCH_MASTER]);
        let timeout = self.connector.config().command_timeout;
        let mut errors = Vec::new();
        for sentinel in candidates {
            let attempt = async {
                let mut connection = self
                    .connector
                    .connect_to(&sentinel.host, sentinel.port)
                    .await?;
                connection.send(&subscribe).await?;
                let confirmation =
                    with_timeout(timeout, "subscribing", connection.next_frame()).await?;
                let confirmed = confirmation.as_array().is_some_and(|items| {
                    items.first().and_then(Reply::as_bytes) == Some(b"subscribe")
                        && items.get(1).and_then(Reply::as_bytes) == Some(SWITCH_MASTER)
                });
                if !confirmed {
                    return Err(ValkeyError::Server(format!(
                        "unexpected SUBSCRIBE reply {confirmation:?}"
                    )));
                }
                Ok(connection)
            };
            match attempt.await {
                Ok(connection) => return Ok((connection, sentinel)),
                Err(e) => errors.push(format!("{sentinel}: {e}")),
            }
        }
        Err(ValkeyError::Connect(errors.join("; ")))
    }
}

/// Asks the sentinels whenever a driver or the subscription wants it, pausing after each
/// question (see [`RESOLVE_PAUSE`]).
async fn run_resolver(target: Rc<Target>) {
    let Some(link) = &target.sentinel else {
        return;
    };
    // Questions in a row that did not move us anywhere new (or failed): the pause doubles.
    let mut streak: u32 = 0;
    loop {
        let idle_since = Instant::now();
        target.wanted().await;
        if idle_since.elapsed() >= RESOLVE_PAUSE.1 {
            streak = 0;
        }
        match link.ask_master().await {
            Ok((master, sentinel)) => {
                if target.settle(master, "sentinel", Some(sentinel)) {
                    streak = 0;
                } else {
                    streak = streak.saturating_add(1);
                }
            }
            Err(error) => {
                target.ask_failed(&error, streak);
                streak = streak.saturating_add(1);
            }
        }
        let pause = backoff_delay(RESOLVE_PAUSE.0, RESOLVE_PAUSE.1, streak.max(1));
        glommio::timer::sleep(pause).await;
    }
}

/// Keeps one connection subscribed to `+switch-master`, on another sentinel whenever the
/// current one fails.
async fn run_subscription(target: Rc<Target>) {
    let Some(link) = &target.sentinel else {
        return;
    };
    let mut failures: u32 = 0;
    let mut avoid: Option<NodeAddr> = None;
    loop {
        if failures > 0 {
            let delay = backoff_delay(SUBSCRIBE_BACKOFF.0, SUBSCRIBE_BACKOFF.1, failures);
            glommio::timer::sleep(delay).await;
        }
        let (mut connection, sentinel) = match link.subscribe(avoid.as_ref()).await {
            Ok(subscribed) => subscribed,
            Err(error) => {
                target.subscription_failed(&error);
                failures = failures.saturating_add(1);
                continue;
            }
        };
        target.subscribe_failure_logged.set(false);
        tracing::info!(client = %target.client_name, %sentinel, "subscribed to +switch-master");
        target.want_check();
        let since = Instant::now();
        let error = listen(&target, link, &mut connection).await;
        drop(connection);
        target.state.borrow_mut().stats.sentinel_errors += 1;
        tracing::warn!(client = %target.client_name, %sentinel, %error, "lost the sentinel subscription; subscribing on another sentinel");
        avoid = Some(sentinel);
        failures = if since.elapsed() >= STABLE_SUBSCRIPTION {
            0
        } else {
            failures.saturating_add(1)
        };
    }
}

/// Reads the subscription's messages until the connection fails or stays silent past
/// [`SUBSCRIPTION_PING`] plus the command timeout; returns why it ended.
async fn listen(target: &Target, link: &SentinelLink, connection: &mut Connection) -> ValkeyError {
    let mut ping = BytesMut::new();
    encode_command(&mut ping, &[b"PING"]);
    let silence = SUBSCRIPTION_PING + link.connector.config().command_timeout;
    let mut last_heard = Instant::now();
    let mut next_ping = last_heard + SUBSCRIPTION_PING;
    loop {
        let now = Instant::now();
        let deadline = last_heard + silence;
        if now >= deadline {
            return ValkeyError::Timeout("on a silent sentinel subscription");
        }
        if now >= next_ping {
            if let Err(error) = connection.send(&ping).await {
                return error;
            }
            next_ping = now + SUBSCRIPTION_PING;
            continue;
        }
        let wake_in = next_ping.min(deadline) - now;
        let frame =
            futures_lite::future::or(async { Some(connection.next_frame().await) }, async {
                glommio::timer::sleep(wake_in).await;
                None
            })
            .await;
        match frame {
            None => {}
            Some(Err(error)) => return error,
            Some(Ok(frame)) => {
                last_heard = Instant::now();
                target.on_push(link, frame);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use bytes::Bytes;

    use super::*;

    fn bulk(text: &str) -> Reply {
        Reply::Bulk(Bytes::copy_from_slice(text.as_bytes()))
    }

    #[test]
    fn switch_master_is_parsed_only_for_our_master() {
        assert_eq!(
            parse_switch_master("pulsar 10.0.0.1 6379 10.0.0.2 6380", "pulsar"),
            Some(NodeAddr {
                host: "10.0.0.2".to_owned(),
                port: 6380
            })
        );
        assert_eq!(
            parse_switch_master("other 10.0.0.1 6379 10.0.0.2 6380", "pulsar"),
            None
        );
        assert_eq!(parse_switch_master("pulsar 10.0.0.1 6379", "pulsar"), None);
        assert_eq!(
            parse_switch_master("pulsar 10.0.0.1 6379 10.0.0.2 notaport", "pulsar"),
            None
        );
    }

    #[test]
    fn master_addr_reply_is_parsed() {
        let reply = Reply::Array(vec![bulk("127.0.0.1"), bulk("7001")]);
        assert_eq!(
            parse_master_addr(&reply, "m"),
            Ok(NodeAddr {
                host: "127.0.0.1".to_owned(),
                port: 7001
            })
        );
        assert!(parse_master_addr(&Reply::Nil, "m").is_err());
        assert!(parse_master_addr(&Reply::Array(vec![bulk("h")]), "m").is_err());
        assert!(parse_master_addr(&Reply::Integer(1), "m").is_err());
    }

    #[test]
    fn addresses_display_ipv6_in_brackets() {
        let v6 = NodeAddr {
            host: "::1".to_owned(),
            port: 26379,
        };
        assert_eq!(v6.to_string(), "[::1]:26379");
    }

    #[test]
    fn config_debug_redacts_password() {
        let config = SentinelConfig {
            sentinels: vec![],
            master_name: "m".to_owned(),
            username: None,
            password: Some("hunter2".to_owned()),
        };
        assert!(!format!("{config:?}").contains("hunter2"));
    }
}
