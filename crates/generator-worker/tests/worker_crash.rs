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
            .env("RUST_LOG", "error")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("generator-worker starts"),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_survives_its_worker_being_killed() {
    let sim = llm_sim::spawn(SimConfig {
        latency_ms: 1500,
        ..SimConfig::default()
    })
    .await
    .expect("sim");
    let amqp = test_kit::rabbitmq().vhost("crash");
    // Key the profile the way a gateway with the same model and prompt would.
    let version = test_kit::unique_prefix("crash")
        .trim_end_matches(':')
        .to_owned();
    let deriver = KeyDeriver::new(
        &CacheKeySecret::new(b"test-secret-0123456789".to_vec()),
        EngineVersion::parse(&version).expect("version"),
        GenerationParams::new("gpt-4o-mini").prompt_hash(prompt::TEMPLATE),
        QuantizationStep::DEFAULT,
    );
    let input = ProfileInput::from_json(
        br#"{"classification":"primary","primary":"Vega","percentages":{"Vega":70,"Lyra":30},
            "hdData":{"type":"Manifestor","authority":"Splenic","profile":"4/1"}}"#,
    )
    .expect("parses");
    let keyed = deriver.derive(&input).expect("valid");

    // What a gateway does: take the fill lock, then enqueue the job with its token.
    let backend = Arc::new(RedisBackend::new(
        RedisTarget::parse(&test_kit::redis().url, false).expect("url"),
        RedisTimeouts::default(),
    ));
    let token = FillLock::new(Arc::clone(&backend), Duration::from_secs(1))
        .try_acquire(&keyed.key)
        .await
        .expect("redis")
        .expect("lock");
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
    let job = Job {
        version: queue::JOB_VERSION,
        key: keyed.key.to_string(),
        canonical: keyed.canonical_json.clone(),
        lock_token: token.as_str().to_owned(),
        trigger: Trigger::Miss,
        request_id: "crash-test".to_owned(),
        enqueued_at_ms: cache_core::now_ms(),
    };
    queue::publish(&channel, &job, Duration::from_secs(5))
        .await
        .expect("confirmed");

    let doomed = start_worker(&amqp, &sim);
    eventually("the first worker to call the LLM", || async {
        sim.sim.stats().requests == 1
    })
    .await;
    drop(doomed); // SIGKILL, mid-generation

    let _survivor = start_worker(&amqp, &sim);
    let store = RedisStore::new(backend, ValueCodec::default());
    eventually("the redelivered job to be stored", || async {
        matches!(store.get(&keyed.key).await, Ok(Some(_)))
    })
    .await;
    assert_eq!(
        sim.sim.stats().requests,
        2,
        "at most one more call per crashed worker"
    );
}

/// Polls every 20 ms for up to 30 s: what other processes do is announced nowhere.
async fn eventually<F, Fut>(what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    for _ in 0..1500 {
        if check().await {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("timed out waiting for {what}");
}
