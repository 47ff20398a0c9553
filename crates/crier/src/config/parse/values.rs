//! The checks of one setting's text: each turns it into its typed value or says why not.

#[allow(clippy::wildcard_imports)]
use super::*;

pub(super) fn boolean(s: &str) -> Result<bool, String> {
    match s.trim().to_ascii_lowercase().as_str() {
        "true" | "1" | "yes" | "on" => Ok(true),
        "false" | "0" | "no" | "off" => Ok(false),
        _ => Err("expected true or false (or 1/0, yes/no, on/off)".to_owned()),
    }
}

/// A share such as `0.2` (or `20%`), as a whole percentage: 0 to 1000%.
pub(super) fn fraction_percent(s: &str) -> Result<u32, String> {
    let s = s.trim();
    let (num, scale) = match s.strip_suffix('%') {
        Some(p) => (p.trim(), 1.0),
        None => (s, 100.0),
    };
    match num.parse::<f64>() {
        Ok(f) if f.is_finite() && f >= 0.0 && f * scale <= 1000.0 => Ok((f * scale).round() as u32),
        _ => Err("expected a share from 0 to 10, like 0.2 (or 20%)".to_owned()),
    }
}

pub(super) fn number<T: FromStr>(s: &str) -> Result<T, String> {
    s.trim().parse().map_err(|_| "expected a whole number (digits only, no units)".to_owned())
}

pub(super) fn at_least_one<T: FromStr + PartialOrd + From<u8>>(s: &str) -> Result<T, String> {
    let n: T = number(s)?;
    if n >= T::from(1) { Ok(n) } else { Err("must be at least 1".to_owned()) }
}

pub(super) fn duration_within(s: &str, zero_ok: bool, max: Duration) -> Result<Duration, String> {
    let d = humantime::parse_duration(s.trim()).map_err(|_| "expected a duration like 25s, 500ms or 2m".to_owned())?;
    if d.is_zero() && !zero_ok {
        Err("must be more than 0s".to_owned())
    } else if d > max {
        Err(format!("must be at most {}", humantime::format_duration(max)))
    } else {
        Ok(d)
    }
}

pub(super) fn path(s: &str) -> Result<PathBuf, String> {
    Ok(PathBuf::from(s.trim()))
}

pub(super) fn node_id(s: &str) -> Result<String, String> {
    let s = s.trim();
    let allowed = |c: char| c.is_ascii_alphanumeric() || "_-:.@/=".contains(c);
    if s.len() <= MAX_NODE_ID_BYTES && s.chars().all(allowed) {
        Ok(s.to_owned())
    } else {
        Err(format!("expected 1 to {MAX_NODE_ID_BYTES} characters from A-Z a-z 0-9 _ - : . @ / ="))
    }
}

pub(super) fn algorithm(s: &str) -> Result<Algorithm, String> {
    if s.eq_ignore_ascii_case("none") {
        return Err("`none` is never accepted: an unsigned token would let anyone claim to be \
                    anyone"
            .to_owned());
    }
    let name = ALGORITHMS.iter().find(|a| a.eq_ignore_ascii_case(s)).copied().unwrap_or(s);
    Algorithm::from_str(name).map_err(|_| {
        format!(
            "unknown algorithm{}; expected one of {}",
            suggest(s, ALGORITHMS.iter().map(|a| (*a).to_owned())),
            ALGORITHMS.join(", ")
        )
    })
}

/// `*`, or `scheme://host[:port]` where the host may start with `*.`.
pub(super) fn origin(s: &str) -> Result<String, String> {
    const EXPECTED: &str = "expected `*` or an origin like https://app.example.com or \
                            https://*.example.com (scheme://host[:port], no path)";
    if s == "*" {
        return Ok(s.to_owned());
    }
    let Some((scheme, host)) = s.split_once("://") else {
        return Err(EXPECTED.to_owned());
    };
    let scheme_ok = scheme.chars().next().is_some_and(|c| c.is_ascii_alphabetic())
        && scheme.chars().all(|c| c.is_ascii_alphanumeric() || "+-.".contains(c));
    if !scheme_ok {
        return Err(EXPECTED.to_owned());
    }
    if let Some(bare) = host.strip_suffix('/')
        && !bare.contains('/')
    {
        return Err(format!("an Origin never ends with `/`: write {scheme}://{bare}"));
    }
    let bare_host = host.strip_prefix("*.").unwrap_or(host);
    let host_ok = !bare_host.is_empty() && bare_host.chars().all(|c| c.is_ascii_alphanumeric() || "-.:[]_".contains(c));
    if host_ok { Ok(s.to_owned()) } else { Err(EXPECTED.to_owned()) }
}

/// A backend URL (a proxy's or the webhooks'): `http://host[:port]/path` (plain HTTP: the backend is on the node's network;
/// put a TLS-terminating sidecar in front of a remote one).
pub(super) fn proxy_url(s: &str) -> Result<String, String> {
    let s = s.trim();
    let Some(rest) = s.strip_prefix("http://") else {
        return Err("expected an http:// URL, like http://127.0.0.1:9000/crier/connect".to_owned());
    };
    if rest.is_empty() || rest.starts_with('/') {
        return Err("the URL names no host".to_owned());
    }
    // The parse the proxies' HTTP client makes: what passes here, it takes.
    match reqwest::Url::parse(s) {
        Ok(_) => Ok(s.to_owned()),
        Err(e) => Err(format!("not a URL: {e}")),
    }
}
