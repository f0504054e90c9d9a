//! Real `redis-server` processes for tests (Debian's package; `.ci/run` installs it): each on a
//! free loopback port, with no persistence, killed when dropped. Readiness is a `PING` answered
//! within a deadline, never a sleep.
//!
//! `--port 0` does not pick a port in Redis (it turns TCP off), so a port is reserved by binding
//! 127.0.0.1:0 and releasing it; a server that then fails to bind exits, and is started again on
//! another port.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A port free a moment ago, below 55536 so that a Cluster node's bus port (+10000) fits too,
/// and with that bus port free as well.
fn free_port() -> u16 {
    loop {
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
        let port = l.local_addr().unwrap().port();
        if port < 55_536 && std::net::TcpListener::bind(("127.0.0.1", port + 10_000)).is_ok() {
            return port;
        }
    }
}

pub struct RedisServer {
    pub port: u16,
    child: Option<Child>,
    dir: tempfile::TempDir,
    /// Extra arguments (TLS, cluster mode), kept for restarts.
    args: Vec<String>,
    /// TLS: the server speaks only TLS on `port`; PING goes through redis-cli with these files.
    tls: Option<TlsFiles>,
}

#[derive(Clone)]
pub struct TlsFiles {
    pub ca: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
}

impl RedisServer {
    pub fn start() -> RedisServer {
        Self::start_with(Vec::new(), None)
    }

    /// A server in cluster mode (not yet part of a cluster).
    pub fn start_cluster_node() -> RedisServer {
        let args = [
            "--cluster-enabled",
            "yes",
            "--cluster-config-file",
            "nodes.conf",
        ];
        Self::start_with(args.iter().map(|s| s.to_string()).collect(), None)
    }

    /// A server that speaks only TLS, with `tls`'s certificate; clients are not asked for one.
    pub fn start_tls(tls: TlsFiles) -> RedisServer {
        Self::start_with(Vec::new(), Some(tls))
    }

    fn start_with(args: Vec<String>, tls: Option<TlsFiles>) -> RedisServer {
        for _ in 0..20 {
            let mut s = RedisServer {
                port: free_port(),
                child: None,
                dir: tempfile::tempdir().unwrap(),
                args: args.clone(),
                tls: tls.clone(),
            };
            if s.spawn() {
                return s;
            }
        }
        panic!("redis-server did not start on any of 20 ports");
    }

    /// Starts the process on `self.port`; false when it exited (the port was taken meanwhile).
    fn spawn(&mut self) -> bool {
        let port = self.port.to_string();
        let mut cmd = Command::new("redis-server");
        cmd.current_dir(self.dir.path())
            .args(["--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
            .args(["--dir", &self.dir.path().display().to_string()]);
        match &self.tls {
            None => {
                cmd.args(["--port", &port]);
            }
            Some(t) => {
                cmd.args([
                    "--port",
                    "0",
                    "--tls-port",
                    &port,
                    "--tls-auth-clients",
                    "no",
                ])
                .args(["--tls-cert-file", &t.cert.display().to_string()])
                .args(["--tls-key-file", &t.key.display().to_string()])
                .args(["--tls-ca-cert-file", &t.ca.display().to_string()]);
            }
        }
        let mut child = cmd
            .args(&self.args)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server is installed (apt-get install redis-server)");
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = child.try_wait() {
                return false;
            }
            if self.ping() {
                self.child = Some(child);
                return true;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        let _ = child.kill();
        let _ = child.wait();
        false
    }

    /// The server answers PING.
    pub fn ping(&self) -> bool {
        match &self.tls {
            None => {
                let Ok(mut s) = TcpStream::connect(("127.0.0.1", self.port)) else {
                    return false;
                };
                let _ = s.set_read_timeout(Some(Duration::from_millis(500)));
                let mut buf = [0u8; 64];
                s.write_all(b"PING\r\n").is_ok()
                    && s.read(&mut buf)
                        .is_ok_and(|n| buf[..n].starts_with(b"+PONG"))
            }
            Some(_) => self.cli(&["PING"]).trim() == "PONG",
        }
    }

    /// `redis-cli` against this server; its standard output.
    pub fn cli(&self, args: &[&str]) -> String {
        let mut cmd = Command::new("redis-cli");
        cmd.args(["-h", "127.0.0.1", "-p", &self.port.to_string()]);
        if let Some(t) = &self.tls {
            cmd.args(["--tls", "--cacert", &t.ca.display().to_string()]);
        }
        let out = cmd
            .args(args)
            .stderr(Stdio::null())
            .output()
            .expect("redis-cli runs");
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    pub fn url(&self) -> String {
        match self.tls {
            None => format!("redis://127.0.0.1:{}/0", self.port),
            Some(_) => format!("rediss://127.0.0.1:{}/0", self.port),
        }
    }

    /// Kills the server (SIGKILL: no goodbye to clients).
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts it again on the same port (its data is gone).
    pub fn restart(&mut self) {
        self.kill();
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if self.spawn() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!("redis-server did not come back on port {}", self.port);
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Three cluster-mode servers joined into one Redis Cluster (no replicas), ready when every
/// node says `cluster_state:ok`.
pub struct RedisCluster {
    pub nodes: Vec<RedisServer>,
}

impl RedisCluster {
    pub fn start() -> RedisCluster {
        let nodes: Vec<RedisServer> = (0..3).map(|_| RedisServer::start_cluster_node()).collect();
        let addrs: Vec<String> = nodes
            .iter()
            .map(|n| format!("127.0.0.1:{}", n.port))
            .collect();
        let out = Command::new("redis-cli")
            .arg("--cluster")
            .arg("create")
            .args(&addrs)
            .args(["--cluster-replicas", "0", "--cluster-yes"])
            .output()
            .expect("redis-cli runs");
        assert!(
            out.status.success(),
            "cluster create: {}",
            String::from_utf8_lossy(&out.stdout)
        );
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let ok = nodes
                .iter()
                .all(|n| n.cli(&["CLUSTER", "INFO"]).contains("cluster_state:ok"));
            if ok {
                return RedisCluster { nodes };
            }
            assert!(Instant::now() < deadline, "the cluster did not become ok");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn urls(&self) -> Vec<String> {
        self.nodes
            .iter()
            .map(|n| format!("redis://127.0.0.1:{}", n.port))
            .collect()
    }
}
