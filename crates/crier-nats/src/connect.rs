//! Connecting: the client and its events, the streams and buckets laid out, the subscriber
//! connection and the background tasks started.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, Weak};
use std::time::Duration;

use async_nats::jetstream::{self, stream};
use crier_core::broker::{BrokerError, IDEMPOTENCY_WINDOW};

use crate::{HistPolicy, Inner, NatsAuth, NatsBroker, NatsOptions, live, rawsub, state, unavailable};

impl NatsBroker {
    /// Connects, creates (or updates) the streams and buckets, and starts the background tasks.
    pub async fn connect(opts: NatsOptions) -> Result<Arc<NatsBroker>, BrokerError> {
        let weak: Arc<OnceLock<Weak<Inner>>> = Arc::new(OnceLock::new());
        let up = Arc::new(AtomicBool::new(false));
        let mut co = async_nats::ConnectOptions::new()
            .name(format!("crier {}", opts.node_id))
            .retry_on_initial_connect()
            .max_reconnects(None)
            .connection_timeout(opts.connect_wait)
            .request_timeout(Some(opts.command_timeout))
            // A server hanging with its socket open is left after three unanswered PINGs, ~15 s
            // (60 s apart by default: minutes). Readiness follows the subscriber connection's
            // own probe (1 s, answered within the command timeout); this one only moves JetStream
            // calls, which time out meanwhile anyway, to another server sooner.
            .ping_interval(Duration::from_secs(5))
            .subscription_capacity(65_536)
            .reconnect_delay_callback(|n| Duration::from_millis((50u64 << n.min(5)).min(2000)));
        match &opts.auth {
            NatsAuth::None => {}
            NatsAuth::CredentialsFile(p) => {
                co = co
                    .credentials_file(p)
                    .await
                    .map_err(|e| BrokerError::Internal(format!("nats credentials file: {e}")))?
            }
            NatsAuth::TokenFile(p) => {
                let t =
                    std::fs::read_to_string(p).map_err(|e| BrokerError::Internal(format!("nats token file: {e}")))?;
                co = co.token(t.trim().to_owned());
            }
            NatsAuth::NkeyFile(p) => {
                let t =
                    std::fs::read_to_string(p).map_err(|e| BrokerError::Internal(format!("nats nkey file: {e}")))?;
                co = co.nkey(t.trim().to_owned());
            }
        }
        if let Some(ca) = &opts.tls_ca_file {
            co = co.add_root_certificates(ca.clone());
        }
        if opts.urls.iter().any(|u| u.starts_with("tls://")) {
            co = co.require_tls(true);
        }
        let (ev_weak, ev_up) = (weak.clone(), up.clone());
        co = co.event_callback(move |ev| {
            let (w, up) = (ev_weak.clone(), ev_up.clone());
            async move {
                match ev {
                    async_nats::Event::Connected => {
                        let was = up.swap(true, Ordering::SeqCst);
                        if let Some(inner) = w.get().and_then(Weak::upgrade) {
                            if was {
                                inner.up.store(true, Ordering::SeqCst);
                            } else {
                                // A reconnect: the server may have lost its store (streams and
                                // buckets gone). They are laid out again before the node is up
                                // and every channel re-reads its position (a lost channel's new
                                // epoch is announced as a gap).
                                inner.reconnects.fetch_add(1, Ordering::Relaxed);
                                // Cached tails and messages may name sequences of a store
                                // that is gone.
                                inner.forget_tails();
                                inner.cache.clear();
                                tokio::spawn(async move {
                                    inner.relayout().await;
                                    inner.up.store(up.load(Ordering::SeqCst), Ordering::SeqCst);
                                    inner.live.resync_all();
                                });
                            }
                        }
                    }
                    async_nats::Event::Disconnected | async_nats::Event::Closed => {
                        up.store(false, Ordering::SeqCst);
                        if let Some(inner) = w.get().and_then(Weak::upgrade) {
                            inner.up.store(false, Ordering::SeqCst);
                        }
                    }
                    async_nats::Event::SlowConsumer(_) => {
                        if let Some(inner) = w.get().and_then(Weak::upgrade) {
                            inner.live.resync_all();
                        }
                    }
                    _ => {}
                }
            }
        });
        let urls: Vec<async_nats::ServerAddr> = opts
            .urls
            .iter()
            .map(|u| u.parse::<async_nats::ServerAddr>().map_err(|e| BrokerError::Internal(format!("nats_url: {e}"))))
            .collect::<Result<_, _>>()?;
        // The subscriber connection's settings (a bad CA, seed or .creds file stops the start).
        let (raw_conf, raw_tls) = rawsub::Conf::new(&opts, &urls)?;
        // async-nats does not take a user from the URL itself.
        if let Some((user, pass)) = rawsub::url_user(&urls) {
            co = co.user_and_password(user, pass);
        }
        let client = co.connect(urls).await.map_err(unavailable)?;
        let js = jetstream::ContextBuilder::new().timeout(opts.command_timeout).build(client.clone());
        // A first connection is waited for a moment; without one the node starts unready (the
        // client keeps trying, and the layout follows once connected).
        let deadline = tokio::time::Instant::now() + opts.connect_wait.max(Duration::from_secs(5));
        while client.connection_state() != async_nats::connection::State::Connected
            && tokio::time::Instant::now() < deadline
        {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let default_policy = HistPolicy { size: opts.history_size, ttl_ms: opts.history_ttl.as_millis().max(1) as u64 };
        let policies: HashMap<String, HistPolicy> = opts
            .namespaces
            .named()
            .map(|(n, p)| {
                (n.to_owned(), HistPolicy { size: p.history_size, ttl_ms: p.history_ttl.as_millis().max(1) as u64 })
            })
            .collect();
        let w = weak.clone();
        let raw = rawsub::RawSub::start(raw_conf, raw_tls, move || {
            // Only once the client is up again: a server restarted without its store has no
            // streams until the client's re-layout, which re-reads every channel itself (and
            // nats-server 2.9 may crash on a message get for a stream not laid out yet).
            if let Some(inner) = w.get().and_then(Weak::upgrade)
                && inner.up.load(Ordering::SeqCst)
            {
                inner.live.resync_all();
            }
        });
        let inner = Arc::new(Inner {
            raw,
            live: live::Live::default(),
            client,
            js,
            up: AtomicBool::new(up.load(Ordering::SeqCst)),
            reconnects: AtomicU64::new(0),
            publish_calls: AtomicU64::new(0),
            reads: AtomicU64::new(0),
            cache: crate::cache::ReadCache::new(opts.read_cache_bytes),
            walks: (0..crate::history::WALK_STRIPES).map(|_| Default::default()).collect(),
            handler: OnceLock::new(),
            laid: OnceLock::new(),
            own: Mutex::default(),
            instance: format!("{}.{:016x}", opts.node_id, rand::random::<u64>()),
            alive: Mutex::default(),
            rewrites: Mutex::default(),
            policies,
            default_policy,
            tails: Mutex::new(HashMap::new()),
            followed: Default::default(),
            hooks: Default::default(),
            opts,
        });
        inner.up.store(inner.client.connection_state() == async_nats::connection::State::Connected, Ordering::SeqCst);
        let _ = weak.set(Arc::downgrade(&inner));
        inner.live.set_inner(Arc::downgrade(&inner));
        // JetStream may still be electing its leaders (a cluster starting): the layout is
        // retried for up to `layout_wait`; past it the node starts unready and a task lays the
        // streams and buckets out as soon as JetStream answers.
        if inner.up.load(Ordering::SeqCst)
            && let Err(e) = inner.lay_out_within(inner.opts.layout_wait, Duration::from_millis(500)).await
        {
            tracing::warn!(error = %e, "nats: JetStream not ready; starting unready, retrying in the background");
        }
        if inner.laid.get().is_none() {
            tokio::spawn(lay_out_later(Arc::downgrade(&inner)));
        }
        inner.raw.wait_connected(inner.opts.connect_wait).await;
        start_ops(&inner).await?;
        Ok(Arc::new(NatsBroker { inner }))
    }
}

/// Lays the streams and buckets out once JetStream answers (the node started without them).
async fn lay_out_later(inner: Weak<Inner>) {
    loop {
        tokio::time::sleep(Duration::from_secs(1)).await;
        let Some(inner) = inner.upgrade() else { return };
        if inner.laid.get().is_some() {
            return;
        }
        if inner.client.connection_state() != async_nats::connection::State::Connected {
            continue;
        }
        match inner.lay_out().await {
            Ok(()) => {
                tracing::info!("nats: JetStream streams and buckets laid out; the node is ready");
                inner.up.store(
                    inner.client.connection_state() == async_nats::connection::State::Connected,
                    Ordering::SeqCst,
                );
                inner.live.resync_all();
                return;
            }
            Err(e) => tracing::debug!(error = %e, "nats: JetStream not ready yet; retrying"),
        }
    }
}

impl Inner {
    /// Lays the streams and buckets out (idempotent: creates what is missing, updates what
    /// changed); the first success is kept as the node's handles.
    async fn lay_out(&self) -> Result<(), BrokerError> {
        let (streams, kv) = layout(&self.js, &self.opts, self.default_policy, &self.policies).await?;
        // Laid out (again: the store may be new): this node's liveness key first, so no entry
        // of it is ever read before its writer is known alive.
        let _ = self.beat_in(self.laid.get().map_or(&kv, |l| &l.kv)).await;
        let _ = self.laid.set(crate::Laid { streams, kv });
        Ok(())
    }

