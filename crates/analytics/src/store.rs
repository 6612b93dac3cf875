//! The Postgres side: migrations, partitions, idempotent batch inserts, and the
//! queries behind `GET /narrative/analytics`.

use std::sync::LazyLock;
use std::time::Duration;

use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{PgPool, Row};
use time::{Date, OffsetDateTime, Time};

use crate::event::{Batch, GenerationEvent, RequestEvent};
use crate::popularity::PopularProfile;
use crate::summary::{dollars, ratio, Range, RateBucket, Summary, SystemCount, TOP_SYSTEMS};

static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("../../migrations");

/// The advisory lock that orders erasures after the inserts running when they start.
const ERASURE_LOCK: i64 = 0x6e61_7272_6572_6173;

/// The tables partitioned by day.
pub const PARTITIONED: [&str; 2] = ["request_events", "generation_events"];

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// Postgres is down or refused for a reason that may pass: retry.
    #[error("postgres unavailable: {0}")]
    Unavailable(String),
    /// Postgres refused the data itself (class 22 or 23): retrying cannot help.
    #[error("postgres refused the batch: {0}")]
    Refused(String),
    #[error("migration failed: {0}")]
    Migration(String),
}

impl From<sqlx::Error> for StoreError {
    fn from(error: sqlx::Error) -> Self {
        let refused = error
            .as_database_error()
            .and_then(|db| db.code())
            .is_some_and(|code| code.starts_with("22") || code.starts_with("23"));
        if refused {
            Self::Refused(error.to_string())
        } else {
            Self::Unavailable(error.to_string())
        }
    }
}

/// What one insert added (a redelivered batch adds nothing).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Inserted {
    pub requests: u64,
    pub generations: u64,
}

#[derive(Debug, Clone)]
pub struct PgStore {
    pool: PgPool,
}

impl PgStore {
    /// A pool that connects lazily: building it succeeds while Postgres is down, and
    /// each query waits at most `timeout` for a connection.
    pub fn connect_lazy(
        url: &str,
        max_connections: u32,
        timeout: Duration,
    ) -> Result<Self, String> {
        let options: PgConnectOptions = url
            .parse()
            .map_err(|e: sqlx::Error| format!("not a postgres URL: {e}"))?;
        // Rollups bucket by UTC minutes, hours and days whatever the server's zone.
        let options = options
            .options([("timezone", "UTC")])
            .application_name("narrative-cache");
        let pool = PgPoolOptions::new()
            .max_connections(max_connections)
            .acquire_timeout(timeout)
            .connect_lazy_with(options);
        Ok(Self { pool })
    }

    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    /// Applies the migrations not yet applied (none on a second run). Replicas starting
    /// together are serialized by sqlx's advisory lock.
    pub async fn migrate(&self) -> Result<(), StoreError> {
        MIGRATOR
            .run(&self.pool)
            .await
            .map_err(|e| StoreError::Migration(e.to_string()))
    }

    pub async fn ping(&self) -> Result<(), StoreError> {
        sqlx::query("SELECT 1").execute(&self.pool).await?;
        Ok(())
    }

    /// Creates the daily partitions from yesterday to `days_ahead` days after `today`,
    /// moving rows the default partition holds for those days into them.
    pub async fn ensure_partitions(&self, today: Date, days_ahead: i64) -> Result<u32, StoreError> {
        let mut created = 0;
        for table in PARTITIONED {
            for offset in -1..=days_ahead {
                let day = today + time::Duration::days(offset);
                if self.create_partition(table, day).await? {
                    created += 1;
                }
            }
        }
        Ok(created)
    }

