//! Concurrent reads of one key share a round trip to the store behind.
//!
//! A hot key read from Redis (L1 off, or every instance's L1 copy expiring at once)
//! costs a round trip per request, each one CPU on both ends. Here a read of a key
//! joins the *next* read of it, never one already sent: while a read of the key is on
//! its way, the reads that arrive gather, and the moment it returns one read is sent
//! for all of them. So at most one read per key is in flight from this process, and a
//! read never answers from a round trip that started before the request did: anything
//! written or deleted before a request arrived is seen by its answer, as it would be
//! without coalescing. The price is latency under contention only: a read that arrives
//! while one is in flight waits for it to return before its own is sent (at most one
//! round trip more); an uncontended read is sent at once.
//!
//! Writes and deletes go straight through.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, Weak};
use std::time::Duration;

use futures::future::{BoxFuture, FutureExt, Shared};

use super::{CacheStore, StoreError, StoreStats, Tier};
use crate::envelope::Envelope;
use crate::key::CacheKey;

type ReadResult = Result<Option<Arc<Envelope>>, StoreError>;
type Read = Shared<BoxFuture<'static, ReadResult>>;

/// A [`CacheStore`] whose concurrent reads of a key share one read of `inner`.
#[derive(Debug)]
pub struct CoalescedReads {
    inner: Arc<dyn CacheStore>,
    reads: Arc<Mutex<HashMap<CacheKey, NextRead>>>,
    /// Reads that were sent to `inner`, and reads answered by another's.
    sent: Arc<AtomicU64>,
    shared: AtomicU64,
}

/// The latest read of a key: sent, or waiting for the one before it to return.
struct NextRead {
    sent: Arc<AtomicBool>,
    read: Read,
}

impl std::fmt::Debug for NextRead {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NextRead")
            .field("sent", &self.sent.load(Ordering::Relaxed))
            .finish_non_exhaustive()
    }
}

/// How many reads went to the store behind, and how many shared one.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ReadCounts {
    pub sent: u64,
    pub shared: u64,
}

impl CoalescedReads {
    pub fn new(inner: Arc<dyn CacheStore>) -> Self {
        Self {
            inner,
            reads: Arc::default(),
            sent: Arc::default(),
            shared: AtomicU64::new(0),
        }
    }

    pub fn counts(&self) -> ReadCounts {
        ReadCounts {
            sent: self.sent.load(Ordering::Relaxed),
            shared: self.shared.load(Ordering::Relaxed),
        }
    }

    /// The read `key`'s request shares: the next one not yet sent, or a new one, sent
    /// once the read before it (if any) has returned.
    fn next_read(&self, key: &CacheKey) -> Read {
        let mut reads = lock(&self.reads);
        let previous = match reads.get(key) {
            // Not sent yet, so it will be sent after this request arrived.
            Some(next) if !next.sent.load(Ordering::Acquire) => {
                self.shared.fetch_add(1, Ordering::Relaxed);
                return next.read.clone();
            }
            Some(in_flight) => Some(in_flight.read.clone()),
            None => None,
        };
        let sent = Arc::new(AtomicBool::new(false));
        let read = read_after(
            previous,
            Arc::clone(&sent),
            ReadTarget {
                inner: Arc::clone(&self.inner),
                key: key.clone(),
                reads: Arc::downgrade(&self.reads),
                sent_count: Arc::clone(&self.sent),
            },
        )
        .boxed()
        .shared();
        reads.insert(
            key.clone(),
            NextRead {
                sent,
                read: read.clone(),
            },
        );
        read
    }
}

/// What a read reads, and where it is listed until it returns.
struct ReadTarget {
    inner: Arc<dyn CacheStore>,
    key: CacheKey,
    reads: Weak<Mutex<HashMap<CacheKey, NextRead>>>,
    sent_count: Arc<AtomicU64>,
}

/// Waits for the key's previous read to return, then reads. The shared future runs
/// as long as any request waits on it, or the next read does: a request that gives
/// up does not cancel it for the others.
async fn read_after(
    previous: Option<Read>,
    sent: Arc<AtomicBool>,
    target: ReadTarget,
) -> ReadResult {
    if let Some(previous) = previous {
        let _ = previous.await;
    }
    // Set before the read is sent: a request that still saw it unset arrived before.
    sent.store(true, Ordering::Release);
    target.sent_count.fetch_add(1, Ordering::Relaxed);
    let result = target.inner.get(&target.key).await;
    if let Some(reads) = target.reads.upgrade() {
        let mut reads = lock(&reads);
        // Unlisted unless a later read has taken its place (it holds this one's result).
        if reads
            .get(&target.key)
            .is_some_and(|next| Arc::ptr_eq(&next.sent, &sent))
        {
            reads.remove(&target.key);
        }
    }
    result
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    // The map is only ever left consistent; a panic elsewhere does not taint it.
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

#[async_trait::async_trait]
impl CacheStore for CoalescedReads {
    async fn get(&self, key: &CacheKey) -> ReadResult {
        self.next_read(key).await
    }

    fn tier(&self) -> Tier {
        self.inner.tier()
    }

    async fn put(
        &self,
        key: &CacheKey,
        envelope: Arc<Envelope>,
        ttl: Duration,
    ) -> Result<(), StoreError> {
        self.inner.put(key, envelope, ttl).await
    }

    async fn delete(&self, key: &CacheKey) -> Result<bool, StoreError> {
        self.inner.delete(key).await
    }

    async fn stats(&self) -> Result<StoreStats, StoreError> {
        self.inner.stats().await
    }

    fn name(&self) -> &'static str {
        self.inner.name()
    }
}

