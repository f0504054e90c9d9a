//! The gateway crate's layers, checked from its own source: every module reference (`crate::…`,
//! `super::…`, `self::…`, or a child module's name) points to the same or a lower layer, and the
//! modules form no import cycle. The order is the one `gateway/src/lib.rs` documents:
//! config → telemetry → upstream → policies → proxy → live → admin → server.
//!
//! A file that refers to its own parent (`super::Engine` in `proxy/h1/sniff.rs`) extends the
//! parent's type across files; that edge is not counted as a cycle, every other one is. A name
//! the parent only re-exports (`pub use model::*;` in `config/mod.rs`, then
//! `super::RateLimitRule` in `config/model.rs`) is an edge to the module that defines it: a
//! re-export must not hide a cycle between siblings.
//!
//! Inside the proxy layer, the protocol code (`proxy/h1`, `proxy/h2`: the codecs) leaves the
//! gateway's decisions to the request pipeline (`proxy/pipeline`): it picks no Pod
//! (`Upstream::pick`) and writes no access-log line. A codec that did would be a second
//! pipeline, where a future policy could be forgotten.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

const LAYERS: &[&str] = &[
    "config",
    "telemetry",
    "upstream",
    "policies",
    "proxy",
    "live",
    "admin",
    "server",
];

type Module = Vec<String>;

/// Every `.rs` file under `dir` as its module path (`upstream/pool.rs` → `upstream::pool`).
fn modules(root: &Path, dir: &Path, out: &mut BTreeMap<Module, String>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            modules(root, &path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            let rel = path.strip_prefix(root).unwrap().with_extension("");
            let mut parts: Module = rel.iter().map(|p| p.to_string_lossy().into()).collect();
            if matches!(parts.last().map(String::as_str), Some("mod" | "lib")) {
                parts.pop();
            }
            out.insert(parts, std::fs::read_to_string(&path).unwrap());
        }
    }
}

/// The source without comments and without its trailing `#[cfg(test)] mod tests`.
fn code(text: &str) -> String {
    let text = text
        .find("#[cfg(test)]\nmod tests")
        .map_or(text, |i| &text[..i]);
    text.lines()
        .map(|l| l.split("//").next().unwrap_or(""))
        .collect::<Vec<_>>()
        .join("\n")
}

fn ident(c: char) -> bool {
    c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_'
}

/// The names module `m` re-exports from its children (`pub use child::{A, B as C};`,
/// `pub use child::A;`, and for `pub use child::*;` every `pub` item of the child), each with
/// the child that defines it.
fn reexports(m: &Module, all: &BTreeMap<Module, String>) -> BTreeMap<String, Module> {
    let mut out = BTreeMap::new();
    let Some(text) = all.get(m) else {
        return out;
    };
    let code = code(text);
    let mut rest = code.as_str();
    while let Some(at) = rest.find("pub use ") {
        rest = &rest[at + "pub use ".len()..];
        let stmt = &rest[..rest.find(';').unwrap_or(rest.len())];
        let Some((child, names)) = stmt.split_once("::") else {
            continue;
        };
        let mut module = m.clone();
        module.push(child.trim().to_string());
        if !all.contains_key(&module) {
            continue;
        }
        let names = names.trim().trim_start_matches('{').trim_end_matches('}');
        if names.trim() == "*" {
            let child_code = code_of(&module, all);
            for line in child_code.lines() {
                let line = line.trim_start();
                let Some(item) = line.strip_prefix("pub ") else {
                    continue;
                };
                for kind in [
                    "struct ", "enum ", "const ", "fn ", "type ", "static ", "trait ",
                ] {
                    if let Some(name) = item.strip_prefix(kind) {
                        let name: String = name
                            .chars()
                            .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                            .collect();
                        out.insert(name, module.clone());
                    }
                }
            }
            continue;
        }
        for name in names.split(',') {
            // `A as B`: the parent's name is B.
            let name = name.split(" as ").last().unwrap_or("").trim();
            if !name.is_empty() {
                out.insert(name.to_string(), module.clone());
            }
        }
    }
    out
}

