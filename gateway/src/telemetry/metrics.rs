//! Prometheus metrics, in the `prometheus` crate's default registry (the one `pingora-prometheus`
//! serves too), rendered by the admin listener's `/metrics`.
//!
//! Label values stay bounded: route and upstream names come from the config, status codes are
//! folded into classes, clusters are config names. Never a Pod IP or a raw path. The request path
//! touches only handles resolved when a route is built, so it does no label lookup.
//!
//! No gaps (issue 14): families without labels and the fixed label sets exist from start, so
//! dashboards and `absent()` alerts see zeros rather than nothing; series of routes, upstreams
//! and clusters a reload removed are deleted ([`forget_removed`]) rather than frozen at their
//! last value for ever. `process_*` come from the prometheus crate's `process` feature, which
//! registers its ProcessCollector in the default registry on Linux.

use prometheus::core::{Collector, MetricVec, MetricVecBuilder};
use prometheus::{
    register_histogram_vec, register_int_counter_vec, register_int_gauge_vec, Encoder, Histogram,
    HistogramVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Registry, TextEncoder,
};
use std::sync::LazyLock;
use std::time::Duration;

/// Latency buckets from 1 ms to 30 s: gateway hops are fast, Pods may not be.
const BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];

static REQUESTS: LazyLock<IntCounterVec> = LazyLock::new(|| {
    register_int_counter_vec!(
        "podgate_requests_total",
        "Requests answered, by route, upstream and status class (1xx..5xx).",
        &["route", "upstream", "code"]
    )
    .expect("metric registers once")
});

static GRPC_RESPONSES: LazyLock<IntCounterVec> = LazyLock::new(|| {
    register_int_counter_vec!(
        "podgate_grpc_responses_total",
        "gRPC calls answered, by route, upstream and grpc-status (0..16, or other), whether the \
         Pod or podgate set it; calls that ended with no grpc-status are not counted.",
        &["route", "upstream", "grpc_status"]
    )
    .expect("metric registers once")
});

static REQUEST_DURATION: LazyLock<HistogramVec> = LazyLock::new(|| {
    register_histogram_vec!(
        "podgate_request_duration_seconds",
        "Whole request duration as the gateway saw it.",
        &["route", "upstream"],
        BUCKETS.to_vec()
    )
    .expect("metric registers once")
});

static UPSTREAM_DURATION: LazyLock<HistogramVec> = LazyLock::new(|| {
    register_histogram_vec!(
        "podgate_upstream_duration_seconds",
        "Time from choosing a Pod to its first response byte (per attempt that got one).",
        &["upstream"],
        BUCKETS.to_vec()
    )
    .expect("metric registers once")
});

static RETRIES: LazyLock<IntCounterVec> = LazyLock::new(|| {
    register_int_counter_vec!(
        "podgate_upstream_retries_total",
        "Attempts retried on another endpoint.",
        &["upstream"]
    )
    .expect("metric registers once")
});

static ENDPOINTS: LazyLock<IntGaugeVec> = LazyLock::new(|| {
    register_int_gauge_vec!(
        "podgate_upstream_endpoints",
        "Endpoints of an upstream by cluster (`static` for nodes) and state: ready (gets \
         traffic), draining (terminating or serving-only), unhealthy (not ready), ejected.",
        &["upstream", "cluster", "state"]
    )
    .expect("metric registers once")
});

static EJECTIONS: LazyLock<IntCounterVec> = LazyLock::new(|| {
    register_int_counter_vec!(
        "podgate_upstream_ejections_total",
        "Endpoints ejected by passive outlier detection.",
        &["upstream"]
    )
    .expect("metric registers once")
});

static TRAFFIC_SHARE: LazyLock<prometheus::GaugeVec> = LazyLock::new(|| {
    prometheus::register_gauge_vec!(
        "podgate_upstream_traffic_share",
        "Share of an upstream's new requests (0..1) that its traffic plan sends to each failover \
         tier (`priority`) and zone part (`local`, `other`, or `all` when not zone-aware).",
        &["upstream", "priority", "zone"]
    )
    .expect("metric registers once")
});

static BUILD_INFO: LazyLock<IntGaugeVec> = LazyLock::new(|| {
    register_int_gauge_vec!(
        "podgate_build_info",
        "Always 1; the version label says which build.",
        &["version"]
    )
    .expect("metric registers once")
});

static CLIENT_CONNECTIONS: LazyLock<IntGaugeVec> = LazyLock::new(|| {
    register_int_gauge_vec!(
        "podgate_client_connections",
        "Open client connections (HTTP/1.1 and h2 over TLS listeners) by request thread, \
         numbered in the order the threads first served one.",
        &["thread"]
    )
    .expect("metric registers once")
});

/// The open-connections gauge of request thread `i`.
pub fn client_connections(i: usize) -> IntGauge {
    CLIENT_CONNECTIONS.with_label_values(&[&i.to_string()])
}

