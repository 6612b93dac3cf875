//! Erasure by user: `DELETE /narrative/user/{userId}` removes every entry the user
//! asked for, from Redis and every gateway's L1, their events from Postgres, and a
//! generation already in flight cannot write the entry back.

use std::time::Duration;

use llm_sim::SimConfig;
use serde_json::{json, Value};

use crate::analytics::fleet;
use crate::helpers::{profile, reply, spawn_app, spawn_app_with, unique_version, Reply, TestApp};

const ADMIN: &str = "admin-token-0123456789";

fn as_user(n: u32, user: &str) -> Value {
    let mut body = profile(n);
    body["userId"] = json!(user);
    body
}

fn anonymous(n: u32) -> Value {
    let mut body = profile(n);
    body.as_object_mut().expect("object").remove("userId");
    body
}

async fn erase(app: &TestApp, user: &str) -> Reply {
    let request = app
        .client
        .delete(app.url(&format!("/narrative/user/{user}")))
        .bearer_auth(ADMIN);
    reply(request.send().await.expect("request")).await
}

async fn respond_async(app: &TestApp, body: &Value) -> Reply {
    let request = app
        .client
        .post(app.url("/narrative"))
        .header("prefer", "respond-async")
        .json(body);
    reply(request.send().await.expect("request")).await
}

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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn erasure_across_two_gateways_leaves_nothing_of_the_user() {
    let database = test_kit::postgres().database("erasure_fleet");
    let (a, worker, analytics) = fleet("erasure-fleet", &database).await;
    let version = a.state.service.deriver().engine_version().to_string();
    let redis_url = test_kit::redis().url.clone();
    let b = spawn_app_with(
        a.sim.clone(),
        &[
            ("REDIS_URL", redis_url.as_str()),
            ("AMQP_URL", analytics.amqp.as_str()),
            ("DATABASE_URL", database.as_str()),
            ("ENGINE_VERSION", version.as_str()),
            ("ADMIN_TOKEN", ADMIN),
        ],
    )
    .await;
    let user = unique_version("carol");
    let hash = b.state.service.deriver().user_hash(&user);

    assert_eq!(
        a.post_narrative(&as_user(1, &user)).await.source(),
        "generated"
    );
    assert_eq!(
        b.post_narrative(&as_user(2, &user)).await.source(),
        "generated"
    );
    assert_eq!(
        b.post_narrative(&as_user(1, "dave"))
            .await
            .header("x-cache"),
        "HIT"
    );
    // Both gateways now hold profile 1 in L1.
    assert_eq!(
        a.post_narrative(&anonymous(1)).await.header("x-cache"),
        "HIT"
    );

    let rows = format!("SELECT count(*) FROM request_events WHERE user_hash = '{hash}'");
    test_kit::eventually(
        "carol's events in Postgres",
        Duration::from_secs(20),
        || async { analytics.count(&rows).await == 2 },
    )
    .await;
    // Profile 3 is being generated by the worker, slowly, when the erasure comes; its
    // request event is still on its way to Postgres.
    a.sim.sim.set_config(SimConfig {
        latency_ms: 3_000,
        ..SimConfig::default()
    });
    let pending = respond_async(&a, &as_user(3, &user)).await;
    assert_eq!(pending.status, 202, "{}", pending.body);
    let keys = [
        a.post_json("/narrative/key", &anonymous(1)).await.key(),
        a.post_json("/narrative/key", &anonymous(2)).await.key(),
        pending.key(),
    ];

    let erased = erase(&b, &user).await;
    assert_eq!(erased.status, 200, "{}", erased.body);
    assert_eq!(erased.body, json!({"deleted": 2}));

    // The worker's generation ends; its write is refused: the lock was revoked.
    test_kit::eventually(
        "the in-flight job to end",
        Duration::from_secs(20),
        || async { worker.jobs("lock_lost") == 1 },
    )
    .await;
    a.state.service.settled(&keys[2]).await;

    let mut redis = redis::Client::open(redis_url.as_str())
        .expect("client")
        .get_multiplexed_async_connection()
        .await
        .expect("redis");
    for key in &keys {
        let exists: bool = redis::cmd("EXISTS")
            .arg(key.as_str())
            .query_async(&mut redis)
            .await
            .expect("exists");
        assert!(!exists, "{key} is gone from Redis");
    }
    let index: Vec<String> = redis::cmd("KEYS")
        .arg(format!("*{hash}*"))
        .query_async(&mut redis)
        .await
        .expect("keys");
    assert!(
        index.is_empty(),
        "nothing in Redis names the user: {index:?}"
    );
    // Every event so far has landed, profile 3's too (before the erasure, and deleted,
    // or after it, and stored without the user): the rollups count all five...
    test_kit::eventually(
        "all five requests counted",
        Duration::from_secs(20),
        || async {
            analytics
                .count("SELECT coalesce(sum(requests), 0)::int8 FROM request_rollup_minute")
                .await
                == 5
        },
    )
    .await;
    // ...and none is the user's.
    assert_eq!(
        analytics.count(&rows).await,
        0,
        "no event of the user in Postgres"
    );
    assert_eq!(
        analytics
            .count(&format!(
                "SELECT count(*) FROM audit_log WHERE action = 'erase_user' AND subject = '{hash}' \
                 AND detail::text NOT LIKE '%{user}%'"
            ))
            .await,
        1
    );

    // Neither gateway serves any of the three from its cache now.
    a.sim.sim.set_config(SimConfig {
        latency_ms: 5,
        ..SimConfig::default()
    });
    for (gateway, n) in [(&a, 1), (&b, 2), (&a, 3)] {
        let answer = gateway.post_narrative(&anonymous(n)).await;
        assert_ne!(
            answer.header("x-cache"),
            "HIT",
            "profile {n} was erased: {}",
            answer.body
        );
    }

    a.shutdown().await;
    b.shutdown().await;
    worker.stop().await;
    analytics.stop().await;
}
