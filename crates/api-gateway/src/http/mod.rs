//! HTTP: one module per resource, each exposing `router()`; `error` is the JSON error
//! every route answers with.

mod access;
mod admin;
mod body;
mod console;
mod error;
mod narrative;
mod ops;
mod stream;

use std::sync::Arc;

use axum::extract::State;
use axum::http::{header, HeaderValue};
use axum::response::{IntoResponse, Response};
use axum::Router;

pub use error::ApiError;

use crate::app::AppState;

/// The names of the headers we set or read beyond `http`'s own constants. A name given
/// as a string is parsed and validated on every use; these are made once, at compile
/// time.
pub mod header_names {
    use axum::http::HeaderName;

    pub const X_CACHE: HeaderName = HeaderName::from_static("x-cache");
    /// RFC 9211.
    pub const CACHE_STATUS: HeaderName = HeaderName::from_static("cache-status");
    /// RFC 7240.
    pub const PREFER: HeaderName = HeaderName::from_static("prefer");
    pub const X_ACCEL_BUFFERING: HeaderName = HeaderName::from_static("x-accel-buffering");
    pub const CROSS_ORIGIN_RESOURCE_POLICY: HeaderName =
        HeaderName::from_static("cross-origin-resource-policy");
}

/// Every request body is limited to this many bytes (read by `body::RequestBody`).
pub const MAX_BODY_BYTES: usize = 64 * 1024;

pub fn router(state: Arc<AppState>) -> Router {
    let console = if state.settings.console {
        console::router()
    } else {
        Router::new()
    };
    Router::new()
        .merge(narrative::router())
        .merge(admin::router())
        .merge(ops::router())
        .merge(console)
        .fallback(|| async { ApiError::NoRoute })
        .method_not_allowed_fallback(|| async { ApiError::MethodNotAllowed })
        .layer(axum::middleware::map_response_with_state(
            Arc::clone(&state),
            finish,
        ))
        .with_state(state)
}

/// Every answer on its way out, in one layer (each layer is a boxed future on the hit
/// path): error answers counted by their code, once, wherever they came from, and
/// the security headers set.
async fn finish(State(state): State<Arc<AppState>>, mut response: Response) -> Response {
    if let Some(error::Rejected(code)) = response.extensions().get::<error::Rejected>() {
        state.metrics.rejected(code);
    }
    security_headers(&mut response);
    response
}

/// 202 Accepted with `body`, and where to follow the work in `Location`.
pub(crate) fn accepted(location: &str, body: serde_json::Value) -> Response {
    let mut response = (axum::http::StatusCode::ACCEPTED, axum::Json(body)).into_response();
    if let Ok(value) = HeaderValue::from_str(location) {
        response
            .headers_mut()
            .insert(axum::http::header::LOCATION, value);
    }
    response
}

/// Headers a narrative answer carries before hyper adds `content-length` and `date`:
/// its own four (`content-type`, `x-cache`, `cache-status`, `cache-control`) and the
/// five of [`security_headers`].
pub(crate) const ANSWER_HEADERS: usize = 9;

/// Every answer but the console's is JSON or plain text for programs, never a page:
/// browsers are told not to sniff it into one, frame it, or send referrers from it.
pub fn security_headers(response: &mut Response) {
    let is_console = response.extensions().get::<console::Page>().is_some();
    let headers = response.headers_mut();
    let policy = if is_console {
        // The console is the one page: it may run its own scripts and styles, and
        // call this gateway, nothing more.
        console::CONSOLE_POLICY
    } else {
        "default-src 'none'; frame-ancestors 'none'"
    };
    for (name, value) in [
        (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
        (header::X_FRAME_OPTIONS, "DENY"),
        (header::CONTENT_SECURITY_POLICY, policy),
        (header::REFERRER_POLICY, "no-referrer"),
        (header_names::CROSS_ORIGIN_RESOURCE_POLICY, "same-origin"),
    ] {
        headers.insert(name, HeaderValue::from_static(value));
    }
}
