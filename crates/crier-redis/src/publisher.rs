//! Batched publishing: publishes that reach a node together go to Redis as one call of the
//! publish script (and come back as one reply) instead of one script call each.
//!
//! One task takes publish jobs from a queue. It sends a batch as soon as it may: at most
//! [`IN_FLIGHT`] batch is on its way to Redis at a time ([`IN_FLIGHT_CLUSTER`] on a Cluster),
//! and whatever queues up meanwhile becomes the next batch (up to [`MAX_BATCH`] messages or
//! [`MAX_BATCH_BYTES`] of data). There is no timer: a lone publish goes out at once, alone;
//! under load batches form by themselves while Redis works on the previous one. A script call
//! costs Redis a fixed overhead besides its commands (`scripts/redis-publish-cost`: ~25 µs of
//! Redis CPU for a call of one message, ~9 µs per message in calls of 16), which a batch pays
//! once, with one request and one reply on the socket instead of one per message.
//!
//! Every guarantee of a single publish (the crate docs, # Publishing) holds for each message of
//! a batch, and a caller hears back only after Redis answered the call — a 200 still means Redis
//! holds the message. A call that fails as a whole fails every message of the batch with that error:
//! `OutcomeUnknown` when the call may have reached Redis (no answer within the deadline, the
//! connection lost after sending: the messages may have been applied; idempotency keys make
//! retries safe), `Unavailable` when it certainly did not (no connection to send it on, Redis
//! refused the call). A job whose caller already gave up is not sent at all.
//!
//! On a Redis Cluster a script's keys must share a hash slot: a batch there holds only messages
//! whose channels share the first one's slot; the others wait, in order, for a later batch
//! (messages of one channel always share a slot, so their order is kept).

use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use crier_core::broker::IDEMPOTENCY_WINDOW;
use crier_core::{BrokerError, PublishResult};
use futures_util::StreamExt;
use futures_util::stream::FuturesUnordered;
use tokio::sync::{mpsc, oneshot, watch};

use crate::context::Context;
use crate::error::Fault;
use crate::keys::Keys;
use crate::scripts::{Message, PublishCall};

/// Batches on their way to one Redis at once. One: whatever arrives while a call is out waits
/// for it and goes in the next call (measured in the rig's private-channel shape on 2 cores:
/// 1 in flight kept the highest publish rate and the lowest Redis CPU per message of 1, 2 and
/// 32; see BENCHMARKS.md).
pub(crate) const IN_FLIGHT: usize = 1;
/// On a Redis Cluster a batch holds one slot's messages, and calls to different masters should
/// not wait for each other.
pub(crate) const IN_FLIGHT_CLUSTER: usize = 8;
/// Messages per batch, at most.
pub(crate) const MAX_BATCH: usize = 128;
/// Data bytes per batch, at most (a single larger message still goes, alone).
pub(crate) const MAX_BATCH_BYTES: usize = 1 << 20;
/// Jobs waiting for a batch, at most (callers wait for room: backpressure).
pub(crate) const QUEUE: usize = 4096;

/// One publish waiting for its batch.
struct Job {
    channel: String,
    data: String,
    idempotency_key: Option<String>,
    reply: oneshot::Sender<Result<PublishResult, BrokerError>>,
}

/// The broker's side of the queue.
pub(crate) struct Publisher {
    queue: mpsc::Sender<Job>,
    /// How long a caller waits for room in the queue and for its batch's call, at most.
    bound: Duration,
}

impl Publisher {
    /// Starts the task; it ends when the handle is dropped or `shutdown` fires.
    pub(crate) fn spawn(ctx: Arc<Context>, shutdown: watch::Receiver<()>) -> Publisher {
        let (queue, rx) = mpsc::channel(QUEUE);
        let bound = ctx.options.command_timeout * 2;
        tokio::spawn(run(ctx, rx, shutdown));
        Publisher { queue, bound }
    }

    /// Queues one publish and waits for its batch's answer.
    pub(crate) async fn publish(
        &self,
        channel: &str,
        data: &str,
        idempotency_key: Option<&str>,
    ) -> Result<PublishResult, BrokerError> {
        let (reply, rx) = oneshot::channel();
        let job = Job {
            channel: channel.to_owned(),
            data: data.to_owned(),
            idempotency_key: idempotency_key.map(str::to_owned),
            reply,
        };
        // Waiting for room in the queue and for the batch's call are bounded like any call. Until
        // the job is queued nothing was sent (`Unavailable`); after, the call may be on its way
        // (`OutcomeUnknown`; a job whose caller gave up before its batch formed is not sent).
        let bound = self.bound;
        let deadline = tokio::time::Instant::now() + bound;
        let slow = || BrokerError::Unavailable(format!("redis publish queue stayed full for {bound:?}"));
        let gone = || BrokerError::Unavailable("redis publisher task is gone".into());
        tokio::time::timeout_at(deadline, self.queue.send(job)).await.map_err(|_| slow())?.map_err(|_| gone())?;
        match tokio::time::timeout_at(deadline, rx).await {
            Ok(Ok(answer)) => answer,
            Ok(Err(_)) => Err(BrokerError::OutcomeUnknown("redis publisher task stopped during the publish".into())),
            Err(_) => Err(BrokerError::OutcomeUnknown(format!("redis did not answer within {bound:?}"))),
        }
    }
}

