//! The `GET /narrative/analytics` answer and the time range it covers.

use serde::Serialize;
use time::format_description::well_known::Rfc3339;
use time::{Date, Duration, OffsetDateTime, Time};

/// The range asked for when none is given.
pub const DEFAULT_RANGE: Duration = Duration::days(30);
/// The longest range one request may ask for.
pub const MAX_RANGE: Duration = Duration::days(366);
/// How many systems `topSystems` lists.
pub const TOP_SYSTEMS: usize = 10;

/// `[from, to)`, in UTC.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Range {
    pub from: OffsetDateTime,
    pub to: OffsetDateTime,
}

/// A bad `from` or `to`; `field` names the query parameter.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {message}")]
pub struct RangeError {
    pub field: &'static str,
    pub message: String,
}

impl Range {
    /// From the query's `from` and `to`: RFC 3339 times or `YYYY-MM-DD` dates (midnight
    /// UTC). `to` defaults to now and `from` to 30 days before `to`.
    pub fn parse(
        from: Option<&str>,
        to: Option<&str>,
        now: OffsetDateTime,
    ) -> Result<Self, RangeError> {
        let to = match to {
            Some(text) => parse_instant("to", text)?,
            None => now,
        };
        let from = match from {
            Some(text) => parse_instant("from", text)?,
            None => to - DEFAULT_RANGE,
        };
        if from >= to {
            return Err(RangeError {
                field: "from",
                message: "must be before `to`".to_owned(),
            });
        }
        if to - from > MAX_RANGE {
            return Err(RangeError {
                field: "from",
                message: format!("the range is limited to {} days", MAX_RANGE.whole_days()),
            });
        }
        Ok(Self { from, to })
    }

    pub fn contains(&self, at: OffsetDateTime) -> bool {
        self.from <= at && at < self.to
    }
}

/// The instants a range may name: Unix time onwards, to the end of year 9999. Outside
/// them, moving to UTC (9999-12-31T23:59:59-23:59 is in year 10000) or stepping back
/// the default 30 days would leave what the time and Postgres types hold.
const EARLIEST: OffsetDateTime = time::macros::datetime!(1970-01-01 00:00 UTC);
const LATEST: OffsetDateTime = time::macros::datetime!(9999-12-31 23:59:59 UTC);

fn parse_instant(field: &'static str, text: &str) -> Result<OffsetDateTime, RangeError> {
    let date_format = time::macros::format_description!("[year]-[month]-[day]");
    let at = if let Ok(at) = OffsetDateTime::parse(text, &Rfc3339) {
        at.checked_to_offset(time::UtcOffset::UTC)
    } else if let Ok(date) = Date::parse(text, &date_format) {
        Some(date.with_time(Time::MIDNIGHT).assume_utc())
    } else {
        return Err(RangeError {
            field,
            message: "expected an RFC 3339 time (2026-11-25T08:00:00Z) or a date (2026-11-25)"
                .to_owned(),
        });
    };
    at.filter(|at| (EARLIEST..=LATEST).contains(at))
        .ok_or_else(|| RangeError {
            field,
            message: "must be from 1970-01-01 to 9999-12-31 (UTC)".to_owned(),
        })
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct SystemCount {
    pub system: String,
    pub count: u64,
}

/// Requests and hits in one hour or one day.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct RateBucket {
    #[serde(with = "time::serde::rfc3339")]
    pub start: OffsetDateTime,
    pub requests: u64,
    pub hits: u64,
    pub hit_rate: f64,
}

impl RateBucket {
    pub fn new(start: OffsetDateTime, requests: u64, hits: u64) -> Self {
        Self {
            start,
            requests,
            hits,
            hit_rate: ratio(hits, requests),
        }
    }
}