#[cfg(test)]
mod tests {
    use futures::future::join_all;
    use futures::poll;
    use tokio::sync::Semaphore;

    use super::*;
    use crate::store::test_support::{envelope, key};
    use crate::store::MemoryStore;

    /// A store whose reads are answered at once, as Redis answers a `GET`, and whose
    /// answers then wait for a permit each to arrive: a round trip the test holds open.
    #[derive(Debug)]
    struct HeldReplies {
        store: MemoryStore,
        replies: Semaphore,
    }

    #[async_trait::async_trait]
    impl CacheStore for HeldReplies {
        async fn get(&self, key: &CacheKey) -> ReadResult {
            let read = self.store.get(key).await;
            self.replies.acquire().await.expect("open").forget();
            read
        }
        async fn put(
            &self,
            key: &CacheKey,
            envelope: Arc<Envelope>,
            ttl: Duration,
        ) -> Result<(), StoreError> {
            self.store.put(key, envelope, ttl).await
        }
        async fn delete(&self, key: &CacheKey) -> Result<bool, StoreError> {
            self.store.delete(key).await
        }
        async fn stats(&self) -> Result<StoreStats, StoreError> {
            self.store.stats().await
        }
        fn name(&self) -> &'static str {
            "held"
        }
    }

    async fn held_with(body: &str) -> (Arc<HeldReplies>, CoalescedReads) {
        let inner = Arc::new(HeldReplies {
            store: MemoryStore::new(1 << 20),
            replies: Semaphore::new(0),
        });
        inner
            .put(&key(1), envelope(body), Duration::from_secs(60))
            .await
            .expect("put");
        let store = CoalescedReads::new(Arc::clone(&inner) as Arc<dyn CacheStore>);
        (inner, store)
    }

    fn body(read: ReadResult) -> Option<String> {
        read.expect("no error")
            .map(|envelope| envelope.body.clone())
    }

    #[tokio::test]
    async fn reads_arriving_during_a_read_share_the_next_one() {
        let (inner, store) = held_with("stored").await;
        let (one, two) = (key(1), key(2));
        let mut first = store.get(&one);
        assert!(poll!(&mut first).is_pending(), "the first read is sent");
        let mut rest: Vec<_> = (0..20).map(|_| store.get(&one)).collect();
        for read in &mut rest {
            assert!(poll!(read).is_pending(), "waits for the next read");
        }
        // Another key's read is not held up by this one.
        let mut other = store.get(&two);
        assert!(poll!(&mut other).is_pending());
        assert_eq!(
            store.counts(),
            ReadCounts {
                sent: 2,
                shared: 19
            }
        );

        inner.replies.add_permits(3);
        assert_eq!(body(first.await).as_deref(), Some("stored"));
        assert_eq!(body(other.await), None);
        for read in join_all(rest).await {
            assert_eq!(body(read).as_deref(), Some("stored"));
        }
        assert_eq!(
            store.counts(),
            ReadCounts {
                sent: 3,
                shared: 19
            }
        );
        assert!(lock(&store.reads).is_empty(), "no read stays listed");
    }

    /// A request never answers from a read sent before it arrived: what was written
    /// while the key's read was on its way is what the next request gets.
    #[tokio::test]
    async fn a_read_sent_before_a_request_arrived_never_answers_it() {
        let (inner, store) = held_with("old").await;
        let one = key(1);
        let mut before = store.get(&one);
        assert!(poll!(&mut before).is_pending(), "the first read is sent");
        inner
            .put(&key(1), envelope("new"), Duration::from_secs(60))
            .await
            .expect("put");
        let mut after = store.get(&one);
        assert!(poll!(&mut after).is_pending());
        inner.replies.add_permits(2);
        assert_eq!(body(before.await).as_deref(), Some("old"));
        assert_eq!(body(after.await).as_deref(), Some("new"));
    }

    /// The request that sent a read giving up strands neither the read nor the
    /// requests waiting behind it.
    #[tokio::test]
    async fn a_cancelled_request_does_not_cancel_the_read_it_shares() {
        let (inner, store) = held_with("stored").await;
        let one = key(1);
        let mut first = store.get(&one);
        assert!(poll!(&mut first).is_pending(), "the first read is sent");
        let mut second = store.get(&one);
        let mut third = store.get(&one);
        assert!(poll!(&mut second).is_pending());
        assert!(poll!(&mut third).is_pending());
        drop(first);
        inner.replies.add_permits(2);
        assert_eq!(body(second.await).as_deref(), Some("stored"));
        assert_eq!(body(third.await).as_deref(), Some("stored"));
        assert_eq!(store.counts(), ReadCounts { sent: 2, shared: 1 });
        assert!(lock(&store.reads).is_empty(), "no read stays listed");
    }
}
