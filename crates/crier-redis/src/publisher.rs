//! Batched publishing: publishes that arrive together go to Redis as ONE call of the publish
//! script (and come back as one reply), instead of one script call each.
//!
//! One task takes publish jobs from a queue. It sends a batch as soon as it may: at most
//! [`IN_FLIGHT`] batches are on their way to Redis at once, and whatever queues up meanwhile
//! becomes the next batch (up to [`MAX_BATCH`] messages or [`MAX_BATCH_BYTES`] of data). No
//! timer: a lone publish goes out at once, alone; under load, batches form by themselves while
//! Redis is busy with the previous ones. A script call costs Redis ~10 µs of fixed overhead
//! besides its commands (measured with `INFO commandstats` and `redis-benchmark`, see
//! BENCHMARKS.md), which a batch pays once.
//!
//! Every guarantee of a single publish holds for each message of a batch: the script applies
//! the messages in queue order, each exactly as the one-message script did (offset, epoch,
//! history, idempotency, PUBLISH), and a caller hears back only after Redis answered the whole
//! call — so a 200 still means Redis holds the message. A failed call fails every message of the
//! batch with the same error (`Unavailable`: they may have been applied, as with any publish
//! that times out; idempotency keys make retries safe).
//!
//! Redis Cluster would refuse a batch whose keys are in different slots; crier speaks to one
//! Redis (or a replicated primary), where that does not arise.

use std::sync::Arc;

use crier_core::{BrokerError, PublishResult};
use futures_util::StreamExt;
use futures_util::stream::FuturesUnordered;
use tokio::sync::{mpsc, oneshot, watch};

use crate::command::Commands;
use crate::keys::Keys;
use crate::scripts::{self, Params, Scripts};

/// Batches on their way to Redis at once.
pub(crate) const IN_FLIGHT: usize = 2;
/// Messages per batch, at most.
pub(crate) const MAX_BATCH: usize = 128;
/// Data bytes per batch, at most (a single larger message still goes, alone).
pub(crate) const MAX_BATCH_BYTES: usize = 1 << 20;
/// Jobs waiting for a batch, at most (callers wait for room: backpressure).
pub(crate) const QUEUE: usize = 4096;

/// One publish waiting for its batch.
pub(crate) struct Job {
    pub channel: String,
    pub data: String,
    pub idempotency_key: Option<String>,
    pub reply: oneshot::Sender<Result<PublishResult, BrokerError>>,
}

/// What a batch needs to run.
pub(crate) struct Context {
    pub commands: Commands,
    pub keys: Keys,
    pub params: Params,
    pub scripts: Arc<Scripts>,
    pub idempotency_ttl_s: u64,
}

/// Starts the task; it ends when the queue's senders are gone or `shutdown` fires.
pub(crate) fn spawn(ctx: Context, shutdown: watch::Receiver<()>) -> mpsc::Sender<Job> {
    let (tx, rx) = mpsc::channel(QUEUE);
    tokio::spawn(run(Arc::new(ctx), rx, shutdown));
    tx
}

async fn run(ctx: Arc<Context>, mut rx: mpsc::Receiver<Job>, mut shutdown: watch::Receiver<()>) {
    // The batches are driven here, not spawned: one task hop less per publish.
    let mut in_flight = FuturesUnordered::new();
    let mut open = true;
    loop {
        tokio::select! {
            _ = shutdown.changed() => return,
            Some(()) = in_flight.next(), if !in_flight.is_empty() => {}
            // While IN_FLIGHT batches are out, publishes keep queueing: they form the next batch.
            job = rx.recv(), if open && in_flight.len() < IN_FLIGHT => match job {
                Some(first) => in_flight.push(publish_batch(ctx.clone(), take_batch(first, &mut rx))),
                None => open = false,
            },
        }
        if !open && in_flight.is_empty() {
            return;
        }
    }
}

/// `first` and whatever else is queued, up to the batch limits.
fn take_batch(first: Job, rx: &mut mpsc::Receiver<Job>) -> Vec<Job> {
    let mut bytes = first.data.len();
    let mut batch = vec![first];
    while batch.len() < MAX_BATCH && bytes < MAX_BATCH_BYTES {
        match rx.try_recv() {
            Ok(job) => {
                bytes += job.data.len();
                batch.push(job);
            }
            Err(_) => break,
        }
    }
    batch
}

/// Runs one batch and answers each of its callers.
async fn publish_batch(ctx: Arc<Context>, batch: Vec<Job>) {
    let mut inv = ctx.scripts.publish.prepare_invoke();
    inv.arg(batch.len())
        .arg(scripts::new_epoch())
        .arg(ctx.params.history_size)
        .arg(ctx.params.history_ttl_ms)
        .arg(ctx.params.meta_ttl_ms)
        .arg(ctx.idempotency_ttl_s)
        .arg(ctx.keys.pubsub(""));
    for job in &batch {
        inv.key(ctx.keys.meta(&job.channel)).key(ctx.keys.history(&job.channel));
        match &job.idempotency_key {
            Some(k) => {
                inv.key(ctx.keys.idempotency(&job.channel, k));
                inv.arg(&job.channel).arg(&job.data).arg("1");
            }
            None => {
                inv.arg(&job.channel).arg(&job.data).arg("0");
            }
        }
    }
    let outcome = ctx.commands.invoke(&inv).await.and_then(|v| scripts::parse_publish(&v, batch.len()));
    match outcome {
        Ok(results) => {
            for (job, (result, _fresh)) in batch.into_iter().zip(results) {
                let _ = job.reply.send(Ok(result));
            }
        }
        Err(e) => {
            for job in batch {
                let _ = job.reply.send(Err(same(&e)));
            }
        }
    }
}

/// The same error again (one per caller of a failed batch).
fn same(e: &BrokerError) -> BrokerError {
    match e {
        BrokerError::Unavailable(m) => BrokerError::Unavailable(m.clone()),
        BrokerError::Internal(m) => BrokerError::Internal(m.clone()),
    }
}
