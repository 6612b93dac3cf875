//! Cross-instance signals over Redis pub/sub, on one subscription per process.
//!
//! Messages on [`CHANNEL`] are `<kind> <instance> <key>`: `done` (a value was stored
//! or replaced), `failed` (a generation gave up: waiters fall back now) and
//! `invalidate` (an entry was deleted). One task holds the subscription and hands each
//! message to the waiters of its key, so a thousand waiting requests cost one
//! connection. Messages from other instances also drop this instance's L1 copy of the
//! key. While the subscription is down, waiters keep polling the store and L1 copies
//! age out within their short TTL: signals make things fast, never correct.
//!
//! The same subscription carries [`LIVE_CHANNEL`], whose messages (`<key>`) wake the
//! relays of that key's live stream (`live`).

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use futures::StreamExt as _;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::backend::RedisBackend;
use cache_core::CacheKey;
use cache_core::StoreError;

pub const CHANNEL: &str = "narrative:signals";

/// `<key>`: the key's live stream has new entries (see `live`). Only a wake-up: the
/// entries themselves are read from the stream.
pub const LIVE_CHANNEL: &str = "narrative:live";

/// How often the subscription is pinged, and how long a pong may take.
const KEEPALIVE: Duration = Duration::from_secs(5);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Signal {
    Done,
    Failed,
    Invalidate,
}

impl Signal {
    fn as_str(self) -> &'static str {
        match self {
            Self::Done => "done",
            Self::Failed => "failed",
            Self::Invalidate => "invalidate",
        }
    }

    fn parse(text: &str) -> Option<Self> {
        match text {
            "done" => Some(Self::Done),
            "failed" => Some(Self::Failed),
            "invalidate" => Some(Self::Invalidate),
            _ => None,
        }
    }
}

type Forget = Box<dyn Fn(&CacheKey) + Send + Sync>;

struct KeyWaiters {
    sender: watch::Sender<Option<Signal>>,
    count: usize,
}

pub struct SignalBus {
    backend: Arc<RedisBackend>,
    instance: String,
    waiters: Mutex<HashMap<CacheKey, KeyWaiters>>,
    /// Relays of live streams, woken by `LIVE_CHANNEL`.
    live_waiters: Mutex<HashMap<CacheKey, (watch::Sender<u64>, usize)>>,
    forget_l1: Forget,
    subscribed: AtomicBool,
}

impl std::fmt::Debug for SignalBus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SignalBus")
            .field("instance", &self.instance)
            .field("subscribed", &self.is_subscribed())
            .finish()
    }
}

impl SignalBus {
    /// `forget_l1` drops this instance's in-process copy of a key another instance
    /// changed.
    pub fn new(
        backend: Arc<RedisBackend>,
        forget_l1: impl Fn(&CacheKey) + Send + Sync + 'static,
    ) -> Arc<Self> {
        Arc::new(Self {
            backend,
            instance: hex::encode(rand::random::<[u8; 8]>()),
            waiters: Mutex::new(HashMap::new()),
            live_waiters: Mutex::new(HashMap::new()),
            forget_l1: Box::new(forget_l1),
            subscribed: AtomicBool::new(false),
        })
    }

    pub fn is_subscribed(&self) -> bool {
        self.subscribed.load(Ordering::Acquire)
    }

    /// Starts the subscription task; it reconnects by itself until `shutdown`.
    pub fn spawn(self: &Arc<Self>, shutdown: CancellationToken) -> tokio::task::JoinHandle<()> {
        let bus = Arc::clone(self);
        tokio::spawn(async move { bus.run(shutdown).await })
    }

    /// Holds the subscription, reconnecting by itself, until `shutdown`.
    pub async fn run(&self, shutdown: CancellationToken) {
        self.subscribe_loop(shutdown).await;
    }

    /// Waits for signals about `key` from now on. Take the waiter *before* checking
    /// the store, so a signal sent in between is not missed.
    pub fn waiter(self: &Arc<Self>, key: &CacheKey) -> Waiter {
        let mut waiters = self.waiters.lock().unwrap_or_else(PoisonError::into_inner);
        let entry = waiters.entry(key.clone()).or_insert_with(|| KeyWaiters {
            sender: watch::channel(None).0,
            count: 0,
        });
        entry.count += 1;
        Waiter {
            receiver: entry.sender.subscribe(),
            bus: Arc::clone(self),
            key: key.clone(),
        }
    }

    /// Wakes up when `key`'s live stream gets entries, from now on. Take it *before*
    /// reading the stream, so entries added in between are not missed.
    pub fn live_waiter(self: &Arc<Self>, key: &CacheKey) -> LiveWaiter {
        let mut waiters = self
            .live_waiters
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let entry = waiters
            .entry(key.clone())
            .or_insert_with(|| (watch::channel(0).0, 0));
        entry.1 += 1;
        LiveWaiter {
            receiver: entry.0.subscribe(),
            bus: Arc::clone(self),
            key: key.clone(),
        }
    }

    /// Tells relays everywhere that `key`'s live stream has new entries.
    pub async fn publish_live(&self, key: &CacheKey) -> Result<(), StoreError> {
        let message = key.as_str().to_owned();
        self.backend
            .call(|mut conn| async move {
                redis::cmd("PUBLISH")
                    .arg(LIVE_CHANNEL)
                    .arg(message)
                    .query_async::<i64>(&mut conn)
                    .await
            })
            .await
            .map(|_| ())
    }

