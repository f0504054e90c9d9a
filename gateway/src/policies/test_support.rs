//! What the policy tests share: a config read by the real loader from files in a temp folder,
//! requests seen through both forms of [`Fields`] (HTTP/1.1 lines and an h2 map), and real keys
//! made in the test (RSA by the `rsa` crate, since ring cannot generate RSA keys; EC and Ed25519
//! by ring), with tokens signed through jsonwebtoken.

use super::{Edits, Fields, Identities, LocalAnswer, Policies, RequestView, Verdict};
use crate::config::{self, Config};
use base64::Engine;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use ring::signature::KeyPair;
use std::net::IpAddr;
use std::ops::Range;
use std::sync::{Arc, LazyLock};
use std::time::{Duration, Instant};

pub const HEAD: &str = "listeners: [{address: \"127.0.0.1:8080\"}]\n\
    upstreams: [{name: u, nodes: [{address: \"127.0.0.1:9\"}]}]\n";

pub fn b64(bytes: &[u8]) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
}

/// A signing key and its public JWK.
pub struct TestKey {
    pub alg: Algorithm,
    pub encoding: EncodingKey,
    pub jwk: serde_json::Value,
}

impl TestKey {
    pub fn with_kid(&self, kid: &str) -> serde_json::Value {
        let mut jwk = self.jwk.clone();
        jwk["kid"] = kid.into();
        jwk
    }
}

fn rsa_key() -> TestKey {
    use rsa::pkcs1::EncodeRsaPrivateKey;
    use rsa::traits::PublicKeyParts;
    let key = rsa::RsaPrivateKey::new(&mut rsa::rand_core::OsRng, 2048).expect("RSA key");
    let der = key.to_pkcs1_der().expect("PKCS#1");
    TestKey {
        alg: Algorithm::RS256,
        encoding: EncodingKey::from_rsa_der(der.as_bytes()),
        jwk: serde_json::json!({
            "kty": "RSA",
            "n": b64(&key.n().to_bytes_be()),
            "e": b64(&key.e().to_bytes_be()),
        }),
    }
}

/// Two RSA keys (generating one takes a while: made once per test binary).
pub static RSA: LazyLock<[TestKey; 2]> = LazyLock::new(|| [rsa_key(), rsa_key()]);

pub fn ec_key() -> TestKey {
    use ring::signature::{EcdsaKeyPair, ECDSA_P256_SHA256_FIXED_SIGNING as ALG};
    let rng = ring::rand::SystemRandom::new();
    let pkcs8 = EcdsaKeyPair::generate_pkcs8(&ALG, &rng).unwrap();
    let pair = EcdsaKeyPair::from_pkcs8(&ALG, pkcs8.as_ref(), &rng).unwrap();
    let point = pair.public_key().as_ref();
    TestKey {
        alg: Algorithm::ES256,
        encoding: EncodingKey::from_ec_der(pkcs8.as_ref()),
        jwk: serde_json::json!({
            "kty": "EC", "crv": "P-256", "x": b64(&point[1..33]), "y": b64(&point[33..]),
        }),
    }
}

pub fn ed_key() -> TestKey {
    use ring::signature::Ed25519KeyPair;
    let pkcs8 = Ed25519KeyPair::generate_pkcs8(&ring::rand::SystemRandom::new()).unwrap();
    let pair = Ed25519KeyPair::from_pkcs8(pkcs8.as_ref()).unwrap();
    TestKey {
        alg: Algorithm::EdDSA,
        encoding: EncodingKey::from_ed_der(pkcs8.as_ref()),
        jwk: serde_json::json!({
            "kty": "OKP", "crv": "Ed25519", "x": b64(pair.public_key().as_ref()),
        }),
    }
}

pub fn jwks(keys: &[serde_json::Value]) -> Vec<u8> {
    serde_json::to_vec(&serde_json::json!({ "keys": keys })).unwrap()
}

pub fn now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

/// A token signed by `key` (kid `kid` if given) with `claims`.
pub fn token(key: &TestKey, kid: Option<&str>, claims: &serde_json::Value) -> String {
    super::jwt_crypto::install();
    let mut header = Header::new(key.alg);
    header.kid = kid.map(String::from);
    jsonwebtoken::encode(&header, claims, &key.encoding).unwrap()
}

/// A config read by the real loader, its files written first into a temp folder.
pub struct Fixture {
    pub dir: tempfile::TempDir,
    pub config: Config,
    pub identities: Arc<Identities>,
}

impl Fixture {
    pub fn new(yaml: &str, files: &[(&str, &[u8])]) -> Fixture {
        let dir = tempfile::tempdir().unwrap();
        for (name, bytes) in files {
            std::fs::write(dir.path().join(name), bytes).unwrap();
        }
        let text = format!("{HEAD}{yaml}");
        let config = match config::parse("t.yaml", &text, dir.path()) {
            Ok(c) => c,
            Err(e) => panic!("{e}\n{text}"),
        };
        let identities = Identities::start(&config);
        Fixture {
            dir,
            config,
            identities,
        }
    }

    /// The policies of the route named `name`.
    pub fn route(&self, name: &str) -> Policies {
        let route = self.config.routes.iter().find(|r| r.name == name).unwrap();
        Policies::build(route, &self.identities)
    }

