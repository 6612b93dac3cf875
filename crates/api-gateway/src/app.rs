//! Building the application from settings, and serving it on a listener until a
//! shutdown signal. Tests call the same [`App::build`] and [`run`] on a random port.

use std::future::Future;
use std::sync::Arc;

use analytics::{EventMetrics, EventPublisher, EventSink, InMemoryAnalytics, PgStore};
use axum::Router;
use cache_core::{
    CacheKeySecret, CacheStore, CoalescedReads, KeyDeriver, MemoryStore, TieredStore,
};
use cache_core::{MemoryUserIndex, UserIndex};
use cache_redis::backend::RedisBackend;
use cache_redis::codec::ValueCodec;
use cache_redis::lock::FillLock;
use cache_redis::signals::SignalBus;
use cache_redis::RedisStore;
use cache_redis::RedisUserIndex;
use narrative_fill::Holder;
use narrative_gen::{generator_from, GuardMetrics, GuardedGenerator};
use narrative_queue::ConfirmedPublisher;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::http;
use crate::limits::RateLimiter;
use crate::metrics::Metrics;
use crate::server;
use crate::service::{
    AnalyticsSource, Distributed, FillStrategy, InProcessFill, NarrativeService, PrewarmRuns,
    RedisFill, RedisTallies, ServiceParts, WorkerFill, Workers,
};
use crate::settings::{RedisSettings, Settings};

#[derive(Debug)]
pub struct AppState {
    pub settings: Settings,
    pub service: Arc<NarrativeService>,
    pub metrics: Arc<Metrics>,
    pub analytics: AnalyticsSource,
    /// Set when events go to RabbitMQ (`DATABASE_URL`).
    pub events: Option<Arc<EventPublisher>>,
    /// Cancelled when the server has stopped: ends background tasks.
    pub background: CancellationToken,
    /// The background tasks (signal subscription, counter flushing), awaited at
    /// shutdown so their last work (the final counter flush) is done.
    pub background_tasks: TaskTracker,
    pub prewarm_runs: PrewarmRuns,
    /// Per-client rate limits, when configured.
    pub rate_limiter: Option<RateLimiter>,
}

impl AppState {
    /// Records an admin action in the audit log and the structured log (target
    /// `audit`). The actor is the admin token's holder: there is one admin identity.
    pub fn audit(&self, action: &str, detail: serde_json::Value) {
        self.audit_by("admin", action, None, detail);
    }

    /// The same, about a subject: for a user, the keyed hash of their id, never the id.
    pub fn audit_about(&self, action: &str, subject: Option<String>, detail: serde_json::Value) {
        self.audit_by("admin", action, subject, detail);
    }

    /// `actor` is `admin` (the admin token's holder) or `system` (start-up).
    fn audit_by(
        &self,
        actor: &'static str,
        action: &str,
        subject: Option<String>,
        detail: serde_json::Value,
    ) {
        tracing::info!(target: "audit", actor, action, subject = subject.as_deref().unwrap_or(""), %detail, "audit");
        self.analytics.audit(analytics::AuditRecord {
            at: time::OffsetDateTime::now_utc(),
            actor: actor.to_owned(),
            action: action.to_owned(),
            subject,
            detail,
        });
    }
}

#[derive(Debug, Clone)]
pub struct App {
    state: Arc<AppState>,
}

