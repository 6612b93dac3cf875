//! The heart of narrative-cache, shared by every service.
//!
//! **The domain.** A request body becomes a [`ProfileInput`] (`profile`), which
//! validates into a [`CanonicalProfile`] with percentages quantized to a
//! [`QuantizationStep`] (`quantize`) and Human Design values in their canonical spelling
//! (`vocabulary`). A [`KeyDeriver`] (`key`) turns the canonical JSON into a [`CacheKey`]
//! `narr:<engineVersion>:<promptHash>:{<hmac>}`. Narratives are [`Envelope`]s
//! (`envelope`); concurrent misses for one key in a process are coalesced by
//! [`SingleFlight`] (`single_flight`).
//!
//! **The stores.** `store` is the [`CacheStore`] trait with its in-memory, Redis and
//! tiered (L1 + Redis) implementations. On Redis: `redis_backend` is the connection
//! (standalone or Cluster) with timeouts and a `breaker`; `codec` compresses and seals
//! values; `lock` is the fill lock and its scripts (fenced writes, adoption by a worker,
//! the erasure tombstone); `signals` carries `done`, `failed` and L1 invalidation over
//! pub/sub; `user_index` remembers which keys each (hashed) user asked for.
//!
//! **For every binary.** `config` reads settings from the environment, `telemetry`
//! sets up logs, `shutdown` waits for SIGTERM or Ctrl-C.

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
pub mod telemetry;
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
