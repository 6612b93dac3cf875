//! The one confirmed publisher: jobs, pre-warm jobs and analytics batches all leave a
//! process through it.
//!
//! One connection and one confirm-mode channel per publisher, made on first use and
//! remade after a failure. Publishes run concurrently on the shared channel, each
//! awaiting its own confirm: a slow confirm holds up its own caller, never the next
//! miss. Every message is persistent and `mandatory`, so one the broker cannot route
//! (a queue deleted under us) comes back as [`PublishError::Unroutable`] instead of
//! being confirmed into nowhere. After a failure, publishing fails at once for
//! `fail_fast` (a broker that is down then costs callers nothing but their fallback),
//! and the next publish after it connects again.

use std::time::{Duration, Instant};

use lapin::options::{BasicPublishOptions, ConfirmSelectOptions};
use lapin::publisher_confirm::Confirmation;
use lapin::types::ShortString;
use lapin::{BasicProperties, Channel, Connection};
use tokio::sync::Mutex;

use crate::amqp::{self, Topology};
use crate::settings::QueueSettings;
use crate::topology;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PublishError {
    #[error("broker unreachable: {0}")]
    Unreachable(String),
    #[error("broker did not confirm in time")]
    ConfirmTimeout,
    #[error("broker refused the message")]
    Nacked,
    #[error("broker could not route the message to a queue")]
    Unroutable,
}

/// A message for [`ConfirmedPublisher::publish`].
#[derive(Debug, Clone, Copy)]
pub struct Message<'a> {
    pub to: Topology,
    pub body: &'a [u8],
    pub content_type: &'static str,
    /// For tracing across services (a job's request id).
    pub correlation_id: Option<&'a str>,
    /// How long to wait for the confirm; `None` is `AMQP_CONFIRM_TIMEOUT_MS`. A job
    /// takes the short default (a miss waits on it); an event batch, retried until it
    /// lands, can afford longer than a re-send of a thousand events costs.
    pub confirm_timeout: Option<Duration>,
}

#[derive(Debug)]
pub struct ConfirmedPublisher {
    settings: QueueSettings,
    fail_fast: Duration,
    link: Mutex<Link>,
}

#[derive(Debug, Default)]
struct Link {
    open: Option<(Connection, Channel)>,
    failed_at: Option<Instant>,
}

impl ConfirmedPublisher {
    /// `fail_fast`: how long after a failure publishing fails at once instead of
    /// trying the broker again.
    pub fn new(settings: QueueSettings, fail_fast: Duration) -> Self {
        Self {
            settings,
            fail_fast,
            link: Mutex::new(Link::default()),
        }
    }

    pub fn settings(&self) -> &QueueSettings {
        &self.settings
    }

    /// Publishes a persistent, mandatory message and waits for the broker's confirm.
    /// An error means it may not be enqueued (a lost confirm may still have been).
    pub async fn publish(&self, message: Message<'_>) -> Result<(), PublishError> {
        let channel = self.channel().await?;
        let result = self.publish_on(&channel, message).await;
        if result.is_err() {
            self.failed(&channel).await;
        }
        result
    }

    /// Whether a connection is open now (for `/readyz`).
    pub async fn is_connected(&self) -> bool {
        match self.link.try_lock() {
            Ok(link) => link
                .open
                .as_ref()
                .is_some_and(|(connection, _)| connection.status().connected()),
            // The lock is held only while connecting: not connected yet.
            Err(_) => false,
        }
    }

    /// The open channel, or a new one. Connecting holds the lock, so concurrent callers
    /// wait for one connection attempt instead of each making their own.
    async fn channel(&self) -> Result<Channel, PublishError> {
        let mut link = self.link.lock().await;
        if let Some((connection, channel)) = &link.open {
            if connection.status().connected() && channel.status().connected() {
                return Ok(channel.clone());
            }
            link.open = None;
        }
        if link
            .failed_at
            .is_some_and(|at| at.elapsed() < self.fail_fast)
        {
            return Err(PublishError::Unreachable(
                "broker recently unreachable".to_owned(),
            ));
        }
        match tokio::time::timeout(self.settings.confirm_timeout, self.connect()).await {
            Ok(Ok((connection, channel))) => {
                link.failed_at = None;
                link.open = Some((connection, channel.clone()));
                Ok(channel)
            }
            Ok(Err(error)) => {
                link.failed_at = Some(Instant::now());
                Err(error)
            }
            Err(_) => {
                link.failed_at = Some(Instant::now());
                Err(PublishError::Unreachable("connect timed out".to_owned()))
            }
        }
    }

    async fn connect(&self) -> Result<(Connection, Channel), PublishError> {
        let broken = |e: lapin::Error| PublishError::Unreachable(e.to_string());
        let connection = amqp::connect(&self.settings.url, self.settings.confirm_timeout)
            .await
            .map_err(PublishError::Unreachable)?;
        let channel = connection.create_channel().await.map_err(broken)?;
        topology::declare_all(&channel, self.settings.quorum, self.settings.delivery_limit)
            .await
            .map_err(broken)?;
        channel
            .confirm_select(ConfirmSelectOptions::default())
            .await
            .map_err(broken)?;
        Ok((connection, channel))
    }

    /// Drops the link `channel` belongs to, unless another caller already remade it.
    async fn failed(&self, channel: &Channel) {
        let mut link = self.link.lock().await;
        if link
            .open
            .as_ref()
            .is_some_and(|(_, open)| open.id() == channel.id())
        {
            if let Some((connection, _)) = link.open.take() {
                // Closing can wait on a broker that is gone: not on the caller's time.
                tokio::spawn(async move {
                    let _ = connection.close(200, "publish failed").await;
                });
            }
            link.failed_at = Some(Instant::now());
        }
    }

    async fn publish_on(
        &self,
        channel: &Channel,
        message: Message<'_>,
    ) -> Result<(), PublishError> {
        let broken = |e: lapin::Error| PublishError::Unreachable(e.to_string());
        let mut properties = BasicProperties::default()
            .with_delivery_mode(2)
            .with_content_type(ShortString::from(message.content_type));
        if let Some(id) = message.correlation_id {
            properties = properties.with_correlation_id(ShortString::from(id));
        }
        let publish = async {
            let confirm = channel
                .basic_publish(
                    message.to.exchange,
                    message.to.routing_key,
                    BasicPublishOptions {
                        mandatory: true,
                        ..BasicPublishOptions::default()
                    },
                    message.body,
                    properties,
                )
                .await
                .map_err(broken)?;
            match confirm.await.map_err(broken)? {
                Confirmation::Ack(None) => Ok(()),
                // Confirmed, but returned first: no queue took it.
                Confirmation::Ack(Some(_)) => Err(PublishError::Unroutable),
                Confirmation::Nack(_) => Err(PublishError::Nacked),
                Confirmation::NotRequested => Err(PublishError::Unreachable(
                    "channel is not in confirm mode".to_owned(),
                )),
            }
        };
        let patience = message
            .confirm_timeout
            .unwrap_or(self.settings.confirm_timeout);
        tokio::time::timeout(patience, publish)
            .await
            .map_err(|_| PublishError::ConfirmTimeout)?
    }
}
