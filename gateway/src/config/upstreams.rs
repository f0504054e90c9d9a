//! The validation pass over one upstream: its defaults, its TLS settings, health check, outlier
//! ejection, and the services and static nodes it spreads traffic over (clusters must be defined,
//! Kubernetes names valid, no entry listed twice).

use super::model::*;
use super::names::{check_name, dns1035_label, dns1123_label, label_key, label_value};
use super::report::{child, line, Report};
use super::schema;
use super::units::{BalanceWord, Int};
use super::yaml::{Sect, Val};
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

pub fn upstream(
    r: &mut Report,
    s: &Sect<schema::Upstream>,
    path: &str,
    clusters: &[Cluster],
    zone: &ServerSettings,
    resolve: &dyn Fn(&str) -> PathBuf,
) -> Option<UpstreamConf> {
    let u = r.sect(s, path)?;
    let at = |key| child(path, key);
    let name = r.required(&u.name, s.line, &at("name"));
    if let Some(Err(message)) = name.map(|n| check_name(n)) {
        r.error(line(&u.name), &at("name"), message);
    }
    let scheme = *r.opt(&u.scheme, &at("scheme")).unwrap_or(&Scheme::Http);
    let protocol = *r
        .opt(&u.protocol, &at("protocol"))
        .unwrap_or(&Protocol::Http1);
    // h2 is told apart from HTTP/1.1 by ALPN in the TLS handshake, h2c by prior knowledge: each
    // needs its own scheme, and a mismatch is a mistake better named now than a 502 later.
    let mismatch = match (protocol, scheme) {
        (Protocol::H2, Scheme::Http) => {
            Some("h2 runs over TLS: use scheme: https, or protocol: h2c for HTTP/2 without TLS")
        }
        (Protocol::H2c, Scheme::Https) => {
            Some("h2c is HTTP/2 without TLS: use scheme: http, or protocol: h2 for HTTP/2 over TLS")
        }
        _ => None,
    };
    if let Some(message) = mismatch {
        r.error(line(&u.protocol), &at("protocol"), message);
    }
    let host_header = r.opt(&u.host_header, &at("host_header")).cloned();
    if let Some(h) = &host_header {
        if h.is_empty() || http::HeaderValue::from_str(h).is_err() || h.contains(' ') {
            let message = format!("`{h}` is not a valid Host header value");
            r.error(line(&u.host_header), &at("host_header"), message);
        }
    }
    let mut tls = UpstreamTls {
        sni: None,
        verify: true,
        ca_file: None,
    };
    if let Some(t) = &u.tls {
        if scheme != Scheme::Https {
            let message = "tls settings only apply with scheme: https";
            r.error(Some(t.line), &at("tls"), message);
        }
        if let Some(tf) = r.sect(t, &at("tls")) {
            let at = |key| child(path, &format!("tls.{key}"));
            tls.sni = r.opt(&tf.sni, &at("sni")).cloned();
            if tls.sni.as_deref() == Some("") {
                r.error(
                    line(&tf.sni),
                    &at("sni"),
                    "must not be empty (an empty SNI turns verification off)",
                );
            }
            tls.verify = *r.opt(&tf.verify, &at("verify")).unwrap_or(&true);
            tls.ca_file = r.opt(&tf.ca_file, &at("ca_file")).map(|p| resolve(p));
            if let Some(ca) = &tls.ca_file {
                if !ca.is_file() {
                    let message = format!("file {} does not exist", ca.display());
                    r.error(line(&tf.ca_file), &at("ca_file"), message);
                }
            }
        }
    }
    if scheme == Scheme::Https && tls.verify && tls.sni.is_none() && host_header.is_none() {
        r.error(
            Some(s.line),
            path,
            "scheme https with verification needs a name to verify: set tls.sni or host_header \
             (or tls.verify: false)",
        );
    }
    let tags = match &u.tags {
        Some(t) => r
            .pairs(t, &at("tags"))
            .into_iter()
            .map(|(_, k, v)| (k, v))
            .collect(),
        None => BTreeMap::new(),
    };
    let retries = r
        .opt(&u.retries, &at("retries"))
        .map_or(DEFAULT_RETRIES, |v| v.get());
    let duration = |r: &mut Report, v: &Option<Val<Duration>>, key: &str, default| {
        r.opt(v, &child(path, key)).copied().unwrap_or(default)
    };
    let connect_timeout = duration(
        r,
        &u.connect_timeout,
        "connect_timeout",
        DEFAULT_CONNECT_TIMEOUT,
    );
    let read_timeout = duration(r, &u.read_timeout, "read_timeout", DEFAULT_READ_TIMEOUT);
    for (key, v, d) in [
        ("connect_timeout", &u.connect_timeout, connect_timeout),
        ("read_timeout", &u.read_timeout, read_timeout),
    ] {
        if d.is_zero() {
            r.error(line(v), &at(key), "must be longer than zero");
        }
    }
    let health_check = u
        .health_check
        .as_ref()
        .and_then(|h| health_check(r, h, &at("health_check"), protocol));
    let outlier = outlier(r, u.outlier.as_ref(), &at("outlier"));
    let slow_start = u
        .slow_start
        .as_ref()
        .map(|_| duration(r, &u.slow_start, "slow_start", Duration::ZERO))
        .filter(|d| !d.is_zero());

    let mut services = Vec::new();
    if let Some(list) = &u.services {
        let items = r.list(list, &at("services"));
        if items.len() > MAX_SERVICES_PER_UPSTREAM {
            let message = format!(
                "lists {} services; an upstream takes at most {MAX_SERVICES_PER_UPSTREAM}",
                items.len()
            );
            r.error(Some(list.line), &at("services"), message);
        }
        for (p, item) in items {
            if let Some(svc) = service_ref(r, item, &p, clusters) {
                let dup = services.iter().any(|x: &ServiceRef| {
                    x.cluster == svc.cluster
                        && x.namespace == svc.namespace
                        && x.service == svc.service
                        && x.port == svc.port
                        && x.labels == svc.labels
                });
                if dup {
                    r.error(Some(item.line), &p, "the same service is listed twice");
                }
                services.push(svc);
            }
        }
    }
    let mut nodes: Vec<StaticNode> = Vec::new();
    if let Some(list) = &u.nodes {
        for (p, item) in r.list(list, &at("nodes")) {
            let Some(n) = r.sect(item, &p) else {
                continue;
            };
            let address = r.required(&n.address, item.line, &child(&p, "address"));
            let weight = weight(r, &n.weight, &p);
            if let Some(&address) = address {
                if nodes.iter().any(|x| x.address == address) {
                    r.error(
                        Some(item.line),
                        &p,
                        format!("node {address} is listed twice"),
                    );
                }
                nodes.push(StaticNode { address, weight });
            }
        }
    }
    let balance = balance(r, u, path);
    let zone_aware = *r.opt(&u.zone_aware, &at("zone_aware")).unwrap_or(&false);
    if zone_aware && zone.zone.is_none() && zone.zone_from_node.is_none() {
        let message = "needs server.zone (the zone podgate runs in), or a cluster to learn it \
                       from podgate's node: server.zone_from_node, or an in_cluster cluster";
        r.error(line(&u.zone_aware), &at("zone_aware"), message);
    }
    if u.services.is_none() && u.nodes.is_none() {
        r.error(
            Some(s.line),
            path,
            "needs services (Kubernetes services) or nodes (static addresses), or both",
        );
    }
    Some(UpstreamConf {
        name: name?.clone(),
        scheme,
        protocol,
        host_header,
        tls,
        tags,
        retries,
        connect_timeout,
        read_timeout,
        services,
        nodes,
        outlier,
        health_check,
        slow_start,
        balance,
        zone_aware,
        local_zone: zone.zone.clone().filter(|_| zone_aware),
        // Learned from the node later (`Config::learned_zone`), when not configured.
        zone_source: (zone_aware && zone.zone.is_some()).then(|| "server.zone".to_owned()),
    })
}

