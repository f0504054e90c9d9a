//! HTTP/1.1 toward Pods, for every client protocol: the request goes out on a pooled
//! connection (`upstream/pool.rs`) with a head podgate wrote (`rewrite.rs`) and podgate's own
//! framing, the answer head is read with the same strict parser as a client's (`head.rs`) and its
//! body decoded (`body.rs`) into protocol-neutral pieces for the client's codec.
//!
//! What comes from a Pod is checked like what comes from a client: an answer whose framing is
//! ambiguous (RFC 9112 §6.3), an unparsable head or a `101` nobody asked for is no answer (502,
//! and the connection is not reused); 1xx answers other than 101 are dropped (podgate answered
//! `100-continue` itself). A body after a 204, a 304 or a HEAD answer is not passed on, and its
//! connection is not reused.

use super::body::{write_trailers, Chunked, Framing, Piece};
use super::head::{inside, parse_response, BodyLength, HeadInfo, Response};
use super::rewrite::{push_chunk, push_last_chunk, request_head, BodyOut};
use crate::proxy::ended;
use crate::proxy::pipeline::request::set_here_or_hop;
use crate::proxy::pipeline::sides::{
    AnswerEvent, AnswerHead, Attempt, BodyEvent, ClientFail, ClientSide, Declared, Failure,
    FieldRef, Length, PodAnswer, PodSide, Trailers, Wait,
};
use crate::proxy::pipeline::upload::Upload;
use crate::upstream::{pool, Upstream};
use bytes::Bytes;
use std::net::SocketAddr;
use std::ops::Range;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::AsyncWriteExt;

/// The HTTP/1.1 Pod codec.
pub(crate) struct H1Pod;

impl PodSide for H1Pod {
    const DUPLEX: bool = false;
    type Answer<'a> = H1Answer<'a>;

    async fn attempt<'a, C: ClientSide>(
        at: &Attempt<'a>,
        upload: &mut Upload,
        client: &mut C,
    ) -> Result<H1Answer<'a>, Failure> {
        let conf = &at.upstream.conf;
        let addr = at.backend.addr;
        let whole = upload.complete();
        let body = match upload.length() {
            Some(n) => BodyOut::Length(n),
            None if whole => BodyOut::None,
            None => BodyOut::Chunked,
        };
        let mut head = request_head(at.forward, body).map_err(|why| {
            log::debug!("upstream {}: request refused: {why}", conf.name);
            Failure::Unrepresentable
        })?;
        let (mut up, reused) = match at.upstream.connector.reuse(addr) {
            Some(conn) => (conn, true),
            // Boxed: a connect's future is 1.4 KB, and inline it would set the size of every
            // request's (most requests reuse a connection).
            None => match Box::pin(at.upstream.connector.connect(addr)).await {
                Ok(conn) => (conn, false),
                Err(e) => {
                    log::warn!("upstream {}: cannot connect to {addr}: {e}", conf.name);
                    return Err(Failure::Connect);
                }
            },
        };
        // The body read so far goes out with the head, in one write.
        if body == BodyOut::Chunked {
            push_chunk(&mut head, upload.held());
        } else {
            head.extend_from_slice(upload.held());
        }
        if let Err(e) = write(&mut up, &head, conf.read_timeout).await {
            log::debug!("upstream {}: writing to {addr}: {e}", conf.name);
            // A pooled connection the Pod had closed: nothing reached it.
            return Err(if reused {
                Failure::Connect
            } else {
                Failure::NoAnswer { timed_out: false }
            });
        }
        if !upload.ended() {
            // Boxed: only streamed bodies need its state (a future is moved whole into its
            // caller's, at every request).
            Box::pin(stream(upload, client, &mut up, body, conf.read_timeout))
                .await
                .inspect_err(|f| {
                    if matches!(f, Failure::Upload(_)) {
                        log::warn!("upstream {}: sending the body to {addr} failed", conf.name);
                    }
                })?;
        }
        let Some(wait) = at.wait.next() else {
            return Err(Failure::NoAnswer { timed_out: true });
        };
        // A client that goes away meanwhile ends the wait (and the Pod connection): work for a
        // cancelled h2 stream stops with it (rapid reset against a slow Pod).
        let read = final_response(&mut up, &conf.name, wait, addr, at.forward.upgrade);
        let read = if C::CANCELS {
            tokio::select! {
                r = read => r,
                () = client.gone() => {
                    return Err(Failure::Client(ClientFail::Gone(ended::CLIENT_CLOSED)))
                }
            }
        } else {
            read.await
        };
        let bad_answer = |why: &str| {
            log::warn!(
                "upstream {}: {addr} answered with {why}; not relayed",
                conf.name
            );
            Failure::NoAnswer { timed_out: false }
        };
        let resp = match read {
            Ok(resp) => resp,
            Err(NoHead::Malformed(why)) => return Err(bad_answer(&why)),
            Err(NoHead::Failed { timed_out }) => return Err(Failure::NoAnswer { timed_out }),
        };
        let head =
            H1Head::new(resp, *at.forward.method == http::Method::HEAD).map_err(bad_answer)?;
        Ok(H1Answer {
            framing: head.framing(),
            head,
            up,
            wait: *at.wait,
            upstream: at.upstream,
            addr,
            end: None,
        })
    }
}