    async fn create_partition(&self, table: &str, day: Date) -> Result<bool, StoreError> {
        let name = partition_name(table, day);
        let exists: Option<String> = sqlx::query_scalar("SELECT to_regclass($1)::text")
            .bind(&name)
            .fetch_one(&self.pool)
            .await?;
        if exists.is_some() {
            return Ok(false);
        }
        let (from, to) = (start_of(day), start_of(day.next_day().unwrap_or(day)));
        let mut tx = self.pool.begin().await?;
        // One creator at a time across replicas; the loser sees the table and stops.
        sqlx::query("SELECT pg_advisory_xact_lock(hashtext('narrative-partitions'))")
            .execute(&mut *tx)
            .await?;
        let exists: Option<String> = sqlx::query_scalar("SELECT to_regclass($1)::text")
            .bind(&name)
            .fetch_one(&mut *tx)
            .await?;
        if exists.is_some() {
            return Ok(false);
        }
        let bounds = |at: OffsetDateTime| format!("'{}'", format_utc(at));
        // Names and bounds are ours (a fixed table name and a date), never input.
        let statements = [
            format!("CREATE TABLE {name} (LIKE {table} INCLUDING DEFAULTS INCLUDING CONSTRAINTS)"),
            format!(
                "WITH moved AS (DELETE FROM {table}_default WHERE at >= {} AND at < {} RETURNING *) \
                 INSERT INTO {name} SELECT * FROM moved",
                bounds(from),
                bounds(to)
            ),
            format!(
                "ALTER TABLE {table} ATTACH PARTITION {name} FOR VALUES FROM ({}) TO ({})",
                bounds(from),
                bounds(to)
            ),
        ];
        for statement in statements {
            sqlx::query(&statement).execute(&mut *tx).await?;
        }
        tx.commit().await?;
        Ok(true)
    }

    /// Drops the daily partitions that ended before `now - retention`, and deletes
    /// older rows from the default partitions, the minute rollups and popularity.
    /// Hourly rollups and the audit log are kept.
    pub async fn apply_retention(
        &self,
        now: OffsetDateTime,
        retention: Duration,
    ) -> Result<u32, StoreError> {
        let cutoff = now - retention;
        let mut dropped = 0;
        for table in PARTITIONED {
            let partitions: Vec<String> = sqlx::query_scalar(
                "SELECT c.relname::text FROM pg_inherits i \
                 JOIN pg_class c ON c.oid = i.inhrelid \
                 JOIN pg_class p ON p.oid = i.inhparent WHERE p.relname = $1",
            )
            .bind(table)
            .fetch_all(&self.pool)
            .await?;
            for name in partitions {
                let Some(day) = partition_day(table, &name) else {
                    continue;
                };
                if start_of(day.next_day().unwrap_or(day)) <= cutoff {
                    sqlx::query(&format!("DROP TABLE IF EXISTS {name}"))
                        .execute(&self.pool)
                        .await?;
                    dropped += 1;
                }
            }
            sqlx::query(&format!("DELETE FROM {table}_default WHERE at < $1"))
                .bind(cutoff)
                .execute(&self.pool)
                .await?;
        }
        for table in [
            "request_rollup_minute",
            "request_latency_minute",
            "generation_rollup_minute",
        ] {
            sqlx::query(&format!("DELETE FROM {table} WHERE bucket < $1"))
                .bind(cutoff)
                .execute(&self.pool)
                .await?;
        }
        sqlx::query("DELETE FROM profile_popularity_daily WHERE day < $1")
            .bind(cutoff.date())
            .execute(&self.pool)
            .await?;
        // An erasure's marker anonymizes that user's events still queued when it was
        // made. One older than the retention could only meet events older than it,
        // which retention deletes anyway: the user's hash is kept no longer than that.
        sqlx::query("DELETE FROM erased_users WHERE erased_at < $1")
            .bind(cutoff)
            .execute(&self.pool)
            .await?;
        Ok(dropped)
    }

    /// Inserts a batch and updates the rollups in one transaction. Events already
    /// stored (same id and time) are skipped, and only rows really inserted count
    /// towards the rollups: inserting a batch twice changes nothing.
    pub async fn insert(&self, batch: &Batch) -> Result<Inserted, StoreError> {
        let mut tx = self.pool.begin().await?;
        let requests = if batch.requests.is_empty() {
            0
        } else {
            // Shared with other inserts, exclusive to an erasure: see `erase_user`.
            sqlx::query("SELECT pg_advisory_xact_lock_shared($1)")
                .bind(ERASURE_LOCK)
                .execute(&mut *tx)
                .await?;
            insert_requests(&mut tx, &batch.requests).await?
        };
        let generations = if batch.generations.is_empty() {
            0
        } else {
            insert_generations(&mut tx, &batch.generations).await?
        };
        tx.commit().await?;
        Ok(Inserted {
            requests,
            generations,
        })
    }

