//! Several gateway instances sharing one real redis-server (the test kit's), each
//! test under its own ENGINE_VERSION so their keys never meet.

use std::time::{Duration, Instant};

use futures::future::join_all;
use llm_sim::SimConfig;
use redis::AsyncCommands;
use test_kit::RedisServer;

use crate::helpers::{profile, spawn_app_with, unique_version, TestApp};

async fn sim(latency_ms: u64) -> llm_sim::SimHandle {
    llm_sim::spawn(SimConfig {
        latency_ms,
        ..SimConfig::default()
    })
    .await
    .expect("simulator")
}

async fn instance(
    sim: &llm_sim::SimHandle,
    redis_url: &str,
    version: &str,
    extra: &[(&str, &str)],
) -> TestApp {
    let mut vars = vec![("REDIS_URL", redis_url), ("ENGINE_VERSION", version)];
    vars.extend_from_slice(extra);
    spawn_app_with(sim.clone(), &vars).await
}

/// 600 concurrent identical misses split across two instances: one LLM call in all.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn six_hundred_identical_misses_across_two_instances_make_one_llm_call() {
    let (sim, version) = (sim(1000).await, unique_version("stampede"));
    let url = &test_kit::redis().url;
    let (a, b) = (
        instance(&sim, url, &version, &[]).await,
        instance(&sim, url, &version, &[]).await,
    );
    let body = profile(1);
    let replies = join_all((0..600).map(|i| {
        if i % 2 == 0 {
            a.post_narrative(&body)
        } else {
            b.post_narrative(&body)
        }
    }))
    .await;

    assert_eq!(
        sim.sim.stats().requests,
        1,
        "exactly one completion reached the simulator"
    );
    assert!(replies.iter().all(|r| r.status == 200), "all 200");
    assert!(
        replies.iter().all(|r| r.source() == "generated"),
        "none fell back"
    );
    let first = &replies[0].body["narrative"];
    assert!(
        replies.iter().all(|r| &r.body["narrative"] == first),
        "one value for the key everywhere"
    );
    assert_eq!(a.post_narrative(&body).await.source(), "cache");
    assert_eq!(b.post_narrative(&body).await.source(), "cache");
}

/// 100 distinct profiles, 5 concurrent requests each, across both: 100 calls.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn distinct_profiles_across_two_instances_make_one_call_each() {
    let (sim, version) = (sim(300).await, unique_version("distinct"));
    let url = &test_kit::redis().url;
    let (a, b) = (
        instance(&sim, url, &version, &[]).await,
        instance(&sim, url, &version, &[]).await,
    );
    let bodies: Vec<_> = (0..100).map(profile).collect();
    let requests = bodies
        .iter()
        .flat_map(|body| (0..5).map(move |i| (i, body)));
    let replies = join_all(requests.map(|(i, body)| {
        if i % 2 == 0 {
            a.post_narrative(body)
        } else {
            b.post_narrative(body)
        }
    }))
    .await;
    assert!(replies
        .iter()
        .all(|r| r.status == 200 && r.source() == "generated"));
    assert_eq!(sim.sim.stats().requests, 100);
}

/// A new instance (a restart) serves what an earlier one generated, from Redis.
#[tokio::test]
async fn a_restarted_gateway_serves_earlier_narratives_from_redis() {
    let (sim, version) = (sim(20).await, unique_version("restart"));
    let url = &test_kit::redis().url;
    let first = instance(&sim, url, &version, &[]).await;
    let generated = first.post_narrative(&profile(2)).await;
    assert_eq!(generated.source(), "generated");
    first.shutdown().await;

    let restarted = instance(&sim, url, &version, &[]).await;
    let served = restarted.post_narrative(&profile(2)).await;
    assert_eq!(served.source(), "cache");
    assert_eq!(served.header("x-cache"), "HIT");
    assert_eq!(served.body["narrative"], generated.body["narrative"]);
    assert_eq!(sim.sim.stats().requests, 1, "no second LLM call");
    let stats = restarted.stats().await;
    assert_eq!(stats["mode"], "distributed");
    assert_eq!(stats["tierHits"]["l2"], 1);
}

/// A leader that died holding the lock leaves it to expire; the next request takes
/// over and generates, without hanging past GENERATION_WAIT_MS plus a margin.
#[tokio::test]
async fn a_lock_left_by_a_dead_leader_expires_and_the_next_request_generates() {
    let (sim, version) = (sim(50).await, unique_version("orphan"));
    let url = &test_kit::redis().url;
    let app = instance(&sim, url, &version, &[("GENERATION_WAIT_MS", "3000")]).await;
    let key = app.post_json("/narrative/key", &profile(3)).await.key();

    // What a killed leader leaves behind: its lock, with its TTL running, and no value.
    let mut redis = redis::Client::open(url.as_str())
        .expect("url")
        .get_multiplexed_async_connection()
        .await
        .expect("redis");
    let _: () = redis
        .pset_ex(key.lock_key(), "token-of-a-dead-instance", 800)
        .await
        .expect("SET lock");

    let started = Instant::now();
    let reply = app.post_narrative(&profile(3)).await;
    let took = started.elapsed();
    assert_eq!(
        reply.source(),
        "generated",
        "taken over once the orphaned lock expired"
    );
    assert_eq!(sim.sim.stats().requests, 1);
    assert!(
        took >= Duration::from_millis(700),
        "it waited for the lock ({took:?})"
    );
    assert!(
        took < Duration::from_millis(3000 + 1000),
        "no request hangs past the wait plus a margin ({took:?})"
    );
}

/// Redis killed under load: no 5xx, L1 hits still served, misses generated in process;
/// Redis back: entries are written to it again without restarting the gateway.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_dying_under_load_degrades_and_recovers() {
    let mut server = RedisServer::start();
    let port = server.port();
    let (sim, version) = (sim(20).await, unique_version("outage"));
    let app = instance(
        &sim,
        &server.url,
        &version,
        &[("REDIS_RETRY_AFTER", "300ms")],
    )
    .await;
    let warm = app.post_narrative(&profile(4)).await;
    assert_eq!(warm.source(), "generated");

    drop(server);
    // Even requests repeat the warm profile (an L1 hit); odd ones are new (misses).
    let bodies: Vec<_> = (0..200u32)
        .map(|i| {
            if i % 2 == 0 {
                profile(4)
            } else {
                profile(2000 + i)
            }
        })
        .collect();
    let during: Vec<_> = join_all(bodies.iter().map(|body| app.post_narrative(body))).await;
    assert!(
        during.iter().all(|r| r.status == 200),
        "no 5xx while Redis is down"
    );
    let hits = during
        .iter()
        .step_by(2)
        .filter(|r| r.source() == "cache")
        .count();
    assert_eq!(hits, 100, "L1 still serves what it holds");
    assert!(during
        .iter()
        .skip(1)
        .step_by(2)
        .all(|r| matches!(r.source(), "generated" | "fallback")));
    let ready = app.get("/readyz").await;
    assert_eq!(ready.status, 200);
    assert_eq!(ready.body["backends"]["cache"]["state"], "down");

    server = RedisServer::start_on(port);
    let mut written = false;
    for n in 0..50 {
        // The breaker probes again after REDIS_RETRY_AFTER; each try is a new profile.
        let reply = app.post_narrative(&profile(1000 + n)).await;
        let mut redis = redis::Client::open(server.url.as_str())
            .expect("url")
            .get_multiplexed_async_connection()
            .await
            .expect("redis");
        let stored: bool = redis.exists(reply.key().as_str()).await.expect("EXISTS");
        if stored {
            written = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(written, "entries reach Redis again once it is back");
}
