//! The lock holder's protocol on Redis, written once for the gateway (with Redis,
//! without workers) and the worker.
//!
//! Whoever holds a key's fill lock (taken by a gateway's flight, or adopted by a worker
//! from its job) fills it the same way:
//!
//! 1. **look** in Redis: a value that will do ends the fill (nothing paid, waiters
//!    told); an entry that cannot be read (corrupt, sealed with a key this process
//!    lacks, a format it does not know) is counted and will be *replaced*;
//! 2. **generate** while the lock is extended every third of its TTL, its text going
//!    to the key's live stream as it is written (`cache_redis::live`), so requests
//!    streaming the key on any instance see it;
//! 3. **write** only while the lock is still ours (the fenced script, which also keeps
//!    an erasure's tombstone): only if absent, or over the entry being replaced;
//! 4. **signal** `done` or `failed`, so waiters on every gateway answer at once;
//! 5. **release** the lock (compare-and-delete: never someone else's).
//!
//! Redis calls wait out a failover ([`crate::patience`]); the write only while the
//! lock surely lives (half its TTL after the last extension).

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use cache_core::{CacheKey, CacheStore, Envelope, LiveSink, StoreError, Unwatched};
use cache_redis::live::LiveStream;
use cache_redis::lock::{FencedWrite, FillLock, LockToken, WriteMode};
use cache_redis::signals::{Signal, SignalBus};
use cache_redis::RedisStore;
use prometheus::IntCounter;

use crate::patience::patiently_until;

/// The Redis side of filling a key: the store, the fill lock, the signal bus.
#[derive(Debug, Clone)]
pub struct Holder {
    store: Arc<RedisStore>,
    lock: FillLock,
    bus: Arc<SignalBus>,
    /// Where generations write their text as it comes, for every instance to relay.
    live: LiveStream,
    /// `CACHE_TTL`: how long a written value lives.
    ttl: Duration,
    /// `narrative_unreadable_entries_total`: entries found that could not be read.
    unreadable: IntCounter,
}

/// Which stored value ends a fill without generating.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Want {
    /// Any readable value (a miss, a pre-warm).
    Any,
    /// A value created after this (Unix ms): a refresh replaces the entry created then.
    NewerThan(i64),
}

impl Want {
    fn accepts(self, envelope: &Envelope) -> bool {
        match self {
            Self::Any => true,
            Self::NewerThan(ms) => envelope.created_at_ms > ms,
        }
    }
}

/// Whether a generation's text goes to the key's live stream as it is written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Text {
    /// For every instance's streaming requests: a request waits on this key.
    Streamed,
    /// Nobody waits (a pre-warm): no stream writes for thousands of keys.
    Unwatched,
}

/// How a fill ended. Every variant that carries an envelope carries a complete,
/// valid narrative its caller may answer with.
#[derive(Debug)]
pub enum Filled<E> {
    /// A value that will do was there: nothing was generated.
    Found(Arc<Envelope>),
    /// Generated and written.
    Stored(Arc<Envelope>),
    /// Generated, but a value appeared before the write: that one stands.
    AlreadyStored(Arc<Envelope>),
    /// Generated, but the lock was lost before the write: the new holder writes.
    LockLost(Arc<Envelope>),
    /// Generated, but Redis did not take the write in time.
    NotWritten(Arc<Envelope>, StoreError),
    /// The generation failed; waiters were told.
    Failed(E),
    /// Redis could not be read before generating: nothing was paid.
    LookFailed(StoreError),
}

impl Holder {
    pub fn new(
        store: Arc<RedisStore>,
        lock: FillLock,
        bus: Arc<SignalBus>,
        ttl: Duration,
        unreadable: IntCounter,
    ) -> Self {
        let live = LiveStream::new(
            Arc::clone(store.backend()),
            Arc::clone(&bus),
            store.codec().clone(),
        );
        Self {
            store,
            lock,
            bus,
            live,
            ttl,
            unreadable,
        }
    }

    pub fn live(&self) -> &LiveStream {
        &self.live
    }

    pub fn store(&self) -> &Arc<RedisStore> {
        &self.store
    }

    pub fn lock(&self) -> &FillLock {
        &self.lock
    }

    pub fn bus(&self) -> &Arc<SignalBus> {
        &self.bus
    }

