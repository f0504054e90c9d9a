//! Where sources put what they see; the gateway subscribes.
//!
//! The store holds the latest [`ServiceState`] of every watched Service and tells subscribers
//! which keys changed. It is a push channel, not a cache for the request path: the gateway is
//! expected to turn notifications into its own lock-free snapshots.
//!
//! Label subsets ([`ServiceKey::subset`]) come from one of two places. A cluster watch stores
//! them itself (it watches the Pods of each subset asked for). A source that reads every Pod (a
//! manifests folder) stores only whole Services, with their Pods' labels in
//! [`ServiceState::pods`]; the store derives each subset key that has been asked for with
//! [`Store::get`] from that, and keeps it current with every update of its Service.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, PoisonError, RwLock};

use crate::model::{ServiceKey, ServiceState};

/// Subscriber to store changes.
pub trait Listener: Send + Sync {
    /// Called after the states of `keys` changed (added, removed or different), with `keys`
    /// sorted and not empty.
    ///
    /// Called synchronously on the writer's thread after the store's lock is released, so
    /// [`Store::get`] from here sees the new state (or a newer one: two writers may notify
    /// concurrently and in any order, so read the state with `get`, do not assume it). It runs
    /// inside the source's update, so keep it short and do not call back into the source that
    /// is writing (e.g. `ManifestsCluster::reload`), which would deadlock.
    fn changed(&self, keys: &[ServiceKey]);
}

/// The latest state of every known Service, plus the listeners to tell about changes.
#[derive(Default)]
pub struct Store {
    services: RwLock<Services>,
    listeners: RwLock<Vec<Arc<dyn Listener>>>,
}

#[derive(Default)]
struct Services {
    states: HashMap<ServiceKey, Arc<ServiceState>>,
    /// Every subset key asked for with [`Store::get`]: the ones to derive when a whole Service's
    /// state carries Pod labels. Never shrinks; it holds at most the entries of the configs seen.
    subsets: HashSet<ServiceKey>,
}

impl Services {
    /// The subset keys to derive from `whole`'s state.
    fn subsets_of(&self, whole: &ServiceKey) -> Vec<ServiceKey> {
        self.subsets
            .iter()
            .filter(|k| {
                k.cluster == whole.cluster
                    && k.namespace == whole.namespace
                    && k.service == whole.service
            })
            .cloned()
            .collect()
    }

    /// Sets `key` to `state`, keeping the old `Arc` when nothing changed; records a change.
    fn put(&mut self, key: ServiceKey, state: ServiceState, changed: &mut Vec<ServiceKey>) {
        match self.states.get(&key) {
            Some(old) if **old == state => {}
            _ => {
                changed.push(key.clone());
                self.states.insert(key, Arc::new(state));
            }
        }
    }
}

impl Store {
    /// An empty store with no listeners.
    pub fn new() -> Arc<Store> {
        Arc::new(Store::default())
    }

    /// Adds a listener for all future changes; it is not told about what is already stored
    /// (call [`Store::keys`] after subscribing for that).
    pub fn subscribe(&self, listener: Arc<dyn Listener>) {
        self.listeners
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .push(listener);
    }

    /// The current state of `key`, if any source has reported it.
    ///
    /// An unchanged state keeps its `Arc` across updates, so `Arc::ptr_eq` tells a caller that
    /// nothing changed.
    ///
    /// A subset key that no source stored is derived from its whole Service's state when that
    /// carries Pod labels ([`ServiceState::subset`]). Asking registers the key: from then on
    /// every update of the whole Service updates it too, and listeners hear about it.
    pub fn get(&self, key: &ServiceKey) -> Option<Arc<ServiceState>> {
        {
            let services = self.read();
            let state = services.states.get(key);
            if key.subset.is_none() || services.subsets.contains(key) {
                return state.cloned();
            }
        }
        let mut services = self.write();
        services.subsets.insert(key.clone());
        if let Some(state) = services.states.get(key) {
            return Some(state.clone());
        }
        let derived = services
            .states
            .get(&key.whole())?
            .subset(&key.subset_labels())?;
        let derived = Arc::new(derived);
        services.states.insert(key.clone(), derived.clone());
        Some(derived)
    }

