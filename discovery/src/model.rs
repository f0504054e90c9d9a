//! What discovery knows about one Service, and how that turns into Pod addresses.
//!
//! Sources (a manifests folder, a cluster watch) store the raw Kubernetes objects in a
//! [`ServiceState`]; [`ServiceState::endpoints`] applies the Kubernetes contract to them:
//! the Service port chosen by the upstream is mapped, per EndpointSlice, to the Pod port
//! (the Service's targetPort), and every Pod address is returned with its conditions.

use std::collections::btree_map::Entry;
use std::collections::BTreeMap;
use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use k8s_openapi::api::core::v1::{Service, ServicePort};
use k8s_openapi::api::discovery::v1::EndpointSlice;

/// Identifies one watched Kubernetes Service, or a label subset of its Pods:
/// (cluster, namespace, service, subset).
///
/// `cluster` is an `Arc<str>` because every key of a cluster shares the same name and keys are
/// cloned into notifications often.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ServiceKey {
    /// Name of the cluster as configured in `clusters[].name`.
    pub cluster: Arc<str>,
    /// Kubernetes namespace of the Service.
    pub namespace: String,
    /// Name of the Service (also the value of the EndpointSlice label `kubernetes.io/service-name`).
    pub service: String,
    /// `None`: every endpoint of the Service. `Some`: only the endpoints whose Pod (`targetRef`)
    /// has all these labels, written as a Kubernetes equality selector in canonical form
    /// (`k=v,k2=v2`, keys sorted, see [`ServiceKey::with_labels`]). Two upstream entries of one
    /// Service with different subsets are different keys, so they are never merged.
    pub subset: Option<Arc<str>>,
}

impl ServiceKey {
    /// Builds the key of a whole Service (no label subset).
    pub fn new(
        cluster: impl Into<Arc<str>>,
        namespace: impl Into<String>,
        service: impl Into<String>,
    ) -> ServiceKey {
        ServiceKey {
            cluster: cluster.into(),
            namespace: namespace.into(),
            service: service.into(),
            subset: None,
        }
    }

    /// This key narrowed to the Pods that have all `labels` (the key of the whole Service when
    /// `labels` is empty). Labels must be valid Kubernetes label keys and values, which can hold
    /// neither `,` nor `=`: that keeps the canonical form unambiguous.
    pub fn with_labels(mut self, labels: &BTreeMap<String, String>) -> ServiceKey {
        self.subset = selector(labels).map(Arc::from);
        self
    }

    /// The key of the whole Service this key belongs to (itself when it has no subset).
    pub fn whole(&self) -> ServiceKey {
        ServiceKey {
            subset: None,
            ..self.clone()
        }
    }

    /// The subset's (label, value) pairs, sorted by label; empty for a whole Service.
    pub fn subset_labels(&self) -> Vec<(&str, &str)> {
        self.subset
            .as_deref()
            .map(parse_selector)
            .unwrap_or_default()
    }
}

/// `k=v,k2=v2` (keys in order), the Kubernetes equality-based label selector that matches
/// objects having all `labels`; `None` when `labels` is empty.
pub fn selector(labels: &BTreeMap<String, String>) -> Option<String> {
    if labels.is_empty() {
        return None;
    }
    let terms: Vec<String> = labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
    Some(terms.join(","))
}

/// The pairs of a selector made by [`selector`]. A term without `=` (which [`selector`] never
/// writes) asks for a value no label can have (NUL), so a malformed subset matches nothing
/// rather than everything.
fn parse_selector(selector: &str) -> Vec<(&str, &str)> {
    selector
        .split(',')
        .map(|term| term.split_once('=').unwrap_or((term, "\0")))
        .collect()
}

/// Whether an object with `labels` has every (label, value) pair of `wanted`.
pub(crate) fn has_labels(labels: &BTreeMap<String, String>, wanted: &[(&str, &str)]) -> bool {
    wanted
        .iter()
        .all(|(k, v)| labels.get(*k).is_some_and(|have| have == v))
}

impl fmt::Display for ServiceKey {
    /// `cluster/namespace/service`, or `cluster/namespace/service{version=v1}` for a subset.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}/{}", self.cluster, self.namespace, self.service)?;
        match &self.subset {
            Some(subset) => write!(f, "{{{subset}}}"),
            None => Ok(()),
        }
    }
}

