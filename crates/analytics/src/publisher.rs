//! Events out of the request path: a bounded buffer, batching, and RabbitMQ.
//!
//! [`EventPublisher::record_request`] never waits: it puts the event in a bounded
//! buffer (a few slots, each behind its own lock: [`Staging`]), or, when the buffer is
//! full (RabbitMQ down for long enough), drops it and counts the drop in
//! `narrative_events_dropped_total`. A background task
//! ([`PublisherTask::run`]) takes up to `max_batch` events at a time (waiting at most
//! `linger` for a batch to fill), and publishes each batch through the process's
//! [`ConfirmedPublisher`], retrying with backoff until the broker takes it. A batch is
//! published at least once; the consumer's insert is idempotent by event id.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use narrative_queue::{topology, ConfirmedPublisher, Message, PublishError};
use prometheus::{IntCounter, IntCounterVec, Opts, Registry};
use tokio::sync::Notify;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::event::{Batch, BatchFormat, GenerationEvent, RequestEvent, RequestEventRef};
use crate::EventSink;

#[derive(Debug, Clone)]
pub struct PublisherSettings {
    /// Events held while RabbitMQ is slow or down; beyond it they are dropped.
    pub capacity: usize,
    /// The most events a batch holds (`EVENT_BATCH_MAX` on gateways).
    pub max_batch: usize,
    /// How long a batch may wait to fill.
    pub linger: Duration,
    /// How long a batch waits for the broker's confirm (at least the fleet's
    /// `AMQP_CONFIRM_TIMEOUT_MS`).
    pub confirm_timeout: Duration,
    /// How long the last batches get at shutdown.
    pub drain_timeout: Duration,
    /// What batches are written as (`EVENT_BATCH_FORMAT`).
    pub format: BatchFormat,
}

impl Default for PublisherSettings {
    fn default() -> Self {
        Self {
            capacity: 100_000,
            // RabbitMQ's work is mostly per message: at 75,000 events a second, batches
            // of 1,000 cost it about 1 µs an event on the gateway's cores, of 5,000 a
            // third of that (docs/benchmarks.md). A v3 batch of 5,000 is some 60 KB.
            max_batch: 5_000,
            linger: Duration::from_millis(200),
            confirm_timeout: Duration::from_secs(5),
            drain_timeout: Duration::from_secs(5),
            format: BatchFormat::default(),
        }
    }
}

/// Sees each batch once, before it is published (the gateway keeps Redis's realtime
/// tallies this way, off the request path).
#[async_trait::async_trait]
pub trait BatchObserver: Send + Sync + std::fmt::Debug {
    async fn observe(&self, batch: &Batch);
}

/// The publisher's counters, registered in the caller's registry.
#[derive(Debug, Clone)]
pub struct EventMetrics {
    pub published: IntCounter,
    dropped: IntCounterVec,
    pub publish_failures: IntCounter,
}

impl EventMetrics {
    pub fn register(registry: &Registry) -> prometheus::Result<Self> {
        let published = IntCounter::new(
            "narrative_events_published_total",
            "Analytics events the broker confirmed",
        )?;
        let dropped = IntCounterVec::new(
            Opts::new(
                "narrative_events_dropped_total",
                "Analytics events dropped: buffer full, or unpublished at shutdown",
            ),
            &["reason"],
        )?;
        let publish_failures = IntCounter::new(
            "narrative_event_publish_failures_total",
            "Event batch publishes that failed and were retried",
        )?;
        registry.register(Box::new(published.clone()))?;
        registry.register(Box::new(dropped.clone()))?;
        registry.register(Box::new(publish_failures.clone()))?;
        for reason in ["buffer_full", "shutdown"] {
            dropped.with_label_values(&[reason]);
        }
        Ok(Self {
            published,
            dropped,
            publish_failures,
        })
    }

    pub fn dropped(&self, reason: &str) -> u64 {
        self.dropped.with_label_values(&[reason]).get()
    }

    fn drop_events(&self, reason: &str, count: usize) {
        self.dropped
            .with_label_values(&[reason])
            .inc_by(u64::try_from(count).unwrap_or(u64::MAX));
    }
}

