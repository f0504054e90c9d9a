//! The validation pass over the whole file: from the typed [`schema::File`] to a [`Config`],
//! reporting every mistake to the [`Report`] and going on. Here live the checks serde cannot
//! express: defaults, required keys, files and folders that must exist, names that must be unique
//! or must refer to something defined, and rules across fields. Upstreams are in `upstreams.rs`.

use super::identities;
use super::model::*;
use super::names::{check_host, check_name, label_value};
use super::policies;
use super::report::{child, line, Report};
use super::schema;
use super::units::Resolve;
use super::upstreams;
use super::yaml::{Sect, Val};
use podgate_discovery::Access;
use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

pub fn config(r: &mut Report, file: &schema::File, line_of_file: usize, base: &Path) -> Config {
    let resolve = |p: &str| -> PathBuf {
        let p = PathBuf::from(p);
        if p.is_absolute() {
            p
        } else {
            base.join(p)
        }
    };
    let resolve: Resolve = &resolve;

    let listener_items = match &file.listeners {
        Some(l) => r.list(l, "listeners"),
        None => Vec::new(),
    };
    if listener_items.is_empty() {
        let at = file.listeners.as_ref().map_or(line_of_file, |l| l.line);
        r.error(Some(at), "listeners", "needs at least one listener");
    }
    let listeners: Vec<Listener> = listener_items
        .into_iter()
        .filter_map(|(path, l)| listener(r, l, &path, resolve))
        .collect();
    let mut seen = HashSet::new();
    for l in &listeners {
        if !seen.insert(l.address) {
            let at = file.listeners.as_ref().map(|l| l.line);
            r.error(
                at,
                "listeners",
                format!("address {} is used twice", l.address),
            );
        }
    }

    let admin = admin(r, file.admin.as_ref(), resolve);
    if listeners.iter().any(|l| l.address == admin.address) {
        let at = file.admin.as_ref().map(|a| a.line);
        r.error(
            at,
            "admin.address",
            "must differ from every listener address",
        );
    }
    let server = server(r, file.server.as_ref(), resolve);

    let mut clusters: Vec<Cluster> = Vec::new();
    let items = file.clusters.as_ref().map(|l| r.list(l, "clusters"));
    for (path, c) in items.unwrap_or_default() {
        let Some(new) = cluster(r, c, &path, resolve) else {
            continue;
        };
        if clusters.iter().any(|x| x.name == new.name) {
            let message = format!("duplicate cluster name `{}`", new.name);
            r.error(Some(c.line), &child(&path, "name"), message);
        } else {
            clusters.push(new);
        }
    }

    let mut server = server;
    server.zone_from_node = zone_from_node(r, file.server.as_ref(), &server, &clusters);

    let mut upstreams: Vec<Arc<UpstreamConf>> = Vec::new();
    let items = file.upstreams.as_ref().map(|l| r.list(l, "upstreams"));
    for (path, u) in items.unwrap_or_default() {
        if let Some(new) = upstreams::upstream(r, u, &path, &clusters, &server, resolve) {
            if upstreams.iter().any(|x| x.name == new.name) {
                let message = format!("duplicate upstream name `{}`", new.name);
                r.error(Some(u.line), &child(&path, "name"), message);
            } else {
                upstreams.push(Arc::new(new));
            }
        }
    }

    let rate_limit_stores = super::rate_limit::stores(r, file.rate_limit_stores.as_ref(), resolve);
    let consumers = identities::consumers(r, file.consumers.as_ref(), resolve);
    let jwt_providers = identities::jwt_providers(r, file.jwt_providers.as_ref(), resolve);
    let known = policies::Known {
        consumers: &consumers,
        providers: &jwt_providers,
        rate_limit_stores: &rate_limit_stores,
    };

    let mut routes: Vec<RouteConf> = Vec::new();
    let items = file.routes.as_ref().map(|l| r.list(l, "routes"));
    for (path, s) in items.unwrap_or_default() {
        let Some(new) = route(r, s, &path, &upstreams, &known) else {
            continue;
        };
        if routes.iter().any(|x| x.name == new.name) {
            let message = format!("duplicate route name `{}`", new.name);
            r.error(Some(s.line), &child(&path, "name"), message);
        } else if let Some(other) = routes.iter().find(|x| {
            x.path_prefix == new.path_prefix
                && x.hosts == new.hosts
                && x.methods.iter().any(|m| new.methods.contains(m))
        }) {
            let message = format!(
                "matches the same hosts, path_prefix and methods as route `{}`",
                other.name
            );
            r.error(Some(s.line), &path, message);
        } else {
            routes.push(new);
        }
    }

    let access_log = access_log(r, file.access_log.as_ref(), resolve);
    Config {
        access_log,
        source: PathBuf::new(),
        listeners,
        admin,
        server,
        clusters,
        upstreams,
        routes,
        consumers,
        jwt_providers,
        rate_limit_stores,
    }
}

