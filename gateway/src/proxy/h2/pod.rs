//! h2 toward Pods of an `h2`/`h2c` upstream (gRPC services, or any h2 server), for every client
//! protocol: a request is one stream on podgate's pooled, multiplexed connection to the Pod
//! (`upstream/h2_pool.rs`), and both directions flow at once, each as the receiver's flow-control
//! window allows, so server-, client- and bidirectional-streaming calls relay message by message,
//! never buffered whole. The answer's trailers come back as the Pod sent them.
//!
//! Why not Pingora's proxy for these streams: its pool cannot be told that a Pod left, so an
//! idle connection to a removed Pod only got its GOAWAY when it timed out; here the pool drains it
//! as soon as the Pod leaves its upstream (see `h2_pool.rs`). The streams also skip the per-stream
//! task and session relay that `serve.rs` measured as the cost of Pingora's h2 path.
//!
//! A Pod may refuse a stream without processing it: it sent GOAWAY with a lower last stream id
//! (a server rotating connections, e.g. gRPC's `MAX_CONNECTION_AGE`, or shutting down), or reset
//! it with REFUSED_STREAM (RFC 9113 §8.7). Such a request is sent again on a new connection to the
//! same Pod, once, for any method, while its body is still whole, and counts neither as a retry
//! nor as a Pod failure; a second refusal goes to another Pod like a connect failure.

use super::outgoing::Outgoing;
use crate::proxy::ended;
use crate::proxy::pipeline::request::Forward;
use crate::proxy::pipeline::sides::{
    AnswerEvent, AnswerHead, Attempt, BodyEvent, ClientFail, ClientSide, Declared, Failure,
    FieldRef, Length, PodAnswer, PodSide, Trailers, Wait,
};
use crate::proxy::pipeline::upload::Upload;
use crate::upstream::{h2_pool, pool};
use bytes::Bytes;
use h2::RecvStream;
use std::net::SocketAddr;
use std::pin::pin;

/// The h2 Pod codec.
pub(crate) struct H2Pod;

impl PodSide for H2Pod {
    const DUPLEX: bool = true;
    type Answer<'a> = H2Answer;

    async fn attempt<'a, C: ClientSide>(
        at: &Attempt<'a>,
        upload: &mut Upload,
        client: &mut C,
    ) -> Result<H2Answer, Failure> {
        let upstream = at.upstream;
        let conf = &upstream.conf;
        let addr = at.backend.addr;
        let mut refused = false;
        loop {
            if !upload.intact() {
                // Part of the body is gone and cannot be sent again.
                return Err(Failure::NoAnswer { timed_out: false });
            }
            let replay = upload.held().clone();
            let ends_now = upload.ended() && replay.is_empty();
            let length = upload.length();
            let make = || pod_request(at.forward, length, addr);
            let (answer, tx) = h2_pool::open(upstream, addr, make, ends_now)
                .await
                .map_err(|e| match e {
                    h2_pool::NotOpened::Connect => Failure::Connect,
                    h2_pool::NotOpened::Unrepresentable => Failure::Unrepresentable,
                })?;
            let mut to_pod = Outgoing::new(tx, replay, upload.ended(), ends_now);
            match await_head(at.wait, answer, &mut to_pod, upload, client).await {
                Ok(resp) => {
                    let head_only = *at.forward.method == http::Method::HEAD;
                    let (parts, recv) = resp.into_parts();
                    return Ok(H2Answer {
                        length: length_of(&parts, recv.is_end_stream() || head_only),
                        parts,
                        recv,
                        to_pod,
                        stopped: false,
                        wait: *at.wait,
                    });
                }
                Err(Head::Refused(e)) => {
                    h2_pool::discard(&upstream.connector, addr);
                    if !refused && upload.intact() {
                        log::debug!(
                            "upstream {}: {addr} refused a stream ({e}); again on a new connection",
                            conf.name
                        );
                        refused = true;
                        continue;
                    }
                    log::warn!("upstream {}: {addr} refused the request: {e}", conf.name);
                    return Err(Failure::Refused);
                }
                Err(Head::Failed(f)) => {
                    if let Failure::NoAnswer { timed_out } = f {
                        let why = if timed_out {
                            "timed out"
                        } else {
                            "stream failed"
                        };
                        log::warn!("upstream {}: no answer from {addr}: {why}", conf.name);
                    }
                    return Err(f);
                }
            }
        }
    }
}

