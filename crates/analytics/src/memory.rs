//! Embedded mode's analytics: events aggregated into hourly buckets in process.
//!
//! Ranges resolve to whole hours. Buckets older than [`RETAINED_HOURS`] are dropped, and
//! each hour tracks at most [`MAX_SYSTEMS_PER_HOUR`] distinct systems (client-chosen
//! names must not grow memory without bound).

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, PoisonError};

use time::OffsetDateTime;

use crate::event::{GenerationEvent, GenerationOutcome, RequestEventRef, RequestOutcome};
use crate::hll::HyperLogLog;
use crate::popularity::{PopularProfile, ProfileCounts};
use crate::summary::{dollars, ratio, Range, RateBucket, Summary, SystemCount, TOP_SYSTEMS};
use crate::EventSink;

/// 90 days of hours.
pub const RETAINED_HOURS: usize = 90 * 24;
pub const MAX_SYSTEMS_PER_HOUR: usize = 1_000;

#[derive(Debug, Default, Clone)]
struct HourTotals {
    by_outcome: [u64; RequestOutcome::ALL.len()],
    systems: HashMap<Arc<str>, u64>,
    tokens_saved: u64,
    saved_usd: f64,
    generations: u64,
    failed_generations: u64,
    generation_ms: u64,
    tokens_in: u64,
    tokens_out: u64,
    cost_usd: f64,
}

impl HourTotals {
    fn count(&self, pick: impl Fn(RequestOutcome) -> bool) -> u64 {
        RequestOutcome::ALL
            .iter()
            .zip(self.by_outcome)
            .filter(|(outcome, _)| pick(**outcome))
            .map(|(_, count)| count)
            .sum()
    }

    fn requests(&self) -> u64 {
        self.by_outcome.iter().sum()
    }
}

#[derive(Debug, Default)]
struct State {
    /// By the hour's start, in Unix seconds.
    hours: BTreeMap<i64, HourTotals>,
    /// By the day's start, in Unix seconds.
    users: BTreeMap<i64, HyperLogLog>,
    profiles: ProfileCounts,
    audit: std::collections::VecDeque<AuditRecord>,
}

/// An admin action, as the audit log keeps it.
#[derive(Debug, Clone, PartialEq)]
pub struct AuditRecord {
    pub at: OffsetDateTime,
    pub actor: String,
    pub action: String,
    /// A keyed hash when the subject is a user; never a user id.
    pub subject: Option<String>,
    pub detail: serde_json::Value,
}

/// Audit records kept in memory (embedded mode has no durable store to keep more).
pub const AUDIT_KEPT: usize = 10_000;

#[derive(Debug, Default)]
pub struct InMemoryAnalytics {
    state: Mutex<State>,
}

fn hour_of(at: OffsetDateTime) -> i64 {
    let seconds = at.unix_timestamp();
    seconds - seconds.rem_euclid(3_600)
}

fn day_of(at: OffsetDateTime) -> i64 {
    let seconds = at.unix_timestamp();
    seconds - seconds.rem_euclid(86_400)
}

fn start(seconds: i64) -> OffsetDateTime {
    OffsetDateTime::from_unix_timestamp(seconds).unwrap_or(OffsetDateTime::UNIX_EPOCH)
}

fn outcome_index(outcome: RequestOutcome) -> usize {
    RequestOutcome::ALL
        .iter()
        .position(|o| *o == outcome)
        .unwrap_or(0)
}

impl State {
    fn hour(&mut self, at: OffsetDateTime) -> &mut HourTotals {
        let hour = hour_of(at);
        if !self.hours.contains_key(&hour) {
            while self.hours.len() >= RETAINED_HOURS {
                self.hours.pop_first();
            }
            while self.users.len() > RETAINED_HOURS / 24 {
                self.users.pop_first();
            }
        }
        self.hours.entry(hour).or_default()
    }
}

impl InMemoryAnalytics {
    pub fn new() -> Self {
        Self::default()
    }

    /// The `n` most requested canonical profiles seen since `since`.
    pub fn top_profiles(&self, n: usize, since: OffsetDateTime) -> Vec<PopularProfile> {
        let state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        state.profiles.top(n, since)
    }

