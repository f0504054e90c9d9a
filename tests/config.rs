//! The config contract through the binary: every mistake reported at once with its field path and
//! line, exit code 64, nothing bound; every example in conf/ valid.

mod support;

use std::path::Path;
use std::process::{Command, Output};

fn podgate(args: &[&str], dir: &Path) -> Output {
    Command::new(support::podgate_bin())
        .args(args)
        .current_dir(dir)
        .output()
        .expect("run podgate")
}

/// 1-based line of the first line of `text` containing `needle`.
fn line_of(text: &str, needle: &str) -> usize {
    text.lines()
        .position(|l| l.contains(needle))
        .unwrap_or_else(|| panic!("`{needle}` not in the test config"))
        + 1
}

#[test]
fn every_mistake_is_reported_with_path_and_line() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(dir.path().join("cluster")).unwrap();
    let many_services: String = (0..21)
        .map(|i| format!("      - {{cluster: local, service: s{i}, port: 80}}\n"))
        .collect();
    let conf = format!(
        r#"listners: [] # a typo
listeners:
  - address: localhost:8080
  - address: 0.0.0.0:70000
server:
  threads: 0
  grace_period: soon
clusters:
  - name: local
    manifests: cluster
  - name: gone
    manifests: no-such-folder
  - name: remote
    kubeconfig: no-such.kubeconfig
  - name: local # dup-cluster
    manifests: cluster
upstreams:
  - name: web
    scheme: ftp
    connect_timeout: 5
    retries: 11
    services:
      - cluster: local
        namespace: Default_NS
        service: 1httpbin
        port: 70000
        weight: 0
      - cluster: nowhere
        service: ok
        port: HTTP_PORT
        wieght: 3
        weight: 101
        labels:
          version: v1
          example.com/-tier: web # bad-label-key
          track: "a b" # bad-label-value
  - name: web # dup-upstream
    nodes: [{{address: "127.0.0.1:9"}}]
  - name: many
    services:
{many_services}  - name: tls # tls
    scheme: https
    nodes: [{{address: "127.0.0.1:9"}}]
routes:
  - name: r1
    upstream: missing
    methods: [get]
  - name: r1 # dup-route
    upstream: many
    hosts: ["api.*.com"]
    path_prefix: nope
"#
    );
    let path = dir.path().join("bad.yaml");
    std::fs::write(&path, &conf).unwrap();

    let out = podgate(&["-c", "bad.yaml", "-t"], dir.path());
    assert_eq!(out.status.code(), Some(64), "{out:?}");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !stderr.contains("needs at least one listener"),
        "listeners with mistakes are still listeners: {stderr}"
    );

    let expected: &[(&str, &str, &str)] = &[
        // (field path, part of the message, text on the line where it must be reported)
        ("listners", "unknown key", "listners:"),
        (
            "listeners[0].address",
            "not an IP address",
            "localhost:8080",
        ),
        ("listeners[1].address", "outside 1..65535", "0.0.0.0:70000"),
        ("server.threads", "outside 1..1024", "threads: 0"),
        (
            "server.grace_period",
            "not a duration",
            "grace_period: soon",
        ),
        ("clusters[1].manifests", "does not exist", "no-such-folder"),
        (
            "clusters[2].kubeconfig",
            "does not exist",
            "no-such.kubeconfig",
        ),
        (
            "clusters[3].name",
            "duplicate cluster name",
            "# dup-cluster",
        ),
        ("upstreams[0].scheme", "not a scheme", "scheme: ftp"),
        (
            "upstreams[0].connect_timeout",
            "add a unit, e.g. 5s",
            "connect_timeout: 5",
        ),
        ("upstreams[0].retries", "outside 0..10", "retries: 11"),
        (
            "upstreams[0].services[0].namespace",
            "not a valid namespace",
            "Default_NS",
        ),
        (
            "upstreams[0].services[0].service",
            "not a valid service name",
            "1httpbin",
        ),
        (
            "upstreams[0].services[0].port",
            "outside 1..65535",
            "port: 70000",
        ),
        (
            "upstreams[0].services[0].weight",
            "outside 1..100",
            "weight: 0",
        ),
        (
            "upstreams[0].services[1].cluster",
            "unknown cluster `nowhere`",
            "cluster: nowhere",
        ),
        (
            "upstreams[0].services[1].port",
            "not a valid port name",
            "HTTP_PORT",
        ),
        (
            "upstreams[0].services[1].wieght",
            "unknown key",
            "wieght: 3",
        ),
        (
            "upstreams[0].services[1].weight",
            "outside 1..100",
            "weight: 101",
        ),
        (
            "upstreams[0].services[1].labels.example.com/-tier",
            "not a valid label key",
            "# bad-label-key",
        ),
        (
            "upstreams[0].services[1].labels.track",
            "not a valid label value",
            "# bad-label-value",
        ),
        (
            "upstreams[1].name",
            "duplicate upstream name",
            "# dup-upstream",
        ),
        ("upstreams[2].services", "at most 20", "service: s0,"),
        ("upstreams[3]", "needs a name to verify", "# tls"),
        (
            "routes[0].upstream",
            "unknown upstream `missing`",
            "upstream: missing",
        ),
        (
            "routes[0].methods[0]",
            "not an HTTP method",
            "methods: [get]",
        ),
        ("routes[1].name", "duplicate route name", "# dup-route"),
        (
            "routes[1].hosts[0]",
            "wildcard is only allowed",
            "api.*.com",
        ),
        (
            "routes[1].path_prefix",
            "must start with /",
            "path_prefix: nope",
        ),
    ];
    let mut missing = Vec::new();
    for (path, msg, at) in expected {
        let line = line_of(&conf, at);
        let want = format!("bad.yaml:{line}: {path}: ");
        let found = stderr.lines().any(|l| l.contains(&want) && l.contains(msg));
        if !found {
            missing.push(format!("{want}…{msg}"));
        }
    }
    assert!(
        missing.is_empty(),
        "not reported:\n  {}\n--- podgate said:\n{stderr}",
        missing.join("\n  ")
    );
    assert!(
        expected.len() >= 15,
        "the contract asks for at least 15 distinct mistakes"
    );
}

