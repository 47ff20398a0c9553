//! crier's NATS broker: the [`Broker`] of a cluster whose nodes share one NATS system with
//! JetStream (one `nats-server`, or a cluster of them with R3 streams).
//!
//! - **History, offsets and epochs** live in JetStream: one stream per distinct history policy
//!   (`history_size`, `history_ttl`), one subject per channel (`<prefix>.h.<policy>.<token>`,
//!   the token being `c` + the channel name in unpadded base64url, so any channel name is one
//!   valid subject token). Every stored message carries its channel offset, epoch, the stream
//!   sequence of the channel's previous message and its publish time in headers. A publish is
//!   stored with `Nats-Expected-Last-Subject-Sequence` (optimistic concurrency): offsets stay
//!   contiguous per channel and epoch whatever the number of publishers; a publisher that lost
//!   the race re-reads the channel's last message and tries again. An empty channel gets its
//!   epoch from a marker message (offset 0) written on first read, so the epoch seen before
//!   the first publish is the channel's. When every message of a channel has expired or was
//!   purged, the next read or publish starts a new epoch (a recovery across it reports the gap).
//! - **Idempotent publish**: `Nats-Msg-Id` = channel token + key, JetStream's duplicate window
//!   ([`crier_core::broker::IDEMPOTENCY_WINDOW`], or the history TTL when shorter).
//! - **Live fan-out** over core NATS: the stream *republishes* every stored message to
//!   `<prefix>.l.<policy>.<token>` (server side, in stream order, only once stored); each node
//!   holds one core subscription per subscribed channel. Per channel the node keeps the last
//!   delivered offset and epoch: duplicates are dropped, a hole is filled from JetStream before
//!   the message after it, an unfillable hole or a new epoch is announced (`on_gap`). After a
//!   reconnect every subscribed channel is re-read from JetStream (what was published while
//!   the node was cut off is delivered, or the gap announced).
//! - **Cluster state** in JetStream key-value buckets whose `max_age` is the entries' TTL
//!   (refreshed by rewriting, as Redis refreshes its keys): presence, per-user connection
//!   counts, node registry, channel counts, rate limits (GCRA), token revocations. Values are
//!   updated by compare-and-set on the key's revision (presence: one key per channel and client).
//! - **Server-side control** (`user_op`, `disconnect_user`): a request on `<prefix>.op` that
//!   every other node answers on an inbox, counted against the node registry.
//!
//! Webhooks are not built on NATS (the trait's default refuses them).

mod live;
mod rawsub;
mod state;

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, Weak};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use async_nats::HeaderMap;
use async_nats::jetstream::{self, context::PublishErrorKind, message::PublishMessage, stream};
use async_trait::async_trait;
use base64::Engine;
use bytes::Bytes;
use crier_core::Namespaces;
use crier_core::broker::{
    Broker, BrokerError, BrokerHandler, ChannelCount, History, IDEMPOTENCY_WINDOW, NodeInfo, PresenceStats,
    Publication, PublishOptions, PublishResult, Revocation, UserOp, UserOpReply,
};
use crier_protocol::StreamPosition;
use crier_protocol::frames::PresenceEntry;

pub(crate) const H_EPOCH: &str = "Crier-Epoch";
pub(crate) const H_OFFSET: &str = "Crier-Offset";
pub(crate) const H_PREV: &str = "Crier-Prev";
pub(crate) const H_TS: &str = "Crier-Ts";
pub(crate) const H_KIND: &str = "Crier-Kind";
pub(crate) const H_CLIENT: &str = "Crier-Client";
pub(crate) const H_NODE: &str = "Crier-Node";
/// Byte lengths of a batch's publications (absent: the message is one publication).
pub(crate) const H_LENS: &str = "Crier-Lens";
/// At most this many publications, and about this many bytes, per stored batch.
const BATCH_MAX: usize = 256;
const BATCH_BYTES: usize = 256 * 1024;

/// How the broker authenticates to NATS (secrets are read from files, never logged).
#[derive(Debug, Clone, Default)]
pub enum NatsAuth {
    #[default]
    None,
    /// A `.creds` file (user JWT + nkey seed).
    CredentialsFile(PathBuf),
    /// A file holding a token.
    TokenFile(PathBuf),
    /// A file holding an nkey seed (`SU...`).
    NkeyFile(PathBuf),
}

