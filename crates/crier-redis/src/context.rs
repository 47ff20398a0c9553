//! The one context every part of the broker shares: built once by [`crate::RedisBroker::start`]
//! and held in one `Arc` by the broker handle, the publisher, the pub/sub task and the
//! presence state. It holds what does not change (options, key layout, scripts, channel
//! parameters, the command connection) and the few counters and flags the parts share.

use std::collections::HashMap;
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex, OnceLock};

use crier_core::{BrokerHandler, Publication, UserOpReply};
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, watch};

use crate::command::Commands;
use crate::keys::Keys;
use crate::options::RedisOptions;
use crate::scripts::{Params, Scripts};
use crate::topology::Topology;

/// See the module docs.
pub(crate) struct Context {
    pub options: RedisOptions,
    pub keys: Keys,
    /// The channels' history options, as the scripts take them.
    pub params: Params,
    pub scripts: Scripts,
    /// The command connection (every request/response call).
    pub commands: Commands,
    /// Random id of this broker instance: presence members are `<instance>/<client>`, control
    /// messages skip their sender, replies to its control operations come on its reply channel.
    pub instance: String,
    pub handler: OnceLock<Arc<dyn BrokerHandler>>,
    /// Whether the pub/sub connection is up (subscribed and gap-filled).
    pub up: watch::Sender<bool>,
    /// Pub/sub reconnects after a loss (`crier_broker_reconnects_total`).
    pub reconnects: AtomicU64,
    /// Publications delivered by gap-fills (missed live, recovered from the history).
    pub gap_filled: AtomicU64,
    /// Publish script calls made (`crier_broker_publish_calls_total`; messages per call =
    /// published messages / calls).
    pub publish_calls: AtomicU64,
    /// Set when a connection attempt failed for a reason retrying cannot fix (a certificate
    /// that does not verify, a master name no Sentinel knows); `start` reports it.
    setting_problem: Mutex<Option<String>>,
    /// Control operations of this instance waiting for the other nodes' replies, by id.
    pub replies: Mutex<HashMap<u64, mpsc::UnboundedSender<Reply>>>,
    /// Ids of this instance's control operations (replies are matched by it).
    pub next_op: AtomicU64,
}

impl Context {
    pub(crate) fn new(options: RedisOptions, commands: Commands, up: watch::Sender<bool>) -> Context {
        let keys = match options.topology {
            Topology::Cluster(_) => Keys::for_cluster(&options.key_prefix),
            _ => Keys::new(&options.key_prefix),
        };
        let params = Params::new(options.namespaces.clone(), options.meta_ttl);
        Context {
            options,
            keys,
            params,
            scripts: Scripts::new(),
            commands,
            instance: crate::scripts::new_epoch(),
            handler: OnceLock::new(),
            up,
            reconnects: AtomicU64::new(0),
            gap_filled: AtomicU64::new(0),
            publish_calls: AtomicU64::new(0),
            setting_problem: Mutex::new(None),
            replies: Mutex::default(),
            next_op: AtomicU64::new(0),
        }
    }

    /// This node's name (`node_id`).
    pub(crate) fn node(&self) -> &str {
        &self.options.node_id
    }

    pub(crate) fn deliver(&self, channel: &str, publication: Publication) {
        if let Some(h) = self.handler.get() {
            h.on_publication(channel, publication);
        }
    }

    pub(crate) fn has_subscribers(&self, channel: &str) -> bool {
        self.handler.get().is_some_and(|h| h.has_subscribers(channel))
    }

    pub(crate) fn setting_problem(&self) -> Option<String> {
        self.setting_problem.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    pub(crate) fn set_setting_problem(&self, problem: Option<String>) {
        *self.setting_problem.lock().unwrap_or_else(|e| e.into_inner()) = problem;
    }

    /// The pub/sub connection's name in `CLIENT LIST`.
    pub(crate) fn client_name(&self) -> String {
        format!("crier-pubsub-{}", self.options.node_id)
            .chars()
            .map(|c| if c.is_ascii_alphanumeric() || "-_.:".contains(c) { c } else { '_' })
            .collect()
    }
}

/// Another node's reply to a control operation of this instance (on its reply channel).
#[derive(Serialize, Deserialize)]
pub(crate) struct Reply {
    pub id: u64,
    pub node: String,
    /// The replying broker instance (two nodes misconfigured with one `node_id` still count
    /// twice).
    #[serde(default)]
    pub instance: String,
    pub reply: UserOpReply,
}