fn code_of(m: &Module, all: &BTreeMap<Module, String>) -> String {
    all.get(m).map(|t| code(t)).unwrap_or_default()
}

/// The modules `text` (the file of module `me`) refers to.
fn references(me: &Module, text: &str, all: &BTreeMap<Module, String>) -> BTreeSet<Module> {
    let code = code(text);
    let children: BTreeSet<String> = code
        .lines()
        .filter_map(|l| {
            let l = l
                .trim()
                .trim_start_matches("pub(crate) ")
                .trim_start_matches("pub ");
            let name = l.strip_prefix("mod ")?.strip_suffix(';')?;
            Some(name.to_string())
        })
        .collect();
    let mut out = BTreeSet::new();
    let bytes: Vec<char> = code.chars().collect();
    let mut i = 0;
    while i < bytes.len() {
        // A path starts at an identifier not preceded by an identifier char or `::`.
        let starts = ident(bytes[i])
            && (i == 0 || (!ident(bytes[i - 1]) && bytes[i - 1] != ':'))
            && !bytes[i].is_ascii_digit();
        if !starts {
            i += 1;
            continue;
        }
        let mut segs: Vec<String> = Vec::new();
        let mut j = i;
        loop {
            let s = j;
            while j < bytes.len() && ident(bytes[j]) {
                j += 1;
            }
            segs.push(bytes[s..j].iter().collect());
            if j + 2 < bytes.len() && bytes[j] == ':' && bytes[j + 1] == ':' && ident(bytes[j + 2])
            {
                j += 2;
            } else {
                break;
            }
        }
        let followed_by_path = j + 1 < bytes.len() && bytes[j] == ':' && bytes[j + 1] == ':';
        // The item the path names (`Rule` in `super::Rule`), whatever its case.
        let item: String = if followed_by_path {
            bytes[j + 2..]
                .iter()
                .take_while(|c| c.is_ascii_alphanumeric() || **c == '_')
                .collect()
        } else {
            String::new()
        };
        i = j.max(i + 1);
        if segs.len() < 2 && !followed_by_path {
            continue;
        }
        let (base, rest): (Module, &[String]) = match segs[0].as_str() {
            "crate" => (Vec::new(), &segs[1..]),
            "super" => (me[..me.len().saturating_sub(1)].to_vec(), &segs[1..]),
            "self" => (me.clone(), &segs[1..]),
            name if children.contains(name) => {
                let mut m = me.clone();
                m.push(name.to_string());
                (m, &segs[1..])
            }
            _ => continue,
        };
        let full: Module = base.into_iter().chain(rest.iter().cloned()).collect();
        let mut path = full.clone();
        while !path.is_empty() && !all.contains_key(&path) {
            path.pop();
        }
        // `parent::Name` where the parent only re-exports Name: the module that defines it.
        if let Some(item) = full.get(path.len()).or(Some(&item)) {
            if let Some(defining) = reexports(&path, all).get(item) {
                path = defining.clone();
            }
        }
        if !path.is_empty() && &path != me {
            out.insert(path);
        }
    }
    out
}

fn layer(m: &Module) -> usize {
    LAYERS
        .iter()
        .position(|l| m.first().map(String::as_str) == Some(l))
        .unwrap_or_else(|| panic!("module {} is in no layer of LAYERS", m.join("::")))
}

fn graph() -> BTreeMap<Module, BTreeSet<Module>> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("gateway/src");
    let mut all = BTreeMap::new();
    modules(&root, &root, &mut all);
    all.iter()
        .filter(|(m, _)| !m.is_empty())
        .map(|(m, text)| (m.clone(), references(m, text, &all)))
        .collect()
}

#[test]
fn no_module_imports_from_a_layer_above() {
    let graph = graph();
    assert!(graph.len() > 20, "walked the gateway's sources");
    let mut wrong = Vec::new();
    for (from, tos) in &graph {
        for to in tos {
            if layer(to) > layer(from) {
                wrong.push(format!("{} -> {}", from.join("::"), to.join("::")));
            }
        }
    }
    assert!(wrong.is_empty(), "imports pointing up a layer: {wrong:#?}");
}