fn listener(
    r: &mut Report,
    s: &Sect<schema::Listener>,
    path: &str,
    resolve: Resolve,
) -> Option<Listener> {
    let l = r.sect(s, path)?;
    let address = r.required(&l.address, s.line, &child(path, "address"));
    let tls = l.tls.as_ref().and_then(|t| {
        let path = child(path, "tls");
        let tls = r.sect(t, &path)?;
        let file = |r: &mut Report, v: &Option<Val<String>>, key: &str| {
            let path = child(&path, key);
            let file = resolve(r.required(v, t.line, &path)?);
            if !file.is_file() {
                let message = format!("file {} does not exist", file.display());
                r.error(line(v), &path, message);
            }
            Some(file)
        };
        let cert = file(r, &tls.cert, "cert");
        let key = file(r, &tls.key, "key");
        Some(ListenerTls {
            cert: cert?,
            key: key?,
        })
    });
    let h2c = *r.opt(&l.h2c, &child(path, "h2c")).unwrap_or(&false);
    if h2c && l.tls.is_some() {
        r.error(
            line(&l.h2c),
            &child(path, "h2c"),
            "h2c is for plain listeners; TLS listeners offer h2 by ALPN already",
        );
    }
    Some(Listener {
        address: *address?,
        tls,
        h2c,
    })
}

fn access_log(
    r: &mut Report,
    s: Option<&Sect<schema::AccessLog>>,
    resolve: Resolve,
) -> AccessLogSettings {
    use AccessLogSink as Sink;
    let mut settings = AccessLogSettings::default();
    let Some(a) = s.and_then(|s| r.sect(s, "access_log")) else {
        return settings;
    };
    // Checked even when the log is off, so that turning it on later meets no new mistake.
    if let Some(size) = r.opt(&a.buffer, "access_log.buffer") {
        let (min, max) = ACCESS_LOG_BUFFER_RANGE;
        if (min..=max).contains(&size.0) {
            settings.buffer = size.0;
        } else {
            let message = format!(
                "{} bytes is outside the allowed {}KiB..{}MiB",
                size.0,
                min >> 10,
                max >> 20
            );
            r.error(line(&a.buffer), "access_log.buffer", message);
        }
    }
    if let Some(flush) = r.opt(&a.flush, "access_log.flush") {
        let (min, max) = ACCESS_LOG_FLUSH_RANGE;
        if (min..=max).contains(flush) {
            settings.flush = *flush;
        } else {
            let message = format!(
                "{flush:?} is outside the allowed {}ms..{}s",
                min.as_millis(),
                max.as_secs()
            );
            r.error(line(&a.flush), "access_log.flush", message);
        }
    }
    if !*r.opt(&a.enabled, "access_log.enabled").unwrap_or(&true) {
        settings.sink = Sink::Off;
        return settings;
    }
    settings.sink = match r.opt(&a.path, "access_log.path").map(String::as_str) {
        None | Some("stdout" | "-") => Sink::Stdout,
        Some(p) => {
            let path = resolve(p);
            if !path
                .parent()
                .is_some_and(|d| d.as_os_str().is_empty() || d.is_dir())
            {
                let message = format!("the folder of {} does not exist", path.display());
                r.error(line(&a.path), "access_log.path", message);
            }
            Sink::File(path)
        }
    };
    settings
}

