//! The access line against `serde_json`'s reader: every line parses, keeps every field in the
//! README's order, and gives back exactly the values it was given, whatever bytes a client
//! (method, host, path, request id) or a Kubernetes object (Pod name) put in them. A failing
//! case is written to `gateway/proptest-regressions/proxy/log_line/tests.txt`; commit it.

use super::*;
use crate::proxy::{GatewayRoute, Target};
use crate::telemetry::metrics::RouteMetrics;
use crate::upstream::balance::{Backend, BackendInfo};
use crate::upstream::Upstream;
use proptest::prelude::*;
use serde_json::Value;
use std::net::SocketAddr;
use std::sync::{Arc, LazyLock};
use std::time::Duration;

/// Every key of the line, in the README's order.
const KEYS: [&str; 18] = [
    "time",
    "request_id",
    "client",
    "method",
    "host",
    "path",
    "route",
    "upstream",
    "cluster",
    "pod",
    "pod_address",
    "status",
    "bytes",
    "duration_ms",
    "upstream_ms",
    "retries",
    "grpc_status",
    "ended",
];

static ROUTE: LazyLock<GatewayRoute> = LazyLock::new(|| {
    let config = crate::config::parse(
        "log_line.yaml",
        "listeners: [{address: \"127.0.0.1:1\"}]\n\
         upstreams:\n  - {name: web-pods, nodes: [{address: \"127.0.0.1:2\"}]}\n\
         routes:\n  - {name: web-route, path_prefix: /, upstream: web-pods}\n",
        std::path::Path::new("/"),
    )
    .expect("valid config");
    let upstream = Upstream::new(config.upstreams[0].clone()).expect("upstream");
    crate::proxy::routing::Route {
        name: "web-route".into(),
        path_prefix: "/".into(),
        methods: Vec::new(),
        strip_prefix: false,
        answers_preflights: false,
        upstream: Target {
            upstream: Arc::new(upstream),
            metrics: RouteMetrics::new("web-route", "web-pods"),
            policies: crate::policies::Policies::default(),
            trusted: Default::default(),
        },
    }
});

fn line(f: &LogFields) -> Vec<u8> {
    let mut out = Vec::new();
    write_line(f, &mut out);
    out
}

/// The keys of a JSON object in the order the text has them (`serde_json::Value` sorts them).
fn keys_in_order(text: &str) -> Vec<String> {
    struct Keys(Vec<String>);
    impl<'de> serde::Deserialize<'de> for Keys {
        fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
            struct V;
            impl<'de> serde::de::Visitor<'de> for V {
                type Value = Keys;
                fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                    f.write_str("an object")
                }
                fn visit_map<A: serde::de::MapAccess<'de>>(
                    self,
                    mut m: A,
                ) -> Result<Keys, A::Error> {
                    let mut keys = Vec::new();
                    while let Some((k, _)) = m.next_entry::<String, serde::de::IgnoredAny>()? {
                        keys.push(k);
                    }
                    Ok(Keys(keys))
                }
            }
            d.deserialize_map(V)
        }
    }
    serde_json::from_str::<Keys>(text).expect("an object").0
}

/// The number after `"key":` in `text`, read by Rust's (correctly rounding) parser; `None` for
/// `null`. The keys come before any client-given text or after all of it, so the first
/// match is the key's.
fn raw_number(text: &str, key: &str) -> Option<f64> {
    let pattern = format!("\"{key}\":");
    let at = text.find(&pattern)? + pattern.len();
    let rest = &text[at..];
    let end = rest.find([',', '}']).unwrap_or(rest.len());
    match &rest[..end] {
        "null" => None,
        n => Some(n.parse().expect("a number")),
    }
}

