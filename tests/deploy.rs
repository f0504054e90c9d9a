//! deploy/ against the code it deploys: the ConfigMap's conf is valid for the real binary, and the
//! Deployment agrees with that conf and with the Dockerfile on everything that would otherwise
//! only show in a rollout (probes that never pass, a SIGKILL in the middle of the drain, a Pod
//! the kubelet refuses to start). The Grafana dashboard only uses metrics the README documents.
//! When kubectl or kustomize is on PATH, the kustomize base is rendered too.

use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use saphyr::{LoadableYamlNode, YamlOwned};

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn deploy() -> PathBuf {
    root().join("deploy")
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()))
}

/// Every document of a (multi-document) YAML file.
fn load(path: &Path) -> Vec<YamlOwned> {
    YamlOwned::load_from_str(&read(path))
        .unwrap_or_else(|e| panic!("{} is not YAML: {e}", path.display()))
}

/// The node at `path` (dot-separated keys; a number indexes a sequence), or a panic naming it.
fn at<'a>(node: &'a YamlOwned, path: &str) -> &'a YamlOwned {
    let mut cur = node;
    for key in path.split('.') {
        let next = match key.parse::<usize>() {
            Ok(i) => cur.as_sequence_get(i),
            Err(_) => cur.as_mapping_get(key),
        };
        cur = next.unwrap_or_else(|| panic!("`{path}` is missing (at `{key}`)"));
    }
    cur
}

fn opt<'a>(node: &'a YamlOwned, key: &str) -> Option<&'a YamlOwned> {
    node.as_mapping_get(key)
}

fn str_at<'a>(node: &'a YamlOwned, path: &str) -> &'a str {
    at(node, path)
        .as_str()
        .unwrap_or_else(|| panic!("`{path}` is not a string: {:?}", at(node, path)))
}

fn int_at(node: &YamlOwned, path: &str) -> i64 {
    at(node, path)
        .as_integer()
        .unwrap_or_else(|| panic!("`{path}` is not an integer: {:?}", at(node, path)))
}

fn seq_at<'a>(node: &'a YamlOwned, path: &str) -> &'a [YamlOwned] {
    at(node, path)
        .as_sequence()
        .unwrap_or_else(|| panic!("`{path}` is not a sequence"))
}

/// `{key: value}` of a mapping of strings (labels, selectors).
fn string_map(node: &YamlOwned, path: &str) -> HashMap<String, String> {
    at(node, path)
        .as_mapping()
        .unwrap_or_else(|| panic!("`{path}` is not a mapping"))
        .iter()
        .map(|(k, v)| {
            let k = k.as_str().expect("string key").to_string();
            let v = v
                .as_str()
                .unwrap_or_else(|| panic!("`{path}.{k}` is not a string"));
            (k, v.to_string())
        })
        .collect()
}

/// The one document of `kind` across the top-level manifests of deploy/.
fn manifest(kind: &str) -> YamlOwned {
    let mut found = Vec::new();
    for file in yaml_files(&deploy(), false) {
        for doc in load(&file) {
            if opt(&doc, "kind").and_then(|k| k.as_str()) == Some(kind)
                && opt(&doc, "apiVersion").and_then(|a| a.as_str()) != Some(KUSTOMIZE_API)
            {
                found.push(doc);
            }
        }
    }
    assert_eq!(found.len(), 1, "expected exactly one {kind} in deploy/");
    found.pop().unwrap()
}

const KUSTOMIZE_API: &str = "kustomize.config.k8s.io/v1beta1";

/// `*.yaml`/`*.yml` files in `dir` (and below it with `recurse`), sorted.
fn yaml_files(dir: &Path, recurse: bool) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display())) {
        let path = entry.unwrap().path();
        if path.is_dir() {
            if recurse {
                out.extend(yaml_files(&path, true));
            }
        } else if matches!(
            path.extension().and_then(|e| e.to_str()),
            Some("yaml" | "yml")
        ) {
            out.push(path);
        }
    }
    out.sort();
    out
}

/// podgate's duration syntax: `250ms`, `1s`, `2m`, `1h`.
fn duration(text: &str) -> Duration {
    let split = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    let (n, unit) = text.split_at(split);
    let n: u64 = n
        .parse()
        .unwrap_or_else(|_| panic!("`{text}` is not a duration"));
    match unit {
        "ms" => Duration::from_millis(n),
        "s" => Duration::from_secs(n),
        "m" => Duration::from_secs(n * 60),
        "h" => Duration::from_secs(n * 3600),
        _ => panic!("`{text}` has an unknown unit"),
    }
}

fn port_of(address: &str) -> i64 {
    address
        .rsplit_once(':')
        .and_then(|(_, p)| p.parse().ok())
        .unwrap_or_else(|| panic!("`{address}` has no port"))
}

