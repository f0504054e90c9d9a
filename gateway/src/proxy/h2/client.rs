//! h2 toward clients, one stream at a time, inside the client connection's task (`serve.rs`):
//! the stream's head becomes the pipeline's [`Incoming`] (a view over its decoded field map),
//! its DATA the body, and the answers go back as h2 frames, each direction under flow control.
//!
//! RFC 9113 §8 framing stays with the `h2` crate and Pingora's acceptance (`serve.rs`): they
//! refuse what h2 forbids; here a repeated or unparsable `content-length` is refused (400), as
//! over HTTP/1.1. A stream the client resets stops its work: the wait for a Pod's answer, the
//! Pod's stream, the relay.

use super::grpc;
use super::outgoing::{send_last, Outgoing};
use crate::policies::Fields;
use crate::proxy::ended::{CLIENT_CLOSED, CLIENT_READ_TIMEOUT, CLIENT_WRITE_TIMEOUT};
use crate::proxy::h1::head::{BodyLength, HeadInfo};
use crate::proxy::pipeline;
use crate::proxy::pipeline::request::{answer_fields, removed_from_answers};
use crate::proxy::pipeline::sides::{
    AnswerHead, AnswerOut, AnswerTx, BodyEvent, BodySource, ClientFail, ClientSide, Declared,
    Ended, Incoming, Length, Local, Trailers,
};
use crate::upstream::pool;
use bytes::{Bytes, BytesMut};
use pingora_core::protocols::http::v2::server::HttpSession;
use pingora_http::{RequestHeader, ResponseHeader};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

/// What every stream of one client connection shares.
pub(super) struct Conn<'a> {
    pub(super) gateway: &'a crate::proxy::Gateway,
    pub(super) client: Option<SocketAddr>,
    pub(super) tls: bool,
    /// `server.client_body_timeout`: each read of a request body, each wait to write an answer.
    pub(super) body_timeout: Duration,
    /// Set when a write of the connection toward the client ran out of time: the connection
    /// ends with all its streams (`serve.rs`).
    pub(super) write_expired: &'a AtomicBool,
}

/// How long an answer podgate makes waits for the rest of the request, so that the stream closes
/// both ways rather than being reset (gRPC's C core reports a reset as CANCELLED whatever status
/// came before it).
const DRAIN: Duration = Duration::from_secs(1);

/// Serves one stream through the pipeline. (A plain function returning an `async move` block:
/// an `async fn` would hold its session twice, and the stream's future is moved whole into the
/// connection's set of streams.)
// Not an `async fn`, on purpose (see above).
#[allow(clippy::manual_async_fn)]
/// `counted` counts the stream as in flight for a graceful stop until it ends.
pub(super) fn serve<'a>(
    cx: &'a Conn<'a>,
    mut s: HttpSession,
    counted: crate::proxy::in_flight::Busy,
) -> impl std::future::Future<Output = ()> + Send + 'a {
    async move {
        let _counted = counted;
        let start = Instant::now();
        // The head is taken out of the session (no copy), so that the view of it can live while
        // the session reads the body and answers.
        let empty = RequestHeader::from(http::Request::new(()).into_parts().0);
        let parts: http::request::Parts = std::mem::replace(s.req_header_mut(), empty).into();
        let head_only = parts.method == http::Method::HEAD;
        // In a block: `seen` then takes no room in the future while the exchange runs.
        let incoming = {
            let seen = match Seen::of(&parts) {
                Ok(seen) => seen,
                Err(refused) => {
                    log::debug!(
                        "client {:?}: h2 request refused: {}",
                        cx.client,
                        refused.why
                    );
                    let mut client = H2Client::new(&mut s, cx, head_only);
                    // Boxed, as the rare case it is (a future is moved whole into its caller's).
                    return Box::pin(refuse(&mut client, refused, cx, start)).await;
                }
            };
            Incoming {
                method: &parts.method,
                authority: match parts.uri.authority() {
                    Some(a) => a.as_str().as_bytes(),
                    None => seen.host,
                },
                path_and_query: match parts.uri.path_and_query() {
                    Some(p) => p.as_str(),
                    None if parts.method == http::Method::CONNECT => "",
                    None => "/",
                },
                fields: Fields::Map(&parts.headers),
                peer: cx.client,
                tls: cx.tls,
                grpc: seen.grpc,
                grpc_timeout: seen.grpc_timeout.filter(|_| seen.grpc),
                content_length: seen.content_length,
                request_id: seen.request_id,
                forwarded_for: seen.forwarded_for,
                connection_named: &[],
                upgrade: false,
                te_trailers: seen.te_trailers,
            }
        };
        let mut client = H2Client::new(&mut s, cx, head_only);
        pipeline::exchange(cx.gateway, &incoming, &mut client, start).await;
    }
}

