//! A reader over a YAML tree that keeps going after a mistake.
//!
//! serde stops at the first error; operators want every mistake of a file in one go, each with the
//! field path (`upstreams[0].services[3].port`) and the line. So the public config format is read
//! by walking saphyr's marked tree by hand, and every check records an error and returns `None`
//! instead of bailing out.

use saphyr::{LoadableYamlNode, MarkedYamlOwned, ScalarOwned, YamlDataOwned};
use std::fmt;
use std::net::SocketAddr;
use std::time::Duration;

pub type Node = MarkedYamlOwned;

/// One mistake in a config file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConfigError {
    /// The file as the user named it.
    pub file: String,
    /// 1-based line, when the mistake sits at a place in the file.
    pub line: Option<usize>,
    /// Field path such as `upstreams[0].services[3].port`; empty for the whole file.
    pub path: String,
    pub message: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.file)?;
        if let Some(line) = self.line {
            write!(f, ":{line}")?;
        }
        if self.path.is_empty() {
            write!(f, ": {}", self.message)
        } else {
            write!(f, ": {}: {}", self.path, self.message)
        }
    }
}

/// Every mistake found in a config file, in file order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConfigErrors(pub Vec<ConfigError>);

impl fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, e) in self.0.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "{e}")?;
        }
        Ok(())
    }
}

impl std::error::Error for ConfigErrors {}

/// Parses `text` into a single YAML document, or the syntax error with its line.
pub fn parse_document(file: &str, text: &str) -> Result<Node, ConfigError> {
    let mut docs = Node::load_from_str(text).map_err(|e| ConfigError {
        file: file.to_string(),
        line: Some(e.marker().line()),
        path: String::new(),
        message: format!("YAML syntax error: {}", e.info()),
    })?;
    match docs.len() {
        0 => Err(ConfigError {
            file: file.to_string(),
            line: None,
            path: String::new(),
            message: "the file is empty".into(),
        }),
        1 => Ok(docs.remove(0)),
        _ => Err(ConfigError {
            file: file.to_string(),
            line: Some(line(&docs[1])),
            path: String::new(),
            message: "expected one YAML document, found several".into(),
        }),
    }
}

/// Collects errors while typed values are read out of the tree.
pub struct Reader {
    file: String,
    pub errors: Vec<ConfigError>,
}

impl Reader {
    /// The config file's name as given (what errors are reported against).
    pub fn file(&self) -> &str {
        &self.file
    }
}

/// The fields of one mapping, after unknown keys were reported.
pub struct Fields<'n> {
    pub path: String,
    pub node: &'n Node,
    entries: Vec<(&'n str, &'n Node)>,
}

impl<'n> Fields<'n> {
    pub fn get(&self, key: &str) -> Option<&'n Node> {
        self.entries
            .iter()
            .find(|(k, v)| *k == key && !is_null(v))
            .map(|(_, v)| *v)
    }

    pub fn child(&self, key: &str) -> String {
        if self.path.is_empty() {
            key.to_string()
        } else {
            format!("{}.{key}", self.path)
        }
    }
}

/// 1-based line of `node`. saphyr leaves collections without a span (line 0), so a mapping or
/// list takes the line of its first entry.
pub fn line(node: &Node) -> usize {
    let own = node.span.start.line();
    if own > 0 {
        return own;
    }
    let first = match &node.data {
        YamlDataOwned::Mapping(map) => map.keys().next(),
        YamlDataOwned::Sequence(items) => items.first(),
        _ => None,
    };
    first.map_or(own, line)
}

fn is_null(node: &Node) -> bool {
    matches!(node.data, YamlDataOwned::Value(ScalarOwned::Null))
}

fn kind(node: &Node) -> &'static str {
    match &node.data {
        YamlDataOwned::Value(ScalarOwned::Null) => "null",
        YamlDataOwned::Value(ScalarOwned::Boolean(_)) => "a boolean",
        YamlDataOwned::Value(ScalarOwned::Integer(_)) => "a number",
        YamlDataOwned::Value(ScalarOwned::FloatingPoint(_)) => "a number",
        YamlDataOwned::Value(ScalarOwned::String(_)) | YamlDataOwned::Representation(..) => {
            "a string"
        }
        YamlDataOwned::Sequence(_) => "a list",
        YamlDataOwned::Mapping(_) => "a mapping",
        YamlDataOwned::Tagged(..) => "a tagged value",
        YamlDataOwned::Alias(_) => "an alias",
        YamlDataOwned::BadValue => "an invalid value",
    }
}