async fn run(ctx: Arc<Context>, mut rx: mpsc::Receiver<Job>, mut shutdown: watch::Receiver<()>) {
    // The batches are driven here, not spawned: one task hop less per publish.
    let mut in_flight = FuturesUnordered::new();
    let mut waiting = Waiting::new(ctx.keys.is_redis_cluster());
    let limit = if ctx.keys.is_redis_cluster() { IN_FLIGHT_CLUSTER } else { IN_FLIGHT };
    let mut open = true;
    loop {
        if in_flight.len() < limit && !waiting.is_empty() {
            // Jobs left behind by the last batch (another slot) go before anything new waits.
            waiting.fill(&mut rx);
            let batch = waiting.take();
            in_flight.push(publish_batch(ctx.clone(), batch));
            continue;
        }
        tokio::select! {
            _ = shutdown.changed() => return,
            Some(()) = in_flight.next(), if !in_flight.is_empty() => {}
            // While `limit` batches are out, publishes keep queueing: they form the next batch.
            job = rx.recv(), if open && in_flight.len() < limit => match job {
                Some(first) => {
                    waiting.push(first);
                    waiting.fill(&mut rx);
                    let batch = waiting.take();
                    in_flight.push(publish_batch(ctx.clone(), batch));
                }
                None => open = false,
            },
        }
        if !open && in_flight.is_empty() && waiting.is_empty() {
            return;
        }
    }
}

/// The jobs taken off the queue and not yet in a batch, in arrival order, each with its
/// channel's hash slot (computed once, on a Cluster; 0 elsewhere).
struct Waiting {
    jobs: VecDeque<(u16, Job)>,
    /// On a Cluster, a batch holds one hash slot's messages.
    by_slot: bool,
}

impl Waiting {
    fn new(by_slot: bool) -> Waiting {
        Waiting { jobs: VecDeque::new(), by_slot }
    }

    fn is_empty(&self) -> bool {
        self.jobs.is_empty()
    }

    fn push(&mut self, job: Job) {
        let slot = if self.by_slot { slot_of(&job.channel) } else { 0 };
        self.jobs.push_back((slot, job));
    }

    /// Takes what the queue holds now, up to a batch's worth beyond what already waits (a
    /// Cluster may leave other slots' jobs behind, so it looks a few batches ahead).
    fn fill(&mut self, rx: &mut mpsc::Receiver<Job>) {
        let room = if self.by_slot { 4 * MAX_BATCH } else { MAX_BATCH };
        while self.jobs.len() < room {
            match rx.try_recv() {
                Ok(job) => self.push(job),
                Err(_) => break,
            }
        }
    }

    /// The next batch: the first waiting job and those after it that fit (same slot on a
    /// Cluster), up to the batch limits, in order.
    fn take(&mut self) -> Vec<Job> {
        let Some((slot, first)) = self.jobs.pop_front() else { return Vec::new() };
        let mut bytes = first.data.len();
        let mut batch = vec![first];
        let mut kept = VecDeque::new();
        while let Some((s, job)) = self.jobs.pop_front() {
            if batch.len() >= MAX_BATCH || bytes + job.data.len() > MAX_BATCH_BYTES {
                kept.push_back((s, job));
                break;
            }
            if s != slot {
                kept.push_back((s, job));
                continue;
            }
            bytes += job.data.len();
            batch.push(job);
        }
        kept.append(&mut self.jobs);
        self.jobs = kept;
        batch
    }
}

fn slot_of(channel: &str) -> u16 {
    crate::slots::slot(Keys::slot_key(channel).as_bytes())
}

/// Runs one batch and answers each of its callers.
async fn publish_batch(ctx: Arc<Context>, mut batch: Vec<Job>) {
    // A caller that gave up (its deadline passed while the job queued) was told the outcome is
    // unknown; not sending the job keeps a retry from being its second copy when it has no key.
    batch.retain(|job| !job.reply.is_closed());
    if batch.is_empty() {
        return;
    }
    let (con, generation) = match ctx.commands.generational() {
        Ok(v) => v,
        Err(e) => return fail(batch, &e),
    };
    let messages = batch.iter().map(|job| Message {
        channel: &job.channel,
        data: &job.data,
        idempotency_key: job.idempotency_key.as_deref(),
    });
    let call = PublishCall::new(
        &ctx.scripts.publish,
        &ctx.keys,
        &ctx.params,
        IDEMPOTENCY_WINDOW.as_secs(),
        &generation,
        messages,
    );
    ctx.publish_calls.fetch_add(1, Ordering::Relaxed);
    let reply = ctx.commands.invoke_on(con, call.invocation()).await;
    let answers = match reply.and_then(|v| call.parse(&v)) {
        Ok(answers) => answers,
        Err(e) => return fail(batch, &e),
    };
    for (job, answer) in batch.into_iter().zip(answers) {
        if let Err(Fault::ReadOnly(_)) = &answer {
            // The server was demoted: the pub/sub task finds the new master.
            ctx.commands.readonly.notify_one();
        }
        let _ = job.reply.send(answer.map(|(result, _fresh)| result).map_err(BrokerError::from));
    }
}

/// Answers every caller of a batch that failed as a whole with the same error.
fn fail(batch: Vec<Job>, e: &Fault) {
    for job in batch {
        let _ = job.reply.send(Err(e.clone().into()));
    }
}