/// Where request threads leave events for the publisher task: a few buffers
/// ("slots"), each behind its own lock, a thread always writing the same one. Two
/// request threads rarely meet on a lock, and a slot's cache lines stay with the
/// thread that fills it. (A tokio channel did this with four or five cache lines that
/// every sender writes, its permits, tail, block bits and the receiver's waker, each
/// moving between cores at every event: docs/benchmarks.md.) The one figure all
/// threads write is [`Staging::held`], which keeps `capacity` exact.
struct Staging {
    slots: Box<[Slot]>,
    held: Held,
    capacity: usize,
    max_batch: usize,
    /// Told when an event arrives in an empty buffer, and when a batch's worth is held.
    arrived: Notify,
}

impl std::fmt::Debug for Staging {
    // Not the events: a full buffer is 100,000 of them.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Staging")
            .field("slots", &self.slots.len())
            .field("held", &self.held())
            .field("capacity", &self.capacity)
            .field("max_batch", &self.max_batch)
            .finish_non_exhaustive()
    }
}

/// How many events the slots hold, counting an offer from just before it looks at the
/// bound and a take until just after it has emptied slots, so it is never less than
/// what is held. On a cache line of its own: writing it does not evict the fields
/// every offer only reads.
#[derive(Debug, Default)]
#[repr(align(128))]
struct Held(AtomicUsize);

/// One slot, on cache lines of its own.
#[derive(Default)]
#[repr(align(128))]
struct Slot(Mutex<Waiting>);

#[derive(Default)]
struct Waiting {
    requests: Vec<RequestEvent>,
    generations: Vec<GenerationEvent>,
    /// Set at shutdown: what arrives after is dropped (and counted), not kept.
    closed: bool,
}

/// Why an event was not kept: the label of `narrative_events_dropped_total`.
#[derive(Debug, Clone, Copy)]
enum Refused {
    BufferFull,
    Shutdown,
}

impl Refused {
    fn reason(self) -> &'static str {
        match self {
            Self::BufferFull => "buffer_full",
            Self::Shutdown => "shutdown",
        }
    }
}

/// Slots per core: tokio runs a worker thread per core, and each gets a slot of its
/// own as long as the threads that record were numbered one after another.
const SLOTS_PER_CORE: usize = 2;

impl Staging {
    fn new(capacity: usize, max_batch: usize) -> Self {
        let cores = std::thread::available_parallelism().map_or(1, std::num::NonZero::get);
        Self {
            slots: (0..cores * SLOTS_PER_CORE)
                .map(|_| Slot::default())
                .collect(),
            held: Held::default(),
            capacity,
            max_batch,
            arrived: Notify::new(),
        }
    }

    fn held(&self) -> usize {
        self.held.0.load(Ordering::Acquire)
    }

    /// Keeps one event (`put` adds it to the slot), unless `capacity` are held or the
    /// publisher has shut down.
    fn offer(&self, put: impl FnOnce(&mut Waiting)) -> Result<(), Refused> {
        let before = self.held.0.fetch_add(1, Ordering::AcqRel);
        if before >= self.capacity {
            self.held.0.fetch_sub(1, Ordering::AcqRel);
            return Err(Refused::BufferFull);
        }
        let slot = &self.slots[thread_number() % self.slots.len()];
        {
            let mut waiting = slot.0.lock().unwrap_or_else(PoisonError::into_inner);
            if waiting.closed {
                drop(waiting);
                self.held.0.fetch_sub(1, Ordering::AcqRel);
                return Err(Refused::Shutdown);
            }
            put(&mut waiting);
        }
        if before == 0 || before + 1 == self.max_batch {
            self.arrived.notify_one();
        }
        Ok(())
    }

