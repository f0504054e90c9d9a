//! Who a request can be: the consumers' API keys and the JWT providers of one config, shared by
//! all its routes, and the watch that re-reads their files on change.
//!
//! Built once per config generation (at start and on each reload). The routes' policies hold
//! it; when the last route of a generation goes, the watch stops with it.

use super::api_key::KeyRing;
use super::files::{self, WatchGuard};
use super::jwt::JwtProvider;
use crate::config::policy_files::read_api_keys;
use crate::config::{Config, ConsumerConf, JwtProviderConf};
use crate::telemetry::metrics;
use arc_swap::ArcSwap;
use std::path::PathBuf;
use std::sync::Arc;

/// Consumers, their keys, and the JWT providers of one config.
#[derive(Default)]
pub struct Identities {
    keys: Arc<ArcSwap<KeyRing>>,
    providers: Vec<Arc<JwtProvider>>,
    consumers: Vec<Arc<str>>,
    _watch: Option<WatchGuard>,
}

impl std::fmt::Debug for Identities {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Identities")
            .field("consumers", &self.consumers)
            .field("keys", &self.keys.load().len())
            .field("providers", &self.providers)
            .finish()
    }
}

/// The last good keys of each consumer; owned by whoever re-reads them.
struct KeyFiles {
    /// (consumer, its file, the keys last read from it).
    entries: Vec<(Arc<str>, Option<PathBuf>, Vec<String>)>,
    ring: Arc<ArcSwap<KeyRing>>,
}

impl KeyFiles {
    /// Re-reads the files in `changed` (all when `None`) and swaps in the new ring; a file
    /// that cannot be read or has a bad line keeps its consumer's last good keys.
    fn reload(&mut self, changed: Option<&[PathBuf]>) {
        let mut applied = false;
        for (name, file, keys) in &mut self.entries {
            let Some(f) = file
                .as_ref()
                .filter(|f| changed.is_none_or(|c| c.contains(f)))
            else {
                continue;
            };
            match read_api_keys(f) {
                Ok(new) => {
                    if changed.is_some() {
                        log::info!("consumer {name}: {} key(s) from {}", new.len(), f.display());
                    }
                    *keys = new;
                    applied = true;
                    metrics::policy_file_reload("api_keys", name, true);
                }
                Err(e) => {
                    log::error!(
                        "consumer {name}: {e}; keeping the {} key(s) read before",
                        keys.len()
                    );
                    metrics::policy_file_reload("api_keys", name, false);
                }
            }
        }
        if applied {
            let all: Vec<(Arc<str>, Vec<String>)> = self
                .entries
                .iter()
                .map(|(n, _, k)| (n.clone(), k.clone()))
                .collect();
            let (ring, problems) = KeyRing::build(&all);
            for p in problems {
                log::error!("api keys: {p}");
            }
            self.ring.store(Arc::new(ring));
        }
    }
}

impl Identities {
    /// Reads every key file, JWKS and secret of `consumers` and `providers` now; follows no
    /// change (see [`Identities::start`]).
    pub fn load(consumers: &[ConsumerConf], providers: &[Arc<JwtProviderConf>]) -> Identities {
        Self::build(consumers, providers, false)
    }

    /// [`Identities::load`] for `config`, then follows changes of the files until dropped.
    pub fn start(config: &Config) -> Arc<Identities> {
        Arc::new(Self::build(&config.consumers, &config.jwt_providers, true))
    }

    fn build(
        consumers: &[ConsumerConf],
        providers: &[Arc<JwtProviderConf>],
        watch: bool,
    ) -> Identities {
        let names: Vec<Arc<str>> = consumers.iter().map(|c| c.name.clone()).collect();
        let ring: Arc<ArcSwap<KeyRing>> = Arc::default();
        let mut key_files = KeyFiles {
            entries: consumers
                .iter()
                .map(|c| (c.name.clone(), c.api_keys_file.clone(), Vec::new()))
                .collect(),
            ring: ring.clone(),
        };
        key_files.reload(None);
        let providers: Vec<Arc<JwtProvider>> = providers
            .iter()
            .map(|p| JwtProvider::new(p.clone(), &names))
            .collect();
        let mut paths: Vec<PathBuf> = key_files
            .entries
            .iter()
            .filter_map(|e| e.1.clone())
            .chain(providers.iter().flat_map(|p| p.files()))
            .collect();
        paths.sort();
        paths.dedup();
        let guard = match (watch, paths.is_empty()) {
            (true, false) => {
                let watched = providers.clone();
                let follow = files::watch(paths, move |changed| {
                    key_files.reload(Some(changed));
                    for p in &watched {
                        p.reload(changed);
                    }
                });
                match follow {
                    Ok(g) => Some(g),
                    Err(e) => {
                        log::error!(
                            "policy files: cannot start the watch, changes will not be seen: {e}"
                        );
                        None
                    }
                }
            }
            _ => None,
        };
        Identities {
            keys: ring,
            providers,
            consumers: names,
            _watch: guard,
        }
    }

    /// The API keys of every consumer.
    pub fn keys(&self) -> &Arc<ArcSwap<KeyRing>> {
        &self.keys
    }

    pub fn provider(&self, name: &str) -> Option<&Arc<JwtProvider>> {
        self.providers.iter().find(|p| *p.conf.name == *name)
    }

    /// The configured consumer names.
    pub fn consumers(&self) -> &[Arc<str>] {
        &self.consumers
    }
}
