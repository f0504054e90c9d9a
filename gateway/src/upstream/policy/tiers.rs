//! Failover tiers (`priority` on service entries): how much of the traffic each tier gets.
//!
//! Envoy's priority levels are the reference. A tier's *health* is its healthy share of capacity
//! times the overprovisioning factor 1.4, capped at 100 %: a tier with 72 % or more of its Pods
//! healthy still takes all its traffic (the remaining Pods are assumed to cope), below that the
//! shortfall spills to the next tier. Tier 0 takes `health(0)`, tier 1 `min(rest, health(1))`
//! and so on; when all tiers together are below 100 %, the loads are scaled up to sum to 100 %
//! in proportion to health. The loads follow the Pods continuously (no switch-over point, so no
//! flapping), and move back as Pods return.
//!
//! Capacity is weight: the weight of the tier's Pods that Kubernetes lists and that are not
//! terminating (a rollout's leaving Pods are not lost capacity). Healthy is the weight of those
//! that are ready, pass active checks and are not ejected.

/// Envoy's default overprovisioning factor.
pub const OVERPROVISIONING: f64 = 1.4;

/// One tier's capacity, in weight units.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Capacity {
    pub healthy: u64,
    pub total: u64,
}

impl Capacity {
    /// The tier's health, 0..=1.
    pub fn health(&self) -> f64 {
        if self.total == 0 {
            return 0.0;
        }
        (OVERPROVISIONING * self.healthy as f64 / self.total as f64).min(1.0)
    }
}

/// The share of traffic (0..=1, summing to 1) each tier gets, in tier order. When no tier has
/// any health at all, everything goes to the first tier that has Pods (picks then fall back to
/// refused Pods: better a likely error than a certain 503), or to tier 0.
pub fn loads(tiers: &[Capacity]) -> Vec<f64> {
    let health: Vec<f64> = tiers.iter().map(Capacity::health).collect();
    let sum: f64 = health.iter().sum();
    let mut loads = vec![0.0; tiers.len()];
    if sum <= 0.0 {
        if let Some(first) = tiers.iter().position(|t| t.total > 0).or(Some(0)) {
            if let Some(l) = loads.get_mut(first) {
                *l = 1.0;
            }
        }
        return loads;
    }
    if sum < 1.0 {
        for (l, h) in loads.iter_mut().zip(&health) {
            *l = h / sum;
        }
        return loads;
    }
    let mut rest = 1.0;
    for (l, h) in loads.iter_mut().zip(&health) {
        *l = h.min(rest);
        rest -= *l;
    }
    loads
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cap(healthy: u64, total: u64) -> Capacity {
        Capacity { healthy, total }
    }

    fn close(a: &[f64], b: &[f64]) -> bool {
        a.len() == b.len() && a.iter().zip(b).all(|(x, y)| (x - y).abs() < 1e-9)
    }

    #[test]
    fn a_healthy_first_tier_takes_everything() {
        assert!(close(&loads(&[cap(4, 4), cap(4, 4)]), &[1.0, 0.0]));
        // 3 of 4 healthy: 1.4 × 75 % is still over 100 %.
        assert!(close(&loads(&[cap(3, 4), cap(4, 4)]), &[1.0, 0.0]));
    }

    #[test]
    fn partial_loss_spills_in_proportion() {
        // 2 of 4: 70 % stays, 30 % spills.
        assert!(close(&loads(&[cap(2, 4), cap(4, 4)]), &[0.7, 0.3]));
        // 1 of 4 in tier 0, tier 1 half healthy: 35 % + 65 % (tier 1 at 70 % is enough).
        assert!(close(&loads(&[cap(1, 4), cap(2, 4)]), &[0.35, 0.65]));
    }

    #[test]
    fn total_loss_moves_everything_and_recovery_moves_it_back() {
        assert!(close(&loads(&[cap(0, 4), cap(4, 4)]), &[0.0, 1.0]));
        assert!(close(&loads(&[cap(0, 0), cap(4, 4)]), &[0.0, 1.0]));
        assert!(close(&loads(&[cap(4, 4), cap(4, 4)]), &[1.0, 0.0]));
    }

    #[test]
    fn short_everywhere_is_normalised() {
        // 35 % + 35 %: half each.
        assert!(close(&loads(&[cap(1, 4), cap(1, 4)]), &[0.5, 0.5]));
        assert!(close(&loads(&[cap(0, 4), cap(0, 4)]), &[1.0, 0.0]));
        assert!(close(&loads(&[cap(0, 0), cap(0, 4)]), &[0.0, 1.0]));
        assert!(close(&loads(&[cap(2, 2)]), &[1.0]));
    }
}
