//! The policies that are not about credentials, end to end from config text: redirect, CORS, IP
//! rules behind trusted proxies, header rules, rewrites, body limits; and the config mistakes
//! each refuses with line and path.

use super::test_support::*;
use super::{client_of, Fields, Policies, TrustedProxies};
use std::net::IpAddr;

const ROUTES: &str = r#"server:
  trusted_proxies: [10.0.0.0/8]
routes:
  - name: cors
    path_prefix: /c
    methods: [GET, POST]
    upstream: u
    policies:
      cors: {origins: ["https://shop.example.com", "https://*.example.org"], headers: [x-api-key, content-type], expose_headers: [x-trace], max_age: 10m, credentials: true}
  - name: star
    path_prefix: /s
    upstream: u
    policies: {cors: {origins: ["*"]}}
  - name: ip
    path_prefix: /i
    upstream: u
    policies: {ip_allow: [192.0.2.0/24, "2001:db8::/32"], ip_deny: [192.0.2.66]}
  - name: headers
    path_prefix: /h
    upstream: u
    policies:
      request_headers: {set: {x-env: prod}, add: {x-tag: a}, remove: [x-debug]}
      response_headers: {set: {cache-control: no-store}, remove: [server]}
  - name: rewrite
    path_prefix: /orders
    upstream: u
    policies: {rewrite: {path: {regex: "^/orders/(\\d+)$", to: "/v2/order/${1}"}}}
  - name: prefix
    path_prefix: /old
    upstream: u
    policies: {rewrite: {prefix: /new}}
  - name: https
    path_prefix: /r
    upstream: u
    policies: {redirect: {scheme: https, status: 308}}
  - name: moved
    path_prefix: /m
    upstream: u
    policies: {redirect: {host: new.example.com, path: /landing}}
  - name: body
    path_prefix: /b
    upstream: u
    policies: {max_body: 1KiB}
  - {name: plain, path_prefix: /p, upstream: u}
"#;

fn fixture() -> Fixture {
    Fixture::new(ROUTES, &[])
}

#[test]
fn cors_preflights_are_answered_and_actual_requests_get_the_allow_fields() {
    let fx = fixture();
    let p = fx.route("cors");
    assert!(p.answers_preflights());
    let mut preflight = get("/c/x")
        .header("Origin", "https://shop.example.com")
        .header("Access-Control-Request-Method", "POST")
        .header("Access-Control-Request-Headers", "x-api-key");
    preflight.method = http::Method::OPTIONS;
    let out = run(&p, &preflight);
    assert_eq!(out.status(), Some(204));
    assert_eq!(
        out.answer_field("access-control-allow-origin"),
        ["https://shop.example.com"]
    );
    assert_eq!(
        out.answer_field("access-control-allow-methods"),
        ["GET, POST"]
    );
    assert_eq!(
        out.answer_field("access-control-allow-headers"),
        ["x-api-key, content-type"]
    );
    assert_eq!(out.answer_field("access-control-max-age"), ["600"]);
    assert_eq!(
        out.answer_field("access-control-allow-credentials"),
        ["true"]
    );
    assert_eq!(out.answer_field("vary"), ["Origin"]);

    let mut evil = preflight.clone();
    evil.headers[0].1 = "https://evil.example.com".into();
    let out = run(&p, &evil);
    assert_eq!(out.status(), Some(204));
    let cors_fields = out
        .answer
        .as_ref()
        .unwrap()
        .headers
        .iter()
        .filter(|(n, _)| n.as_str().starts_with("access-control-"))
        .count();
    assert_eq!(cors_fields, 0, "a disallowed origin gets no CORS field");

    let actual = run(&p, &get("/c/x").header("origin", "https://a.example.org"));
    assert_eq!(actual.status(), None);
    assert_eq!(
        actual.answer_field("access-control-allow-origin"),
        ["https://a.example.org"]
    );
    assert_eq!(
        actual.answer_field("access-control-expose-headers"),
        ["x-trace"]
    );
    assert!(
        actual
            .edits
            .response_remove
            .iter()
            .any(|n| n == "access-control-allow-origin"),
        "the Pod's own CORS fields go"
    );
    let other = run(&p, &get("/c/x").header("origin", "https://example.org"));
    assert!(other.answer_field("access-control-allow-origin").is_empty());
    let no_origin = run(&p, &get("/c/x"));
    assert!(no_origin.edits.response_add.is_empty());

    let star = run(
        &fx.route("star"),
        &get("/s").header("origin", "https://anything.test"),
    );
    assert_eq!(star.answer_field("access-control-allow-origin"), ["*"]);
    assert!(star.answer_field("vary").is_empty());
}

