//! Rate limits in the config file: `rate_limit_stores` (the shared Redis stores) and the rules of
//! `routes[].policies.rate_limit` — their YAML form and the checks that turn it into the
//! validated form of `limits.rs`.
//!
//! ```yaml
//! rate_limit_stores:
//!   - name: shared
//!     redis: redis://127.0.0.1:6379/0        # or a list of nodes (a Redis Cluster), or rediss://
//!     timeout: 20ms                          # per call, then on_error applies
//!     on_error: allow                        # or deny
//! routes:
//!   - name: orders
//!     policies:
//!       rate_limit:
//!         - {key: consumer, rate: 100/s, burst: 20, store: shared}
//! ```
//!
//! The README's table documents every key; `limits.rs` is where the defaults and limits live.

use super::limits::*;
use super::names::check_name;
use super::report::{child, line, Report};
use super::units::{Int, Resolve};
use super::yaml::{Leaf, List, Scalar, Sect, Val};
use serde::de::{self, Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};
use serde::Deserialize;
use serde_saphyr::Spanned;
use std::fmt;
use std::sync::Arc;
use std::time::Duration;

// ---- the file's form ----

/// One entry of `rate_limit_stores`.
#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StoreSchema {
    pub name: Option<Val<String>>,
    pub redis: Option<Nodes>,
    pub ca_file: Option<Val<String>>,
    pub password_file: Option<Val<String>>,
    pub timeout: Option<Val<Duration>>,
    pub on_error: Option<Val<OnError>>,
    pub mode: Option<Val<Mode>>,
    pub lease: Option<Val<Int<2, 1000>>>,
    pub key_prefix: Option<Val<String>>,
}

/// One entry of `routes[].policies.rate_limit`.
#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RuleSchema {
    pub key: Option<Val<RateKey>>,
    pub rate: Option<Val<Rate>>,
    pub burst: Option<Val<Int<1, 1_000_000_000>>>,
    pub store: Option<Val<String>>,
    pub max_keys: Option<Val<Int<1024, 16_777_216>>>,
    pub headers: Option<Val<bool>>,
}

/// `redis:` — one URL (a server) or a list of URLs (the seed nodes of a Redis Cluster), with
/// the line of each.
#[derive(Debug, Clone, PartialEq)]
pub struct Nodes {
    pub line: usize,
    pub value: Result<NodesValue, String>,
}

#[derive(Debug, Clone, PartialEq)]
pub enum NodesValue {
    One(String),
    Many(Vec<(usize, Result<String, String>)>),
}

impl<'de> Deserialize<'de> for Nodes {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Inner(Result<NodesValue, String>);
        struct V;
        const WHAT: &str = "a redis:// URL or a list of them (a Redis Cluster)";
        fn other<E>(kind: &str) -> Result<Inner, E> {
            Ok(Inner(Err(format!("expected {WHAT}, found {kind}"))))
        }
        impl<'de> Visitor<'de> for V {
            type Value = Inner;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str(WHAT)
            }
            fn visit_str<E: de::Error>(self, s: &str) -> Result<Inner, E> {
                Ok(Inner(Ok(NodesValue::One(s.to_string()))))
            }
            fn visit_bool<E: de::Error>(self, _: bool) -> Result<Inner, E> {
                other("a boolean")
            }
            fn visit_i64<E: de::Error>(self, _: i64) -> Result<Inner, E> {
                other("a number")
            }
            fn visit_u64<E: de::Error>(self, _: u64) -> Result<Inner, E> {
                other("a number")
            }
            fn visit_f64<E: de::Error>(self, _: f64) -> Result<Inner, E> {
                other("a number")
            }
            fn visit_unit<E: de::Error>(self) -> Result<Inner, E> {
                other("null")
            }
            fn visit_none<E: de::Error>(self) -> Result<Inner, E> {
                other("null")
            }
            fn visit_some<D: Deserializer<'de>>(self, d: D) -> Result<Inner, D::Error> {
                d.deserialize_any(self)
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Inner, A::Error> {
                while map.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {}
                other("a mapping")
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Inner, A::Error> {
                let mut nodes = Vec::new();
                while let Some(item) = seq.next_element::<Spanned<Scalar>>()? {
                    let line = item.defined.line() as usize;
                    nodes.push((line, String::from_scalar(item.value)));
                }
                Ok(Inner(Ok(NodesValue::Many(nodes))))
            }
        }
        impl<'de> Deserialize<'de> for Inner {
            fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                d.deserialize_any(V)
            }
        }
        let s = Spanned::<Inner>::deserialize(d)?;
        Ok(Nodes {
            line: s.defined.line() as usize,
            value: s.value.0,
        })
    }
}

