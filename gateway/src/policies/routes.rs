//! What one config generation's routes need from the policies, built in one call next to the
//! router (`live.rs`): the consumers and JWT providers (with their file watch), the trusted
//! proxies, and each route's [`Policies`]. The pipeline then needs, per request, only
//! [`RouteSet::client`] and the route's own [`Policies::on_request`].

use super::{client_of, Fields, Identities, Policies, TrustedProxies};
use crate::config::Config;
use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Arc;

pub struct RouteSet {
    identities: Arc<Identities>,
    trusted: TrustedProxies,
    routes: HashMap<String, Policies>,
}

impl RouteSet {
    /// The policies of every route of `config` (config load and reload only: it starts the
    /// watch of the key and JWKS files).
    pub fn build(config: &Config) -> RouteSet {
        let identities = Identities::start(config);
        let routes = config
            .routes
            .iter()
            .map(|r| (r.name.clone(), Policies::build(r, &identities)))
            .collect();
        RouteSet {
            trusted: TrustedProxies::new(&config.server.trusted_proxies),
            identities,
            routes,
        }
    }

    /// Hands over the policies of route `name`, for the router's target; a route without any
    /// (or asked twice) gets empty ones, which the pipeline skips.
    pub fn take(&mut self, name: &str) -> Policies {
        self.routes.remove(name).unwrap_or_default()
    }

    /// The request's client ([`super::RequestView::client`]): the peer, or behind a trusted
    /// proxy the address it forwarded.
    pub fn client(&self, peer: Option<IpAddr>, fields: Fields<'_>) -> Option<IpAddr> {
        client_of(peer, fields, &self.trusted)
    }

    pub fn identities(&self) -> &Arc<Identities> {
        &self.identities
    }
}

#[cfg(test)]
mod tests {
    use super::super::test_support::Fixture;
    use super::*;

    #[test]
    fn one_build_gives_every_route_its_policies_and_the_client_behind_trusted_proxies() {
        let fx = Fixture::new(
            "server: {trusted_proxies: [10.0.0.0/8]}\nroutes:\n\
             \x20 - {name: open, path_prefix: /o, upstream: u}\n\
             \x20 - {name: cors, path_prefix: /c, upstream: u, policies: {cors: {origins: [\"*\"]}}}\n",
            &[],
        );
        let mut set = RouteSet::build(&fx.config);
        let cors = set.take("cors");
        assert!(!cors.is_empty() && cors.answers_preflights());
        assert!(set.take("open").is_empty());
        assert!(set.take("cors").is_empty(), "handed over once");
        let mut map = http::HeaderMap::new();
        map.append("x-forwarded-for", "203.0.113.9".parse().unwrap());
        let proxy: IpAddr = "10.1.2.3".parse().unwrap();
        let stranger: IpAddr = "198.51.100.1".parse().unwrap();
        let via = |peer| set.client(Some(peer), Fields::Map(&map));
        assert_eq!(via(proxy), Some("203.0.113.9".parse().unwrap()));
        assert_eq!(
            via(stranger),
            Some(stranger),
            "an untrusted peer cannot spoof"
        );
    }
}
