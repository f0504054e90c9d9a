//! A shared store: the buckets of every podgate replica in one Redis (a server or a Cluster),
//! updated by one Lua script per call so that concurrent replicas never race.
//!
//! Client: the `redis` crate (redis-rs), with its multiplexed tokio connection behind a
//! `ConnectionManager` (one connection per store and process, pipelined, re-established in the
//! background after a failure) and its Cluster client (slot map, MOVED/ASK, node reconnects).
//! Its TLS is tokio-rustls with rustls' default features off, so it uses the `ring` provider the
//! workspace already has; `fred` was the other candidate, but it pins its own rustls provider
//! features per release and brings a larger runtime of its own.
//!
//! Deadlines: every call — including waiting for a connection — ends at the store's `timeout`;
//! then `on_error` decides. After [`FAILURES_TO_SKIP`] failures in a row the store is skipped
//! (on_error at once, no wait) and only one request every [`PROBE_EVERY`] tries Redis, until one
//! call works again; so a dead Redis costs requests no `timeout` each.

use super::clock;
use crate::config::{RateLimitStoreConf, RedisTarget};
use crate::telemetry::rate_limit::StoreMetrics;
use arc_swap::ArcSwapOption;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::cluster::{ClusterClient, ClusterConfig};
use redis::cluster_async::ClusterConnection;
use redis::{IntoConnectionInfo, Script, TlsCertificates};
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// GCRA on one key, atomically (a script runs alone on its Redis). Times are Redis' own clock
/// (`TIME`, microseconds), so replicas whose clocks differ still agree. `ARGV`: the emission
/// interval and the tolerance in microseconds (decimals allowed), and the tokens wanted (1 in
/// exact mode, a lease in batched mode). Grants as many as fit, up to the number wanted. The TAT
/// is kept with `%.17g` (all of a double's digits) and expires when the bucket is full again,
/// which loses nothing: a missing key is a full bucket. Returns `{granted, remaining, reset_us,
/// retry_us}`.
pub const SCRIPT: &str = r#"
local interval = tonumber(ARGV[1])
local tolerance = tonumber(ARGV[2])
local want = tonumber(ARGV[3])
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local tat = tonumber(redis.call('GET', KEYS[1]))
if not tat or tat < now then tat = now end
local function room(at)
  local n = math.floor((tolerance + interval - (at - now)) / interval + 1e-6)
  if n < 0 then return 0 end
  return n
end
local granted = math.min(want, room(tat))
if granted > 0 then
  tat = tat + granted * interval
  redis.call('SET', KEYS[1], string.format('%.17g', tat), 'PX', math.ceil((tat - now) / 1000))
end
local retry = 0
if granted == 0 then retry = math.ceil(tat - tolerance - now) end
return {granted, room(tat), math.ceil(tat - now), retry}
"#;

/// Failures in a row after which requests stop waiting for the store.
pub const FAILURES_TO_SKIP: u32 = 3;
/// While skipped, how often one request tries Redis again.
pub const PROBE_EVERY: Duration = Duration::from_millis(100);

/// What Redis answered for one key.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Reply {
    pub granted: u64,
    /// Requests the shared bucket admits right now, after this call.
    pub remaining: u64,
    /// Until the shared bucket is full again.
    pub reset: Duration,
    /// When nothing was granted: until one request would be.
    pub retry_after: Duration,
}

/// Why a call gave no answer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Failure {
    Timeout,
    Connection,
    Server,
    Skipped,
}

#[derive(Clone)]
enum Conn {
    Server(ConnectionManager),
    Cluster(ClusterConnection),
}

// Built once per store; its size does not matter.
#[allow(clippy::large_enum_variant)]
enum Client {
    Server(redis::Client),
    Cluster(ClusterClient),
}

pub struct RedisStore {
    pub conf: Arc<RateLimitStoreConf>,
    client: Result<Client, String>,
    /// Made on the first call, inside the runtime that serves it.
    conn: ArcSwapOption<Conn>,
    script: Script,
    failures: AtomicU32,
    /// While skipped: the clock time after which the next request probes.
    next_probe: AtomicU64,
    metrics: StoreMetrics,
}

impl std::fmt::Debug for RedisStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisStore")
            .field("name", &self.conf.name)
            .finish()
    }
}

impl RedisStore {
    /// The store of `conf`; connects on its first call. A client that cannot be built (which a
    /// validated config does not produce) makes every call fail, so `on_error` decides.
    pub fn new(conf: Arc<RateLimitStoreConf>) -> RedisStore {
        let client = client(&conf);
        if let Err(e) = &client {
            log::error!("rate-limit store {}: {e}", conf.name);
        }
        RedisStore {
            metrics: StoreMetrics::new(&conf.name),
            conf,
            client,
            conn: ArcSwapOption::empty(),
            script: Script::new(SCRIPT),
            failures: AtomicU32::new(0),
            next_probe: AtomicU64::new(0),
        }
    }

