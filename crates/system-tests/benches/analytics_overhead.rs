//! What analytics costs a cached hit: the same distributed gateway (Redis, RabbitMQ,
//! L1 on) with events published to RabbitMQ for the `analytics` service
//! (`DATABASE_URL` set), and, side by side in every round, without (events folded
//! into the in-process aggregator, the cheapest path there is).
//!
//! Beside them, the gateway's own share: gateways publishing to vhosts nobody
//! consumes, one for each publisher `BENCH_EVENT_FORMATS` names (default `binary`): a
//! batch format, and after a `/` the most events a batch holds, as in
//! `BENCH_EVENT_FORMATS="binary-v2/1000 binary/1000 binary"`.
//!
//! Everything shares the machine: redis-server, RabbitMQ, PostgreSQL (test kit), the
//! analytics service inserting every event, the gateways, and `loadgen` (closed
//! loop, concurrency 32), which `scripts/bench.sh` builds first. So the "on" figure
//! pays for the whole pipeline's CPU, not just the publish.
//!
//! `cargo build --release -p loadgen && cargo bench -p system-tests --bench analytics_overhead`

use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use analytics::app::{run as run_analytics, AnalyticsApp};
use analytics::settings::AnalyticsSettings;
use api_gateway::{run, App, Settings};
use cache_core::config::Vars;
use generator_worker::app::{run as run_worker, WorkerApp};
use generator_worker::settings::WorkerSettings;
use llm_sim::SimConfig;

const PROFILE: &str = r#"{"classification":"hybrid","hybrid":["Pleiades","Sirius"],
 "percentages":{"Pleiades":42.4,"Sirius":31.7,"Arcturus":15.2,"Lyra":10.7},
 "hdData":{"type":"Manifesting Generator","authority":"Sacral","profile":"3/5","definition":"Split",
   "centers":["Sacral","Throat","Root"],"channels":["34-20"],"gates":[34,20,5,15]},
 "userId":"bench-user"}"#;

async fn gateway(vars: Vec<(&str, &str)>) -> std::net::SocketAddr {
    let app =
        App::build(Settings::from_vars(&Vars::from_pairs(vars)).expect("settings")).expect("app");
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(run(listener, app, std::future::pending()));
    addr
}

fn loadgen() -> PathBuf {
    std::env::var_os("LOADGEN").map_or_else(
        || PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../target/release/loadgen"),
        PathBuf::from,
    )
}

fn load(label: &str, addr: std::net::SocketAddr, body: &std::path::Path, seconds: u32) -> String {
    let output = Command::new(loadgen())
        .args([
            "--addr",
            &addr.to_string(),
            "--path",
            "/narrative",
            "--body-file",
        ])
        .arg(body)
        .args([
            "--concurrency",
            "32",
            "--warmup",
            "1",
            "--seconds",
            &seconds.to_string(),
        ])
        .args(["--expect-header", "x-cache: hit", "--label", label])
        .output()
        .expect("loadgen (cargo build --release -p loadgen)");
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).trim().to_owned()
}

fn field(line: &str, name: &str) -> f64 {
    line.split_whitespace()
        .find_map(|f| f.strip_prefix(name))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0)
}

/// CPU seconds used so far: this process (gateways and the analytics service), the
/// RabbitMQ VM and every PostgreSQL process.
struct Cpu {
    own: f64,
    rabbitmq: f64,
    postgres: f64,
}

impl Cpu {
    fn now() -> Self {
        let mut cpu = Self {
            own: cpu_seconds("self").unwrap_or(0.0),
            rabbitmq: 0.0,
            postgres: 0.0,
        };
        for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
            let pid = entry.file_name().to_string_lossy().into_owned();
            if !pid.bytes().all(|b| b.is_ascii_digit()) {
                continue;
            }
            let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
            match comm.trim() {
                "beam.smp" => cpu.rabbitmq += cpu_seconds(&pid).unwrap_or(0.0),
                "postgres" => cpu.postgres += cpu_seconds(&pid).unwrap_or(0.0),
                _ => {}
            }
        }
        cpu
    }

    fn since(&self, before: &Self) -> Self {
        Self {
            own: self.own - before.own,
            rabbitmq: self.rabbitmq - before.rabbitmq,
            postgres: (self.postgres - before.postgres).max(0.0),
        }
    }
}

/// utime + stime of a process, in seconds (clock ticks of 1/100 s on Linux).
fn cpu_seconds(pid: &str) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let fields: Vec<&str> = stat.rsplit(')').next()?.split_whitespace().collect();
    let ticks: f64 = fields.get(11)?.parse::<f64>().ok()? + fields.get(12)?.parse::<f64>().ok()?;
    Some(ticks / 100.0)
}

