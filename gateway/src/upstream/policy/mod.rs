//! Traffic policies: where each request of an upstream goes.
//!
//! Two stages. First a *slot* is chosen: a failover tier (`priority`, see [`tiers`]) and, for
//! zone-aware upstreams, the local or the other zones of it (see [`zones`]), each with a share
//! of the traffic that the [`Plan`] computes from capacity and health. Then the upstream's
//! `balance` policy picks a Pod within the slot: smooth weighted round robin (the
//! `balance` module), a Ketama ring ([`hash`]) or the power of two choices ([`least`]).
//!
//! An upstream with one tier and no zones has one slot, its whole selection, and round robin
//! there costs what it did before any of this existed. Plans are immutable and swapped
//! atomically; they are recomputed on every rebuild (discovery), when an active check flips and
//! when a passive ejection starts or runs out — never on the request path's hot part.

pub mod hash;
pub mod least;
pub mod tiers;
pub mod zones;

use crate::config::{Balance, HashOn};
use crate::upstream::balance::{Backend, Balancer, Selection};
use arc_swap::ArcSwap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};

/// What hashing may need from a request; each proxy path implements it over its own request
/// type.
pub trait RequestParts {
    /// Every value of header `name` (lower-case), in order.
    fn header_values<'s>(&'s self, name: &'s str) -> impl Iterator<Item = &'s [u8]> + 's;
    fn client_ip(&self) -> Option<IpAddr>;
    /// The path, without the query.
    fn path(&self) -> &str;
}

/// A consistent-hash key: bytes of the request, or the client address.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Key<'r> {
    Bytes(&'r [u8]),
    Ip([u8; 16]),
}

impl Key<'_> {
    pub fn as_bytes(&self) -> &[u8] {
        match self {
            Key::Bytes(b) => b,
            Key::Ip(octets) => octets,
        }
    }
}

/// The key `on` names in `req`; `None` when the request lacks it (the pick is then not hashed).
pub fn hash_key<'r>(on: &'r HashOn, req: &'r impl RequestParts) -> Option<Key<'r>> {
    match on {
        HashOn::Header(name) => req.header_values(name).next().map(Key::Bytes),
        HashOn::Path => Some(Key::Bytes(req.path().as_bytes())),
        HashOn::ClientIp => req.client_ip().map(|ip| {
            Key::Ip(match ip {
                IpAddr::V4(v4) => v4.to_ipv6_mapped().octets(),
                IpAddr::V6(v6) => v6.octets(),
            })
        }),
        HashOn::Cookie(name) => req
            .header_values("cookie")
            .find_map(|field| cookie(field, name.as_bytes()).map(|(s, e)| &field[s..e]))
            .map(Key::Bytes),
    }
}

/// The value range of cookie `name` in one `Cookie` field (`a=1; b=2`), RFC 6265 §5.4 layout.
fn cookie(field: &[u8], name: &[u8]) -> Option<(usize, usize)> {
    let mut start = 0;
    for pair in field.split(|b| *b == b';') {
        let end = start + pair.len();
        let lead = pair.iter().take_while(|b| **b == b' ').count();
        let trimmed = &pair[lead..];
        if let Some(eq) = trimmed.iter().position(|b| *b == b'=') {
            if &trimmed[..eq] == name {
                let value_start = start + lead + eq + 1;
                let mut value_end = end;
                while value_end > value_start && field[value_end - 1] == b' ' {
                    value_end -= 1;
                }
                return Some((value_start, value_end));
            }
        }
        start = end + 1;
    }
    None
}

/// Which Pods of a tier a slot holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ZonePart {
    /// Zone-aware routing is off: all of them.
    All,
    Local,
    Other,
}

impl ZonePart {
    pub fn label(self) -> &'static str {
        match self {
            ZonePart::All => "all",
            ZonePart::Local => "local",
            ZonePart::Other => "other",
        }
    }
}

/// What a rebuild hands over for one slot.
pub struct SlotInput {
    /// `None` for a single slot: the upstream's own selection is it.
    pub selection: Option<Selection>,
    /// Weight of the Pods Kubernetes lists for it that are not terminating.
    pub total: u64,
    /// Weight of Pods kept only because their service just emptied (not capacity).
    pub held: u64,
}

/// One slot of a plan.
pub struct SlotPlan {
    pub priority: u32,
    pub zone: ZonePart,
    /// Healthy and listed weight.
    pub capacity: tiers::Capacity,
    /// Share of new requests, 0..=1.
    pub share: f64,
    /// The listed weight as the rebuild counted it (kept for replans).
    listed: u64,
    /// Weight of held Pods in the slot (see [`SlotInput::held`]), not counted as healthy.
    held: u64,
    /// For `consistent_hash`.
    ring: Option<Arc<hash::Ring>>,
}

