//! The events, and the batch format they travel in.
//!
//! A batch is binary (v2, [`binary`]) unless `EVENT_BATCH_FORMAT=json` asks for the
//! JSON of earlier releases (v1); both are read, so the `analytics` service is upgraded
//! first and publishers after it (docs/operations.md).
//! Every event has a unique id (UUID v7, so ids of one batch sort by time) fixed where
//! it happened, which is what makes inserting a redelivered batch a no-op.
//! Nothing here identifies a person: the user id arrives only as its keyed hash, and
//! the profile is the canonical one (star systems and Human Design, no birth data).

use std::collections::HashMap;
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use time::OffsetDateTime;
use uuid::Uuid;

/// The batch format this build writes (binary); it reads this one and v1 (JSON), and
/// refuses versions it does not know.
pub const BATCH_VERSION: u32 = 2;

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
    /// sends it once per key and leaves it empty elsewhere; a v2 batch writes it once
    /// in its string table.
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
/// only counts it (the in-process aggregate) touches no reference count and draws no
/// id; a sink that keeps it makes the owned event ([`RequestEventRef::to_event`]).
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
    /// The owned event, with a new id.
    pub fn to_event(&self) -> RequestEvent {
        RequestEvent {
            id: event_id_at(self.at),
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
    /// The event borrowed, as a sink takes it (its id is not carried: a sink that
    /// keeps it draws its own).
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
/// `Uuid::now_v7` asks the OS for them on every call, a cost on the request path.
pub fn new_event_id() -> Uuid {
    event_id_at(OffsetDateTime::now_utc())
}

/// [`new_event_id`] for an event that happened at `at`, read already: the id costs
/// no second reading of the clock.
pub(crate) fn event_id_at(at: OffsetDateTime) -> Uuid {
    let millis = u64::try_from(at.unix_timestamp_nanos() / 1_000_000).unwrap_or(0);
    let random: [u8; 10] = rand::random();
    uuid::Builder::from_unix_timestamp_millis(millis, &random).into_uuid()
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
    #[error("batch format {0} (this build reads JSON v1 and binary v{BATCH_VERSION})")]
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

    /// The batch in the default format: v2, binary (see [`binary`]).
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
            BatchFormat::Json => json::encode(self),
        }
    }

    /// Reads either format: v2 by its magic bytes, v1 (JSON) otherwise.
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, BatchError> {
        match bytes.strip_prefix(binary::MAGIC_PREFIX) {
            Some([version, rest @ ..]) if u32::from(*version) == BATCH_VERSION => {
                binary::decode(rest)
            }
            Some([version, ..]) => Err(BatchError::UnknownVersion(u32::from(*version))),
            _ => json::decode(bytes),
        }
    }
}

/// Which format a publisher writes (`EVENT_BATCH_FORMAT`). This build reads both;
/// the choice matters to an `analytics` service of an earlier release, which reads
/// JSON alone: `json` keeps a fleet's events readable by it before it is upgraded,
/// or while it is rolled back.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum BatchFormat {
    /// v2, the default.
    #[default]
    Binary,
    /// v1.
    Json,
}

impl std::str::FromStr for BatchFormat {
    type Err = &'static str;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        match text {
            "binary" => Ok(Self::Binary),
            "json" => Ok(Self::Json),
            _ => Err("must be binary or json"),
        }
    }
}