    /// Lays the streams and buckets out again (idempotent; re-creates what a server lost),
    /// retried for a few seconds: after it the node serves even if it failed (a cluster that
    /// cannot update a stream now still serves the existing one).
    async fn relayout(&self) {
        let within = self.opts.layout_wait.min(Duration::from_secs(5));
        if let Err(e) = self.lay_out_within(within, Duration::from_millis(200)).await {
            tracing::warn!(error = %e, "nats: streams and buckets not laid out again after a reconnect");
        }
    }

    /// [`Inner::lay_out`], retried every `pause` for up to `within` (JetStream electing its
    /// leaders answers errors meanwhile); the last error when it never succeeded.
    async fn lay_out_within(&self, within: Duration, pause: Duration) -> Result<(), BrokerError> {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            match self.lay_out().await {
                Ok(()) => return Ok(()),
                Err(e) if tokio::time::Instant::now() < deadline => {
                    tracing::debug!(error = %e, "nats: JetStream not ready yet; retrying");
                    tokio::time::sleep(pause).await;
                }
                Err(e) => return Err(e),
            }
        }
    }
}

async fn layout(
    js: &jetstream::Context,
    opts: &NatsOptions,
    default_policy: HistPolicy,
    policies: &HashMap<String, HistPolicy>,
) -> Result<(HashMap<HistPolicy, stream::Stream>, state::Buckets), BrokerError> {
    let mut streams = HashMap::new();
    for p in std::iter::once(default_policy).chain(policies.values().copied()) {
        if streams.contains_key(&p) {
            continue;
        }
        let s = create_stream(js, opts, p).await?;
        streams.insert(p, s);
    }
    let kv = state::Buckets::create(js, opts).await?;
    Ok((streams, kv))
}

