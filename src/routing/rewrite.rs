//! What a forwarding route changes on the way through, for both HTTP engines: the path sent
//! upstream (`rewrite_prefix`) and the header edits of the request and of the response.

use std::borrow::Cow;

use http::{HeaderMap, HeaderName, HeaderValue};

use crate::config::HeaderActions;

/// No edits: what a request is given when its route has none.
pub static NO_EDITS: HeaderActions = HeaderActions {
    remove: Vec::new(),
    set: Vec::new(),
    add: Vec::new(),
};

/// `target` (path and query) with its leading `prefix` replaced by `replacement`; the query
/// is kept. The result is never empty and always starts with `/`: stripping `/api` from
/// `/api` gives `/`, and from `/apix` gives `/x`.
pub fn path<'a>(target: &'a str, prefix: &str, replacement: &str) -> Cow<'a, str> {
    let Some(rest) = target.strip_prefix(prefix) else {
        return Cow::Borrowed(target);
    };
    let mut out = String::with_capacity(replacement.len() + rest.len() + 1);
    out.push_str(replacement);
    if !out.starts_with('/') {
        out.insert(0, '/');
    }
    // "/v2/" + "/x" would double the slash where the prefix's own slash was not matched.
    if out.ends_with('/') && rest.starts_with('/') {
        out.push_str(&rest[1..]);
    } else {
        out.push_str(rest);
    }
    Cow::Owned(out)
}

/// Whether a header line named `name` is dropped by these edits (removed, or replaced by a
/// `set`). Names in `a` are lower case; `name` is as it came.
pub fn drops(a: &HeaderActions, name: &[u8]) -> bool {
    a.remove
        .iter()
        .any(|n| name.eq_ignore_ascii_case(n.as_ref()))
        || a.set
            .iter()
            .any(|(n, _)| name.eq_ignore_ascii_case(n.as_ref()))
}

/// The lines these edits write: every `set`, then every `add`.
pub fn written(a: &HeaderActions) -> impl Iterator<Item = &(HeaderName, HeaderValue)> {
    a.set.iter().chain(a.add.iter())
}

/// Applies the edits to a header map (the hyper engine's form of a head).
pub fn apply(a: &HeaderActions, h: &mut HeaderMap) {
    for n in &a.remove {
        h.remove(n);
    }
    for (n, v) in &a.set {
        h.insert(n, v.clone());
    }
    for (n, v) in &a.add {
        h.append(n, v.clone());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_prefix_is_replaced_and_the_query_kept() {
        assert_eq!(path("/api/users?id=1", "/api/", "/v2/"), "/v2/users?id=1");
        assert_eq!(path("/api/users", "/api", "/v2"), "/v2/users");
        assert_eq!(path("/api/users", "/api", "/v2/"), "/v2/users");
        assert_eq!(path("/old", "/old", "/new"), "/new");
    }

    #[test]
    fn stripping_never_leaves_an_empty_or_relative_path() {
        assert_eq!(path("/api", "/api", ""), "/");
        assert_eq!(path("/api?q", "/api", ""), "/?q");
        assert_eq!(path("/api/x", "/api", ""), "/x");
        assert_eq!(path("/apix", "/api", ""), "/x");
        assert_eq!(path("/api/x", "/api/", ""), "/x");
        assert_eq!(path("/api/x", "/api/", "/"), "/x");
        assert_eq!(path("/x", "/", "/app/"), "/app/x");
    }

    #[test]
    fn header_edits_remove_then_set_then_add() {
        let a = HeaderActions {
            remove: vec![HeaderName::from_static("x-gone")],
            set: vec![(
                HeaderName::from_static("x-set"),
                HeaderValue::from_static("new"),
            )],
            add: vec![(
                HeaderName::from_static("x-add"),
                HeaderValue::from_static("2"),
            )],
        };
        assert!(drops(&a, b"X-Gone"));
        assert!(drops(&a, b"x-set"));
        assert!(!drops(&a, b"x-add"));
        let mut h = HeaderMap::new();
        h.insert("x-gone", HeaderValue::from_static("1"));
        h.append("x-set", HeaderValue::from_static("old1"));
        h.append("x-set", HeaderValue::from_static("old2"));
        h.insert("x-add", HeaderValue::from_static("1"));
        apply(&a, &mut h);
        assert!(h.get("x-gone").is_none());
        assert_eq!(h.get_all("x-set").iter().collect::<Vec<_>>(), ["new"]);
        assert_eq!(h.get_all("x-add").iter().collect::<Vec<_>>(), ["1", "2"]);
        assert_eq!(written(&a).count(), 2);
    }
}
