//! Valkey Sentinel for the black-box tests: one master, its replicas (`--replicaof`) and a
//! set of sentinels (`valkey-server <sentinel.conf> --sentinel`: the Debian `valkey-server`
//! package has it, no `valkey-sentinel` package needed), each a real child process (a
//! [`ValkeyServer`]) on a free port with its own directory and generated `sentinel.conf`.
//!
//! Owns: starting the set in an order that needs no waiting on Sentinel's discovery timers,
//! asking a sentinel for the master, the faults a test injects (kill -9 a data node or a
//! sentinel, restart it) and the awaits after them. Every await polls a condition until it
//! holds or a deadline passes; "healthy" is one condition (see [`SentinelSet::await_healthy`])
//! that a failover and a rejoin are awaited with. Does not own: Sentinel support in the relay
//! (other work); the tests compare what the relay does with what the sentinels say.
//!
//! Data nodes are named by index (0 is the first master, then the replicas) and sentinels by
//! their own index; both stay stable across kills and restarts (same port, same directory).
//! Dropping the set kills every process by PID and removes its directory, also on a panic.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use serde_json::Value;

use super::valkey::{ValkeyOpts, ValkeyServer};

/// A failover (down-after + agreement + election + promotion) or a rejoin (reconnect, a role
/// check after 4 publish periods, `REPLICAOF`, a full sync) takes seconds; 30 s absorbs a
/// loaded two-core CI machine.
const SENTINEL_DEADLINE: Duration = Duration::from_secs(30);

/// Lines of each process's log shown when an await fails.
const LOG_TAIL_LINES: usize = 15;

/// How to start a Sentinel set.
#[derive(Clone, Debug)]
pub struct SentinelOpts {
    /// The name the sentinels monitor the master under.
    pub master_name: String,
    /// Replicas of the first master.
    pub replicas: usize,
    pub sentinels: usize,
    /// Sentinels that must agree the master is down before a failover.
    pub quorum: usize,
    /// `down-after-milliseconds`: how long the master may not answer before it is suspected.
    pub down_after: Duration,
    /// `failover-timeout`: bounds a failover's steps and the wait before a failed one is
    /// retried (twice this), so a split vote costs 2 × this.
    pub failover_timeout: Duration,
    /// `SENTINEL DEBUG info-period` (Valkey's default: 10 s): how often a sentinel reads a
    /// node's `INFO`, which is how it notices a restarted old master still claiming the master
    /// role (and, after a wait of 4 publish periods, turns it into a replica).
    pub info_period: Duration,
    /// `SENTINEL DEBUG publish-period` (default 2 s): hello messages, by which sentinels find
    /// each other, and a quarter of the wait above.
    pub publish_period: Duration,
}

impl Default for SentinelOpts {
    /// One replica, three sentinels, quorum 2, failover after 1 s of silence; the info and
    /// publish periods shortened (as Valkey's own Sentinel tests do) so a restarted old master
    /// is turned into a replica in about 3 s instead of about 18 s.
    fn default() -> SentinelOpts {
        SentinelOpts {
            master_name: "pulsar".to_string(),
            replicas: 1,
            sentinels: 3,
            quorum: 2,
            down_after: Duration::from_millis(1000),
            failover_timeout: Duration::from_millis(3000),
            info_period: Duration::from_millis(1000),
            publish_period: Duration::from_millis(500),
        }
    }
}

/// A master, its replicas and the sentinels watching them; all killed when dropped.
pub struct SentinelSet {
    /// Data nodes by index: 0 started as master, the others as its replicas.
    data: Vec<ValkeyServer>,
    /// Sentinels by index.
    sentinels: Vec<ValkeyServer>,
    opts: SentinelOpts,
}

