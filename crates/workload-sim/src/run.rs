//! Runs a month of traffic through the gateway's own `NarrativeService`, embedded:
//! real key derivation and quantization, the in-memory store with its byte budget,
//! single flight, the write policy and pre-warming, with the simulated LLM.
//!
//! Requests run one at a time. A month's traffic is spread over weeks, so by the time
//! a profile is asked for again its generation has long finished; what one request
//! costs a user is the service's own time on a hit, and the LLM's latency on a miss,
//! or `GENERATION_WAIT_MS` (then the template) when the LLM is slower than that.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use analytics::InMemoryAnalytics;
use api_gateway::service::{
    Caller, Directives, InProcessFill, NarrativeService, Pacer, RunProgress, ServiceParts, Source,
};
use api_gateway::Metrics;
use cache_core::{
    CacheKeySecret, EngineVersion, KeyDeriver, KeyedProfile, MemoryStore, ProfileInput,
    QuantizationStep,
};
use hdrhistogram::Histogram;
use tokio_util::sync::CancellationToken;

use crate::llm::{LlmModel, SimulatedLlm};
use crate::traffic::{month, Request, TrafficShape};

#[derive(Debug, Clone)]
pub struct SimSettings {
    pub step: QuantizationStep,
    /// Pre-warm the most requested profiles of the month before (the same shape,
    /// another seed) this many, before the month starts.
    pub prewarm_top: usize,
    pub llm: LlmModel,
    pub generation_wait: Duration,
    pub memory_budget_bytes: u64,
}

