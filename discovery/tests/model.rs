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
            .map(|s| (s.metadata.name.clone().unwrap(), std::sync::Arc::new(s)))
            .collect(),
        pods: None,
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
                "hints": {"forZones": [{"name": "z1"}, {"name": "z2"}]},
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
            for_zones: Some(vec!["z1".into(), "z2".into()]),
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

// ---- label subsets ----

fn labels(pairs: &[(&str, &str)]) -> std::collections::BTreeMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

/// A Service with one slice whose endpoints are (ip, targetRef kind, Pod name).
fn pods_state(endpoints: &[(&str, &str, &str)]) -> ServiceState {
    let endpoints: Vec<Value> = endpoints
        .iter()
        .map(|(ip, kind, name)| {
            json!({
                "addresses": [ip],
                "targetRef": {"kind": kind, "name": name, "namespace": "default"},
            })
        })
        .collect();
    state(
        Some(httpbin_service()),
        vec![slice(
            "httpbin-abc",
            "IPv4",
            json!([{"name": "http", "port": 80}]),
            Value::Array(endpoints),
        )],
    )
}

#[test]
fn subset_keys_are_canonical_and_readable() {
    use podgate_discovery::ServiceKey;
    let whole = ServiceKey::new("prod-a", "default", "httpbin");
    assert_eq!(whole.subset, None);
    assert_eq!(whole.to_string(), "prod-a/default/httpbin");
    assert_eq!(whole.clone().with_labels(&labels(&[])), whole);

    // Sorted by label whatever the order given; Display stays readable.
    let v1 = whole
        .clone()
        .with_labels(&labels(&[("version", "v1"), ("app", "httpbin")]));
    assert_eq!(v1.subset.as_deref(), Some("app=httpbin,version=v1"));
    assert_eq!(
        v1.to_string(),
        "prod-a/default/httpbin{app=httpbin,version=v1}"
    );
    assert_eq!(v1.subset_labels(), [("app", "httpbin"), ("version", "v1")]);
    assert_eq!(v1.whole(), whole);

    // Two subsets of one Service are two keys, and neither is the whole Service.
    let v2 = whole.clone().with_labels(&labels(&[("version", "v2")]));
    assert_ne!(v1, v2);
    assert_ne!(v2, whole);
    assert!(whole.subset_labels().is_empty());
    // An empty value is a value (the label must be there, empty).
    let empty = whole.clone().with_labels(&labels(&[("canary", "")]));
    assert_eq!(empty.to_string(), "prod-a/default/httpbin{canary=}");
    assert_eq!(empty.subset_labels(), [("canary", "")]);
}

#[test]
fn only_pods_keeps_the_endpoints_of_the_named_pods() {
    let s = pods_state(&[
        ("10.0.0.1", "Pod", "httpbin-v1-a"),
        ("10.0.0.2", "Pod", "httpbin-v2-b"),
        ("10.0.0.3", "Pod", "httpbin-v1-c"),
        // Not a Pod: nothing says which labels it has.
        ("10.0.0.4", "Node", "httpbin-v1-a"),
    ]);
    let v1 = s.only_pods(|name| name.starts_with("httpbin-v1-"));
    assert_eq!(
        addrs(&v1.endpoints(&PortRef::Number(8000)).unwrap()),
        ["10.0.0.1:80", "10.0.0.3:80"]
    );
    // The Service and the slice stay (an emptied slice too), so ports still resolve.
    let none = s.only_pods(|_| false);
    assert_eq!(none.slices.len(), 1);
    assert_eq!(none.endpoints(&PortRef::Number(8000)), Ok(vec![]));
    assert_eq!(none.service, s.service);
}

#[test]
fn subset_filters_by_the_recorded_pod_labels() {
    let mut s = pods_state(&[
        ("10.0.0.1", "Pod", "a"),
        ("10.0.0.2", "Pod", "b"),
        ("10.0.0.3", "Pod", "c"),
        ("10.0.0.4", "Pod", "unknown"),
    ]);
    // Without Pod labels recorded, no subset can be computed.
    assert_eq!(s.subset(&[("version", "v1")]), None);
    s.pods = Some(
        [
            ("a", labels(&[("app", "httpbin"), ("version", "v1")])),
            ("b", labels(&[("app", "httpbin"), ("version", "v2")])),
            (
                "c",
                labels(&[("app", "httpbin"), ("version", "v1"), ("canary", "")]),
            ),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect(),
    );
    let ips = |labels: &[(&str, &str)]| {
        let subset = s.subset(labels).unwrap();
        assert_eq!(subset.pods, None, "a subset does not carry Pod labels");
        addrs(&subset.endpoints(&PortRef::Number(8000)).unwrap())
    };
    assert_eq!(ips(&[("version", "v1")]), ["10.0.0.1:80", "10.0.0.3:80"]);
    assert_eq!(ips(&[("version", "v2")]), ["10.0.0.2:80"]);
    // All labels must match.
    assert_eq!(
        ips(&[("app", "httpbin"), ("version", "v2")]),
        ["10.0.0.2:80"]
    );
    assert!(ips(&[("app", "web"), ("version", "v2")]).is_empty());
    // An empty value asks for the label to be there, empty; a missing label does not match.
    assert_eq!(ips(&[("canary", "")]), ["10.0.0.3:80"]);
    assert!(ips(&[("version", "v3")]).is_empty());
}
