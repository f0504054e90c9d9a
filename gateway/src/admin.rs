//! The admin listener: `/healthz`, `/readyz` and `/upstreams` (what podgate discovered).
//!
//! It runs as its own Pingora service on its own address (loopback by default), so scraping or
//! inspecting never competes with proxy traffic for a listener.

use crate::live::Live;
use async_trait::async_trait;
use http::Response;
use pingora_core::apps::http_app::ServeHttp;
use pingora_core::protocols::http::ServerSession;
use serde::{Serialize, Serializer};
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::sync::Arc;

pub struct Admin {
    pub live: Arc<Live>,
    pub lifecycle: Arc<crate::live::Lifecycle>,
    /// The bearer token every path but `/healthz` and `/readyz` needs, when one is configured.
    pub token: Option<String>,
    /// `/metrics` is open too (`admin.open_metrics`).
    pub open_metrics: bool,
}

/// Compares without an early exit, so the time taken says nothing about the token.
fn same(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// The effective config as JSON, with nothing secret in it (token files are named, not read).
fn config_json(c: &crate::config::Config) -> Value {
    use crate::config::{AccessLogSink, ClusterKind, Scheme};
    use podgate_discovery::Access;
    let dur = |d: std::time::Duration| format!("{}ms", d.as_millis());
    json!({
        "source": c.source.display().to_string(),
        "listeners": c.listeners.iter().map(|l| json!({
            "address": l.address.to_string(), "h2c": l.h2c,
            "tls": l.tls.as_ref().map(|t| json!({"cert": t.cert.display().to_string(),
                                                 "key": "(redacted)"})),
        })).collect::<Vec<_>>(),
        "admin": {"address": c.admin.address.to_string(),
                  "token_file": c.admin.token_file.as_ref().map(|_| "(redacted)"),
                  "open_metrics": c.admin.open_metrics},
        "server": {"threads": c.server.threads, "grace_period": dur(c.server.grace_period),
                   "drain_delay": dur(c.server.drain_delay),
                   "ready_timeout": dur(c.server.ready_timeout),
                   "upgrade_sock": c.server.upgrade_sock.display().to_string(),
                   "pid_file": c.server.pid_file.display().to_string(),
                   "zone": c.server.zone, "zone_from_node": c.server.zone_from_node.as_deref()},
        "clusters": c.clusters.iter().map(|cl| {
            let kind = match &cl.kind {
                ClusterKind::Manifests(d) => json!({"manifests": d.display().to_string()}),
                ClusterKind::Kube(Access::Kubeconfig { path, context }) =>
                    json!({"kubeconfig": path.display().to_string(), "context": context}),
                ClusterKind::Kube(Access::InCluster) => json!({"in_cluster": true}),
                ClusterKind::Kube(Access::Server { url, token_file, ca_file }) => json!({
                    "server": url,
                    "token_file": token_file.as_ref().map(|_| "(redacted)"),
                    "ca_file": ca_file.as_ref().map(|p| p.display().to_string()),
                }),
            };
            json!({"name": &*cl.name, "source": kind})
        }).collect::<Vec<_>>(),
        "upstreams": c.upstreams.iter().map(|u| json!({
            "name": u.name,
            "scheme": if u.scheme == Scheme::Https { "https" } else { "http" },
            "host_header": u.host_header, "tags": u.tags, "retries": u.retries,
            "balance": u.balance.to_string(), "zone_aware": u.zone_aware,
            "connect_timeout": dur(u.connect_timeout), "read_timeout": dur(u.read_timeout),
            "tls": {"sni": u.tls.sni, "verify": u.tls.verify,
                    "ca_file": u.tls.ca_file.as_ref().map(|p| p.display().to_string())},
            "outlier": {"consecutive_failures": u.outlier.consecutive_failures,
                        "base_ejection": dur(u.outlier.base_ejection),
                        "max_ejection_percent": u.outlier.max_ejection_percent},
            "health_check": u.health_check.as_ref().map(|h| json!({
                "kind": format!("{:?}", h.kind).to_lowercase(), "path": h.path,
                "expect": h.expect.iter().map(|(a, b)| format!("{a}-{b}")).collect::<Vec<_>>(),
                "interval": dur(h.interval), "timeout": dur(h.timeout),
                "healthy": h.healthy, "unhealthy": h.unhealthy})),
            "services": u.services.iter().map(|s| json!({
                "cluster": &*s.cluster, "namespace": s.namespace, "service": s.service,
                "port": s.port.to_string(), "weight": s.weight, "priority": s.priority,
                "labels": s.labels,
            })).collect::<Vec<_>>(),
            "nodes": u.nodes.iter().map(|n| json!({"address": n.address.to_string(),
                                                   "weight": n.weight})).collect::<Vec<_>>(),
        })).collect::<Vec<_>>(),
        "routes": c.routes.iter().map(|r| json!({
            "name": r.name, "hosts": r.hosts, "path_prefix": r.path_prefix,
            "methods": r.methods.iter().map(|m| m.as_str()).collect::<Vec<_>>(),
            "strip_prefix": r.strip_prefix, "upstream": r.upstream,
            "policies": policies_json(&r.policies),
        })).collect::<Vec<_>>(),
        "consumers": c.consumers.iter().map(|k| json!({
            "name": &*k.name,
            "api_keys_file": k.api_keys_file.as_ref().map(|_| "(redacted)"),
        })).collect::<Vec<_>>(),
        "jwt_providers": c.jwt_providers.iter().map(|p| json!({
            "name": &*p.name, "issuer": p.issuer, "audiences": p.audiences,
            "jwks_file": p.jwks_file.as_ref().map(|f| f.display().to_string()),
            "secret_file": p.secret_file.as_ref().map(|_| "(redacted)"),
            "consumer_claim": p.consumer_claim,
            "claims_to_headers": p.claims_to_headers.iter()
                .map(|(c, h)| (c.clone(), h.as_str().to_string())).collect::<BTreeMap<_, _>>(),
            "leeway": dur(p.leeway),
        })).collect::<Vec<_>>(),
        "trusted_proxies": c.server.trusted_proxies.iter().map(ToString::to_string)
            .collect::<Vec<_>>(),
        "access_log": {
            "path": match &c.access_log.sink {
                AccessLogSink::Off => Value::Null,
                AccessLogSink::Stdout => "stdout".into(),
                AccessLogSink::File(p) => p.display().to_string().into(),
            },
            "enabled": c.access_log.sink != AccessLogSink::Off,
            "buffer": c.access_log.buffer,
            "flush": dur(c.access_log.flush),
        },
    })
}

/// A route's `policies:` as JSON: what each policy does, never a credential. Values that
/// request header rules send to Pods may be credentials of their own, so only their names show.
fn policies_json(p: &crate::config::RoutePolicyConf) -> Value {
    use crate::config::{AuthMethod, KeySource, OriginPattern, RewriteConf, Scheme};
    let names =
        |v: &[http::HeaderName]| -> Vec<String> { v.iter().map(|n| n.to_string()).collect() };
    let nets = |v: &[ipnet::IpNet]| v.iter().map(ToString::to_string).collect::<Vec<_>>();
    let rules = |r: &crate::config::HeaderRulesConf, show_values: bool| {
        let pairs = |v: &[(http::HeaderName, http::HeaderValue)]| {
            v.iter()
                .map(|(n, v)| {
                    let shown = match (show_values, v.to_str()) {
                        (true, Ok(s)) => s,
                        _ => "(redacted)",
                    };
                    json!([n.as_str(), shown])
                })
                .collect::<Vec<_>>()
        };
        json!({"set": pairs(&r.set), "add": pairs(&r.add), "remove": names(&r.remove)})
    };
    let auth = p.auth.as_ref().map(|a| {
        let methods: Vec<Value> = a
            .methods
            .iter()
            .map(|m| match m {
                AuthMethod::ApiKey(KeySource::Header(h)) => {
                    json!({"api_key": {"header": h.as_str()}})
                }
                AuthMethod::ApiKey(KeySource::Query(q)) => json!({"api_key": {"query": q}}),
                AuthMethod::Jwt(name) => json!({"jwt": &**name}),
            })
            .collect();
        json!({"any_of": methods, "forward": a.forward,
               "consumer_header": a.consumer_header.as_str()})
    });
    let cors = p.cors.as_ref().map(|c| {
        let origins: Vec<String> = c
            .origins
            .iter()
            .map(|o| match o {
                OriginPattern::Any => "*".to_string(),
                OriginPattern::Exact(e) => e.clone(),
                OriginPattern::Subdomains { scheme, suffix } => format!("{scheme}://*{suffix}"),
            })
            .collect();
        json!({"origins": origins,
               "methods": c.methods.iter().map(http::Method::as_str).collect::<Vec<_>>(),
               "headers": names(&c.headers), "expose_headers": names(&c.expose_headers),
               "max_age": c.max_age.map(|d| format!("{}s", d.as_secs())),
               "credentials": c.credentials})
    });
    let rewrite = p.rewrite.as_ref().map(|r| match r {
        RewriteConf::Regex { regex, to } => json!({"path": {"regex": regex.0.as_str(), "to": to}}),
        RewriteConf::Prefix(to) => json!({"prefix": to}),
    });
    let redirect = p.redirect.as_ref().map(|r| {
        json!({"scheme": r.scheme.map(|s| if s == Scheme::Https { "https" } else { "http" }),
               "host": r.host, "port": r.port, "path": r.path, "status": r.status})
    });
    json!({
        "auth": auth,
        "consumers": p.consumers.iter().map(|c| &**c).collect::<Vec<_>>(),
        "ip_allow": nets(&p.ip_allow), "ip_deny": nets(&p.ip_deny),
        "cors": cors,
        "request_headers": rules(&p.request_headers, false),
        "response_headers": rules(&p.response_headers, true),
        "rewrite": rewrite, "redirect": redirect, "max_body": p.max_body,
    })
}

fn respond(status: u16, content_type: &str, body: Vec<u8>) -> Response<Vec<u8>> {
    Response::builder()
        .status(status)
        .header(http::header::CONTENT_TYPE, content_type)
        .header(http::header::CONTENT_LENGTH, body.len())
        .body(body)
        .expect("static response parts are valid")
}

fn json_response(status: u16, v: &Value) -> Response<Vec<u8>> {
    let mut body = serde_json::to_vec_pretty(v).unwrap_or_default();
    body.push(b'\n');
    respond(status, "application/json", body)
}

impl Admin {
    /// The discovered state as pretty JSON: every upstream with its services and live backends,
    /// every cluster with how its last read went.
    ///
    /// Serialized straight from the live structures into the body, without an intermediate
    /// `serde_json::Value`: with 10,000 endpoints that tree alone took about 30 MiB.
    pub fn upstreams_body(&self) -> Vec<u8> {
        let all = self.live.upstreams();
        let mut names: Vec<&String> = all.by_name.keys().collect();
        names.sort();
        let upstreams: Vec<UpstreamDoc<'_>> = names
            .into_iter()
            .map(|name| {
                let up = &all.by_name[name];
                UpstreamDoc {
                    name,
                    up,
                    views: up.service_views(),
                    selection: up.selection(),
                }
            })
            .collect();
        let statuses = self.live.cluster_statuses();
        let doc = DiscoveredDoc {
            upstreams: &upstreams,
            clusters: &statuses,
        };
        let mut body = serde_json::to_vec_pretty(&doc).unwrap_or_default();
        body.push(b'\n');
        body
    }
}

/// The document `/upstreams` serves; see [`Admin::upstreams_body`].
#[derive(Serialize)]
struct DiscoveredDoc<'a> {
    #[serde(serialize_with = "upstreams_seq")]
    upstreams: &'a [UpstreamDoc<'a>],
    #[serde(serialize_with = "clusters_seq")]
    clusters: &'a [crate::live::ClusterStatus],
}

