//! The fill protocol's promises, on real Redis with gateways alone (the same promises
//! with workers are in the `system-tests` crate): an unreadable entry is replaced once,
//! a 202's `Location` is valid on every gateway at once, and the generations a gateway
//! has started are bounded.

use std::time::Duration;

use futures::future::join_all;
use llm_sim::SimConfig;
use redis::AsyncCommands;

use crate::helpers::{profile, respond_async, spawn_app, spawn_app_with, unique_version, TestApp};

const KEY_1: &str = "k1:AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=";
const KEY_2: &str = "k2:HxwdHhsaGRgXFhUUExIREA8ODQwLCgkIBwYFBAMCAQA=";

async fn sim(latency_ms: u64) -> llm_sim::SimHandle {
    llm_sim::spawn(SimConfig {
        latency_ms,
        ..SimConfig::default()
    })
    .await
    .expect("simulator")
}

/// A gateway on the test kit's Redis with no L1 (every read goes to Redis, so what is
/// stored there is what each request sees).
async fn gateway(sim: &llm_sim::SimHandle, version: &str, extra: &[(&str, &str)]) -> TestApp {
    gateway_on(&test_kit::redis().url, sim, version, extra).await
}

async fn gateway_on(
    redis_url: &str,
    sim: &llm_sim::SimHandle,
    version: &str,
    extra: &[(&str, &str)],
) -> TestApp {
    let mut vars = vec![
        ("REDIS_URL", redis_url),
        ("ENGINE_VERSION", version),
        ("L1_TTL", "0s"),
        ("REDIS_TIMEOUT_MS", "2000"),
    ];
    vars.extend_from_slice(extra);
    spawn_app_with(sim.clone(), &vars).await
}

async fn redis() -> redis::aio::MultiplexedConnection {
    redis::Client::open(test_kit::redis().url.as_str())
        .expect("url")
        .get_multiplexed_async_connection()
        .await
        .expect("redis")
}

/// Three requests in a row after the entry turned unreadable: one regeneration, then
/// hits of the new value.
async fn regenerated_once_then_hit(app: &TestApp, sim: &llm_sim::SimHandle, n: u32) {
    let calls = sim.sim.stats().requests;
    let sources: Vec<String> = {
        let mut sources = Vec::new();
        for _ in 0..3 {
            sources.push(app.post_narrative(&profile(n)).await.source().to_owned());
        }
        sources
    };
    assert_eq!(sources, ["generated", "cache", "cache"]);
    assert_eq!(
        sim.sim.stats().requests,
        calls + 1,
        "one regeneration replaced the unreadable entry"
    );
    assert!(app.state.metrics.unreadable_entries.get() >= 1, "counted");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_corrupt_entry_is_replaced_by_one_generation() {
    let (sim, version) = (sim(10).await, unique_version("corrupt"));
    let app = gateway(&sim, &version, &[]).await;
    let stored = app.post_narrative(&profile(1)).await;
    assert_eq!(stored.source(), "generated");
    let _: () = redis()
        .await
        .set(
            stored.key().as_str(),
            b"\x00garbage, not an envelope".as_slice(),
        )
        .await
        .expect("overwritten");
    regenerated_once_then_hit(&app, &sim, 1).await;
}

/// After a rotation that dropped the key an entry was sealed with, a gateway that
/// cannot open it replaces it (sealed with its own key) instead of paying for it on
/// every request until `CACHE_TTL`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_entry_sealed_with_a_key_the_gateway_lacks_is_replaced_once() {
    let (sim, version) = (sim(10).await, unique_version("rotated"));
    let old = gateway(&sim, &version, &[("CACHE_ENCRYPTION_KEY", KEY_1)]).await;
    assert_eq!(old.post_narrative(&profile(2)).await.source(), "generated");
    let rotated = gateway(&sim, &version, &[("CACHE_ENCRYPTION_KEY", KEY_2)]).await;
    regenerated_once_then_hit(&rotated, &sim, 2).await;
}

/// `Prefer: respond-async` misses on one gateway, their `Location`s fetched at once on
/// another: every one answers 202 (pending, not 404), then 200. Redis holds writes
/// back for a moment (`CLIENT PAUSE ... WRITE`), as a loaded or failing-over one does,
/// so taking the fill lock is slow while reads are not: a 202 sent before the lock is
/// taken would send the client to a 404.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_202_location_is_valid_at_once_on_another_gateway() {
    let redis = test_kit::RedisServer::start();
    let (sim, version) = (sim(500).await, unique_version("location"));
    let (a, b) = (
        gateway_on(&redis.url, &sim, &version, &[]).await,
        gateway_on(&redis.url, &sim, &version, &[]).await,
    );
    assert_eq!(a.post_narrative(&profile(99)).await.source(), "generated");
    let paused = test_kit::redis_inline(redis.port(), "CLIENT PAUSE 600 WRITE");
    assert!(paused.starts_with("+OK"), "{paused}");
    let bodies: Vec<_> = (100..120).map(profile).collect();
    let started = join_all(bodies.iter().map(|body| respond_async(&a, body))).await;
    assert!(started.iter().all(|r| r.status == 202));
    let looked = join_all(
        started
            .iter()
            .map(|r| b.get(r.body["location"].as_str().expect("location"))),
    )
    .await;
    let statuses: Vec<u16> = looked.iter().map(|r| r.status).collect();
    assert!(
        statuses.iter().all(|s| *s == 202),
        "pending everywhere at once: {statuses:?}"
    );
    for reply in &started {
        let location = reply.body["location"].as_str().expect("location");
        test_kit::eventually(
            "the narrative to be stored",
            Duration::from_secs(20),
            || async { b.get(location).await.status == 200 },
        )
        .await;
    }
}

