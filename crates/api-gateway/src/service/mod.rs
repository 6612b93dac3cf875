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
//! How the flight's leader fills the key is the [`FillStrategy`] chosen when the app
//! is built: in process ([`InProcessFill`], embedded mode), or coordinated with other
//! instances through Redis ([`RedisFill`]: the leader takes the key's fill lock or
//! waits for the holder's completion signal, and fills the key through the fill
//! protocol of `narrative-fill`), with workers generating misses ([`WorkerFill`]).
//!
//! By idea: `answer` is the answer policy (hit, stale, revalidation, coalesced miss,
//! template, 202) and its types; `fill` the flights and the generation; `strategy`
//! the fill strategies' trait and the in-process one; `distributed` the fill with
//! Redis and workers; `accounting` counts every answer once and reports stats;
//! `stream` streams an answer as its text is written (`Accept: text/event-stream`);
//! `memo` remembers what request bodies derived to; `erasure` erases by user;
//! `counters`, `reporting` and `prewarm` are the shared hit counters, analytics reads
//! and pre-warm runs; `recent` the last few answers, for the console.

mod accounting;
mod answer;
mod counters;
mod distributed;
mod erasure;
mod fill;
mod memo;
mod prewarm;
mod recent;
mod reporting;
mod strategy;
mod stream;

use std::sync::Arc;
use std::time::Duration;

use analytics::{EventSink, Trigger};
use bytes::Bytes;
use cache_core::user_index::UserIndex;
use cache_core::{
    CacheKey, CacheStore, KeyDeriver, KeyedProfile, KnownSystems, LiveFeeds, ProfileError,
    ProfileInput, SingleFlight,
};
use narrative_gen::NarrativeGenerator;
use tokio_util::task::TaskTracker;

pub use accounting::ServiceStats;
#[cfg(test)]
pub(crate) use answer::test_support;
pub use answer::{Answer, Caller, Directives, Forwarded, Lookup, NotCached, Source};
pub use counters::{Count, Counters, Totals};
pub use distributed::{Distributed, RedisFill, WorkerFill, Workers};
pub use fill::{FillError, FillMode};
use fill::{FlightLeader, FlightResult, Joined, Looked};
pub use memo::{BodyMemo, Derived};
pub use prewarm::{Pacer, PrewarmRuns, PrewarmStart, RunProgress, Step};
pub use recent::{RecentAnswer, RecentSource, RECENT_ANSWERS};
pub use reporting::{AnalyticsSource, RedisTallies};
pub use strategy::{FillStrategy, InProcessFill};
pub use stream::{Followed, NarrativeStream, StreamEvent, StreamStart};

use crate::metrics::Metrics;

/// Keys remembered as recently forced to regenerate, at most; past it the least
/// recently forced are forgotten (and may be forced again).
const FORCED_KEYS_KEPT: u64 = 100_000;

