//! Turning a canonical profile into a narrative worth storing.

use std::sync::Arc;
use std::time::{Duration, Instant};

use cache_core::config::{ConfigError, Vars};
use cache_core::{now_ms, CanonicalProfile, Envelope, LiveSink, PromptHash};

use crate::llm::{ApiKey, LlmClient, LlmError, LlmSettings, Pricing};
use crate::prompt::{self, GenerationParams};
use crate::template::{self, TEMPLATE_MODEL};

/// A complete narrative and what it cost.
#[derive(Debug, Clone, PartialEq)]
pub struct Generation {
    pub body: String,
    pub model: String,
    pub tokens_in: u32,
    pub tokens_out: u32,
    pub cost_usd: f64,
    pub duration: Duration,
    pub attempts: u32,
}

impl Generation {
    pub fn into_envelope(self, engine_version: &str, prompt_hash: &PromptHash) -> Envelope {
        Envelope {
            body: self.body,
            created_at_ms: now_ms(),
            engine_version: engine_version.to_owned(),
            prompt_hash: prompt_hash.to_string(),
            model: self.model,
            tokens_in: self.tokens_in,
            tokens_out: self.tokens_out,
            cost_usd: self.cost_usd,
            generation_ms: u64::try_from(self.duration.as_millis()).unwrap_or(u64::MAX),
        }
    }
}

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum GenerateError {
    #[error(transparent)]
    Llm(#[from] LlmError),
    /// Today's `LLM_DAILY_BUDGET_USD` is spent: no call was made.
    #[error("the daily LLM budget is spent")]
    BudgetExhausted,
}

impl GenerateError {
    /// A short label for metrics: the LLM error's kind, or `budget`.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::Llm(error) => error.kind(),
            Self::BudgetExhausted => "budget",
        }
    }
}

/// Writes narratives. Only complete, valid outputs come back as `Ok`.
#[async_trait::async_trait]
pub trait NarrativeGenerator: Send + Sync + std::fmt::Debug + 'static {
    /// Writes the profile's narrative, handing its text to `live` as it is written:
    /// the pieces of an `Ok` add up to its body exactly. A generation that fails after
    /// handing on text resets `live`, so nobody takes that text for the narrative.
    async fn generate(
        &self,
        profile: &CanonicalProfile,
        live: &dyn LiveSink,
    ) -> Result<Generation, GenerateError>;
    /// The model named in envelopes and responses.
    fn model(&self) -> &str;
    /// Covers everything that changes this generator's output.
    fn prompt_hash(&self) -> PromptHash;
}

/// Generation through an OpenAI-compatible LLM.
#[derive(Debug)]
pub struct LlmGenerator {
    client: LlmClient,
    prompt_hash: PromptHash,
}

impl LlmGenerator {
    pub fn new(settings: LlmSettings) -> Result<Self, LlmError> {
        let prompt_hash = settings.params.prompt_hash(prompt::TEMPLATE);
        Ok(Self {
            client: LlmClient::new(settings)?,
            prompt_hash,
        })
    }
}

#[async_trait::async_trait]
impl NarrativeGenerator for LlmGenerator {
    /// Always the streamed call: whoever joins while it runs gets the text so far, so
    /// the first request for a key cannot know whether anyone will stream it.
    async fn generate(
        &self,
        profile: &CanonicalProfile,
        live: &dyn LiveSink,
    ) -> Result<Generation, GenerateError> {
        let settings = self.client.settings();
        let mut handed_on = false;
        let streamed = self
            .client
            .stream(&prompt::render(prompt::TEMPLATE, profile), |piece| {
                handed_on = true;
                live.text(piece);
            })
            .await;
        let completion = match streamed {
            Ok(completion) => completion,
            Err(error) => {
                if handed_on {
                    live.reset(error.kind());
                }
                return Err(error.into());
            }
        };
        Ok(Generation {
            cost_usd: settings
                .pricing
                .cost_usd(completion.tokens_in, completion.tokens_out),
            body: completion.text,
            model: settings.params.model.clone(),
            tokens_in: completion.tokens_in,
            tokens_out: completion.tokens_out,
            duration: completion.elapsed,
            attempts: completion.attempts,
        })
    }

