//! Telemetry: the Prometheus metric families (`metrics`) and the access log writer
//! (`access_log`). A leaf: it imports nothing of the gateway but plain config types, so every
//! layer can write into it; `admin` renders it.

pub mod access_log;
pub mod metrics;
pub mod rate_limit;
