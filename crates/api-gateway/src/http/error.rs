//! Errors a client sees: each owns its status and a JSON body
//! `{"error": {"code", "message", "field"}}`. Failures the system can degrade around
//! never reach the client as errors; the 5xx here are the 504 a client asks for with
//! `Cache-Control: only-if-cached` when nothing is stored (RFC 9111), and the 503 of an
//! admin route whose backend is down.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use cache_core::ProfileError;
use serde::Serialize;

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("{0}")]
    InvalidProfile(#[from] ProfileError),
    #[error("{message}")]
    InvalidParameter {
        field: &'static str,
        message: String,
    },
    #[error("request body is larger than {limit} bytes")]
    PayloadTooLarge { limit: usize },
    /// The body did not arrive within `HTTP_BODY_TIMEOUT`.
    #[error("request body not received within {} s", limit.as_secs())]
    BodyTimeout { limit: std::time::Duration },
    #[error("Content-Type must be application/json")]
    UnsupportedMediaType,
    #[error("no narrative under this key")]
    NotFound,
    #[error("only-if-cached: no stored narrative for this profile")]
    NotCached,
    #[error("no such route")]
    NoRoute,
    #[error("method not allowed on this route")]
    MethodNotAllowed,
    #[error("missing or wrong bearer token")]
    Unauthorized,
    #[error("rate limit exceeded: retry in {} s", retry_after.as_secs().max(1))]
    RateLimited { retry_after: std::time::Duration },
    #[error("{0}")]
    Forbidden(String),
    /// A backend this route cannot do without is down (an admin route: client routes
    /// degrade instead).
    #[error("{0}")]
    Unavailable(String),
}

#[derive(Serialize)]
struct Body<'a> {
    error: Detail<'a>,
}

#[derive(Serialize)]
struct Detail<'a> {
    code: &'static str,
    message: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    field: Option<&'a str>,
}

impl ApiError {
    pub fn status(&self) -> StatusCode {
        match self {
            Self::InvalidProfile(_) | Self::InvalidParameter { .. } => StatusCode::BAD_REQUEST,
            Self::PayloadTooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            Self::BodyTimeout { .. } => StatusCode::REQUEST_TIMEOUT,
            Self::UnsupportedMediaType => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            Self::NotFound | Self::NoRoute => StatusCode::NOT_FOUND,
            Self::NotCached => StatusCode::GATEWAY_TIMEOUT,
            Self::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            Self::Unauthorized => StatusCode::UNAUTHORIZED,
            Self::RateLimited { .. } => StatusCode::TOO_MANY_REQUESTS,
            Self::Forbidden(_) => StatusCode::FORBIDDEN,
            Self::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
        }
    }

    /// A stable machine-readable code; also the `code` label of the rejection metric.
    pub fn code(&self) -> &'static str {
        match self {
            Self::InvalidProfile(_) => "invalid_profile",
            Self::InvalidParameter { .. } => "invalid_parameter",
            Self::PayloadTooLarge { .. } => "payload_too_large",
            Self::BodyTimeout { .. } => "body_timeout",
            Self::UnsupportedMediaType => "unsupported_media_type",
            Self::NotFound => "not_found",
            Self::NotCached => "not_cached",
            Self::NoRoute => "no_route",
            Self::MethodNotAllowed => "method_not_allowed",
            Self::Unauthorized => "unauthorized",
            Self::RateLimited { .. } => "rate_limited",
            Self::Forbidden(_) => "forbidden",
            Self::Unavailable(_) => "unavailable",
        }
    }
}

/// The code of the error a response carries, set where the error becomes a response
/// and read by the layer that counts it (`narrative_rejected_total`): every rejection
/// counted once, from handlers, extractors and fallbacks alike.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Rejected(pub &'static str);

impl ApiError {
    /// The JSON body of this error, as its response carries it (and as a stream's
    /// last event does, when a stream ends in it).
    pub fn body_json(&self) -> String {
        serde_json::to_string(&self.body()).unwrap_or_default()
    }

    fn body(&self) -> Body<'_> {
        let (message, field) = match self {
            Self::InvalidProfile(e) => (e.message.clone(), Some(e.field.as_str())),
            Self::InvalidParameter { field, message } => (message.clone(), Some(*field)),
            Self::PayloadTooLarge { .. } | Self::BodyTimeout { .. } => {
                (self.to_string(), Some("body"))
            }
            other => (other.to_string(), None),
        };
        Body {
            error: Detail {
                code: self.code(),
                message,
                field,
            },
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut response = (self.status(), Json(self.body())).into_response();
        // For the layer that counts rejections, wherever the error came from.
        response.extensions_mut().insert(Rejected(self.code()));
        let headers = response.headers_mut();
        // An error is about this request alone: nothing between us and the client keeps it.
        headers.insert(
            axum::http::header::CACHE_CONTROL,
            axum::http::HeaderValue::from_static("no-store"),
        );
        match &self {
            Self::Unauthorized => {
                headers.insert(
                    axum::http::header::WWW_AUTHENTICATE,
                    axum::http::HeaderValue::from_static("Bearer"),
                );
            }
            Self::RateLimited { retry_after } => {
                // Whole seconds, rounded up: a client retrying then finds a token.
                let seconds = retry_after.as_secs_f64().ceil().max(1.0) as u64;
                headers.insert(axum::http::header::RETRY_AFTER, seconds.into());
            }
            _ => {}
        }
        response
    }
}
