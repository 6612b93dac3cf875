//! Lock holders that die or freeze. The holder is a real `api-gateway` process, so it
//! can be killed (SIGKILL) or frozen (SIGSTOP) and thawed (SIGCONT); the instance that
//! takes over runs in this test.

use std::time::Duration;

use cache_core::CacheStore;
use cache_redis::backend::{RedisBackend, RedisTarget, RedisTimeouts};
use cache_redis::codec::ValueCodec;
use cache_redis::RedisStore;
use llm_sim::SimConfig;
use redis::AsyncCommands;

use crate::helpers::{profile, reply, spawn_app_with, unique_version};
use crate::process::{spawn_process, Process};

/// A real `api-gateway` process sharing `redis_url`, with a short lock TTL and wait.
async fn gateway_process(
    sim: &llm_sim::SimHandle,
    redis_url: &str,
    version: &str,
) -> (Process, String) {
    let vars = [("LOCK_TTL", "600ms"), ("GENERATION_WAIT_MS", "100")];
    spawn_process(sim, redis_url, version, &vars).await
}

/// A leader killed (SIGKILL) while holding the lock: its lock expires, the next
/// request takes over and generates, and nobody waits past GENERATION_WAIT_MS plus a
/// margin.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_leaders_lock_expires_and_the_next_request_generates() {
    let sim = llm_sim::spawn(SimConfig {
        latency_ms: 3000,
        sign_completions: true,
        ..SimConfig::default()
    })
    .await
    .expect("sim");
    let redis_url = test_kit::redis().url.clone();
    let version = unique_version("killed");
    let (mut leader, leader_url) = gateway_process(&sim, &redis_url, &version).await;
    let client = reqwest::Client::new();
    let first = reply(
        client
            .post(format!("{leader_url}/narrative"))
            .json(&profile(2))
            .send()
            .await
            .expect("answers"),
    )
    .await;
    assert_eq!(first.source(), "fallback", "the leader is still generating");
    let key = first.key();
    let mut redis = redis::Client::open(redis_url.as_str())
        .expect("url")
        .get_multiplexed_async_connection()
        .await
        .expect("redis");
    assert!(
        redis
            .exists::<_, bool>(key.lock_key())
            .await
            .expect("EXISTS"),
        "the leader holds the lock"
    );
    leader.0.kill().expect("SIGKILL");
    let _ = leader.0.wait();

    sim.sim.set_config(SimConfig {
        latency_ms: 50,
        sign_completions: true,
        ..SimConfig::default()
    });
    let next = spawn_app_with(
        sim.clone(),
        &[
            ("REDIS_URL", &redis_url),
            ("ENGINE_VERSION", &version),
            ("GENERATION_WAIT_MS", "2000"),
        ],
    )
    .await;
    let started = std::time::Instant::now();
    let answer = next.post_narrative(&profile(2)).await;
    let took = started.elapsed();
    assert_eq!(
        answer.source(),
        "generated",
        "taken over after the dead leader's lock expired"
    );
    assert!(answer.body["narrative"]
        .as_str()
        .is_some_and(|n| n.ends_with("(completion 2)")));
    assert!(
        took < Duration::from_millis(2000 + 1000),
        "no request hangs past the wait plus a margin ({took:?})"
    );
    assert_eq!(
        sim.sim.stats().requests,
        2,
        "the killed leader's call and the new one"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thawed_holder_neither_releases_the_new_lock_nor_overwrites_the_value() {
    let sim = llm_sim::spawn(SimConfig {
        latency_ms: 1500,
        sign_completions: true,
        ..SimConfig::default()
    })
    .await
    .expect("sim");
    let redis_url = test_kit::redis().url.clone();
    let version = unique_version("paused");
    let (a, a_url) = gateway_process(&sim, &redis_url, &version).await;
    let a_pid = a.0.id();
    let client = reqwest::Client::new();

    // A takes the lock and calls the LLM (1.5 s); its request answers the template at 100 ms.
    let first = reply(
        client
            .post(format!("{a_url}/narrative"))
            .json(&profile(1))
            .send()
            .await
            .expect("A answers"),
    )
    .await;
    assert_eq!(first.source(), "fallback");
    let key = first.key();
    let mut redis = redis::Client::open(redis_url.as_str())
        .expect("url")
        .get_multiplexed_async_connection()
        .await
        .expect("redis");
    let a_token: String = redis.get(key.lock_key()).await.expect("A holds the lock");

    // Freeze A: it can no longer extend its lock, which expires.
    test_kit::signal(a_pid, "STOP");
    sim.sim.set_config(SimConfig {
        latency_ms: 4000,
        sign_completions: true,
        ..SimConfig::default()
    });
    let b = spawn_app_with(
        sim.clone(),
        &[
            ("REDIS_URL", &redis_url),
            ("ENGINE_VERSION", &version),
            ("GENERATION_WAIT_MS", "8000"),
        ],
    )
    .await;
    let body = profile(1);
    let b_request = tokio::spawn(async move {
        let reply = b.post_narrative(&body).await;
        (reply, b)
    });
    test_kit::eventually("B to take the lock over", Duration::from_secs(10), || {
        let (mut redis, lock, a_token) = (redis.clone(), key.lock_key(), a_token.clone());
        async move {
            redis
                .get::<_, Option<String>>(lock)
                .await
                .ok()
                .flatten()
                .is_some_and(|t| t != a_token)
        }
    })
    .await;
    let b_token: String = redis.get(key.lock_key()).await.expect("B holds the lock");

    // Thaw A while B is still generating: A's LLM reply is waiting for it.
    test_kit::signal(a_pid, "CONT");
    test_kit::eventually(
        "A to finish its generation",
        Duration::from_secs(10),
        || async {
            let metrics = client.get(format!("{a_url}/metrics")).send().await;
            match metrics {
                Ok(response) => response
                    .text()
                    .await
                    .unwrap_or_default()
                    .contains("narrative_generations_total{result=\"ok\"} 1"),
                Err(_) => false,
            }
        },
    )
    .await;
    let lock_now: Option<String> = redis.get(key.lock_key()).await.expect("GET lock");
    assert_eq!(
        lock_now.as_deref(),
        Some(b_token.as_str()),
        "A's release left B's lock alone"
    );
    assert!(
        !redis.exists::<_, bool>(key.as_str()).await.expect("EXISTS"),
        "A's late write did not land"
    );

    let (b_reply, _b) = b_request.await.expect("B's request");
    assert_eq!(b_reply.source(), "generated");
    assert!(b_reply.body["narrative"]
        .as_str()
        .is_some_and(|n| n.ends_with("(completion 2)")));
    let backend = std::sync::Arc::new(RedisBackend::new(
        RedisTarget::parse(&redis_url, false).expect("url"),
        RedisTimeouts::default(),
    ));
    let stored = RedisStore::new(backend, ValueCodec::default())
        .get(&key)
        .await
        .expect("get")
        .expect("B's value stored");
    assert!(
        stored.body.ends_with("(completion 2)"),
        "the stored value is B's: {}",
        stored.body
    );
    assert_eq!(
        sim.sim.stats().requests,
        2,
        "a frozen holder costs at most one more call"
    );
}
