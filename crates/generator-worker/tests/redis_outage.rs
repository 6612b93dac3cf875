//! Redis stops answering (frozen with SIGSTOP, as a failover looks to a client) after
//! the LLM has answered five jobs: the worker holds them and retries the writes for
//! `REDIS_FAILOVER_WAIT` instead of handing them back. Once Redis answers again the
//! five narratives are stored, and nothing is paid for twice.

use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use cache_core::codec::ValueCodec;
use cache_core::lock::FillLock;
use cache_core::redis_backend::{RedisBackend, RedisTarget, RedisTimeouts};
use cache_core::{
    CacheKeySecret, CacheStore, EngineVersion, KeyDeriver, ProfileInput, QuantizationStep,
    RedisStore,
};
use generator_worker::queue::{self, Job, QueueSettings, Trigger};
use generator_worker::{prompt, GenerationParams};
use llm_sim::SimConfig;

struct Process(Child);

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn signal(pid: u32, name: &str) {
    let status = Command::new("kill")
        .args(["-s", name, &pid.to_string()])
        .status()
        .expect("kill");
    assert!(status.success(), "kill -s {name} {pid}");
}

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
    let version = test_kit::unique_prefix("outage")
        .trim_end_matches(':')
        .to_owned();
    let deriver = KeyDeriver::new(
        &CacheKeySecret::new(b"test-secret-0123456789".to_vec()),
        EngineVersion::parse(&version).expect("version"),
        GenerationParams::new("gpt-4o-mini").prompt_hash(prompt::TEMPLATE),
        QuantizationStep::DEFAULT,
    );
    let backend = Arc::new(RedisBackend::new(
        RedisTarget::parse(&redis.url, false).expect("url"),
        RedisTimeouts {
            call: Duration::from_secs(2),
            ..RedisTimeouts::default()
        },
    ));
    // Long enough that the locks outlive the outage: this test is about the worker
    // keeping its jobs, not about locks expiring.
    let lock = FillLock::new(Arc::clone(&backend), Duration::from_secs(30));
    let settings = QueueSettings {
        url: amqp.clone(),
        quorum: false,
        delivery_limit: 5,
        confirm_timeout: Duration::from_secs(5),
    };
    let connection = queue::connect(&amqp, Duration::from_secs(5))
        .await
        .expect("connect");
    let channel = queue::publishing_channel(&connection, &settings)
        .await
        .expect("channel");

    let mut keys = Vec::new();
    for n in 0..5u32 {
        let json = format!(
            r#"{{"classification":"primary","primary":"Vega","percentages":{{"Vega":{},"Lyra":{}}},"hdData":{{"type":"Manifestor","authority":"Splenic","profile":"4/1"}}}}"#,
            60 + n,
            40 - n
        );
        let keyed = deriver
            .derive(&ProfileInput::from_json(json.as_bytes()).expect("parses"))
            .expect("valid");
        let token = lock
            .try_acquire(&keyed.key)
            .await
            .expect("redis")
            .expect("lock");
        let job = Job {
            version: queue::JOB_VERSION,
            key: keyed.key.to_string(),
            canonical: keyed.canonical_json.clone(),
            lock_token: token.as_str().to_owned(),
            trigger: Trigger::Miss,
            request_id: format!("outage-{n}"),
            enqueued_at_ms: cache_core::now_ms(),
        };
        queue::publish(&channel, &job, Duration::from_secs(5))
            .await
            .expect("confirmed");
        keys.push(keyed.key);
    }

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
    signal(redis.process.pid, "STOP");
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
    signal(redis.process.pid, "CONT");

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
