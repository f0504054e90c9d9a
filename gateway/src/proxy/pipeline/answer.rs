//! Answers podgate gives itself, decided here for every client protocol: the JSON error body
//! of a failure (a fixed text per status, never an address or an internal error), the gRPC status
//! a gRPC call gets instead (`proxy/h2/grpc.rs`), and a policy's [`LocalAnswer`]. The codecs only
//! render them (`ClientSide::local`).

use super::sides::{GrpcLocal, Local};
use crate::policies::{AnswerBody, Edits, LocalAnswer};
use crate::proxy::h2::grpc;
use bytes::Bytes;
use http::{HeaderName, HeaderValue};

/// podgate's answer to a failure of kind `status`: JSON, or for a gRPC call its gRPC status in
/// a head and trailers (as gRPC servers answer failures). `fields`: the answer's own (`Allow`).
pub(crate) fn error<'a>(
    status: u16,
    grpc_call: bool,
    fields: &'a [(HeaderName, HeaderValue)],
    request_id: &'a str,
    edits: &'a Edits,
    close: bool,
) -> Local<'a> {
    Local {
        status,
        fields,
        body: Bytes::from(crate::proxy::error_json(status)),
        content_type: Some("application/json"),
        grpc: grpc_call.then(|| {
            let (code, message) = grpc::status_for(status);
            GrpcLocal {
                code,
                message,
                trailers_only: false,
            }
        }),
        request_id,
        edits,
        close,
    }
}

/// A policy's answer; to a gRPC call, Trailers-Only with the status its HTTP status maps to.
pub(crate) fn from_policy<'a>(
    a: &'a LocalAnswer,
    grpc_call: bool,
    request_id: &'a str,
    edits: &'a Edits,
) -> Local<'a> {
    let (body, content_type) = match &a.body {
        AnswerBody::Error => (
            Bytes::from(crate::proxy::error_json(a.status)),
            Some("application/json"),
        ),
        AnswerBody::Empty => (Bytes::new(), None),
        AnswerBody::Bytes(b) => (b.clone(), None),
    };
    Local {
        status: a.status,
        fields: &a.headers,
        body,
        content_type,
        grpc: grpc_call.then(|| {
            let (code, message) = grpc::status_for(a.status);
            GrpcLocal {
                code,
                message,
                trailers_only: true,
            }
        }),
        request_id,
        edits,
        close: false,
    }
}

/// The `Allow` field of a 405: the methods that would have worked.
pub(crate) fn allow(methods: &[http::Method]) -> Vec<(HeaderName, HeaderValue)> {
    let list: Vec<&str> = methods.iter().map(http::Method::as_str).collect();
    HeaderValue::from_str(&list.join(", "))
        .map(|v| vec![(http::header::ALLOW, v)])
        .unwrap_or_default()
}
