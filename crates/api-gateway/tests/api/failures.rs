use futures::future::join_all;
use llm_sim::SimConfig;

use crate::helpers::{profile, spawn_app};

/// The LLM failing every call: every answer is a 200 template narrative and nothing is
/// stored; once it heals, the same profile is generated and cached.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_llm_gives_fallbacks_and_stores_nothing_until_it_heals() {
    let failing = SimConfig {
        latency_ms: 5,
        failure_rate: 1.0,
        failure_status: 503,
        ..SimConfig::default()
    };
    let app = spawn_app(failing, &[]).await;
    let body = profile(8);

    let replies = join_all((0..50).map(|_| app.post_narrative(&body))).await;
    for reply in &replies {
        assert_eq!(reply.status, 200);
        assert_eq!(reply.source(), "fallback");
        assert_eq!(reply.header("x-cache"), "FALLBACK");
        assert_eq!(
            reply.header("cache-status"),
            "narrative-cache; fwd=miss; detail=fallback"
        );
        assert_eq!(reply.body["model"], "template@1");
        assert!(reply.body["narrative"]
            .as_str()
            .is_some_and(|n| n.contains("Pleiades")));
    }
    app.state.service.settled(&replies[0].key()).await;
    assert_eq!(app.stats().await["keys"], 0, "a fallback is never stored");
    assert_eq!(
        app.post_narrative(&body).await.source(),
        "fallback",
        "still failing, still not cached"
    );

    app.sim.sim.set_config(SimConfig {
        latency_ms: 5,
        ..SimConfig::default()
    });
    let healed = app.post_narrative(&body).await;
    assert_eq!(healed.source(), "generated");
    assert_eq!(healed.body["model"], "gpt-4o-mini");
    assert_eq!(app.post_narrative(&body).await.source(), "cache");
    assert_eq!(app.stats().await["keys"], 1);
}

/// Past GENERATION_WAIT_MS the request answers the template at once, and the
/// generation it started is still stored for the next request.
#[tokio::test]
async fn a_slow_llm_gets_a_fallback_answer_and_the_result_is_cached_later() {
    let app = spawn_app(
        SimConfig {
            latency_ms: 600,
            ..SimConfig::default()
        },
        &[("GENERATION_WAIT_MS", "100")],
    )
    .await;
    let body = profile(9);
    let first = app.post_narrative(&body).await;
    assert_eq!(first.source(), "fallback");
    assert_eq!(
        app.stats().await["inFlight"],
        1,
        "the generation keeps running"
    );

    app.state.service.settled(&first.key()).await;
    let next = app.post_narrative(&body).await;
    assert_eq!(next.source(), "cache");
    assert_eq!(next.body["model"], "gpt-4o-mini");
    assert_eq!(app.llm_calls(), 1);
}

/// Truncated output (`finish_reason: length`) is never stored.
#[tokio::test]
async fn truncated_output_is_not_stored() {
    let app = spawn_app(
        SimConfig {
            latency_ms: 5,
            finish_reason: "length".into(),
            ..SimConfig::default()
        },
        &[],
    )
    .await;
    let reply = app.post_narrative(&profile(10)).await;
    assert_eq!(reply.source(), "fallback");
    app.state.service.settled(&reply.key()).await;
    assert_eq!(app.stats().await["keys"], 0);
}

/// Shutdown lets a generation in flight finish and be stored before the server stops.
#[tokio::test]
async fn shutdown_drains_generations_in_flight() {
    let app = spawn_app(
        SimConfig {
            latency_ms: 300,
            ..SimConfig::default()
        },
        &[("GENERATION_WAIT_MS", "20")],
    )
    .await;
    let reply = app.post_narrative(&profile(11)).await;
    assert_eq!(reply.source(), "fallback");
    let service = std::sync::Arc::clone(&app.state.service);
    app.shutdown().await;
    let stats = service.stats().await;
    assert_eq!(
        (stats.store.entries, stats.in_flight),
        (1, 0),
        "the generation finished and was stored before exit"
    );
}
