//! The deadlines of client connections waiting for a request head: a keep-alive connection's
//! idle wait (`server.keepalive_timeout`, and the stop) and a head's own deadline
//! (`server.client_header_timeout`), kept in two lists per request thread instead of a tokio
//! timer per connection.
//!
//! Measured (issue 25, `benches/RESULTS.md`): an idle keep-alive connection cost 1,823 B, of
//! which the task was a 1,280 B allocation (1,536 B in the allocator: tokio aligns tasks to
//! 128 B, and mimalloc over-allocates an aligned block that is not a power of two). Its state
//! held, at the idle await point, two tokio `Sleep`s (112 B each: the keep-alive timeout and the
//! linger after the stop), a watch receiver's `Notified` (64 B) and tokio's readiness waiter;
//! the head loop added a third `Sleep`. Here an idle connection holds a 12-byte [`Deadline`]
//! naming an entry (48 B) in its thread's list, and the task fits 512 B.
//!
//! Every deadline in a list is "now + the same duration", so entries arrive in deadline order
//! and the list is a FIFO: adding, removing and firing are O(1), and one sleeping task per
//! thread and engine (the sweeper) wakes at the earliest deadline only. The sweeper also watches
//! the server's stop: `linger` after it, every idle keep-alive connection is told to close (its
//! client gets the same time to send one more request as a connection accepted an instant
//! before the listeners closed; see `server.rs`). Connections waiting for a head are not cut by
//! the stop: their deadline is the head's.
//!
//! The lists are thread-local: Pingora's request threads are single-threaded runtimes
//! (`work_stealing` is off), so a connection's task is polled and dropped on the thread that
//! registered its deadline, and no lock is taken. An entry is reached through its index and a
//! generation, so a [`Deadline`] that outlived its entry never touches another's.

use pingora_core::server::ShutdownWatch;
use std::cell::RefCell;
use std::future::poll_fn;
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

/// Which list an entry is in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// A request head's deadline (or the first head's, counted from the accept).
    Head = 0,
    /// A keep-alive connection waiting for its next request: closed at its deadline, and
    /// `linger` after the server began to stop.
    Idle = 1,
}

const NIL: u32 = u32::MAX;

struct Entry {
    at: Instant,
    waker: Option<Waker>,
    prev: u32,
    /// The next entry of the list (the next free entry while free).
    next: u32,
    generation: u32,
    kind: Kind,
    fired: bool,
    linked: bool,
}

#[derive(Clone, Copy)]
struct List {
    head: u32,
    tail: u32,
}

/// One engine's lists on one thread.
struct Wheel {
    engine: u64,
    entries: Vec<Entry>,
    free: u32,
    lists: [List; 2],
    /// `linger` after the stop: idle entries all fire then.
    cutoff: Option<Instant>,
    /// What the sweeper sleeps until (`None`: no entry, it waits to be told).
    armed: Option<Instant>,
    sweeper: Option<Waker>,
    /// An entry earlier than `armed` was added: the sweeper must look again.
    rearm: bool,
}

thread_local! {
    static WHEELS: RefCell<Vec<Wheel>> = const { RefCell::new(Vec::new()) };
}

fn with<R>(wheel: u32, f: impl FnOnce(&mut Wheel) -> R) -> Option<R> {
    WHEELS.with(|w| w.borrow_mut().get_mut(wheel as usize).map(f))
}

/// An engine's deadlines (one wheel per request thread, made on first use there).
#[derive(Debug)]
pub struct Timers {
    engine: u64,
    linger: Duration,
}

static NEXT_ENGINE: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);

impl Timers {
    /// For an engine whose idle connections close `linger` after the stop.
    pub fn new(linger: Duration) -> Self {
        Timers {
            engine: NEXT_ENGINE.fetch_add(1, std::sync::atomic::Ordering::Relaxed),
            linger,
        }
    }

    /// Starts a deadline at `at` in the `kind` list of this thread; `shutdown` is the server's
    /// stop, watched by this thread's sweeper (started here the first time).
    pub fn start(&self, kind: Kind, at: Instant, shutdown: &ShutdownWatch) -> Deadline {
        let wheel = WHEELS.with(|w| {
            let mut wheels = w.borrow_mut();
            if let Some(i) = wheels.iter().position(|w| w.engine == self.engine) {
                return i;
            }
            wheels.push(Wheel {
                engine: self.engine,
                entries: Vec::new(),
                free: NIL,
                lists: [List {
                    head: NIL,
                    tail: NIL,
                }; 2],
                cutoff: None,
                armed: None,
                sweeper: None,
                rearm: false,
            });
            let i = wheels.len() - 1;
            tokio::spawn(sweep(i as u32, shutdown.clone(), self.linger));
            i
        }) as u32;
        let (slot, generation) = with(wheel, |w| w.add(kind, at)).unwrap_or((NIL, 0));
        Deadline {
            wheel,
            slot,
            generation,
        }
    }
}

