//! The Kubernetes source end to end: `KubeCluster` (kube-rs client, list+watch loops) against a
//! fake API server speaking the real HTTP protocol, scripted per test. Waits poll a condition
//! every 10 ms up to 10 s; nothing sleeps to synchronise.

mod support;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use podgate_discovery::{
    Access, KubeCluster, KubeError, KubeGuard, KubeOptions, KubeStatus, Listener, PortRef,
    ResolveError, ServiceKey, Store, WatchSpec,
};
use serde_json::json;
use support::fake_kube::{FakeKube, Kind};
use tokio::sync::mpsc;

const WAIT: Duration = Duration::from_secs(10);

/// Polls `cond` every 10 ms until it holds, or panics after 10 s with `what` and `context()`.
async fn wait_until(what: &str, mut cond: impl FnMut() -> bool, context: impl Fn() -> String) {
    let start = Instant::now();
    while start.elapsed() < WAIT {
        if cond() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("timed out after {WAIT:?} waiting for {what}\n{}", context());
}

/// Short retry delays, so that recoveries take milliseconds.
fn fast() -> KubeOptions {
    KubeOptions {
        retry_min: Duration::from_millis(20),
        retry_max: Duration::from_millis(200),
        ..KubeOptions::default()
    }
}

/// Service `name` in `default`: port 8000 named `http` to targetPort `http`.
fn service(name: &str) -> Service {
    serde_json::from_value(json!({
        "metadata": {"name": name, "namespace": "default"},
        "spec": {
            "selector": {"app": name},
            "ports": [{"name": "http", "port": 8000, "targetPort": "http", "protocol": "TCP"}],
        },
    }))
    .unwrap()
}

/// EndpointSlice `name` of `service` whose `http` port is `port`, one ready endpoint per
/// (ip, pod).
fn slice(name: &str, service: &str, port: u16, endpoints: &[(&str, &str)]) -> EndpointSlice {
    let endpoints: Vec<_> = endpoints
        .iter()
        .map(|(ip, pod)| {
            json!({
                "addresses": [ip],
                "conditions": {"ready": true},
                "targetRef": {"kind": "Pod", "name": pod, "namespace": "default"},
            })
        })
        .collect();
    serde_json::from_value(json!({
        "metadata": {
            "name": name,
            "namespace": "default",
            "labels": {"kubernetes.io/service-name": service},
        },
        "addressType": "IPv4",
        "ports": [{"name": "http", "port": port, "protocol": "TCP"}],
        "endpoints": endpoints,
    }))
    .unwrap()
}

/// A fake API server holding Service `web` and its slice `web-a` with one Pod at 10.0.0.1:8080.
async fn fake_with_web() -> FakeKube {
    let fake = FakeKube::start().await;
    fake.apply_service(&service("web"));
    fake.apply_slice(&slice("web-a", "web", 8080, &[("10.0.0.1", "web-1")]));
    fake
}

/// A fake, a kubeconfig for it, a store and a cluster named `test` watching `services`.
struct Env {
    fake: FakeKube,
    _dir: tempfile::TempDir,
    kubeconfig: PathBuf,
    store: Arc<Store>,
    cluster: Arc<KubeCluster>,
    guard: Option<KubeGuard>,
}

impl Env {
    fn new(fake: FakeKube, token: Option<&str>) -> Env {
        let dir = tempfile::tempdir().unwrap();
        let kubeconfig = dir.path().join("kubeconfig");
        fake.write_kubeconfig(&kubeconfig, token);
        let store = Store::new();
        let cluster = KubeCluster::with_options(
            "test",
            Access::Kubeconfig {
                path: kubeconfig.clone(),
                context: None,
            },
            Arc::clone(&store),
            fast(),
        )
        .unwrap();
        Env {
            fake,
            _dir: dir,
            kubeconfig,
            store,
            cluster,
            guard: None,
        }
    }

    fn start(&mut self, services: &[&str]) {
        let services = services
            .iter()
            .map(|s| WatchSpec::new("default", *s))
            .collect();
        self.guard = Some(self.cluster.start(services));
    }

    fn status(&self) -> KubeStatus {
        self.cluster.status()
    }

    /// `ip:port` of every endpoint of `service` for Service port 8000, or the error text.
    fn endpoints(&self, service: &str) -> Result<Vec<String>, String> {
        let key = ServiceKey::new("test", "default", service);
        let state = self.store.get(&key).ok_or("not in the store")?;
        let endpoints = state
            .endpoints(&PortRef::Number(8000))
            .map_err(|e| e.to_string())?;
        Ok(endpoints.iter().map(|e| e.addr.to_string()).collect())
    }

    fn context(&self) -> impl Fn() -> String + '_ {
        move || {
            format!(
                "status: {:?}\nfake: {} requests, {} lists, {} watches, {} open",
                self.status(),
                self.fake.requests(),
                self.fake.lists(),
                self.fake.watches(),
                self.fake.open_watches()
            )
        }
    }

    async fn wait_endpoints(&self, service: &str, want: &[&str]) {
        let want: Vec<String> = want.iter().map(|s| s.to_string()).collect();
        let context = self.context();
        wait_until(
            &format!("{service} to have endpoints {want:?}"),
            || self.endpoints(service).as_ref() == Ok(&want),
            || format!("now: {:?}\n{}", self.endpoints(service), context()),
        )
        .await;
    }

    async fn wait_status(&self, what: &str, cond: impl Fn(&KubeStatus) -> bool) {
        wait_until(what, || cond(&self.status()), self.context()).await;
    }

    /// Waits until the cluster has synced and both watches of every service are open.
    async fn wait_watching(&self, services: usize) {
        let context = self.context();
        wait_until(
            "every watch to be open",
            || self.status().synced && self.fake.open_watches() == 2 * services,
            context,
        )
        .await;
    }
}

