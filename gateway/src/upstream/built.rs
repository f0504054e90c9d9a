//! What the last rebuild of an upstream built, kept for the next one: each service entry's
//! backends (a segment) with what they were made from, so that an unchanged service is not built
//! again, and which addresses several segments hold (services sharing Pods are merged).

use crate::upstream::balance::{Backend, Segment};
use podgate_discovery::Endpoint;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;

/// The backends of one service entry as a rebuild made them, and what they were made from.
#[derive(Clone)]
pub(super) struct BuiltService {
    pub(super) endpoints: Arc<Vec<Endpoint>>,
    pub(super) any_ready: bool,
    pub(super) weight: u32,
    /// No backend was ramping up (slow start): ramping weights change with time, so such a
    /// service is built afresh each time.
    pub(super) settled: bool,
    /// Its endpoints by state (see [`super::state_counts`]).
    pub(super) counts: [i64; 4],
    /// Whether its Pods' locality was decided by zone hints (zone-aware upstreams).
    pub(super) hints: bool,
    pub(super) segment: Arc<Segment>,
}

/// Looks up what a service had at each address, for addresses asked in ascending order (as a
/// service's endpoints are): one walk through its previous backends, not a search per Pod.
pub(super) struct Had<'a> {
    segment: &'a Segment,
    /// The previous backends not yet walked past, when they are in address order.
    rest: Option<&'a [Backend]>,
}

impl<'a> Had<'a> {
    pub(super) fn new(segment: &'a Segment) -> Self {
        Had {
            segment,
            rest: segment.by_address(),
        }
    }

    pub(super) fn at(&mut self, addr: &SocketAddr) -> Option<&'a Backend> {
        let Some(rest) = &mut self.rest else {
            return self.segment.find(addr);
        };
        while rest.first().is_some_and(|b| b.addr < *addr) {
            *rest = &rest[1..];
        }
        rest.first().filter(|b| b.addr == *addr)
    }
}

/// What the last rebuild of an upstream made, to be reused by the next.
#[derive(Default)]
pub(super) struct Built {
    /// Per service entry, in the order of `conf.services`.
    pub(super) services: Vec<BuiltService>,
    /// The static nodes' segment, if the upstream has nodes.
    pub(super) nodes: Option<Arc<Segment>>,
    /// How many segments (services and nodes) hold each address.
    pub(super) holders: HashMap<SocketAddr, u32>,
    /// Addresses held by more than one segment: while there is one, segments cannot simply be
    /// put side by side (that address would get two shares).
    pub(super) overlaps: usize,
}

impl Built {
    pub(super) fn set_service(&mut self, i: usize, service: BuiltService) {
        if i < self.services.len() {
            let new = service.segment.clone();
            let old = std::mem::replace(&mut self.services[i], service);
            self.replace(&old.segment, &new);
        } else {
            debug_assert_eq!(i, self.services.len(), "services are built in order");
            self.count(&service.segment, true);
            self.services.push(service);
        }
    }

    pub(super) fn set_nodes(&mut self, nodes: Arc<Segment>) {
        match self.nodes.replace(nodes.clone()) {
            Some(old) => self.replace(&old, &nodes),
            None => self.count(&nodes, true),
        }
    }

    /// Records that `new` replaced `old`: only the addresses that differ, when both are in
    /// address order (one Pod moved: two addresses, not a thousand).
    fn replace(&mut self, old: &Segment, new: &Segment) {
        let (Some(mut old), Some(mut new)) = (old.by_address(), new.by_address()) else {
            self.count(old, false);
            self.count(new, true);
            return;
        };
        while let (Some(o), Some(n)) = (old.first(), new.first()) {
            match o.addr.cmp(&n.addr) {
                std::cmp::Ordering::Equal => {
                    (old, new) = (&old[1..], &new[1..]);
                }
                std::cmp::Ordering::Less => {
                    self.hold(&o.addr, false);
                    old = &old[1..];
                }
                std::cmp::Ordering::Greater => {
                    self.hold(&n.addr, true);
                    new = &new[1..];
                }
            }
        }
        old.iter().for_each(|b| self.hold(&b.addr, false));
        new.iter().for_each(|b| self.hold(&b.addr, true));
    }

    /// Records that `segment` now holds (or no longer holds) its addresses.
    fn count(&mut self, segment: &Segment, holds: bool) {
        for b in segment.backends() {
            self.hold(&b.addr, holds);
        }
    }

    fn hold(&mut self, addr: &SocketAddr, holds: bool) {
        if holds {
            let n = self.holders.entry(*addr).or_insert(0);
            *n += 1;
            if *n == 2 {
                self.overlaps += 1;
            }
        } else if let Some(n) = self.holders.get_mut(addr) {
            *n -= 1;
            match *n {
                0 => {
                    self.holders.remove(addr);
                }
                1 => self.overlaps -= 1,
                _ => {}
            }
        }
    }
}
