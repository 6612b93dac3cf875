//! Request `Cache-Control` directives (RFC 9111). Each test fails if its directive is
//! ignored.

use std::time::Duration;

use futures::future::join_all;
use llm_sim::SimConfig;
use serde_json::Value;

use crate::helpers::{profile, reply, spawn_app, Reply, TestApp, ADMIN};

async fn post_with(app: &TestApp, body: &Value, cache_control: &str) -> Reply {
    let request = app
        .client
        .post(app.url("/narrative"))
        .header("cache-control", cache_control)
        .json(body);
    reply(request.send().await.expect("send")).await
}

/// Without `REVALIDATE_MIN_INTERVAL`, so that a directive regenerates at once.
const UNLIMITED: &[(&str, &str)] = &[("REVALIDATE_MIN_INTERVAL", "0s")];

fn fast() -> SimConfig {
    SimConfig {
        latency_ms: 20,
        ..SimConfig::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_cache_regenerates_once_for_many_concurrent_requests() {
    let app = spawn_app(
        SimConfig {
            latency_ms: 300,
            ..SimConfig::default()
        },
        UNLIMITED,
    )
    .await;
    let first = app.post_narrative(&profile(1)).await;
    assert_eq!(app.llm_calls(), 1);

    let body = profile(1);
    let replies = join_all((0..50).map(|_| post_with(&app, &body, "no-cache"))).await;
    assert!(
        replies
            .iter()
            .all(|r| r.status == 200 && r.source() == "generated"),
        "regenerated, not served from cache"
    );
    assert_eq!(
        app.llm_calls(),
        2,
        "50 concurrent no-cache requests: one regeneration"
    );
    assert!(replies
        .iter()
        .any(|r| r.header("cache-status") == "narrative-cache; fwd=request; stored"));
    assert!(replies.iter().all(|r| r
        .header("cache-status")
        .starts_with("narrative-cache; fwd=request")));
    let after = app.post_narrative(&profile(1)).await;
    assert_eq!(after.source(), "cache");
    assert_ne!(
        after.body["generatedAt"], first.body["generatedAt"],
        "the regenerated value replaced the old one"
    );
}

#[tokio::test]
async fn no_store_keeps_nothing() {
    let app = spawn_app(fast(), &[]).await;
    let unstored = post_with(&app, &profile(2), "no-store").await;
    assert_eq!(unstored.source(), "generated");
    assert_eq!(
        unstored.header("cache-status"),
        "narrative-cache; fwd=miss",
        "not stored"
    );
    let next = app.post_narrative(&profile(2)).await;
    assert_eq!(
        next.source(),
        "generated",
        "nothing was kept, so this is a miss again"
    );
    assert_eq!(app.llm_calls(), 2);
    // A stored entry is still answered to a no-store request.
    assert_eq!(
        post_with(&app, &profile(2), "no-store").await.source(),
        "cache"
    );
}

#[tokio::test]
async fn max_age_treats_older_entries_as_misses() {
    let app = spawn_app(fast(), UNLIMITED).await;
    app.post_narrative(&profile(3)).await;
    assert_eq!(
        post_with(&app, &profile(3), "max-age=60").await.source(),
        "cache",
        "young enough"
    );
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let regenerated = post_with(&app, &profile(3), "max-age=1").await;
    assert_eq!(
        regenerated.source(),
        "generated",
        "older than max-age: regenerated"
    );
    assert!(
        regenerated
            .header("cache-status")
            .starts_with("narrative-cache; fwd=stale"),
        "{}",
        regenerated.header("cache-status")
    );
    assert_eq!(app.llm_calls(), 2);
}

#[tokio::test]
async fn only_if_cached_answers_504_when_nothing_is_stored() {
    let app = spawn_app(fast(), &[]).await;
    let missing = post_with(&app, &profile(4), "only-if-cached").await;
    assert_eq!(missing.status, 504);
    assert_eq!(missing.body["error"]["code"], "not_cached");
    assert_eq!(app.llm_calls(), 0, "nothing was generated");
    app.post_narrative(&profile(4)).await;
    assert_eq!(
        post_with(&app, &profile(4), "only-if-cached").await.status,
        200
    );
}

#[tokio::test]
async fn stale_if_error_allows_the_stored_entry_when_regeneration_fails() {
    let app = spawn_app(fast(), UNLIMITED).await;
    let stored = app.post_narrative(&profile(5)).await;
    app.sim.sim.set_config(SimConfig {
        latency_ms: 5,
        failure_rate: 1.0,
        failure_status: 503,
        ..SimConfig::default()
    });
    tokio::time::sleep(Duration::from_millis(1100)).await;

    let without = post_with(&app, &profile(5), "max-age=0").await;
    assert_eq!(
        without.source(),
        "fallback",
        "regeneration failed and nothing allows the old entry"
    );
    let with = post_with(&app, &profile(5), "max-age=0, stale-if-error=600").await;
    assert_eq!((with.status, with.source()), (200, "stale"));
    assert_eq!(with.body["narrative"], stored.body["narrative"]);
}

/// Absurd directive values never break a request (an overflow here once panicked).
#[tokio::test]
async fn huge_directive_values_are_harmless() {
    let app = spawn_app(fast(), UNLIMITED).await;
    app.post_narrative(&profile(6)).await;
    app.sim.sim.set_config(SimConfig {
        latency_ms: 5,
        failure_rate: 1.0,
        failure_status: 503,
        ..SimConfig::default()
    });
    let reply = post_with(
        &app,
        &profile(6),
        "no-cache, stale-if-error=18446744073709551615, max-age=18446744073709551615",
    )
    .await;
    assert_eq!((reply.status, reply.source()), (200, "stale"));
}

/// With directives, `Prefer: respond-async` does not bypass them.
#[tokio::test]
async fn respond_async_honours_only_if_cached() {
    let app = spawn_app(fast(), &[]).await;
    let request = app
        .client
        .post(app.url("/narrative"))
        .header("prefer", "respond-async")
        .header("cache-control", "only-if-cached")
        .json(&profile(7));
    let reply = reply(request.send().await.expect("send")).await;
    assert_eq!(reply.status, 504);
    assert_eq!(app.llm_calls(), 0);
}

/// Seen in a black-box run: `no-cache` in a loop was one paid generation per request.
#[tokio::test]
async fn a_client_forces_a_regeneration_at_most_once_per_interval() {
    let app = spawn_app(fast(), &[]).await;
    let mut sources = Vec::new();
    for _ in 0..15 {
        sources.push(
            post_with(&app, &profile(20), "no-cache")
                .await
                .source()
                .to_owned(),
        );
    }
    assert!(
        app.llm_calls() <= 2,
        "15 no-cache requests: {} LLM calls",
        app.llm_calls()
    );
    assert_eq!(sources[0], "generated");
    assert!(sources[1..].iter().all(|s| s == "cache"), "{sources:?}");
    let max_age = post_with(&app, &profile(20), "max-age=0").await;
    assert_eq!(
        max_age.source(),
        "cache",
        "max-age=0 is limited the same way"
    );
    assert_eq!(app.llm_calls(), 1);
}

/// Seen in a black-box run: N concurrent `no-store` requests were N paid calls.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_no_store_requests_share_one_call_and_keep_nothing() {
    let app = spawn_app(
        SimConfig {
            latency_ms: 300,
            ..SimConfig::default()
        },
        &[],
    )
    .await;
    let body = profile(21);
    let replies = join_all((0..20).map(|_| post_with(&app, &body, "no-store"))).await;
    assert_eq!(app.llm_calls(), 1, "20 concurrent no-store requests");
    assert!(
        replies.iter().all(|r| r.source() == "generated"),
        "{:?}",
        replies.iter().map(Reply::source).collect::<Vec<_>>()
    );
    let body = replies[0].body["narrative"].clone();
    assert!(
        replies.iter().all(|r| r.body["narrative"] == body),
        "one generation for all"
    );
    assert_eq!(app.stats().await["keys"], 0, "nothing kept");
    let after = app.post_narrative(&profile(21)).await;
    assert_eq!(after.source(), "generated", "the next request misses");
    assert_eq!(app.llm_calls(), 2);
}

/// Found in review: limiting by the entry's age alone let `no-cache, no-store` in a
/// loop pay a call each, since a regeneration kept nowhere leaves the entry as old
/// as it was. A key forced once is not forced again within the interval.
#[tokio::test]
async fn no_store_regenerations_are_limited_like_any_other() {
    let app = spawn_app(fast(), &[("REVALIDATE_MIN_INTERVAL", "1s")]).await;
    assert_eq!(app.post_narrative(&profile(22)).await.source(), "generated");
    // The entry's age passes the interval: this is the clock under test.
    tokio::time::sleep(Duration::from_millis(1_100)).await;
    let mut sources = Vec::new();
    for _ in 0..15 {
        let reply = post_with(&app, &profile(22), "no-cache, no-store").await;
        sources.push(reply.source().to_owned());
    }
    assert_eq!(
        app.llm_calls(),
        2,
        "one forced regeneration in the interval: {sources:?}"
    );
    assert_eq!(
        sources.iter().filter(|s| *s == "generated").count(),
        1,
        "{sources:?}"
    );
}

/// The admin token's holder is exempt from the interval, open routes included.
#[tokio::test]
async fn the_admin_may_force_a_regeneration_at_once() {
    let app = spawn_app(fast(), &[("ADMIN_TOKEN", ADMIN)]).await;
    assert_eq!(app.post_narrative(&profile(23)).await.source(), "generated");
    let forced = app
        .client
        .post(app.url("/narrative"))
        .header("cache-control", "no-cache")
        .bearer_auth(ADMIN)
        .json(&profile(23));
    let forced = reply(forced.send().await.expect("send")).await;
    assert_eq!(forced.source(), "generated");
    assert_eq!(app.llm_calls(), 2);
}

/// Found in review: a miss that arrived while a `no-store` generation ran for the
/// same key waited on it, and so stored nothing; the next request paid again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_miss_beside_a_no_store_generation_is_still_stored() {
    let app = spawn_app(
        SimConfig {
            latency_ms: 400,
            ..SimConfig::default()
        },
        &[],
    )
    .await;
    let body = profile(24);
    let unstored = {
        let (client, url, body) = (app.client.clone(), app.url("/narrative"), body.clone());
        tokio::spawn(async move {
            let request = client
                .post(url)
                .header("cache-control", "no-store")
                .json(&body);
            reply(request.send().await.expect("send")).await
        })
    };
    test_kit::eventually(
        "the no-store generation to reach the LLM",
        Duration::from_secs(5),
        || async { app.llm_calls() == 1 },
    )
    .await;
    let miss = app.post_narrative(&body).await;
    assert_eq!(miss.source(), "generated");
    assert_eq!(unstored.await.expect("task").source(), "generated");
    assert_eq!(
        app.post_narrative(&body).await.source(),
        "cache",
        "the miss was stored"
    );
    assert_eq!(app.llm_calls(), 2);
}
