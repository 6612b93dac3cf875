//! The fleet's user index against real Redis: sets that expire, per-slot pipelines on a
//! Cluster, and one refused set that neither fails another user's erasure nor holds
//! up the rest of a flush.

use std::sync::Arc;
use std::time::Duration;

use cache_core::{CacheKey, UserIndex};
use cache_redis::backend::{RedisBackend, RedisTarget, RedisTimeouts};
use cache_redis::RedisUserIndex;
use redis::AsyncCommands;

fn index(url: &str, cluster: bool, ttl: Duration) -> RedisUserIndex {
    let target = RedisTarget::parse(url, cluster).expect("url");
    RedisUserIndex::new(
        Arc::new(RedisBackend::new(target, RedisTimeouts::default())),
        ttl,
    )
}

fn key(n: u32) -> CacheKey {
    CacheKey::parse(&format!("narr:v1:0123456789ab:{{{n:064x}}}")).expect("key")
}

fn user(label: &str, n: u32) -> String {
    format!("{}{n}", test_kit::unique_prefix(label))
}

async fn redis(url: &str) -> redis::aio::MultiplexedConnection {
    redis::Client::open(url)
        .expect("url")
        .get_multiplexed_async_connection()
        .await
        .expect("redis")
}

/// Seen in a review: the sets had no TTL, so random user ids grew them without
/// bound, and under `volatile-lfu` they pushed narratives out instead.
#[tokio::test]
async fn sets_expire_no_sooner_than_the_ttl_they_were_given() {
    let url = &test_kit::redis().url;
    let ttl = Duration::from_secs(3600);
    let index = index(url, false, ttl);
    let alice = user("ttl", 1);
    index.record(&alice, &key(1));
    index.flush().await.expect("flush");
    let pttl: i64 = redis(url)
        .await
        .pttl(format!("useridx:{{{alice}}}"))
        .await
        .expect("PTTL");
    assert!(pttl > 3_590_000 && pttl <= 3_600_000, "PTTL {pttl}");
    assert_eq!(index.keys(&alice).await.expect("keys"), [key(1)]);
}

/// Seen in a review: reading a user's keys flushed every buffered user first, so one
/// failing set made every erasure a 503. And a refused set must not be retried
/// forever, in front of the others.
#[tokio::test]
async fn a_refused_set_fails_neither_another_users_erasure_nor_the_rest_of_a_flush() {
    let url = &test_kit::redis().url;
    let index = index(url, false, Duration::from_secs(3600));
    let broken = user("refused", 0);
    // A set Redis refuses to add to: the key holds a string.
    let mut conn = redis(url).await;
    let _: () = conn
        .set(format!("useridx:{{{broken}}}"), "not a set")
        .await
        .expect("SET");
    index.record(&broken, &key(1));
    let others: Vec<String> = (1..=20).map(|n| user("refused", n)).collect();
    for (n, other) in (2..).zip(&others) {
        index.record(other, &key(n));
    }
    // Erasing one of the others reads its keys: not failed by the broken set.
    assert_eq!(index.keys(&others[0]).await.expect("keys"), [key(2)]);
    // The flush writes everyone else, and drops the refused set rather than keep it.
    assert!(index.flush().await.is_err(), "the refused set is reported");
    for (n, other) in (2..).zip(&others) {
        assert_eq!(index.keys(other).await.expect("keys"), [key(n)]);
    }
    index
        .flush()
        .await
        .expect("nothing refused is left to retry");
}

/// Each pipeline's sets share a Cluster slot; users spread over every master are
/// all written in one flush.
#[tokio::test]
async fn a_flush_on_a_cluster_writes_users_of_every_slot() {
    let url = &test_kit::redis_cluster().url;
    let index = index(url, true, Duration::from_secs(3600));
    let users: Vec<String> = (0..200).map(|n| user("cluster", n)).collect();
    for (n, each) in (0..).zip(&users) {
        index.record(each, &key(n));
    }
    index.flush().await.expect("flush");
    for (n, each) in (0..).zip(&users) {
        assert_eq!(index.keys(each).await.expect("keys"), [key(n)]);
    }
}
