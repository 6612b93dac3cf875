//! Generation jobs on RabbitMQ.
//!
//! Topology, declared idempotently by every process that uses it:
//!
//! ```text
//! exchange narrative.jobs (direct, durable) --generate--> queue narrative.generate
//!     (durable; dead letters to narrative.dlx; quorum with a delivery limit when
//!      configured, classic otherwise)
//!                                           --prewarm---> queue narrative.prewarm
//!     (the same, for pre-warm jobs: workers consume it with capacity of its own, so
//!      pre-warming never stands in front of a user's miss)
//! exchange narrative.dlx (fanout, durable) -----------> queue narrative.generate.dead
//! ```
//!
//! Jobs are persistent and count as enqueued only once the broker confirms them
//! (publisher confirms). A job is versioned JSON carrying the key, the canonical profile
//! (never a user id), the fill lock's token, what triggered it, the request id for
//! tracing, and when it was enqueued.

use std::time::Duration;

use analytics::amqp::Topology;
use lapin::options::{BasicPublishOptions, ConfirmSelectOptions};
use lapin::publisher_confirm::Confirmation;
use lapin::types::ShortString;
use lapin::{BasicProperties, Channel, Connection};
use serde::{Deserialize, Serialize};

pub const EXCHANGE: &str = "narrative.jobs";
pub const QUEUE: &str = "narrative.generate";
pub const ROUTING_KEY: &str = "generate";
pub const DEAD_EXCHANGE: &str = "narrative.dlx";
pub const DEAD_QUEUE: &str = "narrative.generate.dead";
pub const PREWARM_QUEUE: &str = "narrative.prewarm";
pub const PREWARM_ROUTING_KEY: &str = "prewarm";

/// The job format this build writes; readers refuse versions they do not know.
pub const JOB_VERSION: u32 = 1;

/// What a job is for; the same values the generation events carry.
pub use analytics::Trigger;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Job {
    pub version: u32,
    pub key: String,
    /// The canonical profile's exact JSON (what the key's digest covers).
    pub canonical: String,
    /// The fill lock the publisher took, which the worker adopts. Empty for pre-warm
    /// jobs: they hold no lock while they wait, and the worker takes it when it starts.
    pub lock_token: String,
    pub trigger: Trigger,
    pub request_id: String,
    pub enqueued_at_ms: i64,
}

#[derive(Debug, thiserror::Error)]
pub enum QueueError {
    #[error("broker unreachable: {0}")]
    Unreachable(String),
    #[error("broker did not confirm the job in time")]
    ConfirmTimeout,
    #[error("broker refused the job")]
    Nacked,
    #[error("not a job this worker can read: {0}")]
    Malformed(String),
}

impl Job {
    pub fn to_bytes(&self) -> Vec<u8> {
        // A struct of strings and numbers always serializes.
        serde_json::to_vec(self).unwrap_or_default()
    }

    pub fn from_bytes(bytes: &[u8]) -> Result<Self, QueueError> {
        let job: Self =
            serde_json::from_slice(bytes).map_err(|e| QueueError::Malformed(e.to_string()))?;
        if job.version != JOB_VERSION {
            return Err(QueueError::Malformed(format!(
                "job version {} (this build reads {JOB_VERSION})",
                job.version
            )));
        }
        Ok(job)
    }
}

#[derive(Debug, Clone)]
pub struct QueueSettings {
    pub url: String,
    /// Quorum queues (replicated) instead of classic durable ones.
    pub quorum: bool,
    /// How many times a quorum queue redelivers a job before dead-lettering it.
    /// RabbitMQ 3.10 has no default: without one a poison job would loop forever.
    pub delivery_limit: u32,
    pub confirm_timeout: Duration,
}

/// Connects with lapin on the current Tokio runtime.
pub async fn connect(url: &str, timeout: Duration) -> Result<Connection, QueueError> {
    analytics::amqp::connect(url, timeout)
        .await
        .map_err(QueueError::Unreachable)
}

/// The jobs' topology.
pub const JOBS: Topology = Topology {
    exchange: EXCHANGE,
    queue: QUEUE,
    routing_key: ROUTING_KEY,
    dead_exchange: DEAD_EXCHANGE,
    dead_queue: DEAD_QUEUE,
};

/// Pre-warm jobs: the same exchange and dead letters, a queue of their own.
pub const PREWARM: Topology = Topology {
    exchange: EXCHANGE,
    queue: PREWARM_QUEUE,
    routing_key: PREWARM_ROUTING_KEY,
    dead_exchange: DEAD_EXCHANGE,
    dead_queue: DEAD_QUEUE,
};

/// Declares the exchanges and queues (idempotent: every process does it at start-up).
pub async fn declare_topology(
    channel: &Channel,
    settings: &QueueSettings,
) -> Result<(), lapin::Error> {
    for topology in [JOBS, PREWARM] {
        topology
            .declare(channel, settings.quorum, Some(settings.delivery_limit))
            .await?;
    }
    Ok(())
}

/// The queue a job goes to: pre-warm jobs have their own.
pub fn routing_key(job: &Job) -> &'static str {
    match job.trigger {
        Trigger::Prewarm => PREWARM_ROUTING_KEY,
        Trigger::Miss | Trigger::Refresh => ROUTING_KEY,
    }
}

/// A channel in confirm mode on which jobs are published.
pub async fn publishing_channel(
    connection: &Connection,
    settings: &QueueSettings,
) -> Result<Channel, QueueError> {
    let channel = connection
        .create_channel()
        .await
        .map_err(|e| QueueError::Unreachable(e.to_string()))?;
    declare_topology(&channel, settings)
        .await
        .map_err(|e| QueueError::Unreachable(e.to_string()))?;
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await
        .map_err(|e| QueueError::Unreachable(e.to_string()))?;
    Ok(channel)
}

/// Publishes a persistent job and waits for the broker's confirm.
pub async fn publish(
    channel: &Channel,
    job: &Job,
    confirm_timeout: Duration,
) -> Result<(), QueueError> {
    let properties = BasicProperties::default()
        .with_delivery_mode(2)
        .with_content_type(ShortString::from("application/json"))
        .with_correlation_id(ShortString::from(job.request_id.as_str()));
    let publish = async {
        let confirm = channel
            .basic_publish(
                EXCHANGE,
                routing_key(job),
                BasicPublishOptions::default(),
                &job.to_bytes(),
                properties,
            )
            .await
            .map_err(|e| QueueError::Unreachable(e.to_string()))?;
        match confirm
            .await
            .map_err(|e| QueueError::Unreachable(e.to_string()))?
        {
            Confirmation::Ack(_) => Ok(()),
            Confirmation::Nack(_) => Err(QueueError::Nacked),
            Confirmation::NotRequested => Err(QueueError::Unreachable(
                "channel is not in confirm mode".to_owned(),
            )),
        }
    };
    tokio::time::timeout(confirm_timeout, publish)
        .await
        .map_err(|_| QueueError::ConfirmTimeout)?
}
