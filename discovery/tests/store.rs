//! `Store`: change detection and notifications.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};

use k8s_openapi::api::core::v1::{Service, ServicePort};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use podgate_discovery::{Listener, PortRef, ServiceKey, ServiceState, Store};
use serde_json::json;

#[derive(Default)]
struct Recorder(Mutex<Vec<Vec<ServiceKey>>>);

impl Listener for Recorder {
    fn changed(&self, keys: &[ServiceKey]) {
        self.0.lock().unwrap().push(keys.to_vec());
    }
}

impl Recorder {
    fn take(&self) -> Vec<Vec<ServiceKey>> {
        std::mem::take(&mut *self.0.lock().unwrap())
    }
}

fn key(cluster: &str, service: &str) -> ServiceKey {
    ServiceKey::new(cluster, "default", service)
}

fn state(name: &str, cluster_ip: &str) -> ServiceState {
    let mut service = Service::default();
    service.metadata.name = Some(name.into());
    service.spec = Some(Default::default());
    service.spec.as_mut().unwrap().cluster_ip = Some(cluster_ip.into());
    ServiceState {
        service: Some(service),
        slices: Default::default(),
        pods: None,
    }
}

fn setup() -> (Arc<Store>, Arc<Recorder>) {
    let store = Store::new();
    let recorder = Arc::new(Recorder::default());
    store.subscribe(recorder.clone());
    (store, recorder)
}

#[test]
fn reset_cluster_notifies_once_with_only_the_changed_keys() {
    let (store, recorder) = setup();
    store.reset_cluster(
        "a",
        HashMap::from([
            (key("a", "one"), state("one", "10.96.0.1")),
            (key("a", "two"), state("two", "10.96.0.2")),
            (key("a", "three"), state("three", "10.96.0.3")),
        ]),
    );
    assert_eq!(
        recorder.take(),
        [vec![key("a", "one"), key("a", "three"), key("a", "two")]]
    );
    let unchanged = store.get(&key("a", "one")).unwrap();

    // one unchanged, two changed, three removed, four added.
    store.reset_cluster(
        "a",
        HashMap::from([
            (key("a", "one"), state("one", "10.96.0.1")),
            (key("a", "two"), state("two", "10.96.0.22")),
            (key("a", "four"), state("four", "10.96.0.4")),
        ]),
    );
    assert_eq!(
        recorder.take(),
        [vec![key("a", "four"), key("a", "three"), key("a", "two")]]
    );
    assert!(Arc::ptr_eq(
        &unchanged,
        &store.get(&key("a", "one")).unwrap()
    ));
    assert_eq!(store.get(&key("a", "three")), None);
    assert_eq!(
        store.keys(),
        [key("a", "four"), key("a", "one"), key("a", "two")]
    );
}

#[test]
fn no_notification_when_nothing_changed() {
    let (store, recorder) = setup();
    let services = HashMap::from([(key("a", "one"), state("one", "10.96.0.1"))]);
    store.reset_cluster("a", services.clone());
    recorder.take();
    store.reset_cluster("a", services);
    store.set(key("a", "one"), Some(state("one", "10.96.0.1")));
    store.set(key("a", "missing"), None);
    store.reset_cluster("b", HashMap::new());
    assert!(recorder.take().is_empty());
}

#[test]
fn removing_a_service_notifies() {
    let (store, recorder) = setup();
    store.set(key("a", "one"), Some(state("one", "10.96.0.1")));
    store.set(key("a", "two"), Some(state("two", "10.96.0.2")));
    assert_eq!(
        recorder.take(),
        [vec![key("a", "one")], vec![key("a", "two")]]
    );

    store.set(key("a", "one"), None);
    assert_eq!(recorder.take(), [vec![key("a", "one")]]);
    store.reset_cluster("a", HashMap::new());
    assert_eq!(recorder.take(), [vec![key("a", "two")]]);
    assert!(store.keys().is_empty());
}

