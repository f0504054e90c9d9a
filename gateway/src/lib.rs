//! podgate's gateway, in layers whose imports point one way (top to bottom = may import):
//!
//! - `server`: wires everything and owns the lifecycle (listeners, signals, reloads).
//! - `admin`: the admin listener (`/upstreams`, `/metrics`, health), reading `live`.
//! - `live`: the running generation — config, upstreams and route table — swapped on reload, and
//!   the background services that follow it (discovery feed, active health checks).
//! - `proxy`: the request path — one pipeline (`proxy/pipeline`: route, policies, pick,
//!   attempts, answer, record) with the protocol codecs at its edges (`proxy/h1`: HTTP/1.1,
//!   `proxy/h2`: h2 and gRPC, toward clients and toward Pods), `proxy/routing.rs` (request →
//!   route), `proxy/log_line.rs` (the access line) and `proxy/mod.rs` (targets, error answers).
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
