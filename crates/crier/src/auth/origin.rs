//! The `allowed_origins` list (docs/protocol.md, "Handshake").

/// Which browser `Origin`s may open a WebSocket. Entries:
/// - `*`: any origin (including `null`);
/// - `https://app.example.com`: exactly that scheme, host and port (scheme and host
///   case-insensitive; an explicit default port equals none: `https://a.com:443` = `https://a.com`);
/// - `https://*.example.com`: any subdomain of `example.com` at any depth, with that scheme and
///   port, but not `example.com` itself.
///
/// The empty policy allows nothing. (Requests without an `Origin` header are not this type's
/// business: the handshake lets them through.)
#[derive(Debug, Clone, Default)]
pub struct OriginPolicy {
    any: bool,
    exact: Vec<Origin>,
    /// `host` is the suffix after `*.`.
    wildcard: Vec<Origin>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct Origin {
    scheme: String,
    host: String,
    /// The explicit port, or the scheme's default port; `None` = no port and no known default.
    port: Option<u16>,
}

impl OriginPolicy {
    /// Parse the allow-list; entries are trimmed. A malformed entry is an error naming it.
    pub fn new(allowed: &[String]) -> Result<OriginPolicy, String> {
        let mut policy = OriginPolicy::default();
        for entry in allowed {
            let entry = entry.trim();
            if entry == "*" {
                policy.any = true;
                continue;
            }
            let (origin, wildcard) =
                parse(entry, true).map_err(|why| format!("invalid allowed origin `{entry}`: {why}"))?;
            if wildcard {
                policy.wildcard.push(origin);
            } else {
                policy.exact.push(origin);
            }
        }
        Ok(policy)
    }

    /// May a browser page from `origin` (the `Origin` header's value) connect?
    pub fn allows(&self, origin: &str) -> bool {
        if self.any {
            return true;
        }
        let Ok((origin, false)) = parse(origin, false) else {
            return false;
        };
        self.exact.contains(&origin)
            || self.wildcard.iter().any(|w| {
                w.scheme == origin.scheme
                    && w.port == origin.port
                    && origin.host.strip_suffix(w.host.as_str()).is_some_and(|sub| sub.len() > 1 && sub.ends_with('.'))
            })
    }
}

/// Parse `scheme://host[:port]`. Returns the origin and whether its host started with `*.`
/// (only accepted when `allow_wildcard`).
fn parse(text: &str, allow_wildcard: bool) -> Result<(Origin, bool), String> {
    if text.is_empty() {
        return Err("empty entry".into());
    }
    let Some((scheme, rest)) = text.split_once("://") else {
        return Err("expected scheme://host[:port], e.g. https://app.example.com".into());
    };
    let scheme = scheme.to_ascii_lowercase();
    let mut chars = scheme.chars();
    let scheme_ok = chars.next().is_some_and(|c| c.is_ascii_alphabetic())
        && chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '+' | '-' | '.'));
    if !scheme_ok {
        return Err("invalid scheme".into());
    }
    if rest.contains(['/', '?', '#']) {
        return Err("an origin has no path, query or trailing slash (scheme://host[:port])".into());
    }
    if rest.contains('@') {
        return Err("an origin has no user info".into());
    }
    let (host, port) = if rest.starts_with('[') {
        let Some(end) = rest.find(']') else {
            return Err("unterminated IPv6 address".into());
        };
        let (host, after) = rest.split_at(end + 1);
        let port = match after {
            "" => None,
            _ => Some(after.strip_prefix(':').ok_or("invalid text after the IPv6 address")?),
        };
        let inner = &host[1..host.len() - 1];
        if inner.is_empty() || !inner.chars().all(|c| c.is_ascii_hexdigit() || c == ':' || c == '.') {
            return Err("invalid IPv6 address".into());
        }
        (host.to_ascii_lowercase(), port)
    } else {
        match rest.rsplit_once(':') {
            Some((host, port)) => (host.to_ascii_lowercase(), Some(port)),
            None => (rest.to_ascii_lowercase(), None),
        }
    };
    let port = match port {
        None => default_port(&scheme),
        Some(p) => {
            if p.is_empty() || p.len() > 5 || !p.bytes().all(|b| b.is_ascii_digit()) {
                return Err("invalid port".into());
            }
            match p.parse::<u16>() {
                Ok(0) | Err(_) => return Err("invalid port".into()),
                Ok(port) => Some(port),
            }
        }
    };
    let (host, wildcard) = match host.strip_prefix("*.") {
        Some(suffix) if allow_wildcard => (suffix.to_string(), true),
        Some(_) => return Err("wildcard".into()),
        None => (host, false),
    };
    if host.contains('*') {
        return Err("`*` may only be the whole first label, as in https://*.example.com".into());
    }
    if !host.starts_with('[') && !valid_dns_host(&host) {
        return Err(format!(
            "invalid host `{host}` (letters, digits, `-` and dots; use the xn-- form of \
             international names)"
        ));
    }
    Ok((Origin { scheme, host, port }, wildcard))
}