impl BatchFormat {
    /// The message's content type.
    pub fn content_type(self) -> &'static str {
        match self {
            Self::Binary => "application/vnd.narrative-cache.events.v2",
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

/// v2: `NCB\x02`, then a [postcard] record: a table of the batch's distinct strings,
/// and each event as numbers and indexes into it.
///
/// An event repeats the few strings of its batch (one engine version, one prompt,
/// a few clients, systems and keys, the outcome's name), so each is written once per
/// batch and an event is about 50 bytes instead of JSON's 330: less to encode on the
/// gateway, less for RabbitMQ to store. Enums travel by name in the table, so adding
/// or reordering variants never changes what an index means. Every index is checked
/// when read: a batch that names a string it does not carry is malformed.
///
/// [postcard]: https://postcard.jamesmunns.com/wire-format
pub mod binary {
    use std::collections::HashMap;
    use std::sync::Arc;

    use serde::{Deserialize, Serialize};
    use time::OffsetDateTime;
    use uuid::Uuid;

    use super::{
        Batch, BatchError, GenerationEvent, GenerationOutcome, RequestEvent, RequestOutcome,
        Trigger,
    };

    /// What a binary batch starts with, before its version byte (JSON cannot start so).
    pub const MAGIC_PREFIX: &[u8] = b"NCB";
    /// The first bytes of a v2 batch.
    pub const MAGIC: &[u8] = b"NCB\x02";
    const _: () = assert!(MAGIC[3] as u32 == super::BATCH_VERSION);

    #[derive(Serialize, Deserialize)]
    struct Wire<'a> {
        #[serde(borrow)]
        strings: Vec<&'a str>,
        requests: Vec<RequestRecord>,
        generations: Vec<GenerationRecord>,
    }

    /// A [`RequestEvent`]; each `u32` but the id's is an index into the strings.
    #[derive(Serialize, Deserialize)]
    struct RequestRecord {
        id: [u8; 16],
        at_unix_ns: i128,
        outcome: u32,
        latency_us: u64,
        engine_version: u32,
        prompt_hash: u32,
        classification: u32,
        primary_system: u32,
        client: u32,
        user_hash: Option<u32>,
        key_digest: u32,
        profile: u32,
        entry_tokens: u64,
        entry_cost_usd: f64,
        first_delta_us: Option<u64>,
    }

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

    pub(super) fn encode(batch: &Batch) -> Vec<u8> {
        let mut strings = Strings::default();
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
        let generations = batch
            .generations
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
            .collect();
        let wire = Wire {
            strings: strings.table,
            requests,
            generations,
        };
        // Numbers, byte arrays and strings always serialize into a Vec.
        postcard::to_extend(&wire, MAGIC.to_vec()).unwrap_or_default()
    }

    fn malformed(what: impl std::fmt::Display) -> BatchError {
        BatchError::Malformed(what.to_string())
    }

    pub(super) fn decode(bytes: &[u8]) -> Result<Batch, BatchError> {
        let (wire, rest): (Wire<'_>, _) = postcard::take_from_bytes(bytes).map_err(malformed)?;
        if !rest.is_empty() {
            return Err(malformed(format_args!(
                "{} bytes after the batch",
                rest.len()
            )));
        }
        // Each event names at most nine strings and every string costs a decoded
        // `Arc`: a table longer than its events could name is not a batch of ours
        // (and could make a small message cost much memory).
        let most = 9 * wire.requests.len() + 4 * wire.generations.len() + 16;
        if wire.strings.len() > most {
            return Err(malformed(format_args!(
                "{} strings for {} events",
                wire.strings.len(),
                wire.requests.len() + wire.generations.len()
            )));
        }
        let strings: Vec<Arc<str>> = wire.strings.iter().map(|&text| Arc::from(text)).collect();
        let text = |index: u32| -> Result<Arc<str>, BatchError> {
            usize::try_from(index)
                .ok()
                .and_then(|i| strings.get(i))
                .cloned()
                .ok_or_else(|| {
                    malformed(format_args!(
                        "string {index} of a table of {}",
                        strings.len()
                    ))
                })
        };
        let named = |index: u32, kind: &str| -> Result<Arc<str>, BatchError> {
            text(index).map_err(|_| malformed(format_args!("{kind}: no string {index}")))
        };
        let at = |ns: i128| OffsetDateTime::from_unix_timestamp_nanos(ns).map_err(malformed);
        let mut batch = Batch::new();
        batch.requests.reserve(wire.requests.len());
        for record in wire.requests {
            let outcome = named(record.outcome, "outcome")?;
            batch.requests.push(RequestEvent {
                id: Uuid::from_bytes(record.id),
                at: at(record.at_unix_ns)?,
                outcome: RequestOutcome::ALL
                    .into_iter()
                    .find(|o| o.as_str() == &*outcome)
                    .ok_or_else(|| malformed(format_args!("request outcome {outcome:.32}")))?,
                latency_us: record.latency_us,
                engine_version: text(record.engine_version)?,
                prompt_hash: text(record.prompt_hash)?,
                classification: text(record.classification)?,
                primary_system: text(record.primary_system)?,
                client: text(record.client)?,
                user_hash: record.user_hash.map(&text).transpose()?,
                key_digest: text(record.key_digest)?,
                profile: text(record.profile)?,
                entry_tokens: record.entry_tokens,
                entry_cost_usd: record.entry_cost_usd,
                first_delta_us: record.first_delta_us,
            });
        }
        batch.generations.reserve(wire.generations.len());
        for record in wire.generations {
            let outcome = named(record.outcome, "outcome")?;
            let trigger = named(record.trigger, "trigger")?;
            batch.generations.push(GenerationEvent {
                id: Uuid::from_bytes(record.id),
                at: at(record.at_unix_ns)?,
                model: text(record.model)?.to_string(),
                tokens_in: record.tokens_in,
                tokens_out: record.tokens_out,
                cost_usd: record.cost_usd,
                duration_ms: record.duration_ms,
                attempts: record.attempts,
                outcome: GenerationOutcome::ALL
                    .into_iter()
                    .find(|o| o.as_str() == &*outcome)
                    .ok_or_else(|| malformed(format_args!("generation outcome {outcome:.32}")))?,
                trigger: Trigger::ALL
                    .into_iter()
                    .find(|t| t.as_str() == &*trigger)
                    .ok_or_else(|| malformed(format_args!("trigger {trigger:.32}")))?,
                key_digest: text(record.key_digest)?.to_string(),
            });
        }
        Ok(batch)
    }

    #[cfg(test)]
    mod tests {
        use super::*;

        #[test]
        fn an_index_past_the_string_table_is_malformed() {
            let record = |index| RequestRecord {
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
            };
            let read = |index, outcome: &str| {
                let wire = Wire {
                    strings: vec![outcome, "x"],
                    requests: vec![record(index)],
                    generations: Vec::new(),
                };
                decode(&postcard::to_allocvec(&wire).unwrap())
            };
            assert_eq!(
                read(1, "hit_l1").unwrap().requests[0]
                    .engine_version
                    .as_ref(),
                "x"
            );
            let error = read(2, "hit_l1").unwrap_err();
            assert!(
                error.to_string().contains("string 2 of a table of 2"),
                "{error}"
            );
            let error = read(1, "hit_l3").unwrap_err();
            assert!(error.to_string().contains("hit_l3"), "{error}");
        }

        #[test]
        fn a_table_longer_than_its_events_could_name_is_malformed() {
            let wire = Wire {
                strings: vec![""; 100_000],
                requests: Vec::new(),
                generations: Vec::new(),
            };
            let error = decode(&postcard::to_allocvec(&wire).unwrap()).unwrap_err();
            assert!(
                error.to_string().contains("100000 strings for 0 events"),
                "{error}"
            );
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
    fn mixed_batch() -> Batch {
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
    fn both_formats_read_back_every_field() {
        let batch = mixed_batch();
        let binary = batch.to_bytes();
        assert!(binary.starts_with(binary::MAGIC));
        assert_eq!(Batch::from_bytes(&binary).unwrap(), batch);
        let json = batch.to_json_v1();
        assert!(json.starts_with(b"{"));
        assert_eq!(Batch::from_bytes(&json).unwrap(), batch);
    }

    #[test]
    fn unknown_versions_and_malformed_batches_are_refused() {
        let json = mixed_batch().to_json_v1();
        let mut other: serde_json::Value = serde_json::from_slice(&json).unwrap();
        other["v"] = 2.into();
        let error = Batch::from_bytes(other.to_string().as_bytes()).unwrap_err();
        assert!(matches!(error, BatchError::UnknownVersion(2)), "{error}");
        let mut next = mixed_batch().to_bytes();
        next[3] = 3;
        let error = Batch::from_bytes(&next).unwrap_err();
        assert!(matches!(error, BatchError::UnknownVersion(3)), "{error}");
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
        // Cut anywhere, a binary batch is refused, never misread.
        let whole = mixed_batch().to_bytes();
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
        assert!(
            binary.len() * 5 < json.len(),
            "binary {} bytes, JSON {}",
            binary.len(),
            json.len()
        );
        assert_eq!(Batch::from_bytes(&binary).unwrap(), batch);
    }

    proptest::proptest! {
        /// Any strings (NUL and non-ASCII included), numbers and options read back.
        #[test]
        fn any_binary_batch_reads_back(
            texts in proptest::collection::vec(".{0,40}", 7),
            user in proptest::option::of(".{0,20}"),
            numbers in proptest::array::uniform4(proptest::num::u64::ANY),
            cost in -1e12f64..1e12,
            first_delta in proptest::option::of(proptest::num::u64::ANY),
            at_ns in -377_705_116_800_000_000_000i128..253_402_300_800_000_000_000,
            outcome in 0..RequestOutcome::ALL.len(),
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
            let batch = Batch { requests: vec![event.clone(), event], generations: vec![made] };
            proptest::prop_assert_eq!(Batch::from_bytes(&batch.to_bytes()).unwrap(), batch);
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
