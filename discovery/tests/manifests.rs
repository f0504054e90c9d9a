//! `ManifestsCluster`: real files in a temporary folder.

use std::fs;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use podgate_discovery::{ManifestsCluster, ManifestsError, PortRef, ServiceKey, Store};

const CLUSTER: &str = "local";

fn httpbin(ips: &[&str]) -> String {
    let endpoints: String = ips
        .iter()
        .map(|ip| format!("  - addresses: [\"{ip}\"]\n    conditions: {{ready: true}}\n"))
        .collect();
    format!(
        "apiVersion: v1
kind: Service
metadata:
  name: httpbin
spec:
  ports:
  - name: http
    port: 8000
    targetPort: 80
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: httpbin-abc
  labels:
    kubernetes.io/service-name: httpbin
addressType: IPv4
ports:
- name: http
  port: 80
endpoints:
{endpoints}"
    )
}

fn key(service: &str) -> ServiceKey {
    ServiceKey::new(CLUSTER, "default", service)
}

/// Addresses of `service` on port 8000, or None if the store has nothing usable.
fn addrs(store: &Store, service: &str) -> Option<Vec<String>> {
    let state = store.get(&key(service))?;
    let endpoints = state.endpoints(&PortRef::Number(8000)).ok()?;
    Some(endpoints.iter().map(|e| e.addr.to_string()).collect())
}

/// Writes like an editor that saves atomically: a temp file, then a rename into place.
fn save(dir: &Path, name: &str, content: &str) {
    let temp = dir.join(format!(".{name}.tmp"));
    fs::write(&temp, content).unwrap();
    fs::rename(&temp, dir.join(name)).unwrap();
}

