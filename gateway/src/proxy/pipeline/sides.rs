//! The seams between the pipeline and the codecs: what a client codec hands the pipeline (an
//! [`Incoming`] request (`request.rs`) and a [`ClientSide`] to read its body from and answer through), what a
//! Pod codec gives back ([`PodSide`], [`PodAnswer`]), and the protocol-neutral pieces that travel
//! between them. Nothing here knows HTTP/1.1 or h2 framing; the codecs implement these traits,
//! once each (`proxy/h1/client.rs`, `proxy/h2/client.rs`, `proxy/h1/pod.rs`, `proxy/h2/pod.rs`).
//!
//! Every trait is used through generics, so each client × Pod pair is compiled as its own code
//! with no dynamic call on the request path; the pipeline is written once.

pub(crate) use super::body::{BodyEvent, BodySource, ClientFail, Ended, Trailers};
pub(crate) use super::request::{Forward, Incoming};
use super::upload::Upload;
use crate::upstream::balance::Backend;
use crate::upstream::{pool, Upstream};
use bytes::Bytes;
use http::{HeaderName, HeaderValue};
use std::ops::Range;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// The client of one exchange, as its codec serves it.
pub(crate) trait ClientSide: BodySource {
    /// The body can be read while the answer is relayed (h2 streams): a duplex Pod then gets
    /// both directions at once (gRPC streaming calls).
    const DUPLEX: bool;
    /// The client can go away while nothing is read or written (an h2 stream reset), which
    /// [`ClientSide::gone`] tells; over HTTP/1.1 only the next read or write does.
    const CANCELS: bool;
    /// The body reader once the answer started (duplex clients only; for the others a reader
    /// that never gives anything).
    type Rx<'a>: BodySource
    where
        Self: 'a;
    /// The writer of the rest of the answer.
    type Tx<'a>: AnswerTx
    where
        Self: 'a;

    /// Reads the start of the body before a Pod is chosen, so that a request can be sent again
    /// whole: all of it when it is at most `limit` bytes (HTTP/1.1: only a `Content-Length` body
    /// that fits; chunked ones stream), and whether that was all. The bytes are the body's, in
    /// order; the rest comes from [`BodySource::next`].
    fn read_start(
        &mut self,
        limit: u64,
    ) -> impl std::future::Future<Output = Result<(Bytes, bool), ClientFail>> + Send;

    /// Whether the client already said its body is over (an h2 HEADERS frame that ended the
    /// stream; an HTTP/1.1 request without body, or whose body was read to its end).
    fn body_done(&self) -> bool;

    /// Waits until the client goes away (an h2 stream reset); never returns over HTTP/1.1.
    fn gone(&mut self) -> impl std::future::Future<Output = ()> + Send;

    /// Sends an answer podgate made itself (an error, a policy's answer).
    fn local(&mut self, answer: &Local<'_>) -> impl std::future::Future<Output = ()> + Send;

    /// Sends the head of a Pod's answer, with `first` (body bytes that came with it) and, when
    /// `end` is set, the end of the body (and its trailers). `Err` when the client is gone or
    /// too slow, saying which.
    fn answer_head<A: AnswerHead>(
        &mut self,
        answer: &A,
        out: &AnswerOut<'_>,
        first: Bytes,
        end: Option<Option<Trailers>>,
    ) -> impl std::future::Future<Output = Result<(), Ended>> + Send;

    /// Why the exchange ended early as far as the client's connection knows (a write toward
    /// the client that ran out of time, `proxy/write_deadline.rs`, ends it and its connection
    /// whichever write it was); `None` when it knows of nothing.
    fn ended(&self) -> Option<Ended>;

    /// The body reader and the answer writer, for the relay after the head.
    fn halves(&mut self) -> (Self::Rx<'_>, Self::Tx<'_>);

    /// After the Pod's `101`: carries bytes both ways until either side closes (HTTP/1.1 only;
    /// no other client asks for an upgrade).
    fn tunnel(&mut self, pod: pool::Conn) -> impl std::future::Future<Output = ()> + Send;
}

/// The writer of an answer's body toward the client, driven by the relay. The calls are
/// cancel-safe: nothing queued is lost when a call is dropped while it waits.
pub(crate) trait AnswerTx: Send {
    /// Whether it takes another piece now (what waits for the client is bounded).
    fn wants_more(&self) -> bool;
    fn queue(&mut self, data: Bytes);
    /// Whether queued bytes wait to be sent.
    fn busy(&self) -> bool;
    /// Sends what can be sent of the queue; with nothing queued, waits until the client goes
    /// away (an h2 reset; never over HTTP/1.1). `Err` when it is gone or too slow, saying which.
    fn deliver(&mut self) -> impl std::future::Future<Output = Result<(), Ended>> + Send;
    /// Ends the body, with trailers where the client's framing carries them.
    fn finish(
        &mut self,
        trailers: Option<Trailers>,
    ) -> impl std::future::Future<Output = Result<(), Ended>> + Send;
    /// The body cannot be completed: the client sees a truncated answer, never a complete-looking
    /// wrong one (HTTP/1.1: the connection closes; h2: the stream is reset).
    fn abort(&mut self);
}

/// What the pipeline adds to a Pod's answer on its way to the client.
pub(crate) struct AnswerOut<'a> {
    pub(crate) request_id: &'a str,
    pub(crate) edits: &'a crate::policies::Edits,
}