fn admin(r: &mut Report, s: Option<&Sect<schema::Admin>>, resolve: Resolve) -> Admin {
    let default = Admin {
        address: DEFAULT_ADMIN.parse().expect("valid default"),
        token_file: None,
        open_metrics: false,
    };
    let Some(a) = s.and_then(|s| r.sect(s, "admin")) else {
        return default;
    };
    let address = *r
        .opt(&a.address, "admin.address")
        .unwrap_or(&default.address);
    let token_file = r.opt(&a.token_file, "admin.token_file").map(|p| resolve(p));
    if let Some(t) = &token_file {
        let at = line(&a.token_file);
        match std::fs::read_to_string(t) {
            Ok(text) if text.trim().is_empty() => {
                r.error(at, "admin.token_file", format!("{} is empty", t.display()))
            }
            Ok(_) => {}
            Err(e) => r.error(
                at,
                "admin.token_file",
                format!("cannot read {}: {e}", t.display()),
            ),
        }
    }
    let open_metrics = *r
        .opt(&a.open_metrics, "admin.open_metrics")
        .unwrap_or(&false);
    Admin {
        address,
        token_file,
        open_metrics,
    }
}

/// The cluster to learn podgate's zone from (its node's label): `server.zone_from_node`, which
/// must name a Kubernetes cluster, or else the one `in_cluster: true` cluster. `None` when
/// `server.zone` is set (it always wins).
fn zone_from_node(
    r: &mut Report,
    sect: Option<&Sect<schema::Server>>,
    server: &ServerSettings,
    clusters: &[Cluster],
) -> Option<Arc<str>> {
    let given = sect
        .and_then(|s| s.value.as_ref().ok())
        .and_then(|f| f.zone_from_node.as_ref());
    if let Some(v) = given {
        let at = "server.zone_from_node";
        let name = r.val(v, at)?.clone();
        let Some(c) = clusters.iter().find(|c| *c.name == name) else {
            let names: Vec<&str> = clusters.iter().map(|c| &*c.name).collect();
            let message = format!(
                "`{name}` is not a cluster name (clusters: {})",
                if names.is_empty() {
                    "none".to_owned()
                } else {
                    names.join(", ")
                }
            );
            r.error(Some(v.line), at, message);
            return None;
        };
        if !matches!(c.kind, ClusterKind::Kube(_)) {
            let message = format!(
                "cluster `{name}` is a manifests folder, which has no nodes; name a Kubernetes \
                 cluster (kubeconfig, in_cluster or server)"
            );
            r.error(Some(v.line), at, message);
            return None;
        }
        return server.zone.is_none().then(|| c.name.clone());
    }
    if server.zone.is_some() {
        return None;
    }
    let mut in_cluster = clusters
        .iter()
        .filter(|c| c.kind == ClusterKind::Kube(Access::InCluster));
    match (in_cluster.next(), in_cluster.next()) {
        (Some(c), None) => Some(c.name.clone()),
        _ => None,
    }
}

