//! The gateway's settings, read once from the environment at start-up.

use std::net::SocketAddr;
use std::time::Duration;

use analytics::settings::database_url_from;
use analytics::PublisherSettings;
use cache_core::config::{ConfigError, Vars};
use cache_core::{CacheKeySecret, EngineVersion, KnownSystems, PromptHash, QuantizationStep};
use cache_redis::backend::RedisConfig;

use crate::auth::{BearerSecret, ClientKeys};
use crate::limits::RateLimit;
use narrative_gen::{guard_settings_from, llm_settings_from, GuardSettings, LlmSettings};
use narrative_queue::{queue_settings_from, QueueSettings};

#[derive(Debug, Clone)]
pub struct Settings {
    pub bind_addr: SocketAddr,
    pub engine_version: EngineVersion,
    pub quantization_step: QuantizationStep,
    pub cache_ttl: Duration,
    pub stale_after: Duration,
    /// How long a request waits for a generation before answering the template.
    pub generation_wait: Duration,
    /// `None` in embedded mode without `CACHE_KEY_SECRET`: a random one per process.
    pub cache_key_secret: Option<CacheKeySecret>,
    /// `None` without `LLM_API_KEY`: the template engine generates.
    pub llm: Option<LlmSettings>,
    /// Byte budget of the in-process cache.
    pub memory_cache_max_bytes: u64,
    /// How long shutdown waits for generations in flight to finish and be stored.
    pub shutdown_grace: Duration,
    /// How long clients have for each part of a request (`HTTP_*_TIMEOUT`).
    pub http: HttpTimeouts,
    /// `None` in embedded mode.
    pub redis: Option<RedisSettings>,
    /// Earlier `(ENGINE_VERSION, promptHash)` pairs whose entries may answer a miss as
    /// stale while the new key is generated (`PREVIOUS_VERSIONS`).
    pub previous_versions: Vec<(EngineVersion, PromptHash)>,
    /// Set with `AMQP_URL`: misses become jobs for `generator-worker`s.
    pub queue: Option<QueueSettings>,
    /// `JOB_WAIT_LIMIT`: how long a flight keeps its queued job's fill lock alive,
    /// waiting for a worker to take it (the queue's longest plausible backlog).
    pub job_wait_limit: Duration,
    /// `MAX_PENDING_GENERATIONS`: generations started and not finished, at most; past
    /// it a miss answers the template without starting one.
    pub max_pending_generations: usize,
    /// Set with `DATABASE_URL`: events go to RabbitMQ for the `analytics` service, and
    /// `/narrative/analytics` reads Postgres. Unset, both stay in process.
    pub analytics: Option<AnalyticsSettings>,
    /// `ADMIN_TOKEN`: the bearer token of admin routes; unset, they are refused.
    pub admin_token: Option<BearerSecret>,
    /// Time between two pre-warm generations started (`PREWARM_RATE` per second).
    pub prewarm_interval: Duration,
    /// How far back popularity looks for a top-N pre-warm (`PREWARM_WINDOW`).
    pub prewarm_window: Duration,
    /// `API_KEYS`: empty, client routes are open and the gateway serves loopback only
    /// (unless `ALLOW_ANONYMOUS`).
    pub client_keys: ClientKeys,
    /// `RATE_LIMIT_RPS` and `RATE_LIMIT_BURST`: per client, per gateway; off unset.
    pub rate_limit: Option<RateLimit>,
    /// `CONSOLE`: whether `GET /console` is served (on by default; off leaves the
    /// gateway's address with no HTML at all).
    pub console: bool,
    /// `LLM_MAX_CONCURRENCY` and `LLM_DAILY_BUDGET_USD`.
    pub guard: GuardSettings,
    /// `ERASURE_TOMBSTONE_TTL`: how long an erased entry refuses work begun before
    /// its erasure (a queued job, a waiting flight).
    pub erasure_tombstone: Duration,
    /// `STAR_SYSTEM_NAMES`: when set, profiles naming any other system are refused.
    pub known_systems: Option<KnownSystems>,
    /// `REVALIDATE_MIN_INTERVAL`: a client's `no-cache` or `max-age` regenerates an
    /// entry only once it is this old (the admin token is exempt); `0s` lifts it.
    pub revalidate_min_interval: Duration,
}

