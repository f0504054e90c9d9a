//! gRPC through podgate, with an implementation podgate did not write on both ends: tonic
//! servers as the Pods (h2c), tonic clients as callers over an `h2c: true` listener. Covers the
//! four call kinds, trailers both ways, Pods found through EndpointSlices and their weights, a Pod
//! removed while a stream is open, the gateway's own failures as gRPC statuses, grpc-timeout,
//! and the gRPC health protocol as an active check.

mod support;

use bytes::{Buf, BufMut, Bytes};
use futures::StreamExt;
use http::uri::PathAndQuery;
use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use serde_json::json;
use std::collections::HashMap;
use std::convert::Infallible;
use std::future::Future;
use std::net::{Ipv4Addr, SocketAddr};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};
use support::fake_kube::FakeKube;
use support::*;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tonic::codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder};
use tonic::{Code, Request, Response, Status, Streaming};

/// Messages are raw bytes (the framing, trailers and statuses are tonic's; no protobuf needed).
#[derive(Clone, Copy, Default)]
struct Raw;

impl Codec for Raw {
    type Encode = Bytes;
    type Decode = Bytes;
    type Encoder = Raw;
    type Decoder = Raw;
    fn encoder(&mut self) -> Raw {
        Raw
    }
    fn decoder(&mut self) -> Raw {
        Raw
    }
}

impl Encoder for Raw {
    type Item = Bytes;
    type Error = Status;
    fn encode(&mut self, item: Bytes, dst: &mut EncodeBuf<'_>) -> Result<(), Status> {
        dst.put(item);
        Ok(())
    }
}

impl Decoder for Raw {
    type Item = Bytes;
    type Error = Status;
    fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<Bytes>, Status> {
        let n = src.remaining();
        Ok(Some(src.copy_to_bytes(n)))
    }
}

/// The test service `test.Echo` of one Pod. Answers carry the Pod's name.
#[derive(Clone)]
struct Echo {
    name: Arc<str>,
    /// Server streams asked for with `gated:N` send their first message at once and each later
    /// one only when the test adds a permit.
    gate: Arc<Semaphore>,
}

impl tonic::server::NamedService for Echo {
    const NAME: &'static str = "test.Echo";
}

type BoxStream = Pin<Box<dyn futures::Stream<Item = Result<Bytes, Status>> + Send>>;

impl Echo {
    async fn unary(self, req: Request<Bytes>) -> Result<Response<Bytes>, Status> {
        let msg = req.into_inner();
        if msg.as_ref() == b"fail" {
            let mut md = tonic::metadata::MetadataMap::new();
            md.insert("x-detail", "42".parse().unwrap());
            return Err(Status::with_metadata(Code::NotFound, "no such thing", md));
        }
        let text = format!("{}:{}", self.name, String::from_utf8_lossy(&msg));
        Ok(Response::new(Bytes::from(text)))
    }

    async fn server_stream(self, req: Request<Bytes>) -> Result<Response<BoxStream>, Status> {
        let msg = String::from_utf8_lossy(req.get_ref()).into_owned();
        let (gated, n) = match msg.strip_prefix("gated:") {
            Some(n) => (true, n.parse::<usize>().unwrap_or(0)),
            None => (false, msg.parse::<usize>().unwrap_or(0)),
        };
        let stream = futures::stream::unfold(0usize, move |i| {
            let me = self.clone();
            async move {
                if i == n {
                    return None;
                }
                if gated && i > 0 {
                    me.gate.acquire().await.ok()?.forget();
                }
                Some((Ok(Bytes::from(format!("{}:{i}", me.name))), i + 1))
            }
        });
        Ok(Response::new(Box::pin(stream) as BoxStream))
    }

    async fn client_stream(
        self,
        req: Request<Streaming<Bytes>>,
    ) -> Result<Response<Bytes>, Status> {
        let mut inbound = req.into_inner();
        let (mut count, mut bytes) = (0usize, 0usize);
        while let Some(m) = inbound.next().await {
            let m = m?;
            count += 1;
            bytes += m.len();
        }
        Ok(Response::new(Bytes::from(format!(
            "{}:{count}:{bytes}",
            self.name
        ))))
    }

    async fn bidi(self, req: Request<Streaming<Bytes>>) -> Result<Response<BoxStream>, Status> {
        let name = self.name.clone();
        let out = req.into_inner().map(move |m| {
            m.map(|b| Bytes::from(format!("{name}:{}", String::from_utf8_lossy(&b))))
        });
        Ok(Response::new(Box::pin(out) as BoxStream))
    }
}

impl tower::Service<http::Request<tonic::body::Body>> for Echo {
    type Response = http::Response<tonic::body::Body>;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Infallible>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: http::Request<tonic::body::Body>) -> Self::Future {
        let me = self.clone();
        Box::pin(async move {
            let mut grpc = tonic::server::Grpc::new(Raw);
            let path = req.uri().path().to_string();
            let resp = match path.as_str() {
                "/test.Echo/Unary" => {
                    let svc = tower::service_fn(move |r| me.clone().unary(r));
                    grpc.unary(svc, req).await
                }
                "/test.Echo/ServerStream" => {
                    let svc = tower::service_fn(move |r| me.clone().server_stream(r));
                    grpc.server_streaming(svc, req).await
                }
                "/test.Echo/ClientStream" => {
                    let svc = tower::service_fn(move |r| me.clone().client_stream(r));
                    grpc.client_streaming(svc, req).await
                }
                "/test.Echo/Bidi" => {
                    let svc = tower::service_fn(move |r| me.clone().bidi(r));
                    grpc.streaming(svc, req).await
                }
                _ => Status::unimplemented("no such method").into_http(),
            };
            Ok(resp)
        })
    }
}

