//! JWT providers: a provider's keys, the checks a bearer token must pass, and the per-thread
//! cache of tokens that passed.
//!
//! Checks (jsonwebtoken over ring, see `jwt_crypto.rs`): the header's `alg` must be one the
//! chosen key allows — public keys from the JWKS allow their own family only (RS*/PS*, ES256,
//! ES384, EdDSA), the HS* algorithms exist only with `secret_file` — so `alg: none` and
//! algorithm confusion (an RS256 public key used as an HS256 secret) find no key. Then the
//! signature, `exp` (required) and `nbf` with the provider's leeway, `iss` and `aud` when
//! configured; a claim of the wrong JSON type is refused, not skipped.
//!
//! Cache: a token that passed is kept, per worker thread (no lock on the request path), under a
//! SHA-256 of the token (truncated to 128 bits; the token itself is not kept) and the identity of
//! the key set that verified it, until its `exp` plus leeway. A reloaded JWKS is a new key set,
//! so a rotation also retires every cached verification by the old keys. Bounded at
//! [`CACHE_CAP`] entries per thread: when full, expired entries go, and if that frees too little
//! the whole cache is dropped (a refill costs one verification per live token).

use crate::config::policy_files::{read_jwks, read_secret, JwtKey};
use crate::config::JwtProviderConf;
use crate::telemetry::metrics;
use arc_swap::ArcSwap;
use http::{HeaderName, HeaderValue};
use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::{Algorithm, AlgorithmFamily, DecodingKey, Validation};
use std::cell::RefCell;
use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

/// Most verified tokens one worker thread keeps.
pub const CACHE_CAP: usize = 4096;
/// Longest token looked at; longer ones are refused unread.
pub const MAX_TOKEN_LEN: usize = 16 << 10;
/// Keys tried for a token without `kid`.
const MAX_TRIES: usize = 8;

/// What a token that passed gives the request.
#[derive(Debug)]
pub struct Verified {
    pub exp: u64,
    pub consumer: Option<Arc<str>>,
    /// `claims_to_headers`, toward the Pod.
    pub headers: Vec<(HeaderName, HeaderValue)>,
}

/// Why a token was refused, as said in `WWW-Authenticate`'s `error_description` (never the
/// token or its claims).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TokenError {
    Malformed,
    Algorithm,
    UnknownKey,
    Signature,
    Expired,
    NotYetValid,
    Audience,
    Issuer,
    MissingClaim,
    Consumer,
}

impl TokenError {
    pub fn description(self) -> &'static str {
        match self {
            TokenError::Malformed => "the token is malformed",
            TokenError::Algorithm => "the token's algorithm is not accepted",
            TokenError::UnknownKey => "no key of the issuer matches the token",
            TokenError::Signature => "the signature is invalid",
            TokenError::Expired => "the token has expired",
            TokenError::NotYetValid => "the token is not valid yet",
            TokenError::Audience => "the token is not meant for this audience",
            TokenError::Issuer => "the token's issuer is not accepted",
            TokenError::MissingClaim => "the token lacks a required claim",
            TokenError::Consumer => "the token names no consumer",
        }
    }

    /// Claim checks come after the signature: such an error says the key was right.
    fn after_signature(self) -> bool {
        !matches!(
            self,
            TokenError::Malformed
                | TokenError::Algorithm
                | TokenError::UnknownKey
                | TokenError::Signature
        )
    }
}

struct Key {
    kid: Option<String>,
    algorithms: Vec<Algorithm>,
    key: DecodingKey,
    validation: Validation,
}

/// The keys in force, swapped whole on a reload.
struct KeySet {
    /// Unique in the process: part of every cache key.
    id: u64,
    keys: Vec<Key>,
}

/// The last good content of each file, kept by the watch thread.
#[derive(Default)]
struct Parts {
    jwks: Vec<JwtKey>,
    secret: Option<Vec<u8>>,
}

