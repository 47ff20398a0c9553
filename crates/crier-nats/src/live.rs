//! Live fan-out: one core NATS subscription per subscribed channel, fed by the stream's
//! republish, and a per-channel sequencer that turns it into "every message once, in order,
//! or a gap".

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock, Weak};
use std::time::Duration;

use crier_core::broker::{BrokerError, PresenceEvent};
use crier_protocol::StreamPosition;
use futures_util::StreamExt;

use crate::{H_CLIENT, H_KIND, Inner, Stored, header, unavailable};

/// Where a channel's live messages come from.
enum Feed {
    Nats(async_nats::Subscriber),
    Raw(u64, Arc<crate::rawsub::Inbox>),
}

impl Feed {
    async fn next(&mut self) -> Option<crate::rawsub::Live> {
        match self {
            Feed::Nats(s) => s.next().await.map(|m| (m.headers, m.payload)),
            Feed::Raw(_, inbox) => inbox.next().await,
        }
    }

    async fn close(self, inner: &Weak<Inner>) {
        match self {
            Feed::Nats(mut s) => {
                let _ = s.unsubscribe().await;
            }
            Feed::Raw(sid, _) => {
                if let Some(raw) = inner.upgrade().and_then(|i| i.raw.clone()) {
                    raw.unsubscribe(sid).await;
                }
            }
        }
    }
}

/// A subscribed channel: its task's command queue and how far it delivered.
struct Chan {
    shared: Arc<Shared>,
}

/// How far a channel's task delivered (for history reads that must not run ahead of it).
#[derive(Default)]
struct Shared {
    pos: Mutex<(Option<Arc<str>>, u64)>,
    notify: tokio::sync::Notify,
    /// Commands to the channel's task (flags, woken by `wake`): re-read from JetStream, stop.
    resync: std::sync::atomic::AtomicBool,
    stop: std::sync::atomic::AtomicBool,
    wake: tokio::sync::Notify,
}

impl Shared {
    fn command(&self, stop: bool) {
        let flag = if stop { &self.stop } else { &self.resync };
        flag.store(true, std::sync::atomic::Ordering::SeqCst);
        self.wake.notify_one();
    }
}

impl Shared {
    fn reached(&self, epoch: &str, offset: u64) -> bool {
        let p = self.pos.lock().unwrap_or_else(|e| e.into_inner());
        offset == 0 || (p.0.as_deref() == Some(epoch) && p.1 >= offset)
    }
}

#[derive(Default)]
pub(crate) struct Live {
    inner: OnceLock<Weak<Inner>>,
    channels: Mutex<HashMap<String, Chan>>,
}

/// Where a node is in a channel: the epoch and last offset it delivered.
struct Seq {
    channel: String,
    epoch: Option<Arc<str>>,
    last: u64,
    shared: Arc<Shared>,
}

impl Live {
    pub(crate) fn set_inner(&self, w: Weak<Inner>) {
        let _ = self.inner.set(w);
    }

    fn map(&self) -> std::sync::MutexGuard<'_, HashMap<String, Chan>> {
        self.channels.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// After a reconnect (or a slow-consumer drop): every channel re-reads its position.
    pub(crate) fn resync_all(&self) {
        for c in self.map().values() {
            c.shared.command(false);
        }
    }

    /// The channels this node is subscribed to.
    pub(crate) fn channels(&self) -> Vec<String> {
        self.map().keys().cloned().collect()
    }

    pub(crate) fn unsubscribe(&self, channel: &str) {
        if let Some(c) = self.map().remove(channel) {
            c.shared.command(true);
        }
    }

    pub(crate) async fn subscribe(&self, inner: &Arc<Inner>, channel: &str) -> Result<(), BrokerError> {
        if self.map().contains_key(channel) {
            return Ok(());
        }
        let mut pending = false;
        let sub = match &inner.raw {
            Some(raw) => {
                let (sid, inbox) = raw.subscribe(&inner.live_subject(channel)).await;
                // Not connected now: the subscription takes effect later, so the channel
                // re-reads JetStream once its task starts (what was published meanwhile).
                pending = !raw.connected().await;
                Feed::Raw(sid, inbox)
            }
            None => Feed::Nats(inner.client.subscribe(inner.live_subject(channel)).await.map_err(unavailable)?),
        };
        // The baseline is read after the subscription exists: nothing falls between the two.
        let base = match inner.last(channel).await {
            Ok(b) => b,
            Err(e) => {
                sub.close(&Arc::downgrade(inner)).await;
                return Err(e);
            }
        };
        let shared = {
            let mut m = self.map();
            if m.contains_key(channel) {
                None
            } else {
                let shared = Arc::new(Shared::default());
                m.insert(channel.to_owned(), Chan { shared: shared.clone() });
                Some(shared)
            }
        };
        let Some(shared) = shared else {
            sub.close(&Arc::downgrade(inner)).await;
            return Ok(());
        };
        let seq = Seq {
            channel: channel.to_owned(),
            epoch: base.as_ref().map(|b| b.epoch.clone()),
            last: base.map_or(0, |b| b.offset),
            shared,
        };
        seq.moved();
        if pending {
            seq.shared.command(false);
        }
        tokio::spawn(run(Arc::downgrade(inner), sub, seq));
        Ok(())
    }

