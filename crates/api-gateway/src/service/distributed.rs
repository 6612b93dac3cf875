//! Filling a key when several instances share one Redis.
//!
//! The in-process flight's leader takes the key's fill lock. If it gets it, either it
//! fills the key itself through the fill protocol ([`Holder::fill`]: look, generate
//! while extending the lock, fenced write, signal, release), or, with workers, it
//! publishes a job carrying the lock's token and keeps that lock alive while the job
//! waits in the queue, however long the queue is (up to `JOB_WAIT_LIMIT`): the key is
//! published once, and the worker that takes the job adopts the lock and fills it.
//! An entry this instance cannot read is filled here, never as a job: a worker that
//! can read it would find nothing to do.
//!
//! If another instance holds the lock, the flight waits for its signal, re-checking
//! the store on every signal and every poll interval (in case a signal is lost); a lock
//! that disappears without a value (its holder died) is taken over on the next round.
//! If Redis itself fails, the flight waits for it (a Cluster failover is over in
//! seconds) for up to `REDIS_FAILOVER_WAIT` of failing; after that the instance
//! generates on its own: one call per instance instead of one in all. The request is
//! answered either way (the template once `GENERATION_WAIT_MS` is up, while the
//! flight goes on).

use std::sync::Arc;
use std::time::{Duration, Instant};

use cache_core::lock::{Acquired, FillLock, LockToken};
use cache_core::signals::{Signal, SignalBus, Waiter};
use cache_core::{now_ms, CacheStore, Envelope, KeyedProfile, RedisStore, StoreError, TieredStore};
use narrative_fill::{Filled, Holder, Want};
use narrative_queue::{ConfirmedPublisher, Job, JOB_VERSION};

use super::{FillError, FillMode, FlightLeader, FlightResult, NarrativeService};

/// The shared parts of distributed mode.
#[derive(Debug, Clone)]
pub struct Distributed {
    /// The fill protocol's Redis side: the store, the fill lock, the signal bus.
    pub holder: Holder,
    pub tiers: Arc<TieredStore>,
    /// Set when workers generate (`AMQP_URL`): the lock holder enqueues a job.
    pub jobs: Option<Arc<ConfirmedPublisher>>,
    /// `JOB_WAIT_LIMIT`: how long a flight keeps its queued job's lock alive.
    pub job_wait_limit: Duration,
}

impl Distributed {
    pub fn redis(&self) -> &Arc<RedisStore> {
        self.holder.store()
    }

    pub fn lock(&self) -> &FillLock {
        self.holder.lock()
    }

    pub fn bus(&self) -> &Arc<SignalBus> {
        self.holder.bus()
    }
}

/// How often a waiter re-checks the store when no signal came.
const POLL_INTERVAL: Duration = Duration::from_millis(250);

/// What a look finds for a flight.
enum Look {
    /// A value that ends the flight.
    WillDo(Arc<Envelope>),
    /// An entry this instance cannot read: it must be replaced, here.
    Unreadable,
    Nothing,
}

