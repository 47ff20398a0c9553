//! Cluster state in JetStream key-value buckets (presence, connection counts, node registry,
//! channel counts, rate limits, revocations).
//!
//! Every bucket keeps one revision per key and expires keys by `max_age`; a value is a small
//! JSON document updated by compare-and-set on the key's revision, except presence: one key per
//! (channel, client), created (a join) or rewritten (a refresh), deleted at the revision read (a
//! leave, once), listed through a short-lived consumer filtered on the channel's keys.
//!
//! A presence entry names its writer (this start of a node, [`Inner::instance`]) and is live
//! while its writer is: each node writes one key of its own in the bucket `<prefix>_alive`
//! (`max_age` = `presence_ttl`) every third of `presence_ttl`, so a dead node's entries drop out
//! of listings within `presence_ttl` — one write per node per period, where rewriting every
//! entry cost one JetStream store per entry (100,000 subscriptions: 10,000 stores a second with
//! nobody doing anything). An entry's own expiry (`presence_ttl` × [`ENTRY_LIFE_TTLS`]) is a
//! backstop, and the node rewrites its entries only every third of that, after a reconnect
//! (NATS may have lost its data) and after its liveness key may have lapsed (other nodes may
//! have swept its entries as a dead node's). Connection entries are rewritten every third of
//! their TTL.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::time::Duration;

use async_nats::jetstream::{self, kv};
use bytes::Bytes;
use crier_core::broker::{BrokerError, ChannelCount, NodeInfo, OwnEntries, Revocation, TransportCounts};
use crier_protocol::frames::PresenceEntry;
use futures_util::StreamExt;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::{H_CLIENT, H_KIND, Inner, NatsOptions, now_ms, now_us, token, unavailable, untoken};

pub(crate) struct Buckets {
    /// One key per (channel, client): `<channel token>.<client token>`.
    presence: kv::Store,
    presence_stream: jetstream::stream::Stream,
    presence_subject: String,
    conns: kv::Store,
    /// One key per live writer of presence entries ([`Inner::instance`]), `max_age` =
    /// `presence_ttl`.
    alive: kv::Store,
    nodes: kv::Store,
    chans: kv::Store,
    rate: kv::Store,
    revs: kv::Store,
}

pub(crate) async fn bucket(
    js: &jetstream::Context,
    o: &NatsOptions,
    name: &str,
    max_age: Duration,
) -> Result<kv::Store, BrokerError> {
    // The bucket's stream is laid out here (as the key-value API lays it out) so the same call
    // works on every server version (nats-server 2.9 included): one value per key, expiry by age.
    let bucket = format!("{}_{name}", o.prefix.replace(['.', '*', '>', ' '], "_"));
    let config = jetstream::stream::Config {
        name: format!("KV_{bucket}"),
        subjects: vec![format!("$KV.{bucket}.>")],
        max_messages_per_subject: 1,
        max_age,
        duplicate_window: max_age.min(Duration::from_secs(120)),
        discard: jetstream::stream::DiscardPolicy::New,
        allow_rollup: true,
        deny_delete: true,
        allow_direct: true,
        storage: jetstream::stream::StorageType::File,
        num_replicas: o.replicas.max(1),
        ..Default::default()
    };
    js.create_or_update_stream(config).await.map_err(|e| unavailable(format!("bucket {name}: {e}")))?;
    js.get_key_value(&bucket).await.map_err(|e| unavailable(format!("bucket {name}: {e}")))
}

