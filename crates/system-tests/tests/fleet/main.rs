//! Gateways with generator-workers and the analytics service, on real Redis, RabbitMQ
//! and Postgres, with the LLM simulator on loopback: what no single service's tests
//! can show. The gateway's own tests are in `api-gateway/tests/api`; their helpers
//! are shared with these.

#[allow(dead_code)]
#[path = "../../../api-gateway/tests/api/helpers.rs"]
mod helpers;

mod analytics;
mod erasure;
mod prewarm;
mod services;
mod streaming;
mod workers;
