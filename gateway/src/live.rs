//! What the running gateway is made of, and how a new config replaces it without a restart.
//!
//! [`Live`] owns the discovery store, the cluster sources feeding it, the upstreams built from it
//! and the router. A reload validates the new file first; only a fully valid file changes
//! anything, and then: new clusters are read before anything switches (a failure leaves the old
//! config running), upstreams whose config is unchanged are carried over with their endpoints and
//! rotation, the router is swapped atomically, and clusters no longer named are stopped last.

use crate::config::{self, Cluster, ClusterKind, Config};
use crate::policies::{Identities, Policies, TrustedProxies};
use crate::proxy::routing::Route;
use crate::proxy::{GatewayRoute, GatewayRouter, Target};
use crate::telemetry::metrics::RouteMetrics;
use crate::upstream::Upstreams;
use arc_swap::ArcSwap;
use async_trait::async_trait;
use pingora_core::server::ShutdownWatch;
use pingora_core::services::background::BackgroundService;
use podgate_discovery::{
    Access, KubeCluster, KubeGuard, Listener, ManifestsCluster, ServiceKey, Store, WatchGuard,
    WatchSpec,
};
use prometheus::{register_int_counter_vec, IntCounterVec};
use std::collections::BTreeMap;
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, LazyLock, Mutex};
use std::time::Duration;
use std::time::{Instant, SystemTime};

static RELOADS: LazyLock<IntCounterVec> = LazyLock::new(|| {
    register_int_counter_vec!(
        "podgate_config_reloads_total",
        "Config reloads by result (success, failure).",
        &["result"]
    )
    .expect("metric registers once")
});

static PROPAGATION: LazyLock<prometheus::Histogram> = LazyLock::new(|| {
    prometheus::register_histogram!(
        "podgate_discovery_propagation_seconds",
        "From a changed service reaching the discovery store to its upstreams' new selection \
         being live.",
        vec![0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25]
    )
    .expect("metric registers once")
});

/// A running discovery source.
pub enum Source {
    Manifests {
        cluster: Arc<ManifestsCluster>,
        /// Keeps the folder watched; `None` until [`Live::watch`] ran.
        guard: Option<WatchGuard>,
    },
    Kube {
        cluster: Arc<KubeCluster>,
        /// Keeps the watches running; `None` until [`Live::watch`] ran inside the runtime.
        guard: Option<KubeGuard>,
        /// The services (and label subsets) the guard watches.
        watching: Vec<WatchSpec>,
    },
}

/// How one cluster's discovery is doing, whatever its kind (for `/upstreams` and `/metrics`).
#[derive(Clone, Debug)]
pub struct ClusterStatus {
    pub name: Arc<str>,
    pub kind: &'static str,
    /// The last exchange with the source worked.
    pub connected: bool,
    /// The first complete read is done.
    pub synced: bool,
    pub last_sync: Option<SystemTime>,
    pub events: u64,
    pub relists: u64,
    pub errors_by_reason: BTreeMap<String, u64>,
    pub last_error: Option<String>,
}

struct RunningCluster {
    conf: Cluster,
    source: Source,
}

/// Forwards store notifications to whatever upstreams are current.
struct Forward(Arc<ArcSwap<Upstreams>>);

impl Listener for Forward {
    fn changed(&self, keys: &[ServiceKey]) {
        let start = Instant::now();
        self.0.load().changed(keys);
        PROPAGATION.observe(start.elapsed().as_secs_f64());
    }
}

pub struct Live {
    pub store: Arc<Store>,
    pub router: Arc<ArcSwap<GatewayRouter>>,
    upstreams: Arc<ArcSwap<Upstreams>>,
    clusters: Mutex<Vec<RunningCluster>>,
    config: ArcSwap<Config>,
    /// One reload at a time.
    reloading: Mutex<()>,
    /// The consumers and JWT providers the current routes use (reloads only).
    identities: Mutex<CurrentIdentities>,
    /// The zone learned from the node at start-up (zone, source), re-applied to every reloaded
    /// config; see `server::node_zone`.
    node_zone: Mutex<Option<(Option<String>, String)>>,
    started: Instant,
}

