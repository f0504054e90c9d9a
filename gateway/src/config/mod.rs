//! The config file: its public YAML format and the validated form the gateway runs on.
//!
//! The two are kept apart (as river does): [`load`] reads the YAML tree, reports every mistake at
//! once with field path and line, and only a fully valid file becomes a [`Config`]. Everything
//! downstream can then trust the values (ports in range, names unique, references resolved).
//!
//! Relative paths in the file (manifests folders, kubeconfigs, certificates) are relative to the
//! folder of the config file, so `podgate -c conf/quickstart.yaml` works from any directory.

mod yaml;

pub use yaml::{parse_address, parse_duration, ConfigError, ConfigErrors};

use podgate_discovery::{Access, PortRef};
use std::collections::{BTreeMap, HashSet};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;
use yaml::{Fields, Node, Reader};

/// Most services one upstream may list (the product's contract).
pub const MAX_SERVICES_PER_UPSTREAM: usize = 20;

#[derive(Clone, Debug, PartialEq)]
pub struct Config {
    /// The file this came from, as given on the command line.
    pub source: PathBuf,
    pub listeners: Vec<Listener>,
    pub admin: Admin,
    pub server: ServerSettings,
    pub clusters: Vec<Cluster>,
    pub upstreams: Vec<Arc<UpstreamConf>>,
    pub routes: Vec<RouteConf>,
    pub access_log: AccessLogSink,
}

#[derive(Clone, Debug, PartialEq)]
pub struct Listener {
    pub address: SocketAddr,
    pub tls: Option<ListenerTls>,
    /// Accept HTTP/2 without TLS (prior knowledge). Off by default: plain listeners speak HTTP/1.1.
    pub h2c: bool,
}

#[derive(Clone, Debug, PartialEq)]
pub struct ListenerTls {
    pub cert: PathBuf,
    pub key: PathBuf,
}

#[derive(Clone, Debug, PartialEq)]
pub struct Admin {
    pub address: SocketAddr,
    /// When set, every admin path but `/healthz` and `/readyz` needs `Authorization: Bearer` with
    /// the file's content (surrounding whitespace ignored).
    pub token_file: Option<PathBuf>,
    /// `/metrics` needs no token even with `token_file`: Prometheus scrapes it by Pod annotation
    /// or ServiceMonitor without credentials, while `/config` and `/upstreams` (every Pod address
    /// of every cluster) stay behind the token.
    pub open_metrics: bool,
}

#[derive(Clone, Debug, PartialEq)]
pub struct ServerSettings {
    pub threads: usize,
    pub grace_period: Duration,
    /// After SIGTERM, how long listeners keep accepting while `/readyz` already says 503, so
    /// that Kubernetes takes the Pod out of its Service before connections are refused.
    pub drain_delay: Duration,
    /// Unix socket over which a new process (`-u`) receives the listening sockets; by default
    /// one per config file ([`runtime_path`]).
    pub upgrade_sock: PathBuf,
    /// Where the running process writes its pid, for `podgate -s reload|stop`; by default one
    /// per config file ([`runtime_path`]).
    pub pid_file: PathBuf,
    /// `/readyz` waits at most this long after start for every cluster's first sync.
    pub ready_timeout: Duration,
    /// A client must send a whole request head within this (nginx `client_header_timeout`).
    pub client_header_timeout: Duration,
    /// Longest wait for the next bytes of a request body, and for a client to take an answer.
    pub client_body_timeout: Duration,
    /// An idle keep-alive client connection is closed after this; zero turns keep-alive off.
    pub keepalive_timeout: Duration,
    /// Bytes that all connections still sending a request head may hold together.
    pub header_memory: usize,
    /// The zone this podgate runs in (`topology.kubernetes.io/zone` of its node), for upstreams
    /// with `zone_aware: true`.
    pub zone: Option<String>,
}

#[derive(Clone, Debug, PartialEq)]
pub struct Cluster {
    pub name: Arc<str>,
    pub kind: ClusterKind,
}

#[derive(Clone, Debug, PartialEq)]
pub enum ClusterKind {
    /// A folder of Service and EndpointSlice manifests standing in for a cluster.
    Manifests(PathBuf),
    /// A Kubernetes API server: kubeconfig, in-cluster, or URL with token and CA files.
    Kube(podgate_discovery::Access),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Scheme {
    Http,
    Https,
}

#[derive(Clone, Debug, PartialEq)]
pub struct UpstreamTls {
    /// Name sent in SNI and checked against the Pod's certificate.
    pub sni: Option<String>,
    pub verify: bool,
    pub ca_file: Option<PathBuf>,
}

#[derive(Clone, Debug, PartialEq)]
pub struct UpstreamConf {
    pub name: String,
    pub scheme: Scheme,
    pub host_header: Option<String>,
    pub tls: UpstreamTls,
    pub tags: BTreeMap<String, String>,
    /// Extra attempts after the first one, each on a different endpoint.
    pub retries: u32,
    pub connect_timeout: Duration,
    pub read_timeout: Duration,
    pub services: Vec<ServiceRef>,
    pub nodes: Vec<StaticNode>,
    pub outlier: OutlierConf,
    pub health_check: Option<HealthCheckConf>,
    /// New endpoints ramp their weight up linearly over this long.
    pub slow_start: Option<Duration>,
    /// How a Pod is chosen within the set that tiers and zones leave.
    pub balance: Balance,
    /// `zone_aware: true`: the zone whose Pods are preferred while it has the capacity, i.e.
    /// `server.zone` (copied here so that a reload changing it rebuilds the upstream).
    pub local_zone: Option<String>,
}

/// How an upstream picks among its Pods (`balance`, with `hash_on`).
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub enum Balance {
    /// Smooth weighted round robin (nginx's), the default.
    #[default]
    RoundRobin,
    /// A Ketama ring over the Pods: one key always reaches the same Pod while the set is stable.
    ConsistentHash(HashOn),
    /// Power of two choices on in-flight requests per weight (Envoy's least request).
    LeastRequest,
}

/// What a consistent-hash key is made of (`hash_on`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum HashOn {
    /// A request header, lower-cased name.
    Header(String),
    /// A cookie of the request, by name.
    Cookie(String),
    /// The client's IP address (the peer of the connection).
    ClientIp,
    /// The request path, without the query.
    Path,
}

impl std::fmt::Display for Balance {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Balance::RoundRobin => f.write_str("round_robin"),
            Balance::ConsistentHash(on) => write!(f, "consistent_hash on {on}"),
            Balance::LeastRequest => f.write_str("least_request"),
        }
    }
}

impl std::fmt::Display for HashOn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            HashOn::Header(n) => write!(f, "header {n}"),
            HashOn::Cookie(n) => write!(f, "cookie {n}"),
            HashOn::ClientIp => f.write_str("client_ip"),
            HashOn::Path => f.write_str("path"),
        }
    }
}