/// How an answer's body comes: none after a head that ended the stream (or to a HEAD), its
/// `content-length` when it gave a valid one (the `h2` crate holds the DATA to it), else
/// streamed.
fn length_of(parts: &http::response::Parts, ended: bool) -> Length {
    let status = parts.status.as_u16();
    if ended || status == 204 || status == 304 {
        return Length::Empty;
    }
    match declared_length(parts) {
        Some(n) => Length::Known(n),
        None => Length::Streamed,
    }
}

fn declared_length(parts: &http::response::Parts) -> Option<u64> {
    let v = parts
        .headers
        .get(http::header::CONTENT_LENGTH)?
        .to_str()
        .ok()?;
    v.parse().ok()
}

/// How waiting for the answer head ended, other than with one.
enum Head {
    Refused(h2::Error),
    Failed(Failure),
}

/// Sends the body to the Pod (what the upload holds, then what the client sends) while waiting
/// for the Pod's answer head; the wait counts from the last byte sent.
async fn await_head<C: ClientSide>(
    wait: &Wait,
    answer: h2::client::ResponseFuture,
    to_pod: &mut Outgoing,
    upload: &mut Upload,
    client: &mut C,
) -> Result<http::Response<RecvStream>, Head> {
    let Some(left) = wait.next() else {
        to_pod.tx.send_reset(h2::Reason::CANCEL);
        return Err(Head::Failed(Failure::NoAnswer { timed_out: true }));
    };
    let mut answer = pin!(answer);
    let mut timer = pin!(tokio::time::sleep(left));
    let mut stopped = false;
    loop {
        let read = to_pod.wants_more() && !stopped && !upload.ended();
        tokio::select! {
            r = &mut answer => return match r {
                Ok(resp) => Ok(resp),
                Err(e) if h2_pool::refused(&e) => Err(Head::Refused(e)),
                Err(e) => {
                    log::debug!("h2 answer head: {e}");
                    Err(Head::Failed(Failure::NoAnswer { timed_out: false }))
                }
            },
            () = &mut timer => {
                to_pod.tx.send_reset(h2::Reason::CANCEL);
                return Err(Head::Failed(Failure::NoAnswer { timed_out: true }));
            }
            r = to_pod.push(), if to_pod.busy() && !stopped => {
                // The Pod stopped taking the body: its answer (or reset) will say why.
                stopped = r.is_err();
            }
            event = client_event(upload, client, read) => match event {
                BodyEvent::Data(data) => {
                    to_pod.take(data, false);
                    // Progress: the Pod's time to answer counts from the last byte sent.
                    if let Some(left) = wait.next() {
                        timer.as_mut().reset(tokio::time::Instant::now() + left);
                    }
                }
                BodyEvent::End(_) => to_pod.take(Bytes::new(), true),
                BodyEvent::Failed(f) => {
                    // The Pod never sees a complete request.
                    to_pod.tx.send_reset(h2::Reason::CANCEL);
                    return Err(Head::Failed(Failure::Client(f)));
                }
            },
        }
    }
}

/// The next piece of the client's body when `read`, else nothing until the client goes away:
/// so a cancelled call stops its Pod stream too, also while no byte moves (a unary call waiting
/// for its answer, a quiet server stream).
async fn client_event<C: ClientSide>(upload: &mut Upload, client: &mut C, read: bool) -> BodyEvent {
    if read {
        return upload.next(client).await;
    }
    client.gone().await;
    BodyEvent::Failed(ClientFail::Gone(ended::CLIENT_CLOSED))
}

