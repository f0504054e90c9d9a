//! The files route policies read: API key files, JWKS files and HS256 secrets. What a valid file
//! is lives here, below the runtime, so that the config check at load (`policies.rs`) and the
//! background re-reads in `policies/` apply the same rules.
//!
//! No message here ever holds a key, a secret or a line of a key file: they name the file, the
//! line number and what is wrong.

use jsonwebtoken::jwk::{AlgorithmParameters, EllipticCurve, Jwk, KeyOperations, PublicKeyUse};
use jsonwebtoken::{Algorithm, DecodingKey};
use std::path::Path;

/// Longest key accepted (a generous bound for a header or query value).
pub const MAX_KEY_LEN: usize = 512;
/// An HS256 secret needs at least as many bytes as the hash's output (RFC 7518 §3.2).
pub const MIN_SECRET_LEN: usize = 32;
/// Files larger than this are refused: a JWKS or key file is kilobytes, not megabytes.
pub const MAX_FILE_LEN: u64 = 4 << 20;

fn read(path: &Path) -> Result<Vec<u8>, String> {
    let shown = path.display();
    let len = std::fs::metadata(path)
        .map_err(|e| format!("cannot read {shown}: {e}"))?
        .len();
    if len > MAX_FILE_LEN {
        return Err(format!(
            "{shown} holds {len} bytes, more than the {MAX_FILE_LEN} allowed"
        ));
    }
    std::fs::read(path).map_err(|e| format!("cannot read {shown}: {e}"))
}

/// The keys of an `api_keys_file`: one per line, surrounding white space ignored, blank lines
/// and lines starting with `#` skipped. A key is 1 to 512 visible ASCII characters (no space),
/// so that it can travel in a header or a query. Any bad line makes the whole file invalid:
/// a file half applied would refuse callers for a typo.
pub fn read_api_keys(path: &Path) -> Result<Vec<String>, String> {
    let bytes = read(path)?;
    parse_api_keys(&bytes).map_err(|e| format!("{}: {e}", path.display()))
}

/// [`read_api_keys`] on the file's bytes.
pub fn parse_api_keys(bytes: &[u8]) -> Result<Vec<String>, String> {
    let mut keys = Vec::new();
    for (i, line) in bytes.split(|b| *b == b'\n').enumerate() {
        let line = line.trim_ascii();
        if line.is_empty() || line.starts_with(b"#") {
            continue;
        }
        if line.len() > MAX_KEY_LEN {
            return Err(format!(
                "line {}: a key is at most {MAX_KEY_LEN} characters",
                i + 1
            ));
        }
        if !line.iter().all(|b| b.is_ascii_graphic()) {
            return Err(format!(
                "line {}: a key is visible ASCII without spaces (the line is not shown)",
                i + 1
            ));
        }
        // Checked to be ASCII just above.
        let key = String::from_utf8_lossy(line).into_owned();
        if !keys.contains(&key) {
            keys.push(key);
        }
    }
    Ok(keys)
}

/// An HS256/384/512 secret: the file's bytes without surrounding white space, at least
/// [`MIN_SECRET_LEN`] of them.
pub fn read_secret(path: &Path) -> Result<Vec<u8>, String> {
    let bytes = read(path)?;
    let secret = bytes.trim_ascii();
    if secret.len() < MIN_SECRET_LEN {
        return Err(format!(
            "{} holds a {}-byte secret; HS256 needs at least {MIN_SECRET_LEN} bytes",
            path.display(),
            secret.len()
        ));
    }
    Ok(secret.to_vec())
}

/// A verification key of a JWKS, with the algorithms a token signed by it may name.
#[derive(Clone)]
pub struct JwtKey {
    pub kid: Option<String>,
    /// All of one family (a key never verifies another family's algorithm).
    pub algorithms: Vec<Algorithm>,
    pub key: DecodingKey,
}

impl std::fmt::Debug for JwtKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JwtKey")
            .field("kid", &self.kid)
            .field("algorithms", &self.algorithms)
            .finish_non_exhaustive()
    }
}

/// The usable keys of a JWKS file, and a note for each key left out (an encryption key, an
/// unsupported curve), so that a rotation that adds a key podgate cannot use is visible.
#[derive(Debug)]
pub struct Jwks {
    pub keys: Vec<JwtKey>,
    pub skipped: Vec<String>,
}

/// Reads a JWKS file (`{"keys": [...]}`, RFC 7517). At least one key must be usable.
pub fn read_jwks(path: &Path) -> Result<Jwks, String> {
    let bytes = read(path)?;
    parse_jwks(&bytes).map_err(|e| format!("{}: {e}", path.display()))
}

/// [`read_jwks`] on the file's bytes.
pub fn parse_jwks(bytes: &[u8]) -> Result<Jwks, String> {
    let doc: serde_json::Value =
        serde_json::from_slice(bytes).map_err(|e| format!("not JSON: {e}"))?;
    let Some(entries) = doc.get("keys").and_then(|k| k.as_array()) else {
        return Err("not a JWKS: expected an object with a `keys` list".into());
    };
    let mut jwks = Jwks {
        keys: Vec::new(),
        skipped: Vec::new(),
    };
    for (i, entry) in entries.iter().enumerate() {
        match jwt_key(entry) {
            Ok(key) => jwks.keys.push(key),
            Err(why) => jwks.skipped.push(format!("keys[{i}]: {why}")),
        }
    }
    if jwks.keys.is_empty() {
        let why = match jwks.skipped.is_empty() {
            true => "the `keys` list is empty".to_string(),
            false => jwks.skipped.join("; "),
        };
        return Err(format!("no usable verification key ({why})"));
    }
    Ok(jwks)
}