/// How long a client has for each part of a request, so that a slow or silent one
/// cannot hold a connection (slowloris).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HttpTimeouts {
    /// `HTTP_HEADER_TIMEOUT`: a new connection's first request headers, complete.
    pub header: Duration,
    /// `HTTP_BODY_TIMEOUT`: a request's whole body, from the end of its headers.
    pub body: Duration,
    /// `HTTP_IDLE_TIMEOUT`: a kept-alive connection's wait for its next request, and
    /// that request's headers.
    pub idle: Duration,
}

/// Distributed mode's Redis: where, how patient, and how values are sealed.
#[derive(Debug, Clone)]
pub struct RedisSettings {
    /// What every process sharing the cache reads (target, timeouts, sealing, lock TTL).
    pub shared: RedisConfig,
    /// How long an instance keeps its in-process copy of an entry (L1).
    pub l1_ttl: Duration,
}

/// The shortest `ADMIN_TOKEN` accepted: a guessable admin token spends the LLM budget.
pub const MIN_ADMIN_TOKEN_BYTES: usize = 16;
/// `RATE_LIMIT_RPS` at least (one request per 1,000 s) and at most.
pub const MIN_RATE_LIMIT_RPS: f64 = 0.001;
pub const MAX_RATE_LIMIT_RPS: f64 = 1_000_000.0;

pub const MIN_SECRET_BYTES: usize = 16;