/// What the pipeline needs from a stream's fields, in one pass.
struct Seen<'a> {
    host: &'a [u8],
    grpc: bool,
    grpc_timeout: Option<&'a [u8]>,
    content_length: Option<u64>,
    request_id: Option<&'a [u8]>,
    forwarded_for: Option<&'a [u8]>,
    te_trailers: bool,
}

/// A stream refused before the pipeline: its framing cannot be trusted.
struct Refused<'a> {
    why: &'static str,
    request_id: Option<&'a [u8]>,
    grpc: bool,
}

impl<'a> Seen<'a> {
    fn of(parts: &'a http::request::Parts) -> Result<Seen<'a>, Refused<'a>> {
        let info = HeadInfo::gather(
            parts
                .headers
                .iter()
                .map(|(n, v)| (n.as_str().as_bytes(), v.as_bytes())),
        );
        let (mut grpc, mut grpc_timeout, mut te_trailers) = (false, None, false);
        for (name, value) in &parts.headers {
            if name == http::header::CONTENT_TYPE {
                grpc = grpc::is_grpc(Some(value.as_bytes()));
            } else if name == http::header::TE {
                te_trailers = value.as_bytes().eq_ignore_ascii_case(b"trailers");
            } else if name.as_str() == "grpc-timeout" {
                grpc_timeout = Some(value.as_bytes());
            }
        }
        let content_length = match info.request_length(1) {
            Ok(BodyLength::Length(n)) => Some(n),
            Ok(_) => None,
            Err(r) => {
                return Err(Refused {
                    why: r.why,
                    request_id: info.request_id,
                    grpc,
                })
            }
        };
        Ok(Seen {
            host: info.host.unwrap_or_default(),
            grpc,
            grpc_timeout,
            content_length,
            request_id: info.request_id,
            forwarded_for: info.forwarded_for,
            te_trailers,
        })
    }
}

/// Answers a refused stream 400 (the gRPC way for gRPC calls).
async fn refuse(client: &mut H2Client<'_>, r: Refused<'_>, cx: &Conn<'_>, start: Instant) {
    let id = pipeline::request_id(r.request_id);
    let edits = crate::policies::Edits::default();
    let local = pipeline::answer::error(400, r.grpc, &[], &id, &edits, true);
    client.local(&local).await;
    pipeline::record::refused(cx.gateway, 400, start);
}

/// One stream, as the pipeline's client.
pub(super) struct H2Client<'s> {
    s: &'s mut HttpSession,
    write_expired: &'s AtomicBool,
    body_timeout: Duration,
    head_only: bool,
    /// The end of the body was given.
    gave_end: bool,
    /// The answer's body writer, once its head went out without ending the stream.
    writer: Option<Outgoing>,
}

impl<'s> H2Client<'s> {
    fn new(s: &'s mut HttpSession, cx: &Conn<'s>, head_only: bool) -> Self {
        H2Client {
            s,
            write_expired: cx.write_expired,
            body_timeout: cx.body_timeout,
            head_only,
            gave_end: false,
            writer: None,
        }
    }

    /// Reads what is left of the request for a while, so that the stream closes both ways.
    async fn drain(&mut self) {
        let _ = tokio::time::timeout(DRAIN, self.s.drain_request_body()).await;
    }

    fn trailers_map(t: Trailers) -> http::HeaderMap {
        match t {
            Trailers::Map(m) => m,
            Trailers::Lines(lines) => {
                let mut map = http::HeaderMap::new();
                for line in lines.split(|b| *b == b'\n') {
                    let Some(colon) = line.iter().position(|b| *b == b':') else {
                        continue;
                    };
                    let (n, v) = (&line[..colon], line[colon + 1..].trim_ascii());
                    if let (Ok(n), Ok(v)) = (
                        http::HeaderName::from_bytes(n),
                        http::HeaderValue::from_bytes(v),
                    ) {
                        map.append(n, v);
                    }
                }
                map
            }
        }
    }
}

