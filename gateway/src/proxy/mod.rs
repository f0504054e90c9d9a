//! The proxy layer: the request pipeline (`pipeline/`: route, policies, pick, attempts and
//! retries, answer, record — what the gateway decides for every request, written once) and the
//! codecs at its edges: HTTP/1.1 (`h1/`: client connections, and HTTP/1.1 toward Pods) and h2
//! (`h2/`: client connections and streams, h2/h2c toward Pods, gRPC's rules). `routing.rs`
//! turns a host, path and method into a route; this file holds what the layer shares: the route
//! table's targets, the access log line and the error bodies.
//!
//! Every request of every protocol goes through the pipeline; nothing is left to Pingora's
//! `ProxyHttp`: h2 streams without a route and CONNECT are answered by the pipeline (404/405,
//! the gRPC way for gRPC calls), and gRPC calls to an `http1` upstream go to its Pods through the
//! HTTP/1.1 Pod codec. Pingora still accepts connections, terminates TLS and parses h2 frames.
//!
//! Error answers are small JSON bodies with a fixed text per status; nothing about Pods, addresses
//! or internal errors reaches the client (they go to the log).

pub mod h1;
pub mod h2;
pub(crate) mod pipeline;
pub mod routing;

use crate::policies::{Policies, TrustedProxies};
use crate::telemetry::access_log::{self, AccessLog};
use crate::telemetry::metrics::{self, RouteMetrics};
use crate::upstream::balance::Backend;
use crate::upstream::Upstream;
use arc_swap::ArcSwap;
use routing::{Route, Router};
use std::net::SocketAddr;
use std::sync::Arc;

/// Where a route sends requests, with its metric handles resolved once and its policies.
pub struct Target {
    pub upstream: Arc<Upstream>,
    pub metrics: RouteMetrics,
    pub policies: Policies,
    /// `server.trusted_proxies`: whose `X-Forwarded-For` names the client (the same set for
    /// every route of a config).
    pub trusted: Arc<TrustedProxies>,
}

pub type GatewayRoute = Route<Target>;
pub type GatewayRouter = Router<Target>;

/// The proxy; the router is swapped as a whole when the config changes.
pub struct Gateway {
    pub router: Arc<ArcSwap<GatewayRouter>>,
    /// Metrics of requests that matched no route.
    pub unmatched: RouteMetrics,
    pub access_log: AccessLog,
}

impl Gateway {
    pub fn new(router: Arc<ArcSwap<GatewayRouter>>, access_log: AccessLog) -> Self {
        Gateway {
            router,
            unmatched: RouteMetrics::new(metrics::UNMATCHED, metrics::UNMATCHED),
            access_log,
        }
    }
}

/// What one access log line tells about a request.
pub struct LogFields<'a> {
    pub request_id: &'a str,
    pub client: Option<SocketAddr>,
    pub method: &'a str,
    pub host: &'a str,
    pub path: &'a str,
    pub route: Option<&'a GatewayRoute>,
    pub backend: Option<&'a Backend>,
    pub status: u16,
    pub bytes: u64,
    pub took: std::time::Duration,
    pub first_byte: Option<std::time::Duration>,
    pub retries: usize,
    /// The call's `grpc-status`, for gRPC calls that ended with one.
    pub grpc_status: Option<&'a str>,
    /// The consumer the route's policies authenticated the request as.
    pub consumer: Option<&'a str>,
}

/// One access log line, JSON.
pub fn access_line(f: &LogFields) -> Vec<u8> {
    let line = serde_json::json!({
        "time": access_log::rfc3339(std::time::SystemTime::now()),
        "request_id": f.request_id,
        "client": f.client.map(|a| a.to_string()),
        "method": f.method,
        "host": f.host,
        "path": f.path,
        "route": f.route.map(|r| r.name.as_str()),
        "upstream": f.route.map(|r| r.upstream.upstream.conf.name.as_str()),
        "cluster": f.backend.and_then(|b| b.info.cluster.as_deref()),
        "pod": f.backend.and_then(|b| b.info.pod.as_deref()),
        "pod_address": f.backend.map(|b| b.addr.to_string()),
        "status": f.status,
        "bytes": f.bytes,
        "duration_ms": f.took.as_secs_f64() * 1000.0,
        "upstream_ms": f.first_byte.map(|d| d.as_secs_f64() * 1000.0),
        "retries": f.retries,
        "grpc_status": f.grpc_status,
        "consumer": f.consumer,
    });
    serde_json::to_vec(&line).unwrap_or_default()
}

/// The JSON body of an error answer.
/// An `X-Request-Id` value for a header block that may go out over h2, marked sensitive so
/// that HPACK never indexes it. Every request has its own id: indexed, each one went into the
/// connection's 4 KiB dynamic table, where ids never recur; they pushed out the fields that do
/// (`server`, `content-type`, ...), and the encoder compared each new id with all the ids
/// before it. Measured (`benches/load/h2.py tls`, perf): 3 % of podgate's time was
/// `hpack::Table::index` and its `memcmp`. HTTP/1.1 ignores the mark.
pub fn request_id_value(id: &str) -> Option<http::HeaderValue> {
    let mut value = http::HeaderValue::from_str(id).ok()?;
    value.set_sensitive(true);
    Some(value)
}

/// `value` unchanged, but never indexed by HPACK when `name` is `x-request-id` (see
/// [`request_id_value`]): a Pod's answer that echoes the id.
pub fn unindexed_id(name: &[u8], mut value: http::HeaderValue) -> http::HeaderValue {
    if name.eq_ignore_ascii_case(b"x-request-id") {
        value.set_sensitive(true);
    }
    value
}

pub fn error_json(status: u16) -> String {
    let (code, message) = error_body(status);
    format!("{{\"error\":\"{code}\",\"status\":{status},\"message\":\"{message}\"}}\n")
}

/// The answer for a failure of kind `status`: a fixed text, never the internal error.
fn error_body(status: u16) -> (&'static str, &'static str) {
    match status {
        404 => ("not_found", "no route matches this host and path"),
        405 => (
            "method_not_allowed",
            "the route does not accept this method",
        ),
        502 => ("bad_gateway", "the upstream could not be reached"),
        503 => ("no_endpoint", "the upstream has no ready endpoint"),
        504 => ("gateway_timeout", "the upstream did not answer in time"),
        400 => ("bad_request", "the request could not be processed"),
        401 => (
            "unauthorized",
            "the route requires a valid credential (see WWW-Authenticate)",
        ),
        403 => ("forbidden", "the caller is not allowed on this route"),
        408 => ("request_timeout", "the request head did not arrive in time"),
        413 => (
            "payload_too_large",
            "the request body is larger than the route accepts",
        ),
        429 => (
            "too_many_requests",
            "the route's rate limit is exceeded; retry after the Retry-After seconds",
        ),
        431 => (
            "request_header_fields_too_large",
            "the request head is too large",
        ),
        501 => (
            "not_implemented",
            "the request's transfer encoding is not supported",
        ),
        _ => (
            "internal_error",
            "the gateway failed to process the request",
        ),
    }
}
