//! The `manifests:` cluster kind: a folder of Kubernetes YAML standing in for a cluster.
//!
//! Reading: every `*.yaml` / `*.yml` regular file (symlinks followed, so a ConfigMap volume
//! works) directly in the folder, skipping hidden files and editor leftovers. Each file may hold
//! several documents; `Service` (v1), `EndpointSlice` (discovery.k8s.io/v1) and `Pod` (v1, only
//! its name, namespace and labels) objects are used, `List`-style documents
//! (`kubectl get ... -o yaml`) are looked into, and other kinds are ignored.
//!
//! Pods serve the label subsets of upstream entries: every Service's state carries the labels of
//! the Pods its endpoints name ([`ServiceState::pods`]), and the store derives each subset from
//! that, so an endpoint counts for a subset only if its Pod is in the folder with those labels. Each file is all-or-nothing: a file that fails to parse keeps its last good content
//! in effect, so a half-saved edit never empties a Service.
//!
//! Watching: see [`ManifestsCluster::watch`].

mod objects;
mod yaml;

use objects::{parse_file, Object};

use std::collections::{BTreeMap, HashMap};
use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::mpsc::{self, RecvTimeoutError};
use std::sync::{Arc, Mutex, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime};

use notify::event::{AccessKind, AccessMode};
use notify::{EventKind, RecursiveMode, Watcher};

use crate::model::{ServiceKey, ServiceState};
use crate::store::Store;

/// The label that ties an EndpointSlice to its Service.
const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";

/// How long the folder must stay quiet before a burst of events is read: editors and `cp -r`
/// produce several events per save, and reading mid-burst would see half-written states.
const QUIET: Duration = Duration::from_millis(50);

/// Upper bound on waiting for quiet, so a folder that never stops changing is still read
/// (and a change reaches the store well within a second).
const MAX_DELAY: Duration = Duration::from_millis(300);

/// Why a manifests folder cannot be used at all.
#[derive(Debug, thiserror::Error)]
pub enum ManifestsError {
    /// The folder cannot be listed.
    #[error("cannot read manifests folder {}: {source}", .dir.display())]
    ReadDir {
        /// The folder.
        dir: PathBuf,
        /// What the OS said.
        source: io::Error,
    },
    /// The OS refused a watch on the folder (e.g. out of inotify watches).
    #[error("cannot watch manifests folder {}: {source}", .dir.display())]
    Watch {
        /// The folder.
        dir: PathBuf,
        /// What notify said.
        source: notify::Error,
    },
}

/// Counters and last problem of a [`ManifestsCluster`], for the admin endpoints.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ManifestsStatus {
    /// Reads that reached the store (the initial load included).
    pub reloads: u64,
    /// Problems reported: a file that does not parse, an object that cannot be used, an
    /// unreadable folder. A broken file is counted once per distinct content, not once per read.
    pub errors: u64,
    /// The most recent problem still in effect (file name, document, line and message);
    /// `None` once a read finds the folder and every file clean.
    pub last_error: Option<String>,
    /// Manifest files found by the last read.
    pub files: usize,
    /// When the last read reached the store.
    pub last_reload: Option<SystemTime>,
}

/// A folder of Kubernetes YAML standing in for a cluster.
pub struct ManifestsCluster {
    cluster: Arc<str>,
    dir: PathBuf,
    store: Arc<Store>,
    /// Held for a whole read, through the store update, so that reads from the watcher and from
    /// [`ManifestsCluster::reload`] reach the store in the order they read the files.
    state: Mutex<ReadState>,
}

#[derive(Default)]
struct ReadState {
    /// By file name; sorted so that duplicate objects resolve the same way on every read.
    files: BTreeMap<String, FileEntry>,
    status: ManifestsStatus,
}

/// What is known about one manifest file.
struct FileEntry {
    /// The content last read, good or bad: an unchanged file is neither parsed nor reported
    /// again. `None` after a failed read, so that the next read parses whatever is there.
    bytes: Option<Vec<u8>>,
    /// The objects of the last content that parsed (this one or an earlier one).
    good: Vec<Object>,
    /// The problem of the current content, if any, for `last_error`.
    problem: Option<String>,
}

impl FileEntry {
    fn new() -> FileEntry {
        FileEntry {
            bytes: None,
            good: Vec::new(),
            problem: None,
        }
    }
}

