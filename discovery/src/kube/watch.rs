//! One watched Service: two list+watch loops (plus one per label subset, on its Pods) and the
//! [`ServiceState`]s they build together.
//!
//! The loop follows the Kubernetes API contract
//! (<https://kubernetes.io/docs/reference/using-api/api-concepts/#efficient-detection-of-changes>):
//!
//! ```text
//!          ┌────────────── 410 Gone (HTTP or ERROR event) ──────────────┐
//!          v                                                            │
//!  ──> LIST (all pages) ──ok──> WATCH from the list's resourceVersion ──┤
//!       │  ^                     │  ^   ADDED/MODIFIED/DELETED, BOOKMARK │
//!  error│  │backoff       error, │  │   move the resourceVersion on      │
//!       └──┘              closed └──┘ (resume from the last one seen) ───┘
//! ```
//!
//! kube-runtime's `watcher` does nearly this; it is not used because (in kube 5.0) a re-watch
//! that succeeds is invisible to its user until an event arrives (so a quiet cluster would look
//! disconnected forever after an outage), an HTTP 410 answer to a watch request is retried with
//! the same resourceVersion forever instead of relisting, and its backoff is reset by the `Init`
//! marker it emits before each list, so a failing list never backs off beyond the first delay.
//!
//! A list replaces the whole set at once (a slice missing from it is gone: that is how an
//! endpoint deleted during an outage disappears); nothing half-listed is ever published.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Debug;

use std::pin::pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use ::kube::api::{Api, ListParams, WatchEvent, WatchParams};
use ::kube::core::PartialObjectMeta;
use ::kube::{Client, Resource, ResourceExt};

