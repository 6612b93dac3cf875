//! `/narrative` routes: answer a profile, look up a key, explain a key, report stats
//! and analytics.

use std::sync::Arc;
use std::time::Instant;

use analytics::Range;
use axum::body::{Body, Bytes};
use axum::extract::rejection::QueryRejection;
use axum::extract::{Path, Query, State};
use axum::http::{header, HeaderMap, HeaderValue};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use cache_core::{CacheKey, Envelope};
use serde::Serialize;
use serde_json::value::RawValue;

use super::access::Client;
use super::body::RequestBody;
use super::header_names;
use super::ApiError;
use crate::app::AppState;
use crate::service::{
    Answer, Caller, Derived, Directives, Followed, Forwarded, Lookup, NarrativeService, NotCached,
    Source,
};

pub fn router() -> Router<Arc<AppState>> {
    Router::new()
        .route("/narrative", post(post_narrative))
        .route("/narrative/key", post(explain_key))
        .route("/narrative/stats", get(stats))
        .route("/narrative/analytics", get(analytics))
        .route("/narrative/{key}", get(get_narrative))
}

/// The response body of a narrative.
#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
pub(super) struct NarrativeBody<'a> {
    narrative: &'a str,
    source: &'static str,
    cache_key: &'a str,
    engine_version: &'a str,
    prompt_hash: &'a str,
    generated_at: String,
    model: &'a str,
}

pub(super) const CACHE_NAME: &str = "narrative-cache";

#[tracing::instrument(skip_all, fields(cache_key))]
async fn post_narrative(
    client: Client,
    State(state): State<Arc<AppState>>,
    RequestBody { headers, body }: RequestBody,
) -> Result<Response, ApiError> {
    let started = Instant::now();
    let (derived, caller) = parse_profile(&state, &headers, body, client)?;
    let keyed = &derived.keyed;
    tracing::Span::current().record("cache_key", keyed.key.as_str());
    let directives = request_directives(&headers);
    if super::stream::wants_event_stream(&headers) {
        let stream = state
            .service
            .narrative_stream(keyed, started, directives, &caller)
            .await
            .map_err(|NotCached| ApiError::NotCached)?;
        return Ok(super::stream::event_stream(
            &state,
            keyed.key.clone(),
            stream,
        ));
    }
    // Cache-Control directives change what may be answered or stored, so a request
    // that carries any is answered synchronously under them.
    if prefers_async(&headers) && directives == Directives::default() {
        return Ok(
            match state
                .service
                .narrative_or_start(keyed, started, &caller)
                .await
            {
                Some(answer) => narrative_response(&keyed.key, &answer),
                None => pending_response(&keyed.key),
            },
        );
    }
    let answer = state
        .service
        .narrative_with(keyed, started, directives, &caller)
        .await
        .map_err(|NotCached| ApiError::NotCached)?;
    Ok(narrative_response_with(
        &keyed.key,
        &answer,
        Some((&state.service, &derived)),
    ))
}

/// The request's `Cache-Control` directives (RFC 9111 5.2.1). Unknown directives and
/// malformed values are ignored, as the RFC asks.
fn request_directives(headers: &HeaderMap) -> Directives {
    let mut directives = Directives::default();
    let seconds = |value: Option<&str>| {
        value
            .map(|v| v.trim().trim_matches('"'))
            .and_then(|v| v.parse::<u64>().ok())
    };
    for value in headers
        .get_all(header::CACHE_CONTROL)
        .iter()
        .filter_map(|v| v.to_str().ok())
    {
        for directive in value.split(',') {
            let (name, argument) = match directive.split_once('=') {
                Some((name, argument)) => (name.trim(), Some(argument)),
                None => (directive.trim(), None),
            };
            match name.to_ascii_lowercase().as_str() {
                "no-cache" => directives.no_cache = true,
                "no-store" => directives.no_store = true,
                "only-if-cached" => directives.only_if_cached = true,
                "max-age" => directives.max_age = seconds(argument).or(directives.max_age),
                "stale-if-error" => {
                    directives.stale_if_error = seconds(argument).or(directives.stale_if_error)
                }
                _ => {}
            }
        }
    }
    directives
}

/// `Prefer: respond-async` (RFC 7240), among other preferences or alone.
fn prefers_async(headers: &HeaderMap) -> bool {
    headers
        .get_all(header_names::PREFER)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .any(|v| {
            v.split(',').any(|preference| {
                preference
                    .split(';')
                    .next()
                    .is_some_and(|p| p.trim().eq_ignore_ascii_case("respond-async"))
            })
        })
}

