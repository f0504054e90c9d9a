//! Wires a validated [`Config`] into a running Pingora server.
//!
//! Order matters: discovery sources are read first (so the first request already sees the Pods),
//! then upstreams are built from what they found and subscribed to later changes, then listeners
//! open. Nothing binds a port before the config and the sources were accepted.

use crate::admin::Admin;
use crate::config::{ClusterKind, Config};
use crate::metrics::RouteMetrics;
use crate::proxy::{Gateway, GatewayRoute, GatewayRouter, Target};
use crate::routing::Route;
use crate::upstream::Upstreams;
use arc_swap::ArcSwap;
use async_trait::async_trait;
use pingora_core::apps::HttpServerOptions;
use pingora_core::listeners::tls::TlsSettings;
use pingora_core::server::configuration::{Opt, ServerConf};
use pingora_core::server::{Server, ShutdownWatch};
use pingora_core::services::background::{background_service, BackgroundService};
use pingora_core::services::listening::Service;
use podgate_discovery::{ManifestsCluster, Store};
use std::sync::Arc;

/// How the process was started, beyond the config file.
#[derive(Clone, Debug, Default)]
pub struct RunOptions {
    /// Take the listening sockets over from a running podgate (zero-downtime binary upgrade).
    pub upgrade: bool,
}

/// Everything built from a config before Pingora takes over.
pub struct Built {
    pub store: Arc<Store>,
    pub upstreams: Arc<Upstreams>,
    pub router: Arc<ArcSwap<GatewayRouter>>,
    pub manifests: Vec<(Arc<str>, Arc<ManifestsCluster>)>,
}

/// Reads the discovery sources and builds upstreams and routes; binds nothing.
pub fn build(config: &Config) -> Result<Built, String> {
    let store = Store::new();
    let mut manifests = Vec::new();
    for c in &config.clusters {
        match &c.kind {
            ClusterKind::Manifests(dir) => {
                let m = ManifestsCluster::load(&c.name, dir, store.clone())
                    .map_err(|e| format!("cluster {}: {e}", c.name))?;
                manifests.push((c.name.clone(), m));
            }
            ClusterKind::Kubeconfig { .. }
            | ClusterKind::InCluster
            | ClusterKind::Server { .. } => {
                return Err(format!(
                    "cluster {}: kind not supported by this build",
                    c.name
                ))
            }
        }
    }
    for u in &config.upstreams {
        if u.scheme == crate::config::Scheme::Https && !u.tls.verify {
            log::warn!(
                "upstream {}: tls.verify is false: Pod certificates are not checked, so anyone on \
                 the path to the Pods can impersonate them",
                u.name
            );
        }
    }
    let upstreams = Upstreams::new(&config.upstreams, store.clone())?;
    store.subscribe(upstreams.clone());
    let routes = config
        .routes
        .iter()
        .map(|r| {
            let upstream = upstreams.by_name[&r.upstream].clone();
            let route: GatewayRoute = Route {
                name: r.name.clone(),
                path_prefix: r.path_prefix.clone(),
                methods: r.methods.clone(),
                strip_prefix: r.strip_prefix,
                upstream: Target {
                    metrics: RouteMetrics::new(&r.name, &r.upstream),
                    upstream,
                },
            };
            (r.hosts.clone(), route)
        })
        .collect();
    Ok(Built {
        store,
        upstreams,
        router: Arc::new(ArcSwap::from_pointee(GatewayRouter::new(routes))),
        manifests,
    })
}

/// Keeps the manifests folders watched for as long as the server runs.
struct Watchers(Vec<Arc<ManifestsCluster>>);

#[async_trait]
impl BackgroundService for Watchers {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        let mut guards = Vec::new();
        for m in &self.0 {
            match m.watch() {
                Ok(g) => guards.push(g),
                Err(e) => {
                    log::error!("cannot watch a manifests folder, changes will not be seen: {e}")
                }
            }
        }
        let _ = shutdown.changed().await;
        drop(guards);
    }
}

/// Runs the gateway until a signal stops it. Returns only on a start-up failure.
pub fn run(config: Config, opts: RunOptions) -> Result<std::convert::Infallible, String> {
    let built = build(&config)?;
    crate::metrics::init_build_info();
    let access_log = crate::access_log::AccessLog::start(&config.access_log)
        .map_err(|e| format!("access_log: cannot open {:?}: {e}", config.access_log))?;

    let mut conf = ServerConf {
        threads: config.server.threads,
        // Pingora would otherwise wait 300 s after SIGTERM; Kubernetes kills at 30 s by default.
        grace_period_seconds: Some(config.server.grace_period.as_secs()),
        graceful_shutdown_timeout_seconds: Some(5),
        // Per-upstream budgets are enforced in the proxy; this is only the ceiling (retries ≤ 10).
        max_retries: 11,
        upgrade_sock: "/tmp/podgate_upgrade.sock".into(),
        pid_file: "/tmp/podgate.pid".into(),
        ..ServerConf::default()
    };
    conf.work_stealing = true;
    let opt = Opt {
        upgrade: opts.upgrade,
        ..Opt::default()
    };
    let mut server = Server::new_with_opt_and_conf(opt, conf);
    server.bootstrap();

    for h2c in [false, true] {
        let listeners: Vec<_> = config.listeners.iter().filter(|l| l.h2c == h2c).collect();
        if listeners.is_empty() {
            continue;
        }
        let gateway = Gateway::new(built.router.clone(), access_log.clone());
        let mut svc = pingora_proxy::http_proxy_service_with_name(
            &server.configuration,
            gateway,
            if h2c { "podgate (h2c)" } else { "podgate" },
        );
        if h2c {
            let mut o = HttpServerOptions::default();
            o.h2c = true;
            if let Some(app) = svc.app_logic_mut() {
                app.server_options = Some(o);
            }
        }
        for l in listeners {
            let addr = l.address.to_string();
            match &l.tls {
                None => svc.add_tcp(&addr),
                Some(tls) => {
                    let mut settings = TlsSettings::intermediate(
                        &tls.cert.to_string_lossy(),
                        &tls.key.to_string_lossy(),
                    )
                    .map_err(|e| format!("listener {addr}: TLS certificate or key: {e}"))?;
                    settings.enable_h2();
                    svc.add_tls_with_settings(&addr, None, settings);
                }
            }
            log::info!(
                "listening on {}://{addr}",
                if l.tls.is_some() { "https" } else { "http" }
            );
        }
        server.add_service(svc);
    }

    let admin = Admin {
        upstreams: built.upstreams.clone(),
        manifests: built.manifests.clone(),
    };
    let mut admin_svc = Service::new(
        "podgate admin".to_string(),
        pingora_core::apps::http_app::HttpServer::new_app(admin),
    );
    admin_svc.add_tcp(&config.admin.address.to_string());
    log::info!("admin on http://{}", config.admin.address);
    server.add_service(admin_svc);

    let watchers = Watchers(built.manifests.iter().map(|(_, m)| m.clone()).collect());
    server.add_service(background_service("manifests watchers", watchers));

    server.run_forever()
}
