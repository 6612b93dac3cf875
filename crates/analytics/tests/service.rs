//! The `analytics` service on real RabbitMQ and PostgreSQL: batches in, rows out,
//! redeliveries stored once, unreadable batches dead-lettered.

use std::time::Duration;

use analytics::app::{run, AnalyticsApp};
use analytics::event::RequestOutcome;
use analytics::settings::AnalyticsSettings;
use analytics::{new_event_id, Batch, BatchFormat, RequestEvent};
use cache_core::config::Vars;
use lapin::options::{BasicPublishOptions, QueueDeclareOptions};
use lapin::types::FieldTable;
use lapin::BasicProperties;
use narrative_queue::amqp;
use narrative_queue::topology::EVENTS;
use time::OffsetDateTime;
use tokio::sync::oneshot;

struct Service {
    app: AnalyticsApp,
    ops: String,
    stop: Option<oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<std::io::Result<()>>,
}

impl Service {
    async fn start(label: &str) -> (Self, String) {
        let database = test_kit::postgres().database(label);
        let amqp_url = test_kit::rabbitmq().vhost(label);
        let vars = Vars::from_pairs([
            ("DATABASE_URL", database.as_str()),
            ("AMQP_URL", amqp_url.as_str()),
        ]);
        let app = AnalyticsApp::build(AnalyticsSettings::from_vars(&vars).expect("settings"))
            .expect("app");
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let ops = format!("http://{}", listener.local_addr().expect("addr"));
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(run(listener, app.clone(), async {
            let _ = stopped.await;
        }));
        let service = Self {
            app,
            ops,
            stop: Some(stop),
            task,
        };
        test_kit::eventually(
            "the service to be ready",
            Duration::from_secs(20),
            || async {
                reqwest::get(format!("{}/readyz", service.ops))
                    .await
                    .is_ok_and(|r| r.status() == 200)
            },
        )
        .await;
        (service, amqp_url)
    }

    async fn count(&self, sql: &str) -> i64 {
        sqlx::query_scalar(sql)
            .fetch_one(self.app.store.pool())
            .await
            .unwrap_or_else(|e| panic!("{sql}: {e}"))
    }

    async fn stop(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        let _ = (&mut self.task).await;
    }
}

