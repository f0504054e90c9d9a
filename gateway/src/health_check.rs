//! Active health checks: probe each endpoint of an upstream every `interval`.
//!
//! - An endpoint starts healthy (Kubernetes already said it is ready); `unhealthy` failed probes
//!   in a row take it out, `healthy` good ones in a row bring it back.
//! - The result lives in the endpoint's shared [`Health`](crate::outlier::Health) record, so an
//!   endpoint-set update neither resets a known-bad Pod to healthy nor triggers extra probes.
//! - Probes of one round are spread over the interval (each address gets a fixed phase from its
//!   hash), and at most [`MAX_CONCURRENT_PROBES`] run at once per upstream, so thousands of Pods
//!   are not probed in lockstep.
//! - When every endpoint is down, picks still fall back to them: better a likely error than a
//!   certain 503.

use crate::live::Live;
use async_trait::async_trait;
use pingora_core::server::ShutdownWatch;
use pingora_core::services::background::BackgroundService;
use prometheus::{register_int_counter_vec, IntCounterVec};
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, LazyLock};
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

pub const MAX_CONCURRENT_PROBES: usize = 64;

pub(crate) static CHECKS: LazyLock<IntCounterVec> = LazyLock::new(|| {
    register_int_counter_vec!(
        "podgate_health_checks_total",
        "Active health check probes by upstream and result (success, failure).",
        &["upstream", "result"]
    )
    .expect("metric registers once")
});

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CheckKind {
    /// A GET of `path`; the status must be in `expect`.
    Http,
    /// A TCP connect.
    Tcp,
}

#[derive(Clone, Debug, PartialEq)]
pub struct HealthCheckConf {
    pub kind: CheckKind,
    pub path: String,
    /// Inclusive status ranges that count as healthy.
    pub expect: Vec<(u16, u16)>,
    pub interval: Duration,
    pub timeout: Duration,
    pub healthy: u32,
    pub unhealthy: u32,
}

impl Default for HealthCheckConf {
    fn default() -> Self {
        HealthCheckConf {
            kind: CheckKind::Http,
            path: "/".into(),
            expect: vec![(200, 399)],
            interval: Duration::from_secs(5),
            timeout: Duration::from_secs(1),
            healthy: 2,
            unhealthy: 3,
        }
    }
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

/// One probe of `addr`. `host` is the Host header for HTTP checks, which go through the
/// upstream's `connector`: over TLS, verified as requests are, for an https upstream.
pub async fn probe(
    addr: SocketAddr,
    conf: &HealthCheckConf,
    host: &str,
    connector: &crate::h1::pool::Connector,
) -> Result<(), String> {
    let attempt = async {
        if conf.kind == CheckKind::Tcp {
            tokio::net::TcpStream::connect(addr)
                .await
                .map_err(|e| format!("connect: {e}"))?;
            return Ok(());
        }
        let mut stream = connector
            .connect(addr)
            .await
            .map_err(|e| format!("connect: {e}"))?
            .io;
        let req = format!(
            "GET {} HTTP/1.1\r\nHost: {host}\r\nUser-Agent: podgate-health-check\r\nConnection: close\r\n\r\n",
            conf.path
        );
        stream
            .write_all(req.as_bytes())
            .await
            .map_err(|e| format!("write: {e}"))?;
        // The status line is all that matters: "HTTP/1.1 200 OK".
        let mut buf = [0u8; 64];
        let mut got = 0;
        while got < 12 {
            let n = stream
                .read(&mut buf[got..])
                .await
                .map_err(|e| format!("read: {e}"))?;
            if n == 0 {
                return Err("closed before a status line".into());
            }
            got += n;
        }
        let line = String::from_utf8_lossy(&buf[..got]);
        let status: u16 = line
            .split(' ')
            .nth(1)
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| "no HTTP status line".to_string())?;
        if conf
            .expect
            .iter()
            .any(|(lo, hi)| (*lo..=*hi).contains(&status))
        {
            Ok(())
        } else {
            Err(format!("status {status}"))
        }
    };
    tokio::time::timeout(conf.timeout, attempt)
        .await
        .map_err(|_| format!("no answer within {:?}", conf.timeout))?
}

