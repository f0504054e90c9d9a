//! Least request (`balance: least_request`): the power of two choices over weighted Pods, as
//! Envoy's least-request balancer does it.
//!
//! Two Pods are drawn at random, each with probability proportional to its weight (the second
//! drawn again, up to three times, while it is the first), and the one with fewer requests in
//! flight per unit of weight gets the request; on a tie, the first. That avoids a slow Pod
//! (its requests pile up) without the herd effect of always choosing the global minimum, and
//! costs two draws and two atomic loads, whatever the number of Pods.
//!
//! In-flight counts live in each endpoint's `Health` (they survive endpoint-set updates); an
//! [`InFlight`] guard counts a request from the pick until the attempt ends, whichever way.

use crate::upstream::balance::{Backend, Selection};
use crate::upstream::outlier::Health;
use std::cell::Cell;
use std::sync::atomic::Ordering;
use std::sync::Arc;

/// Counts one request on an endpoint while it lives.
#[derive(Debug)]
pub struct InFlight(Arc<Health>);

impl InFlight {
    pub fn start(backend: &Backend) -> InFlight {
        backend
            .info
            .health
            .in_flight
            .fetch_add(1, Ordering::Relaxed);
        InFlight(backend.info.health.clone())
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

thread_local! {
    static RNG: Cell<u64> = Cell::new({
        // Different per thread; quality needs are modest (spreading picks), speed matters.
        let local = 0u8;
        let seed = (&local as *const u8 as u64) ^ (std::process::id() as u64) << 32;
        seed | 1
    });
}

/// A fast per-thread random number (xorshift64*).
pub fn random() -> u64 {
    RNG.with(|c| {
        let mut x = c.get();
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        c.set(x);
        x.wrapping_mul(0x2545_f491_4f6c_dd1d)
    })
}

/// Whether `a` is less loaded than `b`: fewer in flight per weight (cross-multiplied).
fn lighter(a: &Backend, b: &Backend) -> bool {
    let load = |x: &Backend| u64::from(x.info.health.in_flight.load(Ordering::Relaxed));
    load(a) * u64::from(b.weight) < load(b) * u64::from(a.weight)
}

/// The lighter of two weighted random draws from `selection`, passing over those `skip`
/// refuses. `None` when both draws are refused (or the selection is empty): the caller falls
/// back to a walk that finds a usable one if any exists.
pub fn pick(selection: &Selection, skip: impl Fn(&Backend) -> bool) -> Option<&Backend> {
    let total = selection.total_weight();
    if total == 0 {
        return None;
    }
    let a = selection.at_weight(random() % total)?;
    // Two different Pods when there are two: drawing the same one twice would hand a slow Pod
    // (of N) 1/N² of the picks whatever its load, a share large enough to show in the p99.
    let mut b = selection.at_weight(random() % total)?;
    for _ in 0..3 {
        if b.addr != a.addr || selection.len() < 2 {
            break;
        }
        b = selection.at_weight(random() % total)?;
    }
    match (skip(a), skip(b)) {
        (false, false) => Some(if lighter(b, a) { b } else { a }),
        (false, true) => Some(a),
        (true, false) => Some(b),
        (true, true) => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::SocketAddr;

    fn backend(last: u8, weight: u32) -> Backend {
        Backend {
            addr: SocketAddr::from(([10, 0, 0, last], 80)),
            weight,
            info: Arc::default(),
        }
    }

    #[test]
    fn a_busy_pod_gets_fewer_picks() {
        let set = vec![backend(1, 1), backend(2, 1), backend(3, 1)];
        let s = Selection::new(set);
        let busy = s
            .find(&SocketAddr::from(([10, 0, 0, 1], 80)))
            .unwrap()
            .clone();
        let _held: Vec<InFlight> = (0..5).map(|_| InFlight::start(&busy)).collect();
        let hits = (0..3000)
            .filter(|_| pick(&s, |_| false).unwrap().addr == busy.addr)
            .count();
        // Chosen only when drawn twice: about 1/9 of picks.
        assert!(hits < 3000 / 6, "busy Pod got {hits} of 3000");
        drop(_held);
        assert_eq!(busy.info.health.in_flight.load(Ordering::Relaxed), 0);
    }

    #[test]
    fn idle_pods_are_picked_by_weight() {
        let s = Selection::new(vec![backend(1, 1), backend(2, 3)]);
        let heavy = (0..8000)
            .filter(|_| pick(&s, |_| false).unwrap().weight == 3)
            .count();
        // Two draws, ties go to the first: weight 3 of 4 wins when either draw is it... with
        // equal (zero) load the first draw stands, so the share is the weight share.
        let share = heavy as f64 / 8000.0;
        assert!((0.70..0.80).contains(&share), "{share}");
    }

    #[test]
    fn refused_draws_are_passed_over() {
        let s = Selection::new(vec![backend(1, 1), backend(2, 1)]);
        for _ in 0..100 {
            if let Some(b) = pick(&s, |b| b.addr.ip().to_string() == "10.0.0.1") {
                assert_eq!(b.addr.ip().to_string(), "10.0.0.2");
            }
        }
        assert!(pick(&Selection::default(), |_| false).is_none());
    }
}
