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
//! round trip more); an uncontended read is sent at once, and costs no more than
//! listing its key while it is on its way (only reads that wait share a future).
//!
//! Writes and deletes go straight through.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use futures::future::{BoxFuture, FutureExt, Shared};
use tokio::sync::oneshot;

use super::{CacheStore, StoreError, StoreStats, Tier};
use crate::envelope::Envelope;
use crate::key::CacheKey;

type ReadResult = Result<Option<Arc<Envelope>>, StoreError>;
/// A read that several requests wait on.
type Read = Shared<BoxFuture<'static, ReadResult>>;
type Reads = Mutex<HashMap<CacheKey, InFlight, foldhash::fast::RandomState>>;

/// A [`CacheStore`] whose concurrent reads of a key share one read of `inner`.
#[derive(Debug)]
pub struct CoalescedReads {
    inner: Arc<dyn CacheStore>,
    /// Keys with a read on its way.
    reads: Arc<Reads>,
    requests: AtomicU64,
    sent: Arc<AtomicU64>,
}

/// A key's read on its way, and the read gathering behind it.
#[derive(Default)]
struct InFlight {
    /// The read on its way when requests share it; `None` when it is one request's
    /// own (that request drives it).
    current: Option<Read>,
    /// The read that goes once the current one returns, with what starts it.
    next: Option<(Read, oneshot::Sender<()>)>,
}

impl std::fmt::Debug for InFlight {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("InFlight")
            .field("shared", &self.current.is_some())
            .field("next", &self.next.is_some())
            .finish()
    }
}

/// How many reads went to the store behind, and how many requests shared one.
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
            requests: AtomicU64::new(0),
            sent: Arc::default(),
        }
    }

    pub fn counts(&self) -> ReadCounts {
        let sent = self.sent.load(Ordering::Relaxed);
        ReadCounts {
            sent,
            shared: self.requests.load(Ordering::Relaxed).saturating_sub(sent),
        }
    }

    /// The read `key`'s request waits on, when one is on its way: the next one, not
    /// yet sent (made here if it is the first to wait). `None` when the key has no
    /// read on its way: the request reads itself, listed as the key's read.
    fn wait_or_list(&self, key: &CacheKey) -> Option<Read> {
        let mut reads = lock(&self.reads);
        let Some(in_flight) = reads.get_mut(key) else {
            reads.insert(key.clone(), InFlight::default());
            return None;
        };
        if let Some((next, _)) = &in_flight.next {
            return Some(next.clone());
        }
        let (start, started) = oneshot::channel();
        let next = read_when_started(
            in_flight.current.clone(),
            started,
            Target {
                inner: Arc::clone(&self.inner),
                key: key.clone(),
                reads: Arc::clone(&self.reads),
                sent: Arc::clone(&self.sent),
            },
        )
        .boxed()
        .shared();
        in_flight.next = Some((next.clone(), start));
        Some(next)
    }
}

/// What a shared read reads, and where it is listed.
struct Target {
    inner: Arc<dyn CacheStore>,
    key: CacheKey,
    reads: Arc<Reads>,
    sent: Arc<AtomicU64>,
}

/// The next read of a key: sent once the one before it returns. It drives the one
/// before when that is shared (whose requests may all have given up), and it runs as
/// long as any request waits on it, or the next read does: a request that gives up
/// does not cancel it for the others.
async fn read_when_started(
    before: Option<Read>,
    started: oneshot::Receiver<()>,
    target: Target,
) -> ReadResult {
    if let Some(before) = before {
        let _ = before.await;
    }
    // Sent by the read before as it finishes, however it finishes.
    let _ = started.await;
    let _returned = Returned {
        reads: &target.reads,
        key: &target.key,
    };
    target.sent.fetch_add(1, Ordering::Relaxed);
    target.inner.get(&target.key).await
}

/// Unlists a key's read when it returns or is given up, starting the read that
/// gathered behind it, if any, which becomes the key's read on its way. Under the
/// lock, so a request either joined the next read before it started or finds it
/// started and waits for another.
struct Returned<'a> {
    reads: &'a Reads,
    key: &'a CacheKey,
}

impl Drop for Returned<'_> {
    fn drop(&mut self) {
        let mut reads = lock(self.reads);
        let Some(in_flight) = reads.get_mut(self.key) else {
            return;
        };
        match in_flight.next.take() {
            Some((next, start)) => {
                in_flight.current = Some(next);
                let _ = start.send(());
            }
            None => {
                reads.remove(self.key);
            }
        }
    }
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    // The map is only ever left consistent; a panic elsewhere does not taint it.
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

#[async_trait::async_trait]
impl CacheStore for CoalescedReads {
    async fn get(&self, key: &CacheKey) -> ReadResult {
        self.requests.fetch_add(1, Ordering::Relaxed);
        if let Some(shared) = self.wait_or_list(key) {
            return shared.await;
        }
        // No read of the key on its way: this request's own, at no more cost than
        // listing it.
        let _returned = Returned {
            reads: &self.reads,
            key,
        };
        self.sent.fetch_add(1, Ordering::Relaxed);
        self.inner.get(key).await
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
        assert_eq!(store.counts().sent, 2, "the next read waits for the first");

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

    /// A request never answers from a read sent before it arrived, whether that read
    /// is one request's own or shared: what was written while the key's read was on
    /// its way is what the next request gets.
    #[tokio::test]
    async fn a_read_sent_before_a_request_arrived_never_answers_it() {
        let (inner, store) = held_with("old").await;
        let one = key(1);
        let write = |body: &'static str| {
            let inner = Arc::clone(&inner);
            let key = one.clone();
            async move {
                inner
                    .put(&key, envelope(body), Duration::from_secs(60))
                    .await
                    .expect("put");
            }
        };
        let mut own = store.get(&one);
        assert!(poll!(&mut own).is_pending(), "a request's own read is sent");
        write("new").await;
        let mut shared = store.get(&one);
        assert!(poll!(&mut shared).is_pending());
        inner.replies.add_permits(1);
        assert_eq!(body(own.await).as_deref(), Some("old"));
        assert!(poll!(&mut shared).is_pending(), "the shared read is sent");
        write("newer").await;
        let mut after = store.get(&one);
        assert!(poll!(&mut after).is_pending());
        inner.replies.add_permits(2);
        assert_eq!(body(shared.await).as_deref(), Some("new"));
        assert_eq!(body(after.await).as_deref(), Some("newer"));
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

    /// Every request waiting for a key's next read gives up before it is sent: the
    /// read is still sent when its turn comes (driven by the next request), so the key
    /// is not left listed with a read nobody runs.
    #[tokio::test]
    async fn a_next_read_everyone_gave_up_on_does_not_block_the_key() {
        let (inner, store) = held_with("stored").await;
        let one = key(1);
        let mut first = store.get(&one);
        assert!(poll!(&mut first).is_pending(), "the first read is sent");
        let mut abandoned = store.get(&one);
        assert!(poll!(&mut abandoned).is_pending());
        drop(abandoned);
        inner.replies.add_permits(3);
        assert_eq!(body(first.await).as_deref(), Some("stored"));
        let later = tokio::time::timeout(Duration::from_secs(10), store.get(&one))
            .await
            .expect("the key's reads go on");
        assert_eq!(body(later).as_deref(), Some("stored"));
        assert!(lock(&store.reads).is_empty(), "no read stays listed");
    }
}