impl Reader {
    pub fn new(file: &str) -> Self {
        Reader {
            file: file.to_string(),
            errors: Vec::new(),
        }
    }

    /// Records a mistake at `node` (or at no particular line).
    pub fn error(&mut self, node: Option<&Node>, path: &str, message: impl Into<String>) {
        self.errors.push(ConfigError {
            file: self.file.clone(),
            line: node.map(line),
            path: path.to_string(),
            message: message.into(),
        });
    }

    /// Reads a mapping, reporting keys not in `allowed` and keys given twice.
    pub fn fields<'n>(
        &mut self,
        node: &'n Node,
        path: &str,
        allowed: &[&str],
    ) -> Option<Fields<'n>> {
        let YamlDataOwned::Mapping(map) = &node.data else {
            self.error(
                Some(node),
                path,
                format!("expected a mapping, found {}", kind(node)),
            );
            return None;
        };
        let mut entries: Vec<(&'n str, &'n Node)> = Vec::with_capacity(map.len());
        for (k, v) in map.iter() {
            let Some(key) = scalar_str(k) else {
                self.error(
                    Some(k),
                    path,
                    format!("keys must be strings, found {}", kind(k)),
                );
                continue;
            };
            let at = if path.is_empty() {
                key.to_string()
            } else {
                format!("{path}.{key}")
            };
            if !allowed.contains(&key) {
                self.error(
                    Some(k),
                    &at,
                    format!("unknown key (expected one of: {})", allowed.join(", ")),
                );
                continue;
            }
            if entries.iter().any(|(seen, _)| *seen == key) {
                self.error(Some(k), &at, "key given twice");
                continue;
            }
            entries.push((key, v));
        }
        Some(Fields {
            path: path.to_string(),
            node,
            entries,
        })
    }

    /// Reads a list; each element comes with its path `path[i]`.
    pub fn list<'n>(&mut self, node: &'n Node, path: &str) -> Vec<(String, &'n Node)> {
        match &node.data {
            YamlDataOwned::Sequence(items) => items
                .iter()
                .enumerate()
                .map(|(i, n)| (format!("{path}[{i}]"), n))
                .collect(),
            _ => {
                self.error(
                    Some(node),
                    path,
                    format!("expected a list, found {}", kind(node)),
                );
                Vec::new()
            }
        }
    }

    pub fn string(&mut self, node: &Node, path: &str) -> Option<String> {
        match scalar_str(node) {
            Some(s) => Some(s.to_string()),
            None => {
                self.error(
                    Some(node),
                    path,
                    format!("expected a string, found {}", kind(node)),
                );
                None
            }
        }
    }

    /// A required string field.
    pub fn required_string(&mut self, f: &Fields<'_>, key: &str) -> Option<String> {
        match f.get(key) {
            Some(n) => self.string(n, &f.child(key)),
            None => {
                self.error(Some(f.node), &f.child(key), "is required");
                None
            }
        }
    }

    pub fn optional_string(&mut self, f: &Fields<'_>, key: &str) -> Option<String> {
        f.get(key).and_then(|n| self.string(n, &f.child(key)))
    }

    pub fn bool(&mut self, f: &Fields<'_>, key: &str, default: bool) -> bool {
        match f.get(key) {
            None => default,
            Some(n) => match &n.data {
                YamlDataOwned::Value(ScalarOwned::Boolean(b)) => *b,
                _ => {
                    self.error(
                        Some(n),
                        &f.child(key),
                        format!("expected true or false, found {}", kind(n)),
                    );
                    default
                }
            },
        }
    }

    /// An integer within `min..=max`.
    pub fn int(&mut self, node: &Node, path: &str, min: i64, max: i64) -> Option<i64> {
        match &node.data {
            YamlDataOwned::Value(ScalarOwned::Integer(i)) if (min..=max).contains(i) => Some(*i),
            YamlDataOwned::Value(ScalarOwned::Integer(i)) => {
                self.error(Some(node), path, format!("{i} is outside {min}..{max}"));
                None
            }
            _ => {
                self.error(
                    Some(node),
                    path,
                    format!(
                        "expected a whole number in {min}..{max}, found {}",
                        kind(node)
                    ),
                );
                None
            }
        }
    }

    pub fn optional_int(&mut self, f: &Fields<'_>, key: &str, min: i64, max: i64) -> Option<i64> {
        f.get(key)
            .and_then(|n| self.int(n, &f.child(key), min, max))
    }

    /// A humane duration (`250ms`, `1s`, `1.5m`, `2h`), or `default` when absent.
    pub fn duration(&mut self, f: &Fields<'_>, key: &str, default: Duration) -> Duration {
        let Some(n) = f.get(key) else {
            return default;
        };
        let path = f.child(key);
        let parsed = match scalar(n) {
            Scalar::Str(s) => parse_duration(s),
            // A bare number is the most common slip; say which fix is meant.
            Scalar::Int(i) => Err(format!(
                "`{i}` is not a duration: add a unit, e.g. {i}s or {i}ms"
            )),
            Scalar::Other(kind) => Err(format!(
                "expected a duration such as 250ms, 1s or 2m, found {kind}"
            )),
        };
        match parsed {
            Ok(d) => d,
            Err(msg) => {
                self.error(Some(n), &path, msg);
                default
            }
        }
    }

    /// A size in bytes: a whole number, or a string with a unit (`512KiB`, `64MiB`, `1GiB`; nginx's
    /// `k`, `m`, `g` mean the same). At least `min`; `default` when absent.
    pub fn size(&mut self, f: &Fields<'_>, key: &str, default: usize, min: usize) -> usize {
        let Some(n) = f.get(key) else {
            return default;
        };
        let parsed = match scalar(n) {
            Scalar::Str(s) => parse_size(s),
            Scalar::Int(i) => usize::try_from(i).map_err(|_| format!("`{i}` is not a size")),
            Scalar::Other(kind) => Err(format!(
                "expected a size such as 64KiB or 128MiB, found {kind}"
            )),
        };
        match parsed {
            Ok(v) if v >= min => v,
            Ok(v) => {
                self.error(
                    Some(n),
                    &f.child(key),
                    format!("{v} bytes is less than the smallest allowed, {min}"),
                );
                default
            }
            Err(msg) => {
                self.error(Some(n), &f.child(key), msg);
                default
            }
        }
    }

    /// A `host:port` socket address with a port in 1..65535.
    pub fn address(&mut self, node: &Node, path: &str) -> Option<SocketAddr> {
        let s = self.string(node, path)?;
        match parse_address(&s) {
            Ok(a) => Some(a),
            Err(msg) => {
                self.error(Some(node), path, msg);
                None
            }
        }
    }

    /// A mapping of string keys to string values (labels, tags).
    pub fn string_map(&mut self, node: &Node, path: &str) -> Vec<(String, String)> {
        let YamlDataOwned::Mapping(map) = &node.data else {
            self.error(
                Some(node),
                path,
                format!("expected a mapping, found {}", kind(node)),
            );
            return Vec::new();
        };
        let mut out = Vec::new();
        for (k, v) in map.iter() {
            let (Some(key), Some(value)) = (scalar_str(k), scalar_text(v)) else {
                self.error(Some(k), path, "keys and values must be strings");
                continue;
            };
            out.push((key.to_string(), value));
        }
        out
    }
}

