//! How the semantic table runs: the gateway's config made from the rows, one request per row,
//! client protocol and Pod protocol, what came back and what reached the Pod written down as
//! named fields, and every field compared with the row's expectation or, where the row says
//! nothing, with the first protocol pair the row ran on.

use super::client::{Client, Listeners, GATEWAY_NAME};
use super::pod::{self, fnv, grpc_frame, pattern, AnyBody, Log};
use crate::support::{self, Gateway};
use bytes::Bytes;
use http_body_util::{BodyExt, Empty, StreamBody};
use hyper::body::Frame;
use std::collections::{BTreeMap, BTreeSet};

/// What the upstream's Pods speak.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum PodProto {
    Http1,
    H2c,
}

impl PodProto {
    pub const BOTH: &'static [PodProto] = &[PodProto::Http1, PodProto::H2c];

    fn key(self) -> &'static str {
        match self {
            PodProto::Http1 => "h1",
            PodProto::H2c => "h2c",
        }
    }
}

/// The upstream a row's route goes to (one of each per Pod protocol).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Up {
    /// `pod-a`.
    One,
    /// `pod-a`, with `host_header: backend.internal`.
    HostHeader,
    /// A dead address (connection refused) and `pod-b`, `retries: 1`, passive ejection off.
    /// With equal weights the smooth rotation of one worker thread sends a request that
    /// starts on the dead address on to `pod-b`, and so the next one to the dead address
    /// first again: most requests of the table take the retry.
    HalfDead,
    /// Only the dead address, `retries: 1`.
    Dead,
    /// A Service with no endpoint.
    Empty,
}

impl Up {
    fn key(self) -> &'static str {
        match self {
            Up::One => "one",
            Up::HostHeader => "over",
            Up::HalfDead => "half",
            Up::Dead => "dead",
            Up::Empty => "empty",
        }
    }
}

/// A request body.
#[derive(Clone, Copy, Debug)]
pub enum ReqBody {
    None,
    /// `n` bytes of [`pattern`] with their length (sent in 16 KiB pieces, as clients write: the
    /// `h2` crate sends one large buffer many times slower, 3.4 s for 5 MB here).
    Fixed(usize),
    /// `n` bytes of [`pattern`] in 16 KiB pieces without a length (chunked over HTTP/1.1).
    Streamed(usize),
    /// One gRPC message, with `content-type: application/grpc` and `te: trailers`, and no
    /// length (as gRPC clients send it).
    Grpc(&'static str),
}

/// A difference between protocols that podgate shows today: each of `clients` to each of `pods`
/// gives `got` for `field` where the row expects something else. The table fails if the
/// difference is gone on any of those pairs, so that the allowance is removed with it.
#[derive(Clone, Copy, Debug)]
pub struct Known {
    pub clients: &'static [Client],
    pub pods: &'static [PodProto],
    pub field: &'static str,
    pub got: &'static str,
    pub why: &'static str,
}

/// One case of the table. Strings may hold `{host}` (the row's own host for this Pod
/// protocol, `NAME.h1.test` or `NAME.h2c.test`), `{proto}` (`http` or `https`, by listener),
/// `{pattern:N}` (N bytes of [`pattern`] as field values show them) and `{made}` (a request id
/// podgate made up: not empty, the same in the answer and at the Pod, unique in the table).
#[derive(Clone, Copy, Debug)]
pub struct Row {
    /// Unique, a DNS label: also the first label of the row's host and its route's name.
    pub name: &'static str,
    pub clients: &'static [Client],
    pub pods: &'static [PodProto],
    pub upstream: Up,
    /// The route's `hosts`.
    pub hosts: &'static [&'static str],
    /// More keys of the route's YAML flow mapping (`path_prefix: /api, strip_prefix: true`),
    /// beside `name`, `hosts` and `upstream`: route policies go here.
    pub route: &'static str,
    /// Further routes of the row, with the same `hosts` and upstream.
    pub more_routes: &'static [&'static str],
    pub method: &'static str,
    /// Host (HTTP/1.1) or `:authority` (h2).
    pub host: &'static str,
    pub path: &'static str,
    pub headers: &'static [(&'static str, &'static str)],
    pub body: ReqBody,
    /// Expected fields, over the defaults (see `Combo::expected`); [`ABSENT`] for a field
    /// that must not be there; `("pod.count", "0")` for a request no Pod may see (then no
    /// field of the Pod's is expected).
    pub expect: &'static [(&'static str, &'static str)],
    pub known: &'static [Known],
}