    /// Appends an audit record.
    pub async fn audit(
        &self,
        actor: &str,
        action: &str,
        subject: Option<&str>,
        detail: serde_json::Value,
    ) -> Result<(), StoreError> {
        sqlx::query(
            "INSERT INTO audit_log (actor, action, subject, detail) VALUES ($1, $2, $3, $4::jsonb)",
        )
        .bind(actor)
        .bind(action)
        .bind(subject)
        .bind(detail.to_string())
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// Erases a user's events: deletes their request events (every partition) and
    /// records the erasure, so that events of theirs still queued are stored without
    /// their hash. Returns the rows deleted. Idempotent.
    ///
    /// The marker is committed first, so every insert that starts afterwards sees it;
    /// then the delete waits (an exclusive advisory lock against the inserts' shared
    /// one) for inserts already running, whose rows it then sees and deletes.
    pub async fn erase_user(&self, user_hash: &str) -> Result<u64, StoreError> {
        sqlx::query(
            "INSERT INTO erased_users (user_hash, erased_at) VALUES ($1, now()) \
             ON CONFLICT (user_hash) DO UPDATE SET erased_at = now()",
        )
        .bind(user_hash)
        .execute(&self.pool)
        .await?;
        let mut tx = self.pool.begin().await?;
        sqlx::query("SELECT pg_advisory_xact_lock($1)")
            .bind(ERASURE_LOCK)
            .execute(&mut *tx)
            .await?;
        let deleted = sqlx::query("DELETE FROM request_events WHERE user_hash = $1")
            .bind(user_hash)
            .execute(&mut *tx)
            .await?
            .rows_affected();
        tx.commit().await?;
        Ok(deleted)
    }

    /// The `n` most requested canonical profiles since `since` (days, UTC), whatever
    /// the engine version they were requested under.
    pub async fn top_profiles(
        &self,
        n: usize,
        since: OffsetDateTime,
    ) -> Result<Vec<PopularProfile>, StoreError> {
        let rows = sqlx::query(
            "SELECT p.canonical::text AS canonical, sum(d.requests)::int8 AS requests \
             FROM profile_popularity_daily d JOIN profiles p USING (profile_digest) \
             WHERE d.day >= $1::date \
             GROUP BY p.profile_digest, p.canonical \
             ORDER BY requests DESC, p.profile_digest LIMIT $2",
        )
        .bind(since.date())
        .bind(i64::try_from(n).unwrap_or(i64::MAX))
        .fetch_all(&self.pool)
        .await?;
        Ok(rows
            .into_iter()
            .map(|row| PopularProfile {
                canonical: row.get("canonical"),
                requests: unsigned(row.get("requests")),
            })
            .collect())
    }

    /// The analytics answer for `range`, from the rollups. Totals resolve to whole
    /// minutes, top systems and rates by hour and day to whole hours. `uniqueUsers` is
    /// left for the caller (Redis's HyperLogLog).
    pub async fn summary(&self, range: &Range) -> Result<Summary, StoreError> {
        let totals = sqlx::query(
            "SELECT coalesce(sum(requests), 0)::int8 AS requests, \
                    coalesce(sum(hits_l1 + hits_l2 + stale), 0)::int8 AS hits, \
                    coalesce(sum(misses + fallbacks), 0)::int8 AS misses, \
                    coalesce(sum(stale), 0)::int8 AS stale, \
                    coalesce(sum(fallbacks), 0)::int8 AS fallbacks, \
                    coalesce(sum(errors), 0)::int8 AS errors, \
                    coalesce(sum(tokens_saved), 0)::int8 AS tokens_saved, \
                    coalesce(sum(cost_saved_usd), 0)::float8 AS cost_saved \
             FROM request_rollup_minute \
             WHERE bucket >= date_trunc('minute', $1::timestamptz) AND bucket < $2",
        )
        .bind(range.from)
        .bind(range.to)
        .fetch_one(&self.pool)
        .await?;
        let generations = sqlx::query(
            "SELECT coalesce(sum(generations), 0)::int8 AS generations, \
                    coalesce(sum(failures), 0)::int8 AS failures, \
                    coalesce(sum(duration_ms_sum), 0)::int8 AS duration_ms, \
                    coalesce(sum(tokens_in), 0)::int8 AS tokens_in, \
                    coalesce(sum(tokens_out), 0)::int8 AS tokens_out, \
                    coalesce(sum(cost_usd), 0)::float8 AS cost \
             FROM generation_rollup_minute \
             WHERE bucket >= date_trunc('minute', $1::timestamptz) AND bucket < $2",
        )
        .bind(range.from)
        .bind(range.to)
        .fetch_one(&self.pool)
        .await?;
        let top_systems = sqlx::query(
            "SELECT primary_system, sum(requests)::int8 AS count FROM system_rollup_hour \
             WHERE bucket >= date_trunc('hour', $1::timestamptz) AND bucket < $2 \
             GROUP BY primary_system ORDER BY count DESC, primary_system LIMIT $3",
        )
        .bind(range.from)
        .bind(range.to)
        .bind(i64::try_from(TOP_SYSTEMS).unwrap_or(10))
        .fetch_all(&self.pool)
        .await?
        .into_iter()
        .map(|row| SystemCount {
            system: row.get("primary_system"),
            count: unsigned(row.get("count")),
        })
        .collect();
        let hours = sqlx::query(
            "SELECT bucket, requests, (hits_l1 + hits_l2 + stale) AS hits FROM request_rollup_hour \
             WHERE bucket >= date_trunc('hour', $1::timestamptz) AND bucket < $2 AND requests > 0 \
             ORDER BY bucket",
        )
        .bind(range.from)
        .bind(range.to)
        .fetch_all(&self.pool)
        .await?;
        let by_hour: Vec<RateBucket> = hours
            .iter()
            .map(|row| {
                RateBucket::new(
                    row.get("bucket"),
                    unsigned(row.get("requests")),
                    unsigned(row.get("hits")),
                )
            })
            .collect();
        let mut by_day: Vec<RateBucket> = Vec::new();
        for hour in &by_hour {
            let day = hour.start.replace_time(Time::MIDNIGHT);
            match by_day.last_mut() {
                Some(last) if last.start == day => {
                    *last =
                        RateBucket::new(day, last.requests + hour.requests, last.hits + hour.hits);
                }
                _ => by_day.push(RateBucket::new(day, hour.requests, hour.hits)),
            }
        }

        let hits = unsigned(totals.get("hits"));
        let misses = unsigned(totals.get("misses"));
        let ok_generations = unsigned(generations.get("generations"));
        let duration_ms = unsigned(generations.get("duration_ms"));
        Ok(Summary {
            from: Some(range.from),
            to: Some(range.to),
            total_requests: unsigned(totals.get("requests")),
            cache_hits: hits,
            cache_misses: misses,
            stale: Some(unsigned(totals.get("stale"))),
            fallbacks: unsigned(totals.get("fallbacks")),
            errors: Some(unsigned(totals.get("errors"))),
            hit_rate: ratio(hits, hits + misses),
            top_systems,
            unique_users: None,
            generations: Some(ok_generations),
            failed_generations: Some(unsigned(generations.get("failures"))),
            avg_generation_time: Some(if ok_generations == 0 {
                0.0
            } else {
                duration_ms as f64 / ok_generations as f64
            }),
            tokens_in: Some(unsigned(generations.get("tokens_in"))),
            tokens_out: Some(unsigned(generations.get("tokens_out"))),
            estimated_cost: Some(dollars(generations.get("cost"))),
            cost_saved: Some(dollars(totals.get("cost_saved"))),
            tokens_saved: Some(unsigned(totals.get("tokens_saved"))),
            hit_rate_by_hour: by_hour,
            hit_rate_by_day: by_day,
            source: "postgres",
            partial: false,
        })
    }
}

const INSERT_REQUESTS: &str = "
WITH input AS (
    SELECT * FROM UNNEST(
        $1::uuid[], $2::timestamptz[], $3::text[], $4::int8[], $5::text[], $6::text[],
        $7::text[], $8::text[], $9::text[], $10::text[], $11::text[], $12::text[],
        $13::int8[], $14::float8[], $15::int8[]
    ) AS t(id, at, outcome, latency_us, engine_version, prompt_hash, classification,
           primary_system, client, user_hash, key_digest, profile, entry_tokens, entry_cost,
           first_delta_us)
),
digested AS (
    SELECT *, encode(sha256(convert_to(profile, 'UTF8')), 'hex') AS profile_digest FROM input
),
ins AS (
    INSERT INTO request_events (id, at, outcome, latency_us, engine_version, prompt_hash,
        classification, primary_system, client, user_hash, key_digest, profile_digest,
        entry_tokens, entry_cost_usd, first_delta_us)
    SELECT id, at, outcome, latency_us, engine_version, prompt_hash, classification,
        primary_system, client,
        -- A user erased after this event: it counts, but no longer as theirs.
        CASE WHEN EXISTS (SELECT 1 FROM erased_users e
                          WHERE e.user_hash = digested.user_hash AND digested.at <= e.erased_at)
             THEN NULL ELSE user_hash END,
        key_digest, profile_digest, entry_tokens,
        round(entry_cost::numeric, 10), first_delta_us
    FROM digested
    ON CONFLICT (id, at) DO NOTHING
    RETURNING at, outcome, latency_us, primary_system, profile_digest, entry_tokens,
        entry_cost_usd
),
{request_rollups}
latency AS (
    INSERT INTO request_latency_minute AS r
    SELECT date_trunc('minute', at), latency_le_us(latency_us), count(*)
    FROM ins GROUP BY 1, 2 ORDER BY 1, 2
    ON CONFLICT (bucket, le_us) DO UPDATE SET requests = r.requests + excluded.requests
),
systems AS (
    INSERT INTO system_rollup_hour AS r
    SELECT date_trunc('hour', at), primary_system, count(*),
        count(*) FILTER (WHERE outcome IN ('hit_l1', 'hit_l2', 'stale'))
    FROM ins GROUP BY 1, 2 ORDER BY 1, 2
    ON CONFLICT (bucket, primary_system) DO UPDATE SET
        requests = r.requests + excluded.requests, hits = r.hits + excluded.hits
),
popularity AS (
    INSERT INTO profile_popularity_daily AS r
    SELECT (at AT TIME ZONE 'UTC')::date, profile_digest, count(*)
    FROM ins GROUP BY 1, 2 ORDER BY 1, 2
    ON CONFLICT (day, profile_digest) DO UPDATE SET requests = r.requests + excluded.requests
),
known_profiles AS (
    INSERT INTO profiles AS r
    SELECT DISTINCT ON (profile_digest) profile_digest, profile::jsonb, classification,
        primary_system, at, at
    FROM digested ORDER BY profile_digest, at DESC
    ON CONFLICT (profile_digest) DO UPDATE SET
        last_seen = greatest(r.last_seen, excluded.last_seen),
        first_seen = least(r.first_seen, excluded.first_seen)
)
SELECT count(*) FROM ins";

const INSERT_GENERATIONS: &str = "
WITH ins AS (
    INSERT INTO generation_events (id, at, model, tokens_in, tokens_out, cost_usd,
        duration_ms, attempts, outcome, trigger, key_digest)
    SELECT id, at, model, tokens_in, tokens_out, round(cost::numeric, 10), duration_ms,
        attempts, outcome, trigger, key_digest
    FROM UNNEST(
        $1::uuid[], $2::timestamptz[], $3::text[], $4::int8[], $5::int8[], $6::float8[],
        $7::int8[], $8::int4[], $9::text[], $10::text[], $11::text[]
    ) AS t(id, at, model, tokens_in, tokens_out, cost, duration_ms, attempts, outcome,
           trigger, key_digest)
    ON CONFLICT (id, at) DO NOTHING
    RETURNING *
),
{generation_rollups}
SELECT count(*) FROM ins";

/// The CTEs that add the inserted requests (`ins`) to the `request_rollup_<unit>`
/// tables: the same sums per minute and per hour.
fn request_rollups() -> String {
    ["minute", "hour"]
        .map(|unit| {
            format!(
                "per_{unit} AS (
    INSERT INTO request_rollup_{unit} AS r
    SELECT date_trunc('{unit}', at), count(*),
        count(*) FILTER (WHERE outcome = 'hit_l1'), count(*) FILTER (WHERE outcome = 'hit_l2'),
        count(*) FILTER (WHERE outcome = 'stale'), count(*) FILTER (WHERE outcome = 'miss'),
        count(*) FILTER (WHERE outcome = 'fallback'), count(*) FILTER (WHERE outcome = 'error'),
        sum(latency_us),
        coalesce(sum(entry_tokens) FILTER (WHERE outcome IN ('hit_l1', 'hit_l2', 'stale')), 0),
        coalesce(sum(entry_cost_usd) FILTER (WHERE outcome IN ('hit_l1', 'hit_l2', 'stale')), 0)
    FROM ins GROUP BY 1 ORDER BY 1
    ON CONFLICT (bucket) DO UPDATE SET
        requests = r.requests + excluded.requests, hits_l1 = r.hits_l1 + excluded.hits_l1,
        hits_l2 = r.hits_l2 + excluded.hits_l2, stale = r.stale + excluded.stale,
        misses = r.misses + excluded.misses, fallbacks = r.fallbacks + excluded.fallbacks,
        errors = r.errors + excluded.errors,
        latency_us_sum = r.latency_us_sum + excluded.latency_us_sum,
        tokens_saved = r.tokens_saved + excluded.tokens_saved,
        cost_saved_usd = r.cost_saved_usd + excluded.cost_saved_usd
),"
            )
        })
        .join("\n")
}

