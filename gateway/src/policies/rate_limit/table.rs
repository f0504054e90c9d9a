//! A fixed-size table of per-key state shared by every worker thread, with no lock: each slot
//! is one 128-bit atomic holding the key's hash and its 64-bit state, updated by
//! compare-and-swap. The local store keeps a GCRA TAT per key here, batched mode its leases.
//!
//! Why not a library map: dashmap and the standard `Mutex<HashMap>` take locks on the request
//! path (the project's rule), and neither bounds memory by itself; papaya and scc grow without a
//! cap and would need a sweeper to evict. A bounded open-addressing table is the shape that
//! gives "memory fixed when the config loads" and "one CAS per request" together, the same
//! design as Envoy's and nginx's fixed shared-memory zones (`limit_req_zone … 10m`).
//!
//! - Memory: `max_keys` rounded up to a power of two, 16 bytes a slot, allocated once.
//! - A key lives in one of the [`WINDOW`] slots after its home slot. A key not found takes the
//!   first empty slot there, or else evicts the slot whose state ranks lowest (for GCRA: the
//!   earliest TAT, the bucket closest to full). A slot is never emptied, so a lookup stops at
//!   the first empty slot. Evicting a full bucket loses nothing (an unknown key starts full);
//!   evicting one that is not yet full forgets part of a limit, so that is counted
//!   (`podgate_rate_limit_evictions_total`) — it can only make a limit more lenient.
//! - The key and its state change in one CAS: a request never updates another key's state, even
//!   while its slot is being taken over.
//! - Key hashes are SipHash with a per-process random key: clients cannot pick colliding keys.
//!   Two keys with the same 64-bit hash would share a bucket; at 65 536 keys the chance is
//!   about 1 in 10^10.

use portable_atomic::AtomicU128;
use prometheus::{IntCounter, IntGauge};
use std::sync::atomic::Ordering;

/// Slots a key may live in, from its home slot on: two cache lines.
pub const WINDOW: usize = 8;

/// Tries at a contended slot before a request is decided without being recorded.
const TRIES: usize = 16;

pub struct Table {
    slots: Box<[AtomicU128]>,
    mask: usize,
    /// Occupied slots (`podgate_rate_limit_keys`).
    keys: IntGauge,
    /// Keys evicted while their state still mattered.
    evictions: IntCounter,
}

/// What a caller decides for one key, given its state (`None`: the key is not in the table).
pub trait Update {
    type Out;
    /// The state to store (`None`: leave the table as it is) and the answer. May be called again
    /// when another thread changed the slot in between.
    fn update(&mut self, state: Option<u64>) -> (Option<u64>, Self::Out);
}

/// How states compare for eviction.
pub trait Rank {
    /// Lower goes first.
    fn rank(&self, state: u64) -> u64;
    /// The state holds nothing an unknown key would not (a full bucket, a spent lease).
    fn idle(&self, state: u64) -> bool;
}

impl std::fmt::Debug for Table {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Table")
            .field("slots", &self.slots.len())
            .finish()
    }
}

impl Table {
    /// A table for about `max_keys` keys.
    pub fn new(max_keys: usize, keys: IntGauge, evictions: IntCounter) -> Table {
        let size = max_keys.max(WINDOW).next_power_of_two();
        keys.set(0);
        Table {
            slots: (0..size).map(|_| AtomicU128::new(0)).collect(),
            mask: size - 1,
            keys,
            evictions,
        }
    }

    /// Slots in the table (the most keys it holds).
    pub fn capacity(&self) -> usize {
        self.slots.len()
    }

    /// No key is tracked.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Occupied slots.
    pub fn len(&self) -> usize {
        self.keys.get().max(0) as usize
    }

