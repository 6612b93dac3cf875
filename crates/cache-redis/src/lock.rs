//! The fill lock: across every instance, one generation per key at a time.
//!
//! `SET lock:<key> <random token> NX PX <ttl>` takes it. Only the holder of the token
//! can extend it (while generating) or release it, each by a script that compares the
//! token first, never a plain `DEL`. The value itself is written by a script that
//! checks the lock is still ours (a fence): a holder paused past its lock TTL, whose
//! lock another instance has since taken, cannot overwrite the newer value. The lock
//! and the value share the key's hash tag, so the script runs on one Cluster slot.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use redis::Script;

use crate::backend::RedisBackend;
use cache_core::CacheKey;
use cache_core::StoreError;

/// A held lock's proof of ownership.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LockToken(String);

impl LockToken {
    /// A fresh token, for [`FillLock::try_acquire_as`].
    pub fn random() -> Self {
        Self(hex::encode(rand::random::<[u8; 16]>()))
    }

    /// A token handed over in a job: the worker holds the lock its publisher took.
    pub fn from_job(token: String) -> Self {
        Self(token)
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

const EXTEND: &str = r"
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 0";

/// KEYS: lock, tombstone. ARGV: token, ttl ms, when the job was enqueued (ms). 1 when
/// the lock is (now) ours; 0 when another's, or when it is gone and the entry was
/// erased after the job was enqueued (see [`FillLock::erase`]).
const ADOPT: &str = r"
local holder = redis.call('GET', KEYS[1])
if holder == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return 1
end
local erased = tonumber(redis.call('GET', KEYS[2]) or '0')
if not holder and erased < tonumber(ARGV[3]) then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
  return 1
end
return 0";

/// KEYS: lock, tombstone. ARGV: token, ttl ms, when the caller's work began (ms).
/// 1 taken (or already held with this token), 0 held by another, -1 erased since the
/// work began.
const ACQUIRE: &str = r"
local erased = tonumber(redis.call('GET', KEYS[2]) or '0')
if erased >= tonumber(ARGV[3]) then
  return -1
end
if redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) then
  return 1
end
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return 1
end
return 0";

/// KEYS: value, lock, tombstone. ARGV: tombstone ttl ms, the erasure's time (ms). 1
/// when a value was deleted.
const ERASE: &str = r"
local deleted = redis.call('DEL', KEYS[1])
redis.call('DEL', KEYS[2])
redis.call('SET', KEYS[3], ARGV[2], 'PX', ARGV[1])
return deleted";

/// What [`FillLock::try_acquire_since`] found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Acquired {
    Taken(LockToken),
    /// Someone holds the lock.
    Held,
    /// The entry was erased after the caller's work began: that work must not store.
    Erased,
}

const RELEASE: &str = r"
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0";

/// KEYS: lock, value. ARGV: token, value bytes, ttl ms, `absent` or `replace`.
const FENCED_SET: &str = r"
if redis.call('GET', KEYS[1]) ~= ARGV[1] then
  return 0
end
if ARGV[4] == 'absent' and redis.call('EXISTS', KEYS[2]) == 1 then
  return 2
end
redis.call('SET', KEYS[2], ARGV[2], 'PX', ARGV[3])
return 1";

/// Whether a fenced write may replace a value that is already stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WriteMode {
    /// Filling a miss: a value stored meanwhile (or one a failed read missed) stands.
    IfAbsent,
    /// Refreshing: the new value replaces the old.
    Replace,
}

/// What a fenced write did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FencedWrite {
    Written,
    /// The lock is no longer ours: whoever holds it now writes.
    LockLost,
    /// `IfAbsent`, and a value was already there: it stands.
    AlreadyStored,
}

#[derive(Debug, Clone)]
pub struct FillLock {
    backend: Arc<RedisBackend>,
    ttl: Duration,
}

impl FillLock {
    pub fn new(backend: Arc<RedisBackend>, ttl: Duration) -> Self {
        Self { backend, ttl }
    }

    pub fn ttl(&self) -> Duration {
        self.ttl
    }

    fn ttl_ms(&self) -> u64 {
        u64::try_from(self.ttl.as_millis())
            .unwrap_or(u64::MAX)
            .max(1)
    }