/// 202 with where to fetch the narrative once it is ready.
fn pending_response(key: &CacheKey) -> Response {
    let location = format!("/narrative/{}", key.to_path_segment());
    let body =
        serde_json::json!({"status": "pending", "cacheKey": key.as_str(), "location": location});
    let mut response = super::accepted(&location, body);
    response
        .headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("private"));
    response
}

/// The request's profile and key, and who asked (the user id only as its keyed hash).
fn parse_profile(
    state: &AppState,
    headers: &HeaderMap,
    body: Result<Bytes, ApiError>,
    Client(client): Client,
) -> Result<(Arc<Derived>, Caller), ApiError> {
    let body = json_body(headers, body)?;
    let derived = state.service.derive_body(&body)?;
    let caller = Caller {
        user_hash: derived.user_hash.clone(),
        client,
    };
    Ok((derived, caller))
}

/// The body of a JSON request: 415 unless it says it is JSON; the read's own error
/// (413 over the limit, 408 too slow) otherwise.
pub(super) fn json_body(
    headers: &HeaderMap,
    body: Result<Bytes, ApiError>,
) -> Result<Bytes, ApiError> {
    let is_json = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .is_some_and(|mime| {
            let mime = mime.trim();
            mime.eq_ignore_ascii_case("application/json")
                || mime.to_ascii_lowercase().ends_with("+json")
        });
    if !is_json {
        return Err(ApiError::UnsupportedMediaType);
    }
    body
}

fn narrative_response(key: &CacheKey, answer: &Answer) -> Response {
    narrative_response_with(key, answer, None)
}

/// A narrative answer. A hit answering a memoized request body is rendered once per
/// entry and kept in the body's memo entry ([`Derived::rendered`]).
fn narrative_response_with(
    key: &CacheKey,
    answer: &Answer,
    memo: Option<(&NarrativeService, &Arc<Derived>)>,
) -> Response {
    let (x_cache, status) = match answer.source {
        Source::Cache => ("HIT", fresh_hit_status(answer)),
        _ => {
            let (x_cache, status) = cache_status(answer);
            (x_cache, HeaderValue::from_str(&status).ok())
        }
    };
    let mut response = match (answer.source, memo) {
        (Source::Cache | Source::Stale, Some((service, derived))) => {
            let body = derived.rendered(answer).unwrap_or_else(|| {
                let json = serde_json::to_vec(&narrative_body(key, answer)).unwrap_or_default();
                let json = Bytes::from(json);
                service.keep_rendered(derived, answer, json.clone());
                json
            });
            let mut response = Response::new(Body::from(body));
            // Room for every header the answer gets, here and in `finish`, at once:
            // growing the map on the way (rehashing what it holds) cost a hit more
            // than its lookup did.
            let headers = response.headers_mut();
            headers.reserve(super::ANSWER_HEADERS);
            headers.insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/json"),
            );
            response
        }
        _ => Json(narrative_body(key, answer)).into_response(),
    };
    let headers = response.headers_mut();
    headers.insert(header_names::X_CACHE, HeaderValue::from_static(x_cache));
    if let Some(value) = status {
        headers.insert(header_names::CACHE_STATUS, value);
    }
    // Narratives are personal: shared caches between us and the user must not keep them.
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("private"));
    response
}

/// Fresh-hit `Cache-Status` values each thread keeps, by remaining ttl.
const HIT_STATUSES_KEPT: usize = 64;

/// A fresh hit's `Cache-Status`. It depends only on the entry's remaining ttl, which
/// moves once a second, so each thread keeps the values it made in a small table by
/// ttl and shares them instead of formatting and copying one for every hit. Entries
/// with different ttls share it until two of them land on one slot.
fn fresh_hit_status(answer: &Answer) -> Option<HeaderValue> {
    type Slots = [Option<(i64, HeaderValue)>; HIT_STATUSES_KEPT];
    thread_local! {
        static MADE: std::cell::RefCell<Slots> = const {
            std::cell::RefCell::new([const { None }; HIT_STATUSES_KEPT])
        };
    }
    let ttl = answer.ttl_remaining_secs.unwrap_or(0);
    MADE.with_borrow_mut(|made| {
        let slot =
            &mut made[usize::try_from(ttl.rem_euclid(HIT_STATUSES_KEPT as i64)).unwrap_or(0)];
        if let Some((made_for, value)) = slot {
            if *made_for == ttl {
                return Some(value.clone());
            }
        }
        let (_, status) = cache_status(answer);
        let value = HeaderValue::from_maybe_shared(Bytes::from(status)).ok()?;
        *slot = Some((ttl, value.clone()));
        Some(value)
    })
}

