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
/// The same protocol in MessagePack binary frames (docs/protocol.md, *MessagePack*).
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
    if !key_valid(key.as_bytes()) {
        return Err((StatusCode::BAD_REQUEST, "Sec-WebSocket-Key must be the base64 of 16 bytes"));
    }
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

/// An accepted permessage-deflate offer (RFC 7692): no context takeover either way, so each
/// message is compressed once per node (and server window) and shared, and no connection keeps a
/// compression window (RFC 7692 §7.1.1: a server may ask for `client_no_context_takeover` even when the
/// client did not offer it). The client's own window (`client_max_window_bits`) needs nothing:
/// crier inflates with the full window, which reads any smaller one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Deflate {
    /// The window crier compresses with: the offer's `server_max_window_bits` (8..=15), else 15.
    pub server_window_bits: u8,
    /// The offer had `server_max_window_bits`: the response must carry it (RFC 7692 §7.1.2.1).
    echo_server_window: bool,
}

impl Deflate {
    /// The response's `Sec-WebSocket-Extensions` value.
    pub fn response(self) -> &'static str {
        if self.echo_server_window {
            DEFLATE_RESPONSES[usize::from(self.server_window_bits.clamp(8, 15)) - 7]
        } else {
            DEFLATE_RESPONSES[0]
        }
    }
}

/// What crier answers to an accepted offer: without `server_max_window_bits`, then with it, 8..=15.
const DEFLATE_RESPONSES: [&str; 9] = [
    "permessage-deflate; server_no_context_takeover; client_no_context_takeover",
    "permessage-deflate; server_no_context_takeover; client_no_context_takeover; server_max_window_bits=8",
    "permessage-deflate; server_no_context_takeover; client_no_context_takeover; server_max_window_bits=9",
    "permessage-deflate; server_no_context_takeover; client_no_context_takeover; server_max_window_bits=10",
    "permessage-deflate; server_no_context_takeover; client_no_context_takeover; server_max_window_bits=11",
    "permessage-deflate; server_no_context_takeover; client_no_context_takeover; server_max_window_bits=12",
    "permessage-deflate; server_no_context_takeover; client_no_context_takeover; server_max_window_bits=13",
    "permessage-deflate; server_no_context_takeover; client_no_context_takeover; server_max_window_bits=14",
    "permessage-deflate; server_no_context_takeover; client_no_context_takeover; server_max_window_bits=15",
];

/// The permessage-deflate offer crier accepts, if any (RFC 7692 §7.1). An offer is declined —
/// the next one is considered, and without one the connection goes uncompressed — when it has
/// an unknown or repeated parameter or a parameter value that is not allowed (window bits
/// outside 8..=15, `server_max_window_bits` without a value). Several offers: the first
/// acceptable one counts.
pub fn deflate_offered(headers: &HeaderMap) -> Option<Deflate> {
    headers
        .get_all(header::SEC_WEBSOCKET_EXTENSIONS)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .find_map(acceptable_deflate_offer)
}

fn acceptable_deflate_offer(offer: &str) -> Option<Deflate> {
    let mut parts = offer.split(';').map(str::trim);
    if !parts.next().is_some_and(|name| name.eq_ignore_ascii_case("permessage-deflate")) {
        return None;
    }
    let mut accepted = Deflate { server_window_bits: 15, echo_server_window: false };
    let mut seen: Vec<String> = Vec::new();
    for param in parts {
        let (name, value) = match param.split_once('=') {
            Some((n, v)) => (n.trim().to_ascii_lowercase(), Some(v.trim().trim_matches('"'))),
            None => (param.to_ascii_lowercase(), None),
        };
        if seen.contains(&name) {
            tracing::debug!(offer, "permessage-deflate offer declined: a repeated parameter");
            return None;
        }
        let window_bits = |v: Option<&str>| v.and_then(|v| v.parse::<u8>().ok()).filter(|b| (8..=15).contains(b));
        let ok = match (name.as_str(), value) {
            ("server_no_context_takeover" | "client_no_context_takeover", None) => true,
            ("server_max_window_bits", v) => match window_bits(v) {
                Some(bits) => {
                    accepted = Deflate { server_window_bits: bits, echo_server_window: true };
                    true
                }
                None => false,
            },
            ("client_max_window_bits", None) => true,
            ("client_max_window_bits", v) => window_bits(v).is_some(),
            _ => false,
        };
        if !ok {
            tracing::debug!(offer, "permessage-deflate offer declined: a parameter crier cannot accept");
            return None;
        }
        seen.push(name);
    }
    Some(accepted)
}

