//! Connection churn below and at the handshake: thousands of abandoned connections, abandoned
//! upgrades, silent connections, an HTTP/2 preface.

use std::time::Duration;

use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::{Instant, timeout_at};

use crier_testkit::poll;

use crate::bystander::{Bystander, gauges, wait_gauges};
use crate::raw::upgrade_request;
use crate::support::WAIT;
use crate::{assert_healthy, hostile_token, start};

/// How a connection is abandoned.
#[derive(Clone, Copy, Debug)]
enum Abandon {
    /// Connects and closes without sending anything.
    Silent,
    /// Half a request line.
    PartialRequestLine,
    /// The request line and some headers, no blank line.
    PartialHeaders,
    /// A complete upgrade request, closed before reading the 101.
    FullUpgrade,
    /// The same, closed with a TCP RST (SO_LINGER 0).
    FullUpgradeReset,
}

/// SO_LINGER 0: closing the socket sends a TCP RST instead of a FIN (and never blocks, which
/// is what tokio's deprecation of `set_linger` warns about for non-zero values).
#[allow(deprecated)]
fn reset_on_drop(s: &TcpStream) {
    let _ = s.set_linger(Some(Duration::ZERO));
}

#[tokio::test]
async fn thousands_of_connections_dropped_mid_handshake() {
    const TOTAL: usize = 2000;
    const CONCURRENCY: usize = 50;
    let server = start(&[]).await;
    let by = Bystander::start(&server).await;
    let baseline = gauges(&server).await;
    assert_eq!(baseline, [1.0, 1.0, 1.0], "the bystander: one connection, one subscription, one channel");
    let fds = || std::fs::read_dir(format!("/proc/{}/fd", server.pid())).map(|d| d.count()).unwrap_or(0);
    let fds_before = fds();
    let full = upgrade_request(&server, &hostile_token(&server));
    let kinds = [
        Abandon::Silent,
        Abandon::PartialRequestLine,
        Abandon::PartialHeaders,
        Abandon::FullUpgrade,
        Abandon::FullUpgradeReset,
    ];
    let started = Instant::now();
    let mut done = 0;
    while done < TOTAL {
        let batch: Vec<_> = (done..(done + CONCURRENCY).min(TOTAL))
            .map(|i| {
                let kind = kinds[i % kinds.len()];
                let (addr, full) = (server.addr, full.clone());
                tokio::spawn(async move {
                    let mut s = TcpStream::connect(addr).await.unwrap();
                    let bytes: &[u8] = match kind {
                        Abandon::Silent => b"",
                        Abandon::PartialRequestLine => b"GET /ws HT",
                        Abandon::PartialHeaders => b"GET /ws HTTP/1.1\r\nHost: x\r\nUpgrade: websock",
                        Abandon::FullUpgrade | Abandon::FullUpgradeReset => full.as_bytes(),
                    };
                    let _ = s.write_all(bytes).await;
                    if let Abandon::FullUpgradeReset = kind {
                        reset_on_drop(&s);
                    }
                    drop(s);
                })
            })
            .collect();
        done += batch.len();
        for t in batch {
            t.await.unwrap();
        }
        assert!(started.elapsed() < Duration::from_secs(60), "2000 connects took over a minute");
    }
    // Everything abandoned is cleaned up: gauges and file descriptors go back to where they were.
    wait_gauges(&server, baseline).await;
    poll(format!("the node's descriptors to go back to {fds_before} (+4)"), async || {
        let now = fds();
        if now <= fds_before + 4 { Ok(()) } else { Err(format!("the node holds {now} descriptors")) }
    })
    .await;
    // A new client still gets in and works.
    let mut c = server.client(&server.token("after", &["junk:*"], &[])).await;
    assert_eq!(c.request(json!({"type":"ping"}), 1).await["type"], "pong");
    drop(c);
    wait_gauges(&server, baseline).await;
    by.finish(&server).await;
}

