//! Cache keys: `narr:<ENGINE_VERSION>:<promptHash>:{<digest>}`.
//!
//! The digest is a keyed HMAC-SHA256 over the canonical profile JSON, because a plain
//! hash of low-entropy personal data can be reversed by enumerating profiles. The
//! braces are a Redis Cluster hash tag so a value, its lock and its metadata share a
//! slot. `promptHash` covers everything that changes the output, so changing the
//! prompt, model or parameters moves every request to new keys.

use std::fmt;
use std::sync::Arc;

use hmac::{Hmac, Mac};
use sha2::{Digest, Sha256};

use crate::profile::{CanonicalProfile, ProfileError, ProfileInput};
use crate::quantize::QuantizationStep;

type HmacSha256 = Hmac<Sha256>;

/// The secret the key digest is keyed with. Never printed.
#[derive(Clone)]
pub struct CacheKeySecret(Vec<u8>);

impl CacheKeySecret {
    pub fn new(bytes: impl Into<Vec<u8>>) -> Self {
        Self(bytes.into())
    }

    /// A fresh secret for one process (embedded mode with no `CACHE_KEY_SECRET`):
    /// keys then only mean something to this process, which is all an in-memory cache
    /// needs.
    pub fn random() -> Self {
        Self(rand::random::<[u8; 32]>().to_vec())
    }

    pub fn expose(&self) -> &[u8] {
        &self.0
    }
}

impl fmt::Debug for CacheKeySecret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("CacheKeySecret(<redacted>)")
    }
}

/// `ENGINE_VERSION`, like `narrative@1.0.0`. It becomes a key segment, so it may not
/// contain the key's separators.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct EngineVersion(String);