/// How an answer's body comes, decoded from the Pod's framing.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Length {
    /// No body (HEAD, 1xx, 204, 304, an h2 head that ended the stream).
    Empty,
    Known(u64),
    /// Pieces of unknown total, with a marked end (chunked, h2 DATA).
    Streamed,
    /// Only the Pod closing the connection ends it (HTTP/1.1 without a length).
    UntilClose,
}

/// For an answer without body (HEAD, 304): what the Pod said the body would be.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Declared {
    Nothing,
    Length(u64),
    Chunked,
}

/// One field of a Pod's answer, as its codec holds it (never copied on the way).
pub(crate) enum FieldRef<'a> {
    /// HTTP/1.1: name and value ranges in the head's buffer.
    Line {
        raw: &'a Bytes,
        name: Range<usize>,
        value: Range<usize>,
    },
    Header(&'a HeaderName, &'a HeaderValue),
}

impl FieldRef<'_> {
    pub(crate) fn name(&self) -> &[u8] {
        match self {
            FieldRef::Line { raw, name, .. } => raw.get(name.clone()).unwrap_or_default(),
            FieldRef::Header(n, _) => n.as_str().as_bytes(),
        }
    }

    pub(crate) fn value(&self) -> &[u8] {
        match self {
            FieldRef::Line { raw, value, .. } => raw.get(value.clone()).unwrap_or_default(),
            FieldRef::Header(_, v) => v.as_bytes(),
        }
    }

    /// As `http` types; the value shares the head's buffer. `None` for a name or value they
    /// cannot hold.
    pub(crate) fn to_pair(&self) -> Option<(HeaderName, HeaderValue)> {
        match self {
            FieldRef::Line { raw, name, value } => Some((
                HeaderName::from_bytes(raw.get(name.clone())?).ok()?,
                HeaderValue::from_maybe_shared(raw.slice(value.clone())).ok()?,
            )),
            FieldRef::Header(n, v) => Some(((*n).clone(), (*v).clone())),
        }
    }
}

/// A piece of a Pod's answer body.
pub(crate) enum AnswerEvent {
    Data(Bytes),
    End(Option<Trailers>),
    /// The Pod broke its framing, reset the stream, closed early or stalled (logged); which of
    /// these, as the access log says it (`upstream_closed`, `upstream_timeout`).
    Failed(Ended),
    /// Some of the upload went out (duplex Pods); nothing of the answer yet.
    Uploaded,
}