// ---- validation ----

/// `rate_limit_stores`: every entry checked, names unique and not `local`.
pub fn stores(
    r: &mut Report,
    list: Option<&List<Sect<StoreSchema>>>,
    resolve: Resolve,
) -> Vec<Arc<RateLimitStoreConf>> {
    let mut out: Vec<Arc<RateLimitStoreConf>> = Vec::new();
    let items = list.map(|l| r.list(l, "rate_limit_stores"));
    for (path, s) in items.unwrap_or_default() {
        let Some(new) = store(r, s, &path, resolve) else {
            continue;
        };
        if out.iter().any(|x| x.name == new.name) {
            let message = format!("duplicate store name `{}`", new.name);
            r.error(Some(s.line), &child(&path, "name"), message);
        } else {
            out.push(Arc::new(new));
        }
    }
    out
}

fn store(
    r: &mut Report,
    s: &Sect<StoreSchema>,
    path: &str,
    resolve: Resolve,
) -> Option<RateLimitStoreConf> {
    let st = r.sect(s, path)?;
    let name_path = child(path, "name");
    let name = r.required(&st.name, s.line, &name_path).cloned();
    if let Some(n) = &name {
        if let Err(message) = check_name(n) {
            r.error(line(&st.name), &name_path, message);
        } else if n == LOCAL {
            let message = "`local` is the per-process store every rule can name; pick another name";
            r.error(line(&st.name), &name_path, message);
        }
    }
    let redis_path = child(path, "redis");
    let target = match &st.redis {
        None => {
            r.error(Some(s.line), &redis_path, "is required");
            None
        }
        Some(nodes) => redis_target(r, nodes, &redis_path),
    };
    let tls = match &target {
        Some(RedisTarget::Server(u)) => u.0.starts_with("rediss://"),
        Some(RedisTarget::Cluster(nodes)) => nodes.iter().all(|u| u.0.starts_with("rediss://")),
        None => false,
    };
    if let Some(RedisTarget::Cluster(nodes)) = &target {
        let secure = nodes
            .iter()
            .filter(|u| u.0.starts_with("rediss://"))
            .count();
        if secure != 0 && secure != nodes.len() {
            let message = "mixes redis:// and rediss:// nodes: a Cluster is all TLS or none";
            r.error(st.redis.as_ref().map(|n| n.line), &redis_path, message);
        }
    }
    let ca_path = child(path, "ca_file");
    let ca_file = r.opt(&st.ca_file, &ca_path).map(|p| resolve(p));
    let mut ca_pem = None;
    if let Some(file) = &ca_file {
        if target.is_some() && !tls {
            let message = "ca_file only applies to rediss:// (TLS) URLs";
            r.error(line(&st.ca_file), &ca_path, message);
        }
        match std::fs::read(file) {
            Ok(pem) if pem_has_certificate(&pem) => ca_pem = Some(pem),
            Ok(_) => {
                let message = format!("{} holds no PEM certificate", file.display());
                r.error(line(&st.ca_file), &ca_path, message);
            }
            Err(e) => {
                let message = format!("cannot read {}: {e}", file.display());
                r.error(line(&st.ca_file), &ca_path, message);
            }
        }
    }
    let pw_path = child(path, "password_file");
    let password = r.opt(&st.password_file, &pw_path).and_then(|p| {
        let file = resolve(p);
        match std::fs::read_to_string(&file) {
            Ok(text) if !text.trim().is_empty() => Some(Secret(text.trim().to_string())),
            Ok(_) => {
                let message = format!("{} is empty", file.display());
                r.error(line(&st.password_file), &pw_path, message);
                None
            }
            Err(e) => {
                let message = format!("cannot read {}: {e}", file.display());
                r.error(line(&st.password_file), &pw_path, message);
                None
            }
        }
    });
    let timeout_path = child(path, "timeout");
    let timeout = *r
        .opt(&st.timeout, &timeout_path)
        .unwrap_or(&DEFAULT_TIMEOUT);
    if timeout < Duration::from_millis(1) || timeout > MAX_TIMEOUT {
        let message = format!(
            "{} is outside 1ms..1s: requests wait up to this long for Redis",
            shown(timeout)
        );
        r.error(line(&st.timeout), &timeout_path, message);
    }
    let on_error = *r
        .opt(&st.on_error, &child(path, "on_error"))
        .unwrap_or(&OnError::Allow);
    let mode = *r
        .opt(&st.mode, &child(path, "mode"))
        .unwrap_or(&Mode::Exact);
    let lease = r.opt(&st.lease, &child(path, "lease")).map(|l| l.get());
    if lease.is_some() && mode != Mode::Batched {
        let message = "lease only applies to mode: batched";
        r.error(line(&st.lease), &child(path, "lease"), message);
    }
    let prefix_path = child(path, "key_prefix");
    let key_prefix = r
        .opt(&st.key_prefix, &prefix_path)
        .cloned()
        .unwrap_or_else(|| DEFAULT_KEY_PREFIX.to_string());
    if key_prefix.len() > 64
        || key_prefix
            .bytes()
            .any(|b| !b.is_ascii_graphic() || b == b'{' || b == b'}')
    {
        let message = format!(
            "`{key_prefix}`: at most 64 visible ASCII characters, without {{ or }} (Cluster hash tags)"
        );
        r.error(line(&st.key_prefix), &prefix_path, message);
    }
    Some(RateLimitStoreConf {
        name: Arc::from(name?.as_str()),
        target: target?,
        tls,
        ca_pem,
        ca_file,
        password,
        timeout,
        on_error,
        mode,
        lease: lease.unwrap_or(DEFAULT_LEASE),
        key_prefix,
    })
}

