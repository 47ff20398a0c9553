//! The pub/sub task's connections: one per master. One Redis or Sentinel: a single connection
//! (plain `SUBSCRIBE`). A Redis Cluster: one connection per master ("shard"), each channel's
//! shard channel `SSUBSCRIBE`d on the master of its slot, its history read on that same
//! connection (so the replies stay ordered with its pushes, as on one Redis).
//!
//! Every connection sends its pushes into one queue; a channel's publications all come from its
//! shard, in order. Any change of the slot map (a connection lost, `MOVED`, a server-side
//! `SUNSUBSCRIBE` when a slot migrates, a master demoted) ends the connected phase: the task
//! reconnects everything with a fresh slot map, re-subscribes, and gap-fills every channel.

use redis::aio::MultiplexedConnection;
use redis::{PushInfo, Value};
use tokio::sync::mpsc;

use super::{Step, lost};
use crate::command::bounded;
use crate::keys::Keys;
use crate::scripts::HistoryCall;
use crate::slots::{self, SlotMap};

/// Channels per SUBSCRIBE command (or per SSUBSCRIBE pipeline).
pub(super) const SUBSCRIBE_BATCH: usize = 500;

pub(super) struct Shard {
    pub con: MultiplexedConnection,
    pub history_sha: String,
    /// `host:port`.
    pub key: String,
}

pub(super) struct Conn {
    pub shards: Vec<Shard>,
    /// `None`: one Redis (everything on shard 0).
    pub slots: Option<SlotMap>,
    pub pushes: mpsc::UnboundedReceiver<PushInfo>,
    /// Shard channels this task SUNSUBSCRIBEd whose confirmation push has not come yet: that
    /// push is not a slot moving away (a channel re-subscribed meanwhile must not be taken for
    /// one). Pub/sub channel name → confirmations awaited.
    pub unsubscribing: std::collections::HashMap<String, u32>,
}

impl Conn {
    /// The shard serving `channel`.
    pub(super) fn shard_of(&self, channel: &str) -> usize {
        match &self.slots {
            None => 0,
            Some(map) => map.master_of(slots::slot(Keys::slot_key(channel).as_bytes())),
        }
    }

    /// `channels` grouped by shard (in their order within each group).
    pub(super) fn group<'a, S: AsRef<str>>(&self, channels: &'a [S]) -> Vec<(usize, Vec<&'a str>)> {
        let mut groups: Vec<(usize, Vec<&'a str>)> = Vec::new();
        for c in channels {
            let shard = self.shard_of(c.as_ref());
            match groups.iter_mut().find(|(s, _)| *s == shard) {
                Some((_, list)) => list.push(c.as_ref()),
                None => groups.push((shard, vec![c.as_ref()])),
            }
        }
        groups
    }

    fn shard(&mut self, shard: usize) -> Result<&mut Shard, super::End> {
        self.shards.get_mut(shard).ok_or_else(|| lost(format!("no shard {shard}")))
    }

    /// Subscribes pub/sub channel `names` on `shard`: SUBSCRIBE, or on a Cluster one SSUBSCRIBE
    /// per channel, pipelined (each confirmation is one reply).
    pub(super) async fn subscribe(&mut self, shard: usize, names: &[String], t: std::time::Duration) -> Step {
        let sharded = self.slots.is_some();
        let s = self.shard(shard)?;
        for chunk in names.chunks(SUBSCRIBE_BATCH) {
            if sharded {
                let mut pipe = redis::pipe();
                for name in chunk {
                    pipe.cmd("SSUBSCRIBE").arg(name);
                }
                bounded(t, pipe.query_async::<Vec<Value>>(&mut s.con)).await.map_err(lost)?;
            } else {
                bounded(t, s.con.subscribe(chunk)).await.map_err(lost)?;
            }
        }
        Ok(())
    }

    /// Unsubscribes pub/sub channel `names` on `shard`: one UNSUBSCRIBE, or on a Cluster one
    /// SUNSUBSCRIBE per channel, pipelined.
    pub(super) async fn unsubscribe(&mut self, shard: usize, names: &[String], t: std::time::Duration) -> Step {
        let sharded = self.slots.is_some();
        for chunk in names.chunks(SUBSCRIBE_BATCH) {
            if sharded {
                let mut pipe = redis::pipe();
                for name in chunk {
                    pipe.cmd("SUNSUBSCRIBE").arg(name);
                    *self.unsubscribing.entry(name.clone()).or_default() += 1;
                }
                let s = self.shard(shard)?;
                bounded(t, pipe.query_async::<Vec<Value>>(&mut s.con)).await.map(drop).map_err(lost)?;
            } else {
                let s = self.shard(shard)?;
                bounded(t, s.con.unsubscribe(chunk)).await.map_err(lost)?;
            }
        }
        Ok(())
    }

    /// Runs history-script `calls` on `shard`, pipelined (EVALSHA with the script loaded on
    /// that connection); the replies in `calls`' order.
    pub(super) async fn read_histories(
        &mut self,
        shard: usize,
        calls: impl IntoIterator<Item = HistoryCall>,
        t: std::time::Duration,
    ) -> Result<Vec<Value>, super::End> {
        let s = self.shard(shard)?;
        let mut pipe = redis::pipe();
        for call in calls {
            pipe.add_command(call.evalsha(&s.history_sha));
        }
        bounded(t, pipe.query_async::<Vec<Value>>(&mut s.con)).await.map_err(lost)
    }
}
