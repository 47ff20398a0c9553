//! The broker conformance suite: the promises of the [`Broker`] trait, as executable checks.
//! Every broker (memory, Redis) runs it from its own tests with a factory for fresh instances:
//!
//! ```ignore
//! crier_testkit::conformance::run(|s| async move { make_broker(s) }).await;
//! ```
//!
//! Checks poll with a deadline ([`crate::wait`]; delivery through Redis is asynchronous) and
//! panic with a clear message on failure. Channel names carry a random prefix so runs never
//! collide. Only crier-core's public API is used.

use std::collections::HashSet;
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crier_protocol::StreamPosition;
use crier_protocol::frames::PresenceEntry;

use crier_core::broker::{
    Broker, BrokerHandler, ConnectionInfo, History, NodeInfo, PresenceEvent, PresenceStats, Publication,
    PublishOptions, UserOp, UserOpReply,
};
use crier_core::{ChannelPolicy, Namespaces};

use crate::wait::{poll_within, until_within};

/// What a factory is asked for.
#[derive(Debug, Clone)]
pub struct Settings {
    pub history_size: usize,
    pub history_ttl: Duration,
    /// The channels' namespaces: the default policy has `history_size`/`history_ttl`, and the
    /// namespace [`JOIN_LEAVE_NS`] has `join_leave` on. A factory gives them to its broker.
    pub namespaces: Arc<Namespaces>,
}

/// The namespace whose channels have `join_leave` in [`Settings::namespaces`].
pub const JOIN_LEAVE_NS: &str = "jl";

impl Settings {
    /// `history_size`/`history_ttl` as the default policy, plus the [`JOIN_LEAVE_NS`] namespace.
    pub fn new(history_size: usize, history_ttl: Duration) -> Settings {
        let default = ChannelPolicy { history_size, history_ttl, ..ChannelPolicy::default() };
        let join_leave = ChannelPolicy { join_leave: true, ..default.clone() };
        let namespaces = Arc::new(Namespaces::new(default).with(JOIN_LEAVE_NS, join_leave));
        Settings { history_size, history_ttl, namespaces }
    }
}

/// A handler that records what it is given.
#[derive(Default)]
pub struct RecordingHandler {
    pub publications: Mutex<Vec<(String, Publication)>>,
    pub subscribed: Mutex<HashSet<String>>,
    pub disconnected: Mutex<Vec<String>>,
    /// Everything delivered, in order: `(channel, "message:<offset>" | "join:<client>" |
    /// "leave:<client>")`.
    pub stream: Mutex<Vec<(String, String)>>,
    /// Server-side control operations received (user, op).
    pub user_ops: Mutex<Vec<(String, UserOp)>>,
}

impl RecordingHandler {
    /// What `channel` delivered, in order (see [`RecordingHandler::stream`]).
    pub fn stream_of(&self, channel: &str) -> Vec<String> {
        let s = self.stream.lock().unwrap_or_else(|e| e.into_inner());
        s.iter().filter(|(c, _)| c == channel).map(|(_, e)| e.clone()).collect()
    }

    pub fn offsets(&self, channel: &str) -> Vec<u64> {
        let p = self.publications.lock().unwrap_or_else(|e| e.into_inner());
        p.iter().filter(|(c, _)| c == channel).map(|(_, p)| p.offset).collect()
    }
}

