//! Where `/narrative/analytics` reads from, and the realtime tallies kept in Redis.
//!
//! Embedded mode answers from the in-process aggregator. With `DATABASE_URL` the
//! answer comes from Postgres's rollups, with unique users from a Redis HyperLogLog
//! per day; while Postgres is unreachable it comes from Redis alone (hit counters,
//! popular systems, unique users) and says `"partial": true`.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;

use analytics::summary::{ratio, Summary, SystemCount, TOP_SYSTEMS};
use analytics::{
    AuditRecord, Batch, BatchObserver, InMemoryAnalytics, PgStore, PopularProfile, Range,
};
use cache_redis::backend::RedisBackend;

use super::NarrativeService;

/// Popular systems: a sorted set, request counts as scores. No TTL: never evicted.
pub const SYSTEMS_KEY: &str = "narrative:systems";
/// Members kept in the set: names are client-chosen, so it is trimmed to the most
/// requested after each batch.
const SYSTEMS_KEPT: i64 = 1_000;
/// One HyperLogLog of user hashes per UTC day. The hash tag keeps every day in one
/// Cluster slot, so a range is one `PFCOUNT`.
const USERS_KEY_PREFIX: &str = "{narrative:users}:";
/// Days of unique-user counts kept.
const USERS_TTL_SECS: u64 = 400 * 86_400;

/// Tries to store an audit record in Postgres, about ten minutes' worth with backoff.
const AUDIT_ATTEMPTS: u32 = 25;

fn users_key(day: time::Date) -> String {
    format!("{USERS_KEY_PREFIX}{day}")
}

#[derive(Debug)]
pub enum AnalyticsSource {
    Memory(Arc<InMemoryAnalytics>),
    Postgres {
        store: PgStore,
        redis: Option<Arc<RedisBackend>>,
    },
}

impl AnalyticsSource {
    /// The `n` most requested canonical profiles in the last `window`.
    pub async fn top_profiles(
        &self,
        n: usize,
        window: std::time::Duration,
    ) -> Result<Vec<PopularProfile>, analytics::store::StoreError> {
        let since = time::OffsetDateTime::now_utc() - window;
        match self {
            Self::Memory(memory) => Ok(memory.top_profiles(n, since)),
            Self::Postgres { store, .. } => store.top_profiles(n, since).await,
        }
    }

    /// Appends to the audit log: in memory, or Postgres (retried in the background
    /// for a while when it is down; the structured log has the record either way).
    pub fn audit(&self, record: AuditRecord) {
        match self {
            Self::Memory(memory) => memory.audit(record),
            Self::Postgres { store, .. } => {
                let store = store.clone();
                tokio::spawn(async move {
                    let mut delay = std::time::Duration::from_millis(500);
                    for attempt in 1..=AUDIT_ATTEMPTS {
                        let stored = store
                            .audit(
                                &record.actor,
                                &record.action,
                                record.subject.as_deref(),
                                record.detail.clone(),
                            )
                            .await;
                        match stored {
                            Ok(()) => return,
                            Err(error) if attempt == AUDIT_ATTEMPTS => {
                                tracing::error!(%error, action = %record.action, "audit record not stored in Postgres; it is in this log only");
                            }
                            Err(_) => {
                                tokio::time::sleep(delay).await;
                                delay = (delay * 2).min(std::time::Duration::from_secs(30));
                            }
                        }
                    }
                });
            }
        }
    }

    pub async fn summary(&self, range: &Range, service: &NarrativeService) -> Summary {
        let (store, redis) = match self {
            Self::Memory(memory) => return memory.summary(range),
            Self::Postgres { store, redis } => (store, redis.as_deref()),
        };
        match store.summary(range).await {
            Ok(mut summary) => {
                if let Some(redis) = redis {
                    summary.unique_users = unique_users(redis, range).await;
                }
                summary
            }
            Err(error) => {
                tracing::warn!(%error, "postgres unavailable; analytics answered from Redis counters");
                partial(range, service, redis).await
            }
        }
    }
}

