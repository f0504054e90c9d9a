//! The request as it came ([`Incoming`], from a client codec) and what goes on to the Pod
//! ([`Forward`]), decided once for every protocol pair: the path (`strip_prefix`, or a
//! policy's rewrite), `Host`/`:authority` (`host_header`, else the client's), the forwarding
//! fields (`X-Forwarded-For` appended as nginx's `$proxy_add_x_forwarded_for` does,
//! `X-Forwarded-Proto`, `X-Forwarded-Host` as the client sent it in lower case), `X-Request-Id`,
//! which of the client's fields pass (never hop-by-hop, framing or the ones set here) and the
//! policies' edits. The Pod codecs only write it in their protocol's form.

use crate::policies::{Edits, Fields};
use http::{HeaderName, HeaderValue, Method};
use std::borrow::Cow;
use std::net::{IpAddr, SocketAddr};

/// A request as its client codec read it, borrowed from the codec's parsed head.
pub(crate) struct Incoming<'a> {
    pub(crate) method: &'a Method,
    /// The authority as the client gave it: an absolute-form target's or `:authority`, else
    /// the `Host` field; empty when there is none.
    pub(crate) authority: &'a [u8],
    /// Origin form (`/p?q`); empty for CONNECT.
    pub(crate) path_and_query: &'a str,
    pub(crate) fields: Fields<'a>,
    pub(crate) peer: Option<SocketAddr>,
    pub(crate) tls: bool,
    /// A gRPC call (h2 with `content-type: application/grpc…`).
    pub(crate) grpc: bool,
    /// Its `grpc-timeout`, as sent.
    pub(crate) grpc_timeout: Option<&'a [u8]>,
    /// The body length the client declared.
    pub(crate) content_length: Option<u64>,
    /// The client's `X-Request-Id` and `X-Forwarded-For`, as sent.
    pub(crate) request_id: Option<&'a [u8]>,
    pub(crate) forwarded_for: Option<&'a [u8]>,
    /// Fields the client's `Connection` named (HTTP/1.1): hop-by-hop, never passed on.
    pub(crate) connection_named: &'a [&'a [u8]],
    /// An upgrade (WebSocket) asked for as RFC 9110 §7.8 says (HTTP/1.1 only).
    pub(crate) upgrade: bool,
    /// `te: trailers` from an h2 client: passed on to h2 Pods, which gRPC servers require.
    pub(crate) te_trailers: bool,
}

/// The request head for the Pod, protocol-neutral.
pub(crate) struct Forward<'a> {
    pub(crate) method: &'a Method,
    pub(crate) path: Cow<'a, str>,
    /// `Host` / `:authority`: the upstream's `host_header`, else the client's authority (empty
    /// when the client sent none).
    pub(crate) host: &'a [u8],
    /// `https` for TLS upstreams (h2's `:scheme`).
    pub(crate) scheme: &'static str,
    pub(crate) client_ip: Option<IpAddr>,
    /// The client's own `X-Forwarded-For`: earlier hops, kept in front of the client.
    pub(crate) forwarded_for: Option<&'a [u8]>,
    pub(crate) proto: &'static [u8],
    /// The authority as the client sent it, port included (nginx's `$http_host`); written in
    /// lower case; empty: none.
    pub(crate) forwarded_host: &'a [u8],
    pub(crate) request_id: &'a str,
    pub(crate) fields: Fields<'a>,
    pub(crate) connection_named: &'a [&'a [u8]],
    pub(crate) upgrade: bool,
    pub(crate) te_trailers: bool,
    pub(crate) edits: &'a Edits,
}

impl<'a> Forward<'a> {
    pub(crate) fn new(
        inc: &'a Incoming<'a>,
        route: &'a crate::proxy::GatewayRoute,
        edits: &'a Edits,
        request_id: &'a str,
    ) -> Self {
        let conf = &route.upstream.upstream.conf;
        let path = match &edits.path {
            Some(p) => Cow::Borrowed(p.as_str()),
            None => route.upstream_path(inc.path_and_query),
        };
        Forward {
            method: inc.method,
            path,
            host: conf
                .host_header
                .as_deref()
                .map_or(inc.authority, str::as_bytes),
            scheme: match conf.scheme {
                crate::config::Scheme::Https => "https",
                crate::config::Scheme::Http => "http",
            },
            client_ip: inc.peer.map(|a| a.ip()),
            forwarded_for: forwarded_chain(inc, &route.upstream.trusted),
            proto: if inc.tls { b"https" } else { b"http" },
            forwarded_host: inc.authority,
            request_id,
            fields: inc.fields,
            connection_named: inc.connection_named,
            upgrade: inc.upgrade,
            te_trailers: inc.te_trailers,
            edits,
        }
    }

    /// Whether the client's field `name` goes on to the Pod: not hop-by-hop (RFC 9110 §7.6.1,
    /// and whatever its `Connection` named), not framing (the Pod codec writes its own), not one
    /// the pipeline sets, not removed by a policy.
    #[inline]
    pub(crate) fn passes(&self, name: &[u8]) -> bool {
        !set_here_or_hop(name, self.upgrade)
            && !self
                .connection_named
                .iter()
                .any(|h| name.eq_ignore_ascii_case(h))
            && !self
                .edits
                .remove
                .iter()
                .any(|r| name.eq_ignore_ascii_case(r.as_str().as_bytes()))
    }

    /// The fields a policy adds, after the client's: never one the pipeline sets, a framing or
    /// a hop-by-hop one.
    pub(crate) fn added(&self) -> impl Iterator<Item = &(HeaderName, HeaderValue)> {
        self.edits
            .add
            .iter()
            .filter(|(n, _)| !set_here_or_hop(n.as_str().as_bytes(), false))
    }