impl BrokerHandler for RecordingHandler {
    fn on_publication(&self, channel: &str, publication: Publication) {
        let entry = (channel.to_owned(), format!("message:{}", publication.offset));
        self.stream.lock().unwrap_or_else(|e| e.into_inner()).push(entry);
        self.publications.lock().unwrap_or_else(|e| e.into_inner()).push((channel.to_owned(), publication));
    }
    fn on_presence_event(&self, channel: &str, event: PresenceEvent) {
        let v: serde_json::Value = serde_json::from_slice(&event.frame).unwrap_or_default();
        let kind = v["type"].as_str().unwrap_or("?").to_owned();
        assert_eq!(v["channel"], channel, "a presence event names its channel");
        assert_eq!(v["client"], event.client.as_str(), "the event's client is the frame's");
        let entry = (channel.to_owned(), format!("{kind}:{}", event.client));
        self.stream.lock().unwrap_or_else(|e| e.into_inner()).push(entry);
    }
    fn on_disconnect_user(&self, user: &str) -> usize {
        self.disconnected.lock().unwrap_or_else(|e| e.into_inner()).push(user.to_owned());
        1
    }
    fn has_subscribers(&self, channel: &str) -> bool {
        self.subscribed.lock().unwrap_or_else(|e| e.into_inner()).contains(channel)
    }
    /// One connection of every user: counts 1, lists one entry.
    fn on_user_op(&self, user: &str, op: &UserOp) -> UserOpReply {
        self.user_ops.lock().unwrap_or_else(|e| e.into_inner()).push((user.to_owned(), op.clone()));
        let connections = match op {
            UserOp::Connections => vec![ConnectionInfo {
                client: "c1".into(),
                node: "n1".into(),
                transport: "websocket".into(),
                channels: vec!["a".into()],
            }],
            _ => Vec::new(),
        };
        UserOpReply { count: 1, connections }
    }
}

const WAIT: Duration = Duration::from_secs(5);

/// A random prefix per call (std's per-instance random hash keys: no extra dependency).
fn prefix() -> String {
    use std::hash::{BuildHasher, Hasher};
    format!("conf{:016x}", std::collections::hash_map::RandomState::new().build_hasher().finish())
}

async fn fresh<F, Fut>(make: &F, s: Settings) -> (Arc<dyn Broker>, Arc<RecordingHandler>)
where
    F: Fn(Settings) -> Fut,
    Fut: Future<Output = Arc<dyn Broker>>,
{
    let b = make(s).await;
    let h = Arc::new(RecordingHandler::default());
    b.set_handler(h.clone());
    (b, h)
}

/// Runs every check.
pub async fn run<F, Fut>(make: F)
where
    F: Fn(Settings) -> Fut,
    Fut: Future<Output = Arc<dyn Broker>>,
{
    let s = Settings::new(10, Duration::from_secs(60));
    offsets_and_order(&make, s.clone()).await;
    history_windows(&make, s.clone()).await;
    idempotency(&make, s.clone()).await;
    unsubscribe_rechecks(&make, s.clone()).await;
    presence_and_connections(&make, s.clone()).await;
    presence_stats(&make, s.clone()).await;
    join_leave_in_order(&make, s.clone()).await;
    history_expiry(&make, Settings::new(10, Duration::from_millis(300))).await;
    // Server-side control.
    user_ops(&make, s.clone()).await;
    // Channel namespaces.
    presence_counted(&make, s.clone()).await;
    // The cluster's channels and history deletion.
    channel_listing(&make, s.clone()).await;
    history_deletion(&make, s).await;
}

