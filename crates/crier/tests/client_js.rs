//! `GET /crier.js`: the JavaScript client (clients/js) is served by every node, not only in --dev.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use support::Server;

#[tokio::test]
async fn the_javascript_client_is_served_as_an_es_module() {
    let server = Server::start(&[]).await;
    let r = reqwest::get(server.url("/crier.js")).await.unwrap();
    assert_eq!(r.status(), 200);
    let headers = r.headers().clone();
    assert_eq!(headers["content-type"], "text/javascript; charset=utf-8");
    // Module scripts are fetched with CORS: a page on another origin may import it.
    assert_eq!(headers["access-control-allow-origin"], "*");
    let body = r.text().await.unwrap();
    let file = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../../clients/js/src/index.js")).unwrap();
    assert_eq!(body, file, "one copy: the served module is clients/js/src/index.js");
    assert!(body.contains("export class Crier"));
    // Not a wildcard route: the rest of the HTTP surface is unchanged.
    assert_eq!(reqwest::get(server.url("/crier.jsx")).await.unwrap().status(), 404);
}
