//! Events out of the request path: a bounded buffer, batching, and RabbitMQ.
//!
//! [`EventPublisher::record_request`] never waits: it puts the event in a bounded
//! buffer, or, when the buffer is full (RabbitMQ down for long enough), drops it and
//! counts the drop in `narrative_events_dropped_total`. A background task
//! ([`PublisherTask::run`]) takes up to `max_batch` events at a time (waiting at most
//! `linger` for a batch to fill), and publishes each batch through the process's
//! [`ConfirmedPublisher`], retrying with backoff until the broker takes it. A batch is
//! published at least once; the consumer's insert is idempotent by event id.

use std::sync::Arc;
use std::time::Duration;

use narrative_queue::{topology, ConfirmedPublisher, Message, PublishError};
use prometheus::{IntCounter, IntCounterVec, Opts, Registry};
use tokio::sync::mpsc;
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

#[derive(Debug)]
enum Item {
    Request(RequestEvent),
    Generation(GenerationEvent),
}

/// The request side: cheap to call from any task.
#[derive(Debug)]
pub struct EventPublisher {
    sender: mpsc::Sender<Item>,
    capacity: usize,
    metrics: EventMetrics,
}

/// The background side; run it until shutdown.
#[derive(Debug)]
pub struct PublisherTask {
    receiver: mpsc::Receiver<Item>,
    settings: PublisherSettings,
    observer: Option<Arc<dyn BatchObserver>>,
    metrics: EventMetrics,
    broker: Arc<ConfirmedPublisher>,
}

impl EventPublisher {
    pub fn new(
        broker: Arc<ConfirmedPublisher>,
        settings: PublisherSettings,
        observer: Option<Arc<dyn BatchObserver>>,
        metrics: EventMetrics,
    ) -> (Self, PublisherTask) {
        let capacity = settings.capacity.max(1);
        let (sender, receiver) = mpsc::channel(capacity);
        (
            Self {
                sender,
                capacity,
                metrics: metrics.clone(),
            },
            PublisherTask {
                receiver,
                settings,
                observer,
                metrics,
                broker,
            },
        )
    }

    /// Events waiting to be published.
    pub fn buffered(&self) -> usize {
        self.capacity - self.sender.capacity()
    }

    fn offer(&self, item: Item) {
        if self.sender.try_send(item).is_err() {
            self.metrics.drop_events("buffer_full", 1);
        }
    }
}

impl EventSink for EventPublisher {
    fn record_request(&self, event: RequestEventRef<'_>) {
        self.offer(Item::Request(event.to_event()));
    }

    fn record_generation(&self, event: GenerationEvent) {
        self.offer(Item::Generation(event));
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
        }
        self.drain(pending).await;
    }

    /// Waits for one event, lets `linger` pass (unless a full batch is already
    /// waiting), then takes what has arrived. Sleeping rather than receiving during the
    /// linger matters: a receiver waiting on the channel is woken by every event, a
    /// cross-thread wake-up per request.
    /// `None` once stopped (what is buffered then goes to [`Self::drain`]).
    async fn next_batch(&mut self, stop: &CancellationToken) -> Option<Batch> {
        // Grown as events arrive: a quiet gateway's batches are small.
        let mut items = Vec::new();
        let received = tokio::select! {
            biased;
            () = stop.cancelled() => 0,
            received = self.receiver.recv_many(&mut items, self.settings.max_batch) => received,
        };
        if received == 0 {
            return None;
        }
        if self.receiver.len() + items.len() < self.settings.max_batch {
            // Stopping cuts the wait short; the batch is still published.
            tokio::select! {
                () = stop.cancelled() => {}
                () = tokio::time::sleep(self.settings.linger) => {}
            }
        }
        while items.len() < self.settings.max_batch {
            match self.receiver.try_recv() {
                Ok(item) => items.push(item),
                Err(_) => break,
            }
        }
        Some(into_batch(items))
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

    async fn drain(&mut self, pending: Option<Batch>) {
        self.receiver.close();
        let deadline = Instant::now() + self.settings.drain_timeout;
        let never = CancellationToken::new();
        let mut batch = pending;
        loop {
            if batch.is_none() {
                let mut items = Vec::new();
                while items.len() < self.settings.max_batch {
                    match self.receiver.try_recv() {
                        Ok(item) => items.push(item),
                        Err(_) => break,
                    }
                }
                if items.is_empty() {
                    return;
                }
                let made = into_batch(items);
                self.observe(&made).await;
                batch = Some(made);
            }
            let Some(current) = batch.take() else { return };
            if !self.deliver(&current, &never, Some(deadline)).await {
                let mut lost = current.len();
                while self.receiver.try_recv().is_ok() {
                    lost += 1;
                }
                self.metrics.drop_events("shutdown", lost);
                tracing::error!(
                    events = lost,
                    "analytics events not published before shutdown"
                );
                return;
            }
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

fn into_batch(items: Vec<Item>) -> Batch {
    let mut batch = Batch::new();
    // Nearly every event of a gateway's batch is a request event.
    batch.requests.reserve_exact(items.len());
    for item in items {
        match item {
            Item::Request(event) => batch.requests.push(event),
            Item::Generation(event) => batch.generations.push(event),
        }
    }
    // Once, before the first publish: a retry sends the same ids.
    batch.number_requests();
    batch
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

    /// A batch whose publish is still failing when the gateway stops is retried by
    /// the drain, but its events were tallied when it was made: not again.
    #[tokio::test]
    async fn a_batch_retried_at_shutdown_is_observed_once() {
        // Nothing listens on port 1: every publish fails.
        let broker = Arc::new(ConfirmedPublisher::new(
            QueueSettings {
                url: "amqp://127.0.0.1:1".into(),
                quorum: false,
                delivery_limit: 5,
                confirm_timeout: Duration::from_millis(200),
            },
            Duration::from_secs(60),
        ));
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
}