/// `balance` and `hash_on`: `hash_on` goes with `consistent_hash` and nothing else.
fn balance(r: &mut Report, u: &schema::Upstream, path: &str) -> Balance {
    let at = |key| child(path, key);
    let hash_on = r.opt(&u.hash_on, &at("hash_on")).cloned();
    let word = match &u.balance {
        None => BalanceWord::RoundRobin,
        // A word that is not a policy is reported by `opt`; nothing more to say about hash_on.
        Some(_) => match r.opt(&u.balance, &at("balance")) {
            Some(w) => *w,
            None => return Balance::RoundRobin,
        },
    };
    if word == BalanceWord::ConsistentHash {
        return match (hash_on, &u.hash_on) {
            (Some(on), _) => Balance::ConsistentHash(on),
            (None, Some(_)) => Balance::RoundRobin, // reported by `opt`
            (None, None) => {
                r.error(
                    line(&u.balance),
                    &at("hash_on"),
                    "is required with balance: consistent_hash (header NAME, cookie NAME, \
                     client_ip or path)",
                );
                Balance::RoundRobin
            }
        };
    }
    if u.hash_on.is_some() {
        let message = "only applies with balance: consistent_hash";
        r.error(line(&u.hash_on), &at("hash_on"), message);
    }
    match word {
        BalanceWord::LeastRequest => Balance::LeastRequest,
        _ => Balance::RoundRobin,
    }
}

