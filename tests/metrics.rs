//! `/metrics` on the admin listener: counts that follow real traffic, bounded labels.

mod support;

use support::*;

/// The value of the sample whose line starts with `series` (name plus labels, as rendered).
fn sample(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find(|l| l.starts_with(series) && l[series.len()..].starts_with(' '))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

#[tokio::test]
async fn metrics_follow_traffic_and_discovery() {
    let pods = pods_same_port(&["m-v1", "m-v2"]).await;
    let port = pods[0].addr.port();
    let mut draining = Ep::ready(&pods[1]);
    draining.ready = Some(false);
    draining.terminating = Some(true);
    let manifest = format!(
        "{}---\n{}",
        service_yaml("web"),
        slice_yaml("web-1", "web", port, &[Ep::ready(&pods[0]), draining])
    );
    let conf = format!(
        "clusters:\n  - name: local\n    manifests: cluster\n\
         upstreams:\n  - name: web\n    services: [{{cluster: local, service: web, port: 8000}}]\n\
         \x20   nodes: [{{address: \"{}\"}}]\n\
         routes:\n  - {{name: web-route, path_prefix: /web, upstream: web}}\n",
        pods[0].addr
    );
    let gw = Gateway::start(&conf, &[("cluster/web.yaml", &manifest)]).await;
    for _ in 0..3 {
        assert_eq!(gw.get("h", "/web/x").await.status, 200);
    }
    assert_eq!(gw.get("h", "/elsewhere").await.status, 404);

    // Requests are counted when Pingora finishes them, just after the answer went out.
    let scrape = || async {
        String::from_utf8(get(gw.admin, "a", "/metrics").await.unwrap().body.to_vec()).unwrap()
    };
    let counted = |t: &str| {
        sample(
            t,
            r#"podgate_requests_total{code="2xx",route="web-route",upstream="web"}"#,
        ) == Some(3.0)
            && sample(
                t,
                r#"podgate_requests_total{code="4xx",route="(none)",upstream="(none)"}"#,
            ) == Some(1.0)
    };
    wait_for("the requests to be counted", || async {
        counted(&scrape().await)
    })
    .await;
    let text = scrape().await;
    let expect = |series: &str, want: f64| {
        assert_eq!(sample(&text, series), Some(want), "{series} in\n{text}");
    };
    expect(
        r#"podgate_requests_total{code="2xx",route="web-route",upstream="web"}"#,
        3.0,
    );
    expect(
        r#"podgate_requests_total{code="4xx",route="(none)",upstream="(none)"}"#,
        1.0,
    );
    expect(
        r#"podgate_request_duration_seconds_count{route="web-route",upstream="web"}"#,
        3.0,
    );
    expect(
        r#"podgate_upstream_duration_seconds_count{upstream="web"}"#,
        3.0,
    );
    expect(
        r#"podgate_upstream_endpoints{cluster="local",state="ready",upstream="web"}"#,
        1.0,
    );
    expect(
        r#"podgate_upstream_endpoints{cluster="local",state="draining",upstream="web"}"#,
        1.0,
    );
    expect(
        r#"podgate_upstream_endpoints{cluster="static",state="ready",upstream="web"}"#,
        1.0,
    );
    expect(r#"podgate_build_info{version="0.1.0"}"#, 1.0);
    expect(
        r#"podgate_discovery_errors_total{cluster="local",reason="parse"}"#,
        0.0,
    );
    assert!(sample(
        &text,
        r#"podgate_discovery_last_sync_timestamp_seconds{cluster="local"}"#
    )
    .is_some_and(|t| t > 1.7e9));
    assert!(!text.contains("127.0."), "no addresses in metric labels");
    assert!(
        !text.contains("/elsewhere"),
        "no raw paths in metric labels"
    );
}

#[tokio::test]
async fn access_log_lines_and_request_ids() {
    let pods = pods_same_port(&["log-v1"]).await;
    let conf = format!(
        "access_log: {{path: access.log}}\n\
         upstreams:\n  - {{name: web, nodes: [{{address: \"{}\"}}]}}\n\
         routes:\n  - {{name: web-route, path_prefix: /web, upstream: web}}\n",
        pods[0].addr
    );
    let gw = Gateway::start(&conf, &[]).await;
    let given = request(
        gw.addr,
        "GET",
        "h.example",
        "/web/a?secret=1",
        &[("x-request-id", "abc-123")],
    )
    .await
    .unwrap();
    assert_eq!(given.header("x-request-id").as_deref(), Some("abc-123"));
    assert_eq!(
        given.json()["headers"]["x-request-id"],
        "abc-123",
        "passed to the Pod"
    );
    let made = gw.get("h.example", "/web/b").await;
    let id = made.json()["headers"]["x-request-id"]
        .as_str()
        .unwrap()
        .to_string();
    assert_eq!(id.len(), 32, "generated when missing");
    assert_eq!(made.header("x-request-id"), Some(id.clone()));
    assert_eq!(gw.get("h.example", "/nowhere").await.status, 404);

    let path = gw.path("access.log");
    wait_for("three access log lines", || async {
        std::fs::read_to_string(&path).is_ok_and(|t| t.lines().count() >= 3)
    })
    .await;
    let text = std::fs::read_to_string(&path).unwrap();
    let lines: Vec<serde_json::Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).expect("each line is JSON"))
        .collect();
    let first = &lines[0];
    assert_eq!(first["request_id"], "abc-123");
    assert_eq!(first["method"], "GET");
    assert_eq!(first["host"], "h.example");
    assert_eq!(first["path"], "/web/a", "no query string in the log");
    assert_eq!(first["route"], "web-route");
    assert_eq!(first["upstream"], "web");
    assert_eq!(first["status"], 200);
    assert_eq!(first["retries"], 0);
    assert!(first["bytes"].as_u64().unwrap() > 0);
    assert!(first["duration_ms"].as_f64().unwrap() >= first["upstream_ms"].as_f64().unwrap());
    assert!(first["time"].as_str().unwrap().ends_with('Z'));
    assert_eq!(lines[1]["request_id"], id.as_str());
    assert_eq!(lines[2]["status"], 404);
    assert!(lines[2]["route"].is_null());
}

