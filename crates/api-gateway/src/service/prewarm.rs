//! Pre-warming: generating the narratives users are about to ask for before they ask.
//!
//! A run takes canonical profiles (the most popular ones, or an admin's own list),
//! keys each under the current engine version and prompt, and skips those already
//! cached. The rest start one by one, paced at `PREWARM_RATE`, and never in a user
//! miss's way:
//!
//! - With workers (`AMQP_URL`), each is a job on its own queue, `narrative.prewarm`,
//!   which workers consume with capacity of its own, so a prewarm job never stands in
//!   front of a user miss. The job holds no fill lock while it waits: the worker takes
//!   the lock when it starts, and finds the entry already there if a user miss
//!   generated it meanwhile.
//! - Without, each is an ordinary flight with the `prewarm` trigger: a user request for
//!   the same key joins it instead of paying twice, and with Redis the fill lock makes
//!   it one generation across instances.
//!
//! A run's progress is kept in process (the last [`RUNS_KEPT`] runs) for
//! `GET /narrative/prewarm/{id}`; the audit log records each run's start and end.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use cache_core::KeyedProfile;
use serde::Serialize;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use super::NarrativeService;

/// Runs whose progress stays queryable.
pub const RUNS_KEPT: usize = 32;
/// Pre-warm generations in process at once (without workers).
pub const IN_PROCESS_AT_ONCE: usize = 2;

/// What became of one profile of a run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    /// Already cached (or being generated elsewhere): nothing to do.
    Skipped,
    /// Handed to the workers' prewarm queue (confirmed by the broker).
    Queued,
    /// Generated in this process and stored.
    Generated,
    Failed,
}

/// One run's counts, updated as it goes.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct RunProgress {
    pub run_id: String,
    /// Profiles asked for, after removing duplicates.
    pub requested: u64,
    /// Found cached before the run started.
    pub skipped: u64,
    /// To be started: `requested - skipped`.
    pub queued: u64,
    /// Started so far (queued to workers, or generated here), of `queued`.
    pub sent: AtomicU64,
    /// Found cached or in flight when their turn came.
    pub skipped_later: AtomicU64,
    pub failed: AtomicU64,
    pub done: AtomicBool,
}

impl RunProgress {
    pub fn new(run_id: String, requested: u64, skipped: u64) -> Self {
        Self {
            run_id,
            requested,
            skipped,
            queued: requested - skipped,
            sent: AtomicU64::new(0),
            skipped_later: AtomicU64::new(0),
            failed: AtomicU64::new(0),
            done: AtomicBool::new(false),
        }
    }

    fn count(&self, step: Step) {
        let counter = match step {
            Step::Skipped => &self.skipped_later,
            Step::Queued | Step::Generated => &self.sent,
            Step::Failed => &self.failed,
        };
        counter.fetch_add(1, Ordering::Relaxed);
    }

    /// Profiles not yet through (neither sent, skipped nor failed).
    pub fn remaining(&self) -> u64 {
        let through = self.sent.load(Ordering::Relaxed)
            + self.skipped_later.load(Ordering::Relaxed)
            + self.failed.load(Ordering::Relaxed);
        self.queued.saturating_sub(through)
    }

    pub fn is_done(&self) -> bool {
        self.done.load(Ordering::Acquire)
    }

    /// Marks the run done: its caller has recorded the outcome.
    pub fn finish(&self) {
        self.done.store(true, Ordering::Release);
    }
}

/// Hands out start times one `interval` apart, to every run of the process together:
/// `PREWARM_RATE` is the gateway's rate, however many runs are going.
#[derive(Debug)]
pub struct Pacer {
    interval: Duration,
    next: tokio::sync::Mutex<Option<tokio::time::Instant>>,
}

impl Pacer {
    pub fn new(interval: Duration) -> Self {
        Self {
            interval,
            next: tokio::sync::Mutex::new(None),
        }
    }

    /// Waits for this caller's turn.
    pub async fn wait(&self) {
        let slot = {
            let mut next = self.next.lock().await;
            let now = tokio::time::Instant::now();
            let slot = next.map_or(now, |at| at.max(now));
            *next = Some(slot + self.interval);
            slot
        };
        tokio::time::sleep_until(slot).await;
    }
}

/// The runs this process started, newest last, and the pace they share.
#[derive(Debug)]
pub struct PrewarmRuns {
    runs: Mutex<VecDeque<Arc<RunProgress>>>,
    pacer: Arc<Pacer>,
}

