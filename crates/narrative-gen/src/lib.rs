//! Writing a narrative for a canonical profile, wherever it runs (a gateway in process,
//! or a worker).
//!
//! `prompt` renders the prompt template (a file in `prompts/`) and computes
//! `promptHash`; `llm` is the OpenAI-compatible client with timeouts and jittered
//! retries; `template` writes a narrative without an LLM; `generator` puts them behind
//! the [`NarrativeGenerator`] trait and reads the `LLM_*` settings; `guard` caps
//! concurrent calls and keeps to the daily budget. Nothing here knows about queues or
//! caches: the fill protocol (`narrative-fill`) decides when to generate.

pub mod generator;
pub mod guard;
pub mod llm;
pub mod prompt;
pub mod template;

pub use generator::{
    generator_from, llm_settings_from, GenerateError, Generation, LlmGenerator, NarrativeGenerator,
    TemplateGenerator,
};
pub use guard::{guard_settings_from, GuardMetrics, GuardSettings, GuardedGenerator};
pub use llm::{ApiKey, Completion, LlmClient, LlmError, LlmSettings, Pricing};
pub use prompt::GenerationParams;
