//! Request-path micro-benchmarks (criterion; `cargo bench --bench request_path`).
//!
//! Layout: one criterion group per concern, each a list of functions named after it, all
//! run by `criterion_main!` at the bottom. Add a concern as a new group (e.g. `pick_*` for
//! the balancer, `rebuild_*` for the table builder) and append it to `criterion_main!`.
//!
//! - `metrics_*`: the metric updates of one served request (`proxy::count_response` plus
//!   the request and response byte counters) on handles resolved at table build, against a
//!   plain atomic increment and against what a label lookup per request would cost.
//! - `access_log_*`: the per-request cost of the access log: building the record and
//!   writing its line. `access_log_writer_{json,text}` is what the binary does (the
//!   access-log writer: a per-thread buffer, batches to a writer thread, here writing to
//!   `io::sink`); `access_log_tracing_*` is the same record emitted as a `tracing` event
//!   through the subscriber the binary installs (`logging::subscriber`), the way the
//!   access log was written before it had its own writer, kept as the baseline; against
//!   the access log switched off (`listener.access_log = false`).
//!
//! Criterion prints `time: [low mid high]` per function: the time of one call, i.e. ns per
//! request. Run a shorter pass with `cargo bench --bench request_path -- --warm-up-time 1
//! --measurement-time 2`.

use std::hint::black_box;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use criterion::{criterion_group, criterion_main, Criterion};
use edge_router::dataplane::request::{self as proxy, AccessLog};
use edge_router::routing::table::Reason;
use edge_router::telemetry::access::{AccessWriter, Dest, Options};
use edge_router::telemetry::logging::{self, Format};
use edge_router::telemetry::metrics::{ClusterMetrics, Metrics};
use http::{HeaderValue, Method};
use tracing_subscriber::EnvFilter;

// ---------------------------------------------------------------------------------------
// metrics_*

fn metrics_plain_atomic_increment(c: &mut Criterion) {
    let counter = AtomicU64::new(0);
    c.bench_function("metrics_plain_atomic_increment", |b| {
        b.iter(|| black_box(&counter).fetch_add(1, Ordering::Relaxed))
    });
}

/// What the request path does per served request: route decision, status code, latency
/// histogram, request and response bytes. Five atomic updates on pre-resolved handles.
fn metrics_request_updates(c: &mut Criterion) {
    let m = Metrics::new();
    let zone = m.zone("api", "us-east-1", "us-east-1a");
    let cluster = ClusterMetrics::new(&m, "api", &Reason::LABELS);
    c.bench_function("metrics_request_updates", |b| {
        b.iter(|| {
            proxy::count_response(
                black_box(&zone),
                black_box(&cluster),
                black_box(Reason::Nearest),
                black_box(200),
                black_box(0.0042),
            );
            cluster.request_bytes.inc_by(black_box(512));
            cluster.response_bytes.inc_by(black_box(2048));
        })
    });
}

/// The same updates with a status code outside the pre-created set (lazily resolved once).
fn metrics_request_updates_rare_code(c: &mut Criterion) {
    let m = Metrics::new();
    let zone = m.zone("api", "us-east-1", "us-east-1a");
    let cluster = ClusterMetrics::new(&m, "api", &Reason::LABELS);
    c.bench_function("metrics_request_updates_rare_code", |b| {
        b.iter(|| {
            proxy::count_response(
                black_box(&zone),
                black_box(&cluster),
                black_box(Reason::Failover),
                black_box(418),
                black_box(0.0042),
            );
            cluster.request_bytes.inc_by(black_box(512));
            cluster.response_bytes.inc_by(black_box(2048));
        })
    });
}

/// For contrast, what the design avoids: resolving every label set per request.
fn metrics_request_updates_label_lookup(c: &mut Criterion) {
    let m = Metrics::new();
    c.bench_function("metrics_request_updates_label_lookup", |b| {
        b.iter(|| {
            let (cl, r, z) = black_box(("api", "us-east-1", "us-east-1a"));
            m.decisions.with_label_values(&[cl, "nearest"]).inc();
            m.requests.with_label_values(&[cl, r, z, "200"]).inc();
            m.request_duration
                .with_label_values(&[cl, r, z])
                .observe(black_box(0.0042));
            m.request_bytes.with_label_values(&[cl]).inc_by(512);
            m.response_bytes.with_label_values(&[cl]).inc_by(2048);
        })
    });
}

criterion_group!(
    metrics_benches,
    metrics_plain_atomic_increment,
    metrics_request_updates,
    metrics_request_updates_rare_code,
    metrics_request_updates_label_lookup
);

// ---------------------------------------------------------------------------------------
// access_log_*

/// What the table and the request already hold when the access log is built (the proxy
/// clones these `Arc`s; it does not allocate them per request).
struct Request {
    client: SocketAddr,
    request_id: HeaderValue,
    cluster: Arc<str>,
    region: Arc<str>,
    zone: Arc<str>,
    endpoint: Arc<str>,
}

impl Request {
    fn new() -> Request {
        Request {
            client: ([127, 0, 0, 1], 52144).into(),
            request_id: HeaderValue::from_static("5f0c2b9e8d7a41c3b2a1f0e9d8c7b6a5"),
            cluster: Arc::from("api"),
            region: Arc::from("us-east-1"),
            zone: Arc::from("us-east-1a"),
            endpoint: Arc::from("10.0.1.17:8080"),
        }
    }
}