/// Writes `bytes` to the Pod and flushes them, within `timeout`.
async fn write(up: &mut pool::Conn, bytes: &[u8], timeout: Duration) -> std::io::Result<()> {
    let sent = async {
        up.io.write_all(bytes).await?;
        up.io.flush().await
    };
    match crate::proxy::lazy_timeout::within(timeout, sent).await {
        Ok(r) => r,
        Err(_) => Err(std::io::ErrorKind::TimedOut.into()),
    }
}

/// Sends the rest of the body as the client sends it, under podgate's framing (`Length`:
/// as it comes, never more than announced; `Chunked`: podgate's chunks and the client's checked
/// trailer fields). A body that breaks off leaves the Pod an incomplete request, and the
/// connection is dropped, never reused.
async fn stream<C: ClientSide>(
    upload: &mut Upload,
    client: &mut C,
    up: &mut pool::Conn,
    body: BodyOut,
    timeout: Duration,
) -> Result<(), Failure> {
    let chunked = body == BodyOut::Chunked;
    loop {
        let (bytes, last) = match upload.next(client).await {
            BodyEvent::Data(data) if !chunked => (data, false),
            BodyEvent::Data(data) => {
                let mut framed = Vec::with_capacity(data.len() + 12);
                push_chunk(&mut framed, &data);
                (Bytes::from(framed), false)
            }
            BodyEvent::End(trailers) if chunked => {
                let mut end = Vec::with_capacity(64);
                push_last_chunk(&mut end, trailers.as_ref());
                (Bytes::from(end), true)
            }
            BodyEvent::End(_) => (Bytes::new(), true),
            BodyEvent::Failed(f) => return Err(Failure::Client(f)),
        };
        if !bytes.is_empty() || last {
            write(up, &bytes, timeout)
                .await
                .map_err(|e| Failure::Upload(ended::of_pod_write(&e)))?;
        }
        if last {
            return Ok(());
        }
    }
}

/// Why no final answer head came from a Pod.
pub(crate) enum NoHead {
    /// What came is not a head podgate relays (it does not parse, or is an unasked-for 101).
    Malformed(String),
    /// The Pod closed, failed or was silent past the wait (logged).
    Failed { timed_out: bool },
}

/// The Pod's final answer head, read on `up`: 1xx other than 101 are dropped (a 100-continue was
/// answered by podgate already); a 101 is one only when `upgrading`.
async fn final_response(
    up: &mut pool::Conn,
    upstream: &str,
    wait: Duration,
    addr: SocketAddr,
    upgrading: bool,
) -> Result<Response, NoHead> {
    loop {
        let resp = match read_response(up, wait).await {
            Ok(r) => r,
            Err(e) if e.kind() == std::io::ErrorKind::InvalidData => {
                return Err(NoHead::Malformed(e.to_string()))
            }
            Err(e) => {
                let timed_out = e.kind() == std::io::ErrorKind::TimedOut;
                log::warn!("upstream {upstream}: no answer from {addr}: {e}");
                return Err(NoHead::Failed { timed_out });
            }
        };
        if (100..200).contains(&resp.status) && resp.status != 101 {
            continue;
        }
        if resp.status == 101 && !upgrading {
            return Err(NoHead::Malformed(
                "101 to a request that asked for no upgrade".into(),
            ));
        }
        return Ok(resp);
    }
}