/// A fixed phase for `addr` within `interval`, so one round's probes are spread out.
fn phase(addr: &SocketAddr, interval: Duration) -> Duration {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    addr.hash(&mut h);
    let ms = interval.as_millis().max(1) as u64;
    Duration::from_millis(h.finish() % ms)
}

/// Runs the checks of every upstream that has `health_check`, following config reloads.
pub struct Checker(pub Arc<Live>);

#[async_trait]
impl BackgroundService for Checker {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        // Upstream name → (when its next round is due, whether a round is still running).
        let mut due: HashMap<String, (Instant, Arc<AtomicBool>)> = HashMap::new();
        let mut tick = tokio::time::interval(Duration::from_millis(100));
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                _ = shutdown.changed() => return,
            }
            let now = Instant::now();
            for up in self.0.upstreams().by_name.values() {
                let Some(conf) = up.conf.health_check.clone() else {
                    continue;
                };
                let (next, running) = due
                    .entry(up.conf.name.clone())
                    .or_insert_with(|| (now, Arc::new(AtomicBool::new(false))));
                if now < *next || running.swap(true, Ordering::Relaxed) {
                    continue;
                }
                *next = now + conf.interval;
                let (up, running) = (up.clone(), running.clone());
                tokio::spawn(async move {
                    round(&up, &conf).await;
                    running.store(false, Ordering::Relaxed);
                });
            }
        }
    }
}

async fn round(up: &Arc<crate::upstream::Upstream>, conf: &HealthCheckConf) {
    let limit = Arc::new(tokio::sync::Semaphore::new(MAX_CONCURRENT_PROBES));
    let selection = up.selection();
    let host = up.conf.host_header.clone();
    let mut probes = Vec::new();
    for b in selection.iter().cloned() {
        let (limit, conf, up, host) = (limit.clone(), conf.clone(), up.clone(), host.clone());
        probes.push(tokio::spawn(async move {
            tokio::time::sleep(phase(&b.addr, conf.interval) / 2).await;
            let Ok(_permit) = limit.acquire().await else {
                return;
            };
            let host = host.unwrap_or_else(|| b.addr.to_string());
            let result = probe(b.addr, &conf, &host, &up.connector).await;
            let label = if result.is_ok() { "success" } else { "failure" };
            CHECKS.with_label_values(&[&up.conf.name, label]).inc();
            match (b.info.health.active.observe(result.is_ok(), &conf), &result) {
                (Some(true), Err(why)) => log::warn!(
                    "upstream {}: {} is down after {} failed checks (last: {why})",
                    up.conf.name,
                    b.addr,
                    conf.unhealthy
                ),
                (Some(false), _) => log::info!(
                    "upstream {}: {} is healthy again after {} good checks",
                    up.conf.name,
                    b.addr,
                    conf.healthy
                ),
                _ => {}
            }
        }));
    }
    for p in probes {
        let _ = p.await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn thresholds_are_consecutive() {
        let conf = HealthCheckConf {
            healthy: 2,
            unhealthy: 3,
            ..HealthCheckConf::default()
        };
        let c = Checked::default();
        assert!(!c.is_down(), "starts healthy");
        assert_eq!(c.observe(false, &conf), None);
        assert_eq!(c.observe(false, &conf), None);
        assert_eq!(c.observe(true, &conf), None, "a success breaks the streak");
        assert_eq!(c.observe(false, &conf), None);
        assert_eq!(c.observe(false, &conf), None);
        assert_eq!(c.observe(false, &conf), Some(true));
        assert!(c.is_down());
        assert_eq!(c.observe(true, &conf), None);
        assert_eq!(c.observe(true, &conf), Some(false));
        assert!(!c.is_down());
    }

    #[test]
    fn phases_stay_within_the_interval() {
        let i = Duration::from_secs(5);
        for port in 1..200u16 {
            assert!(phase(&SocketAddr::from(([10, 0, 0, 1], port)), i) < i);
        }
    }
}
