//! A generation's text, live, for every instance: one Redis stream per key.
//!
//! Whoever generates a key (a gateway, a worker) writes its text as it comes to the
//! stream `live:<key>` (the key's hash tag, so the key's slot on a Cluster) through a
//! [`LiveWriter`]; every other instance with a request streaming that key runs one
//! [`LiveStream::relay`] that reads the stream from its start into that instance's
//! [`LiveText`], which all its streaming requests share. A relay that starts late reads
//! the text so far first: the stream is the replay.
//!
//! Why a stream, read with `XRANGE` after a pub/sub wake-up, rather than `XREAD BLOCK`:
//! a blocking read holds its connection, so a relay per key would need a connection per
//! key; a wake-up on the one subscription the process already holds (`signals`) costs
//! none, and a poll every [`POLL`] covers a lost wake-up. Why not pub/sub alone: it
//! has no replay, and a late joiner needs the text so far.
//!
//! Entries carry `g` (the generation: a random id per generation, so a takeover's text
//! is told apart from a dead holder's), `k` (`b` begin, `t` text, `r` reset, `e` end)
//! and `x` (the text, sealed like a value when keys are configured; or the reset's
//! reason). A generation's first write deletes what an earlier one left. The stream is
//! bounded (`MAXLEN ~`), lives [`LIVE_TTL`] after its last write while the generation
//! runs and [`ENDED_TTL`] once it ended: it is never the record, only the way there.
//!
//! Writing is best effort. A write that fails is logged and dropped: relays then show
//! less text live, and the request reconciles with the stored value at the end.

use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use cache_core::{CacheKey, LiveSink, LiveText, Relayed, StoreError};
use redis::streams::StreamRangeReply;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::backend::RedisBackend;
use crate::codec::ValueCodec;
use crate::signals::SignalBus;

/// How long a stream outlives its last write while its generation runs (the LLM's
/// idle timeout is shorter, so a running generation keeps it).
pub const LIVE_TTL: Duration = Duration::from_secs(60);
/// How long a stream outlives its generation's end: long enough for relays to read its
/// tail, short enough that a later generation of the key rarely finds it.
pub const ENDED_TTL: Duration = Duration::from_secs(10);
/// Entries a stream keeps at most (`MAXLEN ~`): far more than a narrative's pieces.
const MAX_ENTRIES: usize = 4096;
/// How often a relay reads without a wake-up.
pub const POLL: Duration = Duration::from_millis(200);
/// Entries a relay reads at once.
const READ_COUNT: usize = 512;
/// How long `finish` waits for the writes queued before it.
const FINISH_WAIT: Duration = Duration::from_secs(2);

/// The live streams of one Redis deployment.
#[derive(Debug, Clone)]
pub struct LiveStream {
    backend: Arc<RedisBackend>,
    bus: Arc<SignalBus>,
    codec: ValueCodec,
}

/// One entry, as written.
#[derive(Debug)]
enum Entry {
    Begin,
    Text(String),
    Reset(String),
    End,
}

impl Entry {
    fn kind(&self) -> &'static str {
        match self {
            Self::Begin => "b",
            Self::Text(_) => "t",
            Self::Reset(_) => "r",
            Self::End => "e",
        }
    }
}

impl LiveStream {
    pub fn new(backend: Arc<RedisBackend>, bus: Arc<SignalBus>, codec: ValueCodec) -> Self {
        Self {
            backend,
            bus,
            codec,
        }
    }

    /// A writer for a generation of `key` starting now: its first write clears what an
    /// earlier generation left. Writes run in a task of their own, in order.
    pub fn writer(&self, key: &CacheKey) -> LiveWriter {
        let (sender, receiver) = mpsc::unbounded_channel();
        let _ = sender.send(Entry::Begin);
        let task = tokio::spawn(write_loop(
            self.clone(),
            key.clone(),
            hex::encode(rand::random::<[u8; 8]>()),
            receiver,
        ));
        LiveWriter {
            sender: Mutex::new(Some(sender)),
            task: Mutex::new(Some(task)),
        }
    }

    /// Relays `key`'s stream into `live` from its start, until `stop`, or until a
    /// generation of this process claims `live`. Reads nothing until someone reads
    /// `live`.
    pub async fn relay(&self, key: &CacheKey, live: &LiveText, stop: &CancellationToken) {
        tokio::select! {
            () = stop.cancelled() => return,
            () = live.read_by_someone() => {}
        }
        let mut wake = self.bus.live_waiter(key);
        let mut after = String::from("0-0");
        loop {
            if stop.is_cancelled() || live.is_claimed() {
                return;
            }
            let full = match self.read_after(key, &after).await {
                Ok(entries) => {
                    let full = entries.ids.len() >= READ_COUNT;
                    for entry in entries.ids {
                        self.relay_entry(key, live, &entry);
                        after = entry.id;
                    }
                    full
                }
                Err(error) => {
                    tracing::debug!(%error, "live stream not read; trying again");
                    false
                }
            };
            if full {
                continue;
            }
            tokio::select! {
                () = stop.cancelled() => return,
                _ = wake.changed() => {}
                () = tokio::time::sleep(POLL) => {}
            }
        }
    }