#[tokio::test]
async fn abandoned_upgrades_release_the_per_user_connection_slot() {
    // With max_connections_per_user, the handshake takes a slot (Broker::connection_opened)
    // before the upgrade; the session gives it back in Session::cleanup. When the upgrade never
    // completes (here: the client resets the connection before the 101 is written), no session
    // runs, nothing gives the slot back, and after `max` such handshakes the user is refused with
    // 429 too_many_connections forever (memory broker) or until the count expires (Redis) —
    // while crier_connections says 0.
    let server = start(&["--max-connections-per-user", "2"]).await;
    let token = server.token("victim", &[], &[]);
    let request = upgrade_request(&server, &token);
    for _ in 0..200 {
        let mut s = TcpStream::connect(server.addr).await.unwrap();
        s.write_all(request.as_bytes()).await.unwrap();
        reset_on_drop(&s);
        drop(s);
    }
    wait_gauges(&server, [0.0, 0.0, 0.0]).await;
    poll("the user's upgrade to succeed again (no connection is open)", async || {
        let mut s = TcpStream::connect(server.addr).await.unwrap();
        s.write_all(request.as_bytes()).await.unwrap();
        let mut head = vec![0u8; 1024];
        let n = timeout_at(Instant::now() + WAIT, s.read(&mut head)).await.expect("answered").unwrap_or(0);
        let answer = String::from_utf8_lossy(&head[..n]).into_owned();
        if answer.starts_with("HTTP/1.1 101") { Ok(()) } else { Err(format!("the user stayed locked out: {answer}")) }
    })
    .await;
    assert_healthy(&server).await;
}

#[tokio::test]
async fn a_connection_that_sends_nothing_is_closed_at_the_header_read_timeout() {
    // The cheapest slowloris: connect and say nothing. hyper_util's auto::Builder first reads
    // the connection's opening bytes to choose HTTP/1 or HTTP/2, and that read has no timeout:
    // hyper's header_read_timeout only starts once the HTTP/1 connection runs. Each such
    // connection holds a task and a file descriptor for ever.
    let server = start(&[]).await;
    let by = Bystander::start(&server).await;
    let started = Instant::now();
    let mut idle = Vec::new();
    for _ in 0..20 {
        idle.push(TcpStream::connect(server.addr).await.unwrap());
    }
    let deadline = started + crier::HEADER_READ_TIMEOUT + Duration::from_secs(3);
    for mut s in idle {
        let mut buf = [0u8; 256];
        let r = tokio::time::timeout_at(deadline, s.read(&mut buf)).await;
        assert!(r.is_ok(), "a silent connection was still open after {:?}", started.elapsed());
    }
    by.finish(&server).await;
}

#[tokio::test]
async fn an_http2_preface_is_refused_by_the_http1_only_listener() {
    // accept_loop says "HTTP/1.1 only" and calls auto::Builder::http1_only(), but hyper_util
    // documents that http1_only "does not do anything if used with serve_connection_with_upgrades".
    // An HTTP/2 client (h2c prior knowledge) is served: it gets a SETTINGS frame, and the
    // connection is then held open with neither the header read timeout nor the 16 KiB head
    // bound of the HTTP/1 path applying to it.
    let server = start(&[]).await;
    let by = Bystander::start(&server).await;
    let started = Instant::now();
    let mut s = TcpStream::connect(server.addr).await.unwrap();
    s.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x00\x04\x00\x00\x00\x00\x00").await.unwrap();
    let deadline = started + crier::HEADER_READ_TIMEOUT + Duration::from_secs(3);
    let mut got = Vec::new();
    let mut chunk = [0u8; 1024];
    loop {
        match timeout_at(deadline, s.read(&mut chunk)).await {
            Ok(Ok(0) | Err(_)) => break,
            Ok(Ok(n)) => got.extend_from_slice(&chunk[..n]),
            Err(_) => panic!("an HTTP/2 connection was still open after {:?}: got {got:?}", started.elapsed()),
        }
    }
    // Refused as HTTP/1 (hyper answers an HTTP/2 preface with an error and closes).
    assert!(got.is_empty() || got.starts_with(b"HTTP/1.1 "), "answered in HTTP/2: {got:?}");
    by.finish(&server).await;
}