/// One upstream and a consistent snapshot of its state.
struct UpstreamDoc<'a> {
    name: &'a str,
    up: &'a crate::upstream::Upstream,
    views: Vec<crate::upstream::ServiceView>,
    selection: Arc<crate::upstream::balance::Selection>,
}

fn upstreams_seq<S: Serializer>(ups: &&[UpstreamDoc<'_>], ser: S) -> Result<S::Ok, S::Error> {
    // Ejection is judged against one clock reading for the whole document.
    let now = crate::upstream::outlier::now_ms();
    ser.collect_seq(ups.iter().map(|u| UpstreamOut {
        name: u.name,
        scheme: match u.up.conf.scheme {
            crate::config::Scheme::Http => "http",
            crate::config::Scheme::Https => "https",
        },
        tags: &u.up.conf.tags,
        balance: Shown(&u.up.conf.balance),
        zone: u.up.conf.local_zone.as_deref(),
        zone_source: u.up.conf.zone_source.as_deref(),
        traffic: TrafficOut(&u.up.traffic),
        services: Seq(|| {
            u.up.conf
                .services
                .iter()
                .zip(&u.views)
                .map(|(s, view)| ServiceOut {
                    cluster: &s.cluster,
                    namespace: &s.namespace,
                    service: &s.service,
                    port: Shown(&s.port),
                    weight: s.weight,
                    priority: s.priority,
                    labels: &s.labels,
                    problem: view.problem.as_deref(),
                    endpoints: Seq(|| {
                        view.endpoints.iter().map(|e| EndpointOut {
                            address: e.addr,
                            pod: e.pod.as_deref(),
                            node: e.node.as_deref(),
                            zone: e.zone.as_deref(),
                            slice: &e.slice,
                            ready: e.ready,
                            serving: e.serving,
                            terminating: e.terminating,
                            weight: s.weight,
                        })
                    }),
                })
        }),
        backends: Seq(|| {
            u.selection.iter().map(|b| BackendOut {
                address: b.addr,
                weight: b.weight,
                cluster: b.info.cluster.as_deref(),
                pod: b.info.pod.as_deref(),
                zone: b.info.zone.as_deref(),
                check_down: b.info.health.active.is_down(),
                ejected: b.info.health.passive.is_ejected(now),
            })
        }),
    }))
}

fn clusters_seq<S: Serializer>(
    clusters: &&[crate::live::ClusterStatus],
    ser: S,
) -> Result<S::Ok, S::Error> {
    ser.collect_seq(clusters.iter().map(|c| {
        ClusterOut {
            name: &c.name,
            kind: c.kind,
            connected: c.connected,
            synced: c.synced,
            last_sync_unix: c
                .last_sync
                .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
                .map(|d| d.as_secs_f64()),
            events: c.events,
            relists: c.relists,
            errors: c.errors_by_reason.values().sum(),
            errors_by_reason: &c.errors_by_reason,
            last_error: c.last_error.as_deref(),
        }
    }))
}

/// Serializes the items a fresh iterator from `F` yields as a JSON array, without collecting them.
struct Seq<F>(F);

impl<F, I> Serialize for Seq<F>
where
    F: Fn() -> I,
    I: Iterator,
    I::Item: Serialize,
{
    fn serialize<S: Serializer>(&self, ser: S) -> Result<S::Ok, S::Error> {
        ser.collect_seq((self.0)())
    }
}

/// Serializes a value by its `Display` form, without a `String` in between.
struct Shown<'a, T>(&'a T);

