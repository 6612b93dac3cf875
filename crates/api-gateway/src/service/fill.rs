//! Flights: one per key per instance (the first request leads, in a tracked task
//! bounded by `MAX_PENDING_GENERATIONS`), whose leader fills the key as the
//! instance's fill strategy does (`strategy`), and the generation every strategy
//! calls.

use std::sync::Arc;
use std::time::{Duration, Instant};

use analytics::Trigger;
use cache_core::{
    now_ms, CacheKey, Envelope, Flight, Follower, KeyedProfile, Leader, LiveFeeds, LiveSink,
    LiveText, StoreError, Tier,
};
use narrative_fill::generation_event;
use narrative_gen::GenerateError;

use super::NarrativeService;

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
    pub(super) fn trigger(self) -> Trigger {
        match self {
            Self::Miss => Trigger::Miss,
            Self::Replace { .. } => Trigger::Refresh,
            Self::Prewarm => Trigger::Prewarm,
        }
    }
}

/// What a flight's leader does.
#[derive(Debug, Clone, Copy)]
enum FlightWork {
    /// Fill the key, as the fill strategy does.
    Fill(FillMode),
    /// Generate for `no-store` requests, keeping the result nowhere.
    Unstored(Trigger),
}

/// A flight ends with the stored envelope, or with why there is none.
pub(super) type FlightResult = Result<Arc<Envelope>, FillError>;

/// The request that runs a key's flight.
pub(super) type FlightLeader = Leader<CacheKey, FlightResult>;

/// A request on a key's flight: the flight's result to come, whether another request
/// started it, and its text while it is written (gone if the flight already ended).
pub(super) struct Joined {
    pub follower: Follower<FlightResult>,
    pub collapsed: bool,
    pub live: Option<Arc<LiveText>>,
}

/// A flight's live text, open in its table until this is dropped: when the flight
/// ends, or if its task panics.
pub(super) struct OpenLive<'a> {
    feeds: &'a LiveFeeds<CacheKey>,
    key: &'a CacheKey,
    live: &'a Arc<LiveText>,
}

impl<'a> OpenLive<'a> {
    pub(super) fn new(
        feeds: &'a LiveFeeds<CacheKey>,
        key: &'a CacheKey,
        live: &'a Arc<LiveText>,
    ) -> Self {
        Self { feeds, key, live }
    }
}

impl Drop for OpenLive<'_> {
    fn drop(&mut self) {
        self.feeds.close(self.key, self.live);
    }
}

/// What a read of the store found.
pub(super) enum Looked {
    /// The entry, its age, and the tier it came from.
    Found(Arc<Envelope>, Duration, Tier),
    Absent,
    /// An entry is there that this instance cannot read (corrupt, sealed with a key it
    /// lacks, a format it does not know): a miss that must replace it.
    Unreadable,
}

impl NarrativeService {
    /// Starts a refresh of the entry created at `older_than_ms`, unless one runs.
    pub(super) fn start_refresh(self: &Arc<Self>, keyed: &KeyedProfile, older_than_ms: i64) {
        let Flight::Leader(leader) = self.flights.join(&keyed.key) else {
            return;
        };
        if self.must_shed() {
            leader.complete(Err(FillError::Shed));
            return;
        }
        let (service, keyed) = (Arc::clone(self), keyed.clone());
        let live = self.live.open(&keyed.key);
        self.tasks.spawn(async move {
            let open = OpenLive {
                feeds: &service.live,
                key: &keyed.key,
                live: &live,
            };
            let result = service
                .fill(&keyed, FillMode::Replace { older_than_ms }, &leader, &live)
                .await;
            if let Err(error) = &result {
                service.metrics.refresh_failures.inc();
                tracing::warn!(%error, cache_key = %keyed.key, "refresh failed; the stale entry stays until CACHE_TTL");
            }
            drop(open);
            leader.complete(result);
        });
    }

    /// The entry, its age, and the tier it came from.
    pub(super) async fn cached(&self, key: &CacheKey) -> Option<(Arc<Envelope>, Duration, Tier)> {
        match self.look(key).await {
            Looked::Found(envelope, age, tier) => Some((envelope, age, tier)),
            Looked::Absent | Looked::Unreadable => None,
        }
    }

