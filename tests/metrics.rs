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