impl<T: std::fmt::Display> Serialize for Shown<'_, T> {
    fn serialize<S: Serializer>(&self, ser: S) -> Result<S::Ok, S::Error> {
        ser.collect_str(self.0)
    }
}

#[derive(Serialize)]
struct UpstreamOut<'a, Sv, Bk> {
    name: &'a str,
    scheme: &'static str,
    tags: &'a BTreeMap<String, String>,
    /// `round_robin`, `least_request`, `consistent_hash on header x-user`…
    balance: Shown<'a, crate::config::Balance>,
    /// podgate's zone when the upstream is zone-aware (`null`: not known, all zones get traffic).
    zone: Option<&'a str>,
    /// Where `zone` came from (`server.zone`, or the node and cluster it was read from), or why
    /// there is none; `null` when the upstream is not zone-aware.
    #[serde(skip_serializing_if = "Option::is_none")]
    zone_source: Option<&'a str>,
    /// Where traffic goes: the share per tier and zone part, and why.
    traffic: TrafficOut<'a>,
    services: Sv,
    backends: Bk,
}

/// The current traffic plan of an upstream: `{"why": "...", "slots": [{priority, zone,
/// healthy_weight, total_weight, share}]}`; one slot of share 1 for a plain upstream.
struct TrafficOut<'a>(&'a crate::upstream::policy::Traffic);

