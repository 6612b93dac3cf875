//! The cache's Redis side: everything `cache-core`'s domain needs from a Redis shared
//! by the fleet, and nothing else.
//!
//! `backend` is the connection to one deployment (standalone or Cluster) with its
//! timeouts and a `breaker`, through which every call goes. On it: `store` is the
//! [`RedisStore`] (a `cache_core::CacheStore`), whose values `codec` compresses and
//! seals; `lock` is the fill lock and its scripts (fenced writes, adoption by a
//! worker, the erasure tombstone); `signals` carries `done`, `failed` and L1
//! invalidation over pub/sub; `live` is each generation's text as it is written, a
//! stream per key that every instance relays to its streaming requests; `user_index`
//! is the fleet's [`RedisUserIndex`].

pub mod backend;
pub mod breaker;
pub mod codec;
pub mod live;
pub mod lock;
pub mod signals;
pub mod store;
pub mod user_index;

pub use backend::{RedisBackend, RedisConfig, RedisTarget, RedisTimeouts};
pub use codec::{EncryptionKeys, ValueCodec};
pub use live::{LiveStream, LiveWriter};
pub use lock::FillLock;
pub use signals::{Signal, SignalBus};
pub use store::RedisStore;
pub use user_index::RedisUserIndex;