#[tokio::test]
async fn admin_token_guards_everything_but_health_and_config_hides_secrets() {
    let pods = pods_same_port(&["adm-v1"]).await;
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("admin.token"), "s3cret-token\n").unwrap();
    let conf = format!(
        "upstreams:\n  - {{name: web, nodes: [{{address: \"{}\"}}]}}\n\
         routes:\n  - {{name: web, path_prefix: /, upstream: web}}\n",
        pods[0].addr
    );
    let gw = Gateway::start_with_admin(dir, "token_file: admin.token", &conf).await;
    for open in ["/healthz", "/readyz"] {
        assert_eq!(
            get(gw.admin, "a", open).await.unwrap().status,
            200,
            "{open}"
        );
    }
    for guarded in ["/metrics", "/upstreams", "/config"] {
        let none = get(gw.admin, "a", guarded).await.unwrap();
        assert_eq!(none.status, 401, "{guarded} without a token");
        assert_eq!(none.header("www-authenticate").as_deref(), Some("Bearer"));
        let wrong = request(
            gw.admin,
            "GET",
            "a",
            guarded,
            &[("authorization", "Bearer nope")],
        )
        .await
        .unwrap();
        assert_eq!(wrong.status, 401, "{guarded} with a wrong token");
        let right = request(
            gw.admin,
            "GET",
            "a",
            guarded,
            &[("authorization", "Bearer s3cret-token")],
        )
        .await
        .unwrap();
        assert_eq!(right.status, 200, "{guarded} with the token");
    }
    let config = request(
        gw.admin,
        "GET",
        "a",
        "/config",
        &[("authorization", "Bearer s3cret-token")],
    )
    .await
    .unwrap();
    let text = String::from_utf8_lossy(&config.body);
    assert!(!text.contains("s3cret"), "the token never shows: {text}");
    let c = config.json();
    assert_eq!(c["admin"]["token_file"], "(redacted)");
    assert_eq!(c["routes"][0]["name"], "web");
    assert_eq!(c["upstreams"][0]["retries"], 1, "defaults are shown");
    assert_eq!(c["upstreams"][0]["connect_timeout"], "2000ms");
}

