//! Consistent hashing (`balance: consistent_hash`): a Ketama ring from `pingora-ketama`, the
//! nginx-compatible continuum Pingora ships, over the Pods of one slot.
//!
//! What this file adds to the ring:
//! - Weights: each Pod gets `weight` buckets' worth of points (nginx's 160 per unit). Weights are
//!   divided by their greatest common divisor first (a service's Pods all share one weight, so 10k
//!   Pods of weight 10 need the points of weight 1), and scaled down so that the ring stays below
//!   [`MAX_RING_WEIGHT`] units (memory and build time grow with the points).
//! - A faster search in front of the ring. Measured with `benches/policies.rs` at 10,000 Pods
//!   (3.7 M points): a pick through `Continuum::node_iter` took 698 ns against 88 ns for round
//!   robin, 208 ns at 1,000 Pods (160 K points). The time went to the continuum's binary search
//!   over 8-byte points (22 dependent, mostly missed cache lines at 3.7 M points) and to a second
//!   binary search from the address it answers back to our backend. Fewer points (its `v2`
//!   feature, 8 per unit) still took 299 ns and costs evenness. So, once per ring, `points`:
//!   each ring position's owner (backend index), read off the continuum's own walk
//!   (`Continuum::get_addr`), so the continuum decides which Pod owns each point, next to the
//!   point's hash, computed the way Ketama defines it (crc32 of `ip\0port`, chained over the
//!   previous point's hash) and sorted; and a small table from the top bits of a hash to its
//!   first position (~64 points a run). A key's position is then a table read (mostly cached),
//!   an interpolated guess within the run and a step or two to the exact point: O(1), and the
//!   point's line also holds its owner. A first version with separate arrays for hashes, owners
//!   and a 4-points-a-run table spent its time on three cache misses per pick (perf: 43 % on
//!   the table read, 54 % on the hash compare). Two more misses went later: the Pod's health
//!   record is read only while some Pod fails its active checks (`Upstream::pick`), and the
//!   points sit on 2 MiB pages (`huge_pages`). Measured after both: 117–139 ns against 76–82 ns
//!   for round robin (1.43–1.83×).
//!
//!   The index is only used after it is checked against the continuum: the same number of points,
//!   the same owner at every position (the walk), and the same position for sample keys
//!   (`Continuum::node_idx`). If a future pingora-ketama placed points differently the check
//!   fails, a warning is logged and picks go through `Continuum::node_idx` again (slower, still
//!   right). Either way, which key goes to which Pod is the continuum's answer: same key, same
//!   Pod as nginx's ring; one of N Pods leaving moves only its keys.
//! - Unhealthy or already tried Pods: the walk goes on along the ring to the next Pod, so a key
//!   moves only while its Pod is out, and comes back after (no rebuild on health changes).
//!
//! Ring keys are the bytes named by `hash_on` (a header or cookie value, the client IP, the path).

use crate::upstream::balance::Backend;
use pingora_ketama::{Bucket, Continuum, DEFAULT_POINT_MULTIPLE};
use std::io::Write;
use std::net::SocketAddr;

/// Most weight units a ring holds (160 points each, 8 bytes a point: 20k units = 25 MB). 10k
/// Pods of one weight take 10k units.
pub const MAX_RING_WEIGHT: u64 = 20_000;

/// How far along the ring a pick looks for a usable Pod before it gives up on the ring.
const MAX_WALK: usize = 64;

/// Keys whose positions the index must agree on with the continuum before it is used.
const CHECKED_KEYS: u32 = 256;

/// A Ketama ring over a fixed set of backends.
pub struct Ring {
    /// The backends, sorted by address.
    backends: Box<[Backend]>,
    /// The ring in position order: each point's hash (when indexed) and owner, side by side so
    /// that finding a key's position and its Pod touch the same cache line.
    points: Box<[Point]>,
    search: Search,
}

/// One point of the ring.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Point {
    /// Its Ketama hash (0 when the ring is not indexed: then unused).
    hash: u32,
    /// Index into `Ring::backends`: the continuum's owner of the point.
    owner: u32,
}

/// How a key finds its ring position.
enum Search {
    /// The checked index over the point hashes.
    Index(Index),
    /// The continuum's own binary search (the index did not match it).
    Continuum(Continuum),
}

/// Where each run of point hashes with the same top bits starts: about 64 points a run, so the
/// table is 1/16 of the ring's size (230 KB at 3.7 M points) and mostly stays in cache.
struct Index {
    /// `starts[b]`: the first position whose hash is at least `b << shift`; one more entry at
    /// the end (the number of points).
    starts: Box<[u32]>,
    shift: u32,
}