impl UpstreamConf {
    /// The name to send in SNI and verify against: `tls.sni`, else `host_header`.
    pub fn sni(&self) -> Option<&str> {
        self.tls.sni.as_deref().or(self.host_header.as_deref())
    }
}

#[derive(Clone, Debug, PartialEq)]
pub struct ServiceRef {
    pub cluster: Arc<str>,
    pub namespace: String,
    pub service: String,
    pub port: PortRef,
    /// Weight of each Pod of this service.
    pub weight: u32,
    /// Failover tier: 0 is preferred; a higher tier gets traffic as the lower ones lack healthy
    /// capacity.
    pub priority: u32,
    /// Pod-label subset: only the endpoints whose Pod has all these labels (empty: every
    /// endpoint). Keys and values are valid Kubernetes labels.
    pub labels: BTreeMap<String, String>,
}

#[derive(Clone, Debug, PartialEq)]
pub struct StaticNode {
    pub address: SocketAddr,
    pub weight: u32,
}

#[derive(Clone, Debug, PartialEq)]
pub struct RouteConf {
    pub name: String,
    /// Empty means any host.
    pub hosts: Vec<String>,
    pub path_prefix: String,
    /// Empty means any method.
    pub methods: Vec<http::Method>,
    pub strip_prefix: bool,
    pub upstream: String,
}

// Defaults, each chosen to match what users of nginx/Envoy expect, and documented in the README.
/// Where access log lines go.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum AccessLogSink {
    Stdout,
    File(PathBuf),
    Off,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CheckKind {
    /// A GET of `path`; the status must be in `expect`.
    Http,
    /// A TCP connect.
    Tcp,
}

#[derive(Clone, Debug, PartialEq)]
pub struct HealthCheckConf {
    pub kind: CheckKind,
    pub path: String,
    /// Inclusive status ranges that count as healthy.
    pub expect: Vec<(u16, u16)>,
    pub interval: Duration,
    pub timeout: Duration,
    pub healthy: u32,
    pub unhealthy: u32,
}

impl Default for HealthCheckConf {
    fn default() -> Self {
        HealthCheckConf {
            kind: CheckKind::Http,
            path: "/".into(),
            expect: vec![(200, 399)],
            interval: Duration::from_secs(5),
            timeout: Duration::from_secs(1),
            healthy: 2,
            unhealthy: 3,
        }
    }
}

#[derive(Clone, Debug, PartialEq)]
pub struct OutlierConf {
    /// 0 turns passive ejection off.
    pub consecutive_failures: u32,
    pub base_ejection: Duration,
    pub max_ejection_percent: u32,
}

impl Default for OutlierConf {
    fn default() -> Self {
        OutlierConf {
            consecutive_failures: 5,
            base_ejection: Duration::from_secs(30),
            max_ejection_percent: 50,
        }
    }
}

pub const DEFAULT_ADMIN: &str = "127.0.0.1:9901";
pub const DEFAULT_GRACE_PERIOD: Duration = Duration::from_secs(20);
/// Endpoint removal usually reaches kube-proxies and load balancers within a few seconds.
pub const DEFAULT_DRAIN_DELAY: Duration = Duration::from_secs(5);
/// Where the defaults of `server.pid_file` and `server.upgrade_sock` live: `/tmp`, which every
/// host has and `deploy/` mounts writable (the root filesystem there is read-only).
pub const RUNTIME_DIR: &str = "/tmp";

/// The default of `server.pid_file` and `server.upgrade_sock` for the config file `file`:
/// `/tmp/podgate-STEM-HASH.EXT`, with the file's stem (for people listing /tmp) and a hash of its
/// absolute path. One shared `/tmp/podgate.pid` let a second podgate on a host overwrite the
/// first one's pid file, and `podgate -s stop` then signalled the wrong process (issue 14); a
/// shared upgrade socket let one instance's `-u` take another's listening sockets.
///
/// The path is made absolute but symlinks are NOT resolved: a Kubernetes ConfigMap volume swaps
/// its `..data` symlink on every update, and the running process and a later `podgate -s` must
/// still agree. The hash is FNV-1a (64 bit), written out here because std's `DefaultHasher` may
/// change between Rust releases, and an upgraded binary must find the old process' pid file.
pub fn runtime_path(file: &Path, ext: &str) -> PathBuf {
    let absolute = std::path::absolute(file).unwrap_or_else(|_| file.to_path_buf());
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for b in absolute.as_os_str().as_encoded_bytes() {
        hash ^= u64::from(*b);
        hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
    }
    // Unix socket paths are limited to 107 bytes: keep the readable part short.
    let stem: String = file
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default()
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                c
            } else {
                '_'
            }
        })
        .take(32)
        .collect();
    PathBuf::from(RUNTIME_DIR).join(format!("podgate-{stem}-{hash:016x}.{ext}"))
}
pub const DEFAULT_READY_TIMEOUT: Duration = Duration::from_secs(30);
/// nginx's defaults for `client_header_timeout`, `client_body_timeout` (60 s each) and
/// `keepalive_timeout` (75 s; podgate keeps the 60 s it always had).
pub const DEFAULT_CLIENT_HEADER_TIMEOUT: Duration = Duration::from_secs(60);
pub const DEFAULT_CLIENT_BODY_TIMEOUT: Duration = Duration::from_secs(60);
pub const DEFAULT_KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(60);
/// 2,000 connections with a full 64 KiB head each, or 128k with a 1 KiB one.
pub const DEFAULT_HEADER_MEMORY: usize = 128 << 20;
pub const DEFAULT_RETRIES: u32 = 1;
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// nginx's `proxy_read_timeout`.
pub const DEFAULT_READ_TIMEOUT: Duration = Duration::from_secs(60);
pub const DEFAULT_WEIGHT: u32 = 1;
/// The lowest failover tier a service entry may name (`priority`); Envoy allows 128, but with at
/// most 20 services per upstream a handful is all anyone uses.
pub const MAX_PRIORITY: u32 = 9;

/// Reads and validates the config file at `path`.
pub fn load(path: &Path) -> Result<Config, ConfigErrors> {
    let shown = path.display().to_string();
    let text = std::fs::read_to_string(path).map_err(|e| {
        ConfigErrors(vec![ConfigError {
            file: shown.clone(),
            line: None,
            path: String::new(),
            message: format!("cannot read the file: {e}"),
        }])
    })?;
    let base = path.parent().unwrap_or(Path::new("")).to_path_buf();
    parse(&shown, &text, &base).map(|mut c| {
        c.source = path.to_path_buf();
        c
    })
}

/// Validates config text; `base` is the folder relative paths are resolved against.
pub fn parse(file: &str, text: &str, base: &Path) -> Result<Config, ConfigErrors> {
    let doc = yaml::parse_document(file, text).map_err(|e| ConfigErrors(vec![e]))?;
    let mut r = Reader::new(file);
    let config = read_config(&mut r, &doc, base);
    match config {
        Some(c) if r.errors.is_empty() => Ok(c),
        _ => {
            let mut errors = r.errors;
            // Report in file order; errors without a line (whole-file) first.
            errors.sort_by_key(|e| e.line.unwrap_or(0));
            Err(ConfigErrors(errors))
        }
    }
}

