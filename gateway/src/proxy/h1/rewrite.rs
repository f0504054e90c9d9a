//! The heads podgate writes on the HTTP/1.1 path: the request head sent to a Pod (the client's
//! fields minus hop-by-hop and framing ones, then Host, the forwarding fields and podgate's own
//! framing) and the answer head sent back (the Pod's fields, framing decided here). Pure
//! functions over parsed heads; `exchange.rs` does the I/O.

use super::body::{Chunked, Framing, Out};
use super::head::{BodyLength, HeadInfo, Request, Response};
use super::Client;
use crate::proxy::GatewayRoute;

/// The request as routed.
pub(super) struct RequestCtx<'a> {
    pub(super) req: &'a Request,
    pub(super) info: &'a HeadInfo<'a>,
    pub(super) request_id: &'a str,
    /// The `Host` to send on when no `host_header` replaces it: the client's `Host`, or the
    /// authority of an absolute-form target (RFC 9112 §3.2.2).
    pub(super) host_raw: &'a [u8],
    pub(super) path_and_query: &'a str,
    pub(super) head_only: bool,
    /// Whether the client sent a Content-Length (passed on even when 0).
    pub(super) has_length: bool,
    pub(super) upgrading: bool,
}

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

/// The head sent to the Pod: the client's fields minus hop-by-hop and framing ones, then
/// `Host`, the forwarding fields, and the body's framing as podgate decided it.
pub(super) fn upstream_head(
    ctx: &RequestCtx,
    route: &GatewayRoute,
    c: &Client,
    framing: &Framing,
    buffered: usize,
) -> Vec<u8> {
    let req = ctx.req;
    let conf = &route.upstream.upstream.conf;
    let mut out = Vec::with_capacity(req.raw.len() + 160);
    out.extend_from_slice(req.method.as_str().as_bytes());
    out.push(b' ');
    out.extend_from_slice(route.upstream_path(ctx.path_and_query).as_bytes());
    out.extend_from_slice(b" HTTP/1.1\r\n");
    for (name, value) in req.headers() {
        if !ctx.info.drops(name, ctx.upgrading) {
            push_header(&mut out, name, value);
        }
    }
    match &conf.host_header {
        Some(h) => push_header(&mut out, b"host", h.as_bytes()),
        None if !ctx.host_raw.is_empty() => push_header(&mut out, b"host", ctx.host_raw),
        None => {}
    }
    if let Some(ip) = c.addr.map(|a| a.ip()) {
        // Appended, as nginx's $proxy_add_x_forwarded_for does, so earlier hops stay visible.
        out.extend_from_slice(b"x-forwarded-for: ");
        if let Some(prev) = ctx.info.forwarded_for.filter(|p| !p.is_empty()) {
            out.extend_from_slice(prev);
            out.extend_from_slice(b", ");
        }
        out.extend_from_slice(ip.to_string().as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    let proto: &[u8] = if c.tls { b"https" } else { b"http" };
    push_header(&mut out, b"x-forwarded-proto", proto);
    if !ctx.host_raw.is_empty() {
        // As the client sent it, port included (nginx's $http_host), in lowercase.
        push_header(
            &mut out,
            b"x-forwarded-host",
            &ctx.host_raw.to_ascii_lowercase(),
        );
    }
    push_header(&mut out, b"x-request-id", ctx.request_id.as_bytes());
    match framing {
        Framing::Chunked(_) => push_header(&mut out, b"transfer-encoding", b"chunked"),
        Framing::Length(n) => push_header(&mut out, b"content-length", n.to_string().as_bytes()),
        _ if buffered > 0 || ctx.has_length => {
            push_header(&mut out, b"content-length", buffered.to_string().as_bytes())
        }
        _ => {}
    }
    if ctx.upgrading {
        push_header(&mut out, b"connection", b"upgrade");
    }
    out.extend_from_slice(b"\r\n");
    out
}

pub(crate) fn push_header(out: &mut Vec<u8>, name: &[u8], value: &[u8]) {
    out.extend_from_slice(name);
    out.extend_from_slice(b": ");
    out.extend_from_slice(value);
    out.extend_from_slice(b"\r\n");
}

/// Reads a response head from the Pod, within `timeout` for each read. A head that does not
/// parse is `InvalidData`.
/// What the head sent to the client says of the body.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Declared {
    Length(u64),
    Chunked,
    Nothing,
}

/// How an answer's body travels to the client.
pub(crate) struct AnswerFraming {
    /// How the Pod's body is read.
    pub(crate) framing: Framing,
    /// How a chunked body is written on.
    pub(crate) how: Out,
    /// What the head sent to the client says of the body.
    pub(crate) declared: Declared,
    /// Only the end of the connection ends the body for the client.
    pub(crate) ends_with_close: bool,
}

/// Decides the framing of an answer with `status` and the Pod's `length`, to a request that
/// was `head_only` from a client speaking HTTP/1.`minor`.
pub(crate) fn answer_framing(
    status: u16,
    length: BodyLength,
    head_only: bool,
    minor: u8,
) -> AnswerFraming {
    let no_body = head_only || status == 101 || status == 204 || status == 304;
    let framing = match length {
        _ if no_body => Framing::Empty,
        BodyLength::Chunked => Framing::Chunked(Chunked::default()),
        BodyLength::Length(n) => Framing::Length(n),
        BodyLength::None => Framing::UntilClose,
    };
    // An HTTP/1.0 client cannot read chunks: it gets the data, ended by the close.
    let how = if minor == 0 { Out::Plain } else { Out::Chunked };
    let chunked = matches!(framing, Framing::Chunked(_));
    // What podgate says about the body: its own framing, or for HEAD and 304 the length the
    // Pod gave (metadata; no body follows).
    let declared = match (&framing, length) {
        (Framing::Length(n), _) => Declared::Length(*n),
        (Framing::Chunked(_), _) if how == Out::Chunked => Declared::Chunked,
        (Framing::Empty, BodyLength::Length(n)) if head_only || status == 304 => {
            Declared::Length(n)
        }
        (Framing::Empty, BodyLength::Chunked) if head_only && how == Out::Chunked => {
            Declared::Chunked
        }
        _ => Declared::Nothing,
    };
    AnswerFraming {
        ends_with_close: framing == Framing::UntilClose || (chunked && how == Out::Plain),
        framing,
        how,
        declared,
    }
}

/// The head sent to the client.
pub(super) fn response_head(
    resp: &Response,
    info: &HeadInfo,
    ctx: &RequestCtx,
    keep: bool,
    switching: bool,
    declared: Declared,
) -> Vec<u8> {
    let mut out = Vec::with_capacity(resp.raw.len() + 96);
    out.extend_from_slice(b"HTTP/1.1 ");
    out.extend_from_slice(itoa3(resp.status).as_slice());
    out.push(b' ');
    let reason = resp.reason();
    if reason.is_empty() {
        let canonical = http::StatusCode::from_u16(resp.status)
            .ok()
            .and_then(|s| s.canonical_reason())
            .unwrap_or("");
        out.extend_from_slice(canonical.as_bytes());
    } else {
        out.extend_from_slice(reason);
    }
    out.extend_from_slice(b"\r\n");
    let mut has_id = false;
    for (name, value) in resp.headers() {
        if name.eq_ignore_ascii_case(b"x-request-id") {
            has_id = true;
        } else if info.drops(name, switching) {
            continue;
        }
        push_header(&mut out, name, value);
    }
    if !has_id {
        push_header(&mut out, b"x-request-id", ctx.request_id.as_bytes());
    }
    match declared {
        Declared::Length(n) => push_header(&mut out, b"content-length", n.to_string().as_bytes()),
        Declared::Chunked => push_header(&mut out, b"transfer-encoding", b"chunked"),
        Declared::Nothing => {}
    }
    if switching {
        push_header(&mut out, b"connection", b"upgrade");
    } else if !keep {
        push_header(&mut out, b"connection", b"close");
    } else if ctx.req.minor == 0 {
        push_header(&mut out, b"connection", b"keep-alive");
    }
    out.extend_from_slice(b"\r\n");
    out
}

fn itoa3(n: u16) -> [u8; 3] {
    let n = n.min(999);
    [
        b'0' + (n / 100) as u8,
        b'0' + (n / 10 % 10) as u8,
        b'0' + (n % 10) as u8,
    ]
}

/// What consistent hashing reads from a request on this path.
pub(super) struct HashView<'a> {
    req: &'a Request,
    path: &'a str,
    client: Option<std::net::IpAddr>,
}

