//! The other services of a fleet, in process beside the gateway: a generator-worker
//! and the analytics service, each on the test's own vhost.

use std::time::Duration;

use analytics::app::{run as run_analytics, AnalyticsApp};
use analytics::settings::AnalyticsSettings;
use cache_core::config::Vars;
use futures::future::join_all;
use generator_worker::app::{run as run_worker, WorkerApp};
use generator_worker::settings::WorkerSettings;
use llm_sim::{SimConfig, SimHandle};
use tokio::sync::oneshot;

use crate::helpers::{profile, spawn_app_with, unique_version, TestApp};

pub(crate) struct TestAnalytics {
    pub(crate) app: AnalyticsApp,
    /// The broker vhost the fleet shares.
    pub(crate) amqp: String,
    stop: Option<oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<std::io::Result<()>>,
}

impl TestAnalytics {
    pub(crate) async fn start(database_url: &str, amqp: &str) -> Self {
        let vars = Vars::from_pairs([("DATABASE_URL", database_url), ("AMQP_URL", amqp)]);
        let app = AnalyticsApp::build(AnalyticsSettings::from_vars(&vars).expect("settings"))
            .expect("analytics");
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(run_analytics(listener, app.clone(), async {
            let _ = stopped.await;
        }));
        Self {
            app,
            amqp: amqp.to_owned(),
            stop: Some(stop),
            task,
        }
    }

    pub(crate) async fn count(&self, sql: &str) -> i64 {
        sqlx::query_scalar(sql)
            .fetch_one(self.app.store.pool())
            .await
            .unwrap_or_else(|e| panic!("{sql}: {e}"))
    }

    pub(crate) async fn stop(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        let _ = (&mut self.task).await;
    }
}

/// A gateway with Redis, RabbitMQ and Postgres, and one worker.
pub(crate) async fn fleet(label: &str, database_url: &str) -> (TestApp, TestWorker, TestAnalytics) {
    fleet_on(label, database_url, &test_kit::redis().url).await
}

/// The same on a Redis of the caller's choosing.
pub(crate) async fn fleet_on(
    label: &str,
    database_url: &str,
    redis: &str,
) -> (TestApp, TestWorker, TestAnalytics) {
    let amqp = test_kit::rabbitmq().vhost(label);
    let analytics = TestAnalytics::start(database_url, &amqp).await;
    let sim = llm_sim::spawn(SimConfig {
        latency_ms: 20,
        ..SimConfig::default()
    })
    .await
    .expect("simulator");
    let worker = TestWorker::start(&amqp, &sim, &[("REDIS_URL", redis)]).await;
    let version = unique_version(label);
    let gateway = spawn_app_with(
        sim,
        &[
            ("REDIS_URL", redis),
            ("AMQP_URL", amqp.as_str()),
            ("DATABASE_URL", database_url),
            ("ENGINE_VERSION", version.as_str()),
        ],
    )
    .await;
    (gateway, worker, analytics)
}

/// `count` requests for profiles `first..first + count`, all at once.
pub(crate) async fn requests(app: &TestApp, first: u32, count: u32) {
    let replies =
        join_all((first..first + count).map(|n| app.post_narrative_owned(profile(n)))).await;
    assert!(
        replies.iter().all(|r| r.status == 200),
        "every request is answered: {:?}",
        replies.iter().map(|r| r.status).collect::<Vec<_>>()
    );
}

pub(crate) async fn events_reach(
    analytics: &TestAnalytics,
    table: &str,
    expected: i64,
    limit: Duration,
) {
    let sql = format!("SELECT count(*) FROM {table}");
    test_kit::eventually(&format!("{expected} rows in {table}"), limit, || async {
        analytics.count(&sql).await == expected
    })
    .await;
}

pub(crate) struct TestWorker {
    pub(crate) app: WorkerApp,
    /// Where its `/metrics`, `/healthz` and `/readyz` are served.
    pub(crate) ops: String,
    stop: Option<oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<std::io::Result<()>>,
}

impl TestWorker {
    pub(crate) async fn start(amqp: &str, sim: &SimHandle, extra: &[(&str, &str)]) -> Self {
        let base = sim.base_url();
        let mut pairs = vec![
            ("REDIS_URL", test_kit::redis().url.as_str()),
            ("AMQP_URL", amqp),
            ("LLM_BASE_URL", base.as_str()),
            ("LLM_API_KEY", "sk-worker"),
            ("LLM_BACKOFF_BASE", "5ms"),
            ("LLM_BACKOFF_MAX", "50ms"),
            ("LOCK_TTL", "2s"),
        ];
        pairs.extend_from_slice(extra);
        let app = WorkerApp::build(
            WorkerSettings::from_vars(&Vars::from_pairs(pairs)).expect("settings"),
        )
        .expect("worker");
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let ops = format!("http://{}", listener.local_addr().expect("addr"));
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(run_worker(listener, app.clone(), async {
            let _ = stopped.await;
        }));
        for _ in 0..500 {
            if app.consuming.get() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert!(app.consuming.get(), "the worker attaches to the queue");
        Self {
            app,
            ops,
            stop: Some(stop),
            task,
        }
    }

    pub(crate) fn jobs(&self, outcome: &str) -> u64 {
        self.app
            .worker
            .metrics
            .jobs
            .with_label_values(&[outcome])
            .get()
    }

    /// Graceful stop: stop consuming, finish jobs in flight.
    pub(crate) async fn stop(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        let _ = (&mut self.task).await;
    }
}
