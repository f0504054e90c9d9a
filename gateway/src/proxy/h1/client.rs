//! HTTP/1.1 toward clients, one request at a time: its head checked and turned into the
//! pipeline's [`Incoming`] (a view over the head's own bytes), its body decoded from the client's
//! framing, and the answers rendered with podgate's framing (`rewrite.rs` writes the heads).
//!
//! The framing rules stay here and in `head.rs`/`body.rs`: ambiguous framing is 400 (or 501)
//! and the connection closes; `Expect: 100-continue` is answered before the body is read (and not
//! passed on); a request body not read to its end (an early answer) ends the connection, as it
//! would be taken for the next request; an answer whose length only the close can tell ends it
//! too; after a Pod's `101` the connection is a byte tunnel.

use super::body::{client_read_ended, read_more, write_trailers, Chunked, Framing, Piece};
use super::head::{BodyLength, HeadInfo, Request};
use super::rewrite::{
    answer_head, canonical_reason, push_chunk, push_fields, push_header, push_last_chunk, target,
    Out,
};
use super::{error_answer, Client, Engine};
use crate::policies::Fields;
use crate::proxy::ended::CLIENT_CLOSED;
use crate::proxy::pipeline;
use crate::proxy::pipeline::sides::{
    AnswerHead, AnswerOut, AnswerTx, BodyEvent, BodySource, ClientFail, ClientSide, Ended,
    Incoming, Local, Trailers,
};
use crate::upstream::pool;
use bytes::Bytes;
use http::Method;
use std::time::{Duration, Instant};
use tokio::io::AsyncWriteExt;

impl Engine {
    /// Serves one request; returns whether the connection may carry another.
    pub(super) async fn exchange(&self, c: &mut Client, req: Request, stopping: bool) -> bool {
        let start = Instant::now();
        let info = HeadInfo::gather(req.headers());
        let refuse = |status: u16, why: &str| {
            log::debug!("client {:?}: {status}: {why}", c.addr);
            status
        };
        let connect = req.method == Method::CONNECT;
        let checked = match (target(req.target()), info.request_length(req.minor)) {
            // An authority-form target; the pipeline answers CONNECT (405).
            _ if connect => Ok((None, BodyLength::None)),
            (_, Err(r)) => Err(refuse(r.status, r.why)),
            (None, _) => Err(refuse(400, "bad request target")),
            (_, _) if info.hosts > 1 => Err(refuse(400, "more than one Host")),
            (Some(t), _) if info.hosts == 0 && req.minor >= 1 && t.authority.is_none() => {
                Err(refuse(400, "HTTP/1.1 request without Host"))
            }
            (Some(t), Ok(len)) => Ok((Some(t), len)),
        };
        let (target, length) = match checked {
            Ok(ok) => ok,
            Err(status) => {
                let id = pipeline::request_id(info.request_id);
                let answer = error_answer(status, None, false, false, &id);
                let _ = c.send(&answer, self.limits.body_timeout).await;
                pipeline::record::refused(&self.gateway, status, start);
                return false;
            }
        };
        let (path_and_query, authority) = match &target {
            Some(t) => (t.path_and_query, t.authority.map(str::as_bytes)),
            None => ("", Some(req.target().as_bytes())),
        };
        let authority = authority.or(info.host).unwrap_or_default();
        let keep = !stopping
            && !connect
            && !self.limits.keepalive_timeout.is_zero()
            && if req.minor >= 1 {
                !info.close
            } else {
                info.keep_alive
            };
        let framing = match length {
            BodyLength::Chunked => Framing::Chunked(Chunked::default()),
            BodyLength::None | BodyLength::Length(0) => Framing::Empty,
            BodyLength::Length(n) => Framing::Length(n),
        };
        let incoming = Incoming {
            method: &req.method,
            authority,
            path_and_query,
            fields: Fields::Lines {
                raw: &req.raw,
                ranges: &req.headers,
            },
            peer: c.addr,
            tls: c.tls,
            grpc: false,
            grpc_timeout: None,
            content_length: match length {
                BodyLength::Length(n) => Some(n),
                _ => None,
            },
            request_id: info.request_id,
            forwarded_for: info.forwarded_for,
            connection_named: &info.named,
            upgrade: info.upgrading(),
            te_trailers: false,
        };
        let mut client = H1Client {
            expect_continue: info.expect_continue && req.minor >= 1 && framing != Framing::Empty,
            end: None,
            gave_end: false,
            framing,
            c,
            minor: req.minor,
            head_only: req.method == Method::HEAD,
            keep,
            out: Out::Nothing,
            body_timeout: self.limits.body_timeout,
        };
        pipeline::exchange(&self.gateway, &incoming, &mut client, start).await;
        // A body not read to its end would be taken for the next request.
        client.keep && client.framing == Framing::Empty
    }
}

