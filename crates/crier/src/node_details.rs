//! What a node tells of itself in the node registry (`/api/v1/info`) beyond its connection
//! count: uptime, connections by transport, resident memory.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use crier_core::TransportCounts;

/// What `/api/v1/info` shows of a node beyond its count: when it started and its open SSE
/// streams (WebSocket connections are the rest of the registry).
pub struct NodeDetails {
    started: Instant,
    sse: Arc<AtomicU64>,
}

impl Default for NodeDetails {
    fn default() -> Self {
        NodeDetails { started: Instant::now(), sse: Arc::default() }
    }
}

impl NodeDetails {
    /// Counts one open SSE stream until the guard is dropped.
    pub fn sse_stream(&self) -> SseGuard {
        self.sse.fetch_add(1, Ordering::Relaxed);
        SseGuard(self.sse.clone())
    }

    pub fn uptime_s(&self) -> u64 {
        self.started.elapsed().as_secs()
    }

    /// Connections by transport, of `total` open ones.
    pub fn transports(&self, total: u64) -> TransportCounts {
        let sse = self.sse.load(Ordering::Relaxed).min(total);
        TransportCounts { ws: total - sse, sse }
    }
}

/// One open SSE stream (see [`NodeDetails::sse_stream`]).
pub struct SseGuard(Arc<AtomicU64>);

impl Drop for SseGuard {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// This process's resident memory in bytes (`VmRSS` of `/proc/self/status`); 0 where unknown.
pub fn resident_bytes() -> u64 {
    let Ok(text) = std::fs::read_to_string("/proc/self/status") else {
        return 0;
    };
    text.lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|kib| kib.parse::<u64>().ok())
        .map_or(0, |kib| kib * 1024)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sse_streams_are_counted_while_open() {
        let d = NodeDetails::default();
        let g = d.sse_stream();
        assert_eq!(d.transports(3), TransportCounts { ws: 2, sse: 1 });
        drop(g);
        assert_eq!(d.transports(3), TransportCounts { ws: 3, sse: 0 });
        assert!(resident_bytes() > 0, "Linux: /proc/self/status has VmRSS");
    }
}
