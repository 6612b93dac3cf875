//! `scale-rehearsal`: the scale-out rehearsal on one machine (docs/operations.md).
//!
//! Starts on loopback a Redis Cluster of three masters with a replica each, RabbitMQ
//! with quorum queues, Postgres, the LLM simulator, analytics, three workers and three
//! gateways, all from release binaries; drives load through every gateway; and during
//! the run stops one gateway and one worker (each restarted after a while, as a
//! Deployment would) and kills one Redis master, whose replica is promoted. Then it
//! drains the queues and reports what clients saw, LLM calls per distinct profile,
//! lost jobs and lost events. Exits 1 when any of those is not what it must be.
//!
//! ```text
//! scripts/rehearsal.sh [--seconds 60] [--clients 48] [--profiles 2000] [--hard]
//! ```
//! `--hard` kills the worker with SIGKILL (a node lost) instead of SIGTERM (a pod
//! deleted, evicted or rolled): jobs in flight are redelivered and regenerated, so
//! LLM calls may exceed distinct profiles by those; nothing may be lost.
//!
//! `--backlog` runs the other scenario instead ([`backlog`]): misses three times
//! faster than the workers, jobs waiting far longer than `LOCK_TTL`. `--hostile`
//! ([`hostile`]): random profiles, user ids and directives as fast as a rate-limited
//! gateway answers, and what that costs in memory and LLM calls.

mod backlog;
mod fleet;
mod hostile;
mod load;

use std::collections::HashSet;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use serde_json::{json, Value};

use fleet::Service;
use load::{Balancer, Popularity};

struct Args {
    bin_dir: PathBuf,
    seconds: f64,
    clients: usize,
    profiles: usize,
    hard: bool,
    backlog: bool,
    hostile: bool,
    report: Option<PathBuf>,
}

fn parse_args() -> anyhow::Result<Args> {
    let mut args = Args {
        bin_dir: PathBuf::from("target/release"),
        seconds: 60.0,
        clients: 48,
        profiles: 2000,
        hard: false,
        backlog: false,
        hostile: false,
        report: None,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = || it.next().with_context(|| format!("{flag} needs a value"));
        match flag.as_str() {
            "--bin-dir" => args.bin_dir = value()?.into(),
            "--seconds" => args.seconds = value()?.parse().context("--seconds")?,
            "--clients" => args.clients = value()?.parse().context("--clients")?,
            "--profiles" => args.profiles = value()?.parse().context("--profiles")?,
            "--report" => args.report = Some(value()?.into()),
            "--hard" => args.hard = true,
            "--backlog" => args.backlog = true,
            "--hostile" => args.hostile = true,
            other => bail!("unknown flag {other}"),
        }
    }
    if args.profiles == 0 || args.profiles > 6400 {
        bail!("--profiles must be 1 to 6400 (distinct keys)");
    }
    Ok(args)
}

/// Profile `n` (below 6,400, each its own cache key), asked for by one of many users.
fn profile(n: usize, user: usize) -> Value {
    let lead = 30.0 + (n % 100) as f64 * 0.5;
    json!({
        "classification": "primary",
        "primary": "Pleiades",
        "percentages": {"Pleiades": lead, "Sirius": 100.0 - lead},
        "hdData": {"type": "Generator", "authority": "Sacral", "profile": "2/4", "gates": [1 + (n / 100) % 64]},
        "userId": format!("rehearsal-user-{user}"),
    })
}

/// What happened when, for the report.
#[derive(Default)]
struct Timeline {
    start: Option<Instant>,
    lines: Vec<String>,
}

