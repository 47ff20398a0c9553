//! The admin page (issue 19, part D) and what it needs from the node.
//!
//! `GET /admin` (setting `admin`; 404 when off) serves one HTML page and `GET /admin/admin.js`
//! its ES module, both compiled in (`include_str!`, no build step). The page is built on the
//! REST API only: it signs in with an API key that it keeps in a JavaScript variable (never in
//! a URL, a cookie or storage: reloading the page signs out) and sends it as
//! `Authorization: Bearer`.
//!
//! Browsers: the REST API answers no CORS headers, so a page of another origin cannot read its
//! answers nor send the `Authorization` header (the preflight fails); [`same_origin_only`] also
//! refuses, with 403 `forbidden`, every API request whose `Origin` header names another host
//! than the one the request was sent to — a browser calling from any page but this node's own.
//! Server-to-server callers send no `Origin` and are not affected. The page itself is served
//! with a Content-Security-Policy that allows only its own scripts and calls to its own origin,
//! and may not be framed (`frame-ancestors 'none'`).
//!
//! Also here: the node's details for `/api/v1/info` (uptime, connections by transport,
//! resident memory).

use axum::extract::{Request, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use crate::error::ApiError;
use crate::metrics as m;
use crate::state::AppState;

const PAGE: &str = include_str!("../assets/admin/index.html");
const SCRIPT: &str = include_str!("../assets/admin/admin.js");

/// The page's security headers: its own scripts, styles and API calls only; never framed.
const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self' 'unsafe-inline'; connect-src 'self'; \
                   img-src 'self' data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'";

/// `GET /admin`: the page, when the `admin` setting is on.
pub async fn page(State(st): State<AppState>) -> Response {
    if !st.config.admin {
        return crate::api::not_found().await.into_response();
    }
    served("text/html; charset=utf-8", PAGE)
}

/// `GET /admin/admin.js`: the page's module.
pub async fn script(State(st): State<AppState>) -> Response {
    if !st.config.admin {
        return crate::api::not_found().await.into_response();
    }
    served("text/javascript; charset=utf-8", SCRIPT)
}

fn served(content_type: &'static str, body: &'static str) -> Response {
    (
        [
            (header::CONTENT_TYPE, content_type),
            (header::CONTENT_SECURITY_POLICY, CSP),
            (header::X_FRAME_OPTIONS, "DENY"),
            (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
            (header::REFERRER_POLICY, "no-referrer"),
            (header::CACHE_CONTROL, "no-store"),
        ],
        body,
    )
        .into_response()
}

/// Middleware on the REST API: a request carrying an `Origin` (a browser's) is refused with 403
/// `forbidden` unless that origin's host and port are the ones the request was sent to (the
/// admin page, served by the node itself, calling its own node) or the origin is one of
/// `allowed_origins` (the same list the handshake checks: a browser app that was allowed to call
/// the API before keeps working). Requests without `Origin` (servers, curl) pass.
pub async fn same_origin_only(State(st): State<AppState>, req: Request, next: Next) -> Response {
    if let Some(origin) = req.headers().get(header::ORIGIN)
        && let origin = origin.to_str().unwrap_or("")
        && !same_origin(origin, req.headers())
        && !st.origins.allows(origin)
    {
        metrics::counter!(m::HTTP_REJECTIONS, "code" => "forbidden").increment(1);
        crate::refusal::record(
            crate::refusal::Surface::Api,
            "cross_origin",
            &format!("{} {} from a browser page of another origin", req.method(), req.uri().path()),
            "the REST API is server-to-server; browsers may call it only from this node's own admin page",
        );
        return ApiError::new(
            StatusCode::FORBIDDEN,
            "forbidden",
            "browser requests to the REST API are only allowed from this node's own pages (the admin page)",
        )
        .into_response();
    }
    next.run(req).await
}

/// Whether `origin` (`scheme://host[:port]`) names the host (and port) of the request's `Host`
/// header. The scheme is not compared: behind a TLS-terminating proxy the node sees `http`
/// while the page's origin is `https`. Default ports are equal to none.
fn same_origin(origin: &str, headers: &HeaderMap) -> bool {
    let Some(host) = headers.get(header::HOST).and_then(|h| h.to_str().ok()) else {
        return false;
    };
    let Some((scheme, authority)) = origin.split_once("://") else {
        return false;
    };
    let default_port = match scheme.to_ascii_lowercase().as_str() {
        "http" => ":80",
        "https" => ":443",
        _ => return false,
    };
    let norm = |a: &str| {
        let a = a.trim().to_ascii_lowercase();
        match a.strip_suffix(default_port) {
            Some(bare) => bare.to_owned(),
            None => a,
        }
    };
    !authority.is_empty() && !authority.contains('/') && norm(authority) == norm(host)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn host(h: &str) -> HeaderMap {
        let mut m = HeaderMap::new();
        m.insert(header::HOST, h.parse().unwrap_or_else(|_| panic!("header {h}")));
        m
    }

    #[test]
    fn only_the_requests_own_host_is_same_origin() {
        assert!(same_origin("http://127.0.0.1:8080", &host("127.0.0.1:8080")));
        assert!(same_origin("https://crier.example.com", &host("crier.example.com")));
        assert!(same_origin("https://crier.example.com:443", &host("Crier.Example.com")));
        assert!(same_origin("http://crier.example.com", &host("crier.example.com:80")));
        assert!(!same_origin("http://127.0.0.1:8081", &host("127.0.0.1:8080")));
        assert!(!same_origin("https://evil.example", &host("crier.example.com")));
        assert!(!same_origin("null", &host("crier.example.com")));
        assert!(!same_origin("http://crier.example.com", &HeaderMap::new()));
        assert!(!same_origin("ftp://crier.example.com", &host("crier.example.com")));
        assert!(!same_origin("https://crier.example.com/x", &host("crier.example.com")));
    }
}