impl SimSettings {
    pub fn new(step: QuantizationStep, prewarm_top: usize) -> Self {
        Self {
            step,
            prewarm_top,
            llm: LlmModel::default(),
            generation_wait: Duration::from_millis(4_500),
            memory_budget_bytes: 256 * 1024 * 1024,
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct Report {
    pub requests: u64,
    pub distinct_keys: u64,
    pub hits: u64,
    /// Of the month's requests: hits over requests.
    pub hit_rate: f64,
    pub prewarm_calls: u64,
    pub miss_calls: u64,
    pub fallbacks: u64,
    /// Dollars spent on the LLM in the month, pre-warming included.
    pub llm_cost: f64,
    /// What the hits would have cost.
    pub cost_saved: f64,
    /// User-perceived latency.
    pub p50_ms: f64,
    pub p99_ms: f64,
}

impl Report {
    pub fn llm_calls(&self) -> u64 {
        self.prewarm_calls + self.miss_calls
    }
}

fn service(settings: &SimSettings, llm: Arc<SimulatedLlm>) -> Arc<NarrativeService> {
    let deriver = KeyDeriver::new(
        &CacheKeySecret::new(b"workload-simulator-secret".to_vec()),
        EngineVersion::default(),
        narrative_gen::NarrativeGenerator::prompt_hash(llm.as_ref()),
        settings.step,
    );
    let month = Duration::from_secs(31 * 86_400);
    Arc::new(NarrativeService::new(ServiceParts {
        deriver,
        store: Arc::new(MemoryStore::new(settings.memory_budget_bytes)),
        generator: llm,
        metrics: Arc::new(Metrics::new()),
        events: Arc::new(InMemoryAnalytics::new()),
        // No entry expires or goes stale within the simulated month.
        ttl: month,
        stale_after: month,
        generation_wait: settings.generation_wait,
        strategy: Arc::new(InProcessFill::new(Duration::from_secs(3600))),
        previous_versions: Vec::new(),
        user_index: Arc::new(cache_core::user_index::MemoryUserIndex::default()),
        erasure_tombstone: Duration::from_secs(3600),
        // The simulation measures hit rate, not load shedding.
        max_pending_generations: usize::MAX,
        known_systems: None,
        revalidate_min_interval: Duration::ZERO,
    }))
}

/// The keyed profile of a request body.
pub fn keyed(service: &NarrativeService, body: &serde_json::Value) -> KeyedProfile {
    let input = ProfileInput::from_json(body.to_string().as_bytes()).expect("traffic is valid");
    service.derive(&input).expect("traffic is valid")
}

/// The `top` most requested profiles of `traffic`, keyed by `service`.
fn most_requested(
    service: &NarrativeService,
    traffic: &[Request],
    top: usize,
) -> Vec<KeyedProfile> {
    let mut counts: HashMap<cache_core::CacheKey, (u64, KeyedProfile)> = HashMap::new();
    for request in traffic {
        let keyed = keyed(service, &request.body);
        counts
            .entry(keyed.key.clone())
            .or_insert_with(|| (0, keyed))
            .0 += 1;
    }
    let mut ranked: Vec<(u64, KeyedProfile)> = counts.into_values().collect();
    ranked.sort_by(|a, b| {
        b.0.cmp(&a.0)
            .then_with(|| a.1.key.as_str().cmp(b.1.key.as_str()))
    });
    ranked
        .into_iter()
        .take(top)
        .map(|(_, keyed)| keyed)
        .collect()
}

/// Simulates one month of `shape` under `settings`.
pub async fn simulate(shape: &TrafficShape, settings: &SimSettings) -> Report {
    let llm = Arc::new(SimulatedLlm::new(settings.llm, shape.seed));
    let service = service(settings, Arc::clone(&llm));

    if settings.prewarm_top > 0 {
        let last_month = month(&TrafficShape {
            seed: shape.seed.wrapping_add(1),
            ..shape.clone()
        });
        let popular = most_requested(&service, &last_month, settings.prewarm_top);
        let (to_warm, cached) = service.prewarm_plan(popular).await;
        let run = Arc::new(RunProgress::new(
            "sim".to_owned(),
            to_warm.len() as u64 + cached,
            cached,
        ));
        Arc::clone(&service)
            .prewarm_run(
                to_warm,
                run,
                Arc::new(Pacer::new(Duration::from_micros(1))),
                CancellationToken::new(),
            )
            .await;
    }
    let prewarm_calls = llm.calls();

    let traffic = month(shape);
    let mut latency = Histogram::<u64>::new(3).expect("histogram");
    let (mut hits, mut fallbacks, mut cost_saved) = (0u64, 0u64, 0.0);
    let mut keys = std::collections::HashSet::new();
    for request in &traffic {
        let body = request.body.to_string();
        // A request's own cost starts at its bytes: parse, validate, key, answer.
        let started = Instant::now();
        let input = ProfileInput::from_json(body.as_bytes()).expect("traffic is valid");
        let keyed = service.derive(&input).expect("traffic is valid");
        keys.insert(keyed.key.clone());
        let answer = service
            .narrative_with(&keyed, started, Directives::default(), &Caller::default())
            .await
            .expect("no only-if-cached");
        let took = match answer.source {
            Source::Cache | Source::Stale => {
                hits += 1;
                cost_saved += answer.envelope.cost_usd;
                started.elapsed()
            }
            Source::Generated | Source::Fallback => {
                let llm_latency = llm.last_latency();
                if llm_latency > settings.generation_wait {
                    fallbacks += 1;
                }
                started.elapsed() + llm_latency.min(settings.generation_wait)
            }
        };
        let _ = latency.record(took.as_micros().max(1) as u64);
    }
    let total_calls = llm.calls();
    let requests = traffic.len() as u64;
    Report {
        requests,
        distinct_keys: keys.len() as u64,
        hits,
        hit_rate: hits as f64 / requests.max(1) as f64,
        prewarm_calls,
        miss_calls: total_calls - prewarm_calls,
        fallbacks,
        llm_cost: llm.cost_usd(),
        cost_saved,
        p50_ms: latency.value_at_quantile(0.50) as f64 / 1000.0,
        p99_ms: latency.value_at_quantile(0.99) as f64 / 1000.0,
    }
}
