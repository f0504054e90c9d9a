//! The `kubeconfig:`, `in_cluster:` and `server:` cluster kinds: a Kubernetes API server, watched.
//!
//! For every watched (namespace, service) two list+watch loops run ([`watch`]): one on the
//! EndpointSlices labelled `kubernetes.io/service-name=<service>`, one on the Service itself
//! (field selector `metadata.name=<service>`), never the legacy Endpoints API. Both feed one
//! [`ServiceState`](crate::ServiceState) that is written to the [`Store`] with [`Store::set`]
//! after every change, once both loops have finished their first list.
//!
//! Each label subset asked for ([`WatchSpec::labels`]) adds a third loop on the Pods of the
//! namespace that have those labels (label selector `k=v,...`, metadata only). Its key
//! ([`ServiceKey::with_labels`](crate::ServiceKey::with_labels)) gets the Service's state with
//! only the endpoints whose `targetRef` names one of those Pods, once all three loops have
//! finished their first list. Pods are watched only for subsets: a Service asked for whole
//! costs no Pod traffic.
//!
//! ```text
//! Access ──KubeCluster::new──> kube Config ──start──> Client ──> per service:
//!     list+watch EndpointSlices ─┐
//!     list+watch Service ────────┴──> ServiceState ──Store::set──> gateway
//!     list+watch Pods with the subset's labels (per subset) ──> ServiceState of the subset
//! ```
//!
//! Failures never remove anything from the store: an unreachable, failing or refusing API server
//! leaves the last known endpoints in place until it answers again (DESIGN: "a watch error never
//! empties an upstream"). Only what the cluster itself says (a DELETED event, or a slice missing
//! from a fresh list) removes an endpoint.

mod access;
mod failure;
mod node;
mod watch;

use access::{check_token_file, load_config};
pub use access::{Access, KubeError};
pub use node::{NodeZoneError, LEGACY_ZONE_LABEL, ZONE_LABEL};

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant, SystemTime};

use ::kube::client::ConfigExt;

use ::kube::Config;

use crate::store::Store;

/// Tuning of a [`KubeCluster`]; [`KubeOptions::default`] is what production uses.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KubeOptions {
    /// Delay before the first retry after an error. Each further consecutive error doubles it,
    /// up to [`KubeOptions::retry_max`], and every delay gets up to 100% random jitter so that
    /// many watches do not retry in lockstep. Default 800 ms, as kube-runtime's
    /// `default_backoff()` and client-go's reflector.
    pub retry_min: Duration,
    /// Upper bound of the doubling retry delay (before jitter). Default 30 s (client-go).
    pub retry_max: Duration,
    /// `timeoutSeconds` asked of each watch; the server then ends the watch and it is resumed
    /// from its last resourceVersion. Each watch uses a random value between 5/6 of this and
    /// this, so that watches do not all restart together (client-go randomises likewise).
    /// A watch that sends nothing for this long plus 30 s is taken for a dead connection.
    /// Default 290 s (kube's default).
    pub watch_timeout: Duration,
    /// Longest wait for a list answer or for a watch to start. Default 60 s.
    pub request_timeout: Duration,
}

impl Default for KubeOptions {
    fn default() -> KubeOptions {
        KubeOptions {
            retry_min: Duration::from_millis(800),
            retry_max: Duration::from_secs(30),
            watch_timeout: Duration::from_secs(290),
            request_timeout: Duration::from_secs(60),
        }
    }
}

/// One thing to watch: a Service, whole or narrowed to the Pods that have all `labels`.
#[derive(Clone, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct WatchSpec {
    /// Namespace of the Service.
    pub namespace: String,
    /// Name of the Service.
    pub service: String,
    /// Pod labels of the subset (valid Kubernetes label keys and values); empty for the whole
    /// Service.
    pub labels: BTreeMap<String, String>,
}

