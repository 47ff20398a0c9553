//! Live fan-out: one core NATS subscription per subscribed channel, fed by the stream's
//! republish, and a per-channel sequencer that turns it into "every message once, in order,
//! or a gap".
//!
//! No task per channel: a channel is a small state machine driven by the node's one dispatcher
//! (the subscriber connection's read loop, [`crate::rawsub`]), which sequences a message inline. Only when a channel needs JetStream (a hole to fill, a
//! resync after a reconnect or a late message) does it get a worker task for as long as that
//! takes; live messages arriving meanwhile wait in the channel's queue, in order, and the worker
//! drains them before it ends.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock, Weak};
use std::time::Duration;

use crier_core::broker::{BrokerError, BrokerHandler, PresenceEvent};
use crier_protocol::StreamPosition;

use crate::history::Fields;
use crate::rawsub::{Live as Msg, Sink};
use crate::{Inner, Stored};

/// A subscribed channel: small (one per subscribed channel), so what every channel needs only
/// now and then is elsewhere — the wake-up of history reads waiting for a delivery is one for
/// the node ([`Live::delivered`]), the queue of waiting messages exists only while one waits.
pub(crate) struct Chan {
    /// Shared with the key of [`Live`]'s map.
    name: Arc<str>,
    inner: Weak<Inner>,
    st: Mutex<St>,
}

/// Where the channel is, and what waits.
#[derive(Default)]
struct St {
    epoch: Option<Arc<str>>,
    last: u64,
    /// The stream sequence of the stored message holding `last` (0: not known, after a fill
    /// or re-read): with `epoch` and `last`, the channel's tail for a publisher on this node.
    seq: u64,
    /// A worker task runs (or the subscription is being set up): messages wait in `pending`.
    busy: bool,
    /// Re-read the channel from JetStream (after a reconnect, or a message late).
    resync: bool,
    stopped: bool,
    /// The subscription id on the subscriber connection (0: none).
    sid: u64,
    /// Boxed: 8 bytes in every channel instead of 32, for a queue that exists only while a
    /// worker runs.
    #[allow(clippy::box_collection)]
    pending: Option<Box<VecDeque<Msg>>>,
}

impl St {
    fn pending(&mut self) -> &mut VecDeque<Msg> {
        self.pending.get_or_insert_with(Default::default)
    }

    fn pop_pending(&mut self) -> Option<Msg> {
        self.pending.as_mut().and_then(|p| p.pop_front())
    }
}

/// What sequencing a message left to do.
enum Step {
    Done,
    /// A hole before the message: fill up to `first` (exclusive) from JetStream first.
    Fill(u64),
}

impl Sink for Chan {
    fn push(self: Arc<Self>, m: Msg) {
        let mut st = self.lock();
        if st.stopped {
            return;
        }
        if st.busy {
            st.pending().push_back(m);
            return;
        }
        let Some(inner) = self.inner.upgrade() else { return };
        let Some(handler) = inner.handler() else { return };
        let step = self.apply(&mut st, handler, &m, true);
        if let Step::Fill(_) = step {
            st.pending().push_front(m);
            st.busy = true;
            drop(st);
            tokio::spawn(self.work());
        } else {
            drop(st);
            inner.live.delivered();
        }
    }

    fn subject(&self) -> Option<String> {
        if self.lock().stopped {
            return None;
        }
        self.inner.upgrade().map(|i| i.live_subject(&self.name))
    }
}

impl Chan {
    fn lock(&self) -> std::sync::MutexGuard<'_, St> {
        self.st.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn reached(&self, epoch: &str, offset: u64) -> bool {
        let st = self.lock();
        offset == 0 || (st.epoch.as_deref() == Some(epoch) && st.last >= offset)
    }

    /// Asks for a re-read from JetStream (a worker starts unless one runs).
    fn request_resync(self: &Arc<Self>) {
        let mut st = self.lock();
        if st.stopped {
            return;
        }
        st.resync = true;
        if !st.busy {
            st.busy = true;
            drop(st);
            tokio::spawn(self.clone().work());
        }
    }

    fn stop(&self) -> u64 {
        let mut st = self.lock();
        st.stopped = true;
        st.pending = None;
        std::mem::take(&mut st.sid)
    }

