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
    pub health: Arc<crate::upstream::outlier::Health>,
    /// The EndpointSlice `zone` of the Pod.
    pub zone: Option<Arc<str>>,
    /// Whether it counts as local for zone-aware routing: in podgate's zone, or hinted for it
    /// (`hints.forZones`) when every endpoint of its tier carries hints.
    pub local: bool,
}

/// The backends of one service (or of an upstream's static nodes), built once and then shared
/// by every selection until that service changes: a rebuild after one Pod moved copies one
/// pointer per service, not one backend per Pod, and touches no backend's reference count.
#[derive(Debug, Default)]
pub struct Segment {
    /// Sorted by weight (descending), then address; no zero weights, no address twice.
    backends: Box<[Backend]>,
    /// Each run of equal weight in `backends`.
    runs: Vec<Run>,
}

#[derive(Debug, Clone, Copy)]
struct Run {
    weight: u32,
    start: usize,
    len: usize,
}

impl Segment {
    /// Sorts `backends`; drops those with weight 0 (they could never be picked) and repeated
    /// addresses (the first in weight-then-address order stays).
    pub fn new(mut backends: Vec<Backend>) -> Arc<Segment> {
        backends.retain(|b| b.weight > 0);
        backends.sort_by(|a, b| a.addr.cmp(&b.addr).then(b.weight.cmp(&a.weight)));
        backends.dedup_by(|later, first| later.addr == first.addr);
        // Already in order when every backend has one weight, as a service's do.
        backends.sort_by(|a, b| b.weight.cmp(&a.weight).then(a.addr.cmp(&b.addr)));
        let mut runs: Vec<Run> = Vec::new();
        for (i, b) in backends.iter().enumerate() {
            match runs.last_mut() {
                Some(r) if r.weight == b.weight => r.len += 1,
                _ => runs.push(Run {
                    weight: b.weight,
                    start: i,
                    len: 1,
                }),
            }
        }
        Arc::new(Segment {
            backends: backends.into_boxed_slice(),
            runs,
        })
    }

    pub fn backends(&self) -> &[Backend] {
        &self.backends
    }

    /// The backends in address order, when they are (every backend of one weight: a service's
    /// are unless some ramp up).
    pub fn by_address(&self) -> Option<&[Backend]> {
        (self.runs.len() <= 1).then_some(&*self.backends)
    }

    /// The backend at `addr`: a binary search in each run.
    pub fn find(&self, addr: &SocketAddr) -> Option<&Backend> {
        self.runs.iter().find_map(|r| {
            let members = &self.backends[r.start..r.start + r.len];
            members
                .binary_search_by(|b| b.addr.cmp(addr))
                .ok()
                .map(|i| &members[i])
        })
    }
}

/// An immutable set of backends ready for picking: segments, and the weight classes their runs
/// fall into.
#[derive(Debug, Default)]
pub struct Selection {
    segments: Vec<Arc<Segment>>,
    /// By weight, descending.
    classes: Vec<Class>,
    len: usize,
}

/// The members of one weight: runs of segments, one after the other.
#[derive(Debug, Clone)]
struct Class {
    weight: u32,
    len: usize,
    parts: Vec<Part>,
}

/// One run of one segment within a class; its members are the class's members `offset..`.
#[derive(Debug, Clone, Copy)]
struct Part {
    segment: usize,
    run: Run,
    offset: usize,
}

impl Class {
    fn total(&self) -> i64 {
        i64::from(self.weight) * self.len as i64
    }
}

impl Selection {
    /// A selection of one segment: `backends` sorted, without weight 0 or repeated addresses.
    pub fn new(backends: Vec<Backend>) -> Self {
        Self::from_segments(vec![Segment::new(backends)])
    }

    /// A selection of `segments`, in O(segments + runs). No address may be in two segments (it
    /// would get the share of two backends); whoever cannot rule that out merges the segments
    /// with [`Selection::new`].
    pub fn from_segments(segments: Vec<Arc<Segment>>) -> Self {
        let mut classes: Vec<Class> = Vec::new();
        for (index, segment) in segments.iter().enumerate() {
            for run in &segment.runs {
                let class = match classes.iter().position(|c| c.weight == run.weight) {
                    Some(c) => c,
                    None => {
                        classes.push(Class {
                            weight: run.weight,
                            len: 0,
                            parts: Vec::new(),
                        });
                        classes.len() - 1
                    }
                };
                let class = &mut classes[class];
                class.parts.push(Part {
                    segment: index,
                    run: *run,
                    offset: class.len,
                });
                class.len += run.len;
            }
        }
        classes.sort_by_key(|c| std::cmp::Reverse(c.weight));
        let len = classes.iter().map(|c| c.len).sum();
        Selection {
            segments,
            classes,
            len,
        }
    }

    /// Member `i` of class `class`. `hint` is the part it was in last time: a rotation moves
    /// through a class member by member, so that part or the next is usually the one.
    fn member(&self, class: usize, i: usize, hint: &mut usize) -> &Backend {
        let parts = &self.classes[class].parts;
        let holds = |p: usize| {
            parts
                .get(p)
                .is_some_and(|p| p.offset <= i && i < p.offset + p.run.len)
        };
        let p = if holds(*hint) {
            *hint
        } else if holds(*hint + 1) {
            *hint + 1
        } else {
            parts.partition_point(|p| p.offset <= i) - 1
        };
        *hint = p;
        let part = &parts[p];
        &self.segments[part.segment].backends[part.run.start + i - part.offset]
    }

