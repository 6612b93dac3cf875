//! The job queue against a real RabbitMQ node (the test kit's), one vhost per test.

use std::time::Duration;

use futures::StreamExt as _;
use generator_worker::queue::{self, Job, QueueError, QueueSettings, Trigger, DEAD_QUEUE, QUEUE};
use lapin::options::{BasicConsumeOptions, BasicRejectOptions};
use lapin::types::FieldTable;

fn settings(label: &str, quorum: bool) -> QueueSettings {
    QueueSettings {
        url: test_kit::rabbitmq().vhost(label),
        quorum,
        delivery_limit: 2,
        confirm_timeout: Duration::from_secs(5),
    }
}

fn job(n: u32) -> Job {
    Job {
        version: queue::JOB_VERSION,
        key: format!("narr:narrative@1.0.0:0123456789ab:{{{:064x}}}", n),
        canonical: "{}".to_owned(),
        lock_token: "token".to_owned(),
        trigger: Trigger::Miss,
        request_id: format!("req-{n}"),
        enqueued_at_ms: 1_767_225_600_000,
    }
}

async fn consumer(channel: &lapin::Channel, queue: &str) -> lapin::Consumer {
    channel
        .basic_consume(
            queue,
            queue,
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .expect("consume")
}

#[tokio::test]
async fn jobs_are_confirmed_persistent_and_read_back() {
    let settings = settings("publish", false);
    let connection = queue::connect(&settings.url, Duration::from_secs(5))
        .await
        .expect("connect");
    let channel = queue::publishing_channel(&connection, &settings)
        .await
        .expect("channel");
    // Declaring again (another process starting) changes nothing.
    queue::declare_topology(&channel, &settings)
        .await
        .expect("idempotent");
    queue::publish(&channel, &job(1), settings.confirm_timeout)
        .await
        .expect("confirmed");

    let delivery = consumer(&channel, QUEUE)
        .await
        .next()
        .await
        .expect("a job")
        .expect("delivery");
    assert_eq!(delivery.properties.delivery_mode(), &Some(2), "persistent");
    assert_eq!(Job::from_bytes(&delivery.data).expect("parses"), job(1));
}

#[tokio::test]
async fn a_rejected_job_is_dead_lettered() {
    let settings = settings("dead", false);
    let connection = queue::connect(&settings.url, Duration::from_secs(5))
        .await
        .expect("connect");
    let channel = queue::publishing_channel(&connection, &settings)
        .await
        .expect("channel");
    queue::publish(&channel, &job(2), settings.confirm_timeout)
        .await
        .expect("confirmed");
    let delivery = consumer(&channel, QUEUE)
        .await
        .next()
        .await
        .expect("a job")
        .expect("delivery");
    delivery
        .reject(BasicRejectOptions { requeue: false })
        .await
        .expect("reject");
    let dead = consumer(&channel, DEAD_QUEUE)
        .await
        .next()
        .await
        .expect("dead letter")
        .expect("delivery");
    assert_eq!(Job::from_bytes(&dead.data).expect("parses"), job(2));
}

#[tokio::test]
async fn quorum_queues_dead_letter_a_job_redelivered_past_the_limit() {
    let settings = settings("quorum", true);
    let connection = queue::connect(&settings.url, Duration::from_secs(5))
        .await
        .expect("connect");
    let channel = queue::publishing_channel(&connection, &settings)
        .await
        .expect("channel");
    queue::publish(&channel, &job(3), settings.confirm_timeout)
        .await
        .expect("confirmed");
    let mut jobs = consumer(&channel, QUEUE).await;
    // Delivered once and redelivered up to the limit (2), each time handed back.
    for _ in 0..3 {
        let delivery = tokio::time::timeout(Duration::from_secs(10), jobs.next())
            .await
            .expect("delivered")
            .expect("a job")
            .expect("delivery");
        delivery
            .reject(BasicRejectOptions { requeue: true })
            .await
            .expect("requeue");
    }
    let dead = tokio::time::timeout(
        Duration::from_secs(10),
        consumer(&channel, DEAD_QUEUE).await.next(),
    )
    .await
    .expect("dead-lettered past the delivery limit")
    .expect("dead letter")
    .expect("delivery");
    assert_eq!(Job::from_bytes(&dead.data).expect("parses"), job(3));
}

#[tokio::test]
async fn an_unreachable_broker_is_an_error_not_a_hang() {
    let port = test_kit::free_port();
    let error = queue::connect(
        &format!("amqp://guest:guest@127.0.0.1:{port}/%2f"),
        Duration::from_secs(2),
    )
    .await
    .expect_err("nothing listens");
    assert!(matches!(error, QueueError::Unreachable(_)));
}

#[test]
fn malformed_and_future_jobs_are_refused() {
    assert!(matches!(
        Job::from_bytes(b"not json"),
        Err(QueueError::Malformed(_))
    ));
    let mut future = job(4);
    future.version = 2;
    assert!(
        matches!(Job::from_bytes(&future.to_bytes()), Err(QueueError::Malformed(m)) if m.contains("version 2"))
    );
    let with_user = r#"{"version":1,"key":"k","canonical":"{}","lockToken":"t","trigger":"miss","requestId":"r","enqueuedAtMs":0,"userId":"u"}"#;
    assert!(
        Job::from_bytes(with_user.as_bytes()).is_err(),
        "jobs carry no user id, and nothing unexpected"
    );
}
