//! The access log line of a request: [`LogFields`] written as one JSON object, straight into
//! the buffer of the thread that served it ([`RequestLog::log`]).
//!
//! The fields are written in the order the README shows, by hand: the keys are constants, and
//! the values go through `serde_json` (strings escaped, numbers as JSON writes them). The old
//! `serde_json::json!` line built a map of 17 entries (a `BTreeMap`, so the keys came out in
//! alphabetical order), a `String` per address and one for the time, then a fresh `Vec` for the
//! line: about 30 allocations per request (see `benches/RESULTS.md`, "Access log").

use super::LogFields;
use crate::telemetry::access_log::{self, AccessLog};
use std::io::Write;

/// The access log as the proxy paths write to it: one [`LogFields`] per request.
#[derive(Clone)]
pub struct RequestLog(AccessLog);

impl RequestLog {
    pub fn new(log: AccessLog) -> Self {
        RequestLog(log)
    }

    pub fn enabled(&self) -> bool {
        self.0.enabled()
    }

    /// Logs the line of one request. Never blocks (see [`AccessLog::append`]).
    pub fn log(&self, f: &LogFields) {
        self.0.append(|out| write_line(f, out));
    }
}

/// Appends the JSON object of `f` (no newline), its `time` being now.
pub fn write_line(f: &LogFields, out: &mut Vec<u8>) {
    out.extend_from_slice(b"{\"time\":\"");
    access_log::append_time(std::time::SystemTime::now(), out);
    out.push(b'"');
    let mut l = Line(out);
    l.str("request_id", f.request_id);
    l.addr("client", f.client);
    l.str("method", f.method);
    l.str("host", f.host);
    l.str("path", f.path);
    l.opt_str("route", f.route.map(|r| r.name.as_str()));
    l.opt_str(
        "upstream",
        f.route.map(|r| r.upstream.upstream.conf.name.as_str()),
    );
    l.opt_str("cluster", f.backend.and_then(|b| b.info.cluster.as_deref()));
    l.opt_str("pod", f.backend.and_then(|b| b.info.pod.as_deref()));
    l.addr("pod_address", f.backend.map(|b| b.addr));
    l.num("status", f.status);
    l.num("bytes", f.bytes);
    l.float("duration_ms", Some(f.took.as_secs_f64() * 1000.0));
    l.float(
        "upstream_ms",
        f.first_byte.map(|d| d.as_secs_f64() * 1000.0),
    );
    l.num("retries", f.retries);
    l.opt_str("grpc_status", f.grpc_status);
    out.push(b'}');
}

/// Writes `,"key":value` pairs. Keys are this file's constants and need no escaping.
struct Line<'a>(&'a mut Vec<u8>);

impl Line<'_> {
    fn key(&mut self, key: &str) {
        self.0.extend_from_slice(b",\"");
        self.0.extend_from_slice(key.as_bytes());
        self.0.extend_from_slice(b"\":");
    }

    /// Any serialisable value, as `serde_json` writes it: escaped strings, `null` for `None`.
    /// Writing into a `Vec` cannot fail.
    fn value(&mut self, key: &str, v: &impl serde::Serialize) {
        self.key(key);
        let _ = serde_json::to_writer(&mut *self.0, v);
    }

    fn str(&mut self, key: &str, v: &str) {
        self.value(key, &v);
    }

    fn opt_str(&mut self, key: &str, v: Option<&str>) {
        self.value(key, &v);
    }

    fn num(&mut self, key: &str, v: impl serde::Serialize) {
        self.value(key, &v);
    }

    fn float(&mut self, key: &str, v: Option<f64>) {
        self.value(key, &v);
    }

    /// An address as a string (`"10.0.3.7:51234"`, `"[::1]:80"`), or `null`; its text never
    /// needs escaping.
    fn addr(&mut self, key: &str, v: Option<std::net::SocketAddr>) {
        self.key(key);
        match v {
            Some(a) => {
                let _ = write!(self.0, "\"{a}\"");
            }
            None => self.0.extend_from_slice(b"null"),
        }
    }
}

#[cfg(test)]
mod tests;
