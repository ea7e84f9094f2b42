//! The owner-call: run an async closure on a given shard, here or through its inbox, and get
//! its typed reply (Seastar's `sharded<T>::invoke_on`).
//!
//! Every operation on a topic runs on the shard that owns it. [`Shard::invoke_on`] is the one
//! way there: when the target is this shard the closure runs at once on the calling task (no
//! channel, no allocation); otherwise it is boxed, sent through the target's inbox, run there
//! as its own task, and its result comes back on a oneshot channel that travels inside the
//! box. An operation is therefore written once, as the closure, whatever shard it runs on;
//! there is no request enum to extend and no handler to match it.
//!
//! [`Shard::invoke_on_all`] runs one closure on every shard (the gathers behind `/metrics`,
//! `/health`, `GET /api/v1/topics`); [`Shard::post`] runs one without waiting for it (the
//! delivery fan-out and interest withdrawal, which need no answer).
//!
//! # Batching
//!
//! Calls do not leave one by one. Each shard keeps an [`Outbox`]: calls queue there and leave
//! once this shard's ready tasks have run (a flush task, spawned with the first call of the
//! turn, yields once and then sends). Consecutive calls for the same shard travel as one
//! inbox message, so under load a turn's calls for a shard cost one channel push and at most
//! one wake-up of that shard, not one each; a lone call waits only for the tasks already
//! ready here. Once the shard's run has ended ([`Outbox::send_directly`]: tasks dropped with
//! the executor may still post from their destructors, with no executor to flush), calls go
//! out at once.
//!
//! # Order
//!
//! A shard's inbox is FIFO, and calls leave the outbox in exactly the order they were queued
//! (a batch holds only consecutive calls for one shard): a call queued before a call to
//! another shard is sent before it, so nothing the later call causes can overtake it.
//! [`serve_inbox`] starts one local task per call in arrival order (glommio 0.9's
//! `spawn_local` even polls the new task at once, inside the inbox loop; a run queue would
//! start them in the same order). So the synchronous part of each call
//! (everything before its first `.await`) runs in the order one sender sent the calls, and a
//! call that never awaits (a `post`ed delivery, an interest withdrawal) completes in that
//! order entirely; a call that awaits holds up none behind it. The delivery contract relies
//! on this: a peer's subscribe registers interest before its read and before its first
//! `.await`, in order with the same peer's withdrawals, and forwarded batches of a topic
//! reach the consumer's shard in append order (see [`crate::delivery::registry`]).
//!
//! Calls with and without a reply share that one path on purpose, so one rule gives the
//! order of all of them. Running the reply-less ones inline in the inbox loop instead would
//! save a task each, but would stay in order with the others only as long as glommio starts a
//! spawned task at once, which its documentation does not promise.

use std::cell::{Cell, RefCell};
use std::rc::Rc;

use futures::channel::{mpsc, oneshot};
use futures::StreamExt;

use super::{Shard, ShardError};

/// The sending side of a shard's inbox. Unbounded because the number of calls in flight is
/// already bounded by its producers: each connection has at most one request being handled
/// (pipelined requests are handled in order), and connections per shard are capped. A bounded
/// channel would add a second, deadlock-prone back-pressure path between shards (the trap
/// glommio#555 documents for its channel mesh).
pub type ShardSender = mpsc::UnboundedSender<InboxMessage>;
pub type ShardInbox = mpsc::UnboundedReceiver<InboxMessage>;

/// What travels through a shard's inbox. Everything here is `Send`: a call captures only
/// `Send` data (payloads are `Bytes`, never `Rc`) and the `Rc<Shard>` it runs on is the
/// receiving shard's own.
pub enum InboxMessage {
    /// Consecutive owner-calls from one shard (a `post` may come from this one), in the order
    /// it queued them.
    Calls(Vec<RemoteCall>),
    /// Stop accepting, finish in-flight work, exit. Sent by the signal thread, which is no
    /// shard and has none to run a closure on; it also ends [`serve_inbox`]'s first phase, a
    /// change of how the inbox itself is served that a call on the shard could not express.
    Shutdown,
}

/// An owner-call on its way to the shard that runs it: started (run up to its first await,
/// as a new local task) by the receiving shard's inbox loop. Dropping it unrun drops the
/// reply sender inside, so the caller gets [`ShardError::ShardGone`] instead of waiting.
pub struct RemoteCall(Box<Start>);

