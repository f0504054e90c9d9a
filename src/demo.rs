//! Demo Pods: tiny HTTP servers that say who they are.
//!
//! They stand in for the Pods of the quickstart's `httpbin` service, so a new user can see podgate
//! spread requests over three Pods without a cluster. Each answers every request with JSON naming
//! the Pod and echoing what it received (method, path, headers), which is also what the
//! integration tests assert on.

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::{Request, Response};
use hyper_util::rt::{TokioExecutor, TokioIo};
use std::convert::Infallible;
use std::sync::Arc;
use tokio::net::TcpListener;

/// Who a demo Pod says it is.
#[derive(Clone, Debug)]
pub struct DemoPod {
    pub name: String,
    pub version: String,
}

/// The JSON answer for one request.
pub async fn answer(pod: &DemoPod, req: Request<Incoming>) -> Response<Full<Bytes>> {
    let (parts, body) = req.into_parts();
    let body = body
        .collect()
        .await
        .map(|b| b.to_bytes())
        .unwrap_or_default();
    let headers: serde_json::Map<String, serde_json::Value> = parts
        .headers
        .iter()
        .map(|(k, v)| {
            (
                k.as_str().to_string(),
                String::from_utf8_lossy(v.as_bytes()).into_owned().into(),
            )
        })
        .collect();
    let doc = serde_json::json!({
        "pod": pod.name,
        "version": pod.version,
        "method": parts.method.as_str(),
        "uri": parts.uri.to_string(),
        "headers": headers,
        "body_bytes": body.len(),
    });
    let mut text = serde_json::to_vec(&doc).unwrap_or_default();
    text.push(b'\n');
    Response::builder()
        .header("content-type", "application/json")
        .header("x-pod", pod.name.as_str())
        .body(Full::new(Bytes::from(text)))
        .expect("static response parts are valid")
}

/// Serves `pod` on `listener` (HTTP/1.1 and h2c) until the future is dropped; dropping it also
/// ends every open connection, as a killed Pod's would.
pub async fn serve(listener: TcpListener, pod: DemoPod) {
    let pod = Arc::new(pod);
    let mut connections = tokio::task::JoinSet::new();
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        // Reap finished connections so the set does not grow without bound.
        while connections.try_join_next().is_some() {}
        let pod = pod.clone();
        connections.spawn(async move {
            let svc = hyper::service::service_fn(move |req| {
                let pod = pod.clone();
                async move { Ok::<_, Infallible>(answer(&pod, req).await) }
            });
            let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                .serve_connection(TokioIo::new(stream), svc)
                .await;
        });
    }
}
