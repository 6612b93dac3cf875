//! LLM guardrails: the daily budget (in process, and shared through Redis by the
//! fleet) and the cap on concurrent LLM calls.

use futures::future::join_all;
use llm_sim::SimConfig;

use crate::helpers::{profile, spawn_app, spawn_app_with, unique_version, TestApp};

fn metric(metrics: &str, name: &str) -> f64 {
    metrics
        .lines()
        .find_map(|line| line.strip_prefix(name)?.trim().parse().ok())
        .unwrap_or(f64::NAN)
}

async fn metrics(app: &TestApp) -> String {
    app.get("/metrics")
        .await
        .body
        .as_str()
        .unwrap_or_default()
        .to_owned()
}

/// What one simulated completion costs at the default prices.
async fn cost_of_one_call() -> f64 {
    let app = spawn_app(SimConfig::default(), &[]).await;
    assert_eq!(app.post_narrative(&profile(0)).await.source(), "generated");
    let cost = app.get("/narrative/analytics").await.body["estimatedCost"]
        .as_f64()
        .expect("estimatedCost");
    app.shutdown().await;
    assert!(cost > 0.0);
    cost
}

#[tokio::test]
async fn once_the_daily_budget_is_spent_misses_get_the_template() {
    let budget = format!("{}", cost_of_one_call().await * 2.5);
    let app = spawn_app(
        SimConfig::default(),
        &[("LLM_DAILY_BUDGET_USD", budget.as_str())],
    )
    .await;
    let mut sources = Vec::new();
    for n in 1..=8 {
        sources.push(app.post_narrative(&profile(n)).await.source().to_owned());
    }
    let generated = sources.iter().take_while(|s| *s == "generated").count();
    assert!(
        generated >= 2,
        "the budget pays for the first calls: {sources:?}"
    );
    assert!(
        sources[generated..].iter().all(|s| s == "fallback"),
        "then every miss is the template: {sources:?}"
    );
    assert_eq!(app.llm_calls(), generated as u64, "no call past the budget");
    let text = metrics(&app).await;
    assert_eq!(
        metric(&text, "llm_budget_exhausted"),
        1.0,
        "the alert metric is raised"
    );
    assert_eq!(
        metric(&text, "llm_budget_refused_total"),
        (8 - generated) as f64
    );
    app.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_budget_is_shared_by_the_fleet_through_redis() {
    let budget = format!("{}", cost_of_one_call().await * 1.5);
    // Its own Redis: the day's spend is one key for the whole fleet.
    let redis = test_kit::RedisServer::start();
    let version = unique_version("budget-fleet");
    let sim = llm_sim::spawn(SimConfig::default()).await.expect("sim");
    let vars = [
        ("REDIS_URL", redis.url.as_str()),
        ("ENGINE_VERSION", version.as_str()),
        ("LLM_DAILY_BUDGET_USD", budget.as_str()),
    ];
    let a = spawn_app_with(sim.clone(), &vars).await;
    let b = spawn_app_with(sim.clone(), &vars).await;
    assert_eq!(a.post_narrative(&profile(1)).await.source(), "generated");
    assert_eq!(a.post_narrative(&profile(2)).await.source(), "generated");
    // Two calls spent 2 of the 1.5 calls' budget: b, which made none, refuses too.
    assert_eq!(b.post_narrative(&profile(3)).await.source(), "fallback");
    assert_eq!(a.post_narrative(&profile(4)).await.source(), "fallback");
    assert_eq!(sim.sim.stats().requests, 2);
    a.shutdown().await;
    b.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_more_than_the_cap_of_llm_calls_run_at_once() {
    let app = spawn_app(
        SimConfig {
            latency_ms: 200,
            ..SimConfig::default()
        },
        &[
            ("LLM_MAX_CONCURRENCY", "2"),
            ("GENERATION_WAIT_MS", "20000"),
        ],
    )
    .await;
    let replies = join_all((10..18).map(|n| app.post_narrative_owned(profile(n)))).await;
    assert!(replies.iter().all(|r| r.source() == "generated"));
    let stats = app.sim.sim.stats();
    assert_eq!(stats.requests, 8);
    // Without the cap all eight would be in flight at once.
    assert!(
        (1..=2).contains(&stats.max_in_flight),
        "eight misses at once, at most two calls at a time: {}",
        stats.max_in_flight
    );
    app.shutdown().await;
}
