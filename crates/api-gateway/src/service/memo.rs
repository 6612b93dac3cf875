//! The same request body again: its key without parsing, canonicalizing or the key's
//! HMAC.
//!
//! Clients send the same bytes for the same profile (an app caches its request, a
//! retry resends it), and deriving a key costs more than the rest of a hit. The memo
//! maps a body to what deriving it gave: the keyed profile and the user id's keyed
//! hash. It is found by the body's digest, HMAC-SHA-256 under a key drawn for this
//! process: two different bodies share an entry only if they collide in SHA-256, and
//! the memo keeps no body, so no raw `userId` outlives its request here. Only bodies
//! that derived without error are kept, up to [`MEMO_BYTES`] in all (TinyLFU eviction).
//!
//! A memo belongs to one service, built from one set of settings (secret, version,
//! prompt hash, quantization step, known systems): settings that change the
//! canonical form build a new service, and so a new, empty memo.

use std::sync::Arc;

use cache_core::KeyedProfile;
use hmac::{Hmac, Mac};
use sha2::Sha256;

/// Bytes of derived keys kept at most (weighed roughly: canonical JSON, key, and a
/// fixed overhead).
pub const MEMO_BYTES: u64 = 32 * 1024 * 1024;
/// Bodies larger than this are derived each time: profiles are a few hundred bytes.
const LARGEST_BODY: usize = 4096;

/// What deriving a body gave.
#[derive(Debug)]
pub struct Derived {
    pub keyed: KeyedProfile,
    /// The keyed hash of the body's `userId`, if it has one.
    pub user_hash: Option<Arc<str>>,
}

type Digest = [u8; 32];

pub struct BodyMemo {
    entries: moka::sync::Cache<Digest, Arc<Derived>, foldhash::fast::RandomState>,
    /// HMAC state with this process's random key absorbed.
    mac: Hmac<Sha256>,
}

impl std::fmt::Debug for BodyMemo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BodyMemo")
            .field("entries", &self.entries.entry_count())
            .finish()
    }
}

impl Default for BodyMemo {
    fn default() -> Self {
        Self::with_capacity(MEMO_BYTES)
    }
}

impl BodyMemo {
    pub fn with_capacity(bytes: u64) -> Self {
        let key: [u8; 32] = rand::random();
        Self {
            entries: moka::sync::Cache::builder()
                .max_capacity(bytes)
                .weigher(|_, derived: &Arc<Derived>| {
                    let keyed = &derived.keyed;
                    let weight = keyed.canonical_json.len() + keyed.key.as_str().len() + 512;
                    u32::try_from(weight).unwrap_or(u32::MAX)
                })
                // The digests are uniform already: a seeded fast hash spreads them.
                .build_with_hasher(foldhash::fast::RandomState::default()),
            // HMAC takes keys of any length: this cannot fail.
            mac: Hmac::<Sha256>::new_from_slice(&key).unwrap_or_else(|_| unreachable!()),
        }
    }

    fn digest(&self, body: &[u8]) -> Digest {
        let mut mac = self.mac.clone();
        mac.update(body);
        mac.finalize().into_bytes().into()
    }

    /// What `body` derived to before if these exact bytes did, or else what `derive`
    /// gives, remembered when it succeeds. The body is digested once either way.
    pub fn get_or_derive<E>(
        &self,
        body: &[u8],
        derive: impl FnOnce() -> Result<Arc<Derived>, E>,
    ) -> Result<Arc<Derived>, E> {
        if body.len() > LARGEST_BODY {
            return derive();
        }
        let digest = self.digest(body);
        if let Some(derived) = self.entries.get(&digest) {
            return Ok(derived);
        }
        let derived = derive()?;
        self.entries.insert(digest, Arc::clone(&derived));
        Ok(derived)
    }

    /// What `body` derived to before, if these exact bytes did.
    #[cfg(test)]
    fn get(&self, body: &[u8]) -> Option<Arc<Derived>> {
        if body.len() > LARGEST_BODY {
            return None;
        }
        self.entries.get(&self.digest(body))
    }

    /// Remembers what `body` derived to.
    #[cfg(test)]
    fn insert(&self, body: &[u8], derived: Arc<Derived>) {
        if body.len() > LARGEST_BODY {
            return;
        }
        self.entries.insert(self.digest(body), derived);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use cache_core::QuantizationStep;
    use cache_core::{CacheKeySecret, EngineVersion, KeyDeriver, ProfileInput, PromptHash};

    fn derived(body: &[u8]) -> Arc<Derived> {
        let deriver = KeyDeriver::new(
            &CacheKeySecret::new(b"memo-test-secret-0123".to_vec()),
            EngineVersion::parse("narrative@1.0.0").expect("version"),
            PromptHash::of_parts(&[("test", b"memo")]),
            QuantizationStep::DEFAULT,
        );
        let input = ProfileInput::from_json(body).expect("profile");
        Arc::new(Derived {
            keyed: deriver.derive(&input).expect("derives"),
            user_hash: None,
        })
    }

    const LYRA: &[u8] = br#"{"classification":"primary","primary":"Lyra","percentages":{"Lyra":100},"hdData":{"type":"Generator","authority":"Sacral","profile":"1/3"}}"#;
    const SIRIUS: &[u8] = br#"{"classification":"primary","primary":"Sirius","percentages":{"Sirius":100},"hdData":{"type":"Generator","authority":"Sacral","profile":"1/3"}}"#;

    #[test]
    fn a_body_answers_only_for_itself() {
        let memo = BodyMemo::default();
        memo.insert(LYRA, derived(LYRA));
        assert!(memo.get(SIRIUS).is_none(), "another body: no answer");
        let mut spaced = LYRA.to_vec();
        spaced.push(b' ');
        assert!(memo.get(&spaced).is_none(), "one byte more: no answer");
        assert_eq!(
            memo.get(LYRA).expect("the same bytes").keyed.key,
            derived(LYRA).keyed.key
        );
    }

    #[test]
    fn two_processes_digest_a_body_apart() {
        // Digests under a key of each process's own: one process's entries say
        // nothing about another's bodies.
        assert_ne!(
            BodyMemo::default().digest(LYRA),
            BodyMemo::default().digest(LYRA)
        );
    }

    #[test]
    fn large_bodies_are_not_kept() {
        let memo = BodyMemo::default();
        let mut large = LYRA.to_vec();
        large.extend(std::iter::repeat_n(b' ', LARGEST_BODY));
        memo.insert(&large, derived(LYRA));
        assert!(memo.get(&large).is_none());
    }
}
