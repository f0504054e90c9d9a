//! The client's address: the TCP peer, or — when the peer is a trusted proxy
//! (`server.trusted_proxies`) — the address that proxy put in `X-Forwarded-For`.
//!
//! `X-Forwarded-For` is a list each proxy appends the address it saw to, so only its right end
//! is written by hops we trust. Walking from the right, every address that is itself a trusted
//! proxy is skipped; the first one that is not is the client (nginx's `real_ip_recursive on`,
//! Envoy's `xff_trusted_cidrs`). Anything to its left was written by the client and is ignored,
//! which is what defeats spoofing. If every entry is trusted, the leftmost is the client; an
//! entry that is not an address stops the walk at the last good one (the hop that wrote it).

use super::Fields;
use ipnet::IpNet;
use std::net::{IpAddr, SocketAddr};

/// Entries looked at, from the right: a longer chain is cut (its left part is the client's
/// own writing anyway).
const MAX_HOPS: usize = 32;

/// The proxies whose `X-Forwarded-For` podgate believes.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct TrustedProxies(Vec<IpNet>);

impl TrustedProxies {
    pub fn new(nets: &[IpNet]) -> TrustedProxies {
        TrustedProxies(nets.to_vec())
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    pub fn trusts(&self, ip: IpAddr) -> bool {
        let ip = ip.to_canonical();
        self.0.iter().any(|n| n.contains(&ip))
    }
}

/// One `X-Forwarded-For` entry: an IPv4 or IPv6 address, optionally with a port (`1.2.3.4:80`,
/// `[2001:db8::1]:80`), surrounding white space ignored. IPv4-mapped IPv6 becomes IPv4.
pub fn parse_entry(entry: &[u8]) -> Option<IpAddr> {
    let s = std::str::from_utf8(entry.trim_ascii()).ok()?;
    let ip = match s.parse::<IpAddr>() {
        Ok(ip) => ip,
        Err(_) => s.parse::<SocketAddr>().ok()?.ip(),
    };
    Some(ip.to_canonical())
}

/// The client of a request from `peer` whose `X-Forwarded-For` fields (in order) are
/// `forwarded_for`. The pipeline calls this once per request to fill `RequestView::client`.
pub fn client_address<'a>(
    peer: Option<IpAddr>,
    forwarded_for: impl Iterator<Item = &'a [u8]>,
    trusted: &TrustedProxies,
) -> Option<IpAddr> {
    let peer = peer.map(|p| p.to_canonical());
    let p = peer?;
    if !trusted.trusts(p) {
        return peer;
    }
    let fields: Vec<&[u8]> = forwarded_for.collect();
    let mut client = p;
    let entries = fields
        .iter()
        .rev()
        .flat_map(|f| f.rsplit(|b| *b == b','))
        .filter(|e| !e.trim_ascii().is_empty())
        .take(MAX_HOPS);
    for entry in entries {
        let Some(ip) = parse_entry(entry) else { break };
        client = ip;
        if !trusted.trusts(ip) {
            break;
        }
    }
    Some(client)
}

/// [`client_address`] reading `X-Forwarded-For` from a request's fields.
pub fn client_of(
    peer: Option<IpAddr>,
    fields: Fields<'_>,
    trusted: &TrustedProxies,
) -> Option<IpAddr> {
    if trusted.is_empty() {
        return peer;
    }
    client_address(peer, fields.values("x-forwarded-for"), trusted)
}

