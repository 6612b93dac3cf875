//! Which cache keys each user asked for: what an erasure by user removes.
//!
//! Users appear only as the keyed hash of their id. [`RedisUserIndex`] keeps a set per
//! user (`useridx:{<hash>}`), shared by the fleet. The sets have no TTL on purpose:
//! under `volatile-lfu` Redis evicts only keys with one, and a rarely touched index
//! would go long before the popular narratives it lists, leaving them unerasable;
//! [`MemoryUserIndex`] keeps the same in process for embedded mode.
//!
//! Recording never waits: the Redis index buffers `(user, key)` pairs, once each, and
//! [`UserIndex::flush`] writes them every second, a call per user (the gateway's
//! counter loop calls it). An erasure therefore reads the index twice, the second
//! time after a flush interval, so a request answered just before it, whose pair was
//! still buffered in some gateway, is erased too. Keys leave the index only once they
//! are erased ([`UserIndex::forget`]), so an erasure that fails half-way leaves the
//! rest for its retry.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use crate::key::CacheKey;
use crate::redis_backend::RedisBackend;
use crate::store::StoreError;

/// How often the Redis index's buffer is written.
pub const FLUSH_INTERVAL: Duration = Duration::from_secs(1);
/// Users buffered between flushes at most; past it (Redis down for long) new users are
/// not indexed, and a warning says so.
pub const PENDING_USERS: usize = 100_000;
/// At most this many users in process; past it the oldest-recorded are forgotten, with
/// a warning: an embedded gateway is not a durable store.
pub const MEMORY_USERS: usize = 100_000;
/// At most this many keys per user, in process and in one buffered batch.
pub const KEYS_PER_USER: usize = 1_000;

#[async_trait::async_trait]
pub trait UserIndex: Send + Sync + std::fmt::Debug + 'static {
    /// Notes that `user` asked for `key`; never blocks.
    fn record(&self, user: &str, key: &CacheKey);
    /// Writes what is buffered (a no-op where nothing is).
    async fn flush(&self) -> Result<(), StoreError>;
    /// The keys `user` asked for; they stay indexed until [`UserIndex::forget`].
    async fn keys(&self, user: &str) -> Result<Vec<CacheKey>, StoreError>;
    /// Removes `keys`, now erased, from `user`'s index.
    async fn forget(&self, user: &str, keys: &[CacheKey]) -> Result<(), StoreError>;
    /// How long a pair another instance recorded may take to be readable here (it
    /// buffers before writing); `None` where every pair is readable at once.
    fn late_writes_within(&self) -> Option<Duration> {
        None
    }
}

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
        let mut forgotten = 0;
        while state.users.len() >= MEMORY_USERS {
            match state.order.pop_front() {
                Some(oldest) => {
                    state.users.remove(&oldest);
                    forgotten += 1;
                }
                None => break,
            }
        }
        state
            .users
            .insert(user.to_owned(), HashSet::from([key.clone()]));
        state.order.push_back(user.to_owned());
        drop(state);
        if forgotten > 0 {
            tracing::warn!(
                forgotten,
                "in-process user index full: the oldest users can no longer be erased by user"
            );
        }
    }

    async fn flush(&self) -> Result<(), StoreError> {
        Ok(())
    }

    async fn keys(&self, user: &str) -> Result<Vec<CacheKey>, StoreError> {
        let state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        Ok(state
            .users
            .get(user)
            .map(|keys| keys.iter().cloned().collect())
            .unwrap_or_default())
    }

    async fn forget(&self, user: &str, keys: &[CacheKey]) -> Result<(), StoreError> {
        let mut state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        let now_empty = state.users.get_mut(user).is_some_and(|held| {
            for key in keys {
                held.remove(key);
            }
            held.is_empty()
        });
        if now_empty {
            state.users.remove(user);
            state.order.retain(|u| u != user);
        }
        Ok(())
    }
}

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

#[cfg(test)]
mod tests {
    use super::*;

    fn key(n: u32) -> CacheKey {
        CacheKey::parse(&format!("narr:v1:e589996ee664:{{{n:064x}}}")).unwrap()
    }

    #[tokio::test]
    async fn memory_index_keeps_keys_until_they_are_forgotten() {
        let index = MemoryUserIndex::default();
        index.record("u1", &key(1));
        index.record("u1", &key(2));
        index.record("u1", &key(1));
        index.record("u2", &key(1));
        let mut held = index.keys("u1").await.unwrap();
        held.sort_by(|a, b| a.as_str().cmp(b.as_str()));
        assert_eq!(held, [key(1), key(2)]);
        // Only what was erased is forgotten.
        index.forget("u1", &[key(1)]).await.unwrap();
        assert_eq!(index.keys("u1").await.unwrap(), [key(2)]);
        index.forget("u1", &[key(2)]).await.unwrap();
        assert!(index.keys("u1").await.unwrap().is_empty());
        assert_eq!(index.keys("u2").await.unwrap(), [key(1)]);
    }
}
