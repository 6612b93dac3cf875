//! The `analytics` service's consumer: event batches from RabbitMQ into Postgres.
//!
//! Deliveries are gathered (up to `max_events` events, waiting at most `linger`),
//! inserted in one transaction, and acknowledged only after the commit. While
//! Postgres is down the consumer keeps retrying the same deliveries, unacknowledged:
//! with the prefetch bound reached, the rest wait in the durable queue. If this
//! process dies instead, RabbitMQ redelivers, and the insert skips what was already
//! stored. A batch Postgres refuses for its content is retried delivery by delivery,
//! and the one at fault is dead-lettered rather than retried forever.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use lapin::message::Delivery;
use lapin::options::{BasicAckOptions, BasicConsumeOptions, BasicQosOptions, BasicRejectOptions};
use lapin::types::FieldTable;
use prometheus::{Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, Opts, Registry};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::event::Batch;
use crate::store::{PgStore, StoreError};
use narrative_queue::{amqp, topology};

#[derive(Debug, Clone)]
pub struct ConsumerSettings {
    pub amqp_url: String,
    pub quorum: bool,
    /// Batches held unacknowledged at once.
    pub prefetch: u16,
    /// Events per insert at most.
    pub max_events: usize,
    /// How long to wait for more deliveries before inserting what is there.
    pub linger: Duration,
}

/// What `/readyz` reports.
#[derive(Debug, Default)]
pub struct Health {
    pub broker: AtomicBool,
    pub postgres: AtomicBool,
    pub schema: AtomicBool,
}

#[derive(Debug, Clone)]
pub struct IngestMetrics {
    inserted: IntCounterVec,
    pub duplicates: IntCounter,
    pub dead_lettered: IntCounter,
    pub insert_failures: IntCounter,
    pub insert_seconds: Histogram,
    pub held_deliveries: IntGauge,
}

impl IngestMetrics {
    pub fn register(registry: &Registry) -> prometheus::Result<Self> {
        let inserted = IntCounterVec::new(
            Opts::new(
                "narrative_analytics_events_inserted_total",
                "Events inserted into Postgres (redelivered ones not counted again)",
            ),
            &["kind"],
        )?;
        let duplicates = IntCounter::new(
            "narrative_analytics_events_duplicate_total",
            "Events skipped because Postgres already had them (redeliveries)",
        )?;
        let dead_lettered = IntCounter::new(
            "narrative_analytics_batches_dead_lettered_total",
            "Batches that could not be read or stored, sent to narrative.analytics.dead",
        )?;
        let insert_failures = IntCounter::new(
            "narrative_analytics_insert_failures_total",
            "Inserts that failed and were retried (Postgres unavailable)",
        )?;
        let insert_seconds = Histogram::with_opts(
            HistogramOpts::new(
                "narrative_analytics_insert_seconds",
                "Time to insert one gathered batch",
            )
            .buckets(vec![0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0]),
        )?;
        let held_deliveries = IntGauge::new(
            "narrative_analytics_held_deliveries",
            "Deliveries received and not yet acknowledged",
        )?;
        registry.register(Box::new(inserted.clone()))?;
        registry.register(Box::new(duplicates.clone()))?;
        registry.register(Box::new(dead_lettered.clone()))?;
        registry.register(Box::new(insert_failures.clone()))?;
        registry.register(Box::new(insert_seconds.clone()))?;
        registry.register(Box::new(held_deliveries.clone()))?;
        for kind in ["request", "generation"] {
            inserted.with_label_values(&[kind]);
        }
        Ok(Self {
            inserted,
            duplicates,
            dead_lettered,
            insert_failures,
            insert_seconds,
            held_deliveries,
        })
    }

    pub fn inserted(&self, kind: &str) -> u64 {
        self.inserted.with_label_values(&[kind]).get()
    }
}

const MIN_BACKOFF: Duration = Duration::from_millis(200);
const MAX_BACKOFF: Duration = Duration::from_secs(5);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Debug)]
pub struct Consumer {
    pub settings: ConsumerSettings,
    pub store: PgStore,
    pub metrics: IngestMetrics,
    pub health: Arc<Health>,
}

/// Why a consuming session ended.
enum SessionEnd {
    Stopped,
    BrokerLost(String),
}

impl Consumer {
    /// Consumes until `stop`, reconnecting to RabbitMQ as needed. Deliveries held at
    /// `stop` go back to the queue when the connection closes.
    pub async fn run(&self, stop: CancellationToken) {
        let mut backoff = MIN_BACKOFF;
        loop {
            match self.session(&stop).await {
                SessionEnd::Stopped => return,
                SessionEnd::BrokerLost(error) => {
                    self.health.broker.store(false, Ordering::Relaxed);
                    tracing::warn!(%error, retry_in = ?backoff, "event queue unavailable; reconnecting");
                }
            }
            tokio::select! {
                () = stop.cancelled() => return,
                () = tokio::time::sleep(backoff) => {}
            }
            backoff = (backoff * 2).min(MAX_BACKOFF);
        }
    }

