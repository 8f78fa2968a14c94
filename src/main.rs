//! The `edge-router` command: run, check, demo, status.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use clap::{Parser, Subcommand};
use edge_router::config;
use edge_router::ops::{demo, router as server, status, upgrade};
use edge_router::telemetry::logging;

/// Default config file of `run` and `check`: where the Dockerfile and the systemd unit put it.
const DEFAULT_CONFIG: &str = "/etc/edge-router/edge-router.toml";

#[derive(Parser)]
#[command(
    name = "edge-router",
    version,
    about = "A latency-aware reverse proxy: every request goes to the nearest healthy zone."
)]
struct Cli {
    /// Still accepted before the subcommand (`edge-router --log-format json run`), as before;
    /// documented on the subcommands that log.
    #[arg(long, value_enum, hide = true)]
    log_format: Option<logging::Format>,
    #[arg(long, hide = true)]
    workers: Option<usize>,
    #[command(subcommand)]
    command: Command,
}

/// Flags of the commands that serve traffic.
#[derive(clap::Args)]
struct Runtime {
    /// Log format.
    #[arg(long, value_enum)]
    log_format: Option<logging::Format>,
    /// Worker threads of the runtime (default: one per core). With 1, the whole process runs
    /// on one thread (tokio's current-thread scheduler): no cross-thread wake-ups.
    #[arg(long)]
    workers: Option<usize>,
}

