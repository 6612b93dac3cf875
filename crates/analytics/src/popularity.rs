//! Which canonical profiles are requested most: what pre-warming generates first.
//!
//! Popularity is kept per canonical profile, never per user, and independent of the
//! engine version, so it survives a version bump (that is when it is needed most).
//! Postgres keeps it per day ([`crate::PgStore::top_profiles`]); embedded mode keeps
//! [`ProfileCounts`] in process.

use std::collections::HashMap;
use std::sync::Arc;

use time::{Duration, OffsetDateTime};

/// How far back popularity looks by default.
pub const DEFAULT_WINDOW: Duration = Duration::days(30);

/// A canonical profile and how often it was requested in the window.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PopularProfile {
    /// The canonical profile's JSON (as the cache key's digest covered it, though
    /// perhaps re-formatted by the store: callers re-canonicalize it).
    pub canonical: String,
    pub requests: u64,
}

/// Profiles counted in process, at most [`ProfileCounts::CAPACITY`] of them: clients
/// decide which profiles exist, so memory must stay bounded. When it is full, every
/// count is halved and profiles left at zero are dropped: the popular ones survive,
/// new ones get room, and the cost is spread over the many inserts that filled it.
#[derive(Debug, Default)]
pub struct ProfileCounts {
    counts: HashMap<Arc<str>, Seen>,
}

#[derive(Debug, Clone, Copy)]
struct Seen {
    requests: u64,
    last: OffsetDateTime,
}

impl ProfileCounts {
    pub const CAPACITY: usize = 50_000;

    /// Counts one request for `canonical`, keeping the (shared) string only when it is
    /// new.
    pub fn record(&mut self, canonical: &Arc<str>, at: OffsetDateTime) {
        if canonical.is_empty() {
            return;
        }
        if let Some(seen) = self.counts.get_mut(canonical) {
            seen.requests += 1;
            seen.last = seen.last.max(at);
            return;
        }
        if self.counts.len() >= Self::CAPACITY {
            self.decay();
        }
        self.counts.insert(
            Arc::clone(canonical),
            Seen {
                requests: 1,
                last: at,
            },
        );
    }

    fn decay(&mut self) {
        self.counts.retain(|_, seen| {
            seen.requests /= 2;
            seen.requests > 0
        });
    }

    /// The `n` most requested profiles seen since `since`, most requested first (ties
    /// by canonical text, so the order is stable).
    pub fn top(&self, n: usize, since: OffsetDateTime) -> Vec<PopularProfile> {
        let mut top: Vec<PopularProfile> = self
            .counts
            .iter()
            .filter(|(_, seen)| seen.last >= since)
            .map(|(canonical, seen)| PopularProfile {
                canonical: canonical.to_string(),
                requests: seen.requests,
            })
            .collect();
        top.sort_by(|a, b| {
            b.requests
                .cmp(&a.requests)
                .then_with(|| a.canonical.cmp(&b.canonical))
        });
        top.truncate(n);
        top
    }

    pub fn len(&self) -> usize {
        self.counts.len()
    }

    pub fn is_empty(&self) -> bool {
        self.counts.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_most_requested_come_first_within_the_window() {
        let now = OffsetDateTime::now_utc();
        let mut counts = ProfileCounts::default();
        for (profile, times) in [("a", 3), ("b", 5), ("c", 1)] {
            for _ in 0..times {
                counts.record(&Arc::from(profile), now);
            }
        }
        counts.record(&"old".into(), now - Duration::days(40));
        counts.record(&"old".into(), now - Duration::days(40));
        let top = counts.top(2, now - DEFAULT_WINDOW);
        let names: Vec<_> = top
            .iter()
            .map(|p| (p.canonical.as_str(), p.requests))
            .collect();
        assert_eq!(names, [("b", 5), ("a", 3)]);
        assert_eq!(
            counts.top(10, now - DEFAULT_WINDOW).len(),
            3,
            "old is outside"
        );
    }

    #[test]
    fn a_full_table_keeps_the_popular_and_makes_room() {
        let now = OffsetDateTime::now_utc();
        let mut counts = ProfileCounts::default();
        for _ in 0..10 {
            counts.record(&"popular".into(), now);
        }
        for i in 0..ProfileCounts::CAPACITY {
            counts.record(&format!("once-{i}").into(), now);
        }
        assert!(counts.len() <= ProfileCounts::CAPACITY);
        counts.record(&"newcomer".into(), now);
        let top = counts.top(1, now - DEFAULT_WINDOW);
        assert_eq!(top[0].canonical, "popular");
        assert!(counts
            .top(usize::MAX, now - DEFAULT_WINDOW)
            .iter()
            .any(|p| p.canonical == "newcomer"));
    }
}
