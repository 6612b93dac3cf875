//! The kit's pattern on a real server: one redis-server per test binary, shared by
//! every test in it, each test in its own key prefix.

use std::time::Duration;

use cache_core::{now_ms, Envelope};
use redis::AsyncCommands;

async fn connection() -> redis::aio::ConnectionManager {
    let client = redis::Client::open(test_kit::redis().url.as_str()).expect("valid url");
    redis::aio::ConnectionManager::new(client)
        .await
        .expect("connects to the kit's redis")
}

#[test]
fn every_test_in_a_binary_shares_one_server() {
    let first = test_kit::redis();
    let again = std::thread::spawn(|| test_kit::redis().process.pid)
        .join()
        .expect("thread");
    assert_eq!(first.process.pid, again);
    assert!(first.process.is_running());
}

#[test]
fn a_server_outlives_the_thread_that_started_it_and_stops_when_dropped() {
    // The parent-death signal must follow the process, not the (short-lived) thread
    // that started the server.
    let server = std::thread::spawn(test_kit::RedisServer::start)
        .join()
        .expect("thread");
    std::thread::sleep(Duration::from_millis(200));
    assert!(
        server.process.is_running(),
        "the server died with the thread that started it"
    );
    let dir = server.process.dir.clone();
    let process_pid = server.process.pid;
    drop(server);
    let stopped = (0..100).any(|_| {
        std::thread::sleep(Duration::from_millis(10));
        !std::path::Path::new(&format!("/proc/{process_pid}/cmdline")).exists()
            || std::fs::read(format!("/proc/{process_pid}/cmdline")).is_ok_and(|c| c.is_empty())
    });
    assert!(stopped, "a dropped dedicated server stops");
    assert!(!dir.exists(), "and its scratch folder is removed");
}

#[tokio::test]
async fn an_envelope_round_trips_through_real_redis_with_its_ttl() {
    let mut redis = connection().await;
    let key = format!(
        "{}narr:v1:0123456789ab:{{digest}}",
        test_kit::unique_prefix("envelope")
    );
    let envelope = Envelope {
        body: "Your Sirian drive…".into(),
        created_at_ms: now_ms(),
        engine_version: "narrative@1.0.0".into(),
        prompt_hash: "0123456789ab".into(),
        model: "gpt-4o-mini".into(),
        tokens_in: 300,
        tokens_out: 250,
        cost_usd: 0.000_195,
        generation_ms: 1800,
    };
    let _: () = redis
        .set_ex(&key, envelope.encode(), 60)
        .await
        .expect("SET EX");
    let stored: Vec<u8> = redis.get(&key).await.expect("GET");
    assert_eq!(Envelope::decode(&stored).expect("decodes"), envelope);
    let ttl: i64 = redis.ttl(&key).await.expect("TTL");
    assert!((1..=60).contains(&ttl), "ttl {ttl}");
}

#[tokio::test]
async fn the_cluster_has_three_masters_that_share_the_slots() {
    let cluster = test_kit::redis_cluster();
    assert_eq!(cluster.nodes.len(), 3);
    let urls: Vec<&str> = cluster.url.split(',').collect();
    let client = redis::cluster::ClusterClient::new(urls).expect("cluster client");
    let mut conn = client
        .get_async_connection()
        .await
        .expect("cluster connection");
    // Keys with different hash tags land on different masters; all are reachable.
    for n in 0..20 {
        let key = format!("{}{{tag{n}}}", test_kit::unique_prefix("cluster"));
        let _: () = redis::cmd("SET")
            .arg(&key)
            .arg(n)
            .query_async(&mut conn)
            .await
            .expect("SET");
        let back: i64 = redis::cmd("GET")
            .arg(&key)
            .query_async(&mut conn)
            .await
            .expect("GET");
        assert_eq!(back, n);
    }
}

#[tokio::test]
async fn rabbitmq_round_trips_a_message_in_a_vhost_of_its_own() {
    use futures::StreamExt as _;
    use lapin::options::{
        BasicAckOptions, BasicConsumeOptions, BasicPublishOptions, QueueDeclareOptions,
    };
    use lapin::types::FieldTable;
    use lapin::{BasicProperties, Connection, ConnectionProperties};

    let url = test_kit::rabbitmq().vhost("roundtrip");
    let properties = ConnectionProperties::default()
        .with_executor(tokio_executor_trait::Tokio::current())
        .with_reactor(tokio_reactor_trait::Tokio);
    let connection = Connection::connect(&url, properties)
        .await
        .expect("AMQP connection");
    let channel = connection.create_channel().await.expect("channel");
    channel
        .queue_declare("q", QueueDeclareOptions::default(), FieldTable::default())
        .await
        .expect("declare");
    channel
        .basic_publish(
            "",
            "q",
            BasicPublishOptions::default(),
            b"hello",
            BasicProperties::default(),
        )
        .await
        .expect("publish")
        .await
        .expect("confirm");
    let mut consumer = channel
        .basic_consume(
            "q",
            "t",
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .expect("consume");
    let delivery = consumer.next().await.expect("a message").expect("delivery");
    assert_eq!(delivery.data, b"hello");
    delivery.ack(BasicAckOptions::default()).await.expect("ack");
}

#[test]
fn postgres_runs_as_its_own_user_with_a_database_per_test() {
    let server = test_kit::postgres();
    let url = server.database("kit");
    let database = url.rsplit('/').next().expect("database name").to_owned();
    let port = server.port().to_string();
    let output = std::process::Command::new("psql")
        .args([
            "-h",
            "127.0.0.1",
            "-p",
            &port,
            "-U",
            "postgres",
            "-d",
            &database,
            "-Atc",
        ])
        .arg("create table t (n int); insert into t values (41), (1); select sum(n) from t")
        .output()
        .expect("psql runs");
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert_eq!(
        String::from_utf8_lossy(&output.stdout).lines().last(),
        Some("42")
    );
    assert!(server.is_running());
}
