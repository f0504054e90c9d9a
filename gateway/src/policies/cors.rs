//! CORS (the Fetch standard's protocol): preflights answered by podgate, the allow fields put on
//! actual answers.
//!
//! A preflight (`OPTIONS` with `Origin` and `Access-Control-Request-Method`) is answered 204
//! before any other policy: browsers send it without credentials. An allowed origin gets
//! `Access-Control-Allow-Origin` (the origin itself, or `*` for `origins: ["*"]` without
//! credentials), `-Allow-Methods`, `-Allow-Headers`, `-Max-Age` and `-Allow-Credentials` as
//! configured; a disallowed one gets no CORS field at all, so the browser stops there. Every
//! answer that depends on the origin says `Vary: Origin`. On a CORS route the Pod's own
//! `Access-Control-*` answer fields are dropped: podgate's decision is the only one.

use super::{AnswerBody, Edits, LocalAnswer, RequestView};
use crate::config::{CorsConf, OriginPattern};
use http::header::{
    ACCESS_CONTROL_ALLOW_CREDENTIALS, ACCESS_CONTROL_ALLOW_HEADERS, ACCESS_CONTROL_ALLOW_METHODS,
    ACCESS_CONTROL_ALLOW_ORIGIN, ACCESS_CONTROL_EXPOSE_HEADERS, ACCESS_CONTROL_MAX_AGE, VARY,
};
use http::{HeaderName, HeaderValue, Method};

#[derive(Debug)]
pub struct Cors {
    origins: Vec<OriginPattern>,
    credentials: bool,
    methods: HeaderValue,
    headers: Option<HeaderValue>,
    expose: Option<HeaderValue>,
    max_age: Option<HeaderValue>,
}

fn joined<T: AsRef<str>>(items: &[T]) -> Option<HeaderValue> {
    let text = items
        .iter()
        .map(AsRef::as_ref)
        .collect::<Vec<_>>()
        .join(", ");
    (!text.is_empty())
        .then(|| HeaderValue::from_str(&text).ok())
        .flatten()
}

const POD_FIELDS: [HeaderName; 6] = [
    ACCESS_CONTROL_ALLOW_ORIGIN,
    ACCESS_CONTROL_ALLOW_CREDENTIALS,
    ACCESS_CONTROL_ALLOW_METHODS,
    ACCESS_CONTROL_ALLOW_HEADERS,
    ACCESS_CONTROL_EXPOSE_HEADERS,
    ACCESS_CONTROL_MAX_AGE,
];

/// An origin as browsers send it, normalised like the config's: lower case, without the
/// scheme's default port. `None` for `null` or anything that is not `scheme://host[:port]`.
pub fn normalize(origin: &[u8]) -> Option<String> {
    let s = std::str::from_utf8(origin)
        .ok()?
        .trim()
        .to_ascii_lowercase();
    let (scheme, rest) = s.split_once("://")?;
    let scheme_ok = !scheme.is_empty()
        && scheme
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"+-.".contains(&b));
    let rest_ok = !rest.is_empty()
        && rest
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-.:[]".contains(&b));
    if !scheme_ok || !rest_ok {
        return None;
    }
    let default = match scheme {
        "https" => ":443",
        "http" => ":80",
        _ => "",
    };
    let rest = match rest.strip_suffix(default) {
        Some(r) if !default.is_empty() => r,
        _ => rest,
    };
    if rest.is_empty() || rest.starts_with(':') {
        return None;
    }
    Some(format!("{scheme}://{rest}"))
}

/// Whether the (normalised) `origin` is one `patterns` allow.
pub fn allowed(patterns: &[OriginPattern], origin: Option<&str>) -> bool {
    patterns.iter().any(|p| match (p, origin) {
        (OriginPattern::Any, _) => true,
        (_, None) => false,
        (OriginPattern::Exact(o), Some(got)) => o == got,
        (OriginPattern::Subdomains { scheme, suffix }, Some(got)) => got
            .strip_prefix(scheme.as_str())
            .and_then(|r| r.strip_prefix("://"))
            .and_then(|host| host.strip_suffix(suffix.as_str()))
            .is_some_and(|sub| !sub.is_empty() && !sub.contains(':') && !sub.ends_with('.')),
    })
}

impl Cors {
    pub fn new(conf: &CorsConf) -> Cors {
        let methods: Vec<&str> = conf.methods.iter().map(Method::as_str).collect();
        Cors {
            origins: conf.origins.clone(),
            credentials: conf.credentials,
            methods: joined(&methods).unwrap_or(HeaderValue::from_static("GET")),
            headers: joined(&conf.headers),
            expose: joined(&conf.expose_headers),
            max_age: conf.max_age.map(|d| HeaderValue::from(d.as_secs())),
        }
    }