/// The same for generations (`generation_rollup_<unit>`).
fn generation_rollups() -> String {
    ["minute", "hour"]
        .map(|unit| {
            format!(
                "per_{unit} AS (
    INSERT INTO generation_rollup_{unit} AS r
    SELECT date_trunc('{unit}', at),
        count(*) FILTER (WHERE outcome = 'ok'), count(*) FILTER (WHERE outcome = 'failed'),
        count(*) FILTER (WHERE trigger = 'prewarm'),
        coalesce(sum(duration_ms) FILTER (WHERE outcome = 'ok'), 0),
        sum(tokens_in), sum(tokens_out), sum(cost_usd)
    FROM ins GROUP BY 1 ORDER BY 1
    ON CONFLICT (bucket) DO UPDATE SET
        generations = r.generations + excluded.generations,
        failures = r.failures + excluded.failures, prewarms = r.prewarms + excluded.prewarms,
        duration_ms_sum = r.duration_ms_sum + excluded.duration_ms_sum,
        tokens_in = r.tokens_in + excluded.tokens_in,
        tokens_out = r.tokens_out + excluded.tokens_out,
        cost_usd = r.cost_usd + excluded.cost_usd
),"
            )
        })
        .join("\n")
}

/// The statements, built once.
static INSERT_REQUESTS_SQL: LazyLock<String> =
    LazyLock::new(|| INSERT_REQUESTS.replace("{request_rollups}", &request_rollups()));
