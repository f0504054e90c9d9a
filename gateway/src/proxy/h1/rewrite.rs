//! The heads podgate writes in HTTP/1.1: the request head for a Pod (from the pipeline's
//! [`Forward`]: the client's fields that pass, a policy's additions, then Host, the forwarding
//! fields, `X-Request-Id` and podgate's own framing) and the answer head for a client (the
//! Pod's fields that pass, framing decided here). Pure functions over parsed heads; `pod.rs` and
//! `client.rs` do the I/O.

use super::body::is_dropped_trailer;
use crate::policies::Fields;
use crate::proxy::pipeline::request::Forward;
use crate::proxy::pipeline::request::{answer_fields, removed_from_answers};
use crate::proxy::pipeline::sides::{AnswerHead, AnswerOut, Declared, Length, Trailers};

/// Where a request target points.
pub(super) struct Target<'a> {
    pub(super) path_and_query: &'a str,
    /// The authority of an absolute-form target.
    pub(super) authority: Option<&'a str>,
}

/// Reads an origin-form (`/p?q`), absolute-form (`http://h/p`) or asterisk-form target.
pub(super) fn target(raw: &str) -> Option<Target<'_>> {
    if raw.starts_with('/') || raw == "*" {
        return Some(Target {
            path_and_query: raw,
            authority: None,
        });
    }
    let (scheme, rest) = raw.split_once("://")?;
    if !scheme.eq_ignore_ascii_case("http") && !scheme.eq_ignore_ascii_case("https") {
        return None;
    }
    let end = rest.find(['/', '?']).unwrap_or(rest.len());
    let (authority, path) = rest.split_at(end);
    if authority.is_empty() || authority.contains('@') {
        return None;
    }
    Some(Target {
        path_and_query: if path.is_empty() { "/" } else { path },
        authority: Some(authority),
    })
}

/// How the request body is framed toward the Pod.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum BodyOut {
    None,
    Length(u64),
    Chunked,
}

