//! An OpenAI-compatible chat-completions server that stands in for the LLM, which is
//! the one thing our tests and benchmarks simulate (these machines have no internet).
//!
//! It waits a configurable latency, fails a configurable share of calls with a chosen
//! status (and `Retry-After`), can answer with another `finish_reason` (`length` for a
//! truncated output), reports realistic token usage, and counts what it served:
//! `GET /sim/stats`, `POST /sim/reset`, and `GET`/`PUT /sim/config` to change its
//! behaviour while it runs.
//!
//! A request with `"stream": true` is answered as OpenAI streams: Server-Sent Events of
//! `chat.completion.chunk`s, the first after the latency (the first-token latency),
//! then `chunk_chars` characters every `chunk_interval_ms`, the `finish_reason` on the
//! last, a usage chunk when `stream_options.include_usage` asks, and `[DONE]`. With
//! `fail_after_chunks` the connection breaks after that many chunks of text.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use rand::Rng;
use serde::{Deserialize, Serialize};
use tokio::net::TcpListener;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, rename_all = "camelCase")]
pub struct SimConfig {
    pub latency_ms: u64,
    /// Extra latency drawn uniformly from `0..=jitter_ms`.
    pub jitter_ms: u64,
    /// Share of calls, 0.0 to 1.0, answered with `failure_status`.
    pub failure_rate: f64,
    pub failure_status: u16,
    /// Seconds to put in `Retry-After` on failures.
    pub retry_after_secs: Option<u64>,
    pub finish_reason: String,
    /// Ends each completion with `(completion N)`, so tests can tell generations apart.
    pub sign_completions: bool,
    /// Streamed: characters of text per chunk.
    pub chunk_chars: usize,
    /// Streamed: the wait between chunks (the first comes after `latency_ms`). Zero by
    /// default, so that a streamed answer takes `latency_ms` like a whole one.
    pub chunk_interval_ms: u64,
    /// Streamed: break the connection after this many chunks of text.
    pub fail_after_chunks: Option<u32>,
}

impl Default for SimConfig {
    fn default() -> Self {
        Self {
            latency_ms: 800,
            jitter_ms: 0,
            failure_rate: 0.0,
            failure_status: 500,
            retry_after_secs: None,
            finish_reason: "stop".to_owned(),
            sign_completions: false,
            chunk_chars: 60,
            chunk_interval_ms: 0,
            fail_after_chunks: None,
        }
    }
}

/// Counts since start or the last reset.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SimStats {
    /// Chat-completion requests received, whatever their outcome.
    pub requests: u64,
    /// Requests answered 200 with a completion.
    pub completions: u64,
    /// Requests answered with the failure status.
    pub failures: u64,
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
    /// The most chat-completion requests it was serving at once.
    pub max_in_flight: u64,
}

#[derive(Debug, Default)]
pub struct Simulator {
    config: RwLock<SimConfig>,
    requests: AtomicU64,
    completions: AtomicU64,
    failures: AtomicU64,
    prompt_tokens: AtomicU64,
    completion_tokens: AtomicU64,
    in_flight: AtomicU64,
    max_in_flight: AtomicU64,
}

/// Counts a request in flight for as long as it lives.
struct InFlight<'a>(&'a Simulator);

impl<'a> InFlight<'a> {
    fn enter(sim: &'a Simulator) -> Self {
        let now = sim.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
        sim.max_in_flight.fetch_max(now, Ordering::SeqCst);
        Self(sim)
    }
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::SeqCst);
    }
}

impl Simulator {
    pub fn new(config: SimConfig) -> Arc<Self> {
        Arc::new(Self {
            config: RwLock::new(config),
            ..Self::default()
        })
    }