static INSERT_GENERATIONS_SQL: LazyLock<String> = LazyLock::new(|| {
    // The last CTE before the final SELECT takes no comma.
    INSERT_GENERATIONS.replace(
        "{generation_rollups}",
        generation_rollups().trim_end_matches(','),
    )
});

async fn insert_requests(
    tx: &mut sqlx::Transaction<'_, sqlx::Postgres>,
    events: &[RequestEvent],
) -> Result<u64, StoreError> {
    let column = |f: fn(&RequestEvent) -> &str| events.iter().map(f).collect::<Vec<_>>();
    let inserted: i64 = sqlx::query_scalar(INSERT_REQUESTS_SQL.as_str())
        .bind(events.iter().map(|e| e.id).collect::<Vec<_>>())
        .bind(events.iter().map(|e| e.at).collect::<Vec<_>>())
        .bind(column(|e| e.outcome.as_str()))
        .bind(
            events
                .iter()
                .map(|e| signed(e.latency_us))
                .collect::<Vec<_>>(),
        )
        .bind(column(|e| &e.engine_version))
        .bind(column(|e| &e.prompt_hash))
        .bind(column(|e| &e.classification))
        .bind(column(|e| &e.primary_system))
        .bind(column(|e| &e.client))
        .bind(
            events
                .iter()
                .map(|e| e.user_hash.as_deref())
                .collect::<Vec<_>>(),
        )
        .bind(column(|e| &e.key_digest))
        .bind(column(|e| &e.profile))
        .bind(
            events
                .iter()
                .map(|e| signed(e.entry_tokens))
                .collect::<Vec<_>>(),
        )
        .bind(events.iter().map(|e| e.entry_cost_usd).collect::<Vec<_>>())
        .bind(
            events
                .iter()
                .map(|e| e.first_delta_us.map(signed))
                .collect::<Vec<_>>(),
        )
        .fetch_one(&mut **tx)
        .await?;
    Ok(unsigned(inserted))
}

