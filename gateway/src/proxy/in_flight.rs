//! What the process is still doing for clients, counted so that a graceful stop ends as soon as
//! the work does (`server.rs`), not at the end of `server.grace_period`.
//!
//! Two counts, process-wide: *work* (a request from its head's first byte until its answer is
//! out and, when the connection closes after it, until it closed; a tunnel for its whole life;
//! an h2 stream from its accept to its end; a TLS handshake once the ClientHello is in) and
//! *connections* (every client connection the request threads serve). The stop waits for work
//! to reach zero; connections only tell whether anything is left that could still bring a
//! request (an idle keep-alive connection whose next request is already on the wire).
//!
//! Counting is on the request path, so it takes no lock and shares no cache line between
//! threads: each thread adds to a slot of its own (a guard remembers its slot and gives back
//! there), and only the stop sums the slots. Wake-ups are sent only while stopping.

use std::cell::Cell;
use std::sync::atomic::{AtomicBool, AtomicIsize, AtomicUsize, Ordering};
use tokio::sync::Notify;

/// Slots the threads' counts are spread over (more threads share them, still correctly).
const SLOTS: usize = 16;

#[repr(align(64))]
struct Slot {
    work: AtomicIsize,
    connections: AtomicIsize,
}

#[allow(clippy::declare_interior_mutable_const)]
const EMPTY: Slot = Slot {
    work: AtomicIsize::new(0),
    connections: AtomicIsize::new(0),
};
static COUNTS: [Slot; SLOTS] = [EMPTY; SLOTS];
static NEXT_SLOT: AtomicUsize = AtomicUsize::new(0);
static STOPPING: AtomicBool = AtomicBool::new(false);
/// Told whenever a count drops while stopping.
static CHANGED: Notify = Notify::const_new();

thread_local! {
    static MY_SLOT: Cell<u8> = const { Cell::new(u8::MAX) };
}

fn my_slot() -> u8 {
    MY_SLOT.with(|s| {
        let mut i = s.get();
        if i == u8::MAX {
            i = (NEXT_SLOT.fetch_add(1, Ordering::Relaxed) % SLOTS) as u8;
            s.set(i);
        }
        i
    })
}

/// One piece of work in flight; done when dropped.
#[must_use]
pub struct Busy(u8);

/// One open client connection; closed when dropped.
#[must_use]
pub struct Connection(u8);

/// Counts a piece of work (see the module comment) until the result is dropped.
pub fn busy() -> Busy {
    let slot = my_slot();
    COUNTS[slot as usize].work.fetch_add(1, Ordering::Relaxed);
    Busy(slot)
}

/// Counts an open client connection until the result is dropped.
pub fn connection() -> Connection {
    let slot = my_slot();
    COUNTS[slot as usize]
        .connections
        .fetch_add(1, Ordering::Relaxed);
    Connection(slot)
}

impl Drop for Busy {
    fn drop(&mut self) {
        COUNTS[self.0 as usize].work.fetch_sub(1, Ordering::AcqRel);
        if STOPPING.load(Ordering::Relaxed) {
            CHANGED.notify_one();
        }
    }
}

impl Drop for Connection {
    fn drop(&mut self) {
        COUNTS[self.0 as usize]
            .connections
            .fetch_sub(1, Ordering::AcqRel);
        if STOPPING.load(Ordering::Relaxed) {
            CHANGED.notify_one();
        }
    }
}

/// Work in flight now, over all threads.
pub fn work() -> usize {
    let sum: isize = COUNTS.iter().map(|s| s.work.load(Ordering::Acquire)).sum();
    sum.max(0) as usize
}

/// Client connections open now, over all threads.
pub fn connections() -> usize {
    let sum: isize = COUNTS
        .iter()
        .map(|s| s.connections.load(Ordering::Acquire))
        .sum();
    sum.max(0) as usize
}

/// Waits until no work is in flight and, until `linger` from now has passed, no client
/// connection is open either: a connection accepted an instant before the listeners closed may
/// still bring a request within `linger` (see `server.rs`), while without any connection
/// nothing can come. Returns at once when all that holds already.
pub async fn drained(linger: std::time::Duration) {
    STOPPING.store(true, Ordering::Relaxed);
    let lingered = tokio::time::Instant::now() + linger;
    loop {
        let done = work() == 0 && (connections() == 0 || tokio::time::Instant::now() >= lingered);
        if done {
            return;
        }
        // A permit left by a drop since the check makes this return at once: nothing is missed.
        tokio::select! {
            () = CHANGED.notified() => {}
            () = tokio::time::sleep_until(lingered), if tokio::time::Instant::now() < lingered => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test]
    async fn the_stop_waits_for_work_and_for_lingering_connections() {
        // One test owns the process-wide counts.
        assert_eq!((work(), connections()), (0, 0));
        drained(Duration::from_secs(3600)).await;

        let busy = busy();
        let conn = connection();
        assert_eq!((work(), connections()), (1, 1));
        let waiter = tokio::spawn(drained(Duration::from_millis(50)));
        tokio::task::yield_now().await;
        assert!(!waiter.is_finished());
        // Work counted on another thread is given back to its own slot.
        std::thread::spawn(move || drop(busy)).join().unwrap();
        // The connection alone holds the stop only until the linger passed.
        tokio::time::timeout(Duration::from_secs(10), waiter)
            .await
            .expect("drained once the work ended and the linger passed")
            .unwrap();
        drop(conn);
        assert_eq!((work(), connections()), (0, 0));
    }
}
