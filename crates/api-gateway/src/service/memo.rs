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
//! An entry also keeps the last answer sent for its body, rendered: a repeated hit of
//! the same stored entry sends those bytes again instead of serializing (and
//! escaping) the narrative, with no lookup of its own. Kept answers count in the
//! memo's bytes. An entry expires [`MEMO_TTL`] after it was last written, and a kept
//! answer is always written with it, so none is held longer; [`BodyMemo::tidy`]
//! (every [`TIDY_EVERY`]) frees expired entries even when no request comes, so an
//! erased narrative is gone from memory within a minute and a few seconds.
//!
//! A memo belongs to one service, built from one set of settings (secret, version,
//! prompt hash, quantization step, known systems): settings that change the
//! canonical form build a new service, and so a new, empty memo.

use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwapOption;
use bytes::Bytes;
use cache_core::{Envelope, KeyedProfile};
use hmac::{Hmac, Mac};
use sha2::Sha256;

use super::{Answer, Source};

/// Bytes of derived keys and rendered answers kept at most (weighed roughly:
/// canonical JSON, key, a rendered answer and the entry it renders, and a fixed
/// overhead). An entry with the answer of a typical narrative weighs about 3.6 KiB,
/// so this keeps some 27,000 bodies' answers. Rendered answers are kept per body, not
/// per key: one profile sent with different `userId`s keeps one copy each, each
/// counting the entry's narrative.
pub const MEMO_BYTES: u64 = 96 * 1024 * 1024;
/// How long after its last write an entry is kept, and so the longest a rendered
/// answer is (it is written with it): an erased entry's narrative is gone within
/// this, as an L1 copy on another gateway is within `L1_TTL`. (A kept answer is only
/// sent for the very entry the store answered, so this bounds what memory holds, not
/// what is served.) Deriving a busy body once a minute again costs nothing worth
/// counting.
pub const MEMO_TTL: Duration = Duration::from_secs(60);
/// How often expired entries are freed without waiting for traffic to do it.
pub const TIDY_EVERY: Duration = Duration::from_secs(5);
/// Bodies larger than this are derived each time: profiles are a few hundred bytes.
const LARGEST_BODY: usize = 4096;

/// What deriving a body gave, and the last answer rendered for it.
#[derive(Debug)]
pub struct Derived {
    pub keyed: KeyedProfile,
    /// The keyed hash of the body's `userId`, if it has one.
    pub user_hash: Option<Arc<str>>,
    rendered: ArcSwapOption<Rendered>,
    /// The entry's digest in the memo; `None` for a body the memo does not keep.
    digest: Option<Digest>,
}

/// An answer as it was sent: the bytes, and the entry and source they render.
#[derive(Debug)]
struct Rendered {
    envelope: Arc<Envelope>,
    source: Source,
    bytes: Bytes,
}

impl Derived {
    pub fn new(keyed: KeyedProfile, user_hash: Option<Arc<str>>) -> Self {
        Self {
            keyed,
            user_hash,
            rendered: ArcSwapOption::empty(),
            digest: None,
        }
    }

    /// The bytes last sent for this body, if they render `answer`: the same stored
    /// entry (the same allocation from L1, or equal field by field when read from
    /// Redis again) with the same source.
    pub fn rendered(&self, answer: &Answer) -> Option<Bytes> {
        let guard = self.rendered.load();
        let kept = guard.as_deref()?;
        let same =
            Arc::ptr_eq(&kept.envelope, &answer.envelope) || kept.envelope == answer.envelope;
        (same && kept.source == answer.source).then(|| kept.bytes.clone())
    }

    /// Bytes this entry holds beyond its fixed overhead.
    fn weight(&self) -> usize {
        let rendered = self
            .rendered
            .load()
            .as_deref()
            .map_or(0, |kept| kept.bytes.len() + kept.envelope.body.len());
        self.keyed.canonical_json.len() + self.keyed.key.as_str().len() + rendered
    }
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
        Self::new(MEMO_BYTES, MEMO_TTL)
    }
}

