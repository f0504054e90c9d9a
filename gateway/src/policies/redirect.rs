//! `redirect`: podgate answers with `Location` and the configured status, no Pod is asked.
//!
//! With only `scheme`, a request is redirected when it came over the other scheme (the usual
//! "HTTP to HTTPS" rule, which must not loop on the HTTPS side); with `host`, `port` or `path`
//! every request is. The new URL keeps what is not replaced: the Host the client asked for
//! (without its port, unless `port` names one), the path and the query.

use super::{AnswerBody, LocalAnswer, RequestView};
use crate::config::{RedirectConf, Scheme};
use http::header::LOCATION;
use http::HeaderValue;

#[derive(Debug)]
pub struct Redirect(RedirectConf);

impl Redirect {
    pub fn new(conf: &RedirectConf) -> Redirect {
        Redirect(conf.clone())
    }

    pub fn on_request(&self, req: &RequestView<'_>) -> Option<LocalAnswer> {
        let c = &self.0;
        let came = if req.tls { Scheme::Https } else { Scheme::Http };
        let only_scheme = c.host.is_none() && c.path.is_none() && c.port.is_none();
        if only_scheme && c.scheme == Some(came) {
            return None;
        }
        let scheme = match c.scheme.unwrap_or(came) {
            Scheme::Http => "http",
            Scheme::Https => "https",
        };
        let host = c.host.as_deref().unwrap_or(req.host);
        let port = c.port.map(|p| format!(":{p}")).unwrap_or_default();
        let path = c.path.as_deref().unwrap_or(req.path());
        let query = req.query().map(|q| format!("?{q}")).unwrap_or_default();
        let location = format!("{scheme}://{host}{port}{path}{query}");
        let Ok(value) = HeaderValue::from_str(&location) else {
            // Only a Host or path no valid request can carry gets here.
            return Some(LocalAnswer {
                status: 400,
                headers: Vec::new(),
                body: AnswerBody::Error,
            });
        };
        Some(LocalAnswer {
            status: c.status,
            headers: vec![(LOCATION, value)],
            body: AnswerBody::Empty,
        })
    }
}
