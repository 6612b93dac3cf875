//! The gateway's settings, read once from the environment at start-up.

use std::net::SocketAddr;
use std::time::Duration;

use cache_core::config::{ConfigError, Vars};
use cache_core::{CacheKeySecret, EngineVersion, QuantizationStep};
use generator_worker::{llm_settings_from, LlmSettings};

#[derive(Debug, Clone)]
pub struct Settings {
    pub bind_addr: SocketAddr,
    pub engine_version: EngineVersion,
    pub quantization_step: QuantizationStep,
    pub cache_ttl: Duration,
    pub stale_after: Duration,
    /// How long a request waits for a generation before answering the template.
    pub generation_wait: Duration,
    /// `None` in embedded mode without `CACHE_KEY_SECRET`: a random one per process.
    pub cache_key_secret: Option<CacheKeySecret>,
    /// `None` without `LLM_API_KEY`: the template engine generates.
    pub llm: Option<LlmSettings>,
    /// Byte budget of the in-process cache.
    pub memory_cache_max_bytes: u64,
    /// How long shutdown waits for generations in flight to finish and be stored.
    pub shutdown_grace: Duration,
}

/// Settings that belong to capabilities this version does not have yet. Starting with
/// one of them set would silently ignore it (a shared cache that is not shared, an API
/// that is not protected), so start-up refuses instead.
const NOT_YET_SUPPORTED: [&str; 6] = [
    "REDIS_URL",
    "AMQP_URL",
    "DATABASE_URL",
    "API_KEYS",
    "ADMIN_TOKEN",
    "CACHE_ENCRYPTION_KEY",
];

pub const MIN_SECRET_BYTES: usize = 16;

impl Settings {
    pub fn from_vars(vars: &Vars) -> Result<Self, ConfigError> {
        for var in NOT_YET_SUPPORTED {
            if vars.get(var).is_some() {
                return Err(ConfigError::new(
                    var,
                    "is set, but this version runs in embedded mode only; unset it (distributed mode, \
                     authentication and encryption arrive in later releases)",
                ));
            }
        }
        let cache_key_secret = vars.parse_or("CACHE_KEY_SECRET", None, |text| {
            if text.len() < MIN_SECRET_BYTES {
                Err(format!("must be at least {MIN_SECRET_BYTES} bytes"))
            } else {
                Ok(Some(CacheKeySecret::new(text.as_bytes().to_vec())))
            }
        })?;
        Ok(Self {
            bind_addr: vars.from_str_or("BIND_ADDR", SocketAddr::from(([127, 0, 0, 1], 8080)))?,
            engine_version: vars.parse_or(
                "ENGINE_VERSION",
                EngineVersion::default(),
                EngineVersion::parse,
            )?,
            quantization_step: vars.from_str_or("QUANTIZATION_STEP", QuantizationStep::DEFAULT)?,
            cache_ttl: positive(
                vars.duration_or("CACHE_TTL", Duration::from_secs(30 * 86_400))?,
                "CACHE_TTL",
            )?,
            stale_after: vars.duration_or("STALE_AFTER", Duration::from_secs(7 * 86_400))?,
            generation_wait: vars.millis_or("GENERATION_WAIT_MS", Duration::from_millis(4500))?,
            cache_key_secret,
            llm: llm_settings_from(vars)?,
            memory_cache_max_bytes: vars.from_str_or("MEMORY_CACHE_MAX_MB", 256u64)? * 1024 * 1024,
            shutdown_grace: vars.duration_or("SHUTDOWN_GRACE", Duration::from_secs(30))?,
        })
    }
}

fn positive(value: Duration, var: &'static str) -> Result<Duration, ConfigError> {
    if value.is_zero() {
        Err(ConfigError::new(var, "must be longer than zero"))
    } else {
        Ok(value)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_match_the_design() {
        let settings = Settings::from_vars(&Vars::from_pairs([])).expect("defaults are valid");
        assert_eq!(settings.bind_addr.to_string(), "127.0.0.1:8080");
        assert_eq!(settings.engine_version.as_str(), "narrative@1.0.0");
        assert_eq!(settings.quantization_step, QuantizationStep::DEFAULT);
        assert_eq!(settings.cache_ttl, Duration::from_secs(30 * 86_400));
        assert_eq!(settings.stale_after, Duration::from_secs(7 * 86_400));
        assert_eq!(settings.generation_wait, Duration::from_millis(4500));
        assert!(settings.llm.is_none(), "no LLM_API_KEY: template engine");
    }

    #[test]
    fn a_bad_value_names_its_variable() {
        let cases = [
            ("BIND_ADDR", "localhost"),
            ("ENGINE_VERSION", "a:b"),
            ("QUANTIZATION_STEP", "0.125"),
            ("CACHE_TTL", "30 days"),
            ("CACHE_TTL", "0s"),
            ("GENERATION_WAIT_MS", "4.5"),
            ("CACHE_KEY_SECRET", "short"),
            ("LLM_BASE_URL", "api.openai.com"),
            ("LLM_PRICE_INPUT_PER_MTOK", "-1"),
            ("LLM_TIMEOUT_MS", "30s"),
            ("REDIS_URL", "redis://127.0.0.1"),
            ("API_KEYS", "app:secret"),
        ];
        for (var, value) in cases {
            let err = Settings::from_vars(&Vars::from_pairs([(var, value)])).expect_err(var);
            assert_eq!(err.var, var, "{err}");
        }
    }
}