/// Where traffic goes right now: shares per slot, and the rings.
#[derive(Default)]
pub struct Plan {
    pub slots: Vec<SlotPlan>,
    /// Cumulative shares scaled to `u32`: a draw below `bounds[i]` (and not below the previous)
    /// lands in slot `i`.
    bounds: Vec<u32>,
    /// Why the shares are what they are, for the admin view.
    pub why: String,
}

/// The traffic policy state of one upstream.
pub struct Traffic {
    pub balance: Balance,
    /// podgate's zone, when the upstream is zone-aware.
    pub zone: Option<Arc<str>>,
    /// The distinct priorities of the upstream's services (and 0 for static nodes), ascending.
    pub priorities: Vec<u32>,
    /// One balancer per slot, in plan order; empty when there is a single slot (the upstream's
    /// own balancer then serves it).
    slots: Vec<Balancer>,
    plan: ArcSwap<Plan>,
    /// Serialises plan updates, so that a replan after a health change never swaps in shares
    /// computed from an older rebuild's slots.
    planning: Mutex<()>,
}

/// The result of a pick: the backend, and for least request the guard counting it in flight.
pub type Picked = (Backend, Option<least::InFlight>);

impl Traffic {
    pub fn new(balance: Balance, zone: Option<Arc<str>>, priorities: Vec<u32>) -> Traffic {
        let parts = if zone.is_some() { 2 } else { 1 };
        let n = priorities.len() * parts;
        let slots = if n > 1 {
            (0..n).map(|_| Balancer::default()).collect()
        } else {
            Vec::new()
        };
        Traffic {
            balance,
            zone,
            priorities,
            slots,
            plan: ArcSwap::from_pointee(Plan::default()),
            planning: Mutex::new(()),
        }
    }

    /// Whether picks can go straight to the upstream's round robin (one slot, round robin).
    pub fn is_plain(&self) -> bool {
        self.slots.is_empty() && self.balance == Balance::RoundRobin
    }

    /// The slots' (priority, zone part), in plan order.
    pub fn layout(&self) -> Vec<(u32, ZonePart)> {
        let parts: &[ZonePart] = if self.zone.is_some() {
            &[ZonePart::Local, ZonePart::Other]
        } else {
            &[ZonePart::All]
        };
        self.priorities
            .iter()
            .flat_map(|p| parts.iter().map(move |z| (*p, *z)))
            .collect()
    }

    pub fn plan(&self) -> Arc<Plan> {
        self.plan.load_full()
    }

    /// Installs the slots a rebuild made (in [`Traffic::layout`] order) and plans from them.
    /// `main` is the upstream's own balancer, which serves a single slot.
    pub fn rebuild(&self, main: &Balancer, inputs: Vec<SlotInput>, now_ms: u64) -> Arc<Plan> {
        let _planning = self.planning.lock().unwrap_or_else(|p| p.into_inner());
        let old = self.plan.load_full();
        let layout = self.layout();
        let mut rings = Vec::with_capacity(inputs.len());
        let mut totals = Vec::with_capacity(inputs.len());
        let mut held = Vec::with_capacity(inputs.len());
        for (i, input) in inputs.into_iter().enumerate() {
            held.push(input.held);
            if let (Some(b), Some(selection)) = (self.slots.get(i), input.selection) {
                b.swap(selection);
            }
            let ring = match &self.balance {
                Balance::ConsistentHash(_) => {
                    let selection = self.selection_of(main, i);
                    let kept = old.slots.get(i).and_then(|s| s.ring.clone()).filter(|r| {
                        // The same backends with the same weights: the ring is still right.
                        r.same_as(&selection)
                    });
                    Some(kept.unwrap_or_else(|| Arc::new(hash::Ring::new(selection.iter()))))
                }
                _ => None,
            };
            rings.push(ring);
            totals.push(input.total);
        }
        let plan = Arc::new(self.compute(main, &layout, &totals, &held, rings, now_ms));
        self.plan.store(plan.clone());
        plan
    }

    /// Recomputes the shares after a health change, keeping slots and rings.
    pub fn replan(&self, main: &Balancer, now_ms: u64) -> Arc<Plan> {
        let _planning = self.planning.lock().unwrap_or_else(|p| p.into_inner());
        let old = self.plan.load_full();
        let totals: Vec<u64> = old.slots.iter().map(|s| s.listed).collect();
        let held: Vec<u64> = old.slots.iter().map(|s| s.held).collect();
        let rings = old.slots.iter().map(|s| s.ring.clone()).collect();
        let plan = Arc::new(self.compute(main, &self.layout(), &totals, &held, rings, now_ms));
        self.plan.store(plan.clone());
        plan
    }