const RSA_ALGORITHMS: [Algorithm; 6] = [
    Algorithm::RS256,
    Algorithm::RS384,
    Algorithm::RS512,
    Algorithm::PS256,
    Algorithm::PS384,
    Algorithm::PS512,
];

fn jwt_key(entry: &serde_json::Value) -> Result<JwtKey, String> {
    // One entry at a time: a key of a kind the crate does not know must not hide the others.
    let jwk: Jwk = serde_json::from_value(entry.clone())
        .map_err(|e| format!("not a key podgate reads ({e})"))?;
    let common = &jwk.common;
    if common.public_key_use == Some(PublicKeyUse::Encryption) {
        return Err("an encryption key (`use: enc`)".into());
    }
    if let Some(ops) = &common.key_operations {
        if !ops.contains(&KeyOperations::Verify) {
            return Err("its `key_ops` do not include `verify`".into());
        }
    }
    // The algorithm the key's own `alg` names, as a signing algorithm, if it names one.
    let named: Option<Algorithm> = match common.key_algorithm {
        None => None,
        Some(a) => Some(
            a.to_string()
                .parse::<Algorithm>()
                .map_err(|_| format!("`alg: {a:?}` is not a signing algorithm"))?,
        ),
    };
    let family: Vec<Algorithm> = match &jwk.algorithm {
        AlgorithmParameters::RSA(p) => {
            // base64url without padding: 4 characters per 3 bytes.
            if p.n.trim_end_matches('=').len() * 3 / 4 < 256 {
                return Err("an RSA key shorter than 2048 bits".into());
            }
            RSA_ALGORITHMS.to_vec()
        }
        AlgorithmParameters::EllipticCurve(p) => match p.curve {
            EllipticCurve::P256 => vec![Algorithm::ES256],
            EllipticCurve::P384 => vec![Algorithm::ES384],
            ref other => return Err(format!("the curve {other:?} is not supported")),
        },
        AlgorithmParameters::OctetKeyPair(p) => match p.curve {
            EllipticCurve::Ed25519 => vec![Algorithm::EdDSA],
            ref other => return Err(format!("the curve {other:?} is not supported")),
        },
        AlgorithmParameters::OctetKey(_) => {
            return Err(
                "a symmetric key: HS256 secrets are read from `secret_file` only, never from \
                 a JWKS"
                    .into(),
            )
        }
        _ => return Err("a key type podgate does not support".into()),
    };
    let algorithms = match named {
        None => family,
        Some(a) if family.contains(&a) => vec![a],
        Some(a) => return Err(format!("`alg: {a:?}` does not fit the key's type")),
    };
    let key = DecodingKey::from_jwk(&jwk).map_err(|e| format!("unreadable key ({e})"))?;
    Ok(JwtKey {
        kid: common.key_id.clone(),
        algorithms,
        key,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_files_skip_comments_and_refuse_bad_lines_without_showing_them() {
        let keys = parse_api_keys(b"# shop\n\n  k1  \nk2\r\nk1\n").unwrap();
        assert_eq!(keys, ["k1", "k2"]);
        let err = parse_api_keys(b"good\nsecret with space\n").unwrap_err();
        assert!(err.starts_with("line 2:"), "{err}");
        assert!(!err.contains("secret"), "{err}");
        assert!(parse_api_keys(&[b'k'; 513]).is_err());
        assert!(parse_api_keys("caf\u{e9}".as_bytes()).is_err());
    }

    #[test]
    fn jwks_keep_usable_keys_and_say_why_others_are_left_out() {
        let ed = r#"{"kty":"OKP","crv":"Ed25519","x":"11qYAYKxCrfVS_7TyWQHOg7hcvPapiMlrwIaaPcHURo","kid":"a"}"#;
        let enc = r#"{"kty":"OKP","crv":"Ed25519","x":"11qYAYKxCrfVS_7TyWQHOg7hcvPapiMlrwIaaPcHURo","use":"enc"}"#;
        let oct = r#"{"kty":"oct","k":"c2VjcmV0"}"#;
        let weird = r#"{"kty":"XYZ"}"#;
        let text = format!(r#"{{"keys":[{ed},{enc},{oct},{weird}]}}"#);
        let jwks = parse_jwks(text.as_bytes()).unwrap();
        assert_eq!(jwks.keys.len(), 1);
        assert_eq!(jwks.keys[0].kid.as_deref(), Some("a"));
        assert_eq!(jwks.keys[0].algorithms, [Algorithm::EdDSA]);
        assert_eq!(jwks.skipped.len(), 3, "{:?}", jwks.skipped);
        assert!(jwks.skipped[1].contains("secret_file"));
        let none = parse_jwks(format!(r#"{{"keys":[{oct}]}}"#).as_bytes()).unwrap_err();
        assert!(none.contains("no usable"), "{none}");
        assert!(parse_jwks(b"{").unwrap_err().contains("not JSON"));
        assert!(parse_jwks(b"[]").unwrap_err().contains("keys"));
    }
}
