//! Validation of what a route's policies change in the request's target: `rewrite` (prefix or
//! regex, with its replacement checked) and `redirect`. Every mistake is reported with its line
//! and field path.

use super::model::*;
use super::report::{child, line, Report};
use super::schema;
use super::yaml::Sect;

/// A path a rule writes: starts with `/`, no query, fragment, white space or control byte.
fn plain_path(p: &str) -> bool {
    p.starts_with('/')
        && p.bytes()
            .all(|b| b.is_ascii_graphic() && b != b'?' && b != b'#')
}

pub(super) fn rewrite(
    r: &mut Report,
    s: &Sect<schema::Rewrite>,
    path: &str,
) -> Option<RewriteConf> {
    let w = r.sect(s, path)?;
    match (&w.path, &w.prefix) {
        (Some(_), Some(_)) | (None, None) => {
            r.error(
                Some(s.line),
                path,
                "give exactly one of path ({regex, to}) or prefix",
            );
            None
        }
        (None, Some(v)) => {
            let at = child(path, "prefix");
            let prefix = r.val(v, &at)?;
            if !plain_path(prefix) {
                let message = format!(
                    "`{prefix}` must start with / and hold no ?, #, spaces or control characters"
                );
                r.error(Some(v.line), &at, message);
                return None;
            }
            Some(RewriteConf::Prefix(prefix.clone()))
        }
        (Some(p), None) => {
            let at = child(path, "path");
            let rp = r.sect(p, &at)?;
            let regex = r.required(&rp.regex, p.line, &child(&at, "regex"));
            let to = r.required(&rp.to, p.line, &child(&at, "to"));
            let compiled = match regex.map(|re| regex::Regex::new(re)) {
                Some(Ok(re)) => Some(re),
                Some(Err(e)) => {
                    let shown = e
                        .to_string()
                        .lines()
                        .map(str::trim_end)
                        .collect::<Vec<_>>()
                        .join(" ");
                    r.error(
                        line(&rp.regex),
                        &child(&at, "regex"),
                        format!("does not compile: {shown}"),
                    );
                    None
                }
                None => None,
            };
            let to = to?;
            if !plain_path(to) {
                let message = format!(
                    "`{to}` must start with / and hold no ?, #, spaces or control characters"
                );
                r.error(line(&rp.to), &child(&at, "to"), message);
                return None;
            }
            let re = compiled?;
            if let Err(message) = check_replacement(&re, to) {
                r.error(line(&rp.to), &child(&at, "to"), message);
                return None;
            }
            Some(RewriteConf::Regex {
                regex: PathRegex(re),
                to: to.clone(),
            })
        }
    }
}

/// Every `$N`, `$name` and `${…}` in `to` names a group of `re` (the regex crate reads `$1a` as
/// the group `1a`, and silently puts nothing for a group that does not exist).
fn check_replacement(re: &regex::Regex, to: &str) -> Result<(), String> {
    let names: Vec<&str> = re.capture_names().flatten().collect();
    let groups = re.captures_len();
    let bytes = to.as_bytes();
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] != b'$' {
            i += 1;
            continue;
        }
        if bytes.get(i + 1) == Some(&b'$') {
            i += 2;
            continue;
        }
        let (name, next) = if bytes.get(i + 1) == Some(&b'{') {
            match to[i + 2..].find('}') {
                Some(end) => (&to[i + 2..i + 2 + end], i + 3 + end),
                None => return Err(format!("`{to}`: an unclosed ${{")),
            }
        } else {
            let len = to[i + 1..]
                .bytes()
                .take_while(|b| b.is_ascii_alphanumeric() || *b == b'_')
                .count();
            (&to[i + 1..i + 1 + len], i + 1 + len)
        };
        let exists = match name.parse::<usize>() {
            Ok(n) => n < groups,
            Err(_) => names.contains(&name),
        };
        if !exists {
            return Err(format!(
                "`{to}`: `${name}` names no group of the regex (it has {} numbered{}); write \
                 ${{1}} when a group number is followed by letters or digits",
                groups - 1,
                if names.is_empty() {
                    String::new()
                } else {
                    format!(" and {}", names.join(", "))
                }
            ));
        }
        i = next;
    }
    Ok(())
}

pub(super) fn redirect(
    r: &mut Report,
    s: &Sect<schema::Redirect>,
    path: &str,
) -> Option<RedirectConf> {
    let d = r.sect(s, path)?;
    let scheme = r.opt(&d.scheme, &child(path, "scheme")).copied();
    let host = r
        .opt(&d.host, &child(path, "host"))
        .map(|h| h.to_ascii_lowercase());
    if let Some(h) = &host {
        if h.contains('*') || super::names::check_host(h).is_err() {
            let message = format!("`{h}` is not a host name (no port, no wildcard)");
            r.error(line(&d.host), &child(path, "host"), message);
        }
    }
    let port = r.opt(&d.port, &child(path, "port")).map(|p| p.get() as u16);
    let new_path = r.opt(&d.path, &child(path, "path")).cloned();
    if let Some(p) = &new_path {
        if !plain_path(p) {
            let message =
                format!("`{p}` must start with / and hold no ?, #, spaces or control characters");
            r.error(line(&d.path), &child(path, "path"), message);
        }
    }
    let status = r
        .opt(&d.status, &child(path, "status"))
        .map_or(301, |s| s.get() as u16);
    if ![301, 302, 303, 307, 308].contains(&status) {
        let message = format!("{status} is not a redirect status: use 301, 302, 303, 307 or 308");
        r.error(line(&d.status), &child(path, "status"), message);
    }
    if scheme.is_none() && host.is_none() && new_path.is_none() && port.is_none() {
        r.error(
            Some(s.line),
            path,
            "give at least one of scheme, host, port or path",
        );
        return None;
    }
    Some(RedirectConf {
        scheme,
        host,
        port,
        path: new_path,
        status,
    })
}
