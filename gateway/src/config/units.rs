//! The kinds of scalar a config value can be, and how each is written: durations (`250ms`),
//! sizes (`128MiB`), `ip:port` addresses, bounded whole numbers, keywords (`scheme: https`),
//! HTTP methods and statuses, rate-limit rates and keys. Each is a [`Leaf`]: it takes one YAML
//! scalar and says in words what is wrong with it; the field path and line are added by the
//! validation pass. Paths in the file are resolved against the file's folder ([`Resolve`]).

use super::limits::{Mode, OnError, Rate, RateKey};
use super::model::{CheckKind, HashOn, Protocol, Scheme};
use super::yaml::{Leaf, Scalar};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

/// Turns a path written in the file into one relative to the file's folder (built once by
/// `validate.rs`, handed to every part that reads files).
pub type Resolve<'a> = &'a dyn Fn(&str) -> PathBuf;

fn expected(what: &str, found: &Scalar) -> String {
    format!("expected {what}, found {}", found.kind())
}

/// A whole number in `MIN..=MAX`; the bounds are part of the field's type in the schema.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Int<const MIN: i64, const MAX: i64>(pub i64);

impl<const MIN: i64, const MAX: i64> Int<MIN, MAX> {
    /// The value, which the bounds let fit in a `u32` (no schema field allows negatives).
    pub fn get(self) -> u32 {
        self.0 as u32
    }
}

impl<const MIN: i64, const MAX: i64> Leaf for Int<MIN, MAX> {
    fn from_scalar(s: Scalar) -> Result<Self, String> {
        match s {
            Scalar::Int(i) if (MIN..=MAX).contains(&i) => Ok(Int(i)),
            Scalar::Int(i) => Err(format!("{i} is outside {MIN}..{MAX}")),
            other => Err(expected(&format!("a whole number in {MIN}..{MAX}"), &other)),
        }
    }
}

impl Leaf for Duration {
    fn from_scalar(s: Scalar) -> Result<Self, String> {
        match s {
            Scalar::Str(s) => parse_duration(&s),
            // A bare number is the most common slip; say which fix is meant.
            Scalar::Int(i) => Err(format!(
                "`{i}` is not a duration: add a unit, e.g. {i}s or {i}ms"
            )),
            other => Err(expected("a duration such as 250ms, 1s or 2m", &other)),
        }
    }
}

/// A size in bytes: a whole number, or a string with a unit (`512KiB`, `64MiB`, `1GiB`; nginx's
/// `k`, `m`, `g` mean the same).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Size(pub usize);

impl Leaf for Size {
    fn from_scalar(s: Scalar) -> Result<Self, String> {
        match s {
            Scalar::Str(s) => parse_size(&s).map(Size),
            Scalar::Int(i) => usize::try_from(i)
                .map(Size)
                .map_err(|_| format!("`{i}` is not a size")),
            other => Err(expected("a size such as 64KiB or 128MiB", &other)),
        }
    }
}

/// A `host:port` socket address with a port in 1..65535.
impl Leaf for SocketAddr {
    fn from_scalar(s: Scalar) -> Result<Self, String> {
        parse_address(&String::from_scalar(s)?)
    }
}

/// A keyword leaf: `$what` names the kind in messages ("`ftp` is not a scheme: use http or
/// https").
macro_rules! keywords {
    ($ty:ty, $what:literal, $($word:literal => $value:expr),+ $(,)?) => {
        impl Leaf for $ty {
            fn from_scalar(s: Scalar) -> Result<Self, String> {
                let words: &[&str] = &[$($word),+];
                match String::from_scalar(s)?.as_str() {
                    $($word => Ok($value),)+
                    other => {
                        let (last, rest) = words.split_last().expect("one word at least");
                        let choices = if rest.is_empty() {
                            last.to_string()
                        } else {
                            format!("{} or {last}", rest.join(", "))
                        };
                        Err(format!("`{other}` is not {}: use {choices}", $what))
                    }
                }
            }
        }
    };
}

keywords!(Scheme, "a scheme", "http" => Scheme::Http, "https" => Scheme::Https);
keywords!(CheckKind, "a check kind", "http" => CheckKind::Http, "tcp" => CheckKind::Tcp,
    "grpc" => CheckKind::Grpc);
keywords!(Protocol, "a protocol", "http1" => Protocol::Http1, "h2" => Protocol::H2,
    "h2c" => Protocol::H2c);

keywords!(OnError, "an on_error choice", "allow" => OnError::Allow, "deny" => OnError::Deny);

keywords!(Mode, "a mode", "exact" => Mode::Exact, "batched" => Mode::Batched);

impl Leaf for RateKey {
    fn from_scalar(s: Scalar) -> Result<Self, String> {
        let text = String::from_scalar(s)?;
        let bad = || {
            format!("`{text}` is not a rate-limit key: use consumer, client_ip or `header NAME`")
        };
        match text.split_once(' ') {
            None if text == "consumer" => Ok(RateKey::Consumer),
            None if text == "client_ip" => Ok(RateKey::ClientIp),
            Some(("header", name)) => {
                let name = name.trim();
                match http::HeaderName::from_bytes(name.as_bytes()) {
                    Ok(h) => Ok(RateKey::Header(h.as_str().to_string())),
                    Err(_) => Err(format!("`{name}` is not a header name")),
                }
            }
            _ => Err(bad()),
        }
    }
}