/// The 101 response.
pub fn switching_protocols(accept: HeaderValue, protocol: Option<&'static str>, deflate: Option<Deflate>) -> Response {
    let mut response = Response::new(Body::empty());
    *response.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
    let h = response.headers_mut();
    h.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    h.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
    h.insert(header::SEC_WEBSOCKET_ACCEPT, accept);
    if let Some(p) = protocol {
        h.insert(header::SEC_WEBSOCKET_PROTOCOL, HeaderValue::from_static(p));
    }
    if let Some(d) = deflate {
        h.insert(header::SEC_WEBSOCKET_EXTENSIONS, HeaderValue::from_static(d.response()));
    }
    response
}

/// RFC 6455 §4.2.1: the key is a base64-encoded 16-byte value (24 characters, padded).
fn key_valid(key: &[u8]) -> bool {
    key.len() == 24 && base64::engine::general_purpose::STANDARD.decode(key).is_ok_and(|k| k.len() == 16)
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

    /// What [`deflate_offered`] makes of this `Sec-WebSocket-Extensions` value.
    fn offer(v: &str) -> Option<Deflate> {
        let mut h = HeaderMap::new();
        h.insert(header::SEC_WEBSOCKET_EXTENSIONS, HeaderValue::from_str(v).unwrap_or(HeaderValue::from_static("")));
        deflate_offered(&h)
    }

    #[test]
    fn deflate_offers_real_clients_send_are_accepted_and_bogus_ones_declined() {
        let offered = |v: &str| offer(v).is_some();
        // Chromium, Python websockets, ws (Node), Firefox.
        assert!(offered("permessage-deflate; client_max_window_bits"));
        assert!(offered("permessage-deflate; server_max_window_bits=15; client_max_window_bits=15"));
        assert!(offered("permessage-deflate; client_no_context_takeover; server_no_context_takeover"));
        assert!(offered("PerMessage-Deflate"));
        assert!(offered("x-webkit-deflate-frame, permessage-deflate; client_max_window_bits=\"10\""));
        // A bad first offer, a good second one.
        assert!(offered("permessage-deflate; bogus, permessage-deflate"));
        for bogus in [
            "permessage-deflate; bogus",
            "permessage-deflate; server_max_window_bits=7",
            "permessage-deflate; server_max_window_bits",
            "permessage-deflate; client_max_window_bits=16",
            "permessage-deflate; client_max_window_bits=abc",
            "permessage-deflate; server_no_context_takeover=1",
            "permessage-deflate; client_max_window_bits; client_max_window_bits",
            "deflate-frame",
            "",
        ] {
            assert!(!offered(bogus), "{bogus:?} declined");
        }
    }

    #[test]
    fn server_max_window_bits_is_honoured_and_echoed() {
        let answer = |v: &str| offer(v).map(|d| (d.server_window_bits, d.response()));
        let base = "permessage-deflate; server_no_context_takeover; client_no_context_takeover";
        assert_eq!(answer("permessage-deflate; client_max_window_bits"), Some((15, base)));
        for bits in 8..=15u8 {
            let want = format!("{base}; server_max_window_bits={bits}");
            assert_eq!(
                answer(&format!("permessage-deflate; server_max_window_bits={bits}")),
                Some((bits, want.as_str()))
            );
        }
        // Python websockets' server-style offer, Autobahn's 13.7 (first offer taken).
        assert_eq!(
            answer("permessage-deflate; server_max_window_bits=12; client_max_window_bits=12").map(|a| a.0),
            Some(12)
        );
        assert_eq!(
            answer("permessage-deflate; client_no_context_takeover; server_max_window_bits=9, permessage-deflate")
                .map(|a| a.0),
            Some(9)
        );
        assert_eq!(answer("permessage-deflate; server_max_window_bits=16, permessage-deflate"), Some((15, base)));
    }

    #[test]
    fn keys_must_be_the_base64_of_16_bytes() {
        assert!(key_valid(b"dGhlIHNhbXBsZSBub25jZQ=="));
        for bad in [
            &b"x"[..],
            b"",
            b"dGhlIHNhbXBsZSBub25jZQ",
            b"dGhlIHNhbXBsZSBub25jZQ=",
            b"dGhlIHNhbXBsZSBub25j",
            b"dGhlIHNhbXBsZSBub25jZQ==dGhl",
            b"dGhlIHNhbXBsZSBub25jZ!==",
            b"AAAAAAAAAAAAAAAAAAAAAAAA",
        ] {
            assert!(!key_valid(bad), "{:?}", String::from_utf8_lossy(bad));
        }
    }

    #[test]
    fn accept_key_matches_rfc_6455() {
        assert_eq!(accept_key(b"dGhlIHNhbXBsZSBub25jZQ=="), "s3pPLMBiTxaQ9kYGzzhZRbK+xOo=");
    }
}