/// The `podgate_*` families of the README's Metrics table.
fn documented_families() -> Vec<String> {
    let readme =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md")).unwrap();
    let section = readme.split("\n## Metrics\n").nth(1).unwrap();
    let section = section.split("\n## ").next().unwrap();
    let names: Vec<String> = section
        .lines()
        // Families whose every series names a rule: none exists before a config has one.
        .filter(|l| !l.contains("exported once a route has rate-limit rules"))
        .filter_map(|l| l.strip_prefix("| `"))
        .filter_map(|l| l.split('`').next())
        .map(str::to_string)
        .collect();
    assert!(names.len() >= 15, "{names:?}");
    names
}

/// Parses a scrape with the Python `prometheus_client` text parser (a real exposition-format
/// parser, not ours) and returns the family names it found; None (with a note) when python3
/// or the module is missing here (`pip install prometheus-client`).
fn parsed_families(text: &str) -> Option<Vec<String>> {
    use std::io::Write;
    const SCRIPT: &str = "import sys\n\
        from prometheus_client.parser import text_string_to_metric_families as parse\n\
        for f in parse(sys.stdin.read()):\n    print(f.name, len(f.samples))\n";
    let probe = std::process::Command::new("python3")
        .args(["-c", "import prometheus_client.parser"])
        .output();
    if !probe.is_ok_and(|o| o.status.success()) {
        println!("skipped the exposition-format parse: no python3 with prometheus_client");
        return None;
    }
    let mut child = std::process::Command::new("python3")
        .args(["-c", SCRIPT])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "prometheus_client refuses the scrape: {}\n{text}",
        String::from_utf8_lossy(&out.stderr)
    );
    Some(
        String::from_utf8(out.stdout)
            .unwrap()
            .lines()
            .map(|l| l.split(' ').next().unwrap().to_string())
            .collect(),
    )
}

/// Every `(family, labels)` line of a scrape, without values and comments.
fn series(text: &str) -> Vec<String> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .map(|l| l.rsplit_once(' ').map_or(l, |(s, _)| s).to_string())
        .collect()
}