#[test]
fn ip_rules_judge_the_client_behind_trusted_proxies_only() {
    let fx = fixture();
    let p = fx.route("ip");
    let trusted = TrustedProxies::new(&fx.config.server.trusted_proxies);
    let ip = |s: &str| s.parse::<IpAddr>().unwrap();
    // The client is computed from the fields as the pipeline will, then judged.
    let status = |peer: &str, xff: Option<&str>| {
        let mut r = get("/i");
        r.peer = ip(peer);
        if let Some(x) = xff {
            r = r.header("x-forwarded-for", x);
        }
        let map: http::HeaderMap = r
            .headers
            .iter()
            .map(|(n, v)| (n.parse().unwrap(), v.parse().unwrap()))
            .collect();
        r.client = client_of(Some(r.peer), Fields::Map(&map), &trusted);
        run(&p, &r).status()
    };
    assert_eq!(status("192.0.2.7", None), None);
    assert_eq!(
        status("192.0.2.66", None),
        Some(403),
        "denied inside the allowed range"
    );
    assert_eq!(status("198.51.100.1", None), Some(403));
    assert_eq!(status("2001:db8::9", None), None);
    // A trusted proxy tells who the client is ...
    assert_eq!(status("10.1.1.1", Some("198.51.100.1, 192.0.2.8")), None);
    assert_eq!(
        status("10.1.1.1", Some("192.0.2.8, 198.51.100.1")),
        Some(403)
    );
    // ... an untrusted peer cannot, whatever it claims.
    assert_eq!(status("198.51.100.1", Some("192.0.2.8")), Some(403));
}

#[test]
fn header_rules_set_add_and_remove_both_ways() {
    let fx = fixture();
    let out = run(
        &fx.route("headers"),
        &get("/h").header("x-env", "dev").header("x-debug", "1"),
    );
    assert_eq!(out.status(), None);
    assert!(out.removes("x-env") && out.removes("x-debug"));
    assert_eq!(out.added("x-env"), ["prod"]);
    assert_eq!(out.added("x-tag"), ["a"]);
    let gone: Vec<&str> = out
        .edits
        .response_remove
        .iter()
        .map(|n| n.as_str())
        .collect();
    assert_eq!(gone, ["server", "cache-control"]);
    assert_eq!(out.answer_field("cache-control"), ["no-store"]);
}

#[test]
fn rewrites_keep_the_query() {
    let fx = fixture();
    let p = fx.route("rewrite");
    assert_eq!(
        run(&p, &get("/orders/42?expand=items&x=1"))
            .edits
            .path
            .as_deref(),
        Some("/v2/order/42?expand=items&x=1")
    );
    assert_eq!(
        run(&p, &get("/orders/abc?x=1")).edits.path,
        None,
        "no match: the path goes as sent"
    );
    let p = fx.route("prefix");
    assert_eq!(
        run(&p, &get("/old/a/b?q")).edits.path.as_deref(),
        Some("/new/a/b?q")
    );
}

#[test]
fn redirects_are_answered_with_location() {
    let fx = fixture();
    let p = fx.route("https");
    let out = run(&p, &get("/r/a?b=1"));
    assert_eq!(out.status(), Some(308));
    assert_eq!(
        out.answer_field("location"),
        ["https://api.example.com/r/a?b=1"]
    );
    let mut tls = get("/r/a");
    tls.tls = true;
    assert_eq!(run(&p, &tls).status(), None, "already https: no loop");
    let out = run(&fx.route("moved"), &get("/m/x?y=2"));
    assert_eq!(out.status(), Some(301));
    assert_eq!(
        out.answer_field("location"),
        ["http://new.example.com/landing?y=2"]
    );
}

#[test]
fn body_limits_refuse_a_declared_length_and_pass_the_limit_on() {
    let fx = fixture();
    let p = fx.route("body");
    let mut r = get("/b");
    r.content_length = Some(1025);
    assert_eq!(run(&p, &r).status(), Some(413));
    r.content_length = Some(1024);
    let out = run(&p, &r);
    assert_eq!((out.status(), out.edits.max_body), (None, Some(1024)));
    r.content_length = None;
    assert_eq!(
        run(&p, &r).edits.max_body,
        Some(1024),
        "a chunked body is limited as it streams"
    );
}

#[test]
fn only_a_route_without_policies_is_empty() {
    let fx = fixture();
    assert!(fx.route("plain").is_empty());
    assert!(Policies::default().is_empty());
    for name in [
        "cors", "ip", "headers", "rewrite", "prefix", "https", "body",
    ] {
        assert!(!fx.route(name).is_empty(), "{name}");
    }
}

