//! Waiting by polling with a deadline: the one way tests wait for something that happens
//! asynchronously (a delivery through Redis, a gauge going back down, a log line being written).
//!
//! A check is polled every [`POLL_INTERVAL`] until it holds; when the deadline passes first, the
//! test fails with `timed out after {timeout} waiting for {what}` (plus, for [`poll`], the last
//! state the check saw). A check that itself does not finish by the deadline fails the same way:
//! nothing here can hang.
//!
//! ```ignore
//! use crier_testkit::{poll, until};
//! until("the subscriber got 3 messages", async || handler.offsets("ch").len() == 3).await;
//! let v = poll("crier_connections == 0", crier_testkit::WAIT, async || {
//!     let v = server.metric("crier_connections").await;
//!     if v == 0.0 { Ok(v) } else { Err(format!("crier_connections = {v}")) }
//! })
//! .await;
//! ```

use std::fmt::Display;
use std::time::Duration;

/// The default deadline of one wait.
pub const WAIT: Duration = Duration::from_secs(10);
/// How often a check is polled.
pub const POLL_INTERVAL: Duration = Duration::from_millis(20);

/// Polls `check` until it returns `Ok(value)` and returns the value. When `timeout` passes first
/// (or a check is still running at the deadline), panics naming `what` and the last `Err` seen.
pub async fn poll_within<T, E: Display>(
    what: impl Display,
    timeout: Duration,
    mut check: impl AsyncFnMut() -> Result<T, E>,
) -> T {
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        let last = match tokio::time::timeout_at(deadline, check()).await {
            Ok(Ok(v)) => return v,
            Ok(Err(e)) => e.to_string(),
            Err(_) => panic!("timed out after {timeout:?} waiting for {what} (the last check did not finish)"),
        };
        if tokio::time::Instant::now() >= deadline {
            if last.is_empty() {
                panic!("timed out after {timeout:?} waiting for {what}");
            }
            panic!("timed out after {timeout:?} waiting for {what}; last seen: {last}");
        }
        tokio::time::sleep(POLL_INTERVAL).await;
    }
}

/// [`poll_within`] with the default deadline, [`WAIT`].
pub async fn poll<T, E: Display>(what: impl Display, check: impl AsyncFnMut() -> Result<T, E>) -> T {
    poll_within(what, WAIT, check).await
}

/// Polls `check` until it returns `true`; panics naming `what` when `timeout` passes first.
pub async fn until_within(what: impl Display, timeout: Duration, mut check: impl AsyncFnMut() -> bool) {
    poll_within(what, timeout, async || if check().await { Ok(()) } else { Err("") }).await
}

/// [`until_within`] with the default deadline, [`WAIT`].
pub async fn until(what: impl Display, check: impl AsyncFnMut() -> bool) {
    until_within(what, WAIT, check).await
}

/// The blocking form, for code outside a runtime (process launchers): polls `check` until it
/// returns `true`, sleeping the thread in between; panics naming `what` when `timeout` passes.
pub fn until_blocking(what: impl Display, timeout: Duration, mut check: impl FnMut() -> bool) {
    let deadline = std::time::Instant::now() + timeout;
    while !check() {
        assert!(std::time::Instant::now() < deadline, "timed out after {timeout:?} waiting for {what}");
        std::thread::sleep(POLL_INTERVAL);
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicU32, Ordering};

    use super::*;

    #[tokio::test]
    async fn returns_once_the_check_holds() {
        let n = AtomicU32::new(0);
        until("three polls", async || n.fetch_add(1, Ordering::SeqCst) >= 2).await;
        assert_eq!(n.load(Ordering::SeqCst), 3);
        let v = poll("a value", async || if n.fetch_add(1, Ordering::SeqCst) >= 4 { Ok(7) } else { Err("no") }).await;
        assert_eq!(v, 7);
    }

    #[tokio::test]
    #[should_panic(expected = "waiting for the impossible; last seen: n = 0")]
    async fn names_what_it_waited_for_and_the_last_state() {
        poll_within("the impossible", Duration::from_millis(100), async || Err::<(), _>("n = 0")).await;
    }

    #[tokio::test]
    #[should_panic(expected = "waiting for a hung check (the last check did not finish)")]
    async fn a_check_that_hangs_fails_at_the_deadline() {
        until_within("a hung check", Duration::from_millis(100), async || std::future::pending().await).await;
    }

    #[test]
    #[should_panic(expected = "timed out after 50ms waiting for never")]
    fn the_blocking_form_fails_too() {
        until_blocking("never", Duration::from_millis(50), || false);
    }
}