fn errors(status: &KubeStatus, reason: &str) -> u64 {
    status.errors_by_reason.get(reason).copied().unwrap_or(0)
}

/// Sends the time of every store notification about `key`.
struct Timing {
    key: ServiceKey,
    tx: mpsc::UnboundedSender<Instant>,
}

impl Listener for Timing {
    fn changed(&self, keys: &[ServiceKey]) {
        if keys.contains(&self.key) {
            let _ = self.tx.send(Instant::now());
        }
    }
}

#[tokio::test]
async fn lists_then_watches_slices_into_the_store() {
    let fake = fake_with_web().await;
    let mut env = Env::new(fake, None);
    assert!(!env.status().synced, "not synced before start");
    // Listed twice: watched once.
    env.start(&["web", "web"]);
    env.wait_endpoints("web", &["10.0.0.1:8080"]).await;
    env.wait_watching(1).await;
    let status = env.status();
    assert!(status.connected, "{status:?}");
    assert_eq!((status.services, status.services_synced), (1, 1));
    assert!(status.last_sync.is_some());
    assert_eq!(status.relists, 0);
    assert_eq!(status.errors(), 0, "{status:?}");
    assert_eq!(
        env.fake.lists(),
        2,
        "one list of slices, one of the Service"
    );

    // ADDED: a second slice of the same service is merged, not overwriting the first.
    env.fake
        .apply_slice(&slice("web-b", "web", 8080, &[("10.0.0.2", "web-2")]));
    env.wait_endpoints("web", &["10.0.0.1:8080", "10.0.0.2:8080"])
        .await;

    // MODIFIED.
    env.fake.apply_slice(&slice(
        "web-a",
        "web",
        8080,
        &[("10.0.0.1", "web-1"), ("10.0.0.3", "web-3")],
    ));
    env.wait_endpoints("web", &["10.0.0.1:8080", "10.0.0.2:8080", "10.0.0.3:8080"])
        .await;

    // DELETED.
    env.fake.delete_slice("default", "web-b");
    env.wait_endpoints("web", &["10.0.0.1:8080", "10.0.0.3:8080"])
        .await;

    // A slice of another service in the namespace is not ours.
    env.fake
        .apply_slice(&slice("api-a", "api", 9000, &[("10.0.9.9", "api-1")]));
    // Relabelled away from the service: gone from it.
    env.fake
        .apply_slice(&slice("web-a", "other", 8080, &[("10.0.0.1", "web-1")]));
    env.wait_endpoints("web", &[]).await;
    assert!(env
        .store
        .get(&ServiceKey::new("test", "default", "api"))
        .is_none());

    let status = env.status();
    assert_eq!(status.events, 4, "{status:?}");
    assert_eq!(status.relists, 0);
    assert_eq!(env.fake.lists(), 2, "no relist");
}

