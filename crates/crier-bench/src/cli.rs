//! Command line: one subcommand per scenario, each with its own defaults (sized to finish in
//! under a minute on a 2-core machine), plus the options every scenario shares.

use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};

#[derive(Parser, Debug)]
#[command(
    name = "crier-bench",
    version,
    about = "Load generator and report for crier: memory per connection, fan-out throughput, latency, churn, cluster",
    long_about = "Load generator and report for crier.\n\n\
        By default each scenario starts its own crier node(s) from target/release/crier on 127.0.0.1 \
        (with the handshake and per-user rate limits raised), runs bounded in count and time, \
        prints a table, optionally writes JSON (--json FILE), and stops what it started. \
        Use --url (with --jwt-secret, --api-key and --gateway-pid) to measure nodes that are already running.\n\n\
        All traffic goes to loopback: subscribers connect from 127.0.0.2, 127.0.0.3, ... (--source-addrs) \
        so that more than ~28k connections fit."
)]
pub struct Cli {
    #[command(subcommand)]
    pub scenario: Scenario,
}

#[derive(Subcommand, Debug)]
pub enum Scenario {
    /// Gateway RSS per idle subscribed connection, at one or more sizes (e.g. 10000,50000,100000).
    Idle(IdleArgs),
    /// One channel, many subscribers: deliveries/s, latency percentiles and loss at each publish rate.
    Fanout(FanoutArgs),
    /// Many channels with a few subscribers each, publishes spread over the channels.
    Channels(ChannelsArgs),
    /// Connect/subscribe/disconnect loops on top of a base of idle connections.
    Churn(ChurnArgs),
    /// Several nodes sharing one redis-server; subscribers and publishes spread over the nodes.
    Cluster(ClusterArgs),
    /// crier-client subscribers on two nodes; one node is SIGKILLed: resume time, loss, duplicates.
    Failover(FailoverArgs),
    /// A rolling restart of 3 nodes (SIGTERM, drain, new process, ready) behind nginx running the
    /// shipped deploy/nginx.conf, under crier-client subscribers and idempotent publishes: lost,
    /// duplicates, time without a live subscription, clients left behind, peaks per node.
    Deploy(DeployArgs),
    /// Scale-out 2 → 3 nodes behind nginx running the shipped deploy/nginx.conf, under crier-client
    /// subscribers and idempotent publishes: time until every node is within --within of the mean
    /// (the nodes rebalance), lost, duplicates, moved connections' time without a live subscription.
    Scaleout(ScaleoutArgs),
    /// Long run at one rate (about half of saturation) in the many-channels shape, 2 nodes + redis:
    /// RSS flat after warm-up, 0 lost, p99 stable, window by window.
    Soak(SoakArgs),
    /// `GET /api/v1/channels` with many active channels over several nodes sharing one
    /// redis-server: time of the first page, a prefix page and a page behind a cursor.
    Listing(ListingArgs),
    /// Webhook events (channel occupied/vacated) through several nodes + redis into a local
    /// backend: events produced and delivered per second, queue length over the run.
    Hooks(HooksArgs),
    /// (internal) A connect-proxy backend for scripts/bench-connect-proxy: answers every POST
    /// with a fixed user after --delay; prints its port.
    #[command(hide = true)]
    ProxyBackend(ProxyBackendArgs),
    /// (internal) Holds a slice of idle connections for another crier-bench process.
    #[command(hide = true)]
    Hold(HoldArgs),
}

/// A helper process of `idle`: connects its slice, prints a JSON summary line on stdout, and
/// holds the connections until its stdin closes. The secret comes in CRIER_BENCH_HOLD_SECRET.
#[derive(Args, Debug, Clone)]
pub struct HoldArgs {
    #[arg(long, value_delimiter = ',', required = true)]
    pub node: Vec<std::net::SocketAddr>,
    #[arg(long)]
    pub first: usize,
    #[arg(long)]
    pub count: usize,
    #[arg(long)]
    pub channels: usize,
    #[arg(long)]
    pub source_addrs: usize,
    #[arg(long)]
    pub connect_concurrency: usize,
}