/// The next piece of a stream's body; after its end, waits until the client resets the stream.
async fn read_body(s: &mut HttpSession, gave_end: &mut bool, timeout: Duration) -> BodyEvent {
    if *gave_end {
        let reason = s.idle().await;
        log::debug!("h2 client: the stream was reset ({reason:?})");
        return BodyEvent::Failed(ClientFail::Gone(CLIENT_CLOSED));
    }
    loop {
        match tokio::time::timeout(timeout, s.read_body_bytes()).await {
            Ok(Ok(Some(data))) if data.is_empty() => {}
            Ok(Ok(Some(data))) => return BodyEvent::Data(data),
            Ok(Ok(None)) => {
                *gave_end = true;
                return BodyEvent::End(None);
            }
            Ok(Err(e)) => {
                log::debug!("h2 client: reading the request body: {e}");
                return BodyEvent::Failed(ClientFail::Gone(CLIENT_CLOSED));
            }
            Err(_) => return BodyEvent::Failed(ClientFail::Gone(CLIENT_READ_TIMEOUT)),
        }
    }
}

impl BodySource for H2Client<'_> {
    async fn next(&mut self) -> BodyEvent {
        read_body(self.s, &mut self.gave_end, self.body_timeout).await
    }
}

/// What is left of writing an answer's head and first bytes once the head went out.
enum Tail<'a> {
    Done(Result<(), Ended>),
    /// The whole body, to send as the window allows.
    Last(h2::SendStream<Bytes>, Bytes),
    /// The first bytes (queued), then these trailers.
    Trailers(&'a mut Outgoing, Trailers),
}

impl H2Client<'_> {
    /// Writes the head of a Pod's answer (see [`ClientSide::answer_head`]).
    fn write_head<A: AnswerHead>(
        &mut self,
        answer: &A,
        out: &AnswerOut<'_>,
        first: Bytes,
        end: Option<Option<Trailers>>,
    ) -> Tail<'_> {
        let Ok(mut resp) = ResponseHeader::build_no_case(answer.status(), Some(16)) else {
            return Tail::Done(Err(CLIENT_CLOSED));
        };
        let mut has_id = false;
        answer.each_field(|f| {
            if removed_from_answers(out.edits, f.name()) {
                return;
            }
            let Some((name, value)) = f.to_pair() else {
                return;
            };
            has_id |= name == X_REQUEST_ID;
            let value = crate::proxy::unindexed_id(name.as_str().as_bytes(), value);
            let _ = resp.append_header(name, value);
        });
        if let (false, Some(id)) = (has_id, crate::proxy::request_id_value(out.request_id)) {
            let _ = resp.append_header(X_REQUEST_ID, id);
        }
        for (name, value) in answer_fields(&[], out.edits) {
            let _ = resp.append_header(name.clone(), value.clone());
        }
        let length = answer.length();
        match (length, answer.declared()) {
            (Length::Known(n), _) | (Length::Empty, Declared::Length(n)) => {
                let _ = resp.insert_header(http::header::CONTENT_LENGTH, n);
            }
            _ => {}
        }
        let no_body = length == Length::Empty || self.head_only;
        let (trailers, at_end) = match end {
            Some(t) => (t, true),
            None => (None, false),
        };
        let ended_at_once = no_body || (at_end && first.is_empty() && trailers.is_none());
        if self
            .s
            .write_response_header(Box::new(resp), ended_at_once)
            .is_err()
        {
            return Tail::Done(Err(CLIENT_CLOSED));
        }
        if ended_at_once {
            return Tail::Done(Ok(()));
        }
        let Some(w) = self.s.take_response_body_writer() else {
            return Tail::Done(Err(CLIENT_CLOSED));
        };
        if at_end && trailers.is_none() {
            return Tail::Last(w, first);
        }
        let out = self.writer.insert(Outgoing::new(w, first, false, false));
        match trailers {
            Some(t) => Tail::Trailers(out, t),
            None => Tail::Done(Ok(())),
        }
    }
}

