//! `ip_allow` and `ip_deny`: which client addresses (`RequestView::client`, so the address
//! behind a trusted proxy) may call. A denied address is refused even when it is also allowed;
//! with an allow list, every address outside it is refused, and so is a request whose client is
//! unknown. IPv4-mapped IPv6 addresses count as their IPv4 address.

use ipnet::IpNet;
use std::net::IpAddr;

#[derive(Debug, Default)]
pub struct IpRules {
    allow: Vec<IpNet>,
    deny: Vec<IpNet>,
}

impl IpRules {
    pub fn new(allow: &[IpNet], deny: &[IpNet]) -> Option<IpRules> {
        (!allow.is_empty() || !deny.is_empty()).then(|| IpRules {
            allow: allow.to_vec(),
            deny: deny.to_vec(),
        })
    }

    pub fn admits(&self, client: Option<IpAddr>) -> bool {
        let Some(ip) = client.map(|c| c.to_canonical()) else {
            return self.allow.is_empty();
        };
        if self.deny.iter().any(|n| n.contains(&ip)) {
            return false;
        }
        self.allow.is_empty() || self.allow.iter().any(|n| n.contains(&ip))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deny_wins_and_an_allow_list_closes_everything_else() {
        let net = |s: &str| s.parse::<IpNet>().unwrap();
        let ip = |s: &str| Some(s.parse::<IpAddr>().unwrap());
        let rules = IpRules::new(
            &[net("192.0.2.0/24"), net("2001:db8::/32")],
            &[net("192.0.2.66/32")],
        )
        .unwrap();
        assert!(rules.admits(ip("192.0.2.1")));
        assert!(rules.admits(ip("::ffff:192.0.2.1")));
        assert!(rules.admits(ip("2001:db8::1")));
        assert!(!rules.admits(ip("192.0.2.66")));
        assert!(!rules.admits(ip("198.51.100.1")));
        assert!(!rules.admits(None));
        let deny_only = IpRules::new(&[], &[net("10.0.0.0/8")]).unwrap();
        assert!(deny_only.admits(ip("192.0.2.1")));
        assert!(!deny_only.admits(ip("10.1.2.3")));
        assert!(IpRules::new(&[], &[]).is_none());
    }
}