/// `report_channels` / `channels`: counts summed over nodes, name order, prefix, paging by
/// cursor, updates and full reports.
async fn channel_listing<F, Fut>(make: &F, s: Settings)
where
    F: Fn(Settings) -> Fut,
    Fut: Future<Output = Arc<dyn Broker>>,
{
    let (b, _h) = fresh(make, s).await;
    let p = prefix();
    let (na, nb) = (format!("{p}-a"), format!("{p}-b"));
    for n in [&na, &nb] {
        let info = NodeInfo { node: n.clone(), connections: 1, version: "t".into(), ready: true, ..Default::default() };
        b.report_node(&info).await.expect("report_node");
    }
    let c = |s: &str| format!("{p}:{s}");
    let counts = |v: &[(&str, u64)]| v.iter().map(|(s, n)| (c(s), *n)).collect::<Vec<_>>();
    let held =
        b.report_channels(&na, &counts(&[("x:1", 2), ("x:2", 1), ("y", 1)]), true).await.expect("report_channels");
    assert!(!held, "nothing was held for a new node");
    b.report_channels(&nb, &counts(&[("x:1", 3), ("z", 4)]), true).await.expect("report_channels");
    let list = async |prefix: &str, after: Option<&str>, limit: usize| {
        let l = b.channels(prefix, after, limit).await.expect("channels");
        l.into_iter().map(|c| (c.channel, c.subscribers)).collect::<Vec<_>>()
    };
    assert_eq!(
        list(&p, None, 10).await,
        counts(&[("x:1", 5), ("x:2", 1), ("y", 1), ("z", 4)]),
        "summed, in name order"
    );
    let first = list(&p, None, 2).await;
    assert_eq!(first, counts(&[("x:1", 5), ("x:2", 1)]), "a page");
    assert_eq!(list(&p, Some(&first[1].0), 2).await, counts(&[("y", 1), ("z", 4)]), "the next page, after the cursor");
    assert_eq!(list(&p, Some(&c("z")), 2).await, vec![], "past the end");
    assert_eq!(list(&c("x:"), None, 10).await, counts(&[("x:1", 5), ("x:2", 1)]), "by prefix");
    assert_eq!(list(&c("x:"), Some(&c("x:1")), 10).await, counts(&[("x:2", 1)]), "prefix and cursor");
    assert_eq!(
        list(&c("x:"), Some(&c("a")), 10).await,
        counts(&[("x:1", 5), ("x:2", 1)]),
        "a cursor before the prefix"
    );
    let held = b.report_channels(&na, &counts(&[("x:1", 0), ("x:2", 7)]), false).await.expect("report_channels");
    assert!(held, "the node's channels were held");
    assert_eq!(list(&p, None, 10).await, counts(&[("x:1", 3), ("x:2", 7), ("y", 1), ("z", 4)]), "an update");
    b.report_channels(&nb, &counts(&[("w", 1)]), true).await.expect("report_channels");
    assert_eq!(list(&p, None, 10).await, counts(&[("w", 1), ("x:2", 7), ("y", 1)]), "a full report replaces");
    b.report_channels(&nb, &[], true).await.expect("report_channels");
    let held = b.report_channels(&nb, &[], false).await.expect("report_channels");
    assert!(!held, "a node without channels holds nothing");
    assert_eq!(list(&p, None, 10).await, counts(&[("x:2", 7), ("y", 1)]), "an empty full report forgets the node's");
}

/// `delete_history`: the history and position go, a recovery from before reports the gap, the
/// channel continues in a new epoch and a subscribed node still receives it.
async fn history_deletion<F, Fut>(make: &F, s: Settings)
where
    F: Fn(Settings) -> Fut,
    Fut: Future<Output = Arc<dyn Broker>>,
{
    let (b, h) = fresh(make, s).await;
    let ch = format!("{}:deleted", prefix());
    h.subscribed.lock().unwrap_or_else(|e| e.into_inner()).insert(ch.clone());
    b.subscribe(&ch).await.expect("subscribe");
    let mut last = None;
    for i in 1..=3 {
        last = Some(b.publish(&ch, &i.to_string(), PublishOptions::default()).await.expect("publish"));
    }
    let Some(last) = last else { return };
    until_within("the subscribed node received the 3 messages", WAIT, async || h.offsets(&ch).len() == 3).await;
    b.delete_history(&ch).await.expect("delete_history");
    let before = StreamPosition { epoch: last.epoch.clone(), offset: 1 };
    let hist = b.history(&ch, Some(&before), 10).await.expect("history");
    assert!(hist.gap && hist.publications.is_empty(), "a recovery from before the deletion reports the gap");
    assert_ne!(hist.epoch, last.epoch, "a new epoch");
    assert_eq!(hist.offset, 0, "nothing published in it yet");
    let latest = b.history(&ch, None, 10).await.expect("history");
    assert!(latest.publications.is_empty(), "no history left: {:?}", latest.publications);
    let next = b.publish(&ch, "4", PublishOptions::default()).await.expect("publish");
    assert_eq!((next.epoch.as_str(), next.offset), (hist.epoch.as_str(), 1), "the channel continues in the new epoch");
    until_within("the subscribed node receives the message in the new epoch", WAIT, async || {
        let p = h.publications.lock().unwrap_or_else(|e| e.into_inner());
        p.iter().any(|(c, p)| *c == ch && *p.epoch == *next.epoch && p.offset == 1)
    })
    .await;
    b.delete_history(&format!("{}:never", prefix())).await.expect("delete_history of an unknown channel");
}