/// A duration as the file would write it.
fn shown(d: Duration) -> String {
    match (d.subsec_nanos(), d.as_secs()) {
        (0, s) => format!("{s}s"),
        (n, 0) if n % 1_000_000 == 0 => format!("{}ms", n / 1_000_000),
        _ => format!("{d:?}"),
    }
}

fn pem_has_certificate(pem: &[u8]) -> bool {
    use rustls_pki_types::pem::PemObject;
    rustls_pki_types::CertificateDer::pem_slice_iter(pem).any(|c| c.is_ok())
}

fn redis_target(r: &mut Report, nodes: &Nodes, path: &str) -> Option<RedisTarget> {
    match &nodes.value {
        Err(message) => {
            r.error(Some(nodes.line), path, message.clone());
            None
        }
        Ok(NodesValue::One(url)) => {
            let ok = check_url(url, false).map_err(|m| r.error(Some(nodes.line), path, m));
            ok.ok().map(|()| RedisTarget::Server(Secret(url.clone())))
        }
        Ok(NodesValue::Many(list)) => {
            if list.is_empty() {
                r.error(Some(nodes.line), path, "a Cluster needs at least one node");
                return None;
            }
            let mut out = Vec::new();
            for (i, (line, url)) in list.iter().enumerate() {
                let at = format!("{path}[{i}]");
                match url
                    .as_ref()
                    .map_err(Clone::clone)
                    .and_then(|u| check_url(u, true))
                {
                    Ok(()) => out.extend(url.clone().ok().map(Secret)),
                    Err(message) => r.error(Some(*line), &at, message),
                }
            }
            (out.len() == list.len()).then_some(RedisTarget::Cluster(out))
        }
    }
}

