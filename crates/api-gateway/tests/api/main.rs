//! The gateway over real HTTP on a random port, with the LLM simulator on loopback.

mod access;
mod analytics;
mod connections;
mod console;
mod directives;
mod distributed;
mod erasure;
mod errors;
mod failures;
mod fill;
mod freshness;
mod helpers;
mod hostile;
mod http_fuzz;
mod limits;
mod lost_holders;
mod memo;
mod narrative;
mod ops;
mod prewarm;
mod process;
mod stampede;
mod streaming;