impl Serialize for TrafficOut<'_> {
    fn serialize<S: Serializer>(&self, ser: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap;
        let plan = self.0.plan();
        let mut m = ser.serialize_map(Some(2))?;
        if plan.slots.is_empty() {
            m.serialize_entry("why", "one tier, no zones: every Pod in the rotation")?;
            m.serialize_entry(
                "slots",
                &[serde_json::json!({"priority": 0, "zone": "all", "share": 1.0})],
            )?;
        } else {
            m.serialize_entry("why", &plan.why)?;
            let slots: Vec<serde_json::Value> = plan
                .slots
                .iter()
                .map(|s| {
                    serde_json::json!({
                        "priority": s.priority,
                        "zone": s.zone.label(),
                        "healthy_weight": s.capacity.healthy,
                        "total_weight": s.capacity.total,
                        "share": (s.share * 1e4).round() / 1e4,
                    })
                })
                .collect();
            m.serialize_entry("slots", &slots)?;
        }
        m.end()
    }
}

#[derive(Serialize)]
struct ServiceOut<'a, Ep> {
    cluster: &'a str,
    namespace: &'a str,
    service: &'a str,
    port: Shown<'a, podgate_discovery::PortRef>,
    weight: u32,
    priority: u32,
    labels: &'a BTreeMap<String, String>,
    problem: Option<&'a str>,
    endpoints: Ep,
}

