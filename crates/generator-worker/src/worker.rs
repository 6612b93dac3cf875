//! The worker's one step: a job in, an [`Outcome`] out. The consume loop
//! (`consumer`) only turns outcomes into acks.
//!
//! A job is generated at most once per lock: the worker first looks in the cache (a
//! redelivered or duplicate job finds the value and never pays twice), then adopts the
//! fill lock with the job's token (or finds another holder and leaves the key to it),
//! generates while extending the lock, writes only if the lock is still its own, and
//! signals `done` or `failed` so waiting gateways answer at once.
//!
//! While Redis fails (a Cluster failover, a restart) the job's Redis calls are retried
//! for up to `REDIS_FAILOVER_WAIT`, holding the message: handing it back at once would
//! spend its deliveries (`RABBITMQ_DELIVERY_LIMIT`) in seconds, and after the LLM call
//! would throw away a narrative already paid for.

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use analytics::EventSink;
use cache_core::lock::{Acquired, FencedWrite, FillLock, LockToken, WriteMode};
use cache_core::signals::{Signal, SignalBus};
use cache_core::{CacheKey, CacheStore, CanonicalProfile, RedisStore, StoreError};
use prometheus::{Histogram, HistogramOpts, IntCounterVec, Opts, Registry};

use crate::generator::{generation_event, GenerateError, NarrativeGenerator};
use crate::queue::Job;

/// What became of a job, and so what the consumer does with its message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Generated and stored.
    Stored,
    /// The value was already there (a redelivery or a duplicate): nothing paid.
    AlreadyCached,
    /// Another holder has the key's lock and will store it.
    HeldElsewhere,
    /// Generated, but the lock was lost before the write: the new holder's value stands.
    LockLost,
    /// The LLM failed for good (after its retries): dead-lettered, waiters told.
    Failed(String),
    /// The daily budget is spent: no call made, waiters told (they answer the
    /// template); acknowledged, since retrying today cannot help and the dead-letter
    /// queue is for what an operator must look at.
    OverBudget,
    /// Redis failed: handed back to the queue to try again.
    Retry(String),
    /// Not a job this worker can carry out: dead-lettered.
    Rejected(String),
}

/// What the consumer does with the message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Disposition {
    Ack,
    Requeue,
    DeadLetter,
}

impl Outcome {
    pub fn disposition(&self) -> Disposition {
        match self {
            Self::Stored
            | Self::AlreadyCached
            | Self::HeldElsewhere
            | Self::LockLost
            | Self::OverBudget => Disposition::Ack,
            Self::Retry(_) => Disposition::Requeue,
            Self::Failed(_) | Self::Rejected(_) => Disposition::DeadLetter,
        }
    }

    pub fn label(&self) -> &'static str {
        match self {
            Self::Stored => "stored",
            Self::AlreadyCached => "already_cached",
            Self::HeldElsewhere => "held_elsewhere",
            Self::LockLost => "lock_lost",
            Self::Failed(_) => "failed",
            Self::OverBudget => "over_budget",
            Self::Retry(_) => "retry",
            Self::Rejected(_) => "rejected",
        }
    }
}

/// The worker's metrics, named in one place.
#[derive(Debug, Clone)]
pub struct WorkerMetrics {
    pub registry: Registry,
    pub jobs: IntCounterVec,
    pub generation_seconds: Histogram,
    pub cost_usd: prometheus::Counter,
}