/// Where the gateway is, and how the generator behaves.
#[derive(Args, Debug, Clone)]
pub struct GatewayArgs {
    /// crier binary to start [default: `crier` next to this binary, else $CARGO_TARGET_DIR/release/crier, else target/release/crier]
    #[arg(long, value_name = "PATH")]
    pub crier: Option<PathBuf>,
    /// Extra flag for every node started (repeat it), e.g. --crier-arg=--client-queue-max-bytes=4194304
    #[arg(long, value_name = "FLAG", allow_hyphen_values = true)]
    pub crier_arg: Vec<String>,
    /// Use running nodes instead of starting them (comma list, loopback only), e.g. http://127.0.0.1:8080
    #[arg(long, value_name = "URL", value_delimiter = ',')]
    pub url: Vec<String>,
    /// HS256 secret of the running nodes (with --url)
    #[arg(long)]
    pub jwt_secret: Option<String>,
    /// API key of the running nodes (with --url)
    #[arg(long)]
    pub api_key: Option<String>,
    /// PIDs of the running nodes, in --url order, for RSS and CPU figures (with --url)
    #[arg(long, value_name = "PID", value_delimiter = ',')]
    pub gateway_pid: Vec<u32>,
    /// redis-server binary for the cluster scenario
    #[arg(long, default_value = "redis-server", value_name = "PATH")]
    pub redis_server: String,
    /// Shapes with a shared broker use a nats-server (JetStream on a temporary store directory)
    /// started by the bench, instead of a redis-server: crier on its NATS broker
    #[arg(long)]
    pub nats: bool,
    /// nats-server binary for `--nats`
    #[arg(long, default_value = "nats-server", value_name = "PATH")]
    pub nats_server: String,
    /// Number of local source addresses (127.0.0.2 ...) subscribers connect from; ~28k connections fit per address
    #[arg(long, default_value_t = 4)]
    pub source_addrs: usize,
    /// Handshakes in flight at once while connecting
    #[arg(long, default_value_t = 64)]
    pub connect_concurrency: usize,
    /// Generator worker threads
    #[arg(long, default_value_t = 2)]
    pub threads: usize,
    /// At the end, how long started nodes get to exit after SIGTERM before SIGKILL
    #[arg(long, default_value = "3s", value_parser = humantime::parse_duration)]
    pub stop_grace: Duration,
    /// Write the report as JSON to this file
    #[arg(long, value_name = "FILE")]
    pub json: Option<PathBuf>,
}

impl GatewayArgs {
    pub fn crier_path(&self) -> PathBuf {
        if let Some(p) = &self.crier {
            return p.clone();
        }
        // Built in the same target directory as this binary (cargo run --release -p crier-bench).
        if let Some(p) = std::env::current_exe().ok().and_then(|e| e.parent().map(|d| d.join("crier")))
            && p.exists()
        {
            return p;
        }
        if let Ok(dir) = std::env::var("CARGO_TARGET_DIR") {
            let p = PathBuf::from(dir).join("release/crier");
            if p.exists() {
                return p;
            }
        }
        PathBuf::from("target/release/crier")
    }
}

/// Publishing options of the pub/sub scenarios.
#[derive(Args, Debug, Clone)]
pub struct PublishArgs {
    /// Publish rates to step through, messages per second over all channels (comma list) [default: fanout and cluster 20,50; channels 500,2000]
    #[arg(long, value_delimiter = ',', value_name = "MSGS_PER_S")]
    pub rate: Vec<f64>,
    /// How long each rate step publishes
    #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
    pub step_duration: Duration,
    /// Bytes of padding in each message's data (besides the timestamp)
    #[arg(long, default_value_t = 64)]
    pub payload_bytes: usize,
    /// Publish a realistic ~1 KiB JSON object (an order event: ids, names, prices, timestamps,
    /// nested items) instead of the padding
    #[arg(long)]
    pub realistic_payload: bool,
    /// How subscribers connect: ws, or ws-deflate (permessage-deflate, inflated by the bench;
    /// start the gateway with --crier-arg=--websocket-compression). Wire bytes are counted either way
    #[arg(long, value_enum, default_value = "ws")]
    pub transport: crate::clients::Transport,
    /// After a step, how long to wait for the last deliveries without progress
    #[arg(long, default_value = "3s", value_parser = humantime::parse_duration)]
    pub drain_timeout: Duration,
    /// REST publish requests in flight at once
    #[arg(long, default_value_t = 32)]
    pub publish_concurrency: usize,
    /// Send a channel's consecutive publishes through the nodes in turn (a backend publishing
    /// through a load balancer); without it message k goes through node k mod nodes, so with
    /// as many channels as a multiple of the nodes each channel is published through one node
    #[arg(long)]
    pub spread_publishes: bool,
    /// Shell command run (and awaited) just before each measured step, with CRIER_BENCH_PIDS set
    /// to the gateway PIDs (space-separated), e.g. "callgrind_control -z $CRIER_BENCH_PIDS"
    #[arg(long, value_name = "CMD")]
    pub hook_step_start: Option<String>,
    /// Shell command run (and awaited) just after each measured step, e.g. "callgrind_control -d $CRIER_BENCH_PIDS"
    #[arg(long, value_name = "CMD")]
    pub hook_step_end: Option<String>,
}