impl SentinelSet {
    /// Starts the master, its replicas (and waits until they are in sync), then the sentinels,
    /// and waits until every sentinel knows the master, every replica and every other sentinel.
    /// Replicas first: a sentinel learns of replicas from the master's `INFO`, so one started
    /// before the replicas attached would only learn of them one info period later.
    pub fn start(opts: SentinelOpts) -> SentinelSet {
        assert!(
            opts.quorum >= 1 && opts.quorum <= opts.sentinels,
            "test bug: quorum {} of {} sentinels",
            opts.quorum,
            opts.sentinels
        );
        // No diskless sync delay: a master otherwise waits 5 s for more replicas before the
        // first full sync of each (at start-up, and for an old master rejoining).
        let data_opts = ValkeyOpts {
            extra_args: vec!["--repl-diskless-sync-delay".into(), "0".into()],
            ..ValkeyOpts::default()
        };
        let master = ValkeyServer::start(data_opts.clone());
        let master_port = master.port.to_string();
        let mut data = vec![master];
        for _ in 0..opts.replicas {
            let mut replica_opts = data_opts.clone();
            replica_opts.extra_args.extend([
                "--replicaof".to_string(),
                "127.0.0.1".to_string(),
                master_port.clone(),
            ]);
            data.push(ValkeyServer::start(replica_opts));
        }
        let mut set = SentinelSet {
            data,
            sentinels: Vec::new(),
            opts,
        };
        set.await_condition("replicas in sync", |set| {
            set.check_data_nodes(0)?;
            Ok(())
        });
        let conf = set.sentinel_conf(&master_port);
        for _ in 0..set.opts.sentinels {
            let sentinel = ValkeyServer::start(ValkeyOpts {
                appendonly: false,
                sentinel_conf: Some(conf.clone()),
                ..ValkeyOpts::default()
            });
            set.sentinels.push(sentinel);
            set.tune_timers(set.sentinels.len() - 1);
        }
        let master = set.await_healthy();
        assert_eq!(master, 0, "the first master changed during start-up");
        set
    }

    pub fn master_name(&self) -> &str {
        &self.opts.master_name
    }

    /// Number of data nodes (master and replicas, running or not).
    pub fn data_len(&self) -> usize {
        self.data.len()
    }

    /// Data node `i` (0 started as the master).
    pub fn data_node(&self, i: usize) -> &ValkeyServer {
        &self.data[i]
    }

    pub fn sentinel_len(&self) -> usize {
        self.sentinels.len()
    }

    /// Sentinel `s` (its `cli` speaks to the sentinel: `SENTINEL ...`).
    pub fn sentinel(&self, s: usize) -> &ValkeyServer {
        &self.sentinels[s]
    }

    /// Every sentinel's address, running or not (what a Sentinel client is configured with).
    pub fn sentinel_addrs(&self) -> Vec<SocketAddr> {
        self.sentinels.iter().map(ValkeyServer::addr).collect()
    }

    /// `SENTINEL GET-MASTER-ADDR-BY-NAME` on sentinel `s` (`None`: it knows no such master).
    pub fn master_addr_from(&self, s: usize) -> Option<SocketAddr> {
        self.try_master_addr_from(s)
            .unwrap_or_else(|e| panic!("GET-MASTER-ADDR-BY-NAME on sentinel {s}: {e}"))
    }

    /// The data node the first running sentinel names as master.
    pub fn current_master(&self) -> usize {
        let s = (0..self.sentinel_len())
            .find(|&s| self.sentinels[s].is_running())
            .expect("no sentinel is running");
        let addr = self
            .master_addr_from(s)
            .unwrap_or_else(|| panic!("sentinel {s} knows no master"));
        self.data_index(addr.port())
            .unwrap_or_else(|| panic!("sentinel {s} names {addr}, not one of the data nodes"))
    }

    /// `role` from data node `i`'s `INFO replication`: `master` or `slave`.
    pub fn role(&self, i: usize) -> String {
        self.data[i]
            .info_field("replication", "role")
            .unwrap_or_else(|| panic!("data node {i}: no role in INFO replication"))
    }

    /// SIGKILLs data node `i`.
    pub fn kill9_data(&mut self, i: usize) {
        self.data[i].kill9();
    }

    /// Restarts data node `i` as it was first started (an old master as a master with its AOF,
    /// a replica with its `--replicaof`) and waits until the set is healthy with it: the
    /// sentinels turn a stale master into a replica of the current one. Returns the master.
    pub fn restart_data(&mut self, i: usize) -> usize {
        self.data[i].restart();
        self.await_healthy()
    }

    /// SIGKILLs sentinel `s`.
    pub fn kill9_sentinel(&mut self, s: usize) {
        self.sentinels[s].kill9();
    }