async fn insert_generations(
    tx: &mut sqlx::Transaction<'_, sqlx::Postgres>,
    events: &[GenerationEvent],
) -> Result<u64, StoreError> {
    let inserted: i64 = sqlx::query_scalar(INSERT_GENERATIONS_SQL.as_str())
        .bind(events.iter().map(|e| e.id).collect::<Vec<_>>())
        .bind(events.iter().map(|e| e.at).collect::<Vec<_>>())
        .bind(events.iter().map(|e| e.model.clone()).collect::<Vec<_>>())
        .bind(
            events
                .iter()
                .map(|e| signed(e.tokens_in))
                .collect::<Vec<_>>(),
        )
        .bind(
            events
                .iter()
                .map(|e| signed(e.tokens_out))
                .collect::<Vec<_>>(),
        )
        .bind(events.iter().map(|e| e.cost_usd).collect::<Vec<_>>())
        .bind(
            events
                .iter()
                .map(|e| signed(e.duration_ms))
                .collect::<Vec<_>>(),
        )
        .bind(
            events
                .iter()
                .map(|e| i32::try_from(e.attempts).unwrap_or(i32::MAX))
                .collect::<Vec<_>>(),
        )
        .bind(
            events
                .iter()
                .map(|e| e.outcome.as_str())
                .collect::<Vec<_>>(),
        )
        .bind(
            events
                .iter()
                .map(|e| e.trigger.as_str())
                .collect::<Vec<_>>(),
        )
        .bind(
            events
                .iter()
                .map(|e| e.key_digest.clone())
                .collect::<Vec<_>>(),
        )
        .fetch_one(&mut **tx)
        .await?;
    Ok(unsigned(inserted))
}

