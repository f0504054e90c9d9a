//! Each thread's buffer of access log lines, shared with the writer thread without a lock.
//!
//! A line goes into the buffer of the thread that served the request. That buffer (a [`Batch`])
//! sits in an atomic pointer, a [`BatchCell`]: the thread takes it out (one atomic swap), appends
//! its line and puts it back (another swap); the writer thread takes it out the same way to
//! write what a quiet thread holds. Neither side ever waits for the other. A thread that finds
//! its cell empty (the writer has the batch at that moment) goes on with its spare batch or a
//! new one; a writer that finds it empty (the thread is in the middle of a line) comes back at
//! its next sweep. A batch is owned by exactly one side at any time, so each line is written
//! once or counted as dropped once.

use std::cell::RefCell;
use std::ptr::null_mut;
use std::sync::atomic::{AtomicPtr, Ordering::SeqCst};
use std::sync::Arc;

/// Whole lines (each ending in `\n`) on their way to the writer.
pub struct Batch {
    pub bytes: Vec<u8>,
    pub lines: u64,
}

impl Batch {
    pub fn new(capacity: usize) -> Box<Batch> {
        Box::new(Batch {
            bytes: Vec::with_capacity(capacity),
            lines: 0,
        })
    }

    pub fn clear(&mut self) {
        self.bytes.clear();
        self.lines = 0;
    }
}

/// An owned `Box<Batch>` that two threads take in turns, or nothing.
///
/// Invariant: a non-null pointer in the cell always comes from `Box::into_raw`, and whoever
/// swaps it out owns it; so it is freed exactly once.
pub struct BatchCell(AtomicPtr<Batch>);

impl BatchCell {
    pub const fn empty() -> Self {
        BatchCell(AtomicPtr::new(null_mut()))
    }

    /// Takes what the cell holds.
    pub fn take(&self) -> Option<Box<Batch>> {
        let p = self.0.swap(null_mut(), SeqCst);
        // SAFETY: see the type's invariant; the swap handed the pointer to this caller alone.
        (!p.is_null()).then(|| unsafe { Box::from_raw(p) })
    }

    /// Puts `batch` in and returns what was there.
    pub fn put(&self, batch: Box<Batch>) -> Option<Box<Batch>> {
        let p = self.0.swap(Box::into_raw(batch), SeqCst);
        // SAFETY: as in `take`.
        (!p.is_null()).then(|| unsafe { Box::from_raw(p) })
    }

    /// Puts `batch` in if the cell is empty; otherwise hands it back.
    pub fn offer(&self, batch: Box<Batch>) -> Result<(), Box<Batch>> {
        let raw = Box::into_raw(batch);
        match self.0.compare_exchange(null_mut(), raw, SeqCst, SeqCst) {
            Ok(_) => Ok(()),
            // SAFETY: the exchange failed, so `raw` never entered the cell and is still ours.
            Err(_) => Err(unsafe { Box::from_raw(raw) }),
        }
    }
}

impl Drop for BatchCell {
    fn drop(&mut self) {
        drop(self.take());
    }
}

/// One thread's share of an access log.
pub struct Slot {
    /// The batch the thread appends to.
    pub current: BatchCell,
    /// An emptied batch the writer gave back: the thread's next one.
    pub spare: BatchCell,
}

impl Slot {
    pub fn new() -> Arc<Slot> {
        Arc::new(Slot {
            current: BatchCell::empty(),
            spare: BatchCell::empty(),
        })
    }
}

thread_local! {
    /// This thread's slot in each access log it wrote to, by the log's id. One entry in a
    /// running podgate (one log); tests may start several logs in one process.
    static MINE: RefCell<Vec<(u64, Arc<Slot>)>> = const { RefCell::new(Vec::new()) };
}

/// Runs `f` with this thread's slot in log `id`, made by `register` the first time. `None`
/// when the thread's locals are gone (a line logged from a destructor at thread exit).
pub fn with_slot<R>(
    id: u64,
    register: impl FnOnce() -> Arc<Slot>,
    f: impl FnOnce(&Arc<Slot>) -> R,
) -> Option<R> {
    MINE.try_with(|mine| {
        // Only a line logged while formatting a line could find it borrowed.
        let mut mine = mine.try_borrow_mut().ok()?;
        let i = match mine.iter().position(|(log, _)| *log == id) {
            Some(i) => i,
            None => {
                mine.push((id, register()));
                mine.len() - 1
            }
        };
        Some(f(&mine[i].1))
    })
    .ok()
    .flatten()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn batch(lines: u64) -> Box<Batch> {
        let mut b = Batch::new(16);
        b.lines = lines;
        b
    }

    #[test]
    fn a_cell_hands_each_batch_to_one_side() {
        let cell = BatchCell::empty();
        assert!(cell.take().is_none());
        assert!(cell.put(batch(1)).is_none());
        assert_eq!(
            cell.offer(batch(2)).unwrap_err().lines,
            2,
            "full: handed back"
        );
        assert_eq!(
            cell.put(batch(3)).unwrap().lines,
            1,
            "put returns what it replaced"
        );
        assert_eq!(cell.take().unwrap().lines, 3);
        assert!(cell.offer(batch(4)).is_ok());
        drop(cell); // frees the batch inside (checked by Miri / leak checkers)
    }

    #[test]
    fn two_threads_taking_turns_lose_and_duplicate_nothing() {
        // One side appends lines, the other takes whole batches; every line is seen once.
        let slot = Slot::new();
        let other = slot.clone();
        let taken = std::thread::spawn(move || {
            let mut seen = 0;
            for _ in 0..200_000 {
                if let Some(mut b) = other.current.take() {
                    seen += b.lines;
                    b.clear();
                    if let Err(b) = other.current.offer(b) {
                        let _ = other.spare.offer(b);
                    }
                }
            }
            seen
        });
        let mut sent = 0;
        for _ in 0..200_000 {
            let mut b = slot
                .current
                .take()
                .or_else(|| slot.spare.take())
                .unwrap_or_else(|| batch(0));
            b.lines += 1;
            sent += 1;
            if let Some(mut displaced) = slot.current.put(b) {
                assert_eq!(displaced.lines, 0, "only empty batches are offered back");
                displaced.clear();
            }
        }
        let seen = taken.join().unwrap();
        let left = slot.current.take().map_or(0, |b| b.lines);
        assert_eq!(seen + left, sent);
    }
}