/// Polls `condition` every 10 ms for up to 5 s.
fn eventually(what: &str, mut condition: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(5);
    while !condition() {
        assert!(Instant::now() < deadline, "timed out waiting for: {what}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn setup() -> (tempfile::TempDir, Arc<Store>) {
    (tempfile::tempdir().unwrap(), Store::new())
}

#[test]
fn initial_load_reads_multi_document_files() {
    let (dir, store) = setup();
    fs::write(
        dir.path().join("httpbin.yaml"),
        httpbin(&["10.0.0.2", "10.0.0.1"]),
    )
    .unwrap();
    // One file with two Services, another namespace, a `.yml` name and an ignored kind.
    fs::write(
        dir.path().join("more.yml"),
        "---
apiVersion: v1
kind: ConfigMap
metadata: {name: ignored}
---
apiVersion: v1
kind: Service
metadata: {name: web, namespace: shop}
spec: {ports: [{port: 8000}]}
---
apiVersion: v1
kind: Service
metadata: {name: api, namespace: shop}
spec: {ports: [{port: 8000}]}
---
",
    )
    .unwrap();

    let manifests = ManifestsCluster::load(CLUSTER, dir.path(), store.clone()).unwrap();
    assert_eq!(
        addrs(&store, "httpbin").unwrap(),
        ["10.0.0.1:80", "10.0.0.2:80"]
    );
    assert_eq!(
        store.keys(),
        [
            key("httpbin"),
            ServiceKey::new(CLUSTER, "shop", "api"),
            ServiceKey::new(CLUSTER, "shop", "web"),
        ]
    );
    let status = manifests.status();
    assert_eq!((status.reloads, status.errors, status.files), (1, 0, 2));
    assert_eq!(status.last_error, None);
    assert!(status.last_reload.is_some());
}

#[test]
fn kubectl_list_output_is_understood() {
    let (dir, store) = setup();
    let items: String = httpbin(&["10.0.0.1"])
        .split("---\n")
        .map(|doc| {
            let mut lines = doc.lines();
            let first = format!("- {}\n", lines.next().unwrap());
            first + &lines.map(|l| format!("  {l}\n")).collect::<String>()
        })
        .collect();
    fs::write(
        dir.path().join("dump.yaml"),
        format!("apiVersion: v1\nkind: List\nitems:\n{items}"),
    )
    .unwrap();
    ManifestsCluster::load(CLUSTER, dir.path(), store.clone()).unwrap();
    assert_eq!(addrs(&store, "httpbin").unwrap(), ["10.0.0.1:80"]);
}

#[test]
fn hidden_and_editor_files_are_ignored() {
    let (dir, store) = setup();
    for name in [
        ".httpbin.yaml",
        ".#httpbin.yaml",
        "httpbin.yaml~",
        "#httpbin.yaml#",
        "httpbin.yaml.swp",
        "httpbin.json",
    ] {
        fs::write(dir.path().join(name), httpbin(&["10.0.0.1"])).unwrap();
    }
    let manifests = ManifestsCluster::load(CLUSTER, dir.path(), store.clone()).unwrap();
    assert!(store.keys().is_empty());
    assert_eq!(manifests.status().files, 0);
}

#[test]
fn missing_folder_is_an_error() {
    let (dir, store) = setup();
    let missing = dir.path().join("nope");
    match ManifestsCluster::load(CLUSTER, &missing, store) {
        Err(ManifestsError::ReadDir { dir, .. }) => assert_eq!(dir, missing),
        other => panic!("expected ReadDir, got {:?}", other.map(|_| ())),
    }
}

#[test]
fn an_edit_reaches_the_store_through_the_watch() {
    let (dir, store) = setup();
    save(dir.path(), "httpbin.yaml", &httpbin(&["10.0.0.1"]));
    let manifests = ManifestsCluster::load(CLUSTER, dir.path(), store.clone()).unwrap();
    let _watch = manifests.watch().unwrap();

    let started = Instant::now();
    save(
        dir.path(),
        "httpbin.yaml",
        &httpbin(&["10.0.0.1", "10.0.0.2"]),
    );
    eventually("the edit", || {
        addrs(&store, "httpbin") == Some(vec!["10.0.0.1:80".into(), "10.0.0.2:80".into()])
    });
    assert!(
        started.elapsed() < Duration::from_secs(1),
        "took {:?}",
        started.elapsed()
    );

    // A new file, written in place rather than renamed, is seen too.
    fs::write(
        dir.path().join("web.yaml"),
        httpbin(&["10.0.1.1"]).replace("httpbin", "web"),
    )
    .unwrap();
    eventually("the new file", || {
        addrs(&store, "web") == Some(vec!["10.0.1.1:80".into()])
    });
}

#[test]
fn the_watch_stops_with_its_guard() {
    let (dir, store) = setup();
    let manifests = ManifestsCluster::load(CLUSTER, dir.path(), store.clone()).unwrap();
    let watch = manifests.watch().unwrap();
    drop(watch);
    let reloads = manifests.status().reloads;
    save(dir.path(), "httpbin.yaml", &httpbin(&["10.0.0.1"]));
    // The only way to see "nothing happens" is to give it the time it would have taken.
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(manifests.status().reloads, reloads);
    assert!(store.keys().is_empty());
}

#[test]
fn watch_works_from_inside_a_tokio_runtime() {
    let (dir, store) = setup();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let manifests = ManifestsCluster::load(CLUSTER, dir.path(), store.clone()).unwrap();
        let _watch = manifests.watch().unwrap();
        save(dir.path(), "httpbin.yaml", &httpbin(&["10.0.0.1"]));
        let deadline = Instant::now() + Duration::from_secs(5);
        while addrs(&store, "httpbin").is_none() {
            assert!(Instant::now() < deadline, "timed out");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    });
}

#[test]
fn a_broken_file_keeps_its_last_good_content() {
    let (dir, store) = setup();
    save(dir.path(), "httpbin.yaml", &httpbin(&["10.0.0.1"]));
    let manifests = ManifestsCluster::load(CLUSTER, dir.path(), store.clone()).unwrap();

    // A YAML syntax error in the second document.
    let broken = httpbin(&["10.0.0.2"]).replace("  port: 80\n", "  port: 80\n   bad: [\n");
    save(dir.path(), "httpbin.yaml", &broken);
    manifests.reload();
    let status = manifests.status();
    assert_eq!(status.errors, 1);
    let error = status.last_error.unwrap();
    assert!(error.contains("httpbin.yaml"), "{error}");
    assert!(error.contains("document 2"), "{error}");
    assert!(error.contains("line 21 column 7"), "{error}");
    assert_eq!(addrs(&store, "httpbin").unwrap(), ["10.0.0.1:80"]);

    // Re-reading the same broken content neither reports it again nor loses the last good state.
    manifests.reload();
    assert_eq!(manifests.status().errors, 1);
    assert!(manifests.status().last_error.is_some());

    // A type error (valid YAML) names the line of the bad value.
    save(
        dir.path(),
        "httpbin.yaml",
        &httpbin(&["10.0.0.2"]).replace("port: 8000", "port: eighty"),
    );
    manifests.reload();
    let status = manifests.status();
    assert_eq!(status.errors, 2);
    let error = status.last_error.unwrap();
    assert!(error.contains("document 1, line 8"), "{error}");
    assert_eq!(addrs(&store, "httpbin").unwrap(), ["10.0.0.1:80"]);

    // Fixed: the new content applies and the problem is gone.
    save(dir.path(), "httpbin.yaml", &httpbin(&["10.0.0.2"]));
    manifests.reload();
    assert_eq!(addrs(&store, "httpbin").unwrap(), ["10.0.0.2:80"]);
    let status = manifests.status();
    assert_eq!((status.errors, status.last_error), (2, None));
}

#[test]
fn a_file_broken_from_the_start_contributes_nothing() {
    let (dir, store) = setup();
    fs::write(dir.path().join("broken.yaml"), "kind: Service\n  oops: [\n").unwrap();
    save(dir.path(), "httpbin.yaml", &httpbin(&["10.0.0.1"]));
    let manifests = ManifestsCluster::load(CLUSTER, dir.path(), store.clone()).unwrap();
    assert_eq!(store.keys(), [key("httpbin")]);
    let status = manifests.status();
    assert_eq!((status.errors, status.files), (1, 2));
    assert!(status.last_error.unwrap().contains("broken.yaml"));
}

#[test]
fn a_slice_without_service_label_is_reported_and_skipped() {
    let (dir, store) = setup();
    let content = httpbin(&["10.0.0.1"]).replace("kubernetes.io/service-name", "app");
    save(dir.path(), "httpbin.yaml", &content);
    let manifests = ManifestsCluster::load(CLUSTER, dir.path(), store.clone()).unwrap();
    // The Service from the same file still applies.
    let state = store.get(&key("httpbin")).unwrap();
    assert!(state.service.is_some());
    assert!(state.slices.is_empty());
    let status = manifests.status();
    assert_eq!(status.errors, 1);
    assert!(status.last_error.unwrap().contains("httpbin-abc"));
}

#[test]
fn deleting_a_file_removes_its_services() {
    let (dir, store) = setup();
    save(dir.path(), "httpbin.yaml", &httpbin(&["10.0.0.1"]));
    save(
        dir.path(),
        "web.yaml",
        &httpbin(&["10.0.1.1"]).replace("httpbin", "web"),
    );
    let manifests = ManifestsCluster::load(CLUSTER, dir.path(), store.clone()).unwrap();
    let _watch = manifests.watch().unwrap();
    assert_eq!(store.keys(), [key("httpbin"), key("web")]);

    fs::remove_file(dir.path().join("web.yaml")).unwrap();
    eventually("the removal", || store.keys() == [key("httpbin")]);
    assert_eq!(manifests.status().files, 1);
}

#[test]
fn service_and_slices_may_live_in_different_files() {
    let (dir, store) = setup();
    let content = httpbin(&["10.0.0.1"]);
    let (service, slice) = content.split_once("---\n").unwrap();
    save(dir.path(), "a-service.yaml", service);
    save(dir.path(), "b-slice.yaml", slice);
    let manifests = ManifestsCluster::load(CLUSTER, dir.path(), store.clone()).unwrap();
    assert_eq!(addrs(&store, "httpbin").unwrap(), ["10.0.0.1:80"]);

    fs::remove_file(dir.path().join("a-service.yaml")).unwrap();
    manifests.reload();
    let state = store.get(&key("httpbin")).unwrap();
    assert!(state.service.is_none());
    assert_eq!(state.slices.len(), 1);
}

/// Service httpbin with one slice whose endpoints 10.0.0.<i> name Pods `httpbin-<i>`.
fn httpbin_with_pods(pods: usize) -> String {
    let endpoints: String = (1..=pods)
        .map(|i| {
            format!(
                "  - addresses: [\"10.0.0.{i}\"]\n    targetRef: {{kind: Pod, name: httpbin-{i}}}\n"
            )
        })
        .collect();
    httpbin(&[]).replace("endpoints:\n", &format!("endpoints:\n{endpoints}"))
}

fn pod(name: &str, namespace: &str, version: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Pod\nmetadata:\n  name: {name}\n  namespace: {namespace}\n  \
         labels: {{app: httpbin, version: {version}}}\nspec:\n  containers: [{{name: c, image: x}}]\n\
         status: {{phase: Running, podIP: 10.0.0.9}}\n"
    )
}