const TOP_KEYS: &[&str] = &[
    "listeners",
    "access_log",
    "admin",
    "server",
    "clusters",
    "upstreams",
    "routes",
];

fn read_config(r: &mut Reader, doc: &Node, base: &Path) -> Option<Config> {
    let f = r.fields(doc, "", TOP_KEYS)?;
    let resolve = |p: String| -> PathBuf {
        let p = PathBuf::from(p);
        if p.is_absolute() {
            p
        } else {
            base.join(p)
        }
    };

    let listener_nodes = match f.get("listeners") {
        Some(n) => r.list(n, "listeners"),
        None => Vec::new(),
    };
    if listener_nodes.is_empty() {
        r.error(
            f.get("listeners").or(Some(doc)),
            "listeners",
            "needs at least one listener",
        );
    }
    let listeners: Vec<Listener> = listener_nodes
        .into_iter()
        .filter_map(|(path, n)| read_listener(r, n, &path, &resolve))
        .collect();
    let mut seen = HashSet::new();
    for l in &listeners {
        if !seen.insert(l.address) {
            r.error(
                f.get("listeners"),
                "listeners",
                format!("address {} is used twice", l.address),
            );
        }
    }

    let admin = read_admin(r, f.get("admin"), &resolve);
    if listeners.iter().any(|l| l.address == admin.address) {
        r.error(
            f.get("admin"),
            "admin.address",
            "must differ from every listener address",
        );
    }
    let server = read_server(r, f.get("server"), &resolve);

    let mut clusters: Vec<Cluster> = Vec::new();
    for (path, n) in f
        .get("clusters")
        .map(|n| r.list(n, "clusters"))
        .unwrap_or_default()
    {
        let Some(c) = read_cluster(r, n, &path, &resolve) else {
            continue;
        };
        if clusters.iter().any(|x| x.name == c.name) {
            r.error(
                Some(n),
                &format!("{path}.name"),
                format!("duplicate cluster name `{}`", c.name),
            );
        } else {
            clusters.push(c);
        }
    }

    let mut upstreams: Vec<Arc<UpstreamConf>> = Vec::new();
    for (path, n) in f
        .get("upstreams")
        .map(|n| r.list(n, "upstreams"))
        .unwrap_or_default()
    {
        if let Some(u) = read_upstream(r, n, &path, &clusters, &server, &resolve) {
            if upstreams.iter().any(|x| x.name == u.name) {
                r.error(
                    Some(n),
                    &format!("{path}.name"),
                    format!("duplicate upstream name `{}`", u.name),
                );
            } else {
                upstreams.push(Arc::new(u));
            }
        }
    }

    let mut routes: Vec<RouteConf> = Vec::new();
    for (path, n) in f
        .get("routes")
        .map(|n| r.list(n, "routes"))
        .unwrap_or_default()
    {
        if let Some(route) = read_route(r, n, &path, &upstreams) {
            if routes.iter().any(|x| x.name == route.name) {
                r.error(
                    Some(n),
                    &format!("{path}.name"),
                    format!("duplicate route name `{}`", route.name),
                );
            } else if let Some(other) = routes.iter().find(|x| {
                x.path_prefix == route.path_prefix
                    && x.hosts == route.hosts
                    && x.methods.iter().any(|m| route.methods.contains(m))
            }) {
                r.error(
                    Some(n),
                    &path,
                    format!(
                        "matches the same hosts, path_prefix and methods as route `{}`",
                        other.name
                    ),
                );
            } else {
                routes.push(route);
            }
        }
    }

    let access_log = read_access_log(r, f.get("access_log"), &resolve);
    Some(Config {
        access_log,
        source: PathBuf::new(),
        listeners,
        admin,
        server,
        clusters,
        upstreams,
        routes,
    })
}

fn read_listener(
    r: &mut Reader,
    n: &Node,
    path: &str,
    resolve: &dyn Fn(String) -> PathBuf,
) -> Option<Listener> {
    let f = r.fields(n, path, &["address", "tls", "h2c"])?;
    let address = match f.get("address") {
        Some(a) => r.address(a, &f.child("address")),
        None => {
            r.error(Some(n), &f.child("address"), "is required");
            None
        }
    };
    let tls = f.get("tls").and_then(|t| {
        let tf = r.fields(t, &f.child("tls"), &["cert", "key"])?;
        let cert = r.required_string(&tf, "cert").map(resolve);
        let key = r.required_string(&tf, "key").map(resolve);
        for (k, p) in [("cert", &cert), ("key", &key)] {
            if let Some(p) = p {
                if !p.is_file() {
                    r.error(
                        tf.get(k),
                        &tf.child(k),
                        format!("file {} does not exist", p.display()),
                    );
                }
            }
        }
        Some(ListenerTls {
            cert: cert?,
            key: key?,
        })
    });
    let h2c = r.bool(&f, "h2c", false);
    if h2c && f.get("tls").is_some() {
        r.error(
            f.get("h2c"),
            &f.child("h2c"),
            "h2c is for plain listeners; TLS listeners offer h2 by ALPN already",
        );
    }
    Some(Listener {
        address: address?,
        tls,
        h2c,
    })
}

fn read_access_log(
    r: &mut Reader,
    n: Option<&Node>,
    resolve: &dyn Fn(String) -> PathBuf,
) -> AccessLogSink {
    use AccessLogSink as Sink;
    let Some(n) = n else { return Sink::Stdout };
    let Some(f) = r.fields(n, "access_log", &["enabled", "path"]) else {
        return Sink::Stdout;
    };
    if !r.bool(&f, "enabled", true) {
        return Sink::Off;
    }
    match r.optional_string(&f, "path") {
        None => Sink::Stdout,
        Some(p) if p == "stdout" || p == "-" => Sink::Stdout,
        Some(p) => {
            let path = resolve(p);
            if !path
                .parent()
                .is_some_and(|d| d.as_os_str().is_empty() || d.is_dir())
            {
                r.error(
                    f.get("path"),
                    "access_log.path",
                    format!("the folder of {} does not exist", path.display()),
                );
            }
            Sink::File(path)
        }
    }
}

