//! The hub: this node's local subscriptions, channel → subscribers.
//!
//! Sharded by channel (`std` mutexes, never held across an await). A publication is fanned out by
//! pushing the same [`Bytes`] (a reference-count increment) into each live subscriber's
//! [`Outbox`]; nothing is serialised per subscriber. The other forms a channel's subscribers take
//! (MessagePack, permessage-deflate: `forms`) are built once per fan-out *before* the lock is
//! taken. The pushes run *under the channel's shard lock* on purpose: that is what orders live
//! messages against a new subscriber's recovery merge ([`Hub::try_activate`] takes the same
//! lock), so the critical section grows with the channel's local subscribers (one outbox push
//! each — a short lock of its own, no allocation unless the outbox's queue was just taken by its
//! writer).
//!
//! A new subscriber starts *buffering*: live publications are kept aside in the form it will be
//! sent (the fan-out's shared one; bounded by its queue size; the oldest go first) while the
//! session reads the channel's position/history from the broker and queues the ack and the
//! recovered messages itself, paced by the outbox
//! ([`crate::node::Node::subscribe`]). [`Hub::try_activate`] then, in one critical section,
//! queues the buffered publications newer than the last recovered one and flips the subscriber
//! to live — or says the buffer dropped some of them and more history must be read first
//! ([`Hub::activate`] is the one-shot form for a caller holding the whole replay). That is the
//! race-free recovery merge: subscribe to the live stream first, read history, merge by offset,
//! go live — no gap, no duplicate.
//!
//! Empty channels leave no entry behind.

use std::collections::hash_map::Entry;
use std::collections::{HashMap, HashSet, VecDeque};
use std::hash::{BuildHasher, RandomState};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use bytes::Bytes;
use tokio::sync::OnceCell;

use crate::ConnId;
use crate::broker::Publication;
use crate::outbox::{Out, Outbox, Push};

mod forms;
mod recovered;
mod subscribers;

use forms::{Forms, Needs, out_for, out_len};
use recovered::Recovered;
use subscribers::Subscribers;

const SHARDS: usize = 64;

/// One shard of the hub: channel → its entry.
type Shard = HashMap<Box<str>, Channel>;

/// Resolves once this node's broker subscription for a channel is in place; shared by every
/// local subscriber that joined while it was being made. Dropped from the channel's entry once
/// the subscription exists ([`Hub::broker_ready`]): a channel that is in place costs no cell.
pub type BrokerReady = Arc<OnceCell<()>>;

struct Subscriber {
    outbox: Arc<Outbox>,
    /// `Some` while buffering (until [`Hub::try_activate`]); boxed so that a live subscriber's
    /// entry is two pointers.
    buffer: Option<Box<Buffer>>,
}

/// A buffering subscriber's live publications: a contiguous run of the channel's stream, the
/// newest at the back, bounded by the subscriber's queue size in bytes. When a publication
/// would exceed the bound the oldest ones go (`dropped`): they are in the history, which the
/// subscriber's recovery keeps paging until it reaches what is still buffered.
#[derive(Default)]
struct Buffer {
    publications: VecDeque<Buffered>,
    bytes: usize,
    /// Publications were dropped from the front: the buffer alone no longer covers everything
    /// delivered since the subscriber was added.
    dropped: bool,
}

/// A buffered publication: its place in the stream and what the subscriber will be sent (the
/// fan-out's shared form for it).
struct Buffered {
    epoch: Arc<str>,
    offset: u64,
    out: Out,
}

impl Buffer {
    fn push(&mut self, publication: &Publication, out: Out, bound: usize) {
        self.bytes += out_len(&out);
        self.publications.push_back(Buffered { epoch: publication.epoch.clone(), offset: publication.offset, out });
        // The newest one stays even if it alone is over the bound (a message fits a queue).
        while self.bytes > bound && self.publications.len() > 1 {
            if let Some(old) = self.publications.pop_front() {
                self.bytes -= out_len(&old.out);
                self.dropped = true;
            }
        }
    }

