//! podgate's gateway: the validated config, route matching, smooth weighted selection over the
//! Pods discovered for each upstream, and the Pingora proxy service tying them together.
//!
//! Flow: `config` → `upstream` (endpoint sets from discovery, weighted) → `balance` (selection)
//! and `routing` (request → route) → `proxy` (Pingora `ProxyHttp`) ; `server` wires them up.

pub mod access_log;
pub mod admin;
pub mod balance;
pub mod config;
pub mod h1;
pub mod health_check;
pub mod live;
pub mod metrics;
pub mod outlier;
pub mod proxy;
pub mod routing;
pub mod server;
pub mod upstream;
