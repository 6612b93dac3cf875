//! Which cache keys each user asked for: what an erasure by user removes.
//!
//! Users appear only as the keyed hash of their id. [`UserIndex`] is the trait;
//! [`MemoryUserIndex`] keeps the index in process for embedded mode, and
//! `cache-redis`'s `RedisUserIndex` keeps it in Redis, shared by the fleet. Recording
//! never waits: an index may buffer pairs and write them on [`UserIndex::flush`], and
//! says how late such writes may appear ([`UserIndex::late_writes_within`]), so an
//! erasure reads the index again after that. Keys leave the index only once they are
//! erased ([`UserIndex::forget`]), so an erasure that fails half-way leaves the rest
//! for its retry.

use std::collections::{HashMap, HashSet};
use std::sync::{Mutex, PoisonError};
use std::time::Duration;

use crate::key::CacheKey;
use crate::store::StoreError;

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

/// Maps keyed by keyed hashes (users' hashes, and cache keys, which are HMACs): a
/// client cannot choose where its entries land without the secret, so a fast seeded
/// hash is safe here.
type FastMap<K, V> = HashMap<K, V, foldhash::fast::RandomState>;
type FastSet<T> = HashSet<T, foldhash::fast::RandomState>;

#[derive(Debug, Default)]
struct MemoryState {
    users: FastMap<String, FastSet<CacheKey>>,
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
            .insert(user.to_owned(), FastSet::from_iter([key.clone()]));
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