#[derive(Serialize)]
struct EndpointOut<'a> {
    /// `SocketAddr` serializes as `"ip:port"` (`"[ip]:port"` for IPv6) in JSON.
    address: std::net::SocketAddr,
    pod: Option<&'a str>,
    node: Option<&'a str>,
    zone: Option<&'a str>,
    slice: &'a str,
    ready: bool,
    serving: bool,
    terminating: bool,
    weight: u32,
}

#[derive(Serialize)]
struct BackendOut<'a> {
    address: std::net::SocketAddr,
    weight: u32,
    cluster: Option<&'a str>,
    pod: Option<&'a str>,
    zone: Option<&'a str>,
    check_down: bool,
    ejected: bool,
}

#[derive(Serialize)]
struct ClusterOut<'a> {
    name: &'a str,
    kind: &'static str,
    connected: bool,
    synced: bool,
    last_sync_unix: Option<f64>,
    events: u64,
    relists: u64,
    errors: u64,
    errors_by_reason: &'a BTreeMap<String, u64>,
    last_error: Option<&'a str>,
}

impl Admin {
    /// Discovery metrics, read from the sources' own counters at scrape time so that the sources
    /// need not know about Prometheus.
    fn discovery_registry(&self) -> prometheus::Registry {
        use prometheus::{IntCounterVec, IntGaugeVec, Opts};
        let reg = prometheus::Registry::new();
        let counter = |name: &str, help: &str, labels: &[&str]| {
            let c = IntCounterVec::new(Opts::new(name, help), labels).expect("valid metric");
            reg.register(Box::new(c.clone())).expect("registers once");
            c
        };
        let events = counter(
            "podgate_discovery_events_total",
            "Changes read from a cluster (manifests: folder re-reads).",
            &["cluster", "kind"],
        );
        let errors = counter(
            "podgate_discovery_errors_total",
            "Discovery errors by cluster and reason.",
            &["cluster", "reason"],
        );
        let relists = counter(
            "podgate_discovery_relists_total",
            "Full re-lists of a cluster after its watch broke.",
            &["cluster"],
        );
        let last_sync = IntGaugeVec::new(
            Opts::new(
                "podgate_discovery_last_sync_timestamp_seconds",
                "Unix time of the last successful read of a cluster.",
            ),
            &["cluster"],
        )
        .expect("valid metric");
        reg.register(Box::new(last_sync.clone()))
            .expect("registers once");
        for c in self.live.cluster_statuses() {
            let name = &*c.name;
            let kind = if c.kind == "manifests" {
                "reload"
            } else {
                "watch"
            };
            events.with_label_values(&[name, kind]).inc_by(c.events);
            for (reason, n) in &c.errors_by_reason {
                errors
                    .with_label_values(&[name, reason.as_str()])
                    .inc_by(*n);
            }
            relists.with_label_values(&[name]).inc_by(c.relists);
            if let Some(t) = c
                .last_sync
                .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
            {
                last_sync.with_label_values(&[name]).set(t.as_secs() as i64);
            }
        }
        reg
    }
}