fn server(r: &mut Report, sect: Option<&Sect<schema::Server>>, resolve: Resolve) -> ServerSettings {
    let threads_default = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1);
    let mut s = ServerSettings {
        threads: threads_default,
        grace_period: DEFAULT_GRACE_PERIOD,
        drain_delay: DEFAULT_DRAIN_DELAY,
        upgrade_sock: runtime_path(Path::new(r.file()), "upgrade.sock"),
        pid_file: runtime_path(Path::new(r.file()), "pid"),
        ready_timeout: DEFAULT_READY_TIMEOUT,
        client_header_timeout: DEFAULT_CLIENT_HEADER_TIMEOUT,
        client_body_timeout: DEFAULT_CLIENT_BODY_TIMEOUT,
        keepalive_timeout: DEFAULT_KEEPALIVE_TIMEOUT,
        header_memory: DEFAULT_HEADER_MEMORY,
        zone: None,
        zone_from_node: None,
        trusted_proxies: Vec::new(),
    };
    let Some(f) = sect.and_then(|x| r.sect(x, "server")) else {
        return s;
    };
    let duration = |r: &mut Report, v: &Option<Val<Duration>>, key: &str, default| {
        r.opt(v, &format!("server.{key}"))
            .copied()
            .unwrap_or(default)
    };
    s.ready_timeout = duration(r, &f.ready_timeout, "ready_timeout", DEFAULT_READY_TIMEOUT);
    for (v, key, value, default) in [
        (
            &f.client_header_timeout,
            "client_header_timeout",
            &mut s.client_header_timeout,
            DEFAULT_CLIENT_HEADER_TIMEOUT,
        ),
        (
            &f.client_body_timeout,
            "client_body_timeout",
            &mut s.client_body_timeout,
            DEFAULT_CLIENT_BODY_TIMEOUT,
        ),
    ] {
        *value = duration(r, v, key, default);
        if value.is_zero() {
            r.error(
                line(v),
                &format!("server.{key}"),
                "must be longer than 0s: a client needs some time to send a request",
            );
            *value = default;
        }
    }
    s.keepalive_timeout = duration(
        r,
        &f.keepalive_timeout,
        "keepalive_timeout",
        DEFAULT_KEEPALIVE_TIMEOUT,
    );
    if let Some(size) = r.opt(&f.header_memory, "server.header_memory") {
        const MIN: usize = 64 << 10;
        match size.0 {
            v if v >= MIN => s.header_memory = v,
            v => r.error(
                line(&f.header_memory),
                "server.header_memory",
                format!("{v} bytes is less than the smallest allowed, {MIN}"),
            ),
        }
    }
    if let Some(z) = r.opt(&f.zone, "server.zone") {
        // A Kubernetes label value: what `topology.kubernetes.io/zone` holds.
        match label_value(z) {
            Ok(()) if !z.is_empty() => s.zone = Some(z.clone()),
            Ok(()) => r.error(line(&f.zone), "server.zone", "must not be empty"),
            Err(why) => {
                let message = format!("`{z}` is not a zone name: {why}");
                r.error(line(&f.zone), "server.zone", message);
            }
        }
    }
    s.trusted_proxies = policies::cidrs(r, f.trusted_proxies.as_ref(), "server.trusted_proxies");
    if let Some(p) = r.opt(&f.upgrade_sock, "server.upgrade_sock") {
        s.upgrade_sock = resolve(p);
    }
    if let Some(p) = r.opt(&f.pid_file, "server.pid_file") {
        s.pid_file = resolve(p);
    }
    if let Some(t) = r.opt(&f.threads, "server.threads") {
        s.threads = t.get() as usize;
    }
    s.grace_period = duration(r, &f.grace_period, "grace_period", DEFAULT_GRACE_PERIOD);
    // A short grace period implies a short drain unless one is given.
    let drain_default = DEFAULT_DRAIN_DELAY.min(s.grace_period / 4);
    s.drain_delay = duration(r, &f.drain_delay, "drain_delay", drain_default);
    if s.drain_delay >= s.grace_period {
        r.error(
            line(&f.drain_delay).or(line(&f.grace_period)),
            "server.drain_delay",
            format!(
                "{:?} must be shorter than server.grace_period ({:?}): in-flight requests need \
                 time to finish after listeners close",
                s.drain_delay, s.grace_period
            ),
        );
    }
    s
}

