//! The Redis store, tiering and failure handling against a real redis-server.

use std::sync::Arc;
use std::time::Duration;

use base64::Engine as _;
use cache_core::{now_ms, CacheKey, CacheStore, Envelope, MemoryStore, StoreError, TieredStore};
use cache_redis::backend::{RedisBackend, RedisTarget, RedisTimeouts};
use cache_redis::codec::{EncryptionKeys, ValueCodec};
use cache_redis::RedisStore;
use redis::AsyncCommands;
use test_kit::RedisServer;

fn backend(url: &str) -> Arc<RedisBackend> {
    let timeouts = RedisTimeouts {
        call: Duration::from_millis(200),
        connect: Duration::from_millis(200),
        cool_down: Duration::from_millis(300),
        ..RedisTimeouts::default()
    };
    Arc::new(RedisBackend::new(
        RedisTarget::parse(url, false).expect("url"),
        timeouts,
    ))
}

fn key(label: &str) -> CacheKey {
    // A unique digest per test keeps tests on the shared server apart.
    let prefix = test_kit::unique_prefix(label);
    let digest = format!(
        "{:0>64}",
        prefix
            .bytes()
            .map(|b| format!("{:x}", b % 16))
            .collect::<String>()
    );
    CacheKey::parse(&format!(
        "narr:narrative@1.0.0:0123456789ab:{{{}}}",
        &digest[digest.len() - 64..]
    ))
    .expect("key")
}

fn envelope(body: &str) -> Arc<Envelope> {
    Arc::new(Envelope {
        body: body.to_owned(),
        created_at_ms: now_ms(),
        engine_version: "narrative@1.0.0".into(),
        prompt_hash: "0123456789ab".into(),
        model: "gpt-4o-mini".into(),
        tokens_in: 410,
        tokens_out: 390,
        cost_usd: 0.0003,
        generation_ms: 1900,
    })
}

const NARRATIVE: &str = "Your Pleiadian thread shows in how you gather people and tend to them. \
    Around that core, Sirius adds a drive toward mastery and quiet transformation. \
    As a Generator, your strategy is to respond; your sacral yes is your compass.";

async fn raw(url: &str) -> redis::aio::MultiplexedConnection {
    redis::Client::open(url)
        .expect("url")
        .get_multiplexed_async_connection()
        .await
        .expect("raw connection")
}

#[tokio::test]
async fn values_round_trip_with_their_ttl_compressed() {
    let url = &test_kit::redis().url;
    let store = RedisStore::new(backend(url), ValueCodec::default());
    let key = key("roundtrip");
    assert!(store.get(&key).await.expect("get").is_none());
    store
        .put(&key, envelope(NARRATIVE), Duration::from_secs(3600))
        .await
        .expect("put");
    assert_eq!(
        store.get(&key).await.expect("get").expect("hit").body,
        NARRATIVE
    );

    let mut raw = raw(url).await;
    let ttl_ms: i64 = raw.pttl(key.as_str()).await.expect("PTTL");
    assert!((3_590_000..=3_600_000).contains(&ttl_ms), "{ttl_ms}");
    let stored: Vec<u8> = raw.get(key.as_str()).await.expect("GET");
    assert!(
        stored.len() < envelope(NARRATIVE).encode().len(),
        "compressed: {} bytes",
        stored.len()
    );

    assert!(store.delete(&key).await.expect("delete"));
    assert!(store.get(&key).await.expect("get").is_none());
}

