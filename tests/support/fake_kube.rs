//! A fake Kubernetes API server for tests: the real HTTP list/watch protocol that kube-rs speaks,
//! on plain HTTP at 127.0.0.1:<random port>, with objects held in memory and failures scripted
//! per test.
//!
//! Served: `GET /api/v1/namespaces/{ns}/services`, `GET /api/v1/namespaces/{ns}/pods` and
//! `GET /apis/discovery.k8s.io/v1/namespaces/{ns}/endpointslices`, each with `labelSelector`
//! (`k=v`, `k==v`, `k!=v`, `k`, `!k`, comma-separated) and `fieldSelector` (`metadata.name`,
//! `metadata.namespace`). Without `watch`: a list with `metadata.resourceVersion`. With
//! `watch=true|1`: newline-delimited JSON events after `resourceVersion` (replayed from the last
//! 200 changes, then live; older is 410 Gone), BOOKMARKs on demand when `allowWatchBookmarks=true`, closed after
//! `timeoutSeconds`. An object that starts or stops matching a watch's selector is ADDED to or
//! DELETED from it, as the real API server does.
//!
//! Also `GET /api/v1/nodes/{name}` (a single Node, for podgate's zone), 404 when no such node,
//! 403 after [`FakeKube::forbid_nodes`].

use bytes::Bytes;
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::{Request, Response, StatusCode};
use k8s_openapi::api::core::v1::{Pod, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use serde_json::{json, Value};
use std::collections::{BTreeMap, VecDeque};
use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

type Body = BoxBody<Bytes, Infallible>;

/// The resource kinds the fake serves.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Kind {
    Service,
    EndpointSlice,
    Pod,
}

impl Kind {
    fn api_version(self) -> &'static str {
        match self {
            Kind::Service | Kind::Pod => "v1",
            Kind::EndpointSlice => "discovery.k8s.io/v1",
        }
    }

    fn name(self) -> &'static str {
        match self {
            Kind::Service => "Service",
            Kind::EndpointSlice => "EndpointSlice",
            Kind::Pod => "Pod",
        }
    }
}

/// How the fake answers while paused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Pause {
    /// The port is closed: connections are refused.
    Refuse,
    /// Every request gets 503 Service Unavailable.
    Unavailable,
}

/// How many changes the fake remembers for watches that resume from a resourceVersion. Without
/// a bound, a benchmark's churn of 100-endpoint slices grew the test process by 45 MiB/s, and its
/// page faults slowed the load clients sharing the process.
const HISTORY_LIMIT: usize = 200;

/// One change in the history, replayed to watches that start from an older resourceVersion.
struct Change {
    rv: u64,
    kind: Kind,
    namespace: String,
    old: Option<Value>,
    new: Option<Value>,
}

/// An open watch stream.
struct Sink {
    kind: Kind,
    namespace: String,
    labels: String,
    fields: String,
    bookmarks: bool,
    tx: mpsc::UnboundedSender<Bytes>,
}

impl Sink {
    fn matches(&self, object: &Value) -> bool {
        matches(object, &self.labels, &self.fields)
    }
}

#[derive(Default)]
struct State {
    rv: u64,
    objects: BTreeMap<(Kind, String, String), Value>,
    history: Vec<Change>,
    /// Watches from a resourceVersion older than this get 410 Gone.
    expired_before: u64,
    token: Option<String>,
    fail_next: VecDeque<u16>,
    forbidden: Vec<Kind>,
    gone_next: u32,
    gone_as_http: bool,
    paused: Option<Pause>,
    sinks: Vec<Sink>,
    /// Nodes by name (cluster-scoped, get only).
    nodes: BTreeMap<String, Value>,
    nodes_forbidden: bool,
    node_gets: u64,
}

struct Inner {
    addr: SocketAddr,
    state: Mutex<State>,
    requests: AtomicU64,
    lists: AtomicU64,
    watches: AtomicU64,
    /// The accept loop; it owns every connection task, so aborting it closes them all.
    server: Mutex<Option<JoinHandle<()>>>,
}

/// A fake API server; stops when dropped.
pub struct FakeKube {
    inner: Arc<Inner>,
}

impl Drop for FakeKube {
    fn drop(&mut self) {
        if let Some(server) = self.inner.server.lock().unwrap().take() {
            server.abort();
        }
        self.inner.state.lock().unwrap().sinks.clear();
    }
}

impl FakeKube {
    /// Starts serving on 127.0.0.1:<random port>.
    pub async fn start() -> FakeKube {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let fake = FakeKube::new(listener.local_addr().unwrap());
        fake.serve(listener);
        fake
    }