    /// Runs `u` on the state of `key` (a non-zero hash) and stores what it returns.
    pub fn apply<U: Update>(&self, key: u64, rank: &impl Rank, mut u: U) -> U::Out {
        let key = key.max(1);
        // The high half picks the home slot; the full hash is what identifies the key.
        let home = (key >> 32) as usize ^ key as usize;
        'retry: for _ in 0..TRIES {
            let mut empty = None;
            let mut victim: Option<(usize, u128)> = None;
            for i in 0..WINDOW {
                let at = (home + i) & self.mask;
                let mut cur = self.slots[at].load(Ordering::Acquire);
                let held = (cur >> 64) as u64;
                if held == key {
                    loop {
                        let (new, out) = u.update(Some(cur as u64));
                        let Some(new) = new else { return out };
                        let next = (u128::from(key) << 64) | u128::from(new);
                        match self.slots[at].compare_exchange_weak(
                            cur,
                            next,
                            Ordering::AcqRel,
                            Ordering::Acquire,
                        ) {
                            Ok(_) => return out,
                            Err(actual) if (actual >> 64) as u64 == key => cur = actual,
                            // Taken over by another key meanwhile: look again.
                            Err(_) => continue 'retry,
                        }
                    }
                }
                if held == 0 {
                    empty = Some((at, cur));
                    break;
                }
                let lower = victim.is_none_or(|(_, v)| rank.rank(cur as u64) < rank.rank(v as u64));
                if lower {
                    victim = Some((at, cur));
                }
            }
            let Some((at, old)) = empty.or(victim) else {
                break;
            };
            let (new, out) = u.update(None);
            let Some(new) = new else { return out };
            let next = (u128::from(key) << 64) | u128::from(new);
            if self.slots[at]
                .compare_exchange(old, next, Ordering::AcqRel, Ordering::Acquire)
                .is_ok()
            {
                if old == 0 {
                    self.keys.inc();
                } else if !rank.idle(old as u64) {
                    self.evictions.inc();
                }
                return out;
            }
        }
        // Contended past reason (thousands of threads on one window): decide as for a new key
        // without recording it rather than spin on the request path.
        u.update(None).1
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct ByValue;
    impl Rank for ByValue {
        fn rank(&self, state: u64) -> u64 {
            state
        }
        fn idle(&self, state: u64) -> bool {
            state == 1
        }
    }

    /// Adds one to the state (a new key starts at `start`) and says what it was.
    struct Add(u64);
    impl Update for Add {
        type Out = Option<u64>;
        fn update(&mut self, state: Option<u64>) -> (Option<u64>, Option<u64>) {
            (Some(state.map_or(self.0, |s| s + 1)), state)
        }
    }

    fn table(keys: usize) -> Table {
        let gauge = IntGauge::new("k", "k").unwrap();
        Table::new(keys, gauge, IntCounter::new("e", "e").unwrap())
    }

    #[test]
    fn keys_keep_their_own_state_and_the_size_is_fixed() {
        let t = table(1000);
        assert_eq!(t.capacity(), 1024);
        for k in 1..=500u64 {
            assert_eq!(
                t.apply(k.wrapping_mul(0x9E37_79B9_7F4A_7C15), &ByValue, Add(10)),
                None
            );
        }
        for k in 1..=500u64 {
            assert_eq!(
                t.apply(k.wrapping_mul(0x9E37_79B9_7F4A_7C15), &ByValue, Add(10)),
                Some(10)
            );
        }
        assert_eq!(t.len(), 500);
    }

    #[test]
    fn a_full_table_evicts_the_lowest_ranked_and_counts_only_lossy_evictions() {
        let t = table(8);
        for k in 1..=8u64 {
            // Same home slot for all: the whole table is one window.
            t.apply(k << 40, &ByValue, Add(if k == 5 { 1 } else { 100 + k }));
        }
        assert_eq!(t.len(), 8);
        // A ninth key takes the slot of key 5, whose state is idle: no lossy eviction.
        t.apply(9 << 40, &ByValue, Add(50));
        assert_eq!(
            t.apply(5 << 40, &ByValue, Add(1)),
            None,
            "key 5 was forgotten"
        );
        assert_eq!(
            t.evictions.get(),
            1,
            "key 5 came back over key 9 (state 50, not idle)"
        );
        assert_eq!(t.len(), 8, "evictions never grow the table");
    }

    #[test]
    fn threads_add_up_exactly_on_one_key() {
        let t = std::sync::Arc::new(table(64));
        let threads: Vec<_> = (0..4)
            .map(|_| {
                let t = t.clone();
                std::thread::spawn(move || {
                    for _ in 0..10_000 {
                        t.apply(42, &ByValue, Add(1));
                    }
                })
            })
            .collect();
        threads.into_iter().for_each(|h| h.join().unwrap());
        assert_eq!(t.apply(42, &ByValue, Add(1)), Some(40_000));
    }
}
