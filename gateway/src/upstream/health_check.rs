//! Active health checks: probe each endpoint of an upstream every `interval`.
//!
//! - An endpoint starts healthy (Kubernetes already said it is ready); `unhealthy` failed probes
//!   in a row take it out, `healthy` good ones in a row bring it back.
//! - The result lives in the endpoint's shared [`Health`](crate::upstream::outlier::Health) record, so an
//!   endpoint-set update neither resets a known-bad Pod to healthy nor triggers extra probes.
//! - Probes of one round are spread over the interval (each address gets a fixed phase from its
//!   hash), and at most [`MAX_CONCURRENT_PROBES`] run at once per upstream, so thousands of Pods
//!   are not probed in lockstep.
//! - When every endpoint is down, picks still fall back to them: better a likely error than a
//!   certain 503.

use crate::config::{CheckKind, HealthCheckConf};
use crate::telemetry::metrics::CHECKS;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

pub const MAX_CONCURRENT_PROBES: usize = 64;

/// One probe of `addr`. `host` is the Host header for HTTP checks, which go through the
/// upstream's `connector`: over TLS, verified as requests are, for an https upstream.
pub async fn probe(
    addr: SocketAddr,
    conf: &HealthCheckConf,
    host: &str,
    connector: &crate::upstream::pool::Connector,
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

pub async fn round(up: &Arc<crate::upstream::Upstream>, conf: &HealthCheckConf) {
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
            let flipped = b.info.health.active.observe(result.is_ok(), &conf);
            if flipped.is_some() {
                // Healthy capacity changed: tiers and zones re-divide the traffic.
                up.replan();
            }
            match (flipped, &result) {
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
    use crate::upstream::outlier::Checked;

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
