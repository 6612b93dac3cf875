//! A generation's text while it is being written, for the requests that stream it.
//!
//! The generation hands each piece the model writes to a [`LiveSink`]. In a process,
//! that sink is one [`LiveText`] per key: the text so far and a notifier, shared by
//! every streaming request for the key, each reading it through its own
//! [`LiveReader`] (a cursor, not a channel per client: a thousand readers cost a
//! thousand cursors over one string). A reader that joins late gets the text so far
//! first, then each piece as it comes.
//!
//! Text that will not become the narrative (the call failed or stopped short, or a
//! takeover started the key over) is *reset*: readers that had read some of it are
//! told to forget it, and go on with what comes next.
//!
//! The text of a generation running in another process reaches this one's
//! [`LiveText`] through a relay (the Redis side is `cache-redis`'s `live`); the relay
//! writes as [`LiveText::relay`], and a generation started here afterwards (a takeover)
//! takes the text over with [`LiveText::claim`], after which the relay is ignored.
//!
//! None of this decides what is stored or answered: the flight's result does. A
//! streaming request ends by reconciling what it sent with that result.

use std::collections::HashMap;
use std::hash::Hash;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use tokio::sync::watch;

/// Where a generation sends its text as the model writes it.
pub trait LiveSink: Send + Sync + std::fmt::Debug {
    /// A piece of text, appended to what came before.
    fn text(&self, piece: &str);
    /// The text so far will not become the narrative: `reason` says why (the LLM
    /// error's kind, `incomplete`, `takeover`).
    fn reset(&self, reason: &str);
}

/// A sink that keeps nothing, for generations nobody can stream (pre-warm jobs).
#[derive(Debug, Clone, Copy, Default)]
pub struct Unwatched;

impl LiveSink for Unwatched {
    fn text(&self, _piece: &str) {}
    fn reset(&self, _reason: &str) {}
}

/// Every piece to each of two sinks: this process's readers and the fleet's.
#[derive(Debug)]
pub struct Both<'a>(pub &'a dyn LiveSink, pub &'a dyn LiveSink);

impl LiveSink for Both<'_> {
    fn text(&self, piece: &str) {
        self.0.text(piece);
        self.1.text(piece);
    }

    fn reset(&self, reason: &str) {
        self.0.reset(reason);
        self.1.reset(reason);
    }
}

#[derive(Debug, Default)]
struct State {
    /// Bumped by every reset: a reader of an older epoch starts over.
    epoch: u64,
    text: String,
    /// Why the last reset happened.
    reason: String,
    /// The remote generation the relayed text belongs to, when it is relayed.
    relayed: Option<String>,
    /// A generation of this process writes the text: the relay is ignored. Kept under
    /// the same lock as the text, so no relayed piece lands after a claim.
    claimed: bool,
}

/// The text so far of one key's generation, and who is reading it.
#[derive(Debug)]
pub struct LiveText {
    state: Mutex<State>,
    /// Bumped on every change; readers wait on it.
    changed: watch::Sender<u64>,
    /// Readers there are (a relay has nothing to do for none).
    readers: watch::Sender<usize>,
}

/// What a reader gets next.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LiveUpdate {
    /// Text after what this reader had.
    Text(String),
    /// Forget what this reader had: it will not be the narrative.
    Reset(String),
}

impl Default for LiveText {
    fn default() -> Self {
        Self {
            state: Mutex::default(),
            changed: watch::channel(0).0,
            readers: watch::channel(0).0,
        }
    }
}

impl LiveText {
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn bump(&self) {
        self.changed.send_modify(|version| *version += 1);
    }

    fn reset_locked(state: &mut State, reason: &str) -> bool {
        if state.text.is_empty() {
            return false;
        }
        state.epoch += 1;
        state.text.clear();
        reason.clone_into(&mut state.reason);
        true
    }

    /// A generation in this process takes the text over (it started, or took a dead
    /// holder's key over): relayed text from now on is ignored, and what was relayed
    /// is reset, since this generation writes its own.
    pub fn claim(&self) {
        let mut state = self.state();
        if std::mem::replace(&mut state.claimed, true) {
            return;
        }
        let reset = state.relayed.take().is_some() && Self::reset_locked(&mut state, "takeover");
        drop(state);
        if reset {
            self.bump();
        }
    }