/// A tonic server Pod serving `test.Echo` (and the gRPC health service) on `listener`.
struct GrpcPod {
    name: String,
    addr: SocketAddr,
    gate: Arc<Semaphore>,
    health: tonic_health::server::HealthReporter,
    task: tokio::task::JoinHandle<()>,
    /// Starts tonic's graceful shutdown (GOAWAY, in-flight calls finish), as SIGTERM would.
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    /// Connections accepted so far.
    connections: Arc<std::sync::atomic::AtomicUsize>,
}

impl Drop for GrpcPod {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl GrpcPod {
    async fn start(name: &str, listener: TcpListener) -> GrpcPod {
        Self::start_aged(name, listener, None).await
    }

    /// A Pod whose server closes each connection gracefully (GOAWAY) once it is `max_age` old,
    /// as gRPC servers do with `MAX_CONNECTION_AGE`.
    async fn start_aged(name: &str, listener: TcpListener, max_age: Option<Duration>) -> GrpcPod {
        let addr = listener.local_addr().unwrap();
        let gate = Arc::new(Semaphore::new(0));
        let echo = Echo {
            name: name.into(),
            gate: gate.clone(),
        };
        let (health, health_svc) = tonic_health::server::health_reporter();
        health
            .set_service_status("", tonic_health::ServingStatus::Serving)
            .await;
        let connections = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let counter = connections.clone();
        let incoming =
            tokio_stream::wrappers::TcpListenerStream::new(listener).inspect(move |_| {
                counter.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            });
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let mut builder = tonic::transport::Server::builder();
        if let Some(age) = max_age {
            // Without a grace: tonic 0.14 then shuts down gracefully at `age` (with a grace it
            // closes at age + grace without a GOAWAY).
            builder = builder.max_connection_age(age);
        }
        let task = tokio::spawn(async move {
            let _ = builder
                .add_service(echo)
                .add_service(health_svc)
                .serve_with_incoming_shutdown(incoming, async {
                    let _ = stopped.await;
                })
                .await;
        });
        GrpcPod {
            name: name.to_string(),
            addr,
            gate,
            health,
            task,
            stop: Some(stop),
            connections,
        }
    }
}

/// `n` listeners on one port at distinct loopback IPs, as the Pods of a Service are.
async fn listeners_same_port(n: usize) -> Vec<TcpListener> {
    for attempt in 0..50u32 {
        let base = 20 + ((std::process::id() + attempt * 13) % 200) as u8;
        let Ok(first) = TcpListener::bind((Ipv4Addr::new(127, 0, base, 1), 0)).await else {
            continue;
        };
        let port = first.local_addr().unwrap().port();
        let mut all = vec![first];
        for i in 1..n {
            match TcpListener::bind((Ipv4Addr::new(127, 0, base, 1 + i as u8), port)).await {
                Ok(l) => all.push(l),
                Err(_) => break,
            }
        }
        if all.len() == n {
            return all;
        }
    }
    panic!("no shared free port on loopback");
}

async fn grpc_pods(names: &[&str]) -> Vec<GrpcPod> {
    let mut pods = Vec::new();
    for (name, l) in names.iter().zip(listeners_same_port(names.len()).await) {
        pods.push(GrpcPod::start(name, l).await);
    }
    pods
}

fn service(name: &str) -> Service {
    serde_json::from_value(json!({
        "metadata": {"name": name, "namespace": "default"},
        "spec": {"ports": [{"name": "grpc", "port": 9000, "targetPort": "grpc", "protocol": "TCP"}]},
    }))
    .unwrap()
}

fn slice(name: &str, service: &str, pods: &[&GrpcPod]) -> EndpointSlice {
    let eps: Vec<_> = pods.iter().map(|p| (*p, true)).collect();
    slice_with(name, service, &eps)
}

/// An EndpointSlice of (Pod, ready): a Pod not ready is terminating (still serving).
fn slice_with(name: &str, service: &str, pods: &[(&GrpcPod, bool)]) -> EndpointSlice {
    let port = pods.first().map_or(9, |p| p.0.addr.port());
    let endpoints: Vec<_> = pods
        .iter()
        .map(|(p, ready)| {
            json!({
                "addresses": [p.addr.ip().to_string()],
                "conditions": {"ready": ready, "serving": true, "terminating": !ready},
                "targetRef": {"kind": "Pod", "name": p.name, "namespace": "default"},
            })
        })
        .collect();
    serde_json::from_value(json!({
        "metadata": {"name": name, "namespace": "default",
                     "labels": {"kubernetes.io/service-name": service}},
        "addressType": "IPv4",
        "ports": [{"name": "grpc", "port": port, "protocol": "TCP"}],
        "endpoints": endpoints,
    }))
    .unwrap()
}

/// podgate with an `h2c: true` listener, cluster `k` read from the fake API server, and
/// `upstreams`/`routes` as given.
async fn gateway_on(k: &FakeKube, rest: &str) -> Gateway {
    let dir = tempfile::tempdir().unwrap();
    k.write_kubeconfig(&dir.path().join("k.kubeconfig"), None);
    let body = format!(
        "access_log: {{path: access.log}}\nclusters:\n  - name: k\n    kubeconfig: k.kubeconfig\n{rest}"
    );
    Gateway::start_with_listener(dir, "h2c: true", &body).await
}

type Client = tonic::client::Grpc<tonic::transport::Channel>;

async fn client(gw: &Gateway) -> Client {
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{}", gw.addr))
        .unwrap()
        .connect()
        .await
        .expect("h2c connection to podgate");
    Client::new(channel)
}

async fn unary(c: &mut Client, msg: &str) -> Result<String, Status> {
    unary_req(c, Request::new(Bytes::from(msg.to_string()))).await
}

async fn unary_req(c: &mut Client, req: Request<Bytes>) -> Result<String, Status> {
    c.ready()
        .await
        .map_err(|e| Status::unknown(e.to_string()))?;
    let path = PathAndQuery::from_static("/test.Echo/Unary");
    let resp = c.unary(req, path, Raw).await?;
    Ok(String::from_utf8_lossy(resp.get_ref()).into_owned())
}

async fn metrics(gw: &Gateway) -> String {
    String::from_utf8(get(gw.admin, "a", "/metrics").await.unwrap().body.to_vec()).unwrap()
}

const GRPC_UPSTREAM: &str =
    "upstreams:\n  - name: echo\n    protocol: h2c\n    read_timeout: 5s\n    \
     services: [{cluster: k, namespace: default, service: echo, port: grpc}]\n\
     routes:\n  - {name: echo, path_prefix: /test.Echo/, upstream: echo}\n";

#[tokio::test]
async fn unary_and_streaming_calls_relay_through_h2c_pods_with_trailers() {
    let k = FakeKube::start().await;
    let pods = grpc_pods(&["echo-1"]).await;
    k.apply_service(&service("echo"));
    k.apply_slice(&slice("echo-1", "echo", &[&pods[0]]));
    let gw = gateway_on(&k, GRPC_UPSTREAM).await;
    let mut c = client(&gw).await;
    wait_for("the Pod through podgate", || {
        let mut c = c.clone();
        async move { unary(&mut c, "hi").await.is_ok() }
    })
    .await;

    assert_eq!(unary(&mut c, "hello").await.unwrap(), "echo-1:hello");

    // A status the Pod sets travels in the trailers, with its message and metadata.
    let err = unary(&mut c, "fail").await.unwrap_err();
    assert_eq!(err.code(), Code::NotFound, "{err:?}");
    assert_eq!(err.message(), "no such thing");
    assert_eq!(
        err.metadata().get("x-detail").and_then(|v| v.to_str().ok()),
        Some("42")
    );

    // Server streaming.
    c.ready().await.unwrap();
    let mut s = c
        .server_streaming(
            Request::new(Bytes::from_static(b"50")),
            PathAndQuery::from_static("/test.Echo/ServerStream"),
            Raw,
        )
        .await
        .unwrap()
        .into_inner();
    let mut got = Vec::new();
    while let Some(m) = s.message().await.unwrap() {
        got.push(String::from_utf8_lossy(&m).into_owned());
    }
    assert_eq!(got.len(), 50);
    assert_eq!(got[49], "echo-1:49");

    // Client streaming: 200 messages of 1 KiB (more than one flow-control window's worth in
    // total is not needed to show relaying; the count and size must arrive whole).
    c.ready().await.unwrap();
    let outbound = futures::stream::iter((0..200).map(|_| Bytes::from(vec![7u8; 1024])));
    let r = c
        .client_streaming(
            Request::new(outbound),
            PathAndQuery::from_static("/test.Echo/ClientStream"),
            Raw,
        )
        .await
        .unwrap();
    assert_eq!(r.get_ref().as_ref(), b"echo-1:200:204800");

    // Bidi, in lock step: each message is sent only after the previous answer came back, so a
    // proxy that buffered either direction until its end would hang here.
    c.ready().await.unwrap();
    let (tx, rx) = tokio::sync::mpsc::channel::<Bytes>(1);
    let mut answers = c
        .streaming(
            Request::new(tokio_stream::wrappers::ReceiverStream::new(rx)),
            PathAndQuery::from_static("/test.Echo/Bidi"),
            Raw,
        )
        .await
        .unwrap()
        .into_inner();
    for i in 0..20 {
        tx.send(Bytes::from(format!("m{i}"))).await.unwrap();
        let a = tokio::time::timeout(DEADLINE, answers.message())
            .await
            .expect("bidi answer in time")
            .unwrap()
            .expect("an answer per message");
        assert_eq!(a.as_ref(), format!("echo-1:m{i}").as_bytes());
    }
    drop(tx);
    assert!(answers.message().await.unwrap().is_none(), "clean end");

    // The gRPC status shows in the metrics and the access log next to the HTTP status.
    let m = metrics(&gw).await;
    assert!(
        m.contains(
            r#"podgate_grpc_responses_total{grpc_status="5",route="echo",upstream="echo"} 1"#
        ),
        "{m}"
    );
    let log_path = gw.path("access.log");
    wait_for("the access log lines", || async {
        std::fs::read_to_string(&log_path).is_ok_and(|t| t.contains("\"grpc_status\":\"5\""))
    })
    .await;
    let log = std::fs::read_to_string(&log_path).unwrap();
    let line = log
        .lines()
        .find(|l| l.contains("\"grpc_status\":\"5\""))
        .unwrap();
    let v: serde_json::Value = serde_json::from_str(line).unwrap();
    assert_eq!(v["status"], 200);
    assert_eq!(v["pod"], "echo-1");
}

#[tokio::test]
async fn calls_spread_over_pods_by_service_weight() {
    let k = FakeKube::start().await;
    let pods = grpc_pods(&["w-a", "w-b"]).await;
    for (svc, pod) in [("wa", &pods[0]), ("wb", &pods[1])] {
        k.apply_service(&service(svc));
        k.apply_slice(&slice(svc, svc, &[pod]));
    }
    let gw = gateway_on(
        &k,
        "upstreams:\n  - name: echo\n    protocol: h2c\n    services:\n\
         \x20     - {cluster: k, namespace: default, service: wa, port: grpc, weight: 3}\n\
         \x20     - {cluster: k, namespace: default, service: wb, port: grpc, weight: 1}\n\
         routes:\n  - {name: echo, path_prefix: /, upstream: echo}\n",
    )
    .await;
    let mut c = client(&gw).await;
    wait_for("both Pods discovered", || async {
        gw.upstreams_json().await["upstreams"][0]["services"]
            .as_array()
            .is_some_and(|s| {
                s.iter()
                    .all(|s| s["endpoints"].as_array().is_some_and(|e| e.len() == 1))
            })
    })
    .await;
    let mut counts: HashMap<String, usize> = HashMap::new();
    for i in 0..40 {
        let a = unary(&mut c, &i.to_string()).await.unwrap();
        let pod = a.split(':').next().unwrap().to_string();
        *counts.entry(pod).or_default() += 1;
    }
    // All 40 calls ride one client connection, multiplexed: the spread is per call, not per
    // connection.
    assert_eq!(counts.get("w-a"), Some(&30), "{counts:?}");
    assert_eq!(counts.get("w-b"), Some(&10), "{counts:?}");
}

#[tokio::test]
async fn a_pod_removed_mid_stream_finishes_its_stream() {
    let k = FakeKube::start().await;
    let pods = grpc_pods(&["m-1", "m-2"]).await;
    k.apply_service(&service("echo"));
    k.apply_slice(&slice("echo", "echo", &[&pods[0], &pods[1]]));
    let gw = gateway_on(&k, GRPC_UPSTREAM).await;
    let mut c = client(&gw).await;
    wait_for("both Pods discovered", || async {
        gw.upstreams_json().await["upstreams"][0]["services"][0]["endpoints"]
            .as_array()
            .is_some_and(|e| e.len() == 2)
    })
    .await;

    c.ready().await.unwrap();
    let mut s = c
        .server_streaming(
            Request::new(Bytes::from_static(b"gated:5")),
            PathAndQuery::from_static("/test.Echo/ServerStream"),
            Raw,
        )
        .await
        .unwrap()
        .into_inner();
    let first = s.message().await.unwrap().unwrap();
    let serving = String::from_utf8_lossy(&first)
        .split(':')
        .next()
        .unwrap()
        .to_string();
    let (gone, stays) = if serving == "m-1" {
        (&pods[0], &pods[1])
    } else {
        (&pods[1], &pods[0])
    };

    // The Pod leaves its EndpointSlice while the stream is open.
    k.apply_slice(&slice("echo", "echo", &[stays]));
    wait_for("the removal to reach podgate", || async {
        gw.upstreams_json().await["upstreams"][0]["services"][0]["endpoints"]
            .as_array()
            .is_some_and(|e| e.len() == 1)
    })
    .await;
    // New calls go to the Pod that stays, on the same client connection.
    for _ in 0..4 {
        let a = unary(&mut c, "x").await.unwrap();
        assert_eq!(a, format!("{}:x", stays.name));
    }
    // The open stream is not cut: its remaining messages and its OK status still arrive.
    gone.gate.add_permits(4);
    let mut rest = Vec::new();
    while let Some(m) = s
        .message()
        .await
        .expect("the stream ends with OK, not a reset")
    {
        rest.push(String::from_utf8_lossy(&m).into_owned());
    }
    assert_eq!(rest.len(), 4, "{rest:?}");
    assert_eq!(rest[3], format!("{}:4", gone.name));
}

/// An h2c "Pod" that takes calls and never answers them; records each call's request head.
async fn silent_pod() -> (
    SocketAddr,
    Arc<Mutex<Vec<http::HeaderMap>>>,
    tokio::task::JoinHandle<()>,
) {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let heads = Arc::new(Mutex::new(Vec::new()));
    let seen = heads.clone();
    let task = tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = l.accept().await else {
                return;
            };
            let seen = seen.clone();
            tokio::spawn(async move {
                let Ok(mut conn) = h2::server::handshake(tcp).await else {
                    return;
                };
                let mut held = Vec::new();
                while let Some(Ok((req, respond))) = conn.accept().await {
                    seen.lock().unwrap().push(req.headers().clone());
                    held.push((req, respond));
                }
            });
        }
    });
    (addr, heads, task)
}