/// The request for the Pod: the client's fields that pass (`Forward::passes`), `te: trailers`
/// from an h2 client, a policy's additions, then the forwarding fields; `:authority` is the
/// `Host` decided by the pipeline (the Pod's address when there is none). `None` when it cannot
/// be built.
fn pod_request(
    fwd: &Forward<'_>,
    length: Option<u64>,
    pod: SocketAddr,
) -> Option<http::Request<()>> {
    let authority = match fwd.host {
        [] => pod.to_string(),
        host => std::str::from_utf8(host).ok()?.to_string(),
    };
    let uri = http::Uri::builder()
        .scheme(fwd.scheme)
        .authority(authority)
        .path_and_query(fwd.path.as_ref())
        .build()
        .ok()?;
    let mut out = http::Request::builder()
        .method(fwd.method.clone())
        .uri(uri)
        .body(())
        .ok()?;
    let headers = out.headers_mut();
    match fwd.fields {
        crate::policies::Fields::Map(map) => {
            for (name, value) in map {
                if fwd.passes(name.as_str().as_bytes()) {
                    headers.append(name.clone(), value.clone());
                }
            }
        }
        crate::policies::Fields::Lines { raw, ranges } => {
            for (n, v) in ranges {
                let name = raw.get(n.clone())?;
                if fwd.passes(name) {
                    headers.append(
                        http::HeaderName::from_bytes(name).ok()?,
                        http::HeaderValue::from_bytes(raw.get(v.clone())?).ok()?,
                    );
                }
            }
        }
    }
    if fwd.te_trailers {
        // gRPC servers require it; it says the client takes trailers.
        headers.insert(http::header::TE, http::HeaderValue::from_static("trailers"));
    }
    for (name, value) in fwd.added() {
        headers.append(name.clone(), value.clone());
    }
    let mut xff = Vec::with_capacity(48);
    if fwd.write_forwarded_for(&mut xff) {
        headers.insert(XFF, http::HeaderValue::from_bytes(&xff).ok()?);
    }
    headers.insert(
        XFP,
        http::HeaderValue::from_static(if fwd.proto == b"https" {
            "https"
        } else {
            "http"
        }),
    );
    if !fwd.forwarded_host.is_empty() {
        let host = fwd.forwarded_host.to_ascii_lowercase();
        headers.insert(XFH, http::HeaderValue::from_bytes(&host).ok()?);
    }
    headers.insert(
        X_REQUEST_ID,
        crate::proxy::request_id_value(fwd.request_id)?,
    );
    if let Some(n) = length {
        headers.insert(http::header::CONTENT_LENGTH, http::HeaderValue::from(n));
    }
    Some(out)
}

/// The next piece of an answer's body.
async fn answer_piece(recv: &mut RecvStream) -> AnswerEvent {
    loop {
        match recv.data().await {
            Some(Ok(data)) => {
                let _ = recv.flow_control().release_capacity(data.len());
                if !data.is_empty() {
                    return AnswerEvent::Data(data);
                }
            }
            None => {
                return match std::future::poll_fn(|cx| recv.poll_trailers(cx)).await {
                    Ok(t) => AnswerEvent::End(t.map(Trailers::Map)),
                    Err(e) => {
                        log::debug!("h2 Pod: answer trailers: {e}");
                        AnswerEvent::Failed(ended::UPSTREAM_CLOSED)
                    }
                }
            }
            Some(Err(e)) => {
                log::debug!("h2 Pod: relaying an answer: {e}");
                return AnswerEvent::Failed(ended::UPSTREAM_CLOSED);
            }
        }
    }
}