/// The head sent to an HTTP/1.1 Pod. `Err` for a request that cannot be written as HTTP/1.1
/// without ambiguity (h2 clients: a `:path` byte a request line cannot carry; a field value with
/// CR, LF or NUL, which the `http` types already refuse, checked again here since a line break
/// would be a second header, or request, to the Pod).
pub(crate) fn request_head(fwd: &Forward<'_>, body: BodyOut) -> Result<Vec<u8>, &'static str> {
    let path = fwd.path.as_bytes();
    if path.is_empty() || !path.iter().all(|b| (0x21..0x7f).contains(b)) {
        return Err("a byte in the path that has no place in a request line");
    }
    let mut out = match fwd.fields {
        Fields::Lines { raw, .. } => Vec::with_capacity(raw.len() + 192),
        Fields::Map(m) => Vec::with_capacity(256 + m.len() * 32),
    };
    out.extend_from_slice(fwd.method.as_str().as_bytes());
    out.push(b' ');
    out.extend_from_slice(path);
    out.extend_from_slice(b" HTTP/1.1\r\n");
    match fwd.fields {
        Fields::Lines { raw, ranges } => {
            for (n, v) in ranges {
                let (Some(name), Some(value)) = (raw.get(n.clone()), raw.get(v.clone())) else {
                    continue;
                };
                if fwd.passes(name) {
                    push_header(&mut out, name, value);
                }
            }
        }
        Fields::Map(map) => {
            let mut cookies = 0usize;
            for (name, value) in map {
                let value = value.as_bytes();
                if value.iter().any(|b| matches!(b, b'\r' | b'\n' | 0)) {
                    return Err("CR, LF or NUL in a field value");
                }
                if name == http::header::COOKIE {
                    cookies += 1;
                } else if fwd.passes(name.as_str().as_bytes()) {
                    push_header(&mut out, name.as_str().as_bytes(), value);
                }
            }
            if cookies > 0 && fwd.passes(b"cookie") {
                // h2 may split a cookie into one field per crumb; HTTP/1.1 wants one line
                // (RFC 9113 §8.2.3).
                out.extend_from_slice(b"cookie: ");
                for (i, v) in map.get_all(http::header::COOKIE).iter().enumerate() {
                    if i > 0 {
                        out.extend_from_slice(b"; ");
                    }
                    out.extend_from_slice(v.as_bytes());
                }
                out.extend_from_slice(b"\r\n");
            }
        }
    }
    for (name, value) in fwd.added() {
        push_header(&mut out, name.as_str().as_bytes(), value.as_bytes());
    }
    if !fwd.host.is_empty() {
        push_header(&mut out, b"host", fwd.host);
    }
    // Appended, as nginx's $proxy_add_x_forwarded_for does, so earlier hops stay visible.
    let before = out.len();
    out.extend_from_slice(b"x-forwarded-for: ");
    if fwd.write_forwarded_for(&mut out) {
        out.extend_from_slice(b"\r\n");
    } else {
        out.truncate(before);
    }
    push_header(&mut out, b"x-forwarded-proto", fwd.proto);
    if !fwd.forwarded_host.is_empty() {
        out.extend_from_slice(b"x-forwarded-host: ");
        out.extend(fwd.forwarded_host.iter().map(u8::to_ascii_lowercase));
        out.extend_from_slice(b"\r\n");
    }
    push_header(&mut out, b"x-request-id", fwd.request_id.as_bytes());
    match body {
        BodyOut::Chunked => push_header(&mut out, b"transfer-encoding", b"chunked"),
        BodyOut::Length(n) => push_length(&mut out, n),
        BodyOut::None => {}
    }
    if fwd.upgrade {
        push_header(&mut out, b"connection", b"upgrade");
    }
    out.extend_from_slice(b"\r\n");
    Ok(out)
}

pub(crate) fn push_header(out: &mut Vec<u8>, name: &[u8], value: &[u8]) {
    out.extend_from_slice(name);
    out.extend_from_slice(b": ");
    out.extend_from_slice(value);
    out.extend_from_slice(b"\r\n");
}

fn push_length(out: &mut Vec<u8>, n: u64) {
    out.extend_from_slice(b"content-length: ");
    push_decimal(out, n);
    out.extend_from_slice(b"\r\n");
}

/// Appends `n` in decimal. Without `core::fmt`, which cost about 300 instructions a request
/// in lengths and addresses (callgrind, `benches/load/instructions.py`).
pub(crate) fn push_decimal(out: &mut Vec<u8>, mut n: u64) {
    let mut digits = [0u8; 20];
    let mut at = digits.len();
    loop {
        at -= 1;
        digits[at] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    out.extend_from_slice(&digits[at..]);
}

/// How an answer's body is written to an HTTP/1.1 client.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Out {
    /// No body follows the head.
    Nothing,
    /// As it comes: a `content-length` body, or one that the end of the connection ends.
    Raw,
    /// podgate's chunks.
    Chunked,
}

/// The answer head for a client, and how its body goes.
pub(crate) struct AnswerFraming {
    pub(crate) head: Vec<u8>,
    pub(crate) out: Out,
    /// The connection may carry another request after this answer.
    pub(crate) keep: bool,
}

/// The head sent to an HTTP/1.`minor` client for `answer`, to a request that was `head_only`;
/// `keep`: whether the connection may carry another request as far as the request is concerned.
pub(crate) fn answer_head<A: AnswerHead>(
    answer: &A,
    out: &AnswerOut<'_>,
    minor: u8,
    head_only: bool,
    keep: bool,
) -> AnswerFraming {
    let status = answer.status();
    let switching = status == 101;
    let mut head = Vec::with_capacity(256);
    head.extend_from_slice(b"HTTP/1.1 ");
    head.extend_from_slice(&itoa3(status));
    head.push(b' ');
    let reason = answer.reason();
    if reason.is_empty() {
        head.extend_from_slice(canonical_reason(status).as_bytes());
    } else {
        head.extend_from_slice(reason);
    }
    head.extend_from_slice(b"\r\n");
    let mut has_id = false;
    answer.each_field(|f| {
        let name = f.name();
        if removed_from_answers(out.edits, name) {
            return;
        }
        has_id |= name.eq_ignore_ascii_case(b"x-request-id");
        push_header(&mut head, name, f.value());
    });
    if !has_id {
        push_header(&mut head, b"x-request-id", out.request_id.as_bytes());
    }
    push_fields(&mut head, &[], out.edits);
    let no_body_status =
        head_only || (100..200).contains(&status) || status == 204 || status == 304;
    let (body, ends_with_close) = match answer.length() {
        Length::Empty => {
            match answer.declared() {
                // HEAD and 304: the length the Pod gave (metadata; no body follows).
                Declared::Length(n) => push_length(&mut head, n),
                Declared::Chunked if minor >= 1 => {
                    push_header(&mut head, b"transfer-encoding", b"chunked")
                }
                _ if !no_body_status => push_length(&mut head, 0),
                _ => {}
            }
            (Out::Nothing, false)
        }
        Length::Known(n) => {
            push_length(&mut head, n);
            (Out::Raw, false)
        }
        // An HTTP/1.0 client cannot read chunks: it gets the data, ended by the close.
        Length::Streamed if minor >= 1 => {
            push_header(&mut head, b"transfer-encoding", b"chunked");
            (Out::Chunked, false)
        }
        Length::Streamed | Length::UntilClose => (Out::Raw, true),
    };
    let keep = keep && !switching && !ends_with_close;
    if switching {
        push_header(&mut head, b"connection", b"upgrade");
    } else if !keep {
        push_header(&mut head, b"connection", b"close");
    } else if minor == 0 {
        push_header(&mut head, b"connection", b"keep-alive");
    }
    head.extend_from_slice(b"\r\n");
    AnswerFraming {
        head,
        out: body,
        keep,
    }
}

/// An answer's own fields and a policy's `response_add` (see
/// [`answer_fields`]).
pub(crate) fn push_fields(
    head: &mut Vec<u8>,
    own: &[(http::HeaderName, http::HeaderValue)],
    edits: &crate::policies::Edits,
) {
    for (name, value) in answer_fields(own, edits) {
        push_header(head, name.as_str().as_bytes(), value.as_bytes());
    }
}

/// Appends `data` as one chunk (nothing for empty data: a zero-size chunk would end the body).
pub(crate) fn push_chunk(out: &mut Vec<u8>, data: &[u8]) {
    super::chunked::write_chunk(data, out)
}

/// Appends the end of a chunked body: the last chunk and the trailer fields that may go on.
pub(crate) fn push_last_chunk(out: &mut Vec<u8>, trailers: Option<&Trailers>) {
    out.extend_from_slice(b"0\r\n");
    match trailers {
        Some(Trailers::Lines(lines)) => out.extend_from_slice(lines),
        Some(Trailers::Map(map)) => {
            // The `http` types hold only valid names and values without CR or LF; what is left
            // is the fields an HTTP/1.1 trailer section must not carry.
            for (n, v) in map {
                if !is_dropped_trailer(n.as_str().as_bytes()) {
                    push_header(out, n.as_str().as_bytes(), v.as_bytes());
                }
            }
        }
        None => {}
    }
    out.extend_from_slice(b"\r\n");
}

pub(crate) fn canonical_reason(status: u16) -> &'static str {
    http::StatusCode::from_u16(status)
        .ok()
        .and_then(|s| s.canonical_reason())
        .unwrap_or("")
}