impl BodyMemo {
    /// At most `bytes` (weighed), each entry `ttl` after it was last written.
    pub fn new(bytes: u64, ttl: Duration) -> Self {
        let key: [u8; 32] = rand::random();
        Self {
            entries: moka::sync::Cache::builder()
                .max_capacity(bytes)
                .weigher(|_, derived: &Arc<Derived>| {
                    u32::try_from(derived.weight() + 512).unwrap_or(u32::MAX)
                })
                .time_to_live(ttl)
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
        derive: impl FnOnce() -> Result<Derived, E>,
    ) -> Result<Arc<Derived>, E> {
        if body.len() > LARGEST_BODY {
            return derive().map(Arc::new);
        }
        let digest = self.digest(body);
        if let Some(derived) = self.entries.get(&digest) {
            return Ok(derived);
        }
        let derived = Arc::new(Derived {
            digest: Some(digest),
            ..derive()?
        });
        self.entries.insert(digest, Arc::clone(&derived));
        Ok(derived)
    }

    /// Keeps `bytes`, rendered for `answer`, as the answer last sent for `derived`'s
    /// body, weighed anew (what replaces a kept answer is counted, not a guess).
    pub fn keep_rendered(&self, derived: &Arc<Derived>, answer: &Answer, bytes: Bytes) {
        let Some(digest) = derived.digest else {
            return;
        };
        derived.rendered.store(Some(Arc::new(Rendered {
            envelope: Arc::clone(&answer.envelope),
            source: answer.source,
            bytes,
        })));
        self.entries.insert(digest, Arc::clone(derived));
    }

    /// Frees expired entries (and applies pending evictions) now: without it they
    /// would wait for the memo's next use.
    pub fn tidy(&self) {
        self.entries.run_pending_tasks();
    }

    /// What `body` derived to before, if these exact bytes did.
    #[cfg(test)]
    fn get(&self, body: &[u8]) -> Option<Arc<Derived>> {
        if body.len() > LARGEST_BODY {
            return None;
        }
        self.entries.get(&self.digest(body))
    }

    /// Remembers what `body` derived to, unless it is remembered already.
    #[cfg(test)]
    fn insert(&self, body: &[u8], derived: Derived) {
        let _ = self.get_or_derive(body, || Ok::<_, ()>(derived));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::service::test_support::{self, envelope};
    use cache_core::QuantizationStep;
    use cache_core::{CacheKeySecret, EngineVersion, KeyDeriver, ProfileInput, PromptHash};

    fn derived(body: &[u8]) -> Derived {
        let deriver = KeyDeriver::new(
            &CacheKeySecret::new(b"memo-test-secret-0123".to_vec()),
            EngineVersion::parse("narrative@1.0.0").expect("version"),
            PromptHash::of_parts(&[("test", b"memo")]),
            QuantizationStep::DEFAULT,
        );
        let input = ProfileInput::from_json(body).expect("profile");
        Derived::new(deriver.derive(&input).expect("derives"), None)
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

    fn answer(envelope: &Arc<Envelope>, source: Source) -> Answer {
        test_support::answer(envelope, source, 60)
    }

    fn kept(memo: &BodyMemo, body: &[u8]) -> Arc<Derived> {
        memo.get_or_derive(body, || Ok::<_, ()>(derived(body)))
            .expect("derives")
    }

    #[test]
    fn a_kept_answer_is_sent_only_for_its_entry_and_source() {
        let memo = BodyMemo::default();
        let entry = envelope("first");
        memo.keep_rendered(
            &kept(&memo, LYRA),
            &answer(&entry, Source::Cache),
            Bytes::from_static(b"rendered"),
        );
        // Found again through the memo, as the next request finds it.
        let derived = kept(&memo, LYRA);
        let sent = |envelope: &Arc<Envelope>, source| derived.rendered(&answer(envelope, source));
        assert_eq!(
            sent(&entry, Source::Cache).as_deref(),
            Some(&b"rendered"[..])
        );
        let read_again = Arc::new(Envelope::clone(&entry));
        assert!(
            sent(&read_again, Source::Cache).is_some(),
            "equal field by field: the same entry read from Redis again"
        );
        assert!(sent(&entry, Source::Stale).is_none(), "another source");
        assert!(
            sent(&envelope("second"), Source::Cache).is_none(),
            "another entry"
        );
        assert!(
            kept(&memo, SIRIUS)
                .rendered(&answer(&entry, Source::Cache))
                .is_none(),
            "another body"
        );
    }

    #[test]
    fn a_kept_answer_counts_in_the_memo_bytes() {
        let memo = BodyMemo::default();
        let derived = kept(&memo, LYRA);
        memo.entries.run_pending_tasks();
        let before = memo.entries.weighted_size();
        let entry = envelope(&"n".repeat(3_000));
        memo.keep_rendered(
            &derived,
            &answer(&entry, Source::Cache),
            Bytes::from(vec![b'x'; 10_000]),
        );
        memo.entries.run_pending_tasks();
        assert_eq!(memo.entries.weighted_size() - before, 13_000);
    }

    #[test]
    fn tidying_frees_expired_entries_and_their_answers_without_traffic() {
        let ttl = Duration::from_millis(50);
        let memo = BodyMemo::new(MEMO_BYTES, ttl);
        let entry = envelope("an erased narrative");
        memo.keep_rendered(
            &kept(&memo, LYRA),
            &answer(&entry, Source::Cache),
            Bytes::from_static(b"rendered"),
        );
        memo.tidy();
        assert_eq!(memo.entries.entry_count(), 1);
        // Past the ttl, with no lookup in between: only tidying can free it.
        std::thread::sleep(ttl * 2);
        memo.tidy();
        assert_eq!(memo.entries.entry_count(), 0);
        assert_eq!(memo.entries.weighted_size(), 0);
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
