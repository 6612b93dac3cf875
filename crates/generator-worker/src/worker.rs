//! The worker's one step: a job in, an [`Outcome`] out. The consume loop
//! (`consumer`) only turns outcomes into acks.
//!
//! A job is generated at most once per lock: the worker adopts the fill lock with the
//! job's token (or finds another holder and leaves the key to it), then fills the key
//! through the fill protocol ([`Holder::fill`]): a redelivered or duplicate job finds
//! the value and never pays twice, an unreadable entry is replaced, the write is
//! fenced, and waiting gateways are signalled. Its text streams to the key's live
//! stream as the LLM writes it, for every gateway with a request streaming the key.
//!
//! While Redis fails (a Cluster failover, a restart) the job's Redis calls are retried
//! for up to `REDIS_FAILOVER_WAIT`, holding the message: handing it back at once would
//! spend its deliveries (`RABBITMQ_DELIVERY_LIMIT`) in seconds, and after the LLM call
//! would throw away a narrative already paid for.

use std::sync::Arc;
use std::time::Instant;

use analytics::EventSink;
use cache_core::{CacheKey, CanonicalProfile, Envelope, LiveSink, StoreError};
use cache_redis::lock::{Acquired, LockToken};
use cache_redis::signals::Signal;
use prometheus::{Histogram, HistogramOpts, IntCounter, IntCounterVec, Opts, Registry};

use narrative_fill::{generation_event, Filled, Holder, Text, Want};
use narrative_gen::{GenerateError, NarrativeGenerator};
use narrative_queue::{Job, Trigger};

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
    /// Stored entries found unreadable (and so replaced).
    pub unreadable: IntCounter,
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
        let unreadable = IntCounter::new(
            "narrative_unreadable_entries_total",
            "Stored entries that could not be read (corrupt, unknown key or format), replaced by the next generation",
        )
        .expect("valid metric");
        for collector in [
            Box::new(jobs.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(generation_seconds.clone()),
            Box::new(cost_usd.clone()),
            Box::new(unreadable.clone()),
        ] {
            registry.register(collector).expect("unique metric names");
        }
        Self {
            registry,
            jobs,
            generation_seconds,
            cost_usd,
            unreadable,
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
    /// The fill protocol's Redis side: store, lock, signals.
    pub holder: Holder,
    pub generator: Arc<dyn NarrativeGenerator>,
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
        let holds_lock = job.trigger != Trigger::Prewarm;
        let token = if holds_lock {
            LockToken::from_job(job.lock_token.clone())
        } else {
            LockToken::random()
        };
        if key.prompt_hash() != prompt_hash.as_str() {
            // Waiting gateways fall back now rather than waiting out the lock.
            if holds_lock {
                self.holder.signal(Signal::Failed, &key).await;
                let _ = self.holder.lock().release(&key, &token).await;
            }
            return Outcome::Rejected(format!(
                "key is for prompt {}, this worker writes {prompt_hash}: check LLM_MODEL and the prompt on both sides",
                key.prompt_hash()
            ));
        }
        let token = match self
            .holder
            .patiently(|| self.take_lock(job, &key, &token))
            .await
        {
            Ok(Some(token)) => token,
            Ok(None) => return Outcome::HeldElsewhere,
            Err(error) => return Outcome::Retry(error.to_string()),
        };
        let generate = |live| self.generate(&key, &profile, job, live);
        // Nobody waits on a pre-warm: its text is not streamed.
        let text = if job.trigger == Trigger::Prewarm {
            Text::Unwatched
        } else {
            Text::Streamed
        };
        match self
            .holder
            .fill(&key, &token, Want::Any, text, generate)
            .await
        {
            Filled::Found(_) | Filled::AlreadyStored(_) => Outcome::AlreadyCached,
            Filled::Stored(_) => Outcome::Stored,
            Filled::LockLost(_) => Outcome::LockLost,
            Filled::NotWritten(_, error) | Filled::LookFailed(error) => {
                Outcome::Retry(error.to_string())
            }
            Filled::Failed(GenerateError::BudgetExhausted) => Outcome::OverBudget,
            Filled::Failed(error) => Outcome::Failed(error.to_string()),
        }
    }

    /// One generator call, its text going to the key's live stream, timed, priced and
    /// reported.
    async fn generate(
        &self,
        key: &CacheKey,
        profile: &CanonicalProfile,
        job: &Job,
        live: Arc<dyn LiveSink>,
    ) -> Result<Arc<Envelope>, GenerateError> {
        let started = Instant::now();
        let generated = self.generator.generate(profile, live.as_ref()).await;
        if generated.as_ref().err() == Some(&GenerateError::BudgetExhausted) {
            // No call was made: nothing to time or report.
            return Err(GenerateError::BudgetExhausted);
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
        let generation = generated?;
        self.metrics.cost_usd.inc_by(generation.cost_usd);
        Ok(Arc::new(generation.into_envelope(
            key.engine_version(),
            &self.generator.prompt_hash(),
        )))
    }

    /// The job's lock: adopted from its publisher, or, for a pre-warm job (which waits
    /// holding none), taken now. `None` when someone else holds the key.
    async fn take_lock(
        &self,
        job: &Job,
        key: &CacheKey,
        token: &LockToken,
    ) -> Result<Option<LockToken>, StoreError> {
        let lock = self.holder.lock();
        if job.trigger == Trigger::Prewarm {
            return Ok(
                match lock
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
        Ok(lock
            .adopt(key, token, job.enqueued_at_ms)
            .await?
            .then(|| token.clone()))
    }
}