/// The part of one `X-Forwarded-For` value `field` that [`client_address`] reads the client
/// from, for a request from `peer`: `None` when the peer is not trusted (the list is its own
/// writing), else the entries from the client on (all of them when every entry is trusted;
/// after an entry that is not an address, what follows it). What a proxy passes on then starts
/// with the client it decided.
pub fn forwarded_chain<'a>(
    peer: IpAddr,
    field: &'a [u8],
    trusted: &TrustedProxies,
) -> Option<&'a [u8]> {
    if !trusted.trusts(peer) {
        return None;
    }
    // Entry boundaries from the right: (start, end) byte offsets.
    let mut end = field.len();
    let mut start_of_kept = None;
    let mut hops = 0;
    loop {
        let start = field[..end]
            .iter()
            .rposition(|b| *b == b',')
            .map_or(0, |i| i + 1);
        let entry = &field[start..end];
        if !entry.trim_ascii().is_empty() {
            hops += 1;
            if hops > MAX_HOPS {
                break;
            }
            match parse_entry(entry) {
                None => break,
                Some(ip) => {
                    start_of_kept = Some(start);
                    if !trusted.trusts(ip) {
                        break;
                    }
                }
            }
        }
        if start == 0 {
            break;
        }
        end = start - 1;
    }
    let kept = field.get(start_of_kept?..)?.trim_ascii();
    (!kept.is_empty()).then_some(kept)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn trusted() -> TrustedProxies {
        TrustedProxies::new(&[
            "10.0.0.0/8".parse().unwrap(),
            "2001:db8::/32".parse().unwrap(),
        ])
    }

    fn client(peer: &str, xff: &[&str]) -> IpAddr {
        client_address(Some(ip(peer)), xff.iter().map(|s| s.as_bytes()), &trusted()).unwrap()
    }

    #[test]
    fn an_untrusted_peer_is_the_client_whatever_it_forwards() {
        assert_eq!(client("198.51.100.7", &["1.2.3.4"]), ip("198.51.100.7"));
        assert_eq!(client("198.51.100.7", &[]), ip("198.51.100.7"));
    }

    #[test]
    fn the_rightmost_untrusted_entry_is_the_client() {
        // The client wrote 6.6.6.6 itself; the proxy at 10.0.0.2 appended what it saw.
        assert_eq!(
            client("10.0.0.1", &["6.6.6.6, 203.0.113.9, 10.0.0.2"]),
            ip("203.0.113.9")
        );
        // Several fields read as one list, in order.
        assert_eq!(
            client("10.0.0.1", &["6.6.6.6", "203.0.113.9,10.9.9.9"]),
            ip("203.0.113.9")
        );
        assert_eq!(
            client("10.0.0.1", &["[2001:db9::1]:443, 2001:db8::5"]),
            ip("2001:db9::1")
        );
        assert_eq!(client("10.0.0.1", &["203.0.113.9:5678"]), ip("203.0.113.9"));
        assert_eq!(
            client("::ffff:10.0.0.1", &["::ffff:203.0.113.9"]),
            ip("203.0.113.9")
        );
    }

    #[test]
    fn all_trusted_gives_the_leftmost_and_garbage_stops_the_walk() {
        assert_eq!(client("10.0.0.1", &["10.0.0.3, 10.0.0.2"]), ip("10.0.0.3"));
        assert_eq!(
            client("10.0.0.1", &["203.0.113.9, unknown, 10.0.0.2"]),
            ip("10.0.0.2")
        );
        assert_eq!(client("10.0.0.1", &["garbage"]), ip("10.0.0.1"));
        assert_eq!(client("10.0.0.1", &[]), ip("10.0.0.1"));
        assert_eq!(client("10.0.0.1", &[" , ,"]), ip("10.0.0.1"));
    }

    #[test]
    fn the_chain_passed_on_starts_with_the_client() {
        let chain = |peer: &str, xff: &'static str| {
            forwarded_chain(ip(peer), xff.as_bytes(), &trusted())
                .map(|c| std::str::from_utf8(c).unwrap().to_string())
        };
        assert_eq!(chain("198.51.100.7", "1.2.3.4"), None);
        assert_eq!(
            chain("10.0.0.1", "6.6.6.6, 203.0.113.9, 10.0.0.2").as_deref(),
            Some("203.0.113.9, 10.0.0.2")
        );
        assert_eq!(
            chain("10.0.0.1", "10.0.0.3,10.0.0.2").as_deref(),
            Some("10.0.0.3,10.0.0.2")
        );
        assert_eq!(
            chain("10.0.0.1", "203.0.113.9, junk, 10.0.0.2").as_deref(),
            Some("10.0.0.2")
        );
        assert_eq!(chain("10.0.0.1", "junk"), None);
        assert_eq!(chain("10.0.0.1", " , "), None);
    }

    proptest! {
        /// Any bytes: no panic, and the chain's first entry is the client `client_address`
        /// finds (when the chain is not empty).
        #[test]
        fn the_chain_agrees_with_the_client(
            field in proptest::collection::vec(any::<u8>(), 0..60),
            trusted_peer in any::<bool>(),
        ) {
            let peer = if trusted_peer { ip("10.1.1.1") } else { ip("192.0.2.1") };
            let got = forwarded_chain(peer, &field, &trusted());
            let client = client_address(Some(peer), std::iter::once(&field[..]), &trusted());
            match got {
                None => prop_assert_eq!(client, Some(peer)),
                Some(c) => {
                    let first = c.split(|b| *b == b',').next().and_then(parse_entry);
                    prop_assert_eq!(first, client);
                }
            }
        }


        /// Any bytes: no panic, and the answer is the peer or an address the header names.
        #[test]
        fn forwarded_for_parsing_never_panics(
            fields in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..40), 0..4),
            trusted_peer in any::<bool>(),
        ) {
            let peer = if trusted_peer { ip("10.1.1.1") } else { ip("192.0.2.1") };
            let got = client_address(Some(peer), fields.iter().map(|f| f.as_slice()), &trusted()).unwrap();
            if !trusted_peer {
                prop_assert_eq!(got, peer);
            } else if got != peer {
                let named = fields.iter().flat_map(|f| f.split(|b| *b == b',')).any(|e| parse_entry(e) == Some(got));
                prop_assert!(named);
            }
        }

        /// A client behind one trusted proxy can prepend anything: it never becomes the client.
        #[test]
        fn prepended_entries_never_win(spoof in "[0-9a-f.:, ]{0,40}", real in any::<[u8; 4]>()) {
            let real = IpAddr::from(real);
            prop_assume!(!trusted().trusts(real));
            let xff = format!("{spoof},{real}");
            prop_assert_eq!(client("10.0.0.9", &[&xff]), real.to_canonical());
        }
    }
}
