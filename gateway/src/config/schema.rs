//! The config file's format as serde types: one struct per YAML mapping, one field per key.
//!
//! This is what the user writes, not yet checked: every field is optional here (a missing
//! required key is reported by the validation pass, with the mapping's line) and wrapped (see
//! [`super::yaml`]) so that one mistake never hides the next. A struct's field names are the only
//! list of its allowed keys; the order they are declared in is the order the "unknown key
//! (expected one of: …)" message lists them.
//!
//! Adding a key: add the field here (`Option<Val<T>>` for a scalar, with a [`super::yaml::Leaf`]
//! for `T` if it is a new kind of value), carry it over in `validate.rs` or `upstream.rs` (with
//! its default and any check that needs other fields), and add it to the README's table.

use super::model::{CheckKind, HashOn, Protocol, Scheme};
use super::units::{BalanceWord, Int, Size, Status};
use super::yaml::{List, Pairs, Sect, Val};
use podgate_discovery::PortRef;
use std::net::SocketAddr;
use std::time::Duration;

/// The whole file.
#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct File {
    pub listeners: Option<List<Sect<Listener>>>,
    pub access_log: Option<Sect<AccessLog>>,
    pub admin: Option<Sect<Admin>>,
    pub server: Option<Sect<Server>>,
    pub clusters: Option<List<Sect<Cluster>>>,
    pub upstreams: Option<List<Sect<Upstream>>>,
    pub routes: Option<List<Sect<Route>>>,
    pub consumers: Option<List<Sect<Consumer>>>,
    pub jwt_providers: Option<List<Sect<JwtProvider>>>,
    pub rate_limit_stores: Option<List<Sect<super::rate_limit::StoreSchema>>>,
}

#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Listener {
    pub address: Option<Val<SocketAddr>>,
    pub tls: Option<Sect<ListenerTls>>,
    pub h2c: Option<Val<bool>>,
}

#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListenerTls {
    pub cert: Option<Val<String>>,
    pub key: Option<Val<String>>,
}

#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AccessLog {
    pub enabled: Option<Val<bool>>,
    pub path: Option<Val<String>>,
    pub buffer: Option<Val<Size>>,
    pub flush: Option<Val<Duration>>,
}

#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Admin {
    pub address: Option<Val<SocketAddr>>,
    pub token_file: Option<Val<String>>,
    pub open_metrics: Option<Val<bool>>,
}

#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Server {
    pub threads: Option<Val<Int<1, 1024>>>,
    pub grace_period: Option<Val<Duration>>,
    pub drain_delay: Option<Val<Duration>>,
    pub upgrade_sock: Option<Val<String>>,
    pub pid_file: Option<Val<String>>,
    pub ready_timeout: Option<Val<Duration>>,
    pub client_header_timeout: Option<Val<Duration>>,
    pub client_body_timeout: Option<Val<Duration>>,
    pub keepalive_timeout: Option<Val<Duration>>,
    pub header_memory: Option<Val<Size>>,
    pub zone: Option<Val<String>>,
    pub zone_from_node: Option<Val<String>>,
    pub trusted_proxies: Option<List<Val<String>>>,
}

#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Cluster {
    pub name: Option<Val<String>>,
    pub manifests: Option<Val<String>>,
    pub kubeconfig: Option<Val<String>>,
    pub context: Option<Val<String>>,
    pub in_cluster: Option<Val<bool>>,
    pub server: Option<Val<String>>,
    pub token_file: Option<Val<String>>,
    pub ca_file: Option<Val<String>>,
}

#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Upstream {
    pub name: Option<Val<String>>,
    pub scheme: Option<Val<Scheme>>,
    pub protocol: Option<Val<Protocol>>,
    pub host_header: Option<Val<String>>,
    pub tls: Option<Sect<UpstreamTls>>,
    pub tags: Option<Pairs>,
    pub retries: Option<Val<Int<0, 10>>>,
    pub connect_timeout: Option<Val<Duration>>,
    pub read_timeout: Option<Val<Duration>>,
    pub health_check: Option<Sect<HealthCheck>>,
    pub outlier: Option<Sect<Outlier>>,
    pub slow_start: Option<Val<Duration>>,
    pub balance: Option<Val<BalanceWord>>,
    pub hash_on: Option<Val<HashOn>>,
    pub zone_aware: Option<Val<bool>>,
    pub services: Option<List<Sect<Service>>>,
    pub nodes: Option<List<Sect<Node>>>,
}

#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UpstreamTls {
    pub sni: Option<Val<String>>,
    pub verify: Option<Val<bool>>,
    pub ca_file: Option<Val<String>>,
}

