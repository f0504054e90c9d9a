//! Config mistakes: the error type users see (file, line, field path, message), and [`Report`],
//! which the validation pass writes every mistake into while it unpacks the schema's wrappers.

use super::yaml::{List, Pairs, Sect, Val};
use std::fmt;

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

/// The field path of `key` inside `path` (`upstreams[0]` + `name`).
pub fn child(path: &str, key: &str) -> String {
    if path.is_empty() {
        key.to_string()
    } else {
        format!("{path}.{key}")
    }
}

/// The line of an optional field, for a mistake about it.
pub fn line<T>(v: &Option<Val<T>>) -> Option<usize> {
    v.as_ref().map(|v| v.line)
}

/// Collects mistakes. Each unpacking method reports what its wrapper kept and hands back the
/// value when there is one, so a check reads `if let Some(x) = r.opt(&u.retries, &path)`.
pub struct Report {
    file: String,
    errors: Vec<ConfigError>,
}

impl Report {
    pub fn new(file: &str) -> Self {
        Report {
            file: file.to_string(),
            errors: Vec::new(),
        }
    }

    /// The config file's name as given (what errors are reported against).
    pub fn file(&self) -> &str {
        &self.file
    }

    /// Every mistake, in file order; those without a line (about the whole file) first.
    pub fn into_errors(self) -> Vec<ConfigError> {
        let mut errors = self.errors;
        errors.sort_by_key(|e| e.line.unwrap_or(0));
        errors
    }

    pub fn is_clean(&self) -> bool {
        self.errors.is_empty()
    }

    /// Records a mistake at `line` (or at no particular line).
    pub fn error(&mut self, line: Option<usize>, path: &str, message: impl Into<String>) {
        self.errors.push(ConfigError {
            file: self.file.clone(),
            line,
            path: path.to_string(),
            message: message.into(),
        });
    }

    /// A mapping's struct, after the keys it set aside are reported; `None` when the file has
    /// something else than a mapping at `path`.
    pub fn sect<'a, T>(&mut self, s: &'a Sect<T>, path: &str) -> Option<&'a T> {
        for p in &s.problems {
            let at = p
                .key
                .as_deref()
                .map_or_else(|| path.to_string(), |k| child(path, k));
            self.error(Some(p.line), &at, p.message.clone());
        }
        match &s.value {
            Ok(v) => Some(v),
            Err(kind) => {
                self.error(
                    Some(s.line),
                    path,
                    format!("expected a mapping, found {kind}"),
                );
                None
            }
        }
    }

    /// A scalar's value, or `None` after its mistake is reported.
    pub fn val<'a, T>(&mut self, v: &'a Val<T>, path: &str) -> Option<&'a T> {
        match &v.value {
            Ok(v) => Some(v),
            Err(message) => {
                self.error(Some(v.line), path, message.clone());
                None
            }
        }
    }

    /// An optional scalar's value: `None` when absent or wrong (then reported).
    pub fn opt<'a, T>(&mut self, v: &'a Option<Val<T>>, path: &str) -> Option<&'a T> {
        v.as_ref().and_then(|v| self.val(v, path))
    }

    /// A required scalar's value; when absent, "is required" at the line of its mapping.
    pub fn required<'a, T>(
        &mut self,
        v: &'a Option<Val<T>>,
        mapping_line: usize,
        path: &str,
    ) -> Option<&'a T> {
        match v {
            Some(v) => self.val(v, path),
            None => {
                self.error(Some(mapping_line), path, "is required");
                None
            }
        }
    }

    /// A list's items with their paths (`path[i]`); none when the file has no list here.
    pub fn list<'a, T>(&mut self, l: &'a List<T>, path: &str) -> Vec<(String, &'a T)> {
        match &l.items {
            Ok(items) => items
                .iter()
                .enumerate()
                .map(|(i, item)| (format!("{path}[{i}]"), item))
                .collect(),
            Err(kind) => {
                self.error(Some(l.line), path, format!("expected a list, found {kind}"));
                Vec::new()
            }
        }
    }

    /// The entries of a free-form mapping of strings, each with the line of its key.
    pub fn pairs(&mut self, p: &Pairs, path: &str) -> Vec<(usize, String, String)> {
        let entries = match &p.entries {
            Ok(entries) => entries,
            Err(kind) => {
                self.error(
                    Some(p.line),
                    path,
                    format!("expected a mapping, found {kind}"),
                );
                return Vec::new();
            }
        };
        let mut out = Vec::new();
        for (line, key, value) in entries {
            match (key, value.text()) {
                (super::yaml::Scalar::Str(key), Some(value)) => {
                    out.push((*line, key.clone(), value))
                }
                _ => self.error(Some(*line), path, "keys and values must be strings"),
            }
        }
        out
    }
}
