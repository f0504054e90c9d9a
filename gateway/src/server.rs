//! Wires a validated [`Config`] into a running Pingora server.
//!
//! Order matters: discovery sources are read first (so the first request already sees the Pods),
//! then upstreams are built from what they found and subscribed to later changes, then listeners
//! open. Nothing binds a port before the config and the sources were accepted, and every address
//! is bound (a busy one stops the start) before any is reported as listening. SIGHUP re-reads
//! the config ([`Live::reload`]).
//!
//! Before all of that, when zone-aware upstreams have no `server.zone`, podgate asks the API
//! server for its own node (`NODE_NAME`) and takes the node's zone label ([`node_zone`]).

use crate::admin::Admin;
use crate::config::Config;
use crate::live::{Lifecycle, Live};
use crate::proxy::tls_accept::TlsListeners;
use crate::proxy::Gateway;
use crate::telemetry::access_log::AccessLog;
use async_trait::async_trait;
use pingora_core::listeners::{L4BufferSettings, ListenerConfig};
use pingora_core::server::configuration::{Opt, ServerConf};
use pingora_core::server::{
    ListenFds, RunArgs, RuntimeOpts, Server, ShutdownSignal, ShutdownSignalWatch, ShutdownWatch,
};
use pingora_core::services::background::{background_service, BackgroundService};
use pingora_core::services::listening::Service;
use pingora_core::services::{ServiceReadyNotifier, ServiceWithDependents};
use std::os::fd::{IntoRawFd, OwnedFd};
use std::sync::Arc;

/// How the process was started, beyond the config file.
#[derive(Clone, Debug, Default)]
pub struct RunOptions {
    /// Take the listening sockets over from a running podgate (zero-downtime binary upgrade).
    pub upgrade: bool,
}

/// Starts the Kubernetes watches, then reloads the config on SIGHUP for as long as the server
/// runs. SIGHUP also re-opens the access log file, as after a log rotation.
struct Reloader(Arc<Live>, AccessLog);

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
                    self.1.reopen();
                    let live = self.0.clone();
                    // Reading files and manifests folders is blocking work.
                    let _ = tokio::task::spawn_blocking(move || live.reload()).await;
                }
                _ = shutdown.changed() => return,
            }
        }
    }
}

/// How long start-up waits for the node's answer before going on without a zone.
const NODE_ZONE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

/// The environment variable naming podgate's node (downward API: `fieldRef: spec.nodeName`).
pub const NODE_NAME_ENV: &str = "NODE_NAME";

