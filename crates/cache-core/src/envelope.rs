//! The stored value: a narrative with what it cost to make.
//!
//! Encoded as one format byte followed by the payload, so a later format can be added
//! beside this one and old entries still decode. Format 1 is JSON.

use serde::{Deserialize, Serialize};

/// Milliseconds since the Unix epoch, UTC.
pub type UnixMillis = i64;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Envelope {
    pub body: String,
    pub created_at_ms: UnixMillis,
    pub engine_version: String,
    pub prompt_hash: String,
    pub model: String,
    pub tokens_in: u32,
    pub tokens_out: u32,
    /// Dollars the LLM call cost; every hit credits it as saved.
    pub cost_usd: f64,
    pub generation_ms: u64,
}

const FORMAT_V1_JSON: u8 = 1;

#[derive(Debug, thiserror::Error)]
pub enum EnvelopeError {
    #[error("empty value")]
    Empty,
    #[error("unknown envelope format {0}")]
    UnknownFormat(u8),
    #[error("corrupt envelope: {0}")]
    Corrupt(#[from] serde_json::Error),
}

impl Envelope {
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.body.len() + 192);
        out.push(FORMAT_V1_JSON);
        // Serializing a struct of strings and numbers into a Vec cannot fail.
        serde_json::to_writer(&mut out, self).unwrap_or_else(|_| unreachable!());
        out
    }

    pub fn decode(bytes: &[u8]) -> Result<Self, EnvelopeError> {
        match bytes.split_first() {
            None => Err(EnvelopeError::Empty),
            Some((&FORMAT_V1_JSON, payload)) => Ok(serde_json::from_slice(payload)?),
            Some((&other, _)) => Err(EnvelopeError::UnknownFormat(other)),
        }
    }

    /// Age of the entry at `now_ms`, never negative (clocks of two hosts may disagree).
    pub fn age_ms(&self, now_ms: UnixMillis) -> u64 {
        u64::try_from(now_ms - self.created_at_ms).unwrap_or(0)
    }
}

pub fn now_ms() -> UnixMillis {
    let since_epoch = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    i64::try_from(since_epoch.as_millis()).unwrap_or(i64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(crate) fn sample() -> Envelope {
        Envelope {
            body: "Your Pleiadian core…".into(),
            created_at_ms: 1_767_225_600_000,
            engine_version: "narrative@1.0.0".into(),
            prompt_hash: "0123456789ab".into(),
            model: "gpt-4o-mini".into(),
            tokens_in: 412,
            tokens_out: 388,
            cost_usd: 0.000_294_6,
            generation_ms: 2140,
        }
    }

    #[test]
    fn round_trips() {
        let envelope = sample();
        assert_eq!(
            Envelope::decode(&envelope.encode()).expect("decodes"),
            envelope
        );
    }

    /// Entries written by this version must stay readable by every later one.
    #[test]
    fn format_1_written_today_still_decodes() {
        let stored = "\u{1}{\"body\":\"Your Pleiadian core…\",\"createdAtMs\":1767225600000,\"engineVersion\":\"narrative@1.0.0\",\"promptHash\":\"0123456789ab\",\"model\":\"gpt-4o-mini\",\"tokensIn\":412,\"tokensOut\":388,\"costUsd\":0.0002946,\"generationMs\":2140}";
        assert_eq!(
            Envelope::decode(stored.as_bytes()).expect("decodes"),
            sample()
        );
        assert_eq!(sample().encode(), stored.as_bytes());
    }

    #[test]
    fn rejects_unknown_formats_and_garbage() {
        assert!(matches!(Envelope::decode(b""), Err(EnvelopeError::Empty)));
        assert!(matches!(
            Envelope::decode(b"\x09{}"),
            Err(EnvelopeError::UnknownFormat(9))
        ));
        assert!(matches!(
            Envelope::decode(b"\x01{"),
            Err(EnvelopeError::Corrupt(_))
        ));
    }
}
