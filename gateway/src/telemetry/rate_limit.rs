//! Rate-limit metric families (written by `policies::rate_limit`). Labels: route and rule names
//! from the config (a rule is named by its key and rate, e.g. `consumer 100/s`), store names,
//! fixed results and reasons — never a key's value (a client address, a consumer, a header).

use prometheus::core::{Collector, MetricVec, MetricVecBuilder};
use prometheus::{
    register_histogram_vec, register_int_counter_vec, register_int_gauge_vec, Histogram,
    HistogramVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec,
};
use std::collections::HashSet;
use std::sync::LazyLock;

static DECISIONS: LazyLock<IntCounterVec> = LazyLock::new(|| {
    register_int_counter_vec!(
        "podgate_rate_limit_requests_total",
        "Requests a rate-limit rule decided, by route, rule and result: allowed, limited, \
         error_allowed or error_denied (the store failed and on_error decided).",
        &["route", "rule", "result"]
    )
    .expect("metric registers once")
});

static KEYS: LazyLock<IntGaugeVec> = LazyLock::new(|| {
    register_int_gauge_vec!(
        "podgate_rate_limit_keys",
        "Keys a rule tracks in this process (local store; leases of batched mode), at most the \
         rule's max_keys rounded up to a power of two.",
        &["route", "rule"]
    )
    .expect("metric registers once")
});

static EVICTIONS: LazyLock<IntCounterVec> = LazyLock::new(|| {
    register_int_counter_vec!(
        "podgate_rate_limit_evictions_total",
        "Keys forgotten to make room while their bucket was not full (or their lease not spent): \
         a sign max_keys is too small for the traffic.",
        &["route", "rule"]
    )
    .expect("metric registers once")
});

static REDIS_DURATION: LazyLock<HistogramVec> = LazyLock::new(|| {
    register_histogram_vec!(
        "podgate_rate_limit_redis_duration_seconds",
        "Redis calls of a rate-limit store, from sending to the answer (or the timeout).",
        &["store"],
        vec![0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0]
    )
    .expect("metric registers once")
});

static REDIS_ERRORS: LazyLock<IntCounterVec> = LazyLock::new(|| {
    register_int_counter_vec!(
        "podgate_rate_limit_redis_errors_total",
        "Rate-limit store calls that gave no answer, by reason: timeout, connection, server \
         (an error reply), skipped (not tried: the store failed its last calls and is probed \
         every 100 ms until it answers).",
        &["store", "reason"]
    )
    .expect("metric registers once")
});

/// The handles of one rule of one route.
#[derive(Debug)]
pub struct RuleMetrics {
    pub allowed: IntCounter,
    pub limited: IntCounter,
    pub error_allowed: IntCounter,
    pub error_denied: IntCounter,
}

impl RuleMetrics {
    pub fn new(route: &str, rule: &str) -> RuleMetrics {
        let c = |result: &str| DECISIONS.with_label_values(&[route, rule, result]);
        RuleMetrics {
            allowed: c("allowed"),
            limited: c("limited"),
            error_allowed: c("error_allowed"),
            error_denied: c("error_denied"),
        }
    }
}

/// The keys gauge and evictions counter of a rule's table.
pub fn table(route: &str, rule: &str) -> (IntGauge, IntCounter) {
    (
        KEYS.with_label_values(&[route, rule]),
        EVICTIONS.with_label_values(&[route, rule]),
    )
}

/// The handles of one store.
#[derive(Debug)]
pub struct StoreMetrics {
    pub duration: Histogram,
    pub timeout: IntCounter,
    pub connection: IntCounter,
    pub server: IntCounter,
    pub skipped: IntCounter,
}

impl StoreMetrics {
    pub fn new(store: &str) -> StoreMetrics {
        let e = |reason: &str| REDIS_ERRORS.with_label_values(&[store, reason]);
        StoreMetrics {
            duration: REDIS_DURATION.with_label_values(&[store]),
            timeout: e("timeout"),
            connection: e("connection"),
            server: e("server"),
            skipped: e("skipped"),
        }
    }
}

/// After a reload: deletes the series of (route, rule) pairs and stores the config no longer
/// has. `rules` holds every (route, rule name) pair, `stores` every store name.
pub fn forget_removed(rules: &HashSet<(String, String)>, stores: &HashSet<String>) {
    let rule = |v: &[String]| rules.contains(&(v[0].clone(), v[1].clone()));
    let store = |v: &[String]| stores.contains(&v[0]);
    retain(&DECISIONS, &["route", "rule", "result"], rule);
    retain(&KEYS, &["route", "rule"], rule);
    retain(&EVICTIONS, &["route", "rule"], rule);
    retain(&REDIS_DURATION, &["store"], store);
    retain(&REDIS_ERRORS, &["store", "reason"], store);
}

fn retain<T: MetricVecBuilder>(
    vec: &MetricVec<T>,
    names: &[&str],
    keep: impl Fn(&[String]) -> bool,
) {
    for family in vec.collect() {
        for m in family.get_metric() {
            let values: Vec<String> = names
                .iter()
                .map(|n| {
                    m.get_label()
                        .iter()
                        .find(|p| p.name() == *n)
                        .map_or(String::new(), |p| p.value().to_string())
                })
                .collect();
            if !keep(&values) {
                let values: Vec<&str> = values.iter().map(String::as_str).collect();
                let _ = vec.remove_label_values(&values);
            }
        }
    }
}