/// Starts a call on the shard it was sent to (spawns its task there).
type Start = dyn FnOnce(&Rc<Shard>) + Send;

impl RemoteCall {
    /// Wraps `op` so that the receiving shard runs it as its own task and hands its output to
    /// `done` (the reply sender, or nothing for a `post`).
    fn new<T, F>(op: F, done: impl FnOnce(T) + Send + 'static) -> RemoteCall
    where
        F: AsyncFnOnce(&Shard) -> T + Send + 'static,
        T: 'static,
    {
        RemoteCall(Box::new(move |shard: &Rc<Shard>| {
            let shard = Rc::clone(shard);
            glommio::spawn_local(async move { done(op(&shard).await) }).detach();
        }))
    }

    fn start(self, shard: &Rc<Shard>) {
        (self.0)(shard)
    }
}

impl std::fmt::Debug for RemoteCall {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("RemoteCall")
    }
}

impl Shard {
    /// Runs `op` on shard `target` and returns its output: directly when `target` is this
    /// shard, else through `target`'s inbox. [`ShardError::ShardGone`] when `target` does not
    /// exist or stopped before answering (its inbox closed, or the call was dropped unrun).
    ///
    /// `op` must be `Send` (it may cross to another thread) but the future it returns need
    /// not be: it runs on `target`'s executor only, with `target`'s `&Shard`.
    pub async fn invoke_on<T, F>(&self, target: usize, op: F) -> Result<T, ShardError>
    where
        F: AsyncFnOnce(&Shard) -> T + Send + 'static,
        T: Send + 'static,
    {
        if target == self.id {
            return Ok(op(self).await);
        }
        let reply = self.send_call(target, op)?;
        reply.await.map_err(|_| ShardError::ShardGone(target))
    }

    /// Runs `op` on every shard, concurrently (every remote call is queued before this
    /// shard's own runs, and leaves at the latter's first await), and returns the outputs in
    /// shard order; a shard that could not answer yields its [`ShardError`] in its place.
    pub async fn invoke_on_all<T, F>(&self, op: F) -> Vec<Result<T, ShardError>>
    where
        F: AsyncFnOnce(&Shard) -> T + Clone + Send + 'static,
        T: Send + 'static,
    {
        let pending: Vec<_> = (0..self.shard_count())
            .map(|target| (target != self.id).then(|| self.send_call(target, op.clone())))
            .collect();
        let mut local = Some(op(self).await);
        let mut out = Vec::with_capacity(pending.len());
        for (target, call) in pending.into_iter().enumerate() {
            out.push(match call {
                Some(Ok(reply)) => reply.await.map_err(|_| ShardError::ShardGone(target)),
                Some(Err(e)) => Err(e),
                // This shard's own slot (the only `None`), already computed above.
                None => local.take().ok_or(ShardError::ShardGone(target)),
            });
        }
        out
    }

    /// Runs `op` on shard `target` without waiting for it, always through `target`'s inbox
    /// (also when `target` is this shard: it then runs later, in inbox order). Errs only when
    /// `target` does not exist or its inbox is closed; whether it ran is not reported.
    pub fn post<F>(&self, target: usize, op: F) -> Result<(), ShardError>
    where
        F: AsyncFnOnce(&Shard) + Send + 'static,
    {
        self.send(target, RemoteCall::new(op, |()| {}))
    }

    /// Sends `op` to `target` with a reply channel; the receiver yields its output.
    fn send_call<T, F>(&self, target: usize, op: F) -> Result<oneshot::Receiver<T>, ShardError>
    where
        F: AsyncFnOnce(&Shard) -> T + Send + 'static,
        T: Send + 'static,
    {
        let (reply, answer) = oneshot::channel();
        // A dropped receiver (the asking connection went away) is not an error: the work is
        // done either way.
        let call = RemoteCall::new(op, move |out| {
            let _ = reply.send(out);
        });
        self.send(target, call)?;
        Ok(answer)
    }

    fn send(&self, target: usize, call: RemoteCall) -> Result<(), ShardError> {
        self.outbox.queue(target, call)
    }
}

/// Calls waiting to leave this shard, flushed once per executor turn (see the module docs).
/// Shared (`Rc`) between the shard and the flush task it spawns.
pub struct Outbox {
    /// Inbox senders of every shard, indexed by shard id.
    peers: Vec<ShardSender>,
    /// The calls waiting, in queue order: runs of consecutive calls for one target.
    batches: RefCell<Vec<(usize, Vec<RemoteCall>)>>,
    /// Whether a flush task is spawned and has not yet sent.
    flush_pending: Cell<bool>,
    /// Set when the shard's run has ended: no flush task could run any more.
    direct: Cell<bool>,
}