/// A URL redis-rs accepts; for a Cluster node, TCP only and database 0 (a Cluster has no
/// other). The URL itself never goes into a message: it may hold a password.
fn check_url(url: &str, cluster: bool) -> Result<(), String> {
    use redis::IntoConnectionInfo;
    let scheme = url.split_once("://").map_or("", |(s, _)| s);
    let allowed: &[&str] = match cluster {
        true => &["redis", "rediss"],
        false => &["redis", "rediss", "unix", "redis+unix"],
    };
    if !allowed.contains(&scheme) {
        return Err(format!(
            "not a Redis URL: it must start with {}",
            allowed
                .iter()
                .map(|s| format!("{s}://"))
                .collect::<Vec<_>>()
                .join(", ")
        ));
    }
    if url.contains('#') {
        return Err("no #fragment (#insecure would turn certificate checks off)".into());
    }
    let info = url.into_connection_info().map_err(|e| {
        format!(
            "not a valid Redis URL: {}",
            e.detail().unwrap_or("malformed")
        )
    })?;
    if cluster && info.redis_settings().db() != 0 {
        return Err("a Redis Cluster has only database 0".into());
    }
    if let redis::ConnectionAddr::Tcp(host, _) | redis::ConnectionAddr::TcpTls { host, .. } =
        info.addr()
    {
        if host.is_empty() {
            return Err("not a valid Redis URL: no host".into());
        }
    }
    Ok(())
}

/// `routes[i].policies.rate_limit`: every rule checked against the stores; two rules with the
/// same key and rate are refused (their names, which `RateLimit-Policy` shows, would clash).
pub fn rules(
    r: &mut Report,
    list: &List<Sect<RuleSchema>>,
    path: &str,
    stores: &[Arc<RateLimitStoreConf>],
) -> Vec<RateLimitRule> {
    let mut out: Vec<(usize, RateLimitRule)> = Vec::new();
    let items = r.list(list, path);
    if items.len() > MAX_RULES {
        let message = format!(
            "{} rules; a route may have at most {MAX_RULES}",
            items.len()
        );
        r.error(Some(list.line), path, message);
    }
    for (i, (at, s)) in items.into_iter().enumerate() {
        let Some(new) = rule(r, s, &at, stores) else {
            continue;
        };
        if let Some((j, _)) = out
            .iter()
            .find(|(_, x)| x.key == new.key && x.rate == new.rate)
        {
            let message = format!("has the same key and rate as {path}[{j}]");
            r.error(Some(s.line), &at, message);
        } else {
            out.push((i, new));
        }
    }
    out.into_iter().map(|(_, rule)| rule).collect()
}

fn rule(
    r: &mut Report,
    s: &Sect<RuleSchema>,
    path: &str,
    stores: &[Arc<RateLimitStoreConf>],
) -> Option<RateLimitRule> {
    let ru = r.sect(s, path)?;
    let key = r.required(&ru.key, s.line, &child(path, "key")).cloned();
    let rate = r.required(&ru.rate, s.line, &child(path, "rate")).copied();
    let burst = r.opt(&ru.burst, &child(path, "burst")).map(|b| b.0 as u64);
    let store_path = child(path, "store");
    let store = match r.opt(&ru.store, &store_path).map(String::as_str) {
        None | Some(LOCAL) => Some(RuleStore::Local),
        Some(name) => match stores.iter().find(|s| &*s.name == name) {
            Some(s) => Some(RuleStore::Shared(s.clone())),
            None => {
                let mut names = vec![LOCAL.to_string()];
                names.extend(stores.iter().map(|s| s.name.to_string()));
                let message = format!(
                    "unknown store `{name}` (stores: {}; shared ones are defined in \
                     rate_limit_stores)",
                    names.join(", ")
                );
                r.error(line(&ru.store), &store_path, message);
                None
            }
        },
    };
    let max_keys = r
        .opt(&ru.max_keys, &child(path, "max_keys"))
        .map_or(DEFAULT_MAX_KEYS, |m| m.get());
    let headers = *r.opt(&ru.headers, &child(path, "headers")).unwrap_or(&true);
    let rate = rate?;
    let burst = burst.unwrap_or(rate.count);
    // The bucket's depth in time must stay in range of the clocks' arithmetic (and of sense).
    let depth = rate.interval().as_secs_f64() * burst as f64;
    if depth > 366.0 * 86_400.0 {
        let message =
            format!("burst {burst} at {rate} is more than a year of requests; lower the burst");
        r.error(line(&ru.burst), &child(path, "burst"), message);
        return None;
    }
    Some(RateLimitRule {
        key: key?,
        rate,
        burst,
        store: store?,
        max_keys,
        headers,
    })
}

#[cfg(test)]
mod tests;

#[cfg(test)]
mod file_tests;