impl Buckets {
    pub(crate) async fn create(js: &jetstream::Context, o: &NatsOptions) -> Result<Buckets, BrokerError> {
        // Presence keys outlive their entry's own expiry (the backstop) by as much again, so the
        // sweep still sees an expired entry (and announces its leave once) before it vanishes.
        let presence = bucket(js, o, "presence", o.presence_ttl * ENTRY_LIFE_TTLS * 2).await?;
        let name = format!("{}_presence", o.prefix.replace(['.', '*', '>', ' '], "_"));
        let presence_stream = js.get_stream(format!("KV_{name}")).await.map_err(unavailable)?;
        Ok(Buckets {
            presence,
            presence_stream,
            presence_subject: format!("$KV.{name}"),
            conns: bucket(js, o, "conns", o.presence_ttl).await?,
            alive: bucket(js, o, "alive", o.presence_ttl).await?,
            nodes: bucket(js, o, "nodes", o.node_ttl).await?,
            chans: bucket(js, o, "chans", o.node_ttl).await?,
            rate: bucket(js, o, "rate", Duration::from_secs(3600)).await?,
            revs: bucket(js, o, "revs", o.revocation_ttl).await?,
        })
    }
}

/// Reads `key`, lets `f` change the value (returning whether to write it), writes it back if the
/// revision is still the one read; retries on a lost race.
async fn cas<T, R>(store: &kv::Store, key: &str, mut f: impl FnMut(&mut T) -> (bool, R)) -> Result<R, BrokerError>
where
    T: Serialize + DeserializeOwned + Default,
{
    for _ in 0..64 {
        let entry = store.entry(key).await.map_err(unavailable)?;
        let (mut value, revision) = match entry {
            Some(e) if e.operation == kv::Operation::Put => {
                (serde_json::from_slice(&e.value).unwrap_or_default(), e.revision)
            }
            Some(e) => (T::default(), e.revision),
            None => (T::default(), 0),
        };
        let (write, r) = f(&mut value);
        if !write {
            return Ok(r);
        }
        let bytes = serde_json::to_vec(&value).map_err(|e| BrokerError::Internal(e.to_string()))?;
        match store.update(key, bytes.into(), revision).await {
            Ok(_) => return Ok(r),
            Err(e) if e.kind() == kv::UpdateErrorKind::WrongLastRevision => continue,
            Err(e) => return Err(unavailable(e)),
        }
    }
    Err(BrokerError::Unavailable("too much contention on a key".into()))
}

async fn get<T: DeserializeOwned + Default>(store: &kv::Store, key: &str) -> Result<T, BrokerError> {
    Ok(store.get(key).await.map_err(unavailable)?.and_then(|b| serde_json::from_slice(&b).ok()).unwrap_or_default())
}

