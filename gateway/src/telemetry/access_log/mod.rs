//! The access log: one JSON line per request, kept in a buffer of the thread that served it and
//! written in batches by a thread of its own.
//!
//! The request path formats its line straight into its thread's buffer (`buffer.rs`: no lock,
//! no allocation, no system call). A thread hands its buffer to the writer once it holds
//! `access_log.buffer` bytes (64 KiB, ~180 lines), through a bounded queue; the writer writes
//! each batch with one `write(2)`, and every `flush / 2` sweeps the buffers of all threads, so a
//! line of a quiet thread reaches the file within `access_log.flush` (1 s). When the writer
//! falls behind (a slow disk, a blocked stdout pipe) the queue fills and whole batches are
//! dropped and counted (`podgate_access_log_dropped_total`) instead of slowing requests down.
//! [`AccessLog::close`] writes everything left (at a clean stop) and [`AccessLog::reopen`]
//! opens the file again by its name (on SIGHUP, after a log rotation).
//!
//! Why not a channel of lines, as before (and as `tracing-appender`'s non-blocking writer
//! does): measured (`benches/RESULTS.md`, "Access log"; perf stat under wrk, one worker pinned
//! to a core), a line per message woke the writer thread for almost every request: per request
//! 2.8 futex calls, 0.57 `write`s and 2.25 context switches, on the worker's own core, where the
//! writer thread and the switches took 45 % of podgate's CPU. Batches of 64 KiB bring that to
//! 0.027 futex calls, 0.006 writes and 0.03 switches per request, and 3 % of the CPU.

mod buffer;
mod clock;
mod writer;

pub use clock::{append as append_time, rfc3339};

use crate::config::{AccessLogSettings, AccessLogSink as Sink};
use arc_swap::ArcSwap;
use buffer::{Batch, Slot};
use prometheus::{register_int_counter, IntCounter};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed, Ordering::SeqCst};
use std::sync::mpsc::{sync_channel, Receiver, SyncSender, TrySendError};
use std::sync::{Arc, LazyLock, Mutex, Weak};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// What all queued batches may hold together before new ones are dropped: about what the old
/// queue of 16 Ki lines held (~6 MB of ~380-byte lines).
const QUEUE_BYTES: usize = 8 << 20;

/// Room left for the next line: a thread hands its batch over once less than this is free, so
/// that a typical line never makes the buffer grow.
const LINE_ROOM: usize = 1024;

/// How long [`AccessLog::close`] waits for the writer (a stdout pipe nobody reads must not hold
/// the process up).
const CLOSE_WAIT: Duration = Duration::from_secs(2);

static DROPPED: LazyLock<IntCounter> = LazyLock::new(|| {
    register_int_counter!(
        "podgate_access_log_dropped_total",
        "Access log lines dropped because the writer could not keep up."
    )
    .expect("metric registers once")
});

/// Every log started in this process, for [`close_all`].
static OPEN: Mutex<Vec<Weak<Shared>>> = Mutex::new(Vec::new());

/// A handle on the access log; clones share it. Without a sink (`enabled: false`) it does
/// nothing.
#[derive(Clone)]
pub struct AccessLog {
    shared: Option<Arc<Shared>>,
}

/// What the threads that log and the writer share.
struct Shared {
    /// Tells this log's slot apart in a thread's list of slots.
    id: u64,
    /// Every thread's slot, as they first log; the writer sweeps them.
    slots: ArcSwap<Vec<Arc<Slot>>>,
    tx: SyncSender<Msg>,
    /// `access_log.buffer`.
    buffer: usize,
    /// Set by `close`: the writer writes what is left and stops; lines logged later are dropped.
    closed: AtomicBool,
    /// Set by `reopen`, cleared by the writer.
    reopen: AtomicBool,
    /// Lines written so far.
    written: AtomicU64,
    /// Lines of this log dropped so far (`DROPPED` counts those of every log of the process).
    dropped: AtomicU64,
    /// Told by the writer when it is done at close; taken by the first `close`.
    done: Mutex<Option<Receiver<()>>>,
}

/// What the writer thread is sent.
enum Msg {
    /// A thread's full batch, and the slot it came from (the emptied batch goes back to it).
    Batch(Arc<Slot>, Box<Batch>),
    /// Look at `closed` and `reopen` now.
    Wake,
}

