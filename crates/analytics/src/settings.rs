//! Settings of the `analytics` binary.

use std::net::SocketAddr;
use std::time::Duration;

use cache_core::config::{ConfigError, Vars};

use crate::consumer::ConsumerSettings;

#[derive(Debug, Clone)]
pub struct AnalyticsSettings {
    /// Where `/metrics`, `/healthz` and `/readyz` are served.
    pub bind_addr: SocketAddr,
    pub database_url: String,
    pub consumer: ConsumerSettings,
    /// Events older than this are dropped (whole daily partitions).
    pub retention: Duration,
    /// Daily partitions created ahead of time.
    pub partitions_ahead_days: i64,
    pub pool_size: u32,
}

/// `RABBITMQ_QUORUM`, shared by everything that declares queues.
pub fn quorum_from(vars: &Vars) -> Result<bool, ConfigError> {
    vars.bool_or("RABBITMQ_QUORUM", false)
}

/// `DATABASE_URL`, checked for its scheme; `None` when unset.
pub fn database_url_from(vars: &Vars) -> Result<Option<String>, ConfigError> {
    let Some(url) = vars.get("DATABASE_URL") else {
        return Ok(None);
    };
    if !(url.starts_with("postgres://") || url.starts_with("postgresql://")) {
        return Err(ConfigError::new(
            "DATABASE_URL",
            "must be a postgres:// or postgresql:// URL",
        ));
    }
    Ok(Some(url))
}

impl AnalyticsSettings {
    pub fn from_vars(vars: &Vars) -> Result<Self, ConfigError> {
        let database_url = database_url_from(vars)?.ok_or_else(|| {
            ConfigError::new(
                "DATABASE_URL",
                "is required: analytics writes events to Postgres",
            )
        })?;
        let amqp_url = vars.get("AMQP_URL").ok_or_else(|| {
            ConfigError::new(
                "AMQP_URL",
                "is required: analytics consumes events from RabbitMQ",
            )
        })?;
        if !(amqp_url.starts_with("amqp://") || amqp_url.starts_with("amqps://")) {
            return Err(ConfigError::new(
                "AMQP_URL",
                "must be an amqp:// or amqps:// URL",
            ));
        }
        let prefetch = vars.from_str_or("ANALYTICS_PREFETCH", 64u16)?;
        if prefetch == 0 {
            return Err(ConfigError::new("ANALYTICS_PREFETCH", "must be at least 1"));
        }
        let retention = vars.duration_or("EVENT_RETENTION", Duration::from_secs(90 * 86_400))?;
        if retention < Duration::from_secs(86_400) {
            return Err(ConfigError::new("EVENT_RETENTION", "must be at least 1d"));
        }
        Ok(Self {
            bind_addr: vars.from_str_or("BIND_ADDR", SocketAddr::from(([127, 0, 0, 1], 9092)))?,
            database_url,
            consumer: ConsumerSettings {
                amqp_url,
                quorum: quorum_from(vars)?,
                prefetch,
                max_events: 20_000,
                linger: Duration::from_millis(50),
            },
            retention,
            partitions_ahead_days: 7,
            pool_size: 4,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn required_and_bad_values_name_their_variable() {
        let vars = Vars::from_pairs([("AMQP_URL", "amqp://localhost")]);
        assert_eq!(
            AnalyticsSettings::from_vars(&vars).unwrap_err().var,
            "DATABASE_URL"
        );
        let vars = Vars::from_pairs([("DATABASE_URL", "mysql://x")]);
        assert_eq!(
            AnalyticsSettings::from_vars(&vars).unwrap_err().var,
            "DATABASE_URL"
        );
        let vars = Vars::from_pairs([
            ("DATABASE_URL", "postgres://localhost/db"),
            ("AMQP_URL", "amqp://localhost"),
            ("EVENT_RETENTION", "1h"),
        ]);
        assert_eq!(
            AnalyticsSettings::from_vars(&vars).unwrap_err().var,
            "EVENT_RETENTION"
        );
        let vars = Vars::from_pairs([
            ("DATABASE_URL", "postgres://localhost/db"),
            ("AMQP_URL", "amqp://localhost"),
        ]);
        let settings = AnalyticsSettings::from_vars(&vars).unwrap();
        assert_eq!(settings.bind_addr.port(), 9092);
        assert_eq!(settings.retention, Duration::from_secs(90 * 86_400));
    }
}
