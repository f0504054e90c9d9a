//! The config file: its public YAML format and the validated form the gateway runs on.
//!
//! The two are kept apart (as river does). [`load`] reads the file with serde-saphyr into the
//! derived types of `schema.rs`, whose wrappers (`yaml.rs`) keep every mistake in place of a value
//! instead of stopping at the first one; the validation pass (`validate.rs`, `upstreams.rs`) then
//! reports every mistake at once with field path and line, and only a fully valid file becomes a
//! [`Config`] (`model.rs`). Name rules are in `names.rs`, value formats in `units.rs`.
//!
//! Relative paths in the file (manifests folders, kubeconfigs, certificates) are relative to the
//! folder of the config file, so `podgate -c conf/quickstart.yaml` works from any directory.

mod identities;
mod limits;
mod model;
mod names;
mod policies;
pub mod policy_files;
mod rate_limit;
mod report;
mod request_rules;
mod schema;
mod units;
mod upstreams;
mod validate;
mod yaml;

pub use limits::{
    Mode as RateLimitMode, OnError, Rate, RateKey, RateLimitRule, RateLimitStoreConf, RedisTarget,
    RuleStore, Secret, MAX_RULES as MAX_RATE_LIMIT_RULES,
};
pub use model::*;
pub use names::{dns1035_label, dns1123_label, label_key, label_value};
pub use policies::{cidr, origin_pattern};
pub use report::{ConfigError, ConfigErrors};
pub use units::{parse_address, parse_duration, parse_size};

use std::path::Path;

/// Reads and validates the config file at `path`.
pub fn load(path: &Path) -> Result<Config, ConfigErrors> {
    let shown = path.display().to_string();
    let text = std::fs::read_to_string(path).map_err(|e| {
        ConfigErrors(vec![ConfigError {
            file: shown.clone(),
            line: None,
            path: String::new(),
            message: format!("cannot read the file: {e}"),
        }])
    })?;
    let base = path.parent().unwrap_or(Path::new("")).to_path_buf();
    parse(&shown, &text, &base).map(|mut c| {
        c.source = path.to_path_buf();
        c
    })
}

/// Validates config text; `base` is the folder relative paths are resolved against.
pub fn parse(file: &str, text: &str, base: &Path) -> Result<Config, ConfigErrors> {
    let mut r = report::Report::new(file);
    let root: yaml::Sect<schema::File> = match yaml::from_str(text) {
        Ok(root) => root,
        Err((line, message)) => {
            r.error(line, "", message);
            return Err(ConfigErrors(r.into_errors()));
        }
    };
    let blank = |l: &str| l.trim().is_empty() || l.trim_start().starts_with('#');
    let config = match &root.value {
        // No document at all: serde-saphyr reads an empty stream as null.
        Err("null") if text.lines().all(blank) => {
            r.error(None, "", "the file is empty");
            None
        }
        _ => r
            .sect(&root, "")
            .map(|f| validate::config(&mut r, f, root.line, base)),
    };
    match config {
        Some(c) if r.is_clean() => Ok(c),
        _ => Err(ConfigErrors(r.into_errors())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_empty_file_and_a_repeated_key_are_reported() {
        let dir = std::env::temp_dir();
        let errors = parse("t.yaml", "# nothing yet\n", &dir).unwrap_err();
        assert_eq!(errors.to_string(), "t.yaml: the file is empty");
        let text = "listeners: [{address: \"127.0.0.1:8080\"}]\nadmin:\n  open_metrics: true\n  open_metrics: false\n";
        let errors = parse("t.yaml", text, &dir).unwrap_err();
        assert_eq!(
            errors.to_string(),
            "t.yaml:4: admin.open_metrics: key given twice"
        );
    }

    #[test]
    fn label_subsets_are_read_and_two_subsets_of_one_service_are_not_duplicates() {
        let dir = std::env::temp_dir();
        let text = "listeners: [{address: \"127.0.0.1:8080\"}]\n\
                    clusters:\n  - {name: k, server: \"https://127.0.0.1:6443\"}\n\
                    upstreams:\n  - name: u\n    services:\n\
                    \x20     - {cluster: k, service: web, port: 80, weight: 9, labels: {version: v1}}\n\
                    \x20     - {cluster: k, service: web, port: 80, weight: 1, labels: {version: v2}}\n\
                    \x20     - {cluster: k, service: web, port: 80, labels: {version: v2}}\n";
        let errors = parse("t.yaml", text, &dir).expect_err("the third entry repeats the second");
        assert_eq!(errors.0.len(), 1, "{errors:?}");
        assert_eq!(errors.0[0].path, "upstreams[0].services[2]");
        assert!(errors.0[0].message.contains("listed twice"));
        let fine = text
            .rsplit_once("      - {cluster: k, service: web, port: 80, labels")
            .unwrap()
            .0;
        let config = parse("t.yaml", fine, &dir).unwrap();
        let services = &config.upstreams[0].services;
        assert_eq!(services[0].labels, [("version".into(), "v1".into())].into());
        assert_eq!(services[1].labels, [("version".into(), "v2".into())].into());
    }

    #[test]
    fn access_log_buffer_and_flush_have_defaults_bounds_and_lines() {
        let dir = std::env::temp_dir();
        let head = "listeners: [{address: \"127.0.0.1:8080\"}]\n";
        let config = parse("t.yaml", head, &dir).unwrap();
        assert_eq!(config.access_log, AccessLogSettings::default());
        assert_eq!(config.access_log.buffer, 64 << 10);
        assert_eq!(config.access_log.flush, std::time::Duration::from_secs(1));

        let set = format!("{head}access_log:\n  path: a.log\n  buffer: 256KiB\n  flush: 250ms\n");
        let config = parse("t.yaml", &set, &dir).unwrap();
        assert_eq!(
            config.access_log.sink,
            AccessLogSink::File(dir.join("a.log"))
        );
        assert_eq!(config.access_log.buffer, 256 << 10);
        assert_eq!(
            config.access_log.flush,
            std::time::Duration::from_millis(250)
        );

        // Every mistake at once, each with its line; checked even with the log off.
        let bad = format!("{head}access_log:\n  enabled: false\n  buffer: 1KiB\n  flush: 5m\n");
        let errors = parse("t.yaml", &bad, &dir).unwrap_err().to_string();
        assert!(
            errors.contains(
                "t.yaml:4: access_log.buffer: 1024 bytes is outside the allowed 4KiB..16MiB"
            ),
            "{errors}"
        );
        assert!(
            errors.contains("t.yaml:5: access_log.flush: 300s is outside the allowed 10ms..60s"),
            "{errors}"
        );
        let words = format!("{head}access_log:\n  buffer: lots\n  flush: 1\n");
        let errors = parse("t.yaml", &words, &dir).unwrap_err().to_string();
        assert!(errors.contains("t.yaml:3: access_log.buffer: "), "{errors}");
        assert!(
            errors.contains("t.yaml:4: access_log.flush: `1` is not a duration"),
            "{errors}"
        );
    }
}
