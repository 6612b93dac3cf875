//! Pre-warming: the admin route, the popularity it reads, the LLM calls it makes, and
//! that what it warmed then hits. Embedded mode, and the distributed fleet after a
//! version bump.

use std::time::Duration;

use llm_sim::SimConfig;
use serde_json::{json, Value};

use crate::helpers::{
    post_prewarm, profile, skewed_traffic, spawn_app_with, unique_version, until_done, ADMIN,
};
use crate::services::{events_reach, fleet, TestWorker};

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
            ("ADMIN_TOKEN", ADMIN),
            ("PREWARM_RATE", "100"),
        ],
    )
    .await;
    let started = post_prewarm(&v2, Some(ADMIN), &json!({"top": 10})).await;
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
    let worker = TestWorker::start(
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
            ("ADMIN_TOKEN", ADMIN),
            ("PREWARM_RATE", "1000"),
            ("GENERATION_WAIT_MS", "3000"),
        ],
    )
    .await;
    let list: Vec<Value> = (100..120).map(profile).collect();
    let started = post_prewarm(&gateway, Some(ADMIN), &json!({ "profiles": list })).await;
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
