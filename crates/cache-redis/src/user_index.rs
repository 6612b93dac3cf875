//! The user index in Redis, shared by the fleet: a set per user (`useridx:{<hash>}`).
//!
//! Each set expires a TTL (twice `CACHE_TTL`, set by the gateway) after its last
//! write, so that random user ids cannot grow the index without bound. The cost: under
//! `volatile-lfu` a set with a TTL can be evicted, and a rarely touched one may go
//! before the narratives it lists, which its user's erasure then misses. Redis must
//! have room enough not to evict (docs/redis.md, "Memory pressure").
//!
//! Recording never waits: the index buffers `(user, key)` pairs, once each, and
//! [`UserIndex::flush`] writes them every second in one pipeline per Cluster slot (the
//! gateway's counter loop calls it). An erasure therefore reads the index twice, the second
//! time after a flush interval, so a request answered just before it, whose pair was
//! still buffered in some gateway, is erased too.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use cache_core::user_index::{UserIndex, KEYS_PER_USER};
use cache_core::{CacheKey, StoreError};

use futures::StreamExt as _;

use crate::backend::{key_slot, RedisBackend, RedisTarget};

/// How often the buffer is written.
pub const FLUSH_INTERVAL: Duration = Duration::from_secs(1);
/// Pipelines a flush has in flight at once.
const PIPELINES_AT_ONCE: usize = 8;
/// Users buffered between flushes at most; past it (Redis down for long) new users are
/// not indexed, and a warning says so.
pub const PENDING_USERS: usize = 100_000;

#[derive(Debug)]
pub struct RedisUserIndex {
    backend: Arc<RedisBackend>,
    pending: Mutex<HashMap<String, HashSet<String>>>,
    /// Every write sets the user's set to expire this long after it.
    ttl: Duration,
}

fn index_key(user: &str) -> String {
    format!("useridx:{{{user}}}")
}

/// Users, and pairs, written in one pipeline at most: a flush after a long outage
/// holds many, and one huge pipeline would outlast the call timeout every time.
const USERS_PER_PIPELINE: usize = 500;
const PAIRS_PER_PIPELINE: usize = 5_000;

/// What became of one user's pairs in a flush.
enum Written {
    Done,
    /// Redis was unreachable or slow: kept for the next flush.
    Retry(StoreError),
    /// Redis refused the write (the key holds another type): dropped, or it would be
    /// retried forever and hold up the rest.
    Refused(StoreError),
}

impl RedisUserIndex {
    /// An index whose sets expire `ttl` after their last write: no shorter than
    /// `CACHE_TTL`, so they outlive every entry they list that nobody asked for
    /// since, and an index of random user ids does not grow without bound.
    pub fn new(backend: Arc<RedisBackend>, ttl: Duration) -> Self {
        Self {
            backend,
            pending: Mutex::new(HashMap::new()),
            ttl,
        }
    }

    /// Writes `users`' pairs in one pipeline (their sets must share a Cluster slot):
    /// `SADD` and `PEXPIRE` for each. A pipeline Redis refuses is written again user by
    /// user, so that one refused set does not hold up the others.
    async fn write(
        &self,
        users: Vec<(String, HashSet<String>)>,
    ) -> Vec<(String, HashSet<String>, Written)> {
        match self.write_pipeline(&users).await {
            Ok(()) => users
                .into_iter()
                .map(|(u, k)| (u, k, Written::Done))
                .collect(),
            Err(StoreError::Refused(_)) if users.len() > 1 => {
                let mut each = Vec::with_capacity(users.len());
                for (user, keys) in users {
                    let one = vec![(user, keys)];
                    let outcome = match self.write_pipeline(&one).await {
                        Ok(()) => Written::Done,
                        Err(error @ StoreError::Refused(_)) => Written::Refused(error),
                        Err(error) => Written::Retry(error),
                    };
                    let (user, keys) = one.into_iter().next().expect("one user");
                    each.push((user, keys, outcome));
                }
                each
            }
            Err(error) => users
                .into_iter()
                .map(|(u, k)| {
                    let outcome = match &error {
                        StoreError::Refused(_) => Written::Refused(error.clone()),
                        _ => Written::Retry(error.clone()),
                    };
                    (u, k, outcome)
                })
                .collect(),
        }
    }

    async fn write_pipeline(&self, users: &[(String, HashSet<String>)]) -> Result<(), StoreError> {
        let ttl_ms = u64::try_from(self.ttl.as_millis()).unwrap_or(u64::MAX);
        let mut pipe = redis::pipe();
        for (user, keys) in users {
            let set = index_key(user);
            pipe.cmd("SADD")
                .arg(&set)
                .arg(keys.iter().collect::<Vec<_>>())
                .ignore();
            pipe.cmd("PEXPIRE").arg(&set).arg(ttl_ms).ignore();
        }
        self.backend
            .call(|mut conn| {
                let pipe = pipe.clone();
                async move { pipe.query_async::<()>(&mut conn).await }
            })
            .await
    }

