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
//! listing its key while it is on its way.
//!
//! A read that requests wait on runs as a task of its own, so it always finishes and
//! unlists its key, whether its requests still wait or all gave up, and a panic in it
//! is an error for its waiters, not for the key's later reads. When a read could not
//! reach the store (it timed out, or the store is down), the requests gathered behind
//! it are answered with that error at once rather than each waiting out a timeout of
//! their own: a request waits at most one store timeout, as without sharing. Only a
//! read that was sent passes its error on; the read after is sent again.
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
/// A read that several requests wait on: a task of its own, so that it runs to its
/// end (and unlists itself) whether or not anyone still waits.
type Read = Shared<BoxFuture<'static, ReadResult>>;
type Reads = Mutex<HashMap<CacheKey, InFlight, foldhash::fast::RandomState>>;
/// What starts the next read: `Some` when the read before it failed to reach the
/// store, which its waiters are then told at once instead of waiting a timeout again.
type Start = oneshot::Sender<Option<StoreError>>;

/// A [`CacheStore`] whose concurrent reads of a key share one read of `inner`.
#[derive(Debug)]
pub struct CoalescedReads {
    inner: Arc<dyn CacheStore>,
    /// Keys with a read on its way, each with the read gathering behind it.
    reads: Arc<Reads>,
    sent: Arc<AtomicU64>,
    shared: AtomicU64,
}

/// A key's read on its way, and the read that goes once it returns (with what
/// starts it).
#[derive(Default)]
struct InFlight {
    next: Option<(Read, Start)>,
}

impl std::fmt::Debug for InFlight {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("InFlight")
            .field("next", &self.next.is_some())
            .finish()
    }
}

/// Reads passed to the store behind, and requests answered by a read made for
/// another request.
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

    /// The read `key`'s request waits on, when one is on its way: the next one, not
    /// yet sent (started here if it is the first to wait). `None` when the key has
    /// no read on its way: the request reads itself, listed as the key's read.
    /// Must be called within a Tokio runtime.
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
        let task = tokio::spawn(read_when_started(
            started,
            Arc::clone(&self.inner),
            key.clone(),
            Arc::clone(&self.reads),
            Arc::clone(&self.sent),
        ));
        let next = task
            .map(|finished| {
                finished.unwrap_or_else(|error| {
                    Err(StoreError::Unavailable(format!(
                        "shared read failed: {error}"
                    )))
                })
            })
            .boxed()
            .shared();
        in_flight.next = Some((next.clone(), start));
        Some(next)
    }
}

/// The next read of a key, sent once the one before it returns.
async fn read_when_started(
    started: oneshot::Receiver<Option<StoreError>>,
    inner: Arc<dyn CacheStore>,
    key: CacheKey,
    reads: Arc<Reads>,
    sent: Arc<AtomicU64>,
) -> ReadResult {
    let mut returned = Returned::listed(&reads, &key);
    // Sent by the read before as it finishes, however it finishes.
    if let Ok(Some(unreachable)) = started.await {
        // Said at once, not passed on: the read after this one is sent.
        return Err(unreachable);
    }
    returned.read(&*inner, &sent).await
}

/// Unlists a key's read when it returns or is given up, starting the read that
/// gathered behind it, if any, which becomes the key's read on its way. Under the
/// lock, so a request either joined the next read before it started or finds it
/// started and waits for another.
struct Returned<'a> {
    reads: &'a Reads,
    key: &'a CacheKey,
    /// The store could not be reached (timed out, or down): the next read's
    /// requests get this error rather than wait a timeout of their own.
    unreachable: Option<StoreError>,
}

impl<'a> Returned<'a> {
    fn listed(reads: &'a Reads, key: &'a CacheKey) -> Self {
        Self {
            reads,
            key,
            unreachable: None,
        }
    }

    /// Reads the listed key from `inner`, counted in `sent`, noting whether the store
    /// could be reached.
    async fn read(&mut self, inner: &dyn CacheStore, sent: &AtomicU64) -> ReadResult {
        sent.fetch_add(1, Ordering::Relaxed);
        let result = inner.get(self.key).await;
        if let Err(error @ (StoreError::Timeout | StoreError::Unavailable(_))) = &result {
            self.unreachable = Some(error.clone());
        }
        result
    }
}