/// The body of a narrative answer, streamed or not.
pub(super) fn narrative_body<'a>(key: &'a CacheKey, answer: &'a Answer) -> NarrativeBody<'a> {
    let envelope: &Envelope = &answer.envelope;
    NarrativeBody {
        narrative: &envelope.body,
        source: answer.source.as_str(),
        cache_key: key.as_str(),
        engine_version: &envelope.engine_version,
        prompt_hash: &envelope.prompt_hash,
        generated_at: rfc3339(envelope.created_at_ms),
        model: &envelope.model,
    }
}

/// `X-Cache` and `Cache-Status` (RFC 9211) for an answer.
pub(super) fn cache_status(answer: &Answer) -> (&'static str, String) {
    match answer.source {
        Source::Cache => (
            "HIT",
            format!(
                "{CACHE_NAME}; hit; ttl={}",
                answer.ttl_remaining_secs.unwrap_or(0)
            ),
        ),
        Source::Stale => (
            "STALE",
            format!(
                "{CACHE_NAME}; hit; ttl={}; fwd=stale",
                answer.ttl_remaining_secs.unwrap_or(0)
            ),
        ),
        Source::Generated => {
            let fwd = answer.forwarded.map_or("miss", Forwarded::as_str);
            let how = if answer.collapsed {
                "; collapsed"
            } else if answer.stored {
                "; stored"
            } else {
                ""
            };
            ("MISS", format!("{CACHE_NAME}; fwd={fwd}{how}"))
        }
        Source::Fallback => (
            "FALLBACK",
            format!("{CACHE_NAME}; fwd=miss; detail=fallback"),
        ),
    }
}

fn rfc3339(unix_ms: i64) -> String {
    let nanos = i128::from(unix_ms) * 1_000_000;
    time::OffsetDateTime::from_unix_timestamp_nanos(nanos)
        .ok()
        .and_then(|t| {
            t.format(&time::format_description::well_known::Rfc3339)
                .ok()
        })
        .unwrap_or_default()
}

async fn get_narrative(
    _client: Client,
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    Path(raw): Path<String>,
) -> Result<Response, ApiError> {
    let key = CacheKey::parse(&raw).map_err(|e| ApiError::InvalidParameter {
        field: "key",
        message: e.to_string(),
    })?;
    if super::stream::wants_event_stream(&headers) {
        return match state.service.follow_stream(&key).await {
            Followed::Stream(stream) => Ok(super::stream::event_stream(&state, key, stream)),
            Followed::Pending => Ok(pending_response(&key)),
            Followed::Missing => Err(ApiError::NotFound),
        };
    }
    match state.service.lookup(&key).await {
        Lookup::Found(envelope, ttl) => Ok(narrative_response(&key, &Answer::found(envelope, ttl))),
        Lookup::Pending => Ok(pending_response(&key)),
        Lookup::Missing => Err(ApiError::NotFound),
    }
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct ExplainBody<'a> {
    cache_key: &'a str,
    /// Exactly the bytes the digest covers, embedded as they are.
    canonical: &'a RawValue,
}

