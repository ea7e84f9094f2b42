//! The shard's pub/sub connections in Valkey Cluster mode: one per master, each channel
//! `SSUBSCRIBE`d on the master owning its slot (a shard channel lives on that node only), and
//! channels moved when their slots move.
//!
//! Owns: which node each wanted channel is subscribed on (from the client's slot map,
//! [`Topology`]), one connection per master that has wanted channels (the parent module's
//! connection loop, fed the node's share of the channels), and the coordinator task that
//! hears what those connections report and keeps the listener's picture right.
//!
//! The listener (the stream sync) knows one rule: a confirmation ([`PushEvent::Subscribed`])
//! holds until the next [`PushEvent::Lost`]. Several connections keep it true by being
//! conservative: whenever any subscription may have missed messages (a node's connection
//! lost, a channel moved to another node, Valkey unsubscribing a channel whose slot left its
//! node, a `MOVED` refusal), the coordinator reports `Lost` and subscribes every wanted
//! channel again on its current node, so every channel is confirmed anew (Valkey answers a
//! repeated `SSUBSCRIBE` with a confirmation) and the listener repairs each topic from its
//! stream. A topology change costs one `SSUBSCRIBE` per followed topic.
//!
//! Does not own the slot map (refreshed by the client's topology task; a `MOVED` or a
//! server-side unsubscription asks it for a refresh) nor what messages mean.

use std::cell::RefCell;
use std::collections::{HashMap, HashSet};
use std::rc::Rc;

use bytes::Bytes;
use futures::channel::mpsc;
use futures::StreamExt;
use glommio::Task;

use super::super::cluster::{redirect_of, slot_of, Redirect, Topology};
use super::super::codec::{encode_command, Reply};
use super::super::connection::{ConnectConfig, Connector};
use super::super::{NodeAddr, ValkeyError};
use super::{run, wake, Inner, PushEvent, Sink, SubscriberStats};

/// What one node's connection reports to the coordinator.
pub(super) enum NodeEvent {
    Push(NodeAddr, PushEvent),
    /// An error reply to a command on that node (`MOVED`: the channel's slot is elsewhere).
    Refused(NodeAddr, String),
    /// A channel is no longer subscribed there (ours, or Valkey's when its slot left).
    Unsubscribed(NodeAddr, Bytes),
}

/// One master's connection.
struct NodeSubscription {
    inner: Rc<RefCell<Inner>>,
    /// Dropping it stops the connection.
    _task: Task<()>,
}

struct State {
    /// Every channel the shard wants.
    wanted: HashSet<Bytes>,
    nodes: HashMap<NodeAddr, NodeSubscription>,
    /// The slot map generation the channels were last placed by.
    generation: u64,
    /// Counters of connections that no longer exist.
    retired: SubscriberStats,
}

/// See the module doc.
pub(super) struct ClusterSubscriber {
    topology: Rc<Topology>,
    connector: Rc<Connector>,
    to_coordinator: mpsc::UnboundedSender<NodeEvent>,
    state: RefCell<State>,
    coordinator: RefCell<Option<Task<()>>>,
}

impl ClusterSubscriber {
    pub(super) fn start(
        connect: ConnectConfig,
        topology: Rc<Topology>,
    ) -> Result<(Rc<ClusterSubscriber>, mpsc::UnboundedReceiver<PushEvent>), ValkeyError> {
        let connector = Rc::new(Connector::new(connect)?);
        let (to_listener, receiver) = mpsc::unbounded();
        let (to_coordinator, from_nodes) = mpsc::unbounded();
        let subscriber = Rc::new(ClusterSubscriber {
            topology,
            connector,
            to_coordinator,
            state: RefCell::new(State {
                wanted: HashSet::new(),
                nodes: HashMap::new(),
                generation: 0,
                retired: SubscriberStats::default(),
            }),
            coordinator: RefCell::new(None),
        });
        let task = glommio::spawn_local(coordinate(
            Rc::downgrade(&subscriber),
            from_nodes,
            to_listener,
        ));
        *subscriber.coordinator.borrow_mut() = Some(task);
        Ok((subscriber, receiver))
    }