/// What [`NatsBroker::connect`] needs.
#[derive(Debug, Clone)]
pub struct NatsOptions {
    /// Seed servers (`nats://host:port`, `tls://host:port`); the client learns the others.
    pub urls: Vec<String>,
    pub auth: NatsAuth,
    /// PEM file of the CA that signed the servers' certificates (`tls://`); unset = system roots.
    pub tls_ca_file: Option<PathBuf>,
    /// This node's name.
    pub node_id: String,
    /// History of channels outside every declared namespace (they win over the namespaces'
    /// default policy, as on Redis).
    pub history_size: usize,
    pub history_ttl: Duration,
    pub namespaces: Arc<Namespaces>,
    /// Expiry of presence and connection entries (refreshed by the node). Default 30s.
    pub presence_ttl: Duration,
    /// Expiry of node registry entries. Default 30s.
    pub node_ttl: Duration,
    /// How long a token revocation is kept. Default 7 days.
    pub revocation_ttl: Duration,
    /// Prefix of every subject, stream and bucket. Default `crier`.
    pub prefix: String,
    /// Replicas of every stream and bucket (3 on a 3-server cluster). Default 1.
    pub replicas: usize,
    /// Deadline of every JetStream call. Default 2s.
    pub command_timeout: Duration,
    /// How long [`NatsBroker::connect`] waits for a first connection. Default 2s.
    pub connect_wait: Duration,
    /// How long [`NatsBroker::connect`] retries laying out streams and buckets while
    /// JetStream is not ready (a cluster electing its meta leader). Default 30s.
    pub layout_wait: Duration,
}

impl NatsOptions {
    pub fn new(urls: Vec<String>, node_id: impl Into<String>) -> NatsOptions {
        NatsOptions {
            urls,
            auth: NatsAuth::None,
            tls_ca_file: None,
            node_id: node_id.into(),
            history_size: 100,
            history_ttl: Duration::from_secs(300),
            namespaces: Arc::new(Namespaces::default()),
            presence_ttl: Duration::from_secs(30),
            node_ttl: Duration::from_secs(30),
            revocation_ttl: Duration::from_secs(7 * 24 * 3600),
            prefix: "crier".into(),
            replicas: 1,
            command_timeout: Duration::from_secs(2),
            connect_wait: Duration::from_secs(2),
            layout_wait: Duration::from_secs(30),
        }
    }
}

/// A channel's history policy, as the streams are laid out.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) struct HistPolicy {
    size: usize,
    ttl_ms: u64,
}

impl HistPolicy {
    fn id(&self) -> String {
        format!("{}_{}", self.size, self.ttl_ms)
    }
}

/// The cached position of a channel this node publishes to.
#[derive(Debug, Clone)]
struct Tail {
    seq: u64,
    epoch: Arc<str>,
    offset: u64,
}

/// A publish waiting for its channel's next store.
struct Pending {
    data: Bytes,
    /// `Nats-Msg-Id`: channel token + idempotency key.
    key: Option<String>,
    tx: tokio::sync::oneshot::Sender<Result<PublishResult, BrokerError>>,
}

/// A channel this node publishes to: its cached tail, its queue, whether a leader runs.
#[derive(Default)]
struct ChanPub {
    tail: Option<Tail>,
    queue: std::collections::VecDeque<Pending>,
    busy: bool,
}

/// One stored message of a channel, decoded: the publications `first..=offset` (one, or a batch
/// of a node's publishes that queued while its previous store was out).
#[derive(Debug, Clone)]
pub(crate) struct Stored {
    pub seq: u64,
    pub epoch: Arc<str>,
    /// The first offset it holds (0: the epoch marker).
    pub first: u64,
    /// The last offset it holds.
    pub offset: u64,
    pub prev: u64,
    pub ts: u64,
    /// Byte lengths of the batch's publications in `data` (empty: one publication).
    pub lens: Vec<usize>,
    pub data: Bytes,
}

pub(crate) fn header<'a>(h: Option<&'a HeaderMap>, name: &str) -> Option<&'a str> {
    h.and_then(|h| h.get(name)).map(|v| v.as_str())
}

pub(crate) fn header_u64(h: Option<&HeaderMap>, name: &str) -> u64 {
    header(h, name).and_then(|v| v.parse().ok()).unwrap_or(0)
}