fn start_cluster(c: &Cluster, store: &Arc<Store>) -> Result<Source, String> {
    match &c.kind {
        ClusterKind::Manifests(dir) => {
            let cluster = ManifestsCluster::load(&c.name, dir, store.clone())
                .map_err(|e| format!("cluster {}: {e}", c.name))?;
            Ok(Source::Manifests {
                cluster,
                guard: None,
            })
        }
        ClusterKind::Kube(access) => Ok(Source::Kube {
            cluster: KubeCluster::new(&c.name, access.clone(), store.clone())
                .map_err(|e| format!("cluster {}: {e}", c.name))?,
            guard: None,
            watching: Vec::new(),
        }),
    }
}

/// The services of `cluster` (each with its label subset) that some upstream of `config` names.
fn services_of(config: &Config, cluster: &str) -> Vec<WatchSpec> {
    let mut out: Vec<WatchSpec> = config
        .upstreams
        .iter()
        .flat_map(|u| u.services.iter())
        .filter(|s| &*s.cluster == cluster)
        .map(|s| {
            WatchSpec::new(s.namespace.clone(), s.service.clone()).with_labels(s.labels.clone())
        })
        .collect();
    out.sort();
    out.dedup();
    out
}

/// The routes of `config` with their policies, over `identities` (the consumers and JWT
/// providers of the same config).
fn build_router(
    config: &Config,
    upstreams: &Upstreams,
    identities: &Arc<Identities>,
) -> GatewayRouter {
    // One set for every route: the client address is decided the same way everywhere.
    let trusted = Arc::new(TrustedProxies::new(&config.server.trusted_proxies));
    let routes = config
        .routes
        .iter()
        .map(|r| {
            let policies = Policies::build(r, identities);
            let route: GatewayRoute = Route {
                name: r.name.clone(),
                path_prefix: r.path_prefix.clone(),
                methods: r.methods.clone(),
                strip_prefix: r.strip_prefix,
                answers_preflights: policies.answers_preflights(),
                upstream: Target {
                    metrics: RouteMetrics::new(&r.name, &r.upstream),
                    upstream: upstreams.by_name[&r.upstream].clone(),
                    policies,
                    trusted: trusted.clone(),
                },
            };
            (r.hosts.clone(), route)
        })
        .collect();
    GatewayRouter::new(routes)
}

/// What [`crate::telemetry::metrics::forget_removed`] keeps: the routes, upstreams and clusters of `config`.
fn known_series(config: &Config) -> crate::telemetry::metrics::Known {
    let mut known = crate::telemetry::metrics::Known::default();
    for r in &config.routes {
        known.routes.insert((r.name.clone(), r.upstream.clone()));
    }
    for u in &config.upstreams {
        known.upstreams.insert(u.name.clone());
        for s in &u.services {
            known
                .clusters
                .insert((u.name.clone(), s.cluster.to_string()));
        }
        if !u.nodes.is_empty() {
            known
                .clusters
                .insert((u.name.clone(), "static".to_string()));
        }
    }
    known
}

/// Creates, at zero, the series that would otherwise appear only with their first observation
/// (no gaps for dashboards and `absent()` alerts).
fn init_series(config: &Config) {
    LazyLock::force(&PROPAGATION);
    for result in ["success", "failure"] {
        RELOADS.with_label_values(&[result]);
    }
    for u in config.upstreams.iter().filter(|u| u.health_check.is_some()) {
        for result in ["success", "failure"] {
            crate::telemetry::metrics::CHECKS.with_label_values(&[u.name.as_str(), result]);
        }
    }
}

/// The consumers and JWT providers of one config, with what they were built from.
struct CurrentIdentities {
    consumers: Vec<config::ConsumerConf>,
    providers: Vec<Arc<config::JwtProviderConf>>,
    identities: Arc<Identities>,
}

