//! Route policies: what a route decides about a request before a Pod sees it — who may call
//! (API keys, JWT, IP rules, CORS), how often (rate limits), and what reaches the Pod (header
//! rules, rewrites, redirects, body limits).
//!
//! This module is the contract between the request pipeline (`proxy/`) and the policies. The
//! pipeline builds one [`RequestView`] per request from whatever codec read it (HTTP/1.1 or h2,
//! with or without TLS, gRPC or not), hands it to the route's [`Policies`] once, and then
//! either sends the [`LocalAnswer`] the policies gave (rendered by the client's codec: a JSON
//! error, a redirect, a CORS preflight answer, or a gRPC trailers-only answer) or carries on to
//! the Pod with the [`Edits`] applied by the Pod's codec. Because there is exactly one call site
//! for every client protocol, a policy written here holds on all of them.
//!
//! Rules every policy keeps:
//! - The view is borrowed; a policy copies nothing it does not keep.
//! - No lock, no file or network I/O on the request path except a rate-limit store's call,
//!   which is bounded by its `timeout`. Files (API keys, JWKS) are re-read in the background.
//! - A credential (API key, token) never goes into a log line, a metric or an error answer.
//! - Routes without policies cost nothing: [`Policies::is_empty`] lets the pipeline skip the
//!   call.
//!
//! The evaluation order is fixed (the same as APISIX's phases, Envoy's filter order for these):
//! redirect → CORS preflight → IP rules → authentication → consumers → rate limits → body limit
//! → request header rules and rewrite; response header rules and CORS fields go on the answer.
//!
//! One file per policy: `redirect.rs`, `cors.rs`, `ip.rs`, `auth.rs` (with `api_key.rs`,
//! `jwt.rs` and its ring adapter `jwt_crypto.rs`), `rate_limit/` (local GCRA buckets and the
//! Redis store), `path.rs` (rewrite), `headers.rs`. What
//! routes share — consumers' keys and JWT providers, and the watch that re-reads their files —
//! is `identities.rs` (with `files.rs`); the client address behind trusted proxies is
//! `client.rs`.
//!
//! What the pipeline and `live.rs` call: [`Identities::start`] once per config generation
//! whose consumers or JWT providers changed (`live.rs` keeps them across other reloads);
//! [`Policies::build`] once per route; [`client::client_of`] once per request to fill
//! [`RequestView::client`]; [`Policies::on_request`] once per request of a route whose policies are not
//! [`Policies::is_empty`].

mod api_key;
mod auth;
pub mod client;
mod cors;
mod files;
mod headers;
mod identities;
mod ip;
pub mod jwt;
pub mod jwt_crypto;
mod path;
pub mod rate_limit;
mod redirect;
#[cfg(test)]
mod test_support;
#[cfg(test)]
mod tests_auth;
#[cfg(test)]
mod tests_request;

pub use client::{client_address, client_of, TrustedProxies};
pub use identities::Identities;

use crate::config::RouteConf;
use crate::telemetry::metrics;
use bytes::Bytes;
use http::{HeaderName, HeaderValue, Method};
use std::net::IpAddr;
use std::ops::Range;
use std::sync::Arc;

/// A request as every policy sees it, whatever protocol carried it. Built by the pipeline.
pub struct RequestView<'a> {
    pub method: &'a Method,
    /// The host routing matched: lowercase, without port.
    pub host: &'a str,
    /// The path and query as the client sent them (origin form), before `strip_prefix` or a
    /// rewrite.
    pub path_and_query: &'a str,
    pub fields: Fields<'a>,
    /// The TCP peer.
    pub peer: Option<IpAddr>,
    /// The client: the peer, or the address a trusted proxy (`server.trusted_proxies`) put in
    /// `X-Forwarded-For` (the rightmost one that is not itself trusted). Computed once by the
    /// pipeline.
    pub client: Option<IpAddr>,
    /// The client connection is TLS.
    pub tls: bool,
    /// A gRPC call (`content-type: application/grpc…`): refusals are answered the gRPC way.
    pub grpc: bool,
    /// The body length the client declared (`content-length`), if any.
    pub content_length: Option<u64>,
}

/// The client's header fields, in the form its codec parsed them into; never copied.
#[derive(Clone, Copy)]
pub enum Fields<'a> {
    /// HTTP/1.1: name and value ranges into the head's raw bytes.
    Lines {
        raw: &'a [u8],
        ranges: &'a [(Range<usize>, Range<usize>)],
    },
    /// h2: the decoded field map.
    Map(&'a http::HeaderMap),
}