#[derive(Subcommand)]
enum Command {
    /// Run in the foreground until SIGTERM or SIGINT; SIGHUP reloads the config; SIGUSR2
    /// starts the binary again and hands it the listening sockets (upgrade without downtime).
    Run {
        /// Config file.
        #[arg(short, long, default_value = DEFAULT_CONFIG)]
        config: PathBuf,
        /// Data plane as one thread per worker (--workers N, default one per core), each with
        /// its own current-thread runtime and its own listener socket (SO_REUSEPORT: the kernel
        /// spreads connections); admin, probes and DNS run on the main thread. Without it, one
        /// multi-thread runtime runs everything. No effect with --workers 1.
        #[arg(long)]
        thread_per_core: bool,
        #[command(flatten)]
        runtime: Runtime,
    },
    /// Parse and validate a config file, print a one-line summary.
    Check {
        /// Config file.
        #[arg(short, long, default_value = DEFAULT_CONFIG)]
        config: PathBuf,
    },
    /// Start simulated regions and zones on loopback with the router in front.
    ///
    /// Logs stay quiet unless RUST_LOG says otherwise: warnings only (an endpoint going down
    /// or coming back, an ejection).
    Demo {
        /// Data plane address.
        #[arg(long, default_value = config::DEFAULT_LISTENER)]
        listen: SocketAddr,
        /// Admin address.
        #[arg(long, default_value = config::DEFAULT_ADMIN)]
        admin: SocketAddr,
        /// Drive traffic and faults on a timer and print what happens.
        #[arg(long, value_enum)]
        scenario: Option<demo::scenario::Scenario>,
        /// Stop when the scenario is done (exit 1 if a step did not happen in time).
        #[arg(long, requires = "scenario")]
        exit_after: bool,
        /// Log every request (target `access`); off in the demo so its banner stays in view.
        #[arg(long)]
        access_log: bool,
        #[command(flatten)]
        runtime: Runtime,
    },
    /// Show the routing picture of a running router: zones nearest first, health, traffic,
    /// and each zone's last minutes as sparklines.
    Status {
        /// Admin address of the router.
        #[arg(long, default_value = config::DEFAULT_ADMIN, value_parser = status::parse_admin)]
        admin: String,
        /// Redraw every interval until Ctrl-C (on a terminal; into a pipe or file, one
        /// picture after another, without screen-clearing codes).
        #[arg(long)]
        watch: bool,
        /// Redraw interval with --watch.
        #[arg(long, default_value = "1s", value_parser = config::parse_duration)]
        interval: std::time::Duration,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // A flag given after the subcommand wins over the same flag given before it.
    let pick = |r: &Runtime| {
        (
            r.log_format
                .or(cli.log_format)
                .unwrap_or(logging::Format::Text),
            r.workers.or(cli.workers),
        )
    };
    match &cli.command {
        Command::Check { config } => match config::load(config) {
            Ok(c) => {
                for w in &c.warnings {
                    eprintln!("warning: {w}");
                }
                println!("{}", c.summary());
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("error: {e}");
                ExitCode::from(2)
            }
        },
        Command::Run {
            config,
            thread_per_core,
            runtime,
        } => {
            let (log_format, workers) = pick(runtime);
            let cfg = match config::load(config) {
                Ok(c) => c,
                Err(e) => {
                    eprintln!("error: {e}");
                    if config.as_os_str() == DEFAULT_CONFIG && !config.exists() {
                        eprintln!("hint: give the config file with -c FILE");
                    }
                    return ExitCode::from(2);
                }
            };
            // Before any other thread starts (it edits the environment).
            let takeover = match upgrade::receive() {
                Ok(t) => t,
                Err(e) => {
                    eprintln!("error: {e}");
                    return ExitCode::from(1);
                }
            };
            let relaunch = upgrade::Relaunch::current();
            let _guard = logging::init(log_format);
            for w in &cfg.warnings {
                tracing::warn!("{w}");
            }
            let relaunch = relaunch
                .map_err(|e| tracing::warn!("SIGUSR2 upgrades disabled: own path unknown: {e}"))
                .ok();
            let start = Start {
                path: config.clone(),
                takeover,
                relaunch,
            };
            let per_core = thread_per_core
                .then(|| {
                    workers.unwrap_or_else(|| {
                        std::thread::available_parallelism().map_or(1, |n| n.get())
                    })
                })
                .filter(|n| *n > 1);
            match per_core {
                // The control plane needs no more than one thread.
                Some(n) => with_runtime(Some(1), run(cfg, start, server::DataPlane::PerCore(n))),
                None => {
                    let (workers, why) = server::runtime_workers(workers);
                    tracing::info!("{why}");
                    with_runtime(workers, run(cfg, start, server::DataPlane::Shared))
                }
            }
        }
        Command::Demo {
            listen,
            admin,
            scenario,
            exit_after,
            access_log,
            runtime,
        } => {
            let (log_format, workers) = pick(runtime);
            if std::env::var_os("RUST_LOG").is_none() {
                // Keep the banner and the scenario's story readable; RUST_LOG still wins.
                let quiet = if scenario.is_some() {
                    "warn,proxy=error,health=error"
                } else if *access_log {
                    "warn,access=info"
                } else {
                    "warn"
                };
                std::env::set_var("RUST_LOG", quiet);
            }
            let _guard = logging::init(log_format);
            let opts = DemoOptions {
                listen: *listen,
                admin: *admin,
                scenario: scenario.map(|s| (s, *exit_after)),
                access_log: *access_log,
            };
            with_runtime(workers, run_demo(opts))
        }
        Command::Status {
            admin,
            watch,
            interval,
        } => with_runtime(
            Some(1),
            status::run(status::Options {
                admin: admin.clone(),
                watch: *watch,
                interval: (*interval).max(std::time::Duration::from_millis(100)),
            }),
        ),
    }
}

fn with_runtime(
    workers: Option<usize>,
    fut: impl std::future::Future<Output = ExitCode>,
) -> ExitCode {
    let workers = workers.map(|n| n.max(1));
    // One worker: the current-thread scheduler does the same work without the work-stealing
    // machinery (measured in docs/benchmarks.md).
    let mut b = if workers == Some(1) {
        tokio::runtime::Builder::new_current_thread()
    } else {
        tokio::runtime::Builder::new_multi_thread()
    };
    b.enable_all();
    if let Some(n) = workers.filter(|n| *n > 1) {
        b.worker_threads(n);
    }
    match b.build() {
        Ok(rt) => rt.block_on(fut),
        Err(e) => {
            eprintln!("error: cannot start the runtime: {e}");
            ExitCode::from(1)
        }
    }
}

/// How `run` was started: its config file, the sockets of the process it replaces (after
/// SIGUSR2 there), how to start it again.
struct Start {
    path: PathBuf,
    takeover: Option<upgrade::Takeover>,
    relaunch: Option<upgrade::Relaunch>,
}

async fn run(cfg: config::Config, start: Start, plane: server::DataPlane) -> ExitCode {
    raise_open_files_limit(cfg.listener.max_connections);
    let running = match server::start_with(cfg, Some(start.path), plane).await {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: {e}");
            if let Some(t) = start.takeover {
                t.failed(&e.to_string());
            }
            return ExitCode::from(1);
        }
    };
    // Signals are handled before anyone is told this process serves.
    signals(running.router.clone(), start.relaunch);
    if let Some(t) = start.takeover {
        t.ready(&running.router);
    }
    upgrade::notify_systemd();
    running.wait().await;
    ExitCode::SUCCESS
}

/// Raises the soft limit on open files to the hard one, as Go's runtime and HAProxy do: the
/// usual soft default of 1024 would cap the router near 500 proxied connections (each holds
/// a client and an upstream socket) whatever `max_connections` says. Warns when even the
/// hard limit is below what `max_connections` needs.
fn raise_open_files_limit(max_connections: usize) {
    use rustix::process::{getrlimit, setrlimit, Resource, Rlimit};
    let now = getrlimit(Resource::Nofile);
    if now.current != now.maximum {
        let raised = Rlimit {
            current: now.maximum,
            maximum: now.maximum,
        };
        if let Err(e) = setrlimit(Resource::Nofile, raised) {
            tracing::warn!("could not raise the open files limit to the hard limit: {e}");
        }
    }
    // Two sockets per connection, and some for listeners, probes, pools and logs.
    let need = (max_connections as u64)
        .saturating_mul(2)
        .saturating_add(256);
    if let Some(limit) = getrlimit(Resource::Nofile).current {
        if limit < need {
            tracing::warn!(
                "open files limit is {limit}, below the {need} that listener.max_connections = \
                 {max_connections} needs; raise the hard limit (ulimit -Hn, LimitNOFILE=)"
            );
        }
    }
}

