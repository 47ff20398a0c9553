//! The claims crier reads from a token whose signature is valid (the contract's "JWT claims"):
//! `sub` and `exp` required; `nbf`, `iat`, `iss`, `aud` honoured; `channels` and `publish`
//! permission patterns; `subs`, channels the connection is subscribed to at connect.

use serde_json::{Map, Value};

use super::{LEEWAY_SECS, TokenError};

/// The claims crier uses from a verified token.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Claims {
    /// The user id (`sub`): a non-empty string.
    pub sub: String,
    /// Expiry, seconds since the Unix epoch.
    pub exp: u64,
    /// Channel patterns the user may subscribe to (missing claim = empty).
    pub channels: Vec<String>,
    /// Channel patterns the user may publish to from the client (missing claim = empty).
    pub publish: Vec<String>,
    /// Issued at (`iat`), seconds since the Unix epoch, when the token says (token invalidation).
    pub iat: Option<u64>,
    /// Channels the server subscribes the connection to at connect (`subs`; valid channel names).
    pub subs: Vec<String>,
}

impl Claims {
    /// An anonymous connection's (`allow_anonymous`): may subscribe to any channel, never
    /// publish, has no personal channel, never expires.
    pub fn anonymous() -> Claims {
        Claims {
            sub: String::new(),
            exp: u64::MAX,
            channels: vec!["*".into()],
            publish: Vec::new(),
            iat: None,
            subs: Vec::new(),
        }
    }
}

/// Check the claims of a token whose signature is valid.
pub(super) fn check_claims(
    claims: &Map<String, Value>,
    now: u64,
    issuer: Option<&str>,
    audience: Option<&str>,
) -> Result<Claims, TokenError> {
    let exp = numeric_date(claims, "exp", false)?.ok_or_else(|| TokenError::missing_claim("exp"))?;
    if now >= exp.saturating_add(LEEWAY_SECS) {
        return Err(TokenError(format!("token expired {} s ago", now.saturating_sub(exp))));
    }
    if let Some(nbf) = numeric_date(claims, "nbf", true)?
        && nbf > now.saturating_add(LEEWAY_SECS)
    {
        return Err(TokenError::new("token not yet valid"));
    }
    let iat = numeric_date(claims, "iat", true)?;
    if let Some(iat) = iat
        && iat > now.saturating_add(LEEWAY_SECS)
    {
        return Err(TokenError::new("token issued in the future"));
    }
    if let Some(want) = issuer {
        match claims.get("iss") {
            None | Some(Value::Null) => return Err(TokenError::missing_claim("iss")),
            Some(Value::String(iss)) if iss == want => {}
            Some(Value::String(_)) => return Err(TokenError::new("wrong issuer")),
            Some(_) => return Err(TokenError::malformed_claim("iss")),
        }
    }
    if let Some(want) = audience {
        let ok = match claims.get("aud") {
            None | Some(Value::Null) => return Err(TokenError::missing_claim("aud")),
            Some(Value::String(aud)) => aud == want,
            Some(Value::Array(list)) => {
                let mut found = false;
                for item in list {
                    let Value::String(aud) = item else {
                        return Err(TokenError::malformed_claim("aud"));
                    };
                    found |= aud == want;
                }
                found
            }
            Some(_) => return Err(TokenError::malformed_claim("aud")),
        };
        if !ok {
            return Err(TokenError::new("wrong audience"));
        }
    }
    let sub = match claims.get("sub") {
        None | Some(Value::Null) => return Err(TokenError::missing_claim("sub")),
        Some(Value::String(sub)) if sub.is_empty() => {
            return Err(TokenError::new("claim `sub` is empty"));
        }
        Some(Value::String(sub)) => sub.clone(),
        Some(_) => return Err(TokenError::malformed_claim("sub")),
    };
    let subs = string_list(claims, "subs")?;
    for channel in &subs {
        if let Err(e) = crier_protocol::validate_channel(channel) {
            return Err(TokenError(format!("claim `subs`: {e}")));
        }
    }
    Ok(Claims {
        sub,
        exp,
        channels: string_list(claims, "channels")?,
        publish: string_list(claims, "publish")?,
        iat,
        subs,
    })
}

/// A NumericDate claim: absent/null = `None`; a non-negative integer or finite number
/// (fractions rounded towards the stricter side); anything else is malformed.
fn numeric_date(claims: &Map<String, Value>, name: &str, round_up: bool) -> Result<Option<u64>, TokenError> {
    match claims.get(name) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Number(n)) => {
            if let Some(v) = n.as_u64() {
                return Ok(Some(v));
            }
            match n.as_f64() {
                Some(f) if f.is_finite() && (0.0..1.8e19).contains(&f) => {
                    Ok(Some(if round_up { f.ceil() } else { f.floor() } as u64))
                }
                _ => Err(TokenError::malformed_claim(name)),
            }
        }
        Some(_) => Err(TokenError::malformed_claim(name)),
    }
}

/// An optional array-of-strings claim: absent/null = empty.
fn string_list(claims: &Map<String, Value>, name: &str) -> Result<Vec<String>, TokenError> {
    match claims.get(name) {
        None | Some(Value::Null) => Ok(Vec::new()),
        Some(Value::Array(items)) => items
            .iter()
            .map(|item| match item {
                Value::String(s) => Ok(s.clone()),
                _ => Err(TokenError::malformed_claim(name)),
            })
            .collect(),
        Some(_) => Err(TokenError::malformed_claim(name)),
    }
}
