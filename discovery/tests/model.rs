//! `ServiceState::endpoints`: the Kubernetes port and condition contract.

use std::net::SocketAddr;

use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use podgate_discovery::{Endpoint, PortRef, ResolveError, ServiceState};
use serde_json::{json, Value};

fn service(ports: Value) -> Service {
    serde_json::from_value(json!({
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"name": "httpbin", "namespace": "default"},
        "spec": {"ports": ports},
    }))
    .unwrap()
}

fn slice(name: &str, address_type: &str, ports: Value, endpoints: Value) -> EndpointSlice {
    serde_json::from_value(json!({
        "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
        "metadata": {"name": name, "labels": {"kubernetes.io/service-name": "httpbin"}},
        "addressType": address_type,
        "ports": ports,
        "endpoints": endpoints,
    }))
    .unwrap()
}

fn state(service: Option<Service>, slices: Vec<EndpointSlice>) -> ServiceState {
    ServiceState {
        service,
        slices: slices
            .into_iter()
            .map(|s| (s.metadata.name.clone().unwrap(), s))
            .collect(),
    }
}

fn httpbin_service() -> Service {
    service(json!([
        {"name": "http", "port": 8000, "targetPort": 80},
        {"name": "metrics", "port": 9090, "targetPort": "metrics"},
    ]))
}

fn addrs(endpoints: &[Endpoint]) -> Vec<String> {
    endpoints.iter().map(|e| e.addr.to_string()).collect()
}

#[test]
fn port_by_number_and_by_name_resolve_to_the_slice_target_port() {
    let s = state(
        Some(httpbin_service()),
        vec![slice(
            "httpbin-abc",
            "IPv4",
            json!([{"name": "http", "port": 80}, {"name": "metrics", "port": 9100}]),
            json!([{
                "addresses": ["10.0.0.1"],
                "conditions": {"ready": true},
                "targetRef": {"kind": "Pod", "name": "httpbin-1"},
                "nodeName": "node-a",
                "zone": "z1",
            }]),
        )],
    );
    let by_number = s.endpoints(&PortRef::Number(8000)).unwrap();
    assert_eq!(
        by_number,
        vec![Endpoint {
            addr: "10.0.0.1:80".parse().unwrap(),
            ready: true,
            serving: true,
            terminating: false,
            pod: Some("httpbin-1".into()),
            node: Some("node-a".into()),
            zone: Some("z1".into()),
            slice: "httpbin-abc".into(),
        }]
    );
    assert_eq!(
        s.endpoints(&PortRef::Name("http".into())).unwrap(),
        by_number
    );
    assert_eq!(
        addrs(&s.endpoints(&PortRef::Name("metrics".into())).unwrap()),
        ["10.0.0.1:9100"]
    );
}

#[test]
fn unnamed_single_port() {
    let s = state(
        Some(service(json!([{"port": 8000, "targetPort": 8080}]))),
        vec![slice(
            "a",
            "IPv4",
            json!([{"port": 8080}]),
            json!([{"addresses": ["10.0.0.1"]}]),
        )],
    );
    assert_eq!(
        addrs(&s.endpoints(&PortRef::Number(8000)).unwrap()),
        ["10.0.0.1:8080"]
    );
    // An empty name is the same as none.
    let s = state(
        Some(service(json!([{"name": "", "port": 8000}]))),
        vec![slice(
            "a",
            "IPv4",
            json!([{"name": "", "port": 8080}]),
            json!([{"addresses": ["10.0.0.1"]}]),
        )],
    );
    assert_eq!(
        addrs(&s.endpoints(&PortRef::Number(8000)).unwrap()),
        ["10.0.0.1:8080"]
    );
}

#[test]
fn slices_are_merged_sorted_and_resolved_per_slice() {
    let s = state(
        Some(httpbin_service()),
        vec![
            slice(
                "b",
                "IPv4",
                json!([{"name": "http", "port": 80}]),
                json!([{"addresses": ["10.0.0.3"]}, {"addresses": ["10.0.0.1"]}]),
            ),
            // A named targetPort may be another number in other Pods.
            slice(
                "a",
                "IPv4",
                json!([{"name": "http", "port": 8080}]),
                json!([{"addresses": ["10.0.0.2"]}]),
            ),
            // No port of that name: contributes nothing.
            slice(
                "c",
                "IPv4",
                json!([{"name": "metrics", "port": 9100}]),
                json!([{"addresses": ["10.0.0.9"]}]),
            ),
        ],
    );
    assert_eq!(
        addrs(&s.endpoints(&PortRef::Name("http".into())).unwrap()),
        ["10.0.0.1:80", "10.0.0.2:8080", "10.0.0.3:80"]
    );
}

#[test]
fn an_address_in_two_slices_appears_once_keeping_the_ready_one() {
    let moving = |ready: bool| json!([{"addresses": ["10.0.0.1"], "conditions": {"ready": ready}}]);
    for (first, second) in [(false, true), (true, false)] {
        let s = state(
            Some(httpbin_service()),
            vec![
                slice(
                    "a",
                    "IPv4",
                    json!([{"name": "http", "port": 80}]),
                    moving(first),
                ),
                slice(
                    "b",
                    "IPv4",
                    json!([{"name": "http", "port": 80}]),
                    moving(second),
                ),
            ],
        );
        let endpoints = s.endpoints(&PortRef::Number(8000)).unwrap();
        assert_eq!(endpoints.len(), 1);
        assert!(endpoints[0].ready);
        assert_eq!(endpoints[0].slice, if first { "a" } else { "b" });
    }
}

