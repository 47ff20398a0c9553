//! one file: one description (docs/openapi.json) checked against one router: every operation runs from one request table on the same nodes.
//!
//! docs/openapi.json against the real binary: the description must match what crier does.
//!
//! - The router's routes (every `.route(..)` in crates/crier/src) and the description's paths
//!   agree: every `/api/` route+method is described and every described path+method is routed.
//! - Every operation is driven with valid and invalid requests (a node on the memory broker, a
//!   rate-limited one, and one on a `redis-server` that is then killed); each answer's status
//!   must be the expected one and one the operation declares, its content type the declared one,
//!   its body valid against the declared schema (JSON Schema 2020-12, `jsonschema` crate), and
//!   declared headers (`Retry-After`) present.
//! - Every declared status of every operation is exercised, except the few listed in
//!   [`NOT_PROVOKED`] with the reason.
//! - `GET /api/v1/openapi.json` serves the file, without an API key.

#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "../../crier-redis/tests/support/mod.rs"]
mod redis_support;
mod support;

use std::collections::{BTreeSet, HashSet};
use std::path::Path;

use reqwest::Method;
use serde_json::{Value, json};
use support::{API_KEY, Server};

/// Declared statuses no case provokes, and why.
const NOT_PROVOKED: &[(&str, &str, u16, &str)] = &[
    ("/metrics", "get", 503, "only when crier runs as a library without a recorder"),
    (
        "/api/v1/broadcast",
        "post",
        503,
        "the 10 s request limit, a safety net: every broker call has a 2 s deadline and a broadcast's publishes run at once",
    ),
];

fn spec() -> Value {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../../docs/openapi.json");
    serde_json::from_str(&std::fs::read_to_string(path).expect("docs/openapi.json")).expect("valid JSON")
}

/// Follows a local `$ref` (`#/components/...`).
fn deref<'a>(spec: &'a Value, v: &'a Value) -> &'a Value {
    match v.get("$ref").and_then(Value::as_str) {
        Some(r) => spec.pointer(r.trim_start_matches('#')).unwrap_or_else(|| panic!("dangling $ref {r}")),
        None => v,
    }
}

/// Every `.route("path", get(..).post(..))` in the server's sources, as (path, method).
fn router_routes() -> BTreeSet<(String, String)> {
    fn walk(dir: &Path, out: &mut Vec<String>) {
        for e in std::fs::read_dir(dir).unwrap().flatten() {
            let p = e.path();
            if p.is_dir() {
                walk(&p, out);
            } else if p.extension().is_some_and(|x| x == "rs") {
                out.push(std::fs::read_to_string(&p).unwrap());
            }
        }
    }
    let mut sources = Vec::new();
    walk(Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/src")), &mut sources);
    let mut routes = BTreeSet::new();
    for src in &sources {
        let mut rest = src.as_str();
        while let Some(at) = rest.find(".route(\"") {
            rest = &rest[at + 8..];
            let Some(end) = rest.find('"') else { break };
            let path = rest[..end].to_owned();
            // The route's method router: up to the `.route(` call's closing parenthesis.
            let mut depth = 1;
            let args = &rest[end..];
            let close = args
                .char_indices()
                .find(|(_, c)| {
                    match c {
                        '(' => depth += 1,
                        ')' => depth -= 1,
                        _ => {}
                    }
                    depth == 0
                })
                .map_or(args.len(), |(i, _)| i);
            for method in ["get", "post", "put", "delete", "patch"] {
                let a = &args[..close];
                let called = a.match_indices(&format!("{method}(")).any(|(i, _)| {
                    i == 0 || !a.as_bytes()[i - 1].is_ascii_alphanumeric() && a.as_bytes()[i - 1] != b'_'
                });
                if called {
                    routes.insert((path.clone(), method.to_owned()));
                }
            }
        }
    }
    routes
}

fn spec_operations(spec: &Value) -> BTreeSet<(String, String)> {
    let mut ops = BTreeSet::new();
    for (path, item) in spec["paths"].as_object().expect("paths") {
        for method in item.as_object().expect("path item").keys() {
            ops.insert((path.clone(), method.clone()));
        }
    }
    ops
}

struct Checker {
    spec: Value,
    http: reqwest::Client,
    exercised: HashSet<(String, String, u16)>,
}

/// One request of a case.
struct Req<'a> {
    method: Method,
    /// The described path, e.g. `/api/v1/channels/{channel}/history`.
    template: &'a str,
    /// The path (and query) sent.
    path: String,
    auth: Option<&'a str>,
    body: Option<Body>,
    headers: Vec<(&'a str, String)>,
}

enum Body {
    Json(Value),
    Raw(String),
}

fn req(method: Method, template: &str) -> Req<'_> {
    Req { method, path: template.to_owned(), template, auth: Some(API_KEY), body: None, headers: Vec::new() }
}

