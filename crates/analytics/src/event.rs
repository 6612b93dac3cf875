//! The events, and the batch format they travel in.
//!
//! A batch is versioned JSON: `{"v": 1, "requests": [...], "generations": [...]}`.
//! Every event has a unique id (UUID v7, so ids of one batch sort by time) fixed where
//! it happened, which is what makes inserting a redelivered batch a no-op.
//! Nothing here identifies a person: the user id arrives only as its keyed hash, and
//! the profile is the canonical one (star systems and Human Design, no birth data).

use std::collections::HashMap;

use serde::{Deserialize, Serialize};
use time::OffsetDateTime;
use uuid::Uuid;

/// The batch format this build writes; readers refuse versions they do not know.
pub const BATCH_VERSION: u32 = 1;

/// How a validated `POST /narrative` was answered.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RequestOutcome {
    /// A fresh entry from this instance's memory.
    HitL1,
    /// A fresh entry from the shared store (Redis), or the only store in embedded mode.
    HitL2,
    /// An entry past `STALE_AFTER`, answered while it is refreshed.
    Stale,
    /// Generated for this request (or for a request it waited on).
    Miss,
    /// The template narrative: generation failed or was too slow.
    Fallback,
    /// Not answered: `only-if-cached` with nothing stored.
    Error,
}

impl RequestOutcome {
    pub const ALL: [Self; 6] = [
        Self::HitL1,
        Self::HitL2,
        Self::Stale,
        Self::Miss,
        Self::Fallback,
        Self::Error,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::HitL1 => "hit_l1",
            Self::HitL2 => "hit_l2",
            Self::Stale => "stale",
            Self::Miss => "miss",
            Self::Fallback => "fallback",
            Self::Error => "error",
        }
    }

    /// Stale answers count as hits: the cache answered.
    pub fn is_hit(self) -> bool {
        matches!(self, Self::HitL1 | Self::HitL2 | Self::Stale)
    }

    /// Fallbacks count as misses: the cache did not have it.
    pub fn is_miss(self) -> bool {
        matches!(self, Self::Miss | Self::Fallback)
    }
}

/// What a generation was for: the same values jobs carry.
pub use narrative_queue::Trigger;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum GenerationOutcome {
    Ok,
    Failed,
}