impl<'a> Fields<'a> {
    /// Every value of field `name` (compared case-insensitively), in order.
    pub fn values<'s>(self, name: &'s str) -> impl Iterator<Item = &'a [u8]> + 's
    where
        'a: 's,
    {
        let (lines, map) = match self {
            Fields::Lines { raw, ranges } => (Some((raw, ranges)), None),
            Fields::Map(m) => (None, Some(m)),
        };
        let lines = lines.into_iter().flat_map(move |(raw, ranges)| {
            ranges.iter().filter_map(move |(n, v)| {
                let field = raw.get(n.clone())?;
                field
                    .eq_ignore_ascii_case(name.as_bytes())
                    .then(|| raw.get(v.clone()))
                    .flatten()
            })
        });
        let map = map
            .into_iter()
            .flat_map(move |m| m.get_all(name).iter().map(HeaderValue::as_bytes));
        lines.chain(map)
    }
}

impl<'a> RequestView<'a> {
    /// The path without the query.
    pub fn path(&self) -> &'a str {
        self.path_and_query
            .split_once('?')
            .map_or(self.path_and_query, |(p, _)| p)
    }

    /// The query string without `?`, if there is one.
    pub fn query(&self) -> Option<&'a str> {
        self.path_and_query.split_once('?').map(|(_, q)| q)
    }

    /// Every value of field `name` (compared case-insensitively), in order.
    pub fn header_values<'s>(&'s self, name: &'s str) -> impl Iterator<Item = &'a [u8]> + 's {
        self.fields.values(name)
    }

    /// The first value of field `name`.
    pub fn header(&self, name: &str) -> Option<&'a [u8]> {
        self.header_values(name).next()
    }
}

/// What the policies change about a request that goes on to a Pod, and about its answer.
/// Applied by the Pod's codec (request) and the client's codec (answer), after the gateway's
/// own fields are decided (`Host`, `X-Forwarded-*` and `X-Request-Id` stay the pipeline's).
#[derive(Default, Debug)]
pub struct Edits {
    /// Request fields not passed to the Pod (credentials unless `auth.forward`,
    /// `request_headers.remove`, and the names `request_headers.set` replaces).
    pub remove: Vec<HeaderName>,
    /// Request fields added toward the Pod after the client's.
    pub add: Vec<(HeaderName, HeaderValue)>,
    /// The path and query to send instead of the client's (a rewrite); `strip_prefix` is not
    /// applied on top of it.
    pub path: Option<String>,
    /// The consumer the request was authenticated as: into the access log (and, by the policy
    /// that set it, into `add` as `x-consumer`).
    pub consumer: Option<Arc<str>>,
    /// Answer fields not passed to the client.
    pub response_remove: Vec<HeaderName>,
    /// Answer fields added toward the client (`response_headers`, CORS fields, rate-limit
    /// fields); also on a [`LocalAnswer`] made after they were decided.
    pub response_add: Vec<(HeaderName, HeaderValue)>,
    /// The most body bytes the client may send (`max_body`): 413 from the Content-Length, or as
    /// soon as a streamed body passes it.
    pub max_body: Option<u64>,
}

/// An answer podgate gives itself instead of asking a Pod.
#[derive(Debug)]
pub struct LocalAnswer {
    pub status: u16,
    /// Fields besides the framing ones (the codec decides those).
    pub headers: Vec<(HeaderName, HeaderValue)>,
    pub body: AnswerBody,
}

#[derive(Debug)]
pub enum AnswerBody {
    /// podgate's JSON error body for `status` (`proxy::error_json`); to a gRPC client, a
    /// trailers-only answer with the `grpc-status` that `status` maps to.
    Error,
    /// No body (a CORS preflight's 204, a redirect's).
    Empty,
    /// These bytes, as they are.
    Bytes(Bytes),
}

/// What the policies decided.
#[derive(Debug)]
pub enum Verdict {
    /// Go on to the Pod, with the edits.
    Continue,
    /// Answer this; no Pod is asked.
    Answer(LocalAnswer),
}

