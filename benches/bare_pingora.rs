//! The floor: a bare Pingora 0.9.1 proxy in the shape of Pingora's own load-balancer example
//! (`LoadBalancer<RoundRobin>`, no routing, no metrics, no logging), for the load benchmark to
//! separate what Pingora costs from what podgate adds.
//!
//! `bare-pingora LISTEN THREADS UPSTREAM...`, e.g. `bare-pingora 127.0.0.1:18083 1 127.0.0.1:18101`

use async_trait::async_trait;
use pingora_core::server::configuration::{Opt, ServerConf};
use pingora_core::server::Server;
use pingora_core::upstreams::peer::HttpPeer;
use pingora_load_balancing::{selection::RoundRobin, LoadBalancer};
use pingora_proxy::{ProxyHttp, Session};
use std::sync::Arc;

struct Bare(Arc<LoadBalancer<RoundRobin>>);

#[async_trait]
impl ProxyHttp for Bare {
    type CTX = ();
    fn new_ctx(&self) {}

    async fn upstream_peer(
        &self,
        _session: &mut Session,
        _ctx: &mut (),
    ) -> pingora_error::Result<Box<HttpPeer>> {
        let upstream = self.0.select(b"", 256).expect("an upstream");
        Ok(Box::new(HttpPeer::new(upstream, false, String::new())))
    }
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.len() < 3 {
        eprintln!("usage: bare-pingora LISTEN THREADS UPSTREAM...");
        std::process::exit(64);
    }
    let conf = ServerConf {
        threads: args[1].parse().expect("THREADS is a number"),
        grace_period_seconds: Some(0),
        graceful_shutdown_timeout_seconds: Some(0),
        ..ServerConf::default()
    };
    let mut server = Server::new_with_opt_and_conf(Opt::default(), conf);
    server.bootstrap();
    let lb = LoadBalancer::try_from_iter(args[2..].iter().map(String::as_str)).expect("upstreams");
    let mut svc = pingora_proxy::http_proxy_service(&server.configuration, Bare(Arc::new(lb)));
    svc.add_tcp(&args[0]);
    server.add_service(svc);
    server.run_forever();
}