fn signed(value: u64) -> i64 {
    i64::try_from(value).unwrap_or(i64::MAX)
}

fn unsigned(value: i64) -> u64 {
    u64::try_from(value).unwrap_or(0)
}

fn start_of(day: Date) -> OffsetDateTime {
    day.with_time(Time::MIDNIGHT).assume_utc()
}

fn format_utc(at: OffsetDateTime) -> String {
    let format =
        time::macros::format_description!("[year]-[month]-[day] [hour]:[minute]:[second]+00");
    at.format(&format).unwrap_or_default()
}

pub fn partition_name(table: &str, day: Date) -> String {
    format!(
        "{table}_p{:04}{:02}{:02}",
        day.year(),
        u8::from(day.month()),
        day.day()
    )
}

fn partition_day(table: &str, name: &str) -> Option<Date> {
    let digits = name.strip_prefix(table)?.strip_prefix("_p")?;
    if digits.len() != 8 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let year: i32 = digits[..4].parse().ok()?;
    let month: u8 = digits[4..6].parse().ok()?;
    let day: u8 = digits[6..].parse().ok()?;
    Date::from_calendar_date(year, time::Month::try_from(month).ok()?, day).ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use time::macros::date;

    #[test]
    fn partition_names_round_trip() {
        let name = partition_name("request_events", date!(2026 - 11 - 05));
        assert_eq!(name, "request_events_p20261105");
        assert_eq!(
            partition_day("request_events", &name),
            Some(date!(2026 - 11 - 05))
        );
        assert_eq!(
            partition_day("request_events", "request_events_default"),
            None
        );
        assert_eq!(partition_day("generation_events", &name), None);
    }
}