impl Stored {
    fn from_headers(seq: u64, h: Option<&HeaderMap>, data: Bytes) -> Option<Stored> {
        let epoch = header(h, H_EPOCH)?;
        let first = header_u64(h, H_OFFSET);
        let lens: Vec<usize> =
            header(h, H_LENS).map(|l| l.split(',').filter_map(|n| n.parse().ok()).collect()).unwrap_or_default();
        if lens.iter().sum::<usize>() > data.len() {
            return None;
        }
        let count = lens.len().max(1) as u64;
        Some(Stored {
            seq,
            epoch: epoch.into(),
            first,
            offset: if first == 0 { 0 } else { first + count - 1 },
            prev: header_u64(h, H_PREV),
            ts: header_u64(h, H_TS),
            lens,
            data,
        })
    }

    /// Its publications, oldest first (none for the epoch marker).
    fn publications(&self, channel: &str) -> Vec<Publication> {
        if self.first == 0 {
            return Vec::new();
        }
        let one = |offset: u64, data: &[u8]| {
            let data = std::str::from_utf8(data).unwrap_or("null");
            Publication {
                offset,
                epoch: self.epoch.clone(),
                frame: crier_protocol::frames::encode_message(channel, &self.epoch, offset, data),
                published_at_us: self.ts,
            }
        };
        if self.lens.is_empty() {
            return vec![one(self.first, &self.data)];
        }
        let mut at = 0;
        self.lens
            .iter()
            .enumerate()
            .map(|(i, n)| {
                let p = one(self.first + i as u64, &self.data[at..at + n]);
                at += n;
                p
            })
            .collect()
    }
}

pub(crate) fn now_us() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_micros() as u64)
}

pub(crate) fn now_ms() -> u64 {
    now_us() / 1000
}

fn new_epoch() -> String {
    use rand::Rng;
    let n: u64 = rand::rng().random();
    format!("{:08x}", n as u32)
}

/// A channel (or any name) as one subject token / key-value key: `c` + unpadded base64url.
pub fn token(name: &str) -> String {
    let mut s = String::with_capacity(1 + name.len() * 4 / 3 + 3);
    s.push('c');
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode_string(name.as_bytes(), &mut s);
    s
}

/// The inverse of [`token`].
pub fn untoken(t: &str) -> Option<String> {
    let b = base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(t.strip_prefix('c')?).ok()?;
    String::from_utf8(b).ok()
}

pub(crate) fn unavailable(e: impl std::fmt::Display) -> BrokerError {
    BrokerError::Unavailable(e.to_string())
}

pub(crate) struct Inner {
    pub opts: NatsOptions,
    pub client: async_nats::Client,
    pub js: jetstream::Context,
    pub up: AtomicBool,
    pub reconnects: AtomicU64,
    pub publish_calls: AtomicU64,
    pub handler: OnceLock<Arc<dyn BrokerHandler>>,
    pub kv: state::Buckets,
    policies: HashMap<String, HistPolicy>,
    default_policy: HistPolicy,
    streams: HashMap<HistPolicy, stream::Stream>,
    tails: Mutex<HashMap<String, ChanPub>>,
    pub live: live::Live,
    /// The node's own subscriber connection (plain `nats://`, no credentials or a token).
    pub raw: Option<Arc<rawsub::RawSub>>,
}

/// The NATS broker (see the crate docs).
pub struct NatsBroker {
    inner: Arc<Inner>,
}

impl Inner {
    pub(crate) fn policy(&self, channel: &str) -> HistPolicy {
        Namespaces::namespace_of(channel).and_then(|ns| self.policies.get(ns)).copied().unwrap_or(self.default_policy)
    }

    pub(crate) fn hist_subject(&self, channel: &str) -> String {
        format!("{}.h.{}.{}", self.opts.prefix, self.policy(channel).id(), token(channel))
    }

    pub(crate) fn live_subject(&self, channel: &str) -> String {
        format!("{}.l.{}.{}", self.opts.prefix, self.policy(channel).id(), token(channel))
    }

    fn stream(&self, channel: &str) -> Result<&stream::Stream, BrokerError> {
        self.streams.get(&self.policy(channel)).ok_or_else(|| BrokerError::Internal("no stream for the policy".into()))
    }

