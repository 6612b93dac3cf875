//! The events, and the batch format they travel in.
//!
//! A batch is binary (v3, [`binary`]) unless `EVENT_BATCH_FORMAT` asks for the binary
//! v2 of the release before (`binary-v2`) or the JSON of the first ones (v1, `json`);
//! v1, v2 and v3 are read, so the `analytics` service is upgraded first and publishers
//! after it (docs/operations.md).
//! Every event has a unique id (UUID v7, so ids of one batch sort by time) fixed before
//! its batch is first published, which is what makes inserting a redelivered batch a
//! no-op. A publisher numbers a batch's request events as a run ([`IdRun`]), so the
//! batch carries one id for all of them.
//! Nothing here identifies a person: the user id arrives only as its keyed hash, and
//! the profile is the canonical one (star systems and Human Design, no birth data).

use std::collections::HashMap;
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use time::OffsetDateTime;
use uuid::Uuid;

/// The batch format this build writes (binary); it reads this one, v2 (binary) and v1
/// (JSON), and refuses versions it does not know.
pub const BATCH_VERSION: u32 = 3;

/// The most request events, and the most generation events, a binary batch holds (a
/// gateway's `EVENT_BATCH_MAX` is at most this). A longer one is refused before its
/// records are read: a v3 record can be 7 bytes and decodes into some 260.
pub const MOST_BATCH_EVENTS: usize = 100_000;

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
    pub const ALL: [Self; 2] = [Self::Ok, Self::Failed];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Ok => "ok",
            Self::Failed => "failed",
        }
    }
}

/// One answered request. Its text fields are shared (`Arc<str>`): the gateway keeps one
/// copy of each version, prompt hash, client name, user hash, key digest and
/// canonical profile, and the publisher's event ([`RequestEventRef::to_event`]) counts
/// references to them instead of allocating eight strings (which its thread would then
/// free). The hit path itself hands sinks a [`RequestEventRef`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RequestEvent {
    pub id: Uuid,
    #[serde(with = "time::serde::rfc3339")]
    pub at: OffsetDateTime,
    pub outcome: RequestOutcome,
    pub latency_us: u64,
    pub engine_version: Arc<str>,
    pub prompt_hash: Arc<str>,
    /// `primary` or `hybrid`.
    pub classification: Arc<str>,
    pub primary_system: Arc<str>,
    /// The API client's name (`anonymous` without client keys).
    pub client: Arc<str>,
    /// The keyed hash of the user id, when the request carried one.
    pub user_hash: Option<Arc<str>>,
    /// The cache key's digest: which entry answered.
    pub key_digest: Arc<str>,
    /// The canonical profile's JSON, for popularity (pre-warming). A v1 (JSON) batch
    /// sends it once per key and leaves it empty elsewhere; a binary batch writes it
    /// once in its string table.
    #[serde(default, skip_serializing_if = "profile_is_empty")]
    pub profile: Arc<str>,
    /// What the answered entry took to generate; a hit saves exactly that.
    pub entry_tokens: u64,
    pub entry_cost_usd: f64,
    /// A streamed answer: microseconds from the request to its first text. Absent for
    /// answers that did not stream (and so from events of earlier releases).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub first_delta_us: Option<u64>,
}

/// A [`RequestEvent`] as the request path hands it to a sink: borrowed, so a sink that
/// only counts it (the in-process aggregate) touches no reference count; a sink that
/// keeps it makes the owned event ([`RequestEventRef::to_event`]). It has no id: the
/// publisher gives one to each event of a batch as it makes the batch.
#[derive(Debug, Clone, Copy)]
pub struct RequestEventRef<'a> {
    pub at: OffsetDateTime,
    pub outcome: RequestOutcome,
    pub latency_us: u64,
    pub engine_version: &'a Arc<str>,
    pub prompt_hash: &'a Arc<str>,
    pub classification: &'a Arc<str>,
    pub primary_system: &'a Arc<str>,
    pub client: &'a Arc<str>,
    pub user_hash: Option<&'a Arc<str>>,
    pub key_digest: &'a Arc<str>,
    pub profile: &'a Arc<str>,
    pub entry_tokens: u64,
    pub entry_cost_usd: f64,
    pub first_delta_us: Option<u64>,
}

impl RequestEventRef<'_> {
    /// The owned event, without an id yet (nil): the publisher numbers it when it joins
    /// a batch ([`Batch::number_requests`]), off the request path.
    pub(crate) fn to_event(self) -> RequestEvent {
        RequestEvent {
            id: Uuid::nil(),
            at: self.at,
            outcome: self.outcome,
            latency_us: self.latency_us,
            engine_version: Arc::clone(self.engine_version),
            prompt_hash: Arc::clone(self.prompt_hash),
            classification: Arc::clone(self.classification),
            primary_system: Arc::clone(self.primary_system),
            client: Arc::clone(self.client),
            user_hash: self.user_hash.cloned(),
            key_digest: Arc::clone(self.key_digest),
            profile: Arc::clone(self.profile),
            entry_tokens: self.entry_tokens,
            entry_cost_usd: self.entry_cost_usd,
            first_delta_us: self.first_delta_us,
        }
    }
}

#[cfg(test)]
impl RequestEvent {
    /// The event borrowed, as a sink takes it (its id is not carried: the publisher
    /// numbers what it keeps).
    pub(crate) fn borrowed(&self) -> RequestEventRef<'_> {
        RequestEventRef {
            at: self.at,
            outcome: self.outcome,
            latency_us: self.latency_us,
            engine_version: &self.engine_version,
            prompt_hash: &self.prompt_hash,
            classification: &self.classification,
            primary_system: &self.primary_system,
            client: &self.client,
            user_hash: self.user_hash.as_ref(),
            key_digest: &self.key_digest,
            profile: &self.profile,
            entry_tokens: self.entry_tokens,
            entry_cost_usd: self.entry_cost_usd,
            first_delta_us: self.first_delta_us,
        }
    }
}