#[test]
fn modules_form_no_cycle() {
    let graph = graph();
    // Drop each child's edge to its own parent: the child extends the parent's type.
    let edges: BTreeMap<&Module, Vec<&Module>> = graph
        .iter()
        .map(|(from, tos)| {
            let parent = &from[..from.len() - 1];
            (
                from,
                tos.iter().filter(|t| t.as_slice() != parent).collect(),
            )
        })
        .collect();
    // Depth-first search for a back edge; report the cycle it closes.
    fn visit<'a>(
        m: &'a Module,
        edges: &BTreeMap<&'a Module, Vec<&'a Module>>,
        state: &mut BTreeMap<&'a Module, u8>,
        stack: &mut Vec<&'a Module>,
    ) -> Option<Vec<String>> {
        state.insert(m, 1);
        stack.push(m);
        for &n in edges.get(m).into_iter().flatten() {
            match state.get(n) {
                Some(1) => {
                    let at = stack.iter().position(|s| *s == n).unwrap();
                    let mut cycle: Vec<String> = stack[at..].iter().map(|s| s.join("::")).collect();
                    cycle.push(n.join("::"));
                    return Some(cycle);
                }
                Some(_) => {}
                None => {
                    if let Some(c) = visit(n, edges, state, stack) {
                        return Some(c);
                    }
                }
            }
        }
        stack.pop();
        state.insert(m, 2);
        None
    }
    let mut state = BTreeMap::new();
    for m in edges.keys() {
        if !state.contains_key(m) {
            if let Some(cycle) = visit(m, &edges, &mut state, &mut Vec::new()) {
                panic!("import cycle: {}", cycle.join(" -> "));
            }
        }
    }
}

/// What only the pipeline may do, as it shows in code: the words, and what they would mean in
/// a codec. Words are matched whole (an identifier character on neither side).
const PIPELINE_ONLY: &[(&str, &str)] = &[
    ("pick", "picks a Pod (`Upstream::pick`, or a balancer's)"),
    ("access_log", "reaches the access log"),
    ("RequestLog", "holds the access log"),
    ("LogFields", "writes an access-log line"),
    ("log_line", "writes an access-log line"),
    ("write_line", "writes an access-log line"),
    ("finish", "records a request (`pipeline::record::finish`)"),
];

/// The uses in `text` (a file's source) of what only the pipeline may do, as
/// `(line, word, meaning)`. A word counts wherever it is named (`.access_log`,
/// `LogFields {`, `log_line::write_line`); comments and the file's
/// tests are not code. (`pick` counts only where it is called, `finish` only as
/// `record::finish`: every codec has `finish` methods of its own.)
fn pipeline_only_uses(text: &str) -> Vec<(usize, &'static str, &'static str)> {
    let code = code(text);
    let mut out = Vec::new();
    for (n, line) in code.lines().enumerate() {
        let chars: Vec<char> = line.chars().collect();
        for &(word, meaning) in PIPELINE_ONLY {
            let w: Vec<char> = word.chars().collect();
            let mut i = 0;
            while i + w.len() <= chars.len() {
                let whole = chars[i..i + w.len()] == w[..]
                    && (i == 0 || !ident_any(chars[i - 1]))
                    && chars.get(i + w.len()).is_none_or(|c| !ident_any(*c));
                let used = whole
                    && match word {
                        "finish" => line[..char_offset(line, i)].ends_with("record::"),
                        // Called: a variable of that name is not a pick.
                        "pick" => {
                            chars[i + w.len()..].iter().find(|c| !c.is_whitespace()) == Some(&'(')
                        }
                        _ => true,
                    };
                if used {
                    out.push((n + 1, word, meaning));
                }
                i += 1;
            }
        }
    }
    out
}

fn ident_any(c: char) -> bool {
    c.is_ascii_alphanumeric() || c == '_'
}