#[test]
fn a_full_line_has_every_field_in_order() {
    let backend = Backend {
        addr: "10.1.2.3:80".parse().unwrap(),
        weight: 1,
        info: Arc::new(BackendInfo {
            cluster: Some("prod-a".into()),
            pod: Some("httpbin-v1-6d8f9".into()),
            ..Default::default()
        }),
    };
    let f = LogFields {
        request_id: "3f1c",
        client: Some("10.0.3.7:51234".parse().unwrap()),
        method: "GET",
        host: "api.example.com",
        path: "/httpbin/get",
        route: Some(&ROUTE),
        backend: Some(&backend),
        status: 200,
        bytes: 312,
        took: Duration::from_micros(1_900),
        first_byte: Some(Duration::from_micros(1_200)),
        retries: 0,
        grpc_status: Some("0"),
        ended: Some(crate::proxy::ended::CLIENT_WRITE_TIMEOUT),
        consumer: None,
    };
    let text = String::from_utf8(line(&f)).unwrap();
    assert_eq!(keys_in_order(&text), KEYS);
    let v: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(v["client"], "10.0.3.7:51234");
    assert_eq!(v["route"], "web-route");
    assert_eq!(v["upstream"], "web-pods");
    assert_eq!(v["cluster"], "prod-a");
    assert_eq!(v["pod"], "httpbin-v1-6d8f9");
    assert_eq!(v["pod_address"], "10.1.2.3:80");
    assert_eq!(v["status"], 200);
    assert_eq!(v["bytes"], 312);
    assert_eq!(v["duration_ms"], 1.9);
    assert_eq!(v["upstream_ms"], 1.2);
    assert_eq!(v["grpc_status"], "0");
    assert_eq!(v["ended"], "client_write_timeout");
    let time = v["time"].as_str().unwrap();
    assert_eq!(time.len(), 24);
    assert!(time.ends_with('Z') && time.as_bytes()[10] == b'T');
}

/// A consumer (set by a route's authenticating policy) comes last, escaped like every
/// client-controlled value; lines without one are unchanged.
#[test]
fn a_consumer_is_written_last_and_escaped() {
    let f = LogFields {
        request_id: "x",
        client: None,
        method: "GET",
        host: "",
        path: "/",
        route: None,
        backend: None,
        status: 200,
        bytes: 0,
        took: Duration::ZERO,
        first_byte: None,
        retries: 0,
        grpc_status: None,
        ended: None,
        consumer: Some("team \"a\"\n"),
    };
    let text = String::from_utf8(line(&f)).unwrap();
    let keys = keys_in_order(&text);
    assert_eq!(keys[..keys.len() - 1], KEYS[..]);
    assert_eq!(keys.last().map(String::as_str), Some("consumer"));
    let v: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(v["consumer"], "team \"a\"\n");
}

#[test]
fn a_line_without_route_or_pod_has_nulls() {
    let f = LogFields {
        request_id: "x",
        client: None,
        method: "GET",
        host: "",
        path: "/nowhere",
        route: None,
        backend: None,
        status: 404,
        bytes: 0,
        took: Duration::ZERO,
        first_byte: None,
        retries: 0,
        grpc_status: None,
        ended: None,
        consumer: None,
    };
    let text = String::from_utf8(line(&f)).unwrap();
    assert_eq!(keys_in_order(&text), KEYS);
    let v: Value = serde_json::from_str(&text).unwrap();
    for null in [
        "client",
        "route",
        "upstream",
        "cluster",
        "pod",
        "pod_address",
        "upstream_ms",
    ] {
        assert!(v[null].is_null(), "{null}");
    }
    assert_eq!(v["duration_ms"], 0.0);
}

/// Text a client or a Pod could send: anything, leaning on what JSON must escape.
fn text() -> impl Strategy<Value = String> {
    let nasty = prop_oneof![
        Just("\"".to_string()),
        Just("\\".to_string()),
        Just("\u{0}".to_string()),
        Just("\u{1f}".to_string()),
        Just("\u{7f}".to_string()),
        Just("\u{2028}\u{2029}".to_string()),
        Just("\r\n".to_string()),
        Just("\u{fffd}".to_string()),
        Just("😀".to_string()),
        Just("\\u0000".to_string()),
        any::<String>(),
        "[ -~]{0,8}",
    ];
    prop::collection::vec(nasty, 0..6).prop_map(|v| v.concat())
}