/// The head of a Pod's answer.
pub(crate) trait AnswerHead: Send + Sync {
    fn status(&self) -> u16;
    /// The Pod's reason phrase (HTTP/1.1; empty when it sent none or one not worth passing on).
    fn reason(&self) -> &[u8];
    fn length(&self) -> Length;
    fn declared(&self) -> Declared;
    /// Calls `f` with every field of the head that goes on to the client: not the Pod's
    /// framing or hop-by-hop fields.
    fn each_field(&self, f: impl FnMut(FieldRef<'_>));
    /// Field `name` (lower case) of the head, if present.
    fn field(&self, name: &str) -> Option<&[u8]>;
}

/// A Pod's answer, from its head on.
pub(crate) trait PodAnswer: AnswerHead {
    /// The body bytes that came with the head, and the end if it came too. `Err` when they break
    /// the Pod's framing.
    fn take_first(&mut self) -> Result<(Bytes, Option<Option<Trailers>>), ()>;
    /// The next piece of the body, within the exchange's read wait, when `read`; meanwhile (and
    /// without `read`, only) a duplex Pod's upload goes out as its window allows.
    fn next(&mut self, read: bool) -> impl std::future::Future<Output = AnswerEvent> + Send;
    /// The answer was relayed to its end (`clean`) or given up: the Pod connection goes back to
    /// its pool if it can carry another request.
    fn finish(self, clean: bool);
    /// The Pod's connection after a `101`.
    fn into_tunnel(self) -> Option<pool::Conn>;

    /// A duplex Pod takes more of the request body now.
    fn wants_upload(&self) -> bool {
        false
    }
    fn upload(&mut self, _data: Bytes, _end: bool) {}
    /// Whether some of the upload waits for the Pod's window.
    fn upload_busy(&self) -> bool {
        false
    }
    /// Gives up the Pod's side of the exchange (a reset for an h2 stream).
    fn cancel(&mut self) {}
}

/// Why an attempt on one Pod got no answer head.
#[derive(Debug)]
pub(crate) enum Failure {
    /// Nothing reached the Pod: any request may go to another.
    Connect,
    /// The Pod refused the stream unprocessed, twice (h2 GOAWAY, REFUSED_STREAM).
    Refused,
    /// The request went out, maybe in part; no usable answer head came.
    NoAnswer {
        timed_out: bool,
    },
    /// A streamed body could not be delivered to the Pod (it closed, or took nothing for
    /// `read_timeout`: which, as the access log says it).
    Upload(Ended),
    /// The request cannot be written in the Pod's protocol: 400.
    Unrepresentable,
    Client(ClientFail),
}

/// How long the exchange waits for the Pod: `read_timeout` for each wait, capped by what is left
/// of a gRPC call's deadline.
#[derive(Clone, Copy)]
pub(crate) struct Wait {
    pub(crate) read_timeout: Duration,
    pub(crate) deadline: Option<Instant>,
}

impl Wait {
    /// The next wait; `None` once the deadline passed.
    pub(crate) fn next(&self) -> Option<Duration> {
        match self.deadline {
            Some(d) => {
                let left = d.saturating_duration_since(Instant::now());
                (!left.is_zero()).then(|| left.min(self.read_timeout))
            }
            None => Some(self.read_timeout),
        }
    }
}

/// One attempt on one Pod, as the pipeline asks for it.
pub(crate) struct Attempt<'a> {
    pub(crate) upstream: &'a Arc<Upstream>,
    pub(crate) backend: &'a Backend,
    pub(crate) forward: &'a Forward<'a>,
    pub(crate) wait: &'a Wait,
}

/// The side toward Pods, one per protocol an upstream speaks.
pub(crate) trait PodSide {
    /// Both directions at once: the request body may still flow after the answer head.
    const DUPLEX: bool;
    type Answer<'a>: PodAnswer;
    /// Sends the request (what `upload` holds, then what more the client sends) and waits for
    /// the answer head, watching the client meanwhile.
    fn attempt<'a, C: ClientSide>(
        at: &Attempt<'a>,
        upload: &mut Upload,
        client: &mut C,
    ) -> impl std::future::Future<Output = Result<Self::Answer<'a>, Failure>> + Send;
}

/// An answer podgate makes itself.
pub(crate) struct Local<'a> {
    pub(crate) status: u16,
    /// The answer's own fields (a 405's `Allow`, a policy answer's).
    pub(crate) fields: &'a [(HeaderName, HeaderValue)],
    pub(crate) body: Bytes,
    pub(crate) content_type: Option<&'static str>,
    /// For a gRPC client: the status the answer carries instead.
    pub(crate) grpc: Option<GrpcLocal>,
    pub(crate) request_id: &'a str,
    /// `response_remove`/`response_add` of the route's policies.
    pub(crate) edits: &'a crate::policies::Edits,
    /// The exchange broke off: a connection is not kept after this answer.
    pub(crate) close: bool,
}

/// A gRPC status answer.
#[derive(Clone, Copy)]
pub(crate) struct GrpcLocal {
    pub(crate) code: u32,
    pub(crate) message: &'static str,
    /// One HEADERS frame ending the stream (a policy's answer), rather than a head and then
    /// trailers (podgate's failures, as they always were answered).
    pub(crate) trailers_only: bool,
}
