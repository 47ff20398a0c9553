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

/// The JavaScript client's close-code table is generated from `CLOSE_CODES`: this fails when
/// the two differ (regenerate the block with `crier_protocol::codes::js_close_actions`).
#[test]
fn the_javascript_clients_close_table_is_the_servers() {
    let file = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../../clients/js/src/index.js")).unwrap();
    let start = file.find("export const CLOSE_ACTIONS").expect("the generated block");
    let end = file[start..].find("// end generated").expect("the end marker") + start;
    let block = &file[start..end];
    let want = crier_protocol::codes::js_close_actions();
    assert_eq!(
        block, want,
        "clients/js/src/index.js's CLOSE_ACTIONS differs from CLOSE_CODES; replace it with:\n{want}"
    );
    assert!(file[..start].contains("generated from CLOSE_CODES"), "the block says where it comes from");
    // No second list of codes on the side.
    assert!(!file.contains("STOP_CODES"), "the client takes close decisions from CLOSE_ACTIONS only");
}
