//! gRPC over HTTP/2 as a gateway sees it (the wire rules are in the gRPC project's
//! "gRPC over HTTP2" protocol document): which requests are gRPC, their deadline, and the
//! status a failure podgate itself answers maps to.
//!
//! Everything here reads bytes a client sent, so nothing here may panic on them.

use std::time::Duration;

/// gRPC status codes podgate answers itself (the full list has 17; Pods send the others).
pub mod code {
    pub const OK: u32 = 0;
    pub const DEADLINE_EXCEEDED: u32 = 4;
    pub const PERMISSION_DENIED: u32 = 7;
    pub const RESOURCE_EXHAUSTED: u32 = 8;
    pub const UNIMPLEMENTED: u32 = 12;
    pub const INTERNAL: u32 = 13;
    pub const UNAVAILABLE: u32 = 14;
    pub const UNAUTHENTICATED: u32 = 16;
}

/// Whether a request with this `content-type` is a gRPC call: `application/grpc` or
/// `application/grpc+<codec>` (`+proto`, `+json`). gRPC-Web (`application/grpc-web…`) is a
/// different protocol that HTTP/1.1 clients use, and is relayed as plain HTTP.
pub fn is_grpc(content_type: Option<&[u8]>) -> bool {
    let Some(ct) = content_type else { return false };
    const GRPC: &[u8] = b"application/grpc";
    if ct.len() < GRPC.len() || !ct[..GRPC.len()].eq_ignore_ascii_case(GRPC) {
        return false;
    }
    matches!(ct.get(GRPC.len()), None | Some(b'+') | Some(b';'))
}

/// The deadline a `grpc-timeout` value states: 1 to 8 ASCII digits and a unit (`H` hours, `M`
/// minutes, `S` seconds, `m` milliseconds, `u` microseconds, `n` nanoseconds). `None` for
/// anything else, which a gateway then treats as no deadline, as gRPC servers do.
pub fn parse_timeout(value: &[u8]) -> Option<Duration> {
    let (&unit, digits) = value.split_last()?;
    if digits.is_empty() || digits.len() > 8 || !digits.iter().all(u8::is_ascii_digit) {
        return None;
    }
    // At most 8 digits: below 10^8, no overflow in u64 for any unit below.
    let n = digits
        .iter()
        .fold(0u64, |acc, d| acc * 10 + u64::from(d - b'0'));
    Some(match unit {
        b'H' => Duration::from_secs(n * 3600),
        b'M' => Duration::from_secs(n * 60),
        b'S' => Duration::from_secs(n),
        b'm' => Duration::from_millis(n),
        b'u' => Duration::from_micros(n),
        b'n' => Duration::from_nanos(n),
        _ => return None,
    })
}

/// The gRPC status and message for a failure podgate would answer with HTTP `status`.
///
/// Follows the gRPC project's HTTP-to-gRPC status mapping where it has one (404 is
/// UNIMPLEMENTED, 502/503/504 are UNAVAILABLE), except that a Pod that did not answer in time is
/// DEADLINE_EXCEEDED: the call ran out of time, which clients treat differently from "try
/// another server". Messages are fixed texts (no Pod address reaches the client) in the ASCII
/// range `grpc-message` may carry unencoded.
pub fn status_for(http_status: u16) -> (u32, &'static str) {
    match http_status {
        404 => (
            code::UNIMPLEMENTED,
            "no route matches this host and method path",
        ),
        405 => (code::UNIMPLEMENTED, "the route does not accept this method"),
        401 => (code::UNAUTHENTICATED, "unauthenticated"),
        403 => (code::PERMISSION_DENIED, "permission denied"),
        413 => (
            code::RESOURCE_EXHAUSTED,
            "the request is larger than the route accepts",
        ),
        429 => (
            code::RESOURCE_EXHAUSTED,
            "the route's rate limit is exceeded",
        ),
        502 => (code::UNAVAILABLE, "the upstream could not be reached"),
        503 => (code::UNAVAILABLE, "the upstream has no ready endpoint"),
        504 | 408 => (
            code::DEADLINE_EXCEEDED,
            "the upstream did not answer in time",
        ),
        _ => (code::INTERNAL, "the gateway failed to process the call"),
    }
}