    async fn session(&self, stop: &CancellationToken) -> SessionEnd {
        let connection = match amqp::connect(&self.settings.amqp_url, CONNECT_TIMEOUT).await {
            Ok(connection) => connection,
            Err(error) => return SessionEnd::BrokerLost(error),
        };
        let setup = async {
            let channel = connection.create_channel().await?;
            topology::EVENTS
                .declare(&channel, self.settings.quorum, None)
                .await?;
            channel
                .basic_qos(self.settings.prefetch, BasicQosOptions::default())
                .await?;
            let consumer = channel
                .basic_consume(
                    topology::EVENTS.queue,
                    "analytics",
                    BasicConsumeOptions::default(),
                    FieldTable::default(),
                )
                .await?;
            Ok::<_, lapin::Error>((channel, consumer))
        };
        let (channel, mut deliveries) = match tokio::time::timeout(CONNECT_TIMEOUT, setup).await {
            Ok(Ok(pair)) => pair,
            Ok(Err(error)) => return SessionEnd::BrokerLost(error.to_string()),
            Err(_) => return SessionEnd::BrokerLost("channel setup timed out".to_owned()),
        };
        self.health.broker.store(true, Ordering::Relaxed);
        tracing::info!(queue = topology::EVENTS.queue, "consuming analytics events");
        loop {
            let first = tokio::select! {
                biased;
                () = stop.cancelled() => break,
                next = deliveries.next() => next,
            };
            let mut group = match first {
                Some(Ok(delivery)) => vec![delivery],
                Some(Err(error)) => return SessionEnd::BrokerLost(error.to_string()),
                None => return SessionEnd::BrokerLost("consumer cancelled".to_owned()),
            };
            let mut events = 0;
            let deadline = Instant::now() + self.settings.linger;
            let mut parsed = Vec::with_capacity(group.len());
            loop {
                for delivery in &group[parsed.len()..] {
                    let batch = Batch::from_bytes(&delivery.data);
                    events += batch.as_ref().map_or(0, Batch::len);
                    parsed.push(batch);
                }
                if events >= self.settings.max_events {
                    break;
                }
                match tokio::time::timeout_at(deadline, deliveries.next()).await {
                    Ok(Some(Ok(delivery))) => group.push(delivery),
                    Ok(Some(Err(_)) | None) | Err(_) => break,
                }
            }
            self.metrics
                .held_deliveries
                .set(i64::try_from(group.len()).unwrap_or(i64::MAX));
            let stored = self.store_group(group, parsed, stop).await;
            self.metrics.held_deliveries.set(0);
            if let Err(end) = stored {
                return end;
            }
        }
        let _ = channel.close(200, "shutting down").await;
        let _ = connection.close(200, "shutting down").await;
        SessionEnd::Stopped
    }

    /// Inserts and acknowledges a group of deliveries; an unreadable one is
    /// dead-lettered at once.
    async fn store_group(
        &self,
        group: Vec<Delivery>,
        parsed: Vec<Result<Batch, crate::event::BatchError>>,
        stop: &CancellationToken,
    ) -> Result<(), SessionEnd> {
        let mut readable = Vec::with_capacity(group.len());
        for (delivery, batch) in group.into_iter().zip(parsed) {
            match batch {
                Ok(mut batch) => {
                    clean(&mut batch);
                    readable.push((delivery, batch));
                }
                Err(error) => {
                    tracing::error!(%error, "unreadable event batch; dead-lettering it");
                    self.dead_letter(&delivery).await?;
                }
            }
        }
        if readable.is_empty() {
            return Ok(());
        }
        let merged = merge(readable.iter().map(|(_, batch)| batch));
        match self.insert_until_stored(&merged, stop).await? {
            Ok(()) => {
                // Every earlier delivery on this channel is settled: one ack covers all.
                if let Some((last, _)) = readable.last() {
                    let multiple = BasicAckOptions { multiple: true };
                    last.acker
                        .ack(multiple)
                        .await
                        .map_err(|e| SessionEnd::BrokerLost(e.to_string()))?;
                }
                Ok(())
            }
            Err(refused) => {
                tracing::warn!(%refused, deliveries = readable.len(), "postgres refused a gathered batch; storing its deliveries one by one");
                for (delivery, batch) in readable {
                    match self.insert_until_stored(&batch, stop).await? {
                        Ok(()) => delivery
                            .acker
                            .ack(BasicAckOptions::default())
                            .await
                            .map_err(|e| SessionEnd::BrokerLost(e.to_string()))?,
                        Err(error) => {
                            tracing::error!(%error, "postgres refused an event batch; dead-lettering it");
                            self.dead_letter(&delivery).await?;
                        }
                    }
                }
                Ok(())
            }
        }
    }