/// podgate's zone read from its node's label, for zone-aware upstreams without `server.zone`:
/// `(zone, where it came from)`, or `(None, why not)` after one log line that says what to fix
/// (those upstreams then route to all zones; podgate starts anyway). `None` when there is
/// nothing to learn: `server.zone` is set, or no upstream is zone-aware.
fn node_zone(config: &Config) -> Option<(Option<String>, String)> {
    if config.server.zone.is_some() || !config.upstreams.iter().any(|u| u.zone_aware) {
        return None;
    }
    let failed = |why: String| {
        log::error!("zone-aware upstreams route to all zones: {why}");
        Some((None, format!("none, all zones get traffic: {why}")))
    };
    // Validation makes a zone-aware upstream without server.zone name a Kubernetes cluster.
    let Some(cluster) = config.server.zone_from_node.as_deref() else {
        return failed("server.zone is not set and there is no cluster to read it from".into());
    };
    let node = match std::env::var(NODE_NAME_ENV) {
        Ok(n) if !n.is_empty() => n,
        _ => {
            return failed(format!(
                "server.zone is not set and {NODE_NAME_ENV} is not set, so podgate cannot read \
                 its node's zone from cluster {cluster}; set {NODE_NAME_ENV} from the downward \
                 API (fieldRef: spec.nodeName) or set server.zone"
            ))
        }
    };
    let access = config.clusters.iter().find_map(|c| match &c.kind {
        crate::config::ClusterKind::Kube(access) if &*c.name == cluster => Some(access.clone()),
        _ => None,
    });
    let Some(access) = access else {
        return failed(format!("cluster {cluster} is not a Kubernetes cluster"));
    };
    let kube =
        match podgate_discovery::KubeCluster::new(cluster, access, podgate_discovery::Store::new())
        {
            Ok(k) => k,
            Err(e) => return failed(e.to_string()),
        };
    // A runtime of its own, for one request, before Pingora's runtimes exist.
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => return failed(format!("cannot start a runtime to ask for the node: {e}")),
    };
    match runtime.block_on(kube.node_zone(&node, NODE_ZONE_TIMEOUT)) {
        Ok(zone) => {
            let source = format!("node {node} (cluster {cluster})");
            log::info!("zone {zone}: from the zone label of {source}");
            Some((Some(zone), source))
        }
        Err(e) => failed(e.to_string()),
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

/// Every clean end of the process goes through here, whichever way it came: the early one once
/// nothing is in flight ([`Stopper`]) and the end of [`run`] (a stop at once, or the end of the
/// grace period). The pid file goes, one "stopped" line is logged, and the exit code is 0.
fn stopped(pid_file: &std::path::Path, why: &str) -> ! {
    static STOPPING: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
    if STOPPING.swap(true, std::sync::atomic::Ordering::AcqRel) {
        // The other way got here first and is ending the process.
        loop {
            std::thread::park();
        }
    }
    remove_pid_file(pid_file);
    // The worker threads have stopped (or are cut off here): what they logged last is still in
    // their buffers.
    crate::telemetry::access_log::close_all();
    log::info!("stopped: {why}");
    std::process::exit(0)
}

/// Ends the process as soon as a graceful stop has nothing left to do, instead of at the end of
/// Pingora's grace period (which it otherwise sleeps through whole, busy or not): once the
/// listeners closed, when no request, tunnel, h2 stream or TLS handshake is in flight and no
/// client connection that could still bring one is open — those are given `linger`, as the
/// HTTP/1.1 path gives them (see [`LINGER`]).
struct Stopper {
    pid_file: std::path::PathBuf,
    linger: std::time::Duration,
}

#[async_trait]
impl BackgroundService for Stopper {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        if shutdown.wait_for(|stopping| *stopping).await.is_err() {
            return;
        }
        let since = std::time::Instant::now();
        crate::proxy::in_flight::drained(self.linger).await;
        stopped(
            &self.pid_file,
            &format!(
                "nothing in flight {:?} after the listeners closed",
                since.elapsed()
            ),
        )
    }
}

/// Pingora's signal handling, with a drain step in front of a graceful stop: on SIGTERM podgate
/// reports not-ready at once but keeps accepting for `drain_delay`, so that Kubernetes stops
/// sending before connections are refused; only then do listeners close.
struct Signals {
    lifecycle: Arc<Lifecycle>,
    drain_delay: std::time::Duration,
    grace_period: std::time::Duration,
}

/// Past its stated time (`grace_period` for SIGTERM, 5 s more for SIGQUIT, at once for SIGINT),
/// how long a stop may still take before the process exits regardless.
const WATCHDOG_SLACK: std::time::Duration = std::time::Duration::from_secs(3);

/// Ends the process `after` from now, whatever it is still doing: a stop must not hang (issue
/// 14 saw a SIGINT'd podgate stay up, logging in a loop, for 10 minutes).
fn exit_after(after: std::time::Duration, signal: &'static str) {
    let _ = std::thread::Builder::new()
        .name("stop watchdog".into())
        .spawn(move || {
            std::thread::sleep(after);
            log::error!("{signal}: still running {after:?} after the signal; exiting now");
            // What the access log holds is written (at most 2 s more); requests still running
            // may log after that, and those lines are lost with the process.
            crate::telemetry::access_log::close_all();
            std::process::exit(1);
        });
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
                // Pingora waits 5 s for the new process to accept before its grace period.
                let upgrade_wait = std::time::Duration::from_secs(5);
                exit_after(self.grace_period + upgrade_wait + WATCHDOG_SLACK, "SIGQUIT");
                ShutdownSignal::GracefulUpgrade
            }
            _ = term.recv() => {
                exit_after(self.grace_period + WATCHDOG_SLACK, "SIGTERM");
                self.lifecycle.draining.store(true, std::sync::atomic::Ordering::Relaxed);
                log::info!(
                    "SIGTERM: /readyz now answers 503; listeners close in {:?}",
                    self.drain_delay
                );
                tokio::time::sleep(self.drain_delay).await;
                ShutdownSignal::GracefulTerminate
            }
            _ = int.recv() => {
                exit_after(WATCHDOG_SLACK, "SIGINT");
                ShutdownSignal::FastShutdown
            }
        }
    }
}