pub struct JwtProvider {
    pub conf: Arc<JwtProviderConf>,
    keys: ArcSwap<KeySet>,
    /// Background only (build, watch thread); the request path reads `keys`.
    parts: Mutex<Parts>,
    /// Configured consumer names, so that a claim naming one shares its `Arc`.
    consumers: Vec<Arc<str>>,
}

impl std::fmt::Debug for JwtProvider {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let keys = self.keys.load();
        write!(
            f,
            "JwtProvider({}, {} keys)",
            self.conf.name,
            keys.keys.len()
        )
    }
}

fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

impl JwtProvider {
    /// Reads the provider's files now; one that cannot be read is logged and left out (the
    /// config check read it moments ago, and the watch picks it up when it is back).
    pub fn new(conf: Arc<JwtProviderConf>, consumers: &[Arc<str>]) -> Arc<JwtProvider> {
        super::jwt_crypto::install();
        let p = JwtProvider {
            conf,
            keys: ArcSwap::from_pointee(KeySet {
                id: 0,
                keys: Vec::new(),
            }),
            parts: Mutex::default(),
            consumers: consumers.to_vec(),
        };
        let files: Vec<PathBuf> = p.files();
        p.reload(&files);
        Arc::new(p)
    }

    /// The files this provider reads.
    pub fn files(&self) -> Vec<PathBuf> {
        self.conf
            .jwks_file
            .iter()
            .chain(&self.conf.secret_file)
            .cloned()
            .collect()
    }

    /// Re-reads those of its files that are in `changed`; a file that became unreadable or
    /// invalid keeps its last good keys (logged, and counted in
    /// `podgate_policy_file_reloads_total{result="failure"}`).
    pub fn reload(&self, changed: &[PathBuf]) {
        let name = &*self.conf.name;
        let mut parts = self.parts.lock().unwrap_or_else(|p| p.into_inner());
        let mut applied = false;
        if let Some(f) = self.conf.jwks_file.as_ref().filter(|f| changed.contains(f)) {
            match read_jwks(f) {
                Ok(jwks) => {
                    for note in &jwks.skipped {
                        log::warn!("jwt provider {name}: {}: key left out: {note}", f.display());
                    }
                    log::info!(
                        "jwt provider {name}: {} key(s) from {}",
                        jwks.keys.len(),
                        f.display()
                    );
                    parts.jwks = jwks.keys;
                    applied = true;
                    metrics::policy_file_reload("jwks", name, true);
                }
                Err(e) => {
                    log::error!(
                        "jwt provider {name}: {e}; keeping the {} key(s) read before",
                        parts.jwks.len()
                    );
                    metrics::policy_file_reload("jwks", name, false);
                }
            }
        }
        if let Some(f) = self
            .conf
            .secret_file
            .as_ref()
            .filter(|f| changed.contains(f))
        {
            match read_secret(f) {
                Ok(secret) => {
                    parts.secret = Some(secret);
                    applied = true;
                    metrics::policy_file_reload("secret", name, true);
                }
                Err(e) => {
                    let kept = if parts.secret.is_some() {
                        "the secret read before"
                    } else {
                        "no secret"
                    };
                    log::error!("jwt provider {name}: {e}; keeping {kept}");
                    metrics::policy_file_reload("secret", name, false);
                }
            }
        }
        if applied {
            self.keys.store(Arc::new(self.key_set(&parts)));
        }
    }