fn read_admin(r: &mut Reader, n: Option<&Node>, resolve: &dyn Fn(String) -> PathBuf) -> Admin {
    let default = Admin {
        address: DEFAULT_ADMIN.parse().expect("valid default"),
        token_file: None,
        open_metrics: false,
    };
    let Some(n) = n else { return default };
    let Some(f) = r.fields(n, "admin", &["address", "token_file", "open_metrics"]) else {
        return default;
    };
    let address = f
        .get("address")
        .and_then(|a| r.address(a, "admin.address"))
        .unwrap_or(default.address);
    let token_file = r.optional_string(&f, "token_file").map(resolve);
    if let Some(t) = &token_file {
        match std::fs::read_to_string(t) {
            Ok(text) if text.trim().is_empty() => r.error(
                f.get("token_file"),
                "admin.token_file",
                format!("{} is empty", t.display()),
            ),
            Ok(_) => {}
            Err(e) => r.error(
                f.get("token_file"),
                "admin.token_file",
                format!("cannot read {}: {e}", t.display()),
            ),
        }
    }
    let open_metrics = r.bool(&f, "open_metrics", false);
    Admin {
        address,
        token_file,
        open_metrics,
    }
}

fn read_server(
    r: &mut Reader,
    n: Option<&Node>,
    resolve: &dyn Fn(String) -> PathBuf,
) -> ServerSettings {
    let threads_default = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1);
    let mut s = ServerSettings {
        threads: threads_default,
        grace_period: DEFAULT_GRACE_PERIOD,
        drain_delay: DEFAULT_DRAIN_DELAY,
        upgrade_sock: runtime_path(Path::new(r.file()), "upgrade.sock"),
        pid_file: runtime_path(Path::new(r.file()), "pid"),
        ready_timeout: DEFAULT_READY_TIMEOUT,
        client_header_timeout: DEFAULT_CLIENT_HEADER_TIMEOUT,
        client_body_timeout: DEFAULT_CLIENT_BODY_TIMEOUT,
        keepalive_timeout: DEFAULT_KEEPALIVE_TIMEOUT,
        header_memory: DEFAULT_HEADER_MEMORY,
        zone: None,
    };
    let Some(n) = n else { return s };
    let Some(f) = r.fields(
        n,
        "server",
        &[
            "threads",
            "grace_period",
            "drain_delay",
            "upgrade_sock",
            "pid_file",
            "ready_timeout",
            "client_header_timeout",
            "client_body_timeout",
            "keepalive_timeout",
            "header_memory",
            "zone",
        ],
    ) else {
        return s;
    };
    if let Some(z) = r.optional_string(&f, "zone") {
        // A Kubernetes label value: what `topology.kubernetes.io/zone` holds.
        match label_value(&z) {
            Ok(()) if !z.is_empty() => s.zone = Some(z),
            Ok(()) => r.error(f.get("zone"), &f.child("zone"), "must not be empty"),
            Err(why) => r.error(
                f.get("zone"),
                &f.child("zone"),
                format!("`{z}` is not a zone name: {why}"),
            ),
        }
    }
    s.ready_timeout = r.duration(&f, "ready_timeout", DEFAULT_READY_TIMEOUT);
    for (key, value, default) in [
        (
            "client_header_timeout",
            &mut s.client_header_timeout,
            DEFAULT_CLIENT_HEADER_TIMEOUT,
        ),
        (
            "client_body_timeout",
            &mut s.client_body_timeout,
            DEFAULT_CLIENT_BODY_TIMEOUT,
        ),
    ] {
        *value = r.duration(&f, key, default);
        if value.is_zero() {
            r.error(
                f.get(key),
                &f.child(key),
                "must be longer than 0s: a client needs some time to send a request",
            );
            *value = default;
        }
    }
    s.keepalive_timeout = r.duration(&f, "keepalive_timeout", DEFAULT_KEEPALIVE_TIMEOUT);
    s.header_memory = r.size(&f, "header_memory", DEFAULT_HEADER_MEMORY, 64 << 10);
    if let Some(p) = r.optional_string(&f, "upgrade_sock") {
        s.upgrade_sock = resolve(p);
    }
    if let Some(p) = r.optional_string(&f, "pid_file") {
        s.pid_file = resolve(p);
    }
    if let Some(t) = r.optional_int(&f, "threads", 1, 1024) {
        s.threads = t as usize;
    }
    s.grace_period = r.duration(&f, "grace_period", DEFAULT_GRACE_PERIOD);
    // A short grace period implies a short drain unless one is given.
    let drain_default = DEFAULT_DRAIN_DELAY.min(s.grace_period / 4);
    s.drain_delay = r.duration(&f, "drain_delay", drain_default);
    if s.drain_delay >= s.grace_period {
        r.error(
            f.get("drain_delay").or(f.get("grace_period")),
            "server.drain_delay",
            format!(
                "{:?} must be shorter than server.grace_period ({:?}): in-flight requests need \
                 time to finish after listeners close",
                s.drain_delay, s.grace_period
            ),
        );
    }
    s
}

fn read_cluster(
    r: &mut Reader,
    n: &Node,
    path: &str,
    resolve: &dyn Fn(String) -> PathBuf,
) -> Option<Cluster> {
    let f = r.fields(
        n,
        path,
        &[
            "name",
            "manifests",
            "kubeconfig",
            "context",
            "in_cluster",
            "server",
            "token_file",
            "ca_file",
        ],
    )?;
    let name = r.required_string(&f, "name");
    if let Some(name) = &name {
        check_name(r, f.get("name"), &f.child("name"), name);
    }
    let given: Vec<&str> = ["manifests", "kubeconfig", "in_cluster", "server"]
        .into_iter()
        .filter(|k| f.get(k).is_some())
        .collect();
    if given.len() != 1 {
        r.error(
            Some(n),
            path,
            format!(
                "give exactly one of manifests, kubeconfig, in_cluster or server (found {})",
                if given.is_empty() {
                    "none".to_string()
                } else {
                    given.join(" and ")
                }
            ),
        );
        return None;
    }
    let kind = given[0];
    for (key, owner) in [
        ("context", "kubeconfig"),
        ("token_file", "server"),
        ("ca_file", "server"),
    ] {
        if f.get(key).is_some() && kind != owner {
            r.error(
                f.get(key),
                &f.child(key),
                format!("{key} only applies to {owner} clusters"),
            );
        }
    }
    let existing_file = |r: &mut Reader, key: &str| -> Option<PathBuf> {
        let file = resolve(r.optional_string(&f, key)?);
        if !file.is_file() {
            r.error(
                f.get(key),
                &f.child(key),
                format!("file {} does not exist", file.display()),
            );
        }
        Some(file)
    };
    let kind = match kind {
        "manifests" => {
            let dir = resolve(r.required_string(&f, "manifests")?);
            if !dir.is_dir() {
                r.error(
                    f.get("manifests"),
                    &f.child("manifests"),
                    format!("folder {} does not exist", dir.display()),
                );
            }
            ClusterKind::Manifests(dir)
        }
        "kubeconfig" => ClusterKind::Kube(Access::Kubeconfig {
            path: existing_file(r, "kubeconfig")?,
            context: r.optional_string(&f, "context"),
        }),
        "server" => {
            let url = r.required_string(&f, "server")?;
            if !(url.starts_with("https://") || url.starts_with("http://"))
                || url.parse::<http::Uri>().is_err()
            {
                r.error(
                    f.get("server"),
                    &f.child("server"),
                    format!("`{url}` is not an API server URL (e.g. https://10.0.0.1:6443)"),
                );
            }
            ClusterKind::Kube(Access::Server {
                url,
                token_file: existing_file(r, "token_file"),
                ca_file: existing_file(r, "ca_file"),
            })
        }
        _ => {
            if !r.bool(&f, "in_cluster", false) {
                r.error(
                    f.get("in_cluster"),
                    &f.child("in_cluster"),
                    "in_cluster: false names no cluster; remove the entry or use another kind",
                );
            }
            ClusterKind::Kube(Access::InCluster)
        }
    };
    Some(Cluster {
        name: Arc::from(name?.as_str()),
        kind,
    })
}