/// The defaults of a row: a GET of `/` to `pod-a` on every protocol pair.
pub const ROW: Row = Row {
    name: "",
    clients: Client::ALL,
    pods: PodProto::BOTH,
    upstream: Up::One,
    hosts: &["{host}"],
    route: "path_prefix: /",
    more_routes: &[],
    method: "GET",
    host: "{host}",
    path: "/",
    headers: &[],
    body: ReqBody::None,
    expect: &[],
    known: &[],
};

pub const ABSENT: &str = "<absent>";
const MADE: &str = "<made up>";

/// Answer fields that depend on the hop, not on the gateway's decisions.
const HOP_FIELDS: &[&str] = &[
    "content-length",
    "transfer-encoding",
    "connection",
    "keep-alive",
    "date",
];

/// A body as a field value: short ones as text, long ones by length and hash.
fn show_body(b: &[u8]) -> String {
    if b.len() <= 200 {
        format!("\"{}\"", support::wire::show(b))
    } else {
        format!("{} bytes, fnv {:016x}", b.len(), fnv(b))
    }
}

/// One protocol pair of one row.
struct Combo {
    row: Row,
    client: Client,
    pod: PodProto,
}

impl Combo {
    fn label(&self) -> String {
        format!("{}: {:?} -> {:?} Pod", self.row.name, self.client, self.pod)
    }

    fn resolve(&self, s: &str) -> String {
        let host = format!("{}.{}.test", self.row.name, self.pod.key());
        let proto = if self.client.tls() { "https" } else { "http" };
        let mut out = s
            .replace("{host}", &host)
            .replace("{proto}", proto)
            .replace("{made}", MADE);
        while let Some(at) = out.find("{pattern:") {
            let end = at + out[at..].find('}').expect("{pattern:N} closed");
            let n: usize = out[at + 9..end].parse().expect("{pattern:N} is a number");
            out.replace_range(at..=end, &show_body(&pattern(n)));
        }
        out
    }

    fn fields(&self) -> Vec<(String, String)> {
        let mut f: Vec<(String, String)> = self
            .row
            .headers
            .iter()
            .map(|(k, v)| (k.to_string(), self.resolve(v)))
            .collect();
        if let ReqBody::Grpc(_) = self.row.body {
            f.push(("content-type".into(), "application/grpc".into()));
            f.push(("te".into(), "trailers".into()));
        }
        if let ReqBody::Fixed(n) = self.row.body {
            // The length the client declares; podgate writes its own framing to the Pod.
            f.push(("content-length".into(), n.to_string()));
        }
        f.push(("x-case".into(), self.case()));
        f
    }

    fn case(&self) -> String {
        format!("{}/{:?}/{:?}", self.row.name, self.client, self.pod)
    }