/// The `GET /narrative/analytics` body. Fields a partial answer cannot know are `null`.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Summary {
    #[serde(with = "time::serde::rfc3339::option")]
    pub from: Option<OffsetDateTime>,
    #[serde(with = "time::serde::rfc3339::option")]
    pub to: Option<OffsetDateTime>,
    /// Validated `POST /narrative` requests.
    pub total_requests: u64,
    /// Fresh and stale hits.
    pub cache_hits: u64,
    /// Generated and fallback answers.
    pub cache_misses: u64,
    pub stale: Option<u64>,
    pub fallbacks: u64,
    /// `only-if-cached` requests that found nothing.
    pub errors: Option<u64>,
    pub hit_rate: f64,
    pub top_systems: Vec<SystemCount>,
    pub unique_users: Option<u64>,
    pub generations: Option<u64>,
    pub failed_generations: Option<u64>,
    /// Mean over successful generations, in milliseconds.
    pub avg_generation_time: Option<f64>,
    pub tokens_in: Option<u64>,
    pub tokens_out: Option<u64>,
    /// Dollars spent on the LLM.
    pub estimated_cost: Option<f64>,
    /// Dollars the cache saved: every hit credits what its entry cost.
    pub cost_saved: Option<f64>,
    pub tokens_saved: Option<u64>,
    pub hit_rate_by_hour: Vec<RateBucket>,
    pub hit_rate_by_day: Vec<RateBucket>,
    /// `memory`, `postgres`, or `redis` (counters only, while Postgres is down).
    pub source: &'static str,
    pub partial: bool,
}

/// `part / whole` rounded to 4 decimals; 0 when nothing was counted.
pub fn ratio(part: u64, whole: u64) -> f64 {
    if whole == 0 {
        return 0.0;
    }
    (part as f64 / whole as f64 * 10_000.0).round() / 10_000.0
}

/// Dollars rounded to micro-dollars, so sums read cleanly.
pub fn dollars(value: f64) -> f64 {
    (value * 1e6).round() / 1e6
}

#[cfg(test)]
mod tests {
    use super::*;
    use time::macros::datetime;

    #[test]
    fn ranges_parse_times_and_dates_and_name_the_bad_field() {
        let now = datetime!(2026-11-25 12:00 UTC);
        let range = Range::parse(None, None, now).unwrap();
        assert_eq!((range.from, range.to), (now - DEFAULT_RANGE, now));

        let range =
            Range::parse(Some("2026-11-01"), Some("2026-11-02T06:00:00+02:00"), now).unwrap();
        assert_eq!(range.from, datetime!(2026-11-01 00:00 UTC));
        assert_eq!(range.to, datetime!(2026-11-02 04:00 UTC));

        assert_eq!(
            Range::parse(Some("yesterday"), None, now)
                .unwrap_err()
                .field,
            "from"
        );
        assert_eq!(
            Range::parse(None, Some("2026-13-01"), now)
                .unwrap_err()
                .field,
            "to"
        );
        assert_eq!(
            Range::parse(Some("2026-11-25"), Some("2026-11-24"), now)
                .unwrap_err()
                .field,
            "from"
        );
        assert!(Range::parse(Some("2020-01-01"), Some("2026-01-01"), now).is_err());
    }

    /// Seen in a black-box run: the first panicked the handler (its UTC time is in
    /// year 10000), the second answered a 500.
    #[test]
    fn instants_outside_what_the_types_hold_name_their_parameter() {
        let now = datetime!(2026-11-25 12:00 UTC);
        for (from, to, field) in [
            (None, Some("9999-12-31T23:59:59-23:59"), "to"),
            (Some("9999-12-31T23:59:59-23:59"), None, "from"),
            (None, Some("0000-01-01"), "to"),
            (Some("1969-12-31T23:59:59Z"), None, "from"),
        ] {
            let error = Range::parse(from, to, now).expect_err("out of range");
            assert_eq!(error.field, field, "{from:?} {to:?}: {error}");
        }
        let latest = Range::parse(None, Some("9999-12-31T23:59:59Z"), now).expect("in range");
        assert_eq!(latest.to, LATEST);
    }

    #[test]
    fn ratio_is_zero_for_nothing() {
        assert_eq!(ratio(0, 0), 0.0);
        assert_eq!(ratio(1, 3), 0.3333);
    }
}