/// One gRPC call over a plain h2 connection with `grpc-timeout` set and no deadline of the
/// client's own; returns the HTTP status and the `grpc-status` of the trailers.
async fn raw_call(addr: SocketAddr, path: &str, timeout: &str) -> (u16, Option<String>) {
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let (client, conn) = h2::client::handshake(tcp).await.unwrap();
    tokio::spawn(conn);
    let mut client = client.ready().await.unwrap();
    let req = http::Request::post(format!("http://{addr}{path}"))
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .header("grpc-timeout", timeout)
        .body(())
        .unwrap();
    let (answer, mut body) = client.send_request(req, false).unwrap();
    body.send_data(Bytes::from_static(&[0, 0, 0, 0, 1, b'x']), true)
        .unwrap();
    let answer = tokio::time::timeout(DEADLINE, answer)
        .await
        .expect("an answer")
        .unwrap();
    let status = answer.status().as_u16();
    let mut body = answer.into_body();
    while let Some(chunk) = body.data().await {
        chunk.expect("the stream is not reset");
    }
    // The status comes in trailers that end the stream cleanly (a reset stream would fail
    // here: gRPC's C core reports a reset as CANCELLED whatever status came before it).
    let trailers = body.trailers().await.expect("trailers, not a reset");
    let grpc = trailers
        .and_then(|t| t.get("grpc-status").cloned())
        .map(|v| v.to_str().unwrap().to_string());
    (status, grpc)
}