#[tokio::test]
async fn target_port_is_mapped_per_slice_and_the_service_is_watched() {
    let fake = FakeKube::start().await;
    // A named targetPort may be a different number in different Pods, hence per slice.
    fake.apply_service(&service("web"));
    fake.apply_slice(&slice("web-a", "web", 8080, &[("10.0.0.1", "web-1")]));
    fake.apply_slice(&slice("web-b", "web", 9090, &[("10.0.0.2", "web-2")]));
    let mut env = Env::new(fake, None);
    env.start(&["web"]);
    env.wait_endpoints("web", &["10.0.0.1:8080", "10.0.0.2:9090"])
        .await;
    let key = ServiceKey::new("test", "default", "web");
    let state = env.store.get(&key).unwrap();
    let by_name = state.endpoints(&PortRef::Name("http".into())).unwrap();
    assert_eq!(by_name.len(), 2);
    assert_eq!(by_name[0].pod.as_deref(), Some("web-1"));
    assert_eq!(state.slices.len(), 2);

    // The Service changes its port: the watch of the Service carries it.
    let mut changed = service("web");
    changed.spec.as_mut().unwrap().ports.as_mut().unwrap()[0].port = 8001;
    env.fake.apply_service(&changed);
    let context = env.context();
    wait_until(
        "the new Service port to be known",
        || {
            env.store
                .get(&key)
                .is_some_and(|s| s.endpoints(&PortRef::Number(8001)).is_ok())
        },
        context,
    )
    .await;

    // The Service is deleted: its slices stay, but without a Service no port resolves.
    env.fake.delete_service("default", "web");
    let context = env.context();
    wait_until(
        "the Service to be gone",
        || {
            env.store
                .get(&key)
                .is_some_and(|s| s.service.is_none() && s.slices.len() == 2)
        },
        context,
    )
    .await;
    assert_eq!(
        env.store
            .get(&key)
            .unwrap()
            .endpoints(&PortRef::Number(8000)),
        Err(ResolveError::NoService)
    );
}

#[tokio::test]
async fn a_missing_service_is_stored_empty_once_listed() {
    let fake = FakeKube::start().await;
    let mut env = Env::new(fake, None);
    env.start(&["ghost"]);
    env.wait_status("sync", |s| s.synced).await;
    let state = env
        .store
        .get(&ServiceKey::new("test", "default", "ghost"))
        .unwrap();
    assert!(state.service.is_none() && state.slices.is_empty());

    // Created later: watched from the start.
    env.fake.apply_service(&service("ghost"));
    env.fake
        .apply_slice(&slice("ghost-a", "ghost", 8080, &[("10.0.0.7", "ghost-1")]));
    env.wait_endpoints("ghost", &["10.0.0.7:8080"]).await;
}

#[tokio::test]
async fn event_to_store_latency() {
    let fake = fake_with_web().await;
    let mut env = Env::new(fake, None);
    let key = ServiceKey::new("test", "default", "web");
    let (tx, mut rx) = mpsc::unbounded_channel();
    env.store.subscribe(Arc::new(Timing { key, tx }));
    env.start(&["web"]);
    env.wait_watching(1).await;
    while rx.try_recv().is_ok() {}

    let mut samples = Vec::new();
    for i in 0..50u8 {
        let ip = format!("10.0.1.{i}");
        let sent = Instant::now();
        env.fake
            .apply_slice(&slice("web-a", "web", 8080, &[(&ip, "web-1")]));
        let stored = tokio::time::timeout(WAIT, rx.recv())
            .await
            .expect("store notified in time")
            .unwrap();
        samples.push(stored.duration_since(sent));
    }
    samples.sort();
    println!(
        "event -> store over {} events on loopback: min {:?}, median {:?}, p90 {:?}, max {:?}",
        samples.len(),
        samples[0],
        samples[samples.len() / 2],
        samples[samples.len() * 9 / 10],
        samples[samples.len() - 1]
    );
}

#[tokio::test]
async fn outage_keeps_the_store_then_recovers() {
    let fake = fake_with_web().await;
    let mut env = Env::new(fake, None);
    env.start(&["web"]);
    env.wait_endpoints("web", &["10.0.0.1:8080"]).await;
    env.wait_watching(1).await;
    let key = ServiceKey::new("test", "default", "web");
    let before = env.store.get(&key).unwrap();

    env.fake.pause();
    env.wait_status("the outage to be seen", |s| {
        !s.connected && errors(s, "connect") >= 2
    })
    .await;
    let status = env.status();
    assert!(
        status
            .last_error
            .as_deref()
            .is_some_and(|e| e.contains("cannot reach the API server")),
        "{status:?}"
    );
    assert!(status.synced, "a synced cluster stays synced: {status:?}");
    // Nothing removed, nothing even rewritten.
    assert!(Arc::ptr_eq(&before, &env.store.get(&key).unwrap()));

    // Changes made while podgate could not see them arrive with the resumed watch.
    env.fake
        .apply_slice(&slice("web-b", "web", 8080, &[("10.0.0.2", "web-2")]));
    let lists = env.fake.lists();
    env.fake.resume().await;
    env.wait_endpoints("web", &["10.0.0.1:8080", "10.0.0.2:8080"])
        .await;
    env.wait_status("connected again", |s| s.connected && s.last_error.is_none())
        .await;
    assert_eq!(env.status().relists, 0, "resumed from its resourceVersion");
    assert_eq!(env.fake.lists(), lists, "no relist needed");
}

