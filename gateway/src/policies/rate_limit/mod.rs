//! Rate limits: a route's `policies.rate_limit` rules, each a GCRA bucket per key (consumer,
//! client address, or a header's value) kept in this process (`store: local`) or in Redis for
//! every replica (a named store, exact or batched).
//!
//! [`RateLimits::check`] is the one call the policies make per request, after authentication
//! (so `edits.consumer` is known) and before the body limit:
//! 1. Local rules decide first, with no I/O; the first refusal answers 429 and no Redis is asked.
//! 2. Shared rules then ask their stores, all at once; batched rules spend a lease when they
//!    hold one. Each call ends at its store's `timeout`, then `on_error` decides.
//! 3. A refusal gives back what local rules already took (they did not admit the request), and
//!    answers 429 with `Retry-After` (whole seconds, at least 1) and the `RateLimit-Policy` and
//!    `RateLimit` fields; a store failure with `on_error: deny` answers 500 with
//!    `Retry-After: 1` (what Envoy's `failure_mode_deny` and Kong's `fault_tolerant: false`
//!    answer). Shared buckets are not given back: that would be a second Redis call.
//! 4. An admitted request carries `RateLimit-Policy` and `RateLimit` to its answer through
//!    `edits.response_add` (rules with `headers: false` are left out).
//!
//! Fields (draft-ietf-httpapi-ratelimit-headers-10, Structured Fields lists of strings with
//! parameters): `RateLimit-Policy: "consumer 100/s";q=100;w=1` names each rule with its quota
//! `q` per window `w` seconds (the configured rate); `RateLimit: "consumer 100/s";r=19;t=1`
//! gives what the bucket admits now (`r`) and the seconds until it is full again (`t`). In
//! batched mode an answer served from a lease carries no `RateLimit` item for that rule (its
//! numbers would be this replica's, not the shared bucket's), and a 429 from a refusal this
//! replica remembers gives `t` as the time until the next token is due.
//!
//! Keys: `consumer` without a consumer, and `header NAME` without the header (or with an empty
//! value), count by the client address instead, as Kong and APISIX do — a request without the
//! key is still limited, and cannot share one bucket with every other keyless request. Values
//! longer than 64 bytes, or with bytes outside visible ASCII (and `{`, `}`, `~`), go into Redis
//! keys as their SHA-1, so keys stay short and carry no Cluster hash tag a client could choose.
//!
//! Reloads: a rule whose route, key, rate, burst, store and `max_keys` are unchanged keeps its
//! local buckets (and leases), and a store whose settings are unchanged keeps its connection;
//! a changed rule starts with full buckets. Shared buckets live in Redis under a key made of
//! route, key kind, rate and burst, so they survive reloads and restarts alike.

mod gcra;
mod lease;
mod local;
mod redis;
mod table;

pub use self::redis::{Failure, RedisStore, Reply, SCRIPT};
pub use gcra::{Gcra, Outcome};
pub use lease::{Leases, Take, LIFETIME as LEASE_LIFETIME};
pub use local::LocalLimiter;
pub use table::Table;

use super::{AnswerBody, Edits, LocalAnswer, RequestView};
use crate::config::{
    OnError, RateKey, RateLimitRule, RateLimitStoreConf, RuleStore,
    MAX_RATE_LIMIT_RULES as MAX_RULES,
};
use crate::telemetry::rate_limit::RuleMetrics;
use http::{HeaderName, HeaderValue};
use std::hash::BuildHasher;
use std::net::IpAddr;
use std::sync::{Arc, LazyLock, Mutex, Weak};
use std::time::{Duration, Instant};

static EPOCH: LazyLock<Instant> = LazyLock::new(Instant::now);

/// Nanoseconds on the process' monotonic clock, from 1 s after its start (so 0 is never now).
pub fn clock() -> u64 {
    EPOCH.elapsed().as_nanos() as u64 + 1_000_000_000
}

/// The per-process secret key of local key hashes.
static HASHER: LazyLock<std::hash::RandomState> = LazyLock::new(std::hash::RandomState::new);

