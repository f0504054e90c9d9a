//! One endpoint changes in a 10,000-endpoint upstream: what podgate does between a watch event
//! and the new selection being live, minus decoding the event. The store takes the Service's new
//! state (one of its slices replaced), and the upstream rebuilds: it translates the changed
//! service's slices, builds that service's backends, and puts the new selection together with
//! the other 19 services' backends as they were.
//!
//! 20 services of 500 endpoints each (5 slices of 100), as in `tests/discovery_scale.rs` but
//! all in one upstream. The allocator is the binary's (mimalloc).

use criterion::{criterion_group, criterion_main, Criterion};
use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use podgate_discovery::{ServiceKey, ServiceState, Store};
use podgate_gateway::upstream::Upstreams;
use serde_json::json;
use std::collections::BTreeMap;
use std::sync::Arc;

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

const SERVICES: usize = 20;
const SLICES: usize = 5;
const PER_SLICE: usize = 100;

fn service(s: usize) -> Service {
    serde_json::from_value(json!({
        "metadata": {"name": format!("svc{s}"), "namespace": "default"},
        "spec": {"ports": [{"name": "http", "port": 8000, "targetPort": "http"}]},
    }))
    .expect("a valid Service")
}

/// Slice `k` of service `s`; `moved` puts its first endpoint on another address.
fn slice(s: usize, k: usize, moved: bool) -> Arc<EndpointSlice> {
    let endpoints: Vec<_> = (0..PER_SLICE)
        .map(|i| {
            let last = if i == 0 && moved { 200 } else { i + 1 };
            json!({
                "addresses": [format!("10.{s}.{k}.{last}")],
                "conditions": {"ready": true},
                "nodeName": format!("node-{}", i % 50),
                "targetRef": {"kind": "Pod", "name": format!("svc{s}-{k}-{i}"), "namespace": "default"},
            })
        })
        .collect();
    Arc::new(
        serde_json::from_value(json!({
            "metadata": {"name": format!("svc{s}-{k}"), "namespace": "default",
                         "labels": {"kubernetes.io/service-name": format!("svc{s}")}},
            "addressType": "IPv4",
            "ports": [{"name": "http", "port": 8080}],
            "endpoints": endpoints,
        }))
        .expect("a valid EndpointSlice"),
    )
}

fn state(s: usize, moved: bool) -> ServiceState {
    ServiceState {
        service: Some(service(s)),
        slices: (0..SLICES)
            .map(|k| (format!("svc{s}-{k}"), slice(s, k, moved && k == 0)))
            .collect::<BTreeMap<_, _>>(),
        pods: None,
    }
}

fn rebuild(c: &mut Criterion) {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(dir.path().join("cluster")).unwrap();
    let mut conf = String::from(
        "listeners: [{address: \"127.0.0.1:1\"}]\nclusters:\n  - {name: c, manifests: cluster}\n\
         upstreams:\n  - name: big\n    services:\n",
    );
    for s in 0..SERVICES {
        conf.push_str(&format!(
            "      - {{cluster: c, service: svc{s}, port: 8000}}\n"
        ));
    }
    conf.push_str("routes:\n  - {name: big, path_prefix: /, upstream: big}\n");
    let path = dir.path().join("podgate.yaml");
    std::fs::write(&path, conf).unwrap();
    let config = podgate_gateway::config::load(&path).expect("a valid config");

    let store = Store::new();
    for s in 0..SERVICES {
        store.set(
            ServiceKey::new("c", "default", format!("svc{s}")),
            Some(state(s, false)),
        );
    }
    let upstreams = Upstreams::new(&config.upstreams, store.clone()).unwrap();
    let big = upstreams.by_name["big"].clone();
    assert_eq!(big.selection().len(), SERVICES * SLICES * PER_SLICE);

    // Service 7's first slice alternates between two versions; the other slices stay shared.
    let key = ServiceKey::new("c", "default", "svc7");
    let base = state(7, false);
    let versions = [false, true].map(|moved| {
        let mut next = base.clone();
        next.slices.insert("svc7-0".into(), slice(7, 0, moved));
        next
    });
    let mut n = 0;
    c.bench_function("store_update_and_rebuild_10k_one_changed", |b| {
        b.iter(|| {
            n += 1;
            store.set(key.clone(), Some(versions[n % 2].clone()));
            big.rebuild(&store)
        })
    });
    assert_eq!(big.selection().len(), SERVICES * SLICES * PER_SLICE);
}

criterion_group!(benches, rebuild);
criterion_main!(benches);
