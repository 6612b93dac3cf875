//! Analytics end to end on real servers: gateways publish request events, workers
//! generation events, the `analytics` service writes them to PostgreSQL, and
//! `/narrative/analytics` reads them back. Postgres is stopped and restarted under
//! load; nothing may be lost or doubled.

use std::time::Duration;

use crate::services::{events_reach, fleet, fleet_on, requests};

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

    // A streamed answer is one more event, with its time to the first text.
    let streamed = gateway.stream_narrative(&crate::helpers::profile(0)).await;
    streamed.assert_well_formed();
    events_reach(&analytics, "request_events", 41, Duration::from_secs(20)).await;
    assert_eq!(
        analytics
            .count(
                "SELECT count(*) FROM request_events \
                 WHERE first_delta_us > 0 AND outcome IN ('hit_l1', 'hit_l2')"
            )
            .await,
        1
    );
    assert_eq!(
        analytics
            .count("SELECT count(*) FROM request_events WHERE first_delta_us IS NULL")
            .await,
        40,
        "answers that did not stream have none"
    );

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