    /// The channel's last stored message (marker included), `None` when it has none.
    async fn last(&self, channel: &str) -> Result<Option<Stored>, BrokerError> {
        let s = self.stream(channel)?;
        match s.get_last_raw_message_by_subject(&self.hist_subject(channel)).await {
            Ok(m) => Ok(Stored::from_headers(m.sequence, Some(&m.headers), m.payload)),
            Err(e) if e.kind() == stream::LastRawMessageErrorKind::NoMessageFound => Ok(None),
            Err(e) => Err(unavailable(e)),
        }
    }

    /// The stored message at stream sequence `seq`, `None` when gone.
    async fn at(&self, channel: &str, seq: u64) -> Result<Option<Stored>, BrokerError> {
        let s = self.stream(channel)?;
        match s.get_raw_message(seq).await {
            Ok(m) => Ok(Stored::from_headers(m.sequence, Some(&m.headers), m.payload)),
            Err(e) if e.kind() == stream::RawMessageErrorKind::NoMessageFound => Ok(None),
            Err(e) => Err(unavailable(e)),
        }
    }

    /// The channel's last message, writing an epoch marker when it has none.
    async fn last_or_marker(&self, channel: &str) -> Result<Stored, BrokerError> {
        for _ in 0..5 {
            if let Some(s) = self.last(channel).await? {
                return Ok(s);
            }
            let epoch = new_epoch();
            let msg = PublishMessage::build()
                .payload(Bytes::new())
                .header(H_EPOCH, epoch.as_str())
                .header(H_OFFSET, "0")
                .header(H_PREV, "0")
                .expected_last_subject_sequence(0);
            match self.js.send_publish(self.hist_subject(channel), msg).await {
                Ok(f) => match f.await {
                    Ok(ack) => {
                        return Ok(Stored {
                            seq: ack.sequence,
                            epoch: epoch.into(),
                            first: 0,
                            offset: 0,
                            prev: 0,
                            ts: 0,
                            lens: Vec::new(),
                            data: Bytes::new(),
                        });
                    }
                    Err(e) if e.kind() == PublishErrorKind::WrongLastSequence => continue,
                    Err(e) => return Err(unavailable(e)),
                },
                Err(e) => return Err(unavailable(e)),
            }
        }
        Err(BrokerError::Unavailable("could not settle the channel's epoch".into()))
    }

    pub(crate) async fn history(
        &self,
        channel: &str,
        since: Option<&StreamPosition>,
        limit: usize,
    ) -> Result<History, BrokerError> {
        let last = self.last_or_marker(channel).await?;
        let (epoch, top) = (last.epoch.to_string(), last.offset);
        let size = self.policy(channel).size as u64;
        // The offsets the policy keeps: the last `history_size`.
        let kept = top.saturating_sub(size) + 1;
        let lower = match since {
            Some(p) if p.epoch != epoch || p.offset > top => {
                return Ok(History { epoch, offset: top, publications: Vec::new(), gap: true });
            }
            Some(p) => (p.offset + 1).max(kept),
            None => (top + 1).saturating_sub(limit as u64).max(kept),
        };
        // Walk back along the channel's chain of stream sequences until `lower` is covered.
        let mut got: Vec<Stored> = Vec::new();
        let mut cur = Some(last);
        while let Some(m) = cur.take() {
            if m.offset == 0 || m.offset < lower {
                break;
            }
            let (prev, first) = (m.prev, m.first);
            got.push(m);
            if prev == 0 || first <= lower || got.len() as u64 > size + 1 {
                break;
            }
            cur = self.at(channel, prev).await?;
        }
        got.reverse();
        let mut publications: Vec<Publication> =
            got.iter().flat_map(|m| m.publications(channel)).filter(|p| p.offset >= lower).collect();
        let mut gap = false;
        if let Some(p) = since {
            let first = publications.first().map_or(top + 1, |m| m.offset);
            gap = top > p.offset && first != p.offset + 1;
            publications.truncate(limit);
        }
        Ok(History { epoch, offset: top, publications, gap })
    }

