//! Per-request cost of rate-limit decisions that need no Redis call: the local store's bucket
//! update (a key already tracked; a new key in a full table, which evicts), batched mode spending
//! a token of its lease, and a whole `RateLimits::check` of a route with one local rule (key
//! from the client address, the `RateLimit` fields formatted), with and without those fields.

use criterion::{criterion_group, criterion_main, Criterion};
use futures::FutureExt;
use podgate_gateway::config::{Rate, RateKey, RateLimitRule, RuleStore};
use podgate_gateway::policies::rate_limit::{
    clock, Gcra, Leases, LocalLimiter, RateLimits, Table, Take,
};
use podgate_gateway::policies::{Edits, Fields, RequestView};
use prometheus::{IntCounter, IntGauge};
use std::hint::black_box;
use std::net::{IpAddr, Ipv4Addr};
use std::time::Duration;

fn table(keys: usize) -> Table {
    Table::new(
        keys,
        IntGauge::new("keys", "k").unwrap(),
        IntCounter::new("evictions", "e").unwrap(),
    )
}

fn local(c: &mut Criterion) {
    let mut g = c.benchmark_group("rate_limit_local");
    // 1e9/s: never refused, so every iteration stores a new TAT (the CAS always happens).
    let l = LocalLimiter {
        gcra: Gcra::new(Duration::from_nanos(1), 1_000_000),
        table: table(65_536),
    };
    g.bench_function("hit", |b| {
        b.iter(|| black_box(l.check(black_box(0x1234_5678_9abc_def1), clock())))
    });
    // The baseline the table's opening comment compares with: the same GCRA update on a
    // `Mutex<HashMap>` (uncontended; contended it is worse, and a lock is not allowed).
    let gcra = l.gcra;
    let map = std::sync::Mutex::new(std::collections::HashMap::<u64, u64>::new());
    g.bench_function("mutex_hashmap_hit_baseline", |b| {
        b.iter(|| {
            let now = clock();
            let mut m = map.lock().unwrap();
            let tat = m.entry(black_box(0x1234_5678_9abc_def1)).or_insert(0);
            let (new, outcome) = gcra.decide(*tat, now);
            if let Some(new) = new {
                *tat = new;
            }
            black_box(outcome)
        })
    });
    // A 1024-slot table full of keys whose buckets are not full: each new key evicts one.
    let l = LocalLimiter {
        gcra: Gcra::new(Duration::from_secs(3600), 10),
        table: table(1024),
    };
    let mut k = 0u64;
    g.bench_function("new_key_at_cap_evicting", |b| {
        b.iter(|| {
            k = k.wrapping_add(0x9E37_79B9_7F4A_7C15);
            black_box(l.check(k | 1, clock()))
        })
    });
    g.finish();
}

fn batched(c: &mut Criterion) {
    let mut g = c.benchmark_group("rate_limit_batched");
    let l = Leases::new(table(65_536), 10, Duration::from_millis(20));
    let key = 0x0F0F_0F0F_1234_5678;
    g.bench_function("lease_served", |b| {
        b.iter(|| {
            let now_ms = clock() / 1_000_000;
            if l.take(key, now_ms) != Take::Served {
                // The Redis call a real refill makes is not measured here: deposit at once.
                l.deposit(key, 1_000_000, now_ms);
            }
        })
    });
    g.finish();
}

fn check(c: &mut Criterion) {
    let mut g = c.benchmark_group("rate_limit_check");
    let map = http::HeaderMap::new();
    let view = RequestView {
        method: &http::Method::GET,
        host: "api.example.com",
        path_and_query: "/orders/42",
        fields: Fields::Map(&map),
        peer: Some(IpAddr::V4(Ipv4Addr::new(127, 0, 0, 1))),
        client: Some(IpAddr::V4(Ipv4Addr::new(10, 1, 2, 3))),
        tls: false,
        grpc: false,
        content_length: None,
    };
    for headers in [true, false] {
        let rule = RateLimitRule {
            key: RateKey::ClientIp,
            rate: Rate {
                count: 1_000_000_000,
                per_secs: 1,
            },
            burst: 1_000_000,
            store: RuleStore::Local,
            max_keys: 65_536,
            headers,
        };
        let limits = RateLimits::new(&format!("bench-{headers}"), &[rule]).unwrap();
        let name = if headers {
            "local_rule_with_fields"
        } else {
            "local_rule_no_fields"
        };
        g.bench_function(name, |b| {
            b.iter(|| {
                let mut edits = Edits::default();
                let answer = limits
                    .check(&view, &mut edits)
                    .now_or_never()
                    .expect("no I/O");
                black_box((answer.is_none(), edits.response_add.len()))
            })
        });
    }
    g.finish();
}

criterion_group!(benches, local, batched, check);
criterion_main!(benches);
