//! Pre-warming: the admin route, the popularity it reads, the LLM calls it makes, and
//! that what it warmed then hits. Embedded mode, and the distributed fleet after a
//! version bump.

use api_gateway::service::AnalyticsSource;
use llm_sim::SimConfig;
use serde_json::json;

use crate::helpers::{post_prewarm, profile, skewed_traffic, spawn_app, until_done, ADMIN};

#[tokio::test]
async fn admin_routes_need_the_admin_token() {
    let body = json!({"top": 1});
    let closed = spawn_app(SimConfig::default(), &[]).await;
    let refused = post_prewarm(&closed, Some(ADMIN), &body).await;
    assert_eq!(
        refused.status, 403,
        "no ADMIN_TOKEN configured: {}",
        refused.body
    );
    closed.shutdown().await;

    let app = spawn_app(SimConfig::default(), &[("ADMIN_TOKEN", ADMIN)]).await;
    let missing = post_prewarm(&app, None, &body).await;
    assert_eq!(missing.status, 401);
    assert_eq!(missing.header("www-authenticate"), "Bearer");
    assert_eq!(missing.body["error"]["code"], "unauthorized");
    assert_eq!(
        post_prewarm(&app, Some("admin-token-0123456788"), &body)
            .await
            .status,
        401
    );
    let progress = app.get("/narrative/prewarm/0123").await;
    assert_eq!(progress.status, 401, "following a run needs the token too");
    assert_eq!(post_prewarm(&app, Some(ADMIN), &body).await.status, 202);
    app.shutdown().await;
}

#[tokio::test]
async fn a_bad_prewarm_request_names_its_field() {
    let app = spawn_app(SimConfig::default(), &[("ADMIN_TOKEN", ADMIN)]).await;
    let mut bad_profile = profile(1);
    bad_profile["hdData"]["type"] = json!("Wizard");
    let cases = [
        (json!({"top": 0}), "top"),
        (json!({"top": 20000}), "top"),
        (json!({}), "top"),
        (json!({"top": 5, "profiles": [profile(1)]}), "top"),
        (json!({"profiles": []}), "profiles"),
        (
            json!({"profiles": [profile(0), bad_profile]}),
            "profiles[1].hdData.type",
        ),
        (json!({"top": 5, "rate": 100}), "body"),
    ];
    for (body, field) in cases {
        let answer = post_prewarm(&app, Some(ADMIN), &body).await;
        assert_eq!(answer.status, 400, "{body}: {}", answer.body);
        assert_eq!(
            answer.body["error"]["field"], field,
            "{body}: {}",
            answer.body
        );
    }
    assert_eq!(app.llm_calls(), 0);
    app.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn embedded_top_n_warms_the_most_requested_and_skips_the_cached() {
    let app = spawn_app(
        SimConfig {
            latency_ms: 5,
            ..SimConfig::default()
        },
        &[("ADMIN_TOKEN", ADMIN), ("PREWARM_RATE", "200")],
    )
    .await;
    // Skewed traffic that counts for popularity but stores nothing (no-store), so the
    // profiles are all still cold; then profile 1 alone is cached by a plain request.
    for n in skewed_traffic() {
        let answer = app
            .client
            .post(app.url("/narrative"))
            .header("cache-control", "no-store")
            .json(&profile(n))
            .send()
            .await
            .expect("request");
        assert_eq!(answer.status(), 200);
    }
    assert_eq!(
        app.post_narrative(&profile(1)).await.body["source"],
        "generated"
    );
    let before = app.llm_calls();

    let started = post_prewarm(&app, Some(ADMIN), &json!({"top": 10})).await;
    assert_eq!(started.status, 202, "{}", started.body);
    assert_eq!(started.body["queued"], 9, "{}", started.body);
    assert_eq!(started.body["skipped"], 1, "profile 1 is cached");
    let location = started.body["location"]
        .as_str()
        .expect("location")
        .to_owned();
    assert_eq!(started.header("location"), location);
    let done = until_done(&app, &location).await;
    assert_eq!(done["sent"], 9, "{done}");
    assert_eq!(done["failed"], 0, "{done}");
    assert_eq!(
        app.llm_calls() - before,
        9,
        "one LLM call per profile warmed"
    );

    for n in 0..10 {
        let answer = app.post_narrative(&profile(n)).await;
        assert_eq!(answer.header("x-cache"), "HIT", "profile {n} was warmed");
    }
    assert_eq!(
        app.post_narrative(&profile(10)).await.header("x-cache"),
        "MISS"
    );

    let AnalyticsSource::Memory(memory) = &app.state.analytics else {
        panic!("embedded mode keeps analytics in memory");
    };
    let actions: Vec<String> = memory.audit_log().into_iter().map(|r| r.action).collect();
    assert_eq!(actions, ["startup", "prewarm", "prewarm_finished"]);
    app.shutdown().await;
}
