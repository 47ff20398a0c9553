//! What the kernel says about processes and the machine: resident memory (`/proc/<pid>/status`
//! `VmRSS`), CPU time (`/proc/<pid>/stat` utime + stime), the machine's description, and the
//! open-files limit the generator needs.

use std::fs;

use serde::Serialize;

/// Resident set size of `pid` in KiB.
pub fn rss_kib(pid: u32) -> Option<u64> {
    status_field(&format!("/proc/{pid}/status"), "VmRSS:")
}

/// Resident set size of this process in KiB.
pub fn self_rss_kib() -> Option<u64> {
    status_field("/proc/self/status", "VmRSS:")
}

fn status_field(path: &str, key: &str) -> Option<u64> {
    let text = fs::read_to_string(path).ok()?;
    let line = text.lines().find(|l| l.starts_with(key))?;
    line[key.len()..].split_whitespace().next()?.parse().ok()
}

/// CPU seconds (user + system, all threads) used so far by `pid`.
pub fn cpu_secs(pid: u32) -> Option<f64> {
    stat_cpu(&format!("/proc/{pid}/stat"))
}

/// CPU seconds used so far by this process (children not included).
pub fn self_cpu_secs() -> f64 {
    stat_cpu("/proc/self/stat").unwrap_or(0.0)
}

fn stat_cpu(path: &str) -> Option<f64> {
    stat_cpu_split(path).map(|(u, s)| u + s)
}

/// (user, system) CPU seconds used so far by `pid`.
pub fn cpu_split(pid: u32) -> Option<(f64, f64)> {
    stat_cpu_split(&format!("/proc/{pid}/stat"))
}

fn stat_cpu_split(path: &str) -> Option<(f64, f64)> {
    let text = fs::read_to_string(path).ok()?;
    // The command name (field 2) is in parentheses and may contain spaces: split after the last ')'.
    let rest = &text[text.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // After ')': field 3 (state) is index 0, so utime (14) is index 11 and stime (15) index 12.
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    let ticks = rustix::param::clock_ticks_per_second().max(1) as f64;
    Some((utime as f64 / ticks, stime as f64 / ticks))
}

/// Sum of [`cpu_split`] over `pids`; `None` if there are none or one cannot be read.
pub fn total_cpu_split(pids: &[u32]) -> Option<(f64, f64)> {
    if pids.is_empty() {
        return None;
    }
    pids.iter().map(|p| cpu_split(*p)).try_fold((0.0, 0.0), |acc, x| x.map(|(u, s)| (acc.0 + u, acc.1 + s)))
}

/// Sum of [`rss_kib`] over `pids`; `None` if there are none or one cannot be read.
pub fn total_rss_kib(pids: &[u32]) -> Option<u64> {
    if pids.is_empty() {
        return None;
    }
    pids.iter().map(|p| rss_kib(*p)).sum()
}

/// Sum of [`cpu_secs`] over `pids`; `None` if there are none or one cannot be read.
pub fn total_cpu_secs(pids: &[u32]) -> Option<f64> {
    if pids.is_empty() {
        return None;
    }
    pids.iter().map(|p| cpu_secs(*p)).sum()
}

/// The machine a run happened on.
#[derive(Debug, Clone, Serialize)]
pub struct Machine {
    pub nproc: usize,
    pub cpu_model: String,
    pub mem_total_mib: u64,
    pub kernel: String,
    pub loadavg_at_start: String,
}

pub fn machine() -> Machine {
    let cpuinfo = fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let cpu_model = cpuinfo
        .lines()
        .find(|l| l.starts_with("model name"))
        .and_then(|l| l.split_once(':'))
        .map(|(_, v)| v.trim().to_owned())
        .unwrap_or_else(|| "unknown".into());
    Machine {
        nproc: std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1),
        cpu_model,
        mem_total_mib: status_field("/proc/meminfo", "MemTotal:").unwrap_or(0) / 1024,
        kernel: fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default().trim().to_owned(),
        loadavg_at_start: fs::read_to_string("/proc/loadavg").unwrap_or_default().trim().to_owned(),
    }
}

/// Raises RLIMIT_NOFILE so that `wanted` descriptors fit (for this process and the nodes it
/// starts, which inherit it). Raising the hard limit needs CAP_SYS_RESOURCE; without it the soft
/// limit goes up to the hard one. Returns the soft limit in force afterwards.
pub fn raise_nofile(wanted: u64) -> u64 {
    use rustix::process::{Resource, Rlimit, getrlimit, setrlimit};
    let cur = getrlimit(Resource::Nofile);
    let soft = cur.current.unwrap_or(u64::MAX);
    if soft >= wanted {
        return soft;
    }
    let nr_open: u64 =
        fs::read_to_string("/proc/sys/fs/nr_open").ok().and_then(|s| s.trim().parse().ok()).unwrap_or(1 << 20);
    let target = wanted.min(nr_open);
    let hard = cur.maximum.unwrap_or(u64::MAX);
    let new_hard = hard.max(target);
    if setrlimit(Resource::Nofile, Rlimit { current: Some(target), maximum: Some(new_hard) }).is_err() {
        let _ = setrlimit(Resource::Nofile, Rlimit { current: Some(target.min(hard)), maximum: Some(hard) });
    }
    getrlimit(Resource::Nofile).current.unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_own_process() {
        assert!(self_rss_kib().is_some_and(|k| k > 0));
        let pid = std::process::id();
        assert!(rss_kib(pid).is_some());
        assert!(cpu_secs(pid).is_some_and(|s| s >= 0.0));
        assert_eq!(total_rss_kib(&[]), None);
    }
}
