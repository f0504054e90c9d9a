//! Upstreams: merge the endpoint sets of their services, apply weights, keep the balancer current.
//!
//! Discovery pushes: when the store reports changed services, only the upstreams that name one of
//! them are rebuilt, and each swaps its new selection in atomically. Nothing here runs on the
//! request path except [`Upstream::pick`].
//!
//! The folder: `balance` (smooth weighted selection), `rebuild` (store → selection and traffic
//! plan), `built` (what a rebuild keeps for the next), `policy` (failover tiers, zones,
//! consistent hashing, least request), `health_check` (active probes), `outlier` (passive
//! ejection), `pool` (HTTP/1.1 connections to Pods, shared by requests and probes), `h2_pool`
//! (multiplexed h2 connections to Pods).

pub mod balance;
mod built;
pub mod h2_pool;
pub mod health_check;
pub mod outlier;
pub mod policy;
pub mod pool;
mod rebuild;

use crate::config::{Scheme, UpstreamConf};
use crate::upstream::balance::{Backend, BackendInfo, Balancer, Segment, Selection};
use built::{Built, BuiltService, Had};
use outlier::Health;
use podgate_discovery::{Endpoint, ServiceKey, ServiceState, Store};
use policy::{zones, Key, Picked, RequestParts, SlotInput, Traffic, ZonePart};
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// The per-thread maps keyed by Pod address or balancer id, looked up on every request: foldhash
/// instead of SipHash (keys come from the config and discovery, never from clients).
pub(crate) type PodMap<K, V> = HashMap<K, V, foldhash::fast::RandomState>;

/// What an upstream's last rebuild found for one of its services (for the admin view and logs).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ServiceView {
    /// Shared, so that a rebuild reuses an unchanged service's endpoints without copying them.
    pub endpoints: Arc<Vec<Endpoint>>,
    /// The store entry these endpoints were resolved from: while the store hands out the same
    /// entry, the service did not change and needs no resolving.
    pub source: Option<Arc<ServiceState>>,
    /// Why nothing could be resolved, e.g. an unknown port; `None` when resolution worked.
    pub problem: Option<String>,
    /// Set while the service is reported empty but its previous endpoints are still used.
    pub emptied_at: Option<Instant>,
}

/// How long a service that had endpoints keeps them after it is reported empty.
///
/// Kubernetes may replace a slice by deleting it and creating another; in between the service
/// looks empty for a moment. Serving the last endpoints for this long bridges that, and a service
/// that really scaled to zero still goes empty soon after.
pub const EMPTY_HOLD: Duration = Duration::from_secs(1);

/// The outcome of [`Upstream::rebuild`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Rebuilt {
    Done,
    /// Rebuild again after this long: a service is held non-empty ([`EMPTY_HOLD`]) or a new
    /// endpoint's weight is still ramping up (slow start).
    Again(Duration),
}

/// How often weights are recomputed while some endpoint ramps up.
pub const RAMP_STEP: Duration = Duration::from_millis(250);

pub struct Upstream {
    pub conf: Arc<UpstreamConf>,
    balancer: Balancer,
    /// Per service entry (same order as `conf.services`); written on rebuilds only.
    views: Mutex<Vec<ServiceView>>,
    /// The CA of `tls.ca_file`, parsed once.
    pub ca: Option<Arc<pingora_core::protocols::tls::CaType>>,
    /// Separates pooled connections by trust anchor: pingora's pool key covers SNI and the
    /// verify flags but not the CA, so without it a connection verified against one upstream's
    /// CA could be reused by an upstream that trusts a different one.
    pub pool_group: u64,
    pub metrics: crate::telemetry::metrics::UpstreamMetrics,
    /// Opens and pools connections to the Pods (podgate's HTTP/1.1 path).
    pub connector: crate::upstream::pool::Connector,
    /// `outlier::now_ms()` until which some ejection may run; 0 when none can.
    eject_horizon: AtomicU64,
    /// Whether some endpoint of the selection fails its active checks (see `recount_down`):
    /// while none does, a pick does not read any endpoint's health record, which at 10k
    /// endpoints is a cache miss per pick (measured: 28 % of a consistent-hash pick).
    checks_down: AtomicBool,
    /// Serialises `recount_down`, so the last count written saw every flip before it.
    recount: Mutex<()>,
    /// What the last rebuild built (see `rebuild`).
    built_services: Mutex<Built>,
    /// Endpoints per cluster and state as of the last rebuild (see `refresh_state_gauges`).
    endpoint_gauges: Mutex<Vec<(String, [i64; 4])>>,
    /// Whether a first rebuild happened (endpoints found later are newcomers for slow start).
    built: AtomicBool,
    /// Whether a timer thread will rebuild this upstream again.
    timer: AtomicBool,
    /// A reload removed this upstream's name from the config: its metric series are gone, and
    /// a health probe still in flight must not bring one back (`health_check.rs`).
    pub removed: AtomicBool,
    /// Tiers, zones and the balance policy; see `policy`.
    pub traffic: Traffic,
    /// Told after every new selection (pooled h2 connections to Pods that left then drain).
    changed: tokio::sync::watch::Sender<()>,
}

