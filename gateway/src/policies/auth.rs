//! `auth`: the credential a route requires — an API key, a JWT, or `any_of` several — and what
//! reaches the Pod afterwards.
//!
//! The methods are tried in order; one that finds no credential of its kind lets the next try,
//! the first that accepts one decides. Refused: 401 with one `WWW-Authenticate` per method
//! (`ApiKey realm="ROUTE", header="x-api-key"`, `Bearer realm="ROUTE"`), and for a credential
//! that was present but wrong, RFC 6750's `error="invalid_token"` (`"invalid_key"` for keys)
//! with a short reason. Neither the answer nor a log ever holds the credential.
//!
//! Toward the Pod: the credentials' fields (and query parameters) are removed unless
//! `auth.forward`; the consumer's name goes in `x-consumer` (`auth.consumer_header`) and the JWT
//! provider's `claims_to_headers`. Those fields are always removed from what the client sent,
//! so a client can never pose as a consumer by sending them itself.

use super::api_key::{self, KeyRing, Presented};
use super::jwt::{bearer, JwtProvider, TokenError};
use super::{AnswerBody, Edits, LocalAnswer, RequestView};
use crate::config::{AuthConf, AuthMethod, KeySource};
use arc_swap::ArcSwap;
use http::header::{AUTHORIZATION, WWW_AUTHENTICATE};
use http::{HeaderName, HeaderValue};
use std::sync::Arc;

#[derive(Debug)]
enum Method {
    ApiKey {
        source: KeySource,
        ring: Arc<ArcSwap<KeyRing>>,
    },
    Jwt(Arc<JwtProvider>),
}

/// What one method made of a request.
enum Tried {
    Missing,
    BadKey,
    BadToken(TokenError),
}

#[derive(Debug)]
pub struct Auth {
    realm: String,
    methods: Vec<Method>,
    consumer_header: HeaderName,
    /// Client fields never passed on (see the module comment).
    remove: Vec<HeaderName>,
    /// Query parameters that carry a key and are not passed on.
    query_keys: Vec<String>,
}

/// Passed: what the request goes on with.
pub struct Passed {
    pub consumer: Option<Arc<str>>,
}

impl Auth {
    /// `None` for a method whose JWT provider `provider` does not know (the config check makes
    /// that impossible; a missing one refuses every request rather than let one through).
    pub fn new(
        route: &str,
        conf: &AuthConf,
        keys: &Arc<ArcSwap<KeyRing>>,
        provider: impl Fn(&str) -> Option<Arc<JwtProvider>>,
    ) -> Auth {
        let mut methods = Vec::new();
        let mut remove = vec![conf.consumer_header.clone()];
        let mut query_keys = Vec::new();
        for m in &conf.methods {
            match m {
                AuthMethod::ApiKey(source) => {
                    match source {
                        KeySource::Header(h) if !conf.forward => remove.push(h.clone()),
                        KeySource::Query(q) if !conf.forward => query_keys.push(q.clone()),
                        _ => {}
                    }
                    methods.push(Method::ApiKey {
                        source: source.clone(),
                        ring: keys.clone(),
                    });
                }
                AuthMethod::Jwt(name) => {
                    if !conf.forward {
                        remove.push(AUTHORIZATION);
                    }
                    match provider(name) {
                        Some(p) => {
                            remove.extend(p.conf.claims_to_headers.iter().map(|(_, h)| h.clone()));
                            methods.push(Method::Jwt(p));
                        }
                        None => log::error!(
                            "route {route}: jwt provider {name} is not loaded; its tokens are refused"
                        ),
                    }
                }
            }
        }
        remove.sort_by(|a, b| a.as_str().cmp(b.as_str()));
        remove.dedup();
        Auth {
            realm: route.to_string(),
            methods,
            consumer_header: conf.consumer_header.clone(),
            remove,
            query_keys,
        }
    }

    /// Query parameters to take out of the query toward the Pod.
    pub fn query_keys(&self) -> &[String] {
        &self.query_keys
    }

