//! The workload simulator: what hit rate, LLM calls, cost and latency a traffic shape
//! gets, measured by running it through the real cache rather than estimated.
//!
//! - [`traffic`] generates a month of requests: a catalogue of profile archetypes with
//!   Zipf popularity, users who each hold one (their percentages jittered around it,
//!   as two people's charts never match to the decimal), and their requests in random
//!   order. Same seed, same traffic.
//! - [`llm`] is the simulated LLM: latency, tokens and cost drawn per call, returned
//!   at once (the latency is accounted for, not slept).
//! - [`run`] feeds the traffic to the gateway's own `NarrativeService` (key
//!   derivation, quantization, the in-memory store, single flight, write policy,
//!   pre-warming) and reports what happened.
//!
//! `cargo run --release -p workload-sim` prints the capacity tables of
//! `docs/capacity.md`.

pub mod llm;
pub mod run;
pub mod traffic;

pub use run::{simulate, Report, SimSettings};
pub use traffic::{Request, TrafficShape};
