//! The stored value: a narrative with what it cost to make.
//!
//! Encoded as one format byte followed by the payload, so a later format can be added
//! beside the others and old entries still decode. Format 1 is JSON (readable, but its
//! field names cost ~200 bytes an entry); format 2, written since, is a compact binary
//! layout: LEB128 integers, the cost as little-endian f64 bits, and length-prefixed
//! UTF-8 strings, the body last.

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
const FORMAT_V2_BINARY: u8 = 2;

#[derive(Debug, thiserror::Error)]
pub enum EnvelopeError {
    #[error("empty value")]
    Empty,
    #[error("unknown envelope format {0}")]
    UnknownFormat(u8),
    #[error("corrupt envelope: {0}")]
    Corrupt(#[from] serde_json::Error),
    #[error("truncated or malformed binary envelope")]
    Malformed,
}

impl Envelope {
    /// Format 2, the compact one.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.body.len() + 64);
        out.push(FORMAT_V2_BINARY);
        put_varint(&mut out, u64::try_from(self.created_at_ms).unwrap_or(0));
        put_varint(&mut out, u64::from(self.tokens_in));
        put_varint(&mut out, u64::from(self.tokens_out));
        put_varint(&mut out, self.generation_ms);
        out.extend_from_slice(&self.cost_usd.to_bits().to_le_bytes());
        for text in [
            &self.engine_version,
            &self.prompt_hash,
            &self.model,
            &self.body,
        ] {
            put_varint(&mut out, text.len() as u64);
            out.extend_from_slice(text.as_bytes());
        }
        out
    }

    /// Format 1 (JSON), as entries were first written; kept so tests can pin that
    /// such entries stay readable.
    pub fn encode_v1(&self) -> Vec<u8> {
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
            Some((&FORMAT_V2_BINARY, payload)) => {
                decode_v2(payload).ok_or(EnvelopeError::Malformed)
            }
            Some((&other, _)) => Err(EnvelopeError::UnknownFormat(other)),
        }
    }

    /// Age of the entry at `now_ms`, never negative (clocks of two hosts may disagree).
    pub fn age_ms(&self, now_ms: UnixMillis) -> u64 {
        u64::try_from(now_ms.saturating_sub(self.created_at_ms)).unwrap_or(0)
    }
}

fn put_varint(out: &mut Vec<u8>, mut value: u64) {
    while value >= 0x80 {
        out.push((value as u8) | 0x80);
        value >>= 7;
    }
    out.push(value as u8);
}

/// Reads format 2; `None` on any truncation, overflow or trailing byte.
fn decode_v2(mut input: &[u8]) -> Option<Envelope> {
    fn varint(input: &mut &[u8]) -> Option<u64> {
        let mut value = 0u64;
        for shift in (0..64).step_by(7) {
            let (&byte, rest) = input.split_first()?;
            *input = rest;
            value |= u64::from(byte & 0x7f) << shift;
            if byte & 0x80 == 0 {
                return Some(value);
            }
        }
        None
    }
    fn text(input: &mut &[u8]) -> Option<String> {
        let len = usize::try_from(varint(input)?).ok()?;
        if input.len() < len {
            return None;
        }
        let (bytes, rest) = input.split_at(len);
        *input = rest;
        String::from_utf8(bytes.to_vec()).ok()
    }
    let created_at_ms = i64::try_from(varint(&mut input)?).ok()?;
    let tokens_in = u32::try_from(varint(&mut input)?).ok()?;
    let tokens_out = u32::try_from(varint(&mut input)?).ok()?;
    let generation_ms = varint(&mut input)?;
    let (cost, rest) = input.split_first_chunk::<8>()?;
    input = rest;
    let cost_usd = f64::from_bits(u64::from_le_bytes(*cost));
    let engine_version = text(&mut input)?;
    let prompt_hash = text(&mut input)?;
    let model = text(&mut input)?;
    let body = text(&mut input)?;
    input.is_empty().then_some(Envelope {
        body,
        created_at_ms,
        engine_version,
        prompt_hash,
        model,
        tokens_in,
        tokens_out,
        cost_usd,
        generation_ms,
    })
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
        assert_eq!(
            Envelope::decode(&envelope.encode_v1()).expect("decodes"),
            envelope
        );
    }

    /// Entries written in format 1 must stay readable by every later version.
    #[test]
    fn format_1_still_decodes() {
        let stored = "\u{1}{\"body\":\"Your Pleiadian core…\",\"createdAtMs\":1767225600000,\"engineVersion\":\"narrative@1.0.0\",\"promptHash\":\"0123456789ab\",\"model\":\"gpt-4o-mini\",\"tokensIn\":412,\"tokensOut\":388,\"costUsd\":0.0002946,\"generationMs\":2140}";
        assert_eq!(
            Envelope::decode(stored.as_bytes()).expect("decodes"),
            sample()
        );
        assert_eq!(sample().encode_v1(), stored.as_bytes());
    }

    /// The bytes of format 2, pinned: a change here makes every stored entry unreadable.
    #[test]
    fn format_2_is_pinned_and_compact() {
        let mut expected = vec![
            2, // format
            0x80, 0xd0, 0xea, 0xb6, 0xb7, 0x33, // created_at_ms 1767225600000 (LEB128)
            0x9c, 0x03, // tokens_in 412
            0x84, 0x03, // tokens_out 388
            0xdc, 0x10, // generation_ms 2140
        ];
        expected.extend_from_slice(&0.000_294_6f64.to_bits().to_le_bytes());
        for text in [
            "narrative@1.0.0",
            "0123456789ab",
            "gpt-4o-mini",
            "Your Pleiadian core…",
        ] {
            expected.push(text.len() as u8);
            expected.extend_from_slice(text.as_bytes());
        }
        assert_eq!(sample().encode(), expected);
        assert_eq!(Envelope::decode(&expected).expect("decodes"), sample());
        assert!(
            expected.len() + 120 < sample().encode_v1().len(),
            "format 2 drops the JSON field names"
        );
    }

    #[test]
    fn rejects_unknown_formats_truncation_and_garbage() {
        assert!(matches!(Envelope::decode(b""), Err(EnvelopeError::Empty)));
        assert!(matches!(
            Envelope::decode(b"\x09{}"),
            Err(EnvelopeError::UnknownFormat(9))
        ));
        assert!(matches!(
            Envelope::decode(b"\x01{"),
            Err(EnvelopeError::Corrupt(_))
        ));
        let encoded = sample().encode();
        for cut in 1..encoded.len() {
            assert!(Envelope::decode(&encoded[..cut]).is_err(), "cut at {cut}");
        }
        let mut trailing = encoded;
        trailing.push(0);
        assert!(Envelope::decode(&trailing).is_err());
        assert!(Envelope::decode(b"\x02\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff").is_err());
    }
}
