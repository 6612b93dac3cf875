//! Streaming with workers: the text of one LLM call, made by a worker, reaches every
//! streaming request for the key on two gateways, live, through the key's live stream
//! in Redis; requests that do not stream coalesce on the same call.

use std::time::Duration;

use futures::future::join_all;
use llm_sim::SimConfig;

use crate::helpers::{
    assert_streamed_to_all, profile, spawn_app_with, unique_version, Reply, Streamed,
};
use crate::services::TestWorker;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_workers_generation_streams_live_to_every_request_on_two_gateways() {
    let amqp = test_kit::rabbitmq().vhost("stream");
    let version = unique_version("stream-workers");
    // First token at 400 ms, 60 characters every 80 ms: about 1.5 s of text.
    let worker_sim = llm_sim::spawn(SimConfig {
        latency_ms: 400,
        chunk_chars: 60,
        chunk_interval_ms: 80,
        ..SimConfig::default()
    })
    .await
    .expect("simulator");
    let worker = TestWorker::start(&amqp, &worker_sim, &[]).await;
    // The gateways' own simulator: it must see no call while the worker generates.
    let own = llm_sim::spawn(SimConfig::default())
        .await
        .expect("simulator");
    let vars = [
        ("REDIS_URL", test_kit::redis().url.as_str()),
        ("AMQP_URL", amqp.as_str()),
        ("ENGINE_VERSION", version.as_str()),
    ];
    let a = spawn_app_with(own.clone(), &vars).await;
    let b = spawn_app_with(own.clone(), &vars).await;
    let gateways = [&a, &b];

    let body = profile(1);
    let streamed = join_all((0..200).map(|i| gateways[i % 2].stream_narrative(&body)));
    let answered = join_all((0..20).map(|i| gateways[i % 2].post_narrative(&body)));
    let late = async {
        tokio::time::sleep(Duration::from_secs(1)).await;
        b.stream_narrative(&body).await
    };
    let (streamed, answered, late): (Vec<Streamed>, Vec<Reply>, Streamed) =
        tokio::join!(streamed, answered, late);

    assert_eq!(
        worker_sim.sim.stats().requests,
        1,
        "one LLM call, by the worker"
    );
    assert_eq!(own.sim.stats().requests, 0, "the gateways did not generate");
    assert_streamed_to_all(&streamed, &answered, &late);
    assert_eq!(worker.jobs("stored"), 1);
    worker.stop().await;
}
