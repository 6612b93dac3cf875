//! How an envelope is laid out as a Redis value: compressed, and sealed when
//! `CACHE_ENCRYPTION_KEY` is set.
//!
//! ```text
//! 'B' brotli(envelope)                                                  not sealed
//! 'S' id_len:u8 id nonce:[u8; 12] AES-256-GCM(brotli(envelope), aad = redis key)
//! 'T' text                                              a live piece, not sealed
//! 'S' id_len:u8 id nonce:[u8; 12] AES-256-GCM('T' text, aad = stream key)
//! ```
//!
//! Brotli at quality 10, because values are small English texts: its built-in dictionary
//! makes a ~1 KB narrative about 25% smaller than zstd does, which keeps a Redis entry
//! under the narrative's raw size (`docs/benchmarks.md`). Compressing costs about half a
//! millisecond of CPU once per generation (callers run it off the async workers);
//! decompressing on a read takes a few microseconds. Quality 11 saves 3% more bytes for
//! twice the CPU.
//!
//! The Redis key is the associated data, so a sealed value copied under another key
//! fails to open (and is treated as a miss). The key id names which configured key
//! sealed the value: rotating means putting a new key first and keeping the old ones
//! after it until the entries they sealed have expired (`CACHE_TTL`).
//! With keys configured, only sealed values are accepted.

use aes_gcm::aead::{Aead, KeyInit, Payload};
use aes_gcm::{Aes256Gcm, Nonce};
use base64::Engine as _;

use cache_core::envelope::{Envelope, EnvelopeError};

const COMPRESSED: u8 = b'B';
const SEALED: u8 = b'S';
/// A live stream's piece of text (`live`).
const TEXT: u8 = b'T';
const NONCE_BYTES: usize = 12;
/// Decompressed values larger than this are refused (narratives are a few KiB).
const MAX_PLAIN_BYTES: usize = 1 << 20;
const BROTLI_QUALITY: u32 = 10;
/// Brotli's window: 64 KiB covers any narrative.
const BROTLI_WINDOW_BITS: u32 = 16;

#[derive(Debug, thiserror::Error)]
pub enum CodecError {
    #[error("value too short or of unknown format")]
    Format,
    #[error("sealed with key id {0:?}, which is not configured")]
    UnknownKeyId(String),
    #[error("value failed authentication (wrong key, tampered, or moved from another key)")]
    Unauthentic,
    #[error("value is not sealed but encryption is configured")]
    NotSealed,
    #[error("value does not decompress: {0}")]
    Decompress(String),
    #[error(transparent)]
    Envelope(#[from] EnvelopeError),
}

/// The keys values are sealed with: the first seals, all of them open.
#[derive(Clone)]
pub struct EncryptionKeys {
    keys: Vec<(String, Aes256Gcm)>,
}

impl std::fmt::Debug for EncryptionKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let ids: Vec<&str> = self.keys.iter().map(|(id, _)| id.as_str()).collect();
        f.debug_struct("EncryptionKeys")
            .field("ids", &ids)
            .finish_non_exhaustive()
    }
}

impl EncryptionKeys {
    /// Parses `id:base64key[,id:base64key...]`: each key 32 bytes in standard base64,
    /// ids 1 to 32 characters of `[A-Za-z0-9_-]`, the first one current.
    pub fn parse(text: &str) -> Result<Self, String> {
        let mut keys = Vec::new();
        for part in text.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let (id, encoded) = part
                .split_once(':')
                .ok_or("each key must be written id:base64key")?;
            let id_ok = (1..=32).contains(&id.len())
                && id
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
            if !id_ok {
                return Err(format!(
                    "key id {id:?} must be 1 to 32 characters of letters, digits, _ or -"
                ));
            }
            let bytes = base64::engine::general_purpose::STANDARD
                .decode(encoded)
                .map_err(|_| format!("key {id:?} is not valid base64"))?;
            let cipher = Aes256Gcm::new_from_slice(&bytes)
                .map_err(|_| format!("key {id:?} must be 32 bytes, got {}", bytes.len()))?;
            if keys.iter().any(|(existing, _)| existing == id) {
                return Err(format!("key id {id:?} is listed twice"));
            }
            keys.push((id.to_owned(), cipher));
        }
        if keys.is_empty() {
            return Err("no keys given".to_owned());
        }
        Ok(Self { keys })
    }

    pub fn current_id(&self) -> &str {
        &self.keys[0].0
    }
}

/// Turns envelopes into Redis values and back.
#[derive(Debug, Clone, Default)]
pub struct ValueCodec {
    keys: Option<EncryptionKeys>,
}

impl ValueCodec {
    pub fn new(keys: Option<EncryptionKeys>) -> Self {
        Self { keys }
    }

    pub fn encode(&self, redis_key: &str, envelope: &Envelope) -> Vec<u8> {
        self.wrap(COMPRESSED, redis_key, compress(&envelope.encode()))
    }

    pub fn decode(&self, redis_key: &str, value: &[u8]) -> Result<Envelope, CodecError> {
        let compressed = self.unwrap(COMPRESSED, redis_key, value)?;
        let plain = decompress(&compressed)?;
        Ok(Envelope::decode(&plain)?)
    }