impl WorkerMetrics {
    pub fn new() -> Self {
        let registry = Registry::new();
        let jobs = IntCounterVec::new(
            Opts::new("worker_jobs_total", "Jobs handled, by outcome"),
            &["outcome"],
        )
        .expect("valid metric");
        let generation_seconds = Histogram::with_opts(
            HistogramOpts::new(
                "worker_generation_duration_seconds",
                "LLM generation time, retries included",
            )
            .buckets(vec![0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0]),
        )
        .expect("valid metric");
        let cost_usd = prometheus::Counter::new("llm_cost_usd_total", "Dollars spent on the LLM")
            .expect("valid metric");
        for collector in [
            Box::new(jobs.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(generation_seconds.clone()),
            Box::new(cost_usd.clone()),
        ] {
            registry.register(collector).expect("unique metric names");
        }
        Self {
            registry,
            jobs,
            generation_seconds,
            cost_usd,
        }
    }

    pub fn render(&self) -> String {
        let mut out = Vec::new();
        let _ = prometheus::Encoder::encode(
            &prometheus::TextEncoder::new(),
            &self.registry.gather(),
            &mut out,
        );
        String::from_utf8(out).unwrap_or_default()
    }
}

impl Default for WorkerMetrics {
    fn default() -> Self {
        Self::new()
    }
}

#[derive(Debug)]
pub struct Worker {
    pub store: Arc<RedisStore>,
    pub lock: FillLock,
    pub bus: Arc<SignalBus>,
    pub generator: Arc<dyn NarrativeGenerator>,
    pub ttl: Duration,
    pub metrics: WorkerMetrics,
    /// Generation events, for the `analytics` service.
    pub events: Arc<dyn EventSink>,
}

impl Worker {
    #[tracing::instrument(skip_all, fields(cache_key = %job.key, request_id = %job.request_id))]
    pub async fn process_one(&self, job: &Job) -> Outcome {
        let outcome = self.process(job).await;
        self.metrics
            .jobs
            .with_label_values(&[outcome.label()])
            .inc();
        match &outcome {
            Outcome::Failed(reason) | Outcome::Retry(reason) | Outcome::Rejected(reason) => {
                tracing::warn!(outcome = outcome.label(), %reason, "job not stored");
            }
            _ => tracing::debug!(outcome = outcome.label(), "job done"),
        }
        outcome
    }

    async fn process(&self, job: &Job) -> Outcome {
        let Ok(key) = CacheKey::parse(&job.key) else {
            return Outcome::Rejected("not a narrative key".to_owned());
        };
        let profile = match CanonicalProfile::from_json(&job.canonical) {
            Ok(profile) => profile,
            Err(error) => return Outcome::Rejected(format!("canonical profile: {error}")),
        };
        // Text written with another prompt or model must not land under this key.
        let prompt_hash = self.generator.prompt_hash();
        // A pre-warm job holds no lock and has no one waiting: it must not signal. It
        // takes the lock with a token of its own, the same on every retry.
        let holds_lock = job.trigger != crate::queue::Trigger::Prewarm;
        let token = if holds_lock {
            LockToken::from_job(job.lock_token.clone())
        } else {
            LockToken::random()
        };
        if key.prompt_hash() != prompt_hash.as_str() {
            // Waiting gateways fall back now rather than waiting out the lock.
            if holds_lock {
                self.signal(Signal::Failed, &key).await;
                let _ = self.lock.release(&key, &token).await;
            }
            return Outcome::Rejected(format!(
                "key is for prompt {}, this worker writes {prompt_hash}: check LLM_MODEL and the prompt on both sides",
                key.prompt_hash()
            ));
        }
        // An entry that does not open (a rotated-out key, a corrupt value) is replaced.
        let mut write_mode = WriteMode::IfAbsent;
        match self.patiently(|| self.store.get(&key)).await {
            Ok(Some(_)) => {
                self.signal(Signal::Done, &key).await;
                let _ = self.lock.release(&key, &token).await;
                return Outcome::AlreadyCached;
            }
            Ok(None) => {}
            Err(StoreError::Corrupt(_)) => write_mode = WriteMode::Replace,
            Err(error) => return Outcome::Retry(error.to_string()),
        }
        let token = match self.patiently(|| self.take_lock(job, &key, &token)).await {
            Ok(Some(token)) => token,
            Ok(None) => return Outcome::HeldElsewhere,
            Err(error) => return Outcome::Retry(error.to_string()),
        };
        // A pre-warm job took its lock just now: a user's miss may have stored the
        // entry while the job waited.
        if !holds_lock && matches!(self.store.get(&key).await, Ok(Some(_))) {
            let _ = self.lock.release(&key, &token).await;
            return Outcome::AlreadyCached;
        }
        let started = Instant::now();
        let generated = self
            .lock
            .hold_while(&key, &token, self.generator.generate(&profile))
            .await;
        // Nothing extends the lock from here: the write may wait for Redis only while
        // the lock surely lives (the last extension was at most a third of its TTL ago).
        let write_deadline = Instant::now() + self.lock.ttl() / 2;
        if generated.as_ref().err() == Some(&GenerateError::BudgetExhausted) {
            self.signal(Signal::Failed, &key).await;
            let _ = self.lock.release(&key, &token).await;
            return Outcome::OverBudget;
        }
        self.metrics
            .generation_seconds
            .observe(started.elapsed().as_secs_f64());
        self.events.record_generation(generation_event(
            generated.as_ref(),
            self.generator.model(),
            key.digest(),
            job.trigger,
            started.elapsed(),
        ));
        let outcome = match generated {
            Err(error) => {
                self.signal(Signal::Failed, &key).await;
                Outcome::Failed(error.to_string())
            }
            Ok(generation) => {
                self.metrics.cost_usd.inc_by(generation.cost_usd);
                let envelope =
                    Arc::new(generation.into_envelope(key.engine_version(), &prompt_hash));
                let value = self.store.encode(&key, &envelope).await;
                let write = || {
                    self.lock
                        .write_if_held(&key, &token, value.clone(), self.ttl, write_mode)
                };
                match self.patiently_until(write_deadline, write).await {
                    Ok(FencedWrite::Written) => {
                        self.signal(Signal::Done, &key).await;
                        Outcome::Stored
                    }
                    Ok(FencedWrite::AlreadyStored) => {
                        self.signal(Signal::Done, &key).await;
                        Outcome::AlreadyCached
                    }
                    Ok(FencedWrite::LockLost) => Outcome::LockLost,
                    Err(error) => Outcome::Retry(error.to_string()),
                }
            }
        };
        let _ = self.lock.release(&key, &token).await;
        outcome
    }