    /// Takes up to `max_batch` events into a batch whose request list starts as
    /// `spare` (an empty list kept from an earlier batch, so no slot grows one anew).
    fn take(&self, spare: Vec<RequestEvent>, first_slot: usize) -> Batch {
        let mut batch = Batch {
            requests: spare,
            generations: Vec::new(),
        };
        let mut room = self.max_batch;
        let slots = self.slots.len();
        for offset in 0..slots {
            if room == 0 {
                break;
            }
            let slot = &self.slots[(first_slot + offset) % slots];
            let mut waiting = slot.0.lock().unwrap_or_else(PoisonError::into_inner);
            room -= move_up_to(&mut waiting.requests, &mut batch.requests, room);
            room -= move_up_to(&mut waiting.generations, &mut batch.generations, room);
            // A slot that held an outage's backlog gives the memory back once emptied:
            // otherwise each slot would keep the most it ever held.
            if waiting.requests.is_empty() {
                waiting.requests.shrink_to(self.max_batch);
            }
        }
        self.held.0.fetch_sub(batch.len(), Ordering::AcqRel);
        batch
    }

    /// No event is kept from now on; what is held stays to be taken.
    fn close(&self) {
        for slot in &self.slots {
            slot.0.lock().unwrap_or_else(PoisonError::into_inner).closed = true;
        }
    }

    /// Drops everything held (once closed, at the end of a failed drain); how many.
    fn discard(&self) -> usize {
        let mut dropped = 0;
        for slot in &self.slots {
            let mut waiting = slot.0.lock().unwrap_or_else(PoisonError::into_inner);
            dropped += waiting.requests.len() + waiting.generations.len();
            waiting.requests.clear();
            waiting.generations.clear();
        }
        self.held.0.fetch_sub(dropped, Ordering::AcqRel);
        dropped
    }
}

/// Moves up to `room` items from the front of `from` to the end of `to`; how many.
/// All of them into an empty `to` is a swap, so `from` keeps `to`'s allocation.
fn move_up_to<T>(from: &mut Vec<T>, to: &mut Vec<T>, room: usize) -> usize {
    let moved = from.len().min(room);
    if moved == from.len() {
        if to.is_empty() {
            std::mem::swap(from, to);
        } else {
            to.append(from);
        }
    } else {
        to.extend(from.drain(..moved));
    }
    moved
}

/// A number for the calling thread, the same at every call: which slot it writes.
fn thread_number() -> usize {
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    thread_local! {
        static NUMBER: usize = NEXT.fetch_add(1, Ordering::Relaxed);
    }
    // A thread being torn down has no number left: any slot will do.
    NUMBER.try_with(|number| *number).unwrap_or(0)
}

/// The request side: cheap to call from any task.
#[derive(Debug)]
pub struct EventPublisher {
    staging: Arc<Staging>,
    metrics: EventMetrics,
}

/// The background side; run it until shutdown.
#[derive(Debug)]
pub struct PublisherTask {
    staging: Arc<Staging>,
    settings: PublisherSettings,
    observer: Option<Arc<dyn BatchObserver>>,
    metrics: EventMetrics,
    broker: Arc<ConfirmedPublisher>,
    /// The request list of the last batch published, emptied: the next batch's.
    spare: Vec<RequestEvent>,
    /// Where the next take starts, so no slot always waits for the others.
    first_slot: usize,
}

impl EventPublisher {
    pub fn new(
        broker: Arc<ConfirmedPublisher>,
        settings: PublisherSettings,
        observer: Option<Arc<dyn BatchObserver>>,
        metrics: EventMetrics,
    ) -> (Self, PublisherTask) {
        let staging = Arc::new(Staging::new(
            settings.capacity.max(1),
            settings.max_batch.max(1),
        ));
        (
            Self {
                staging: Arc::clone(&staging),
                metrics: metrics.clone(),
            },
            PublisherTask {
                staging,
                settings,
                observer,
                metrics,
                broker,
                spare: Vec::new(),
                first_slot: 0,
            },
        )
    }

    /// Events waiting to be published. (An offer counts itself in before it looks at
    /// the bound, so the count can pass `capacity` for that moment; not what is held.)
    pub fn buffered(&self) -> usize {
        self.staging.held().min(self.staging.capacity)
    }

    fn offer(&self, put: impl FnOnce(&mut Waiting)) {
        if let Err(refused) = self.staging.offer(put) {
            self.metrics.drop_events(refused.reason(), 1);
        }
    }
}