impl App {
    /// Builds the app. Call it inside a Tokio runtime: distributed mode starts its
    /// Redis subscription task here.
    pub fn build(settings: Settings) -> anyhow::Result<Self> {
        let generator = generator_from(settings.llm.clone())?;
        let secret = settings.cache_key_secret.clone().unwrap_or_else(|| {
            tracing::warn!("no CACHE_KEY_SECRET: using a random one, so keys change on every restart (fine for an in-memory cache)");
            CacheKeySecret::random()
        });
        if settings.llm.is_none() {
            tracing::info!("no LLM_API_KEY: narratives are written by the template engine");
        }
        let deriver = KeyDeriver::new(
            &secret,
            settings.engine_version.clone(),
            generator.prompt_hash(),
            settings.quantization_step,
        );
        let background = CancellationToken::new();
        let background_tasks = TaskTracker::new();
        let mut metrics = Metrics::new();
        metrics.know_clients(
            settings
                .client_keys
                .named()
                .chain([&*crate::auth::ADMIN, &*crate::auth::ANONYMOUS]),
        );
        let metrics = Arc::new(metrics);
        // One confirmed publisher for the process: jobs, pre-warm jobs, event batches.
        let broker = settings
            .queue
            .clone()
            .map(|queue| Arc::new(ConfirmedPublisher::new(queue, BROKER_FAIL_FAST)));
        // The fill strategy, chosen once: in process, or through Redis, with workers
        // when jobs can be published.
        let (store, strategy, redis): (Arc<dyn CacheStore>, Arc<dyn FillStrategy>, _) =
            match &settings.redis {
                None => (
                    Arc::new(MemoryStore::new(settings.memory_cache_max_bytes)),
                    Arc::new(InProcessFill::new(settings.erasure_tombstone)),
                    None,
                ),
                Some(redis) => {
                    let shared =
                        distributed(redis, &settings, &metrics, &background, &background_tasks);
                    let store = Arc::clone(&shared.tiers) as Arc<dyn CacheStore>;
                    let backend = Arc::clone(shared.redis().backend());
                    let redis = RedisFill { shared };
                    let strategy: Arc<dyn FillStrategy> = match broker.clone() {
                        None => Arc::new(redis),
                        Some(jobs) => Arc::new(WorkerFill {
                            redis,
                            workers: Workers {
                                jobs,
                                job_wait_limit: settings.job_wait_limit,
                            },
                        }),
                    };
                    (store, strategy, Some(backend))
                }
            };
        let mode = if redis.is_some() {
            "distributed"
        } else {
            "embedded"
        };
        let (sink, analytics, events): (Arc<dyn EventSink>, _, _) = match &settings.analytics {
            None => {
                let memory = Arc::new(InMemoryAnalytics::new());
                (
                    Arc::clone(&memory) as Arc<dyn EventSink>,
                    AnalyticsSource::Memory(memory),
                    None,
                )
            }
            Some(config) => {
                let observer = redis.clone().map(|redis| {
                    Arc::new(RedisTallies { redis }) as Arc<dyn analytics::BatchObserver>
                });
                let broker = broker.clone().ok_or_else(|| {
                    anyhow::anyhow!(
                        "DATABASE_URL needs AMQP_URL: events reach Postgres through RabbitMQ"
                    )
                })?;
                let (publisher, task) = EventPublisher::new(
                    broker,
                    config.events.clone(),
                    observer,
                    EventMetrics::register(metrics.registry())?,
                );
                let stop = background.clone();
                background_tasks.spawn(task.run(stop));
                let publisher = Arc::new(publisher);
                let store = PgStore::connect_lazy(
                    &config.database_url,
                    2,
                    std::time::Duration::from_secs(2),
                )
                .map_err(|e| anyhow::anyhow!("DATABASE_URL: {e}"))?;
                (
                    Arc::clone(&publisher) as Arc<dyn EventSink>,
                    AnalyticsSource::Postgres {
                        store,
                        redis: redis.clone(),
                    },
                    Some(publisher),
                )
            }
        };
        let user_index: Arc<dyn UserIndex> = match &redis {
            // Twice CACHE_TTL: an entry lives CACHE_TTL from its last write, and a
            // refresh may write it again after the user's last request.
            Some(backend) => Arc::new(RedisUserIndex::new(
                Arc::clone(backend),
                settings.cache_ttl.saturating_mul(2),
            )),
            None => Arc::new(MemoryUserIndex::default()),
        };
        let generator = Arc::new(GuardedGenerator::new(
            generator,
            settings.guard,
            redis.clone(),
            GuardMetrics::register(metrics.registry())?,
        ));
        let service = Arc::new(NarrativeService::new(ServiceParts {
            deriver,
            store,
            generator,
            metrics: Arc::clone(&metrics),
            events: sink,
            ttl: settings.cache_ttl,
            stale_after: settings.stale_after,
            previous_versions: settings.previous_versions.clone(),
            generation_wait: settings.generation_wait,
            strategy,
            user_index,
            erasure_tombstone: settings.erasure_tombstone,
            max_pending_generations: settings.max_pending_generations,
            known_systems: settings.known_systems.clone(),
            revalidate_min_interval: settings.revalidate_min_interval,
        }));
        if redis.is_some() {
            let flusher = Arc::clone(&service);
            let stop = background.clone();
            background_tasks.spawn(async move { flusher.flush_counters(stop).await });
        }
        tracing::info!(
            mode,
            engine_version = %settings.engine_version,
            prompt_hash = %service.deriver().prompt_hash(),
            model = service.generator().model(),
            "narrative service ready"
        );
        if settings.client_keys.is_empty() {
            tracing::warn!(
                bind_addr = %settings.bind_addr,
                "no API_KEYS: client routes are open to anyone who can reach the gateway"
            );
        }
        let app = Self {
            state: Arc::new(AppState {
                rate_limiter: settings.rate_limit.map(RateLimiter::new),
                prewarm_runs: PrewarmRuns::new(settings.prewarm_interval),
                settings,
                service,
                metrics,
                analytics,
                events,
                background,
                background_tasks,
            }),
        };
        app.state.audit_by(
            "system",
            "startup",
            None,
            app.state.settings.audit_summary(),
        );
        Ok(app)
    }

