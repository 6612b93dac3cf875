//! Every metric the gateway exports, named in one place so the dashboards can match.
//! Label values are fixed sets: no user ids, keys or client input ever become labels.

use std::sync::Arc;

use prometheus::{
    Counter, Encoder, Gauge, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec,
    IntGauge, Opts, Registry, TextEncoder,
};

/// How a `POST /narrative` was answered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Hit,
    Generated,
    Fallback,
    Stale,
    /// `Prefer: respond-async` on a miss: answered 202 while the generation runs.
    Pending,
}

impl Outcome {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Hit => "hit",
            Self::Generated => "generated",
            Self::Fallback => "fallback",
            Self::Stale => "stale",
            Self::Pending => "pending",
        }
    }
}

/// Seconds; fine at the bottom, where cache hits live.
const LATENCY_BUCKETS: &[f64] = &[
    0.000_05, 0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.05, 0.25, 1.0, 2.5, 5.0,
    10.0, 30.0,
];

/// Seconds to a stream's first text: hits in microseconds, the LLM's first token in
/// hundreds of milliseconds, the template at `GENERATION_WAIT_MS`.
const FIRST_DELTA_BUCKETS: &[f64] = &[
    0.000_1, 0.000_5, 0.001, 0.005, 0.025, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0,
];

#[derive(Debug, Clone)]
pub struct Metrics {
    registry: Registry,
    requests: [IntCounter; 5],
    latency: [Histogram; 5],
    pub collapsed: IntCounter,
    rejected: IntCounterVec,
    generations: IntCounterVec,
    pub generation_seconds: Histogram,
    /// Streamed answers: time to the first text, by what it was.
    pub first_delta_seconds: HistogramVec,
    pub generations_in_flight: IntGauge,
    pub llm_tokens_input: IntCounter,
    pub llm_tokens_output: IntCounter,
    pub llm_cost_usd: Counter,
    pub cost_saved_usd: Counter,
    pub store_errors: IntCounter,
    pub refresh_failures: IntCounter,
    /// Stored entries found unreadable, replaced by the next generation.
    pub unreadable_entries: IntCounter,
    /// Misses answered with the template without starting a generation, because
    /// `MAX_PENDING_GENERATIONS` were already running.
    pub generations_shed: IntCounter,
    pub cache_entries: Gauge,
    pub cache_bytes: Gauge,
    rate_limited: IntCounterVec,
    client_requests: IntCounterVec,
    /// Each known client's `client_requests` counter, resolved once by name:
    /// `with_label_values` hashes and looks up the label on every call.
    known_clients: Vec<(Arc<str>, IntCounter)>,
    /// Connections the server closed on a client that was too slow, by why.
    pub connections_closed: IntCounterVec,
}

