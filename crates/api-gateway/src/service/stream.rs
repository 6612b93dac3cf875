//! Streamed answers (`Accept: text/event-stream`), independent of HTTP.
//!
//! A streamed request is planned like any other ([`NarrativeService::plan`]): the same
//! directives, the same flights, the same answer at the end. What differs is the wait:
//! instead of waiting for the flight's result in silence, the request reads the key's
//! [`LiveText`](cache_core::LiveText) (shared by every request streaming the key on
//! this instance, fed by the generation here or relayed from the one elsewhere) and
//! passes each piece on as it comes.
//!
//! `GENERATION_WAIT_MS` bounds the wait for the *first* piece: without one in time, the
//! answer is the template, as it is for a request that does not stream, and the
//! generation goes on to be stored. Once text flows, the request follows the flight to
//! its end.
//!
//! Whatever happened on the way (a reset, a relay that lagged, a takeover), the stream
//! ends by reconciling what it sent with the answer: the rest of the answer's text if
//! what was sent is its beginning, otherwise a reset and the whole text. So the text a
//! client has when `done` comes is always exactly `done`'s narrative.

use std::sync::Arc;
use std::time::{Duration, Instant};

use cache_core::{CacheKey, Flight, KeyedProfile, LiveReader, LiveText, LiveUpdate};
use futures::future::BoxFuture;
use futures::FutureExt as _;
use tokio::sync::mpsc;

use super::answer::{Pending, Plan};
use super::{Answer, Caller, Directives, Forwarded, Joined, Lookup, NarrativeService, NotCached};
use super::{FillError, FlightResult, Source};
use analytics::RequestOutcome;

/// Events queued for a slow client at most; past it the stream waits for the client,
/// and the text it has not read yet comes as one larger piece.
const EVENTS_QUEUED: usize = 64;

/// How long a stream waits for a client that reads nothing before it stops sending to
/// it: its answer is still worked out and accounted, and its response ends with what
/// was queued (a client that does not read cannot hold a stream's task forever).
const CLIENT_STALL_LIMIT: Duration = Duration::from_secs(30);

/// What is known when a stream starts, for its headers and `meta` event.
#[derive(Debug, Clone)]
pub enum StreamStart {
    /// The answer is known at once: a hit, a stale entry.
    Answer(Answer),
    /// A generation runs (or starts) for the key.
    Generating {
        collapsed: bool,
        forwarded: Option<Forwarded>,
    },
}

/// One event of a streamed answer, after its start.
#[derive(Debug, Clone)]
pub enum StreamEvent {
    /// Text after what was sent before.
    Text(String),
    /// Forget the text sent so far; its reason.
    Reset(String),
    /// The answer; the last event.
    Done(Answer),
    /// The last event of a `GET` stream whose generation ended with nothing stored.
    Gone,
}

/// What a streaming `GET /narrative/{key}` finds.
#[derive(Debug)]
pub enum Followed {
    Stream(NarrativeStream),
    /// A generation runs elsewhere, but this instance follows no more (its
    /// `MAX_PENDING_GENERATIONS` are running): answered 202 as without streaming.
    Pending,
    /// Neither stored nor being generated.
    Missing,
}

/// A streamed answer: its start, then its events, ending with `Done` or `Gone`.
#[derive(Debug)]
pub struct NarrativeStream {
    pub start: StreamStart,
    pub events: mpsc::Receiver<StreamEvent>,
}

impl NarrativeService {
    /// Streams the answer to a validated profile. Only `only-if-cached` refuses, before
    /// anything is streamed. The request is accounted once, when its answer is known,
    /// whether or not the client stayed to read it.
    pub async fn narrative_stream(
        self: &Arc<Self>,
        keyed: &KeyedProfile,
        started: Instant,
        directives: Directives,
        caller: &Caller,
    ) -> Result<NarrativeStream, NotCached> {
        self.index_user(keyed, caller);
        let plan = match self.plan(keyed, directives, caller).await {
            Ok(plan) => plan,
            Err(NotCached) => {
                self.record_request(keyed, started, caller, RequestOutcome::Error, None);
                return Err(NotCached);
            }
        };
        let Pending { joined, then } = match plan {
            Plan::Ready(answer) => return Ok(self.ready_stream(answer, keyed, started, caller)),
            Plan::Wait(pending) => pending,
        };
        let start = StreamStart::Generating {
            collapsed: joined.collapsed,
            forwarded: then.forwarded(),
        };
        let (sender, events) = mpsc::channel(EVENTS_QUEUED);
        let (service, keyed, caller) = (Arc::clone(self), keyed.clone(), caller.clone());
        tokio::spawn(async move {
            let mut out = Emitter::new(&sender, started);
            let Joined {
                follower,
                collapsed,
                live,
            } = joined;
            let first_by = started + service.generation_wait;
            let result = out
                .follow(follower.wait().boxed(), live, Some(first_by))
                .await;
            let answer = service.settle(&keyed, &then, collapsed, result);
            out.finish(&answer).await;
            let first_delta = out.first_delta();
            service.observe_first_delta(first_delta);
            // Accounted before `done` goes out: a client that has it sees it counted.
            service.account_streamed(&answer, &keyed, started, &caller, first_delta);
            out.send(StreamEvent::Done(answer)).await;
        });
        Ok(NarrativeStream { start, events })
    }

