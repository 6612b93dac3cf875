//! Admin routes: `POST /narrative/prewarm` starts a pre-warm run and
//! `GET /narrative/prewarm/{run}` follows it. Both take the admin token
//! ([`Admin`]).

use std::sync::Arc;

use axum::extract::{Path, State};
use axum::response::Response;
use axum::routing::{delete, get, post};
use axum::{Json, Router};
use cache_core::{CanonicalProfile, KeyedProfile, ProfileError, ProfileInput};
use serde::Deserialize;
use serde_json::value::RawValue;

use super::access::Admin;
use super::body::RequestBody;
use super::narrative::json_body;
use super::ApiError;
use crate::app::AppState;
use crate::service::AnalyticsSource;

/// The most profiles one run may warm.
pub const MAX_PREWARM: u64 = 10_000;

pub fn router() -> Router<Arc<AppState>> {
    Router::new()
        .route("/narrative/prewarm", post(start_prewarm))
        .route("/narrative/prewarm/{run}", get(prewarm_progress))
        .route("/narrative/user/{user_id}", delete(erase_user))
}

/// `DELETE /narrative/user/{userId}`: erases what is held for that user (see
/// `NarrativeService::erase_user`), then their analytics events in Postgres. Answers
/// `{"deleted": N}`, N the cache entries removed. Safe to repeat: a 503 (a backend
/// down) says what is done, and a retry finishes the rest.
async fn erase_user(
    _admin: Admin,
    State(state): State<Arc<AppState>>,
    Path(user_id): Path<String>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let chars = user_id.chars().count();
    if chars == 0 || chars > cache_core::profile::MAX_USER_ID_CHARS {
        return Err(ApiError::InvalidParameter {
            field: "userId",
            message: format!(
                "must be 1 to {} characters",
                cache_core::profile::MAX_USER_ID_CHARS
            ),
        });
    }
    let user_hash = state.service.deriver().user_hash(&user_id);
    let deleted = state
        .service
        .erase_user(&user_hash)
        .await
        .map_err(|error| {
            tracing::warn!(%error, "erasure failed in the cache; nothing recorded as erased");
            ApiError::Unavailable("the cache is unreachable: retry the erasure".to_owned())
        })?;
    let events = match &state.analytics {
        AnalyticsSource::Postgres { store, .. } => {
            Some(store.erase_user(&user_hash).await.map_err(|error| {
                tracing::warn!(%error, "erasure of analytics events failed");
                ApiError::Unavailable(format!(
                    "{deleted} cache entries erased, but Postgres is unreachable: retry the erasure"
                ))
            })?)
        }
        AnalyticsSource::Memory(_) => None,
    };
    state.audit_about(
        "erase_user",
        Some(user_hash),
        serde_json::json!({"deleted": deleted, "events": events}),
    );
    Ok(Json(serde_json::json!({"deleted": deleted})))
}

/// `{"top": N}` or `{"profiles": [...]}`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct PrewarmRequest {
    top: Option<u64>,
    profiles: Option<Vec<Box<RawValue>>>,
}

