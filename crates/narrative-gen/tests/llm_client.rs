//! The LLM client against the simulator on loopback: what is retried, what is not,
//! and that only complete outputs come back, whole or streamed.

use std::time::{Duration, Instant};

use cache_core::{ProfileInput, QuantizationStep};
use llm_sim::{SimConfig, SimHandle};
use narrative_gen::{
    ApiKey, GenerateError, GenerationParams, LlmClient, LlmError, LlmGenerator, LlmSettings,
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
        first_token_timeout: Duration::from_millis(timeout_ms),
        idle_timeout: Duration::from_millis(timeout_ms),
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
        .generate(&profile(), &cache_core::Unwatched)
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

/// A streamed completion, and the pieces of text handed on as they came.
async fn stream(
    settings: LlmSettings,
) -> (Result<narrative_gen::Completion, LlmError>, Vec<String>) {
    let client = LlmClient::new(settings).expect("client");
    let mut pieces = Vec::new();
    let result = client
        .stream("Profile:\nstar systems (percent): \"Lyra\" 100%", |piece| {
            pieces.push(piece.to_owned())
        })
        .await;
    (result, pieces)
}

#[tokio::test]
async fn a_streamed_reply_arrives_in_pieces_that_make_the_whole_with_its_usage() {
    let sim = sim(SimConfig {
        latency_ms: 5,
        chunk_chars: 40,
        chunk_interval_ms: 2,
        ..SimConfig::default()
    })
    .await;
    let (result, pieces) = stream(settings(&sim, 2000, 0)).await;
    let completion = result.expect("complete");
    assert!(pieces.len() >= 10, "{} pieces", pieces.len());
    assert_eq!(pieces.concat().trim(), completion.text);
    assert!(completion.text.contains("Lyra"), "{}", completion.text);
    let stats = sim.sim.stats();
    assert_eq!(stats.requests, 1);
    assert_eq!(u64::from(completion.tokens_in), stats.prompt_tokens);
    assert_eq!(u64::from(completion.tokens_out), stats.completion_tokens);
}

#[tokio::test]
async fn a_slow_first_token_is_retried_before_any_text_is_handed_on() {
    let sim = sim(SimConfig {
        latency_ms: 600,
        ..SimConfig::default()
    })
    .await;
    let (result, pieces) = stream(settings(&sim, 100, 1)).await;
    assert_eq!(result.expect_err("too slow"), LlmError::Timeout);
    assert!(pieces.is_empty());
    assert_eq!(sim.sim.stats().requests, 2, "one attempt and one retry");
}

#[tokio::test]
async fn a_stream_broken_after_text_is_an_error_and_not_retried() {
    let sim = sim(SimConfig {
        latency_ms: 5,
        chunk_chars: 20,
        chunk_interval_ms: 2,
        fail_after_chunks: Some(3),
        ..SimConfig::default()
    })
    .await;
    let (result, pieces) = stream(settings(&sim, 2000, 3)).await;
    let error = result.expect_err("broken");
    assert!(error.is_retryable(), "a broken connection: {error:?}");
    assert_eq!(
        pieces.len(),
        3,
        "what arrived before the break was handed on"
    );
    assert_eq!(sim.sim.stats().requests, 1, "text was handed on: no retry");
}

#[tokio::test]
async fn a_stream_that_goes_quiet_times_out_between_pieces() {
    let sim = sim(SimConfig {
        latency_ms: 5,
        chunk_chars: 20,
        chunk_interval_ms: 1_000,
        ..SimConfig::default()
    })
    .await;
    let mut quick_first = settings(&sim, 2000, 3);
    quick_first.idle_timeout = Duration::from_millis(150);
    let started = Instant::now();
    let (result, pieces) = stream(quick_first).await;
    assert_eq!(result.expect_err("quiet"), LlmError::Timeout);
    assert_eq!(pieces.len(), 1);
    assert!(
        started.elapsed() < Duration::from_millis(900),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(sim.sim.stats().requests, 1);
}

#[tokio::test]
async fn a_truncated_stream_is_incomplete_after_its_text() {
    let sim = sim(SimConfig {
        latency_ms: 5,
        chunk_chars: 30,
        chunk_interval_ms: 1,
        finish_reason: "length".into(),
        ..SimConfig::default()
    })
    .await;
    let (result, pieces) = stream(settings(&sim, 2000, 3)).await;
    assert_eq!(
        result.expect_err("truncated"),
        LlmError::Incomplete("length".into())
    );
    assert!(!pieces.is_empty());
    assert_eq!(sim.sim.stats().requests, 1);
}

/// Found in review: a stream had no total deadline, so one trickling just under the
/// idle timeout held the call (and its flight, lock and slot) for as long as it liked.
#[tokio::test]
async fn a_trickling_stream_ends_at_the_attempt_timeout() {
    let sim = sim(SimConfig {
        latency_ms: 5,
        chunk_chars: 5,
        chunk_interval_ms: 50,
        ..SimConfig::default()
    })
    .await;
    let mut trickled = settings(&sim, 500, 0);
    trickled.idle_timeout = Duration::from_secs(2);
    let started = Instant::now();
    let (result, pieces) = stream(trickled).await;
    assert_eq!(result.expect_err("too slow overall"), LlmError::Timeout);
    assert!(
        pieces.len() > 3,
        "{} pieces arrived before the deadline",
        pieces.len()
    );
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "{:?}",
        started.elapsed()
    );
}

#[tokio::test]
async fn a_generation_streams_its_text_and_resets_it_when_it_breaks_off() {
    use cache_core::{LiveText, LiveUpdate};
    let whole = sim(SimConfig {
        latency_ms: 5,
        chunk_chars: 16,
        chunk_interval_ms: 1,
        ..SimConfig::default()
    })
    .await;
    let live = LiveText::new();
    let mut reader = live.reader();
    let generation = LlmGenerator::new(settings(&whole, 2000, 0))
        .expect("client")
        .generate(&profile(), live.as_ref())
        .await
        .expect("generates");
    assert_eq!(
        live.so_far(),
        generation.body,
        "the pieces add up to the body"
    );
    assert!(matches!(reader.next().await, LiveUpdate::Text(text) if text == generation.body));

    let broken = sim(SimConfig {
        latency_ms: 5,
        chunk_chars: 16,
        chunk_interval_ms: 1,
        fail_after_chunks: Some(2),
        ..SimConfig::default()
    })
    .await;
    let live = LiveText::new();
    let failed = LlmGenerator::new(settings(&broken, 2000, 3))
        .expect("client")
        .generate(&profile(), live.as_ref())
        .await;
    assert!(failed.is_err(), "{failed:?}");
    assert_eq!(live.so_far(), "", "the partial text is reset");
    assert_eq!(broken.sim.stats().requests, 1, "not retried after text");
}