impl WatchSpec {
    /// The whole Service `namespace/service`.
    pub fn new(namespace: impl Into<String>, service: impl Into<String>) -> WatchSpec {
        WatchSpec {
            namespace: namespace.into(),
            service: service.into(),
            labels: BTreeMap::new(),
        }
    }

    /// The same Service narrowed to the Pods that have all `labels`.
    pub fn with_labels(mut self, labels: BTreeMap<String, String>) -> WatchSpec {
        self.labels = labels;
        self
    }
}

/// What a [`KubeCluster`] is doing, for the admin endpoints and readiness.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct KubeStatus {
    /// Every watch's latest exchange with the API server succeeded (and each has had one).
    /// False before the first answer and while any watch is failing.
    pub connected: bool,
    /// [`KubeCluster::start`] was called and every watched service has finished its first list
    /// (its EndpointSlices, its Service and the Pods of each of its label subsets), i.e. every
    /// watched service and subset is in the store.
    pub synced: bool,
    /// When the API server last confirmed that what podgate holds is current: a list completed,
    /// a watch opened, an event or a bookmark arrived. A quiet, healthy cluster stays fresh
    /// through watch renewals (every few minutes) and bookmarks.
    pub last_sync: Option<SystemTime>,
    /// Lists after the first one of each watch (after a 410 Gone, typically).
    pub relists: u64,
    /// ADDED, MODIFIED and DELETED watch events received.
    pub events: u64,
    /// Errors by reason: `unauthorized`, `forbidden`, `not_found`, `gone`, `throttled`,
    /// `rejected` (other 4xx), `server_error` (5xx), `connect` (cannot connect, or the
    /// connection broke), `timeout`, `decode`, `credentials`, `other`.
    pub errors_by_reason: BTreeMap<String, u64>,
    /// The most recent error of a watch that is still failing; `None` once all watches work.
    pub last_error: Option<String>,
    /// (namespace, service) pairs watched.
    pub services: usize,
    /// Of those, how many have finished their first list.
    pub services_synced: usize,
}

impl KubeStatus {
    /// All errors counted, whatever the reason.
    pub fn errors(&self) -> u64 {
        self.errors_by_reason.values().sum()
    }
}

/// One Kubernetes cluster reached through its API server.
pub struct KubeCluster {
    shared: Arc<Shared>,
    config: Config,
    options: KubeOptions,
}

/// What the watch tasks and [`KubeCluster::status`] share.
pub(crate) struct Shared {
    pub(crate) cluster: Arc<str>,
    pub(crate) store: Arc<Store>,
    state: Mutex<Health>,
}

/// Counters and per-watch health behind [`KubeStatus`].
#[derive(Default)]
struct Health {
    started: bool,
    next_id: u64,
    watches: HashMap<u64, WatchHealth>,
    /// One entry per watched (namespace, service) of every live guard: the ids of its watches
    /// (EndpointSlices, Service, then one per label subset on its Pods).
    services: HashMap<u64, ServiceHealth>,
    last_sync: Option<SystemTime>,
    relists: u64,
    events: u64,
    errors_by_reason: BTreeMap<String, u64>,
    error_seq: u64,
    /// When each reason was last logged at error level, to keep a down cluster from flooding.
    last_logged: HashMap<&'static str, Instant>,
    /// Whether any watch was failing after the last change, for the "answering again" log.
    was_failing: bool,
    /// Whether the first complete sync was logged.
    sync_logged: bool,
}

#[derive(Default)]
struct WatchHealth {
    answered: bool,
    failing: bool,
    listed: bool,
    last_error: Option<(u64, String)>,
}

struct ServiceHealth {
    watches: Vec<u64>,
}

/// Errors of the same reason are logged at error level at most this often per cluster; the
/// others go to debug. Counters count them all.
const LOG_EVERY: Duration = Duration::from_secs(60);