/// Issue 14: every documented family is there from start (zeros, not absence), `process_*`
/// metrics are exported, and a reload deletes the series of the routes, upstreams and clusters
/// it removed instead of freezing them for ever.
#[tokio::test]
async fn families_exist_from_start_and_a_reload_drops_removed_series() {
    let pods = pods_same_port(&["g-v1", "g-v2"]).await;
    let port = pods[0].addr.port();
    let manifest = format!(
        "{}---\n{}",
        service_yaml("web"),
        slice_yaml("web-1", "web", port, &[Ep::ready(&pods[0])])
    );
    let conf = |with_old: bool| {
        let mut c = String::from(
            "clusters:\n  - name: local\n    manifests: cluster\n\
             upstreams:\n  - name: web\n    services: [{cluster: local, service: web, port: 8000}]\n",
        );
        if with_old {
            c += &format!(
                "\x20   nodes: [{{address: \"{}\"}}]\n\
                 \x20 - name: old\n    nodes: [{{address: \"{}\"}}]\n\
                 \x20   health_check: {{kind: tcp, interval: 1s}}\n",
                pods[0].addr, pods[1].addr
            );
        }
        c += "routes:\n  - {name: web-route, path_prefix: /web, upstream: web}\n";
        if with_old {
            c += "  - {name: old-route, path_prefix: /old, upstream: old}\n";
        }
        c
    };
    let gw = Gateway::start(&conf(true), &[("cluster/web.yaml", &manifest)]).await;
    let scrape = || async {
        String::from_utf8(get(gw.admin, "a", "/metrics").await.unwrap().body.to_vec()).unwrap()
    };

    // From start, before any request, change or reload.
    let text = scrape().await;
    for family in documented_families() {
        assert!(
            text.contains(&format!("\n# TYPE {family} ")),
            "{family} is missing at start:\n{text}"
        );
    }
    assert!(
        text.lines()
            .any(|l| l.starts_with("podgate_discovery_propagation_seconds_count ")),
        "{text}"
    );
    assert_eq!(
        sample(&text, r#"podgate_config_reloads_total{result="success"}"#),
        Some(0.0)
    );
    assert_eq!(
        sample(
            &text,
            r#"podgate_health_checks_total{result="failure",upstream="old"}"#
        )
        .map(|_| ()),
        Some(())
    );
    assert_eq!(sample(&text, "podgate_access_log_dropped_total"), Some(0.0));
    for (name, at_least) in [
        ("process_cpu_seconds_total", 0.0),
        ("process_resident_memory_bytes", 1e6),
        ("process_virtual_memory_bytes", 1e6),
        ("process_open_fds", 3.0),
        ("process_max_fds", 16.0),
        ("process_threads", 2.0),
        // A Unix time after 2020: the process' start, not seconds since boot.
        ("process_start_time_seconds", 1.6e9),
    ] {
        let v = sample(&text, name).unwrap_or_else(|| panic!("no {name} in\n{text}"));
        assert!(v >= at_least, "{name} = {v}");
    }

    if let Some(parsed) = parsed_families(&text) {
        // The parser names counters without `_total`.
        for family in documented_families() {
            let base = family.strip_suffix("_total").unwrap_or(&family);
            assert!(
                parsed.iter().any(|p| p == base),
                "{family} not parsed: {parsed:?}"
            );
        }
    }

    // Traffic on both routes, then a reload that removes `old`, `old-route` and web's nodes.
    assert_eq!(gw.get("h", "/web/x").await.status, 200);
    assert_eq!(gw.get("h", "/old/x").await.status, 200);
    wait_for("the requests to be counted", || async {
        let t = scrape().await;
        sample(
            &t,
            r#"podgate_requests_total{code="2xx",route="old-route",upstream="old"}"#,
        ) == Some(1.0)
            && sample(
                &t,
                r#"podgate_requests_total{code="2xx",route="web-route",upstream="web"}"#,
            ) == Some(1.0)
    })
    .await;
    let before = scrape().await;
    assert!(before.contains(r#"cluster="static",state="ready",upstream="web""#));
    gw.rewrite_config(&conf(false));
    gw.signal("HUP");
    wait_for("the reload", || async {
        sample(
            &scrape().await,
            r#"podgate_config_reloads_total{result="success"}"#,
        ) == Some(1.0)
    })
    .await;
    let after = scrape().await;
    parsed_families(&after);
    let gone: Vec<String> = series(&after)
        .into_iter()
        .filter(|s| {
            s.contains(r#"upstream="old""#)
                || s.contains(r#"route="old-route""#)
                || (s.contains(r#"cluster="static""#) && s.contains(r#"upstream="web""#))
        })
        .collect();
    assert!(
        gone.is_empty(),
        "series of removed things remain: {gone:#?}"
    );
    // What stays keeps its counts.
    assert_eq!(
        sample(
            &after,
            r#"podgate_requests_total{code="2xx",route="web-route",upstream="web"}"#
        ),
        Some(1.0)
    );
    assert_eq!(
        sample(
            &after,
            r#"podgate_upstream_endpoints{cluster="local",state="ready",upstream="web"}"#
        ),
        Some(1.0)
    );
    assert!(sample(
        &after,
        r#"podgate_requests_total{code="4xx",route="(none)",upstream="(none)"}"#
    )
    .is_some());
}

/// `admin.open_metrics` (deploy/podgate.yaml): Prometheus and the kubelet need no token, while
/// `/config` and `/upstreams` (every Pod address) still do.
#[tokio::test]
async fn open_metrics_leaves_only_config_and_upstreams_behind_the_token() {
    let pods = pods_same_port(&["om-v1"]).await;
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("admin.token"), "s3cret-token\n").unwrap();
    let conf = format!(
        "upstreams:\n  - {{name: web, nodes: [{{address: \"{}\"}}]}}\n\
         routes:\n  - {{name: web, path_prefix: /, upstream: web}}\n",
        pods[0].addr
    );
    let gw = Gateway::start_with_admin(dir, "token_file: admin.token\n  open_metrics: true", &conf)
        .await;
    for open in ["/healthz", "/readyz", "/metrics"] {
        assert_eq!(
            get(gw.admin, "a", open).await.unwrap().status,
            200,
            "{open}"
        );
    }
    let metrics = get(gw.admin, "a", "/metrics").await.unwrap();
    assert!(String::from_utf8_lossy(&metrics.body).contains("podgate_requests_total"));
    for guarded in ["/upstreams", "/config", "/nope"] {
        let none = get(gw.admin, "a", guarded).await.unwrap();
        assert_eq!(none.status, 401, "{guarded} without a token");
    }
    let config = request(
        gw.admin,
        "GET",
        "a",
        "/config",
        &[("authorization", "Bearer s3cret-token")],
    )
    .await
    .unwrap();
    assert_eq!(config.json()["admin"]["open_metrics"], true);
}