/// The bucket's keys: the subjects of its stream, in one API request (paged) — not a key-value
/// key listing, whose consumer can wait on a key that expires while it is listed (these buckets'
/// keys expire by `max_age`, and none is ever deleted, so every subject is a key with a value).
pub(crate) async fn keys(store: &kv::Store) -> Result<Vec<String>, BrokerError> {
    let mut subjects = store.stream.info_with_subjects(format!("{}>", store.prefix)).await.map_err(unavailable)?;
    let mut out = Vec::new();
    while let Some(s) = subjects.next().await {
        let (subject, _) = s.map_err(unavailable)?;
        if let Some(key) = subject.strip_prefix(store.prefix.as_str()) {
            out.push(key.to_owned());
        }
    }
    Ok(out)
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Member {
    u: String,
    n: String,
    /// Expiry, ms since the Unix epoch.
    e: u64,
    /// The writer ([`Inner::instance`]): the entry is live while its key in the `alive` bucket
    /// is. Absent (an entry of an older crier): live until its expiry.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    w: Option<String>,
}

/// A presence entry's own expiry, in `presence_ttl`s (the writer's liveness decides first).
pub(crate) const ENTRY_LIFE_TTLS: u32 = 30;

/// The writers known alive (the `alive` bucket's keys, listed now and then).
#[derive(Default)]
pub(crate) struct Alive {
    listed: Option<std::time::Instant>,
    writers: HashSet<String>,
    /// Writers missing from a listing taken after an entry naming them was read, and when:
    /// dead, without listing again, for a `presence_ttl` (a writer whose key lapsed and came
    /// back is alive again after that).
    dead: HashMap<String, std::time::Instant>,
    /// Every writer some listing held (for the webhook sweep: those no longer alive died).
    seen: HashSet<String>,
}

/// When this node's entries were last all rewritten, and its liveness key last written.
#[derive(Default)]
pub(crate) struct Rewrites {
    /// The last rewrite of every entry (the first refresh, at first), and the reconnect count
    /// and lapse count then.
    full: Option<(std::time::Instant, u64, u64)>,
    /// The last liveness write that succeeded.
    beat: Option<std::time::Instant>,
    /// Beats that came a `presence_ttl` or more after the one before: other nodes may have
    /// swept this node's entries as a dead node's meanwhile, so every entry is written again.
    lapses: u64,
    /// Rewrites of every entry done (the webhook occupancy follows them: hooks.rs).
    done: u64,
    /// The dead writers the last sweep of presence handled, and when it ran (`None`: none yet).
    swept: Option<(HashSet<String>, std::time::Instant)>,
}

/// A node's registry entry as stored (NodeInfo is not deserializable).
#[derive(Debug, Clone, Serialize, Deserialize)]
struct NodeRec {
    node: String,
    connections: u64,
    version: String,
    ready: bool,
    #[serde(default)]
    uptime_s: u64,
    #[serde(default)]
    transports: TransportCounts,
    #[serde(default)]
    memory_bytes: u64,
}

/// Entries copied out of [`OwnEntries`] per step of a refresh.
const REFRESH_BATCH: usize = 500;
/// Key-value writes in flight at once during a refresh.
const REFRESH_CONCURRENCY: usize = 32;

impl Inner {
    fn own(&self) -> std::sync::MutexGuard<'_, OwnEntries> {
        self.own.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn ttl_ms(&self) -> u64 {
        self.opts.presence_ttl.as_millis() as u64
    }

    /// A presence entry written now by this node.
    fn member(&self, user: &str, node: &str) -> Member {
        Member {
            u: user.to_owned(),
            n: node.to_owned(),
            e: now_ms() + self.ttl_ms() * u64::from(ENTRY_LIFE_TTLS),
            w: Some(self.instance.clone()),
        }
    }

    /// Which of `writers` (named by entries read at `read_at`) are alive: this node, and those in
    /// the `alive` bucket's keys. The keys are listed again when the list is older than a third
    /// of `presence_ttl`, and when a writer is missing from a list taken before `read_at` (a node
    /// started since) unless it was found dead lately; one missing from a list taken after is
    /// dead (its key lapsed).
    pub(crate) async fn alive_among(
        &self,
        writers: &[&str],
        read_at: std::time::Instant,
    ) -> Result<HashSet<String>, BrokerError> {
        for _ in 0..2 {
            {
                let mut guard = self.alive.lock().unwrap_or_else(|e| e.into_inner());
                let a = &mut *guard;
                let ttl = self.opts.presence_ttl;
                let fresh = a.listed.is_some_and(|at| at.elapsed() < ttl / 3);
                let after = a.listed.is_some_and(|at| at > read_at);
                let missing: Vec<&str> =
                    writers.iter().copied().filter(|w| *w != self.instance && !a.writers.contains(*w)).collect();
                let undecided = !after && missing.iter().any(|w| a.dead.get(*w).is_none_or(|at| at.elapsed() >= ttl));
                if fresh && !undecided {
                    let mut out: HashSet<String> =
                        writers.iter().filter(|w| !missing.contains(w)).map(|w| (*w).to_owned()).collect();
                    out.insert(self.instance.clone());
                    if after {
                        let now = std::time::Instant::now();
                        for w in &missing {
                            a.dead.entry((*w).to_owned()).or_insert(now);
                        }
                    }
                    a.dead.retain(|_, at| at.elapsed() < ttl);
                    return Ok(out);
                }
            }
            let listed: HashSet<String> = keys(&self.kv()?.alive).await?.iter().filter_map(|k| untoken(k)).collect();
            let mut a = self.alive.lock().unwrap_or_else(|e| e.into_inner());
            a.listed = Some(std::time::Instant::now());
            if a.seen.len() > 65_536 {
                a.seen.clear();
            }
            a.seen.extend(listed.iter().cloned());
            a.writers = listed;
        }
        Err(BrokerError::Unavailable("nats: the liveness keys could not be listed".into()))
    }

    /// The writers alive now (this node included), and those a listing held that are no longer
    /// alive (listed again when the list is older than a third of `presence_ttl`).
    pub(crate) async fn alive_listed(&self) -> Result<(HashSet<String>, HashSet<String>), BrokerError> {
        self.alive_among(&[], std::time::Instant::now()).await?;
        let a = self.alive.lock().unwrap_or_else(|e| e.into_inner());
        let mut alive = a.writers.clone();
        alive.insert(self.instance.clone());
        let gone = a.seen.iter().filter(|w| !alive.contains(*w)).cloned().collect();
        Ok((alive, gone))
    }

    /// The channel's presence entries as stored, each with whether it is live (not expired, and
    /// its writer alive).
    async fn presence_judged(&self, channel: &str) -> Result<Vec<(String, u64, Member, bool)>, BrokerError> {
        let read_at = std::time::Instant::now();
        let entries = self.presence_entries(channel).await?;
        let alive = {
            let writers: Vec<&str> = entries.iter().filter_map(|e| e.2.w.as_deref()).collect();
            self.alive_among(&writers, read_at).await?
        };
        let now = now_ms();
        Ok(entries
            .into_iter()
            .map(|(client, rev, m)| {
                let live = m.e > now && m.w.as_ref().is_none_or(|w| *w == self.instance || alive.contains(w.as_str()));
                (client, rev, m, live)
            })
            .collect())
    }

    /// How many times this node wrote every presence entry again (after a reconnect, a lapse,
    /// a third of the entries' life).
    pub(crate) fn rewrites_done(&self) -> u64 {
        self.rewrites.lock().unwrap_or_else(|e| e.into_inner()).done
    }

    /// Writes this node's liveness key (its presence entries are live while it lasts): every
    /// third of `presence_ttl` from a task of its own (a slow refresh never delays it), and once
    /// the streams and buckets are laid out.
    pub(crate) async fn beat(&self) -> Result<(), BrokerError> {
        self.beat_in(self.kv()?).await
    }

    /// [`Inner::beat`] into `kv` (before it is the node's: a first beat precedes every entry).
    pub(crate) async fn beat_in(&self, kv: &Buckets) -> Result<(), BrokerError> {
        kv.alive.put(token(&self.instance), self.opts.node_id.clone().into()).await.map_err(unavailable)?;
        let mut r = self.rewrites.lock().unwrap_or_else(|e| e.into_inner());
        if r.beat.is_some_and(|b| b.elapsed() >= self.opts.presence_ttl) {
            r.lapses += 1;
        }
        r.beat = Some(std::time::Instant::now());
        Ok(())
    }

    async fn announce(&self, channel: &str, kind: &str, client: &str, m: &Member) {
        let entry = PresenceEntry { client: client.to_owned(), user: m.u.clone(), node: m.n.clone() };
        let json = serde_json::to_string(&entry).unwrap_or_else(|_| "{}".into());
        let frame = crier_protocol::frames::encode_presence_event(kind, channel, &json);
        // On the connection the node's publishes take: the event lands between the messages
        // stored before and after it.
        let client: String = client.chars().filter(|c| !c.is_control()).collect();
        let kind = if kind == "join" { "j" } else { "l" };
        let h = format!("NATS/1.0\r\n{H_KIND}: {kind}\r\n{H_CLIENT}: {client}\r\n\r\n");
        if let Err(e) = self.raw.publish(&self.live_subject(channel), h.as_bytes(), &frame).await {
            tracing::warn!(error = %e, "nats: presence event not sent");
        }
    }

    async fn announce_all(&self, channel: &str, joined: Option<(&str, &Member)>, left: &[(String, Member)]) {
        if !self.opts.namespaces.policy(channel).join_leave {
            return;
        }
        for (c, m) in left {
            self.announce(channel, "leave", c, m).await;
        }
        if let Some((c, m)) = joined {
            self.announce(channel, "join", c, m).await;
        }
    }

    fn presence_key(channel: &str, client: &str) -> String {
        format!("{}.{}", token(channel), token(client))
    }

    /// The channel's presence entries as stored (expired ones included): (client, revision, entry).
    async fn presence_entries(&self, channel: &str) -> Result<Vec<(String, u64, Member)>, BrokerError> {
        use jetstream::consumer::{AckPolicy, DeliverPolicy, pull};
        let config = pull::Config {
            filter_subject: format!("{}.{}.*", self.kv()?.presence_subject, token(channel)),
            deliver_policy: DeliverPolicy::LastPerSubject,
            ack_policy: AckPolicy::None,
            inactive_threshold: Duration::from_secs(10),
            memory_storage: true,
            ..Default::default()
        };
        let consumer = self.kv()?.presence_stream.create_consumer(config).await.map_err(unavailable)?;
        let name = consumer.cached_info().name.clone();
        let pending = consumer.cached_info().num_pending as usize;
        let mut out = Vec::with_capacity(pending);
        if pending > 0 {
            let mut batch = consumer
                .fetch()
                .max_messages(pending)
                .expires(self.opts.command_timeout)
                .messages()
                .await
                .map_err(unavailable)?;
            let mut seen = 0;
            while seen < pending {
                let Some(m) = batch.next().await else { break };
                let m = m.map_err(unavailable)?;
                seen += 1;
                let deleted = crate::header(m.headers.as_ref(), "KV-Operation").is_some();
                let Some(client) = m.subject.rsplit('.').next().and_then(untoken) else { continue };
                let seq = m.info().map(|i| i.stream_sequence).unwrap_or(0);
                if let (false, Ok(member)) = (deleted, serde_json::from_slice::<Member>(&m.payload)) {
                    out.push((client, seq, member));
                }
            }
        }
        let stream = self.kv()?.presence_stream.clone();
        tokio::spawn(async move {
            let _ = stream.delete_consumer(&name).await;
        });
        Ok(out)
    }

    /// Adds or refreshes `entry`; with `counted`, answers the channel's live entries after it
    /// (and with `max` > 0 refuses a newcomer to a full channel), else 0 without listing.
    pub(crate) async fn presence_add(
        &self,
        channel: &str,
        entry: &PresenceEntry,
        max: u64,
        counted: bool,
    ) -> Result<u64, BrokerError> {
        let member = self.member(&entry.user, &entry.node);
        let key = Inner::presence_key(channel, &entry.client);
        // Counted: the live entries first (checked, then added: two adds racing for the last
        // place may both get in).
        let mut count = 0;
        if max > 0 {
            let live: Vec<String> =
                self.presence_judged(channel).await?.into_iter().filter(|e| e.3).map(|e| e.0).collect();
            let member_already = live.contains(&entry.client);
            if !member_already && live.len() as u64 >= max {
                return Ok(live.len() as u64 + 1);
            }
            count = live.len() as u64 + u64::from(!member_already);
        }
        let value: bytes::Bytes = serde_json::to_vec(&member).map_err(|e| BrokerError::Internal(e.to_string()))?.into();
        let joined = match self.kv()?.presence.create(&key, value.clone()).await {
            Ok(_) => true,
            Err(e) if e.kind() == kv::CreateErrorKind::AlreadyExists => {
                self.kv()?.presence.put(&key, value).await.map_err(unavailable)?;
                false
            }
            Err(e) => return Err(unavailable(e)),
        };
        self.own().add_presence(channel, entry);
        if joined {
            self.announce_all(channel, Some((entry.client.as_str(), &member)), &[]).await;
            self.hook_member(crier_core::broker::hooks::MEMBER_ADDED, channel, &entry.user, &entry.client).await;
        }
        if counted && max == 0 {
            count = self.presence_judged(channel).await?.iter().filter(|e| e.3).count() as u64;
        }
        Ok(count)
    }

    pub(crate) async fn presence_remove(&self, channel: &str, client: &str) -> Result<(), BrokerError> {
        self.own().remove_presence(channel, client);
        let key = Inner::presence_key(channel, client);
        let Some(e) = self.kv()?.presence.entry(&key).await.map_err(unavailable)? else { return Ok(()) };
        if e.operation != kv::Operation::Put {
            return Ok(());
        }
        let Ok(member) = serde_json::from_slice::<Member>(&e.value) else { return Ok(()) };
        // Deleted at the revision read: of two removes (or a remove and a sweep) one wins, once.
        if self.kv()?.presence.delete_expect_revision(&key, Some(e.revision)).await.is_ok() {
            self.hook_member(crier_core::broker::hooks::MEMBER_REMOVED, channel, &member.u, client).await;
            self.announce_all(channel, None, &[(client.to_owned(), member)]).await;
        }
        Ok(())
    }

    pub(crate) async fn presence(&self, channel: &str) -> Result<Vec<PresenceEntry>, BrokerError> {
        Ok(self
            .presence_judged(channel)
            .await?
            .into_iter()
            .filter(|e| e.3)
            .map(|(client, _, m, _)| PresenceEntry { client, user: m.u, node: m.n })
            .collect())
    }

    pub(crate) async fn connection_opened(&self, user: &str, client: &str) -> Result<u64, BrokerError> {
        let ttl = self.ttl_ms();
        let n = cas(&self.kv()?.conns, &token(user), |m: &mut BTreeMap<String, u64>| {
            let now = now_ms();
            m.retain(|_, e| *e > now);
            m.insert(client.to_owned(), now + ttl);
            (true, m.len() as u64)
        })
        .await?;
        self.own().add_connection(user, client);
        Ok(n)
    }

    pub(crate) async fn connection_closed(&self, user: &str, client: &str) -> Result<(), BrokerError> {
        self.own().remove_connection(user, client);
        cas(&self.kv()?.conns, &token(user), |m: &mut BTreeMap<String, u64>| {
            let now = now_ms();
            let before = m.len();
            m.retain(|c, e| *e > now && c != client);
            (m.len() != before, ())
        })
        .await
    }

    /// Writes this node's liveness key, rewrites its presence entries when due (see the module
    /// docs), sweeps the entries of dead writers, and rewrites its connection entries with a
    /// fresh expiry.
    pub(crate) async fn refresh(&self) -> Result<(), BrokerError> {
        let ttl = self.ttl_ms();
        let reconnects = self.reconnects.load(std::sync::atomic::Ordering::Relaxed);
        let full = {
            let mut r = self.rewrites.lock().unwrap_or_else(|e| e.into_inner());
            // Every entry again: after a reconnect (the store may be new), after a lapse of this
            // node's liveness key, and every third of the entries' own life. (Not at the first
            // refresh: every entry of this start was written since, by its add.)
            let lapses = r.lapses;
            let (at, n, l) = *r.full.get_or_insert((std::time::Instant::now(), 0, 0));
            let due = l != lapses || n != reconnects || at.elapsed() >= self.opts.presence_ttl * ENTRY_LIFE_TTLS / 3;
            due.then_some(lapses)
        };
        if let Some(lapses) = full {
            self.rewrite_presence().await?;
            let mut r = self.rewrites.lock().unwrap_or_else(|e| e.into_inner());
            r.full = Some((std::time::Instant::now(), reconnects, lapses));
            r.done += 1;
        }
        // The sweep: entries of dead writers (and expired ones) of the join_leave channels this
        // node is subscribed to (all of them with member webhooks) leave, announced once
        // (deleted at the revision read). Only when a writer died since the last sweep, after a
        // rewrite, and every third of the entries' life (an older crier's entries expire):
        // listing a channel's presence is a consumer, and a node may hold thousands of
        // join_leave channels.
        let (_, gone) = self.alive_listed().await?;
        let due = {
            let r = self.rewrites.lock().unwrap_or_else(|e| e.into_inner());
            full.is_some()
                || r.swept.as_ref().is_none_or(|(handled, at)| {
                    gone.iter().any(|w| !handled.contains(w))
                        || at.elapsed() >= self.opts.presence_ttl * ENTRY_LIFE_TTLS / 3
                })
        };
        if due {
            self.sweep_presence().await?;
            self.rewrites.lock().unwrap_or_else(|e| e.into_inner()).swept = Some((gone, std::time::Instant::now()));
        }
        self.refresh_connections(ttl).await
    }

    /// Deletes the entries of dead writers (and expired ones) of the channels this node sweeps
    /// (see [`Inner::refresh`]), each leave announced once.
    async fn sweep_presence(&self) -> Result<(), BrokerError> {
        for channel in self.live.channels() {
            if !self.opts.namespaces.policy(&channel).join_leave && !self.hooks.members_enabled() {
                continue;
            }
            for (client, rev, m, live) in self.presence_judged(&channel).await? {
                if !live
                    && self
                        .kv()?
                        .presence
                        .delete_expect_revision(Inner::presence_key(&channel, &client), Some(rev))
                        .await
                        .is_ok()
                {
                    self.hook_member(crier_core::broker::hooks::MEMBER_REMOVED, &channel, &m.u, &client).await;
                    self.announce_all(&channel, None, &[(client, m)]).await;
                }
            }
        }
        Ok(())
    }

    /// Rewrites every presence entry of this node.
    async fn rewrite_presence(&self) -> Result<(), BrokerError> {
        // In batches (the entries of a batch copied out of the lock, then written a few at a
        // time): the node's entries may be many, and the refresh must not hold a copy of all.
        let mut done = 0usize;
        loop {
            let batch: Vec<(String, Bytes)> = {
                let own = self.own();
                own.presence()
                    .skip(done)
                    .take(REFRESH_BATCH)
                    .map(|p| {
                        let value = serde_json::to_vec(&self.member(p.user, p.node)).unwrap_or_default();
                        (Inner::presence_key(p.channel, p.client), value.into())
                    })
                    .collect()
            };
            let n = batch.len();
            let mut puts =
                futures_util::stream::iter(batch)
                    .map(|(key, value)| async move {
                        self.kv()?.presence.put(key, value).await.map(drop).map_err(unavailable)
                    })
                    .buffer_unordered(REFRESH_CONCURRENCY);
            while let Some(r) = puts.next().await {
                r?;
            }
            done += n;
            if n < REFRESH_BATCH {
                break;
            }
        }
        Ok(())
    }

    /// Rewrites this node's connection entries with a fresh expiry.
    async fn refresh_connections(&self, ttl: u64) -> Result<(), BrokerError> {
        let mut done = 0usize;
        loop {
            let (n, by_user) = {
                let own = self.own();
                let mut by_user: HashMap<String, Vec<String>> = HashMap::new();
                let mut n = 0;
                for (user, client) in own.connections().skip(done).take(REFRESH_BATCH) {
                    by_user.entry(user.to_owned()).or_default().push(client.to_owned());
                    n += 1;
                }
                (n, by_user)
            };
            let mut writes = futures_util::stream::iter(by_user)
                .map(|(user, clients)| async move {
                    cas(&self.kv()?.conns, &token(&user), |m: &mut BTreeMap<String, u64>| {
                        let now = now_ms();
                        m.retain(|_, e| *e > now);
                        for c in &clients {
                            m.insert(c.clone(), now + ttl);
                        }
                        (true, ())
                    })
                    .await
                })
                .buffer_unordered(REFRESH_CONCURRENCY);
            while let Some(r) = writes.next().await {
                r?;
            }
            done += n;
            if n < REFRESH_BATCH {
                break;
            }
        }
        Ok(())
    }

    pub(crate) async fn report_node(&self, info: &NodeInfo) -> Result<(), BrokerError> {
        let rec = NodeRec {
            node: info.node.clone(),
            connections: info.connections,
            version: info.version.clone(),
            ready: info.ready,
            uptime_s: info.uptime_s,
            transports: info.transports,
            memory_bytes: info.memory_bytes,
        };
        let bytes = serde_json::to_vec(&rec).map_err(|e| BrokerError::Internal(e.to_string()))?;
        self.kv()?.nodes.put(token(&info.node), bytes.into()).await.map_err(unavailable)?;
        // The node's channel counts live as long as its registry entry.
        cas(&self.kv()?.chans, &token(&info.node), |m: &mut BTreeMap<String, u64>| (!m.is_empty(), ())).await
    }

    pub(crate) async fn nodes(&self) -> Result<Vec<NodeInfo>, BrokerError> {
        let mut out = Vec::new();
        for k in keys(&self.kv()?.nodes).await? {
            if let Some(b) = self.kv()?.nodes.get(&k).await.map_err(unavailable)?
                && let Ok(r) = serde_json::from_slice::<NodeRec>(&b)
            {
                out.push(NodeInfo {
                    node: r.node,
                    connections: r.connections,
                    version: r.version,
                    ready: r.ready,
                    uptime_s: r.uptime_s,
                    transports: r.transports,
                    memory_bytes: r.memory_bytes,
                });
            }
        }
        out.sort_by(|a, b| a.node.cmp(&b.node));
        Ok(out)
    }

    pub(crate) async fn report_channels(
        &self,
        node: &str,
        counts: &[(String, u64)],
        full: bool,
    ) -> Result<bool, BrokerError> {
        cas(&self.kv()?.chans, &token(node), |m: &mut BTreeMap<String, u64>| {
            let held = !m.is_empty();
            if full {
                m.clear();
            }
            for (c, n) in counts {
                if *n == 0 {
                    m.remove(c);
                } else {
                    m.insert(c.clone(), *n);
                }
            }
            (true, held)
        })
        .await
    }

    pub(crate) async fn channels(
        &self,
        prefix: &str,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<ChannelCount>, BrokerError> {
        let live: HashSet<String> = keys(&self.kv()?.nodes).await?.into_iter().collect();
        let mut sum: BTreeMap<String, u64> = BTreeMap::new();
        for k in keys(&self.kv()?.chans).await? {
            if !live.contains(&k) {
                continue;
            }
            let m: BTreeMap<String, u64> = get(&self.kv()?.chans, &k).await?;
            for (c, n) in m {
                if c.starts_with(prefix) && after.is_none_or(|a| c.as_str() > a) {
                    *sum.entry(c).or_default() += n;
                }
            }
        }
        Ok(sum.into_iter().take(limit).map(|(channel, subscribers)| ChannelCount { channel, subscribers }).collect())
    }

    pub(crate) async fn rate_limit(&self, key: &str, rate: u32, burst: u32) -> Result<Option<Duration>, BrokerError> {
        let interval = 1_000_000 / u64::from(rate.max(1));
        let tolerance = interval * u64::from(burst.max(1));
        let wait = cas(&self.kv()?.rate, &token(key), |tat: &mut u64| {
            let now = now_us();
            let new_tat = (*tat).max(now) + interval;
            if new_tat - now > tolerance {
                return (false, Some(new_tat - now - tolerance));
            }
            *tat = new_tat;
            (true, None)
        })
        .await?;
        Ok(wait.map(|us| Duration::from_micros(us.max(1000))))
    }

    pub(crate) async fn store_revocation(&self, user: &str, before: u64) -> Result<(), BrokerError> {
        cas(&self.kv()?.revs, &token(user), |b: &mut u64| {
            if *b >= before {
                return (false, ());
            }
            *b = before;
            (true, ())
        })
        .await
    }

    pub(crate) async fn revocations(&self, since: u64) -> Result<Vec<Revocation>, BrokerError> {
        let mut out = Vec::new();
        for k in keys(&self.kv()?.revs).await? {
            let before: u64 = get(&self.kv()?.revs, &k).await?;
            if before >= since
                && let Some(user) = untoken(&k)
            {
                out.push(Revocation { user, before });
            }
        }
        Ok(out)
    }
}
