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

/// What a forwarding route changes on the way: `rewrite_prefix`, `request_headers` and
/// `response_headers`. A redirect route forwards nothing, so it may have none of them.
pub(super) struct Actions {
    pub rewrite_prefix: Option<String>,
    pub request_headers: HeaderActions,
    pub response_headers: HeaderActions,
}

pub(super) fn actions(v: &V, p: &str, r: &mut raw::Route) -> Result<Actions, ConfigError> {
    if r.redirect.is_some() {
        for (key, set) in [
            ("rewrite_prefix", r.rewrite_prefix.is_some()),
            ("request_headers", r.request_headers.is_some()),
            ("response_headers", r.response_headers.is_some()),
        ] {
            if set {
                return Err(v.err(
                    format!("{p}: {key}"),
                    "a redirect route forwards nothing; its answer is the router's own",
                ));
            }
        }
    }
    let rewrite_prefix = r.rewrite_prefix.take();
    if let Some(rp) = &rewrite_prefix {
        // Empty strips the prefix; anything else must keep the path absolute.
        if !(rp.is_empty() || rp.starts_with('/'))
            || rp
                .bytes()
                .any(|b| b == b'?' || b == b'#' || !(0x21..0x7f).contains(&b))
        {
            return Err(v.err(
                format!("{p}: rewrite_prefix"),
                format!("{rp:?} must be empty or a path starting with / (no spaces, ? or #)"),
            ));
        }
    }
    Ok(Actions {
        rewrite_prefix,
        request_headers: header_actions(
            v,
            &format!("{p}: request_headers"),
            r.request_headers.take(),
        )?,
        response_headers: header_actions(
            v,
            &format!("{p}: response_headers"),
            r.response_headers.take(),
        )?,
    })
}

/// Headers no route may edit, and why: the router frames messages and manages connections
/// itself, and writes the forwarding headers after the route's edits.
fn reserved(name: &str) -> Option<&'static str> {
    match name {
        "connection"
        | "keep-alive"
        | "proxy-connection"
        | "te"
        | "trailer"
        | "upgrade"
        | "proxy-authenticate"
        | "proxy-authorization" => {
            Some("is hop-by-hop: it describes one connection, and the router manages its own")
        }
        "transfer-encoding" | "content-length" => {
            Some("frames the body; the router writes the framing of each message itself")
        }
        "host" => Some("is what the request was routed on; the upstream sees the client's"),
        "x-forwarded-for" | "x-forwarded-proto" | "x-forwarded-host" | "x-request-id"
        | "x-edge-error" | "x-edge-route" => Some("is written by the router itself"),
        _ => None,
    }
}

fn header_name(v: &V, key: &str, name: &str) -> Result<http::HeaderName, ConfigError> {
    let n = http::HeaderName::from_bytes(name.as_bytes())
        .map_err(|_| v.err(key, format!("{name:?} is not a valid header name")))?;
    match reserved(n.as_str()) {
        Some(why) => Err(v.err(
            key,
            format!("{name:?} may not be changed by a route: it {why}"),
        )),
        None => Ok(n),
    }
}

fn header_actions(
    v: &V,
    p: &str,
    raw: Option<raw::HeaderActions>,
) -> Result<HeaderActions, ConfigError> {
    let Some(raw) = raw else {
        return Ok(HeaderActions::default());
    };
    let mut out = HeaderActions::default();
    for (i, name) in raw.remove.iter().enumerate() {
        out.remove
            .push(header_name(v, &format!("{p}.remove {}", i + 1), name)?);
    }
    for (op, map, into) in [
        ("set", &raw.set, &mut out.set),
        ("add", &raw.add, &mut out.add),
    ] {
        for (name, value) in map {
            let key = format!("{p}.{op}.{name:?}");
            let n = header_name(v, &key, name)?;
            // Visible ASCII and spaces inside; no leading or trailing blanks (RFC 9110 5.5).
            let ok = value.trim() == value
                && value
                    .bytes()
                    .all(|b| b == b' ' || b == b'\t' || (0x21..0x7f).contains(&b));
            let value = http::HeaderValue::from_str(value)
                .ok()
                .filter(|_| ok)
                .ok_or_else(|| v.err(&key, format!("{value:?} is not a valid header value")))?;
            into.push((n, value));
        }
    }
    // Names are case-insensitive: `"X-Env"` and `"x-env"` are two keys of the table but one
    // header, which `set` cannot give two values.
    for (i, (n, _)) in out.set.iter().enumerate() {
        if out.set[..i].iter().any(|(s, _)| s == n) {
            return Err(v.err(
                format!("{p}.set.{:?}", n.as_str()),
                "is set twice (header names ignore case); give it one value",
            ));
        }
    }
    for (n, _) in &out.add {
        if out.remove.contains(n) || out.set.iter().any(|(s, _)| s == n) {
            return Err(v.err(
                format!("{p}.add.{:?}", n.as_str()),
                "is also removed or set; say once what happens to it",
            ));
        }
    }
    Ok(out)
}
