//! HTTP/2 toward clients and what gRPC needs on top of it.
//!
//! h2 client connections (TLS with ALPN h2, or the h2 preface on `h2c: true` listeners) are
//! accepted by `serve.rs`, which serves the streams of routed requests in the connection's own
//! task: to HTTP/1.1 Pods by `to_h1.rs`, to h2/h2c Pods (gRPC calls among them) by `to_h2.rs`.
//! Streams that match no route, CONNECT and gRPC calls routed to an `http1` upstream go to
//! Pingora's proxy (`proxy/pingora.rs`). All share routing, selection, metrics and the access
//! log with the HTTP/1.1 path.
//!
//! `grpc.rs` holds the gRPC rules: telling gRPC requests apart, reading `grpc-timeout`, and
//! answering gateway-made failures the gRPC way (HTTP 200, then `grpc-status` and
//! `grpc-message` in trailers) rather than with a JSON body.

pub mod grpc;
pub mod serve;
mod to_h1;
mod to_h2;
