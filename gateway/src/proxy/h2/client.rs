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
use crate::proxy::h1::head::{BodyLength, HeadInfo};
use crate::proxy::pipeline;
use crate::proxy::pipeline::request::{answer_fields, removed_from_answers};
use crate::proxy::pipeline::sides::{
    AnswerHead, AnswerOut, AnswerTx, BodyEvent, BodySource, ClientFail, ClientSide, Declared,
    Incoming, Length, Local, Trailers,
};
use crate::upstream::pool;
use bytes::{Bytes, BytesMut};
use pingora_core::protocols::http::v2::server::HttpSession;
use pingora_http::{RequestHeader, ResponseHeader};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

/// What every stream of one client connection shares.
pub(super) struct Conn<'a> {
    pub(super) gateway: &'a crate::proxy::Gateway,
    pub(super) client: Option<SocketAddr>,
    pub(super) tls: bool,
    /// `server.client_body_timeout`: each read of a request body, each wait to write an answer.
    pub(super) body_timeout: Duration,
}

/// How long an answer podgate makes waits for the rest of the request, so that the stream closes
/// both ways rather than being reset (gRPC's C core reports a reset as CANCELLED whatever status
/// came before it).
const DRAIN: Duration = Duration::from_secs(1);

/// Serves one stream through the pipeline.
pub(super) async fn serve(cx: &Conn<'_>, mut s: HttpSession) {
    let start = Instant::now();
    // The head is taken out of the session (no copy), so that the view of it can live while the
    // session reads the body and answers.
    let empty = RequestHeader::from(http::Request::new(()).into_parts().0);
    let parts: http::request::Parts = std::mem::replace(s.req_header_mut(), empty).into();
    let fields = || {
        parts
            .headers
            .iter()
            .map(|(n, v)| (n.as_str().as_bytes(), v.as_bytes()))
    };
    let info = HeadInfo::gather(fields());
    let field = |n: &str| parts.headers.get(n).map(|v| v.as_bytes());
    let grpc_call = grpc::is_grpc(field("content-type"));
    let content_length = match info.request_length(1) {
        Ok(BodyLength::Length(n)) => Some(n),
        Ok(_) => None,
        Err(r) => {
            log::debug!("client {:?}: h2 request refused: {}", cx.client, r.why);
            let mut client = H2Client::new(&mut s, cx, parts.method == http::Method::HEAD);
            let id = pipeline::request_id(info.request_id);
            let edits = crate::policies::Edits::default();
            let local = pipeline::answer::error(400, grpc_call, &[], &id, &edits, true);
            client.local(&local).await;
            return pipeline::record::refused(cx.gateway, 400, start);
        }
    };
    let authority = match parts.uri.authority() {
        Some(a) => a.as_str().as_bytes(),
        None => info.host.unwrap_or_default(),
    };
    let incoming = Incoming {
        method: &parts.method,
        authority,
        path_and_query: match parts.uri.path_and_query() {
            Some(p) => p.as_str(),
            None if parts.method == http::Method::CONNECT => "",
            None => "/",
        },
        fields: Fields::Map(&parts.headers),
        peer: cx.client,
        tls: cx.tls,
        grpc: grpc_call,
        grpc_timeout: if grpc_call {
            field("grpc-timeout")
        } else {
            None
        },
        content_length,
        request_id: info.request_id,
        forwarded_for: info.forwarded_for,
        connection_named: &[],
        upgrade: false,
        te_trailers: field("te").is_some_and(|v| v.eq_ignore_ascii_case(b"trailers")),
    };
    let mut client = H2Client::new(&mut s, cx, parts.method == http::Method::HEAD);
    pipeline::exchange(cx.gateway, &incoming, &mut client, start).await;
}

/// One stream, as the pipeline's client.
pub(super) struct H2Client<'s> {
    s: &'s mut HttpSession,
    body_timeout: Duration,
    head_only: bool,
    /// The end of the body was given.
    gave_end: bool,
    /// The answer's body writer, once its head went out without ending the stream.
    writer: Option<Outgoing>,
}

impl<'s> H2Client<'s> {
    fn new(s: &'s mut HttpSession, cx: &Conn<'_>, head_only: bool) -> Self {
        H2Client {
            s,
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
        return BodyEvent::Failed(ClientFail::Gone);
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
                return BodyEvent::Failed(ClientFail::Gone);
            }
            Err(_) => return BodyEvent::Failed(ClientFail::Gone),
        }
    }
}

impl BodySource for H2Client<'_> {
    async fn next(&mut self) -> BodyEvent {
        read_body(self.s, &mut self.gave_end, self.body_timeout).await
    }
}

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
                    return Err(ClientFail::Gone);
                }
                Err(_) => return Err(ClientFail::Gone),
            }
        }
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
                    send_last(&mut w, a.body.clone(), self.body_timeout).await;
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

    async fn answer_head<A: AnswerHead>(
        &mut self,
        answer: &A,
        out: &AnswerOut<'_>,
        first: Bytes,
        end: Option<Option<Trailers>>,
    ) -> Result<(), ()> {
        let mut resp = ResponseHeader::build_no_case(answer.status(), Some(16)).map_err(|_| ())?;
        let mut has_id = false;
        answer.each_field(|f| {
            if removed_from_answers(out.edits, f.name()) {
                return;
            }
            let Some((name, value)) = f.to_pair() else {
                return;
            };
            has_id |= name.as_str() == "x-request-id";
            let value = crate::proxy::unindexed_id(name.as_str().as_bytes(), value);
            let _ = resp.append_header(name, value);
        });
        if let (false, Some(id)) = (has_id, crate::proxy::request_id_value(out.request_id)) {
            let _ = resp.append_header("x-request-id", id);
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
        self.s
            .write_response_header(Box::new(resp), ended_at_once)
            .map_err(|_| ())?;
        if ended_at_once {
            return Ok(());
        }
        let mut w = self.s.take_response_body_writer().ok_or(())?;
        if at_end && trailers.is_none() {
            return send_last(&mut w, first, self.body_timeout)
                .await
                .then_some(())
                .ok_or(());
        }
        let mut out = Outgoing::new(w, first, false, false);
        if let Some(t) = trailers {
            while out.holds_bytes() {
                tokio::time::timeout(self.body_timeout, out.push())
                    .await
                    .map_err(|_| ())?
                    .map_err(|_| ())?;
            }
            out.finish(Some(Self::trailers_map(t))).map_err(|_| ())?;
        }
        self.writer = Some(out);
        Ok(())
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

    async fn deliver(&mut self) -> Result<(), ()> {
        let Some(w) = self.w.as_mut() else {
            return Err(());
        };
        if !w.holds_bytes() {
            let reason = std::future::poll_fn(|cx| w.tx.poll_reset(cx)).await;
            log::debug!("h2 client: the stream was reset ({reason:?})");
            return Err(());
        }
        // A client that opens no window within the body timeout is cut off.
        match tokio::time::timeout(self.body_timeout, w.push()).await {
            Ok(Ok(())) => Ok(()),
            _ => Err(()),
        }
    }

    async fn finish(&mut self, trailers: Option<Trailers>) -> Result<(), ()> {
        let Some(w) = self.w.as_mut() else {
            return Err(());
        };
        w.finish(trailers.map(H2Client::trailers_map))
            .map_err(|_| ())
    }

    fn abort(&mut self) {
        // Part of the answer went out: the stream is reset, so the client sees a broken answer,
        // never a complete-looking wrong one.
        if let Some(w) = self.w.as_mut() {
            w.tx.send_reset(h2::Reason::INTERNAL_ERROR);
        }
    }
}