async fn offsets_and_order<F, Fut>(make: &F, s: Settings)
where
    F: Fn(Settings) -> Fut,
    Fut: Future<Output = Arc<dyn Broker>>,
{
    let (b, h) = fresh(make, s).await;
    let ch = format!("{}:order", prefix());
    let other = format!("{}:other", prefix());
    h.subscribed.lock().unwrap_or_else(|e| e.into_inner()).insert(ch.clone());
    b.subscribe(&ch).await.expect("subscribe");
    let mut epoch = None;
    for i in 1..=50u64 {
        let r = b.publish(&ch, &format!("{{\"n\":{i}}}"), PublishOptions::default()).await.expect("publish");
        assert_eq!(r.offset, i, "offsets go up by one per message");
        let e = epoch.get_or_insert_with(|| r.epoch.clone());
        assert_eq!(*e, r.epoch, "epoch is stable");
    }
    b.publish(&other, "1", PublishOptions::default()).await.expect("publish");
    poll_within("all 50 delivered", WAIT, async || {
        let got = h.offsets(&ch);
        if got.len() == 50 { Ok(()) } else { Err(format!("got {got:?}")) }
    })
    .await;
    assert_eq!(h.offsets(&ch), (1..=50).collect::<Vec<_>>(), "delivered in offset order");
    assert!(h.offsets(&other).is_empty(), "unsubscribed channels are not delivered");
    let p = h.publications.lock().unwrap_or_else(|e| e.into_inner())[0].1.clone();
    let v: serde_json::Value = serde_json::from_slice(&p.frame).unwrap_or_default();
    assert_eq!(v["type"], "message");
    assert_eq!(v["channel"], ch.as_str());
    assert_eq!(v["offset"], 1);
    assert_eq!(v["data"]["n"], 1);
    assert_eq!(v["epoch"].as_str(), epoch.as_deref());
}

async fn history_windows<F, Fut>(make: &F, s: Settings)
where
    F: Fn(Settings) -> Fut,
    Fut: Future<Output = Arc<dyn Broker>>,
{
    let (b, _h) = fresh(make, s).await;
    let ch = format!("{}:hist", prefix());
    let empty = b.history(&ch, None, 10).await.expect("history");
    assert_eq!(empty.offset, 0);
    assert!(empty.publications.is_empty() && !empty.gap);
    let empty2 = b.history(&ch, None, 10).await.expect("history");
    assert_eq!(empty.epoch, empty2.epoch, "an unpublished channel keeps its epoch");
    let mut epoch = String::new();
    for i in 1..=15u64 {
        epoch = b.publish(&ch, &i.to_string(), PublishOptions::default()).await.expect("publish").epoch;
    }
    assert_eq!(epoch, empty.epoch, "the epoch seen before the first publish is the channel's epoch");
    let offs = |h: &History| h.publications.iter().map(|p| p.offset).collect::<Vec<_>>();
    let latest = b.history(&ch, None, 3).await.expect("history");
    assert_eq!((latest.offset, offs(&latest)), (15, vec![13, 14, 15]), "latest N without since");
    let pos = |o| StreamPosition { epoch: epoch.clone(), offset: o };
    let h = b.history(&ch, Some(&pos(10)), 100).await.expect("history");
    assert_eq!((offs(&h), h.gap), (vec![11, 12, 13, 14, 15], false), "since within history");
    let h = b.history(&ch, Some(&pos(10)), 2).await.expect("history");
    assert_eq!(offs(&h), vec![11, 12], "limit takes the oldest after since");
    let h = b.history(&ch, Some(&pos(15)), 100).await.expect("history");
    assert!(h.publications.is_empty() && !h.gap, "nothing missed");
    let h = b.history(&ch, Some(&pos(5)), 100).await.expect("history");
    assert_eq!((offs(&h).len(), h.gap), (10, false), "history_size 10 holds 6..=15: nothing missing after 5");
    let h = b.history(&ch, Some(&pos(4)), 100).await.expect("history");
    assert!(h.gap, "offset 5 was trimmed");
    let h = b.history(&ch, Some(&StreamPosition { epoch: "other".into(), offset: 10 }), 100).await.expect("history");
    assert!(h.gap, "a different epoch is a gap");
    let h = b.history(&ch, Some(&pos(99)), 100).await.expect("history");
    assert!(h.gap, "an offset beyond the top is a gap");
}

