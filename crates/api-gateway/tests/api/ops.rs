use llm_sim::SimConfig;

use crate::helpers::{profile, spawn_app};

#[tokio::test]
async fn health_readiness_and_metrics() {
    let app = spawn_app(
        SimConfig {
            latency_ms: 5,
            ..SimConfig::default()
        },
        &[],
    )
    .await;
    assert_eq!(app.get("/healthz").await.status, 200);
    let ready = app.get("/readyz").await;
    assert_eq!(ready.status, 200);
    assert_eq!(ready.body["backends"]["cache"]["state"], "up");
    assert_eq!(ready.body["generator"]["kind"], "llm");

    app.post_narrative(&profile(1)).await;
    app.post_narrative(&profile(1)).await;
    let mut bad = profile(1);
    bad["extra"] = 1.into();
    app.post_narrative(&bad).await;

    let text = app
        .client
        .get(app.url("/metrics"))
        .send()
        .await
        .expect("send")
        .text()
        .await
        .expect("text");
    for line in [
        "narrative_requests_total{outcome=\"generated\"} 1",
        "narrative_requests_total{outcome=\"hit\"} 1",
        "narrative_rejected_total{code=\"invalid_profile\"} 1",
        "narrative_generations_total{result=\"ok\"} 1",
        "narrative_cache_entries 1",
    ] {
        assert!(
            text.lines().any(|l| l == line),
            "missing {line:?} in\n{text}"
        );
    }
    assert!(text.contains("narrative_request_duration_seconds_bucket"));
    assert!(!text.contains("user-1"), "no user ids in metrics");
}
