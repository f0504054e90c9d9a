//! Smooth weighted round robin over an upstream's backends.
//!
//! The contract (nginx's smooth WRR): over any window of `sum(weights)` picks on a stable set, each
//! backend is picked its weight ±1 times, and picks interleave (weights 1,2,1 give a,b,c,b — never
//! a block of the same backend). Pingora's `Weighted<RoundRobin>` picks in blocks, hence this file.
//!
//! How it stays cheap with 10k Pods: every Pod of one service carries that service's weight, so the
//! backends fall into a few *weight classes* (at most 100, as weights are 1..=100). nginx's
//! algorithm runs over the classes (class weight = weight × members) and a plain rotation runs
//! inside each class. Each member of a class then gets `weight` picks per round, spread evenly: the
//! same guarantee as nginx's algorithm over the individual backends, at O(classes) per pick
//! instead of O(backends).
//!
//! How it stays lock-free: a [`Selection`] is immutable and swapped atomically; the mutable
//! rotation state lives in each worker thread (as in Envoy's per-worker load balancers and nginx's
//! per-process state). When a thread sees a new selection it carries its rotation over, so
//! backends that stay keep their turn and a change does not restart at the first backend.

use arc_swap::ArcSwap;
use std::cell::RefCell;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

/// Where traffic can go, with what it is known as (for logs and the admin view).
#[derive(Clone, Debug)]
pub struct Backend {
    pub addr: SocketAddr,
    /// 1..=100.
    pub weight: u32,
    /// Names and health behind one `Arc`: a rebuild copies every backend of the upstream into
    /// the new selection, and a pick hands one out, each at the cost of one reference count.
    pub info: Arc<BackendInfo>,
}

/// What a [`Backend`] is known as, and its health.
#[derive(Debug, Default)]
pub struct BackendInfo {
    /// The cluster it was discovered in; `None` for a static node.
    pub cluster: Option<Arc<str>>,
    pub pod: Option<Arc<str>>,
    /// Its failure record, shared by every selection it appears in.
    pub health: Arc<crate::outlier::Health>,
}

/// An immutable set of backends ready for picking.
#[derive(Debug, Default)]
pub struct Selection {
    /// Sorted by weight (descending), then address: each weight class is a contiguous range.
    backends: Vec<Backend>,
    classes: Vec<Class>,
}

#[derive(Debug, Clone)]
struct Class {
    weight: u32,
    start: usize,
    len: usize,
}

impl Class {
    fn total(&self) -> i64 {
        i64::from(self.weight) * self.len as i64
    }
}

impl Selection {
    /// Builds a selection; backends with weight 0 are dropped (they could never be picked).
    pub fn new(mut backends: Vec<Backend>) -> Self {
        backends.retain(|b| b.weight > 0);
        backends.sort_by(|a, b| b.weight.cmp(&a.weight).then(a.addr.cmp(&b.addr)));
        backends.dedup_by(|a, b| a.addr == b.addr);
        let mut classes: Vec<Class> = Vec::new();
        for (i, b) in backends.iter().enumerate() {
            match classes.last_mut() {
                Some(c) if c.weight == b.weight => c.len += 1,
                _ => classes.push(Class {
                    weight: b.weight,
                    start: i,
                    len: 1,
                }),
            }
        }
        Selection { backends, classes }
    }

    /// The backend at `addr`: a binary search in each weight class.
    pub fn find(&self, addr: &SocketAddr) -> Option<&Backend> {
        self.classes.iter().find_map(|c| {
            let members = &self.backends[c.start..c.start + c.len];
            members
                .binary_search_by(|b| b.addr.cmp(addr))
                .ok()
                .map(|i| &members[i])
        })
    }

    pub fn backends(&self) -> &[Backend] {
        &self.backends
    }

    pub fn is_empty(&self) -> bool {
        self.backends.is_empty()
    }
}

/// A selection that can be swapped while requests pick from it.
pub struct Balancer {
    /// Distinguishes this balancer's rotation state in each thread.
    id: u64,
    current: ArcSwap<Selection>,
}

static NEXT_ID: AtomicU64 = AtomicU64::new(1);

thread_local! {
    static ROTATIONS: RefCell<HashMap<u64, Rotation>> = RefCell::new(HashMap::new());
}

