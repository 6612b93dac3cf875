//! The narrative-cache HTTP gateway.
//!
//! [`Settings`] come from the environment. [`App::build`] wires the parts: a
//! `KeyDeriver` for canonical keys, a cache store, the generator (LLM or template
//! engine), [`Metrics`] and in-memory analytics, all owned by the
//! [`service::NarrativeService`] that decides hit, coalesced miss or fallback.
//! `http` maps routes onto the service and errors onto JSON. [`run`] serves an app
//! on a listener until shutdown; `main.rs` only reads settings and calls it.

pub mod app;
pub mod auth;
mod http;
pub mod limits;
pub mod metrics;
pub mod server;
pub mod service;
pub mod settings;

pub use app::{run, App, AppState};
pub use http::{header_names, security_headers, ApiError, MAX_BODY_BYTES};
pub use metrics::Metrics;
pub use settings::Settings;
