//! HTTP/2 toward clients and what gRPC needs on top of it.
//!
//! h2 client connections (TLS with ALPN h2, or the h2 preface on `h2c: true` listeners) are
//! served by Pingora's proxy (`proxy/pingora.rs`), which shares routing, selection, metrics and
//! the access log with the HTTP/1.1 path. Toward Pods it speaks HTTP/1.1, h2 or h2c as the
//! upstream's `protocol` says, multiplexing streams over pooled connections.
//!
//! `grpc.rs` holds the gRPC rules that path applies: telling gRPC requests apart, reading
//! `grpc-timeout`, and answering gateway-made failures the gRPC way (HTTP 200, then
//! `grpc-status` and `grpc-message` in trailers) rather than with a JSON body.

pub mod grpc;
pub mod serve;
mod to_h1;
mod to_h2;
