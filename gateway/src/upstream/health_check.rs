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
        if conf.kind == CheckKind::Grpc {
            return grpc_check(stream, host, connector.is_tls()).await;
        }
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

/// The gRPC health protocol's `Check` for the whole server (an empty `service`), over h2 on
/// `stream`: healthy when the call ends with `grpc-status: 0` and the answer says SERVING.
///
/// The messages are tiny and fixed, so they are written and read here by hand rather than
/// through a protobuf library: the request is an empty `HealthCheckRequest` (a 5-byte gRPC frame
/// of zeros), the answer a `HealthCheckResponse` whose field 1 (`status`, a varint) is
/// 1 for SERVING.
async fn grpc_check<S>(stream: S, host: &str, tls: bool) -> Result<(), String>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let (client, conn) = h2::client::handshake(stream)
        .await
        .map_err(|e| format!("h2 handshake: {e}"))?;
    // The connection is driven here, beside the call, and dropped with it (no task left over).
    let call = async move {
        let mut client = client.ready().await.map_err(|e| format!("h2: {e}"))?;
        let scheme = if tls { "https" } else { "http" };
        let req = http::Request::post(format!("{scheme}://{host}/grpc.health.v1.Health/Check"))
            .header("content-type", "application/grpc")
            .header("te", "trailers")
            .header("user-agent", "podgate-health-check")
            .body(())
            .map_err(|e| format!("request: {e}"))?;
        let (answer, mut send) = client
            .send_request(req, false)
            .map_err(|e| format!("h2: {e}"))?;
        send.send_data(bytes::Bytes::from_static(&[0; 5]), true)
            .map_err(|e| format!("h2: {e}"))?;
        let answer = answer.await.map_err(|e| format!("h2: {e}"))?;
        if answer.status() != http::StatusCode::OK {
            return Err(format!("HTTP status {}", answer.status().as_u16()));
        }
        let head_status = answer.headers().get("grpc-status").cloned();
        let mut body = answer.into_body();
        let mut data = Vec::new();
        while let Some(chunk) = body.data().await {
            let chunk = chunk.map_err(|e| format!("h2: {e}"))?;
            let _ = body.flow_control().release_capacity(chunk.len());
            data.extend_from_slice(&chunk);
            if data.len() > 1024 {
                return Err("answer larger than a health status".into());
            }
        }
        let trailers = body.trailers().await.map_err(|e| format!("h2: {e}"))?;
        let status = trailers
            .as_ref()
            .and_then(|t| t.get("grpc-status"))
            .or(head_status.as_ref())
            .map(|v| v.as_bytes().to_vec());
        match status.as_deref() {
            Some(b"0") => {}
            Some(other) => {
                return Err(format!("grpc-status {}", String::from_utf8_lossy(other)));
            }
            None => return Err("no grpc-status".into()),
        }
        match serving_status(&data) {
            Some(1) => Ok(()),
            Some(s) => Err(format!("health status {s} (1 is SERVING)")),
            None => Err("no health status in the answer".into()),
        }
    };
    tokio::select! {
        r = call => r,
        r = conn => Err(match r {
            Ok(()) => "the Pod closed the connection".to_string(),
            Err(e) => format!("h2: {e}"),
        }),
    }
}

/// Field 1 (`status`) of the `HealthCheckResponse` in gRPC frame `data` (1 byte flag, 4 bytes
/// length, message); `None` if the frame is compressed, cut short or holds no such field.
fn serving_status(data: &[u8]) -> Option<u64> {
    let (&flag, rest) = data.split_first()?;
    if flag != 0 || rest.len() < 4 {
        return None;
    }
    let len = u32::from_be_bytes([rest[0], rest[1], rest[2], rest[3]]) as usize;
    let mut msg = rest.get(4..4usize.checked_add(len)?)?;
    // A missing field 1 is its default, 0 (UNKNOWN).
    let mut status = 0;
    while let Some((&tag, tail)) = msg.split_first() {
        // Only varint fields are expected; anything else ends the walk.
        if tag & 7 != 0 {
            break;
        }
        let mut value = 0u64;
        let mut used = 0;
        for (i, b) in tail.iter().enumerate().take(10) {
            value |= u64::from(b & 0x7f) << (7 * i);
            used = i + 1;
            if b & 0x80 == 0 {
                break;
            }
        }
        if used == 0 {
            return None;
        }
        if tag >> 3 == 1 {
            status = value;
        }
        msg = &tail[used..];
    }
    Some(status)
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
            if up.removed.load(std::sync::atomic::Ordering::SeqCst) {
                // A reload removed the upstream while this probe ran, and with it its series:
                // the count just made must not bring one back.
                let _ = CHECKS.remove_label_values(&[&up.conf.name, label]);
            }
            let flipped = b.info.health.active.observe(result.is_ok(), &conf);
            if flipped.is_some() {
                // Healthy capacity changed: picks look at health records again (or stop), and
                // tiers and zones re-divide the traffic.
                up.recount_down();
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
    fn health_answers_are_read_without_panics() {
        assert_eq!(serving_status(&[0, 0, 0, 0, 2, 8, 1]), Some(1));
        assert_eq!(serving_status(&[0, 0, 0, 0, 2, 8, 2]), Some(2));
        assert_eq!(serving_status(&[0, 0, 0, 0, 0]), Some(0));
        assert_eq!(serving_status(&[1, 0, 0, 0, 2, 8, 1]), None);
        assert_eq!(serving_status(&[0, 0, 0, 0, 9, 8, 1]), None);
        assert_eq!(serving_status(&[0, 0xff, 0xff, 0xff, 0xff]), None);
        for a in 0..=255u8 {
            for b in 0..=255u8 {
                let _ = serving_status(&[0, 0, 0, 0, 2, a, b]);
                let _ = serving_status(&[0, 0, 0, 0, 3, 8, a, b]);
            }
        }
    }

    #[test]
    fn phases_stay_within_the_interval() {
        let i = Duration::from_secs(5);
        for port in 1..200u16 {
            assert!(phase(&SocketAddr::from(([10, 0, 0, 1], port)), i) < i);
        }
    }
}
