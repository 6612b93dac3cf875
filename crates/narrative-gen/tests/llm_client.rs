//! The LLM client against the simulator on loopback: what is retried, what is not,
//! and that only complete outputs come back.

use std::time::{Duration, Instant};

use cache_core::{ProfileInput, QuantizationStep};
use llm_sim::{SimConfig, SimHandle};
use narrative_gen::{
    ApiKey, GenerateError, GenerationParams, LlmError, LlmGenerator, LlmSettings,
    NarrativeGenerator, Pricing,
};

fn settings(sim: &SimHandle, timeout_ms: u64, max_retries: u32) -> LlmSettings {
    LlmSettings {
        base_url: sim.base_url(),
        api_key: ApiKey::new("sk-test"),
        params: GenerationParams::new("gpt-4o-mini"),
        pricing: Pricing {
            input_per_mtok: 0.15,
            output_per_mtok: 0.60,
        },
        timeout: Duration::from_millis(timeout_ms),
        max_retries,
        backoff_base: Duration::from_millis(10),
        backoff_max: Duration::from_secs(2),
    }
}

fn profile() -> cache_core::CanonicalProfile {
    ProfileInput::from_json(
        br#"{"classification":"primary","primary":"Arcturus","percentages":{"Arcturus":80,"Lyra":20},
            "hdData":{"type":"Generator","authority":"Sacral","profile":"1/3"}}"#,
    )
    .expect("parses")
    .canonicalize(QuantizationStep::DEFAULT)
    .expect("valid")
}

async fn sim(config: SimConfig) -> SimHandle {
    llm_sim::spawn(config).await.expect("simulator starts")
}

async fn generate(
    sim: &SimHandle,
    timeout_ms: u64,
    retries: u32,
) -> Result<narrative_gen::Generation, GenerateError> {
    LlmGenerator::new(settings(sim, timeout_ms, retries))
        .expect("client")
        .generate(&profile())
        .await
}

#[tokio::test]
async fn a_complete_reply_carries_its_usage_and_cost() {
    let sim = sim(SimConfig {
        latency_ms: 5,
        ..SimConfig::default()
    })
    .await;
    let generation = generate(&sim, 2000, 0).await.expect("generates");
    let stats = sim.sim.stats();
    assert_eq!(stats.requests, 1);
    assert!(generation.body.contains("Arcturus"), "{}", generation.body);
    assert_eq!(u64::from(generation.tokens_in), stats.prompt_tokens);
    assert_eq!(u64::from(generation.tokens_out), stats.completion_tokens);
    let expected =
        (f64::from(generation.tokens_in) * 0.15 + f64::from(generation.tokens_out) * 0.60) / 1e6;
    assert!((generation.cost_usd - expected).abs() < 1e-15 && generation.cost_usd > 0.0);
    assert_eq!(generation.model, "gpt-4o-mini");
}

#[tokio::test]
async fn server_errors_are_retried_then_reported() {
    let sim = sim(SimConfig {
        latency_ms: 1,
        failure_rate: 1.0,
        failure_status: 503,
        ..SimConfig::default()
    })
    .await;
    let error = generate(&sim, 2000, 2).await.expect_err("always fails");
    assert_eq!(
        error,
        GenerateError::Llm(LlmError::Status {
            status: 503,
            retry_after: None
        })
    );
    assert_eq!(sim.sim.stats().requests, 3, "one attempt and two retries");
}

#[tokio::test]
async fn other_client_errors_are_not_retried() {
    let sim = sim(SimConfig {
        latency_ms: 1,
        failure_rate: 1.0,
        failure_status: 400,
        ..SimConfig::default()
    })
    .await;
    generate(&sim, 2000, 3).await.expect_err("fails");
    assert_eq!(sim.sim.stats().requests, 1);
}

#[tokio::test]
async fn retry_after_is_honoured_and_an_overlong_one_ends_the_retries() {
    let config = SimConfig {
        latency_ms: 1,
        failure_rate: 1.0,
        failure_status: 429,
        retry_after_secs: Some(1),
        ..SimConfig::default()
    };
    let honoured = sim(config.clone()).await;
    let started = Instant::now();
    generate(&honoured, 2000, 1).await.expect_err("fails");
    assert_eq!(honoured.sim.stats().requests, 2);
    assert!(
        started.elapsed() >= Duration::from_secs(1),
        "waited {:?}, less than Retry-After",
        started.elapsed()
    );

    // Retry-After beyond LLM_BACKOFF_MAX (2 s here): give up rather than wait.
    let overlong = sim(SimConfig {
        retry_after_secs: Some(60),
        ..config
    })
    .await;
    generate(&overlong, 2000, 3).await.expect_err("fails");
    assert_eq!(overlong.sim.stats().requests, 1);
}

#[tokio::test]
async fn truncated_output_is_an_error_and_not_retried() {
    let sim = sim(SimConfig {
        latency_ms: 1,
        finish_reason: "length".into(),
        ..SimConfig::default()
    })
    .await;
    let error = generate(&sim, 2000, 3).await.expect_err("truncated");
    assert_eq!(
        error,
        GenerateError::Llm(LlmError::Incomplete("length".into()))
    );
    assert_eq!(sim.sim.stats().requests, 1);
}

#[tokio::test]
async fn each_attempt_times_out_and_timeouts_are_retried() {
    let sim = sim(SimConfig {
        latency_ms: 2000,
        ..SimConfig::default()
    })
    .await;
    let error = generate(&sim, 100, 1).await.expect_err("too slow");
    assert_eq!(error, GenerateError::Llm(LlmError::Timeout));
    assert_eq!(sim.sim.stats().requests, 2);
}