/// How long idle client connections stay open after the listeners close, at most.
///
/// Pingora drops every connection still waiting for a request the moment a service stops
/// listening. That includes a connection accepted an instant earlier whose request bytes were
/// still on the wire: its client sees a reset with no answer, and nothing tells it that resending
/// is safe. During a binary upgrade both processes accept on the same socket, so that instant
/// comes under any steady load. Waiting this long first (in [`crate::proxy::h1::Engine`]'s cleanup) lets
/// such a request be read and answered (with `Connection: close`); only connections still idle
/// after it are closed, which HTTP clients handle by retrying.
const LINGER: std::time::Duration = std::time::Duration::from_secs(1);

/// Binds a listening socket for `address` now, so that a busy address stops the start.
///
/// Pingora binds its listeners itself once the server runs, in the service's runtime: when the
/// address is in use it logs "is in use, will try again" and retries (30 times a second apart,
/// then that service's task panics and the process runs on without it). Binding here, before
/// anything is reported as listening, turns a busy address into exit code 1 with a message naming
/// it. The socket is made like Pingora's: `SO_REUSEADDR`, so a restart is not refused for the
/// closing connections of the previous process, and no `SO_REUSEPORT`, so an address another
/// process listens on fails even if that process set it. [`Prebound`] hands it to Pingora, which
/// also passes it on in a binary upgrade.
fn bind(what: &str, address: std::net::SocketAddr) -> Result<OwnedFd, String> {
    // std sets SO_REUSEADDR (and close-on-exec) on Unix, and never SO_REUSEPORT.
    let socket = std::net::TcpListener::bind(address).map_err(|e| {
        if e.kind() == std::io::ErrorKind::AddrInUse {
            format!("{what} {address} is in use by another process (or another listener here)")
        } else {
            format!("{what} {address}: cannot listen: {e}")
        }
    })?;
    // Pingora's listener registers the socket with tokio, which needs it non-blocking.
    socket
        .set_nonblocking(true)
        .map_err(|e| format!("{what} {address}: {e}"))?;
    Ok(socket.into())
}

/// A Pingora service whose listening sockets podgate bound itself ([`bind`]).
///
/// Pingora looks an address up in its table of inherited sockets (the one a binary upgrade
/// fills) before it binds one: putting the sockets in that table when the service starts makes
/// Pingora listen on them as if they had been handed over, and hand them on at the next upgrade.
struct Prebound<S> {
    inner: S,
    /// The address as the service's listener names it, and its socket.
    sockets: Vec<(String, OwnedFd)>,
}

#[async_trait]
impl<S: ServiceWithDependents> ServiceWithDependents for Prebound<S> {
    async fn start_service(
        &mut self,
        fds: Option<ListenFds>,
        shutdown: ShutdownWatch,
        listeners_per_fd: usize,
        ready_notifier: ServiceReadyNotifier,
    ) {
        if let Some(fds) = &fds {
            let mut table = fds.lock();
            for (address, socket) in self.sockets.drain(..) {
                // Only a socket inherited in an upgrade can be there already; ours then closes.
                if table.get(&address).is_none() {
                    table.add(address, socket.into_raw_fd());
                }
            }
        }
        self.inner
            .start_service(fds, shutdown, listeners_per_fd, ready_notifier)
            .await
    }

    fn name(&self) -> &str {
        self.inner.name()
    }

    fn threads(&self) -> Option<usize> {
        self.inner.threads()
    }

    fn runtime_opts_override(&self, global: &RuntimeOpts) -> Option<RuntimeOpts> {
        self.inner.runtime_opts_override(global)
    }

    fn on_startup_delay(&self, time_waited: std::time::Duration) {
        self.inner.on_startup_delay(time_waited)
    }

    fn listen_addresses(&self) -> Option<Vec<String>> {
        // Pingora closes inherited sockets no service claims; an answer of `None` would turn
        // that off for every service.
        self.inner.listen_addresses()
    }
}