/// SIGHUP reloads (and reopens the access log); SIGUSR1 reopens the access log; SIGTERM and
/// SIGINT drain and stop; SIGUSR2 upgrades when `relaunch` says how.
fn signals(router: Arc<server::Router>, relaunch: Option<upgrade::Relaunch>) {
    use tokio::signal::unix::{signal, SignalKind};
    // Handled even without `relaunch`: SIGUSR2's default action would kill the process.
    let r = router.clone();
    match signal(SignalKind::user_defined2()) {
        Ok(mut usr2) => {
            tokio::spawn(async move {
                while usr2.recv().await.is_some() {
                    match &relaunch {
                        Some(how) => drop(tokio::spawn(upgrade::upgrade(r.clone(), how.clone()))),
                        None => tracing::warn!("SIGUSR2 ignored: only `edge-router run` upgrades"),
                    }
                }
            });
        }
        Err(e) => tracing::warn!("SIGUSR2 upgrades disabled: {e}"),
    }
    let r = router.clone();
    tokio::spawn(async move {
        let Ok(mut usr1) = signal(SignalKind::user_defined1()) else {
            return;
        };
        while usr1.recv().await.is_some() {
            let r = r.clone();
            let _ = tokio::task::spawn_blocking(move || r.reopen_logs()).await;
        }
    });
    let r = router.clone();
    tokio::spawn(async move {
        let Ok(mut hup) = signal(SignalKind::hangup()) else {
            return;
        };
        while hup.recv().await.is_some() {
            let r = r.clone();
            let _ = tokio::task::spawn_blocking(move || r.reload()).await;
        }
    });
    tokio::spawn(async move {
        let (Ok(mut term), Ok(mut int)) = (
            signal(SignalKind::terminate()),
            signal(SignalKind::interrupt()),
        ) else {
            return;
        };
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
        }
        router.shutdown();
    });
}

struct DemoOptions {
    listen: SocketAddr,
    admin: SocketAddr,
    scenario: Option<(demo::scenario::Scenario, bool)>,
    access_log: bool,
}

async fn run_demo(opts: DemoOptions) -> ExitCode {
    let DemoOptions {
        listen,
        admin,
        scenario,
        access_log,
    } = opts;
    let d = match demo::Demo::start().await {
        Ok(d) => Arc::new(d),
        Err(e) => {
            eprintln!("error: cannot start the demo backends: {e}");
            return ExitCode::from(1);
        }
    };
    let text = d.config_toml(listen, admin, access_log);
    let cfg = match config::parse("demo (embedded)", &text, &|_| None) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(1);
        }
    };
    let running = match server::start(cfg, None).await {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(1);
        }
    };
    if let Ok(mut slot) = running.router.zone_controls.lock() {
        *slot = Some(d.clone());
    }
    let (l, a) = (running.router.data_addr, running.router.admin_addr);
    let zones: Vec<String> = d
        .zones
        .iter()
        .map(|z| format!("{} ({}, ~{} ms)", z.zone, z.region, z.latency_ms))
        .collect();
    println!(
        r#"
edge-router demo: you are in us-east-1a. Simulated zones: {zones}

  Dashboard:   http://{a}/
  Try:         curl -i http://{l}/hello          (see x-edge-route: which zone answered, and why)
  Routing:     curl -s http://{a}/routes
  Zone down:   curl -X POST http://{a}/demo/zones/us-east-1a/down   then curl http://{l}/ again
  Zone back:   curl -X POST http://{a}/demo/zones/us-east-1a/up
  Slow zone:   curl -X POST http://{a}/demo/zones/us-east-1a/slow   (undo it with .../up)
  Metrics:     curl -s http://{a}/metrics | grep edge_router_requests_total
  Terminal:    edge-router status --admin {a} --watch
  History:     curl -s http://{a}/history   (per-zone samples, one a second, last 5 minutes)
  Logs:        warnings only (endpoints down or back); --access-log or RUST_LOG=info for more
  Story:       edge-router demo --scenario failover   (or latency, spillover: traffic and faults on a timer)
  Stop:        Ctrl-C
"#,
        zones = zones.join(", ")
    );
    signals(running.router.clone(), None);
    let script = scenario.map(|(s, exit_after)| {
        let router = running.router.clone();
        tokio::spawn(async move {
            let r = demo::scenario::run(s, router.clone(), d, Default::default()).await;
            if let Err(e) = &r {
                eprintln!("error: scenario {}: {e}", s.name());
            }
            if exit_after {
                router.shutdown();
            } else {
                println!("The demo keeps running: dashboard http://{a}/, Ctrl-C to stop.");
            }
            !exit_after || r.is_ok()
        })
    });
    running.wait().await;
    match script {
        Some(h) if h.is_finished() => match h.await {
            Ok(true) => ExitCode::SUCCESS,
            _ => ExitCode::from(1),
        },
        _ => ExitCode::SUCCESS,
    }
}
