//! The Dockerfile's dependency layer against the manifests it builds (issue 14: `docker build`
//! broke silently when benches were added to Cargo.toml and the stub list was kept by hand).
//!
//! The layer copies only the manifests and lets `scripts/stub-targets.sh` write a stub for every
//! target they name. These tests replay that on a temp dir and ask cargo itself whether it accepts
//! the result (`cargo metadata` parses every manifest and fails on a target whose file is
//! missing). The whole build stage, cargo commands included, is replayed by
//! `scripts/docker-replay.sh` in `.ci/run`.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn cargo() -> Command {
    Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()))
}

/// The Dockerfile's instructions up to its first `cargo build`: comments dropped, `\`
/// continuations joined.
fn dependency_layer() -> Vec<String> {
    let text = std::fs::read_to_string(root().join("Dockerfile")).expect("read Dockerfile");
    let mut out = Vec::new();
    let mut cur = String::new();
    for line in text.lines() {
        if line.trim_start().starts_with('#') {
            continue;
        }
        match line.strip_suffix('\\') {
            Some(part) => cur.push_str(part),
            None => {
                cur.push_str(line);
                if !cur.trim().is_empty() {
                    out.push(cur.trim().to_string());
                }
                cur.clear();
            }
        }
    }
    let end = out
        .iter()
        .position(|i| i.starts_with("RUN ") && i.contains("cargo build"))
        .expect("the Dockerfile runs no `cargo build`");
    out.truncate(end + 1);
    out
}

/// The context files the dependency layer COPYs, relative to the repository, with their
/// destinations relative to the WORKDIR.
fn copied() -> Vec<(String, String)> {
    let mut out = Vec::new();
    for ins in dependency_layer() {
        let Some(rest) = ins.strip_prefix("COPY ") else {
            continue;
        };
        let parts: Vec<&str> = rest.split_whitespace().collect();
        let (dest, srcs) = parts.split_last().expect("COPY names a destination");
        for src in srcs {
            let to = if dest.ends_with('/') || srcs.len() > 1 {
                format!(
                    "{dest}{}",
                    Path::new(src).file_name().unwrap().to_str().unwrap()
                )
            } else if *dest == "." || *dest == "./" {
                src.to_string()
            } else {
                dest.to_string()
            };
            let to = to.trim_start_matches("./").to_string();
            out.push((src.to_string(), to));
        }
    }
    out
}

/// (package, kind, path relative to `dir`) of every target `cargo metadata` finds under `dir`;
/// Err with cargo's message when it refuses the manifests.
fn targets(dir: &Path) -> Result<BTreeSet<(String, String, PathBuf)>, String> {
    let out = cargo()
        .args([
            "metadata",
            "--no-deps",
            "--format-version",
            "1",
            "--offline",
            "--locked",
        ])
        .current_dir(dir)
        .output()
        .expect("run cargo metadata");
    if !out.status.success() {
        return Err(String::from_utf8_lossy(&out.stderr).into_owned());
    }
    let meta: serde_json::Value = serde_json::from_slice(&out.stdout).expect("metadata JSON");
    let base = std::fs::canonicalize(dir).unwrap();
    let mut set = BTreeSet::new();
    for p in meta["packages"].as_array().unwrap() {
        for t in p["targets"].as_array().unwrap() {
            let src = PathBuf::from(t["src_path"].as_str().unwrap());
            let rel = src.strip_prefix(&base).unwrap_or(&src).to_path_buf();
            for kind in t["kind"].as_array().unwrap() {
                set.insert((
                    p["name"].as_str().unwrap().to_string(),
                    kind.as_str().unwrap().to_string(),
                    rel.clone(),
                ));
            }
        }
    }
    Ok(set)
}