pub const RATELIMIT: HeaderName = HeaderName::from_static("ratelimit");
pub const RATELIMIT_POLICY: HeaderName = HeaderName::from_static("ratelimit-policy");

/// What one rule counts a request by.
#[derive(Debug, PartialEq, Eq)]
pub enum Key<'a> {
    Ip(IpAddr),
    /// A consumer (`c`) or a header value (`h`).
    Text(u8, &'a [u8]),
    /// No client address is known (not over TCP): one bucket for all such requests.
    Unknown,
}

impl<'a> Key<'a> {
    /// The key of `spec` for this request (see the module doc for the fallbacks).
    pub fn of(spec: &RateKey, req: &RequestView<'a>, consumer: Option<&'a str>) -> Key<'a> {
        let text = match spec {
            RateKey::Consumer => consumer.map(|c| (b'c', c.as_bytes())),
            RateKey::Header(name) => req.header(name).map(|v| (b'h', v)),
            RateKey::ClientIp => None,
        };
        match text {
            Some((kind, v)) if !v.is_empty() => Key::Text(kind, v),
            _ => match req.client.or(req.peer) {
                Some(ip) => Key::Ip(ip.to_canonical()),
                None => Key::Unknown,
            },
        }
    }

    /// The 64-bit keyed hash the local tables use.
    pub fn hash(&self) -> u64 {
        match self {
            Key::Ip(ip) => HASHER.hash_one((b'i', ip)),
            Key::Text(kind, v) => HASHER.hash_one((kind, v)),
            Key::Unknown => HASHER.hash_one(b'u'),
        }
    }

    /// `prefix` then `KIND:VALUE`, the value as written or as `~SHA1` (see the module doc).
    pub fn redis_key(&self, prefix: &[u8]) -> Vec<u8> {
        use std::io::Write;
        let mut k = Vec::with_capacity(prefix.len() + 48);
        k.extend_from_slice(prefix);
        match self {
            Key::Ip(ip) => {
                let _ = write!(k, "i:{ip}");
            }
            Key::Unknown => k.extend_from_slice(b"u:"),
            Key::Text(kind, v) => {
                k.extend_from_slice(&[*kind, b':']);
                let plain = v.len() <= 64
                    && v.iter()
                        .all(|b| b.is_ascii_graphic() && !b"{}~".contains(b));
                if plain {
                    k.extend_from_slice(v);
                } else {
                    k.push(b'~');
                    k.extend_from_slice(sha1_smol::Sha1::from(v).digest().to_string().as_bytes());
                }
            }
        }
        k
    }
}

enum Engine {
    Local(Arc<LocalLimiter>),
    Shared {
        store: Arc<RedisStore>,
        /// Batched mode's leases (none when the lease is 1: exact).
        leases: Option<Arc<Leases>>,
        interval_us: String,
        tolerance_us: String,
        /// `prefix` + route + rule: what every key of this rule starts with in Redis.
        prefix: Vec<u8>,
    },
}

struct Rule {
    conf: RateLimitRule,
    name: String,
    engine: Engine,
    metrics: RuleMetrics,
}

/// One route's rate-limit rules, built from its config; cheap to share, immutable.
pub struct RateLimits {
    route: Arc<str>,
    rules: Vec<Rule>,
    /// `RateLimit-Policy` of the rules with `headers: true`; `None` when there is none.
    policy: Option<HeaderValue>,
}

impl std::fmt::Debug for RateLimits {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let names: Vec<&str> = self.rules.iter().map(|r| r.name.as_str()).collect();
        f.debug_struct("RateLimits")
            .field("route", &self.route)
            .field("rules", &names)
            .finish()
    }
}

impl Rule {
    /// The shared bucket's answer for `key` (a local rule has none to give).
    async fn ask(&self, key: &[u8], want: u64) -> Result<Reply, Failure> {
        match &self.engine {
            Engine::Shared {
                store,
                interval_us,
                tolerance_us,
                ..
            } => store.take(key, interval_us, tolerance_us, want).await,
            Engine::Local(_) => Err(Failure::Skipped),
        }
    }
}