    /// Rewrites a file of the folder the way Kubernetes and editors do: a new file renamed in.
    pub fn replace(&self, name: &str, bytes: &[u8]) {
        let tmp = self.dir.path().join(format!(".{name}.tmp"));
        std::fs::write(&tmp, bytes).unwrap();
        std::fs::rename(&tmp, self.dir.path().join(name)).unwrap();
    }
}

/// The errors of a config that must not load, as one text.
pub fn config_errors(yaml: &str, files: &[(&str, &[u8])]) -> String {
    let dir = tempfile::tempdir().unwrap();
    for (name, bytes) in files {
        std::fs::write(dir.path().join(name), bytes).unwrap();
    }
    let text = format!("{HEAD}{yaml}");
    config::parse("t.yaml", &text, dir.path())
        .expect_err("the config should be refused")
        .to_string()
}

/// A request to run through policies.
#[derive(Clone)]
pub struct Req {
    pub method: http::Method,
    pub host: &'static str,
    pub path: String,
    pub headers: Vec<(String, String)>,
    pub peer: IpAddr,
    pub client: Option<IpAddr>,
    pub tls: bool,
    pub content_length: Option<u64>,
}

pub fn get(path: &str) -> Req {
    Req {
        method: http::Method::GET,
        host: "api.example.com",
        path: path.into(),
        headers: Vec::new(),
        peer: "192.0.2.10".parse().unwrap(),
        client: Some("192.0.2.10".parse().unwrap()),
        tls: false,
        content_length: None,
    }
}

impl Req {
    pub fn header(mut self, name: &str, value: &str) -> Req {
        self.headers.push((name.into(), value.into()));
        self
    }
}

/// What the policies decided, with the edits.
pub struct Outcome {
    pub answer: Option<LocalAnswer>,
    pub edits: Edits,
}

impl Outcome {
    pub fn status(&self) -> Option<u16> {
        self.answer.as_ref().map(|a| a.status)
    }

    /// The values of answer field `name`: of the local answer, else of `response_add`.
    pub fn answer_field(&self, name: &str) -> Vec<String> {
        let fields = match &self.answer {
            Some(a) => a
                .headers
                .iter()
                .chain(&self.edits.response_add)
                .collect::<Vec<_>>(),
            None => self.edits.response_add.iter().collect(),
        };
        fields
            .into_iter()
            .filter(|(n, _)| n.as_str() == name)
            .map(|(_, v)| v.to_str().unwrap().to_string())
            .collect()
    }

    /// Values added toward the Pod under `name`.
    pub fn added(&self, name: &str) -> Vec<String> {
        let adds = self.edits.add.iter().filter(|(n, _)| n.as_str() == name);
        adds.map(|(_, v)| v.to_str().unwrap().to_string()).collect()
    }

    pub fn removes(&self, name: &str) -> bool {
        self.edits.remove.iter().any(|n| n.as_str() == name)
    }
}

pub fn run_with(p: &Policies, r: &Req, fields: Fields<'_>) -> Outcome {
    let view = RequestView {
        method: &r.method,
        host: r.host,
        path_and_query: &r.path,
        fields,
        peer: Some(r.peer),
        client: r.client,
        tls: r.tls,
        grpc: false,
        content_length: r.content_length,
    };
    let mut edits = Edits::default();
    let answer = match futures::executor::block_on(p.on_request(&view, &mut edits)) {
        Verdict::Continue => None,
        Verdict::Answer(a) => Some(a),
    };
    Outcome { answer, edits }
}

/// Runs `r` through `p` as HTTP/1.1 lines and as an h2 map; checks both agree on the answer
/// and on what goes to the Pod, and returns the first.
pub fn run(p: &Policies, r: &Req) -> Outcome {
    let mut raw = Vec::new();
    let mut ranges: Vec<(Range<usize>, Range<usize>)> = Vec::new();
    let mut map = http::HeaderMap::new();
    for (n, v) in &r.headers {
        let start = raw.len();
        raw.extend_from_slice(n.as_bytes());
        let name = start..raw.len();
        raw.extend_from_slice(b": ");
        let vstart = raw.len();
        raw.extend_from_slice(v.as_bytes());
        ranges.push((name, vstart..raw.len()));
        raw.extend_from_slice(b"\r\n");
        map.append(
            http::HeaderName::from_bytes(n.to_ascii_lowercase().as_bytes()).unwrap(),
            http::HeaderValue::from_str(v).unwrap(),
        );
    }
    let as_lines = || {
        run_with(
            p,
            r,
            Fields::Lines {
                raw: &raw,
                ranges: &ranges,
            },
        )
    };
    // A watched file (keys, JWKS) can be swapped in between the two views while a test waits
    // for a rotation: a disagreement is looked at again (twice at most) before it counts.
    let mut tries = 0;
    let (lines, h2) = loop {
        let lines = as_lines();
        let h2 = run_with(p, r, Fields::Map(&map));
        tries += 1;
        if lines.status() == h2.status() || tries == 3 {
            break (lines, h2);
        }
    };
    assert_eq!(
        lines.status(),
        h2.status(),
        "HTTP/1.1 and h2 views disagree"
    );
    assert_eq!(format!("{:?}", lines.edits), format!("{:?}", h2.edits));
    assert_eq!(format!("{:?}", lines.answer), format!("{:?}", h2.answer));
    lines
}

/// Waits for `ok` with a deadline (file reloads happen on another thread).
pub fn wait_for(what: &str, mut ok: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !ok() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(10));
    }
}