    /// Appends an audit record, dropping the oldest past [`AUDIT_KEPT`].
    pub fn audit(&self, record: AuditRecord) {
        let mut state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        if state.audit.len() >= AUDIT_KEPT {
            state.audit.pop_front();
        }
        state.audit.push_back(record);
    }

    /// The audit log, oldest first.
    pub fn audit_log(&self) -> Vec<AuditRecord> {
        let state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        state.audit.iter().cloned().collect()
    }

    pub fn summary(&self, range: &Range) -> Summary {
        let state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        let (first, last) = (hour_of(range.from), range.to.unix_timestamp());
        let mut total = HourTotals::default();
        let mut systems: HashMap<String, u64> = HashMap::new();
        let mut by_hour = Vec::new();
        let mut by_day: BTreeMap<i64, (u64, u64)> = BTreeMap::new();
        for (hour, totals) in state.hours.range(first..last) {
            for (i, count) in totals.by_outcome.iter().enumerate() {
                total.by_outcome[i] += count;
            }
            for (system, count) in &totals.systems {
                *systems.entry(system.to_string()).or_default() += count;
            }
            total.tokens_saved += totals.tokens_saved;
            total.saved_usd += totals.saved_usd;
            total.generations += totals.generations;
            total.failed_generations += totals.failed_generations;
            total.generation_ms += totals.generation_ms;
            total.tokens_in += totals.tokens_in;
            total.tokens_out += totals.tokens_out;
            total.cost_usd += totals.cost_usd;
            let (requests, hits) = (totals.requests(), totals.count(RequestOutcome::is_hit));
            if requests > 0 {
                by_hour.push(RateBucket::new(start(*hour), requests, hits));
                let day = by_day.entry(hour - hour.rem_euclid(86_400)).or_default();
                day.0 += requests;
                day.1 += hits;
            }
        }
        let mut users = HyperLogLog::new();
        for (_, day) in state.users.range(day_of(range.from)..last) {
            users.merge(day);
        }
        drop(state);

        let mut top: Vec<SystemCount> = systems
            .into_iter()
            .map(|(system, count)| SystemCount { system, count })
            .collect();
        top.sort_by(|a, b| b.count.cmp(&a.count).then_with(|| a.system.cmp(&b.system)));
        top.truncate(TOP_SYSTEMS);
        let hits = total.count(RequestOutcome::is_hit);
        let misses = total.count(RequestOutcome::is_miss);
        Summary {
            from: Some(range.from),
            to: Some(range.to),
            total_requests: total.requests(),
            cache_hits: hits,
            cache_misses: misses,
            stale: Some(total.by_outcome[outcome_index(RequestOutcome::Stale)]),
            fallbacks: total.by_outcome[outcome_index(RequestOutcome::Fallback)],
            errors: Some(total.by_outcome[outcome_index(RequestOutcome::Error)]),
            hit_rate: ratio(hits, hits + misses),
            top_systems: top,
            unique_users: Some(users.estimate()),
            generations: Some(total.generations),
            failed_generations: Some(total.failed_generations),
            avg_generation_time: Some(if total.generations == 0 {
                0.0
            } else {
                total.generation_ms as f64 / total.generations as f64
            }),
            tokens_in: Some(total.tokens_in),
            tokens_out: Some(total.tokens_out),
            estimated_cost: Some(dollars(total.cost_usd)),
            cost_saved: Some(dollars(total.saved_usd)),
            tokens_saved: Some(total.tokens_saved),
            hit_rate_by_hour: by_hour,
            hit_rate_by_day: by_day
                .into_iter()
                .map(|(day, (requests, hits))| RateBucket::new(start(day), requests, hits))
                .collect(),
            source: "memory",
            partial: false,
        }
    }
}

impl EventSink for InMemoryAnalytics {
    fn record_request(&self, event: RequestEventRef<'_>) {
        let mut state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(user) = event.user_hash {
            state
                .users
                .entry(day_of(event.at))
                .or_default()
                .insert(user);
        }
        let hour = state.hour(event.at);
        hour.by_outcome[outcome_index(event.outcome)] += 1;
        if event.outcome.is_hit() {
            hour.tokens_saved += event.entry_tokens;
            hour.saved_usd += event.entry_cost_usd;
        }
        if let Some(count) = hour.systems.get_mut(event.primary_system) {
            *count += 1;
        } else if hour.systems.len() < MAX_SYSTEMS_PER_HOUR {
            hour.systems.insert(Arc::clone(event.primary_system), 1);
        }
        state.profiles.record(event.profile, event.at);
    }