fn itoa3(n: u16) -> [u8; 3] {
    let n = n.min(999);
    [
        b'0' + (n / 100) as u8,
        b'0' + (n / 10 % 10) as u8,
        b'0' + (n % 10) as u8,
    ]
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policies::Edits;
    use crate::proxy::h1::head::parse_response;
    use crate::proxy::h1::pod::H1Head;
    use bytes::BytesMut;
    use proptest::prelude::*;

    /// Field lines a Pod might send, framing and hop-by-hop ones included.
    fn fields() -> impl Strategy<Value = Vec<u8>> {
        let line = prop_oneof![
            Just(&b"Content-Length: 5\r\n"[..]),
            Just(&b"Content-Length: 5, 5\r\n"[..]),
            Just(&b"Content-Length: 7\r\n"[..]),
            Just(&b"Transfer-Encoding: chunked\r\n"[..]),
            Just(&b"Transfer-Encoding: gzip\r\n"[..]),
            Just(&b"Connection: content-length, x-a\r\n"[..]),
            Just(&b"Connection: close\r\n"[..]),
            Just(&b"X-A: 1\r\n"[..]),
            Just(&b"Upgrade: x\r\n"[..]),
            Just(&b"X-Request-Id: pod\r\n"[..]),
            Just(&b"Keep-Alive: 5\r\n"[..]),
        ];
        proptest::collection::vec(line, 0..8).prop_map(|v| v.concat())
    }

    /// Field names an h2 client may send, the ones the translation treats specially included.
    fn h2_name() -> impl Strategy<Value = Vec<u8>> {
        prop_oneof![
            Just(b"cookie".to_vec()),
            Just(b"te".to_vec()),
            Just(b"host".to_vec()),
            Just(b"content-length".to_vec()),
            Just(b"x-forwarded-for".to_vec()),
            Just(b"x-request-id".to_vec()),
            Just(b"expect".to_vec()),
            Just(b"x-a".to_vec()),
            proptest::collection::vec(any::<u8>(), 1..12),
        ]
    }

    fn h2_value() -> impl Strategy<Value = Vec<u8>> {
        prop_oneof![
            Just(b"trailers".to_vec()),
            Just(b"5".to_vec()),
            Just(b"a=1".to_vec()),
            Just(b"\tx y\xff".to_vec()),
            proptest::collection::vec(any::<u8>(), 0..16),
        ]
    }

    proptest! {
        /// Whatever head a Pod sends, the head podgate writes for the client parses, carries at
        /// most one framing field, and that field says what podgate decided.
        #[test]
        fn rewritten_answer_heads_carry_exactly_podgates_framing(
            status in prop_oneof![Just(200u16), Just(204), Just(304), Just(101), 100u16..1000],
            reason in prop_oneof![Just(&b""[..]), Just(&b" OK"[..]), Just(&b" \xe4"[..])],
            minor in 0u8..2,
            client_minor in 0u8..2,
            head_only in any::<bool>(),
            keep in any::<bool>(),
            fields in fields(),
        ) {
            let mut wire = format!("HTTP/1.{minor} {status}").into_bytes();
            wire.extend_from_slice(reason);
            wire.extend_from_slice(b"\r\n");
            wire.extend_from_slice(&fields);
            wire.extend_from_slice(b"\r\n");
            let mut buf = BytesMut::from(&wire[..]);
            let resp = parse_response(&mut buf).unwrap().unwrap();
            let Ok(head) = H1Head::new(resp, head_only) else {
                return Ok(());
            };
            let edits = Edits::default();
            let out = AnswerOut { request_id: "id", edits: &edits };
            let f = answer_head(&head, &out, client_minor, head_only, keep);
            let out = f.head;

            let mut slots = [httparse::EMPTY_HEADER; 32];
            let mut parsed = httparse::Response::new(&mut slots);
            prop_assert!(matches!(parsed.parse(&out), Ok(httparse::Status::Complete(n)) if n == out.len()));
            let named = |n: &str| parsed.headers.iter().filter(|h| h.name.eq_ignore_ascii_case(n)).count();
            let (cl, te) = (named("content-length"), named("transfer-encoding"));
            prop_assert!(cl + te <= 1, "{}", String::from_utf8_lossy(&out));
            if fields.windows(3).any(|w| w == b"x-a") {
                prop_assert_eq!(named("x-a"), 0, "a field named in Connection went on");
            }
            let length = |h: &httparse::Header| String::from_utf8_lossy(h.value).into_owned();
            let cl_value = parsed.headers.iter().find(|h| h.name.eq_ignore_ascii_case("content-length")).map(length);
            match (head.length(), head.declared()) {
                (Length::Known(n), _) | (Length::Empty, Declared::Length(n)) => {
                    prop_assert_eq!(cl_value, Some(n.to_string()));
                }
                (Length::Streamed, _) if client_minor >= 1 => prop_assert_eq!(te, 1),
                (Length::Empty, Declared::Chunked) if client_minor >= 1 => prop_assert_eq!(te, 1),
                _ => prop_assert!(cl + te == 0 || cl_value.as_deref() == Some("0")),
            }
            if client_minor == 0 {
                prop_assert_eq!(te, 0, "chunks to an HTTP/1.0 client");
            }
            if head.length() == Length::Streamed && client_minor == 0 || head.length() == Length::UntilClose {
                prop_assert!(!f.keep, "a body only the close ends, on a kept connection");
            }
        }

        /// Whatever fields and path an h2 request carries (as far as the `http` types hold
        /// them), the head podgate writes for an HTTP/1.1 Pod is one complete request head to
        /// a strict parser, with exactly one Host, one X-Forwarded-For, at most one framing
        /// field and cookie line, and no hop-by-hop field.
        #[test]
        fn heads_for_http1_pods_parse_as_exactly_one_request(
            path in proptest::collection::vec(any::<u8>(), 0..24),
            fields in proptest::collection::vec((h2_name(), h2_value()), 0..10),
            host_header in any::<bool>(),
            tls in any::<bool>(),
            length in proptest::option::of(0u64..100),
        ) {
            let mut pq = b"/".to_vec();
            pq.extend_from_slice(&path);
            let Ok(pq) = std::str::from_utf8(&pq) else {
                return Ok(());
            };
            let mut map = http::HeaderMap::new();
            for (n, v) in &fields {
                if let (Ok(n), Ok(v)) = (
                    http::HeaderName::from_bytes(n),
                    http::HeaderValue::from_bytes(v),
                ) {
                    map.append(n, v);
                }
            }
            let edits = Edits::default();
            let fwd = Forward {
                method: &http::Method::POST,
                path: pq.into(),
                host: if host_header { b"pod.internal" } else { b"a.test:80" },
                scheme: "http",
                client_ip: Some([127, 0, 0, 1].into()),
                forwarded_for: map.get("x-forwarded-for").map(|v| v.as_bytes()),
                proto: if tls { b"https" } else { b"http" },
                forwarded_host: b"a.test:80",
                request_id: "id",
                fields: Fields::Map(&map),
                connection_named: &[],
                upgrade: false,
                te_trailers: false,
                edits: &edits,
            };
            let body = length.map_or(BodyOut::None, BodyOut::Length);
            let Ok(head) = request_head(&fwd, body) else {
                return Ok(());
            };
            let mut slots = [httparse::EMPTY_HEADER; 64];
            let mut req = httparse::Request::new(&mut slots);
            let parsed = req.parse(&head);
            prop_assert!(
                matches!(parsed, Ok(httparse::Status::Complete(n)) if n == head.len()),
                "{:?}: {}", parsed, String::from_utf8_lossy(&head)
            );
            let count = |name: &str| req.headers.iter().filter(|h| h.name.eq_ignore_ascii_case(name)).count();
            prop_assert_eq!(count("host"), 1);
            prop_assert_eq!(count("x-forwarded-for"), 1);
            prop_assert_eq!(count("x-request-id"), 1);
            prop_assert!(count("content-length") + count("transfer-encoding") <= 1);
            prop_assert!(count("cookie") <= 1);
            for hop_field in ["te", "connection", "keep-alive", "upgrade", "expect", "trailer"] {
                prop_assert_eq!(count(hop_field), 0, "{} went on", hop_field);
            }
            if host_header {
                let host = req.headers.iter().find(|h| h.name == "host").unwrap();
                prop_assert_eq!(host.value, b"pod.internal");
            }
        }
    }
}
