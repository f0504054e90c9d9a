use super::*;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::time::Instant;

/// A fresh folder under the system's temp dir, removed when dropped.
struct TempDir(PathBuf);

impl TempDir {
    fn new(name: &str) -> TempDir {
        static N: AtomicU64 = AtomicU64::new(0);
        let dir = std::env::temp_dir().join(format!(
            "podgate-access-log-{name}-{}-{}",
            std::process::id(),
            N.fetch_add(1, SeqCst)
        ));
        std::fs::create_dir_all(&dir).unwrap();
        TempDir(dir)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn settings(path: &Path, buffer: usize, flush: Duration) -> AccessLogSettings {
    AccessLogSettings {
        sink: Sink::File(path.to_path_buf()),
        buffer,
        flush,
    }
}

fn lines(path: &Path) -> Vec<String> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .map(String::from)
        .collect()
}

fn line(log: &AccessLog, text: &str) {
    log.append(|out| out.extend_from_slice(text.as_bytes()));
}

#[test]
fn every_line_of_many_threads_reaches_the_file_at_close() {
    let dir = TempDir::new("close");
    let path = dir.0.join("access.log");
    // A long flush: only hand-overs and the close write anything.
    let log = AccessLog::start(&settings(&path, 4 << 10, Duration::from_secs(60))).unwrap();
    let threads: Vec<_> = (0..4)
        .map(|t| {
            let log = log.clone();
            std::thread::spawn(move || {
                for i in 0..10_000 {
                    line(&log, &format!("{{\"thread\":{t},\"i\":{i}}}"));
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    let before_close = lines(&path).len();
    assert!(
        before_close < 40_000,
        "some lines wait in buffers until close"
    );
    log.close();
    let mut seen = std::collections::HashSet::new();
    for l in lines(&path) {
        let v: serde_json::Value = serde_json::from_str(&l).expect("whole lines only");
        assert!(
            seen.insert((v["thread"].as_u64(), v["i"].as_u64())),
            "{l} twice"
        );
    }
    assert_eq!(seen.len(), 40_000);
    assert_eq!(log.dropped(), 0);
    // A line logged after close is counted, not lost silently and not written.
    line(&log, "{\"late\":true}");
    assert_eq!(log.dropped(), 1);
    assert_eq!(lines(&path).len(), 40_000);
    log.close(); // a second close does nothing
}

#[test]
fn a_quiet_threads_line_is_written_within_flush() {
    let dir = TempDir::new("flush");
    let path = dir.0.join("access.log");
    let log = AccessLog::start(&settings(&path, 64 << 10, Duration::from_millis(100))).unwrap();
    // Logged from a thread that then stays alive and quiet.
    let (stop, quiet) = std::sync::mpsc::channel::<()>();
    let writer = {
        let log = log.clone();
        std::thread::spawn(move || {
            line(&log, "{\"n\":1}");
            let _ = quiet.recv();
        })
    };
    let start = Instant::now();
    while lines(&path).is_empty() {
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "the line never reached the file without a close"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    assert_eq!(lines(&path), ["{\"n\":1}"]);
    drop(stop);
    writer.join().unwrap();
    log.close();
}

#[test]
fn reopen_after_a_rotation_writes_to_a_new_file_and_loses_nothing() {
    let dir = TempDir::new("reopen");
    let path = dir.0.join("access.log");
    let rotated = dir.0.join("access.log.1");
    let log = AccessLog::start(&settings(&path, 64 << 10, Duration::from_secs(60))).unwrap();
    line(&log, "{\"before\":1}");
    line(&log, "{\"before\":2}");
    std::fs::rename(&path, &rotated).unwrap();
    log.reopen();
    // The writer re-opens asynchronously: the new file appears once it did.
    let start = Instant::now();
    while !path.exists() {
        assert!(start.elapsed() < Duration::from_secs(10), "never re-opened");
        std::thread::sleep(Duration::from_millis(5));
    }
    line(&log, "{\"after\":1}");
    log.close();
    assert_eq!(lines(&rotated), ["{\"before\":1}", "{\"before\":2}"]);
    assert_eq!(lines(&path), ["{\"after\":1}"]);
}

#[test]
fn a_sink_nobody_reads_drops_and_counts_but_never_blocks() {
    // A FIFO with a reader that does not read: the writer blocks once the pipe is full, the
    // queue fills, and further batches are dropped. Logging must go on at full speed.
    let dir = TempDir::new("fifo");
    let path = dir.0.join("access.fifo");
    let c = std::ffi::CString::new(path.to_str().unwrap()).unwrap();
    // SAFETY: plain libc calls on a path this test owns.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
    let reader = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(&path)
        .unwrap();
    let log = AccessLog::start(&settings(&path, 4 << 10, Duration::from_secs(60))).unwrap();
    let text = format!("{{\"pad\":\"{}\"}}", "x".repeat(200));
    let total = 100_000u64; // ~20 MB: more than the pipe and the queue hold
    for _ in 0..total {
        line(&log, &text);
    }
    let lost = log.dropped();
    assert!(lost > 0, "a blocked sink must make the log drop");
    // Read everything; then the writer can finish.
    let reading = std::thread::spawn(move || {
        use std::io::Read;
        let mut reader = reader;
        let mut buf = vec![0; 1 << 16];
        let mut newlines = 0u64;
        let start = Instant::now();
        loop {
            match reader.read(&mut buf) {
                Ok(0) => break, // the writer closed its end
                Ok(n) => newlines += buf[..n].iter().filter(|b| **b == b'\n').count() as u64,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    assert!(
                        start.elapsed() < Duration::from_secs(60),
                        "the writer never closed"
                    );
                    std::thread::sleep(Duration::from_millis(1));
                }
                Err(e) => panic!("{e}"),
            }
        }
        newlines
    });
    log.close();
    let read = reading.join().unwrap();
    assert!(read > 0);
    assert_eq!(
        read + lost,
        total,
        "every line written or counted as dropped"
    );
}

#[test]
fn request_ids_differ() {
    assert_ne!(request_id(), request_id());
    assert_eq!(request_id().len(), 32);
}

#[test]
fn request_ids_are_the_seed_then_the_counter_in_hex() {
    let (a, b) = (request_id(), request_id());
    assert!(a
        .bytes()
        .all(|c| c.is_ascii_hexdigit() && !c.is_ascii_uppercase()));
    assert_eq!(a[..16], b[..16], "one seed per process");
    let (na, nb) = (
        u64::from_str_radix(&a[16..], 16).unwrap(),
        u64::from_str_radix(&b[16..], 16).unwrap(),
    );
    assert!(nb > na, "the counter counts up: {a} then {b}");
    assert_eq!(super::hex16(0x0123_4567_89ab_cdef), *b"0123456789abcdef");
    assert_eq!(super::hex16(u64::MAX), *b"ffffffffffffffff");
}

#[test]
fn lines_a_full_disk_refuses_are_counted_as_dropped() {
    // /dev/full fails every write with ENOSPC, as a full disk does.
    let log = AccessLog::start(&settings(
        Path::new("/dev/full"),
        4 << 10,
        Duration::from_secs(60),
    ))
    .unwrap();
    for i in 0..1_000 {
        line(&log, &format!("{{\"i\":{i}}}"));
    }
    log.close();
    assert_eq!(log.dropped(), 1_000, "every line counted once");
}