    /// The master `channel` is subscribed on: the one owning its slot (the channel shares the
    /// topic's hash tag), if the map is known.
    fn node_of(&self, channel: &[u8]) -> Option<NodeAddr> {
        self.topology.node_of(slot_of(channel))
    }

    pub(super) fn subscribe(&self, channel: Bytes) {
        let mut state = self.state.borrow_mut();
        if !state.wanted.insert(channel.clone()) {
            return;
        }
        // Without a map yet, placed when the first one arrives.
        if let Some(node) = self.node_of(&channel) {
            self.place(&mut state, node, channel);
        }
    }

    pub(super) fn unsubscribe(&self, channel: &[u8]) {
        let mut state = self.state.borrow_mut();
        if !state.wanted.remove(channel) {
            return;
        }
        for sub in state.nodes.values() {
            let mut inner = sub.inner.borrow_mut();
            if inner.wanted.remove(channel) && inner.connected {
                encode_command(&mut inner.outbox, &[b"SUNSUBSCRIBE", channel]);
                wake(&mut inner);
            }
        }
    }

    /// Adds `channel` to `node`'s connection (opened now if it has none).
    fn place(&self, state: &mut State, node: NodeAddr, channel: Bytes) {
        let sub = state.nodes.entry(node.clone()).or_insert_with(|| {
            let inner = Rc::new(RefCell::new(Inner::new()));
            let task = glommio::spawn_local(run(
                inner.clone(),
                self.connector.clone(),
                Some(node.clone()),
                Sink::Node {
                    node,
                    events: self.to_coordinator.clone(),
                },
            ));
            NodeSubscription { inner, _task: task }
        });
        let mut inner = sub.inner.borrow_mut();
        if inner.wanted.insert(channel.clone()) && inner.connected {
            encode_command(&mut inner.outbox, &[b"SSUBSCRIBE", &channel]);
            wake(&mut inner);
        }
    }

    /// Puts every wanted channel on the node the current map names, moving those that moved
    /// (unsubscribed where they were) and closing connections left without channels. True if
    /// any channel moved or was placed for the first time.
    fn replace_channels(&self) -> bool {
        let mut state = self.state.borrow_mut();
        state.generation = self.topology.generation();
        let wanted: Vec<Bytes> = state.wanted.iter().cloned().collect();
        let mut moved = false;
        for channel in wanted {
            let Some(target) = self.node_of(&channel) else {
                continue;
            };
            let mut placed = false;
            for (node, sub) in &state.nodes {
                let mut inner = sub.inner.borrow_mut();
                if !inner.wanted.contains(&channel) {
                    continue;
                }
                if *node == target {
                    placed = true;
                } else {
                    inner.wanted.remove(&channel);
                    if inner.connected {
                        encode_command(&mut inner.outbox, &[b"SUNSUBSCRIBE", &channel]);
                        wake(&mut inner);
                    }
                }
            }
            if !placed {
                moved = true;
                self.place(&mut state, target, channel);
            }
        }
        let state = &mut *state;
        let retired = &mut state.retired;
        state.nodes.retain(|_, sub| {
            let inner = sub.inner.borrow();
            let keep = !inner.wanted.is_empty();
            if !keep {
                retired.connects += inner.stats.connects;
                retired.lost += inner.stats.lost;
                retired.messages += inner.stats.messages;
            }
            keep
        });
        moved
    }

    /// Subscribes every wanted channel again on its connection, so each is confirmed anew
    /// after a `Lost` (connections that are down do so when they reconnect).
    fn resubscribe_all(&self) {
        let state = self.state.borrow();
        for sub in state.nodes.values() {
            let mut inner = sub.inner.borrow_mut();
            if !inner.connected {
                continue;
            }
            let inner = &mut *inner;
            for channel in &inner.wanted {
                encode_command(&mut inner.outbox, &[b"SSUBSCRIBE", channel]);
            }
            wake(inner);
        }
    }

