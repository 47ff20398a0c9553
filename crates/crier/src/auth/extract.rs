//! Finding the token of a handshake (docs/protocol.md, "Handshake").

use axum::http::HeaderMap;
use axum::http::header::{AUTHORIZATION, SEC_WEBSOCKET_PROTOCOL};

/// The WebSocket subprotocol entry that carries a token: `crier.bearer.<jwt>`. The server must
/// never echo such an entry back (it selects `crier.v1`).
pub const BEARER_SUBPROTOCOL_PREFIX: &str = "crier.bearer.";

/// Where [`extract_token`] found the token.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TokenSource {
    /// `Authorization: Bearer <jwt>`.
    Header,
    /// A `crier.bearer.<jwt>` entry of `Sec-WebSocket-Protocol`.
    Subprotocol,
    /// The `token` query parameter.
    Query,
}

/// First match wins: `Authorization: Bearer <jwt>`, then the `Sec-WebSocket-Protocol` list
/// containing `crier.bearer.<jwt>` (any position; the list is comma separated, entries trimmed),
/// then the query string's `token` parameter (percent-decoded, `+` = space). Returns None when
/// none is present. Empty tokens count as absent. `query` is the raw query string, with or
/// without its leading `?`.
pub fn extract_token(headers: &HeaderMap, query: Option<&str>) -> Option<(String, TokenSource)> {
    if let Some(token) = bearer_token(headers) {
        return Some((token, TokenSource::Header));
    }
    if let Some(token) = subprotocol_token(headers) {
        return Some((token, TokenSource::Subprotocol));
    }
    query.and_then(query_token).map(|token| (token, TokenSource::Query))
}

/// The token of an `Authorization: Bearer <token>` header (scheme case-insensitive), if any.
/// The REST API reads its key with [`bearer_credentials`], the same rule.
pub fn bearer_token(headers: &HeaderMap) -> Option<String> {
    headers.get_all(AUTHORIZATION).iter().find_map(|value| bearer_credentials(value.to_str().ok()?).map(str::to_owned))
}

/// The credentials of one `Authorization` value with the `Bearer` scheme, compared
/// case-insensitively (RFC 9110 §11.1: `bearer`, `BEARER`), separated by spaces or tabs.
pub fn bearer_credentials(value: &str) -> Option<&str> {
    let (scheme, rest) = value.trim().split_once([' ', '\t'])?;
    let token = rest.trim();
    (scheme.eq_ignore_ascii_case("bearer") && !token.is_empty()).then_some(token)
}

fn subprotocol_token(headers: &HeaderMap) -> Option<String> {
    headers.get_all(SEC_WEBSOCKET_PROTOCOL).iter().find_map(|value| {
        value.to_str().ok()?.split(',').find_map(|entry| {
            let token = entry.trim().strip_prefix(BEARER_SUBPROTOCOL_PREFIX)?;
            (!token.is_empty()).then(|| token.to_string())
        })
    })
}

fn query_token(query: &str) -> Option<String> {
    let query = query.strip_prefix('?').unwrap_or(query);
    query.split('&').find_map(|pair| {
        let (name, value) = pair.split_once('=').unwrap_or((pair, ""));
        if percent_decode(name) != "token" {
            return None;
        }
        let token = percent_decode(value);
        (!token.is_empty()).then_some(token)
    })
}