impl AccessLog {
    /// Opens the sink and starts the writer thread (none when the log is off).
    pub fn start(settings: &AccessLogSettings) -> std::io::Result<AccessLog> {
        // Exists at 0 from start, not only after the first drop.
        LazyLock::force(&DROPPED);
        let out = match &settings.sink {
            Sink::Off => return Ok(AccessLog { shared: None }),
            Sink::Stdout => writer::Out::Stdout,
            Sink::File(p) => writer::Out::open(p.clone())?,
        };
        static NEXT_ID: AtomicU64 = AtomicU64::new(1);
        let (tx, rx) = sync_channel((QUEUE_BYTES / settings.buffer).clamp(4, 2048));
        let (done_tx, done_rx) = std::sync::mpsc::channel();
        let shared = Arc::new(Shared {
            id: NEXT_ID.fetch_add(1, SeqCst),
            slots: ArcSwap::from_pointee(Vec::new()),
            tx,
            buffer: settings.buffer,
            closed: AtomicBool::new(false),
            reopen: AtomicBool::new(false),
            written: AtomicU64::new(0),
            dropped: AtomicU64::new(0),
            done: Mutex::new(Some(done_rx)),
        });
        let writer = writer::Writer {
            out,
            shared: shared.clone(),
            rx,
            done: done_tx,
            pool: Vec::new(),
            last_error: None,
            failed_lines: 0,
        };
        let flush = settings.flush;
        std::thread::Builder::new()
            .name("podgate-access-log".into())
            .spawn(move || writer.run(flush))?;
        let mut open = OPEN.lock().unwrap_or_else(|p| p.into_inner());
        open.retain(|w| w.strong_count() > 0);
        open.push(Arc::downgrade(&shared));
        Ok(AccessLog {
            shared: Some(shared),
        })
    }

    pub fn enabled(&self) -> bool {
        self.shared.is_some()
    }

    /// Appends one line, which `write` puts at the end of the buffer it is given (a JSON object;
    /// the newline is added here), to this thread's buffer. Never blocks, never fails: when the
    /// writer is behind, a full buffer is dropped and its lines counted.
    pub fn append(&self, write: impl FnOnce(&mut Vec<u8>)) {
        let Some(shared) = &self.shared else { return };
        let register = || {
            let slot = Slot::new();
            shared.slots.rcu(|slots| {
                let mut slots = Vec::clone(slots);
                slots.push(slot.clone());
                slots
            });
            slot
        };
        if buffer::with_slot(shared.id, register, |slot| shared.append(slot, write)).is_none() {
            shared.drop_lines(1);
        }
    }

    /// Opens the file again by its name (after a rotation moved it away); what was logged
    /// before goes to the file opened before. Returns at once; the writer does it.
    pub fn reopen(&self) {
        if let Some(shared) = &self.shared {
            shared.reopen.store(true, SeqCst);
            // A full queue means the writer is busy: it looks at the flag after each batch.
            let _ = shared.tx.try_send(Msg::Wake);
        }
    }

    /// Lines of this log dropped so far.
    pub fn dropped(&self) -> u64 {
        self.shared.as_ref().map_or(0, |s| s.dropped.load(Relaxed))
    }

    /// Writes every line logged so far (queued, or still in any thread's buffer) and stops the
    /// writer, waiting up to 2 s for it. Lines logged afterwards are counted as dropped. Meant
    /// for the end of the process, once the worker threads stopped; calling it again does
    /// nothing.
    pub fn close(&self) {
        if let Some(shared) = &self.shared {
            shared.close();
        }
    }
}

/// [`AccessLog::close`] for every access log of the process: the last step of a clean exit.
pub fn close_all() {
    let open: Vec<_> = OPEN
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .drain(..)
        .filter_map(|w| w.upgrade())
        .collect();
    for shared in open {
        shared.close();
    }
}

