//! Where a `redirect` route sends the client.

use crate::config::Redirect;

/// `SCHEME://HOST[:port]/path?query`: the request's host without its port, its path and
/// query unchanged, and the redirect's own port when it names one.
pub fn location(r: &Redirect, host: &str, path_and_query: &str) -> String {
    let host = host_without_port(host);
    let path = if path_and_query.starts_with('/') {
        path_and_query
    } else {
        // An asterisk-form or absent target still gets a well-formed location.
        "/"
    };
    match r.port {
        Some(p) => format!("{}://{host}:{p}{path}", r.scheme),
        None => format!("{}://{host}{path}", r.scheme),
    }
}

/// `example.com:8080` -> `example.com`; `[::1]:8080` -> `[::1]`; a bare IPv6 stays whole.
fn host_without_port(host: &str) -> &str {
    if host.starts_with('[') {
        return match host.find(']') {
            Some(end) => &host[..=end],
            None => host,
        };
    }
    match host.rsplit_once(':') {
        Some((h, port)) if !h.contains(':') && port.bytes().all(|b| b.is_ascii_digit()) => h,
        _ => host,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn r(port: Option<u16>) -> Redirect {
        Redirect {
            scheme: "https".into(),
            code: 308,
            port,
        }
    }

    #[test]
    fn the_host_loses_its_port_and_the_target_is_kept() {
        assert_eq!(
            location(&r(None), "example.com:8080", "/a/b?x=1&y"),
            "https://example.com/a/b?x=1&y"
        );
        assert_eq!(
            location(&r(Some(8443)), "example.com", "/"),
            "https://example.com:8443/"
        );
        assert_eq!(location(&r(None), "[::1]:80", "/p"), "https://[::1]/p");
        assert_eq!(location(&r(None), "10.0.0.1", "*"), "https://10.0.0.1/");
    }
}