/// What a rule said, once every store answered.
#[derive(Clone, Copy, Debug)]
enum Step {
    Admit {
        /// `None`: nothing to report (a lease served it).
        remaining: Option<u64>,
        reset: Duration,
    },
    Refuse {
        retry_after: Duration,
        reset: Duration,
    },
    Failed(OnError),
}

impl RateLimits {
    /// The rules of route `route`; `None` when there are none. Reuses the local tables, leases
    /// and store connections of an earlier config where nothing about them changed.
    pub fn new(route: &str, rules: &[RateLimitRule]) -> Option<RateLimits> {
        if rules.is_empty() {
            return None;
        }
        // Validation refuses more; a hand-built list is cut rather than overrun.
        let rules = &rules[..rules.len().min(MAX_RULES)];
        let rules: Vec<Rule> = rules.iter().map(|r| build_rule(route, r)).collect();
        let items: Vec<String> = rules
            .iter()
            .filter(|r| r.conf.headers)
            .map(|r| {
                let rate = r.conf.rate;
                format!("\"{}\";q={};w={}", r.name, rate.count, rate.per_secs)
            })
            .collect();
        let policy = (!items.is_empty())
            .then(|| HeaderValue::from_str(&items.join(", ")).ok())
            .flatten();
        Some(RateLimits {
            route: Arc::from(route),
            rules,
            policy,
        })
    }