    fn key_set(&self, parts: &Parts) -> KeySet {
        static NEXT: AtomicU64 = AtomicU64::new(1);
        let validation = |algorithms: &[Algorithm]| {
            let mut v = Validation::new(algorithms[0]);
            v.algorithms = algorithms.to_vec();
            v.leeway = self.conf.leeway.as_secs();
            v.validate_exp = true;
            v.validate_nbf = true;
            v.set_required_spec_claims(&["exp"]);
            if let Some(iss) = &self.conf.issuer {
                v.set_issuer(&[iss]);
                v.required_spec_claims.insert("iss".into());
            }
            v.validate_aud = !self.conf.audiences.is_empty();
            if v.validate_aud {
                v.set_audience(&self.conf.audiences);
                v.required_spec_claims.insert("aud".into());
            }
            v
        };
        let mut keys: Vec<Key> = parts
            .jwks
            .iter()
            .map(|k| Key {
                kid: k.kid.clone(),
                validation: validation(&k.algorithms),
                algorithms: k.algorithms.clone(),
                key: k.key.clone(),
            })
            .collect();
        if let Some(secret) = &parts.secret {
            let hs = [Algorithm::HS256, Algorithm::HS384, Algorithm::HS512];
            if let Ok(key) = DecodingKey::from_secret(secret) {
                keys.push(Key {
                    kid: None,
                    validation: validation(&hs),
                    algorithms: hs.to_vec(),
                    key,
                });
            }
        }
        KeySet {
            id: NEXT.fetch_add(1, Ordering::Relaxed),
            keys,
        }
    }

    /// Checks a bearer token (from the cache when this thread verified it before).
    pub fn verify(&self, token: &str) -> Result<Arc<Verified>, TokenError> {
        if token.len() > MAX_TOKEN_LEN {
            return Err(TokenError::Malformed);
        }
        let set = self.keys.load();
        let now = now();
        let leeway = self.conf.leeway.as_secs();
        let key = (set.id, token_digest(token));
        let hit = CACHE.with(|c| c.borrow().get(&key).cloned());
        if let Some(v) = hit {
            if now <= v.exp.saturating_add(leeway) {
                return Ok(v);
            }
        }
        let verified = Arc::new(self.verify_uncached(&set, token)?);
        CACHE.with(|c| {
            let mut c = c.borrow_mut();
            if c.len() >= CACHE_CAP {
                c.retain(|_, v| now <= v.exp.saturating_add(leeway));
                if c.len() >= CACHE_CAP * 3 / 4 {
                    c.clear();
                }
            }
            c.insert(key, verified.clone());
        });
        Ok(verified)
    }

    /// The checks themselves, without the cache (for tests and the benchmark's uncached case).
    pub fn verify_now(&self, token: &str) -> Result<Verified, TokenError> {
        self.verify_uncached(&self.keys.load(), token)
    }

    fn verify_uncached(&self, set: &KeySet, token: &str) -> Result<Verified, TokenError> {
        let header = jsonwebtoken::decode_header(token).map_err(|_| TokenError::Malformed)?;
        let mut best = None;
        let candidates = set.keys.iter().filter(|k| {
            k.algorithms.contains(&header.alg)
                && match (&header.kid, &k.kid) {
                    // One shared secret: the kid does not pick it.
                    _ if header.alg.family() == AlgorithmFamily::Hmac => true,
                    (Some(want), Some(have)) => want == have,
                    (Some(_), None) => false,
                    (None, _) => true,
                }
        });
        for k in candidates.take(MAX_TRIES) {
            match jsonwebtoken::decode::<serde_json::Map<String, serde_json::Value>>(
                token,
                &k.key,
                &k.validation,
            ) {
                Ok(data) => return self.verified(&data.claims),
                Err(e) => {
                    let e = token_error(e.kind());
                    if best.is_none_or(|b: TokenError| !b.after_signature()) {
                        best = Some(e);
                    }
                }
            }
        }
        Err(best.unwrap_or(
            if set.keys.iter().any(|k| k.algorithms.contains(&header.alg)) {
                TokenError::UnknownKey
            } else {
                TokenError::Algorithm
            },
        ))
    }

