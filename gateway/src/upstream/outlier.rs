//! Passive ejection ("outlier detection"): Pods that keep failing are taken out for a while.
//!
//! Connect errors, broken connections and 5xx answers from a Pod count as failures; any other
//! answer resets the count. After `consecutive_failures` in a row the Pod is ejected for
//! `base_ejection × times ejected` (at most [`MAX_EJECTION_FACTOR`] times the base), then gets
//! traffic again. No more than `max_ejection_percent` of an upstream's endpoints are ejected at
//! once: when more look bad the problem is probably not the Pods, and sending to all of them beats
//! sending everything to the few left (Envoy's panic threshold reasoning).
//!
//! The state of each endpoint lives in atomics shared by every selection the endpoint appears
//! in, so it survives endpoint-set updates, and the request path neither locks nor allocates.

use crate::config::{HealthCheckConf, OutlierConf};
use std::sync::atomic::AtomicBool;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::LazyLock;
use std::time::{Duration, Instant};

/// Ejections never last longer than this many base durations.
pub const MAX_EJECTION_FACTOR: u32 = 10;

static EPOCH: LazyLock<Instant> = LazyLock::new(Instant::now);

/// Milliseconds since the process started (never 0, so 0 can mean "not ejected").
pub fn now_ms() -> u64 {
    EPOCH.elapsed().as_millis() as u64 + 1
}

/// Everything known about one endpoint's health, shared by every selection it appears in.
#[derive(Debug, Default)]
pub struct Health {
    pub passive: Outlier,
    pub active: Checked,
    /// When the endpoint joined a running upstream (for slow start); `None` for endpoints of the
    /// first build, which carry full weight at once.
    pub joined: Option<Instant>,
    /// Requests on their way to or from this endpoint, counted for `balance: least_request` only
    /// (see `policy::least`); here so that the count survives endpoint-set updates.
    pub in_flight: std::sync::atomic::AtomicU32,
}

impl Health {
    pub fn joining(now: Instant) -> Self {
        Health {
            joined: Some(now),
            ..Health::default()
        }
    }

    /// The weight to use now: under slow start, `weight` ramps linearly from 1 over `window`
    /// after joining. Also returns whether the ramp is still going.
    pub fn ramped(&self, weight: u32, window: Option<Duration>, now: Instant) -> (u32, bool) {
        let (Some(window), Some(joined)) = (window, self.joined) else {
            return (weight, false);
        };
        let elapsed = now.saturating_duration_since(joined);
        if elapsed >= window || window.is_zero() {
            return (weight, false);
        }
        let share = elapsed.as_secs_f64() / window.as_secs_f64();
        (
            ((f64::from(weight) * share).ceil() as u32).clamp(1, weight),
            true,
        )
    }

    /// Whether picks should pass this endpoint over at `now` (0: no ejection can be running).
    pub fn avoid(&self, now: u64) -> bool {
        self.active.is_down() || (now != 0 && self.passive.is_ejected(now))
    }

    /// Whether the endpoint counts as healthy capacity at `now` (for failover tiers and zones):
    /// neither failing active checks nor passively ejected.
    pub fn healthy(&self, now: u64) -> bool {
        !self.active.is_down() && !self.passive.is_ejected(now)
    }
}

/// One endpoint's failure record.
#[derive(Debug, Default)]
pub struct Outlier {
    failures: AtomicU32,
    /// `now_ms()` until which the endpoint is ejected; 0 when it is not.
    ejected_until: AtomicU64,
    times_ejected: AtomicU32,
}

impl Outlier {
    pub fn is_ejected(&self, now: u64) -> bool {
        self.ejected_until.load(Ordering::Relaxed) > now
    }

    /// Records a good answer.
    pub fn success(&self) {
        if self.failures.load(Ordering::Relaxed) != 0 {
            self.failures.store(0, Ordering::Relaxed);
        }
        // Escalation is for Pods that fail again right after coming back; a good answer after an
        // ejection ended starts it over.
        let until = self.ejected_until.load(Ordering::Relaxed);
        if until != 0 && until <= now_ms() {
            self.ejected_until.store(0, Ordering::Relaxed);
            self.times_ejected.store(0, Ordering::Relaxed);
        }
    }