impl GenerationOutcome {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Ok => "ok",
            Self::Failed => "failed",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RequestEvent {
    pub id: Uuid,
    #[serde(with = "time::serde::rfc3339")]
    pub at: OffsetDateTime,
    pub outcome: RequestOutcome,
    pub latency_us: u64,
    pub engine_version: String,
    pub prompt_hash: String,
    /// `primary` or `hybrid`.
    pub classification: String,
    pub primary_system: String,
    /// The API client's name (`anonymous` without client keys).
    pub client: String,
    /// The keyed hash of the user id, when the request carried one.
    pub user_hash: Option<String>,
    /// The cache key's digest: which entry answered.
    pub key_digest: String,
    /// The canonical profile's JSON, for popularity (pre-warming). In a published
    /// batch it is sent once per key (see [`Batch::profiles`]) and empty elsewhere.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub profile: String,
    /// What the answered entry took to generate; a hit saves exactly that.
    pub entry_tokens: u64,
    pub entry_cost_usd: f64,
    /// A streamed answer: microseconds from the request to its first text. Absent for
    /// answers that did not stream (and so from events of earlier releases).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub first_delta_us: Option<u64>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GenerationEvent {
    pub id: Uuid,
    #[serde(with = "time::serde::rfc3339")]
    pub at: OffsetDateTime,
    pub model: String,
    pub tokens_in: u64,
    pub tokens_out: u64,
    pub cost_usd: f64,
    pub duration_ms: u64,
    /// LLM attempts this generation took (retries included).
    pub attempts: u32,
    pub outcome: GenerationOutcome,
    pub trigger: Trigger,
    pub key_digest: String,
}

/// A new event id: a UUID v7 (milliseconds, then 74 random bits), time-ordered so a
/// table's index grows at its end. The random bits come from the thread's generator:
/// `Uuid::now_v7` asks the OS for them on every call, a cost on the request path.
pub fn new_event_id() -> Uuid {
    let millis =
        u64::try_from(OffsetDateTime::now_utc().unix_timestamp_nanos() / 1_000_000).unwrap_or(0);
    let random: [u8; 10] = rand::random();
    uuid::Builder::from_unix_timestamp_millis(millis, &random).into_uuid()
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Batch {
    pub v: u32,
    #[serde(default)]
    pub requests: Vec<RequestEvent>,
    #[serde(default)]
    pub generations: Vec<GenerationEvent>,
    /// Canonical profiles by key digest, each sent once per batch however many of
    /// its events share it (a hit-heavy batch repeats a few profiles many times).
    #[serde(default, skip_serializing_if = "HashMap::is_empty")]
    pub profiles: HashMap<String, String>,
}

#[derive(Debug, thiserror::Error)]
pub enum BatchError {
    #[error("not an event batch: {0}")]
    Malformed(String),
    #[error("batch format {0} (this build reads {BATCH_VERSION})")]
    UnknownVersion(u32),
}

impl Batch {
    pub fn new() -> Self {
        Self {
            v: BATCH_VERSION,
            ..Self::default()
        }
    }

    pub fn len(&self) -> usize {
        self.requests.len() + self.generations.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Moves each key's profile into [`Batch::profiles`], leaving it once per key.
    pub fn compact(&mut self) {
        for event in &mut self.requests {
            if event.profile.is_empty() {
                continue;
            }
            let profile = std::mem::take(&mut event.profile);
            if !self.profiles.contains_key(&event.key_digest) {
                self.profiles.insert(event.key_digest.clone(), profile);
            }
        }
    }

    /// Gives every event its profile back from [`Batch::profiles`].
    fn expand(&mut self) {
        if self.profiles.is_empty() {
            return;
        }
        for event in &mut self.requests {
            if event.profile.is_empty() {
                if let Some(profile) = self.profiles.get(&event.key_digest) {
                    event.profile.clone_from(profile);
                }
            }
        }
        self.profiles.clear();
    }

    pub fn to_bytes(&self) -> Vec<u8> {
        // Strings, numbers and timestamps always serialize.
        serde_json::to_vec(self).unwrap_or_default()
    }

    pub fn from_bytes(bytes: &[u8]) -> Result<Self, BatchError> {
        let batch: Self =
            serde_json::from_slice(bytes).map_err(|e| BatchError::Malformed(e.to_string()))?;
        if batch.v != BATCH_VERSION {
            return Err(BatchError::UnknownVersion(batch.v));
        }
        let mut batch = batch;
        batch.expand();
        Ok(batch)
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub(crate) fn request(outcome: RequestOutcome, system: &str) -> RequestEvent {
        RequestEvent {
            id: new_event_id(),
            at: OffsetDateTime::now_utc(),
            outcome,
            latency_us: 150,
            engine_version: "narrative@1.0.0".to_owned(),
            prompt_hash: "abcd".to_owned(),
            classification: "primary".to_owned(),
            primary_system: system.to_owned(),
            client: "anonymous".to_owned(),
            user_hash: None,
            key_digest: "d1".to_owned(),
            profile: format!("{{\"primary\":\"{system}\"}}"),
            entry_tokens: 700,
            entry_cost_usd: 0.002,
            first_delta_us: None,
        }
    }

    #[test]
    fn a_batch_round_trips_and_refuses_other_versions() {
        let mut batch = Batch::new();
        batch
            .requests
            .push(request(RequestOutcome::HitL1, "Sirius"));
        let bytes = batch.to_bytes();
        assert_eq!(Batch::from_bytes(&bytes).unwrap(), batch);

        let mut other = serde_json::to_value(&batch).unwrap();
        other["v"] = 2.into();
        let error = Batch::from_bytes(other.to_string().as_bytes()).unwrap_err();
        assert!(matches!(error, BatchError::UnknownVersion(2)), "{error}");
        assert!(matches!(
            Batch::from_bytes(b"{\"v\":1,\"requests\":[{}]}"),
            Err(BatchError::Malformed(_))
        ));
    }

    #[test]
    fn a_compacted_batch_sends_each_profile_once_and_reads_back_whole() {
        let mut batch = Batch::new();
        for outcome in [
            RequestOutcome::HitL1,
            RequestOutcome::HitL2,
            RequestOutcome::Miss,
        ] {
            batch.requests.push(request(outcome, "Sirius"));
        }
        let mut other = request(RequestOutcome::HitL1, "Lyra");
        other.key_digest = "d2".to_owned();
        batch.requests.push(other);
        let whole = batch.clone();
        batch.compact();
        let bytes = batch.to_bytes();
        let text = String::from_utf8_lossy(&bytes);
        assert_eq!(text.matches("Sirius\\\"").count(), 1, "{text}");
        assert_eq!(Batch::from_bytes(&bytes).unwrap(), whole);
    }

    #[test]
    fn outcomes_are_hits_or_misses_as_documented() {
        let hits: Vec<_> = RequestOutcome::ALL.iter().filter(|o| o.is_hit()).collect();
        let misses: Vec<_> = RequestOutcome::ALL.iter().filter(|o| o.is_miss()).collect();
        assert_eq!(hits.len(), 3);
        assert_eq!(misses.len(), 2);
        assert!(!RequestOutcome::Error.is_hit() && !RequestOutcome::Error.is_miss());
    }
}