    pub fn config(&self) -> SimConfig {
        self.config
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    pub fn set_config(&self, config: SimConfig) {
        *self
            .config
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = config;
    }

    pub fn stats(&self) -> SimStats {
        SimStats {
            requests: self.requests.load(Ordering::SeqCst),
            completions: self.completions.load(Ordering::SeqCst),
            failures: self.failures.load(Ordering::SeqCst),
            prompt_tokens: self.prompt_tokens.load(Ordering::SeqCst),
            completion_tokens: self.completion_tokens.load(Ordering::SeqCst),
            max_in_flight: self.max_in_flight.load(Ordering::SeqCst),
        }
    }

    pub fn reset(&self) {
        for counter in [
            &self.requests,
            &self.completions,
            &self.failures,
            &self.prompt_tokens,
            &self.completion_tokens,
            &self.max_in_flight,
        ] {
            counter.store(0, Ordering::SeqCst);
        }
    }
}

pub fn router(sim: Arc<Simulator>) -> Router {
    Router::new()
        .route("/v1/chat/completions", post(chat_completions))
        .route("/v1/models", get(models))
        .route(
            "/sim/stats",
            get(|State(sim): State<Arc<Simulator>>| async move { Json(sim.stats()) }),
        )
        .route(
            "/sim/reset",
            post(|State(sim): State<Arc<Simulator>>| async move {
                sim.reset();
                Json(sim.stats())
            }),
        )
        .route(
            "/sim/config",
            get(|State(sim): State<Arc<Simulator>>| async move { Json(sim.config()) }).put(
                |State(sim): State<Arc<Simulator>>, Json(config): Json<SimConfig>| async move {
                    sim.set_config(config);
                    Json(sim.config())
                },
            ),
        )
        .with_state(sim)
}

/// A simulator served on a loopback port, for tests and benchmarks in-process.
#[derive(Debug, Clone)]
pub struct SimHandle {
    pub addr: SocketAddr,
    pub sim: Arc<Simulator>,
}

impl SimHandle {
    /// `LLM_BASE_URL` for this simulator.
    pub fn base_url(&self) -> String {
        format!("http://{}/v1", self.addr)
    }
}

/// Accepted connections write each chunk at once, as OpenAI's servers do: with Nagle's
/// algorithm, a chunk written while the last is unacknowledged waits for the
/// client's delayed ACK (some 40 ms), which is not the latency being simulated.
pub fn nodelay(listener: TcpListener) -> impl axum::serve::Listener<Addr = SocketAddr> {
    use axum::serve::ListenerExt as _;
    listener.tap_io(|stream| {
        let _ = stream.set_nodelay(true);
    })
}

/// Starts a simulator on `127.0.0.1:0` in the current runtime.
pub async fn spawn(config: SimConfig) -> std::io::Result<SimHandle> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let sim = Simulator::new(config);
    let app = router(Arc::clone(&sim));
    tokio::spawn(async move {
        if let Err(error) = axum::serve(nodelay(listener), app).await {
            tracing::error!(%error, "llm-sim stopped");
        }
    });
    Ok(SimHandle { addr, sim })
}

#[derive(Deserialize)]
struct ChatRequest {
    model: String,
    messages: Vec<ChatMessage>,
    #[serde(default)]
    stream: bool,
    #[serde(default)]
    stream_options: Option<StreamOptions>,
}

#[derive(Deserialize)]
struct StreamOptions {
    #[serde(default)]
    include_usage: bool,
}

#[derive(Deserialize)]
struct ChatMessage {
    content: String,
}

async fn models() -> Json<serde_json::Value> {
    Json(serde_json::json!({"object": "list", "data": [{"id": "gpt-4o-mini", "object": "model"}]}))
}

async fn chat_completions(
    State(sim): State<Arc<Simulator>>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> Response {
    let serial = sim.requests.fetch_add(1, Ordering::SeqCst) + 1;
    let _in_flight = InFlight::enter(&sim);
    let config = sim.config();
    let (delay, fails) = {
        let mut rng = rand::rng();
        let jitter = if config.jitter_ms > 0 {
            rng.random_range(0..=config.jitter_ms)
        } else {
            0
        };
        (
            Duration::from_millis(config.latency_ms + jitter),
            rng.random::<f64>() < config.failure_rate,
        )
    };
    tokio::time::sleep(delay).await;

    if !headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("Bearer "))
    {
        return error(StatusCode::UNAUTHORIZED, "missing bearer token", None);
    }
    let Ok(request) = serde_json::from_slice::<ChatRequest>(&body) else {
        return error(
            StatusCode::BAD_REQUEST,
            "body is not a chat completion request",
            None,
        );
    };
    if fails {
        sim.failures.fetch_add(1, Ordering::SeqCst);
        let status = StatusCode::from_u16(config.failure_status)
            .unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        return error(status, "simulated failure", config.retry_after_secs);
    }

    let prompt: String = request
        .messages
        .iter()
        .map(|m| m.content.as_str())
        .collect::<Vec<_>>()
        .join("\n");
    let mut text = narrative_for(&prompt);
    if config.sign_completions {
        text.push_str(&format!("\n\n(completion {serial})"));
    }
    if config.finish_reason == "length" {
        text.truncate(text.len() / 3);
    }
    // Roughly what a BPE tokenizer gives for English: four characters a token.
    let prompt_tokens = prompt.len().div_ceil(4) as u64 + 8;
    let completion_tokens = text.len().div_ceil(4) as u64;
    sim.prompt_tokens.fetch_add(prompt_tokens, Ordering::SeqCst);
    sim.completion_tokens
        .fetch_add(completion_tokens, Ordering::SeqCst);
    sim.completions.fetch_add(1, Ordering::SeqCst);
    if request.stream {
        let include_usage = request
            .stream_options
            .as_ref()
            .is_some_and(|options| options.include_usage);
        let completion = Streamed {
            id: format!("chatcmpl-sim-{serial}"),
            model: request.model,
            text,
            finish_reason: config.finish_reason.clone(),
            usage: include_usage.then_some((prompt_tokens, completion_tokens)),
        };
        return stream(completion, &config);
    }
    Json(serde_json::json!({
        "id": format!("chatcmpl-sim-{serial}"),
        "object": "chat.completion",
        "created": cache_core::now_ms() / 1000,
        "model": request.model,
        "choices": [{
            "index": 0,
            "message": {"role": "assistant", "content": text},
            "finish_reason": config.finish_reason,
        }],
        "usage": {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
        },
    }))
    .into_response()
}

