//! The request's authority, validated once for both engines (RFC 9112 3.2, RFC 3986
//! 3.2.2): what is routed on is what the upstream and any URL parser will read.

use std::borrow::Cow;

/// The host a request is routed on, from its authority (the Host header, or the target's
/// authority in absolute form or HTTP/2): lower case, without port. `None` when the
/// authority is not one a URL parser and the upstream would read the same way (RFC 9112
/// 3.2, RFC 3986 3.2.2): every engine answers that with 400 `bad_host`, before routing.
pub fn route_host(raw: &[u8]) -> Option<Cow<'_, str>> {
    let raw = trim_ows(raw);
    if raw.is_empty() || raw.len() > 255 + 6 {
        return None;
    }
    let (host, port) = if raw[0] == b'[' {
        let end = raw.iter().position(|b| *b == b']')?;
        let inside = &raw[1..end];
        if inside.is_empty()
            || !inside
                .iter()
                .all(|b| b.is_ascii_hexdigit() || b":.".contains(b))
        {
            return None;
        }
        (&raw[..=end], &raw[end + 1..])
    } else {
        match raw.iter().position(|b| *b == b':') {
            Some(i) => (&raw[..i], &raw[i..]),
            None => (raw, &raw[raw.len()..]),
        }
    };
    if !port.is_empty() {
        let digits = port.strip_prefix(b":")?;
        if digits.len() > 5 || !digits.iter().all(u8::is_ascii_digit) {
            return None;
        }
    }
    // reg-name: unreserved and sub-delims minus the ones that split a host list (`,`) or
    // mean something to URL parsers; no `/`, `@`, space, `%` or non-ASCII byte.
    let ok = host.first() == Some(&b'[')
        || (!host.is_empty()
            && host
                .iter()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~')));
    if !ok {
        return None;
    }
    let host = std::str::from_utf8(host).ok()?;
    let host = host
        .strip_prefix('[')
        .and_then(|h| h.strip_suffix(']'))
        .unwrap_or(host);
    Some(if host.bytes().any(|b| b.is_ascii_uppercase()) {
        Cow::Owned(host.to_ascii_lowercase())
    } else {
        Cow::Borrowed(host)
    })
}

fn trim_ows(v: &[u8]) -> &[u8] {
    let start = v
        .iter()
        .position(|b| !matches!(b, b' ' | b'\t'))
        .unwrap_or(v.len());
    let end = v
        .iter()
        .rposition(|b| !matches!(b, b' ' | b'\t'))
        .map_or(start, |i| i + 1);
    &v[start..end]
}

/// Whether a target's authority and the Host header name the same host and port (an
/// absolute-form target wins, and the forwarded Host must agree with it). A missing port is
/// the scheme's default (`default_port`).
pub fn same_authority(target: &[u8], host: &[u8], default_port: u16) -> bool {
    let split = |a: &[u8]| -> (Vec<u8>, Option<u16>) {
        let a = trim_ows(a);
        let colon = match a.iter().rposition(|b| *b == b':') {
            Some(i) if !a[i..].contains(&b']') => Some(i),
            _ => None,
        };
        match colon {
            Some(i) => (
                a[..i].to_ascii_lowercase(),
                std::str::from_utf8(&a[i + 1..])
                    .ok()
                    .and_then(|p| p.parse().ok()),
            ),
            None => (a.to_ascii_lowercase(), Some(default_port)),
        }
    };
    let (th, tp) = split(target);
    let (hh, hp) = split(host);
    th == hh && tp.is_some() && tp == hp
}

/// Header names the router sets itself; a client's copies with `_` for `-` are dropped too,
/// because CGI-style backends read `X_Forwarded_For` as `X-Forwarded-For` (nginx drops them).
pub fn is_forwarding_lookalike(name: &[u8]) -> bool {
    const SET: [&[u8]; 4] = [
        b"x_forwarded_for",
        b"x_forwarded_proto",
        b"x_forwarded_host",
        b"x_request_id",
    ];
    name.contains(&b'_') && SET.iter().any(|s| s.eq_ignore_ascii_case(name))
}
