//! Wires a validated [`Config`] into a running Pingora server.
//!
//! Order matters: discovery sources are read first (so the first request already sees the Pods),
//! then upstreams are built from what they found and subscribed to later changes, then listeners
//! open. Nothing binds a port before the config and the sources were accepted. SIGHUP re-reads
//! the config ([`Live::reload`]).

use crate::admin::Admin;
use crate::config::Config;
use crate::live::Live;
use crate::proxy::Gateway;
use async_trait::async_trait;
use pingora_core::apps::{HttpServerOptions, ServerApp};
use pingora_core::listeners::tls::TlsSettings;
use pingora_core::server::configuration::{Opt, ServerConf};
use pingora_core::server::{RunArgs, Server, ShutdownSignal, ShutdownSignalWatch, ShutdownWatch};
use pingora_core::services::background::{background_service, BackgroundService};
use pingora_core::services::listening::Service;
use std::sync::Arc;

/// How the process was started, beyond the config file.
#[derive(Clone, Debug, Default)]
pub struct RunOptions {
    /// Take the listening sockets over from a running podgate (zero-downtime binary upgrade).
    pub upgrade: bool,
}

/// Starts the Kubernetes watches, then reloads the config on SIGHUP for as long as the server
/// runs.
struct Reloader(Arc<Live>);

#[async_trait]
impl BackgroundService for Reloader {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        use tokio::signal::unix::{signal, SignalKind};
        // Kubernetes watches need this runtime; start them now that it runs.
        self.0.watch();
        let mut hup = match signal(SignalKind::hangup()) {
            Ok(s) => s,
            Err(e) => {
                log::error!("cannot listen for SIGHUP, config reloads are off: {e}");
                return;
            }
        };
        loop {
            tokio::select! {
                _ = hup.recv() => {
                    log::info!("SIGHUP: reloading {}", self.0.config().source.display());
                    let live = self.0.clone();
                    // Reading files and manifests folders is blocking work.
                    let _ = tokio::task::spawn_blocking(move || live.reload()).await;
                }
                _ = shutdown.changed() => return,
            }
        }
    }
}

/// Records this process' pid for `podgate -s`, atomically (a reader never sees half a file).
/// After a binary upgrade the new process overwrites the old one's: it is the one to signal.
/// Not fatal: without the file only `-s` cannot find this process.
fn write_pid_file(path: &std::path::Path) {
    let tmp = path.with_extension(format!("pid.{}.tmp", std::process::id()));
    let written = std::fs::write(&tmp, format!("{}\n", std::process::id()))
        .and_then(|()| std::fs::rename(&tmp, path));
    if let Err(e) = written {
        let _ = std::fs::remove_file(&tmp);
        log::warn!(
            "cannot write the pid file {}: {e}; `podgate -s` will not find this process",
            path.display()
        );
    }
}

/// The pid in `path` and that process' command line, when it names a live podgate other than
/// this process. A stale file (no such process, or a pid reused by another program) is not one.
pub fn live_podgate(path: &std::path::Path) -> Option<(i32, String)> {
    let text = std::fs::read_to_string(path).ok()?;
    let pid: i32 = text.trim().parse().ok().filter(|p| *p > 0)?;
    if u32::try_from(pid).ok() == Some(std::process::id()) {
        // A container restarted in the same Pod is pid 1 again, in the same emptyDir /tmp.
        return None;
    }
    let comm = |p: &str| std::fs::read_to_string(format!("/proc/{p}/comm")).ok();
    let theirs = comm(&pid.to_string())?;
    if Some(&theirs) != comm("self").as_ref() {
        return None;
    }
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline"))
        .map(|raw| {
            raw.split(|b| *b == 0)
                .filter(|a| !a.is_empty())
                .map(|a| String::from_utf8_lossy(a).into_owned())
                .collect::<Vec<_>>()
                .join(" ")
        })
        .unwrap_or_default();
    Some((pid, cmdline))
}

/// Removes the pid file at exit, unless it names another process by then (after a binary
/// upgrade it is the new process').
fn remove_pid_file(path: &std::path::Path) {
    let ours =
        std::fs::read_to_string(path).is_ok_and(|t| t.trim() == std::process::id().to_string());
    if ours {
        let _ = std::fs::remove_file(path);
    }
}

/// Whether the gateway is on its way out; `/readyz` says 503 from the first moment it is.
#[derive(Default)]
pub struct Lifecycle {
    draining: std::sync::atomic::AtomicBool,
}