/// `grpc_status` label values: the 17 gRPC codes, then `other` for anything else.
pub const GRPC_STATUS_LABELS: [&str; 18] = [
    "0", "1", "2", "3", "4", "5", "6", "7", "8", "9", "10", "11", "12", "13", "14", "15", "16",
    "other",
];

/// Label for requests that matched no route.
pub const UNMATCHED: &str = "(none)";

pub const STATES: [&str; 4] = ["ready", "draining", "unhealthy", "ejected"];

/// Handles of one route's request metrics.
pub struct RouteMetrics {
    /// Index 0 is 1xx … index 4 is 5xx.
    by_class: [IntCounter; 5],
    duration: Histogram,
    /// Per gRPC status (index into [`GRPC_STATUS_LABELS`]), resolved on first use but for `0`,
    /// which every route has from start.
    grpc: [std::sync::OnceLock<IntCounter>; 18],
    names: [String; 2],
}

impl RouteMetrics {
    pub fn new(route: &str, upstream: &str) -> Self {
        let class = |c: &str| REQUESTS.with_label_values(&[route, upstream, c]);
        RouteMetrics {
            by_class: [
                class("1xx"),
                class("2xx"),
                class("3xx"),
                class("4xx"),
                class("5xx"),
            ],
            duration: REQUEST_DURATION.with_label_values(&[route, upstream]),
            grpc: Default::default(),
            names: [route.to_string(), upstream.to_string()],
        }
        .with_grpc_ok_series()
    }

    /// Creates the `grpc_status="0"` series now, so that the family exists from start (no
    /// gaps); the other statuses appear with their first call.
    fn with_grpc_ok_series(self) -> Self {
        let [route, upstream] = &self.names;
        let _ =
            self.grpc[0].get_or_init(|| GRPC_RESPONSES.with_label_values(&[route, upstream, "0"]));
        self
    }

    /// Counts one gRPC call that ended with the `grpc-status` at `index` of
    /// [`GRPC_STATUS_LABELS`] (an index past it counts as `other`).
    pub fn observe_grpc(&self, index: usize) {
        let index = index.min(GRPC_STATUS_LABELS.len() - 1);
        let label = GRPC_STATUS_LABELS[index];
        self.grpc[index]
            .get_or_init(|| {
                GRPC_RESPONSES.with_label_values(&[&self.names[0], &self.names[1], label])
            })
            .inc();
    }

    /// Counts one answered request (`status` 0 means the client went away before an answer).
    pub fn observe(&self, status: u16, took: Duration) {
        if (100..600).contains(&status) {
            self.by_class[usize::from(status / 100 - 1)].inc();
        }
        self.duration.observe(took.as_secs_f64());
    }
}

/// Handles of one upstream's metrics.
pub struct UpstreamMetrics {
    pub first_byte: Histogram,
    pub retries: IntCounter,
    pub ejections: IntCounter,
    name: String,
}

impl UpstreamMetrics {
    pub fn new(upstream: &str) -> Self {
        UpstreamMetrics {
            first_byte: UPSTREAM_DURATION.with_label_values(&[upstream]),
            retries: RETRIES.with_label_values(&[upstream]),
            ejections: EJECTIONS.with_label_values(&[upstream]),
            name: upstream.to_string(),
        }
    }

    /// Sets the `ejected` endpoint gauges: (cluster, count).
    pub fn set_ejected(&self, counts: &[(String, i64)]) {
        for (cluster, n) in counts {
            ENDPOINTS
                .with_label_values(&[self.name.as_str(), cluster.as_str(), "ejected"])
                .set(*n);
        }
    }

    /// Deletes this upstream's traffic share series: a new upstream object (first start or a
    /// reload that changed it) may have other tiers or zone parts than the one it replaces.
    pub fn forget_shares(&self) {
        retain(&TRAFFIC_SHARE, &["upstream", "priority", "zone"], |v| {
            v[0] != self.name
        });
    }

    /// Sets the traffic share gauges: (priority, zone part, share 0..1).
    pub fn set_shares(&self, shares: &[(u32, &str, f64)]) {
        for (priority, zone, share) in shares {
            TRAFFIC_SHARE
                .with_label_values(&[self.name.as_str(), &priority.to_string(), zone])
                .set(*share);
        }
    }

    /// Sets the ready/draining/unhealthy endpoint gauges: (cluster, [count per STATES]); the
    /// `ejected` state is [`UpstreamMetrics::set_ejected`]'s.
    pub fn set_endpoints(&self, counts: &[(String, [i64; 4])]) {
        for (cluster, per_state) in counts {
            for (state, n) in STATES.iter().zip(per_state).take(3) {
                ENDPOINTS
                    .with_label_values(&[self.name.as_str(), cluster.as_str(), state])
                    .set(*n);
            }
        }
    }
}

pub fn init_build_info() {
    BUILD_INFO
        .with_label_values(&[env!("CARGO_PKG_VERSION")])
        .set(1);
}

