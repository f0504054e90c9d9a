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

/// Where `tracing` events of podgate's dependencies go (kube-client and the `h2` crate use
/// `tracing`, podgate `log`): events at a level the log filter lets through become log lines;
/// spans are never recorded.
///
/// Without a subscriber, `tracing` (its `log` feature is on, for kube-client) checks the log
/// level on every span entry and exit: the `h2` crate enters a span on each poll of a
/// connection. Measured (`benches/load/h2.py tls`, perf): 1.5 % of podgate's time in
/// `Span::log`, `Span::record_all` and their callers. With this subscriber installed, callsites
/// that it does not want are switched off once, when first reached.
pub struct TracingToLog;

impl TracingToLog {
    /// Installs it as the process-wide subscriber; after `RateLimited::init`, whose level it
    /// follows.
    pub fn init() {
        let _ =
            tracing_core::dispatcher::set_global_default(tracing_core::Dispatch::new(TracingToLog));
    }

    fn level(level: &tracing_core::Level) -> log::Level {
        match *level {
            tracing_core::Level::ERROR => log::Level::Error,
            tracing_core::Level::WARN => log::Level::Warn,
            tracing_core::Level::INFO => log::Level::Info,
            tracing_core::Level::DEBUG => log::Level::Debug,
            _ => log::Level::Trace,
        }
    }

    fn wanted(meta: &tracing_core::Metadata<'_>) -> bool {
        meta.is_event()
            && log::logger().enabled(
                &Metadata::builder()
                    .level(Self::level(meta.level()))
                    .target(meta.target())
                    .build(),
            )
    }
}

/// An event's fields as one line: its message, then `name=value` for the others.
#[derive(Default)]
struct Line(String);

impl tracing_core::field::Visit for Line {
    fn record_debug(&mut self, field: &tracing_core::Field, value: &dyn std::fmt::Debug) {
        use std::fmt::Write;
        if !self.0.is_empty() {
            self.0.push(' ');
        }
        let _ = if field.name() == "message" {
            write!(self.0, "{value:?}")
        } else {
            write!(self.0, "{}={value:?}", field.name())
        };
    }
}

impl tracing_core::Subscriber for TracingToLog {
    fn register_callsite(
        &self,
        meta: &'static tracing_core::Metadata<'static>,
    ) -> tracing_core::Interest {
        if Self::wanted(meta) {
            tracing_core::Interest::always()
        } else {
            tracing_core::Interest::never()
        }
    }

    fn max_level_hint(&self) -> Option<tracing_core::LevelFilter> {
        Some(match log::max_level() {
            log::LevelFilter::Off => tracing_core::LevelFilter::OFF,
            log::LevelFilter::Error => tracing_core::LevelFilter::ERROR,
            log::LevelFilter::Warn => tracing_core::LevelFilter::WARN,
            log::LevelFilter::Info => tracing_core::LevelFilter::INFO,
            log::LevelFilter::Debug => tracing_core::LevelFilter::DEBUG,
            log::LevelFilter::Trace => tracing_core::LevelFilter::TRACE,
        })
    }

    fn enabled(&self, meta: &tracing_core::Metadata<'_>) -> bool {
        Self::wanted(meta)
    }

    fn new_span(&self, _: &tracing_core::span::Attributes<'_>) -> tracing_core::span::Id {
        // Never called for a callsite refused above; an id is still required.
        tracing_core::span::Id::from_u64(1)
    }

    fn record(&self, _: &tracing_core::span::Id, _: &tracing_core::span::Record<'_>) {}

    fn record_follows_from(&self, _: &tracing_core::span::Id, _: &tracing_core::span::Id) {}

    fn event(&self, event: &tracing_core::Event<'_>) {
        let meta = event.metadata();
        let mut line = Line::default();
        event.record(&mut line);
        log::logger().log(
            &Record::builder()
                .args(format_args!("{}", line.0))
                .level(Self::level(meta.level()))
                .target(meta.target())
                .module_path_static(meta.module_path())
                .file_static(meta.file())
                .line(meta.line())
                .build(),
        );
    }

    fn enter(&self, _: &tracing_core::span::Id) {}

    fn exit(&self, _: &tracing_core::span::Id) {}
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

    /// Through the subscriber: an event the log level lets through becomes one log line with
    /// its fields; a quieter event and every span are switched off.
    #[test]
    fn tracing_events_become_log_lines_and_spans_stay_off() {
        static LINES: Mutex<Vec<String>> = Mutex::new(Vec::new());
        struct Capture;
        impl Log for Capture {
            fn enabled(&self, m: &Metadata) -> bool {
                m.level() <= log::Level::Info
            }
            fn log(&self, r: &Record) {
                if self.enabled(r.metadata()) {
                    let line = format!("{} {} {}", r.level(), r.target(), r.args());
                    LINES.lock().unwrap().push(line);
                }
            }
            fn flush(&self) {}
        }
        log::set_logger(&Capture).expect("the only logger of this test binary");
        log::set_max_level(log::LevelFilter::Info);
        let dispatch = tracing_core::Dispatch::new(TracingToLog);
        tracing_core::dispatcher::with_default(&dispatch, || {
            tracing::warn!(target: "kube_client", attempt = 3, "watch failed");
            tracing::debug!(target: "h2", "below the log level");
            let span = tracing::info_span!("connection", peer = 1);
            assert!(span.is_disabled(), "spans are never recorded");
            let _in = span.enter();
            tracing::info!(target: "h2", "inside a span");
        });
        assert_eq!(
            *LINES.lock().unwrap(),
            [
                "WARN kube_client watch failed attempt=3",
                "INFO h2 inside a span"
            ]
        );
    }
}
