//! The simulator against the real distributed stack: the same seed and traffic sent
//! through two gateways sharing a real redis-server, with the LLM simulator on
//! loopback. Their hit rates must agree within one point, and both must make one LLM
//! call per distinct key.

use std::net::SocketAddr;

use api_gateway::{run, App, Settings};
use cache_core::config::Vars;
use cache_core::QuantizationStep;
use llm_sim::SimConfig;
use workload_sim::traffic::month;
use workload_sim::{simulate, SimSettings, TrafficShape};

async fn gateway(vars: &[(&str, &str)]) -> SocketAddr {
    let app = App::build(Settings::from_vars(&Vars::from_pairs(vars.to_vec())).expect("settings"))
        .expect("app");
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(run(listener, app, std::future::pending()));
    addr
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_simulator_agrees_with_the_real_stack() {
    let shape = TrafficShape {
        seed: 11,
        catalogue_seed: 3,
        monthly_users: 400,
        requests_per_user: 3.0,
        archetypes: 300,
        zipf_exponent: 1.1,
        jitter: 0.3,
    };
    let step: QuantizationStep = "0.5".parse().unwrap();
    let simulated = simulate(&shape, &SimSettings::new(step, 0)).await;

    let sim = llm_sim::spawn(SimConfig {
        latency_ms: 1,
        ..SimConfig::default()
    })
    .await
    .expect("simulator");
    let base_url = sim.base_url();
    let version = test_kit::unique_prefix("cross-check")
        .trim_end_matches(':')
        .to_owned();
    let redis = test_kit::redis().url.clone();
    let vars = [
        ("REDIS_URL", redis.as_str()),
        ("CACHE_KEY_SECRET", "cross-check-secret-0123"),
        ("ENGINE_VERSION", version.as_str()),
        ("QUANTIZATION_STEP", "0.5"),
        ("LLM_BASE_URL", base_url.as_str()),
        ("LLM_API_KEY", "sk-test"),
    ];
    let gateways = [gateway(&vars).await, gateway(&vars).await];
    let client = reqwest::Client::new();
    let traffic = month(&shape);
    let mut hits = 0u64;
    for (i, request) in traffic.iter().enumerate() {
        let answer = client
            .post(format!("http://{}/narrative", gateways[i % 2]))
            .json(&request.body)
            .send()
            .await
            .expect("request");
        assert_eq!(answer.status(), 200);
        let x_cache = answer.headers()["x-cache"]
            .to_str()
            .unwrap_or("")
            .to_owned();
        if x_cache == "HIT" || x_cache == "STALE" {
            hits += 1;
        }
    }
    let real = hits as f64 / traffic.len() as f64;
    assert_eq!(simulated.requests, traffic.len() as u64);
    assert!(
        (simulated.hit_rate - real).abs() <= 0.01,
        "simulated {:.4}, real {real:.4}",
        simulated.hit_rate
    );
    assert_eq!(
        sim.sim.stats().requests,
        simulated.distinct_keys,
        "one LLM call per distinct key on the real stack"
    );
    assert_eq!(simulated.llm_calls(), simulated.distinct_keys);
    eprintln!(
        "cross-check: {} requests, simulated hit rate {:.4}, real {real:.4}",
        traffic.len(),
        simulated.hit_rate
    );
}
