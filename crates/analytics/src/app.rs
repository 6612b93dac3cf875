//! The `analytics` process: migrations, partition upkeep, the consumer, and an HTTP
//! listener for `/metrics`, `/healthz` and `/readyz`. Tests build it the same way.

use std::future::Future;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::get;
use axum::{Json, Router};
use prometheus::{Encoder, Registry, TextEncoder};
use time::OffsetDateTime;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::consumer::{Consumer, Health, IngestMetrics};
use crate::queues::QueueDepths;
use crate::settings::AnalyticsSettings;
use crate::store::PgStore;

/// How often partitions are created ahead and old ones dropped.
const UPKEEP_EVERY: Duration = Duration::from_secs(3_600);
const MIGRATE_RETRY: Duration = Duration::from_secs(2);

#[derive(Debug, Clone)]
pub struct AnalyticsApp {
    pub store: PgStore,
    pub consumer: Arc<Consumer>,
    pub health: Arc<Health>,
    pub queue_depths: QueueDepths,
    registry: Registry,
    settings: AnalyticsSettings,
}

impl AnalyticsApp {
    pub fn build(settings: AnalyticsSettings) -> anyhow::Result<Self> {
        let store = PgStore::connect_lazy(
            &settings.database_url,
            settings.pool_size,
            Duration::from_secs(5),
        )
        .map_err(|e| anyhow::anyhow!("DATABASE_URL: {e}"))?;
        let registry = Registry::new();
        let metrics = IngestMetrics::register(&registry)?;
        let health = Arc::new(Health::default());
        let queue_depths = QueueDepths::register(&registry)?;
        let consumer = Arc::new(Consumer {
            settings: settings.consumer.clone(),
            store: store.clone(),
            metrics,
            health: Arc::clone(&health),
        });
        Ok(Self {
            store,
            consumer,
            health,
            queue_depths,
            registry,
            settings,
        })
    }

    pub fn metrics(&self) -> &IngestMetrics {
        &self.consumer.metrics
    }

    /// Migrates (retrying while Postgres is down), then consumes and keeps partitions
    /// until `stop`.
    async fn work(self, stop: CancellationToken) {
        loop {
            match self.store.migrate().await {
                Ok(()) => break,
                Err(error) => {
                    tracing::warn!(%error, "schema not applied yet; retrying");
                    tokio::select! {
                        () = stop.cancelled() => return,
                        () = tokio::time::sleep(MIGRATE_RETRY) => {}
                    }
                }
            }
        }
        self.health.schema.store(true, Ordering::Relaxed);
        self.health.postgres.store(true, Ordering::Relaxed);
        tracing::info!("schema up to date");
        let upkeep = {
            let (app, stop) = (self.clone(), stop.clone());
            tokio::spawn(async move { app.upkeep(stop).await })
        };
        self.consumer.run(stop).await;
        let _ = upkeep.await;
    }

    async fn upkeep(&self, stop: CancellationToken) {
        loop {
            let now = OffsetDateTime::now_utc();
            match self
                .store
                .ensure_partitions(now.date(), self.settings.partitions_ahead_days)
                .await
            {
                Ok(created) if created > 0 => tracing::info!(created, "event partitions created"),
                Ok(_) => {}
                Err(error) => tracing::warn!(%error, "partition upkeep failed; retrying later"),
            }
            match self
                .store
                .apply_retention(now, self.settings.retention)
                .await
            {
                Ok(dropped) if dropped > 0 => {
                    tracing::info!(dropped, "expired event partitions dropped")
                }
                Ok(_) => {}
                Err(error) => tracing::warn!(%error, "retention upkeep failed; retrying later"),
            }
            tokio::select! {
                () = stop.cancelled() => return,
                () = tokio::time::sleep(UPKEEP_EVERY) => {}
            }
        }
    }
}

/// Serves the ops routes and ingests events until `shutdown`; held deliveries return
/// to the queue when the connection closes.
pub async fn run(
    listener: TcpListener,
    app: AnalyticsApp,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let stop = CancellationToken::new();
    let worker = tokio::spawn(app.clone().work(stop.clone()));
    let depths = {
        let (app, stop) = (app.clone(), stop.clone());
        tokio::spawn(async move {
            app.queue_depths
                .watch(&app.settings.consumer.amqp_url, stop)
                .await;
        })
    };
    let router = Router::new()
        .route("/metrics", get(metrics))
        .route(
            "/healthz",
            get(|| async { Json(serde_json::json!({"status": "ok"})) }),
        )
        .route("/readyz", get(readyz))
        .with_state(app);
    tracing::info!(addr = %listener.local_addr()?, "analytics listening");
    axum::serve(listener, router)
        .with_graceful_shutdown(shutdown)
        .await?;
    stop.cancel();
    let _ = worker.await;
    let _ = depths.await;
    tracing::info!("analytics stopped");
    Ok(())
}

async fn metrics(State(app): State<AnalyticsApp>) -> String {
    let mut buffer = Vec::new();
    let _ = TextEncoder::new().encode(&app.registry.gather(), &mut buffer);
    String::from_utf8(buffer).unwrap_or_default()
}

/// Ready once the schema is applied and while both backends answer.
async fn readyz(State(app): State<AnalyticsApp>) -> (StatusCode, Json<serde_json::Value>) {
    let state = |up: bool| if up { "up" } else { "down" };
    let (schema, postgres, broker) = (
        app.health.schema.load(Ordering::Relaxed),
        app.health.postgres.load(Ordering::Relaxed),
        app.health.broker.load(Ordering::Relaxed),
    );
    let ready = schema && postgres && broker;
    let body = serde_json::json!({
        "status": if ready { "ready" } else { "not ready" },
        "backends": {
            "postgres": {"kind": "postgres", "state": state(postgres), "schema": state(schema)},
            "queue": {"kind": "rabbitmq", "state": state(broker)},
        },
    });
    let status = if ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (status, Json(body))
}
