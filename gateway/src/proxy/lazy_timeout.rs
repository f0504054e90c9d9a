//! Timeouts that cost nothing when the operation does not wait.
//!
//! Most reads and writes on the request path are ready at once: a head written to a pooled Pod
//! connection, a request head read after the socket said it was readable, a body piece already
//! in the kernel. `tokio::time::timeout` builds a timer entry (a clock read, a wheel insert, a
//! removal on drop) before its first poll, ready or not: four per proxied HTTP/1.1 request,
//! ~1,500 instructions of ~22,500 (callgrind, `benches/load/instructions.py h1`). [`within`] polls
//! the operation once first and arms a timer only when it has to wait. The bound
//! is the same: a wait starts at the first poll that returned `Pending` (a few microseconds
//! later than the call), and the operation gets no more than `limit` from then.

use std::future::Future;
use std::pin::pin;
use std::task::Poll;
use std::time::Duration;

/// The operation did not finish in time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Elapsed;

/// `op`'s output, or [`Elapsed`] if it waited `limit` without finishing.
///
/// Once the first poll returned `Pending`, `op` is not polled again until its task is woken:
/// that poll registered the waker already (`tokio::time::timeout` would poll it a second time
/// at once, ~220 instructions for a socket read that waits for a Pod's answer, callgrind).
pub async fn within<F: Future>(limit: Duration, op: F) -> Result<F::Output, Elapsed> {
    let mut op = pin!(op);
    if let Poll::Ready(v) = poll_once(op.as_mut()).await {
        return Ok(v);
    }
    let mut sleep = pin!(tokio::time::sleep(limit));
    let mut woken = false;
    std::future::poll_fn(|cx| {
        if woken {
            if let Poll::Ready(v) = op.as_mut().poll(cx) {
                return Poll::Ready(Ok(v));
            }
        }
        woken = true;
        sleep.as_mut().poll(cx).map(|()| Err(Elapsed))
    })
    .await
}

/// Polls `op` once, with the caller's waker (so a `Pending` is woken as usual).
async fn poll_once<F: Future>(mut op: std::pin::Pin<&mut F>) -> Poll<F::Output> {
    std::future::poll_fn(|cx| Poll::Ready(op.as_mut().poll(cx))).await
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Instant;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[tokio::test]
    async fn a_ready_operation_needs_no_timer_and_a_waiting_one_is_bounded() {
        // Ready at once: the output, even with a zero limit (no timer was ever polled).
        assert_eq!(within(Duration::ZERO, async { 7 }).await, Ok(7));

        // Waiting for bytes that never come: cut at the limit, not before.
        let (mut ours, _theirs) = tokio::io::duplex(64);
        let started = Instant::now();
        let mut buf = [0u8; 8];
        let r = within(Duration::from_millis(100), ours.read(&mut buf)).await;
        assert_eq!(r.unwrap_err(), Elapsed);
        assert!(started.elapsed() >= Duration::from_millis(95));

        // Waiting for bytes that come later: the wake-up of the first poll is honoured.
        let (mut ours, mut theirs) = tokio::io::duplex(64);
        let writer = tokio::spawn(async move {
            tokio::task::yield_now().await;
            theirs.write_all(b"late").await.unwrap();
            theirs
        });
        let n = within(Duration::from_secs(10), ours.read(&mut buf))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(&buf[..n], b"late");
        drop(writer.await.unwrap());
    }
}