impl Metrics {
    pub fn new() -> Self {
        let registry = Registry::new();
        let requests = IntCounterVec::new(
            Opts::new(
                "narrative_requests_total",
                "POST /narrative requests that passed validation, by outcome",
            ),
            &["outcome"],
        )
        .expect("valid metric");
        let latency = HistogramVec::new(
            HistogramOpts::new(
                "narrative_request_duration_seconds",
                "Server time of POST /narrative, by outcome",
            )
            .buckets(LATENCY_BUCKETS.to_vec()),
            &["outcome"],
        )
        .expect("valid metric");
        let by_outcome = |outcome: Outcome| outcome.as_str();
        let outcomes = [
            Outcome::Hit,
            Outcome::Generated,
            Outcome::Fallback,
            Outcome::Stale,
            Outcome::Pending,
        ];
        let metrics = Self {
            requests: outcomes.map(|o| requests.with_label_values(&[by_outcome(o)])),
            latency: outcomes.map(|o| latency.with_label_values(&[by_outcome(o)])),
            collapsed: IntCounter::new(
                "narrative_collapsed_total",
                "Requests that waited on another request's generation",
            )
            .expect("valid metric"),
            rejected: IntCounterVec::new(
                Opts::new(
                    "narrative_rejected_total",
                    "Requests refused, by error code",
                ),
                &["code"],
            )
            .expect("valid metric"),
            generations: IntCounterVec::new(
                Opts::new(
                    "narrative_generations_total",
                    "Generator calls, by result (ok or the error kind)",
                ),
                &["result"],
            )
            .expect("valid metric"),
            generation_seconds: Histogram::with_opts(
                HistogramOpts::new(
                    "narrative_generation_duration_seconds",
                    "Time to generate a narrative, retries included",
                )
                .buckets(LATENCY_BUCKETS.to_vec()),
            )
            .expect("valid metric"),
            first_delta_seconds: HistogramVec::new(
                HistogramOpts::new(
                    "narrative_first_delta_seconds",
                    "Streamed answers: time from the request to its first text, by source (cache, stale, generated, fallback)",
                )
                .buckets(FIRST_DELTA_BUCKETS.to_vec()),
                &["source"],
            )
            .expect("valid metric"),
            generations_in_flight: IntGauge::new(
                "narrative_generations_in_flight",
                "Generations running now",
            )
            .expect("valid metric"),
            llm_tokens_input: IntCounter::new("llm_tokens_input_total", "Prompt tokens paid for")
                .expect("valid metric"),
            llm_tokens_output: IntCounter::new(
                "llm_tokens_output_total",
                "Completion tokens paid for",
            )
            .expect("valid metric"),
            llm_cost_usd: Counter::new("llm_cost_usd_total", "Dollars spent on the LLM")
                .expect("valid metric"),
            cost_saved_usd: Counter::new(
                "narrative_cost_saved_usd_total",
                "Dollars cache hits saved (each hit credits its entry's cost)",
            )
            .expect("valid metric"),
            store_errors: IntCounter::new(
                "cache_store_errors_total",
                "Cache backend calls that failed and were degraded around",
            )
            .expect("valid metric"),
            refresh_failures: IntCounter::new(
                "narrative_refresh_failures_total",
                "Background refreshes of stale entries that failed (the stale entry stays)",
            )
            .expect("valid metric"),
            unreadable_entries: IntCounter::new(
                "narrative_unreadable_entries_total",
                "Stored entries that could not be read (corrupt, unknown key or format), replaced by the next generation",
            )
            .expect("valid metric"),
            generations_shed: IntCounter::new(
                "narrative_generations_shed_total",
                "Misses answered with the template without a generation: MAX_PENDING_GENERATIONS were running",
            )
            .expect("valid metric"),
            cache_entries: Gauge::new("narrative_cache_entries", "Narrative entries in the cache")
                .expect("valid metric"),
            cache_bytes: Gauge::new("narrative_cache_bytes", "Bytes the cache holds")
                .expect("valid metric"),
            rate_limited: IntCounterVec::new(
                Opts::new(
                    "narrative_rate_limited_total",
                    "Requests refused with 429, by client (names from API_KEYS)",
                ),
                &["client"],
            )
            .expect("valid metric"),
            client_requests: IntCounterVec::new(
                Opts::new(
                    "narrative_client_requests_total",
                    "Requests to client routes that passed authentication, by client",
                ),
                &["client"],
            )
            .expect("valid metric"),
            known_clients: Vec::new(),
            connections_closed: IntCounterVec::new(
                Opts::new(
                    "narrative_connections_closed_total",
                    "Connections closed on a client: its first request headers not in within HTTP_HEADER_TIMEOUT (header_timeout), or still open at the end of SHUTDOWN_GRACE (shutdown)",
                ),
                &["reason"],
            )
            .expect("valid metric"),
            registry,
        };
        let collectors: Vec<Box<dyn prometheus::core::Collector>> = vec![
            Box::new(requests),
            Box::new(latency),
            Box::new(metrics.collapsed.clone()),
            Box::new(metrics.rejected.clone()),
            Box::new(metrics.generations.clone()),
            Box::new(metrics.generation_seconds.clone()),
            Box::new(metrics.first_delta_seconds.clone()),
            Box::new(metrics.generations_in_flight.clone()),
            Box::new(metrics.llm_tokens_input.clone()),
            Box::new(metrics.llm_tokens_output.clone()),
            Box::new(metrics.llm_cost_usd.clone()),
            Box::new(metrics.cost_saved_usd.clone()),
            Box::new(metrics.store_errors.clone()),
            Box::new(metrics.refresh_failures.clone()),
            Box::new(metrics.unreadable_entries.clone()),
            Box::new(metrics.generations_shed.clone()),
            Box::new(metrics.cache_entries.clone()),
            Box::new(metrics.cache_bytes.clone()),
            Box::new(metrics.rate_limited.clone()),
            Box::new(metrics.client_requests.clone()),
            Box::new(metrics.connections_closed.clone()),
        ];
        for collector in collectors {
            metrics
                .registry
                .register(collector)
                .expect("metric names are unique");
        }
        metrics
    }

    /// Where other parts (the event publisher) register their metrics.
    pub fn registry(&self) -> &Registry {
        &self.registry
    }

    pub fn observe_request(&self, outcome: Outcome, seconds: f64) {
        let i = outcome as usize;
        self.requests[i].inc();
        self.latency[i].observe(seconds);
    }

    pub fn rejected(&self, code: &'static str) {
        self.rejected.with_label_values(&[code]).inc();
    }

    /// `client` is a configured client name, `admin` or `anonymous`: a bounded set.
    pub fn rate_limited(&self, client: &str) {
        self.rate_limited.with_label_values(&[client]).inc();
    }

    /// Resolves the request counters of `clients` (the client table's names, shared
    /// with every request of theirs) once, so that counting a request of one costs a
    /// pointer comparison per known client instead of a label lookup.
    pub fn know_clients<'a>(&mut self, clients: impl IntoIterator<Item = &'a Arc<str>>) {
        self.known_clients = clients
            .into_iter()
            .map(|name| {
                let counter = self.client_requests.with_label_values(&[&**name]);
                (Arc::clone(name), counter)
            })
            .collect();
    }

    pub fn client_request(&self, client: &Arc<str>) {
        match self
            .known_clients
            .iter()
            .find(|(name, _)| Arc::ptr_eq(name, client))
        {
            Some((_, requests)) => requests.inc(),
            None => self.client_requests.with_label_values(&[&**client]).inc(),
        }
    }

    pub fn generation(&self, result: &'static str) {
        self.generations.with_label_values(&[result]).inc();
    }

    /// The Prometheus text exposition of every metric.
    pub fn render(&self) -> String {
        let mut out = Vec::with_capacity(8192);
        // Encoding into a Vec only fails on invalid metric families, which `new` rules out.
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut out);
        String::from_utf8(out).unwrap_or_default()
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A known client's requests go to its resolved counter, an unknown name's to its
    /// own label: each counted once, under its own name.
    #[test]
    fn client_requests_count_known_and_unknown_clients_by_name() {
        let (mobile, web) = (Arc::<str>::from("mobile"), Arc::<str>::from("web"));
        let mut metrics = Metrics::new();
        metrics.know_clients([&mobile]);
        for _ in 0..3 {
            metrics.client_request(&mobile);
        }
        metrics.client_request(&web);
        // Equal text in another allocation is the same client, counted by label.
        metrics.client_request(&Arc::from("mobile"));
        let rendered = metrics.render();
        assert!(rendered.contains("narrative_client_requests_total{client=\"mobile\"} 4"));
        assert!(rendered.contains("narrative_client_requests_total{client=\"web\"} 1"));
    }
}
