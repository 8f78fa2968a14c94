//! The routing brain's cost: the per-request pick and a full table rebuild, for a table of
//! 3 regions x 3 zones with 10, 100 and 500 endpoints. `cargo bench --bench routing`.

use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::{black_box, criterion_group, criterion_main, BenchmarkId, Criterion};
use edge_router::config::{parse, Config};
use edge_router::routing::balancer;
use edge_router::routing::table::{
    ClusterInput, ClusterRuntime, EndpointEntry, RoutingTable, TableBuilder,
};
use edge_router::routing::Reason;
use edge_router::state::{EndpointState, Status};
use edge_router::telemetry::metrics::{ClusterMetrics, Metrics};

fn config() -> Config {
    let text = r#"
[locality]
region = "r0"
zone = "r0-z0"
[[cluster]]
name = "api"
[[cluster.endpoint]]
address = "127.0.0.1:1"
region = "r0"
zone = "r0-z0"
[[route]]
cluster = "api"
"#;
    parse("bench", text, &|_| None).expect("bench config")
}

struct Fixture {
    metrics: Metrics,
    config: Arc<Config>,
    endpoints: Vec<EndpointEntry>,
}

impl Fixture {
    fn new(n: usize) -> Fixture {
        let metrics = Metrics::new();
        let config = Arc::new(config());
        let decay = config.routing.decay();
        let endpoints = (0..n)
            .map(|i| {
                let (region, zone) = (i % 9 / 3, i % 3);
                let addr = ([127, 0, (i / 250) as u8, (i % 250) as u8 + 1], 8000).into();
                let e = EndpointState::detached(
                    "api",
                    addr,
                    &format!("r{region}"),
                    &format!("r{region}-z{zone}"),
                    &metrics,
                );
                e.force_status(Status::Healthy);
                e.observe(
                    Duration::from_micros(1000 + (i % 9) as u64 * 3000 + (i % 7) as u64 * 10),
                    decay,
                );
                EndpointEntry {
                    state: e,
                    weight: 100,
                }
            })
            .collect();
        Fixture {
            metrics,
            config,
            endpoints,
        }
    }

    fn build(&self, b: &mut TableBuilder) -> RoutingTable<()> {
        let shared = self.endpoints[0].state.shared().clone();
        let input = ClusterInput {
            config: self.config.clusters[0].clone(),
            runtime: Arc::new(ClusterRuntime {
                shared,
                client: (),
                metrics: ClusterMetrics::new(&self.metrics, "api", &Reason::LABELS),
            }),
            endpoints: self.endpoints.clone(),
        };
        b.build(
            1,
            self.config.clone(),
            vec![input],
            &|c, r, z| self.metrics.zone(c, r, z),
            Instant::now(),
        )
    }
}

fn pick(c: &mut Criterion) {
    let mut g = c.benchmark_group("pick");
    for n in [10usize, 100, 500] {
        let f = Fixture::new(n);
        let table = f.build(&mut TableBuilder::new());
        let cluster = &table.clusters[0];
        g.bench_with_input(BenchmarkId::from_parameter(n), &n, |b, _| {
            b.iter(|| balancer::pick(black_box(cluster), 1024).map(|p| p.endpoint.weight))
        });
    }
    g.finish();
}

fn rebuild(c: &mut Criterion) {
    let mut g = c.benchmark_group("table_rebuild");
    for n in [10usize, 100, 500] {
        let f = Fixture::new(n);
        let mut builder = TableBuilder::new();
        g.bench_with_input(BenchmarkId::from_parameter(n), &n, |b, _| {
            b.iter(|| f.build(&mut builder).generation)
        });
    }
    g.finish();
}

criterion_group!(benches, pick, rebuild);
criterion_main!(benches);