    /// Reserves a port but refuses connections until [`FakeKube::resume`]: a cluster that is
    /// down when podgate starts.
    pub async fn start_paused() -> FakeKube {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let fake = FakeKube::new(listener.local_addr().unwrap());
        fake.inner.state.lock().unwrap().paused = Some(Pause::Refuse);
        drop(listener);
        fake
    }

    fn new(addr: SocketAddr) -> FakeKube {
        FakeKube {
            inner: Arc::new(Inner {
                addr,
                state: Mutex::new(State {
                    // Real servers never answer resourceVersion 0 or 1 for a list; start higher
                    // so that "0" (any version) is never confused with a real one.
                    rv: 100,
                    ..State::default()
                }),
                requests: AtomicU64::new(0),
                lists: AtomicU64::new(0),
                watches: AtomicU64::new(0),
                server: Mutex::new(None),
            }),
        }
    }

    fn serve(&self, listener: TcpListener) {
        let inner = Arc::clone(&self.inner);
        let task = tokio::spawn(async move {
            let mut connections = tokio::task::JoinSet::new();
            loop {
                while connections.try_join_next().is_some() {}
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let inner = Arc::clone(&inner);
                connections.spawn(async move {
                    let service = hyper::service::service_fn(move |req| {
                        let inner = Arc::clone(&inner);
                        async move { Ok::<_, Infallible>(inner.handle(req)) }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        *self.inner.server.lock().unwrap() = Some(task);
    }

    pub fn addr(&self) -> SocketAddr {
        self.inner.addr
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.inner.addr)
    }

    /// Writes a kubeconfig with cluster, user and context `fake` (the current context), whose
    /// user has `token` as bearer token, or no credentials.
    pub fn write_kubeconfig(&self, path: &Path, token: Option<&str>) {
        let user = match token {
            Some(token) => format!("{{token: {token}}}"),
            None => "{}".to_string(),
        };
        let text = format!(
            "apiVersion: v1\nkind: Config\nclusters:\n  - name: fake\n    cluster:\n      server: {}\n\
             users:\n  - name: fake-user\n    user: {user}\n\
             contexts:\n  - name: fake\n    context: {{cluster: fake, user: fake-user, namespace: default}}\n\
             current-context: fake\n",
            self.url()
        );
        std::fs::write(path, text).unwrap();
    }

    // ---- objects ----

    /// Creates or replaces a Service; returns its new resourceVersion.
    pub fn apply_service(&self, service: &Service) -> u64 {
        self.apply(Kind::Service, serde_json::to_value(service).unwrap())
    }

    /// Creates or replaces an EndpointSlice; returns its new resourceVersion.
    pub fn apply_slice(&self, slice: &EndpointSlice) -> u64 {
        self.apply(Kind::EndpointSlice, serde_json::to_value(slice).unwrap())
    }

    /// Creates or replaces an EndpointSlice given as JSON (as the API server would receive
    /// it), without a round trip through the typed object; returns its new resourceVersion.
    pub fn apply_slice_json(&self, slice: Value) -> u64 {
        self.apply(Kind::EndpointSlice, slice)
    }

    /// Creates or replaces a Pod; returns its new resourceVersion.
    pub fn apply_pod(&self, pod: &Pod) -> u64 {
        self.apply(Kind::Pod, serde_json::to_value(pod).unwrap())
    }

    pub fn delete_slice(&self, namespace: &str, name: &str) -> Option<u64> {
        self.delete(Kind::EndpointSlice, namespace, name)
    }

    pub fn delete_service(&self, namespace: &str, name: &str) -> Option<u64> {
        self.delete(Kind::Service, namespace, name)
    }

    pub fn delete_pod(&self, namespace: &str, name: &str) -> Option<u64> {
        self.delete(Kind::Pod, namespace, name)
    }

    fn apply(&self, kind: Kind, mut object: Value) -> u64 {
        let mut state = self.inner.state.lock().unwrap();
        state.rv += 1;
        let rv = state.rv;
        let meta = object
            .as_object_mut()
            .unwrap()
            .entry("metadata")
            .or_insert_with(|| json!({}));
        if meta.get("namespace").and_then(Value::as_str).is_none() {
            meta["namespace"] = json!("default");
        }
        meta["resourceVersion"] = json!(rv.to_string());
        object["apiVersion"] = json!(kind.api_version());
        object["kind"] = json!(kind.name());
        let namespace = object["metadata"]["namespace"]
            .as_str()
            .unwrap()
            .to_string();
        let name = object["metadata"]["name"]
            .as_str()
            .expect("objects need metadata.name")
            .to_string();
        let old = state
            .objects
            .insert((kind, namespace.clone(), name), object.clone());
        state.record(Change {
            rv,
            kind,
            namespace,
            old,
            new: Some(object),
        });
        rv
    }

    fn delete(&self, kind: Kind, namespace: &str, name: &str) -> Option<u64> {
        let mut state = self.inner.state.lock().unwrap();
        let mut old = state
            .objects
            .remove(&(kind, namespace.to_string(), name.to_string()))?;
        state.rv += 1;
        let rv = state.rv;
        // A DELETED event carries the object as last seen, at the deletion's resourceVersion.
        old["metadata"]["resourceVersion"] = json!(rv.to_string());
        state.record(Change {
            rv,
            kind,
            namespace: namespace.to_string(),
            old: Some(old),
            new: None,
        });
        Some(rv)
    }

    /// The latest resourceVersion handed out.
    pub fn resource_version(&self) -> u64 {
        self.inner.state.lock().unwrap().rv
    }

    // ---- scripting ----

    /// Requires `Authorization: Bearer <token>` from now on (`None`: anything goes); others get
    /// a 401 `Status`.
    pub fn set_auth(&self, token: Option<&str>) {
        self.inner.state.lock().unwrap().token = token.map(str::to_string);
    }

    /// The next `n` requests (lists or watches) get `status` with a `Status` body.
    pub fn fail_next(&self, n: usize, status: u16) {
        let mut state = self.inner.state.lock().unwrap();
        state.fail_next.extend(std::iter::repeat_n(status, n));
    }

    /// Answers 403 to every request for `kind` (as RBAC without that resource does) until
    /// called with `false`.
    pub fn forbid(&self, kind: Kind, forbidden: bool) {
        let mut state = self.inner.state.lock().unwrap();
        state.forbidden.retain(|k| *k != kind);
        if forbidden {
            state.forbidden.push(kind);
        }
    }

    /// Adds (or replaces) Node `name` with `labels`.
    pub fn apply_node(&self, name: &str, labels: &[(&str, &str)]) {
        let labels: BTreeMap<&str, &str> = labels.iter().copied().collect();
        let node = json!({
            "apiVersion": "v1", "kind": "Node",
            "metadata": {"name": name, "labels": labels, "resourceVersion": "1"},
        });
        let mut state = self.inner.state.lock().unwrap();
        state.nodes.insert(name.to_string(), node);
    }

    /// Answers 403 to node requests (a ClusterRole without `get` on `nodes`) while `true`.
    pub fn forbid_nodes(&self, forbidden: bool) {
        self.inner.state.lock().unwrap().nodes_forbidden = forbidden;
    }

    /// How many `GET /api/v1/nodes/{name}` requests were answered.
    pub fn node_gets(&self) -> u64 {
        self.inner.state.lock().unwrap().node_gets
    }

    /// Closes every open watch stream cleanly (as a server does at `timeoutSeconds`).
    pub fn drop_watches(&self) {
        self.inner.state.lock().unwrap().sinks.clear();
    }

    /// Forgets history older than `rv`: a watch from an older resourceVersion gets 410 Gone
    /// (as after an etcd compaction).
    pub fn expire(&self, rv: u64) {
        self.inner.state.lock().unwrap().expired_before = rv;
    }

    /// Sends an ERROR event with a 410 `Status` on every open watch and closes them.
    pub fn send_gone(&self) {
        let mut state = self.inner.state.lock().unwrap();
        let line = gone_line(state.rv);
        for sink in state.sinks.drain(..) {
            let _ = sink.tx.send(line.clone());
        }
    }

    /// The next `n` watch requests answer 410 Gone (an ERROR event, or HTTP 410 after
    /// [`FakeKube::gone_as_http`]).
    pub fn gone_next(&self, n: u32) {
        self.inner.state.lock().unwrap().gone_next = n;
    }

    /// Whether "410 Gone" answers to watch requests are an HTTP 410 (true) or, as real API
    /// servers do, a 200 with an ERROR event (false, the default).
    pub fn gone_as_http(&self, http: bool) {
        self.inner.state.lock().unwrap().gone_as_http = http;
    }

    /// Sends a BOOKMARK at the current resourceVersion on every open watch that allows them.
    pub fn send_bookmarks(&self) {
        let state = self.inner.state.lock().unwrap();
        for sink in &state.sinks {
            if sink.bookmarks {
                let line = event_line(
                    "BOOKMARK",
                    &json!({
                        "kind": sink.kind.name(),
                        "apiVersion": sink.kind.api_version(),
                        "metadata": {"resourceVersion": state.rv.to_string()},
                    }),
                );
                let _ = sink.tx.send(line);
            }
        }
    }

    /// An outage: the port is closed (connections refused) and every open connection, watches
    /// included, is cut.
    pub fn pause(&self) {
        self.inner.state.lock().unwrap().paused = Some(Pause::Refuse);
        if let Some(server) = self.inner.server.lock().unwrap().take() {
            server.abort();
        }
        self.inner.state.lock().unwrap().sinks.clear();
    }

    /// An outage that still answers: every request gets 503, open watches are closed.
    pub fn pause_unavailable(&self) {
        let mut state = self.inner.state.lock().unwrap();
        state.paused = Some(Pause::Unavailable);
        state.sinks.clear();
    }

    /// Ends an outage: accepts connections (on the same port) and answers again.
    pub async fn resume(&self) {
        let was = self.inner.state.lock().unwrap().paused.take();
        if was == Some(Pause::Refuse) && self.inner.server.lock().unwrap().is_none() {
            let listener = TcpListener::bind(self.inner.addr).await.unwrap();
            self.serve(listener);
        }
    }

    // ---- counters ----

    /// Every request received (answered or not).
    pub fn requests(&self) -> u64 {
        self.inner.requests.load(Ordering::SeqCst)
    }

    /// List requests answered with a list.
    pub fn lists(&self) -> u64 {
        self.inner.lists.load(Ordering::SeqCst)
    }

    /// Watch requests answered with a stream (including 410 ERROR streams).
    pub fn watches(&self) -> u64 {
        self.inner.watches.load(Ordering::SeqCst)
    }

    /// Watch streams open now.
    pub fn open_watches(&self) -> usize {
        let mut state = self.inner.state.lock().unwrap();
        state.sinks.retain(|s| !s.tx.is_closed());
        state.sinks.len()
    }
}

impl State {
    /// Appends to the history and tells every open watch that the change concerns.
    fn record(&mut self, change: Change) {
        self.sinks.retain(|sink| {
            if sink.kind != change.kind || sink.namespace != change.namespace {
                return true;
            }
            match watch_event(&change, |o| sink.matches(o)) {
                Some(line) => sink.tx.send(line).is_ok(),
                None => !sink.tx.is_closed(),
            }
        });
        self.history.push(change);
        if self.history.len() > HISTORY_LIMIT {
            // Like the API server's watch cache: a bounded window. Resuming from before the
            // oldest change kept gets 410 Gone (a relist), never a silent gap.
            let cut = self.history.len() - HISTORY_LIMIT;
            self.history.drain(..cut);
            self.expired_before = self.expired_before.max(self.history[0].rv - 1);
        }
    }
}

/// The event a watch whose selector is `matches` sees for `change`, if any.
fn watch_event(change: &Change, matches: impl Fn(&Value) -> bool) -> Option<Bytes> {
    let before = change.old.as_ref().filter(|o| matches(o));
    let after = change.new.as_ref().filter(|o| matches(o));
    match (before, after) {
        (None, Some(new)) => Some(event_line("ADDED", new)),
        (Some(_), Some(new)) => Some(event_line("MODIFIED", new)),
        (Some(old), None) => {
            // Left the selector (or was deleted): DELETED, with the change's resourceVersion.
            let mut old = old.clone();
            old["metadata"]["resourceVersion"] = json!(change.rv.to_string());
            Some(event_line("DELETED", &old))
        }
        (None, None) => None,
    }
}

/// One line of a watch stream. `type` comes first, as the API server writes it: a client reading
/// `object` first would have to buffer the whole object before it knows what to make of it.
fn event_line(kind: &str, object: &Value) -> Bytes {
    let mut line = format!("{{\"type\":\"{kind}\",\"object\":").into_bytes();
    serde_json::to_writer(&mut line, object).unwrap();
    line.extend_from_slice(b"}\n");
    Bytes::from(line)
}

fn status_json(code: u16, reason: &str, message: &str) -> Value {
    json!({
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": message,
        "reason": reason,
        "code": code,
    })
}

fn gone_line(rv: u64) -> Bytes {
    event_line(
        "ERROR",
        &status_json(
            410,
            "Expired",
            &format!("too old resource version: requested is older than {rv}"),
        ),
    )
}

fn status_response(code: u16, reason: &str, message: &str) -> Response<Body> {
    json_response(
        StatusCode::from_u16(code).unwrap(),
        &status_json(code, reason, message),
    )
}

fn json_response(status: StatusCode, body: &Value) -> Response<Body> {
    Response::builder()
        .status(status)
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(serde_json::to_vec(body).unwrap())).boxed())
        .unwrap()
}

fn reason_of(code: u16) -> &'static str {
    match code {
        401 => "Unauthorized",
        403 => "Forbidden",
        404 => "NotFound",
        410 => "Expired",
        429 => "TooManyRequests",
        503 => "ServiceUnavailable",
        500..=599 => "InternalError",
        _ => "BadRequest",
    }
}

impl Inner {
    fn handle(&self, req: Request<Incoming>) -> Response<Body> {
        self.requests.fetch_add(1, Ordering::SeqCst);
        let mut state = self.state.lock().unwrap();
        if state.paused == Some(Pause::Unavailable) {
            return status_response(503, "ServiceUnavailable", "the fake is paused");
        }
        if let Some(token) = &state.token {
            let sent = req
                .headers()
                .get("authorization")
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.strip_prefix("Bearer "));
            if sent != Some(token.as_str()) {
                return status_response(401, "Unauthorized", "Unauthorized");
            }
        }
        if let Some(code) = state.fail_next.pop_front() {
            return status_response(code, reason_of(code), &format!("scripted failure {code}"));
        }
        if req.method() != hyper::Method::GET {
            return status_response(405, "MethodNotAllowed", "the fake only serves GET");
        }
        let segments: Vec<&str> = req.uri().path().trim_matches('/').split('/').collect();
        if let ["api", "v1", "nodes", name] = segments.as_slice() {
            state.node_gets += 1;
            if state.nodes_forbidden {
                let message = format!(
                    "nodes \"{name}\" is forbidden: User \"system:serviceaccount:podgate:podgate\" \
                     cannot get resource \"nodes\" in API group \"\" at the cluster scope"
                );
                return status_response(403, "Forbidden", &message);
            }
            return match state.nodes.get(*name) {
                Some(node) => json_response(StatusCode::OK, node),
                None => status_response(404, "NotFound", &format!("nodes \"{name}\" not found")),
            };
        }
        let (kind, namespace) = match segments.as_slice() {
            ["api", "v1", "namespaces", ns, "services"] => (Kind::Service, *ns),
            ["api", "v1", "namespaces", ns, "pods"] => (Kind::Pod, *ns),
            ["apis", "discovery.k8s.io", "v1", "namespaces", ns, "endpointslices"] => {
                (Kind::EndpointSlice, *ns)
            }
            _ => {
                return status_response(
                    404,
                    "NotFound",
                    &format!("the fake does not serve {}", req.uri().path()),
                )
            }
        };
        if state.forbidden.contains(&kind) {
            return status_response(
                403,
                "Forbidden",
                &format!("{}s is forbidden: the fake's RBAC says no", kind.name()),
            );
        }
        let query = parse_query(req.uri().query().unwrap_or(""));
        let param = |k: &str| query.get(k).map(String::as_str).unwrap_or("");
        let labels = param("labelSelector").to_string();
        let fields = param("fieldSelector").to_string();
        if matches!(param("watch"), "true" | "1") {
            let timeout = param("timeoutSeconds").parse::<u64>().unwrap_or(1800);
            let sink = Sink {
                kind,
                namespace: namespace.to_string(),
                labels,
                fields,
                bookmarks: param("allowWatchBookmarks") == "true",
                tx: mpsc::unbounded_channel().0,
            };
            let from = param("resourceVersion").to_string();
            return self.watch(&mut state, sink, &from, Duration::from_secs(timeout));
        }
        self.lists.fetch_add(1, Ordering::SeqCst);
        let items: Vec<Value> = state
            .objects
            .iter()
            .filter(|((k, ns, _), o)| *k == kind && ns == namespace && matches(o, &labels, &fields))
            .map(|(_, o)| o.clone())
            .collect();
        json_response(
            StatusCode::OK,
            &json!({
                "kind": format!("{}List", kind.name()),
                "apiVersion": kind.api_version(),
                "metadata": {"resourceVersion": state.rv.to_string()},
                "items": items,
            }),
        )
    }

    fn watch(
        &self,
        state: &mut State,
        mut sink: Sink,
        from: &str,
        timeout: Duration,
    ) -> Response<Body> {
        let (tx, rx) = mpsc::unbounded_channel();
        sink.tx = tx;
        let from_rv: Option<u64> = match from {
            "" | "0" => None,
            v => match v.parse() {
                Ok(v) => Some(v),
                Err(_) => return status_response(400, "BadRequest", "bad resourceVersion"),
            },
        };
        let gone = state.gone_next > 0 || from_rv.is_some_and(|rv| rv < state.expired_before);
        if gone {
            state.gone_next = state.gone_next.saturating_sub(1);
            if state.gone_as_http {
                return status_response(410, "Expired", "too old resource version");
            }
            self.watches.fetch_add(1, Ordering::SeqCst);
            let _ = sink.tx.send(gone_line(state.rv));
            drop(sink);
            return stream_response(rx, timeout);
        }
        self.watches.fetch_add(1, Ordering::SeqCst);
        match from_rv {
            // "Any version": the current objects as ADDED, then changes.
            None => {
                for ((kind, ns, _), object) in &state.objects {
                    if *kind == sink.kind && *ns == sink.namespace && sink.matches(object) {
                        let _ = sink.tx.send(event_line("ADDED", object));
                    }
                }
            }
            Some(rv) => {
                for change in state.history.iter().filter(|c| c.rv > rv) {
                    if change.kind == sink.kind && change.namespace == sink.namespace {
                        if let Some(line) = watch_event(change, |o| sink.matches(o)) {
                            let _ = sink.tx.send(line);
                        }
                    }
                }
            }
        }
        state.sinks.push(sink);
        stream_response(rx, timeout)
    }
}

/// A chunked 200 answer carrying whatever is sent on `rx`, until every sender is gone or
/// `timeout` passes.
fn stream_response(rx: mpsc::UnboundedReceiver<Bytes>, timeout: Duration) -> Response<Body> {
    let deadline = tokio::time::Instant::now() + timeout;
    let stream = futures::stream::unfold(rx, move |mut rx| async move {
        match tokio::time::timeout_at(deadline, rx.recv()).await {
            Ok(Some(bytes)) => Some((Ok::<_, Infallible>(Frame::data(bytes)), rx)),
            _ => None,
        }
    });
    Response::builder()
        .status(StatusCode::OK)
        .header("content-type", "application/json")
        .body(BodyExt::boxed(StreamBody::new(stream)))
        .unwrap()
}

/// Whether `object` matches a label selector and a field selector (both possibly empty).
fn matches(object: &Value, labels: &str, fields: &str) -> bool {
    let meta = &object["metadata"];
    let label_ok = labels.split(',').filter(|t| !t.is_empty()).all(|term| {
        let get = |k: &str| meta["labels"][k.trim()].as_str().map(str::to_string);
        if let Some((k, v)) = term.split_once("!=") {
            get(k).as_deref() != Some(v.trim())
        } else if let Some((k, v)) = term.split_once("==").or_else(|| term.split_once('=')) {
            get(k).as_deref() == Some(v.trim())
        } else if let Some(k) = term.strip_prefix('!') {
            get(k).is_none()
        } else {
            get(term).is_some()
        }
    });
    let field_ok = fields.split(',').filter(|t| !t.is_empty()).all(|term| {
        let get = |k: &str| match k.trim() {
            "metadata.name" => meta["name"].as_str().map(str::to_string),
            "metadata.namespace" => meta["namespace"].as_str().map(str::to_string),
            other => panic!("the fake does not support field selector {other:?}"),
        };
        if let Some((k, v)) = term.split_once("!=") {
            get(k).as_deref() != Some(v.trim())
        } else if let Some((k, v)) = term.split_once("==").or_else(|| term.split_once('=')) {
            get(k).as_deref() == Some(v.trim())
        } else {
            panic!("bad field selector term {term:?}")
        }
    });
    label_ok && field_ok
}

/// `a=b&c=d` with `+` and `%XX` decoded.
fn parse_query(query: &str) -> BTreeMap<String, String> {
    query
        .split('&')
        .filter(|p| !p.is_empty())
        .map(|pair| {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            (decode(k), decode(v))
        })
        .collect()
}

fn decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < bytes.len() => {
                let hex = std::str::from_utf8(&bytes[i + 1..i + 3]).unwrap_or("");
                match u8::from_str_radix(hex, 16) {
                    Ok(b) => {
                        out.push(b);
                        i += 2;
                    }
                    Err(_) => out.push(b'%'),
                }
            }
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}
