//! A circuit breaker: after `threshold` consecutive failures, calls are refused for
//! `cool_down`, then one probe at a time is let through; a success closes the circuit,
//! a failure opens it again. This keeps a down backend from costing every request a
//! timeout.
//!
//! A probe whose caller is dropped before it reports (a client hung up, a task was
//! aborted) must not leave the breaker waiting forever, so each probe has a deadline of
//! one cool-down, after which the next caller may probe.

use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
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
    /// While half-open: until when the probe in flight has the floor; 0 when none.
    probe_until: AtomicU64,
    /// When the current run of failures began; 0 while the last call succeeded.
    failing_since: AtomicU64,
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
            probe_until: AtomicU64::new(0),
            failing_since: AtomicU64::new(0),
        }
    }

    fn cool_down_nanos(&self) -> u64 {
        u64::try_from(self.cool_down.as_nanos()).unwrap_or(u64::MAX)
    }

    /// Whether a call may go ahead now.
    pub fn allow(&self) -> bool {
        let until = self.open_until.load(Ordering::Acquire);
        if until == 0 {
            return true;
        }
        let now = now_nanos();
        if now < until {
            return false;
        }
        // Half-open: one probe at a time, each with a deadline.
        let probe = self.probe_until.load(Ordering::Acquire);
        if probe != 0 && now < probe {
            return false;
        }
        let deadline = now.saturating_add(self.cool_down_nanos());
        self.probe_until
            .compare_exchange(probe, deadline, Ordering::AcqRel, Ordering::Acquire)
            .is_ok()
    }

    pub fn record_success(&self) {
        // Every failure sets `failing_since` first, so 0 means there is nothing to
        // reset: the usual case, and the cache-hit path's, costs one shared read
        // instead of four writes to a line every core touches.
        if self.failing_since.load(Ordering::Acquire) == 0 {
            return;
        }
        self.consecutive_failures.store(0, Ordering::Release);
        self.open_until.store(0, Ordering::Release);
        self.probe_until.store(0, Ordering::Release);
        self.failing_since.store(0, Ordering::Release);
    }

    pub fn record_failure(&self) {
        let _ = self.failing_since.compare_exchange(
            0,
            now_nanos(),
            Ordering::AcqRel,
            Ordering::Acquire,
        );
        let failures = self.consecutive_failures.fetch_add(1, Ordering::AcqRel) + 1;
        let half_open = self.open_until.load(Ordering::Acquire) != 0;
        if failures >= self.threshold || half_open {
            self.open_until.store(
                now_nanos().saturating_add(self.cool_down_nanos()),
                Ordering::Release,
            );
            self.probe_until.store(0, Ordering::Release);
        }
    }

    /// How long calls have been failing with no success between: `None` while the
    /// last call succeeded. Refused calls do not end the run.
    pub fn failing_for(&self) -> Option<Duration> {
        match self.failing_since.load(Ordering::Acquire) {
            0 => None,
            since => Some(Duration::from_nanos(now_nanos().saturating_sub(since))),
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

    const COOL_DOWN: Duration = Duration::from_millis(40);
    const PAST_COOL_DOWN: Duration = Duration::from_millis(60);

    fn opened() -> Breaker {
        let breaker = Breaker::new(3, COOL_DOWN);
        for _ in 0..3 {
            breaker.record_failure();
        }
        breaker
    }

    #[test]
    fn opens_after_consecutive_failures_then_probes_once() {
        let breaker = Breaker::new(3, COOL_DOWN);
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

        // The breaker's timing is the thing under test: wait out the cool-down.
        std::thread::sleep(PAST_COOL_DOWN);
        assert_eq!(breaker.state(), BreakerState::HalfOpen);
        assert!(breaker.allow(), "one probe after the cool-down");
        assert!(!breaker.allow(), "only one");
        breaker.record_failure();
        assert_eq!(
            breaker.state(),
            BreakerState::Open,
            "a failed probe opens it again"
        );

        std::thread::sleep(PAST_COOL_DOWN);
        assert!(breaker.allow());
        breaker.record_success();
        assert_eq!(breaker.state(), BreakerState::Closed);
        assert!(breaker.allow() && breaker.allow());
    }

    #[test]
    fn failing_for_counts_from_the_first_failure_of_a_run() {
        let breaker = Breaker::new(3, COOL_DOWN);
        assert_eq!(breaker.failing_for(), None);
        breaker.record_failure();
        std::thread::sleep(PAST_COOL_DOWN);
        breaker.record_failure();
        let failing = breaker.failing_for().expect("failing");
        assert!(
            failing >= PAST_COOL_DOWN,
            "from the first failure: {failing:?}"
        );
        breaker.record_success();
        assert_eq!(breaker.failing_for(), None, "a success ends the run");
    }

    #[test]
    fn a_probe_that_never_reports_does_not_wedge_the_breaker() {
        let breaker = opened();
        std::thread::sleep(PAST_COOL_DOWN);
        assert!(
            breaker.allow(),
            "a probe goes out, and its caller is dropped"
        );
        assert!(!breaker.allow());
        std::thread::sleep(PAST_COOL_DOWN);
        assert!(
            breaker.allow(),
            "after the probe's deadline the next caller probes"
        );
        breaker.record_success();
        assert_eq!(breaker.state(), BreakerState::Closed);
    }
}
