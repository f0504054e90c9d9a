//! The writer thread: writes the batches worker threads hand over, and every `flush / 2` sweeps
//! the buffers of all threads (so a line of a quiet thread waits at most `flush`), re-opens the
//! file when asked (SIGHUP, after a log rotation), and writes everything that is left when the
//! log closes.
//!
//! Each batch is one `write(2)` of whole lines, so lines never tear, even when two processes
//! append to the same file during a binary upgrade.

use super::buffer::{Batch, Slot};
use super::{Msg, Shared};
use std::io::Write;
use std::path::PathBuf;
use std::sync::atomic::Ordering::{Relaxed, SeqCst};
use std::sync::mpsc::{Receiver, RecvTimeoutError, Sender};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Where the lines go.
pub enum Out {
    Stdout,
    File { path: PathBuf, file: std::fs::File },
}

impl Out {
    pub fn open(path: PathBuf) -> std::io::Result<Out> {
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)?;
        Ok(Out::File { path, file })
    }

    fn write(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        match self {
            Out::Stdout => {
                let mut out = std::io::stdout().lock();
                out.write_all(bytes)?;
                out.flush()
            }
            Out::File { file, .. } => file.write_all(bytes),
        }
    }

    /// Opens the file again by its name: after a rotation moved it away, lines go to a new one.
    fn reopen(&mut self) {
        let Out::File { path, file } = self else {
            return;
        };
        match std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&*path)
        {
            Ok(new) => {
                *file = new;
                log::info!("access log: re-opened {}", path.display());
            }
            Err(e) => log::error!(
                "access log: cannot re-open {}: {e}; lines go on to the file opened before",
                path.display()
            ),
        }
    }
}

/// How often a failed write is reported in the log, at most.
const ERROR_EVERY: Duration = Duration::from_secs(60);

pub struct Writer {
    pub out: Out,
    pub shared: Arc<Shared>,
    pub rx: Receiver<Msg>,
    /// Told once everything is written at close.
    pub done: Sender<()>,
    /// Batches kept for reuse when a thread's spare cell is taken. Boxed: the cells hold
    /// boxes, and re-boxing would allocate.
    #[allow(clippy::vec_box)]
    pub pool: Vec<Box<Batch>>,
    pub last_error: Option<Instant>,
    pub failed_lines: u64,
}

impl Writer {
    pub fn run(mut self, flush: Duration) {
        // Sweeping twice per `flush` bounds a line's wait by `flush`, even when a sweep meets a
        // thread in the middle of a line (it holds its batch then) and has to skip it.
        let tick = flush / 2;
        let mut next_sweep = Instant::now() + tick;
        loop {
            let wait = next_sweep.saturating_duration_since(Instant::now());
            match self.rx.recv_timeout(wait) {
                Ok(Msg::Batch(slot, batch)) => self.write_batch(&slot, batch),
                Ok(Msg::Wake) | Err(RecvTimeoutError::Timeout) => {}
                // The log holds a sender for as long as this thread runs.
                Err(RecvTimeoutError::Disconnected) => return,
            }
            if self.shared.closed.load(SeqCst) {
                return self.close();
            }
            if self.shared.reopen.swap(false, SeqCst) {
                // What was logged before the signal goes to the file it was meant for.
                self.sweep();
                self.out.reopen();
            }
            if Instant::now() >= next_sweep {
                self.sweep();
                self.forget_ended_threads();
                next_sweep = Instant::now() + tick;
            }
        }
    }

    /// Writes what is queued and what every thread holds, then tells `close` it is done.
    fn close(mut self) {
        while let Ok(msg) = self.rx.try_recv() {
            if let Msg::Batch(slot, batch) = msg {
                self.write_batch(&slot, batch);
            }
        }
        self.sweep();
        log::info!(
            "access log closed: {} lines written, {} dropped since start",
            self.shared.written.load(Relaxed),
            self.shared.dropped.load(Relaxed)
        );
        let _ = self.done.send(());
    }

    fn write_batch(&mut self, slot: &Slot, mut batch: Box<Batch>) {
        if batch.lines > 0 {
            match self.out.write(&batch.bytes) {
                Ok(()) => {
                    self.shared.written.fetch_add(batch.lines, Relaxed);
                }
                Err(e) => self.failed(batch.lines, &e),
            }
        }
        // A line longer than the buffer grew this one; it goes back at its usual size.
        if batch.bytes.capacity() > self.shared.buffer * 2 {
            batch.bytes = Vec::with_capacity(self.shared.buffer);
        }
        batch.clear();
        if let Err(batch) = slot.spare.offer(batch) {
            if self.pool.len() < 4 {
                self.pool.push(batch);
            }
        }
    }

    /// Lines that could not be written count as dropped; the error is logged once a minute.
    fn failed(&mut self, lines: u64, e: &std::io::Error) {
        self.shared.drop_lines(lines);
        self.failed_lines += lines;
        if self.last_error.is_none_or(|t| t.elapsed() >= ERROR_EVERY) {
            log::error!(
                "access log: cannot write: {e}; {} lines dropped so far for write errors",
                self.failed_lines
            );
            self.last_error = Some(Instant::now());
        }
    }

    /// Writes what each thread's buffer holds. A thread in the middle of a line holds its batch;
    /// it is looked at again at the next sweep.
    fn sweep(&mut self) {
        let slots = self.shared.slots.load_full();
        for slot in slots.iter() {
            let Some(batch) = slot.current.take() else {
                continue;
            };
            if batch.lines == 0 {
                self.give_back(slot, batch);
                continue;
            }
            // The thread goes on with an empty batch while this one is written.
            if let Some(empty) = self.pool.pop() {
                self.give_back(slot, empty);
            }
            self.write_batch(slot, batch);
        }
    }

    /// Returns an empty batch to a thread's cell, else to its spare, else to the pool.
    fn give_back(&mut self, slot: &Slot, batch: Box<Batch>) {
        let Err(batch) = slot.current.offer(batch) else {
            return;
        };
        let Err(batch) = slot.spare.offer(batch) else {
            return;
        };
        if self.pool.len() < 4 {
            self.pool.push(batch);
        }
    }

    /// Drops the slots of threads that ended (only the list still refers to them), after
    /// writing what they logged last. Tests start and end runtimes by the hundred.
    fn forget_ended_threads(&mut self) {
        let slots = self.shared.slots.load_full();
        let mut ended = false;
        for slot in slots.iter().filter(|s| Arc::strong_count(s) == 1) {
            ended = true;
            if let Some(batch) = slot.current.take() {
                self.write_batch(slot, batch);
            }
        }
        if ended {
            self.shared.slots.rcu(|slots| {
                (slots.iter())
                    .filter(|s| Arc::strong_count(s) > 1)
                    .cloned()
                    .collect::<Vec<_>>()
            });
        }
    }
}