/// The uid the image runs as: the last `USER` of the Dockerfile, numeric or the name a
/// `useradd --uid N NAME` created.
fn dockerfile_uid() -> i64 {
    let text = read(&root().join("Dockerfile"));
    let user = text
        .lines()
        .filter_map(|l| l.trim().strip_prefix("USER "))
        .next_back()
        .expect("the Dockerfile sets no USER")
        .trim();
    let user = user.split(':').next().unwrap();
    if let Ok(uid) = user.parse() {
        return uid;
    }
    for line in text.lines().filter(|l| l.contains("useradd")) {
        let words: Vec<&str> = line.split_whitespace().collect();
        if words.contains(&user) {
            if let Some(i) = words.iter().position(|w| *w == "--uid" || *w == "-u") {
                return words[i + 1].parse().expect("numeric --uid");
            }
        }
    }
    panic!("cannot tell the uid of the Dockerfile's USER {user}")
}

/// The single container of the Deployment.
fn container(deployment: &YamlOwned) -> &YamlOwned {
    let containers = seq_at(deployment, "spec.template.spec.containers");
    assert_eq!(containers.len(), 1, "the Deployment runs one container");
    &containers[0]
}

/// The container port a probe or Service names, by number or by port name.
fn container_port(c: &YamlOwned, port: &YamlOwned) -> i64 {
    match port.as_integer() {
        Some(n) => n,
        None => port_named(c, port.as_str().expect("a port is a number or a name")),
    }
}

fn port_named(c: &YamlOwned, name: &str) -> i64 {
    seq_at(c, "ports")
        .iter()
        .find(|p| opt(p, "name").and_then(|n| n.as_str()) == Some(name))
        .map(|p| int_at(p, "containerPort"))
        .unwrap_or_else(|| panic!("the container has no port named {name}"))
}

#[test]
fn every_yaml_under_deploy_parses() {
    let files = yaml_files(&deploy(), true);
    assert!(
        files.len() >= 8,
        "too few YAML files under deploy/: {files:?}"
    );
    for file in files {
        let docs = load(&file);
        assert!(!docs.is_empty(), "{} is empty", file.display());
        for (i, doc) in docs.iter().enumerate() {
            assert!(
                doc.as_mapping().is_some(),
                "{} document {i} is not a mapping",
                file.display()
            );
            // Everything but the podgate conf is a Kubernetes object or a kustomization.
            if file.file_name().unwrap() != "podgate.yaml" {
                str_at(doc, "apiVersion");
                str_at(doc, "kind");
            }
        }
    }
}

