//! The WebSocket upgrade's own checks (RFC 6455 §4.2.1), the subprotocol crier answers, and the
//! 101 response.

use axum::body::Body;
use axum::extract::Request;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::Response;
use base64::Engine;
use crier_protocol::Encoding;
use hyper::upgrade::OnUpgrade;
use sha1::{Digest, Sha1};

/// The subprotocol crier speaks; selected whenever the client offers it (the token
/// subprotocol `crier.bearer.<jwt>` is never echoed).
pub const SUBPROTOCOL: &str = "crier.v1";
/// The same protocol in MessagePack binary frames (the contract's §11).
pub const SUBPROTOCOL_MSGPACK: &str = "crier.v1.msgpack";

/// The `Sec-WebSocket-Accept` value and the connection's upgrade handle, or the status and
/// message of a `bad_upgrade` rejection.
pub fn check(req: &mut Request) -> Result<(HeaderValue, OnUpgrade), (StatusCode, &'static str)> {
    let headers = req.headers();
    let has_token = |name: header::HeaderName, token: &str| {
        headers
            .get_all(name)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .any(|t| t.trim().eq_ignore_ascii_case(token))
    };
    if !has_token(header::CONNECTION, "upgrade") {
        return Err((StatusCode::BAD_REQUEST, "Connection header did not include 'upgrade'"));
    }
    if !has_token(header::UPGRADE, "websocket") {
        return Err((StatusCode::BAD_REQUEST, "Upgrade header did not include 'websocket'"));
    }
    if headers.get(header::SEC_WEBSOCKET_VERSION).is_none_or(|v| v.as_bytes() != b"13") {
        return Err((StatusCode::UPGRADE_REQUIRED, "Sec-WebSocket-Version must be 13"));
    }
    let Some(key) = headers.get(header::SEC_WEBSOCKET_KEY) else {
        return Err((StatusCode::BAD_REQUEST, "Sec-WebSocket-Key header missing"));
    };
    let accept = HeaderValue::from_str(&accept_key(key.as_bytes()))
        .map_err(|_| (StatusCode::BAD_REQUEST, "invalid Sec-WebSocket-Key"))?;
    match req.extensions_mut().remove::<OnUpgrade>() {
        Some(on_upgrade) => Ok((accept, on_upgrade)),
        None => Err((StatusCode::UPGRADE_REQUIRED, "the connection cannot be upgraded")),
    }
}

/// The subprotocol to answer and the encoding it means: the first of crier's that the client
/// offers (`crier.v1` → JSON, `crier.v1.msgpack` → MessagePack); none offered → no subprotocol,
/// JSON.
pub fn offered_subprotocol(headers: &HeaderMap) -> (Option<&'static str>, Encoding) {
    headers
        .get_all(header::SEC_WEBSOCKET_PROTOCOL)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .find_map(|p| match p.trim() {
            SUBPROTOCOL => Some((Some(SUBPROTOCOL), Encoding::Json)),
            SUBPROTOCOL_MSGPACK => Some((Some(SUBPROTOCOL_MSGPACK), Encoding::MsgPack)),
            _ => None,
        })
        .unwrap_or((None, Encoding::Json))
}

/// The 101 response.
pub fn switching_protocols(accept: HeaderValue, protocol: Option<&'static str>) -> Response {
    let mut response = Response::new(Body::empty());
    *response.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
    let h = response.headers_mut();
    h.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    h.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
    h.insert(header::SEC_WEBSOCKET_ACCEPT, accept);
    if let Some(p) = protocol {
        h.insert(header::SEC_WEBSOCKET_PROTOCOL, HeaderValue::from_static(p));
    }
    response
}

/// `Sec-WebSocket-Accept` for a `Sec-WebSocket-Key` (RFC 6455 §4.2.2).
fn accept_key(key: &[u8]) -> String {
    let mut sha1 = Sha1::new();
    sha1.update(key);
    sha1.update(b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11");
    base64::engine::general_purpose::STANDARD.encode(sha1.finalize())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accept_key_matches_rfc_6455() {
        assert_eq!(accept_key(b"dGhlIHNhbXBsZSBub25jZQ=="), "s3pPLMBiTxaQ9kYGzzhZRbK+xOo=");
    }
}