/// A scalar that may be a number or a string (such as a Service port).
pub enum Scalar<'n> {
    Int(i64),
    Str(&'n str),
    Other(&'static str),
}

pub fn scalar(node: &Node) -> Scalar<'_> {
    match (&node.data, scalar_str(node)) {
        (YamlDataOwned::Value(ScalarOwned::Integer(i)), _) => Scalar::Int(*i),
        (_, Some(s)) => Scalar::Str(s),
        _ => Scalar::Other(kind(node)),
    }
}

/// The text of a string scalar.
fn scalar_str(node: &Node) -> Option<&str> {
    match &node.data {
        YamlDataOwned::Value(ScalarOwned::String(s)) => Some(s.as_str()),
        YamlDataOwned::Representation(s, ..) => Some(s.as_str()),
        _ => None,
    }
}

/// Any scalar as text: label values like `v1` or `2` are both meant as strings.
fn scalar_text(node: &Node) -> Option<String> {
    match &node.data {
        YamlDataOwned::Value(ScalarOwned::Integer(i)) => Some(i.to_string()),
        YamlDataOwned::Value(ScalarOwned::Boolean(b)) => Some(b.to_string()),
        YamlDataOwned::Value(ScalarOwned::FloatingPoint(f)) => Some(f.to_string()),
        _ => scalar_str(node).map(str::to_string),
    }
}