fn addr() -> impl Strategy<Value = Option<SocketAddr>> {
    prop_oneof![
        Just(None),
        any::<([u8; 4], u16)>().prop_map(|(ip, port)| Some(SocketAddr::from((ip, port)))),
        any::<([u16; 8], u16)>().prop_map(|(ip, port)| Some(SocketAddr::from((ip, port)))),
    ]
}

/// Every value of the access log's `ended`.
const ENDED: [&str; 5] = {
    use crate::proxy::ended::*;
    [
        CLIENT_WRITE_TIMEOUT,
        CLIENT_READ_TIMEOUT,
        CLIENT_CLOSED,
        UPSTREAM_TIMEOUT,
        UPSTREAM_CLOSED,
    ]
};

proptest! {
    #[test]
    fn every_line_parses_and_gives_back_its_values(
        request_id in text(), method in text(), host in text(), path in text(),
        cluster in prop::option::of(text()), pod in prop::option::of(text()),
        client in addr(), pod_addr in addr(),
        status in any::<u16>(), bytes in any::<u64>(), retries in any::<usize>(),
        took_ns in any::<u64>(), first_ns in prop::option::of(any::<u64>()),
        routed in any::<bool>(), grpc in prop::option::of(0usize..18),
        ended in prop::option::of(prop::sample::select(ENDED.to_vec())),
    ) {
        let backend = pod_addr.map(|addr| Backend {
            addr,
            weight: 1,
            info: Arc::new(BackendInfo {
                cluster: cluster.as_deref().map(Arc::from),
                pod: pod.as_deref().map(Arc::from),
                ..Default::default()
            }),
        });
        let took = Duration::from_nanos(took_ns);
        let first_byte = first_ns.map(Duration::from_nanos);
        let grpc_status = grpc.map(|i| crate::telemetry::metrics::GRPC_STATUS_LABELS[i]);
        let f = LogFields {
            request_id: &request_id,
            client,
            method: &method,
            host: &host,
            path: &path,
            route: routed.then_some(&*ROUTE),
            backend: backend.as_ref(),
            status,
            bytes,
            took,
            first_byte,
            retries,
            grpc_status,
            ended,
            consumer: None,
        };
        let bytes_out = line(&f);
        prop_assert!(!bytes_out.contains(&b'\n'), "one line");
        let text = std::str::from_utf8(&bytes_out).expect("UTF-8");
        prop_assert_eq!(keys_in_order(text), KEYS);
        let v: Value = serde_json::from_str(text).expect("valid JSON");
        prop_assert_eq!(&v["request_id"], &Value::from(request_id.as_str()));
        prop_assert_eq!(&v["method"], &Value::from(method.as_str()));
        prop_assert_eq!(&v["host"], &Value::from(host.as_str()));
        prop_assert_eq!(&v["path"], &Value::from(path.as_str()));
        let opt = |s: Option<&str>| s.map_or(Value::Null, Value::from);
        let back = backend.as_ref();
        prop_assert_eq!(&v["cluster"], &opt(back.and(cluster.as_deref())));
        prop_assert_eq!(&v["pod"], &opt(back.and(pod.as_deref())));
        prop_assert_eq!(&v["client"], &opt(client.map(|a| a.to_string()).as_deref()));
        prop_assert_eq!(&v["pod_address"], &opt(pod_addr.map(|a| a.to_string()).as_deref()));
        prop_assert_eq!(&v["route"], &opt(routed.then_some("web-route")));
        prop_assert_eq!(&v["upstream"], &opt(routed.then_some("web-pods")));
        prop_assert_eq!(v["status"].as_u64(), Some(u64::from(status)));
        prop_assert_eq!(v["bytes"].as_u64(), Some(bytes));
        prop_assert_eq!(v["retries"].as_u64(), Some(retries as u64));
        // serde_json's reader may be a unit off in the last place; Rust's is exact.
        prop_assert_eq!(raw_number(text, "duration_ms"), Some(took.as_secs_f64() * 1000.0));
        prop_assert_eq!(
            raw_number(text, "upstream_ms"),
            first_byte.map(|d| d.as_secs_f64() * 1000.0)
        );
        prop_assert_eq!(&v["grpc_status"], &opt(grpc_status));
        prop_assert_eq!(&v["ended"], &opt(ended));
    }
}
