//! The broker handle: the one [`Context`] and the handles of the parts that run on their own
//! (the publisher's queue, the pub/sub task's queue, the presence state and its refresh), and
//! how [`RedisBroker::start`] builds them. The `Broker` trait impl (in `lib.rs`) delegates to
//! these parts.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use crier_core::BrokerError;
use tokio::sync::watch;

use crate::command::{self, Commands};
use crate::context::Context;
use crate::options::{RedisOptions, StartError};
use crate::presence::{self, Presence};
use crate::publisher::Publisher;
use crate::pubsub::{self, Task};
use crate::{error, tls, topology};

/// See the crate docs.
pub struct RedisBroker {
    pub(crate) ctx: Arc<Context>,
    pub(crate) presence: Arc<Presence>,
    pub(crate) pubsub: pubsub::Handle,
    pub(crate) publisher: Publisher,
    pub(crate) up: watch::Receiver<bool>,
    /// Dropped with the broker: stops the background tasks.
    _shutdown: watch::Sender<()>,
}

impl RedisBroker {
    /// [`RedisBroker::start`], with a setting problem as `BrokerError::Internal`.
    pub async fn connect(opts: RedisOptions) -> Result<Arc<RedisBroker>, BrokerError> {
        RedisBroker::start(opts).await.map_err(|e| BrokerError::Internal(e.to_string()))
    }

    /// Starts the broker: the command connection, the pub/sub task, the publisher and the
    /// refresh task. Fails only on a setting problem (malformed URL, bad CA file; and, within
    /// `connect_wait`, a certificate that does not verify or a master name no Sentinel knows);
    /// see the crate docs for starting while Redis is down.
    pub async fn start(opts: RedisOptions) -> Result<Arc<RedisBroker>, StartError> {
        let t = opts.command_timeout;
        let setting = |f: error::Fault| StartError::Setting(f.to_string());
        let tls = tls::Tls::load(opts.tls_ca_file.as_deref()).map_err(setting)?;
        let resolver = topology::Resolver::new(&opts.topology, tls, t).map_err(setting)?;
        let manager = match resolver.fixed() {
            Some(target) => {
                Some(command::manager(target.commands, t, opts.reconnect_min, opts.reconnect_max).map_err(setting)?)
            }
            None => None,
        };
        let connect_wait = opts.connect_wait;
        let (up_tx, up) = watch::channel(false);
        let ctx = Arc::new(Context::new(opts, Commands::new(manager, t), up_tx));
        let (shutdown, shutdown_rx) = watch::channel(());
        let pubsub = Task::spawn(ctx.clone(), resolver, shutdown_rx.clone());
        let presence = Arc::new(Presence::new(ctx.clone()));
        tokio::spawn(presence::refresh_loop(presence.clone(), shutdown_rx.clone()));
        let publisher = Publisher::spawn(ctx.clone(), shutdown_rx);

        let mut wait = up.clone();
        let deadline = tokio::time::Instant::now() + connect_wait;
        loop {
            let step = Duration::from_millis(50).min(connect_wait);
            if tokio::time::timeout(step, wait.wait_for(|up| *up)).await.is_ok() {
                break;
            }
            if let Some(problem) = ctx.setting_problem() {
                return Err(StartError::Setting(problem));
            }
            if tokio::time::Instant::now() >= deadline {
                tracing::warn!("redis is not reachable yet; the broker keeps trying in the background");
                break;
            }
        }
        Ok(Arc::new(RedisBroker { ctx, presence, pubsub, publisher, up, _shutdown: shutdown }))
    }

    /// How many times the pub/sub connection was re-established after a loss
    /// (`crier_broker_reconnects_total`).
    pub fn reconnects(&self) -> u64 {
        self.ctx.reconnects.load(Ordering::Relaxed)
    }

    /// How many publications were delivered by gap-fills: missed on the live stream (pub/sub
    /// reconnect, hole) and read from the history instead.
    pub fn gap_filled(&self) -> u64 {
        self.ctx.gap_filled.load(Ordering::Relaxed)
    }

    /// Waits until [`crier_core::Broker::is_up`] is `up` or `timeout` passes; returns whether it
    /// is.
    pub async fn wait_up(&self, up: bool, timeout: Duration) -> bool {
        let mut rx = self.up.clone();
        tokio::time::timeout(timeout, rx.wait_for(|v| *v == up)).await.is_ok_and(|r| r.is_ok())
    }
}