/// Reads a response head from the Pod, within `timeout` for each read. A head that does not
/// parse is `InvalidData`.
async fn read_response(up: &mut pool::Conn, timeout: Duration) -> std::io::Result<Response> {
    loop {
        if !up.buf.is_empty() {
            match parse_response(&mut up.buf) {
                Ok(Some(resp)) => return Ok(resp),
                Ok(None) => {}
                Err(why) => return Err(std::io::Error::new(std::io::ErrorKind::InvalidData, why)),
            }
        }
        if super::body::read_more(&mut up.io, &mut up.buf, timeout).await? == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
    }
}

/// A Pod's answer head, checked: its framing decided (RFC 9112 §6.3), what it says of the
/// connection kept.
pub(crate) struct H1Head {
    resp: Response,
    /// The fields its `Connection` named (hop-by-hop), as ranges of the head.
    named: Vec<Range<usize>>,
    length: BodyLength,
    /// The Pod keeps the connection open after this answer.
    pod_keeps: bool,
    head_only: bool,
}

impl H1Head {
    /// `head_only`: the answer to a HEAD request. `Err` for framing that cannot be trusted.
    pub(crate) fn new(resp: Response, head_only: bool) -> Result<H1Head, &'static str> {
        let info = HeadInfo::gather(resp.headers());
        let length = info.response_length(resp.minor)?;
        let named = info
            .named
            .iter()
            .filter_map(|t| inside(&resp.raw, t))
            .collect();
        let pod_keeps = if resp.minor >= 1 {
            !info.close
        } else {
            info.keep_alive
        };
        Ok(H1Head {
            named,
            length,
            pod_keeps,
            head_only,
            resp,
        })
    }

    fn no_body(&self) -> bool {
        self.head_only || matches!(self.resp.status, 101 | 204 | 304)
    }

    fn framing(&self) -> Framing {
        match self.length {
            _ if self.no_body() => Framing::Empty,
            BodyLength::Chunked => Framing::Chunked(Chunked::default()),
            BodyLength::Length(n) => Framing::Length(n),
            BodyLength::None => Framing::UntilClose,
        }
    }
}

impl AnswerHead for H1Head {
    fn status(&self) -> u16 {
        self.resp.status
    }

    fn reason(&self) -> &[u8] {
        self.resp.reason()
    }

    fn length(&self) -> Length {
        match self.length {
            _ if self.no_body() => Length::Empty,
            BodyLength::Chunked => Length::Streamed,
            BodyLength::Length(n) => Length::Known(n),
            BodyLength::None => Length::UntilClose,
        }
    }

    fn declared(&self) -> Declared {
        match self.length {
            BodyLength::Length(n) if self.head_only || self.resp.status == 304 => {
                Declared::Length(n)
            }
            BodyLength::Chunked if self.head_only => Declared::Chunked,
            _ => Declared::Nothing,
        }
    }

    fn each_field(&self, mut f: impl FnMut(FieldRef<'_>)) {
        let raw = &self.resp.raw;
        let switching = self.resp.status == 101;
        for (n, v) in &self.resp.headers {
            let Some(name) = raw.get(n.clone()) else {
                continue;
            };
            // The Pod's own request id goes on; podgate's framing replaces the Pod's.
            let hop = !name.eq_ignore_ascii_case(b"x-request-id")
                && (set_here_or_hop(name, switching)
                    || self.named.iter().any(|r| {
                        raw.get(r.clone())
                            .is_some_and(|t| name.eq_ignore_ascii_case(t))
                    }));
            if !hop {
                f(FieldRef::Line {
                    raw,
                    name: n.clone(),
                    value: v.clone(),
                });
            }
        }
    }

    fn field(&self, name: &str) -> Option<&[u8]> {
        self.resp
            .headers()
            .find(|(n, _)| n.eq_ignore_ascii_case(name.as_bytes()))
            .map(|(_, v)| v)
    }
}

/// A Pod's answer on its connection.
pub(crate) struct H1Answer<'a> {
    head: H1Head,
    framing: Framing,
    up: pool::Conn,
    wait: Wait,
    upstream: &'a Arc<Upstream>,
    addr: SocketAddr,
    /// The end of the body, read with its last data and not yet given.
    end: Option<Option<Trailers>>,
}

