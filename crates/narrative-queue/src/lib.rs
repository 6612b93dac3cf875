//! RabbitMQ for narrative-cache, written once for every service.
//!
//! - [`topology`]: every exchange and queue, named once, and [`topology::declare_all`];
//! - [`amqp`]: connecting, and the shape each queue has ([`Topology`]);
//! - [`job`]: the generation [`Job`] a gateway publishes and a worker consumes;
//! - [`publisher`]: the [`ConfirmedPublisher`] through which jobs, pre-warm jobs and
//!   analytics batches leave a process (concurrent, confirmed, mandatory);
//! - [`settings`]: `AMQP_URL` and the other broker settings.
//!
//! A gateway publishes a job, with the fill lock it took, through the publisher; a
//! worker consumes it from [`topology::JOBS`] (or [`topology::PREWARM`]); both hand
//! analytics batches to [`topology::EVENTS`], which the `analytics` service consumes.

pub mod amqp;
pub mod job;
pub mod publisher;
pub mod settings;
pub mod topology;

pub use amqp::Topology;
pub use job::{Job, MalformedJob, Trigger, JOB_VERSION};
pub use publisher::{ConfirmedPublisher, Message, PublishError};
pub use settings::{queue_settings_from, QueueSettings};

impl Job {
    /// Publishes this job through `publisher` to its queue.
    pub async fn publish(&self, publisher: &ConfirmedPublisher) -> Result<(), PublishError> {
        let body = self.to_bytes();
        publisher
            .publish(Message {
                to: self.topology(),
                body: &body,
                content_type: "application/json",
                correlation_id: Some(&self.request_id),
                confirm_timeout: None,
            })
            .await
    }
}
