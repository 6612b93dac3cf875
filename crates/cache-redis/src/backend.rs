//! One Redis deployment, standalone or Cluster, shared by everything that talks to it
//! (the store, locks, counters, pub/sub).
//!
//! Connecting is lazy, so a process starts while Redis is down. Every call has a
//! timeout and goes through a [`Breaker`]: while Redis is unreachable, calls fail at
//! once instead of each waiting out a timeout, and a probe every few seconds notices
//! when it is back. The async `ConnectionManager` (standalone) and the cluster
//! connection both reconnect by themselves once established.

use std::future::Future;
use std::sync::{PoisonError, RwLock};
use std::time::Duration;

use redis::aio::{ConnectionLike, ConnectionManager, ConnectionManagerConfig};
use redis::cluster::ClusterClient;
use redis::cluster_async::ClusterConnection;
use redis::{Cmd, Pipeline, RedisError, RedisFuture, RedisResult, Value};

use crate::breaker::{Breaker, BreakerState};
use cache_core::StoreError;

/// A connection to either kind of deployment; cheap to clone.
#[derive(Clone)]
pub enum RedisConn {
    Single(ConnectionManager),
    Cluster(ClusterConnection),
}

impl std::fmt::Debug for RedisConn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Single(_) => "RedisConn::Single",
            Self::Cluster(_) => "RedisConn::Cluster",
        })
    }
}

impl ConnectionLike for RedisConn {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match self {
            Self::Single(c) => c.req_packed_command(cmd),
            Self::Cluster(c) => c.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        cmd: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match self {
            Self::Single(c) => c.req_packed_commands(cmd, offset, count),
            Self::Cluster(c) => c.req_packed_commands(cmd, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Self::Single(c) => c.get_db(),
            Self::Cluster(c) => c.get_db(),
        }
    }
}

/// The Cluster hash slot of `key`: CRC16 (XMODEM) of its hash tag (the part inside the
/// first `{...}`, when not empty) or of the whole key, modulo 16384. Commands of one
/// pipeline must share a slot.
pub fn key_slot(key: &str) -> u16 {
    let bytes = key.as_bytes();
    let tagged = key.find('{').and_then(|open| {
        let close = key[open + 1..].find('}')?;
        (close > 0).then(|| &bytes[open + 1..open + 1 + close])
    });
    crc16::State::<crc16::XMODEM>::calculate(tagged.unwrap_or(bytes)) % 16384
}

/// Where Redis is: `REDIS_URL` is one URL for a standalone server, or several
/// comma-separated seed nodes (or one with `REDIS_CLUSTER=true`) for a Cluster.
/// Its `Debug` shows hosts only: URLs may carry passwords.
#[derive(Clone, PartialEq, Eq)]
pub enum RedisTarget {
    Single(String),
    Cluster(Vec<String>),
}

impl std::fmt::Debug for RedisTarget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let hosts = |urls: &[String]| -> Vec<String> {
            urls.iter()
                .map(|u| {
                    redis::parse_redis_url(u)
                        .map(|p| {
                            format!(
                                "{}:{}",
                                p.host_str().unwrap_or("?"),
                                p.port().unwrap_or(6379)
                            )
                        })
                        .unwrap_or_else(|| "?".to_owned())
                })
                .collect()
        };
        match self {
            Self::Single(url) => f
                .debug_tuple("Single")
                .field(&hosts(std::slice::from_ref(url)))
                .finish(),
            Self::Cluster(urls) => f.debug_tuple("Cluster").field(&hosts(urls)).finish(),
        }
    }
}

impl RedisTarget {
    pub fn parse(urls: &str, cluster: bool) -> Result<Self, String> {
        let urls: Vec<String> = urls
            .split(',')
            .map(str::trim)
            .filter(|u| !u.is_empty())
            .map(str::to_owned)
            .collect();
        for (i, url) in urls.iter().enumerate() {
            // Never echo the URL: it may carry a password.
            redis::parse_redis_url(url)
                .ok_or_else(|| format!("entry {} is not a redis:// URL", i + 1))?;
        }
        match urls.as_slice() {
            [] => Err("no URL given".to_owned()),
            [one] if !cluster => Ok(Self::Single(one.clone())),
            _ => Ok(Self::Cluster(urls)),
        }
    }

    /// One node's URL, for the pub/sub connection (Cluster broadcasts PUBLISH to all).
    pub fn first_url(&self) -> &str {
        match self {
            Self::Single(url) => url,
            Self::Cluster(urls) => &urls[0],
        }
    }
}

