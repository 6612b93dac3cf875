//! The consume loop around [`Worker::process_one`]: manual acks only after the job's
//! outcome is settled (stored and signalled), at most `prefetch` user jobs and
//! `prewarm_prefetch` pre-warm jobs in flight (each queue on a channel of its own, so
//! pre-warm jobs never take a user miss's place),
//! reconnecting by itself when the broker goes away (after the jobs in flight have
//! finished: delivery tags of a lost channel are void, and the broker redelivers those
//! jobs, which then find their values), and on shutdown: stop consuming, finish the
//! jobs in flight, then close.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt as _;
use lapin::options::{
    BasicAckOptions, BasicCancelOptions, BasicConsumeOptions, BasicNackOptions, BasicQosOptions,
    BasicRejectOptions,
};
use lapin::types::FieldTable;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::worker::{Disposition, Outcome, Worker};
use narrative_queue::topology::{self, JOBS, PREWARM};
use narrative_queue::{amqp, Job, QueueSettings};

#[derive(Debug, Clone)]
pub struct ConsumerSettings {
    pub queue: QueueSettings,
    /// User jobs in flight at once (the channel's prefetch).
    pub prefetch: u16,
    /// Pre-warm jobs in flight at once, on top of `prefetch`.
    pub prewarm_prefetch: u16,
}

/// How long a job whose Redis calls failed waits before it goes back to the queue.
const REQUEUE_DELAY: Duration = Duration::from_secs(1);

/// Whether the consumer is attached to the queue now (for `/readyz`).
#[derive(Debug, Default)]
pub struct Consuming(AtomicBool);

impl Consuming {
    pub fn get(&self) -> bool {
        self.0.load(Ordering::Acquire)
    }
}

/// Consumes until `shutdown`, reconnecting after any loss.
pub async fn run(
    worker: Arc<Worker>,
    settings: ConsumerSettings,
    consuming: Arc<Consuming>,
    shutdown: CancellationToken,
) {
    let mut failures = 0u32;
    loop {
        match consume(&worker, &settings, &consuming, &shutdown).await {
            Ok(()) => return,
            Err(error) => {
                consuming.0.store(false, Ordering::Release);
                if failures.is_multiple_of(10) {
                    tracing::warn!(%error, "not consuming jobs; reconnecting");
                }
                failures += 1;
            }
        }
        let backoff = Duration::from_millis(250 * u64::from(failures.min(8)));
        tokio::select! {
            () = shutdown.cancelled() => return,
            () = tokio::time::sleep(backoff) => {}
        }
    }
}

async fn consume(
    worker: &Arc<Worker>,
    settings: &ConsumerSettings,
    consuming: &Consuming,
    shutdown: &CancellationToken,
) -> Result<(), String> {
    let broken = |e: lapin::Error| e.to_string();
    let connection = amqp::connect(&settings.queue.url, Duration::from_secs(5)).await?;
    let tag = format!("generator-worker-{}", std::process::id());
    let mut channels = Vec::new();
    let mut streams = Vec::new();
    for (queue_name, prefetch) in [
        (JOBS.queue, settings.prefetch),
        (PREWARM.queue, settings.prewarm_prefetch),
    ] {
        let channel = connection.create_channel().await.map_err(broken)?;
        topology::declare_all(
            &channel,
            settings.queue.quorum,
            settings.queue.delivery_limit,
        )
        .await
        .map_err(broken)?;
        channel
            .basic_qos(prefetch, BasicQosOptions::default())
            .await
            .map_err(broken)?;
        let stream = channel
            .basic_consume(
                queue_name,
                &tag,
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await
            .map_err(broken)?;
        channels.push(channel);
        // The end of either queue's stream (the broker cancelled that consumer) ends
        // the loop, which reconnects: one queue must not go unconsumed unnoticed.
        streams.push(stream.map(Some).chain(futures::stream::iter([None])));
    }
    // Either queue's deliveries, as they come; each is settled on its own channel.
    let mut deliveries = futures::stream::select_all(streams);
    consuming.0.store(true, Ordering::Release);
    tracing::info!(
        prefetch = settings.prefetch,
        prewarm_prefetch = settings.prewarm_prefetch,
        "consuming generation jobs"
    );
    let in_flight = TaskTracker::new();
    let ended = loop {
        tokio::select! {
            () = shutdown.cancelled() => {
                for channel in &channels {
                    let _ = channel.basic_cancel(&tag, BasicCancelOptions::default()).await;
                }
                break Ok(());
            }
            delivery = deliveries.next() => match delivery {
                Some(Some(Ok(delivery))) => {
                    let worker = Arc::clone(worker);
                    in_flight.spawn(async move { handle(&worker, delivery).await });
                }
                Some(Some(Err(error))) => break Err(broken(error)),
                Some(None) | None => break Err("consumer closed".to_owned()),
            },
        }
    };
    consuming.0.store(false, Ordering::Release);
    // Whether stopping or broken: the jobs in flight finish first. After a broken
    // channel their acks fail and the broker redelivers them, but by then their values
    // are stored, and the redelivery finds them; consuming again at once would start
    // each a second time while the first still runs, and take more than `prefetch`.
    in_flight.close();
    in_flight.wait().await;
    if ended.is_ok() {
        let _ = connection.close(200, "worker shutting down").await;
    }
    ended
}

async fn handle(worker: &Worker, delivery: lapin::message::Delivery) {
    let outcome = match Job::from_bytes(&delivery.data) {
        Ok(job) => worker.process_one(&job).await,
        Err(error) => {
            let outcome = Outcome::Rejected(error.to_string());
            worker
                .metrics
                .jobs
                .with_label_values(&[outcome.label()])
                .inc();
            tracing::warn!(%error, "malformed job dead-lettered");
            outcome
        }
    };
    let settled = match outcome.disposition() {
        Disposition::Ack => delivery.ack(BasicAckOptions::default()).await,
        Disposition::Requeue => {
            // Redis is failing: hand the job back after a pause, not in a tight loop.
            tokio::time::sleep(REQUEUE_DELAY).await;
            delivery
                .nack(BasicNackOptions {
                    requeue: true,
                    ..BasicNackOptions::default()
                })
                .await
        }
        Disposition::DeadLetter => delivery.reject(BasicRejectOptions { requeue: false }).await,
    };
    if let Err(error) = settled {
        // The channel is gone: the broker redelivers the job to whoever consumes next.
        tracing::warn!(%error, "could not settle a job; it will be redelivered");
    }
}