/// Which deployment shape `idle` measures.
#[derive(clap::ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum IdleBroker {
    /// Memory broker, `--nodes` independent nodes, `--channels` channels shared by the connections
    Memory,
    /// The shape users run: `--redis-nodes` nodes sharing one redis-server, each connection
    /// subscribed to a channel of its own
    Redis,
    /// Both, one after the other, each in its own table
    Both,
}

#[derive(Args, Debug, Clone)]
pub struct IdleArgs {
    /// Connection counts to measure at, ascending (comma list), e.g. 10000,50000,100000
    #[arg(long, alias = "connections", value_delimiter = ',', default_value = "10000")]
    pub sizes: Vec<usize>,
    /// Shape(s) to measure
    #[arg(long, value_enum, default_value = "both")]
    pub broker: IdleBroker,
    /// Memory shape: channels the connections subscribe to (connection i → channel i mod N); 0 = no subscription
    #[arg(long, default_value_t = 100)]
    pub channels: usize,
    /// Redis shape: nodes sharing the redis-server (raised when RLIMIT_NOFILE needs more)
    #[arg(long, default_value_t = 2)]
    pub redis_nodes: usize,
    /// Wait after connecting before reading RSS
    #[arg(long, default_value = "2s", value_parser = humantime::parse_duration)]
    pub settle: Duration,
    /// Memory shape: nodes to start (connections spread round-robin, RSS summed). Raised
    /// automatically when one node cannot hold the largest size within RLIMIT_NOFILE
    #[arg(long, default_value_t = 1)]
    pub nodes: usize,
    /// Generator processes holding connections (0 = this process alone when RLIMIT_NOFILE allows,
    /// else as many helper processes as needed)
    #[arg(long, default_value_t = 0)]
    pub procs: usize,
    /// How the connections connect: ws, ws-deflate (offers permessage-deflate; start the
    /// gateway with --websocket-compression to have it negotiated) or sse. Not ws: this process
    /// holds every connection (no helper processes)
    #[arg(long, value_enum, default_value = "ws")]
    pub transport: crate::clients::Transport,
    #[command(flatten)]
    pub gateway: GatewayArgs,
}

#[derive(Args, Debug, Clone)]
pub struct FanoutArgs {
    /// Subscribers of the one channel
    #[arg(long, default_value_t = 5000)]
    pub subscribers: usize,
    /// The channel's name [default: bench:fanout]; e.g. `chat:fanout` with `--crier-arg=--dev`
    /// (whose `chat` namespace has join_leave) to measure fan-out with join/leave events on
    #[arg(long)]
    pub channel: Option<String>,
    #[command(flatten)]
    pub publish: PublishArgs,
    #[command(flatten)]
    pub gateway: GatewayArgs,
}

#[derive(Args, Debug, Clone)]
pub struct ChannelsArgs {
    /// Number of channels
    #[arg(long, default_value_t = 1000)]
    pub channels: usize,
    /// Subscribers per channel
    #[arg(long, default_value_t = 5)]
    pub subscribers_per_channel: usize,
    #[command(flatten)]
    pub publish: PublishArgs,
    #[command(flatten)]
    pub gateway: GatewayArgs,
}

