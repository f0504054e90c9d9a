use super::*;

const HEAD: &str = "listeners: [{address: \"127.0.0.1:8080\"}]\n\
                        upstreams: [{name: u, nodes: [{address: \"127.0.0.1:9\"}]}]\n";

fn parse(text: &str) -> Result<crate::config::Config, crate::config::ConfigErrors> {
    let dir = tempfile_dir();
    crate::config::parse("t.yaml", &format!("{HEAD}{text}"), &dir)
}

fn tempfile_dir() -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("podgate-rl-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("not-pem.txt"), "hello\n").unwrap();
    dir
}

#[test]
fn a_valid_file_gives_stores_and_rules_with_defaults() {
    let text = "rate_limit_stores:\n\
                    \x20 - name: shared\n\
                    \x20   redis: redis://127.0.0.1:6379/0\n\
                    \x20 - name: cluster\n\
                    \x20   redis: [redis://127.0.0.1:7000, redis://127.0.0.1:7001]\n\
                    \x20   mode: batched\n\
                    \x20   on_error: deny\n\
                    \x20   timeout: 5ms\n\
                    routes:\n\
                    \x20 - name: orders\n\
                    \x20   upstream: u\n\
                    \x20   policies:\n\
                    \x20     rate_limit:\n\
                    \x20       - {key: consumer, rate: 100/s, burst: 20, store: shared}\n\
                    \x20       - {key: client_ip, rate: 6000/min}\n\
                    \x20       - {key: \"header X-Tenant\", rate: 50/s, store: cluster}\n";
    let config = parse(text).unwrap();
    let [shared, cluster] = &config.rate_limit_stores[..] else {
        panic!("two stores")
    };
    assert_eq!(
        (shared.timeout, shared.on_error, shared.mode),
        (DEFAULT_TIMEOUT, OnError::Allow, Mode::Exact)
    );
    assert!(matches!(&cluster.target, RedisTarget::Cluster(n) if n.len() == 2));
    assert_eq!(
        (cluster.on_error, cluster.lease),
        (OnError::Deny, DEFAULT_LEASE)
    );
    let rules = &config.routes[0].policies.rate_limit;
    assert_eq!(rules.len(), 3);
    assert_eq!(
        (rules[0].burst, rules[0].name()),
        (20, "consumer 100/s".into())
    );
    assert_eq!((rules[1].burst, &rules[1].store), (6000, &RuleStore::Local));
    assert_eq!(rules[2].key, RateKey::Header("x-tenant".into()));
    assert_eq!(rules[2].lease(), 5, "a tenth of the burst of 50");
    assert_eq!(rules[0].lease(), 1, "exact mode");
}

#[test]
fn every_mistake_is_named_with_its_line_and_path() {
    let text = "rate_limit_stores:\n\
                    \x20 - name: local\n\
                    \x20   redis: http://x\n\
                    \x20 - name: s\n\
                    \x20   redis: [redis://127.0.0.1:7000, 7]\n\
                    \x20   timeout: 2s\n\
                    \x20   ca_file: missing-ca.pem\n\
                    \x20   on_error: maybe\n\
                    \x20   lease: 5\n\
                    \x20 - name: z\n\
                    \x20   redis: rediss://127.0.0.1:6380\n\
                    \x20   timeout: 0s\n\
                    \x20 - {name: y, redis: 'redis://127.0.0.1:1', ca_file: not-pem.txt}\n\
                    routes:\n\
                    \x20 - name: orders\n\
                    \x20   upstream: u\n\
                    \x20   policies:\n\
                    \x20     rate_limit:\n\
                    \x20       - {key: consumer, rate: 100/sec}\n\
                    \x20       - {key: ip, rate: 0/s, store: nowhere}\n\
                    \x20       - {key: client_ip, rate: 1/h, burst: 10000}\n\
                    \x20       - {key: client_ip, rate: 5/s}\n\
                    \x20       - {key: client_ip, rate: 5/s, colour: red}\n";
    let errors = parse(text).unwrap_err();
    let got: Vec<String> = errors.0.iter().map(|e| e.to_string()).collect();
    let want = [
            "t.yaml:4: rate_limit_stores[0].name: `local` is the per-process store",
            "t.yaml:5: rate_limit_stores[0].redis: not a Redis URL",
            "t.yaml:7: rate_limit_stores[1].redis[1]: expected a string, found a number",
            "t.yaml:8: rate_limit_stores[1].timeout: 2s is outside 1ms..1s",
            "t.yaml:9: rate_limit_stores[1].ca_file: cannot read",
            "t.yaml:10: rate_limit_stores[1].on_error: `maybe` is not an on_error choice",
            "t.yaml:11: rate_limit_stores[1].lease: lease only applies to mode: batched",
            "t.yaml:14: rate_limit_stores[2].timeout: 0s is outside 1ms..1s",
            "t.yaml:21: routes[0].policies.rate_limit[0].rate: `100/sec` is not a rate",
            "t.yaml:22: routes[0].policies.rate_limit[1].key: `ip` is not a rate-limit key",
            "t.yaml:22: routes[0].policies.rate_limit[1].rate: `0/s`: the count must be at least 1",
            "t.yaml:22: routes[0].policies.rate_limit[1].store: unknown store `nowhere` (stores: local, z, y;",
            "t.yaml:23: routes[0].policies.rate_limit[2].burst: burst 10000 at 1/h is more than a year",
            "t.yaml:25: routes[0].policies.rate_limit[4]: has the same key and rate as routes[0].policies.rate_limit[3]",
            "t.yaml:15: rate_limit_stores[3].ca_file: ca_file only applies to rediss://",
            "t.yaml:15: rate_limit_stores[3].ca_file: /tmp/",
            "t.yaml:25: routes[0].policies.rate_limit[4].colour: unknown key",
        ];
    for w in want {
        assert!(
            got.iter().any(|g| g.starts_with(w)),
            "missing {w:?} in\n{}",
            got.join("\n")
        );
    }
    assert_eq!(got.len(), want.len(), "{}", got.join("\n"));
}
