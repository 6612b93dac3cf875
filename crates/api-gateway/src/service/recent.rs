//! The last few answers of this instance (when, how, how fast), for the console's
//! "last answers" list and `/narrative/stats`: a fixed ring of packed words, one
//! `fetch_add` and one store per answer, no lock and no allocation on the hit path.
//! Nothing about the profile or the caller is kept.

use std::sync::atomic::{AtomicU64, Ordering};

use super::Source;

/// Answers remembered.
pub const RECENT_ANSWERS: usize = 16;

/// How an answer was made: a [`Source`], or a 202 whose generation runs on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RecentSource {
    Answered(Source),
    Pending,
}

impl RecentSource {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Answered(source) => source.as_str(),
            Self::Pending => "pending",
        }
    }

    fn to_bits(self) -> u64 {
        match self {
            Self::Answered(Source::Cache) => 1,
            Self::Answered(Source::Stale) => 2,
            Self::Answered(Source::Generated) => 3,
            Self::Answered(Source::Fallback) => 4,
            Self::Pending => 5,
        }
    }

    fn from_bits(bits: u64) -> Option<Self> {
        Some(match bits {
            1 => Self::Answered(Source::Cache),
            2 => Self::Answered(Source::Stale),
            3 => Self::Answered(Source::Generated),
            4 => Self::Answered(Source::Fallback),
            5 => Self::Pending,
            _ => return None,
        })
    }
}

/// One remembered answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RecentAnswer {
    /// Unix milliseconds.
    pub at_ms: u64,
    pub source: RecentSource,
    /// How long the answer took, in microseconds, at most [`LATENCY_CAP_US`].
    pub latency_us: u64,
}

// A word: 42 bits of Unix milliseconds (until the year 2109), 3 of source, 19 of
// latency in units of 100 µs, rounded (up to 52.4 s, where longer answers are pinned).
const SOURCE_SHIFT: u32 = 42;
const LATENCY_SHIFT: u32 = 45;
const LATENCY_UNIT_US: u64 = 100;
const LATENCY_MAX_UNITS: u64 = (1 << 19) - 1;
const LATENCY_CAP_US: u64 = LATENCY_MAX_UNITS * LATENCY_UNIT_US;

#[derive(Debug, Default)]
pub struct RecentAnswers {
    next: AtomicU64,
    slots: [AtomicU64; RECENT_ANSWERS],
}

impl RecentAnswers {
    pub fn record(&self, answer: RecentAnswer) {
        let units = (answer.latency_us.min(LATENCY_CAP_US) + LATENCY_UNIT_US / 2) / LATENCY_UNIT_US;
        let word = (answer.at_ms & ((1 << SOURCE_SHIFT) - 1))
            | (answer.source.to_bits() << SOURCE_SHIFT)
            | (units << LATENCY_SHIFT);
        let n = self.next.fetch_add(1, Ordering::Relaxed);
        self.slots[(n % RECENT_ANSWERS as u64) as usize].store(word, Ordering::Relaxed);
    }

    /// The remembered answers, newest first. Under concurrent answers a slot may be
    /// read just before or after it is overwritten (a claimed slot still holds the
    /// answer sixteen back); each answer read is a whole one, and they are ordered by
    /// time.
    pub fn newest_first(&self) -> Vec<RecentAnswer> {
        let next = self.next.load(Ordering::Relaxed);
        let count = next.min(RECENT_ANSWERS as u64);
        let mut answers: Vec<RecentAnswer> = (1..=count)
            .filter_map(|back| {
                let slot = ((next - back) % RECENT_ANSWERS as u64) as usize;
                let word = self.slots[slot].load(Ordering::Relaxed);
                Some(RecentAnswer {
                    at_ms: word & ((1 << SOURCE_SHIFT) - 1),
                    source: RecentSource::from_bits((word >> SOURCE_SHIFT) & 0b111)?,
                    latency_us: (word >> LATENCY_SHIFT) * LATENCY_UNIT_US,
                })
            })
            .collect();
        // Stable: answers of one millisecond keep the ring's order.
        answers.sort_by_key(|answer| std::cmp::Reverse(answer.at_ms));
        answers
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn answer(at_ms: u64, source: RecentSource, latency_us: u64) -> RecentAnswer {
        RecentAnswer {
            at_ms,
            source,
            latency_us,
        }
    }

    #[test]
    fn keeps_the_newest_answers_first_and_whole() {
        let recent = RecentAnswers::default();
        assert!(recent.newest_first().is_empty());
        recent.record(answer(
            1_767_225_600_123,
            RecentSource::Answered(Source::Generated),
            812_345,
        ));
        recent.record(answer(
            1_767_225_600_200,
            RecentSource::Answered(Source::Cache),
            150,
        ));
        assert_eq!(
            recent.newest_first(),
            vec![
                answer(
                    1_767_225_600_200,
                    RecentSource::Answered(Source::Cache),
                    200
                ),
                answer(
                    1_767_225_600_123,
                    RecentSource::Answered(Source::Generated),
                    812_300
                ),
            ]
        );
    }

    #[test]
    fn wraps_after_sixteen_and_pins_long_latencies() {
        let recent = RecentAnswers::default();
        for i in 0..40 {
            recent.record(answer(
                i,
                RecentSource::Answered(Source::Fallback),
                60_000_000,
            ));
        }
        let kept = recent.newest_first();
        assert_eq!(kept.len(), RECENT_ANSWERS);
        assert_eq!(kept[0].at_ms, 39);
        assert_eq!(kept[RECENT_ANSWERS - 1].at_ms, 40 - RECENT_ANSWERS as u64);
        assert!(kept.iter().all(|a| a.latency_us == LATENCY_CAP_US));
    }
}