impl Default for Balancer {
    fn default() -> Self {
        Self::new(Selection::default())
    }
}

impl Balancer {
    pub fn new(selection: Selection) -> Self {
        Balancer {
            id: NEXT_ID.fetch_add(1, Ordering::Relaxed),
            current: ArcSwap::from_pointee(selection),
        }
    }

    /// Makes `selection` live for every later pick.
    pub fn swap(&self, selection: Selection) {
        self.current.store(Arc::new(selection));
    }

    pub fn selection(&self) -> Arc<Selection> {
        self.current.load_full()
    }

    /// The next backend in smooth weighted order, passing over those `skip` refuses (already
    /// tried, ejected) as long as another one exists. `None` only when there is no backend at all.
    pub fn pick(&self, skip: impl Fn(&Backend) -> bool) -> Option<Backend> {
        let guard = self.current.load();
        if guard.is_empty() {
            return None;
        }
        ROTATIONS.with(|cell| {
            let mut map = cell.borrow_mut();
            let rot = map.entry(self.id).or_insert_with(Rotation::empty);
            if !Arc::ptr_eq(&rot.selection, &guard) {
                rot.follow(arc_swap::Guard::into_inner(guard));
            }
            let mut idx = rot.next();
            // Stop after one full lap of distinct choices: better a refused one than none.
            for _ in 0..rot.selection.backends.len() {
                if !skip(&rot.selection.backends[idx]) {
                    break;
                }
                idx = rot.next();
            }
            Some(rot.selection.backends[idx].clone())
        })
    }
}

impl Drop for Balancer {
    fn drop(&mut self) {
        // Only this thread's entry can be reached; others hold a small stale entry until their
        // thread ends. Balancers are replaced rarely (config reloads), so this stays bounded.
        let _ = ROTATIONS.try_with(|cell| {
            if let Ok(mut m) = cell.try_borrow_mut() {
                m.remove(&self.id);
            }
        });
    }
}

/// One thread's position in the smooth rotation of one balancer.
struct Rotation {
    selection: Arc<Selection>,
    /// nginx's `current_weight`, per class.
    current: Vec<i64>,
    /// Next member to hand out, per class.
    cursor: Vec<usize>,
    total: i64,
}

impl Rotation {
    fn empty() -> Self {
        Rotation {
            selection: Arc::new(Selection::default()),
            current: Vec::new(),
            cursor: Vec::new(),
            total: 0,
        }
    }

    /// Adopts a new selection, keeping each class's standing and each rotation's place.
    fn follow(&mut self, next: Arc<Selection>) {
        let old = std::mem::replace(&mut self.selection, next);
        let new = &self.selection;
        let mut current = Vec::with_capacity(new.classes.len());
        let mut cursor = Vec::with_capacity(new.classes.len());
        for class in &new.classes {
            let before = old.classes.iter().position(|c| c.weight == class.weight);
            let (cur, pos) = match before {
                Some(i) if i < self.current.len() => {
                    let oc = &old.classes[i];
                    // The member that was due next keeps its turn if it is still there; else the
                    // first member after it in address order.
                    let due = old.backends[oc.start + self.cursor[i] % oc.len].addr;
                    let members = &new.backends[class.start..class.start + class.len];
                    let pos = members.partition_point(|b| b.addr < due) % class.len;
                    (self.current[i], pos)
                }
                _ => (0, 0),
            };
            current.push(cur);
            cursor.push(pos);
        }
        // nginx's invariant is that the current weights sum to zero after each pick; classes that
        // came or went break it, so re-centre to keep the next picks fair.
        if !current.is_empty() {
            let mean = current.iter().sum::<i64>() / current.len() as i64;
            current.iter_mut().for_each(|c| *c -= mean);
        }
        self.total = new.classes.iter().map(Class::total).sum();
        self.current = current;
        self.cursor = cursor;
    }

