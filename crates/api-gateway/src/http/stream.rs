//! Narratives as Server-Sent Events, for requests that `Accept: text/event-stream`.
//!
//! The events, in order: `meta` (the key, versions, and `source`: `cache`, `stale` or
//! `generating`), any number of `delta` (`{"text"}`, whose concatenation is the
//! narrative) and `reset` (`{"reason"}`: forget the text so far), then `done`, whose
//! data is exactly the JSON body the same request would get without streaming. While
//! nothing else is sent, a `: keepalive` comment every [`KEEPALIVE`]. What is streamed
//! is the service's (`service::stream`); this module only writes it down.

use std::convert::Infallible;
use std::time::Duration;

use axum::http::{header, HeaderMap, HeaderValue};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use cache_core::CacheKey;
use futures::StreamExt as _;
use serde_json::json;

use super::header_names;
use super::narrative::{cache_status, narrative_body, CACHE_NAME};
use super::ApiError;
use crate::app::AppState;
use crate::service::{Forwarded, NarrativeStream, Source, StreamEvent, StreamStart};

/// A comment at least this often while nothing else is sent, so that proxies and
/// browsers keep an idle stream open.
pub const KEEPALIVE: Duration = Duration::from_secs(15);

/// Whether the request asks for an event stream (`Accept: text/event-stream`, not
/// refused with `q=0`).
pub(super) fn wants_event_stream(headers: &HeaderMap) -> bool {
    headers
        .get_all(header::ACCEPT)
        .iter()
        .filter_map(|value| value.to_str().ok())
        .flat_map(|value| value.split(','))
        .any(|range| {
            let mut parts = range.split(';').map(str::trim);
            let is_event_stream = parts
                .next()
                .is_some_and(|mime| mime.eq_ignore_ascii_case("text/event-stream"));
            let refused = parts.any(|param| {
                param
                    .strip_prefix("q=")
                    .and_then(|q| q.parse::<f32>().ok())
                    .is_some_and(|q| q <= 0.0)
            });
            is_event_stream && !refused
        })
}

/// The response of a streamed answer: its headers as known at the start, then its
/// events as they come.
pub(super) fn event_stream(state: &AppState, key: CacheKey, stream: NarrativeStream) -> Response {
    let NarrativeStream { start, events } = stream;
    let deriver = state.service.deriver();
    let (x_cache, cache_status, source, engine_version, prompt_hash) = match &start {
        StreamStart::Answer(answer) => {
            let (x_cache, status) = cache_status(answer);
            let source = match answer.source {
                Source::Cache => "cache",
                Source::Stale => "stale",
                Source::Generated | Source::Fallback => "generating",
            };
            let envelope = &answer.envelope;
            (
                x_cache,
                status,
                source,
                envelope.engine_version.clone(),
                envelope.prompt_hash.clone(),
            )
        }
        StreamStart::Generating {
            collapsed,
            forwarded,
        } => {
            let fwd = forwarded.map_or("miss", Forwarded::as_str);
            let how = if *collapsed { "; collapsed" } else { "" };
            (
                "MISS",
                format!("{CACHE_NAME}; fwd={fwd}{how}"),
                "generating",
                deriver.engine_version().to_string(),
                deriver.prompt_hash().to_string(),
            )
        }
    };
    let meta = Event::default().event("meta").data(
        json!({
            "cacheKey": key.as_str(),
            "engineVersion": engine_version,
            "promptHash": prompt_hash,
            "source": source,
        })
        .to_string(),
    );
    let rest = futures::stream::unfold(events, |mut events| async move {
        let event = events.recv().await?;
        Some((event, events))
    })
    .map(move |event| sse_event(&key, event));
    let body = futures::stream::once(async { meta })
        .chain(rest)
        .map(Ok::<_, Infallible>);
    let mut response = Sse::new(body)
        .keep_alive(KeepAlive::new().interval(KEEPALIVE).text("keepalive"))
        .into_response();
    let headers = response.headers_mut();
    // Personal, like every narrative; and no proxy may buffer or rewrite the stream.
    headers.insert(
        header::CACHE_CONTROL,
        HeaderValue::from_static("private, no-transform"),
    );
    headers.insert(
        header_names::X_ACCEL_BUFFERING,
        HeaderValue::from_static("no"),
    );
    headers.insert(header_names::X_CACHE, HeaderValue::from_static(x_cache));
    if let Ok(value) = HeaderValue::from_str(&cache_status) {
        headers.insert(header_names::CACHE_STATUS, value);
    }
    response
}

fn sse_event(key: &CacheKey, event: StreamEvent) -> Event {
    match event {
        StreamEvent::Text(text) => Event::default()
            .event("delta")
            .data(json!({ "text": text }).to_string()),
        StreamEvent::Reset(reason) => Event::default()
            .event("reset")
            .data(json!({ "reason": reason }).to_string()),
        StreamEvent::Done(answer) => Event::default()
            .event("done")
            .data(serde_json::to_string(&narrative_body(key, &answer)).unwrap_or_default()),
        // What a `GET` of the key answers now: nothing is stored.
        StreamEvent::Gone => Event::default()
            .event("done")
            .data(ApiError::NotFound.body_json()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn accept(value: &str) -> HeaderMap {
        let mut headers = HeaderMap::new();
        headers.insert(
            header::ACCEPT,
            HeaderValue::from_str(value).expect("header"),
        );
        headers
    }

    #[test]
    fn event_streams_are_asked_for_by_accept() {
        assert!(wants_event_stream(&accept("text/event-stream")));
        assert!(wants_event_stream(&accept(
            "application/json;q=0.5, Text/Event-Stream"
        )));
        assert!(!wants_event_stream(&accept("text/event-stream;q=0")));
        assert!(!wants_event_stream(&accept("application/json")));
        assert!(!wants_event_stream(&HeaderMap::new()));
    }
}