    fn dispatch_live(&self, payload: &str) {
        let Ok(key) = CacheKey::parse(payload) else {
            return;
        };
        if let Some((sender, _)) = self
            .live_waiters
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(&key)
        {
            sender.send_modify(|version| *version += 1);
        }
    }

    pub async fn publish(&self, signal: Signal, key: &CacheKey) -> Result<(), StoreError> {
        let message = format!("{} {} {}", signal.as_str(), self.instance, key.as_str());
        self.backend
            .call(|mut conn| async move {
                redis::cmd("PUBLISH")
                    .arg(CHANNEL)
                    .arg(message)
                    .query_async::<i64>(&mut conn)
                    .await
            })
            .await
            .map(|_| ())
    }

    fn dispatch(&self, payload: &str) {
        let mut parts = payload.splitn(3, ' ');
        let (Some(kind), Some(instance), Some(key)) = (parts.next(), parts.next(), parts.next())
        else {
            return;
        };
        let (Some(signal), Ok(key)) = (Signal::parse(kind), CacheKey::parse(key)) else {
            return;
        };
        if instance != self.instance && signal != Signal::Failed {
            (self.forget_l1)(&key);
        }
        if let Some(waiters) = self
            .waiters
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(&key)
        {
            waiters.sender.send_replace(Some(signal));
        }
    }

    async fn subscribe_loop(&self, shutdown: CancellationToken) {
        let urls = match self.backend.target() {
            crate::backend::RedisTarget::Single(url) => vec![url.clone()],
            crate::backend::RedisTarget::Cluster(urls) => urls.clone(),
        };
        let connect_timeout = self.backend.timeouts().connect;
        let mut attempt = 0usize;
        loop {
            // In a Cluster, PUBLISH reaches every node, so any one node will do.
            let url = &urls[attempt % urls.len()];
            attempt += 1;
            let subscribed = tokio::time::timeout(connect_timeout * 2, async {
                let mut pubsub = redis::Client::open(url.as_str())?
                    .get_async_pubsub()
                    .await?;
                pubsub.subscribe(&[CHANNEL, LIVE_CHANNEL]).await?;
                Ok::<_, redis::RedisError>(pubsub)
            })
            .await;
            match subscribed {
                Ok(Ok(pubsub)) => {
                    self.subscribed.store(true, Ordering::Release);
                    tracing::info!("subscribed to redis signals");
                    // A connection can die without closing (a silent network drop);
                    // a ping every few seconds notices, and the loop reconnects.
                    let (mut sink, mut messages) = pubsub.split();
                    let mut keepalive = tokio::time::interval(KEEPALIVE);
                    keepalive.tick().await;
                    loop {
                        tokio::select! {
                            () = shutdown.cancelled() => return,
                            _ = keepalive.tick() => {
                                let pong = tokio::time::timeout(KEEPALIVE, sink.ping::<redis::Value>()).await;
                                if !matches!(pong, Ok(Ok(_))) {
                                    break;
                                }
                            }
                            message = messages.next() => match message {
                                Some(message) => {
                                    if let Ok(payload) = message.get_payload::<String>() {
                                        if message.get_channel_name() == LIVE_CHANNEL {
                                            self.dispatch_live(&payload);
                                        } else {
                                            self.dispatch(&payload);
                                        }
                                    }
                                }
                                None => break,
                            },
                        }
                    }
                    self.subscribed.store(false, Ordering::Release);
                    tracing::warn!("redis signal subscription lost; reconnecting");
                }
                Ok(Err(error)) if attempt % 30 == 1 => {
                    tracing::warn!(%error, "cannot subscribe to redis signals yet")
                }
                _ => {}
            }
            tokio::select! {
                () = shutdown.cancelled() => return,
                () = tokio::time::sleep(Duration::from_millis(500)) => {}
            }
        }
    }
}

/// Signals about one key; dropping it unregisters.
pub struct Waiter {
    receiver: watch::Receiver<Option<Signal>>,
    bus: Arc<SignalBus>,
    key: CacheKey,
}

impl std::fmt::Debug for Waiter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Waiter").field("key", &self.key).finish()
    }
}

impl Waiter {
    /// The next signal for the key.
    pub async fn next(&mut self) -> Option<Signal> {
        self.receiver.changed().await.ok()?;
        *self.receiver.borrow_and_update()
    }
}

impl Drop for Waiter {
    fn drop(&mut self) {
        let mut waiters = self
            .bus
            .waiters
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if let Some(entry) = waiters.get_mut(&self.key) {
            entry.count -= 1;
            if entry.count == 0 {
                waiters.remove(&self.key);
            }
        }
    }
}

/// Wake-ups for one key's live stream; dropping it unregisters.
pub struct LiveWaiter {
    receiver: watch::Receiver<u64>,
    bus: Arc<SignalBus>,
    key: CacheKey,
}

impl std::fmt::Debug for LiveWaiter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LiveWaiter")
            .field("key", &self.key)
            .finish()
    }
}

impl LiveWaiter {
    /// Until the stream has entries this waiter has not been told of. `false` once the
    /// bus is gone.
    pub async fn changed(&mut self) -> bool {
        self.receiver.changed().await.is_ok()
    }
}

impl Drop for LiveWaiter {
    fn drop(&mut self) {
        let mut waiters = self
            .bus
            .live_waiters
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if let Some(entry) = waiters.get_mut(&self.key) {
            entry.1 -= 1;
            if entry.1 == 0 {
                waiters.remove(&self.key);
            }
        }
    }
}