    /// Index into `selection.backends` of the next pick. The selection must not be empty.
    fn next(&mut self) -> usize {
        let classes = &self.selection.classes;
        let mut best = 0;
        for (i, c) in classes.iter().enumerate() {
            self.current[i] += c.total();
            if self.current[i] > self.current[best] {
                best = i;
            }
        }
        self.current[best] -= self.total;
        let class = &classes[best];
        let member = self.cursor[best];
        self.cursor[best] = (member + 1) % class.len;
        class.start + member
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn backend(last: u8, weight: u32) -> Backend {
        Backend {
            addr: SocketAddr::from(([10, 0, 0, last], 80)),
            weight,
            info: Default::default(),
        }
    }

    #[test]
    fn find_looks_in_every_weight_class() {
        let s = Selection::new(vec![
            backend(9, 1),
            backend(3, 5),
            backend(7, 1),
            backend(1, 5),
            backend(5, 2),
        ]);
        for (last, weight) in [(1, 5), (3, 5), (5, 2), (7, 1), (9, 1)] {
            let addr = SocketAddr::from(([10, 0, 0, last], 80));
            assert_eq!(s.find(&addr).map(|b| b.weight), Some(weight), "{addr}");
        }
        assert!(s.find(&SocketAddr::from(([10, 0, 0, 4], 80))).is_none());
        assert!(Selection::default()
            .find(&SocketAddr::from(([10, 0, 0, 1], 80)))
            .is_none());
    }

    fn picks(b: &Balancer, n: usize) -> Vec<u8> {
        (0..n)
            .map(|_| match b.pick(|_| false).unwrap().addr.ip() {
                std::net::IpAddr::V4(v4) => v4.octets()[3],
                _ => unreachable!(),
            })
            .collect()
    }

    #[test]
    fn interleaves_instead_of_blocks() {
        let b = Balancer::new(Selection::new(vec![
            backend(1, 1),
            backend(2, 2),
            backend(3, 1),
        ]));
        let seq = picks(&b, 8);
        assert_eq!(seq, vec![2, 1, 2, 3, 2, 1, 2, 3]);
    }

    /// Over every window of sum(weights) consecutive picks each backend gets its weight ±1.
    #[test]
    fn every_window_is_fair() {
        let cases: &[&[u32]] = &[
            &[1, 2, 1],
            &[5, 1, 1],
            &[10, 20, 30],
            &[3, 3, 7, 7, 7, 1],
            &[100, 1],
            &[2, 3, 5, 7, 11, 13],
            &[1; 9],
        ];
        for weights in cases {
            let set: Vec<Backend> = weights
                .iter()
                .enumerate()
                .map(|(i, w)| backend(i as u8 + 1, *w))
                .collect();
            let b = Balancer::new(Selection::new(set));
            let total: u32 = weights.iter().sum();
            let seq = picks(&b, total as usize * 4);
            for window in seq.windows(total as usize) {
                for (i, w) in weights.iter().enumerate() {
                    let got = window.iter().filter(|x| **x == i as u8 + 1).count() as i64;
                    assert!(
                        (got - i64::from(*w)).abs() <= 1,
                        "weights {weights:?}: backend {i} got {got} in window {window:?}"
                    );
                }
            }
        }
    }

    #[test]
    fn rotation_continues_across_a_change() {
        let set = |lasts: &[u8]| Selection::new(lasts.iter().map(|l| backend(*l, 1)).collect());
        let b = Balancer::new(set(&[1, 2, 3]));
        assert_eq!(picks(&b, 2), vec![1, 2]);
        b.swap(set(&[1, 2, 3, 4]));
        assert_eq!(picks(&b, 3), vec![3, 4, 1], "3 was due, not a restart at 1");
        b.swap(set(&[1, 3, 4])); // 2 leaves; 2 was due next
        assert_eq!(picks(&b, 2), vec![3, 4]);
    }

    #[test]
    fn retries_skip_tried_backends() {
        let b = Balancer::new(Selection::new(vec![backend(1, 1), backend(2, 1)]));
        let first = b.pick(|_| false).unwrap();
        let second = b.pick(|b| b.addr == first.addr).unwrap();
        assert_ne!(first.addr, second.addr);
        // With everything excluded there is still an answer (better a retry than none).
        assert!(b.pick(|_| true).is_some());
    }

    #[test]
    fn empty_and_zero_weights() {
        let b = Balancer::new(Selection::new(vec![backend(1, 0)]));
        assert!(b.pick(|_| false).is_none());
        let b = Balancer::default();
        assert!(b.pick(|_| false).is_none());
    }
}