#[test]
fn the_configmap_conf_is_valid_for_podgate() {
    let conf = deploy().join("podgate.yaml");
    // podgate -t reads admin.token_file, which only the Pod has (the Secret's mount): check a
    // copy whose token_file names a stand-in, everything else byte for byte.
    let token_file = str_at(&load(&conf)[0], "admin.token_file").to_string();
    let tmp = tempfile::tempdir().unwrap();
    std::fs::write(tmp.path().join("token"), "stand-in\n").unwrap();
    let text = read(&conf);
    assert_eq!(
        text.matches(&token_file).count(),
        1,
        "{token_file} once in the conf"
    );
    let copy = tmp.path().join("podgate.yaml");
    std::fs::write(
        &copy,
        text.replace(&token_file, &tmp.path().join("token").display().to_string()),
    )
    .unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_podgate"))
        .args(["-t", "-c"])
        .arg(&copy)
        .output()
        .expect("run podgate -t");
    assert!(
        out.status.success(),
        "podgate -t -c deploy/podgate.yaml: {}\n{}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    // It is the in-cluster conf: the cluster is the one the Pod runs in, with its ServiceAccount.
    let conf = &load(&conf)[0];
    assert!(seq_at(conf, "clusters")
        .iter()
        .any(|c| opt(c, "in_cluster").and_then(|b| b.as_bool()) == Some(true)));
}

#[test]
fn the_kustomization_lists_every_manifest() {
    let k = &load(&deploy().join("kustomization.yaml"))[0];
    assert_eq!(str_at(k, "apiVersion"), KUSTOMIZE_API);
    // A `namespace:` transformer would move deploy/rbac/'s Roles out of the namespaces they
    // grant access to: every object names its own namespace instead (kustomize_renders_the_base).
    assert!(opt(k, "namespace").is_none());
    let resources: BTreeSet<&str> = seq_at(k, "resources")
        .iter()
        .map(|r| r.as_str().expect("resource path"))
        .collect();
    for r in &resources {
        assert!(deploy().join(r).exists(), "resource {r} does not exist");
    }
    assert!(resources.contains("rbac"), "deploy/rbac/ is not included");
    // Every manifest next to the kustomization is rendered (podgate.yaml is the generator's input).
    for file in yaml_files(&deploy(), false) {
        let name = file.file_name().unwrap().to_str().unwrap();
        if name != "kustomization.yaml" && name != "podgate.yaml" {
            assert!(
                resources.contains(name),
                "{name} is not in kustomization.yaml"
            );
        }
    }
    let generator = &seq_at(k, "configMapGenerator")[0];
    assert_eq!(str_at(generator, "name"), "podgate-conf");
    let files: Vec<&str> = seq_at(generator, "files")
        .iter()
        .map(|f| f.as_str().unwrap())
        .collect();
    assert_eq!(files, ["podgate.yaml"]);
    // A generated ConfigMap gets a content hash in its name (so a conf change rolls the
    // Deployment) unless the hash is turned off.
    assert!(opt(generator, "options").is_none() && opt(k, "generatorOptions").is_none());
}

#[test]
fn the_deployment_agrees_with_the_conf_and_the_dockerfile() {
    let conf = &load(&deploy().join("podgate.yaml"))[0];
    let d = manifest("Deployment");
    let pod = at(&d, "spec.template.spec");
    let c = container(&d);

    // NODE_NAME comes from the downward API: the node whose zone label podgate reads.
    let node_name = seq_at(c, "env")
        .iter()
        .find(|e| str_at(e, "name") == "NODE_NAME")
        .expect("env NODE_NAME");
    assert_eq!(
        str_at(node_name, "valueFrom.fieldRef.fieldPath"),
        "spec.nodeName"
    );

    // SIGTERM: /readyz 503 and listeners open for drain_delay, exit within grace_period; the
    // kubelet's SIGKILL comes terminationGracePeriodSeconds after SIGTERM.
    let grace = duration(str_at(conf, "server.grace_period"));
    let drain = duration(str_at(conf, "server.drain_delay"));
    assert!(drain < grace);
    let kill_after = int_at(pod, "terminationGracePeriodSeconds");
    assert!(
        Duration::from_secs(kill_after as u64) > grace,
        "terminationGracePeriodSeconds {kill_after} must exceed server.grace_period {grace:?}"
    );

    // Probes reach the admin listener, which must not be loopback for the kubelet to reach it.
    let admin = str_at(conf, "admin.address");
    assert!(
        !admin.starts_with("127.")
            && !admin.starts_with("localhost")
            && !admin.starts_with("[::1]"),
        "admin.address {admin} is loopback: the kubelet's probes cannot reach it"
    );
    for (probe, path) in [("readinessProbe", "/readyz"), ("livenessProbe", "/healthz")] {
        let get = at(c, &format!("{probe}.httpGet"));
        assert_eq!(str_at(get, "path"), path, "{probe}");
        assert_eq!(
            container_port(c, at(get, "port")),
            port_of(admin),
            "{probe} port vs admin.address"
        );
    }

    // The container ports are the conf's listener and admin ports.
    let listener = port_of(str_at(conf, "listeners.0.address"));
    assert_eq!(port_named(c, "http"), listener);
    assert_eq!(port_named(c, "admin"), port_of(admin));
    let annotations = string_map(&d, "spec.template.metadata.annotations");
    assert_eq!(annotations["prometheus.io/scrape"], "true");
    assert_eq!(
        annotations["prometheus.io/port"],
        port_of(admin).to_string()
    );
    assert_eq!(annotations["prometheus.io/path"], "/metrics");

    // The image's user; a read-only, unprivileged container.
    let uid = dockerfile_uid();
    assert_eq!(int_at(pod, "securityContext.runAsUser"), uid);
    assert_eq!(
        opt(at(pod, "securityContext"), "runAsNonRoot").and_then(|b| b.as_bool()),
        Some(true)
    );
    let sc = at(c, "securityContext");
    assert_eq!(at(sc, "readOnlyRootFilesystem").as_bool(), Some(true));
    assert_eq!(at(sc, "allowPrivilegeEscalation").as_bool(), Some(false));
    let dropped: Vec<&str> = seq_at(sc, "capabilities.drop")
        .iter()
        .map(|c| c.as_str().unwrap())
        .collect();
    assert_eq!(dropped, ["ALL"]);
    // Read-only root: the upgrade socket (and Pingora's pid file) need a writable folder.
    let upgrade_sock = opt(conf, "server")
        .and_then(|s| opt(s, "upgrade_sock"))
        .and_then(|s| s.as_str())
        .unwrap_or("/tmp/podgate_upgrade.sock");
    let mounts = seq_at(c, "volumeMounts");
    let writable = |path: &str| {
        mounts.iter().any(|m| {
            path.starts_with(&format!("{}/", str_at(m, "mountPath")))
                && opt(m, "readOnly").and_then(|b| b.as_bool()) != Some(true)
        })
    };
    assert!(
        writable(upgrade_sock),
        "{upgrade_sock} is not on a writable volume"
    );

    // The conf file the args name is the ConfigMap's key, mounted at its folder.
    let args: Vec<&str> = seq_at(c, "args")
        .iter()
        .map(|a| a.as_str().unwrap())
        .collect();
    assert_eq!(args, ["-c", "/etc/podgate/podgate.yaml"]);
    let conf_mount = mounts
        .iter()
        .find(|m| str_at(m, "mountPath") == "/etc/podgate")
        .expect("nothing mounted at /etc/podgate");
    let volume = seq_at(pod, "volumes")
        .iter()
        .find(|v| str_at(v, "name") == str_at(conf_mount, "name"))
        .expect("the conf volume");
    assert_eq!(str_at(volume, "configMap.name"), "podgate-conf");

    // The ServiceAccount deploy/rbac/ binds.
    let sa = &load(&deploy().join("rbac/serviceaccount.yaml"))[0];
    assert_eq!(
        str_at(pod, "serviceAccountName"),
        str_at(sa, "metadata.name")
    );

    // Rolling updates never drop below the replica count; the PDB keeps one Pod up.
    assert!(int_at(&d, "spec.replicas") >= 2);
    assert_eq!(int_at(&d, "spec.strategy.rollingUpdate.maxUnavailable"), 0);
    let pdb = manifest("PodDisruptionBudget");
    assert!(int_at(&pdb, "spec.minAvailable") >= 1);
    assert!(int_at(&pdb, "spec.minAvailable") < int_at(&d, "spec.replicas"));

    // Selectors: the Deployment's, the Service's and the PDB's all pick the Pod template.
    let pod_labels = string_map(&d, "spec.template.metadata.labels");
    let service = manifest("Service");
    for (what, selector) in [
        ("Deployment", string_map(&d, "spec.selector.matchLabels")),
        ("Service", string_map(&service, "spec.selector")),
        (
            "PodDisruptionBudget",
            string_map(&pdb, "spec.selector.matchLabels"),
        ),
    ] {
        for (k, v) in &selector {
            assert_eq!(pod_labels.get(k), Some(v), "{what} selector {k}={v}");
        }
    }
    // The Service's target ports exist on the container.
    for p in seq_at(&service, "spec.ports") {
        container_port(c, at(p, "targetPort"));
    }
}

/// The metric names of the README's Metrics table.
fn documented_metrics() -> BTreeSet<String> {
    let readme = read(&root().join("README.md"));
    let section = readme
        .split("\n## Metrics\n")
        .nth(1)
        .expect("README has a ## Metrics section");
    let section = section.split("\n## ").next().unwrap();
    let names: BTreeSet<String> = section
        .lines()
        .filter_map(|l| l.strip_prefix("| `"))
        .filter_map(|l| l.split('`').next())
        .map(str::to_string)
        .collect();
    assert!(names.len() >= 10, "the README's Metrics table: {names:?}");
    names
}

/// Every `podgate_*` name in the strings of a JSON value.
fn metric_names(value: &serde_json::Value, out: &mut BTreeSet<String>) {
    match value {
        serde_json::Value::String(s) => {
            let mut rest = s.as_str();
            while let Some(i) = rest.find("podgate_") {
                let start = &rest[i..];
                let end = start
                    .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                    .unwrap_or(start.len());
                // `podgate_` inside a longer identifier is not a metric.
                let before = rest[..i].chars().last();
                if !before.is_some_and(|c| c.is_ascii_alphanumeric() || c == '_') {
                    out.insert(start[..end].to_string());
                }
                rest = &start[end..];
            }
        }
        serde_json::Value::Array(a) => a.iter().for_each(|v| metric_names(v, out)),
        serde_json::Value::Object(o) => o.values().for_each(|v| metric_names(v, out)),
        _ => {}
    }
}

#[test]
fn the_grafana_dashboard_uses_documented_metrics() {
    let path = deploy().join("grafana/podgate.json");
    let dash: serde_json::Value =
        serde_json::from_str(&read(&path)).expect("deploy/grafana/podgate.json is not JSON");
    assert!(dash["schemaVersion"].as_i64().unwrap() >= 36);
    let vars: BTreeSet<&str> = dash["templating"]["list"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v["name"].as_str().unwrap())
        .collect();
    for v in ["datasource", "route", "upstream", "cluster"] {
        assert!(vars.contains(v), "no ${v} variable");
    }

    // Every query goes to the chosen Prometheus; panel ids are unique.
    let mut ids = BTreeSet::new();
    for panel in dash["panels"].as_array().unwrap() {
        assert!(ids.insert(panel["id"].as_i64().unwrap()), "panel id twice");
        for t in panel["targets"].as_array().into_iter().flatten() {
            assert_eq!(
                t["datasource"]["uid"], "${datasource}",
                "{}",
                panel["title"]
            );
            assert!(!t["expr"].as_str().unwrap().is_empty());
        }
    }

    let documented = documented_metrics();
    let mut used = BTreeSet::new();
    metric_names(&dash, &mut used);
    for name in &used {
        let base = ["_bucket", "_sum", "_count"]
            .iter()
            .find_map(|s| name.strip_suffix(s))
            .filter(|b| documented.contains(*b))
            .unwrap_or(name);
        assert!(
            documented.contains(base),
            "the dashboard uses {name}, which the README's Metrics table does not list"
        );
    }
    for wanted in [
        "podgate_requests_total",
        "podgate_request_duration_seconds_bucket",
        "podgate_upstream_duration_seconds_bucket",
        "podgate_upstream_endpoints",
        "podgate_upstream_retries_total",
        "podgate_upstream_ejections_total",
        "podgate_health_checks_total",
        "podgate_discovery_last_sync_timestamp_seconds",
        "podgate_discovery_errors_total",
        "podgate_discovery_relists_total",
        "podgate_discovery_propagation_seconds_bucket",
        "podgate_config_reloads_total",
    ] {
        assert!(
            used.contains(wanted),
            "the dashboard does not show {wanted}"
        );
    }
}

/// kubectl (`kubectl kustomize`) or kustomize (`kustomize build`), whichever is on PATH; or why
/// neither can render the base.
fn kustomize_command() -> Result<Command, String> {
    let on_path = |name: &str| {
        std::env::var_os("PATH")
            .is_some_and(|p| std::env::split_paths(&p).any(|dir| dir.join(name).is_file()))
    };
    if on_path("kubectl") {
        // kubectl before 1.21 embeds kustomize 2, which takes no folders in `resources`.
        let version = Command::new("kubectl")
            .args(["version", "--client"])
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
            .unwrap_or_default();
        let major = version
            .lines()
            .find_map(|l| l.strip_prefix("Kustomize Version: v"))
            .and_then(|v| v.split('.').next()?.parse::<u32>().ok());
        if major.is_some_and(|m| m >= 4) {
            let mut c = Command::new("kubectl");
            c.arg("kustomize");
            return Ok(c);
        }
        if !on_path("kustomize") {
            return Err(format!(
                "kubectl's kustomize is too old: {}",
                version.trim()
            ));
        }
    }
    if on_path("kustomize") {
        let mut c = Command::new("kustomize");
        c.arg("build");
        Ok(c)
    } else {
        Err("neither kubectl nor kustomize is on PATH".into())
    }
}

#[test]
fn kustomize_renders_the_base() {
    let mut cmd = match kustomize_command() {
        Ok(cmd) => cmd,
        Err(why) => {
            println!("skipped: {why}");
            return;
        }
    };
    let out = cmd.arg(deploy()).output().expect("run kustomize");
    assert!(
        out.status.success(),
        "{cmd:?}: {}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    let docs = YamlOwned::load_from_str(&String::from_utf8(out.stdout).unwrap())
        .expect("kustomize output is YAML");
    let kinds: BTreeSet<&str> = docs.iter().map(|d| str_at(d, "kind")).collect();
    for kind in [
        "Namespace",
        "ServiceAccount",
        "Role",
        "RoleBinding",
        "ConfigMap",
        "Deployment",
        "Service",
        "PodDisruptionBudget",
        "NetworkPolicy",
    ] {
        assert!(kinds.contains(kind), "{kind} not rendered: {kinds:?}");
    }
    // Least privilege by default: the one cluster-wide grant in the base is `get` on nodes
    // (podgate's zone from its node's label), bound to podgate's ServiceAccount.
    let cluster_roles: Vec<&YamlOwned> = docs
        .iter()
        .filter(|d| str_at(d, "kind") == "ClusterRole")
        .collect();
    assert_eq!(cluster_roles.len(), 1, "one ClusterRole in the base");
    assert_eq!(
        str_at(cluster_roles[0], "metadata.name"),
        "podgate-node-reader"
    );
    let rules = seq_at(cluster_roles[0], "rules");
    assert_eq!(rules.len(), 1);
    assert_eq!(strings(&rules[0], "verbs"), ["get".to_string()].into());
    assert_eq!(
        strings(&rules[0], "resources"),
        ["nodes".to_string()].into()
    );
    let bindings: Vec<&YamlOwned> = docs
        .iter()
        .filter(|d| str_at(d, "kind") == "ClusterRoleBinding")
        .collect();
    assert_eq!(bindings.len(), 1);
    assert_eq!(str_at(bindings[0], "roleRef.name"), "podgate-node-reader");
    let subject = &seq_at(bindings[0], "subjects")[0];
    assert_eq!(str_at(subject, "name"), "podgate");
    assert_eq!(str_at(subject, "namespace"), "podgate");
    // Every namespaced object is in podgate's namespace, except the Roles (and their bindings),
    // which are in exactly the namespaces the conf watches.
    let watched = watched_namespaces();
    let mut role_namespaces = BTreeSet::new();
    for d in &docs {
        let kind = str_at(d, "kind");
        if matches!(kind, "Namespace" | "ClusterRole" | "ClusterRoleBinding") {
            continue;
        }
        let ns = str_at(d, "metadata.namespace").to_string();
        if matches!(kind, "Role" | "RoleBinding") {
            role_namespaces.insert(ns);
        } else {
            assert_eq!(ns, "podgate", "{kind} {}", str_at(d, "metadata.name"));
        }
    }
    assert_eq!(role_namespaces, watched);
    // The Deployment mounts the generated ConfigMap under its hashed name, holding the conf.
    let cm = docs
        .iter()
        .find(|d| str_at(d, "kind") == "ConfigMap")
        .unwrap();
    let cm_name = str_at(cm, "metadata.name");
    assert!(cm_name.starts_with("podgate-conf-"), "{cm_name}");
    let data = at(cm, "data").as_mapping_get("podgate.yaml");
    assert_eq!(
        data.and_then(|d| d.as_str()),
        Some(read(&deploy().join("podgate.yaml")).as_str())
    );
    let d = docs
        .iter()
        .find(|d| str_at(d, "kind") == "Deployment")
        .unwrap();
    let volumes = seq_at(d, "spec.template.spec.volumes");
    assert!(volumes
        .iter()
        .any(|v| opt(v, "configMap").is_some_and(|c| str_at(c, "name") == cm_name)));
}

/// The namespaces the ConfigMap's conf reads in the cluster podgate runs in.
fn watched_namespaces() -> BTreeSet<String> {
    let conf = &load(&deploy().join("podgate.yaml"))[0];
    let local: BTreeSet<&str> = seq_at(conf, "clusters")
        .iter()
        .filter(|c| opt(c, "in_cluster").and_then(|b| b.as_bool()) == Some(true))
        .map(|c| str_at(c, "name"))
        .collect();
    let mut out = BTreeSet::new();
    for u in seq_at(conf, "upstreams") {
        for s in opt(u, "services")
            .and_then(|s| s.as_sequence())
            .map_or(&[][..], |v| v.as_slice())
        {
            if local.contains(str_at(s, "cluster")) {
                out.insert(str_at(s, "namespace").to_string());
            }
        }
    }
    assert!(!out.is_empty());
    out
}

/// Every document of every YAML file below `dir`.
fn docs_below(dir: &Path) -> Vec<YamlOwned> {
    yaml_files(dir, true)
        .iter()
        .flat_map(|f| load(f))
        .filter(|d| opt(d, "apiVersion").and_then(|a| a.as_str()) != Some(KUSTOMIZE_API))
        .collect()
}

fn strings(node: &YamlOwned, path: &str) -> BTreeSet<String> {
    seq_at(node, path)
        .iter()
        .map(|v| v.as_str().expect("a string").to_string())
        .collect()
}

/// `100m` → 0.1, `2` → 2 (CPU); `64Mi` → 64·2²⁰ (memory).
fn quantity(node: &YamlOwned) -> f64 {
    let text = match node.as_str() {
        Some(t) => t.to_string(),
        None => node.as_integer().expect("a quantity").to_string(),
    };
    for (suffix, factor) in [
        ("m", 1e-3),
        ("Ki", 1024.0),
        ("Mi", 1024.0 * 1024.0),
        ("Gi", 1024.0 * 1024.0 * 1024.0),
    ] {
        if let Some(n) = text.strip_suffix(suffix) {
            return n.parse::<f64>().expect("a number") * factor;
        }
    }
    text.parse()
        .unwrap_or_else(|_| panic!("`{text}` is not a quantity"))
}

/// Issue 14: the admin listener's secrets need a token from a Secret, while the kubelet and
/// Prometheus reach what they need without one.
#[test]
fn the_admin_token_comes_from_a_secret_and_metrics_stay_open() {
    let conf = &load(&deploy().join("podgate.yaml"))[0];
    let token_file = Path::new(str_at(conf, "admin.token_file"));
    assert_eq!(at(conf, "admin.open_metrics").as_bool(), Some(true));
    let d = manifest("Deployment");
    let c = container(&d);
    let mount = seq_at(c, "volumeMounts")
        .iter()
        .find(|m| Path::new(str_at(m, "mountPath")) == token_file.parent().unwrap())
        .unwrap_or_else(|| panic!("nothing mounted at {}", token_file.display()));
    assert_eq!(at(mount, "readOnly").as_bool(), Some(true));
    let volume = seq_at(&d, "spec.template.spec.volumes")
        .iter()
        .find(|v| str_at(v, "name") == str_at(mount, "name"))
        .unwrap();
    let secret = at(volume, "secret");
    // Not optional: without the Secret the Pod waits rather than serve an open admin listener.
    assert_ne!(
        opt(secret, "optional").and_then(|o| o.as_bool()),
        Some(true)
    );
    // The documented one command creates that Secret with the key the conf reads.
    let name = str_at(secret, "secretName");
    let key = token_file.file_name().unwrap().to_str().unwrap();
    let kustomization = read(&deploy().join("kustomization.yaml"));
    assert!(
        kustomization.contains(&format!("create secret generic {name}"))
            && kustomization.contains(&format!("--from-literal={key}=")),
        "kustomization.yaml does not say how to create Secret {name} with key {key}"
    );
    assert!(read(&root().join("README.md")).contains(&format!("create secret generic {name}")));
}

#[test]
fn the_network_policy_admits_the_proxy_from_anywhere_and_the_admin_port_from_monitoring() {
    let np = manifest("NetworkPolicy");
    let d = manifest("Deployment");
    let c = container(&d);
    let pod_labels = string_map(&d, "spec.template.metadata.labels");
    for (k, v) in string_map(&np, "spec.podSelector.matchLabels") {
        assert_eq!(pod_labels.get(&k), Some(&v), "podSelector {k}={v}");
    }
    assert_eq!(
        strings(&np, "spec.policyTypes"),
        ["Ingress".to_string()].into()
    );
    let rules = seq_at(&np, "spec.ingress");
    assert_eq!(rules.len(), 2, "one rule per port");
    let port_of_rule = |r: &YamlOwned| {
        let ports = seq_at(r, "ports");
        assert_eq!(ports.len(), 1);
        container_port(c, at(&ports[0], "port"))
    };
    let proxy = rules
        .iter()
        .find(|r| port_of_rule(r) == port_named(c, "http"))
        .expect("a rule for the proxy port");
    assert!(
        opt(proxy, "from").is_none(),
        "the proxy port is open to all"
    );
    let admin = rules
        .iter()
        .find(|r| port_of_rule(r) == port_named(c, "admin"))
        .expect("a rule for the admin port");
    let from = seq_at(admin, "from");
    assert_eq!(from.len(), 1);
    assert!(opt(&from[0], "podSelector").is_none() && opt(&from[0], "ipBlock").is_none());
    assert_eq!(
        string_map(&from[0], "namespaceSelector.matchLabels"),
        [(
            "kubernetes.io/metadata.name".to_string(),
            "monitoring".to_string()
        )]
        .into()
    );
}

#[test]
fn the_pods_have_resources_and_spread_across_zones() {
    let d = manifest("Deployment");
    let c = container(&d);
    for r in ["cpu", "memory"] {
        let request = quantity(at(c, &format!("resources.requests.{r}")));
        let limit = quantity(at(c, &format!("resources.limits.{r}")));
        assert!(
            request > 0.0 && request <= limit,
            "{r}: {request} > {limit}"
        );
    }
    let pod_labels = string_map(&d, "spec.template.metadata.labels");
    let spread = seq_at(&d, "spec.template.spec.topologySpreadConstraints");
    let keys: BTreeSet<&str> = spread.iter().map(|s| str_at(s, "topologyKey")).collect();
    assert!(keys.contains("topology.kubernetes.io/zone"), "{keys:?}");
    assert!(keys.contains("kubernetes.io/hostname"), "{keys:?}");
    for s in spread {
        assert_eq!(int_at(s, "maxSkew"), 1);
        for (k, v) in string_map(s, "labelSelector.matchLabels") {
            assert_eq!(pod_labels.get(&k), Some(&v));
        }
    }
}

/// RBAC: only the verbs podgate uses (it lists and watches what it discovers, gets its own
/// node for its zone, and writes nothing), only the resources it reads, bound to its
/// ServiceAccount.
#[test]
fn rbac_grants_list_and_watch_only() {
    let docs = docs_below(&deploy().join("rbac"));
    let sa = &load(&deploy().join("rbac/serviceaccount.yaml"))[0];
    let (sa_name, sa_ns) = (
        str_at(sa, "metadata.name"),
        str_at(sa, "metadata.namespace"),
    );
    let allowed: BTreeSet<String> = ["endpointslices", "services", "pods"]
        .map(String::from)
        .into();
    let mut roles = BTreeSet::new();
    for d in &docs {
        let kind = str_at(d, "kind");
        match kind {
            "Role" | "ClusterRole" => {
                for rule in seq_at(d, "rules") {
                    let verbs = strings(rule, "verbs");
                    let resources = strings(rule, "resources");
                    if resources.contains("nodes") {
                        // Its own Node, once at start-up: `get` only, cluster-scoped.
                        assert_eq!(kind, "ClusterRole", "nodes are cluster-scoped");
                        assert_eq!(resources, ["nodes".to_string()].into());
                        assert_eq!(verbs, ["get".to_string()].into());
                        continue;
                    }
                    assert_eq!(
                        verbs,
                        ["list".to_string(), "watch".to_string()].into(),
                        "{kind} {}",
                        str_at(d, "metadata.name")
                    );
                    assert!(resources.is_subset(&allowed));
                }
                let ns = opt(at(d, "metadata"), "namespace").and_then(|n| n.as_str());
                roles.insert((
                    kind.to_string(),
                    ns.map(String::from),
                    str_at(d, "metadata.name").to_string(),
                ));
            }
            "RoleBinding" | "ClusterRoleBinding" => {
                let subjects = seq_at(d, "subjects");
                assert_eq!(subjects.len(), 1);
                assert_eq!(str_at(&subjects[0], "kind"), "ServiceAccount");
                assert_eq!(str_at(&subjects[0], "name"), sa_name);
                assert_eq!(str_at(&subjects[0], "namespace"), sa_ns);
            }
            _ => {}
        }
    }
    // Each binding names a role that exists, in its own namespace for a Role.
    for d in &docs {
        let kind = str_at(d, "kind");
        if matches!(kind, "RoleBinding" | "ClusterRoleBinding") {
            let role_kind = str_at(d, "roleRef.kind");
            let ns = if role_kind == "Role" {
                Some(str_at(d, "metadata.namespace").to_string())
            } else {
                None
            };
            let key = (
                role_kind.to_string(),
                ns,
                str_at(d, "roleRef.name").to_string(),
            );
            assert!(roles.contains(&key), "{kind} refers to a missing {key:?}");
        }
    }
    // The docs show `kubectl auth can-i` for exactly those verbs.
    let guide = read(&deploy().join("rbac/README.md"));
    assert!(guide.contains("auth can-i list endpointslices"), "{guide}");
    assert!(guide.contains("auth can-i watch endpointslices"), "{guide}");
    assert!(
        guide.contains("auth can-i get endpointslices"),
        "the guide shows that `get` on what it discovers is refused"
    );
    assert!(
        guide.contains("auth can-i get nodes"),
        "the guide shows the node grant"
    );
}

/// The optional objects of deploy/extras/ (not in the base: the ServiceMonitor kind needs the
/// Prometheus Operator, and an HPA owns `replicas`).
#[test]
fn the_servicemonitor_and_the_hpa_fit_the_base() {
    let extras = docs_below(&deploy().join("extras"));
    let find = |kind: &str| {
        let found: Vec<&YamlOwned> = extras
            .iter()
            .filter(|d| str_at(d, "kind") == kind)
            .collect();
        assert_eq!(found.len(), 1, "one {kind} in deploy/extras/");
        found[0]
    };
    let service = manifest("Service");
    let d = manifest("Deployment");

    let sm = find("ServiceMonitor");
    assert_eq!(str_at(sm, "apiVersion"), "monitoring.coreos.com/v1");
    assert_eq!(str_at(sm, "metadata.namespace"), "podgate");
    let service_labels = string_map(&service, "metadata.labels");
    for (k, v) in string_map(sm, "spec.selector.matchLabels") {
        assert_eq!(
            service_labels.get(&k),
            Some(&v),
            "ServiceMonitor selector {k}={v}"
        );
    }
    let endpoint = &seq_at(sm, "spec.endpoints")[0];
    let port = str_at(endpoint, "port");
    let svc_port = seq_at(&service, "spec.ports")
        .iter()
        .find(|p| str_at(p, "name") == port)
        .unwrap_or_else(|| panic!("the Service has no port {port}"));
    assert_eq!(
        container_port(container(&d), at(svc_port, "targetPort")),
        port_named(container(&d), "admin")
    );
    assert_eq!(str_at(endpoint, "path"), "/metrics");

    let hpa = find("HorizontalPodAutoscaler");
    assert_eq!(str_at(hpa, "apiVersion"), "autoscaling/v2");
    assert_eq!(str_at(hpa, "metadata.namespace"), "podgate");
    assert_eq!(str_at(hpa, "spec.scaleTargetRef.kind"), "Deployment");
    assert_eq!(
        str_at(hpa, "spec.scaleTargetRef.name"),
        str_at(&d, "metadata.name")
    );
    let pdb = manifest("PodDisruptionBudget");
    let (min, max) = (
        int_at(hpa, "spec.minReplicas"),
        int_at(hpa, "spec.maxReplicas"),
    );
    assert!(min > int_at(&pdb, "spec.minAvailable") && max >= min);
    assert_eq!(
        str_at(&seq_at(hpa, "spec.metrics")[0], "resource.name"),
        "cpu"
    );
}
