//! Sources of endpoints for podgate.
//!
//! Data flow: a *source* (a folder of manifests, [`ManifestsCluster`], or a Kubernetes API
//! server, [`KubeCluster`]) sees Services and EndpointSlices and writes what it knows per
//! (cluster, namespace, service) into the [`Store`]. The store tells its [`Listener`]s which
//! [`ServiceKey`]s changed; the gateway then reads the [`ServiceState`] and resolves the
//! upstream's port into Pod addresses with [`ServiceState::endpoints`].
//!
//! A key may also name a label subset of a Service's Pods ([`ServiceKey::with_labels`]): its
//! state is the Service's with only the endpoints of the Pods that have those labels. A cluster
//! watches the Pods of each subset asked for ([`WatchSpec`]); a manifests folder reads its Pod
//! objects and the store derives the subsets from them.
//!
//! ```text
//! manifests folder ──> ManifestsCluster ──reset_cluster──┐
//! API server ──list+watch──> KubeCluster ──set(key)──────┴──> Store ──changed(keys)──> gateway
//!                                           └── get(key) → ServiceState::endpoints(port)
//! ```
//!
//! Nothing here is on the request path: the gateway turns notifications into its own snapshots.

mod kube;
mod manifests;
mod model;
mod store;

pub use self::kube::{
    Access, KubeCluster, KubeError, KubeGuard, KubeOptions, KubeStatus, NodeZoneError, WatchSpec,
    LEGACY_ZONE_LABEL, ZONE_LABEL,
};
pub use manifests::{ManifestsCluster, ManifestsError, ManifestsStatus, WatchGuard};
pub use model::{Endpoint, PortRef, ResolveError, ServiceKey, ServiceState};
pub use store::{Listener, Store};