impl Settings {
    pub fn from_vars(vars: &Vars) -> Result<Self, ConfigError> {
        let cache_key_secret = vars.parse_or("CACHE_KEY_SECRET", None, |text| {
            if text.len() < MIN_SECRET_BYTES {
                Err(format!("must be at least {MIN_SECRET_BYTES} bytes"))
            } else {
                Ok(Some(CacheKeySecret::new(text.as_bytes().to_vec())))
            }
        })?;
        let redis = redis_settings(vars)?;
        let queue = queue_settings_from(vars)?;
        if queue.is_some() && redis.is_none() {
            return Err(ConfigError::new(
                "AMQP_URL",
                "needs REDIS_URL too: workers store narratives in Redis and signal completion through it",
            ));
        }
        let analytics = analytics_settings(vars, queue.as_ref())?;
        if redis.is_some() && cache_key_secret.is_none() {
            return Err(ConfigError::new(
                "CACHE_KEY_SECRET",
                "is required when REDIS_URL is set: every instance must derive the same keys, \
                 and keys hashed without a secret can be reversed by enumerating profiles",
            ));
        }
        let admin_token = vars.parse_or("ADMIN_TOKEN", None, |text| {
            if text.trim().len() < MIN_ADMIN_TOKEN_BYTES {
                Err(format!("must be at least {MIN_ADMIN_TOKEN_BYTES} bytes"))
            } else {
                Ok(Some(BearerSecret::new(text.trim())))
            }
        })?;
        let prewarm_rate = vars.from_str_or("PREWARM_RATE", 1.0f64)?;
        // At least one a thousand seconds: the pacer adds 1 / rate to a clock.
        if !(0.001..=1_000.0).contains(&prewarm_rate) {
            return Err(ConfigError::new(
                "PREWARM_RATE",
                "must be a number of generations per second, from 0.001 to 1000",
            ));
        }
        let client_keys = vars.parse_or("API_KEYS", ClientKeys::default(), ClientKeys::parse)?;
        let bind_addr: SocketAddr =
            vars.from_str_or("BIND_ADDR", SocketAddr::from(([127, 0, 0, 1], 8080)))?;
        let allow_anonymous = vars.bool_or("ALLOW_ANONYMOUS", false)?;
        if client_keys.is_empty() && !bind_addr.ip().is_loopback() && !allow_anonymous {
            return Err(ConfigError::new(
                "BIND_ADDR",
                "is not a loopback address and no API_KEYS are set: anyone who can reach it \
                 could spend the LLM budget. Set API_KEYS, or ALLOW_ANONYMOUS=true to serve \
                 everyone",
            ));
        }
        let rate_limit = match vars.get("RATE_LIMIT_RPS") {
            None => None,
            Some(_) => {
                let per_second = vars.from_str_or("RATE_LIMIT_RPS", 0.0f64)?;
                // Bounded so that a client's wait (up to 1 / rate) is a time a
                // `Retry-After` can say.
                if !(MIN_RATE_LIMIT_RPS..=MAX_RATE_LIMIT_RPS).contains(&per_second) {
                    return Err(ConfigError::new(
                        "RATE_LIMIT_RPS",
                        format!(
                            "must be a number of requests per second from {MIN_RATE_LIMIT_RPS} \
                             to {MAX_RATE_LIMIT_RPS}"
                        ),
                    ));
                }
                let burst = vars.from_str_or("RATE_LIMIT_BURST", (per_second * 2.0).max(1.0))?;
                if !(burst.is_finite() && burst >= 1.0) {
                    return Err(ConfigError::new("RATE_LIMIT_BURST", "must be at least 1"));
                }
                Some(RateLimit { per_second, burst })
            }
        };
        let erasure_tombstone =
            vars.duration_or("ERASURE_TOMBSTONE_TTL", Duration::from_secs(3600))?;
        if erasure_tombstone < Duration::from_secs(60) {
            return Err(ConfigError::new(
                "ERASURE_TOMBSTONE_TTL",
                "must be at least 1m: it has to outlive the fill lock and a generation",
            ));
        }
        let max_pending_generations = vars.from_str_or("MAX_PENDING_GENERATIONS", 1024usize)?;
        if max_pending_generations == 0 {
            return Err(ConfigError::new(
                "MAX_PENDING_GENERATIONS",
                "must be at least 1",
            ));
        }
        let http = HttpTimeouts {
            header: positive(
                vars.duration_or("HTTP_HEADER_TIMEOUT", Duration::from_secs(10))?,
                "HTTP_HEADER_TIMEOUT",
            )?,
            body: positive(
                vars.duration_or("HTTP_BODY_TIMEOUT", Duration::from_secs(30))?,
                "HTTP_BODY_TIMEOUT",
            )?,
            idle: positive(
                vars.duration_or("HTTP_IDLE_TIMEOUT", Duration::from_secs(75))?,
                "HTTP_IDLE_TIMEOUT",
            )?,
        };
        if http.header > http.idle {
            // hyper's one timer bounds a kept-alive connection's next headers by the
            // idle timeout; a first request's may not have longer than later ones.
            return Err(ConfigError::new(
                "HTTP_HEADER_TIMEOUT",
                "must not be longer than HTTP_IDLE_TIMEOUT",
            ));
        }
        let known_systems = vars.parse_or("STAR_SYSTEM_NAMES", None, |list| {
            KnownSystems::parse(list).map(Some)
        })?;
        Ok(Self {
            known_systems,
            revalidate_min_interval: vars
                .duration_or("REVALIDATE_MIN_INTERVAL", Duration::from_secs(60))?,
            erasure_tombstone,
            max_pending_generations,
            job_wait_limit: positive(
                vars.duration_or("JOB_WAIT_LIMIT", Duration::from_secs(600))?,
                "JOB_WAIT_LIMIT",
            )?,
            guard: guard_settings_from(vars)?,
            client_keys,
            rate_limit,
            console: vars.bool_or("CONSOLE", true)?,
            admin_token,
            prewarm_interval: Duration::from_secs_f64(1.0 / prewarm_rate),
            prewarm_window: positive(
                vars.duration_or("PREWARM_WINDOW", Duration::from_secs(30 * 86_400))?,
                "PREWARM_WINDOW",
            )?,
            bind_addr,
            engine_version: vars.parse_or(
                "ENGINE_VERSION",
                EngineVersion::default(),
                EngineVersion::parse,
            )?,
            quantization_step: vars.from_str_or("QUANTIZATION_STEP", QuantizationStep::DEFAULT)?,
            cache_ttl: positive(
                vars.duration_or("CACHE_TTL", Duration::from_secs(30 * 86_400))?,
                "CACHE_TTL",
            )?,
            stale_after: vars.duration_or("STALE_AFTER", Duration::from_secs(7 * 86_400))?,
            generation_wait: vars.millis_or("GENERATION_WAIT_MS", Duration::from_millis(4500))?,
            cache_key_secret,
            llm: llm_settings_from(vars)?,
            memory_cache_max_bytes: vars
                .from_str_or("MEMORY_CACHE_MAX_MB", 256u64)?
                .checked_mul(1024 * 1024)
                .ok_or_else(|| ConfigError::new("MEMORY_CACHE_MAX_MB", "is too large"))?,
            shutdown_grace: vars.duration_or("SHUTDOWN_GRACE", Duration::from_secs(30))?,
            http,
            redis,
            queue,
            analytics,
            previous_versions: vars.parse_or(
                "PREVIOUS_VERSIONS",
                Vec::new(),
                parse_previous_versions,
            )?,
        })
    }
}