    /// Puts pairs back for the next flush, within the buffer's bound.
    fn keep(&self, user: String, keys: HashSet<String>) {
        let mut pending = self.pending.lock().unwrap_or_else(PoisonError::into_inner);
        if pending.len() < PENDING_USERS || pending.contains_key(&user) {
            pending.entry(user).or_default().extend(keys);
        }
    }
}

#[async_trait::async_trait]
impl UserIndex for RedisUserIndex {
    /// Other instances write what they recorded every [`FLUSH_INTERVAL`] (when their
    /// Redis calls succeed): half an interval more covers one that was mid-flush.
    fn late_writes_within(&self) -> Option<Duration> {
        Some(FLUSH_INTERVAL * 3 / 2)
    }

    fn record(&self, user: &str, key: &CacheKey) {
        let mut pending = self.pending.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(keys) = pending.get_mut(user) {
            if keys.len() < KEYS_PER_USER && !keys.contains(key.as_str()) {
                keys.insert(key.as_str().to_owned());
            }
        } else if pending.len() < PENDING_USERS {
            pending.insert(user.to_owned(), HashSet::from([key.as_str().to_owned()]));
        } else {
            drop(pending);
            tracing::warn!("user index buffer full (Redis unreachable for long?): a request's user is not indexed for erasure");
        }
    }

    /// One pipeline per Cluster slot (per few hundred users on one server), sent a
    /// few at a time. What fails to send is kept for the next flush; a set Redis
    /// refuses is dropped with a warning. Returns the first error, if any.
    async fn flush(&self) -> Result<(), StoreError> {
        let batch =
            std::mem::take(&mut *self.pending.lock().unwrap_or_else(PoisonError::into_inner));
        if batch.is_empty() {
            return Ok(());
        }
        let clustered = matches!(self.backend.target(), RedisTarget::Cluster(_));
        let mut by_slot: HashMap<u16, Vec<(String, HashSet<String>)>> = HashMap::new();
        for (user, keys) in batch {
            let slot = if clustered {
                key_slot(&index_key(&user))
            } else {
                0
            };
            by_slot.entry(slot).or_default().push((user, keys));
        }
        let pipelines = by_slot.into_values().flat_map(|users| {
            let mut chunks = vec![Vec::new()];
            let mut pairs = 0;
            for (user, keys) in users {
                let chunk = chunks.last_mut().expect("one chunk at least");
                if !chunk.is_empty()
                    && (chunk.len() >= USERS_PER_PIPELINE
                        || pairs + keys.len() > PAIRS_PER_PIPELINE)
                {
                    chunks.push(Vec::new());
                    pairs = 0;
                }
                pairs += keys.len();
                chunks
                    .last_mut()
                    .expect("one chunk at least")
                    .push((user, keys));
            }
            chunks
        });
        let written: Vec<_> = futures::stream::iter(pipelines)
            .map(|users| self.write(users))
            .buffer_unordered(PIPELINES_AT_ONCE)
            .collect()
            .await;
        let mut first_error = None;
        for (user, keys, outcome) in written.into_iter().flatten() {
            match outcome {
                Written::Done => {}
                Written::Retry(error) => {
                    self.keep(user, keys);
                    first_error.get_or_insert(error);
                }
                Written::Refused(error) => {
                    tracing::warn!(%error, "user index set refused by Redis; these pairs are not indexed for erasure");
                    first_error.get_or_insert(error);
                }
            }
        }
        first_error.map_or(Ok(()), Err)
    }

    /// Writes this user's own buffered pairs first, then reads the shared set: other
    /// users' failing writes do not fail it.
    async fn keys(&self, user: &str) -> Result<Vec<CacheKey>, StoreError> {
        let own = self
            .pending
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove_entry(user);
        if let Some(own) = own {
            if let Some((user, keys, outcome)) = self.write(vec![own]).await.into_iter().next() {
                match outcome {
                    Written::Done => {}
                    Written::Retry(error) | Written::Refused(error) => {
                        self.keep(user, keys);
                        return Err(error);
                    }
                }
            }
        }
        let set = index_key(user);
        let members: Vec<String> = self
            .backend
            .call(|mut conn| {
                let set = set.clone();
                async move {
                    redis::cmd("SMEMBERS")
                        .arg(&set)
                        .query_async(&mut conn)
                        .await
                }
            })
            .await?;
        Ok(members
            .iter()
            .filter_map(|member| CacheKey::parse(member).ok())
            .collect())
    }

    async fn forget(&self, user: &str, keys: &[CacheKey]) -> Result<(), StoreError> {
        if keys.is_empty() {
            return Ok(());
        }
        let set = index_key(user);
        let members: Vec<String> = keys.iter().map(|k| k.as_str().to_owned()).collect();
        self.backend
            .call(|mut conn| {
                let (set, members) = (set.clone(), members.clone());
                async move {
                    redis::cmd("SREM")
                        .arg(&set)
                        .arg(members)
                        .query_async::<()>(&mut conn)
                        .await
                }
            })
            .await
    }
}
