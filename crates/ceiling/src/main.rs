//! `ceiling`: what the gateway's HTTP stack does with nothing behind it, the upper
//! bound a cached hit is measured against (`scripts/bench.sh`).
//!
//! The same server as the gateway (`api_gateway::server::serve`: hyper's HTTP/1.1 with
//! its timers) and the same router type (axum), answering `POST /narrative` by reading
//! the request body and answering a static JSON body from memory with a hit's headers.
//! No parsing, no key, no lookup, no metrics, no event.
//!
//! ```text
//! CEILING_BIND=127.0.0.1:8099 CEILING_BODY_FILE=hit.json ceiling
//! ```
//! `CEILING_BODY_FILE` is the body to answer (the bench saves a real hit's body, so
//! both send the same bytes); without it, 1,200 bytes of JSON.

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::Context as _;
use api_gateway::header_names;
use axum::body::Bytes;
use axum::http::{header, HeaderValue};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let bind: SocketAddr = std::env::var("CEILING_BIND")
        .unwrap_or_else(|_| "127.0.0.1:8099".to_owned())
        .parse()
        .context("CEILING_BIND")?;
    let body = match std::env::var("CEILING_BODY_FILE") {
        Ok(path) => Bytes::from(std::fs::read(&path).with_context(|| path.clone())?),
        Err(_) => Bytes::from(format!("{{\"narrative\":\"{}\"}}", "x".repeat(1185))),
    };
    let answer = move |_request: Bytes| {
        let body = body.clone();
        async move { hit(body) }
    };
    let router = Router::new()
        .route("/narrative", post(answer))
        .route("/healthz", get(|| async { "ok" }));
    let listener = tokio::net::TcpListener::bind(bind).await?;
    let closed = prometheus::IntCounterVec::new(
        prometheus::Opts::new("ceiling_connections_closed_total", "unused"),
        &["reason"],
    )?;
    api_gateway::server::serve(
        listener,
        router,
        api_gateway::settings::HttpTimeouts {
            header: Duration::from_secs(10),
            body: Duration::from_secs(30),
            idle: Duration::from_secs(75),
        },
        std::future::pending(),
        Duration::from_secs(1),
        closed,
    )
    .await;
    Ok(())
}

/// A static body with the headers a hit carries (the gateway's security headers
/// among them), so that both put the same bytes on the wire.
fn hit(body: Bytes) -> Response {
    let mut response = body.into_response();
    api_gateway::security_headers(&mut response);
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    headers.insert(header_names::X_CACHE, HeaderValue::from_static("HIT"));
    headers.insert(
        header_names::CACHE_STATUS,
        HeaderValue::from_static("narrative-cache; hit; ttl=604799"),
    );
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("private"));
    response
}