    fn sent_request_id(&self) -> Option<String> {
        self.row
            .headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case("x-request-id"))
            .map(|(_, v)| self.resolve(v))
    }

    fn body(&self) -> (AnyBody, Bytes) {
        let streamed = |bytes: Bytes, piece: usize| -> AnyBody {
            let frames: Vec<Result<Frame<Bytes>, std::convert::Infallible>> = (0..bytes.len())
                .step_by(piece)
                .map(|at| Ok(Frame::data(bytes.slice(at..(at + piece).min(bytes.len())))))
                .collect();
            BodyExt::boxed(StreamBody::new(futures::stream::iter(frames)))
        };
        match self.row.body {
            ReqBody::None => (Empty::new().boxed(), Bytes::new()),
            ReqBody::Fixed(n) | ReqBody::Streamed(n) => {
                (streamed(pattern(n), 16 * 1024), pattern(n))
            }
            ReqBody::Grpc(m) => {
                let f = Bytes::from(grpc_frame(m.as_bytes()));
                (streamed(f.clone(), f.len()), f)
            }
        }
    }

    /// What the row expects, over the defaults: a `200`, and where a Pod is reached (the
    /// default) exactly one request at it with the client's method, target and host, the
    /// protocol of the upstream, the forwarded fields, the request id and the body sent.
    fn expected(&self) -> BTreeMap<String, String> {
        let row = &self.row;
        let mut e = BTreeMap::new();
        let set = |e: &mut BTreeMap<String, String>, k: &str, v: String| {
            e.insert(k.to_string(), v);
        };
        set(&mut e, "status", "200".into());
        set(&mut e, "pod.count", "1".into());
        let rid = self.sent_request_id().unwrap_or_else(|| MADE.into());
        set(&mut e, "answer.x-request-id", rid.clone());
        let reaches = !row.expect.contains(&("pod.count", "0"));
        if reaches {
            let pod = if row.upstream == Up::HalfDead {
                "pod-b"
            } else {
                "pod-a"
            };
            let host = self.resolve(row.host);
            // Each field the client sent, repeated ones as one list (RFC 9110 §5.3).
            for (k, v) in self.fields() {
                if k != "x-case" && k != "content-length" {
                    e.entry(format!("pod.{}", k.to_ascii_lowercase()))
                        .and_modify(|s: &mut String| *s = format!("{s}, {v}"))
                        .or_insert(v);
                }
            }
            set(&mut e, "pod.name", pod.into());
            set(&mut e, "answer.x-pod", pod.into());
            let version = match self.pod {
                PodProto::Http1 => "HTTP/1.1",
                PodProto::H2c => "HTTP/2.0",
            };
            set(&mut e, "pod.version", version.into());
            set(&mut e, "pod.method", row.method.into());
            set(&mut e, "pod.target", self.resolve(row.path));
            let authority = if row.upstream == Up::HostHeader {
                "backend.internal".to_string()
            } else {
                host.clone()
            };
            set(&mut e, "pod.authority", authority);
            set(&mut e, "pod.x-forwarded-for", "127.0.0.1".into());
            set(&mut e, "pod.x-forwarded-proto", self.resolve("{proto}"));
            set(&mut e, "pod.x-forwarded-host", host.to_ascii_lowercase());
            set(&mut e, "pod.x-request-id", rid);
            set(&mut e, "pod.body", show_body(&self.body().1));
        }
        for (k, v) in row.expect {
            set(&mut e, k, self.resolve(v));
        }
        e
    }

    async fn run(&self, at: &Listeners, log: &Log) -> BTreeMap<String, String> {
        let row = &self.row;
        let (body, _) = self.body();
        let fields = self.fields();
        let host = self.resolve(row.host);
        let path = self.resolve(row.path);
        let mut o = BTreeMap::new();
        match at
            .send(self.client, row.method, &host, &path, &fields, body)
            .await
        {
            Err(e) => {
                o.insert("status".into(), format!("no answer: {e}"));
            }
            Ok(a) => {
                o.insert("status".into(), a.status.to_string());
                let framing = match (
                    a.headers.get("content-length"),
                    a.headers.get("transfer-encoding"),
                ) {
                    (Some(n), _) => format!("length {}", n.to_str().unwrap_or("?")),
                    (None, Some(_)) => "streamed".into(),
                    // No body to frame (RFC 9110 §6.4.1).
                    (None, None) if a.status == 204 || a.status == 304 || row.method == "HEAD" => {
                        "none".into()
                    }
                    (None, None) if self.client.h2() => "streamed".into(),
                    (None, None) => "until close".into(),
                };
                o.insert("answer.framing".into(), framing);
                for (name, v) in &a.headers {
                    if HOP_FIELDS.contains(&name.as_str()) {
                        continue;
                    }
                    let v = String::from_utf8_lossy(v.as_bytes()).into_owned();
                    let slot = o
                        .entry(format!("answer.{name}"))
                        .or_insert_with(String::new);
                    if !slot.is_empty() {
                        slot.push_str(", ");
                    }
                    slot.push_str(&v);
                }
                for (name, v) in a.trailers.iter().flatten() {
                    let v = String::from_utf8_lossy(v.as_bytes()).into_owned();
                    o.insert(format!("trailer.{name}"), v);
                }
                o.insert("answer.body".into(), show_body(&a.body));
                if let Ok(json) = serde_json::from_slice::<serde_json::Value>(&a.body) {
                    if let Some(err) = json.get("error").and_then(|e| e.as_str()) {
                        o.insert("answer.error".into(), err.to_string());
                    }
                }
            }
        }
        let seen = log
            .lock()
            .unwrap()
            .get(&self.case())
            .cloned()
            .unwrap_or_default();
        o.insert("pod.count".into(), seen.len().to_string());
        if let Some(s) = seen.first() {
            o.insert("pod.name".into(), s.pod.clone());
            o.insert("pod.version".into(), s.version.clone());
            o.insert("pod.method".into(), s.method.clone());
            o.insert("pod.target".into(), s.target.clone());
            o.insert("pod.authority".into(), s.authority.clone());
            o.insert("pod.framing".into(), s.framing.clone());
            o.insert("pod.body".into(), show_body(&s.body));
            for (k, v) in &s.fields {
                if ["content-length", "transfer-encoding", "x-case"].contains(&k.as_str()) {
                    continue;
                }
                let slot = o.entry(format!("pod.{k}")).or_insert_with(String::new);
                if !slot.is_empty() {
                    slot.push_str(", ");
                }
                slot.push_str(v);
            }
        }
        o
    }
}

