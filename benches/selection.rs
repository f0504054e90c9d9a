//! Smooth weighted selection: one pick with 3, 1k and 10k backends in a few weight classes, and a
//! rebuild of a 10k-backend selection after one endpoint changed.

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion};
use podgate_gateway::balance::{Backend, Balancer, Selection};
use std::hint::black_box;
use std::net::SocketAddr;

fn backends(n: usize) -> Vec<Backend> {
    (0..n)
        .map(|i| Backend {
            addr: SocketAddr::from(([10, (i >> 16) as u8, (i >> 8) as u8, i as u8], 8080)),
            // Three services with different weights, as an upstream with a canary would have.
            weight: [10, 10, 1][i % 3],
            info: Default::default(),
        })
        .collect()
}

fn pick(c: &mut Criterion) {
    let mut g = c.benchmark_group("pick");
    for n in [3, 1_000, 10_000] {
        let b = Balancer::new(Selection::new(backends(n)));
        g.bench_with_input(BenchmarkId::from_parameter(n), &b, |bench, b| {
            bench.iter(|| black_box(b.pick(|_| false)))
        });
    }
    g.finish();
}

fn rebuild(c: &mut Criterion) {
    // As an upstream hands them over: service by service, each service's endpoints sorted by
    // address (the store keeps them so), one endpoint moved to another port.
    let all = backends(10_000);
    let mut by_service: Vec<Backend> = Vec::new();
    for svc in 0..3 {
        let mut eps: Vec<Backend> = all.iter().skip(svc).step_by(3).cloned().collect();
        eps.sort_by_key(|b| b.addr);
        by_service.extend(eps);
    }
    by_service[5_000].addr.set_port(8081);
    c.bench_function("rebuild_10k_one_changed", |bench| {
        bench.iter(|| black_box(Selection::new(by_service.clone())))
    });
    // Worst case: weights interleaved, addresses in no order.
    let mut shuffled = backends(10_000);
    shuffled[5_000].addr.set_port(8081);
    c.bench_function("rebuild_10k_unordered", |bench| {
        bench.iter(|| black_box(Selection::new(shuffled.clone())))
    });
}

criterion_group!(benches, pick, rebuild);
criterion_main!(benches);
