//! Who may call what: `Client` for client routes, `Admin` for admin routes. Both read
//! `Authorization: Bearer <token>`; `/metrics`, `/healthz` and `/readyz` need neither.
//!
//! - Client routes: with `API_KEYS` set, a client key (or the admin token) is required,
//!   401 otherwise; without, anyone is `anonymous` (the gateway then binds loopback
//!   only unless `ALLOW_ANONYMOUS`). The per-client rate limit applies either way.
//! - Admin routes: the admin token only; a client key gets 403, anything else 401, and
//!   with no `ADMIN_TOKEN` configured every caller gets 403.

use std::sync::Arc;

use axum::extract::FromRequestParts;
use axum::http::header;
use axum::http::request::Parts;

use super::ApiError;
use crate::app::AppState;

/// A client route's caller, by name: a client of `API_KEYS`, `admin`, or `anonymous`.
/// The name is shared (it goes on to the request's event): identifying allocates
/// nothing.
#[derive(Debug, Clone)]
pub struct Client(pub Arc<str>);

/// A request that presented the admin token.
#[derive(Debug)]
pub struct Admin;

fn bearer(parts: &Parts) -> Option<&str> {
    parts
        .headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim)
}

fn is_admin(state: &AppState, token: &str) -> bool {
    state
        .settings
        .admin_token
        .as_ref()
        .is_some_and(|admin| admin.matches(token))
}

impl Client {
    fn identify(parts: &Parts, state: &AppState) -> Result<Self, ApiError> {
        let keys = &state.settings.client_keys;
        // The admin token is the admin's wherever it is shown, open routes included:
        // it is exempt from limits a client is not.
        if bearer(parts).is_some_and(|token| is_admin(state, token)) {
            return Ok(Self(Arc::clone(&crate::auth::ADMIN)));
        }
        if keys.is_empty() {
            return Ok(Self(Arc::clone(&crate::auth::ANONYMOUS)));
        }
        let token = bearer(parts).ok_or(ApiError::Unauthorized)?;
        if let Some(name) = keys.identify(token) {
            return Ok(Self(Arc::clone(name)));
        }
        if is_admin(state, token) {
            return Ok(Self(Arc::clone(&crate::auth::ADMIN)));
        }
        Err(ApiError::Unauthorized)
    }
}

impl FromRequestParts<Arc<AppState>> for Client {
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut Parts,
        state: &Arc<AppState>,
    ) -> Result<Self, Self::Rejection> {
        let client = Self::identify(parts, state)?;
        state.metrics.client_request(&client.0);
        if let Some(limiter) = &state.rate_limiter {
            if let Err(retry_after) = limiter.check(&client.0) {
                state.metrics.rate_limited(&client.0);
                return Err(ApiError::RateLimited { retry_after });
            }
        }
        Ok(client)
    }
}

impl FromRequestParts<Arc<AppState>> for Admin {
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut Parts,
        state: &Arc<AppState>,
    ) -> Result<Self, Self::Rejection> {
        let verdict = if state.settings.admin_token.is_none() {
            Err(ApiError::Forbidden(
                "admin routes are disabled: set ADMIN_TOKEN".to_owned(),
            ))
        } else {
            match bearer(parts) {
                Some(token) if is_admin(state, token) => Ok(Self),
                Some(token) if state.settings.client_keys.identify(token).is_some() => Err(
                    ApiError::Forbidden("a client key cannot use admin routes".to_owned()),
                ),
                _ => Err(ApiError::Unauthorized),
            }
        };
        verdict
    }
}
