//! `request_headers` and `response_headers`: fields removed, replaced (`set`: every field of
//! that name goes, the new one comes) and appended (`add`), decided at load. The names podgate
//! decides itself (framing, hop-by-hop, `Host`, `X-Forwarded-*`, `X-Request-Id`) are refused by
//! the config check, so a rule can never change how a message is framed.

use crate::config::HeaderRulesConf;
use http::{HeaderName, HeaderValue};

#[derive(Debug, Default)]
pub struct HeaderRules {
    pub remove: Vec<HeaderName>,
    pub add: Vec<(HeaderName, HeaderValue)>,
}

impl HeaderRules {
    pub fn new(conf: &HeaderRulesConf) -> HeaderRules {
        let mut remove = conf.remove.clone();
        remove.extend(conf.set.iter().map(|(n, _)| n.clone()));
        remove.dedup();
        HeaderRules {
            remove,
            add: conf.set.iter().chain(&conf.add).cloned().collect(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.remove.is_empty() && self.add.is_empty()
    }
}
