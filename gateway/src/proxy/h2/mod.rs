//! HTTP/2 toward clients and what gRPC needs on top of it.
//!
//! h2 client connections (TLS with ALPN h2, or the h2 preface on `h2c: true` listeners) are
//! accepted by `serve.rs`, which serves every stream in the connection's own task through the
//! request pipeline (`proxy/pipeline/`): `client.rs` is the client side of a stream, `pod.rs`
//! the h2 side toward `h2`/`h2c` Pods (for every client protocol), `outgoing.rs` the
//! flow-controlled writes both share.
//!
//! `grpc.rs` holds the gRPC rules: telling gRPC requests apart, reading `grpc-timeout`, and
//! answering gateway-made failures the gRPC way (HTTP 200, then `grpc-status` and
//! `grpc-message` in trailers) rather than with a JSON body.

mod client;
pub mod grpc;
mod outgoing;
pub(crate) mod pod;
pub mod serve;