    /// Restarts sentinel `s` from its (Sentinel-rewritten) config and waits until healthy.
    pub fn restart_sentinel(&mut self, s: usize) -> usize {
        self.sentinels[s].restart();
        self.tune_timers(s);
        self.await_healthy()
    }

    /// Kills the current master and waits for the failover; returns the new master.
    pub fn kill9_master_and_await_failover(&mut self) -> usize {
        let old = self.current_master();
        self.kill9_data(old);
        self.await_failover(old)
    }

    /// Waits until the set is healthy with a master other than `old`; returns it.
    pub fn await_failover(&self, old: usize) -> usize {
        let what = format!("failed over from data node {old}");
        self.await_condition(&what, |set| {
            let master = set.healthy_master()?;
            if master == old {
                return Err(format!("data node {old} is still the master"));
            }
            Ok(master)
        })
    }

    /// Waits until the set is healthy and returns its master. Healthy: every running sentinel
    /// names the same running data node as master, sees it up (flags exactly `master`), knows
    /// every other sentinel, lists every running data node but the master as a replica that
    /// is up, and has a quorum (`CKQUORUM`); that node says `role:master`, and every other
    /// running data node says `role:slave` of it with its link up.
    pub fn await_healthy(&self) -> usize {
        self.await_condition("healthy", SentinelSet::healthy_master)
    }

    // --- internals ---

    fn sentinel_conf(&self, master_port: &str) -> String {
        let name = &self.opts.master_name;
        format!(
            "sentinel monitor {name} 127.0.0.1 {master_port} {quorum}\n\
             sentinel down-after-milliseconds {name} {down_after}\n\
             sentinel failover-timeout {name} {failover_timeout}\n\
             sentinel parallel-syncs {name} 1\n",
            quorum = self.opts.quorum,
            down_after = self.opts.down_after.as_millis(),
            failover_timeout = self.opts.failover_timeout.as_millis(),
        )
    }

    /// `SENTINEL DEBUG` settings are not saved to the config: applied after every start.
    fn tune_timers(&self, s: usize) {
        let info = self.opts.info_period.as_millis().to_string();
        let publish = self.opts.publish_period.as_millis().to_string();
        let reply = self.sentinels[s].cli_json(&[
            "SENTINEL",
            "DEBUG",
            "info-period",
            &info,
            "publish-period",
            &publish,
        ]);
        assert_eq!(reply, Value::from("OK"), "SENTINEL DEBUG on sentinel {s}");
    }

    fn data_index(&self, port: u16) -> Option<usize> {
        self.data.iter().position(|n| n.port == port)
    }

    fn try_master_addr_from(&self, s: usize) -> Result<Option<SocketAddr>, String> {
        let name = self.opts.master_name.as_str();
        let reply =
            self.sentinels[s].try_cli_json(&["SENTINEL", "GET-MASTER-ADDR-BY-NAME", name])?;
        if reply.is_null() {
            return Ok(None);
        }
        let addr = reply
            .as_array()
            .and_then(|a| Some(format!("{}:{}", a.first()?.as_str()?, a.get(1)?.as_str()?)))
            .and_then(|a| a.parse().ok())
            .ok_or_else(|| format!("GET-MASTER-ADDR-BY-NAME reply {reply}"))?;
        Ok(Some(addr))
    }

    fn try_replication(&self, i: usize) -> Result<HashMap<String, String>, String> {
        let text = self.data[i].try_cli(&["INFO", "replication"])?;
        Ok(text
            .lines()
            .filter_map(|l| l.trim().split_once(':'))
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect())
    }

    /// Checks that data node `master` says `role:master` and every other running data node is
    /// its replica with the link up.
    fn check_data_nodes(&self, master: usize) -> Result<(), String> {
        let field = |info: &HashMap<String, String>, name: &str| {
            info.get(name)
                .cloned()
                .unwrap_or_else(|| "(missing)".into())
        };
        let info = self.try_replication(master)?;
        if field(&info, "role") != "master" {
            return Err(format!("data node {master}: role:{}", field(&info, "role")));
        }
        let master_port = self.data[master].port.to_string();
        for i in (0..self.data_len()).filter(|&i| i != master && self.data[i].is_running()) {
            let info = self.try_replication(i)?;
            let seen = (
                field(&info, "role"),
                field(&info, "master_port"),
                field(&info, "master_link_status"),
            );
            if seen != ("slave".into(), master_port.clone(), "up".into()) {
                return Err(format!(
                    "data node {i}: (role, master_port, master_link_status) = {seen:?}, \
                     want a replica of port {master_port} with the link up"
                ));
            }
        }
        Ok(())
    }

