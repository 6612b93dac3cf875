//! Gateways and generator-workers on real RabbitMQ and Redis: misses become jobs,
//! workers generate them. Each test has its own vhost and ENGINE_VERSION. Workers call
//! their own simulator, so the tests see who paid for each narrative.

use std::time::{Duration, Instant};

use cache_core::config::Vars;
use futures::future::join_all;
use futures::StreamExt as _;
use llm_sim::{SimConfig, SimHandle};
use narrative_queue::{amqp, topology, ConfirmedPublisher, Job, Trigger, JOB_VERSION};

use crate::helpers::{
    assert_served_without_fallback, profile, spawn_app_with, unique_version, TestApp,
};
use crate::services::TestWorker;

async fn sim(config: SimConfig) -> SimHandle {
    llm_sim::spawn(config).await.expect("simulator")
}

async fn gateway(amqp: &str, version: &str, extra: &[(&str, &str)]) -> (TestApp, SimHandle) {
    // The gateway's own simulator: it must see no call while workers generate.
    let own = sim(SimConfig {
        latency_ms: 10,
        ..SimConfig::default()
    })
    .await;
    let mut vars = vec![
        ("REDIS_URL", test_kit::redis().url.as_str()),
        ("AMQP_URL", amqp),
        ("ENGINE_VERSION", version),
    ];
    vars.extend_from_slice(extra);
    (spawn_app_with(own.clone(), &vars).await, own)
}