    /// Queues a publish on the channel's batch; a leader task (one per channel at a time)
    /// stores what queued as one message while the previous store is out.
    async fn publish(
        self: &Arc<Self>,
        channel: &str,
        data: &str,
        opts: PublishOptions<'_>,
    ) -> Result<PublishResult, BrokerError> {
        // Not connected: refused before anything is sent (the client would buffer the publish
        // and send it after a reconnect, long after the caller was told it failed).
        if self.client.connection_state() != async_nats::connection::State::Connected {
            return Err(BrokerError::Unavailable("not connected to NATS".into()));
        }
        let (tx, rx) = tokio::sync::oneshot::channel();
        let pending = Pending {
            data: Bytes::copy_from_slice(data.as_bytes()),
            key: opts.idempotency_key.map(|k| format!("{}:{k}", token(channel))),
            tx,
        };
        let lead = {
            let mut t = self.tails.lock().unwrap_or_else(|e| e.into_inner());
            if t.len() > 65_536 {
                t.retain(|_, c| c.busy);
            }
            let c = t.entry(channel.to_owned()).or_default();
            c.queue.push_back(pending);
            !std::mem::replace(&mut c.busy, true)
        };
        if lead {
            tokio::spawn(Inner::lead(self.clone(), channel.to_owned()));
        }
        rx.await.unwrap_or_else(|_| Err(BrokerError::OutcomeUnknown("the publisher stopped".into())))
    }

    /// Stores the channel's queued publishes, a batch at a time, until none is left.
    async fn lead(self: Arc<Self>, channel: String) {
        loop {
            let (batch, mut tail) = {
                let mut t = self.tails.lock().unwrap_or_else(|e| e.into_inner());
                let Some(c) = t.get_mut(&channel) else { return };
                let mut batch: Vec<Pending> = Vec::new();
                let mut bytes = 0;
                while let Some(p) = c.queue.front() {
                    // A keyed publish is stored alone (its key names one stored message).
                    let keyed = p.key.is_some();
                    if !batch.is_empty() && (keyed || batch.len() >= BATCH_MAX || bytes + p.data.len() > BATCH_BYTES) {
                        break;
                    }
                    bytes += p.data.len();
                    batch.extend(c.queue.pop_front());
                    if keyed {
                        break;
                    }
                }
                if batch.is_empty() {
                    c.busy = false;
                    return;
                }
                (batch, c.tail.take())
            };
            let result = self.store(&channel, &batch, &mut tail).await;
            if let Some(c) = self.tails.lock().unwrap_or_else(|e| e.into_inner()).get_mut(&channel) {
                c.tail = tail;
            }
            for (i, p) in batch.into_iter().enumerate() {
                let r = result
                    .as_ref()
                    .map(|(epoch, first)| PublishResult { epoch: epoch.clone(), offset: first + i as u64 })
                    .map_err(Clone::clone);
                let _ = p.tx.send(r);
            }
        }
    }

    /// Stores one batch (the first offset it got and its epoch), keeping `tail` current.
    async fn store(
        &self,
        channel: &str,
        batch: &[Pending],
        tail: &mut Option<Tail>,
    ) -> Result<(String, u64), BrokerError> {
        let subject = self.hist_subject(channel);
        let payload: Bytes = if batch.len() == 1 {
            batch[0].data.clone()
        } else {
            batch.iter().flat_map(|p| p.data.iter().copied()).collect::<Vec<u8>>().into()
        };
        let lens =
            (batch.len() > 1).then(|| batch.iter().map(|p| p.data.len().to_string()).collect::<Vec<_>>().join(","));
        let key = batch.first().and_then(|p| p.key.clone());
        for _ in 0..16 {
            let t = match tail.take() {
                Some(t) => t,
                None => match self.last(channel).await? {
                    Some(s) => Tail { seq: s.seq, epoch: s.epoch, offset: s.offset },
                    None => Tail { seq: 0, epoch: new_epoch().into(), offset: 0 },
                },
            };
            let first = t.offset + 1;
            let mut msg = PublishMessage::build()
                .payload(payload.clone())
                .header(H_EPOCH, &*t.epoch)
                .header(H_OFFSET, first.to_string().as_str())
                .header(H_PREV, t.seq.to_string().as_str())
                .header(H_TS, now_us().to_string().as_str())
                .expected_last_subject_sequence(t.seq);
            if let Some(l) = &lens {
                msg = msg.header(H_LENS, l.as_str());
            }
            if let Some(id) = &key {
                msg = msg.message_id(id);
            }
            self.publish_calls.fetch_add(1, Ordering::Relaxed);
            let fut = self.js.send_publish(subject.clone(), msg).await.map_err(unavailable)?;
            match fut.await {
                Ok(ack) if ack.duplicate => {
                    let firstp = self.at(channel, ack.sequence).await?.ok_or_else(|| {
                        BrokerError::Internal("the first publish of this idempotency key is no longer stored".into())
                    })?;
                    return Ok((firstp.epoch.to_string(), firstp.first));
                }
                Ok(ack) => {
                    let epoch = t.epoch.to_string();
                    *tail = Some(Tail { seq: ack.sequence, epoch: t.epoch, offset: first + batch.len() as u64 - 1 });
                    return Ok((epoch, first));
                }
                Err(e) if e.kind() == PublishErrorKind::WrongLastSequence => {}
                Err(e) if e.kind() == PublishErrorKind::TimedOut || e.kind() == PublishErrorKind::BrokenPipe => {
                    return Err(BrokerError::OutcomeUnknown(e.to_string()));
                }
                Err(e) => return Err(unavailable(e)),
            }
        }
        Err(BrokerError::Unavailable("too much contention on the channel".into()))
    }