const UPSTREAM_KEYS: &[&str] = &[
    "name",
    "scheme",
    "host_header",
    "tls",
    "tags",
    "retries",
    "connect_timeout",
    "read_timeout",
    "health_check",
    "outlier",
    "slow_start",
    "balance",
    "hash_on",
    "zone_aware",
    "services",
    "nodes",
];

fn read_upstream(
    r: &mut Reader,
    n: &Node,
    path: &str,
    clusters: &[Cluster],
    server: &ServerSettings,
    resolve: &dyn Fn(String) -> PathBuf,
) -> Option<UpstreamConf> {
    let f = r.fields(n, path, UPSTREAM_KEYS)?;
    let name = r.required_string(&f, "name");
    if let Some(name) = &name {
        check_name(r, f.get("name"), &f.child("name"), name);
    }
    let scheme = match r.optional_string(&f, "scheme").as_deref() {
        None | Some("http") => Scheme::Http,
        Some("https") => Scheme::Https,
        Some(other) => {
            r.error(
                f.get("scheme"),
                &f.child("scheme"),
                format!("`{other}` is not a scheme: use http or https"),
            );
            Scheme::Http
        }
    };
    let host_header = r.optional_string(&f, "host_header");
    if let Some(h) = &host_header {
        if h.is_empty() || http::HeaderValue::from_str(h).is_err() || h.contains(' ') {
            r.error(
                f.get("host_header"),
                &f.child("host_header"),
                format!("`{h}` is not a valid Host header value"),
            );
        }
    }
    let mut tls = UpstreamTls {
        sni: None,
        verify: true,
        ca_file: None,
    };
    if let Some(t) = f.get("tls") {
        if scheme != Scheme::Https {
            r.error(
                Some(t),
                &f.child("tls"),
                "tls settings only apply with scheme: https",
            );
        }
        if let Some(tf) = r.fields(t, &f.child("tls"), &["sni", "verify", "ca_file"]) {
            tls.sni = r.optional_string(&tf, "sni");
            if tls.sni.as_deref() == Some("") {
                r.error(
                    tf.get("sni"),
                    &tf.child("sni"),
                    "must not be empty (an empty SNI turns verification off)",
                );
            }
            tls.verify = r.bool(&tf, "verify", true);
            tls.ca_file = r.optional_string(&tf, "ca_file").map(resolve);
            if let Some(ca) = &tls.ca_file {
                if !ca.is_file() {
                    r.error(
                        tf.get("ca_file"),
                        &tf.child("ca_file"),
                        format!("file {} does not exist", ca.display()),
                    );
                }
            }
        }
    }
    if scheme == Scheme::Https && tls.verify && tls.sni.is_none() && host_header.is_none() {
        r.error(
            Some(n),
            path,
            "scheme https with verification needs a name to verify: set tls.sni or host_header \
             (or tls.verify: false)",
        );
    }
    let tags = f
        .get("tags")
        .map(|t| r.string_map(t, &f.child("tags")).into_iter().collect())
        .unwrap_or_default();
    let retries = r
        .optional_int(&f, "retries", 0, 10)
        .map(|v| v as u32)
        .unwrap_or(DEFAULT_RETRIES);
    let connect_timeout = r.duration(&f, "connect_timeout", DEFAULT_CONNECT_TIMEOUT);
    let read_timeout = r.duration(&f, "read_timeout", DEFAULT_READ_TIMEOUT);
    for (key, d) in [
        ("connect_timeout", connect_timeout),
        ("read_timeout", read_timeout),
    ] {
        if d.is_zero() {
            r.error(f.get(key), &f.child(key), "must be longer than zero");
        }
    }
    let health_check = f
        .get("health_check")
        .and_then(|h| read_health_check(r, h, &f.child("health_check")));

    let outlier = read_outlier(r, f.get("outlier"), &f.child("outlier"));
    let slow_start = f
        .get("slow_start")
        .map(|_| r.duration(&f, "slow_start", Duration::ZERO))
        .filter(|d| !d.is_zero());
    let balance = read_balance(r, &f);
    let zone_aware = r.bool(&f, "zone_aware", false);
    if zone_aware && server.zone.is_none() {
        r.error(
            f.get("zone_aware"),
            &f.child("zone_aware"),
            "needs server.zone: the zone podgate runs in",
        );
    }
    let mut services = Vec::new();
    if let Some(s) = f.get("services") {
        let items = r.list(s, &f.child("services"));
        if items.len() > MAX_SERVICES_PER_UPSTREAM {
            r.error(
                Some(s),
                &f.child("services"),
                format!(
                    "lists {} services; an upstream takes at most {MAX_SERVICES_PER_UPSTREAM}",
                    items.len()
                ),
            );
        }
        for (p, sn) in items {
            if let Some(svc) = read_service_ref(r, sn, &p, clusters) {
                let dup = services.iter().any(|x: &ServiceRef| {
                    x.cluster == svc.cluster
                        && x.namespace == svc.namespace
                        && x.service == svc.service
                        && x.port == svc.port
                        && x.labels == svc.labels
                });
                if dup {
                    r.error(Some(sn), &p, "the same service is listed twice");
                }
                services.push(svc);
            }
        }
    }
    let mut nodes: Vec<StaticNode> = Vec::new();
    if let Some(ns) = f.get("nodes") {
        for (p, nn) in r.list(ns, &f.child("nodes")) {
            let Some(nf) = r.fields(nn, &p, &["address", "weight"]) else {
                continue;
            };
            let address = match nf.get("address") {
                Some(a) => r.address(a, &nf.child("address")),
                None => {
                    r.error(Some(nn), &nf.child("address"), "is required");
                    None
                }
            };
            let weight = read_weight(r, &nf);
            if let Some(address) = address {
                if nodes.iter().any(|x| x.address == address) {
                    r.error(Some(nn), &p, format!("node {address} is listed twice"));
                }
                nodes.push(StaticNode { address, weight });
            }
        }
    }
    if f.get("services").is_none() && f.get("nodes").is_none() {
        r.error(
            Some(n),
            path,
            "needs services (Kubernetes services) or nodes (static addresses), or both",
        );
    }
    Some(UpstreamConf {
        name: name?,
        scheme,
        host_header,
        tls,
        tags,
        retries,
        connect_timeout,
        read_timeout,
        services,
        nodes,
        outlier,
        health_check,
        slow_start,
        balance,
        local_zone: server.zone.clone().filter(|_| zone_aware),
    })
}

