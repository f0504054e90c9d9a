//! Zone-aware routing (`zone_aware: true` with `server.zone`): within a tier, how much traffic
//! stays in podgate's own zone.
//!
//! Which Pods are local: when every endpoint of the tier carries `hints.forZones` (Kubernetes
//! Topology Aware Routing, where the EndpointSlice controller already balanced the hints by
//! zone capacity), the ones hinted for podgate's zone; otherwise the ones whose `zone` is it.
//! A single endpoint without hints means the controller withdrew them, and kube-proxy then
//! ignores hints too.
//!
//! How much stays local (Envoy's zone-aware routing, with podgate replicas assumed spread over
//! the zones the tier's Pods are in, as Deployments with topology spread are): the local zone
//! should take `1/zones` of the traffic, and it can take `local / healthy` of the capacity. When
//! the local share of capacity covers the local share of demand, all traffic stays local; when
//! it covers only part of it, that part stays and the rest goes to the other zones. With no
//! healthy local Pod, nothing stays local (Kubernetes' safeguard: fall back to all zones).

use podgate_discovery::Endpoint;

/// Whether every endpoint in `endpoints` carries zone hints (and there is at least one).
pub fn hinted<'a>(mut endpoints: impl Iterator<Item = &'a Endpoint>) -> bool {
    let mut any = false;
    let all = endpoints.all(|e| {
        any = true;
        e.for_zones.is_some()
    });
    any && all
}

/// Whether `e` counts as local to `zone`.
pub fn is_local(e: &Endpoint, zone: &str, hints: bool) -> bool {
    if hints {
        e.for_zones
            .as_ref()
            .is_some_and(|zs| zs.iter().any(|z| z == zone))
    } else {
        e.zone.as_deref() == Some(zone)
    }
}

/// The fraction (0..=1) of a tier's traffic that stays local: `local` and `healthy` are healthy
/// weight (local, all), `zones` the number of zones the tier's healthy Pods are in.
pub fn local_fraction(local: u64, healthy: u64, zones: usize) -> f64 {
    if local == 0 || healthy == 0 {
        return 0.0;
    }
    (local as f64 / healthy as f64 * zones.max(1) as f64).min(1.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ep(zone: Option<&str>, hints: Option<&[&str]>) -> Endpoint {
        Endpoint {
            addr: "10.0.0.1:80".parse().unwrap(),
            ready: true,
            serving: true,
            terminating: false,
            pod: None,
            node: None,
            zone: zone.map(Into::into),
            for_zones: hints.map(|h| h.iter().map(|z| z.to_string()).collect()),
            slice: "s".into(),
        }
    }

    #[test]
    fn enough_local_capacity_keeps_everything_local() {
        assert_eq!(local_fraction(2, 4, 2), 1.0);
        assert_eq!(local_fraction(3, 4, 2), 1.0);
        assert_eq!(local_fraction(4, 4, 1), 1.0);
    }

    #[test]
    fn short_local_capacity_keeps_its_part() {
        assert!((local_fraction(1, 4, 2) - 0.5).abs() < 1e-9);
        assert!((local_fraction(1, 6, 3) - 0.5).abs() < 1e-9);
        assert_eq!(local_fraction(0, 4, 2), 0.0);
    }

    #[test]
    fn hints_are_used_only_when_every_endpoint_has_them() {
        let all = [ep(Some("a"), Some(&["b"])), ep(Some("b"), Some(&["a"]))];
        assert!(hinted(all.iter()));
        assert!(is_local(&all[1], "a", true), "hinted for a, though in b");
        assert!(!is_local(&all[0], "a", true));
        let some = [ep(Some("a"), Some(&["a"])), ep(Some("b"), None)];
        assert!(!hinted(some.iter()));
        assert!(is_local(&some[0], "a", false));
        assert!(!is_local(&some[1], "a", false));
        assert!(!hinted([].iter()));
    }
}
