//! `scale-rehearsal --backlog`: misses arrive three times faster than the workers
//! generate, for a while, with a short `LOCK_TTL`, so jobs wait in the queue far longer
//! than a lock lives. What it measures is the fill protocol's promise for a backlog:
//! each distinct key is published once and generated once, however long it waits.
//!
//! One gateway and one worker (`WORKER_PREFETCH` jobs at a time, each taking the
//! simulator's fixed latency) on a standalone Redis and a RabbitMQ vhost; every
//! request is a distinct profile, sent open-loop at three times the worker's rate.
//! After the load, the queue is drained, and the report says jobs handled per key,
//! LLM calls per key, and how many requests were answered with the template.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use serde_json::{json, Value};

use crate::fleet::Service;

/// How the backlog is shaped.
#[derive(Debug, Clone, Copy)]
pub struct Shape {
    pub seconds: f64,
    /// Jobs a worker has in flight (`WORKER_PREFETCH`).
    pub prefetch: u32,
    /// The simulator's latency per call.
    pub latency_ms: u64,
}

impl Shape {
    /// Misses a second: three times what the worker generates.
    fn miss_rate(self) -> f64 {
        3.0 * f64::from(self.prefetch) * 1000.0 / self.latency_ms as f64
    }
}

pub async fn run(bin_dir: &Path, shape: Shape) -> anyhow::Result<Value> {
    let bin = |name: &str| bin_dir.join(name);
    let logs = Path::new("target/rehearsal-backlog");
    let _ = std::fs::remove_dir_all(logs);
    std::fs::create_dir_all(logs)?;
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(60))
        .build()?;
    let redis = &test_kit::redis().url;
    let amqp = test_kit::rabbitmq().vhost("backlog");
    let mut sim = Service::simulator(bin("llm-sim"), shape.latency_ms, 0, logs);
    sim.start()?;
    sim.wait_ready(&client, "/v1/models").await?;
    let shared = crate::fleet::shared_env(
        &[
            ("RUST_LOG", "warn"),
            ("REDIS_URL", redis.as_str()),
            ("REDIS_TIMEOUT_MS", "1000"),
            ("LOCK_TTL", "5s"),
            ("CACHE_KEY_SECRET", "backlog-cache-key-secret-0123456789"),
            ("AMQP_URL", amqp.as_str()),
            ("LLM_API_KEY", "sk-backlog"),
        ],
        sim.port,
    );
    let service = |name: &str, binary: &str, extra: Vec<(&str, String)>| {
        Service::member(name, bin(binary), &shared, extra, logs)
    };
    let mut worker = service(
        "worker",
        "generator-worker",
        vec![("WORKER_PREFETCH", shape.prefetch.to_string())],
    );
    let mut gateway = service("gateway", "api-gateway", vec![]);
    for service in [&mut worker, &mut gateway] {
        service.start()?;
        service.wait_ready(&client, "/readyz").await?;
    }

    let rate = shape.miss_rate();
    let total = (rate * shape.seconds).round() as usize;
    println!(
        "backlog: {total} distinct misses at {rate:.1}/s for {:.0} s; one worker generating {:.1}/s; LOCK_TTL 5s",
        shape.seconds,
        rate / 3.0
    );
    let started = Instant::now();
    let url = Arc::new(gateway.url("/narrative"));
    let requests: Vec<_> = (0..total)
        .map(|n| {
            let (client, url) = (client.clone(), Arc::clone(&url));
            let at = started + Duration::from_secs_f64(n as f64 / rate);
            tokio::spawn(async move {
                tokio::time::sleep_until(at.into()).await;
                let answer = client.post(url.as_str()).json(&profile(n)).send().await;
                match answer {
                    Ok(response) => response
                        .json::<Value>()
                        .await
                        .ok()
                        .and_then(|body| body["source"].as_str().map(str::to_owned))
                        .unwrap_or_else(|| "error".to_owned()),
                    Err(_) => "error".to_owned(),
                }
            })
        })
        .collect();
    let mut sources: HashMap<String, u64> = HashMap::new();
    for request in requests {
        *sources.entry(request.await?).or_default() += 1;
    }
    println!(
        "  load done after {:.1} s; draining",
        started.elapsed().as_secs_f64()
    );

    // Drained: nothing ready in the queue, and the worker's count of handled jobs has
    // stood still for a while (its last jobs in flight settled).
    let mut handled = worker_jobs(&client, &worker).await?;
    let mut still_since = Instant::now();
    let give_up = Instant::now() + Duration::from_secs(600);
    loop {
        tokio::time::sleep(Duration::from_secs(1)).await;
        let now = worker_jobs(&client, &worker).await?;
        if now.values().sum::<u64>() != handled.values().sum::<u64>() {
            still_since = Instant::now();
        }
        handled = now;
        let ready = ready_jobs(&amqp).await?;
        if ready == 0 && still_since.elapsed() > Duration::from_secs(5 + shape.latency_ms / 500) {
            break;
        }
        anyhow::ensure!(
            Instant::now() < give_up,
            "the job queue did not drain in 10 min"
        );
    }
    let stats: Value = client
        .get(sim.url("/sim/stats"))
        .send()
        .await?
        .json()
        .await?;
    let calls = stats["requests"].as_u64().unwrap_or(0);
    let jobs: u64 = handled.values().sum();
    let per_key = |n: u64| n as f64 / total as f64;
    let fallback = sources.get("fallback").copied().unwrap_or(0);
    let report = json!({
        "seconds": shape.seconds,
        "distinct_keys": total,
        "miss_rate_per_s": rate,
        "worker_rate_per_s": rate / 3.0,
        "jobs_handled": jobs,
        "jobs_per_key": per_key(jobs),
        "job_outcomes": handled,
        "llm_calls": calls,
        "llm_calls_per_key": per_key(calls),
        "answers": sources,
        "template_answers": fallback,
        "template_share": per_key(fallback),
        "drained_after_s": started.elapsed().as_secs_f64(),
    });
    println!("\n== backlog report");
    println!(
        "{total} keys: {jobs} jobs handled ({:.2} a key), {calls} LLM calls ({:.2} a key), {fallback} template answers ({:.0}%)",
        per_key(jobs),
        per_key(calls),
        per_key(fallback) * 100.0
    );
    println!("job outcomes: {handled:?}");
    Ok(report)
}