/// A completion to stream.
struct Streamed {
    id: String,
    model: String,
    text: String,
    finish_reason: String,
    usage: Option<(u64, u64)>,
}

impl Streamed {
    fn chunk(&self, delta: serde_json::Value, finish_reason: Option<&str>) -> String {
        let chunk = serde_json::json!({
            "id": self.id,
            "object": "chat.completion.chunk",
            "created": cache_core::now_ms() / 1000,
            "model": self.model,
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason}],
        });
        format!("data: {chunk}\n\n")
    }
}

/// The completion as Server-Sent Events, paced by the configuration (the first-token
/// latency has passed already).
fn stream(completion: Streamed, config: &SimConfig) -> Response {
    let interval = Duration::from_millis(config.chunk_interval_ms);
    let chars: Vec<char> = completion.text.chars().collect();
    let pieces: Vec<String> = chars
        .chunks(config.chunk_chars.max(1))
        .map(|piece| piece.iter().collect())
        .collect();
    let fail_after = config.fail_after_chunks;
    let (sender, receiver) = tokio::sync::mpsc::channel::<Result<String, std::io::Error>>(4);
    tokio::spawn(async move {
        let send = |item| sender.send(item);
        let first = completion.chunk(
            serde_json::json!({"role": "assistant", "content": ""}),
            None,
        );
        if send(Ok(first)).await.is_err() {
            return;
        }
        for (n, piece) in pieces.iter().enumerate() {
            if n > 0 {
                tokio::time::sleep(interval).await;
            }
            if fail_after.is_some_and(|after| n >= after as usize) {
                let broken =
                    std::io::Error::new(std::io::ErrorKind::ConnectionReset, "simulated break");
                let _ = send(Err(broken)).await;
                return;
            }
            let chunk = completion.chunk(serde_json::json!({"content": piece}), None);
            if send(Ok(chunk)).await.is_err() {
                return;
            }
        }
        let last = completion.chunk(serde_json::json!({}), Some(&completion.finish_reason));
        let _ = send(Ok(last)).await;
        if let Some((prompt_tokens, completion_tokens)) = completion.usage {
            let usage = serde_json::json!({
                "id": completion.id,
                "object": "chat.completion.chunk",
                "created": cache_core::now_ms() / 1000,
                "model": completion.model,
                "choices": [],
                "usage": {
                    "prompt_tokens": prompt_tokens,
                    "completion_tokens": completion_tokens,
                    "total_tokens": prompt_tokens + completion_tokens,
                },
            });
            let _ = send(Ok(format!("data: {usage}\n\n"))).await;
        }
        let _ = send(Ok("data: [DONE]\n\n".to_owned())).await;
    });
    let chunks = futures::stream::unfold(receiver, |mut receiver| async move {
        receiver.recv().await.map(|item| (item, receiver))
    });
    let body = axum::body::Body::from_stream(chunks);
    (
        [
            (axum::http::header::CONTENT_TYPE, "text/event-stream"),
            (axum::http::header::CACHE_CONTROL, "no-cache"),
        ],
        body,
    )
        .into_response()
}

fn error(status: StatusCode, message: &str, retry_after: Option<u64>) -> Response {
    let body = serde_json::json!({"error": {"message": message, "type": "sim_error"}});
    let mut response = (status, Json(body)).into_response();
    if let Some(secs) = retry_after {
        response
            .headers_mut()
            .insert("retry-after", HeaderValue::from(secs));
    }
    response
}

/// A plausible narrative that mentions what the prompt's profile lists.
fn narrative_for(prompt: &str) -> String {
    let line = |label: &str| {
        prompt
            .lines()
            .find_map(|l| l.trim().strip_prefix(label))
            .map(str::trim)
            .unwrap_or("unknown")
            .to_owned()
    };
    // The prompt's data block (`narrative-gen/prompts/narrative.txt`); names come quoted.
    let systems = line("star systems (percent):").replace('"', "");
    let hd_type = line("Human Design type:");
    let authority = line("authority:");
    let profile = line("profile:");
    format!(
        "Your heritage weaves together {systems}. The strongest of these threads sets the tone of your inner life: \
         a quiet certainty about what matters, and a pull toward the people and work that feel like home.\n\n\
         The smaller shares in your blend are not footnotes. Each of them colours how that core theme shows up, \
         softening it in some moments and sharpening it in others, so that you rarely meet a situation with only one tool.\n\n\
         As a {hd_type} with {authority} authority, you do best when you let decisions come to you in your own way \
         rather than forcing them. Your {profile} profile adds its own rhythm: a balance between learning deeply on your own \
         and being seen by others for what you know.\n\n\
         This week, notice one moment where you would normally rush, and let your {authority} authority have the last word."
    )
}