    /// Where `addr` is in class `class`, if it is there.
    fn position(&self, class: usize, addr: &SocketAddr) -> Option<usize> {
        self.classes[class].parts.iter().find_map(|p| {
            let members = &self.segments[p.segment].backends[p.run.start..p.run.start + p.run.len];
            members
                .binary_search_by(|b| b.addr.cmp(addr))
                .ok()
                .map(|i| p.offset + i)
        })
    }

    /// The backend at `addr`.
    pub fn find(&self, addr: &SocketAddr) -> Option<&Backend> {
        self.segments.iter().find_map(|s| s.find(addr))
    }

    /// Every backend: by weight (descending), then segment by segment in address order.
    pub fn iter(&self) -> impl Iterator<Item = &Backend> {
        self.classes.iter().flat_map(move |c| {
            c.parts.iter().flat_map(move |p| {
                &self.segments[p.segment].backends[p.run.start..p.run.start + p.run.len]
            })
        })
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The sum of all weights.
    pub fn total_weight(&self) -> u64 {
        self.classes.iter().map(|c| c.total() as u64).sum()
    }

    /// The backend a point `r` in `0..total_weight()` falls on, each backend owning a stretch as
    /// long as its weight: a uniform `r` picks backends in proportion to their weights. O(weight
    /// classes + log parts). `None` only on an empty selection.
    pub fn at_weight(&self, r: u64) -> Option<&Backend> {
        let mut r = r % self.total_weight().max(1);
        for (ci, c) in self.classes.iter().enumerate() {
            let total = c.total() as u64;
            if r < total {
                let i = (r / u64::from(c.weight)) as usize;
                let mut hint = c.parts.partition_point(|p| p.offset <= i).saturating_sub(1);
                return Some(self.member(ci, i, &mut hint));
            }
            r -= total;
        }
        None
    }

    /// The segments it was made of.
    pub fn segments(&self) -> &[Arc<Segment>] {
        &self.segments
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
    static ROTATIONS: RefCell<super::PodMap<u64, Rotation>> = RefCell::new(Default::default());
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

    /// Runs `f` on the current selection without taking a reference count (request path).
    pub fn with_selection<T>(&self, f: impl FnOnce(&Selection) -> T) -> T {
        f(&self.current.load())
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
            // One lap of the rotation as long as the set has backends: usually the first pick
            // is taken.
            let lap = rot.selection.len();
            for _ in 0..lap {
                let (class, i) = rot.next();
                let backend = rot.selection.member(class, i, &mut rot.part[class]);
                if !skip(backend) {
                    return Some(backend.clone());
                }
            }
            // With unequal weights a lap can land on the same refused backend each time
            // (weights 100:1 pick the heavy one ~100 times in a row): look through the whole set
            // for one `skip` lets through, heaviest first; better a refused one than none.
            let selection = &rot.selection;
            let found = selection.iter().find(|b| !skip(b));
            found.or_else(|| selection.iter().next()).cloned()
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
    /// The part of each class its cursor was last found in (see `Selection::member`).
    part: Vec<usize>,
    total: i64,
}

impl Rotation {
    fn empty() -> Self {
        Rotation {
            selection: Arc::new(Selection::default()),
            current: Vec::new(),
            cursor: Vec::new(),
            part: Vec::new(),
            total: 0,
        }
    }

    /// Adopts a new selection, keeping each class's standing and each rotation's place.
    fn follow(&mut self, next: Arc<Selection>) {
        let old = std::mem::replace(&mut self.selection, next);
        let new = &self.selection;
        let mut current = Vec::with_capacity(new.classes.len());
        let mut cursor = Vec::with_capacity(new.classes.len());
        for (ci, class) in new.classes.iter().enumerate() {
            let before = old.classes.iter().position(|c| c.weight == class.weight);
            let (cur, pos) = match before {
                Some(i) if i < self.current.len() => {
                    let oc = &old.classes[i];
                    // The member that was due next keeps its turn if it is still there; else
                    // the rotation goes on from the same place (one Pod more or less before it
                    // shifts it by one at most).
                    let cursor = self.cursor[i] % oc.len;
                    let due = old.member(i, cursor, &mut 0).addr;
                    let pos = new.position(ci, &due).unwrap_or(cursor % class.len);
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
        self.part = vec![0; self.cursor.len()];
    }

    /// Class and member of the next pick. The selection must not be empty.
    fn next(&mut self) -> (usize, usize) {
        let classes = &self.selection.classes;
        let mut best = 0;
        for (i, c) in classes.iter().enumerate() {
            self.current[i] += c.total();
            if self.current[i] > self.current[best] {
                best = i;
            }
        }
        self.current[best] -= self.total;
        let member = self.cursor[best];
        self.cursor[best] = (member + 1) % classes[best].len;
        (best, member)
    }
}

#[cfg(test)]
mod tests;
