//! Do user misses pay for a pre-warm running beside them?
//!
//! Its own redis-server and RabbitMQ node (test kit), an LLM simulator at a fixed
//! 500 ms, one worker (`WORKER_PREFETCH=8`, `WORKER_PREWARM_PREFETCH=4`) and one
//! gateway (`PREWARM_RATE=8`, what the worker's pre-warm capacity keeps up with), all
//! on loopback. Distinct user misses, one at a time, end to end minus the simulated
//! 500 ms, in three phases: before, while a pre-warm of 500 profiles runs, and after it.
//!
//! `cargo bench -p system-tests --bench prewarm_latency`

use std::time::{Duration, Instant};

use api_gateway::{run, App, Settings};
use cache_core::config::Vars;
use generator_worker::app::{run as run_worker, WorkerApp};
use generator_worker::settings::WorkerSettings;
use llm_sim::SimConfig;
use serde_json::{json, Value};
use system_tests::{percentile, post_narrative, profile};

const SIM_LATENCY_MS: u64 = 500;
const TOKEN: &str = "bench-admin-token-0123";
const MISSES: u32 = 40;
const PREWARMED: u32 = 500;

async fn misses(label: &str, client: &reqwest::Client, url: &str, first: u32) {
    let mut overheads = Vec::new();
    for n in first..first + MISSES {
        let started = Instant::now();
        let reply = post_narrative(client, url, &profile(n)).await;
        assert_eq!(reply["source"], "generated", "{reply}");
        overheads.push(started.elapsed().as_secs_f64() * 1000.0 - SIM_LATENCY_MS as f64);
    }
    overheads.sort_by(f64::total_cmp);
    println!(
        "{label}: misses={MISSES} overhead_ms p50={:.2} p90={:.2} p99={:.2} max={:.2}",
        percentile(&overheads, 0.5),
        percentile(&overheads, 0.9),
        percentile(&overheads, 0.99),
        overheads[overheads.len() - 1]
    );
}

async fn progress(client: &reqwest::Client, url: &str, locations: &[String]) -> (u64, bool) {
    let mut sent = 0;
    let mut done = true;
    for location in locations {
        let state: Value = client
            .get(format!("{url}{location}"))
            .bearer_auth(TOKEN)
            .send()
            .await
            .expect("send")
            .json()
            .await
            .expect("json");
        sent += state["sent"].as_u64().unwrap_or(0);
        done &= state["state"] == "done";
    }
    (sent, done)
}

#[tokio::main]
async fn main() {
    let redis = test_kit::redis().url.clone();
    let amqp = test_kit::rabbitmq().vhost("bench-prewarm");
    let sim = llm_sim::spawn(SimConfig {
        latency_ms: SIM_LATENCY_MS,
        ..SimConfig::default()
    })
    .await
    .expect("sim");
    let base = sim.base_url();
    let worker = WorkerApp::build(
        WorkerSettings::from_vars(&Vars::from_pairs([
            ("REDIS_URL", redis.as_str()),
            ("AMQP_URL", amqp.as_str()),
            ("LLM_BASE_URL", base.as_str()),
            ("LLM_API_KEY", "sk"),
            ("WORKER_PREFETCH", "8"),
            ("WORKER_PREWARM_PREFETCH", "4"),
        ]))
        .expect("settings"),
    )
    .expect("worker");
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    tokio::spawn(run_worker(listener, worker.clone(), std::future::pending()));
    while !worker.consuming.get() {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let app = App::build(
        Settings::from_vars(&Vars::from_pairs([
            ("REDIS_URL", redis.as_str()),
            ("AMQP_URL", amqp.as_str()),
            ("LLM_BASE_URL", base.as_str()),
            ("LLM_API_KEY", "sk"),
            ("CACHE_KEY_SECRET", "bench-secret-0123456789"),
            ("ENGINE_VERSION", "bench-prewarm"),
            ("ADMIN_TOKEN", TOKEN),
            ("PREWARM_RATE", "8"),
        ]))
        .expect("settings"),
    )
    .expect("app");
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let url = format!("http://{}", listener.local_addr().expect("addr"));
    tokio::spawn(run(listener, app, std::future::pending()));
    let client = reqwest::Client::new();

    println!(
        "== user misses (sequential, distinct) over the simulated {SIM_LATENCY_MS} ms, \
         beside a pre-warm of {PREWARMED} profiles at 8/s"
    );
    misses("before (no pre-warm)", &client, &url, 100).await;

    // 500 profiles do not fit one 64 KiB body: five runs of 100.
    let mut locations = Vec::new();
    for chunk in 0..5 {
        let list: Vec<Value> = (0..100).map(|i| profile(1_000 + chunk * 100 + i)).collect();
        let started: Value = client
            .post(format!("{url}/narrative/prewarm"))
            .bearer_auth(TOKEN)
            .json(&json!({ "profiles": list }))
            .send()
            .await
            .expect("send")
            .json()
            .await
            .expect("json");
        locations.push(started["location"].as_str().expect("location").to_owned());
    }
    let (sent_before, _) = progress(&client, &url, &locations).await;
    misses("during the pre-warm", &client, &url, 200).await;
    let (sent_after, done) = progress(&client, &url, &locations).await;
    println!(
        "pre-warm jobs sent during that phase: {} (of {PREWARMED}; finished: {done})",
        sent_after - sent_before
    );
    // Until every pre-warm job has been generated, not just queued.
    let generated = u64::from(2 * MISSES + PREWARMED);
    while sim.sim.stats().requests < generated {
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    misses("after (pre-warm done)", &client, &url, 300).await;
    println!(
        "LLM calls: {} (3 x {MISSES} user misses + {PREWARMED} pre-warmed)",
        sim.sim.stats().requests
    );
}