impl<'a> Req<'a> {
    fn path(mut self, p: impl Into<String>) -> Self {
        self.path = p.into();
        self
    }
    fn json(mut self, v: Value) -> Self {
        self.body = Some(Body::Json(v));
        self
    }
    fn raw(mut self, s: impl Into<String>) -> Self {
        self.body = Some(Body::Raw(s.into()));
        self
    }
    fn auth(mut self, key: Option<&'a str>) -> Self {
        self.auth = key;
        self
    }
    fn header(mut self, name: &'a str, value: impl Into<String>) -> Self {
        self.headers.push((name, value.into()));
        self
    }
}

impl Checker {
    /// Sends `r` to `server`, checks the answer against the description and that its status is
    /// `expected`; returns the body (JSON, or the text as a JSON string).
    async fn check(&mut self, server: &Server, r: Req<'_>, expected: u16) -> Value {
        let method = r.method.as_str().to_ascii_lowercase();
        let what = format!("{} {}", r.method, r.path);
        let mut b = self.http.request(r.method.clone(), server.url(&r.path));
        if let Some(key) = r.auth {
            b = b.bearer_auth(key);
        }
        for (k, v) in &r.headers {
            b = b.header(*k, v);
        }
        b = match r.body {
            Some(Body::Json(v)) => b.json(&v),
            Some(Body::Raw(s)) => b.header("content-type", "application/json").body(s),
            None => b,
        };
        let resp = b.send().await.unwrap_or_else(|e| panic!("{what}: {e}"));
        let status = resp.status().as_u16();
        let headers = resp.headers().clone();
        let text = resp.text().await.unwrap_or_default();
        assert_eq!(status, expected, "{what}: status {status}, body {text}");
        self.exercised.insert((r.template.to_owned(), method.clone(), status));

        let spec = self.spec.clone();
        let op = spec["paths"][r.template]
            .get(&method)
            .unwrap_or_else(|| panic!("{what}: `{method} {}` is not described", r.template));
        let declared = op["responses"]
            .get(status.to_string())
            .unwrap_or_else(|| panic!("{what}: status {status} is not declared for {method} {}", r.template));
        let declared = deref(&spec, declared);
        for name in declared["headers"].as_object().into_iter().flatten().map(|(k, _)| k) {
            assert!(headers.contains_key(name.as_str()), "{what}: declared header {name} missing");
        }
        let Some(content) = declared["content"].as_object() else {
            return Value::Null;
        };
        let ctype = headers.get("content-type").and_then(|v| v.to_str().ok()).unwrap_or("");
        let (media, schema) = content
            .iter()
            .find(|(m, _)| ctype.starts_with(m.as_str()))
            .unwrap_or_else(|| panic!("{what}: content type `{ctype}` is not declared ({:?})", content.keys()));
        let instance = if media == "application/json" {
            serde_json::from_str(&text).unwrap_or_else(|e| panic!("{what}: body is not JSON ({e}): {text}"))
        } else {
            Value::String(text)
        };
        let root = json!({"components": spec["components"], "allOf": [schema["schema"]]});
        let validator = jsonschema::draft202012::new(&root).unwrap_or_else(|e| panic!("{what}: schema: {e}"));
        let errors: Vec<String> =
            validator.iter_errors(&instance).map(|e| format!("{e} at {}", e.instance_path())).collect();
        assert!(errors.is_empty(), "{what}: the {status} body does not match the description: {errors:?}\n{instance}");
        instance
    }
}

