use futures::future::join_all;
use llm_sim::SimConfig;

use crate::helpers::{assert_served_without_fallback, profile, spawn_app};

/// 500 concurrent identical misses at one gateway: one completion at the simulator,
/// every answer 200 and generated (the 1 s generation fits the 4.5 s wait).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn five_hundred_identical_misses_make_one_llm_call() {
    let app = spawn_app(
        SimConfig {
            latency_ms: 1000,
            ..SimConfig::default()
        },
        &[],
    )
    .await;
    let body = profile(7);
    let replies = join_all((0..500).map(|_| app.post_narrative(&body))).await;

    assert_eq!(
        app.llm_calls(),
        1,
        "exactly one completion reached the simulator"
    );
    assert_served_without_fallback(&replies);
    let collapsed = replies
        .iter()
        .filter(|r| r.header("cache-status").ends_with("collapsed"))
        .count();
    assert!(collapsed >= 1, "followers say they were collapsed");
    let first = &replies[0].body["narrative"];
    assert!(
        replies.iter().all(|r| &r.body["narrative"] == first),
        "one value for one key"
    );
    assert_eq!(app.post_narrative(&body).await.source(), "cache");
    assert_eq!(app.llm_calls(), 1);
}

/// Different keys do not wait on each other: 20 profiles, 10 requests each, 20 calls.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn distinct_keys_are_generated_independently() {
    let app = spawn_app(
        SimConfig {
            latency_ms: 200,
            ..SimConfig::default()
        },
        &[],
    )
    .await;
    let bodies: Vec<_> = (0..20).map(profile).collect();
    let replies = join_all(
        bodies
            .iter()
            .flat_map(|b| std::iter::repeat_n(b, 10))
            .map(|b| app.post_narrative(b)),
    )
    .await;
    assert_served_without_fallback(&replies);
    assert_eq!(app.llm_calls(), 20);
    assert_eq!(app.stats().await["keys"], 20);
}