/// Request ids podgate made up: the answer's, unless the client sent one, becomes [`MADE`]
/// where it is not empty, and the Pod's too where it is the answer's. Returns the made-up id.
fn normalise_request_id(o: &mut BTreeMap<String, String>, sent: bool) -> Option<String> {
    if sent {
        return None;
    }
    let answer = o
        .get("answer.x-request-id")
        .cloned()
        .filter(|v| !v.is_empty())?;
    o.insert("answer.x-request-id".into(), MADE.into());
    if o.get("pod.x-request-id") == Some(&answer) {
        o.insert("pod.x-request-id".into(), MADE.into());
    }
    Some(answer)
}

/// The gateway, its Pods and its config, for a table of rows.
pub struct Table {
    _gateway: Gateway,
    _dead: tokio::net::TcpSocket,
    _pods: Vec<pod::EchoPod>,
    listeners: Listeners,
    log: Log,
}

impl Table {
    pub async fn start(rows: &[Row]) -> Table {
        let log = Log::default();
        let pods = vec![
            pod::start("pod-a", log.clone()).await,
            pod::start("pod-b", log.clone()).await,
        ];
        let (a, b) = (pods[0].addr, pods[1].addr);
        // Bound but never listening: connections to it are refused, and no other test can
        // take the port while the table runs.
        let dead_socket = tokio::net::TcpSocket::new_v4().unwrap();
        dead_socket.bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let dead = dead_socket.local_addr().unwrap();
        let mut conf =
            String::from("clusters:\n  - {name: local, manifests: cluster}\nupstreams:\n");
        for p in PodProto::BOTH {
            let (k, proto) = match p {
                PodProto::Http1 => ("h1", "http1"),
                PodProto::H2c => ("h2c", "h2c"),
            };
            conf.push_str(&format!(
                "  - {{name: one-{k}, protocol: {proto}, nodes: [{{address: \"{a}\"}}]}}\n\
                 \x20 - {{name: over-{k}, protocol: {proto}, host_header: backend.internal, nodes: [{{address: \"{a}\"}}]}}\n\
                 \x20 - {{name: half-{k}, protocol: {proto}, retries: 1, outlier: {{consecutive_failures: 0}}, \
                 nodes: [{{address: \"{dead}\"}}, {{address: \"{b}\"}}]}}\n\
                 \x20 - {{name: dead-{k}, protocol: {proto}, retries: 1, nodes: [{{address: \"{dead}\"}}]}}\n\
                 \x20 - {{name: empty-{k}, protocol: {proto}, services: [{{cluster: local, service: empty, port: 8000}}]}}\n"
            ));
        }
        conf.push_str("routes:\n");
        let mut names = BTreeSet::new();
        for row in rows {
            assert!(names.insert(row.name), "two rows are named {}", row.name);
            for &pod in row.pods {
                let c = Combo {
                    row: *row,
                    client: Client::Http1,
                    pod,
                };
                let hosts: Vec<String> = row
                    .hosts
                    .iter()
                    .map(|h| format!("\"{}\"", c.resolve(h)))
                    .collect();
                let up = format!("{}-{}", row.upstream.key(), pod.key());
                let routes = std::iter::once(row.route).chain(row.more_routes.iter().copied());
                for (i, keys) in routes.enumerate() {
                    conf.push_str(&format!(
                        "  - {{name: {}-{}-{i}, hosts: [{}], {keys}, upstream: {up}}}\n",
                        row.name,
                        pod.key(),
                        hosts.join(", ")
                    ));
                }
            }
        }
        let dir = tempfile::tempdir().unwrap();
        let pki = support::make_pki(dir.path(), "gw", &[GATEWAY_NAME]);
        let manifests = format!(
            "{}---\n{}",
            support::service_yaml("empty"),
            support::slice_yaml("empty-1", "empty", 80, &[])
        );
        std::fs::create_dir_all(dir.path().join("cluster")).unwrap();
        std::fs::write(dir.path().join("cluster/all.yaml"), manifests).unwrap();
        let tls = format!(
            "tls: {{cert: {}, key: {}}}",
            pki.cert_pem.display(),
            pki.key_pem.display()
        );
        let tls_h1 = support::tls_connector(&pki.ca_pem, &[b"http/1.1"]);
        let tls_h2 = support::tls_connector(&pki.ca_pem, &[b"h2"]);
        let gateway = Gateway::start_listeners(dir, &["", &tls, "h2c: true"], &conf).await;
        let listeners = Listeners {
            plain: gateway.addrs[0],
            tls: gateway.addrs[1],
            h2c: gateway.addrs[2],
            tls_h1,
            tls_h2,
        };
        Table {
            _gateway: gateway,
            _dead: dead_socket,
            _pods: pods,
            listeners,
            log,
        }
    }