    /// Sequences one live message (under the state lock, so deliveries keep their order). With
    /// `may_fill` false (the message that caused a fill, after it) a message of another epoch is
    /// dropped and only what continues the channel is delivered.
    fn apply(&self, st: &mut St, handler: &Arc<dyn BrokerHandler>, m: &Msg, may_fill: bool) -> Step {
        let (headers, payload) = m;
        let f = Fields::of(headers.as_ref());
        match f.kind {
            Some("j") | Some("l") => {
                let client = f.client.unwrap_or_default().to_owned();
                handler.on_presence_event(&self.name, PresenceEvent { client, frame: payload.clone() });
                return Step::Done;
            }
            Some(_) => return Step::Done,
            None => {}
        }
        let Some(s) = Stored::from_fields(f.stream_seq(), &f, payload.clone(), st.epoch.as_ref()) else {
            return Step::Done;
        };
        if st.epoch.as_deref() != Some(&*s.epoch) {
            if !may_fill {
                return Step::Done;
            }
            if st.epoch.is_some() {
                handler.on_gap(&self.name, &s.epoch, 0);
            }
            st.epoch = Some(s.epoch.clone());
            st.last = 0;
            st.seq = 0;
        }
        if s.offset <= st.last {
            if s.offset == st.last && s.seq > 0 {
                // The message holding the last offset (the epoch marker, a repeat): its sequence.
                st.seq = s.seq;
            }
            return Step::Done;
        }
        if may_fill && s.first > st.last + 1 {
            return Step::Fill(s.first);
        }
        for p in s.publications(&self.name) {
            if p.offset == st.last + 1 {
                st.last = p.offset;
                handler.on_publication(&self.name, p);
            }
        }
        st.seq = if st.last == s.offset { s.seq } else { 0 };
        Step::Done
    }

    /// The channel's worker: resyncs, fills holes and drains the waiting messages, then ends.
    async fn work(self: Arc<Self>) {
        loop {
            let Some(inner) = self.inner.upgrade() else {
                let mut st = self.lock();
                st.busy = false;
                st.pending = None;
                return;
            };
            let Some(handler) = inner.handler().cloned() else {
                let mut st = self.lock();
                st.busy = false;
                st.pending = None;
                return;
            };
            let fill = {
                let mut st = self.lock();
                if st.stopped {
                    st.busy = false;
                    return;
                }
                if std::mem::take(&mut st.resync) {
                    None
                } else {
                    let mut fill = None;
                    while let Some(m) = st.pop_pending() {
                        if let Step::Fill(upto) = self.apply(&mut st, &handler, &m, true) {
                            st.pending().push_front(m);
                            fill = Some(upto);
                            break;
                        }
                    }
                    let Some(upto) = fill else {
                        st.busy = false;
                        st.pending = None;
                        drop(st);
                        inner.live.delivered();
                        return;
                    };
                    Some(upto)
                }
            };
            match fill {
                None => self.resync(&inner, &handler).await,
                Some(upto) => {
                    self.fill(&inner, &handler, upto).await;
                    // The message that caused the fill: what it adds after the filled part.
                    let mut st = self.lock();
                    if let Some(m) = st.pop_pending() {
                        self.apply(&mut st, &handler, &m, false);
                    }
                    drop(st);
                    inner.live.delivered();
                }
            }
        }
    }

    fn position(&self) -> (Option<Arc<str>>, u64) {
        let st = self.lock();
        (st.epoch.clone(), st.last)
    }

    /// Delivers what the history holds between `last` and `upto` (exclusive; and after it if
    /// stored already), or announces the gap.
    async fn fill(&self, inner: &Arc<Inner>, handler: &Arc<dyn BrokerHandler>, upto: u64) {
        let (Some(epoch), last) = self.position() else { return };
        let since = StreamPosition { epoch: epoch.to_string(), offset: last };
        let h = inner.history(&self.name, Some(&since), usize::MAX).await;
        let mut st = self.lock();
        match h {
            Ok(h) if !h.gap && h.epoch == *epoch => {
                for p in h.publications {
                    if p.offset == st.last + 1 {
                        st.last = p.offset;
                        st.seq = 0;
                        handler.on_publication(&self.name, p);
                    }
                }
            }
            Ok(h) if h.epoch != *epoch => {
                // The channel moved to a new epoch meanwhile: told, continued from its start.
                handler.on_gap(&self.name, &h.epoch, 0);
                st.epoch = Some(h.epoch.as_str().into());
                st.last = 0;
                st.seq = 0;
            }
            _ => {
                handler.on_gap(&self.name, &epoch, upto - 1);
                st.last = upto - 1;
                st.seq = 0;
            }
        }
        drop(st);
        inner.live.delivered();
    }

