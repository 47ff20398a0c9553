//! Where the connection's token comes from: a fixed string, or an async provider that is asked
//! again after a 4001 close and shortly before the current token's `exp` (then sent in a
//! `refresh` frame, so the connection continues).

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine;

/// The error a token provider may return.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

type ProviderFn = dyn Fn() -> Pin<Box<dyn Future<Output = Result<String, BoxError>> + Send>> + Send + Sync;

/// The token source of a client.
#[derive(Clone, Default)]
pub(crate) enum TokenSource {
    /// Anonymous (the server must allow it).
    #[default]
    None,
    Static(String),
    Provider(Arc<ProviderFn>),
}

impl std::fmt::Debug for TokenSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the token itself.
        f.write_str(match self {
            TokenSource::None => "None",
            TokenSource::Static(_) => "Static(..)",
            TokenSource::Provider(_) => "Provider(..)",
        })
    }
}

impl TokenSource {
    pub(crate) fn provider<F, Fut, E>(f: F) -> TokenSource
    where
        F: Fn() -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<String, E>> + Send + 'static,
        E: Into<BoxError>,
    {
        TokenSource::Provider(Arc::new(move || {
            let fut = f();
            Box::pin(async move { fut.await.map_err(Into::into) })
        }))
    }

    pub(crate) fn has_provider(&self) -> bool {
        matches!(self, TokenSource::Provider(_))
    }
}

/// A token's `exp` claim (Unix seconds), read without verifying the token (the client only
/// schedules its refresh by it; the server verifies).
pub(crate) fn expiry(token: &str) -> Option<u64> {
    let payload = token.split('.').nth(1)?;
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(payload.trim_end_matches('=')).ok()?;
    let claims: serde_json::Value = serde_json::from_slice(&bytes).ok()?;
    claims.get("exp")?.as_f64().filter(|e| e.is_finite() && *e > 0.0).map(|e| e as u64)
}

/// How long from now to refresh a token that expires at `exp`: when a fifth of the remaining
/// lifetime is left (at most 30 s before `exp`). `None` for a token without `exp`.
pub(crate) fn refresh_in(exp: Option<u64>) -> Option<Duration> {
    let now = SystemTime::now().duration_since(UNIX_EPOCH).ok()?.as_secs_f64();
    let left = Duration::from_secs_f64((exp? as f64 - now).max(0.0));
    let margin = (left / 5).min(Duration::from_secs(30));
    Some(left - margin)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_exp_without_verifying() {
        let payload = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(br#"{"sub":"u","exp":1999999999}"#);
        assert_eq!(expiry(&format!("h.{payload}.sig")), Some(1_999_999_999));
        assert_eq!(expiry("not-a-jwt"), None);
        assert_eq!(expiry("a.!!!.c"), None);
        let no_exp = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(br#"{"sub":"u"}"#);
        assert_eq!(expiry(&format!("h.{no_exp}.s")), None);
    }

    #[test]
    fn refreshes_before_expiry() {
        let now = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
        let r = refresh_in(Some(now + 3600)).unwrap_or_default();
        assert!(r <= Duration::from_secs(3570) && r > Duration::from_secs(3500), "{r:?}");
        let r = refresh_in(Some(now + 10)).unwrap_or(Duration::MAX);
        assert!(r <= Duration::from_secs(8), "{r:?}");
        assert_eq!(refresh_in(Some(now.saturating_sub(5))), Some(Duration::ZERO));
        assert_eq!(refresh_in(None), None);
    }
}