    /// Retries while Postgres is unavailable. The outer error ends the session
    /// (stopping); the inner one is Postgres refusing the data.
    async fn insert_until_stored(
        &self,
        batch: &Batch,
        stop: &CancellationToken,
    ) -> Result<Result<(), StoreError>, SessionEnd> {
        let mut backoff = MIN_BACKOFF;
        loop {
            let timer = self.metrics.insert_seconds.start_timer();
            match self.store.insert(batch).await {
                Ok(inserted) => {
                    timer.observe_duration();
                    self.health.postgres.store(true, Ordering::Relaxed);
                    self.metrics
                        .inserted
                        .with_label_values(&["request"])
                        .inc_by(inserted.requests);
                    self.metrics
                        .inserted
                        .with_label_values(&["generation"])
                        .inc_by(inserted.generations);
                    let total = inserted.requests + inserted.generations;
                    let skipped = u64::try_from(batch.len()).unwrap_or(u64::MAX) - total;
                    self.metrics.duplicates.inc_by(skipped);
                    return Ok(Ok(()));
                }
                Err(refused @ StoreError::Refused(_)) => return Ok(Err(refused)),
                Err(error) => {
                    timer.stop_and_discard();
                    self.health.postgres.store(false, Ordering::Relaxed);
                    self.metrics.insert_failures.inc();
                    tracing::warn!(%error, events = batch.len(), retry_in = ?backoff, "events not stored; holding them unacknowledged and retrying");
                }
            }
            tokio::select! {
                () = stop.cancelled() => return Err(SessionEnd::Stopped),
                () = tokio::time::sleep(backoff) => {}
            }
            backoff = (backoff * 2).min(MAX_BACKOFF);
        }
    }

    async fn dead_letter(&self, delivery: &Delivery) -> Result<(), SessionEnd> {
        self.metrics.dead_lettered.inc();
        delivery
            .acker
            .reject(BasicRejectOptions { requeue: false })
            .await
            .map_err(|e| SessionEnd::BrokerLost(e.to_string()))
    }
}

fn merge<'a>(batches: impl Iterator<Item = &'a Batch>) -> Batch {
    let mut merged = Batch::new();
    for batch in batches {
        merged.requests.extend(batch.requests.iter().cloned());
        merged.generations.extend(batch.generations.iter().cloned());
    }
    merged
}

/// What Postgres would refuse for its content alone, made storable: NUL characters
/// (text cannot hold them), a profile that is not JSON, costs beyond the column.
fn clean(batch: &mut Batch) {
    let strip = |text: &mut Arc<str>| {
        if text.contains('\0') {
            *text = text.replace('\0', "").into();
        }
    };
    for event in &mut batch.requests {
        for text in [
            &mut event.engine_version,
            &mut event.prompt_hash,
            &mut event.classification,
            &mut event.primary_system,
            &mut event.client,
            &mut event.key_digest,
            &mut event.profile,
        ] {
            strip(text);
        }
        if let Some(user) = &mut event.user_hash {
            strip(user);
        }
        if serde_json::from_str::<serde::de::IgnoredAny>(&event.profile).is_err() {
            event.profile = "{}".into();
        }
        event.entry_cost_usd = storable_cost(event.entry_cost_usd);
    }
    for event in &mut batch.generations {
        event.model.retain(|c| c != '\0');
        event.key_digest.retain(|c| c != '\0');
        event.cost_usd = storable_cost(event.cost_usd);
    }
}

/// A cost the money columns can hold. JSON cannot carry NaN or infinity but a binary
/// batch can, and one NaN would make every sum over its hour NaN.
fn storable_cost(usd: f64) -> f64 {
    const MAX_COST: f64 = 1e9;
    if usd.is_finite() {
        usd.clamp(0.0, MAX_COST)
    } else {
        0.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::tests::request;
    use crate::event::RequestOutcome;

    #[test]
    fn clean_makes_hostile_text_storable() {
        let mut batch = Batch::new();
        let mut event = request(RequestOutcome::Miss, "Sir\0ius");
        event.profile = "not json".into();
        event.entry_cost_usd = 1e300;
        batch.requests.push(event);
        clean(&mut batch);
        let event = &batch.requests[0];
        assert_eq!(&*event.primary_system, "Sirius");
        assert_eq!(&*event.profile, "{}");
        assert_eq!(event.entry_cost_usd, 1e9);
        for cost in [f64::NAN, f64::INFINITY, f64::NEG_INFINITY, -1.0] {
            assert_eq!(storable_cost(cost), 0.0, "{cost}");
        }
    }
}