impl Outbox {
    pub fn new(peers: Vec<ShardSender>) -> Rc<Outbox> {
        Rc::new(Outbox {
            peers,
            batches: RefCell::new(Vec::new()),
            flush_pending: Cell::new(false),
            direct: Cell::new(false),
        })
    }

    pub fn shard_count(&self) -> usize {
        self.peers.len()
    }

    /// Queues `call` for `target`; it leaves with this turn's flush. Errs at once when
    /// `target` does not exist or its inbox is already closed (one that closes before the
    /// flush drops the call, and with it the reply sender: the caller then sees
    /// [`ShardError::ShardGone`] too).
    fn queue(self: &Rc<Self>, target: usize, call: RemoteCall) -> Result<(), ShardError> {
        let inbox = self
            .peers
            .get(target)
            .ok_or(ShardError::ShardGone(target))?;
        if inbox.is_closed() {
            return Err(ShardError::ShardGone(target));
        }
        if self.direct.get() {
            return inbox
                .unbounded_send(InboxMessage::Calls(vec![call]))
                .map_err(|_| ShardError::ShardGone(target));
        }
        {
            let mut batches = self.batches.borrow_mut();
            match batches.last_mut() {
                Some((to, calls)) if *to == target => calls.push(call),
                _ => batches.push((target, vec![call])),
            }
        }
        if !self.flush_pending.replace(true) {
            let outbox = Rc::clone(self);
            glommio::spawn_local(async move {
                // Let the tasks already ready on this shard run (and queue their calls)
                // first: that is what turns a busy turn's calls for a shard into one message.
                futures_lite::future::yield_now().await;
                outbox.flush();
            })
            .detach();
        }
        Ok(())
    }

    /// From now on sends every call at once, and sends what is waiting. Called when the
    /// shard's run ends, before its executor (and the tasks it still holds) is dropped.
    pub fn send_directly(&self) {
        self.direct.set(true);
        self.flush();
    }

    /// Sends every waiting batch, in order. A batch for a shard whose inbox has closed is
    /// dropped (see [`Outbox::queue`]).
    fn flush(&self) {
        self.flush_pending.set(false);
        let batches = std::mem::take(&mut *self.batches.borrow_mut());
        for (target, calls) in batches {
            if let Some(inbox) = self.peers.get(target) {
                let _ = inbox.unbounded_send(InboxMessage::Calls(calls));
            }
        }
    }
}

/// Serves the calls other shards send this one until the inbox closes or `Shutdown` arrives.
/// Each call runs as its own task, so a slow one (a Valkey round trip) does not hold up the
/// calls queued behind it.
pub async fn serve_inbox(shard: Rc<Shard>, mut inbox: ShardInbox) {
    while let Some(message) = inbox.next().await {
        match message {
            InboxMessage::Calls(calls) => start_all(calls, &shard),
            InboxMessage::Shutdown => {
                shard.begin_shutdown();
                break;
            }
        }
    }
    // Keep answering peers while the rest of the shard drains: a peer's in-flight call for
    // one of our topics must still get its reply.
    glommio::spawn_local(async move {
        while let Some(message) = inbox.next().await {
            if let InboxMessage::Calls(calls) = message {
                start_all(calls, &shard);
            }
        }
    })
    .detach();
}

/// Starts a batch's calls on `shard`, in order.
fn start_all(calls: Vec<RemoteCall>, shard: &Rc<Shard>) {
    calls.into_iter().for_each(|call| call.start(shard));
}

#[cfg(test)]
mod tests {
    use std::cell::RefCell;
    use std::future::Future;
    use std::sync::Arc;
    use std::thread::ThreadId;

    use futures::FutureExt;

    use super::*;
    use crate::shard::RuntimeState;
    use crate::store::Storage;

    thread_local! {
        /// What calls run on this thread's shard did, in the order they did it.
        static LOG: RefCell<Vec<&'static str>> = const { RefCell::new(Vec::new()) };
    }

    fn log(entry: &'static str) {
        LOG.with(|log| log.borrow_mut().push(entry));
    }

