//! Which cache keys each user asked for: what an erasure by user removes.
//!
//! Users appear only as the keyed hash of their id. [`RedisUserIndex`] keeps a set per
//! user (`useridx:{<hash>}`, living as long as a cache entry), shared by the fleet;
//! [`MemoryUserIndex`] keeps the same in process for embedded mode.
//!
//! Recording never waits: the Redis index buffers `(user, key)` pairs, once each, and
//! [`UserIndex::flush`] writes them every second in one pipeline (the gateway's
//! counter loop calls it). An erasure therefore reads the index twice, the second
//! time after a flush interval, so a request answered just before it, whose pair was
//! still buffered in some gateway, is erased too.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use crate::key::CacheKey;
use crate::redis_backend::RedisBackend;
use crate::store::StoreError;

/// How often the Redis index's buffer is written.
pub const FLUSH_INTERVAL: Duration = Duration::from_secs(1);

#[async_trait::async_trait]
pub trait UserIndex: Send + Sync + std::fmt::Debug + 'static {
    /// Notes that `user` asked for `key`; never blocks.
    fn record(&self, user: &str, key: &CacheKey);
    /// Writes what is buffered (a no-op where nothing is).
    async fn flush(&self) -> Result<(), StoreError>;
    /// The keys `user` asked for, removed from the index.
    async fn take(&self, user: &str) -> Result<Vec<CacheKey>, StoreError>;
}

/// At most this many users in process; past it the oldest-recorded are forgotten (and
/// counted): an embedded gateway is not a durable store.
pub const MEMORY_USERS: usize = 100_000;
/// At most this many keys per user, in process and in one buffered batch.
pub const KEYS_PER_USER: usize = 1_000;

#[derive(Debug, Default)]
pub struct MemoryUserIndex {
    state: Mutex<MemoryState>,
}

#[derive(Debug, Default)]
struct MemoryState {
    users: HashMap<String, HashSet<CacheKey>>,
    order: std::collections::VecDeque<String>,
}

#[async_trait::async_trait]
impl UserIndex for MemoryUserIndex {
    fn record(&self, user: &str, key: &CacheKey) {
        let mut state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(keys) = state.users.get_mut(user) {
            if keys.len() < KEYS_PER_USER && !keys.contains(key) {
                keys.insert(key.clone());
            }
            return;
        }
        while state.users.len() >= MEMORY_USERS {
            match state.order.pop_front() {
                Some(oldest) => {
                    state.users.remove(&oldest);
                }
                None => break,
            }
        }
        state
            .users
            .insert(user.to_owned(), HashSet::from([key.clone()]));
        state.order.push_back(user.to_owned());
    }

    async fn flush(&self) -> Result<(), StoreError> {
        Ok(())
    }

    async fn take(&self, user: &str) -> Result<Vec<CacheKey>, StoreError> {
        let mut state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        state.order.retain(|u| u != user);
        Ok(state
            .users
            .remove(user)
            .map(|keys| keys.into_iter().collect())
            .unwrap_or_default())
    }
}

#[derive(Debug)]
pub struct RedisUserIndex {
    backend: Arc<RedisBackend>,
    /// How long a user's set lives after its last addition: a cache entry's TTL.
    ttl: Duration,
    pending: Mutex<HashMap<String, HashSet<String>>>,
}

fn index_key(user: &str) -> String {
    format!("useridx:{{{user}}}")
}

impl RedisUserIndex {
    pub fn new(backend: Arc<RedisBackend>, ttl: Duration) -> Self {
        Self {
            backend,
            ttl,
            pending: Mutex::new(HashMap::new()),
        }
    }
}

#[async_trait::async_trait]
impl UserIndex for RedisUserIndex {
    fn record(&self, user: &str, key: &CacheKey) {
        let mut pending = self.pending.lock().unwrap_or_else(PoisonError::into_inner);
        match pending.get_mut(user) {
            Some(keys) => {
                if keys.len() < KEYS_PER_USER && !keys.contains(key.as_str()) {
                    keys.insert(key.as_str().to_owned());
                }
            }
            None => {
                pending.insert(user.to_owned(), HashSet::from([key.as_str().to_owned()]));
            }
        }
    }

    async fn flush(&self) -> Result<(), StoreError> {
        let batch =
            std::mem::take(&mut *self.pending.lock().unwrap_or_else(PoisonError::into_inner));
        if batch.is_empty() {
            return Ok(());
        }
        let ttl = i64::try_from(self.ttl.as_secs()).unwrap_or(i64::MAX).max(1);
        // One slot per user (the hash tag), so each user's pair of commands is its own
        // pipeline entry; a Cluster client routes each command by its key.
        let batch_for_retry = batch.clone();
        let result = self
            .backend
            .call(|mut conn| {
                let batch = batch.clone();
                async move {
                    let mut pipe = redis::pipe();
                    for (user, keys) in &batch {
                        let set = index_key(user);
                        pipe.cmd("SADD")
                            .arg(&set)
                            .arg(keys.iter().collect::<Vec<_>>())
                            .ignore();
                        pipe.cmd("EXPIRE").arg(&set).arg(ttl).ignore();
                    }
                    pipe.query_async::<()>(&mut conn).await
                }
            })
            .await;
        if result.is_err() {
            // Kept for the next flush: an erasure must not miss them for a Redis blip.
            let mut pending = self.pending.lock().unwrap_or_else(PoisonError::into_inner);
            for (user, keys) in batch_for_retry {
                pending.entry(user).or_default().extend(keys);
            }
        }
        result
    }

    async fn take(&self, user: &str) -> Result<Vec<CacheKey>, StoreError> {
        // This gateway's own buffered pairs first, then the shared set.
        self.flush().await?;
        let set = index_key(user);
        let members: Vec<String> = self
            .backend
            .call(|mut conn| {
                let set = set.clone();
                async move {
                    let (members,): (Vec<String>,) = redis::pipe()
                        .atomic()
                        .cmd("SMEMBERS")
                        .arg(&set)
                        .cmd("DEL")
                        .arg(&set)
                        .ignore()
                        .query_async(&mut conn)
                        .await?;
                    Ok(members)
                }
            })
            .await?;
        Ok(members
            .iter()
            .filter_map(|member| CacheKey::parse(member).ok())
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(n: u32) -> CacheKey {
        CacheKey::parse(&format!("narr:v1:e589996ee664:{{{n:064x}}}")).unwrap()
    }

    #[tokio::test]
    async fn memory_index_gives_each_users_keys_once_and_forgets_them() {
        let index = MemoryUserIndex::default();
        index.record("u1", &key(1));
        index.record("u1", &key(2));
        index.record("u1", &key(1));
        index.record("u2", &key(1));
        let mut taken = index.take("u1").await.unwrap();
        taken.sort_by(|a, b| a.as_str().cmp(b.as_str()));
        assert_eq!(taken, [key(1), key(2)]);
        assert!(index.take("u1").await.unwrap().is_empty());
        assert_eq!(index.take("u2").await.unwrap(), [key(1)]);
    }
}