    /// Waits (at most `within`) until this node delivered `channel` up to `epoch`/`offset`, when
    /// it is subscribed to it: a history read is answered only once every publication up to the
    /// offset it returns went through `on_publication` (the hub's recovery merge relies on it).
    /// A live message late by more than a moment is fetched from JetStream (a resync).
    pub(crate) async fn wait_delivered(&self, channel: &str, epoch: &str, offset: u64, within: Duration) {
        let Some(shared) = self.map().get(channel).map(|c| c.shared.clone()) else { return };
        let deadline = tokio::time::Instant::now() + within;
        let mut nudged = false;
        loop {
            let notified = shared.notify.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if shared.reached(epoch, offset) {
                return;
            }
            let until = if nudged { deadline } else { deadline.min(tokio::time::Instant::now() + NUDGE) };
            if tokio::time::timeout_at(until, notified).await.is_err() {
                if tokio::time::Instant::now() >= deadline {
                    tracing::debug!(channel, offset, "nats: history answered before the live stream caught up");
                    return;
                }
                nudged = true;
                shared.command(false);
            }
        }
    }
}

/// How long a history read waits for the live stream before asking JetStream.
const NUDGE: Duration = Duration::from_millis(200);

async fn run(inner: Weak<Inner>, mut sub: Feed, mut seq: Seq) {
    use std::sync::atomic::Ordering::SeqCst;
    let shared = seq.shared.clone();
    loop {
        if shared.stop.load(SeqCst) {
            break;
        }
        if shared.resync.swap(false, SeqCst) {
            let Some(inner) = inner.upgrade() else { break };
            Box::pin(seq.resync(&inner)).await;
            continue;
        }
        tokio::select! {
            m = sub.next() => {
                let Some(m) = m else { break };
                let Some(inner) = inner.upgrade() else { break };
                Box::pin(seq.on_message(&inner, m)).await;
            }
            () = shared.wake.notified() => {}
        }
    }
    sub.close(&inner).await;
}

impl Seq {
    /// Publishes the position to history readers waiting on it.
    fn moved(&self) {
        *self.shared.pos.lock().unwrap_or_else(|e| e.into_inner()) = (self.epoch.clone(), self.last);
        self.shared.notify.notify_waiters();
    }

    async fn on_message(&mut self, inner: &Arc<Inner>, m: crate::rawsub::Live) {
        let Some(handler) = inner.handler().cloned() else { return };
        let (headers, payload) = m;
        let h = headers.as_ref();
        match header(h, H_KIND) {
            Some("j") | Some("l") => {
                let client = header(h, H_CLIENT).unwrap_or_default().to_owned();
                handler.on_presence_event(&self.channel, PresenceEvent { client, frame: payload });
                return;
            }
            Some(_) => return,
            None => {}
        }
        let Some(s) = Stored::from_headers(0, h, payload) else { return };
        if self.epoch.as_deref() != Some(&*s.epoch) {
            if self.epoch.is_some() {
                handler.on_gap(&self.channel, &s.epoch, 0);
            }
            self.epoch = Some(s.epoch.clone());
            self.last = 0;
        }
        if s.offset <= self.last {
            self.moved();
            return;
        }
        if s.first > self.last + 1 {
            // Boxed: the history read's state is allocated only while a hole is filled, not
            // held in every channel's idle task.
            Box::pin(self.fill(inner, s.first)).await;
        }
        for p in s.publications(&self.channel) {
            if p.offset == self.last + 1 {
                self.last = p.offset;
                handler.on_publication(&self.channel, p);
            }
        }
        self.moved();
    }

    /// Delivers what the history holds between `last` and `upto` (exclusive; and after it if
    /// stored already), or announces the gap.
    async fn fill(&mut self, inner: &Arc<Inner>, upto: u64) {
        let Some(handler) = inner.handler().cloned() else { return };
        let Some(epoch) = self.epoch.clone() else { return };
        let since = StreamPosition { epoch: epoch.to_string(), offset: self.last };
        match inner.history(&self.channel, Some(&since), usize::MAX).await {
            Ok(h) if !h.gap && h.epoch == *epoch => {
                for p in h.publications {
                    if p.offset == self.last + 1 {
                        self.last = p.offset;
                        handler.on_publication(&self.channel, p);
                    }
                }
            }
            Ok(h) if h.epoch != *epoch => {
                // The channel moved to a new epoch meanwhile: told, continued from its start.
                handler.on_gap(&self.channel, &h.epoch, 0);
                self.epoch = Some(h.epoch.as_str().into());
                self.last = 0;
            }
            _ => {
                handler.on_gap(&self.channel, &epoch, upto - 1);
                self.last = upto - 1;
            }
        }
        self.moved();
    }

    /// Re-reads the channel after a reconnect: delivers what was missed, or tells the gap.
    async fn resync(&mut self, inner: &Arc<Inner>) {
        let Some(handler) = inner.handler().cloned() else { return };
        let Some(epoch) = self.epoch.clone() else {
            if let Ok(Some(b)) = inner.last(&self.channel).await {
                if b.offset > 0 {
                    handler.on_gap(&self.channel, &b.epoch, b.offset);
                }
                self.epoch = Some(b.epoch.clone());
                self.last = b.offset;
                self.moved();
            }
            return;
        };
        let since = StreamPosition { epoch: epoch.to_string(), offset: self.last };
        match inner.history(&self.channel, Some(&since), usize::MAX).await {
            Ok(h) if !h.gap => {
                for p in h.publications {
                    if p.offset == self.last + 1 {
                        self.last = p.offset;
                        handler.on_publication(&self.channel, p);
                    }
                }
            }
            Ok(h) => {
                handler.on_gap(&self.channel, &h.epoch, h.offset);
                self.epoch = Some(h.epoch.as_str().into());
                self.last = h.offset;
            }
            Err(e) => {
                tracing::warn!(channel = %self.channel, error = %e, "nats: resync failed; the next message fills")
            }
        }
    }
}