async fn idempotency<F, Fut>(make: &F, s: Settings)
where
    F: Fn(Settings) -> Fut,
    Fut: Future<Output = Arc<dyn Broker>>,
{
    let (b, h) = fresh(make, s).await;
    let ch = format!("{}:idem", prefix());
    h.subscribed.lock().unwrap_or_else(|e| e.into_inner()).insert(ch.clone());
    b.subscribe(&ch).await.expect("subscribe");
    let k = PublishOptions { idempotency_key: Some("k1") };
    let r1 = b.publish(&ch, "1", k).await.expect("publish");
    let r2 = b.publish(&ch, "1", k).await.expect("publish");
    assert_eq!(r1, r2, "a retried publish returns the first result");
    let r3 = b.publish(&ch, "2", PublishOptions { idempotency_key: Some("k2") }).await.expect("publish");
    assert_eq!(r3.offset, r1.offset + 1);
    until_within("both publishes delivered", WAIT, async || h.offsets(&ch).len() == 2).await;
    let marker = b.publish(&ch, "3", PublishOptions::default()).await.expect("publish");
    until_within("the marker delivered", WAIT, async || h.offsets(&ch).contains(&marker.offset)).await;
    assert_eq!(h.offsets(&ch), vec![1, 2, 3], "the retry was not delivered again");
}

async fn unsubscribe_rechecks<F, Fut>(make: &F, s: Settings)
where
    F: Fn(Settings) -> Fut,
    Fut: Future<Output = Arc<dyn Broker>>,
{
    let (b, h) = fresh(make, s).await;
    let ch = format!("{}:unsub", prefix());
    h.subscribed.lock().unwrap_or_else(|e| e.into_inner()).insert(ch.clone());
    b.subscribe(&ch).await.expect("subscribe");
    // The handler still has subscribers: a (late) unsubscribe must not take effect.
    b.unsubscribe(&ch).await.expect("unsubscribe");
    b.publish(&ch, "1", PublishOptions::default()).await.expect("publish");
    until_within("still delivered after a stale unsubscribe", WAIT, async || h.offsets(&ch) == [1]).await;
    h.subscribed.lock().unwrap_or_else(|e| e.into_inner()).clear();
    b.unsubscribe(&ch).await.expect("unsubscribe");
    b.publish(&ch, "2", PublishOptions::default()).await.expect("publish");
    // Prove the unsubscribe took effect: subscribe another channel, publish there, and once that
    // arrives, the earlier publish on `ch` would have too.
    let probe = format!("{}:probe", prefix());
    h.subscribed.lock().unwrap_or_else(|e| e.into_inner()).insert(probe.clone());
    b.subscribe(&probe).await.expect("subscribe");
    b.publish(&probe, "1", PublishOptions::default()).await.expect("publish");
    until_within("the probe delivered", WAIT, async || h.offsets(&probe) == [1]).await;
    assert_eq!(h.offsets(&ch), vec![1], "not delivered after unsubscribe");
}