impl Index {
    /// The points' hashes as Ketama makes them, sorted and without repeats (the continuum keeps
    /// one point per hash value), each as `hash << 16 | backend that made it` (a hint for
    /// [`owners`]), and the table over them. `None` when the ring would not fit 32-bit
    /// positions.
    fn new(addrs: &[SocketAddr], units: &[u32]) -> Option<(Index, Vec<u64>)> {
        let total: u64 =
            units.iter().map(|u| u64::from(*u)).sum::<u64>() * u64::from(DEFAULT_POINT_MULTIPLE);
        if total >= u64::from(u32::MAX) || addrs.len() > usize::from(u16::MAX) {
            return None;
        }
        // hash << 16 | backend: sorted by hash, and the backend rides along.
        let mut points: Vec<u64> = Vec::with_capacity(total as usize);
        let mut name = Vec::with_capacity(48);
        for (node, (addr, units)) in addrs.iter().zip(units).enumerate() {
            name.clear();
            // Ketama's (and nginx's) point seed: "HOST\0PORT", then each point's crc32 chained
            // over the previous point's hash, little-endian.
            let _ = write!(name, "{}\0{}", addr.ip(), addr.port());
            let mut seed = crc32fast::Hasher::new();
            seed.update(&name);
            let mut prev: u32 = 0;
            for _ in 0..units * DEFAULT_POINT_MULTIPLE {
                let mut h = seed.clone();
                h.update(&prev.to_le_bytes());
                prev = h.finalize();
                points.push(u64::from(prev) << 16 | node as u64);
            }
        }
        radix_sort(&mut points);
        points.dedup_by_key(|p| *p >> 16);
        let n = points.len();
        // About 32 to 64 points per table entry.
        let bits = (usize::BITS - n.max(2).leading_zeros())
            .saturating_sub(6)
            .clamp(1, 24);
        let shift = 32 - bits;
        let mut starts = Vec::with_capacity((1usize << bits) + 1);
        let mut i = 0usize;
        for b in 0..(1u64 << bits) {
            let low = b << shift;
            while i < n && points[i] >> 16 < low {
                i += 1;
            }
            starts.push(i as u32);
        }
        starts.push(n as u32);
        let index = Index {
            starts: starts.into_boxed_slice(),
            shift,
        };
        Some((index, points))
    }

    /// The first position whose hash is at least `hash`, wrapping to 0 past the last: what
    /// `Continuum::node_idx` answers. Within its run of the table, the position is first guessed
    /// by interpolation (Ketama hashes are CRC-32s, spread evenly), then corrected by stepping
    /// over the few hashes in between: one or two cache lines of `points`.
    fn position(&self, hash: u32, points: &[Point]) -> usize {
        let b = (hash >> self.shift) as usize;
        let (Some(&lo), Some(&hi)) = (self.starts.get(b), self.starts.get(b + 1)) else {
            return 0;
        };
        let (lo, hi) = (lo as usize, hi as usize);
        let offset = u64::from(hash) - ((b as u64) << self.shift);
        let mut at = lo + ((offset * (hi - lo) as u64) >> self.shift) as usize;
        let below = |i: usize| points.get(i).is_some_and(|p| p.hash < hash);
        if at < hi && below(at) {
            while at < hi && below(at) {
                at += 1;
            }
        } else {
            while at > lo && !below(at - 1) {
                at -= 1;
            }
        }
        if at >= points.len() {
            0
        } else {
            at
        }
    }
}

/// LSD radix sort by the hash bits (16..48) of each point, 4 passes of 8 bits, stable: a
/// 3.7 M-point ring sorts in a fraction of `sort_unstable`'s time (the rebuild runs on the
/// discovery thread).
fn radix_sort(v: &mut Vec<u64>) {
    let mut other = vec![0u64; v.len()];
    for pass in 0..4 {
        let shift = 16 + pass * 8;
        let mut counts = [0usize; 257];
        for x in v.iter() {
            counts[((x >> shift) & 0xff) as usize + 1] += 1;
        }
        for d in 0..256 {
            counts[d + 1] += counts[d];
        }
        for x in v.iter() {
            let d = ((x >> shift) & 0xff) as usize;
            other[counts[d]] = *x;
            counts[d] += 1;
        }
        std::mem::swap(v, &mut other);
    }
}