    fn model(&self) -> &str {
        &self.client.settings().params.model
    }

    fn prompt_hash(&self) -> PromptHash {
        self.prompt_hash.clone()
    }
}

/// The template engine as the generator, when no LLM is configured. Its entries live
/// under their own `promptHash`, so configuring an LLM later moves requests to new
/// keys instead of serving template text as if an LLM had written it.
#[derive(Debug, Default)]
pub struct TemplateGenerator;

#[async_trait::async_trait]
impl NarrativeGenerator for TemplateGenerator {
    async fn generate(
        &self,
        profile: &CanonicalProfile,
        live: &dyn LiveSink,
    ) -> Result<Generation, GenerateError> {
        let started = Instant::now();
        let body = template::render(profile);
        live.text(&body);
        Ok(Generation {
            body,
            model: TEMPLATE_MODEL.to_owned(),
            tokens_in: 0,
            tokens_out: 0,
            cost_usd: 0.0,
            duration: started.elapsed(),
            attempts: 1,
        })
    }

    fn model(&self) -> &str {
        TEMPLATE_MODEL
    }

    fn prompt_hash(&self) -> PromptHash {
        PromptHash::of_parts(&[("engine", TEMPLATE_MODEL.as_bytes())])
    }
}

/// Defaults: the model and prices of OpenAI's gpt-4o-mini.
pub const DEFAULT_MODEL: &str = "gpt-4o-mini";
pub const DEFAULT_BASE_URL: &str = "https://api.openai.com/v1";

/// Reads the `LLM_*` variables. `None` when no `LLM_API_KEY` is set: the template
/// engine generates instead.
pub fn llm_settings_from(vars: &Vars) -> Result<Option<LlmSettings>, ConfigError> {
    let price = |name: &'static str, default: f64| {
        vars.parse_or(name, default, |text| match text.parse::<f64>() {
            Ok(p) if p.is_finite() && p >= 0.0 => Ok(p),
            _ => Err(format!(
                "{text:?} is not a price in dollars per million tokens"
            )),
        })
    };
    let base_url = vars.parse_or("LLM_BASE_URL", DEFAULT_BASE_URL.to_owned(), |text| {
        if text.starts_with("http://") || text.starts_with("https://") {
            Ok(text.trim_end_matches('/').to_owned())
        } else {
            Err(format!("{text:?} must be an http(s) URL including the version path, like {DEFAULT_BASE_URL}"))
        }
    })?;
    let model = vars
        .get("LLM_MODEL")
        .unwrap_or_else(|| DEFAULT_MODEL.to_owned());
    let pricing = Pricing {
        input_per_mtok: price("LLM_PRICE_INPUT_PER_MTOK", 0.15)?,
        output_per_mtok: price("LLM_PRICE_OUTPUT_PER_MTOK", 0.60)?,
    };
    let timeout = vars.millis_or("LLM_TIMEOUT_MS", Duration::from_secs(30))?;
    let max_retries = vars.from_str_or("LLM_MAX_RETRIES", 2u32)?;
    let backoff_base = vars.duration_or("LLM_BACKOFF_BASE", Duration::from_millis(250))?;
    let backoff_max = vars.duration_or("LLM_BACKOFF_MAX", Duration::from_secs(10))?;
    let first_token_timeout =
        vars.millis_or("LLM_FIRST_TOKEN_TIMEOUT_MS", Duration::from_secs(10))?;
    let idle_timeout = vars.millis_or("LLM_STREAM_IDLE_TIMEOUT_MS", Duration::from_secs(10))?;
    let Some(api_key) = vars.get("LLM_API_KEY") else {
        return Ok(None);
    };
    Ok(Some(LlmSettings {
        base_url,
        api_key: ApiKey::new(api_key),
        params: GenerationParams::new(model),
        pricing,
        timeout,
        max_retries,
        backoff_base,
        backoff_max,
        first_token_timeout,
        idle_timeout,
    }))
}

/// The generator the settings ask for.
pub fn generator_from(
    settings: Option<LlmSettings>,
) -> Result<Arc<dyn NarrativeGenerator>, LlmError> {
    Ok(match settings {
        Some(settings) => Arc::new(LlmGenerator::new(settings)?),
        None => Arc::new(TemplateGenerator),
    })
}