impl PrewarmRuns {
    pub fn new(interval: Duration) -> Self {
        Self {
            runs: Mutex::new(VecDeque::new()),
            pacer: Arc::new(Pacer::new(interval)),
        }
    }

    pub fn pacer(&self) -> Arc<Pacer> {
        Arc::clone(&self.pacer)
    }

    pub fn start(&self, requested: u64, skipped: u64) -> Arc<RunProgress> {
        let id = format!("{:016x}", rand::random::<u64>());
        let run = Arc::new(RunProgress::new(id, requested, skipped));
        let mut runs = self.runs.lock().unwrap_or_else(PoisonError::into_inner);
        if runs.len() >= RUNS_KEPT {
            runs.pop_front();
        }
        runs.push_back(Arc::clone(&run));
        run
    }

    pub fn get(&self, id: &str) -> Option<Arc<RunProgress>> {
        let runs = self.runs.lock().unwrap_or_else(PoisonError::into_inner);
        runs.iter().find(|run| run.run_id == id).cloned()
    }
}

impl NarrativeService {
    /// Splits `profiles` into those already cached and those to warm, dropping
    /// duplicate keys.
    pub async fn prewarm_plan(&self, profiles: Vec<KeyedProfile>) -> (Vec<KeyedProfile>, u64) {
        let mut seen = std::collections::HashSet::new();
        let mut to_warm = Vec::new();
        let mut cached = 0;
        for keyed in profiles {
            if !seen.insert(keyed.key.clone()) {
                continue;
            }
            if self.is_stored(&keyed.key).await {
                cached += 1;
            } else {
                to_warm.push(keyed);
            }
        }
        (to_warm, cached)
    }

    /// Starts `profiles` one at a time as `pacer` allows, until all are through or
    /// `stop`, and waits for those generated in process.
    pub async fn prewarm_run(
        self: Arc<Self>,
        profiles: Vec<KeyedProfile>,
        run: Arc<RunProgress>,
        pacer: Arc<Pacer>,
        stop: CancellationToken,
    ) {
        let mut generating = JoinSet::new();
        for keyed in profiles {
            // In process, at most this many pre-warm generations at once, however fast
            // the pace: they share the LLM (and LLM_MAX_CONCURRENCY) with user misses.
            while generating.len() >= IN_PROCESS_AT_ONCE {
                generating.join_next().await;
            }
            tokio::select! {
                () = stop.cancelled() => break,
                () = pacer.wait() => {}
            }
            match self.prewarm_start(&keyed).await {
                PrewarmStart::Done(step) => run.count(step),
                PrewarmStart::Flight(flight) => {
                    let run = Arc::clone(&run);
                    generating.spawn(async move { run.count(flight.await) });
                }
            }
        }
        while generating.join_next().await.is_some() {}
    }

    async fn is_stored(&self, key: &cache_core::CacheKey) -> bool {
        self.strategy.is_stored(self, key).await
    }

    async fn prewarm_start(self: &Arc<Self>, keyed: &KeyedProfile) -> PrewarmStart {
        if self.is_stored(&keyed.key).await {
            return PrewarmStart::Done(Step::Skipped);
        }
        self.strategy.prewarm(self, keyed).await
    }
}

/// How a pre-warm of one profile began: done at once (skipped, queued, failed), or a
/// flight to wait for.
pub enum PrewarmStart {
    Done(Step),
    Flight(std::pin::Pin<Box<dyn std::future::Future<Output = Step> + Send>>),
}

impl std::fmt::Debug for PrewarmStart {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Done(step) => f.debug_tuple("Done").field(step).finish(),
            Self::Flight(_) => f.write_str("Flight"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn every_run_shares_one_pace() {
        let pacer = Pacer::new(Duration::from_secs(1));
        let started = tokio::time::Instant::now();
        // Three runs asking at once get three turns a second apart, not one each.
        tokio::join!(pacer.wait(), pacer.wait(), pacer.wait());
        assert_eq!(started.elapsed(), Duration::from_secs(2));
        // A pacer left idle does not bank turns: the next one waits for nothing.
        tokio::time::sleep(Duration::from_secs(10)).await;
        let idle = tokio::time::Instant::now();
        pacer.wait().await;
        assert_eq!(idle.elapsed(), Duration::ZERO);
    }
}