#[derive(Debug, Clone, Copy)]
pub struct RedisTimeouts {
    /// Per call.
    pub call: Duration,
    pub connect: Duration,
    /// How long the breaker stays open before probing.
    pub cool_down: Duration,
    /// How long a fill waits for failing Redis to come back before it generates
    /// without the fill lock (`REDIS_FAILOVER_WAIT`): long enough for a Cluster
    /// failover, whose extra LLM calls it saves.
    pub failover_wait: Duration,
}

impl Default for RedisTimeouts {
    fn default() -> Self {
        Self {
            call: Duration::from_millis(250),
            connect: Duration::from_millis(500),
            cool_down: Duration::from_secs(3),
            failover_wait: Duration::from_secs(10),
        }
    }
}

pub struct RedisBackend {
    target: RedisTarget,
    timeouts: RedisTimeouts,
    conn: RwLock<Option<RedisConn>>,
    connecting: tokio::sync::Mutex<()>,
    /// When the last connect attempt failed: callers that queued behind it fail at
    /// once instead of each trying (and timing out) in turn.
    last_connect_failure: std::sync::Mutex<Option<std::time::Instant>>,
    breaker: Breaker,
}

impl std::fmt::Debug for RedisBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisBackend")
            .field("state", &self.state())
            .finish_non_exhaustive()
    }
}

/// Consecutive failed calls that open the breaker.
const FAILURES_TO_OPEN: u32 = 3;

impl RedisBackend {
    pub fn new(target: RedisTarget, timeouts: RedisTimeouts) -> Self {
        Self {
            target,
            timeouts,
            conn: RwLock::new(None),
            connecting: tokio::sync::Mutex::new(()),
            last_connect_failure: std::sync::Mutex::new(None),
            breaker: Breaker::new(FAILURES_TO_OPEN, timeouts.cool_down),
        }
    }

    pub fn target(&self) -> &RedisTarget {
        &self.target
    }

    pub fn timeouts(&self) -> RedisTimeouts {
        self.timeouts
    }

    pub fn state(&self) -> BreakerState {
        self.breaker.state()
    }

    /// How long Redis calls have been failing with no success between.
    pub fn failing_for(&self) -> Option<Duration> {
        self.breaker.failing_for()
    }

    /// Runs one call: refused at once while the breaker is open, bounded by the call
    /// timeout, and counted for the breaker. Errors the server answered with (a wrong
    /// type, a script error) do not count as the backend being down.
    pub async fn call<T, F, Fut>(&self, op: F) -> Result<T, StoreError>
    where
        F: FnOnce(RedisConn) -> Fut,
        Fut: Future<Output = RedisResult<T>>,
    {
        if !self.breaker.allow() {
            return Err(StoreError::Unavailable("redis circuit open".to_owned()));
        }
        self.run(op, false).await
    }

    /// One call past an open breaker (and past a recent failure to connect): what
    /// decides, before an instance pays the LLM on its own, whether Redis is in fact
    /// back. Its success closes the breaker at once. Callers make one, not a stream.
    pub async fn probe<T, F, Fut>(&self, op: F) -> Result<T, StoreError>
    where
        F: FnOnce(RedisConn) -> Fut,
        Fut: Future<Output = RedisResult<T>>,
    {
        self.run(op, true).await
    }

    async fn run<T, F, Fut>(&self, op: F, probing: bool) -> Result<T, StoreError>
    where
        F: FnOnce(RedisConn) -> Fut,
        Fut: Future<Output = RedisResult<T>>,
    {
        let conn = match self.connection(probing).await {
            Ok(conn) => conn,
            Err(error) => {
                self.breaker.record_failure();
                return Err(error);
            }
        };
        match tokio::time::timeout(self.timeouts.call, op(conn)).await {
            Ok(Ok(value)) => {
                self.breaker.record_success();
                Ok(value)
            }
            Ok(Err(error)) if is_unreachable(&error) => {
                self.breaker.record_failure();
                Err(StoreError::Unavailable(error.to_string()))
            }
            Ok(Err(error)) => {
                self.breaker.record_success();
                Err(StoreError::Refused(error.to_string()))
            }
            Err(_) => {
                self.breaker.record_failure();
                Err(StoreError::Timeout)
            }
        }
    }

