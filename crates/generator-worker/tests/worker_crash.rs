//! A `generator-worker` process killed (SIGKILL) in the middle of a job: the broker
//! redelivers the unacked job to another worker, which stores the narrative. Nothing
//! accepted is lost, and the crash costs at most one more LLM call.

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

struct Worker(Child);

impl Drop for Worker {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn start_worker(amqp: &str, sim: &llm_sim::SimHandle) -> Worker {
    Worker(
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
    // Key profiles the way a gateway with the same model and prompt would.
    let version = test_kit::unique_prefix("crash")
        .trim_end_matches(':')
        .to_owned();
    let deriver = KeyDeriver::new(
        &CacheKeySecret::new(b"test-secret-0123456789".to_vec()),
        EngineVersion::parse(&version).expect("version"),
        GenerationParams::new("gpt-4o-mini").prompt_hash(prompt::TEMPLATE),
        QuantizationStep::DEFAULT,
    );
    let backend = Arc::new(RedisBackend::new(
        RedisTarget::parse(&test_kit::redis().url, false).expect("url"),
        RedisTimeouts::default(),
    ));
    let lock = FillLock::new(Arc::clone(&backend), Duration::from_secs(1));
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

    // What gateways do on 20 misses: take each key's fill lock, enqueue a job with its token.
    let mut keys = Vec::new();
    for n in 0..20u32 {
        let json = format!(
            r#"{{"classification":"primary","primary":"Vega","percentages":{{"Vega":{},"Lyra":{}}},"hdData":{{"type":"Manifestor","authority":"Splenic","profile":"4/1"}}}}"#,
            50 + n,
            50 - n
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
            request_id: format!("crash-{n}"),
            enqueued_at_ms: cache_core::now_ms(),
        };
        queue::publish(&channel, &job, Duration::from_secs(5))
            .await
            .expect("confirmed");
        keys.push(keyed.key);
    }

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
