//! What analytics costs a cached hit: the same distributed gateway (Redis, RabbitMQ,
//! L1 on) with events published to RabbitMQ for the `analytics` service
//! (`DATABASE_URL` set), and, side by side in every round, without (events folded
//! into the in-process aggregator, the cheapest path there is).
//!
//! Beside them, the gateway's own share: gateways publishing to vhosts nobody
//! consumes, one for each publisher `BENCH_EVENT_FORMATS` names (default `binary`): a
//! batch format, and after a `/` the most events a batch holds, as in
//! `BENCH_EVENT_FORMATS="binary-v2/1000 binary/1000 binary"`. Each is measured
//! interleaved with the gateway without analytics (`loadgen --versus`: turns of half a
//! second, in one run of `BENCH_SECONDS` each), and so is a second gateway identical to
//! that one: the control, whose ratio to its twin is what the noise alone makes of two
//! equal gateways. Each of these gateways runs on a runtime of its own, so its CPU a
//! hit is read from its own threads.
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
    serve(Vars::from_pairs(vars)).await
}

/// Builds a gateway and serves it on the current runtime, on a random port.
async fn serve(vars: Vars) -> std::net::SocketAddr {
    let app = App::build(Settings::from_vars(&vars).expect("settings")).expect("app");
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

/// A gateway on a runtime of its own, whose threads are all named `name`, so that its
/// CPU can be read apart from the rest of this process (as if it were a process of
/// its own: Redis, RabbitMQ and publishing tasks all run on its runtime).
struct Apart {
    addr: std::net::SocketAddr,
    name: String,
    runtime: tokio::runtime::Runtime,
}

async fn gateway_apart(name: &str, vars: &[(&str, &str)]) -> Apart {
    // Thread names are cut to 15 bytes in /proc: keep them short and distinct.
    assert!(name.len() <= 15, "thread name {name} is too long");
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name(name)
        .enable_all()
        .build()
        .expect("a gateway's runtime");
    let vars = Vars::from_pairs(vars.iter().copied());
    let addr = runtime
        .spawn(serve(vars))
        .await
        .expect("the gateway starts");
    Apart {
        addr,
        name: name.to_owned(),
        runtime,
    }
}

impl Apart {
    /// CPU seconds its threads have used.
    fn cpu(&self) -> f64 {
        let mut seconds = 0.0;
        for task in std::fs::read_dir("/proc/self/task")
            .into_iter()
            .flatten()
            .flatten()
        {
            let path = task.path();
            let comm = std::fs::read_to_string(path.join("comm")).unwrap_or_default();
            if comm.trim_end() == self.name {
                let tid = task.file_name().to_string_lossy().into_owned();
                seconds += cpu_seconds(&format!("self/task/{tid}")).unwrap_or(0.0);
            }
        }
        seconds
    }

    /// Stops its runtime; dropping one inside this process's runtime would panic.
    fn stop(self) {
        self.runtime.shutdown_background();
    }
}

/// `off` and `other` interleaved in one run, turns of half a second, `seconds` each
/// (odd rounds give off the first turn, even ones `other`): `other`'s requests/s over
/// off's, and off's CPU a hit over `other`'s (both read as the share `other` keeps).
async fn interleaved(
    round: u32,
    off: &Apart,
    other: &Apart,
    label: &str,
    body: &std::path::Path,
    seconds: u32,
) -> (f64, f64) {
    let off_label = format!("round{round} analytics off (in-process aggregation)");
    let other_label = format!("round{round} {label}");
    let (first, second) = if round % 2 == 1 {
        (
            (off.addr, off_label.clone()),
            (other.addr, other_label.clone()),
        )
    } else {
        (
            (other.addr, other_label.clone()),
            (off.addr, off_label.clone()),
        )
    };
    let extra = vec![
        "--versus".to_owned(),
        second.0.to_string(),
        "--versus-label".to_owned(),
        second.1,
        "--phase".to_owned(),
        "0.5".to_owned(),
    ];
    let before = (off.cpu(), other.cpu(), Cpu::now());
    let body = body.to_owned();
    let output = tokio::task::spawn_blocking(move || {
        load_with(&first.1, first.0, &body, 2 * seconds, &extra)
    })
    .await
    .expect("load");
    let (off_cpu, other_cpu) = (off.cpu() - before.0, other.cpu() - before.1);
    let broker = Cpu::now().since(&before.2).rabbitmq;
    let line_of = |label: &str| {
        output
            .lines()
            .find(|line| line.starts_with(&format!("{label}:")))
            .expect("a line for each gateway")
            .to_owned()
    };
    let (off_line, other_line) = (line_of(&off_label), line_of(&other_label));
    let (off_hits, other_hits) = (answered(&off_line), answered(&other_line));
    let (off_us, other_us) = (off_cpu / off_hits * 1e6, other_cpu / other_hits * 1e6);
    println!(
        "{off_line}\n{other_line}\n    cpu per hit: off {off_us:.2} us, the other {other_us:.2} us; rabbitmq {:.2} us a hit of the other",
        broker / other_hits * 1e6
    );
    (
        field(&other_line, "rps=") / field(&off_line, "rps=").max(1.0),
        off_us / other_us.max(f64::MIN_POSITIVE),
    )
}

fn load(label: &str, addr: std::net::SocketAddr, body: &std::path::Path, seconds: u32) -> String {
    load_with(label, addr, body, seconds, &[])
}

/// `extra`: more `loadgen` arguments (`--versus` another gateway, for one).
fn load_with(
    label: &str,
    addr: std::net::SocketAddr,
    body: &std::path::Path,
    seconds: u32,
    extra: &[String],
) -> String {
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
        .args(extra)
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

/// Every request a `loadgen` line says its server answered, the warm-up's included:
/// what CPU read before and after the run is divided by.
fn answered(line: &str) -> f64 {
    (field(line, "requests=") + field(line, "warmup_requests=")).max(1.0)
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

    // The gateway without analytics, and its twin, identical: the control.
    let off = gateway_apart("gw-off", &common).await;
    let twin = gateway_apart("gw-twin", &common).await;
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
    for (n, publisher) in formats.split_whitespace().enumerate() {
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
        let gateway = gateway_apart(&format!("gw-parked-{n}"), &parked_vars).await;
        publish_only.push((publisher.to_owned(), gateway));
    }

    let body = std::env::temp_dir().join(format!("analytics-overhead-{}.json", std::process::id()));
    std::fs::write(&body, PROFILE).expect("profile file");
    let client = reqwest::Client::new();
    for addr in [off.addr, twin.addr, on]
        .into_iter()
        .chain(publish_only.iter().map(|(_, gateway)| gateway.addr))
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
    // Per round, each against off: the twin's ratio (the control), then each parked
    // publisher's by requests/s and by the gateway's CPU a hit; then the whole
    // pipeline's, measured after off in a run of its own.
    let mut control = Vec::new();
    let mut shares: Vec<(Vec<f64>, Vec<f64>)> = vec![Default::default(); publish_only.len()];
    let mut pipeline = Vec::new();
    for round in 1..=rounds {
        let mut line = format!("round{round} ratios to off:");
        let (ratio, _) = interleaved(round, &off, &twin, "off's twin", &body, seconds).await;
        line.push_str(&format!(" control (its twin) {ratio:.3};"));
        control.push(ratio);
        for ((format, parked), (by_rps, by_cpu)) in publish_only.iter().zip(&mut shares) {
            let label = format!("analytics on ({format}), nobody consuming");
            let (rps, cpu) = interleaved(round, &off, parked, &label, &body, seconds).await;
            line.push_str(&format!(
                " gateway's share {format} {rps:.3} (by CPU a hit {cpu:.3});"
            ));
            by_rps.push(rps);
            by_cpu.push(cpu);
        }
        // The whole pipeline, one after the other: its ingest would run into off's
        // turns. A shared machine drifts within a run, which favours whatever is
        // measured first: every other round measures on first.
        let mut paths = [
            (0, "analytics off (in-process aggregation)", off.addr),
            (
                1,
                "analytics on (RabbitMQ -> analytics -> Postgres, same cores)",
                on,
            ),
        ];
        if round % 2 == 0 {
            paths.reverse();
        }
        let mut figures = [0.0; 2];
        for (index, label, addr) in paths {
            let before = Cpu::now();
            let body = body.clone();
            let label = format!("round{round} {label}");
            let line = tokio::task::spawn_blocking(move || load(&label, addr, &body, seconds))
                .await
                .expect("load");
            let cpu = Cpu::now().since(&before);
            let requests = answered(&line);
            println!(
                "{line}\n    cpu per hit: this process {:.1} us, rabbitmq {:.1} us, postgres {:.1} us",
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
        let whole = figures[1] / figures[0].max(1.0);
        pipeline.push(whole);
        println!("{line} whole pipeline on these cores {whole:.3}");
    }
    let median = |v: &[f64]| {
        let mut v = v.to_vec();
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    let range = |v: &[f64]| {
        let (low, high) = v
            .iter()
            .fold((f64::MAX, f64::MIN), |(l, h), x| (l.min(*x), h.max(*x)));
        format!("{low:.3}-{high:.3}")
    };
    let shares: Vec<String> = publish_only
        .iter()
        .zip(&shares)
        .map(|((format, _), (by_rps, by_cpu))| {
            format!(
                "{format} {:.3} ({}; by CPU a hit {:.3}, {})",
                median(by_rps),
                range(by_rps),
                median(by_cpu),
                range(by_cpu)
            )
        })
        .collect();
    println!(
        "median ratios over {rounds} rounds: control {:.3} ({}); gateway's share {}; whole pipeline {:.3}",
        median(&control),
        range(&control),
        shares.join(", "),
        median(&pipeline)
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
    for gateway in [off, twin]
        .into_iter()
        .chain(publish_only.into_iter().map(|(_, gateway)| gateway))
    {
        gateway.stop();
    }
}
