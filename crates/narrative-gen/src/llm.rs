//! An OpenAI-compatible chat-completions client, always streamed: the first request
//! for a key cannot know whether anyone will stream its text.
//!
//! Each attempt has a timeout. Timeouts, connection failures, 408, 429 and 5xx are
//! retried with full-jitter exponential backoff, honouring `Retry-After`; other 4xx
//! are not, since asking again cannot help. A reply only counts when it is complete:
//! `finish_reason` must be `stop` and the text non-empty, which is the write policy
//! (truncated or empty outputs are never stored).
//!
//! [`LlmClient::stream`] asks for the completion streamed (`"stream": true`, with
//! `stream_options.include_usage` for the token counts) and hands each piece of text
//! to its caller as it arrives. It waits `first_token_timeout` for the first piece and
//! `idle_timeout` between pieces, and retries only before the first piece: text a
//! caller has passed on cannot be taken back by a retry. An attempt ends by `timeout`
//! however the text trickles. The Server-Sent Events are
//! parsed by `eventsource-stream` (the parser async-openai uses), not by hand.

use std::fmt;
use std::time::{Duration, Instant};

use rand::Rng;
use serde::{Deserialize, Serialize};

use crate::prompt::GenerationParams;

/// Dollars per million tokens.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Pricing {
    pub input_per_mtok: f64,
    pub output_per_mtok: f64,
}

impl Pricing {
    pub fn cost_usd(&self, tokens_in: u32, tokens_out: u32) -> f64 {
        (f64::from(tokens_in) * self.input_per_mtok + f64::from(tokens_out) * self.output_per_mtok)
            / 1_000_000.0
    }
}

/// An API key that never prints.
#[derive(Clone)]
pub struct ApiKey(String);

impl ApiKey {
    pub fn new(key: impl Into<String>) -> Self {
        Self(key.into())
    }
}

impl fmt::Debug for ApiKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("ApiKey(<redacted>)")
    }
}

#[derive(Debug, Clone)]
pub struct LlmSettings {
    /// Includes the version path, as OpenAI clients do: `https://api.openai.com/v1`.
    pub base_url: String,
    pub api_key: ApiKey,
    pub params: GenerationParams,
    pub pricing: Pricing,
    /// Per attempt.
    pub timeout: Duration,
    /// Retries after the first attempt.
    pub max_retries: u32,
    pub backoff_base: Duration,
    /// The longest single wait, also the longest `Retry-After` worth honouring.
    pub backoff_max: Duration,
    /// Streamed: how long the first piece of text may take, from the request.
    pub first_token_timeout: Duration,
    /// Streamed: how long the stream may go quiet between pieces.
    pub idle_timeout: Duration,
}

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum LlmError {
    #[error("LLM call timed out")]
    Timeout,
    #[error("LLM unreachable: {0}")]
    Connect(String),
    #[error("LLM answered HTTP {status}")]
    Status {
        status: u16,
        retry_after: Option<Duration>,
    },
    #[error("LLM output incomplete (finish_reason {0:?})")]
    Incomplete(String),
    #[error("LLM output empty")]
    Empty,
    #[error("LLM reply malformed: {0}")]
    Malformed(String),
}

impl LlmError {
    pub fn is_retryable(&self) -> bool {
        match self {
            Self::Timeout | Self::Connect(_) => true,
            Self::Status { status, .. } => matches!(status, 408 | 429 | 500..=599),
            Self::Incomplete(_) | Self::Empty | Self::Malformed(_) => false,
        }
    }

    /// A short label for metrics.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::Timeout => "timeout",
            Self::Connect(_) => "connect",
            Self::Status { status: 429, .. } => "rate_limited",
            Self::Status {
                status: 500..=599, ..
            } => "server_error",
            Self::Status { .. } => "client_error",
            Self::Incomplete(_) => "incomplete",
            Self::Empty => "empty",
            Self::Malformed(_) => "malformed",
        }
    }
}

/// A complete reply.
#[derive(Debug, Clone, PartialEq)]
pub struct Completion {
    pub text: String,
    pub tokens_in: u32,
    pub tokens_out: u32,
    pub attempts: u32,
    pub elapsed: Duration,
}

#[derive(Debug, Clone)]
pub struct LlmClient {
    /// Without a total timeout: a stream is bounded by its first-token, idle and
    /// attempt deadlines.
    streaming: reqwest::Client,
    endpoint: String,
    settings: LlmSettings,
}

#[derive(Serialize)]
struct ChatRequest<'a> {
    model: &'a str,
    messages: [Message<'a>; 1],
    temperature: f32,
    max_tokens: u32,
    stream: bool,
    stream_options: StreamOptions,
}

#[derive(Serialize)]
struct StreamOptions {
    include_usage: bool,
}

