//! HTTP/1.1 conformance and robustness of the data path, over real sockets, on both
//! HTTP/1.1 engines (`listener.http1_engine`: `native` and `hyper`).
//!
//! Clients here are raw TCP (or raw bytes over TLS): they write exact bytes and parse the response themselves
//! (status line, headers, body by Content-Length / chunked / close), so framing is under the
//! test's control and visible to it. Where a test must see exactly what the upstream got, the
//! upstream is a raw TCP server too ([`support::RawUpstream`]): it parses each request
//! strictly, records it, and answers with scripted bytes. It answers the router's health
//! checks (`GET /healthz`) with a keep-alive 200.
//!
//! Every case is an `async fn(Engine)` run once per engine by [`both_engines!`], as
//! `CASE::native`, `CASE::hyper` and `CASE::native_tls` (the native engine serving HTTPS):
//! every engine, over TCP or TLS, must keep the same contract. Every wait has
//! a deadline; nothing asserts on speed.

#[path = "../common/mod.rs"]
mod common;
mod support;
#[path = "../tls_util/mod.rs"]
mod tls_util;

/// Three tests for the case `$case`: `$case::native`, `$case::hyper` and `$case::native_tls`
/// (the native engine behind a TLS listener), each bounded as a whole. `native = "why"` /
/// `hyper = "why"` / `tls = "why"` mark that variant ignored, with why.
macro_rules! both_engines {
    ($case:ident $(, native = $n:literal)? $(, hyper = $h:literal)? $(, tls = $t:literal)? $(,)?) => {
        mod $case {
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            $(#[ignore = $n])?
            async fn native() {
                crate::support::bounded(super::$case(crate::support::Engine::Native)).await;
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            $(#[ignore = $h])?
            async fn hyper() {
                crate::support::bounded(super::$case(crate::support::Engine::Hyper)).await;
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            $(#[ignore = $t])?
            async fn native_tls() {
                crate::support::bounded(super::$case(crate::support::Engine::NativeTls)).await;
            }
        }
    };
}

mod actions;
mod connections;
mod framing;
mod headers;
mod host;
mod proxy_out;
mod tls;
