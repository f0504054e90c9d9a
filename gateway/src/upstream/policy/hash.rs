//! Consistent hashing (`balance: consistent_hash`): a Ketama ring from `pingora-ketama`, the
//! nginx-compatible continuum Pingora ships, over the Pods of one slot.
//!
//! What this file adds to the ring:
//! - Weights: each Pod gets `weight` buckets' worth of points (160 per unit). Weights are divided
//!   by their greatest common divisor first (a service's Pods all share one weight, so 10k Pods of
//!   weight 10 need the points of weight 1), and scaled down so that the ring stays below
//!   [`MAX_RING_WEIGHT`] units (memory and build time grow with the points).
//! - Addresses back to backends: the ring answers an address; a sorted table finds its backend.
//! - Unhealthy or already tried Pods: the walk goes on along the ring to the next Pod, so a key
//!   moves only while its Pod is out, and comes back after (no rebuild on health changes).
//!
//! Ring keys are the bytes named by `hash_on` (a header or cookie value, the client IP, the path).

use crate::upstream::balance::Backend;
use pingora_ketama::{Bucket, Continuum};

/// Most weight units a ring holds (160 points each, 8 bytes a point: 20k units = 25 MB). 10k
/// Pods of one weight take 10k units.
pub const MAX_RING_WEIGHT: u64 = 20_000;

/// How far along the ring a pick looks for a usable Pod before it gives up on the ring.
const MAX_WALK: usize = 64;

/// A Ketama ring over a fixed set of backends.
pub struct Ring {
    continuum: Continuum,
    /// The backends, sorted by address (the ring answers addresses).
    backends: Box<[Backend]>,
}

fn gcd(a: u64, b: u64) -> u64 {
    if b == 0 {
        a
    } else {
        gcd(b, a % b)
    }
}

impl Ring {
    /// A ring over `backends` (weights > 0). pingora-ketama numbers its nodes with 16 bits, so a
    /// ring takes at most 65,535 backends; more are left off (with a log line).
    pub fn new<'a>(backends: impl Iterator<Item = &'a Backend>) -> Ring {
        let mut backends: Vec<Backend> = backends.filter(|b| b.weight > 0).cloned().collect();
        backends.sort_by_key(|b| b.addr);
        backends.dedup_by_key(|b| b.addr);
        if backends.len() > usize::from(u16::MAX) {
            log::warn!(
                "consistent hash: {} backends, a ring takes {}; the rest get no hashed traffic",
                backends.len(),
                u16::MAX
            );
            backends.truncate(usize::from(u16::MAX));
        }
        let divisor = backends
            .iter()
            .fold(0, |g, b| gcd(g, u64::from(b.weight)))
            .max(1);
        let total: u64 = backends.iter().map(|b| u64::from(b.weight) / divisor).sum();
        // Scaled so the total stays within bounds; never below one unit per backend.
        let scale = (total as f64 / MAX_RING_WEIGHT as f64).max(1.0);
        let buckets: Vec<Bucket> = backends
            .iter()
            .map(|b| {
                let units = (u64::from(b.weight) / divisor) as f64 / scale;
                Bucket::new(b.addr, (units.round() as u32).max(1))
            })
            .collect();
        Ring {
            continuum: Continuum::new(&buckets),
            backends: backends.into_boxed_slice(),
        }
    }

    pub fn len(&self) -> usize {
        self.backends.len()
    }

    /// Whether the ring was built from the addresses and weights `selection` holds (then it
    /// needs no rebuilding, and keeps its backends' identities: health is shared anyway).
    pub fn same_as(&self, selection: &crate::upstream::balance::Selection) -> bool {
        if selection.len() != self.backends.len() {
            return false;
        }
        selection.iter().all(|b| {
            self.backends
                .binary_search_by(|x| x.addr.cmp(&b.addr))
                .is_ok_and(|i| self.backends[i].weight == b.weight)
        })
    }

    pub fn is_empty(&self) -> bool {
        self.backends.is_empty()
    }

    /// The backend for `key`: the first on the ring from the key's point that `skip` does not
    /// refuse. `None` when the ring is empty or every backend within reach is refused (the caller
    /// then falls back to another way of choosing).
    pub fn pick(&self, key: &[u8], skip: impl Fn(&Backend) -> bool) -> Option<&Backend> {
        let mut last = None;
        for addr in self.continuum.node_iter(key).take(MAX_WALK) {
            if last == Some(addr) {
                continue; // consecutive points of one Pod
            }
            last = Some(addr);
            let i = self.backends.binary_search_by(|b| b.addr.cmp(addr)).ok()?;
            let b = &self.backends[i];
            if !skip(b) {
                return Some(b);
            }
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::SocketAddr;
    use std::sync::Arc;

    fn backend(i: u32, weight: u32) -> Backend {
        Backend {
            addr: SocketAddr::from(([10, 1, (i >> 8) as u8, i as u8], 80)),
            weight,
            info: Arc::default(),
        }
    }

    fn owner(ring: &Ring, key: &str) -> SocketAddr {
        ring.pick(key.as_bytes(), |_| false).unwrap().addr
    }

    /// When one of 10 Pods leaves, only its keys move (about a tenth), and every other key stays.
    #[test]
    fn one_of_ten_leaving_moves_only_its_keys() {
        let all: Vec<Backend> = (0..10).map(|i| backend(i, 1)).collect();
        let before = Ring::new(all.iter());
        let gone = all[3].addr;
        let after = Ring::new(all.iter().filter(|b| b.addr != gone));
        let keys: Vec<String> = (0..20_000).map(|i| format!("user-{i}")).collect();
        let mut moved = 0;
        for k in &keys {
            let (a, b) = (owner(&before, k), owner(&after, k));
            if a != b {
                assert_eq!(a, gone, "key {k} moved although its Pod stayed");
                moved += 1;
            }
        }
        let fraction = moved as f64 / keys.len() as f64;
        assert!((0.05..0.15).contains(&fraction), "moved {fraction}");
    }

    #[test]
    fn weights_are_honoured() {
        let set = [backend(1, 1), backend(2, 3)];
        let ring = Ring::new(set.iter());
        let heavy = (0..20_000)
            .filter(|i| owner(&ring, &format!("k{i}")) == set[1].addr)
            .count();
        let share = heavy as f64 / 20_000.0;
        assert!((0.70..0.80).contains(&share), "weight 3 of 4 got {share}");
    }

    #[test]
    fn large_equal_weights_need_one_unit_each() {
        let set: Vec<Backend> = (0..3000).map(|i| backend(i, 40)).collect();
        let ring = Ring::new(set.iter());
        assert_eq!(ring.len(), 3000);
        assert!(ring.pick(b"x", |_| false).is_some());
    }

    #[test]
    fn refused_backends_pass_the_key_on_and_get_it_back() {
        let set: Vec<Backend> = (0..5).map(|i| backend(i, 1)).collect();
        let ring = Ring::new(set.iter());
        let home = owner(&ring, "k");
        let away = ring.pick(b"k", |b| b.addr == home).unwrap().addr;
        assert_ne!(home, away);
        assert_eq!(owner(&ring, "k"), home);
        assert!(ring.pick(b"k", |_| true).is_none());
        assert!(Ring::new([].iter()).pick(b"k", |_| false).is_none());
    }
}