impl ManifestsCluster {
    /// Reads the folder once, synchronously (so start-up sees its endpoints), puts the result
    /// into the store with [`Store::reset_cluster`], and returns.
    ///
    /// Errors only if the folder cannot be listed; broken files are reported (log, counters)
    /// and simply contribute nothing.
    pub fn load(
        cluster: &str,
        dir: &Path,
        store: Arc<Store>,
    ) -> Result<Arc<ManifestsCluster>, ManifestsError> {
        let this = ManifestsCluster {
            cluster: Arc::from(cluster),
            dir: dir.to_path_buf(),
            store,
            state: Mutex::default(),
        };
        {
            let mut state = this.lock();
            let names = this.list().map_err(|source| ManifestsError::ReadDir {
                dir: this.dir.clone(),
                source,
            })?;
            this.read(&mut state, names);
        }
        Ok(Arc::new(this))
    }

    /// Watches the folder and re-reads it on change, until the returned guard is dropped.
    ///
    /// Threading: notify's own thread delivers the OS events to a dedicated std thread
    /// (`podgate-manifests-<cluster>`) that coalesces them (a read starts once no event came for
    /// 50 ms, or 300 ms after the first one at the latest) and calls [`ManifestsCluster::reload`],
    /// so [`Listener`](crate::Listener)s are called on that thread. No tokio runtime is needed
    /// or used; calling this from inside one is fine. Dropping the guard stops and joins the
    /// thread (waiting for at most one read in progress).
    ///
    /// The folder itself is watched (not each file), so editors that write a temp file and
    /// rename it into place are seen. Any change in the folder triggers a read, whatever the
    /// name: a ConfigMap volume swaps its hidden `..data` symlink. If the folder itself is
    /// deleted or replaced, the watch ends with it (logged); the last state stays in the store.
    ///
    /// Also re-reads once right after the watch is in place, so changes made between
    /// [`ManifestsCluster::load`] and this call are not missed.
    pub fn watch(self: &Arc<Self>) -> Result<WatchGuard, ManifestsError> {
        let (tx, rx) = mpsc::channel::<Message>();
        let events = tx.clone();
        let mut watcher = notify::recommended_watcher(move |event| {
            // Fails only once the reading thread is gone, when events no longer matter.
            let _ = events.send(Message::Event(event));
        })
        .map_err(|source| self.watch_error(source))?;
        watcher
            .watch(&self.dir, RecursiveMode::NonRecursive)
            .map_err(|source| self.watch_error(source))?;

        let this = Arc::clone(self);
        let thread = std::thread::Builder::new()
            .name(format!("podgate-manifests-{}", self.cluster))
            .spawn(move || this.watch_loop(rx))
            .map_err(|source| self.watch_error(notify::Error::io(source)))?;
        self.reload();
        Ok(WatchGuard {
            stop: tx,
            thread: Some(thread),
            _watcher: watcher,
        })
    }

    /// Re-reads the folder now (also what the watcher calls) and updates the store.
    ///
    /// If the folder cannot be listed, that is reported and the store keeps what it had: a
    /// passing problem must not empty the upstreams.
    pub fn reload(&self) {
        let mut state = self.lock();
        match self.list() {
            Ok(names) => self.read(&mut state, names),
            Err(e) => {
                let problem = format!("cannot read folder {}: {e}", self.dir.display());
                self.report(&mut state.status, &problem);
                state.status.last_error = Some(problem);
            }
        }
    }

    /// Counters and the last problem.
    pub fn status(&self) -> ManifestsStatus {
        self.lock().status.clone()
    }

    /// The cluster name this folder stands for.
    pub fn cluster(&self) -> &str {
        &self.cluster
    }