#[derive(Debug)]
pub struct NarrativeService {
    deriver: KeyDeriver,
    store: Arc<dyn CacheStore>,
    generator: Arc<dyn NarrativeGenerator>,
    flights: SingleFlight<CacheKey, FlightResult>,
    /// `no-store` generations, kept apart so that no fill waits on one.
    unstored_flights: SingleFlight<CacheKey, FlightResult>,
    /// The text of each flight's generation while it is written, for streaming.
    live: LiveFeeds<CacheKey>,
    unstored_live: LiveFeeds<CacheKey>,
    /// Streaming `GET`s of keys generated elsewhere: one follow per key.
    follows: SingleFlight<CacheKey, FlightResult>,
    followed_live: LiveFeeds<CacheKey>,
    /// Keys a client forced to regenerate (`no-cache`, `max-age`) within
    /// `REVALIDATE_MIN_INTERVAL`: they answer from what is stored until it passes.
    forced: moka::sync::Cache<CacheKey, ()>,
    tasks: TaskTracker,
    metrics: Arc<Metrics>,
    events: Arc<dyn EventSink>,
    ttl: Duration,
    stale_after: Duration,
    generation_wait: Duration,
    /// In process, with Redis, or with Redis and workers: chosen once, at build.
    strategy: Arc<dyn FillStrategy>,
    /// `narr:<version>:<promptHash>:` of earlier versions, newest first.
    previous_prefixes: Vec<String>,
    counters: Counters,
    recent: recent::RecentAnswers,
    /// Which keys each user asked for, for erasure.
    user_index: Arc<dyn UserIndex>,
    /// How long an erasure's tombstone keeps jobs enqueued before it from writing.
    erasure_tombstone: Duration,
    /// `MAX_PENDING_GENERATIONS`: flights (and refreshes) running at most.
    max_pending: usize,
    /// `STAR_SYSTEM_NAMES`: the only systems a profile may name, when set.
    known_systems: Option<KnownSystems>,
    /// `REVALIDATE_MIN_INTERVAL`: how young an entry a client cannot force out.
    revalidate_min_interval: Duration,
    /// Request bodies seen before, and what they derived to.
    memo: BodyMemo,
    /// What every request event of this service names.
    event_texts: accounting::EventTexts,
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
    /// How a missed key is filled: [`InProcessFill`], [`RedisFill`] or [`WorkerFill`].
    pub strategy: Arc<dyn FillStrategy>,
    /// Earlier versions whose entries answer a miss as stale during a rollout.
    pub previous_versions: Vec<(cache_core::EngineVersion, cache_core::PromptHash)>,
    pub user_index: Arc<dyn UserIndex>,
    pub erasure_tombstone: Duration,
    pub max_pending_generations: usize,
    pub known_systems: Option<KnownSystems>,
    pub revalidate_min_interval: Duration,
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
            strategy,
            previous_versions,
            user_index,
            erasure_tombstone,
            max_pending_generations,
            known_systems,
            revalidate_min_interval,
        } = parts;
        Self {
            event_texts: accounting::EventTexts::new(&deriver),
            deriver,
            store,
            generator,
            flights: SingleFlight::new(),
            unstored_flights: SingleFlight::new(),
            live: LiveFeeds::default(),
            unstored_live: LiveFeeds::default(),
            follows: SingleFlight::new(),
            followed_live: LiveFeeds::default(),
            forced: moka::sync::Cache::builder()
                .max_capacity(FORCED_KEYS_KEPT)
                .time_to_live(revalidate_min_interval.max(Duration::from_millis(1)))
                .build(),
            tasks: TaskTracker::new(),
            metrics,
            events,
            ttl,
            stale_after,
            generation_wait,
            strategy,
            previous_prefixes: previous_versions
                .iter()
                .map(|(version, hash)| format!("narr:{version}:{hash}:"))
                .collect(),
            counters: Counters::default(),
            recent: recent::RecentAnswers::default(),
            user_index,
            erasure_tombstone,
            max_pending: max_pending_generations,
            known_systems,
            revalidate_min_interval,
            memo: BodyMemo::default(),
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

    /// The Redis parts when instances share one, for reports.
    pub fn distributed(&self) -> Option<&Distributed> {
        self.strategy.shared()
    }

    /// The job queue's publisher when workers generate, for reports.
    pub fn jobs(&self) -> Option<&narrative_queue::ConfirmedPublisher> {
        self.strategy.jobs()
    }

    pub fn ttl(&self) -> Duration {
        self.ttl
    }

    /// The profile's canonical form and key, refused when it names a system outside
    /// `STAR_SYSTEM_NAMES` (if set).
    pub fn derive(&self, input: &ProfileInput) -> Result<KeyedProfile, ProfileError> {
        let keyed = self.deriver.derive(input)?;
        if let Some(known) = &self.known_systems {
            known.check(&keyed.profile)?;
        }
        Ok(keyed)
    }

    /// A request body's canonical form, key and user hash, from the memo when these
    /// exact bytes derived before (`memo`), otherwise derived (and remembered).
    pub fn derive_body(&self, body: &Bytes) -> Result<Arc<Derived>, ProfileError> {
        self.memo.get_or_derive(body, || {
            let input = ProfileInput::from_json(body)?;
            let user_hash = input
                .user_id
                .as_deref()
                .map(|id| self.deriver.user_hash(id).into());
            Ok(Derived::new(self.derive(&input)?, user_hash))
        })
    }

    /// Frees the memo's expired entries every [`memo::TIDY_EVERY`] until `stop`, so
    /// that an idle gateway lets go of erased narratives too.
    pub async fn tidy_memo(&self, stop: tokio_util::sync::CancellationToken) {
        loop {
            tokio::select! {
                () = stop.cancelled() => return,
                () = tokio::time::sleep(memo::TIDY_EVERY) => self.memo.tidy(),
            }
        }
    }

    /// Keeps `bytes`, `answer` rendered, to send again for hits of the same entry
    /// from `derived`'s body ([`Derived::rendered`]).
    pub fn keep_rendered(&self, derived: &Arc<Derived>, answer: &Answer, bytes: Bytes) {
        self.memo.keep_rendered(derived, answer, bytes);
    }

    /// Stops accepting generations and waits up to `grace` for those running to be
    /// stored. Returns whether all finished.
    pub async fn drain(&self, grace: Duration) -> bool {
        self.tasks.close();
        tokio::time::timeout(grace, self.tasks.wait()).await.is_ok()
    }
}
