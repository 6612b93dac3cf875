//! The answer policy: what a validated request is answered with, under its
//! `Cache-Control` directives: a hit, a stale hit that starts a refresh, a coalesced
//! miss, a revalidation, or the template; and what `GET /narrative/{key}` finds.

use std::sync::Arc;
use std::time::{Duration, Instant};

use analytics::{RequestOutcome, Trigger};
use cache_core::{now_ms, CacheKey, Envelope, KeyedProfile, Tier};
use narrative_gen::template::{self, TEMPLATE_MODEL};

use super::{FillMode, FlightResult, Joined, NarrativeService};

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
    /// Why a stored entry was not used. `None` for plain hits and misses.
    pub forwarded: Option<Forwarded>,
    /// A generation this request led, and stored.
    pub stored: bool,
    /// Which tier a hit came from.
    pub tier: Option<Tier>,
}

/// Why a stored entry was not answered (RFC 9211's `fwd`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Forwarded {
    /// The client's `no-cache`.
    Request,
    /// Older than the client's `max-age`.
    Stale,
}

impl Forwarded {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Request => "request",
            Self::Stale => "stale",
        }
    }
}

impl Answer {
    /// A stored entry, fresh (`Cache`) or `Stale`, with the seconds of freshness it
    /// has left (negative once stale).
    pub fn entry(
        envelope: Arc<Envelope>,
        source: Source,
        ttl_remaining_secs: i64,
        tier: Option<Tier>,
    ) -> Self {
        Self {
            envelope,
            source,
            collapsed: false,
            ttl_remaining_secs: Some(ttl_remaining_secs),
            forwarded: None,
            stored: false,
            tier,
        }
    }

    /// What `GET /narrative/{key}` answers for a stored entry with `ttl_remaining_secs`
    /// of freshness: stale once past it (its refresh starts on the next POST, which
    /// carries the profile a refresh needs).
    pub fn found(envelope: Arc<Envelope>, ttl_remaining_secs: i64) -> Self {
        let source = if ttl_remaining_secs < 0 {
            Source::Stale
        } else {
            Source::Cache
        };
        Self::entry(envelope, source, ttl_remaining_secs, None)
    }

    /// A generation this request waited for: stored by this request's flight, or by
    /// the one it `collapsed` onto.
    fn generated(envelope: Arc<Envelope>, collapsed: bool, forwarded: Option<Forwarded>) -> Self {
        Self {
            envelope,
            source: Source::Generated,
            collapsed,
            ttl_remaining_secs: None,
            forwarded,
            stored: !collapsed,
            tier: None,
        }
    }

    /// A generation for `no-store` requests (this one, or one it `collapsed` onto),
    /// kept nowhere.
    fn unstored(envelope: Arc<Envelope>, collapsed: bool, forwarded: Option<Forwarded>) -> Self {
        Self {
            stored: false,
            ..Self::generated(envelope, collapsed, forwarded)
        }
    }

    /// The template narrative, never stored.
    fn template(envelope: Arc<Envelope>, collapsed: bool) -> Self {
        Self {
            envelope,
            source: Source::Fallback,
            collapsed,
            ttl_remaining_secs: None,
            forwarded: None,
            stored: false,
            tier: None,
        }
    }
}

/// Who asked, as analytics records it: never the user id itself.
#[derive(Debug, Clone)]
pub struct Caller {
    /// The API client's name (`anonymous` until client keys are configured).
    pub client: Arc<str>,
    /// The keyed hash of the request's `userId`.
    pub user_hash: Option<Arc<str>>,
}

impl Caller {
    /// The admin token's holder, exempt from `REVALIDATE_MIN_INTERVAL` (no client key
    /// may be named `admin`).
    pub fn is_admin(&self) -> bool {
        &*self.client == crate::auth::ADMIN_CLIENT
    }
}

