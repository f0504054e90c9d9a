//! Connections to Pods: opening them (plain or TLS), and keeping idle ones for reuse.
//!
//! The pool is per worker thread, with no lock and no background task: a connection is checked
//! when it is taken (closed or unexpected bytes: dropped) and idle ones are swept at most once a
//! second, when a connection is put back. Pingora's workers each run one thread, so a thread's
//! connections serve that thread's requests.

use crate::config::{Scheme, UpstreamConf};
use bytes::BytesMut;
use pingora_core::tls::{
    CertificateDer, ClientConfig, DigitallySignedStruct, HandshakeSignatureValid, RootCertStore,
    RusTlsError, ServerCertVerified, ServerCertVerifier, ServerName, SignatureScheme, TlsConnector,
    UnixTime,
};
use std::cell::RefCell;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Weak};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

/// How long an idle connection to a Pod is kept.
///
/// Idle connections to a Pod that left its upstream's selection (removed, not ready,
/// terminating), or of an upstream that a reload removed, are closed at the next sweep: within a
/// second while the worker thread serves traffic.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(60);
/// Idle connections kept per Pod and worker thread.
const MAX_IDLE_PER_POD: usize = 256;
const SWEEP_EVERY: Duration = Duration::from_secs(1);

/// How an upstream connects to its Pods.
pub struct Connector {
    /// TLS settings for `scheme: https`; `None` for plain HTTP.
    tls: Option<Arc<ClientConfig>>,
    /// The name to send and verify; `None` sends the Pod IP (only allowed with `verify: false`).
    sni: Option<ServerName<'static>>,
    connect_timeout: Duration,
    /// Tells pooled connections of different TLS settings apart.
    pool_id: u64,
}

impl Connector {
    pub fn new(conf: &UpstreamConf) -> Result<Self, String> {
        static NEXT_ID: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);
        let (tls, sni, pool_id) = match conf.scheme {
            Scheme::Http => (None, None, 0),
            Scheme::Https => {
                let sni = match conf.sni() {
                    Some(name) => Some(
                        ServerName::try_from(name.to_string())
                            .map_err(|e| format!("tls.sni {name:?}: {e}"))?,
                    ),
                    None => None,
                };
                let id = NEXT_ID.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                (Some(client_config(conf)?), sni, id)
            }
        };
        Ok(Connector {
            tls,
            sni,
            connect_timeout: conf.connect_timeout,
            pool_id,
        })
    }

    /// Whether connections are TLS (`scheme: https`).
    pub fn is_tls(&self) -> bool {
        self.tls.is_some()
    }

    /// Tells apart connections of different TLS settings (0 for plain connections).
    pub fn pool_id(&self) -> u64 {
        self.pool_id
    }

    fn key(&self, addr: SocketAddr) -> (SocketAddr, u64) {
        (addr, self.pool_id)
    }

    /// An idle pooled connection to `addr`, if one is still open.
    pub fn reuse(&self, addr: SocketAddr) -> Option<Conn> {
        let key = self.key(addr);
        POOL.with(|p| {
            let mut p = p.borrow_mut();
            let idle = p.idle.get_mut(&key)?;
            let now = Instant::now();
            while let Some(mut entry) = idle.pop() {
                if entry.usable(now) {
                    return Some(entry.conn);
                }
            }
            None
        })
    }

    /// A new connection to `addr`, within the connect timeout.
    pub async fn connect(&self, addr: SocketAddr) -> io::Result<Conn> {
        let open = async {
            let tcp = TcpStream::connect(addr).await?;
            tcp.set_nodelay(true)?;
            let Some(tls) = &self.tls else {
                return Ok(Io::Plain(tcp));
            };
            let name = match &self.sni {
                Some(n) => n.clone(),
                // rustls sends no SNI for an IP address; the config allows this only without
                // verification.
                None => ServerName::IpAddress(addr.ip().into()),
            };
            let stream = TlsConnector::from(tls.clone()).connect(name, tcp).await?;
            Ok(Io::Tls(Box::new(stream)))
        };
        match tokio::time::timeout(self.connect_timeout, open).await {
            Ok(r) => r.map(|io| Conn {
                io,
                buf: BytesMut::with_capacity(8 * 1024),
            }),
            Err(_) => Err(io::Error::new(io::ErrorKind::TimedOut, "connect timed out")),
        }
    }

    /// Keeps `conn` for a later request to `addr` while `addr` stays in `upstream`'s selection.
    pub fn put_back<M: Members + 'static>(
        &self,
        addr: SocketAddr,
        mut conn: Conn,
        upstream: &Arc<M>,
    ) {
        let upstream: Weak<dyn Members> = Arc::downgrade(upstream) as Weak<dyn Members>;
        conn.buf.clear();
        let key = self.key(addr);
        let entry = Idle {
            conn,
            since: Instant::now(),
            upstream,
        };
        POOL.with(|p| {
            let mut p = p.borrow_mut();
            let now = entry.since;
            let idle = p.idle.entry(key).or_default();
            if idle.len() < MAX_IDLE_PER_POD {
                idle.push(entry);
            }
            if now.duration_since(p.swept) >= SWEEP_EVERY {
                p.swept = now;
                p.idle.retain(|(addr, _), conns| {
                    conns.retain_mut(|e| e.wanted(addr, now));
                    !conns.is_empty()
                });
            }
        });
    }
}

