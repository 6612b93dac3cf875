//! Privacy, checked end to end: a whole distributed stack (gateway, worker, analytics
//! service; real Redis, RabbitMQ and Postgres) runs traffic with known user ids, API
//! keys and secrets, including failures, a pre-warm and an erasure. Then every log
//! line (debug level, every crate), every Redis key and value, every Postgres row, a
//! copy of every queue message and every metric is searched for them in plain text.

use std::io::Write;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use analytics::app::{run as run_analytics, AnalyticsApp};
use analytics::settings::AnalyticsSettings;
use api_gateway::{run, App, Settings};
use cache_core::config::Vars;
use generator_worker::app::{run as run_worker, WorkerApp};
use generator_worker::settings::WorkerSettings;
use lapin::options::{BasicGetOptions, QueueBindOptions, QueueDeclareOptions};
use lapin::types::FieldTable;
use llm_sim::SimConfig;
use serde_json::json;

const KEY_SECRET: &str = "privacy-key-secret-XYZ987";
const SEAL_KEY: &str = "AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=";
const CLIENT_KEY: &str = "privacy-client-key-ABC123";
const ADMIN_TOKEN: &str = "privacy-admin-token-QWE456";
const LLM_KEY: &str = "sk-privacy-llm-key-RTY789";

fn user(n: u32) -> String {
    format!("privacy-user-{n:04}")
}

/// Log output, shared with the subscriber.
#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

fn profile(n: u32, user: Option<&str>) -> serde_json::Value {
    let lead = 30.0 + f64::from(n) * 0.5;
    let mut body = json!({
        "classification": "primary", "primary": "Vega",
        "percentages": {"Vega": lead, "Lyra": 100.0 - lead},
        "hdData": {"type": "Projector", "authority": "Splenic", "profile": "5/1"},
    });
    if let Some(user) = user {
        body["userId"] = json!(user);
    }
    body
}

async fn listen() -> (tokio::net::TcpListener, String) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    (listener, url)
}

/// Every key and value in Redis, as text.
async fn redis_dump(url: &str) -> String {
    let mut conn = redis::Client::open(url)
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    let keys: Vec<String> = redis::cmd("KEYS")
        .arg("*")
        .query_async(&mut conn)
        .await
        .unwrap();
    assert!(
        !keys.is_empty(),
        "the run left something in Redis to search"
    );
    let mut out = String::new();
    for key in keys {
        let kind: String = redis::cmd("TYPE")
            .arg(&key)
            .query_async(&mut conn)
            .await
            .unwrap();
        let value: Vec<Vec<u8>> = match kind.as_str() {
            "string" => vec![redis::cmd("GET")
                .arg(&key)
                .query_async(&mut conn)
                .await
                .unwrap()],
            "set" => redis::cmd("SMEMBERS")
                .arg(&key)
                .query_async(&mut conn)
                .await
                .unwrap(),
            "hash" => redis::cmd("HGETALL")
                .arg(&key)
                .query_async(&mut conn)
                .await
                .unwrap(),
            "zset" => redis::cmd("ZRANGE")
                .arg(&key)
                .arg(0)
                .arg(-1)
                .query_async(&mut conn)
                .await
                .unwrap(),
            "list" => redis::cmd("LRANGE")
                .arg(&key)
                .arg(0)
                .arg(-1)
                .query_async(&mut conn)
                .await
                .unwrap(),
            _ => Vec::new(),
        };
        out.push_str(&key);
        for part in value {
            out.push(' ');
            out.push_str(&String::from_utf8_lossy(&part));
        }
        out.push('\n');
    }
    out
}

