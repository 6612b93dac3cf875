//! Guardrails around a generator: a cap on concurrent LLM calls and a daily budget.
//!
//! [`GuardedGenerator`] wraps any [`NarrativeGenerator`]. It refuses to start a call
//! once today's spend (UTC day) has reached `LLM_DAILY_BUDGET_USD`, so misses get the
//! template narrative until the next day, and it holds at most `LLM_MAX_CONCURRENCY`
//! calls at once in this process (the rest wait their turn, within the request's own
//! deadline).
//!
//! The spend is kept in Redis when the process has it (`{narrative:budget}:<day>`,
//! `INCRBYFLOAT`, two days' TTL), so the whole fleet shares one budget; otherwise, or
//! while Redis is unreachable, in process. Calls already running when the budget runs
//! out finish, so the day can end over budget by at most the calls in flight then.

use std::sync::{Arc, Mutex, PoisonError};

use cache_core::config::{ConfigError, Vars};
use cache_core::{CanonicalProfile, LiveSink, PromptHash};
use cache_redis::backend::RedisBackend;
use prometheus::{Gauge, IntCounter, IntGauge, Registry};
use time::{Date, OffsetDateTime};
use tokio::sync::Semaphore;

use crate::generator::{GenerateError, Generation, NarrativeGenerator};

#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct GuardSettings {
    /// `LLM_MAX_CONCURRENCY`: calls at once in this process; `None` is no cap.
    pub max_concurrency: Option<usize>,
    /// `LLM_DAILY_BUDGET_USD`: dollars a UTC day; `None` is no budget.
    pub daily_budget_usd: Option<f64>,
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

/// The guard's metrics, named once for the gateway and the worker alike.
#[derive(Debug, Clone)]
pub struct GuardMetrics {
    pub budget_spent_usd: Gauge,
    pub budget_exhausted: IntGauge,
    pub refused: IntCounter,
}

impl GuardMetrics {
    pub fn register(registry: &Registry) -> Result<Self, prometheus::Error> {
        let metrics = Self {
            budget_spent_usd: Gauge::new(
                "llm_budget_spent_usd",
                "Dollars spent on the LLM today (UTC), as this process last saw it",
            )?,
            budget_exhausted: IntGauge::new(
                "llm_budget_exhausted",
                "1 while today's LLM_DAILY_BUDGET_USD is spent: misses get the template",
            )?,
            refused: IntCounter::new(
                "llm_budget_refused_total",
                "Generations refused because the daily budget was spent",
            )?,
        };
        registry.register(Box::new(metrics.budget_spent_usd.clone()))?;
        registry.register(Box::new(metrics.budget_exhausted.clone()))?;
        registry.register(Box::new(metrics.refused.clone()))?;
        Ok(metrics)
    }
}

/// Today's spend: in Redis when there is one, in process otherwise (and as the
/// fallback while Redis fails).
#[derive(Debug)]
struct Spend {
    redis: Option<Arc<RedisBackend>>,
    local: Mutex<(Date, f64)>,
}

fn budget_key(day: Date) -> String {
    format!("{{narrative:budget}}:{day}")
}

const BUDGET_KEY_TTL_SECS: i64 = 2 * 86_400;

impl Spend {
    fn local_today(&self, today: Date) -> f64 {
        let mut local = self.local.lock().unwrap_or_else(PoisonError::into_inner);
        if local.0 != today {
            *local = (today, 0.0);
        }
        local.1
    }

    fn add_local(&self, today: Date, dollars: f64) -> f64 {
        let mut local = self.local.lock().unwrap_or_else(PoisonError::into_inner);
        if local.0 != today {
            *local = (today, 0.0);
        }
        local.1 += dollars;
        local.1
    }

    async fn today(&self, today: Date) -> f64 {
        if let Some(redis) = &self.redis {
            let key = budget_key(today);
            let spent = redis
                .call(|mut conn| async move {
                    redis::cmd("GET")
                        .arg(&key)
                        .query_async::<Option<f64>>(&mut conn)
                        .await
                })
                .await;
            if let Ok(spent) = spent {
                return spent.unwrap_or(0.0).max(self.local_today(today));
            }
        }
        self.local_today(today)
    }

    async fn add(&self, today: Date, dollars: f64) -> f64 {
        let local = self.add_local(today, dollars);
        if let Some(redis) = &self.redis {
            let key = budget_key(today);
            let shared = redis
                .call(|mut conn| async move {
                    let (spent,): (f64,) = redis::pipe()
                        .atomic()
                        .cmd("INCRBYFLOAT")
                        .arg(&key)
                        .arg(dollars)
                        .cmd("EXPIRE")
                        .arg(&key)
                        .arg(BUDGET_KEY_TTL_SECS)
                        .ignore()
                        .query_async(&mut conn)
                        .await?;
                    Ok(spent)
                })
                .await;
            match shared {
                Ok(spent) => return spent,
                Err(error) => {
                    tracing::warn!(%error, "LLM spend not added to the shared budget; counted in this process");
                }
            }
        }
        local
    }
}

#[derive(Debug)]
pub struct GuardedGenerator {
    inner: Arc<dyn NarrativeGenerator>,
    permits: Option<Semaphore>,
    budget: Option<f64>,
    spend: Spend,
    metrics: GuardMetrics,
}

impl GuardedGenerator {
    pub fn new(
        inner: Arc<dyn NarrativeGenerator>,
        settings: GuardSettings,
        redis: Option<Arc<RedisBackend>>,
        metrics: GuardMetrics,
    ) -> Self {
        Self {
            inner,
            permits: settings.max_concurrency.map(Semaphore::new),
            budget: settings.daily_budget_usd,
            spend: Spend {
                redis,
                local: Mutex::new((OffsetDateTime::now_utc().date(), 0.0)),
            },
            metrics,
        }
    }

    fn show(&self, spent: f64) {
        self.metrics.budget_spent_usd.set(spent);
        let exhausted = self.budget.is_some_and(|budget| spent >= budget);
        self.metrics.budget_exhausted.set(i64::from(exhausted));
    }
}

#[async_trait::async_trait]
impl NarrativeGenerator for GuardedGenerator {
    async fn generate(
        &self,
        profile: &CanonicalProfile,
        live: &dyn LiveSink,
    ) -> Result<Generation, GenerateError> {
        // The budget is read once a permit is held, right before the call: calls that
        // waited for a permit while it ran out do not start.
        let _permit = match &self.permits {
            // The semaphore is never closed.
            Some(permits) => permits.acquire().await.ok(),
            None => None,
        };
        let today = OffsetDateTime::now_utc().date();
        if let Some(budget) = self.budget {
            let spent = self.spend.today(today).await;
            self.show(spent);
            if spent >= budget {
                self.metrics.refused.inc();
                return Err(GenerateError::BudgetExhausted);
            }
        }
        let result = self.inner.generate(profile, live).await;
        if let Ok(generation) = &result {
            if self.budget.is_some() {
                let spent = self.spend.add(today, generation.cost_usd).await;
                self.show(spent);
            }
        }
        result
    }

    fn model(&self) -> &str {
        self.inner.model()
    }

    fn prompt_hash(&self) -> PromptHash {
        self.inner.prompt_hash()
    }
}
