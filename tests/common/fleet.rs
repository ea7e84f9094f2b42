//! Several relays on one Valkey for the black-box tests: K `pulsar-relay` processes (each a
//! [`Server`] with its own ephemeral port and temp directory) pointed at the same
//! [`ValkeyServer`] (or the same [`ValkeyCluster`]).
//!
//! Owns: starting the fleet and waiting until every relay is ready, their addresses, and the
//! faults a test injects on one relay (kill -9 by PID, SIGTERM, start it again on its port).
//! Does not own: what a relay does with the other relays' messages (that is what the tests
//! check) or Valkey's lifecycle ([`ValkeyServer`]). Dropping the fleet kills every relay by PID
//! and removes its directory, also on a panic.

use std::net::SocketAddr;
use std::time::Duration;

use super::cluster::ValkeyCluster;
use super::valkey::{await_ready, ValkeyServer};
use super::{RelayOpts, Server};

/// A relay starts and connects to Valkey in milliseconds; 20 s absorbs a loaded CI machine.
const RELAY_READY_DEADLINE: Duration = Duration::from_secs(20);

/// K relays on one Valkey.
pub struct RelayFleet {
    /// By index, stable across kills and restarts (a restarted relay keeps its address).
    relays: Vec<Server>,
}

impl RelayFleet {
    /// Starts `count` 2-shard relays on `valkey`, each with `config_yaml` and `extra_env`,
    /// and waits until every one is ready.
    pub fn start(
        valkey: &ValkeyServer,
        count: usize,
        config_yaml: &str,
        extra_env: &[(&str, &str)],
    ) -> RelayFleet {
        let relays = (0..count)
            .map(|_| valkey.start_relay(config_yaml, extra_env))
            .collect();
        RelayFleet { relays }
    }

    /// Like [`RelayFleet::start`] with `shards` shards per relay.
    pub fn start_with_shards(
        valkey: &ValkeyServer,
        count: usize,
        shards: usize,
        config_yaml: &str,
        extra_env: &[(&str, &str)],
    ) -> RelayFleet {
        RelayFleet::start_with_env(&valkey.relay_env(), count, shards, config_yaml, extra_env)
    }

    /// `count` 2-shard relays on a Valkey Cluster, every node given as a seed.
    pub fn start_on_cluster(
        cluster: &ValkeyCluster,
        count: usize,
        config_yaml: &str,
        extra_env: &[(&str, &str)],
    ) -> RelayFleet {
        RelayFleet::start_with_env(&cluster.relay_env(), count, 2, config_yaml, extra_env)
    }

    fn start_with_env(
        valkey_env: &[(String, String)],
        count: usize,
        shards: usize,
        config_yaml: &str,
        extra_env: &[(&str, &str)],
    ) -> RelayFleet {
        let relays = (0..count)
            .map(|_| {
                let mut opts = RelayOpts {
                    shards,
                    ..RelayOpts::new(config_yaml)
                }
                .envs(valkey_env);
                for (k, v) in extra_env {
                    opts = opts.env(k, v);
                }
                let relay = Server::start_opts(opts);
                await_ready(&relay, RELAY_READY_DEADLINE);
                relay
            })
            .collect();
        RelayFleet { relays }
    }

    pub fn len(&self) -> usize {
        self.relays.len()
    }

    /// Relay `i` (its HTTP helpers, `addr`, `pid`, `stderr`...).
    pub fn relay(&self, i: usize) -> &Server {
        &self.relays[i]
    }

    /// Relay `i`, to stop or restart it by hand.
    pub fn relay_mut(&mut self, i: usize) -> &mut Server {
        &mut self.relays[i]
    }

    /// Every relay's address, running or not, by index.
    pub fn addrs(&self) -> Vec<SocketAddr> {
        self.relays.iter().map(|r| r.addr).collect()
    }

    /// The addresses of the relays that have not been stopped.
    pub fn running_addrs(&self) -> Vec<SocketAddr> {
        self.relays
            .iter()
            .filter(|r| r.is_running())
            .map(|r| r.addr)
            .collect()
    }

    /// SIGKILLs relay `i` (by its PID) and reaps it.
    pub fn kill9(&mut self, i: usize) {
        self.relays[i].kill9();
    }

    /// Starts stopped relay `i` again on its address and waits until it is ready.
    pub fn restart(&mut self, i: usize) {
        self.relays[i].start_again();
        await_ready(&self.relays[i], RELAY_READY_DEADLINE);
    }

    /// Waits until every running relay answers `/ready` with 200.
    pub fn await_all_ready(&self) {
        for relay in self.relays.iter().filter(|r| r.is_running()) {
            await_ready(relay, RELAY_READY_DEADLINE);
        }
    }
}
