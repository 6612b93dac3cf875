//! The Postgres store against a real PostgreSQL (one cluster per test binary, a
//! database per test): migrations, idempotent inserts, rollups, partitions, retention,
//! the append-only audit log.

use std::time::Duration;

use analytics::event::{GenerationOutcome, RequestOutcome, Trigger};
use analytics::{new_event_id, Batch, GenerationEvent, PgStore, Range, RequestEvent};
use sqlx::Row;
use time::OffsetDateTime;

async fn store(label: &str) -> PgStore {
    let url = test_kit::postgres().database(label);
    let store = PgStore::connect_lazy(&url, 4, Duration::from_secs(5)).expect("store");
    store.migrate().await.expect("migrate");
    store
}

fn request(outcome: RequestOutcome, system: &str, at: OffsetDateTime) -> RequestEvent {
    RequestEvent {
        id: new_event_id(),
        at,
        outcome,
        latency_us: 420,
        engine_version: "narrative@1.0.0".into(),
        prompt_hash: "e589996ee664".into(),
        classification: "primary".into(),
        primary_system: system.into(),
        client: "anonymous".into(),
        user_hash: Some("5f1c0b2a".into()),
        key_digest: format!("digest-{system}").into(),
        profile: format!(r#"{{"classification":"primary","primary":"{system}"}}"#).into(),
        entry_tokens: 700,
        entry_cost_usd: 0.0021,
        first_delta_us: None,
    }
}

fn generation(outcome: GenerationOutcome, at: OffsetDateTime) -> GenerationEvent {
    GenerationEvent {
        id: new_event_id(),
        at,
        model: "gpt-4o-mini".to_owned(),
        tokens_in: 400,
        tokens_out: 300,
        cost_usd: 0.0021,
        duration_ms: 1_500,
        attempts: 1,
        outcome,
        trigger: Trigger::Miss,
        key_digest: "digest-Sirius".into(),
    }
}

async fn count(store: &PgStore, sql: &str) -> i64 {
    sqlx::query_scalar(sql)
        .fetch_one(store.pool())
        .await
        .unwrap_or_else(|e| panic!("{sql}: {e}"))
}

#[tokio::test]
async fn migrations_apply_to_an_empty_database_and_rerun_as_a_no_op() {
    let store = store("migrate").await;
    let tables = count(
        &store,
        "SELECT count(*) FROM pg_tables WHERE schemaname = 'public' AND tablename IN \
         ('request_events', 'generation_events', 'request_rollup_minute', 'request_rollup_hour', \
          'request_latency_minute', 'generation_rollup_minute', 'generation_rollup_hour', \
          'system_rollup_hour', 'profiles', 'profile_popularity_daily', 'audit_log')",
    )
    .await;
    assert_eq!(tables, 11);
    let applied = count(&store, "SELECT count(*) FROM _sqlx_migrations").await;
    store.migrate().await.expect("second run");
    store.migrate().await.expect("third run");
    assert_eq!(
        count(&store, "SELECT count(*) FROM _sqlx_migrations").await,
        applied
    );
}

#[tokio::test]
async fn a_batch_inserted_twice_is_stored_and_counted_once() {
    let store = store("idempotent").await;
    let now = OffsetDateTime::now_utc();
    let mut batch = Batch::new();
    batch.requests = vec![
        request(RequestOutcome::Miss, "Sirius", now),
        request(RequestOutcome::HitL1, "Sirius", now),
        request(RequestOutcome::HitL2, "Sirius", now),
        request(RequestOutcome::Stale, "Lyra", now),
        request(RequestOutcome::Fallback, "Lyra", now),
        request(RequestOutcome::Error, "Orion", now),
    ];
    batch.generations = vec![
        generation(GenerationOutcome::Ok, now),
        generation(GenerationOutcome::Failed, now),
    ];
    let first = store.insert(&batch).await.expect("insert");
    assert_eq!((first.requests, first.generations), (6, 2));
    let again = store.insert(&batch).await.expect("insert again");
    assert_eq!((again.requests, again.generations), (0, 0));

    assert_eq!(
        count(&store, "SELECT count(*) FROM request_events").await,
        6
    );
    assert_eq!(
        count(&store, "SELECT count(*) FROM generation_events").await,
        2
    );
    let minute = sqlx::query(
        "SELECT sum(requests)::int8 AS requests, sum(hits_l1)::int8 AS l1, sum(hits_l2)::int8 AS l2, \
                sum(stale)::int8 AS stale, sum(misses)::int8 AS misses, \
                sum(fallbacks)::int8 AS fallbacks, sum(errors)::int8 AS errors, \
                sum(tokens_saved)::int8 AS tokens_saved FROM request_rollup_minute",
    )
    .fetch_one(store.pool())
    .await
    .expect("minute rollup");
    let get = |name: &str| minute.get::<i64, _>(name);
    assert_eq!(
        [
            get("requests"),
            get("l1"),
            get("l2"),
            get("stale"),
            get("misses"),
            get("fallbacks"),
            get("errors")
        ],
        [6, 1, 1, 1, 1, 1, 1]
    );
    assert_eq!(
        get("tokens_saved"),
        3 * 700,
        "three hits credit their entry's tokens"
    );
    assert_eq!(
        count(
            &store,
            "SELECT sum(requests)::int8 FROM request_rollup_hour"
        )
        .await,
        6
    );
    assert_eq!(
        count(
            &store,
            "SELECT sum(requests)::int8 FROM request_latency_minute"
        )
        .await,
        6
    );
    assert_eq!(
        count(
            &store,
            "SELECT sum(requests)::int8 FROM profile_popularity_daily"
        )
        .await,
        6
    );
    assert_eq!(count(&store, "SELECT count(*) FROM profiles").await, 3);

    let range = Range::parse(None, None, now + time::Duration::minutes(1)).unwrap();
    let summary = store.summary(&range).await.expect("summary");
    assert_eq!(summary.total_requests, 6);
    assert_eq!(summary.cache_hits, 3);
    assert_eq!(summary.cache_misses, 2);
    assert_eq!(summary.errors, Some(1));
    assert_eq!(summary.hit_rate, 0.6);
    assert_eq!(summary.top_systems[0].system, "Sirius");
    assert_eq!(summary.top_systems[0].count, 3);
    assert_eq!(summary.generations, Some(1));
    assert_eq!(summary.failed_generations, Some(1));
    assert_eq!(summary.avg_generation_time, Some(1_500.0));
    assert_eq!(summary.estimated_cost, Some(0.0042));
    assert_eq!(summary.cost_saved, Some(0.0063));
    assert_eq!(
        summary
            .hit_rate_by_hour
            .iter()
            .map(|b| b.requests)
            .sum::<u64>(),
        6
    );
    assert_eq!(summary.hit_rate_by_day.len(), 1);

    let before = Range {
        from: now - time::Duration::days(2),
        to: now - time::Duration::days(1),
    };
    assert_eq!(store.summary(&before).await.unwrap().total_requests, 0);
}

#[tokio::test]
async fn events_land_in_daily_partitions_and_retention_drops_old_days() {
    let store = store("partitions").await;
    let now = OffsetDateTime::now_utc();
    let old = now - time::Duration::days(10);
    let mut batch = Batch::new();
    batch.requests = vec![
        request(RequestOutcome::Miss, "Sirius", old),
        request(RequestOutcome::HitL1, "Sirius", now),
    ];
    // No partitions yet: both land in the default partition, none is refused.
    store.insert(&batch).await.expect("insert");
    let in_default = "SELECT count(*) FROM request_events_default";
    assert_eq!(count(&store, in_default).await, 2);

    // Creating today's partition (and the week ahead) moves today's row into it.
    store
        .ensure_partitions(now.date(), 7)
        .await
        .expect("partitions");
    assert_eq!(count(&store, in_default).await, 1);
    let today = analytics::store::partition_name("request_events", now.date());
    assert_eq!(
        count(&store, &format!("SELECT count(*) FROM {today}")).await,
        1
    );
    // New rows go straight to their day.
    let mut later = Batch::new();
    later.requests = vec![request(RequestOutcome::HitL2, "Lyra", now)];
    store.insert(&later).await.expect("insert");
    assert_eq!(
        count(&store, &format!("SELECT count(*) FROM {today}")).await,
        2
    );
    // Re-running creates nothing.
    assert_eq!(store.ensure_partitions(now.date(), 7).await.unwrap(), 0);

    // The old day's partition is created (its row moves in), then dropped by retention.
    store
        .ensure_partitions(old.date(), 0)
        .await
        .expect("old partitions");
    assert_eq!(count(&store, in_default).await, 0);
    let dropped = store
        .apply_retention(now, Duration::from_secs(5 * 86_400))
        .await
        .expect("retention");
    assert!(dropped >= 2, "the old day's partitions go: {dropped}");
    assert_eq!(
        count(&store, "SELECT count(*) FROM request_events").await,
        2
    );
    assert_eq!(
        count(
            &store,
            "SELECT count(*) FROM request_rollup_minute WHERE bucket < now() - interval '5 days'"
        )
        .await,
        0
    );
    // Hourly rollups are kept.
    assert_eq!(
        count(
            &store,
            "SELECT sum(requests)::int8 FROM request_rollup_hour"
        )
        .await,
        3
    );
}

#[tokio::test]
async fn the_audit_log_is_append_only() {
    let store = store("audit").await;
    store
        .audit(
            "admin",
            "erase",
            Some("5f1c0b2a"),
            serde_json::json!({"deleted": 3}),
        )
        .await
        .expect("append");
    for statement in [
        "UPDATE audit_log SET actor = 'someone else'",
        "DELETE FROM audit_log",
        "TRUNCATE audit_log",
    ] {
        let refused = sqlx::query(statement).execute(store.pool()).await;
        assert!(refused.is_err(), "{statement} must fail");
    }
    assert_eq!(count(&store, "SELECT count(*) FROM audit_log").await, 1);
}

#[tokio::test]
async fn top_profiles_are_the_most_requested_across_versions_within_the_window() {
    let store = store("popular").await;
    let now = OffsetDateTime::now_utc();
    let mut batch = Batch::new();
    for (system, times) in [("Sirius", 5), ("Lyra", 2), ("Vega", 3)] {
        for i in 0..times {
            let mut event = request(RequestOutcome::HitL1, system, now);
            // The same profile under two engine versions is one profile.
            if i % 2 == 1 {
                event.engine_version = "narrative@2.0.0".into();
            }
            batch.requests.push(event);
        }
    }
    let mut old = request(
        RequestOutcome::HitL1,
        "Orion",
        now - time::Duration::days(40),
    );
    old.key_digest = "digest-old".into();
    batch.requests.push(old);
    store.insert(&batch).await.expect("insert");

    let top = store
        .top_profiles(2, now - time::Duration::days(30))
        .await
        .expect("top profiles");
    let found: Vec<(String, u64)> = top
        .iter()
        .map(|p| {
            let value: serde_json::Value = serde_json::from_str(&p.canonical).unwrap();
            (value["primary"].as_str().unwrap().to_owned(), p.requests)
        })
        .collect();
    assert_eq!(found, [("Sirius".to_owned(), 5), ("Vega".to_owned(), 3)]);
    let all = store
        .top_profiles(10, now - time::Duration::days(30))
        .await
        .expect("top profiles");
    assert_eq!(all.len(), 3, "Orion was requested before the window");
}

#[tokio::test]
async fn an_erased_user_has_no_events_left_and_late_ones_arrive_without_them() {
    let store = store("erase").await;
    let now = OffsetDateTime::now_utc();
    let mine = |at| {
        let mut event = request(RequestOutcome::HitL1, "Sirius", at);
        event.user_hash = Some("erase-me".into());
        event
    };
    let mut batch = Batch::new();
    batch.requests.push(mine(now - time::Duration::days(2)));
    batch.requests.push(mine(now - time::Duration::minutes(1)));
    batch
        .requests
        .push(request(RequestOutcome::Miss, "Lyra", now));
    store.insert(&batch).await.expect("insert");

    assert_eq!(store.erase_user("erase-me").await.expect("erase"), 2);
    assert_eq!(
        count(
            &store,
            "SELECT count(*) FROM request_events WHERE user_hash = 'erase-me'"
        )
        .await,
        0
    );
    // An event from before the erasure, still queued then, lands without the user.
    let mut late = Batch::new();
    late.requests.push(mine(now - time::Duration::seconds(30)));
    store.insert(&late).await.expect("insert");
    assert_eq!(
        count(
            &store,
            "SELECT count(*) FROM request_events WHERE user_hash = 'erase-me'"
        )
        .await,
        0
    );
    assert_eq!(
        count(&store, "SELECT count(*) FROM request_events").await,
        2
    );
    assert_eq!(
        count(
            &store,
            "SELECT sum(requests)::int8 FROM request_rollup_minute"
        )
        .await,
        4,
        "the totals keep every request"
    );
    // Idempotent.
    assert_eq!(store.erase_user("erase-me").await.expect("erase"), 0);
}

/// Seen in a review: the erasure marker kept the user's hash forever, though it is
/// needed only while an event of theirs can still arrive.
#[tokio::test]
async fn erasure_markers_are_kept_as_long_as_events_are() {
    let store = store("erase-retention").await;
    let now = OffsetDateTime::now_utc();
    store.erase_user("erased-long-ago").await.expect("erase");
    store.erase_user("erased-today").await.expect("erase");
    sqlx::query(
        "UPDATE erased_users SET erased_at = now() - interval '10 days' \
         WHERE user_hash = 'erased-long-ago'",
    )
    .execute(store.pool())
    .await
    .expect("backdate");
    store
        .apply_retention(now, Duration::from_secs(5 * 86_400))
        .await
        .expect("retention");
    let left: Vec<String> = sqlx::query_scalar("SELECT user_hash FROM erased_users ORDER BY 1")
        .fetch_all(store.pool())
        .await
        .expect("markers");
    assert_eq!(left, ["erased-today"]);
}

#[tokio::test]
async fn a_streamed_answer_keeps_its_time_to_first_text() {
    let store = store("first-delta").await;
    let now = OffsetDateTime::now_utc();
    let mut streamed = request(RequestOutcome::Miss, "Lyra", now);
    streamed.first_delta_us = Some(412_000);
    let mut batch = Batch::new();
    batch.requests = vec![streamed, request(RequestOutcome::HitL1, "Lyra", now)];
    store.insert(&batch).await.expect("insert");
    let rows = sqlx::query("SELECT outcome, first_delta_us FROM request_events ORDER BY outcome")
        .fetch_all(store.pool())
        .await
        .expect("rows");
    let read: Vec<(String, Option<i64>)> = rows
        .iter()
        .map(|row| (row.get("outcome"), row.get("first_delta_us")))
        .collect();
    assert_eq!(
        read,
        [
            ("hit_l1".to_owned(), None),
            ("miss".to_owned(), Some(412_000))
        ],
        "null for an answer that did not stream"
    );
}