/// One request of an HTTP/1.1 connection, as the pipeline's client.
pub(super) struct H1Client<'c> {
    c: &'c mut Client,
    /// How the rest of the request body is delimited (`Empty` once it was read to its end).
    framing: Framing,
    /// The end of the body, read with its last data and not yet given.
    end: Option<Option<Trailers>>,
    /// The end was given to the pipeline.
    gave_end: bool,
    /// `100 Continue` is owed before the body is read.
    expect_continue: bool,
    minor: u8,
    head_only: bool,
    /// The connection may carry another request.
    keep: bool,
    /// How the answer's body goes out.
    out: Out,
    body_timeout: Duration,
}

impl H1Client<'_> {
    async fn continue_if_asked(&mut self) -> Result<(), ClientFail> {
        if std::mem::take(&mut self.expect_continue) {
            self.c
                .send(b"HTTP/1.1 100 Continue\r\n\r\n", self.body_timeout)
                .await
                .map_err(|_| ClientFail::Gone(CLIENT_CLOSED))?;
        }
        Ok(())
    }

    /// The body bytes at the start of the buffer (chunked ones decoded), and the end if it is
    /// there with the client's checked trailer fields.
    fn take(&mut self) -> Result<(Bytes, Option<Option<Trailers>>), ClientFail> {
        let buf = &mut self.c.buf;
        match &mut self.framing {
            Framing::Empty | Framing::UntilClose => Ok((Bytes::new(), Some(None))),
            Framing::Length(left) => {
                let n = usize::try_from(*left).unwrap_or(usize::MAX).min(buf.len());
                *left -= n as u64;
                let end = (*left == 0).then_some(None);
                Ok((buf.split_to(n).freeze(), end))
            }
            Framing::Chunked(c) => {
                let mut plain = Vec::new();
                let mut end = None;
                let n = c
                    .decode(buf, |p| match p {
                        Piece::Data(d) => plain.extend_from_slice(d),
                        Piece::End(section) => {
                            let mut lines = Vec::new();
                            write_trailers(section, &mut lines);
                            end = Some((!lines.is_empty()).then_some(Trailers::Lines(lines)));
                        }
                    })
                    .map_err(|bad| {
                        log::debug!("client {:?}: request body: {}", self.c.addr, bad.0);
                        ClientFail::Bad
                    })?;
                let _ = buf.split_to(n);
                Ok((Bytes::from(plain), end))
            }
        }
    }

    async fn read(&mut self) -> Result<(), ClientFail> {
        let read = read_more(&mut self.c.io, &mut self.c.buf, self.body_timeout).await;
        match client_read_ended(&read) {
            Some(ended) => Err(ClientFail::Gone(ended)),
            None => Ok(()),
        }
    }
}

