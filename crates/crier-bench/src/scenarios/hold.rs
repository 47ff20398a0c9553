//! `hold` (internal): a helper process of `idle`. One process can hold only as many connections
//! as RLIMIT_NOFILE allows (20,000 on the machine these figures come from, and the hard limit
//! cannot be raised without CAP_SYS_RESOURCE), so `idle` spreads larger sizes over helpers: each
//! connects its slice, prints one JSON line (a [`ConnectSummary`]) on stdout, and holds the
//! connections until its stdin closes.

use std::sync::Arc;

use anyhow::Context;
use tokio::io::AsyncReadExt;

use super::token_with;
use crate::cli::HoldArgs;
use crate::clients::{SourceAddrs, Subscribers, Target, open_many};
use crate::stats::Stats;

/// The environment variable the secret travels in (not on the command line, where `ps` shows it).
pub const SECRET_ENV: &str = "CRIER_BENCH_HOLD_SECRET";

pub async fn run(a: HoldArgs) -> anyhow::Result<()> {
    let secret = std::env::var(SECRET_ENV).with_context(|| format!("{SECRET_ENV} is not set"))?;
    anyhow::ensure!(a.node.iter().all(|n| n.ip().is_loopback()), "hold: loopback nodes only");
    let sources = SourceAddrs::new(a.source_addrs);
    let stats = Arc::new(Stats::new());
    let mut subs = Subscribers::default();
    let target = |i: usize| Target {
        server: a.node[i % a.node.len()],
        local: sources.get(i),
        token: token_with(&secret, &format!("idle-{i}")),
        channel: (a.channels > 0).then(|| format!("bench:idle:{}", i % a.channels)),
    };
    let summary = open_many(a.first, a.count, a.connect_concurrency, target, &stats, &mut subs, false).await;
    println!("{}", serde_json::to_string(&summary)?);
    let mut stdin = tokio::io::stdin();
    let mut buf = [0u8; 64];
    while matches!(stdin.read(&mut buf).await, Ok(n) if n > 0) {}
    subs.abort_all();
    Ok(())
}