/// The upstream's `port:` field: a Service port number or a Service port name.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum PortRef {
    /// Matches the Service port whose `port` is this number.
    Number(u16),
    /// Matches the Service port whose `name` is this name.
    Name(String),
}

impl fmt::Display for PortRef {
    /// `8000` or `http`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PortRef::Number(n) => write!(f, "{n}"),
            PortRef::Name(name) => f.write_str(name),
        }
    }
}

/// One Pod address that traffic can go to (the Pod port is already the targetPort).
///
/// The conditions are reported as Kubernetes defines them, with unset values already resolved
/// (`ready` unset = ready, `serving` unset = `ready`, `terminating` unset = false); deciding who
/// gets traffic is left to the caller.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Endpoint {
    /// Pod IP and Pod port.
    pub addr: SocketAddr,
    /// `conditions.ready`: the Pod may get new traffic.
    pub ready: bool,
    /// `conditions.serving`: the Pod answers requests even if it is not ready (e.g. terminating).
    pub serving: bool,
    /// `conditions.terminating`: the Pod is shutting down.
    pub terminating: bool,
    /// `targetRef.name` when `targetRef.kind == "Pod"`.
    pub pod: Option<String>,
    /// `nodeName`.
    pub node: Option<String>,
    /// `zone`.
    pub zone: Option<String>,
    /// `hints.forZones`: the zones the EndpointSlice controller wants this endpoint to serve
    /// (Topology Aware Routing); `None` when the slice carries no hints for it.
    pub for_zones: Option<Vec<String>>,
    /// Name of the EndpointSlice it came from.
    pub slice: String,
}

impl Endpoint {
    /// Orders endpoints by how useful they are to a load balancer; used to pick one when a Pod
    /// shows up in two slices while it moves between them.
    fn rank(&self) -> (bool, bool, bool) {
        (self.ready, self.serving, !self.terminating)
    }
}

/// Everything known about one Service (or one label subset of its Pods): the Service object and
/// its EndpointSlices by slice name.
#[derive(Clone, Debug, Default)]
pub struct ServiceState {
    /// The Service object; `None` while only EndpointSlices have been seen.
    pub service: Option<Service>,
    /// The Service's EndpointSlices, by `metadata.name` (for a subset: with only the endpoints of
    /// the subset's Pods). Shared: a watch event replaces one slice, and the new state shares the
    /// others with the previous one instead of copying a few hundred endpoints each time.
    pub slices: BTreeMap<String, Arc<EndpointSlice>>,
    /// The labels of the Pods that the slices' endpoints name in `targetRef`, by Pod name, when
    /// the source reads every Pod (a manifests folder does); a Pod the source does not have is
    /// left out. `None` when the source does not read them (a cluster watches Pods only for the
    /// label subsets asked for, and stores those under keys of their own). The [`Store`] derives
    /// the state of a subset key from this when no source stores that key itself.
    ///
    /// [`Store`]: crate::Store
    pub pods: Option<BTreeMap<String, BTreeMap<String, String>>>,
}

/// Why a [`PortRef`] could not be resolved against a [`ServiceState`].
#[derive(Debug, thiserror::Error, Clone, PartialEq)]
pub enum ResolveError {
    /// The EndpointSlices alone cannot say which slice port an upstream port means.
    #[error("the Service object is not known (no Service manifest or watch event for it yet)")]
    NoService,
    /// No Service port has the wanted number or name.
    #[error("the Service has no port {wanted} (its ports: {})", list(.available))]
    NoSuchPort {
        /// What the upstream asked for.
        wanted: PortRef,
        /// The Service's ports as `8000/http` (or `8000` when unnamed; non-TCP ports carry
        /// their protocol, e.g. `53/dns (UDP)`).
        available: Vec<String>,
    },
    /// The wanted port exists, but not for TCP: podgate proxies HTTP over TCP only.
    #[error("Service port {port} is {protocol}, but podgate proxies HTTP over TCP only")]
    NotTcp {
        /// The port as `53/dns`.
        port: String,
        /// Its protocol, e.g. `UDP`.
        protocol: String,
    },
}