#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HealthCheck {
    pub kind: Option<Val<CheckKind>>,
    pub path: Option<Val<String>>,
    pub expect: Option<List<Val<Status>>>,
    pub interval: Option<Val<Duration>>,
    pub timeout: Option<Val<Duration>>,
    pub healthy: Option<Val<Int<1, 100>>>,
    pub unhealthy: Option<Val<Int<1, 100>>>,
}

#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Outlier {
    pub consecutive_failures: Option<Val<Int<0, 1000>>>,
    pub base_ejection: Option<Val<Duration>>,
    pub max_ejection_percent: Option<Val<Int<0, 100>>>,
}

#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Service {
    pub cluster: Option<Val<String>>,
    pub namespace: Option<Val<String>>,
    pub service: Option<Val<String>>,
    pub port: Option<Val<PortRef>>,
    pub weight: Option<Val<Int<1, 100>>>,
    pub priority: Option<Val<Int<0, 9>>>,
    pub labels: Option<Pairs>,
}

/// A static backend.
#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Node {
    pub address: Option<Val<SocketAddr>>,
    pub weight: Option<Val<Int<1, 100>>>,
}

#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Route {
    pub name: Option<Val<String>>,
    pub hosts: Option<List<Val<String>>>,
    pub path_prefix: Option<Val<String>>,
    pub methods: Option<List<Val<http::Method>>>,
    pub strip_prefix: Option<Val<bool>>,
    pub upstream: Option<Val<String>>,
    pub policies: Option<Sect<RoutePolicies>>,
}

/// An identity API keys (or a JWT claim) authenticate as.
#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Consumer {
    pub name: Option<Val<String>>,
    pub api_keys_file: Option<Val<String>>,
}

#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JwtProvider {
    pub name: Option<Val<String>>,
    pub issuer: Option<Val<String>>,
    pub audiences: Option<List<Val<String>>>,
    pub jwks_file: Option<Val<String>>,
    pub secret_file: Option<Val<String>>,
    pub consumer_claim: Option<Val<String>>,
    pub claims_to_headers: Option<Pairs>,
    pub leeway: Option<Val<Duration>>,
}

/// `routes[].policies`: what the route decides before a Pod sees a request (see
/// `config/policies.rs` for the rules, `policies/` for the behaviour).
#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RoutePolicies {
    pub auth: Option<Sect<Auth>>,
    pub consumers: Option<List<Val<String>>>,
    pub ip_allow: Option<List<Val<String>>>,
    pub ip_deny: Option<List<Val<String>>>,
    pub cors: Option<Sect<Cors>>,
    pub rate_limit: Option<List<Sect<super::rate_limit::RuleSchema>>>,
    pub request_headers: Option<Sect<HeaderRules>>,
    pub response_headers: Option<Sect<HeaderRules>>,
    pub rewrite: Option<Sect<Rewrite>>,
    pub redirect: Option<Sect<Redirect>>,
    pub max_body: Option<Val<Size>>,
}

/// One credential check (`api_key` or `jwt`), or `any_of` several; `forward` and
/// `consumer_header` only at the top.
#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Auth {
    pub api_key: Option<Sect<ApiKey>>,
    pub jwt: Option<Val<String>>,
    pub any_of: Option<List<Sect<Auth>>>,
    pub forward: Option<Val<bool>>,
    pub consumer_header: Option<Val<String>>,
}

#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ApiKey {
    pub header: Option<Val<String>>,
    pub query: Option<Val<String>>,
}

#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Cors {
    pub origins: Option<List<Val<String>>>,
    pub methods: Option<List<Val<http::Method>>>,
    pub headers: Option<List<Val<String>>>,
    pub expose_headers: Option<List<Val<String>>>,
    pub max_age: Option<Val<Duration>>,
    pub credentials: Option<Val<bool>>,
}

#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HeaderRules {
    pub set: Option<Pairs>,
    pub add: Option<Pairs>,
    pub remove: Option<List<Val<String>>>,
}

#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Rewrite {
    pub path: Option<Sect<RewritePath>>,
    pub prefix: Option<Val<String>>,
}

#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RewritePath {
    pub regex: Option<Val<String>>,
    pub to: Option<Val<String>>,
}

#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Redirect {
    pub scheme: Option<Val<Scheme>>,
    pub host: Option<Val<String>>,
    pub port: Option<Val<Int<1, 65535>>>,
    pub path: Option<Val<String>>,
    pub status: Option<Val<Int<300, 399>>>,
}
