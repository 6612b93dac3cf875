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

/// 200 while the process can serve, degraded or not; each backend's state in the body.
/// In embedded mode every backend is in process, so they are up whenever we are.
async fn readyz(State(state): State<Arc<AppState>>) -> impl IntoResponse {
    let generator = if state.settings.llm.is_some() {
        "llm"
    } else {
        "template"
    };
    Json(serde_json::json!({
        "status": "ready",
        "mode": "embedded",
        "backends": {
            "cache": {"kind": state.service.store_name(), "state": "up"},
            "queue": {"kind": "in-process", "state": "up"},
            "analytics": {"kind": "memory", "state": "up"},
        },
        "generator": {"kind": generator, "model": state.service.generator().model()},
    }))
}
