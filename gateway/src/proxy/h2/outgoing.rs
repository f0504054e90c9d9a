//! Bytes on their way into an h2 stream, toward a client or a Pod, sent as the receiver's
//! flow-control window allows: what waits is bounded ([`GATHER`]) so that a slow receiver holds
//! the sender back instead of filling podgate's memory.

use bytes::{Bytes, BytesMut};
use h2::SendStream;
use std::time::Duration;

/// Most bytes waiting for one receiver's window before the sender is read no further.
const GATHER: usize = 64 * 1024;

/// Bytes on their way into an h2 stream.
pub(crate) struct Outgoing {
    pub(crate) tx: SendStream<Bytes>,
    pending: Bytes,
    /// End the stream once `pending` is sent.
    end: bool,
    ended: bool,
}

impl Outgoing {
    pub(crate) fn new(tx: SendStream<Bytes>, pending: Bytes, end: bool, ended: bool) -> Self {
        Outgoing {
            tx,
            pending,
            end,
            ended,
        }
    }

    /// Whether something is left to send (bytes, or the end of the stream).
    pub(crate) fn busy(&self) -> bool {
        !self.ended && (!self.pending.is_empty() || self.end)
    }

    /// Whether bytes wait for the receiver's window.
    pub(crate) fn holds_bytes(&self) -> bool {
        !self.ended && !self.pending.is_empty()
    }

    /// Whether it can take another piece: what waits for the receiver's window is gathered up to
    /// [`GATHER`], so that the sender's DATA frames are read as they come (the `h2` crate closes
    /// a connection on which too many small frames wait unread) and go on in fewer, larger ones.
    pub(crate) fn wants_more(&self) -> bool {
        !self.end && !self.ended && self.pending.len() < GATHER
    }

    pub(crate) fn take(&mut self, data: Bytes, end: bool) {
        if self.pending.is_empty() {
            self.pending = data;
        } else if !data.is_empty() {
            let mut joined = BytesMut::with_capacity(self.pending.len() + data.len());
            joined.extend_from_slice(&self.pending);
            joined.extend_from_slice(&data);
            self.pending = joined.freeze();
        }
        self.end |= end;
    }

    /// Sends what the window allows of `pending` (waiting for window), and the end after it.
    /// Cancel-safe: dropped while waiting, nothing is lost.
    pub(crate) async fn push(&mut self) -> Result<(), h2::Error> {
        if self.pending.is_empty() {
            self.tx.send_data(Bytes::new(), true)?;
            self.ended = true;
            return Ok(());
        }
        self.tx.reserve_capacity(self.pending.len());
        match std::future::poll_fn(|cx| self.tx.poll_capacity(cx)).await {
            Some(Ok(n)) => {
                let part = self.pending.split_to(n.min(self.pending.len()));
                let last = self.pending.is_empty() && self.end;
                self.tx.send_data(part, last)?;
                self.ended = last;
                Ok(())
            }
            Some(Err(e)) => Err(e),
            None => Err(h2::Error::from(h2::Reason::STREAM_CLOSED)),
        }
    }

    /// Ends the stream with `trailers` once nothing is pending (`None`: an empty last DATA).
    pub(crate) fn finish(&mut self, trailers: Option<http::HeaderMap>) -> Result<(), h2::Error> {
        if self.ended {
            return Ok(());
        }
        self.ended = true;
        match trailers {
            Some(t) => self.tx.send_trailers(t),
            None => self.tx.send_data(Bytes::new(), true),
        }
    }
}

/// Sends `data` as the last of a stream's body: at once when the flow-control window takes it
/// (nearly always: an answer read whole is smaller than the windows), else piece by piece as the
/// receiver opens its window, within `timeout`. Pingora's `write_body` arms two timers and
/// reserves capacity in a loop for every piece; measured (`benches/load/h2.py tls`, perf) it was
/// 2.7 % of podgate's time, most answers being one piece. `Err` when the receiver is gone or
/// too slow, with the access log's `ended` for it.
pub(crate) async fn send_last(
    w: &mut SendStream<Bytes>,
    mut data: Bytes,
    timeout: Duration,
) -> Result<(), &'static str> {
    use crate::proxy::ended::{CLIENT_CLOSED, CLIENT_WRITE_TIMEOUT};
    if !data.is_empty() {
        w.reserve_capacity(data.len());
    }
    if w.capacity() >= data.len() {
        return w.send_data(data, true).map_err(|_| CLIENT_CLOSED);
    }
    let rest = async {
        loop {
            let room = match w.capacity() {
                0 => match std::future::poll_fn(|cx| w.poll_capacity(cx)).await {
                    Some(Ok(n)) => n,
                    _ => return false,
                },
                n => n,
            };
            let piece = data.split_to(room.min(data.len()));
            let last = data.is_empty();
            if w.send_data(piece, last).is_err() {
                return false;
            }
            if last {
                return true;
            }
            w.reserve_capacity(data.len());
        }
    };
    match tokio::time::timeout(timeout, rest).await {
        Ok(true) => Ok(()),
        Ok(false) => Err(CLIENT_CLOSED),
        Err(_) => {
            // The client kept its window shut: the stream is reset, nothing more waits for it.
            w.send_reset(h2::Reason::CANCEL);
            Err(CLIENT_WRITE_TIMEOUT)
        }
    }
}
