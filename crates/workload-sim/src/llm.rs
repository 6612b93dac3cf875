//! The simulated LLM: each call draws a latency, tokens and their cost, and returns
//! at once. The latency is recorded for the caller to account for, not slept, so a
//! month of traffic runs in seconds.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use cache_core::{CanonicalProfile, PromptHash};
use narrative_gen::{GenerateError, Generation, NarrativeGenerator};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// Latency: log-normal around `median` (sigma 0.35: p99 about 2.3 times the median).
/// Tokens: a prompt of 420 ± 40 and an answer of 330 ± 60. Prices: gpt-4o-mini's.
#[derive(Debug, Clone, Copy)]
pub struct LlmModel {
    pub median_latency: Duration,
    pub latency_sigma: f64,
    pub price_input_per_mtok: f64,
    pub price_output_per_mtok: f64,
}

impl Default for LlmModel {
    fn default() -> Self {
        Self {
            median_latency: Duration::from_millis(2_500),
            latency_sigma: 0.35,
            price_input_per_mtok: 0.15,
            price_output_per_mtok: 0.60,
        }
    }
}

#[derive(Debug)]
pub struct SimulatedLlm {
    model: LlmModel,
    rng: Mutex<StdRng>,
    calls: AtomicU64,
    /// Dollars spent so far, in nano-dollars (exact sums).
    cost_nano_usd: AtomicU64,
    /// The last call's latency in microseconds: requests run one at a time, so the
    /// caller reads the latency of the generation its request caused.
    last_latency_us: AtomicU64,
}

impl SimulatedLlm {
    pub fn new(model: LlmModel, seed: u64) -> Self {
        Self {
            model,
            rng: Mutex::new(StdRng::seed_from_u64(seed)),
            calls: AtomicU64::new(0),
            cost_nano_usd: AtomicU64::new(0),
            last_latency_us: AtomicU64::new(0),
        }
    }

    pub fn calls(&self) -> u64 {
        self.calls.load(Ordering::Relaxed)
    }

    pub fn cost_usd(&self) -> f64 {
        self.cost_nano_usd.load(Ordering::Relaxed) as f64 / 1e9
    }

    pub fn last_latency(&self) -> Duration {
        Duration::from_micros(self.last_latency_us.load(Ordering::Relaxed))
    }
}

/// An answer of realistic length (about 900 bytes, like the template engine's).
fn narrative(profile: &CanonicalProfile) -> String {
    let mut text = narrative_gen::template::render(profile);
    text.truncate(900);
    text
}

#[async_trait::async_trait]
impl NarrativeGenerator for SimulatedLlm {
    async fn generate(
        &self,
        profile: &CanonicalProfile,
        live: &dyn cache_core::LiveSink,
    ) -> Result<Generation, GenerateError> {
        let (latency, tokens_in, tokens_out) = {
            let mut rng = self
                .rng
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            let z = crate::traffic::standard_normal(&mut rng);
            let latency =
                self.model.median_latency.as_secs_f64() * (self.model.latency_sigma * z).exp();
            let tokens_in = 380 + rng.random_range(0..=80);
            let tokens_out = 270 + rng.random_range(0..=120);
            (latency, tokens_in, tokens_out)
        };
        self.calls.fetch_add(1, Ordering::Relaxed);
        let latency = Duration::from_secs_f64(latency);
        self.last_latency_us
            .store(latency.as_micros() as u64, Ordering::Relaxed);
        let cost_usd = f64::from(tokens_in) * self.model.price_input_per_mtok / 1e6
            + f64::from(tokens_out) * self.model.price_output_per_mtok / 1e6;
        self.cost_nano_usd
            .fetch_add((cost_usd * 1e9).round() as u64, Ordering::Relaxed);
        let body = narrative(profile);
        live.text(&body);
        Ok(Generation {
            body,
            model: "sim-llm".to_owned(),
            tokens_in,
            tokens_out,
            cost_usd,
            duration: latency,
            attempts: 1,
        })
    }

    fn model(&self) -> &str {
        "sim-llm"
    }

    fn prompt_hash(&self) -> PromptHash {
        PromptHash::of_parts(&[("engine", b"workload-sim")])
    }
}
