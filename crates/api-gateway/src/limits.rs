//! Per-client rate limits: a token bucket per client name, in this process.
//!
//! Client names come from `API_KEYS` (plus `anonymous` and `admin`), so the table is as
//! small as the configuration. Each gateway keeps its own buckets: behind N gateways a
//! client gets up to N times the rate, which the operator sizes for (a shared bucket
//! in Redis would put a round trip on every hit).

use std::collections::HashMap;
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant};

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RateLimit {
    /// Requests per second, sustained.
    pub per_second: f64,
    /// Requests at once after a quiet spell.
    pub burst: f64,
}

#[derive(Debug, Clone, Copy)]
struct Bucket {
    tokens: f64,
    updated: Instant,
}

#[derive(Debug)]
pub struct RateLimiter {
    limit: RateLimit,
    buckets: Mutex<HashMap<String, Bucket>>,
}

impl RateLimiter {
    pub fn new(limit: RateLimit) -> Self {
        Self {
            limit,
            buckets: Mutex::new(HashMap::new()),
        }
    }

    /// Takes a token for `client` at `now`, or says how long until one is there.
    pub fn check_at(&self, client: &str, now: Instant) -> Result<(), Duration> {
        let mut buckets = self.buckets.lock().unwrap_or_else(PoisonError::into_inner);
        let bucket = match buckets.get_mut(client) {
            Some(bucket) => bucket,
            None => buckets.entry(client.to_owned()).or_insert(Bucket {
                tokens: self.limit.burst,
                updated: now,
            }),
        };
        let elapsed = now.saturating_duration_since(bucket.updated).as_secs_f64();
        bucket.tokens = (bucket.tokens + elapsed * self.limit.per_second).min(self.limit.burst);
        bucket.updated = now;
        if bucket.tokens >= 1.0 {
            bucket.tokens -= 1.0;
            Ok(())
        } else {
            // Settings bound the rate, so this is finite; saturate rather than panic
            // on the request path if it ever is not.
            let wait = (1.0 - bucket.tokens) / self.limit.per_second;
            Err(Duration::try_from_secs_f64(wait).unwrap_or(Duration::MAX))
        }
    }

    pub fn check(&self, client: &str) -> Result<(), Duration> {
        self.check_at(client, Instant::now())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_burst_then_the_sustained_rate_per_client() {
        let limiter = RateLimiter::new(RateLimit {
            per_second: 2.0,
            burst: 3.0,
        });
        let start = Instant::now();
        for _ in 0..3 {
            assert!(limiter.check_at("web", start).is_ok());
        }
        let wait = limiter.check_at("web", start).expect_err("burst spent");
        assert_eq!(wait, Duration::from_millis(500));
        assert!(
            limiter.check_at("mobile", start).is_ok(),
            "buckets are per client"
        );
        assert!(limiter
            .check_at("web", start + Duration::from_millis(500))
            .is_ok());
        assert!(limiter
            .check_at("web", start + Duration::from_millis(500))
            .is_err());
        // A long pause refills to the burst, no more.
        let later = start + Duration::from_secs(60);
        for _ in 0..3 {
            assert!(limiter.check_at("web", later).is_ok());
        }
        assert!(limiter.check_at("web", later).is_err());
    }
}
