//! The task's requests, taken from the queue in batches: subscribes (SUBSCRIBE, then each
//! channel's baseline read on the same connection) and history reads of locally subscribed
//! channels are pipelined; an unsubscribe runs after everything queued before it. While the
//! connection is down, requests are answered without Redis.

use std::collections::HashMap;

use crier_core::BrokerError;
use redis::Value;
use tokio::sync::oneshot;

use super::shards::Conn;
use super::{ChannelSync, End, HistoryRead, Request, Step, Task, lost};
use crate::node_position::NodePosition;
use crate::scripts::{self, HistoryCall};

/// Requests taken from the queue at once.
const REQUEST_BATCH: usize = 256;
/// Baseline reads per pipeline.
const BASELINE_BATCH: usize = 100;

type Subscribe = (String, oneshot::Sender<Result<(), BrokerError>>);

impl Task {
    /// Answers a request without a connection: a new subscribe is refused; an unsubscribe only
    /// forgets the channel (it is not re-subscribed on reconnect).
    pub(super) fn answer_offline(&mut self, request: Request) {
        match request {
            Request::Subscribe { channel, reply } => {
                let answer = if self.channels.contains_key(channel.as_str()) {
                    Ok(())
                } else {
                    Err(BrokerError::Unavailable("redis pub/sub is reconnecting".into()))
                };
                let _ = reply.send(answer);
            }
            Request::Unsubscribe { channel, reply } => {
                self.forget(&channel);
                let _ = reply.send(());
            }
            Request::History(read) => {
                let _ = read.reply.send(Err(BrokerError::Unavailable("redis pub/sub is reconnecting".into())));
            }
        }
    }

    /// Drops a channel from the subscription set unless the node has subscribers again.
    fn forget(&mut self, channel: &str) {
        if !self.ctx.has_subscribers(channel) {
            self.channels.remove(channel);
        }
    }

    pub(super) async fn on_requests(&mut self, conn: &mut Conn, first: Request) -> Step {
        let mut batch = vec![first];
        while batch.len() < REQUEST_BATCH {
            match self.requests.try_recv() {
                Ok(request) => batch.push(request),
                Err(_) => break,
            }
        }
        // Subscribes and history reads are batched (subscribes first), and so are unsubscribes:
        // per channel, in the order asked — a request about a channel with an earlier request of
        // the other kind waiting sends what waits first. (One UNSUBSCRIBE per channel, each
        // waited for, bounded a node's channel churn at one round trip per vacated channel.)
        let (mut subs, mut reads, mut unsubs) = (Vec::new(), Vec::new(), Vec::new());
        let mut batch = batch.into_iter();
        let mut result = Ok(());
        for request in batch.by_ref() {
            match request {
                Request::Subscribe { channel, reply } => {
                    if unsubs.iter().any(|(c, _)| *c == channel) {
                        result = self.unsubscribe(conn, &mut unsubs).await;
                    }
                    subs.push((channel, reply));
                }
                Request::History(read) => {
                    if unsubs.iter().any(|(c, _)| *c == read.channel) {
                        result = self.unsubscribe(conn, &mut unsubs).await;
                    }
                    reads.push(read);
                }
                Request::Unsubscribe { channel, reply } => {
                    if subs.iter().any(|(c, _)| *c == channel) || reads.iter().any(|r| r.channel == channel) {
                        result = self.flush(conn, &mut subs, &mut reads).await;
                    }
                    unsubs.push((channel, reply));
                }
            }
            if result.is_err() {
                break;
            }
        }
        if result.is_ok() {
            result = self.flush(conn, &mut subs, &mut reads).await;
        }
        if result.is_ok() {
            result = self.unsubscribe(conn, &mut unsubs).await;
        }
        // Unsubscribes not sent: forgotten (not re-subscribed on reconnect), answered.
        for (channel, reply) in unsubs {
            self.forget(&channel);
            let _ = reply.send(());
        }
        // The connection is gone: answer the rest as if offline.
        for (channel, reply) in subs {
            self.answer_offline(Request::Subscribe { channel, reply });
        }
        for read in reads {
            self.answer_offline(Request::History(read));
        }
        for request in batch {
            self.answer_offline(request);
        }
        result
    }

    async fn flush(&mut self, conn: &mut Conn, subs: &mut Vec<Subscribe>, reads: &mut Vec<HistoryRead>) -> Step {
        self.subscribe(conn, std::mem::take(subs)).await?;
        self.read_histories(conn, std::mem::take(reads)).await
    }

    /// History reads ordered with the live stream: the replies come on this connection after
    /// every publication pushed before the reads ran, and those are delivered (drained) before
    /// the callers get their answers. So a node that reads a channel's history at top T has
    /// already been handed every publication <= T that it will get live: its merge by offset
    /// (buffer, then drop what the history covered) is exact — no duplicate, no gap.
    async fn read_histories(&mut self, conn: &mut Conn, reads: Vec<HistoryRead>) -> Step {
        if reads.is_empty() {
            return Ok(());
        }
        let replies = self.read_on_shards(conn, &reads).await;
        let replies = match replies {
            Ok(replies) => self.drain(conn).await.map(|()| replies),
            Err(e) => Err(e),
        };
        match replies {
            Ok(replies) => {
                for (r, v) in reads.into_iter().zip(replies) {
                    let _ = r.reply.send(scripts::parse_history(v).map_err(BrokerError::from));
                }
                Ok(())
            }
            Err(end) => {
                for r in reads {
                    self.answer_offline(Request::History(r));
                }
                Err(end)
            }
        }
    }

