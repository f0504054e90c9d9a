//! The validated config the gateway runs on, and its defaults. Only a file that passed every
//! check becomes a [`Config`], so everything downstream can trust the values (ports in range,
//! names unique, references resolved). The file's own format is in `schema.rs`.

use super::limits::{RateLimitRule, RateLimitStoreConf};
use podgate_discovery::PortRef;
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

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
    pub access_log: AccessLogSettings,
    /// Identities routes authenticate callers as (`consumers`).
    pub consumers: Vec<ConsumerConf>,
    pub jwt_providers: Vec<Arc<JwtProviderConf>>,
    /// `rate_limit_stores`: the shared (Redis) stores rate-limit rules may name.
    pub rate_limit_stores: Vec<Arc<RateLimitStoreConf>>,
}

impl Config {
    /// Gives every zone-aware upstream that has no `server.zone` the zone learned from the
    /// node, or `None` when it could not be learned (those upstreams then route to all zones),
    /// and records `source`: where it came from, or why there is none.
    pub fn learned_zone(&mut self, zone: Option<&str>, source: &str) {
        for u in &mut self.upstreams {
            if u.zone_aware && self.server.zone.is_none() {
                let u = Arc::make_mut(u);
                u.local_zone = zone.map(String::from);
                u.zone_source = Some(source.to_owned());
            }
        }
    }
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
    /// with `zone_aware: true`. Always wins over the zone learned from the node.
    pub zone: Option<String>,
    /// Without `zone`: the cluster whose API server is asked for this podgate's node (named by
    /// the `NODE_NAME` environment variable) and its zone label. `server.zone_from_node`, or
    /// else the one `in_cluster: true` cluster; `None` when `zone` is set or neither exists.
    pub zone_from_node: Option<Arc<str>>,
    /// Peers whose `X-Forwarded-For` names the client (`server.trusted_proxies`); empty: the
    /// client is always the TCP peer.
    pub trusted_proxies: Vec<ipnet::IpNet>,
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

/// The HTTP version podgate speaks to an upstream's Pods (`protocol`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Protocol {
    /// HTTP/1.1 (the default), over TLS or not as `scheme` says.
    Http1,
    /// HTTP/2 over TLS, negotiated by ALPN (`scheme: https`).
    H2,
    /// HTTP/2 over plain TCP with prior knowledge (`scheme: http`); what gRPC servers in a
    /// cluster usually speak.
    H2c,
}

impl Protocol {
    /// HTTP/2 in either form.
    pub fn is_h2(self) -> bool {
        self != Protocol::Http1
    }
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
    pub protocol: Protocol,
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
    /// `zone_aware: true`.
    pub zone_aware: bool,
    /// When zone-aware, the zone whose Pods are preferred while it has the capacity:
    /// `server.zone` (copied here so that a reload changing it rebuilds the upstream), or the
    /// zone learned from the node ([`Config::learned_zone`]). `None` routes to all zones.
    pub local_zone: Option<String>,
    /// When zone-aware, where `local_zone` came from (or why there is none), for the admin view.
    pub zone_source: Option<String>,
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
    /// `policies:`; [`RoutePolicyConf::is_empty`] when the route has none.
    pub policies: RoutePolicyConf,
}

// Defaults, each chosen to match what users of nginx/Envoy expect, and documented in the README.
/// Where access log lines go.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum AccessLogSink {
    Stdout,
    File(PathBuf),
    Off,
}

/// The access log: where lines go, and how they are batched on their way (nginx's `buffer=`
/// and `flush=`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AccessLogSettings {
    pub sink: AccessLogSink,
    /// A worker thread hands its lines to the writer once this many bytes are buffered.
    pub buffer: usize,
    /// The longest a line may wait in a worker thread's buffer before it is written.
    pub flush: Duration,
}

