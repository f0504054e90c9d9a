//! podgate's gateway, in layers whose imports point one way (top to bottom = may import):
//!
//! - `server`: wires everything and owns the lifecycle (listeners, signals, reloads).
//! - `admin`: the admin listener (`/upstreams`, `/metrics`, health), reading `live`.
//! - `live`: the running generation — config, upstreams and route table — swapped on reload, and
//!   the background services that follow it (discovery feed, active health checks).
//! - `proxy`: the request paths — `proxy/h1` (podgate's own HTTP/1.1) and `proxy/pingora.rs`
//!   (h2/TLS on Pingora) — sharing `proxy/mod.rs` (targets, access line, error answers) and
//!   `proxy/routing.rs` (request → route).
//! - `policies`: route policies (auth, access rules, rate limits, rewrites) over a protocol-neutral
//!   view of a request; the pipeline in `proxy` calls them once per request.
//! - `upstream`: endpoint sets from discovery, weighted selection (`balance`), health
//!   (`health_check`, `outlier`) and connections to Pods (`pool`).
//! - `telemetry`: metric families and the access log writer; a leaf every layer writes into.
//! - `config`: plain data types and their validation; imports nothing of the runtime.
//!
//! Discovery (EndpointSlices, manifests) is its own crate, `podgate-discovery`, below `upstream`.

pub mod admin;
pub mod config;
pub mod live;
pub mod policies;
pub mod proxy;
pub mod server;
pub mod telemetry;
pub mod upstream;
