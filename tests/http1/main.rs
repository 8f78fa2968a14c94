//! HTTP/1.1 conformance and robustness of the data path, over real sockets, on both
//! HTTP/1.1 engines (`listener.http1_engine`: `native` and `hyper`).
//!
//! Clients here are raw TCP: they write exact bytes and parse the response themselves
//! (status line, headers, body by Content-Length / chunked / close), so framing is under the
//! test's control and visible to it. Where a test must see exactly what the upstream got, the
//! upstream is a raw TCP server too ([`support::RawUpstream`]): it parses each request
//! strictly, records it, and answers with scripted bytes. It answers the router's health
//! checks (`GET /healthz`) with a keep-alive 200.
//!
//! Every case is an `async fn(Engine)` run once per engine by [`both_engines!`], as
//! `CASE::native` and `CASE::hyper`: both engines must keep the same contract. Every wait has
//! a deadline; nothing asserts on speed.

#[path = "../common/mod.rs"]
mod common;
mod support;

/// Two tests for the case `$case`: `$case::native` and `$case::hyper`, each bounded as a
/// whole. `native = "why"` / `hyper = "why"` mark that engine's variant ignored, with why.
macro_rules! both_engines {
    ($case:ident $(, native = $n:literal)? $(, hyper = $h:literal)? $(,)?) => {
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
        }
    };
}

mod actions;
mod connections;
mod framing;
mod headers;
mod host;
mod proxy_out;