    /// Streams what `GET /narrative/{key}` finds: a stored entry at once, a generation
    /// running here or elsewhere live. Requests following one key elsewhere share one
    /// follow (its relay and its wait), counted against `MAX_PENDING_GENERATIONS`.
    pub async fn follow_stream(self: &Arc<Self>, key: &CacheKey) -> Followed {
        let started = Instant::now();
        let (wait, live): (BoxFuture<'static, Option<FlightResult>>, _) =
            match self.lookup(key).await {
                Lookup::Missing => return Followed::Missing,
                Lookup::Found(envelope, ttl) => {
                    let answer = Answer::found(envelope, ttl);
                    return Followed::Stream(self.answered_stream(answer, started));
                }
                Lookup::Pending => match self.flights.follow(key) {
                    Some(follower) => (follower.wait().boxed(), self.live.get(key)),
                    None => match self.join_follow(key) {
                        Some((follower, live)) => (follower.wait().boxed(), live),
                        // Too many generations and follows run: the plain answer.
                        None => return Followed::Pending,
                    },
                },
            };
        let (sender, events) = mpsc::channel(EVENTS_QUEUED);
        let service = Arc::clone(self);
        tokio::spawn(async move {
            let mut out = Emitter::new(&sender, started);
            match out.follow(wait, live, None).await {
                // What a `GET` answers once the value is stored.
                Some(Ok(envelope)) => {
                    let ttl = i64::try_from(service.stale_after.as_secs()).unwrap_or(i64::MAX);
                    let answer = Answer::entry(envelope, Source::Cache, ttl, None);
                    out.finish(&answer).await;
                    service.observe_first_delta(out.first_delta());
                    out.send(StreamEvent::Done(answer)).await;
                }
                Some(Err(_)) | None => {
                    out.reset("generation_failed").await;
                    out.send(StreamEvent::Gone).await;
                }
            }
        });
        let start = StreamStart::Generating {
            collapsed: true,
            forwarded: None,
        };
        Followed::Stream(NarrativeStream { start, events })
    }

    /// Joins the one follow of `key`'s generation elsewhere, starting it (a tracked
    /// task, relaying the key's stream into a live text of its own) if none runs.
    /// `None` when `MAX_PENDING_GENERATIONS` tasks already run.
    fn join_follow(
        self: &Arc<Self>,
        key: &CacheKey,
    ) -> Option<(cache_core::Follower<FlightResult>, Option<Arc<LiveText>>)> {
        let leader = match self.follows.join(key) {
            Flight::Follower(follower) => return Some((follower, self.followed_live.get(key))),
            Flight::Leader(leader) => leader,
        };
        let follower = leader.follower();
        if self.must_shed() {
            leader.complete(Err(FillError::Shed));
            return None;
        }
        let live = self.followed_live.open(key);
        let (service, key, followed) = (Arc::clone(self), key.clone(), Arc::clone(&live));
        self.tasks.spawn(async move {
            let open = super::fill::OpenLive::new(&service.followed_live, &key, &followed);
            let found = service
                .strategy
                .follow_elsewhere(&service, &key, &followed)
                .await;
            drop(open);
            leader.complete(found.ok_or(FillError::GaveUp));
        });
        Some((follower, Some(live)))
    }

    /// A hit, streamed: the request is accounted here.
    fn ready_stream(
        &self,
        answer: Answer,
        keyed: &KeyedProfile,
        started: Instant,
        caller: &Caller,
    ) -> NarrativeStream {
        let first_delta = Some((started.elapsed(), answer.source.as_str()));
        self.account_streamed(&answer, keyed, started, caller, first_delta);
        self.answered_stream(answer, started)
    }

    /// An answer known at once: its text and `done`, queued now, with no task to follow
    /// anything.
    fn answered_stream(&self, answer: Answer, started: Instant) -> NarrativeStream {
        let (sender, events) = mpsc::channel(2);
        self.observe_first_delta(Some((started.elapsed(), answer.source.as_str())));
        let _ = sender.try_send(StreamEvent::Text(answer.envelope.body.clone()));
        let _ = sender.try_send(StreamEvent::Done(answer.clone()));
        NarrativeStream {
            start: StreamStart::Answer(answer),
            events,
        }
    }

    fn observe_first_delta(&self, first: Option<(Duration, &'static str)>) {
        if let Some((after, source)) = first {
            self.metrics
                .first_delta_seconds
                .with_label_values(&[source])
                .observe(after.as_secs_f64());
        }
    }
}

/// One stream's events, and what it has sent since its last reset.
struct Emitter<'a> {
    out: &'a mpsc::Sender<StreamEvent>,
    started: Instant,
    sent: String,
    /// When the first text went out, and what it was (`generated`, `cache`, ...).
    first: Option<(Duration, &'static str)>,
    /// The client is gone or reads nothing: nothing more is sent.
    stalled: bool,
}

impl<'a> Emitter<'a> {
    fn new(out: &'a mpsc::Sender<StreamEvent>, started: Instant) -> Self {
        Self {
            out,
            started,
            sent: String::new(),
            first: None,
            stalled: false,
        }
    }

    fn first_delta(&self) -> Option<(Duration, &'static str)> {
        self.first
    }

    /// A client that went away, or has read nothing for `CLIENT_STALL_LIMIT`, is sent
    /// nothing more; the answer is still worked out and accounted.
    async fn send(&mut self, event: StreamEvent) {
        if self.stalled {
            return;
        }
        let sent = tokio::time::timeout(CLIENT_STALL_LIMIT, self.out.send(event)).await;
        self.stalled = !matches!(sent, Ok(Ok(())));
    }

    async fn text(&mut self, text: String, source: &'static str) {
        if text.is_empty() {
            return;
        }
        self.first
            .get_or_insert_with(|| (self.started.elapsed(), source));
        self.sent.push_str(&text);
        self.send(StreamEvent::Text(text)).await;
    }

    async fn reset(&mut self, reason: &str) {
        if self.sent.is_empty() {
            return;
        }
        self.sent.clear();
        self.send(StreamEvent::Reset(reason.to_owned())).await;
    }

    /// Passes on the live text until the flight ends (its result), or, before any text
    /// came, until `first_by` (`None`: the answer is the template).
    async fn follow(
        &mut self,
        wait: BoxFuture<'static, Option<FlightResult>>,
        live: Option<Arc<LiveText>>,
        first_by: Option<Instant>,
    ) -> Option<FlightResult> {
        let mut reader = live.map(|live| live.reader());
        let mut wait = wait;
        loop {
            let waiting_for_first = first_by.filter(|_| self.first.is_none());
            tokio::select! {
                biased;
                result = &mut wait => return result,
                update = next_update(reader.as_mut()) => match update {
                    LiveUpdate::Text(text) => self.text(text, Source::Generated.as_str()).await,
                    LiveUpdate::Reset(reason) => self.reset(&reason).await,
                },
                () = sleep_until(waiting_for_first) => return None,
            }
        }
    }

    /// Makes what was sent add up to the answer's narrative: its rest, or a reset and
    /// all of it.
    async fn finish(&mut self, answer: &Answer) {
        let body = &answer.envelope.body;
        let source = answer.source.as_str();
        if let Some(rest) = body.strip_prefix(self.sent.as_str()) {
            let rest = rest.to_owned();
            self.text(rest, source).await;
            return;
        }
        let reason = match answer.source {
            Source::Fallback => "fallback",
            Source::Stale => "stale",
            Source::Cache | Source::Generated => "replaced",
        };
        self.reset(reason).await;
        self.text(body.clone(), source).await;
    }
}

async fn next_update(reader: Option<&mut LiveReader>) -> LiveUpdate {
    match reader {
        Some(reader) => reader.next().await,
        None => std::future::pending().await,
    }
}

async fn sleep_until(deadline: Option<Instant>) {
    match deadline {
        Some(deadline) => tokio::time::sleep_until(deadline.into()).await,
        None => std::future::pending().await,
    }
}