    /// Decides about one request: `None` lets it on (with the rate-limit fields added to
    /// `edits.response_add`), `Some` is the answer instead.
    pub async fn check(&self, req: &RequestView<'_>, edits: &mut Edits) -> Option<LocalAnswer> {
        let now = clock();
        let now_ms = now / 1_000_000;
        let consumer = edits.consumer.as_deref();
        // Per rule (at most MAX_RULES, which validation holds): what it said, and its key's hash
        // when a local bucket admitted (to give back if a later rule refuses).
        let mut steps: [Option<Step>; MAX_RULES] = [None; MAX_RULES];
        let mut taken: [Option<u64>; MAX_RULES] = [None; MAX_RULES];
        // Shared rules that need Redis: (rule, key hash, Redis key, tokens wanted, refill).
        let mut calls: Vec<(usize, u64, Vec<u8>, u64, bool)> = Vec::new();
        for (i, rule) in self.rules.iter().enumerate() {
            let key = Key::of(&rule.conf.key, req, consumer);
            match &rule.engine {
                Engine::Local(l) => {
                    let hash = key.hash();
                    match l.check(hash, now) {
                        Outcome::Admit { remaining, reset } => {
                            rule.metrics.allowed.inc();
                            taken[i] = Some(hash);
                            steps[i] = Some(Step::Admit {
                                remaining: Some(remaining),
                                reset,
                            });
                        }
                        Outcome::Refuse { retry_after, reset } => {
                            rule.metrics.limited.inc();
                            self.refund(&taken, now);
                            let refused = [(rule, retry_after, reset)];
                            return Some(self.refusal(&refused));
                        }
                    }
                }
                Engine::Shared { leases, prefix, .. } => {
                    let hash = key.hash();
                    let take = leases.as_ref().map(|l| l.take(hash, now_ms));
                    match take {
                        Some(Take::Served) => {
                            rule.metrics.allowed.inc();
                            steps[i] = Some(Step::Admit {
                                remaining: None,
                                reset: Duration::ZERO,
                            });
                        }
                        Some(Take::Refused(retry_after)) => {
                            rule.metrics.limited.inc();
                            self.refund(&taken, now);
                            let refused = [(rule, retry_after, retry_after)];
                            return Some(self.refusal(&refused));
                        }
                        Some(Take::Refill) => {
                            let want = leases.as_ref().map_or(1, |l| l.lease);
                            calls.push((i, hash, key.redis_key(prefix), want, true));
                        }
                        Some(Take::Exact) | None => {
                            calls.push((i, hash, key.redis_key(prefix), 1, false))
                        }
                    }
                }
            }
        }
        if !calls.is_empty() {
            let replies = match &calls[..] {
                [(i, _, key, want, _)] => vec![self.rules[*i].ask(key, *want).await],
                many => {
                    let asks = many
                        .iter()
                        .map(|(i, _, key, want, _)| self.rules[*i].ask(key, *want));
                    futures::future::join_all(asks).await
                }
            };
            let now_ms = clock() / 1_000_000;
            for ((i, hash, _, _, refill), reply) in calls.iter().zip(replies) {
                let rule = &self.rules[*i];
                let Engine::Shared { store, leases, .. } = &rule.engine else {
                    continue;
                };
                let leases = leases.as_ref().filter(|_| *refill);
                let step = match reply {
                    Ok(r) if r.granted > 0 => {
                        if let Some(l) = leases {
                            l.deposit(*hash, r.granted - 1, now_ms);
                        }
                        rule.metrics.allowed.inc();
                        Step::Admit {
                            remaining: Some(r.remaining),
                            reset: r.reset,
                        }
                    }
                    Ok(r) => {
                        if let Some(l) = leases {
                            let due = now_ms + r.retry_after.as_millis() as u64;
                            l.refuse(*hash, due, now_ms);
                        }
                        rule.metrics.limited.inc();
                        Step::Refuse {
                            retry_after: r.retry_after,
                            reset: r.reset,
                        }
                    }
                    Err(_) => {
                        if let Some(l) = leases {
                            l.deposit(*hash, 0, now_ms);
                        }
                        match store.conf.on_error {
                            OnError::Allow => rule.metrics.error_allowed.inc(),
                            OnError::Deny => rule.metrics.error_denied.inc(),
                        }
                        Step::Failed(store.conf.on_error)
                    }
                };
                steps[*i] = Some(step);
            }
        }
        let refused: Vec<(&Rule, Duration, Duration)> = self
            .rules
            .iter()
            .zip(&steps)
            .filter_map(|(rule, s)| match s {
                Some(Step::Refuse { retry_after, reset }) => Some((rule, *retry_after, *reset)),
                _ => None,
            })
            .collect();
        let denied = steps
            .iter()
            .any(|s| matches!(s, Some(Step::Failed(OnError::Deny))));
        if !refused.is_empty() || denied {
            self.refund(&taken, now);
        }
        if !refused.is_empty() {
            return Some(self.refusal(&refused));
        }
        if denied {
            return Some(LocalAnswer {
                status: 500,
                headers: vec![(http::header::RETRY_AFTER, HeaderValue::from_static("1"))],
                body: AnswerBody::Error,
            });
        }
        if let Some(policy) = &self.policy {
            edits.response_add.push((RATELIMIT_POLICY, policy.clone()));
            // One string, written in place: this runs for every admitted request.
            let mut field = String::with_capacity(48 * self.rules.len());
            for (rule, step) in self.rules.iter().zip(&steps) {
                if let (
                    true,
                    Some(Step::Admit {
                        remaining: Some(r),
                        reset,
                    }),
                ) = (rule.conf.headers, step)
                {
                    use std::fmt::Write;
                    let sep = if field.is_empty() { "" } else { ", " };
                    let t = whole_secs(*reset, 0);
                    let _ = write!(field, "{sep}\"{}\";r={r};t={t}", rule.name);
                }
            }
            if let (false, Ok(v)) = (field.is_empty(), HeaderValue::try_from(field)) {
                edits.response_add.push((RATELIMIT, v));
            }
        }
        None
    }

    /// Gives back what local buckets admitted for a request a later rule refused.
    fn refund(&self, taken: &[Option<u64>; MAX_RULES], now: u64) {
        for (rule, hash) in self.rules.iter().zip(taken) {
            if let (Engine::Local(l), Some(hash)) = (&rule.engine, hash) {
                l.refund(*hash, now);
            }
        }
    }

