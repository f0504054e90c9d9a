//! Route matching: host, then longest path prefix, then method.
//!
//! Hosts are tried from most to least specific: the exact host, then wildcards (`*.example.com`,
//! longest suffix first), then routes without `hosts`. Within each, the longest `path_prefix`
//! wins; a route whose path fits but whose methods do not lets the next candidate try. When a path
//! fits somewhere but no method does, the answer is 405 with the methods that would have worked.
//!
//! Prefixes match whole path segments: `/httpbin` matches `/httpbin`, `/httpbin/` and
//! `/httpbin/get` but not `/httpbinx` (a prefix ending in `/` matches anything below it). This is
//! what users of APISIX's `/httpbin/*` and Envoy's path_separated_prefix expect, and it keeps one
//! API from swallowing another's neighbour.

use http::Method;
use std::collections::HashMap;
use std::sync::Arc;

/// A route as the proxy uses it.
#[derive(Debug)]
pub struct Route<U> {
    pub name: String,
    pub path_prefix: String,
    pub methods: Vec<Method>,
    pub strip_prefix: bool,
    /// The route's policies answer CORS preflights: `OPTIONS` reaches it whatever `methods`
    /// say (the pipeline refuses an `OPTIONS` that is not a preflight with 405 then).
    pub answers_preflights: bool,
    pub upstream: U,
}

impl<U> Route<U> {
    fn allows(&self, m: &Method) -> bool {
        self.lists(m) || (self.answers_preflights && *m == Method::OPTIONS)
    }

    /// `methods` (none: every method) has `m`.
    pub fn lists(&self, m: &Method) -> bool {
        self.methods.is_empty() || self.methods.contains(m)
    }

    /// The path to send upstream: without the prefix when `strip_prefix` is set (always starting
    /// with `/`, the query kept).
    pub fn upstream_path<'a>(&self, path_and_query: &'a str) -> std::borrow::Cow<'a, str> {
        if !self.strip_prefix || self.path_prefix == "/" {
            return path_and_query.into();
        }
        let prefix = self.path_prefix.trim_end_matches('/');
        let rest = &path_and_query[prefix.len().min(path_and_query.len())..];
        if rest.starts_with('/') {
            rest.into()
        } else {
            format!("/{rest}").into()
        }
    }
}

/// What a request found.
#[derive(Debug)]
pub enum Match<'r, U> {
    Found(&'r Arc<Route<U>>),
    /// No route has this host and path.
    NotFound,
    /// Some route has this path, none this method; carries the methods that would work.
    MethodNotAllowed(Vec<Method>),
}

impl<U> Match<'_, U> {
    pub fn is_found(&self) -> bool {
        matches!(self, Match::Found(_))
    }
}

/// Routes indexed for matching; immutable once built (a new config builds a new router).
#[derive(Debug)]
pub struct Router<U> {
    exact: HashMap<String, Vec<Arc<Route<U>>>>,
    /// (suffix including the dot, e.g. `.example.com`, routes), longest suffix first.
    wildcard: Vec<(String, Vec<Arc<Route<U>>>)>,
    any_host: Vec<Arc<Route<U>>>,
}

impl<U> Router<U> {
    /// `routes` pairs each route with its hosts (empty: any host). Hosts are lower-case.
    pub fn new(routes: Vec<(Vec<String>, Route<U>)>) -> Self {
        let mut exact: HashMap<String, Vec<Arc<Route<U>>>> = HashMap::new();
        let mut wildcard: HashMap<String, Vec<Arc<Route<U>>>> = HashMap::new();
        let mut any_host = Vec::new();
        for (hosts, route) in routes {
            let route = Arc::new(route);
            if hosts.is_empty() {
                any_host.push(route.clone());
            }
            for h in hosts {
                match h.strip_prefix('*') {
                    Some(suffix) => wildcard.entry(suffix.to_string()).or_default(),
                    None => exact.entry(h).or_default(),
                }
                .push(route.clone());
            }
        }
        // Longest prefix first; the sort is stable, so equal lengths keep config order.
        let by_prefix =
            |v: &mut Vec<Arc<Route<U>>>| v.sort_by_key(|r| std::cmp::Reverse(r.path_prefix.len()));
        exact.values_mut().for_each(by_prefix);
        by_prefix(&mut any_host);
        let mut wildcard: Vec<_> = wildcard.into_iter().collect();
        wildcard.iter_mut().for_each(|(_, v)| by_prefix(v));
        wildcard.sort_by(|a, b| b.0.len().cmp(&a.0.len()).then(a.0.cmp(&b.0)));
        Router {
            exact,
            wildcard,
            any_host,
        }
    }