fn list(items: &[String]) -> String {
    if items.is_empty() {
        "none".to_owned()
    } else {
        items.join(", ")
    }
}

impl ServiceState {
    /// Endpoints serving `port`, sorted by addr, one per address, deduplicated across slices.
    ///
    /// Contract (Kubernetes' own):
    /// - `port` picks a Service port by number or by name. Only TCP ports qualify (protocol unset
    ///   means TCP). No match is [`ResolveError::NoSuchPort`]; a match on a non-TCP port only is
    ///   [`ResolveError::NotTcp`]; no Service object is [`ResolveError::NoService`].
    /// - The Service port's name (unset and `""` are the same) picks the port of the same name in
    ///   each slice; that slice port's number is the Pod port. It is resolved per slice because a
    ///   named targetPort may be a different number in different Pods. A slice without such a port
    ///   contributes nothing.
    /// - Only `IPv4` and `IPv6` slices count (FQDN would need DNS on the request path). Only the
    ///   first address of each endpoint is used: Kubernetes declares them fungible, so using all
    ///   of them would give one Pod several shares of traffic. Unparseable addresses are skipped
    ///   with a warning naming the slice.
    /// - An address in two slices (a Pod moving between slices) is returned once, with the better
    ///   conditions (ready beats serving beats terminating; ties keep the first slice by name).
    /// - Nothing is filtered by condition.
    pub fn endpoints(&self, port: &PortRef) -> Result<Vec<Endpoint>, ResolveError> {
        let service = self.service.as_ref().ok_or(ResolveError::NoService)?;
        let service_port = find_service_port(service, port)?;
        let port_name = service_port.name.as_deref().unwrap_or("");

        // A BTreeMap both deduplicates by address and yields the addresses sorted.
        let mut found: BTreeMap<SocketAddr, Endpoint> = BTreeMap::new();
        for (slice_name, slice) in &self.slices {
            if slice.address_type != "IPv4" && slice.address_type != "IPv6" {
                continue;
            }
            let Some(pod_port) = slice_port(slice_name, slice, port_name) else {
                continue;
            };
            for endpoint in &slice.endpoints {
                let Some(address) = endpoint.addresses.first() else {
                    continue;
                };
                let ip: IpAddr = match address.parse() {
                    Ok(ip) => ip,
                    Err(_) => {
                        log::warn!(
                            "EndpointSlice {slice_name}: skipping unparseable {} address {address:?}",
                            slice.address_type
                        );
                        continue;
                    }
                };
                let conditions = endpoint.conditions.as_ref();
                let ready = conditions.and_then(|c| c.ready).unwrap_or(true);
                let candidate = Endpoint {
                    addr: SocketAddr::new(ip, pod_port),
                    ready,
                    serving: conditions.and_then(|c| c.serving).unwrap_or(ready),
                    terminating: conditions.and_then(|c| c.terminating).unwrap_or(false),
                    pod: endpoint
                        .target_ref
                        .as_ref()
                        .filter(|r| r.kind.as_deref() == Some("Pod"))
                        .and_then(|r| r.name.clone()),
                    node: endpoint.node_name.clone(),
                    zone: endpoint.zone.clone(),
                    for_zones: endpoint
                        .hints
                        .as_ref()
                        .and_then(|h| h.for_zones.as_ref())
                        .map(|zones| zones.iter().map(|z| z.name.clone()).collect()),
                    slice: slice_name.clone(),
                };
                match found.entry(candidate.addr) {
                    Entry::Vacant(vacant) => {
                        vacant.insert(candidate);
                    }
                    Entry::Occupied(mut occupied) => {
                        if candidate.rank() > occupied.get().rank() {
                            occupied.insert(candidate);
                        }
                    }
                }
            }
        }
        Ok(found.into_values().collect())
    }
}

/// Slices shared with the previous state compare by pointer first: an update that replaces one
/// slice of a large Service compares that slice only.
impl PartialEq for ServiceState {
    fn eq(&self, other: &Self) -> bool {
        self.service == other.service
            && self.pods == other.pods
            && self.slices.len() == other.slices.len()
            && self
                .slices
                .iter()
                .zip(&other.slices)
                .all(|((na, a), (nb, b))| na == nb && (Arc::ptr_eq(a, b) || a == b))
    }
}

