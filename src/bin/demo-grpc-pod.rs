//! A demo gRPC Pod: serves the standard health service (`grpc.health.v1.Health/Check`) over h2c
//! on the given address (default 127.0.0.1:50051), answering SERVING for the whole server (an
//! empty service name) and NOT_FOUND for any other name; any other method is UNIMPLEMENTED.
//!
//! It is the gRPC upstream of the h2 load bench (`benches/load/h2.py`), where it must not be
//! what limits the proxies: one thread, hyper's h2 server, fixed answers. The messages are
//! written by hand (the request is read for its field 1, the answer is a fixed 2-byte message)
//! rather than through a protobuf library, to keep the binary's dependencies the gateway's own.

use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Request, Response};
use hyper::body::{Body, Frame, Incoming};
use std::convert::Infallible;
use std::pin::Pin;
use std::task::{Context, Poll};

/// A gRPC answer body: at most one message, then the trailers with the status.
struct Answer {
    message: Option<Bytes>,
    trailers: Option<HeaderMap>,
}

impl Body for Answer {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        _: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        if let Some(m) = self.message.take() {
            return Poll::Ready(Some(Ok(Frame::data(m))));
        }
        Poll::Ready(self.trailers.take().map(|t| Ok(Frame::trailers(t))))
    }
}

fn answer(status: u8, message: Option<&'static [u8]>, text: &'static str) -> Response<Answer> {
    let mut trailers = HeaderMap::new();
    trailers.insert("grpc-status", HeaderValue::from(u16::from(status)));
    if !text.is_empty() {
        trailers.insert("grpc-message", HeaderValue::from_static(text));
    }
    let mut resp = Response::new(Answer {
        message: message.map(Bytes::from_static),
        trailers: Some(trailers),
    });
    resp.headers_mut().insert(
        http::header::CONTENT_TYPE,
        HeaderValue::from_static("application/grpc"),
    );
    resp
}

/// Whether the `HealthCheckRequest` in gRPC frame `body` names a service (field 1, a string).
fn names_a_service(body: &[u8]) -> bool {
    // Frame: flag, 4-byte length, message; the message's field 1 is tag 0x0a, then a length.
    matches!(body.get(5..7), Some([0x0a, len]) if *len > 0)
}

async fn handle(req: Request<Incoming>) -> Result<Response<Answer>, Infallible> {
    use http_body_util::BodyExt;
    if req.uri().path() != "/grpc.health.v1.Health/Check" {
        return Ok(answer(12, None, "unknown method"));
    }
    // The whole request first: an answer sent before it would leave the client's END_STREAM to
    // arrive for a closed stream.
    let body = match req.into_body().collect().await {
        Ok(b) => b.to_bytes(),
        Err(_) => return Ok(answer(13, None, "request body")),
    };
    if names_a_service(&body) {
        return Ok(answer(5, None, "unknown service"));
    }
    // HealthCheckResponse { status: SERVING (1) } in a gRPC frame.
    const SERVING: &[u8] = &[0, 0, 0, 0, 2, 0x08, 0x01];
    Ok(answer(0, Some(SERVING), ""))
}

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let addr = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "127.0.0.1:50051".to_string());
    if addr == "-h" || addr == "--help" {
        eprintln!("usage: demo-grpc-pod [IP:PORT]   (default 127.0.0.1:50051)");
        return;
    }
    let listener = match tokio::net::TcpListener::bind(&addr).await {
        Ok(l) => l,
        Err(e) => {
            eprintln!("demo-grpc-pod: cannot listen on {addr}: {e}");
            std::process::exit(1);
        }
    };
    eprintln!("demo-grpc-pod: grpc.health.v1.Health on {addr} (h2c)");
    loop {
        let Ok((tcp, _)) = listener.accept().await else {
            continue;
        };
        let _ = tcp.set_nodelay(true);
        tokio::spawn(async move {
            let _ = hyper::server::conn::http2::Builder::new(hyper_util::rt::TokioExecutor::new())
                .serve_connection(
                    hyper_util::rt::TokioIo::new(tcp),
                    hyper::service::service_fn(handle),
                )
                .await;
        });
    }
}