#[tokio::test]
async fn gateway_failures_answer_grpc_statuses() {
    let k = FakeKube::start().await;
    let (silent, heads, _task) = silent_pod().await;
    // `refused`: a port nothing listens on.
    let refused = free_port();
    let gw = gateway_on(
        &k,
        &format!(
            "upstreams:\n\
             \x20 - {{name: silent, protocol: h2c, read_timeout: 30s, nodes: [{{address: \"{silent}\"}}]}}\n\
             \x20 - {{name: down, protocol: h2c, retries: 0, nodes: [{{address: \"127.0.0.1:{refused}\"}}]}}\n\
             \x20 - {{name: empty, protocol: h2c, services: [{{cluster: k, namespace: default, service: none, port: grpc}}]}}\n\
             routes:\n\
             \x20 - {{name: silent, path_prefix: /test.Echo/, upstream: silent}}\n\
             \x20 - {{name: down, path_prefix: /down.Echo/, upstream: down}}\n\
             \x20 - {{name: empty, path_prefix: /empty.Echo/, upstream: empty}}\n"
        ),
    )
    .await;
    let c = client(&gw).await;

    // grpc-timeout: the Pod holds the call; podgate gives up at the deadline, not read_timeout.
    // (A raw h2 client: tonic's own client would give up at the same instant, as Cancelled.)
    let started = Instant::now();
    let (status, grpc_status) = raw_call(gw.addr, "/test.Echo/Unary", "300m").await;
    assert_eq!((status, grpc_status.as_deref()), (200, Some("4")));
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );
    // The Pod got the deadline and `te: trailers`, which gRPC servers require.
    let head = heads
        .lock()
        .unwrap()
        .first()
        .cloned()
        .expect("the call reached the Pod");
    assert_eq!(head.get("te").map(|v| v.as_bytes()), Some(&b"trailers"[..]));
    assert!(head.get("grpc-timeout").is_some(), "{head:?}");

    let call = |path: &'static str| {
        let mut c = c.clone();
        async move {
            c.ready().await.unwrap();
            c.unary::<Bytes, Bytes, Raw>(
                Request::new(Bytes::from_static(b"x")),
                PathAndQuery::from_static(path),
                Raw,
            )
            .await
            .unwrap_err()
        }
    };
    // No Pod accepts the connection: UNAVAILABLE, in trailers that end the stream.
    assert_eq!(
        raw_call(gw.addr, "/down.Echo/Unary", "5S").await,
        (200, Some("14".to_string()))
    );
    let err = call("/down.Echo/Unary").await;
    assert_eq!(err.code(), Code::Unavailable, "{err:?}");
    // No ready Pod at all: UNAVAILABLE.
    let err = call("/empty.Echo/Unary").await;
    assert_eq!(err.code(), Code::Unavailable, "{err:?}");
    assert_eq!(err.message(), "the upstream has no ready endpoint");
    // No route: UNIMPLEMENTED, as a gRPC server answers an unknown method.
    let err = call("/nowhere.Svc/Call").await;
    assert_eq!(err.code(), Code::Unimplemented, "{err:?}");

    let m = metrics(&gw).await;
    for (route, code, n) in [("silent", 4, 1), ("down", 14, 2), ("empty", 14, 1)] {
        let want = format!(
            r#"podgate_grpc_responses_total{{grpc_status="{code}",route="{route}",upstream="{route}"}} {n}"#
        );
        assert!(m.contains(&want), "{want}\n{m}");
    }
    assert!(
        m.contains(r#"podgate_requests_total{code="2xx",route="silent",upstream="silent"} 1"#),
        "gRPC errors are HTTP 200: {m}"
    );
}

