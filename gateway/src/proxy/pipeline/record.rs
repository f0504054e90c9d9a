//! How a request went, written down once: the route's metrics and one access log line. The
//! pipeline is the only writer of either (`tests/layers.rs` keeps the codecs from it).

use super::sides::Ended;
use crate::proxy::{Gateway, GatewayRoute, LogFields};
use crate::upstream::balance::Backend;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// What the log and the metrics say about one request.
pub(crate) struct Record {
    pub(crate) start: Instant,
    pub(crate) backend: Option<Backend>,
    /// The HTTP status sent (0: the client went away before an answer).
    pub(crate) status: u16,
    pub(crate) bytes: u64,
    pub(crate) first_byte: Option<Duration>,
    pub(crate) retries: usize,
    /// The `grpc-status` a gRPC call ended with, as an index of the metric's labels.
    pub(crate) grpc_status: Option<usize>,
    pub(crate) consumer: Option<Arc<str>>,
    /// Why the exchange ended before its answer was delivered whole (the log's `ended`).
    pub(crate) ended: Option<Ended>,
}

impl Record {
    pub(crate) fn new(start: Instant) -> Self {
        Record {
            start,
            backend: None,
            status: 0,
            bytes: 0,
            first_byte: None,
            retries: 0,
            grpc_status: None,
            consumer: None,
            ended: None,
        }
    }
}

/// What the request looked like, for its log line.
pub(crate) struct Seen<'a> {
    pub(crate) request_id: &'a str,
    pub(crate) client: Option<SocketAddr>,
    pub(crate) method: &'a str,
    pub(crate) host: &'a str,
    pub(crate) path: &'a str,
}

/// Counts the request in its route's metrics and writes its access log line.
pub(crate) fn finish(gw: &Gateway, route: Option<&GatewayRoute>, seen: &Seen<'_>, rec: &Record) {
    let took = rec.start.elapsed();
    let metrics = route.map_or(&gw.unmatched, |r| &r.upstream.metrics);
    metrics.observe(rec.status, took);
    if let Some(i) = rec.grpc_status {
        metrics.observe_grpc(i);
    }
    if gw.access_log.enabled() {
        gw.access_log.log(&LogFields {
            request_id: seen.request_id,
            client: seen.client,
            method: seen.method,
            host: seen.host,
            path: seen.path,
            route,
            backend: rec.backend.as_ref(),
            status: rec.status,
            bytes: rec.bytes,
            took,
            first_byte: rec.first_byte,
            retries: rec.retries,
            grpc_status: rec
                .grpc_status
                .map(|i| crate::telemetry::metrics::GRPC_STATUS_LABELS[i.min(17)]),
            ended: rec.ended,
            consumer: rec.consumer.as_deref(),
        });
    }
}

/// A request a client codec refused before it was one (a head that does not parse, ambiguous
/// framing, a head too slow or too large): counted, not routed, not logged (as nginx counts
/// but does not route a 400).
pub(crate) fn refused(gw: &Gateway, status: u16, start: Instant) {
    gw.unmatched.observe(status, start.elapsed());
}