    fn record_generation(&self, event: GenerationEvent) {
        let mut state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        let hour = state.hour(event.at);
        match event.outcome {
            GenerationOutcome::Ok => {
                hour.generations += 1;
                hour.generation_ms += event.duration_ms;
            }
            GenerationOutcome::Failed => hour.failed_generations += 1,
        }
        hour.tokens_in += event.tokens_in;
        hour.tokens_out += event.tokens_out;
        hour.cost_usd += event.cost_usd;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::tests::request;
    use crate::event::{new_event_id, Trigger};
    use time::Duration;

    fn generation(ok: bool, at: OffsetDateTime) -> GenerationEvent {
        GenerationEvent {
            id: new_event_id(),
            at,
            model: "gpt-4o-mini".to_owned(),
            tokens_in: 400,
            tokens_out: 300,
            cost_usd: if ok { 0.002 } else { 0.0 },
            duration_ms: 1_200,
            attempts: 1,
            outcome: if ok {
                GenerationOutcome::Ok
            } else {
                GenerationOutcome::Failed
            },
            trigger: Trigger::Miss,
            key_digest: "d1".to_owned(),
        }
    }

    #[test]
    fn totals_hit_rate_cost_and_top_systems() {
        let analytics = InMemoryAnalytics::new();
        let now = OffsetDateTime::now_utc();
        analytics.record_request(request(RequestOutcome::Miss, "Sirius").borrowed());
        analytics.record_generation(generation(true, now));
        analytics.record_request(request(RequestOutcome::HitL1, "Sirius").borrowed());
        analytics.record_request(request(RequestOutcome::Stale, "Sirius").borrowed());
        analytics.record_request(request(RequestOutcome::Fallback, "Lyra").borrowed());
        analytics.record_request(request(RequestOutcome::Error, "Lyra").borrowed());
        analytics.record_generation(generation(false, now));
        let mut with_user = request(RequestOutcome::HitL2, "Orion");
        with_user.user_hash = Some("u1".into());
        analytics.record_request(with_user.borrowed());
        analytics.record_request(with_user.borrowed());

        let summary =
            analytics.summary(&Range::parse(None, None, now + Duration::minutes(1)).unwrap());
        assert_eq!(summary.total_requests, 7);
        assert_eq!(summary.cache_hits, 4);
        assert_eq!(summary.cache_misses, 2);
        assert_eq!(summary.errors, Some(1));
        assert_eq!(summary.hit_rate, 0.6667);
        assert_eq!(
            summary.top_systems[0],
            SystemCount {
                system: "Sirius".into(),
                count: 3
            }
        );
        assert_eq!(summary.generations, Some(1));
        assert_eq!(summary.failed_generations, Some(1));
        assert_eq!(summary.avg_generation_time, Some(1_200.0));
        assert_eq!(summary.estimated_cost, Some(0.002));
        assert_eq!(summary.cost_saved, Some(0.008));
        assert_eq!(summary.tokens_saved, Some(2_800));
        assert_eq!(summary.unique_users, Some(1));
        assert_eq!(
            summary
                .hit_rate_by_hour
                .iter()
                .map(|b| b.requests)
                .sum::<u64>(),
            7
        );
        assert_eq!(summary.hit_rate_by_day.len(), 1);
    }

    #[test]
    fn a_range_leaves_out_other_hours() {
        let analytics = InMemoryAnalytics::new();
        let now = OffsetDateTime::now_utc();
        let mut old = request(RequestOutcome::Miss, "Sirius");
        old.at = now - Duration::days(3);
        analytics.record_request(old.borrowed());
        analytics.record_request(request(RequestOutcome::HitL1, "Lyra").borrowed());
        let last_day = Range {
            from: now - Duration::days(1),
            to: now + Duration::minutes(1),
        };
        let summary = analytics.summary(&last_day);
        assert_eq!((summary.total_requests, summary.cache_hits), (1, 1));
        assert_eq!(summary.top_systems.len(), 1);
    }
}