    /// A piece of a narrative being written, as a live stream entry holds it: sealed
    /// like a value when keys are configured (a stream is as readable as an entry),
    /// not compressed (pieces are a few dozen bytes).
    pub fn encode_text(&self, redis_key: &str, text: &str) -> Vec<u8> {
        self.wrap(TEXT, redis_key, text.as_bytes().to_vec())
    }

    pub fn decode_text(&self, redis_key: &str, value: &[u8]) -> Result<String, CodecError> {
        let bytes = self.unwrap(TEXT, redis_key, value)?;
        String::from_utf8(bytes).map_err(|_| CodecError::Format)
    }

    /// `format` and the bytes, or, with keys, the bytes sealed under the first key.
    fn wrap(&self, format: u8, redis_key: &str, bytes: Vec<u8>) -> Vec<u8> {
        let Some(keys) = &self.keys else {
            let mut out = Vec::with_capacity(bytes.len() + 1);
            out.push(format);
            out.extend_from_slice(&bytes);
            return out;
        };
        let (id, cipher) = &keys.keys[0];
        let nonce: [u8; NONCE_BYTES] = rand::random();
        // Values seal their bytes alone, as they have since the first release; other
        // formats seal their tag with them, so a text piece never opens as a value.
        let plain = if format == COMPRESSED {
            bytes
        } else {
            let mut tagged = Vec::with_capacity(bytes.len() + 1);
            tagged.push(format);
            tagged.extend_from_slice(&bytes);
            tagged
        };
        let sealed = cipher
            .encrypt(
                Nonce::from_slice(&nonce),
                Payload {
                    msg: &plain,
                    aad: redis_key.as_bytes(),
                },
            )
            .unwrap_or_default();
        let mut out = Vec::with_capacity(2 + id.len() + NONCE_BYTES + sealed.len());
        out.push(SEALED);
        out.push(id.len() as u8);
        out.extend_from_slice(id.as_bytes());
        out.extend_from_slice(&nonce);
        out.extend_from_slice(&sealed);
        out
    }

    /// The bytes `wrap` was given, checking `format` and, when sealed, opening them.
    fn unwrap(&self, format: u8, redis_key: &str, value: &[u8]) -> Result<Vec<u8>, CodecError> {
        let (&tag, rest) = value.split_first().ok_or(CodecError::Format)?;
        match (tag, &self.keys) {
            (tag, None) if tag == format => Ok(rest.to_vec()),
            (tag, Some(_)) if tag == format => Err(CodecError::NotSealed),
            (SEALED, keys) => {
                let (&id_len, rest) = rest.split_first().ok_or(CodecError::Format)?;
                let id_len = usize::from(id_len);
                if rest.len() < id_len + NONCE_BYTES {
                    return Err(CodecError::Format);
                }
                let (id, rest) = rest.split_at(id_len);
                let (nonce, sealed) = rest.split_at(NONCE_BYTES);
                let id = String::from_utf8_lossy(id).into_owned();
                let cipher = keys
                    .as_ref()
                    .and_then(|k| k.keys.iter().find(|(known, _)| *known == id))
                    .map(|(_, cipher)| cipher)
                    .ok_or(CodecError::UnknownKeyId(id))?;
                let opened = cipher
                    .decrypt(
                        Nonce::from_slice(nonce),
                        Payload {
                            msg: sealed,
                            aad: redis_key.as_bytes(),
                        },
                    )
                    .map_err(|_| CodecError::Unauthentic)?;
                if format == COMPRESSED {
                    return Ok(opened);
                }
                match opened.split_first() {
                    Some((&sealed_format, bytes)) if sealed_format == format => Ok(bytes.to_vec()),
                    _ => Err(CodecError::Format),
                }
            }
            _ => Err(CodecError::Format),
        }
    }
}

fn compress(plain: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(plain.len() / 2);
    {
        let mut writer =
            brotli::CompressorWriter::new(&mut out, 4096, BROTLI_QUALITY, BROTLI_WINDOW_BITS);
        // Writing into a Vec cannot fail.
        let _ = std::io::Write::write_all(&mut writer, plain);
    }
    out
}