use futures::StreamExt;
use k8s_openapi::api::core::v1::{Pod, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use serde::de::DeserializeOwned;

use super::failure::{spread, Failure, Retry};
use super::{KubeOptions, Shared};
use crate::model::{has_labels, selector, ServiceKey, ServiceState};

/// The label that ties an EndpointSlice to its Service.
const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";

/// Page size of lists, as client-go's pager.
const PAGE_SIZE: u32 = 500;

/// A watch that sends nothing (no event, no bookmark) for its timeout plus this long is taken
/// for a dead connection whose close never arrived.
const IDLE_MARGIN: Duration = Duration::from_secs(30);

/// A watch that the server closes sooner than this without sending anything is paced like an
/// error (but not counted as one): a server or proxy that ends every watch at once would
/// otherwise make the loop spin.
const SHORT_WATCH: Duration = Duration::from_secs(1);

/// What a list+watch loop tells its owner.
enum Change<K> {
    /// A complete list: replaces everything known.
    Listed(Vec<K>),
    /// ADDED or MODIFIED.
    Applied(K),
    /// DELETED.
    Deleted(K),
}

/// The task watching one (namespace, service) of a cluster.
pub(super) struct ServiceTask {
    pub(super) shared: Arc<Shared>,
    pub(super) client: Client,
    pub(super) options: KubeOptions,
    pub(super) namespace: String,
    pub(super) service: String,
    /// Whether the whole Service's state is published (some spec named it without labels).
    pub(super) whole: bool,
    /// The label subsets to publish, each with the health id of its Pod watch.
    pub(super) subsets: Vec<(BTreeMap<String, String>, u64)>,
    /// Health ids of the EndpointSlice watch and of the Service watch.
    pub(super) ids: [u64; 2],
    /// Set when the guard is dropped: nothing may be published afterwards.
    pub(super) stopped: Arc<AtomicBool>,
}

impl ServiceTask {
    /// Runs until aborted.
    pub(super) async fn run(self) {
        let ServiceTask {
            shared,
            client,
            options,
            namespace,
            service,
            whole,
            subsets,
            ids,
            stopped,
        } = self;
        let key = ServiceKey::new(shared.cluster.clone(), namespace.as_str(), service.as_str());
        let pod_watches: Vec<ListWatch<PartialObjectMeta<Pod>>> = subsets
            .iter()
            .map(|(labels, id)| {
                let selector = selector(labels);
                ListWatch {
                    // Metadata only: names and labels are all a subset needs, and full Pods
                    // (status included) are large and change often.
                    api: Api::namespaced(client.clone(), &namespace),
                    what: format!(
                        "Pods {} of {namespace}/{service}",
                        selector.as_deref().unwrap_or_default()
                    ),
                    labels: selector,
                    fields: None,
                    id: *id,
                    shared: Arc::clone(&shared),
                    options: options.clone(),
                }
            })
            .collect();
        let assembly = Assembly {
            subsets: subsets
                .iter()
                .map(|(labels, _)| key.clone().with_labels(labels))
                .collect(),
            whole,
            key,
            shared: Arc::clone(&shared),
            stopped,
            state: Mutex::new(Parts {
                pods: vec![None; subsets.len()],
                ..Parts::default()
            }),
        };
        let slices = ListWatch::<EndpointSlice> {
            api: Api::namespaced(client.clone(), &namespace),
            labels: Some(format!("{SERVICE_NAME_LABEL}={service}")),
            fields: None,
            what: format!("EndpointSlices of {namespace}/{service}"),
            id: ids[0],
            shared: Arc::clone(&shared),
            options: options.clone(),
        };
        let services = ListWatch::<Service> {
            api: Api::namespaced(client, &namespace),
            labels: None,
            fields: Some(format!("metadata.name={service}")),
            what: format!("Service {namespace}/{service}"),
            id: ids[1],
            shared,
            options,
        };
        let assembly = &assembly;
        let pods = futures::future::join_all(
            pod_watches
                .into_iter()
                .enumerate()
                .map(|(i, pods)| pods.run(move |change| assembly.pods(i, change))),
        );
        futures::future::join3(
            slices.run(|change| assembly.slices(change)),
            services.run(|change| assembly.service(change)),
            pods,
        )
        .await;
    }
}

/// What the loops of one Service have seen so far.
#[derive(Default)]
struct Parts {
    state: ServiceState,
    slices_listed: bool,
    service_listed: bool,
    /// Per label subset (in the order of [`Assembly::subsets`]): the names of the Pods that have
    /// its labels; `None` until its first list.
    pods: Vec<Option<BTreeSet<String>>>,
}

/// Which keys a change concerns.
#[derive(Clone, Copy)]
enum Scope {
    /// The Service or its slices changed: every key.
    All,
    /// The Pods of one subset changed: that subset's key only.
    Subset(usize),
}

/// Builds one Service's states from its loops and publishes them.
struct Assembly {
    /// The whole Service's key.
    key: ServiceKey,
    /// Whether the whole Service's state is published.
    whole: bool,
    /// The keys of the label subsets, each narrowed by [`ServiceKey::with_labels`].
    subsets: Vec<ServiceKey>,
    shared: Arc<Shared>,
    stopped: Arc<AtomicBool>,
    /// Held through the store update, so that the loops' updates reach the store in the order
    /// they were made.
    state: Mutex<Parts>,
}

impl Assembly {
    fn lock(&self) -> std::sync::MutexGuard<'_, Parts> {
        // Each change is applied whole before anything can panic; the state stays consistent.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn slices(&self, change: Change<EndpointSlice>) {
        let mut parts = self.lock();
        let slices = &mut parts.state.slices;
        match change {
            Change::Listed(items) => {
                *slices = items
                    .into_iter()
                    .filter(|s| self.ours(s))
                    .map(|s| (s.name_any(), Arc::new(trim(s))))
                    .collect::<BTreeMap<_, _>>();
                parts.slices_listed = true;
            }
            // A slice relabelled away from the Service is gone from it (the API server also
            // sends DELETED for that; checking here costs nothing).
            Change::Applied(s) if self.ours(&s) => {
                slices.insert(s.name_any(), Arc::new(trim(s)));
            }
            Change::Applied(s) | Change::Deleted(s) => {
                slices.remove(&s.name_any());
            }
        }
        self.publish(&parts, Scope::All);
    }

    fn service(&self, change: Change<Service>) {
        let mut parts = self.lock();
        let name = self.key.service.as_str();
        match change {
            Change::Listed(items) => {
                parts.state.service = items
                    .into_iter()
                    .find(|s| s.metadata.name.as_deref() == Some(name))
                    .map(trim);
                parts.service_listed = true;
            }
            Change::Applied(s) if s.metadata.name.as_deref() == Some(name) => {
                parts.state.service = Some(trim(s));
            }
            Change::Applied(_) => return,
            Change::Deleted(s) => {
                if s.metadata.name.as_deref() == Some(name) {
                    parts.state.service = None;
                }
            }
        }
        self.publish(&parts, Scope::All);
    }

    /// A change of the Pods of subset `i`. The label selector already narrows them; the labels
    /// are checked again so that a Pod relabelled out of the subset leaves it even if the server
    /// sent MODIFIED rather than DELETED.
    fn pods(&self, i: usize, change: Change<PartialObjectMeta<Pod>>) {
        let wanted = self.subsets[i].subset_labels();
        let matches = |pod: &PartialObjectMeta<Pod>| {
            pod.metadata
                .labels
                .as_ref()
                .is_some_and(|labels| has_labels(labels, &wanted))
        };
        let mut parts = self.lock();
        match change {
            Change::Listed(items) => {
                parts.pods[i] = Some(
                    items
                        .iter()
                        .filter(|pod| matches(pod))
                        .map(ResourceExt::name_any)
                        .collect(),
                );
            }
            Change::Applied(pod) if matches(&pod) => {
                if let Some(names) = &mut parts.pods[i] {
                    names.insert(pod.name_any());
                }
            }
            Change::Applied(pod) | Change::Deleted(pod) => {
                if let Some(names) = &mut parts.pods[i] {
                    names.remove(&pod.name_any());
                }
            }
        }
        self.publish(&parts, Scope::Subset(i));
    }

    fn ours(&self, slice: &EndpointSlice) -> bool {
        slice
            .labels()
            .get(SERVICE_NAME_LABEL)
            .is_some_and(|s| *s == self.key.service)
    }

    /// Writes the states concerned by a change: each once all the lists it depends on are done
    /// (so the gateway never sees slices without their Service, which it would report as a
    /// missing Service, nor a subset before its Pods are known, which would look empty).
    fn publish(&self, parts: &Parts, scope: Scope) {
        if !(parts.slices_listed && parts.service_listed) || self.stopped.load(Ordering::SeqCst) {
            return;
        }
        let store = &self.shared.store;
        if self.whole && matches!(scope, Scope::All) {
            store.set(self.key.clone(), Some(parts.state.clone()));
        }
        for (i, key) in self.subsets.iter().enumerate() {
            if matches!(scope, Scope::Subset(j) if j != i) {
                continue;
            }
            if let Some(pods) = &parts.pods[i] {
                let state = parts.state.only_pods(|name| pods.contains(name));
                store.set(key.clone(), Some(state));
            }
        }
    }
}