/// `application/x-www-form-urlencoded` decoding: `%XX` escapes and `+` for space. A stray `%`
/// stays as it is; invalid UTF-8 becomes U+FFFD (the token then fails verification).
fn percent_decode(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'+' => out.push(b' '),
            b'%' => match (bytes.get(i + 1).and_then(hex), bytes.get(i + 2).and_then(hex)) {
                (Some(hi), Some(lo)) => {
                    out.push((hi << 4) | lo);
                    i += 3;
                    continue;
                }
                _ => out.push(b'%'),
            },
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn hex(digit: &u8) -> Option<u8> {
    match digit {
        b'0'..=b'9' => Some(digit - b'0'),
        b'a'..=b'f' => Some(digit - b'a' + 10),
        b'A'..=b'F' => Some(digit - b'A' + 10),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderValue;

    type TestResult = Result<(), Box<dyn std::error::Error>>;

    fn headers(pairs: &[(&'static str, &str)]) -> Result<HeaderMap, Box<dyn std::error::Error>> {
        let mut map = HeaderMap::new();
        for (name, value) in pairs {
            map.append(*name, HeaderValue::from_str(value)?);
        }
        Ok(map)
    }

    fn found(token: &str, source: TokenSource) -> Option<(String, TokenSource)> {
        Some((token.to_string(), source))
    }

    #[test]
    fn precedence() -> TestResult {
        let all = headers(&[
            ("authorization", "Bearer from-header"),
            ("sec-websocket-protocol", "crier.v1, crier.bearer.from-proto"),
        ])?;
        assert_eq!(extract_token(&all, Some("token=from-query")), found("from-header", TokenSource::Header));
        let proto = headers(&[("sec-websocket-protocol", "crier.v1, crier.bearer.from-proto")])?;
        assert_eq!(extract_token(&proto, Some("token=from-query")), found("from-proto", TokenSource::Subprotocol));
        let none = HeaderMap::new();
        assert_eq!(extract_token(&none, Some("token=from-query")), found("from-query", TokenSource::Query));
        assert_eq!(extract_token(&none, None), None);
        assert_eq!(extract_token(&none, Some("")), None);
        assert_eq!(extract_token(&none, Some("a=1&b=2")), None);
        Ok(())
    }

    #[test]
    fn authorization_header() -> TestResult {
        let cases: &[(&str, Option<&str>)] = &[
            ("Bearer abc.def.ghi", Some("abc.def.ghi")),
            ("bearer abc", Some("abc")),
            ("BEARER   abc  ", Some("abc")),
            ("Bearer\tabc", Some("abc")),
            ("Bearer ", None),
            ("Bearer", None),
            ("Basic dXNlcjpwYXNz", None),
            ("Bearerabc", None),
        ];
        for (value, want) in cases {
            let map = headers(&[("authorization", value)])?;
            assert_eq!(bearer_token(&map).as_deref(), *want, "{value}");
        }
        // A non-Bearer Authorization falls through to the next source.
        let map = headers(&[("authorization", "Basic xyz")])?;
        assert_eq!(extract_token(&map, Some("token=q")), found("q", TokenSource::Query));
        // Several Authorization headers: the first Bearer one.
        let map = headers(&[("authorization", "Basic xyz"), ("authorization", "Bearer second")])?;
        assert_eq!(bearer_token(&map).as_deref(), Some("second"));
        Ok(())
    }

    #[test]
    fn subprotocol_list() -> TestResult {
        let cases: &[(&[&str], Option<&str>)] = &[
            (&["crier.bearer.tok"], Some("tok")),
            (&["crier.bearer.tok, crier.v1"], Some("tok")),
            (&["crier.v1,crier.bearer.tok"], Some("tok")),
            (&["  crier.v1 ,   crier.bearer.tok   "], Some("tok")),
            (&["crier.v1", "crier.bearer.tok"], Some("tok")),
            (&["crier.v1"], None),
            (&["crier.v1, crier.bearer."], None),
            (&["crier.bearertok"], None),
            (&["Crier.Bearer.tok"], None),
        ];
        for (values, want) in cases {
            let pairs: Vec<(&'static str, &str)> = values.iter().map(|v| ("sec-websocket-protocol", *v)).collect();
            let map = headers(&pairs)?;
            let got = extract_token(&map, None);
            assert_eq!(got.as_ref().map(|(t, _)| t.as_str()), *want, "{values:?}");
            if want.is_some() {
                assert_eq!(got.map(|(_, s)| s), Some(TokenSource::Subprotocol));
            }
        }
        Ok(())
    }

    #[test]
    fn query_parameter() {
        let none = HeaderMap::new();
        let q = |query: &str| extract_token(&none, Some(query)).map(|(t, _)| t);
        assert_eq!(q("token=abc").as_deref(), Some("abc"));
        assert_eq!(q("?token=abc").as_deref(), Some("abc"));
        assert_eq!(q("a=1&token=abc&b=2").as_deref(), Some("abc"));
        assert_eq!(q("token=first&token=second").as_deref(), Some("first"));
        assert_eq!(q("token=&token=second").as_deref(), Some("second"));
        assert_eq!(q("token=a%2Eb%2ec").as_deref(), Some("a.b.c"));
        assert_eq!(q("tok%65n=abc").as_deref(), Some("abc"));
        assert_eq!(q("token=a+b").as_deref(), Some("a b"));
        assert_eq!(q("token=a%2Bb").as_deref(), Some("a+b"));
        assert_eq!(q("token=100%").as_deref(), Some("100%"));
        assert_eq!(q("token=%zz%4").as_deref(), Some("%zz%4"));
        assert_eq!(q("token=%C3%A9").as_deref(), Some("é"));
        assert_eq!(q("token=%FF").as_deref(), Some("\u{fffd}"));
        assert_eq!(q("xtoken=abc"), None);
        assert_eq!(q("token"), None);
        assert_eq!(q("token="), None);
    }

    #[test]
    fn percent_decoding_edges() {
        assert_eq!(percent_decode(""), "");
        assert_eq!(percent_decode("%"), "%");
        assert_eq!(percent_decode("%4"), "%4");
        assert_eq!(percent_decode("%41"), "A");
        assert_eq!(percent_decode("%+1"), "% 1");
        assert_eq!(percent_decode("%-1"), "%-1");
    }
}
