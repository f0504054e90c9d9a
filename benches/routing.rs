//! Route matching with 10, 1k and 10k routes spread over exact hosts, wildcards and any-host
//! routes; the request hits a route in the middle of the table.

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion};
use http::Method;
use podgate_gateway::proxy::routing::{Route, Router};
use std::hint::black_box;

fn router(n: usize) -> Router<usize> {
    let routes = (0..n)
        .map(|i| {
            let hosts = match i % 3 {
                0 => vec![format!("svc{i}.example.com")],
                1 => vec![format!("*.team{i}.example.com")],
                _ => vec![],
            };
            let route = Route {
                name: format!("r{i}"),
                path_prefix: format!("/api/v{}/svc{i}", i % 4),
                methods: if i % 2 == 0 {
                    vec![Method::GET]
                } else {
                    vec![]
                },
                strip_prefix: false,
                answers_preflights: false,
                upstream: i,
            };
            (hosts, route)
        })
        .collect();
    Router::new(routes)
}

fn find(c: &mut Criterion) {
    let mut g = c.benchmark_group("route_match");
    for n in [10, 1_000, 10_000] {
        let r = router(n);
        let i = n / 2 - (n / 2) % 3; // an exact-host route
        let host = format!("svc{i}.example.com");
        let path = format!("/api/v{}/svc{i}/users/42", i % 4);
        g.bench_with_input(BenchmarkId::from_parameter(n), &r, |b, r| {
            b.iter(|| black_box(r.find(&host, &path, &Method::GET).is_found()))
        });
    }
    g.finish();
}

criterion_group!(benches, find);
criterion_main!(benches);