    /// Finds the route for `host` (lower-case, without port), `path` (without query) and `method`.
    pub fn find(&self, host: &str, path: &str, method: &Method) -> Match<'_, U> {
        let exact = self.exact.get(host).map(Vec::as_slice).unwrap_or(&[]);
        let wild = self
            .wildcard
            .iter()
            .filter(|(suffix, _)| host.len() > suffix.len() && host.ends_with(suffix.as_str()))
            .map(|(_, v)| v.as_slice());
        let mut allowed: Vec<Method> = Vec::new();
        let mut path_fits = false;
        for group in std::iter::once(exact)
            .chain(wild)
            .chain(std::iter::once(self.any_host.as_slice()))
        {
            for route in group {
                if !prefix_matches(&route.path_prefix, path) {
                    continue;
                }
                if route.allows(method) {
                    return Match::Found(route);
                }
                path_fits = true;
                for m in &route.methods {
                    if !allowed.contains(m) {
                        allowed.push(m.clone());
                    }
                }
            }
        }
        if path_fits {
            Match::MethodNotAllowed(allowed)
        } else {
            Match::NotFound
        }
    }
}

fn prefix_matches(prefix: &str, path: &str) -> bool {
    if !path.starts_with(prefix) {
        return false;
    }
    prefix.ends_with('/') || path.len() == prefix.len() || path.as_bytes()[prefix.len()] == b'/'
}

/// The host a request is for: lower-case, port removed (IPv6 literals keep their brackets).
/// Borrowed when it is lower-case already (most clients send it so): no allocation then.
///
/// Walked as bytes: the `str` methods (`trim`, `rsplit_once`, `trim_end_matches`) decode
/// characters and cost ~250 instructions per request (callgrind, issue 25); a value that is
/// not ASCII takes them, for the same result.
pub fn normalize_host(raw: &str) -> std::borrow::Cow<'_, str> {
    if !raw.is_ascii() {
        let raw = raw.trim();
        let host = if raw.starts_with('[') {
            raw.split_inclusive(']').next().unwrap_or(raw)
        } else {
            raw.rsplit_once(':').map_or(raw, |(h, _)| h)
        };
        return lower(host.trim_end_matches('.'));
    }
    // What `char::is_whitespace` (and so `str::trim`) takes among ASCII bytes.
    let space = |b: &u8| matches!(b, b'\t' | b'\n' | b'\x0b' | b'\x0c' | b'\r' | b' ');
    let b = raw.as_bytes();
    let start = b.iter().position(|c| !space(c)).unwrap_or(b.len());
    let end = b.iter().rposition(|c| !space(c)).map_or(start, |i| i + 1);
    let b = &b[start..end];
    let mut end = if b.first() == Some(&b'[') {
        b.iter().position(|&c| c == b']').map_or(b.len(), |i| i + 1)
    } else {
        b.iter().rposition(|&c| c == b':').unwrap_or(b.len())
    };
    while end > 0 && b[end - 1] == b'.' {
        end -= 1;
    }
    // ASCII throughout: every index is a character boundary.
    lower(&raw[start..start + end])
}

