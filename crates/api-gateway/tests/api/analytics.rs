//! Analytics without a fleet: a full event buffer drops and counts, and requests are
//! answered all the same. (With workers and Postgres: the `system-tests` crate.)

use std::time::Duration;

use llm_sim::SimConfig;

use crate::helpers::{profile, spawn_app_with, unique_version};

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