#[tokio::test]
async fn unavailable_server_counts_server_errors_and_keeps_the_store() {
    let fake = fake_with_web().await;
    let mut env = Env::new(fake, None);
    env.start(&["web"]);
    env.wait_watching(1).await;

    env.fake.pause_unavailable();
    env.wait_status("503s to be counted", |s| {
        !s.connected && errors(s, "server_error") >= 2
    })
    .await;
    assert_eq!(env.endpoints("web"), Ok(vec!["10.0.0.1:8080".to_string()]));
    env.fake.resume().await;
    env.wait_status("connected again", |s| s.connected).await;
    env.wait_watching(1).await;
    env.fake.delete_slice("default", "web-a");
    env.wait_endpoints("web", &[]).await;
}

#[tokio::test]
async fn gone_relists_and_drops_a_slice_deleted_during_the_outage() {
    let fake = fake_with_web().await;
    fake.apply_slice(&slice("web-b", "web", 8080, &[("10.0.0.2", "web-2")]));
    let mut env = Env::new(fake, None);
    env.start(&["web"]);
    env.wait_endpoints("web", &["10.0.0.1:8080", "10.0.0.2:8080"])
        .await;
    env.wait_watching(1).await;

    env.fake.pause();
    env.wait_status("the outage", |s| !s.connected).await;
    // Deleted while podgate was away, and the history compacted: the resumed watch gets 410
    // and only a fresh list can tell that web-b is gone.
    env.fake.delete_slice("default", "web-b");
    env.fake
        .apply_slice(&slice("web-c", "web", 8080, &[("10.0.0.3", "web-3")]));
    env.fake.expire(env.fake.resource_version());
    env.fake.resume().await;
    env.wait_endpoints("web", &["10.0.0.1:8080", "10.0.0.3:8080"])
        .await;
    let status = env.status();
    assert!(status.relists >= 1, "{status:?}");
    assert!(errors(&status, "gone") >= 1, "{status:?}");
    env.wait_status("connected again", |s| s.connected && s.last_error.is_none())
        .await;

    // A 410 on an open watch (ERROR event) relists too.
    env.wait_watching(1).await;
    let relists = env.status().relists;
    env.fake.send_gone();
    env.wait_status("a relist after the ERROR event", |s| {
        s.relists >= relists + 2
    })
    .await;
    env.wait_endpoints("web", &["10.0.0.1:8080", "10.0.0.3:8080"])
        .await;
}

#[tokio::test]
async fn gone_as_an_http_status_relists_too() {
    let fake = fake_with_web().await;
    fake.apply_slice(&slice("web-b", "web", 8080, &[("10.0.0.2", "web-2")]));
    fake.gone_as_http(true);
    let mut env = Env::new(fake, None);
    env.start(&["web"]);
    env.wait_watching(1).await;
    env.fake.pause();
    env.wait_status("the outage", |s| !s.connected).await;
    env.fake.delete_slice("default", "web-b");
    env.fake.expire(env.fake.resource_version());
    env.fake.resume().await;
    env.wait_endpoints("web", &["10.0.0.1:8080"]).await;
    let status = env.status();
    assert!(status.relists >= 1, "{status:?}");
    assert!(errors(&status, "gone") >= 1, "{status:?}");
}

#[tokio::test]
async fn bookmarks_move_the_resource_version_on() {
    let fake = fake_with_web().await;
    let mut env = Env::new(fake, None);
    env.start(&["web"]);
    env.wait_watching(1).await;
    // Changes the watches do not see move the server's resourceVersion on ...
    env.fake
        .apply_slice(&slice("api-a", "api", 9000, &[("10.0.9.9", "api-1")]));
    // ... the bookmark tells the watches, and history before it is compacted away.
    env.fake.send_bookmarks();
    env.fake.expire(env.fake.resource_version());
    let (lists, watches) = (env.fake.lists(), env.fake.watches());
    env.fake.drop_watches();
    let context = env.context();
    wait_until(
        "both watches to resume",
        || env.fake.watches() >= watches + 2 && env.fake.open_watches() == 2,
        context,
    )
    .await;
    let status = env.status();
    assert_eq!(
        errors(&status, "gone"),
        0,
        "resumed from the bookmark: {status:?}"
    );
    assert_eq!(env.fake.lists(), lists, "no relist");
    assert_eq!(status.relists, 0);
}

