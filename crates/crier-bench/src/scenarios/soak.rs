//! `soak`: the many-channels shape (2 nodes sharing one redis-server, subscribers spread over
//! many channels) held at one publish rate — meant to be about half of saturation — for a long,
//! bounded time (`--duration`), measured window by window (`--window`).
//!
//! Each window is one step of the pub/sub scenario (publish for the window, then wait for the
//! window's deliveries), so loss, latency, CPU and gateway RSS are known per window. After the
//! warm-up (`--warmup`) the verdict checks what a long run must show:
//! - **RSS flat**: every later window's gateway RSS within `--rss-tolerance` (5%) of the RSS at
//!   the end of the warm-up;
//! - **0 lost**: every accepted publish reached every subscriber of its channel, none failed;
//! - **p99 stable**: no window's p99 above `--p99-factor` (2) × the median window's p99.
//!
//! The verdict is printed and stored in the JSON report; the exit status does not depend on it.

use serde::Serialize;
use serde_json::Value;

use super::Outcome;
use super::pubsub::{self, Plan};
use crate::cli::SoakArgs;
use crate::report::{Table, int, opt_f};

#[derive(Debug, Serialize)]
struct Verdict {
    windows: usize,
    warmup_windows: usize,
    rss_at_warmup_end_kib: Option<u64>,
    rss_max_after_kib: Option<u64>,
    rss_min_after_kib: Option<u64>,
    rss_last_kib: Option<u64>,
    rss_max_change_pct: Option<f64>,
    rss_flat: bool,
    lost: i64,
    publishes_failed: u64,
    no_loss: bool,
    p99_median_ms: f64,
    p99_max_ms: f64,
    p99_stable: bool,
    achieved_rate_min: f64,
    pass: bool,
}

pub async fn run(a: SoakArgs) -> anyhow::Result<Outcome> {
    anyhow::ensure!(a.window.as_secs_f64() >= 1.0, "--window must be at least 1s");
    anyhow::ensure!(a.duration >= a.window, "--duration must be at least one --window");
    let windows = (a.duration.as_secs_f64() / a.window.as_secs_f64()).floor() as usize;
    let warmup_windows = ((a.warmup.as_secs_f64() / a.window.as_secs_f64()).ceil() as usize).min(windows - 1);
    let mut publish = a.publish.clone();
    publish.rate = vec![a.rate; windows];
    publish.step_duration = a.window;
    eprintln!(
        "soak: {windows} windows of {:?} at {} msg/s ({} of warm-up), {} subscribers on {} channels, {} nodes + redis",
        a.window, a.rate, warmup_windows, a.subscribers, a.channels, a.nodes
    );
    let plan = Plan {
        scenario: "soak",
        nodes: a.nodes.max(1),
        redis: true,
        channels: a.channels.max(1),
        subscribers: a.subscribers,
        default_rates: vec![a.rate],
        channel: None,
        publish,
        gateway: a.gateway,
    };
    let mut outcome = pubsub::run(plan).await?;
    let steps: Vec<Value> = outcome.report.results["steps"].as_array().cloned().unwrap_or_default();
    let verdict = judge(&steps, warmup_windows, a.rss_tolerance, a.p99_factor);

    let mut t = Table::new(
        format!(
            "soak: {} windows of {:?} at {} msg/s, {} subscribers on {} channels, {} nodes + redis",
            steps.len(),
            a.window,
            a.rate,
            a.subscribers,
            a.channels,
            a.nodes
        ),
        vec!["value".into()],
    );
    let kib = |v: Option<u64>| v.map(|k| int(k as f64)).unwrap_or_else(|| "n/a".into());
    t.row("windows (of which warm-up)", vec![format!("{} ({})", verdict.windows, verdict.warmup_windows)]);
    t.row("gateway RSS at the end of warm-up, KiB", vec![kib(verdict.rss_at_warmup_end_kib)]);
    t.row(
        "gateway RSS after: min / max / last, KiB",
        vec![format!(
            "{} / {} / {}",
            kib(verdict.rss_min_after_kib),
            kib(verdict.rss_max_after_kib),
            kib(verdict.rss_last_kib)
        )],
    );
    t.row("largest RSS change after warm-up, %", vec![opt_f(verdict.rss_max_change_pct, 2)]);
    t.row(
        "p99 ms: median window / worst window",
        vec![format!("{:.2} / {:.2}", verdict.p99_median_ms, verdict.p99_max_ms)],
    );
    t.row("lost / publishes failed", vec![format!("{} / {}", verdict.lost, verdict.publishes_failed)]);
    t.row("lowest achieved rate in a window, msg/s", vec![int(verdict.achieved_rate_min)]);
    let yes = |b: bool| if b { "yes".to_owned() } else { "NO".to_owned() };
    t.row(&format!("RSS flat within {}%", a.rss_tolerance), vec![yes(verdict.rss_flat)]);
    t.row("0 lost", vec![yes(verdict.no_loss)]);
    t.row(&format!("p99 stable (worst <= {} x median)", a.p99_factor), vec![yes(verdict.p99_stable)]);
    t.row("verdict", vec![if verdict.pass { "PASS".into() } else { "FAIL".into() }]);
    outcome.tables = vec![t];
    outcome.report.params["soak"] = serde_json::json!({
        "duration_s": a.duration.as_secs_f64(), "window_s": a.window.as_secs_f64(), "warmup_s": a.warmup.as_secs_f64(),
        "rate": a.rate, "rss_tolerance_pct": a.rss_tolerance, "p99_factor": a.p99_factor,
    });
    outcome.report.results["verdict"] = serde_json::to_value(&verdict)?;
    Ok(outcome)
}

