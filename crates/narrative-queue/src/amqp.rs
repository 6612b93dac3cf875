//! The AMQP link: connecting with lapin on Tokio, and the one shape every narrative
//! queue has (a [`Topology`]), declared idempotently.

use std::time::Duration;

use lapin::options::{ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions};
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use lapin::{Channel, Connection, ConnectionProperties, ExchangeKind};

/// Connects with lapin on the current Tokio runtime, within `timeout`.
pub async fn connect(url: &str, timeout: Duration) -> Result<Connection, String> {
    let properties = ConnectionProperties::default()
        .with_executor(tokio_executor_trait::Tokio::current())
        .with_reactor(tokio_reactor_trait::Tokio);
    match tokio::time::timeout(timeout, Connection::connect(url, properties)).await {
        Ok(Ok(connection)) => Ok(connection),
        Ok(Err(error)) => Err(error.to_string()),
        Err(_) => Err("connect timed out".to_owned()),
    }
}

/// A durable direct exchange feeding one durable queue, whose dead letters go through
/// a fanout exchange to a dead-letter queue: the shape of both the job and the event
/// queues.
#[derive(Debug, Clone, Copy)]
pub struct Topology {
    pub exchange: &'static str,
    pub queue: &'static str,
    pub routing_key: &'static str,
    pub dead_exchange: &'static str,
    pub dead_queue: &'static str,
}

impl Topology {
    /// Declares it (idempotent). `quorum` must match across the fleet: RabbitMQ refuses
    /// to redeclare a queue with another type. A quorum queue takes `delivery_limit`
    /// (redeliveries before dead-lettering) when given.
    pub async fn declare(
        &self,
        channel: &Channel,
        quorum: bool,
        delivery_limit: Option<u32>,
    ) -> Result<(), lapin::Error> {
        let durable = ExchangeDeclareOptions {
            durable: true,
            ..ExchangeDeclareOptions::default()
        };
        channel
            .exchange_declare(
                self.exchange,
                ExchangeKind::Direct,
                durable,
                FieldTable::default(),
            )
            .await?;
        channel
            .exchange_declare(
                self.dead_exchange,
                ExchangeKind::Fanout,
                durable,
                FieldTable::default(),
            )
            .await?;
        let durable_queue = QueueDeclareOptions {
            durable: true,
            ..QueueDeclareOptions::default()
        };
        let mut args = FieldTable::default();
        let mut dead_args = FieldTable::default();
        args.insert(
            ShortString::from("x-dead-letter-exchange"),
            AMQPValue::LongString(LongString::from(self.dead_exchange)),
        );
        if quorum {
            for table in [&mut args, &mut dead_args] {
                table.insert(
                    ShortString::from("x-queue-type"),
                    AMQPValue::LongString(LongString::from("quorum")),
                );
            }
            if let Some(limit) = delivery_limit {
                args.insert(
                    ShortString::from("x-delivery-limit"),
                    AMQPValue::LongInt(limit.try_into().unwrap_or(i32::MAX)),
                );
            }
        }
        channel
            .queue_declare(self.dead_queue, durable_queue, dead_args)
            .await?;
        channel
            .queue_bind(
                self.dead_queue,
                self.dead_exchange,
                "",
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await?;
        channel
            .queue_declare(self.queue, durable_queue, args)
            .await?;
        channel
            .queue_bind(
                self.queue,
                self.exchange,
                self.routing_key,
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await?;
        Ok(())
    }
}