/// One `chat.completion.chunk` of a stream.
#[derive(Deserialize)]
struct ChatChunk {
    #[serde(default)]
    choices: Vec<ChunkChoice>,
    usage: Option<Usage>,
}

#[derive(Deserialize)]
struct ChunkChoice {
    #[serde(default)]
    delta: Delta,
    finish_reason: Option<String>,
}

#[derive(Deserialize, Default)]
struct Delta {
    content: Option<String>,
}

#[derive(Serialize)]
struct Message<'a> {
    role: &'static str,
    content: &'a str,
}

#[derive(Deserialize)]
struct Usage {
    prompt_tokens: u32,
    completion_tokens: u32,
}

impl LlmClient {
    pub fn new(settings: LlmSettings) -> Result<Self, LlmError> {
        let streaming = reqwest::Client::builder()
            .connect_timeout(settings.first_token_timeout.min(Duration::from_secs(5)))
            .build()
            .map_err(|e| LlmError::Connect(e.to_string()))?;
        let endpoint = format!(
            "{}/chat/completions",
            settings.base_url.trim_end_matches('/')
        );
        Ok(Self {
            streaming,
            endpoint,
            settings,
        })
    }

    pub fn settings(&self) -> &LlmSettings {
        &self.settings
    }

    /// Sends the prompt for a streamed reply, handing each piece of text to
    /// `on_delta` as it arrives, and returns the whole completion once it is complete
    /// (`finish_reason` `stop`, text, usage). Retries what can be retried only while
    /// no piece has been handed on; after that, an error ends it (the caller decides
    /// what the text it passed on becomes).
    pub async fn stream(
        &self,
        prompt: &str,
        mut on_delta: impl FnMut(&str) + Send,
    ) -> Result<Completion, LlmError> {
        let started = Instant::now();
        let mut attempt = 0;
        let mut handed_on = false;
        loop {
            attempt += 1;
            let error = match self
                .stream_attempt(prompt, &mut on_delta, &mut handed_on)
                .await
            {
                Ok((text, tokens_in, tokens_out)) => {
                    return Ok(Completion {
                        text,
                        tokens_in,
                        tokens_out,
                        attempts: attempt,
                        elapsed: started.elapsed(),
                    })
                }
                Err(error) => error,
            };
            if handed_on || !error.is_retryable() || attempt > self.settings.max_retries {
                return Err(error);
            }
            let Some(wait) = self.backoff(attempt, &error) else {
                return Err(error);
            };
            tracing::debug!(attempt, error = %error, wait_ms = wait.as_millis() as u64, "retrying streamed LLM call before its first token");
            tokio::time::sleep(wait).await;
        }
    }

    async fn stream_attempt(
        &self,
        prompt: &str,
        on_delta: &mut (impl FnMut(&str) + Send),
        handed_on: &mut bool,
    ) -> Result<(String, u32, u32), LlmError> {
        use eventsource_stream::Eventsource as _;
        use futures::StreamExt as _;

        let params = &self.settings.params;
        let request = ChatRequest {
            model: &params.model,
            messages: [Message {
                role: "user",
                content: prompt,
            }],
            temperature: params.temperature,
            max_tokens: params.max_tokens,
            stream: true,
            stream_options: StreamOptions {
                include_usage: true,
            },
        };
        let started = tokio::time::Instant::now();
        let first_token_by = started + self.settings.first_token_timeout;
        // However it trickles, an attempt ends by LLM_TIMEOUT_MS, as a whole one does.
        let attempt_by = started + self.settings.timeout;
        let send = self
            .streaming
            .post(&self.endpoint)
            .bearer_auth(&self.settings.api_key.0)
            .json(&request)
            .send();
        let response = tokio::time::timeout_at(first_token_by, send)
            .await
            .map_err(|_| LlmError::Timeout)?
            .map_err(classify)?;
        let mut events = succeeded(response)?.bytes_stream().eventsource();
        let (mut text, mut finish_reason, mut usage) = (String::new(), None, None);
        let mut trim = Trim::default();
        // Until the first piece, the first-token deadline; then the idle one, counted
        // from the last piece of text (chunks without text do not keep it alive).
        let mut quiet_by = first_token_by;
        loop {
            let next = tokio::time::timeout_at(quiet_by.min(attempt_by), events.next()).await;
            let Some(event) = next.map_err(|_| LlmError::Timeout)? else {
                // The connection ended without `[DONE]`: judged by what arrived.
                break;
            };
            let event = event.map_err(|error| match error {
                eventsource_stream::EventStreamError::Transport(error) => classify(error),
                other => LlmError::Malformed(other.to_string()),
            })?;
            if event.data.trim() == "[DONE]" {
                break;
            }
            let chunk: ChatChunk = serde_json::from_str(&event.data)
                .map_err(|e| LlmError::Malformed(format!("chunk: {e}")))?;
            usage = chunk.usage.or(usage);
            for choice in chunk.choices {
                if let Some(piece) = choice.delta.content.filter(|piece| !piece.is_empty()) {
                    if let Some(trimmed) = trim.piece(&piece) {
                        text.push_str(&trimmed);
                        on_delta(&trimmed);
                        *handed_on = true;
                    }
                    quiet_by = tokio::time::Instant::now() + self.settings.idle_timeout;
                }
                finish_reason = choice.finish_reason.or(finish_reason);
            }
        }
        let finish_reason = finish_reason.unwrap_or_default();
        if finish_reason != "stop" {
            return Err(LlmError::Incomplete(finish_reason));
        }
        // Already trimmed: what was handed on is exactly the narrative.
        if text.is_empty() {
            return Err(LlmError::Empty);
        }
        let usage = usage.ok_or_else(|| LlmError::Malformed("no usage chunk".into()))?;
        Ok((text, usage.prompt_tokens, usage.completion_tokens))
    }