/// `x-request-id`, parsed once (a field named by a string is parsed at every use).
const X_REQUEST_ID: http::HeaderName = http::HeaderName::from_static("x-request-id");

/// The body of a stream whose answer started.
pub(super) struct H2Rx<'a> {
    s: &'a mut HttpSession,
    gave_end: &'a mut bool,
    body_timeout: Duration,
}

impl BodySource for H2Rx<'_> {
    async fn next(&mut self) -> BodyEvent {
        read_body(self.s, self.gave_end, self.body_timeout).await
    }
}

impl ClientSide for H2Client<'_> {
    const DUPLEX: bool = true;
    const CANCELS: bool = true;
    type Rx<'a>
        = H2Rx<'a>
    where
        Self: 'a;
    type Tx<'a>
        = H2Tx<'a>
    where
        Self: 'a;

    async fn read_start(&mut self, limit: u64) -> Result<(Bytes, bool), ClientFail> {
        if self.gave_end || self.s.is_body_done() {
            self.gave_end = true;
            return Ok((Bytes::new(), true));
        }
        let mut buf = BytesMut::new();
        loop {
            match tokio::time::timeout(self.body_timeout, self.s.read_body_bytes()).await {
                Ok(Ok(Some(data))) if buf.is_empty() && self.s.is_body_done() => {
                    self.gave_end = true;
                    return Ok((data, true));
                }
                Ok(Ok(Some(data))) => {
                    buf.extend_from_slice(&data);
                    if buf.len() as u64 > limit {
                        return Ok((buf.freeze(), false));
                    }
                }
                Ok(Ok(None)) => {
                    self.gave_end = true;
                    return Ok((buf.freeze(), true));
                }
                Ok(Err(e)) => {
                    log::debug!("h2 client: reading the request body: {e}");
                    return Err(ClientFail::Gone(CLIENT_CLOSED));
                }
                Err(_) => return Err(ClientFail::Gone(CLIENT_READ_TIMEOUT)),
            }
        }
    }

    fn body_done(&self) -> bool {
        self.gave_end || self.s.is_body_done()
    }

    async fn gone(&mut self) {
        let reason = self.s.idle().await;
        log::debug!("h2 client: the stream was reset ({reason:?})");
    }

    async fn local(&mut self, a: &Local<'_>) {
        if self.s.response_written().is_some() {
            return;
        }
        let grpc_status = a.grpc;
        let status = if grpc_status.is_some() { 200 } else { a.status };
        let Ok(mut resp) = ResponseHeader::build_no_case(status, Some(4 + a.fields.len())) else {
            return;
        };
        match (grpc_status, a.content_type) {
            (Some(_), _) => {
                let _ = resp.insert_header(http::header::CONTENT_TYPE, "application/grpc");
            }
            (None, Some(t)) => {
                let _ = resp.insert_header(http::header::CONTENT_TYPE, t);
            }
            (None, None) => {}
        }
        if grpc_status.is_none() && !matches!(a.status, 100..200 | 204 | 304) {
            let _ = resp.insert_header(http::header::CONTENT_LENGTH, a.body.len());
        }
        if let Some(id) = crate::proxy::request_id_value(a.request_id) {
            let _ = resp.insert_header("x-request-id", id);
        }
        for (name, value) in answer_fields(a.fields, a.edits) {
            let _ = resp.append_header(name.clone(), value.clone());
        }
        let Some(g) = grpc_status else {
            let end = self.head_only || a.body.is_empty();
            if self.s.write_response_header(Box::new(resp), end).is_ok() && !end {
                if let Some(mut w) = self.s.take_response_body_writer() {
                    let _ = send_last(&mut w, a.body.clone(), self.body_timeout).await;
                }
            }
            return;
        };
        let code = http::HeaderValue::from(g.code);
        let message = http::HeaderValue::from_static(g.message);
        if g.trailers_only {
            // Trailers-Only: one HEADERS frame that ends the stream.
            let _ = resp.insert_header("grpc-status", code);
            let _ = resp.insert_header("grpc-message", message);
            if self.s.write_response_header(Box::new(resp), true).is_ok() {
                self.drain().await;
            }
            return;
        }
        // A head, then the status in trailers that end the stream.
        if self.s.write_response_header(Box::new(resp), false).is_err() {
            return;
        }
        let mut trailers = http::HeaderMap::with_capacity(2);
        trailers.insert("grpc-status", code);
        trailers.insert("grpc-message", message);
        let _ = self.s.write_trailers(trailers);
        self.drain().await;
    }

    fn answer_head<A: AnswerHead>(
        &mut self,
        answer: &A,
        out: &AnswerOut<'_>,
        first: Bytes,
        end: Option<Option<Trailers>>,
    ) -> impl std::future::Future<Output = Result<(), Ended>> + Send {
        // The head is written here, synchronously; only what waits for the client's window is
        // left to the future, which so stays small (it is part of every stream's).
        let body_timeout = self.body_timeout;
        let tail = self.write_head(answer, out, first, end);
        async move {
            match tail {
                Tail::Done(r) => r,
                Tail::Last(mut w, data) => send_last(&mut w, data, body_timeout).await,
                Tail::Trailers(out, t) => {
                    while out.holds_bytes() {
                        match tokio::time::timeout(body_timeout, out.push()).await {
                            Ok(Ok(())) => {}
                            Ok(Err(_)) => return Err(CLIENT_CLOSED),
                            Err(_) => {
                                // The client kept its window shut: reset, as in the relay.
                                out.tx.send_reset(h2::Reason::CANCEL);
                                return Err(CLIENT_WRITE_TIMEOUT);
                            }
                        }
                    }
                    out.finish(Some(H2Client::trailers_map(t)))
                        .map_err(|_| CLIENT_CLOSED)
                }
            }
        }
    }

    fn ended(&self) -> Option<Ended> {
        let expired = self.write_expired.load(Ordering::Relaxed);
        expired.then_some(CLIENT_WRITE_TIMEOUT)
    }

    fn halves(&mut self) -> (H2Rx<'_>, H2Tx<'_>) {
        (
            H2Rx {
                s: self.s,
                gave_end: &mut self.gave_end,
                body_timeout: self.body_timeout,
            },
            H2Tx {
                w: self.writer.as_mut(),
                body_timeout: self.body_timeout,
            },
        )
    }

    async fn tunnel(&mut self, _pod: pool::Conn) {}
}

