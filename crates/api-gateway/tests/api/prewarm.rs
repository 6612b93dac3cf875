//! Pre-warming: the admin route, the popularity it reads, the LLM calls it makes, and
//! that what it warmed then hits. Embedded mode, and the distributed fleet after a
//! version bump.

use std::time::Duration;

use api_gateway::service::AnalyticsSource;
use llm_sim::SimConfig;
use serde_json::{json, Value};

use crate::analytics::{events_reach, fleet};
use crate::helpers::{profile, reply, spawn_app, spawn_app_with, unique_version, Reply, TestApp};

const TOKEN: &str = "admin-token-0123456789";

async fn post_prewarm(app: &TestApp, token: Option<&str>, body: &Value) -> Reply {
    let mut request = app.client.post(app.url("/narrative/prewarm")).json(body);
    if let Some(token) = token {
        request = request.bearer_auth(token);
    }
    reply(request.send().await.expect("request")).await
}

/// Follows a run until the gateway says it is done; returns its last progress.
async fn until_done(app: &TestApp, location: &str) -> Value {
    let progress = || async {
        let request = app.client.get(app.url(location)).bearer_auth(TOKEN);
        reply(request.send().await.expect("request")).await.body
    };
    test_kit::eventually(
        "the prewarm run to finish",
        Duration::from_secs(30),
        || async { progress().await["state"] == "done" },
    )
    .await;
    progress().await
}

/// Requests for profiles 0..30, profile n `30 - n` times: 0 is the most popular.
fn skewed_traffic() -> Vec<u32> {
    (0..30u32)
        .flat_map(|n| std::iter::repeat_n(n, (30 - n) as usize))
        .collect()
}

#[tokio::test]
async fn admin_routes_need_the_admin_token() {
    let body = json!({"top": 1});
    let closed = spawn_app(SimConfig::default(), &[]).await;
    let refused = post_prewarm(&closed, Some(TOKEN), &body).await;
    assert_eq!(
        refused.status, 403,
        "no ADMIN_TOKEN configured: {}",
        refused.body
    );
    closed.shutdown().await;

    let app = spawn_app(SimConfig::default(), &[("ADMIN_TOKEN", TOKEN)]).await;
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
    assert_eq!(post_prewarm(&app, Some(TOKEN), &body).await.status, 202);
    app.shutdown().await;
}