/// How a finished record is written.
#[derive(Clone, Copy)]
enum Emit<'a> {
    Writer(&'a Arc<AccessWriter>),
    Tracing,
}

/// One request's access-log work as the proxy does it: the record when the switch is on
/// (method, host and path copied, table names shared), then the line when the response
/// ends.
fn access_log_request(on: bool, r: &Request, emit: Emit<'_>) {
    let log = black_box(on).then(|| {
        let mut l = AccessLog::new(
            Method::GET,
            Some(black_box("api.example.com")),
            black_box("/v1/users/42"),
            Instant::now(),
            &r.request_id,
            r.client,
        );
        l.cluster = Some(r.cluster.clone());
        l.region = Some(r.region.clone());
        l.zone = Some(r.zone.clone());
        l.endpoint = Some(r.endpoint.clone());
        l.reason = Some(Reason::Nearest);
        l.status = 200;
        l
    });
    if let Some(l) = log {
        match emit {
            Emit::Writer(w) => l.write_to(w, black_box(2048), true),
            Emit::Tracing => emit_tracing(&l, black_box(2048), true),
        }
    }
}

/// The access line as a `tracing` event, as it was written before the access-log writer.
fn emit_tracing(l: &AccessLog, bytes: u64, complete: bool) {
    tracing::info!(
        target: "access",
        method = %l.method,
        host = %l.host(),
        path = %l.path(),
        status = l.status,
        duration_ms = (l.started.elapsed().as_micros() as f64) / 1e3,
        bytes,
        complete,
        cluster = l.cluster.as_deref(),
        region = l.region.as_deref(),
        zone = l.zone.as_deref(),
        endpoint = l.endpoint.as_deref(),
        reason = l.reason.map(Reason::as_str),
        error = l.error,
        request_id = l.request_id.to_str().unwrap_or("-"),
        client = %l.client,
    );
}

fn with_subscriber(sub: Box<dyn tracing::Subscriber + Send + Sync>, f: impl FnOnce()) {
    tracing::subscriber::with_default(sub, f);
}

fn access_log_off(c: &mut Criterion) {
    let r = Request::new();
    c.bench_function("access_log_off", |b| {
        b.iter(|| access_log_request(false, &r, Emit::Tracing))
    });
}

fn writer(format: Format) -> Arc<AccessWriter> {
    let options = Options {
        format,
        ..Options::default()
    };
    match AccessWriter::start(Dest::Writer(Box::new(std::io::sink())), options) {
        Ok(w) => w,
        Err(e) => panic!("access-log writer: {e}"),
    }
}

fn access_log_writer_json(c: &mut Criterion) {
    let r = Request::new();
    let w = writer(Format::Json);
    c.bench_function("access_log_writer_json", |b| {
        b.iter(|| access_log_request(true, &r, Emit::Writer(&w)))
    });
    eprintln!("  (lines dropped by the writer: {})", w.dropped());
}

fn access_log_writer_text(c: &mut Criterion) {
    let r = Request::new();
    let w = writer(Format::Text);
    c.bench_function("access_log_writer_text", |b| {
        b.iter(|| access_log_request(true, &r, Emit::Writer(&w)))
    });
    eprintln!("  (lines dropped by the writer: {})", w.dropped());
}

fn access_log_tracing_json_sink(c: &mut Criterion) {
    let r = Request::new();
    let sub = logging::subscriber(Format::Json, EnvFilter::new("info"), std::io::sink);
    with_subscriber(sub, || {
        c.bench_function("access_log_tracing_json_sink", |b| {
            b.iter(|| access_log_request(true, &r, Emit::Tracing))
        });
    });
}

fn access_log_tracing_text_sink(c: &mut Criterion) {
    let r = Request::new();
    let sub = logging::subscriber(Format::Text, EnvFilter::new("info"), std::io::sink);
    with_subscriber(sub, || {
        c.bench_function("access_log_tracing_text_sink", |b| {
            b.iter(|| access_log_request(true, &r, Emit::Tracing))
        });
    });
}

/// The baseline as the binary ran it: JSON handed to the non-blocking writer (a channel to
/// a writer thread, here writing to a sink), lossy like the binary's.
fn access_log_tracing_json_non_blocking(c: &mut Criterion) {
    let r = Request::new();
    let (writer, guard) = tracing_appender::non_blocking::NonBlockingBuilder::default()
        .lossy(true)
        .buffered_lines_limit(64 * 1024)
        .finish(std::io::sink());
    let sub = logging::subscriber(Format::Json, EnvFilter::new("info"), writer);
    with_subscriber(sub, || {
        c.bench_function("access_log_tracing_json_non_blocking", |b| {
            b.iter(|| access_log_request(true, &r, Emit::Tracing))
        });
    });
    drop(guard);
}

criterion_group!(
    access_log_benches,
    access_log_off,
    access_log_writer_json,
    access_log_writer_text,
    access_log_tracing_json_sink,
    access_log_tracing_text_sink,
    access_log_tracing_json_non_blocking
);

criterion_main!(metrics_benches, access_log_benches);
