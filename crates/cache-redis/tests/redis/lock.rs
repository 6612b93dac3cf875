//! The fill lock and the signal bus against a real redis-server.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use cache_core::CacheKey;
use cache_redis::backend::{RedisBackend, RedisTarget, RedisTimeouts};
use cache_redis::lock::{Acquired, FencedWrite, FillLock, LockToken, WriteMode};
use cache_redis::signals::{Signal, SignalBus};
use redis::AsyncCommands;
use tokio_util::sync::CancellationToken;

fn backend() -> Arc<RedisBackend> {
    let target = RedisTarget::parse(&test_kit::redis().url, false).expect("url");
    Arc::new(RedisBackend::new(target, RedisTimeouts::default()))
}

fn key(n: u8) -> CacheKey {
    let unique = test_kit::unique_prefix("lock");
    let digest: String = format!("{unique}{n}")
        .bytes()
        .map(|b| format!("{:02x}", b))
        .collect::<String>();
    let digest = format!("{digest:0>64}");
    CacheKey::parse(&format!(
        "narr:narrative@1.0.0:0123456789ab:{{{}}}",
        &digest[digest.len() - 64..]
    ))
    .expect("key")
}

#[tokio::test]
async fn one_holder_at_a_time_and_only_the_holder_releases() {
    let lock = FillLock::new(backend(), Duration::from_secs(5));
    let key = key(1);
    let token = lock
        .try_acquire(&key)
        .await
        .expect("redis")
        .expect("free lock is taken");
    assert!(
        lock.try_acquire(&key).await.expect("redis").is_none(),
        "held lock is not taken twice"
    );
    assert!(lock.extend(&key, &token).await.expect("redis"));

    let mut raw = redis::Client::open(test_kit::redis().url.as_str())
        .expect("url")
        .get_multiplexed_async_connection()
        .await
        .expect("conn");
    let held_by: String = raw.get(key.lock_key()).await.expect("GET");
    assert_eq!(held_by, token.as_str());

    assert!(lock.release(&key, &token).await.expect("redis"));
    assert!(
        !lock.release(&key, &token).await.expect("redis"),
        "releasing twice does nothing"
    );
    assert!(!lock.is_held(&key).await.expect("redis"));
}

#[tokio::test]
async fn a_holder_whose_lock_expired_can_neither_release_nor_write_over_the_new_holder() {
    let lock = FillLock::new(backend(), Duration::from_millis(100));
    let key = key(2);
    let ttl = Duration::from_secs(60);
    let stale = lock.try_acquire(&key).await.expect("redis").expect("taken");
    let first = lock
        .write_if_held(&key, &stale, b"first".to_vec(), ttl, WriteMode::IfAbsent)
        .await;
    assert_eq!(first.expect("redis"), FencedWrite::Written);

    // The lock's TTL passes (Redis expires it; nothing to wait on but the clock).
    tokio::time::sleep(Duration::from_millis(150)).await;
    let fresh = lock
        .try_acquire(&key)
        .await
        .expect("redis")
        .expect("expired lock is taken over");
    let newer = lock
        .write_if_held(&key, &fresh, b"newer".to_vec(), ttl, WriteMode::Replace)
        .await;
    assert_eq!(newer.expect("redis"), FencedWrite::Written);

    let late = lock
        .write_if_held(&key, &stale, b"late".to_vec(), ttl, WriteMode::Replace)
        .await;
    assert_eq!(late.expect("redis"), FencedWrite::LockLost);
    assert!(
        !lock.release(&key, &stale).await.expect("redis"),
        "the stale token does not delete the new lock"
    );
    assert!(!lock.extend(&key, &stale).await.expect("redis"));
    assert!(lock.is_held(&key).await.expect("redis"));
    let mut raw = redis::Client::open(test_kit::redis().url.as_str())
        .expect("url")
        .get_multiplexed_async_connection()
        .await
        .expect("conn");
    let value: Vec<u8> = raw.get(key.as_str()).await.expect("GET");
    assert_eq!(value, b"newer");
}

#[tokio::test]
async fn a_fill_never_replaces_a_value_that_is_already_stored() {
    let lock = FillLock::new(backend(), Duration::from_secs(5));
    let key = key(4);
    let mut raw = redis::Client::open(test_kit::redis().url.as_str())
        .expect("url")
        .get_multiplexed_async_connection()
        .await
        .expect("conn");
    let _: () = raw
        .set_ex(key.as_str(), "stored earlier", 60)
        .await
        .expect("SET");
    let token = lock.try_acquire(&key).await.expect("redis").expect("taken");
    let fill = lock
        .write_if_held(
            &key,
            &token,
            b"regenerated".to_vec(),
            Duration::from_secs(60),
            WriteMode::IfAbsent,
        )
        .await;
    assert_eq!(fill.expect("redis"), FencedWrite::AlreadyStored);
    let value: String = raw.get(key.as_str()).await.expect("GET");
    assert_eq!(value, "stored earlier");
}

