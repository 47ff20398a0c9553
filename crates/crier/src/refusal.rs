//! Refusals a person can diagnose: every refused handshake (WebSocket and SSE) and refused REST
//! call is logged with the check that failed and what to change, and counted in
//! `crier_refusals_total{surface, reason}`.
//!
//! The log is rate limited per (surface, reason): the first refusal of a reason is logged at
//! once, later ones within [`LOG_WINDOW`] are only counted, and the next line logged for that
//! reason says how many were suppressed. A refusal never logs the token or the API key (the
//! details come from the checks, which never include them); client-chosen text such as an
//! `Origin` is quoted, escaped and truncated.

use std::collections::HashMap;
use std::sync::{LazyLock, Mutex};
use std::time::{Duration, Instant};

use crate::metrics as m;

/// At most one log line per reason per window.
pub const LOG_WINDOW: Duration = Duration::from_secs(5);

/// Where the refusal happened (the `surface` label).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Surface {
    /// A WebSocket or SSE handshake (the log line's span names the path).
    Handshake,
    /// A REST API call.
    Api,
}

impl Surface {
    fn as_str(self) -> &'static str {
        match self {
            Surface::Handshake => "handshake",
            Surface::Api => "api",
        }
    }
}

#[derive(Default)]
struct Window {
    last: Option<Instant>,
    suppressed: u64,
}

static WINDOWS: LazyLock<Mutex<HashMap<(Surface, &'static str), Window>>> = LazyLock::new(Default::default);

/// Whether to log now, and how many were suppressed since the last line.
fn admit_line(surface: Surface, reason: &'static str, now: Instant) -> Option<u64> {
    let mut windows = WINDOWS.lock().unwrap_or_else(|p| p.into_inner());
    let w = windows.entry((surface, reason)).or_default();
    match w.last {
        Some(last) if now.duration_since(last) < LOG_WINDOW => {
            w.suppressed += 1;
            None
        }
        _ => {
            w.last = Some(now);
            Some(std::mem::take(&mut w.suppressed))
        }
    }
}

/// Counts a refusal and logs it (rate limited). `reason` is one of a small fixed set (a metric
/// label); `detail` says which check failed, `fix` what to change. Server-side trouble (the
/// node is full, draining, the broker is down) and rate limits are INFO; everything a client or
/// its configuration got wrong is WARN.
pub fn record(surface: Surface, reason: &'static str, detail: &str, fix: &str) {
    metrics::counter!(m::REFUSALS, "surface" => surface.as_str(), "reason" => reason).increment(1);
    let Some(suppressed) = admit_line(surface, reason, Instant::now()) else {
        return;
    };
    let what = match surface {
        Surface::Handshake => "handshake refused",
        Surface::Api => "API request refused",
    };
    let more = if suppressed > 0 { format!(" ({suppressed} more suppressed)") } else { String::new() };
    let sep = if fix.is_empty() { "" } else { "; " };
    // The connect proxy's refusals are the application's decisions; its failures, server-side trouble.
    if matches!(
        reason,
        "rate_limited"
            | "unavailable"
            | "node_full"
            | "draining"
            | "too_many_connections"
            | "proxy_refused"
            | "proxy_unavailable"
    ) {
        tracing::info!(reason, "{what}: {detail}{sep}{fix}{more}");
    } else {
        tracing::warn!(reason, "{what}: {detail}{sep}{fix}{more}");
    }
}

/// Client-chosen text for a log line or an error body: quoted, escaped, at most 100 chars.
pub fn quote(text: &str) -> String {
    let mut short: String = text.chars().take(100).collect();
    if short.len() < text.len() {
        short.push('…');
    }
    format!("{short:?}")
}

/// The finer reason of a token the verifier refused (a fixed set: a metric label).
pub fn token_reason(message: &str) -> &'static str {
    if message.starts_with("token expired") {
        "token_expired"
    } else if message.starts_with("token not yet valid") || message.starts_with("token issued in the future") {
        "token_not_yet_valid"
    } else if message.starts_with("signature invalid") {
        "token_signature_invalid"
    } else if message.starts_with("algorithm not allowed") {
        "token_algorithm_not_allowed"
    } else if message.contains("key id") {
        "token_unknown_key"
    } else if message.starts_with("wrong issuer") || message.starts_with("wrong audience") {
        "token_wrong_issuer_or_audience"
    } else {
        "token_invalid"
    }
}

/// What to change for a token the verifier refused.
pub fn token_fix(reason: &str) -> &'static str {
    match reason {
        "token_expired" => "the client must fetch a fresh token (or the token's issuer must give a longer `exp`)",
        "token_not_yet_valid" => "check the clocks of the token issuer and this node (5 s leeway)",
        "token_signature_invalid" => {
            "the token was signed with another key than jwt_secret / jwt_public_key_file / jwt_jwks_file"
        }
        "token_algorithm_not_allowed" => "sign with an algorithm listed in jwt_algorithms",
        "token_unknown_key" => "the token's `kid` is not in jwt_jwks_file",
        "token_wrong_issuer_or_audience" => "the token's `iss`/`aud` must equal jwt_issuer / jwt_audience",
        _ => "a token is a JWT (header.payload.signature) signed with the configured key, with `sub` and `exp`",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_line_per_reason_per_window_then_the_suppressed_count() {
        let t0 = Instant::now();
        assert_eq!(admit_line(Surface::Api, "test_reason", t0), Some(0));
        assert_eq!(admit_line(Surface::Api, "test_reason", t0 + Duration::from_secs(1)), None);
        assert_eq!(admit_line(Surface::Api, "test_reason", t0 + Duration::from_secs(2)), None);
        // Another reason has its own window.
        assert_eq!(admit_line(Surface::Api, "test_other", t0 + Duration::from_secs(2)), Some(0));
        assert_eq!(admit_line(Surface::Api, "test_reason", t0 + LOG_WINDOW), Some(2));
        assert_eq!(admit_line(Surface::Api, "test_reason", t0 + LOG_WINDOW), None);
    }

    #[test]
    fn quoting_escapes_and_truncates() {
        assert_eq!(quote("http://a\"b\n"), r#""http://a\"b\n""#);
        let long = "x".repeat(300);
        assert_eq!(quote(&long).chars().count(), 100 + 3);
    }

    #[test]
    fn token_reasons() {
        assert_eq!(token_reason("token expired 42 s ago"), "token_expired");
        assert_eq!(token_reason("signature invalid"), "token_signature_invalid");
        assert_eq!(token_reason("unknown key id `x`"), "token_unknown_key");
        assert_eq!(token_reason("malformed token"), "token_invalid");
    }
}
