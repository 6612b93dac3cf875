//! Filling a key when several instances share one Redis.
//!
//! The in-process flight's leader takes the key's fill lock. If it gets it, it
//! generates while extending the lock, writes the value only if the lock is still its
//! own (a fenced write), signals `done` (or `failed`) and releases. If another instance
//! holds the lock, it waits for that instance's signal, re-checking the store on every
//! signal and every poll interval (in case a signal is lost); a lock that disappears
//! without a value (its holder died) is taken over on the next round. If Redis itself
//! fails, the flight waits for it (a Cluster failover is over in seconds) for up to
//! `REDIS_FAILOVER_WAIT` of failing; after that the instance generates on its own: one
//! call per instance instead of one in all. The request is answered either way (the
//! template once `GENERATION_WAIT_MS` is up, while the flight goes on).

use std::sync::Arc;
use std::time::{Duration, Instant};

use cache_core::lock::{Acquired, FencedWrite, FillLock, LockToken, WriteMode};
use cache_core::signals::{Signal, SignalBus};
use cache_core::{now_ms, CacheStore, Envelope, KeyedProfile, RedisStore, TieredStore};
use generator_worker::queue::{Job, JOB_VERSION};

use super::{FillError, FillMode, FlightResult, NarrativeService};

/// The shared parts of distributed mode.
#[derive(Debug, Clone)]
pub struct Distributed {
    pub redis: Arc<RedisStore>,
    pub tiers: Arc<TieredStore>,
    pub lock: FillLock,
    pub bus: Arc<SignalBus>,
    /// Set when workers generate (`AMQP_URL`): the lock holder enqueues a job.
    pub jobs: Option<Arc<super::JobPublisher>>,
}

/// How often a waiter re-checks the store when no signal came.
const POLL_INTERVAL: Duration = Duration::from_millis(250);

