//! The path toward the Pod when a policy changes it: a `rewrite` (a regex replacement, or the
//! route's prefix swapped for another), and the query without an API key that must not reach
//! the Pod. The query is otherwise kept as the client sent it.
//!
//! When neither applies, [`PathRule::upstream`] returns `None` and the pipeline sends the path
//! as it always does (with `strip_prefix` when the route has it). When one applies, the whole
//! path is decided here, `strip_prefix` included (`Edits::path` is not stripped again).

use crate::config::RewriteConf;

#[derive(Debug, Default)]
pub struct PathRule {
    path_prefix: String,
    strip_prefix: bool,
    rewrite: Option<RewriteConf>,
}

/// `path` without the route's `prefix` (always starting with `/`), as `strip_prefix` does.
fn strip<'a>(prefix: &str, path: &'a str) -> &'a str {
    let prefix = prefix.trim_end_matches('/');
    match path.get(prefix.len()..) {
        Some(rest) if path.starts_with(prefix) && rest.starts_with('/') => rest,
        _ => "/",
    }
}

impl PathRule {
    pub fn new(path_prefix: &str, strip_prefix: bool, rewrite: Option<&RewriteConf>) -> PathRule {
        PathRule {
            path_prefix: path_prefix.to_string(),
            strip_prefix,
            rewrite: rewrite.cloned(),
        }
    }

    pub fn rewrites(&self) -> bool {
        self.rewrite.is_some()
    }

    /// The path and query toward the Pod for the client's `path` and `query`, when a rewrite
    /// applies or `new_query` replaces the query (`Some(None)`: no query left); `None` when the
    /// pipeline's usual path stands.
    pub fn upstream(
        &self,
        path: &str,
        query: Option<&str>,
        new_query: Option<Option<&str>>,
    ) -> Option<String> {
        let rewritten: Option<String> = match &self.rewrite {
            Some(RewriteConf::Regex { regex, to }) => regex
                .0
                .is_match(path)
                .then(|| regex.0.replace(path, to.as_str()).into_owned()),
            Some(RewriteConf::Prefix(new)) => {
                let rest = if self.path_prefix == "/" {
                    path
                } else {
                    strip(&self.path_prefix, path)
                };
                let rest = if rest == "/" && !path.ends_with('/') {
                    ""
                } else {
                    rest
                };
                let mut p = format!("{}{rest}", new.trim_end_matches('/'));
                if p.is_empty() {
                    p.push('/');
                }
                Some(p)
            }
            None => None,
        };
        if rewritten.is_none() && new_query.is_none() {
            return None;
        }
        let mut out = match rewritten {
            // A replacement that made the path relative or empty still sends a valid target.
            Some(p) if p.starts_with('/') => p,
            Some(p) => format!("/{p}"),
            None if self.strip_prefix && self.path_prefix != "/" => {
                strip(&self.path_prefix, path).to_string()
            }
            None => path.to_string(),
        };
        if let Some(q) = new_query.unwrap_or(query) {
            out.push('?');
            out.push_str(q);
        }
        Some(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::PathRegex;

    #[test]
    fn regex_rewrites_keep_the_query_and_leave_other_paths_alone() {
        let rule = PathRule::new(
            "/orders",
            false,
            Some(&RewriteConf::Regex {
                regex: PathRegex(regex::Regex::new("^/orders/(.*)$").unwrap()),
                to: "/v2/$1".into(),
            }),
        );
        assert_eq!(
            rule.upstream("/orders/42", Some("x=1&y"), None).as_deref(),
            Some("/v2/42?x=1&y")
        );
        assert_eq!(
            rule.upstream("/orders/a/b", None, None).as_deref(),
            Some("/v2/a/b")
        );
        assert_eq!(rule.upstream("/orders", Some("x=1"), None), None);
        assert_eq!(
            rule.upstream("/orders", Some("k=s&x=1"), Some(Some("x=1")))
                .as_deref(),
            Some("/orders?x=1")
        );
    }

    #[test]
    fn prefix_rewrites_swap_the_route_prefix() {
        let rule = PathRule::new("/orders", false, Some(&RewriteConf::Prefix("/v2".into())));
        assert_eq!(rule.upstream("/orders", None, None).as_deref(), Some("/v2"));
        assert_eq!(
            rule.upstream("/orders/", None, None).as_deref(),
            Some("/v2/")
        );
        assert_eq!(
            rule.upstream("/orders/1", Some("a=b"), None).as_deref(),
            Some("/v2/1?a=b")
        );
        let root = PathRule::new("/orders", false, Some(&RewriteConf::Prefix("/".into())));
        assert_eq!(root.upstream("/orders", None, None).as_deref(), Some("/"));
        assert_eq!(
            root.upstream("/orders/1", None, None).as_deref(),
            Some("/1")
        );
        let any = PathRule::new("/", false, Some(&RewriteConf::Prefix("/api".into())));
        assert_eq!(
            any.upstream("/x/y", None, None).as_deref(),
            Some("/api/x/y")
        );
    }

    #[test]
    fn a_removed_query_key_keeps_strip_prefix() {
        let rule = PathRule::new("/orders", true, None);
        assert_eq!(rule.upstream("/orders/1", Some("k=s"), None), None);
        assert_eq!(
            rule.upstream("/orders/1", Some("k=s"), Some(None))
                .as_deref(),
            Some("/1")
        );
        assert_eq!(
            rule.upstream("/orders", Some("k=s&a=1"), Some(Some("a=1")))
                .as_deref(),
            Some("/?a=1")
        );
    }
}