/// A reader reuses what it decoded only while Redis answers the same bytes: another
/// instance's new value, a corrupted value and a deletion are each seen at once.
#[tokio::test]
async fn a_value_read_again_is_decoded_once_and_never_answered_stale() {
    let url = &test_kit::redis().url;
    let secret = base64::engine::general_purpose::STANDARD.encode([7u8; 32]);
    let keys = EncryptionKeys::parse(&format!("k1:{secret}")).expect("keys");
    let (reader, writer) = (
        RedisStore::new(backend(url), ValueCodec::new(Some(keys.clone()))),
        RedisStore::new(backend(url), ValueCodec::new(Some(keys))),
    );
    let key = key("decoded-once");
    writer
        .put(&key, envelope(NARRATIVE), Duration::from_secs(3600))
        .await
        .expect("put");
    let first = reader.get(&key).await.expect("get").expect("hit");
    let again = reader.get(&key).await.expect("get").expect("hit");
    assert!(
        Arc::ptr_eq(&first, &again),
        "the same bytes are not decoded twice"
    );

    // Another instance replaces the value: the next read decodes the new bytes.
    writer
        .put(
            &key,
            envelope("A new narrative."),
            Duration::from_secs(3600),
        )
        .await
        .expect("put");
    assert_eq!(
        reader.get(&key).await.expect("get").expect("hit").body,
        "A new narrative."
    );

    // Bytes that no longer open are an error, not the envelope decoded before.
    let mut raw = raw(url).await;
    let mut stored: Vec<u8> = raw.get(key.as_str()).await.expect("GET");
    let last = stored.len() - 1;
    stored[last] ^= 1;
    let _: () = raw.set(key.as_str(), stored).await.expect("SET");
    assert!(matches!(
        reader.get(&key).await,
        Err(StoreError::Corrupt(_))
    ));

    let _: () = raw.del(key.as_str()).await.expect("DEL");
    assert!(reader.get(&key).await.expect("get").is_none());
}

#[tokio::test]
async fn sealed_values_hold_no_plaintext_and_do_not_open_under_another_key() {
    let url = &test_kit::redis().url;
    let secret = base64::engine::general_purpose::STANDARD.encode([9u8; 32]);
    let keys = EncryptionKeys::parse(&format!("k1:{secret}")).expect("keys");
    let store = RedisStore::new(backend(url), ValueCodec::new(Some(keys)));
    let (original, moved) = (key("sealed"), key("moved"));
    store
        .put(&original, envelope(NARRATIVE), Duration::from_secs(60))
        .await
        .expect("put");

    let mut raw = raw(url).await;
    let stored: Vec<u8> = raw.get(original.as_str()).await.expect("GET");
    let text = String::from_utf8_lossy(&stored);
    for word in [
        "Pleiadian",
        "Sirius",
        "Generator",
        "gpt-4o-mini",
        "narrative@1.0.0",
    ] {
        assert!(!text.contains(word), "{word:?} readable in Redis");
    }
    let _: () = raw.set(moved.as_str(), stored).await.expect("SET");
    assert!(
        matches!(store.get(&moved).await, Err(StoreError::Corrupt(_))),
        "a moved value must not open"
    );
    assert_eq!(
        store.get(&original).await.expect("get").expect("hit").body,
        NARRATIVE
    );
}

#[tokio::test]
async fn stats_count_narratives_only() {
    let server = RedisServer::start();
    let store = RedisStore::new(backend(&server.url), ValueCodec::default());
    for n in 0..5 {
        store
            .put(
                &key(&format!("count{n}")),
                envelope(NARRATIVE),
                Duration::from_secs(60),
            )
            .await
            .expect("put");
    }
    let mut raw = raw(&server.url).await;
    let _: () = raw
        .set_ex(format!("lock:{}", key("lock")), "token", 60)
        .await
        .expect("lock");
    let _: () = raw.set("stats:hits", 10).await.expect("counter");
    let stats = store.stats().await.expect("stats");
    assert_eq!(stats.entries, 5);
    assert!(stats.memory_bytes > 0);
}