impl Default for Caller {
    fn default() -> Self {
        Self {
            client: Arc::clone(&crate::auth::ANONYMOUS),
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

/// What a request is answered with, once [`NarrativeService::plan`] has looked.
pub(super) enum Plan {
    /// Known at once: a hit, a stale entry, an earlier version's entry.
    Ready(Answer),
    /// Waiting on a flight.
    Wait(Pending),
}

/// A request waiting on a flight, and how the flight's outcome becomes its answer.
pub(super) struct Pending {
    pub joined: Joined,
    pub then: Settle,
}

/// How a flight's outcome becomes the answer ([`NarrativeService::settle`]).
#[derive(Debug, Clone)]
pub(super) enum Settle {
    /// A miss: the generation, else the template.
    Generated,
    /// `no-store`: the generation kept nowhere, else the template.
    Unstored(Option<Forwarded>),
    /// A forced regeneration of `stored`: the new value, else the stored one if
    /// `stale-if-error` allows it, else the template.
    Revalidated {
        stored: Arc<Envelope>,
        age: Duration,
        forwarded: Forwarded,
        directives: Directives,
    },
}

impl Settle {
    /// Why a stored entry is not answered, if one is not.
    pub(super) fn forwarded(&self) -> Option<Forwarded> {
        match self {
            Self::Generated => None,
            Self::Unstored(forwarded) => *forwarded,
            Self::Revalidated { forwarded, .. } => Some(*forwarded),
        }
    }
}

/// `only-if-cached` and nothing (usable) is stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NotCached;

/// What `GET /narrative/{key}` finds.
#[derive(Debug)]
pub enum Lookup {
    Found(Arc<Envelope>, i64),
    Pending,
    Missing,
}

impl NarrativeService {
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
        let answered = self.answer_with(keyed, started, directives, caller).await;
        match &answered {
            Ok(answer) => self.account(answer, keyed, started, caller),
            Err(NotCached) => {
                self.record_request(keyed, started, caller, RequestOutcome::Error, None)
            }
        }
        answered
    }

    pub(super) async fn answer_with(
        self: &Arc<Self>,
        keyed: &KeyedProfile,
        started: Instant,
        directives: Directives,
        caller: &Caller,
    ) -> Result<Answer, NotCached> {
        let deadline = started + self.generation_wait;
        Ok(match self.plan(keyed, directives, caller).await? {
            Plan::Ready(answer) => answer,
            Plan::Wait(pending) => {
                let Joined {
                    follower,
                    collapsed,
                    ..
                } = pending.joined;
                let result = tokio::time::timeout_at(deadline.into(), follower.wait())
                    .await
                    .ok()
                    .flatten();
                self.settle(keyed, &pending.then, collapsed, result)
            }
        })
    }

    /// What a validated request is answered with, or the flight it waits for (joined
    /// or started here) and how that flight's outcome becomes its answer. Only
    /// `only-if-cached` can refuse.
    pub(super) async fn plan(
        self: &Arc<Self>,
        keyed: &KeyedProfile,
        directives: Directives,
        caller: &Caller,
    ) -> Result<Plan, NotCached> {
        let plan = match self.cached(&keyed.key).await {
            Some((envelope, age, tier)) => {
                let too_old = directives
                    .max_age
                    .is_some_and(|max| age > Duration::from_secs(max));
                // A client may force a key's regeneration once per
                // `REVALIDATE_MIN_INTERVAL`: within it, the stored entry answers, so
                // `no-cache` in a loop is not a paid call each.
                let forcing = directives.no_cache || too_old;
                if !forcing || (!caller.is_admin() && self.forced_too_soon(&keyed.key, age)) {
                    Plan::Ready(self.answer_cached(keyed, envelope, age, tier))
                } else if directives.only_if_cached {
                    return Err(NotCached);
                } else {
                    let forwarded = if directives.no_cache {
                        Forwarded::Request
                    } else {
                        Forwarded::Stale
                    };
                    self.revalidate(keyed, envelope, age, forwarded, directives)
                }
            }
            None if directives.only_if_cached => return Err(NotCached),
            None if directives.no_store => self.generate_unstored(keyed, None),
            // `no-cache` will not take a stored entry unrevalidated, an earlier
            // version's least of all; `max-age` takes one only as young as it says.
            None if directives.no_cache => self.miss(keyed),
            None => {
                let max_age = directives.max_age.map(Duration::from_secs);
                match self.from_previous_version(keyed, max_age).await {
                    Some(answer) => Plan::Ready(answer),
                    None => self.miss(keyed),
                }
            }
        };
        Ok(plan)
    }

    /// How a flight's outcome (`None`: none in time) becomes a request's answer.
    pub(super) fn settle(
        &self,
        keyed: &KeyedProfile,
        then: &Settle,
        collapsed: bool,
        result: Option<FlightResult>,
    ) -> Answer {
        let generated = result.and_then(Result::ok);
        match (then, generated) {
            (Settle::Generated, Some(envelope)) => Answer::generated(envelope, collapsed, None),
            (Settle::Unstored(forwarded), Some(envelope)) => {
                Answer::unstored(envelope, collapsed, *forwarded)
            }
            (Settle::Revalidated { forwarded, .. }, Some(envelope)) => {
                Answer::generated(envelope, collapsed, Some(*forwarded))
            }
            (
                Settle::Revalidated {
                    stored,
                    age,
                    directives,
                    ..
                },
                None,
            ) => {
                // If regenerating fails, `stale-if-error` may still allow the stored
                // entry.
                let limit = directives
                    .max_age
                    .map_or(self.stale_after, Duration::from_secs);
                let allowed = directives
                    .stale_if_error
                    .is_some_and(|extra| *age <= limit.saturating_add(Duration::from_secs(extra)));
                if allowed {
                    let stale_for = -freshness_secs(*age, limit);
                    return Answer {
                        collapsed,
                        ..Answer::entry(Arc::clone(stored), Source::Stale, -stale_for, None)
                    };
                }
                self.fallback(keyed, collapsed)
            }
            (Settle::Generated | Settle::Unstored(_), None) => self.fallback(keyed, collapsed),
        }
    }

    /// Whether a client's `no-cache` or `max-age` must not regenerate this key now: its
    /// entry is younger than `REVALIDATE_MIN_INTERVAL`, or a client forced it within
    /// that interval (a `no-store` regeneration leaves the entry as old as it was).
    /// Otherwise this forcing is remembered. Per instance: a fleet of N allows N.
    fn forced_too_soon(&self, key: &CacheKey, age: Duration) -> bool {
        if self.revalidate_min_interval.is_zero() {
            return false;
        }
        if age < self.revalidate_min_interval || self.forced.contains_key(key) {
            return true;
        }
        self.forced.insert(key.clone(), ());
        false
    }

    /// During a rollout: the same profile's entry under an earlier version (no older
    /// than `max_age`, when the client set one), answered as stale while the new key is
    /// generated (once, through the flight and the lock).
    pub(super) async fn from_previous_version(
        self: &Arc<Self>,
        keyed: &KeyedProfile,
        max_age: Option<Duration>,
    ) -> Option<Answer> {
        for previous in self.previous_keys(&keyed.key) {
            let found = self.cached(&previous).await;
            let found = found.filter(|(_, age, _)| max_age.is_none_or(|max| *age <= max));
            if let Some((envelope, age, tier)) = found {
                let _ = self.join_flight(keyed, FillMode::Miss);
                let stale_for = i64::try_from(age.as_secs().max(1)).unwrap_or(i64::MAX);
                return Some(Answer::entry(
                    envelope,
                    Source::Stale,
                    -stale_for,
                    Some(tier),
                ));
            }
        }
        None
    }

    /// The client will not take the stored entry: regenerate it (coalesced: concurrent
    /// revalidations of one key make one call).
    pub(super) fn revalidate(
        self: &Arc<Self>,
        keyed: &KeyedProfile,
        stored: Arc<Envelope>,
        age: Duration,
        forwarded: Forwarded,
        directives: Directives,
    ) -> Plan {
        if directives.no_store {
            return self.generate_unstored(keyed, Some(forwarded));
        }
        let joined = self.join_flight(
            keyed,
            FillMode::Replace {
                older_than_ms: stored.created_at_ms,
            },
        );
        Plan::Wait(Pending {
            joined,
            then: Settle::Revalidated {
                stored,
                age,
                forwarded,
                directives,
            },
        })
    }

    /// `no-store`: a generation kept nowhere, coalesced with the key's flight.
    pub(super) fn generate_unstored(
        self: &Arc<Self>,
        keyed: &KeyedProfile,
        forwarded: Option<Forwarded>,
    ) -> Plan {
        let trigger = if forwarded.is_some() {
            Trigger::Refresh
        } else {
            Trigger::Miss
        };
        Plan::Wait(Pending {
            joined: self.join_unstored(keyed, trigger),
            then: Settle::Unstored(forwarded),
        })
    }

    /// A hit, or a stale hit that starts this key's refresh.
    pub(super) fn answer_cached(
        self: &Arc<Self>,
        keyed: &KeyedProfile,
        envelope: Arc<Envelope>,
        age: Duration,
        tier: Tier,
    ) -> Answer {
        if age <= self.stale_after {
            let fresh_for = freshness_secs(age, self.stale_after);
            return Answer::entry(envelope, Source::Cache, fresh_for, Some(tier));
        }
        self.start_refresh(keyed, envelope.created_at_ms);
        let stale_for = -freshness_secs(age, self.stale_after);
        Answer::entry(envelope, Source::Stale, -stale_for, Some(tier))
    }

    /// A miss: the key's flight, the template if it has nothing in time.
    pub(super) fn miss(self: &Arc<Self>, keyed: &KeyedProfile) -> Plan {
        Plan::Wait(Pending {
            joined: self.join_flight(keyed, FillMode::Miss),
            then: Settle::Generated,
        })
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
            None => match self.from_previous_version(keyed, None).await {
                Some(answer) => Some(answer),
                None => {
                    let mut follower = self.join_flight(keyed, FillMode::Miss).follower;
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

    /// `key`'s profile under each of `PREVIOUS_VERSIONS`, newest first.
    pub(super) fn previous_keys<'a>(
        &'a self,
        key: &'a CacheKey,
    ) -> impl Iterator<Item = CacheKey> + 'a {
        self.previous_prefixes.iter().filter_map(move |prefix| {
            CacheKey::parse(&format!("{prefix}{{{}}}", key.digest())).ok()
        })
    }

    /// The template narrative, never stored.
    pub(super) fn fallback(&self, keyed: &KeyedProfile, collapsed: bool) -> Answer {
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
        Answer::template(Arc::new(envelope), collapsed)
    }

    pub async fn lookup(&self, key: &CacheKey) -> Lookup {
        if let Some((envelope, age, _)) = self.cached(key).await {
            return Lookup::Found(envelope, freshness_secs(age, self.stale_after));
        }
        if self.flights.in_flight(key) {
            return Lookup::Pending;
        }
        // Another instance may be generating it: its fill lock says so.
        if self.strategy.held_elsewhere(key).await {
            Lookup::Pending
        } else {
            Lookup::Missing
        }
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

/// Entries and answers for unit tests.
#[cfg(test)]
pub(crate) mod test_support {
    use std::sync::Arc;

    use cache_core::Envelope;

    use super::{Answer, Source};

    /// A stored entry whose narrative is `body`.
    pub(crate) fn envelope(body: &str) -> Arc<Envelope> {
        Arc::new(Envelope {
            body: body.to_owned(),
            created_at_ms: 1,
            engine_version: "narrative@1.0.0".to_owned(),
            prompt_hash: "abcd".to_owned(),
            model: "m".to_owned(),
            tokens_in: 1,
            tokens_out: 1,
            cost_usd: 0.0,
            generation_ms: 1,
        })
    }

    /// `envelope` answered from `source`, with `ttl` seconds of freshness left.
    pub(crate) fn answer(envelope: &Arc<Envelope>, source: Source, ttl: i64) -> Answer {
        Answer {
            envelope: Arc::clone(envelope),
            source,
            collapsed: false,
            ttl_remaining_secs: Some(ttl),
            forwarded: None,
            stored: false,
            tier: None,
        }
    }
}
