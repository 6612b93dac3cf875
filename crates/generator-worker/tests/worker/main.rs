//! `generator-worker` processes on real Redis and RabbitMQ (one node for the binary, a
//! vhost per test), with the LLM simulator on loopback: a worker killed mid-job, a
//! Redis frozen after the LLM answered, a broker that drops the connection.

mod common;
mod redis_outage;
mod worker_crash;