impl BodySource for H1Client<'_> {
    async fn next(&mut self) -> BodyEvent {
        if let Some(t) = self.end.take() {
            self.gave_end = true;
            return BodyEvent::End(t);
        }
        if self.gave_end {
            // Over HTTP/1.1 a client that goes away is found by the next read or write.
            return std::future::pending().await;
        }
        if let Err(f) = self.continue_if_asked().await {
            return BodyEvent::Failed(f);
        }
        loop {
            match self.take() {
                Err(f) => return BodyEvent::Failed(f),
                Ok((data, Some(t))) => {
                    self.framing = Framing::Empty;
                    if data.is_empty() {
                        self.gave_end = true;
                        return BodyEvent::End(t);
                    }
                    // The end came with the last data: the data now, the end next.
                    self.end = Some(t);
                    return BodyEvent::Data(data);
                }
                Ok((data, None)) if !data.is_empty() => return BodyEvent::Data(data),
                Ok(_) => {}
            }
            if let Err(f) = self.read().await {
                return BodyEvent::Failed(f);
            }
        }
    }
}

impl ClientSide for H1Client<'_> {
    const DUPLEX: bool = false;
    const CANCELS: bool = false;
    type Rx<'a>
        = NoBody
    where
        Self: 'a;
    type Tx<'a>
        = H1Tx<'a>
    where
        Self: 'a;

    async fn read_start(&mut self, limit: u64) -> Result<(Bytes, bool), ClientFail> {
        let Framing::Length(n) = self.framing else {
            return Ok((Bytes::new(), self.framing == Framing::Empty));
        };
        if n > limit {
            // Streamed once a Pod is connected.
            return Ok((Bytes::new(), false));
        }
        self.continue_if_asked().await?;
        while (self.c.buf.len() as u64) < n {
            self.read().await?;
        }
        self.framing = Framing::Empty;
        Ok((self.c.buf.split_to(n as usize).freeze(), true))
    }

    fn body_done(&self) -> bool {
        self.framing == Framing::Empty
    }

    async fn gone(&mut self) {
        std::future::pending().await
    }

    async fn local(&mut self, a: &Local<'_>) {
        // An unread body would be taken for the next request.
        self.keep &= !a.close && self.framing == Framing::Empty;
        let mut head =
            format!("HTTP/1.1 {} {}\r\n", a.status, canonical_reason(a.status)).into_bytes();
        if let Some(t) = a.content_type {
            push_header(&mut head, b"content-type", t.as_bytes());
        }
        if !matches!(a.status, 100..200 | 204 | 304) {
            let _ = std::io::Write::write_fmt(
                &mut head,
                format_args!("content-length: {}\r\n", a.body.len()),
            );
        }
        push_header(&mut head, b"x-request-id", a.request_id.as_bytes());
        push_fields(&mut head, a.fields, a.edits);
        if !self.keep {
            push_header(&mut head, b"connection", b"close");
        } else if self.minor == 0 {
            push_header(&mut head, b"connection", b"keep-alive");
        }
        head.extend_from_slice(b"\r\n");
        if !self.head_only {
            head.extend_from_slice(&a.body);
        }
        self.keep &= self.c.send(&head, self.body_timeout).await.is_ok();
    }

    fn answer_head<A: AnswerHead>(
        &mut self,
        answer: &A,
        out: &AnswerOut<'_>,
        first: Bytes,
        end: Option<Option<Trailers>>,
    ) -> impl std::future::Future<Output = Result<(), Ended>> + Send {
        // The bytes are made here; only the write is left to the future, which so stays small
        // (it is part of every request's).
        let bytes = self.head_bytes(answer, out, first, end);
        async move {
            if self.c.send(&bytes, self.body_timeout).await.is_err() {
                self.keep = false;
                return Err(CLIENT_CLOSED);
            }
            Ok(())
        }
    }

    fn ended(&self) -> Option<Ended> {
        self.c.ended()
    }

    fn halves(&mut self) -> (NoBody, H1Tx<'_>) {
        (
            NoBody,
            H1Tx {
                c: self.c,
                out: self.out,
                keep: &mut self.keep,
                pending: None,
                body_timeout: self.body_timeout,
            },
        )
    }

    async fn tunnel(&mut self, up: pool::Conn) {
        self.tunnel_to(up).await
    }
}