#[test]
fn clusters_are_independent() {
    let (store, recorder) = setup();
    store.reset_cluster(
        "a",
        HashMap::from([(key("a", "one"), state("one", "10.96.0.1"))]),
    );
    store.reset_cluster(
        "b",
        HashMap::from([(key("b", "one"), state("one", "10.96.0.1"))]),
    );
    recorder.take();
    store.reset_cluster("a", HashMap::new());
    assert_eq!(recorder.take(), [vec![key("a", "one")]]);
    assert_eq!(store.keys(), [key("b", "one")]);
    // A key of another cluster is not accepted by a reset.
    store.reset_cluster(
        "a",
        HashMap::from([(key("b", "two"), state("two", "10.96.0.2"))]),
    );
    assert!(recorder.take().is_empty());
    assert_eq!(store.keys(), [key("b", "one")]);
}

#[test]
fn listeners_can_read_the_new_state() {
    struct Reader(Arc<Store>, Mutex<Vec<Option<String>>>);
    impl Listener for Reader {
        fn changed(&self, keys: &[ServiceKey]) {
            let state = self.0.get(&keys[0]);
            let ip = state.and_then(|s| s.service.clone()?.spec?.cluster_ip);
            self.1.lock().unwrap().push(ip);
        }
    }
    let store = Store::new();
    let reader = Arc::new(Reader(store.clone(), Mutex::default()));
    store.subscribe(reader.clone());
    store.set(key("a", "one"), Some(state("one", "10.96.0.1")));
    store.set(key("a", "one"), None);
    assert_eq!(
        *reader.1.lock().unwrap(),
        [Some("10.96.0.1".to_owned()), None]
    );
}

// ---- label subsets ----

fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

/// Service `web` with one slice of Pods `pod-<i>` at 10.0.0.<i>, and the Pods' `version` labels
/// (`None`: the source records no Pod labels).
fn web(versions: Option<&[&str]>, pods: usize) -> ServiceState {
    let endpoints: Vec<_> = (1..=pods)
        .map(|i| {
            json!({
                "addresses": [format!("10.0.0.{i}")],
                "targetRef": {"kind": "Pod", "name": format!("pod-{i}")},
            })
        })
        .collect();
    let slice: EndpointSlice = serde_json::from_value(json!({
        "metadata": {"name": "web-1", "labels": {"kubernetes.io/service-name": "web"}},
        "addressType": "IPv4",
        "ports": [{"name": "http", "port": 80}],
        "endpoints": endpoints,
    }))
    .unwrap();
    let mut state = state("web", "10.96.0.1");
    let spec = state.service.as_mut().unwrap().spec.as_mut().unwrap();
    spec.ports = Some(vec![ServicePort {
        name: Some("http".into()),
        port: 80,
        ..ServicePort::default()
    }]);
    state
        .slices
        .insert("web-1".into(), std::sync::Arc::new(slice));
    state.pods = versions.map(|versions| {
        versions
            .iter()
            .enumerate()
            .map(|(i, v)| (format!("pod-{}", i + 1), labels(&[("version", v)])))
            .collect()
    });
    state
}

fn subset_key(version: &str) -> ServiceKey {
    key("a", "web").with_labels(&labels(&[("version", version)]))
}

/// The Pod names of `key`'s endpoints, or None if the store has no state for it.
fn pods_of(store: &Store, key: &ServiceKey) -> Option<Vec<String>> {
    let state = store.get(key)?;
    let endpoints = state.endpoints(&PortRef::Number(80)).unwrap();
    Some(endpoints.into_iter().filter_map(|e| e.pod).collect())
}

