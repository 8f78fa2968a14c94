//! What a failed upstream request through hyper means: whose fault, and whether the
//! request may go again.

use super::*;

/// What a failed hyper client request means for the exchange.
pub(super) fn attempt_error(e: &hyper_util::client::legacy::Error) -> AttemptError {
    let detail = upstream::describe_failure(e);
    if let Some(malformed) = client_side(e) {
        if malformed {
            AttemptError::ClientBad
        } else {
            AttemptError::ClientGone
        }
    } else if e.is_connect() || upstream::tls_problem(e).is_some() {
        AttemptError::Connect {
            tls: upstream::tls_problem(e).is_some(),
            detail,
        }
    } else if closed_unanswered(e) {
        AttemptError::Closed(detail)
    } else {
        AttemptError::Reset(detail)
    }
}

/// Whether the upstream closed (or reset) the connection before any byte of a response.
fn closed_unanswered(e: &hyper_util::client::legacy::Error) -> bool {
    let mut src: Option<&(dyn std::error::Error + 'static)> = std::error::Error::source(e);
    while let Some(s) = src {
        if let Some(h) = s.downcast_ref::<hyper::Error>() {
            if h.is_incomplete_message() {
                return true;
            }
        }
        if let Some(io) = s.downcast_ref::<std::io::Error>() {
            use std::io::ErrorKind::*;
            return matches!(io.kind(), ConnectionReset | BrokenPipe | ConnectionAborted);
        }
        src = s.source();
    }
    false
}

/// Whether a failed upstream request failed because of the client's body stream, which is
/// never the endpoint's fault: `Some(true)` when the client sent bad framing (it is still
/// there to be told), `Some(false)` when it went away mid-upload.
pub(super) fn client_side(e: &(dyn std::error::Error + 'static)) -> Option<bool> {
    let mut src: Option<&(dyn std::error::Error + 'static)> = std::error::Error::source(e);
    while let Some(s) = src {
        if let Some(c) = s.downcast_ref::<upstream::body::ClientBodyError>() {
            return Some(c.malformed());
        }
        src = s.source();
    }
    None
}