fn health_check(
    r: &mut Report,
    s: &Sect<schema::HealthCheck>,
    path: &str,
    protocol: Protocol,
) -> Option<HealthCheckConf> {
    let f = r.sect(s, path)?;
    let at = |key| child(path, key);
    let mut h = HealthCheckConf {
        kind: *r.opt(&f.kind, &at("kind")).unwrap_or(&CheckKind::Http),
        ..HealthCheckConf::default()
    };
    if h.kind == CheckKind::Grpc && !protocol.is_h2() {
        let message = "kind grpc needs protocol: h2 or h2c on this upstream (gRPC is HTTP/2 only)";
        r.error(line(&f.kind), &at("kind"), message);
    }
    if let Some(p) = r.opt(&f.path, &at("path")) {
        if !p.starts_with('/') || p.contains([' ', '\r', '\n']) {
            let message = format!("`{p}` must start with / and hold no spaces");
            r.error(line(&f.path), &at("path"), message);
        }
        h.path = p.clone();
    }
    if let Some(list) = &f.expect {
        let items = r.list(list, &at("expect"));
        let ranges: Vec<(u16, u16)> = items
            .into_iter()
            .filter_map(|(p, v)| r.val(v, &p).map(|s| (s.0, s.1)))
            .collect();
        if !ranges.is_empty() {
            h.expect = ranges;
        }
    }
    h.interval = r
        .opt(&f.interval, &at("interval"))
        .copied()
        .unwrap_or(h.interval);
    h.timeout = r
        .opt(&f.timeout, &at("timeout"))
        .copied()
        .unwrap_or(h.timeout);
    if h.timeout.is_zero() || h.timeout > h.interval {
        r.error(
            line(&f.timeout).or(Some(s.line)),
            &at("timeout"),
            format!(
                "must be above zero and at most the interval ({:?})",
                h.interval
            ),
        );
    }
    if let Some(v) = r.opt(&f.healthy, &at("healthy")) {
        h.healthy = v.get();
    }
    if let Some(v) = r.opt(&f.unhealthy, &at("unhealthy")) {
        h.unhealthy = v.get();
    }
    Some(h)
}

fn outlier(r: &mut Report, s: Option<&Sect<schema::Outlier>>, path: &str) -> OutlierConf {
    let mut o = OutlierConf::default();
    let Some(f) = s.and_then(|s| r.sect(s, path)) else {
        return o;
    };
    let at = |key| child(path, key);
    if let Some(v) = r.opt(&f.consecutive_failures, &at("consecutive_failures")) {
        o.consecutive_failures = v.get();
    }
    o.base_ejection = r
        .opt(&f.base_ejection, &at("base_ejection"))
        .copied()
        .unwrap_or(o.base_ejection);
    if o.base_ejection.is_zero() {
        r.error(
            line(&f.base_ejection),
            &at("base_ejection"),
            "must be longer than zero",
        );
    }
    if let Some(v) = r.opt(&f.max_ejection_percent, &at("max_ejection_percent")) {
        o.max_ejection_percent = v.get();
    }
    o
}

fn weight(r: &mut Report, v: &Option<Val<Int<1, 100>>>, path: &str) -> u32 {
    r.opt(v, &child(path, "weight"))
        .map_or(DEFAULT_WEIGHT, |w| w.get())
}

fn service_ref(
    r: &mut Report,
    s: &Sect<schema::Service>,
    path: &str,
    clusters: &[Cluster],
) -> Option<ServiceRef> {
    let f = r.sect(s, path)?;
    let at = |key| child(path, key);
    let cluster = r
        .required(&f.cluster, s.line, &at("cluster"))
        .and_then(|c| match clusters.iter().find(|x| *x.name == **c) {
            Some(x) => Some(x.name.clone()),
            None => {
                let known: Vec<&str> = clusters.iter().map(|c| &*c.name).collect();
                let known = match known.is_empty() {
                    true => "none defined".to_string(),
                    false => known.join(", "),
                };
                let message = format!("unknown cluster `{c}` (clusters: {known})");
                r.error(line(&f.cluster), &at("cluster"), message);
                None
            }
        });
    let namespace = r
        .opt(&f.namespace, &at("namespace"))
        .cloned()
        .unwrap_or_else(|| "default".into());
    if let Err(why) = dns1123_label(&namespace) {
        let message = format!("`{namespace}` is not a valid namespace: {why}");
        r.error(line(&f.namespace), &at("namespace"), message);
    }
    let service = r.required(&f.service, s.line, &at("service"));
    if let Some(name) = service {
        if let Err(why) = dns1035_label(name) {
            let message = format!("`{name}` is not a valid service name: {why}");
            r.error(line(&f.service), &at("service"), message);
        }
    }
    let port = match &f.port {
        None => {
            let message = "is required (a Service port number or name)";
            r.error(Some(s.line), &at("port"), message);
            None
        }
        Some(p) => r.val(p, &at("port")).cloned(),
    };
    let weight = weight(r, &f.weight, path);
    let priority = r.opt(&f.priority, &at("priority")).map_or(0, |p| p.get());
    let mut labels: BTreeMap<String, String> = BTreeMap::new();
    if let Some(pairs) = &f.labels {
        for (key_line, key, value) in r.pairs(pairs, &at("labels")) {
            let at = child(&at("labels"), &key);
            let mut ok = true;
            if let Err(why) = label_key(&key) {
                let message = format!("`{key}` is not a valid label key: {why}");
                r.error(Some(key_line), &at, message);
                ok = false;
            }
            if let Err(why) = label_value(&value) {
                let message = format!("`{value}` is not a valid label value: {why}");
                r.error(Some(key_line), &at, message);
                ok = false;
            }
            if ok {
                labels.insert(key, value);
            }
        }
    }
    Some(ServiceRef {
        cluster: cluster?,
        namespace,
        service: service?.clone(),
        port: port?,
        weight,
        priority,
        labels,
    })
}