    /// Whether a generation of this process writes the text.
    pub fn is_claimed(&self) -> bool {
        self.state().claimed
    }

    /// Text of generation `generation` running elsewhere, relayed: a new generation
    /// (a takeover there) resets what the last one wrote. Ignored once claimed.
    pub fn relay(&self, generation: &str, event: Relayed<'_>) {
        let mut state = self.state();
        if state.claimed {
            return;
        }
        let mut changed = false;
        if state.relayed.as_deref() != Some(generation) {
            if state.relayed.is_some() {
                changed |= Self::reset_locked(&mut state, "takeover");
            }
            state.relayed = Some(generation.to_owned());
        }
        match event {
            Relayed::Begin => {}
            Relayed::Text(piece) if !piece.is_empty() => {
                state.text.push_str(piece);
                changed = true;
            }
            Relayed::Text(_) => {}
            Relayed::Reset(reason) => changed |= Self::reset_locked(&mut state, reason),
        }
        drop(state);
        if changed {
            self.bump();
        }
    }

    /// The text so far.
    pub fn so_far(&self) -> String {
        self.state().text.clone()
    }

    /// A cursor from the start: the text so far comes first.
    pub fn reader(self: &Arc<Self>) -> LiveReader {
        self.readers.send_modify(|count| *count += 1);
        LiveReader {
            live: Arc::clone(self),
            changed: self.changed.subscribe(),
            epoch: self.state().epoch,
            offset: 0,
        }
    }

    /// Waits until someone reads this text: until then a relay costs nothing.
    pub async fn read_by_someone(&self) {
        let mut readers = self.readers.subscribe();
        let _ = readers.wait_for(|count| *count > 0).await;
    }
}

/// The text of the local generation: `LiveText` as the generation's sink.
impl LiveSink for LiveText {
    fn text(&self, piece: &str) {
        if piece.is_empty() {
            return;
        }
        self.state().text.push_str(piece);
        self.bump();
    }

    fn reset(&self, reason: &str) {
        let reset = Self::reset_locked(&mut self.state(), reason);
        if reset {
            self.bump();
        }
    }
}

