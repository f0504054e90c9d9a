//! Validation of what route policies use: `consumers`, `jwt_providers`,
//! `server.trusted_proxies` and each route's `policies:`. Every mistake is reported with its
//! line and field path, and the files policies read (key files, JWKS, secrets) are read once
//! here, so a file podgate could not use fails the check, not the first request.

use super::limits::RateLimitStoreConf;
use super::model::*;
use super::report::{child, line, Report};
use super::request_rules::{redirect, rewrite};
use super::schema;
use super::yaml::{List, Pairs, Sect, Val};
use http::{HeaderName, HeaderValue, Method};
use ipnet::IpNet;
use std::sync::Arc;

/// Fields podgate itself decides toward the Pod: a rule may not set, add or remove them.
pub(super) const REQUEST_OWN: &[&str] = &[
    "host",
    "content-length",
    "transfer-encoding",
    "connection",
    "keep-alive",
    "proxy-connection",
    "te",
    "trailer",
    "upgrade",
    "x-forwarded-for",
    "x-forwarded-proto",
    "x-forwarded-host",
    "x-request-id",
];

/// Framing and hop-by-hop fields of an answer, which podgate writes itself.
const RESPONSE_OWN: &[&str] = &[
    "content-length",
    "transfer-encoding",
    "connection",
    "keep-alive",
    "proxy-connection",
    "te",
    "trailer",
    "upgrade",
];

/// CORS methods when neither `cors.methods` nor the route's `methods` say.
const CORS_METHODS: [Method; 6] = [
    Method::GET,
    Method::HEAD,
    Method::POST,
    Method::PUT,
    Method::PATCH,
    Method::DELETE,
];

/// A CIDR range (`10.0.0.0/8`) or one address (`192.0.2.7`).
pub fn cidr(s: &str) -> Result<IpNet, String> {
    let s = s.trim();
    if let Ok(ip) = s.parse::<std::net::IpAddr>() {
        return Ok(IpNet::from(ip));
    }
    let net: IpNet = s.parse().map_err(|_| {
        format!("`{s}` is not an address or CIDR range (e.g. 10.0.0.0/8, 2001:db8::/32, 192.0.2.7)")
    })?;
    if net.addr() != net.network() {
        return Err(format!(
            "`{s}` has bits set past its /{}: write {}",
            net.prefix_len(),
            net.trunc()
        ));
    }
    Ok(net)
}

/// A list of [`cidr`]s.
pub fn cidrs(r: &mut Report, list: Option<&List<Val<String>>>, path: &str) -> Vec<IpNet> {
    let mut out = Vec::new();
    for (p, v) in list.map(|l| r.list(l, path)).unwrap_or_default() {
        if let Some(s) = r.val(v, &p) {
            match cidr(s) {
                Ok(net) => out.push(net),
                Err(message) => r.error(Some(v.line), &p, message),
            }
        }
    }
    out
}

/// A header name of a rule: lower-cased, valid, not one of `own`.
pub(super) fn header_name(
    r: &mut Report,
    at: usize,
    path: &str,
    name: &str,
    own: &[&str],
) -> Option<HeaderName> {
    let lower = name.to_ascii_lowercase();
    if lower.starts_with(':') {
        r.error(
            Some(at),
            path,
            format!("`{name}` is a pseudo-header; only the protocol sets those"),
        );
        return None;
    }
    if own.contains(&lower.as_str()) {
        let message = format!(
            "`{name}` is a field podgate decides itself (framing, hop-by-hop, Host, \
             X-Forwarded-*, X-Request-Id); a rule may not change it"
        );
        r.error(Some(at), path, message);
        return None;
    }
    match HeaderName::from_bytes(lower.as_bytes()) {
        Ok(h) => Some(h),
        Err(_) => {
            r.error(
                Some(at),
                path,
                format!("`{name}` is not a header field name"),
            );
            None
        }
    }
}

fn header_names(
    r: &mut Report,
    list: Option<&List<Val<String>>>,
    path: &str,
    own: &[&str],
) -> Vec<HeaderName> {
    let mut out = Vec::new();
    for (p, v) in list.map(|l| r.list(l, path)).unwrap_or_default() {
        if let Some(name) = r.val(v, &p) {
            out.extend(header_name(r, v.line, &p, name, own));
        }
    }
    out
}