    /// The 429 for the rules that refused: the longest wait in `Retry-After`.
    fn refusal(&self, refused: &[(&Rule, Duration, Duration)]) -> LocalAnswer {
        let wait = refused.iter().map(|r| r.1).max().unwrap_or_default();
        let mut headers = vec![(
            http::header::RETRY_AFTER,
            HeaderValue::from(whole_secs(wait, 1)),
        )];
        if let Some(policy) = &self.policy {
            headers.push((RATELIMIT_POLICY, policy.clone()));
            let items: Vec<String> = refused
                .iter()
                .filter(|r| r.0.conf.headers)
                .map(|(rule, _, reset)| {
                    format!("\"{}\";r=0;t={}", rule.name, whole_secs(*reset, 1))
                })
                .collect();
            if let (false, Ok(v)) = (items.is_empty(), HeaderValue::from_str(&items.join(", "))) {
                headers.push((RATELIMIT, v));
            }
        }
        LocalAnswer {
            status: 429,
            headers,
            body: AnswerBody::Error,
        }
    }
}

/// `d` in whole seconds, rounded up, at least `min`.
fn whole_secs(d: Duration, min: u64) -> u64 {
    (d.as_secs() + u64::from(d.subsec_nanos() > 0)).max(min)
}

/// Built rule state still in use, by what identifies it, so that a reload keeps it.
static LOCALS: Mutex<Vec<(String, Weak<LocalLimiter>)>> = Mutex::new(Vec::new());
static LEASES: Mutex<Vec<(String, Weak<Leases>)>> = Mutex::new(Vec::new());
static STORES: Mutex<Vec<(Arc<RateLimitStoreConf>, Weak<RedisStore>)>> = Mutex::new(Vec::new());

/// The live object registered under `id`, or a new one from `make` (config load only; the
/// request path never sees these locks).
fn reuse<K: PartialEq, T>(
    registry: &Mutex<Vec<(K, Weak<T>)>>,
    id: K,
    make: impl FnOnce() -> T,
) -> Arc<T> {
    let mut list = registry.lock().unwrap_or_else(|e| e.into_inner());
    list.retain(|(_, w)| w.strong_count() > 0);
    if let Some(live) = list
        .iter()
        .find(|(k, _)| *k == id)
        .and_then(|(_, w)| w.upgrade())
    {
        return live;
    }
    let new = Arc::new(make());
    list.push((id, Arc::downgrade(&new)));
    new
}

/// The store of `conf`, shared by every rule that names it (and kept across reloads).
pub fn store(conf: &Arc<RateLimitStoreConf>) -> Arc<RedisStore> {
    reuse(&STORES, conf.clone(), || RedisStore::new(conf.clone()))
}

fn build_rule(route: &str, conf: &RateLimitRule) -> Rule {
    let name = conf.name();
    let gcra = Gcra::new(conf.rate.interval(), conf.burst);
    let id = format!("{route}\n{name}\n{}\n{}", conf.burst, conf.max_keys);
    let table = || {
        let (keys, evictions) = crate::telemetry::rate_limit::table(route, &name);
        Table::new(conf.max_keys as usize, keys, evictions)
    };
    let engine = match &conf.store {
        RuleStore::Local => Engine::Local(reuse(&LOCALS, id, || LocalLimiter {
            gcra,
            table: table(),
        })),
        RuleStore::Shared(s) => {
            let lease = conf.lease();
            let leases = (lease > 1).then(|| {
                let id = format!("{id}\n{}\n{lease}\n{:?}", s.name, s.timeout);
                reuse(&LEASES, id, || Leases::new(table(), lease, s.timeout))
            });
            let us = |ns: u64| format!("{:.3}", ns as f64 / 1000.0);
            Engine::Shared {
                store: store(s),
                leases,
                interval_us: us(gcra.interval),
                tolerance_us: us(gcra.tolerance),
                prefix: format!("{}{route}:{name}:{}:", s.key_prefix, conf.burst).into_bytes(),
            }
        }
    };
    Rule {
        metrics: RuleMetrics::new(route, &name),
        conf: conf.clone(),
        name,
        engine,
    }
}

#[cfg(test)]
mod tests;