async fn unique_users(redis: &RedisBackend, range: &Range) -> Option<u64> {
    let mut keys = Vec::new();
    let mut day = range.from.date();
    while day <= range.to.date() {
        keys.push(users_key(day));
        day = day.next_day()?;
    }
    redis
        .call(|mut conn| async move {
            redis::cmd("PFCOUNT")
                .arg(&keys)
                .query_async::<u64>(&mut conn)
                .await
        })
        .await
        .ok()
}

/// What Redis alone can tell: all-time counts (not the range), popular systems,
/// unique users. Costs and generation times are Postgres's: `null` here.
async fn partial(
    range: &Range,
    service: &NarrativeService,
    redis: Option<&RedisBackend>,
) -> Summary {
    let stats = service.stats().await;
    let counts = stats.counts;
    let (top_systems, unique) = match redis {
        Some(redis) => (top_systems(redis).await, unique_users(redis, range).await),
        None => (Vec::new(), None),
    };
    let requests = counts.hits + counts.misses;
    Summary {
        from: None,
        to: None,
        total_requests: requests,
        cache_hits: counts.hits,
        cache_misses: counts.misses,
        stale: None,
        fallbacks: counts.fallbacks,
        errors: None,
        hit_rate: ratio(counts.hits, requests),
        top_systems,
        unique_users: unique,
        generations: None,
        failed_generations: None,
        avg_generation_time: None,
        tokens_in: None,
        tokens_out: None,
        estimated_cost: None,
        cost_saved: None,
        tokens_saved: None,
        hit_rate_by_hour: Vec::new(),
        hit_rate_by_day: Vec::new(),
        source: "redis",
        partial: true,
    }
}

async fn top_systems(redis: &RedisBackend) -> Vec<SystemCount> {
    let stop = isize::try_from(TOP_SYSTEMS).unwrap_or(10) - 1;
    let ranked: Vec<(String, f64)> = redis
        .call(|mut conn| async move {
            redis::cmd("ZREVRANGE")
                .arg(SYSTEMS_KEY)
                .arg(0)
                .arg(stop)
                .arg("WITHSCORES")
                .query_async(&mut conn)
                .await
        })
        .await
        .unwrap_or_default();
    ranked
        .into_iter()
        .map(|(system, score)| SystemCount {
            system,
            count: score.max(0.0) as u64,
        })
        .collect()
}

/// Keeps the popular-systems set and the per-day unique-user counts in Redis, from
/// each event batch before it is published: off the request path, one pipeline per
/// batch. Best effort: a failure loses a batch's tallies, never its events.
#[derive(Debug)]
pub struct RedisTallies {
    pub redis: Arc<RedisBackend>,
}

#[async_trait::async_trait]
impl BatchObserver for RedisTallies {
    async fn observe(&self, batch: &Batch) {
        if batch.requests.is_empty() {
            return;
        }
        let mut systems: HashMap<&str, u64> = HashMap::new();
        // Each user once per day per batch: an active user appears in most batches.
        let mut users: BTreeMap<time::Date, BTreeSet<&str>> = BTreeMap::new();
        for event in &batch.requests {
            *systems.entry(&*event.primary_system).or_default() += 1;
            if let Some(user) = &event.user_hash {
                users.entry(event.at.date()).or_default().insert(user);
            }
        }
        let result = self
            .redis
            .call(|mut conn| async move {
                let mut pipe = redis::pipe();
                for (system, count) in systems {
                    pipe.cmd("ZINCRBY")
                        .arg(SYSTEMS_KEY)
                        .arg(count)
                        .arg(system)
                        .ignore();
                }
                pipe.cmd("ZREMRANGEBYRANK")
                    .arg(SYSTEMS_KEY)
                    .arg(0)
                    .arg(-SYSTEMS_KEPT - 1)
                    .ignore();
                for (day, hashes) in users {
                    let key = users_key(day);
                    pipe.cmd("PFADD")
                        .arg(&key)
                        .arg(hashes.into_iter().collect::<Vec<_>>())
                        .ignore();
                    pipe.cmd("EXPIRE").arg(&key).arg(USERS_TTL_SECS).ignore();
                }
                pipe.query_async::<()>(&mut conn).await
            })
            .await;
        if let Err(error) = result {
            tracing::debug!(%error, "realtime analytics tallies not written");
        }
    }
}