impl Settings {
    /// What the audit log records at start-up: the settings that change who may do
    /// what and what it costs, never a secret (only whether one is set).
    pub fn audit_summary(&self) -> serde_json::Value {
        serde_json::json!({
            "bindAddr": self.bind_addr.to_string(),
            "engineVersion": self.engine_version.to_string(),
            "mode": if self.redis.is_some() { "distributed" } else { "embedded" },
            "workers": self.queue.is_some(),
            "postgres": self.analytics.is_some(),
            "llm": self.llm.is_some(),
            "clients": self.client_keys.names().collect::<Vec<_>>(),
            "adminToken": self.admin_token.is_some(),
            "console": self.console,
            "llmMaxConcurrency": self.guard.max_concurrency,
            "llmDailyBudgetUsd": self.guard.daily_budget_usd,
            "rateLimit": self.rate_limit.map(|l| serde_json::json!({"perSecond": l.per_second, "burst": l.burst})),
            "cacheTtlSecs": self.cache_ttl.as_secs(),
            "staleAfterSecs": self.stale_after.as_secs(),
        })
    }
}

#[derive(Debug, Clone)]
pub struct AnalyticsSettings {
    pub database_url: String,
    pub events: PublisherSettings,
}

/// `DATABASE_URL` (which needs `AMQP_URL`: events reach Postgres through RabbitMQ and
/// the `analytics` service), `EVENT_BUFFER`, `EVENT_BATCH_MAX` and `EVENT_BATCH_FORMAT`.
fn analytics_settings(
    vars: &Vars,
    queue: Option<&QueueSettings>,
) -> Result<Option<AnalyticsSettings>, ConfigError> {
    let capacity = vars.from_str_or("EVENT_BUFFER", 100_000usize)?;
    if capacity == 0 {
        return Err(ConfigError::new("EVENT_BUFFER", "must be at least 1"));
    }
    let defaults = PublisherSettings::default();
    let max_batch = vars.from_str_or("EVENT_BATCH_MAX", defaults.max_batch)?;
    // A binary batch holds at most this many: the `analytics` service refuses more.
    let most = analytics::event::MOST_BATCH_EVENTS;
    if !(1..=most).contains(&max_batch) {
        return Err(ConfigError::new(
            "EVENT_BATCH_MAX",
            format!("must be from 1 to {most} events"),
        ));
    }
    let Some(database_url) = database_url_from(vars)? else {
        return Ok(None);
    };
    let queue = queue.ok_or_else(|| {
        ConfigError::new(
            "DATABASE_URL",
            "needs AMQP_URL too: events reach Postgres through RabbitMQ and the analytics service",
        )
    })?;
    let events = PublisherSettings {
        capacity,
        max_batch,
        confirm_timeout: queue.confirm_timeout.max(defaults.confirm_timeout),
        format: vars.from_str_or("EVENT_BATCH_FORMAT", defaults.format)?,
        ..defaults
    };
    Ok(Some(AnalyticsSettings {
        database_url,
        events,
    }))
}

