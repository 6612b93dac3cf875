//! HTTP: one module per resource, each exposing `router()`; `error` is the JSON error
//! every route answers with.

mod admin;
mod error;
mod narrative;
mod ops;

use std::sync::Arc;

use axum::extract::DefaultBodyLimit;
use axum::Router;

pub use error::ApiError;

use crate::app::AppState;

/// Every request body is limited to this many bytes.
pub const MAX_BODY_BYTES: usize = 64 * 1024;

pub fn router(state: Arc<AppState>) -> Router {
    Router::new()
        .merge(narrative::router())
        .merge(admin::router())
        .merge(ops::router())
        .fallback(|| async { ApiError::NoRoute })
        .method_not_allowed_fallback(|| async { ApiError::MethodNotAllowed })
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
        .with_state(state)
}