fn header_pairs(
    r: &mut Report,
    pairs: Option<&Pairs>,
    path: &str,
    own: &[&str],
) -> Vec<(HeaderName, HeaderValue)> {
    let mut out = Vec::new();
    let Some(pairs) = pairs else { return out };
    for (l, name, value) in r.pairs(pairs, path) {
        let field = child(path, &name);
        let Some(h) = header_name(r, l, &field, &name, own) else {
            continue;
        };
        match HeaderValue::from_str(&value) {
            Ok(v) => out.push((h, v)),
            Err(_) => r.error(
                Some(l),
                &field,
                "the value must be visible ASCII, spaces or tabs (no line breaks)",
            ),
        }
    }
    out
}

fn header_rules(
    r: &mut Report,
    s: Option<&Sect<schema::HeaderRules>>,
    path: &str,
    own: &[&str],
) -> HeaderRulesConf {
    let Some(h) = s.and_then(|s| r.sect(s, path)) else {
        return HeaderRulesConf::default();
    };
    let rules = HeaderRulesConf {
        set: header_pairs(r, h.set.as_ref(), &child(path, "set"), own),
        add: header_pairs(r, h.add.as_ref(), &child(path, "add"), own),
        remove: header_names(r, h.remove.as_ref(), &child(path, "remove"), own),
    };
    for name in &rules.remove {
        if rules.set.iter().chain(&rules.add).any(|(n, _)| n == name) {
            let at = h.remove.as_ref().map(|l| l.line);
            let message = format!("`{name}` is both removed and set or added");
            r.error(at, &child(path, "remove"), message);
        }
    }
    rules
}

/// What the route policies need to know of the rest of the file.
pub struct Known<'a> {
    pub consumers: &'a [ConsumerConf],
    pub providers: &'a [Arc<JwtProviderConf>],
    /// `rate_limit_stores`, which `rate_limit` rules name.
    pub rate_limit_stores: &'a [Arc<RateLimitStoreConf>],
}

/// What the policies need to know of their route.
pub struct RouteBits<'a> {
    pub strip_prefix: bool,
    pub strip_line: Option<usize>,
    pub methods: &'a [Method],
}

pub fn route_policies(
    r: &mut Report,
    s: Option<&Sect<schema::RoutePolicies>>,
    path: &str,
    known: &Known,
    route: &RouteBits,
) -> RoutePolicyConf {
    let path = child(path, "policies");
    let Some(p) = s.and_then(|s| r.sect(s, &path)) else {
        return RoutePolicyConf::default();
    };
    let auth = p
        .auth
        .as_ref()
        .and_then(|a| auth(r, a, &child(&path, "auth"), known, true));
    let mut consumers = Vec::new();
    if let Some(list) = &p.consumers {
        let at = child(&path, "consumers");
        for (cp, v) in r.list(list, &at) {
            let Some(name) = r.val(v, &cp) else { continue };
            match known.consumers.iter().find(|c| *c.name == **name) {
                Some(c) => consumers.push(c.name.clone()),
                None => {
                    let message = format!("unknown consumer `{name}`");
                    r.error(Some(v.line), &cp, message);
                }
            }
        }
        let names_consumers = auth.as_ref().is_some_and(|a| {
            a.methods.iter().any(|m| match m {
                AuthMethod::ApiKey(_) => true,
                AuthMethod::Jwt(p) => known
                    .providers
                    .iter()
                    .any(|x| x.name == *p && x.consumer_claim.is_some()),
            })
        });
        if !names_consumers {
            r.error(
                Some(list.line),
                &at,
                "needs an auth that names consumers: api_key, or jwt with a provider that has \
                 consumer_claim",
            );
        }
    }
    let cors = p
        .cors
        .as_ref()
        .and_then(|c| cors(r, c, &child(&path, "cors"), route));
    let rewrite = p
        .rewrite
        .as_ref()
        .and_then(|w| rewrite(r, w, &child(&path, "rewrite")));
    if rewrite.is_some() && route.strip_prefix {
        r.error(
            route.strip_line,
            &child(&path, "rewrite"),
            "rewrite decides the whole path toward the Pod: give rewrite or strip_prefix, not both",
        );
    }
    RoutePolicyConf {
        auth,
        consumers,
        ip_allow: cidrs(r, p.ip_allow.as_ref(), &child(&path, "ip_allow")),
        ip_deny: cidrs(r, p.ip_deny.as_ref(), &child(&path, "ip_deny")),
        cors,
        rate_limit: p.rate_limit.as_ref().map_or_else(Vec::new, |list| {
            let at = child(&path, "rate_limit");
            super::rate_limit::rules(r, list, &at, known.rate_limit_stores)
        }),
        request_headers: header_rules(
            r,
            p.request_headers.as_ref(),
            &child(&path, "request_headers"),
            REQUEST_OWN,
        ),
        response_headers: header_rules(
            r,
            p.response_headers.as_ref(),
            &child(&path, "response_headers"),
            RESPONSE_OWN,
        ),
        rewrite,
        redirect: p
            .redirect
            .as_ref()
            .and_then(|d| redirect(r, d, &child(&path, "redirect"))),
        max_body: r
            .opt(&p.max_body, &child(&path, "max_body"))
            .map(|s| s.0 as u64),
    }
}

