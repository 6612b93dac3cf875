//! What happens to a narrative request, independent of HTTP.
//!
//! A hit answers from the store. A miss joins the key's in-process flight: the first
//! request leads and starts the generation in a tracked task, everyone (leader
//! included) waits for it until the request's deadline, and whoever is still waiting
//! then answers the template narrative while the generation finishes and is stored.
//! A store that errors is treated as a miss: the request is answered either way.
//!
//! An entry older than `STALE_AFTER` is answered at once as `stale` and refreshed in
//! the background (stale-while-revalidate): the refresh is a flight too, so one runs
//! per key per instance, and across instances the fill lock makes it one in all. A
//! refresh that fails leaves the stale entry in place, served until `CACHE_TTL`
//! (stale-if-error).
//!
//! With Redis configured the flight's leader also coordinates with other instances
//! (`distributed`): it takes the key's fill lock in Redis or waits for the holder's
//! completion signal, and fills the key through the fill protocol (`narrative-fill`).
//!
//! By idea: `answer` is the answer policy (hit, stale, revalidation, coalesced miss,
//! template, 202) and its types; `fill` the flights and the in-process fill;
//! `distributed` the fill with Redis and workers; `accounting` counts every answer
//! once and reports stats; `erasure` erases by user; `counters`, `reporting` and
//! `prewarm` are the shared hit counters, analytics reads and pre-warm runs.

mod accounting;
mod answer;
mod counters;
mod distributed;
mod erasure;
mod fill;
mod prewarm;
mod reporting;

use std::sync::Arc;
use std::time::{Duration, Instant};

use analytics::{EventSink, Trigger};
use cache_core::user_index::UserIndex;
use cache_core::{
    CacheKey, CacheStore, KeyDeriver, KeyedProfile, ProfileError, ProfileInput, SingleFlight,
};
use narrative_gen::NarrativeGenerator;
use tokio_util::task::TaskTracker;

pub use accounting::ServiceStats;
pub use answer::{Answer, Caller, Directives, Forwarded, Lookup, NotCached, Source};
pub use counters::{Count, Counters, Totals};
pub use distributed::Distributed;
pub use fill::{FillError, FillMode};
use fill::{FlightLeader, FlightResult, Looked};
pub use prewarm::{Pacer, PrewarmRuns, RunProgress, Step};
pub use reporting::{AnalyticsSource, RedisTallies};

use crate::metrics::Metrics;

#[derive(Debug)]
pub struct NarrativeService {
    deriver: KeyDeriver,
    store: Arc<dyn CacheStore>,
    generator: Arc<dyn NarrativeGenerator>,
    flights: SingleFlight<CacheKey, FlightResult>,
    tasks: TaskTracker,
    metrics: Arc<Metrics>,
    events: Arc<dyn EventSink>,
    ttl: Duration,
    stale_after: Duration,
    generation_wait: Duration,
    distributed: Option<Distributed>,
    /// `narr:<version>:<promptHash>:` of earlier versions, newest first.
    previous_prefixes: Vec<String>,
    counters: Counters,
    /// Which keys each user asked for, for erasure.
    user_index: Arc<dyn UserIndex>,
    /// How long an erasure's tombstone keeps jobs enqueued before it from writing.
    erasure_tombstone: Duration,
    /// Embedded mode's fence: when each key was last erased here. A generation that
    /// started before that stores nothing.
    erased: std::sync::Mutex<std::collections::HashMap<CacheKey, Instant>>,
    /// `MAX_PENDING_GENERATIONS`: flights (and refreshes) running at most.
    max_pending: usize,
}

#[derive(Debug)]
pub struct ServiceParts {
    pub deriver: KeyDeriver,
    pub store: Arc<dyn CacheStore>,
    pub generator: Arc<dyn NarrativeGenerator>,
    pub metrics: Arc<Metrics>,
    pub events: Arc<dyn EventSink>,
    pub ttl: Duration,
    pub stale_after: Duration,
    pub generation_wait: Duration,
    /// Set when a Redis is shared with other instances.
    pub distributed: Option<Distributed>,
    /// Earlier versions whose entries answer a miss as stale during a rollout.
    pub previous_versions: Vec<(cache_core::EngineVersion, cache_core::PromptHash)>,
    pub user_index: Arc<dyn UserIndex>,
    pub erasure_tombstone: Duration,
    pub max_pending_generations: usize,
}

impl NarrativeService {
    pub fn new(parts: ServiceParts) -> Self {
        let ServiceParts {
            deriver,
            store,
            generator,
            metrics,
            events,
            ttl,
            stale_after,
            generation_wait,
            distributed,
            previous_versions,
            user_index,
            erasure_tombstone,
            max_pending_generations,
        } = parts;
        Self {
            deriver,
            store,
            generator,
            flights: SingleFlight::new(),
            tasks: TaskTracker::new(),
            metrics,
            events,
            ttl,
            stale_after,
            generation_wait,
            distributed,
            previous_prefixes: previous_versions
                .iter()
                .map(|(version, hash)| format!("narr:{version}:{hash}:"))
                .collect(),
            counters: Counters::default(),
            user_index,
            erasure_tombstone,
            erased: std::sync::Mutex::new(std::collections::HashMap::new()),
            max_pending: max_pending_generations,
        }
    }

    pub fn deriver(&self) -> &KeyDeriver {
        &self.deriver
    }

    pub fn generator(&self) -> &dyn NarrativeGenerator {
        self.generator.as_ref()
    }

    pub fn store_name(&self) -> &'static str {
        self.store.name()
    }

    pub fn distributed(&self) -> Option<&Distributed> {
        self.distributed.as_ref()
    }

    pub fn ttl(&self) -> Duration {
        self.ttl
    }

    pub fn derive(&self, input: &ProfileInput) -> Result<KeyedProfile, ProfileError> {
        self.deriver.derive(input)
    }

    /// Stops accepting generations and waits up to `grace` for those running to be
    /// stored. Returns whether all finished.
    pub async fn drain(&self, grace: Duration) -> bool {
        self.tasks.close();
        tokio::time::timeout(grace, self.tasks.wait()).await.is_ok()
    }
}
