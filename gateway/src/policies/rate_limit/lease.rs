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
//! A refusal is kept too: when Redis grants nothing it says when the next token is due, and
//! until then this replica refuses the key without asking again. So traffic over the limit —
//! the heavy part of an attack — costs Redis one call per key and replica per refill interval,
//! not one per request; requests that come while the refill after a refusal runs are refused
//! too (the tokens they miss stay in Redis for the next one). The token then due may go to
//! another replica: never more is admitted.
//!
//! State per key, one u64 in the [`Table`]: tokens (bits 42..63), refused (bit 41), refilling
//! (bit 40) and a deadline in milliseconds on the process clock (bits 0..39, 34 years): when the
//! lease ends, the refusal ends, or the refill may be taken over.

use super::table::{Rank, Table, Update};

/// A lease is spent within this, or what is left of it is dropped.
pub const LIFETIME_MS: u64 = 1_000;
pub const LIFETIME: std::time::Duration = std::time::Duration::from_millis(LIFETIME_MS);

const DEADLINE: u64 = (1 << 40) - 1;
const REFILLING: u64 = 1 << 40;
const REFUSED: u64 = 1 << 41;
const ONE: u64 = 1 << 42;

fn pack(tokens: u64, flags: u64, deadline_ms: u64) -> u64 {
    (tokens.min((1 << 22) - 1) << 42) | flags | (deadline_ms & DEADLINE)
}

fn tokens(s: u64) -> u64 {
    s >> 42
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
    /// Redis refused the key lately: no token is due for this long.
    Refused(std::time::Duration),
}

struct ByDeadline {
    now_ms: u64,
}

impl Rank for ByDeadline {
    fn rank(&self, s: u64) -> u64 {
        deadline(s)
    }
    fn idle(&self, s: u64) -> bool {
        deadline(s) <= self.now_ms || (tokens(s) == 0 && s & (REFILLING | REFUSED) == 0)
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
                // A refill after a refusal keeps the refused mark while it runs.
                let refill = |s: Option<u64>| {
                    let flags = REFILLING | s.map_or(0, |s| s & REFUSED);
                    (Some(pack(0, flags, self.now + self.refill)), Take::Refill)
                };
                let wait = |s: u64| std::time::Duration::from_millis(deadline(s) - self.now);
                let Some(s) = s.filter(|s| deadline(*s) > self.now) else {
                    return refill(s);
                };
                if tokens(s) > 0 {
                    (Some(s - ONE), Take::Served)
                } else if s & REFUSED != 0 {
                    // Refused, or refilling right after a refusal: the key was over its limit a
                    // moment ago, so the others wait for that refill instead of asking too.
                    (None, Take::Refused(wait(s)))
                } else if s & REFILLING != 0 {
                    (None, Take::Exact)
                } else {
                    refill(Some(s))
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
    /// none when Redis failed; the refilling mark is cleared either way.
    pub fn deposit(&self, key: u64, tokens: u64, now_ms: u64) {
        let state = match tokens {
            0 => pack(0, 0, now_ms),
            n => pack(n, 0, now_ms + LIFETIME_MS),
        };
        self.set(key, state, now_ms)
    }

    /// After a refill Redis refused: refuse the key here until `until_ms`.
    pub fn refuse(&self, key: u64, until_ms: u64, now_ms: u64) {
        self.set(key, pack(0, REFUSED, until_ms.max(now_ms + 1)), now_ms)
    }

    fn set(&self, key: u64, state: u64, now_ms: u64) {
        struct D(u64);
        impl Update for D {
            type Out = ();
            fn update(&mut self, _: Option<u64>) -> (Option<u64>, ()) {
                (Some(self.0), ())
            }
        }
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
        // A refusal holds until the next token is due, then the key is asked for again.
        l.refuse(9, 5000, 3000);
        assert_eq!(l.take(9, 3000), Take::Refused(Duration::from_millis(2000)));
        assert_eq!(l.take(9, 5000), Take::Refill);
        assert_eq!(l.take(9, 5001), Take::Refused(Duration::from_millis(20)));
        l.deposit(9, 3, 5002);
        assert_eq!(l.take(9, 5003), Take::Served);
    }
}
