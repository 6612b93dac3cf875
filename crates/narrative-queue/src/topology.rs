//! Every narrative queue, named once.
//!
//! ```text
//! exchange narrative.jobs (direct, durable) --generate--> queue narrative.generate
//!     (durable; dead letters to narrative.dlx; quorum with a delivery limit when
//!      configured, classic otherwise)
//!                                           --prewarm---> queue narrative.prewarm
//!     (the same, for pre-warm jobs: workers consume it with capacity of its own, so
//!      pre-warming never stands in front of a user's miss)
//! exchange narrative.dlx (fanout, durable) -----------> queue narrative.generate.dead
//!
//! exchange narrative.events (direct, durable) --batch--> queue narrative.analytics
//!     (durable; quorum when configured; dead letters to narrative.events.dlx)
//! exchange narrative.events.dlx (fanout, durable) -----> queue narrative.analytics.dead
//! ```
//!
//! Every process that publishes or consumes declares all of it at start-up (the
//! declarations are idempotent), so a queue exists, and keeps what is sent to it,
//! before its consumer first starts.

use lapin::Channel;

use crate::amqp::Topology;

pub const JOB_EXCHANGE: &str = "narrative.jobs";
pub const JOB_DEAD_EXCHANGE: &str = "narrative.dlx";
pub const JOB_DEAD_QUEUE: &str = "narrative.generate.dead";

/// Generation jobs for users' misses and refreshes.
pub const JOBS: Topology = Topology {
    exchange: JOB_EXCHANGE,
    queue: "narrative.generate",
    routing_key: "generate",
    dead_exchange: JOB_DEAD_EXCHANGE,
    dead_queue: JOB_DEAD_QUEUE,
};

/// Pre-warm jobs: the same exchange and dead letters, a queue of their own.
pub const PREWARM: Topology = Topology {
    exchange: JOB_EXCHANGE,
    queue: "narrative.prewarm",
    routing_key: "prewarm",
    dead_exchange: JOB_DEAD_EXCHANGE,
    dead_queue: JOB_DEAD_QUEUE,
};

/// Analytics event batches, for the `analytics` service.
pub const EVENTS: Topology = Topology {
    exchange: "narrative.events",
    queue: "narrative.analytics",
    routing_key: "batch",
    dead_exchange: "narrative.events.dlx",
    dead_queue: "narrative.analytics.dead",
};

/// Every queue that holds messages, for the depth gauges.
pub const ALL_QUEUES: [&str; 5] = [
    JOBS.queue,
    PREWARM.queue,
    JOB_DEAD_QUEUE,
    EVENTS.queue,
    EVENTS.dead_queue,
];

/// Declares every exchange and queue. `quorum` must match across the fleet (RabbitMQ
/// refuses to redeclare a queue with another type); job queues take `delivery_limit`
/// (redeliveries before a job is dead-lettered) when quorum.
pub async fn declare_all(
    channel: &Channel,
    quorum: bool,
    delivery_limit: u32,
) -> Result<(), lapin::Error> {
    for jobs in [JOBS, PREWARM] {
        jobs.declare(channel, quorum, Some(delivery_limit)).await?;
    }
    EVENTS.declare(channel, quorum, None).await
}