async fn create_stream(
    js: &jetstream::Context,
    opts: &NatsOptions,
    p: HistPolicy,
) -> Result<stream::Stream, BrokerError> {
    let id = p.id();
    let max_age = Duration::from_millis(p.ttl_ms);
    let config = stream::Config {
        name: format!("{}_h_{id}", opts.prefix.replace(['.', '*', '>', ' '], "_")),
        subjects: vec![format!("{}.h.{id}.*", opts.prefix)],
        max_messages_per_subject: p.size.max(1) as i64,
        max_age,
        duplicate_window: IDEMPOTENCY_WINDOW.min(max_age),
        storage: stream::StorageType::File,
        num_replicas: opts.replicas.max(1),
        discard: stream::DiscardPolicy::Old,
        // Direct gets: a publisher re-reads a channel's last message without the JetStream API.
        allow_direct: true,
        republish: Some(stream::Republish {
            source: format!("{}.h.{id}.*", opts.prefix),
            destination: format!("{}.l.{id}.{{{{wildcard(1)}}}}", opts.prefix),
            headers_only: false,
        }),
        ..Default::default()
    };
    js.create_or_update_stream(config.clone())
        .await
        .map_err(|e| unavailable(format!("stream {}: {e}", config.name)))?;
    js.get_stream(&config.name).await.map_err(unavailable)
}

/// Starts this node's answerer of control operations and the refresher of its entries.
async fn start_ops(inner: &Arc<Inner>) -> Result<(), BrokerError> {
    crate::control::start(inner).await?;
    let weak = Arc::downgrade(inner);
    let period = inner.opts.presence_ttl / 3;
    // The liveness key, on its own timer (state.rs).
    let beat = weak.clone();
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(period.max(Duration::from_millis(100)));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            let Some(inner) = beat.upgrade() else { break };
            if let Err(e) = inner.beat().await {
                tracing::debug!(error = %e, "nats: liveness key not written; retried next period");
            }
        }
    });
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(period.max(Duration::from_millis(100)));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tick.tick().await;
        loop {
            tick.tick().await;
            let Some(inner) = weak.upgrade() else { break };
            if let Err(e) = inner.refresh().await {
                tracing::debug!(error = %e, "nats: presence refresh failed; retried next period");
            }
            inner.unfollow_idle().await;
            if let Err(e) = crate::hooks::refresh(&inner).await {
                tracing::debug!(error = %e, "nats: webhook occupancy refresh failed; retried next period");
            }
        }
    });
    Ok(())
}
