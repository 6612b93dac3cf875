//! Redis stops answering (frozen with SIGSTOP, as a failover looks to a client) after
//! the LLM has answered five jobs: the worker holds them and retries the writes for
//! `REDIS_FAILOVER_WAIT` instead of handing them back. Once Redis answers again the
//! five narratives are stored, and nothing is paid for twice.

use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use crate::common::{enqueue_misses, Process};
use cache_core::CacheStore;
use cache_redis::backend::{RedisBackend, RedisTarget, RedisTimeouts};
use cache_redis::codec::ValueCodec;
use cache_redis::RedisStore;
use llm_sim::SimConfig;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frozen_redis_does_not_cost_a_second_llm_call() {
    let redis = test_kit::RedisServer::start();
    let sim = llm_sim::spawn(SimConfig {
        latency_ms: 300,
        ..SimConfig::default()
    })
    .await
    .expect("sim");
    let amqp = test_kit::rabbitmq().vhost("redis-outage");
    let backend = Arc::new(RedisBackend::new(
        RedisTarget::parse(&redis.url, false).expect("url"),
        RedisTimeouts {
            call: Duration::from_secs(2),
            ..RedisTimeouts::default()
        },
    ));
    // Locks that outlive the outage: this test is about the worker keeping its jobs,
    // not about locks expiring.
    let keys = enqueue_misses(&amqp, &backend, "outage", 5, Duration::from_secs(30)).await;

    let _worker = Process(
        Command::new(env!("CARGO_BIN_EXE_generator-worker"))
            .env_clear()
            .env("BIND_ADDR", format!("127.0.0.1:{}", test_kit::free_port()))
            .env("REDIS_URL", &redis.url)
            .env("REDIS_TIMEOUT_MS", "200")
            .env("REDIS_RETRY_AFTER", "200ms")
            .env("REDIS_FAILOVER_WAIT", "60s")
            .env("LOCK_TTL", "30s")
            .env("AMQP_URL", &amqp)
            .env("LLM_BASE_URL", sim.base_url())
            .env("LLM_API_KEY", "sk-test")
            .env("RUST_LOG", "error")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("generator-worker starts"),
    );
    test_kit::eventually(
        "all five jobs at the LLM",
        Duration::from_secs(30),
        || async { sim.sim.stats().requests == 5 },
    )
    .await;
    test_kit::signal(redis.process.pid, "STOP");
    test_kit::eventually(
        "the LLM to answer all five",
        Duration::from_secs(30),
        || async { sim.sim.stats().completions == 5 },
    )
    .await;
    // Nothing signals a call that is not made: hold the outage for a while. A worker
    // that hands a job back (after 1 s) gets it again, finds no value once Redis is
    // back, and pays for it a second time.
    tokio::time::sleep(Duration::from_secs(3)).await;
    test_kit::signal(redis.process.pid, "CONT");

    let store = RedisStore::new(backend, ValueCodec::default());
    for key in &keys {
        test_kit::eventually(
            "each narrative stored once Redis answers",
            Duration::from_secs(30),
            || async { matches!(store.get(key).await, Ok(Some(_))) },
        )
        .await;
    }
    assert_eq!(
        sim.sim.stats().requests,
        5,
        "the paid narratives were kept through the outage"
    );
}
