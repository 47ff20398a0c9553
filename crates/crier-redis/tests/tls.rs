//! TLS (`rediss://`) against a real `redis-server --tls-port` with a CA and server certificate
//! the test generates: the conformance suite over TLS, and every way verification must fail
//! (wrong CA, system roots for a private CA, wrong host name, a garbage CA file, a plaintext
//! port) failing clearly, never falling back to plaintext.

#![allow(clippy::expect_used)]

mod support;

use std::sync::Arc;
use std::time::Duration;

use crier_core::{Broker, BrokerError};
use crier_redis::{RedisBroker, RedisOptions, StartError};
use crier_testkit::conformance;
use crier_testkit::redis::RedisServer;
use crier_testkit::tls::TestCa;

fn tls_options(url: String, ca: Option<&TestCa>) -> RedisOptions {
    let mut o = RedisOptions::new(url, "tls-test");
    o.tls_ca_file = ca.map(|ca| ca.ca_cert.clone());
    o.command_timeout = Duration::from_secs(1);
    o.probe_interval = Duration::from_millis(200);
    o.reconnect_max = Duration::from_millis(500);
    o
}

async fn start_err(o: RedisOptions) -> String {
    match RedisBroker::start(o).await {
        Err(StartError::Setting(why)) => why,
        Ok(_) => panic!("started although TLS verification must fail"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_broker_conforms_over_tls() {
    let ca = TestCa::generate(&["DNS:localhost"]);
    let server = RedisServer::start_tls(&ca);
    let (server, ca) = (&server, &ca);
    conformance::run(|s| async move {
        let mut o = tls_options(server.tls_url("localhost"), Some(ca));
        o.namespaces = s.namespaces.clone();
        let b = RedisBroker::start(o).await.expect("start");
        assert!(b.is_up(), "connected over TLS");
        b as Arc<dyn Broker>
    })
    .await;
    // The broker's connections really are on the TLS port (CLIENT LIST's laddr).
    let b = RedisBroker::start(tls_options(server.tls_url("localhost"), Some(ca))).await.expect("start");
    b.publish("tls:check", "1", Default::default()).await.expect("publish");
    let clients = server.cmd(&["CLIENT", "LIST"]);
    let ours: Vec<&str> = clients.lines().filter(|l| l.contains("name=crier-pubsub-tls-test")).collect();
    assert!(!ours.is_empty(), "{clients}");
    let tls_addr = format!("laddr=127.0.0.1:{}", server.tls_port());
    assert!(ours.iter().all(|l| l.contains(&tls_addr)), "{clients}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn certificates_that_do_not_verify_are_a_clear_start_error() {
    let ca = TestCa::generate(&["DNS:localhost"]);
    let other = TestCa::generate(&["DNS:localhost"]);
    let server = RedisServer::start_tls(&ca);

    // Another CA.
    let why = start_err(tls_options(server.tls_url("localhost"), Some(&other))).await;
    assert!(why.contains("invalid peer certificate") && why.contains("UnknownIssuer"), "{why}");
    // The system's roots do not know a private CA.
    let why = start_err(tls_options(server.tls_url("localhost"), None)).await;
    assert!(why.contains("invalid peer certificate"), "{why}");
    // The right CA, but a name the certificate does not carry.
    let why = start_err(tls_options(server.tls_url("127.0.0.1"), Some(&ca))).await;
    assert!(why.contains("invalid peer certificate") && why.contains("not valid for name"), "{why}");
    // Verification cannot be switched off.
    let why = start_err(tls_options(format!("{}#insecure", server.tls_url("localhost")), Some(&ca))).await;
    assert!(why.contains("#insecure"), "{why}");
    // A CA file that is not one.
    let garbage = std::env::temp_dir().join(format!("crier-not-a-ca-{}.pem", std::process::id()));
    std::fs::write(&garbage, "not a certificate").unwrap_or_else(|e| panic!("{e}"));
    let mut o = tls_options(server.tls_url("localhost"), None);
    o.tls_ca_file = Some(garbage.clone());
    let why = start_err(o).await;
    assert!(why.contains("redis_tls_ca_file") && why.contains("no PEM certificate"), "{why}");
    let _ = std::fs::remove_file(&garbage);
    let mut o = tls_options(server.tls_url("localhost"), None);
    o.tls_ca_file = Some("/nonexistent/ca.pem".into());
    let why = start_err(o).await;
    assert!(why.contains("redis_tls_ca_file /nonexistent/ca.pem"), "{why}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_and_plaintext_never_mix() {
    let ca = TestCa::generate(&["DNS:localhost"]);
    let server = RedisServer::start_tls(&ca);
    // rediss:// to the plaintext port: no TLS server there, so never up (and never plaintext).
    let mut o = tls_options(format!("rediss://localhost:{}/", server.port()), Some(&ca));
    o.connect_wait = Duration::from_millis(700);
    let b = RedisBroker::start(o).await.expect("start");
    assert!(!b.is_up());
    assert!(!b.wait_up(true, Duration::from_secs(2)).await, "a TLS client never talks to a plaintext port");
    let r = b.publish("c", "1", Default::default()).await;
    assert!(matches!(r, Err(BrokerError::Unavailable(_))), "{r:?}");
    // redis:// to the TLS port: the server never hears a plaintext command.
    let mut o = tls_options(format!("redis://localhost:{}/", server.tls_port()), None);
    o.connect_wait = Duration::from_millis(700);
    let b = RedisBroker::start(o).await.expect("start");
    assert!(!b.wait_up(true, Duration::from_secs(2)).await);
    let r = b.publish("c", "1", Default::default()).await;
    assert!(r.is_err(), "{r:?}");
}