/// A `grpc-status` value as a bounded label: its index in
/// [`GRPC_STATUS_LABELS`](crate::telemetry::metrics::GRPC_STATUS_LABELS), the code itself for
/// the 17 gRPC codes, 17 (`other`) for anything else.
pub fn status_index(value: &[u8]) -> usize {
    let parsed = std::str::from_utf8(value)
        .ok()
        .and_then(|s| s.trim().parse::<usize>().ok());
    parsed.filter(|n| *n <= 16).unwrap_or(17)
}

/// The label of [`status_index`].
pub fn status_label(value: &[u8]) -> &'static str {
    crate::telemetry::metrics::GRPC_STATUS_LABELS[status_index(value)]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grpc_content_types() {
        assert!(is_grpc(Some(b"application/grpc")));
        assert!(is_grpc(Some(b"application/grpc+proto")));
        assert!(is_grpc(Some(b"Application/GRPC;charset=utf-8")));
        assert!(!is_grpc(Some(b"application/grpc-web")));
        assert!(!is_grpc(Some(b"application/grpc-web+proto")));
        assert!(!is_grpc(Some(b"application/json")));
        assert!(!is_grpc(Some(b"application/grp")));
        assert!(!is_grpc(None));
    }

    #[test]
    fn timeouts() {
        assert_eq!(parse_timeout(b"1S"), Some(Duration::from_secs(1)));
        assert_eq!(parse_timeout(b"250m"), Some(Duration::from_millis(250)));
        assert_eq!(parse_timeout(b"2H"), Some(Duration::from_secs(7200)));
        assert_eq!(parse_timeout(b"3M"), Some(Duration::from_secs(180)));
        assert_eq!(
            parse_timeout(b"99999999u"),
            Some(Duration::from_micros(99_999_999))
        );
        assert_eq!(
            parse_timeout(b"99999999H"),
            Some(Duration::from_secs(99_999_999 * 3600))
        );
        assert_eq!(parse_timeout(b"5n"), Some(Duration::from_nanos(5)));
        for bad in [
            &b""[..],
            b"S",
            b"123456789S",
            b"1s",
            b"-1S",
            b"1 S",
            b"1.5S",
            b"\xff\xffS",
        ] {
            assert_eq!(parse_timeout(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn arbitrary_bytes_never_panic() {
        // Every 1- and 2-byte value and a spread of longer ones.
        for a in 0..=255u8 {
            let _ = parse_timeout(&[a]);
            let _ = is_grpc(Some(&[a]));
            let _ = status_label(&[a]);
            for b in 0..=255u8 {
                let _ = parse_timeout(&[a, b]);
                let _ = status_label(&[a, b]);
            }
        }
        let _ = parse_timeout(&[b'9'; 300]);
        let _ = status_label(b"99999999999999999999999");
    }

    #[test]
    fn gateway_failures_map_to_grpc_codes() {
        assert_eq!(status_for(503).0, code::UNAVAILABLE);
        assert_eq!(status_for(502).0, code::UNAVAILABLE);
        assert_eq!(status_for(504).0, code::DEADLINE_EXCEEDED);
        assert_eq!(status_for(404).0, code::UNIMPLEMENTED);
        assert_eq!(status_for(500).0, code::INTERNAL);
        for s in 100..600 {
            let (_, message) = status_for(s);
            assert!(message
                .bytes()
                .all(|b| (0x20..0x7f).contains(&b) && b != b'%'));
        }
        assert_eq!(status_label(b"14"), "14");
        assert_eq!(status_label(b"17"), "other");
        assert_eq!(status_label(b"x"), "other");
    }
}
