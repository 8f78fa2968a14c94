//! A redirect route's answer: made by the router, never forwarded.

use http::header::{self, HeaderValue};
use http::{Response, StatusCode, Uri};

use crate::config::Redirect;
use crate::dataplane::hyper::{error_response, ResponseBody};
use crate::dataplane::request::{AccessLog, ErrorKind, ErrorReply};
use crate::routing::redirect::location;

/// The redirect response, logged like any other when `log` is on.
pub fn response(
    r: &Redirect,
    host: Option<&str>,
    uri: &Uri,
    request_id: &HeaderValue,
    log: Option<AccessLog>,
) -> Response<ResponseBody> {
    let target = uri.path_and_query().map_or("/", |pq| pq.as_str());
    let loc = host.map(|h| location(r, h, target));
    let loc = loc.and_then(|l| HeaderValue::from_str(&l).ok().map(|v| (l, v)));
    let Some((text, value)) = loc else {
        // A redirect needs the request's host (an HTTP/1.0 request may come without).
        let reply = ErrorReply::new(ErrorKind::BadHost, log);
        let (status, kind) = (reply.status(), reply.kind.as_str());
        return error_response(status, kind, reply.body(), request_id);
    };
    let status = StatusCode::from_u16(r.code).unwrap_or(StatusCode::MOVED_PERMANENTLY);
    // The router's own short-text response, without the error marker: a redirect is an
    // answer, not a failure.
    let mut resp = error_response(status, "redirect", format!("{text}\n"), request_id);
    resp.headers_mut().remove("x-edge-error");
    resp.headers_mut().insert(header::LOCATION, value);
    if let Some(mut l) = log {
        l.status = status.as_u16();
        l.emit(0, true);
    }
    resp
}