/// The traffic-policy keys (`balance`, `hash_on`, `zone_aware`, `priority`, `server.zone`): each
/// mistake named with its path and line, and a valid set read into the config.
#[test]
fn traffic_policy_keys_are_checked_with_path_and_line() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(dir.path().join("cluster")).unwrap();
    let conf = r#"listeners:
  - address: 127.0.0.1:8080
clusters:
  - name: local
    manifests: cluster
upstreams:
  - name: a
    balance: fastest
    services:
      - {cluster: local, service: s, port: 80, priority: 10}
  - name: b
    balance: consistent_hash
    services: [{cluster: local, service: s, port: 80}]
  - name: c
    balance: consistent_hash
    hash_on: header bad name
    services: [{cluster: local, service: s, port: 80}]
  - name: d
    hash_on: client_ip
    zone_aware: true
    services: [{cluster: local, service: s, port: 80}]
"#;
    std::fs::write(dir.path().join("bad.yaml"), conf).unwrap();
    let out = podgate(&["-c", "bad.yaml", "-t"], dir.path());
    assert_eq!(out.status.code(), Some(64), "{out:?}");
    let stderr = String::from_utf8_lossy(&out.stderr);
    for (path, msg, at) in [
        ("upstreams[0].balance", "not a balance policy", "fastest"),
        (
            "upstreams[0].services[0].priority",
            "outside 0..9",
            "priority: 10",
        ),
        (
            "upstreams[1].hash_on",
            "is required",
            "balance: consistent_hash",
        ),
        ("upstreams[2].hash_on", "not a hash key", "bad name"),
        (
            "upstreams[3].hash_on",
            "only applies with balance: consistent_hash",
            "hash_on: client_ip",
        ),
        ("upstreams[3].zone_aware", "needs server.zone", "zone_aware"),
    ] {
        assert_eq!(
            stderr.lines().filter(|l| l.contains(path)).count(),
            1,
            "one mistake, one line: {stderr}"
        );
        let want = format!("bad.yaml:{}: {path}: ", line_of(conf, at));
        assert!(
            stderr.lines().any(|l| l.contains(&want) && l.contains(msg)),
            "{want}…{msg} not reported:\n{stderr}"
        );
    }

    let good = r#"listeners:
  - address: 127.0.0.1:8080