impl ServiceState {
    /// The same Service with only the endpoints whose `targetRef` is a Pod for which `keep(name)`
    /// holds (endpoints without a Pod `targetRef` are dropped: nothing says which labels they
    /// have). Slices left without endpoints stay, empty. `pods` is not carried over: the result
    /// is a subset's state, and it should not change when labels change that do not move a Pod in
    /// or out of it.
    pub fn only_pods(&self, keep: impl Fn(&str) -> bool) -> ServiceState {
        let slices = self
            .slices
            .iter()
            .map(|(name, slice)| {
                let mut slice = EndpointSlice::clone(slice);
                slice.endpoints.retain(|endpoint| {
                    endpoint
                        .target_ref
                        .as_ref()
                        .filter(|r| r.kind.as_deref() == Some("Pod"))
                        .and_then(|r| r.name.as_deref())
                        .is_some_and(&keep)
                });
                (name.clone(), Arc::new(slice))
            })
            .collect();
        ServiceState {
            service: self.service.clone(),
            slices,
            pods: None,
        }
    }

    /// The state of the subset of Pods that have every (label, value) pair of `labels`, computed
    /// from [`ServiceState::pods`]; `None` when the source did not record Pod labels.
    pub fn subset(&self, labels: &[(&str, &str)]) -> Option<ServiceState> {
        let pods = self.pods.as_ref()?;
        Some(self.only_pods(|name| pods.get(name).is_some_and(|l| has_labels(l, labels))))
    }
}

fn is_tcp(protocol: Option<&str>) -> bool {
    protocol.is_none_or(|p| p == "TCP")
}

/// `8000/http`, `8000` when unnamed.
fn port_label(port: &ServicePort) -> String {
    match port.name.as_deref() {
        Some(name) if !name.is_empty() => format!("{}/{name}", port.port),
        _ => port.port.to_string(),
    }
}

fn find_service_port<'a>(
    service: &'a Service,
    wanted: &PortRef,
) -> Result<&'a ServicePort, ResolveError> {
    let ports: &[ServicePort] = service
        .spec
        .as_ref()
        .and_then(|spec| spec.ports.as_deref())
        .unwrap_or_default();
    let matches = |p: &&ServicePort| match wanted {
        PortRef::Number(n) => p.port == i32::from(*n),
        PortRef::Name(name) => p.name.as_deref() == Some(name.as_str()),
    };
    // A number can match both a TCP and a UDP port (DNS on 53 is the classic case); HTTP wants TCP.
    if let Some(port) = ports
        .iter()
        .filter(matches)
        .find(|p| is_tcp(p.protocol.as_deref()))
    {
        return Ok(port);
    }
    if let Some(port) = ports.iter().find(matches) {
        return Err(ResolveError::NotTcp {
            port: port_label(port),
            protocol: port.protocol.clone().unwrap_or_default(),
        });
    }
    Err(ResolveError::NoSuchPort {
        wanted: wanted.clone(),
        available: ports
            .iter()
            .map(|p| match p.protocol.as_deref() {
                Some(protocol) if !is_tcp(Some(protocol)) => {
                    format!("{} ({protocol})", port_label(p))
                }
                _ => port_label(p),
            })
            .collect(),
    })
}

/// The Pod port of `slice` for the Service port named `name` (`""` = unnamed).
fn slice_port(slice_name: &str, slice: &EndpointSlice, name: &str) -> Option<u16> {
    let port = slice
        .ports
        .as_deref()
        .unwrap_or_default()
        .iter()
        .find(|p| p.name.as_deref().unwrap_or("") == name)?;
    // An unset port means "all ports" in the EndpointSlice API; that never happens for a Service's
    // slices and gives no number to connect to, so such a slice is unusable.
    match port
        .port
        .and_then(|n| u16::try_from(n).ok())
        .filter(|&n| n != 0)
    {
        Some(n) => Some(n),
        None => {
            log::warn!(
                "EndpointSlice {slice_name}: port {name:?} has no usable number ({:?}); skipping the slice",
                port.port
            );
            None
        }
    }
}