fn profile_is_empty(profile: &Arc<str>) -> bool {
    profile.is_empty()
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
/// `Uuid::now_v7` asks the OS for them on every call.
pub fn new_event_id() -> Uuid {
    event_id_at(OffsetDateTime::now_utc())
}

/// [`new_event_id`] for an event that happened at `at`, read already: the id costs
/// no second reading of the clock.
pub(crate) fn event_id_at(at: OffsetDateTime) -> Uuid {
    let random: [u8; 10] = rand::random();
    uuid::Builder::from_unix_timestamp_millis(unix_millis(at), &random).into_uuid()
}

/// What a UUID v7 of `at` starts with (before 1970: 0).
fn unix_millis(at: OffsetDateTime) -> u64 {
    u64::try_from(at.unix_timestamp_nanos() / 1_000_000).unwrap_or(0)
}

/// The ids of a batch's request events, drawn as a run: the first is a new UUID v7
/// ([`new_event_id`]); the one at `position` after it has its own event's millisecond
/// and the first's random bits with `position` added to their low 62 (see
/// [`id_in_run`]). So a batch sends one id for all its request events (v3), and they
/// still sort by time and differ from each other. Two runs give the same id only if
/// they have events in the same millisecond, their first ids the same 12 high random
/// bits, and their low ones fall within a batch's length of each other among 2^62.
#[derive(Debug, Default)]
pub struct IdRun {
    first: Option<Uuid>,
    position: u64,
}

impl IdRun {
    /// The next event's id, for an event that happened at `at`.
    pub fn next(&mut self, at: OffsetDateTime) -> Uuid {
        let position = self.position;
        self.position += 1;
        match self.first {
            Some(first) => id_in_run(first, at, position),
            None => *self.first.insert(event_id_at(at)),
        }
    }
}

/// The id at `position` in the run that `first` begins ([`IdRun`]), for an event at
/// `at`. Position 0 gives `first` back when `first` is of `at`'s millisecond.
pub(crate) fn id_in_run(first: Uuid, at: OffsetDateTime, position: u64) -> Uuid {
    // The low 62 bits of the last eight bytes are random; the two above them are the
    // variant, kept.
    const RANDOM: u64 = (1 << 62) - 1;
    let mut bytes = first.into_bytes();
    bytes[..6].copy_from_slice(&unix_millis(at).to_be_bytes()[2..]);
    let mut low = [0; 8];
    low.copy_from_slice(&bytes[8..]);
    let low = u64::from_be_bytes(low);
    let counted = (low & !RANDOM) | (low.wrapping_add(position) & RANDOM);
    bytes[8..].copy_from_slice(&counted.to_be_bytes());
    Uuid::from_bytes(bytes)
}

/// A batch of events, as the publisher sends it and the consumer stores it.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Batch {
    pub requests: Vec<RequestEvent>,
    pub generations: Vec<GenerationEvent>,
}

#[derive(Debug, thiserror::Error)]
pub enum BatchError {
    #[error("not an event batch: {0}")]
    Malformed(String),
    #[error("batch format {0} (this build reads JSON v1 and binary v2 and v{BATCH_VERSION})")]
    UnknownVersion(u32),
}

impl Batch {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn len(&self) -> usize {
        self.requests.len() + self.generations.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Gives the request events new ids, as one run ([`IdRun`]): what a publisher
    /// does once to each batch it makes, before its first publish, so a retry sends
    /// the same ids. Never for a batch published or read already: its events would
    /// be stored a second time under new ids.
    pub fn number_requests(&mut self) {
        let mut ids = IdRun::default();
        for event in &mut self.requests {
            event.id = ids.next(event.at);
        }
    }

    /// The batch in the default format: v3, binary (see [`binary`]).
    pub fn to_bytes(&self) -> Vec<u8> {
        self.encode(BatchFormat::Binary)
    }

    /// The batch as releases before v2 wrote it: JSON, each key's profile once.
    pub fn to_json_v1(&self) -> Vec<u8> {
        self.encode(BatchFormat::Json)
    }

    pub fn encode(&self, format: BatchFormat) -> Vec<u8> {
        match format {
            BatchFormat::Binary => binary::encode(self),
            BatchFormat::BinaryV2 => binary::v2::encode(self),
            BatchFormat::Json => json::encode(self),
        }
    }

    /// Reads any format: v3 and v2 by their magic bytes, v1 (JSON) otherwise.
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, BatchError> {
        match bytes.strip_prefix(binary::MAGIC_PREFIX) {
            Some([version, rest @ ..]) if u32::from(*version) == BATCH_VERSION => {
                binary::decode(rest)
            }
            Some([binary::V2, rest @ ..]) => binary::v2::decode(rest),
            Some([version, ..]) => Err(BatchError::UnknownVersion(u32::from(*version))),
            _ => json::decode(bytes),
        }
    }
}

/// Which format a publisher writes (`EVENT_BATCH_FORMAT`). This build reads all three;
/// the choice matters to an `analytics` service of an earlier release: the one before
/// reads v2 and JSON, the first ones JSON alone. `binary-v2` or `json` keeps a fleet's
/// events readable by it before it is upgraded, or while it is rolled back.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum BatchFormat {
    /// v3, the default.
    #[default]
    Binary,
    /// v2: for an `analytics` service of the release before, which reads v2 and v1.
    BinaryV2,
    /// v1.
    Json,
}

impl std::str::FromStr for BatchFormat {
    type Err = &'static str;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        match text {
            "binary" => Ok(Self::Binary),
            "binary-v2" => Ok(Self::BinaryV2),
            "json" => Ok(Self::Json),
            _ => Err("must be binary, binary-v2 or json"),
        }
    }
}

impl BatchFormat {
    /// The message's content type.
    pub fn content_type(self) -> &'static str {
        match self {
            Self::Binary => "application/vnd.narrative-cache.events.v3",
            Self::BinaryV2 => "application/vnd.narrative-cache.events.v2",
            Self::Json => "application/json",
        }
    }
}

/// v1: `{"v": 1, "requests": [...], "generations": [...], "profiles": {...}}`, with
/// each key's canonical profile moved into `profiles` once.
mod json {
    use super::{Arc, Batch, BatchError, Deserialize, GenerationEvent, HashMap, RequestEvent};
    use serde::Serialize;

    #[derive(Serialize, Deserialize)]
    #[serde(deny_unknown_fields)]
    struct JsonBatch {
        v: u32,
        #[serde(default)]
        requests: Vec<RequestEvent>,
        #[serde(default)]
        generations: Vec<GenerationEvent>,
        #[serde(default, skip_serializing_if = "HashMap::is_empty")]
        profiles: HashMap<Arc<str>, Arc<str>>,
    }

    pub(super) fn encode(batch: &Batch) -> Vec<u8> {
        let mut json = JsonBatch {
            v: 1,
            requests: batch.requests.clone(),
            generations: batch.generations.clone(),
            profiles: HashMap::new(),
        };
        for event in &mut json.requests {
            let profile = std::mem::take(&mut event.profile);
            if !profile.is_empty() {
                json.profiles
                    .entry(Arc::clone(&event.key_digest))
                    .or_insert(profile);
            }
        }
        // Strings, numbers and timestamps always serialize.
        serde_json::to_vec(&json).unwrap_or_default()
    }

