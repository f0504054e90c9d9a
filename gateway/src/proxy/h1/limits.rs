//! The limits of client connections (deadlines and the head-memory budget), as
//! `proxy/h1/mod.rs` describes them.

use crate::config::ServerSettings;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// Deadlines and memory bounds toward clients (see the module comment).
#[derive(Clone, Debug)]
pub struct Limits {
    pub header_timeout: Duration,
    pub body_timeout: Duration,
    pub keepalive_timeout: Duration,
    /// Shared by all connections of the process that are reading a head.
    pub header_memory: Arc<HeadMemory>,
}

impl Limits {
    pub fn new(s: &ServerSettings) -> Self {
        Limits {
            header_timeout: s.client_header_timeout,
            body_timeout: s.client_body_timeout,
            keepalive_timeout: s.keepalive_timeout,
            header_memory: Arc::new(HeadMemory::new(s.header_memory)),
        }
    }
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            header_timeout: Duration::from_secs(60),
            body_timeout: Duration::from_secs(60),
            keepalive_timeout: Duration::from_secs(60),
            header_memory: Arc::new(HeadMemory::new(128 << 20)),
        }
    }
}

/// The budget of bytes that connections hold for heads not yet complete.
#[derive(Debug)]
pub struct HeadMemory {
    held: AtomicUsize,
    limit: usize,
}

impl HeadMemory {
    pub fn new(limit: usize) -> Self {
        HeadMemory {
            held: AtomicUsize::new(0),
            limit,
        }
    }

    /// Takes `n` bytes from the budget, if that many are left.
    fn take(&self, n: usize) -> bool {
        let before = self.held.fetch_add(n, Ordering::Relaxed);
        if before.saturating_add(n) > self.limit {
            self.held.fetch_sub(n, Ordering::Relaxed);
            return false;
        }
        true
    }

    fn give(&self, n: usize) {
        self.held.fetch_sub(n, Ordering::Relaxed);
    }

    /// Bytes held now.
    pub fn held(&self) -> usize {
        self.held.load(Ordering::Relaxed)
    }
}

/// Bytes of [`HeadMemory`] one connection holds while it reads a head; given back when dropped.
pub(super) struct HeadHold<'a> {
    pub(super) memory: &'a HeadMemory,
    pub(super) bytes: usize,
}

impl HeadHold<'_> {
    pub(super) fn grow(&mut self, n: usize) -> bool {
        let ok = self.memory.take(n);
        if ok {
            self.bytes += n;
        }
        ok
    }
}

impl Drop for HeadHold<'_> {
    fn drop(&mut self) {
        self.memory.give(self.bytes);
    }
}