/// `balance` and `hash_on`: `hash_on` goes with `consistent_hash` and nothing else.
fn read_balance(r: &mut Reader, f: &Fields<'_>) -> Balance {
    let hash_on = f.get("hash_on").and_then(|n| {
        let text = r.string(n, &f.child("hash_on"))?;
        let (kind, name) = match text.split_once(' ') {
            Some((k, rest)) => (k, Some(rest.trim())),
            None => (text.as_str(), None),
        };
        let on = match (kind, name) {
            ("header", Some(h)) if http::HeaderName::from_bytes(h.as_bytes()).is_ok() => {
                Some(HashOn::Header(h.to_ascii_lowercase()))
            }
            ("cookie", Some(c))
                if !c.is_empty()
                    && c.bytes()
                        .all(|b| b.is_ascii_graphic() && !b"()<>@,;:\\\"/[]?={}".contains(&b)) =>
            {
                Some(HashOn::Cookie(c.to_string()))
            }
            ("client_ip", None) => Some(HashOn::ClientIp),
            ("path", None) => Some(HashOn::Path),
            _ => None,
        };
        if on.is_none() {
            r.error(
                Some(n),
                &f.child("hash_on"),
                format!(
                    "`{text}` is not a hash key: use `header NAME`, `cookie NAME`, `client_ip` \
                     or `path`"
                ),
            );
        }
        on
    });
    let balance = match r.optional_string(f, "balance").as_deref() {
        None | Some("round_robin") => Balance::RoundRobin,
        Some("least_request") => Balance::LeastRequest,
        Some("consistent_hash") => match (&hash_on, f.get("hash_on")) {
            (Some(on), _) => return Balance::ConsistentHash(on.clone()),
            (None, Some(_)) => return Balance::RoundRobin, // reported above
            (None, None) => {
                r.error(
                    f.get("balance"),
                    &f.child("hash_on"),
                    "is required with balance: consistent_hash (header NAME, cookie NAME, \
                     client_ip or path)",
                );
                Balance::RoundRobin
            }
        },
        Some(other) => {
            r.error(
                f.get("balance"),
                &f.child("balance"),
                format!(
                    "`{other}` is not a balance policy: use round_robin, consistent_hash or \
                     least_request"
                ),
            );
            return Balance::RoundRobin;
        }
    };
    if let Some(n) = f.get("hash_on") {
        r.error(
            Some(n),
            &f.child("hash_on"),
            "only applies with balance: consistent_hash",
        );
    }
    balance
}

fn read_health_check(r: &mut Reader, n: &Node, path: &str) -> Option<HealthCheckConf> {
    let f = r.fields(
        n,
        path,
        &[
            "kind",
            "path",
            "expect",
            "interval",
            "timeout",
            "healthy",
            "unhealthy",
        ],
    )?;
    let kind = match r.optional_string(&f, "kind").as_deref() {
        None | Some("http") => CheckKind::Http,
        Some("tcp") => CheckKind::Tcp,
        Some(other) => {
            r.error(
                f.get("kind"),
                &f.child("kind"),
                format!("`{other}` is not a check kind: use http or tcp"),
            );
            CheckKind::Http
        }
    };
    let mut h = HealthCheckConf {
        kind,
        ..HealthCheckConf::default()
    };
    if let Some(p) = r.optional_string(&f, "path") {
        if !p.starts_with('/') || p.contains([' ', '\r', '\n']) {
            r.error(
                f.get("path"),
                &f.child("path"),
                format!("`{p}` must start with / and hold no spaces"),
            );
        }
        h.path = p;
    }
    if let Some(e) = f.get("expect") {
        let mut ranges = Vec::new();
        for (p, item) in r.list(e, &f.child("expect")) {
            let text = match yaml::scalar(item) {
                yaml::Scalar::Int(i) => i.to_string(),
                yaml::Scalar::Str(s) => s.to_string(),
                yaml::Scalar::Other(kind) => {
                    r.error(
                        Some(item),
                        &p,
                        format!("expected a status or range like 200-399, found {kind}"),
                    );
                    continue;
                }
            };
            let (lo, hi) = text.split_once('-').unwrap_or((&text, &text));
            match (lo.trim().parse::<u16>(), hi.trim().parse::<u16>()) {
                (Ok(lo), Ok(hi)) if (100..=599).contains(&lo) && (lo..=599).contains(&hi) => {
                    ranges.push((lo, hi))
                }
                _ => r.error(
                    Some(item),
                    &p,
                    format!("`{text}` is not a status (100..599) or range like 200-399"),
                ),
            }
        }
        if !ranges.is_empty() {
            h.expect = ranges;
        }
    }
    h.interval = r.duration(&f, "interval", h.interval);
    h.timeout = r.duration(&f, "timeout", h.timeout);
    if h.timeout.is_zero() || h.timeout > h.interval {
        r.error(
            f.get("timeout").or(Some(n)),
            &f.child("timeout"),
            format!(
                "must be above zero and at most the interval ({:?})",
                h.interval
            ),
        );
    }
    if let Some(v) = r.optional_int(&f, "healthy", 1, 100) {
        h.healthy = v as u32;
    }
    if let Some(v) = r.optional_int(&f, "unhealthy", 1, 100) {
        h.unhealthy = v as u32;
    }
    Some(h)
}

fn read_outlier(r: &mut Reader, n: Option<&Node>, path: &str) -> OutlierConf {
    let mut o = OutlierConf::default();
    let Some(n) = n else { return o };
    let Some(f) = r.fields(
        n,
        path,
        &[
            "consecutive_failures",
            "base_ejection",
            "max_ejection_percent",
        ],
    ) else {
        return o;
    };
    if let Some(v) = r.optional_int(&f, "consecutive_failures", 0, 1000) {
        o.consecutive_failures = v as u32;
    }
    o.base_ejection = r.duration(&f, "base_ejection", o.base_ejection);
    if o.base_ejection.is_zero() {
        r.error(
            f.get("base_ejection"),
            &f.child("base_ejection"),
            "must be longer than zero",
        );
    }
    if let Some(v) = r.optional_int(&f, "max_ejection_percent", 0, 100) {
        o.max_ejection_percent = v as u32;
    }
    o
}

fn read_weight(r: &mut Reader, f: &Fields<'_>) -> u32 {
    r.optional_int(f, "weight", 1, 100)
        .map(|w| w as u32)
        .unwrap_or(DEFAULT_WEIGHT)
}

