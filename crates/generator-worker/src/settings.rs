//! Settings of the `generator-worker` binary, and the queue settings the gateway
//! shares with it.

use std::net::SocketAddr;
use std::time::Duration;

use cache_core::config::{ConfigError, Vars};
use cache_core::redis_backend::RedisConfig;

use crate::guard::GuardSettings;
use crate::llm::LlmSettings;
use crate::queue::QueueSettings;

/// `AMQP_URL`, `RABBITMQ_QUORUM`, `RABBITMQ_DELIVERY_LIMIT`, `AMQP_CONFIRM_TIMEOUT_MS`;
/// `None` without `AMQP_URL`.
pub fn queue_settings_from(vars: &Vars) -> Result<Option<QueueSettings>, ConfigError> {
    let quorum = vars.parse_or("RABBITMQ_QUORUM", false, |text| {
        match text.to_ascii_lowercase().as_str() {
            "1" | "true" | "yes" => Ok(true),
            "0" | "false" | "no" => Ok(false),
            _ => Err(format!("{text:?} must be true or false")),
        }
    })?;
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

/// `LLM_MAX_CONCURRENCY` and `LLM_DAILY_BUDGET_USD`, both off unless set.
pub fn guard_settings_from(vars: &Vars) -> Result<GuardSettings, ConfigError> {
    let max_concurrency = match vars.get("LLM_MAX_CONCURRENCY") {
        None => None,
        Some(_) => {
            let cap = vars.from_str_or("LLM_MAX_CONCURRENCY", 0usize)?;
            if cap == 0 {
                return Err(ConfigError::new(
                    "LLM_MAX_CONCURRENCY",
                    "must be at least 1",
                ));
            }
            Some(cap)
        }
    };
    let daily_budget_usd = match vars.get("LLM_DAILY_BUDGET_USD") {
        None => None,
        Some(_) => {
            let budget = vars.from_str_or("LLM_DAILY_BUDGET_USD", -1.0f64)?;
            if !(budget.is_finite() && budget > 0.0) {
                return Err(ConfigError::new(
                    "LLM_DAILY_BUDGET_USD",
                    "must be a positive number of dollars",
                ));
            }
            Some(budget)
        }
    };
    Ok(GuardSettings {
        max_concurrency,
        daily_budget_usd,
    })
}

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
        Ok(Self {
            bind_addr: vars.from_str_or("BIND_ADDR", SocketAddr::from(([127, 0, 0, 1], 9091)))?,
            redis,
            queue,
            prefetch,
            prewarm_prefetch,
            llm: crate::generator::llm_settings_from(vars)?,
            guard: guard_settings_from(vars)?,
            cache_ttl,
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
