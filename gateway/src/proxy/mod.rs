//! The proxy layer: the request pipeline (`pipeline/`: route, policies, pick, attempts and
//! retries, answer, record — what the gateway decides for every request, written once) and the
//! codecs at its edges: HTTP/1.1 (`h1/`: client connections, and HTTP/1.1 toward Pods) and h2
//! (`h2/`: client connections and streams, h2/h2c toward Pods, gRPC's rules). `routing.rs`
//! turns a host, path and method into a route; `log_line.rs` writes the access line; this file
//! holds what the layer shares: the route table's targets, the access line's fields, why an
//! exchange ended early (`ended`) and the error bodies.
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
pub mod in_flight;
pub(crate) mod lazy_timeout;
pub mod log_line;
pub(crate) mod pipeline;
pub mod routing;
pub mod tls_accept;
pub mod write_deadline;

use crate::policies::{Policies, TrustedProxies};
use crate::telemetry::access_log::AccessLog;
use crate::telemetry::metrics::{self, RouteMetrics};
use crate::upstream::balance::Backend;
use crate::upstream::Upstream;
use arc_swap::ArcSwap;
pub use log_line::RequestLog;
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
    pub access_log: RequestLog,
}

impl Gateway {
    pub fn new(router: Arc<ArcSwap<GatewayRouter>>, access_log: AccessLog) -> Self {
        Gateway {
            router,
            unmatched: RouteMetrics::new(metrics::UNMATCHED, metrics::UNMATCHED),
            access_log: RequestLog::new(access_log),
        }
    }
}

/// Why an exchange ended before its answer was delivered whole: the access log's `ended`.
pub mod ended {
    /// A write toward the client made no progress for `server.client_body_timeout`.
    pub const CLIENT_WRITE_TIMEOUT: &str = "client_write_timeout";
    /// The client sent no more of its request body for `server.client_body_timeout`.
    pub const CLIENT_READ_TIMEOUT: &str = "client_read_timeout";
    /// The client closed (or reset) before the answer was delivered.
    pub const CLIENT_CLOSED: &str = "client_closed";
    /// The Pod, in the middle of its answer (or taking the request body), was silent for the
    /// upstream's `read_timeout`.
    pub const UPSTREAM_TIMEOUT: &str = "upstream_timeout";
    /// The Pod closed in the middle of its answer, or broke its framing.
    pub const UPSTREAM_CLOSED: &str = "upstream_closed";

    /// For a write of a request body to a Pod that failed.
    pub fn of_pod_write(e: &std::io::Error) -> &'static str {
        match e.kind() {
            std::io::ErrorKind::TimedOut => UPSTREAM_TIMEOUT,
            _ => UPSTREAM_CLOSED,
        }
    }

    /// For a read of a Pod's answer that gave nothing more.
    pub fn of_pod_read(read: &std::io::Result<usize>) -> &'static str {
        match read {
            Err(e) if e.kind() == std::io::ErrorKind::TimedOut => UPSTREAM_TIMEOUT,
            _ => UPSTREAM_CLOSED,
        }
    }
}

/// What one access log line tells about a request (written by [`log_line::write_line`]).
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
    /// Why the exchange ended before its answer was delivered whole (`client_write_timeout`,
    /// ...; README, Access log); `None` when it ended normally.
    pub ended: Option<&'static str>,
    /// The consumer the route's policies authenticated the request as (the line's `consumer`,
    /// written only when there is one).
    pub consumer: Option<&'a str>,
}

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

/// The JSON body of an error answer.
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