impl Shared {
    fn lock(&self) -> std::sync::MutexGuard<'_, Health> {
        // Counters only: a panic mid-update cannot leave anything worth refusing to read.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Health entries for one watched service and its watches: EndpointSlices, Service, then
    /// `subsets` Pod watches.
    fn register_service(&self, subsets: usize) -> (u64, Vec<u64>) {
        let mut h = self.lock();
        let mut next = || {
            h.next_id += 1;
            h.next_id
        };
        let service_id = next();
        let ids: Vec<u64> = (0..2 + subsets).map(|_| next()).collect();
        for id in &ids {
            h.watches.insert(*id, WatchHealth::default());
        }
        h.services.insert(
            service_id,
            ServiceHealth {
                watches: ids.clone(),
            },
        );
        (service_id, ids)
    }

    /// The API server answered this watch's list or watch request.
    pub(crate) fn answered(&self, id: u64) {
        let mut h = self.lock();
        h.last_sync = Some(SystemTime::now());
        if let Some(w) = h.watches.get_mut(&id) {
            w.answered = true;
            w.failing = false;
            w.last_error = None;
        }
        self.log_recovery(&mut h);
    }

    /// A list completed; every list after a watch's first one counts as a relist.
    pub(crate) fn listed(&self, id: u64) {
        let mut h = self.lock();
        let first = match h.watches.get_mut(&id) {
            Some(w) => !std::mem::replace(&mut w.listed, true),
            None => return,
        };
        if !first {
            h.relists += 1;
        }
        h.last_sync = Some(SystemTime::now());
        if first && !h.sync_logged {
            let all = h.services.values().all(|s| {
                s.watches
                    .iter()
                    .all(|id| h.watches.get(id).is_some_and(|w| w.listed))
            });
            if all {
                h.sync_logged = true;
                log::info!(
                    "kube cluster {}: all {} watched services listed",
                    self.cluster,
                    h.services.len()
                );
            }
        }
    }

    pub(crate) fn event(&self) {
        let mut h = self.lock();
        h.events += 1;
        h.last_sync = Some(SystemTime::now());
    }

    /// A bookmark arrived: nothing changed, and the API server said so.
    pub(crate) fn fresh(&self) {
        self.lock().last_sync = Some(SystemTime::now());
    }

    /// Counts and logs an error; `retry` is when the watch tries again (`None`: at once).
    /// A 410 Gone is part of the protocol rather than trouble: counted, but the watch is not
    /// marked failing.
    pub(crate) fn error(
        &self,
        id: u64,
        what: &str,
        failure: &failure::Failure,
        retry: Option<Duration>,
    ) {
        let mut h = self.lock();
        *h.errors_by_reason
            .entry(failure.reason.to_owned())
            .or_default() += 1;
        let failing = failure.reason != "gone";
        h.error_seq += 1;
        let seq = h.error_seq;
        if failing {
            if let Some(w) = h.watches.get_mut(&id) {
                w.failing = true;
                w.last_error = Some((seq, format!("{what}: {}", failure.message)));
            }
            h.was_failing = true;
        }
        let now = Instant::now();
        let loud = failing
            && h.last_logged
                .get(failure.reason)
                .is_none_or(|at| now.duration_since(*at) >= LOG_EVERY);
        let next = match (failing, retry) {
            (true, Some(delay)) => {
                format!("keeping the last known endpoints; retrying in {delay:.1?}")
            }
            (true, None) => "keeping the last known endpoints; retrying".to_owned(),
            (false, Some(delay)) => format!("listing again in {delay:.1?}"),
            (false, None) => "listing again".to_owned(),
        };
        let line = format!(
            "kube cluster {}: {what}: {} [{}]; {next}",
            self.cluster, failure.message, failure.reason
        );
        if loud {
            h.last_logged.insert(failure.reason, now);
            log::error!("{line}");
        } else if failing {
            log::debug!("{line}");
        } else {
            log::info!("{line}");
        }
    }

    fn log_recovery(&self, h: &mut Health) {
        if h.was_failing && !h.watches.values().any(|w| w.failing) {
            h.was_failing = false;
            // The next failure is news again.
            h.last_logged.clear();
            log::info!(
                "kube cluster {}: the API server answers again",
                self.cluster
            );
        }
    }