async fn until(what: &str, mut check: impl FnMut() -> bool) {
    for _ in 0..1000 {
        if check() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("timed out waiting for {what}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn workers_generate_misses_and_gateways_never_call_the_llm() {
    let amqp = test_kit::rabbitmq().vhost("e2e");
    let version = unique_version("workers");
    let worker_sim = sim(SimConfig {
        latency_ms: 300,
        ..SimConfig::default()
    })
    .await;
    let (w1, w2) = (
        TestWorker::start(&amqp, &worker_sim, &[]).await,
        TestWorker::start(&amqp, &worker_sim, &[]).await,
    );
    let (a, a_sim) = gateway(&amqp, &version, &[]).await;
    let (b, b_sim) = gateway(&amqp, &version, &[]).await;

    let body = profile(1);
    let replies = join_all((0..1000).map(|i| {
        if i % 2 == 0 {
            a.post_narrative(&body)
        } else {
            b.post_narrative(&body)
        }
    }))
    .await;
    assert_served_without_fallback(&replies);
    assert_eq!(
        worker_sim.sim.stats().requests,
        1,
        "one LLM call across two gateways and two workers"
    );
    assert_eq!(
        a_sim.sim.stats().requests + b_sim.sim.stats().requests,
        0,
        "gateways did not generate"
    );
    assert_eq!(w1.jobs("stored") + w2.jobs("stored"), 1);
    assert_eq!(a.post_narrative(&body).await.source(), "cache");

    // 100 distinct profiles, 5 concurrent requests each, across both gateways.
    let bodies: Vec<_> = (100..200).map(profile).collect();
    let requests = bodies
        .iter()
        .flat_map(|body| (0..5).map(move |i| (i, body)));
    let replies = join_all(requests.map(|(i, body)| {
        if i % 2 == 0 {
            a.post_narrative(body)
        } else {
            b.post_narrative(body)
        }
    }))
    .await;
    assert!(replies.iter().all(|r| r.status == 200), "all 200");
    assert_eq!(
        worker_sim.sim.stats().requests,
        1 + 100,
        "one call per distinct profile"
    );
    let ready = a.get("/readyz").await;
    assert_eq!(ready.body["backends"]["queue"]["kind"], "rabbitmq");
    w1.stop().await;
    w2.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_duplicate_or_redelivered_job_never_pays_twice() {
    let amqp = test_kit::rabbitmq().vhost("dup");
    let version = unique_version("dup");
    let worker_sim = sim(SimConfig {
        latency_ms: 20,
        ..SimConfig::default()
    })
    .await;
    let worker = TestWorker::start(&amqp, &worker_sim, &[]).await;
    let (app, _) = gateway(&amqp, &version, &[]).await;
    let reply = app.post_narrative(&profile(2)).await;
    assert_eq!(reply.source(), "generated");
    let canonical =
        app.post_json("/narrative/key", &profile(2)).await.body["canonical"].to_string();

    // The same job once more, as a redelivery would bring it.
    let settings =
        narrative_queue::queue_settings_from(&Vars::from_pairs([("AMQP_URL", amqp.as_str())]))
            .expect("settings")
            .expect("amqp");
    let publisher = ConfirmedPublisher::new(settings, Duration::ZERO);
    let job = Job {
        version: JOB_VERSION,
        key: reply.key().to_string(),
        canonical,
        lock_token: "an-old-token".to_owned(),
        trigger: Trigger::Miss,
        request_id: "redelivered".to_owned(),
        // When its gateway enqueued it, as a redelivery carries it.
        enqueued_at_ms: cache_core::now_ms(),
    };
    job.publish(&publisher).await.expect("confirmed");
    until("the duplicate job to be handled", || {
        worker.jobs("already_cached") == 1
    })
    .await;
    assert_eq!(
        worker_sim.sim.stats().requests,
        1,
        "the duplicate found the value and paid nothing"
    );
    worker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failing_and_malformed_jobs_are_dead_lettered_and_waiters_fall_back_at_once() {
    let amqp = test_kit::rabbitmq().vhost("dlq");
    let version = unique_version("dlq");
    let failing = SimConfig {
        latency_ms: 10,
        failure_rate: 1.0,
        failure_status: 503,
        ..SimConfig::default()
    };
    let worker_sim = sim(failing).await;
    let worker = TestWorker::start(&amqp, &worker_sim, &[("LLM_MAX_RETRIES", "1")]).await;
    let (app, _) = gateway(&amqp, &version, &[("GENERATION_WAIT_MS", "10000")]).await;

    let started = Instant::now();
    let reply = app.post_narrative(&profile(3)).await;
    assert_eq!(reply.source(), "fallback");
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "told at once, not after the 10 s wait ({:?})",
        started.elapsed()
    );
    until("the worker to count the failed job", || {
        worker.jobs("failed") == 1
    })
    .await;

    let connection = amqp::connect(&amqp, Duration::from_secs(5))
        .await
        .expect("connect");
    let channel = connection.create_channel().await.expect("channel");
    channel
        .basic_publish(
            topology::JOBS.exchange,
            topology::JOBS.routing_key,
            Default::default(),
            b"{not a job",
            Default::default(),
        )
        .await
        .expect("publish")
        .await
        .expect("sent");
    until("the malformed job to be rejected", || {
        worker.jobs("rejected") == 1
    })
    .await;
    // The worker keeps consuming after the poison message.
    assert_eq!(app.post_narrative(&profile(33)).await.source(), "fallback");
    until("the next job to be handled", || worker.jobs("failed") == 2).await;
    assert!(worker.app.consuming.get());
    for n in [3, 33] {
        let key = app.post_json("/narrative/key", &profile(n)).await.key();
        let path = format!("/narrative/{}", key.to_path_segment());
        assert_eq!(
            app.get(&path).await.status,
            404,
            "nothing stored for a failed job"
        );
    }

    let mut dead = channel
        .basic_consume(
            topology::JOB_DEAD_QUEUE,
            "dead",
            Default::default(),
            Default::default(),
        )
        .await
        .expect("consume dead letters");
    let mut bodies = Vec::new();
    for _ in 0..3 {
        let delivery = tokio::time::timeout(Duration::from_secs(5), dead.next())
            .await
            .expect("dead letter")
            .expect("some")
            .expect("ok");
        bodies.push(delivery.data.clone());
    }
    assert!(
        bodies
            .iter()
            .any(|b| Job::from_bytes(b).is_ok_and(|job| job.key == reply.key().to_string())),
        "the failed job"
    );
    assert!(
        bodies.iter().any(|b| b.as_slice() == b"{not a job"),
        "the malformed message"
    );
    worker.stop().await;
}

#[tokio::test]
async fn an_unreachable_broker_means_generating_in_process() {
    let port = test_kit::free_port();
    let amqp = format!("amqp://guest:guest@127.0.0.1:{port}/%2f");
    let (app, own_sim) = gateway(&amqp, &unique_version("nobroker"), &[]).await;
    let reply = app.post_narrative(&profile(4)).await;
    assert_eq!((reply.status, reply.source()), (200, "generated"));
    assert_eq!(
        own_sim.sim.stats().requests,
        1,
        "the gateway generated it itself"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn respond_async_answers_202_with_a_location_that_becomes_200() {
    let amqp = test_kit::rabbitmq().vhost("async");
    let version = unique_version("async");
    let worker_sim = sim(SimConfig {
        latency_ms: 300,
        ..SimConfig::default()
    })
    .await;
    let worker = TestWorker::start(&amqp, &worker_sim, &[]).await;
    let (app, _) = gateway(&amqp, &version, &[]).await;
    let response = app
        .client
        .post(app.url("/narrative"))
        .header("prefer", "respond-async, wait=5")
        .json(&profile(5))
        .send()
        .await
        .expect("send");
    let pending = crate::helpers::reply(response).await;
    assert_eq!(pending.status, 202);
    assert_eq!(pending.body["status"], "pending");
    let location = pending.header("location").to_owned();
    assert_eq!(pending.body["location"], location.as_str());
    assert_eq!(app.get(&location).await.status, 202, "still running");
    app.state.service.settled(&pending.key()).await;
    let done = app.get(&location).await;
    assert_eq!((done.status, done.source()), (200, "cache"));

    // On a hit, respond-async answers 200 with the narrative.
    let response = app
        .client
        .post(app.url("/narrative"))
        .header("prefer", "respond-async")
        .json(&profile(5))
        .send()
        .await
        .expect("send");
    assert_eq!(response.status().as_u16(), 200);
    worker.stop().await;
}

/// RabbitMQ stopped: new profiles still get 200, generated in process, no 5xx.
/// RabbitMQ back: jobs flow through workers again, nothing restarted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broker_outage_degrades_to_in_process_generation_and_recovers() {
    let broker = test_kit::RabbitServer::start();
    let (port, amqp) = (broker.port(), broker.default_vhost_url());
    let version = unique_version("outage");
    let worker_sim = sim(SimConfig {
        latency_ms: 20,
        ..SimConfig::default()
    })
    .await;
    let worker = TestWorker::start(&amqp, &worker_sim, &[]).await;
    let (app, own_sim) = gateway(&amqp, &version, &[]).await;
    assert_eq!(app.post_narrative(&profile(7)).await.source(), "generated");
    assert_eq!(
        (
            worker_sim.sim.stats().requests,
            own_sim.sim.stats().requests
        ),
        (1, 0),
        "the worker generated it"
    );

    drop(broker);
    let during = join_all((0..20).map(|n| app.post_narrative_owned(profile(700 + n)))).await;
    assert!(
        during
            .iter()
            .all(|r| r.status == 200 && r.source() == "generated"),
        "no 5xx; generated in process"
    );
    assert_eq!(own_sim.sim.stats().requests, 20);
    assert_eq!(worker_sim.sim.stats().requests, 1);

    let _broker = test_kit::RabbitServer::start_on(port);
    until("the worker to consume again", || worker.app.consuming.get()).await;
    let mut through_workers = false;
    for n in 0..60 {
        app.post_narrative(&profile(800 + n)).await;
        if worker_sim.sim.stats().requests > 1 {
            through_workers = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        through_workers,
        "jobs flow through workers again once the broker is back"
    );
    worker.stop().await;
}

/// The worker serves its own health and metrics, and on shutdown finishes the job it
/// is working on (stored, signalled, acked) before it exits.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_reports_its_health_and_drains_on_shutdown() {
    let amqp = test_kit::rabbitmq().vhost("drain");
    let version = unique_version("drain");
    let worker_sim = sim(SimConfig {
        latency_ms: 800,
        ..SimConfig::default()
    })
    .await;
    let worker = TestWorker::start(&amqp, &worker_sim, &[]).await;
    let client = reqwest::Client::new();
    let ready = client
        .get(format!("{}/readyz", worker.ops))
        .send()
        .await
        .expect("readyz");
    assert_eq!(ready.status().as_u16(), 200);

    let (app, _) = gateway(&amqp, &version, &[("GENERATION_WAIT_MS", "50")]).await;
    let reply = app.post_narrative(&profile(9)).await;
    assert_eq!(reply.source(), "fallback", "still generating");
    until("the job to reach the LLM", || {
        worker_sim.sim.stats().requests == 1
    })
    .await;
    let metrics = client
        .get(format!("{}/metrics", worker.ops))
        .send()
        .await
        .expect("metrics")
        .text()
        .await
        .expect("text");
    assert!(
        metrics.contains("worker_generation_duration_seconds"),
        "{metrics}"
    );

    worker.stop().await; // SIGTERM's path: stop consuming, finish the job in flight
    let path = format!("/narrative/{}", reply.key().to_path_segment());
    assert_eq!(
        app.get(&path).await.status,
        200,
        "the job in flight was finished and stored before the worker exited"
    );
}

/// Messages waiting in a queue of the vhost at `url`.
async fn ready_messages(url: &str, queue: &str) -> u32 {
    let connection = amqp::connect(url, Duration::from_secs(5))
        .await
        .expect("connect");
    let channel = connection.create_channel().await.expect("channel");
    let passive = lapin::options::QueueDeclareOptions {
        passive: true,
        ..Default::default()
    };
    let found = channel
        .queue_declare(queue, passive, Default::default())
        .await
        .expect("the queue exists");
    found.message_count()
}

/// A backlog: 8 distinct misses wait 10 s (five `LOCK_TTL`s) with no worker consuming.
/// Each flight keeps its queued job's lock alive, so the queue holds 8 jobs, not one
/// more per lapsed lock; the worker that then comes makes exactly 8 calls and stores
/// all 8.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_queued_job_keeps_its_lock_and_its_key_is_published_once() {
    let amqp = test_kit::rabbitmq().vhost("backlog");
    let version = unique_version("backlog");
    let (app, own) = gateway(
        &amqp,
        &version,
        &[("LOCK_TTL", "2s"), ("GENERATION_WAIT_MS", "300")],
    )
    .await;
    let bodies: Vec<_> = (600..608).map(profile).collect();
    let replies = join_all(bodies.iter().map(|body| app.post_narrative(body))).await;
    assert!(replies.iter().all(|r| r.source() == "fallback"));
    // The backlog itself, not a wait for something: no worker runs for five lock TTLs.
    tokio::time::sleep(Duration::from_secs(10)).await;
    assert_eq!(
        ready_messages(&amqp, topology::JOBS.queue).await,
        8,
        "one job per key, however long it waited"
    );

    let worker_sim = sim(SimConfig {
        latency_ms: 20,
        ..SimConfig::default()
    })
    .await;
    let worker = TestWorker::start(&amqp, &worker_sim, &[("LOCK_TTL", "2s")]).await;
    until("the 8 jobs to be stored", || worker.jobs("stored") == 8).await;
    assert_eq!(worker_sim.sim.stats().requests, 8);
    assert_eq!(own.sim.stats().requests, 0, "the gateway generated nothing");
    for body in &bodies {
        assert_eq!(app.post_narrative(body).await.source(), "cache");
    }
    assert_eq!(
        worker.jobs("held_elsewhere") + worker.jobs("already_cached"),
        0
    );
    worker.stop().await;
}

/// An entry nobody can read (overwritten with garbage) while workers generate: one
/// regeneration replaces it, then it is a hit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_workers_an_unreadable_entry_is_replaced_once() {
    let amqp = test_kit::rabbitmq().vhost("unreadable");
    let version = unique_version("unreadable");
    let worker_sim = sim(SimConfig {
        latency_ms: 20,
        ..SimConfig::default()
    })
    .await;
    let worker = TestWorker::start(&amqp, &worker_sim, &[]).await;
    let (app, own) = gateway(&amqp, &version, &[("L1_TTL", "0s")]).await;
    let stored = app.post_narrative(&profile(700)).await;
    assert_eq!(stored.source(), "generated");
    let mut redis = redis::Client::open(test_kit::redis().url.as_str())
        .expect("url")
        .get_multiplexed_async_connection()
        .await
        .expect("redis");
    let _: () =
        redis::AsyncCommands::set(&mut redis, stored.key().as_str(), b"\x01garbage".as_slice())
            .await
            .expect("overwritten");
    let calls = || worker_sim.sim.stats().requests + own.sim.stats().requests;
    let before = calls();
    let mut sources = Vec::new();
    for _ in 0..3 {
        sources.push(app.post_narrative(&profile(700)).await.source().to_owned());
    }
    assert_eq!(sources, ["generated", "cache", "cache"]);
    assert_eq!(calls(), before + 1, "one regeneration in all");
    worker.stop().await;
}

/// A gateway that cannot open an entry (its `CACHE_ENCRYPTION_KEY` list lacks the key
/// it was sealed with) while the workers can: the gateway replaces it itself, once,
/// instead of publishing jobs the workers find already done.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gateway_that_cannot_open_an_entry_its_workers_can_replaces_it_once() {
    const OLD: &str = "k1:AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=";
    const NEW: &str = "k2:HxwdHhsaGRgXFhUUExIREA8ODQwLCgkIBwYFBAMCAQA=";
    let both = format!("{NEW},{OLD}");
    let amqp = test_kit::rabbitmq().vhost("rotation");
    let version = unique_version("rotation");
    let worker_sim = sim(SimConfig {
        latency_ms: 20,
        ..SimConfig::default()
    })
    .await;
    let worker = TestWorker::start(&amqp, &worker_sim, &[("CACHE_ENCRYPTION_KEY", OLD)]).await;
    let (old, _) = gateway(&amqp, &version, &[("CACHE_ENCRYPTION_KEY", OLD)]).await;
    assert_eq!(
        old.post_narrative(&profile(710)).await.source(),
        "generated"
    );
    worker.stop().await;

    let worker = TestWorker::start(&amqp, &worker_sim, &[("CACHE_ENCRYPTION_KEY", &both)]).await;
    let (rotated, own) = gateway(
        &amqp,
        &version,
        &[("CACHE_ENCRYPTION_KEY", NEW), ("L1_TTL", "0s")],
    )
    .await;
    let calls = || worker_sim.sim.stats().requests + own.sim.stats().requests;
    let before = calls();
    let mut sources = Vec::new();
    for _ in 0..3 {
        sources.push(
            rotated
                .post_narrative(&profile(710))
                .await
                .source()
                .to_owned(),
        );
    }
    assert_eq!(sources, ["generated", "cache", "cache"]);
    assert_eq!(calls(), before + 1, "one regeneration in all");
    worker.stop().await;
}
