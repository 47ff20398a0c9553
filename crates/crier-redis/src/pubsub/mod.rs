//! The pub/sub task: the node's ONE Redis pub/sub connection (one per master on a Cluster),
//! owned by ONE task that takes requests (subscribe, unsubscribe, ordered history reads) over a
//! queue and delivers publications to the handler. Why reads run on this connection and how a
//! channel's position is kept: the crate docs (# Delivery) and `node_position.rs`.
//!
//! - `mod.rs`: the task's life (connect, serve, reconnect with [`Backoff`]) and the broker's
//!   [`Handle`].
//! - `connect.rs`: reaching the topology (one server, the Sentinel master, every Cluster
//!   master), the probe, following a Sentinel failover.
//! - `requests.rs`: requests in batches (subscribes with their baseline reads, history reads,
//!   unsubscribes), and answered while offline.
//! - `delivery.rs`: pushes from Redis in offset order, and the gap-fill from the history.
//! - `shards.rs`: the connections, one per master, and the channel → shard mapping.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use crier_core::{BrokerError, History};
use crier_protocol::StreamPosition;
use crier_protocol::backoff::Backoff;
use tokio::sync::{mpsc, oneshot, watch};

use crate::context::Context;
use crate::node_position::NodePosition;
use crate::topology::Resolver;

mod connect;
mod delivery;
mod requests;
mod shards;

use shards::Conn;

/// What the broker asks of the task.
enum Request {
    Subscribe {
        channel: String,
        reply: oneshot::Sender<Result<(), BrokerError>>,
    },
    Unsubscribe {
        channel: String,
        reply: oneshot::Sender<()>,
    },
    /// A history read of a channel with local subscribers, ordered with the live stream (see
    /// `requests.rs`).
    History(HistoryRead),
}

struct HistoryRead {
    channel: String,
    since: Option<StreamPosition>,
    limit: usize,
    reply: oneshot::Sender<Result<History, BrokerError>>,
}

/// The broker's side of the task's queue.
pub(crate) struct Handle {
    requests: mpsc::Sender<Request>,
    /// How long a request may wait (the task may be busy re-subscribing after a reconnect).
    bound: Duration,
}

impl Handle {
    /// Subscribes `channel`: answers after Redis confirmed it and its baseline was read.
    pub(crate) async fn subscribe(&self, channel: &str) -> Result<(), BrokerError> {
        let (reply, rx) = oneshot::channel();
        self.ask(Request::Subscribe { channel: channel.to_owned(), reply }, rx).await?
    }

    pub(crate) async fn unsubscribe(&self, channel: &str) -> Result<(), BrokerError> {
        let (reply, rx) = oneshot::channel();
        self.ask(Request::Unsubscribe { channel: channel.to_owned(), reply }, rx).await
    }

    /// A history read ordered with the live stream (for a channel with local subscribers).
    pub(crate) async fn history(
        &self,
        channel: &str,
        since: Option<&StreamPosition>,
        limit: usize,
    ) -> Result<History, BrokerError> {
        let (reply, rx) = oneshot::channel();
        let read = HistoryRead { channel: channel.to_owned(), since: since.cloned(), limit, reply };
        self.ask(Request::History(read), rx).await?
    }

    /// Sends a request to the task and waits for its answer (bounded).
    async fn ask<T>(&self, request: Request, rx: oneshot::Receiver<T>) -> Result<T, BrokerError> {
        let deadline = self.bound;
        let gone = || BrokerError::Unavailable("redis pub/sub task is gone".into());
        let slow = || BrokerError::Unavailable(format!("redis pub/sub did not answer within {deadline:?}"));
        tokio::time::timeout(deadline, self.requests.send(request)).await.map_err(|_| slow())?.map_err(|_| gone())?;
        tokio::time::timeout(deadline, rx).await.map_err(|_| slow())?.map_err(|_| gone())
    }
}

/// Where a subscribed channel stands.
enum ChannelSync {
    /// SUBSCRIBE sent, baseline not read yet: everything that arrives is delivered.
    Pending,
    Tracking(NodePosition),
}

/// Why the connected phase ended.
enum End {
    Exit,
    Lost(String),
}

type Step = Result<(), End>;

fn lost(e: impl std::fmt::Display) -> End {
    End::Lost(e.to_string())
}

