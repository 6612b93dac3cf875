//! `scale-rehearsal --hostile`: a client that wants our memory and our LLM budget. For
//! a while, at full rate, distinct random profiles with random user
//! ids and a mix of `no-cache`, `no-store` and `Prefer: respond-async`, through one
//! gateway with Redis and one worker. The client hangs up after 250 ms rather than
//! wait for an answer, so its rate is not bounded by the gateway's. What it measures is what that costs: the
//! gateway's resident memory and Redis' `used_memory` before and after (bounded, or
//! the limits do not hold), LLM calls against what the limits allow, and the answers
//! by status (no 5xx).
//!
//! The gateway runs with a rate limit (`RATE_LIMIT_RPS`), `MAX_PENDING_GENERATIONS`
//! and a daily budget (`LLM_DAILY_BUDGET_USD`), as a production one should.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rand::Rng as _;
use serde_json::{json, Value};

use crate::fleet::Service;

/// The limits the gateway runs with, and the load.
#[derive(Debug, Clone, Copy)]
pub struct Shape {
    pub seconds: f64,
    pub clients: usize,
    pub rate_limit_rps: u32,
    pub max_pending: u32,
    pub budget_usd: f64,
}

pub async fn run(bin_dir: &Path, shape: Shape) -> anyhow::Result<Value> {
    let bin = |name: &str| bin_dir.join(name);
    let logs = Path::new("target/rehearsal-hostile");
    let _ = std::fs::remove_dir_all(logs);
    std::fs::create_dir_all(logs)?;
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(30))
        .pool_max_idle_per_host(shape.clients)
        .build()?;
    let redis = &test_kit::redis().url;
    let amqp = test_kit::rabbitmq().vhost("hostile");
    let mut sim = Service::simulator(bin("llm-sim"), 300, 100, logs);
    sim.start()?;
    sim.wait_ready(&client, "/v1/models").await?;
    // A run's own key space, so that what it stores is what it measures.
    let version = format!("hostile@{}", rand::random::<u32>());
    let shared = crate::fleet::shared_env(
        &[
            ("RUST_LOG", "warn"),
            ("REDIS_URL", redis.as_str()),
            ("CACHE_KEY_SECRET", "hostile-cache-key-secret-0123456789"),
            ("AMQP_URL", amqp.as_str()),
            ("LLM_API_KEY", "sk-hostile"),
            ("ENGINE_VERSION", version.as_str()),
        ],
        sim.port,
    );
    let mut worker = Service::member("worker", bin("generator-worker"), &shared, vec![], logs);
    let mut gateway = Service::member(
        "gateway",
        bin("api-gateway"),
        &shared,
        vec![
            ("RATE_LIMIT_RPS", shape.rate_limit_rps.to_string()),
            ("MAX_PENDING_GENERATIONS", shape.max_pending.to_string()),
            ("LLM_DAILY_BUDGET_USD", shape.budget_usd.to_string()),
        ],
        logs,
    );
    for service in [&mut worker, &mut gateway] {
        service.start()?;
        service.wait_ready(&client, "/readyz").await?;
    }
    let mut redis_conn = redis::Client::open(redis.as_str())?
        .get_multiplexed_async_connection()
        .await?;
    let rss_before = rss_kib(&gateway)?;
    let redis_before = used_memory(&mut redis_conn).await?;
    println!(
        "hostile: {} clients for {:.0} s, random profiles and user ids, no-cache/no-store/respond-async; \
         RATE_LIMIT_RPS {} MAX_PENDING_GENERATIONS {} LLM_DAILY_BUDGET_USD {}",
        shape.clients, shape.seconds, shape.rate_limit_rps, shape.max_pending, shape.budget_usd
    );

    let until = Instant::now() + Duration::from_secs_f64(shape.seconds);
    let url = Arc::new(gateway.url("/narrative"));
    let clients: Vec<_> = (0..shape.clients)
        .map(|_| {
            let (client, url) = (client.clone(), Arc::clone(&url));
            tokio::spawn(async move {
                let mut statuses: BTreeMap<u16, u64> = BTreeMap::new();
                while Instant::now() < until {
                    let (body, directive) = hostile_request();
                    // It does not wait for answers: it hangs up and sends the next.
                    let mut request = client.post(url.as_str()).timeout(HANG_UP_AFTER).json(&body);
                    request = match directive {
                        Directive::None => request,
                        Directive::NoCache => request.header("cache-control", "no-cache"),
                        Directive::NoStore => request.header("cache-control", "no-store"),
                        Directive::RespondAsync => request.header("prefer", "respond-async"),
                    };
                    let status = match request.send().await {
                        Ok(response) => {
                            let status = response.status().as_u16();
                            let _ = response.bytes().await;
                            status
                        }
                        // Hung up (or a connection error): counted apart.
                        Err(_) => 0,
                    };
                    *statuses.entry(status).or_default() += 1;
                }
                statuses
            })
        })
        .collect();
    let mut statuses: BTreeMap<u16, u64> = BTreeMap::new();
    for client in clients {
        for (status, n) in client.await? {
            *statuses.entry(status).or_default() += n;
        }
    }
    let rss_after_load = rss_kib(&gateway)?;
    let redis_after_load = used_memory(&mut redis_conn).await?;
    // What the load started finishes: queued jobs, shed or not, and their writes.
    tokio::time::sleep(Duration::from_secs(15)).await;
    let rss_after = rss_kib(&gateway)?;
    let redis_after = used_memory(&mut redis_conn).await?;
    let calls = client
        .get(sim.url("/sim/stats"))
        .send()
        .await?
        .json::<Value>()
        .await?["requests"]
        .as_u64()
        .unwrap_or(0);
    let gateway_metrics = client
        .get(gateway.url("/metrics"))
        .send()
        .await?
        .text()
        .await?;
    let metric = |text: &str, name: &str| {
        text.lines()
            .find_map(|line| line.strip_prefix(name)?.strip_prefix(' '))
            .and_then(|value| value.trim().parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    let shed = metric(&gateway_metrics, "narrative_generations_shed_total");
    let budget_spent = metric(&gateway_metrics, "llm_budget_exhausted") == 1.0;
    let requests: u64 = statuses.values().sum();
    let server_errors: u64 = statuses
        .iter()
        .filter(|(status, _)| **status >= 500)
        .map(|(_, n)| n)
        .sum();
    let hung_up = statuses.get(&0).copied().unwrap_or(0);
    let admitted = requests - statuses.get(&429).copied().unwrap_or(0);
    let report = json!({
        "seconds": shape.seconds,
        "clients": shape.clients,
        "requests": requests,
        "statuses": statuses,
        "server_errors": server_errors,
        "hung_up_after_250ms": hung_up,
        "admitted_by_rate_limit": admitted,
        "llm_calls": calls,
        "generations_shed": shed,
        "budget_exhausted": budget_spent,
        "gateway_rss_kib": {"before": rss_before, "after_load": rss_after_load, "after_settling": rss_after},
        "redis_used_memory_bytes": {"before": redis_before, "after_load": redis_after_load, "after_settling": redis_after},
    });
    println!("\n== hostile report");
    println!(
        "requests: {requests} in {:.0} s; by status {statuses:?} (0: the client hung up after 250 ms)",
        shape.seconds
    );
    println!(
        "server errors: {server_errors}; admitted past the rate limit: {admitted}; LLM calls: {calls}; \
         generations shed (MAX_PENDING_GENERATIONS): {shed}; budget exhausted: {budget_spent}"
    );
    println!(
        "gateway RSS: {:.1} MiB before, {:.1} MiB after the load, {:.1} MiB 15 s later",
        rss_before as f64 / 1024.0,
        rss_after_load as f64 / 1024.0,
        rss_after as f64 / 1024.0
    );
    println!(
        "redis used_memory: {:.1} MiB before, {:.1} MiB after the load, {:.1} MiB 15 s later",
        redis_before as f64 / 1048576.0,
        redis_after_load as f64 / 1048576.0,
        redis_after as f64 / 1048576.0
    );
    anyhow::ensure!(server_errors == 0, "{server_errors} answers were 5xx");
    Ok(report)
}

/// How long the hostile client waits for an answer before it hangs up.
const HANG_UP_AFTER: Duration = Duration::from_millis(250);

#[derive(Debug, Clone, Copy)]
enum Directive {
    None,
    NoCache,
    NoStore,
    RespondAsync,
}

/// A distinct random profile with a random user id, and a random directive.
fn hostile_request() -> (Value, Directive) {
    let mut rng = rand::rng();
    let lead = f64::from(rng.random_range(500u32..=999)) / 10.0;
    let body = json!({
        "classification": "primary",
        "primary": "Vega",
        "percentages": {"Vega": lead, "Lyra": ((1000.0 - lead * 10.0).round()) / 10.0},
        "hdData": {
            "type": "Projector", "authority": "Splenic", "profile": "3/5",
            "gates": [rng.random_range(1u8..=64), rng.random_range(1u8..=64)],
        },
        "userId": format!("u-{:032x}", rng.random::<u128>()),
    });
    let directive = match rng.random_range(0..4) {
        0 => Directive::None,
        1 => Directive::NoCache,
        2 => Directive::NoStore,
        _ => Directive::RespondAsync,
    };
    (body, directive)
}

/// The process's resident memory, in KiB (`VmRSS`).
fn rss_kib(service: &Service) -> anyhow::Result<u64> {
    let pid = service
        .pid()
        .ok_or_else(|| anyhow::anyhow!("{} is not running", service.name))?;
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    status
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|kib| kib.parse().ok())
        .ok_or_else(|| anyhow::anyhow!("no VmRSS for {}", service.name))
}

async fn used_memory(conn: &mut redis::aio::MultiplexedConnection) -> anyhow::Result<u64> {
    let info: String = redis::cmd("INFO").arg("memory").query_async(conn).await?;
    info.lines()
        .find_map(|line| line.strip_prefix("used_memory:"))
        .and_then(|bytes| bytes.trim().parse().ok())
        .ok_or_else(|| anyhow::anyhow!("no used_memory in INFO"))
}