// Field names parsed once: a name given as a string is parsed at every use (measured: 1,300
// instructions a request for the four, callgrind).
const XFF: http::HeaderName = http::HeaderName::from_static("x-forwarded-for");
const XFP: http::HeaderName = http::HeaderName::from_static("x-forwarded-proto");
const XFH: http::HeaderName = http::HeaderName::from_static("x-forwarded-host");
const X_REQUEST_ID: http::HeaderName = http::HeaderName::from_static("x-request-id");

/// A Pod's answer on its stream, and the rest of the request body still on its way there.
pub(crate) struct H2Answer {
    parts: http::response::Parts,
    recv: RecvStream,
    length: Length,
    to_pod: Outgoing,
    /// The Pod stopped taking the body.
    stopped: bool,
    wait: Wait,
}

impl AnswerHead for H2Answer {
    fn status(&self) -> u16 {
        self.parts.status.as_u16()
    }

    fn reason(&self) -> &[u8] {
        b""
    }

    fn length(&self) -> Length {
        self.length
    }

    fn declared(&self) -> Declared {
        match (self.length, declared_length(&self.parts)) {
            (Length::Empty, Some(n)) => Declared::Length(n),
            _ => Declared::Nothing,
        }
    }

    fn each_field(&self, mut f: impl FnMut(FieldRef<'_>)) {
        for (name, value) in &self.parts.headers {
            // h2 has no connection-specific fields; the length is the client codec's to write.
            if name != http::header::CONTENT_LENGTH {
                f(FieldRef::Header(name, value));
            }
        }
    }

    fn field(&self, name: &str) -> Option<&[u8]> {
        self.parts
            .headers
            .get(name)
            .map(http::HeaderValue::as_bytes)
    }
}

impl PodAnswer for H2Answer {
    fn take_first(&mut self) -> Result<(Bytes, Option<Option<Trailers>>), ()> {
        Ok((Bytes::new(), (self.length == Length::Empty).then_some(None)))
    }

    async fn next(&mut self, read: bool) -> AnswerEvent {
        let Some(wait) = self.wait.next() else {
            // A gRPC call's deadline passed.
            return AnswerEvent::Failed(ended::UPSTREAM_TIMEOUT);
        };
        let H2Answer {
            recv,
            to_pod,
            stopped,
            ..
        } = self;
        let push = !*stopped && to_pod.busy();
        if read && !push {
            // The common case needs no select (and no poll of a second future each time).
            return match tokio::time::timeout(wait, answer_piece(recv)).await {
                Ok(event) => event,
                Err(_) => {
                    log::debug!("h2 Pod: the answer stalled");
                    AnswerEvent::Failed(ended::UPSTREAM_TIMEOUT)
                }
            };
        }
        let answer = async {
            if !read {
                return std::future::pending().await;
            }
            match tokio::time::timeout(wait, answer_piece(recv)).await {
                Ok(event) => event,
                Err(_) => {
                    log::debug!("h2 Pod: the answer stalled");
                    AnswerEvent::Failed(ended::UPSTREAM_TIMEOUT)
                }
            }
        };
        tokio::select! {
            event = answer => event,
            pushed = to_pod.push(), if push => {
                // A Pod that stops taking the body says why in its answer (or its reset).
                *stopped = pushed.is_err();
                AnswerEvent::Uploaded
            }
        }
    }

    fn finish(mut self, clean: bool) {
        if !clean {
            self.cancel();
        }
    }

    fn into_tunnel(self) -> Option<pool::Conn> {
        None
    }

    fn wants_upload(&self) -> bool {
        !self.stopped && self.to_pod.wants_more()
    }

    fn upload(&mut self, data: Bytes, end: bool) {
        self.to_pod.take(data, end);
    }

    fn upload_busy(&self) -> bool {
        !self.stopped && self.to_pod.busy()
    }

    fn cancel(&mut self) {
        self.to_pod.tx.send_reset(h2::Reason::CANCEL);
    }
}