/// Events a gateway's publisher has had confirmed, from its `/metrics`.
async fn published_events(client: &reqwest::Client, gateway: std::net::SocketAddr) -> u64 {
    let metrics = client
        .get(format!("http://{gateway}/metrics"))
        .send()
        .await
        .expect("the gateway's metrics")
        .text()
        .await
        .expect("the gateway's metrics");
    metrics
        .lines()
        .find_map(|line| line.strip_prefix("narrative_events_published_total "))
        .and_then(|value| value.trim().parse::<f64>().ok())
        .map(|value| value as u64)
        .expect("narrative_events_published_total in the gateway's metrics")
}

#[tokio::main]
async fn main() {
    let seconds: u32 = std::env::var("BENCH_SECONDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(5);
    let rounds: u32 = std::env::var("BENCH_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(3);
    let sim = llm_sim::spawn(SimConfig {
        latency_ms: 50,
        ..SimConfig::default()
    })
    .await
    .expect("sim");
    let base = sim.base_url();
    let redis = test_kit::redis().url.clone();
    let amqp = test_kit::rabbitmq().vhost("analytics-overhead");
    let database = test_kit::postgres().database("analytics_overhead");

    let service = AnalyticsApp::build(
        AnalyticsSettings::from_vars(&Vars::from_pairs([
            ("DATABASE_URL", database.as_str()),
            ("AMQP_URL", amqp.as_str()),
        ]))
        .expect("settings"),
    )
    .expect("analytics");
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    tokio::spawn(run_analytics(
        listener,
        service.clone(),
        std::future::pending(),
    ));

    let common = vec![
        ("LLM_BASE_URL", base.as_str()),
        ("LLM_API_KEY", "sk-sim"),
        ("CACHE_KEY_SECRET", "bench-secret-0123456789"),
        ("REDIS_URL", redis.as_str()),
        ("AMQP_URL", amqp.as_str()),
        ("ENGINE_VERSION", "narrative@9.9.9"),
    ];
    // A worker generates the two entries the rounds hit.
    let worker = WorkerApp::build(
        WorkerSettings::from_vars(&Vars::from_pairs([
            ("REDIS_URL", redis.as_str()),
            ("AMQP_URL", amqp.as_str()),
            ("LLM_BASE_URL", base.as_str()),
            ("LLM_API_KEY", "sk-sim"),
        ]))
        .expect("worker settings"),
    )
    .expect("worker");
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    tokio::spawn(run_worker(listener, worker, std::future::pending()));

    let off = gateway(common.clone()).await;
    let mut with_database = common.clone();
    with_database.push(("DATABASE_URL", database.as_str()));
    let on = gateway(with_database.clone()).await;
    // The same, publishing to a vhost nobody consumes: the gateway's own share of the
    // cost, without Postgres ingesting on the same cores. One such gateway for each
    // publisher in `BENCH_EVENT_FORMATS` (default `binary`): a batch format, and after
    // a `/` the most events a batch holds (`binary-v2 binary binary/5000`), each to its
    // own vhost, so they compare side by side in the same rounds.
    let formats = std::env::var("BENCH_EVENT_FORMATS").unwrap_or_else(|_| "binary".into());
    let mut publish_only = Vec::new();
    for publisher in formats.split_whitespace() {
        let (format, max_batch) = match publisher.split_once('/') {
            Some((format, max_batch)) => (format, Some(max_batch)),
            None => (publisher, None),
        };
        let vhost = format!("analytics-overhead-parked-{}", publisher.replace('/', "-"));
        let parked = test_kit::rabbitmq().vhost(&vhost);
        // The "on" gateway's settings, publishing elsewhere (a later pair wins).
        let mut parked_vars = with_database.clone();
        parked_vars.push(("AMQP_URL", parked.as_str()));
        parked_vars.push(("EVENT_BATCH_FORMAT", format));
        parked_vars.extend(max_batch.map(|events| ("EVENT_BATCH_MAX", events)));
        publish_only.push((publisher.to_owned(), gateway(parked_vars).await));
    }

    let body = std::env::temp_dir().join(format!("analytics-overhead-{}.json", std::process::id()));
    std::fs::write(&body, PROFILE).expect("profile file");
    let client = reqwest::Client::new();
    for addr in [off, on]
        .into_iter()
        .chain(publish_only.iter().map(|(_, addr)| *addr))
    {
        // Prime the entry: until a request hits.
        for _ in 0..100 {
            let reply = client
                .post(format!("http://{addr}/narrative"))
                .header("content-type", "application/json")
                .body(PROFILE)
                .send()
                .await
                .expect("prime");
            if reply.headers().get("x-cache").is_some_and(|v| v == "HIT") {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    println!(
        "machine: {} cores; concurrency 32, {seconds}s x {rounds} rounds",
        std::thread::available_parallelism().map_or(0, usize::from)
    );
    let metrics = service.metrics().clone();
    // Per round: each parked format's ratio to off, then the whole pipeline's.
    let mut ratios: Vec<Vec<f64>> = vec![Vec::new(); publish_only.len() + 1];
    for round in 1..=rounds {
        // Indexed as reported: off, each parked publisher, then the whole pipeline.
        let mut paths = vec![(0, "analytics off (in-process aggregation)".to_owned(), off)];
        for (n, (format, addr)) in publish_only.iter().enumerate() {
            paths.push((
                n + 1,
                format!("analytics on ({format}), nobody consuming (the gateway's share)"),
                *addr,
            ));
        }
        // A shared machine drifts within a run (seen here: 15% over five rounds), which
        // favours whatever is measured first: every other round runs them backwards.
        if round % 2 == 0 {
            paths.reverse();
        }
        paths.push((
            publish_only.len() + 1,
            "analytics on (RabbitMQ -> analytics -> Postgres, same cores)".to_owned(),
            on,
        ));
        let mut figures = vec![0.0; paths.len()];
        for (index, label, addr) in paths {
            let before = Cpu::now();
            let body = body.clone();
            let label = format!("round{round} {label}");
            let line = tokio::task::spawn_blocking(move || load(&label, addr, &body, seconds))
                .await
                .expect("load");
            let cpu = Cpu::now().since(&before);
            let requests = field(&line, "requests=").max(1.0);
            println!(
                "{line}\n    cpu per hit: gateway+service {:.1} us, rabbitmq {:.1} us, postgres {:.1} us",
                cpu.own / requests * 1e6,
                cpu.rabbitmq / requests * 1e6,
                cpu.postgres / requests * 1e6
            );
            figures[index] = field(&line, "rps=");
            // Let ingest catch up, so it does not run into the next measurement: until
            // every event the "on" gateway published is stored (a pause in inserts is
            // not enough: one insert of merged batches can take longer than a pause).
            let deadline = std::time::Instant::now() + Duration::from_secs(180);
            // Read again each time: the gateway may still be publishing its buffer.
            while metrics.inserted("request") + metrics.duplicates.get()
                < published_events(&client, on).await
            {
                if std::time::Instant::now() > deadline {
                    println!("    (ingest still behind after 180 s; the next figure shares the cores with it)");
                    break;
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
        let off_rps = figures[0].max(1.0);
        let shares: Vec<String> = publish_only
            .iter()
            .zip(&figures[1..])
            .map(|((format, _), rps)| format!("{format} {:.3}", rps / off_rps))
            .collect();
        println!(
            "round{round} ratios: gateway's share {}; whole pipeline on these cores {:.3}",
            shares.join(", "),
            figures[figures.len() - 1] / off_rps
        );
        for (ratios, rps) in ratios.iter_mut().zip(&figures[1..]) {
            ratios.push(rps / off_rps);
        }
    }
    let median = |v: &[f64]| {
        let mut v = v.to_vec();
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    let shares: Vec<String> = publish_only
        .iter()
        .zip(&ratios)
        .map(|((format, _), ratios)| format!("{format} {:.3}", median(ratios)))
        .collect();
    println!(
        "median ratios over {rounds} rounds: gateway's share {}; whole pipeline {:.3}",
        shares.join(", "),
        median(&ratios[ratios.len() - 1])
    );
    // Give the pipeline a moment, then report what reached Postgres.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let stored: i64 = sqlx::query_scalar("SELECT count(*) FROM request_events")
        .fetch_one(service.store.pool())
        .await
        .expect("count");
    let dropped = client
        .get(format!("http://{on}/metrics"))
        .send()
        .await
        .expect("metrics")
        .text()
        .await
        .unwrap_or_default()
        .lines()
        .filter(|l| l.starts_with("narrative_events_dropped_total"))
        .collect::<Vec<_>>()
        .join(", ");
    println!("events stored in Postgres so far: {stored}; {dropped}");
    let _ = std::fs::remove_file(&body);
}
