//! The cache's domain, shared by every service, with nothing of Redis in it.
//!
//! **The domain.** A request body becomes a [`ProfileInput`] (`profile`), which
//! validates into a [`CanonicalProfile`] with percentages quantized to a
//! [`QuantizationStep`] (`quantize`) and Human Design values in their canonical spelling
//! (`vocabulary`). A [`KeyDeriver`] (`key`) turns the canonical JSON into a [`CacheKey`]
//! `narr:<engineVersion>:<promptHash>:{<hmac>}`. Narratives are [`Envelope`]s
//! (`envelope`); concurrent misses for one key in a process are coalesced by
//! [`SingleFlight`] (`single_flight`); the text of a generation still being written is a
//! [`LiveText`] per key that every streaming request reads (`live`).
//!
//! **The stores.** `store` is the [`CacheStore`] trait with its in-memory and tiered
//! (L1 in front of a shared store) implementations, and [`CoalescedReads`] (concurrent
//! reads of one key share one read of the store behind); `user_index` is the [`UserIndex`]
//! trait (which keys each hashed user asked for) with its in-memory one. Their Redis
//! implementations, and the rest of the Redis side (connection and breaker, codec,
//! fill lock, signals), are the `cache-redis` crate: services that never talk to
//! Redis (analytics, the LLM simulator) do not link it, nor AES.
//!
//! **For every binary.** `config` reads settings from the environment, `telemetry`
//! sets up logs, `shutdown` waits for SIGTERM or Ctrl-C.

pub mod config;
pub mod envelope;
pub mod key;
pub mod live;
pub mod profile;
pub mod quantize;
pub mod shutdown;
pub mod single_flight;
pub mod store;
pub mod telemetry;
pub mod user_index;
pub mod vocabulary;

pub use envelope::{now_ms, Envelope, EnvelopeError, UnixMillis};
pub use key::{
    CacheKey, CacheKeySecret, EngineVersion, InvalidKey, KeyDeriver, KeyedProfile, PromptHash,
};
pub use live::{Both, LiveFeeds, LiveReader, LiveSink, LiveText, LiveUpdate, Relayed, Unwatched};
pub use profile::{
    CanonicalProfile, Classification, HdData, KnownSystems, ProfileError, ProfileInput,
};
pub use quantize::{QuantizationStep, Thousandths};
pub use single_flight::{Flight, Follower, Leader, SingleFlight};
pub use store::{
    CacheStore, CoalescedReads, MemoryStore, ReadCounts, StoreError, StoreStats, Tier, TierHits,
    TieredStore,
};
pub use user_index::{MemoryUserIndex, UserIndex};
