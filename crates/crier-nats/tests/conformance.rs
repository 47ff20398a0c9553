//! The NATS broker passes the broker conformance suite, unchanged, against a real nats-server
//! with JetStream.

use std::path::PathBuf;
use std::sync::Arc;

use crier_core::Broker;
use crier_nats::{NatsAuth, NatsBroker, NatsOptions};
use crier_testkit::conformance;
use crier_testkit::nats::{NatsServer, nats_available};
use crier_testkit::tls::TestCa;

/// Runs the broker conformance suite on brokers connected to `url` of `server`, with `auth` and
/// the CA file `ca`.
async fn conforms(server: &NatsServer, url: &str, auth: NatsAuth, ca: Option<PathBuf>) {
    conformance::run(|s| {
        let (auth, ca) = (auth.clone(), ca.clone());
        async move {
            let mut o = NatsOptions::new(vec![url.to_owned()], "conformance");
            o.history_size = s.history_size;
            o.history_ttl = s.history_ttl;
            o.namespaces = s.namespaces.clone();
            o.auth = auth;
            o.tls_ca_file = ca;
            let b = NatsBroker::connect(o).await.unwrap_or_else(|e| panic!("connect: {e}\n{}", server.log()));
            assert!(b.is_up(), "connected to a running nats-server");
            b as Arc<dyn Broker>
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nats_broker_conforms() {
    if !nats_available("nats_broker_conforms") {
        return;
    }
    let server = NatsServer::start();
    conforms(&server, &server.url(), NatsAuth::None, None).await;
}

/// The same suite over TLS (`tls://`, a private CA) with a token: the subscriber connection
/// upgrades after `INFO` and authenticates like the async-nats client.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nats_broker_conforms_over_tls_with_a_token() {
    if !nats_available("nats_broker_conforms_over_tls_with_a_token") {
        return;
    }
    let ca = TestCa::generate(&["IP:127.0.0.1"]);
    let token = "conformance-t0ken";
    let config = format!("{}authorization {{ token: {token:?} }}\n", NatsServer::tls_config(&ca));
    let server = NatsServer::start_with_config(&config);
    let file = ca.server_cert.with_file_name("token");
    std::fs::write(&file, format!("{token}\n")).unwrap();
    conforms(&server, &server.tls_url(), NatsAuth::TokenFile(file), Some(ca.ca_cert.clone())).await;
}

/// The same suite with a user and password in the URL (percent-encoded), on a server that
/// requires them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nats_broker_conforms_with_a_user_in_the_url() {
    if !nats_available("nats_broker_conforms_with_a_user_in_the_url") {
        return;
    }
    let server = NatsServer::start_with_config("authorization { users: [{user: crier, password: \"p@ss:w/rd\"}] }\n");
    let url = server.url().replacen("nats://", "nats://crier:p%40ss%3Aw%2Frd@", 1);
    conforms(&server, &url, NatsAuth::None, None).await;
}