    pub(super) fn is_connected(&self) -> bool {
        let state = self.state.borrow();
        state.nodes.values().all(|sub| sub.inner.borrow().connected)
    }

    pub(super) fn wanted(&self) -> usize {
        self.state.borrow().wanted.len()
    }

    pub(super) fn stats(&self) -> SubscriberStats {
        let state = self.state.borrow();
        let mut stats = state.retired;
        for sub in state.nodes.values() {
            let inner = sub.inner.borrow();
            stats.connects += inner.stats.connects;
            stats.lost += inner.stats.lost;
            stats.messages += inner.stats.messages;
        }
        stats
    }

    pub(super) async fn shutdown(&self) {
        let coordinator = self.coordinator.borrow_mut().take();
        if let Some(task) = coordinator {
            task.cancel().await;
        }
        let nodes = std::mem::take(&mut self.state.borrow_mut().nodes);
        for (_, sub) in nodes {
            sub._task.cancel().await;
        }
    }
}

/// The coordinator: forwards what the connections report, and after anything that may have
/// lost messages reports `Lost` and has every channel confirmed again; places channels anew
/// whenever the slot map changes.
async fn coordinate(
    subscriber: std::rc::Weak<ClusterSubscriber>,
    mut from_nodes: mpsc::UnboundedReceiver<NodeEvent>,
    to_listener: mpsc::UnboundedSender<PushEvent>,
) {
    loop {
        let Some(this) = subscriber.upgrade() else {
            return;
        };
        let generation = this.state.borrow().generation;
        let topology = this.topology.clone();
        drop(this);
        let next = futures_lite::future::or(async { Some(from_nodes.next().await) }, async {
            topology.changed(generation).await;
            None
        })
        .await;
        let Some(this) = subscriber.upgrade() else {
            return;
        };
        let lost = match next {
            // The map changed: channels whose slot moved go to their new node.
            None => this.replace_channels(),
            Some(None) => return,
            Some(Some(NodeEvent::Push(node, event))) => match event {
                PushEvent::Lost => {
                    // That node is down or restarting: the map may be about to change.
                    this.topology.request_refresh();
                    tracing::debug!(%node, "cluster pub/sub connection lost");
                    true
                }
                PushEvent::Subscribed(ref channel) | PushEvent::Message { ref channel, .. } => {
                    // Only from the node the channel is placed on (a late frame of a node it
                    // left would confirm a subscription that no longer exists).
                    let placed = this
                        .state
                        .borrow()
                        .nodes
                        .get(&node)
                        .is_some_and(|sub| sub.inner.borrow().wanted.contains(channel));
                    if placed && to_listener.unbounded_send(event).is_err() {
                        return;
                    }
                    false
                }
            },
            Some(Some(NodeEvent::Refused(node, message))) => {
                tracing::debug!(%node, error = %message, "cluster pub/sub command refused");
                // `MOVED`: placed by a stale map. Taken into the map at once (which places
                // the channel anew on the next turn), and a refresh asked for.
                match redirect_of(&Reply::Error(message)) {
                    Some(Redirect::Moved(slot, to)) => this.topology.moved(slot, &to),
                    _ => this.topology.request_refresh(),
                }
                false
            }
            Some(Some(NodeEvent::Unsubscribed(node, channel))) => {
                let still_wanted = this
                    .state
                    .borrow()
                    .nodes
                    .get(&node)
                    .is_some_and(|sub| sub.inner.borrow().wanted.contains(&channel));
                if still_wanted {
                    // Valkey dropped it: its slot left the node. Until it is subscribed on
                    // the new owner, messages are missed.
                    this.topology.request_refresh();
                    true
                } else {
                    false
                }
            }
        };
        if lost {
            if to_listener.unbounded_send(PushEvent::Lost).is_err() {
                return;
            }
            this.resubscribe_all();
        }
    }
}