server:
  zone: eu-west-1a
clusters:
  - name: local
    manifests: cluster
upstreams:
  - name: a
    balance: consistent_hash
    hash_on: cookie session
    zone_aware: true
    services:
      - {cluster: local, service: s, port: 80}
      - {cluster: local, service: t, port: 80, priority: 1}
  - name: b
    balance: least_request
    nodes: [{address: "127.0.0.1:9"}]
  - name: c
    balance: consistent_hash
    hash_on: header X-User
    nodes: [{address: "127.0.0.1:9"}]
"#;
    let c = podgate_gateway::config::parse("good.yaml", good, dir.path()).expect("valid");
    use podgate_gateway::config::{Balance, HashOn};
    assert_eq!(c.server.zone.as_deref(), Some("eu-west-1a"));
    assert_eq!(
        c.upstreams[0].balance,
        Balance::ConsistentHash(HashOn::Cookie("session".into()))
    );
    assert_eq!(c.upstreams[0].local_zone.as_deref(), Some("eu-west-1a"));
    assert_eq!(c.upstreams[1].local_zone, None);
    let priorities: Vec<u32> = c.upstreams[0].services.iter().map(|s| s.priority).collect();
    assert_eq!(priorities, [0, 1]);
    assert_eq!(c.upstreams[1].balance, Balance::LeastRequest);
    assert_eq!(
        c.upstreams[2].balance,
        Balance::ConsistentHash(HashOn::Header("x-user".into()))
    );
}

#[test]
fn a_bad_config_stops_start_up_before_any_port_is_bound() {
    let dir = tempfile::tempdir().unwrap();
    let port = support::free_port();
    std::fs::write(
        dir.path().join("bad.yaml"),
        format!(
            "listeners:\n  - address: 127.0.0.1:{port}\nupstreams:\n  - name: u\n    nodes: [{{address: \"127.0.0.1:9\", weight: 500}}]\n"
        ),
    )
    .unwrap();
    let out = podgate(&["-c", "bad.yaml"], dir.path());
    assert_eq!(out.status.code(), Some(64));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("bad.yaml:5: upstreams[0].nodes[0].weight: 500 is outside 1..100"),
        "{stderr}"
    );
    assert!(!stderr.contains("listening on"), "{stderr}");
    // The port is still free: nothing was bound.
    std::net::TcpListener::bind(("127.0.0.1", port)).expect("port still free");
}

#[test]
fn yaml_syntax_errors_name_the_line() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("broken.yaml"),
        "listeners:\n  - address: 127.0.0.1:8080\nroutes: [\n  {name: a\n",
    )
    .unwrap();
    let out = podgate(&["-c", "broken.yaml", "-t"], dir.path());
    assert_eq!(out.status.code(), Some(64));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("broken.yaml:") && stderr.contains("YAML syntax error"),
        "{stderr}"
    );

    let out = podgate(&["-c", "missing.yaml", "-t"], dir.path());
    assert_eq!(out.status.code(), Some(64));
    assert!(String::from_utf8_lossy(&out.stderr).contains("cannot read the file"));
}

#[test]
fn every_example_in_conf_is_valid() {
    let conf = Path::new(env!("CARGO_MANIFEST_DIR")).join("conf");
    let mut checked = 0;
    for entry in std::fs::read_dir(&conf).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "yaml") {
            let out = podgate(&["-t", "-c", path.to_str().unwrap()], Path::new("/"));
            assert!(
                out.status.success(),
                "{}: {}",
                path.display(),
                String::from_utf8_lossy(&out.stderr)
            );
            checked += 1;
        }
    }
    assert!(
        checked >= 2,
        "conf/ should hold the quickstart and a full example"
    );
}

#[test]
fn version_is_printed() {
    let out = podgate(&["--version"], Path::new("/"));
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).starts_with("podgate "));
}

