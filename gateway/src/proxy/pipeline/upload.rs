//! The request body on its way to Pods: what was read of it, what of that can be sent again to
//! another Pod, and the route's `max_body`.
//!
//! A body is sent again only whole: a retry needs every byte read so far still in hand
//! ([`Upload::intact`]). Bodies up to `BUFFERED_BODY` are read before the Pod is chosen (HTTP/1.1
//! `Content-Length` bodies, and h2 bodies for HTTP/1.1 Pods), larger and chunked ones stream and
//! are not kept, except between an h2 client and an h2 Pod: there the body cannot be read first
//! (a streaming call's client may wait for the Pod's answer before it sends more), so what goes
//! out is kept while it stays small, and a call the Pod refused unprocessed can go again.

use super::body::{BodyEvent, BodySource, ClientFail};
use crate::proxy::h1::body::BUFFERED_BODY;
use bytes::{Bytes, BytesMut};

pub(crate) struct Upload {
    /// The body read so far, while all of it is kept ([`Upload::intact`]).
    held: Bytes,
    intact: bool,
    /// The client's body was read to its end.
    ended: bool,
    read: u64,
    max: Option<u64>,
    declared: Option<u64>,
    /// Keep streamed pieces too (while they fit in `BUFFERED_BODY`).
    hold_streamed: bool,
}

impl Upload {
    pub(crate) fn new(declared: Option<u64>, max: Option<u64>, hold_streamed: bool) -> Self {
        Upload {
            held: Bytes::new(),
            intact: true,
            ended: declared == Some(0),
            read: 0,
            max,
            declared,
            hold_streamed,
        }
    }

    /// Takes the start of the body read before any Pod was chosen (`complete`: all of it).
    pub(crate) fn start(&mut self, bytes: Bytes, complete: bool) -> Result<(), ClientFail> {
        self.read += bytes.len() as u64;
        if self.max.is_some_and(|m| self.read > m) {
            return Err(ClientFail::TooLarge);
        }
        self.held = bytes;
        self.ended |= complete;
        Ok(())
    }

    /// What was read of the body so far, to be sent (again) at the start of an attempt.
    pub(crate) fn held(&self) -> &Bytes {
        &self.held
    }

    /// Every byte read so far is in [`Upload::held`]: an attempt can start from the beginning.
    pub(crate) fn intact(&self) -> bool {
        self.intact
    }

    /// The client's body was read to its end.
    pub(crate) fn ended(&self) -> bool {
        self.ended
    }

    /// The whole body is in hand: nothing more comes from the client.
    pub(crate) fn complete(&self) -> bool {
        self.ended && self.intact
    }

    /// The length to announce to the Pod: the client's `content-length`, or the size of a body
    /// read whole (none for an empty body without one).
    pub(crate) fn length(&self) -> Option<u64> {
        self.declared.or_else(|| {
            (self.complete() && !self.held.is_empty()).then_some(self.held.len() as u64)
        })
    }

    /// The next piece of the body from the client: counted against `max_body`, kept when the
    /// body is kept. After the end, waits until the client goes away (`Failed(Gone)`).
    pub(crate) async fn next<S: BodySource>(&mut self, src: &mut S) -> BodyEvent {
        if self.ended {
            // Only the client going away is news now (a source waits for it after its end).
            loop {
                if let BodyEvent::Failed(f) = src.next().await {
                    return BodyEvent::Failed(f);
                }
            }
        }
        match src.next().await {
            BodyEvent::Data(data) => {
                self.read += data.len() as u64;
                if self.max.is_some_and(|m| self.read > m) {
                    return BodyEvent::Failed(ClientFail::TooLarge);
                }
                if self.declared.is_some_and(|n| self.read > n) {
                    // Never more than announced: the excess would be the Pod's next request.
                    return BodyEvent::Failed(ClientFail::Bad);
                }
                self.keep(&data);
                BodyEvent::Data(data)
            }
            BodyEvent::End(trailers) => {
                if self.declared.is_some_and(|n| self.read != n) {
                    return BodyEvent::Failed(ClientFail::Bad);
                }
                self.ended = true;
                BodyEvent::End(trailers)
            }
            failed => failed,
        }
    }

    fn keep(&mut self, data: &Bytes) {
        if !self.intact {
            return;
        }
        if !self.hold_streamed || self.held.len() + data.len() > BUFFERED_BODY as usize {
            self.intact = false;
            self.held = Bytes::new();
        } else if self.held.is_empty() {
            self.held = data.clone();
        } else {
            let mut joined = BytesMut::with_capacity(self.held.len() + data.len());
            joined.extend_from_slice(&self.held);
            joined.extend_from_slice(data);
            self.held = joined.freeze();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Pieces(Vec<BodyEvent>);

    impl BodySource for Pieces {
        async fn next(&mut self) -> BodyEvent {
            if self.0.is_empty() {
                return BodyEvent::Failed(ClientFail::Gone(crate::proxy::ended::CLIENT_CLOSED));
            }
            self.0.remove(0)
        }
    }

    fn data(s: &'static str) -> BodyEvent {
        BodyEvent::Data(Bytes::from_static(s.as_bytes()))
    }

    #[tokio::test]
    async fn streamed_bytes_past_max_body_are_refused_before_they_go_on() {
        let mut up = Upload::new(None, Some(5), false);
        let mut src = Pieces(vec![data("abc"), data("def"), BodyEvent::End(None)]);
        assert!(matches!(up.next(&mut src).await, BodyEvent::Data(_)));
        assert!(!up.intact(), "a streamed piece is not kept");
        assert!(matches!(
            up.next(&mut src).await,
            BodyEvent::Failed(ClientFail::TooLarge)
        ));
        let mut whole = Upload::new(Some(6), Some(5), false);
        assert_eq!(
            whole.start(Bytes::from_static(b"abcdef"), true),
            Err(ClientFail::TooLarge)
        );
    }

    #[tokio::test]
    async fn a_kept_body_stays_whole_and_more_than_declared_is_bad() {
        let mut up = Upload::new(Some(4), None, true);
        let mut src = Pieces(vec![data("ab"), data("cd"), BodyEvent::End(None)]);
        for _ in 0..2 {
            assert!(matches!(up.next(&mut src).await, BodyEvent::Data(_)));
        }
        assert!(matches!(up.next(&mut src).await, BodyEvent::End(None)));
        assert!(up.complete());
        assert_eq!((&up.held()[..], up.length()), (&b"abcd"[..], Some(4)));

        let mut short = Upload::new(Some(1), None, true);
        let mut src = Pieces(vec![data("ab")]);
        assert!(matches!(
            short.next(&mut src).await,
            BodyEvent::Failed(ClientFail::Bad)
        ));
    }
}