fn batch(n: usize) -> Batch {
    let mut batch = Batch::new();
    batch.requests = (0..n)
        .map(|i| RequestEvent {
            id: new_event_id(),
            at: OffsetDateTime::now_utc(),
            outcome: if i % 2 == 0 {
                RequestOutcome::HitL1
            } else {
                RequestOutcome::Miss
            },
            latency_us: 300,
            engine_version: "narrative@1.0.0".into(),
            prompt_hash: "e589996ee664".into(),
            classification: "primary".into(),
            primary_system: "Sirius".into(),
            client: "anonymous".into(),
            user_hash: None,
            key_digest: format!("d{i}").into(),
            profile: format!(r#"{{"n":{i}}}"#).into(),
            entry_tokens: 700,
            entry_cost_usd: 0.002,
            first_delta_us: None,
        })
        .collect();
    batch
}

async fn publish_raw(amqp_url: &str, bodies: &[Vec<u8>]) {
    let connection = amqp::connect(amqp_url, Duration::from_secs(5))
        .await
        .expect("connect");
    let channel = connection.create_channel().await.expect("channel");
    for body in bodies {
        channel
            .basic_publish(
                EVENTS.exchange,
                EVENTS.routing_key,
                BasicPublishOptions::default(),
                body,
                BasicProperties::default().with_delivery_mode(2),
            )
            .await
            .expect("publish")
            .await
            .expect("published");
    }
    let _ = connection.close(200, "done").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_delivered_twice_is_stored_once() {
    let (service, amqp_url) = Service::start("redelivery").await;
    let bytes = batch(50).to_bytes();
    // The same batch twice, as a publisher retrying after a lost confirm sends it.
    publish_raw(&amqp_url, &[bytes.clone(), bytes]).await;
    let metrics = service.app.metrics().clone();
    test_kit::eventually("both deliveries handled", Duration::from_secs(20), || {
        let handled = metrics.inserted("request") + metrics.duplicates.get();
        async move { handled == 100 }
    })
    .await;
    assert_eq!(metrics.inserted("request"), 50);
    assert_eq!(metrics.duplicates.get(), 50);
    assert_eq!(
        service.count("SELECT count(*) FROM request_events").await,
        50
    );
    assert_eq!(
        service
            .count("SELECT sum(requests)::int8 FROM request_rollup_minute")
            .await,
        50
    );
    service.stop().await;
}

/// A rolling upgrade: gateways of earlier releases still publish v1 (JSON) and v2
/// (binary, each id written out) while upgraded ones publish v3 (their ids as a run),
/// and a batch may even be redelivered in another format. The consumer stores all
/// alike, each event once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batches_of_every_format_are_stored_alike() {
    let (service, amqp_url) = Service::start("formats").await;
    let (old, previous, mut new) = (batch(40), batch(40), batch(40));
    new.number_requests();
    let mut streamed = new.clone();
    streamed.number_requests();
    for (i, event) in streamed.requests.iter_mut().enumerate() {
        event.user_hash = Some(format!("{i:032x}").into());
        event.first_delta_us = Some(1_000 + i as u64);
    }
    publish_raw(
        &amqp_url,
        &[
            old.to_json_v1(),
            previous.encode(BatchFormat::BinaryV2),
            new.to_bytes(),
            new.to_json_v1(),
            streamed.to_bytes(),
        ],
    )
    .await;
    let metrics = service.app.metrics().clone();
    test_kit::eventually("every delivery handled", Duration::from_secs(20), || {
        let handled = metrics.inserted("request") + metrics.duplicates.get();
        async move { handled == 200 }
    })
    .await;
    assert_eq!(metrics.inserted("request"), 160);
    assert_eq!(metrics.duplicates.get(), 40);
    assert_eq!(metrics.dead_lettered.get(), 0);
    // What each row holds is what its event said, whichever format carried it.
    for event in old
        .requests
        .iter()
        .chain(&previous.requests)
        .chain(&new.requests)
        .chain(&streamed.requests)
    {
        let (profile, user, first_delta, digest): (String, Option<String>, Option<i64>, String) =
            sqlx::query_as(
                "SELECT p.canonical::text, e.user_hash, e.first_delta_us, e.key_digest
                 FROM request_events e JOIN profiles p USING (profile_digest)
                 WHERE e.id = $1",
            )
            .bind(event.id)
            .fetch_one(service.app.store.pool())
            .await
            .expect("stored");
        let stored: serde_json::Value = serde_json::from_str(&profile).expect("profile");
        let sent: serde_json::Value = serde_json::from_str(&event.profile).expect("profile");
        assert_eq!(stored, sent);
        assert_eq!(user.as_deref(), event.user_hash.as_deref());
        assert_eq!(first_delta, event.first_delta_us.map(|us| us as i64));
        assert_eq!(digest, &*event.key_digest);
    }
    service.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreadable_batch_is_dead_lettered_and_the_rest_flow() {
    let (service, amqp_url) = Service::start("poison").await;
    publish_raw(
        &amqp_url,
        &[
            b"not json".to_vec(),
            br#"{"v":99}"#.to_vec(),
            // A binary batch cut short.
            batch(3).to_bytes()[..40].to_vec(),
            batch(3).to_bytes(),
        ],
    )
    .await;
    test_kit::eventually("the good batch stored", Duration::from_secs(20), || async {
        service.count("SELECT count(*) FROM request_events").await == 3
    })
    .await;
    assert_eq!(service.app.metrics().dead_lettered.get(), 3);
    let connection = amqp::connect(&amqp_url, Duration::from_secs(5))
        .await
        .expect("connect");
    let channel = connection.create_channel().await.expect("channel");
    let dead = channel
        .queue_declare(
            EVENTS.dead_queue,
            QueueDeclareOptions {
                passive: true,
                ..QueueDeclareOptions::default()
            },
            FieldTable::default(),
        )
        .await
        .expect("dead queue");
    assert_eq!(dead.message_count(), 3, "kept for inspection, not dropped");
    // ...and shown to operators.
    let depths = service.app.queue_depths.clone();
    test_kit::eventually(
        "the dead letters in metrics",
        Duration::from_secs(30),
        || {
            let seen = depths.get(EVENTS.dead_queue);
            async move { seen == 3 }
        },
    )
    .await;
    service.stop().await;
}
