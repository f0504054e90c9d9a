//! `Store`: change detection and notifications.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use k8s_openapi::api::core::v1::Service;
use podgate_discovery::{Listener, ServiceKey, ServiceState, Store};

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