#[tokio::test]
async fn rejected_credentials_are_counted_and_keep_the_store() {
    let fake = fake_with_web().await;
    fake.set_auth(Some("good-token"));
    let mut env = Env::new(fake, Some("good-token"));
    env.start(&["web"]);
    env.wait_endpoints("web", &["10.0.0.1:8080"]).await;
    env.wait_watching(1).await;

    // The server stops accepting the token (revoked); the watches reconnect and get 401.
    env.fake.set_auth(Some("rotated-token"));
    env.fake.drop_watches();
    env.wait_status("401s to be counted", |s| {
        !s.connected && errors(s, "unauthorized") >= 2
    })
    .await;
    let status = env.status();
    assert!(
        status
            .last_error
            .as_deref()
            .is_some_and(|e| e.contains("rejected the credentials")),
        "{status:?}"
    );
    assert_eq!(env.endpoints("web"), Ok(vec!["10.0.0.1:8080".to_string()]));

    env.fake.set_auth(Some("good-token"));
    env.wait_status("connected again", |s| s.connected && s.last_error.is_none())
        .await;
}

#[tokio::test]
async fn wrong_credentials_from_the_start_never_fill_the_store() {
    let fake = FakeKube::start().await;
    fake.apply_service(&service("web"));
    fake.set_auth(Some("good-token"));
    let mut env = Env::new(fake, Some("bad-token"));
    env.start(&["web"]);
    env.wait_status("401s", |s| errors(s, "unauthorized") >= 4)
        .await;
    let status = env.status();
    assert!(!status.connected && !status.synced, "{status:?}");
    assert!(env.store.keys().is_empty());

    // A token file (Access::Server) with the right token works.
    let token = env.kubeconfig.with_file_name("token");
    // kube sends the file's content as is, so a trailing newline is refused up front.
    std::fs::write(&token, "good-token\n").unwrap();
    let err = KubeCluster::new(
        "test",
        Access::Server {
            url: env.fake.url(),
            token_file: Some(token.clone()),
            ca_file: None,
        },
        Arc::clone(&env.store),
    )
    .map(|_| ())
    .unwrap_err();
    assert!(matches!(err, KubeError::TokenFile { .. }), "{err}");
    assert!(err.to_string().contains("whitespace"), "{err}");
    std::fs::write(&token, "good-token").unwrap();
    let cluster = KubeCluster::with_options(
        "test",
        Access::Server {
            url: env.fake.url(),
            token_file: Some(token),
            ca_file: None,
        },
        Arc::clone(&env.store),
        fast(),
    )
    .unwrap();
    let _guard = cluster.start(vec![WatchSpec::new("default", "web")]);
    wait_until(
        "sync through the token file",
        || cluster.status().synced,
        || format!("{:?}", cluster.status()),
    )
    .await;
    assert!(cluster.status().connected);
    assert!(env.endpoints("web").is_ok());
}

#[tokio::test]
async fn scripted_failures_are_counted_by_reason_then_sync() {
    let fake = fake_with_web().await;
    fake.fail_next(2, 403);
    fake.fail_next(2, 500);
    let mut env = Env::new(fake, None);
    env.start(&["web"]);
    env.wait_endpoints("web", &["10.0.0.1:8080"]).await;
    env.wait_status("connected", |s| s.connected).await;
    let status = env.status();
    assert_eq!(errors(&status, "forbidden"), 2, "{status:?}");
    assert_eq!(errors(&status, "server_error"), 2, "{status:?}");
    assert_eq!(status.last_error, None);
}

#[tokio::test]
async fn slices_without_their_service_are_never_published() {
    // RBAC allows EndpointSlices but not Services: the slices list fine, but without the
    // Service no port can be mapped, so nothing is published rather than a half state.
    let fake = fake_with_web().await;
    fake.forbid(Kind::Service, true);
    let mut env = Env::new(fake, None);
    env.start(&["web"]);
    env.wait_status("403s on the Service", |s| errors(s, "forbidden") >= 3)
        .await;
    let status = env.status();
    assert!(!status.connected && !status.synced, "{status:?}");
    assert!(
        status
            .last_error
            .as_deref()
            .is_some_and(|e| e.starts_with("Service default/web: access denied")),
        "{status:?}"
    );
    assert!(env.store.keys().is_empty());

    env.fake.forbid(Kind::Service, false);
    env.wait_endpoints("web", &["10.0.0.1:8080"]).await;
    env.wait_status("synced", |s| s.synced && s.connected).await;
}