    /// Asks the shared bucket `key` for up to `want` requests: GCRA with `interval` and
    /// `tolerance` in microseconds (as decimal text). Never takes longer than the store's
    /// `timeout`.
    pub async fn take(
        &self,
        key: &[u8],
        interval_us: &str,
        tolerance_us: &str,
        want: u64,
    ) -> Result<Reply, Failure> {
        if self.failures.load(Ordering::Relaxed) >= FAILURES_TO_SKIP && !self.probe_now() {
            self.metrics.skipped.inc();
            return Err(Failure::Skipped);
        }
        let started = Instant::now();
        let call = async {
            let mut conn = self.conn()?;
            let mut invocation = self.script.key(key);
            invocation.arg(interval_us).arg(tolerance_us).arg(want);
            let reply: Result<(i64, i64, i64, i64), redis::RedisError> = match &mut conn {
                Conn::Server(c) => invocation.invoke_async(c).await,
                Conn::Cluster(c) => invocation.invoke_async(c).await,
            };
            reply.map_err(|e| {
                log::debug!("rate-limit store {}: {e}", self.conf.name);
                match e.is_io_error() || e.is_connection_dropped() || e.is_connection_refusal() {
                    true => Failure::Connection,
                    false if e.is_timeout() => Failure::Timeout,
                    false if e.kind() == redis::ErrorKind::Io => Failure::Connection,
                    false if matches!(e.kind(), redis::ErrorKind::Server(_)) => Failure::Server,
                    false => Failure::Connection,
                }
            })
        };
        let result = match tokio::time::timeout(self.conf.timeout, call).await {
            Ok(r) => r,
            Err(_) => Err(Failure::Timeout),
        };
        self.metrics
            .duration
            .observe(started.elapsed().as_secs_f64());
        match result {
            Ok((granted, remaining, reset_us, retry_us)) => {
                self.failures.store(0, Ordering::Relaxed);
                let us = |v: i64| Duration::from_micros(v.max(0) as u64);
                Ok(Reply {
                    granted: granted.max(0) as u64,
                    remaining: remaining.max(0) as u64,
                    reset: us(reset_us),
                    retry_after: us(retry_us),
                })
            }
            Err(f) => {
                match f {
                    Failure::Timeout => self.metrics.timeout.inc(),
                    Failure::Connection => self.metrics.connection.inc(),
                    Failure::Server => self.metrics.server.inc(),
                    Failure::Skipped => {}
                }
                let n = self.failures.fetch_add(1, Ordering::Relaxed) + 1;
                if n == FAILURES_TO_SKIP {
                    log::warn!(
                        "rate-limit store {}: {n} calls failed in a row ({f:?}); on_error applies \
                         without waiting until Redis answers again",
                        self.conf.name
                    );
                }
                self.next_probe
                    .store(clock() + PROBE_EVERY.as_nanos() as u64, Ordering::Relaxed);
                Err(f)
            }
        }
    }

    /// One request per [`PROBE_EVERY`] may try a store that is being skipped.
    fn probe_now(&self) -> bool {
        let now = clock();
        let next = self.next_probe.load(Ordering::Relaxed);
        now >= next
            && self
                .next_probe
                .compare_exchange(
                    next,
                    now + PROBE_EVERY.as_nanos() as u64,
                    Ordering::Relaxed,
                    Ordering::Relaxed,
                )
                .is_ok()
    }

    /// The connection, made on first use (lock-free: two first callers may both build one; the
    /// loser's is dropped).
    fn conn(&self) -> Result<Conn, Failure> {
        if let Some(c) = &*self.conn.load() {
            return Ok(Conn::clone(c));
        }
        let client = self.client.as_ref().map_err(|_| Failure::Connection)?;
        // The library's own timeouts only clean up calls podgate already gave up on.
        let connect = Duration::from_secs(1);
        let response = Duration::from_secs(2);
        let conn = match client {
            Client::Server(c) => {
                let config = ConnectionManagerConfig::new()
                    .set_connection_timeout(Some(connect))
                    .set_response_timeout(Some(response))
                    .set_number_of_retries(2)
                    .set_max_delay(Duration::from_millis(500));
                Conn::Server(
                    ConnectionManager::new_lazy_with_config(c.clone(), config).map_err(|e| {
                        log::warn!("rate-limit store {}: {e}", self.conf.name);
                        Failure::Connection
                    })?,
                )
            }
            Client::Cluster(c) => {
                let config = ClusterConfig::new()
                    .set_connection_timeout(connect)
                    .set_response_timeout(response);
                Conn::Cluster(c.get_pending_async_connection_with_config(config))
            }
        };
        let new = Arc::new(conn);
        let prev = self
            .conn
            .compare_and_swap(&None::<Arc<Conn>>, Some(new.clone()));
        Ok(match &*prev {
            Some(won) => Conn::clone(won),
            None => Conn::clone(&new),
        })
    }
}

/// The redis-rs client of a store: URL(s), the password of `password_file`, the CA of `ca_file`.
fn client(conf: &RateLimitStoreConf) -> Result<Client, String> {
    let certs = || TlsCertificates {
        client_tls: None,
        root_cert: conf.ca_pem.clone(),
    };
    let info = |url: &str| -> Result<redis::ConnectionInfo, String> {
        let info = url.into_connection_info().map_err(|e| e.to_string())?;
        Ok(match &conf.password {
            Some(p) => {
                let settings = info.redis_settings().clone().set_password(&p.0);
                info.set_redis_settings(settings)
            }
            None => info,
        })
    };
    match &conf.target {
        RedisTarget::Server(url) => {
            let info = info(&url.0)?;
            match conf.tls && conf.ca_pem.is_some() {
                true => redis::Client::build_with_tls(info, certs()),
                false => redis::Client::open(info),
            }
            .map(Client::Server)
            .map_err(|e| e.to_string())
        }
        RedisTarget::Cluster(urls) => {
            let nodes = urls
                .iter()
                .map(|u| info(&u.0))
                .collect::<Result<Vec<_>, _>>()?;
            let mut builder = ClusterClient::builder(nodes);
            if conf.tls && conf.ca_pem.is_some() {
                builder = builder.certs(certs());
            }
            builder
                .build()
                .map(Client::Cluster)
                .map_err(|e| e.to_string())
        }
    }
}
