//! Smooth weighted selection: one pick with 3, 1k and 10k backends in a few weight classes (and
//! 10k in 20 services' segments), and a 10k-backend selection after one endpoint changed: built
//! whole (what services sharing Pods still need) and side by side from segments (the usual path).

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion};
use podgate_gateway::upstream::balance::{Backend, Balancer, Segment, Selection};
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
    // As an upstream of 20 services builds it: one segment per service.
    let b = Balancer::new(Selection::from_segments(segments(10_000)));
    c.bench_function("pick_10000_in_20_services", |bench| {
        bench.iter(|| black_box(b.pick(|_| false)))
    });
}

/// `n` backends as 20 services' segments (two services of the three weights' kind each).
fn segments(n: usize) -> Vec<std::sync::Arc<Segment>> {
    let all = backends(n);
    (0..20)
        .map(|svc| Segment::new(all.iter().skip(svc).step_by(20).cloned().collect()))
        .collect()
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
    // What a rebuild does now: the 20 services' segments side by side, one of them new.
    let mut parts = segments(10_000);
    let mut changed: Vec<Backend> = parts[7].backends().to_vec();
    changed[0].addr.set_port(8081);
    parts[7] = Segment::new(changed);
    c.bench_function("selection_from_20_segments_10k", |bench| {
        bench.iter(|| black_box(Selection::from_segments(parts.clone())))
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