#[derive(Args, Debug, Clone)]
pub struct ListingArgs {
    /// Active channels (each subscribed once)
    #[arg(long, default_value_t = 100_000)]
    pub channels: usize,
    /// Nodes sharing one redis-server
    #[arg(long, default_value_t = 2)]
    pub nodes: usize,
    /// Subscriptions per WebSocket connection (the nodes are started with
    /// --max-subscriptions-per-connection set to it)
    #[arg(long, default_value_t = 1000)]
    pub per_connection: usize,
    /// Requests timed per query
    #[arg(long, default_value_t = 50)]
    pub samples: usize,
    #[command(flatten)]
    pub gateway: GatewayArgs,
}

#[derive(Args, Debug, Clone)]
pub struct ClusterArgs {
    /// Nodes sharing one redis-server (the issue's target shape is 2)
    #[arg(long, default_value_t = 3)]
    pub nodes: usize,
    /// Subscribers in total, spread round-robin over the nodes
    #[arg(long, default_value_t = 6000)]
    pub subscribers: usize,
    /// Channels (subscriber i → channel i mod N)
    #[arg(long, default_value_t = 1)]
    pub channels: usize,
    #[command(flatten)]
    pub publish: PublishArgs,
    #[command(flatten)]
    pub gateway: GatewayArgs,
}

#[derive(Args, Debug, Clone)]
pub struct ChurnArgs {
    /// Idle subscribed connections kept open during the churn
    #[arg(long, default_value_t = 1000)]
    pub base: usize,
    /// Concurrent connect → subscribe → close loops
    #[arg(long, default_value_t = 32)]
    pub workers: usize,
    /// How long the loops run
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    pub duration: Duration,
    /// Upper bound on cycles over all loops
    #[arg(long, default_value_t = 200_000)]
    pub max_cycles: u64,
    #[command(flatten)]
    pub gateway: GatewayArgs,
}

#[derive(Args, Debug, Clone)]
pub struct ProxyBackendArgs {
    /// How long each answer waits
    #[arg(long, default_value = "1ms", value_parser = humantime::parse_duration)]
    pub delay: Duration,
    /// The JSON answered
    #[arg(long, default_value = r#"{"user":"bench","channels":["*"],"publish":["*"]}"#)]
    pub answer: String,
}

#[derive(Args, Debug, Clone)]
pub struct HooksArgs {
    /// crier nodes sharing the redis-server
    #[arg(long, default_value_t = 2)]
    pub nodes: usize,
    /// WebSocket connections per node, each subscribing and unsubscribing fresh channels
    #[arg(long, default_value_t = 50)]
    pub connections: usize,
    /// Channels each connection keeps in flight (subscribe → ack → unsubscribe → ack)
    #[arg(long, default_value_t = 16)]
    pub window: usize,
    /// How long the loops run
    #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
    pub duration: Duration,
    /// The nodes' `[webhooks] batch` (events per POST)
    #[arg(long, default_value_t = 500)]
    pub batch: usize,
    /// `presence = false` for the bench's channels (`[namespaces.bench]`): no presence write per
    /// subscribe and unsubscribe (by default every channel is entered in presence)
    #[arg(long)]
    pub no_presence: bool,
    #[command(flatten)]
    pub gateway: GatewayArgs,
}

/// The crier-client subscribers' reconnect backoff (failover, deploy, scaleout).
#[derive(Args, Debug, Clone)]
pub struct BackoffArgs {
    /// The clients' backoff base (crier-client's default, the contract's)
    #[arg(id = "backoff_base", long = "backoff-base", default_value = "500ms", value_parser = humantime::parse_duration)]
    pub base: Duration,
    /// The clients' backoff cap (crier-client's default, the contract's)
    #[arg(id = "backoff_cap", long = "backoff-cap", default_value = "20s", value_parser = humantime::parse_duration)]
    pub cap: Duration,
}

#[derive(Args, Debug, Clone)]
pub struct FailoverArgs {
    /// Subscribers (crier-client), alternately on node 0 and node 1, each knowing both
    #[arg(long, default_value_t = 200)]
    pub clients: usize,
    /// REST publishes per second on node 1, throughout
    #[arg(long, default_value_t = 200.0)]
    pub rate: f64,
    /// Publishing before node 0 is killed
    #[arg(long, default_value = "2s", value_parser = humantime::parse_duration)]
    pub before: Duration,
    /// Publishing after node 0's clients resumed
    #[arg(long, default_value = "2s", value_parser = humantime::parse_duration)]
    pub after: Duration,
    #[command(flatten)]
    pub backoff: BackoffArgs,
    #[command(flatten)]
    pub gateway: GatewayArgs,
}