impl CurrentIdentities {
    fn start(config: &Config) -> CurrentIdentities {
        CurrentIdentities {
            consumers: config.consumers.clone(),
            providers: config.jwt_providers.clone(),
            identities: Identities::start(config),
        }
    }

    /// The identities for `config`: these when its consumers and providers are the same (their
    /// files stay watched, their remembered JWT verifications stay valid), else new ones read
    /// now; the old ones stop watching when the last route of the old config goes.
    fn for_config(&self, config: &Config) -> Option<CurrentIdentities> {
        let same = self.consumers == config.consumers && self.providers == config.jwt_providers;
        (!same).then(|| CurrentIdentities::start(config))
    }
}

fn same_server_but_proxies(a: &config::ServerSettings, b: &config::ServerSettings) -> bool {
    let mut a = a.clone();
    a.trusted_proxies.clone_from(&b.trusted_proxies);
    a == *b
}

fn warn_insecure(config: &Config) {
    for u in &config.upstreams {
        if u.scheme == config::Scheme::Https && !u.tls.verify {
            log::warn!(
                "upstream {}: tls.verify is false: Pod certificates are not checked, so anyone on \
                 the path to the Pods can impersonate them",
                u.name
            );
        }
    }
}

impl Live {
    /// Reads the discovery sources and builds upstreams and routes; binds nothing and watches
    /// nothing yet (see [`Live::watch`]).
    pub fn start(config: Config) -> Result<Arc<Live>, String> {
        let store = Store::new();
        let mut clusters = Vec::new();
        for c in &config.clusters {
            clusters.push(RunningCluster {
                source: start_cluster(c, &store)?,
                conf: c.clone(),
            });
        }
        warn_insecure(&config);
        let upstreams = Upstreams::new(&config.upstreams, store.clone())?;
        let identities = CurrentIdentities::start(&config);
        let router = build_router(&config, &upstreams, &identities.identities);
        init_series(&config);
        let upstreams = Arc::new(ArcSwap::new(upstreams));
        store.subscribe(Arc::new(Forward(upstreams.clone())));
        Ok(Arc::new(Live {
            store,
            router: Arc::new(ArcSwap::from_pointee(router)),
            upstreams,
            clusters: Mutex::new(clusters),
            config: ArcSwap::from_pointee(config),
            reloading: Mutex::new(()),
            identities: Mutex::new(identities),
            node_zone: Mutex::new(None),
            started: Instant::now(),
        }))
    }

    /// Starts following changes of every source that is not followed yet, and restarts the
    /// watches of a Kubernetes cluster whose set of named services changed. Kubernetes watches
    /// need the runtime: outside one they wait for the next call from inside it.
    pub fn watch(&self) {
        let config = self.config();
        let in_runtime = tokio::runtime::Handle::try_current().is_ok();
        let mut clusters = self.clusters.lock().unwrap_or_else(|p| p.into_inner());
        for rc in clusters.iter_mut() {
            match &mut rc.source {
                Source::Manifests { cluster, guard } if guard.is_none() => match cluster.watch() {
                    Ok(g) => *guard = Some(g),
                    Err(e) => log::error!(
                        "cluster {}: cannot watch the manifests folder, changes will not be \
                         seen: {e}",
                        rc.conf.name
                    ),
                },
                Source::Manifests { .. } => {}
                Source::Kube {
                    cluster,
                    guard,
                    watching,
                } => {
                    let wanted = services_of(&config, &rc.conf.name);
                    if !in_runtime || (guard.is_some() && *watching == wanted) {
                        continue;
                    }
                    // The new watches start before the old ones stop: the store keeps what it
                    // has meanwhile, and services no longer named are simply not updated.
                    let fresh = cluster.start(wanted.clone());
                    *guard = Some(fresh);
                    *watching = wanted;
                }
            }
        }
    }