/// The rest of an answer's body toward an h2 client, as its window allows.
pub(super) struct H2Tx<'a> {
    w: Option<&'a mut Outgoing>,
    body_timeout: Duration,
}

impl AnswerTx for H2Tx<'_> {
    fn wants_more(&self) -> bool {
        self.w.as_ref().is_some_and(|w| w.wants_more())
    }

    fn queue(&mut self, data: Bytes) {
        if let Some(w) = self.w.as_mut() {
            w.take(data, false);
        }
    }

    fn busy(&self) -> bool {
        self.w.as_ref().is_some_and(|w| w.holds_bytes())
    }

    async fn deliver(&mut self) -> Result<(), Ended> {
        let Some(w) = self.w.as_mut() else {
            return Err(CLIENT_CLOSED);
        };
        if !w.holds_bytes() {
            let reason = std::future::poll_fn(|cx| w.tx.poll_reset(cx)).await;
            log::debug!("h2 client: the stream was reset ({reason:?})");
            return Err(CLIENT_CLOSED);
        }
        // A client that opens no window within the body timeout is cut off (the relay then
        // resets the stream).
        match tokio::time::timeout(self.body_timeout, w.push()).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(_)) => Err(CLIENT_CLOSED),
            Err(_) => {
                log::debug!(
                    "h2 client: took nothing of the answer in {:?}",
                    self.body_timeout
                );
                Err(CLIENT_WRITE_TIMEOUT)
            }
        }
    }

    async fn finish(&mut self, trailers: Option<Trailers>) -> Result<(), Ended> {
        let Some(w) = self.w.as_mut() else {
            return Err(CLIENT_CLOSED);
        };
        w.finish(trailers.map(H2Client::trailers_map))
            .map_err(|_| CLIENT_CLOSED)
    }

    fn abort(&mut self) {
        // Part of the answer went out: the stream is reset, so the client sees a broken answer,
        // never a complete-looking wrong one.
        if let Some(w) = self.w.as_mut() {
            w.tx.send_reset(h2::Reason::INTERNAL_ERROR);
        }
    }
}