impl crate::upstream::policy::RequestParts for HashView<'_> {
    fn header_values<'s>(&'s self, name: &'s str) -> impl Iterator<Item = &'s [u8]> + 's {
        self.req
            .headers()
            .filter(move |(n, _)| n.eq_ignore_ascii_case(name.as_bytes()))
            .map(|(_, v)| v)
    }
    fn client_ip(&self) -> Option<std::net::IpAddr> {
        self.client
    }
    fn path(&self) -> &str {
        self.path
    }
}

impl<'a> HashView<'a> {
    pub(super) fn of(ctx: &RequestCtx<'a>, client: Option<std::net::SocketAddr>) -> Self {
        HashView {
            req: ctx.req,
            path: ctx.path_and_query.split('?').next().unwrap_or("/"),
            client: client.map(|a| a.ip()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proxy::h1::head::{parse_request, parse_response};
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
            let info = HeadInfo::gather(resp.headers());
            let Ok(length) = info.response_length(resp.minor) else {
                return Ok(());
            };
            let method = if head_only { "HEAD" } else { "GET" };
            let mut rbuf =
                BytesMut::from(format!("{method} / HTTP/1.{client_minor}\r\nHost: a\r\n\r\n").as_bytes());
            let req = parse_request(&mut rbuf).unwrap().unwrap();
            let rinfo = HeadInfo::gather(req.headers());
            let ctx = RequestCtx {
                req: &req,
                info: &rinfo,
                request_id: "id",
                host_raw: b"a",
                path_and_query: "/",
                head_only,
                has_length: false,
                upgrading: false,
            };
            let f = answer_framing(status, length, head_only, client_minor);
            let out = response_head(&resp, &info, &ctx, keep, status == 101, f.declared);

            let mut slots = [httparse::EMPTY_HEADER; 32];
            let mut parsed = httparse::Response::new(&mut slots);
            prop_assert!(matches!(parsed.parse(&out), Ok(httparse::Status::Complete(n)) if n == out.len()));
            let named = |n: &str| parsed.headers.iter().filter(|h| h.name.eq_ignore_ascii_case(n)).count();
            let (cl, te) = (named("content-length"), named("transfer-encoding"));
            prop_assert!(cl + te <= 1, "{}", String::from_utf8_lossy(&out));
            if fields.windows(3).any(|w| w == b"x-a") {
                prop_assert_eq!(named("x-a"), 0, "a field named in Connection went on");
            }
            match f.declared {
                Declared::Length(n) => {
                    let v = parsed.headers.iter().find(|h| h.name.eq_ignore_ascii_case("content-length")).unwrap().value;
                    let want = n.to_string();
                    prop_assert_eq!(v, want.as_bytes());
                }
                Declared::Chunked => prop_assert_eq!(te, 1),
                Declared::Nothing => prop_assert_eq!(cl + te, 0),
            }
            if client_minor == 0 {
                prop_assert_eq!(te, 0, "chunks to an HTTP/1.0 client");
            }
        }
    }
}
