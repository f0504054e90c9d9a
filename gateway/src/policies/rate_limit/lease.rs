//! Batched mode: a replica takes tokens from the shared bucket in leases of `lease` tokens and
//! spends them without asking Redis, so one Redis call serves about `lease` requests.
//!
//! Error bound. Redis grants tokens by the exact GCRA, and a replica admits only tokens it was
//! granted, so over any stretch of time the whole fleet admits at most what the exact limit
//! allows plus the tokens leased before the stretch began and spent inside it: each replica
//! holds at most `lease - 1` of them per key, so **at most replicas × (lease − 1) requests over
//! the limit in any window**, and never more than Redis granted over a long run. The other way,
//! tokens a replica holds but does not spend are lost when the lease ends ([`LIFETIME`]): at most
//! `lease - 1` per replica and key per second are refused that exact mode would admit.
//!
//! One refill per key at a time: the request that finds the lease spent marks the key as being
//! refilled and asks Redis for a lease; requests arriving meanwhile ask Redis for themselves
//! alone (exact), so no replica ever holds more than one lease per key. The mark carries a
//! deadline (the store's timeout), so a refill whose request went away does not hold it.
//!
//! State per key, one u64 in the [`Table`]: tokens (bits 41..63), refilling (bit 40) and a
//! deadline in milliseconds on the process clock (bits 0..39, 34 years).

use super::table::{Rank, Table, Update};

/// A lease is spent within this, or what is left of it is dropped.
pub const LIFETIME_MS: u64 = 1_000;
pub const LIFETIME: std::time::Duration = std::time::Duration::from_millis(LIFETIME_MS);

const DEADLINE: u64 = (1 << 40) - 1;
const REFILLING: u64 = 1 << 40;

fn pack(tokens: u64, refilling: bool, deadline_ms: u64) -> u64 {
    (tokens.min((1 << 23) - 1) << 41) | (u64::from(refilling) << 40) | (deadline_ms & DEADLINE)
}

fn tokens(s: u64) -> u64 {
    s >> 41
}

fn deadline(s: u64) -> u64 {
    s & DEADLINE
}

/// What a request of a batched rule does.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Take {
    /// Admitted from this replica's lease.
    Served,
    /// Ask Redis for a lease (this request takes the first token, the rest are deposited).
    Refill,
    /// Another request is refilling: ask Redis for this request alone.
    Exact,
}

struct ByDeadline {
    now_ms: u64,
}

impl Rank for ByDeadline {
    fn rank(&self, s: u64) -> u64 {
        deadline(s)
    }
    fn idle(&self, s: u64) -> bool {
        deadline(s) <= self.now_ms || (tokens(s) == 0 && s & REFILLING == 0)
    }
}

#[derive(Debug)]
pub struct Leases {
    pub table: Table,
    /// Tokens asked per refill.
    pub lease: u64,
    /// How long a refill may hold the key's mark: the store's timeout.
    refill_ms: u64,
}

impl Leases {
    pub fn new(table: Table, lease: u64, timeout: std::time::Duration) -> Leases {
        Leases {
            table,
            lease,
            refill_ms: timeout.as_millis() as u64 + 1,
        }
    }

    pub fn take(&self, key: u64, now_ms: u64) -> Take {
        struct T {
            now: u64,
            refill: u64,
        }
        impl Update for T {
            type Out = Take;
            fn update(&mut self, s: Option<u64>) -> (Option<u64>, Take) {
                match s {
                    Some(s) if deadline(s) > self.now && tokens(s) > 0 => {
                        (Some(s - (1 << 41)), Take::Served)
                    }
                    Some(s) if deadline(s) > self.now && s & REFILLING != 0 => (None, Take::Exact),
                    _ => (Some(pack(0, true, self.now + self.refill)), Take::Refill),
                }
            }
        }
        let rank = ByDeadline { now_ms };
        let refill = self.refill_ms;
        self.table.apply(
            key,
            &rank,
            T {
                now: now_ms,
                refill,
            },
        )
    }

    /// After a refill: `tokens` more for this replica (the request's own already taken), or
    /// none when Redis granted nothing or failed; the refilling mark is cleared either way.
    pub fn deposit(&self, key: u64, tokens: u64, now_ms: u64) {
        struct D(u64);
        impl Update for D {
            type Out = ();
            fn update(&mut self, _: Option<u64>) -> (Option<u64>, ()) {
                (Some(self.0), ())
            }
        }
        let state = match tokens {
            0 => pack(0, false, now_ms),
            n => pack(n, false, now_ms + LIFETIME_MS),
        };
        self.table.apply(key, &ByDeadline { now_ms }, D(state))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use prometheus::{IntCounter, IntGauge};
    use std::time::Duration;

    fn leases(lease: u64) -> Leases {
        let gauge = IntGauge::new("k", "k").unwrap();
        let table = Table::new(1024, gauge, IntCounter::new("e", "e").unwrap());
        Leases::new(table, lease, Duration::from_millis(20))
    }

    #[test]
    fn one_refill_at_a_time_then_served_until_spent_or_expired() {
        let l = leases(5);
        assert_eq!(l.take(9, 1000), Take::Refill);
        assert_eq!(l.take(9, 1001), Take::Exact, "a refill is in flight");
        l.deposit(9, 4, 1002);
        for _ in 0..4 {
            assert_eq!(l.take(9, 1003), Take::Served);
        }
        assert_eq!(l.take(9, 1004), Take::Refill, "spent");
        l.deposit(9, 4, 1005);
        assert_eq!(l.take(9, 1005 + LIFETIME_MS), Take::Refill, "expired");
        // A refill that never came back lets the next request refill after the timeout.
        assert_eq!(l.take(9, 1005 + LIFETIME_MS + 10), Take::Exact);
        assert_eq!(l.take(9, 1005 + LIFETIME_MS + 22), Take::Refill);
    }
}
