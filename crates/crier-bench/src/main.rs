//! crier-bench: the load generator and report for crier.
//!
//! `cargo run --release -p crier-bench -- <idle|fanout|channels|churn|cluster|failover|soak|deploy|scaleout> [options]`; every
//! scenario has `--help`. Modules:
//! - [`cli`]: the subcommands, their options and defaults.
//! - [`gateway`]: starting crier nodes (and redis-server) on loopback, or using running ones;
//!   their PIDs for RSS and CPU; restarting one on its port (a rolling restart's step).
//! - [`lb`]: nginx with the shipped deploy/nginx.conf, rendered for loopback.
//! - [`clients`]: lean WebSocket subscribers bound to several 127.0.0.x source addresses.
//! - [`publisher`]: REST publishes at a target rate, stamped with the send time.
//! - [`stats`]: shared counters and HDR latency histograms.
//! - [`procfs`]: `/proc` readings (VmRSS, utime+stime), the machine, RLIMIT_NOFILE.
//! - [`report`]: the table and the JSON report.
//! - [`scenarios`]: idle, fanout/channels/cluster (pub/sub), churn, failover (on crier-client), soak (a long pub/sub run), deploy (a rolling restart behind nginx), scaleout (2 → 3 nodes behind nginx, rebalancing).

mod backend;
mod cli;
mod clients;
mod gateway;
mod lb;
mod procfs;
mod publisher;
mod report;
mod scenarios;
mod stats;

use std::process::ExitCode;

use clap::Parser;

use crate::cli::{Cli, Scenario};
use crate::scenarios::pubsub::Plan;

fn main() -> ExitCode {
    let cli = Cli::parse();
    let threads = match &cli.scenario {
        Scenario::Idle(a) => a.gateway.threads,
        Scenario::Fanout(a) => a.gateway.threads,
        Scenario::Channels(a) => a.gateway.threads,
        Scenario::Churn(a) => a.gateway.threads,
        Scenario::Cluster(a) => a.gateway.threads,
        Scenario::Failover(a) => a.gateway.threads,
        Scenario::Soak(a) => a.gateway.threads,
        Scenario::Deploy(a) => a.gateway.threads,
        Scenario::Scaleout(a) => a.deploy.gateway.threads,
        Scenario::Listing(a) => a.gateway.threads,
        Scenario::Hooks(a) => a.gateway.threads,
        Scenario::Hold(_) => 2,
        Scenario::ProxyBackend(_) => 1,
    };
    // Subscribers, and the nodes the bench starts (they inherit the limit), need a descriptor each.
    let nofile = procfs::raise_nofile(1 << 20);
    let runtime = match tokio::runtime::Builder::new_multi_thread().worker_threads(threads.max(1)).enable_all().build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("crier-bench: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async move {
        tokio::select! {
            r = run(cli.scenario, nofile) => r,
            _ = tokio::signal::ctrl_c() => Err(anyhow::anyhow!("interrupted; stopping what was started")),
        }
    });
    // Dropping the runtime drops every task: started nodes are killed (kill_on_drop).
    runtime.shutdown_timeout(std::time::Duration::from_secs(2));
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("crier-bench: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(scenario: Scenario, nofile: u64) -> anyhow::Result<()> {
    let (outcome, json) = match scenario {
        Scenario::Hold(a) => return scenarios::hold::run(a).await,
        Scenario::ProxyBackend(a) => return backend::run_proxy_backend(a.delay, &a.answer).await,
        Scenario::Idle(a) => {
            let json = a.gateway.json.clone();
            (scenarios::idle::run(a, nofile).await?, json)
        }
        Scenario::Fanout(a) => {
            warn_nofile(a.subscribers as u64, nofile);
            let json = a.gateway.json.clone();
            let plan = Plan {
                scenario: "fanout",
                nodes: 1,
                redis: false,
                channels: 1,
                subscribers: a.subscribers,
                default_rates: vec![20.0, 50.0],
                channel: a.channel,
                publish: a.publish,
                gateway: a.gateway,
            };
            (scenarios::pubsub::run(plan).await?, json)
        }
        Scenario::Channels(a) => {
            let subscribers = a.channels * a.subscribers_per_channel;
            warn_nofile(subscribers as u64, nofile);
            let json = a.gateway.json.clone();
            let plan = Plan {
                scenario: "channels",
                nodes: 1,
                redis: false,
                channels: a.channels,
                subscribers,
                default_rates: vec![500.0, 2000.0],
                channel: None,
                publish: a.publish,
                gateway: a.gateway,
            };
            (scenarios::pubsub::run(plan).await?, json)
        }
        Scenario::Cluster(a) => {
            warn_nofile(a.subscribers as u64, nofile);
            let json = a.gateway.json.clone();
            let plan = Plan {
                scenario: "cluster",
                nodes: a.nodes.max(1),
                redis: true,
                channels: a.channels.max(1),
                subscribers: a.subscribers,
                default_rates: vec![20.0, 50.0],
                channel: None,
                publish: a.publish,
                gateway: a.gateway,
            };
            (scenarios::pubsub::run(plan).await?, json)
        }
        Scenario::Failover(a) => {
            warn_nofile(a.clients as u64, nofile);
            let json = a.gateway.json.clone();
            (scenarios::failover::run(a).await?, json)
        }
        Scenario::Soak(a) => {
            warn_nofile(a.subscribers as u64, nofile);
            let json = a.gateway.json.clone();
            (scenarios::soak::run(a).await?, json)
        }
        Scenario::Deploy(a) => {
            // This process holds one socket per subscriber (nginx holds the upstream ones).
            warn_nofile(a.clients as u64, nofile);
            let json = a.gateway.json.clone();
            (scenarios::deploy::run(a).await?, json)
        }
        Scenario::Scaleout(a) => {
            warn_nofile(a.deploy.clients as u64, nofile);
            let json = a.deploy.gateway.json.clone();
            (scenarios::deploy::scaleout(a).await?, json)
        }
        Scenario::Listing(a) => {
            let json = a.gateway.json.clone();
            (scenarios::listing::run(a).await?, json)
        }
        Scenario::Hooks(a) => {
            let json = a.gateway.json.clone();
            (scenarios::hooks::run(a).await?, json)
        }
        Scenario::Churn(a) => {
            warn_nofile(a.base as u64 + a.workers as u64, nofile);
            let json = a.gateway.json.clone();
            (scenarios::churn::run(a).await?, json)
        }
    };
    let m = &outcome.report.machine;
    println!(
        "\nmachine: {} × {}, {} MiB, Linux {}; load at start {}",
        m.nproc, m.cpu_model, m.mem_total_mib, m.kernel, m.loadavg_at_start
    );
    println!(
        "gateway: {} node(s) {:?}, broker {}",
        outcome.report.gateway.nodes.len(),
        outcome.report.gateway.nodes,
        outcome.report.gateway.broker
    );
    for t in &outcome.tables {
        print!("{}", t.render());
    }
    for n in &outcome.report.notes {
        println!("note: {n}");
    }
    if let Some(path) = json {
        outcome.report.write_json(&path)?;
        println!("JSON report written to {}", path.display());
    }
    Ok(())
}

fn warn_nofile(connections: u64, nofile: u64) {
    if connections + 1000 > nofile {
        eprintln!(
            "warning: RLIMIT_NOFILE is {nofile} (and could not be raised: raising the hard limit needs \
             CAP_SYS_RESOURCE), below the {connections} connections asked for plus a margin; expect \
             'EMFILE' connect errors in this process and in the node it starts. The idle scenario \
             spreads over several processes and nodes by itself; for the others, stay below it."
        );
    }
}