impl Lifecycle {
    pub fn draining(&self) -> bool {
        self.draining.load(std::sync::atomic::Ordering::Relaxed)
    }
}

/// Pingora's signal handling, with a drain step in front of a graceful stop: on SIGTERM podgate
/// reports not-ready at once but keeps accepting for `drain_delay`, so that Kubernetes stops
/// sending before connections are refused; only then do listeners close.
struct Signals {
    lifecycle: Arc<Lifecycle>,
    drain_delay: std::time::Duration,
}

#[async_trait]
impl ShutdownSignalWatch for Signals {
    async fn recv(&self) -> ShutdownSignal {
        use tokio::signal::unix::{signal, SignalKind};
        let (Ok(mut quit), Ok(mut term), Ok(mut int)) = (
            signal(SignalKind::quit()),
            signal(SignalKind::terminate()),
            signal(SignalKind::interrupt()),
        ) else {
            log::error!("cannot listen for signals; stopping");
            return ShutdownSignal::FastShutdown;
        };
        tokio::select! {
            _ = quit.recv() => {
                log::info!("SIGQUIT: handing the listening sockets to the new process");
                ShutdownSignal::GracefulUpgrade
            }
            _ = term.recv() => {
                self.lifecycle.draining.store(true, std::sync::atomic::Ordering::Relaxed);
                log::info!(
                    "SIGTERM: /readyz now answers 503; listeners close in {:?}",
                    self.drain_delay
                );
                tokio::time::sleep(self.drain_delay).await;
                ShutdownSignal::GracefulTerminate
            }
            _ = int.recv() => ShutdownSignal::FastShutdown,
        }
    }
}

/// How long idle client connections stay open after the listeners close, at most.
const LINGER: std::time::Duration = std::time::Duration::from_secs(1);

/// The proxy application, with a pause between "listeners closed" and "idle connections
/// dropped".
///
/// Pingora drops every connection still waiting for a request the moment a service stops
/// listening. That includes a connection accepted an instant earlier whose request bytes were
/// still on the wire: its client sees a reset with no answer, and nothing tells it that resending
/// is safe. During a binary upgrade both processes accept on the same socket, so that instant
/// comes under any steady load. Waiting `linger` first lets such a request be read and answered
/// (with `Connection: close`, as Pingora answers everything once shutdown began); only
/// connections still idle after it are closed, which HTTP clients handle by retrying.
struct Lingering<A> {
    inner: Arc<A>,
    linger: std::time::Duration,
}

#[async_trait]
impl<A: ServerApp + Send + Sync + 'static> ServerApp for Lingering<A> {
    async fn process_new(
        self: &Arc<Self>,
        session: pingora_core::protocols::Stream,
        shutdown: &ShutdownWatch,
    ) -> Option<pingora_core::protocols::Stream> {
        self.inner.process_new(session, shutdown).await
    }

    async fn cleanup(&self) {
        tokio::time::sleep(self.linger).await;
        self.inner.cleanup().await;
    }
}

fn add_listeners<A>(
    svc: &mut Service<A>,
    listeners: &[&crate::config::Listener],
) -> Result<(), String> {
    for l in listeners {
        let addr = l.address.to_string();
        match &l.tls {
            None => svc.add_tcp(&addr),
            Some(tls) => {
                let mut settings = TlsSettings::intermediate(
                    &tls.cert.to_string_lossy(),
                    &tls.key.to_string_lossy(),
                )
                .map_err(|e| format!("listener {addr}: TLS certificate or key: {e}"))?;
                settings.enable_h2();
                svc.add_tls_with_settings(&addr, None, settings);
            }
        }
        log::info!(
            "listening on {}://{addr}",
            if l.tls.is_some() { "https" } else { "http" }
        );
    }
    Ok(())
}