async fn presence_and_connections<F, Fut>(make: &F, s: Settings)
where
    F: Fn(Settings) -> Fut,
    Fut: Future<Output = Arc<dyn Broker>>,
{
    let (b, h) = fresh(make, s).await;
    let ch = format!("{}:presence", prefix());
    let user = format!("{}-user", prefix());
    let e1 = PresenceEntry { client: "c1".into(), user: user.clone(), node: "n1".into() };
    let e2 = PresenceEntry { client: "c2".into(), user: "u2".into(), node: "n1".into() };
    b.presence_add(&ch, &e1).await.expect("presence_add");
    b.presence_add(&ch, &e2).await.expect("presence_add");
    b.presence_add(&ch, &e2).await.expect("presence_add");
    let mut p = b.presence(&ch).await.expect("presence");
    p.sort_by(|a, b| a.client.cmp(&b.client));
    assert_eq!(p, vec![e1.clone(), e2.clone()]);
    b.presence_remove(&ch, "c2").await.expect("presence_remove");
    assert_eq!(b.presence(&ch).await.unwrap_or_default(), vec![e1]);

    assert_eq!(b.connection_opened(&user, "c1").await.ok(), Some(1));
    assert_eq!(b.connection_opened(&user, "c2").await.ok(), Some(2));
    b.connection_closed(&user, "c1").await.expect("connection_closed");
    assert_eq!(b.connection_opened(&user, "c3").await.ok(), Some(2));

    assert!(b.disconnect_user(&user).await.is_ok());
    until_within("disconnect_user reaches the handler", WAIT, async || {
        h.disconnected.lock().unwrap_or_else(|e| e.into_inner()).contains(&user)
    })
    .await;

    let me = NodeInfo {
        node: format!("{}-node", prefix()),
        connections: 3,
        version: "t".into(),
        ready: true,
        ..Default::default()
    };
    b.report_node(&me).await.expect("report_node");
    let nodes = b.nodes().await.expect("nodes");
    assert!(nodes.contains(&me), "the node registry lists this node: {nodes:?}");
    assert!(b.is_up());
}

/// Channel namespaces (`max_subscribers`): `presence_add_counted` adds like `presence_add` and
/// answers the channel's live entries after the add (a refreshed entry is not counted twice);
/// with a bound, a newcomer to a full channel is not entered.
async fn presence_counted<F, Fut>(make: &F, s: Settings)
where
    F: Fn(Settings) -> Fut,
    Fut: Future<Output = Arc<dyn Broker>>,
{
    let (b, _h) = fresh(make, s).await;
    let ch = format!("{}:counted", prefix());
    let entry = |c: &str| PresenceEntry { client: c.into(), user: "u".into(), node: "n1".into() };
    let count = async |c: &str| b.presence_add_counted(&ch, &entry(c), 0).await.expect("add");
    assert_eq!(count("c1").await, 1);
    assert_eq!(count("c2").await, 2);
    assert_eq!(count("c2").await, 2, "a refresh is not a new entry");
    b.presence_remove(&ch, "c1").await.expect("presence_remove");
    assert_eq!(count("c3").await, 2);
    let mut p = b.presence(&ch).await.expect("presence");
    p.sort_by(|a, b| a.client.cmp(&b.client));
    assert_eq!(p, vec![entry("c2"), entry("c3")], "counted entries are ordinary presence entries");
    let other = format!("{}:counted-other", prefix());
    assert_eq!(b.presence_add_counted(&other, &entry("c1"), 0).await.ok(), Some(1), "counted per channel");
    // Bounded: a newcomer to a full channel is not entered; one already in is refreshed.
    let bounded = async |c: &str| b.presence_add_counted(&other, &entry(c), 2).await.expect("add");
    assert_eq!(bounded("c2").await, 2);
    assert_eq!(bounded("c3").await, 3, "over the bound");
    assert_eq!(bounded("c1").await, 2, "a member refreshes whatever the bound");
    let stats = b.presence_stats(&other).await.expect("presence_stats");
    assert_eq!(stats.clients, 2, "the refused one was not entered");
}