    /// Whether the buffer holds everything after `after` that the subscriber still needs:
    /// its first publication follows `after` directly, or nothing was dropped and the caller
    /// has replayed the history up to a position read after the subscriber was added
    /// (`caught_up`: every later publication was delivered to the hub afterwards, so it is here).
    fn covers(&self, after: (&str, u64), caught_up: bool) -> bool {
        match self.publications.front() {
            Some(p) if *p.epoch == *after.0 && p.offset <= after.1 + 1 => true,
            _ => !self.dropped && caught_up,
        }
    }

    /// Bytes of the publications after `after` (what going live would queue).
    fn newer_bytes(&self, after: (&str, u64)) -> usize {
        self.publications.iter().filter(|p| newer(p, after)).map(|p| out_len(&p.out)).sum()
    }
}

fn newer(p: &Buffered, (epoch, offset): (&str, u64)) -> bool {
    *p.epoch != *epoch || p.offset > offset
}

impl Subscriber {
    /// Ends buffering: queues the buffered publications after `after` and makes the subscriber
    /// live (the merge of [`Hub::activate`] and [`Hub::try_activate`]).
    fn go_live(&mut self, after: (&str, u64)) -> Push {
        let buffered = self.buffer.take().map(|b| b.publications).unwrap_or_default();
        for p in buffered.into_iter().filter(|p| newer(p, after)) {
            let pushed = self.outbox.push_out(p.out);
            if pushed != Push::Queued {
                return pushed;
            }
        }
        Push::Queued
    }
}

/// What [`Hub::try_activate`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Activation {
    /// The subscriber is live: the buffered publications after the position are queued.
    Live,
    /// The buffer does not reach back to the position (publications were dropped from it):
    /// replay more history first.
    Behind,
    /// The buffered publications would not fit the queue now: wait for this much room, retry.
    Room(usize),
    /// The subscriber is gone or its outbox is closing.
    Gone,
}

struct Channel {
    subscribers: Subscribers<Subscriber>,
    /// `None` once the broker subscription is in place.
    ready: Option<BrokerReady>,
    /// The forms of a frame the subscribers take, built before a fan-out takes the lock.
    needs: Needs,
    /// Recovered messages' forms, built once per node (`hub/recovered.rs`); `None` until a
    /// recovering subscriber takes another form than the JSON frame.
    recovered: Option<Box<Recovered>>,
}

/// Counts from one fan-out.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Fanout {
    /// Frames queued to live subscribers.
    pub delivered: usize,
    /// Subscribers closed as slow consumers by this fan-out.
    pub slow: usize,
}

/// The subscriber is already subscribed to that channel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AlreadySubscribed;

/// See the module docs.
pub struct Hub {
    shards: Vec<Mutex<HashMap<Box<str>, Channel>>>,
    hasher: RandomState,
    channels: AtomicUsize,
    subscriptions: AtomicUsize,
    /// Per shard: channels whose subscriber count changed since [`Hub::take_counts`] last
    /// looked (the cluster's channel listing mirrors the counts into the broker). Locked after
    /// the shard's lock, never before it; only subscribe and unsubscribe touch it.
    dirty: Vec<Mutex<HashSet<Box<str>>>>,
    /// Bytes of the recovered messages' forms held, all channels (`hub/recovered.rs`).
    recovered_bytes: Arc<AtomicUsize>,
}

impl Default for Hub {
    fn default() -> Self {
        Hub::new()
    }
}

impl Hub {
    pub fn new() -> Hub {
        Hub {
            shards: (0..SHARDS).map(|_| Mutex::new(HashMap::new())).collect(),
            hasher: RandomState::new(),
            channels: AtomicUsize::new(0),
            subscriptions: AtomicUsize::new(0),
            dirty: (0..SHARDS).map(|_| Mutex::new(HashSet::new())).collect(),
            recovered_bytes: Arc::default(),
        }
    }