impl EventSink for EventPublisher {
    fn record_request(&self, event: RequestEventRef<'_>) {
        self.offer(|waiting| waiting.requests.push(event.to_event()));
    }

    fn record_generation(&self, event: GenerationEvent) {
        self.offer(|waiting| waiting.generations.push(event));
    }
}

const MIN_BACKOFF: Duration = Duration::from_millis(250);
const MAX_BACKOFF: Duration = Duration::from_secs(10);

impl PublisherTask {
    /// Publishes batches until `stop`, then gives what is buffered `drain_timeout`.
    pub async fn run(mut self, stop: CancellationToken) {
        let mut pending = None;
        while let Some(batch) = self.next_batch(&stop).await {
            self.observe(&batch).await;
            if !self.deliver(&batch, &stop, None).await {
                pending = Some(batch);
                break;
            }
            self.recycle(batch);
        }
        self.drain(pending).await;
    }

    /// Waits for one event, lets `linger` pass (unless a batch's worth is held, or
    /// comes first), then takes up to `max_batch`. Sleeping rather than taking during
    /// the linger matters: every take is a batch, and RabbitMQ's cost is per message.
    /// `None` once stopped (what is held then goes to [`Self::drain`]).
    async fn next_batch(&mut self, stop: &CancellationToken) -> Option<Batch> {
        while self.staging.held() == 0 {
            tokio::select! {
                biased;
                () = stop.cancelled() => return None,
                () = self.staging.arrived.notified() => {}
            }
        }
        if stop.is_cancelled() {
            return None;
        }
        let deadline = Instant::now() + self.settings.linger;
        // A wake-up before the deadline may be an arrival told earlier: look again.
        while self.staging.held() < self.staging.max_batch {
            tokio::select! {
                // Stopping cuts the wait short; the batch is still published.
                () = stop.cancelled() => break,
                () = tokio::time::sleep_until(deadline) => break,
                () = self.staging.arrived.notified() => {}
            }
        }
        Some(self.take())
    }

    fn take(&mut self) -> Batch {
        let mut batch = self
            .staging
            .take(std::mem::take(&mut self.spare), self.first_slot);
        self.first_slot = self.first_slot.wrapping_add(1);
        // Once, before the first publish: a retry sends the same ids.
        batch.number_requests();
        batch
    }

    /// Keeps a published batch's request list, emptied, for the next batch.
    fn recycle(&mut self, mut batch: Batch) {
        batch.requests.clear();
        self.spare = batch.requests;
    }

    /// Shows a batch to the observer, once: when it is made, not at each try.
    async fn observe(&self, batch: &Batch) {
        if let Some(observer) = &self.observer {
            observer.observe(batch).await;
        }
    }

    /// Publishes `batch`, retrying with backoff; false if `stop` or `deadline` came
    /// first.
    async fn deliver(
        &mut self,
        batch: &Batch,
        stop: &CancellationToken,
        deadline: Option<Instant>,
    ) -> bool {
        let mut backoff = MIN_BACKOFF;
        loop {
            match self.publish(batch).await {
                Ok(()) => {
                    self.metrics
                        .published
                        .inc_by(u64::try_from(batch.len()).unwrap_or(u64::MAX));
                    return true;
                }
                Err(error) => {
                    self.metrics.publish_failures.inc();
                    tracing::warn!(%error, events = batch.len(), retry_in = ?backoff, "event batch not published; retrying");
                }
            }
            let wake = Instant::now() + backoff;
            if deadline.is_some_and(|d| wake > d) {
                return false;
            }
            tokio::select! {
                () = stop.cancelled(), if deadline.is_none() => return false,
                () = tokio::time::sleep_until(wake) => {}
            }
            backoff = (backoff * 2).min(MAX_BACKOFF);
        }
    }

