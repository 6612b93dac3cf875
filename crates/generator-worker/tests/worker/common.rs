//! What the worker tests share: a worker process that dies with its guard, and the
//! jobs a gateway would enqueue for its misses.

use std::process::Child;
use std::sync::Arc;
use std::time::Duration;

use cache_core::{
    CacheKey, CacheKeySecret, EngineVersion, KeyDeriver, ProfileInput, QuantizationStep,
};
use cache_redis::backend::RedisBackend;
use cache_redis::lock::FillLock;
use narrative_gen::{prompt, GenerationParams};
use narrative_queue::{ConfirmedPublisher, Job, QueueSettings, Trigger, JOB_VERSION};

/// A child process, killed (SIGKILL) when dropped.
pub struct Process(pub Child);

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// What gateways do on `count` misses: take each key's fill lock (for `lock_ttl`),
/// enqueue a job with its token. Keys are derived the way a gateway with the worker's
/// default model and prompt would, under a version of the test's own. Returns them.
pub async fn enqueue_misses(
    amqp: &str,
    backend: &Arc<RedisBackend>,
    label: &str,
    count: u32,
    lock_ttl: Duration,
) -> Vec<CacheKey> {
    let version = test_kit::unique_prefix(label)
        .trim_end_matches(':')
        .to_owned();
    let deriver = KeyDeriver::new(
        &CacheKeySecret::new(b"test-secret-0123456789".to_vec()),
        EngineVersion::parse(&version).expect("version"),
        GenerationParams::new("gpt-4o-mini").prompt_hash(prompt::TEMPLATE),
        QuantizationStep::DEFAULT,
    );
    let lock = FillLock::new(Arc::clone(backend), lock_ttl);
    let settings = QueueSettings {
        url: amqp.to_owned(),
        quorum: false,
        delivery_limit: 5,
        confirm_timeout: Duration::from_secs(5),
    };
    let publisher = ConfirmedPublisher::new(settings, Duration::ZERO);
    let mut keys = Vec::new();
    for n in 0..count {
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
            version: JOB_VERSION,
            key: keyed.key.to_string(),
            canonical: keyed.canonical_json.to_string(),
            lock_token: token.as_str().to_owned(),
            trigger: Trigger::Miss,
            request_id: format!("{label}-{n}"),
            enqueued_at_ms: cache_core::now_ms(),
        };
        job.publish(&publisher).await.expect("confirmed");
        keys.push(keyed.key);
    }
    keys
}