/// An event of a generation running in another process.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Relayed<'a> {
    /// It started.
    Begin,
    Text(&'a str),
    Reset(&'a str),
}

/// One request's cursor over a key's [`LiveText`].
#[derive(Debug)]
pub struct LiveReader {
    live: Arc<LiveText>,
    changed: watch::Receiver<u64>,
    epoch: u64,
    /// Bytes of the current epoch's text this reader has had.
    offset: usize,
}

impl LiveReader {
    /// What this reader has not had yet, once there is something.
    pub async fn next(&mut self) -> LiveUpdate {
        loop {
            // Marked seen before the look: a change after it wakes the wait below.
            self.changed.borrow_and_update();
            if let Some(update) = self.poll() {
                return update;
            }
            if self.changed.changed().await.is_err() {
                // The sender lives as long as `live`, which this reader holds.
                std::future::pending::<()>().await;
            }
        }
    }

    fn poll(&mut self) -> Option<LiveUpdate> {
        let state = self.live.state();
        if state.epoch != self.epoch {
            self.epoch = state.epoch;
            let had = std::mem::take(&mut self.offset) > 0;
            if had {
                return Some(LiveUpdate::Reset(state.reason.clone()));
            }
        }
        if state.text.len() > self.offset {
            let piece = state.text[self.offset..].to_owned();
            self.offset = state.text.len();
            return Some(LiveUpdate::Text(piece));
        }
        None
    }
}

impl Drop for LiveReader {
    fn drop(&mut self) {
        self.live.readers.send_modify(|count| *count -= 1);
    }
}

/// The live texts of the generations running in this process, by key: opened when a
/// flight starts, closed when it ends.
#[derive(Debug)]
pub struct LiveFeeds<K> {
    feeds: Mutex<HashMap<K, Arc<LiveText>>>,
}

impl<K> Default for LiveFeeds<K> {
    fn default() -> Self {
        Self {
            feeds: Mutex::new(HashMap::new()),
        }
    }
}

impl<K: Eq + Hash + Clone> LiveFeeds<K> {
    fn feeds(&self) -> MutexGuard<'_, HashMap<K, Arc<LiveText>>> {
        self.feeds.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The key's live text, new if none is open.
    pub fn open(&self, key: &K) -> Arc<LiveText> {
        Arc::clone(self.feeds().entry(key.clone()).or_default())
    }

    /// The key's live text, if a flight has it open.
    pub fn get(&self, key: &K) -> Option<Arc<LiveText>> {
        self.feeds().get(key).cloned()
    }

    /// The flight ended: readers that hold the text keep it; new ones will not find it.
    pub fn close(&self, key: &K, live: &Arc<LiveText>) {
        let mut feeds = self.feeds();
        if feeds.get(key).is_some_and(|open| Arc::ptr_eq(open, live)) {
            feeds.remove(key);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn next(reader: &mut LiveReader) -> LiveUpdate {
        tokio::time::timeout(std::time::Duration::from_secs(5), reader.next())
            .await
            .expect("an update")
    }

    #[tokio::test]
    async fn a_late_reader_gets_the_text_so_far_then_the_rest() {
        let live = LiveText::new();
        let mut early = live.reader();
        live.text("Once ");
        assert_eq!(next(&mut early).await, LiveUpdate::Text("Once ".into()));
        live.text("upon ");
        live.text("a time");
        let mut late = live.reader();
        assert_eq!(
            next(&mut late).await,
            LiveUpdate::Text("Once upon a time".into())
        );
        assert_eq!(
            next(&mut early).await,
            LiveUpdate::Text("upon a time".into())
        );
    }

    #[tokio::test]
    async fn a_reset_reaches_only_readers_that_had_text() {
        let live = LiveText::new();
        let mut had = live.reader();
        live.text("partial");
        assert_eq!(next(&mut had).await, LiveUpdate::Text("partial".into()));
        let mut fresh = live.reader();
        live.reset("incomplete");
        live.text("template");
        assert_eq!(next(&mut had).await, LiveUpdate::Reset("incomplete".into()));
        assert_eq!(next(&mut had).await, LiveUpdate::Text("template".into()));
        // It never read "partial": nothing to forget.
        assert_eq!(next(&mut fresh).await, LiveUpdate::Text("template".into()));
    }

    #[tokio::test]
    async fn a_claim_resets_relayed_text_and_ignores_the_relay_from_then_on() {
        let live = LiveText::new();
        let mut reader = live.reader();
        live.relay("g1", Relayed::Begin);
        live.relay("g1", Relayed::Text("dead holder's"));
        assert_eq!(
            next(&mut reader).await,
            LiveUpdate::Text("dead holder's".into())
        );
        live.claim();
        live.relay("g1", Relayed::Text(" more"));
        live.text("mine");
        assert_eq!(
            next(&mut reader).await,
            LiveUpdate::Reset("takeover".into())
        );
        assert_eq!(next(&mut reader).await, LiveUpdate::Text("mine".into()));
        assert_eq!(live.so_far(), "mine");
    }

    #[tokio::test]
    async fn a_new_remote_generation_resets_the_last_ones_text() {
        let live = LiveText::new();
        let mut reader = live.reader();
        live.relay("g1", Relayed::Text("first try"));
        assert_eq!(
            next(&mut reader).await,
            LiveUpdate::Text("first try".into())
        );
        live.relay("g2", Relayed::Begin);
        live.relay("g2", Relayed::Text("second"));
        assert_eq!(
            next(&mut reader).await,
            LiveUpdate::Reset("takeover".into())
        );
        assert_eq!(next(&mut reader).await, LiveUpdate::Text("second".into()));
    }

    #[tokio::test]
    async fn readers_are_counted_for_the_relay() {
        let live = LiveText::new();
        let waiting = {
            let live = Arc::clone(&live);
            tokio::spawn(async move { live.read_by_someone().await })
        };
        tokio::task::yield_now().await;
        assert!(!waiting.is_finished());
        let _reader = live.reader();
        tokio::time::timeout(std::time::Duration::from_secs(5), waiting)
            .await
            .expect("woken by the first reader")
            .expect("no panic");
    }

    #[test]
    fn feeds_close_only_the_text_they_opened() {
        let feeds = LiveFeeds::<&str>::default();
        let first = feeds.open(&"k");
        assert!(Arc::ptr_eq(&first, &feeds.open(&"k")));
        feeds.close(&"k", &first);
        let second = feeds.open(&"k");
        feeds.close(&"k", &first);
        assert!(feeds
            .get(&"k")
            .is_some_and(|open| Arc::ptr_eq(&open, &second)));
    }
}