async fn explain_key(
    client: Client,
    State(state): State<Arc<AppState>>,
    RequestBody { headers, body }: RequestBody,
) -> Result<Response, ApiError> {
    let (derived, _) = parse_profile(&state, &headers, body, client)?;
    let keyed = &derived.keyed;
    let canonical: &RawValue =
        serde_json::from_str(&keyed.canonical_json).map_err(|e| ApiError::InvalidParameter {
            field: "body",
            message: e.to_string(),
        })?;
    Ok(Json(ExplainBody {
        cache_key: keyed.key.as_str(),
        canonical,
    })
    .into_response())
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct StatsBody {
    keys: u64,
    memory_used: String,
    memory_bytes: u64,
    hit_rate: f64,
    engine_version: String,
    prompt_hash: String,
    ttl_days: f64,
    stale_after_days: f64,
    quantization_step: String,
    hits: u64,
    misses: u64,
    fallbacks: u64,
    /// `global` when hits, misses and fallbacks are the whole fleet's.
    counts: &'static str,
    in_flight: usize,
    mode: &'static str,
    store: &'static str,
    model: String,
    /// Entries by `ENGINE_VERSION`: during a rollout, how far the new version has got.
    entries_by_version: std::collections::BTreeMap<String, u64>,
    /// Hits by tier: `l1` in process, `l2` Redis (distributed mode only).
    #[serde(skip_serializing_if = "Option::is_none")]
    tier_hits: Option<TierHitsBody>,
    /// This instance's last answers, newest first (the console's list).
    recent: Vec<RecentBody>,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct RecentBody {
    at: String,
    source: &'static str,
    latency_ms: f64,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct TierHitsBody {
    l1: u64,
    l2: u64,
    /// Reads passed to Redis, and requests answered by a read of their key they
    /// waited on rather than their own (concurrent reads of a key share a round trip).
    l2_reads_sent: u64,
    l2_reads_shared: u64,
}

async fn stats(_client: Client, State(state): State<Arc<AppState>>) -> Json<StatsBody> {
    let service = &state.service;
    let stats = service.stats().await;
    let days = |d: std::time::Duration| (d.as_secs_f64() / 86_400.0 * 1000.0).round() / 1000.0;
    Json(StatsBody {
        keys: stats.store.entries,
        entries_by_version: stats.store.by_version.clone(),
        memory_used: human_bytes(stats.store.memory_bytes),
        memory_bytes: stats.store.memory_bytes,
        hit_rate: analytics::ratio(stats.counts.hits, stats.counts.hits + stats.counts.misses),
        engine_version: service.deriver().engine_version().to_string(),
        prompt_hash: service.deriver().prompt_hash().to_string(),
        ttl_days: days(service.ttl()),
        stale_after_days: days(state.settings.stale_after),
        quantization_step: service.deriver().step().to_string(),
        hits: stats.counts.hits,
        misses: stats.counts.misses,
        fallbacks: stats.counts.fallbacks,
        counts: if stats.counts_are_global {
            "global"
        } else {
            "instance"
        },
        in_flight: stats.in_flight,
        mode: if service.distributed().is_some() {
            "distributed"
        } else {
            "embedded"
        },
        store: service.store_name(),
        model: service.generator().model().to_owned(),
        recent: stats
            .recent
            .iter()
            .map(|answer| RecentBody {
                at: rfc3339(i64::try_from(answer.at_ms).unwrap_or(i64::MAX)),
                source: answer.source.as_str(),
                latency_ms: answer.latency_us as f64 / 1000.0,
            })
            .collect(),
        tier_hits: service.distributed().map(|shared| {
            let (hits, reads) = (shared.tiers.tier_hits(), shared.shared_reads.counts());
            TierHitsBody {
                l1: hits.l1,
                l2: hits.l2,
                l2_reads_sent: reads.sent,
                l2_reads_shared: reads.shared,
            }
        }),
    })
}

#[derive(serde::Deserialize)]
struct RangeQuery {
    from: Option<String>,
    to: Option<String>,
}

/// `?from=&to=`: RFC 3339 times or dates; the last 30 days by default.
async fn analytics(
    _client: Client,
    State(state): State<Arc<AppState>>,
    query: Result<Query<RangeQuery>, QueryRejection>,
) -> Result<Json<analytics::Summary>, ApiError> {
    let Query(query) = query.map_err(|rejection| ApiError::InvalidParameter {
        field: "query",
        message: rejection.body_text(),
    })?;
    let range = Range::parse(
        query.from.as_deref(),
        query.to.as_deref(),
        time::OffsetDateTime::now_utc(),
    )
    .map_err(|error| ApiError::InvalidParameter {
        field: error.field,
        message: error.message,
    })?;
    Ok(Json(state.analytics.summary(&range, &state.service).await))
}

/// Bytes the way Redis's `used_memory_human` writes them: `1023B`, `2.40M`.
fn human_bytes(bytes: u64) -> String {
    const UNITS: [(&str, f64); 4] = [
        ("T", 1_099_511_627_776.0),
        ("G", 1_073_741_824.0),
        ("M", 1_048_576.0),
        ("K", 1024.0),
    ];
    let value = bytes as f64;
    UNITS.iter().find(|(_, size)| value >= *size).map_or_else(
        || format!("{bytes}B"),
        |(unit, size)| format!("{:.2}{unit}", value / size),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::service::test_support;

    #[test]
    fn human_bytes_like_redis() {
        assert_eq!(human_bytes(512), "512B");
        assert_eq!(human_bytes(2_516_582), "2.40M");
        assert_eq!(human_bytes(1536), "1.50K");
    }

    #[test]
    fn a_fresh_hit_status_is_made_again_when_its_ttl_changes() {
        let envelope = test_support::envelope("narrative");
        let hit = |ttl| test_support::answer(&envelope, Source::Cache, ttl);
        for ttl in [600, 600, 599, 600, 0, 664, 600, -3] {
            let expected = cache_status(&hit(ttl)).1;
            assert_eq!(expected, format!("narrative-cache; hit; ttl={ttl}"));
            assert_eq!(fresh_hit_status(&hit(ttl)).unwrap(), expected.as_str());
        }
    }

    #[test]
    fn generated_at_is_rfc3339_utc() {
        assert_eq!(rfc3339(1_767_225_600_123), "2026-01-01T00:00:00.123Z");
    }
}