    fn verified(
        &self,
        claims: &serde_json::Map<String, serde_json::Value>,
    ) -> Result<Verified, TokenError> {
        let exp = claims
            .get("exp")
            .and_then(|v| v.as_u64().or_else(|| v.as_f64().map(|f| f as u64)))
            .ok_or(TokenError::MissingClaim)?;
        let consumer = match &self.conf.consumer_claim {
            None => None,
            Some(claim) => {
                let value = claims
                    .get(claim)
                    .and_then(|v| v.as_str())
                    .ok_or(TokenError::Consumer)?;
                let ok = !value.is_empty()
                    && value.len() <= 128
                    && value.bytes().all(|b| b.is_ascii_graphic() || b == b' ');
                if !ok {
                    return Err(TokenError::Consumer);
                }
                Some(
                    self.consumers
                        .iter()
                        .find(|c| ***c == *value)
                        .cloned()
                        .unwrap_or_else(|| Arc::from(value)),
                )
            }
        };
        let mut headers = Vec::new();
        for (claim, header) in &self.conf.claims_to_headers {
            if let Some(v) = claims.get(claim).and_then(claim_text) {
                if let Ok(v) = HeaderValue::from_str(&v) {
                    headers.push((header.clone(), v));
                }
            }
        }
        Ok(Verified {
            exp,
            consumer,
            headers,
        })
    }
}

/// A claim as a field value: strings as they are, numbers and booleans written out, a list of
/// those joined by commas; objects are left out. At most 4 KiB.
fn claim_text(v: &serde_json::Value) -> Option<String> {
    use serde_json::Value;
    let scalar = |v: &Value| match v {
        Value::String(s) => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        Value::Bool(b) => Some(b.to_string()),
        _ => None,
    };
    let text = match v {
        Value::Array(items) => items
            .iter()
            .map(scalar)
            .collect::<Option<Vec<_>>>()?
            .join(","),
        other => scalar(other)?,
    };
    (text.len() <= 4096).then_some(text)
}

fn token_error(kind: &ErrorKind) -> TokenError {
    match kind {
        ErrorKind::InvalidSignature => TokenError::Signature,
        ErrorKind::ExpiredSignature => TokenError::Expired,
        ErrorKind::ImmatureSignature => TokenError::NotYetValid,
        ErrorKind::InvalidAudience => TokenError::Audience,
        ErrorKind::InvalidIssuer => TokenError::Issuer,
        ErrorKind::MissingRequiredClaim(_) => TokenError::MissingClaim,
        ErrorKind::InvalidAlgorithm | ErrorKind::InvalidKeyFormat => TokenError::Algorithm,
        _ => TokenError::Malformed,
    }
}

fn token_digest(token: &str) -> u128 {
    let d = ring::digest::digest(&ring::digest::SHA256, token.as_bytes());
    let mut first = [0; 16];
    first.copy_from_slice(&d.as_ref()[..16]);
    u128::from_le_bytes(first)
}

thread_local! {
    static CACHE: RefCell<HashMap<(u64, u128), Arc<Verified>>> = RefCell::new(HashMap::new());
}

/// Forgets this thread's verified tokens (for benchmarks of the uncached path).
pub fn clear_cache() {
    CACHE.with(|c| c.borrow_mut().clear());
}

/// Entries in this thread's cache (for tests).
pub fn cached_tokens() -> usize {
    CACHE.with(|c| c.borrow().len())
}

/// The token of an `Authorization: Bearer …` value (RFC 6750 §2.1: the scheme in any case,
/// one or more spaces, a token68); `None` for another scheme or a malformed value.
pub fn bearer(value: &[u8]) -> Option<&str> {
    let value = value.trim_ascii();
    if value.len() < 7 || !value[..6].eq_ignore_ascii_case(b"bearer") || value[6] != b' ' {
        return None;
    }
    let token = value[7..].trim_ascii_start();
    let body = token.iter().rposition(|b| *b != b'=').map_or(0, |i| i + 1);
    let ok = body > 0
        && token[..body]
            .iter()
            .all(|b| b.is_ascii_alphanumeric() || b"-._~+/".contains(b));
    // Checked ASCII just above.
    ok.then(|| std::str::from_utf8(token).ok()).flatten()
}