    fn selection_of(&self, main: &Balancer, slot: usize) -> Arc<Selection> {
        match self.slots.get(slot) {
            Some(b) => b.selection(),
            None => main.selection(),
        }
    }

    fn compute(
        &self,
        main: &Balancer,
        layout: &[(u32, ZonePart)],
        totals: &[u64],
        held: &[u64],
        rings: Vec<Option<Arc<hash::Ring>>>,
        now_ms: u64,
    ) -> Plan {
        let mut slots: Vec<SlotPlan> = Vec::with_capacity(layout.len());
        // The zones each tier's healthy Pods are in (a zone counted once across its slots).
        let mut tier_zones: Vec<Vec<Arc<str>>> = Vec::new();
        for (i, ((priority, zone), ring)) in layout.iter().zip(rings).enumerate() {
            let selection = self.selection_of(main, i);
            let held = held.get(i).copied().unwrap_or(0);
            let healthy: u64 = selection
                .iter()
                .filter(|b| b.info.health.healthy(now_ms))
                .map(|b| u64::from(b.weight))
                .sum::<u64>()
                .saturating_sub(held);
            let listed = totals.get(i).copied().unwrap_or(0);
            if *zone != ZonePart::Other {
                tier_zones.push(Vec::new());
            }
            if let Some(seen) = tier_zones.last_mut() {
                for b in selection.iter() {
                    if let Some(name) = &b.info.zone {
                        if b.info.health.healthy(now_ms) && !seen.contains(name) {
                            seen.push(name.clone());
                        }
                    }
                }
            }
            slots.push(SlotPlan {
                priority: *priority,
                zone: *zone,
                capacity: tiers::Capacity {
                    healthy,
                    // Never below what is healthy (slow start weights, a Pod both in a ready
                    // service and counted once).
                    total: listed.max(healthy),
                },
                share: 0.0,
                listed,
                held,
                ring,
            });
        }
        // Tier capacities: the sum of their slots.
        let mut tier_caps: Vec<tiers::Capacity> = Vec::new();
        for s in &slots {
            if s.zone != ZonePart::Other {
                tier_caps.push(tiers::Capacity::default());
            }
            let t = tier_caps
                .last_mut()
                .expect("a tier starts with its first slot");
            t.healthy += s.capacity.healthy;
            t.total += s.capacity.total;
        }
        let loads = tiers::loads(&tier_caps);
        let zones_per_tier: Vec<usize> = tier_zones.iter().map(Vec::len).collect();
        let mut why = Vec::new();
        let mut tier = 0;
        let mut i = 0;
        while i < slots.len() {
            let load = loads.get(tier).copied().unwrap_or(0.0);
            if slots[i].zone == ZonePart::Local {
                let local = slots[i].capacity.healthy;
                let all = tier_caps[tier].healthy;
                let f = zones::local_fraction(local, all, zones_per_tier[tier]);
                slots[i].share = load * f;
                if let Some(other) = slots.get_mut(i + 1) {
                    other.share = load * (1.0 - f);
                }
                why.push(format!(
                    "priority {}: {} of {} weight healthy, {:.0}% of traffic, {:.0}% of it local \
                     ({} healthy weight in zone {}, {} zones)",
                    slots[i].priority,
                    tier_caps[tier].healthy,
                    tier_caps[tier].total,
                    load * 100.0,
                    f * 100.0,
                    local,
                    self.zone.as_deref().unwrap_or(""),
                    zones_per_tier[tier],
                ));
                i += 2;
            } else {
                slots[i].share = load;
                why.push(format!(
                    "priority {}: {} of {} weight healthy, {:.0}% of traffic",
                    slots[i].priority,
                    tier_caps[tier].healthy,
                    tier_caps[tier].total,
                    load * 100.0
                ));
                i += 1;
            }
            tier += 1;
        }
        let mut bounds = Vec::with_capacity(slots.len());
        let mut sum = 0.0;
        for s in &slots {
            sum += s.share;
            bounds.push((sum.min(1.0) * f64::from(u32::MAX)) as u32);
        }
        if let Some(last) = bounds.iter_mut().rev().find(|b| **b > 0) {
            *last = u32::MAX; // rounding never leaves a gap at the top
        }
        Plan {
            slots,
            bounds,
            why: why.join("; "),
        }
    }

