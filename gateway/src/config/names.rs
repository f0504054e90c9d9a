//! Name rules: Kubernetes' (namespaces, Services, ports, labels) as the API server applies them,
//! so that a typo is caught at start and not as a Service that never shows up, and podgate's own
//! for the names of clusters, upstreams and routes, and for route hosts.

use super::yaml::{Leaf, Scalar};
use podgate_discovery::PortRef;

/// Names of clusters, upstreams and routes end up in metric labels and logs: keep them tame.
pub fn check_name(name: &str) -> Result<(), String> {
    let ok = !name.is_empty()
        && name.len() <= 63
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
    match ok {
        true => Ok(()),
        false => Err(format!(
            "`{name}` is not a valid name: 1 to 63 letters, digits, '-', '_' or '.'"
        )),
    }
}

/// A Service port: its number, or its name.
impl Leaf for PortRef {
    fn from_scalar(s: Scalar) -> Result<Self, String> {
        match s {
            Scalar::Int(i) if (1..=65535).contains(&i) => Ok(PortRef::Number(i as u16)),
            Scalar::Int(i) => Err(format!("port {i} is outside 1..65535")),
            Scalar::Str(name) => match port_name(&name) {
                Ok(()) => Ok(PortRef::Name(name)),
                Err(why) => Err(format!("`{name}` is not a valid port name: {why}")),
            },
            other => Err(format!(
                "expected a Service port number or name, found {}",
                other.kind()
            )),
        }
    }
}

/// Kubernetes namespace names (RFC 1123 label).
pub fn dns1123_label(s: &str) -> Result<(), &'static str> {
    if s.is_empty() || s.len() > 63 {
        return Err("must be 1 to 63 characters");
    }
    if !s
        .bytes()
        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
    {
        return Err("only lower-case letters, digits and '-' are allowed");
    }
    if s.starts_with('-') || s.ends_with('-') {
        return Err("must start and end with a letter or digit");
    }
    Ok(())
}

/// Kubernetes Service names (RFC 1035 label: an RFC 1123 label that starts with a letter).
pub fn dns1035_label(s: &str) -> Result<(), &'static str> {
    dns1123_label(s)?;
    if !s.as_bytes()[0].is_ascii_lowercase() {
        return Err("must start with a lower-case letter");
    }
    Ok(())
}

/// The name part of a label key, and a non-empty label value: at most 63 characters, letters,
/// digits, '-', '_' and '.', starting and ending with a letter or digit (Kubernetes'
/// `IsQualifiedName` name part and `IsValidLabelValue`).
fn label_name(s: &str) -> Result<(), &'static str> {
    if s.len() > 63 {
        return Err("at most 63 characters");
    }
    if !s
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
    {
        return Err("only letters, digits, '-', '_' and '.' are allowed");
    }
    let alnum = |b: Option<&u8>| b.is_some_and(u8::is_ascii_alphanumeric);
    if !alnum(s.as_bytes().first()) || !alnum(s.as_bytes().last()) {
        return Err("must start and end with a letter or digit");
    }
    Ok(())
}

/// A Kubernetes label key: an optional DNS subdomain prefix and `/`, then a name of at most 63
/// characters (`version`, `app.kubernetes.io/name`).
pub fn label_key(s: &str) -> Result<(), String> {
    let (prefix, name) = match s.split_once('/') {
        Some((prefix, name)) => (Some(prefix), name),
        None => (None, s),
    };
    if let Some(prefix) = prefix {
        if name.contains('/') {
            return Err("at most one '/', between the prefix and the name".into());
        }
        dns1123_subdomain(prefix).map_err(|why| format!("the prefix `{prefix}` {why}"))?;
    }
    if name.is_empty() {
        return Err("the name part is empty".into());
    }
    label_name(name).map_err(|why| match prefix {
        Some(_) => format!("the name `{name}`: {why}"),
        None => why.to_string(),
    })
}

/// A Kubernetes label value: empty, or at most 63 letters, digits, '-', '_' and '.', starting
/// and ending with a letter or digit.
pub fn label_value(s: &str) -> Result<(), &'static str> {
    if s.is_empty() {
        return Ok(());
    }
    label_name(s)
}

/// A DNS subdomain (RFC 1123), as label key prefixes must be: at most 253 characters, labels of
/// lower-case letters, digits and '-' separated by '.'.
fn dns1123_subdomain(s: &str) -> Result<(), &'static str> {
    if s.is_empty() || s.len() > 253 {
        return Err("must be 1 to 253 characters");
    }
    for part in s.split('.') {
        let ok = !part.is_empty()
            && part
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
            && !part.starts_with('-')
            && !part.ends_with('-');
        if !ok {
            return Err("is not a DNS subdomain (lower-case letters, digits, '-' and '.')");
        }
    }
    Ok(())
}

/// Kubernetes port names (IANA_SVC_NAME).
pub fn port_name(s: &str) -> Result<(), &'static str> {
    if s.is_empty() || s.len() > 15 {
        return Err("must be 1 to 15 characters");
    }
    dns1123_label(s).map_err(|_| "only lower-case letters, digits and '-', not at either end")?;
    if !s.bytes().any(|b| b.is_ascii_lowercase()) {
        return Err("must contain at least one letter");
    }
    Ok(())
}

pub fn check_host(h: &str) -> Result<(), &'static str> {
    let name = h.strip_prefix("*.").unwrap_or(h);
    if name.is_empty() || name.contains('*') {
        return Err("is not a host: a wildcard is only allowed as the first label (*.example.com)");
    }
    if name.contains(':') {
        return Err("is not a host: leave the port out");
    }
    if !name
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '.')
    {
        return Err("is not a host name");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn label_keys_follow_kubernetes() {
        for ok in [
            "version",
            "app.kubernetes.io/name",
            "a",
            "A-b_c.d",
            "example.com/Tier",
            &"x".repeat(63),
            &format!("{}/n", "a".repeat(253)),
        ] {
            assert_eq!(label_key(ok), Ok(()), "{ok}");
        }
        for (bad, why) in [
            ("", "empty"),
            ("-version", "start and end"),
            ("version_", "start and end"),
            ("ver sion", "only letters"),
            (&"x".repeat(64), "63"),
            ("/name", "prefix"),
            ("Example.com/name", "prefix"),
            ("example..com/name", "prefix"),
            ("a/b/c", "one '/'"),
            ("example.com/", "empty"),
            ("example.com/-n", "start and end"),
            (&format!("{}/n", "a".repeat(254)), "253"),
        ] {
            let err = label_key(bad).expect_err(bad);
            assert!(err.contains(why), "{bad}: {err}");
        }
    }

    #[test]
    fn label_values_follow_kubernetes() {
        for ok in ["", "v1", "1.2.3", "A_b-c", &"x".repeat(63)] {
            assert_eq!(label_value(ok), Ok(()), "{ok}");
        }
        for bad in ["a b", "-v1", "v1.", "v/1", &"x".repeat(64)] {
            assert!(label_value(bad).is_err(), "{bad}");
        }
    }
}