fn redis_settings(vars: &Vars) -> Result<Option<RedisSettings>, ConfigError> {
    // Zero turns L1 off (every read goes to Redis).
    let l1_ttl = vars.duration_or("L1_TTL", Duration::from_secs(30))?;
    Ok(RedisConfig::from_vars(vars)?.map(|shared| RedisSettings { shared, l1_ttl }))
}

/// `narrative@1.0.0:e589996ee664,narrative@0.9.0:0123456789ab`: version and promptHash
/// pairs, as they appear in keys and in `/narrative/stats`.
fn parse_previous_versions(text: &str) -> Result<Vec<(EngineVersion, PromptHash)>, String> {
    text.split(',')
        .map(str::trim)
        .filter(|pair| !pair.is_empty())
        .map(|pair| {
            let invalid = || {
                format!(
                    "{pair:?} must be engineVersion:promptHash, like narrative@1.0.0:e589996ee664"
                )
            };
            let (version, hash) = pair.rsplit_once(':').ok_or_else(invalid)?;
            Ok((
                EngineVersion::parse(version).map_err(|_| invalid())?,
                PromptHash::parse(hash).ok_or_else(invalid)?,
            ))
        })
        .collect()
}

fn positive(value: Duration, var: &'static str) -> Result<Duration, ConfigError> {
    if value.is_zero() {
        Err(ConfigError::new(var, "must be longer than zero"))
    } else {
        Ok(value)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_match_the_design() {
        let settings = Settings::from_vars(&Vars::from_pairs([])).expect("defaults are valid");
        assert_eq!(settings.bind_addr.to_string(), "127.0.0.1:8080");
        assert_eq!(settings.engine_version.as_str(), "narrative@1.0.0");
        assert_eq!(settings.quantization_step, QuantizationStep::DEFAULT);
        assert_eq!(settings.cache_ttl, Duration::from_secs(30 * 86_400));
        assert_eq!(settings.stale_after, Duration::from_secs(7 * 86_400));
        assert_eq!(settings.generation_wait, Duration::from_millis(4500));
        assert!(settings.llm.is_none(), "no LLM_API_KEY: template engine");
    }

    #[test]
    fn a_bad_value_names_its_variable() {
        const SECRET: (&str, &str) = ("CACHE_KEY_SECRET", "0123456789abcdef");
        const REDIS: (&str, &str) = ("REDIS_URL", "redis://127.0.0.1:6379");
        type Var<'a> = (&'a str, &'a str);
        let cases: &[(&str, &str, &[Var])] = &[
            ("BIND_ADDR", "localhost", &[]),
            ("ENGINE_VERSION", "a:b", &[]),
            ("QUANTIZATION_STEP", "0.125", &[]),
            ("CACHE_TTL", "30 days", &[]),
            ("CACHE_TTL", "0s", &[]),
            ("GENERATION_WAIT_MS", "4.5", &[]),
            ("CACHE_KEY_SECRET", "short", &[]),
            ("LLM_BASE_URL", "api.openai.com", &[]),
            ("LLM_PRICE_INPUT_PER_MTOK", "-1", &[]),
            ("LLM_TIMEOUT_MS", "30s", &[]),
            ("REDIS_URL", "http://127.0.0.1", &[SECRET]),
            ("REDIS_CLUSTER", "maybe", &[SECRET, REDIS]),
            ("CACHE_ENCRYPTION_KEY", "k1:short", &[SECRET, REDIS]),
            ("LOCK_TTL", "0s", &[SECRET, REDIS]),
            ("API_KEYS", "app:secret", &[]),
            ("BIND_ADDR", "0.0.0.0:8080", &[]),
            ("RATE_LIMIT_RPS", "0", &[]),
            // Accepted once, then panicked on the request path (`Duration::from_secs_f64`).
            ("RATE_LIMIT_RPS", "1e-20", &[]),
            ("RATE_LIMIT_RPS", "1e300", &[]),
            ("STAR_SYSTEM_NAMES", " , ", &[]),
            ("STAR_SYSTEM_NAMES", "Sirius,Vega\u{202e}", &[]),
            ("RATE_LIMIT_BURST", "0.5", &[("RATE_LIMIT_RPS", "10")]),
            ("ALLOW_ANONYMOUS", "maybe", &[]),
            ("LLM_MAX_CONCURRENCY", "0", &[]),
            ("LLM_DAILY_BUDGET_USD", "-5", &[]),
            ("LLM_DAILY_BUDGET_USD", "lots", &[]),
            ("ADMIN_TOKEN", "short", &[]),
            ("PREWARM_RATE", "0", &[]),
            ("PREWARM_RATE", "1e-18", &[]),
            ("PREWARM_WINDOW", "400000000000s", &[]),
            ("JOB_WAIT_LIMIT", "18446744073709551615s", &[]),
            ("HTTP_IDLE_TIMEOUT", "300000000000000000s", &[]),
            ("HTTP_HEADER_TIMEOUT", "2m", &[]),
            ("MEMORY_CACHE_MAX_MB", "18446744073709551615", &[]),
            ("PREWARM_RATE", "fast", &[]),
            ("PREWARM_WINDOW", "0s", &[]),
            ("EVENT_BATCH_MAX", "0", &[]),
            ("EVENT_BATCH_MAX", "100001", &[]),
            (
                "EVENT_BATCH_FORMAT",
                "msgpack",
                &[
                    SECRET,
                    REDIS,
                    ("AMQP_URL", "amqp://127.0.0.1:5672"),
                    ("DATABASE_URL", "postgres://127.0.0.1/analytics"),
                ],
            ),
        ];
        for (var, value, context) in cases {
            let pairs = context.iter().copied().chain([(*var, *value)]);
            let err = Settings::from_vars(&Vars::from_pairs(pairs)).expect_err(var);
            assert_eq!(err.var, *var, "{err}");
        }
    }

    #[test]
    fn without_client_keys_only_loopback_unless_told() {
        let open = Vars::from_pairs([("BIND_ADDR", "0.0.0.0:8080")]);
        assert_eq!(Settings::from_vars(&open).unwrap_err().var, "BIND_ADDR");
        let told = Vars::from_pairs([("BIND_ADDR", "0.0.0.0:8080"), ("ALLOW_ANONYMOUS", "true")]);
        assert!(Settings::from_vars(&told).is_ok());
        let keyed = Vars::from_pairs([
            ("BIND_ADDR", "0.0.0.0:8080"),
            ("API_KEYS", "web:web-key-0123456789ab"),
        ]);
        assert!(!Settings::from_vars(&keyed).unwrap().client_keys.is_empty());
    }

    #[test]
    fn redis_needs_a_key_secret() {
        let err = Settings::from_vars(&Vars::from_pairs([("REDIS_URL", "redis://127.0.0.1:6379")]))
            .expect_err("no secret");
        assert_eq!(err.var, "CACHE_KEY_SECRET");
        let ok = Settings::from_vars(&Vars::from_pairs([
            ("REDIS_URL", "redis://127.0.0.1:6379"),
            ("CACHE_KEY_SECRET", "0123456789abcdef"),
        ]))
        .expect("valid");
        assert!(ok.redis.is_some());
        let cluster = Settings::from_vars(&Vars::from_pairs([
            ("REDIS_URL", "redis://127.0.0.1:7000,redis://127.0.0.1:7001"),
            ("CACHE_KEY_SECRET", "0123456789abcdef"),
        ]))
        .expect("valid");
        assert!(
            matches!(cluster.redis.map(|r| r.shared.target), Some(cache_redis::backend::RedisTarget::Cluster(urls)) if urls.len() == 2)
        );
    }
}