#[tokio::test]
async fn a_cluster_down_at_start_comes_up_when_it_answers() {
    let fake = FakeKube::start_paused().await;
    fake.apply_service(&service("web"));
    fake.apply_slice(&slice("web-a", "web", 8080, &[("10.0.0.1", "web-1")]));
    let mut env = Env::new(fake, None);
    env.start(&["web"]);
    env.wait_status("connection errors", |s| errors(s, "connect") >= 3)
        .await;
    let status = env.status();
    assert!(!status.connected && !status.synced, "{status:?}");
    assert_eq!(status.services_synced, 0);
    assert!(env.store.keys().is_empty());

    env.fake.resume().await;
    env.wait_endpoints("web", &["10.0.0.1:8080"]).await;
    env.wait_status("synced and connected", |s| s.synced && s.connected)
        .await;
}

#[tokio::test]
async fn dropping_the_guard_stops_the_watches_and_keeps_the_store() {
    let fake = FakeKube::start().await;
    fake.apply_service(&service("web"));
    fake.apply_service(&service("api"));
    fake.apply_slice(&slice("web-a", "web", 8080, &[("10.0.0.1", "web-1")]));
    let mut env = Env::new(fake, None);
    env.start(&["web", "api"]);
    env.wait_watching(2).await;
    assert_eq!(env.status().services, 2);
    env.guard = None;
    let context = env.context();
    wait_until(
        "the watches to close",
        || env.fake.open_watches() == 0,
        context,
    )
    .await;
    let status = env.status();
    assert_eq!(status.services, 0, "{status:?}");
    assert_eq!(env.endpoints("web"), Ok(vec!["10.0.0.1:8080".to_string()]));
    assert_eq!(env.store.keys().len(), 2);
}

#[test]
fn bad_access_is_reported_before_any_connection() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::new();
    let new = |access| KubeCluster::new("c1", access, Arc::clone(&store)).map(|_| ());

    let missing = dir.path().join("missing");
    let err = new(Access::Kubeconfig {
        path: missing,
        context: None,
    })
    .unwrap_err();
    assert!(matches!(err, KubeError::Kubeconfig { .. }), "{err}");
    assert!(err.to_string().contains("cluster c1"), "{err}");

    let kubeconfig = dir.path().join("kubeconfig");
    let write = |user: &str| {
        std::fs::write(
            &kubeconfig,
            format!(
                "apiVersion: v1\nkind: Config\nclusters:\n  - name: k\n    cluster: {{server: 'https://127.0.0.1:6443'}}\n\
                 users:\n  - name: u\n    user: {user}\n\
                 contexts:\n  - name: one\n    context: {{cluster: k, user: u}}\n  - name: two\n    context: {{cluster: k, user: u}}\n"
            ),
        )
        .unwrap()
    };
    write("{token: abc}");
    let err = new(Access::Kubeconfig {
        path: kubeconfig.clone(),
        context: Some("three".into()),
    })
    .unwrap_err();
    assert!(
        matches!(&err, KubeError::UnknownContext { context, available, .. }
            if context == "three" && available == &["one", "two"]),
        "{err}"
    );
    let err = new(Access::Kubeconfig {
        path: kubeconfig.clone(),
        context: None,
    })
    .unwrap_err();
    assert!(matches!(err, KubeError::NoContext { .. }), "{err}");
    new(Access::Kubeconfig {
        path: kubeconfig.clone(),
        context: Some("two".into()),
    })
    .unwrap();

    write("{exec: {apiVersion: client.authentication.k8s.io/v1, command: aws}}");
    let err = new(Access::Kubeconfig {
        path: kubeconfig.clone(),
        context: Some("one".into()),
    })
    .unwrap_err();
    assert!(
        matches!(err, KubeError::UnsupportedCredentials { .. }),
        "{err}"
    );
    assert!(err.to_string().contains("exec credential plugin"), "{err}");

    write("{tokenFile: /nonexistent/token}");
    let err = new(Access::Kubeconfig {
        path: kubeconfig.clone(),
        context: Some("one".into()),
    })
    .unwrap_err();
    assert!(matches!(err, KubeError::TokenFile { .. }), "{err}");

    let err = new(Access::Server {
        url: "not a url".into(),
        token_file: None,
        ca_file: None,
    })
    .unwrap_err();
    assert!(matches!(err, KubeError::Url { .. }), "{err}");
    let err = new(Access::Server {
        url: "ftp://example.com".into(),
        token_file: None,
        ca_file: None,
    })
    .unwrap_err();
    assert!(matches!(err, KubeError::Url { .. }), "{err}");

    // A real CA is accepted (this also proves the ring TLS provider is in place); junk is not.
    let pki = support::make_pki(dir.path(), "kube", &["localhost"]);
    new(Access::Server {
        url: "https://127.0.0.1:6443".into(),
        token_file: None,
        ca_file: Some(pki.ca_pem.clone()),
    })
    .unwrap();
    let junk = dir.path().join("junk.pem");
    std::fs::write(&junk, "not a certificate").unwrap();
    let err = new(Access::Server {
        url: "https://127.0.0.1:6443".into(),
        token_file: None,
        ca_file: Some(junk),
    })
    .unwrap_err();
    assert!(matches!(err, KubeError::Tls { .. }), "{err}");
    let err = new(Access::Server {
        url: "https://127.0.0.1:6443".into(),
        token_file: Some(dir.path().join("no-token")),
        ca_file: None,
    })
    .unwrap_err();
    assert!(matches!(err, KubeError::TokenFile { .. }), "{err}");

    // Not in a Pod: no service-account environment.
    if std::env::var_os("KUBERNETES_SERVICE_HOST").is_none() {
        let err = new(Access::InCluster).unwrap_err();
        assert!(matches!(err, KubeError::InCluster { .. }), "{err}");
    }
}