/// Addresses of the subset `version` of httpbin on port 8000.
fn subset_addrs(store: &Store, version: &str) -> Option<Vec<String>> {
    let labels = [("version".to_string(), version.to_string())].into();
    let state = store.get(&key("httpbin").with_labels(&labels))?;
    let endpoints = state.endpoints(&PortRef::Number(8000)).ok()?;
    Some(endpoints.iter().map(|e| e.addr.to_string()).collect())
}

#[test]
fn pods_in_the_folder_select_label_subsets() {
    let (dir, store) = setup();
    save(dir.path(), "httpbin.yaml", &httpbin_with_pods(4));
    // httpbin-1 and -3 are v1, httpbin-2 is v2 (in a List, as `kubectl get pods -o yaml` writes
    // it); httpbin-4 has no Pod here, and a Pod of the same name in another namespace is not it.
    save(
        dir.path(),
        "pods.yaml",
        &format!(
            "{}---\n{}---\napiVersion: v1\nkind: List\nitems:\n{}",
            pod("httpbin-1", "default", "v1"),
            pod("httpbin-4", "elsewhere", "v1"),
            pod("httpbin-2", "default", "v2")
                .lines()
                .enumerate()
                .map(|(i, l)| format!("{} {l}\n", if i == 0 { "-" } else { " " }))
                .collect::<String>(),
        ),
    );
    save(dir.path(), "pod-3.yaml", &pod("httpbin-3", "default", "v1"));
    let manifests = ManifestsCluster::load(CLUSTER, dir.path(), store.clone()).unwrap();
    assert_eq!(manifests.status().last_error, None);
    let _watch = manifests.watch().unwrap();

    // The whole Service is unchanged by Pods.
    assert_eq!(
        addrs(&store, "httpbin").unwrap(),
        ["10.0.0.1:80", "10.0.0.2:80", "10.0.0.3:80", "10.0.0.4:80"]
    );
    assert_eq!(
        subset_addrs(&store, "v1").unwrap(),
        ["10.0.0.1:80", "10.0.0.3:80"]
    );
    assert_eq!(subset_addrs(&store, "v2").unwrap(), ["10.0.0.2:80"]);
    assert_eq!(subset_addrs(&store, "v3").unwrap(), Vec::<String>::new());

    // Relabelled: it moves between subsets.
    save(dir.path(), "pod-3.yaml", &pod("httpbin-3", "default", "v2"));
    eventually("httpbin-3 in v2", || {
        subset_addrs(&store, "v2").unwrap() == ["10.0.0.2:80", "10.0.0.3:80"]
    });
    assert_eq!(subset_addrs(&store, "v1").unwrap(), ["10.0.0.1:80"]);
    // Its Pod gone, the endpoint belongs to no subset (but still to the Service).
    fs::remove_file(dir.path().join("pod-3.yaml")).unwrap();
    eventually("httpbin-3 in no subset", || {
        subset_addrs(&store, "v2").unwrap() == ["10.0.0.2:80"]
    });
    assert_eq!(addrs(&store, "httpbin").unwrap().len(), 4);
}

#[test]
fn a_pod_without_a_name_is_reported_and_skipped() {
    let (dir, store) = setup();
    save(dir.path(), "httpbin.yaml", &httpbin_with_pods(1));
    save(
        dir.path(),
        "pods.yaml",
        "apiVersion: v1\nkind: Pod\nmetadata: {labels: {version: v1}}\n---\n\
         apiVersion: v1beta1\nkind: Pod\nmetadata: {name: httpbin-1, labels: {version: v1}}\n",
    );
    let manifests = ManifestsCluster::load(CLUSTER, dir.path(), store.clone()).unwrap();
    let status = manifests.status();
    assert_eq!(status.errors, 1);
    assert!(
        status
            .last_error
            .unwrap()
            .contains("Pod without metadata.name"),
        "{:?}",
        manifests.status()
    );
    // The Pod of an unknown apiVersion is ignored too: no Pod labels, no subset endpoint.
    assert_eq!(subset_addrs(&store, "v1").unwrap(), Vec::<String>::new());
    assert_eq!(addrs(&store, "httpbin").unwrap(), ["10.0.0.1:80"]);
}