    /// Ready once every cluster finished its first read, or `server.ready_timeout` after start
    /// (then podgate serves what it has rather than stay out of rotation forever).
    pub fn ready(&self) -> bool {
        self.started.elapsed() >= self.config().server.ready_timeout
            || self.cluster_statuses().iter().all(|c| c.synced)
    }

    /// How each cluster's discovery is doing.
    pub fn cluster_statuses(&self) -> Vec<ClusterStatus> {
        let clusters = self.clusters.lock().unwrap_or_else(|p| p.into_inner());
        clusters
            .iter()
            .map(|rc| match &rc.source {
                Source::Manifests { cluster, .. } => {
                    let s = cluster.status();
                    ClusterStatus {
                        name: rc.conf.name.clone(),
                        kind: "manifests",
                        connected: s.last_error.is_none(),
                        synced: true,
                        last_sync: s.last_reload,
                        events: s.reloads,
                        relists: 0,
                        errors_by_reason: [("parse".to_string(), s.errors)].into(),
                        last_error: s.last_error,
                    }
                }
                Source::Kube { cluster, guard, .. } => {
                    let s = cluster.status();
                    ClusterStatus {
                        name: rc.conf.name.clone(),
                        kind: match rc.conf.kind {
                            ClusterKind::Kube(Access::InCluster) => "in_cluster",
                            ClusterKind::Kube(Access::Server { .. }) => "server",
                            _ => "kubeconfig",
                        },
                        connected: s.connected,
                        synced: guard.is_some() && s.synced,
                        last_sync: s.last_sync,
                        events: s.events,
                        relists: s.relists,
                        errors_by_reason: s.errors_by_reason,
                        last_error: s.last_error,
                    }
                }
            })
            .collect()
    }

    pub fn upstreams(&self) -> Arc<Upstreams> {
        self.upstreams.load_full()
    }

    pub fn config(&self) -> Arc<Config> {
        self.config.load_full()
    }

    /// Keeps the zone learned from the node at start-up for the configs reloads bring.
    pub fn remember_zone(&self, learned: Option<(Option<String>, String)>) {
        *self.node_zone.lock().unwrap_or_else(|p| p.into_inner()) = learned;
    }

    /// Re-reads the config file and applies it; on any error the running config stays.
    /// Returns a one-line summary, or every error.
    pub fn reload(&self) -> Result<String, Vec<String>> {
        let _one = self.reloading.lock().unwrap_or_else(|p| p.into_inner());
        let result = self.try_reload();
        RELOADS
            .with_label_values(&[if result.is_ok() { "success" } else { "failure" }])
            .inc();
        match &result {
            Ok(summary) => log::info!("config reloaded: {summary}"),
            Err(errors) => {
                log::error!(
                    "config reload refused, the running config stays ({} error(s)):",
                    errors.len()
                );
                for e in errors {
                    log::error!("  {e}");
                }
            }
        }
        result
    }

