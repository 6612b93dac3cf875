//! The fill protocol: how a missed key gets its one generation, fleet-wide, wherever
//! it runs (a gateway in process, a gateway with Redis, a worker).
//!
//! - [`holder`]: what the holder of a key's fill lock does, in one place: look (an
//!   unreadable entry is replaced), generate while extending the lock, write fenced,
//!   signal, release. The gateway's Redis fill and the worker's `process_one` both
//!   call [`Holder::fill`]; how the lock came to be held (taken, or adopted from a job)
//!   and what the caller does with [`Filled`] are theirs.
//! - [`patience`]: Redis calls that wait out a failover.
//! - [`events`]: the analytics event of one generation, wherever it ran.
//!
//! The lock, its scripts (the erasure fence among them), the store and the signals are
//! `cache-core`'s; generating is `narrative-gen`'s. This crate is the order in which
//! they are used.

pub mod events;
pub mod holder;
pub mod patience;

pub use events::generation_event;
pub use holder::{Filled, Holder, Text, Want};