    /// Replaces everything known for `cluster` with `services`; notifies listeners ONCE with the
    /// keys whose state actually changed (added, removed or different), and not at all if none
    /// changed. Subset keys asked for are derived from the states that carry Pod labels, unless
    /// `services` has them.
    ///
    /// Keys in `services` must belong to `cluster`; others are ignored with a warning, because
    /// accepting them would let one source overwrite another cluster's state.
    pub fn reset_cluster(&self, cluster: &str, mut services: HashMap<ServiceKey, ServiceState>) {
        services.retain(|key, _| {
            let ours = &*key.cluster == cluster;
            if !ours {
                log::warn!("cluster {cluster}: ignoring {key}, which belongs to another cluster");
            }
            ours
        });
        let mut changed = Vec::new();
        {
            let mut map = self.write();
            let derived: Vec<(ServiceKey, ServiceState)> = map
                .subsets
                .iter()
                .filter(|key| &*key.cluster == cluster && !services.contains_key(*key))
                .filter_map(|key| {
                    let state = services.get(&key.whole())?.subset(&key.subset_labels())?;
                    Some((key.clone(), state))
                })
                .collect();
            services.extend(derived);
            map.states.retain(|key, _| {
                let keep = &*key.cluster != cluster || services.contains_key(key);
                if !keep {
                    changed.push(key.clone());
                }
                keep
            });
            for (key, state) in services {
                map.put(key, state, &mut changed);
            }
        }
        self.notify(changed);
    }

    /// Sets (`Some`) or removes (`None`) one Service; notifies only if that changed anything.
    ///
    /// For a whole Service whose new state carries Pod labels, the subset keys asked for are
    /// derived again (and notified if changed); when the old state carried them and the new one
    /// does not, those derived keys are removed.
    pub fn set(&self, key: ServiceKey, state: Option<ServiceState>) {
        let mut changed = Vec::new();
        {
            let mut map = self.write();
            let had_pods = map.states.get(&key).is_some_and(|old| old.pods.is_some());
            let has_pods = state.as_ref().is_some_and(|s| s.pods.is_some());
            let subsets = if key.subset.is_none() && (had_pods || has_pods) {
                map.subsets_of(&key)
            } else {
                Vec::new()
            };
            for subset in subsets {
                match state
                    .as_ref()
                    .and_then(|s| s.subset(&subset.subset_labels()))
                {
                    Some(derived) => map.put(subset, derived, &mut changed),
                    None => {
                        if map.states.remove(&subset).is_some() {
                            changed.push(subset);
                        }
                    }
                }
            }
            match state {
                None => {
                    if map.states.remove(&key).is_some() {
                        changed.push(key);
                    }
                }
                Some(state) => map.put(key, state, &mut changed),
            }
        }
        self.notify(changed);
    }

    /// All keys currently stored, sorted.
    pub fn keys(&self) -> Vec<ServiceKey> {
        let mut keys: Vec<ServiceKey> = self.read().states.keys().cloned().collect();
        keys.sort();
        keys
    }

    /// Calls every listener with `keys` (sorted first), unless `keys` is empty. The caller must
    /// not hold the services lock: listeners read the store.
    fn notify(&self, mut keys: Vec<ServiceKey>) {
        if keys.is_empty() {
            return;
        }
        keys.sort();
        // Cloned so that a listener may subscribe another one without deadlocking.
        let listeners = self
            .listeners
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone();
        for listener in listeners {
            listener.changed(&keys);
        }
    }

    // Poisoning is ignored: a panic mid-update leaves at worst some keys old and some new, each
    // state whole, and the source's next update repairs that; refusing to serve would not.
    fn read(&self) -> std::sync::RwLockReadGuard<'_, Services> {
        self.services.read().unwrap_or_else(PoisonError::into_inner)
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, Services> {
        self.services
            .write()
            .unwrap_or_else(PoisonError::into_inner)
    }
}
