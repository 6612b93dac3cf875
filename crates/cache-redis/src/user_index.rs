//! The user index in Redis, shared by the fleet: a set per user (`useridx:{<hash>}`).
//!
//! The sets have no TTL on purpose: under `volatile-lfu` Redis evicts only keys with
//! one, and a rarely touched index would go long before the popular narratives it
//! lists, leaving them unerasable.
//!
//! Recording never waits: the index buffers `(user, key)` pairs, once each, and
//! [`UserIndex::flush`] writes them every second, a call per user (the gateway's
//! counter loop calls it). An erasure therefore reads the index twice, the second
//! time after a flush interval, so a request answered just before it, whose pair was
//! still buffered in some gateway, is erased too.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use cache_core::user_index::{UserIndex, KEYS_PER_USER};
use cache_core::{CacheKey, StoreError};

use crate::backend::RedisBackend;

/// How often the buffer is written.
pub const FLUSH_INTERVAL: Duration = Duration::from_secs(1);
/// Users buffered between flushes at most; past it (Redis down for long) new users are
/// not indexed, and a warning says so.
pub const PENDING_USERS: usize = 100_000;

#[derive(Debug)]
pub struct RedisUserIndex {
    backend: Arc<RedisBackend>,
    pending: Mutex<HashMap<String, HashSet<String>>>,
}

fn index_key(user: &str) -> String {
    format!("useridx:{{{user}}}")
}

impl RedisUserIndex {
    pub fn new(backend: Arc<RedisBackend>) -> Self {
        Self {
            backend,
            pending: Mutex::new(HashMap::new()),
        }
    }

    async fn write(&self, user: &str, members: Vec<String>) -> Result<(), StoreError> {
        let set = index_key(user);
        self.backend
            .call(|mut conn| {
                let (set, members) = (set.clone(), members.clone());
                async move {
                    redis::cmd("SADD")
                        .arg(&set)
                        .arg(members)
                        .query_async::<()>(&mut conn)
                        .await
                }
            })
            .await
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

    async fn flush(&self) -> Result<(), StoreError> {
        let batch =
            std::mem::take(&mut *self.pending.lock().unwrap_or_else(PoisonError::into_inner));
        let mut failure = None;
        let mut unsent = HashMap::new();
        for (user, keys) in batch {
            if failure.is_some() {
                unsent.insert(user, keys);
                continue;
            }
            // One call per user: each user's set is its own Cluster slot, and a
            // pipeline may not span slots.
            if let Err(error) = self.write(&user, keys.iter().cloned().collect()).await {
                failure = Some(error);
                unsent.insert(user, keys);
            }
        }
        let Some(error) = failure else {
            return Ok(());
        };
        // Kept for the next flush (an erasure must not miss them for a Redis blip),
        // within the same bound as new ones.
        let mut pending = self.pending.lock().unwrap_or_else(PoisonError::into_inner);
        for (user, keys) in unsent {
            if pending.len() < PENDING_USERS || pending.contains_key(&user) {
                pending.entry(user).or_default().extend(keys);
            }
        }
        Err(error)
    }

    async fn keys(&self, user: &str) -> Result<Vec<CacheKey>, StoreError> {
        // This gateway's own buffered pairs first, then the shared set.
        self.flush().await?;
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