    fn relay_entry(&self, key: &CacheKey, live: &LiveText, entry: &redis::streams::StreamId) {
        let field = |name: &str| -> Option<Vec<u8>> {
            entry
                .map
                .get(name)
                .and_then(|value| redis::from_redis_value::<Vec<u8>>(value).ok())
        };
        let (Some(generation), Some(kind)) = (field("g"), field("k")) else {
            return;
        };
        let generation = String::from_utf8_lossy(&generation);
        let payload = field("x").unwrap_or_default();
        match kind.as_slice() {
            b"b" => live.relay(&generation, Relayed::Begin),
            b"t" => match self.codec.decode_text(&key.live_key(), &payload) {
                Ok(text) => live.relay(&generation, Relayed::Text(&text)),
                // Sealed with a key this process lacks: the rest of this generation
                // would be text with a hole in it.
                Err(error) => {
                    tracing::debug!(%error, "live text unreadable; skipped");
                    live.relay(&generation, Relayed::Reset("unreadable"));
                }
            },
            b"r" => live.relay(
                &generation,
                Relayed::Reset(&String::from_utf8_lossy(&payload)),
            ),
            _ => {}
        }
    }

    async fn read_after(
        &self,
        key: &CacheKey,
        after: &str,
    ) -> Result<StreamRangeReply, StoreError> {
        let (name, start) = (key.live_key(), format!("({after}"));
        self.backend
            .call(|mut conn| async move {
                redis::cmd("XRANGE")
                    .arg(name)
                    .arg(start)
                    .arg("+")
                    .arg("COUNT")
                    .arg(READ_COUNT)
                    .query_async::<StreamRangeReply>(&mut conn)
                    .await
            })
            .await
    }

    /// Appends `entries` of `generation`, in one round trip, then wakes the relays.
    async fn append(
        &self,
        key: &CacheKey,
        generation: &str,
        entries: &[Entry],
    ) -> Result<(), StoreError> {
        let name = key.live_key();
        let mut pipe = redis::pipe();
        let mut ended = false;
        for entry in entries {
            if matches!(entry, Entry::Begin) {
                pipe.cmd("DEL").arg(&name).ignore();
            }
            ended |= matches!(entry, Entry::End);
            let payload = match entry {
                Entry::Text(text) => self.codec.encode_text(&name, text),
                Entry::Reset(reason) => reason.as_bytes().to_vec(),
                Entry::Begin | Entry::End => Vec::new(),
            };
            pipe.cmd("XADD")
                .arg(&name)
                .arg("MAXLEN")
                .arg("~")
                .arg(MAX_ENTRIES)
                .arg("*")
                .arg("g")
                .arg(generation)
                .arg("k")
                .arg(entry.kind())
                .arg("x")
                .arg(payload)
                .ignore();
        }
        let ttl = if ended { ENDED_TTL } else { LIVE_TTL };
        pipe.cmd("PEXPIRE")
            .arg(&name)
            .arg(u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX))
            .ignore();
        self.backend
            .call(|mut conn| async move { pipe.query_async::<()>(&mut conn).await })
            .await?;
        self.bus.publish_live(key).await
    }
}

/// Writes queued entries as they come, coalescing what queued up during a round trip.
async fn write_loop(
    stream: LiveStream,
    key: CacheKey,
    generation: String,
    mut receiver: mpsc::UnboundedReceiver<Entry>,
) {
    let mut batch = Vec::new();
    while let Some(first) = receiver.recv().await {
        batch.push(first);
        while let Ok(next) = receiver.try_recv() {
            match (batch.last_mut(), next) {
                (Some(Entry::Text(text)), Entry::Text(more)) => text.push_str(&more),
                (_, next) => batch.push(next),
            }
        }
        if let Err(error) = stream.append(&key, &generation, &batch).await {
            tracing::debug!(%error, "live text not written; relays show less of it");
        }
        batch.clear();
    }
}

/// A generation's text on its way to the key's live stream: a [`LiveSink`].
#[derive(Debug)]
pub struct LiveWriter {
    sender: Mutex<Option<mpsc::UnboundedSender<Entry>>>,
    task: Mutex<Option<tokio::task::JoinHandle<()>>>,
}

impl LiveWriter {
    fn send(&self, entry: Entry) {
        if let Some(sender) = &*self.sender.lock().unwrap_or_else(PoisonError::into_inner) {
            let _ = sender.send(entry);
        }
    }

    /// The generation ended: writes what is queued and the end, within a short wait,
    /// so relays have the whole text before the value's `done` signal. Later pieces
    /// are dropped.
    pub async fn finish(&self) {
        self.send(Entry::End);
        self.sender
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        let task = self
            .task
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        if let Some(task) = task {
            if tokio::time::timeout(FINISH_WAIT, task).await.is_err() {
                tracing::debug!("live stream writes still queued at the end; left to finish");
            }
        }
    }
}

impl LiveSink for LiveWriter {
    fn text(&self, piece: &str) {
        if !piece.is_empty() {
            self.send(Entry::Text(piece.to_owned()));
        }
    }

    fn reset(&self, reason: &str) {
        self.send(Entry::Reset(reason.to_owned()));
    }
}