#[test]
fn subsets_are_derived_from_pod_labels_and_kept_current() {
    let (store, recorder) = setup();
    store.reset_cluster(
        "a",
        HashMap::from([(key("a", "web"), web(Some(&["v1", "v2", "v1"]), 3))]),
    );
    recorder.take();

    // Asked for: derived at once, without a notification (the caller is reading).
    assert_eq!(
        pods_of(&store, &subset_key("v1")).unwrap(),
        ["pod-1", "pod-3"]
    );
    assert_eq!(pods_of(&store, &subset_key("v2")).unwrap(), ["pod-2"]);
    assert_eq!(
        pods_of(&store, &subset_key("v3")).unwrap(),
        Vec::<String>::new()
    );
    assert!(recorder.take().is_empty());
    let v2 = store.get(&subset_key("v2")).unwrap();

    // pod-3 is relabelled v2: the whole Service and the two subsets it moves between change;
    // v3 does not.
    store.reset_cluster(
        "a",
        HashMap::from([(key("a", "web"), web(Some(&["v1", "v2", "v2"]), 3))]),
    );
    assert_eq!(
        recorder.take(),
        [vec![key("a", "web"), subset_key("v1"), subset_key("v2")]]
    );
    assert_eq!(pods_of(&store, &subset_key("v1")).unwrap(), ["pod-1"]);
    assert_eq!(
        pods_of(&store, &subset_key("v2")).unwrap(),
        ["pod-2", "pod-3"]
    );
    assert!(!Arc::ptr_eq(&v2, &store.get(&subset_key("v2")).unwrap()));

    // A change that moves no Pod between subsets leaves their states (and Arcs) alone.
    let v1 = store.get(&subset_key("v1")).unwrap();
    let mut relabelled = web(Some(&["v1", "v2", "v2"]), 3);
    relabelled
        .pods
        .as_mut()
        .unwrap()
        .get_mut("pod-1")
        .unwrap()
        .insert("team".into(), "x".into());
    store.reset_cluster("a", HashMap::from([(key("a", "web"), relabelled)]));
    assert_eq!(recorder.take(), [vec![key("a", "web")]]);
    assert!(Arc::ptr_eq(&v1, &store.get(&subset_key("v1")).unwrap()));

    // The Service goes: so do its subsets.
    store.reset_cluster("a", HashMap::new());
    assert_eq!(
        recorder.take(),
        [vec![
            key("a", "web"),
            subset_key("v1"),
            subset_key("v2"),
            subset_key("v3")
        ]]
    );
    assert_eq!(store.get(&subset_key("v1")), None);
    // Asked for before the Service exists, it appears with it.
    store.reset_cluster(
        "a",
        HashMap::from([(key("a", "web"), web(Some(&["v1"]), 1))]),
    );
    assert_eq!(pods_of(&store, &subset_key("v1")).unwrap(), ["pod-1"]);
}

#[test]
fn set_derives_subsets_too_and_explicit_subsets_are_left_alone() {
    let (store, recorder) = setup();
    // A source that stores subsets itself (a cluster watch): its whole Services carry no Pod
    // labels, and nothing is derived or overwritten.
    let explicit = web(None, 1);
    store.set(subset_key("v1"), Some(explicit.clone()));
    store.set(key("a", "web"), Some(web(None, 3)));
    assert_eq!(pods_of(&store, &subset_key("v1")).unwrap(), ["pod-1"]);
    assert_eq!(store.get(&subset_key("v9")), None, "nothing to derive from");
    recorder.take();

    // One that records Pod labels through `set`: subsets follow.
    store.set(key("a", "web"), Some(web(Some(&["v9", "v1"]), 2)));
    assert_eq!(
        recorder.take(),
        [vec![key("a", "web"), subset_key("v1"), subset_key("v9")]]
    );
    assert_eq!(pods_of(&store, &subset_key("v9")).unwrap(), ["pod-1"]);
    assert_eq!(pods_of(&store, &subset_key("v1")).unwrap(), ["pod-2"]);
    // The Service goes: its derived subsets go with it.
    store.set(key("a", "web"), None);
    assert_eq!(
        recorder.take(),
        [vec![key("a", "web"), subset_key("v1"), subset_key("v9")]]
    );
    assert!(store.keys().is_empty());
}