#[async_trait]
impl ServeHttp for Admin {
    async fn response(&self, session: &mut ServerSession) -> Response<Vec<u8>> {
        let path = session.req_header().uri.path();
        if let Some(token) = &self.token {
            let open =
                matches!(path, "/healthz" | "/readyz") || (self.open_metrics && path == "/metrics");
            let given = session
                .req_header()
                .headers
                .get(http::header::AUTHORIZATION)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.strip_prefix("Bearer "))
                .unwrap_or("");
            if !open && !same(given.as_bytes(), token.as_bytes()) {
                let mut r = json_response(401, &json!({"error": "unauthorized"}));
                r.headers_mut().insert(
                    http::header::WWW_AUTHENTICATE,
                    http::HeaderValue::from_static("Bearer"),
                );
                return r;
            }
        }
        match path {
            "/healthz" => respond(200, "text/plain", b"ok\n".to_vec()),
            "/readyz" if self.lifecycle.draining() => {
                respond(503, "text/plain", b"draining\n".to_vec())
            }
            "/readyz" if !self.live.ready() => respond(
                503,
                "text/plain",
                b"waiting for the first sync of every cluster\n".to_vec(),
            ),
            "/readyz" => respond(200, "text/plain", b"ready\n".to_vec()),
            "/upstreams" => respond(200, "application/json", self.upstreams_body()),
            "/config" => json_response(200, &config_json(&self.live.config())),
            "/metrics" => {
                for up in self.live.upstreams().by_name.values() {
                    up.refresh_state_gauges();
                }
                respond(
                    200,
                    "text/plain; version=0.0.4",
                    crate::telemetry::metrics::render(&self.discovery_registry()),
                )
            }
            _ => json_response(
                404,
                &json!({"error": "not_found", "paths": ["/healthz", "/readyz", "/upstreams", "/config", "/metrics"]}),
            ),
        }
    }
}
