//! The `generator-worker` process: the worker, its consume loop, and an HTTP listener
//! for `/metrics`, `/healthz` and `/readyz`. Tests build it the same way.

use std::future::Future;
use std::sync::Arc;

use analytics::publisher::PublisherTask;
use analytics::{EventMetrics, EventPublisher, PublisherSettings};
use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::get;
use axum::{Json, Router};
use cache_redis::backend::RedisBackend;
use cache_redis::codec::ValueCodec;
use cache_redis::lock::FillLock;
use cache_redis::signals::SignalBus;
use cache_redis::RedisStore;
use narrative_fill::Holder;
use narrative_gen::{generator_from, GuardMetrics, GuardedGenerator};
use narrative_queue::ConfirmedPublisher;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::consumer::{self, ConsumerSettings, Consuming};

use crate::settings::WorkerSettings;
use crate::worker::{Worker, WorkerMetrics};

#[derive(Debug, Clone)]
pub struct WorkerApp {
    pub worker: Arc<Worker>,
    pub consuming: Arc<Consuming>,
    /// Taken by [`run`], which runs it until the worker has stopped.
    publisher: Arc<std::sync::Mutex<Option<PublisherTask>>>,
    settings: WorkerSettings,
}

impl WorkerApp {
    pub fn build(settings: WorkerSettings) -> anyhow::Result<Self> {
        let generator = generator_from(settings.llm.clone())?;
        if settings.llm.is_none() {
            tracing::info!("no LLM_API_KEY: narratives are written by the template engine");
        }
        let backend = Arc::new(RedisBackend::new(
            settings.redis.target.clone(),
            settings.redis.timeouts,
        ));
        let store = Arc::new(RedisStore::new(
            Arc::clone(&backend),
            ValueCodec::new(settings.redis.encryption.clone()),
        ));
        // The worker only publishes signals; it keeps no L1 to invalidate.
        let bus = SignalBus::new(Arc::clone(&backend), |_| {});
        let metrics = WorkerMetrics::new();
        // Workers always report their generations: the queue keeps the events until the
        // `analytics` service takes them.
        let broker = Arc::new(ConfirmedPublisher::new(
            settings.queue.clone(),
            std::time::Duration::ZERO,
        ));
        let (events, publisher) = EventPublisher::new(
            broker,
            PublisherSettings {
                format: settings.event_format,
                ..PublisherSettings::default()
            },
            None,
            EventMetrics::register(&metrics.registry)?,
        );
        let generator = Arc::new(GuardedGenerator::new(
            generator,
            settings.guard,
            Some(Arc::clone(&backend)),
            GuardMetrics::register(&metrics.registry)?,
        ));
        let holder = Holder::new(
            store,
            FillLock::new(backend, settings.redis.lock_ttl),
            bus,
            settings.cache_ttl,
            metrics.unreadable.clone(),
        );
        let worker = Arc::new(Worker {
            holder,
            generator,
            metrics,
            events: Arc::new(events),
        });
        Ok(Self {
            worker,
            publisher: Arc::new(std::sync::Mutex::new(Some(publisher))),
            consuming: Arc::new(Consuming::default()),
            settings,
        })
    }
}

/// Consumes jobs and serves the ops routes until `shutdown`; then stops consuming,
/// finishes the jobs in flight and returns.
pub async fn run(
    listener: TcpListener,
    app: WorkerApp,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let stop = CancellationToken::new();
    // Events stop after the consumer, so the last jobs' events are published.
    let events_stop = CancellationToken::new();
    let publisher = app
        .publisher
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .take()
        .map(|task| tokio::spawn(task.run(events_stop.clone())));
    let consumer_settings = ConsumerSettings {
        queue: app.settings.queue.clone(),
        prefetch: app.settings.prefetch,
        prewarm_prefetch: app.settings.prewarm_prefetch,
    };
    let consumer = tokio::spawn(consumer::run(
        Arc::clone(&app.worker),
        consumer_settings,
        Arc::clone(&app.consuming),
        stop.clone(),
    ));
    let router = Router::new()
        .route(
            "/metrics",
            get(|State(app): State<WorkerApp>| async move { app.worker.metrics.render() }),
        )
        .route(
            "/healthz",
            get(|| async { Json(serde_json::json!({"status": "ok"})) }),
        )
        .route("/readyz", get(readyz))
        .with_state(app);
    tracing::info!(addr = %listener.local_addr()?, "worker listening");
    axum::serve(listener, router)
        .with_graceful_shutdown(shutdown)
        .await?;
    stop.cancel();
    let _ = consumer.await;
    events_stop.cancel();
    if let Some(publisher) = publisher {
        let _ = publisher.await;
    }
    tracing::info!("worker stopped");
    Ok(())
}

/// Ready while attached to the queue; the Redis state is reported alongside.
async fn readyz(State(app): State<WorkerApp>) -> (StatusCode, Json<serde_json::Value>) {
    let consuming = app.consuming.get();
    let status = if consuming {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    let body = serde_json::json!({
        "status": if consuming { "ready" } else { "not consuming" },
        "backends": {
            "queue": {"kind": "rabbitmq", "state": if consuming { "up" } else { "down" }},
            "cache": {"kind": "redis", "state": app.worker.holder.store().backend().state().as_str()},
        },
    });
    (status, Json(body))
}