    /// Takes the lock for work that began at `since_ms` (Unix ms), unless the entry was
    /// erased since: a request, flight or job older than the erasure must not bring
    /// the entry back.
    pub async fn try_acquire_since(
        &self,
        key: &CacheKey,
        since_ms: i64,
    ) -> Result<Acquired, StoreError> {
        self.try_acquire_as(key, LockToken::random(), since_ms)
            .await
    }

    /// [`Self::try_acquire_since`] with the caller's token, so that it can be asked
    /// again after an error: a call that timed out may have taken the lock, and the
    /// retry with the same token then finds it ours instead of held by a stranger.
    pub async fn try_acquire_as(
        &self,
        key: &CacheKey,
        token: LockToken,
        since_ms: i64,
    ) -> Result<Acquired, StoreError> {
        let answer = self
            .eval(
                ACQUIRE,
                [key.lock_key(), key.tombstone_key()],
                [
                    token.0.clone(),
                    self.ttl_ms().to_string(),
                    since_ms.to_string(),
                ],
            )
            .await?;
        Ok(match answer {
            1 => Acquired::Taken(token),
            -1 => Acquired::Erased,
            _ => Acquired::Held,
        })
    }

    /// The lock's token if we took it, `None` if someone holds it.
    pub async fn try_acquire(&self, key: &CacheKey) -> Result<Option<LockToken>, StoreError> {
        let token = LockToken::random();
        let (lock, value, ttl) = (key.lock_key(), token.0.clone(), self.ttl_ms());
        let taken: Option<String> = self
            .backend
            .call(|mut conn| async move {
                redis::cmd("SET")
                    .arg(lock)
                    .arg(value)
                    .arg("NX")
                    .arg("PX")
                    .arg(ttl)
                    .query_async(&mut conn)
                    .await
            })
            .await?;
        Ok(taken.map(|_| token))
    }

    /// Pushes the expiry out by a full TTL; `false` when the lock is no longer ours.
    pub async fn extend(&self, key: &CacheKey, token: &LockToken) -> Result<bool, StoreError> {
        self.token_script(EXTEND, key, token, true).await
    }

    /// Takes the lock for a token handed over in a job, whose publisher took it at
    /// `enqueued_ms`: `true` when it is ours (still, or again because it had expired),
    /// `false` when another holder has it, or when it had gone and the entry was
    /// erased since the job was enqueued.
    pub async fn adopt(
        &self,
        key: &CacheKey,
        token: &LockToken,
        enqueued_ms: i64,
    ) -> Result<bool, StoreError> {
        let answer = self
            .eval(
                ADOPT,
                [key.lock_key(), key.tombstone_key()],
                [
                    token.0.clone(),
                    self.ttl_ms().to_string(),
                    enqueued_ms.to_string(),
                ],
            )
            .await?;
        Ok(answer == 1)
    }

    /// Erases the entry, in one step: deletes the value, revokes the fill lock (a
    /// generation in flight then finds its fenced write refused), and leaves a
    /// tombstone holding the erasure's time for `tombstone_ttl`, so that work begun
    /// before it (a waiting flight, a job still queued) cannot take the lock back.
    /// Work begun after it takes a new lock and stores as usual. Times are the
    /// instances' clocks, so they must agree to well within a request's duration.
    /// `true` when a value was deleted.
    pub async fn erase(&self, key: &CacheKey, tombstone_ttl: Duration) -> Result<bool, StoreError> {
        let ttl_ms = u64::try_from(tombstone_ttl.as_millis())
            .unwrap_or(u64::MAX)
            .max(1);
        let deleted = self
            .eval(
                ERASE,
                [key.as_str().to_owned(), key.lock_key(), key.tombstone_key()],
                [
                    ttl_ms.to_string(),
                    cache_core::envelope::now_ms().to_string(),
                ],
            )
            .await?;
        Ok(deleted == 1)
    }

    /// Runs one of the scripts over an entry's keys (they share its hash tag, so one
    /// Cluster slot) and reads its integer answer.
    async fn eval<const K: usize, const A: usize>(
        &self,
        script: &'static str,
        keys: [String; K],
        args: [String; A],
    ) -> Result<i64, StoreError> {
        self.backend
            .call(|mut conn| async move {
                let script = Script::new(script);
                let mut invocation = script.prepare_invoke();
                for key in keys {
                    invocation.key(key);
                }
                for arg in args {
                    invocation.arg(arg);
                }
                invocation.invoke_async(&mut conn).await
            })
            .await
    }

