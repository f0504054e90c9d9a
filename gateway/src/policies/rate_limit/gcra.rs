//! The bucket arithmetic every store uses: GCRA, the generic cell rate algorithm (ITU-T I.371;
//! what redis-cell and Stripe's limiter use), which is a token bucket kept as a single number.
//!
//! A rule `rate: N/unit, burst: B` has an emission interval `T = unit / N` (the time one request
//! uses up) and a tolerance `τ = (B - 1) × T`. A key's state is its TAT, the theoretical arrival
//! time: the moment its bucket would be full again. A request at `now` is admitted when
//! `max(TAT, now) - now <= τ`, and then moves the TAT on by `T`. So a quiet key admits `B`
//! requests at once and then one every `T`; a TAT at or before `now` is a full bucket, exactly
//! what an unknown key is — which is why the local table can forget such keys for free.
//!
//! One number per key (no separate token count and refill time) is what makes the local store's
//! update a single compare-and-swap and the Redis script a `GET` and a `SET`.

use std::time::Duration;

/// One rule's bucket shape, in nanoseconds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Gcra {
    /// `T`: nanoseconds per request.
    pub interval: u64,
    /// `τ = (burst - 1) × T`.
    pub tolerance: u64,
    pub burst: u64,
}

/// What a bucket said about one request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    Admit {
        /// Requests the bucket would still admit right now.
        remaining: u64,
        /// Until the bucket is full again.
        reset: Duration,
    },
    Refuse {
        /// Until one request is admitted again.
        retry_after: Duration,
        reset: Duration,
    },
}

impl Gcra {
    pub fn new(interval: Duration, burst: u64) -> Gcra {
        let interval = u64::try_from(interval.as_nanos())
            .unwrap_or(u64::MAX)
            .max(1);
        Gcra {
            interval,
            tolerance: interval.saturating_mul(burst.saturating_sub(1)),
            burst: burst.max(1),
        }
    }

    /// Decides one request at `now` for a key whose TAT is `tat` (0 for an unknown key): the
    /// new TAT to store when admitted, and the outcome.
    pub fn decide(&self, tat: u64, now: u64) -> (Option<u64>, Outcome) {
        let tat = tat.max(now);
        let ahead = tat - now;
        if ahead > self.tolerance {
            let outcome = Outcome::Refuse {
                retry_after: Duration::from_nanos(ahead - self.tolerance),
                reset: Duration::from_nanos(ahead),
            };
            return (None, outcome);
        }
        let new = tat.saturating_add(self.interval);
        let ahead = new - now;
        let outcome = Outcome::Admit {
            remaining: self.remaining(ahead),
            reset: Duration::from_nanos(ahead),
        };
        (Some(new), outcome)
    }

    /// Requests admitted at once by a bucket whose TAT is `ahead` nanoseconds after now.
    fn remaining(&self, ahead: u64) -> u64 {
        self.tolerance
            .checked_sub(ahead)
            .map_or(0, |room| room / self.interval + 1)
            .min(self.burst)
    }

    /// The TAT after one admitted request is given back (a later rule refused the request).
    pub fn refund(&self, tat: u64, now: u64) -> u64 {
        tat.saturating_sub(self.interval).max(now)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: u64 = 1_000_000;

    #[test]
    fn a_quiet_key_admits_the_burst_then_one_per_interval() {
        let g = Gcra::new(Duration::from_millis(10), 3);
        let (mut tat, mut now) = (0, 1_000 * MS);
        let mut admitted = Vec::new();
        for _ in 0..5 {
            match g.decide(tat, now) {
                (Some(t), Outcome::Admit { remaining, .. }) => {
                    tat = t;
                    admitted.push(remaining);
                }
                (None, Outcome::Refuse { retry_after, .. }) => {
                    assert_eq!(retry_after, Duration::from_millis(10));
                    break;
                }
                other => panic!("{other:?}"),
            }
        }
        assert_eq!(admitted, [2, 1, 0], "three at once, counting down");
        now += 10 * MS;
        assert!(matches!(
            g.decide(tat, now),
            (Some(_), Outcome::Admit { remaining: 0, .. })
        ));
        // A long pause refills the whole burst and no more.
        now += 10_000 * MS;
        let (_, outcome) = g.decide(tat, now);
        assert_eq!(
            outcome,
            Outcome::Admit {
                remaining: 2,
                reset: Duration::from_millis(10)
            }
        );
    }

    #[test]
    fn over_a_long_run_the_rate_holds() {
        // 100/s, burst 20, a request every millisecond for 10 s: 20 + 100 × 10 admitted.
        let g = Gcra::new(Duration::from_millis(10), 20);
        let (mut tat, mut admitted) = (0, 0);
        for ms in 0..10_000u64 {
            if let (Some(t), _) = g.decide(tat, 1_000 * MS + ms * MS) {
                tat = t;
                admitted += 1;
            }
        }
        assert_eq!(admitted, 20 + 1_000 - 1);
        assert_eq!(g.refund(tat, 0), tat - 10 * MS);
    }
}