    pub(super) fn decode(bytes: &[u8]) -> Result<Batch, BatchError> {
        let json: JsonBatch =
            serde_json::from_slice(bytes).map_err(|e| BatchError::Malformed(e.to_string()))?;
        if json.v != 1 {
            return Err(BatchError::UnknownVersion(json.v));
        }
        let mut requests = json.requests;
        for event in &mut requests {
            if event.profile.is_empty() {
                if let Some(profile) = json.profiles.get(&event.key_digest) {
                    event.profile = Arc::clone(profile);
                }
            }
        }
        Ok(Batch {
            requests,
            generations: json.generations,
        })
    }
}

/// The binary formats: `NCB`, a version byte, then a [postcard] record.
///
/// **v3**, written: a table of the batch's distinct strings; a table of the entries its
/// request events were answered from (the six texts that name an entry, as indexes
/// into the strings, and what it cost to generate); the id of the first request event
/// and, when the others are its run ([`super::IdRun`], as a publisher numbers them),
/// nothing more; then each request event as numbers alone: its time after the one
/// before it, outcome, latency, entry, client and user. A gateway's events repeat a
/// few entries and clients, so an event is about 12 bytes, against 50 in v2 and 330
/// in JSON: RabbitMQ's work grows with the bytes it is handed (docs/benchmarks.md).
///
/// **v2**, read (publishers of the release before): the strings, and each event with
/// its own id, time and eight indexes.
///
/// Enums travel by name in the table, so adding or reordering variants never changes
/// what an index means. Every index is checked when read: a batch that names a string
/// or entry it does not carry is malformed.
///
/// [postcard]: https://postcard.jamesmunns.com/wire-format
pub mod binary {
    use std::collections::HashMap;
    use std::sync::Arc;

    use serde::{Deserialize, Serialize};
    use time::OffsetDateTime;
    use uuid::Uuid;

    use super::{
        id_in_run, Batch, BatchError, GenerationEvent, GenerationOutcome, RequestEvent,
        RequestOutcome, Trigger, MOST_BATCH_EVENTS as EVENTS,
    };

    /// The most strings a batch names: nine for each event, and the outcomes.
    const STRINGS: usize = 9 * 2 * EVENTS + 16;

    /// A sequence of at most `N` items, refused as soon as its length says more: the
    /// records are not read, let alone allocated.
    struct Bounded<T, const N: usize>(Vec<T>);

    impl<T, const N: usize> From<Vec<T>> for Bounded<T, N> {
        fn from(items: Vec<T>) -> Self {
            Self(items)
        }
    }

    impl<T, const N: usize> std::ops::Deref for Bounded<T, N> {
        type Target = [T];

        fn deref(&self) -> &[T] {
            &self.0
        }
    }

    impl<T, const N: usize> IntoIterator for Bounded<T, N> {
        type Item = T;
        type IntoIter = std::vec::IntoIter<T>;

        fn into_iter(self) -> Self::IntoIter {
            self.0.into_iter()
        }
    }