#[derive(Args, Debug, Clone)]
pub struct SoakArgs {
    /// Total time publishing (e.g. 60m for the real figure, 3m for a check)
    #[arg(long, default_value = "60m", value_parser = humantime::parse_duration)]
    pub duration: Duration,
    /// Measurement window (each is one publish step, then its deliveries are awaited)
    #[arg(long, default_value = "60s", value_parser = humantime::parse_duration)]
    pub window: Duration,
    /// Leading time not judged (allocator and maps reach their working size)
    #[arg(long, default_value = "5m", value_parser = humantime::parse_duration)]
    pub warmup: Duration,
    /// Publish rate, messages per second over all channels: about half of the shape's saturation
    #[arg(long, default_value_t = 4000.0)]
    pub rate: f64,
    /// Nodes sharing the redis-server
    #[arg(long, default_value_t = 2)]
    pub nodes: usize,
    /// Subscribers in total, spread round-robin over the nodes
    #[arg(long, default_value_t = 10_000)]
    pub subscribers: usize,
    /// Channels (subscriber i -> channel i mod N)
    #[arg(long, default_value_t = 1000)]
    pub channels: usize,
    /// RSS after warm-up must stay within this many percent of the RSS at its end
    #[arg(long, default_value_t = 5.0)]
    pub rss_tolerance: f64,
    /// No window's p99 above this factor times the median window's p99
    #[arg(long, default_value_t = 2.0)]
    pub p99_factor: f64,
    #[command(flatten)]
    pub publish: PublishArgs,
    #[command(flatten)]
    pub gateway: GatewayArgs,
}

#[derive(Args, Debug, Clone)]
pub struct DeployArgs {
    /// Subscribers (crier-client), all through nginx; each on a private channel and a shared one
    #[arg(long, default_value_t = 10_000)]
    pub clients: usize,
    /// REST publishes per second through nginx, throughout (idempotency keys, retried)
    #[arg(long, default_value_t = 2000.0)]
    pub rate: f64,
    /// Share of the publishes sent to the shared channels (the rest: a random private channel)
    #[arg(long, default_value_t = 0.1)]
    pub shared_fraction: f64,
    /// Shared channels (subscriber i is on shared channel i mod N)
    #[arg(long, default_value_t = 100)]
    pub shared_channels: usize,
    /// The nodes' shutdown_drain (0s: every client of a stopping node reconnects at once)
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    pub drain: Duration,
    /// Wait after a restarted node is ready before stopping the next
    #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
    pub between: Duration,
    /// Publishing before the first SIGTERM
    #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
    pub before: Duration,
    /// Publishing after the last node is ready again
    #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
    pub after: Duration,
    /// A node still running this long after the drain window is SIGKILLed (Kubernetes'
    /// terminationGracePeriodSeconds minus the preStop sleep, k8s/base: 45 - 5 - 10)
    #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
    pub exit_grace: Duration,
    /// At the end, how long to wait for every client to be back with every acknowledged message
    #[arg(long, default_value = "60s", value_parser = humantime::parse_duration)]
    pub settle: Duration,
    /// Subscribers connected at once at the start (each batch is subscribed before the next)
    #[arg(long, default_value_t = 500)]
    pub connect_batch: usize,
    /// REST publishes in flight at once
    #[arg(long, default_value_t = 64)]
    pub publish_concurrency: usize,
    #[command(flatten)]
    pub backoff: BackoffArgs,
    #[command(flatten)]
    pub gateway: GatewayArgs,
}

#[derive(Args, Debug, Clone)]
pub struct ScaleoutArgs {
    /// Balanced = every node within this share of the mean connections per node
    #[arg(long, default_value_t = 0.10)]
    pub within: f64,
    /// Give up waiting for the balance this long after the third node is ready
    #[arg(long, default_value = "120s", value_parser = humantime::parse_duration)]
    pub balance_timeout: Duration,
    /// The deploy scenario's options (--drain, --between and --exit-grace do not apply; --after
    /// is the publishing after the balance, or after --balance-timeout)
    #[command(flatten)]
    pub deploy: DeployArgs,
}
