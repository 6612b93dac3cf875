//! Reading a request body: at most [`MAX_BODY_BYTES`], within `HTTP_BODY_TIMEOUT` of
//! the request's headers, whatever pace the client sends it at.
//!
//! An oversize body is read on (and thrown away) up to [`DRAIN_BYTES`] more before
//! the 413 is answered: a client that writes its whole body before reading (aiohttp
//! does) would otherwise find the connection reset under it, the 413 unread.

use std::convert::Infallible;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::{FromRequest, Request};
use axum::http::HeaderMap;
use futures::StreamExt as _;

use super::{ApiError, MAX_BODY_BYTES};
use crate::app::AppState;

/// How much of an oversize body is read and dropped so that its sender can read the
/// 413; past it the connection is closed unread.
pub const DRAIN_BYTES: usize = 1024 * 1024;

/// A request's headers and body, or why the body could not be read: a handler
/// argument that never rejects, so the handler decides what a bad body means (after
/// checking the caller). It takes the headers by value: axum's `HeaderMap` extractor
/// would copy them.
pub struct RequestBody {
    pub headers: HeaderMap,
    pub body: Result<Bytes, ApiError>,
}

impl std::fmt::Debug for RequestBody {
    /// Not the headers: `Authorization` is among them.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RequestBody")
            .field("body", &self.body.as_ref().map(Bytes::len))
            .finish_non_exhaustive()
    }
}

impl FromRequest<Arc<AppState>> for RequestBody {
    type Rejection = Infallible;

    async fn from_request(request: Request, state: &Arc<AppState>) -> Result<Self, Infallible> {
        let limit = state.settings.http.body;
        let (parts, body) = request.into_parts();
        Ok(Self {
            headers: parts.headers,
            body: read(body, MAX_BODY_BYTES, limit).await,
        })
    }
}

/// The whole of `body`, if it is at most `max_bytes` and arrives within `limit`.
pub async fn read(
    body: axum::body::Body,
    max_bytes: usize,
    limit: Duration,
) -> Result<Bytes, ApiError> {
    let mut frames = body.into_data_stream();
    // Set once the body is known too large: a deadline passed while draining it still
    // answers 413, the more useful of the two.
    let oversize = AtomicBool::new(false);
    let whole = async {
        let mut bytes = Vec::new();
        while let Some(frame) = frames.next().await {
            let frame = frame.map_err(|error| ApiError::InvalidParameter {
                field: "body",
                message: format!("the body could not be read: {error}"),
            })?;
            if bytes.len() + frame.len() > max_bytes {
                oversize.store(true, Ordering::Relaxed);
                let mut drained = 0;
                while drained < DRAIN_BYTES {
                    match frames.next().await {
                        Some(Ok(more)) => drained += more.len(),
                        Some(Err(_)) | None => break,
                    }
                }
                return Err(ApiError::PayloadTooLarge { limit: max_bytes });
            }
            bytes.extend_from_slice(&frame);
        }
        Ok(Bytes::from(bytes))
    };
    // A small body usually came in with its headers: read at once, it needs no timer.
    let mut whole = std::pin::pin!(whole);
    if let Some(read) = futures::FutureExt::now_or_never(whole.as_mut()) {
        return read;
    }
    match tokio::time::timeout(limit, whole).await {
        Ok(read) => read,
        Err(_) if oversize.load(Ordering::Relaxed) => {
            Err(ApiError::PayloadTooLarge { limit: max_bytes })
        }
        Err(_) => Err(ApiError::BodyTimeout { limit }),
    }
}
