//! Accounting: every answer counted once (Prometheus by outcome, the shared hit
//! counters, a request event for analytics), and what `/narrative/stats` reports.

use std::sync::Arc;
use std::time::{Duration, Instant};

use analytics::{RequestEventRef, RequestOutcome};
use cache_core::profile::Classification;
use cache_core::{Envelope, KeyDeriver, KeyedProfile, Tier};

use super::{Answer, Caller, Count, NarrativeService, RecentAnswer, RecentSource, Source, Totals};
use crate::metrics::Outcome;
use cache_core::StoreStats;

#[derive(Debug, Clone, Default)]
pub struct ServiceStats {
    pub store: StoreStats,
    /// The fleet's counts in distributed mode, this instance's otherwise (or while
    /// Redis is unreachable; then `counts_are_global` is false).
    pub counts: Totals,
    pub counts_are_global: bool,
    pub in_flight: usize,
    /// This instance's last answers, newest first.
    pub recent: Vec<RecentAnswer>,
}

/// The texts every request event of a service names, made once and shared by all.
#[derive(Debug)]
pub(super) struct EventTexts {
    engine_version: Arc<str>,
    prompt_hash: Arc<str>,
    primary: Arc<str>,
    hybrid: Arc<str>,
}

impl EventTexts {
    pub(super) fn new(deriver: &KeyDeriver) -> Self {
        Self {
            engine_version: deriver.engine_version().to_string().into(),
            prompt_hash: deriver.prompt_hash().to_string().into(),
            primary: Classification::Primary.as_str().into(),
            hybrid: Classification::Hybrid.as_str().into(),
        }
    }

    fn classification(&self, classification: Classification) -> &Arc<str> {
        match classification {
            Classification::Primary => &self.primary,
            Classification::Hybrid => &self.hybrid,
        }
    }
}

impl NarrativeService {
    pub(super) fn account(
        &self,
        answer: &Answer,
        keyed: &KeyedProfile,
        started: Instant,
        caller: &Caller,
    ) {
        self.account_streamed(answer, keyed, started, caller, None);
    }