    /// Re-reads the channel after a reconnect: delivers what was missed, or tells the gap.
    async fn resync(&self, inner: &Arc<Inner>, handler: &Arc<dyn BrokerHandler>) {
        let (epoch, last) = self.position();
        let Some(epoch) = epoch else {
            if let Ok(Some(b)) = inner.last(&self.name).await {
                if b.offset > 0 {
                    handler.on_gap(&self.name, &b.epoch, b.offset);
                }
                let mut st = self.lock();
                st.epoch = Some(b.epoch.clone());
                st.last = b.offset;
                st.seq = b.seq;
                drop(st);
                inner.live.delivered();
            }
            return;
        };
        let since = StreamPosition { epoch: epoch.to_string(), offset: last };
        let h = inner.history(&self.name, Some(&since), usize::MAX).await;
        let mut st = self.lock();
        match h {
            Ok(h) if !h.gap => {
                for p in h.publications {
                    if p.offset == st.last + 1 {
                        st.last = p.offset;
                        st.seq = 0;
                        handler.on_publication(&self.name, p);
                    }
                }
            }
            Ok(h) => {
                handler.on_gap(&self.name, &h.epoch, h.offset);
                st.epoch = Some(h.epoch.as_str().into());
                st.last = h.offset;
                st.seq = 0;
            }
            Err(e) => {
                tracing::warn!(channel = %self.name, error = %e, "nats: resync failed; the next message fills")
            }
        }
        drop(st);
        inner.live.delivered();
    }
}

#[derive(Default)]
pub(crate) struct Live {
    inner: OnceLock<Weak<Inner>>,
    channels: Mutex<HashMap<Arc<str>, Arc<Chan>>>,
    /// Woken when a channel delivered further, while a history read waits on it
    /// ([`Live::wait_delivered`]; `waiting` counts them, so a delivery with none is one load).
    notify: tokio::sync::Notify,
    waiting: AtomicUsize,
}

impl Live {
    pub(crate) fn set_inner(&self, w: Weak<Inner>) {
        let _ = self.inner.set(w);
    }

    fn map(&self) -> std::sync::MutexGuard<'_, HashMap<Arc<str>, Arc<Chan>>> {
        self.channels.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A channel delivered further (or stopped): wakes the history reads waiting, if any.
    fn delivered(&self) {
        // Pairs with the fence in `wait_delivered`: either this sees the waiter, or the
        // waiter sees what was delivered.
        std::sync::atomic::fence(Ordering::SeqCst);
        if self.waiting.load(Ordering::SeqCst) > 0 {
            self.notify.notify_waiters();
        }
    }

    /// After a reconnect (or a slow-consumer drop): every channel re-reads its position.
    pub(crate) fn resync_all(&self) {
        let all: Vec<Arc<Chan>> = self.map().values().cloned().collect();
        for c in all {
            c.request_resync();
        }
    }

    /// Is this node subscribed to the channel?
    pub(crate) fn has(&self, channel: &str) -> bool {
        self.map().contains_key(channel)
    }

    /// Subscribes to the channel in a task (a followed channel, follow.rs).
    pub(crate) fn spawn_subscribe(&self, channel: &str) {
        let Some(inner) = self.inner.get().and_then(Weak::upgrade) else { return };
        let channel = channel.to_owned();
        tokio::spawn(async move {
            if let Err(e) = inner.live.subscribe(&inner, &channel).await {
                tracing::debug!(%channel, error = %e, "nats: following a contended channel failed");
            }
        });
    }

    /// The channels this node is subscribed to.
    pub(crate) fn channels(&self) -> Vec<String> {
        self.map().keys().map(|k| k.to_string()).collect()
    }

    /// Unsubscribes unless `keep()`, asked while no subscribe of the channel can pass: a
    /// subscribe made after `keep()` said no finds the channel gone and subscribes afresh (the
    /// hub marks a channel subscribed before it calls the broker, so `keep` = "has subscribers"
    /// never drops a subscription a client just joined).
    pub(crate) async fn unsubscribe_unless(&self, inner: &Arc<Inner>, channel: &str, keep: impl FnOnce() -> bool) {
        let c = {
            let mut m = self.map();
            if keep() {
                return;
            }
            m.remove(channel)
        };
        let Some(c) = c else { return };
        close(inner, c.stop()).await;
        self.delivered();
    }