#[tokio::test]
async fn grpc_health_checks_take_a_not_serving_pod_out() {
    let k = FakeKube::start().await;
    let pods = grpc_pods(&["h-1", "h-2"]).await;
    k.apply_service(&service("echo"));
    k.apply_slice(&slice("echo", "echo", &[&pods[0], &pods[1]]));
    let gw = gateway_on(
        &k,
        "upstreams:\n  - name: echo\n    protocol: h2c\n    \
         health_check: {kind: grpc, interval: 100ms, timeout: 100ms, healthy: 1, unhealthy: 1}\n    \
         services: [{cluster: k, namespace: default, service: echo, port: grpc}]\n\
         routes:\n  - {name: echo, path_prefix: /, upstream: echo}\n",
    )
    .await;
    let mut c = client(&gw).await;
    wait_for("calls to both Pods", || {
        let mut c = c.clone();
        async move {
            let mut seen = std::collections::HashSet::new();
            for _ in 0..4 {
                if let Ok(a) = unary(&mut c, "x").await {
                    seen.insert(a);
                }
            }
            seen.len() == 2
        }
    })
    .await;
    pods[0]
        .health
        .set_service_status("", tonic_health::ServingStatus::NotServing)
        .await;
    wait_for("the NOT_SERVING Pod to be taken out", || {
        let mut c = c.clone();
        async move {
            let mut all = true;
            for _ in 0..4 {
                all &= unary(&mut c, "x").await.is_ok_and(|a| a == "h-2:x");
            }
            all
        }
    })
    .await;
    let m = metrics(&gw).await;
    assert!(
        m.contains(r#"podgate_health_checks_total{result="success",upstream="echo"}"#),
        "{m}"
    );
    let _ = unary(&mut c, "x").await;
}

/// A gRPC "Pod" over TLS that offers only h2 by ALPN and answers every call with one message,
/// `tls-pod:<the request message>`, and `grpc-status: 0`; records the ALPN protocol of each
/// connection.
async fn tls_h2_pod(pki: &TestPki) -> (SocketAddr, Arc<Mutex<Vec<Option<Vec<u8>>>>>) {
    use rustls_pki_types::pem::PemObject;
    use rustls_pki_types::{CertificateDer, PrivateKeyDer};
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(&pki.cert_pem)
        .unwrap()
        .map(|c| c.unwrap())
        .collect();
    let key = PrivateKeyDer::from_pem_file(&pki.key_pem).unwrap();
    let mut config = tokio_rustls::rustls::ServerConfig::builder_with_provider(Arc::new(
        tokio_rustls::rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_no_client_auth()
    .with_single_cert(certs, key)
    .unwrap();
    config.alpn_protocols = vec![b"h2".to_vec()];
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let alpn = Arc::new(Mutex::new(Vec::new()));
    let seen = alpn.clone();
    tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = l.accept().await else {
                return;
            };
            let (acceptor, seen) = (acceptor.clone(), seen.clone());
            tokio::spawn(async move {
                let Ok(tls) = acceptor.accept(tcp).await else {
                    return;
                };
                seen.lock()
                    .unwrap()
                    .push(tls.get_ref().1.alpn_protocol().map(<[u8]>::to_vec));
                let Ok(mut conn) = h2::server::handshake(tls).await else {
                    return;
                };
                while let Some(Ok((req, mut respond))) = conn.accept().await {
                    tokio::spawn(async move {
                        let mut body = req.into_body();
                        let mut msg = Vec::new();
                        while let Some(Ok(chunk)) = body.data().await {
                            let _ = body.flow_control().release_capacity(chunk.len());
                            msg.extend_from_slice(&chunk);
                        }
                        let text = format!(
                            "tls-pod:{}",
                            String::from_utf8_lossy(msg.get(5..).unwrap_or(&[]))
                        );
                        let mut frame = vec![0];
                        frame.extend_from_slice(&(text.len() as u32).to_be_bytes());
                        frame.extend_from_slice(text.as_bytes());
                        let head = http::Response::builder()
                            .header("content-type", "application/grpc")
                            .body(())
                            .unwrap();
                        let Ok(mut send) = respond.send_response(head, false) else {
                            return;
                        };
                        let _ = send.send_data(Bytes::from(frame), false);
                        let mut trailers = http::HeaderMap::new();
                        trailers.insert("grpc-status", "0".parse().unwrap());
                        let _ = send.send_trailers(trailers);
                    });
                }
            });
        }
    });
    (addr, alpn)
}