    /// Runs one of the lock scripts (KEYS: the lock; ARGV: the token, and the TTL in
    /// milliseconds when `with_ttl`); `true` when it answered 1.
    async fn token_script(
        &self,
        script: &'static str,
        key: &CacheKey,
        token: &LockToken,
        with_ttl: bool,
    ) -> Result<bool, StoreError> {
        let (lock, value) = (key.lock_key(), token.0.clone());
        let answer = if with_ttl {
            self.eval(script, [lock], [value, self.ttl_ms().to_string()])
                .await?
        } else {
            self.eval(script, [lock], [value]).await?
        };
        Ok(answer == 1)
    }

    /// Runs `work` while extending the lock every third of its TTL. The extender stops
    /// when `work` ends, panics or is dropped, or when the lock is no longer ours.
    pub async fn hold_while<F: std::future::Future>(
        &self,
        key: &CacheKey,
        token: &LockToken,
        work: F,
    ) -> F::Output {
        let alive = self.keep_alive(key, token);
        let output = work.await;
        drop(alive);
        output
    }

    /// Extends the lock every third of its TTL until the returned guard is dropped, or
    /// until the lock turns out not to be ours any more ([`KeepAlive::lost`]): released
    /// by whoever it was handed to, revoked by an erasure, or expired.
    pub fn keep_alive(&self, key: &CacheKey, token: &LockToken) -> KeepAlive {
        let lost = Arc::new(AtomicBool::new(false));
        let task = tokio::spawn(keep_extended(
            self.clone(),
            key.clone(),
            token.clone(),
            Arc::clone(&lost),
        ));
        KeepAlive { task, lost }
    }

    /// Deletes the lock if it is still ours; `false` when it was not.
    pub async fn release(&self, key: &CacheKey, token: &LockToken) -> Result<bool, StoreError> {
        self.token_script(RELEASE, key, token, false).await
    }

    /// Writes `value` under `key` only while `token` holds the lock.
    pub async fn write_if_held(
        &self,
        key: &CacheKey,
        token: &LockToken,
        value: Vec<u8>,
        ttl: Duration,
        mode: WriteMode,
    ) -> Result<FencedWrite, StoreError> {
        let (lock, name, owner) = (key.lock_key(), key.as_str().to_owned(), token.0.clone());
        let ttl_ms = u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX).max(1);
        let mode = match mode {
            WriteMode::IfAbsent => "absent",
            WriteMode::Replace => "replace",
        };
        let written: i64 = self
            .backend
            .call(|mut conn| async move {
                Script::new(FENCED_SET)
                    .key(lock)
                    .key(name)
                    .arg(owner)
                    .arg(value)
                    .arg(ttl_ms)
                    .arg(mode)
                    .invoke_async(&mut conn)
                    .await
            })
            .await?;
        Ok(match written {
            1 => FencedWrite::Written,
            2 => FencedWrite::AlreadyStored,
            _ => FencedWrite::LockLost,
        })
    }

    /// Whether anyone holds the lock now.
    pub async fn is_held(&self, key: &CacheKey) -> Result<bool, StoreError> {
        let lock = key.lock_key();
        self.backend.call(|mut conn| async move { redis::cmd("EXISTS").arg(lock).query_async(&mut conn).await }).await
    }
}

/// A lock kept alive by [`FillLock::keep_alive`]; dropping it stops the extensions.
#[derive(Debug)]
pub struct KeepAlive {
    task: tokio::task::JoinHandle<()>,
    lost: Arc<AtomicBool>,
}

impl KeepAlive {
    /// Whether an extension found the lock no longer ours.
    pub fn lost(&self) -> bool {
        self.lost.load(Ordering::Acquire)
    }
}

impl Drop for KeepAlive {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn keep_extended(lock: FillLock, key: CacheKey, token: LockToken, lost: Arc<AtomicBool>) {
    let every = lock.ttl() / 3;
    loop {
        tokio::time::sleep(every).await;
        match lock.extend(&key, &token).await {
            Ok(true) => {}
            Ok(false) => {
                tracing::debug!(cache_key = %key, "fill lock no longer ours; not extending it");
                lost.store(true, Ordering::Release);
                return;
            }
            Err(error) => tracing::warn!(%error, "could not extend the fill lock"),
        }
    }
}
