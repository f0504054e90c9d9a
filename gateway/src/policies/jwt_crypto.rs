//! The signature algorithms under `jsonwebtoken`, on ring.
//!
//! jsonwebtoken 10+ (the releases with the fix for CVE-2026-25537) ships its crypto as a
//! pluggable `CryptoProvider`, built in only for aws-lc-rs and RustCrypto; ring, the one crypto
//! library of this workspace (pingora, rustls, kube), has none. This file is that adapter: each
//! algorithm is one call into ring, nothing of the cryptography is ours. Signing is here for
//! tests and benchmarks (podgate itself only verifies).
//!
//! [`install`] makes it the process default; every [`super::jwt`] provider calls it before its
//! first verification, so no decode can meet the crate's "no provider" panic.

use jsonwebtoken::crypto::{CryptoProvider, JwtSigner, JwtVerifier, KeyUtils};
use jsonwebtoken::errors::{Error, ErrorKind, Result};
use jsonwebtoken::jwk::{EllipticCurve, ThumbprintHash};
use jsonwebtoken::signature::{self, Signer, Verifier};
use jsonwebtoken::{Algorithm, AlgorithmFamily, DecodingKey, DecodingKeyKind, EncodingKey};
use ring::rand::SystemRandom;
use ring::signature as sig;

/// Installs the ring provider as jsonwebtoken's process default (once; later calls, or a
/// provider installed by someone else, change nothing).
pub fn install() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let _ = PROVIDER.install_default();
    });
}

static PROVIDER: CryptoProvider = CryptoProvider {
    signer_factory: new_signer,
    verifier_factory: new_verifier,
    key_utils: KeyUtils {
        // Only needed to turn private keys into JWKs, which podgate never does.
        rsa_pub_components_from_private_key: |_| Err(unsupported()),
        rsa_pub_components_from_public_key: |_| Err(unsupported()),
        ec_pub_components_from_private_key: |_, _| Err(unsupported()),
        ed_pub_components_from_private_key: |_: &[u8], _: &EllipticCurve| Err(unsupported()),
        compute_digest,
    },
};

fn unsupported() -> Error {
    ErrorKind::InvalidKeyFormat.into()
}

fn compute_digest(data: &[u8], hash: ThumbprintHash) -> Result<Vec<u8>> {
    let algorithm = match hash {
        ThumbprintHash::SHA256 => &ring::digest::SHA256,
        ThumbprintHash::SHA384 => &ring::digest::SHA384,
        ThumbprintHash::SHA512 => &ring::digest::SHA512,
        _ => return Err(unsupported()),
    };
    Ok(ring::digest::digest(algorithm, data).as_ref().to_vec())
}

fn family(algorithm: Algorithm) -> AlgorithmFamily {
    algorithm.family()
}

/// A verifier: the algorithm and the key, checked to be of its family.
struct Verify {
    algorithm: Algorithm,
    key: DecodingKey,
}

impl Verifier<Vec<u8>> for Verify {
    fn verify(&self, msg: &[u8], signature: &Vec<u8>) -> std::result::Result<(), signature::Error> {
        fn fail<E>(_: E) -> signature::Error {
            signature::Error::new()
        }
        use Algorithm::*;
        let der_or_raw = match self.key.kind() {
            DecodingKeyKind::SecretOrDer(bytes) => bytes.as_slice(),
            DecodingKeyKind::RsaModulusExponent { n, e } => {
                let params = rsa_params(self.algorithm).ok_or_else(signature::Error::new)?;
                let key = sig::RsaPublicKeyComponents { n, e };
                return key.verify(params, msg, signature).map_err(fail);
            }
        };
        let algorithm: &dyn sig::VerificationAlgorithm = match self.algorithm {
            HS256 | HS384 | HS512 => {
                let hmac = match self.algorithm {
                    HS256 => ring::hmac::HMAC_SHA256,
                    HS384 => ring::hmac::HMAC_SHA384,
                    _ => ring::hmac::HMAC_SHA512,
                };
                // ring compares the tags in constant time.
                let key = ring::hmac::Key::new(hmac, der_or_raw);
                return ring::hmac::verify(&key, msg, signature).map_err(fail);
            }
            ES256 => &sig::ECDSA_P256_SHA256_FIXED,
            ES384 => &sig::ECDSA_P384_SHA384_FIXED,
            EdDSA => &sig::ED25519,
            other => rsa_params(other).ok_or_else(signature::Error::new)?,
        };
        sig::UnparsedPublicKey::new(algorithm, der_or_raw)
            .verify(msg, signature)
            .map_err(fail)
    }
}

impl JwtVerifier for Verify {
    fn algorithm(&self) -> Algorithm {
        self.algorithm
    }
}

/// ring's RSA verification parameters: keys of 2048 to 8192 bits only.
fn rsa_params(algorithm: Algorithm) -> Option<&'static sig::RsaParameters> {
    use Algorithm::*;
    Some(match algorithm {
        RS256 => &sig::RSA_PKCS1_2048_8192_SHA256,
        RS384 => &sig::RSA_PKCS1_2048_8192_SHA384,
        RS512 => &sig::RSA_PKCS1_2048_8192_SHA512,
        PS256 => &sig::RSA_PSS_2048_8192_SHA256,
        PS384 => &sig::RSA_PSS_2048_8192_SHA384,
        PS512 => &sig::RSA_PSS_2048_8192_SHA512,
        _ => return None,
    })
}

fn new_verifier(algorithm: &Algorithm, key: &DecodingKey) -> Result<Box<dyn JwtVerifier>> {
    // The key's family must be the algorithm's: an RSA public key is never an HMAC secret.
    if key.family() != family(*algorithm) {
        return Err(ErrorKind::InvalidKeyFormat.into());
    }
    Ok(Box::new(Verify {
        algorithm: *algorithm,
        key: key.clone(),
    }))
}