    /// Closes the buffer (later events are dropped and counted) and publishes what it
    /// holds, batch by batch, until `drain_timeout`; what is left then is counted lost.
    async fn drain(&mut self, pending: Option<Batch>) {
        self.staging.close();
        let deadline = Instant::now() + self.settings.drain_timeout;
        let never = CancellationToken::new();
        let mut batch = pending;
        loop {
            if batch.is_none() {
                let made = self.take();
                if made.is_empty() {
                    return;
                }
                self.observe(&made).await;
                batch = Some(made);
            }
            let Some(current) = batch.take() else { return };
            if !self.deliver(&current, &never, Some(deadline)).await {
                let lost = current.len() + self.staging.discard();
                self.metrics.drop_events("shutdown", lost);
                tracing::error!(
                    events = lost,
                    "analytics events not published before shutdown"
                );
                return;
            }
            self.recycle(current);
        }
    }

    async fn publish(&self, batch: &Batch) -> Result<(), PublishError> {
        let body = batch.encode(self.settings.format);
        self.broker
            .publish(Message {
                to: topology::EVENTS,
                body: &body,
                content_type: self.settings.format.content_type(),
                correlation_id: None,
                confirm_timeout: Some(self.settings.confirm_timeout),
            })
            .await
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use narrative_queue::QueueSettings;

    use super::*;
    use crate::event::tests::request;
    use crate::event::RequestOutcome;

    /// Counts the events it is shown, and wakes the test at the first batch.
    #[derive(Debug, Default)]
    struct Tally {
        events: AtomicUsize,
        shown: tokio::sync::Notify,
    }

    #[async_trait::async_trait]
    impl BatchObserver for Tally {
        async fn observe(&self, batch: &Batch) {
            self.events.fetch_add(batch.len(), Ordering::SeqCst);
            self.shown.notify_one();
        }
    }

    /// A broker nothing listens for (port 1): every publish fails.
    fn dead_broker() -> Arc<ConfirmedPublisher> {
        Arc::new(ConfirmedPublisher::new(
            QueueSettings {
                url: "amqp://127.0.0.1:1".into(),
                quorum: false,
                delivery_limit: 5,
                confirm_timeout: Duration::from_millis(200),
            },
            Duration::from_secs(60),
        ))
    }

    /// A batch whose publish is still failing when the gateway stops is retried by
    /// the drain, but its events were tallied when it was made: not again.
    #[tokio::test]
    async fn a_batch_retried_at_shutdown_is_observed_once() {
        let broker = dead_broker();
        let tally = Arc::new(Tally::default());
        let metrics = EventMetrics::register(&Registry::new()).expect("metrics");
        let settings = PublisherSettings {
            linger: Duration::from_millis(1),
            drain_timeout: Duration::from_millis(400),
            ..PublisherSettings::default()
        };
        let observer: Arc<dyn BatchObserver> = tally.clone();
        let (publisher, task) =
            EventPublisher::new(broker, settings, Some(observer), metrics.clone());
        let event = request(RequestOutcome::HitL1, "Sirius");
        for _ in 0..3 {
            publisher.record_request(event.borrowed());
        }
        let stop = CancellationToken::new();
        let running = tokio::spawn(task.run(stop.clone()));
        // The batch is made and being tried: stop while it fails.
        tally.shown.notified().await;
        stop.cancel();
        running.await.expect("publisher task");
        assert_eq!(metrics.dropped("shutdown"), 3);
        assert_eq!(tally.events.load(Ordering::SeqCst), 3);
    }

    /// Threads offering at once while another takes: every event kept is taken
    /// exactly once, and no batch is larger than `max_batch`.
    #[test]
    fn concurrent_offers_are_kept_exactly_once_within_capacity() {
        const THREADS: u64 = 4;
        const EACH: u64 = 20_000;
        let staging = Arc::new(Staging::new(3_000, 700));
        let producers_done = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let taker = {
            let staging = Arc::clone(&staging);
            let producers_done = Arc::clone(&producers_done);
            std::thread::spawn(move || {
                let (mut taken, mut largest) = (Vec::new(), 0);
                let mut first_slot = 0;
                loop {
                    let done = producers_done.load(Ordering::Acquire);
                    let batch = staging.take(Vec::new(), first_slot);
                    first_slot += 1;
                    largest = largest.max(batch.len());
                    let empty = batch.is_empty();
                    taken.extend(batch.requests.into_iter().map(|event| event.latency_us));
                    if done && empty {
                        return (taken, largest);
                    }
                    std::thread::yield_now();
                }
            })
        };
        let producers: Vec<_> = (0..THREADS)
            .map(|thread| {
                let staging = Arc::clone(&staging);
                std::thread::spawn(move || {
                    let mut kept = Vec::new();
                    for n in 0..EACH {
                        let mut event = request(RequestOutcome::HitL1, "Sirius");
                        event.latency_us = thread * EACH + n;
                        let offered = staging.offer(|waiting| waiting.requests.push(event));
                        match offered {
                            Ok(()) => kept.push(thread * EACH + n),
                            Err(Refused::BufferFull) => {}
                            Err(Refused::Shutdown) => panic!("never closed"),
                        }
                    }
                    kept
                })
            })
            .collect();
        let mut kept: Vec<u64> = producers
            .into_iter()
            .flat_map(|producer| producer.join().expect("producer"))
            .collect();
        producers_done.store(true, Ordering::Release);
        let (mut taken, largest) = taker.join().expect("taker");
        kept.sort_unstable();
        taken.sort_unstable();
        assert!(!kept.is_empty());
        assert_eq!(taken, kept, "every kept event taken once, nothing else");
        assert!(largest <= 700, "a batch of {largest}");
        assert_eq!(staging.held(), 0);
    }

    /// With nobody taking, exactly `capacity` events are kept, however many threads
    /// offer at once.
    #[test]
    fn the_capacity_is_exact_across_slots() {
        let staging = Arc::new(Staging::new(1_000, 5_000));
        let kept: usize = (0..4)
            .map(|_| {
                let staging = Arc::clone(&staging);
                std::thread::spawn(move || {
                    (0..1_000)
                        .filter(|_| {
                            let event = request(RequestOutcome::HitL1, "Sirius");
                            staging
                                .offer(|waiting| waiting.requests.push(event))
                                .is_ok()
                        })
                        .count()
                })
            })
            .collect::<Vec<_>>()
            .into_iter()
            .map(|producer| producer.join().expect("producer"))
            .sum();
        assert_eq!(kept, 1_000);
        assert_eq!(staging.held(), 1_000);
        assert_eq!(staging.take(Vec::new(), 0).len(), 1_000);
    }

    /// A backlog taken batch by batch leaves no slot holding its memory afterwards.
    #[test]
    fn an_emptied_slot_keeps_no_more_than_a_batch_of_room() {
        let staging = Staging::new(10_000, 700);
        for _ in 0..5_000 {
            let event = request(RequestOutcome::HitL1, "Sirius");
            staging
                .offer(|waiting| waiting.requests.push(event))
                .expect("room");
        }
        let mut spare = Vec::new();
        loop {
            let mut batch = staging.take(spare, 0);
            if batch.is_empty() {
                break;
            }
            batch.requests.clear();
            spare = batch.requests;
        }
        for slot in &staging.slots {
            let waiting = slot.0.lock().expect("slot");
            assert!(
                waiting.requests.capacity() <= 700,
                "{}",
                waiting.requests.capacity()
            );
        }
    }

    /// After the publisher's last drain, an event is not kept where nothing will take
    /// it: it is dropped, and counted as lost at shutdown.
    #[tokio::test]
    async fn an_event_after_the_drain_is_counted_as_dropped_at_shutdown() {
        let broker = dead_broker();
        let metrics = EventMetrics::register(&Registry::new()).expect("metrics");
        let (publisher, task) =
            EventPublisher::new(broker, PublisherSettings::default(), None, metrics.clone());
        let stop = CancellationToken::new();
        stop.cancel();
        task.run(stop).await;
        let event = request(RequestOutcome::HitL1, "Sirius");
        publisher.record_request(event.borrowed());
        assert_eq!(metrics.dropped("shutdown"), 1);
        assert_eq!(metrics.dropped("buffer_full"), 0);
        assert_eq!(publisher.buffered(), 0);
    }
}