#[test]
fn protocol_and_grpc_check_mistakes_name_path_and_line() {
    let dir = tempfile::tempdir().unwrap();
    let conf = r#"listeners:
  - address: 127.0.0.1:8080
upstreams:
  - name: a
    protocol: h3
    nodes: [{address: "127.0.0.1:9"}]
  - name: b
    protocol: h2 # h2-plain
    nodes: [{address: "127.0.0.1:9"}]
  - name: c
    scheme: https
    tls: {verify: false}
    protocol: h2c # h2c-tls
    nodes: [{address: "127.0.0.1:9"}]
  - name: d
    health_check:
      kind: grpc # grpc-h1
    nodes: [{address: "127.0.0.1:9"}]
  - name: fine
    protocol: h2c
    health_check: {kind: grpc, interval: 2s}
    nodes: [{address: "127.0.0.1:9"}]
"#;
    std::fs::write(dir.path().join("bad.yaml"), conf).unwrap();
    let out = podgate(&["-c", "bad.yaml", "-t"], dir.path());
    assert_eq!(out.status.code(), Some(64), "{out:?}");
    let stderr = String::from_utf8_lossy(&out.stderr);
    for (path, msg, at) in [
        (
            "upstreams[0].protocol",
            "not a protocol: use http1, h2 or h2c",
            "protocol: h3",
        ),
        ("upstreams[1].protocol", "h2 runs over TLS", "# h2-plain"),
        (
            "upstreams[2].protocol",
            "h2c is HTTP/2 without TLS",
            "# h2c-tls",
        ),
        (
            "upstreams[3].health_check.kind",
            "kind grpc needs protocol",
            "# grpc-h1",
        ),
    ] {
        let want = format!("bad.yaml:{}: {path}: ", line_of(conf, at));
        assert!(
            stderr.lines().any(|l| l.contains(&want) && l.contains(msg)),
            "not reported: {want}…{msg}\n--- podgate said:\n{stderr}"
        );
    }
    assert!(!stderr.contains("upstreams[4]"), "{stderr}");
}

/// `server.zone_from_node` names the Kubernetes cluster asked for podgate's node; it defaults to
/// the one `in_cluster` cluster; `server.zone` always wins; a manifests folder or an unknown
/// name is refused with path and line.
#[test]
fn zone_from_node_names_a_kubernetes_cluster() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(dir.path().join("cluster")).unwrap();
    let parse = |server: &str, clusters: &str| {
        let conf = format!(
            "listeners:\n  - address: 127.0.0.1:8080\nserver:\n  threads: 1\n{server}\
             clusters:\n  - {{name: local, manifests: cluster}}\n{clusters}\
             upstreams:\n  - name: a\n    zone_aware: true\n\
             \x20   services: [{{cluster: local, service: s, port: 80}}]\n"
        );
        podgate_gateway::config::parse("z.yaml", &conf, dir.path())
    };
    let self_cluster = "  - {name: self, in_cluster: true}\n";
    // The in_cluster cluster by default.
    let c = parse("", self_cluster).expect("valid");
    assert_eq!(c.server.zone_from_node.as_deref(), Some("self"));
    assert!(c.upstreams[0].zone_aware);
    assert_eq!(c.upstreams[0].local_zone, None, "learned at start-up");
    // Named explicitly.
    let c = parse("  zone_from_node: self\n", self_cluster).expect("valid");
    assert_eq!(c.server.zone_from_node.as_deref(), Some("self"));
    // server.zone wins: nothing to learn.
    let c = parse("  zone: eu-1a\n  zone_from_node: self\n", self_cluster).expect("valid");
    assert_eq!(c.server.zone_from_node, None);
    assert_eq!(c.upstreams[0].local_zone.as_deref(), Some("eu-1a"));
    assert_eq!(c.upstreams[0].zone_source.as_deref(), Some("server.zone"));

    let errors = |server: &str, clusters: &str| {
        parse(server, clusters)
            .expect_err("refused")
            .0
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join("\n")
    };
    let e = errors("  zone_from_node: local\n", "");
    assert!(
        e.contains("z.yaml:5: server.zone_from_node: cluster `local` is a manifests folder"),
        "{e}"
    );
    let e = errors("  zone_from_node: nowhere\n", "");
    assert!(
        e.contains("server.zone_from_node: `nowhere` is not a cluster name (clusters: local)"),
        "{e}"
    );
    // No zone and nowhere to learn it from.
    let e = errors("", "");
    assert!(
        e.contains("upstreams[0].zone_aware: needs server.zone"),
        "{e}"
    );
    assert!(
        e.contains("server.zone_from_node, or an in_cluster cluster"),
        "{e}"
    );
}