    /// The history reads, each on its channel's shard (pipelined per shard); replies in `reads`'
    /// order.
    async fn read_on_shards(&mut self, conn: &mut Conn, reads: &[HistoryRead]) -> Result<Vec<Value>, End> {
        let t = self.ctx.options.command_timeout;
        let mut replies: Vec<Option<Value>> = (0..reads.len()).map(|_| None).collect();
        let mut by_shard: Vec<(usize, Vec<usize>)> = Vec::new();
        for (i, r) in reads.iter().enumerate() {
            let shard = conn.shard_of(&r.channel);
            match by_shard.iter_mut().find(|(s, _)| *s == shard) {
                Some((_, list)) => list.push(i),
                None => by_shard.push((shard, vec![i])),
            }
        }
        for (shard, indices) in by_shard {
            let calls = indices.iter().map(|&i| {
                let r = &reads[i];
                let since = r.since.as_ref().map(|p| (p.epoch.as_str(), p.offset));
                HistoryCall::new(&self.ctx.keys, &self.ctx.params, &r.channel, since, r.limit)
            });
            let values = conn.read_histories(shard, calls, t).await?;
            for (i, v) in indices.into_iter().zip(values) {
                replies[i] = Some(v);
            }
        }
        replies.into_iter().map(|v| v.ok_or_else(|| lost("a history read got no reply"))).collect()
    }

    async fn subscribe(&mut self, conn: &mut Conn, subs: Vec<Subscribe>) -> Step {
        if subs.is_empty() {
            return Ok(());
        }
        let mut fresh = Vec::new();
        let mut replies = Vec::with_capacity(subs.len());
        for (channel, reply) in subs {
            let known = self.channels.contains_key(channel.as_str()) && !fresh.contains(&channel);
            if !self.channels.contains_key(channel.as_str()) {
                self.channels.insert(channel.as_str().into(), ChannelSync::Pending);
                fresh.push(channel);
            }
            replies.push((reply, known));
        }
        let result = self.subscribe_fresh(conn, &fresh).await;
        if result.is_err() {
            for channel in &fresh {
                self.channels.remove(channel.as_str());
            }
        }
        for (reply, known) in replies {
            let answer = match &result {
                Err(End::Lost(why)) if !known => {
                    Err(BrokerError::Unavailable(format!("redis subscribe failed: {why}")))
                }
                Err(End::Exit) if !known => Err(BrokerError::Unavailable("broker stopped".into())),
                _ => Ok(()),
            };
            let _ = reply.send(answer);
        }
        result
    }

    async fn subscribe_fresh(&mut self, conn: &mut Conn, fresh: &[String]) -> Step {
        let t = self.ctx.options.command_timeout;
        let mut positions = HashMap::with_capacity(fresh.len());
        for (shard, channels) in conn.group(fresh) {
            let names: Vec<String> = channels.iter().map(|c| self.ctx.keys.pubsub(c)).collect();
            conn.subscribe(shard, &names, t).await?;
            for chunk in channels.chunks(BASELINE_BATCH) {
                let calls =
                    chunk.iter().map(|channel| HistoryCall::new(&self.ctx.keys, &self.ctx.params, channel, None, 0));
                let replies = conn.read_histories(shard, calls, t).await?;
                for (channel, v) in chunk.iter().zip(replies) {
                    positions.insert((*channel).to_owned(), scripts::parse_history(v).map_err(lost)?);
                }
            }
        }
        // Publications pushed before the positions were read came after the SUBSCRIBE: deliver
        // them before the baseline is set.
        self.drain(conn).await?;
        for (channel, h) in positions {
            match self.channels.get_mut(channel.as_str()) {
                Some(state @ ChannelSync::Pending) => {
                    *state = ChannelSync::Tracking(NodePosition::new(h.epoch.into(), h.offset))
                }
                Some(ChannelSync::Tracking(pos)) if *pos.epoch == *h.epoch => pos.settle(h.offset),
                _ => {}
            }
        }
        Ok(())
    }

    /// Unsubscribes the channels of `unsubs` the node has no subscribers of again (one call per
    /// shard), then answers them; on a failure they stay in `unsubs` for the caller to forget.
    async fn unsubscribe(&mut self, conn: &mut Conn, unsubs: &mut Vec<(String, oneshot::Sender<()>)>) -> Step {
        let gone: Vec<&str> = unsubs
            .iter()
            .map(|(c, _)| c.as_str())
            .filter(|c| !self.ctx.has_subscribers(c) && self.channels.remove(*c).is_some())
            .collect();
        for (shard, channels) in conn.group(&gone) {
            let names: Vec<String> = channels.iter().map(|c| self.ctx.keys.pubsub(c)).collect();
            conn.unsubscribe(shard, &names, self.ctx.options.command_timeout).await?;
        }
        for (_, reply) in unsubs.drain(..) {
            let _ = reply.send(());
        }
        Ok(())
    }
}