impl H1Client<'_> {
    /// The head of a Pod's answer, with the first body bytes (see [`ClientSide::answer_head`]).
    fn head_bytes<A: AnswerHead>(
        &mut self,
        answer: &A,
        out: &AnswerOut<'_>,
        first: Bytes,
        end: Option<Option<Trailers>>,
    ) -> Vec<u8> {
        // A body the Pod answered before reading to its end would be taken for the next request.
        let keep = self.keep && self.framing == Framing::Empty;
        let framed = answer_head(answer, out, self.minor, self.head_only, keep);
        self.keep = framed.keep;
        self.out = framed.out;
        let mut bytes = framed.head;
        match self.out {
            Out::Nothing => {}
            Out::Raw => bytes.extend_from_slice(&first),
            Out::Chunked => {
                push_chunk(&mut bytes, &first);
                if let Some(t) = &end {
                    push_last_chunk(&mut bytes, t.as_ref());
                }
            }
        }
        bytes
    }

    async fn tunnel_to(&mut self, mut up: pool::Conn) {
        self.keep = false;
        let c = &mut *self.c;
        if !up.buf.is_empty() && c.send(&up.buf, self.body_timeout).await.is_err() {
            return;
        }
        if !c.buf.is_empty() {
            let early = c.buf.split();
            if up.io.write_all(&early).await.is_err() {
                return;
            }
        }
        let _ = tokio::io::copy_bidirectional(&mut c.io, &mut up.io).await;
    }
}

/// The body reader of a client that is not duplex: the relay never asks it.
pub(super) struct NoBody;

impl BodySource for NoBody {
    async fn next(&mut self) -> BodyEvent {
        std::future::pending().await
    }
}

/// The rest of an answer's body toward an HTTP/1.1 client: each piece written (and flushed) as
/// it comes, within `client_body_timeout`, under the framing the head announced.
pub(super) struct H1Tx<'a> {
    c: &'a mut Client,
    out: Out,
    keep: &'a mut bool,
    pending: Option<Bytes>,
    body_timeout: Duration,
}

impl AnswerTx for H1Tx<'_> {
    fn wants_more(&self) -> bool {
        self.pending.is_none()
    }

    fn queue(&mut self, data: Bytes) {
        if !data.is_empty() && self.out != Out::Nothing {
            self.pending = Some(data);
        }
    }

    fn busy(&self) -> bool {
        self.pending.is_some()
    }

    async fn deliver(&mut self) -> Result<(), Ended> {
        let Some(data) = self.pending.take() else {
            // Over HTTP/1.1 a client that goes away is found by the next write.
            return std::future::pending().await;
        };
        let sent = if self.out == Out::Chunked {
            let mut framed = Vec::with_capacity(data.len() + 12);
            push_chunk(&mut framed, &data);
            self.c.send(&framed, self.body_timeout).await
        } else {
            self.c.send(&data, self.body_timeout).await
        };
        sent.map_err(|_| {
            *self.keep = false;
            CLIENT_CLOSED
        })
    }

    async fn finish(&mut self, trailers: Option<Trailers>) -> Result<(), Ended> {
        if self.out == Out::Chunked {
            let mut end = Vec::with_capacity(16);
            push_last_chunk(&mut end, trailers.as_ref());
            if self.c.send(&end, self.body_timeout).await.is_err() {
                *self.keep = false;
                return Err(CLIENT_CLOSED);
            }
        }
        Ok(())
    }

    fn abort(&mut self) {
        // Part of the answer went out: the connection ends here, so the client sees a truncated
        // answer rather than a wrong one.
        *self.keep = false;
    }
}
