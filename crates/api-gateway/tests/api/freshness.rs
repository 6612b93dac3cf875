//! Stale-while-revalidate and stale-if-error. Staleness is an entry's age on the wall
//! clock, so these tests wait real seconds: there is no signal for time passing.

use std::time::{Duration, Instant};

use futures::future::join_all;
use llm_sim::SimConfig;

use crate::helpers::{
    profile, reply, spawn_app, spawn_app_with, stored_by_previous_version, unique_version,
};

#[tokio::test]
async fn a_stale_entry_is_answered_at_once_and_refreshed_in_the_background() {
    let app = spawn_app(
        SimConfig {
            latency_ms: 800,
            ..SimConfig::default()
        },
        &[("STALE_AFTER", "1s")],
    )
    .await;
    let first = app.post_narrative(&profile(1)).await;
    assert_eq!(first.source(), "generated");
    tokio::time::sleep(Duration::from_millis(1300)).await;

    let started = Instant::now();
    let stale = app.post_narrative(&profile(1)).await;
    assert!(
        started.elapsed() < Duration::from_millis(400),
        "did not wait for the 800 ms refresh: {:?}",
        started.elapsed()
    );
    assert_eq!(stale.source(), "stale");
    assert_eq!(stale.header("x-cache"), "STALE");
    assert!(
        stale
            .header("cache-status")
            .starts_with("narrative-cache; hit; ttl=-"),
        "{}",
        stale.header("cache-status")
    );
    assert!(stale.header("cache-status").ends_with("; fwd=stale"));
    assert_eq!(stale.body["narrative"], first.body["narrative"]);

    let path = format!("/narrative/{}", stale.key().to_path_segment());
    let by_key_while_refreshing = app.get(&path).await;
    assert_eq!(by_key_while_refreshing.header("x-cache"), "STALE");
    app.state.service.settled(&stale.key()).await;
    let by_key = app.get(&path).await;
    assert_eq!(
        (by_key.status, by_key.source()),
        (200, "cache"),
        "refreshed"
    );
    let fresh = app.post_narrative(&profile(1)).await;
    assert_eq!(fresh.source(), "cache", "the refresh replaced the entry");
    assert_ne!(fresh.body["generatedAt"], first.body["generatedAt"]);
    assert_eq!(app.llm_calls(), 2);
    assert_eq!(
        app.stats().await["hitRate"],
        0.6667,
        "stale answers count as hits"
    );
}

/// 200 concurrent requests for a stale entry across two gateways: one refresh.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_hundred_stale_requests_across_two_gateways_make_one_refresh() {
    let sim = llm_sim::spawn(SimConfig {
        latency_ms: 500,
        ..SimConfig::default()
    })
    .await
    .expect("sim");
    let (url, version) = (test_kit::redis().url.clone(), unique_version("swr"));
    let vars = [
        ("REDIS_URL", url.as_str()),
        ("ENGINE_VERSION", version.as_str()),
        ("STALE_AFTER", "2s"),
    ];
    let (a, b) = (
        spawn_app_with(sim.clone(), &vars).await,
        spawn_app_with(sim.clone(), &vars).await,
    );
    assert_eq!(a.post_narrative(&profile(2)).await.source(), "generated");
    assert_eq!(
        b.post_narrative(&profile(2)).await.source(),
        "cache",
        "B holds a copy in L1 too"
    );
    tokio::time::sleep(Duration::from_millis(2300)).await;

    let body = profile(2);
    let replies = join_all((0..200).map(|i| {
        if i % 2 == 0 {
            a.post_narrative(&body)
        } else {
            b.post_narrative(&body)
        }
    }))
    .await;
    assert!(
        replies
            .iter()
            .all(|r| r.status == 200 && matches!(r.source(), "stale" | "cache")),
        "answered at once"
    );
    assert!(replies.iter().any(|r| r.source() == "stale"));
    let key = replies[0].key();
    a.state.service.settled(&key).await;
    b.state.service.settled(&key).await;
    assert_eq!(
        sim.sim.stats().requests,
        2,
        "the first generation and exactly one refresh"
    );
    assert_eq!(a.post_narrative(&body).await.source(), "cache");
    assert_eq!(
        b.post_narrative(&body).await.source(),
        "cache",
        "fresh again everywhere"
    );
}

