//! Rate limits in their validated form: what `rate_limit_stores` and `routes[].policies.rate_limit`
//! become once checked (`rate_limit.rs` reads and checks them; `units.rs` says how `rate`, `key`,
//! `on_error` and `mode` are written). The defaults and limits of every key live here.
//!
//! A rule's bucket is a GCRA (the token bucket's arithmetic, see `policies/rate_limit/gcra.rs`):
//! `rate` is the sustained rate, `burst` the most requests admitted at once after a quiet
//! spell (default: the rate's count, so `100/s` admits 100 at once and then 100 a second).

use std::fmt;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

/// Envoy's rate-limit filter waits 20 ms for its service by default; a Redis in the same
/// cluster answers in well under a millisecond.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_millis(20);
/// The longest `timeout`: a limiter that may hold requests for seconds is an outage of its own.
pub const MAX_TIMEOUT: Duration = Duration::from_secs(1);
/// Tokens a replica takes from Redis at once in `mode: batched` (at most a tenth of a rule's
/// burst, see [`RateLimitRule::lease`]).
pub const DEFAULT_LEASE: u32 = 10;
/// Keys one rule tracks in a process (local store, and the leases of batched mode): 16 bytes
/// each, so 1 MiB per rule.
pub const DEFAULT_MAX_KEYS: u32 = 65_536;
pub const DEFAULT_KEY_PREFIX: &str = "podgate:rl:";
/// Rules one route may have.
pub const MAX_RULES: usize = 8;
/// The reserved store name: per-process limits.
pub const LOCAL: &str = "local";

/// What a store does when Redis fails or does not answer within `timeout`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OnError {
    /// Let the request through (fail open: Envoy's and Kong's default).
    Allow,
    /// Refuse it (500, `Retry-After: 1`).
    Deny,
}

/// How a store spends Redis calls.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// One Redis call per request: exact across replicas.
    Exact,
    /// A replica takes tokens in leases and spends them locally (see [`RateLimitRule::lease`]).
    Batched,
}

/// What a rule counts requests by.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum RateKey {
    /// The consumer authentication found (`edits.consumer`); without one, the client address.
    Consumer,
    /// The client address (`server.trusted_proxies` decides which one).
    ClientIp,
    /// The first value of a request header, lower-case name; without one, the client address.
    Header(String),
}

impl fmt::Display for RateKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RateKey::Consumer => f.write_str("consumer"),
            RateKey::ClientIp => f.write_str("client_ip"),
            RateKey::Header(h) => write!(f, "header {h}"),
        }
    }
}

/// `COUNT/UNIT`: so many requests per second, minute, hour or day.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Rate {
    pub count: u64,
    /// The unit's length in seconds: 1, 60, 3600 or 86400.
    pub per_secs: u64,
}

impl Rate {
    /// The time one request uses up: the unit over the count.
    pub fn interval(&self) -> Duration {
        Duration::from_nanos(self.per_secs * 1_000_000_000 / self.count)
    }

    fn unit(&self) -> &'static str {
        match self.per_secs {
            1 => "s",
            60 => "min",
            3600 => "h",
            _ => "d",
        }
    }
}

impl fmt::Display for Rate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.count, self.unit())
    }
}

// ---- the validated form ----

/// A password or a URL with one: never printed.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(pub String);

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("<redacted>")
    }
}

/// Where a shared store's Redis is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RedisTarget {
    /// One server (`redis://`, `rediss://`, `unix://`, `redis+unix://`).
    Server(Secret),
    /// A Redis Cluster: its seed nodes; the rest is learned from `CLUSTER SLOTS`.
    Cluster(Vec<Secret>),
}

/// A validated entry of `rate_limit_stores`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RateLimitStoreConf {
    pub name: Arc<str>,
    pub target: RedisTarget,
    /// `rediss://` is used (every node of a Cluster alike).
    pub tls: bool,
    /// The CA bundle (`ca_file`), PEM, read when the config was loaded; `None`: system roots.
    pub ca_pem: Option<Vec<u8>>,
    pub ca_file: Option<PathBuf>,
    /// From `password_file` (surrounding whitespace removed); wins over one in the URL.
    pub password: Option<Secret>,
    pub timeout: Duration,
    pub on_error: OnError,
    pub mode: Mode,
    pub lease: u32,
    pub key_prefix: String,
}

/// Which store keeps a rule's buckets.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RuleStore {
    Local,
    Shared(Arc<RateLimitStoreConf>),
}

/// A validated rule of `routes[].policies.rate_limit`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RateLimitRule {
    pub key: RateKey,
    pub rate: Rate,
    /// Most requests admitted at once (the bucket's size), 1 or more.
    pub burst: u64,
    pub store: RuleStore,
    /// Keys tracked per process (local store; leases of batched mode).
    pub max_keys: u32,
    /// `RateLimit-Policy` and `RateLimit` fields on answers.
    pub headers: bool,
}

impl RateLimitRule {
    /// The rule's name in `RateLimit-Policy`, metrics and logs: key and rate, e.g.
    /// `consumer 100/s`. Unique within a route (validation refuses two rules with the same).
    pub fn name(&self) -> String {
        format!("{} {}", self.key, self.rate)
    }

    /// Tokens a replica takes per Redis call in batched mode: the store's `lease`, at most a
    /// tenth of the burst (at least 1, which is exact mode).
    pub fn lease(&self) -> u64 {
        match &self.store {
            RuleStore::Shared(s) if s.mode == Mode::Batched => {
                u64::from(s.lease).min(self.burst / 10).max(1)
            }
            _ => 1,
        }
    }
}
