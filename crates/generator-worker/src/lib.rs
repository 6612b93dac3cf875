//! The `generator-worker` service: consumes generation jobs from RabbitMQ and fills
//! their keys through the fill protocol (`narrative-fill`), with the generation stack
//! of `narrative-gen`.
//!
//! `worker` is the worker's one step (a job in, an [`worker::Outcome`] out);
//! `consumer` the loop that feeds it and acks; `settings` reads the environment;
//! `app` wires the `generator-worker` binary, which `main.rs` only starts.

pub mod app;
pub mod consumer;
pub mod settings;
pub mod worker;