    fn status(&self) -> KubeStatus {
        let h = self.lock();
        let services_synced = h
            .services
            .values()
            .filter(|s| {
                s.watches
                    .iter()
                    .all(|id| h.watches.get(id).is_some_and(|w| w.listed))
            })
            .count();
        KubeStatus {
            connected: !h.watches.is_empty()
                && h.watches.values().all(|w| w.answered && !w.failing),
            synced: h.started && services_synced == h.services.len(),
            last_sync: h.last_sync,
            relists: h.relists,
            events: h.events,
            errors_by_reason: h.errors_by_reason.clone(),
            last_error: h
                .watches
                .values()
                .filter_map(|w| w.last_error.as_ref())
                .max_by_key(|(seq, _)| *seq)
                .map(|(_, message)| message.clone()),
            services: h.services.len(),
            services_synced,
        }
    }

    /// The client could not be built: `watches` will never run; they show `message`.
    fn setup_error(&self, watches: &[u64], message: String) {
        let mut h = self.lock();
        *h.errors_by_reason.entry("other".to_owned()).or_default() += 1;
        h.error_seq += 1;
        let seq = h.error_seq;
        for id in watches {
            if let Some(w) = h.watches.get_mut(id) {
                w.failing = true;
                w.last_error = Some((seq, message.clone()));
            }
        }
        log::error!("kube cluster {}: {message}", self.cluster);
    }
}

impl KubeCluster {
    /// Reads and checks the access material (kubeconfig, context, token file, CA, client
    /// certificate) now, so that obvious mistakes are reported at start-up; does not contact the
    /// API server. Needs no tokio runtime.
    pub fn new(
        name: &str,
        access: Access,
        store: Arc<Store>,
    ) -> Result<Arc<KubeCluster>, KubeError> {
        KubeCluster::with_options(name, access, store, KubeOptions::default())
    }

    /// [`KubeCluster::new`] with non-default timings (tests use short retry delays).
    pub fn with_options(
        name: &str,
        access: Access,
        store: Arc<Store>,
        options: KubeOptions,
    ) -> Result<Arc<KubeCluster>, KubeError> {
        let mut config = load_config(name, &access)?;
        // kube's own retry layer would retry 429/503/504 inside one request, hiding the error
        // from the counters and stacking its backoff on ours: the watch loop is the retry loop.
        config.default_retry = false;
        if let Some(path) = &config.auth_info.token_file {
            check_token_file(name, Path::new(path))?;
        }
        // From the kubeconfig's proxy-url or HTTPS_PROXY; kube would fail every request on
        // another scheme (socks5 is not built in).
        if let Some(proxy) = &config.proxy_url {
            if !matches!(proxy.scheme_str(), Some("http" | "https")) {
                return Err(KubeError::Url {
                    cluster: name.to_owned(),
                    url: proxy.to_string(),
                    reason: "only http:// and https:// proxies are supported".to_owned(),
                });
            }
        }
        // Builds the TLS client configuration once to check the CA bundle and client
        // certificate. Plain `http://` (a local proxy) has no TLS to check.
        if config.cluster_url.scheme_str() != Some("http") {
            config
                .rustls_client_config()
                .map_err(|source| KubeError::Tls {
                    cluster: name.to_owned(),
                    source,
                })?;
        }
        Ok(Arc::new(KubeCluster {
            shared: Arc::new(Shared {
                cluster: Arc::from(name),
                store,
                state: Mutex::default(),
            }),
            config,
            options,
        }))
    }