/// `auth:` (`top`) or one entry of its `any_of`.
fn auth(
    r: &mut Report,
    s: &Sect<schema::Auth>,
    path: &str,
    known: &Known,
    top: bool,
) -> Option<AuthConf> {
    let a = r.sect(s, path)?;
    let given: Vec<&str> = [
        ("api_key", a.api_key.is_some()),
        ("jwt", a.jwt.is_some()),
        ("any_of", a.any_of.is_some()),
    ]
    .iter()
    .filter(|k| k.1)
    .map(|k| k.0)
    .collect();
    if given.len() != 1 || (!top && given == ["any_of"]) {
        let choices = if top {
            "api_key, jwt or any_of"
        } else {
            "api_key or jwt"
        };
        let found = if given.is_empty() {
            "none".to_string()
        } else {
            given.join(" and ")
        };
        r.error(
            Some(s.line),
            path,
            format!("give exactly one of {choices} (found {found})"),
        );
        return None;
    }
    if !top {
        for (key, given) in [
            ("forward", a.forward.is_some()),
            ("consumer_header", a.consumer_header.is_some()),
        ] {
            if given {
                let message = format!("{key} applies to the whole auth: put it next to any_of");
                r.error(Some(s.line), &child(path, key), message);
            }
        }
    }
    let mut methods = Vec::new();
    if let Some(k) = &a.api_key {
        methods.extend(api_key(r, k, &child(path, "api_key"), known));
    }
    if let Some(v) = &a.jwt {
        let at = child(path, "jwt");
        if let Some(name) = r.val(v, &at) {
            match known.providers.iter().find(|p| *p.name == **name) {
                Some(p) => methods.push(AuthMethod::Jwt(p.name.clone())),
                None => {
                    let names: Vec<&str> = known.providers.iter().map(|p| &*p.name).collect();
                    let listed = if names.is_empty() {
                        "none".to_string()
                    } else {
                        names.join(", ")
                    };
                    let message =
                        format!("unknown jwt provider `{name}` (jwt_providers: {listed})");
                    r.error(Some(v.line), &at, message);
                }
            }
        }
    }
    if let Some(list) = &a.any_of {
        let at = child(path, "any_of");
        let items = r.list(list, &at);
        if items.is_empty() && list.items.is_ok() {
            r.error(Some(list.line), &at, "needs at least one entry");
        }
        for (ip, item) in items {
            if let Some(inner) = auth(r, item, &ip, known, false) {
                methods.extend(inner.methods);
            }
        }
    }
    let forward = *r.opt(&a.forward, &child(path, "forward")).unwrap_or(&false);
    let consumer_header = match r.opt(&a.consumer_header, &child(path, "consumer_header")) {
        Some(h) => header_name(
            r,
            a.consumer_header.as_ref().map_or(s.line, |v| v.line),
            &child(path, "consumer_header"),
            h,
            REQUEST_OWN,
        )?,
        None => HeaderName::from_static(DEFAULT_CONSUMER_HEADER),
    };
    if methods.is_empty() {
        return None;
    }
    Some(AuthConf {
        methods,
        forward,
        consumer_header,
    })
}

fn api_key(
    r: &mut Report,
    s: &Sect<schema::ApiKey>,
    path: &str,
    known: &Known,
) -> Option<AuthMethod> {
    let k = r.sect(s, path)?;
    if !known.consumers.iter().any(|c| c.api_keys_file.is_some()) {
        r.error(
            Some(s.line),
            path,
            "no consumer has an api_keys_file: add one under `consumers:`",
        );
    }
    match (&k.header, &k.query) {
        (Some(_), Some(_)) => {
            r.error(Some(s.line), path, "give header or query, not both");
            None
        }
        (None, Some(q)) => {
            let at = child(path, "query");
            let name = r.val(q, &at)?;
            let ok = !name.is_empty()
                && name
                    .bytes()
                    .all(|b| b.is_ascii_graphic() && !b"&=#%+".contains(&b));
            if !ok {
                let message = format!("`{name}` is not a query parameter name");
                r.error(Some(q.line), &at, message);
                return None;
            }
            Some(AuthMethod::ApiKey(KeySource::Query(name.clone())))
        }
        (Some(h), None) => {
            let at = child(path, "header");
            let name = r.val(h, &at)?;
            header_name(r, h.line, &at, name, REQUEST_OWN)
                .map(|h| AuthMethod::ApiKey(KeySource::Header(h)))
        }
        (None, None) => Some(AuthMethod::ApiKey(KeySource::Header(
            HeaderName::from_static(DEFAULT_API_KEY_HEADER),
        ))),
    }
}