    /// Records a failure; returns how many failures in a row that makes.
    pub fn failure(&self) -> u32 {
        self.failures.fetch_add(1, Ordering::Relaxed) + 1
    }

    /// Ejects for `base × times ejected` (capped); returns for how long.
    pub fn eject(&self, conf: &OutlierConf, now: u64) -> Duration {
        let times =
            (self.times_ejected.fetch_add(1, Ordering::Relaxed) + 1).min(MAX_EJECTION_FACTOR);
        let took = conf.base_ejection * times;
        self.ejected_until
            .store(now + took.as_millis() as u64, Ordering::Relaxed);
        self.failures.store(0, Ordering::Relaxed);
        took
    }
}

/// May one more of `total` endpoints be ejected while `ejected` already are?
pub fn may_eject(conf: &OutlierConf, ejected: usize, total: usize) -> bool {
    total > 0 && (ejected + 1) * 100 <= conf.max_ejection_percent as usize * total
}

/// An endpoint's active-check state.
#[derive(Debug, Default)]
pub struct Checked {
    down: AtomicBool,
    streak_ok: AtomicU32,
    streak_fail: AtomicU32,
}

impl Checked {
    pub fn is_down(&self) -> bool {
        self.down.load(Ordering::Relaxed)
    }

    /// Records one probe; returns the new state (`true`: down) when it flipped.
    pub fn observe(&self, ok: bool, conf: &HealthCheckConf) -> Option<bool> {
        if ok {
            self.streak_fail.store(0, Ordering::Relaxed);
            let n = self.streak_ok.fetch_add(1, Ordering::Relaxed) + 1;
            if n >= conf.healthy && self.down.swap(false, Ordering::Relaxed) {
                return Some(false);
            }
        } else {
            self.streak_ok.store(0, Ordering::Relaxed);
            let n = self.streak_fail.fetch_add(1, Ordering::Relaxed) + 1;
            if n >= conf.unhealthy && !self.down.swap(true, Ordering::Relaxed) {
                return Some(true);
            }
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ejection_escalates_and_is_capped() {
        let conf = OutlierConf {
            base_ejection: Duration::from_secs(1),
            ..OutlierConf::default()
        };
        let o = Outlier::default();
        let now = now_ms();
        assert_eq!(o.eject(&conf, now), Duration::from_secs(1));
        assert!(o.is_ejected(now));
        assert!(!o.is_ejected(now + 1_000));
        assert_eq!(o.eject(&conf, now), Duration::from_secs(2));
        for _ in 0..20 {
            o.eject(&conf, now);
        }
        assert_eq!(o.eject(&conf, now), Duration::from_secs(10));
    }

    #[test]
    fn slow_start_ramps_linearly_from_one() {
        let start = Instant::now();
        let h = Health::joining(start);
        let w = Some(Duration::from_secs(10));
        assert_eq!(h.ramped(10, w, start), (1, true), "never below 1");
        assert_eq!(h.ramped(10, w, start + Duration::from_secs(5)), (5, true));
        assert_eq!(
            h.ramped(10, w, start + Duration::from_secs(10)),
            (10, false)
        );
        assert_eq!(
            h.ramped(10, None, start),
            (10, false),
            "off without a window"
        );
        assert_eq!(
            Health::default().ramped(10, w, start),
            (10, false),
            "first build: full"
        );
    }

    #[test]
    fn the_percentage_cap() {
        let conf = OutlierConf::default(); // 50 %
        assert!(may_eject(&conf, 0, 2));
        assert!(!may_eject(&conf, 1, 2));
        assert!(
            !may_eject(&conf, 0, 1),
            "a lone endpoint is never ejected at 50 %"
        );
        assert!(may_eject(&conf, 4, 10));
        assert!(!may_eject(&conf, 5, 10));
    }

    #[test]
    fn failures_count_up_and_successes_reset() {
        let o = Outlier::default();
        assert_eq!(o.failure(), 1);
        assert_eq!(o.failure(), 2);
        o.success();
        assert_eq!(o.failure(), 1);
    }
}