#[tokio::test]
async fn h2_over_tls_upstream_negotiates_h2_and_verifies_the_pod() {
    let k = FakeKube::start().await;
    let dir = tempfile::tempdir().unwrap();
    let pki = make_pki(dir.path(), "grpc", &["grpc.internal"]);
    let (addr, alpn) = tls_h2_pod(&pki).await;
    let other = make_pki(dir.path(), "other", &["grpc.internal"]);
    let gw = gateway_on(
        &k,
        &format!(
            "upstreams:\n\
             \x20 - {{name: tls, scheme: https, protocol: h2, nodes: [{{address: \"{addr}\"}}],\n\
             \x20    tls: {{sni: grpc.internal, ca_file: {}}}}}\n\
             \x20 - {{name: untrusted, scheme: https, protocol: h2, retries: 0, nodes: [{{address: \"{addr}\"}}],\n\
             \x20    tls: {{sni: grpc.internal, ca_file: {}}}}}\n\
             routes:\n\
             \x20 - {{name: tls, path_prefix: /test.Echo/, upstream: tls}}\n\
             \x20 - {{name: untrusted, path_prefix: /untrusted.Echo/, upstream: untrusted}}\n",
            pki.ca_pem.display(),
            other.ca_pem.display()
        ),
    )
    .await;
    let mut c = client(&gw).await;
    assert_eq!(unary(&mut c, "hello").await.unwrap(), "tls-pod:hello");
    assert!(
        alpn.lock()
            .unwrap()
            .iter()
            .all(|p| p.as_deref() == Some(&b"h2"[..])),
        "{:?}",
        alpn.lock().unwrap()
    );
    // A Pod whose certificate the upstream's CA did not sign is not called.
    c.ready().await.unwrap();
    let err = c
        .unary::<Bytes, Bytes, Raw>(
            Request::new(Bytes::from_static(b"x")),
            PathAndQuery::from_static("/untrusted.Echo/Unary"),
            Raw,
        )
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unavailable, "{err:?}");
}

