//! Where sources put what they see; the gateway subscribes.
//!
//! The store holds the latest [`ServiceState`] of every watched Service and tells subscribers
//! which keys changed. It is a push channel, not a cache for the request path: the gateway is
//! expected to turn notifications into its own lock-free snapshots.

use std::collections::HashMap;
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
    services: RwLock<HashMap<ServiceKey, Arc<ServiceState>>>,
    listeners: RwLock<Vec<Arc<dyn Listener>>>,
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
    pub fn get(&self, key: &ServiceKey) -> Option<Arc<ServiceState>> {
        self.read().get(key).cloned()
    }

    /// Replaces everything known for `cluster` with `services`; notifies listeners ONCE with the
    /// keys whose state actually changed (added, removed or different), and not at all if none
    /// changed.
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
            map.retain(|key, _| {
                let keep = &*key.cluster != cluster || services.contains_key(key);
                if !keep {
                    changed.push(key.clone());
                }
                keep
            });
            for (key, state) in services {
                match map.get(&key) {
                    Some(old) if **old == state => {}
                    _ => {
                        changed.push(key.clone());
                        map.insert(key, Arc::new(state));
                    }
                }
            }
        }
        self.notify(changed);
    }

    /// Sets (`Some`) or removes (`None`) one Service; notifies only if that changed anything.
    pub fn set(&self, key: ServiceKey, state: Option<ServiceState>) {
        let changed = {
            let mut map = self.write();
            match state {
                None => map.remove(&key).is_some(),
                Some(state) => match map.get(&key) {
                    Some(old) if **old == state => false,
                    _ => {
                        map.insert(key.clone(), Arc::new(state));
                        true
                    }
                },
            }
        };
        if changed {
            self.notify(vec![key]);
        }
    }

    /// All keys currently stored, sorted.
    pub fn keys(&self) -> Vec<ServiceKey> {
        let mut keys: Vec<ServiceKey> = self.read().keys().cloned().collect();
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
    fn read(&self) -> std::sync::RwLockReadGuard<'_, HashMap<ServiceKey, Arc<ServiceState>>> {
        self.services.read().unwrap_or_else(PoisonError::into_inner)
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, HashMap<ServiceKey, Arc<ServiceState>>> {
        self.services
            .write()
            .unwrap_or_else(PoisonError::into_inner)
    }
}
