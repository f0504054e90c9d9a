//! Test support: run the real `podgate` binary against demo Pods on loopback, and talk to it over
//! real sockets. Nothing here sleeps to synchronise: waits poll a condition until a deadline.
#![allow(dead_code)]

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use podgate::demo::{serve, DemoPod};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};
use tokio::net::{TcpListener, TcpStream};

pub const DEADLINE: Duration = Duration::from_secs(20);

/// Polls `cond` every 10 ms until it holds or `DEADLINE` passes.
pub async fn wait_for<F, Fut>(what: &str, mut cond: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let start = Instant::now();
    while start.elapsed() < DEADLINE {
        if cond().await {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("timed out after {DEADLINE:?} waiting for {what}");
}

/// A port that was free a moment ago on 127.0.0.1.
///
/// Pingora binds its listeners itself and cannot report the port of a `:0` bind, so the test
/// reserves one by binding and releasing it. The window for a clash is a few microseconds.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("bind 127.0.0.1:0")
}

/// A running demo Pod; stops when dropped.
pub struct Pod {
    pub name: String,
    pub addr: SocketAddr,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Pod {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Pod {
    pub fn ip(&self) -> String {
        self.addr.ip().to_string()
    }
}

pub async fn pod_on(name: &str, listener: TcpListener) -> Pod {
    let addr = listener.local_addr().unwrap();
    let version = name.rsplit('-').next().unwrap_or(name).to_string();
    let task = tokio::spawn(serve(
        listener,
        DemoPod {
            name: name.to_string(),
            version,
        },
    ));
    Pod {
        name: name.to_string(),
        addr,
        task,
    }
}

/// Starts Pods that share one port on distinct loopback IPs, as the Pods of a Service do.
pub async fn pods_same_port(names: &[&str]) -> Vec<Pod> {
    // Different tests use different IP ranges by chance; retry on the rare clash.
    for attempt in 0..50u32 {
        let base = 20 + ((std::process::id() + attempt * 7) % 200) as u8;
        let first = match TcpListener::bind((Ipv4Addr::new(127, 0, base, 1), 0)).await {
            Ok(l) => l,
            Err(_) => continue,
        };
        let port = first.local_addr().unwrap().port();
        let mut listeners = vec![first];
        for i in 1..names.len() {
            match TcpListener::bind((Ipv4Addr::new(127, 0, base, 1 + i as u8), port)).await {
                Ok(l) => listeners.push(l),
                Err(_) => break,
            }
        }
        if listeners.len() == names.len() {
            let mut pods = Vec::new();
            for (name, l) in names.iter().zip(listeners) {
                pods.push(pod_on(name, l).await);
            }
            return pods;
        }
    }
    panic!("could not find a shared free port on loopback");
}

/// One endpoint of an EndpointSlice in a test manifest.
pub struct Ep<'a> {
    pub ip: String,
    pub pod: &'a str,
    pub ready: Option<bool>,
    pub serving: Option<bool>,
    pub terminating: Option<bool>,
}

impl<'a> Ep<'a> {
    pub fn ready(pod: &'a Pod) -> Self {
        Ep {
            ip: pod.ip(),
            pod: &pod.name,
            ready: Some(true),
            serving: Some(true),
            terminating: Some(false),
        }
    }
}

/// A Service `name` with port 8000 (named `http`) to targetPort `http`.
pub fn service_yaml(name: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Service\nmetadata:\n  name: {name}\n  namespace: default\nspec:\n  \
         selector:\n    app: {name}\n  ports:\n    - name: http\n      port: 8000\n      targetPort: http\n"
    )
}

/// An EndpointSlice of service `service` whose `http` port is `port`.
pub fn slice_yaml(slice: &str, service: &str, port: u16, eps: &[Ep<'_>]) -> String {
    let mut s = format!(
        "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: {slice}\n  \
         namespace: default\n  labels:\n    kubernetes.io/service-name: {service}\naddressType: IPv4\n\
         ports:\n  - name: http\n    port: {port}\n    protocol: TCP\nendpoints:\n"
    );
    if eps.is_empty() {
        s = s.replace("endpoints:\n", "endpoints: []\n");
    }
    for e in eps {
        s.push_str(&format!(
            "  - addresses: [\"{}\"]\n    targetRef: {{kind: Pod, name: {}, namespace: default}}\n    conditions: {{",
            e.ip, e.pod
        ));
        let conds: Vec<String> = [
            ("ready", e.ready),
            ("serving", e.serving),
            ("terminating", e.terminating),
        ]
        .iter()
        .filter_map(|(k, v)| v.map(|v| format!("{k}: {v}")))
        .collect();
        s.push_str(&conds.join(", "));
        s.push_str("}\n");
    }
    s
}

/// Writes `text` to `path` the way editors and `kubectl`-style tools do: a temp file renamed into
/// place, so a reader never sees half a file.
pub fn write_atomically(path: &Path, text: &str) {
    let tmp = path.with_extension("tmp~");
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

/// A `podgate` process run on a config in a temp folder; killed when dropped.
pub struct Gateway {
    pub dir: tempfile::TempDir,
    /// The first listener's address.
    pub addr: SocketAddr,
    /// Every listener's address, in the order they were asked for.
    pub addrs: Vec<SocketAddr>,
    pub admin: SocketAddr,
    child: Child,
    pub log: PathBuf,
    /// The listeners/admin/server part of the config, kept for [`Gateway::rewrite_config`].
    conf_head: String,
}

impl Drop for Gateway {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub fn podgate_bin() -> &'static str {
    env!("CARGO_BIN_EXE_podgate")
}

impl Gateway {
    /// Starts podgate with `body` (the config without `listeners`/`admin`/`server`, which this
    /// adds) in a fresh temp folder holding `files` (relative path, content), and waits until the
    /// admin listener and the proxy listener answer.
    pub async fn start(body: &str, files: &[(&str, &str)]) -> Gateway {
        let dir = tempfile::tempdir().unwrap();
        for (rel, text) in files {
            let p = dir.path().join(rel);
            std::fs::create_dir_all(p.parent().unwrap()).unwrap();
            std::fs::write(p, text).unwrap();
        }
        Self::start_in(dir, body).await
    }

    pub async fn start_in(dir: tempfile::TempDir, body: &str) -> Gateway {
        Self::start_with_listener(dir, "", body).await
    }

    /// Like [`Gateway::start_in`], with `listener_extra` (e.g. `tls: {...}`) added to the one
    /// listener's mapping.
    pub async fn start_with_listener(
        dir: tempfile::TempDir,
        listener_extra: &str,
        body: &str,
    ) -> Gateway {
        Self::start_full(dir, listener_extra, "threads: 1\n  grace_period: 1s", body).await
    }

    /// The most general start: `server` is the body of the `server:` mapping (indented by two
    /// spaces after its first line).
    pub async fn start_full(
        dir: tempfile::TempDir,
        listener_extra: &str,
        server: &str,
        body: &str,
    ) -> Gateway {
        Self::start_inner(dir, &[listener_extra], "", server, body, &[]).await
    }

    /// Starts podgate with one listener per entry of `listener_extras` (each entry added to its
    /// listener's mapping, e.g. `tls: {...}` or `h2c: true`; empty for a plain one); their
    /// addresses are in [`Gateway::addrs`], in the same order.
    pub async fn start_listeners(
        dir: tempfile::TempDir,
        listener_extras: &[&str],
        body: &str,
    ) -> Gateway {
        let server = "threads: 1\n  grace_period: 1s";
        Self::start_inner(dir, listener_extras, "", server, body, &[]).await
    }

    /// [`Gateway::start_listeners`] with `server` as the body of the `server:` mapping (as in
    /// [`Gateway::start_full`]).
    pub async fn start_listeners_with(
        dir: tempfile::TempDir,
        listener_extras: &[&str],
        server: &str,
        body: &str,
    ) -> Gateway {
        Self::start_inner(dir, listener_extras, "", server, body, &[]).await
    }

    /// Like [`Gateway::start_full`], with environment variables for the process (e.g.
    /// `NODE_NAME`).
    pub async fn start_env(
        dir: tempfile::TempDir,
        server: &str,
        body: &str,
        env: &[(&str, &str)],
    ) -> Gateway {
        Self::start_inner(dir, &[""], "", server, body, env).await
    }

    /// Like [`Gateway::start_in`], with `admin_extra` (e.g. `token_file: t`) in `admin:`.
    pub async fn start_with_admin(
        dir: tempfile::TempDir,
        admin_extra: &str,
        body: &str,
    ) -> Gateway {
        Self::start_inner(
            dir,
            &[""],
            admin_extra,
            "threads: 1\n  grace_period: 1s",
            body,
            &[],
        )
        .await
    }

    async fn start_inner(
        dir: tempfile::TempDir,
        listener_extras: &[&str],
        admin_extra: &str,
        server: &str,
        body: &str,
        env: &[(&str, &str)],
    ) -> Gateway {
        let admin_extra = if admin_extra.is_empty() {
            String::new()
        } else {
            format!("  {admin_extra}\n")
        };
        // Each gateway its own pid file, so that tests running at once never share one.
        let pid_file = if server.contains("pid_file") {
            String::new()
        } else {
            format!("  pid_file: {}\n", dir.path().join("podgate.pid").display())
        };
        let conf_path = dir.path().join("podgate.yaml");
        let log = dir.path().join("podgate.log");
        // A port found free can be taken by another test (or an outgoing connection) before
        // podgate binds it; then podgate says so and this tries other ports.
        for attempt in 1..=3 {
            // Ports released one after the other can be the same one: the admin's port first,
            // then one per listener, all distinct.
            let mut ports: Vec<u16> = Vec::new();
            while ports.len() <= listener_extras.len() {
                let p = free_port();
                if !ports.contains(&p) {
                    ports.push(p);
                }
            }
            let admin_port = ports[0];
            let mut listeners = String::new();
            for (port, extra) in ports[1..].iter().zip(listener_extras) {
                listeners.push_str(&format!("  - address: 127.0.0.1:{port}\n"));
                if !extra.is_empty() {
                    listeners.push_str(&format!("    {extra}\n"));
                }
            }
            let conf_head = format!(
                "listeners:\n{listeners}admin:\n  address: 127.0.0.1:{admin_port}\n{admin_extra}\
                 server:\n  {server}\n{pid_file}"
            );
            std::fs::write(&conf_path, format!("{conf_head}{body}")).unwrap();
            let mut child = Command::new(podgate_bin())
                .arg("-c")
                .arg(&conf_path)
                .env("RUST_LOG", "info")
                // Only what the test gives: a NODE_NAME of the machine running tests would
                // make podgate ask for a node.
                .env_remove("NODE_NAME")
                .envs(env.iter().copied())
                .stdout(Stdio::null())
                .stderr(std::fs::File::create(&log).unwrap())
                .spawn()
                .expect("spawn podgate");
            let addrs: Vec<SocketAddr> = ports[1..]
                .iter()
                .map(|p| SocketAddr::from(([127, 0, 0, 1], *p)))
                .collect();
            let addr = addrs[0];
            let admin = SocketAddr::from(([127, 0, 0, 1], admin_port));
            let log_text = || std::fs::read_to_string(&log).unwrap_or_default();
            let start = Instant::now();
            let started = loop {
                let exited = child.try_wait().unwrap();
                // podgate exits 1 when it finds an address in use.
                if attempt < 3 && log_text().contains("is in use") {
                    let _ = child.kill();
                    let _ = child.wait();
                    break false;
                }
                if let Some(status) = exited {
                    panic!(
                        "podgate exited with {status} during start-up:\n{}",
                        log_text()
                    );
                }
                let mut up = true;
                for a in &addrs {
                    up = up && TcpStream::connect(a).await.is_ok();
                }
                let up =
                    up && matches!(get(admin, "x", "/healthz").await, Ok(r) if r.status == 200);
                if up {
                    break true;
                }
                if start.elapsed() > DEADLINE {
                    panic!("podgate did not start in time:\n{}", log_text());
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            };
            if started {
                return Gateway {
                    dir,
                    addr,
                    addrs,
                    admin,
                    child,
                    log,
                    conf_head,
                };
            }
        }
        unreachable!("the last attempt panics or returns")
    }

    /// Replaces the config body (what [`Gateway::start`] took), atomically.
    pub fn rewrite_config(&self, body: &str) {
        write_atomically(
            &self.path("podgate.yaml"),
            &format!("{}{body}", self.conf_head),
        );
    }

    /// Sends a signal (e.g. "HUP", "TERM") to the podgate process.
    pub fn signal(&self, sig: &str) {
        let ok = Command::new("kill")
            .arg(format!("-{sig}"))
            .arg(self.child.id().to_string())
            .status()
            .expect("run kill")
            .success();
        assert!(ok, "kill -{sig} failed");
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Starts a second podgate on the same config with `-u`, to take over this one's sockets
    /// once this one gets SIGQUIT. Its log goes to `upgrade.log` in the gateway's folder.
    pub fn spawn_upgrade(&self) -> Child {
        Command::new(podgate_bin())
            .arg("-u")
            .arg("-c")
            .arg(self.path("podgate.yaml"))
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(self.path("upgrade.log")).unwrap())
            .spawn()
            .expect("spawn podgate -u")
    }

    /// The exit status once the process has ended.
    pub fn exited(&mut self) -> Option<std::process::ExitStatus> {
        self.child.try_wait().unwrap()
    }

    pub fn path(&self, rel: &str) -> PathBuf {
        self.dir.path().join(rel)
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub async fn get(&self, host: &str, path: &str) -> Reply {
        get(self.addr, host, path)
            .await
            .unwrap_or_else(|e| panic!("GET {path}: {e}\n{}", self.log_text()))
    }

    /// The Pod that answered a GET (its `x-pod` header), or the status when none did.
    pub async fn pod_for(&self, host: &str, path: &str) -> String {
        let r = self.get(host, path).await;
        r.header("x-pod")
            .unwrap_or_else(|| format!("status {}", r.status))
    }

    pub async fn upstreams_json(&self) -> serde_json::Value {
        let r = get(self.admin, "admin", "/upstreams").await.unwrap();
        serde_json::from_slice(&r.body).unwrap()
    }
}

/// An HTTP answer as the client saw it.
#[derive(Debug)]
pub struct Reply {
    pub status: u16,
    pub headers: http::HeaderMap,
    pub body: Bytes,
}

impl Reply {
    pub fn header(&self, name: &str) -> Option<String> {
        self.headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string)
    }

    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {:?}", self.body))
    }
}

pub async fn get(addr: SocketAddr, host: &str, path: &str) -> Result<Reply, String> {
    request(addr, "GET", host, path, &[]).await
}

/// One request on a fresh HTTP/1.1 connection.
pub async fn request(
    addr: SocketAddr,
    method: &str,
    host: &str,
    path: &str,
    headers: &[(&str, &str)],
) -> Result<Reply, String> {
    Conn::open(addr)
        .await?
        .send(method, host, path, headers)
        .await
}

/// A client's HTTP/1.1 connection, kept open across requests.
pub struct Conn {
    sender: hyper::client::conn::http1::SendRequest<Full<Bytes>>,
}

impl Conn {
    pub async fn open(addr: SocketAddr) -> Result<Conn, String> {
        let stream = TcpStream::connect(addr)
            .await
            .map_err(|e| format!("connect {addr}: {e}"))?;
        let (sender, conn) =
            hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
                .await
                .map_err(|e| e.to_string())?;
        tokio::spawn(conn);
        Ok(Conn { sender })
    }

    pub async fn send(
        &mut self,
        method: &str,
        host: &str,
        path: &str,
        headers: &[(&str, &str)],
    ) -> Result<Reply, String> {
        let mut req = http::Request::builder()
            .method(method)
            .uri(path)
            .header("host", host);
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        let req = req.body(Full::new(Bytes::new())).unwrap();
        let resp = tokio::time::timeout(DEADLINE, self.sender.send_request(req))
            .await
            .map_err(|_| "no answer in time".to_string())?
            .map_err(|e| e.to_string())?;
        let status = resp.status().as_u16();
        let headers = resp.headers().clone();
        let body = resp
            .into_body()
            .collect()
            .await
            .map_err(|e| e.to_string())?
            .to_bytes();
        Ok(Reply {
            status,
            headers,
            body,
        })
    }
}

/// Loopback address helper for IPv4 strings.
pub fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

/// A throwaway CA and a server certificate it signed for `names`, as PEM files in `dir`.
pub struct TestPki {
    pub ca_pem: PathBuf,
    pub cert_pem: PathBuf,
    pub key_pem: PathBuf,
}

pub fn make_pki(dir: &Path, prefix: &str, names: &[&str]) -> TestPki {
    use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, IsCa, KeyPair};
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(rcgen::DnType::CommonName, format!("{prefix} test CA"));
    let ca = CertifiedIssuer::self_signed(ca_params, KeyPair::generate().unwrap()).unwrap();
    let leaf_key = KeyPair::generate().unwrap();
    let leaf = CertificateParams::new(names.iter().map(|s| s.to_string()).collect::<Vec<_>>())
        .unwrap()
        .signed_by(&leaf_key, &ca)
        .unwrap();
    let pki = TestPki {
        ca_pem: dir.join(format!("{prefix}-ca.pem")),
        cert_pem: dir.join(format!("{prefix}-cert.pem")),
        key_pem: dir.join(format!("{prefix}-key.pem")),
    };
    std::fs::write(&pki.ca_pem, ca.pem()).unwrap();
    std::fs::write(&pki.cert_pem, leaf.pem()).unwrap();
    std::fs::write(&pki.key_pem, leaf_key.serialize_pem()).unwrap();
    pki
}

/// A demo Pod that speaks HTTPS with the given certificate.
pub async fn https_pod(name: &str, pki: &TestPki) -> Pod {
    use rustls_pki_types::pem::PemObject;
    use rustls_pki_types::{CertificateDer, PrivateKeyDer};
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(&pki.cert_pem)
        .unwrap()
        .map(|c| c.unwrap())
        .collect();
    let key = PrivateKeyDer::from_pem_file(&pki.key_pem).unwrap();
    let config = tokio_rustls::rustls::ServerConfig::builder_with_provider(std::sync::Arc::new(
        tokio_rustls::rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_no_client_auth()
    .with_single_cert(certs, key)
    .unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(std::sync::Arc::new(config));
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let pod = std::sync::Arc::new(DemoPod {
        name: name.to_string(),
        version: "tls".into(),
    });
    let task = tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            let (acceptor, pod) = (acceptor.clone(), pod.clone());
            tokio::spawn(async move {
                let Ok(tls) = acceptor.accept(stream).await else {
                    return;
                };
                let svc = hyper::service::service_fn(move |req| {
                    let pod = pod.clone();
                    async move {
                        Ok::<_, std::convert::Infallible>(podgate::demo::answer(&pod, req).await)
                    }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(tls), svc)
                    .await;
            });
        }
    });
    Pod {
        name: name.to_string(),
        addr,
        task,
    }
}
pub mod fake_kube;
pub mod h2_frames;
pub mod redis;
pub mod wire;

/// Counts of a load run.
#[derive(Default)]
pub struct LoadCounts {
    pub ok: std::sync::atomic::AtomicU64,
    pub failed: std::sync::atomic::AtomicU64,
    /// Requests a keep-alive client sent again on a new connection because the server closed
    /// the reused one before any response byte (allowed for idempotent requests by RFC 9112
    /// §9.3.1, and what browsers and HTTP libraries do); the retry's outcome is what counts.
    pub resent: std::sync::atomic::AtomicU64,
    pub failures: std::sync::Mutex<Vec<String>>,
}

impl LoadCounts {
    pub fn ok(&self) -> u64 {
        self.ok.load(std::sync::atomic::Ordering::Relaxed)
    }
    pub fn failed(&self) -> u64 {
        self.failed.load(std::sync::atomic::Ordering::Relaxed)
    }
    pub fn resent(&self) -> u64 {
        self.resent.load(std::sync::atomic::Ordering::Relaxed)
    }
    fn note(&self, result: Result<u16, String>) {
        use std::sync::atomic::Ordering::Relaxed;
        match result {
            Ok(200) => {
                self.ok.fetch_add(1, Relaxed);
            }
            other => {
                self.failed.fetch_add(1, Relaxed);
                if let Ok(mut f) = self.failures.lock() {
                    if f.len() < 20 {
                        f.push(format!("{other:?}"));
                    }
                }
            }
        }
    }
}

/// Steady GET load on `addr` until `stop` is set: `keepalive` clients that reuse one connection
/// (reconnecting only after an error) and `fresh` clients that open a connection per request.
pub fn steady_load(
    addr: SocketAddr,
    path: &'static str,
    keepalive: usize,
    fresh: usize,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
) -> (std::sync::Arc<LoadCounts>, Vec<tokio::task::JoinHandle<()>>) {
    use std::sync::atomic::Ordering::Relaxed;
    let counts = std::sync::Arc::new(LoadCounts::default());
    let mut tasks = Vec::new();
    for _ in 0..fresh {
        let (counts, stop) = (counts.clone(), stop.clone());
        tasks.push(tokio::spawn(async move {
            while !stop.load(Relaxed) {
                counts.note(get(addr, "load.test", path).await.map(|r| r.status));
            }
        }));
    }
    for _ in 0..keepalive {
        let (counts, stop) = (counts.clone(), stop.clone());
        tasks.push(tokio::spawn(async move {
            let mut conn: Option<hyper::client::conn::http1::SendRequest<Full<Bytes>>> = None;
            // Whether the current connection already carried a request (a reused one).
            let mut used = false;
            let mut resend = false;
            while resend || !stop.load(Relaxed) {
                if conn.as_ref().is_none_or(|c| c.is_closed()) {
                    let Ok(stream) = TcpStream::connect(addr).await else {
                        counts.note(Err("connect".into()));
                        continue;
                    };
                    match hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(
                        stream,
                    ))
                    .await
                    {
                        Ok((sender, driver)) => {
                            tokio::spawn(driver);
                            conn = Some(sender);
                            used = false;
                        }
                        Err(e) => {
                            counts.note(Err(e.to_string()));
                            continue;
                        }
                    }
                }
                let sender = conn.as_mut().expect("connected above");
                if sender.ready().await.is_err() {
                    conn = None;
                    continue;
                }
                let req = http::Request::builder()
                    .uri(path)
                    .header("host", "load.test")
                    .body(Full::new(Bytes::new()))
                    .unwrap();
                let was_used = std::mem::replace(&mut used, true);
                resend = false;
                let result = match sender.send_request(req).await {
                    Ok(resp) => {
                        let status = resp.status().as_u16();
                        match resp.into_body().collect().await {
                            Ok(_) => Ok(status),
                            Err(e) => Err(format!("body: {e}")),
                        }
                    }
                    Err(e) => {
                        conn = None;
                        // A reused connection closed or reset before any response head: send it
                        // again once on a new connection (the idempotent-request rule).
                        if was_used {
                            counts.resent.fetch_add(1, Relaxed);
                            resend = true;
                            continue;
                        }
                        Err(e.to_string())
                    }
                };
                counts.note(result);
            }
        }));
    }
    (counts, tasks)
}

/// A TLS connector that trusts only the CA in `ca` and offers `alpn` (e.g. `[b"h2"]`).
pub fn tls_connector(ca: &Path, alpn: &[&[u8]]) -> tokio_rustls::TlsConnector {
    use rustls_pki_types::pem::PemObject;
    use tokio_rustls::rustls;
    let mut roots = rustls::RootCertStore::empty();
    for c in rustls_pki_types::CertificateDer::pem_file_iter(ca).unwrap() {
        roots.add(c.unwrap()).unwrap();
    }
    let mut config = rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    tokio_rustls::TlsConnector::from(std::sync::Arc::new(config))
}