    /// Full jitter: a random wait up to `base * 2^(attempt-1)`, capped. A server's
    /// `Retry-After` is a floor; one longer than the cap is not worth waiting for.
    fn backoff(&self, attempt: u32, error: &LlmError) -> Option<Duration> {
        let ceiling = self
            .settings
            .backoff_base
            .saturating_mul(1 << (attempt - 1).min(16))
            .min(self.settings.backoff_max);
        let jittered = ceiling.mul_f64(rand::rng().random::<f64>());
        match error {
            LlmError::Status {
                retry_after: Some(after),
                ..
            } if *after > self.settings.backoff_max => None,
            LlmError::Status {
                retry_after: Some(after),
                ..
            } => Some(jittered.max(*after)),
            _ => Some(jittered),
        }
    }
}

/// The response, or the error its status says (with `Retry-After`, when given).
fn succeeded(response: reqwest::Response) -> Result<reqwest::Response, LlmError> {
    let status = response.status();
    if status.is_success() {
        return Ok(response);
    }
    let retry_after = response
        .headers()
        .get(reqwest::header::RETRY_AFTER)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok())
        .map(Duration::from_secs);
    Err(LlmError::Status {
        status: status.as_u16(),
        retry_after,
    })
}

fn classify(error: reqwest::Error) -> LlmError {
    if error.is_timeout() {
        LlmError::Timeout
    } else {
        LlmError::Connect(error.without_url().to_string())
    }
}

/// Streamed pieces as the trimmed narrative they add up to: whitespace before the
/// first word is dropped, and whitespace after the last word so far is held back until
/// a word follows it (at the end it is dropped), so the pieces handed on concatenate to
/// exactly the stored text.
#[derive(Debug, Default)]
struct Trim {
    started: bool,
    held: String,
}

impl Trim {
    /// What of `piece` may be handed on now, if anything.
    fn piece(&mut self, piece: &str) -> Option<String> {
        let piece = if self.started {
            piece
        } else {
            piece.trim_start()
        };
        let words = piece.trim_end();
        if words.is_empty() {
            if self.started {
                self.held.push_str(piece);
            }
            return None;
        }
        self.started = true;
        let mut out = std::mem::take(&mut self.held);
        out.push_str(words);
        self.held.push_str(&piece[words.len()..]);
        Some(out)
    }
}

#[cfg(test)]
mod tests {

    #[test]
    fn trimmed_pieces_add_up_to_the_trimmed_text() {
        let pieces = ["\n\n ", " Once", " upon ", "\n", "", "a time.", " \n"];
        let mut trim = Trim::default();
        let out: String = pieces.iter().filter_map(|p| trim.piece(p)).collect();
        assert_eq!(out, pieces.concat().trim());
    }
    use super::*;

    #[test]
    fn cost_from_usage_and_prices() {
        let pricing = Pricing {
            input_per_mtok: 0.15,
            output_per_mtok: 0.60,
        };
        let cost = pricing.cost_usd(1_000_000, 500_000);
        assert!((cost - 0.45).abs() < 1e-12, "{cost}");
    }

    #[test]
    fn retryable_errors() {
        assert!(LlmError::Timeout.is_retryable());
        assert!(LlmError::Status {
            status: 429,
            retry_after: None
        }
        .is_retryable());
        assert!(LlmError::Status {
            status: 503,
            retry_after: None
        }
        .is_retryable());
        assert!(!LlmError::Status {
            status: 400,
            retry_after: None
        }
        .is_retryable());
        assert!(!LlmError::Status {
            status: 401,
            retry_after: None
        }
        .is_retryable());
        assert!(!LlmError::Incomplete("length".into()).is_retryable());
    }

    #[test]
    fn api_keys_do_not_print() {
        assert!(!format!("{:?}", ApiKey::new("sk-secret")).contains("sk-secret"));
    }
}
