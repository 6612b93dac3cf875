//! What the cache costs and saves.
//!
//! The gateway reports a [`RequestEvent`] for every validated `POST /narrative` and a
//! [`GenerationEvent`] for every generator call. In embedded mode they feed
//! [`InMemoryAnalytics`], which answers `GET /narrative/analytics`. The Postgres
//! time-series (events, rollups, popularity) and its consumer service come next; they
//! take the same events.

use std::collections::HashMap;
use std::sync::{Mutex, PoisonError};

use serde::Serialize;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RequestOutcome {
    Hit,
    Generated,
    Fallback,
}

#[derive(Debug, Clone, PartialEq)]
pub struct RequestEvent<'a> {
    pub outcome: RequestOutcome,
    pub primary_system: &'a str,
    /// What the answered entry cost to generate; a hit saves exactly that.
    pub entry_cost_usd: f64,
}

#[derive(Debug, Clone, PartialEq)]
pub struct GenerationEvent {
    pub ok: bool,
    pub duration_ms: u64,
    pub tokens_in: u32,
    pub tokens_out: u32,
    pub cost_usd: f64,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct SystemCount {
    pub system: String,
    pub count: u64,
}

/// The `GET /narrative/analytics` body.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Summary {
    pub total_requests: u64,
    /// Stale answers count as hits once stale-while-revalidate exists.
    pub cache_hits: u64,
    /// Generated and fallback answers.
    pub cache_misses: u64,
    pub fallbacks: u64,
    pub hit_rate: f64,
    pub top_systems: Vec<SystemCount>,
    pub generations: u64,
    pub failed_generations: u64,
    /// Mean over successful generations, in milliseconds.
    pub avg_generation_time: f64,
    pub tokens_in: u64,
    pub tokens_out: u64,
    /// Dollars spent on the LLM.
    pub estimated_cost: f64,
    /// Dollars the cache saved: the sum of every hit's entry cost.
    pub cost_saved: f64,
    /// `memory` here; `postgres` once events are stored there.
    pub source: &'static str,
}

#[derive(Debug, Default)]
struct Totals {
    hits: u64,
    generated: u64,
    fallbacks: u64,
    by_system: HashMap<String, u64>,
    generations: u64,
    failed_generations: u64,
    generation_ms: u64,
    tokens_in: u64,
    tokens_out: u64,
    cost_usd: f64,
    saved_usd: f64,
}

/// Totals since the process started.
#[derive(Debug, Default)]
pub struct InMemoryAnalytics {
    totals: Mutex<Totals>,
}

/// How many systems `topSystems` lists.
pub const TOP_SYSTEMS: usize = 10;
/// Distinct systems tracked; beyond this, new names are not counted (a bound on the
/// memory that client-chosen names can take).
pub const MAX_TRACKED_SYSTEMS: usize = 10_000;

impl InMemoryAnalytics {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn record_request(&self, event: &RequestEvent<'_>) {
        let mut totals = self.totals.lock().unwrap_or_else(PoisonError::into_inner);
        match event.outcome {
            RequestOutcome::Hit => {
                totals.hits += 1;
                totals.saved_usd += event.entry_cost_usd;
            }
            RequestOutcome::Generated => totals.generated += 1,
            RequestOutcome::Fallback => totals.fallbacks += 1,
        }
        if let Some(count) = totals.by_system.get_mut(event.primary_system) {
            *count += 1;
        } else if totals.by_system.len() < MAX_TRACKED_SYSTEMS {
            totals.by_system.insert(event.primary_system.to_owned(), 1);
        }
    }

    pub fn record_generation(&self, event: &GenerationEvent) {
        let mut totals = self.totals.lock().unwrap_or_else(PoisonError::into_inner);
        if event.ok {
            totals.generations += 1;
            totals.generation_ms += event.duration_ms;
        } else {
            totals.failed_generations += 1;
        }
        totals.tokens_in += u64::from(event.tokens_in);
        totals.tokens_out += u64::from(event.tokens_out);
        totals.cost_usd += event.cost_usd;
    }

    pub fn summary(&self) -> Summary {
        let totals = self.totals.lock().unwrap_or_else(PoisonError::into_inner);
        let misses = totals.generated + totals.fallbacks;
        let total = totals.hits + misses;
        let mut top: Vec<SystemCount> = totals
            .by_system
            .iter()
            .map(|(system, count)| SystemCount {
                system: system.clone(),
                count: *count,
            })
            .collect();
        top.sort_by(|a, b| b.count.cmp(&a.count).then_with(|| a.system.cmp(&b.system)));
        top.truncate(TOP_SYSTEMS);
        Summary {
            total_requests: total,
            cache_hits: totals.hits,
            cache_misses: misses,
            fallbacks: totals.fallbacks,
            hit_rate: ratio(totals.hits, total),
            top_systems: top,
            generations: totals.generations,
            failed_generations: totals.failed_generations,
            avg_generation_time: if totals.generations == 0 {
                0.0
            } else {
                totals.generation_ms as f64 / totals.generations as f64
            },
            tokens_in: totals.tokens_in,
            tokens_out: totals.tokens_out,
            estimated_cost: totals.cost_usd,
            cost_saved: totals.saved_usd,
            source: "memory",
        }
    }
}

/// `part / whole` rounded to 4 decimals; 0 when nothing was counted.
pub fn ratio(part: u64, whole: u64) -> f64 {
    if whole == 0 {
        return 0.0;
    }
    (part as f64 / whole as f64 * 10_000.0).round() / 10_000.0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn totals_hit_rate_cost_and_top_systems() {
        let analytics = InMemoryAnalytics::new();
        let request = |outcome, system| RequestEvent {
            outcome,
            primary_system: system,
            entry_cost_usd: 0.002,
        };
        analytics.record_request(&request(RequestOutcome::Generated, "Sirius"));
        analytics.record_generation(&GenerationEvent {
            ok: true,
            duration_ms: 1200,
            tokens_in: 400,
            tokens_out: 300,
            cost_usd: 0.002,
        });
        analytics.record_request(&request(RequestOutcome::Hit, "Sirius"));
        analytics.record_request(&request(RequestOutcome::Hit, "Sirius"));
        analytics.record_request(&request(RequestOutcome::Fallback, "Lyra"));
        analytics.record_generation(&GenerationEvent {
            ok: false,
            duration_ms: 50,
            tokens_in: 0,
            tokens_out: 0,
            cost_usd: 0.0,
        });

        let summary = analytics.summary();
        assert_eq!(
            (
                summary.total_requests,
                summary.cache_hits,
                summary.cache_misses,
                summary.fallbacks
            ),
            (4, 2, 2, 1)
        );
        assert_eq!(summary.hit_rate, 0.5);
        assert_eq!(
            summary.top_systems[0],
            SystemCount {
                system: "Sirius".into(),
                count: 3
            }
        );
        assert_eq!(
            summary.top_systems[1],
            SystemCount {
                system: "Lyra".into(),
                count: 1
            }
        );
        assert_eq!((summary.generations, summary.failed_generations), (1, 1));
        assert_eq!(summary.avg_generation_time, 1200.0);
        assert!((summary.estimated_cost - 0.002).abs() < 1e-12);
        assert!(
            (summary.cost_saved - 0.004).abs() < 1e-12,
            "two hits credit the entry's cost twice"
        );
    }

    #[test]
    fn ratio_rounds_and_handles_zero() {
        assert_eq!(ratio(0, 0), 0.0);
        assert_eq!(ratio(2, 3), 0.6667);
    }
}