fn cluster(
    r: &mut Report,
    s: &Sect<schema::Cluster>,
    path: &str,
    resolve: Resolve,
) -> Option<Cluster> {
    let c = r.sect(s, path)?;
    let name = r.required(&c.name, s.line, &child(path, "name"));
    if let Some(Err(message)) = name.map(|n| check_name(n)) {
        r.error(line(&c.name), &child(path, "name"), message);
    }
    let kinds = [
        ("manifests", c.manifests.is_some()),
        ("kubeconfig", c.kubeconfig.is_some()),
        ("in_cluster", c.in_cluster.is_some()),
        ("server", c.server.is_some()),
    ];
    let given: Vec<&str> = kinds.iter().filter(|k| k.1).map(|k| k.0).collect();
    if given.len() != 1 {
        let found = match given.is_empty() {
            true => "none".to_string(),
            false => given.join(" and "),
        };
        r.error(
            Some(s.line),
            path,
            format!(
                "give exactly one of manifests, kubeconfig, in_cluster or server (found {found})"
            ),
        );
        return None;
    }
    let kind = given[0];
    for (key, v, owner) in [
        ("context", &c.context, "kubeconfig"),
        ("token_file", &c.token_file, "server"),
        ("ca_file", &c.ca_file, "server"),
    ] {
        if v.is_some() && kind != owner {
            let message = format!("{key} only applies to {owner} clusters");
            r.error(line(v), &child(path, key), message);
        }
    }
    let existing_file = |r: &mut Report, v: &Option<Val<String>>, key: &str| -> Option<PathBuf> {
        let file = resolve(r.opt(v, &child(path, key))?);
        if !file.is_file() {
            let message = format!("file {} does not exist", file.display());
            r.error(line(v), &child(path, key), message);
        }
        Some(file)
    };
    let kind = match kind {
        "manifests" => {
            let dir = resolve(r.opt(&c.manifests, &child(path, "manifests"))?);
            if !dir.is_dir() {
                let message = format!("folder {} does not exist", dir.display());
                r.error(line(&c.manifests), &child(path, "manifests"), message);
            }
            ClusterKind::Manifests(dir)
        }
        "kubeconfig" => ClusterKind::Kube(Access::Kubeconfig {
            path: existing_file(r, &c.kubeconfig, "kubeconfig")?,
            context: r.opt(&c.context, &child(path, "context")).cloned(),
        }),
        "server" => {
            let url = r.opt(&c.server, &child(path, "server"))?.clone();
            if !(url.starts_with("https://") || url.starts_with("http://"))
                || url.parse::<http::Uri>().is_err()
            {
                let message =
                    format!("`{url}` is not an API server URL (e.g. https://10.0.0.1:6443)");
                r.error(line(&c.server), &child(path, "server"), message);
            }
            ClusterKind::Kube(Access::Server {
                url,
                token_file: existing_file(r, &c.token_file, "token_file"),
                ca_file: existing_file(r, &c.ca_file, "ca_file"),
            })
        }
        _ => {
            if !*r
                .opt(&c.in_cluster, &child(path, "in_cluster"))
                .unwrap_or(&false)
            {
                r.error(
                    line(&c.in_cluster),
                    &child(path, "in_cluster"),
                    "in_cluster: false names no cluster; remove the entry or use another kind",
                );
            }
            ClusterKind::Kube(Access::InCluster)
        }
    };
    Some(Cluster {
        name: Arc::from(name?.as_str()),
        kind,
    })
}

fn route(
    r: &mut Report,
    s: &Sect<schema::Route>,
    path: &str,
    upstreams: &[Arc<UpstreamConf>],
    known: &policies::Known,
) -> Option<RouteConf> {
    let route = r.sect(s, path)?;
    let name = r.required(&route.name, s.line, &child(path, "name"));
    if let Some(Err(message)) = name.map(|n| check_name(n)) {
        r.error(line(&route.name), &child(path, "name"), message);
    }
    let mut hosts = Vec::new();
    if let Some(list) = &route.hosts {
        for (p, v) in r.list(list, &child(path, "hosts")) {
            if let Some(host) = r.val(v, &p) {
                match check_host(host) {
                    Ok(()) => hosts.push(host.to_ascii_lowercase()),
                    Err(why) => r.error(Some(v.line), &p, format!("`{host}` {why}")),
                }
            }
        }
    }
    hosts.sort();
    hosts.dedup();
    let path_prefix = r
        .opt(&route.path_prefix, &child(path, "path_prefix"))
        .cloned()
        .unwrap_or_else(|| "/".into());
    if !path_prefix.starts_with('/') || path_prefix.contains(['?', '#', ' ']) {
        r.error(
            line(&route.path_prefix),
            &child(path, "path_prefix"),
            format!("`{path_prefix}` must start with / and hold no ?, # or spaces"),
        );
    }
    let mut methods = Vec::new();
    if let Some(list) = &route.methods {
        for (p, v) in r.list(list, &child(path, "methods")) {
            methods.extend(r.val(v, &p).cloned());
        }
    }
    let strip_prefix = *r
        .opt(&route.strip_prefix, &child(path, "strip_prefix"))
        .unwrap_or(&false);
    let upstream = r.required(&route.upstream, s.line, &child(path, "upstream"));
    if let Some(u) = upstream {
        if !upstreams.iter().any(|x| x.name == *u) {
            let message = format!("unknown upstream `{u}`");
            r.error(line(&route.upstream), &child(path, "upstream"), message);
        }
    }
    let bits = policies::RouteBits {
        strip_prefix,
        strip_line: line(&route.strip_prefix),
        methods: &methods,
    };
    let policies = policies::route_policies(r, route.policies.as_ref(), path, known, &bits);
    Some(RouteConf {
        name: name?.clone(),
        hosts,
        path_prefix,
        methods,
        strip_prefix,
        upstream: upstream?.clone(),
        policies,
    })
}
