//! Live streams against a real redis-server: which generation's text a relay shows.

use std::sync::Arc;
use std::time::Duration;

use cache_core::{CacheKey, LiveSink as _, LiveText, LiveUpdate};
use cache_redis::backend::{RedisBackend, RedisTarget, RedisTimeouts};
use cache_redis::live::LiveStream;
use cache_redis::signals::SignalBus;
use cache_redis::ValueCodec;
use tokio_util::sync::CancellationToken;

fn stream() -> LiveStream {
    let target = RedisTarget::parse(&test_kit::redis().url, false).expect("url");
    let backend = Arc::new(RedisBackend::new(target, RedisTimeouts::default()));
    let bus = SignalBus::new(Arc::clone(&backend), |_: &CacheKey| {});
    LiveStream::new(backend, bus, ValueCodec::default())
}

fn key() -> CacheKey {
    let unique = test_kit::unique_prefix("live");
    let digest: String = unique.bytes().map(|b| format!("{b:02x}")).collect();
    let digest = format!("{digest:0>64}");
    CacheKey::parse(&format!(
        "narr:narrative@1.0.0:0123456789ab:{{{}}}",
        &digest[digest.len() - 64..]
    ))
    .expect("key")
}

/// A relay into a fresh live text, and a reader of it.
fn relay(stream: &LiveStream, key: &CacheKey) -> (cache_core::LiveReader, CancellationToken) {
    let live = LiveText::new();
    let reader = live.reader();
    let stop = CancellationToken::new();
    let (stream, key, until) = (stream.clone(), key.clone(), stop.clone());
    tokio::spawn(async move { stream.relay(&key, &live, &until).await });
    (reader, stop)
}

async fn next(reader: &mut cache_core::LiveReader) -> LiveUpdate {
    tokio::time::timeout(Duration::from_secs(5), reader.next())
        .await
        .expect("an update")
}

#[tokio::test]
async fn a_relay_shows_nothing_of_a_generation_that_ended_before_it_started() {
    let (stream, key) = (stream(), key());
    let ended = stream.writer(&key);
    ended.text("stored long ago");
    ended.finish().await;

    let (mut reader, stop) = relay(&stream, &key);
    let running = stream.writer(&key);
    running.text("written now");
    assert_eq!(
        next(&mut reader).await,
        LiveUpdate::Text("written now".into()),
        "the ended generation's text is not shown as running"
    );
    stop.cancel();
}

#[tokio::test]
async fn a_takeover_resets_the_dead_holders_text_and_a_holder_that_lost_its_lock_is_ignored() {
    let (stream, key) = (stream(), key());
    let (mut reader, stop) = relay(&stream, &key);
    let lost = stream.writer(&key);
    lost.text("old");
    assert_eq!(next(&mut reader).await, LiveUpdate::Text("old".into()));

    let takeover = stream.writer(&key);
    takeover.text("new");
    assert_eq!(
        next(&mut reader).await,
        LiveUpdate::Reset("takeover".into())
    );
    assert_eq!(next(&mut reader).await, LiveUpdate::Text("new".into()));

    // The first holder, unaware it lost the lock, writes on: not shown.
    lost.text(" more");
    lost.finish().await;
    takeover.text("!");
    assert_eq!(next(&mut reader).await, LiveUpdate::Text("!".into()));
    takeover.finish().await;
    stop.cancel();
}

#[tokio::test]
async fn an_erased_keys_stream_is_gone() {
    let (stream, key) = (stream(), key());
    let writer = stream.writer(&key);
    writer.text("to be erased");
    writer.finish().await;
    stream.delete(&key).await.expect("delete");
    let reply = test_kit::redis_inline(
        test_kit::redis().port(),
        &format!("EXISTS {}", key.live_key()),
    );
    assert_eq!(reply.trim(), ":0");
}