    /// A pick through the plan: a slot by share (by the key's hash when hashing, so a key stays
    /// in its slot), then the balance policy within it. A refused answer (tried, unhealthy)
    /// sends the pick on to the other slots in order; if every slot refuses, the first answer
    /// stands (better a likely error than a certain 503).
    pub fn pick(
        &self,
        main: &Balancer,
        key: Option<Key<'_>>,
        skip: &dyn Fn(&Backend) -> bool,
    ) -> Option<Picked> {
        if self.slots.is_empty() && self.balance == Balance::LeastRequest {
            // One slot and no ring: the plan has nothing to say.
            return self.pick_in(main, None, key, skip).map(|b| self.picked(b));
        }
        let plan = self.plan.load();
        // One slot: nothing to draw (a hashed pick skips hashing the key a second time).
        let draw = match key {
            _ if plan.bounds.len() <= 1 => 0,
            Some(k) => fnv32(k.as_bytes()),
            None => least::random() as u32,
        };
        let first = plan.bounds.iter().position(|b| draw < *b).unwrap_or(0);
        let n = plan.slots.len().max(1);
        let live = |s: usize| plan.slots.get(s).is_some_and(|p| p.share > 0.0);
        // The drawn slot, then the others with a share, then those without (a retry or a
        // refused Pod prefers live tiers).
        let order = std::iter::once(first)
            .chain((0..n).filter(|s| *s != first && live(*s)))
            .chain((0..n).filter(|s| *s != first && !live(*s)));
        let mut fallback = None;
        for slot in order {
            let balancer = self.slots.get(slot).unwrap_or(main);
            match self.pick_in(balancer, plan.slots.get(slot), key, skip) {
                Some(b) if !skip(&b) => return Some(self.picked(b)),
                Some(b) => {
                    fallback.get_or_insert(b);
                }
                None => {}
            }
        }
        fallback.map(|b| self.picked(b))
    }

    fn picked(&self, b: Backend) -> Picked {
        let guard = (self.balance == Balance::LeastRequest).then(|| least::InFlight::start(&b));
        (b, guard)
    }

    /// The balance policy's pick within one slot. May return a refused backend (when all are).
    fn pick_in(
        &self,
        balancer: &Balancer,
        slot: Option<&SlotPlan>,
        key: Option<Key<'_>>,
        skip: &dyn Fn(&Backend) -> bool,
    ) -> Option<Backend> {
        match (&self.balance, key, slot.and_then(|s| s.ring.as_ref())) {
            (Balance::ConsistentHash(_), Some(k), Some(ring)) => {
                if let Some(b) = ring.pick(k.as_bytes(), skip) {
                    return Some(b.clone());
                }
            }
            (Balance::LeastRequest, _, _) => {
                if let Some(b) = balancer.with_selection(|s| least::pick(s, skip).cloned()) {
                    return Some(b);
                }
            }
            _ => {}
        }
        balancer.pick(skip)
    }
}

/// FNV-1a, 32 bits: which slot a hashed key lands in (independent of its ring position).
fn fnv32(bytes: &[u8]) -> u32 {
    let mut h: u32 = 0x811c_9dc5;
    for b in bytes {
        h ^= u32::from(*b);
        h = h.wrapping_mul(0x0100_0193);
    }
    h
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Req {
        headers: Vec<(&'static str, &'static str)>,
        ip: Option<IpAddr>,
        path: &'static str,
    }

    impl RequestParts for Req {
        fn header_values<'s>(&'s self, name: &'s str) -> impl Iterator<Item = &'s [u8]> + 's {
            self.headers
                .iter()
                .filter(move |(n, _)| *n == name)
                .map(|(_, v)| v.as_bytes())
        }
        fn client_ip(&self) -> Option<IpAddr> {
            self.ip
        }
        fn path(&self) -> &str {
            self.path
        }
    }

    #[test]
    fn keys_come_from_where_hash_on_says() {
        let req = Req {
            headers: vec![
                ("x-user", "alice"),
                ("cookie", "a=1"),
                ("cookie", "a=1; sid=xyz ; b=2"),
            ],
            ip: Some("10.1.2.3".parse().unwrap()),
            path: "/cart",
        };
        let key = |on: HashOn| hash_key(&on, &req).map(|k| k.as_bytes().to_vec());
        assert_eq!(
            key(HashOn::Header("x-user".into())),
            Some(b"alice".to_vec())
        );
        assert_eq!(key(HashOn::Header("x-none".into())), None);
        assert_eq!(key(HashOn::Cookie("sid".into())), Some(b"xyz".to_vec()));
        assert_eq!(key(HashOn::Cookie("b".into())), Some(b"2".to_vec()));
        assert_eq!(key(HashOn::Cookie("c".into())), None);
        assert_eq!(key(HashOn::Path), Some(b"/cart".to_vec()));
        assert_eq!(key(HashOn::ClientIp).map(|k| k.len()), Some(16));
    }
}