/// An empty vector with room for `n` items whose memory the kernel is asked to back with 2 MiB
/// pages (`MADV_HUGEPAGE`), for the ring's points. At 10,000 Pods the ring is about 25 MB read
/// at random, one 4 KiB page per pick, far past what the TLB covers: every pick paid a page
/// walk. Measured with `benches/policies.rs` (hash pick, 10k endpoints): 127 to 156 ns with
/// 4 KiB pages, 105 to 135 ns with 2 MiB ones over the same runs. Small rings (under 4 MiB) are
/// left alone; so is a kernel that refuses (THP off): only the pages change, never the contents.
fn huge_pages<T>(n: usize) -> Vec<T> {
    const HUGE: usize = 2 << 20;
    let v: Vec<T> = Vec::with_capacity(n);
    let bytes = n.saturating_mul(std::mem::size_of::<T>());
    if bytes >= 2 * HUGE {
        let start = v.as_ptr() as usize;
        let end = start + bytes;
        // The whole 2 MiB pages inside the allocation; the advice must not reach memory that
        // is not ours.
        let (from, to) = ((start + HUGE - 1) & !(HUGE - 1), end & !(HUGE - 1));
        if to > from {
            // SAFETY: madvise only hints how to back the range; [from, to) lies inside the
            // vector's allocation, which nothing has written yet, and contents are unchanged.
            unsafe { libc::madvise(from as *mut libc::c_void, to - from, libc::MADV_HUGEPAGE) };
        }
    }
    v
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
        Ring::build(backends, true)
    }

    /// `index: false` skips the index (tests of the fallback).
    fn build<'a>(backends: impl Iterator<Item = &'a Backend>, index: bool) -> Ring {
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
        let units: Vec<u32> = backends
            .iter()
            .map(|b| {
                let units = (u64::from(b.weight) / divisor) as f64 / scale;
                (units.round() as u32).max(1)
            })
            .collect();
        let buckets: Vec<Bucket> = backends
            .iter()
            .zip(&units)
            .map(|(b, u)| Bucket::new(b.addr, *u))
            .collect();
        let continuum = Continuum::new(&buckets);
        drop(buckets);
        let addrs: Vec<SocketAddr> = backends.iter().map(|b| b.addr).collect();
        let index = if index {
            Index::new(&addrs, &units)
        } else {
            None
        };
        let (index, sorted) = match index {
            Some((index, sorted)) => (Some(index), sorted),
            None => (None, Vec::new()),
        };
        let owners = owners(&continuum, &backends, &sorted);
        // Hashes next to owners when the index has as many points as the continuum (checked
        // further in `agrees`).
        let same_length = sorted.len() == owners.len();
        let mut points: Vec<Point> = huge_pages(owners.len());
        points.extend(owners.iter().enumerate().map(|(i, owner)| {
            Point {
                hash: sorted
                    .get(i)
                    .filter(|_| same_length)
                    .map_or(0, |p| (p >> 16) as u32),
                owner: u32::from(*owner),
            }
        }));
        let points = points.into_boxed_slice();
        drop(sorted);
        let search = match index {
            Some(index) if same_length && agrees(&index, &points, &continuum) => {
                Search::Index(index)
            }
            Some(_) => {
                log::warn!(
                    "consistent hash: the ring index disagrees with pingora-ketama's continuum \
                     ({} backends); picks use the continuum's own search (slower)",
                    backends.len()
                );
                Search::Continuum(continuum)
            }
            None => Search::Continuum(continuum),
        };
        Ring {
            backends: backends.into_boxed_slice(),
            points,
            search,
        }
    }

    pub fn len(&self) -> usize {
        self.backends.len()
    }

    /// Points on the ring.
    pub fn points(&self) -> usize {
        self.points.len()
    }

    /// Each backend's share of the hash space (the arcs its points end), when indexed: how
    /// evenly the ring divides keys, exactly rather than sampled. In `backends` order.
    pub fn shares(&self) -> Option<Vec<(SocketAddr, f64)>> {
        if !self.indexed() || self.points.is_empty() {
            return None;
        }
        let mut arcs = vec![0u64; self.backends.len()];
        let last = self.points.last()?.hash;
        let mut prev = u64::from(last);
        for (i, p) in self.points.iter().enumerate() {
            // The first point also takes the wrap-around arc past the last one.
            let arc = if i == 0 {
                u64::from(p.hash) + (1u64 << 32) - prev
            } else {
                u64::from(p.hash) - prev
            };
            *arcs.get_mut(p.owner as usize)? += arc;
            prev = u64::from(p.hash);
        }
        let whole = (1u64 << 32) as f64;
        Some(
            self.backends
                .iter()
                .zip(arcs)
                .map(|(b, a)| (b.addr, a as f64 / whole))
                .collect(),
        )
    }

    /// Whether picks go through the checked index (rather than the continuum's search).
    pub fn indexed(&self) -> bool {
        matches!(self.search, Search::Index(_))
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

    /// The ring position of `key`: `Continuum::node_idx`'s answer.
    fn position(&self, key: &[u8]) -> usize {
        match &self.search {
            Search::Index(index) => index.position(crc32fast::hash(key), &self.points),
            Search::Continuum(c) => c.node_idx(key),
        }
    }

    /// The backend for `key`: the first on the ring from the key's point that `skip` does not
    /// refuse. `None` when the ring is empty or every backend within reach is refused (the caller
    /// then falls back to another way of choosing).
    pub fn pick(&self, key: &[u8], skip: impl Fn(&Backend) -> bool) -> Option<&Backend> {
        let n = self.points.len();
        if n == 0 {
            return None;
        }
        let mut at = self.position(key);
        let mut last = None;
        for _ in 0..MAX_WALK {
            let owner = self.points.get(at)?.owner;
            // Around the ring without a division per step (it showed in the pick's time).
            at += 1;
            if at == n {
                at = 0;
            }
            if last == Some(owner) {
                continue; // consecutive points of one Pod
            }
            last = Some(owner);
            let b = self.backends.get(owner as usize)?;
            if !skip(b) {
                return Some(b);
            }
        }
        None
    }
}

