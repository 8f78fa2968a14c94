//! Likely mistakes that are still valid config: reported, not refused.

use super::*;

/// What is valid but almost certainly not meant.
pub(super) fn warnings(
    file: &str,
    clusters: &[ClusterConfig],
    routes: &[RouteConfig],
) -> Vec<ConfigError> {
    let mut out = Vec::new();
    for c in clusters {
        let hc = &c.health_check;
        if hc.timeout > hc.interval {
            out.push(warning(
                file,
                format!("cluster {:?}: health_check.timeout", c.name),
                format!(
                    "{:?} is longer than health_check.interval ({:?}): a probe may still be \
                     waiting when the next starts",
                    hc.timeout, hc.interval
                ),
            ));
        }
    }
    for (j, r) in routes.iter().enumerate() {
        let same = |q: &RouteConfig| {
            q.listeners == r.listeners && q.host == r.host && q.path_prefix == r.path_prefix
        };
        // The prefix is replaced as written (as nginx and Envoy do): with one slash too
        // few or too many, `/api/users` becomes `/v2users` or `/v2//users`.
        if let Some(rp) = &r.rewrite_prefix {
            if !rp.is_empty() && rp.ends_with('/') != r.path_prefix.ends_with('/') {
                out.push(warning(
                    file,
                    format!("route {}: rewrite_prefix", j + 1),
                    format!(
                        "{rp:?} and path_prefix {:?} differ in their trailing /: the rest of \
                         the path is joined as written",
                        r.path_prefix
                    ),
                ));
            }
        }
        if let Some(i) = routes[..j].iter().position(same) {
            out.push(warning(
                file,
                format!("route {}", j + 1),
                format!(
                    "matches exactly what route {} matches, so it never applies",
                    i + 1
                ),
            ));
        }
    }
    out
}

fn warning(file: &str, path: String, problem: String) -> ConfigError {
    ConfigError {
        file: file.to_string(),
        path,
        problem,
        line: None,
    }
}