fn judge(steps: &[Value], warmup: usize, rss_tolerance: f64, p99_factor: f64) -> Verdict {
    let rss: Vec<Option<u64>> = steps.iter().map(|s| s["gateway_rss_kib"].as_u64()).collect();
    let base = warmup.checked_sub(1).and_then(|i| rss.get(i).copied().flatten()).or(rss.first().copied().flatten());
    let after: Vec<u64> = rss.iter().skip(warmup).filter_map(|r| *r).collect();
    let change = |v: u64| base.map(|b| (v as f64 - b as f64) / b.max(1) as f64 * 100.0);
    let rss_max_change_pct = after
        .iter()
        .filter_map(|v| change(*v))
        .map(f64::abs)
        .fold(None, |m: Option<f64>, c| Some(m.map_or(c, |m| m.max(c))));
    let lost: i64 = steps.iter().map(|s| s["lost"].as_i64().unwrap_or(0)).sum();
    let failed: u64 = steps.iter().map(|s| s["published"]["failed"].as_u64().unwrap_or(0)).sum();
    let mut p99: Vec<f64> =
        steps.iter().skip(warmup).map(|s| s["received"]["latency"]["p99_ms"].as_f64().unwrap_or(0.0)).collect();
    p99.sort_by(f64::total_cmp);
    let median = p99.get(p99.len() / 2).copied().unwrap_or(0.0);
    let worst = p99.last().copied().unwrap_or(0.0);
    let achieved_rate_min = steps
        .iter()
        .skip(warmup)
        .map(|s| s["published"]["achieved_rate"].as_f64().unwrap_or(0.0))
        .fold(f64::INFINITY, f64::min);
    let rss_flat = rss_max_change_pct.is_some_and(|c| c <= rss_tolerance);
    let no_loss = lost == 0 && failed == 0;
    let p99_stable = !p99.is_empty() && worst <= p99_factor * median.max(0.001);
    Verdict {
        windows: steps.len(),
        warmup_windows: warmup,
        rss_at_warmup_end_kib: base,
        rss_max_after_kib: after.iter().copied().max(),
        rss_min_after_kib: after.iter().copied().min(),
        rss_last_kib: rss.last().copied().flatten(),
        rss_max_change_pct,
        rss_flat,
        lost,
        publishes_failed: failed,
        no_loss,
        p99_median_ms: median,
        p99_max_ms: worst,
        p99_stable,
        achieved_rate_min: if achieved_rate_min.is_finite() { achieved_rate_min } else { 0.0 },
        pass: rss_flat && no_loss && p99_stable,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn step(rss: u64, p99: f64, lost: i64) -> Value {
        json!({"gateway_rss_kib": rss, "lost": lost, "published": {"failed": 0, "achieved_rate": 100.0},
               "received": {"latency": {"p99_ms": p99}}})
    }

    #[test]
    fn verdicts() {
        let flat = [step(500, 9.0, 0), step(1000, 3.0, 0), step(1010, 3.2, 0), step(1030, 2.9, 0), step(995, 3.1, 0)];
        let v = judge(&flat, 2, 5.0, 2.0);
        assert!(v.pass, "{v:?}");
        assert_eq!(v.rss_at_warmup_end_kib, Some(1000), "the warm-up's last window is the base");
        let growing = [step(1000, 3.0, 0), step(1030, 3.0, 0), step(1060, 3.0, 0), step(1100, 3.0, 0)];
        assert!(!judge(&growing, 1, 5.0, 2.0).rss_flat, "10% growth");
        let lossy = [step(1000, 3.0, 0), step(1000, 3.0, 2)];
        assert!(!judge(&lossy, 1, 5.0, 2.0).no_loss);
        let spiky = [step(1000, 3.0, 0), step(1000, 3.0, 0), step(1000, 3.0, 0), step(1000, 30.0, 0)];
        assert!(!judge(&spiky, 1, 5.0, 2.0).p99_stable);
    }
}