/// What the pool asks of the upstream that pooled a connection: whether a Pod is still one of its
/// backends (a Pod that left gets its idle connections closed). `Upstream` implements it.
pub trait Members: Send + Sync {
    fn has(&self, addr: &SocketAddr) -> bool;
    /// Wakes on every change of the backends (h2 connections drain when their Pod leaves).
    fn changes(&self) -> tokio::sync::watch::Receiver<()>;
}

struct Pool {
    idle: super::PodMap<(SocketAddr, u64), Vec<Idle>>,
    swept: Instant,
}

struct Idle {
    conn: Conn,
    since: Instant,
    /// The upstream whose request left the connection here.
    upstream: Weak<dyn Members>,
}

impl Idle {
    /// Whether the connection can carry another request: not idle too long, still open. Taken
    /// for a backend just picked from a live selection, it needs no membership check.
    fn usable(&mut self, now: Instant) -> bool {
        now.duration_since(self.since) < IDLE_TIMEOUT && self.conn.io.still_open()
    }

    /// Whether the connection is worth keeping: usable, and `addr` still a backend of the
    /// upstream that pooled it (a Pod that left gets its idle connections closed).
    fn wanted(&mut self, addr: &SocketAddr, now: Instant) -> bool {
        self.upstream.upgrade().is_some_and(|up| up.has(addr)) && self.usable(now)
    }
}

thread_local! {
    static POOL: RefCell<Pool> = RefCell::new(Pool { idle: Default::default(), swept: Instant::now() });
}

/// A connection to a Pod and its read buffer (kept with it, so reuse allocates nothing).
pub struct Conn {
    pub io: Io,
    pub buf: BytesMut,
}

pub enum Io {
    Plain(TcpStream),
    Tls(Box<pingora_core::tls::ClientTlsStream<TcpStream>>),
}

impl Io {
    /// Whether an idle connection can carry a request: not closed by the Pod, nothing unasked
    /// for waiting on it. Polls once without waiting (a TLS stream handles session tickets).
    fn still_open(&mut self) -> bool {
        let mut byte = [0u8; 1];
        let mut buf = ReadBuf::new(&mut byte);
        let mut cx = Context::from_waker(std::task::Waker::noop());
        matches!(Pin::new(self).poll_read(&mut cx, &mut buf), Poll::Pending)
    }
}

impl AsyncRead for Io {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Io::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Io::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Io {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Io::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Io::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Io::Plain(s) => Pin::new(s).poll_flush(cx),
            Io::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Io::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Io::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}

/// TLS settings of an https upstream: its CA file or the system roots, or no verification.
fn client_config(conf: &UpstreamConf) -> Result<Arc<ClientConfig>, String> {
    pingora_core::tls::install_default_crypto_provider();
    let builder = ClientConfig::builder();
    let mut config = if !conf.tls.verify {
        builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(NoVerification))
            .with_no_client_auth()
    } else {
        let mut roots = RootCertStore::empty();
        match &conf.tls.ca_file {
            Some(path) => {
                use rustls_pki_types::pem::PemObject;
                for cert in CertificateDer::pem_file_iter(path)
                    .map_err(|e| format!("cannot read {}: {e}", path.display()))?
                {
                    let cert = cert.map_err(|e| format!("{}: bad PEM: {e}", path.display()))?;
                    roots
                        .add(cert)
                        .map_err(|e| format!("{}: {e}", path.display()))?;
                }
                if roots.is_empty() {
                    return Err(format!("{} holds no PEM certificate", path.display()));
                }
            }
            None => {
                let certs = pingora_core::tls::load_native_certs()
                    .map_err(|e| format!("cannot load the system's CA certificates: {e}"))?;
                let (_added, _ignored) = roots.add_parsable_certificates(certs);
            }
        }
        builder.with_root_certificates(roots).with_no_client_auth()
    };
    config.alpn_protocols = match conf.protocol {
        crate::config::Protocol::H2 => vec![b"h2".to_vec()],
        _ => vec![b"http/1.1".to_vec()],
    };
    Ok(Arc::new(config))
}

/// `tls.verify: false`: any certificate is accepted (a warning is logged at start).
#[derive(Debug)]
struct NoVerification;

impl ServerCertVerifier for NoVerification {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, RusTlsError> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, RusTlsError> {
        Ok(HandshakeSignatureValid::assertion())
    }

    fn verify_tls13_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, RusTlsError> {
        Ok(HandshakeSignatureValid::assertion())
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        pingora_core::tls::CryptoProvider::get_default()
            .map(|p| p.signature_verification_algorithms.supported_schemes())
            .unwrap_or_default()
    }
}