/// A listening address: what it is (for messages), where, and its URL scheme.
type Address = (String, std::net::SocketAddr, &'static str);

/// Binds `addresses` for `svc`, unless `upgrade` takes the sockets over from the running process.
fn prebind<S>(svc: S, addresses: &[Address], upgrade: bool) -> Result<Prebound<S>, String> {
    let mut sockets = Vec::new();
    if !upgrade {
        for (what, address, _) in addresses {
            sockets.push((address.to_string(), bind(what, *address)?));
        }
    }
    Ok(Prebound {
        inner: svc,
        sockets,
    })
}

/// The TLS listeners among `listeners`, with their certificates loaded (podgate runs their
/// handshakes itself, under `client_header_timeout`: `proxy/tls_accept.rs`).
fn tls_listeners(listeners: &[(usize, &crate::config::Listener)]) -> Result<TlsListeners, String> {
    let mut tls = TlsListeners::default();
    for (i, l) in listeners {
        if let Some(t) = &l.tls {
            tls.add(
                l.address,
                &t.cert.to_string_lossy(),
                &t.key.to_string_lossy(),
            )
            .map_err(|e| format!("listeners[{i}] {}: TLS certificate or key: {e}", l.address))?;
        }
    }
    Ok(tls)
}

/// Adds `listeners` to `svc`, all as plain TCP listeners to Pingora (TLS is podgate's, see
/// [`tls_listeners`]); returns them as [`prebind`] takes them.
///
/// The connections get no L4 buffers: Pingora would give each a 64 KiB read and a 1460-byte
/// write buffer, but podgate's HTTP/1.1 path reads into its own buffer and writes whole heads,
/// TLS keeps its own record buffers, and h2 frames its own writes. An idle connection holding
/// 64 KiB is what the issue on idle-connection memory measured.
fn add_listeners<A>(
    svc: &mut Service<A>,
    listeners: &[(usize, &crate::config::Listener)],
) -> Vec<Address> {
    let mut bound = Vec::new();
    for (i, l) in listeners {
        let addr = l.address.to_string();
        svc.add_listener(ListenerConfig::tcp(&addr).l4_buffer(L4BufferSettings::unbuffered()));
        let scheme = if l.tls.is_some() { "https" } else { "http" };
        bound.push((format!("proxy listener listeners[{i}]"), l.address, scheme));
    }
    bound
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
    let mut config = config;
    let learned = node_zone(&config);
    if let Some((zone, source)) = &learned {
        config.learned_zone(zone.as_deref(), source);
    }
    let live = Live::start(config.clone())?;
    live.remember_zone(learned);
    live.watch();
    crate::telemetry::metrics::init_build_info();
    let access_log = AccessLog::start(&config.access_log)
        .map_err(|e| format!("access_log: cannot open {:?}: {e}", config.access_log.sink))?;

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
    let limits = crate::proxy::h1::Limits::new(&config.server);
    // Half the grace period at most: what is read while lingering still needs time to be
    // answered before the runtimes stop.
    let linger = LINGER.min(std::time::Duration::from_secs(grace_seconds) / 2);
    // Every address is bound before any is reported as listening.
    let mut listening = Vec::new();
    for h2c in [false, true] {
        let listeners: Vec<_> = (config.listeners.iter().enumerate())
            .filter(|(_, l)| l.h2c == h2c)
            .collect();
        if listeners.is_empty() {
            continue;
        }
        let gateway = Gateway::new(live.router.clone(), access_log.clone());
        let app = crate::proxy::h1::Engine::new(gateway, linger, config.server.threads)
            .with_h2c(h2c)
            .with_limits(limits.clone())
            .with_tls(tls_listeners(&listeners)?);
        let name = if h2c { "podgate (h2c)" } else { "podgate" };
        let mut svc = Service::new(name.to_string(), app);
        let addresses = add_listeners(&mut svc, &listeners);
        server.add_service(prebind(svc, &addresses, opts.upgrade)?);
        listening.extend(addresses);
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
    let admin_address = [(
        "admin listener admin.address".to_string(),
        config.admin.address,
        "http",
    )];
    server.add_service(prebind(admin_svc, &admin_address, opts.upgrade)?);
    listening.extend(admin_address);
    for (what, address, scheme) in &listening {
        log::info!("listening on {scheme}://{address} ({what})");
    }

    server.add_service(background_service(
        "config reloader",
        Reloader(live.clone(), access_log.clone()),
    ));
    server.add_service(background_service(
        "health checks",
        crate::live::Checker(live.clone()),
    ));
    server.add_service(background_service(
        "stop when done",
        Stopper {
            pid_file: config.server.pid_file.clone(),
            linger,
        },
    ));

    write_pid_file(&config.server.pid_file);
    server.run(RunArgs {
        shutdown_signal: Box::new(Signals {
            lifecycle,
            drain_delay: config.server.drain_delay,
            grace_period: config.server.grace_period,
        }),
    });
    let left = crate::proxy::in_flight::work();
    if left > 0 {
        log::warn!(
            "the grace period ended with {left} requests, tunnels or h2 streams in flight; they \
             are cut off (server.grace_period {:?})",
            config.server.grace_period
        );
    }
    stopped(&config.server.pid_file, "the server ended")
}
