//! The topology, the job format and the confirmed publisher against real RabbitMQ
//! nodes (the test kit's), one vhost per test.

use std::time::{Duration, Instant};

use futures::StreamExt as _;
use lapin::options::{BasicConsumeOptions, BasicRejectOptions, QueueDeleteOptions};
use lapin::types::FieldTable;
use narrative_queue::topology::{JOBS, JOB_DEAD_QUEUE as DEAD_QUEUE};
use narrative_queue::{
    amqp, topology, ConfirmedPublisher, Job, PublishError, QueueSettings, Trigger, JOB_VERSION,
};

const QUEUE: &str = JOBS.queue;

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
        version: JOB_VERSION,
        key: format!("narr:narrative@1.0.0:0123456789ab:{{{:064x}}}", n),
        canonical: "{}".to_owned(),
        lock_token: "token".to_owned(),
        trigger: Trigger::Miss,
        request_id: format!("req-{n}"),
        enqueued_at_ms: 1_767_225_600_000,
    }
}

/// A plain channel on the test's vhost, for looking at the queues.
async fn tap(settings: &QueueSettings) -> (lapin::Connection, lapin::Channel) {
    let connection = amqp::connect(&settings.url, Duration::from_secs(5))
        .await
        .expect("connect");
    let channel = connection.create_channel().await.expect("channel");
    (connection, channel)
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
    let publisher = ConfirmedPublisher::new(settings.clone(), Duration::ZERO);
    job(1).publish(&publisher).await.expect("confirmed");
    let (_connection, channel) = tap(&settings).await;
    // Declaring again (another process starting) changes nothing.
    topology::declare_all(&channel, settings.quorum, settings.delivery_limit)
        .await
        .expect("idempotent");

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
    let publisher = ConfirmedPublisher::new(settings.clone(), Duration::ZERO);
    job(2).publish(&publisher).await.expect("confirmed");
    let (_connection, channel) = tap(&settings).await;
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
    let publisher = ConfirmedPublisher::new(settings.clone(), Duration::ZERO);
    job(3).publish(&publisher).await.expect("confirmed");
    let (_connection, channel) = tap(&settings).await;
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
    let publisher = ConfirmedPublisher::new(
        QueueSettings {
            url: format!("amqp://guest:guest@127.0.0.1:{port}/%2f"),
            quorum: false,
            delivery_limit: 2,
            confirm_timeout: Duration::from_secs(2),
        },
        Duration::from_secs(60),
    );
    let error = job(5)
        .publish(&publisher)
        .await
        .expect_err("nothing listens");
    assert!(matches!(error, PublishError::Unreachable(_)), "{error:?}");
    // Within the fail-fast window the broker is not even tried again.
    let again = job(5).publish(&publisher).await.expect_err("still down");
    assert_eq!(
        again,
        PublishError::Unreachable("broker recently unreachable".to_owned())
    );
}

/// `mandatory`: a message no queue takes is an error, not a confirm into nowhere.
#[tokio::test]
async fn a_message_no_queue_takes_is_an_error() {
    let settings = settings("unroutable", false);
    let publisher = ConfirmedPublisher::new(settings.clone(), Duration::ZERO);
    job(6).publish(&publisher).await.expect("routable at first");
    let (_connection, channel) = tap(&settings).await;
    channel
        .queue_delete(QUEUE, QueueDeleteOptions::default())
        .await
        .expect("queue deleted under the publisher");
    assert_eq!(
        job(7).publish(&publisher).await,
        Err(PublishError::Unroutable)
    );
}

/// Publishes share the channel and each waits for its own confirm: a broker that stops
/// answering costs every caller one `confirm_timeout`, not one each in turn behind a
/// lock (which is how misses queued up behind a slow broker while their locks lapsed).
#[tokio::test]
async fn publishes_wait_for_their_confirms_side_by_side() {
    let node = test_kit::RabbitServer::start();
    let confirm_timeout = Duration::from_secs(1);
    let publisher = ConfirmedPublisher::new(
        QueueSettings {
            url: node.default_vhost_url(),
            quorum: false,
            delivery_limit: 2,
            confirm_timeout,
        },
        Duration::ZERO,
    );
    job(8).publish(&publisher).await.expect("connected");
    test_kit::signal(node.process.pid, "STOP");
    let started = Instant::now();
    let results = futures::future::join_all((0..4).map(|n| {
        let publisher = &publisher;
        async move { job(10 + n).publish(publisher).await }
    }))
    .await;
    let elapsed = started.elapsed();
    test_kit::signal(node.process.pid, "CONT");
    assert!(
        results
            .iter()
            .all(|r| r == &Err(PublishError::ConfirmTimeout)),
        "{results:?}"
    );
    // One after another they would take four timeouts.
    assert!(
        elapsed < confirm_timeout * 5 / 2,
        "four stalled publishes took {elapsed:?}"
    );
}

#[test]
fn malformed_and_future_jobs_are_refused() {
    assert!(matches!(
        Job::from_bytes(b"not json"),
        Err(narrative_queue::MalformedJob(_))
    ));
    let mut future = job(4);
    future.version = 2;
    assert!(
        matches!(Job::from_bytes(&future.to_bytes()), Err(narrative_queue::MalformedJob(m)) if m.contains("version 2"))
    );
    let with_user = r#"{"version":1,"key":"k","canonical":"{}","lockToken":"t","trigger":"miss","requestId":"r","enqueuedAtMs":0,"userId":"u"}"#;
    assert!(
        Job::from_bytes(with_user.as_bytes()).is_err(),
        "jobs carry no user id, and nothing unexpected"
    );
}