#[tokio::test]
async fn a_bad_prewarm_request_names_its_field() {
    let app = spawn_app(SimConfig::default(), &[("ADMIN_TOKEN", TOKEN)]).await;
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
        let answer = post_prewarm(&app, Some(TOKEN), &body).await;
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
        &[("ADMIN_TOKEN", TOKEN), ("PREWARM_RATE", "200")],
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

    let started = post_prewarm(&app, Some(TOKEN), &json!({"top": 10})).await;
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_a_version_bump_a_top_10_prewarm_calls_the_llm_10_times_and_then_hits() {
    let database = test_kit::postgres().database("prewarm_bump");
    let (v1, worker, analytics) = fleet("prewarm-bump", &database).await;
    let traffic = skewed_traffic();
    for n in &traffic {
        assert_eq!(v1.post_narrative(&profile(*n)).await.status, 200);
    }
    events_reach(
        &analytics,
        "request_events",
        traffic.len() as i64,
        Duration::from_secs(20),
    )
    .await;
    assert_eq!(v1.llm_calls(), 30, "one generation per profile under v1");

    // The same fleet restarted as v2: every key moves, popularity stays.
    let v2_version = unique_version("prewarm-bump-v2");
    let v2 = spawn_app_with(
        v1.sim.clone(),
        &[
            ("REDIS_URL", test_kit::redis().url.as_str()),
            ("AMQP_URL", analytics.amqp.as_str()),
            ("DATABASE_URL", database.as_str()),
            ("ENGINE_VERSION", v2_version.as_str()),
            ("ADMIN_TOKEN", TOKEN),
            ("PREWARM_RATE", "100"),
        ],
    )
    .await;
    let started = post_prewarm(&v2, Some(TOKEN), &json!({"top": 10})).await;
    assert_eq!(started.status, 202, "{}", started.body);
    assert_eq!(started.body["queued"], 10, "{}", started.body);
    let location = started.body["location"]
        .as_str()
        .expect("location")
        .to_owned();
    let done = until_done(&v2, &location).await;
    assert_eq!(
        done["sent"], 10,
        "all ten went to the prewarm queue: {done}"
    );

    // The workers generate them; each lands in Redis under its v2 key.
    let keys: Vec<String> = {
        let mut keys = Vec::new();
        for n in 0..10 {
            let explained = v2.post_json("/narrative/key", &profile(n)).await;
            keys.push(explained.body["cacheKey"].as_str().expect("key").to_owned());
        }
        keys
    };
    test_kit::eventually(
        "the ten warmed entries",
        Duration::from_secs(20),
        || async {
            let mut all = true;
            for key in &keys {
                let path = format!("/narrative/{}", key.replace('{', "%7B").replace('}', "%7D"));
                all &= v2.get(&path).await.status == 200;
            }
            all
        },
    )
    .await;
    assert_eq!(v2.llm_calls(), 40, "exactly 10 LLM calls for the pre-warm");
    for n in 0..10 {
        let answer = v2.post_narrative(&profile(n)).await;
        assert_eq!(
            answer.header("x-cache"),
            "HIT",
            "profile {n} was warmed: {}",
            answer.body
        );
    }
    assert_eq!(
        v2.post_narrative(&profile(10)).await.header("x-cache"),
        "MISS"
    );
    assert_eq!(v2.llm_calls(), 41);
    events_reach(
        &analytics,
        "generation_events WHERE trigger = 'prewarm'",
        10,
        Duration::from_secs(20),
    )
    .await;
    test_kit::eventually(
        "the run in the audit log",
        Duration::from_secs(10),
        || async {
            analytics
            .count("SELECT count(*) FROM audit_log WHERE action IN ('prewarm', 'prewarm_finished')")
            .await
            == 2
        },
    )
    .await;

    v1.shutdown().await;
    v2.shutdown().await;
    worker.stop().await;
    analytics.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_user_miss_does_not_wait_behind_a_prewarm_backlog() {
    // One worker, one user job and one prewarm job at a time, 400 ms a generation: 20
    // prewarm jobs take 8 s to drain. A user miss sent behind them must still be
    // generated within its 3 s wait, so it cannot be queued behind them.
    let sim = llm_sim::spawn(SimConfig {
        latency_ms: 400,
        ..SimConfig::default()
    })
    .await
    .expect("simulator");
    let amqp = test_kit::rabbitmq().vhost("prewarm-backlog");
    let worker = crate::workers::TestWorker::start(
        &amqp,
        &sim,
        &[("WORKER_PREFETCH", "1"), ("WORKER_PREWARM_PREFETCH", "1")],
    )
    .await;
    let version = unique_version("prewarm-backlog");
    let gateway = spawn_app_with(
        sim,
        &[
            ("REDIS_URL", test_kit::redis().url.as_str()),
            ("AMQP_URL", amqp.as_str()),
            ("ENGINE_VERSION", version.as_str()),
            ("ADMIN_TOKEN", TOKEN),
            ("PREWARM_RATE", "1000"),
            ("GENERATION_WAIT_MS", "3000"),
        ],
    )
    .await;
    let list: Vec<Value> = (100..120).map(profile).collect();
    let started = post_prewarm(&gateway, Some(TOKEN), &json!({ "profiles": list })).await;
    assert_eq!(started.status, 202, "{}", started.body);
    let location = started.body["location"]
        .as_str()
        .expect("location")
        .to_owned();
    let queued = until_done(&gateway, &location).await;
    assert_eq!(queued["sent"], 20, "{queued}");

    let user = gateway.post_narrative(&profile(1)).await;
    assert_eq!(user.source(), "generated", "{}", user.body);
    let mut still_cold = 0;
    for n in 100..120 {
        let key = gateway.post_json("/narrative/key", &profile(n)).await.key();
        let path = format!("/narrative/{}", key.to_path_segment());
        if gateway.get(&path).await.status != 200 {
            still_cold += 1;
        }
    }
    assert!(
        still_cold > 0,
        "the backlog was still draining when the user's miss was answered"
    );
    gateway.shutdown().await;
    worker.stop().await;
}
