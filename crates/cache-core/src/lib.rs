//! The heart of narrative-cache, shared by every service.
//!
//! A request body becomes a [`ProfileInput`] (`profile`), which validates into a
//! [`CanonicalProfile`] with percentages quantized to a [`QuantizationStep`]
//! (`quantize`) and Human Design values in their canonical spelling (`vocabulary`).
//! A [`KeyDeriver`] (`key`) turns the canonical JSON into a [`CacheKey`]
//! `narr:<engineVersion>:<promptHash>:{<hmac>}`. Narratives are stored as
//! [`Envelope`]s (`envelope`) in a [`CacheStore`] (`store`), and concurrent misses for
//! one key are coalesced by [`SingleFlight`] (`single_flight`). `config` reads
//! settings from the environment for every binary.

pub mod breaker;
pub mod codec;
pub mod config;
pub mod envelope;
pub mod key;
pub mod lock;
pub mod profile;
pub mod quantize;
pub mod redis_backend;
pub mod shutdown;
pub mod signals;
pub mod single_flight;
pub mod store;
pub mod user_index;
pub mod vocabulary;

pub use envelope::{now_ms, Envelope, EnvelopeError, UnixMillis};
pub use key::{
    CacheKey, CacheKeySecret, EngineVersion, InvalidKey, KeyDeriver, KeyedProfile, PromptHash,
};
pub use profile::{CanonicalProfile, Classification, HdData, ProfileError, ProfileInput};
pub use quantize::{QuantizationStep, Thousandths};
pub use single_flight::{Flight, Follower, Leader, SingleFlight};
pub use store::{
    CacheStore, MemoryStore, RedisStore, StoreError, StoreStats, Tier, TierHits, TieredStore,
};
