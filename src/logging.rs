//! podgate's logger: env_logger's format and filter, with each log call site limited to
//! [`PER_SECOND`] lines a second.
//!
//! An error that repeats in a loop (an accept that fails at once while a runtime shuts down, a
//! Pod that refuses thousands of connections) must not fill a disk: issue 14 saw 25 GB of one
//! `Accept() failed` line in 10 minutes. Beyond the limit lines are counted, not written; the
//! next line written from the same site says how many were dropped.

use log::{Log, Metadata, Record};
use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Instant;

/// Lines one call site may write in one second.
pub const PER_SECOND: u32 = 10;

pub struct RateLimited {
    inner: env_logger::Logger,
    sites: Mutex<HashMap<(&'static str, u32), Site>>,
}

struct Site {
    window: Instant,
    written: u32,
    dropped: u64,
}

/// What to do with one line.
#[derive(Debug, PartialEq, Eq)]
pub enum Verdict {
    Write { dropped_before: u64 },
    Drop,
}

impl Site {
    /// Counts a line at `now` against the one-second window.
    fn admit(&mut self, now: Instant) -> Verdict {
        if now.duration_since(self.window).as_secs() >= 1 {
            self.window = now;
            self.written = 0;
        }
        if self.written >= PER_SECOND {
            self.dropped += 1;
            return Verdict::Drop;
        }
        self.written += 1;
        Verdict::Write {
            dropped_before: std::mem::take(&mut self.dropped),
        }
    }
}

impl RateLimited {
    /// Installs the logger (`RUST_LOG` as env_logger reads it; `info` by default).
    pub fn init() {
        let inner =
            env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info"))
                .build();
        let max = inner.filter();
        let logger = RateLimited {
            inner,
            sites: Mutex::new(HashMap::new()),
        };
        if log::set_boxed_logger(Box::new(logger)).is_ok() {
            log::set_max_level(max);
        }
    }

    fn verdict(&self, record: &Record) -> Verdict {
        let site = (
            record.file_static().unwrap_or(""),
            record.line().unwrap_or(0),
        );
        let now = Instant::now();
        let Ok(mut sites) = self.sites.lock() else {
            return Verdict::Write { dropped_before: 0 };
        };
        sites
            .entry(site)
            .or_insert(Site {
                window: now,
                written: 0,
                dropped: 0,
            })
            .admit(now)
    }
}

impl Log for RateLimited {
    fn enabled(&self, metadata: &Metadata) -> bool {
        self.inner.enabled(metadata)
    }

    fn log(&self, record: &Record) {
        if !self.inner.matches(record) {
            return;
        }
        match self.verdict(record) {
            Verdict::Drop => {}
            Verdict::Write { dropped_before: 0 } => self.inner.log(record),
            Verdict::Write { dropped_before } => self.inner.log(
                &Record::builder()
                    .args(format_args!(
                        "{} ({dropped_before} more like this dropped)",
                        record.args()
                    ))
                    .level(record.level())
                    .target(record.target())
                    .module_path(record.module_path())
                    .file(record.file())
                    .line(record.line())
                    .build(),
            ),
        }
    }

    fn flush(&self) {
        self.inner.flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn a_site_writes_ten_lines_a_second_and_then_says_what_it_dropped() {
        let start = Instant::now();
        let mut site = Site {
            window: start,
            written: 0,
            dropped: 0,
        };
        let verdicts: Vec<Verdict> = (0..1000).map(|_| site.admit(start)).collect();
        let written = verdicts.iter().filter(|v| **v != Verdict::Drop).count();
        assert_eq!(written, PER_SECOND as usize);
        assert_eq!(
            site.admit(start + Duration::from_millis(1500)),
            Verdict::Write {
                dropped_before: 1000 - u64::from(PER_SECOND)
            }
        );
        assert_eq!(
            site.admit(start + Duration::from_millis(1600)),
            Verdict::Write { dropped_before: 0 }
        );
    }
}