fn char_offset(s: &str, chars: usize) -> usize {
    s.char_indices().nth(chars).map_or(s.len(), |(i, _)| i)
}

#[test]
fn protocol_code_neither_picks_pods_nor_writes_log_lines() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("gateway/src");
    let mut all = BTreeMap::new();
    modules(&root, &root, &mut all);
    let codecs: Vec<_> = all
        .iter()
        .filter(|(m, _)| m.len() >= 2 && m[0] == "proxy" && (m[1] == "h1" || m[1] == "h2"))
        .collect();
    assert!(codecs.len() >= 10, "walked the codecs: {}", codecs.len());
    // The pipeline is where these are done: the check would see them there.
    let pipeline_does: usize = all
        .iter()
        .filter(|(m, _)| m.len() >= 2 && m[0] == "proxy" && m[1] == "pipeline")
        .map(|(_, text)| pipeline_only_uses(text).len())
        .sum();
    assert!(pipeline_does >= 3, "the pipeline picks, logs and records");
    let mut wrong = Vec::new();
    for (m, text) in codecs {
        for (line, word, meaning) in pipeline_only_uses(text) {
            wrong.push(format!("{} line {line}: `{word}` {meaning}", m.join("::")));
        }
    }
    assert!(
        wrong.is_empty(),
        "protocol code doing the pipeline's work: {wrong:#?}"
    );
}

/// The codec check sees a pick, a log line and a record, and not their look-alikes.
#[test]
fn the_codec_check_sees_picks_and_log_lines() {
    let sample = "fn f() {\n\
                  let b = upstream.pick(&tried, key);\n\
                  gw.access_log.log(&LogFields { status });\n\
                  pipeline::record::finish(gw, None, &seen, &rec);\n\
                  answer.finish(true); let pick = 1; let picked = pick; // upstream.pick(\n\
                  }";
    let found: Vec<(usize, &str)> = pipeline_only_uses(sample)
        .into_iter()
        .map(|(line, word, _)| (line, word))
        .collect();
    assert_eq!(
        found,
        [
            (2, "pick"),
            (3, "access_log"),
            (3, "LogFields"),
            (4, "finish")
        ]
    );
}

/// The checker itself sees references: a known upward import in a sample is reported.
#[test]
fn the_checker_sees_crate_super_and_child_paths() {
    let mut all = BTreeMap::new();
    for m in ["config", "upstream", "upstream::pool", "proxy", "proxy::h1"] {
        all.insert(m.split("::").map(String::from).collect(), String::new());
    }
    let me: Module = vec!["upstream".into()];
    let refs = references(
        &me,
        "mod pool;\nuse crate::proxy::h1::Engine;\nuse pool::Conn;\nfn f() { crate::config::X; }",
        &all,
    );
    let names: Vec<String> = refs.iter().map(|m| m.join("::")).collect();
    assert_eq!(names, ["config", "proxy::h1", "upstream::pool"]);
    let mut all2 = all.clone();
    all2.insert(
        vec!["config".into()],
        "mod model;\npub use model::*;\npub use units::{Int, Size as Bytes};\n".into(),
    );
    all2.insert(
        vec!["config".into(), "model".into()],
        "pub struct Rule;\n".into(),
    );
    all2.insert(vec!["config".into(), "units".into()], String::new());
    all2.insert(vec!["config".into(), "names".into()], String::new());
    let me: Module = vec!["config".into(), "names".into()];
    let refs = references(
        &me,
        "fn f(_: super::Rule, _: crate::config::Bytes) {}",
        &all2,
    );
    let names: Vec<String> = refs.iter().map(|m| m.join("::")).collect();
    assert_eq!(
        names,
        ["config::model", "config::units"],
        "a re-export is the module behind it"
    );
    let me: Module = vec!["proxy".into(), "h1".into()];
    let refs = references(&me, "use super::{Gateway, error_json};", &all);
    assert_eq!(refs.len(), 1);
    assert!(refs.contains(&vec!["proxy".to_string()]));
}
