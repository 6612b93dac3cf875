//! `llm-sim`: serves the simulator. Settings from the environment:
//! `LLM_SIM_BIND` (127.0.0.1:8090), `LLM_SIM_LATENCY_MS` (800), `LLM_SIM_JITTER_MS` (0),
//! `LLM_SIM_FAILURE_RATE` (0.0), `LLM_SIM_FAILURE_STATUS` (500),
//! `LLM_SIM_RETRY_AFTER_SECS` (unset), `LLM_SIM_FINISH_REASON` (stop),
//! `LLM_SIM_SIGN_COMPLETIONS` (false: end each text with its serial number); for
//! streamed answers `LLM_SIM_CHUNK_CHARS` (60), `LLM_SIM_CHUNK_INTERVAL_MS` (0) and
//! `LLM_SIM_FAIL_AFTER_CHUNKS` (unset: never break).

use std::net::SocketAddr;

use anyhow::Context;
use cache_core::config::Vars;
use llm_sim::{router, SimConfig, Simulator};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    cache_core::telemetry::init();
    let vars = Vars::from_env();
    let defaults = SimConfig::default();
    let bind: SocketAddr =
        vars.from_str_or("LLM_SIM_BIND", SocketAddr::from(([127, 0, 0, 1], 8090)))?;
    let config = SimConfig {
        latency_ms: vars.from_str_or("LLM_SIM_LATENCY_MS", defaults.latency_ms)?,
        jitter_ms: vars.from_str_or("LLM_SIM_JITTER_MS", defaults.jitter_ms)?,
        failure_rate: vars.from_str_or("LLM_SIM_FAILURE_RATE", defaults.failure_rate)?,
        failure_status: vars.from_str_or("LLM_SIM_FAILURE_STATUS", defaults.failure_status)?,
        retry_after_secs: vars
            .get("LLM_SIM_RETRY_AFTER_SECS")
            .map(|v| v.parse())
            .transpose()
            .context("invalid LLM_SIM_RETRY_AFTER_SECS")?,
        finish_reason: vars
            .get("LLM_SIM_FINISH_REASON")
            .unwrap_or(defaults.finish_reason),
        sign_completions: vars.from_str_or("LLM_SIM_SIGN_COMPLETIONS", false)?,
        chunk_chars: vars.from_str_or("LLM_SIM_CHUNK_CHARS", defaults.chunk_chars)?,
        chunk_interval_ms: vars
            .from_str_or("LLM_SIM_CHUNK_INTERVAL_MS", defaults.chunk_interval_ms)?,
        fail_after_chunks: vars
            .get("LLM_SIM_FAIL_AFTER_CHUNKS")
            .map(|v| v.parse())
            .transpose()
            .context("invalid LLM_SIM_FAIL_AFTER_CHUNKS")?,
    };
    let listener = tokio::net::TcpListener::bind(bind)
        .await
        .with_context(|| format!("binding {bind}"))?;
    tracing::info!(%bind, ?config, "llm-sim serving OpenAI-compatible /v1/chat/completions");
    axum::serve(llm_sim::nodelay(listener), router(Simulator::new(config)))
        .with_graceful_shutdown(async {
            let _ = tokio::signal::ctrl_c().await;
        })
        .await?;
    Ok(())
}