impl Timeline {
    fn note(&mut self, what: String) {
        let at = self.start.map_or(0.0, |s| s.elapsed().as_secs_f64());
        println!("  t={at:6.1}s  {what}");
        self.lines.push(format!("t={at:.1}s {what}"));
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = parse_args()?;
    if args.hostile {
        let shape = hostile::Shape {
            seconds: args.seconds,
            clients: 64,
            rate_limit_rps: 200,
            max_pending: 128,
            budget_usd: 0.5,
        };
        let report = hostile::run(&args.bin_dir, shape).await?;
        if let Some(path) = &args.report {
            std::fs::write(path, serde_json::to_vec_pretty(&report)?)?;
        }
        return Ok(());
    }
    if args.backlog {
        let shape = backlog::Shape {
            seconds: args.seconds,
            prefetch: 4,
            latency_ms: 1000,
        };
        let report = backlog::run(&args.bin_dir, shape).await?;
        if let Some(path) = &args.report {
            std::fs::write(path, serde_json::to_vec_pretty(&report)?)?;
        }
        return Ok(());
    }
    let bin = |name: &str| args.bin_dir.join(name);
    for name in ["api-gateway", "generator-worker", "analytics", "llm-sim"] {
        if !bin(name).exists() {
            bail!(
                "{} missing: run scripts/rehearsal.sh, which builds it",
                bin(name).display()
            );
        }
    }
    let logs = PathBuf::from("target/rehearsal");
    let _ = std::fs::remove_dir_all(&logs);
    std::fs::create_dir_all(&logs)?;
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(60))
        .build()?;

    println!("starting the backing servers");
    let mut cluster = test_kit::RedisCluster::start_with_replicas(1);
    let amqp = test_kit::rabbitmq().vhost("rehearsal");
    let database = test_kit::postgres().database("rehearsal");

    let mut sim = Service::simulator(bin("llm-sim"), 400, 200, &logs);
    sim.start()?;
    sim.wait_ready(&client, "/v1/models").await?;

    let shared = fleet::shared_env(
        &[
            ("RUST_LOG", "info"),
            ("REDIS_URL", cluster.url.as_str()),
            ("REDIS_CLUSTER", "true"),
            // Ten processes share two cores here: a Redis call can wait its turn.
            ("REDIS_TIMEOUT_MS", "1000"),
            // Cover the failover below: the node timeout of 2 s, the election, and the
            // clients finding the new master take 5 to 8 s here. A worker's write after
            // the LLM call waits only while the fill lock surely lives (LOCK_TTL / 2),
            // so the lock is above twice that (docs/redis.md, "When Redis fails").
            ("REDIS_FAILOVER_WAIT", "15s"),
            ("LOCK_TTL", "30s"),
            ("CACHE_KEY_SECRET", "rehearsal-cache-key-secret-0123456789"),
            ("AMQP_URL", amqp.as_str()),
            ("RABBITMQ_QUORUM", "true"),
            ("LLM_API_KEY", "sk-rehearsal"),
        ],
        sim.port,
    );
    let service = |name: &str, binary: &str, extra: Vec<(&str, String)>| {
        Service::member(name, bin(binary), &shared, extra, &logs)
    };

    let mut analytics = service(
        "analytics",
        "analytics",
        vec![("DATABASE_URL", database.clone())],
    );
    analytics.start()?;
    analytics.wait_ready(&client, "/readyz").await?;

    let mut workers: Vec<Service> = (1..=3)
        .map(|i| service(&format!("worker-{i}"), "generator-worker", vec![]))
        .collect();
    let mut gateways: Vec<Service> = (1..=3)
        .map(|i| {
            service(
                &format!("gateway-{i}"),
                "api-gateway",
                vec![
                    ("DATABASE_URL", database.clone()),
                    ("ADMIN_TOKEN", "rehearsal-admin-token-0123456789".into()),
                ],
            )
        })
        .collect();
    for service in workers.iter_mut().chain(gateways.iter_mut()) {
        service.start()?;
    }
    for service in workers.iter_mut().chain(gateways.iter_mut()) {
        service.wait_ready(&client, "/readyz").await?;
    }
    println!(
        "fleet up: 3 gateways, 3 workers, analytics; Redis Cluster of {} nodes; logs in {}",
        cluster.nodes.len(),
        logs.display()
    );