    /// The job's lock: adopted from its publisher, or, for a pre-warm job (which waits
    /// holding none), taken now. `None` when someone else holds the key.
    async fn take_lock(
        &self,
        job: &Job,
        key: &CacheKey,
        token: &LockToken,
    ) -> Result<Option<LockToken>, StoreError> {
        if job.trigger == crate::queue::Trigger::Prewarm {
            return Ok(
                match self
                    .lock
                    .try_acquire_as(key, token.clone(), job.enqueued_at_ms)
                    .await?
                {
                    Acquired::Taken(token) => Some(token),
                    // Held by another, or erased since the job was enqueued: either way
                    // this job has nothing to do.
                    Acquired::Held | Acquired::Erased => None,
                },
            );
        }
        Ok(self
            .lock
            .adopt(key, token, job.enqueued_at_ms)
            .await?
            .then(|| token.clone()))
    }

    /// Runs a Redis call again, with growing pauses, while it fails because Redis is
    /// unreachable, for up to `REDIS_FAILOVER_WAIT`. Errors Redis answered with (a
    /// script error, a corrupt value) are returned at once.
    async fn patiently<T, F, Fut>(&self, call: F) -> Result<T, StoreError>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<T, StoreError>>,
    {
        let patience = self.store.backend().timeouts().failover_wait;
        self.patiently_until(Instant::now() + patience, call).await
    }

    /// [`Self::patiently`], giving up at `deadline` or after `REDIS_FAILOVER_WAIT`,
    /// whichever comes first.
    async fn patiently_until<T, F, Fut>(
        &self,
        deadline: Instant,
        mut call: F,
    ) -> Result<T, StoreError>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<T, StoreError>>,
    {
        let backend = self.store.backend();
        let deadline = deadline.min(Instant::now() + backend.timeouts().failover_wait);
        let mut pause = Duration::from_millis(50);
        loop {
            let result = call().await;
            // Timeouts and refused connections, not what Redis answered: the breaker
            // is shared, and a success elsewhere says nothing about this call's node.
            let unreachable = matches!(
                result,
                Err(StoreError::Timeout | StoreError::Unavailable(_))
            );
            if !unreachable || Instant::now() + pause >= deadline {
                return result;
            }
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(Duration::from_secs(1));
        }
    }

    async fn signal(&self, signal: Signal, key: &CacheKey) {
        if let Err(error) = self.bus.publish(signal, key).await {
            tracing::warn!(%error, "could not signal the gateways; they will find the value on their next poll");
        }
    }
}
