//! The four client protocols of the semantic table, all through hyper's clients (an HTTP
//! implementation podgate did not write), each request on a connection of its own so that one
//! row's failure cannot leak into the next.

use super::pod::AnyBody;
use bytes::Bytes;
use http_body_util::BodyExt;
use std::net::SocketAddr;
use tokio::net::TcpStream;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Client {
    /// HTTP/1.1 on a plain listener.
    Http1,
    /// HTTP/1.1 on the TLS listener (ALPN `http/1.1`).
    TlsHttp1,
    /// h2 on the TLS listener (ALPN `h2`).
    TlsH2,
    /// h2 by prior knowledge on the `h2c: true` listener.
    H2c,
}

impl Client {
    pub const ALL: &'static [Client] =
        &[Client::Http1, Client::TlsHttp1, Client::TlsH2, Client::H2c];
    pub const H2: &'static [Client] = &[Client::TlsH2, Client::H2c];

    pub fn tls(self) -> bool {
        matches!(self, Client::TlsHttp1 | Client::TlsH2)
    }

    pub fn h2(self) -> bool {
        matches!(self, Client::TlsH2 | Client::H2c)
    }
}

/// An answer as the client got it.
pub struct Answer {
    pub status: u16,
    pub headers: http::HeaderMap,
    pub trailers: Option<http::HeaderMap>,
    pub body: Bytes,
}

/// Where the clients connect: the gateway's three listeners and the CA its certificate is from.
pub struct Listeners {
    pub plain: SocketAddr,
    pub tls: SocketAddr,
    pub h2c: SocketAddr,
    pub tls_h1: tokio_rustls::TlsConnector,
    pub tls_h2: tokio_rustls::TlsConnector,
}

/// The name the gateway's certificate is for.
pub const GATEWAY_NAME: &str = "gateway.test";

impl Listeners {
    /// Sends `method host path` with `fields` and `body` from `client` on a new connection.
    pub async fn send(
        &self,
        client: Client,
        method: &str,
        host: &str,
        path: &str,
        fields: &[(String, String)],
        body: AnyBody,
    ) -> Result<Answer, String> {
        let mut req = http::Request::builder().method(method);
        req = if client.h2() {
            let scheme = if client.tls() { "https" } else { "http" };
            req.uri(format!("{scheme}://{host}{path}"))
        } else {
            req.uri(path).header("host", host)
        };
        for (k, v) in fields {
            req = req.header(k.as_str(), v.as_str());
        }
        let req = req.body(body).map_err(|e| format!("request: {e}"))?;
        let work = async {
            let addr = match client {
                Client::Http1 => self.plain,
                Client::TlsHttp1 | Client::TlsH2 => self.tls,
                Client::H2c => self.h2c,
            };
            let tcp = TcpStream::connect(addr)
                .await
                .map_err(|e| format!("connect: {e}"))?;
            let resp = if client.tls() {
                let connector = if client.h2() {
                    &self.tls_h2
                } else {
                    &self.tls_h1
                };
                let name = rustls_pki_types::ServerName::try_from(GATEWAY_NAME).unwrap();
                let tls = connector
                    .connect(name, tcp)
                    .await
                    .map_err(|e| format!("TLS: {e}"))?;
                let alpn = tls.get_ref().1.alpn_protocol().map(<[u8]>::to_vec);
                let want: &[u8] = if client.h2() { b"h2" } else { b"http/1.1" };
                if alpn.as_deref() != Some(want) {
                    return Err(format!("ALPN gave {alpn:?}"));
                }
                exchange(client.h2(), tls, req).await?
            } else {
                exchange(client.h2(), tcp, req).await?
            };
            let status = resp.status().as_u16();
            let headers = resp.headers().clone();
            let got = resp
                .into_body()
                .collect()
                .await
                .map_err(|e| format!("answer body: {e}"))?;
            Ok(Answer {
                status,
                headers,
                trailers: got.trailers().cloned(),
                body: got.to_bytes(),
            })
        };
        tokio::time::timeout(crate::support::DEADLINE, work)
            .await
            .map_err(|_| "no whole answer in time".to_string())?
    }
}

async fn exchange<I>(
    h2: bool,
    io: I,
    req: http::Request<AnyBody>,
) -> Result<http::Response<hyper::body::Incoming>, String>
where
    I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let io = hyper_util::rt::TokioIo::new(io);
    let sent = if h2 {
        let (mut send, conn) =
            hyper::client::conn::http2::handshake(hyper_util::rt::TokioExecutor::new(), io)
                .await
                .map_err(|e| format!("h2 handshake: {e}"))?;
        tokio::spawn(conn);
        send.send_request(req).await
    } else {
        let (mut send, conn) = hyper::client::conn::http1::handshake(io)
            .await
            .map_err(|e| format!("handshake: {e}"))?;
        tokio::spawn(conn);
        send.send_request(req).await
    };
    sent.map_err(|e| format!("request failed: {e}"))
}