    /// Inbox channels for `shards` shards.
    fn inboxes(shards: usize) -> (Vec<ShardSender>, Vec<ShardInbox>) {
        (0..shards).map(|_| mpsc::unbounded()).unzip()
    }

    /// Shard `id` with the memory backend and the built-in settings.
    fn shard(id: usize, peers: Vec<ShardSender>) -> Rc<Shard> {
        let config = Arc::new(crate::config::built_in());
        let runtime = Arc::new(RuntimeState::new(peers.len()));
        let storage = Storage::new(&config, id, peers.len()).expect("memory storage");
        let auth = crate::auth::Auth::new(
            config.auth.clone(),
            crate::auth::store::AuthStore::Memory(Default::default()),
            None,
        )
        .expect("authentication off");
        Rc::new(Shard::new(id, config, runtime, storage, auth, peers))
    }

    /// Runs `make()`'s future on a new executor thread; join the handle for its end.
    fn on_executor<F, Fut>(make: F) -> glommio::ExecutorJoinHandle<()>
    where
        F: FnOnce() -> Fut + Send + 'static,
        Fut: Future<Output = ()> + 'static,
    {
        glommio::LocalExecutorBuilder::default()
            .io_memory(64 << 10)
            .spawn(make)
            .expect("spawn executor")
    }

    /// Runs `make()`'s future on a new executor thread and waits for it.
    fn run<F, Fut>(make: F)
    where
        F: FnOnce() -> Fut + Send + 'static,
        Fut: Future<Output = ()> + 'static,
    {
        on_executor(make).join().expect("test executor panicked");
    }

    #[test]
    fn a_call_on_this_shard_runs_in_place_not_through_the_inbox() {
        run(|| async {
            let (peers, mut inboxes) = inboxes(2);
            let here = shard(0, peers);
            // Nobody serves shard 0's inbox, so only a call run in place completes, and one
            // that does not await completes in the first poll.
            let answer = here
                .invoke_on(0, async |shard: &Shard| shard.id + 10)
                .now_or_never();
            assert_eq!(answer.and_then(Result::ok), Some(10));
            assert!(
                inboxes[0].try_recv().is_err(),
                "nothing was queued on the inbox"
            );
        });
    }

    #[test]
    fn a_call_on_another_shard_runs_on_its_executor_and_replies() {
        let (peers, mut inboxes) = inboxes(2);
        let inbox_1 = inboxes.pop().expect("two inboxes");
        let peers_1 = peers.clone();
        let (thread_tx, thread_rx) = std::sync::mpsc::channel::<ThreadId>();
        let owner = on_executor(move || async move {
            let _ = thread_tx.send(std::thread::current().id());
            serve_inbox(shard(1, peers_1), inbox_1).await;
        });
        let owner_thread = thread_rx.recv().expect("owner executor started");
        run(move || async move {
            let here = shard(0, peers.clone());
            let (id, thread) = here
                .invoke_on(1, async |shard: &Shard| {
                    (shard.id, std::thread::current().id())
                })
                .await
                .expect("shard 1 answers");
            assert_eq!(id, 1);
            assert_eq!(thread, owner_thread);
            assert_ne!(thread, std::thread::current().id());

            // Every shard, in shard order: this one in place, shard 1 through its inbox.
            let all = here.invoke_on_all(async |shard: &Shard| shard.id).await;
            let ids: Vec<_> = all.into_iter().map(Result::ok).collect();
            assert_eq!(ids, [Some(0), Some(1)]);

            peers[1]
                .unbounded_send(InboxMessage::Shutdown)
                .expect("shard 1 inbox open");
        });
        owner.join().expect("owner executor panicked");
    }

    #[test]
    fn a_call_to_a_shard_that_is_gone_fails_instead_of_waiting() {
        run(|| async {
            let (peers, mut inboxes) = inboxes(3);
            let here = shard(0, peers);

            // No such shard.
            let missing = here.invoke_on(7, async |_: &Shard| ()).await;
            assert!(matches!(missing, Err(ShardError::ShardGone(7))));

            // Shard 2's inbox closed before the call was sent.
            drop(inboxes.pop());
            let closed = here.invoke_on(2, async |_: &Shard| ()).await;
            assert!(matches!(closed, Err(ShardError::ShardGone(2))));
            assert!(here.post(2, async |_: &Shard| ()).is_err());

            // Shard 1 took the call but stopped without running it.
            let mut inbox_1 = inboxes.pop().expect("inbox 1");
            let reply = here.send_call(1, async |_: &Shard| ()).expect("sent");
            let call = inbox_1.next().await.expect("the call arrived");
            drop(call);
            assert!(reply.await.is_err(), "the caller is told, not left waiting");
        });
    }

