//! TLS handshakes of client connections, done by podgate under `server.client_header_timeout`.
//!
//! Pingora runs the TLS accept itself, before the application sees the connection, under a
//! fixed 60 s timeout (`services/listening.rs`, `run_endpoint`), with no hook to shorten it:
//! measured (issue 21), 2,000 connections that never sent a ClientHello and 500 that sent half
//! of one were all still open 20 s later with `client_header_timeout: 5s` (nginx had closed all
//! of them by 8 s), and each held 16.6 KiB (nginx 9.6 KiB): Pingora's connection task carries
//! the handshake's state inline, and rustls' connection state exists from the accept on.
//!
//! So podgate's TLS listeners are plain TCP listeners to Pingora, and the handshake happens
//! here, in the connection's own task on the least busy thread (`h1/spread.rs`, which TLS
//! connections can now follow, as the handshake has not begun when they move), within what is
//! left of `client_header_timeout` since the accept: the handshake and the first request head
//! share that one deadline, as in nginx. Until the whole first TLS record (the ClientHello) is
//! in the socket's receive queue, the connection holds no TLS state and no buffer: it waits for
//! readiness, peeks the 5-byte record header and asks the kernel how many bytes are queued
//! (`FIONREAD`), so a client that sends nothing, or half a ClientHello, costs its task and its
//! socket's registration, and its bytes stay in the kernel. The handshake itself is Pingora's
//! rustls acceptor (`listeners::tls::Acceptor`), so the stream it gives is the same Pingora
//! stream (digests, ALPN) the rest of the path already serves.

use pingora_core::listeners::tls::Acceptor;
use pingora_core::protocols::l4::stream::Stream as L4Stream;
use pingora_core::protocols::{SocketDigest, Stream};
use std::io;
use std::net::SocketAddr;
use std::os::fd::AsRawFd;
use std::sync::Arc;
use tokio::io::Interest;
use tokio::net::TcpStream;
use tokio::time::Instant;

/// The TLS listeners of one listening service: their addresses and acceptors.
#[derive(Clone, Default)]
pub struct TlsListeners(Vec<(SocketAddr, Arc<Acceptor>)>);

