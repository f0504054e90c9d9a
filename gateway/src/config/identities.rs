//! Validation of the identities route policies authenticate callers as: `consumers` (their
//! API-key files read and checked here) and `jwt_providers` (issuer, audiences, JWKS or secret
//! file, claims mapped to headers). Every mistake is reported with its line and field path.

use super::model::*;
use super::policies::{header_name, REQUEST_OWN};
use super::policy_files::{read_api_keys, read_jwks, read_secret};
use super::report::{child, line, Report};
use super::schema;
use super::units::Resolve;
use super::yaml::{List, Sect, Val};
use std::collections::HashMap;
use std::sync::Arc;

/// A required `name:` that follows podgate's name rules.
fn named(
    r: &mut Report,
    v: &Option<Val<String>>,
    mapping_line: usize,
    path: &str,
) -> Option<Arc<str>> {
    let name = r.required(v, mapping_line, path)?;
    match super::names::check_name(name) {
        Ok(()) => Some(Arc::from(name.as_str())),
        Err(message) => {
            r.error(line(v), path, message);
            None
        }
    }
}

/// `consumers:`; also reads every `api_keys_file` and refuses a key two consumers share.
pub fn consumers(
    r: &mut Report,
    list: Option<&List<Sect<schema::Consumer>>>,
    resolve: Resolve,
) -> Vec<ConsumerConf> {
    let mut out: Vec<ConsumerConf> = Vec::new();
    // Key → the consumer that listed it first (keys stay in memory only for this check).
    let mut owners: HashMap<String, Arc<str>> = HashMap::new();
    let items = list.map(|l| r.list(l, "consumers")).unwrap_or_default();
    for (path, s) in items {
        let Some(c) = r.sect(s, &path) else { continue };
        let name_path = child(&path, "name");
        let name = named(r, &c.name, s.line, &name_path);
        let file_path = child(&path, "api_keys_file");
        let file = r.opt(&c.api_keys_file, &file_path).map(|p| resolve(p));
        if let Some(f) = &file {
            match read_api_keys(f) {
                Ok(keys) => {
                    for key in keys {
                        let Some(name) = &name else { break };
                        match owners.get(&key) {
                            Some(other) if other != name => r.error(
                                line(&c.api_keys_file),
                                &file_path,
                                format!(
                                    "a key of {} is also a key of consumer `{other}`: a key \
                                     names one consumer (the key is not shown)",
                                    f.display()
                                ),
                            ),
                            _ => {
                                owners.insert(key, name.clone());
                            }
                        }
                    }
                }
                Err(message) => r.error(line(&c.api_keys_file), &file_path, message),
            }
        }
        let Some(name) = name else { continue };
        if out.iter().any(|x| x.name == name) {
            let message = format!("duplicate consumer name `{name}`");
            r.error(line(&c.name), &name_path, message);
            continue;
        }
        out.push(ConsumerConf {
            name,
            api_keys_file: file,
        });
    }
    out
}

/// `jwt_providers:`; reads each `jwks_file` and `secret_file`.
pub fn jwt_providers(
    r: &mut Report,
    list: Option<&List<Sect<schema::JwtProvider>>>,
    resolve: Resolve,
) -> Vec<Arc<JwtProviderConf>> {
    let mut out: Vec<Arc<JwtProviderConf>> = Vec::new();
    let items = list.map(|l| r.list(l, "jwt_providers")).unwrap_or_default();
    for (path, s) in items {
        let Some(p) = r.sect(s, &path) else { continue };
        let name_path = child(&path, "name");
        let name = named(r, &p.name, s.line, &name_path);
        let issuer = r.opt(&p.issuer, &child(&path, "issuer")).cloned();
        if issuer.as_deref() == Some("") {
            r.error(
                line(&p.issuer),
                &child(&path, "issuer"),
                "must not be empty",
            );
        }
        let mut audiences = Vec::new();
        if let Some(l) = &p.audiences {
            for (ap, v) in r.list(l, &child(&path, "audiences")) {
                match r.val(v, &ap) {
                    Some(a) if a.is_empty() => r.error(Some(v.line), &ap, "must not be empty"),
                    Some(a) => audiences.push(a.clone()),
                    None => {}
                }
            }
        }
        let jwks_path = child(&path, "jwks_file");
        let jwks_file = r.opt(&p.jwks_file, &jwks_path).map(|f| resolve(f));
        if let Some(f) = &jwks_file {
            match read_jwks(f) {
                Ok(jwks) => {
                    for note in jwks.skipped {
                        log::warn!("{jwks_path}: {}: key left out: {note}", f.display());
                    }
                }
                Err(message) => r.error(line(&p.jwks_file), &jwks_path, message),
            }
        }
        let secret_path = child(&path, "secret_file");
        let secret_file = r.opt(&p.secret_file, &secret_path).map(|f| resolve(f));
        if let Some(f) = &secret_file {
            if let Err(message) = read_secret(f) {
                r.error(line(&p.secret_file), &secret_path, message);
            }
        }
        if p.jwks_file.is_none() && p.secret_file.is_none() {
            r.error(
                Some(s.line),
                &path,
                "needs jwks_file (RS256, ES256, EdDSA public keys) or secret_file (HS256)",
            );
        }
        let consumer_claim = r
            .opt(&p.consumer_claim, &child(&path, "consumer_claim"))
            .cloned();
        if consumer_claim.as_deref() == Some("") {
            let at = child(&path, "consumer_claim");
            r.error(line(&p.consumer_claim), &at, "must not be empty");
        }
        let mut claims_to_headers = Vec::new();
        if let Some(pairs) = &p.claims_to_headers {
            let at = child(&path, "claims_to_headers");
            for (l, claim, header) in r.pairs(pairs, &at) {
                let field = child(&at, &claim);
                if let Some(h) = header_name(r, l, &field, &header, REQUEST_OWN) {
                    claims_to_headers.push((claim, h));
                }
            }
        }
        let leeway = r
            .opt(&p.leeway, &child(&path, "leeway"))
            .copied()
            .unwrap_or(DEFAULT_JWT_LEEWAY);
        if leeway > std::time::Duration::from_secs(300) {
            let at = child(&path, "leeway");
            r.error(
                line(&p.leeway),
                &at,
                "at most 5m: clocks that far apart need fixing",
            );
        }
        let Some(name) = name else { continue };
        if out.iter().any(|x| x.name == name) {
            let message = format!("duplicate jwt provider name `{name}`");
            r.error(line(&p.name), &name_path, message);
            continue;
        }
        out.push(Arc::new(JwtProviderConf {
            name,
            issuer,
            audiences,
            jwks_file,
            secret_file,
            consumer_claim,
            claims_to_headers,
            leeway,
        }));
    }
    out
}
