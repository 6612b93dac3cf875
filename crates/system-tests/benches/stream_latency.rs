//! How soon a streamed answer shows its first words, for each kind of reader.
//!
//! Starts its own redis-server (test kit), an LLM simulator whose first token comes
//! after 400 ms and then 60 characters every 80 ms (the figures), and two
//! gateways sharing the Redis, all on loopback. For each of `ROUNDS` new profiles:
//!
//! - the **leader** streams it from gateway A (its generation runs there);
//! - 50 ms later, before the first token, a **follower on the same gateway** and a
//!   **follower on the other gateway** (whose text comes through the key's Redis
//!   stream) stream it too.
//!
//! Printed: the leader's first delta less the simulator's 400 ms (what the gateway
//! adds to the LLM's first token), each follower's first delta less the leader's (on
//! the same clock: one process), a hit's first delta, and the time to the whole answer
//! of a new profile without streaming, the baseline a user waited before.
//!
//! `cargo bench -p system-tests --bench stream_latency`

use std::time::{Duration, Instant};

use futures::StreamExt as _;
use llm_sim::SimConfig;
use system_tests::{gateway, percentile, post_narrative, profile};

const FIRST_TOKEN_MS: u64 = 400;
const ROUNDS: u32 = 100;

/// Streams `body` from `url`: when its first delta arrived, and what `done` said.
async fn first_delta(
    client: reqwest::Client,
    url: String,
    body: serde_json::Value,
) -> (Instant, String) {
    let response = client
        .post(format!("{url}/narrative"))
        .header("accept", "text/event-stream")
        .json(&body)
        .send()
        .await
        .expect("send");
    let mut events = eventsource_stream::Eventsource::eventsource(response.bytes_stream());
    let mut first = None;
    while let Some(event) = events.next().await {
        let event = event.expect("event");
        match event.event.as_str() {
            "delta" => {
                first.get_or_insert_with(Instant::now);
            }
            "done" => {
                let done: serde_json::Value = serde_json::from_str(&event.data).expect("json");
                let source = done["source"].as_str().unwrap_or("").to_owned();
                return (first.expect("a delta before done"), source);
            }
            _ => {}
        }
    }
    panic!("the stream ended without done");
}

fn ms(duration: Duration) -> f64 {
    duration.as_secs_f64() * 1000.0
}

fn signed_ms(later: Instant, earlier: Instant) -> f64 {
    if later >= earlier {
        ms(later - earlier)
    } else {
        -ms(earlier - later)
    }
}

fn report(label: &str, mut values: Vec<f64>) {
    values.sort_by(f64::total_cmp);
    let at = |q: f64| percentile(&values, q);
    println!(
        "{label:<46} p50 {:>8.2} ms  p90 {:>8.2} ms  p99 {:>8.2} ms  max {:>8.2} ms  (n={})",
        at(0.5),
        at(0.9),
        at(0.99),
        at(1.0),
        values.len()
    );
}

#[tokio::main]
async fn main() {
    let redis = test_kit::redis().url.clone();
    let sim = llm_sim::spawn(SimConfig {
        latency_ms: FIRST_TOKEN_MS,
        chunk_chars: 60,
        chunk_interval_ms: 80,
        ..SimConfig::default()
    })
    .await
    .expect("simulator");
    let base = sim.base_url();
    let vars = [
        ("REDIS_URL", redis.as_str()),
        ("CACHE_KEY_SECRET", "bench-secret-0123456789"),
        ("ENGINE_VERSION", "stream-bench"),
        ("LLM_BASE_URL", base.as_str()),
        ("LLM_API_KEY", "sk-bench"),
        ("RUST_LOG", "error"),
    ];
    let (a, b) = (gateway(&vars).await, gateway(&vars).await);
    let client = reqwest::Client::new();
    // Connections and the subscription warmed up.
    let _ = first_delta(client.clone(), a.clone(), profile(10_000)).await;
    let _ = first_delta(client.clone(), b.clone(), profile(10_000)).await;

    let (mut leader, mut same, mut other) = (Vec::new(), Vec::new(), Vec::new());
    for n in 0..ROUNDS {
        let started = Instant::now();
        let lead = tokio::spawn(first_delta(client.clone(), a.clone(), profile(n)));
        tokio::time::sleep(Duration::from_millis(50)).await;
        let here = tokio::spawn(first_delta(client.clone(), a.clone(), profile(n)));
        let there = tokio::spawn(first_delta(client.clone(), b.clone(), profile(n)));
        let (lead, here, there) = (
            lead.await.expect("leader"),
            here.await.expect("follower"),
            there.await.expect("follower"),
        );
        assert!([&lead.1, &here.1, &there.1]
            .iter()
            .all(|s| *s == "generated"));
        leader.push(ms(lead.0 - started) - FIRST_TOKEN_MS as f64);
        same.push(signed_ms(here.0, lead.0));
        other.push(signed_ms(there.0, lead.0));
    }
    let mut hit = Vec::new();
    for n in 0..ROUNDS {
        let started = Instant::now();
        let (first, source) = first_delta(client.clone(), a.clone(), profile(n)).await;
        assert_eq!(source, "cache");
        hit.push(ms(first - started));
    }
    let mut whole = Vec::new();
    for n in 0..ROUNDS / 10 {
        let started = Instant::now();
        let reply = post_narrative(&client, &a, &profile(1000 + n)).await;
        assert_eq!(reply["source"], "generated");
        whole.push(ms(started.elapsed()));
    }
    println!("== time to the first delta (simulator: first token 400 ms, 60 chars every 80 ms)");
    report("leader, less the simulator's 400 ms", leader);
    report("follower, same gateway, less the leader's", same);
    report("follower, other gateway, less the leader's", other);
    report("hit", hit);
    report("baseline: whole answer without streaming", whole);
}