    pub fn state(&self) -> &Arc<AppState> {
        &self.state
    }

    pub fn router(&self) -> Router {
        http::router(Arc::clone(&self.state))
    }
}

/// How long publishing fails at once after the broker failed, before trying it again:
/// a broker that is down then costs a miss nothing but its in-process generation.
const BROKER_FAIL_FAST: std::time::Duration = std::time::Duration::from_secs(3);

/// The Redis tiers, lock and signal bus; connections are made lazily, so this succeeds
/// while Redis is down.
fn distributed(
    redis: &RedisSettings,
    settings: &Settings,
    metrics: &Metrics,
    background: &CancellationToken,
    tasks: &TaskTracker,
) -> Distributed {
    let backend = Arc::new(RedisBackend::new(
        redis.shared.target.clone(),
        redis.shared.timeouts,
    ));
    let l2 = Arc::new(RedisStore::new(
        Arc::clone(&backend),
        ValueCodec::new(redis.shared.encryption.clone()),
    ));
    let l1 = MemoryStore::new(settings.memory_cache_max_bytes);
    // Requests' reads of a key share round trips; the fill protocol's own reads (under
    // the lock) go to Redis directly.
    let shared_reads = Arc::new(CoalescedReads::new(Arc::clone(&l2) as Arc<dyn CacheStore>));
    let tiers = Arc::new(TieredStore::new(
        l1,
        redis.l1_ttl,
        Arc::clone(&shared_reads) as Arc<dyn CacheStore>,
        settings.cache_ttl,
    ));
    let forget = Arc::clone(&tiers);
    let bus = SignalBus::new(Arc::clone(&backend), move |key| forget.forget_l1(key));
    let (subscriber, stop) = (Arc::clone(&bus), background.clone());
    tasks.spawn(async move { subscriber.run(stop).await });
    Distributed {
        holder: Holder::new(
            l2,
            FillLock::new(backend, redis.shared.lock_ttl),
            bus,
            settings.cache_ttl,
            metrics.unreadable_entries.clone(),
        ),
        tiers,
        shared_reads,
    }
}

/// Serves `app` on `listener` until `shutdown` resolves, then drains within one
/// `SHUTDOWN_GRACE`, whatever clients do: in-flight requests finish, generations still
/// running are stored, and what is not done by then is dropped.
pub async fn run(
    listener: TcpListener,
    app: App,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    tracing::info!(addr = %listener.local_addr()?, "listening");
    let settings = &app.state.settings;
    let grace = settings.shutdown_grace;
    let closed = app.state.metrics.connections_closed.clone();
    // The memo frees expired entries (erased narratives' rendered answers among them)
    // on a timer, not only when traffic comes.
    let service = Arc::clone(&app.state.service);
    let stop = app.state.background.clone();
    app.state
        .background_tasks
        .spawn(async move { service.tidy_memo(stop).await });
    let stopped = server::serve(
        listener,
        app.router(),
        settings.http,
        shutdown,
        grace,
        closed,
    )
    .await;
    if !stopped.connections_closed {
        tracing::warn!(
            ?grace,
            "connections still open at the end of the shutdown grace period were closed"
        );
    }
    // Generations ran on meanwhile; they get what is left of the same grace period.
    let left = stopped
        .deadline
        .saturating_duration_since(tokio::time::Instant::now());
    if !app.state.service.drain(left).await {
        tracing::warn!(
            ?grace,
            "generations still running at the end of the shutdown grace period were dropped"
        );
    }
    app.state.background.cancel();
    app.state.background_tasks.close();
    app.state.background_tasks.wait().await;
    tracing::info!("stopped");
    Ok(())
}
