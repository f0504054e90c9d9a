//! EndpointSlice → endpoints translation for one Service with one 1000-endpoint slice (the most
//! endpoints Kubernetes puts in one slice): what the gateway runs for a changed service on every
//! rebuild, [`ServiceState::endpoints`] with the upstream's port.
//!
//! The objects are decoded from JSON with k8s-openapi, as the watch decodes them, and look like a
//! real cluster's: every endpoint ready, with a Pod `targetRef`, a node, a zone and the port
//! resolved from a named targetPort.

use criterion::{criterion_group, criterion_main, Criterion};
use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use podgate_discovery::{PortRef, ServiceState};
use serde_json::json;
use std::collections::BTreeMap;
use std::hint::black_box;

const ENDPOINTS: usize = 1_000;

fn service() -> Service {
    serde_json::from_value(json!({
        "metadata": {"name": "web", "namespace": "default", "uid": "5f0c2a1e-7d3b-4a61-9a8e-0c1d2e3f4a5b"},
        "spec": {
            "type": "ClusterIP",
            "clusterIP": "10.96.12.34",
            "selector": {"app": "web"},
            "ports": [
                {"name": "http", "port": 8000, "targetPort": "http", "protocol": "TCP"},
                {"name": "metrics", "port": 9090, "targetPort": 9090, "protocol": "TCP"},
            ],
        },
    }))
    .expect("a valid Service")
}

fn slice() -> EndpointSlice {
    let endpoints: Vec<_> = (0..ENDPOINTS)
        .map(|i| {
            let node = i % 50;
            json!({
                "addresses": [format!("10.244.{}.{}", i / 250, i % 250 + 2)],
                "conditions": {"ready": true, "serving": true, "terminating": false},
                "nodeName": format!("node-{node}"),
                "zone": format!("zone-{}", ["a", "b", "c"][node % 3]),
                "targetRef": {
                    "kind": "Pod",
                    "name": format!("web-7c9f8d6b5-{i:05}"),
                    "namespace": "default",
                    "uid": format!("00000000-0000-4000-8000-{i:012}"),
                },
            })
        })
        .collect();
    serde_json::from_value(json!({
        "metadata": {
            "name": "web-x7k2p",
            "namespace": "default",
            "generateName": "web-",
            "labels": {
                "kubernetes.io/service-name": "web",
                "endpointslice.kubernetes.io/managed-by": "endpointslice-controller.k8s.io",
            },
        },
        "addressType": "IPv4",
        "ports": [
            {"name": "http", "port": 8080, "protocol": "TCP"},
            {"name": "metrics", "port": 9090, "protocol": "TCP"},
        ],
        "endpoints": endpoints,
    }))
    .expect("a valid EndpointSlice")
}

fn translate(c: &mut Criterion) {
    let slice = slice();
    let state = ServiceState {
        service: Some(service()),
        slices: BTreeMap::from([(
            slice.metadata.name.clone().unwrap(),
            std::sync::Arc::new(slice),
        )]),
        pods: None,
    };
    // The upstream names the Service port by number, as `port: 8000` in the config does.
    let port = PortRef::Number(8000);
    let endpoints = state.endpoints(&port).expect("port 8000 resolves");
    assert_eq!(endpoints.len(), ENDPOINTS);
    assert!(endpoints.iter().all(|e| e.ready && e.addr.port() == 8080));

    c.bench_function("slice_to_endpoints_1000", |b| {
        b.iter(|| black_box(black_box(&state).endpoints(black_box(&port))))
    });
}

criterion_group!(benches, translate);
criterion_main!(benches);
