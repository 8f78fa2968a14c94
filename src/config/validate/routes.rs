//! Route values: host patterns and redirects.

use super::*;

/// An exact host, or `*.example.com` (stored as the suffix `.example.com`).
pub(super) fn host_match(h: &str) -> Result<HostMatch, String> {
    let h = h.to_ascii_lowercase();
    if let Some(suffix) = h.strip_prefix("*.") {
        if !valid_dns_name(suffix) {
            return Err(format!("{h:?} is not a valid host pattern"));
        }
        Ok(HostMatch::Suffix(format!(".{suffix}")))
    } else if valid_dns_name(&h) || h.parse::<IpAddr>().is_ok() {
        Ok(HostMatch::Exact(h))
    } else {
        Err(format!(
            "{h:?} is not a host name (exact, or \"*.example.com\")"
        ))
    }
}

pub(super) fn redirect(v: &V, p: &str, r: raw::Redirect) -> Result<Redirect, ConfigError> {
    let scheme = r.scheme.unwrap_or_else(|| "https".to_string());
    if scheme != "http" && scheme != "https" {
        return Err(v.err(
            format!("{p}: redirect.scheme"),
            format!("{scheme:?} is not \"http\" or \"https\""),
        ));
    }
    let code = r.code.unwrap_or(301);
    if ![301, 302, 303, 307, 308].contains(&code) {
        return Err(v.err(
            format!("{p}: redirect.code"),
            format!("{code} is not a redirect status (301, 302, 303, 307 or 308)"),
        ));
    }
    let port = match r.port {
        None => None,
        Some(n) => Some(v.int(&format!("{p}: redirect.port"), Some(n), 0, 1, 65_535)? as u16),
    };
    Ok(Redirect {
        scheme,
        code: code as u16,
        port,
    })
}
