//! Logs: tracing with RUST_LOG-style filters, as text or JSON lines. The writer is
//! non-blocking so a slow terminal or pipe never stalls the request path.
//!
//! Targets worth filtering on: `access` (one line per request, written by its own writer:
//! see [`super::access`]; RUST_LOG turns it off like any target),
//! `health` (probe state changes and ejections), `table` (routing table swaps with the old
//! and new zone order), `reload`, `proxy` (upstream failures). For example
//! `RUST_LOG=info,access=off` keeps everything but the access log.

use tracing_appender::non_blocking::WorkerGuard;
use tracing_subscriber::fmt::MakeWriter;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::EnvFilter;

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    Text,
    Json,
}

/// The filter from `RUST_LOG`, `info` when it is unset or invalid.
pub fn env_filter() -> EnvFilter {
    EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"))
}

/// The subscriber the binary installs, writing to `writer` (benches pass a sink).
pub fn subscriber<W>(
    format: Format,
    filter: EnvFilter,
    writer: W,
) -> Box<dyn tracing::Subscriber + Send + Sync>
where
    W: for<'w> MakeWriter<'w> + Send + Sync + 'static,
{
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(writer);
    match format {
        Format::Text => Box::new(builder.with_ansi(false).finish()),
        Format::Json => Box::new(
            builder
                .json()
                .flatten_event(true)
                .with_current_span(false)
                .finish(),
        ),
    }
}

/// Starts logging; keep the guard alive until exit so buffered lines are written.
pub fn init(format: Format) -> WorkerGuard {
    let (writer, guard) = tracing_appender::non_blocking::NonBlockingBuilder::default()
        // Under overload drop log lines rather than block requests behind the terminal.
        .lossy(true)
        .buffered_lines_limit(64 * 1024)
        .finish(std::io::stdout());
    if let Err(e) = subscriber(format, env_filter(), writer).try_init() {
        eprintln!("warning: logging already initialised: {e}");
    }
    super::access::configure(
        format,
        tracing::enabled!(target: "access", tracing::Level::INFO),
    );
    guard
}