    /// The `X-Forwarded-For` value, written into `out`; `false` (nothing written) without a
    /// client address.
    pub(crate) fn write_forwarded_for(&self, out: &mut Vec<u8>) -> bool {
        let Some(ip) = self.client_ip else {
            return false;
        };
        if let Some(prev) = self.forwarded_for {
            out.extend_from_slice(prev);
            out.extend_from_slice(b", ");
        }
        match ip {
            // Without `core::fmt` (see `push_decimal`): nearly every client is IPv4.
            IpAddr::V4(v4) => {
                for (i, octet) in v4.octets().into_iter().enumerate() {
                    if i > 0 {
                        out.push(b'.');
                    }
                    if octet >= 100 {
                        out.push(b'0' + octet / 100);
                    }
                    if octet >= 10 {
                        out.push(b'0' + octet / 10 % 10);
                    }
                    out.push(b'0' + octet % 10);
                }
            }
            IpAddr::V6(_) => {
                let _ = std::io::Write::write_fmt(out, format_args!("{ip}"));
            }
        }
        true
    }
}

/// The client's `X-Forwarded-For` to keep in front of the peer's address. Without
/// `trusted_proxies`, all of it (nginx's `$proxy_add_x_forwarded_for`). With them, only what
/// the client address the policies saw (`policies::client_of`) was read from: nothing from a
/// peer that is not trusted (its list is its own writing), and from a trusted one the entries
/// from the client on. So the Pod's first entry is the client podgate decided, and entries a
/// client wrote to pass for someone else never reach it.
fn forwarded_chain<'a>(
    inc: &Incoming<'a>,
    trusted: &crate::policies::TrustedProxies,
) -> Option<&'a [u8]> {
    let sent = inc.forwarded_for.filter(|p| !p.is_empty())?;
    if trusted.is_empty() {
        return Some(sent);
    }
    crate::policies::client::forwarded_chain(inc.peer?.ip(), sent, trusted)
}

/// Hop-by-hop fields, framing fields and the fields the pipeline itself sets (`Host`, the
/// forwarding fields, `X-Request-Id`, `Expect`, answered by podgate); `Upgrade` unless the request
/// is an upgrade. `te` is among them: an HTTP/1.1 hop's; h2 Pods get `te: trailers` from
/// [`Forward::te_trailers`].
pub(crate) fn set_here_or_hop(name: &[u8], upgrade: bool) -> bool {
    let is = |s: &[u8]| name.eq_ignore_ascii_case(s);
    match name.len() {
        2 => is(b"te"),
        4 => is(b"host"),
        6 => is(b"expect"),
        7 => is(b"trailer") || (!upgrade && is(b"upgrade")),
        10 => is(b"connection") || is(b"keep-alive"),
        12 => is(b"x-request-id"),
        14 => is(b"content-length"),
        15 => is(b"x-forwarded-for"),
        16 => is(b"proxy-connection") || is(b"x-forwarded-host"),
        17 => is(b"transfer-encoding") || is(b"x-forwarded-proto"),
        _ => false,
    }
}

/// Whether a policy's `response_remove` drops answer field `name`.
#[inline]
pub(crate) fn removed_from_answers(edits: &Edits, name: &[u8]) -> bool {
    !edits.response_remove.is_empty()
        && edits
            .response_remove
            .iter()
            .any(|r| name.eq_ignore_ascii_case(r.as_str().as_bytes()))
}

/// Fields an answer podgate makes or relays gets from a policy (`response_add`), or has of its
/// own (a 405's `Allow`, a policy answer's: `Location`, `WWW-Authenticate`, a preflight's CORS
/// fields), without the ones podgate decides itself. `response_remove` is about the Pod's
/// fields (a CORS route drops the Pod's `Access-Control-*`): it never takes back what a policy
/// answered.
pub(crate) fn answer_fields<'e>(
    own: &'e [(HeaderName, HeaderValue)],
    edits: &'e Edits,
) -> impl Iterator<Item = &'e (HeaderName, HeaderValue)> {
    own.iter()
        .chain(edits.response_add.iter())
        .filter(|(n, _)| !set_on_answers(n.as_str().as_bytes()))
}

/// Answer fields the pipeline decides itself, or that frame or connect: a policy's
/// `response_add` never sets them.
pub(crate) fn set_on_answers(name: &[u8]) -> bool {
    let is = |s: &[u8]| name.eq_ignore_ascii_case(s);
    match name.len() {
        2 => is(b"te"),
        7 => is(b"trailer") || is(b"upgrade"),
        10 => is(b"connection") || is(b"keep-alive"),
        12 => is(b"x-request-id"),
        14 => is(b"content-length"),
        16 => is(b"proxy-connection"),
        17 => is(b"transfer-encoding"),
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_fields_podgate_sets_or_that_belong_to_a_hop_never_pass() {
        for name in [
            "te",
            "Host",
            "EXPECT",
            "trailer",
            "upgrade",
            "connection",
            "keep-alive",
            "x-request-id",
            "content-length",
            "x-forwarded-for",
            "proxy-connection",
            "x-forwarded-host",
            "transfer-encoding",
            "X-Forwarded-Proto",
        ] {
            assert!(set_here_or_hop(name.as_bytes(), false), "{name}");
        }
        assert!(!set_here_or_hop(b"upgrade", true));
        for name in ["cookie", "x-te", "hosts", "accept", "x-forwarded-port", ""] {
            assert!(!set_here_or_hop(name.as_bytes(), false), "{name}");
        }
    }
}