    /// The folder.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, ReadState> {
        // A panic mid-read leaves per-file entries each whole; the next read is still correct.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn watch_error(&self, source: notify::Error) -> ManifestsError {
        ManifestsError::Watch {
            dir: self.dir.clone(),
            source,
        }
    }

    fn report(&self, status: &mut ManifestsStatus, problem: &str) {
        log::error!("manifests cluster {}: {problem}", self.cluster);
        status.errors += 1;
    }

    /// Names of the manifest files in the folder, sorted.
    fn list(&self) -> io::Result<Vec<String>> {
        let mut names = Vec::new();
        for entry in fs::read_dir(&self.dir)? {
            let entry = entry?;
            let Ok(name) = entry.file_name().into_string() else {
                continue;
            };
            if !is_manifest_name(&name) {
                continue;
            }
            // fs::metadata follows symlinks: a link to a regular file counts.
            match fs::metadata(entry.path()) {
                Ok(meta) if meta.is_file() => names.push(name),
                _ => {}
            }
        }
        names.sort();
        Ok(names)
    }

    /// Reads `names`, updates the per-file cache and status, and resets the cluster in the store.
    fn read(&self, state: &mut ReadState, names: Vec<String>) {
        let ReadState { files, status } = state;
        files.retain(|name, _| names.binary_search(name).is_ok());
        let mut reported = None;
        for name in names {
            let bytes = match fs::read(self.dir.join(&name)) {
                Ok(bytes) => bytes,
                // Deleted between listing and reading: gone, like a file not listed.
                Err(e) if e.kind() == io::ErrorKind::NotFound => {
                    files.remove(&name);
                    continue;
                }
                Err(e) => {
                    let problem = format!("{name}: cannot read: {e}");
                    self.report(status, &problem);
                    let entry = files.entry(name).or_insert_with(FileEntry::new);
                    entry.bytes = None;
                    entry.problem = Some(problem.clone());
                    reported = Some(problem);
                    continue;
                }
            };
            if files
                .get(&name)
                .is_some_and(|entry| entry.bytes.as_ref() == Some(&bytes))
            {
                continue;
            }
            let (objects, problem) = match parse_file(&bytes) {
                Ok((objects, problems)) => {
                    for problem in &problems {
                        self.report(status, &format!("{name}: {problem}"));
                    }
                    (
                        Some(objects),
                        problems.last().map(|p| format!("{name}: {p}")),
                    )
                }
                Err(problem) => {
                    let had_good = files.get(&name).is_some_and(|e| !e.good.is_empty());
                    let consequence = if had_good {
                        "keeping its last good content"
                    } else {
                        "file ignored"
                    };
                    let problem = format!("{name}: {problem} ({consequence})");
                    self.report(status, &problem);
                    (None, Some(problem))
                }
            };
            if problem.is_some() {
                reported.clone_from(&problem);
            }
            let entry = files.entry(name).or_insert_with(FileEntry::new);
            entry.bytes = Some(bytes);
            entry.problem = problem;
            if let Some(objects) = objects {
                entry.good = objects;
            }
        }

        status.reloads += 1;
        status.files = files.len();
        status.last_reload = Some(SystemTime::now());
        status.last_error =
            reported.or_else(|| files.values().find_map(|entry| entry.problem.clone()));
        let services = self.services(files);
        self.store.reset_cluster(&self.cluster, services);
    }

    /// Groups the good objects of all files by Service, each with the labels of its Pods.
    fn services(&self, files: &BTreeMap<String, FileEntry>) -> HashMap<ServiceKey, ServiceState> {
        // Kubernetes puts objects without a namespace into "default"; so do we.
        fn namespace_of(namespace: &Option<String>) -> &str {
            namespace.as_deref().unwrap_or("default")
        }
        let mut services: HashMap<ServiceKey, ServiceState> = HashMap::new();
        // (namespace, name) → labels.
        let mut pods: HashMap<(&str, &str), &BTreeMap<String, String>> = HashMap::new();
        for (file, entry) in files {
            for object in &entry.good {
                let (namespace, service) = match object {
                    Object::Service(s) => (&s.metadata.namespace, s.metadata.name.as_deref()),
                    Object::Slice { service, slice } => {
                        (&slice.metadata.namespace, Some(service.as_str()))
                    }
                    Object::Pod {
                        namespace,
                        name,
                        labels,
                    } => {
                        let at = (namespace_of(namespace), name.as_str());
                        if pods.insert(at, labels).is_some() {
                            log::warn!(
                                "manifests cluster {}: {file}: Pod {}/{name} defined again; \
                                 this one wins",
                                self.cluster,
                                at.0
                            );
                        }
                        continue;
                    }
                };
                let namespace = namespace_of(namespace);
                let key =
                    ServiceKey::new(self.cluster.clone(), namespace, service.unwrap_or_default());
                let state = services.entry(key.clone()).or_default();
                match object {
                    Object::Service(service) => {
                        if state.service.is_some() {
                            log::warn!(
                                "manifests cluster {}: {file}: Service {key} defined again; \
                                 this one wins",
                                self.cluster
                            );
                        }
                        state.service = Some((**service).clone());
                    }
                    Object::Slice { slice, .. } => {
                        let name = slice.metadata.name.clone().unwrap_or_default();
                        if state.slices.contains_key(&name) {
                            log::warn!(
                                "manifests cluster {}: {file}: EndpointSlice {name} of {key} \
                                 defined again; this one wins",
                                self.cluster
                            );
                        }
                        state.slices.insert(name, Arc::new((**slice).clone()));
                    }
                    Object::Pod { .. } => {}
                }
            }
        }
        // Only the Pods the endpoints name, so that an unrelated Pod's labels change no state.
        for (key, state) in &mut services {
            let mut labels = BTreeMap::new();
            for slice in state.slices.values() {
                for endpoint in &slice.endpoints {
                    let Some(target) = endpoint
                        .target_ref
                        .as_ref()
                        .filter(|r| r.kind.as_deref() == Some("Pod"))
                    else {
                        continue;
                    };
                    let Some(name) = target.name.as_deref() else {
                        continue;
                    };
                    let namespace = target.namespace.as_deref().unwrap_or(&key.namespace);
                    if let Some(pod) = pods.get(&(namespace, name)) {
                        labels.insert(name.to_owned(), (*pod).clone());
                    }
                }
            }
            state.pods = Some(labels);
        }
        services
    }

    fn watch_loop(&self, rx: mpsc::Receiver<Message>) {
        loop {
            // Wait for the first event that may mean a change.
            match rx.recv() {
                Ok(Message::Event(event)) if self.is_change(&event) => {}
                Ok(Message::Event(_)) => continue,
                Ok(Message::Stop) | Err(_) => return,
            }
            let first = Instant::now();
            let mut last = first;
            loop {
                let deadline = (last + QUIET).min(first + MAX_DELAY);
                let Some(left) = deadline.checked_duration_since(Instant::now()) else {
                    break;
                };
                match rx.recv_timeout(left) {
                    Ok(Message::Event(event)) => {
                        if self.is_change(&event) {
                            last = Instant::now();
                        }
                    }
                    Err(RecvTimeoutError::Timeout) => break,
                    Ok(Message::Stop) | Err(RecvTimeoutError::Disconnected) => return,
                }
            }
            self.reload();
        }
    }

    /// Whether a notify event may mean the folder's content changed.
    fn is_change(&self, event: &notify::Result<notify::Event>) -> bool {
        let event = match event {
            Ok(event) => event,
            Err(e) => {
                // Could be a lost event; reading again is the safe answer.
                log::warn!("manifests cluster {}: watch error: {e}", self.cluster);
                return true;
            }
        };
        if event.need_rescan() {
            return true;
        }
        if matches!(event.kind, EventKind::Remove(_)) && event.paths.iter().any(|p| p == &self.dir)
        {
            log::warn!(
                "manifests cluster {}: folder {} was removed; changes are no longer seen (restart to watch it again)",
                self.cluster,
                self.dir.display()
            );
        }
        match event.kind {
            // Our own reads open and close the files: those events must not trigger reads.
            EventKind::Access(AccessKind::Close(AccessMode::Write)) => true,
            EventKind::Access(_) => false,
            _ => true,
        }
    }
}

/// Keeps a [`ManifestsCluster::watch`] running; dropping it stops the watch.
#[must_use = "the watch stops when the guard is dropped"]
pub struct WatchGuard {
    stop: mpsc::Sender<Message>,
    thread: Option<JoinHandle<()>>,
    _watcher: notify::RecommendedWatcher,
}

impl Drop for WatchGuard {
    fn drop(&mut self) {
        let _ = self.stop.send(Message::Stop);
        if let Some(thread) = self.thread.take() {
            // Joined so that no read happens after the guard is gone; but not when dropped by a
            // listener running on the watch thread itself, which would wait for itself forever.
            if thread.thread().id() != std::thread::current().id() {
                let _ = thread.join();
            }
        }
    }
}

enum Message {
    Event(notify::Result<notify::Event>),
    Stop,
}

/// Whether a file name is a manifest: `.yaml`/`.yml`, not hidden, not an editor leftover.
fn is_manifest_name(name: &str) -> bool {
    let lower = name.to_ascii_lowercase();
    (lower.ends_with(".yaml") || lower.ends_with(".yml"))
        && !name.starts_with('.') // hidden, and emacs' `.#name` lock files
        && !name.starts_with('#') // emacs auto-save `#name#`
        && !name.ends_with('~')
}