    /// The master, if the set is healthy (see [`SentinelSet::await_healthy`]); otherwise the
    /// first thing found wrong.
    fn healthy_master(&self) -> Result<usize, String> {
        let name = self.opts.master_name.as_str();
        let mut master: Option<usize> = None;
        for s in (0..self.sentinel_len()).filter(|&s| self.sentinels[s].is_running()) {
            let sentinel = &self.sentinels[s];
            let addr = self
                .try_master_addr_from(s)?
                .ok_or_else(|| format!("sentinel {s} knows no master {name}"))?;
            let named = self
                .data_index(addr.port())
                .ok_or_else(|| format!("sentinel {s} names {addr}, not a data node"))?;
            match master {
                None => master = Some(named),
                Some(m) if m != named => {
                    return Err(format!(
                        "sentinels disagree: data node {m} vs {named} (sentinel {s})"
                    ))
                }
                Some(_) => {}
            }
            if !self.data[named].is_running() {
                return Err(format!("sentinel {s} names stopped data node {named}"));
            }
            let state = sentinel.try_cli_json(&["SENTINEL", "MASTER", name])?;
            let text = |v: &Value, key: &str| v[key].as_str().unwrap_or("(missing)").to_string();
            if text(&state, "flags") != "master" {
                return Err(format!(
                    "sentinel {s}: master flags {}",
                    text(&state, "flags")
                ));
            }
            let others = (self.sentinel_len() - 1).to_string();
            if text(&state, "num-other-sentinels") != others {
                return Err(format!(
                    "sentinel {s} knows {} other sentinels, want {others}",
                    text(&state, "num-other-sentinels")
                ));
            }
            let replicas = sentinel.try_cli_json(&["SENTINEL", "REPLICAS", name])?;
            let replicas = replicas
                .as_array()
                .ok_or_else(|| format!("sentinel {s}: SENTINEL REPLICAS {replicas}"))?;
            for i in (0..self.data_len()).filter(|&i| i != named && self.data[i].is_running()) {
                let port = self.data[i].port.to_string();
                let entry = replicas
                    .iter()
                    .find(|r| text(r, "port") == port)
                    .ok_or_else(|| format!("sentinel {s} does not list data node {i}"))?;
                if text(entry, "flags") != "slave" {
                    return Err(format!(
                        "sentinel {s}: data node {i} flags {}",
                        text(entry, "flags")
                    ));
                }
            }
            let quorum = sentinel.try_cli_json(&["SENTINEL", "CKQUORUM", name])?;
            if !quorum.as_str().is_some_and(|q| q.starts_with("OK")) {
                return Err(format!("sentinel {s}: CKQUORUM {quorum}"));
            }
        }
        let master = master.ok_or("no sentinel is running")?;
        self.check_data_nodes(master)?;
        Ok(master)
    }

    /// Polls `cond` until it returns `Ok`; panics after [`SENTINEL_DEADLINE`] with its last
    /// error and the end of every log.
    fn await_condition<T>(
        &self,
        what: &str,
        mut cond: impl FnMut(&SentinelSet) -> Result<T, String>,
    ) -> T {
        let deadline = Instant::now() + SENTINEL_DEADLINE;
        loop {
            let last = match cond(self) {
                Ok(v) => return v,
                Err(e) => e,
            };
            assert!(
                Instant::now() < deadline,
                "sentinel set not {what} within {SENTINEL_DEADLINE:?}; last: {last}\n{}",
                self.log_tails()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// The end of every process's log, for failure messages.
    fn log_tails(&self) -> String {
        let data = self
            .data
            .iter()
            .enumerate()
            .map(|(i, n)| n.log_tail(&format!("data node {i}"), LOG_TAIL_LINES));
        let sentinels = self
            .sentinels
            .iter()
            .enumerate()
            .map(|(s, n)| n.log_tail(&format!("sentinel {s}"), LOG_TAIL_LINES));
        data.chain(sentinels).collect()
    }
}
