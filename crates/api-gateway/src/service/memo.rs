//! The same request body again: its key without parsing, canonicalizing or an HMAC.
//!
//! Clients send the same bytes for the same profile (an app caches its request, a
//! retry resends it), and deriving a key costs more than the rest of a hit. The memo
//! maps a body's exact bytes to what deriving it gave: the keyed profile and the user
//! id's keyed hash. A fast keyed hash finds an entry; byte equality confirms it, so two
//! different bodies never share one, whatever their hashes. Only bodies that derived
//! without error are kept, up to [`MEMO_BYTES`] of them in all (TinyLFU eviction).
//!
//! A memo belongs to one service, built from one set of settings (secret, version,
//! prompt hash, quantization step, known systems): settings that change the
//! canonical form build a new service, and so a new, empty memo.

use std::hash::BuildHasher;
use std::sync::Arc;

use bytes::Bytes;
use cache_core::KeyedProfile;

/// Bytes of bodies and derived keys kept at most (weighed roughly: body, canonical
/// JSON, key, and a fixed overhead).
pub const MEMO_BYTES: u64 = 32 * 1024 * 1024;
/// Bodies larger than this are derived each time: profiles are a few hundred bytes.
const LARGEST_BODY: usize = 4096;

/// What deriving a body gave.
#[derive(Debug)]
pub struct Derived {
    pub keyed: KeyedProfile,
    /// The keyed hash of the body's `userId`, if it has one.
    pub user_hash: Option<String>,
}

struct Entry {
    body: Bytes,
    derived: Arc<Derived>,
}

pub struct BodyMemo<S = std::collections::hash_map::RandomState> {
    entries: moka::sync::Cache<u64, Arc<Entry>>,
    hasher: S,
}

impl<S> std::fmt::Debug for BodyMemo<S> {
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
        // Keyed per process: nobody can pick bodies that collide here (a collision
        // would only cost a derivation, never a wrong answer).
        Self::with_hasher(bytes, std::collections::hash_map::RandomState::new())
    }
}

impl<S: BuildHasher> BodyMemo<S> {
    pub fn with_hasher(bytes: u64, hasher: S) -> Self {
        Self {
            entries: moka::sync::Cache::builder()
                .max_capacity(bytes)
                .weigher(|_, entry: &Arc<Entry>| {
                    let keyed = &entry.derived.keyed;
                    let weight = entry.body.len()
                        + keyed.canonical_json.len()
                        + keyed.key.as_str().len()
                        + 512;
                    u32::try_from(weight).unwrap_or(u32::MAX)
                })
                .build(),
            hasher,
        }
    }

    fn hash(&self, body: &[u8]) -> u64 {
        self.hasher.hash_one(body)
    }

    /// What `body` derived to before, if these exact bytes did.
    pub fn get(&self, body: &[u8]) -> Option<Arc<Derived>> {
        let entry = self.entries.get(&self.hash(body))?;
        (entry.body.as_ref() == body).then(|| Arc::clone(&entry.derived))
    }

    /// Remembers what `body` derived to.
    pub fn insert(&self, body: Bytes, derived: Arc<Derived>) {
        if body.len() > LARGEST_BODY {
            return;
        }
        let hash = self.hash(&body);
        self.entries.insert(hash, Arc::new(Entry { body, derived }));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use cache_core::QuantizationStep;
    use cache_core::{CacheKeySecret, EngineVersion, KeyDeriver, ProfileInput, PromptHash};
    use std::hash::Hasher;

    /// Every body hashes alike: only byte equality tells them apart.
    #[derive(Clone, Default)]
    struct Colliding;

    impl BuildHasher for Colliding {
        type Hasher = Constant;
        fn build_hasher(&self) -> Constant {
            Constant
        }
    }

    struct Constant;

    impl Hasher for Constant {
        fn finish(&self) -> u64 {
            7
        }
        fn write(&mut self, _bytes: &[u8]) {}
    }

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
    fn bodies_whose_hashes_collide_never_share_an_answer() {
        let memo = BodyMemo::with_hasher(MEMO_BYTES, Colliding);
        memo.insert(Bytes::from_static(LYRA), derived(LYRA));
        assert!(
            memo.get(SIRIUS).is_none(),
            "same hash, other bytes: no answer"
        );
        assert!(memo.get(LYRA).is_some());
        memo.insert(Bytes::from_static(SIRIUS), derived(SIRIUS));
        let sirius = memo.get(SIRIUS).expect("the newer body");
        assert_eq!(sirius.keyed.key, derived(SIRIUS).keyed.key);
        assert!(
            memo.get(LYRA).is_none(),
            "it replaced the other, never answers for it"
        );
    }

    #[test]
    fn large_bodies_are_not_kept() {
        let memo = BodyMemo::default();
        let mut large = LYRA.to_vec();
        large.extend(std::iter::repeat_n(b' ', LARGEST_BODY));
        memo.insert(Bytes::from(large.clone()), derived(LYRA));
        assert!(memo.get(&large).is_none());
    }
}