async fn presence_stats<F, Fut>(make: &F, s: Settings)
where
    F: Fn(Settings) -> Fut,
    Fut: Future<Output = Arc<dyn Broker>>,
{
    let (b, _h) = fresh(make, s).await;
    let ch = format!("{}:stats", prefix());
    let stats = async |b: &Arc<dyn Broker>| b.presence_stats(&ch).await.expect("presence_stats");
    assert_eq!(stats(&b).await, PresenceStats { clients: 0, users: 0 }, "an empty channel");
    let entry =
        |client: &str, user: &str| PresenceEntry { client: client.into(), user: user.into(), node: "n1".into() };
    for (client, user) in [("c1", "u1"), ("c2", "u2"), ("c3", "u1"), ("c3", "u1")] {
        b.presence_add(&ch, &entry(client, user)).await.expect("presence_add");
    }
    assert_eq!(stats(&b).await, PresenceStats { clients: 3, users: 2 }, "a refreshed entry counts once");
    b.presence_remove(&ch, "c1").await.expect("presence_remove");
    assert_eq!(stats(&b).await, PresenceStats { clients: 2, users: 2 }, "u1 still has c3");
    b.presence_remove(&ch, "c3").await.expect("presence_remove");
    b.presence_remove(&ch, "c3").await.expect("presence_remove");
    assert_eq!(stats(&b).await, PresenceStats { clients: 1, users: 1 }, "a second remove changes nothing");
    b.presence_remove(&ch, "c2").await.expect("presence_remove");
    assert_eq!(stats(&b).await, PresenceStats { clients: 0, users: 0 });
}

/// Join/leave events on a `join_leave` channel reach a subscribed node in order with the
/// channel's publications, once per arrival and departure; other channels have none.
async fn join_leave_in_order<F, Fut>(make: &F, s: Settings)
where
    F: Fn(Settings) -> Fut,
    Fut: Future<Output = Arc<dyn Broker>>,
{
    let (b, h) = fresh(make, s).await;
    let ch = format!("{JOIN_LEAVE_NS}:{}", prefix());
    let quiet = format!("{}:quiet", prefix());
    for c in [&ch, &quiet] {
        h.subscribed.lock().unwrap_or_else(|e| e.into_inner()).insert(c.clone());
        b.subscribe(c).await.expect("subscribe");
    }
    let publish = async |c: &str| {
        b.publish(c, "1", PublishOptions::default()).await.expect("publish");
    };
    let e1 = PresenceEntry { client: "c1".into(), user: "u1".into(), node: "n1".into() };
    let e2 = PresenceEntry { client: "c2".into(), user: "u2".into(), node: "n1".into() };
    publish(&ch).await;
    b.presence_add(&ch, &e1).await.expect("presence_add");
    publish(&ch).await;
    b.presence_add(&ch, &e1).await.expect("presence_add");
    b.presence_add(&ch, &e2).await.expect("presence_add");
    b.presence_remove(&ch, "c1").await.expect("presence_remove");
    b.presence_remove(&ch, "c1").await.expect("presence_remove");
    publish(&ch).await;
    b.presence_add(&quiet, &e1).await.expect("presence_add");
    publish(&quiet).await;
    b.presence_remove(&quiet, "c1").await.expect("presence_remove");
    publish(&quiet).await;
    let want = ["message:1", "join:c1", "message:2", "join:c2", "leave:c1", "message:3"];
    poll_within("join/leave in order with the messages", WAIT, async || {
        let got = h.stream_of(&ch);
        if got.len() >= want.len() { Ok(()) } else { Err(format!("got {got:?}")) }
    })
    .await;
    until_within("the quiet channel's messages", WAIT, async || h.stream_of(&quiet).len() >= 2).await;
    assert_eq!(h.stream_of(&ch), want, "a refresh is no join, a second remove no leave");
    assert_eq!(h.stream_of(&quiet), ["message:1", "message:2"], "no events without join_leave");
    // A joined client's event is a join frame with its entry.
    b.presence_add(&ch, &e1).await.expect("presence_add");
    let stats = b.presence_stats(&ch).await.expect("presence_stats");
    assert_eq!(stats, PresenceStats { clients: 2, users: 2 });
    // The counted add (a namespace with `max_subscribers` and `join_leave`) announces like the
    // plain one.
    let counted = format!("{JOIN_LEAVE_NS}:{}-counted", prefix());
    h.subscribed.lock().unwrap_or_else(|e| e.into_inner()).insert(counted.clone());
    b.subscribe(&counted).await.expect("subscribe");
    let n = b.presence_add_counted(&counted, &e1, 1).await.expect("presence_add_counted");
    assert_eq!(n, 1);
    let full = b.presence_add_counted(&counted, &e2, 1).await.expect("presence_add_counted");
    assert_eq!(full, 2, "full: not entered, so no join either");
    b.presence_remove(&counted, "c1").await.expect("presence_remove");
    publish(&counted).await;
    let want = ["join:c1", "leave:c1", "message:1"];
    poll_within("the counted add's join", WAIT, async || {
        let got = h.stream_of(&counted);
        if got.len() >= want.len() { Ok(()) } else { Err(format!("got {got:?}")) }
    })
    .await;
    assert_eq!(h.stream_of(&counted), want, "a counted add is a join too");
}

