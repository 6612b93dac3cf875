//! Waiting out a Redis failover instead of paying for its consequences.
//!
//! A Cluster failover or a restart makes Redis unreachable for seconds. A holder that
//! gives up at the first timeout either throws away a narrative already paid for (the
//! write) or hands its job back to be paid for again. So the holder's Redis calls are
//! retried, with growing pauses, while Redis is *unreachable*, for up to
//! `REDIS_FAILOVER_WAIT`; what Redis *answered* (a script error, an unreadable value) is
//! returned at once.

use std::future::Future;
use std::time::{Duration, Instant};

use cache_core::StoreError;

/// Runs `call` until it succeeds, fails with something other than unreachability, or
/// `deadline` passes (whichever of it and `REDIS_FAILOVER_WAIT` from now comes first).
pub async fn patiently_until<T, F, Fut>(
    failover_wait: Duration,
    deadline: Instant,
    mut call: F,
) -> Result<T, StoreError>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, StoreError>>,
{
    let deadline = deadline.min(Instant::now() + failover_wait);
    let mut pause = Duration::from_millis(50);
    loop {
        let result = call().await;
        // Timeouts and refused connections, not what Redis answered: the breaker is
        // shared, and a success elsewhere says nothing about this call's node.
        let unreachable = matches!(
            result,
            Err(StoreError::Timeout | StoreError::Unavailable(_))
        );
        if !unreachable || Instant::now() + pause >= deadline {
            return result;
        }
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(Duration::from_secs(1));
    }
}