#[test]
fn every_route_is_described_and_every_description_is_routed() {
    let spec = spec();
    let routes = router_routes();
    let described = spec_operations(&spec);
    assert!(routes.len() >= 10, "found the router's routes: {routes:?}");
    let api = |set: &BTreeSet<(String, String)>| -> BTreeSet<(String, String)> {
        set.iter().filter(|(p, _)| p.starts_with("/api/")).cloned().collect()
    };
    assert_eq!(api(&routes), api(&described), "the /api/ routes and docs/openapi.json differ");
    let unrouted: Vec<_> = described.difference(&routes).collect();
    assert!(unrouted.is_empty(), "described but not routed: {unrouted:?}");
}

/// The OpenAPI Initiative's JSON Schema of OpenAPI 3.1 documents (2022-10-07, Apache-2.0;
/// the copy shipped by the `openapi-spec-validator` package), vendored: no network in tests.
const OAS_31_SCHEMA: &str = include_str!("data/oas-3.1-schema.json");

#[test]
fn the_description_is_well_formed_openapi_3_1() {
    let spec = spec();
    assert!(spec["openapi"].as_str().is_some_and(|v| v.starts_with("3.1.")));
    let meta: Value = serde_json::from_str(OAS_31_SCHEMA).unwrap();
    let validator = jsonschema::draft202012::new(&meta).expect("the OAS 3.1 schema compiles");
    let errors: Vec<String> = validator.iter_errors(&spec).map(|e| format!("{e} at {}", e.instance_path())).collect();
    assert!(errors.is_empty(), "docs/openapi.json is not a valid OpenAPI 3.1 document: {errors:#?}");
    assert_eq!(spec["info"]["version"], env!("CARGO_PKG_VERSION"), "info.version follows crier's version");
    // Every $ref resolves; every schema compiles.
    fn refs(v: &Value, out: &mut Vec<String>) {
        match v {
            Value::Object(m) => {
                if let Some(Value::String(r)) = m.get("$ref") {
                    out.push(r.clone());
                }
                m.values().for_each(|v| refs(v, out));
            }
            Value::Array(a) => a.iter().for_each(|v| refs(v, out)),
            _ => {}
        }
    }
    let mut all = Vec::new();
    refs(&spec, &mut all);
    for r in &all {
        assert!(spec.pointer(r.trim_start_matches('#')).is_some(), "dangling $ref {r}");
    }
    for (name, schema) in spec["components"]["schemas"].as_object().unwrap() {
        let root = json!({"components": spec["components"], "allOf": [schema]});
        assert!(jsonschema::draft202012::new(&root).is_ok(), "schema {name} does not compile");
    }
    for (path, item) in spec["paths"].as_object().unwrap() {
        for (method, op) in item.as_object().unwrap() {
            assert!(op["operationId"].is_string(), "{method} {path}: operationId");
            assert!(op["responses"].as_object().is_some_and(|r| !r.is_empty()), "{method} {path}: responses");
            let open = op.get("security").is_some_and(|s| s.as_array().is_some_and(|a| a.is_empty()));
            if path.starts_with("/api/") {
                let needs_key = op["responses"].get("401").is_some();
                assert_eq!(!open, needs_key, "{method} {path}: 401 iff it needs the API key");
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_operation_answers_as_described() {
    let spec = spec();
    let mut c = Checker { spec: spec.clone(), http: reqwest::Client::new(), exercised: HashSet::new() };
    // A namespace without presence (channel namespaces: its presence answers 403).
    let config = std::env::temp_dir().join(format!("crier-openapi-{}.toml", std::process::id()));
    std::fs::write(&config, "[namespaces.quiet]\npresence = false\n").unwrap();
    let config_path = config.to_string_lossy().into_owned();
    let node =
        Server::start(&["--max-message-bytes", "1024", "--max-connections", "1", "--config", &config_path]).await;
    let _ = std::fs::remove_file(&config);
    let (get, post) = (Method::GET, Method::POST);
    let big = "x".repeat(2048);

    // The description itself, without an API key: the very file.
    let served = c.check(&node, req(get.clone(), "/api/v1/openapi.json").auth(None), 200).await;
    assert_eq!(served, spec, "GET /api/v1/openapi.json serves docs/openapi.json");

    // publish
    let t = "/api/v1/publish";
    let p = c.check(&node, req(post.clone(), t).json(json!({"channel": "chat:a", "data": {"x": 1}})), 200).await;
    let epoch = p["epoch"].as_str().unwrap().to_owned();
    let keyed = json!({"channel": "chat:a", "data": 2, "idempotency_key": "k1"});
    let first = c.check(&node, req(post.clone(), t).json(keyed.clone()), 200).await;
    assert_eq!(c.check(&node, req(post.clone(), t).json(keyed), 200).await, first, "idempotent");
    c.check(&node, req(post.clone(), t).raw("{not json"), 400).await;
    c.check(&node, req(post.clone(), t).json(json!({"channel": "chat:a"})), 400).await;
    c.check(&node, req(post.clone(), t).json(json!({"channel": "bad name!", "data": 1})), 400).await;
    c.check(&node, req(post.clone(), t).json(json!({"channel": "c", "data": 1, "idempotency_key": ""})), 400).await;
    c.check(&node, req(post.clone(), t).json(json!({"channel": "c", "data": big})), 413).await;
    c.check(&node, req(post.clone(), t).auth(None).json(json!({"channel": "c", "data": 1})), 401).await;
    c.check(&node, req(post.clone(), t).auth(Some("wrong")).json(json!({"channel": "c", "data": 1})), 401).await;

    // broadcast
    let t = "/api/v1/broadcast";
    let b =
        c.check(&node, req(post.clone(), t).json(json!({"channels": ["chat:a", "bad name!"], "data": 1})), 200).await;
    assert_eq!(b["results"][1]["error"], "invalid_channel");
    c.check(&node, req(post.clone(), t).json(json!({"channels": [], "data": 1})), 400).await;
    c.check(&node, req(post.clone(), t).raw("[]"), 400).await;
    c.check(&node, req(post.clone(), t).json(json!({"channels": ["a"], "data": big})), 413).await;
    c.check(&node, req(post.clone(), t).auth(None).json(json!({"channels": ["a"], "data": 1})), 401).await;

    // history
    let t = "/api/v1/channels/{channel}/history";
    let h = c.check(&node, req(get.clone(), t).path("/api/v1/channels/chat:a/history"), 200).await;
    assert_eq!(h["recovered"], Value::Null);
    assert_eq!(h["messages"].as_array().map(Vec::len), Some(3), "two publishes and a broadcast");
    let since = format!("/api/v1/channels/chat:a/history?since_offset=1&epoch={epoch}&limit=5");
    let h = c.check(&node, req(get.clone(), t).path(since), 200).await;
    assert_eq!(h["recovered"], true);
    c.check(&node, req(get.clone(), t).path("/api/v1/channels/bad%20name/history"), 400).await;
    c.check(&node, req(get.clone(), t).path("/api/v1/channels/%FF/history"), 400).await;
    c.check(&node, req(get.clone(), t).path("/api/v1/channels/chat:a/history?since_offset=1"), 400).await;
    c.check(&node, req(get.clone(), t).path("/api/v1/channels/chat:a/history?limit=many"), 400).await;
    c.check(&node, req(get.clone(), t).path("/api/v1/channels/chat:a/history").auth(None), 401).await;

    // presence
    let t = "/api/v1/channels/{channel}/presence";
    c.check(&node, req(get.clone(), t).path("/api/v1/channels/chat:a/presence"), 200).await;
    c.check(&node, req(get.clone(), t).path("/api/v1/channels/bad%20name/presence"), 400).await;
    c.check(&node, req(get.clone(), t).path("/api/v1/channels/quiet:a/presence"), 403).await;
    c.check(&node, req(get.clone(), t).path("/api/v1/channels/chat:a/presence").auth(None), 401).await;

    // presence_stats
    let t = "/api/v1/channels/{channel}/presence_stats";
    let st = c.check(&node, req(get.clone(), t).path("/api/v1/channels/chat:a/presence_stats"), 200).await;
    assert_eq!(st, json!({"clients": 0, "users": 0}));
    c.check(&node, req(get.clone(), t).path("/api/v1/channels/bad%20name/presence_stats"), 400).await;
    c.check(&node, req(get.clone(), t).path("/api/v1/channels/quiet:a/presence_stats"), 403).await;
    c.check(&node, req(get.clone(), t).path("/api/v1/channels/chat:a/presence_stats").auth(None), 401).await;

    // disconnect
    let t = "/api/v1/disconnect";
    c.check(&node, req(post.clone(), t).json(json!({"user": "nobody"})), 200).await;
    c.check(&node, req(post.clone(), t).json(json!({"user": ""})), 400).await;
    c.check(&node, req(post.clone(), t).json(json!({"user": "x".repeat(5000)})), 413).await;
    c.check(&node, req(post.clone(), t).auth(None).json(json!({"user": "u"})), 401).await;

    c.check(&node, req(post.clone(), t).json(json!({"user": "u", "code": 1000})), 400).await;
    c.check(&node, req(post.clone(), t).json(json!({"user": "u", "code": 1012, "reason": "moving"})), 200).await;

    // server-side control
    for t in ["/api/v1/subscribe", "/api/v1/unsubscribe"] {
        c.check(&node, req(post.clone(), t).json(json!({"user": "nobody", "channel": "chat:a"})), 200).await;
        c.check(&node, req(post.clone(), t).json(json!({"user": "u", "channel": "bad name!"})), 400).await;
        c.check(&node, req(post.clone(), t).json(json!({"user": "", "channel": "c"})), 400).await;
        c.check(&node, req(post.clone(), t).json(json!({"user": "x".repeat(5000), "channel": "c"})), 413).await;
        c.check(&node, req(post.clone(), t).auth(None).json(json!({"user": "u", "channel": "c"})), 401).await;
    }
    let t = "/api/v1/users/{user}/invalidate";
    c.check(&node, req(post.clone(), t).path("/api/v1/users/nobody/invalidate").raw(""), 200).await;
    c.check(&node, req(post.clone(), t).path("/api/v1/users/nobody/invalidate").json(json!({"before": 1})), 200).await;
    c.check(&node, req(post.clone(), t).path("/api/v1/users/nobody/invalidate").json(json!({"before": "x"})), 400)
        .await;
    c.check(&node, req(post.clone(), t).path("/api/v1/users/%FF/invalidate").json(json!({})), 400).await;
    let huge = json!({"before": 1, "pad": "x".repeat(5000)});
    c.check(&node, req(post.clone(), t).path("/api/v1/users/nobody/invalidate").json(huge), 413).await;
    c.check(&node, req(post.clone(), t).path("/api/v1/users/nobody/invalidate").auth(None).json(json!({})), 401).await;
    let t = "/api/v1/users/{user}/connections";
    let conns = c.check(&node, req(get.clone(), t).path("/api/v1/users/nobody/connections"), 200).await;
    assert_eq!(conns, json!({"connections": []}));
    c.check(&node, req(get.clone(), t).path("/api/v1/users/%FF/connections"), 400).await;
    c.check(&node, req(get.clone(), t).path("/api/v1/users/nobody/connections").auth(None), 401).await;

    // info
    let t = "/api/v1/info";
    let info = c.check(&node, req(get.clone(), t), 200).await;
    assert_eq!(info["nodes"][0]["node"], "test-node");
    assert_eq!(info["nodes"][0]["ready"], true, "a serving node with its broker is ready");
    c.check(&node, req(get.clone(), t).auth(None), 401).await;

    // The cluster's channels and history deletion (issue 19, part D).
    let t = "/api/v1/channels";
    let l = c.check(&node, req(get.clone(), t).path("/api/v1/channels?prefix=chat:&limit=10"), 200).await;
    assert_eq!(l["cursor"], Value::Null);
    c.check(&node, req(get.clone(), t).path("/api/v1/channels?limit=0"), 400).await;
    c.check(&node, req(get.clone(), t).path("/api/v1/channels?prefix=bad%20name"), 400).await;
    c.check(&node, req(get.clone(), t).auth(None), 401).await;
    c.check(&node, req(get.clone(), t).header("origin", "https://evil.example"), 403).await;
    let t = "/api/v1/channels/{channel}/history";
    let del = Method::DELETE;
    let d = c.check(&node, req(del.clone(), t).path("/api/v1/channels/chat:a/history"), 200).await;
    assert_eq!(d, json!({"removed": true}));
    c.check(&node, req(del.clone(), t).path("/api/v1/channels/bad%20name/history"), 400).await;
    c.check(&node, req(del.clone(), t).path("/api/v1/channels/chat:a/history").auth(None), 401).await;
    let foreign = req(del.clone(), t).path("/api/v1/channels/chat:a/history").header("origin", "null");
    c.check(&node, foreign, 403).await;

    // A method a described path does not take: 405 in the declared shape, with `Allow`.
    for (path, item) in spec["paths"].as_object().unwrap() {
        let declared: Vec<&String> = item
            .as_object()
            .unwrap()
            .iter()
            .filter(|(_, op)| op["responses"].get("405").is_some())
            .map(|(m, _)| m)
            .collect();
        if declared.is_empty() {
            continue;
        }
        let sent = path.replace("{channel}", "chat:a").replace("{user}", "u1");
        let r = c.http.put(node.url(&sent)).bearer_auth(API_KEY).send().await.unwrap();
        assert_eq!(r.status().as_u16(), 405, "PUT {sent}");
        let allow = r.headers().get("allow").and_then(|v| v.to_str().ok()).unwrap_or_default().to_ascii_lowercase();
        let body: Value = r.json().await.unwrap();
        assert_eq!(body["error"], "method_not_allowed", "PUT {sent}: {body}");
        for method in declared {
            assert!(allow.contains(method.as_str()), "PUT {sent}: Allow {allow:?} lacks {method}");
            c.exercised.insert((path.clone(), method.clone(), 405));
        }
    }

    // operations
    c.check(&node, req(get.clone(), "/healthz").auth(None), 200).await;
    c.check(&node, req(get.clone(), "/readyz").auth(None), 200).await;
    c.check(&node, req(get.clone(), "/metrics").auth(None), 200).await;

    // The WebSocket handshake's answers.
    let t = "/ws";
    let token = node.token("u1", &["chat:*"], &[]);
    let upgrade = |r: Req<'static>| {
        r.header("connection", "Upgrade")
            .header("upgrade", "websocket")
            .header("sec-websocket-key", "dGhlIHNhbXBsZSBub25jZQ==")
    };
    let ws = || req(Method::GET, "/ws").auth(None);
    c.check(&node, upgrade(ws()).header("sec-websocket-version", "13"), 401).await;
    c.check(&node, upgrade(ws()).header("sec-websocket-version", "13").header("authorization", "Bearer nope"), 401)
        .await;
    c.check(&node, ws().header("authorization", format!("Bearer {token}")), 400).await;
    c.check(&node, upgrade(ws()).header("sec-websocket-version", "12").path(format!("/ws?token={token}")), 426).await;
    c.check(&node, upgrade(ws()).header("sec-websocket-version", "13").header("origin", "https://evil.example"), 403)
        .await;
    let held = node.client(&token).await; // 101 (the harness asserts the welcome)
    c.exercised.insert((t.to_owned(), "get".to_owned(), 101));
    c.check(&node, upgrade(ws()).header("sec-websocket-version", "13"), 503).await; // max_connections 1
    drop(held);

    // Rate limits: API key and handshakes.
    let limited =
        Server::start(&["--api-rate", "1", "--api-burst", "1", "--handshake-rate", "1", "--handshake-burst", "1"])
            .await;
    c.check(&limited, req(get.clone(), "/api/v1/info"), 200).await;
    c.check(&limited, req(post.clone(), "/api/v1/publish").json(json!({"channel": "c", "data": 1})), 429).await;
    c.check(&limited, req(post.clone(), "/api/v1/broadcast").json(json!({"channels": ["c"], "data": 1})), 429).await;
    let h = "/api/v1/channels/{channel}/history";
    c.check(&limited, req(get.clone(), h).path("/api/v1/channels/c/history"), 429).await;
    let p = "/api/v1/channels/{channel}/presence";
    c.check(&limited, req(get.clone(), p).path("/api/v1/channels/c/presence"), 429).await;
    let ps = "/api/v1/channels/{channel}/presence_stats";
    c.check(&limited, req(get.clone(), ps).path("/api/v1/channels/c/presence_stats"), 429).await;
    c.check(&limited, req(post.clone(), "/api/v1/disconnect").json(json!({"user": "u"})), 429).await;
    c.check(&limited, req(get.clone(), "/api/v1/info"), 429).await;
    c.check(&limited, req(get.clone(), "/api/v1/channels"), 429).await;
    c.check(&limited, req(Method::DELETE, h).path("/api/v1/channels/c/history"), 429).await;
    let control = [
        (post.clone(), "/api/v1/subscribe", "/api/v1/subscribe"),
        (post.clone(), "/api/v1/unsubscribe", "/api/v1/unsubscribe"),
        (post.clone(), "/api/v1/users/{user}/invalidate", "/api/v1/users/u/invalidate"),
        (get.clone(), "/api/v1/users/{user}/connections", "/api/v1/users/u/connections"),
    ];
    for (m, t, sent) in &control {
        let r = req(m.clone(), t).path(*sent);
        let r = if *m == post { r.json(json!({"user": "u", "channel": "c"})) } else { r };
        c.check(&limited, r, 429).await;
    }
    c.check(&limited, ws(), 401).await;
    c.check(&limited, ws(), 429).await;

    // The broker hanging (SIGSTOP): every Redis call waits its 2 s deadline; a publish's outcome
    // is then unknown (504); a broadcast's publishes run at once, so it answers within the
    // request limit, every channel `outcome_unknown`.
    let mut redis = redis_support::RedisServer::start();
    let url = redis.url();
    let clustered = Server::start(&["--redis-url", &url]).await;
    c.check(&clustered, req(get.clone(), "/readyz").auth(None), 200).await;
    redis.pause(true);
    // A publish Redis may have received but did not confirm: 504 outcome_unknown.
    let body = json!({"channel": "c", "data": 1, "idempotency_key": "k"});
    let e = c.check(&clustered, req(post.clone(), "/api/v1/publish").json(body), 504).await;
    assert_eq!(e["error"], "outcome_unknown");
    let six = json!({"channels": ["a", "b", "c", "d", "e", "f"], "data": 1});
    c.check(&clustered, req(post.clone(), "/api/v1/broadcast").json(six), 200).await;
    redis.pause(false);

    // The broker gone: 503 unavailable.
    redis.kill();
    crier_testkit::until("readyz turning 503 without Redis", async || {
        reqwest::get(clustered.url("/readyz")).await.map(|r| r.status().as_u16()).unwrap_or(0) == 503
    })
    .await;
    c.check(&clustered, req(get.clone(), "/readyz").auth(None), 503).await;
    c.check(&clustered, req(post.clone(), "/api/v1/publish").json(json!({"channel": "c", "data": 1})), 503).await;
    let b = c
        .check(&clustered, req(post.clone(), "/api/v1/broadcast").json(json!({"channels": ["c"], "data": 1})), 200)
        .await;
    assert_eq!(b["results"][0]["error"], "unavailable");
    c.check(&clustered, req(get.clone(), h).path("/api/v1/channels/c/history"), 503).await;
    c.check(&clustered, req(get.clone(), p).path("/api/v1/channels/c/presence"), 503).await;
    c.check(&clustered, req(get.clone(), ps).path("/api/v1/channels/c/presence_stats"), 503).await;
    c.check(&clustered, req(post.clone(), "/api/v1/disconnect").json(json!({"user": "u"})), 503).await;
    c.check(&clustered, req(get.clone(), "/api/v1/info"), 503).await;
    c.check(&clustered, req(get.clone(), "/api/v1/channels"), 503).await;
    c.check(&clustered, req(Method::DELETE, h).path("/api/v1/channels/c/history"), 503).await;
    for (m, t, sent) in &control {
        let r = req(m.clone(), t).path(*sent);
        let r = if *m == post { r.json(json!({"user": "u", "channel": "c"})) } else { r };
        c.check(&clustered, r, 503).await;
    }

    // Every declared status was seen (or is listed as not provokable).
    let mut missing = Vec::new();
    for (path, item) in spec["paths"].as_object().unwrap() {
        for (method, op) in item.as_object().unwrap() {
            for status in op["responses"].as_object().unwrap().keys() {
                let status: u16 = status.parse().unwrap();
                let skipped = NOT_PROVOKED.iter().any(|(p, m, s, _)| p == path && m == method && *s == status);
                if !skipped && !c.exercised.contains(&(path.clone(), method.clone(), status)) {
                    missing.push(format!("{method} {path} {status}"));
                }
            }
        }
    }
    assert!(missing.is_empty(), "declared but never exercised: {missing:?}");
}

/// What carries the example, its schema, and the example if there is one.
type Example<'a> = (String, &'a Value, Option<&'a Value>);

/// The parts of an operation that carry an example: its parameters, its request body and every
/// response content.
fn examples<'a>(spec: &'a Value, path: &str, method: &str, op: &'a Value) -> Vec<Example<'a>> {
    let mut out = Vec::new();
    for p in op["parameters"].as_array().into_iter().flatten() {
        out.push((format!("{method} {path}: parameter {}", p["name"]), &p["schema"], p.get("example")));
    }
    for (media, mt) in op["requestBody"]["content"].as_object().into_iter().flatten() {
        out.push((format!("{method} {path}: request body ({media})"), &mt["schema"], mt.get("example")));
    }
    for (status, r) in op["responses"].as_object().into_iter().flatten() {
        for (media, mt) in deref(spec, r)["content"].as_object().into_iter().flatten() {
            out.push((format!("{method} {path}: {status} ({media})"), &mt["schema"], mt.get("example")));
        }
    }
    out
}

#[test]
fn every_operation_has_examples_that_match_its_schemas() {
    let spec = spec();
    // A relative server: the node that serves the description (GET /api/v1/openapi.json), not
    // an address that is right on one machine only.
    let servers = spec["servers"].as_array().expect("servers");
    assert!(!servers.is_empty());
    for s in servers {
        assert!(s["url"].as_str().is_some_and(|u| u.starts_with('/')), "server {s} is not relative");
    }
    let mut checked = 0;
    for (path, item) in spec["paths"].as_object().unwrap() {
        for (method, op) in item.as_object().unwrap() {
            for (what, schema, example) in examples(&spec, path, method, op) {
                let example = example.unwrap_or_else(|| panic!("{what}: no example"));
                let root = json!({"components": spec["components"], "allOf": [schema]});
                let validator = jsonschema::draft202012::new(&root).unwrap_or_else(|e| panic!("{what}: schema: {e}"));
                let errors: Vec<String> = validator.iter_errors(example).map(|e| e.to_string()).collect();
                assert!(errors.is_empty(), "{what}: the example does not match the schema: {errors:?}\n{example}");
                checked += 1;
            }
        }
    }
    assert!(checked >= 50, "checked {checked} examples");
}

/// Percent-encodes a path segment or query value (`/` too: `chat/a` → `chat%2Fa`).
fn encode(v: &Value) -> String {
    let s = match v {
        Value::String(s) => s.clone(),
        other => other.to_string(),
    };
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' | b':' | b'@' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// Every `/api/` operation, sent as its examples say (path and query parameters, body), is
/// answered with its 200, and the answer matches the description: a reader can paste them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_request_examples_are_answered_with_200() {
    let spec = spec();
    let mut c = Checker { spec: spec.clone(), http: reqwest::Client::new(), exercised: HashSet::new() };
    let node = Server::start(&[]).await;
    let mut sent = 0;
    for (path, item) in spec["paths"].as_object().unwrap() {
        if !path.starts_with("/api/") {
            continue;
        }
        for (method, op) in item.as_object().unwrap() {
            if op["responses"].get("200").is_none() {
                continue;
            }
            let mut url = path.clone();
            let mut query = Vec::new();
            for p in op["parameters"].as_array().into_iter().flatten() {
                let name = p["name"].as_str().unwrap();
                let example = p.get("example").unwrap_or_else(|| panic!("{method} {path}: {name} has no example"));
                match p["in"].as_str() {
                    Some("path") => url = url.replace(&format!("{{{name}}}"), &encode(example)),
                    Some("query") => query.push(format!("{name}={}", encode(example))),
                    other => panic!("{method} {path}: parameter {name} in {other:?}"),
                }
            }
            if !query.is_empty() {
                url = format!("{url}?{}", query.join("&"));
            }
            let m = Method::from_bytes(method.to_ascii_uppercase().as_bytes()).unwrap();
            let open = op.get("security").is_some_and(|s| s.as_array().is_some_and(|a| a.is_empty()));
            let mut r = req(m, path).path(url).auth(if open { None } else { Some(API_KEY) });
            if let Some(body) = op["requestBody"]["content"]["application/json"].get("example") {
                r = r.json(body.clone());
            }
            c.check(&node, r, 200).await;
            sent += 1;
        }
    }
    assert!(sent >= 7, "sent {sent} examples");
}
