//! crier on a NATS server that requires TLS or credentials, with the real binary: `tls://` with
//! a private CA (`nats_tls_ca_file`), a token (`nats_token_file`), an nkey (`nats_nkey_file`),
//! a `.creds` file (`nats_credentials_file`, a server in operator mode with JWTs minted here).
//! Each check subscribes over WebSocket, publishes over REST and receives the message live (on
//! the node's own subscriber connection, which must have done TLS / authenticated like the
//! async-nats client), then reads it back through history or recovery (JetStream). Secrets
//! never appear in the node's output. Skipped, saying so, only when `nats-server` is not installed.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::path::PathBuf;

use crier_testkit::nats::{NatsServer, nats_available};
use crier_testkit::tls::TestCa;
use crier_testkit::until;
use serde_json::json;
use support::Server;

async fn status(server: &Server, path: &str) -> u16 {
    reqwest::get(server.url(path)).await.map(|r| r.status().as_u16()).unwrap_or(0)
}

/// A file holding `content` in the server's directory (removed with the server).
fn secret_file(nats: &NatsServer, name: &str, content: &str) -> String {
    let p: PathBuf = nats.dir().join(name);
    std::fs::write(&p, format!("{content}\n")).unwrap();
    p.display().to_string()
}

/// A node on `url` with `extra` args, ready (its broker up).
async fn ready_node(url: &str, name: &str, extra: &[&str], nats: &NatsServer) -> Server {
    let mut args = vec!["--nats-url", url, "--node-id", name];
    args.extend_from_slice(extra);
    let node = Server::start(&args).await;
    until(format!("{name} ready (nats log:\n{})", nats.log()), async || status(&node, "/readyz").await == 200).await;
    node
}

/// Live delivery (subscribe over WebSocket, publish over REST), then the history and a
/// recovery: what every kind of connection must do.
async fn delivers_and_recovers(node: &Server, channel: &str) {
    let token = node.token("u", &[channel], &[]);
    let mut c = node.client(&token).await;
    c.subscribe(channel, 1).await;
    let first = node.publish(channel, json!("one")).await;
    let (epoch, offset) = (first["epoch"].as_str().unwrap().to_owned(), first["offset"].as_u64().unwrap());
    let m = support::messages(&mut c, 1).await.remove(0);
    assert_eq!((m["epoch"].as_str(), m["offset"].as_u64(), &m["data"]), (Some(&*epoch), Some(offset), &json!("one")));
    let second = node.publish(channel, json!("two")).await;
    let m = support::messages(&mut c, 1).await.remove(0);
    assert_eq!(m["offset"], second["offset"], "live, in order");
    // History from JetStream.
    let h = c.request(json!({"type":"history","channel":channel}), 2).await;
    assert_eq!(h["type"], "history", "{h}");
    let offsets: Vec<u64> = h["messages"].as_array().unwrap().iter().map(|m| m["offset"].as_u64().unwrap()).collect();
    assert_eq!(offsets, vec![offset, offset + 1], "{h}");
    // A client that saw only the first message recovers the second.
    let mut late = node.client(&token).await;
    let ack = late.resubscribe(channel, &epoch, offset, 1).await;
    assert_eq!(ack["recovered"], true, "{ack}");
    let m = support::messages(&mut late, 1).await.remove(0);
    assert_eq!((m["offset"].as_u64(), &m["data"]), (Some(offset + 1), &json!("two")));
}