    /// The value of `Access-Control-Allow-Origin` for this request, if its origin is allowed.
    fn allow_origin(&self, origin: &[u8]) -> Option<HeaderValue> {
        if self.origins == [OriginPattern::Any] && !self.credentials {
            return Some(HeaderValue::from_static("*"));
        }
        let normal = normalize(origin);
        allowed(&self.origins, normal.as_deref())
            .then(|| HeaderValue::from_bytes(origin.trim_ascii()).ok())
            .flatten()
    }

    /// A preflight's answer, or (for any other request) the CORS fields of its answer put in
    /// `edits`.
    pub fn on_request(&self, req: &RequestView<'_>, edits: &mut Edits) -> Option<LocalAnswer> {
        edits.response_remove.extend(POD_FIELDS);
        let mut origins = req.header_values("origin");
        let origin = match (origins.next(), origins.next()) {
            (Some(o), None) => o,
            // No Origin: not a CORS request. Two: ambiguous, so nothing is allowed.
            (None, _) => return None,
            (Some(_), Some(_)) => &b"null"[..],
        };
        let preflight =
            *req.method == Method::OPTIONS && req.header("access-control-request-method").is_some();
        let mut fields = Vec::with_capacity(6);
        if let Some(allow) = self.allow_origin(origin) {
            fields.push((ACCESS_CONTROL_ALLOW_ORIGIN, allow));
            if self.credentials {
                fields.push((
                    ACCESS_CONTROL_ALLOW_CREDENTIALS,
                    HeaderValue::from_static("true"),
                ));
            }
            if preflight {
                fields.push((ACCESS_CONTROL_ALLOW_METHODS, self.methods.clone()));
                if let Some(h) = &self.headers {
                    fields.push((ACCESS_CONTROL_ALLOW_HEADERS, h.clone()));
                }
                if let Some(m) = &self.max_age {
                    fields.push((ACCESS_CONTROL_MAX_AGE, m.clone()));
                }
            } else if let Some(e) = &self.expose {
                fields.push((ACCESS_CONTROL_EXPOSE_HEADERS, e.clone()));
            }
        }
        if self.origins != [OriginPattern::Any] || self.credentials {
            fields.push((VARY, HeaderValue::from_static("Origin")));
        }
        if preflight {
            return Some(LocalAnswer {
                status: 204,
                headers: fields,
                body: AnswerBody::Empty,
            });
        }
        edits.response_add.extend(fields);
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn patterns() -> Vec<OriginPattern> {
        [
            "https://shop.example.com",
            "https://*.example.org",
            "http://localhost:3000",
        ]
        .iter()
        .map(|o| crate::config::origin_pattern(o).unwrap())
        .collect()
    }

    #[test]
    fn origins_match_exactly_or_as_subdomains() {
        let p = patterns();
        let ok = |o: &str| allowed(&p, normalize(o.as_bytes()).as_deref());
        assert!(ok("https://shop.example.com"));
        assert!(ok("HTTPS://Shop.Example.com:443"));
        assert!(ok("https://a.example.org"));
        assert!(ok("https://a.b.example.org"));
        assert!(ok("http://localhost:3000"));
        assert!(!ok("https://example.org"));
        assert!(!ok("https://evil-example.org"));
        assert!(!ok("https://a.example.org:8443"));
        assert!(!ok("http://shop.example.com"));
        assert!(!ok("https://shop.example.com.evil.com"));
        assert!(!ok("http://localhost"));
        assert!(!ok("null"));
        assert!(!ok("https://shop.example.com/path"));
    }

    proptest! {
        /// Any Origin bytes: no panic; a match is always one of the listed forms.
        #[test]
        fn origin_matching_never_panics(origin in proptest::collection::vec(any::<u8>(), 0..60)) {
            let p = patterns();
            let n = normalize(&origin);
            if allowed(&p, n.as_deref()) {
                let n = n.unwrap();
                prop_assert!(n == "https://shop.example.com" || n == "http://localhost:3000"
                    || (n.starts_with("https://") && n.ends_with(".example.org")));
            }
        }

        #[test]
        fn a_listed_origin_matches_in_any_case(host in "[a-z][a-z0-9-]{0,10}") {
            let p = patterns();
            let o = format!("https://{}.EXAMPLE.org", host.to_uppercase());
            prop_assert!(allowed(&p, normalize(o.as_bytes()).as_deref()));
        }
    }
}
