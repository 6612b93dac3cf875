//! `cache-redis` against a real redis-server, one per test binary (test-kit).

mod live;
mod lock;
mod store;
mod user_index;