/// A CORS origin as allowed by the config: `*`, `scheme://host[:port]` or
/// `scheme://*.domain[:port]`, normalised (lower case, default port dropped).
pub fn origin_pattern(s: &str) -> Result<OriginPattern, String> {
    if s == "*" {
        return Ok(OriginPattern::Any);
    }
    let bad = |why: &str| {
        format!("`{s}` is not an origin ({why}); write e.g. https://shop.example.com or https://*.example.com")
    };
    let lower = s.to_ascii_lowercase();
    let (scheme, rest) = lower.split_once("://").ok_or_else(|| bad("no scheme"))?;
    if scheme.is_empty()
        || !scheme
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"+-.".contains(&b))
    {
        return Err(bad("the scheme"));
    }
    if rest.contains(['/', '?', '#', '@']) {
        return Err(bad("an origin has no path, query or user"));
    }
    let (host, port) = match rest.rsplit_once(':') {
        Some((h, p)) if !h.ends_with(']') || rest.starts_with('[') => {
            let port: u16 = p.parse().map_err(|_| bad("the port"))?;
            (h, Some(port))
        }
        _ => (rest, None),
    };
    let default = match scheme {
        "https" => Some(443),
        "http" => Some(80),
        _ => None,
    };
    let port = port.filter(|p| Some(*p) != default);
    let (wild, name) = match host.strip_prefix("*.") {
        Some(n) => (true, n),
        None => (false, host),
    };
    let is_ip6 = name.starts_with('[') && name.ends_with(']');
    if name.is_empty()
        || name.contains('*')
        || !(is_ip6
            || name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"-.".contains(&b)))
    {
        return Err(bad("the host"));
    }
    let port = port.map(|p| format!(":{p}")).unwrap_or_default();
    Ok(match wild {
        true => OriginPattern::Subdomains {
            scheme: scheme.to_string(),
            suffix: format!(".{name}{port}"),
        },
        false => OriginPattern::Exact(format!("{scheme}://{name}{port}")),
    })
}

fn cors(r: &mut Report, s: &Sect<schema::Cors>, path: &str, route: &RouteBits) -> Option<CorsConf> {
    let c = r.sect(s, path)?;
    let mut origins = Vec::new();
    let at = child(path, "origins");
    match &c.origins {
        None => r.error(Some(s.line), &at, "is required: the origins that may call"),
        Some(list) => {
            for (op, v) in r.list(list, &at) {
                if let Some(o) = r.val(v, &op) {
                    match origin_pattern(o) {
                        Ok(o) => origins.push(o),
                        Err(message) => r.error(Some(v.line), &op, message),
                    }
                }
            }
            if origins.is_empty() && list.items.as_ref().is_ok_and(|i| i.is_empty()) {
                r.error(Some(list.line), &at, "needs at least one origin");
            }
        }
    }
    let mut methods = Vec::new();
    if let Some(list) = &c.methods {
        for (mp, v) in r.list(list, &child(path, "methods")) {
            methods.extend(r.val(v, &mp).cloned());
        }
    } else if !route.methods.is_empty() {
        methods = route.methods.to_vec();
    } else {
        methods = CORS_METHODS.to_vec();
    }
    let credentials = *r
        .opt(&c.credentials, &child(path, "credentials"))
        .unwrap_or(&false);
    if credentials && origins.contains(&OriginPattern::Any) {
        r.error(
            line(&c.credentials),
            &child(path, "credentials"),
            "browsers refuse credentials with the origin `*`: list the origins",
        );
    }
    let cors = CorsConf {
        origins,
        methods,
        headers: header_names(r, c.headers.as_ref(), &child(path, "headers"), &[]),
        expose_headers: header_names(
            r,
            c.expose_headers.as_ref(),
            &child(path, "expose_headers"),
            &[],
        ),
        max_age: r.opt(&c.max_age, &child(path, "max_age")).copied(),
        credentials,
    };
    Some(cors)
}