    fn current(&self) -> Option<RedisConn> {
        self.conn
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    async fn connection(&self, probing: bool) -> Result<RedisConn, StoreError> {
        if let Some(conn) = self.current() {
            return Ok(conn);
        }
        // Wait for whoever is connecting, but no longer than a call may take.
        let _one_at_a_time = tokio::time::timeout(self.timeouts.call, self.connecting.lock())
            .await
            .map_err(|_| StoreError::Timeout)?;
        if let Some(conn) = self.current() {
            return Ok(conn);
        }
        let failed_recently = self
            .last_connect_failure
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .is_some_and(|at| at.elapsed() < self.timeouts.cool_down);
        if failed_recently && !probing {
            return Err(StoreError::Unavailable("redis unreachable".to_owned()));
        }
        let connect = self.connect();
        let outcome = match tokio::time::timeout(self.timeouts.connect * 2, connect).await {
            Ok(Ok(conn)) => Ok(conn),
            Ok(Err(error)) => Err(StoreError::Unavailable(error.to_string())),
            Err(_) => Err(StoreError::Timeout),
        };
        let conn = match outcome {
            Ok(conn) => conn,
            Err(error) => {
                *self
                    .last_connect_failure
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner) = Some(std::time::Instant::now());
                return Err(error);
            }
        };
        *self.conn.write().unwrap_or_else(PoisonError::into_inner) = Some(conn.clone());
        tracing::info!("connected to redis");
        Ok(conn)
    }

    async fn connect(&self) -> RedisResult<RedisConn> {
        match &self.target {
            RedisTarget::Single(url) => {
                let config = ConnectionManagerConfig::new()
                    .set_connection_timeout(self.timeouts.connect)
                    .set_response_timeout(self.timeouts.call)
                    .set_number_of_retries(1)
                    .set_max_delay(1000);
                let client = redis::Client::open(url.as_str())?;
                Ok(RedisConn::Single(
                    ConnectionManager::new_with_config(client, config).await?,
                ))
            }
            RedisTarget::Cluster(urls) => {
                let client = ClusterClient::builder(urls.clone())
                    .connection_timeout(self.timeouts.connect)
                    .response_timeout(self.timeouts.call)
                    .retries(1)
                    .build()?;
                Ok(RedisConn::Cluster(client.get_async_connection().await?))
            }
        }
    }
}

fn is_unreachable(error: &RedisError) -> bool {
    error.is_io_error()
        || error.is_timeout()
        || error.is_connection_dropped()
        || error.is_connection_refusal()
        || error.is_cluster_error()
        // A Cluster client whose node for the slot is gone (a master killed, before
        // its replica is promoted), or a replica that lost its master.
        || matches!(
            error.kind(),
            redis::ErrorKind::ClusterConnectionNotFound | redis::ErrorKind::MasterDown
        )
}

/// The Redis settings every process that shares the cache reads, from the environment:
/// `REDIS_URL`, `REDIS_CLUSTER`, `REDIS_TIMEOUT_MS`, `REDIS_RETRY_AFTER`, `REDIS_FAILOVER_WAIT`,
/// `CACHE_ENCRYPTION_KEY` and `LOCK_TTL`.
#[derive(Debug, Clone)]
pub struct RedisConfig {
    pub target: RedisTarget,
    pub timeouts: RedisTimeouts,
    pub encryption: Option<crate::codec::EncryptionKeys>,
    /// The fill lock's TTL; its holder extends it every third of that while generating.
    pub lock_ttl: Duration,
}

impl RedisConfig {
    /// `None` without `REDIS_URL`.
    pub fn from_vars(
        vars: &cache_core::config::Vars,
    ) -> Result<Option<Self>, cache_core::config::ConfigError> {
        use cache_core::config::ConfigError;
        let cluster = vars.bool_or("REDIS_CLUSTER", false)?;
        let encryption = vars.parse_or("CACHE_ENCRYPTION_KEY", None, |text| {
            crate::codec::EncryptionKeys::parse(text).map(Some)
        })?;
        let call = vars.millis_or("REDIS_TIMEOUT_MS", Duration::from_millis(250))?;
        let cool_down = vars.duration_or("REDIS_RETRY_AFTER", Duration::from_secs(3))?;
        let failover_wait = vars.duration_or("REDIS_FAILOVER_WAIT", Duration::from_secs(10))?;
        let lock_ttl = vars.duration_or("LOCK_TTL", Duration::from_secs(15))?;
        if lock_ttl.is_zero() {
            return Err(ConfigError::new("LOCK_TTL", "must be longer than zero"));
        }
        let Some(url) = vars.get("REDIS_URL") else {
            if encryption.is_some() {
                tracing::warn!("CACHE_ENCRYPTION_KEY applies to values in Redis; without REDIS_URL it is not used");
            }
            return Ok(None);
        };
        let target =
            RedisTarget::parse(&url, cluster).map_err(|m| ConfigError::new("REDIS_URL", m))?;
        let timeouts = RedisTimeouts {
            call,
            connect: call.max(Duration::from_millis(500)),
            cool_down,
            failover_wait,
        };
        Ok(Some(Self {
            target,
            timeouts,
            encryption,
            lock_ttl,
        }))
    }
}
