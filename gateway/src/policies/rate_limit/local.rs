//! The local store: one process's buckets for one rule, in a [`Table`] of GCRA TATs. Every
//! worker thread updates the same slot of a key by compare-and-swap, so the limit holds for the
//! whole process whatever thread a request lands on (dividing a limit between threads would
//! refuse a client whose connections all happen to land on one thread).

use super::gcra::{Gcra, Outcome};
use super::table::{Rank, Table, Update};

/// GCRA states rank by TAT: the earliest is the bucket nearest to full.
pub struct ByTat {
    pub now: u64,
}

impl Rank for ByTat {
    fn rank(&self, tat: u64) -> u64 {
        tat
    }
    fn idle(&self, tat: u64) -> bool {
        tat <= self.now
    }
}

struct Decide<'a> {
    gcra: &'a Gcra,
    now: u64,
}

impl Update for Decide<'_> {
    type Out = Outcome;
    fn update(&mut self, tat: Option<u64>) -> (Option<u64>, Outcome) {
        self.gcra.decide(tat.unwrap_or(0), self.now)
    }
}

struct Refund<'a> {
    gcra: &'a Gcra,
    now: u64,
}

impl Update for Refund<'_> {
    type Out = ();
    fn update(&mut self, tat: Option<u64>) -> (Option<u64>, ()) {
        (tat.map(|t| self.gcra.refund(t, self.now)), ())
    }
}

#[derive(Debug)]
pub struct LocalLimiter {
    pub gcra: Gcra,
    pub table: Table,
}

impl LocalLimiter {
    /// Decides one request of `key` at `now` (nanoseconds on [`super::clock`]).
    pub fn check(&self, key: u64, now: u64) -> Outcome {
        let gcra = &self.gcra;
        self.table.apply(key, &ByTat { now }, Decide { gcra, now })
    }

    /// Gives back a request [`LocalLimiter::check`] admitted (a later rule refused it).
    pub fn refund(&self, key: u64, now: u64) {
        let gcra = &self.gcra;
        self.table.apply(key, &ByTat { now }, Refund { gcra, now })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use prometheus::{IntCounter, IntGauge};
    use std::sync::Arc;
    use std::time::Duration;

    fn limiter(interval: Duration, burst: u64, keys: usize) -> LocalLimiter {
        let gauge = IntGauge::new("k", "k").unwrap();
        let table = Table::new(keys, gauge, IntCounter::new("e", "e").unwrap());
        LocalLimiter {
            gcra: Gcra::new(interval, burst),
            table,
        }
    }

    #[test]
    fn the_limit_holds_across_threads() {
        // 1/h with a burst of 1000: over the test's few milliseconds exactly 1000 get through,
        // however the 4 threads interleave (no refill can blur the count).
        let l = Arc::new(limiter(Duration::from_secs(3600), 1000, 1024));
        let threads: Vec<_> = (0..4)
            .map(|_| {
                let l = l.clone();
                std::thread::spawn(move || {
                    let mut admitted = 0u32;
                    for _ in 0..2_000 {
                        if let Outcome::Admit { .. } = l.check(7, super::super::clock()) {
                            admitted += 1;
                        }
                    }
                    admitted
                })
            })
            .collect();
        let total: u32 = threads.into_iter().map(|h| h.join().unwrap()).sum();
        assert_eq!(total, 1000);
    }

    #[test]
    fn eviction_bounds_memory_and_forgets_full_buckets_first() {
        let l = limiter(Duration::from_millis(1), 1, 1024);
        let now = 10_000_000_000;
        // 100 000 distinct keys through a 1024-slot table.
        for k in 0..100_000u64 {
            l.check(k.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1, now);
        }
        assert!(l.table.len() <= l.table.capacity());
        assert_eq!(l.table.capacity(), 1024);
        // A key that is limited right now keeps its state while thousands of keys pass through
        // its window: they rank below it (their buckets fill up sooner).
        let hot = 0xDEAD_BEEF_u64;
        let later = now + 2_000_000;
        let hot_now = later + 500_000;
        assert!(matches!(l.check(hot, hot_now), Outcome::Admit { .. }));
        for k in 0..10_000u64 {
            l.check(k.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1, later);
            assert!(matches!(l.check(hot, hot_now), Outcome::Refuse { .. }));
        }
        assert!(l.table.len() <= 1024);
        l.refund(hot, hot_now);
        assert!(matches!(l.check(hot, hot_now), Outcome::Admit { .. }));
    }
}