    let profiles: Arc<Vec<Value>> = Arc::new(
        (0..args.profiles)
            .map(|n| profile(n, n * 7 % 5000))
            .collect(),
    );
    let balancer = Arc::new(Balancer::new(gateways.iter().map(|g| g.url("")).collect()));
    let popularity = Arc::new(Popularity::zipf(args.profiles, 1.0));
    let run = Duration::from_secs_f64(args.seconds);
    let start = Instant::now();
    let until = start + run;
    let mut timeline = Timeline {
        start: Some(start),
        ..Timeline::default()
    };
    println!(
        "load: {} clients for {:.0} s over {} profiles (Zipf 1.0)",
        args.clients, args.seconds, args.profiles
    );
    let load = tokio::spawn(load::drive(
        client.clone(),
        Arc::clone(&balancer),
        Arc::clone(&profiles),
        popularity,
        args.clients,
        42,
        until,
    ));

    // The faults, spread over the run.
    let at = |fraction: f64| start + run.mul_f64(fraction);
    let pause = Duration::from_secs(8).min(run.mul_f64(0.12));

    tokio::time::sleep_until(at(0.15).into()).await;
    bounce(&mut gateways[2], "TERM", pause, &client, &mut timeline).await?;
    tokio::time::sleep_until(at(0.4).into()).await;
    let signal = if args.hard { "KILL" } else { "TERM" };
    bounce(&mut workers[1], signal, pause, &client, &mut timeline).await?;
    tokio::time::sleep_until(at(0.65).into()).await;
    let failover = kill_a_master(&mut cluster, &mut timeline).await?;

    let mut tally = load.await?;
    timeline.note(format!("load stopped after {} requests", tally.sent));

    // Drain: every job and event accepted during the run is worked off.
    let broker = narrative_queue::amqp::connect(&amqp, Duration::from_secs(10))
        .await
        .map_err(anyhow::Error::msg)?;
    let channel = broker.create_channel().await?;
    let drained = drain(&channel).await;
    timeline.note(match &drained {
        Ok(()) => "job and event queues drained".to_owned(),
        Err(error) => format!("queues not drained: {error}"),
    });
    let dead = dead_letters(&channel).await?;

