//! Queue depths as metrics: the `analytics` service looks at the job and event queues
//! (and their dead-letter queues) every few seconds and exports
//! `narrative_queue_messages{queue}`, so dashboards and alerts need nothing from
//! RabbitMQ's own exporter.

use std::time::Duration;

use lapin::options::QueueDeclareOptions;
use lapin::types::FieldTable;
use lapin::Connection;
use prometheus::{IntGaugeVec, Opts, Registry};
use tokio_util::sync::CancellationToken;

use narrative_queue::{amqp, topology};

/// The queues watched: every one that holds messages.
pub const WATCHED: [&str; 5] = topology::ALL_QUEUES;

const EVERY: Duration = Duration::from_secs(10);

#[derive(Debug, Clone)]
pub struct QueueDepths {
    messages: IntGaugeVec,
}

impl QueueDepths {
    pub fn register(registry: &Registry) -> prometheus::Result<Self> {
        let messages = IntGaugeVec::new(
            Opts::new(
                "narrative_queue_messages",
                "Messages waiting in each narrative queue (ready, not yet delivered)",
            ),
            &["queue"],
        )?;
        registry.register(Box::new(messages.clone()))?;
        Ok(Self { messages })
    }

    pub fn get(&self, queue: &str) -> i64 {
        self.messages.with_label_values(&[queue]).get()
    }

    /// Looks every [`EVERY`] until `stop`, reconnecting as needed.
    pub async fn watch(&self, amqp_url: &str, stop: CancellationToken) {
        let mut connection: Option<Connection> = None;
        loop {
            if connection.as_ref().is_none_or(|c| !c.status().connected()) {
                connection = amqp::connect(amqp_url, Duration::from_secs(5)).await.ok();
            }
            if let Some(connection) = &connection {
                self.look(connection).await;
            }
            tokio::select! {
                () = stop.cancelled() => return,
                () = tokio::time::sleep(EVERY) => {}
            }
        }
    }

    async fn look(&self, connection: &Connection) {
        for queue in WATCHED {
            // A passive declare of a queue that does not exist closes the channel:
            // one channel per look.
            let Ok(channel) = connection.create_channel().await else {
                return;
            };
            let passive = QueueDeclareOptions {
                passive: true,
                ..QueueDeclareOptions::default()
            };
            if let Ok(found) = channel
                .queue_declare(queue, passive, FieldTable::default())
                .await
            {
                self.messages
                    .with_label_values(&[queue])
                    .set(i64::from(found.message_count()));
                let _ = channel.close(200, "looked").await;
            }
        }
    }
}