/// Refreshes failing: the stale entry keeps being served, never an error, until
/// CACHE_TTL ends it.
#[tokio::test]
async fn a_failing_refresh_keeps_serving_the_stale_entry_until_its_ttl() {
    let app = spawn_app(
        SimConfig {
            latency_ms: 10,
            ..SimConfig::default()
        },
        &[("STALE_AFTER", "1s"), ("CACHE_TTL", "3s")],
    )
    .await;
    assert_eq!(app.post_narrative(&profile(3)).await.source(), "generated");
    app.sim.sim.set_config(SimConfig {
        latency_ms: 10,
        failure_rate: 1.0,
        failure_status: 503,
        ..SimConfig::default()
    });
    tokio::time::sleep(Duration::from_millis(1200)).await;

    for _ in 0..3 {
        let reply = app.post_narrative(&profile(3)).await;
        assert_eq!((reply.status, reply.source()), (200, "stale"));
        app.state.service.settled(&reply.key()).await;
    }
    let metrics = app
        .client
        .get(app.url("/metrics"))
        .send()
        .await
        .expect("metrics")
        .text()
        .await
        .expect("text");
    let failures = metrics
        .lines()
        .find_map(|l| l.strip_prefix("narrative_refresh_failures_total "))
        .and_then(|v| v.parse::<u64>().ok())
        .unwrap_or(0);
    assert!(failures >= 1, "refresh failures are counted");

    tokio::time::sleep(Duration::from_millis(2000)).await;
    let expired = app.post_narrative(&profile(3)).await;
    assert_eq!(
        (expired.status, expired.source()),
        (200, "fallback"),
        "past CACHE_TTL the entry is gone"
    );
}

/// A restart with a new ENGINE_VERSION answers previously cached profiles as stale at
/// once (from the previous version's entries) and regenerates each exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_version_rollout_serves_the_previous_version_as_stale_and_regenerates_once() {
    let sim = llm_sim::spawn(SimConfig {
        latency_ms: 400,
        ..SimConfig::default()
    })
    .await
    .expect("sim");
    let url = test_kit::redis().url.clone();
    let (old, new) = (unique_version("v1"), unique_version("v2"));
    let bodies: Vec<_> = (0..5).map(|n| profile(10 + n)).collect();
    let (_, previous) = stored_by_previous_version(&sim, &url, &old, &bodies).await;
    let v2 = spawn_app_with(
        sim.clone(),
        &[
            ("REDIS_URL", url.as_str()),
            ("ENGINE_VERSION", new.as_str()),
            ("PREVIOUS_VERSIONS", previous.as_str()),
        ],
    )
    .await;
    let started = Instant::now();
    let replies = join_all(
        bodies
            .iter()
            .flat_map(|body| std::iter::repeat_n(body, 10))
            .map(|body| v2.post_narrative(body)),
    )
    .await;
    assert!(
        started.elapsed() < Duration::from_millis(400),
        "no request waited for the LLM: {:?}",
        started.elapsed()
    );
    assert!(
        replies
            .iter()
            .all(|r| r.status == 200 && r.source() == "stale"),
        "answered at once from the previous version"
    );
    assert!(replies
        .iter()
        .all(|r| r.body["engineVersion"] == old.as_str()));

    for reply in replies.iter().step_by(10) {
        v2.state.service.settled(&reply.key()).await;
    }
    assert_eq!(
        sim.sim.stats().requests,
        5 + 5,
        "each profile regenerated exactly once"
    );
    let by_version = &v2.stats().await["entriesByVersion"];
    assert_eq!(
        (
            by_version[old.as_str()].as_u64(),
            by_version[new.as_str()].as_u64()
        ),
        (Some(5), Some(5)),
        "{by_version}"
    );
    for body in &bodies {
        let fresh = v2.post_narrative(body).await;
        assert_eq!(fresh.source(), "cache");
        assert_eq!(fresh.body["engineVersion"], new.as_str());
    }
}

/// Found in review: during a rollout a miss sent with `no-cache` (or a `max-age` the
/// old entry is past) was answered from the previous version's entry anyway.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rollout_answer_from_a_previous_version_honours_the_clients_directives() {
    let sim = llm_sim::spawn(SimConfig {
        latency_ms: 20,
        ..SimConfig::default()
    })
    .await
    .expect("sim");
    let url = test_kit::redis().url.clone();
    let (old, new) = (unique_version("dir-v1"), unique_version("dir-v2"));
    let bodies: Vec<_> = (0..3).map(|n| profile(30 + n)).collect();
    let (_, previous) = stored_by_previous_version(&sim, &url, &old, &bodies).await;
    let v2 = spawn_app_with(
        sim.clone(),
        &[
            ("REDIS_URL", url.as_str()),
            ("ENGINE_VERSION", new.as_str()),
            ("PREVIOUS_VERSIONS", previous.as_str()),
        ],
    )
    .await;
    let with = |n: u32, directive: &'static str| {
        let request = v2
            .client
            .post(v2.url("/narrative"))
            .header("cache-control", directive)
            .json(&profile(30 + n));
        async move { reply(request.send().await.expect("send")).await }
    };
    assert_eq!(with(0, "no-cache").await.source(), "generated");
    assert_eq!(with(1, "max-age=0").await.source(), "generated");
    // A max-age the old entry is within still takes it, as stale.
    assert_eq!(with(2, "max-age=3600").await.source(), "stale");
}