    // Every profile asked for must now be cached: a job accepted and never stored
    // would show here as a miss.
    // Every profile answered must now be in Redis itself (not just in some
    // gateway's L1): a job accepted and never stored, or a write lost with the killed
    // master, shows here. A job a worker still holds lands within its generation
    // time, so what is missing is looked at again for a while.
    let stored_in_redis = redis_keys(&cluster.url).await?;
    let asked: HashSet<String> = tally.keys.values().cloned().collect();
    let mut missing: Vec<String> = asked.iter().cloned().collect();
    let patience = Instant::now() + Duration::from_secs(30);
    loop {
        missing = stored_in_redis.missing(&missing).await?;
        if missing.is_empty() || Instant::now() > patience {
            break;
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    let not_cached = missing.len() as u64;

    let distinct = asked.len() as u64;
    let stats: Value = client
        .get(sim.url("/sim/stats"))
        .send()
        .await?
        .json()
        .await?;
    let llm_calls = stats["requests"].as_u64().unwrap_or(0);

    // Each answer is one request event; the stopped gateway flushed its own on the way out.
    let expected_events = tally.answered();
    let stored_events = request_events(&database, expected_events).await?;

    let p50 = tally.percentile_ms(0.5);
    let p99 = tally.percentile_ms(0.99);
    let sources = tally
        .sources
        .iter()
        .map(|(s, n)| format!("{s} {n}"))
        .collect::<Vec<_>>()
        .join(", ");
    let report = json!({
        "mode": if args.hard { "hard (worker SIGKILL)" } else { "graceful (worker SIGTERM)" },
        "seconds": args.seconds,
        "clients": args.clients,
        "profiles": args.profiles,
        "requests_sent": tally.sent,
        "requests_served": tally.ok(),
        "client_errors": tally.errors(),
        "statuses": tally.statuses.iter().map(|(s, n)| (s.to_string(), json!(n))).collect::<serde_json::Map<_, _>>(),
        "sources": tally.sources,
        "rerouted_after_connection_failure": tally.rerouted,
        "latency_ms": {"p50": p50, "p99": p99},
        "distinct_profiles": distinct,
        "llm_calls": llm_calls,
        "llm_calls_per_distinct_profile": if distinct == 0 { 0.0 } else { llm_calls as f64 / distinct as f64 },
        "redis_failover_seconds": failover.as_secs_f64(),
        "queues_drained": drained.is_ok(),
        "dead_lettered_jobs": dead.0,
        "dead_lettered_events": dead.1,
        "profiles_not_cached_at_end": not_cached,
        "request_events_expected": expected_events,
        "request_events_stored": stored_events,
        "timeline": timeline.lines,
    });

    println!(
        "\n== scale-rehearsal report ({})",
        report["mode"].as_str().unwrap_or("")
    );
    println!("requests: {} sent, {} served (200), {} client errors, {} rerouted after a connection failure", tally.sent, tally.ok(), tally.errors(), tally.rerouted);
    println!("answers: {sources}; latency p50 {p50} ms, p99 {p99} ms");
    println!(
        "LLM calls: {llm_calls} for {distinct} distinct profiles ({:.3} per profile)",
        report["llm_calls_per_distinct_profile"]
            .as_f64()
            .unwrap_or(0.0)
    );
    println!(
        "jobs: queues drained: {}, dead-lettered {}, profiles not cached at the end {not_cached} of {}",
        drained.is_ok(),
        dead.0,
        asked.len()
    );
    println!("events: {stored_events} request events stored for {expected_events} answers; {} dead-lettered", dead.1);
    println!(
        "redis: replica promoted {:.1} s after its master was killed",
        failover.as_secs_f64()
    );
    if let Some(path) = &args.report {
        std::fs::write(path, serde_json::to_string_pretty(&report)?)?;
        println!("report written to {}", path.display());
    }

    let mut failures = Vec::new();
    if tally.errors() > 0 {
        failures.push(format!("{} client errors", tally.errors()));
    }
    if !args.hard && llm_calls != distinct {
        failures.push(format!(
            "{llm_calls} LLM calls for {distinct} distinct profiles"
        ));
    }
    if llm_calls < distinct {
        failures.push("fewer LLM calls than profiles answered".to_owned());
    }
    if drained.is_err() || dead != (0, 0) || not_cached > 0 {
        failures.push("jobs or events lost".to_owned());
    }
    if stored_events != expected_events {
        failures.push(format!(
            "{stored_events} request events for {expected_events} answers"
        ));
    }
    drop(gateways);
    drop(workers);
    drop(analytics);
    if failures.is_empty() {
        println!("PASS");
        Ok(())
    } else {
        println!("FAIL: {}", failures.join("; "));
        std::process::exit(1);
    }
}

/// The cluster's keys, asked directly.
struct RedisKeys(redis::cluster_async::ClusterConnection);

async fn redis_keys(urls: &str) -> anyhow::Result<RedisKeys> {
    let client = redis::cluster::ClusterClient::new(urls.split(',').collect::<Vec<_>>())?;
    Ok(RedisKeys(client.get_async_connection().await?))
}

impl RedisKeys {
    /// Those of `keys` that Redis does not hold.
    async fn missing(&self, keys: &[String]) -> anyhow::Result<Vec<String>> {
        let mut missing = Vec::new();
        for key in keys {
            let exists: bool = redis::cmd("EXISTS")
                .arg(key.as_str())
                .query_async(&mut self.0.clone())
                .await?;
            if !exists {
                missing.push(key.clone());
            }
        }
        Ok(missing)
    }
}

/// Stops `service` with `signal`, and after `pause` starts it again, as a Deployment
/// replaces a pod.
async fn bounce(
    service: &mut Service,
    signal: &str,
    pause: Duration,
    client: &reqwest::Client,
    timeline: &mut Timeline,
) -> anyhow::Result<()> {
    let took = service.stop(signal).await?;
    timeline.note(format!(
        "{} stopped by SIG{signal}; exited in {:.2} s",
        service.name,
        took.as_secs_f64()
    ));
    tokio::time::sleep(pause).await;
    service.start()?;
    service.wait_ready(client, "/readyz").await?;
    timeline.note(format!("{} restarted and ready", service.name));
    Ok(())
}

/// Kills (SIGKILL) the master that owns slot 0 and waits until a replica has taken its
/// slots and the cluster is whole again; returns how long that took.
async fn kill_a_master(
    cluster: &mut test_kit::RedisCluster,
    timeline: &mut Timeline,
) -> anyhow::Result<Duration> {
    let nodes_of = |port: u16| test_kit::redis_inline(port, "CLUSTER NODES");
    let first = cluster.nodes[0].port;
    let listing = nodes_of(first);
    let master_port = listing
        .lines()
        .find(|line| {
            line.contains("master")
                && !line.contains("fail")
                && line.split(' ').skip(8).any(|slots| slots.starts_with("0-"))
        })
        .and_then(|line| line.split(' ').nth(1))
        .and_then(|addr| addr.split(['@', ':']).nth(1))
        .and_then(|p| p.parse::<u16>().ok())
        .context("no master owns slot 0")?;
    let index = cluster
        .nodes
        .iter()
        .position(|n| n.port == master_port)
        .context("master not among our nodes")?;
    let killed_at = Instant::now();
    drop(cluster.nodes.remove(index)); // SIGKILL
    timeline.note(format!(
        "Redis master :{master_port} (slots from 0) killed by SIGKILL"
    ));
    let survivor = cluster.nodes[0].port;
    let deadline = killed_at + Duration::from_secs(60);
    while Instant::now() < deadline {
        let info = test_kit::redis_inline(survivor, "CLUSTER INFO");
        let listing = nodes_of(survivor);
        let promoted = listing.lines().any(|line| {
            line.contains("master")
                && !line.contains("fail")
                && !line.contains(&format!(":{master_port}@"))
                && line.split(' ').skip(8).any(|slots| slots.starts_with("0-"))
        });
        if promoted && info.contains("cluster_state:ok") {
            let took = killed_at.elapsed();
            timeline.note(format!(
                "its replica promoted; cluster_state ok after {:.1} s",
                took.as_secs_f64()
            ));
            return Ok(took);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    bail!("no replica took over within 60 s")
}

/// Messages ready in `queue`, asked of the broker (passive declare).
async fn ready_messages(channel: &lapin::Channel, queue: &str) -> anyhow::Result<u32> {
    let options = lapin::options::QueueDeclareOptions {
        passive: true,
        ..Default::default()
    };
    let declared = channel
        .queue_declare(queue, options, lapin::types::FieldTable::default())
        .await
        .with_context(|| format!("queue {queue}"))?;
    Ok(declared.message_count())
}

/// Waits until no job or event is waiting in a queue. (Messages a consumer holds are
/// not counted: the check of every profile afterwards waits for those.)
async fn drain(channel: &lapin::Channel) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let jobs = ready_messages(channel, narrative_queue::topology::JOBS.queue).await?;
        let events = ready_messages(channel, narrative_queue::topology::EVENTS.queue).await?;
        if jobs == 0 && events == 0 {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("still queued after 120 s: {jobs} jobs, {events} event batches");
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// (jobs, event batches) in the dead-letter queues.
async fn dead_letters(channel: &lapin::Channel) -> anyhow::Result<(u32, u32)> {
    Ok((
        ready_messages(channel, "narrative.generate.dead").await?,
        ready_messages(channel, narrative_queue::topology::EVENTS.dead_queue).await?,
    ))
}

/// Request events in Postgres, once they reach `expected` (or after a minute).
async fn request_events(database: &str, expected: u64) -> anyhow::Result<u64> {
    let pool = sqlx::PgPool::connect(database).await?;
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut stored = 0;
    while Instant::now() < deadline {
        let count: i64 = sqlx::query_scalar("SELECT count(*) FROM request_events")
            .fetch_one(&pool)
            .await?;
        stored = u64::try_from(count).unwrap_or(0);
        if stored >= expected {
            break;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    pool.close().await;
    Ok(stored)
}