impl NarrativeService {
    pub(super) async fn fill_shared(
        &self,
        shared: &Distributed,
        keyed: &KeyedProfile,
        mode: FillMode,
        leader: &FlightLeader,
    ) -> FlightResult {
        let key = &keyed.key;
        // Long enough for a holder elsewhere to finish one slow generation.
        let give_up = Instant::now() + self.generation_wait.max(shared.lock().ttl()) * 4;
        // An erasure after this moment must not see this flight bring the entry back.
        let flight_started = now_ms();
        let mut waiter = shared.bus().waiter(key);
        // While Redis fails: since when, and the token of the attempt whose outcome is
        // unknown (a timed-out call may have taken the lock; asking again with the same
        // token finds it ours).
        let mut redis_failed_at: Option<Instant> = None;
        let mut uncertain_token: Option<LockToken> = None;
        loop {
            let unreadable = match self.look_for(shared, keyed, mode).await {
                Look::WillDo(envelope) => return Ok(envelope),
                Look::Unreadable => true,
                Look::Nothing => false,
            };
            let token = uncertain_token.take().unwrap_or_else(LockToken::random);
            let acquired = shared
                .lock()
                .try_acquire_as(key, token.clone(), flight_started)
                .await;
            if acquired.is_ok() {
                redis_failed_at = None;
            }
            match acquired {
                Ok(Acquired::Taken(token)) => {
                    leader.claim();
                    // Refreshes run here rather than as jobs: a worker would find the
                    // stale value and consider the job done. Pre-warms reach this with
                    // no workers configured (with workers they are jobs on their own
                    // queue, published by the run).
                    let jobs = shared
                        .jobs
                        .as_ref()
                        .filter(|_| mode == FillMode::Miss && !unreadable);
                    let Some(jobs) = jobs else {
                        return self.fill_as_holder(shared, keyed, token, mode).await;
                    };
                    match self
                        .fill_by_worker(shared, keyed, jobs, &token, flight_started, &mut waiter)
                        .await
                    {
                        JobFill::Ended(result) => return result,
                        // Not past `give_up`: a failure whose signal was lost must not
                        // publish the key again and again.
                        JobFill::LockGone if Instant::now() < give_up => continue,
                        JobFill::LockGone => return Err(FillError::GaveUp),
                        JobFill::NotQueued => {
                            // The job may still have been enqueued (a lost confirm):
                            // give up its token, so a worker that gets it finds another
                            // holder, and generate here under a new one.
                            let _ = shared.lock().release(key, &token).await;
                            match shared.lock().try_acquire_since(key, flight_started).await {
                                Ok(Acquired::Taken(fresh)) => {
                                    return self.fill_as_holder(shared, keyed, fresh, mode).await
                                }
                                Ok(Acquired::Held) => continue,
                                Ok(Acquired::Erased) => return Err(FillError::Erased),
                                Err(_) => return self.fill_alone(shared, keyed, mode).await,
                            }
                        }
                    }
                }
                Ok(Acquired::Held) => leader.claim(),
                Ok(Acquired::Erased) => return Err(FillError::Erased),
                Err(error) => {
                    uncertain_token = Some(token);
                    let failed_at = *redis_failed_at.get_or_insert_with(|| {
                        // Once per outage seen by this flight, not once per look.
                        self.metrics.store_errors.inc();
                        tracing::warn!(%error, "fill lock unavailable; waiting for redis");
                        Instant::now()
                    });
                    if redis_outage_outlasts(shared, failed_at) {
                        // The breaker may still be open on an outage that is over (a
                        // restart another instance already saw end): one read past it
                        // decides before this instance pays the LLM alone. Any answer
                        // (a value, none, one this instance cannot read) means Redis
                        // is back, and its success has closed the breaker: the next
                        // round, after the poll below, looks again.
                        let back = matches!(
                            shared.redis().probe(key).await,
                            Ok(_) | Err(StoreError::Corrupt(_))
                        );
                        if !back {
                            tracing::warn!(%error, "redis still failing; generating in this instance alone");
                            return self.fill_alone(shared, keyed, mode).await;
                        }
                    }
                    // Otherwise polled below, like a key held elsewhere.
                }
            }
            let now = Instant::now();
            if now >= give_up {
                return Err(FillError::GaveUp);
            }
            let next_look = (now + POLL_INTERVAL).min(give_up);
            if let Ok(Some(Signal::Failed)) =
                tokio::time::timeout_at(next_look.into(), waiter.next()).await
            {
                return Err(FillError::FailedElsewhere);
            }
        }
    }

    /// Publishes the key's job with the lock's `token`, then waits for the worker's
    /// signal while keeping the lock alive: a job waiting in the queue keeps its key,
    /// so no other flight publishes it again.
    async fn fill_by_worker(
        &self,
        shared: &Distributed,
        keyed: &KeyedProfile,
        jobs: &ConfirmedPublisher,
        token: &LockToken,
        flight_started: i64,
        waiter: &mut Waiter,
    ) -> JobFill {
        let key = &keyed.key;
        let job = Job {
            version: JOB_VERSION,
            key: key.to_string(),
            canonical: keyed.canonical_json.clone(),
            lock_token: token.as_str().to_owned(),
            trigger: FillMode::Miss.trigger(),
            request_id: hex_id(),
            // The erasure fence's time: when this flight began, before its lock was
            // taken (see `FillLock::adopt`).
            enqueued_at_ms: flight_started,
        };
        if let Err(error) = job.publish(jobs).await {
            self.metrics.store_errors.inc();
            tracing::warn!(%error, "job not enqueued; generating in process");
            return JobFill::NotQueued;
        }
        let alive = shared.lock().keep_alive(key, token);
        let give_up = Instant::now() + shared.job_wait_limit;
        loop {
            let next_look = (Instant::now() + POLL_INTERVAL).min(give_up);
            if let Ok(Some(Signal::Failed)) =
                tokio::time::timeout_at(next_look.into(), waiter.next()).await
            {
                return JobFill::Ended(Err(FillError::FailedElsewhere));
            }
            if let Look::WillDo(envelope) = self.look_for(shared, keyed, FillMode::Miss).await {
                return JobFill::Ended(Ok(envelope));
            }
            if alive.lost() {
                // Released without a value this instance can read, or revoked by an
                // erasure: look again from the start.
                return JobFill::LockGone;
            }
            if Instant::now() >= give_up {
                // The lock now expires by itself; a worker that still takes the job
                // adopts it again.
                tracing::warn!(cache_key = %key, "queued job not taken within JOB_WAIT_LIMIT");
                return JobFill::Ended(Err(FillError::GaveUp));
            }
        }
    }