/// Distinct profile `n` (each its own key), with no user id.
fn profile(n: usize) -> Value {
    let lead = 30.0 + (n % 100) as f64 * 0.5;
    json!({
        "classification": "primary",
        "primary": "Vega",
        "percentages": {"Vega": lead, "Lyra": 100.0 - lead},
        "hdData": {"type": "Projector", "authority": "Splenic", "profile": "3/5", "gates": [1 + (n / 100) % 64]},
    })
}

/// `worker_jobs_total` by outcome, from the worker's `/metrics`.
async fn worker_jobs(
    client: &reqwest::Client,
    worker: &Service,
) -> anyhow::Result<HashMap<String, u64>> {
    let text = client
        .get(worker.url("/metrics"))
        .send()
        .await?
        .text()
        .await?;
    let mut jobs = HashMap::new();
    for line in text.lines() {
        let Some(rest) = line.strip_prefix("worker_jobs_total{outcome=\"") else {
            continue;
        };
        let (outcome, value) = rest.split_once("\"} ").context("metric line")?;
        jobs.insert(outcome.to_owned(), value.trim().parse::<f64>()? as u64);
    }
    Ok(jobs)
}

/// Jobs waiting in the user job queue, not yet delivered.
async fn ready_jobs(amqp: &str) -> anyhow::Result<u32> {
    let connection = narrative_queue::amqp::connect(amqp, Duration::from_secs(5))
        .await
        .map_err(anyhow::Error::msg)?;
    let channel = connection.create_channel().await?;
    let passive = lapin::options::QueueDeclareOptions {
        passive: true,
        ..Default::default()
    };
    let queue = channel
        .queue_declare(
            narrative_queue::topology::JOBS.queue,
            passive,
            Default::default(),
        )
        .await?;
    let _ = connection.close(200, "looked").await;
    Ok(queue.message_count())
}
