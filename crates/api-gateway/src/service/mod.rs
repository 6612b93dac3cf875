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
//! completion signal.

mod counters;
mod distributed;
mod prewarm;
mod reporting;

use std::sync::Arc;
use std::time::{Duration, Instant};

use analytics::{new_event_id, EventSink, RequestEvent, RequestOutcome, Trigger};
use cache_core::signals::Signal;
use cache_core::user_index::UserIndex;
use cache_core::{
    now_ms, CacheKey, CacheStore, Envelope, Flight, Follower, KeyDeriver, KeyedProfile, Leader,
    ProfileError, ProfileInput, SingleFlight, StoreError, StoreStats, Tier,
};
use narrative_fill::generation_event;
use narrative_gen::template::{self, TEMPLATE_MODEL};
use narrative_gen::{GenerateError, NarrativeGenerator};
use tokio_util::task::TaskTracker;

pub use counters::{Count, Counters, Totals};
pub use distributed::Distributed;
pub use prewarm::{Pacer, PrewarmRuns, RunProgress, Step};
pub use reporting::{AnalyticsSource, RedisTallies};

use crate::metrics::{Metrics, Outcome};

/// How the narrative in an [`Answer`] came to be.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    Cache,
    /// Older than `STALE_AFTER`: answered at once while a refresh runs.
    Stale,
    Generated,
    Fallback,
}

impl Source {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Cache => "cache",
            Self::Stale => "stale",
            Self::Generated => "generated",
            Self::Fallback => "fallback",
        }
    }
}

#[derive(Debug, Clone)]
pub struct Answer {
    pub envelope: Arc<Envelope>,
    pub source: Source,
    /// This request waited on a generation another request started.
    pub collapsed: bool,
    /// Seconds of freshness the entry has left, for hits; negative once stale.
    pub ttl_remaining_secs: Option<i64>,
    /// Why a stored entry was not used: `request` (the client's `no-cache`) or
    /// `stale` (older than the client's `max-age`). `None` for plain hits and misses.
    pub forwarded: Option<&'static str>,
    /// A generation this request led, and stored.
    pub stored: bool,
    /// Which tier a hit came from.
    pub tier: Option<Tier>,
}

/// Who asked, as analytics records it: never the user id itself.
#[derive(Debug, Clone)]
pub struct Caller {
    /// The API client's name (`anonymous` until client keys are configured).
    pub client: String,
    /// The keyed hash of the request's `userId`.
    pub user_hash: Option<String>,
}

impl Default for Caller {
    fn default() -> Self {
        Self {
            client: "anonymous".to_owned(),
            user_hash: None,
        }
    }
}

/// RFC 9111 request directives from `Cache-Control`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Directives {
    /// Regenerate even if an entry is stored (coalesced with concurrent ones).
    pub no_cache: bool,
    /// Keep nothing generated for this request.
    pub no_store: bool,
    /// Entries older than this many seconds (from `generatedAt`) are regenerated.
    pub max_age: Option<u64>,
    /// Answer only from the cache: 504 when nothing is stored.
    pub only_if_cached: bool,
    /// If regenerating fails, an entry at most this many seconds past `max-age` (or
    /// past freshness) may still be answered.
    pub stale_if_error: Option<u64>,
}

/// `only-if-cached` and nothing (usable) is stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NotCached;

/// Why a flight ended without a narrative; every one of them means a fallback answer.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum FillError {
    #[error(transparent)]
    Generate(#[from] GenerateError),
    #[error("the instance generating this key gave up")]
    FailedElsewhere,
    #[error("no value appeared in time")]
    GaveUp,
    #[error("the entry was erased while this request waited for it")]
    Erased,
    #[error("MAX_PENDING_GENERATIONS generations are running; none started")]
    Shed,
}

/// What a flight is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FillMode {
    /// Nothing is stored: any stored value will do.
    Miss,
    /// Replace the entry created at `older_than_ms` (a refresh): only a newer value
    /// will do, and it is written over the old one.
    Replace { older_than_ms: i64 },
    /// Nothing is stored and no user is waiting: a pre-warm generated in process.
    Prewarm,
}

impl FillMode {
    fn trigger(self) -> Trigger {
        match self {
            Self::Miss => Trigger::Miss,
            Self::Replace { .. } => Trigger::Refresh,
            Self::Prewarm => Trigger::Prewarm,
        }
    }
}