    /// Counts an entry that could not be read, which this fill replaces.
    fn count_unreadable(&self, key: &CacheKey, error: &str) {
        self.unreadable.inc();
        tracing::warn!(cache_key = %key, %error, "stored entry cannot be read; the next generation replaces it");
    }

    /// Fills `key` as the holder of `token`: look, generate with `generate` (given
    /// the key's live stream to write its text to, unless the text is `Unwatched`)
    /// while extending the lock, write fenced, signal, release. See the module's steps.
    pub async fn fill<E, F, Fut>(
        &self,
        key: &CacheKey,
        token: &LockToken,
        want: Want,
        text: Text,
        generate: F,
    ) -> Filled<E>
    where
        F: FnOnce(Arc<dyn LiveSink>) -> Fut,
        Fut: Future<Output = Result<Arc<Envelope>, E>>,
    {
        let filled = self.fill_holding(key, token, want, text, generate).await;
        if let Err(error) = self.lock.release(key, token).await {
            tracing::debug!(%error, "fill lock not released; it expires by itself");
        }
        filled
    }

    async fn fill_holding<E, F, Fut>(
        &self,
        key: &CacheKey,
        token: &LockToken,
        want: Want,
        text: Text,
        generate: F,
    ) -> Filled<E>
    where
        F: FnOnce(Arc<dyn LiveSink>) -> Fut,
        Fut: Future<Output = Result<Arc<Envelope>, E>>,
    {
        let mode = match self.patiently(|| self.store.get(key)).await {
            Ok(Some(envelope)) if want.accepts(&envelope) => {
                self.signal(Signal::Done, key).await;
                return Filled::Found(envelope);
            }
            Ok(Some(_)) => WriteMode::Replace,
            Ok(None) => WriteMode::IfAbsent,
            Err(StoreError::Corrupt(error)) => {
                self.count_unreadable(key, &error);
                WriteMode::Replace
            }
            Err(error) => return Filled::LookFailed(error),
        };
        let generated = match text {
            Text::Streamed => {
                let writer = Arc::new(self.live.writer(key));
                let sink = Arc::clone(&writer) as Arc<dyn LiveSink>;
                // All of the text is in the stream before waiters are told the value
                // is there; the lock is extended meanwhile.
                let streamed = async move {
                    let generated = generate(sink).await;
                    writer.finish().await;
                    generated
                };
                self.lock.hold_while(key, token, streamed).await
            }
            Text::Unwatched => {
                let sink = Arc::new(Unwatched) as Arc<dyn LiveSink>;
                self.lock.hold_while(key, token, generate(sink)).await
            }
        };
        let envelope = match generated {
            Ok(envelope) => envelope,
            Err(error) => {
                self.signal(Signal::Failed, key).await;
                return Filled::Failed(error);
            }
        };
        // Nothing extends the lock from here: the write may wait for Redis only while
        // the lock surely lives (the last extension was at most a third of its TTL ago).
        let deadline = Instant::now() + self.lock.ttl() / 2;
        let value = self.store.encode(key, &envelope).await;
        let write = || {
            self.lock
                .write_if_held(key, token, value.clone(), self.ttl, mode)
        };
        match patiently_until(self.failover_wait(), deadline, write).await {
            Ok(FencedWrite::Written) => {
                self.signal(Signal::Done, key).await;
                Filled::Stored(envelope)
            }
            Ok(FencedWrite::AlreadyStored) => {
                self.signal(Signal::Done, key).await;
                Filled::AlreadyStored(envelope)
            }
            Ok(FencedWrite::LockLost) => {
                tracing::warn!(cache_key = %key, "fill lock lost before the write; the new holder's value stands");
                Filled::LockLost(envelope)
            }
            Err(error) => Filled::NotWritten(envelope, error),
        }
    }

    /// A Redis call retried while Redis is unreachable, for up to
    /// `REDIS_FAILOVER_WAIT`.
    pub async fn patiently<T, F, Fut>(&self, call: F) -> Result<T, StoreError>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<T, StoreError>>,
    {
        let wait = self.failover_wait();
        patiently_until(wait, Instant::now() + wait, call).await
    }

    fn failover_wait(&self) -> Duration {
        self.store.backend().timeouts().failover_wait
    }

    /// Tells waiters on every instance; a lost signal costs them a poll interval.
    pub async fn signal(&self, signal: Signal, key: &CacheKey) {
        if let Err(error) = self.bus.publish(signal, key).await {
            tracing::warn!(%error, "could not signal waiters; they find the value on their next poll");
        }
    }
}