    /// Runs every row on each of its protocol pairs (the pairs of a row at once) and fails
    /// with every difference found, after the whole table.
    pub async fn run(&self, rows: &[Row]) {
        let mut failures = Vec::new();
        let mut made = BTreeMap::new();
        for row in rows {
            let combos: Vec<Combo> = row
                .clients
                .iter()
                .flat_map(|&client| {
                    row.pods.iter().map(move |&pod| Combo {
                        row: *row,
                        client,
                        pod,
                    })
                })
                .collect();
            let started = std::time::Instant::now();
            let runs = combos.iter().map(|c| c.run(&self.listeners, &self.log));
            let mut outcomes = futures::future::join_all(runs).await;
            eprintln!("{}: {:?}", row.name, started.elapsed());
            // SEMANTICS_SHOW=ROW prints what each pair of that row gave (for writing rows).
            if std::env::var("SEMANTICS_SHOW").is_ok_and(|v| v == row.name) {
                for (c, o) in combos.iter().zip(&outcomes) {
                    eprintln!("{}:\n{o:#?}", c.label());
                }
            }
            for (c, o) in combos.iter().zip(outcomes.iter_mut()) {
                if let Some(id) = normalise_request_id(o, c.sent_request_id().is_some()) {
                    if let Some(other) = made.insert(id.clone(), c.label()) {
                        failures.push(format!(
                            "{}: request id {id} also made for {other}",
                            c.label()
                        ));
                    }
                }
            }
            let mut used: BTreeSet<(usize, Client, PodProto)> = BTreeSet::new();
            for (i, (c, o)) in combos.iter().zip(&outcomes).enumerate() {
                let expected = c.expected();
                let reference = &outcomes[0];
                let keys: BTreeSet<&String> = expected
                    .keys()
                    .chain(reference.keys())
                    .chain(o.keys())
                    .collect();
                for key in keys {
                    let (want, from) = match expected.get(key) {
                        Some(w) => (w.as_str(), "the row".to_string()),
                        None if i == 0 => continue,
                        None => (
                            reference.get(key).map_or(ABSENT, String::as_str),
                            combos[0].label(),
                        ),
                    };
                    let got = o.get(key).map_or(ABSENT, String::as_str);
                    let known = row.known.iter().position(|k| {
                        k.clients.contains(&c.client) && k.pods.contains(&c.pod) && k.field == key
                    });
                    match known {
                        Some(k) => {
                            used.insert((k, c.client, c.pod));
                            let k = row.known[k];
                            if got == want {
                                failures.push(format!(
                                    "{}: {key} is now {got:?} as expected: remove the known difference ({})",
                                    c.label(),
                                    k.why
                                ));
                            } else if got != k.got {
                                failures.push(format!(
                                    "{}: {key} is {got:?}, neither {want:?} ({from}) nor the known {:?}",
                                    c.label(),
                                    k.got
                                ));
                            }
                        }
                        None if got != want => failures.push(format!(
                            "{}: {key} is {got:?}, want {want:?} ({from})",
                            c.label()
                        )),
                        None => {}
                    }
                }
            }
            for (i, k) in row.known.iter().enumerate() {
                for &client in k.clients {
                    for &pod in k.pods {
                        if !used.contains(&(i, client, pod)) {
                            failures.push(format!(
                                "{}: {client:?} -> {pod:?} Pod: known difference in {} not checked",
                                row.name, k.field
                            ));
                        }
                    }
                }
            }
        }
        assert!(
            failures.is_empty(),
            "{} differences:\n{}",
            failures.len(),
            failures.join("\n")
        );
    }
}