    pub(super) async fn look(&self, key: &CacheKey) -> Looked {
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

    /// Joins the key's flight, starting it (in a tracked task that outlives the
    /// request) when there is none. Returns a follower and whether another request
    /// started the flight.
    pub(super) fn join_flight(self: &Arc<Self>, keyed: &KeyedProfile, mode: FillMode) -> Joined {
        self.join(keyed, FlightWork::Fill(mode))
    }

    /// For a `no-store` request: follows the key's fill if one runs (it stores what
    /// it was going to store anyway), or joins the key's unstored flight, starting one
    /// that generates and keeps the result nowhere. Concurrent `no-store` requests for
    /// a key cost one LLM call per instance, not one each. Unstored flights have their
    /// own table: a fill never waits on one (it would store nothing).
    pub(super) fn join_unstored(
        self: &Arc<Self>,
        keyed: &KeyedProfile,
        trigger: Trigger,
    ) -> Joined {
        if let Some(follower) = self.flights.follow(&keyed.key) {
            self.metrics.collapsed.inc();
            return Joined {
                follower,
                collapsed: true,
                live: self.live.get(&keyed.key),
            };
        }
        self.join(keyed, FlightWork::Unstored(trigger))
    }

    fn join(self: &Arc<Self>, keyed: &KeyedProfile, work: FlightWork) -> Joined {
        let (flights, feeds) = match work {
            FlightWork::Fill(_) => (&self.flights, &self.live),
            FlightWork::Unstored(_) => (&self.unstored_flights, &self.unstored_live),
        };
        match flights.join(&keyed.key) {
            Flight::Leader(leader) => {
                let follower = leader.follower();
                if self.must_shed() {
                    leader.complete(Err(FillError::Shed));
                    return Joined {
                        follower,
                        collapsed: false,
                        live: None,
                    };
                }
                // Opened before the flight runs, so that no request of it finds none.
                let live = feeds.open(&keyed.key);
                let service = Arc::clone(self);
                let keyed = keyed.clone();
                let flight_live = Arc::clone(&live);
                self.tasks.spawn(async move {
                    let live = flight_live;
                    let feeds = match work {
                        FlightWork::Fill(_) => &service.live,
                        FlightWork::Unstored(_) => &service.unstored_live,
                    };
                    let open = OpenLive {
                        feeds,
                        key: &keyed.key,
                        live: &live,
                    };
                    let result = match work {
                        FlightWork::Fill(mode) => service.fill(&keyed, mode, &leader, &live).await,
                        FlightWork::Unstored(trigger) => {
                            // Nothing is stored, so there is nothing to coordinate
                            // beyond this flight: no lock, no job.
                            leader.claim();
                            live.claim();
                            service.generate(&keyed, trigger, live.as_ref()).await
                        }
                    };
                    // Closed before the flight ends: a request that starts the next
                    // flight must not find this one's text.
                    drop(open);
                    leader.complete(result);
                });
                Joined {
                    follower,
                    collapsed: false,
                    live: Some(live),
                }
            }
            Flight::Follower(follower) => {
                self.metrics.collapsed.inc();
                Joined {
                    follower,
                    collapsed: true,
                    live: feeds.get(&keyed.key),
                }
            }
        }
    }

    /// Whether a new flight must not start: `MAX_PENDING_GENERATIONS` are running
    /// (each outlives its request, so a flood of distinct misses would otherwise grow
    /// tasks, locks and lock extensions without limit). A shed flight ends at once,
    /// and its request answers the template.
    pub(super) fn must_shed(&self) -> bool {
        if self.tasks.len() < self.max_pending {
            return false;
        }
        self.metrics.generations_shed.inc();
        true
    }

    /// The leader's work, as the fill strategy chosen at build time does it.
    pub(super) async fn fill(
        &self,
        keyed: &KeyedProfile,
        mode: FillMode,
        leader: &FlightLeader,
        live: &Arc<LiveText>,
    ) -> FlightResult {
        self.strategy.fill(self, keyed, mode, leader, live).await
    }

    /// Stores a generated narrative; a store that fails is counted and logged, and the
    /// narrative is still served.
    pub(super) async fn store_or_warn(&self, key: &CacheKey, envelope: &Arc<Envelope>) {
        if let Err(error) = self.store.put(key, Arc::clone(envelope), self.ttl).await {
            self.metrics.store_errors.inc();
            tracing::warn!(%error, store = self.store.name(), "cache write failed; the narrative is served but not shared");
        }
    }

    /// Calls the generator, its text going to `live` as it is written, and accounts for
    /// it. Only complete outputs come back.
    pub(super) async fn generate(
        &self,
        keyed: &KeyedProfile,
        trigger: Trigger,
        live: &dyn LiveSink,
    ) -> Result<Arc<Envelope>, FillError> {
        self.metrics.generations_in_flight.inc();
        let started = Instant::now();
        let result = self.generator.generate(&keyed.profile, live).await;
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

    /// Waits until the generation in flight for `key`, if any, has ended.
    pub async fn settled(&self, key: &CacheKey) {
        if let Some(follower) = self.flights.follow(key) {
            follower.wait().await;
        }
    }
}
