//! What the cache costs and saves: events, their transport, and their storage.
//!
//! ```text
//! gateway / worker ──EventSink──▶ EventPublisher ─(bounded buffer, batches)─▶ RabbitMQ
//!        │ (embedded mode)                                    narrative.analytics
//!        ▼                                                              │
//!  InMemoryAnalytics ─▶ GET /narrative/analytics        analytics service (Consumer)
//!                                                                       │ insert + rollups,
//!                 GET /narrative/analytics ◀── PgStore::summary ◀── Postgres (idempotent)
//! ```
//!
//! - [`event`]: request and generation events, and the batch format.
//! - [`memory`]: the embedded aggregator; [`hll`]: its unique-user counter.
//! - [`popularity`]: which canonical profiles are requested most, for pre-warming.
//! - [`publisher`]: the non-blocking sink that batches events to RabbitMQ.
//! - [`store`]: Postgres (migrations in `migrations/`), partitions, inserts, queries.
//! - [`consumer`], [`queues`], [`app`], [`settings`]: the `analytics` service.

pub mod app;
pub mod consumer;
pub mod event;
pub mod hll;
pub mod memory;
pub mod popularity;
pub mod publisher;
pub mod queues;
pub mod settings;
pub mod store;
pub mod summary;

pub use event::{
    new_event_id, Batch, BatchFormat, GenerationEvent, GenerationOutcome, RequestEvent,
    RequestEventRef, RequestOutcome, Trigger,
};
pub use memory::{AuditRecord, InMemoryAnalytics};
pub use popularity::PopularProfile;
pub use publisher::{BatchObserver, EventMetrics, EventPublisher, PublisherSettings};
pub use store::PgStore;
pub use summary::{ratio, Range, RangeError, Summary};

/// Where events go. Implementations never block the caller.
pub trait EventSink: Send + Sync + std::fmt::Debug {
    /// Borrowed: a sink that keeps the event makes it owned ([`RequestEventRef::to_event`]).
    fn record_request(&self, event: RequestEventRef<'_>);
    fn record_generation(&self, event: GenerationEvent);
}