impl Upstream {
    pub fn new(conf: Arc<UpstreamConf>) -> Result<Self, String> {
        let ca = match (&conf.scheme, &conf.tls.ca_file) {
            (Scheme::Https, Some(path)) => Some(load_ca(path)?),
            _ => None,
        };
        let pool_group = ca.as_ref().map_or(0, |certs| {
            use std::hash::{Hash, Hasher};
            let mut h = std::collections::hash_map::DefaultHasher::new();
            for c in certs.iter() {
                c.borrow_raw_cert().hash(&mut h);
            }
            h.finish()
        });
        let mut priorities: Vec<u32> = conf.services.iter().map(|s| s.priority).collect();
        if !conf.nodes.is_empty() {
            priorities.push(0);
        }
        priorities.sort_unstable();
        priorities.dedup();
        if priorities.is_empty() {
            priorities.push(0);
        }
        let traffic = Traffic::new(
            conf.balance.clone(),
            conf.local_zone.as_deref().map(Arc::from),
            priorities,
        );
        let metrics = crate::telemetry::metrics::UpstreamMetrics::new(&conf.name);
        metrics.forget_shares();
        if traffic.is_plain() {
            // One slot that never changes; set here so the family exists from start.
            metrics.set_shares(&[(traffic.priorities[0], ZonePart::All.label(), 1.0)]);
        }
        Ok(Upstream {
            traffic,
            changed: tokio::sync::watch::channel(()).0,
            connector: crate::upstream::pool::Connector::new(&conf)?,
            endpoint_gauges: Mutex::new(Vec::new()),
            built_services: Mutex::new(Built::default()),
            eject_horizon: AtomicU64::new(0),
            checks_down: AtomicBool::new(false),
            recount: Mutex::new(()),
            built: AtomicBool::new(false),
            timer: AtomicBool::new(false),
            removed: AtomicBool::new(false),
            metrics,
            pool_group,
            views: Mutex::new(vec![ServiceView::default(); conf.services.len()]),
            conf,
            balancer: Balancer::default(),
            ca,
        })
    }

    /// The store key of service entry `i`: with its label subset, if it has one, so that two
    /// entries of one Service with different subsets stay apart.
    pub fn key(&self, i: usize) -> ServiceKey {
        let s = &self.conf.services[i];
        ServiceKey::new(s.cluster.clone(), s.namespace.clone(), s.service.clone())
            .with_labels(&s.labels)
    }

    /// The consistent-hash key of `req`, when this upstream hashes and the request has one.
    pub fn hash_key<'r>(&'r self, req: &'r impl RequestParts) -> Option<Key<'r>> {
        match &self.conf.balance {
            crate::config::Balance::ConsistentHash(on) => policy::hash_key(on, req),
            _ => None,
        }
    }

    /// The next backend, avoiding `tried` and ejected ones when another exists: through the
    /// traffic plan (tiers, zones, balance policy), or straight round robin for an upstream with
    /// one tier, no zones and the default policy. `key` is the request's consistent-hash key
    /// ([`Upstream::hash_key`]). Lock-free; reads the clock only while some ejection may still
    /// be running. The second half of the answer counts the request in flight (least request)
    /// until dropped.
    pub fn pick(&self, tried: &[SocketAddr], key: Option<Key<'_>>) -> Option<Picked> {
        let horizon = self.eject_horizon.load(Ordering::Relaxed);
        let now = if horizon == 0 {
            0
        } else {
            let now = outlier::now_ms();
            if now >= horizon {
                // Every ejection has run out: back to the clock-free path.
                let won = self
                    .eject_horizon
                    .compare_exchange(horizon, 0, Ordering::Relaxed, Ordering::Relaxed)
                    .is_ok();
                if won && !self.traffic.is_plain() {
                    // Once per expiry, by one request: the ejected capacity is back.
                    self.replan();
                }
                0
            } else {
                now
            }
        };
        // Health is read only while it can refuse someone: an ejection may run (`now`), or an
        // endpoint fails its active checks.
        let health = now != 0 || self.checks_down.load(Ordering::Relaxed);
        let skip = |b: &Backend| tried.contains(&b.addr) || (health && b.info.health.avoid(now));
        if self.traffic.is_plain() {
            return self.balancer.pick(skip).map(|b| (b, None));
        }
        self.traffic.pick(&self.balancer, key, &skip)
    }