impl Default for AccessLogSettings {
    fn default() -> Self {
        AccessLogSettings {
            sink: AccessLogSink::Stdout,
            buffer: DEFAULT_ACCESS_LOG_BUFFER,
            flush: DEFAULT_ACCESS_LOG_FLUSH,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CheckKind {
    /// A GET of `path`; the status must be in `expect`.
    Http,
    /// A TCP connect.
    Tcp,
    /// `grpc.health.v1.Health/Check` for the whole server (empty service name); SERVING is
    /// healthy. Needs `protocol: h2` or `h2c`.
    Grpc,
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
/// nginx's usual `access_log ... buffer=64k`: about 180 lines of ~350 bytes per hand-over.
pub const DEFAULT_ACCESS_LOG_BUFFER: usize = 64 << 10;
/// The bound on how long a line may sit in a buffer (nginx's `flush=` has no default; without
/// one, lines of a quiet worker wait until its buffer fills).
pub const DEFAULT_ACCESS_LOG_FLUSH: Duration = Duration::from_secs(1);
/// `access_log.buffer` bounds: below 4 KiB a hand-over carries a dozen lines; above 16 MiB a
/// worker holds more memory than any disk write needs.
pub const ACCESS_LOG_BUFFER_RANGE: (usize, usize) = (4 << 10, 16 << 20);
/// `access_log.flush` bounds: the writer sweeps every thread's buffer twice per `flush`, so
/// below 10 ms that sweep becomes a busy loop; above a minute lines are older than a log reader
/// expects.
pub const ACCESS_LOG_FLUSH_RANGE: (Duration, Duration) =
    (Duration::from_millis(10), Duration::from_secs(60));
pub const DEFAULT_RETRIES: u32 = 1;
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// nginx's `proxy_read_timeout`.
pub const DEFAULT_READ_TIMEOUT: Duration = Duration::from_secs(60);
/// The lowest failover tier a service entry may name (`priority`); Envoy allows 128, but with at
/// most 20 services per upstream a handful is all anyone uses.
pub const MAX_PRIORITY: u32 = 9;
pub const DEFAULT_WEIGHT: u32 = 1;

/// A consumer: a name that API keys (and JWT claims) authenticate as.
#[derive(Clone, Debug, PartialEq)]
pub struct ConsumerConf {
    pub name: Arc<str>,
    /// One key per line; re-read on change. `None`: the consumer is reached through a JWT
    /// provider's `consumer_claim` only.
    pub api_keys_file: Option<PathBuf>,
}

/// A JWT issuer whose tokens routes accept (`jwt_providers[]`).
#[derive(Clone, Debug, PartialEq)]
pub struct JwtProviderConf {
    pub name: Arc<str>,
    /// The `iss` a token must carry; `None`: not checked.
    pub issuer: Option<String>,
    /// A token's `aud` must hold one of these; empty: not checked.
    pub audiences: Vec<String>,
    /// Public keys (RS*, PS*, ES256, ES384, EdDSA); re-read on change.
    pub jwks_file: Option<PathBuf>,
    /// The shared secret of HS256/HS384/HS512 tokens; only with this are HS* tokens accepted.
    pub secret_file: Option<PathBuf>,
    /// A claim whose (string) value is the request's consumer.
    pub consumer_claim: Option<String>,
    /// Claim name → request field toward the Pod.
    pub claims_to_headers: Vec<(String, http::HeaderName)>,
    /// Clock skew allowed on `exp` and `nbf`.
    pub leeway: Duration,
}

pub const DEFAULT_JWT_LEEWAY: Duration = Duration::from_secs(30);
pub const DEFAULT_CONSUMER_HEADER: &str = "x-consumer";
pub const DEFAULT_API_KEY_HEADER: &str = "x-api-key";

/// A route's `policies:`, validated. Each part is off when absent.
#[derive(Clone, Debug, PartialEq, Default)]
pub struct RoutePolicyConf {
    pub auth: Option<AuthConf>,
    /// Only these consumers may call (empty: any authenticated caller).
    pub consumers: Vec<Arc<str>>,
    pub ip_allow: Vec<ipnet::IpNet>,
    pub ip_deny: Vec<ipnet::IpNet>,
    pub cors: Option<CorsConf>,
    /// `rate_limit`: every rule must admit a request (after authentication, so a rule keyed by
    /// consumer sees who called).
    pub rate_limit: Vec<RateLimitRule>,
    pub request_headers: HeaderRulesConf,
    pub response_headers: HeaderRulesConf,
    pub rewrite: Option<RewriteConf>,
    pub redirect: Option<RedirectConf>,
    pub max_body: Option<u64>,
}

impl RoutePolicyConf {
    /// Nothing is set.
    pub fn is_empty(&self) -> bool {
        *self == RoutePolicyConf::default()
    }
}

#[derive(Clone, Debug, PartialEq)]
pub struct AuthConf {
    /// The request passes when one of these accepts its credential (`any_of`; one entry
    /// otherwise), tried in order.
    pub methods: Vec<AuthMethod>,
    /// Pass the credential on to the Pod (`auth.forward`); removed by default.
    pub forward: bool,
    /// The field that carries the consumer's name to the Pod (`auth.consumer_header`).
    pub consumer_header: http::HeaderName,
}

#[derive(Clone, Debug, PartialEq)]
pub enum AuthMethod {
    /// A key of one of the consumers' `api_keys_file`s.
    ApiKey(KeySource),
    /// A bearer token of the JWT provider of this name.
    Jwt(Arc<str>),
}

/// Where a request carries its API key.
#[derive(Clone, Debug, PartialEq)]
pub enum KeySource {
    Header(http::HeaderName),
    /// A query parameter, by its name as written in the query (not decoded).
    Query(String),
}

#[derive(Clone, Debug, PartialEq)]
pub struct CorsConf {
    pub origins: Vec<OriginPattern>,
    pub methods: Vec<http::Method>,
    pub headers: Vec<http::HeaderName>,
    pub expose_headers: Vec<http::HeaderName>,
    pub max_age: Option<Duration>,
    pub credentials: bool,
}

/// An allowed CORS origin, normalised: lower case, without the scheme's default port.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum OriginPattern {
    /// `*`: any origin.
    Any,
    /// `https://shop.example.com` (`port` only when not the scheme's default).
    Exact(String),
    /// `https://*.example.com`: any subdomain (not the domain itself). `suffix` is
    /// `.example.com`, with `:port` after it when one was given.
    Subdomains { scheme: String, suffix: String },
}

/// Header rules (`request_headers`, `response_headers`): names lower case, values checked.
#[derive(Clone, Debug, PartialEq, Default)]
pub struct HeaderRulesConf {
    /// Replace every field of that name.
    pub set: Vec<(http::HeaderName, http::HeaderValue)>,
    /// Append a field.
    pub add: Vec<(http::HeaderName, http::HeaderValue)>,
    pub remove: Vec<http::HeaderName>,
}

impl HeaderRulesConf {
    pub fn is_empty(&self) -> bool {
        self.set.is_empty() && self.add.is_empty() && self.remove.is_empty()
    }
}

#[derive(Clone, Debug, PartialEq)]
pub enum RewriteConf {
    /// The path (without query) through `regex.replace(path, to)`; a path the regex does not
    /// match goes unchanged.
    Regex { regex: PathRegex, to: String },
    /// The route's `path_prefix` replaced by this.
    Prefix(String),
}

/// A compiled regex, equal to another when the pattern is.
#[derive(Clone, Debug)]
pub struct PathRegex(pub regex::Regex);

impl PartialEq for PathRegex {
    fn eq(&self, other: &Self) -> bool {
        self.0.as_str() == other.0.as_str()
    }
}

/// `redirect:`, answered by podgate. Only `scheme` given: a redirect only when the request
/// came in over the other scheme; with `host` or `path`: always.
#[derive(Clone, Debug, PartialEq)]
pub struct RedirectConf {
    pub scheme: Option<Scheme>,
    pub host: Option<String>,
    pub port: Option<u16>,
    /// Replaces the path; the query is kept.
    pub path: Option<String>,
    /// 301, 302, 303, 307 or 308.
    pub status: u16,
}