impl Leaf for Rate {
    fn from_scalar(s: Scalar) -> Result<Self, String> {
        let text = match s {
            Scalar::Str(s) => s,
            Scalar::Int(i) => return Err(format!("`{i}` is not a rate: add a unit, e.g. {i}/s")),
            other => {
                return Err(format!(
                    "expected a rate such as 100/s, found {}",
                    other.kind()
                ))
            }
        };
        let bad = || {
            format!(
                "`{text}` is not a rate: write COUNT/UNIT with UNIT s, m (or min), h or d, e.g. \
                 100/s or 6000/min"
            )
        };
        let (count, unit) = text.split_once('/').ok_or_else(bad)?;
        let per_secs = match unit.trim() {
            "s" => 1,
            "m" | "min" => 60,
            "h" => 3600,
            "d" => 86_400,
            _ => return Err(bad()),
        };
        let count: u64 = count.trim().parse().map_err(|_| bad())?;
        if count == 0 {
            return Err(format!(
                "`{text}`: the count must be at least 1 (to refuse every request, use another \
                 policy)"
            ));
        }
        // One request must take at least a nanosecond of the bucket's time.
        if count > per_secs * 1_000_000_000 {
            return Err(format!("`{text}` is more than 1000000000/s"));
        }
        Ok(Rate { count, per_secs })
    }
}

/// The word of `balance`; `consistent_hash` takes its key from `hash_on` (see `upstreams.rs`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BalanceWord {
    RoundRobin,
    ConsistentHash,
    LeastRequest,
}

keywords!(BalanceWord, "a balance policy", "round_robin" => BalanceWord::RoundRobin,
    "consistent_hash" => BalanceWord::ConsistentHash, "least_request" => BalanceWord::LeastRequest);

/// `hash_on`: `header NAME`, `cookie NAME`, `client_ip` or `path`.
impl Leaf for HashOn {
    fn from_scalar(s: Scalar) -> Result<Self, String> {
        let text = String::from_scalar(s)?;
        let (kind, name) = match text.split_once(' ') {
            Some((k, rest)) => (k, Some(rest.trim())),
            None => (text.as_str(), None),
        };
        // A cookie name is an RFC 6265 token.
        let token = |c: &str| {
            !c.is_empty()
                && c.bytes()
                    .all(|b| b.is_ascii_graphic() && !b"()<>@,;:\\\"/[]?={}".contains(&b))
        };
        match (kind, name) {
            ("header", Some(h)) if http::HeaderName::from_bytes(h.as_bytes()).is_ok() => {
                Ok(HashOn::Header(h.to_ascii_lowercase()))
            }
            ("cookie", Some(c)) if token(c) => Ok(HashOn::Cookie(c.to_string())),
            ("client_ip", None) => Ok(HashOn::ClientIp),
            ("path", None) => Ok(HashOn::Path),
            _ => Err(format!(
                "`{text}` is not a hash key: use `header NAME`, `cookie NAME`, `client_ip` or \
                 `path`"
            )),
        }
    }
}

/// An HTTP method a route can match, in upper case as on the wire.
impl Leaf for http::Method {
    fn from_scalar(s: Scalar) -> Result<Self, String> {
        const KNOWN: &[&str] = &[
            "GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "TRACE", "CONNECT",
        ];
        let s = String::from_scalar(s)?;
        match KNOWN.contains(&s.as_str()) {
            true => http::Method::from_bytes(s.as_bytes()).map_err(|e| e.to_string()),
            false => Err(format!(
                "`{s}` is not an HTTP method (use upper case, e.g. GET)"
            )),
        }
    }
}

/// An inclusive range of answer statuses a health check accepts: `200` or `200-399`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Status(pub u16, pub u16);

impl Leaf for Status {
    fn from_scalar(s: Scalar) -> Result<Self, String> {
        let text = match s {
            Scalar::Int(i) => i.to_string(),
            Scalar::Str(s) => s,
            other => return Err(expected("a status or range like 200-399", &other)),
        };
        let (lo, hi) = text.split_once('-').unwrap_or((&text, &text));
        match (lo.trim().parse::<u16>(), hi.trim().parse::<u16>()) {
            (Ok(lo), Ok(hi)) if (100..=599).contains(&lo) && (lo..=599).contains(&hi) => {
                Ok(Status(lo, hi))
            }
            _ => Err(format!(
                "`{text}` is not a status (100..599) or range like 200-399"
            )),
        }
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
    fn keywords_name_their_choices() {
        let ftp = Scheme::from_scalar(Scalar::Str("ftp".into())).unwrap_err();
        assert_eq!(ftp, "`ftp` is not a scheme: use http or https");
        assert_eq!(
            Int::<0, 10>::from_scalar(Scalar::Str("x".into())).unwrap_err(),
            "expected a whole number in 0..10, found a string"
        );
    }
}