// ---- label subsets: the Pod watches ----

/// Pod `name` in `default` with labels app=web and version=`version`.
fn pod(name: &str, version: &str) -> k8s_openapi::api::core::v1::Pod {
    serde_json::from_value(json!({
        "metadata": {"name": name, "namespace": "default",
                     "labels": {"app": "web", "version": version}},
        "spec": {"containers": [{"name": "web", "image": "web"}]},
        "status": {"phase": "Running"},
    }))
    .unwrap()
}

fn version(v: &str) -> std::collections::BTreeMap<String, String> {
    [("version".to_string(), v.to_string())].into()
}

fn subset_key(service: &str, v: &str) -> ServiceKey {
    ServiceKey::new("test", "default", service).with_labels(&version(v))
}

impl Env {
    fn start_specs(&mut self, specs: Vec<WatchSpec>) {
        self.guard = Some(self.cluster.start(specs));
    }

    /// `ip:port` of every endpoint of `key` for Service port 8000, or the error text.
    fn key_endpoints(&self, key: &ServiceKey) -> Result<Vec<String>, String> {
        let state = self.store.get(key).ok_or("not in the store")?;
        let endpoints = state
            .endpoints(&PortRef::Number(8000))
            .map_err(|e| e.to_string())?;
        Ok(endpoints.iter().map(|e| e.addr.to_string()).collect())
    }

    async fn wait_subset(&self, v: &str, want: &[&str]) {
        let key = subset_key("web", v);
        let want: Vec<String> = want.iter().map(|s| s.to_string()).collect();
        let context = self.context();
        wait_until(
            &format!("{key} to have endpoints {want:?}"),
            || self.key_endpoints(&key).as_ref() == Ok(&want),
            || format!("now: {:?}\n{}", self.key_endpoints(&key), context()),
        )
        .await;
    }
}

/// Service web with three endpoints (web-1 v1, web-2 v2, web-3 v1) and their Pods, plus a v1
/// Pod that is not an endpoint of web.
fn web_with_pods(fake: &FakeKube) {
    fake.apply_service(&service("web"));
    fake.apply_slice(&slice(
        "web-a",
        "web",
        8080,
        &[
            ("10.0.0.1", "web-1"),
            ("10.0.0.2", "web-2"),
            ("10.0.0.3", "web-3"),
        ],
    ));
    for (name, v) in [
        ("web-1", "v1"),
        ("web-2", "v2"),
        ("web-3", "v1"),
        ("other", "v1"),
    ] {
        fake.apply_pod(&pod(name, v));
    }
}