impl EngineVersion {
    pub fn parse(text: &str) -> Result<Self, String> {
        let ok = !text.is_empty()
            && text.len() <= 64
            && text
                .bytes()
                .all(|b| b.is_ascii_graphic() && !matches!(b, b':' | b'{' | b'}' | b'/' | b'%'));
        if ok {
            Ok(Self(text.to_owned()))
        } else {
            Err(format!("{text:?} must be 1 to 64 printable ASCII characters without ':', '{{', '}}', '/' or '%'"))
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl Default for EngineVersion {
    fn default() -> Self {
        Self("narrative@1.0.0".to_owned())
    }
}

impl fmt::Display for EngineVersion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// First 12 hex characters of SHA-256 over everything that changes a narrative.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct PromptHash(String);

impl PromptHash {
    /// Hashes named parts. Each part is framed by its name and length, so moving bytes
    /// from one part to the next always changes the hash.
    pub fn of_parts(parts: &[(&str, &[u8])]) -> Self {
        let mut hasher = Sha256::new();
        for (name, bytes) in parts {
            hasher.update(name.as_bytes());
            hasher.update((bytes.len() as u64).to_be_bytes());
            hasher.update(bytes);
        }
        let digest = hex::encode(hasher.finalize());
        Self(digest[..12].to_owned())
    }

    pub fn parse(text: &str) -> Option<Self> {
        (text.len() == 12 && text.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')))
            .then(|| Self(text.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for PromptHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A narrative's cache key. Only built by [`KeyDeriver`] or parsed from its text form.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct CacheKey(String);

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("not a narrative key: expected narr:<engineVersion>:<promptHash>:{{<digest>}}")]
pub struct InvalidKey;

impl CacheKey {
    pub fn parse(text: &str) -> Result<Self, InvalidKey> {
        let rest = text.strip_prefix("narr:").ok_or(InvalidKey)?;
        let (version, rest) = rest.split_once(':').ok_or(InvalidKey)?;
        let (prompt_hash, tagged) = rest.split_once(':').ok_or(InvalidKey)?;
        let digest = tagged
            .strip_prefix('{')
            .and_then(|d| d.strip_suffix('}'))
            .ok_or(InvalidKey)?;
        EngineVersion::parse(version).map_err(|_| InvalidKey)?;
        PromptHash::parse(prompt_hash).ok_or(InvalidKey)?;
        let hex_digest = digest.len() == 64
            && digest
                .bytes()
                .all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'));
        hex_digest.then(|| Self(text.to_owned())).ok_or(InvalidKey)
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The key of this narrative's fill lock; same hash tag, same cluster slot.
    pub fn lock_key(&self) -> String {
        format!("lock:{}", self.0)
    }

    /// The key of this narrative's live stream (its text while it is generated); same
    /// hash tag, same slot.
    pub fn live_key(&self) -> String {
        format!("live:{}", self.0)
    }

    /// The key of this narrative's erasure tombstone; same hash tag, same slot.
    pub fn tombstone_key(&self) -> String {
        format!("tomb:{}", self.0)
    }

    /// The `ENGINE_VERSION` segment.
    pub fn engine_version(&self) -> &str {
        self.0.split(':').nth(1).unwrap_or("")
    }

    /// The `promptHash` segment.
    pub fn prompt_hash(&self) -> &str {
        self.0.split(':').nth(2).unwrap_or("")
    }

    /// The hex HMAC digest inside the braces.
    pub fn digest(&self) -> &str {
        let start = self.0.rfind('{').map_or(0, |i| i + 1);
        &self.0[start..self.0.len() - 1]
    }

    /// The key as a URL path segment: `{` and `}` are not allowed bare in a URI.
    pub fn to_path_segment(&self) -> String {
        self.0.replace('{', "%7B").replace('}', "%7D")
    }
}

impl fmt::Display for CacheKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A validated profile with its canonical bytes and key.
///
/// The texts every request event of this profile names are kept shared (`Arc<str>`),
/// so that an event made on a hit counts references instead of copying them.
#[derive(Debug, Clone)]
pub struct KeyedProfile {
    pub profile: CanonicalProfile,
    /// Exactly the bytes the digest covers.
    pub canonical_json: Arc<str>,
    pub key: CacheKey,
    /// The key's digest ([`CacheKey::digest`]).
    pub digest: Arc<str>,
    /// The profile's primary system ([`CanonicalProfile::primary_system`]).
    pub primary_system: Arc<str>,
}

/// Derives keys for one configuration (secret, engine version, prompt hash, step).
#[derive(Clone)]
pub struct KeyDeriver {
    /// HMAC state with the secret already absorbed; cloned per key, which skips the
    /// key schedule on the hot path.
    mac: HmacSha256,
    prefix: String,
    step: QuantizationStep,
    engine_version: EngineVersion,
    prompt_hash: PromptHash,
}

impl fmt::Debug for KeyDeriver {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KeyDeriver")
            .field("prefix", &self.prefix)
            .field("step", &self.step)
            .finish_non_exhaustive()
    }
}

impl KeyDeriver {
    pub fn new(
        secret: &CacheKeySecret,
        engine_version: EngineVersion,
        prompt_hash: PromptHash,
        step: QuantizationStep,
    ) -> Self {
        // HMAC accepts keys of any length; this cannot fail.
        let mac =
            <HmacSha256 as Mac>::new_from_slice(secret.expose()).unwrap_or_else(|_| unreachable!());
        let prefix = format!("narr:{engine_version}:{prompt_hash}:");
        Self {
            mac,
            prefix,
            step,
            engine_version,
            prompt_hash,
        }
    }

    pub fn engine_version(&self) -> &EngineVersion {
        &self.engine_version
    }

    pub fn prompt_hash(&self) -> &PromptHash {
        &self.prompt_hash
    }

    pub fn step(&self) -> QuantizationStep {
        self.step
    }

    /// Validates, canonicalizes and keys a profile.
    pub fn derive(&self, input: &ProfileInput) -> Result<KeyedProfile, ProfileError> {
        let profile = input.canonicalize(self.step)?;
        Ok(self.key_for(profile))
    }

    pub fn key_for(&self, profile: CanonicalProfile) -> KeyedProfile {
        let canonical_json = profile.to_json();
        let mut mac = self.mac.clone();
        mac.update(canonical_json.as_bytes());
        let digest = hex::encode(mac.finalize().into_bytes());
        let key = CacheKey(format!("{}{{{digest}}}", self.prefix));
        KeyedProfile {
            primary_system: profile.primary_system().into(),
            profile,
            canonical_json: canonical_json.into(),
            key,
            digest: digest.into(),
        }
    }

    /// A keyed hash of a user id, for indexes and analytics: never the id itself.
    /// Domain-separated from key digests so the two can never collide.
    pub fn user_hash(&self, user_id: &str) -> String {
        let mut mac = self.mac.clone();
        mac.update(b"user-id\0");
        mac.update(user_id.as_bytes());
        hex::encode(&mac.finalize().into_bytes()[..16])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_parse_back_and_expose_their_parts() {
        let digest = "ab".repeat(32);
        let text = format!("narr:narrative@1.0.0:0123456789ab:{{{digest}}}");
        let key = CacheKey::parse(&text).expect("valid");
        assert_eq!(key.digest(), digest);
        assert_eq!(key.lock_key(), format!("lock:{text}"));
        assert!(key.to_path_segment().contains("%7B"));
        for bad in [
            "",
            "narr:",
            "narr:v1:0123456789ab:abc",
            "narr:v1:xyz:{00}",
            &text.replace("narr", "nar"),
        ] {
            assert_eq!(CacheKey::parse(bad), Err(InvalidKey), "{bad}");
        }
    }

    #[test]
    fn engine_version_rejects_separators() {
        assert!(EngineVersion::parse("narrative@1.0.0").is_ok());
        for bad in ["", "a:b", "a{b", "a b", "a/b"] {
            assert!(EngineVersion::parse(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn prompt_hash_frames_its_parts() {
        let a = PromptHash::of_parts(&[("template", b"ab"), ("model", b"c")]);
        let b = PromptHash::of_parts(&[("template", b"a"), ("model", b"bc")]);
        assert_ne!(a, b);
        assert_eq!(a.as_str().len(), 12);
    }

    #[test]
    fn secrets_do_not_print() {
        let secret = CacheKeySecret::new(b"hunter2".to_vec());
        assert!(!format!("{secret:?}").contains("hunter2"));
    }
}
