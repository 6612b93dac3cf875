//! Sustained event ingest into Postgres.
//!
//! Starts its own PostgreSQL (test kit: `fsync=off`, `synchronous_commit=off`, on the
//! same 2 cores as everything else) and RabbitMQ node.
//!
//! 1. Store only: `PgStore::insert` of 5,000-event batches, one after another (the
//!    consumer's unit of work), rollups and popularity included.
//! 2. End to end: batches of 1,000 events (a gateway publishes up to 5,000) are queued in
//!    RabbitMQ first, then the `analytics` service starts and drains the queue; events/s
//!    from its first insert to its last commit.
//!
//! Events mimic traffic: 2,000 distinct profiles, 20 systems, 80% hits.
//!
//! `cargo bench -p analytics --bench ingest`

use std::time::{Duration, Instant};

use analytics::app::{run, AnalyticsApp};
use analytics::event::{GenerationOutcome, RequestOutcome, Trigger};
use analytics::settings::AnalyticsSettings;
use analytics::{new_event_id, Batch, GenerationEvent, PgStore, RequestEvent};
use cache_core::config::Vars;
use lapin::options::BasicPublishOptions;
use lapin::BasicProperties;
use narrative_queue::amqp;
use narrative_queue::topology::EVENTS;
use time::OffsetDateTime;

const SYSTEMS: [&str; 20] = [
    "Sirius",
    "Pleiades",
    "Lyra",
    "Orion",
    "Arcturus",
    "Andromeda",
    "Vega",
    "Polaris",
    "Antares",
    "Aldebaran",
    "Betelgeuse",
    "Rigel",
    "Capella",
    "Procyon",
    "Altair",
    "Deneb",
    "Spica",
    "Regulus",
    "Canopus",
    "Mintaka",
];

fn batch(size: usize, seed: usize) -> Batch {
    let mut batch = Batch::new();
    let now = OffsetDateTime::now_utc();
    for i in 0..size {
        let n = (seed * size + i).wrapping_mul(2_654_435_761) % 2_000;
        if i % 50 == 49 {
            batch.generations.push(GenerationEvent {
                id: new_event_id(),
                at: now,
                model: "gpt-4o-mini".to_owned(),
                tokens_in: 420,
                tokens_out: 310,
                cost_usd: 0.000_25,
                duration_ms: 2_400,
                attempts: 1,
                outcome: GenerationOutcome::Ok,
                trigger: Trigger::Miss,
                key_digest: format!("{n:064x}"),
            });
            continue;
        }
        let outcome = match i % 10 {
            0 => RequestOutcome::Miss,
            1 => RequestOutcome::Fallback,
            2 => RequestOutcome::HitL2,
            _ => RequestOutcome::HitL1,
        };
        let system = SYSTEMS[n % SYSTEMS.len()];
        batch.requests.push(RequestEvent {
            id: new_event_id(),
            at: now,
            outcome,
            latency_us: 80 + (n as u64 % 400),
            engine_version: "narrative@1.0.0".into(),
            prompt_hash: "e589996ee664".into(),
            classification: "primary".into(),
            primary_system: system.into(),
            client: "mobile-app".into(),
            user_hash: Some(format!("{:032x}", (seed * size + i) % 50_000).into()),
            key_digest: format!("{n:064x}").into(),
            profile: format!(
                r#"{{"classification":"primary","hdData":{{"authority":"Sacral","profile":"2/4","type":"Generator"}},"percentages":{{"{system}":"{}.000","Sirius":"{}.000"}},"primary":"{system}"}}"#,
                30 + n % 40,
                70 - n % 40
            )
            .into(),
            entry_tokens: 730,
            entry_cost_usd: 0.000_25,
            first_delta_us: None,
        });
    }
    batch
}

async fn store_only(url: &str) {
    let store = PgStore::connect_lazy(url, 2, Duration::from_secs(10)).expect("store");
    store.migrate().await.expect("migrate");
    store
        .ensure_partitions(OffsetDateTime::now_utc().date(), 1)
        .await
        .expect("partitions");
    let batches: Vec<Batch> = (0..120).map(|seed| batch(5_000, seed)).collect();
    // Warm up: the first batches create every rollup row and profile.
    for batch in &batches[..10] {
        store.insert(batch).await.expect("insert");
    }
    let started = Instant::now();
    let mut events = 0;
    for batch in &batches[10..] {
        store.insert(batch).await.expect("insert");
        events += batch.len();
    }
    let seconds = started.elapsed().as_secs_f64();
    println!(
        "store only: events={events} seconds={seconds:.2} events_per_s={:.0} (5,000-event batches)",
        events as f64 / seconds
    );
}

async fn end_to_end(url: &str) {
    let amqp_url = test_kit::rabbitmq().vhost("ingest");
    let connection = amqp::connect(&amqp_url, Duration::from_secs(5))
        .await
        .expect("connect");
    let channel = connection.create_channel().await.expect("channel");
    EVENTS
        .declare(&channel, false, None)
        .await
        .expect("topology");
    let batches = 600;
    let mut total = 0u64;
    for seed in 0..batches {
        let batch = batch(1_000, 1_000 + seed);
        total += batch.len() as u64;
        channel
            .basic_publish(
                EVENTS.exchange,
                EVENTS.routing_key,
                BasicPublishOptions::default(),
                &batch.to_bytes(),
                BasicProperties::default().with_delivery_mode(2),
            )
            .await
            .expect("publish");
    }
    let _ = connection.close(200, "queued").await;

    let vars = Vars::from_pairs([("DATABASE_URL", url), ("AMQP_URL", amqp_url.as_str())]);
    let app =
        AnalyticsApp::build(AnalyticsSettings::from_vars(&vars).expect("settings")).expect("app");
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    tokio::spawn(run(listener, app.clone(), std::future::pending()));
    let metrics = app.metrics().clone();
    let stored = || metrics.inserted("request") + metrics.inserted("generation");
    while stored() == 0 {
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    let started = Instant::now();
    let first = stored();
    while stored() < total {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let seconds = started.elapsed().as_secs_f64();
    println!(
        "end to end: events={} seconds={seconds:.2} events_per_s={:.0} (RabbitMQ -> analytics -> Postgres, 1,000-event batches)",
        total - first,
        (total - first) as f64 / seconds
    );
}

#[tokio::main]
async fn main() {
    println!(
        "machine: {} cores; postgres with fsync=off and synchronous_commit=off (test kit)",
        std::thread::available_parallelism().map_or(0, usize::from)
    );
    store_only(&test_kit::postgres().database("ingest_store")).await;
    end_to_end(&test_kit::postgres().database("ingest_e2e")).await;
}