fn default_port(scheme: &str) -> Option<u16> {
    match scheme {
        "http" | "ws" => Some(80),
        "https" | "wss" => Some(443),
        _ => None,
    }
}

/// Lower-case LDH labels, none empty, at most 63 bytes each and 253 in all.
fn valid_dns_host(host: &str) -> bool {
    !host.is_empty()
        && host.len() <= 253
        && host.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && label.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    type TestResult = Result<(), Box<dyn std::error::Error>>;

    fn policy(entries: &[&str]) -> Result<OriginPolicy, String> {
        OriginPolicy::new(&entries.iter().map(|e| e.to_string()).collect::<Vec<_>>())
    }

    #[test]
    fn empty_allows_nothing() -> TestResult {
        let p = policy(&[])?;
        assert!(!p.allows("https://app.example.com"));
        assert!(!p.allows("null"));
        assert!(!p.allows(""));
        Ok(())
    }

    #[test]
    fn star_allows_everything() -> TestResult {
        let p = policy(&["*"])?;
        assert!(p.allows("https://app.example.com"));
        assert!(p.allows("http://localhost:3000"));
        assert!(p.allows("null"));
        let p = policy(&["https://a.example", " * "])?;
        assert!(p.allows("https://other.example"));
        Ok(())
    }

    #[test]
    fn exact_entries() -> TestResult {
        let p = policy(&["https://app.example.com", "http://localhost:3000", "http://[::1]:8080"])?;
        assert!(p.allows("https://app.example.com"));
        assert!(p.allows("https://APP.Example.COM"));
        assert!(p.allows("HTTPS://app.example.com"));
        assert!(p.allows("https://app.example.com:443"));
        assert!(p.allows("http://localhost:3000"));
        assert!(p.allows("http://[::1]:8080"));
        assert!(!p.allows("http://app.example.com"), "scheme mismatch");
        assert!(!p.allows("https://app.example.com:8443"), "port mismatch");
        assert!(!p.allows("http://localhost:3001"), "port mismatch");
        assert!(!p.allows("http://localhost"), "port mismatch");
        assert!(!p.allows("https://example.com"));
        assert!(!p.allows("https://x.app.example.com"));
        assert!(!p.allows("https://app.example.com.evil.com"));
        assert!(!p.allows("https://app.example.com/"));
        assert!(!p.allows("https://app.example.com/path"));
        assert!(!p.allows("https://user@app.example.com"));
        assert!(!p.allows("https://app.example.com."));
        assert!(!p.allows("null"));
        assert!(!p.allows("app.example.com"));
        assert!(!p.allows("http://[::1]:8081"));
        // An explicit default port in the entry matches the bare origin.
        let p = policy(&["https://app.example.com:443"])?;
        assert!(p.allows("https://app.example.com"));
        Ok(())
    }

    #[test]
    fn wildcard_entries() -> TestResult {
        let p = policy(&["https://*.example.com"])?;
        assert!(p.allows("https://app.example.com"));
        assert!(p.allows("https://a.b.c.example.com"));
        assert!(p.allows("https://APP.EXAMPLE.COM"));
        // A subdomain of example.com, however it is named.
        assert!(p.allows("https://evil.com.example.com"));
        assert!(!p.allows("https://example.com"), "the apex is not a subdomain");
        assert!(!p.allows("https://evil-example.com"));
        assert!(!p.allows("https://evilexample.com"));
        assert!(!p.allows("https://example.com.evil.com"));
        assert!(!p.allows("https://app.example.com.evil.com"));
        assert!(!p.allows("https://.example.com"));
        assert!(!p.allows("http://app.example.com"), "scheme mismatch");
        assert!(!p.allows("https://app.example.com:8443"), "port mismatch");
        assert!(!p.allows("https://*.example.com"));
        let p = policy(&["http://*.localhost:8080"])?;
        assert!(p.allows("http://a.localhost:8080"));
        assert!(!p.allows("http://a.localhost"));
        assert!(!p.allows("http://localhost:8080"));
        Ok(())
    }

    #[test]
    fn malformed_entries_are_refused() {
        for (entry, want) in [
            ("", "empty"),
            ("app.example.com", "scheme://"),
            ("https://app.example.com/", "trailing slash"),
            ("https://app.example.com/path", "path"),
            ("https://app.example.com?x", "query"),
            ("https://user@app.example.com", "user info"),
            ("https://app.example.com:", "port"),
            ("https://app.example.com:99999", "port"),
            ("https://app.example.com:0", "port"),
            ("https://app.example.com:8o", "port"),
            ("https://", "invalid host"),
            ("https://*", "first label"),
            ("https://*.", "invalid host"),
            ("https://a.*.example.com", "first label"),
            ("https://*example.com", "first label"),
            ("https://app..example.com", "invalid host"),
            ("https://exa mple.com", "invalid host"),
            ("https://bücher.example", "xn--"),
            ("1http://a.com", "scheme"),
            ("http://[::1", "IPv6"),
            ("http://[zz]", "IPv6"),
        ] {
            let err = policy(&[entry]).err().unwrap_or_default();
            assert!(err.contains(want) && err.contains(entry.trim()), "{entry}: {err}");
        }
    }
}