/// Runs the gateway until a signal stops it. Returns only on a start-up failure.
pub fn run(config: Config, opts: RunOptions) -> Result<std::convert::Infallible, String> {
    // Two podgates on one pid file: the second would overwrite the first's, and `podgate -s`
    // would then signal the wrong one (and the second's listeners would wait for ever on ports
    // the first holds). With `-u` the running one is the process being replaced.
    if !opts.upgrade {
        if let Some((pid, cmdline)) = live_podgate(&config.server.pid_file) {
            return Err(format!(
                "the pid file {} names podgate pid {pid} (`{cmdline}`), which is running; this \
                 podgate (-c {}) would take its pid file over. Stop that one first, start this \
                 one with -u to replace it, or give this config its own server.pid_file",
                config.server.pid_file.display(),
                config.source.display()
            ));
        }
    }
    let live = Live::start(config.clone())?;
    live.watch();
    crate::metrics::init_build_info();
    let access_log = crate::access_log::AccessLog::start(&config.access_log)
        .map_err(|e| format!("access_log: cannot open {:?}: {e}", config.access_log))?;

    // After the drain delay, Pingora closes the listeners, waits its grace period for in-flight
    // requests, then gives runtimes up to 1 s: the three add up to at most `grace_period`
    // (Pingora's own default would be 300 s; Kubernetes kills at 30 s by default).
    let after_drain = config
        .server
        .grace_period
        .saturating_sub(config.server.drain_delay)
        .as_secs();
    let grace_seconds = after_drain.saturating_sub(1);
    let mut conf = ServerConf {
        threads: config.server.threads,
        grace_period_seconds: Some(grace_seconds),
        graceful_shutdown_timeout_seconds: Some(1),
        // Per-upstream budgets are enforced in the proxy; this is only the ceiling (retries ≤ 10).
        max_retries: 11,
        upgrade_sock: config.server.upgrade_sock.to_string_lossy().into_owned(),
        // Only used by Pingora's daemon mode, which podgate does not use; kept consistent.
        pid_file: config.server.pid_file.to_string_lossy().into_owned(),
        ..ServerConf::default()
    };
    conf.work_stealing = false;
    let opt = Opt {
        upgrade: opts.upgrade,
        ..Opt::default()
    };
    let mut server = Server::new_with_opt_and_conf(opt, conf);
    server.bootstrap();

    // One budget of head memory for the whole process, shared by every listener.
    let limits = crate::h1::Limits::new(&config.server);
    for h2c in [false, true] {
        let listeners: Vec<_> = config.listeners.iter().filter(|l| l.h2c == h2c).collect();
        if listeners.is_empty() {
            continue;
        }
        let gateway = || Gateway::new(live.router.clone(), access_log.clone());
        let mut proxy = pingora_proxy::http_proxy(&server.configuration, gateway());
        // Half the grace period at most: what is read while lingering still needs time to be
        // answered before the runtimes stop.
        let linger = LINGER.min(std::time::Duration::from_secs(grace_seconds) / 2);
        if h2c {
            // Prior-knowledge h2 is told apart from HTTP/1.1 by Pingora's proxy.
            let mut o = HttpServerOptions::default();
            o.h2c = true;
            proxy.server_options = Some(o);
            let app = Lingering {
                inner: Arc::new(proxy),
                linger,
            };
            let mut svc = Service::new("podgate (h2c)".to_string(), app);
            add_listeners(&mut svc, &listeners)?;
            server.add_service(svc);
        } else {
            let app = crate::h1::Engine::new(gateway(), proxy, linger, config.server.threads)
                .with_limits(limits.clone());
            let mut svc = Service::new("podgate".to_string(), app);
            add_listeners(&mut svc, &listeners)?;
            server.add_service(svc);
        }
    }

    let lifecycle = Arc::new(Lifecycle::default());
    let token = match &config.admin.token_file {
        Some(p) => Some(
            std::fs::read_to_string(p)
                .map_err(|e| format!("admin.token_file {}: {e}", p.display()))?
                .trim()
                .to_string(),
        ),
        None => None,
    };
    if token.is_none() && !config.admin.address.ip().is_loopback() {
        log::warn!(
            "the admin listener {} is not on loopback and has no admin.token_file: anyone who \
             reaches it can read /upstreams, /config and /metrics",
            config.admin.address
        );
    }
    let admin = Admin {
        live: live.clone(),
        lifecycle: lifecycle.clone(),
        token,
        open_metrics: config.admin.open_metrics,
    };
    let mut admin_svc = Service::new(
        "podgate admin".to_string(),
        pingora_core::apps::http_app::HttpServer::new_app(admin),
    );
    admin_svc.add_tcp(&config.admin.address.to_string());
    log::info!("admin on http://{}", config.admin.address);
    server.add_service(admin_svc);

    server.add_service(background_service(
        "config reloader",
        Reloader(live.clone()),
    ));
    server.add_service(background_service(
        "health checks",
        crate::health_check::Checker(live.clone()),
    ));

    write_pid_file(&config.server.pid_file);
    server.run(RunArgs {
        shutdown_signal: Box::new(Signals {
            lifecycle,
            drain_delay: config.server.drain_delay,
        }),
    });
    remove_pid_file(&config.server.pid_file);
    log::info!("stopped");
    std::process::exit(0)
}