/// Every row of every table, as text.
async fn postgres_dump(pool: &sqlx::PgPool) -> String {
    let tables: Vec<String> = sqlx::query_scalar(
        "SELECT table_name::text FROM information_schema.tables \
         WHERE table_schema = 'public' AND table_type = 'BASE TABLE'",
    )
    .fetch_all(pool)
    .await
    .unwrap();
    let mut out = String::new();
    for table in tables {
        let rows: String = sqlx::query_scalar(&format!(
            "SELECT coalesce(string_agg(t::text, E'\\n'), '') FROM \"{table}\" t"
        ))
        .fetch_one(pool)
        .await
        .unwrap();
        out.push_str(&rows);
        out.push('\n');
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_user_id_key_or_secret_appears_in_logs_redis_postgres_queues_or_metrics() {
    let logs = Captured::default();
    let writer = logs.clone();
    tracing_subscriber::fmt()
        .with_env_filter("debug")
        .with_writer(move || writer.clone())
        .with_ansi(false)
        .init();

    let redis = test_kit::RedisServer::start();
    let amqp = test_kit::rabbitmq().vhost("privacy");
    let database = test_kit::postgres().database("privacy");
    let sim = llm_sim::spawn(SimConfig {
        latency_ms: 10,
        ..SimConfig::default()
    })
    .await
    .unwrap();
    let base = sim.base_url();
    let seal = format!("k1:{SEAL_KEY}");
    let clients = format!("app:{CLIENT_KEY}");

    // Taps: a copy of every job and event batch.
    let tap = narrative_queue::amqp::connect(&amqp, Duration::from_secs(5))
        .await
        .unwrap();
    let channel = tap.create_channel().await.unwrap();
    let queue_settings =
        narrative_queue::queue_settings_from(&Vars::from_pairs([("AMQP_URL", amqp.as_str())]))
            .unwrap()
            .unwrap();
    narrative_queue::topology::declare_all(
        &channel,
        queue_settings.quorum,
        queue_settings.delivery_limit,
    )
    .await
    .unwrap();
    for (queue, exchange, keys) in [
        (
            "privacy.tap.jobs",
            "narrative.jobs",
            &["generate", "prewarm"][..],
        ),
        ("privacy.tap.events", "narrative.events", &["batch"][..]),
    ] {
        channel
            .queue_declare(queue, QueueDeclareOptions::default(), FieldTable::default())
            .await
            .unwrap();
        for key in keys {
            channel
                .queue_bind(
                    queue,
                    exchange,
                    key,
                    QueueBindOptions::default(),
                    FieldTable::default(),
                )
                .await
                .unwrap();
        }
    }

    let common = [
        ("REDIS_URL", redis.url.as_str()),
        ("AMQP_URL", amqp.as_str()),
        ("CACHE_KEY_SECRET", KEY_SECRET),
        ("CACHE_ENCRYPTION_KEY", seal.as_str()),
        ("LLM_BASE_URL", base.as_str()),
        ("LLM_API_KEY", LLM_KEY),
        ("LLM_BACKOFF_BASE", "5ms"),
        ("LLM_BACKOFF_MAX", "20ms"),
    ];
    let analytics_app = AnalyticsApp::build(
        AnalyticsSettings::from_vars(&Vars::from_pairs([
            ("DATABASE_URL", database.as_str()),
            ("AMQP_URL", amqp.as_str()),
        ]))
        .unwrap(),
    )
    .unwrap();
    let (listener, analytics_url) = listen().await;
    tokio::spawn(run_analytics(
        listener,
        analytics_app.clone(),
        std::future::pending(),
    ));
    let worker =
        WorkerApp::build(WorkerSettings::from_vars(&Vars::from_pairs(common)).unwrap()).unwrap();
    let (listener, worker_url) = listen().await;
    tokio::spawn(run_worker(listener, worker.clone(), std::future::pending()));
    let mut gateway_vars = common.to_vec();
    gateway_vars.extend([
        ("DATABASE_URL", database.as_str()),
        ("API_KEYS", clients.as_str()),
        ("ADMIN_TOKEN", ADMIN_TOKEN),
        ("PREWARM_RATE", "100"),
        ("ENGINE_VERSION", "privacy@1"),
    ]);
    let gateway =
        App::build(Settings::from_vars(&Vars::from_pairs(gateway_vars)).unwrap()).unwrap();
    let (listener, url) = listen().await;
    tokio::spawn(run(listener, gateway, std::future::pending()));
    for _ in 0..500 {
        if worker.consuming.get() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }

    let client = reqwest::Client::new();
    let post = |body: serde_json::Value, token: &'static str| {
        let client = client.clone();
        let url = url.clone();
        async move {
            client
                .post(format!("{url}/narrative"))
                .bearer_auth(token)
                .json(&body)
                .send()
                .await
                .unwrap()
                .status()
                .as_u16()
        }
    };
    // Misses and hits for five users; a failing LLM (fallbacks, warnings); requests
    // refused (a wrong key, a bad body that names its user); a pre-warm; an erasure.
    for n in 1..=5 {
        assert_eq!(post(profile(n, Some(&user(n))), CLIENT_KEY).await, 200);
        assert_eq!(post(profile(n, Some(&user(n))), CLIENT_KEY).await, 200);
    }
    sim.sim.set_config(SimConfig {
        failure_rate: 1.0,
        failure_status: 500,
        ..SimConfig::default()
    });
    assert_eq!(post(profile(20, Some(&user(6))), CLIENT_KEY).await, 200);
    sim.sim.set_config(SimConfig::default());
    assert_eq!(
        post(profile(21, Some(&user(7))), "wrong-key-not-ours-000").await,
        401
    );
    let mut bad = profile(22, Some(&user(8)));
    bad["hdData"]["type"] = json!("Wizard");
    assert_eq!(post(bad, CLIENT_KEY).await, 400);
    let prewarm = client
        .post(format!("{url}/narrative/prewarm"))
        .bearer_auth(ADMIN_TOKEN)
        .json(&json!({"top": 3}))
        .send()
        .await
        .unwrap();
    assert_eq!(prewarm.status(), 202);
    let erased = client
        .delete(format!("{url}/narrative/user/{}", user(5)))
        .bearer_auth(ADMIN_TOKEN)
        .send()
        .await
        .unwrap();
    assert_eq!(erased.status(), 200);

    // Everything reaches Postgres: 12 request events (the 401 and 400 are not requests).
    let pool = analytics_app.store.pool().clone();
    test_kit::eventually(
        "the events in Postgres",
        Duration::from_secs(30),
        || async {
            sqlx::query_scalar::<_, i64>(
                "SELECT coalesce(sum(requests), 0)::int8 FROM request_rollup_minute",
            )
            .fetch_one(&pool)
            .await
            .unwrap_or(0)
                >= 11
        },
    )
    .await;

    let mut queued = String::new();
    for queue in ["privacy.tap.jobs", "privacy.tap.events"] {
        let mut messages = 0;
        while let Some(message) = channel
            .basic_get(queue, BasicGetOptions { no_ack: true })
            .await
            .unwrap()
        {
            queued.push_str(&String::from_utf8_lossy(&message.delivery.data));
            queued.push('\n');
            messages += 1;
        }
        assert!(messages > 0, "{queue} saw messages");
    }
    let mut metrics = String::new();
    for base in [&url, &worker_url, &analytics_url] {
        metrics.push_str(
            &reqwest::get(format!("{base}/metrics"))
                .await
                .unwrap()
                .text()
                .await
                .unwrap(),
        );
    }
    let redis_text = redis_dump(&redis.url).await;
    let postgres_text = postgres_dump(&pool).await;
    // Last, and in a statement of its own: the dumps above log too, into this buffer.
    let log_text = String::from_utf8_lossy(&logs.0.lock().unwrap()).into_owned();
    let stores = [
        ("logs", log_text),
        ("redis", redis_text),
        ("postgres", postgres_text),
        ("queue messages", queued),
        ("metrics", metrics),
    ];
    let mut secrets: Vec<String> = (1..=8).map(user).collect();
    secrets.extend(
        [
            KEY_SECRET,
            SEAL_KEY,
            CLIENT_KEY,
            ADMIN_TOKEN,
            LLM_KEY,
            "wrong-key-not-ours-000",
        ]
        .map(str::to_owned),
    );
    for (place, text) in &stores {
        assert!(text.len() > 100, "{place} holds something to search");
        for secret in &secrets {
            assert!(
                !text.contains(secret.as_str()),
                "{secret} appears in {place}"
            );
        }
    }
    // The users are there, as keyed hashes only.
    assert!(stores[2].1.contains(
        &cache_core::KeyDeriver::new(
            &cache_core::CacheKeySecret::new(KEY_SECRET.as_bytes().to_vec()),
            cache_core::EngineVersion::parse("privacy@1").unwrap(),
            cache_core::PromptHash::of_parts(&[("x", b"x")]),
            cache_core::QuantizationStep::DEFAULT,
        )
        .user_hash(&user(1))
    ));
    let _ = channel.close(200, "done").await;
    let _ = tap.close(200, "done").await;
}