    /// A stored value that answers this flight: any for a miss; for a refresh, one
    /// newer than the entry being replaced, read from Redis itself (this instance's L1
    /// may still hold the stale copy).
    async fn look_for(&self, shared: &Distributed, keyed: &KeyedProfile, mode: FillMode) -> Look {
        let found = match mode {
            FillMode::Miss | FillMode::Prewarm => match self.look(&keyed.key).await {
                super::Looked::Found(envelope, _, _) => Some(envelope),
                super::Looked::Unreadable => return Look::Unreadable,
                super::Looked::Absent => None,
            },
            FillMode::Replace { older_than_ms } => match shared.redis().get(&keyed.key).await {
                Ok(Some(envelope)) if envelope.created_at_ms > older_than_ms => {
                    shared.tiers.put_l1(&keyed.key, Arc::clone(&envelope)).await;
                    Some(envelope)
                }
                Err(StoreError::Corrupt(_)) => return Look::Unreadable,
                _ => None,
            },
        };
        found.map_or(Look::Nothing, Look::WillDo)
    }

    /// This instance holds the lock: the fill protocol, then this instance's L1.
    async fn fill_as_holder(
        &self,
        shared: &Distributed,
        keyed: &KeyedProfile,
        token: LockToken,
        mode: FillMode,
    ) -> FlightResult {
        let key = &keyed.key;
        let want = match mode {
            FillMode::Miss | FillMode::Prewarm => Want::Any,
            FillMode::Replace { older_than_ms } => Want::NewerThan(older_than_ms),
        };
        let generate = self.generate(keyed, mode.trigger());
        match shared.holder.fill(key, &token, want, generate).await {
            Filled::Found(envelope) | Filled::Stored(envelope) => {
                shared.tiers.put_l1(key, Arc::clone(&envelope)).await;
                Ok(envelope)
            }
            // Complete and valid, so our waiters get it; another value stands in Redis.
            Filled::AlreadyStored(envelope) | Filled::LockLost(envelope) => Ok(envelope),
            Filled::NotWritten(envelope, error) => {
                self.metrics.store_errors.inc();
                tracing::warn!(%error, "cache write failed; keeping the narrative in this instance only");
                shared.tiers.put_l1(key, Arc::clone(&envelope)).await;
                Ok(envelope)
            }
            Filled::Failed(error) => Err(error),
            Filled::LookFailed(error) => {
                self.metrics.store_errors.inc();
                tracing::warn!(%error, "redis unreadable while holding the lock; generating in this instance alone");
                self.fill_alone(shared, keyed, mode).await
            }
        }
    }

    /// Without Redis we cannot know who else generates, so the result stays in this
    /// instance's L1: it never overwrites a fenced value.
    async fn fill_alone(
        &self,
        shared: &Distributed,
        keyed: &KeyedProfile,
        mode: FillMode,
    ) -> FlightResult {
        let envelope = self.generate(keyed, mode.trigger()).await?;
        shared.tiers.put_l1(&keyed.key, Arc::clone(&envelope)).await;
        Ok(envelope)
    }
}

/// How a fill through a worker ended.
enum JobFill {
    Ended(FlightResult),
    /// The lock went away without a value this instance can use.
    LockGone,
    /// The broker did not confirm the job.
    NotQueued,
}

/// Whether Redis has failed for longer than `REDIS_FAILOVER_WAIT`, for this flight
/// (since `failed_at`) or for the whole instance: once an outage is known to be long,
/// new flights stop waiting for it.
fn redis_outage_outlasts(shared: &Distributed, failed_at: Instant) -> bool {
    let backend = shared.redis().backend();
    let patience = backend.timeouts().failover_wait;
    failed_at.elapsed() >= patience || backend.failing_for().is_some_and(|d| d >= patience)
}

fn hex_id() -> String {
    format!("{:016x}", rand::random::<u64>())
}