fn read_service_ref(
    r: &mut Reader,
    n: &Node,
    path: &str,
    clusters: &[Cluster],
) -> Option<ServiceRef> {
    let f = r.fields(
        n,
        path,
        &[
            "cluster",
            "namespace",
            "service",
            "port",
            "weight",
            "priority",
            "labels",
        ],
    )?;
    let cluster = r.required_string(&f, "cluster").and_then(|c| {
        match clusters.iter().find(|x| *x.name == *c) {
            Some(x) => Some(x.name.clone()),
            None => {
                let known: Vec<&str> = clusters.iter().map(|c| &*c.name).collect();
                r.error(
                    f.get("cluster"),
                    &f.child("cluster"),
                    format!(
                        "unknown cluster `{c}` (clusters: {})",
                        if known.is_empty() {
                            "none defined".into()
                        } else {
                            known.join(", ")
                        }
                    ),
                );
                None
            }
        }
    });
    let namespace = r
        .optional_string(&f, "namespace")
        .unwrap_or_else(|| "default".into());
    if let Err(why) = dns1123_label(&namespace) {
        r.error(
            f.get("namespace"),
            &f.child("namespace"),
            format!("`{namespace}` is not a valid namespace: {why}"),
        );
    }
    let service = r.required_string(&f, "service");
    if let Some(s) = &service {
        if let Err(why) = dns1035_label(s) {
            r.error(
                f.get("service"),
                &f.child("service"),
                format!("`{s}` is not a valid service name: {why}"),
            );
        }
    }
    let port = match f.get("port") {
        None => {
            r.error(
                Some(n),
                &f.child("port"),
                "is required (a Service port number or name)",
            );
            None
        }
        Some(p) => read_port_ref(r, p, &f.child("port")),
    };
    let weight = read_weight(r, &f);
    let priority = r
        .optional_int(&f, "priority", 0, MAX_PRIORITY as i64)
        .map_or(0, |p| p as u32);
    let mut labels: BTreeMap<String, String> = BTreeMap::new();
    if let Some(node) = f.get("labels") {
        let path = f.child("labels");
        for (key, value) in r.string_map(node, &path) {
            // The key's own line when it can be found (it always can for string keys).
            let at = mapping_key(node, &key).unwrap_or(node);
            let at_path = format!("{path}.{key}");
            let mut ok = true;
            if let Err(why) = label_key(&key) {
                r.error(
                    Some(at),
                    &at_path,
                    format!("`{key}` is not a valid label key: {why}"),
                );
                ok = false;
            }
            if let Err(why) = label_value(&value) {
                r.error(
                    Some(at),
                    &at_path,
                    format!("`{value}` is not a valid label value: {why}"),
                );
                ok = false;
            }
            if ok {
                labels.insert(key, value);
            }
        }
    }
    Some(ServiceRef {
        cluster: cluster?,
        namespace,
        service: service?,
        port: port?,
        weight,
        priority,
        labels,
    })
}

fn read_port_ref(r: &mut Reader, n: &Node, path: &str) -> Option<PortRef> {
    match yaml::scalar(n) {
        yaml::Scalar::Int(i) if (1..=65535).contains(&i) => Some(PortRef::Number(i as u16)),
        yaml::Scalar::Int(i) => {
            r.error(Some(n), path, format!("port {i} is outside 1..65535"));
            None
        }
        yaml::Scalar::Str(name) => match port_name(name) {
            Ok(()) => Some(PortRef::Name(name.to_string())),
            Err(why) => {
                r.error(
                    Some(n),
                    path,
                    format!("`{name}` is not a valid port name: {why}"),
                );
                None
            }
        },
        yaml::Scalar::Other(kind) => {
            r.error(
                Some(n),
                path,
                format!("expected a Service port number or name, found {kind}"),
            );
            None
        }
    }
}

fn read_route(
    r: &mut Reader,
    n: &Node,
    path: &str,
    upstreams: &[Arc<UpstreamConf>],
) -> Option<RouteConf> {
    let f = r.fields(
        n,
        path,
        &[
            "name",
            "hosts",
            "path_prefix",
            "methods",
            "strip_prefix",
            "upstream",
        ],
    )?;
    let name = r.required_string(&f, "name");
    if let Some(name) = &name {
        check_name(r, f.get("name"), &f.child("name"), name);
    }
    let mut hosts = Vec::new();
    if let Some(h) = f.get("hosts") {
        for (p, hn) in r.list(h, &f.child("hosts")) {
            if let Some(host) = r.string(hn, &p) {
                match check_host(&host) {
                    Ok(()) => hosts.push(host.to_ascii_lowercase()),
                    Err(why) => r.error(Some(hn), &p, format!("`{host}` {why}")),
                }
            }
        }
    }
    hosts.sort();
    hosts.dedup();
    let path_prefix = r
        .optional_string(&f, "path_prefix")
        .unwrap_or_else(|| "/".into());
    if !path_prefix.starts_with('/') || path_prefix.contains(['?', '#', ' ']) {
        r.error(
            f.get("path_prefix"),
            &f.child("path_prefix"),
            format!("`{path_prefix}` must start with / and hold no ?, # or spaces"),
        );
    }
    let mut methods = Vec::new();
    if let Some(m) = f.get("methods") {
        for (p, mn) in r.list(m, &f.child("methods")) {
            if let Some(s) = r.string(mn, &p) {
                const KNOWN: &[&str] = &[
                    "GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "TRACE", "CONNECT",
                ];
                if KNOWN.contains(&s.as_str()) {
                    methods.push(http::Method::from_bytes(s.as_bytes()).expect("known method"));
                } else {
                    r.error(
                        Some(mn),
                        &p,
                        format!("`{s}` is not an HTTP method (use upper case, e.g. GET)"),
                    );
                }
            }
        }
    }
    let strip_prefix = r.bool(&f, "strip_prefix", false);
    let upstream = r.required_string(&f, "upstream");
    if let Some(u) = &upstream {
        if !upstreams.iter().any(|x| x.name == *u) {
            r.error(
                f.get("upstream"),
                &f.child("upstream"),
                format!("unknown upstream `{u}`"),
            );
        }
    }
    Some(RouteConf {
        name: name?,
        hosts,
        path_prefix,
        methods,
        strip_prefix,
        upstream: upstream?,
    })
}

/// Names of clusters, upstreams and routes end up in metric labels and logs: keep them tame.
fn check_name(r: &mut Reader, n: Option<&Node>, path: &str, name: &str) {
    let ok = !name.is_empty()
        && name.len() <= 63
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
    if !ok {
        r.error(
            n,
            path,
            format!("`{name}` is not a valid name: 1 to 63 letters, digits, '-', '_' or '.'"),
        );
    }
}

/// Kubernetes namespace names (RFC 1123 label).
pub fn dns1123_label(s: &str) -> Result<(), &'static str> {
    if s.is_empty() || s.len() > 63 {
        return Err("must be 1 to 63 characters");
    }
    if !s
        .bytes()
        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
    {
        return Err("only lower-case letters, digits and '-' are allowed");
    }
    if s.starts_with('-') || s.ends_with('-') {
        return Err("must start and end with a letter or digit");
    }
    Ok(())
}

