use llm_sim::SimConfig;

use crate::helpers::{profile, spawn_app};

fn fast() -> SimConfig {
    SimConfig {
        latency_ms: 20,
        ..SimConfig::default()
    }
}

#[tokio::test]
async fn first_request_generates_and_the_second_hits() {
    let app = spawn_app(fast(), &[]).await;

    let first = app.post_narrative(&profile(1)).await;
    assert_eq!(first.status, 200, "{:?}", first.body);
    assert_eq!(first.source(), "generated");
    assert_eq!(first.header("x-cache"), "MISS");
    assert_eq!(
        first.header("cache-status"),
        "narrative-cache; fwd=miss; stored"
    );
    assert_eq!(first.header("cache-control"), "private");
    assert_eq!(first.body["model"], "gpt-4o-mini");
    assert_eq!(first.body["engineVersion"], "narrative@1.0.0");
    assert!(first.body["narrative"]
        .as_str()
        .is_some_and(|n| n.contains("Pleiades")));
    let generated_at = first.body["generatedAt"].as_str().expect("generatedAt");
    assert!(time::OffsetDateTime::parse(
        generated_at,
        &time::format_description::well_known::Rfc3339
    )
    .is_ok());
    assert!(generated_at.ends_with('Z'), "UTC: {generated_at}");

    let second = app.post_narrative(&profile(1)).await;
    assert_eq!(second.source(), "cache");
    assert_eq!(second.header("x-cache"), "HIT");
    assert!(
        second
            .header("cache-status")
            .starts_with("narrative-cache; hit; ttl="),
        "{}",
        second.header("cache-status")
    );
    assert_eq!(second.body["narrative"], first.body["narrative"]);
    assert_eq!(second.body["cacheKey"], first.body["cacheKey"]);
    assert_eq!(second.body["generatedAt"], first.body["generatedAt"]);
    assert_eq!(app.llm_calls(), 1);
    app.shutdown().await;
}

#[tokio::test]
async fn the_user_id_never_changes_the_key_nor_appears_in_the_response() {
    let app = spawn_app(fast(), &[]).await;
    let mut other_user = profile(2);
    other_user["userId"] = "somebody-else".into();
    let a = app.post_narrative(&profile(2)).await;
    let b = app.post_narrative(&other_user).await;
    assert_eq!(a.body["cacheKey"], b.body["cacheKey"]);
    assert_eq!(b.source(), "cache");
    assert!(!a.body.to_string().contains("user-2"));
    assert_eq!(app.llm_calls(), 1);
}

#[tokio::test]
async fn explain_key_returns_the_canonical_profile_and_generates_nothing() {
    let app = spawn_app(fast(), &[]).await;
    let mut messy = profile(3);
    messy["primary"] = "  pleiades ".into();
    messy["hdData"]["type"] = "GENERATOR".into();
    let explained = app.post_json("/narrative/key", &messy).await;
    assert_eq!(explained.status, 200);
    assert_eq!(explained.body["canonical"]["primary"], "Pleiades");
    assert_eq!(explained.body["canonical"]["hdData"]["type"], "Generator");
    assert!(
        explained.body["canonical"].get("userId").is_none(),
        "the user id is not part of the key"
    );
    assert_eq!(app.llm_calls(), 0);

    let answered = app.post_narrative(&profile(3)).await;
    assert_eq!(
        answered.body["cacheKey"], explained.body["cacheKey"],
        "same meaning, same key"
    );
}

#[tokio::test]
async fn get_by_key_answers_200_202_or_404() {
    let app = spawn_app(
        SimConfig {
            latency_ms: 400,
            ..SimConfig::default()
        },
        &[("GENERATION_WAIT_MS", "50")],
    )
    .await;
    let fallback = app.post_narrative(&profile(4)).await;
    assert_eq!(fallback.source(), "fallback");
    let key = fallback.key();
    let path = format!("/narrative/{}", key.to_path_segment());

    let pending = app.get(&path).await;
    assert_eq!(pending.status, 202);
    assert_eq!(pending.body["status"], "pending");
    assert_eq!(pending.header("location"), path);

    app.state.service.settled(&key).await;
    let done = app.get(&path).await;
    assert_eq!(done.status, 200);
    assert_eq!(done.source(), "cache");
    assert_eq!(done.body["cacheKey"], key.as_str());

    let unknown = format!(
        "/narrative/narr:narrative@1.0.0:{}:%7B{}%7D",
        key.as_str().split(':').nth(2).unwrap_or(""),
        "0".repeat(64)
    );
    let missing = app.get(&unknown).await;
    assert_eq!(missing.status, 404);
    assert_eq!(missing.body["error"]["code"], "not_found");
}

#[tokio::test]
async fn stats_report_the_seed_fields_and_count_hits_and_misses() {
    let app = spawn_app(fast(), &[]).await;
    for n in 0..3 {
        app.post_narrative(&profile(n)).await;
    }
    app.post_narrative(&profile(0)).await;
    let stats = app.stats().await;
    assert_eq!(stats["keys"], 3);
    assert_eq!(stats["entriesByVersion"]["narrative@1.0.0"], 3);
    assert_eq!(stats["hitRate"], 0.25);
    assert_eq!(stats["engineVersion"], "narrative@1.0.0");
    assert_eq!(stats["promptHash"].as_str().map(str::len), Some(12));
    assert_eq!(stats["ttlDays"], 30.0);
    assert!(
        stats["memoryUsed"]
            .as_str()
            .is_some_and(|m| m.ends_with('K') || m.ends_with('B')),
        "{stats}"
    );

    let analytics = app.get("/narrative/analytics").await.body;
    assert_eq!(analytics["totalRequests"], 4);
    assert_eq!(analytics["cacheHits"], 1);
    assert_eq!(analytics["cacheMisses"], 3);
    assert_eq!(analytics["topSystems"][0]["system"], "Pleiades");
    assert_eq!(analytics["topSystems"][0]["count"], 4);
    assert!(analytics["estimatedCost"].as_f64().is_some_and(|c| c > 0.0));
    let cost_saved = analytics["costSaved"].as_f64().expect("costSaved");
    assert!(cost_saved > 0.0 && cost_saved < analytics["estimatedCost"].as_f64().unwrap_or(0.0));
}

#[tokio::test]
async fn changing_the_engine_version_moves_to_new_keys() {
    let v1 = spawn_app(fast(), &[]).await;
    let v2 = spawn_app(fast(), &[("ENGINE_VERSION", "narrative@2.0.0")]).await;
    let a = v1.post_narrative(&profile(5)).await.key();
    let b = v2.post_narrative(&profile(5)).await.key();
    assert_ne!(a, b);
    assert!(b.as_str().starts_with("narr:narrative@2.0.0:"));
    assert_eq!(
        a.digest(),
        b.digest(),
        "same secret and profile, same digest; the version segment moves the key"
    );
}

#[tokio::test]
async fn without_an_llm_key_the_template_engine_generates_and_is_cached() {
    let app = spawn_app(fast(), &[("LLM_API_KEY", "")]).await;
    let first = app.post_narrative(&profile(6)).await;
    assert_eq!(first.source(), "generated");
    assert_eq!(first.body["model"], "template@1");
    assert!(first.body["narrative"]
        .as_str()
        .is_some_and(|n| n.split_whitespace().count() > 100));
    assert_eq!(app.post_narrative(&profile(6)).await.source(), "cache");
    assert_eq!(app.llm_calls(), 0);
}