impl TlsListeners {
    /// Adds a TLS listener on `address` serving the certificate chain in `cert` with `key`
    /// (PEM files), offering h2 and HTTP/1.1 by ALPN, TLS 1.2 and 1.3.
    pub fn add(&mut self, address: SocketAddr, cert: &str, key: &str) -> Result<(), String> {
        use pingora_core::tls::{load_certs_and_key_files, version, ServerConfig};
        pingora_core::tls::install_default_crypto_provider();
        let (certs, key) = match load_certs_and_key_files(cert, key) {
            Ok(Some(pair)) => pair,
            Ok(None) => {
                return Err(format!(
                    "no certificate in {cert} or no private key (PKCS#1, PKCS#8 or SEC1) in {key}"
                ))
            }
            Err(e) => return Err(e.to_string()),
        };
        let mut config =
            ServerConfig::builder_with_protocol_versions(&[&version::TLS12, &version::TLS13])
                .with_no_client_auth()
                .with_single_cert(certs, key)
                .map_err(|e| e.to_string())?;
        config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        let acceptor = Acceptor::from_server_config(Arc::new(config));
        self.0.push((address, Arc::new(acceptor)));
        Ok(())
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// The acceptor of the listener a connection to `local` came in on, if that is a TLS one.
    pub fn for_local(&self, local: SocketAddr) -> Option<&Arc<Acceptor>> {
        let exact = self.0.iter().find(|(a, _)| *a == local);
        let any = || {
            self.0
                .iter()
                .find(|(a, _)| a.ip().is_unspecified() && a.port() == local.port())
        };
        exact.or_else(any).map(|(_, acceptor)| acceptor)
    }
}

/// The largest TLS record (2^14 bytes of plaintext, plus what TLS 1.2 may add) and its header.
const MAX_RECORD: usize = 5 + (1 << 14) + 2048;

/// Waits until the client's first TLS record is wholly in the socket's receive queue, reading
/// nothing and holding no buffer; `false` if the client closed first. Bytes that are not a TLS
/// handshake record, or a record header claiming more than a record can hold, are left for the
/// TLS library to refuse at once.
pub async fn first_record(tcp: &TcpStream) -> io::Result<bool> {
    let fd = tcp.as_raw_fd();
    loop {
        tcp.readable().await?;
        let found = tcp.try_io(Interest::READABLE, || {
            let mut head = [0u8; 5];
            // SAFETY: `fd` is the open socket of `tcp`; `head` is writable for its length.
            let n = unsafe {
                libc::recv(
                    fd,
                    head.as_mut_ptr().cast(),
                    head.len(),
                    libc::MSG_PEEK | libc::MSG_DONTWAIT,
                )
            };
            match n {
                n if n < 0 => return Err(io::Error::last_os_error()),
                0 => return Ok(false),
                n if (n as usize) < head.len() => {
                    return if head[0] == 0x16 {
                        Err(io::ErrorKind::WouldBlock.into())
                    } else {
                        Ok(true)
                    }
                }
                _ => {}
            }
            let need = 5 + usize::from(u16::from_be_bytes([head[3], head[4]]));
            if head[0] != 0x16 || need > MAX_RECORD {
                return Ok(true);
            }
            let mut queued: libc::c_int = 0;
            // SAFETY: FIONREAD writes one int, the bytes queued for reading on `fd`.
            if unsafe { libc::ioctl(fd, libc::FIONREAD, &mut queued) } < 0 {
                return Err(io::Error::last_os_error());
            }
            if usize::try_from(queued).unwrap_or(0) >= need {
                Ok(true)
            } else {
                // More of the record is on its way: wait for the next readiness.
                Err(io::ErrorKind::WouldBlock.into())
            }
        });
        match found {
            Ok(found) => return Ok(found),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            Err(e) => return Err(e),
        }
    }
}

/// Why a TLS client connection never got to HTTP.
#[derive(Debug)]
pub enum NoSession {
    /// The deadline passed first (logged at debug level only, as nginx does).
    TimedOut,
    /// The client closed, or the handshake failed.
    Failed(String),
}

/// The TLS session on `tcp`, handshaken with `acceptor` before `deadline`.
pub async fn handshake(
    acceptor: &Acceptor,
    tcp: TcpStream,
    peer: Option<SocketAddr>,
    deadline: Instant,
) -> Result<Stream, NoSession> {
    match tokio::time::timeout_at(deadline, first_record(&tcp)).await {
        Err(_) => return Err(NoSession::TimedOut),
        Ok(Ok(true)) => {}
        Ok(Ok(false)) => return Err(NoSession::Failed("closed before a ClientHello".into())),
        Ok(Err(e)) => return Err(NoSession::Failed(e.to_string())),
    }
    let fd = tcp.as_raw_fd();
    let l4 = L4Stream::from(tcp);
    // Boxed: the handshake's state (rustls' connection inline) would otherwise size the
    // connection task for its whole life.
    let shake = Box::pin(acceptor.tls_handshake(l4));
    match tokio::time::timeout_at(deadline, shake).await {
        Err(_) => Err(NoSession::TimedOut),
        Ok(Err(e)) => Err(NoSession::Failed(format!("{peer:?}: {e}"))),
        Ok(Ok(tls)) => {
            let mut stream: Stream = Box::new(tls);
            // The h2 path reads the client's address from the socket digest; HTTP/1.1 has it
            // from the accept, and would keep the digest's 408 B for the connection's life.
            if stream.selected_alpn_proto() == Some(pingora_core::protocols::ALPN::H2) {
                stream.set_socket_digest(SocketDigest::from_raw_fd(fd));
            }
            Ok(stream)
        }
    }
}