    pub(crate) async fn subscribe(&self, inner: &Arc<Inner>, channel: &str) -> Result<(), BrokerError> {
        if self.map().contains_key(channel) {
            return Ok(());
        }
        // Busy until the baseline is read: what arrives meanwhile waits in the queue.
        let chan = Arc::new(Chan {
            name: channel.into(),
            inner: Arc::downgrade(inner),
            st: Mutex::new(St { busy: true, ..Default::default() }),
        });
        let sid = inner.raw.subscribe(&inner.live_subject(channel), chan.clone()).await;
        // Not connected now: the subscription takes effect later, so the channel re-reads
        // JetStream once it is set up (what was published meanwhile).
        let pending = !inner.raw.connected().await;
        chan.lock().sid = sid;
        // The baseline is read after the subscription exists: nothing falls between the two.
        // A channel without messages gets its epoch marker now (the read that follows a
        // subscribe, the channel's position, is then answered from here: `Live::position`).
        let base = match inner.last_or_marker(channel).await {
            Ok(b) => b,
            Err(e) => {
                close(inner, chan.stop()).await;
                return Err(e);
            }
        };
        let raced = {
            let mut m = self.map();
            let raced = m.contains_key(channel);
            if !raced {
                m.insert(chan.name.clone(), chan.clone());
            }
            raced
        };
        if raced {
            close(inner, chan.stop()).await;
            return Ok(());
        }
        let work = {
            let mut st = chan.lock();
            st.last = base.offset;
            st.seq = base.seq;
            st.epoch = Some(base.epoch);
            st.resync |= pending;
            // What arrived meanwhile (often just the channel's epoch marker, written by the
            // baseline read) is sequenced here; a worker only for a hole or a re-read.
            let mut work = st.resync;
            if !work && let Some(handler) = inner.handler() {
                while let Some(m) = st.pop_pending() {
                    if let Step::Fill(_) = chan.apply(&mut st, handler, &m, true) {
                        st.pending().push_front(m);
                        work = true;
                        break;
                    }
                }
            }
            if !work {
                st.pending = None;
                st.busy = false;
            }
            work
        };
        self.delivered();
        if work {
            tokio::spawn(chan.work());
        }
        Ok(())
    }

    /// Where this node's delivery of `channel` stands, when it is subscribed and settled (no
    /// worker filling or re-reading): a position every publication up to which went through
    /// `on_publication` here, so it answers a position read as well as JetStream would (a
    /// message stored meanwhile arrives live).
    pub(crate) fn position(&self, channel: &str) -> Option<(Arc<str>, u64)> {
        let chan = self.map().get(channel).cloned()?;
        let st = chan.lock();
        if st.busy || st.stopped {
            return None;
        }
        Some((st.epoch.clone()?, st.last))
    }

    /// The channel's tail as this node last delivered it — (epoch, offset, stream sequence) —
    /// when it is subscribed, settled and knows the sequence: what a publisher on this node
    /// tries first after another node published to the channel.
    pub(crate) fn tail(&self, channel: &str) -> Option<(Arc<str>, u64, u64)> {
        let chan = self.map().get(channel).cloned()?;
        let st = chan.lock();
        if st.busy || st.stopped || st.seq == 0 {
            return None;
        }
        Some((st.epoch.clone()?, st.last, st.seq))
    }

    /// Waits (at most `within`) until this node delivered `channel` up to `epoch`/`offset`, when
    /// it is subscribed to it: a history read is answered only once every publication up to the
    /// offset it returns went through `on_publication` (the hub's recovery merge relies on it).
    /// A live message late by more than a moment is fetched from JetStream (a resync).
    pub(crate) async fn wait_delivered(&self, channel: &str, epoch: &str, offset: u64, within: Duration) {
        let Some(chan) = self.map().get(channel).cloned() else { return };
        let deadline = tokio::time::Instant::now() + within;
        let mut nudged = false;
        self.waiting.fetch_add(1, Ordering::SeqCst);
        let _waiting = Waiting(&self.waiting);
        std::sync::atomic::fence(Ordering::SeqCst);
        loop {
            let notified = self.notify.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if chan.reached(epoch, offset) || chan.lock().stopped {
                return;
            }
            let until = if nudged { deadline } else { deadline.min(tokio::time::Instant::now() + NUDGE) };
            if tokio::time::timeout_at(until, notified).await.is_err() {
                if tokio::time::Instant::now() >= deadline {
                    tracing::debug!(channel, offset, "nats: history answered before the live stream caught up");
                    return;
                }
                nudged = true;
                chan.request_resync();
            }
        }
    }
}

/// Counts a waiter of [`Live::wait_delivered`] out when it ends (returned or dropped).
struct Waiting<'a>(&'a AtomicUsize);

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Closes a channel's subscription.
async fn close(inner: &Arc<Inner>, sid: u64) {
    if sid != 0 {
        inner.raw.unsubscribe(sid).await;
    }
}

/// How long a history read waits for the live stream before asking JetStream.
const NUDGE: Duration = Duration::from_millis(200);