    #[test]
    fn calls_start_in_arrival_order_and_an_awaiting_one_holds_up_none() {
        run(|| async {
            let (peers, mut inboxes) = inboxes(2);
            let inbox_1 = inboxes.pop().expect("two inboxes");
            let here = shard(0, peers.clone());
            glommio::spawn_local(serve_inbox(shard(1, peers), inbox_1)).detach();

            // Both queued before shard 1's inbox loop takes either.
            let first = here
                .send_call(1, async |_: &Shard| {
                    log("first: start");
                    futures_lite::future::yield_now().await;
                    log("first: end");
                })
                .expect("sent");
            here.post(1, async |_: &Shard| log("second"))
                .expect("posted");
            first.await.expect("first answered");

            let seen = here
                .invoke_on(1, async |_: &Shard| LOG.with(|log| log.take()))
                .await
                .expect("shard 1 answers");
            assert_eq!(seen, ["first: start", "second", "first: end"]);
        });
    }

    #[test]
    fn one_turns_calls_to_a_shard_leave_as_one_batch_in_order() {
        run(|| async {
            let (peers, mut inboxes) = inboxes(3);
            let mut inbox_2 = inboxes.pop().expect("inbox 2");
            let mut inbox_1 = inboxes.pop().expect("inbox 1");
            let here = shard(0, peers.clone());
            let serving = shard(1, peers);

            // One turn: 1, 1, 2, 2, 1, with nothing awaited in between.
            for (target, entry) in [(1, "a"), (1, "c"), (2, "b"), (2, "d"), (1, "e")] {
                here.post(target, async move |_: &Shard| log(entry))
                    .expect("posted");
            }
            assert!(
                inbox_1.try_recv().is_err() && inbox_2.try_recv().is_err(),
                "nothing leaves before the turn ends"
            );

            // The flush runs once this task yields: one message per run of calls for one
            // shard, calls in order.
            let mut runs = Vec::new();
            for target in [1, 2, 1] {
                let inbox = if target == 1 {
                    &mut inbox_1
                } else {
                    &mut inbox_2
                };
                let Some(InboxMessage::Calls(calls)) = inbox.next().await else {
                    panic!("expected a batch");
                };
                runs.push(calls.len());
                calls.into_iter().for_each(|call| call.start(&serving));
            }
            assert_eq!(runs, [2, 2, 1]);
            assert!(inbox_1.try_recv().is_err() && inbox_2.try_recv().is_err());
            assert_eq!(LOG.with(|log| log.take()), ["a", "c", "b", "d", "e"]);

            // A later turn starts a new batch.
            here.post(1, async |_: &Shard| log("f")).expect("posted");
            let Some(InboxMessage::Calls(later)) = inbox_1.next().await else {
                panic!("expected a second batch");
            };
            assert_eq!(later.len(), 1);
        });
    }

    #[test]
    fn calls_leave_in_the_order_they_were_queued_across_targets() {
        run(|| async {
            // Shards 1 and 2 share one inbox here, so it shows the order batches were sent in.
            let (own, _inbox_0) = mpsc::unbounded();
            let (shared, mut sent) = mpsc::unbounded();
            let here = shard(0, vec![own, shared.clone(), shared]);
            let serving = shard(1, inboxes(3).0);
            here.post(2, async |_: &Shard| log("to 2")).expect("posted");
            here.post(1, async |_: &Shard| log("to 1")).expect("posted");
            here.post(2, async |_: &Shard| log("to 2 again"))
                .expect("posted");
            for _ in 0..3 {
                let Some(InboxMessage::Calls(calls)) = sent.next().await else {
                    panic!("expected a batch");
                };
                calls.into_iter().for_each(|call| call.start(&serving));
            }
            assert_eq!(LOG.with(|log| log.take()), ["to 2", "to 1", "to 2 again"]);

            // Once the shard's run has ended, a call leaves at once, with no task to flush it.
            here.outbox.send_directly();
            here.post(1, async |_: &Shard| ()).expect("posted");
            assert!(matches!(sent.try_recv(), Ok(InboxMessage::Calls(c)) if c.len() == 1));
        });
    }
}
