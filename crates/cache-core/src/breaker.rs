//! A circuit breaker: after `threshold` consecutive failures, calls are refused for
//! `cool_down`, then a single probe is let through; its success closes the circuit,
//! its failure opens it again. This keeps a down backend from costing every request a
//! timeout.

use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BreakerState {
    Closed,
    Open,
    /// The cool-down is over; the next call probes.
    HalfOpen,
}

impl BreakerState {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Closed => "up",
            Self::Open => "down",
            Self::HalfOpen => "probing",
        }
    }
}

#[derive(Debug)]
pub struct Breaker {
    threshold: u32,
    cool_down: Duration,
    consecutive_failures: AtomicU32,
    /// Nanoseconds since [`epoch`] until which calls are refused; 0 when closed.
    open_until: AtomicU64,
    probing: AtomicBool,
}

fn epoch() -> Instant {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    *EPOCH.get_or_init(Instant::now)
}

fn now_nanos() -> u64 {
    u64::try_from(epoch().elapsed().as_nanos())
        .unwrap_or(u64::MAX)
        .max(1)
}

impl Breaker {
    pub fn new(threshold: u32, cool_down: Duration) -> Self {
        Self {
            threshold: threshold.max(1),
            cool_down,
            consecutive_failures: AtomicU32::new(0),
            open_until: AtomicU64::new(0),
            probing: AtomicBool::new(false),
        }
    }

    /// Whether a call may go ahead now.
    pub fn allow(&self) -> bool {
        let until = self.open_until.load(Ordering::Acquire);
        if until == 0 {
            return true;
        }
        if now_nanos() < until {
            return false;
        }
        // Cool-down over: exactly one caller gets to probe.
        !self.probing.swap(true, Ordering::AcqRel)
    }

    pub fn record_success(&self) {
        self.consecutive_failures.store(0, Ordering::Release);
        self.open_until.store(0, Ordering::Release);
        self.probing.store(false, Ordering::Release);
    }

    pub fn record_failure(&self) {
        let failures = self.consecutive_failures.fetch_add(1, Ordering::AcqRel) + 1;
        if failures >= self.threshold || self.probing.load(Ordering::Acquire) {
            let until = now_nanos()
                .saturating_add(u64::try_from(self.cool_down.as_nanos()).unwrap_or(u64::MAX));
            self.open_until.store(until, Ordering::Release);
            self.probing.store(false, Ordering::Release);
        }
    }

    pub fn state(&self) -> BreakerState {
        match self.open_until.load(Ordering::Acquire) {
            0 => BreakerState::Closed,
            until if now_nanos() < until => BreakerState::Open,
            _ => BreakerState::HalfOpen,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn opens_after_consecutive_failures_then_probes_once() {
        let breaker = Breaker::new(3, Duration::from_millis(40));
        breaker.record_failure();
        breaker.record_failure();
        assert!(breaker.allow(), "two failures: still closed");
        breaker.record_success();
        breaker.record_failure();
        breaker.record_failure();
        assert!(breaker.allow(), "a success resets the count");
        breaker.record_failure();
        assert_eq!(breaker.state(), BreakerState::Open);
        assert!(!breaker.allow());

        std::thread::sleep(Duration::from_millis(60));
        assert_eq!(breaker.state(), BreakerState::HalfOpen);
        assert!(breaker.allow(), "one probe after the cool-down");
        assert!(!breaker.allow(), "only one");
        breaker.record_failure();
        assert_eq!(
            breaker.state(),
            BreakerState::Open,
            "a failed probe opens it again"
        );

        std::thread::sleep(Duration::from_millis(60));
        assert!(breaker.allow());
        breaker.record_success();
        assert_eq!(breaker.state(), BreakerState::Closed);
        assert!(breaker.allow() && breaker.allow());
    }
}