impl Shared {
    fn append(&self, slot: &Arc<Slot>, write: impl FnOnce(&mut Vec<u8>)) {
        // The writer may hold the thread's batch at this moment (writing it): go on with the
        // spare one, or a new one.
        let mut batch = (slot.current.take())
            .or_else(|| slot.spare.take())
            .unwrap_or_else(|| Batch::new(self.buffer));
        write(&mut batch.bytes);
        batch.bytes.push(b'\n');
        batch.lines += 1;
        if batch.bytes.len() + LINE_ROOM > self.buffer {
            batch = self.hand_over(slot, batch);
        }
        if let Some(mut offered) = slot.current.put(batch) {
            // The writer gave back an empty batch while this one was out.
            offered.clear();
            let _ = slot.spare.offer(offered);
        }
        // Pairs with `close`, which sets `closed` before its last sweep: either that sweep
        // finds the batch just put back, or this sees `closed` and counts its lines.
        if self.closed.load(SeqCst) {
            if let Some(late) = slot.current.take() {
                self.drop_lines(late.lines);
            }
        }
    }

    /// Queues a full batch for the writer; returns the (empty) batch to go on with.
    fn hand_over(&self, slot: &Arc<Slot>, batch: Box<Batch>) -> Box<Batch> {
        match self.tx.try_send(Msg::Batch(slot.clone(), batch)) {
            Ok(()) => (slot.spare.take()).unwrap_or_else(|| Batch::new(self.buffer)),
            Err(TrySendError::Full(msg) | TrySendError::Disconnected(msg)) => match msg {
                // Full (the writer is behind) or closed: these lines are dropped.
                Msg::Batch(_, mut batch) => {
                    self.drop_lines(batch.lines);
                    batch.clear();
                    batch
                }
                Msg::Wake => Batch::new(self.buffer),
            },
        }
    }

    fn drop_lines(&self, lines: u64) {
        DROPPED.inc_by(lines);
        self.dropped.fetch_add(lines, Relaxed);
    }

    fn close(&self) {
        let Some(done) = (self.done.lock().unwrap_or_else(|p| p.into_inner())).take() else {
            return;
        };
        self.closed.store(true, SeqCst);
        let _ = self.tx.try_send(Msg::Wake);
        if done.recv_timeout(CLOSE_WAIT).is_err() {
            log::error!(
                "access log: the writer did not finish within {CLOSE_WAIT:?} (a blocked stdout?); \
                 lines not yet written are lost"
            );
        }
    }
}

/// A request id: unique within the process and unlikely to repeat across processes: the
/// process's random seed and a counter, 32 lowercase hex digits.
///
/// Written by hand: `format!("{:016x}{:016x}")` cost about 1,450 instructions per request, 6 % of
/// a proxied HTTP/1.1 request (callgrind, `benches/load/instructions.py h1`); this is ~100.
pub fn request_id() -> MadeId {
    use std::sync::atomic::{AtomicU64, Ordering};
    static SEED: LazyLock<[u8; 16]> = LazyLock::new(|| {
        use std::hash::{BuildHasher, Hasher};
        let mut h = std::collections::hash_map::RandomState::new().build_hasher();
        h.write_u128(
            SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .unwrap_or_default()
                .as_nanos(),
        );
        h.write_u32(std::process::id());
        hex16(h.finish())
    });
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let mut id = [0u8; 32];
    id[..16].copy_from_slice(&*SEED);
    id[16..].copy_from_slice(&hex16(NEXT.fetch_add(1, Ordering::Relaxed)));
    MadeId(id)
}

/// A request id podgate made: 32 hex digits, held inline (no allocation per request).
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct MadeId([u8; 32]);

impl std::ops::Deref for MadeId {
    type Target = str;
    fn deref(&self) -> &str {
        // Hex digits only: always UTF-8 (the checked conversion, not the lossy one: that walks
        // the bytes in chunks, ~240 instructions).
        std::str::from_utf8(&self.0).unwrap_or_default()
    }
}

impl std::fmt::Debug for MadeId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self)
    }
}

impl std::fmt::Display for MadeId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self)
    }
}

/// `n` as 16 lowercase hex digits.
fn hex16(n: u64) -> [u8; 16] {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut out = [0u8; 16];
    for (i, d) in out.iter_mut().enumerate() {
        *d = DIGITS[((n >> (60 - 4 * i)) & 0xf) as usize];
    }
    out
}

#[cfg(test)]
mod tests;
