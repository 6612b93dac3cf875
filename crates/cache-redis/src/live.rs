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
//! reason). A relay follows the newest generation that has not ended (see `Cursor`).
//! The stream is bounded (`MAXLEN ~`), lives [`LIVE_TTL`] after its last write while
//! the generation runs and [`ENDED_TTL`] once it ended, and an erasure deletes it: it
//! is never the record, only the way there.
//!
//! Writing is best effort. A write that fails is logged and dropped: relays then show
//! less text live, and the request reconciles with the stored value at the end.

use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use cache_core::{CacheKey, LiveSink, LiveText, Relayed, StoreError};
use redis::streams::StreamRangeReply;
use tokio::sync::mpsc;
use tokio_util::sync::{CancellationToken, DropGuard};

use crate::backend::RedisBackend;
use crate::codec::ValueCodec;
use crate::signals::SignalBus;

/// How long a stream outlives its last write while its generation runs: longer than
/// the LLM's idle timeout (`LLM_STREAM_IDLE_TIMEOUT_MS`, 10 s), so a running generation
/// keeps it; short, so a dead writer's text does not linger.
pub const LIVE_TTL: Duration = Duration::from_secs(30);
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

    /// A writer for a generation of `key` starting now, under a generation id of its
    /// own. Writes run in a task of their own, in order.
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

    /// Starts relaying `key`'s stream into `live` in a task of its own; it stops when
    /// the returned guard is dropped (or a generation here claims `live`).
    pub fn spawn_relay(&self, key: &CacheKey, live: &Arc<LiveText>) -> DropGuard {
        let stop = CancellationToken::new();
        let guard = stop.clone().drop_guard();
        let (stream, key, live) = (self.clone(), key.clone(), Arc::clone(live));
        tokio::spawn(async move { stream.relay(&key, &live, &stop).await });
        guard
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
        let mut cursor = Cursor::default();
        loop {
            if stop.is_cancelled() || live.is_claimed() {
                return;
            }
            let full = match self.read_after(key, &cursor.after).await {
                Ok(read) => {
                    let full = read.ids.len() >= READ_COUNT;
                    cursor.relay(self, key, live, read.ids);
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

    fn relay_entry(&self, key: &CacheKey, live: &LiveText, entry: &Read) {
        match entry.kind.as_slice() {
            b"b" => live.relay(&entry.generation, Relayed::Begin),
            b"t" => match self.codec.decode_text(&key.live_key(), &entry.payload) {
                Ok(text) => live.relay(&entry.generation, Relayed::Text(&text)),
                // Sealed with a key this process lacks: the rest of this generation
                // would be text with a hole in it.
                Err(error) => {
                    tracing::debug!(%error, "live text unreadable; skipped");
                    live.relay(&entry.generation, Relayed::Reset("unreadable"));
                }
            },
            b"r" => live.relay(
                &entry.generation,
                Relayed::Reset(&String::from_utf8_lossy(&entry.payload)),
            ),
            _ => {}
        }
    }

    /// Deletes `key`'s stream (an erasure: its text must not be relayed again).
    pub async fn delete(&self, key: &CacheKey) -> Result<(), StoreError> {
        let name = key.live_key();
        self.backend
            .call(|mut conn| async move {
                redis::cmd("DEL")
                    .arg(name)
                    .query_async::<()>(&mut conn)
                    .await
            })
            .await
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

/// One entry as read.
#[derive(Debug)]
struct Read {
    generation: String,
    kind: Vec<u8>,
    payload: Vec<u8>,
}

impl Read {
    fn parse(entry: &redis::streams::StreamId) -> Option<Self> {
        let field = |name: &str| -> Option<Vec<u8>> {
            entry
                .map
                .get(name)
                .and_then(|value| redis::from_redis_value::<Vec<u8>>(value).ok())
        };
        Some(Self {
            generation: String::from_utf8_lossy(&field("g")?).into_owned(),
            kind: field("k")?,
            payload: field("x").unwrap_or_default(),
        })
    }
}

/// Where a relay is in a key's stream, and which generation it follows.
///
/// A stream may hold more than one generation: an earlier one that ended (its entries
/// live `ENDED_TTL` more), a dead holder's, or a holder's that lost its lock and is
/// still writing beside its successor's. The relay follows the newest one that has not
/// ended: of what it reads at once, only entries from the last `begin` on, of that
/// begin's generation; and nothing of a generation that ended before the relay saw it
/// run (it is stored, or failed: the flight's result says which, and a new request
/// must not be shown its text as if it were being written).
#[derive(Debug)]
struct Cursor {
    after: String,
    following: Option<String>,
    ended: std::collections::HashSet<String>,
}

impl Default for Cursor {
    fn default() -> Self {
        Self {
            after: String::from("0-0"),
            following: None,
            ended: std::collections::HashSet::new(),
        }
    }
}

impl Cursor {
    fn relay(
        &mut self,
        stream: &LiveStream,
        key: &CacheKey,
        live: &LiveText,
        ids: Vec<redis::streams::StreamId>,
    ) {
        let Some(last) = ids.last() else {
            return;
        };
        self.after.clone_from(&last.id);
        let entries: Vec<Read> = ids.iter().filter_map(Read::parse).collect();
        for entry in entries.iter().filter(|entry| entry.kind == b"e") {
            self.ended.insert(entry.generation.clone());
        }
        let was_following = self.following.clone();
        // The newest begin read now, if any, is the generation to follow from here.
        let from = entries
            .iter()
            .rposition(|entry| entry.kind == b"b" && !self.ended.contains(&entry.generation));
        if let Some(begin) = from {
            self.following = Some(entries[begin].generation.clone());
        }
        let Some(following) = self.following.as_deref() else {
            return;
        };
        // One that ended before this relay saw it run is not shown as running; the
        // tail of one it has been following is.
        if self.ended.contains(following) && was_following.as_deref() != Some(following) {
            return;
        }
        for entry in &entries[from.unwrap_or(0)..] {
            if entry.generation == following {
                stream.relay_entry(key, live, entry);
            }
        }
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