#[test]
fn conditions_follow_the_kubernetes_defaults() {
    let s = state(
        Some(httpbin_service()),
        vec![slice(
            "a",
            "IPv4",
            json!([{"name": "http", "port": 80}]),
            json!([
                {"addresses": ["10.0.0.1"]},
                {"addresses": ["10.0.0.2"], "conditions": {}},
                {"addresses": ["10.0.0.3"], "conditions": {"ready": false}},
                {"addresses": ["10.0.0.4"], "conditions": {"ready": false, "serving": true, "terminating": true}},
                {"addresses": ["10.0.0.5"], "conditions": {"ready": false, "serving": false, "terminating": true}},
            ]),
        )],
    );
    let got: Vec<(SocketAddr, bool, bool, bool)> = s
        .endpoints(&PortRef::Number(8000))
        .unwrap()
        .into_iter()
        .map(|e| (e.addr, e.ready, e.serving, e.terminating))
        .collect();
    let at = |ip: &str| format!("{ip}:80").parse().unwrap();
    assert_eq!(
        got,
        vec![
            (at("10.0.0.1"), true, true, false),
            (at("10.0.0.2"), true, true, false),
            (at("10.0.0.3"), false, false, false),
            (at("10.0.0.4"), false, true, true),
            (at("10.0.0.5"), false, false, true),
        ]
    );
}

#[test]
fn fqdn_slices_and_bad_addresses_are_ignored_ipv6_works() {
    let s = state(
        Some(httpbin_service()),
        vec![
            slice(
                "fqdn",
                "FQDN",
                json!([{"name": "http", "port": 80}]),
                json!([{"addresses": ["httpbin.example.com"]}]),
            ),
            slice(
                "v6",
                "IPv6",
                json!([{"name": "http", "port": 80}]),
                json!([{"addresses": ["fd00::1"]}, {"addresses": ["not-an-ip"]}]),
            ),
            slice(
                "v4",
                "IPv4",
                json!([{"name": "http", "port": 80}]),
                json!([{"addresses": ["10.0.0.1"]}, {"addresses": ["10.0.0.300"]}]),
            ),
        ],
    );
    assert_eq!(
        addrs(&s.endpoints(&PortRef::Number(8000)).unwrap()),
        ["10.0.0.1:80", "[fd00::1]:80"]
    );
}

#[test]
fn only_the_first_address_of_an_endpoint_is_used() {
    let s = state(
        Some(httpbin_service()),
        vec![slice(
            "a",
            "IPv4",
            json!([{"name": "http", "port": 80}]),
            json!([{"addresses": ["10.0.0.2", "10.0.0.1"]}]),
        )],
    );
    assert_eq!(
        addrs(&s.endpoints(&PortRef::Number(8000)).unwrap()),
        ["10.0.0.2:80"]
    );
}

#[test]
fn missing_service_is_an_error() {
    let s = state(
        None,
        vec![slice(
            "a",
            "IPv4",
            json!([{"name": "http", "port": 80}]),
            json!([{"addresses": ["10.0.0.1"]}]),
        )],
    );
    assert_eq!(
        s.endpoints(&PortRef::Number(8000)),
        Err(ResolveError::NoService)
    );
}

#[test]
fn unknown_port_lists_the_available_ones() {
    let s = state(Some(httpbin_service()), vec![]);
    let err = s.endpoints(&PortRef::Number(8001)).unwrap_err();
    assert_eq!(
        err,
        ResolveError::NoSuchPort {
            wanted: PortRef::Number(8001),
            available: vec!["8000/http".into(), "9090/metrics".into()],
        }
    );
    assert_eq!(
        err.to_string(),
        "the Service has no port 8001 (its ports: 8000/http, 9090/metrics)"
    );
    assert!(matches!(
        s.endpoints(&PortRef::Name("grpc".into())),
        Err(ResolveError::NoSuchPort { .. })
    ));
}

#[test]
fn tcp_port_wins_over_udp_with_the_same_number() {
    let s = state(
        Some(service(json!([
            {"name": "dns", "port": 53, "protocol": "UDP"},
            {"name": "dns-tcp", "port": 53, "protocol": "TCP"},
        ]))),
        vec![slice(
            "a",
            "IPv4",
            json!([{"name": "dns", "port": 5353, "protocol": "UDP"}, {"name": "dns-tcp", "port": 5354}]),
            json!([{"addresses": ["10.0.0.1"]}]),
        )],
    );
    assert_eq!(
        addrs(&s.endpoints(&PortRef::Number(53)).unwrap()),
        ["10.0.0.1:5354"]
    );
    assert_eq!(
        s.endpoints(&PortRef::Name("dns".into())),
        Err(ResolveError::NotTcp {
            port: "53/dns".into(),
            protocol: "UDP".into()
        })
    );
}