/// Server-side control (issue 19, part C): an operation reaches this node's handler (and its
/// reply is in the result); an invalidation is kept, a later `before` wins, and `revocations`
/// filters by `since`.
async fn user_ops<F, Fut>(make: &F, s: Settings)
where
    F: Fn(Settings) -> Fut,
    Fut: Future<Output = Arc<dyn Broker>>,
{
    let (b, h) = fresh(make, s).await;
    let user = format!("{}-user", prefix());
    let op =
        UserOp::Subscribe { channel: "news".into(), recover: Some(StreamPosition { epoch: "e".into(), offset: 3 }) };
    let r = b.user_op(&user, &op).await.expect("user_op");
    assert!(r.count >= 1, "this node's handler answered: {r:?}");
    assert!(
        h.user_ops.lock().unwrap_or_else(|e| e.into_inner()).contains(&(user.clone(), op.clone())),
        "the handler got the operation as sent"
    );
    let r = b.user_op(&user, &UserOp::Connections).await.expect("user_op");
    assert!(r.connections.iter().any(|c| c.client == "c1" && c.channels == ["a"]), "entries come back: {r:?}");

    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs());
    b.user_op(&user, &UserOp::Invalidate { before: now }).await.expect("invalidate");
    b.user_op(&user, &UserOp::Invalidate { before: now - 10 }).await.expect("invalidate");
    let mine = |list: Vec<crier_core::broker::Revocation>| list.into_iter().find(|r| r.user == user).map(|r| r.before);
    let all = b.revocations(now - 100).await.expect("revocations");
    assert_eq!(mine(all), Some(now), "the latest `before` is kept, an earlier one does not lower it");
    let newer = b.revocations(now + 1).await.expect("revocations");
    assert_eq!(mine(newer), None, "revocations older than `since` are left out");
}

async fn history_expiry<F, Fut>(make: &F, s: Settings)
where
    F: Fn(Settings) -> Fut,
    Fut: Future<Output = Arc<dyn Broker>>,
{
    let (b, _h) = fresh(make, s).await;
    let ch = format!("{}:ttl", prefix());
    let r = b.publish(&ch, "1", PublishOptions::default()).await.expect("publish");
    let pos = StreamPosition { epoch: r.epoch.clone(), offset: 0 };
    let h = b.history(&ch, Some(&pos), 10).await.expect("history");
    assert_eq!(h.publications.len(), 1);
    until_within("history expires after history_ttl", WAIT, async || {
        let h = b.history(&ch, Some(&pos), 10).await.expect("history");
        h.publications.is_empty() && h.gap
    })
    .await;
}
