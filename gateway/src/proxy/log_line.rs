//! The access log line of a request: [`LogFields`] written as one JSON object, straight into
//! the buffer of the thread that served it ([`RequestLog::log`]).
//!
//! The fields are written in the order the README shows, by hand: the keys are constants,
//! strings that need escaping and numbers go through `serde_json`. The old
//! `serde_json::json!` line built a map of 17 entries (a `BTreeMap`, so the keys came out in
//! alphabetical order), a `String` per key, per address and for the time, then a fresh `Vec`
//! for the line: 24,300 instructions per line against 3,150 now, hand-over and writer included
//! (callgrind, `benches/access_log.rs`; figures in `benches/RESULTS.md`, "Access log").

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

/// `,"name":` as one constant: the keys are this file's and need no escaping.
macro_rules! key {
    ($name:literal) => {
        concat!(",\"", $name, "\":").as_bytes()
    };
}

/// Appends the JSON object of `f` (no newline), its `time` being now.
pub fn write_line(f: &LogFields, out: &mut Vec<u8>) {
    out.extend_from_slice(b"{\"time\":\"");
    access_log::append_time(std::time::SystemTime::now(), out);
    out.push(b'"');
    let mut l = Line(out);
    l.str(key!("request_id"), f.request_id);
    l.addr(key!("client"), f.client);
    l.str(key!("method"), f.method);
    l.str(key!("host"), f.host);
    l.str(key!("path"), f.path);
    l.opt_str(key!("route"), f.route.map(|r| r.name.as_str()));
    l.opt_str(
        key!("upstream"),
        f.route.map(|r| r.upstream.upstream.conf.name.as_str()),
    );
    l.opt_str(
        key!("cluster"),
        f.backend.and_then(|b| b.info.cluster.as_deref()),
    );
    l.opt_str(key!("pod"), f.backend.and_then(|b| b.info.pod.as_deref()));
    l.addr(key!("pod_address"), f.backend.map(|b| b.addr));
    l.num(key!("status"), f.status);
    l.num(key!("bytes"), f.bytes);
    l.float(key!("duration_ms"), Some(f.took.as_secs_f64() * 1000.0));
    l.float(
        key!("upstream_ms"),
        f.first_byte.map(|d| d.as_secs_f64() * 1000.0),
    );
    l.num(key!("retries"), f.retries);
    l.opt_str(key!("grpc_status"), f.grpc_status);
    l.opt_str(key!("ended"), f.ended);
    // Only routes whose policies authenticate have consumers: the other lines stay as they were.
    if let Some(consumer) = f.consumer {
        l.str(key!("consumer"), consumer);
    }
    out.push(b'}');
}

/// Writes `,"key":value` pairs; `key` is what [`key!`] makes.
struct Line<'a>(&'a mut Vec<u8>);

impl Line<'_> {
    /// Any serialisable value, as `serde_json` writes it: escaped strings, `null` for `None`.
    /// Writing into a `Vec` cannot fail.
    fn value(&mut self, key: &[u8], v: &impl serde::Serialize) {
        self.0.extend_from_slice(key);
        let _ = serde_json::to_writer(&mut *self.0, v);
    }

    /// A string, JSON-escaped. Most values (ids, hosts, paths, names) hold nothing JSON must
    /// escape: those are copied as they are (a `&str` is valid UTF-8, and JSON takes any
    /// character but `"`, `\` and controls raw). The others go through `serde_json`.
    /// Measured with callgrind (`benches/access_log.rs`): `serde_json`'s escaping, one table
    /// lookup per byte, was 1,600 of a line's 6,500 instructions.
    fn str(&mut self, key: &[u8], v: &str) {
        // No early exit: as a plain reduction the scan is vectorised (16 bytes a step).
        let escape = (v.bytes()).fold(false, |e, b| e | (b < 0x20) | (b == b'"') | (b == b'\\'));
        if !escape {
            self.0.extend_from_slice(key);
            self.0.push(b'"');
            self.0.extend_from_slice(v.as_bytes());
            self.0.push(b'"');
        } else {
            self.value(key, &v);
        }
    }

    fn opt_str(&mut self, key: &[u8], v: Option<&str>) {
        match v {
            Some(v) => self.str(key, v),
            None => self.null(key),
        }
    }

    fn null(&mut self, key: &[u8]) {
        self.0.extend_from_slice(key);
        self.0.extend_from_slice(b"null");
    }

    fn num(&mut self, key: &[u8], v: impl serde::Serialize) {
        self.value(key, &v);
    }

    fn float(&mut self, key: &[u8], v: Option<f64>) {
        self.value(key, &v);
    }

    /// An address as a string (`"10.0.3.7:51234"`, `"[::1]:80"`), or `null`; its text never
    /// needs escaping. IPv4 is written digit by digit: through `Display` the two addresses of
    /// a line were 3,100 of its 6,500 instructions (callgrind, `benches/access_log.rs`).
    fn addr(&mut self, key: &[u8], v: Option<std::net::SocketAddr>) {
        let Some(a) = v else {
            return self.null(key);
        };
        self.0.extend_from_slice(key);
        match a {
            std::net::SocketAddr::V4(a) => {
                self.0.push(b'"');
                for (i, octet) in a.ip().octets().into_iter().enumerate() {
                    if i > 0 {
                        self.0.push(b'.');
                    }
                    decimal(self.0, u32::from(octet));
                }
                self.0.push(b':');
                decimal(self.0, u32::from(a.port()));
                self.0.push(b'"');
            }
            std::net::SocketAddr::V6(a) => {
                let _ = write!(self.0, "\"{a}\"");
            }
        }
    }
}

/// `v` in decimal, without leading zeros. (`h1/rewrite.rs` has its own: taking this one from
/// there would make the proxy layer's modules import each other, `tests/layers.rs`.)
fn decimal(out: &mut Vec<u8>, mut v: u32) {
    let mut digits = [0u8; 10];
    let mut at = digits.len();
    loop {
        at -= 1;
        digits[at] = b'0' + (v % 10) as u8;
        v /= 10;
        if v == 0 {
            break;
        }
    }
    out.extend_from_slice(&digits[at..]);
}

#[cfg(test)]
mod tests;