async fn start_prewarm(
    _admin: Admin,
    State(state): State<Arc<AppState>>,
    RequestBody { headers, body }: RequestBody,
) -> Result<Response, ApiError> {
    let body = json_body(&headers, body)?;
    let request: PrewarmRequest =
        serde_json::from_slice(&body).map_err(|e| ApiError::InvalidParameter {
            field: "body",
            message: e.to_string(),
        })?;
    let (profiles, what) = match (request.top, request.profiles) {
        (Some(top), None) => (popular_profiles(&state, top).await?, format!("top {top}")),
        (None, Some(list)) => {
            let count = list.len();
            (listed_profiles(&state, &list)?, format!("{count} listed"))
        }
        _ => {
            return Err(ApiError::InvalidParameter {
                field: "top",
                message: "give either `top` (a number) or `profiles` (a list), not both".to_owned(),
            })
        }
    };
    let (to_warm, skipped) = state.service.prewarm_plan(profiles).await;
    // After duplicates are dropped, so that `queued` is what will be started.
    let requested = to_warm.len() as u64 + skipped;
    let run = state.prewarm_runs.start(requested, skipped);
    state.audit(
        "prewarm",
        serde_json::json!({
            "runId": run.run_id, "profiles": what, "requested": requested,
            "queued": run.queued, "skipped": skipped,
        }),
    );
    tracing::info!(run_id = %run.run_id, requested, queued = run.queued, skipped, "prewarm run started");
    let (service, progress) = (Arc::clone(&state.service), Arc::clone(&run));
    let (pacer, stop, audit) = (
        state.prewarm_runs.pacer(),
        state.background.clone(),
        Arc::clone(&state),
    );
    state.background_tasks.spawn(async move {
        service
            .prewarm_run(to_warm, Arc::clone(&progress), pacer, stop)
            .await;
        let mut outcome = progress_json(&progress);
        outcome["state"] = "done".into();
        audit.audit("prewarm_finished", outcome);
        progress.finish();
        tracing::info!(run_id = %progress.run_id, "prewarm run finished");
    });
    let location = format!("/narrative/prewarm/{}", run.run_id);
    let body = serde_json::json!({
        "runId": run.run_id,
        "queued": run.queued,
        "skipped": skipped,
        "failed": 0,
        "location": location,
    });
    Ok(super::accepted(&location, body))
}

async fn prewarm_progress(
    _admin: Admin,
    State(state): State<Arc<AppState>>,
    Path(run): Path<String>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let run = state.prewarm_runs.get(&run).ok_or(ApiError::NotFound)?;
    Ok(Json(progress_json(&run)))
}

fn progress_json(run: &crate::service::RunProgress) -> serde_json::Value {
    use std::sync::atomic::Ordering::Relaxed;
    serde_json::json!({
        "runId": run.run_id,
        "state": if run.is_done() { "done" } else { "running" },
        "requested": run.requested,
        "queued": run.queued,
        "skipped": run.skipped + run.skipped_later.load(Relaxed),
        "sent": run.sent.load(Relaxed),
        "failed": run.failed.load(Relaxed),
        "remaining": run.remaining(),
    })
}

/// The `top` most requested profiles, keyed under the current version and prompt.
async fn popular_profiles(state: &AppState, top: u64) -> Result<Vec<KeyedProfile>, ApiError> {
    if top == 0 || top > MAX_PREWARM {
        return Err(ApiError::InvalidParameter {
            field: "top",
            message: format!("must be between 1 and {MAX_PREWARM}"),
        });
    }
    let popular = state
        .analytics
        .top_profiles(
            usize::try_from(top).unwrap_or(usize::MAX),
            state.settings.prewarm_window,
        )
        .await
        .map_err(|error| {
            tracing::warn!(%error, "profile popularity unavailable");
            ApiError::Unavailable("profile popularity is unavailable (Postgres)".to_owned())
        })?;
    let deriver = state.service.deriver();
    Ok(popular
        .into_iter()
        .filter_map(|popular| {
            // A profile stored by another build that this one cannot read is left out.
            CanonicalProfile::requantize(&popular.canonical, deriver.step())
                .map(|profile| deriver.key_for(profile))
                .ok()
        })
        .collect())
}

/// An explicit list, each profile validated like a `POST /narrative` body.
fn listed_profiles(
    state: &AppState,
    list: &[Box<RawValue>],
) -> Result<Vec<KeyedProfile>, ApiError> {
    if list.is_empty() || list.len() as u64 > MAX_PREWARM {
        return Err(ApiError::InvalidParameter {
            field: "profiles",
            message: format!("must hold between 1 and {MAX_PREWARM} profiles"),
        });
    }
    list.iter()
        .enumerate()
        .map(|(i, raw)| {
            ProfileInput::from_json(raw.get().as_bytes())
                .and_then(|input| state.service.derive(&input))
                .map_err(|error| {
                    ApiError::InvalidProfile(ProfileError {
                        field: format!("profiles[{i}].{}", error.field),
                        message: error.message,
                    })
                })
        })
        .collect()
}
