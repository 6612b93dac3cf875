//! A `generator-worker` process killed (SIGKILL) in the middle of a job: the broker
//! redelivers the unacked job to another worker, which stores the narrative. Nothing
//! accepted is lost, and the crash costs at most one more LLM call.

use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use crate::common::{enqueue_misses, Process};
use cache_core::CacheStore;
use cache_redis::backend::{RedisBackend, RedisTarget, RedisTimeouts};
use cache_redis::codec::ValueCodec;
use cache_redis::RedisStore;
use llm_sim::SimConfig;

fn start_worker(amqp: &str, sim: &llm_sim::SimHandle) -> Process {
    Process(
        Command::new(env!("CARGO_BIN_EXE_generator-worker"))
            .env_clear()
            .env("BIND_ADDR", format!("127.0.0.1:{}", test_kit::free_port()))
            .env("REDIS_URL", &test_kit::redis().url)
            .env("AMQP_URL", amqp)
            .env("LLM_BASE_URL", sim.base_url())
            .env("LLM_API_KEY", "sk-test")
            .env("LOCK_TTL", "1s")
            .env("WORKER_PREFETCH", "20")
            .env("RUST_LOG", "error")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("generator-worker starts"),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn twenty_jobs_survive_their_worker_being_killed() {
    let sim = llm_sim::spawn(SimConfig {
        latency_ms: 3000,
        sign_completions: true,
        ..SimConfig::default()
    })
    .await
    .expect("sim");
    let amqp = test_kit::rabbitmq().vhost("crash");
    let backend = Arc::new(RedisBackend::new(
        RedisTarget::parse(&test_kit::redis().url, false).expect("url"),
        RedisTimeouts::default(),
    ));
    let keys = enqueue_misses(&amqp, &backend, "crash", 20, Duration::from_secs(1)).await;

    let doomed = start_worker(&amqp, &sim);
    test_kit::eventually(
        "all 20 jobs in flight on the first worker",
        Duration::from_secs(30),
        || async { sim.sim.stats().requests == 20 },
    )
    .await;
    drop(doomed); // SIGKILL, with 20 unacked jobs mid-generation

    let _survivor = start_worker(&amqp, &sim);
    let store = RedisStore::new(backend, ValueCodec::default());
    for key in &keys {
        test_kit::eventually(
            "every job to be stored by the survivor",
            Duration::from_secs(30),
            || async { matches!(store.get(key).await, Ok(Some(_))) },
        )
        .await;
        let stored = store.get(key).await.expect("redis").expect("stored");
        let serial: u64 = stored
            .body
            .rsplit("(completion ")
            .next()
            .and_then(|s| s.trim_end_matches(')').parse().ok())
            .expect("signed");
        assert!(
            serial > 20,
            "stored by the survivor, once: completion {serial}"
        );
    }
    assert_eq!(
        sim.sim.stats().requests,
        40,
        "lost jobs 0: each was generated once more, no more"
    );
}

/// The broker drops the worker's connection (a restart, a network cut) while it has 8
/// jobs mid-generation: the worker finishes and stores them before it consumes again,
/// so their redeliveries find the values. 8 LLM calls for 8 jobs, not 16.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jobs_in_flight_when_the_connection_drops_are_not_generated_twice() {
    let sim = llm_sim::spawn(SimConfig {
        latency_ms: 2000,
        ..SimConfig::default()
    })
    .await
    .expect("sim");
    let amqp = test_kit::rabbitmq().vhost("dropped");
    let backend = Arc::new(RedisBackend::new(
        RedisTarget::parse(&test_kit::redis().url, false).expect("url"),
        RedisTimeouts::default(),
    ));
    let keys = enqueue_misses(&amqp, &backend, "dropped", 8, Duration::from_secs(10)).await;
    let _worker = start_worker(&amqp, &sim);
    test_kit::eventually("all 8 jobs in flight", Duration::from_secs(30), || async {
        sim.sim.stats().requests == 8
    })
    .await;
    assert!(test_kit::rabbitmq().close_connections(&amqp) >= 1);

    let store = RedisStore::new(backend, ValueCodec::new(None));
    test_kit::eventually("all 8 keys stored", Duration::from_secs(30), || async {
        let mut stored = 0;
        for key in &keys {
            stored += usize::from(matches!(store.get(key).await, Ok(Some(_))));
        }
        stored == keys.len()
    })
    .await;
    assert_eq!(sim.sim.stats().requests, 8, "no job was generated twice");
}