impl Drop for Returned<'_> {
    fn drop(&mut self) {
        let mut reads = lock(self.reads);
        let Some(in_flight) = reads.get_mut(self.key) else {
            return;
        };
        match in_flight.next.take() {
            // The entry stays: it now lists the next read, on its way.
            Some((_, start)) => {
                let _ = start.send(self.unreachable.take());
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
        if let Some(shared) = self.wait_or_list(key) {
            let result = shared.await;
            self.shared.fetch_add(1, Ordering::Relaxed);
            return result;
        }
        // No read of the key on its way: this request's own, at no more cost than
        // listing it.
        Returned::listed(&self.reads, key)
            .read(&*self.inner, &self.sent)
            .await
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
    use std::sync::atomic::AtomicBool;

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
        /// The next read, once its reply may arrive, times out.
        time_out: AtomicBool,
        /// The next read panics as it is sent.
        panic: AtomicBool,
        reads: AtomicU64,
    }

    #[async_trait::async_trait]
    impl CacheStore for HeldReplies {
        async fn get(&self, key: &CacheKey) -> ReadResult {
            self.reads.fetch_add(1, Ordering::Relaxed);
            assert!(!self.panic.swap(false, Ordering::Relaxed), "a read panics");
            let read = self.store.get(key).await;
            self.replies.acquire().await.expect("open").forget();
            if self.time_out.swap(false, Ordering::Relaxed) {
                return Err(StoreError::Timeout);
            }
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
            time_out: AtomicBool::new(false),
            panic: AtomicBool::new(false),
            reads: AtomicU64::new(0),
        });
        inner
            .put(&key(1), envelope(body), Duration::from_secs(60))
            .await
            .expect("put");
        let store = CoalescedReads::new(Arc::clone(&inner) as Arc<dyn CacheStore>);
        (inner, store)
    }

    /// Lets the runtime run until the store behind has been sent `n` reads (a shared
    /// read runs as a task of its own).
    async fn sent_reads(inner: &HeldReplies, n: u64) {
        for _ in 0..1000 {
            if inner.reads.load(Ordering::Relaxed) >= n {
                return;
            }
            tokio::task::yield_now().await;
        }
        panic!("the store was sent fewer than {n} reads");
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
                shared: 20
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
        assert!(poll!(&mut shared).is_pending());
        sent_reads(&inner, 2).await;
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
        assert_eq!(store.counts(), ReadCounts { sent: 2, shared: 2 });
        assert!(lock(&store.reads).is_empty(), "no read stays listed");
    }

    /// Every request waiting for a key's next read gives up before it is sent: the
    /// read still runs when its turn comes and unlists the key, with no later request
    /// to drive it.
    #[tokio::test]
    async fn a_next_read_everyone_gave_up_on_still_unlists_its_key() {
        let (inner, store) = held_with("stored").await;
        let one = key(1);
        let mut first = store.get(&one);
        assert!(poll!(&mut first).is_pending(), "the first read is sent");
        let mut abandoned = store.get(&one);
        assert!(poll!(&mut abandoned).is_pending());
        drop(abandoned);
        inner.replies.add_permits(2);
        assert_eq!(body(first.await).as_deref(), Some("stored"));
        for _ in 0..1000 {
            if lock(&store.reads).is_empty() {
                break;
            }
            tokio::task::yield_now().await;
        }
        assert!(lock(&store.reads).is_empty(), "no read stays listed");
        assert_eq!(inner.reads.load(Ordering::Relaxed), 2);
    }

    /// A read that timed out answers the requests gathered behind it with its error
    /// at once: they do not wait out a timeout of their own. The next request's read
    /// is sent again.
    #[tokio::test]
    async fn requests_behind_a_read_that_timed_out_get_its_error_at_once() {
        let (inner, store) = held_with("stored").await;
        let one = key(1);
        let mut first = store.get(&one);
        assert!(poll!(&mut first).is_pending(), "the first read is sent");
        let mut behind: Vec<_> = (0..5).map(|_| store.get(&one)).collect();
        for read in &mut behind {
            assert!(poll!(read).is_pending());
        }
        inner.time_out.store(true, Ordering::Relaxed);
        inner.replies.add_permits(1);
        assert!(matches!(first.await, Err(StoreError::Timeout)));
        let behind = tokio::time::timeout(Duration::from_secs(10), join_all(behind))
            .await
            .expect("answered without a read of their own");
        for read in behind {
            assert!(matches!(read, Err(StoreError::Timeout)));
        }
        assert_eq!(
            inner.reads.load(Ordering::Relaxed),
            1,
            "no read sent for them"
        );
        inner.replies.add_permits(1);
        assert_eq!(body(store.get(&one).await).as_deref(), Some("stored"));
        assert_eq!(inner.reads.load(Ordering::Relaxed), 2);
    }

    /// A shared read that panics is an error for the requests that waited on it; the
    /// key's later reads are not poisoned by it.
    #[tokio::test]
    async fn a_shared_read_that_panics_fails_its_requests_not_the_key() {
        let (inner, store) = held_with("stored").await;
        let one = key(1);
        let mut first = store.get(&one);
        assert!(poll!(&mut first).is_pending(), "the first read is sent");
        inner.panic.store(true, Ordering::Relaxed);
        let mut shared = store.get(&one);
        assert!(poll!(&mut shared).is_pending());
        inner.replies.add_permits(2);
        assert_eq!(body(first.await).as_deref(), Some("stored"));
        assert!(matches!(shared.await, Err(StoreError::Unavailable(_))));
        assert_eq!(body(store.get(&one).await).as_deref(), Some("stored"));
        assert!(lock(&store.reads).is_empty(), "no read stays listed");
    }
}
