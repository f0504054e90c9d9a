use super::*;

#[test]
fn a_config_with_route_policies_starts_and_its_routes_enforce_them() {
    let dir = std::env::temp_dir();
    let text = "listeners: [{address: \"127.0.0.1:18080\"}]\n\
                    upstreams: [{name: u, nodes: [{address: \"127.0.0.1:9\"}]}]\n\
                    routes:\n  - {name: r, upstream: u, policies: {ip_allow: [192.0.2.0/24]}}\n";
    let config = config::parse("t.yaml", text, &dir).unwrap();
    let live = Live::start(config).expect("policies are enforced, so they start");
    let router = live.router.load();
    let crate::proxy::routing::Match::Found(r) = router.find("h", "/", &http::Method::GET) else {
        panic!("route r matches")
    };
    assert!(!r.upstream.policies.is_empty());
}

#[test]
fn a_reload_keeps_the_identities_while_consumers_and_providers_stay() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("shop.keys"), "k1\n").unwrap();
    let path = dir.path().join("podgate.yaml");
    let text = |route: &str, consumers: &str| {
        format!(
                "listeners: [{{address: \"127.0.0.1:18080\"}}]\n\
                 upstreams: [{{name: u, nodes: [{{address: \"127.0.0.1:9\"}}]}}]\n\
                 consumers: [{consumers}]\n\
                 routes:\n  - {{name: {route}, upstream: u, policies: {{auth: {{api_key: {{}}}}}}}}\n"
            )
    };
    std::fs::write(&path, text("r", "{name: shop, api_keys_file: shop.keys}")).unwrap();
    let live = Live::start(config::load(&path).unwrap()).unwrap();
    let current = |live: &Live| live.identities.lock().unwrap().identities.clone();
    let first = current(&live);
    // Routes change, consumers stay: the same identities (and file watch) go on.
    std::fs::write(&path, text("r2", "{name: shop, api_keys_file: shop.keys}")).unwrap();
    live.reload().unwrap();
    assert!(Arc::ptr_eq(&first, &current(&live)));
    // A new consumer: read anew.
    std::fs::write(
        &path,
        text("r2", "{name: shop, api_keys_file: shop.keys}, {name: b}"),
    )
    .unwrap();
    live.reload().unwrap();
    assert!(!Arc::ptr_eq(&first, &current(&live)));
    assert_eq!(current(&live).consumers().len(), 2);
}