impl NarrativeService {
    pub(super) async fn fill_shared(
        &self,
        shared: &Distributed,
        keyed: &KeyedProfile,
        mode: FillMode,
    ) -> FlightResult {
        let key = &keyed.key;
        // Long enough for a holder elsewhere to finish one slow generation.
        let give_up = Instant::now() + self.generation_wait.max(shared.lock.ttl()) * 4;
        // An erasure after this moment must not see this flight bring the entry back.
        let flight_started = now_ms();
        let mut waiter = shared.bus.waiter(key);
        // While Redis fails: since when, and the token of the attempt whose outcome is
        // unknown (a timed-out call may have taken the lock; asking again with the same
        // token finds it ours).
        let mut redis_failed_at: Option<Instant> = None;
        let mut uncertain_token: Option<LockToken> = None;
        loop {
            if let Some(envelope) = self.value_that_will_do(shared, keyed, mode).await {
                return Ok(envelope);
            }
            let token = uncertain_token.take().unwrap_or_else(LockToken::random);
            let acquired = shared
                .lock
                .try_acquire_as(key, token.clone(), flight_started)
                .await;
            if acquired.is_ok() {
                redis_failed_at = None;
            }
            match acquired {
                // Refreshes run here rather than as jobs: a worker would find the
                // stale value and consider the job done.
                // Pre-warms reach this with no workers configured (with workers they
                // are jobs on their own queue, published by the run).
                Ok(Acquired::Taken(token)) => match (&shared.jobs, mode) {
                    (None, _) | (_, FillMode::Replace { .. } | FillMode::Prewarm) => {
                        return self.fill_as_holder(shared, keyed, token, mode).await
                    }
                    (Some(jobs), FillMode::Miss) => {
                        let job = Job {
                            version: JOB_VERSION,
                            key: key.to_string(),
                            canonical: keyed.canonical_json.clone(),
                            lock_token: token.as_str().to_owned(),
                            trigger: mode.trigger(),
                            request_id: hex_id(),
                            // The erasure fence's time: when this flight began, before
                            // its lock was taken (see `FillLock::adopt`).
                            enqueued_at_ms: flight_started,
                        };
                        // Once the broker confirms, a worker holds the key for us: we
                        // wait for its signal like any other waiter.
                        if let Err(error) = jobs.publish(&job).await {
                            self.metrics.store_errors.inc();
                            tracing::warn!(%error, "job not enqueued; generating in process");
                            // The job may still have been enqueued (a lost confirm): give up
                            // its token, so a worker that gets it finds another holder.
                            let _ = shared.lock.release(key, &token).await;
                            match shared.lock.try_acquire_since(key, flight_started).await {
                                Ok(Acquired::Taken(fresh)) => {
                                    return self.fill_as_holder(shared, keyed, fresh, mode).await
                                }
                                Ok(Acquired::Held) => continue,
                                Ok(Acquired::Erased) => return Err(FillError::Erased),
                                Err(_) => {
                                    let envelope = self.generate(keyed, mode.trigger()).await?;
                                    shared.tiers.put_l1(key, Arc::clone(&envelope)).await;
                                    return Ok(envelope);
                                }
                            }
                        }
                    }
                },
                Ok(Acquired::Held) => {}
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
                        // Without the lock we cannot know who else generates, so the
                        // result stays in this instance's L1: it never overwrites a
                        // fenced value.
                        tracing::warn!(%error, "redis still failing; generating in this instance alone");
                        let envelope = self.generate(keyed, mode.trigger()).await?;
                        shared.tiers.put_l1(key, Arc::clone(&envelope)).await;
                        return Ok(envelope);
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

    /// A stored value that answers this flight: any for a miss; for a refresh, one
    /// newer than the entry being replaced, read from Redis itself (this instance's L1
    /// may still hold the stale copy).
    async fn value_that_will_do(
        &self,
        shared: &Distributed,
        keyed: &KeyedProfile,
        mode: FillMode,
    ) -> Option<Arc<Envelope>> {
        match mode {
            FillMode::Miss | FillMode::Prewarm => self
                .cached(&keyed.key)
                .await
                .map(|(envelope, _, _)| envelope),
            FillMode::Replace { older_than_ms } => {
                let envelope = shared.redis.get(&keyed.key).await.ok().flatten()?;
                if envelope.created_at_ms <= older_than_ms {
                    return None;
                }
                shared.tiers.put_l1(&keyed.key, Arc::clone(&envelope)).await;
                Some(envelope)
            }
        }
    }

    async fn fill_as_holder(
        &self,
        shared: &Distributed,
        keyed: &KeyedProfile,
        token: LockToken,
        mode: FillMode,
    ) -> FlightResult {
        let key = &keyed.key;
        // Look again: the previous holder may have written just before we took the lock.
        if let Some(envelope) = self.value_that_will_do(shared, keyed, mode).await {
            let _ = shared.lock.release(key, &token).await;
            return Ok(envelope);
        }
        let generated = shared
            .lock
            .hold_while(key, &token, self.generate(keyed, mode.trigger()))
            .await;
        let outcome = match generated {
            Ok(envelope) => {
                self.write_fenced(shared, keyed, &token, &envelope, mode)
                    .await;
                Ok(envelope)
            }
            Err(error) => {
                if let Err(e) = shared.bus.publish(Signal::Failed, key).await {
                    tracing::warn!(error = %e, "could not tell waiters the generation failed; they will time out");
                }
                Err(error)
            }
        };
        if let Err(error) = shared.lock.release(key, &token).await {
            tracing::warn!(%error, "fill lock not released; it expires by itself");
        }
        outcome
    }

    async fn write_fenced(
        &self,
        shared: &Distributed,
        keyed: &KeyedProfile,
        token: &LockToken,
        envelope: &Arc<Envelope>,
        mode: FillMode,
    ) {
        let key = &keyed.key;
        let value = shared.redis.encode(key, envelope).await;
        let write_mode = match mode {
            FillMode::Miss | FillMode::Prewarm => WriteMode::IfAbsent,
            FillMode::Replace { .. } => WriteMode::Replace,
        };
        match shared
            .lock
            .write_if_held(key, token, value, self.ttl, write_mode)
            .await
        {
            Ok(FencedWrite::Written) => {
                shared.tiers.put_l1(key, Arc::clone(envelope)).await;
                if let Err(error) = shared.bus.publish(Signal::Done, key).await {
                    tracing::warn!(%error, "could not signal completion; waiters find the value on their next poll");
                }
            }
            Ok(FencedWrite::LockLost) => {
                // Our lock expired and someone else holds the key now: their value
                // stands. Our waiters still get ours, which is complete and valid.
                tracing::warn!(cache_key = %key, "fill lock lost before the write; value not stored");
            }
            Ok(FencedWrite::AlreadyStored) => {
                // A value appeared (or a failed read missed it): it stands, as above.
                tracing::debug!(cache_key = %key, "a value was already stored; keeping it");
            }
            Err(error) => {
                self.metrics.store_errors.inc();
                tracing::warn!(%error, "cache write failed; keeping the narrative in this instance only");
                shared.tiers.put_l1(key, Arc::clone(envelope)).await;
            }
        }
    }
}

/// Whether Redis has failed for longer than `REDIS_FAILOVER_WAIT`, for this flight
/// (since `failed_at`) or for the whole instance: once an outage is known to be long,
/// new flights stop waiting for it.
fn redis_outage_outlasts(shared: &Distributed, failed_at: Instant) -> bool {
    let backend = shared.redis.backend();
    let patience = backend.timeouts().failover_wait;
    failed_at.elapsed() >= patience || backend.failing_for().is_some_and(|d| d >= patience)
}

fn hex_id() -> String {
    format!("{:016x}", rand::random::<u64>())
}