    pub fn check(&self, req: &RequestView<'_>, edits: &mut Edits) -> Result<Passed, LocalAnswer> {
        let mut tried: Vec<Tried> = Vec::new();
        for m in &self.methods {
            let outcome = match m {
                Method::ApiKey { source, ring } => {
                    let presented = match source {
                        KeySource::Header(h) => api_key::from_header(req, h.as_str()),
                        KeySource::Query(q) => api_key::from_query(req.query(), q),
                    };
                    match presented {
                        Presented::Absent => Tried::Missing,
                        Presented::Ambiguous => Tried::BadKey,
                        Presented::Key(k) => match ring.load().find(&k) {
                            Some(consumer) => return Ok(self.pass(Some(consumer), &[], edits)),
                            None => Tried::BadKey,
                        },
                    }
                }
                Method::Jwt(p) => {
                    let mut values = req.header_values("authorization");
                    match (values.next(), values.next()) {
                        (None, _) => Tried::Missing,
                        (Some(_), Some(_)) => Tried::BadToken(TokenError::Malformed),
                        (Some(v), None) => match bearer(v) {
                            // Another scheme (Basic …): not a credential of this method.
                            None if !starts_with_bearer(v) => Tried::Missing,
                            None => Tried::BadToken(TokenError::Malformed),
                            Some(token) => match p.verify(token) {
                                Ok(v) => {
                                    return Ok(self.pass(v.consumer.clone(), &v.headers, edits))
                                }
                                Err(e) => Tried::BadToken(e),
                            },
                        },
                    }
                }
            };
            tried.push(outcome);
        }
        Err(self.refusal(&tried))
    }

    fn pass(
        &self,
        consumer: Option<Arc<str>>,
        claims: &[(HeaderName, HeaderValue)],
        edits: &mut Edits,
    ) -> Passed {
        edits.remove.extend(self.remove.iter().cloned());
        if let Some(c) = &consumer {
            // Consumer names are config names or checked claim values: always a valid value.
            if let Ok(v) = HeaderValue::from_str(c) {
                edits.add.push((self.consumer_header.clone(), v));
            }
            edits.consumer = Some(c.clone());
        }
        edits.add.extend(claims.iter().cloned());
        Passed { consumer }
    }

    fn refusal(&self, tried: &[Tried]) -> LocalAnswer {
        let realm = &self.realm;
        let mut headers = Vec::with_capacity(self.methods.len());
        for (m, t) in self.methods.iter().zip(tried) {
            let text = match (m, t) {
                (Method::ApiKey { source, .. }, t) => {
                    let (kind, name) = match source {
                        KeySource::Header(h) => ("header", h.as_str()),
                        KeySource::Query(q) => ("query", q.as_str()),
                    };
                    let error = match t {
                        Tried::Missing => "",
                        _ => ", error=\"invalid_key\"",
                    };
                    format!("ApiKey realm=\"{realm}\", {kind}=\"{name}\"{error}")
                }
                (Method::Jwt(_), Tried::BadToken(e)) => format!(
                    "Bearer realm=\"{realm}\", error=\"invalid_token\", error_description=\"{}\"",
                    e.description()
                ),
                (Method::Jwt(_), _) => format!("Bearer realm=\"{realm}\""),
            };
            if let Ok(v) = HeaderValue::from_str(&text) {
                headers.push((WWW_AUTHENTICATE, v));
            }
        }
        LocalAnswer {
            status: 401,
            headers,
            body: AnswerBody::Error,
        }
    }
}

fn starts_with_bearer(v: &[u8]) -> bool {
    let v = v.trim_ascii_start();
    v.len() >= 6 && v[..6].eq_ignore_ascii_case(b"bearer") && v.get(6).is_none_or(|b| *b == b' ')
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn bearer_tokens_are_read_strictly() {
        assert_eq!(bearer(b"Bearer abc.def-_.g"), Some("abc.def-_.g"));
        assert_eq!(bearer(b"bearer   abc=="), Some("abc=="));
        assert_eq!(bearer(b"BEARER abc "), Some("abc"));
        assert_eq!(bearer(b"Bearer"), None);
        assert_eq!(bearer(b"Bearer "), None);
        assert_eq!(bearer(b"Bearer a b"), None);
        assert_eq!(bearer(b"Bearer =abc"), None);
        assert_eq!(bearer(b"Bearerabc"), None);
        assert_eq!(bearer(b"Basic dXNlcjpwdw=="), None);
        assert!(!starts_with_bearer(b"Basic x"));
        assert!(starts_with_bearer(b"Bearer a b"));
    }

    proptest! {
        /// Any Authorization bytes: no panic; a token read is non-empty token68 text that the
        /// value ends with.
        #[test]
        fn authorization_parsing_never_panics(value in proptest::collection::vec(any::<u8>(), 0..80)) {
            if let Some(token) = bearer(&value) {
                prop_assert!(!token.is_empty());
                prop_assert!(token.bytes().all(|b| b.is_ascii_alphanumeric() || b"-._~+/=".contains(&b)));
                prop_assert!(value.trim_ascii().ends_with(token.as_bytes()));
            }
        }

        #[test]
        fn bearer_round_trips(token in "[A-Za-z0-9_-]{1,20}\\.[A-Za-z0-9_-]{1,20}\\.[A-Za-z0-9_-]{0,20}", spaces in 1usize..4) {
            let value = format!("Bearer{}{token}", " ".repeat(spaces));
            prop_assert_eq!(bearer(value.as_bytes()), Some(token.as_str()));
        }
    }
}