impl H1Answer<'_> {
    /// The body bytes at the start of the buffer as the framing delimits them (chunked bodies
    /// decoded), and the end if it is there.
    fn take(&mut self) -> Result<(Bytes, Option<Option<Trailers>>), &'static str> {
        let buf = &mut self.up.buf;
        match &mut self.framing {
            Framing::Empty => Ok((Bytes::new(), Some(None))),
            Framing::Length(left) => {
                let n = usize::try_from(*left).unwrap_or(usize::MAX).min(buf.len());
                *left -= n as u64;
                let end = (*left == 0).then_some(None);
                Ok((buf.split_to(n).freeze(), end))
            }
            Framing::UntilClose => Ok((buf.split().freeze(), None)),
            Framing::Chunked(c) => {
                let mut plain = Vec::new();
                let mut trailers = None;
                let n = c
                    .decode(buf, |p| match p {
                        Piece::Data(d) => plain.extend_from_slice(d),
                        Piece::End(section) => {
                            let mut lines = Vec::new();
                            write_trailers(section, &mut lines);
                            trailers = Some((!lines.is_empty()).then_some(Trailers::Lines(lines)));
                        }
                    })
                    .map_err(|bad| bad.0)?;
                let _ = buf.split_to(n);
                Ok((Bytes::from(plain), trailers))
            }
        }
    }
}

impl AnswerHead for H1Answer<'_> {
    fn status(&self) -> u16 {
        self.head.status()
    }
    fn reason(&self) -> &[u8] {
        self.head.reason()
    }
    fn length(&self) -> Length {
        self.head.length()
    }
    fn declared(&self) -> Declared {
        self.head.declared()
    }
    fn each_field(&self, f: impl FnMut(FieldRef<'_>)) {
        self.head.each_field(f)
    }
    fn field(&self, name: &str) -> Option<&[u8]> {
        self.head.field(name)
    }
}

impl PodAnswer for H1Answer<'_> {
    fn take_first(&mut self) -> Result<(Bytes, Option<Option<Trailers>>), ()> {
        self.take().map_err(|why| {
            log::warn!(
                "upstream {}: {} answered with {why}; not relayed",
                self.upstream.conf.name,
                self.addr
            );
        })
    }

    async fn next(&mut self, read: bool) -> AnswerEvent {
        if !read {
            return std::future::pending().await;
        }
        if let Some(t) = self.end.take() {
            return AnswerEvent::End(t);
        }
        loop {
            match self.take() {
                Ok((data, None)) if data.is_empty() => {}
                Ok((data, None)) => return AnswerEvent::Data(data),
                // The end goes out with the last data, or alone after it.
                Ok((data, Some(t))) if data.is_empty() => return AnswerEvent::End(t),
                Ok((data, Some(t))) => {
                    // The end came in the same read as data: the data now, the end next.
                    self.end = Some(t);
                    return AnswerEvent::Data(data);
                }
                Err(why) => {
                    log::warn!(
                        "upstream {}: {} sent a malformed body: {why}",
                        self.upstream.conf.name,
                        self.addr
                    );
                    return AnswerEvent::Failed(ended::UPSTREAM_CLOSED);
                }
            }
            let Some(wait) = self.wait.next() else {
                // A gRPC call's deadline passed.
                return AnswerEvent::Failed(ended::UPSTREAM_TIMEOUT);
            };
            let read = super::body::read_more(&mut self.up.io, &mut self.up.buf, wait).await;
            match read {
                Ok(0) if self.framing == Framing::UntilClose => return AnswerEvent::End(None),
                Ok(0) | Err(_) => {
                    log::debug!(
                        "upstream {}: the answer of {} ended early",
                        self.upstream.conf.name,
                        self.addr
                    );
                    return AnswerEvent::Failed(ended::of_pod_read(&read));
                }
                Ok(_) => {}
            }
        }
    }

    fn finish(self, clean: bool) {
        let done = match &self.framing {
            Framing::Empty => true,
            Framing::Length(left) => *left == 0,
            Framing::Chunked(c) => c.is_done(),
            Framing::UntilClose => false,
        };
        if clean && done && self.head.pod_keeps && self.up.buf.is_empty() {
            let upstream = self.upstream;
            upstream.connector.put_back(self.addr, self.up, upstream);
        }
    }

    fn into_tunnel(self) -> Option<pool::Conn> {
        Some(self.up)
    }
}
