//! Erasure by user: `DELETE /narrative/user/{userId}` removes every entry the user
//! asked for, from Redis and every gateway's L1, their events from Postgres, and a
//! generation already in flight cannot write the entry back.

use std::time::Duration;

use llm_sim::SimConfig;
use serde_json::json;

use redis::AsyncCommands;

use crate::helpers::{
    anonymous, as_user, erase, reply, respond_async, spawn_app, spawn_app_with,
    stored_by_previous_version, unique_version, ADMIN,
};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn embedded_erasure_removes_the_users_entries_and_fences_the_one_in_flight() {
    let app = spawn_app(
        SimConfig {
            latency_ms: 5,
            ..SimConfig::default()
        },
        &[("ADMIN_TOKEN", ADMIN)],
    )
    .await;
    assert_eq!(
        app.post_narrative(&as_user(1, "alice")).await.source(),
        "generated"
    );
    assert_eq!(
        app.post_narrative(&as_user(2, "alice")).await.source(),
        "generated"
    );
    assert_eq!(
        app.post_narrative(&as_user(1, "bob")).await.source(),
        "cache"
    );

    // A generation of alice's still running when the erasure comes.
    app.sim.sim.set_config(SimConfig {
        latency_ms: 600,
        ..SimConfig::default()
    });
    let pending = respond_async(&app, &as_user(3, "alice")).await;
    assert_eq!(pending.status, 202);
    let in_flight = pending.key();
    // And her first request for profile 4, still waiting for its generation.
    let waiting = {
        let (client, url) = (app.client.clone(), app.url("/narrative"));
        tokio::spawn(async move {
            reply(
                client
                    .post(url)
                    .json(&as_user(4, "alice"))
                    .send()
                    .await
                    .unwrap(),
            )
            .await
        })
    };
    let second = app.post_json("/narrative/key", &anonymous(4)).await.key();
    test_kit::eventually(
        "both generations running",
        Duration::from_secs(5),
        || async { app.state.service.stats().await.in_flight == 2 },
    )
    .await;

    let erased = erase(&app, "alice").await;
    assert_eq!(erased.status, 200, "{}", erased.body);
    assert_eq!(erased.body, json!({"deleted": 2}));
    app.state.service.settled(&in_flight).await;
    // The waiting request is still answered.
    assert_eq!(waiting.await.unwrap().source(), "generated");
    // Once neither flight is pending any more (202), neither left an entry.
    for (key, what) in [
        (&in_flight, "the generation in flight stored nothing"),
        (&second, "nor did the one a request waited on"),
    ] {
        let path = format!("/narrative/{}", key.to_path_segment());
        test_kit::eventually("the flight to end", Duration::from_secs(5), || async {
            app.get(&path).await.status != 202
        })
        .await;
        assert_eq!(app.get(&path).await.status, 404, "{what}");
    }

    // Shared entries go too: bob's profile 1 is generated again.
    app.sim.sim.set_config(SimConfig {
        latency_ms: 5,
        ..SimConfig::default()
    });
    for n in [1, 2] {
        assert_eq!(
            app.post_narrative(&anonymous(n)).await.header("x-cache"),
            "MISS"
        );
    }
    // Work begun after the erasure is stored as usual.
    assert_eq!(
        app.post_narrative(&anonymous(3)).await.source(),
        "generated"
    );
    assert_eq!(app.post_narrative(&anonymous(3)).await.source(), "cache");
    assert_eq!(erase(&app, "alice").await.body, json!({"deleted": 0}));

    let api_gateway::service::AnalyticsSource::Memory(memory) = &app.state.analytics else {
        panic!("embedded");
    };
    let record = memory
        .audit_log()
        .into_iter()
        .find(|r| r.action == "erase_user")
        .expect("audited");
    let hash = app.state.service.deriver().user_hash("alice");
    assert_eq!(record.subject.as_deref(), Some(hash.as_str()));
    assert_eq!(record.detail["deleted"], 2);
    assert!(!record.detail.to_string().contains("alice"));
    app.shutdown().await;
}

#[tokio::test]
async fn erasure_is_an_admin_route() {
    let app = spawn_app(SimConfig::default(), &[("ADMIN_TOKEN", ADMIN)]).await;
    let anonymous = app
        .client
        .delete(app.url("/narrative/user/alice"))
        .send()
        .await
        .expect("request");
    assert_eq!(anonymous.status(), 401);
    let too_long = erase(&app, &"x".repeat(300)).await;
    assert_eq!(too_long.status, 400);
    assert_eq!(too_long.body["error"]["field"], "userId");
    app.shutdown().await;
}

/// Seen in a review: during a rollout a user answered from a `PREVIOUS_VERSIONS`
/// entry was indexed under the new key only, so erasing them left that entry.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn erasure_covers_the_entries_a_user_was_served_from_previous_versions() {
    let sim = llm_sim::spawn(SimConfig {
        latency_ms: 5,
        ..SimConfig::default()
    })
    .await
    .expect("sim");
    let url = test_kit::redis().url.clone();
    let (old, new) = (unique_version("erase-v1"), unique_version("erase-v2"));
    // Someone else's request stores the old version's entry.
    let (stored, previous) =
        stored_by_previous_version(&sim, &url, &old, &[as_user(1, "carol")]).await;
    let old_key = stored[0].key();
    // A gateway slow to generate, so that dave's answer is the old entry.
    sim.sim.set_config(SimConfig {
        latency_ms: 60_000,
        ..SimConfig::default()
    });
    let v2 = spawn_app_with(
        sim.clone(),
        &[
            ("REDIS_URL", url.as_str()),
            ("ENGINE_VERSION", new.as_str()),
            ("PREVIOUS_VERSIONS", previous.as_str()),
            ("ADMIN_TOKEN", ADMIN),
        ],
    )
    .await;
    let served = v2.post_narrative(&as_user(1, "dave")).await;
    assert_eq!(served.source(), "stale", "answered from the old version");
    let erased = erase(&v2, "dave").await;
    assert_eq!(erased.status, 200, "{:?}", erased.body);
    let mut redis = redis::Client::open(url.as_str())
        .expect("url")
        .get_multiplexed_async_connection()
        .await
        .expect("redis");
    assert!(
        !redis
            .exists::<_, bool>(old_key.as_str())
            .await
            .expect("EXISTS"),
        "the old version's entry dave was served is erased"
    );
}