    /// Starts watching `services` and returns at once: each (namespace, service) once, however
    /// often listed, with one Pod watch per distinct label subset among its specs. Meant to be
    /// called once per cluster with everything the config needs; a second call while the first
    /// guard lives watches its services again, independently.
    ///
    /// What reaches the store: the whole Service's state under [`ServiceKey::new`] if some spec
    /// has no labels, and each subset's under [`ServiceKey::with_labels`].
    ///
    /// Must be called inside the long-lived tokio runtime: the kube client and one task per
    /// service are spawned on it (panics outside a runtime). A cluster that is down keeps being
    /// retried with backoff and jitter; nothing here ever stops the process. A key's state
    /// reaches the store once all the lists it depends on are done, then after every change.
    /// Dropping the returned guard stops these watches; what they stored stays in the store.
    ///
    /// [`ServiceKey::new`]: crate::ServiceKey::new
    /// [`ServiceKey::with_labels`]: crate::ServiceKey::with_labels
    pub fn start(self: &Arc<Self>, services: Vec<WatchSpec>) -> KubeGuard {
        let handle = tokio::runtime::Handle::try_current()
            .expect("KubeCluster::start must be called inside a tokio runtime");
        let stopped = Arc::new(AtomicBool::new(false));
        let mut guard = KubeGuard {
            shared: Arc::clone(&self.shared),
            stopped: Arc::clone(&stopped),
            tasks: Vec::new(),
            services: Vec::new(),
        };
        self.shared.lock().started = true;
        // (namespace, service) → (whole Service wanted, label subsets wanted).
        type Wanted = (bool, BTreeSet<BTreeMap<String, String>>);
        let mut grouped: BTreeMap<(String, String), Wanted> = BTreeMap::new();
        for spec in services {
            let wanted = grouped.entry((spec.namespace, spec.service)).or_default();
            if spec.labels.is_empty() {
                wanted.0 = true;
            } else {
                wanted.1.insert(spec.labels);
            }
        }
        if grouped.is_empty() {
            return guard;
        }
        let mut registered = Vec::new();
        for ((namespace, service), (whole, subsets)) in grouped {
            let (service_id, ids) = self.shared.register_service(subsets.len());
            guard.services.push((service_id, ids.clone()));
            registered.push((namespace, service, whole, subsets, ids));
        }
        // Built here, inside the runtime: the client spawns its connection-pool task.
        let client = match ::kube::Client::try_from(self.config.clone()) {
            Ok(client) => client,
            Err(e) => {
                let ids: Vec<u64> = registered
                    .iter()
                    .flat_map(|(.., ids)| ids.iter().copied())
                    .collect();
                self.shared
                    .setup_error(&ids, format!("cannot build the API client: {e}"));
                return guard;
            }
        };
        for (namespace, service, whole, subsets, ids) in registered {
            let task = watch::ServiceTask {
                shared: Arc::clone(&self.shared),
                client: client.clone(),
                options: self.options.clone(),
                namespace,
                service,
                whole,
                subsets: subsets.into_iter().zip(ids[2..].iter().copied()).collect(),
                ids: [ids[0], ids[1]],
                stopped: Arc::clone(&stopped),
            };
            guard.tasks.push(handle.spawn(task.run()));
        }
        guard
    }

    /// Counters, health and the last problem.
    pub fn status(&self) -> KubeStatus {
        self.shared.status()
    }

    /// The cluster's configured name.
    pub fn name(&self) -> &str {
        &self.shared.cluster
    }
}

/// Keeps the watches of one [`KubeCluster::start`] running; dropping it stops them.
///
/// Dropping aborts the tasks (they stop at their next await; a store update already under way
/// completes, none starts afterwards) and forgets their health. It does not remove anything from
/// the store: call [`Store::reset_cluster`] for that.
#[must_use = "the watches stop when the guard is dropped"]
pub struct KubeGuard {
    shared: Arc<Shared>,
    stopped: Arc<AtomicBool>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
    services: Vec<(u64, Vec<u64>)>,
}

impl Drop for KubeGuard {
    fn drop(&mut self) {
        self.stopped.store(true, Ordering::SeqCst);
        for task in &self.tasks {
            task.abort();
        }
        let mut h = self.shared.lock();
        for (sid, ids) in &self.services {
            h.services.remove(sid);
            for id in ids {
                h.watches.remove(id);
            }
        }
    }
}