/// A flight ends with the stored envelope, or with why there is none.
type FlightResult = Result<Arc<Envelope>, FillError>;

/// The request that runs a key's flight.
type FlightLeader = Leader<CacheKey, FlightResult>;

/// What a read of the store found.
enum Looked {
    /// The entry, its age, and the tier it came from.
    Found(Arc<Envelope>, Duration, Tier),
    Absent,
    /// An entry is there that this instance cannot read (corrupt, sealed with a key it
    /// lacks, a format it does not know): a miss that must replace it.
    Unreadable,
}

/// What `GET /narrative/{key}` finds.
#[derive(Debug)]
pub enum Lookup {
    Found(Arc<Envelope>, i64),
    Pending,
    Missing,
}

#[derive(Debug, Clone, Default)]
pub struct ServiceStats {
    pub store: StoreStats,
    /// The fleet's counts in distributed mode, this instance's otherwise (or while
    /// Redis is unreachable; then `counts_are_global` is false).
    pub counts: Totals,
    pub counts_are_global: bool,
    pub in_flight: usize,
}

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

    /// Answers a validated profile. Never fails: the worst case is the template.
    pub async fn narrative(self: &Arc<Self>, keyed: &KeyedProfile, started: Instant) -> Answer {
        match self
            .narrative_with(keyed, started, Directives::default(), &Caller::default())
            .await
        {
            Ok(answer) => answer,
            // Without only-if-cached there is always an answer.
            Err(NotCached) => self.fallback(keyed, false),
        }
    }

    /// Answers a validated profile under the request's `Cache-Control` directives. Only
    /// `only-if-cached` can refuse (nothing stored); everything else has an answer.
    pub async fn narrative_with(
        self: &Arc<Self>,
        keyed: &KeyedProfile,
        started: Instant,
        directives: Directives,
        caller: &Caller,
    ) -> Result<Answer, NotCached> {
        // Indexed before the answer: an erasure while this request's generation runs
        // must find (and fence) its key.
        self.index_user(keyed, caller);
        let answered = self.answer_with(keyed, started, directives).await;
        match &answered {
            Ok(answer) => self.account(answer, keyed, started, caller),
            Err(NotCached) => {
                self.record_request(keyed, started, caller, RequestOutcome::Error, None)
            }
        }
        answered
    }

    async fn answer_with(
        self: &Arc<Self>,
        keyed: &KeyedProfile,
        started: Instant,
        directives: Directives,
    ) -> Result<Answer, NotCached> {
        let deadline = started + self.generation_wait;
        let answer = match self.cached(&keyed.key).await {
            Some((envelope, age, tier)) => {
                let too_old = directives
                    .max_age
                    .is_some_and(|max| age > Duration::from_secs(max));
                if !directives.no_cache && !too_old {
                    self.answer_cached(keyed, envelope, age, tier)
                } else if directives.only_if_cached {
                    return Err(NotCached);
                } else {
                    let forwarded = if directives.no_cache {
                        "request"
                    } else {
                        "stale"
                    };
                    self.revalidate(keyed, envelope, age, forwarded, directives, deadline)
                        .await
                }
            }
            None if directives.only_if_cached => return Err(NotCached),
            None if directives.no_store => self.generate_unstored(keyed, None, deadline).await,
            None => match self.from_previous_version(keyed).await {
                Some(answer) => answer,
                None => self.generate_or_fallback(keyed, deadline).await,
            },
        };
        Ok(answer)
    }

    /// During a rollout: the same profile's entry under an earlier version, answered as
    /// stale while the new key is generated (once, through the flight and the lock).
    async fn from_previous_version(self: &Arc<Self>, keyed: &KeyedProfile) -> Option<Answer> {
        for prefix in &self.previous_prefixes {
            let Ok(previous) = CacheKey::parse(&format!("{prefix}{{{}}}", keyed.key.digest()))
            else {
                continue;
            };
            if let Some((envelope, age, tier)) = self.cached(&previous).await {
                let _ = self.join_flight(keyed, FillMode::Miss);
                let stale_for = i64::try_from(age.as_secs().max(1)).unwrap_or(i64::MAX);
                return Some(Answer {
                    envelope,
                    source: Source::Stale,
                    collapsed: false,
                    ttl_remaining_secs: Some(-stale_for),
                    forwarded: None,
                    stored: false,
                    tier: Some(tier),
                });
            }
        }
        None
    }

    /// The client will not take the stored entry: regenerate now and wait for it
    /// (coalesced: concurrent revalidations of one key make one call). If that fails,
    /// `stale-if-error` may still allow the stored entry; otherwise the template.
    async fn revalidate(
        self: &Arc<Self>,
        keyed: &KeyedProfile,
        stored: Arc<Envelope>,
        age: Duration,
        forwarded: &'static str,
        directives: Directives,
        deadline: Instant,
    ) -> Answer {
        if directives.no_store {
            return self
                .generate_unstored(keyed, Some(forwarded), deadline)
                .await;
        }
        let (follower, collapsed) = self.join_flight(
            keyed,
            FillMode::Replace {
                older_than_ms: stored.created_at_ms,
            },
        );
        if let Ok(Some(Ok(envelope))) =
            tokio::time::timeout_at(deadline.into(), follower.wait()).await
        {
            return Answer {
                envelope,
                source: Source::Generated,
                collapsed,
                ttl_remaining_secs: None,
                forwarded: Some(forwarded),
                stored: !collapsed,
                tier: None,
            };
        }
        let limit = directives
            .max_age
            .map_or(self.stale_after, Duration::from_secs);
        let allowed = directives
            .stale_if_error
            .is_some_and(|extra| age <= limit.saturating_add(Duration::from_secs(extra)));
        if allowed {
            let stale_for = -freshness_secs(age, limit);
            return Answer {
                envelope: stored,
                source: Source::Stale,
                collapsed,
                ttl_remaining_secs: Some(-stale_for),
                forwarded: None,
                stored: false,
                tier: None,
            };
        }
        self.fallback(keyed, collapsed)
    }

    /// `no-store`: a generation for this request alone, kept nowhere.
    async fn generate_unstored(
        &self,
        keyed: &KeyedProfile,
        forwarded: Option<&'static str>,
        deadline: Instant,
    ) -> Answer {
        let trigger = if forwarded.is_some() {
            Trigger::Refresh
        } else {
            Trigger::Miss
        };
        match tokio::time::timeout_at(deadline.into(), self.generate(keyed, trigger)).await {
            Ok(Ok(envelope)) => Answer {
                envelope,
                source: Source::Generated,
                collapsed: false,
                ttl_remaining_secs: None,
                forwarded,
                stored: false,
                tier: None,
            },
            _ => self.fallback(keyed, false),
        }
    }

    /// A hit, or a stale hit that starts this key's refresh.
    fn answer_cached(
        self: &Arc<Self>,
        keyed: &KeyedProfile,
        envelope: Arc<Envelope>,
        age: Duration,
        tier: Tier,
    ) -> Answer {
        if age <= self.stale_after {
            let fresh_for = freshness_secs(age, self.stale_after);
            return Answer {
                envelope,
                source: Source::Cache,
                collapsed: false,
                ttl_remaining_secs: Some(fresh_for),
                forwarded: None,
                stored: false,
                tier: Some(tier),
            };
        }
        self.start_refresh(keyed, envelope.created_at_ms);
        let stale_for = -freshness_secs(age, self.stale_after);
        Answer {
            envelope,
            source: Source::Stale,
            collapsed: false,
            ttl_remaining_secs: Some(-stale_for),
            forwarded: None,
            stored: false,
            tier: Some(tier),
        }
    }

    /// Starts a refresh of the entry created at `older_than_ms`, unless one runs.
    fn start_refresh(self: &Arc<Self>, keyed: &KeyedProfile, older_than_ms: i64) {
        let Flight::Leader(leader) = self.flights.join(&keyed.key) else {
            return;
        };
        if self.must_shed() {
            leader.complete(Err(FillError::Shed));
            return;
        }
        let (service, keyed) = (Arc::clone(self), keyed.clone());
        self.tasks.spawn(async move {
            let result = service
                .fill(&keyed, FillMode::Replace { older_than_ms }, &leader)
                .await;
            if let Err(error) = &result {
                service.metrics.refresh_failures.inc();
                tracing::warn!(%error, cache_key = %keyed.key, "refresh failed; the stale entry stays until CACHE_TTL");
            }
            leader.complete(result);
        });
    }

    /// The entry, its age, and the tier it came from.
    async fn cached(&self, key: &CacheKey) -> Option<(Arc<Envelope>, Duration, Tier)> {
        match self.look(key).await {
            Looked::Found(envelope, age, tier) => Some((envelope, age, tier)),
            Looked::Absent | Looked::Unreadable => None,
        }
    }

    async fn look(&self, key: &CacheKey) -> Looked {
        match self.store.get_traced(key).await {
            Ok(Some((envelope, tier))) => {
                let age = Duration::from_millis(envelope.age_ms(now_ms()));
                Looked::Found(envelope, age, tier)
            }
            Ok(None) => Looked::Absent,
            // Counted by the fill that replaces it.
            Err(StoreError::Corrupt(_)) => Looked::Unreadable,
            Err(error) => {
                self.metrics.store_errors.inc();
                tracing::warn!(%error, store = self.store.name(), "cache read failed; treating as a miss");
                Looked::Absent
            }
        }
    }

    async fn generate_or_fallback(
        self: &Arc<Self>,
        keyed: &KeyedProfile,
        deadline: Instant,
    ) -> Answer {
        let (follower, collapsed) = self.join_flight(keyed, FillMode::Miss);
        match tokio::time::timeout_at(deadline.into(), follower.wait()).await {
            Ok(Some(Ok(envelope))) => Answer {
                envelope,
                source: Source::Generated,
                collapsed,
                ttl_remaining_secs: None,
                forwarded: None,
                stored: !collapsed,
                tier: None,
            },
            Ok(Some(Err(_))) | Ok(None) | Err(_) => self.fallback(keyed, collapsed),
        }
    }

    /// Joins the key's flight, starting it (in a tracked task that outlives the
    /// request) when there is none. Returns a follower and whether another request
    /// started the flight.
    fn join_flight(
        self: &Arc<Self>,
        keyed: &KeyedProfile,
        mode: FillMode,
    ) -> (Follower<FlightResult>, bool) {
        match self.flights.join(&keyed.key) {
            Flight::Leader(leader) => {
                let follower = leader.follower();
                if self.must_shed() {
                    leader.complete(Err(FillError::Shed));
                    return (follower, false);
                }
                let service = Arc::clone(self);
                let keyed = keyed.clone();
                self.tasks.spawn(async move {
                    let result = service.fill(&keyed, mode, &leader).await;
                    leader.complete(result);
                });
                (follower, false)
            }
            Flight::Follower(follower) => {
                self.metrics.collapsed.inc();
                (follower, true)
            }
        }
    }

    /// Whether a new flight must not start: `MAX_PENDING_GENERATIONS` are running
    /// (each outlives its request, so a flood of distinct misses would otherwise grow
    /// tasks, locks and lock extensions without limit). A shed flight ends at once,
    /// and its request answers the template.
    fn must_shed(&self) -> bool {
        if self.tasks.len() < self.max_pending {
            return false;
        }
        self.metrics.generations_shed.inc();
        true
    }

    /// `Prefer: respond-async`: a hit (or an earlier version's entry during a
    /// rollout) is answered as usual; a miss starts (or joins) the generation and
    /// returns `None` for a 202 once the generation is visible to every gateway.
    pub async fn narrative_or_start(
        self: &Arc<Self>,
        keyed: &KeyedProfile,
        started: Instant,
        caller: &Caller,
    ) -> Option<Answer> {
        self.index_user(keyed, caller);
        let answer = match self.cached(&keyed.key).await {
            Some((envelope, age, tier)) => Some(self.answer_cached(keyed, envelope, age, tier)),
            None => match self.from_previous_version(keyed).await {
                Some(answer) => Some(answer),
                None => {
                    let (mut follower, _) = self.join_flight(keyed, FillMode::Miss);
                    // The 202's `Location` must answer 202 on every gateway at once:
                    // wait until the flight is visible beyond this process (its lock
                    // taken, or held elsewhere).
                    let deadline = started + self.generation_wait;
                    let _ = tokio::time::timeout_at(deadline.into(), follower.claimed()).await;
                    None
                }
            },
        };
        match &answer {
            Some(answer) => self.account(answer, keyed, started, caller),
            None => self.account_pending(keyed, started, caller),
        }
        answer
    }

    /// The leader's work: look once more (a flight that just ended may have stored the
    /// value between our read and our join), then generate and store, or, with Redis,
    /// coordinate with the other instances first.
    async fn fill(
        &self,
        keyed: &KeyedProfile,
        mode: FillMode,
        leader: &FlightLeader,
    ) -> FlightResult {
        if let Some(distributed) = &self.distributed {
            return self.fill_shared(distributed, keyed, mode, leader).await;
        }
        // In process, the flight itself is what every lookup sees.
        leader.claim();
        // The erasure fence counts from here: an erasure after the look below must
        // not see this flight's value stored.
        let started = Instant::now();
        if let Some((envelope, _, _)) = self.cached(&keyed.key).await {
            let will_do = match mode {
                FillMode::Miss | FillMode::Prewarm => true,
                FillMode::Replace { older_than_ms } => envelope.created_at_ms > older_than_ms,
            };
            if will_do {
                return Ok(envelope);
            }
        }
        let envelope = self.generate(keyed, mode.trigger()).await?;
        self.store_locally(keyed, &envelope, started).await;
        Ok(envelope)
    }

    /// Stores a generation that started at `started`, unless the key was erased since.
    async fn store_locally(
        &self,
        keyed: &KeyedProfile,
        envelope: &Arc<Envelope>,
        started: Instant,
    ) {
        if self.erased_since(&keyed.key, started) {
            tracing::info!(cache_key = %keyed.key, "entry erased while it was generated; not stored");
            return;
        }
        if let Err(error) = self
            .store
            .put(&keyed.key, Arc::clone(envelope), self.ttl)
            .await
        {
            self.metrics.store_errors.inc();
            tracing::warn!(%error, store = self.store.name(), "cache write failed; the narrative is served but not shared");
        }
        // An erasure between the check and the put: take the value back out.
        if self.erased_since(&keyed.key, started) {
            let _ = self.store.delete(&keyed.key).await;
        }
    }

    fn erased_since(&self, key: &CacheKey, started: Instant) -> bool {
        self.erased
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .get(key)
            .is_some_and(|erased_at| *erased_at >= started)
    }

    /// Calls the generator and accounts for it. Only complete outputs come back.
    async fn generate(
        &self,
        keyed: &KeyedProfile,
        trigger: Trigger,
    ) -> Result<Arc<Envelope>, FillError> {
        self.metrics.generations_in_flight.inc();
        let started = Instant::now();
        let result = self.generator.generate(&keyed.profile).await;
        self.metrics.generations_in_flight.dec();
        if let Err(GenerateError::BudgetExhausted) = &result {
            // No call was made: nothing to time or record as a generation.
            self.metrics.generation("budget");
            return Err(GenerateError::BudgetExhausted.into());
        }
        self.metrics
            .generation_seconds
            .observe(started.elapsed().as_secs_f64());
        self.events.record_generation(generation_event(
            result.as_ref(),
            self.generator.model(),
            keyed.key.digest(),
            trigger,
            started.elapsed(),
        ));
        let generation = match result {
            Ok(generation) => generation,
            Err(error) => {
                self.metrics.generation(error.kind());
                tracing::warn!(%error, cache_key = %keyed.key, "generation failed; nothing stored");
                return Err(error.into());
            }
        };
        self.metrics.generation("ok");
        self.metrics
            .llm_tokens_input
            .inc_by(u64::from(generation.tokens_in));
        self.metrics
            .llm_tokens_output
            .inc_by(u64::from(generation.tokens_out));
        self.metrics.llm_cost_usd.inc_by(generation.cost_usd);
        let envelope = Arc::new(generation.into_envelope(
            self.deriver.engine_version().as_str(),
            self.deriver.prompt_hash(),
        ));
        Ok(envelope)
    }

    /// The template narrative, never stored.
    fn fallback(&self, keyed: &KeyedProfile, collapsed: bool) -> Answer {
        let envelope = Envelope {
            body: template::render(&keyed.profile),
            created_at_ms: now_ms(),
            engine_version: self.deriver.engine_version().to_string(),
            prompt_hash: self.deriver.prompt_hash().to_string(),
            model: TEMPLATE_MODEL.to_owned(),
            tokens_in: 0,
            tokens_out: 0,
            cost_usd: 0.0,
            generation_ms: 0,
        };
        Answer {
            envelope: Arc::new(envelope),
            source: Source::Fallback,
            collapsed,
            ttl_remaining_secs: None,
            forwarded: None,
            stored: false,
            tier: None,
        }
    }

    fn account(&self, answer: &Answer, keyed: &KeyedProfile, started: Instant, caller: &Caller) {
        let (outcome, event_outcome) = match answer.source {
            Source::Stale => {
                self.counters.add(Count::Hit);
                self.metrics.cost_saved_usd.inc_by(answer.envelope.cost_usd);
                (Outcome::Stale, RequestOutcome::Stale)
            }
            Source::Cache => {
                self.counters.add(Count::Hit);
                self.metrics.cost_saved_usd.inc_by(answer.envelope.cost_usd);
                let tier = match answer.tier {
                    Some(Tier::Local) => RequestOutcome::HitL1,
                    Some(Tier::Shared) | None => RequestOutcome::HitL2,
                };
                (Outcome::Hit, tier)
            }
            Source::Generated => {
                self.counters.add(Count::Miss);
                (Outcome::Generated, RequestOutcome::Miss)
            }
            Source::Fallback => {
                self.counters.add(Count::Miss);
                self.counters.add(Count::Fallback);
                (Outcome::Fallback, RequestOutcome::Fallback)
            }
        };
        self.metrics
            .observe_request(outcome, started.elapsed().as_secs_f64());
        self.record_request(
            keyed,
            started,
            caller,
            event_outcome,
            Some(&answer.envelope),
        );
    }

    /// A 202: a miss whose generation runs on without the request.
    fn account_pending(&self, keyed: &KeyedProfile, started: Instant, caller: &Caller) {
        self.counters.add(Count::Miss);
        self.metrics
            .observe_request(Outcome::Pending, started.elapsed().as_secs_f64());
        self.record_request(keyed, started, caller, RequestOutcome::Miss, None);
    }

    /// Hands the request's event to the sink (never blocks). A hit credits what its
    /// entry cost to generate.
    fn record_request(
        &self,
        keyed: &KeyedProfile,
        started: Instant,
        caller: &Caller,
        outcome: RequestOutcome,
        answered: Option<&Envelope>,
    ) {
        let (entry_tokens, entry_cost_usd) = answered.map_or((0, 0.0), |envelope| {
            (
                u64::from(envelope.tokens_in) + u64::from(envelope.tokens_out),
                envelope.cost_usd,
            )
        });
        self.events.record_request(RequestEvent {
            id: new_event_id(),
            at: time::OffsetDateTime::now_utc(),
            outcome,
            latency_us: u64::try_from(started.elapsed().as_micros()).unwrap_or(u64::MAX),
            engine_version: self.deriver.engine_version().to_string(),
            prompt_hash: self.deriver.prompt_hash().to_string(),
            classification: keyed.profile.classification.as_str().to_owned(),
            primary_system: keyed.profile.primary_system().to_owned(),
            client: caller.client.clone(),
            user_hash: caller.user_hash.clone(),
            key_digest: keyed.key.digest().to_owned(),
            profile: keyed.canonical_json.clone(),
            entry_tokens,
            entry_cost_usd,
        });
    }

    fn index_user(&self, keyed: &KeyedProfile, caller: &Caller) {
        if let Some(user) = &caller.user_hash {
            self.user_index.record(user, &keyed.key);
        }
    }

    pub async fn lookup(&self, key: &CacheKey) -> Lookup {
        if let Some((envelope, age, _)) = self.cached(key).await {
            return Lookup::Found(envelope, freshness_secs(age, self.stale_after));
        }
        if self.flights.in_flight(key) {
            return Lookup::Pending;
        }
        // Another instance may be generating it: its fill lock says so.
        let held_elsewhere = match &self.distributed {
            Some(shared) => shared.lock().is_held(key).await.unwrap_or(false),
            None => false,
        };
        if held_elsewhere {
            Lookup::Pending
        } else {
            Lookup::Missing
        }
    }

    /// Waits until the generation in flight for `key`, if any, has ended.
    pub async fn settled(&self, key: &CacheKey) {
        if let Some(follower) = self.flights.follow(key) {
            follower.wait().await;
        }
    }

    pub async fn stats(&self) -> ServiceStats {
        let store = match self.store.stats().await {
            Ok(stats) => stats,
            Err(error) => {
                self.metrics.store_errors.inc();
                tracing::warn!(%error, "cache stats unavailable");
                StoreStats::default()
            }
        };
        let global = match &self.distributed {
            Some(shared) => self.counters.global(shared.redis().backend()).await.ok(),
            None => None,
        };
        ServiceStats {
            store,
            counts: global.unwrap_or_else(|| self.counters.local()),
            counts_are_global: global.is_some(),
            in_flight: self.flights.len(),
        }
    }

    /// Adds this instance's counts to the shared ones, every second until `stop`, and
    /// once more at the end.
    pub async fn flush_counters(&self, stop: tokio_util::sync::CancellationToken) {
        let Some(shared) = &self.distributed else {
            return;
        };
        let backend = shared.redis().backend();
        loop {
            let stopping = tokio::select! {
                () = stop.cancelled() => true,
                () = tokio::time::sleep(Duration::from_secs(1)) => false,
            };
            if let Err(error) = self.counters.flush(backend).await {
                tracing::debug!(%error, "hit counters not flushed; they are kept for the next try");
            }
            if let Err(error) = self.user_index.flush().await {
                tracing::debug!(%error, "user index not flushed; kept for the next try");
            }
            if stopping {
                return;
            }
        }
    }

    /// Erases what is cached for `user_hash`: every entry the user asked for, even if
    /// others share it (they regenerate it). With Redis each is deleted with its fill
    /// lock revoked and a tombstone left ([`cache_core::lock::FillLock::erase`]), and
    /// every instance drops its L1 copy; the index is read again after a flush
    /// interval, for pairs other gateways had not written yet. Returns the entries
    /// deleted.
    pub async fn erase_user(&self, user_hash: &str) -> Result<u64, StoreError> {
        let mut deleted = 0;
        for pass in 0..2 {
            if pass == 1 {
                if self.distributed.is_none() {
                    break;
                }
                tokio::time::sleep(cache_core::user_index::FLUSH_INTERVAL * 3 / 2).await;
            }
            let keys = self.user_index.keys(user_hash).await?;
            let mut erased = Vec::with_capacity(keys.len());
            let mut failure = None;
            for key in keys {
                match self.erase_key(&key).await {
                    Ok(existed) => {
                        deleted += u64::from(existed);
                        erased.push(key);
                    }
                    Err(error) => {
                        failure = Some(error);
                        break;
                    }
                }
            }
            // What was erased leaves the index; the rest stays for the retry.
            self.user_index.forget(user_hash, &erased).await?;
            if let Some(error) = failure {
                return Err(error);
            }
        }
        Ok(deleted)
    }

    /// Embedded mode's fence: generations that began before now store nothing.
    fn fence_locally(&self, key: &CacheKey) {
        let now = Instant::now();
        let mut erased = self
            .erased
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        erased.retain(|_, at| now.duration_since(*at) < self.erasure_tombstone);
        erased.insert(key.clone(), now);
    }

    async fn erase_key(&self, key: &CacheKey) -> Result<bool, StoreError> {
        let Some(shared) = &self.distributed else {
            self.fence_locally(key);
            return self.store.delete(key).await;
        };
        let existed = shared.lock().erase(key, self.erasure_tombstone).await?;
        shared.tiers.forget_l1(key);
        if let Err(error) = shared.bus().publish(Signal::Invalidate, key).await {
            tracing::warn!(%error, "could not tell other instances to drop an erased entry; their copies expire with L1_TTL");
        }
        Ok(existed)
    }

    /// Stops accepting generations and waits up to `grace` for those running to be
    /// stored. Returns whether all finished.
    pub async fn drain(&self, grace: Duration) -> bool {
        self.tasks.close();
        tokio::time::timeout(grace, self.tasks.wait()).await.is_ok()
    }
}

/// Seconds of freshness an entry of this `age` has left under `limit`: whole seconds
/// while fresh, and negative (rounded away from zero, so never `-0`) once stale, as
/// `Cache-Status`'s `ttl` reports it.
fn freshness_secs(age: Duration, limit: Duration) -> i64 {
    if age <= limit {
        i64::try_from((limit - age).as_secs()).unwrap_or(i64::MAX)
    } else {
        -i64::try_from((age - limit).as_millis().div_ceil(1000)).unwrap_or(i64::MAX)
    }
}
