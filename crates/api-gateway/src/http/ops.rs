//! Operator routes, unauthenticated by design: `/metrics`, `/healthz`, `/readyz`.

use std::sync::Arc;

use axum::extract::State;
use axum::http::header;
use axum::response::IntoResponse;
use axum::routing::get;
use axum::{Json, Router};

use crate::app::AppState;

pub fn router() -> Router<Arc<AppState>> {
    Router::new()
        .route("/metrics", get(metrics))
        .route(
            "/healthz",
            get(|| async { Json(serde_json::json!({"status": "ok"})) }),
        )
        .route("/readyz", get(readyz))
}

async fn metrics(State(state): State<Arc<AppState>>) -> impl IntoResponse {
    let stats = state.service.stats().await;
    state.metrics.cache_entries.set(stats.store.entries as f64);
    state
        .metrics
        .cache_bytes
        .set(stats.store.memory_bytes as f64);
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        state.metrics.render(),
    )
}

/// 200 while the process can serve, degraded or not, with each backend's state in the
/// body: a Redis that is down degrades the service (L1 and in-process generation carry
/// on), it does not stop it.
async fn readyz(State(state): State<Arc<AppState>>) -> impl IntoResponse {
    let generator = if state.settings.llm.is_some() {
        "llm"
    } else {
        "template"
    };
    let (mode, cache) = match state.service.distributed() {
        None => (
            "embedded",
            serde_json::json!({"kind": "memory", "state": "up"}),
        ),
        Some(shared) => (
            "distributed",
            serde_json::json!({
                "kind": "redis",
                "state": shared.redis().backend().state().as_str(),
                "signals": if shared.bus().is_subscribed() { "up" } else { "down" },
                "l1": "up",
            }),
        ),
    };
    let queue = match state.service.jobs() {
        None => serde_json::json!({"kind": "in-process", "state": "up"}),
        Some(jobs) => {
            serde_json::json!({"kind": "rabbitmq", "state": if jobs.is_connected().await { "up" } else { "down" }})
        }
    };
    Json(serde_json::json!({
        "status": "ready",
        "mode": mode,
        "backends": {
            "cache": cache,
            "queue": queue,
            "analytics": {"kind": "memory", "state": "up"},
        },
        "generator": {"kind": generator, "model": state.service.generator().model()},
        // Whether client routes need a key (`API_KEYS`): what any caller learns from a
        // 401 anyway, said up front so that the console asks before it calls.
        "access": if state.settings.client_keys.is_empty() { "open" } else { "key" },
    }))
}