#[tokio::test]
async fn grpc_calls_survive_a_rolling_deploy_under_load() {
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
    let k = FakeKube::start().await;
    let mut pods = grpc_pods(&["r-old-1", "r-old-2", "r-new-1", "r-new-2"]).await;
    k.apply_service(&service("echo"));
    k.apply_slice(&slice("echo", "echo", &[&pods[0], &pods[1]]));
    let gw = gateway_on(&k, GRPC_UPSTREAM).await;
    let endpoints = || async {
        gw.upstreams_json().await["upstreams"][0]["services"][0]["endpoints"]
            .as_array()
            .map_or(0, |e| e.len())
    };
    wait_for("both old Pods", || async { endpoints().await == 2 }).await;

    // Two clients, each one connection, calling without pause until told to stop.
    let stop = Arc::new(AtomicBool::new(false));
    let (ok, failed) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let mut load = Vec::new();
    for _ in 0..2 {
        let mut c = client(&gw).await;
        let (stop, ok, failed) = (stop.clone(), ok.clone(), failed.clone());
        load.push(tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                match unary(&mut c, "x").await {
                    Ok(_) => ok.fetch_add(1, Ordering::Relaxed),
                    Err(e) => {
                        eprintln!("failed call: {e:?}");
                        failed.fetch_add(1, Ordering::Relaxed)
                    }
                };
            }
        }));
    }
    let served = |n: u64| {
        let ok = ok.clone();
        async move { ok.load(Ordering::Relaxed) >= n }
    };
    wait_for("load", || served(50)).await;

    // The Kubernetes order, once per old Pod: its replacement becomes ready, the old one turns
    // terminating (no new calls), leaves the slice, then shuts down (GOAWAY, in-flight calls
    // finish).
    for step in 0..2 {
        let (old, new) = (step, step + 2);
        let kept: Vec<(&GrpcPod, bool)> = (step + 1..=new).map(|i| (&pods[i], true)).collect();
        let mut with_old = vec![(&pods[old], true)];
        with_old.extend(kept.iter().copied());
        k.apply_slice(&slice_with("echo", "echo", &with_old));
        wait_for("the new Pod", || async { endpoints().await == 3 }).await;
        with_old[0].1 = false;
        k.apply_slice(&slice_with("echo", "echo", &with_old));
        let before = ok.load(Ordering::Relaxed);
        wait_for("calls after the change", || served(before + 50)).await;
        k.apply_slice(&slice_with("echo", "echo", &kept));
        wait_for("the old Pod's removal", || async { endpoints().await == 2 }).await;
        let _ = pods[old].stop.take().map(|s| s.send(()));
        let before = ok.load(Ordering::Relaxed);
        wait_for("calls after the exit", || served(before + 50)).await;
    }
    stop.store(true, Ordering::Relaxed);
    for l in load {
        l.await.unwrap();
    }
    assert_eq!(
        failed.load(Ordering::Relaxed),
        0,
        "calls failed during the rollout"
    );
    // Every call after the rollout reaches a new Pod.
    let mut c = client(&gw).await;
    for _ in 0..4 {
        assert!(unary(&mut c, "x").await.unwrap().starts_with("r-new-"));
    }
    pods.clear();
}

/// A Pod that rotates its connections (gRPC's `MAX_CONNECTION_AGE`: a graceful GOAWAY every
/// 30 ms here) loses no calls, with `retries: 0`: new calls go on a new connection, calls on the
/// old one finish. (hyper's two-step GOAWAY makes a call racing the last one rare; that race,
/// a stream refused unprocessed, is provoked frame by frame in `tests/h2_upstream.rs`.)
#[tokio::test]
async fn calls_survive_a_pod_rotating_its_connections() {
    use std::sync::atomic::Ordering;
    let k = FakeKube::start().await;
    let listener = listeners_same_port(1).await.remove(0);
    let pod = GrpcPod::start_aged("aged-1", listener, Some(Duration::from_millis(30))).await;
    k.apply_service(&service("echo"));
    k.apply_slice(&slice("echo", "echo", &[&pod]));
    let conf = GRPC_UPSTREAM.replace("read_timeout: 5s", "read_timeout: 5s\n    retries: 0");
    let gw = gateway_on(&k, &conf).await;
    wait_for("the Pod", || async {
        gw.upstreams_json().await["upstreams"][0]["services"][0]["endpoints"]
            .as_array()
            .is_some_and(|e| e.len() == 1)
    })
    .await;
    let mut load = Vec::new();
    for _ in 0..4 {
        let mut c = client(&gw).await;
        load.push(tokio::spawn(async move {
            let mut failed = Vec::new();
            for i in 0..300 {
                if let Err(e) = unary(&mut c, &i.to_string()).await {
                    failed.push(format!("{:?}: {}", e.code(), e.message()));
                }
            }
            failed
        }));
    }
    let mut failed = Vec::new();
    for l in load {
        failed.extend(l.await.unwrap());
    }
    let rotated = pod.connections.load(Ordering::Relaxed);
    assert!(
        rotated >= 3,
        "the Pod did not rotate its connections ({rotated})"
    );
    assert!(
        failed.is_empty(),
        "{} of 1200 calls failed: {failed:?}",
        failed.len()
    );
}