#[tokio::test]
async fn signals_reach_waiters_on_other_instances_and_drop_their_l1_copies() {
    let shutdown = CancellationToken::new();
    let forgotten = Arc::new(Mutex::new(Vec::new()));
    let seen = Arc::clone(&forgotten);
    let a = SignalBus::new(backend(), move |key: &CacheKey| {
        seen.lock().expect("lock").push(key.clone())
    });
    let b = SignalBus::new(backend(), |_: &CacheKey| {});
    a.spawn(shutdown.clone());
    b.spawn(shutdown.clone());
    for bus in [&a, &b] {
        for _ in 0..200 {
            if bus.is_subscribed() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert!(bus.is_subscribed());
    }

    let key = key(3);
    let mut waiter = a.waiter(&key);
    b.publish(Signal::Done, &key).await.expect("publish");
    let signal = tokio::time::timeout(Duration::from_secs(5), waiter.next())
        .await
        .expect("signal arrives");
    assert_eq!(signal, Some(Signal::Done));
    assert_eq!(
        *forgotten.lock().expect("lock"),
        vec![key.clone()],
        "the other instance's L1 copy is dropped"
    );

    b.publish(Signal::Failed, &key).await.expect("publish");
    assert_eq!(
        tokio::time::timeout(Duration::from_secs(5), waiter.next())
            .await
            .expect("signal"),
        Some(Signal::Failed)
    );
    shutdown.cancel();
}

#[tokio::test]
async fn an_erasure_revokes_the_lock_and_fences_work_begun_before_it() {
    let lock = FillLock::new(backend(), Duration::from_secs(5));
    let key = key(9);
    let ttl = Duration::from_secs(60);
    let before = cache_core::now_ms() - 1;
    let Acquired::Taken(in_flight) = lock.try_acquire_since(&key, before).await.expect("redis")
    else {
        panic!("a free lock is taken");
    };
    // The erasure comes while that generation runs.
    assert!(
        !lock.erase(&key, ttl).await.expect("redis"),
        "nothing stored yet"
    );
    assert_eq!(
        lock.write_if_held(&key, &in_flight, b"old".to_vec(), ttl, WriteMode::IfAbsent)
            .await
            .expect("redis"),
        FencedWrite::LockLost,
        "the generation in flight cannot store"
    );
    assert_eq!(
        lock.try_acquire_since(&key, before).await.expect("redis"),
        Acquired::Erased,
        "nor can work begun before the erasure take the lock again"
    );
    let stale_job = cache_redis::lock::LockToken::from_job("queued-before".to_owned());
    assert!(!lock.adopt(&key, &stale_job, before).await.expect("redis"));

    // Work begun after it stores as usual.
    tokio::time::sleep(Duration::from_millis(5)).await;
    let after = cache_core::now_ms();
    let Acquired::Taken(fresh) = lock.try_acquire_since(&key, after).await.expect("redis") else {
        panic!("work after the erasure takes the lock");
    };
    assert_eq!(
        lock.write_if_held(&key, &fresh, b"new".to_vec(), ttl, WriteMode::IfAbsent)
            .await
            .expect("redis"),
        FencedWrite::Written
    );
    assert!(lock.release(&key, &fresh).await.expect("redis"));
    let new_job = cache_redis::lock::LockToken::from_job("queued-after".to_owned());
    assert!(lock.adopt(&key, &new_job, after).await.expect("redis"));
    assert!(
        lock.erase(&key, ttl).await.expect("redis"),
        "a stored value is deleted"
    );
}

/// An acquire asked again with the same token (after a call that timed out but may
/// have landed) finds the lock its own; another token still finds it held.
#[tokio::test]
async fn acquiring_again_with_the_same_token_is_idempotent() {
    let lock = FillLock::new(backend(), Duration::from_secs(5));
    let key = key(9);
    let since = cache_core::now_ms();
    let token = LockToken::random();
    for attempt in 0..2 {
        assert_eq!(
            lock.try_acquire_as(&key, token.clone(), since)
                .await
                .expect("redis"),
            Acquired::Taken(token.clone()),
            "attempt {attempt}"
        );
    }
    assert_eq!(
        lock.try_acquire_as(&key, LockToken::random(), since)
            .await
            .expect("redis"),
        Acquired::Held
    );
    assert!(lock.release(&key, &token).await.expect("redis"));
}