/// The policies of one route, built from its `policies:` when the config is loaded.
#[derive(Default, Debug)]
pub struct Policies {
    empty: bool,
    redirect: Option<redirect::Redirect>,
    cors: Option<cors::Cors>,
    ip: Option<ip::IpRules>,
    auth: Option<auth::Auth>,
    /// Only these consumers may call (empty: anyone `auth` accepts).
    consumers: Vec<Arc<str>>,
    /// `rate_limit`: after authentication and consumers, before the body limit.
    rate_limit: Option<rate_limit::RateLimits>,
    max_body: Option<u64>,
    request_headers: headers::HeaderRules,
    response_headers: headers::HeaderRules,
    path: path::PathRule,
    refusals: Refusals,
    /// Keeps the route's consumers and providers (and their file watch) alive.
    _identities: Option<Arc<Identities>>,
    /// Unit tests of the pipeline give a route a policy of their own (see
    /// [`Policies::for_test`]).
    #[cfg(test)]
    test: Option<TestPolicy>,
}

/// A policy written by a test: what it decides about a request.
#[cfg(test)]
pub type TestPolicy = fn(&RequestView<'_>, &mut Edits) -> Verdict;

/// The refusal counters of one route, resolved at build.
#[derive(Default, Debug)]
struct Refusals {
    ip: Option<prometheus::IntCounter>,
    auth: Option<prometheus::IntCounter>,
    consumers: Option<prometheus::IntCounter>,
    max_body: Option<prometheus::IntCounter>,
}

fn count(counter: &Option<prometheus::IntCounter>) {
    if let Some(c) = counter {
        c.inc();
    }
}

fn refuse(status: u16) -> LocalAnswer {
    LocalAnswer {
        status,
        headers: Vec::new(),
        body: AnswerBody::Error,
    }
}

impl Policies {
    /// The policies of `route` (its `policies:`), with the consumers and JWT providers of its
    /// config generation.
    pub fn build(route: &RouteConf, identities: &Arc<Identities>) -> Policies {
        let conf = &route.policies;
        let name = route.name.as_str();
        let counter = |policy: &str, status: u16, on: bool| {
            on.then(|| metrics::policy_refusals(name, policy, status))
        };
        let ip = ip::IpRules::new(&conf.ip_allow, &conf.ip_deny);
        let auth = conf.auth.as_ref().map(|a| {
            auth::Auth::new(name, a, identities.keys(), |p| {
                identities.provider(p).cloned()
            })
        });
        Policies {
            empty: conf.is_empty(),
            redirect: conf.redirect.as_ref().map(redirect::Redirect::new),
            cors: conf.cors.as_ref().map(cors::Cors::new),
            refusals: Refusals {
                ip: counter("ip", 403, ip.is_some()),
                auth: counter("auth", 401, auth.is_some()),
                consumers: counter("consumers", 403, !conf.consumers.is_empty()),
                max_body: counter("max_body", 413, conf.max_body.is_some()),
            },
            ip,
            auth,
            consumers: conf.consumers.clone(),
            rate_limit: rate_limit::RateLimits::new(name, &conf.rate_limit),
            max_body: conf.max_body,
            request_headers: headers::HeaderRules::new(&conf.request_headers),
            response_headers: headers::HeaderRules::new(&conf.response_headers),
            path: path::PathRule::new(
                &route.path_prefix,
                route.strip_prefix,
                conf.rewrite.as_ref(),
            ),
            _identities: Some(identities.clone()),
            #[cfg(test)]
            test: None,
        }
    }

    /// No policy is set: the pipeline skips [`Policies::on_request`].
    pub fn is_empty(&self) -> bool {
        #[cfg(test)]
        if self.test.is_some() {
            return false;
        }
        // `Policies::default()` (no route config at all) is empty too.
        self.empty
            || (self.redirect.is_none()
                && self.cors.is_none()
                && self.ip.is_none()
                && self.auth.is_none()
                && self.rate_limit.is_none()
                && self.max_body.is_none()
                && self.request_headers.is_empty()
                && self.response_headers.is_empty()
                && !self.path.rewrites())
    }

    /// Whether this route answers CORS preflights itself: the router must let `OPTIONS` reach
    /// it even when the route's `methods` leave OPTIONS out.
    pub fn answers_preflights(&self) -> bool {
        self.cors.is_some()
    }

    /// Decides about one request; fills `edits` for a request that goes on.
    pub async fn on_request(&self, req: &RequestView<'_>, edits: &mut Edits) -> Verdict {
        #[cfg(test)]
        if let Some(policy) = self.test {
            return policy(req, edits);
        }
        if let Err(answer) = self.admit(req, edits) {
            return Verdict::Answer(answer);
        }
        // Only here may a policy wait (a shared store's call, bounded by its `timeout`): after
        // authentication, so that `edits.consumer` keys `key: consumer` rules.
        if let Some(limits) = &self.rate_limit {
            if let Some(answer) = limits.check(req, edits).await {
                return Verdict::Answer(answer);
            }
        }
        match self.shape(req, edits) {
            Ok(()) => Verdict::Continue,
            Err(answer) => Verdict::Answer(answer),
        }
    }

    /// The decisions before rate limits: redirect, CORS preflight, IP rules, authentication,
    /// consumers.
    fn admit(&self, req: &RequestView<'_>, edits: &mut Edits) -> Result<(), LocalAnswer> {
        if let Some(answer) = self.redirect.as_ref().and_then(|r| r.on_request(req)) {
            return Err(answer);
        }
        if let Some(answer) = self.cors.as_ref().and_then(|c| c.on_request(req, edits)) {
            return Err(answer);
        }
        if self.ip.as_ref().is_some_and(|ip| !ip.admits(req.client)) {
            count(&self.refusals.ip);
            return Err(refuse(403));
        }
        if let Some(auth) = &self.auth {
            let passed = auth
                .check(req, edits)
                .inspect_err(|_| count(&self.refusals.auth))?;
            if !self.consumers.is_empty()
                && !passed.consumer.is_some_and(|c| self.consumers.contains(&c))
            {
                count(&self.refusals.consumers);
                return Err(refuse(403));
            }
        }
        Ok(())
    }

    /// The decisions after rate limits: the body limit, then what goes to the Pod (header rules,
    /// the path).
    fn shape(&self, req: &RequestView<'_>, edits: &mut Edits) -> Result<(), LocalAnswer> {
        if let Some(max) = self.max_body {
            if req.content_length.is_some_and(|l| l > max) {
                count(&self.refusals.max_body);
                return Err(refuse(413));
            }
            edits.max_body = Some(max);
        }
        edits
            .remove
            .extend(self.request_headers.remove.iter().cloned());
        edits.add.extend(self.request_headers.add.iter().cloned());
        edits
            .response_remove
            .extend(self.response_headers.remove.iter().cloned());
        edits
            .response_add
            .extend(self.response_headers.add.iter().cloned());
        let strip = self.auth.as_ref().map_or(&[][..], |a| a.query_keys());
        let new_query = match (req.query(), strip) {
            (Some(q), [_, ..])
                if strip
                    .iter()
                    .any(|k| api_key::from_query(Some(q), k) != api_key::Presented::Absent) =>
            {
                let mut rest = Some(q.to_string());
                for k in strip {
                    rest = rest.and_then(|r| api_key::query_without(&r, k));
                }
                Some(rest)
            }
            _ => None,
        };
        edits.path = self.path.upstream(
            req.path(),
            req.query(),
            new_query.as_ref().map(|q| q.as_deref()),
        );
        Ok(())
    }

    /// Policies that decide as `policy` says: for the pipeline's tests of the hook (the answer
    /// rendered on every client protocol, the edits on every Pod protocol, `max_body`).
    #[cfg(test)]
    pub fn for_test(policy: TestPolicy) -> Self {
        Policies {
            test: Some(policy),
            ..Policies::default()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fields_read_the_same_from_lines_and_from_a_map() {
        let raw = b"X-Api-Key: a\r\nx-api-key: b\r\nHost: h\r\n";
        let ranges = [(0..9, 11..12), (14..23, 25..26), (28..32, 34..35)];
        let mut map = http::HeaderMap::new();
        map.append("x-api-key", HeaderValue::from_static("a"));
        map.append("x-api-key", HeaderValue::from_static("b"));
        map.append("host", HeaderValue::from_static("h"));
        for fields in [
            Fields::Lines {
                raw,
                ranges: &ranges,
            },
            Fields::Map(&map),
        ] {
            let view = RequestView {
                method: &Method::GET,
                host: "h",
                path_and_query: "/a/b?x=1",
                fields,
                peer: None,
                client: None,
                tls: false,
                grpc: false,
                content_length: None,
            };
            let keys: Vec<&[u8]> = view.header_values("X-API-KEY").collect();
            assert_eq!(keys, [&b"a"[..], b"b"]);
            assert_eq!(view.header("host"), Some(&b"h"[..]));
            assert_eq!(view.header("cookie"), None);
            assert_eq!((view.path(), view.query()), ("/a/b", Some("x=1")));
        }
    }
}