/// Kubernetes Service names (RFC 1035 label: an RFC 1123 label that starts with a letter).
pub fn dns1035_label(s: &str) -> Result<(), &'static str> {
    dns1123_label(s)?;
    if !s.as_bytes()[0].is_ascii_lowercase() {
        return Err("must start with a lower-case letter");
    }
    Ok(())
}

/// The key node `key` of the mapping `map`, for the line of a mistake about it.
fn mapping_key<'n>(map: &'n Node, key: &str) -> Option<&'n Node> {
    match &map.data {
        saphyr::YamlDataOwned::Mapping(entries) => entries
            .keys()
            .find(|k| matches!(yaml::scalar(k), yaml::Scalar::Str(s) if s == key)),
        _ => None,
    }
}

/// The name part of a label key, and a non-empty label value: at most 63 characters, letters,
/// digits, '-', '_' and '.', starting and ending with a letter or digit (Kubernetes'
/// `IsQualifiedName` name part and `IsValidLabelValue`).
fn label_name(s: &str) -> Result<(), &'static str> {
    if s.len() > 63 {
        return Err("at most 63 characters");
    }
    if !s
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
    {
        return Err("only letters, digits, '-', '_' and '.' are allowed");
    }
    let alnum = |b: Option<&u8>| b.is_some_and(u8::is_ascii_alphanumeric);
    if !alnum(s.as_bytes().first()) || !alnum(s.as_bytes().last()) {
        return Err("must start and end with a letter or digit");
    }
    Ok(())
}

/// A Kubernetes label key: an optional DNS subdomain prefix and `/`, then a name of at most 63
/// characters (`version`, `app.kubernetes.io/name`).
pub fn label_key(s: &str) -> Result<(), String> {
    let (prefix, name) = match s.split_once('/') {
        Some((prefix, name)) => (Some(prefix), name),
        None => (None, s),
    };
    if let Some(prefix) = prefix {
        if name.contains('/') {
            return Err("at most one '/', between the prefix and the name".into());
        }
        dns1123_subdomain(prefix).map_err(|why| format!("the prefix `{prefix}` {why}"))?;
    }
    if name.is_empty() {
        return Err("the name part is empty".into());
    }
    label_name(name).map_err(|why| match prefix {
        Some(_) => format!("the name `{name}`: {why}"),
        None => why.to_string(),
    })
}

/// A Kubernetes label value: empty, or at most 63 letters, digits, '-', '_' and '.', starting
/// and ending with a letter or digit.
pub fn label_value(s: &str) -> Result<(), &'static str> {
    if s.is_empty() {
        return Ok(());
    }
    label_name(s)
}

/// A DNS subdomain (RFC 1123), as label key prefixes must be: at most 253 characters, labels of
/// lower-case letters, digits and '-' separated by '.'.
fn dns1123_subdomain(s: &str) -> Result<(), &'static str> {
    if s.is_empty() || s.len() > 253 {
        return Err("must be 1 to 253 characters");
    }
    for part in s.split('.') {
        let ok = !part.is_empty()
            && part
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
            && !part.starts_with('-')
            && !part.ends_with('-');
        if !ok {
            return Err("is not a DNS subdomain (lower-case letters, digits, '-' and '.')");
        }
    }
    Ok(())
}

/// Kubernetes port names (IANA_SVC_NAME).
fn port_name(s: &str) -> Result<(), &'static str> {
    if s.is_empty() || s.len() > 15 {
        return Err("must be 1 to 15 characters");
    }
    dns1123_label(s).map_err(|_| "only lower-case letters, digits and '-', not at either end")?;
    if !s.bytes().any(|b| b.is_ascii_lowercase()) {
        return Err("must contain at least one letter");
    }
    Ok(())
}

fn check_host(h: &str) -> Result<(), &'static str> {
    let name = h.strip_prefix("*.").unwrap_or(h);
    if name.is_empty() || name.contains('*') {
        return Err("is not a host: a wildcard is only allowed as the first label (*.example.com)");
    }
    if name.contains(':') {
        return Err("is not a host: leave the port out");
    }
    if !name
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '.')
    {
        return Err("is not a host name");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn label_keys_follow_kubernetes() {
        for ok in [
            "version",
            "app.kubernetes.io/name",
            "a",
            "A-b_c.d",
            "example.com/Tier",
            &"x".repeat(63),
            &format!("{}/n", "a".repeat(253)),
        ] {
            assert_eq!(label_key(ok), Ok(()), "{ok}");
        }
        for (bad, why) in [
            ("", "empty"),
            ("-version", "start and end"),
            ("version_", "start and end"),
            ("ver sion", "only letters"),
            (&"x".repeat(64), "63"),
            ("/name", "prefix"),
            ("Example.com/name", "prefix"),
            ("example..com/name", "prefix"),
            ("a/b/c", "one '/'"),
            ("example.com/", "empty"),
            ("example.com/-n", "start and end"),
            (&format!("{}/n", "a".repeat(254)), "253"),
        ] {
            let err = label_key(bad).expect_err(bad);
            assert!(err.contains(why), "{bad}: {err}");
        }
    }

    #[test]
    fn label_values_follow_kubernetes() {
        for ok in ["", "v1", "1.2.3", "A_b-c", &"x".repeat(63)] {
            assert_eq!(label_value(ok), Ok(()), "{ok}");
        }
        for bad in ["a b", "-v1", "v1.", "v/1", &"x".repeat(64)] {
            assert!(label_value(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn label_subsets_are_read_and_two_subsets_of_one_service_are_not_duplicates() {
        let dir = std::env::temp_dir();
        let text = "listeners: [{address: \"127.0.0.1:8080\"}]\n\
                    clusters:\n  - {name: k, server: \"https://127.0.0.1:6443\"}\n\
                    upstreams:\n  - name: u\n    services:\n\
                    \x20     - {cluster: k, service: web, port: 80, weight: 9, labels: {version: v1}}\n\
                    \x20     - {cluster: k, service: web, port: 80, weight: 1, labels: {version: v2}}\n\
                    \x20     - {cluster: k, service: web, port: 80, labels: {version: v2}}\n";
        let errors = parse("t.yaml", text, &dir).expect_err("the third entry repeats the second");
        assert_eq!(errors.0.len(), 1, "{errors:?}");
        assert_eq!(errors.0[0].path, "upstreams[0].services[2]");
        assert!(errors.0[0].message.contains("listed twice"));
        let fine = text
            .rsplit_once("      - {cluster: k, service: web, port: 80, labels")
            .unwrap()
            .0;
        let config = parse("t.yaml", fine, &dir).unwrap();
        let services = &config.upstreams[0].services;
        assert_eq!(services[0].labels, [("version".into(), "v1".into())].into());
        assert_eq!(services[1].labels, [("version".into(), "v2".into())].into());
    }
}