    /// Counts an answer once; a streamed one with when its first text went out.
    pub(super) fn account_streamed(
        &self,
        answer: &Answer,
        keyed: &KeyedProfile,
        started: Instant,
        caller: &Caller,
        first_delta: Option<(Duration, &'static str)>,
    ) {
        let (outcome, event_outcome) = match answer.source {
            Source::Stale => {
                self.counters.add(Count::Hit);
                self.metrics.cost_saved_usd.inc_by(answer.envelope.cost_usd);
                (Outcome::Stale, RequestOutcome::Stale)
            }
            Source::Cache => {
                self.counters.add(Count::Hit);
                self.metrics.cost_saved_usd.inc_by(answer.envelope.cost_usd);
                let tier = match answer.tier {
                    Some(Tier::Local) => RequestOutcome::HitL1,
                    Some(Tier::Shared) | None => RequestOutcome::HitL2,
                };
                (Outcome::Hit, tier)
            }
            Source::Generated => {
                self.counters.add(Count::Miss);
                (Outcome::Generated, RequestOutcome::Miss)
            }
            Source::Fallback => {
                self.counters.add(Count::Miss);
                self.counters.add(Count::Fallback);
                (Outcome::Fallback, RequestOutcome::Fallback)
            }
        };
        // One reading of each clock serves the histogram, the last answers and the event.
        let (at, took) = (time::OffsetDateTime::now_utc(), started.elapsed());
        self.metrics.observe_request(outcome, took.as_secs_f64());
        self.remember(RecentSource::Answered(answer.source), at, took);
        self.record_event(
            keyed,
            (at, took),
            caller,
            event_outcome,
            Some(&answer.envelope),
            first_delta.map(|(after, _)| after),
        );
    }

    /// A 202: a miss whose generation runs on without the request.
    pub(super) fn account_pending(&self, keyed: &KeyedProfile, started: Instant, caller: &Caller) {
        self.counters.add(Count::Miss);
        let (at, took) = (time::OffsetDateTime::now_utc(), started.elapsed());
        self.metrics
            .observe_request(Outcome::Pending, took.as_secs_f64());
        self.remember(RecentSource::Pending, at, took);
        self.record_event(keyed, (at, took), caller, RequestOutcome::Miss, None, None);
    }

    fn remember(&self, source: RecentSource, at: time::OffsetDateTime, took: Duration) {
        self.recent.record(RecentAnswer {
            at_ms: u64::try_from(at.unix_timestamp_nanos() / 1_000_000).unwrap_or(0),
            source,
            latency_us: u64::try_from(took.as_micros()).unwrap_or(u64::MAX),
        });
    }

    /// Hands the request's event to the sink (never blocks). A hit credits what its
    /// entry cost to generate.
    pub(super) fn record_request(
        &self,
        keyed: &KeyedProfile,
        started: Instant,
        caller: &Caller,
        outcome: RequestOutcome,
        answered: Option<&Envelope>,
    ) {
        let answered_at = (time::OffsetDateTime::now_utc(), started.elapsed());
        self.record_event(keyed, answered_at, caller, outcome, answered, None);
    }

    /// `(at, took)`: when the answer went out, and how long after the request it did.
    fn record_event(
        &self,
        keyed: &KeyedProfile,
        (at, took): (time::OffsetDateTime, Duration),
        caller: &Caller,
        outcome: RequestOutcome,
        answered: Option<&Envelope>,
        first_delta: Option<Duration>,
    ) {
        let (entry_tokens, entry_cost_usd) = answered.map_or((0, 0.0), |envelope| {
            (
                u64::from(envelope.tokens_in) + u64::from(envelope.tokens_out),
                envelope.cost_usd,
            )
        });
        // Borrowed: a sink that only counts it (in process) copies nothing; one that
        // publishes it makes it owned, sharing every text.
        let texts = &self.event_texts;
        self.events.record_request(RequestEventRef {
            at,
            outcome,
            latency_us: u64::try_from(took.as_micros()).unwrap_or(u64::MAX),
            engine_version: &texts.engine_version,
            prompt_hash: &texts.prompt_hash,
            classification: texts.classification(keyed.profile.classification),
            primary_system: &keyed.primary_system,
            client: &caller.client,
            user_hash: caller.user_hash.as_ref(),
            key_digest: &keyed.digest,
            profile: &keyed.canonical_json,
            entry_tokens,
            entry_cost_usd,
            first_delta_us: first_delta
                .map(|after| u64::try_from(after.as_micros()).unwrap_or(u64::MAX)),
        });
    }

    pub(super) fn index_user(&self, keyed: &KeyedProfile, caller: &Caller) {
        if let Some(user) = &caller.user_hash {
            self.user_index.record(user, &keyed.key);
        }
    }

    pub async fn stats(&self) -> ServiceStats {
        let store = match self.store.stats().await {
            Ok(stats) => stats,
            Err(error) => {
                self.metrics.store_errors.inc();
                tracing::warn!(%error, "cache stats unavailable");
                StoreStats::default()
            }
        };
        let global = self.strategy.fleet_counts(&self.counters).await;
        ServiceStats {
            store,
            counts: global.unwrap_or_else(|| self.counters.local()),
            counts_are_global: global.is_some(),
            in_flight: self.flights.len(),
            recent: self.recent.newest_first(),
        }
    }

    /// Adds this instance's counts to the shared ones, every second until `stop`, and
    /// once more at the end.
    pub async fn flush_counters(&self, stop: tokio_util::sync::CancellationToken) {
        loop {
            let stopping = tokio::select! {
                () = stop.cancelled() => true,
                () = tokio::time::sleep(Duration::from_secs(1)) => false,
            };
            if let Err(error) = self.strategy.share_counts(&self.counters).await {
                tracing::debug!(%error, "hit counters not flushed; they are kept for the next try");
            }
            if let Err(error) = self.user_index.flush().await {
                tracing::debug!(%error, "user index not flushed; kept for the next try");
            }
            if stopping {
                return;
            }
        }
    }
}