/// Drops what is big and never used: managedFields can outweigh the rest of a slice.
fn trim<K: Resource>(mut object: K) -> K {
    object.meta_mut().managed_fields = None;
    object
}

/// How a watch request ended.
enum End {
    /// Closed by the server (its timeout, or a restart): resume from the last resourceVersion.
    Closed,
    /// Failed; a 410 means relist.
    Failed(Failure),
}

/// One list+watch loop over the objects matching a selector in one namespace.
struct ListWatch<K> {
    api: Api<K>,
    labels: Option<String>,
    fields: Option<String>,
    /// `EndpointSlices of ns/svc`, for logs and `last_error`.
    what: String,
    id: u64,
    shared: Arc<Shared>,
    options: KubeOptions,
}

impl<K> ListWatch<K>
where
    K: Resource + Clone + DeserializeOwned + Debug + Send + 'static,
{
    /// Lists, then watches, forever; `apply` gets every complete list and every event.
    async fn run(self, mut apply: impl FnMut(Change<K>)) {
        let mut retry = Retry::new(&self.options);
        // 410s in a row with no watch event in between: the first relists at once (the normal
        // case), further ones back off (a server that answers 410 to everything).
        let mut gone_in_a_row = 0u32;
        loop {
            // LIST
            let (items, mut version) = match self.list().await {
                Ok(listed) => listed,
                Err(failure) => {
                    self.fail(&failure, &mut retry).await;
                    continue;
                }
            };
            self.shared.answered(self.id);
            self.shared.listed(self.id);
            retry.reset();
            apply(Change::Listed(items));

            // WATCH, resumed from the last resourceVersion seen until a 410 asks for a relist.
            loop {
                let end = self.watch(&mut version, &mut apply, &mut retry).await;
                match end {
                    Ok(progressed) => {
                        if progressed {
                            gone_in_a_row = 0;
                        }
                    }
                    Err(End::Failed(failure)) if failure.is_gone() => {
                        gone_in_a_row += 1;
                        let delay = (gone_in_a_row > 1).then(|| retry.next());
                        self.shared.error(self.id, &self.what, &failure, delay);
                        if let Some(delay) = delay {
                            tokio::time::sleep(delay).await;
                        }
                        break;
                    }
                    Err(End::Failed(failure)) => self.fail(&failure, &mut retry).await,
                    Err(End::Closed) => {
                        // Closed at once with nothing sent: pace it, see SHORT_WATCH.
                        tokio::time::sleep(retry.next()).await;
                    }
                }
            }
        }
    }

    /// Counts and logs `failure`, then waits out the backoff.
    async fn fail(&self, failure: &Failure, retry: &mut Retry) {
        let delay = retry.next();
        self.shared.error(self.id, &self.what, failure, Some(delay));
        tokio::time::sleep(delay).await;
    }

    /// All pages of a list, and the list's resourceVersion.
    async fn list(&self) -> Result<(Vec<K>, String), Failure> {
        let mut params = ListParams {
            label_selector: self.labels.clone(),
            field_selector: self.fields.clone(),
            limit: Some(PAGE_SIZE),
            ..ListParams::default()
        };
        let mut items = Vec::new();
        loop {
            let page = tokio::time::timeout(self.options.request_timeout, self.api.list(&params))
                .await
                .map_err(|_| self.timed_out("list"))?
                .map_err(|e| Failure::from_client(&e))?;
            items.extend(page.items);
            match page.metadata.continue_.filter(|c| !c.is_empty()) {
                Some(token) => params.continue_token = Some(token),
                None => {
                    return match page.metadata.resource_version.filter(|v| !v.is_empty()) {
                        Some(version) => Ok((items, version)),
                        None => Err(Failure::new(
                            "decode",
                            "the list answer has no metadata.resourceVersion".to_owned(),
                        )),
                    };
                }
            }
        }
    }

    fn timed_out(&self, request: &str) -> Failure {
        Failure::new(
            "timeout",
            format!(
                "no answer to the {request} request within {:?}",
                self.options.request_timeout
            ),
        )
    }

    /// One watch request, from `version` on, until it ends; moves `version` on with every event
    /// and bookmark. `Ok(progressed)` is a normal end (after which the watch is resumed at once);
    /// `progressed` says whether anything arrived.
    async fn watch(
        &self,
        version: &mut String,
        apply: &mut impl FnMut(Change<K>),
        retry: &mut Retry,
    ) -> Result<bool, End> {
        let full = self.options.watch_timeout.as_secs().max(1);
        // Between 5/6 of the timeout and all of it.
        let secs = full - (full as f64 / 6.0 * spread()) as u64;
        let params = WatchParams {
            label_selector: self.labels.clone(),
            field_selector: self.fields.clone(),
            timeout: Some(u32::try_from(secs).unwrap_or(u32::MAX)),
            bookmarks: true,
            ..WatchParams::default()
        };
        let stream = tokio::time::timeout(
            self.options.request_timeout,
            self.api.watch(&params, version),
        )
        .await
        .map_err(|_| End::Failed(self.timed_out("watch")))?
        .map_err(|e| End::Failed(Failure::from_client(&e)))?;
        self.shared.answered(self.id);
        let mut stream = pin!(stream);
        let opened = Instant::now();
        let idle = Duration::from_secs(secs) + IDLE_MARGIN;
        let mut progressed = false;
        let end = loop {
            let event = match tokio::time::timeout(idle, stream.next()).await {
                Err(_) => {
                    break End::Failed(Failure::new(
                        "timeout",
                        format!("the watch sent nothing for {idle:?}; reconnecting"),
                    ))
                }
                Ok(None) => break End::Closed,
                Ok(Some(Err(e))) => break End::Failed(Failure::from_client(&e)),
                Ok(Some(Ok(event))) => event,
            };
            match event {
                WatchEvent::Added(object) | WatchEvent::Modified(object) => {
                    advance(version, &object);
                    self.shared.event();
                    apply(Change::Applied(object));
                }
                WatchEvent::Deleted(object) => {
                    advance(version, &object);
                    self.shared.event();
                    apply(Change::Deleted(object));
                }
                WatchEvent::Bookmark(bookmark) => {
                    self.shared.fresh();
                    if !bookmark.metadata.resource_version.is_empty() {
                        *version = bookmark.metadata.resource_version;
                    }
                }
                WatchEvent::Error(status) => break End::Failed(Failure::from_status(&status)),
            }
            if !progressed {
                progressed = true;
                retry.reset();
            }
        };
        match end {
            End::Closed if progressed || opened.elapsed() >= SHORT_WATCH => Ok(progressed),
            end => Err(end),
        }
    }
}

fn advance<K: Resource>(version: &mut String, object: &K) {
    if let Some(v) = object.meta().resource_version.as_deref() {
        if !v.is_empty() {
            v.clone_into(version);
        }
    }
}