fn lower(host: &str) -> std::borrow::Cow<'_, str> {
    if host.bytes().any(|b| b.is_ascii_uppercase()) {
        host.to_ascii_lowercase().into()
    } else {
        host.into()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn route(name: &str, prefix: &str, methods: &[&str]) -> Route<&'static str> {
        Route {
            name: name.into(),
            path_prefix: prefix.into(),
            methods: methods
                .iter()
                .map(|m| Method::from_bytes(m.as_bytes()).unwrap())
                .collect(),
            strip_prefix: true,
            answers_preflights: false,
            upstream: "u",
        }
    }

    fn name<U>(m: Match<'_, U>) -> String {
        match m {
            Match::Found(r) => r.name.clone(),
            Match::NotFound => "404".into(),
            Match::MethodNotAllowed(ms) => format!("405 {ms:?}"),
        }
    }

    #[test]
    fn a_route_that_answers_preflights_takes_options_whatever_its_methods() {
        let h = Vec::<String>::new;
        let mut cors = route("cors", "/api", &["GET"]);
        cors.answers_preflights = true;
        let r = Router::new(vec![(h(), cors), (h(), route("plain", "/other", &["GET"]))]);
        assert_eq!(name(r.find("h", "/api/x", &Method::OPTIONS)), "cors");
        assert_eq!(name(r.find("h", "/api/x", &Method::POST)), "405 [GET]");
        assert_eq!(name(r.find("h", "/other", &Method::OPTIONS)), "405 [GET]");
    }

    #[test]
    fn matching_table() {
        let h = |s: &[&str]| s.iter().map(|x| x.to_string()).collect::<Vec<_>>();
        let r = Router::new(vec![
            (h(&[]), route("root", "/", &[])),
            (h(&[]), route("api", "/api", &["GET"])),
            (h(&[]), route("api-v2", "/api/v2", &[])),
            (h(&["a.example.com"]), route("a-api", "/api", &["POST"])),
            (h(&["*.example.com"]), route("wild", "/w", &[])),
            (h(&["*.b.example.com"]), route("wild-b", "/w", &[])),
            (h(&["only.example.com"]), route("only", "/only", &["GET"])),
        ]);
        let get = Method::GET;
        let post = Method::POST;
        let cases = [
            ("x.org", "/", &get, "root"),
            ("x.org", "/api", &get, "api"),
            ("x.org", "/api/users", &get, "api"),
            ("x.org", "/apix", &get, "root"),
            ("x.org", "/api/v2/x", &post, "api-v2"),
            ("x.org", "/api", &post, "root"),
            ("a.example.com", "/api", &post, "a-api"),
            ("a.example.com", "/api", &get, "api"),
            ("z.example.com", "/w/1", &get, "wild"),
            ("z.b.example.com", "/w/1", &get, "wild-b"),
            ("example.com", "/w/1", &get, "root"),
            ("only.example.com", "/only", &get, "only"),
        ];
        for (host, path, m, want) in cases {
            assert_eq!(name(r.find(host, path, m)), want, "{host} {m} {path}");
        }
        let strict = Router::new(vec![(h(&[]), route("only", "/only", &["GET", "HEAD"]))]);
        assert_eq!(name(strict.find("x", "/", &get)), "404");
        assert_eq!(name(strict.find("x", "/only/x", &post)), "405 [GET, HEAD]");
    }

    #[test]
    fn strip_prefix_keeps_query() {
        let r = route("r", "/httpbin", &[]);
        assert_eq!(r.upstream_path("/httpbin/get?a=1"), "/get?a=1");
        assert_eq!(r.upstream_path("/httpbin"), "/");
        assert_eq!(r.upstream_path("/httpbin?a=1"), "/?a=1");
        let slash = route("r", "/httpbin/", &[]);
        assert_eq!(slash.upstream_path("/httpbin/get"), "/get");
    }

    #[test]
    fn hosts_are_normalized() {
        assert_eq!(normalize_host("API.Example.com:8080"), "api.example.com");
        assert_eq!(normalize_host("[::1]:80"), "[::1]");
        assert_eq!(normalize_host("example.com."), "example.com");
        assert_eq!(normalize_host(" \x0bExample.COM.:\t"), "example.com");
        assert_eq!(normalize_host("[::1"), "[::1");
        assert_eq!(normalize_host("..:"), "");
    }

    /// The byte walk gives what the `str` methods it replaced give, on any text (hosts come
    /// from clients: `Host`, an absolute target, h2's `:authority`).
    fn by_str_methods(raw: &str) -> String {
        let raw = raw.trim();
        let host = if raw.starts_with('[') {
            raw.split_inclusive(']').next().unwrap_or(raw)
        } else {
            raw.rsplit_once(':').map_or(raw, |(h, _)| h)
        };
        host.trim_end_matches('.').to_ascii_lowercase()
    }

    proptest::proptest! {
        #[test]
        fn host_normalization_matches_the_str_methods(
            raw in "[ \t\x0b\x0c\r\n\x00-\x1fA-Za-z0-9.:\\[\\]\u{a0}\u{3000}é-]{0,24}"
        ) {
            proptest::prop_assert_eq!(normalize_host(&raw), by_str_methods(&raw));
        }
    }
}