/// Hundreds of unary calls at once on one Pod connection: each answer is a small DATA frame
/// (then trailers), and hundreds of those may wait unread in podgate at once. The `h2` crate
/// closes a connection on which their framing overhead passes half the connection window (with
/// the 64 KiB default, about 140 frames), which failed every call on it.
#[tokio::test]
async fn hundreds_of_concurrent_calls_share_one_pod_connection() {
    let k = FakeKube::start().await;
    let listener = listeners_same_port(1).await.remove(0);
    let pod = GrpcPod::start("busy-1", listener).await;
    k.apply_service(&service("echo"));
    k.apply_slice(&slice("echo", "echo", &[&pod]));
    let gw = gateway_on(&k, GRPC_UPSTREAM).await;
    wait_for("the Pod", || async {
        gw.upstreams_json().await["upstreams"][0]["services"][0]["endpoints"]
            .as_array()
            .is_some_and(|e| e.len() == 1)
    })
    .await;
    let mut calls = Vec::new();
    for _ in 0..4 {
        let c = client(&gw).await;
        for i in 0..150 {
            let mut c = c.clone();
            calls.push(tokio::spawn(async move {
                let mut failed = 0;
                for j in 0..4 {
                    if unary(&mut c, &format!("{i}-{j}")).await.is_err() {
                        failed += 1;
                    }
                }
                failed
            }));
        }
    }
    let mut failed = 0;
    for c in calls {
        failed += c.await.unwrap();
    }
    assert_eq!(failed, 0, "{failed} of 2,400 calls failed");
    assert_eq!(
        pod.connections.load(std::sync::atomic::Ordering::Relaxed),
        1
    );
}

/// A tonic client that reaches podgate's TLS listener with ALPN h2, as gRPC clients do in
/// production; the certificate is checked against `ca` for `gateway.test`.
async fn tls_client(gw: &Gateway, ca: &std::path::Path) -> Client {
    let connector = support::tls_connector(ca, &[b"h2"]);
    let addr = gw.addr;
    let channel = tonic::transport::Endpoint::from_static("http://gateway.test")
        .connect_with_connector(tower::service_fn(move |_: http::Uri| {
            let connector = connector.clone();
            async move {
                let tcp = tokio::net::TcpStream::connect(addr).await?;
                let name = rustls_pki_types::ServerName::try_from("gateway.test").unwrap();
                let tls = connector.connect(name, tcp).await?;
                assert_eq!(tls.get_ref().1.alpn_protocol(), Some(&b"h2"[..]));
                Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(tls))
            }
        }))
        .await
        .expect("TLS h2 connection to podgate");
    Client::new(channel)
}

#[tokio::test]
async fn grpc_through_a_tls_listener_by_alpn_h2() {
    let k = FakeKube::start().await;
    let pods = grpc_pods(&["t-1"]).await;
    k.apply_service(&service("echo"));
    k.apply_slice(&slice("echo", "echo", &[&pods[0]]));
    let dir = tempfile::tempdir().unwrap();
    let pki = make_pki(dir.path(), "gw", &["gateway.test"]);
    k.write_kubeconfig(&dir.path().join("k.kubeconfig"), None);
    let listener = format!(
        "tls: {{cert: {}, key: {}}}",
        pki.cert_pem.display(),
        pki.key_pem.display()
    );
    let ca = pki.ca_pem.clone();
    let body = format!("clusters:\n  - name: k\n    kubeconfig: k.kubeconfig\n{GRPC_UPSTREAM}");
    let gw = Gateway::start_with_listener(dir, &listener, &body).await;
    let mut c = tls_client(&gw, &ca).await;
    wait_for("the Pod through podgate", || {
        let mut c = c.clone();
        async move { unary(&mut c, "hi").await.is_ok() }
    })
    .await;
    assert_eq!(unary(&mut c, "over tls").await.unwrap(), "t-1:over tls");
    let err = unary(&mut c, "fail").await.unwrap_err();
    assert_eq!(err.code(), Code::NotFound, "{err:?}");
    c.ready().await.unwrap();
    let mut s = c
        .server_streaming(
            Request::new(Bytes::from_static(b"20")),
            PathAndQuery::from_static("/test.Echo/ServerStream"),
            Raw,
        )
        .await
        .unwrap()
        .into_inner();
    let mut n = 0;
    while s.message().await.unwrap().is_some() {
        n += 1;
    }
    assert_eq!(n, 20);
}