/// With `MAX_PENDING_GENERATIONS=2`, five distinct misses while two generations run:
/// two calls, three template answers that started nothing, counted as shed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn generations_past_the_cap_are_shed_to_the_template() {
    let app = spawn_app(
        SimConfig {
            latency_ms: 1500,
            ..SimConfig::default()
        },
        &[
            ("MAX_PENDING_GENERATIONS", "2"),
            ("GENERATION_WAIT_MS", "100"),
        ],
    )
    .await;
    let first = join_all((0..2).map(|n| app.post_narrative_owned(profile(200 + n)))).await;
    let rest = join_all((2..5).map(|n| app.post_narrative_owned(profile(200 + n)))).await;
    assert!(first.iter().chain(&rest).all(|r| r.source() == "fallback"));
    assert_eq!(app.state.metrics.generations_shed.get(), 3);
    for n in 0..5 {
        let key = app
            .post_json("/narrative/key", &profile(200 + n))
            .await
            .key();
        app.state.service.settled(&key).await;
    }
    assert_eq!(app.llm_calls(), 2, "shed misses started no generation");
    app.shutdown().await;
}

/// Redis goes down long enough for gateway B's breaker to open (and stay open: a long
/// `REDIS_RETRY_AFTER`) and for B to count the outage as long; it comes back empty and
/// gateway A stores a key. B, asked for that key at once, reads it from Redis instead
/// of paying for it alone: before a miss pays the LLM past an open breaker, one probe
/// read decides.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gateway_back_from_an_outage_reads_what_another_stored_before_paying() {
    let redis = test_kit::RedisServer::start();
    let port = redis.port();
    let (sim, version) = (sim(10).await, unique_version("probe"));
    let a = gateway_on(
        &redis.url,
        &sim,
        &version,
        &[
            ("REDIS_FAILOVER_WAIT", "300ms"),
            ("REDIS_RETRY_AFTER", "100ms"),
        ],
    )
    .await;
    let b = gateway_on(
        &redis.url,
        &sim,
        &version,
        &[
            ("REDIS_FAILOVER_WAIT", "300ms"),
            ("REDIS_RETRY_AFTER", "60s"),
        ],
    )
    .await;
    assert_eq!(b.post_narrative(&profile(300)).await.source(), "generated");
    drop(redis);
    for n in 301..304 {
        assert_eq!(b.post_narrative(&profile(n)).await.status, 200);
    }
    assert_ne!(
        b.get("/readyz").await.body["backends"]["cache"]["state"],
        "up"
    );

    let redis = test_kit::RedisServer::start_on(port);
    let key = a.post_json("/narrative/key", &profile(310)).await.key();
    let conn = redis::Client::open(redis.url.as_str())
        .expect("url")
        .get_multiplexed_async_connection()
        .await
        .expect("redis is back");
    test_kit::eventually(
        "A to store the key in Redis",
        Duration::from_secs(20),
        || {
            let (a, mut conn, key) = (&a, conn.clone(), key.clone());
            async move {
                a.post_narrative(&profile(310)).await;
                conn.exists::<_, bool>(key.as_str()).await.unwrap_or(false)
            }
        },
    )
    .await;
    let stored = a.post_narrative(&profile(310)).await;
    let calls = sim.sim.stats().requests;
    let reply = b.post_narrative(&profile(310)).await;
    assert_eq!(sim.sim.stats().requests, calls, "B paid for nothing");
    assert_eq!(reply.body["narrative"], stored.body["narrative"]);
}

/// One accounting path: a 202 is counted like any other answer (outcome `pending`),
/// and errors from admin routes and the router's fallbacks reach
/// `narrative_rejected_total` like those of the narrative routes.
#[tokio::test]
async fn every_answer_and_every_rejection_is_counted_once() {
    let app = spawn_app(
        SimConfig {
            latency_ms: 300,
            ..SimConfig::default()
        },
        &[("ADMIN_TOKEN", crate::helpers::ADMIN)],
    )
    .await;
    assert_eq!(respond_async(&app, &profile(400)).await.status, 202);
    assert_eq!(app.get("/no/such/route").await.status, 404);
    let too_long = crate::helpers::erase(&app, &"x".repeat(300)).await;
    assert_eq!(too_long.status, 400, "an admin handler's own error");
    let metrics = app.get("/metrics").await.body;
    let metrics = metrics.as_str().unwrap_or_default();
    for line in [
        "narrative_requests_total{outcome=\"pending\"} 1",
        "narrative_rejected_total{code=\"no_route\"} 1",
        "narrative_rejected_total{code=\"invalid_parameter\"} 1",
    ] {
        assert!(metrics.contains(line), "{line} in\n{metrics}");
    }
    app.shutdown().await;
}
