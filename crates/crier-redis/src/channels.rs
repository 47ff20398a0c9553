//! Channel reads and writes on the command connection: the history of a channel nobody here
//! watches (a watched one is read on the pub/sub connection, `pubsub::Handle::history`), the
//! cluster's channel listing (each node reports its subscriber counts), and history deletion.

use std::collections::BTreeMap;

use crier_core::{BrokerError, ChannelCount, History};
use crier_protocol::StreamPosition;

use crate::context::Context;
use crate::presence::Presence;
use crate::scripts::{self, HistoryCall};

/// Channels per call of the report script.
const REPORT_CHUNK: usize = 1000;

/// `channel`'s history read on the command connection.
pub(crate) async fn history(
    ctx: &Context,
    channel: &str,
    since: Option<&StreamPosition>,
    limit: usize,
) -> Result<History, BrokerError> {
    let since = since.map(|p| (p.epoch.as_str(), p.offset));
    let call = HistoryCall::new(&ctx.keys, &ctx.params, channel, since, limit);
    Ok(scripts::parse_history(ctx.commands.invoke(&call.invocation(&ctx.scripts.history)).await?)?)
}

/// Stores `node`'s subscriber counts (`full`: replacing all it reported before); returns
/// whether its set was still there (see `scripts::CHANNELS_REPORT`).
pub(crate) async fn report(
    ctx: &Context,
    node: &str,
    counts: &[(String, u64)],
    full: bool,
) -> Result<bool, BrokerError> {
    let (z, h) = ctx.keys.node_channels(node);
    // Bounded calls: a node's first report may hold every one of its channels.
    let mut chunks = counts.chunks(REPORT_CHUNK).peekable();
    let mut first = true;
    let mut held = true;
    while first || chunks.peek().is_some() {
        let chunk = chunks.next().unwrap_or_default();
        let mut inv = ctx.scripts.channels_report.key(&z);
        inv.key(&h).arg(crate::clock::millis(ctx.options.node_ttl)).arg(if full && first { "1" } else { "0" });
        for (channel, n) in chunk {
            inv.arg(channel).arg(*n);
        }
        let reply = ctx.commands.invoke(&inv).await?;
        if first {
            held = scripts::int(&reply) == Some(1);
        }
        first = false;
    }
    Ok(held)
}

/// The cluster's channels in name order: one page per live node, merged.
pub(crate) async fn list(
    ctx: &Context,
    presence: &Presence,
    prefix: &str,
    after: Option<&str>,
    limit: usize,
) -> Result<Vec<ChannelCount>, BrokerError> {
    let start = match after {
        Some(a) if a >= prefix => format!("({a}"),
        _ if prefix.is_empty() => "-".to_owned(),
        _ => format!("[{prefix}"),
    };
    let nodes = presence.nodes().await?;
    let pages = futures_util::future::try_join_all(nodes.iter().map(|n| {
        let (z, h) = ctx.keys.node_channels(&n.node);
        let mut inv = ctx.scripts.channels_page.key(z);
        inv.key(h).arg(&start).arg(prefix).arg(limit);
        async move { ctx.commands.invoke(&inv).await }
    }))
    .await?;
    // Each node's page is its first `limit` channels after the start: the first `limit`
    // names of the union are all in it, with every node's count (see `Broker::channels`).
    let mut merged = BTreeMap::<String, u64>::new();
    for page in pages {
        let redis::Value::Array(items) = page else { continue };
        for pair in items.chunks_exact(2) {
            let name = scripts::bulk(&pair[0]).and_then(|b| std::str::from_utf8(b).ok());
            let n = scripts::int(&pair[1]).and_then(|n| u64::try_from(n).ok()).unwrap_or(0);
            if let Some(name) = name
                && n > 0
            {
                *merged.entry(name.to_owned()).or_default() += n;
            }
        }
    }
    Ok(merged.into_iter().take(limit).map(|(channel, subscribers)| ChannelCount { channel, subscribers }).collect())
}

/// Deletes `channel`'s history and position. Both keys share the channel's hash tag. Without
/// its meta, the channel's next publish or read creates a new epoch; subscribed nodes see it on
/// the next publication and gap-fill, find the epoch changed and tell their subscribers
/// (`on_gap`).
pub(crate) async fn delete_history(ctx: &Context, channel: &str) -> Result<(), BrokerError> {
    let mut del = redis::cmd("DEL");
    del.arg(ctx.keys.meta(channel)).arg(ctx.keys.history(channel));
    ctx.commands.query(&del).await?;
    Ok(())
}
