//! The pub/sub task's delivery side: pushes from Redis (publications, control messages, the
//! connection's end) and the gap-fill from the history. Every publication reaches the handler
//! from here, in offset order per channel, exactly once (see [`NodePosition`]).

use std::sync::atomic::Ordering;

use bytes::Bytes;
use crier_core::Publication;
use redis::{PushInfo, PushKind, Value};
use tokio::sync::mpsc;

use super::shards::Conn;
use super::{ChannelSync, Step, Task, lost};
use crate::control;
use crate::node_position::{NodePosition, Verdict};
use crate::payload;
use crate::scripts::{self, ALL, HistoryCall};

/// History reads per gap-fill pipeline.
const FILL_BATCH: usize = 100;

impl Task {
    /// Handles every push already received.
    pub(super) async fn drain(&mut self, conn: &mut Conn) -> Step {
        loop {
            match conn.pushes.try_recv() {
                Ok(push) => self.on_push(conn, push).await?,
                Err(mpsc::error::TryRecvError::Empty) => return Ok(()),
                Err(mpsc::error::TryRecvError::Disconnected) => return Err(lost("push stream ended")),
            }
        }
    }

    pub(super) async fn on_push(&mut self, conn: &mut Conn, push: PushInfo) -> Step {
        match push.kind {
            PushKind::Disconnection => Err(lost("connection closed")),
            // A slot of a subscribed shard channel moved away (resharding, failover): the slot
            // map changed, so reconnect everything (re-subscribe on the new owners, gap-fill).
            PushKind::SUnsubscribe => {
                // The confirmation of this task's own SUNSUBSCRIBE: not a move.
                if let Some(Value::BulkString(name)) = push.data.first()
                    && let Ok(name) = std::str::from_utf8(name)
                    && let Some(n) = conn.unsubscribing.get_mut(name)
                {
                    *n -= 1;
                    if *n == 0 {
                        conn.unsubscribing.remove(name);
                    }
                    return Ok(());
                }
                let channel = push.data.first().and_then(|v| match v {
                    Value::BulkString(name) => self.ctx.keys.channel_of(name).map(str::to_owned),
                    _ => None,
                });
                match channel {
                    Some(c) if self.channels.contains_key(c.as_str()) => {
                        Err(lost(format!("redis moved the slot of {c}")))
                    }
                    _ => Ok(()),
                }
            }
            PushKind::Message | PushKind::SMessage => {
                let mut data = push.data.into_iter();
                let (Some(Value::BulkString(name)), Some(Value::BulkString(payload))) = (data.next(), data.next())
                else {
                    return Ok(());
                };
                if name == self.control {
                    control::on_control(&self.ctx, &payload);
                    return Ok(());
                }
                if name == self.reply {
                    control::on_reply(&self.ctx, &payload);
                    return Ok(());
                }
                match self.ctx.keys.channel_of(&name) {
                    Some(channel) => self.on_message(conn, channel, Bytes::from(payload)).await,
                    None => Ok(()),
                }
            }
            _ => Ok(()),
        }
    }

    async fn on_message(&mut self, conn: &mut Conn, channel: &str, payload: Bytes) -> Step {
        // A join/leave: not a publication, no offset to check; handed on in stream order.
        if payload.starts_with(b"e:") {
            if self.channels.contains_key(channel)
                && let Some(event) = payload::presence_event(&payload)
                && let Some(h) = self.ctx.handler.get()
            {
                h.on_presence_event(channel, event);
            }
            return Ok(());
        }
        let Some(h) = payload::header(&payload) else {
            tracing::warn!("malformed publication payload ignored");
            return Ok(());
        };
        let (offset, ts, start) = (h.offset, h.published_at_us, h.frame_start);
        let gap_fill = self.ctx.params.channel(channel).history_size > 0;
        let Some(state) = self.channels.get_mut(channel) else {
            return Ok(()); // a late message after an unsubscribe
        };
        let verdict = match state {
            ChannelSync::Pending => {
                *state = ChannelSync::Tracking(NodePosition::new(h.epoch.into(), offset));
                Verdict::Deliver
            }
            ChannelSync::Tracking(pos) => {
                if *pos.epoch != *h.epoch
                    && let Some(handler) = self.ctx.handler.get()
                {
                    // The channel's history was lost or deleted (`Broker::delete_history`) and a
                    // new epoch began: the subscribers are told before its first publication.
                    handler.on_gap(channel, h.epoch, 0);
                }
                pos.check(h.epoch, offset, gap_fill)
            }
        };
        let verdict = match verdict {
            Verdict::Gap => {
                let epoch = h.epoch.to_owned();
                self.fill(conn, &[channel.to_owned()]).await?;
                match self.channels.get_mut(channel) {
                    Some(ChannelSync::Tracking(pos)) => pos.check(&epoch, offset, false),
                    _ => Verdict::Duplicate,
                }
            }
            v => v,
        };
        if verdict == Verdict::Deliver
            && let Some(ChannelSync::Tracking(pos)) = self.channels.get(channel)
        {
            let publication =
                Publication { offset, epoch: pos.epoch.clone(), frame: payload.slice(start..), published_at_us: ts };
            self.ctx.deliver(channel, publication);
        }
        Ok(())
    }

    /// Reads the tracked channels' histories after their last delivered offsets and delivers
    /// what this node missed.
    pub(super) async fn fill(&mut self, conn: &mut Conn, channels: &[String]) -> Step {
        let t = self.ctx.options.command_timeout;
        let mut chunks: Vec<(usize, Vec<String>)> = Vec::new();
        for (shard, list) in conn.group(channels) {
            for chunk in list.chunks(FILL_BATCH) {
                chunks.push((shard, chunk.iter().map(|c| (*c).to_owned()).collect()));
            }
        }
        for (shard, chunk) in chunks {
            let mut calls = Vec::with_capacity(chunk.len());
            let mut asked = Vec::with_capacity(chunk.len());
            for channel in &chunk {
                if let Some(ChannelSync::Tracking(pos)) = self.channels.get(channel.as_str()) {
                    let since = Some((&*pos.epoch, pos.last));
                    calls.push(HistoryCall::new(&self.ctx.keys, &self.ctx.params, channel, since, ALL));
                    asked.push(channel);
                }
            }
            if asked.is_empty() {
                continue;
            }
            let replies = conn.read_histories(shard, calls, t).await?;
            for (channel, v) in asked.into_iter().zip(replies) {
                let h = scripts::parse_history(v).map_err(lost)?;
                let Some(ChannelSync::Tracking(pos)) = self.channels.get_mut(channel.as_str()) else { continue };
                let before = (pos.epoch.clone(), pos.last);
                let incomplete = h.gap || *before.0 != *h.epoch;
                if incomplete && let Some(handler) = self.ctx.handler.get() {
                    // Before the publications that follow the loss, so subscribers hear of it first.
                    handler.on_gap(channel, &h.epoch, h.offset);
                }
                pos.rebase(&h.epoch, h.offset);
                let mut delivered = 0usize;
                for mut p in h.publications {
                    if pos.take(p.offset) {
                        p.epoch = pos.epoch.clone();
                        self.ctx.deliver(channel, p);
                        delivered += 1;
                    }
                }
                pos.settle(h.offset);
                self.ctx.gap_filled.fetch_add(delivered as u64, Ordering::Relaxed);
                if incomplete {
                    tracing::warn!(channel, delivered, epoch_changed = *before.0 != *h.epoch, "gap-fill incomplete");
                } else if delivered > 0 {
                    tracing::debug!(channel, delivered, "gap filled from history");
                }
            }
        }
        Ok(())
    }
}
