//! Narrative generation, used by the gateway in embedded mode and by the worker.
//!
//! `prompt` renders the prompt template (a file in `prompts/`) from a canonical profile
//! and computes `promptHash`; `llm` is the OpenAI-compatible client with timeouts and
//! jittered retries; `template` writes a narrative without an LLM; `generator` puts
//! them behind the [`NarrativeGenerator`] trait and reads the `LLM_*` settings;
//! `guard` caps concurrent calls and keeps to the daily budget.
//! `queue` holds the RabbitMQ side: job messages, topology and confirmed publishing;
//! `worker` is the worker's one step (a job in, an outcome out) and `consumer` the
//! loop that feeds it and acks; `app` wires the `generator-worker` binary.

pub mod app;
pub mod consumer;
pub mod generator;
pub mod guard;
pub mod llm;
pub mod prompt;
pub mod queue;
pub mod settings;
pub mod template;
pub mod worker;

pub use generator::{
    generator_from, llm_settings_from, GenerateError, Generation, LlmGenerator, NarrativeGenerator,
    TemplateGenerator,
};
pub use llm::{ApiKey, LlmClient, LlmError, LlmSettings, Pricing};
pub use prompt::GenerationParams;