/// A signer over a private key (PKCS#1 DER for RSA, PKCS#8 for EC and Ed25519) or a secret.
struct Sign {
    algorithm: Algorithm,
    key: EncodingKey,
}

impl Signer<Vec<u8>> for Sign {
    fn try_sign(&self, msg: &[u8]) -> std::result::Result<Vec<u8>, signature::Error> {
        use Algorithm::*;
        fn fail<E>(_: E) -> signature::Error {
            signature::Error::new()
        }
        let rng = SystemRandom::new();
        let der = self.key.as_bytes();
        match self.algorithm {
            HS256 | HS384 | HS512 => {
                let hmac = match self.algorithm {
                    HS256 => ring::hmac::HMAC_SHA256,
                    HS384 => ring::hmac::HMAC_SHA384,
                    _ => ring::hmac::HMAC_SHA512,
                };
                let tag = ring::hmac::sign(&ring::hmac::Key::new(hmac, der), msg);
                Ok(tag.as_ref().to_vec())
            }
            ES256 | ES384 => {
                let alg = match self.algorithm {
                    ES256 => &sig::ECDSA_P256_SHA256_FIXED_SIGNING,
                    _ => &sig::ECDSA_P384_SHA384_FIXED_SIGNING,
                };
                let pair = sig::EcdsaKeyPair::from_pkcs8(alg, der, &rng).map_err(fail)?;
                Ok(pair.sign(&rng, msg).map_err(fail)?.as_ref().to_vec())
            }
            EdDSA => {
                let pair = sig::Ed25519KeyPair::from_pkcs8_maybe_unchecked(der).map_err(fail)?;
                Ok(pair.sign(msg).as_ref().to_vec())
            }
            other => {
                let padding: &'static dyn sig::RsaEncoding = match other {
                    RS256 => &sig::RSA_PKCS1_SHA256,
                    RS384 => &sig::RSA_PKCS1_SHA384,
                    RS512 => &sig::RSA_PKCS1_SHA512,
                    PS256 => &sig::RSA_PSS_SHA256,
                    PS384 => &sig::RSA_PSS_SHA384,
                    _ => &sig::RSA_PSS_SHA512,
                };
                let pair = sig::RsaKeyPair::from_der(der)
                    .or_else(|_| sig::RsaKeyPair::from_pkcs8(der))
                    .map_err(fail)?;
                let mut out = vec![0; pair.public().modulus_len()];
                pair.sign(padding, &rng, msg, &mut out).map_err(fail)?;
                Ok(out)
            }
        }
    }
}

impl JwtSigner for Sign {
    fn algorithm(&self) -> Algorithm {
        self.algorithm
    }
}

fn new_signer(algorithm: &Algorithm, key: &EncodingKey) -> Result<Box<dyn JwtSigner>> {
    if key.family() != family(*algorithm) {
        return Err(ErrorKind::InvalidKeyFormat.into());
    }
    Ok(Box::new(Sign {
        algorithm: *algorithm,
        key: key.clone(),
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use jsonwebtoken::{decode, encode, Header, Validation};

    #[test]
    fn ring_signs_and_verifies_each_family_and_refuses_the_other_families_keys() {
        install();
        let rng = SystemRandom::new();
        let ec =
            sig::EcdsaKeyPair::generate_pkcs8(&sig::ECDSA_P256_SHA256_FIXED_SIGNING, &rng).unwrap();
        let ec_pub =
            sig::EcdsaKeyPair::from_pkcs8(&sig::ECDSA_P256_SHA256_FIXED_SIGNING, ec.as_ref(), &rng)
                .unwrap();
        let ed = sig::Ed25519KeyPair::generate_pkcs8(&rng).unwrap();
        let ed_pub = sig::Ed25519KeyPair::from_pkcs8(ed.as_ref()).unwrap();
        use ring::signature::KeyPair;
        let cases = [
            (
                Algorithm::ES256,
                EncodingKey::from_ec_der(ec.as_ref()),
                DecodingKey::from_ec_der(ec_pub.public_key().as_ref()),
            ),
            (
                Algorithm::EdDSA,
                EncodingKey::from_ed_der(ed.as_ref()),
                DecodingKey::from_ed_der(ed_pub.public_key().as_ref()),
            ),
            (
                Algorithm::HS256,
                EncodingKey::from_secret(&[7; 32]).unwrap(),
                DecodingKey::from_secret(&[7; 32]).unwrap(),
            ),
        ];
        let claims = serde_json::json!({"sub": "a", "exp": 4_000_000_000u64});
        for (alg, enc, dec) in &cases {
            let token = encode(&Header::new(*alg), &claims, enc).unwrap();
            let mut v = Validation::new(*alg);
            v.validate_aud = false;
            let got = decode::<serde_json::Value>(&token, dec, &v).unwrap();
            assert_eq!(got.claims["sub"], "a");
            // A flipped signature byte fails.
            let (head, sig) = token.rsplit_once('.').unwrap();
            let mut bytes = sig.as_bytes().to_vec();
            bytes[3] = if bytes[3] == b'A' { b'B' } else { b'A' };
            let bad = format!("{head}.{}", String::from_utf8(bytes).unwrap());
            assert!(
                decode::<serde_json::Value>(&bad, dec, &v).is_err(),
                "{alg:?}"
            );
            for (other, _, other_dec) in &cases {
                if other != alg {
                    let mut v = Validation::new(*alg);
                    v.validate_aud = false;
                    assert!(decode::<serde_json::Value>(&token, other_dec, &v).is_err());
                }
            }
        }
    }
}