    fn try_reload(&self) -> Result<String, Vec<String>> {
        let old = self.config();
        let mut new = config::load(&old.source)
            .map_err(|errs| errs.0.iter().map(ToString::to_string).collect::<Vec<_>>())?;
        // The node's zone is read at start-up only (a Pod never changes nodes).
        match &*self.node_zone.lock().unwrap_or_else(|p| p.into_inner()) {
            Some((zone, source)) => new.learned_zone(zone.as_deref(), source),
            None => new.learned_zone(
                None,
                "none, all zones get traffic: the node's zone is read at start-up only; \
                 restart podgate to read it",
            ),
        }
        for (what, changed) in [
            ("listeners", new.listeners != old.listeners),
            ("admin", new.admin != old.admin),
            // Trusted proxies apply with the new routes; the rest of `server` does not.
            ("server", !same_server_but_proxies(&new.server, &old.server)),
            ("access_log", new.access_log != old.access_log),
        ] {
            if changed {
                log::warn!("config reload: `{what}` changed; that takes a restart to apply");
            }
        }

        // New or changed clusters are read before anything switches.
        let mut started: Vec<RunningCluster> = Vec::new();
        {
            let running = self.clusters.lock().unwrap_or_else(|p| p.into_inner());
            for c in &new.clusters {
                if running.iter().any(|rc| rc.conf == *c) {
                    continue;
                }
                let source = start_cluster(c, &self.store).map_err(|e| vec![e])?;
                started.push(RunningCluster {
                    conf: c.clone(),
                    source,
                });
            }
        }

        warn_insecure(&new);
        let previous = self.upstreams();
        let upstreams = Upstreams::new_reusing(&new.upstreams, self.store.clone(), Some(&previous))
            .map_err(|e| vec![e])?;
        let kept = upstreams
            .by_name
            .values()
            .filter(|u| previous.contains(u))
            .count();
        let mut identities = self.identities.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(fresh) = identities.for_config(&new) {
            *identities = fresh;
        }
        let router = build_router(&new, &upstreams, &identities.identities);
        drop(identities);
        self.upstreams.store(upstreams.clone());
        // Events that reached the previous upstreams between building and swapping are caught up.
        upstreams.rebuild_all();
        self.router.store(Arc::new(router));
        // Before the series go: a probe of a removed upstream that ends meanwhile then sees it.
        for (name, up) in &previous.by_name {
            if !upstreams.by_name.contains_key(name) {
                up.removed.store(true, Ordering::SeqCst);
            }
        }
        crate::telemetry::metrics::forget_removed(&known_series(&new));
        init_series(&new);

        // Clusters no longer named (or redefined) stop last, and their services leave the store.
        let (added, mut removed) = (started.len(), 0);
        {
            let mut running = self.clusters.lock().unwrap_or_else(|p| p.into_inner());
            let mut stay = Vec::new();
            for rc in running.drain(..) {
                if new.clusters.contains(&rc.conf) {
                    stay.push(rc);
                } else {
                    removed += 1;
                    let name = rc.conf.name.clone();
                    drop(rc);
                    let replaced = started.iter().any(|s| s.conf.name == name);
                    if !replaced {
                        self.store.reset_cluster(&name, HashMap::new());
                    }
                }
            }
            stay.extend(started);
            *running = stay;
        }
        self.config.store(Arc::new(new));
        self.watch();
        let cfg = self.config();
        Ok(format!(
            "{} route(s), {} upstream(s) ({kept} unchanged), clusters +{added} -{removed}",
            cfg.routes.len(),
            cfg.upstreams.len()
        ))
    }
}

/// Whether the gateway is on its way out; `/readyz` says 503 from the first moment it is.
#[derive(Default)]
pub struct Lifecycle {
    pub(crate) draining: std::sync::atomic::AtomicBool,
}

impl Lifecycle {
    pub fn draining(&self) -> bool {
        self.draining.load(std::sync::atomic::Ordering::Relaxed)
    }
}

/// Runs the checks of every upstream that has `health_check`, following config reloads.
pub struct Checker(pub Arc<Live>);

#[async_trait]
impl BackgroundService for Checker {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        // Upstream name → (when its next round is due, whether a round is still running).
        let mut due: HashMap<String, (Instant, Arc<AtomicBool>)> = HashMap::new();
        let mut tick = tokio::time::interval(Duration::from_millis(100));
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                _ = shutdown.changed() => return,
            }
            let now = Instant::now();
            for up in self.0.upstreams().by_name.values() {
                let Some(conf) = up.conf.health_check.clone() else {
                    continue;
                };
                let (next, running) = due
                    .entry(up.conf.name.clone())
                    .or_insert_with(|| (now, Arc::new(AtomicBool::new(false))));
                if now < *next || running.swap(true, Ordering::Relaxed) {
                    continue;
                }
                *next = now + conf.interval;
                let (up, running) = (up.clone(), running.clone());
                tokio::spawn(async move {
                    crate::upstream::health_check::round(&up, &conf).await;
                    running.store(false, Ordering::Relaxed);
                });
            }
        }
    }
}

#[cfg(test)]
mod tests;