/// A deadline in this thread's list; removed when dropped.
#[must_use]
pub struct Deadline {
    wheel: u32,
    slot: u32,
    generation: u32,
}

impl Deadline {
    /// Ready once the deadline passed (or, for an idle wait, the stop's linger did).
    pub fn poll_expired(&self, cx: &mut Context<'_>) -> Poll<()> {
        // A waker replaced is dropped after the list is let go: dropping one may run code.
        let mut old = None;
        let pending = with(self.wheel, |w| {
            match w.entries.get_mut(self.slot as usize) {
                Some(e) if e.generation == self.generation && !e.fired => {
                    if !e.waker.as_ref().is_some_and(|w| w.will_wake(cx.waker())) {
                        old = e.waker.replace(cx.waker().clone());
                    }
                    true
                }
                _ => false,
            }
        });
        drop(old);
        if pending == Some(true) {
            Poll::Pending
        } else {
            Poll::Ready(())
        }
    }
}

impl Drop for Deadline {
    fn drop(&mut self) {
        let waker = with(self.wheel, |w| w.remove(self.slot, self.generation));
        drop(waker);
    }
}

impl Wheel {
    fn add(&mut self, kind: Kind, at: Instant) -> (u32, u32) {
        let at = match (kind, self.cutoff) {
            (Kind::Idle, Some(cutoff)) => at.min(cutoff),
            _ => at,
        };
        let slot = if self.free != NIL {
            let slot = self.free;
            self.free = self.entries[slot as usize].next;
            slot
        } else {
            self.entries.push(Entry {
                at,
                waker: None,
                prev: NIL,
                next: NIL,
                generation: 0,
                kind,
                fired: false,
                linked: false,
            });
            (self.entries.len() - 1) as u32
        };
        let e = &mut self.entries[slot as usize];
        e.at = at;
        e.kind = kind;
        e.fired = false;
        e.waker = None;
        let generation = e.generation;
        self.link(slot);
        // The sweeper sleeps until a later instant (or not at all): it must look again. Waking
        // it only schedules its task.
        if self.armed.is_none_or(|armed| at < armed) && !self.rearm {
            self.rearm = true;
            if let Some(w) = &self.sweeper {
                w.wake_by_ref();
            }
        }
        (slot, generation)
    }

    /// Links `slot` into its list, after the last entry not later than it (the tail, but for
    /// the microseconds by which connections accepted on other threads may come out of order).
    fn link(&mut self, slot: u32) {
        let (kind, at) = {
            let e = &self.entries[slot as usize];
            (e.kind as usize, e.at)
        };
        let mut after = self.lists[kind].tail;
        while after != NIL && self.entries[after as usize].at > at {
            after = self.entries[after as usize].prev;
        }
        let next = if after == NIL {
            self.lists[kind].head
        } else {
            self.entries[after as usize].next
        };
        {
            let e = &mut self.entries[slot as usize];
            e.prev = after;
            e.next = next;
            e.linked = true;
        }
        match after {
            NIL => self.lists[kind].head = slot,
            a => self.entries[a as usize].next = slot,
        }
        match next {
            NIL => self.lists[kind].tail = slot,
            n => self.entries[n as usize].prev = slot,
        }
    }

    fn unlink(&mut self, slot: u32) {
        let e = &mut self.entries[slot as usize];
        if !e.linked {
            return;
        }
        e.linked = false;
        let (prev, next, kind) = (e.prev, e.next, e.kind as usize);
        match prev {
            NIL => self.lists[kind].head = next,
            p => self.entries[p as usize].next = next,
        }
        match next {
            NIL => self.lists[kind].tail = prev,
            n => self.entries[n as usize].prev = prev,
        }
    }

    /// Frees `slot` if it is still this generation's; its waker, to be dropped by the caller.
    fn remove(&mut self, slot: u32, generation: u32) -> Option<Waker> {
        if self
            .entries
            .get(slot as usize)
            .is_none_or(|e| e.generation != generation)
        {
            return None;
        }
        self.unlink(slot);
        let e = &mut self.entries[slot as usize];
        e.generation = e.generation.wrapping_add(1);
        e.next = self.free;
        self.free = slot;
        e.waker.take()
    }