    pub(crate) fn handler(&self) -> Option<&Arc<dyn BrokerHandler>> {
        self.handler.get()
    }
}

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
            .subscription_capacity(65_536)
            .reconnect_delay_callback(|n| Duration::from_millis((50u64 << n.min(5)).min(2000)));
        let mut token = None;
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
                token = Some(t.trim().to_owned());
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
                            inner.up.store(true, Ordering::SeqCst);
                            if !was {
                                inner.reconnects.fetch_add(1, Ordering::Relaxed);
                                inner.live.resync_all();
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
        let client = co.connect(urls).await.map_err(unavailable)?;
        let js = jetstream::ContextBuilder::new().timeout(opts.command_timeout).build(client.clone());
        // Wait (bounded) for the first connection, then lay out streams and buckets.
        let deadline = tokio::time::Instant::now() + opts.connect_wait.max(Duration::from_secs(5));
        while client.connection_state() != async_nats::connection::State::Connected {
            if tokio::time::Instant::now() > deadline {
                return Err(BrokerError::Unavailable("no NATS server reachable".into()));
            }
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
        // JetStream may still be electing its leaders (a cluster starting): the layout is
        // retried for up to `layout_wait`.
        let deadline = tokio::time::Instant::now() + opts.layout_wait;
        let (streams, kv) = loop {
            match layout(&js, &opts, default_policy, &policies).await {
                Ok(l) => break l,
                Err(e) if tokio::time::Instant::now() < deadline => {
                    tracing::warn!(error = %e, "nats: JetStream not ready yet; retrying");
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
                Err(e) => return Err(e),
            }
        };
        let plain: Option<Vec<String>> = opts.urls.iter().map(|u| rawsub::plain_addr(u)).collect();
        let raw = match (&opts.auth, plain, &opts.tls_ca_file) {
            (NatsAuth::None | NatsAuth::TokenFile(_), Some(addrs), None) => {
                let w = weak.clone();
                Some(rawsub::RawSub::start(addrs, token, format!("crier {} live", opts.node_id), move || {
                    if let Some(inner) = w.get().and_then(Weak::upgrade) {
                        inner.live.resync_all();
                    }
                }))
            }
            _ => None,
        };
        let inner = Arc::new(Inner {
            raw,
            live: live::Live::default(),
            client,
            js,
            up: AtomicBool::new(up.load(Ordering::SeqCst)),
            reconnects: AtomicU64::new(0),
            publish_calls: AtomicU64::new(0),
            handler: OnceLock::new(),
            kv,
            policies,
            default_policy,
            streams,
            tails: Mutex::new(HashMap::new()),
            opts,
        });
        inner.up.store(inner.client.connection_state() == async_nats::connection::State::Connected, Ordering::SeqCst);
        let _ = weak.set(Arc::downgrade(&inner));
        inner.live.set_inner(Arc::downgrade(&inner));
        if let Some(raw) = &inner.raw {
            raw.wait_connected(inner.opts.connect_wait).await;
        }
        state::start_ops(&inner).await?;
        Ok(Arc::new(NatsBroker { inner }))
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

#[async_trait]
impl Broker for NatsBroker {
    fn set_handler(&self, handler: Arc<dyn BrokerHandler>) {
        let _ = self.inner.handler.set(handler);
    }

    async fn publish(&self, channel: &str, data: &str, opts: PublishOptions<'_>) -> Result<PublishResult, BrokerError> {
        self.inner.publish(channel, data, opts).await
    }

    async fn subscribe(&self, channel: &str) -> Result<(), BrokerError> {
        self.inner.live.subscribe(&self.inner, channel).await
    }

    async fn unsubscribe(&self, channel: &str) -> Result<(), BrokerError> {
        if self.inner.handler().is_some_and(|h| h.has_subscribers(channel)) {
            return Ok(());
        }
        self.inner.live.unsubscribe(&self.inner, channel).await;
        Ok(())
    }

    async fn history(
        &self,
        channel: &str,
        since: Option<&StreamPosition>,
        limit: usize,
    ) -> Result<History, BrokerError> {
        let h = self.inner.history(channel, since, limit).await?;
        self.inner.live.wait_delivered(channel, &h.epoch, h.offset, self.inner.opts.command_timeout).await;
        Ok(h)
    }

    async fn presence_add(&self, channel: &str, entry: &PresenceEntry) -> Result<(), BrokerError> {
        self.inner.presence_add(channel, entry, 0, false).await.map(|_| ())
    }

    async fn presence_remove(&self, channel: &str, client: &str) -> Result<(), BrokerError> {
        self.inner.presence_remove(channel, client).await
    }

    async fn presence(&self, channel: &str) -> Result<Vec<PresenceEntry>, BrokerError> {
        self.inner.presence(channel).await
    }

    async fn presence_stats(&self, channel: &str) -> Result<PresenceStats, BrokerError> {
        let p = self.inner.presence(channel).await?;
        let users: std::collections::HashSet<&str> = p.iter().map(|e| e.user.as_str()).collect();
        Ok(PresenceStats { clients: p.len() as u64, users: users.len() as u64 })
    }

    async fn presence_add_counted(&self, channel: &str, entry: &PresenceEntry, max: u64) -> Result<u64, BrokerError> {
        self.inner.presence_add(channel, entry, max, true).await
    }

    async fn connection_opened(&self, user: &str, client: &str) -> Result<u64, BrokerError> {
        self.inner.connection_opened(user, client).await
    }

    async fn connection_closed(&self, user: &str, client: &str) -> Result<(), BrokerError> {
        self.inner.connection_closed(user, client).await
    }

    async fn disconnect_user(&self, user: &str) -> Result<u64, BrokerError> {
        self.inner.fan_op(user, None).await.map(|r| r.count)
    }

    async fn report_node(&self, info: &NodeInfo) -> Result<(), BrokerError> {
        self.inner.report_node(info).await
    }

    async fn nodes(&self) -> Result<Vec<NodeInfo>, BrokerError> {
        self.inner.nodes().await
    }

    fn is_up(&self) -> bool {
        self.inner.up.load(Ordering::SeqCst)
            && self.inner.client.connection_state() == async_nats::connection::State::Connected
    }

    async fn report_channels(&self, node: &str, counts: &[(String, u64)], full: bool) -> Result<bool, BrokerError> {
        self.inner.report_channels(node, counts, full).await
    }

    async fn channels(
        &self,
        prefix: &str,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<ChannelCount>, BrokerError> {
        self.inner.channels(prefix, after, limit).await
    }

    async fn delete_history(&self, channel: &str) -> Result<(), BrokerError> {
        let s = self.inner.stream(channel)?;
        s.purge().filter(self.inner.hist_subject(channel)).await.map_err(unavailable)?;
        if let Some(c) = self.inner.tails.lock().unwrap_or_else(|e| e.into_inner()).get_mut(channel) {
            c.tail = None;
        }
        Ok(())
    }

    async fn user_op(&self, user: &str, op: &UserOp) -> Result<UserOpReply, BrokerError> {
        if let UserOp::Invalidate { before } = op {
            self.inner.store_revocation(user, *before).await?;
        }
        self.inner.fan_op(user, Some(op)).await
    }

    async fn revocations(&self, since: u64) -> Result<Vec<Revocation>, BrokerError> {
        self.inner.revocations(since).await
    }

    async fn rate_limit(&self, key: &str, rate: u32, burst: u32) -> Result<Option<Duration>, BrokerError> {
        self.inner.rate_limit(key, rate, burst).await
    }

    fn shares_rate_limits(&self) -> bool {
        true
    }

    fn reconnects(&self) -> u64 {
        self.inner.reconnects.load(Ordering::Relaxed)
    }

    fn publish_calls(&self) -> u64 {
        self.inner.publish_calls.load(Ordering::Relaxed)
    }
}