    fn shard(&self, channel: &str) -> MutexGuard<'_, HashMap<Box<str>, Channel>> {
        self.shard_at(self.shard_index(channel))
    }

    fn shard_index(&self, channel: &str) -> usize {
        (self.hasher.hash_one(channel) as usize) % SHARDS
    }

    fn shard_at(&self, i: usize) -> MutexGuard<'_, HashMap<Box<str>, Channel>> {
        self.shards[i].lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Notes that `channel`'s subscriber count changed (called under its shard's lock).
    fn mark(&self, channel: &str) {
        let mut dirty = self.dirty[self.shard_index(channel)].lock().unwrap_or_else(|e| e.into_inner());
        if !dirty.contains(channel) {
            dirty.insert(channel.into());
        }
    }

    /// Subscriber counts to mirror into the broker: of the channels whose count changed since
    /// the last call (0: no local subscriber left), or of every channel when `all`. Never
    /// holds a shard's lock for more than a map lookup per channel (or one pass for `all`).
    pub fn take_counts(&self, all: bool) -> Vec<(String, u64)> {
        let mut out = Vec::new();
        for i in 0..SHARDS {
            let changed = std::mem::take(&mut *self.dirty[i].lock().unwrap_or_else(|e| e.into_inner()));
            let shard = self.shard_at(i);
            if all {
                out.extend(shard.iter().map(|(c, ch)| (c.to_string(), ch.subscribers.len() as u64)));
                // The changed ones that are gone: their removal is news too.
                out.extend(changed.into_iter().filter(|c| !shard.contains_key(c)).map(|c| (c.into_string(), 0)));
                continue;
            }
            out.extend(changed.into_iter().map(|c| {
                let n = shard.get(&c).map_or(0, |ch| ch.subscribers.len() as u64);
                (c.into_string(), n)
            }));
        }
        out
    }

    /// Adds a buffering subscriber. Returns the channel's broker-readiness cell, `None` when the
    /// broker subscription is already in place: the caller makes sure the cell is initialised
    /// (broker subscribe) before reading history, then reports it with [`Hub::broker_ready`].
    pub fn add(
        &self,
        channel: &str,
        conn: ConnId,
        outbox: Arc<Outbox>,
    ) -> Result<Option<BrokerReady>, AlreadySubscribed> {
        let mut shard = self.shard(channel);
        let ch = match shard.entry(channel.into()) {
            Entry::Occupied(e) => e.into_mut(),
            Entry::Vacant(e) => {
                self.channels.fetch_add(1, Ordering::Relaxed);
                e.insert(Channel {
                    subscribers: Subscribers::new(),
                    ready: Some(Arc::new(OnceCell::new())),
                    needs: Needs::default(),
                    recovered: None,
                })
            }
        };
        let mut needs = ch.needs;
        needs.add(&outbox);
        if !ch.subscribers.insert_new(conn, Subscriber { outbox, buffer: Some(Box::default()) }) {
            return Err(AlreadySubscribed);
        }
        ch.needs = needs;
        self.subscriptions.fetch_add(1, Ordering::Relaxed);
        let ready = ch.ready.clone();
        self.mark(channel);
        Ok(ready)
    }

    /// `ready` (from [`Hub::add`]) is initialised: the channel's broker subscription is in
    /// place, so the entry drops its cell and later subscribers skip the wait. Does nothing if
    /// the channel's entry is gone or is a newer one (its own cell, not yet initialised).
    pub fn broker_ready(&self, channel: &str, ready: &BrokerReady) {
        if ready.initialized()
            && let Some(ch) = self.shard(channel).get_mut(channel)
            && ch.ready.as_ref().is_some_and(|r| Arc::ptr_eq(r, ready))
        {
            ch.ready = None;
        }
    }

    /// Queues `frames` (the ack, then recovered messages) to a buffering subscriber, then every
    /// buffered publication after `after` (same epoch; all of them if the epoch differs), and
    /// makes the subscriber live — all in one critical section. Returns `false` if the subscriber
    /// is gone, its outbox overflowed, or its buffer no longer reaches back to `after` (it dropped
    /// publications: see [`Hub::try_activate`], which pages instead).
    pub fn activate(&self, channel: &str, conn: ConnId, frames: Vec<Bytes>, after: (&str, u64)) -> bool {
        let mut shard = self.shard(channel);
        let Some(sub) = shard.get_mut(channel).and_then(|c| c.subscribers.get_mut(&conn)) else {
            return false;
        };
        if sub.buffer.as_ref().is_some_and(|b| !b.covers(after, true)) {
            return false;
        }
        if sub.outbox.push_all(frames) != Push::Queued {
            return false;
        }
        sub.go_live(after) == Push::Queued
    }

    /// Makes a buffering subscriber live if its buffer continues the stream after `after` (the
    /// last publication its recovery queued): queues the buffered publications after it and
    /// flips it live, in one critical section (the merge of [`Hub::activate`], without frames:
    /// the caller queued the ack and the replay itself, paced by the outbox). `caught_up`: the
    /// caller replayed history up to the channel's top as of a history read made after
    /// [`Hub::add`]. Never overflows the outbox for the buffer's sake: [`Activation::Room`] says
    /// how much room to wait for.
    pub fn try_activate(&self, channel: &str, conn: ConnId, after: (&str, u64), caught_up: bool) -> Activation {
        let mut shard = self.shard(channel);
        let Some(sub) = shard.get_mut(channel).and_then(|c| c.subscribers.get_mut(&conn)) else {
            return Activation::Gone;
        };
        if sub.outbox.is_closing() {
            return Activation::Gone;
        }
        let Some(buffer) = &sub.buffer else {
            return Activation::Live;
        };
        if !buffer.covers(after, caught_up) {
            return Activation::Behind;
        }
        let need = buffer.newer_bytes(after);
        if need > 0 && !sub.outbox.has_room(need) {
            return Activation::Room(need);
        }
        if sub.go_live(after) == Push::Queued { Activation::Live } else { Activation::Gone }
    }

    /// Removes a subscriber. Returns `true` when it was the channel's last one (the entry is gone
    /// and the caller should release the broker subscription).
    pub fn remove(&self, channel: &str, conn: ConnId) -> bool {
        let mut shard = self.shard(channel);
        let Some(ch) = shard.get_mut(channel) else {
            return false;
        };
        if ch.subscribers.remove(&conn).is_some() {
            self.subscriptions.fetch_sub(1, Ordering::Relaxed);
            self.mark(channel);
        }
        if ch.subscribers.is_empty() {
            shard.remove(channel);
            self.channels.fetch_sub(1, Ordering::Relaxed);
            return true;
        }
        false
    }

    /// What to queue for the recovered (history) message `p` of `channel` on `outbox`'s
    /// connection: the form a live message takes there (its encoding; compressed when it
    /// negotiated permessage-deflate and the frame is large enough), built once per node for
    /// every connection recovering it (`hub/recovered.rs`: looked up under the shard lock,
    /// built outside it).
    pub fn recovered_out(&self, channel: &str, p: &Publication, outbox: &Outbox) -> Out {
        if outbox.deflate_min().is_none() && outbox.encoding() == crier_protocol::Encoding::Json {
            return Out::Frame(p.frame.clone());
        }
        let entry = {
            let mut shard = self.shard(channel);
            match shard.get_mut(channel) {
                Some(ch) => ch.recovered.get_or_insert_with(Box::default).entry(p, &self.recovered_bytes),
                None => return out_for(outbox, &p.frame, &mut Forms::default()),
            }
        };
        entry.out_for(outbox, &p.frame)
    }

    /// Bytes held by recovered messages' forms (`hub/recovered.rs`), all channels together:
    /// per channel with recovering subscribers the forms of at most 256 messages, the oldest
    /// going first as messages are added past 4 MiB; 0 once those channels have no local
    /// subscriber.
    pub fn recovered_forms_bytes(&self) -> usize {
        self.recovered_bytes.load(Ordering::Relaxed)
    }

    /// The channel's shard locked, with the forms of `frame` its subscribers take built before
    /// (with the lock released meanwhile when there are any to build). `None`: no subscriber.
    fn lock_with_forms(&self, channel: &str, frame: &Bytes) -> Option<(MutexGuard<'_, Shard>, Forms)> {
        let shard = self.shard(channel);
        let needs = shard.get(channel)?.needs;
        if needs.plain() {
            return Some((shard, Forms::default()));
        }
        drop(shard);
        let forms = Forms::build(frame, needs);
        Some((self.shard(channel), forms))
    }

    /// Fans a publication out to the channel's local subscribers.
    pub fn deliver(&self, channel: &str, publication: &Publication) -> Fanout {
        let mut out = Fanout::default();
        let Some((mut shard, mut forms)) = self.lock_with_forms(channel, &publication.frame) else {
            return out;
        };
        let Some(ch) = shard.get_mut(channel) else {
            return out;
        };
        let mut needs = Needs::default();
        for sub in ch.subscribers.values_mut() {
            needs.add(&sub.outbox);
            let item = out_for(&sub.outbox, &publication.frame, &mut forms);
            match &mut sub.buffer {
                Some(buf) => buf.push(publication, item, sub.outbox.max_bytes()),
                None => match sub.outbox.push_out(item) {
                    Push::Queued => out.delivered += 1,
                    Push::Overflow => out.slow += 1,
                    Push::Closed => {}
                },
            }
        }
        ch.needs = needs;
        out
    }

    /// Queues `frame` (a notice about the channel, not a publication) to the channel's live
    /// subscribers; buffering ones learn the channel's state from their own history read.
    /// Returns how many subscribers were closed as slow consumers.
    pub fn notify(&self, channel: &str, frame: &Bytes) -> usize {
        self.notify_except(channel, frame, None).slow
    }

    /// [`Hub::notify`], leaving out the subscriber `except` (a client's own `join`). Under the
    /// channel's shard lock, like [`Hub::deliver`], so notices and publications handed to the
    /// hub in one order reach each subscriber in that order.
    pub fn notify_except(&self, channel: &str, frame: &Bytes, except: Option<ConnId>) -> Fanout {
        let mut out = Fanout::default();
        let Some((shard, mut forms)) = self.lock_with_forms(channel, frame) else {
            return out;
        };
        let Some(ch) = shard.get(channel) else {
            return out;
        };
        for (conn, sub) in ch.subscribers.iter() {
            if sub.buffer.is_some() || Some(*conn) == except {
                continue;
            }
            match sub.outbox.push_out(out_for(&sub.outbox, frame, &mut forms)) {
                Push::Queued => out.delivered += 1,
                Push::Overflow => out.slow += 1,
                Push::Closed => {}
            }
        }
        out
    }

    /// Does this node have subscribers (live or buffering) on `channel`?
    pub fn has_channel(&self, channel: &str) -> bool {
        self.shard(channel).contains_key(channel)
    }

    /// Whether connection `conn` is subscribed (live or buffering) to `channel`.
    pub fn is_subscribed(&self, channel: &str, conn: ConnId) -> bool {
        self.shard(channel).get(channel).is_some_and(|ch| ch.subscribers.contains(&conn))
    }

    /// The channels each of `conns` is subscribed to (same order as `conns`), for the server
    /// API's connection listing: a scan of every local channel, one shard lock at a time.
    pub fn channels_of(&self, conns: &[ConnId]) -> Vec<Vec<String>> {
        let mut out = vec![Vec::new(); conns.len()];
        if conns.is_empty() {
            return out;
        }
        for shard in &self.shards {
            let shard = shard.lock().unwrap_or_else(|e| e.into_inner());
            for (name, ch) in shard.iter() {
                for (i, conn) in conns.iter().enumerate() {
                    if ch.subscribers.contains(conn) {
                        out[i].push(name.to_string());
                    }
                }
            }
        }
        out.iter_mut().for_each(|c| c.sort_unstable());
        out
    }

    /// Channels with at least one local subscriber.
    pub fn channel_count(&self) -> usize {
        self.channels.load(Ordering::Relaxed)
    }

    /// Local subscriptions, all channels.
    pub fn subscription_count(&self) -> usize {
        self.subscriptions.load(Ordering::Relaxed)
    }
}

/// A hub alone can take a broker's deliveries (tests, embedding); the server wraps it to add
/// metrics and user disconnects.
impl crate::broker::BrokerHandler for Hub {
    fn on_publication(&self, channel: &str, publication: Publication) {
        self.deliver(channel, &publication);
    }
    fn on_presence_event(&self, channel: &str, event: crate::broker::PresenceEvent) {
        self.notify(channel, &event.frame);
    }
    fn on_disconnect_user(&self, _user: &str) -> usize {
        0
    }
    fn has_subscribers(&self, channel: &str) -> bool {
        self.has_channel(channel)
    }
}

#[cfg(test)]
mod tests;

/// Property tests of the recovery merge: whatever the interleaving of "history read up to T",
/// live publications buffered before and after that read, and live publications after
/// [`Hub::activate`], a subscriber's queue holds the ack, then each message exactly once, in
/// offset order, with no gap — and the channel's other subscribers are unaffected.
#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod proptests;
