//! Analytics end to end on real servers: gateways publish request events, workers
//! generation events, the `analytics` service writes them to PostgreSQL, and
//! `/narrative/analytics` reads them back. Postgres is stopped and restarted under
//! load; nothing may be lost or doubled.

use std::time::Duration;

use analytics::app::{run as run_analytics, AnalyticsApp};
use analytics::settings::AnalyticsSettings;
use cache_core::config::Vars;
use futures::future::join_all;
use llm_sim::SimConfig;
use tokio::sync::oneshot;

use crate::helpers::{profile, spawn_app_with, unique_version, TestApp};
use crate::workers::TestWorker;

pub(crate) struct TestAnalytics {
    app: AnalyticsApp,
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
async fn fleet_on(
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
async fn requests(app: &TestApp, first: u32, count: u32) {
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn k_requests_become_k_events_and_the_endpoint_agrees() {
    let database = test_kit::postgres().database("analytics_k");
    // Its own Redis: unique users are a HyperLogLog per day, shared by every test of
    // this binary on the common server.
    let redis = test_kit::RedisServer::start();
    let (gateway, worker, analytics) = fleet_on("analytics-k", &database, &redis.url).await;

    // 20 profiles (misses the worker generates), then the same 20 again (hits).
    requests(&gateway, 0, 20).await;
    requests(&gateway, 0, 20).await;
    events_reach(&analytics, "request_events", 40, Duration::from_secs(20)).await;
    events_reach(&analytics, "generation_events", 20, Duration::from_secs(20)).await;
    // Exactly K: nothing more arrives.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        analytics.count("SELECT count(*) FROM request_events").await,
        40
    );
    assert_eq!(
        analytics
            .count("SELECT count(DISTINCT profile_digest) FROM request_events")
            .await,
        20
    );
    assert_eq!(
        analytics
            .count("SELECT count(*) FROM request_events WHERE user_hash LIKE 'user-%'")
            .await,
        0,
        "user ids are stored only as keyed hashes"
    );

    let body = gateway.get("/narrative/analytics").await.body;
    assert_eq!(body["source"], "postgres", "{body}");
    assert_eq!(body["partial"], false);
    assert_eq!(body["totalRequests"], 40, "{body}");
    let (hits, misses) = (
        body["cacheHits"].as_u64().unwrap_or(0),
        body["cacheMisses"].as_u64().unwrap_or(0),
    );
    assert_eq!(hits + misses, 40, "{body}");
    assert!(hits >= 20, "the second round hits: {body}");
    assert_eq!(body["topSystems"][0]["system"], "Pleiades");
    assert_eq!(body["topSystems"][0]["count"], 40);
    assert_eq!(body["generations"], 20, "{body}");
    assert!(
        body["estimatedCost"].as_f64().is_some_and(|c| c > 0.0),
        "{body}"
    );
    assert!(
        body["costSaved"].as_f64().is_some_and(|c| c > 0.0),
        "{body}"
    );
    let users = body["uniqueUsers"].as_u64().expect("uniqueUsers");
    assert!(
        (19..=21).contains(&users),
        "20 users, counted by a HyperLogLog: {users}"
    );
    assert!(!body["hitRateByHour"]
        .as_array()
        .expect("hitRateByHour")
        .is_empty());

    // A range before any of it holds nothing; a bad range is a 400 naming the field.
    let empty = gateway
        .get("/narrative/analytics?from=2020-01-01&to=2020-01-02")
        .await
        .body;
    assert_eq!(empty["totalRequests"], 0, "{empty}");
    let bad = gateway.get("/narrative/analytics?from=yesterday").await;
    assert_eq!(bad.status, 400);
    assert!(bad.body.to_string().contains("from"), "{}", bad.body);

    gateway.shutdown().await;
    worker.stop().await;
    analytics.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_postgres_down_events_wait_and_none_is_lost_or_doubled() {
    let mut postgres = test_kit::PostgresServer::start();
    let database = postgres.database("analytics_outage");
    let (gateway, worker, analytics) = fleet("analytics-outage", &database).await;

    requests(&gateway, 0, 10).await;
    events_reach(&analytics, "request_events", 10, Duration::from_secs(20)).await;

    tokio::task::block_in_place(|| postgres.stop());
    requests(&gateway, 100, 15).await;
    // Still answered, from Redis's counters, and saying so.
    let partial = gateway.get("/narrative/analytics").await;
    assert_eq!(partial.status, 200);
    assert_eq!(partial.body["partial"], true, "{}", partial.body);
    assert_eq!(partial.body["source"], "redis");
    // The consumer holds what it received unacknowledged; the queue keeps the rest.
    test_kit::eventually("the consumer to retry", Duration::from_secs(10), || async {
        analytics.app.metrics().insert_failures.get() > 0
    })
    .await;

    tokio::task::block_in_place(|| postgres.restart());
    events_reach(&analytics, "request_events", 25, Duration::from_secs(30)).await;
    assert_eq!(
        analytics
            .count("SELECT count(DISTINCT id) FROM request_events")
            .await,
        25,
        "no event twice"
    );
    assert_eq!(
        analytics
            .count("SELECT sum(requests)::int8 FROM request_rollup_minute")
            .await,
        25,
        "the rollups count each event once"
    );
    let body = gateway.get("/narrative/analytics").await.body;
    assert_eq!(body["totalRequests"], 25, "{body}");
    assert_eq!(body["partial"], false);

    gateway.shutdown().await;
    worker.stop().await;
    analytics.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_event_buffer_drops_and_counts_without_failing_requests() {
    // Nothing listens on this port: events cannot be published, jobs neither (the
    // gateway then generates in process).
    let dead_broker = format!("amqp://guest:guest@127.0.0.1:{}/%2f", test_kit::free_port());
    let version = unique_version("event-buffer");
    let sim = llm_sim::spawn(SimConfig {
        latency_ms: 5,
        ..SimConfig::default()
    })
    .await
    .expect("simulator");
    let gateway = spawn_app_with(
        sim,
        &[
            ("REDIS_URL", test_kit::redis().url.as_str()),
            ("AMQP_URL", dead_broker.as_str()),
            ("DATABASE_URL", "postgres://nobody@127.0.0.1:1/none"),
            ("ENGINE_VERSION", version.as_str()),
            ("EVENT_BUFFER", "5"),
            ("AMQP_CONFIRM_TIMEOUT_MS", "200"),
        ],
    )
    .await;
    let publisher = gateway.state.events.clone().expect("events go to RabbitMQ");

    // The first request's events are taken into a batch the publisher keeps retrying...
    assert_eq!(gateway.post_narrative(&profile(0)).await.status, 200);
    test_kit::eventually("a failed publish", Duration::from_secs(5), || async {
        let metrics = gateway.get("/metrics").await.body;
        let metrics = metrics.as_str().unwrap_or_default().to_owned();
        !metrics.contains("narrative_event_publish_failures_total 0")
    })
    .await;
    assert_eq!(publisher.buffered(), 0);
    // ...so of the next 30 requests' 60 events (a request event each, and a generation
    // event, as the gateway generates in process without a broker), 5 fit in the
    // buffer and 55 are dropped, and counted.
    for n in 1..=30 {
        assert_eq!(gateway.post_narrative(&profile(n)).await.status, 200);
    }
    assert_eq!(publisher.buffered(), 5);
    let metrics = gateway.get("/metrics").await.body;
    let metrics = metrics.as_str().unwrap_or_default();
    assert!(
        metrics.contains("narrative_events_dropped_total{reason=\"buffer_full\"} 55"),
        "{}",
        metrics
            .lines()
            .filter(|l| l.contains("events_"))
            .collect::<Vec<_>>()
            .join("\n")
    );
    gateway.shutdown().await;
}