#[tokio::test]
async fn label_subsets_follow_their_pods() {
    let fake = FakeKube::start().await;
    web_with_pods(&fake);
    let mut env = Env::new(fake, None);
    // The whole Service and two subsets of it: one task, two Pod watches, no Pod watch for the
    // whole Service.
    env.start_specs(vec![
        WatchSpec::new("default", "web").with_labels(version("v2")),
        WatchSpec::new("default", "web"),
        WatchSpec::new("default", "web").with_labels(version("v1")),
        WatchSpec::new("default", "web").with_labels(version("v1")),
    ]);
    env.wait_subset("v1", &["10.0.0.1:8080", "10.0.0.3:8080"])
        .await;
    env.wait_subset("v2", &["10.0.0.2:8080"]).await;
    env.wait_endpoints("web", &["10.0.0.1:8080", "10.0.0.2:8080", "10.0.0.3:8080"])
        .await;
    let context = env.context();
    wait_until(
        "the four watches to be open",
        || env.status().synced && env.fake.open_watches() == 4,
        context,
    )
    .await;
    let status = env.status();
    assert_eq!((status.services, status.services_synced), (1, 1));
    assert_eq!(env.fake.lists(), 4, "slices, Service, and Pods per subset");

    // A Pod relabelled: it moves from one subset to the other; the whole Service is unmoved.
    let whole = env
        .store
        .get(&ServiceKey::new("test", "default", "web"))
        .unwrap();
    env.fake.apply_pod(&pod("web-3", "v2"));
    env.wait_subset("v2", &["10.0.0.2:8080", "10.0.0.3:8080"])
        .await;
    env.wait_subset("v1", &["10.0.0.1:8080"]).await;
    assert!(Arc::ptr_eq(
        &whole,
        &env.store
            .get(&ServiceKey::new("test", "default", "web"))
            .unwrap()
    ));
    // A Pod deleted leaves its subset, even while its endpoint is still in the slice.
    env.fake.delete_pod("default", "web-1");
    env.wait_subset("v1", &[]).await;
    // Endpoint changes reach the subsets too.
    env.fake.apply_pod(&pod("web-4", "v1"));
    env.fake.apply_slice(&slice(
        "web-a",
        "web",
        8080,
        &[
            ("10.0.0.2", "web-2"),
            ("10.0.0.3", "web-3"),
            ("10.0.0.4", "web-4"),
        ],
    ));
    env.wait_subset("v1", &["10.0.0.4:8080"]).await;
    env.wait_subset("v2", &["10.0.0.2:8080", "10.0.0.3:8080"])
        .await;

    // An outage keeps every subset; a Pod deleted meanwhile (history compacted: 410) is dropped
    // by the relist.
    let v2 = env.store.get(&subset_key("web", "v2")).unwrap();
    env.fake.pause();
    env.wait_status("the outage", |s| !s.connected && errors(s, "connect") >= 4)
        .await;
    assert!(Arc::ptr_eq(
        &v2,
        &env.store.get(&subset_key("web", "v2")).unwrap()
    ));
    env.fake.delete_pod("default", "web-2");
    env.fake.expire(env.fake.resource_version());
    env.fake.resume().await;
    env.wait_subset("v2", &["10.0.0.3:8080"]).await;
    let status = env.status();
    assert!(
        status.relists >= 1 && errors(&status, "gone") >= 1,
        "{status:?}"
    );
    env.wait_subset("v1", &["10.0.0.4:8080"]).await;
}

#[tokio::test]
async fn a_subset_is_published_only_once_its_pods_are_listed() {
    // RBAC without pods: the whole Service works, the subset waits (never shown empty).
    let fake = FakeKube::start().await;
    web_with_pods(&fake);
    fake.forbid(Kind::Pod, true);
    let mut env = Env::new(fake, None);
    env.start_specs(vec![
        WatchSpec::new("default", "web"),
        WatchSpec::new("default", "web").with_labels(version("v1")),
    ]);
    env.wait_status("403s on the Pods", |s| errors(s, "forbidden") >= 3)
        .await;
    env.wait_endpoints("web", &["10.0.0.1:8080", "10.0.0.2:8080", "10.0.0.3:8080"])
        .await;
    let status = env.status();
    assert!(!status.synced, "{status:?}");
    assert!(
        status.last_error.as_deref().is_some_and(|e| e
            .starts_with("Pods version=v1 of default/web: access denied")
            && e.contains("pods")),
        "{status:?}"
    );
    assert_eq!(env.store.get(&subset_key("web", "v1")), None);

    env.fake.forbid(Kind::Pod, false);
    env.wait_subset("v1", &["10.0.0.1:8080", "10.0.0.3:8080"])
        .await;
    env.wait_status("synced", |s| s.synced && s.connected).await;
}

#[tokio::test]
async fn only_subsets_asked_for_publish_no_whole_service() {
    let fake = FakeKube::start().await;
    web_with_pods(&fake);
    let mut env = Env::new(fake, None);
    env.start_specs(vec![
        WatchSpec::new("default", "web").with_labels(version("v2"))
    ]);
    env.wait_subset("v2", &["10.0.0.2:8080"]).await;
    assert_eq!(env.store.keys(), [subset_key("web", "v2")]);
}

#[tokio::test]
async fn a_bookmark_alone_keeps_the_cluster_fresh() {
    let fake = fake_with_web().await;
    let mut env = Env::new(fake, None);
    env.start(&["web"]);
    env.wait_watching(1).await;
    let synced_at = env.status().last_sync.expect("synced");
    let lists = env.fake.lists();
    // Nothing changes; the API server only confirms that with a bookmark.
    let context = env.context();
    wait_until(
        "a bookmark to move last_sync",
        || {
            env.fake.send_bookmarks();
            env.status().last_sync.is_some_and(|t| t > synced_at)
        },
        context,
    )
    .await;
    assert_eq!(env.fake.lists(), lists, "freshness without a relist");
    assert_eq!(env.status().events, 0, "no event either");
}