#[tokio::test]
async fn an_unreachable_redis_fails_fast_behind_the_breaker_and_is_found_again() {
    let mut server = RedisServer::start();
    let port = server.port();
    let backend = backend(&server.url);
    let store = RedisStore::new(Arc::clone(&backend), ValueCodec::default());
    let key = key("breaker");
    store
        .put(&key, envelope(NARRATIVE), Duration::from_secs(60))
        .await
        .expect("put while up");

    drop(server);
    let mut errors = Vec::new();
    for _ in 0..5 {
        errors.push(store.get(&key).await.expect_err("redis is down"));
    }
    assert!(
        matches!(errors.last(), Some(StoreError::Unavailable(m)) if m.contains("circuit open")),
        "after repeated failures calls are refused without trying: {errors:?}"
    );
    assert_eq!(backend.state().as_str(), "down");

    server = RedisServer::start_on(port);
    let back =
        wait_until_ok(|| store.put(&key, envelope(NARRATIVE), Duration::from_secs(60))).await;
    assert!(back, "the store recovers by itself once Redis is back");
    assert_eq!(
        store.get(&key).await.expect("get").expect("hit").body,
        NARRATIVE
    );
    drop(server);
}

#[tokio::test]
async fn a_process_started_before_redis_connects_when_it_arrives() {
    let port = test_kit::free_port();
    let store = RedisStore::new(
        backend(&format!("redis://127.0.0.1:{port}")),
        ValueCodec::default(),
    );
    let key = key("late");
    assert!(store.get(&key).await.is_err(), "nothing listens yet");
    let _server = RedisServer::start_on(port);
    assert!(wait_until_ok(|| store.put(&key, envelope(NARRATIVE), Duration::from_secs(60))).await);
    assert!(store.get(&key).await.expect("get").is_some());
}

#[tokio::test]
async fn l2_hits_fill_l1_which_serves_while_l2_is_down() {
    let server = RedisServer::start();
    let l2 = Arc::new(RedisStore::new(backend(&server.url), ValueCodec::default()));
    let writer = RedisStore::new(backend(&server.url), ValueCodec::default());
    let tiered = TieredStore::new(
        MemoryStore::new(1 << 20),
        Duration::from_secs(60),
        l2,
        Duration::from_secs(3600),
    );
    let key = key("tiers");
    writer
        .put(&key, envelope(NARRATIVE), Duration::from_secs(3600))
        .await
        .expect("put");

    assert!(tiered.get(&key).await.expect("get").is_some());
    assert!(tiered.get(&key).await.expect("get").is_some());
    let hits = tiered.tier_hits();
    assert_eq!((hits.l1, hits.l2), (1, 1), "first from L2, then from L1");

    drop(server);
    assert!(tiered
        .get(&key)
        .await
        .expect("L1 answers without asking L2")
        .is_some());
    let other = self::key("tiers-miss");
    assert!(
        tiered.get(&other).await.is_err(),
        "a miss needs L2, which is down"
    );
    tiered
        .put(
            &other,
            envelope("made while L2 was down"),
            Duration::from_secs(60),
        )
        .await
        .expect_err("L2 refuses");
    assert!(tiered.get(&other).await.expect("L1 kept it").is_some());
}

/// Retries `op` (bounded: 5 s) until it succeeds; the breaker's cool-down decides when
/// the next probe goes out, so there is no signal to wait on instead.
async fn wait_until_ok<F, Fut, T>(mut op: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, StoreError>>,
{
    for _ in 0..100 {
        if op().await.is_ok() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    false
}

/// Concurrent callers against an unreachable Redis do not queue behind each other's
/// connect attempts: all of them are answered within about one attempt's time. (The
/// bound is loose on purpose; the failure it guards against took a second per caller.)
#[tokio::test]
async fn callers_do_not_queue_behind_failing_connects() {
    // A "server" that accepts connections (the kernel does, into the backlog) and never
    // answers: every connect attempt hangs until its timeout.
    let silent = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = silent.local_addr().expect("addr").port();
    let store = Arc::new(RedisStore::new(
        backend(&format!("redis://127.0.0.1:{port}")),
        ValueCodec::default(),
    ));
    let started = std::time::Instant::now();
    let calls = (0..50).map(|n| {
        let store = Arc::clone(&store);
        tokio::spawn(async move { store.get(&key(&format!("queue{n}"))).await })
    });
    for call in calls {
        assert!(call.await.expect("task").is_err());
    }
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "50 callers took {:?}",
        started.elapsed()
    );
}