/// Parses `250ms`, `1s`, `1.5s`, `2m`, `1h`. A bare number is refused: its unit would be a guess.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let split = s
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let bad = || format!("`{s}` is not a duration (write e.g. 250ms, 1s, 2m, 1h)");
    let value: f64 = num.parse().map_err(|_| bad())?;
    let scale = match unit {
        "ms" => 0.001,
        "s" => 1.0,
        "m" => 60.0,
        "h" => 3600.0,
        _ => return Err(bad()),
    };
    let secs = value * scale;
    if !secs.is_finite() || secs > 86_400.0 * 365.0 {
        return Err(bad());
    }
    Ok(Duration::from_secs_f64(secs))
}

/// Parses a size: digits and an optional unit (`B`, `KiB`/`k`, `MiB`/`m`, `GiB`/`g`).
pub fn parse_size(s: &str) -> Result<usize, String> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let bad = || format!("`{s}` is not a size (write e.g. 512KiB, 64MiB, 1GiB)");
    let value: usize = num.parse().map_err(|_| bad())?;
    let scale: usize = match unit.trim() {
        "" | "B" => 1,
        "KiB" | "k" | "K" => 1 << 10,
        "MiB" | "m" | "M" => 1 << 20,
        "GiB" | "g" | "G" => 1 << 30,
        _ => return Err(bad()),
    };
    value.checked_mul(scale).ok_or_else(bad)
}

/// Parses `host:port` where host is an IP address (`[::1]:80` for IPv6); the port must be 1..65535.
pub fn parse_address(s: &str) -> Result<SocketAddr, String> {
    let Some((host, port)) = s.rsplit_once(':') else {
        return Err(format!(
            "`{s}` is not an address: write ip:port, e.g. 0.0.0.0:8080"
        ));
    };
    let port: u32 = port
        .parse()
        .map_err(|_| format!("`{s}`: the port `{port}` is not a number"))?;
    if !(1..=65535).contains(&port) {
        return Err(format!("`{s}`: port {port} is outside 1..65535"));
    }
    let host = host.trim_start_matches('[').trim_end_matches(']');
    let ip: std::net::IpAddr = host.parse().map_err(|_| {
        format!("`{s}`: `{host}` is not an IP address (host names are not resolved here)")
    })?;
    Ok(SocketAddr::new(ip, port as u16))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_duration("1.5s"), Ok(Duration::from_millis(1500)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert!(parse_duration("5").is_err());
        assert!(parse_duration("5 parsecs").is_err());
        assert!(parse_duration("").is_err());
    }

    #[test]
    fn addresses() {
        assert_eq!(
            parse_address("127.0.0.1:80"),
            Ok("127.0.0.1:80".parse().unwrap())
        );
        assert_eq!(parse_address("[::1]:443"), Ok("[::1]:443".parse().unwrap()));
        assert!(parse_address("127.0.0.1:0")
            .unwrap_err()
            .contains("outside"));
        assert!(parse_address("127.0.0.1:70000")
            .unwrap_err()
            .contains("outside"));
        assert!(parse_address("localhost:80").is_err());
        assert!(parse_address("8080").is_err());
    }

    #[test]
    fn lines_are_one_based() {
        let doc = parse_document("t.yaml", "a: 1\nb:\n  c: 2\n").unwrap();
        let mut r = Reader::new("t.yaml");
        let f = r.fields(&doc, "", &["a", "b"]).unwrap();
        assert_eq!(
            line(f.get("b").unwrap()),
            3,
            "a nested mapping starts at its first key"
        );
        assert_eq!(line(f.get("a").unwrap()), 1);
    }
}
