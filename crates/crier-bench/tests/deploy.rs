//! `crier-bench deploy`, shortened: 1,000 crier-client subscribers through nginx running the
//! shipped `deploy/nginx.conf` over three crier nodes on a redis-server, publishes through nginx
//! throughout, and every node restarted in turn (SIGTERM, drain, a new process on the same port,
//! ready before the next). Asserts what must hold whatever the machine: nothing lost, nothing
//! duplicated, every client back, no publish lost. Timings are the benchmark's (BENCHMARKS.md),
//! not asserted. Skips with a message when nginx or redis-server is not installed.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use support::{nginx_scenario_can_run, run_bench};

#[test]
fn rolling_restart_behind_the_shipped_nginx_loses_nothing_and_leaves_no_one_behind() {
    if !nginx_scenario_can_run() {
        return;
    }
    let r = &run_bench(
        "deploy --clients 1000 --rate 200 --shared-channels 10 --drain 3s --between 1s --before 2s --after 2s --settle 60s",
    );
    let n = |k: &str| r[k].as_u64().unwrap_or_else(|| panic!("results.{k} in {r}"));
    assert!(n("publishes_acked") > 100, "{r}");
    assert!(n("deliveries") > n("publishes_acked"), "{r}");
    assert_eq!(n("publishes_lost"), 0, "publishes never acknowledged: {r}");
    assert_eq!(n("lost"), 0, "messages lost: {r}");
    assert_eq!(n("duplicates"), 0, "duplicates delivered to the application: {r}");
    assert_eq!(n("gaps_reported"), 0, "gaps reported by the client: {r}");
    assert_eq!(n("clients_not_back"), 0, "clients left behind: {r}");
    // Every node was restarted, so every client was moved at least once.
    assert!(n("reconnections") >= 1000, "{r}");
    assert_eq!(n("nginx_no_live_upstreams"), 0, "nginx ran out of upstreams: {r}");
}
