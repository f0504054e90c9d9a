//! The access log: one JSON line per request, written by a thread of its own.
//!
//! The request path only formats the line and hands it to a bounded queue; when the writer falls
//! behind (a slow disk, a blocked stdout pipe) lines are dropped and counted
//! (`podgate_access_log_dropped_total`) instead of slowing requests down.

use crate::config::AccessLogSink as Sink;
use prometheus::{register_int_counter, IntCounter};
use std::io::Write;
use std::sync::mpsc::{sync_channel, SyncSender, TrySendError};
use std::sync::LazyLock;
use std::time::{SystemTime, UNIX_EPOCH};

/// Lines that may wait for the writer before new ones are dropped.
const QUEUE: usize = 16 * 1024;

static DROPPED: LazyLock<IntCounter> = LazyLock::new(|| {
    register_int_counter!(
        "podgate_access_log_dropped_total",
        "Access log lines dropped because the writer could not keep up."
    )
    .expect("metric registers once")
});

#[derive(Clone)]
pub struct AccessLog {
    tx: Option<SyncSender<Vec<u8>>>,
}

impl AccessLog {
    /// Starts the writer thread (none for [`Sink::Off`]).
    pub fn start(sink: &Sink) -> std::io::Result<AccessLog> {
        // Exists at 0 from start, not only after the first drop.
        LazyLock::force(&DROPPED);
        let mut out: Box<dyn Write + Send> = match sink {
            Sink::Off => return Ok(AccessLog { tx: None }),
            Sink::Stdout => Box::new(std::io::stdout()),
            Sink::File(p) => Box::new(
                std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(p)?,
            ),
        };
        let (tx, rx) = sync_channel::<Vec<u8>>(QUEUE);
        LazyLock::force(&DROPPED);
        std::thread::Builder::new()
            .name("podgate-access-log".into())
            .spawn(move || {
                let mut buf = std::io::BufWriter::with_capacity(64 * 1024, &mut out);
                while let Ok(line) = rx.recv() {
                    let _ = buf.write_all(&line);
                    // Flush when the queue is drained, so lines appear promptly under low load
                    // and are batched under high load.
                    while let Ok(more) = rx.try_recv() {
                        let _ = buf.write_all(&more);
                    }
                    let _ = buf.flush();
                }
            })?;
        Ok(AccessLog { tx: Some(tx) })
    }

    pub fn enabled(&self) -> bool {
        self.tx.is_some()
    }

    /// Queues one line (a JSON object; the newline is added here). Never blocks.
    pub fn write(&self, mut line: Vec<u8>) {
        let Some(tx) = &self.tx else { return };
        line.push(b'\n');
        match tx.try_send(line) {
            Ok(()) => {}
            Err(TrySendError::Full(_)) | Err(TrySendError::Disconnected(_)) => DROPPED.inc(),
        }
    }
}

/// RFC 3339 UTC time with milliseconds, e.g. `2026-11-22T09:12:27.123Z`.
pub fn rfc3339(t: SystemTime) -> String {
    let d = t.duration_since(UNIX_EPOCH).unwrap_or_default();
    let secs = d.as_secs() as i64;
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:03}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60,
        d.subsec_millis()
    )
}

/// A request id: unique within the process and unlikely to repeat across processes.
pub fn request_id() -> String {
    use std::sync::atomic::{AtomicU64, Ordering};
    static SEED: LazyLock<u64> = LazyLock::new(|| {
        use std::hash::{BuildHasher, Hasher};
        let mut h = std::collections::hash_map::RandomState::new().build_hasher();
        h.write_u128(
            SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .unwrap_or_default()
                .as_nanos(),
        );
        h.write_u32(std::process::id());
        h.finish()
    });
    static NEXT: AtomicU64 = AtomicU64::new(0);
    format!(
        "{:016x}{:016x}",
        *SEED,
        NEXT.fetch_add(1, Ordering::Relaxed)
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn rfc3339_of_known_instants() {
        assert_eq!(rfc3339(UNIX_EPOCH), "1970-01-01T00:00:00.000Z");
        let t = UNIX_EPOCH + Duration::from_millis(1_795_338_747_976);
        assert_eq!(rfc3339(t), "2026-11-22T09:12:27.976Z");
        let leap = UNIX_EPOCH + Duration::from_secs(951_782_400); // 2000-02-29
        assert_eq!(rfc3339(leap), "2000-02-29T00:00:00.000Z");
    }

    #[test]
    fn request_ids_differ() {
        assert_ne!(request_id(), request_id());
        assert_eq!(request_id().len(), 32);
    }
}