    impl<T: Serialize, const N: usize> Serialize for Bounded<T, N> {
        fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
            self.0.serialize(serializer)
        }
    }

    impl<'de, T: Deserialize<'de>, const N: usize> Deserialize<'de> for Bounded<T, N> {
        fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
            struct Items<T, const N: usize>(std::marker::PhantomData<T>);

            impl<'de, T: Deserialize<'de>, const N: usize> serde::de::Visitor<'de> for Items<T, N> {
                type Value = Bounded<T, N>;

                fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                    write!(f, "at most {N} items")
                }

                fn visit_seq<A: serde::de::SeqAccess<'de>>(
                    self,
                    mut seq: A,
                ) -> Result<Self::Value, A::Error> {
                    let length = seq.size_hint().unwrap_or(0);
                    if length > N {
                        return Err(serde::de::Error::invalid_length(length, &self));
                    }
                    let mut items = Vec::with_capacity(length.min(4096));
                    while let Some(item) = seq.next_element()? {
                        if items.len() == N {
                            return Err(serde::de::Error::invalid_length(N + 1, &self));
                        }
                        items.push(item);
                    }
                    Ok(Bounded(items))
                }
            }

            deserializer.deserialize_seq(Items(std::marker::PhantomData))
        }
    }

    /// What a binary batch starts with, before its version byte (JSON cannot start so).
    pub const MAGIC_PREFIX: &[u8] = b"NCB";
    /// The first bytes of a v3 batch.
    pub const MAGIC: &[u8] = b"NCB\x03";
    const _: () = assert!(MAGIC[3] as u32 == super::BATCH_VERSION);
    /// The version byte of the binary format before.
    pub(super) const V2: u8 = 2;

    #[derive(Serialize, Deserialize)]
    struct Wire<'a> {
        #[serde(borrow)]
        strings: Bounded<&'a str, STRINGS>,
        entries: Bounded<EntryRecord, EVENTS>,
        ids: Ids,
        /// The first request event's time; each one's `after_ns` counts from the time
        /// of the one before it.
        first_at_unix_ns: i128,
        requests: Bounded<RequestRecord, EVENTS>,
        generations: Bounded<GenerationRecord, EVENTS>,
    }

    #[derive(Serialize, Deserialize)]
    enum Ids {
        /// The first request event's id; the others are its run.
        Run([u8; 16]),
        /// Every request event's id, in order.
        Listed(Bounded<[u8; 16], EVENTS>),
    }

    /// An entry that answered: each `u32` is an index into the strings.
    #[derive(Serialize, Deserialize)]
    struct EntryRecord {
        engine_version: u32,
        prompt_hash: u32,
        classification: u32,
        primary_system: u32,
        key_digest: u32,
        profile: u32,
        entry_tokens: u64,
        entry_cost_usd: f64,
    }

    /// A [`RequestEvent`] but for its id, and for its entry's facts, which `entry`
    /// indexes; `outcome`, `client` and `user_hash` index the strings.
    #[derive(Serialize, Deserialize)]
    struct RequestRecord {
        /// Negative when two threads' events crossed on their way into the batch.
        after_ns: i128,
        outcome: u32,
        latency_us: u64,
        entry: u32,
        client: u32,
        user_hash: Option<u32>,
        first_delta_us: Option<u64>,
    }

    /// A [`GenerationEvent`], as in v2; each `u32` but `attempts` is an index into the
    /// strings.
    #[derive(Serialize, Deserialize)]
    struct GenerationRecord {
        id: [u8; 16],
        at_unix_ns: i128,
        model: u32,
        tokens_in: u64,
        tokens_out: u64,
        cost_usd: f64,
        duration_ms: u64,
        attempts: u32,
        outcome: u32,
        trigger: u32,
        key_digest: u32,
    }

    /// The string table being written. Events share their strings (`Arc<str>`), so
    /// most lookups are by address; a string seen at a new address is found by its
    /// text, so the table never holds one twice.
    #[derive(Default)]
    struct Strings<'a> {
        table: Vec<&'a str>,
        by_address: HashMap<(usize, usize), u32, foldhash::fast::FixedState>,
        by_text: HashMap<&'a str, u32, foldhash::fast::FixedState>,
    }

    impl<'a> Strings<'a> {
        fn shared(&mut self, text: &'a Arc<str>) -> u32 {
            let address = (text.as_ptr() as usize, text.len());
            if let Some(&index) = self.by_address.get(&address) {
                return index;
            }
            let index = self.text(text);
            self.by_address.insert(address, index);
            index
        }

        fn text(&mut self, text: &'a str) -> u32 {
            if let Some(&index) = self.by_text.get(text) {
                return index;
            }
            // A batch holds at most a few hundred thousand strings.
            let index = u32::try_from(self.table.len()).expect("fewer than 2^32 strings");
            self.table.push(text);
            self.by_text.insert(text, index);
            index
        }
    }

    /// The entry table being written, each entry once.
    #[derive(Default)]
    struct Entries {
        table: Vec<EntryRecord>,
        /// The six string indexes, the tokens and the cost's bits.
        index: HashMap<([u32; 6], u64, u64), u32, foldhash::fast::FixedState>,
    }

    impl Entries {
        fn of<'a>(&mut self, event: &'a RequestEvent, strings: &mut Strings<'a>) -> u32 {
            let texts = [
                strings.shared(&event.engine_version),
                strings.shared(&event.prompt_hash),
                strings.shared(&event.classification),
                strings.shared(&event.primary_system),
                strings.shared(&event.key_digest),
                strings.shared(&event.profile),
            ];
            let key = (texts, event.entry_tokens, event.entry_cost_usd.to_bits());
            let table = &mut self.table;
            *self.index.entry(key).or_insert_with(|| {
                let index = u32::try_from(table.len()).expect("fewer than 2^32 entries");
                let [engine_version, prompt_hash, classification, primary_system, key_digest, profile] =
                    texts;
                table.push(EntryRecord {
                    engine_version,
                    prompt_hash,
                    classification,
                    primary_system,
                    key_digest,
                    profile,
                    entry_tokens: event.entry_tokens,
                    entry_cost_usd: event.entry_cost_usd,
                });
                index
            })
        }
    }

    /// `Run` when every request event's id is the first's run, as a publisher numbers
    /// them; otherwise (events made elsewhere, or an empty batch) `Listed`.
    fn ids(requests: &[RequestEvent]) -> Ids {
        if let Some(first) = requests.first() {
            let is_run = (0..)
                .zip(requests)
                .all(|(position, event)| id_in_run(first.id, event.at, position) == event.id);
            if is_run {
                return Ids::Run(first.id.into_bytes());
            }
        }
        Ids::Listed(
            requests
                .iter()
                .map(|event| event.id.into_bytes())
                .collect::<Vec<_>>()
                .into(),
        )
    }

    fn generation_records<'a>(
        generations: &'a [GenerationEvent],
        strings: &mut Strings<'a>,
    ) -> Vec<GenerationRecord> {
        generations
            .iter()
            .map(|event| GenerationRecord {
                id: event.id.into_bytes(),
                at_unix_ns: event.at.unix_timestamp_nanos(),
                model: strings.text(&event.model),
                tokens_in: event.tokens_in,
                tokens_out: event.tokens_out,
                cost_usd: event.cost_usd,
                duration_ms: event.duration_ms,
                attempts: event.attempts,
                outcome: strings.text(event.outcome.as_str()),
                trigger: strings.text(event.trigger.as_str()),
                key_digest: strings.text(&event.key_digest),
            })
            .collect()
    }

    pub(super) fn encode(batch: &Batch) -> Vec<u8> {
        let mut strings = Strings::default();
        let mut entries = Entries::default();
        let first_at_unix_ns = batch
            .requests
            .first()
            .map_or(0, |event| event.at.unix_timestamp_nanos());
        let mut previous = first_at_unix_ns;
        let requests = batch
            .requests
            .iter()
            .map(|event| {
                let at = event.at.unix_timestamp_nanos();
                // Both within OffsetDateTime's ±10,000 years: far inside i128.
                let after_ns = at - previous;
                previous = at;
                RequestRecord {
                    after_ns,
                    outcome: strings.text(event.outcome.as_str()),
                    latency_us: event.latency_us,
                    entry: entries.of(event, &mut strings),
                    client: strings.shared(&event.client),
                    user_hash: event.user_hash.as_ref().map(|user| strings.shared(user)),
                    first_delta_us: event.first_delta_us,
                }
            })
            .collect();
        let generations = generation_records(&batch.generations, &mut strings);
        let wire = Wire {
            strings: strings.table.into(),
            entries: entries.table.into(),
            ids: ids(&batch.requests),
            first_at_unix_ns,
            requests: Bounded(requests),
            generations: generations.into(),
        };
        // Numbers, byte arrays and strings always serialize into a Vec.
        postcard::to_extend(&wire, MAGIC.to_vec()).unwrap_or_default()
    }

    fn malformed(what: impl std::fmt::Display) -> BatchError {
        BatchError::Malformed(what.to_string())
    }

    fn nothing_after(rest: &[u8]) -> Result<(), BatchError> {
        if rest.is_empty() {
            Ok(())
        } else {
            Err(malformed(format_args!(
                "{} bytes after the batch",
                rest.len()
            )))
        }
    }

    fn at(ns: i128) -> Result<OffsetDateTime, BatchError> {
        OffsetDateTime::from_unix_timestamp_nanos(ns).map_err(malformed)
    }

    /// A batch's strings as read: each one `Arc` its events share.
    struct Table(Vec<Arc<str>>);

    impl Table {
        /// `most`: how many strings the batch's records could name. A table longer
        /// than that is not a batch of ours (and could make a small message cost much
        /// memory, each string being a decoded `Arc`).
        fn read(strings: &[&str], most: usize, events: usize) -> Result<Self, BatchError> {
            if strings.len() > most {
                return Err(malformed(format_args!(
                    "{} strings for {events} events",
                    strings.len()
                )));
            }
            Ok(Self(strings.iter().map(|&text| Arc::from(text)).collect()))
        }

        fn text(&self, index: u32) -> Result<Arc<str>, BatchError> {
            usize::try_from(index)
                .ok()
                .and_then(|i| self.0.get(i))
                .cloned()
                .ok_or_else(|| {
                    malformed(format_args!(
                        "string {index} of a table of {}",
                        self.0.len()
                    ))
                })
        }

        fn named(&self, index: u32, kind: &str) -> Result<Arc<str>, BatchError> {
            self.text(index)
                .map_err(|_| malformed(format_args!("{kind}: no string {index}")))
        }

        fn outcome(&self, index: u32) -> Result<RequestOutcome, BatchError> {
            let outcome = self.named(index, "outcome")?;
            RequestOutcome::ALL
                .into_iter()
                .find(|o| o.as_str() == &*outcome)
                .ok_or_else(|| malformed(format_args!("request outcome {outcome:.32}")))
        }

        fn generations(
            &self,
            records: Bounded<GenerationRecord, EVENTS>,
        ) -> Result<Vec<GenerationEvent>, BatchError> {
            records
                .into_iter()
                .map(|record| {
                    let outcome = self.named(record.outcome, "outcome")?;
                    let trigger = self.named(record.trigger, "trigger")?;
                    Ok(GenerationEvent {
                        id: Uuid::from_bytes(record.id),
                        at: at(record.at_unix_ns)?,
                        model: self.text(record.model)?.to_string(),
                        tokens_in: record.tokens_in,
                        tokens_out: record.tokens_out,
                        cost_usd: record.cost_usd,
                        duration_ms: record.duration_ms,
                        attempts: record.attempts,
                        outcome: GenerationOutcome::ALL
                            .into_iter()
                            .find(|o| o.as_str() == &*outcome)
                            .ok_or_else(|| {
                                malformed(format_args!("generation outcome {outcome:.32}"))
                            })?,
                        trigger: Trigger::ALL
                            .into_iter()
                            .find(|t| t.as_str() == &*trigger)
                            .ok_or_else(|| malformed(format_args!("trigger {trigger:.32}")))?,
                        key_digest: self.text(record.key_digest)?.to_string(),
                    })
                })
                .collect()
        }
    }

    /// An entry as read: its texts resolved once for all the events that name it.
    struct Entry {
        engine_version: Arc<str>,
        prompt_hash: Arc<str>,
        classification: Arc<str>,
        primary_system: Arc<str>,
        key_digest: Arc<str>,
        profile: Arc<str>,
        entry_tokens: u64,
        entry_cost_usd: f64,
    }

    pub(super) fn decode(bytes: &[u8]) -> Result<Batch, BatchError> {
        let (wire, rest): (Wire<'_>, _) = postcard::take_from_bytes(bytes).map_err(malformed)?;
        nothing_after(rest)?;
        let (requests, generations) = (wire.requests.len(), wire.generations.len());
        // Every entry is named by a request event, so there are no more of them.
        if wire.entries.len() > requests {
            return Err(malformed(format_args!(
                "{} entries for {requests} request events",
                wire.entries.len()
            )));
        }
        // An entry names six strings, a request event three more, a generation four.
        let most = 6 * wire.entries.len() + 3 * requests + 4 * generations + 16;
        let strings = Table::read(&wire.strings, most, requests + generations)?;
        let entries = wire
            .entries
            .iter()
            .map(|entry| {
                Ok(Entry {
                    engine_version: strings.text(entry.engine_version)?,
                    prompt_hash: strings.text(entry.prompt_hash)?,
                    classification: strings.text(entry.classification)?,
                    primary_system: strings.text(entry.primary_system)?,
                    key_digest: strings.text(entry.key_digest)?,
                    profile: strings.text(entry.profile)?,
                    entry_tokens: entry.entry_tokens,
                    entry_cost_usd: entry.entry_cost_usd,
                })
            })
            .collect::<Result<Vec<_>, BatchError>>()?;
        if let Ids::Listed(ids) = &wire.ids {
            if ids.len() != requests {
                return Err(malformed(format_args!(
                    "{} ids for {requests} request events",
                    ids.len()
                )));
            }
        }
        let mut batch = Batch::new();
        batch.requests.reserve(requests);
        let mut at_ns = wire.first_at_unix_ns;
        for (position, record) in (0..).zip(wire.requests) {
            at_ns = at_ns
                .checked_add(record.after_ns)
                .ok_or_else(|| malformed("a request event's time overflows"))?;
            let at = at(at_ns)?;
            let id = match &wire.ids {
                Ids::Run(first) => id_in_run(Uuid::from_bytes(*first), at, position),
                // As many as the requests: checked above.
                Ids::Listed(ids) => {
                    Uuid::from_bytes(ids[usize::try_from(position).unwrap_or(usize::MAX)])
                }
            };
            let entry = usize::try_from(record.entry)
                .ok()
                .and_then(|i| entries.get(i))
                .ok_or_else(|| {
                    malformed(format_args!(
                        "entry {} of a table of {}",
                        record.entry,
                        entries.len()
                    ))
                })?;
            batch.requests.push(RequestEvent {
                id,
                at,
                outcome: strings.outcome(record.outcome)?,
                latency_us: record.latency_us,
                engine_version: Arc::clone(&entry.engine_version),
                prompt_hash: Arc::clone(&entry.prompt_hash),
                classification: Arc::clone(&entry.classification),
                primary_system: Arc::clone(&entry.primary_system),
                client: strings.text(record.client)?,
                user_hash: record.user_hash.map(|i| strings.text(i)).transpose()?,
                key_digest: Arc::clone(&entry.key_digest),
                profile: Arc::clone(&entry.profile),
                entry_tokens: entry.entry_tokens,
                entry_cost_usd: entry.entry_cost_usd,
                first_delta_us: record.first_delta_us,
            });
        }
        batch.generations = strings.generations(wire.generations)?;
        Ok(batch)
    }

    /// v2: `NCB\x02`, then the strings, and each request event with its own id, time
    /// and indexes (generations as in v3). Read, for batches of the release before
    /// still queued or from its publishers during an upgrade; written when
    /// `EVENT_BATCH_FORMAT=binary-v2` asks, for an `analytics` service of that release.
    pub(super) mod v2 {
        use serde::{Deserialize, Serialize};
        use uuid::Uuid;

        use super::{
            at, malformed, nothing_after, Batch, BatchError, Bounded, GenerationRecord,
            RequestEvent, Table, EVENTS, MAGIC_PREFIX, STRINGS, V2,
        };

        #[derive(Serialize, Deserialize)]
        pub(super) struct Wire<'a> {
            #[serde(borrow)]
            pub(super) strings: Bounded<&'a str, STRINGS>,
            pub(super) requests: Bounded<RequestRecord, EVENTS>,
            pub(super) generations: Bounded<GenerationRecord, EVENTS>,
        }

        /// Each `u32` is an index into the strings.
        #[derive(Serialize, Deserialize)]
        pub(super) struct RequestRecord {
            pub(super) id: [u8; 16],
            pub(super) at_unix_ns: i128,
            pub(super) outcome: u32,
            pub(super) latency_us: u64,
            pub(super) engine_version: u32,
            pub(super) prompt_hash: u32,
            pub(super) classification: u32,
            pub(super) primary_system: u32,
            pub(super) client: u32,
            pub(super) user_hash: Option<u32>,
            pub(super) key_digest: u32,
            pub(super) profile: u32,
            pub(super) entry_tokens: u64,
            pub(super) entry_cost_usd: f64,
            pub(super) first_delta_us: Option<u64>,
        }

        pub(in crate::event) fn decode(bytes: &[u8]) -> Result<Batch, BatchError> {
            let (wire, rest): (Wire<'_>, _) =
                postcard::take_from_bytes(bytes).map_err(malformed)?;
            nothing_after(rest)?;
            // Each request event names at most nine strings, a generation four.
            let most = 9 * wire.requests.len() + 4 * wire.generations.len() + 16;
            let events = wire.requests.len() + wire.generations.len();
            let strings = Table::read(&wire.strings, most, events)?;
            let mut batch = Batch::new();
            batch.requests.reserve(wire.requests.len());
            for record in wire.requests {
                batch.requests.push(RequestEvent {
                    id: Uuid::from_bytes(record.id),
                    at: at(record.at_unix_ns)?,
                    outcome: strings.outcome(record.outcome)?,
                    latency_us: record.latency_us,
                    engine_version: strings.text(record.engine_version)?,
                    prompt_hash: strings.text(record.prompt_hash)?,
                    classification: strings.text(record.classification)?,
                    primary_system: strings.text(record.primary_system)?,
                    client: strings.text(record.client)?,
                    user_hash: record.user_hash.map(|i| strings.text(i)).transpose()?,
                    key_digest: strings.text(record.key_digest)?,
                    profile: strings.text(record.profile)?,
                    entry_tokens: record.entry_tokens,
                    entry_cost_usd: record.entry_cost_usd,
                    first_delta_us: record.first_delta_us,
                });
            }
            batch.generations = strings.generations(wire.generations)?;
            Ok(batch)
        }

        /// A v2 batch, as the release before wrote it.
        pub(in crate::event) fn encode(batch: &Batch) -> Vec<u8> {
            let mut strings = super::Strings::default();
            let requests = batch
                .requests
                .iter()
                .map(|event| RequestRecord {
                    id: event.id.into_bytes(),
                    at_unix_ns: event.at.unix_timestamp_nanos(),
                    outcome: strings.text(event.outcome.as_str()),
                    latency_us: event.latency_us,
                    engine_version: strings.shared(&event.engine_version),
                    prompt_hash: strings.shared(&event.prompt_hash),
                    classification: strings.shared(&event.classification),
                    primary_system: strings.shared(&event.primary_system),
                    client: strings.shared(&event.client),
                    user_hash: event.user_hash.as_ref().map(|user| strings.shared(user)),
                    key_digest: strings.shared(&event.key_digest),
                    profile: strings.shared(&event.profile),
                    entry_tokens: event.entry_tokens,
                    entry_cost_usd: event.entry_cost_usd,
                    first_delta_us: event.first_delta_us,
                })
                .collect();
            let generations = super::generation_records(&batch.generations, &mut strings);
            let wire = Wire {
                strings: strings.table.into(),
                requests: Bounded(requests),
                generations: generations.into(),
            };
            let magic = [MAGIC_PREFIX, &[V2]].concat();
            postcard::to_extend(&wire, magic).unwrap_or_default()
        }
    }

    #[cfg(test)]
    mod tests {
        use super::*;

        fn entry(text: u32) -> EntryRecord {
            EntryRecord {
                engine_version: text,
                prompt_hash: 1,
                classification: 1,
                primary_system: 1,
                key_digest: 1,
                profile: 1,
                entry_tokens: 0,
                entry_cost_usd: 0.0,
            }
        }

        fn record(entry: u32) -> RequestRecord {
            RequestRecord {
                after_ns: 0,
                outcome: 0,
                latency_us: 1,
                entry,
                client: 1,
                user_hash: None,
                first_delta_us: None,
            }
        }

        fn read(
            strings: Vec<&str>,
            entries: Vec<EntryRecord>,
            requests: Vec<RequestRecord>,
            ids: Ids,
        ) -> Result<Batch, BatchError> {
            let wire = Wire {
                strings: strings.into(),
                entries: entries.into(),
                ids,
                first_at_unix_ns: 1,
                requests: requests.into(),
                generations: Vec::new().into(),
            };
            decode(&postcard::to_allocvec(&wire).unwrap())
        }

        fn run() -> Ids {
            Ids::Run([7; 16])
        }

        fn listed(count: usize) -> Ids {
            Ids::Listed(vec![[7; 16]; count].into())
        }

        fn v2_record(index: u32) -> v2::RequestRecord {
            v2::RequestRecord {
                id: [7; 16],
                at_unix_ns: 0,
                outcome: 0,
                latency_us: 1,
                engine_version: index,
                prompt_hash: 1,
                classification: 1,
                primary_system: 1,
                client: 1,
                user_hash: None,
                key_digest: 1,
                profile: 1,
                entry_tokens: 0,
                entry_cost_usd: 0.0,
                first_delta_us: None,
            }
        }

        fn read_v2(
            strings: Vec<&str>,
            requests: Vec<v2::RequestRecord>,
        ) -> Result<Batch, BatchError> {
            let wire = v2::Wire {
                strings: strings.into(),
                requests: requests.into(),
                generations: Vec::new().into(),
            };
            v2::decode(&postcard::to_allocvec(&wire).unwrap())
        }

        fn says(result: Result<Batch, BatchError>, what: &str) {
            let error = result.unwrap_err();
            assert!(error.to_string().contains(what), "{error}, not {what}");
        }

        #[test]
        fn an_index_past_a_table_is_malformed() {
            let strings = || vec!["hit_l1", "x"];
            let batch = read(strings(), vec![entry(1)], vec![record(0)], run()).unwrap();
            assert_eq!(batch.requests[0].engine_version.as_ref(), "x");
            let wrong = read(strings(), vec![entry(2)], vec![record(0)], run());
            says(wrong, "string 2 of a table of 2");
            says(
                read(strings(), vec![entry(1)], vec![record(1)], run()),
                "entry 1 of a table of 1",
            );
            says(
                read(vec!["hit_l3", "x"], vec![entry(1)], vec![record(0)], run()),
                "hit_l3",
            );
            // v2, as the release before wrote it.
            let batch = read_v2(strings(), vec![v2_record(1)]).unwrap();
            assert_eq!(batch.requests[0].engine_version.as_ref(), "x");
            says(
                read_v2(strings(), vec![v2_record(2)]),
                "string 2 of a table of 2",
            );
            says(read_v2(vec!["hit_l3", "x"], vec![v2_record(1)]), "hit_l3");
        }

        #[test]
        fn tables_longer_than_their_events_could_name_are_malformed() {
            says(
                read(vec![""; 100_000], Vec::new(), Vec::new(), listed(0)),
                "100000 strings for 0 events",
            );
            says(
                read_v2(vec![""; 100_000], Vec::new()),
                "100000 strings for 0 events",
            );
            let strings = || vec!["hit_l1", "x"];
            says(
                read(strings(), vec![entry(1), entry(1)], vec![record(0)], run()),
                "2 entries for 1 request events",
            );
            says(
                read(strings(), vec![entry(1)], vec![record(0)], listed(0)),
                "0 ids for 1 request events",
            );
            assert!(read(strings(), vec![entry(1)], vec![record(0)], listed(1)).is_ok());
        }

        #[test]
        fn a_batch_longer_than_the_most_events_is_refused_before_its_records_are_read() {
            // A v3 batch whose request list says 100,001 records and holds none.
            let mut bytes = postcard::to_allocvec(&(
                Vec::<&str>::new(),
                Vec::<EntryRecord>::new(),
                listed(0),
                0i128,
            ))
            .unwrap();
            bytes.extend(postcard::to_allocvec(&(EVENTS + 1)).unwrap());
            assert!(matches!(decode(&bytes), Err(BatchError::Malformed(_))));
            // At the bound, the length is taken and the missing records are what fails.
            bytes.truncate(bytes.len() - postcard::to_allocvec(&(EVENTS + 1)).unwrap().len());
            bytes.extend(postcard::to_allocvec(&EVENTS).unwrap());
            assert!(matches!(decode(&bytes), Err(BatchError::Malformed(_))));
            let mut v2 = postcard::to_allocvec(&Vec::<&str>::new()).unwrap();
            v2.extend(postcard::to_allocvec(&(EVENTS + 1)).unwrap());
            assert!(matches!(v2::decode(&v2), Err(BatchError::Malformed(_))));
        }

        #[test]
        fn a_time_past_the_calendar_is_malformed() {
            let mut late = record(0);
            late.after_ns = i128::MAX;
            says(
                read(vec!["hit_l1", "x"], vec![entry(1)], vec![late], run()),
                "time overflows",
            );
            let mut late = record(0);
            late.after_ns = i128::MAX / 2;
            let result = read(vec!["hit_l1", "x"], vec![entry(1)], vec![late], run());
            assert!(matches!(result, Err(BatchError::Malformed(_))));
        }

        #[test]
        fn numbered_ids_travel_as_a_run_and_others_are_listed() {
            let mut batch = super::super::tests::mixed_batch();
            assert!(matches!(ids(&batch.requests), Ids::Listed(ids) if ids.len() == 6));
            batch.number_requests();
            assert!(
                matches!(ids(&batch.requests), Ids::Run(first) if first == batch.requests[0].id.into_bytes())
            );
            // One id changed after numbering: the batch lists them all, and reads back.
            batch.requests[3].id = Uuid::now_v7();
            assert!(matches!(ids(&batch.requests), Ids::Listed(_)));
            assert_eq!(decode(&encode(&batch)[MAGIC.len()..]).unwrap(), batch);
            assert!(matches!(ids(&[]), Ids::Listed(ids) if ids.is_empty()));
        }
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
            engine_version: "narrative@1.0.0".into(),
            prompt_hash: "abcd".into(),
            classification: "primary".into(),
            primary_system: system.into(),
            client: "anonymous".into(),
            user_hash: None,
            key_digest: "d1".into(),
            profile: format!("{{\"primary\":\"{system}\"}}").into(),
            entry_tokens: 700,
            entry_cost_usd: 0.002,
            first_delta_us: None,
        }
    }

    fn generation(outcome: GenerationOutcome, trigger: Trigger) -> GenerationEvent {
        GenerationEvent {
            id: new_event_id(),
            at: OffsetDateTime::now_utc(),
            model: "gpt-sim".to_owned(),
            tokens_in: 300,
            tokens_out: 400,
            cost_usd: 0.0125,
            duration_ms: 2_500,
            attempts: 2,
            outcome,
            trigger,
            key_digest: "d1".to_owned(),
        }
    }

    /// Every outcome and trigger, users and none, streamed and not, two keys, and an
    /// event with no profile.
    pub(crate) fn mixed_batch() -> Batch {
        let mut batch = Batch::new();
        for (i, outcome) in RequestOutcome::ALL.into_iter().enumerate() {
            let mut event = request(outcome, if i % 2 == 0 { "Sirius" } else { "Lyra" });
            if i % 2 == 1 {
                event.key_digest = "d2".into();
                event.user_hash = Some(format!("u{i}").into());
                event.first_delta_us = Some(1_234);
            }
            batch.requests.push(event);
        }
        // An event without a profile, alone on its key: v1 would give it the profile
        // of another event of its key (profiles travel once per key there), v2 not.
        batch.requests[2].profile = "".into();
        batch.requests[2].key_digest = "d3".into();
        for outcome in GenerationOutcome::ALL {
            for trigger in Trigger::ALL {
                batch.generations.push(generation(outcome, trigger));
            }
        }
        batch
    }

    #[test]
    fn every_format_reads_back_every_field() {
        let mut batch = mixed_batch();
        // Ids drawn one by one (not a run), then numbered as a publisher does.
        for numbered in [false, true] {
            if numbered {
                batch.number_requests();
            }
            let binary = batch.to_bytes();
            assert!(binary.starts_with(binary::MAGIC));
            assert_eq!(Batch::from_bytes(&binary).unwrap(), batch);
            let v2 = binary::v2::encode(&batch);
            assert!(v2.starts_with(b"NCB\x02"));
            assert_eq!(Batch::from_bytes(&v2).unwrap(), batch);
            let json = batch.to_json_v1();
            assert!(json.starts_with(b"{"));
            assert_eq!(Batch::from_bytes(&json).unwrap(), batch);
        }
    }

    #[test]
    fn a_run_of_ids_is_distinct_time_ordered_uuid_v7s() {
        let start = OffsetDateTime::now_utc();
        let at = |i: i64| start + time::Duration::microseconds(i * 50);
        let mut ids = IdRun::default();
        let run: Vec<Uuid> = (0..10_000).map(|i| ids.next(at(i))).collect();
        assert_eq!(
            run.iter().collect::<std::collections::HashSet<_>>().len(),
            run.len()
        );
        assert!(run.windows(2).all(|pair| pair[0] < pair[1]));
        let millis = |id: &Uuid| {
            let mut bytes = [0; 8];
            bytes[2..].copy_from_slice(&id.as_bytes()[..6]);
            u64::from_be_bytes(bytes)
        };
        for (i, id) in (0..).zip(&run) {
            assert_eq!(id.get_version(), Some(uuid::Version::SortRand));
            assert_eq!(id.get_variant(), uuid::Variant::RFC4122);
            // Each id carries its own event's millisecond.
            assert_eq!(millis(id), unix_millis(at(i)));
        }
        // Two runs begun at the same instant share no id.
        let mut other = IdRun::default();
        let second: std::collections::HashSet<Uuid> = (0..10_000)
            .map(|i| other.next(start + time::Duration::microseconds(i * 50)))
            .collect();
        assert!(run.iter().all(|id| !second.contains(id)));
    }

    #[test]
    fn unknown_versions_and_malformed_batches_are_refused() {
        let json = mixed_batch().to_json_v1();
        let mut other: serde_json::Value = serde_json::from_slice(&json).unwrap();
        other["v"] = 2.into();
        let error = Batch::from_bytes(other.to_string().as_bytes()).unwrap_err();
        assert!(matches!(error, BatchError::UnknownVersion(2)), "{error}");
        let mut next = mixed_batch().to_bytes();
        next[3] = 4;
        let error = Batch::from_bytes(&next).unwrap_err();
        assert!(matches!(error, BatchError::UnknownVersion(4)), "{error}");
        assert!(matches!(
            Batch::from_bytes(b"{\"v\":1,\"requests\":[{}]}"),
            Err(BatchError::Malformed(_))
        ));
        // Something after the batch, or a second one glued to it: refused.
        let mut glued = mixed_batch().to_bytes();
        glued.extend_from_slice(&mixed_batch().to_bytes()[binary::MAGIC.len()..]);
        let error = Batch::from_bytes(&glued).unwrap_err();
        assert!(
            error.to_string().contains("bytes after the batch"),
            "{error}"
        );
        // Cut anywhere, a binary batch of either version is refused, never misread.
        let mut numbered = mixed_batch();
        numbered.number_requests();
        for whole in [
            mixed_batch().to_bytes(),
            numbered.to_bytes(),
            numbered.encode(BatchFormat::BinaryV2),
        ] {
            for end in binary::MAGIC.len()..whole.len() {
                assert!(
                    matches!(
                        Batch::from_bytes(&whole[..end]),
                        Err(BatchError::Malformed(_))
                    ),
                    "cut at {end} of {}",
                    whole.len()
                );
            }
        }
    }

    #[test]
    fn a_binary_batch_writes_each_string_once() {
        let mut batch = Batch::new();
        for i in 0..1_000 {
            let mut event = request(RequestOutcome::HitL1, "Sirius");
            // Equal strings in separate allocations, as events of different memo
            // entries carry them: still one copy in the table.
            event.profile = String::from("{\"primary\":\"Sirius\",\"unique\":1}").into();
            event.key_digest = if i % 2 == 0 { "d1" } else { "d2" }.into();
            batch.requests.push(event);
        }
        batch.number_requests();
        let binary = batch.to_bytes();
        let json = batch.to_json_v1();
        let count = |bytes: &[u8], text: &str| {
            bytes
                .windows(text.len())
                .filter(|w| *w == text.as_bytes())
                .count()
        };
        assert_eq!(count(&binary, "\"unique\":1"), 1);
        assert_eq!(count(&binary, "narrative@1.0.0"), 1);
        assert_eq!(count(&binary, "hit_l1"), 1);
        // The ids as one run, each entry once: an event is a dozen bytes or so.
        assert!(
            binary.len() < 16 * batch.requests.len(),
            "{} bytes for {} events",
            binary.len(),
            batch.requests.len()
        );
        assert!(
            binary.len() * 20 < json.len(),
            "binary {} bytes, JSON {}",
            binary.len(),
            json.len()
        );
        assert_eq!(Batch::from_bytes(&binary).unwrap(), batch);
    }

    proptest::proptest! {
        /// Any strings (NUL and non-ASCII included), numbers, options and times (in
        /// any order, across the whole calendar) read back, in v3 and v2, with ids
        /// drawn one by one or numbered as a run.
        #[test]
        fn any_binary_batch_reads_back(
            texts in proptest::collection::vec(".{0,40}", 7),
            user in proptest::option::of(".{0,20}"),
            numbers in proptest::array::uniform4(proptest::num::u64::ANY),
            cost in -1e12f64..1e12,
            first_delta in proptest::option::of(proptest::num::u64::ANY),
            at_ns in -377_705_116_800_000_000_000i128..253_402_300_800_000_000_000,
            later_ns in -377_705_116_800_000_000_000i128..253_402_300_800_000_000_000,
            outcome in 0..RequestOutcome::ALL.len(),
            numbered in proptest::bool::ANY,
        ) {
            let mut event = request(RequestOutcome::ALL[outcome], &texts[0]);
            event.at = OffsetDateTime::from_unix_timestamp_nanos(at_ns).unwrap();
            event.engine_version = texts[1].as_str().into();
            event.prompt_hash = texts[2].as_str().into();
            event.classification = texts[3].as_str().into();
            event.client = texts[4].as_str().into();
            event.key_digest = texts[5].as_str().into();
            event.profile = texts[6].as_str().into();
            event.user_hash = user.map(Into::into);
            event.latency_us = numbers[0];
            event.entry_tokens = numbers[1];
            event.entry_cost_usd = cost;
            event.first_delta_us = first_delta;
            let mut made = generation(GenerationOutcome::Failed, Trigger::Prewarm);
            made.model.clone_from(&texts[6]);
            made.tokens_in = numbers[2];
            made.duration_ms = numbers[3];
            let mut later = event.clone();
            later.at = OffsetDateTime::from_unix_timestamp_nanos(later_ns).unwrap();
            later.outcome = RequestOutcome::ALL[(outcome + 1) % RequestOutcome::ALL.len()];
            later.entry_tokens = numbers[2];
            let mut batch = Batch {
                requests: vec![event.clone(), later, event],
                generations: vec![made],
            };
            if numbered {
                batch.number_requests();
            }
            proptest::prop_assert_eq!(&Batch::from_bytes(&batch.to_bytes()).unwrap(), &batch);
            proptest::prop_assert_eq!(Batch::from_bytes(&binary::v2::encode(&batch)).unwrap(), batch);
        }
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