/// Each ring position's backend, read off the continuum's walk from position 0 until it wraps.
/// `sorted` (the index's points, `hash << 16 | backend`, when built) names the likely owner,
/// saving a search per point; the continuum's address decides.
fn owners(continuum: &Continuum, backends: &[Backend], sorted: &[u64]) -> Vec<u16> {
    let mut owners: Vec<u16> = Vec::with_capacity(sorted.len());
    let mut at = 0usize;
    loop {
        let position = at;
        let Some(addr) = continuum.get_addr(&mut at) else {
            break; // an empty ring
        };
        let likely = sorted
            .get(position)
            .map(|p| usize::from(*p as u16))
            .filter(|i| backends.get(*i).is_some_and(|b| b.addr == *addr));
        let Some(i) = likely.or_else(|| backends.binary_search_by(|b| b.addr.cmp(addr)).ok())
        else {
            // Cannot happen (the buckets are these backends); an empty ring is the safe answer.
            log::error!("consistent hash: the continuum names {addr}, which is not a backend");
            return Vec::new();
        };
        owners.push(i as u16);
        if at == 0 {
            break; // wrapped: every point seen once
        }
    }
    owners
}

/// Whether `index` answers what the continuum answers: as many points (the walk wrapped where
/// the index ends), and the same position for sample keys.
fn agrees(index: &Index, points: &[Point], continuum: &Continuum) -> bool {
    if index.starts.last().map(|n| *n as usize) != Some(points.len()) {
        return false;
    }
    (0..CHECKED_KEYS).all(|i| {
        let key = format!("podgate-ring-check-{i}");
        index.position(crc32fast::hash(key.as_bytes()), points)
            == continuum.node_idx(key.as_bytes())
    })
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

    /// The index answers what pingora-ketama's continuum answers, key for key: the same Pod for
    /// `Continuum::node`, and the same as the ring without the index.
    #[test]
    fn the_index_answers_what_the_continuum_answers() {
        let v6 = |i: u16| Backend {
            addr: SocketAddr::from(([0xfd00, 0, 0, 0, 0, 0, 1, i], 8080)),
            weight: 1 + u32::from(i % 4),
            info: Arc::default(),
        };
        let sets: Vec<Vec<Backend>> = vec![
            (0..1).map(|i| backend(i, 1)).collect(),
            (0..10).map(|i| backend(i, 1)).collect(),
            (0..300).map(|i| backend(i, 1 + i % 7)).collect(),
            (0..50).map(v6).collect(),
        ];
        for set in &sets {
            let ring = Ring::new(set.iter());
            assert!(
                ring.indexed(),
                "{} backends: the index was refused",
                set.len()
            );
            let plain = Ring::build(set.iter(), false);
            assert!(!plain.indexed());
            assert_eq!(ring.points(), plain.points());
            // Weights with a common divisor of 1 and far below MAX_RING_WEIGHT: one unit each.
            let buckets: Vec<Bucket> = set.iter().map(|b| Bucket::new(b.addr, b.weight)).collect();
            let continuum = Continuum::new(&buckets);
            for i in 0..20_000 {
                let key = format!("key-{i}");
                let want = continuum.node(key.as_bytes());
                assert_eq!(Some(owner(&ring, &key)), want, "{key}");
                assert_eq!(owner(&plain, &key), owner(&ring, &key), "{key}");
            }
        }
    }

    #[test]
    fn an_empty_ring_picks_nothing() {
        let ring = Ring::new([].iter());
        assert_eq!(ring.points(), 0);
        assert!(ring.pick(b"k", |_| false).is_none());
    }
}
