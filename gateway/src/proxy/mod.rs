//! The proxy layer: what the HTTP/1.1 path (`h1/`), the h2 path (`h2/`) and Pingora's `ProxyHttp`
//! (`pingora.rs`: h2 streams without a route, CONNECT, gRPC to http1 upstreams) share: the route
//! table's targets, the access log line and the error answers.
//! Routing (`routing.rs`) turns a request into a route; the paths pick a Pod from the route's
//! upstream (`crate::upstream`) and relay.
//!
//! Error answers are small JSON bodies with a fixed text per status; nothing about Pods, addresses
//! or internal errors reaches the client (they go to the log).

pub mod h1;
pub mod h2;
pub mod pingora;
pub mod routing;

use crate::telemetry::access_log::{self, AccessLog};
use crate::telemetry::metrics::{self, RouteMetrics};
use crate::upstream::balance::Backend;
use crate::upstream::Upstream;
use arc_swap::ArcSwap;
use routing::{Route, Router};
use std::net::SocketAddr;
use std::sync::Arc;

/// What consistent hashing reads from a request on the `http`-typed paths (Pingora's, and the
/// hyper engine's): the client's header fields and path, and the client's address.
pub struct HashParts<'a> {
    pub headers: &'a http::HeaderMap,
    pub path: &'a str,
    pub client: Option<std::net::IpAddr>,
}

impl crate::upstream::policy::RequestParts for HashParts<'_> {
    fn header_values<'s>(&'s self, name: &'s str) -> impl Iterator<Item = &'s [u8]> + 's {
        self.headers.get_all(name).iter().map(|v| v.as_bytes())
    }
    fn client_ip(&self) -> Option<std::net::IpAddr> {
        self.client
    }
    fn path(&self) -> &str {
        self.path
    }
}

/// Where a route sends requests, with its metric handles resolved once.
pub struct Target {
    pub upstream: Arc<Upstream>,
    pub metrics: RouteMetrics,
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
        408 => ("request_timeout", "the request head did not arrive in time"),
        413 => (
            "payload_too_large",
            "the request body is too large for this upstream",
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