fn stub(dir: &Path) {
    let out = Command::new("sh")
        .arg(root().join("scripts/stub-targets.sh"))
        .arg(dir)
        .output()
        .expect("run scripts/stub-targets.sh");
    assert!(
        out.status.success(),
        "stub-targets.sh: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn the_dependency_layer_stubs_every_target_the_manifests_name() {
    // The layer copies every workspace manifest, the lock file and the toolchain pin.
    let copies = copied();
    let sources: BTreeSet<&str> = copies.iter().map(|(s, _)| s.as_str()).collect();
    let real = targets(root()).expect("cargo accepts the repository");
    let mut wanted: BTreeSet<String> = ["Cargo.lock", "rust-toolchain.toml"]
        .map(String::from)
        .into();
    let out = cargo()
        .args([
            "metadata",
            "--no-deps",
            "--format-version",
            "1",
            "--offline",
        ])
        .current_dir(root())
        .output()
        .unwrap();
    let meta: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let base = std::fs::canonicalize(root()).unwrap();
    for p in meta["packages"].as_array().unwrap() {
        let m = PathBuf::from(p["manifest_path"].as_str().unwrap());
        wanted.insert(m.strip_prefix(&base).unwrap().display().to_string());
    }
    for w in &wanted {
        assert!(
            sources.contains(w.as_str()),
            "the Dockerfile's dependency layer does not COPY {w}"
        );
    }
    let layer = dependency_layer();
    assert!(
        layer
            .iter()
            .any(|i| i.starts_with("RUN ") && i.contains("scripts/stub-targets.sh")),
        "the dependency layer does not run scripts/stub-targets.sh: {layer:#?}"
    );

    // Replay the COPYs and the stub script; cargo must accept the tree.
    let tmp = tempfile::tempdir().unwrap();
    for (src, to) in &copies {
        let dest = tmp.path().join(to);
        std::fs::create_dir_all(dest.parent().unwrap()).unwrap();
        std::fs::copy(root().join(src), &dest).unwrap_or_else(|e| panic!("COPY {src}: {e}"));
    }
    stub(tmp.path());
    let stubbed = targets(tmp.path()).unwrap_or_else(|e| {
        panic!("cargo refuses the stubbed manifests, `docker build` would fail:\n{e}")
    });

    // Same libraries, binaries and build scripts as the real tree (the dependency layer builds
    // what the real build builds); tests are auto-discovered from tests/ and need no stub.
    let main_kinds = |s: &BTreeSet<(String, String, PathBuf)>| -> BTreeSet<_> {
        s.iter()
            .filter(|(_, k, _)| matches!(k.as_str(), "lib" | "bin" | "custom-build"))
            .cloned()
            .collect()
    };
    assert_eq!(main_kinds(&stubbed), main_kinds(&real));
    // Every declared bench and example exists in the stubbed tree.
    for (pkg, kind, path) in &real {
        if matches!(kind.as_str(), "bench" | "example") {
            assert!(
                stubbed.contains(&(pkg.clone(), kind.clone(), path.clone())),
                "{pkg} {kind} {} has no stub",
                path.display()
            );
        }
    }
}

#[test]
fn the_stub_script_follows_cargo_defaults() {
    // A workspace naming every kind of target, with and without `path`, the package's own bin
    // declared before [package]; and a member that declares no target at all.
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    std::fs::write(
        dir.join("Cargo.toml"),
        r#"[workspace]
members = [".", "member"]

[[bin]]
name = "app"

[package]
name = "app"
version = "0.1.0"
edition = "2021"
autobenches = false

[lib]
path = "lib/top.rs"

[[bin]]
name = "tool"

[[bin]]
name = "other"
path = "tools/other.rs"

[[bench]]
name = "fast"
harness = false

[[bench]]
name = "slow"
path = "benches/slow/main.rs"
harness = false

[[example]]
name = "demo"

[[test]]
name = "it"
"#,
    )
    .unwrap();
    std::fs::create_dir(dir.join("member")).unwrap();
    std::fs::write(
        dir.join("member/Cargo.toml"),
        "[package]\nname = \"member\"\nversion = \"0.1.0\"\nedition = \"2021\"\n",
    )
    .unwrap();
    // Without stubs cargo refuses the manifest: the check below has something to prove.
    let refused = targets(dir).expect_err("cargo accepts missing target files");
    assert!(refused.contains("can't find"), "{refused}");
    stub(dir);
    let found = targets(dir).unwrap_or_else(|e| panic!("cargo refuses the stubbed tree: {e}"));
    let expected: BTreeSet<(String, String, PathBuf)> = [
        ("app", "lib", "lib/top.rs"),
        ("app", "bin", "src/main.rs"),
        ("app", "bin", "src/bin/tool.rs"),
        ("app", "bin", "tools/other.rs"),
        ("app", "bench", "benches/fast.rs"),
        ("app", "bench", "benches/slow/main.rs"),
        ("app", "example", "examples/demo.rs"),
        ("app", "test", "tests/it.rs"),
        ("member", "lib", "member/src/lib.rs"),
    ]
    .into_iter()
    .map(|(p, k, f)| (p.to_string(), k.to_string(), PathBuf::from(f)))
    .collect();
    assert_eq!(found, expected);
}