    /// Notes whether any endpoint of the selection is down by active checks; after every new
    /// selection and every check that flipped. O(endpoints), on those events only.
    pub fn recount_down(&self) {
        let _serial = self.recount.lock().unwrap_or_else(|p| p.into_inner());
        let down = self
            .selection()
            .iter()
            .any(|b| b.info.health.active.is_down());
        self.checks_down.store(down, Ordering::Relaxed);
    }

    /// Recomputes the traffic shares after a change of health (active check flip, ejection):
    /// no-op for plain upstreams. O(endpoints).
    pub fn replan(&self) {
        if self.traffic.is_plain() {
            return;
        }
        let plan = self.traffic.replan(&self.balancer, outlier::now_ms());
        self.publish_plan(&plan);
    }

    fn publish_plan(&self, plan: &policy::Plan) {
        let shares: Vec<(u32, &str, f64)> = plan
            .slots
            .iter()
            .map(|s| (s.priority, s.zone.label(), s.share))
            .collect();
        self.metrics.set_shares(&shares);
    }

    /// Records how an attempt on `backend` went (passive ejection).
    pub fn record(&self, backend: &Backend, ok: bool) {
        let conf = &self.conf.outlier;
        if ok {
            backend.info.health.passive.success();
            return;
        }
        if conf.consecutive_failures == 0
            || backend.info.health.passive.failure() < conf.consecutive_failures
        {
            return;
        }
        let now = outlier::now_ms();
        if backend.info.health.passive.is_ejected(now) {
            return;
        }
        let selection = self.selection();
        let ejected = selection
            .iter()
            .filter(|b| b.info.health.passive.is_ejected(now))
            .count();
        if !outlier::may_eject(conf, ejected, selection.len()) {
            log::warn!(
                "upstream {}: {} failed {} times in a row but is not ejected: {ejected} of {} \
                 endpoints already are (max_ejection_percent {})",
                self.conf.name,
                describe(backend),
                conf.consecutive_failures,
                selection.len(),
                conf.max_ejection_percent
            );
            return;
        }
        let took = backend.info.health.passive.eject(conf, now);
        self.eject_horizon
            .fetch_max(now + took.as_millis() as u64, Ordering::Relaxed);
        self.metrics.ejections.inc();
        self.replan();
        log::warn!(
            "upstream {}: ejected {} for {took:?} after {} failures in a row",
            self.conf.name,
            describe(backend),
            conf.consecutive_failures
        );
    }

    /// Ejected endpoints per cluster right now, for the `ejected` endpoint gauge.
    /// Brings the endpoint gauges up to date with what changed since the last rebuild: backends
    /// failing active checks move from `ready` to `unhealthy`, and `ejected` counts passive
    /// ejections. Called when metrics are scraped.
    pub fn refresh_state_gauges(&self) {
        let now = outlier::now_ms();
        let mut counts = match self.endpoint_gauges.lock() {
            Ok(g) => g.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        };
        let mut ejected: Vec<(String, i64)> = counts.iter().map(|(c, _)| (c.clone(), 0)).collect();
        for b in self.selection().iter() {
            let cluster = b.info.cluster.as_deref().unwrap_or("static");
            let Some(i) = counts.iter().position(|(c, _)| c == cluster) else {
                continue;
            };
            if b.info.health.active.is_down() {
                counts[i].1[0] -= 1;
                counts[i].1[2] += 1;
            }
            if b.info.health.passive.is_ejected(now) {
                ejected[i].1 += 1;
            }
        }
        self.metrics.set_endpoints(&counts);
        self.metrics.set_ejected(&ejected);
    }

    pub fn selection(&self) -> Arc<Selection> {
        self.balancer.selection()
    }

    pub fn service_views(&self) -> Vec<ServiceView> {
        self.views.lock().map(|v| v.clone()).unwrap_or_default()
    }
}

fn describe(b: &Backend) -> String {
    match (&b.info.pod, &b.info.cluster) {
        (Some(pod), Some(cluster)) => format!("Pod {pod} ({}, cluster {cluster})", b.addr),
        _ => format!("node {}", b.addr),
    }
}