#[test]
fn every_policy_mistake_is_reported_with_line_and_path() {
    let text = r#"server:
  trusted_proxies: [10.0.0.1/8, nonsense]
consumers:
  - {name: shop, api_keys_file: missing.keys}
  - {name: shop}
  - {name: a, api_keys_file: a.keys}
  - {name: b, api_keys_file: b.keys}
jwt_providers:
  - {name: corp, jwks_file: nothing.json}
  - {name: hs, secret_file: short.secret}
  - {name: none}
routes:
  - name: r
    upstream: u
    strip_prefix: true
    policies:
      auth: {jwt: nobody, forward: yes}
      consumers: [ghost]
      ip_allow: [300.1.1.1]
      cors: {origins: ["https://x.com/path", "*"], credentials: true}
      request_headers: {set: {host: x, content-length: "1"}, remove: [":path"]}
      response_headers: {add: {transfer-encoding: chunked}}
      rewrite: {path: {regex: "^/(unclosed", to: /x}}
      redirect: {status: 302, path: "no-slash"}
      max_body: lots
  - name: s
    upstream: u
    path_prefix: /s
    policies:
      auth: {api_key: {header: x-k, query: k}}
      rewrite: {path: {regex: "^/s/(.*)$", to: "/$2"}}
      redirect: {scheme: https, status: 305}
  - name: t
    upstream: u
    path_prefix: /t
    policies:
      auth: {any_of: [{any_of: [{jwt: corp}]}, {jwt: corp, forward: true}]}
      cors: {methods: [GET]}
"#;
    let errors = config_errors(
        text,
        &[
            ("a.keys", b"same\n"),
            ("b.keys", b"same\n"),
            ("short.secret", b"tooshort"),
        ],
    );
    for expected in [
        "t.yaml:4: server.trusted_proxies[0]: `10.0.0.1/8` has bits set past its /8: write 10.0.0.0/8",
        "t.yaml:4: server.trusted_proxies[1]: `nonsense` is not an address or CIDR range",
        "t.yaml:6: consumers[0].api_keys_file: cannot read",
        "t.yaml:7: consumers[1].name: duplicate consumer name `shop`",
        "t.yaml:9: consumers[3].api_keys_file: a key of",
        "is also a key of consumer `a`",
        "t.yaml:11: jwt_providers[0].jwks_file: cannot read",
        "t.yaml:12: jwt_providers[1].secret_file:",
        "HS256 needs at least 32 bytes",
        "t.yaml:13: jwt_providers[2]: needs jwks_file",
        "routes[0].policies.auth.jwt: unknown jwt provider `nobody` (jwt_providers: corp, hs, none)",
        "routes[0].policies.auth.forward: expected true or false, found a string",
        "routes[0].policies.consumers[0]: unknown consumer `ghost`",
        "routes[0].policies.consumers: needs an auth that names consumers",
        "routes[0].policies.ip_allow[0]: `300.1.1.1` is not an address or CIDR range",
        "routes[0].policies.cors.origins[0]: `https://x.com/path` is not an origin",
        "routes[0].policies.cors.credentials: browsers refuse credentials with the origin `*`",
        "routes[0].policies.request_headers.set.host: `host` is a field podgate decides itself",
        "routes[0].policies.request_headers.set.content-length: `content-length` is a field podgate decides itself",
        "routes[0].policies.request_headers.remove[0]: `:path` is a pseudo-header",
        "routes[0].policies.response_headers.add.transfer-encoding: `transfer-encoding` is a field podgate decides itself",
        "routes[0].policies.rewrite.path.regex: does not compile: regex parse error",
        "routes[0].policies.redirect.path: `no-slash` must start with /",
        "routes[0].policies.max_body: `lots` is not a size",
        "routes[1].policies.auth.api_key: give header or query, not both",
        "routes[1].policies.rewrite.path.to: `/$2`: `$2` names no group of the regex",
        "routes[1].policies.redirect.status: 305 is not a redirect status",
        "routes[2].policies.auth.any_of[0]: give exactly one of api_key or jwt (found any_of)",
        "routes[2].policies.auth.any_of[1].forward: forward applies to the whole auth",
        "routes[2].policies.cors.origins: is required",
    ] {
        assert!(errors.contains(expected), "missing {expected:?} in:\n{errors}");
    }
    let rewrite_and_strip = config_errors(
        "routes:\n  - {name: r, upstream: u, strip_prefix: true, policies: {rewrite: {prefix: /v2}}}\n",
        &[],
    );
    assert!(
        rewrite_and_strip.contains("routes[0].policies.rewrite: rewrite decides the whole path"),
        "{rewrite_and_strip}"
    );
    assert!(
        !errors.contains("same"),
        "no message shows a key:\n{errors}"
    );
}
