//! What a miss costs beyond the LLM's own latency, and how many jobs a worker does.
//!
//! Starts its own redis-server and RabbitMQ node (test kit), an LLM simulator with a
//! fixed 500 ms latency, generator-workers and gateways, all on loopback.
//!
//! 1. Miss overhead: distinct profiles, one at a time, end to end, minus the simulated
//!    500 ms: through a worker (distributed mode) and, side by side, generated in
//!    process by an embedded gateway (the baseline).
//! 2. Worker throughput: one worker with prefetch C takes 4*C concurrent misses;
//!    jobs/s against the ceiling of C / 0.5 s.
//!
//! `cargo bench -p system-tests --bench queue_miss`

use std::time::{Duration, Instant};

use cache_core::config::Vars;
use futures::future::join_all;
use generator_worker::app::{run as run_worker, WorkerApp};
use generator_worker::settings::WorkerSettings;
use llm_sim::SimConfig;
use system_tests::{gateway, percentile, post_narrative, profile};

const SIM_LATENCY_MS: u64 = 500;

async fn worker(vars: Vec<(&str, &str)>) -> WorkerApp {
    let app =
        WorkerApp::build(WorkerSettings::from_vars(&Vars::from_pairs(vars)).expect("settings"))
            .expect("worker");
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    tokio::spawn(run_worker(listener, app.clone(), std::future::pending()));
    while !app.consuming.get() {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    app
}

async fn miss_overhead(label: &str, client: &reqwest::Client, url: &str, first: u32, count: u32) {
    let mut overheads = Vec::new();
    for n in first..first + count {
        let started = Instant::now();
        let reply = post_narrative(client, url, &profile(n)).await;
        assert_eq!(reply["source"], "generated", "{reply}");
        overheads.push(started.elapsed().as_secs_f64() * 1000.0 - SIM_LATENCY_MS as f64);
    }
    overheads.sort_by(f64::total_cmp);
    println!(
        "{label}: misses={count} overhead_ms p50={:.2} p99={:.2} max={:.2}",
        percentile(&overheads, 0.5),
        percentile(&overheads, 0.99),
        overheads[overheads.len() - 1]
    );
}

#[tokio::main]
async fn main() {
    let redis = test_kit::redis().url.clone();
    let sim = llm_sim::spawn(SimConfig {
        latency_ms: SIM_LATENCY_MS,
        ..SimConfig::default()
    })
    .await
    .expect("sim");
    let base = sim.base_url();
    let client = reqwest::Client::new();

    // 1. Miss overhead, through a worker and in process.
    let amqp = test_kit::rabbitmq().vhost("bench-miss");
    let _w = worker(vec![
        ("REDIS_URL", &redis),
        ("AMQP_URL", &amqp),
        ("LLM_BASE_URL", &base),
        ("LLM_API_KEY", "sk"),
    ])
    .await;
    let distributed = gateway(&[
        ("REDIS_URL", &redis),
        ("AMQP_URL", &amqp),
        ("LLM_BASE_URL", &base),
        ("LLM_API_KEY", "sk"),
        ("CACHE_KEY_SECRET", "bench-secret-0123456789"),
        ("ENGINE_VERSION", "bench-miss"),
        ("RUST_LOG", "warn"),
    ])
    .await;
    let embedded = gateway(&[
        ("LLM_BASE_URL", &base),
        ("LLM_API_KEY", "sk"),
        ("CACHE_KEY_SECRET", "bench-secret-0123456789"),
    ])
    .await;
    println!(
        "== miss overhead over the simulated {SIM_LATENCY_MS} ms, sequential, interleaved rounds"
    );
    for round in 0..2 {
        miss_overhead(
            &format!("round{round} embedded (in process)"),
            &client,
            &embedded,
            10_000 + round * 100,
            50,
        )
        .await;
        miss_overhead(
            &format!("round{round} distributed (gateway -> RabbitMQ -> worker -> Redis)"),
            &client,
            &distributed,
            20_000 + round * 100,
            50,
        )
        .await;
    }

    // 2. Worker throughput against prefetch.
    println!("== worker throughput, simulator {SIM_LATENCY_MS} ms, one worker");
    for prefetch in [1u16, 4, 16, 32] {
        let amqp = test_kit::rabbitmq().vhost("bench-throughput");
        let prefetch_text = prefetch.to_string();
        let _w = worker(vec![
            ("REDIS_URL", &redis),
            ("AMQP_URL", &amqp),
            ("LLM_BASE_URL", &base),
            ("LLM_API_KEY", "sk"),
            ("WORKER_PREFETCH", &prefetch_text),
        ])
        .await;
        let version = format!("bench-tp{prefetch}");
        let gw = gateway(&[
            ("REDIS_URL", &redis),
            ("AMQP_URL", &amqp),
            ("LLM_BASE_URL", &base),
            ("LLM_API_KEY", "sk"),
            ("CACHE_KEY_SECRET", "bench-secret-0123456789"),
            ("ENGINE_VERSION", &version),
            ("GENERATION_WAIT_MS", "120000"),
        ])
        .await;
        let jobs = u32::from(prefetch) * 4;
        let started = Instant::now();
        let replies = join_all((0..jobs).map(|n| {
            let (client, gw) = (client.clone(), gw.clone());
            async move {
                client
                    .post(format!("{gw}/narrative"))
                    .json(&profile(30_000 + n))
                    .send()
                    .await
                    .map(|r| r.status().as_u16())
            }
        }))
        .await;
        assert!(replies.iter().all(|r| matches!(r, Ok(200))));
        let seconds = started.elapsed().as_secs_f64();
        let ceiling = f64::from(prefetch) * 1000.0 / SIM_LATENCY_MS as f64;
        println!(
            "prefetch={prefetch}: jobs={jobs} in {seconds:.2}s = {:.1} jobs/s (ceiling {ceiling:.0} jobs/s, {:.0}%)",
            f64::from(jobs) / seconds,
            100.0 * f64::from(jobs) / seconds / ceiling
        );
    }
}
