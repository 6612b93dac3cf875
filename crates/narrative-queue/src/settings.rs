//! The broker settings every process that uses RabbitMQ reads.

use std::time::Duration;

use cache_core::config::{ConfigError, Vars};

#[derive(Debug, Clone)]
pub struct QueueSettings {
    pub url: String,
    /// Quorum queues (replicated) instead of classic durable ones.
    pub quorum: bool,
    /// How many times a quorum queue redelivers a job before dead-lettering it.
    /// RabbitMQ 3.10 has no default: without one a poison job would loop forever.
    pub delivery_limit: u32,
    /// How long a publish waits for the broker's confirm (and a connect for the broker).
    pub confirm_timeout: Duration,
}

/// `AMQP_URL`, `RABBITMQ_QUORUM`, `RABBITMQ_DELIVERY_LIMIT`, `AMQP_CONFIRM_TIMEOUT_MS`;
/// `None` without `AMQP_URL`.
pub fn queue_settings_from(vars: &Vars) -> Result<Option<QueueSettings>, ConfigError> {
    let quorum = vars.bool_or("RABBITMQ_QUORUM", false)?;
    let delivery_limit = vars.from_str_or("RABBITMQ_DELIVERY_LIMIT", 5u32)?;
    let confirm_timeout = vars.millis_or("AMQP_CONFIRM_TIMEOUT_MS", Duration::from_millis(2000))?;
    let Some(url) = vars.get("AMQP_URL") else {
        return Ok(None);
    };
    if !(url.starts_with("amqp://") || url.starts_with("amqps://")) {
        return Err(ConfigError::new(
            "AMQP_URL",
            "must be an amqp:// or amqps:// URL",
        ));
    }
    Ok(Some(QueueSettings {
        url,
        quorum,
        delivery_limit,
        confirm_timeout,
    }))
}
