//! Reading settings from the environment: each value is parsed once at start-up, and a
//! bad one stops the process with a message naming the variable.

use std::collections::HashMap;
use std::fmt;
use std::str::FromStr;
use std::time::Duration;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid {var}: {message}")]
pub struct ConfigError {
    pub var: &'static str,
    pub message: String,
}

impl ConfigError {
    pub fn new(var: &'static str, message: impl Into<String>) -> Self {
        Self {
            var,
            message: message.into(),
        }
    }
}

type Lookup = Box<dyn Fn(&str) -> Option<String> + Send + Sync>;

/// Where variables come from: the process environment, or a map in tests.
pub struct Vars {
    lookup: Lookup,
}

impl fmt::Debug for Vars {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Vars")
    }
}

impl Vars {
    pub fn from_env() -> Self {
        Self {
            lookup: Box::new(|name| std::env::var(name).ok()),
        }
    }

    pub fn from_pairs<'a>(pairs: impl IntoIterator<Item = (&'a str, &'a str)>) -> Self {
        let map: HashMap<String, String> = pairs
            .into_iter()
            .map(|(k, v)| (k.to_owned(), v.to_owned()))
            .collect();
        Self {
            lookup: Box::new(move |name| map.get(name).cloned()),
        }
    }

    /// The value, or `None` when unset or blank.
    pub fn get(&self, name: &str) -> Option<String> {
        (self.lookup)(name)
            .map(|v| v.trim().to_owned())
            .filter(|v| !v.is_empty())
    }

    /// Parses the value with `parse`, or returns `default` when unset.
    pub fn parse_or<T>(
        &self,
        name: &'static str,
        default: T,
        parse: impl FnOnce(&str) -> Result<T, String>,
    ) -> Result<T, ConfigError> {
        match self.get(name) {
            None => Ok(default),
            Some(text) => parse(&text).map_err(|message| ConfigError::new(name, message)),
        }
    }

    /// A value with a `FromStr` impl.
    pub fn from_str_or<T: FromStr>(&self, name: &'static str, default: T) -> Result<T, ConfigError>
    where
        T::Err: fmt::Display,
    {
        self.parse_or(name, default, |text| {
            text.parse().map_err(|e: T::Err| format!("{text:?}: {e}"))
        })
    }

    /// `true`/`false` (also `1`/`0`, `yes`/`no`, in any case).
    pub fn bool_or(&self, name: &'static str, default: bool) -> Result<bool, ConfigError> {
        self.parse_or(name, default, |text| {
            match text.to_ascii_lowercase().as_str() {
                "1" | "true" | "yes" => Ok(true),
                "0" | "false" | "no" => Ok(false),
                _ => Err(format!("{text:?} must be true or false")),
            }
        })
    }

    /// A human-readable duration (`30d`, `7d`, `90s`, `250ms`).
    pub fn duration_or(
        &self,
        name: &'static str,
        default: Duration,
    ) -> Result<Duration, ConfigError> {
        self.parse_or(name, default, parse_duration)
    }

    /// Whole milliseconds (`GENERATION_WAIT_MS`, `LLM_TIMEOUT_MS`).
    pub fn millis_or(
        &self,
        name: &'static str,
        default: Duration,
    ) -> Result<Duration, ConfigError> {
        self.parse_or(name, default, |text| {
            text.parse::<u64>()
                .map(Duration::from_millis)
                .map_err(|_| format!("{text:?} is not a whole number of milliseconds"))
                .and_then(|duration| {
                    if duration <= MAX_DURATION {
                        Ok(duration)
                    } else {
                        Err(format!("{text:?} is longer than a century"))
                    }
                })
        })
    }
}

/// The longest duration a setting may name: a century. Anything longer means "never"
/// to a person, and would overflow the clocks it is added to (`Instant` and
/// `OffsetDateTime` arithmetic panics) on the request path.
pub const MAX_DURATION: Duration = Duration::from_secs(100 * 365 * 86_400);

/// `250ms`, `90s`, `15m`, `12h`, `30d`, `2w`; a number and a unit, nothing else, and at
/// most [`MAX_DURATION`].
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    let split = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let number: u64 = number
        .parse()
        .map_err(|_| format!("{text:?} must be a number and a unit, like 30d, 90s or 250ms"))?;
    let per_unit: u64 = match unit.trim() {
        "ms" => 1,
        "s" => 1_000,
        "m" => 60_000,
        "h" => 3_600_000,
        "d" => 86_400_000,
        "w" => 7 * 86_400_000,
        other => {
            return Err(format!(
                "{text:?} has unknown unit {other:?}; use ms, s, m, h, d or w"
            ))
        }
    };
    number
        .checked_mul(per_unit)
        .map(Duration::from_millis)
        .filter(|duration| *duration <= MAX_DURATION)
        .ok_or_else(|| format!("{text:?} is longer than a century"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("30d"), Ok(Duration::from_secs(30 * 86_400)));
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_duration("90s"), Ok(Duration::from_secs(90)));
        assert_eq!(parse_duration("36500d"), Ok(MAX_DURATION));
        // Accepted once; then overflowed the clocks they were added to on the request
        // path (PREWARM_WINDOW, LOCK_TTL, JOB_WAIT_LIMIT, HTTP_IDLE_TIMEOUT).
        for bad in [
            "36501d",
            "400000000000s",
            "18446744073709551615s",
            "30500000000000000w",
        ] {
            assert!(parse_duration(bad).is_err(), "{bad:?}");
        }
        for bad in ["", "30", "d", "1.5h", "-1s", "3 days"] {
            assert!(parse_duration(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn errors_name_the_variable() {
        let vars = Vars::from_pairs([("CACHE_TTL", "soon"), ("GENERATION_WAIT_MS", "4.5s")]);
        let err = vars
            .duration_or("CACHE_TTL", Duration::ZERO)
            .expect_err("bad");
        assert_eq!(err.var, "CACHE_TTL");
        assert!(err.to_string().starts_with("invalid CACHE_TTL:"), "{err}");
        assert_eq!(
            vars.millis_or("GENERATION_WAIT_MS", Duration::ZERO)
                .expect_err("bad")
                .var,
            "GENERATION_WAIT_MS"
        );
        assert_eq!(
            vars.millis_or("UNSET_MS", Duration::from_millis(5)),
            Ok(Duration::from_millis(5))
        );
    }
}
