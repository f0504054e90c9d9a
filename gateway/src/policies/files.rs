//! Following the files policies read (API key files, JWKS, HS256 secrets) without a restart.
//!
//! One thread per set of files (`podgate-policy-files`), never the request path. It learns of
//! changes two ways: notify events on the files' folders (the folder, not the file: editors
//! rename a new file into place, and a Kubernetes Secret volume swaps its `..data` symlink), and
//! a poll every [`POLL`] for where events do not come (network filesystems, an exhausted
//! inotify limit). Either way a file counts as changed only when its bytes differ from the last
//! read (a SHA-256 of them is kept, not the bytes), so the thread's own reads, which raise
//! access events, never loop. Events are gathered until none came for [`QUIET`] (at most
//! [`LONGEST`] after the first), so a file written in pieces is read once, whole.
//!
//! Latency: a change is applied [`QUIET`] after its last event (about 50 ms), or within one
//! [`POLL`] without events.

use notify::{RecursiveMode, Watcher};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::mpsc::{self, RecvTimeoutError};
use std::time::{Duration, Instant};

pub const POLL: Duration = Duration::from_secs(2);
pub const QUIET: Duration = Duration::from_millis(50);
pub const LONGEST: Duration = Duration::from_millis(300);

enum Message {
    Event,
    Stop,
}

/// Keeps the watch running; dropping it tells the thread to stop (without waiting for it: the
/// last holder may be a request thread, which must not block on a file read).
pub struct WatchGuard {
    stop: mpsc::Sender<Message>,
    _watcher: Option<notify::RecommendedWatcher>,
}

impl Drop for WatchGuard {
    fn drop(&mut self) {
        let _ = self.stop.send(Message::Stop);
    }
}

/// A digest of what the file holds now, `None` when it cannot be read.
fn content(path: &Path) -> Option<[u8; 32]> {
    let bytes = std::fs::read(path).ok()?;
    let mut out = [0; 32];
    out.copy_from_slice(ring::digest::digest(&ring::digest::SHA256, &bytes).as_ref());
    Some(out)
}

/// Cheap evidence of a change for the poll: size, modification time, inode.
type Stamp = (u64, std::time::SystemTime, u64);

fn stamp(path: &Path) -> Option<Stamp> {
    use std::os::unix::fs::MetadataExt;
    let m = std::fs::metadata(path).ok()?;
    Some((m.len(), m.modified().ok()?, m.ino()))
}

/// Calls `changed` (on the watch thread) with the files of `paths` whose content changed, until
/// the guard is dropped. The content at the time of this call is the baseline.
pub fn watch(
    paths: Vec<PathBuf>,
    mut changed: impl FnMut(&[PathBuf]) + Send + 'static,
) -> std::io::Result<WatchGuard> {
    let (tx, rx) = mpsc::channel::<Message>();
    let events = tx.clone();
    let mut dirs: Vec<PathBuf> = paths
        .iter()
        .map(|p| {
            p.parent()
                .map_or_else(|| PathBuf::from("."), Path::to_path_buf)
        })
        .map(|d| {
            if d.as_os_str().is_empty() {
                PathBuf::from(".")
            } else {
                d
            }
        })
        .collect();
    dirs.sort();
    dirs.dedup();
    let watcher = notify::recommended_watcher(move |_event: notify::Result<notify::Event>| {
        // Any event (or watch error) means "look again"; the content decides.
        let _ = events.send(Message::Event);
    })
    .and_then(|mut w| {
        for d in &dirs {
            w.watch(d, RecursiveMode::NonRecursive)?;
        }
        Ok(w)
    });
    let watcher = match watcher {
        Ok(w) => Some(w),
        Err(e) => {
            log::warn!(
                "policy files: cannot watch their folders ({e}); changes are seen by polling \
                 every {POLL:?}"
            );
            None
        }
    };
    let mut seen: HashMap<PathBuf, (Option<[u8; 32]>, Option<Stamp>)> = paths
        .iter()
        .map(|p| (p.clone(), (content(p), stamp(p))))
        .collect();
    std::thread::Builder::new()
        .name("podgate-policy-files".into())
        .spawn(move || loop {
            let full = match rx.recv_timeout(POLL) {
                Ok(Message::Event) => {
                    let first = Instant::now();
                    loop {
                        let left = LONGEST.saturating_sub(first.elapsed());
                        match rx.recv_timeout(QUIET.min(left)) {
                            Ok(Message::Event) if !left.is_zero() => continue,
                            Ok(Message::Event) | Err(RecvTimeoutError::Timeout) => break,
                            Ok(Message::Stop) | Err(RecvTimeoutError::Disconnected) => return,
                        }
                    }
                    true
                }
                Err(RecvTimeoutError::Timeout) => false,
                Ok(Message::Stop) | Err(RecvTimeoutError::Disconnected) => return,
            };
            let mut now_changed = Vec::new();
            for (path, (digest, last_stamp)) in seen.iter_mut() {
                let s = stamp(path);
                // The poll reads a file only when its stamp moved; an event reads them all.
                if !full && s == *last_stamp && s.is_some() {
                    continue;
                }
                *last_stamp = s;
                let d = content(path);
                if d != *digest {
                    *digest = d;
                    now_changed.push(path.clone());
                }
            }
            if !now_changed.is_empty() {
                changed(&now_changed);
            }
        })?;
    Ok(WatchGuard {
        stop: tx,
        _watcher: watcher,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    fn wait_for(what: &str, mut ok: impl FnMut() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while !ok() {
            assert!(Instant::now() < deadline, "timed out waiting for {what}");
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    #[test]
    fn a_changed_file_is_reported_once_and_an_unchanged_rewrite_not_at_all() {
        let dir = tempfile::tempdir().unwrap();
        let a = dir.path().join("a");
        let b = dir.path().join("b");
        std::fs::write(&a, "1").unwrap();
        std::fs::write(&b, "1").unwrap();
        let calls: Arc<Mutex<Vec<Vec<PathBuf>>>> = Arc::default();
        let seen = calls.clone();
        let guard = watch(vec![a.clone(), b.clone()], move |c| {
            seen.lock().unwrap().push(c.to_vec())
        })
        .unwrap();
        // Rewritten by rename, as editors and Kubernetes do.
        let tmp = dir.path().join(".a.tmp");
        std::fs::write(&tmp, "2").unwrap();
        std::fs::rename(&tmp, &a).unwrap();
        wait_for("the change of a", || !calls.lock().unwrap().is_empty());
        assert_eq!(calls.lock().unwrap()[0], std::slice::from_ref(&a));
        // The same bytes again: no call. Then b is removed: reported (now unreadable).
        std::fs::write(&a, "2").unwrap();
        std::fs::remove_file(&b).unwrap();
        wait_for("the removal of b", || calls.lock().unwrap().len() >= 2);
        assert_eq!(calls.lock().unwrap()[1], std::slice::from_ref(&b));
        drop(guard);
    }
}