/// `secret` appears nowhere in the node's output (stdout and the logs).
fn never_printed(node: &Server, secret: &str) {
    assert!(!node.logs().contains(secret), "the secret is in the logs:\n{}", node.logs());
    assert!(!node.stdout().contains(secret), "the secret is on stdout");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_nats_with_a_private_ca_delivers_and_recovers() {
    if !nats_available("tls_nats_with_a_private_ca_delivers_and_recovers") {
        return;
    }
    let ca = TestCa::generate(&["IP:127.0.0.1"]);
    let nats = NatsServer::start_with_config(&NatsServer::tls_config(&ca));
    let ca_file = ca.ca_cert.display().to_string();
    let node = ready_node(&nats.tls_url(), "tls1", &["--nats-tls-ca-file", &ca_file], &nats).await;
    delivers_and_recovers(&node, "tls:ev").await;
    // Both of the node's connections (the async-nats client, the subscriber connection) are
    // on TLS: the server requires it, and lists them.
    let connz = nats.get("/connz").unwrap_or_default();
    assert!(connz.contains("crier tls1 live") && connz.matches("\"tls_version\"").count() >= 2, "{connz}");
    // A `nats://` URL to a server that requires TLS: both connections upgrade after `INFO`.
    let plain = ready_node(&nats.url(), "tls2", &["--nats-tls-ca-file", &ca_file], &nats).await;
    delivers_and_recovers(&plain, "tls:ev2").await;
    assert!(nats.get("/connz").unwrap_or_default().contains("crier tls2 live"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_nats_token_works_is_never_printed_and_a_wrong_one_never_gets_ready() {
    if !nats_available("a_nats_token_works_is_never_printed_and_a_wrong_one_never_gets_ready") {
        return;
    }
    let token = "t0ken-that-must-not-leak";
    let nats = NatsServer::start_with_config(&format!("authorization {{ token: {token:?} }}\n"));
    let good = secret_file(&nats, "token", token);
    let node = ready_node(&nats.url(), "tok1", &["--nats-token-file", &good], &nats).await;
    delivers_and_recovers(&node, "tok:ev").await;
    never_printed(&node, token);
    assert!(nats.get("/connz").unwrap_or_default().contains("crier tok1 live"), "the subscriber connection is in");

    // A wrong token: the server refuses it (logged as an authorization violation, without
    // the token), and the node never becomes ready: it starts unready, as for a NATS that
    // cannot be reached (an exit is accepted too: either way never ready, the token unprinted).
    let wrong = "wr0ng-t0ken-that-must-not-leak";
    let bad = secret_file(&nats, "wrong", wrong);
    match Server::try_start(&["--nats-url", &nats.url(), "--nats-token-file", &bad]).await {
        Err(out) => {
            assert!(!out.contains(wrong), "the token is in the output:\n{out}");
            assert!(out.to_lowercase().contains("authorization violation"), "{out}");
        }
        Ok(refused) => {
            until("the refused credential logged", async || {
                assert_ne!(status(&refused, "/readyz").await, 200, "ready with a wrong token");
                refused.logs().to_lowercase().contains("authorization violation")
            })
            .await;
            assert_ne!(status(&refused, "/readyz").await, 200, "ready with a wrong token");
            never_printed(&refused, wrong);
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_nats_nkey_works_and_its_seed_is_never_printed() {
    if !nats_available("a_nats_nkey_works_and_its_seed_is_never_printed") {
        return;
    }
    let user = nkeys::KeyPair::new_user();
    let seed = user.seed().unwrap();
    let nats =
        NatsServer::start_with_config(&format!("authorization {{ users: [{{ nkey: {:?} }}] }}\n", user.public_key()));
    let file = secret_file(&nats, "user.nk", &seed);
    let node = ready_node(&nats.url(), "nk1", &["--nats-nkey-file", &file], &nats).await;
    delivers_and_recovers(&node, "nk:ev").await;
    never_printed(&node, &seed);
    // The server saw the subscriber connection authenticate with the nkey too.
    let connz = nats.get("/connz?auth=1").unwrap_or_default();
    assert!(connz.contains("crier nk1 live") && connz.contains(&user.public_key()), "{connz}");
}

/// A JWT as NATS signs them: `{"typ":"JWT","alg":"ed25519-nkey"}`, the claims, and the
/// ed25519 signature of `header.claims` by `signer`, each unpadded base64url.
fn nats_jwt(signer: &nkeys::KeyPair, subject: &str, name: &str, nats: serde_json::Value) -> String {
    use base64::Engine;
    let b64 = |b: &[u8]| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(b);
    let iat = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs();
    let claims = json!({
        "jti": format!("J{}{iat}", name.to_uppercase()), "iat": iat, "iss": signer.public_key(),
        "name": name, "sub": subject, "nats": nats,
    });
    let unsigned = format!("{}.{}", b64(br#"{"typ":"JWT","alg":"ed25519-nkey"}"#), b64(claims.to_string().as_bytes()));
    let sig = signer.sign(unsigned.as_bytes()).unwrap();
    format!("{unsigned}.{}", b64(&sig))
}

/// A `.creds` file (operator mode: the server trusts an operator, which signed an account with
/// JetStream on, which signed the user): works, and neither the seed nor the JWT is printed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_nats_creds_file_works_and_is_never_printed() {
    if !nats_available("a_nats_creds_file_works_and_is_never_printed") {
        return;
    }
    let (operator, account, user) =
        (nkeys::KeyPair::new_operator(), nkeys::KeyPair::new_account(), nkeys::KeyPair::new_user());
    let operator_jwt = nats_jwt(&operator, &operator.public_key(), "op", json!({"type":"operator","version":2}));
    let unlimited = json!({
        "subs": -1, "data": -1, "payload": -1, "imports": -1, "exports": -1, "wildcards": true,
        "conn": -1, "leaf": -1, "mem_storage": -1, "disk_storage": -1, "streams": -1, "consumer": -1,
    });
    let account_jwt = nats_jwt(
        &operator,
        &account.public_key(),
        "acc",
        json!({"limits": unlimited, "default_permissions": {"pub": {}, "sub": {}}, "type": "account", "version": 2}),
    );
    let user_jwt = nats_jwt(
        &account,
        &user.public_key(),
        "crier",
        json!({"pub": {}, "sub": {}, "subs": -1, "data": -1, "payload": -1, "type": "user", "version": 2}),
    );
    // JetStream needs a system account.
    let system = nkeys::KeyPair::new_account();
    let system_jwt = nats_jwt(&operator, &system.public_key(), "sys", json!({"type": "account", "version": 2}));
    let config = format!(
        "operator: {operator_jwt:?}\nsystem_account: {sys}\nresolver: MEMORY\n\
         resolver_preload: {{ {sys}: {system_jwt:?}, {acc}: {account_jwt:?} }}\n",
        sys = system.public_key(),
        acc = account.public_key()
    );
    let nats = NatsServer::start_with_config(&config);
    let seed = user.seed().unwrap();
    let creds = format!(
        "-----BEGIN NATS USER JWT-----\n{user_jwt}\n------END NATS USER JWT------\n\n\
         ************************* IMPORTANT *************************\n\
         NKEY Seed printed below can be used to sign and prove identity.\n\n\
         -----BEGIN USER NKEY SEED-----\n{seed}\n------END USER NKEY SEED------\n"
    );
    let file = secret_file(&nats, "crier.creds", &creds);
    let node = ready_node(&nats.url(), "cr1", &["--nats-credentials-file", &file], &nats).await;
    delivers_and_recovers(&node, "creds:ev").await;
    never_printed(&node, &seed);
    never_printed(&node, &user_jwt);
    let connz = nats.get("/connz?auth=1").unwrap_or_default();
    assert!(connz.contains("crier cr1 live") && connz.contains(&user.public_key()), "{connz}");
}

/// A CA file that is no certificate, a seed file that is no seed, a `.creds` file that holds
/// no JWT and seed: the node stops with exit 64 naming the setting, never quoting the file.
#[tokio::test]
async fn unusable_nats_tls_and_credential_files_stop_the_start_with_exit_64_without_their_content() {
    let dir = std::env::temp_dir().join(format!("crier-nats-bad-files-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    for (flag, named, content) in [
        ("--nats-tls-ca-file", "nats_tls_ca_file", "not-a-certificate-c0ntent"),
        ("--nats-nkey-file", "nats nkey file", "SUnot-a-seed-c0ntent"),
        ("--nats-credentials-file", "nats credentials file", "garbage-creds-c0ntent"),
    ] {
        let file = dir.join(named.replace(' ', "_"));
        std::fs::write(&file, content).unwrap();
        let file = file.display().to_string();
        let out = match Server::try_start(&["--nats-url", "tls://127.0.0.1:1", flag, &file]).await {
            Err(out) => out,
            Ok(mut s) => {
                assert_eq!(s.wait_exit().await, Some(64), "{flag}: exit 64\n{}", s.logs());
                // The output is read by other tasks: wait until it is read to the refusal.
                let read = async || {
                    let out = format!("{}{}", s.stdout(), s.logs());
                    if out.contains(named) { Ok(out) } else { Err(out) }
                };
                crier_testkit::wait::poll("the refusal in the node's output", read).await
            }
        };
        assert!(out.contains(named), "{flag}: the setting is named:\n{out}");
        assert!(!out.contains(content), "{flag}: the file's content is quoted:\n{out}");
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// Readiness includes the node's subscriber connection (as on Redis, both connections): a
/// server that takes one connection only (`max_connections: 1`, the async-nats client's) leaves
/// the node unready, saying why; once the server takes more, the node turns ready and delivers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readiness_waits_for_the_subscriber_connection() {
    if !nats_available("readiness_waits_for_the_subscriber_connection") {
        return;
    }
    let nats = NatsServer::start_with_config("max_connections: 1\n");
    let node = Server::start(&["--nats-url", &nats.url(), "--node-id", "one"]).await;
    until("the subscriber connection's refusal logged", async || {
        assert_ne!(status(&node, "/readyz").await, 200, "ready without its subscriber connection");
        node.logs().contains("nats subscriber connection failed")
    })
    .await;
    assert_ne!(status(&node, "/readyz").await, 200, "ready without its subscriber connection");
    nats.reload_config("max_connections: 10\n");
    let deadline = tokio::time::Instant::now() + crier_testkit::WAIT;
    while status(&node, "/readyz").await != 200 {
        let logs = || format!("{}\nnats:\n{}", node.logs(), nats.log());
        assert!(tokio::time::Instant::now() < deadline, "not ready once the subscriber connection is in:\n{}", logs());
        // Not a synchronisation: paces the polling of /readyz.
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    delivers_and_recovers(&node, "one:ev").await;
}