fn load_ca(path: &std::path::Path) -> Result<Arc<pingora_core::protocols::tls::CaType>, String> {
    use pingora_core::utils::tls::WrappedX509;
    use rustls_pki_types::pem::PemObject;
    use rustls_pki_types::CertificateDer;
    let mut certs = Vec::new();
    for item in CertificateDer::pem_file_iter(path)
        .map_err(|e| format!("cannot read {}: {e}", path.display()))?
    {
        let der = item.map_err(|e| format!("{}: bad PEM: {e}", path.display()))?;
        certs.push(WrappedX509::new(der.to_vec(), |raw| {
            pingora_core::utils::tls::parse_x509(raw)
        }));
    }
    if certs.is_empty() {
        return Err(format!("{} holds no PEM certificate", path.display()));
    }
    Ok(Arc::from(certs.into_boxed_slice()))
}

/// All upstreams of a config, and which of them each watched service feeds.
pub struct Upstreams {
    pub by_name: HashMap<String, Arc<Upstream>>,
    by_key: HashMap<ServiceKey, Vec<Arc<Upstream>>>,
    store: Arc<Store>,
}

impl Upstreams {
    pub fn new(confs: &[Arc<UpstreamConf>], store: Arc<Store>) -> Result<Arc<Self>, String> {
        Self::new_reusing(confs, store, None)
    }

    /// Builds the upstreams of `confs`, taking over from `previous` every upstream whose config
    /// did not change, with its balancer rotation, endpoint view and metrics handles.
    pub fn new_reusing(
        confs: &[Arc<UpstreamConf>],
        store: Arc<Store>,
        previous: Option<&Upstreams>,
    ) -> Result<Arc<Self>, String> {
        let mut by_name = HashMap::new();
        let mut by_key: HashMap<ServiceKey, Vec<Arc<Upstream>>> = HashMap::new();
        for conf in confs {
            let kept = previous
                .and_then(|p| p.by_name.get(&conf.name))
                .filter(|old| *old.conf == **conf)
                .cloned();
            let up = match kept {
                Some(up) => up,
                None => Arc::new(
                    Upstream::new(conf.clone())
                        .map_err(|e| format!("upstream {}: {e}", conf.name))?,
                ),
            };
            for i in 0..conf.services.len() {
                let list = by_key.entry(up.key(i)).or_default();
                if !list.iter().any(|u| Arc::ptr_eq(u, &up)) {
                    list.push(up.clone());
                }
            }
            by_name.insert(conf.name.clone(), up);
        }
        let this = Arc::new(Upstreams {
            by_name,
            by_key,
            store,
        });
        this.rebuild_all();
        Ok(this)
    }

    /// Rebuilds every upstream from the store.
    pub fn rebuild_all(&self) {
        for up in self.by_name.values() {
            self.rebuild(up);
        }
    }

    /// Whether `up` is one of these upstreams (the same object, not just the same name).
    pub fn contains(&self, up: &Arc<Upstream>) -> bool {
        self.by_name
            .get(&up.conf.name)
            .is_some_and(|mine| Arc::ptr_eq(mine, up))
    }

    /// Rebuilds `up`, and keeps rebuilding it while it asks to (an empty hold running out, a
    /// slow start ramping), from one timer thread per upstream at most.
    fn rebuild(&self, up: &Arc<Upstream>) {
        let Rebuilt::Again(mut wait) = up.rebuild(&self.store) else {
            return;
        };
        if up.timer.swap(true, Ordering::AcqRel) {
            return; // a timer already runs and will rebuild again
        }
        let (up, store) = (up.clone(), self.store.clone());
        // A plain thread: listeners are called from sources' own threads and tasks, with no
        // runtime guaranteed; timers are rare (a service losing its last endpoint, a new Pod
        // ramping up) and short.
        std::thread::spawn(move || loop {
            std::thread::sleep(wait);
            match up.rebuild(&store) {
                Rebuilt::Again(next) => wait = next,
                Rebuilt::Done => {
                    up.timer.store(false, Ordering::Release);
                    return;
                }
            }
        });
    }

    /// Every service some upstream names: what discovery has to watch.
    pub fn watched(&self) -> Vec<ServiceKey> {
        let mut keys: Vec<_> = self.by_key.keys().cloned().collect();
        keys.sort();
        keys
    }
}

impl podgate_discovery::Listener for Upstreams {
    fn changed(&self, keys: &[ServiceKey]) {
        let mut done: Vec<*const Upstream> = Vec::new();
        for key in keys {
            for up in self.by_key.get(key).into_iter().flatten() {
                if !done.contains(&Arc::as_ptr(up)) {
                    done.push(Arc::as_ptr(up));
                    self.rebuild(up);
                }
            }
        }
    }
}

impl pool::Members for Upstream {
    fn has(&self, addr: &SocketAddr) -> bool {
        self.selection().find(addr).is_some()
    }

    fn changes(&self) -> tokio::sync::watch::Receiver<()> {
        self.changed.subscribe()
    }
}