/// Decompresses, refusing more than `MAX_PLAIN_BYTES` (a decompression bomb).
fn decompress(compressed: &[u8]) -> Result<Vec<u8>, CodecError> {
    use std::io::Read as _;
    let mut plain = Vec::with_capacity(compressed.len() * 3);
    brotli::Decompressor::new(compressed, 4096)
        .take(MAX_PLAIN_BYTES as u64 + 1)
        .read_to_end(&mut plain)
        .map_err(|e| CodecError::Decompress(e.to_string()))?;
    if plain.len() > MAX_PLAIN_BYTES {
        return Err(CodecError::Decompress(
            "larger than any narrative".to_owned(),
        ));
    }
    Ok(plain)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn envelope() -> Envelope {
        Envelope {
            body: "Your Lyran fire shows in how you begin things. ".repeat(20),
            created_at_ms: 1_767_225_600_000,
            engine_version: "narrative@1.0.0".into(),
            prompt_hash: "0123456789ab".into(),
            model: "gpt-4o-mini".into(),
            tokens_in: 400,
            tokens_out: 380,
            cost_usd: 0.0003,
            generation_ms: 2000,
        }
    }

    fn key_text(byte: u8) -> String {
        base64::engine::general_purpose::STANDARD.encode([byte; 32])
    }

    #[test]
    fn compressed_values_round_trip_and_are_smaller() {
        let codec = ValueCodec::default();
        let value = codec.encode("k", &envelope());
        assert_eq!(value[0], COMPRESSED);
        assert!(
            value.len() < envelope().encode().len() / 2,
            "{} bytes",
            value.len()
        );
        assert_eq!(codec.decode("k", &value).expect("opens"), envelope());
    }

    #[test]
    fn sealed_values_hide_the_text_and_are_bound_to_their_key() {
        let keys = EncryptionKeys::parse(&format!("k2:{}", key_text(2))).expect("keys");
        let codec = ValueCodec::new(Some(keys));
        let value = codec.encode("narr:a", &envelope());
        assert_eq!(value[0], SEALED);
        let text = String::from_utf8_lossy(&value);
        assert!(!text.contains("Lyran") && !text.contains("gpt-4o-mini"));
        assert_eq!(codec.decode("narr:a", &value).expect("opens"), envelope());
        assert!(
            matches!(codec.decode("narr:b", &value), Err(CodecError::Unauthentic)),
            "moved to another key"
        );
        let mut tampered = value.clone();
        let last = tampered.len() - 1;
        tampered[last] ^= 1;
        assert!(matches!(
            codec.decode("narr:a", &tampered),
            Err(CodecError::Unauthentic)
        ));
        assert!(matches!(
            codec.decode(
                "narr:a",
                &ValueCodec::default().encode("narr:a", &envelope())
            ),
            Err(CodecError::NotSealed)
        ));
    }

    #[test]
    fn rotation_keeps_old_entries_readable() {
        let old = ValueCodec::new(Some(
            EncryptionKeys::parse(&format!("v1:{}", key_text(1))).expect("keys"),
        ));
        let sealed_by_old = old.encode("narr:a", &envelope());
        let rotated = ValueCodec::new(Some(
            EncryptionKeys::parse(&format!("v2:{},v1:{}", key_text(2), key_text(1))).expect("keys"),
        ));
        assert_eq!(
            rotated
                .decode("narr:a", &sealed_by_old)
                .expect("old key still opens"),
            envelope()
        );
        let sealed_by_new = rotated.encode("narr:a", &envelope());
        assert_eq!(&sealed_by_new[2..4], b"v2", "new values use the first key");
        assert!(
            matches!(old.decode("narr:a", &sealed_by_new), Err(CodecError::UnknownKeyId(id)) if id == "v2")
        );
    }

    #[test]
    fn key_configuration_errors() {
        for bad in [
            "",
            "nokey",
            "a:notbase64!",
            &format!(
                "a:{}",
                base64::engine::general_purpose::STANDARD.encode([0u8; 16])
            ),
            &format!("a:{k},a:{k}", k = key_text(1)),
            &format!("bad id:{}", key_text(1)),
        ] {
            assert!(EncryptionKeys::parse(bad).is_err(), "{bad:?}");
        }
        assert!(!format!(
            "{:?}",
            EncryptionKeys::parse(&format!("a:{}", key_text(7))).expect("ok")
        )
        .contains(&key_text(7)));
    }

    #[test]
    fn garbage_is_an_error_not_a_panic() {
        let codec = ValueCodec::new(Some(
            EncryptionKeys::parse(&format!("a:{}", key_text(1))).expect("keys"),
        ));
        for value in [
            &b""[..],
            b"S",
            b"S\x05ab",
            b"Z\x00\x01",
            b"\x01{}",
            b"S\x01a012345678901",
        ] {
            assert!(codec.decode("k", value).is_err());
            assert!(ValueCodec::default().decode("k", value).is_err());
        }
    }

    #[test]
    fn text_pieces_are_sealed_and_never_open_as_values() {
        let keys = EncryptionKeys::parse(&format!(
            "k1:{}",
            base64::engine::general_purpose::STANDARD.encode([7u8; 32])
        ))
        .expect("keys");
        let codec = ValueCodec::new(Some(keys));
        let sealed = codec.encode_text("live:k", "Lyra's light");
        assert!(
            !sealed.windows(5).any(|w| w == b"Lyra'"),
            "sealed, not plain"
        );
        assert_eq!(
            codec.decode_text("live:k", &sealed).expect("opens"),
            "Lyra's light"
        );
        assert!(
            codec.decode_text("live:other", &sealed).is_err(),
            "bound to its key"
        );
        assert!(codec.decode("live:k", &sealed).is_err(), "not a value");
        let plain = ValueCodec::default();
        assert_eq!(
            plain
                .decode_text("live:k", &plain.encode_text("live:k", "a"))
                .expect("opens"),
            "a"
        );
    }
}