/// See the module docs.
pub(crate) struct Task {
    ctx: Arc<Context>,
    resolver: Resolver,
    /// The server the command connection points at (`host:port`).
    current: Option<String>,
    requests: mpsc::Receiver<Request>,
    shutdown: watch::Receiver<()>,
    /// Boxed names: a channel's name is kept here, in the hub and in redis-rs, for its whole life.
    channels: HashMap<Box<str>, ChannelSync>,
    /// The control channel (`control.rs`).
    control: Vec<u8>,
    /// This instance's reply channel (answers to its control operations).
    reply: Vec<u8>,
}

impl Task {
    /// Starts the task; it runs until `shutdown` fires or the handle is dropped.
    pub(crate) fn spawn(ctx: Arc<Context>, resolver: Resolver, shutdown: watch::Receiver<()>) -> Handle {
        let (tx, requests) = mpsc::channel(1024);
        let bound = ctx.options.command_timeout * 3;
        let task = Task {
            control: ctx.keys.control().into_bytes(),
            reply: ctx.keys.reply(&ctx.instance).into_bytes(),
            current: resolver.fixed().map(|t| t.key),
            ctx,
            resolver,
            requests,
            shutdown,
            channels: HashMap::new(),
        };
        tokio::spawn(task.run());
        Handle { requests: tx, bound }
    }

    /// Makes sure the command connection answers too (after a Redis restart its first call fails
    /// and makes it reconnect). Bounded: after a few tries the broker reports up anyway, since
    /// the pub/sub side works and the command connection keeps reconnecting by itself.
    async fn probe_commands(&self) {
        for attempt in 0..5u64 {
            if self.ctx.commands.query(&redis::cmd("PING")).await.is_ok() {
                return;
            }
            tokio::time::sleep(self.ctx.options.reconnect_min * (attempt as u32 + 1)).await;
        }
        tracing::warn!("redis command connection does not answer yet");
    }

    /// Runs until the broker is dropped.
    async fn run(mut self) {
        let (min, max) = (self.ctx.options.reconnect_min, self.ctx.options.reconnect_max);
        // Each failure waits in the upper half of its step: from `min` doubling up to `max`.
        let backoff = Backoff { base: min, cap: max.max(min) };
        let (mut connected_before, mut failures) = (false, 0u64);
        loop {
            let end = match self.connect().await {
                Ok(mut conn) => {
                    failures = 0;
                    if connected_before {
                        self.ctx.reconnects.fetch_add(1, Ordering::Relaxed);
                    }
                    connected_before = true;
                    self.probe_commands().await;
                    self.ctx.up.send_replace(true);
                    tracing::info!(channels = self.channels.len(), "redis pub/sub connected");
                    let end = self.serve(&mut conn).await;
                    self.ctx.up.send_replace(false);
                    end
                }
                Err(end) => end,
            };
            match end {
                End::Exit => return,
                End::Lost(why) if failures == 0 => tracing::warn!(%why, "redis pub/sub unavailable; reconnecting"),
                End::Lost(why) => tracing::debug!(%why, failures, "redis pub/sub still unavailable"),
            }
            failures += 1;
            let attempt = u32::try_from(failures - 1).unwrap_or(u32::MAX);
            if self.wait_down(backoff.equal_jitter(attempt)).await.is_err() {
                return;
            }
        }
    }

    async fn serve(&mut self, conn: &mut Conn) -> End {
        let mut probe = tokio::time::interval(self.ctx.options.probe_interval);
        probe.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        probe.reset();
        let readonly = self.ctx.commands.readonly.clone();
        loop {
            let step = tokio::select! {
                _ = self.shutdown.changed() => Err(End::Exit),
                push = conn.pushes.recv() => match push {
                    Some(push) => self.on_push(conn, push).await,
                    None => Err(lost("push stream ended")),
                },
                request = self.requests.recv() => match request {
                    Some(request) => self.on_requests(conn, request).await,
                    None => Err(End::Exit),
                },
                _ = probe.tick() => self.probe(conn).await,
                _ = readonly.notified() => {
                    if self.resolver.is_sentinel() {
                        Err(lost("a command hit a read-only replica: the master moved"))
                    } else {
                        Ok(())
                    }
                }
            };
            if let Err(end) = step {
                return end;
            }
        }
    }

    /// While disconnected: answers requests without Redis until `delay` passes.
    async fn wait_down(&mut self, delay: Duration) -> Step {
        let sleep = tokio::time::sleep(delay);
        tokio::pin!(sleep);
        loop {
            tokio::select! {
                _ = &mut sleep => return Ok(()),
                _ = self.shutdown.changed() => return Err(End::Exit),
                request = self.requests.recv() => match request {
                    Some(request) => self.answer_offline(request),
                    None => return Err(End::Exit),
                },
            }
        }
    }
}
