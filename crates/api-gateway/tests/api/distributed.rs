//! Several gateway instances sharing one real redis-server (the test kit's), each
//! test under its own ENGINE_VERSION so their keys never meet.

use std::time::{Duration, Instant};

use futures::future::join_all;
use llm_sim::SimConfig;
use redis::AsyncCommands;
use test_kit::RedisServer;

use crate::helpers::{
    assert_served_without_fallback, profile, spawn_app_with, unique_version, TestApp,
};

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

/// For the tests that count LLM calls: a Redis call that times out is a failure the
/// system degrades around with an extra generation, and with the whole suite on two
/// cores the default 250 ms is sometimes exceeded. These tests claim what happens when
/// nothing fails.
const PATIENT: &[(&str, &str)] = &[("REDIS_TIMEOUT_MS", "2000")];

/// 600 concurrent identical misses split across two instances: one LLM call in all.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn six_hundred_identical_misses_across_two_instances_make_one_llm_call() {
    let (sim, version) = (sim(1000).await, unique_version("stampede"));
    let url = &test_kit::redis().url;
    let (a, b) = (
        instance(&sim, url, &version, PATIENT).await,
        instance(&sim, url, &version, PATIENT).await,
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
    assert_served_without_fallback(&replies);
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
        instance(&sim, url, &version, PATIENT).await,
        instance(&sim, url, &version, PATIENT).await,
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
    assert_served_without_fallback(&replies);
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

/// A long outage (past `REDIS_FAILOVER_WAIT`, here zero): no 5xx, L1 hits still
/// served, misses generated in process; Redis back: entries are written to it again
/// without restarting the gateway.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_dying_under_load_degrades_and_recovers() {
    let mut server = RedisServer::start();
    let port = server.port();
    let (sim, version) = (sim(20).await, unique_version("outage"));
    let app = instance(
        &sim,
        &server.url,
        &version,
        &[
            ("REDIS_RETRY_AFTER", "300ms"),
            ("REDIS_FAILOVER_WAIT", "0s"),
        ],
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

/// A short outage (a failover, a restart) costs latency, not LLM calls: misses of one
/// key on two gateways while Redis is down are answered with the template, wait for
/// Redis instead of generating alone, and make one call in all once it is back.
/// With `REDIS_FAILOVER_WAIT=0s` each gateway pays for the key (two calls).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn misses_during_a_short_redis_outage_wait_for_it_and_make_one_call() {
    let server = RedisServer::start();
    let port = server.port();
    let (sim, version) = (sim(20).await, unique_version("failover"));
    let settings = [
        ("REDIS_TIMEOUT_MS", "100"),
        ("REDIS_RETRY_AFTER", "200ms"),
        ("REDIS_FAILOVER_WAIT", "60s"),
        ("GENERATION_WAIT_MS", "300"),
    ];
    let (a, b) = (
        instance(&sim, &server.url, &version, &settings).await,
        instance(&sim, &server.url, &version, &settings).await,
    );
    // Both gateways have talked to Redis before it goes.
    assert_eq!(a.post_narrative(&profile(7)).await.source(), "generated");
    assert_eq!(b.post_narrative(&profile(7)).await.source(), "cache");

    drop(server);
    let body = profile(8);
    let during = join_all((0..10).map(|i| {
        let app = if i % 2 == 0 { &a } else { &b };
        app.post_narrative(&body)
    }))
    .await;
    assert!(
        during
            .iter()
            .all(|r| r.status == 200 && r.source() == "fallback"),
        "answered with the template while Redis is down: {:?}",
        during
            .iter()
            .map(|r| (r.status, r.source()))
            .collect::<Vec<_>>()
    );
    let key = during[0].key();
    for app in [&a, &b] {
        test_kit::eventually(
            "the gateway to see Redis down",
            Duration::from_secs(10),
            || async { app.get("/readyz").await.body["backends"]["cache"]["state"] == "down" },
        )
        .await;
    }
    // No signal marks a call that is not made: hold the outage for a while. Without the
    // wait, each flight generates on its next look (every 250 ms) once Redis is down.
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(
        sim.sim.stats().requests,
        1,
        "no generation while Redis is down"
    );

    let server = RedisServer::start_on(port);
    let redis = redis::Client::open(server.url.as_str())
        .expect("url")
        .get_multiplexed_async_connection()
        .await
        .expect("redis");
    test_kit::eventually(
        "the waiting flights fill the key once Redis is back",
        Duration::from_secs(30),
        || {
            let mut redis = redis.clone();
            let key = key.clone();
            async move { redis.exists::<_, bool>(key.as_str()).await.unwrap_or(false) }
        },
    )
    .await;
    // Each gateway reconnects on its own schedule: it answers from the cache once it
    // has (until then, without generating: the one call is asserted below).
    for app in [&a, &b] {
        test_kit::eventually(
            "the gateway to answer from the cache",
            Duration::from_secs(15),
            || async { app.post_narrative(&body).await.source() == "cache" },
        )
        .await;
    }
    assert_eq!(
        sim.sim.stats().requests,
        2,
        "one call for profile 7, one for profile 8"
    );
}

/// `hitRate` is the fleet's: one instance's misses and another's hits add up.
#[tokio::test]
async fn hit_rate_counts_every_instance() {
    let server = RedisServer::start(); // its own server: the counters hash is global
    let (sim, version) = (sim(10).await, unique_version("hitrate"));
    let (a, b) = (
        instance(&sim, &server.url, &version, &[]).await,
        instance(&sim, &server.url, &version, &[]).await,
    );
    assert_eq!(a.post_narrative(&profile(5)).await.source(), "generated");
    for _ in 0..3 {
        assert_eq!(b.post_narrative(&profile(5)).await.source(), "cache");
    }
    a.shutdown().await; // flushes its counts on the way out
    let stats = b.stats().await;
    assert_eq!(stats["counts"], "global");
    assert_eq!(
        (stats["hits"].as_u64(), stats["misses"].as_u64()),
        (Some(3), Some(1))
    );
    assert_eq!(stats["hitRate"], 0.75);
}

/// A gateway started while Redis is down serves anyway, says so in /readyz, and uses
/// Redis once it arrives.
#[tokio::test]
async fn a_gateway_started_before_redis_serves_and_then_uses_it() {
    let port = test_kit::free_port();
    let url = format!("redis://127.0.0.1:{port}");
    let (sim, version) = (sim(10).await, unique_version("late-redis"));
    let app = instance(
        &sim,
        &url,
        &version,
        &[
            ("REDIS_RETRY_AFTER", "200ms"),
            ("REDIS_FAILOVER_WAIT", "0s"),
        ],
    )
    .await;
    let reply = app.post_narrative(&profile(6)).await;
    assert_eq!(reply.status, 200);
    assert_eq!(reply.source(), "generated", "generated in process");
    let ready = app.get("/readyz").await;
    assert_eq!(
        (ready.status, ready.body["mode"].as_str()),
        (200, Some("distributed"))
    );
    assert_ne!(ready.body["backends"]["cache"]["state"], "up");

    let server = RedisServer::start_on(port);
    let mut stored = false;
    for n in 0..50 {
        let key = app.post_narrative(&profile(3000 + n)).await.key();
        let mut redis = redis::Client::open(server.url.as_str())
            .expect("url")
            .get_multiplexed_async_connection()
            .await
            .expect("redis");
        if redis.exists::<_, bool>(key.as_str()).await.expect("EXISTS") {
            stored = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(stored, "once Redis is up, entries are written to it");
}

/// With CACHE_ENCRYPTION_KEY, no narrative text is readable in Redis.
#[tokio::test]
async fn encrypted_entries_hold_no_plaintext_in_redis() {
    let (sim, version) = (sim(10).await, unique_version("sealed"));
    let url = &test_kit::redis().url;
    let key = "k1:AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=";
    let app = instance(&sim, url, &version, &[("CACHE_ENCRYPTION_KEY", key)]).await;
    let reply = app.post_narrative(&profile(7)).await;
    assert_eq!(reply.source(), "generated");
    let narrative = reply.body["narrative"]
        .as_str()
        .expect("narrative")
        .to_owned();

    let mut redis = redis::Client::open(url.as_str())
        .expect("url")
        .get_multiplexed_async_connection()
        .await
        .expect("redis");
    let stored: Vec<u8> = redis.get(reply.key().as_str()).await.expect("GET");
    assert!(!stored.is_empty());
    let text = String::from_utf8_lossy(&stored);
    for word in narrative
        .split_whitespace()
        .filter(|w| w.len() > 6)
        .take(20)
    {
        assert!(!text.contains(word), "{word:?} is readable in Redis");
    }
    assert_eq!(
        app.post_narrative(&profile(7)).await.body["narrative"],
        narrative.as_str(),
        "and it opens again"
    );
}

/// When another instance replaces an entry, this instance's L1 copy is dropped at
/// once (the pub/sub signal), not after L1_TTL.
#[tokio::test]
async fn replacing_an_entry_elsewhere_drops_l1_copies() {
    use cache_core::CacheStore;
    use cache_redis::backend::{RedisBackend, RedisTarget, RedisTimeouts};
    use cache_redis::codec::ValueCodec;
    use cache_redis::signals::{Signal, SignalBus};
    use cache_redis::RedisStore;
    use std::sync::Arc;

    let (sim, version) = (sim(10).await, unique_version("invalidate"));
    let url = &test_kit::redis().url;
    let app = instance(&sim, url, &version, &[("L1_TTL", "1h")]).await;
    let first = app.post_narrative(&profile(8)).await;
    assert_eq!(app.post_narrative(&profile(8)).await.source(), "cache");
    for _ in 0..200 {
        if app.get("/readyz").await.body["backends"]["cache"]["signals"] == "up" {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }

    // Another instance writes a newer value and says so.
    let backend = Arc::new(RedisBackend::new(
        RedisTarget::parse(url, false).expect("url"),
        RedisTimeouts::default(),
    ));
    let other = RedisStore::new(Arc::clone(&backend), ValueCodec::default());
    let key = first.key();
    let mut newer = (*other.get(&key).await.expect("get").expect("stored")).clone();
    newer.body = "A newer narrative, written by another instance.".to_owned();
    other
        .put(&key, Arc::new(newer), Duration::from_secs(60))
        .await
        .expect("put");
    SignalBus::new(backend, |_| {})
        .publish(Signal::Done, &key)
        .await
        .expect("publish");

    // Pub/sub delivery is the bound; give it up to a second.
    let mut seen = String::new();
    for _ in 0..100 {
        seen = app.post_narrative(&profile(8)).await.body["narrative"]
            .as_str()
            .unwrap_or("")
            .to_owned();
        if seen.starts_with("A newer narrative") {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(
        seen.starts_with("A newer narrative"),
        "L1 kept the old copy: {seen}"
    );
}

/// The same stampede against a three-master Redis Cluster: locks, values, pub/sub and
/// counters all work there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_stampede_holds_on_a_redis_cluster() {
    let (sim, version) = (sim(1000).await, unique_version("cluster"));
    let url = &test_kit::redis_cluster().url;
    let (a, b) = (
        instance(&sim, url, &version, PATIENT).await,
        instance(&sim, url, &version, PATIENT).await,
    );
    let bodies: Vec<_> = (0..3).map(|n| profile(4000 + n)).collect();
    let replies = join_all((0..600).map(|i| {
        let body = &bodies[i % 3];
        if i % 2 == 0 {
            a.post_narrative(body)
        } else {
            b.post_narrative(body)
        }
    }))
    .await;
    assert_served_without_fallback(&replies);
    assert_eq!(
        sim.sim.stats().requests,
        3,
        "one LLM call per key across the cluster"
    );
    for body in &bodies {
        assert_eq!(a.post_narrative(body).await.source(), "cache");
        assert_eq!(b.post_narrative(body).await.source(), "cache");
    }
    let ready = a.get("/readyz").await;
    assert_eq!(ready.body["backends"]["cache"]["state"], "up");
    assert_eq!(ready.body["backends"]["cache"]["signals"], "up");
}

/// `GET /narrative/{key}` answers 202 on every instance while any of them generates
/// the key, and 200 on every instance once it is stored.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn get_by_key_is_pending_on_every_instance_while_one_generates() {
    let (sim, version) = (sim(800).await, unique_version("pending"));
    let url = &test_kit::redis().url;
    let a = instance(&sim, url, &version, &[("GENERATION_WAIT_MS", "50")]).await;
    let b = instance(&sim, url, &version, &[]).await;
    let started = a.post_narrative(&profile(9)).await;
    assert_eq!(started.source(), "fallback", "A is still generating");
    let path = format!("/narrative/{}", started.key().to_path_segment());
    assert_eq!(b.get(&path).await.status, 202, "B knows A is generating it");
    a.state.service.settled(&started.key()).await;
    assert_eq!(b.get(&path).await.status, 200);
    assert_eq!(a.get(&path).await.status, 200);
}

/// `GET`s Redis has answered since it started.
fn redis_gets(port: u16) -> u64 {
    let info = test_kit::redis_inline(port, "INFO commandstats");
    info.lines()
        .find_map(|line| line.strip_prefix("cmdstat_get:calls="))
        .and_then(|rest| rest.split(',').next())
        .and_then(|calls| calls.parse().ok())
        .expect("INFO commandstats counts GET calls")
}

/// With L1 off, thirty concurrent hits of one key while Redis holds its replies back
/// (`CLIENT PAUSE`, as a loaded Redis does): the first read waits, the other requests
/// gather behind it and share the next read, so Redis answers a few `GET`s, not
/// thirty, and every request is a hit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_hits_of_one_key_share_their_redis_reads() {
    let redis = RedisServer::start();
    let (sim, version) = (sim(10).await, unique_version("shared-reads"));
    let app = instance(
        &sim,
        &redis.url,
        &version,
        &[("L1_TTL", "0s"), ("REDIS_TIMEOUT_MS", "10000")],
    )
    .await;
    let body = profile(7);
    assert_eq!(app.post_narrative(&body).await.source(), "generated");
    assert_eq!(app.post_narrative(&body).await.source(), "cache");
    let before = redis_gets(redis.port());
    let paused = test_kit::redis_inline(redis.port(), "CLIENT PAUSE 3000 ALL");
    assert!(paused.starts_with("+OK"), "{paused}");
    let replies = join_all((0..30).map(|_| app.post_narrative(&body))).await;
    assert!(replies.iter().all(|r| r.source() == "cache"));
    let gets = redis_gets(redis.port()) - before;
    assert!(gets <= 3, "30 concurrent hits made {gets} GETs");
    let shared = app.stats().await["tierHits"]["l2ReadsShared"]
        .as_u64()
        .expect("l2ReadsShared");
    assert!(shared >= 27, "{shared} reads shared");
}