    /// Fires every entry due at `now`, putting their wakers in `woken`; the earliest deadline
    /// left.
    fn fire(&mut self, now: Instant, woken: &mut Vec<Waker>) -> Option<Instant> {
        let cut = self.cutoff.is_some_and(|c| now >= c);
        for kind in [Kind::Head, Kind::Idle] {
            loop {
                let front = self.lists[kind as usize].head;
                if front == NIL {
                    break;
                }
                let e = &self.entries[front as usize];
                if e.at > now && !(cut && kind == Kind::Idle) {
                    break;
                }
                self.unlink(front);
                let e = &mut self.entries[front as usize];
                e.fired = true;
                woken.extend(e.waker.take());
            }
        }
        let fronts = [Kind::Head, Kind::Idle].map(|k| {
            let h = self.lists[k as usize].head;
            (h != NIL).then(|| self.entries[h as usize].at)
        });
        let mut next = fronts.into_iter().flatten().min();
        if let Some(cutoff) = self.cutoff.filter(|c| *c > now) {
            if self.lists[Kind::Idle as usize].head != NIL {
                next = Some(next.map_or(cutoff, |n| n.min(cutoff)));
            }
        }
        next
    }
}

/// The sweeper of one wheel: fires its entries at their deadlines, and idle ones `linger` after
/// the stop. It sleeps while the wheel is empty and lives as long as the thread's runtime.
async fn sweep(wheel: u32, mut shutdown: ShutdownWatch, linger: Duration) {
    let far = || tokio::time::Instant::now() + Duration::from_secs(86400 * 365);
    let sleep = tokio::time::sleep_until(far());
    tokio::pin!(sleep);
    let mut watching = !*shutdown.borrow();
    if !watching {
        with(wheel, |w| w.cutoff = Some(Instant::now() + linger));
    }
    let mut woken = Vec::new();
    loop {
        let Some(next) = with(wheel, |w| {
            let next = w.fire(Instant::now(), &mut woken);
            w.armed = next;
            w.rearm = false;
            next
        }) else {
            return;
        };
        // Woken once the list is let go: a waker may run code that reaches it.
        for w in woken.drain(..) {
            w.wake();
        }
        sleep
            .as_mut()
            .reset(next.map_or_else(far, tokio::time::Instant::from_std));
        let told = poll_fn(|cx| {
            with(wheel, |w| {
                if w.rearm {
                    return Poll::Ready(());
                }
                if !w.sweeper.as_ref().is_some_and(|s| s.will_wake(cx.waker())) {
                    // The sweeper's own waker: replaced only when its task's changes, never
                    // while a connection's code runs.
                    w.sweeper = Some(cx.waker().clone());
                }
                Poll::Pending
            })
            .unwrap_or(Poll::Ready(()))
        });
        tokio::select! {
            biased;
            () = &mut sleep => {}
            () = told => {}
            changed = shutdown.changed(), if watching => {
                watching = false;
                if changed.is_ok() && *shutdown.borrow_and_update() {
                    with(wheel, |w| w.cutoff = Some(Instant::now() + linger));
                } else if changed.is_ok() {
                    watching = true;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn expired(d: &Deadline) {
        poll_fn(|cx| d.poll_expired(cx)).await
    }

    fn stop_watch() -> (tokio::sync::watch::Sender<bool>, ShutdownWatch) {
        tokio::sync::watch::channel(false)
    }

    #[tokio::test]
    async fn deadlines_fire_in_order_and_removed_ones_never() {
        let (_tx, shutdown) = stop_watch();
        let timers = Timers::new(Duration::from_secs(1));
        let now = Instant::now();
        let late = timers.start(Kind::Head, now + Duration::from_millis(300), &shutdown);
        let gone = timers.start(Kind::Head, now + Duration::from_millis(50), &shutdown);
        let early = timers.start(Kind::Idle, now + Duration::from_millis(100), &shutdown);
        drop(gone);
        expired(&early).await;
        assert!(now.elapsed() >= Duration::from_millis(100));
        assert!(
            std::future::poll_fn(|cx| Poll::Ready(late.poll_expired(cx)))
                .await
                .is_pending()
        );
        expired(&late).await;
        assert!(now.elapsed() >= Duration::from_millis(300));
    }

    #[tokio::test]
    async fn idle_waits_end_linger_after_the_stop_and_head_waits_do_not() {
        let (tx, shutdown) = stop_watch();
        let timers = Timers::new(Duration::from_millis(200));
        let now = Instant::now();
        let idle = timers.start(Kind::Idle, now + Duration::from_secs(3600), &shutdown);
        let head = timers.start(Kind::Head, now + Duration::from_secs(3600), &shutdown);
        tx.send(true).unwrap();
        tokio::time::timeout(Duration::from_secs(10), expired(&idle))
            .await
            .expect("the idle wait ends after the linger");
        assert!(now.elapsed() >= Duration::from_millis(200));
        assert!(
            std::future::poll_fn(|cx| Poll::Ready(head.poll_expired(cx)))
                .await
                .is_pending()
        );
        // After the linger, a new idle wait ends at once.
        let start = Instant::now();
        let later = timers.start(Kind::Idle, start + Duration::from_secs(3600), &shutdown);
        expired(&later).await;
        assert!(start.elapsed() < Duration::from_secs(5));
    }
}