/// The route → upstream bindings, upstream names and (upstream, cluster) pairs a config has;
/// every series outside them belongs to something a reload removed.
#[derive(Default)]
pub struct Known {
    pub routes: std::collections::HashSet<(String, String)>,
    pub upstreams: std::collections::HashSet<String>,
    /// Clusters per upstream, `static` for nodes.
    pub clusters: std::collections::HashSet<(String, String)>,
}

/// Deletes the series of `vec` for which `keep` (given the values of ALL its labels, in `names`
/// order, as removal needs them) says no. The vector is read through its own collector: the
/// prometheus crate keeps no other index of its series.
fn retain<T: MetricVecBuilder>(vec: &MetricVec<T>, names: &[&str], keep: impl Fn(&[&str]) -> bool) {
    for family in vec.collect() {
        for m in family.get_metric() {
            let pairs = m.get_label();
            let values: Vec<&str> = names
                .iter()
                .map(|n| {
                    pairs
                        .iter()
                        .find(|p| p.name() == *n)
                        .map_or("", |p| p.value())
                })
                .collect();
            if !keep(&values) {
                if let Err(e) = vec.remove_label_values(&values) {
                    log::warn!("metrics: cannot delete the series {values:?}: {e}");
                }
            }
        }
    }
}

/// After a reload: drops the request, upstream and endpoint series of routes, upstreams and
/// clusters the new config no longer has (requests that matched no route keep their series).
/// Handles the old router still holds keep working; their counts just go nowhere.
pub fn forget_removed(known: &Known) {
    let route_known = |v: &[&str]| {
        (v[0] == UNMATCHED && v[1] == UNMATCHED)
            || known.routes.contains(&(v[0].to_string(), v[1].to_string()))
    };
    retain(&REQUESTS, &["route", "upstream", "code"], route_known);
    retain(&REQUEST_DURATION, &["route", "upstream"], route_known);
    retain(
        &GRPC_RESPONSES,
        &["route", "upstream", "grpc_status"],
        route_known,
    );
    retain(&POLICY_REFUSALS, &["route", "policy", "status"], |v| {
        known.routes.iter().any(|(route, _)| route == v[0])
    });
    let upstream_known = |v: &[&str]| known.upstreams.contains(v[0]);
    retain(&UPSTREAM_DURATION, &["upstream"], upstream_known);
    retain(&RETRIES, &["upstream"], upstream_known);
    retain(&EJECTIONS, &["upstream"], upstream_known);
    retain(&CHECKS, &["upstream", "result"], upstream_known);
    retain(
        &TRAFFIC_SHARE,
        &["upstream", "priority", "zone"],
        upstream_known,
    );
    retain(&ENDPOINTS, &["upstream", "cluster", "state"], |v| {
        known
            .clusters
            .contains(&(v[0].to_string(), v[1].to_string()))
    });
}

/// The text exposition of the default registry plus `extra` (metrics built at scrape time).
pub fn render(extra: &Registry) -> Vec<u8> {
    let mut families = prometheus::gather();
    families.extend(extra.gather());
    let mut out = Vec::new();
    if let Err(e) = TextEncoder::new().encode(&families, &mut out) {
        log::error!("cannot encode metrics: {e}");
    }
    out
}

static POLICY_REFUSALS: LazyLock<IntCounterVec> = LazyLock::new(|| {
    register_int_counter_vec!(
        "podgate_policy_refusals_total",
        "Requests a route policy refused, by route, policy (ip, auth, consumers, max_body) and \
         status (401, 403, 413).",
        &["route", "policy", "status"]
    )
    .expect("metric registers once")
});

static POLICY_FILE_RELOADS: LazyLock<IntCounterVec> = LazyLock::new(|| {
    register_int_counter_vec!(
        "podgate_policy_file_reloads_total",
        "Reads of the files policies use, by kind (api_keys, jwks, secret), the consumer or jwt \
         provider they belong to, and result (success; failure: the last good content stays).",
        &["kind", "name", "result"]
    )
    .expect("metric registers once")
});

/// The refusal counter of one route policy; created (at zero) when the route is built, so the
/// request path only increments.
pub fn policy_refusals(route: &str, policy: &str, status: u16) -> IntCounter {
    POLICY_REFUSALS.with_label_values(&[route, policy, &status.to_string()])
}

/// Counts one read of a policy file (`kind` and `name` come from the config).
pub fn policy_file_reload(kind: &str, name: &str, success: bool) {
    let result = if success { "success" } else { "failure" };
    POLICY_FILE_RELOADS
        .with_label_values(&[kind, name, result])
        .inc();
}

/// Active health check probes (written by `upstream::health_check`).
pub static CHECKS: LazyLock<IntCounterVec> = LazyLock::new(|| {
    register_int_counter_vec!(
        "podgate_health_checks_total",
        "Active health check probes by upstream and result (success, failure).",
        &["upstream", "result"]
    )
    .expect("metric registers once")
});
