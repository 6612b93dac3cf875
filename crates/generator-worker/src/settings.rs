//! Settings of the `generator-worker` binary.

use std::net::SocketAddr;
use std::time::Duration;

use cache_core::config::{ConfigError, Vars};
use cache_redis::backend::RedisConfig;

use narrative_gen::{guard_settings_from, llm_settings_from, GuardSettings, LlmSettings};
use narrative_queue::{queue_settings_from, QueueSettings};

#[derive(Debug, Clone)]
pub struct WorkerSettings {
    /// Where `/metrics`, `/healthz` and `/readyz` are served.
    pub bind_addr: SocketAddr,
    pub redis: RedisConfig,
    pub queue: QueueSettings,
    /// User jobs in flight at once.
    pub prefetch: u16,
    /// Pre-warm jobs in flight at once, on top of `prefetch`.
    pub prewarm_prefetch: u16,
    pub llm: Option<LlmSettings>,
    pub guard: GuardSettings,
    pub cache_ttl: Duration,
    /// `EVENT_BATCH_FORMAT`: what generation events are published as.
    pub event_format: analytics::BatchFormat,
}

impl WorkerSettings {
    pub fn from_vars(vars: &Vars) -> Result<Self, ConfigError> {
        let redis = RedisConfig::from_vars(vars)?.ok_or_else(|| {
            ConfigError::new(
                "REDIS_URL",
                "is required: the worker stores narratives in the shared cache",
            )
        })?;
        let queue = queue_settings_from(vars)?.ok_or_else(|| {
            ConfigError::new(
                "AMQP_URL",
                "is required: the worker consumes generation jobs from RabbitMQ",
            )
        })?;
        let prefetch = vars.from_str_or("WORKER_PREFETCH", 8u16)?;
        if prefetch == 0 {
            return Err(ConfigError::new("WORKER_PREFETCH", "must be at least 1"));
        }
        let prewarm_prefetch = vars.from_str_or("WORKER_PREWARM_PREFETCH", 1u16)?;
        if prewarm_prefetch == 0 {
            return Err(ConfigError::new(
                "WORKER_PREWARM_PREFETCH",
                "must be at least 1",
            ));
        }
        let cache_ttl = vars.duration_or("CACHE_TTL", Duration::from_secs(30 * 86_400))?;
        let event_format =
            vars.from_str_or("EVENT_BATCH_FORMAT", analytics::BatchFormat::default())?;
        Ok(Self {
            bind_addr: vars.from_str_or("BIND_ADDR", SocketAddr::from(([127, 0, 0, 1], 9091)))?,
            redis,
            queue,
            prefetch,
            prewarm_prefetch,
            llm: llm_settings_from(vars)?,
            guard: guard_settings_from(vars)?,
            cache_ttl,
            event_format,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_worker_needs_redis_and_rabbitmq() {
        assert_eq!(
            WorkerSettings::from_vars(&Vars::from_pairs([]))
                .expect_err("no redis")
                .var,
            "REDIS_URL"
        );
        let redis_only = Vars::from_pairs([("REDIS_URL", "redis://127.0.0.1:6379")]);
        assert_eq!(
            WorkerSettings::from_vars(&redis_only)
                .expect_err("no amqp")
                .var,
            "AMQP_URL"
        );
        let both = Vars::from_pairs([
            ("REDIS_URL", "redis://127.0.0.1:6379"),
            ("AMQP_URL", "amqp://127.0.0.1:5672/%2f"),
        ]);
        let settings = WorkerSettings::from_vars(&both).expect("valid");
        assert_eq!(settings.bind_addr.to_string(), "127.0.0.1:9091");
        assert_eq!(
            (settings.queue.quorum, settings.queue.delivery_limit),
            (false, 5)
        );
        let bad = Vars::from_pairs([
            ("REDIS_URL", "redis://h"),
            ("AMQP_URL", "http://h"),
            ("WORKER_PREFETCH", "0"),
        ]);
        assert_eq!(
            WorkerSettings::from_vars(&bad).expect_err("bad url").var,
            "AMQP_URL"
        );
    }
}
